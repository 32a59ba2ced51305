//! The launch digest of an IGVM file, as QEMU loads it and KVM launches it.

use std::collections::{BTreeMap, HashMap};

use igvm::snp_defs::SevVmsa;
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmPlatformHeader, IsolationType};
use igvm_defs::{IgvmPageDataType, IgvmPlatformType};
use serde::Serialize;
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType, VMSA};
use sha2::{Digest, Sha384};
use zerocopy::IntoBytes;

use crate::layout::{LARGE_PAGE, PAGE, VMSA_GPA};
use crate::{DIGEST_LEN, IgvmError};

/// SNP `PAGE_INFO.PAGE_TYPE` values (SNP firmware ABI, `SNP_LAUNCH_UPDATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Unmeasured = 4,
    Secrets = 5,
    Cpuid = 6,
}

/// How many pages of each type the launch measures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    /// Pages with contents.
    pub normal: u64,
    /// Zero pages (validated, contents not hashed).
    pub zero: u64,
    /// Unmeasured pages (parameter areas).
    pub unmeasured: u64,
    /// The secrets page.
    pub secrets: u64,
    /// The CPUID page.
    pub cpuid: u64,
    /// One VMSA per vCPU.
    pub vmsa: u64,
}

/// The result of measuring a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Measurement {
    /// The launch digest, lowercase hex.
    pub digest: String,
    /// vCPUs measured.
    pub vcpus: u32,
    /// The SNP guest policy the file asks for (not part of the digest).
    pub policy: Option<u64>,
    /// The end of the highest page the file loads, in MiB (rounded up): the
    /// guest memory QEMU must be given (`-m`).
    pub memory_mib: u64,
    /// Pages by type.
    pub pages: PageCounts,
}

/// The running launch digest: each page extends it by the SHA-384 of a
/// `PAGE_INFO` (previous digest, page contents digest, length, type, GPA).
struct Chain {
    digest: [u8; DIGEST_LEN],
    counts: PageCounts,
}

impl Chain {
    fn update(&mut self, page_type: PageType, gpa: u64, contents: [u8; DIGEST_LEN]) {
        const PAGE_INFO_LEN: u16 = 0x70;
        let mut hasher = Sha384::new();
        hasher.update(self.digest);
        hasher.update(contents);
        hasher.update(PAGE_INFO_LEN.to_le_bytes());
        hasher.update([page_type as u8, 0, 0, 0, 0, 0]); // type, IMI page, VMPL3..1 permissions, reserved
        hasher.update(gpa.to_le_bytes());
        self.digest = hasher.finalize().into();
        let count = match page_type {
            PageType::Normal => &mut self.counts.normal,
            PageType::Vmsa => &mut self.counts.vmsa,
            PageType::Zero => &mut self.counts.zero,
            PageType::Unmeasured => &mut self.counts.unmeasured,
            PageType::Secrets => &mut self.counts.secrets,
            PageType::Cpuid => &mut self.counts.cpuid,
        };
        *count += 1;
    }

    fn page(&mut self, gpa: u64, bytes: &[u8]) {
        let mut page = [0u8; PAGE as usize];
        let len = bytes.len().min(page.len());
        if let (Some(to), Some(from)) = (page.get_mut(..len), bytes.get(..len)) {
            to.copy_from_slice(from);
        }
        self.update(PageType::Normal, gpa, Sha384::digest(page).into());
    }
}

/// Measure an IGVM file for a launch with `vcpus` vCPUs. The boot vCPU's
/// VMSA comes from the file; vCPUs without one in the file start in the
/// reset state of `vcpu_type` (as QEMU's `-cpu` names it), which Linux
/// replaces through SNP AP creation, but KVM measures all the same.
pub fn measure(file: &[u8], vcpus: u32, vcpu_type: Option<&str>) -> Result<Measurement, IgvmError> {
    if vcpus == 0 {
        return Err(IgvmError::NoVcpus);
    }
    let igvm =
        IgvmFile::new_from_binary(file, Some(IsolationType::Snp)).map_err(|err| IgvmError::Igvm(err.to_string()))?;
    let mask = igvm
        .platforms()
        .iter()
        .find_map(|platform| match platform {
            IgvmPlatformHeader::SupportedPlatform(p) if p.platform_type == IgvmPlatformType::SEV_SNP => {
                Some(p.compatibility_mask)
            }
            _ => None,
        })
        .ok_or(IgvmError::NoSnpPlatform)?;
    let policy = igvm.initializations().iter().find_map(|header| match header {
        igvm::IgvmInitializationHeader::GuestPolicy { policy, compatibility_mask }
            if compatibility_mask & mask != 0 =>
        {
            Some(*policy)
        }
        _ => None,
    });

    let mut chain = Chain { digest: [0; DIGEST_LEN], counts: PageCounts::default() };
    let mut areas: HashMap<u32, u64> = HashMap::new();
    let mut contexts: BTreeMap<u16, &SevVmsa> = BTreeMap::new();
    let mut top = 0u64;
    for (index, directive) in igvm.directives().iter().enumerate() {
        if directive.compatibility_mask().is_some_and(|m| m & mask == 0) {
            continue;
        }
        let unsupported = |what: &str| IgvmError::Unsupported { index, what: what.to_string() };
        match directive {
            IgvmDirectiveHeader::PageData { gpa, flags, data_type, data, .. } => {
                if flags.shared() {
                    return Err(unsupported("a shared page"));
                }
                let size = if flags.is_2mb_page() { LARGE_PAGE } else { PAGE };
                if !gpa.is_multiple_of(size) {
                    return Err(IgvmError::Unaligned { index, gpa: *gpa });
                }
                top = top.max(gpa.saturating_add(size));
                for offset in (0..size).step_by(PAGE as usize) {
                    let at = gpa + offset;
                    match *data_type {
                        IgvmPageDataType::NORMAL if flags.unmeasured() => {
                            chain.update(PageType::Unmeasured, at, [0; DIGEST_LEN])
                        }
                        IgvmPageDataType::NORMAL if data.is_empty() => {
                            chain.update(PageType::Zero, at, [0; DIGEST_LEN])
                        }
                        IgvmPageDataType::NORMAL => {
                            chain.page(at, data.get(offset as usize..).unwrap_or_default());
                        }
                        IgvmPageDataType::SECRETS => chain.update(PageType::Secrets, at, [0; DIGEST_LEN]),
                        IgvmPageDataType::CPUID_DATA | IgvmPageDataType::CPUID_XF => {
                            chain.update(PageType::Cpuid, at, [0; DIGEST_LEN])
                        }
                        other => return Err(unsupported(&format!("page data type {other:?}"))),
                    }
                }
            }
            IgvmDirectiveHeader::ParameterArea { number_of_bytes, parameter_area_index, .. } => {
                areas.insert(*parameter_area_index, *number_of_bytes);
            }
            IgvmDirectiveHeader::ParameterInsert(insert) => {
                let bytes = *areas
                    .get(&insert.parameter_area_index)
                    .ok_or(IgvmError::UnknownParameterArea { index, area: insert.parameter_area_index })?;
                for offset in (0..bytes).step_by(PAGE as usize) {
                    chain.update(PageType::Unmeasured, insert.gpa + offset, [0; DIGEST_LEN]);
                }
                top = top.max(insert.gpa.saturating_add(bytes));
            }
            // Values QEMU writes into a parameter area: unmeasured pages.
            IgvmDirectiveHeader::VpCount(_)
            | IgvmDirectiveHeader::EnvironmentInfo(_)
            | IgvmDirectiveHeader::MemoryMap(_)
            | IgvmDirectiveHeader::Madt(_) => {}
            // The ID block signs the digest; it does not change it.
            IgvmDirectiveHeader::SnpIdBlock { .. } => {}
            IgvmDirectiveHeader::SnpVpContext { vp_index, vmsa, .. } => {
                contexts.insert(*vp_index, vmsa);
            }
            other => return Err(unsupported(&format!("{other:?}").chars().take(40).collect::<String>())),
        }
    }

    // KVM measures the VMSAs last, one per vCPU in order, at a fixed GPA.
    if let Some((&vp, _)) = contexts.range(u16::try_from(vcpus).unwrap_or(u16::MAX)..).next() {
        return Err(IgvmError::ExtraVmsa(vp, vcpus));
    }
    let boot = contexts.get(&0).ok_or(IgvmError::NoBootVmsa)?;
    let reset = if (contexts.len() as u32) < vcpus {
        let name = vcpu_type.ok_or(IgvmError::NeedVcpuType(vcpus))?;
        let cpu = CpuType::try_from(name).map_err(|_| IgvmError::UnknownVcpuType(name.to_string()))?;
        let features = GuestFeatures(boot.sev_features.into_bits());
        let pages = VMSA::new(0, cpu, VMMType::QEMU, None, features)
            .pages(1)
            .map_err(|err| IgvmError::ResetVmsa(err.to_string()))?;
        pages.into_iter().next()
    } else {
        None
    };
    for vp in 0..vcpus {
        let vmsa = match contexts.get(&(vp as u16)) {
            Some(vmsa) => vmsa.as_bytes(),
            None => reset.as_deref().ok_or(IgvmError::NeedVcpuType(vcpus))?,
        };
        let mut page = [0u8; PAGE as usize];
        let len = vmsa.len().min(page.len());
        if let (Some(to), Some(from)) = (page.get_mut(..len), vmsa.get(..len)) {
            to.copy_from_slice(from);
        }
        chain.update(PageType::Vmsa, VMSA_GPA, Sha384::digest(page).into());
    }
    Ok(Measurement {
        digest: hex::encode(chain.digest),
        vcpus,
        policy,
        memory_mib: top.div_ceil(1 << 20),
        pages: chain.counts,
    })
}
