//! Facts about the guest, read from /proc and /sys.

use std::path::Path;

use parma_protocol::{GuestInfo, MountInfo};

/// Where SNP guests get reports from the firmware.
const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";
/// The configfs TSM report interface (init mounts configfs).
const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";
/// At most this many mounts are reported.
const MAX_MOUNTS: usize = 1024;

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|uts| uts.release().to_string_lossy().into_owned())
        .unwrap_or_else(|err| format!("unknown ({err})"))
}

/// Milliseconds since the kernel booted (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
        })
        .unwrap_or(0)
}

/// Everything `GuestInfo` reports.
pub fn info() -> Result<GuestInfo, String> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|err| format!("cannot read /proc/meminfo: {err}"))?;
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|err| format!("cannot read /proc/self/mounts: {err}"))?;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(GuestInfo {
        memory_total_kib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0),
        memory_available_kib: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0),
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        mounts: parse_mounts(&mounts),
        sev_guest_device: Path::new(SEV_GUEST_DEVICE).exists(),
        tsm_report: Path::new(TSM_REPORT_DIR).is_dir(),
    })
}

/// The value in KiB of one /proc/meminfo field.
fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name != field {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Parse /proc/self/mounts, undoing the kernel's octal escapes (`\040`).
fn parse_mounts(mounts: &str) -> Vec<MountInfo> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            Some(MountInfo {
                source: unescape(fields.next()?),
                target: unescape(fields.next()?),
                fstype: unescape(fields.next()?),
                options: unescape(fields.next()?),
            })
        })
        .take(MAX_MOUNTS)
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'\\'
            && let Some(value) = bytes
                .get(i + 1..i + 4)
                .and_then(|oct| std::str::from_utf8(oct).ok())
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let text = "MemTotal:         498340 kB\nMemFree:          480000 kB\nMemAvailable:     470000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(498_340));
        assert_eq!(meminfo_kib(text, "MemAvailable"), Some(470_000));
        assert_eq!(meminfo_kib(text, "Mem"), None);
        assert_eq!(meminfo_kib("MemTotal: lots", "MemTotal"), None);
    }

    #[test]
    fn mounts_with_escapes() {
        let text = "proc /proc proc rw,nosuid 0 0\n/dev/vda /a\\040b ext4 ro 0 0\nshort line\n";
        let mounts = parse_mounts(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].target, "/proc");
        assert_eq!(mounts[1].target, "/a b");
        assert_eq!(mounts[1].options, "ro");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\999x"), "\\999x");
    }

    #[test]
    fn info_reads_this_machine() {
        let info = info().unwrap();
        assert!(info.memory_total_kib > 0);
        assert!(info.cpus >= 1);
        assert!(info.mounts.iter().any(|m| m.target == "/"));
    }
}
