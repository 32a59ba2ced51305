//! What the host and the guest agree on outside the wire protocol: the
//! kernel command-line parameters of the insecure emulation and the
//! virtio-blk serials disks are found by.

/// The kernel command-line flag that turns the guest's INSECURE emulated
/// attestation reports on. It is part of the measured command line, so an
/// emulated launch never has the launch digest of a real one.
pub const EMULATION_FLAG: &str = "parma.insecure_emulated_snp=1";

/// The kernel command-line parameter that carries HOST_DATA under emulation
/// (64 hex digits). Under SEV-SNP HOST_DATA is in the report, from the
/// launch; under emulation it has to come some other way, and QEMU's fw_cfg
/// needs ACPI, which the UVM does not use. An emulated launch protects
/// nothing, so its command line may carry it.
pub const EMULATION_HOST_DATA: &str = "parma.insecure_host_data=";

/// The kernel command-line parameter that carries, under emulation, the
/// MEASUREMENT emulated reports state (96 hex digits): the launch digest
/// the same UVM has when launched from its IGVM file, as its manifest
/// gives it, so a verifier's reference values can be exercised end to end.
/// Like everything emulated, the host chose it: it proves nothing.
pub const EMULATION_MEASUREMENT: &str = "parma.insecure_measurement=";

/// The longest virtio-blk serial (the field is 20 bytes).
pub const MAX_DISK_SERIAL: usize = 20;

/// The virtio-blk serial of the encrypted scratch disk.
pub const SCRATCH_SERIAL: &str = "parma-scratch";

/// Whether `serial` is one QEMU takes and the guest looks for: 1 to
/// [`MAX_DISK_SERIAL`] bytes of `[A-Za-z0-9-]`.
pub fn valid_disk_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_DISK_SERIAL
        && serial.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The virtio-blk serial of container layer `index` (the base layer is 0).
pub fn layer_serial(index: usize) -> String {
    format!("parma-l{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_serials() {
        assert!(valid_disk_serial(SCRATCH_SERIAL));
        assert!(valid_disk_serial(&layer_serial(99)));
        assert!(valid_disk_serial(&"a".repeat(MAX_DISK_SERIAL)));
        for bad in ["", "a b", "a,b", "ä", &"a".repeat(MAX_DISK_SERIAL + 1)] {
            assert!(!valid_disk_serial(bad), "{bad:?}");
        }
    }
}
