//! Extended attributes: names split into a namespace index and a suffix,
//! stored in the inode's spare bytes when they fit, else in one xattr block.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::csum::Csum;
use crate::ondisk::{BLOCK_SIZE, INODE_XATTR_AREA, XATTR_MAGIC, XattrBlockHeader, XattrEntryHead, round4};

/// One extended attribute as the VFS names it (`user.foo`,
/// `security.capability`, `trusted.overlay.opaque`,
/// `system.posix_acl_access`, ...) and its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Xattr {
    /// Full name with its namespace prefix.
    pub name: Vec<u8>,
    /// Value bytes. POSIX ACLs are given in the VFS format (as `getxattr`
    /// returns them and as tar carries them); they are stored in ext4's.
    pub value: Vec<u8>,
}

impl Xattr {
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Xattr { name: name.into(), value: value.into() }
    }
}

/// An attribute ready for disk: namespace index, name suffix, disk value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    index: u8,
    suffix: Box<[u8]>,
    value: Box<[u8]>,
}

/// Namespaces by prefix, as `ext4_xattr_handler_map` numbers them. The ACL
/// names are whole names (empty suffix).
const PREFIXES: [(&[u8], u8, bool); 5] = [
    (b"user.", 1, false),
    (b"system.posix_acl_access", 2, true),
    (b"system.posix_acl_default", 3, true),
    (b"trusted.", 4, false),
    (b"security.", 6, false),
];

/// Why a set of attributes was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// This attribute (full name) is invalid, for this reason.
    Invalid(Vec<u8>, &'static str),
    /// Together they do not fit in one block.
    TooLarge,
}

/// Check, convert and sort a set of attributes. Sorted as the kernel looks
/// them up in a block: by index, name length, name.
pub(crate) fn encode_all(xattrs: &[Xattr]) -> Result<Vec<Encoded>, Refusal> {
    let mut out = Vec::with_capacity(xattrs.len());
    for x in xattrs {
        out.push((encode(x).map_err(|reason| Refusal::Invalid(x.name.clone(), reason))?, &x.name));
    }
    out.sort_by(|(a, _), (b, _)| (a.index, a.suffix.len(), &a.suffix).cmp(&(b.index, b.suffix.len(), &b.suffix)));
    for pair in out.windows(2) {
        if let [(a, name), (b, _)] = pair
            && a.index == b.index
            && a.suffix == b.suffix
        {
            return Err(Refusal::Invalid((*name).clone(), "given twice"));
        }
    }
    let out: Vec<Encoded> = out.into_iter().map(|(e, _)| e).collect();
    if !fits_block(&out) {
        return Err(Refusal::TooLarge);
    }
    Ok(out)
}

fn encode(x: &Xattr) -> Result<Encoded, &'static str> {
    if x.name.contains(&0) {
        return Err("name contains NUL");
    }
    let (prefix, index, whole) = PREFIXES
        .iter()
        .find(|(p, _, whole)| if *whole { x.name.as_slice() == *p } else { x.name.starts_with(p) })
        .ok_or("namespace not supported (user., trusted., security., system.posix_acl_*)")?;
    let suffix = x.name.get(prefix.len()..).unwrap_or_default();
    if !whole && suffix.is_empty() {
        return Err("empty name after the namespace prefix");
    }
    if suffix.len() > 255 {
        return Err("name longer than 255 bytes after the prefix");
    }
    let value =
        if *whole { acl_to_disk(&x.value).ok_or("not a POSIX ACL in the VFS format")? } else { x.value.clone() };
    Ok(Encoded { index: *index, suffix: suffix.into(), value: value.into() })
}

/// POSIX ACL from the VFS xattr format (version 2, 8-byte entries) to ext4's
/// (version 1, 4-byte entries for the owner, group, mask and other entries,
/// 8-byte ones for named users and groups).
fn acl_to_disk(vfs: &[u8]) -> Option<Vec<u8>> {
    let (version, entries) = vfs.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for entry in entries.chunks_exact(8) {
        let (tag_perm, id) = entry.split_first_chunk::<4>()?;
        let tag = u16::from_le_bytes([tag_perm[0], tag_perm[1]]);
        match tag {
            // ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER
            0x01 | 0x04 | 0x10 | 0x20 => out.extend_from_slice(tag_perm),
            // ACL_USER, ACL_GROUP
            0x02 | 0x08 => {
                out.extend_from_slice(tag_perm);
                out.extend_from_slice(id);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Bytes one entry header and its name take.
fn entry_len(x: &Encoded) -> usize {
    round4(size_of::<XattrEntryHead>() + x.suffix.len())
}

/// Bytes entries, their 4-byte terminator and values take.
fn used(xs: &[Encoded]) -> usize {
    xs.iter().map(|x| entry_len(x) + round4(x.value.len())).sum::<usize>() + 4
}

/// Whether the attributes fit in the inode after `i_extra_isize` (the area
/// starts with a 4-byte magic number).
pub(crate) fn fits_inline(xs: &[Encoded]) -> bool {
    xs.is_empty() || 4 + used(xs) <= INODE_XATTR_AREA
}

fn fits_block(xs: &[Encoded]) -> bool {
    size_of::<XattrBlockHeader>() + used(xs) <= BLOCK_SIZE
}

/// `ext4_xattr_hash_entry`: the name bytes (unsigned), then the value as
/// little-endian words, zero padded.
fn entry_hash(x: &Encoded) -> u32 {
    let mut hash = 0u32;
    for &c in x.suffix.iter() {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
    }
    for word in x.value.chunks(4) {
        let mut w = [0u8; 4];
        for (d, s) in w.iter_mut().zip(word) {
            *d = *s;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

/// Entries (starting at byte `entries_at` of `area`) with values packed down
/// from the end of `area`. `value_base` is where value offsets count from.
fn layout(xs: &[Encoded], area: &mut [u8], entries_at: usize, value_base: usize) -> Option<Vec<u32>> {
    let mut hashes = Vec::with_capacity(xs.len());
    let mut at = entries_at;
    let mut value_end = area.len();
    for x in xs {
        let hash = entry_hash(x);
        hashes.push(hash);
        let value_offs = if x.value.is_empty() {
            0
        } else {
            value_end = value_end.checked_sub(round4(x.value.len()))?;
            area.get_mut(value_end..value_end + x.value.len())?.copy_from_slice(&x.value);
            value_end - value_base
        };
        let mut head = XattrEntryHead::new_zeroed();
        head.name_len = u8::try_from(x.suffix.len()).ok()?;
        head.name_index = x.index;
        head.value_offs = U16::new(u16::try_from(value_offs).ok()?);
        head.value_size = U32::new(u32::try_from(x.value.len()).ok()?);
        head.hash = U32::new(hash);
        let head_len = size_of::<XattrEntryHead>();
        area.get_mut(at..at + head_len)?.copy_from_slice(head.as_bytes());
        area.get_mut(at + head_len..at + head_len + x.suffix.len())?.copy_from_slice(&x.suffix);
        at += entry_len(x);
    }
    // The 4 zero bytes ending the entries must not run into the values.
    (at + 4 <= value_end).then_some(hashes)
}

/// The in-inode area: magic, entries, values. Value offsets count from the
/// first entry. `None` if they do not fit (check [`fits_inline`] first).
pub(crate) fn inline_area(xs: &[Encoded]) -> Option<[u8; INODE_XATTR_AREA]> {
    let mut area = [0u8; INODE_XATTR_AREA];
    if xs.is_empty() {
        return Some(area);
    }
    area.get_mut(..4)?.copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    layout(xs, &mut area, 4, 4)?;
    Some(area)
}

/// An xattr block at `block`, referenced by one inode. Value offsets count
/// from the start of the block.
pub(crate) fn block(xs: &[Encoded], block: u64, csum: &Csum) -> Option<Vec<u8>> {
    let mut data = vec![0u8; BLOCK_SIZE];
    let head_len = size_of::<XattrBlockHeader>();
    let hashes = layout(xs, &mut data, head_len, 0)?;
    let mut hash = 0u32;
    for h in hashes {
        if h == 0 {
            hash = 0;
            break;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    let mut head = XattrBlockHeader::new_zeroed();
    head.magic = U32::new(XATTR_MAGIC);
    head.refcount = U32::new(1);
    head.blocks = U32::new(1);
    head.hash = U32::new(hash);
    data.get_mut(..head_len)?.copy_from_slice(head.as_bytes());
    head.checksum = U32::new(csum.xattr_block(block, &data));
    data.get_mut(..head_len)?.copy_from_slice(head.as_bytes());
    Some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_index_and_suffix() {
        let e = encode(&Xattr::new("security.capability", vec![1, 2])).unwrap();
        assert_eq!((e.index, &*e.suffix), (6, &b"capability"[..]));
        let e = encode(&Xattr::new("trusted.overlay.opaque", "y")).unwrap();
        assert_eq!((e.index, &*e.suffix), (4, &b"overlay.opaque"[..]));
        assert!(encode(&Xattr::new("user.", "x")).is_err());
        assert!(encode(&Xattr::new("os2.foo", "x")).is_err());
        assert!(encode(&Xattr::new("system.foo", "x")).is_err());
    }

    #[test]
    fn acl_is_converted() {
        // user::rw- user:1000:r-- group::r-- mask::r-- other::---
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in
            [(1u16, 6u16, u32::MAX), (2, 4, 1000), (4, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
        {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let disk = acl_to_disk(&vfs).unwrap();
        assert_eq!(disk.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert!(acl_to_disk(&vfs[..7]).is_none());
    }

    #[test]
    fn duplicates_and_oversize_are_refused() {
        let twice = [Xattr::new("user.a", "1"), Xattr::new("user.a", "2")];
        assert_eq!(encode_all(&twice).unwrap_err(), Refusal::Invalid(b"user.a".to_vec(), "given twice"));
        let big = [Xattr::new("user.a", vec![0u8; 4096])];
        assert_eq!(encode_all(&big).unwrap_err(), Refusal::TooLarge);
        let fits = [Xattr::new("user.a", vec![0u8; 4000])];
        let xs = encode_all(&fits).unwrap();
        assert!(!fits_inline(&xs));
        assert!(block(&xs, 9, &Csum::new(&[0; 16])).is_some());
    }

    #[test]
    fn small_sets_fit_inline() {
        let xs = encode_all(&[Xattr::new("trusted.overlay.opaque", "y"), Xattr::new("user.k", "v")]).unwrap();
        assert!(fits_inline(&xs));
        let area = inline_area(&xs).unwrap();
        assert_eq!(area[..4], XATTR_MAGIC.to_le_bytes());
    }
}
