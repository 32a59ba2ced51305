//! The shim v2 process protocol, as containerd 1.6 runs a shim:
//!
//! - `start` (cwd: the bundle): find or start the pod's shim and print its
//!   ttrpc address. Containers of one pod share one shim (CRI's sandbox id
//!   names the group); a second `start` finds the first one's socket.
//! - no action: serve the Task API on the socket `start` chose, publish
//!   events to `TTRPC_ADDRESS`, exit once containerd's `Shutdown` finds no
//!   task left.
//! - `delete` (after a shim died): kill the UVM the bundle's record names,
//!   remove its files, print a `DeleteResponse`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use containerd_shim_protos::protobuf::Message;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::spec::Spec;

/// What containerd asks of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Print the version.
    Version,
    /// Find or start the pod's shim.
    Start,
    /// Clean up after a shim that died.
    Delete,
    /// Serve the Task API (the shim itself).
    Serve,
}

/// The command line containerd gives a shim (Go's flag syntax: `-flag
/// value` or `-flag=value`, one or two dashes), and the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// containerd's namespace (`-namespace`).
    pub namespace: String,
    /// The task's id (`-id`).
    pub id: String,
    /// containerd's gRPC address (`-address`).
    pub address: String,
    /// The bundle (`-bundle`; `start` and serving use the working directory).
    pub bundle: Option<PathBuf>,
    /// The socket to serve on (`-socket`, given by `start` to the shim it starts).
    pub socket: Option<PathBuf>,
    /// Debug logs (`-debug`).
    pub debug: bool,
    /// The action.
    pub action: Action,
}

impl Args {
    /// Parse the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut parsed = Args {
            namespace: String::new(),
            id: String::new(),
            address: String::new(),
            bundle: None,
            socket: None,
            debug: false,
            action: Action::Serve,
        };
        let mut args = args.into_iter();
        let mut action = None;
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                if action.is_some() {
                    return Err(format!("unexpected argument {arg:?}"));
                }
                action = Some(match arg.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    other => return Err(format!("unknown action {other:?} (start, delete)")),
                });
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (flag, None),
            };
            match name {
                "debug" => parsed.debug = inline.is_none_or(|value| value != "false"),
                "v" | "version" => parsed.action = Action::Version,
                "namespace" | "id" | "address" | "bundle" | "socket" | "publish-binary" => {
                    let value = match inline {
                        Some(value) => value,
                        None => args.next().ok_or_else(|| format!("-{name} needs a value"))?,
                    };
                    match name {
                        "namespace" => parsed.namespace = value,
                        "id" => parsed.id = value,
                        "address" => parsed.address = value,
                        "bundle" => parsed.bundle = Some(PathBuf::from(value)),
                        "socket" => parsed.socket = Some(PathBuf::from(value)),
                        // Events go over ttrpc (TTRPC_ADDRESS), not through containerd's binary.
                        _ => {}
                    }
                }
                other => return Err(format!("unknown flag -{other}")),
            }
        }
        if parsed.action == Action::Version {
            return Ok(parsed);
        }
        parsed.action = action.unwrap_or(Action::Serve);
        if parsed.namespace.is_empty() || parsed.id.is_empty() {
            return Err("-namespace and -id are required (containerd gives them)".into());
        }
        Ok(parsed)
    }

    fn bundle(&self) -> anyhow::Result<PathBuf> {
        match &self.bundle {
            Some(bundle) => Ok(bundle.clone()),
            None => std::env::current_dir().context("no working directory (the bundle)"),
        }
    }
}

/// The socket of the shim for `group` (the pod) in `namespace` of the
/// containerd at `address`.
pub fn socket_path(state_dir: &Path, address: &str, namespace: &str, group: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{address}\0{namespace}\0{group}").as_bytes());
    state_dir.join(format!("{}.sock", hex::encode(digest.get(..16).unwrap_or_default())))
}

/// `start`: print the address of the pod's shim, starting it if needed.
pub fn start(args: &Args) -> anyhow::Result<()> {
    let bundle = args.bundle()?;
    let spec = Spec::load(&bundle)?;
    let config_path = Config::path();
    let config = Config::load(&config_path)?;
    let group = spec.sandbox_id().unwrap_or(&args.id).to_string();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot make {}", config.state_dir.display()))?;
    let socket = socket_path(&config.state_dir, &args.address, &args.namespace, &group);
    let address = format!("unix://{}", socket.display());
    if UnixStream::connect(&socket).is_ok() {
        write_address(&bundle, &address)?;
        println!("{address}");
        return Ok(());
    }
    if group != args.id {
        bail!("the pod {group} has no shim (its sandbox was not created through this runtime)");
    }
    // A socket nobody answers on is a dead shim's.
    let _ = std::fs::remove_file(&socket);
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut command = Command::new(exe);
    command
        .args(["-namespace", &args.namespace, "-id", &args.id, "-address", &args.address, "-socket"])
        .arg(&socket)
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // containerd reads the shim's log from the bundle's `log` FIFO.
        .stderr(shim_log(&bundle));
    if args.debug {
        command.arg("-debug");
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("cannot start the shim")?;
    let give_up = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the shim exited at once ({status}); see containerd's log");
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            bail!("the shim did not listen on {} within 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    write_address(&bundle, &address)?;
    println!("{address}");
    Ok(())
}

fn write_address(bundle: &Path, address: &str) -> anyhow::Result<()> {
    std::fs::write(bundle.join("address"), address).context("cannot write the bundle's address file")
}

/// The bundle's `log` FIFO when containerd reads it, else nothing.
fn shim_log(bundle: &Path) -> Stdio {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: fails at once when nobody reads.
    match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(bundle.join("log")) {
        Ok(file) => Stdio::from(file),
        Err(_) => Stdio::null(),
    }
}

/// `delete`: kill what the bundle's record names and print a `DeleteResponse`.
pub fn delete(args: &Args) -> anyhow::Result<()> {
    let bundle = args.bundle()?;
    let mut pid = 0;
    if let Some(record) = crate::pod::read_record(&bundle) {
        pid = record.qemu_pid;
        crate::pod::clean_up(&record);
        let _ = std::fs::remove_file(bundle.join(crate::pod::RECORD));
    }
    let mut response = containerd_shim_protos::api::DeleteResponse::new();
    response.pid = pid;
    // As a runc shim reports a task it had to kill.
    response.exit_status = 128 + 9;
    response.exited_at = Some(containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::now()).into();
    let bytes = response.write_to_bytes().context("cannot encode the DeleteResponse")?;
    std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
    Ok(())
}

/// Serve the Task API on the socket `start` chose until containerd shuts
/// the shim down.
pub fn serve(args: &Args) -> anyhow::Result<()> {
    let filter = if args.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // stderr is containerd's log FIFO, which may lose its reader: a
        // failed write must not become an eprintln! that panics.
        .log_internal_errors(false)
        .init();
    let socket = args.socket.clone().context("-socket is required to serve (start gives it)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    runtime.block_on(async {
        let events = crate::events::Publisher::start(std::env::var("TTRPC_ADDRESS").ok(), args.namespace.clone());
        let exit = Arc::new(tokio::sync::Notify::new());
        let service = crate::service::Service::new(events.clone(), exit.clone());
        let services = containerd_shim_protos::shim_async::create_task(Arc::new(service));
        let _ = std::fs::remove_file(&socket);
        let mut server = containerd_shim_protos::ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .context("cannot listen")?
            .register_service(services);
        server.start().await.context("cannot serve")?;
        tracing::info!(id = %args.id, "serving {}", socket.display());
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            () = exit.notified() => tracing::info!("shut down by containerd"),
            _ = terminate.recv() => tracing::info!("terminated"),
        }
        // The last events (the sandbox's delete) and the Shutdown answer
        // reach containerd before the socket goes.
        events.flush(Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = server.shutdown().await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Args, String> {
        Args::parse(args.split_whitespace().map(String::from))
    }

    #[test]
    fn containerds_command_lines_parse() {
        let start = parse("-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id abc start").unwrap();
        assert_eq!((start.namespace.as_str(), start.id.as_str(), start.action), ("k8s.io", "abc", Action::Start));
        let delete = parse("--namespace=default -id=x -bundle /b -debug delete").unwrap();
        assert_eq!((delete.bundle, delete.debug, delete.action), (Some(PathBuf::from("/b")), true, Action::Delete));
        assert_eq!(parse("-namespace n -id x -socket /s").unwrap().action, Action::Serve);
        assert_eq!(parse("-v").unwrap().action, Action::Version);
        for (bad, why) in [
            ("-namespace n start", "required"),
            ("-namespace n -id x stop", "unknown action"),
            ("-namespace n -id x -frob 1", "unknown flag"),
            ("-namespace", "needs a value"),
            ("-namespace n -id x start delete", "unexpected"),
        ] {
            assert!(parse(bad).unwrap_err().contains(why), "{bad}");
        }
    }

    #[test]
    fn a_pods_containers_share_a_socket_and_pods_do_not() {
        let dir = Path::new("/run/parma-shim");
        let one = socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "pod-a");
        assert_eq!(one, socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "pod-a"));
        assert_ne!(one, socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "pod-b"));
        assert_ne!(one, socket_path(dir, "/tmp/other.sock", "k8s.io", "pod-a"));
        assert!(one.as_os_str().len() < 108, "a unix socket path fits sun_path");
    }
}
