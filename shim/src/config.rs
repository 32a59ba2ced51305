//! The shim's configuration: the file named by `PARMA_SHIM_CONFIG`; for a
//! shim `parma node install` put at `/opt/parma/HANDLER/bin/`, its
//! handler's `/opt/parma/HANDLER/shim.toml`; else `/etc/parma/shim.toml`.
//!
//! ```toml
//! uvm = "/usr/share/parma/uvm"   # the UVM directory `make image` writes
//! qemu = "qemu-system-x86_64"
//! accel = "kvm"                   # "tcg" for development hosts without KVM
//! memory_mib = 512
//! cpus = 1
//! hotplug_slots = 16              # layer disks a pod may add while it runs
//! boot_deadline_s = 60
//! state_dir = "/run/parma-shim"   # the shims' sockets and records
//! refresh_s = 10                  # copy changed configMaps, secrets, tokens again
//!
//! [snp]                           # absent: INSECURE emulated attestation
//! igvm = "/usr/share/parma/uvm/uvm.igvm"   # or ovmf = "/usr/share/ovmf/AMDSEV.fd"
//! vcpu_type = "EPYC-v4"
//! ```

use std::path::{Path, PathBuf};

use parma_host::run::SnpLaunch;
use parma_host::{Accel, SnpBoot};
use serde::Deserialize;

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/parma/shim.toml";
/// The configuration `parma node install` writes beside a handler's `bin/`.
pub const INSTALLED_NAME: &str = "shim.toml";
/// The environment variable naming another one.
pub const ENV: &str = "PARMA_SHIM_CONFIG";

/// The shim's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The UVM directory (kernel, initrd, command line, manifest).
    pub uvm: PathBuf,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// `tcg` or `kvm`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The UVM's memory.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// The UVM's vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Empty PCIe ports for the layer disks of the pod's containers.
    #[serde(default = "default_slots")]
    pub hotplug_slots: u8,
    /// How long the agent may take to answer after QEMU started.
    #[serde(default = "default_deadline")]
    pub boot_deadline_s: u64,
    /// The shims' sockets and records of what they started.
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// Every this many seconds, kubelet's files that changed on the host
    /// (configMaps, secrets, tokens) are copied in again; 0: never.
    #[serde(default = "default_refresh")]
    pub refresh_s: u64,
    /// Launch every pod's UVM as an SEV-SNP guest with HOST_DATA = sha256
    /// of its policy (`accel = "kvm"` on an SNP host). Absent: INSECURE
    /// emulation, the policy's hash on the guest's command line.
    #[serde(default)]
    pub snp: Option<SnpConfig>,
}

/// How an SEV-SNP launch boots (as `parma run --snp` takes it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpConfig {
    /// The UVM's IGVM file (QEMU 10.1 or newer).
    #[serde(default)]
    pub igvm: Option<PathBuf>,
    /// Or an AmdSevX64 OVMF build (kernel hashes; QEMU 9.1 or newer).
    #[serde(default)]
    pub ovmf: Option<PathBuf>,
    /// The vCPU type (the launch digest depends on it).
    #[serde(default = "default_vcpu_type")]
    pub vcpu_type: String,
}

fn default_vcpu_type() -> String {
    "EPYC-v4".into()
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
fn default_accel() -> String {
    "kvm".into()
}
fn default_memory() -> u32 {
    512
}
fn default_cpus() -> u32 {
    1
}
fn default_slots() -> u8 {
    16
}
fn default_deadline() -> u64 {
    60
}
fn default_refresh() -> u64 {
    10
}
fn default_state() -> PathBuf {
    PathBuf::from("/run/parma-shim")
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the shim configuration {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a configuration.
    #[error("{path} is not a shim configuration: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Read the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|reason| ConfigError::Parse { path: path.display().to_string(), reason })
    }

    /// Parse a configuration's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|err| err.to_string())?;
        config.accel()?;
        if config.hotplug_slots > 30 {
            return Err("hotplug_slots: at most 30".into());
        }
        config.snp_launch()?;
        Ok(config)
    }

    /// The SEV-SNP launch, if the configuration asks for one.
    pub fn snp_launch(&self) -> Result<Option<SnpLaunch>, String> {
        let Some(snp) = &self.snp else { return Ok(None) };
        if self.accel()? != Accel::Kvm {
            return Err("snp: an SEV-SNP launch needs accel = \"kvm\" on an SNP host (TCG has no SEV-SNP)".into());
        }
        let boot = match (&snp.igvm, &snp.ovmf) {
            (Some(igvm), None) => SnpBoot::Igvm(igvm.clone()),
            (None, Some(ovmf)) => SnpBoot::KernelHashes { ovmf: ovmf.clone() },
            _ => return Err("snp: give igvm (the UVM's IGVM file) or ovmf (an AmdSevX64 OVMF), one of them".into()),
        };
        Ok(Some(SnpLaunch { boot, vcpu_type: snp.vcpu_type.clone() }))
    }

    /// The accelerator.
    pub fn accel(&self) -> Result<Accel, String> {
        self.accel.parse()
    }

    /// The configuration file to use: `PARMA_SHIM_CONFIG`; else, for a
    /// shim installed by `parma node install` (`/opt/parma/HANDLER/bin/`),
    /// its handler's `shim.toml` beside that `bin/`; else the default.
    pub fn path() -> PathBuf {
        if let Some(path) = std::env::var_os(ENV) {
            return PathBuf::from(path);
        }
        std::env::current_exe().ok().and_then(|exe| Self::beside(&exe)).unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }

    /// `DIR/shim.toml` for a binary at `DIR/bin/NAME`, when it exists.
    fn beside(exe: &Path) -> Option<PathBuf> {
        let bin = exe.parent().filter(|dir| dir.file_name().is_some_and(|name| name == "bin"))?;
        let path = bin.parent()?.join(INSTALLED_NAME);
        path.is_file().then_some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_mistakes_are_named() {
        let config = Config::parse("uvm = \"/usr/share/parma/uvm\"\naccel = \"tcg\"\n").unwrap();
        assert_eq!((config.memory_mib, config.hotplug_slots, config.accel().unwrap()), (512, 16, Accel::Tcg));
        assert!(Config::parse("uvm = \"/u\"\nacel = \"tcg\"\n").unwrap_err().contains("acel"));
        assert!(Config::parse("uvm = \"/u\"\naccel = \"hvf\"\n").is_err());
        assert!(Config::parse("accel = \"tcg\"\n").unwrap_err().contains("uvm"));
        assert!(Config::parse("uvm = \"/u\"\nhotplug_slots = 31\n").is_err());
        assert!(config.snp_launch().unwrap().is_none(), "no [snp]: emulation");
    }

    #[test]
    fn an_installed_shim_reads_its_handlers_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let exe = dir.path().join("bin/containerd-shim-parma-v2");
        assert_eq!(Config::beside(&exe), None, "no shim.toml: the default");
        std::fs::write(dir.path().join(INSTALLED_NAME), "uvm = \"/u\"\n").unwrap();
        assert_eq!(Config::beside(&exe), Some(dir.path().join(INSTALLED_NAME)));
        assert_eq!(Config::beside(&dir.path().join("containerd-shim-parma-v2")), None, "only from a bin/");
    }

    #[test]
    fn an_snp_launch_is_configured_in_full_or_refused() {
        let config = Config::parse("uvm = \"/u\"\n[snp]\nigvm = \"/u/uvm.igvm\"\n").unwrap();
        let launch = config.snp_launch().unwrap().unwrap();
        assert!(matches!(&launch.boot, SnpBoot::Igvm(path) if path == Path::new("/u/uvm.igvm")));
        assert_eq!(launch.vcpu_type, "EPYC-v4");
        let config = Config::parse("uvm = \"/u\"\n[snp]\novmf = \"/o.fd\"\nvcpu_type = \"EPYC-Milan\"\n").unwrap();
        let launch = config.snp_launch().unwrap().unwrap();
        assert!(matches!(&launch.boot, SnpBoot::KernelHashes { ovmf } if ovmf == Path::new("/o.fd")));
        assert_eq!(launch.vcpu_type, "EPYC-Milan");
        for (text, says) in [
            ("uvm = \"/u\"\naccel = \"tcg\"\n[snp]\nigvm = \"/i\"\n", "needs accel"),
            ("uvm = \"/u\"\n[snp]\n", "one of them"),
            ("uvm = \"/u\"\n[snp]\nigvm = \"/i\"\novmf = \"/o\"\n", "one of them"),
            ("uvm = \"/u\"\n[snp]\nigvm = \"/i\"\nhost_data = \"00\"\n", "host_data"),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
