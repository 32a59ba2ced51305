//! `manifest.json`: what the image is made of, by hash.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::initrd::Listed;

/// Version of the manifest's layout.
pub const SCHEMA: u32 = 1;

/// The manifest of one UVM image.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The kernel's source and config.
    pub kernel: Kernel,
    /// `rustc -V` of the toolchain that built init and the agent.
    pub rustc: String,
    /// The kernel command line.
    pub cmdline: String,
    /// Every output file of the image, by name.
    pub files: BTreeMap<String, FileDigest>,
    /// Every entry of the initrd.
    pub initrd: Vec<Listed>,
    /// The expected SEV-SNP launch digest of the default profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchDigest>,
    /// The IGVM file and its launch digest.
    pub igvm: IgvmDigest,
}

/// The IGVM file's launch digest (QEMU with `igvm-cfg`, KVM).
#[derive(Debug, Clone, Serialize)]
pub struct IgvmDigest {
    /// The file, in the UVM directory.
    pub file: String,
    /// Guest memory it fixes, MiB.
    pub memory_mib: u32,
    /// vCPUs of the digest (the boot vCPU's state is in the file).
    pub vcpus: u32,
    /// sha384-sized launch digest, lowercase hex.
    pub digest: String,
}

/// A launch digest and what it was computed for.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchDigest {
    /// What the digest covers besides the UVM's kernel, initrd and cmdline.
    pub profile: String,
    /// sha384-sized launch digest, lowercase hex.
    pub digest: String,
    /// vCPUs.
    pub vcpus: u32,
    /// vCPU type.
    pub vcpu_type: String,
    /// The firmware file measured (or its tail).
    pub ovmf: String,
    /// The precomputed digest of the firmware pages, when `ovmf` is a tail.
    pub ovmf_hash: Option<String>,
}

/// Where the kernel came from.
#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    /// Debian source package and version.
    pub source: String,
    /// `make kernelrelease`.
    pub release: String,
    /// sha256 of the final `.config`.
    pub config_sha256: String,
}

/// Size and hash of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Bytes.
    pub size: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
}

impl FileDigest {
    /// Digest of bytes in memory.
    pub fn of(bytes: &[u8]) -> Self {
        Self { size: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)) }
    }

    /// Digest of a file.
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(path)?;
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok(Self { size, sha256: hex::encode(hasher.finalize()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_file_matches_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let digest = FileDigest::of_file(&path).unwrap();
        assert_eq!(digest, FileDigest::of(b"abc"));
        assert_eq!(digest.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
