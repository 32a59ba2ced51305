//! Transports: a virtio-serial port (emulation, tests) and vsock (real hosts).
//!
//! Both carry the same frames; see `serve`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use parma_protocol::{SERIAL_PORT_NAME, VSOCK_PORT};
use tokio::sync::{Semaphore, mpsc};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

use crate::dispatch::Dispatcher;
use crate::serve::{Ended, OnEof, serve};

/// Where the kernel lists virtio-serial ports and their names.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// Concurrent vsock connections the agent serves; more are closed at once.
const MAX_VSOCK_CONNECTIONS: usize = 8;
/// How often the agent looks again for its port, and for a host on it.
const POLL: Duration = Duration::from_millis(20);
/// Responses waiting for the port's writer: when the host does not read,
/// the agent stops reading it too, rather than keep answers in memory.
const SERIAL_OUT_QUEUE: usize = 16;

/// Wait until the virtio-serial port named [`SERIAL_PORT_NAME`] appears.
///
/// QEMU names ports with a control message after the device is probed, so
/// the port can show up a little after the agent starts.
pub async fn find_serial_port(deadline: Duration) -> anyhow::Result<PathBuf> {
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(port) = named_port(Path::new(VIRTIO_PORTS), SERIAL_PORT_NAME) {
            return Ok(port);
        }
        if tokio::time::Instant::now() >= give_up {
            bail!("no virtio-serial port named {SERIAL_PORT_NAME} after {deadline:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `/dev/vportNpM` for the port whose `name` is `wanted`, if any.
fn named_port(class_dir: &Path, wanted: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class_dir).ok()?;
    entries.flatten().find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim_end() == wanted).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// Serve the virtio-serial port for as long as the agent runs.
///
/// A virtio-serial port has no connections: when the host side closes, reads
/// return end of file until a host connects again. Each such gap resets the
/// decoder, so half a frame from a host that left never merges with the
/// next host's bytes, and nothing else ([`OnEof::ResetFraming`]): requests
/// taken are carried out and answered. Returns `Ok` only once a shutdown
/// request was answered.
///
/// The port is read and written with blocking calls on two threads, not
/// through epoll: the virtio console driver's wakeups around a host
/// reconnecting can be missed by an edge-triggered poller, which left a
/// request unread until the host gave up (seen under TCG, about one boot in
/// ten). A blocking read waits on the driver's own condition instead.
pub async fn serve_serial(path: &Path, dispatcher: &Arc<Dispatcher>) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let writer = file.try_clone().context("cannot duplicate the serial port descriptor")?;
    let (events_tx, mut events) = mpsc::channel::<SerialEvent>(16);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(SERIAL_OUT_QUEUE);
    std::thread::Builder::new()
        .name("serial-read".into())
        .spawn(move || read_port(file, &events_tx))
        .context("cannot start the serial reader")?;
    let (finished_tx, finished) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("serial-write".into())
        .spawn(move || {
            write_port(writer, out_rx);
            let _ = finished_tx.send(());
        })
        .context("cannot start the serial writer")?;
    loop {
        let mut stream =
            SerialStream { events: &mut events, pending: Vec::new(), out: out_tx.clone(), reserving: None };
        match serve(&mut stream, dispatcher, OnEof::ResetFraming).await {
            Ok(Ended::Shutdown) => {
                // The writer ends once every sender is gone, after writing
                // the answer: wait for it (a while: with no host on the
                // port a write blocks) before the agent exits.
                drop(stream);
                drop(out_tx);
                let _ = finished.recv_timeout(Duration::from_secs(2));
                return Ok(());
            }
            // Not returned with `ResetFraming`; a new session is harmless.
            Ok(Ended::Eof) => {}
            Err(err) => {
                tracing::warn!("serial port: {err}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// What the reader thread saw on the port.
#[derive(Debug)]
enum SerialEvent {
    Data(Vec<u8>),
    /// The host side closed after sending something.
    Eof,
    /// The port cannot be read at all.
    Failed(std::io::ErrorKind),
}

/// Blocking reads until the agent exits; end of file (no host) is polled.
fn read_port(mut file: std::fs::File, events: &mpsc::Sender<SerialEvent>) {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = false;
    loop {
        let event = match file.read(&mut buf) {
            Ok(0) => {
                if !std::mem::replace(&mut connected, false) {
                    std::thread::sleep(POLL);
                    continue;
                }
                SerialEvent::Eof
            }
            Ok(n) => {
                connected = true;
                SerialEvent::Data(buf.get(..n).unwrap_or_default().to_vec())
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                std::thread::sleep(POLL);
                SerialEvent::Failed(err.kind())
            }
        };
        if events.blocking_send(event).is_err() {
            return;
        }
    }
}

/// Blocking writes of whole responses, in order.
fn write_port(mut file: std::fs::File, mut out: mpsc::Receiver<Vec<u8>>) {
    use std::io::Write;
    while let Some(bytes) = out.blocking_recv() {
        if let Err(err) = file.write_all(&bytes) {
            tracing::warn!("serial port: a response was lost: {err}");
        }
    }
}

/// A slot in the writer's queue, being waited for.
type Reserving = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<mpsc::OwnedPermit<Vec<u8>>, mpsc::error::SendError<()>>> + Send>,
>;

/// One host's stretch of the serial port, as a stream for `serve`.
struct SerialStream<'a> {
    events: &'a mut mpsc::Receiver<SerialEvent>,
    pending: Vec<u8>,
    out: mpsc::Sender<Vec<u8>>,
    reserving: Option<Reserving>,
}

impl tokio::io::AsyncRead for SerialStream<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.pending.is_empty() {
            match self.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(SerialEvent::Data(bytes))) => self.pending = bytes,
                // End of this host's stream: zero bytes read.
                Poll::Ready(Some(SerialEvent::Eof)) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(SerialEvent::Failed(kind))) => {
                    return Poll::Ready(Err(std::io::Error::new(kind, "cannot read the serial port")));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(std::io::Error::other("the serial reader stopped")));
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(self.pending.get(..n).unwrap_or_default());
        self.pending.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for SerialStream<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let out = self.out.clone();
        let reserving = self.reserving.get_or_insert_with(|| Box::pin(out.reserve_owned()));
        match reserving.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.reserving = None;
                match result {
                    Ok(permit) => {
                        permit.send(buf.to_vec());
                        Poll::Ready(Ok(buf.len()))
                    }
                    Err(_) => Poll::Ready(Err(std::io::Error::other("the serial writer stopped"))),
                }
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The CID of the host (the hypervisor's side of a guest-to-host transport).
pub const HOST_CID: u32 = 2;

/// Why the agent does not listen on vsock.
#[derive(Debug, thiserror::Error)]
pub enum VsockUnavailable {
    /// No guest-to-host transport (no virtio-vsock device): nobody but the
    /// guest itself could connect, so there is nothing to listen for.
    #[error("no guest-to-host vsock transport ({0})")]
    NoTransport(String),
    /// Binding the port failed.
    #[error("cannot bind vsock port {VSOCK_PORT}: {0}")]
    Bind(std::io::Error),
}

/// Bind the vsock listener ([`VSOCK_PORT`]) if the guest has a
/// guest-to-host transport; without one (a virtio-serial boot) the agent
/// does not listen on vsock at all.
pub fn listen_vsock() -> Result<VsockListener, VsockUnavailable> {
    // VMADDR_CID_ANY (u32::MAX) is what the kernel answers without a
    // guest-to-host transport.
    match vsock::get_local_cid() {
        Ok(cid) if cid != VMADDR_CID_ANY && cid > HOST_CID => {}
        Ok(cid) => return Err(VsockUnavailable::NoTransport(format!("local CID {cid}"))),
        Err(err) => return Err(VsockUnavailable::NoTransport(err.to_string())),
    }
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, VSOCK_PORT)).map_err(VsockUnavailable::Bind)
}

/// Whether a vsock peer may talk to the agent: the host only. vsock has no
/// network namespaces, so without this check any process in the guest (a
/// container's included) that reaches the port would be served.
pub fn peer_allowed(peer_cid: u32) -> bool {
    peer_cid == HOST_CID
}

/// Accept vsock connections and serve each on its own task, at most
/// [`MAX_VSOCK_CONNECTIONS`] at a time (each may hold a bounded frame buffer).
pub async fn serve_vsock(listener: VsockListener, dispatcher: Arc<Dispatcher>, shutdown: mpsc::Sender<()>) {
    let slots = Arc::new(Semaphore::new(MAX_VSOCK_CONNECTIONS));
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("vsock accept: {err}");
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        if !peer_allowed(peer.cid()) {
            tracing::warn!("vsock {peer:?}: refused, only the host (CID {HOST_CID}) is served");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("vsock {peer:?}: refused, {MAX_VSOCK_CONNECTIONS} connections already open");
            continue;
        };
        let dispatcher = dispatcher.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match serve(&mut stream, &dispatcher, OnEof::End).await {
                Ok(Ended::Shutdown) => {
                    let _ = shutdown.send(()).await;
                }
                Ok(Ended::Eof) => {}
                Err(err) => tracing::warn!("vsock {peer:?}: {err}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_port() {
        let dir = std::env::temp_dir().join(format!("parma-ports-{}", std::process::id()));
        for (port, name) in
            [("vport0p1", "org.qemu.guest_agent.0\n"), ("vport1p1", "org.parma.agent\n"), ("vport1p2", "")]
        {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), name).unwrap();
        }
        assert_eq!(named_port(&dir, SERIAL_PORT_NAME), Some(PathBuf::from("/dev/vport1p1")));
        assert_eq!(named_port(&dir, "missing"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_host_is_served_over_vsock() {
        assert!(peer_allowed(HOST_CID));
        // The guest's own loopback (1), the hypervisor (0), guests and any.
        for cid in [0, 1, 3, 4, 1000, u32::MAX] {
            assert!(!peer_allowed(cid), "CID {cid}");
        }
    }
}
