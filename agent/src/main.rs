//! The Parma guest agent.
//!
//! It serves the host's requests over vsock (real hosts) and a virtio-serial
//! port (emulation and tests) with the same framed protocol. Every request
//! goes through one dispatcher: decode, then the policy gate, then the
//! handler. It exits only when the host asks for a shutdown (status 0), when
//! it has no transport (status 1), or when it cannot go on safely (status
//! 70, and a panic: the guest build aborts); init powers the VM off in every
//! case.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod attest;
mod containers;
mod dispatch;
mod endpoint;
mod fault;
mod files;
mod gate;
mod guest;
mod kbs;
mod log;
mod mounts;
mod network;
mod pod;
mod scratch;
mod seccomp;
mod serve;
mod storage;
mod transport;

use std::time::Duration;

use tokio::sync::mpsc;

use crate::dispatch::Dispatcher;

/// How long the agent looks for its virtio-serial port before giving up on it.
const SERIAL_DEADLINE: Duration = Duration::from_secs(30);
/// The exit status when the agent cannot go on safely.
const EXIT_FAIL_CLOSED: i32 = 70;
/// Threads that carry out requests (each may block on a disk the host
/// stalls): one per connection at a time (8 vsock and the serial port),
/// and the key broker exchanges that run aside (`MAX_ASIDE`, 4 in all).
const MAX_BLOCKING_THREADS: usize = 16;

/// Stop the agent because going on could act on records that do not match
/// the guest: init powers the UVM off.
pub fn fail_closed(reason: &str) -> ! {
    tracing::error!("{reason}: stopping");
    std::process::exit(EXIT_FAIL_CLOSED)
}

fn main() {
    // Run again as a pod's namespace holder: nothing of the agent starts.
    if std::env::args_os().next().is_some_and(|argv0| argv0 == pod::PAUSE_ARGV0) {
        pod::pause();
    }
    log::init();
    std::panic::set_hook(Box::new(|info| {
        log::panic_hook(info);
        std::process::abort();
    }));
    // No container process may ptrace the agent or open its /proc/PID/mem
    // (containers get no CAP_SYS_PTRACE), and it leaves no core dump.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot make the agent non-dumpable: {err}");
    }
    // Nothing of the agent (the policy, the scratch key while it is set up,
    // stdio in flight) is ever swapped to the host's scratch disk; pages
    // are locked as they are touched, not all at once.
    let lock = nix::sys::mman::MlockAllFlags::MCL_CURRENT
        | nix::sys::mman::MlockAllFlags::MCL_FUTURE
        | nix::sys::mman::MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);
    if let Err(err) = nix::sys::mman::mlockall(lock) {
        tracing::warn!("cannot lock the agent's memory: {err}");
    }
    // A container that uses all memory is killed, never the agent.
    // Container processes start at 0 again (the launch resets it).
    if let Err(err) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!("cannot protect the agent from the OOM killer: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
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
    let dispatcher = Dispatcher::serving(attest::Provider::detect());
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
        // Without vsock there is no sender: only the serial transport ends it.
        Some(()) = shutdown_rx.recv(), if vsock => {
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
