//! The VM test harness.
//!
//! It boots the image `make image` built through the host library's [`Vm`]
//! (the lifecycle `parma run` and the shim use): the same QEMU arguments,
//! the wait for the agent that stops when QEMU exits, the kill of QEMU's
//! process group on drop, and a failure on any kernel panic, Rust panic or
//! "Attempted to kill init" on the serial console.
//!
//! A missing image is a failure, never a skip: `make test` builds it first.

pub mod broker;
pub mod containerd;
pub mod netns;
pub mod oci;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parma_host::{Client, StartOptions, Vm, VmConfig};
use parma_protocol::PingInfo;

pub use parma_host::vm::FATAL_PATTERNS;

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
    pub disks: Vec<parma_host::Disk>,
    /// Give the guest vsock through rust-vmm's `vhost-device-vsock` (a
    /// vhost-user backend; this host has no vhost-vsock), reached with
    /// [`Vm::vsock_control`].
    pub vsock: bool,
    /// A virtio-net NIC on QEMU user-mode networking.
    pub nic: Option<parma_host::Nic>,
    /// Empty PCIe root ports for disks added later (`Vm::qmp`).
    pub hotplug_slots: u8,
}

impl Default for Boot {
    fn default() -> Self {
        Self {
            initrd: None,
            memory_mib: 512,
            cpus: 1,
            emulated_host_data: None,
            disks: Vec::new(),
            vsock: false,
            nic: None,
            hotplug_slots: 0,
        }
    }
}

impl Boot {
    /// A boot whose emulated reports carry the hash of this policy file as HOST_DATA.
    pub fn emulated_for_policy(policy: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(policy).with_context(|| format!("cannot read {}", policy.display()))?;
        let host_data = parma_policy::Policy::from_bytes(bytes)?.hash();
        Ok(Self { emulated_host_data: Some(host_data), ..Self::default() })
    }
}

/// A running UVM: a [`Vm`] of the host library (every method of which it
/// has), booted from [`Boot`], holding a boot slot until the agent first
/// answers. Dropping it kills QEMU's process group.
#[derive(Debug)]
pub struct Guest {
    vm: Vm,
    slot: Option<BootSlot>,
}

impl Guest {
    /// Boot the image with these options, once a boot slot is free.
    pub fn boot(paths: &Paths, boot: &Boot) -> anyhow::Result<Self> {
        let slot = BootSlot::acquire()?;
        let mut config = VmConfig::new(&paths.uvm, "unused");
        config.initrd = boot.initrd.clone();
        config.memory_mib = boot.memory_mib;
        config.cpus = boot.cpus;
        config.insecure_emulated_host_data = boot.emulated_host_data;
        // Emulated reports state the UVM's IGVM launch digest, as `parma run`'s do.
        config.insecure_emulated_measurement =
            boot.emulated_host_data.and_then(|_| parma_host::run::igvm_digest(&paths.uvm));
        config.disks = boot.disks.clone();
        config.nic = boot.nic.clone();
        config.hotplug_slots = boot.hotplug_slots;
        let vm = Vm::start(config, &StartOptions { vhost_device_vsock: boot.vsock })?;
        Ok(Self { vm, slot: Some(slot) })
    }

    /// Ping the agent until it answers, at most `deadline` after QEMU started.
    pub fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<PingInfo> {
        let info = self.vm.wait_ready(deadline)?;
        self.slot = None;
        Ok(info)
    }

    /// Ping the agent, each try on a new connection, until it answers or `give_up` passes.
    pub fn ping_until(&mut self, give_up: Instant) -> anyhow::Result<PingInfo> {
        let info = self.vm.ping_until(give_up)?;
        self.slot = None;
        Ok(info)
    }

    /// A connection on which the agent answered a ping, waiting at most
    /// `deadline` after QEMU started; each call on it then waits up to `timeout`.
    pub fn ready_client(&mut self, deadline: Duration, timeout: Duration) -> anyhow::Result<Client> {
        let client = self.vm.ready_client(deadline, timeout)?;
        self.slot = None;
        Ok(client)
    }
}

/// The [`Vm`] calls tests make, with errors as `anyhow`'s.
impl Guest {
    /// Fail if the serial console shows a fault.
    pub fn check_serial(&self) -> anyhow::Result<()> {
        Ok(self.vm.check_serial()?)
    }

    /// The end of a test's UVM: the agent still answers, the console shows
    /// no fault, and the UVM powers off when asked (within 60 s).
    pub fn finish(&mut self, client: &mut Client) -> anyhow::Result<()> {
        client.ping()?;
        self.check_serial()?;
        client.shutdown()?;
        self.wait_exit(Duration::from_secs(60))?;
        Ok(())
    }

    /// Wait for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(self.vm.wait_exit(timeout)?)
    }

    /// Whether QEMU has exited, and how.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.vm.try_exit()?)
    }

    /// A new connection to the agent.
    pub fn client(&self, timeout: Duration) -> anyhow::Result<Client> {
        Ok(self.vm.client(timeout)?)
    }
}

impl std::ops::Deref for Guest {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        &self.vm
    }
}

impl std::ops::DerefMut for Guest {
    fn deref_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }
}

/// One of a few slots for booting guests, held from QEMU's start to the
/// agent's first answer: on a loaded runner, guests booting all at once
/// would turn boot deadlines into flakes. The slots are lock files, so
/// test binaries running side by side share them. `PARMA_BOOT_SLOTS` sets
/// how many (default: the CPUs).
#[derive(Debug)]
pub struct BootSlot {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl BootSlot {
    /// Wait for a free slot (for a UVM booted outside [`Guest`], as the
    /// shim's); held until dropped.
    pub fn acquire() -> anyhow::Result<Self> {
        let slots = std::env::var("PARMA_BOOT_SLOTS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1);
        let dir = std::env::temp_dir().join("parma-boot-slots");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let give_up = Instant::now() + Duration::from_secs(600);
        loop {
            for index in 0..slots {
                let path = dir.join(format!("slot-{index}"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                if let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                    return Ok(Self { _lock: lock });
                }
            }
            if Instant::now() >= give_up {
                bail!("no boot slot of {slots} came free within 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
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
    result: Result<T, parma_host::ClientError>,
) -> anyhow::Result<(parma_protocol::ErrorCode, String)> {
    match result {
        Err(parma_host::ClientError::Agent(err)) => Ok((err.code, err.message)),
        other => bail!("expected the agent to refuse, got {other:?}"),
    }
}

/// A call the policy must deny, saying `reason`.
pub fn denied<T: std::fmt::Debug>(result: Result<T, parma_host::ClientError>, reason: &str) -> anyhow::Result<()> {
    let (code, message) = refused(result)?;
    anyhow::ensure!(code == parma_protocol::ErrorCode::PolicyDenied, "expected a policy denial, got {code}: {message}");
    anyhow::ensure!(message.contains(reason), "the denial does not say {reason:?}: {message}");
    Ok(())
}

/// The median of some durations, in seconds.
/// The namespaces CRI lists for a pod's container: the pod's network, IPC
/// and UTS by the host's paths (meaningless in the guest: they name the
/// pod's), a new mount namespace, and a new PID namespace or, with
/// `share_pid`, the pod's.
pub fn cri_namespaces(share_pid: bool) -> Vec<parma_protocol::Namespace> {
    let ns =
        |kind: &str, path: Option<&str>| parma_protocol::Namespace { kind: kind.into(), path: path.map(Into::into) };
    vec![
        ns("pid", share_pid.then_some("/proc/4242/ns/pid")),
        ns("ipc", Some("/proc/4242/ns/ipc")),
        ns("uts", Some("/proc/4242/ns/uts")),
        ns("mount", None),
        ns("network", Some("/var/run/netns/cni-0f3c")),
    ]
}

/// `CreateContainer` of `process` as `id` in `namespaces`, and nothing
/// else: no host name, mounts, limits or path masks of its own.
pub fn create_request(
    id: &str,
    process: &parma_protocol::ProcessSpec,
    namespaces: Vec<parma_protocol::Namespace>,
) -> parma_protocol::Request {
    parma_protocol::Request::CreateContainer {
        container_id: id.into(),
        process: process.clone(),
        hostname: None,
        readonly_rootfs: false,
        resources: None,
        mounts: Vec::new(),
        masked_paths: None,
        readonly_paths: None,
        namespaces,
    }
}

pub fn median_secs(samples: &[Duration]) -> f64 {
    let mut secs: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    match secs.len() {
        0 => 0.0,
        n if n % 2 == 1 => secs.get(n / 2).copied().unwrap_or(0.0),
        n => (secs.get(n / 2 - 1).copied().unwrap_or(0.0) + secs.get(n / 2).copied().unwrap_or(0.0)) / 2.0,
    }
}

/// Make `process` what containerd's CRI makes of it: CRI's default
/// capabilities, the primary group among the supplementary ones.
pub fn as_cri_makes_it(process: &mut parma_protocol::ProcessSpec) {
    process.capabilities = parma_host::kube::cri_default_capabilities();
    process.groups = vec![process.gid];
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
