//! A reproducible initrd: newc cpio, gzip with a fixed header.
//!
//! Entries are sorted by path, with mtime 0, uid and gid 0 and inode numbers
//! given in that order, and the gzip header has mtime 0, so the same inputs
//! give the same bytes on every machine.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// What kind of file an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A character device node.
    CharDev {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One entry of the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits (no file type).
    pub perm: u32,
    /// File type and contents.
    pub kind: Kind,
}

/// An error in the initrd's contents.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// A path that is empty, absolute, or has `.`, `..` or empty components.
    #[error("bad path {0:?}: paths are relative, without '.', '..' or empty components")]
    BadPath(String),
    /// A path added twice.
    #[error("{0} is added twice")]
    Duplicate(String),
    /// An entry whose parent directory is missing.
    #[error("{path} has no parent directory {parent} in the initrd")]
    MissingParent {
        /// The entry.
        path: String,
        /// The directory it needs.
        parent: String,
    },
    /// A file too large for the newc format (4 GiB).
    #[error("{0} is too large for a newc cpio archive")]
    TooLarge(String),
    /// Writing failed.
    #[error("cannot write the initrd")]
    Io(#[from] std::io::Error),
    /// The policy framework did not compile for the register VM.
    #[error("cannot compile the policy framework: {0}")]
    Framework(#[from] parma_policy::PolicyError),
}

/// One line of the manifest's listing of the initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// Path inside the initrd.
    pub path: String,
    /// `dir`, `file` or `chardev`.
    pub kind: &'static str,
    /// Permission bits in octal.
    pub mode: String,
    /// Size in bytes (files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// sha256 of the contents (files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `major:minor` (devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// The contents of an initrd, kept sorted by path.
#[derive(Debug, Clone, Default)]
pub struct Initrd {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

impl Initrd {
    /// An empty initrd.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an entry.
    pub fn add(&mut self, path: &str, perm: u32, kind: Kind) -> Result<&mut Self, InitrdError> {
        let valid = !path.is_empty()
            && !path.starts_with('/')
            && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
        if !valid {
            return Err(InitrdError::BadPath(path.to_string()));
        }
        if self.entries.contains_key(path) {
            return Err(InitrdError::Duplicate(path.to_string()));
        }
        self.entries.insert(path.to_string(), Entry { perm: perm & 0o7777, kind });
        Ok(self)
    }

    /// Add a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self, InitrdError> {
        self.add(path, perm, Kind::Dir)
    }

    /// Add a regular file.
    pub fn file(&mut self, path: &str, perm: u32, contents: Vec<u8>) -> Result<&mut Self, InitrdError> {
        self.add(path, perm, Kind::File(contents))
    }

    /// Add a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<&mut Self, InitrdError> {
        self.add(path, perm, Kind::CharDev { major, minor })
    }

    /// Check that every entry's parent directory is there.
    fn check_parents(&self) -> Result<(), InitrdError> {
        for path in self.entries.keys() {
            if let Some((parent, _)) = path.rsplit_once('/')
                && !matches!(self.entries.get(parent), Some(Entry { kind: Kind::Dir, .. }))
            {
                return Err(InitrdError::MissingParent { path: path.clone(), parent: parent.to_string() });
            }
        }
        Ok(())
    }

    /// Write the uncompressed newc archive.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> Result<W, InitrdError> {
        self.check_parents()?;
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, size, rdev, contents): (u32, u32, u32, (u32, u32), &[u8]) = match &entry.kind {
                Kind::Dir => (S_IFDIR, 2, 0, (0, 0), &[]),
                Kind::File(data) => {
                    let size = u32::try_from(data.len()).map_err(|_| InitrdError::TooLarge(path.clone()))?;
                    (S_IFREG, 1, size, (0, 0), data)
                }
                Kind::CharDev { major, minor } => (S_IFCHR, 1, 0, (*major, *minor), &[]),
            };
            let mut writer = cpio::newc::Builder::new(path)
                .ino(ino)
                .mode(mode | entry.perm)
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(0)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1)
                .write(out, size);
            writer.write_all(contents)?;
            out = writer.finish()?;
        }
        Ok(cpio::newc::trailer(out)?)
    }

    /// Write the gzip-compressed archive ([`gzip`]).
    pub fn write_gz<W: Write>(&self, mut out: W) -> Result<W, InitrdError> {
        let cpio = self.write_cpio(Vec::new())?;
        out.write_all(&gzip(&cpio))?;
        Ok(out)
    }

    /// The compressed initrd as bytes.
    pub fn to_gz(&self) -> Result<Vec<u8>, InitrdError> {
        self.write_gz(Vec::new())
    }

    /// A listing for the manifest: every entry with its mode, and files with size and sha256.
    pub fn listing(&self) -> Vec<Listed> {
        self.entries
            .iter()
            .map(|(path, entry)| {
                let mode = format!("{:04o}", entry.perm);
                let (kind, size, sha256, device) = match &entry.kind {
                    Kind::Dir => ("dir", None, None, None),
                    Kind::File(data) => {
                        ("file", Some(data.len() as u64), Some(hex::encode(Sha256::digest(data))), None)
                    }
                    Kind::CharDev { major, minor } => ("chardev", None, None, Some(format!("{major}:{minor}"))),
                };
                Listed { path: path.clone(), kind, mode, size, sha256, device }
            })
            .collect()
    }
}

/// gzip (RFC 1952) of `data` as one member: no name, mtime 0, OS unknown,
/// deflated at level 9 by miniz_oxide directly. Not through flate2: its
/// backend is chosen once for the whole workspace (zlib-rs, for the
/// layers' inflate), and zlib-rs's deflate output depends on the CPU, while
/// these bytes are measured into the launch digest and must be the same
/// wherever the image is built.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    gzip_level(data, 9)
}

/// [`gzip`] at another miniz_oxide level (1 fastest to 10 uber), for
/// larger payloads such as the node image's layer; XFL says level 9 only
/// when it is.
pub fn gzip_level(data: &[u8], level: u8) -> Vec<u8> {
    let deflated = miniz_oxide::deflate::compress_to_vec(data, level);
    let mut out = Vec::with_capacity(deflated.len() + 18);
    // ID1 ID2, CM = deflate, FLG = none, MTIME = 0, XFL = 2 (slowest, best), OS = 255 (unknown).
    let xfl = if level >= 9 { 2 } else { 0 };
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    // ISIZE: the input's length modulo 2^32.
    let isize = (data.len() as u64 & u64::from(u32::MAX)) as u32;
    out.extend_from_slice(&isize.to_le_bytes());
    out
}

/// Where the UVM carries the policy framework compiled for the register VM.
pub const FRAMEWORK_PROGRAM: &str = "etc/parma/framework.rvm";

/// The UVM's initrd: `/init` (PID 1), the agent at `/bin/parma-agent`, the
/// policy framework compiled for the agent's register VM (the same bytes
/// for the same framework and regorus), the console node, and the mount
/// points init uses. Nothing else: no shell.
pub fn uvm(init: Vec<u8>, agent: Vec<u8>) -> Result<Initrd, InitrdError> {
    let program = parma_policy::Framework::compile()?.to_bytes()?;
    let mut initrd = Initrd::new();
    initrd
        .dir("bin", 0o755)?
        .file("bin/parma-agent", 0o755, agent)?
        .dir("dev", 0o755)?
        .char_dev("dev/console", 0o600, 5, 1)?
        .dir("etc", 0o755)?
        .dir("etc/parma", 0o755)?
        .file(FRAMEWORK_PROGRAM, 0o444, program)?
        .file("init", 0o755, init)?
        .dir("proc", 0o755)?
        .dir("run", 0o755)?
        .dir("sys", 0o755)?;
    Ok(initrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_one_member_any_gunzip_reads() {
        use std::io::Read;
        for data in [Vec::new(), b"parma".to_vec(), (0..300_000u32).map(|i| (i % 251) as u8).collect()] {
            let gz = gzip(&data);
            assert_eq!(gz[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(gz[gz.len() - 4..], (data.len() as u32).to_le_bytes());
        }
        // And the system's gunzip, where the image is built.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, gzip(b"hello initrd")).unwrap();
        let out = std::process::Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello initrd");
    }

    fn unpack(cpio_bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut reader = cpio_bytes;
        loop {
            let mut entry = cpio::newc::Reader::new(reader).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            let e = entry.entry();
            let meta = (e.name().to_string(), e.mode(), e.mtime(), e.uid());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            out.push((meta.0, meta.1, meta.2, meta.3, data));
            reader = entry.finish().unwrap();
        }
        out
    }

    #[test]
    fn entries_are_sorted_and_normalised() {
        let initrd = uvm(b"INIT".to_vec(), b"AGENT".to_vec()).unwrap();
        let cpio_bytes = initrd.write_cpio(Vec::new()).unwrap();
        let entries = unpack(&cpio_bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/parma-agent",
                "dev",
                "dev/console",
                "etc",
                "etc/parma",
                FRAMEWORK_PROGRAM,
                "init",
                "proc",
                "run",
                "sys"
            ]
        );
        for (name, mode, mtime, uid, data) in &entries {
            assert_eq!((*mtime, *uid), (0, 0), "{name}");
            match name.as_str() {
                "init" => assert_eq!((*mode, data.as_slice()), (0o100_755, &b"INIT"[..])),
                "dev/console" => assert_eq!(*mode, 0o020_600),
                "bin" => assert_eq!(*mode, 0o040_755),
                _ => {}
            }
        }
    }

    #[test]
    fn same_input_same_bytes_and_fixed_gzip_header() {
        let a = uvm(vec![1; 1000], vec![2; 5000]).unwrap().to_gz().unwrap();
        let b = uvm(vec![1; 1000], vec![2; 5000]).unwrap().to_gz().unwrap();
        assert_eq!(a, b);
        // gzip magic, deflate, no flags, mtime 0.
        assert_eq!(&a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        let c = uvm(vec![1; 1000], vec![3; 5000]).unwrap().to_gz().unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn bad_paths_and_missing_parents_are_refused() {
        let mut initrd = Initrd::new();
        for bad in ["", "/init", "a/../b", "./a", "a//b", "a/"] {
            assert!(matches!(initrd.dir(bad, 0o755), Err(InitrdError::BadPath(_))), "{bad}");
        }
        initrd.file("etc/passwd", 0o644, Vec::new()).unwrap();
        assert!(matches!(initrd.to_gz(), Err(InitrdError::MissingParent { .. })));
        assert!(matches!(initrd.file("etc/passwd", 0o644, Vec::new()), Err(InitrdError::Duplicate(_))));
    }

    #[test]
    fn listing_has_hashes() {
        let listing = uvm(b"INIT".to_vec(), b"AGENT".to_vec()).unwrap().listing();
        let init = listing.iter().find(|l| l.path == "init").unwrap();
        assert_eq!(init.size, Some(4));
        assert_eq!(init.sha256.as_deref(), Some(hex::encode(Sha256::digest(b"INIT")).as_str()));
        let console = listing.iter().find(|l| l.path == "dev/console").unwrap();
        assert_eq!(console.device.as_deref(), Some("5:1"));
    }
}
