//! The on-disk verity superblock (cryptsetup's `struct verity_sb`), 512 bytes
//! at `hash_offset`, little endian:
//!
//! ```text
//! offset  size  field
//!      0     8  signature        "verity\0\0"
//!      8     4  version          superblock version, 1
//!     12     4  hash_type        hash format version, 1 (0 is Chrome OS, not built here)
//!     16    16  uuid             raw UUID bytes
//!     32    32  algorithm        "sha256", NUL padded
//!     64     4  data_block_size
//!     68     4  hash_block_size
//!     72     8  data_blocks
//!     80     2  salt_size        at most 256
//!     82     6  padding
//!     88   256  salt             zero padded
//!    344   168  padding
//! ```

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{Error, HashAlgorithm, MAX_SALT_LEN, Params};

/// The eight bytes a verity superblock starts with.
pub const SIGNATURE: [u8; 8] = *b"verity\0\0";
/// Size of [`Superblock`] on disk.
pub const SUPERBLOCK_LEN: usize = 512;
/// The superblock version cryptsetup writes.
const VERSION: u32 = 1;
/// Hash format version 1: `digest = hash(salt || block)`.
const HASH_TYPE: u32 = 1;

/// A verity superblock, exactly as on disk.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    /// Always [`SIGNATURE`].
    pub signature: [u8; 8],
    /// Superblock version, 1.
    pub version: U32,
    /// Hash format version, 1.
    pub hash_type: U32,
    /// UUID of the hash device, raw bytes.
    pub uuid: [u8; 16],
    /// Algorithm name, NUL padded.
    pub algorithm: [u8; 32],
    /// Data block size in bytes.
    pub data_block_size: U32,
    /// Hash block size in bytes.
    pub hash_block_size: U32,
    /// Number of data blocks covered.
    pub data_blocks: U64,
    /// Salt length in bytes.
    pub salt_size: U16,
    /// Zero.
    pub pad1: [u8; 6],
    /// Salt, zero padded.
    pub salt: [u8; 256],
    /// Zero.
    pub pad2: [u8; 168],
}

const _: () = assert!(core::mem::size_of::<Superblock>() == SUPERBLOCK_LEN);
const _: () = assert!(core::mem::offset_of!(Superblock, data_blocks) == 72);
const _: () = assert!(core::mem::offset_of!(Superblock, salt) == 88);

impl Superblock {
    /// The superblock `veritysetup format` writes for these parameters.
    pub fn new(params: &Params, data_blocks: u64) -> Result<Self, Error> {
        params.validate()?;
        let mut sb = Superblock::new_zeroed();
        sb.signature = SIGNATURE;
        sb.version.set(VERSION);
        sb.hash_type.set(HASH_TYPE);
        sb.uuid = params.uuid;
        for (dst, src) in sb.algorithm.iter_mut().zip(params.hash.name().bytes()) {
            *dst = src;
        }
        sb.data_block_size.set(params.data_block_size);
        sb.hash_block_size.set(params.hash_block_size);
        sb.data_blocks.set(data_blocks);
        // `validate` bounds the salt at 256 bytes.
        sb.salt_size.set(params.salt.len() as u16);
        for (dst, src) in sb.salt.iter_mut().zip(&params.salt) {
            *dst = *src;
        }
        Ok(sb)
    }

    /// Read and check a superblock from the first 512 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (sb, _) = Superblock::read_from_prefix(bytes).map_err(|_| Error::Superblock("shorter than 512 bytes"))?;
        sb.params()?;
        Ok(sb)
    }

    /// The parameters recorded in the superblock, checked.
    pub fn params(&self) -> Result<Params, Error> {
        if self.signature != SIGNATURE {
            return Err(Error::Superblock("bad signature"));
        }
        if self.version.get() != VERSION {
            return Err(Error::Superblock("unsupported superblock version"));
        }
        if self.hash_type.get() != HASH_TYPE {
            return Err(Error::Superblock("unsupported hash type"));
        }
        let name_len = self.algorithm.iter().position(|&byte| byte == 0).unwrap_or(self.algorithm.len());
        let (name, rest) = self.algorithm.split_at_checked(name_len).ok_or(Error::Superblock("bad algorithm"))?;
        let hash = std::str::from_utf8(name)
            .ok()
            .and_then(HashAlgorithm::from_name)
            .filter(|_| rest.iter().all(|&byte| byte == 0))
            .ok_or(Error::Superblock("unsupported algorithm"))?;
        let salt_size = usize::from(self.salt_size.get());
        if salt_size > MAX_SALT_LEN {
            return Err(Error::Superblock("salt longer than 256 bytes"));
        }
        let salt = self.salt.get(..salt_size).ok_or(Error::Superblock("salt longer than 256 bytes"))?.to_vec();
        let params = Params {
            hash,
            data_block_size: self.data_block_size.get(),
            hash_block_size: self.hash_block_size.get(),
            salt,
            uuid: self.uuid,
        };
        params.validate()?;
        Ok(params)
    }

    /// Number of data blocks covered.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params::new(vec![0xaa, 0xbb, 0xcc], *b"0123456789abcdef")
    }

    #[test]
    fn fields_lie_where_cryptsetup_puts_them() {
        let sb = Superblock::new(&params(), 0x0102_0304_0506_0708).unwrap();
        let bytes = sb.as_bytes();
        assert_eq!(bytes.len(), 512);
        assert_eq!(&bytes[0..8], b"verity\0\0");
        assert_eq!(&bytes[8..12], &[1, 0, 0, 0]);
        assert_eq!(&bytes[12..16], &[1, 0, 0, 0]);
        assert_eq!(&bytes[16..32], b"0123456789abcdef");
        assert_eq!(&bytes[32..40], b"sha256\0\0");
        assert!(bytes[38..64].iter().all(|&b| b == 0));
        assert_eq!(&bytes[64..68], &4096u32.to_le_bytes());
        assert_eq!(&bytes[68..72], &4096u32.to_le_bytes());
        assert_eq!(&bytes[72..80], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[80..82], &[3, 0]);
        assert!(bytes[82..88].iter().all(|&b| b == 0));
        assert_eq!(&bytes[88..91], &[0xaa, 0xbb, 0xcc]);
        assert!(bytes[91..].iter().all(|&b| b == 0));
    }

    #[test]
    fn parse_round_trips() {
        let sb = Superblock::new(&params(), 129).unwrap();
        let parsed = Superblock::parse(sb.as_bytes()).unwrap();
        assert_eq!(parsed, sb);
        assert_eq!(parsed.params().unwrap(), params());
        assert_eq!(parsed.data_blocks(), 129);
    }

    #[test]
    fn parse_refuses_what_it_does_not_build() {
        let good = Superblock::new(&params(), 1).unwrap();
        type Corrupt = fn(&mut Superblock);
        let cases: [(&str, Corrupt); 7] = [
            ("signature", |sb| sb.signature[0] = b'V'),
            ("version", |sb| sb.version.set(2)),
            ("hash type", |sb| sb.hash_type.set(0)),
            ("algorithm", |sb| sb.algorithm[3] = b'1'),
            ("trailing algorithm bytes", |sb| sb.algorithm[20] = b'x'),
            ("salt size", |sb| sb.salt_size.set(257)),
            ("block size", |sb| sb.data_block_size.set(1000)),
        ];
        for (name, corrupt) in cases {
            let mut sb = good.clone();
            corrupt(&mut sb);
            assert!(Superblock::parse(sb.as_bytes()).is_err(), "{name}");
        }
        assert!(Superblock::parse(&good.as_bytes()[..511]).is_err());
    }
}
