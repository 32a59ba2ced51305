//! One UVM's life: start QEMU in its own process group, wait for the agent
//! while watching QEMU, scan the serial console for faults, stop it.
//!
//! `parma run`, the test harness and the containerd shim all hold a [`Vm`];
//! none of them spawns QEMU by itself.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parma_protocol::PingInfo;

use crate::client::{Client, Control};
use crate::qemu::{Serial, VmConfig, VmError};

/// Lines on the serial console that mean the guest failed: a kernel fault,
/// a Rust panic in init or the agent, PID 1 exiting.
pub const FATAL_PATTERNS: &[&str] = &[
    "Kernel panic",
    "Attempted to kill init",
    "panicked at",
    "BUG:",
    "Oops:",
    "general protection fault",
    "internal error:",
];

/// The vhost-user vsock backend `scripts/deps.sh` installs (rust-vmm's).
pub const VSOCK_BACKEND: &str = "vhost-device-vsock";

/// How long a ping may take before the next try.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// What a [`Vm`] needs besides its [`VmConfig`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Give the guest vsock through [`VSOCK_BACKEND`] (for hosts without
    /// `/dev/vhost-vsock`), reached with [`Vm::vsock_control`]. Not with SNP.
    pub vhost_device_vsock: bool,
}

/// Why a [`Vm`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// QEMU exited by itself: the guest powered off (or QEMU failed).
    Exited(ExitStatus),
    /// It did not exit within the grace period and was killed.
    Killed,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Exited(status) => write!(f, "QEMU exited ({status})"),
            StopReason::Killed => f.write_str("QEMU was killed"),
        }
    }
}

/// A running UVM. Dropping it kills QEMU's whole process group.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    dir: tempfile::TempDir,
    control: PathBuf,
    serial_log: PathBuf,
    qemu: PathBuf,
    started: Instant,
    exited: Option<ExitStatus>,
    vsock_backend: Option<Child>,
}

impl Vm {
    /// Start QEMU with `config` in a process group of its own. The control
    /// socket is put in a private directory (overriding `config.control`);
    /// the serial console goes to `config.serial`'s file, or to a log in
    /// that directory when it says stdio, so it can be scanned.
    pub fn start(mut config: VmConfig, options: &StartOptions) -> Result<Self, VmError> {
        let dir = tempfile::Builder::new().prefix("parma-vm-").tempdir().map_err(VmError::Io)?;
        let control = dir.path().join("control.sock");
        config.control = control.clone();
        let qmp = dir.path().join("qmp.sock");
        config.qmp = Some(qmp.clone());
        let serial_log = match &config.serial {
            Serial::File(path) => path.clone(),
            Serial::Stdio => dir.path().join("serial.log"),
        };
        config.serial = Serial::File(serial_log.clone());
        let vsock_backend = if options.vhost_device_vsock {
            config.vhost_user_vsock = Some(dir.path().join("vhost-vsock.sock"));
            Some(start_vsock_backend(dir.path())?)
        } else {
            None
        };
        let mut command = config.command()?;
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // The tap's fd stays open here until the spawn returned (`config`).
        if let Some(tap) = config.nic.as_ref().and_then(|nic| nic.tap.as_ref()) {
            parma_sys::tap::inherit_in_child(&mut command, &tap.0);
        }
        let child =
            command.spawn().map_err(|source| VmError::Spawn { program: config.qemu.display().to_string(), source })?;
        Ok(Self {
            child,
            dir,
            control,
            serial_log,
            qemu: config.qemu,
            started: Instant::now(),
            exited: None,
            vsock_backend,
        })
    }

    /// A QMP connection to this QEMU (disks added while it runs).
    pub fn qmp(&self) -> Result<crate::qmp::Qmp, crate::qmp::QmpError> {
        crate::qmp::Qmp::connect(&self.dir.path().join("qmp.sock"))
    }

    /// The agent's control socket (virtio-serial).
    pub fn control(&self) -> Control {
        Control::Unix(self.control.clone())
    }

    /// The agent over vsock, through the backend's unix socket (started with
    /// [`StartOptions::vhost_device_vsock`]).
    pub fn vsock_control(&self) -> Option<Control> {
        self.vsock_backend
            .as_ref()
            .map(|_| Control::VsockUds { path: self.dir.path().join("vsock.sock"), port: parma_protocol::VSOCK_PORT })
    }

    /// Where the guest's connections to the host's vsock `port` arrive (the
    /// backend's `--uds-path` with `_PORT`): listen there to take them.
    pub fn vsock_host_port(&self, port: u32) -> Option<PathBuf> {
        self.vsock_backend.as_ref().map(|_| self.dir.path().join(format!("vsock.sock_{port}")))
    }

    /// A private directory that lives as long as the VM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// QEMU's process id (the process group's id too).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the guest printed on its serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The first fatal line pattern on the serial console, if any.
    pub fn fault(&self) -> Option<&'static str> {
        let serial = self.serial();
        FATAL_PATTERNS.iter().find(|pattern| serial.contains(*pattern)).copied()
    }

    /// Fail if the serial console shows a fault.
    pub fn check_serial(&self) -> Result<(), VmError> {
        match self.fault() {
            Some(pattern) => Err(VmError::GuestFault { pattern, serial: self.serial() }),
            None => Ok(()),
        }
    }

    /// Whether QEMU has exited, and how.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>, VmError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(VmError::Io)?;
        }
        Ok(self.exited)
    }

    fn fail_if_exited(&mut self, doing: &'static str) -> Result<(), VmError> {
        if let Some(status) = self.try_exit()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            return Err(VmError::Exited {
                status,
                doing,
                qemu: self.qemu.display().to_string(),
                stderr: stderr.trim().to_string(),
                serial: self.serial(),
            });
        }
        Ok(())
    }

    /// Ping the agent until it answers, at most `deadline` after QEMU started.
    pub fn wait_ready(&mut self, deadline: Duration) -> Result<PingInfo, VmError> {
        self.ping_until(self.started + deadline)
    }

    /// Ping the agent, each try on a new connection, until it answers or
    /// `give_up` passes; QEMU exiting or a fault on the console ends the
    /// wait at once.
    ///
    /// A virtio-serial port has no connection boundaries: when a client
    /// leaves half a frame and the next one connects before the agent saw
    /// the port close, the first ping can be swallowed while the agent
    /// resynchronises. The next try is answered.
    pub fn ping_until(&mut self, give_up: Instant) -> Result<PingInfo, VmError> {
        self.connect_until(give_up, PING_TIMEOUT).map(|(_, info)| info)
    }

    /// A connection on which the agent answered a ping, waiting at most
    /// `deadline` after QEMU started; each call on it then waits up to
    /// `timeout`. (A request sent right after a reconnect can be swallowed
    /// while the agent resynchronises: this pings until one is answered on
    /// the connection it returns.)
    pub fn ready_client(&mut self, deadline: Duration, timeout: Duration) -> Result<Client, VmError> {
        self.connect_until(self.started + deadline, timeout).map(|(client, _)| client)
    }

    fn connect_until(&mut self, give_up: Instant, timeout: Duration) -> Result<(Client, PingInfo), VmError> {
        let waited = give_up.saturating_duration_since(self.started);
        let mut last_error = String::from("no attempt");
        while Instant::now() < give_up {
            self.fail_if_exited("waiting for the agent")?;
            self.check_serial()?;
            if !self.control.exists() {
                // QEMU creates the socket while it starts; look again very soon.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // One attempt of about PING_TIMEOUT, then QEMU and the console are looked at again.
            match Client::connect_in_step(&self.control(), PING_TIMEOUT) {
                Ok((mut client, info)) => {
                    self.check_serial()?;
                    client.set_timeout(timeout);
                    return Ok((client, info));
                }
                Err(err) => last_error = err.to_string(),
            }
        }
        Err(VmError::NotReady { waited, last_error, serial: self.serial() })
    }

    /// A new connection to the agent, in step with it (a ping answered on
    /// it: [`Client::connect_in_step`]).
    pub fn client(&self, timeout: Duration) -> Result<Client, crate::ClientError> {
        Client::connect_in_step(&self.control(), timeout).map(|(client, _)| client)
    }

    /// Wait for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        let give_up = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= give_up {
                return Err(VmError::StillRunning { waited: timeout, serial: self.serial() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait up to `grace` for QEMU to exit (after the agent was told to
    /// shut down), then kill its process group; say which happened.
    pub fn stop(&mut self, grace: Duration) -> StopReason {
        match self.wait_exit(grace) {
            Ok(status) => StopReason::Exited(status),
            Err(_) => {
                self.kill();
                StopReason::Killed
            }
        }
    }

    /// Kill QEMU's process group now.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if let Some(backend) = &mut self.vsock_backend {
            let _ = backend.kill();
            let _ = backend.wait();
        }
    }
}

/// Start the vsock backend in `dir`; returns it once its vhost-user socket
/// is there for QEMU.
fn start_vsock_backend(dir: &Path) -> Result<Child, VmError> {
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
    let mut command = std::process::Command::new(&program);
    command
        .args(["--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(dir.join("vsock.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|source| VmError::Spawn {
        program: format!("{} (scripts/deps.sh installs it)", program.display()),
        source,
    })?;
    let give_up = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        let exited = child.try_wait().map_err(VmError::Io)?;
        if exited.is_some() || Instant::now() >= give_up {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmError::VsockBackend(match exited {
                Some(status) => format!("{VSOCK_BACKEND} exited at start: {status}"),
                None => format!("{VSOCK_BACKEND} made no socket within 10 s"),
            }));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "QEMU" that exits at once: the wait for the agent ends with QEMU's
    /// status and stderr, not after the deadline.
    #[test]
    fn qemu_exiting_ends_the_wait() {
        let uvm = tempfile::tempdir().unwrap();
        for name in [parma_image::files::KERNEL, parma_image::files::INITRD, parma_image::files::CMDLINE] {
            std::fs::write(uvm.path().join(name), "x").unwrap();
        }
        let fake = uvm.path().join("qemu");
        std::fs::write(&fake, "#!/bin/sh\necho 'no KVM here' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut config = VmConfig::new(uvm.path(), "/unused");
        config.qemu = fake;
        let mut vm = Vm::start(config, &StartOptions::default()).unwrap();
        let started = Instant::now();
        let err = vm.wait_ready(Duration::from_secs(60)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(30), "waited {:?}", started.elapsed());
        match err {
            VmError::Exited { status, stderr, .. } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "no KVM here");
            }
            other => panic!("expected Exited, got {other}"),
        }
        assert_eq!(vm.stop(Duration::from_secs(1)), StopReason::Exited(vm.try_exit().unwrap().unwrap()));
    }

    /// A fault on the console ends the wait, naming the pattern.
    #[test]
    fn a_fault_on_the_console_ends_the_wait() {
        let uvm = tempfile::tempdir().unwrap();
        for name in [parma_image::files::KERNEL, parma_image::files::INITRD, parma_image::files::CMDLINE] {
            std::fs::write(uvm.path().join(name), "x").unwrap();
        }
        let serial = uvm.path().join("serial.log");
        let fake = uvm.path().join("qemu");
        // Writes the panic where QEMU would put the console, then hangs.
        let script = format!("#!/bin/sh\necho 'Kernel panic - not syncing' > {}\nexec sleep 600\n", serial.display());
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut config = VmConfig::new(uvm.path(), "/unused");
        config.qemu = fake;
        config.serial = Serial::File(serial);
        let mut vm = Vm::start(config, &StartOptions::default()).unwrap();
        let err = vm.wait_ready(Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, VmError::GuestFault { pattern: "Kernel panic", .. }), "{err}");
        assert_eq!(vm.stop(Duration::from_millis(100)), StopReason::Killed);
        assert!(vm.try_exit().unwrap().is_some());
    }
}
