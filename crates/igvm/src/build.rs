//! Building the IGVM file: the guest's initial memory and registers.

use std::io::Cursor;

use igvm::snp_defs::{SevFeatures, SevSelector, SevVmsa};
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision};
use igvm_defs::{IGVM_VHS_SUPPORTED_PLATFORM, IgvmPageDataFlags, IgvmPageDataType, IgvmPlatformType};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{FromZeros, IntoBytes};

use crate::layout::*;
use crate::{IgvmError, SNP_COMPATIBILITY_MASK};

/// Smallest guest memory the layout supports.
pub(crate) const MIN_MEMORY_MIB: u32 = 64;
/// Largest: all RAM below 2 GiB, where QEMU's q35 keeps it (no PCI hole to skip).
pub(crate) const MAX_MEMORY_MIB: u32 = 2048;

/// `boot_params.hdr.xloadflags`: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// `struct cc_blob_sev_info` magic ("AMDE").
const CC_BLOB_MAGIC: u32 = 0x4544_4d41;

/// What goes into the file.
#[derive(Debug, Clone)]
pub struct Uvm<'a> {
    /// The bzImage.
    pub kernel: &'a [u8],
    /// The initrd.
    pub initrd: &'a [u8],
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Guest memory; fixed by the file (its e820 map is measured).
    pub memory_mib: u32,
    /// VMSA `sev_features` (bit 0: SNP active).
    pub guest_features: u64,
    /// SNP guest policy.
    pub policy: u64,
}

/// Build the IGVM file.
pub fn build(uvm: &Uvm) -> Result<Vec<u8>, IgvmError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&uvm.memory_mib) {
        return Err(IgvmError::Memory(uvm.memory_mib));
    }
    let memory = u64::from(uvm.memory_mib) << 20;
    let guest = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), memory as usize)])
        .map_err(|err| IgvmError::GuestMemory(err.to_string()))?;
    let write = |bytes: &[u8], gpa: u64| {
        guest.write_slice(bytes, GuestAddress(gpa)).map_err(|err| IgvmError::GuestMemory(err.to_string()))
    };

    // The kernel, by the bzImage protocol, at its 1 MiB load address.
    let loaded = BzImage::load(&guest, None, &mut Cursor::new(uvm.kernel), Some(GuestAddress(HIGH_RAM)))
        .map_err(|err| IgvmError::Kernel(err.to_string()))?;
    let mut header = loaded.setup_header.ok_or_else(|| IgvmError::Kernel("no setup header".into()))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(IgvmError::No64BitEntry(header.version, header.xloadflags));
    }
    let kernel = (loaded.kernel_load.0, loaded.kernel_end);

    // The initrd at the top of RAM, as boot loaders place it, above where
    // the kernel decompresses itself.
    let too_small = || IgvmError::TooSmall { initrd: uvm.initrd.len(), memory_mib: uvm.memory_mib };
    let ceiling = memory.min(u64::from(header.initrd_addr_max) + 1);
    let initrd_at = ceiling.checked_sub(uvm.initrd.len() as u64).ok_or_else(too_small)? & !(PAGE - 1);
    let kernel_needs = kernel.1.max(header.pref_address.saturating_add(u64::from(header.init_size)));
    if initrd_at < kernel_needs {
        return Err(too_small());
    }
    write(uvm.initrd, initrd_at)?;
    let initrd = (initrd_at, initrd_at + uvm.initrd.len() as u64);

    // The command line.
    let capacity = usize::try_from(header.cmdline_size).unwrap_or(usize::MAX).saturating_add(1).min(0x10000);
    let cmdline = Cmdline::try_from(uvm.cmdline, capacity).map_err(|err| IgvmError::Cmdline(err.to_string()))?;
    load_cmdline(&guest, GuestAddress(CMDLINE), &cmdline).map_err(|err| IgvmError::Cmdline(err.to_string()))?;
    let cmdline_end = CMDLINE + uvm.cmdline.len() as u64 + 1;

    // Boot parameters.
    header.type_of_loader = LOADER_UNDEFINED;
    header.cmd_line_ptr = CMDLINE as u32;
    header.ramdisk_image = initrd_at as u32;
    header.ramdisk_size = uvm.initrd.len() as u32;
    let mut params = boot_params { hdr: header, ..Default::default() };
    params.e820_table[0] = boot_e820_entry { addr: 0, size: LOW_RAM_END, r#type: E820_RAM };
    params.e820_table[1] = boot_e820_entry { addr: HIGH_RAM, size: memory - HIGH_RAM, r#type: E820_RAM };
    params.e820_entries = 2;
    params.cc_blob_address = CC_BLOB as u32;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(BOOT_PARAMS)),
        &guest,
    )
    .map_err(|err| IgvmError::GuestMemory(err.to_string()))?;

    // Where Linux finds the SNP secrets and CPUID pages without EFI.
    let mut blob = Vec::with_capacity(40);
    blob.extend_from_slice(&CC_BLOB_MAGIC.to_le_bytes());
    blob.extend_from_slice(&[0; 4]); // version 0, reserved
    blob.extend_from_slice(&SECRETS.to_le_bytes());
    blob.extend_from_slice(&(PAGE as u32).to_le_bytes());
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(&CPUID.to_le_bytes());
    blob.extend_from_slice(&(PAGE as u32).to_le_bytes());
    blob.extend_from_slice(&[0; 4]);
    write(&blob, CC_BLOB)?;

    // Identity-mapped 4 GiB, 2 MiB pages, private (C-bit set).
    const PRESENT_WRITABLE: u64 = 0x3;
    const LARGE: u64 = 0x80;
    write((PDPT | C_BIT | PRESENT_WRITABLE).as_bytes(), PML4)?;
    for directory in 0..PD_COUNT {
        let pd = PD + directory * PAGE;
        write((pd | C_BIT | PRESENT_WRITABLE).as_bytes(), PDPT + directory * 8)?;
        let entries: Vec<u64> =
            (0..512).map(|i| ((directory * 512 + i) * LARGE_PAGE) | C_BIT | LARGE | PRESENT_WRITABLE).collect();
        write(entries.as_bytes(), pd)?;
    }

    let data = [
        (BOOT_PARAMS, BOOT_PARAMS + PAGE),
        (CC_BLOB, CC_BLOB + PAGE),
        (PML4, PD + PD_COUNT * PAGE),
        (CMDLINE, cmdline_end),
        kernel,
        initrd,
    ];
    let special = [(SECRETS, IgvmPageDataType::SECRETS), (CPUID, IgvmPageDataType::CPUID_DATA)];
    let mut directives = Vec::new();
    for (start, end) in [(0, LOW_RAM_END), (HIGH_RAM, memory)] {
        ram_pages(&guest, start, end, &data, &special, &mut directives)?;
    }
    directives.push(IgvmDirectiveHeader::SnpVpContext {
        gpa: VMSA_GPA,
        compatibility_mask: SNP_COMPATIBILITY_MASK,
        vp_index: 0,
        vmsa: boot_vmsa(kernel.0 + ENTRY_64, uvm.guest_features),
    });

    let platform = IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
        compatibility_mask: SNP_COMPATIBILITY_MASK,
        highest_vtl: 0,
        platform_type: IgvmPlatformType::SEV_SNP,
        platform_version: 1,
        shared_gpa_boundary: 0,
    });
    let policy =
        IgvmInitializationHeader::GuestPolicy { policy: uvm.policy, compatibility_mask: SNP_COMPATIBILITY_MASK };
    let file = IgvmFile::new(IgvmRevision::V1, vec![platform], vec![policy], directives)
        .map_err(|err| IgvmError::Igvm(err.to_string()))?;
    let mut out = Vec::new();
    file.serialize(&mut out).map_err(|err| IgvmError::Igvm(err.to_string()))?;
    Ok(out)
}

/// One directive per page of `[start, end)`: the pages in `data` with their
/// contents, the `special` pages with their type, and the rest as zero pages
/// (2 MiB ones where a whole aligned 2 MiB has nothing else).
fn ram_pages(
    guest: &GuestMemoryMmap,
    start: u64,
    end: u64,
    data: &[(u64, u64)],
    special: &[(u64, IgvmPageDataType)],
    out: &mut Vec<IgvmDirectiveHeader>,
) -> Result<(), IgvmError> {
    let touches = |from: u64, to: u64| {
        data.iter().any(|&(a, b)| a < to && from < b) || special.iter().any(|&(gpa, _)| from <= gpa && gpa < to)
    };
    let page = |gpa: u64, flags: IgvmPageDataFlags, data_type: IgvmPageDataType, data: Vec<u8>| {
        IgvmDirectiveHeader::PageData { gpa, compatibility_mask: SNP_COMPATIBILITY_MASK, flags, data_type, data }
    };
    let mut gpa = start;
    while gpa < end {
        if let Some(&(_, data_type)) = special.iter().find(|&&(at, _)| at == gpa) {
            out.push(page(gpa, IgvmPageDataFlags::new(), data_type, Vec::new()));
            gpa += PAGE;
        } else if touches(gpa, gpa + PAGE) {
            let mut bytes = vec![0; PAGE as usize];
            guest.read_slice(&mut bytes, GuestAddress(gpa)).map_err(|err| IgvmError::GuestMemory(err.to_string()))?;
            out.push(page(gpa, IgvmPageDataFlags::new(), IgvmPageDataType::NORMAL, bytes));
            gpa += PAGE;
        } else if gpa.is_multiple_of(LARGE_PAGE) && gpa + LARGE_PAGE <= end && !touches(gpa, gpa + LARGE_PAGE) {
            out.push(page(gpa, IgvmPageDataFlags::new().with_is_2mb_page(true), IgvmPageDataType::NORMAL, Vec::new()));
            gpa += LARGE_PAGE;
        } else {
            out.push(page(gpa, IgvmPageDataFlags::new(), IgvmPageDataType::NORMAL, Vec::new()));
            gpa += PAGE;
        }
    }
    Ok(())
}

/// The boot vCPU: 64-bit mode, paging on with our tables, at the kernel's
/// 64-bit entry with `%rsi` pointing to the boot parameters. The fields KVM
/// fills itself (PAT, debug registers, XCR0, x87 and SSE control) carry
/// KVM's reset values, as `sev-snp-measure` assumes for QEMU launches.
fn boot_vmsa(entry: u64, guest_features: u64) -> Box<SevVmsa> {
    let mut vmsa = SevVmsa::new_box_zeroed().unwrap_or_else(|_| Box::new(SevVmsa::new_zeroed()));
    // Flat 64-bit code (type 0xb, S, P, L, G) and data (type 0x3, S, P, DB, G).
    let code = SevSelector { selector: 0x10, attrib: 0xa9b, limit: 0xffff_ffff, base: 0 };
    let data = SevSelector { selector: 0x18, attrib: 0xc93, limit: 0xffff_ffff, base: 0 };
    vmsa.cs = code;
    vmsa.ds = data;
    vmsa.es = data;
    vmsa.fs = data;
    vmsa.gs = data;
    vmsa.ss = data;
    vmsa.ldtr = SevSelector { selector: 0, attrib: 0x82, limit: 0xffff, base: 0 };
    vmsa.tr = SevSelector { selector: 0, attrib: 0x8b, limit: 0xffff, base: 0 };
    vmsa.gdtr = SevSelector { selector: 0, attrib: 0, limit: 0xffff, base: 0 };
    vmsa.idtr = SevSelector { selector: 0, attrib: 0, limit: 0xffff, base: 0 };
    vmsa.efer = 0x1500; // LME | LMA | SVME (SVME: KVM requires it for SEV-ES and SNP)
    vmsa.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    vmsa.cr3 = PML4 | C_BIT;
    vmsa.cr4 = 0x20; // PAE
    vmsa.rip = entry;
    vmsa.rsi = BOOT_PARAMS;
    vmsa.rsp = STACK_TOP;
    vmsa.rflags = 0x2;
    vmsa.dr6 = 0xffff_0ff0;
    vmsa.dr7 = 0x400;
    vmsa.pat = 0x0007_0406_0007_0406;
    vmsa.xcr0 = 0x1;
    vmsa.mxcsr = 0x1f80;
    vmsa.x87_fcw = 0x37f;
    vmsa.sev_features = SevFeatures::from_bits(guest_features);
    vmsa
}
