//! The VM test harness.
//!
//! It boots the image `make image` built, with the same QEMU arguments users
//! get from `parma vm run` (the `parma` library builds them), waits for the
//! agent by pinging it until a deadline, kills QEMU's whole process group
//! when dropped, and fails a test on any kernel panic, Rust panic or
//! "Attempted to kill init" on the serial console.
//!
//! A missing image is a failure, never a skip: `make test` builds it first.

pub mod oci;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parma::{Client, Control, Serial, VmConfig};
use parma_protocol::PingInfo;

/// Lines on the serial console that fail any test.
pub const FATAL_PATTERNS: &[&str] = &[
    "Kernel panic",
    "Attempted to kill init",
    "panicked at",
    "BUG:",
    "Oops:",
    "general protection fault",
    "internal error:",
];

/// Where the build put things.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The repository root.
    pub repo: PathBuf,
    /// The UVM directory (`PARMA_UVM`, default `out/uvm`).
    pub uvm: PathBuf,
    /// The static guest binaries (`PARMA_GUEST_BIN`, default the `guest` profile's output).
    pub guest_bin: PathBuf,
}

impl Paths {
    /// Resolve from the environment, with the defaults `make` uses.
    pub fn get() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let uvm = std::env::var_os("PARMA_UVM").map_or_else(|| repo.join("out/uvm"), PathBuf::from);
        let guest_bin = std::env::var_os("PARMA_GUEST_BIN")
            .map_or_else(|| repo.join("target/x86_64-unknown-linux-gnu/guest"), PathBuf::from);
        Self { repo, uvm, guest_bin }
    }

    /// The paths, after checking the image is built. Fails loudly otherwise.
    pub fn require_image() -> anyhow::Result<Self> {
        let paths = Self::get();
        for name in [parma_image::files::KERNEL, parma_image::files::INITRD, parma_image::files::CMDLINE] {
            let path = paths.uvm.join(name);
            if !path.is_file() {
                bail!("{} is missing: run `make image` (or `make test`, which builds it) first", path.display());
            }
        }
        Ok(paths)
    }

    /// A static guest binary built by `scripts/build-guest.sh`.
    pub fn guest_binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.guest_bin.join(name);
        if !path.is_file() {
            bail!("{} is missing: run scripts/build-guest.sh (make test does)", path.display());
        }
        Ok(path)
    }
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Boot this initrd instead of the image's.
    pub initrd: Option<PathBuf>,
    /// Guest memory.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// INSECURE: emulated SEV-SNP reports with this HOST_DATA.
    pub emulated_host_data: Option<[u8; 32]>,
    /// Read-only disks (container layers).
    pub disks: Vec<parma::Disk>,
    /// Give the guest vsock through rust-vmm's `vhost-device-vsock` (a
    /// vhost-user backend; this host has no vhost-vsock), reached with
    /// [`Guest::vsock_control`].
    pub vsock: bool,
}

impl Default for Boot {
    fn default() -> Self {
        Self { initrd: None, memory_mib: 512, cpus: 1, emulated_host_data: None, disks: Vec::new(), vsock: false }
    }
}

/// The vhost-user vsock backend `scripts/deps.sh` installs.
pub const VSOCK_BACKEND: &str = "vhost-device-vsock";

/// Start the vsock backend in `dir`; returns it once its vhost-user socket
/// is there for QEMU.
fn start_vsock_backend(dir: &Path) -> anyhow::Result<Child> {
    let socket = dir.join("vhost-vsock.sock");
    // On PATH, or where `cargo install` put it.
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin").join(VSOCK_BACKEND));
    let program = match cargo_bin {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from(VSOCK_BACKEND),
    };
    let mut command = std::process::Command::new(program);
    command
        .args(["--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(dir.join("vsock.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {VSOCK_BACKEND} (scripts/deps.sh installs it with cargo)"))?;
    let give_up = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{VSOCK_BACKEND} exited at start: {status}");
        }
        if Instant::now() >= give_up {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{VSOCK_BACKEND} made no socket within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

impl Boot {
    /// A boot whose emulated reports carry the hash of this policy file as HOST_DATA.
    pub fn emulated_for_policy(policy: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(policy).with_context(|| format!("cannot read {}", policy.display()))?;
        let host_data = parma_policy::Policy::from_bytes(bytes)?.hash();
        Ok(Self { emulated_host_data: Some(host_data), ..Self::default() })
    }
}

/// A running UVM. Dropping it kills QEMU's process group.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    dir: tempfile::TempDir,
    control: PathBuf,
    serial_log: PathBuf,
    started: Instant,
    exited: Option<ExitStatus>,
    vsock_backend: Option<Child>,
}

impl Guest {
    /// Boot the image with these options.
    pub fn boot(paths: &Paths, boot: &Boot) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("parma-vm-").tempdir()?;
        let control = dir.path().join("control.sock");
        let serial_log = dir.path().join("serial.log");
        let mut config = VmConfig::new(&paths.uvm, &control);
        config.initrd = boot.initrd.clone();
        config.memory_mib = boot.memory_mib;
        config.cpus = boot.cpus;
        config.insecure_emulated_host_data = boot.emulated_host_data;
        config.disks = boot.disks.clone();
        config.serial = Serial::File(serial_log.clone());
        let vsock_backend = if boot.vsock {
            config.vhost_user_vsock = Some(dir.path().join("vhost-vsock.sock"));
            Some(start_vsock_backend(dir.path())?)
        } else {
            None
        };
        let mut command = config.command()?;
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = command.spawn().context("cannot start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        Ok(Self { child, dir, control, serial_log, started: Instant::now(), exited: None, vsock_backend })
    }

    /// The agent over vsock, through the backend's unix socket (booted with
    /// [`Boot::vsock`]).
    pub fn vsock_control(&self) -> Option<Control> {
        self.vsock_backend
            .as_ref()
            .map(|_| Control::VsockUds { path: self.dir.path().join("vsock.sock"), port: parma_protocol::VSOCK_PORT })
    }

    /// The agent's control socket.
    pub fn control(&self) -> Control {
        Control::Unix(self.control.clone())
    }

    /// A scratch directory that lives as long as the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the guest printed on its serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Fail if the serial console shows a panic.
    pub fn check_serial(&self) -> anyhow::Result<()> {
        let serial = self.serial();
        if let Some(pattern) = FATAL_PATTERNS.iter().find(|p| serial.contains(*p)) {
            bail!("the serial console shows {pattern:?}:\n{serial}");
        }
        Ok(())
    }

    /// Whether QEMU has exited, and how.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    fn fail_if_exited(&mut self, doing: &str) -> anyhow::Result<()> {
        if let Some(status) = self.try_exit()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            bail!("QEMU exited ({status}) while {doing}\nqemu: {stderr}\nserial:\n{}", self.serial());
        }
        Ok(())
    }

    /// Ping the agent until it answers, at most `deadline` after QEMU started.
    pub fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<PingInfo> {
        self.ping_until(self.started + deadline)
    }

    /// Ping the agent, each try on a new connection, until it answers or `give_up` passes.
    ///
    /// A virtio-serial port has no connection boundaries: when a client
    /// leaves half a frame and the next one connects before the agent saw
    /// the port close, the first ping can be swallowed while the agent
    /// resynchronises. The next try is answered.
    pub fn ping_until(&mut self, give_up: Instant) -> anyhow::Result<PingInfo> {
        let deadline = give_up.saturating_duration_since(Instant::now());
        let mut last_error = String::from("no attempt");
        while Instant::now() < give_up {
            self.fail_if_exited("waiting for the agent")?;
            if !self.control.exists() {
                // QEMU creates the socket while it starts; look again very soon.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let attempt = Client::connect(&self.control(), Duration::from_secs(1)).and_then(|mut c| c.ping());
            match attempt {
                Ok(info) => {
                    self.check_serial()?;
                    return Ok(info);
                }
                Err(err) => last_error = format!("{err:#}"),
            }
        }
        bail!("the agent did not answer within {deadline:?} ({last_error})\nserial:\n{}", self.serial())
    }

    /// A connection on which the agent answered a ping, waiting at most
    /// `deadline` after QEMU started; each call on it then waits up to `timeout`.
    /// (A request sent right after a reconnect can be swallowed while the
    /// agent resynchronises: this pings until one is answered on the
    /// connection it returns.)
    pub fn ready_client(&mut self, deadline: Duration, timeout: Duration) -> anyhow::Result<Client> {
        let give_up = self.started + deadline;
        let mut last_error = String::from("no attempt");
        while Instant::now() < give_up {
            self.fail_if_exited("waiting for the agent")?;
            if !self.control.exists() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            match Client::connect(&self.control(), Duration::from_secs(1)) {
                Ok(mut client) => match client.ping() {
                    Ok(_) => {
                        self.check_serial()?;
                        client.set_timeout(timeout);
                        return Ok(client);
                    }
                    Err(err) => last_error = format!("{err:#}"),
                },
                Err(err) => last_error = format!("{err:#}"),
            }
        }
        bail!("the agent did not answer within {deadline:?} ({last_error})\nserial:\n{}", self.serial())
    }

    /// A new connection to the agent.
    pub fn client(&self, timeout: Duration) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.control(), timeout)?)
    }

    /// Wait for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let give_up = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= give_up {
                bail!("QEMU still runs {timeout:?} later\nserial:\n{}", self.serial());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.child.wait();
        }
        if let Some(backend) = &mut self.vsock_backend {
            let _ = backend.kill();
            let _ = backend.wait();
        }
    }
}

/// Write an initrd to a file in `dir` and return its path.
pub fn write_initrd(dir: &Path, name: &str, initrd: &parma_image::initrd::Initrd) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, initrd.to_gz()?)?;
    Ok(path)
}

/// The agent's error for a call that must fail: its code and message.
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, parma::client::ClientError>,
) -> anyhow::Result<(parma_protocol::ErrorCode, String)> {
    match result {
        Err(parma::client::ClientError::Agent(err)) => Ok((err.code, err.message)),
        other => bail!("expected the agent to refuse, got {other:?}"),
    }
}

/// A call the policy must deny, saying `reason`.
pub fn denied<T: std::fmt::Debug>(result: Result<T, parma::client::ClientError>, reason: &str) -> anyhow::Result<()> {
    let (code, message) = refused(result)?;
    anyhow::ensure!(code == parma_protocol::ErrorCode::PolicyDenied, "expected a policy denial, got {code}: {message}");
    anyhow::ensure!(message.contains(reason), "the denial does not say {reason:?}: {message}");
    Ok(())
}

/// The median of some durations, in seconds.
pub fn median_secs(samples: &[Duration]) -> f64 {
    let mut secs: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    match secs.len() {
        0 => 0.0,
        n if n % 2 == 1 => secs.get(n / 2).copied().unwrap_or(0.0),
        n => (secs.get(n / 2 - 1).copied().unwrap_or(0.0) + secs.get(n / 2).copied().unwrap_or(0.0)) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median() {
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(median_secs(&[d(3000), d(1000), d(2000)]), 2.0);
        assert_eq!(median_secs(&[d(4000), d(1000), d(2000), d(3000)]), 2.5);
        assert_eq!(median_secs(&[]), 0.0);
    }
}
