//! The host's relay to a key broker: the agent's `ProvisionSecret`
//! connects to the host's vsock port [`parma_protocol::KBS_VSOCK_PORT`]
//! and the host copies the bytes to and from the broker's TCP address.
//! The stream is TLS that ends inside the agent, with the broker's
//! certificate pinned by the policy: the relay sees ciphertext only, and
//! is untrusted by design (a relay that drops or changes bytes makes the
//! exchange fail, nothing more).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Connections relayed at once; more are closed.
const MAX_CONNECTIONS: usize = 8;
/// How long a connection to the broker may take to open.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long either side may stay silent before the relay drops the
/// connection (the agent's exchange ends within 90 s anyway), so nothing
/// in the guest can hold the relay's slots.
const IDLE: Duration = Duration::from_secs(60);
/// The longest a relayed connection lives, busy or not (the agent's whole
/// exchange ends within 90 s).
const LIFETIME: Duration = Duration::from_secs(120);

/// A relay that runs until it is dropped.
#[derive(Debug)]
pub struct Relay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Listen at `path` (a vhost-user vsock backend's `UDS_PORT` socket,
    /// or vhost-vsock's equivalent) and relay each connection to `broker`.
    pub fn start(path: &Path, broker: SocketAddr) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("kbs-relay".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((guest, _)) => {
                            if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                                continue;
                            }
                            open.fetch_add(1, Ordering::Relaxed);
                            let open = open.clone();
                            std::thread::spawn(move || {
                                if let Err(err) = relay_one(guest, broker) {
                                    tracing::warn!("key broker relay: {err}");
                                }
                                open.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(err) => {
                            tracing::warn!("key broker relay: accept: {err}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?
        };
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copy one connection both ways until either side ends.
fn relay_one(guest: UnixStream, broker: SocketAddr) -> std::io::Result<()> {
    guest.set_nonblocking(false)?;
    guest.set_read_timeout(Some(IDLE))?;
    guest.set_write_timeout(Some(IDLE))?;
    let upstream = TcpStream::connect_timeout(&broker, CONNECT_DEADLINE)?;
    upstream.set_read_timeout(Some(IDLE))?;
    upstream.set_write_timeout(Some(IDLE))?;
    // Past its lifetime the connection is shut, whatever flows.
    let (guest_end, broker_end) = (guest.try_clone()?, upstream.try_clone()?);
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + LIFETIME;
            while !done.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = guest_end.shutdown(Shutdown::Both);
            let _ = broker_end.shutdown(Shutdown::Both);
        })
    };
    let (mut guest_in, mut guest_out) = (guest.try_clone()?, guest);
    let (mut broker_in, mut broker_out) = (upstream.try_clone()?, upstream);
    let to_broker = std::thread::spawn(move || {
        let _ = copy(&mut guest_in, &mut broker_out);
        let _ = broker_out.shutdown(Shutdown::Write);
    });
    let _ = copy(&mut broker_in, &mut guest_out);
    let _ = guest_out.shutdown(Shutdown::Write);
    let _ = to_broker.join();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    Ok(())
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<u64> {
    std::io::copy(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_go_both_ways() {
        let broker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = broker.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = broker.accept().unwrap();
            let mut asked = [0u8; 5];
            stream.read_exact(&mut asked).unwrap();
            stream.write_all(&[asked.as_slice(), b" back"].concat()).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock_1025");
        let relay = Relay::start(&path, address).unwrap();
        let mut guest = UnixStream::connect(&path).unwrap();
        guest.write_all(b"hello").unwrap();
        let mut answer = String::new();
        guest.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "hello back");
        server.join().unwrap();
        drop(relay);
        assert!(!path.exists());
    }
}
