//! Read-only ext4 images for container layers, written straight from a
//! stream of entries: no `mkfs`, no mount, no root, no loop device.
//!
//! It exists as its own crate because the image format is a boundary of its
//! own: the host's layer conversion feeds it entries, the guest kernel mounts
//! what it writes under dm-verity, and the format is checked in isolation
//! against e2fsprogs (`e2fsck -fn`, `debugfs`). It must not depend on tar or
//! OCI (a later step adapts a tar stream to [`Writer`]), on host tools or
//! privileges, on a clock or randomness (the caller gives the UUID, the hash
//! seed and every timestamp; the same entries give the same bytes), or on
//! anything guest-only.
//!
//! # Format
//!
//! 4 KiB blocks, 256-byte inodes, features `ext_attr`, `filetype`,
//! `extent`, `flex_bg`, `sparse_super`, `large_file`, `dir_nlink`,
//! `extra_isize` and `metadata_csum` (crc32c on the superblock, group
//! descriptors, bitmaps, inodes, extent blocks, directory blocks and xattr
//! blocks). No journal, no `dir_index` (directories are linear), no
//! `64bit` (32-byte group descriptors; images stay under 16 TiB), no
//! `huge_file` (files stay under 1 TiB), no lost+found (nothing ever repairs
//! a read-only layer).
//!
//! # Layout and streaming
//!
//! ```text
//! block 0        superblock (at byte 1024)
//! blocks 1..=R   group descriptor table, R reserved for Options::max_image_size
//! then           file data, written as it arrives, in add order
//! at finish()    directories, extent index blocks, xattr blocks,
//!                block bitmaps, inode bitmaps, inode tables (flex_bg lets
//!                them live anywhere), then the superblock and descriptors
//! ```
//!
//! Groups 1, 3, 5, 7, 9, 25, ... start with a copy of the superblock and the
//! descriptor table (`sparse_super`); file data flows around those areas.
//! Memory grows with the number of entries (names, extents, attributes),
//! never with file contents.
//!
//! # Paths
//!
//! Paths are `/`-separated bytes, the leading `/` optional. Every parent
//! must already exist (nothing is created implicitly: a tar adapter creates
//! missing parents itself and fixes their metadata later with
//! [`Writer::set_metadata`]). Empty names, `.`, `..`, names with NUL or over
//! 255 bytes and duplicates are refused with an error naming the path.
//!
//! # Example
//!
//! ```
//! use parma_ext4::{Metadata, Options, Special, Writer, Xattr};
//!
//! let mut image = std::io::Cursor::new(Vec::new());
//! let mut w = Writer::new(&mut image, Options::new([1; 16], [2; 16]))?;
//! w.add_dir("/etc", &Metadata::new(0o755, 0, 0))?;
//! let hosts = b"127.0.0.1 localhost\n";
//! w.add_file("/etc/hosts", &Metadata::new(0o644, 0, 0), hosts.len() as u64, &hosts[..])?;
//! w.add_symlink("/etc/localtime", &Metadata::new(0o777, 0, 0), b"/usr/share/zoneinfo/UTC")?;
//! w.add_hard_link("/etc/hosts.bak", "/etc/hosts")?;
//! let mut opaque = Metadata::new(0o755, 0, 0);
//! opaque.xattrs.push(Xattr::new("trusted.overlay.opaque", "y"));
//! w.add_dir("/var", &opaque)?;
//! // An overlayfs whiteout.
//! w.add_special("/etc/motd", &Metadata::new(0, 0, 0), Special::CharDevice { major: 0, minor: 0 })?;
//! let size = w.finish()?;
//! assert_eq!(size % 4096, 0);
//! # Ok::<(), parma_ext4::Error>(())
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod alloc;
mod csum;
mod dir;
mod extent;
mod ondisk;
mod writer;
mod xattr;

pub use writer::{Metadata, Options, Special, Timestamp, Writer};
pub use xattr::Xattr;

/// Why an entry or the image was refused. Path and name fields are the
/// caller's bytes, lossily decoded for display.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path}: a name is longer than 255 bytes")]
    NameTooLong { path: String },
    #[error("{path}: parent directory does not exist")]
    ParentNotFound { path: String },
    #[error("{path}: parent is not a directory")]
    ParentNotDirectory { path: String },
    #[error("{path}: already exists")]
    AlreadyExists { path: String },
    #[error("{path}: does not exist")]
    NotFound { path: String },
    #[error("{path}: hard link target {target} does not exist")]
    LinkTargetNotFound { path: String, target: String },
    #[error("{path}: hard link target {target} is a directory")]
    LinkToDirectory { path: String, target: String },
    #[error("{path}: more than 65000 links")]
    TooManyLinks { path: String },
    #[error("{path}: mode {mode:#o} has bits outside 0o7777")]
    InvalidMode { path: String, mode: u32 },
    #[error("{path}: timestamp out of range (1901 to 2446, nanoseconds under 10^9)")]
    InvalidTimestamp { path: String },
    #[error("{path}: symlink target {reason}")]
    InvalidSymlink { path: String, reason: &'static str },
    #[error("{path}: device number {major}:{minor} out of range (major < 4096, minor < 2^20)")]
    InvalidDevice { path: String, major: u32, minor: u32 },
    #[error("{path}: extended attribute {name}: {reason}")]
    InvalidXattr { path: String, name: String, reason: &'static str },
    #[error("{path}: extended attributes do not fit in one block")]
    XattrsTooLarge { path: String },
    #[error("{path}: {size} bytes is over the 1 TiB file limit")]
    FileTooLarge { path: String, size: u64 },
    #[error("{path}: data ended after {read} of {expected} bytes")]
    ShortRead { path: String, read: u64, expected: u64 },
    #[error("{path}: reading the file data")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("too many inodes")]
    TooManyInodes,
    #[error("image over its maximum of {max} bytes")]
    ImageTooLarge { max: u64 },
    #[error("writing the image")]
    Write(#[source] std::io::Error),
    #[error("an earlier error left the image incomplete")]
    Poisoned,
    #[error("internal error: {0}")]
    Internal(&'static str),
}
