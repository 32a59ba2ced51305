//! The guest policy (spec 56860, table "Guest Policy Structure") decoded bit
//! by bit.

use serde::Serialize;

/// The 64-bit guest policy the guest owner fixed at launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    pub const SMT: u64 = 1 << 16;
    /// Reserved, must be one.
    pub const RESERVED_ONE: u64 = 1 << 17;
    pub const MIGRATE_MA: u64 = 1 << 18;
    pub const DEBUG: u64 = 1 << 19;
    pub const SINGLE_SOCKET: u64 = 1 << 20;
    pub const CXL_ALLOW: u64 = 1 << 21;
    pub const MEM_AES_256_XTS: u64 = 1 << 22;
    pub const RAPL_DIS: u64 = 1 << 23;
    pub const CIPHERTEXT_HIDING: u64 = 1 << 24;
    pub const PAGE_SWAP_DISABLE: u64 = 1 << 25;

    fn bit(self, mask: u64) -> bool {
        self.0 & mask != 0
    }

    pub fn abi_minor(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    pub fn abi_major(self) -> u8 {
        ((self.0 >> 8) & 0xff) as u8
    }

    pub fn smt_allowed(self) -> bool {
        self.bit(Self::SMT)
    }

    pub fn migrate_ma_allowed(self) -> bool {
        self.bit(Self::MIGRATE_MA)
    }

    /// The host may debug the guest (read and write its memory): a report
    /// with this bit proves nothing about the guest's integrity.
    pub fn debug_allowed(self) -> bool {
        self.bit(Self::DEBUG)
    }

    pub fn single_socket(self) -> bool {
        self.bit(Self::SINGLE_SOCKET)
    }

    /// Every bit decoded, for `--json`.
    pub fn decoded(self) -> PolicyBits {
        PolicyBits {
            raw: format!("{:#x}", self.0),
            abi_major: self.abi_major(),
            abi_minor: self.abi_minor(),
            smt_allowed: self.smt_allowed(),
            reserved_bit17: self.bit(Self::RESERVED_ONE),
            migrate_ma_allowed: self.migrate_ma_allowed(),
            debug_allowed: self.debug_allowed(),
            single_socket: self.single_socket(),
            cxl_allowed: self.bit(Self::CXL_ALLOW),
            mem_aes_256_xts: self.bit(Self::MEM_AES_256_XTS),
            rapl_disabled: self.bit(Self::RAPL_DIS),
            ciphertext_hiding: self.bit(Self::CIPHERTEXT_HIDING),
            page_swap_disabled: self.bit(Self::PAGE_SWAP_DISABLE),
        }
    }
}

/// The decoded guest policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyBits {
    pub raw: String,
    pub abi_major: u8,
    pub abi_minor: u8,
    pub smt_allowed: bool,
    pub reserved_bit17: bool,
    pub migrate_ma_allowed: bool,
    pub debug_allowed: bool,
    pub single_socket: bool,
    pub cxl_allowed: bool,
    pub mem_aes_256_xts: bool,
    pub rapl_disabled: bool,
    pub ciphertext_hiding: bool,
    pub page_swap_disabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_milan_fixture_policy() {
        let p = GuestPolicy(0x30000);
        assert!(p.smt_allowed());
        assert!(p.decoded().reserved_bit17);
        assert!(!p.debug_allowed());
        assert!(!p.migrate_ma_allowed());
        assert!(!p.single_socket());
        assert_eq!((p.abi_major(), p.abi_minor()), (0, 0));
    }

    #[test]
    fn debug_is_bit_19() {
        assert!(GuestPolicy(0x30000 | 1 << 19).debug_allowed());
        assert!(GuestPolicy(0x1f_0305).decoded().single_socket);
        assert_eq!(GuestPolicy(0x0305).abi_major(), 3);
    }
}
