//! The Parma guest agent.
//!
//! It serves the host's requests over vsock (real hosts) and a virtio-serial
//! port (emulation and tests) with the same framed protocol. Every request
//! goes through one dispatcher: decode, then the policy gate, then the
//! handler. It exits only when the host asks for a shutdown (status 0) or
//! when it has no transport (status 1); init powers the VM off either way.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod attest;
mod containers;
mod dispatch;
mod gate;
mod guest;
mod mounts;
mod scratch;
mod seccomp;
mod serve;
mod storage;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::dispatch::Dispatcher;

/// How long the agent looks for its virtio-serial port before giving up on it.
const SERIAL_DEADLINE: Duration = Duration::from_secs(30);

fn main() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).without_time().with_target(false).init();
    // No container process may ptrace the agent or open its /proc/PID/mem
    // (one granted CAP_SYS_PTRACE included), and it leaves no core dump.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot make the agent non-dumpable: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run());
    std::process::exit(code);
}

async fn run() -> i32 {
    let dispatcher = Arc::new(Dispatcher::new(attest::Provider::detect()));
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<()>(1);

    let vsock = match transport::listen_vsock() {
        Ok(listener) => {
            tracing::info!("listening on vsock port {}", parma_protocol::VSOCK_PORT);
            tokio::spawn(transport::serve_vsock(listener, dispatcher.clone(), shutdown_tx.clone()));
            true
        }
        Err(err) => {
            tracing::info!("no vsock: {err}");
            false
        }
    };

    let serial = {
        let dispatcher = dispatcher.clone();
        tokio::spawn(async move {
            match transport::find_serial_port(SERIAL_DEADLINE).await {
                Ok(port) => {
                    tracing::info!("serving on virtio-serial port {}", port.display());
                    transport::serve_serial(&port, &dispatcher).await
                }
                Err(err) => Err(err),
            }
        })
    };
    drop(shutdown_tx);

    tokio::select! {
        _ = shutdown_rx.recv() => {
            tracing::info!("shutdown requested by the host");
            0
        }
        result = serial => {
            let err = match result {
                // The serial transport ends only after answering a shutdown.
                Ok(Ok(())) => return 0,
                Ok(Err(err)) => format!("{err:#}"),
                Err(err) => format!("serial task failed: {err}"),
            };
            if vsock {
                tracing::warn!("{err}; serving on vsock only");
                match shutdown_rx.recv().await {
                    Some(()) => 0,
                    None => 1,
                }
            } else {
                tracing::error!("{err}; no transport left");
                1
            }
        }
    }
}
