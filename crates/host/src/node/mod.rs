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

use anyhow::Context as _;
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

/// The UVM's manifest (`uvm/manifest.json`) as far as the payload goes:
/// its files by name.
#[derive(Deserialize)]
struct UvmListing {
    files: BTreeMap<String, parma_image::manifest::FileDigest>,
}

/// Every `uvm/` file of `files` is one `manifest` lists, with its size and
/// hash, and every file it lists is there.
fn check_uvm(manifest: &[u8], files: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    let listing: UvmListing =
        serde_json::from_slice(manifest).map_err(|err| anyhow::anyhow!("the UVM's manifest is damaged: {err}"))?;
    for (path, bytes) in files {
        let Some(name) = path.strip_prefix("uvm/") else { continue };
        if name == parma_image::files::MANIFEST {
            continue;
        }
        let expected = listing.files.get(name).with_context(|| format!("{path} is not in the UVM's manifest"))?;
        let actual = parma_image::manifest::FileDigest::of(bytes);
        anyhow::ensure!(
            actual == *expected,
            "{path}: {} bytes with sha256 {}, the UVM's manifest says {} bytes with sha256 {}",
            actual.size,
            actual.sha256,
            expected.size,
            expected.sha256
        );
    }
    for name in listing.files.keys() {
        anyhow::ensure!(
            files.contains_key(&format!("uvm/{name}")),
            "the UVM's manifest lists {name}, the payload has no uvm/{name}"
        );
    }
    Ok(())
}

/// A payload: its list and the bytes of every file on it, each checked.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The list.
    list: PayloadList,
    /// Path → bytes.
    files: BTreeMap<String, Vec<u8>>,
}

/// Where a payload file may go: a program of [`BINARIES`] under `bin/`, a
/// file of the UVM (one name) under `uvm/`, or [`REFERENCE_VALUES`]; the
/// installer writes everything else in the handler's directory itself.
pub fn payload_path(path: &str) -> bool {
    if !plain_path(path) {
        return false;
    }
    match path.split_once('/') {
        Some(("bin", name)) => BINARIES.contains(&name),
        Some(("uvm", name)) => !name.contains('/'),
        Some(_) => false,
        None => path == REFERENCE_VALUES,
    }
}

/// The mode a payload file has: 0o755 for a program under `bin/`, 0o644
/// for the rest.
pub fn payload_mode(path: &str) -> u32 {
    if path.starts_with("bin/") { 0o755 } else { 0o644 }
}

/// The most bytes a payload's files take together.
pub const MAX_PAYLOAD: u64 = 1 << 30;

impl Payload {
    /// Check `files` against `list` (`payload.json`'s bytes): every listed
    /// file present with its size and hash, at a payload path, with a
    /// plain mode; the handler the one the UVM's manifest names; every UVM
    /// file the one that manifest lists, and every file it lists present.
    pub fn checked(list: &[u8], mut files: BTreeMap<String, Vec<u8>>) -> anyhow::Result<Self> {
        let list: PayloadList = serde_json::from_slice(list)
            .map_err(|err| anyhow::anyhow!("{PAYLOAD_FILE} is not a payload list: {err}"))?;
        anyhow::ensure!(valid_handler(&list.handler), "{PAYLOAD_FILE}: {:?} is not a handler name", list.handler);
        let total = list.files.values().try_fold(0u64, |sum, entry| sum.checked_add(entry.size));
        anyhow::ensure!(
            total.is_some_and(|total| total <= MAX_PAYLOAD),
            "{PAYLOAD_FILE} lists more than {MAX_PAYLOAD} bytes"
        );
        let mut checked = BTreeMap::new();
        for (path, entry) in &list.files {
            anyhow::ensure!(payload_path(path), "{PAYLOAD_FILE}: {path:?} is not a payload path");
            anyhow::ensure!(
                entry.mode == payload_mode(path),
                "{PAYLOAD_FILE}: {path} has mode {:#o}, where a payload's is {:#o}",
                entry.mode,
                payload_mode(path)
            );
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
        if let Some(extra) = files.keys().next() {
            anyhow::bail!("the payload holds {extra}, which {PAYLOAD_FILE} does not list");
        }
        for binary in BINARIES {
            anyhow::ensure!(checked.contains_key(&format!("bin/{binary}")), "the payload has no bin/{binary}");
        }
        anyhow::ensure!(checked.contains_key(REFERENCE_VALUES), "the payload has no {REFERENCE_VALUES}");
        let manifest_path = format!("uvm/{}", parma_image::files::MANIFEST);
        let manifest = checked.get(&manifest_path).context("the payload has no UVM manifest")?;
        let named = handler_of(manifest);
        anyhow::ensure!(
            list.handler == named,
            "{PAYLOAD_FILE} names the handler {}, but its UVM's manifest is {named}'s",
            list.handler
        );
        check_uvm(manifest, &checked)?;
        let igvm = format!("uvm/{}", parma_image::files::IGVM);
        anyhow::ensure!(checked.contains_key(&igvm), "the payload has no {igvm}");
        // The reference values are this UVM's: signed (by whom, a verifier
        // checks with --issuer) and naming this handler and manifest.
        let values = checked.get(REFERENCE_VALUES).context("no reference values")?;
        let values = parma_snp::reference::Signed::parse(values)
            .and_then(|signed| signed.verify(None))
            .map_err(|err| anyhow::anyhow!("{REFERENCE_VALUES}: {err}"))?;
        let manifest_sha256 = hex::encode(Sha256::digest(manifest));
        anyhow::ensure!(
            values.handler == list.handler && values.uvm_manifest_sha256 == manifest_sha256,
            "{REFERENCE_VALUES} are for {} (UVM manifest {}), not for {} (UVM manifest {manifest_sha256})",
            values.handler,
            values.uvm_manifest_sha256,
            list.handler
        );
        Ok(Self { list, files: checked })
    }
    /// The handler.
    pub fn handler(&self) -> &str {
        &self.list.handler
    }

    /// The list, as checked.
    pub fn list(&self) -> &PayloadList {
        &self.list
    }

    /// Path → bytes, each as checked.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
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

    /// A payload of `files` (path → bytes, mode), its list naming `handler`
    /// (the manifest's own when `None`).
    fn payload(files: &[(&str, &[u8], u32)], handler: Option<&str>) -> anyhow::Result<Payload> {
        let manifest = files.iter().find(|(p, _, _)| *p == "uvm/manifest.json").map_or(&b""[..], |f| f.1);
        let list = PayloadList {
            handler: handler.map_or_else(|| handler_of(manifest), str::to_string),
            files: files.iter().map(|(p, b, m)| (p.to_string(), FileEntry::of(b, *m))).collect(),
        };
        let bytes = files.iter().map(|(p, b, _)| (p.to_string(), b.to_vec())).collect();
        Payload::checked(&serde_json::to_vec(&list)?, bytes)
    }

    #[test]
    fn payloads_are_checked_against_their_uvm_manifest() {
        let kernel = b"kernel".as_slice();
        let igvm = b"igvm".as_slice();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schema": 1,
            "files": {
                "vmlinuz": parma_image::manifest::FileDigest::of(kernel),
                "uvm.igvm": parma_image::manifest::FileDigest::of(igvm),
            },
        }))
        .unwrap();
        let key = p384::ecdsa::SigningKey::from_slice(&[7; 48]).unwrap();
        let values = |handler: &str, manifest: &[u8]| {
            let values: parma_snp::reference::ReferenceValues = serde_json::from_value(serde_json::json!({
                "schema": 1, "handler": handler, "uvm_manifest_sha256": hex::encode(Sha256::digest(manifest)),
                "kernel_config_sha256": "", "initrd_sha256": "", "cmdline": "", "guest_policy": "0x30000",
                "min_tcb": "bl=3,tee=0,snp=8,ucode=115", "host_data": "sha256 of the policy", "launches": [],
            }))
            .unwrap();
            serde_json::to_vec(&parma_snp::reference::Signed::sign(&values, &key).unwrap()).unwrap()
        };
        let ours = values(&handler_of(&manifest), &manifest);
        let mut good: Vec<(&str, &[u8], u32)> = vec![
            ("bin/parma", b"p", 0o755),
            ("bin/containerd-shim-parma-v2", b"s", 0o755),
            ("bin/parma-snapshotter", b"n", 0o755),
            ("reference-values.json", &ours, 0o644),
            ("uvm/vmlinuz", kernel, 0o644),
            ("uvm/manifest.json", &manifest, 0o644),
            ("uvm/uvm.igvm", igvm, 0o644),
        ];
        let checked = payload(&good, None).unwrap();
        assert_eq!(checked.handler(), handler_of(&manifest));
        let fails = |files: &[(&str, &[u8], u32)], handler: Option<&str>, says: &str| {
            let err = format!("{:#}", payload(files, handler).unwrap_err());
            assert!(err.contains(says), "{err} (expected {says:?})");
        };
        // A list naming another handler than the UVM's.
        fails(&good, Some("parma-00000000"), "but its UVM's manifest is");
        // Files the installer writes itself, or anything elsewhere.
        for path in ["install.json", "shim.toml", "payload.json", "bin/sh", "etc/passwd", "uvm/a/b"] {
            let mut files = good.clone();
            files.push((path, b"x", 0o644));
            fails(&files, None, "is not a payload path");
        }
        // Modes other than a program's under bin/ and a file's elsewhere.
        for (at, mode) in [(0, 0o4755), (0, 0o777), (0, 0o644), (4, 0o666), (4, 0o755), (3, 0o1644)] {
            let mut files = good.clone();
            files[at].2 = mode;
            fails(&files, None, "where a payload's is");
        }
        // Reference values for another UVM, or not signed as they say.
        let theirs = values("parma-00000000", b"{}");
        let mut files = good.clone();
        files[3].1 = &theirs;
        fails(&files, None, "are for parma-00000000");
        let tampered = String::from_utf8(ours.clone()).unwrap().replace("0x30000", "0x30001").into_bytes();
        files[3].1 = &tampered;
        fails(&files, None, "reference-values.json: ");
        // No IGVM file (and none in the manifest).
        let bare = serde_json::to_vec(&serde_json::json!({
            "schema": 1, "files": {"vmlinuz": parma_image::manifest::FileDigest::of(kernel)},
        }))
        .unwrap();
        let bare_values = values(&handler_of(&bare), &bare);
        let mut files = good.clone();
        files.remove(6);
        files[5].1 = &bare;
        files[3].1 = &bare_values;
        fails(&files, None, "the payload has no uvm/uvm.igvm");
        // A UVM file the list agrees with but the manifest does not.
        let mut files = good.clone();
        files[4].1 = b"another kernel";
        fails(&files, None, "the UVM's manifest says");
        // A UVM file the manifest does not list, and one it lists but lacks.
        let mut files = good.clone();
        files.push(("uvm/initrd.img", b"i", 0o644));
        fails(&files, None, "is not in the UVM's manifest");
        let mut files = good.clone();
        files.remove(4);
        fails(&files, None, "the payload has no uvm/vmlinuz");
        // More than a payload may be.
        let list = PayloadList {
            handler: handler_of(&manifest),
            files: [("uvm/big".to_string(), FileEntry { size: MAX_PAYLOAD + 1, sha256: String::new(), mode: 0o644 })]
                .into(),
        };
        let err = Payload::checked(&serde_json::to_vec(&list).unwrap(), BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("lists more than"), "{err}");
        // A file the list does not name.
        let list = PayloadList {
            handler: handler_of(&manifest),
            files: good.iter().map(|(p, b, m)| (p.to_string(), FileEntry::of(b, *m))).collect(),
        };
        let mut bytes: BTreeMap<String, Vec<u8>> = good.iter().map(|(p, b, _)| (p.to_string(), b.to_vec())).collect();
        bytes.insert("uvm/extra".into(), b"x".to_vec());
        let err = Payload::checked(&serde_json::to_vec(&list).unwrap(), bytes).unwrap_err().to_string();
        assert!(err.contains("uvm/extra, which payload.json does not list"), "{err}");
        // No manifest at all.
        good.remove(5);
        good.remove(5);
        fails(&good, Some("parma-00000000"), "no UVM manifest");
    }
}
