//! Attestation reports from inside the guest.
//!
//! On an SEV-SNP guest the report comes from the firmware through the
//! kernel's configfs TSM interface (`/sys/kernel/config/tsm/report`, the
//! `sev-guest` provider), or, where that interface is unavailable, through
//! the `SNP_GET_REPORT` ioctl on `/dev/sev-guest` (the `sev` crate's guest
//! firmware API). Under emulation (TCG) there is no SNP: when, and
//! only when, the kernel command line carries
//! `parma.insecure_emulated_snp=1`, reports in the real format are signed
//! with a fixed test key, with HOST_DATA taken from the command line too
//! (`parma.insecure_host_data=HEX`). The flag
//! is part of the measured command line, so an emulated launch can never
//! have the launch digest of a real one, and `parma verify` refuses such
//! reports unless told `--allow-insecure-emulation`.

use std::path::{Path, PathBuf};

use parma_snp::AttestationReport;

pub use parma_protocol::boot::{
    EMULATION_FLAG, EMULATION_HOST_DATA as EMULATED_HOST_DATA, EMULATION_MEASUREMENT as EMULATED_MEASUREMENT,
};
/// The configfs TSM report directory.
const TSM_REPORT: &str = "/sys/kernel/config/tsm/report";
/// The SEV guest device.
const SEV_GUEST: &str = "/dev/sev-guest";

/// Where reports come from.
#[derive(Debug)]
pub enum Provider {
    /// The SEV-SNP firmware: through configfs TSM (this directory), else
    /// through the ioctl on this device.
    Firmware {
        /// The TSM report directory.
        tsm: PathBuf,
        /// The SEV guest device.
        device: PathBuf,
    },
    /// INSECURE: a test key, for emulation only.
    Emulated {
        /// HOST_DATA as the command line gave it (zero when absent).
        host_data: [u8; 32],
        /// MEASUREMENT as the command line gave it (zero when absent).
        measurement: [u8; 48],
    },
}

impl Provider {
    /// The provider of this boot: emulation if the kernel command line asks
    /// for it, else the TSM interface.
    pub fn detect() -> Self {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if cmdline.split_whitespace().any(|arg| arg == EMULATION_FLAG) {
            let host_data = emulated_host_data(&cmdline).unwrap_or([0; 32]);
            let measurement = emulated_measurement(&cmdline).unwrap_or([0; 48]);
            tracing::warn!("INSECURE: attestation reports are emulated ({EMULATION_FLAG})");
            Provider::Emulated { host_data, measurement }
        } else {
            Provider::Firmware { tsm: PathBuf::from(TSM_REPORT), device: PathBuf::from(SEV_GUEST) }
        }
    }

    /// Its name in responses.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Firmware { .. } => "sev-guest",
            Provider::Emulated { .. } => "insecure-emulation",
        }
    }

    /// HOST_DATA of this launch. On SNP it is only in a report, so a fresh
    /// one is requested, binding `report_data`; under emulation it is the
    /// value from the command line, and no report is signed for it (the
    /// emulated signature proves nothing, and signing under TCG costs a
    /// visible share of a container's start).
    pub fn host_data(&self, report_data: &[u8; 64]) -> Result<[u8; 32], String> {
        match self {
            Provider::Firmware { .. } => self.report(report_data).map(|report| report.host_data),
            Provider::Emulated { host_data, .. } => Ok(*host_data),
        }
    }

    /// A fresh report binding `report_data`.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<AttestationReport, String> {
        let bytes = match self {
            Provider::Firmware { tsm, device } => match tsm_report(tsm, report_data) {
                Ok(bytes) => bytes,
                Err(Unavailable::No(tsm_err)) => ioctl_report(device, report_data)
                    .map_err(|err| format!("{tsm_err}; and {}: {err}", device.display()))?,
                Err(Unavailable::Failed(err)) => return Err(err),
            },
            Provider::Emulated { host_data, measurement } => {
                let signer = parma_snp::emulation::Signer::from_seed(&parma_snp::emulation::AGENT_SEED);
                let fields = parma_snp::emulation::EmulatedFields {
                    report_data: *report_data,
                    host_data: *host_data,
                    measurement: *measurement,
                };
                return Ok(signer.report(fields));
            }
        };
        AttestationReport::parse(&bytes).map_err(|err| format!("the firmware's report does not parse: {err}"))
    }
}

/// HOST_DATA from the command line under emulation: 64 hex digits.
fn emulated_host_data(cmdline: &str) -> Option<[u8; 32]> {
    let text = cmdline.split_whitespace().find_map(|arg| arg.strip_prefix(EMULATED_HOST_DATA))?;
    hex::decode(text).ok()?.try_into().ok()
}

/// MEASUREMENT from the command line under emulation: 96 hex digits.
fn emulated_measurement(cmdline: &str) -> Option<[u8; 48]> {
    let text = cmdline.split_whitespace().find_map(|arg| arg.strip_prefix(EMULATED_MEASUREMENT))?;
    hex::decode(text).ok()?.try_into().ok()
}

/// Why the TSM interface gave no report.
#[derive(Debug)]
enum Unavailable {
    /// It is not there, or has no provider: try the device.
    No(String),
    /// It is there and failed: that is the answer.
    Failed(String),
}

/// One report through configfs TSM: make an entry, write REPORT_DATA,
/// read the report, check nobody else wrote meanwhile, remove the entry.
fn tsm_report(dir: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, Unavailable> {
    if !dir.is_dir() {
        return Err(Unavailable::No(format!(
            "no attestation provider: {} is missing (not an SEV-SNP guest?)",
            dir.display()
        )));
    }
    // One entry per request: requests may overlap (a container's endpoint
    // signs outside the agent's lock), and an entry is never shared.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entry = dir.join(format!("parma-{}-{serial}", std::process::id()));
    std::fs::create_dir(&entry).map_err(|err| match err.raw_os_error() {
        Some(libc::ENXIO) => {
            Unavailable::No("no attestation provider: the TSM report interface has none (not an SEV-SNP guest?)".into())
        }
        _ => Unavailable::Failed(format!("cannot create {}: {err}", entry.display())),
    })?;
    let result = (|| {
        let generation = || std::fs::read_to_string(entry.join("generation")).unwrap_or_default();
        std::fs::write(entry.join("inblob"), report_data).map_err(|err| format!("cannot write inblob: {err}"))?;
        let before = generation();
        let report = std::fs::read(entry.join("outblob"))
            .map_err(|err| format!("no report from the TSM provider (not an SEV-SNP guest?): {err}"))?;
        if generation() != before {
            return Err("the TSM report entry changed while it was read".to_string());
        }
        Ok(report)
    })();
    let _ = std::fs::remove_dir(&entry);
    result.map_err(Unavailable::Failed)
}

/// One report through `SNP_GET_REPORT` on the SEV guest device, requested
/// for VMPL 0 (the guest kernel's level when no SVSM runs below it).
fn ioctl_report(device: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, String> {
    if !device.exists() {
        return Err("missing (not an SEV-SNP guest?)".into());
    }
    if device != Path::new(SEV_GUEST) {
        return Err("the sev crate opens /dev/sev-guest only".into());
    }
    let mut firmware = sev::firmware::guest::Firmware::open().map_err(|err| format!("cannot open: {err}"))?;
    firmware.get_report(None, Some(*report_data), Some(0)).map_err(|err| format!("SNP_GET_REPORT failed: {err}"))
}

/// REPORT_DATA from hex: up to 64 bytes, zero padded on the right.
pub fn report_data_from_hex(text: &str) -> Result<[u8; 64], String> {
    if text.len() > 128 {
        return Err("report_data is longer than 64 bytes".into());
    }
    let bytes = hex::decode(text).map_err(|_| "report_data is not hex".to_string())?;
    let mut data = [0u8; 64];
    data.iter_mut().zip(&bytes).for_each(|(d, s)| *d = *s);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_is_padded_and_bounded() {
        let data = report_data_from_hex("abcd").unwrap();
        assert_eq!(&data[..3], &[0xab, 0xcd, 0]);
        assert!(report_data_from_hex(&"00".repeat(65)).is_err());
        assert!(report_data_from_hex("xyz").is_err());
        assert_eq!(report_data_from_hex("").unwrap(), [0; 64]);
    }

    #[test]
    fn emulated_host_data_comes_from_the_command_line() {
        let hex = "ab".repeat(32);
        let cmdline = format!("console=ttyS0 {EMULATION_FLAG} {EMULATED_HOST_DATA}{hex}\n");
        assert_eq!(emulated_host_data(&cmdline), Some([0xab; 32]));
        assert_eq!(emulated_host_data(&format!("{EMULATED_HOST_DATA}ab")), None);
        let measurement = "cd".repeat(48);
        assert_eq!(emulated_measurement(&format!("x {EMULATED_MEASUREMENT}{measurement}")), Some([0xcd; 48]));
        assert_eq!(emulated_measurement(&format!("{EMULATED_MEASUREMENT}cd")), None);
        assert_eq!(emulated_measurement(&cmdline), None);
        assert_eq!(emulated_host_data("console=ttyS0"), None);
    }

    #[test]
    fn no_provider_is_a_clear_error_naming_both_interfaces() {
        let provider = Provider::Firmware { tsm: "/nonexistent/tsm".into(), device: "/nonexistent/sev-guest".into() };
        let err = provider.report(&[0; 64]).unwrap_err();
        assert!(err.contains("no attestation provider: /nonexistent/tsm is missing"), "{err}");
        assert!(err.contains("/nonexistent/sev-guest: missing (not an SEV-SNP guest?)"), "{err}");
        assert_eq!(provider.name(), "sev-guest");
    }

    #[test]
    fn a_failing_tsm_entry_is_the_answer() {
        // A TSM directory where entries cannot be made (a plain file stands in
        // for it): the error is that, not a fallback to the device.
        let dir = tempfile::tempdir().unwrap();
        let tsm = dir.path().join("tsm");
        std::fs::create_dir(&tsm).unwrap();
        // Every entry name this process could use next is taken by a file.
        for serial in 0..64 {
            std::fs::write(tsm.join(format!("parma-{}-{serial}", std::process::id())), b"").unwrap();
        }
        let provider = Provider::Firmware { tsm, device: "/nonexistent/sev-guest".into() };
        let err = provider.report(&[0; 64]).unwrap_err();
        assert!(err.starts_with("cannot create"), "{err}");
    }

    #[test]
    fn emulated_reports_carry_host_data_and_report_data() {
        let provider = Provider::Emulated { host_data: [7; 32], measurement: [0; 48] };
        let report = provider.report(&[9; 64]).unwrap();
        assert_eq!(report.host_data, [7; 32]);
        assert_eq!(report.report_data, [9; 64]);
    }

    #[test]
    fn host_data_is_the_reports_on_both_providers() {
        let emulated = Provider::Emulated { host_data: [7; 32], measurement: [0; 48] };
        assert_eq!(emulated.host_data(&[9; 64]), Ok([7; 32]));
        assert_eq!(emulated.host_data(&[9; 64]).unwrap(), emulated.report(&[9; 64]).unwrap().host_data);
        // Without SNP the firmware provider has no report, so no HOST_DATA either.
        let firmware = Provider::Firmware { tsm: "/nonexistent/tsm".into(), device: "/nonexistent/sev-guest".into() };
        let err = firmware.host_data(&[0; 64]).unwrap_err();
        assert!(err.contains("/nonexistent/sev-guest"), "{err}");
    }
}
