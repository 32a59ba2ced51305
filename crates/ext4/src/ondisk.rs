//! The on-disk structures this writer emits, exactly as ext4 lays them out
//! (little endian, `Documentation/filesystems/ext4/` in the kernel tree and
//! `lib/ext2fs/ext2_fs.h` in e2fsprogs). Only the fields this writer sets are
//! named; the rest are zero padding.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Filesystem block size: 4 KiB, the page size the guest kernel runs with.
pub(crate) const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] for block arithmetic.
pub(crate) const BLOCK: u64 = 4096;
/// `s_log_block_size`: block size is `1024 << 2`.
pub(crate) const LOG_BLOCK_SIZE: u32 = 2;
/// Blocks per group: one block bitmap of 4096 bytes covers 32768 blocks.
pub(crate) const BLOCKS_PER_GROUP: u64 = 32768;
/// On-disk inode size.
pub(crate) const INODE_SIZE: usize = 256;
/// Inodes in one block.
pub(crate) const INODES_PER_BLOCK: u32 = 16;
/// Most inodes one group can hold (one inode bitmap block).
pub(crate) const MAX_INODES_PER_GROUP: u32 = 32768;
/// `i_extra_isize`: the fields up to `i_projid` (timestamps with nanoseconds,
/// the high checksum half). The rest of the inode holds inline xattrs.
pub(crate) const EXTRA_ISIZE: u16 = 32;
/// First inode not reserved by ext4; inodes 1 to 10 are reserved.
pub(crate) const FIRST_INO: u32 = 11;
/// The root directory's inode.
pub(crate) const ROOT_INO: u32 = 2;
/// Group descriptors are 32 bytes without the `64bit` feature.
pub(crate) const DESC_SIZE: usize = 32;
/// Group descriptors in one block.
pub(crate) const DESCS_PER_BLOCK: u64 = (BLOCK_SIZE / DESC_SIZE) as u64;
/// Byte offset of the primary superblock.
pub(crate) const SUPERBLOCK_OFFSET: usize = 1024;
/// Longest name in a directory entry.
pub(crate) const NAME_MAX: usize = 255;
/// Longest extent of initialized blocks.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;
/// Most hard links (and subdirectories + 2) an inode may count; a directory
/// with more subdirectories counts 1 (`dir_nlink`).
pub(crate) const LINK_MAX: u32 = 65000;

pub(crate) const SUPER_MAGIC: u16 = 0xEF53;
pub(crate) const EXTENT_MAGIC: u16 = 0xF30A;
pub(crate) const XATTR_MAGIC: u32 = 0xEA02_0000;

pub(crate) const COMPAT_EXT_ATTR: u32 = 0x0008;
pub(crate) const INCOMPAT_FILETYPE: u32 = 0x0002;
pub(crate) const INCOMPAT_EXTENTS: u32 = 0x0040;
pub(crate) const INCOMPAT_FLEX_BG: u32 = 0x0200;
pub(crate) const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
pub(crate) const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
pub(crate) const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
pub(crate) const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;
pub(crate) const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;

/// `bg_flags`: the inode table is zeroed.
pub(crate) const BG_INODE_ZEROED: u16 = 0x0004;
/// `i_flags`: the inode maps its blocks with an extent tree.
pub(crate) const EXTENTS_FL: u32 = 0x0008_0000;

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFSOCK: u16 = 0o140000;

pub(crate) const FT_REG_FILE: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHRDEV: u8 = 3;
pub(crate) const FT_BLKDEV: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SOCK: u8 = 6;
pub(crate) const FT_SYMLINK: u8 = 7;
/// `file_type` of the fake directory entry holding a block's checksum.
pub(crate) const FT_DIR_CSUM: u8 = 0xDE;

/// The superblock, 1024 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct Superblock {
    pub inodes_count: U32,
    pub blocks_count_lo: U32,
    pub r_blocks_count_lo: U32,
    pub free_blocks_count_lo: U32,
    pub free_inodes_count: U32,
    pub first_data_block: U32,
    pub log_block_size: U32,
    pub log_cluster_size: U32,
    pub blocks_per_group: U32,
    pub clusters_per_group: U32,
    pub inodes_per_group: U32,
    pub mtime: U32,
    pub wtime: U32,
    pub mnt_count: U16,
    pub max_mnt_count: U16,
    pub magic: U16,
    pub state: U16,
    pub errors: U16,
    pub minor_rev_level: U16,
    pub lastcheck: U32,
    pub checkinterval: U32,
    pub creator_os: U32,
    pub rev_level: U32,
    pub def_resuid: U16,
    pub def_resgid: U16,
    pub first_ino: U32,
    pub inode_size: U16,
    pub block_group_nr: U16,
    pub feature_compat: U32,
    pub feature_incompat: U32,
    pub feature_ro_compat: U32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub last_mounted: [u8; 64],
    pub algorithm_usage_bitmap: U32,
    pub prealloc_blocks: u8,
    pub prealloc_dir_blocks: u8,
    pub reserved_gdt_blocks: U16,
    pub journal_uuid: [u8; 16],
    pub journal_inum: U32,
    pub journal_dev: U32,
    pub last_orphan: U32,
    pub hash_seed: [u8; 16],
    pub def_hash_version: u8,
    pub jnl_backup_type: u8,
    pub desc_size: U16,
    pub default_mount_opts: U32,
    pub first_meta_bg: U32,
    pub mkfs_time: U32,
    pub jnl_blocks: [u8; 68],
    pub blocks_count_hi: U32,
    pub r_blocks_count_hi: U32,
    pub free_blocks_count_hi: U32,
    pub min_extra_isize: U16,
    pub want_extra_isize: U16,
    pub flags: U32,
    pub raid_stride: U16,
    pub mmp_update_interval: U16,
    pub mmp_block: U64,
    pub raid_stripe_width: U32,
    pub log_groups_per_flex: u8,
    pub checksum_type: u8,
    pub reserved_pad: U16,
    pub kbytes_written: U64,
    /// Snapshot, error, quota, encryption and encoding fields: all zero.
    pub unused: [u8; 0x3FC - 0x180],
    pub checksum: U32,
}

const _: () = assert!(core::mem::size_of::<Superblock>() == 1024);
const _: () = assert!(core::mem::offset_of!(Superblock, magic) == 0x38);
const _: () = assert!(core::mem::offset_of!(Superblock, uuid) == 0x68);
const _: () = assert!(core::mem::offset_of!(Superblock, hash_seed) == 0xEC);
const _: () = assert!(core::mem::offset_of!(Superblock, desc_size) == 0xFE);
const _: () = assert!(core::mem::offset_of!(Superblock, blocks_count_hi) == 0x150);
const _: () = assert!(core::mem::offset_of!(Superblock, min_extra_isize) == 0x15C);
const _: () = assert!(core::mem::offset_of!(Superblock, log_groups_per_flex) == 0x174);
const _: () = assert!(core::mem::offset_of!(Superblock, kbytes_written) == 0x178);
const _: () = assert!(core::mem::offset_of!(Superblock, checksum) == 0x3FC);

/// A 32-byte block group descriptor (no `64bit` feature).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct GroupDesc {
    pub block_bitmap: U32,
    pub inode_bitmap: U32,
    pub inode_table: U32,
    pub free_blocks_count: U16,
    pub free_inodes_count: U16,
    pub used_dirs_count: U16,
    pub flags: U16,
    pub exclude_bitmap: U32,
    pub block_bitmap_csum: U16,
    pub inode_bitmap_csum: U16,
    pub itable_unused: U16,
    pub checksum: U16,
}

const _: () = assert!(core::mem::size_of::<GroupDesc>() == DESC_SIZE);
const _: () = assert!(core::mem::offset_of!(GroupDesc, block_bitmap_csum) == 0x18);
const _: () = assert!(core::mem::offset_of!(GroupDesc, checksum) == 0x1E);

/// A 256-byte inode: the 128-byte base, 32 bytes of extra fields, then the
/// in-inode extended attribute area.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct Inode {
    pub mode: U16,
    pub uid: U16,
    pub size_lo: U32,
    pub atime: U32,
    pub ctime: U32,
    pub mtime: U32,
    pub dtime: U32,
    pub gid: U16,
    pub links_count: U16,
    pub blocks_lo: U32,
    pub flags: U32,
    pub version: U32,
    /// Extent tree root, fast symlink target, or device number.
    pub block: [u8; 60],
    pub generation: U32,
    pub file_acl_lo: U32,
    pub size_high: U32,
    pub obso_faddr: U32,
    pub blocks_high: U16,
    pub file_acl_high: U16,
    pub uid_high: U16,
    pub gid_high: U16,
    pub checksum_lo: U16,
    pub reserved: U16,
    pub extra_isize: U16,
    pub checksum_hi: U16,
    pub ctime_extra: U32,
    pub mtime_extra: U32,
    pub atime_extra: U32,
    pub crtime: U32,
    pub crtime_extra: U32,
    pub version_hi: U32,
    pub projid: U32,
    /// In-inode xattrs: a magic number, entries, values.
    pub xattrs: [u8; INODE_XATTR_AREA],
}

/// Bytes after the extra fields: `256 - 128 - 32`.
pub(crate) const INODE_XATTR_AREA: usize = INODE_SIZE - 128 - EXTRA_ISIZE as usize;

const _: () = assert!(core::mem::size_of::<Inode>() == INODE_SIZE);
const _: () = assert!(core::mem::offset_of!(Inode, block) == 0x28);
const _: () = assert!(core::mem::offset_of!(Inode, checksum_lo) == 0x7C);
const _: () = assert!(core::mem::offset_of!(Inode, extra_isize) == 0x80);
const _: () = assert!(core::mem::offset_of!(Inode, xattrs) == 128 + EXTRA_ISIZE as usize);

/// The header of every extent tree node.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct ExtentHeader {
    pub magic: U16,
    pub entries: U16,
    pub max: U16,
    pub depth: U16,
    pub generation: U32,
}

/// A leaf entry: `len` blocks from logical `block` map to physical `start`.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct ExtentLeaf {
    pub block: U32,
    pub len: U16,
    pub start_hi: U16,
    pub start_lo: U32,
}

/// An index entry: the subtree at `leaf` maps logical blocks from `block`.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct ExtentIndex {
    pub block: U32,
    pub leaf_lo: U32,
    pub leaf_hi: U16,
    pub unused: U16,
}

const _: () = assert!(core::mem::size_of::<ExtentHeader>() == 12);
const _: () = assert!(core::mem::size_of::<ExtentLeaf>() == 12);
const _: () = assert!(core::mem::size_of::<ExtentIndex>() == 12);

/// The fixed part of a directory entry; the name follows.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct DirEntryHead {
    pub inode: U32,
    pub rec_len: U16,
    pub name_len: u8,
    pub file_type: u8,
}

/// The fake entry closing every directory block, holding its checksum.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct DirTail {
    pub inode: U32,
    pub rec_len: U16,
    pub name_len: u8,
    pub file_type: u8,
    pub checksum: U32,
}

const _: () = assert!(core::mem::size_of::<DirEntryHead>() == 8);
const _: () = assert!(core::mem::size_of::<DirTail>() == 12);

/// The header of an xattr block.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct XattrBlockHeader {
    pub magic: U32,
    pub refcount: U32,
    pub blocks: U32,
    pub hash: U32,
    pub checksum: U32,
    pub reserved: [u8; 12],
}

/// The fixed part of an xattr entry; the name suffix follows, padded to 4.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct XattrEntryHead {
    pub name_len: u8,
    pub name_index: u8,
    pub value_offs: U16,
    pub value_inum: U32,
    pub value_size: U32,
    pub hash: U32,
}

const _: () = assert!(core::mem::size_of::<XattrBlockHeader>() == 32);
const _: () = assert!(core::mem::offset_of!(XattrBlockHeader, checksum) == 16);
const _: () = assert!(core::mem::size_of::<XattrEntryHead>() == 16);

/// Whether block group `group` holds a copy of the superblock and the group
/// descriptor table (`sparse_super`: groups 0, 1 and powers of 3, 5 and 7).
pub(crate) fn has_super(group: u64) -> bool {
    fn power_of(mut n: u64, base: u64) -> bool {
        while n > 1 && n.is_multiple_of(base) {
            n /= base;
        }
        n == 1
    }
    group <= 1 || power_of(group, 3) || power_of(group, 5) || power_of(group, 7)
}

/// `x` rounded up to a multiple of 4.
pub(crate) fn round4(x: usize) -> usize {
    x.div_ceil(4) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..130).filter(|&g| has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }
}
