//! Transports: a virtio-serial port (emulation, tests) and vsock (real hosts).
//!
//! Both carry the same frames; see `serve`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use parma_protocol::{SERIAL_PORT_NAME, VSOCK_PORT};
use tokio::net::unix::pipe;
use tokio::sync::{Semaphore, mpsc};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

use crate::dispatch::Dispatcher;
use crate::serve::{Ended, serve};

/// Where the kernel lists virtio-serial ports and their names.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// Concurrent vsock connections the agent serves; more are closed at once.
const MAX_VSOCK_CONNECTIONS: usize = 8;
/// How often the agent looks again for its port, and for a host on it.
const POLL: Duration = Duration::from_millis(20);

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
/// next host's bytes. Returns `Ok` only once a shutdown request was answered.
pub async fn serve_serial(path: &Path, dispatcher: &Dispatcher) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // tokio's pipe halves drive any pollable non-blocking descriptor; the
    // port is opened once (the kernel allows one opener) and duplicated.
    let writer = file.try_clone().context("cannot duplicate the serial port descriptor")?;
    let reader = pipe::Receiver::from_file_unchecked(file).context("cannot poll the serial port")?;
    let writer = pipe::Sender::from_file_unchecked(writer).context("cannot poll the serial port")?;
    let mut port = tokio::io::join(reader, writer);
    loop {
        match serve(&mut port, dispatcher).await {
            Ok(Ended::Shutdown) => return Ok(()),
            // No host connected: wait before looking again.
            Ok(Ended::Eof) => tokio::time::sleep(POLL).await,
            Err(err) => {
                tracing::warn!("serial port: {err}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// Bind the vsock listener (any CID, [`VSOCK_PORT`]).
pub fn listen_vsock() -> std::io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, VSOCK_PORT))
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("vsock {peer:?}: refused, {MAX_VSOCK_CONNECTIONS} connections already open");
            continue;
        };
        let dispatcher = dispatcher.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match serve(&mut stream, &dispatcher).await {
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
}
