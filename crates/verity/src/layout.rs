//! Where each level of the tree lies, derived as cryptsetup derives it
//! (`hash_levels` in `lib/verity/verity_hash.c`, restated here):
//!
//! - a hash block holds `2^bits` digests, where `bits = floor(log2(hash_block_size / digest_size))`;
//!   each digest takes its size rounded up to a power of two (format version 1);
//! - the number of levels is the smallest `n` with `(data_blocks - 1) >> (bits * n) == 0`,
//!   so one data block means no tree at all;
//! - level `i` (0 hashes the data) has `ceil(data_blocks / 2^(bits * (i + 1)))` blocks;
//! - the levels follow the superblock's hash block, top level first, each one
//!   directly after the other. Positions are absolute hash blocks of the hash
//!   device, so an unaligned `hash_offset` moves the tree to the next boundary.

use crate::superblock::SUPERBLOCK_LEN;
use crate::{Error, Params};

/// Deepest tree cryptsetup builds.
const MAX_LEVELS: usize = 63;

/// One level of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Index of its first block on the hash device, in hash blocks from the
    /// start of the device (not from `hash_offset`).
    pub first_block: u64,
    /// Number of hash blocks in the level.
    pub blocks: u64,
}

/// The shape of a hash area: how many data blocks it covers and where each
/// level of the tree lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_blocks: u64,
    data_block_size: u32,
    hash_block_size: u32,
    hash_offset: u64,
    hashes_per_block: u32,
    digest_stride: u32,
    /// `levels[0]` hashes the data; the last one is the single top block.
    levels: Vec<Level>,
    /// First hash block after the superblock.
    tree_block: u64,
    /// First hash block after the tree.
    end_block: u64,
}

impl Layout {
    /// The layout `veritysetup format` uses for `data_blocks` blocks with its
    /// superblock at byte `hash_offset` of the hash device.
    pub fn new(params: &Params, data_blocks: u64, hash_offset: u64) -> Result<Self, Error> {
        params.validate()?;
        if !hash_offset.is_multiple_of(512) {
            return Err(Error::HashOffset(hash_offset));
        }
        if data_blocks == 0 {
            return Err(Error::NoData);
        }
        data_blocks.checked_mul(u64::from(params.data_block_size)).ok_or(Error::TooLarge(data_blocks))?;

        let hash_block = u64::from(params.hash_block_size);
        let digest = params.hash.digest_size() as u64;
        // floor(log2(hash_block / digest)); at least 4 for SHA-256 in 512-byte blocks.
        let bits = (hash_block / digest)
            .checked_ilog2()
            .filter(|&bits| bits > 0)
            .ok_or(Error::BlockSize(params.hash_block_size))?;
        let digest_stride = digest.next_power_of_two();

        let mut count: u32 = 0;
        while bits.saturating_mul(count) < 64 && (data_blocks - 1).checked_shr(bits * count).unwrap_or(0) != 0 {
            count += 1;
        }
        if count as usize > MAX_LEVELS {
            return Err(Error::TooLarge(data_blocks));
        }

        let tree_block =
            hash_offset.checked_add(SUPERBLOCK_LEN as u64 + hash_block - 1).ok_or(Error::TooLarge(data_blocks))?
                / hash_block;
        let mut position = tree_block;
        let mut levels = Vec::with_capacity(count as usize);
        for level in (0..count).rev() {
            let shift = (level + 1) * bits;
            if shift > 63 {
                return Err(Error::TooLarge(data_blocks));
            }
            let blocks = data_blocks.div_ceil(1 << shift);
            levels.push(Level { first_block: position, blocks });
            position = position.checked_add(blocks).ok_or(Error::TooLarge(data_blocks))?;
        }
        levels.reverse();
        position.checked_mul(hash_block).ok_or(Error::TooLarge(data_blocks))?;

        Ok(Layout {
            data_blocks,
            data_block_size: params.data_block_size,
            hash_block_size: params.hash_block_size,
            hash_offset,
            hashes_per_block: 1 << bits,
            digest_stride: digest_stride as u32,
            levels,
            tree_block,
            end_block: position,
        })
    }

    /// The layout for `data_size` bytes of data, which must be whole blocks.
    pub fn for_data_size(params: &Params, data_size: u64, hash_offset: u64) -> Result<Self, Error> {
        params.validate()?;
        let block_size = u64::from(params.data_block_size);
        if !data_size.is_multiple_of(block_size) {
            return Err(Error::PartialBlock { size: data_size, block_size: params.data_block_size });
        }
        Layout::new(params, data_size / block_size, hash_offset)
    }

    /// Number of data blocks covered.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Data size in bytes.
    pub fn data_size(&self) -> u64 {
        // Checked in `new`.
        self.data_blocks * u64::from(self.data_block_size)
    }

    /// Hash block size in bytes.
    pub fn hash_block_size(&self) -> u32 {
        self.hash_block_size
    }

    /// Byte offset of the superblock on the hash device (`--hash-offset`).
    pub fn hash_offset(&self) -> u64 {
        self.hash_offset
    }

    /// Digests per hash block (a power of two).
    pub fn hashes_per_block(&self) -> u32 {
        self.hashes_per_block
    }

    /// Bytes each digest occupies in a hash block.
    pub fn digest_stride(&self) -> u32 {
        self.digest_stride
    }

    /// The levels, `[0]` hashing the data blocks, the last the single top
    /// block; on disk they lie in the opposite order. Empty for one data block.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Byte offset of the tree (its top level) on the hash device.
    pub fn tree_offset(&self) -> u64 {
        self.tree_block * u64::from(self.hash_block_size)
    }

    /// Size of the tree in bytes, all levels.
    pub fn tree_size(&self) -> u64 {
        (self.end_block - self.tree_block) * u64::from(self.hash_block_size)
    }

    /// Size of the hash area in bytes, from `hash_offset` to the end of the
    /// tree (what `veritysetup format` prints as "Hash device size").
    pub fn hash_area_size(&self) -> u64 {
        self.end_block * u64::from(self.hash_block_size) - self.hash_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params::new(b"salt".to_vec(), [7; 16])
    }

    fn levels(layout: &Layout) -> Vec<(u64, u64)> {
        layout.levels().iter().map(|level| (level.first_block, level.blocks)).collect()
    }

    #[test]
    fn one_block_has_no_tree() {
        let layout = Layout::new(&params(), 1, 0).unwrap();
        assert!(layout.levels().is_empty());
        assert_eq!(layout.tree_offset(), 4096);
        assert_eq!(layout.tree_size(), 0);
        assert_eq!(layout.hash_area_size(), 4096);
    }

    #[test]
    fn up_to_one_hash_block_is_one_level() {
        for blocks in [2, 127, 128] {
            let layout = Layout::new(&params(), blocks, 0).unwrap();
            assert_eq!(levels(&layout), [(1, 1)], "{blocks} blocks");
            assert_eq!(layout.hashes_per_block(), 128);
            assert_eq!(layout.tree_size(), 4096);
            assert_eq!(layout.hash_area_size(), 8192);
        }
    }

    #[test]
    fn one_more_block_adds_a_level_on_top() {
        let layout = Layout::new(&params(), 129, 0).unwrap();
        // Top level first on disk: level 1 at block 1, level 0 (2 blocks) at block 2.
        assert_eq!(levels(&layout), [(2, 2), (1, 1)]);
        assert_eq!(layout.hash_area_size(), 4 * 4096);

        let layout = Layout::new(&params(), 128 * 128, 0).unwrap();
        assert_eq!(levels(&layout), [(2, 128), (1, 1)]);
        assert_eq!(layout.hash_area_size(), 130 * 4096);

        let layout = Layout::new(&params(), 128 * 128 + 1, 0).unwrap();
        assert_eq!(levels(&layout), [(4, 129), (2, 2), (1, 1)]);
        assert_eq!(layout.tree_size(), 132 * 4096);
        assert_eq!(layout.hash_area_size(), 133 * 4096);
    }

    #[test]
    fn positions_are_absolute_on_the_hash_device() {
        // Superblock at 512: the tree still starts at the first 4 KiB boundary after it.
        let layout = Layout::new(&params(), 129, 512).unwrap();
        assert_eq!(levels(&layout), [(2, 2), (1, 1)]);
        assert_eq!(layout.hash_area_size(), 4 * 4096 - 512);

        // Appended to 1000 data blocks.
        let layout = Layout::new(&params(), 1000, 1000 * 4096).unwrap();
        assert_eq!(layout.tree_offset(), 1001 * 4096);
        assert_eq!(levels(&layout), [(1002, 8), (1001, 1)]);
        assert_eq!(layout.hash_area_size(), 10 * 4096);
    }

    #[test]
    fn small_hash_blocks_hold_fewer_digests() {
        let params = Params { data_block_size: 512, hash_block_size: 512, ..params() };
        let layout = Layout::new(&params, 17, 0).unwrap();
        assert_eq!(layout.hashes_per_block(), 16);
        assert_eq!(levels(&layout), [(2, 2), (1, 1)]);
        let layout = Layout::new(&params, 16 * 16 * 16 + 1, 0).unwrap();
        assert_eq!(levels(&layout).len(), 4);
        assert_eq!(layout.levels().last().map(|level| level.blocks), Some(1));
    }

    #[test]
    fn the_deepest_tree_stays_in_range() {
        let params = Params { data_block_size: 512, hash_block_size: 512, ..params() };
        let layout = Layout::new(&params, u64::MAX / 512, 0).unwrap();
        assert_eq!(layout.levels().len(), 14);
        assert_eq!(layout.levels().last().map(|level| level.blocks), Some(1));
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(Layout::new(&params(), 0, 0), Err(Error::NoData)));
        assert!(matches!(Layout::new(&params(), 1, 100), Err(Error::HashOffset(100))));
        assert!(matches!(Layout::new(&params(), u64::MAX / 4096 + 1, 0), Err(Error::TooLarge(_))));
        assert!(matches!(Layout::new(&params(), 1, u64::MAX - 511), Err(Error::TooLarge(1))));
        assert!(matches!(
            Layout::for_data_size(&params(), 4097, 0),
            Err(Error::PartialBlock { size: 4097, block_size: 4096 })
        ));
        for size in [0, 256, 1000, 4095, 1 << 20] {
            let params = Params { hash_block_size: size, ..params() };
            assert!(matches!(Layout::new(&params, 1, 0), Err(Error::BlockSize(_))), "{size}");
        }
        let params = Params { salt: vec![0; 257], ..params() };
        assert!(matches!(Layout::new(&params, 1, 0), Err(Error::SaltTooLong(257))));
    }
}
