//! `metadata_csum` checksums: crc32c as the kernel's `ext4_chksum` computes
//! it, i.e. without the usual pre- and post-inversion, chained from a seed.

/// The kernel's `crc32c(seed, data)`: the raw register value, no inversions.
pub(crate) fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    // `crc32c_append` inverts on entry and exit; undo both.
    !crc32c::crc32c_append(!seed, data)
}

/// The per-filesystem checksum seed and the checksums derived from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Csum {
    /// `crc32c(~0, uuid)`, the seed of every metadata checksum.
    seed: u32,
}

impl Csum {
    pub(crate) fn new(uuid: &[u8; 16]) -> Self {
        Csum { seed: crc32c_raw(!0, uuid) }
    }

    /// Superblock: everything before the checksum field.
    pub(crate) fn superblock(sb_without_csum: &[u8]) -> u32 {
        crc32c_raw(!0, sb_without_csum)
    }

    /// The seed of checksums owned by one inode: its number and generation.
    pub(crate) fn inode_seed(&self, ino: u32, generation: u32) -> u32 {
        let seed = crc32c_raw(self.seed, &ino.to_le_bytes());
        crc32c_raw(seed, &generation.to_le_bytes())
    }

    /// Inode: its seed, then the inode with both checksum halves zero.
    pub(crate) fn inode(&self, ino: u32, generation: u32, inode_zeroed_csum: &[u8]) -> u32 {
        crc32c_raw(self.inode_seed(ino, generation), inode_zeroed_csum)
    }

    /// Group descriptor (low 16 bits): group number, then the descriptor with
    /// its checksum field zero.
    pub(crate) fn group_desc(&self, group: u32, desc_zeroed_csum: &[u8]) -> u16 {
        let seed = crc32c_raw(self.seed, &group.to_le_bytes());
        (crc32c_raw(seed, desc_zeroed_csum) & 0xFFFF) as u16
    }

    /// Block or inode bitmap (the bytes covering one group).
    pub(crate) fn bitmap(&self, bitmap: &[u8]) -> u32 {
        crc32c_raw(self.seed, bitmap)
    }

    /// xattr block: its block number, then the block with its checksum zero.
    pub(crate) fn xattr_block(&self, block: u64, data_zeroed_csum: &[u8]) -> u32 {
        let seed = crc32c_raw(self.seed, &block.to_le_bytes());
        crc32c_raw(seed, data_zeroed_csum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_matches_the_kernel_convention() {
        // The standard CRC-32C check value of "123456789" is 0xE3069283; the
        // kernel's raw form from ~0 is its inversion.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xE306_9283);
        // Chaining equals one pass.
        let one = crc32c_raw(7, b"hello world");
        let two = crc32c_raw(crc32c_raw(7, b"hello "), b"world");
        assert_eq!(one, two);
    }
}
