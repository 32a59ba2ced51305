//! The UVM as an IGVM file, and the SEV-SNP launch digest of such a file.
//!
//! IGVM (Microsoft's "Independent Guest Virtual Machine" format) is how
//! Azure's confidential containers boot their UVM: one file that holds every
//! page of the initial guest memory, the initial register state (the SNP
//! VMSA) and the guest policy, so that the host loads it verbatim and the
//! launch digest follows from the file alone. QEMU 10.1 and newer boot it on
//! SNP hosts with `-object igvm-cfg`.
//!
//! [`build`] places the kernel with rust-vmm's `linux-loader` (bzImage
//! protocol), writes the boot parameters (`boot_params`, e820 map, command
//! line, initrd location, the SNP `cc_blob_sev_info` that tells Linux where
//! the CPUID and secrets pages are), identity page tables with the C-bit
//! set, and a VMSA that enters the kernel's 64-bit entry point. All of guest
//! RAM is part of the launch: loaded pages as measured data, the rest as
//! measured zero pages, so the guest finds every page of its e820 map
//! validated and the memory size is part of the digest.
//!
//! [`measure`] computes the digest the SNP firmware reports for a launch
//! of such a file by QEMU and KVM: pages in directive order (QEMU's
//! `set_guest_state` mapping: data pages are NORMAL, pages without data are
//! ZERO, parameter areas UNMEASURED), then one VMSA per vCPU at the fixed GPA
//! KVM uses. Checked against an independent implementation (the
//! `sev-snp-measure` package's page chaining, driven by a separate parser).
//!
//! Host only: never linked into the guest.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod build;
mod measure;

pub use build::{Uvm, build};
pub use measure::{Measurement, PageCounts, measure};

/// The layout of guest physical memory in the IGVM file.
pub mod layout {
    /// Linux's `boot_params` (the "zero page").
    pub const BOOT_PARAMS: u64 = 0x7000;
    /// `struct cc_blob_sev_info`: where the secrets and CPUID pages are.
    pub const CC_BLOB: u64 = 0x8000;
    /// The SNP secrets page (filled by the firmware).
    pub const SECRETS: u64 = 0x9000;
    /// The SNP CPUID page (filled by the host, checked by the firmware).
    pub const CPUID: u64 = 0xa000;
    /// The top-level page table; then one PDPT and four page directories.
    pub const PML4: u64 = 0xb000;
    /// Page directory pointer table.
    pub const PDPT: u64 = 0xc000;
    /// Four page directories of 2 MiB pages: the first 4 GiB, identity mapped.
    pub const PD: u64 = 0xd000;
    /// Number of page directories.
    pub const PD_COUNT: u64 = 4;
    /// The initial stack (one page); the kernel switches to its own at once.
    pub const STACK_TOP: u64 = 0x12000;
    /// The kernel command line.
    pub const CMDLINE: u64 = 0x20000;
    /// End of low RAM (the legacy VGA and BIOS hole follows).
    pub const LOW_RAM_END: u64 = 0xa0000;
    /// Where the protected-mode kernel is loaded and high RAM starts.
    pub const HIGH_RAM: u64 = 0x10_0000;
    /// Offset of the 64-bit entry point in the loaded kernel (boot protocol 2.12+).
    pub const ENTRY_64: u64 = 0x200;
    /// The C-bit (encrypted page) in page-table entries: bit 51 on every
    /// SEV-SNP EPYC (Milan, Genoa, Turin; CPUID 0x8000001F EBX[5:0]).
    pub const C_BIT: u64 = 1 << 51;
    /// The GPA KVM records for every VMSA page in the launch digest.
    pub const VMSA_GPA: u64 = 0xffff_ffff_f000;
    /// 4 KiB pages.
    pub const PAGE: u64 = 0x1000;
    /// 2 MiB pages.
    pub const LARGE_PAGE: u64 = 0x20_0000;
}

/// Size of an SNP launch digest (SHA-384).
pub const DIGEST_LEN: usize = 48;

/// The IGVM compatibility mask of the one platform (SEV-SNP) in the file.
pub const SNP_COMPATIBILITY_MASK: u32 = 1;

/// The SNP guest policy of the default profile: SMT allowed, the must-be-one
/// bit 17 set, debugging, migration agents and single-socket off, ABI 0.0.
pub const DEFAULT_POLICY: u64 = 0x3_0000;

/// An IGVM file could not be built or measured.
#[derive(Debug, thiserror::Error)]
pub enum IgvmError {
    /// The memory size is outside what the layout supports.
    #[error("guest memory must be between {min} and {max} MiB, not {0} MiB", min = build::MIN_MEMORY_MIB, max = build::MAX_MEMORY_MIB)]
    Memory(u32),
    /// linux-loader refused the kernel.
    #[error("cannot load the kernel: {0}")]
    Kernel(String),
    /// A kernel without the 64-bit entry point (boot protocol 2.12, XLF_KERNEL_64).
    #[error("the kernel has no 64-bit entry point (boot protocol {0:#x}, xloadflags {1:#x})")]
    No64BitEntry(u16, u16),
    /// The kernel, its decompression area and the initrd do not fit in memory.
    #[error("the kernel and a {initrd} byte initrd do not fit in {memory_mib} MiB")]
    TooSmall {
        /// Initrd size in bytes.
        initrd: usize,
        /// Memory size.
        memory_mib: u32,
    },
    /// The command line is too long for the kernel or contains a NUL.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The igvm crate refused the file.
    #[error("IGVM: {0}")]
    Igvm(String),
    /// The file has no SEV-SNP platform.
    #[error("the IGVM file has no SEV-SNP platform header")]
    NoSnpPlatform,
    /// A directive whose effect on the launch digest is not known.
    #[error("directive {index} ({what}) is not supported by the QEMU/KVM launch measurement")]
    Unsupported {
        /// Index of the directive in the file.
        index: usize,
        /// What it is.
        what: String,
    },
    /// A page directive with an unaligned GPA.
    #[error("directive {index}: GPA {gpa:#x} is not aligned to its page size")]
    Unaligned {
        /// Index of the directive.
        index: usize,
        /// Its GPA.
        gpa: u64,
    },
    /// A parameter insert naming a parameter area that was never declared.
    #[error("directive {index}: parameter area {area} was never declared")]
    UnknownParameterArea {
        /// Index of the directive.
        index: usize,
        /// The area.
        area: u32,
    },
    /// Zero vCPUs.
    #[error("a launch needs at least one vCPU")]
    NoVcpus,
    /// The boot vCPU has no VMSA in the file.
    #[error("the IGVM file has no VMSA for the boot vCPU")]
    NoBootVmsa,
    /// A VMSA for a vCPU the launch does not have.
    #[error("the IGVM file has a VMSA for vCPU {0}, but the launch has {1} vCPU(s)")]
    ExtraVmsa(u16, u32),
    /// Several vCPUs but no vCPU type for the reset VMSAs of the others.
    #[error("{0} vCPUs need a vCPU type for the application processors' reset state")]
    NeedVcpuType(u32),
    /// A vCPU type the measurement does not know.
    #[error("unknown vCPU type {0:?}")]
    UnknownVcpuType(String),
    /// The `sev` crate could not build a reset VMSA.
    #[error("reset VMSA: {0}")]
    ResetVmsa(String),
}
