//! `parma measure`: the launch digest an SEV-SNP launch of the UVM must have.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::output::print;

#[derive(Args)]
pub struct MeasureArgs {
    /// The UVM directory: its vmlinuz, initrd.img and cmdline are measured
    /// through the firmware's kernel-hashes table. Without it, the firmware alone.
    #[arg(long, conflicts_with = "igvm")]
    uvm: Option<PathBuf>,
    /// The firmware: an OVMF build (AmdSevX64 for direct boot), or its last
    /// pages when --ovmf-hash gives the digest of the rest.
    #[arg(long, required_unless_present = "igvm", conflicts_with = "igvm")]
    ovmf: Option<PathBuf>,
    /// Measure an IGVM file (out/uvm/uvm.igvm) as QEMU 10.1+ and KVM launch
    /// it, instead of a firmware launch.
    #[arg(long)]
    igvm: Option<PathBuf>,
    /// Precomputed digest of the firmware pages (96 hex digits).
    #[arg(long)]
    ovmf_hash: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// vCPU type, as QEMU's -cpu names it (EPYC-v4, EPYC-Milan, EPYC-Genoa, ...).
    #[arg(long, default_value = "EPYC-v4")]
    vcpu_type: String,
    /// The kernel command line (default: the UVM's cmdline file).
    #[arg(long)]
    append: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn execute(args: MeasureArgs) -> anyhow::Result<i32> {
    if let Some(file) = &args.igvm {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let measured = parma_igvm::measure(&bytes, args.vcpus, Some(&args.vcpu_type))
            .with_context(|| format!("cannot measure {}", file.display()))?;
        let json = serde_json::json!({
            "launch_digest": measured.digest,
            "igvm": file,
            "vcpus": measured.vcpus,
            "vcpu_type": args.vcpu_type,
            "memory_mib": measured.memory_mib,
            "policy": measured.policy.map(|p| format!("{p:#x}")),
            "pages": measured.pages,
        });
        return print(args.json, &json, |_| measured.digest.clone());
    }
    let Some(ovmf) = args.ovmf else { anyhow::bail!("give --ovmf FILE or --igvm FILE") };
    let direct_boot = match &args.uvm {
        None => None,
        Some(uvm) => {
            let cmdline = match args.append {
                Some(cmdline) => cmdline,
                None => std::fs::read_to_string(uvm.join(parma_image::files::CMDLINE))
                    .with_context(|| format!("cannot read the cmdline of {}", uvm.display()))?
                    .trim()
                    .to_string(),
            };
            Some(parma_measure::DirectBoot {
                kernel: uvm.join(parma_image::files::KERNEL),
                initrd: uvm.join(parma_image::files::INITRD),
                cmdline,
            })
        }
    };
    let launch = parma_measure::Launch {
        ovmf,
        ovmf_hash: args.ovmf_hash,
        vcpus: args.vcpus,
        vcpu_type: args.vcpu_type,
        direct_boot,
        guest_features: 1,
    };
    let digest = hex::encode(parma_measure::launch_digest(&launch)?);
    let json = serde_json::json!({
        "launch_digest": digest,
        "vcpus": launch.vcpus,
        "vcpu_type": launch.vcpu_type,
        "ovmf": launch.ovmf,
        "cmdline": launch.direct_boot.as_ref().map(|b| b.cmdline.clone()),
    });
    print(args.json, &json, |_| digest.clone())
}
