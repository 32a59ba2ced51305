//! The expected SEV-SNP launch digest of a UVM, computed on the host before
//! any launch, so a relying party can compare it with the MEASUREMENT of an
//! attestation report.
//!
//! For a QEMU direct boot with `kernel-hashes=on`, the digest covers the
//! OVMF firmware pages and its SEV metadata sections, the table of sha256
//! hashes of the kernel, initrd and command line that OVMF checks before it
//! jumps to the kernel, and one VMSA (initial register state) per vCPU,
//! which depends on the vCPU type. The page-by-page chaining is the `sev`
//! crate's (virtee), which implements AMD's SNP ABI; this crate chooses its
//! inputs and is checked against the independent `sev-snp-measure` tool.
//!
//! Host only: never linked into the guest.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::path::PathBuf;

use sev::measurement::snp::{SnpMeasurementArgs, snp_calc_launch_digest};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType};

/// Size of an SNP launch digest (SHA-384).
pub const DIGEST_LEN: usize = 48;

/// The vCPU types QEMU offers for SNP guests, as `-cpu` names them.
pub const VCPU_TYPES: &[&str] = &[
    "EPYC",
    "EPYC-v1",
    "EPYC-v2",
    "EPYC-IBPB",
    "EPYC-v3",
    "EPYC-v4",
    "EPYC-Rome",
    "EPYC-Rome-v1",
    "EPYC-Rome-v2",
    "EPYC-Rome-v3",
    "EPYC-Milan",
    "EPYC-Milan-v1",
    "EPYC-Milan-v2",
    "EPYC-Genoa",
    "EPYC-Genoa-v1",
];

/// What a launch is made of.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The firmware image (OVMF.fd, or an AmdSev build's last pages with `ovmf_hash`).
    pub ovmf: PathBuf,
    /// The precomputed digest of the firmware pages, when `ovmf` is only its tail.
    pub ovmf_hash: Option<String>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// vCPU type, as QEMU's `-cpu` names it.
    pub vcpu_type: String,
    /// Direct boot: kernel, initrd and command line, measured through the
    /// firmware's kernel-hashes table. `None`: firmware only.
    pub direct_boot: Option<DirectBoot>,
    /// SEV features of the guest (VMSA `sev_features`); 1 = SNP active.
    pub guest_features: u64,
}

/// The files QEMU hashes into the firmware's kernel-hashes table.
#[derive(Debug, Clone)]
pub struct DirectBoot {
    /// bzImage.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// The kernel command line, exactly as passed to `-append`.
    pub cmdline: String,
}

/// The digest could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// Zero vCPUs.
    #[error("a launch needs at least one vCPU")]
    NoVcpus,
    /// A vCPU type the measurement does not know.
    #[error("unknown vCPU type {0:?} (known: {known})", known = VCPU_TYPES.join(", "))]
    UnknownVcpuType(String),
    /// A firmware hash that is not 48 bytes of hex.
    #[error("the OVMF hash must be 96 hex digits")]
    BadOvmfHash,
    /// The `sev` crate refused the inputs (no kernel-hashes section in the
    /// firmware, unreadable files, ...).
    #[error("cannot measure this launch: {0}")]
    Sev(String),
}

/// Compute the launch digest.
pub fn launch_digest(launch: &Launch) -> Result<[u8; DIGEST_LEN], MeasureError> {
    if launch.vcpus == 0 {
        return Err(MeasureError::NoVcpus);
    }
    if !VCPU_TYPES.contains(&launch.vcpu_type.as_str()) {
        return Err(MeasureError::UnknownVcpuType(launch.vcpu_type.clone()));
    }
    let vcpu_type = CpuType::try_from(launch.vcpu_type.as_str())
        .map_err(|_| MeasureError::UnknownVcpuType(launch.vcpu_type.clone()))?;
    if let Some(hash) = &launch.ovmf_hash
        && (hash.len() != 2 * DIGEST_LEN || hex::decode(hash).is_err())
    {
        return Err(MeasureError::BadOvmfHash);
    }
    let args = SnpMeasurementArgs {
        vcpus: launch.vcpus,
        vcpu_type,
        ovmf_file: launch.ovmf.clone(),
        guest_features: GuestFeatures(launch.guest_features),
        kernel_file: launch.direct_boot.as_ref().map(|b| b.kernel.clone()),
        initrd_file: launch.direct_boot.as_ref().map(|b| b.initrd.clone()),
        append: launch.direct_boot.as_ref().map(|b| b.cmdline.as_str()),
        ovmf_hash_str: launch.ovmf_hash.as_deref(),
        vmm_type: Some(VMMType::QEMU),
    };
    let digest = snp_calc_launch_digest(args).map_err(|err| MeasureError::Sev(err.to_string()))?;
    let bytes = hex::decode(digest.get_hex_ld()).map_err(|err| MeasureError::Sev(err.to_string()))?;
    bytes.try_into().map_err(|_| MeasureError::Sev("the digest is not 48 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_before_measuring() {
        let launch = Launch {
            ovmf: "/nonexistent".into(),
            ovmf_hash: None,
            vcpus: 1,
            vcpu_type: "EPYC-v4".into(),
            direct_boot: None,
            guest_features: 1,
        };
        assert!(matches!(launch_digest(&Launch { vcpus: 0, ..launch.clone() }), Err(MeasureError::NoVcpus)));
        assert!(matches!(
            launch_digest(&Launch { vcpu_type: "Pentium".into(), ..launch.clone() }),
            Err(MeasureError::UnknownVcpuType(_))
        ));
        assert!(matches!(
            launch_digest(&Launch { ovmf_hash: Some("abcd".into()), ..launch.clone() }),
            Err(MeasureError::BadOvmfHash)
        ));
        assert!(matches!(launch_digest(&launch), Err(MeasureError::Sev(_))));
    }
}
