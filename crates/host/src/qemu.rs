//! The QEMU command line that boots the UVM.
//!
//! These are the same arguments `qemu/run-tcg.sh` types by hand and
//! `qemu/README.md` explains; the test harness boots through this code too.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use parma_image::files;
use parma_protocol::SERIAL_PORT_NAME;

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works anywhere, no SEV-SNP; the default for development and CI.
    Tcg,
    /// Hardware virtualisation: real hosts with /dev/kvm.
    Kvm,
}

impl std::str::FromStr for Accel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(format!("accelerator {other:?} is not tcg or kvm")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// QEMU's stdout.
    Stdio,
    /// A log file.
    File(PathBuf),
}

/// Everything needed to boot one UVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The UVM directory (`vmlinuz`, `initrd.img`, `cmdline`).
    pub uvm: PathBuf,
    /// Boot this initrd instead of the UVM's (test variants).
    pub initrd: Option<PathBuf>,
    /// Accelerator.
    pub accel: Accel,
    /// Unix socket QEMU listens on for the agent's virtio-serial port.
    pub control: PathBuf,
    /// Guest memory.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// The serial console.
    pub serial: Serial,
    /// Also give the guest a vsock device with this CID (needs vhost-vsock on the host).
    pub vsock_cid: Option<u32>,
    /// Or a vsock device served by a vhost-user backend at this socket (such
    /// as rust-vmm's `vhost-device-vsock`; the guest's RAM is then a shared
    /// memfd). Emulation and hosts without vhost-vsock; not with SNP.
    pub vhost_user_vsock: Option<PathBuf>,
    /// Launch as an SEV-SNP guest (real hosts only).
    pub snp: Option<Snp>,
    /// INSECURE, emulation only: turn on the guest's emulated attestation
    /// reports (a kernel command-line flag) with this HOST_DATA (another).
    pub insecure_emulated_host_data: Option<[u8; 32]>,
    /// INSECURE, emulation only: the MEASUREMENT the guest's emulated
    /// reports state (the UVM's IGVM launch digest, from its manifest).
    pub insecure_emulated_measurement: Option<[u8; 48]>,
    /// Read-only virtio-blk disks (container layers), in order.
    pub disks: Vec<Disk>,
    /// A virtio-net NIC, for the pod's network.
    pub nic: Option<Nic>,
    /// PCIe root ports left empty for disks added while the UVM runs
    /// ([`crate::qmp::Qmp::attach_disk`]: the layers of containers created
    /// after boot, as a pod's are).
    pub hotplug_slots: u8,
    /// The QMP socket QEMU listens on (set by [`crate::Vm::start`]).
    pub qmp: Option<PathBuf>,
}

/// The UVM's NIC: a MAC address and what carries its frames on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Its MAC address (the guest finds it by this).
    pub mac: [u8; 6],
    /// QEMU user-mode networking (the developer path): the guest is
    /// [`USER_NET_GUEST`] behind [`USER_NET_GATEWAY`], and these host ports
    /// on 127.0.0.1 forward to its ports.
    pub forwards: Vec<PortForward>,
    /// Or a tap (`--netns`, [`crate::netns`]): QEMU gets its fd, and the
    /// frames go to the namespace's veth (no forwards then).
    pub tap: Option<crate::netns::TapFd>,
}

/// The id of hot-plug root port `slot`.
pub fn hotplug_port(slot: u8) -> String {
    format!("hotplug{slot}")
}

/// The MAC address the CLI gives the UVM's NIC (QEMU's usual, locally administered range).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The guest's address under QEMU user-mode networking.
pub const USER_NET_GUEST: &str = "10.0.2.15/24";
/// The gateway (the host) under QEMU user-mode networking.
pub const USER_NET_GATEWAY: &str = "10.0.2.2";

/// A port forwarded from the host's loopback to the guest (`-p HOST:GUEST[/tcp|udp]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// UDP rather than TCP.
    pub udp: bool,
    /// The port on 127.0.0.1.
    pub host: u16,
    /// The guest's port.
    pub guest: u16,
}

impl std::str::FromStr for PortForward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ports, udp) = match s.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, false),
            Some((ports, "udp")) => (ports, true),
            Some((_, other)) => return Err(format!("{other:?} is not tcp or udp")),
            None => (s, false),
        };
        let (host, guest) = ports.split_once(':').ok_or_else(|| format!("{s:?} is not HOST:GUEST[/tcp|udp]"))?;
        let port = |text: &str| match text.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{text:?} is not a port (1 to 65535)")),
            Ok(port) => Ok(port),
        };
        Ok(Self { udp, host: port(host)?, guest: port(guest)? })
    }
}

impl std::fmt::Display for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.guest, if self.udp { "udp" } else { "tcp" })
    }
}

impl Nic {
    /// A NIC on QEMU user-mode networking with the CLI's MAC.
    pub fn user(forwards: Vec<PortForward>) -> Self {
        Self { mac: DEFAULT_MAC, forwards, tap: None }
    }

    /// The MAC address as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        Self::format_mac(&self.mac)
    }

    /// `mac` as `aa:bb:cc:dd:ee:ff`.
    pub fn format_mac(mac: &[u8; 6]) -> String {
        mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// `aa:bb:cc:dd:ee:ff` as bytes.
    pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
        let bytes: Vec<u8> = text.split(':').map(|part| u8::from_str_radix(part, 16).ok()).collect::<Option<_>>()?;
        bytes.try_into().ok()
    }
}

/// A read-only disk the guest finds by its virtio-blk serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// The serial the guest sees (at most 20 of `[A-Za-z0-9-]`).
    pub serial: String,
    /// Writable (the scratch disk); layers are read-only.
    pub writable: bool,
}

pub use parma_protocol::boot::{EMULATION_FLAG, EMULATION_HOST_DATA, EMULATION_MEASUREMENT};

/// What an SEV-SNP launch needs besides the UVM.
#[derive(Debug, Clone)]
pub struct Snp {
    /// How the guest's initial memory is made.
    pub boot: SnpBoot,
    /// HOST_DATA: for Parma, the sha256 of the execution policy.
    pub host_data: [u8; 32],
    /// vCPU type (`-cpu`); the launch digest depends on it.
    pub vcpu_type: String,
}

/// The two ways to launch the UVM on SEV-SNP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnpBoot {
    /// QEMU 9.1+: OVMF measured by the firmware, which checks the kernel,
    /// initrd and command line against the hashes QEMU puts in its
    /// kernel-hashes table (`kernel-hashes=on`). The path is an AmdSevX64
    /// OVMF build, the one with that table; its digest is part of the launch digest.
    KernelHashes {
        /// The firmware.
        ovmf: PathBuf,
    },
    /// QEMU 10.1+: the UVM's IGVM file (`out/uvm/uvm.igvm`), every page of
    /// which is measured, with no firmware at all. The guest memory is the
    /// file's (`parma measure --igvm` prints it).
    Igvm(PathBuf),
}

/// An SNP launch's boot and its guest memory: an IGVM file fixes the
/// memory (its own layout), a kernel-hashes launch takes `memory_mib`.
pub fn snp_boot(boot: SnpBoot, memory_mib: u32) -> Result<(SnpBoot, u32), VmError> {
    match boot {
        SnpBoot::Igvm(file) => {
            let bad = |reason: String| VmError::Igvm { path: file.clone(), reason };
            let bytes = std::fs::read(&file).map_err(|err| bad(err.to_string()))?;
            let measured =
                parma_igvm::measure(&bytes, 1, None).map_err(|err| bad(format!("not a UVM IGVM file: {err}")))?;
            let memory = u32::try_from(measured.memory_mib).map_err(|_| bad("its memory is too large".into()))?;
            Ok((SnpBoot::Igvm(file), memory))
        }
        boot @ SnpBoot::KernelHashes { .. } => Ok((boot, memory_mib)),
    }
}

/// The VM cannot be started as asked.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The UVM directory lacks a file.
    #[error("cannot read {path} (run `make image` first?)")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A NIC on a tap cannot also forward user-mode ports.
    #[error("a NIC on a network namespace's tap (--netns) forwards no ports (-p): the namespace's network reaches it")]
    NicConflict,
    /// SEV-SNP needs KVM on an SNP host; emulation has no SNP.
    #[error("an SEV-SNP launch needs --accel kvm on an SNP host (TCG has no SEV-SNP)")]
    SnpNeedsKvm,
    /// A disk serial QEMU or the guest would not take.
    #[error("disk serial {0:?} is not 1 to 20 of [A-Za-z0-9-]")]
    BadSerial(String),
    /// A vhost-user vsock backend needs the guest's RAM shared with it: not
    /// an SNP guest's, and one vsock device only.
    #[error("a vhost-user vsock device is for non-SNP guests, and replaces --vsock-cid")]
    VhostUserVsock,
    /// The IGVM file of an SNP launch is unusable.
    #[error("{}: {reason}", path.display())]
    Igvm {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A program (QEMU, the vsock backend) could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vsock backend did not come up.
    #[error("{0}")]
    VsockBackend(String),
    /// QEMU exited while it should have run.
    #[error("{qemu} exited ({status}) while {doing}\nqemu: {stderr}\nserial console:\n{serial}")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
        /// What the VM was waiting for.
        doing: &'static str,
        /// The QEMU binary.
        qemu: String,
        /// What QEMU printed on stderr.
        stderr: String,
        /// The guest's serial console.
        serial: String,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {waited:?} ({last_error})\nserial console:\n{serial}")]
    NotReady {
        /// How long after QEMU started.
        waited: std::time::Duration,
        /// The last connection or ping error.
        last_error: String,
        /// The guest's serial console.
        serial: String,
    },
    /// The serial console shows a kernel fault or a panic.
    #[error("the serial console shows {pattern:?}:\n{serial}")]
    GuestFault {
        /// The fatal pattern found.
        pattern: &'static str,
        /// The guest's serial console.
        serial: String,
    },
    /// QEMU did not exit when it should have.
    #[error("QEMU still runs {waited:?} later\nserial console:\n{serial}")]
    StillRunning {
        /// How long it was given.
        waited: std::time::Duration,
        /// The guest's serial console.
        serial: String,
    },
    /// The host failed (a temporary directory, waiting on a child).
    #[error(transparent)]
    Io(std::io::Error),
}

impl VmConfig {
    /// Defaults for a UVM directory and a control socket: TCG, 512 MiB, one vCPU, console on stdout.
    pub fn new(uvm: impl Into<PathBuf>, control: impl Into<PathBuf>) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            uvm: uvm.into(),
            initrd: None,
            accel: Accel::Tcg,
            control: control.into(),
            memory_mib: 512,
            cpus: 1,
            serial: Serial::Stdio,
            vsock_cid: None,
            vhost_user_vsock: None,
            snp: None,
            insecure_emulated_host_data: None,
            insecure_emulated_measurement: None,
            disks: Vec::new(),
            nic: None,
            hotplug_slots: 0,
            qmp: None,
        }
    }

    /// The kernel command line from the UVM directory.
    pub fn cmdline(&self) -> Result<String, VmError> {
        let path = self.uvm.join(files::CMDLINE);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|source| VmError::MissingFile { path, source })
    }

    fn existing(&self, name: &str) -> Result<PathBuf, VmError> {
        let path = self.uvm.join(name);
        std::fs::metadata(&path).map(|_| path.clone()).map_err(|source| VmError::MissingFile { path, source })
    }

    /// QEMU's arguments, without the program name.
    pub fn args(&self) -> Result<Vec<OsString>, VmError> {
        let kernel = self.existing(files::KERNEL)?;
        let initrd = match &self.initrd {
            Some(path) => path.clone(),
            None => self.existing(files::INITRD)?,
        };
        let mut cmdline = self.cmdline()?;
        if let Some(host_data) = self.insecure_emulated_host_data {
            // Part of the measured command line: an emulated launch can never
            // have the digest of a real one.
            cmdline = format!("{cmdline} {EMULATION_FLAG} {EMULATION_HOST_DATA}{}", hex::encode(host_data));
            if let Some(measurement) = self.insecure_emulated_measurement {
                cmdline = format!("{cmdline} {EMULATION_MEASUREMENT}{}", hex::encode(measurement));
            }
        }
        if self.vhost_user_vsock.is_some() && (self.snp.is_some() || self.vsock_cid.is_some()) {
            return Err(VmError::VhostUserVsock);
        }
        // A vhost-user backend reads the guest's memory: it must be shared.
        let shared_ram = if self.vhost_user_vsock.is_some() { ",memory-backend=ram0" } else { "" };
        let (machine, cpu) = match (self.accel, &self.snp) {
            (Accel::Tcg, None) => (format!("q35,accel=tcg{shared_ram}"), "max".to_string()),
            (Accel::Kvm, None) => (format!("q35,accel=kvm{shared_ram}"), "host".to_string()),
            (Accel::Tcg, Some(_)) => return Err(VmError::SnpNeedsKvm),
            (Accel::Kvm, Some(snp)) => {
                let igvm = if matches!(snp.boot, SnpBoot::Igvm(_)) { ",igvm-cfg=igvm0" } else { "" };
                let machine = format!("q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0{igvm}");
                (machine, snp.vcpu_type.clone())
            }
        };
        // Virtio devices of an SEV guest go through the platform IOMMU path
        // (bounce buffers in shared memory): the guest cannot share its
        // encrypted pages with a device directly.
        let virtio_opts = if self.snp.is_some() { ",disable-legacy=on,iommu_platform=on" } else { "" };
        let serial = match &self.serial {
            Serial::Stdio => OsString::from("stdio"),
            Serial::File(path) => join("file:", path),
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&["-machine", &machine, "-cpu", &cpu]);
        push(&["-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // The IGVM file holds the kernel, initrd and command line itself.
        if !matches!(self.snp, Some(Snp { boot: SnpBoot::Igvm(_), .. })) {
            args.extend([OsString::from("-kernel"), kernel.into_os_string()]);
            args.extend([OsString::from("-initrd"), initrd.into_os_string()]);
            args.extend([OsString::from("-append"), OsString::from(cmdline)]);
        }
        if let Some(snp) = &self.snp {
            use base64::Engine as _;
            let host_data = base64::engine::general_purpose::STANDARD.encode(snp.host_data);
            args.push("-object".into());
            args.push(format!("memory-backend-memfd,id=ram0,size={}M,share=true", self.memory_mib).into());
            let common = "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1";
            match &snp.boot {
                SnpBoot::KernelHashes { ovmf } => {
                    let object = format!("{common},kernel-hashes=on,host-data={host_data}");
                    args.extend(["-object".into(), object.into()]);
                    args.extend([OsString::from("-bios"), ovmf.clone().into_os_string()]);
                }
                SnpBoot::Igvm(file) => {
                    args.extend(["-object".into(), format!("{common},host-data={host_data}").into()]);
                    let file = file.to_string_lossy().replace(',', ",,");
                    args.extend(["-object".into(), format!("igvm-cfg,id=igvm0,file={file}").into()]);
                }
            }
        }
        if self.vhost_user_vsock.is_some() {
            args.push("-object".into());
            args.push(format!("memory-backend-memfd,id=ram0,size={}M,share=on", self.memory_mib).into());
        }
        args.extend([OsString::from("-serial"), serial]);
        args.push("-device".into());
        args.push(format!("virtio-serial-pci,id=virtio-serial0{virtio_opts}").into());
        args.push("-chardev".into());
        // QEMU splits options at commas; a comma in the path is written twice.
        let control = self.control.to_string_lossy().replace(',', ",,");
        args.push(format!("socket,id=agent,server=on,wait=off,path={control}").into());
        args.push("-device".into());
        args.push(format!("virtserialport,bus=virtio-serial0.0,chardev=agent,name={SERIAL_PORT_NAME}").into());
        for (index, disk) in self.disks.iter().enumerate() {
            if !parma_protocol::boot::valid_disk_serial(&disk.serial) {
                return Err(VmError::BadSerial(disk.serial.clone()));
            }
            let path = disk.path.to_string_lossy().replace(',', ",,");
            args.push("-drive".into());
            let readonly = if disk.writable { "off" } else { "on" };
            args.push(format!("file={path},if=none,id=disk{index},format=raw,readonly={readonly}").into());
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=disk{index},serial={}{virtio_opts}", disk.serial).into());
        }
        if let Some(nic) = &self.nic {
            // Host ports on loopback only. `restrict=on`: the guest reaches
            // nothing, neither the host (10.0.2.2 would be the host's
            // loopback, with whatever listens there) nor beyond; only the
            // forwarded connections come and go.
            let netdev = match &nic.tap {
                Some(tap) if nic.forwards.is_empty() => {
                    // QEMU inherits the fd (see `Vm::start`).
                    format!("tap,id=net0,fd={},vhost=off", std::os::fd::AsRawFd::as_raw_fd(&*tap.0))
                }
                Some(_) => return Err(VmError::NicConflict),
                None => {
                    let mut netdev = String::from("user,id=net0,net=10.0.2.0/24,restrict=on");
                    for forward in &nic.forwards {
                        let proto = if forward.udp { "udp" } else { "tcp" };
                        netdev.push_str(&format!(",hostfwd={proto}:127.0.0.1:{}-:{}", forward.host, forward.guest));
                    }
                    netdev
                }
            };
            args.extend(["-netdev".into(), netdev.into()]);
            args.push("-device".into());
            args.push(format!("virtio-net-pci,netdev=net0,mac={}{virtio_opts}", nic.mac_string()).into());
        }
        if self.hotplug_slots > 0 {
            // Native PCIe hot-plug on the root ports (the guest boots with
            // acpi=off, so QEMU's ACPI hot-plug, q35's default, would go unseen).
            args.extend(["-global".into(), "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into()]);
        }
        for slot in 0..self.hotplug_slots {
            // Chassis numbers start at 1; the ports sit on the root bus.
            args.push("-device".into());
            args.push(
                format!("pcie-root-port,id={},bus=pcie.0,chassis={}", hotplug_port(slot), u32::from(slot) + 1).into(),
            );
        }
        if let Some(qmp) = &self.qmp {
            let qmp = qmp.to_string_lossy().replace(',', ",,");
            args.extend(["-qmp".into(), format!("unix:{qmp},server=on,wait=off").into()]);
        }
        if let Some(cid) = self.vsock_cid {
            args.push("-device".into());
            args.push(format!("vhost-vsock-pci,guest-cid={cid}{virtio_opts}").into());
        }
        if let Some(socket) = &self.vhost_user_vsock {
            let socket = socket.to_string_lossy().replace(',', ",,");
            args.extend(["-chardev".into(), format!("socket,id=vsock0,path={socket}").into()]);
            args.extend(["-device".into(), OsString::from("vhost-user-vsock-pci,chardev=vsock0")]);
        }
        Ok(args)
    }

    /// The full command.
    pub fn command(&self) -> Result<Command, VmError> {
        let mut command = Command::new(&self.qemu);
        command.args(self.args()?);
        Ok(command)
    }
}

fn join(prefix: &str, path: &Path) -> OsString {
    let mut out = OsString::from(prefix);
    out.push(path.as_os_str());
    out
}

/// Quote a command line for display (and for pasting into a shell).
pub fn shell_words(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:+".contains(c)) {
                arg.into_owned()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uvm_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in [files::KERNEL, files::INITRD] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(dir.path().join(files::CMDLINE), "console=ttyS0 quiet\n").unwrap();
        dir
    }

    fn strings(config: &VmConfig) -> Vec<String> {
        config.args().unwrap().iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn tcg_command_line() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/c.sock");
        config.serial = Serial::File("/tmp/serial.log".into());
        let args = strings(&config);
        let find = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(find("-machine"), "q35,accel=tcg");
        assert_eq!(find("-append"), "console=ttyS0 quiet");
        assert_eq!(find("-serial"), "file:/tmp/serial.log");
        assert_eq!(find("-chardev"), "socket,id=agent,server=on,wait=off,path=/tmp/c.sock");
        assert!(args.contains(&"-no-reboot".to_string()));
        assert!(args.contains(&"virtserialport,bus=virtio-serial0.0,chardev=agent,name=org.parma.agent".to_string()));
        assert!(!args.iter().any(|a| a.contains("vsock")));
    }

    #[test]
    fn vhost_user_vsock_shares_the_guest_ram() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/ctl.sock");
        config.vhost_user_vsock = Some("/tmp/v,h.sock".into());
        let args = strings(&config);
        let find = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone()).unwrap();
        assert_eq!(find("-machine"), "q35,accel=tcg,memory-backend=ram0");
        assert!(args.contains(&"memory-backend-memfd,id=ram0,size=512M,share=on".to_string()));
        assert!(args.contains(&"socket,id=vsock0,path=/tmp/v,,h.sock".to_string()));
        assert!(args.contains(&"vhost-user-vsock-pci,chardev=vsock0".to_string()));
        config.vsock_cid = Some(3);
        assert!(matches!(config.args(), Err(VmError::VhostUserVsock)));
    }

    #[test]
    fn kvm_and_vsock() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/c.sock");
        config.accel = Accel::Kvm;
        config.vsock_cid = Some(7);
        let args = strings(&config);
        assert!(args.contains(&"q35,accel=kvm".to_string()));
        assert!(args.contains(&"host".to_string()));
        assert!(args.contains(&"vhost-vsock-pci,guest-cid=7".to_string()));
    }

    #[test]
    fn snp_launch() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/c.sock");
        config.snp = Some(Snp {
            boot: SnpBoot::KernelHashes { ovmf: "/fw/OVMF.amdsev.fd".into() },
            host_data: [0xab; 32],
            vcpu_type: "EPYC-v4".into(),
        });
        assert!(matches!(config.args(), Err(VmError::SnpNeedsKvm)));
        config.accel = Accel::Kvm;
        config.vsock_cid = Some(3);
        config.memory_mib = 1024;
        let args = strings(&config);
        let find = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(find("-machine"), "q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0");
        assert_eq!(find("-cpu"), "EPYC-v4");
        assert_eq!(find("-bios"), "/fw/OVMF.amdsev.fd");
        let objects: Vec<_> =
            args.iter().enumerate().filter(|(_, a)| *a == "-object").map(|(i, _)| &args[i + 1]).collect();
        assert_eq!(objects[0], "memory-backend-memfd,id=ram0,size=1024M,share=true");
        // 32 bytes of 0xab in base64.
        assert_eq!(
            objects[1],
            "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s="
        );
        assert!(args.contains(&"virtio-serial-pci,id=virtio-serial0,disable-legacy=on,iommu_platform=on".to_string()));
        assert!(args.contains(&"vhost-vsock-pci,guest-cid=3,disable-legacy=on,iommu_platform=on".to_string()));
        // Direct boot: the measured kernel, initrd and cmdline.
        assert_eq!(find("-append"), "console=ttyS0 quiet");
    }

    #[test]
    fn snp_launch_from_the_igvm_file() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/c.sock");
        config.accel = Accel::Kvm;
        let boot = SnpBoot::Igvm("/uvm/a,b.igvm".into());
        config.snp = Some(Snp { boot, host_data: [0xcd; 32], vcpu_type: "EPYC-Genoa".into() });
        let args = strings(&config);
        let find = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(
            find("-machine"),
            "q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0,igvm-cfg=igvm0"
        );
        assert_eq!(find("-cpu"), "EPYC-Genoa");
        let objects: Vec<_> =
            args.iter().enumerate().filter(|(_, a)| *a == "-object").map(|(i, _)| &args[i + 1]).collect();
        assert_eq!(objects.len(), 3);
        assert_eq!(objects[0], "memory-backend-memfd,id=ram0,size=512M,share=true");
        assert_eq!(
            objects[1],
            "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,host-data=zc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc0="
        );
        assert_eq!(objects[2], "igvm-cfg,id=igvm0,file=/uvm/a,,b.igvm");
        // The file is the whole guest: no firmware, no kernel outside it.
        for flag in ["-bios", "-kernel", "-initrd", "-append"] {
            assert!(!args.iter().any(|a| a == flag), "{flag} with an IGVM launch");
        }
        assert!(args.contains(&"virtio-serial-pci,id=virtio-serial0,disable-legacy=on,iommu_platform=on".to_string()));
    }

    #[test]
    fn insecure_emulation_changes_the_cmdline_and_passes_host_data() {
        let dir = uvm_dir();
        let mut config = VmConfig::new(dir.path(), "/tmp/c.sock");
        config.insecure_emulated_host_data = Some([0x11; 32]);
        let args = strings(&config);
        let find = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(
            find("-append"),
            format!("console=ttyS0 quiet parma.insecure_emulated_snp=1 parma.insecure_host_data={}", "11".repeat(32))
        );
        assert!(!args.iter().any(|a| a == "-fw_cfg"));
    }

    #[test]
    fn missing_image_is_named() {
        let err = VmConfig::new("/nonexistent/uvm", "/tmp/c.sock").args().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/uvm/vmlinuz"), "{err}");
    }

    #[test]
    fn quoting() {
        let args = [OsString::from("-append"), OsString::from("console=ttyS0 quiet"), OsString::from("it's")];
        assert_eq!(shell_words(Path::new("qemu"), &args), r"qemu -append 'console=ttyS0 quiet' 'it'\''s'");
    }
}
