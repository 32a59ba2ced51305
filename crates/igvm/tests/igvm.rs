//! The IGVM file: parsed back with the igvm crate, every directive checked
//! against what it must hold; its launch digest against an independent
//! implementation (scripts/igvm-oracle.py: its own parser, `sev-snp-measure`'s
//! page chaining) and a known answer; bad inputs refused by name.

use std::path::{Path, PathBuf};
use std::process::Command;

use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IsolationType};
use igvm_defs::{IgvmPageDataType, IgvmPlatformType};
use parma_igvm::layout::*;
use parma_igvm::{DEFAULT_POLICY, IgvmError, Uvm, build, measure};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn uvm_dir() -> PathBuf {
    std::env::var_os("PARMA_UVM").map_or_else(|| repo().join("out/uvm"), PathBuf::from)
}

/// The real UVM of `make image`.
fn real_uvm() -> (Vec<u8>, Vec<u8>, String) {
    let dir = uvm_dir();
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|err| panic!("{}/{name}: {err} (run make image)", dir.display()))
    };
    let cmdline = String::from_utf8(read("cmdline")).unwrap().trim().to_string();
    (read("vmlinuz"), read("initrd.img"), cmdline)
}

/// A synthetic bzImage: a valid boot-protocol 2.15 header and a patterned body.
fn synthetic_kernel() -> Vec<u8> {
    let mut k = vec![0u8; 1024 + 3 * 4096 + 123];
    k[0x1f1] = 1; // setup_sects: the setup is 2 sectors
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x211] = 1; // LOADED_HIGH
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    k[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    k[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    k[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    k[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    for (i, b) in k.iter_mut().enumerate().skip(1024) {
        *b = (i * 7 % 251) as u8;
    }
    k
}

fn synthetic_initrd() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 13 % 256) as u8).collect()
}

fn uvm<'a>(kernel: &'a [u8], initrd: &'a [u8], cmdline: &'a str, memory_mib: u32) -> Uvm<'a> {
    Uvm { kernel, initrd, cmdline, memory_mib, guest_features: 1, policy: DEFAULT_POLICY }
}

fn oracle_digest(file: &[u8], vcpus: u32, vcpu_type: &str) -> String {
    let python = std::env::var_os("PARMA_ORACLE_PYTHON")
        .map_or_else(|| repo().join("out/venv-oracle/bin/python3"), PathBuf::from);
    assert!(python.is_file(), "{} is missing: run scripts/oracle.sh (make test does)", python.display());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uvm.igvm");
    std::fs::write(&path, file).unwrap();
    let out = Command::new(python)
        .arg(repo().join("scripts/igvm-oracle.py"))
        .arg(&path)
        .args([vcpus.to_string(), vcpu_type.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "igvm-oracle.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn the_uvm_digest_equals_the_independent_oracle() {
    let (kernel, initrd, cmdline) = real_uvm();
    for (memory_mib, counts) in [(256, &[1, 2, 4][..]), (512, &[1][..])] {
        let file = build(&uvm(&kernel, &initrd, &cmdline, memory_mib)).unwrap();
        for &vcpus in counts {
            for vcpu_type in ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"] {
                let ours = measure(&file, vcpus, Some(vcpu_type)).unwrap();
                assert_eq!(
                    ours.digest,
                    oracle_digest(&file, vcpus, vcpu_type),
                    "{memory_mib} MiB, {vcpus} x {vcpu_type}"
                );
                if vcpus == 1 {
                    break; // the reset state of the vCPU type only enters with a second vCPU
                }
            }
        }
    }
    // The command line is measured.
    let a = build(&uvm(&kernel, &initrd, &cmdline, 512)).unwrap();
    let b = build(&uvm(&kernel, &initrd, &format!("{cmdline} debug"), 512)).unwrap();
    assert_ne!(measure(&a, 1, None).unwrap().digest, measure(&b, 1, None).unwrap().digest);
    assert_eq!(measure(&b, 1, None).unwrap().digest, oracle_digest(&b, 1, "EPYC-v4"));
}

#[test]
fn known_answer_digest() {
    let (kernel, initrd) = (synthetic_kernel(), synthetic_initrd());
    let file = build(&uvm(&kernel, &initrd, "console=ttyS0 parma.test=1", 64)).unwrap();
    // The same bytes every time.
    assert_eq!(file, build(&uvm(&kernel, &initrd, "console=ttyS0 parma.test=1", 64)).unwrap());
    let one = measure(&file, 1, None).unwrap();
    let two = measure(&file, 2, Some("EPYC-Milan")).unwrap();
    assert_eq!(one.digest, oracle_digest(&file, 1, "EPYC-v4"));
    assert_eq!(two.digest, oracle_digest(&file, 2, "EPYC-Milan"));
    assert_eq!(
        one.digest,
        "8bb28ea7e0d5d6ad395c98cf4093fc8f7630ab93f27b9b3e2c8279357bd5aa6d93f861109a525fde2d7e9ae474ed1686"
    );
    assert_eq!(
        two.digest,
        "b25435131ebb10088cf3aced892e01f16219778d6756728992cd83d5208c7f12a598564c880619502359dd5322253f09"
    );
    // 64 MiB: 160 low pages + 15 MiB of high pages, by 4 KiB or in 2 MiB zero pages, all measured.
    let p = &one.pages;
    assert_eq!((p.secrets, p.cpuid, p.vmsa, p.unmeasured), (1, 1, 1, 0));
    assert_eq!(p.normal + p.zero + p.secrets + p.cpuid, (0xa0000 + (64 << 20) - 0x10_0000) / 4096);
    assert_eq!(one.policy, Some(DEFAULT_POLICY));
    assert_eq!(one.memory_mib, 64);
}

#[test]
fn every_directive_holds_what_the_boot_needs() {
    let (kernel, initrd, cmdline) = real_uvm();
    let memory: u64 = 512 << 20;
    let bytes = build(&uvm(&kernel, &initrd, &cmdline, 512)).unwrap();
    let file = IgvmFile::new_from_binary(&bytes, Some(IsolationType::Snp)).unwrap();

    let [IgvmPlatformHeader::SupportedPlatform(platform)] = file.platforms() else { panic!("one platform") };
    assert_eq!((platform.platform_type, platform.compatibility_mask), (IgvmPlatformType::SEV_SNP, 1));
    assert_eq!((platform.highest_vtl, platform.shared_gpa_boundary), (0, 0));
    let [IgvmInitializationHeader::GuestPolicy { policy, compatibility_mask: 1 }] = file.initializations() else {
        panic!("one guest policy")
    };
    assert_eq!(*policy, DEFAULT_POLICY);
    assert_eq!(policy & (1 << 19), 0, "the debug bit is off");

    // Memory: every page of the e820 RAM exactly once, in GPA order.
    let (directives, last) = file.directives().split_at(file.directives().len() - 1);
    let mut pages = std::collections::BTreeMap::new();
    let mut next = 0u64;
    for d in directives {
        let IgvmDirectiveHeader::PageData { gpa, compatibility_mask: 1, flags, data_type, data } = d else {
            panic!("unexpected directive {d:?}")
        };
        if next == LOW_RAM_END {
            next = HIGH_RAM;
        }
        assert_eq!(*gpa, next, "pages are contiguous RAM");
        assert!(!flags.unmeasured() && !flags.shared());
        next += if flags.is_2mb_page() { LARGE_PAGE } else { PAGE };
        if flags.is_2mb_page() {
            assert!(data.is_empty(), "2 MiB pages are zero pages");
        }
        pages.insert(*gpa, (*data_type, data.clone()));
    }
    assert_eq!(next, memory);
    assert_eq!(pages[&SECRETS].0, IgvmPageDataType::SECRETS);
    assert_eq!(pages[&CPUID].0, IgvmPageDataType::CPUID_DATA);
    let read = |gpa: u64, len: usize| -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = gpa & !(PAGE - 1);
        while out.len() < len + (gpa - (gpa & !(PAGE - 1))) as usize {
            let (kind, data) = &pages[&at];
            assert_eq!(*kind, IgvmPageDataType::NORMAL);
            assert_eq!(data.len(), PAGE as usize, "page {at:#x} carries data");
            out.extend_from_slice(data);
            at += PAGE;
        }
        out[(gpa & (PAGE - 1)) as usize..][..len].to_vec()
    };

    // Boot parameters.
    let zero_page = read(BOOT_PARAMS, 4096);
    assert_eq!(&zero_page[0x202..0x206], b"HdrS");
    assert_eq!(zero_page[0x210], 0xff, "type_of_loader");
    assert_eq!(u64::from(u32_at(&zero_page, 0x228)), CMDLINE);
    let (initrd_at, initrd_len) = (u64::from(u32_at(&zero_page, 0x218)), u32_at(&zero_page, 0x21c) as usize);
    assert_eq!(initrd_len, initrd.len());
    assert!(initrd_at + initrd_len as u64 <= memory && initrd_at.is_multiple_of(PAGE));
    assert_eq!(u64::from(u32_at(&zero_page, 0x13c)), CC_BLOB, "cc_blob_address");
    assert_eq!(zero_page[0x1e8], 2, "e820 entries");
    let e820: Vec<(u64, u64, u32)> = (0..2)
        .map(|i| 0x2d0 + i * 20)
        .map(|o| (u64_at(&zero_page, o), u64_at(&zero_page, o + 8), u32_at(&zero_page, o + 16)))
        .collect();
    assert_eq!(e820, [(0, LOW_RAM_END, 1), (HIGH_RAM, memory - HIGH_RAM, 1)]);
    // The kernel, its command line and the initrd, byte for byte.
    let setup = (usize::from(kernel[0x1f1]).max(4) + 1) * 512;
    assert_eq!(read(HIGH_RAM, kernel.len() - setup), kernel[setup..]);
    assert_eq!(read(CMDLINE, cmdline.len() + 1), [cmdline.as_bytes(), &[0]].concat());
    assert_eq!(read(initrd_at, initrd.len()), initrd);
    assert!(
        initrd_at >= u64_at(&zero_page, 0x258) + u64::from(u32_at(&zero_page, 0x260)),
        "above the decompressed kernel"
    );
    // The SNP pages Linux finds through cc_blob_sev_info.
    let blob = read(CC_BLOB, 40);
    assert_eq!(&blob[0..4], b"AMDE");
    assert_eq!((u64_at(&blob, 8), u32_at(&blob, 16)), (SECRETS, 4096));
    assert_eq!((u64_at(&blob, 24), u32_at(&blob, 32)), (CPUID, 4096));
    // Identity page tables, C-bit set: the walk of any RAM address ends at itself.
    for gpa in [0u64, HIGH_RAM + 0x1234, initrd_at, memory - 1, (4 << 30) - 1] {
        let pml4e = u64_at(&read(PML4, 8), 0);
        assert_eq!(pml4e & C_BIT, C_BIT);
        let pdpt = pml4e & 0x000f_ffff_ffff_f000 & !C_BIT;
        let pdpte = u64_at(&read(pdpt + (gpa >> 30) * 8, 8), 0);
        let pd = pdpte & 0x000f_ffff_ffff_f000 & !C_BIT;
        let pde = u64_at(&read(pd + ((gpa >> 21) & 511) * 8, 8), 0);
        assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
        assert_eq!(pde & C_BIT, C_BIT);
        assert_eq!((pde & 0x000f_ffff_ffe0_0000 & !C_BIT) | (gpa & (LARGE_PAGE - 1)), gpa);
    }

    // The boot vCPU, last.
    let IgvmDirectiveHeader::SnpVpContext { gpa, compatibility_mask: 1, vp_index: 0, vmsa } = &last[0] else {
        panic!("the VMSA comes last")
    };
    assert_eq!(*gpa, VMSA_GPA);
    assert_eq!(vmsa.rip, HIGH_RAM + ENTRY_64);
    assert_eq!(vmsa.rsi, BOOT_PARAMS);
    assert_eq!(vmsa.cr3, PML4 | C_BIT);
    assert_eq!(vmsa.efer & 0x1500, 0x1500, "long mode active, SVME");
    assert_eq!(vmsa.cr0 & 0x8000_0001, 0x8000_0001, "paging, protected mode");
    assert_eq!(vmsa.cr4 & 0x20, 0x20, "PAE");
    assert_eq!(vmsa.cs.attrib & 0x200, 0x200, "64-bit code segment");
    assert!(vmsa.sev_features.snp());
    assert_eq!(u16_at(&kernel, 0x236) & 1, 1, "the kernel has a 64-bit entry");
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (kernel, initrd) = (synthetic_kernel(), synthetic_initrd());
    let err = |result: Result<Vec<u8>, IgvmError>| result.unwrap_err().to_string();
    assert!(err(build(&uvm(&kernel, &initrd, "", 32))).contains("between 64 and 2048 MiB"));
    assert!(err(build(&uvm(&kernel, &initrd, "", 4096))).contains("4096 MiB"));
    assert!(err(build(&uvm(&kernel[..100], &initrd, "", 64))).contains("cannot load the kernel"));
    let mut old = kernel.clone();
    old[0x236] = 0;
    assert!(err(build(&uvm(&old, &initrd, "", 64))).contains("no 64-bit entry point"));
    let huge = vec![0u8; 60 << 20];
    assert!(err(build(&uvm(&kernel, &huge, "", 64))).contains("do not fit in 64 MiB"));
    assert!(err(build(&uvm(&kernel, &initrd, &"x".repeat(3000), 64))).contains("command line"));

    let file = build(&uvm(&kernel, &initrd, "", 64)).unwrap();
    assert!(matches!(measure(&file, 0, None), Err(IgvmError::NoVcpus)));
    assert!(matches!(measure(&file, 2, None), Err(IgvmError::NeedVcpuType(2))));
    assert!(matches!(measure(&file, 2, Some("Pentium")), Err(IgvmError::UnknownVcpuType(_))));
    assert!(matches!(measure(&file[..file.len() - 1], 1, None), Err(IgvmError::Igvm(_))));
    assert!(matches!(measure(b"not an igvm file", 1, None), Err(IgvmError::Igvm(_))));

    // Directives whose effect on the digest is unknown, and files without a boot VMSA.
    let parsed = IgvmFile::new_from_binary(&file, Some(IsolationType::Snp)).unwrap();
    let rebuild = |directives: Vec<IgvmDirectiveHeader>| {
        let f = IgvmFile::new(
            igvm::IgvmRevision::V1,
            parsed.platforms().to_vec(),
            parsed.initializations().to_vec(),
            directives,
        )
        .unwrap();
        let mut out = Vec::new();
        f.serialize(&mut out).unwrap();
        out
    };
    let mut directives = parsed.directives().to_vec();
    let vmsa = directives.pop().unwrap();
    assert!(matches!(measure(&rebuild(directives.clone()), 1, None), Err(IgvmError::NoBootVmsa)));
    let mut extra = directives.clone();
    extra.push(vmsa.clone());
    if let IgvmDirectiveHeader::SnpVpContext { gpa, compatibility_mask, vmsa, .. } = &vmsa {
        extra.push(IgvmDirectiveHeader::SnpVpContext {
            gpa: *gpa,
            compatibility_mask: *compatibility_mask,
            vp_index: 3,
            vmsa: vmsa.clone(),
        });
    }
    assert!(matches!(measure(&rebuild(extra), 2, Some("EPYC-v4")), Err(IgvmError::ExtraVmsa(3, 2))));
    let mut required = directives;
    required.push(IgvmDirectiveHeader::RequiredMemory {
        gpa: 0x4000_0000,
        compatibility_mask: 1,
        number_of_bytes: 0x1000,
        vtl2_protectable: false,
    });
    required.push(vmsa);
    assert!(matches!(measure(&rebuild(required), 1, None), Err(IgvmError::Unsupported { .. })));
}
