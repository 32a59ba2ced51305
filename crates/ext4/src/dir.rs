//! Linear directory blocks (no htree): entries packed in order, the last
//! entry of a block stretched to the checksum tail.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::csum::crc32c_raw;
use crate::ondisk::{BLOCK_SIZE, DirEntryHead, DirTail, FT_DIR_CSUM, round4};

/// Bytes of a block that entries may use; the tail takes the rest.
const USABLE: usize = BLOCK_SIZE - size_of::<DirTail>();

/// One directory entry to write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry<'a> {
    pub ino: u32,
    pub file_type: u8,
    pub name: &'a [u8],
}

fn rec_len(name: &[u8]) -> usize {
    round4(size_of::<DirEntryHead>() + name.len())
}

fn push_entry(block: &mut Vec<u8>, entry: &Entry<'_>, rec_len: usize) -> Option<()> {
    let mut head = DirEntryHead::new_zeroed();
    head.inode = U32::new(entry.ino);
    head.rec_len = U16::new(u16::try_from(rec_len).ok()?);
    head.name_len = u8::try_from(entry.name.len()).ok()?;
    head.file_type = entry.file_type;
    let start = block.len();
    block.extend_from_slice(head.as_bytes());
    block.extend_from_slice(entry.name);
    block.resize(start + rec_len, 0);
    Some(())
}

fn close_block(out: &mut Vec<u8>, block: &mut Vec<u8>, inode_seed: u32) {
    let mut tail = DirTail::new_zeroed();
    tail.rec_len = U16::new(size_of::<DirTail>() as u16);
    tail.file_type = FT_DIR_CSUM;
    tail.checksum = U32::new(crc32c_raw(inode_seed, block));
    out.append(block);
    out.extend_from_slice(tail.as_bytes());
}

/// The blocks of a directory holding `entries` (`.` and `..` first), each
/// closed by a checksum tail seeded with the directory inode's seed.
pub(crate) fn blocks<'a>(entries: impl Iterator<Item = Entry<'a>>, inode_seed: u32) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    let mut pending: Option<Entry<'a>> = None;
    for entry in entries {
        if let Some(prev) = pending.take() {
            let prev_len = rec_len(prev.name);
            if block.len() + prev_len + rec_len(entry.name) <= USABLE {
                push_entry(&mut block, &prev, prev_len)?;
            } else {
                let rest = USABLE - block.len();
                push_entry(&mut block, &prev, rest)?;
                close_block(&mut out, &mut block, inode_seed);
            }
        }
        pending = Some(entry);
    }
    if let Some(last) = pending {
        let rest = USABLE - block.len();
        push_entry(&mut block, &last, rest)?;
        close_block(&mut out, &mut block, inode_seed);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_and_chained() {
        let names: Vec<Vec<u8>> = (0..2000).map(|i| format!("entry-{i}").into_bytes()).collect();
        let all = || {
            [&b"."[..], b".."].into_iter().chain(names.iter().map(Vec::as_slice)).map(|name| Entry {
                ino: 11,
                file_type: 1,
                name,
            })
        };
        let data = blocks(all(), 0).unwrap();
        assert_eq!(data.len() % BLOCK_SIZE, 0);
        // Walk every block's rec_len chain: it ends exactly at the tail.
        let mut seen = 0;
        for block in data.chunks(BLOCK_SIZE) {
            let mut at = 0;
            while at < USABLE {
                let rec = u16::from_le_bytes([block[at + 4], block[at + 5]]) as usize;
                assert!(rec >= 12 && at + rec <= USABLE);
                at += rec;
                seen += 1;
            }
            assert_eq!(at, USABLE);
            assert_eq!(block[USABLE + 7], FT_DIR_CSUM);
        }
        assert_eq!(seen, names.len() + 2);
    }
}
