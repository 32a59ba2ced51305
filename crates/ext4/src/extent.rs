//! Extent trees: up to 4 extents in the inode itself; more go to leaf blocks
//! of 340 entries under index nodes, the root (in the inode) indexing at
//! most 4 children.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::Error;
use crate::alloc::Allocator;
use crate::csum::crc32c_raw;
use crate::ondisk::{BLOCK_SIZE, EXTENT_MAGIC, ExtentHeader, ExtentIndex, ExtentLeaf};

/// Entries in the root node inside the inode (60 bytes).
const ROOT_ENTRIES: usize = 4;
/// Entries in a node block: `(4096 - 12) / 12`; the checksum follows them.
const BLOCK_ENTRIES: usize = (BLOCK_SIZE - size_of::<ExtentHeader>()) / size_of::<ExtentLeaf>();

/// `len` blocks of a file from logical block `logical` at physical `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u32,
    pub start: u32,
    pub len: u16,
}

/// A built tree: the inode's `i_block`, and the node blocks to write.
#[derive(Debug)]
pub(crate) struct Tree {
    pub root: [u8; 60],
    /// `(block, contents)`, ascending.
    pub blocks: Vec<(u64, Vec<u8>)>,
}

fn header(entries: usize, max: usize, depth: u16) -> Result<ExtentHeader, Error> {
    let mut h = ExtentHeader::new_zeroed();
    h.magic = U16::new(EXTENT_MAGIC);
    h.entries = U16::new(u16::try_from(entries).map_err(|_| Error::Internal("extent node overflow"))?);
    h.max = U16::new(max as u16);
    h.depth = U16::new(depth);
    Ok(h)
}

fn leaf(e: &Extent) -> ExtentLeaf {
    let mut l = ExtentLeaf::new_zeroed();
    l.block = U32::new(e.logical);
    l.len = U16::new(e.len);
    l.start_lo = U32::new(e.start);
    l
}

fn index(logical: u32, child: u32) -> ExtentIndex {
    let mut i = ExtentIndex::new_zeroed();
    i.block = U32::new(logical);
    i.leaf_lo = U32::new(child);
    i
}

/// A node's bytes: header then entries.
fn node<'a>(head: &ExtentHeader, entries: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = head.as_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

/// A node block with the checksum after its `BLOCK_ENTRIES` slots.
fn node_block(mut bytes: Vec<u8>, inode_seed: u32) -> Vec<u8> {
    let tail_at = size_of::<ExtentHeader>() + BLOCK_ENTRIES * size_of::<ExtentLeaf>();
    bytes.resize(tail_at, 0);
    let csum = crc32c_raw(inode_seed, &bytes);
    bytes.extend_from_slice(&csum.to_le_bytes());
    bytes.resize(BLOCK_SIZE, 0);
    bytes
}

fn root_bytes(bytes: &[u8]) -> Result<[u8; 60], Error> {
    let mut root = [0u8; 60];
    root.get_mut(..bytes.len()).ok_or(Error::Internal("extent root overflow"))?.copy_from_slice(bytes);
    Ok(root)
}

/// Build the tree for `extents` (ascending, contiguous logical blocks),
/// allocating node blocks from `alloc`.
pub(crate) fn build(extents: &[Extent], alloc: &mut Allocator, inode_seed: u32) -> Result<Tree, Error> {
    if extents.len() <= ROOT_ENTRIES {
        let leaves: Vec<ExtentLeaf> = extents.iter().map(leaf).collect();
        let bytes = node(&header(extents.len(), ROOT_ENTRIES, 0)?, leaves.iter().map(IntoBytes::as_bytes));
        return Ok(Tree { root: root_bytes(&bytes)?, blocks: Vec::new() });
    }
    let mut blocks = Vec::new();
    // (first logical block, node block) of the level being built.
    let mut level: Vec<(u32, u32)> = Vec::new();
    for chunk in extents.chunks(BLOCK_ENTRIES) {
        let leaves: Vec<ExtentLeaf> = chunk.iter().map(leaf).collect();
        let bytes = node(&header(chunk.len(), BLOCK_ENTRIES, 0)?, leaves.iter().map(IntoBytes::as_bytes));
        let (at, _) = alloc.take(1)?;
        let first = chunk.first().map(|e| e.logical).unwrap_or_default();
        level.push((first, u32::try_from(at).map_err(|_| Error::Internal("block number over 32 bits"))?));
        blocks.push((at, node_block(bytes, inode_seed)));
    }
    let mut depth = 1u16;
    while level.len() > ROOT_ENTRIES {
        let mut up = Vec::new();
        for chunk in level.chunks(BLOCK_ENTRIES) {
            let idx: Vec<ExtentIndex> = chunk.iter().map(|&(l, b)| index(l, b)).collect();
            let bytes = node(&header(chunk.len(), BLOCK_ENTRIES, depth)?, idx.iter().map(IntoBytes::as_bytes));
            let (at, _) = alloc.take(1)?;
            let first = chunk.first().map(|e| e.0).unwrap_or_default();
            up.push((first, u32::try_from(at).map_err(|_| Error::Internal("block number over 32 bits"))?));
            blocks.push((at, node_block(bytes, inode_seed)));
        }
        level = up;
        depth += 1;
    }
    let idx: Vec<ExtentIndex> = level.iter().map(|&(l, b)| index(l, b)).collect();
    let bytes = node(&header(level.len(), ROOT_ENTRIES, depth)?, idx.iter().map(IntoBytes::as_bytes));
    Ok(Tree { root: root_bytes(&bytes)?, blocks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extents(n: u32) -> Vec<Extent> {
        (0..n).map(|i| Extent { logical: i * 10, start: 1000 + i * 20, len: 10 }).collect()
    }

    #[test]
    fn small_trees_live_in_the_inode() {
        let mut a = Allocator::new(2, u64::MAX, u64::MAX);
        let t = build(&extents(4), &mut a, 0).unwrap();
        assert!(t.blocks.is_empty());
        assert_eq!(t.root[6..8], [0, 0]); // depth 0
    }

    #[test]
    fn large_trees_get_index_levels() {
        let mut a = Allocator::new(2, u64::MAX, u64::MAX);
        let t = build(&extents(5), &mut a, 0).unwrap();
        assert_eq!(t.blocks.len(), 1);
        let t = build(&extents(340 * 4 + 1), &mut a, 0).unwrap();
        // 5 leaves, one index block above them.
        assert_eq!(t.blocks.len(), 6);
        assert_eq!(t.root[6..8], [2, 0]); // depth 2
        assert!(t.blocks.iter().all(|(_, b)| b.len() == BLOCK_SIZE));
    }
}
