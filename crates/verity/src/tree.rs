//! Building and checking the tree in one streaming pass over the data.
//!
//! Each level keeps the one hash block it is filling. A data block's digest
//! goes into level 0; when a level's block is full it is written at its place
//! on the hash device and its own digest goes one level up. After the last
//! data block the partial blocks are flushed bottom up, zero padded. The
//! digest of the top block is the root hash. Memory: one data block plus one
//! hash block per level (at most a few dozen KiB with 4 KiB blocks).

use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;

use crate::superblock::{SUPERBLOCK_LEN, Superblock};
use crate::{Error, HashAlgorithm, Layout, Params, RootHash};

/// The result of [`format()`] and [`format_appended`]: the root hash and the layout that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formatted {
    /// The root hash, for the dm-verity table or `veritysetup verify`.
    pub root_hash: RootHash,
    /// Data block count, hash offset, tree offset and sizes.
    pub layout: Layout,
}

/// Build the hash area for `data_size` bytes read from `data` and write it to
/// `hash_area`, as `veritysetup format` would write it to its hash device.
///
/// `hash_area`'s position when called is byte `hash_offset` of the hash
/// device (what `veritysetup --hash-offset` names; 0 for a separate hash
/// file). The superblock goes there, padded to the next hash block boundary
/// of the device, and the tree follows; on return the position is the end
/// of the hash area. `data_size` must be a whole number of data blocks and
/// `data` must hold exactly that many bytes.
/// On an error the hash area may be partly written.
pub fn format<R: Read, W: Write + Seek>(
    params: &Params,
    mut data: R,
    data_size: u64,
    mut hash_area: W,
    hash_offset: u64,
) -> Result<Formatted, Error> {
    let layout = Layout::for_data_size(params, data_size, hash_offset)?;
    let base = hash_area.stream_position().map_err(Error::WriteHash)?;
    let mut io = Split { data: &mut data, out: Some(Positioned { out: &mut hash_area, base, hash_offset }) };
    let root_hash = build(params, &layout, &mut io)?;
    io.check_end(&layout)?;
    let end = base.checked_add(layout.hash_area_size()).ok_or(Error::TooLarge(layout.data_blocks()))?;
    hash_area.seek(SeekFrom::Start(end)).map_err(Error::WriteHash)?;
    hash_area.flush().map_err(Error::WriteHash)?;
    Ok(Formatted { root_hash, layout })
}

/// Append the hash area to `file`, which holds the data and nothing else:
/// the data size is the file's length and the superblock goes right after
/// the data, so `veritysetup verify --hash-offset <data size> F F <root>`
/// accepts the result. Reads and writes go through the one handle.
pub fn format_appended<F: Read + Write + Seek>(params: &Params, file: &mut F) -> Result<Formatted, Error> {
    let data_size = file.seek(SeekFrom::End(0)).map_err(Error::ReadData)?;
    let layout = Layout::for_data_size(params, data_size, data_size)?;
    let mut io = Shared { file: &mut *file, position: Some(data_size), read_at: 0 };
    let root_hash = build(params, &layout, &mut io)?;
    let end = data_size.checked_add(layout.hash_area_size()).ok_or(Error::TooLarge(layout.data_blocks()))?;
    file.seek(SeekFrom::Start(end)).map_err(Error::WriteHash)?;
    file.flush().map_err(Error::WriteHash)?;
    Ok(Formatted { root_hash, layout })
}

/// [`format_appended`] with the data blocks' digests already computed
/// (`leaves[i]` = [`data_block_digest`] of block `i`, for example by a thread
/// that hashed the data while it was being written): only the upper levels
/// are computed here, and the data is not read again.
pub fn format_appended_with_leaves<F: Read + Write + Seek>(
    params: &Params,
    file: &mut F,
    leaves: &[[u8; 32]],
) -> Result<Formatted, Error> {
    let data_size = file.seek(SeekFrom::End(0)).map_err(Error::ReadData)?;
    let layout = Layout::for_data_size(params, data_size, data_size)?;
    if leaves.len() as u64 != layout.data_blocks() {
        return Err(Error::DataShort { read: leaves.len() as u64, expected: layout.data_blocks() });
    }
    let mut io = Shared { file: &mut *file, position: Some(data_size), read_at: 0 };
    let root_hash = build_from(params, &layout, &mut io, Some(leaves))?;
    let end = data_size.checked_add(layout.hash_area_size()).ok_or(Error::TooLarge(layout.data_blocks()))?;
    file.seek(SeekFrom::Start(end)).map_err(Error::WriteHash)?;
    file.flush().map_err(Error::WriteHash)?;
    Ok(Formatted { root_hash, layout })
}

/// The digest of one data block as it enters the tree: `digest(salt || block)`.
pub fn data_block_digest(params: &Params, block: &[u8]) -> [u8; 32] {
    salted_digest(params.hash, &params.salt, block)
}

/// The root hash of `data_size` bytes read from `data`, writing nothing.
pub fn root_hash<R: Read>(params: &Params, mut data: R, data_size: u64) -> Result<RootHash, Error> {
    let layout = Layout::for_data_size(params, data_size, 0)?;
    let mut io = Split::<_, io::Empty> { data: &mut data, out: None };
    let root = build(params, &layout, &mut io)?;
    io.check_end(&layout)?;
    Ok(root)
}

/// Recompute the root hash of `data_size` bytes read from `data` and compare
/// it with `expected`.
pub fn verify<R: Read>(params: &Params, data: R, data_size: u64, expected: &RootHash) -> Result<(), Error> {
    let actual = root_hash(params, data, data_size)?;
    if actual == *expected { Ok(()) } else { Err(Error::RootMismatch { expected: *expected, actual }) }
}

/// Where the data comes from and the hash blocks go.
trait Io {
    /// Fill `block` with the next data block.
    fn read_data(&mut self, block: &mut [u8]) -> io::Result<()>;
    /// Write `bytes` at byte `offset` of the hash device.
    fn write_hash(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
}

/// Data and hash area on separate handles; no hash area when only hashing.
struct Split<'a, R, W> {
    data: &'a mut R,
    out: Option<Positioned<'a, W>>,
}

/// A writer whose position `base` is byte `hash_offset` of the hash device.
struct Positioned<'a, W> {
    out: &'a mut W,
    base: u64,
    hash_offset: u64,
}

impl<R: Read, W: Write + Seek> Io for Split<'_, R, W> {
    fn read_data(&mut self, block: &mut [u8]) -> io::Result<()> {
        self.data.read_exact(block)
    }

    fn write_hash(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let Some(target) = &mut self.out else { return Ok(()) };
        let at = offset
            .checked_sub(target.hash_offset)
            .and_then(|relative| relative.checked_add(target.base))
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "hash block before the hash offset"))?;
        target.out.seek(SeekFrom::Start(at))?;
        target.out.write_all(bytes)
    }
}

impl<R: Read, W> Split<'_, R, W> {
    /// Refuse data that goes on past the announced size.
    fn check_end(&mut self, layout: &Layout) -> Result<(), Error> {
        let mut byte = [0u8; 1];
        loop {
            match self.data.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(Error::DataLong { expected: layout.data_blocks() }),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(Error::ReadData(err)),
            }
        }
    }
}

/// Data and hash area in one file, read and written through one handle.
struct Shared<'a, F> {
    file: &'a mut F,
    /// The handle's position, when known.
    position: Option<u64>,
    /// Offset of the next data block.
    read_at: u64,
}

impl<F: Seek> Shared<'_, F> {
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        if self.position != Some(offset) {
            self.position = None;
            self.file.seek(SeekFrom::Start(offset))?;
            self.position = Some(offset);
        }
        Ok(())
    }

    fn advance(&mut self, len: usize) {
        self.position = self.position.and_then(|position| position.checked_add(len as u64));
    }
}

impl<F: Read + Write + Seek> Io for Shared<'_, F> {
    fn read_data(&mut self, block: &mut [u8]) -> io::Result<()> {
        self.seek_to(self.read_at)?;
        self.position = None;
        self.file.read_exact(block)?;
        self.position = Some(self.read_at);
        self.advance(block.len());
        self.read_at += block.len() as u64;
        Ok(())
    }

    fn write_hash(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.seek_to(offset)?;
        self.position = None;
        self.file.write_all(bytes)?;
        self.position = Some(offset);
        self.advance(bytes.len());
        Ok(())
    }
}

/// `digest(salt || block)`: format version 1, for data and hash blocks alike.
fn salted_digest(hash: HashAlgorithm, salt: &[u8], block: &[u8]) -> [u8; 32] {
    match hash {
        HashAlgorithm::Sha256 => Sha256::new().chain_update(salt).chain_update(block).finalize().into(),
    }
}

/// The hash block a level is filling.
struct Pending {
    block: Vec<u8>,
    /// Digests in `block`.
    filled: u32,
    /// Hash device block index where `block` goes.
    next_block: u64,
}

/// Block geometry shared by every level.
struct Shape<'a> {
    params: &'a Params,
    hashes_per_block: u32,
    digest_stride: usize,
    hash_block_size: u64,
}

impl Shape<'_> {
    /// Write a level's block at its place, zero it for the next one, and
    /// return its digest.
    fn flush(&self, level: &mut Pending, io: &mut impl Io) -> Result<[u8; 32], Error> {
        let offset = level
            .next_block
            .checked_mul(self.hash_block_size)
            .ok_or_else(|| Error::WriteHash(io::Error::new(ErrorKind::InvalidInput, "hash offset overflow")))?;
        io.write_hash(offset, &level.block).map_err(Error::WriteHash)?;
        let digest = salted_digest(self.params.hash, &self.params.salt, &level.block);
        level.block.fill(0);
        level.filled = 0;
        level.next_block += 1;
        Ok(digest)
    }

    /// Add `digest` to the lowest of `levels`, flushing full blocks upwards.
    /// Returns the root hash once the top block is flushed; with no levels
    /// at all, `digest` is the root hash.
    fn push(
        &self,
        mut levels: &mut [Pending],
        mut digest: [u8; 32],
        io: &mut impl Io,
    ) -> Result<Option<[u8; 32]>, Error> {
        loop {
            let Some((level, upper)) = levels.split_first_mut() else { return Ok(Some(digest)) };
            if let Some(slot) = level.block.chunks_exact_mut(self.digest_stride).nth(level.filled as usize) {
                for (dst, src) in slot.iter_mut().zip(digest) {
                    *dst = src;
                }
            }
            level.filled += 1;
            if level.filled < self.hashes_per_block {
                return Ok(None);
            }
            digest = self.flush(level, io)?;
            levels = upper;
        }
    }
}

/// Write the superblock and the tree, and return the root hash.
fn build(params: &Params, layout: &Layout, io: &mut impl Io) -> Result<RootHash, Error> {
    build_from(params, layout, io, None)
}

/// [`build`], reading and hashing the data blocks unless their digests are given.
fn build_from(
    params: &Params,
    layout: &Layout,
    io: &mut impl Io,
    leaves: Option<&[[u8; 32]]>,
) -> Result<RootHash, Error> {
    let hash_block_size = layout.hash_block_size() as usize;
    let shape = Shape {
        params,
        hashes_per_block: layout.hashes_per_block(),
        digest_stride: layout.digest_stride() as usize,
        hash_block_size: u64::from(layout.hash_block_size()),
    };

    // The superblock, zero padded up to the tree.
    let mut head = Superblock::new(params, layout.data_blocks())?.as_bytes().to_vec();
    let head_len = layout.tree_offset() - layout.hash_offset();
    head.resize(usize::try_from(head_len).unwrap_or(SUPERBLOCK_LEN), 0);
    io.write_hash(layout.hash_offset(), &head).map_err(Error::WriteHash)?;

    let mut levels: Vec<Pending> = layout
        .levels()
        .iter()
        .map(|level| Pending { block: vec![0; hash_block_size], filled: 0, next_block: level.first_block })
        .collect();
    let mut root = None;
    let mut data = vec![0u8; if leaves.is_some() { 0 } else { params.data_block_size as usize }];
    for index in 0..layout.data_blocks() {
        let digest = match leaves {
            Some(leaves) => *usize::try_from(index)
                .ok()
                .and_then(|i| leaves.get(i))
                .ok_or(Error::DataShort { read: index, expected: layout.data_blocks() })?,
            None => {
                io.read_data(&mut data).map_err(|err| match err.kind() {
                    ErrorKind::UnexpectedEof => Error::DataShort { read: index, expected: layout.data_blocks() },
                    _ => Error::ReadData(err),
                })?;
                salted_digest(params.hash, &params.salt, &data)
            }
        };
        root = shape.push(&mut levels, digest, io)?.or(root);
    }
    for lowest in 0..levels.len() {
        let Some((level, upper)) = levels.get_mut(lowest..).and_then(|rest| rest.split_first_mut()) else { break };
        if level.filled > 0 {
            let digest = shape.flush(level, io)?;
            root = shape.push(upper, digest, io)?.or(root);
        }
    }
    // Every level ends with exactly the blocks the layout gave it.
    let complete = levels.iter().zip(layout.levels()).all(|(pending, level)| {
        pending.filled == 0 && level.first_block.checked_add(level.blocks) == Some(pending.next_block)
    });
    match root {
        Some(root) if complete => Ok(RootHash::from_bytes(root)),
        _ => Err(Error::WriteHash(io::Error::other("hash tree does not match its layout"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// Deterministic bytes without a dependency (splitmix64).
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// The tree built the obvious way: every level in memory, laid out by hand.
    fn reference(params: &Params, data: &[u8], hash_offset: u64) -> (RootHash, Vec<u8>) {
        let salted = |block: &[u8]| salted_digest(params.hash, &params.salt, block);
        let hash_block = params.hash_block_size as usize;
        let per = {
            let mut per = hash_block / 32;
            while !per.is_power_of_two() {
                per -= 1;
            }
            per
        };
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut digests: Vec<[u8; 32]> = data.chunks(params.data_block_size as usize).map(salted).collect();
        while digests.len() > 1 {
            let mut level = Vec::new();
            for group in digests.chunks(per) {
                let mut block = vec![0u8; hash_block];
                for (i, digest) in group.iter().enumerate() {
                    block[i * 32..i * 32 + 32].copy_from_slice(digest);
                }
                level.extend_from_slice(&block);
            }
            digests = level.chunks(hash_block).map(salted).collect();
            levels.push(level);
        }
        let mut area =
            Superblock::new(params, (data.len() / params.data_block_size as usize) as u64).unwrap().as_bytes().to_vec();
        let tree_start = (hash_offset as usize + 512).div_ceil(hash_block) * hash_block;
        area.resize(tree_start - hash_offset as usize, 0);
        for level in levels.iter().rev() {
            area.extend_from_slice(level);
        }
        (RootHash::from_bytes(digests[0]), area)
    }

    fn format_to_vec(params: &Params, data: &[u8], hash_offset: u64) -> (Formatted, Vec<u8>) {
        let mut out = Cursor::new(Vec::new());
        let formatted = format(params, data, data.len() as u64, &mut out, hash_offset).unwrap();
        assert_eq!(out.position(), formatted.layout.hash_area_size());
        (formatted, out.into_inner())
    }

    #[test]
    fn streaming_matches_the_reference() {
        let small = Params { data_block_size: 512, hash_block_size: 1024, ..Params::new(vec![1, 2, 3], [9; 16]) };
        let tiny = Params { data_block_size: 1024, hash_block_size: 512, salt: Vec::new(), ..small.clone() };
        let cases = [
            (Params::new(b"parma".to_vec(), [1; 16]), [1, 2, 127, 128, 129, 300]),
            (small, [1, 31, 32, 33, 32 * 32 + 1, 3000]),
            (tiny, [1, 16, 17, 256, 257, 4097]),
        ];
        for (params, block_counts) in cases {
            for blocks in block_counts {
                for hash_offset in [0, 512, 3 * 4096] {
                    let data = bytes(blocks, blocks as usize * params.data_block_size as usize);
                    let (formatted, area) = format_to_vec(&params, &data, hash_offset);
                    let (root, expected) = reference(&params, &data, hash_offset);
                    assert_eq!(formatted.root_hash, root, "{params:?} {blocks} blocks at {hash_offset}");
                    assert!(area == expected, "{params:?} {blocks} blocks at {hash_offset}");
                    assert_eq!(formatted.layout.data_blocks(), blocks);
                    assert_eq!(root_hash(&params, &data[..], data.len() as u64).unwrap(), root);
                }
            }
        }
    }

    /// Known answer from `veritysetup format --hash sha256 --data-block-size 4096
    /// --hash-block-size 4096 --salt 7061726d61 --uuid 01020304-0506-0708-090a-0b0c0d0e0f10`
    /// over 129 zero blocks (cryptsetup 2.6.1).
    #[test]
    fn known_answer_from_veritysetup() {
        let params = Params::new(b"parma".to_vec(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        let data = vec![0u8; 129 * 4096];
        let (formatted, area) = format_to_vec(&params, &data, 0);
        assert_eq!(formatted.root_hash.to_hex(), KNOWN_ROOT);
        assert_eq!(area.len(), 16384);
        assert_eq!(hex::encode(Sha256::digest(&area)), KNOWN_AREA_SHA256);
    }
    const KNOWN_ROOT: &str = "6ab79ec29641c242c5ade32a271c2d144a44681354cf49e891f6fa09962b419f";
    const KNOWN_AREA_SHA256: &str = "0dfb7a35a1d5fd50c956784477f90d51333ab82b3d64098073eab67264575b15";

    #[test]
    fn appended_equals_separate() {
        let params = Params::new(b"layer".to_vec(), [3; 16]);
        for blocks in [1u64, 129, 1000] {
            let data = bytes(blocks + 100, blocks as usize * 4096);
            let (separate, area) = format_to_vec(&params, &data, data.len() as u64);
            let mut file = Cursor::new(data.clone());
            let appended = format_appended(&params, &mut file).unwrap();
            assert_eq!(appended, separate);
            assert_eq!(file.position(), (data.len() + area.len()) as u64);
            let image = file.into_inner();
            assert_eq!(&image[..data.len()], &data[..]);
            assert!(image[data.len()..] == area[..]);
        }
    }

    #[test]
    fn given_leaves_equal_reading_the_data() {
        let params = Params::new(vec![0x5a; 32], [1; 16]);
        for blocks in [1usize, 2, 127, 128, 129, 128 * 128 + 3] {
            let data = bytes(blocks as u64, blocks * 4096);
            let (expected, hash_area) = format_to_vec(&params, &data, data.len() as u64);
            let expected_file = [data.as_slice(), &hash_area].concat();
            let leaves: Vec<[u8; 32]> = data.chunks(4096).map(|b| data_block_digest(&params, b)).collect();
            let mut file = Cursor::new(data.clone());
            let formatted = format_appended_with_leaves(&params, &mut file, &leaves).unwrap();
            assert_eq!(formatted, expected, "{blocks} blocks");
            assert_eq!(file.into_inner(), expected_file, "{blocks} blocks");
            let mut short = Cursor::new(data.clone());
            assert!(matches!(
                format_appended_with_leaves(&params, &mut short, &leaves[1..]),
                Err(Error::DataShort { .. })
            ));
        }
    }

    #[test]
    fn verify_detects_a_flipped_byte() {
        let params = Params::new(Vec::new(), [0; 16]);
        let mut data = bytes(5, 200 * 4096);
        let root = root_hash(&params, &data[..], data.len() as u64).unwrap();
        verify(&params, &data[..], data.len() as u64, &root).unwrap();
        data[123_456] ^= 1;
        let err = verify(&params, &data[..], data.len() as u64, &root).unwrap_err();
        assert!(matches!(err, Error::RootMismatch { expected, .. } if expected == root));
    }

    #[test]
    fn wrong_data_sizes_are_refused() {
        let params = Params::new(Vec::new(), [0; 16]);
        let data = vec![0u8; 3 * 4096];
        let sink = || Cursor::new(Vec::new());
        assert!(matches!(
            format(&params, &data[..], 4096 * 4, sink(), 0),
            Err(Error::DataShort { read: 3, expected: 4 })
        ));
        assert!(matches!(format(&params, &data[..], 4096 * 2, sink(), 0), Err(Error::DataLong { expected: 2 })));
        assert!(matches!(format(&params, &data[..], 100, sink(), 0), Err(Error::PartialBlock { .. })));
        assert!(matches!(format(&params, &data[..], 0, sink(), 0), Err(Error::NoData)));
        assert!(matches!(
            format_appended(&params, &mut Cursor::new(vec![0u8; 4097])),
            Err(Error::PartialBlock { size: 4097, .. })
        ));
        assert!(matches!(root_hash(&params, &data[..], 4096 * 2), Err(Error::DataLong { .. })));
    }
}
