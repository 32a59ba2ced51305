//! dm-verity hash trees, computed byte for byte as `veritysetup format` does
//! (cryptsetup hash format version 1, with an on-disk superblock).
//!
//! It is a crate of its own because two builds must agree on it exactly: the
//! host-side layer builder, which turns each container layer into an ext4
//! image with a verity hash area appended, and the guest, which checks the
//! same trees. It must not depend on tokio or on anything host- or guest-only,
//! and it does no I/O of its own beyond the `std::io` traits the caller hands
//! in: no paths, no processes, no device-mapper.
//!
//! # Layout
//!
//! The hash area starts at `hash_offset` on the hash device (0 for a separate
//! hash file, the data size when it is appended to the data):
//!
//! ```text
//! hash_offset        superblock (512 bytes), zero padded to a hash block boundary
//! tree_offset        level n-1: the single top block
//!                    level n-2 ...
//!                    level 0: one digest per data block
//! ```
//!
//! Every digest is `sha256(salt || block)`, both for data blocks and for hash
//! blocks; a hash block holds `hash_block_size / digest_size` digests rounded
//! down to a power of two, and its tail is zero. The root hash is the digest
//! of the top block, or of the only data block when there is just one (then
//! there is no tree at all). See [`Layout`] for the arithmetic.
//!
//! Everything is deterministic: the caller supplies the salt and the UUID.
//! Hashing streams: memory is one data block plus one hash block per level.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod layout;
mod superblock;
mod tree;

use std::fmt;

pub use layout::{Layout, Level};
pub use superblock::{SIGNATURE, SUPERBLOCK_LEN, Superblock};
pub use tree::{Formatted, data_block_digest, format, format_appended, format_appended_with_leaves, root_hash, verify};

/// The digest algorithm of the tree. Only SHA-256 is supported; it is named
/// explicitly because it is written into the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum HashAlgorithm {
    /// SHA-256, written as `sha256` in the superblock.
    #[default]
    Sha256,
}

impl HashAlgorithm {
    /// The name cryptsetup uses (`--hash`, and the superblock's `algorithm`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
        }
    }

    /// Digest size in bytes.
    pub const fn digest_size(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
        }
    }

    /// The algorithm whose [`name`](Self::name) this is.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(HashAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// Largest salt the superblock can hold.
pub const MAX_SALT_LEN: usize = 256;
/// Smallest data or hash block size cryptsetup accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest data or hash block size cryptsetup accepts.
pub const MAX_BLOCK_SIZE: u32 = 512 * 1024;
/// The block size the layer images use, for data and hashes alike.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// What `veritysetup format` is told: algorithm, block sizes, salt and UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Digest algorithm (`--hash`).
    pub hash: HashAlgorithm,
    /// Data block size in bytes (`--data-block-size`): a power of two from 512 to 512 KiB.
    pub data_block_size: u32,
    /// Hash block size in bytes (`--hash-block-size`): a power of two from 512 to 512 KiB.
    pub hash_block_size: u32,
    /// Salt (`--salt`), at most [`MAX_SALT_LEN`] bytes; may be empty.
    pub salt: Vec<u8>,
    /// UUID stored in the superblock (`--uuid`), as its 16 raw bytes.
    pub uuid: [u8; 16],
}

impl Params {
    /// SHA-256 with 4 KiB data and hash blocks: what the layer images use.
    pub fn new(salt: Vec<u8>, uuid: [u8; 16]) -> Self {
        Params {
            hash: HashAlgorithm::Sha256,
            data_block_size: DEFAULT_BLOCK_SIZE,
            hash_block_size: DEFAULT_BLOCK_SIZE,
            salt,
            uuid,
        }
    }

    /// Check the limits cryptsetup enforces on block sizes and the salt.
    pub fn validate(&self) -> Result<(), Error> {
        for size in [self.data_block_size, self.hash_block_size] {
            if !size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
                return Err(Error::BlockSize(size));
            }
        }
        if self.salt.len() > MAX_SALT_LEN {
            return Err(Error::SaltTooLong(self.salt.len()));
        }
        Ok(())
    }
}

/// A root hash: what the kernel's dm-verity table and `veritysetup verify` take.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootHash([u8; 32]);

impl RootHash {
    /// Wrap raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        RootHash(bytes)
    }

    /// Parse the hex form `veritysetup` prints.
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| Error::RootHashText)?;
        Ok(RootHash(bytes))
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, as `veritysetup` prints it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootHash({self})")
    }
}

/// Why a hash tree could not be built, checked or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A block size is not a power of two from 512 bytes to 512 KiB.
    #[error("block size {0} is not a power of two from 512 to 524288 bytes")]
    BlockSize(u32),
    /// The salt is longer than the superblock can hold.
    #[error("salt is {0} bytes, more than the 256 the superblock holds")]
    SaltTooLong(usize),
    /// The hash offset is not a multiple of 512 bytes.
    #[error("hash offset {0} is not a multiple of 512 bytes")]
    HashOffset(u64),
    /// The data is not a whole number of data blocks.
    #[error("data size {size} is not a whole number of {block_size}-byte blocks")]
    PartialBlock {
        /// Data size in bytes.
        size: u64,
        /// Data block size in bytes.
        block_size: u32,
    },
    /// There is no data: dm-verity needs at least one block.
    #[error("no data blocks")]
    NoData,
    /// The data or the tree would not fit in 64-bit byte offsets.
    #[error("{0} data blocks do not fit in 64-bit offsets")]
    TooLarge(u64),
    /// The data reader ended before the announced size.
    #[error("data ended after {read} of {expected} blocks")]
    DataShort {
        /// Whole blocks read.
        read: u64,
        /// Blocks announced.
        expected: u64,
    },
    /// The data reader has more bytes than announced.
    #[error("data continues past the announced {expected} blocks")]
    DataLong {
        /// Blocks announced.
        expected: u64,
    },
    /// Reading the data failed.
    #[error("reading the data failed")]
    ReadData(#[source] std::io::Error),
    /// Writing the hash area failed.
    #[error("writing the hash area failed")]
    WriteHash(#[source] std::io::Error),
    /// The recomputed root hash differs from the expected one.
    #[error("root hash mismatch: expected {expected}, computed {actual}")]
    RootMismatch {
        /// The root hash the caller expected.
        expected: RootHash,
        /// The root hash of the data.
        actual: RootHash,
    },
    /// A root hash in text form is not 64 hex digits.
    #[error("a root hash is 64 hex digits")]
    RootHashText,
    /// A superblock is malformed or uses a format this crate does not build.
    #[error("invalid verity superblock: {0}")]
    Superblock(&'static str),
}
