//! The node image: the UVM, the shim, the snapshotter and `parma` (the
//! installer) as one OCI image, built the same to the byte on every build
//! ([`image`]); pushed to a registry through the distribution API
//! ([`publish`]); installed on a node, with containerd's configuration, and
//! removed again exactly ([`install`]).
//!
//! One node image is one *runtime handler*, named from the UVM's hash
//! (`parma-` and the first 8 hex digits of the sha256 of its manifest), so
//! a RuntimeClass names the UVM it runs, and two UVMs can sit side by side
//! on a node.

pub mod image;
pub mod install;
pub mod publish;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Where the payload sits in the image's filesystem.
pub const PAYLOAD_DIR: &str = "opt/parma";
/// The payload's own list of its files, by hash.
pub const PAYLOAD_FILE: &str = "payload.json";
/// The signed reference values, in the payload and beside the layout.
pub const REFERENCE_VALUES: &str = "reference-values.json";
/// The binaries of the payload, under `bin/`.
pub const BINARIES: [&str; 3] = ["parma", "containerd-shim-parma-v2", "parma-snapshotter"];
/// The image annotation and label naming the handler.
pub const HANDLER_ANNOTATION: &str = "io.parma.handler";
/// The largest payload file read (a kernel, an IGVM file, a static binary).
pub const MAX_FILE: u64 = 256 << 20;

/// The runtime handler of a UVM whose manifest is `manifest`.
pub fn handler_of(manifest: &[u8]) -> String {
    let hash = hex::encode(Sha256::digest(manifest));
    format!("parma-{}", hash.get(..8).unwrap_or_default())
}

/// Whether `name` is a handler name this code makes (so it is safe as a
/// file name, a TOML key and a Kubernetes name).
pub fn valid_handler(name: &str) -> bool {
    name.strip_prefix("parma-")
        .is_some_and(|hex| hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `payload.json`: the handler and every file of the payload, relative to
/// [`PAYLOAD_DIR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadList {
    /// The runtime handler.
    pub handler: String,
    /// Path → size and sha256.
    pub files: BTreeMap<String, FileEntry>,
}

/// One payload file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Bytes.
    pub size: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
    /// Permission bits (0o755 for programs, 0o644 otherwise).
    pub mode: u32,
}

impl FileEntry {
    /// The entry of `bytes`.
    pub fn of(bytes: &[u8], mode: u32) -> Self {
        Self { size: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)), mode }
    }
}

/// A payload path that is plain: relative, no `.`/`..`, no empty parts,
/// printable ASCII.
pub fn plain_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() < 256
        && path.bytes().all(|b| b.is_ascii_graphic())
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A payload: its list and the bytes of every file on it, each checked.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The list.
    pub list: PayloadList,
    /// Path → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Payload {
    /// Check `files` against `list` (`payload.json`'s bytes): every listed
    /// file present with its size and hash, and the handler sane.
    pub fn checked(list: &[u8], mut files: BTreeMap<String, Vec<u8>>) -> anyhow::Result<Self> {
        let list: PayloadList = serde_json::from_slice(list)
            .map_err(|err| anyhow::anyhow!("{PAYLOAD_FILE} is not a payload list: {err}"))?;
        anyhow::ensure!(valid_handler(&list.handler), "{PAYLOAD_FILE}: {:?} is not a handler name", list.handler);
        let mut checked = BTreeMap::new();
        for (path, entry) in &list.files {
            anyhow::ensure!(plain_path(path) && path != PAYLOAD_FILE, "{PAYLOAD_FILE}: {path:?} is not a payload path");
            let bytes = files.remove(path).ok_or_else(|| anyhow::anyhow!("{path} is listed but not in the payload"))?;
            let actual = FileEntry::of(&bytes, entry.mode);
            anyhow::ensure!(
                actual == *entry,
                "{path}: {} bytes with sha256 {}, the payload list says {} bytes with sha256 {}",
                actual.size,
                actual.sha256,
                entry.size,
                entry.sha256
            );
            checked.insert(path.clone(), bytes);
        }
        for binary in BINARIES {
            anyhow::ensure!(checked.contains_key(&format!("bin/{binary}")), "the payload has no bin/{binary}");
        }
        anyhow::ensure!(checked.contains_key(REFERENCE_VALUES), "the payload has no {REFERENCE_VALUES}");
        anyhow::ensure!(
            checked.contains_key(&format!("uvm/{}", parma_image::files::MANIFEST)),
            "the payload has no UVM manifest"
        );
        Ok(Self { list, files: checked })
    }

    /// The handler.
    pub fn handler(&self) -> &str {
        &self.list.handler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_names_come_from_the_manifest_hash() {
        let handler = handler_of(b"{}");
        assert_eq!(handler, "parma-44136fa3");
        assert!(valid_handler(&handler));
        for bad in ["parma-44136fa", "parma-44136FA3", "parma-../../x", "runc", "parma-44136fa3x"] {
            assert!(!valid_handler(bad), "{bad}");
        }
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a", "a b"] {
            assert!(!plain_path(bad), "{bad:?}");
        }
        assert!(plain_path("uvm/vmlinuz"));
    }
}
