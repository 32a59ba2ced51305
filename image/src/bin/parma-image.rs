//! `parma-image`: the image builder that `make image` and `scripts/` call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use parma_image::manifest::{FileDigest, IgvmDigest, Kernel, LaunchDigest, Manifest, SCHEMA};
use parma_image::{DEFAULT_CMDLINE, IGVM_MEMORY_MIB, files, initrd, kconfig};

#[derive(Parser)]
#[command(about = "Build the Parma UVM image")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that a final kernel .config has every option the fragments ask for.
    KconfigCheck {
        /// The .config after olddefconfig.
        #[arg(long)]
        config: PathBuf,
        /// The fragments.
        #[arg(required = true)]
        fragments: Vec<PathBuf>,
    },
    /// Write the UVM's initrd, cmdline and manifest next to its kernel.
    Assemble {
        /// The UVM directory, with vmlinuz and the kernel.* files already in it.
        #[arg(long)]
        uvm: PathBuf,
        /// The static init binary.
        #[arg(long)]
        init: PathBuf,
        /// The static agent binary.
        #[arg(long)]
        agent: PathBuf,
        /// `rustc -V` of the toolchain that built them.
        #[arg(long)]
        rustc: String,
        /// The kernel command line.
        #[arg(long, default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// Record the launch digest for this firmware (default profile: 1 vCPU, EPYC-v4).
        #[arg(long)]
        ovmf: Option<PathBuf>,
        /// The precomputed digest of the firmware pages, when --ovmf is its tail.
        #[arg(long)]
        ovmf_hash: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::KconfigCheck { config, fragments } => kconfig_check(&config, &fragments),
        Command::Assemble { uvm, init, agent, rustc, cmdline, ovmf, ovmf_hash } => {
            let firmware = ovmf.map(|ovmf| (ovmf, ovmf_hash));
            assemble(&uvm, &init, &agent, &rustc, &cmdline, firmware)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Write a file under a temporary name, then rename it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", tmp.display()))
}

fn kconfig_check(config: &Path, fragments: &[PathBuf]) -> anyhow::Result<()> {
    let final_config = read_text(config)?;
    let mut requirements = Vec::new();
    for fragment in fragments {
        let name = fragment.file_name().map_or_else(|| fragment.display().to_string(), |n| n.to_string_lossy().into());
        requirements.extend(kconfig::requirements(&name, &read_text(fragment)?));
    }
    let mismatches = kconfig::check(&final_config, &requirements);
    for mismatch in &mismatches {
        eprintln!("kernel config: {mismatch}");
    }
    if !mismatches.is_empty() {
        bail!("{} requested kernel option(s) did not survive olddefconfig", mismatches.len());
    }
    println!("kernel config: all {} requested options present", requirements.len());
    Ok(())
}

/// The default profile's launch digest.
fn launch_digest(uvm: &Path, cmdline: &str, ovmf: PathBuf, ovmf_hash: Option<String>) -> anyhow::Result<LaunchDigest> {
    let launch = parma_measure::Launch {
        ovmf: ovmf.clone(),
        ovmf_hash: ovmf_hash.clone(),
        vcpus: 1,
        vcpu_type: "EPYC-v4".into(),
        direct_boot: Some(parma_measure::DirectBoot {
            kernel: uvm.join(files::KERNEL),
            initrd: uvm.join(files::INITRD),
            cmdline: cmdline.to_string(),
        }),
        guest_features: 1,
    };
    let digest = parma_measure::launch_digest(&launch)?;
    Ok(LaunchDigest {
        profile: "QEMU direct boot, kernel-hashes=on, 1 vCPU EPYC-v4, the given OVMF".into(),
        digest: hex::encode(digest),
        vcpus: launch.vcpus,
        vcpu_type: launch.vcpu_type,
        ovmf: ovmf.display().to_string(),
        ovmf_hash,
    })
}

fn assemble(
    uvm: &Path,
    init: &Path,
    agent: &Path,
    rustc: &str,
    cmdline: &str,
    firmware: Option<(PathBuf, Option<String>)>,
) -> anyhow::Result<()> {
    let initrd = initrd::uvm(read(init)?, read(agent)?)?;
    let initrd_bytes = initrd.to_gz()?;
    write_atomic(&uvm.join(files::INITRD), &initrd_bytes)?;
    write_atomic(&uvm.join(files::CMDLINE), cmdline.as_bytes())?;
    let igvm = parma_igvm::build(&parma_igvm::Uvm {
        kernel: &read(&uvm.join(files::KERNEL))?,
        initrd: &initrd_bytes,
        cmdline,
        memory_mib: IGVM_MEMORY_MIB,
        guest_features: 1,
        policy: parma_igvm::DEFAULT_POLICY,
    })?;
    write_atomic(&uvm.join(files::IGVM), &igvm)?;
    let igvm = IgvmDigest {
        file: files::IGVM.into(),
        memory_mib: IGVM_MEMORY_MIB,
        vcpus: 1,
        digest: parma_igvm::measure(&igvm, 1, None)?.digest,
    };

    let config = read(&uvm.join(files::KERNEL_CONFIG))?;
    let mut digests = BTreeMap::new();
    for name in [files::KERNEL, files::INITRD, files::KERNEL_CONFIG, files::CMDLINE, files::IGVM] {
        let path = uvm.join(name);
        let digest = FileDigest::of_file(&path).with_context(|| format!("cannot hash {}", path.display()))?;
        digests.insert(name.to_string(), digest);
    }
    let manifest = Manifest {
        schema: SCHEMA,
        kernel: Kernel {
            source: read_text(&uvm.join(files::KERNEL_SOURCE))?.trim().to_string(),
            release: read_text(&uvm.join(files::KERNEL_RELEASE))?.trim().to_string(),
            config_sha256: FileDigest::of(&config).sha256,
        },
        rustc: rustc.trim().to_string(),
        cmdline: cmdline.to_string(),
        files: digests,
        initrd: initrd.listing(),
        launch: firmware.map(|(ovmf, hash)| launch_digest(uvm, cmdline, ovmf, hash)).transpose()?,
        igvm,
    };
    let mut json = serde_json::to_vec_pretty(&manifest)?;
    json.push(b'\n');
    write_atomic(&uvm.join(files::MANIFEST), &json)?;

    println!("{:<14} {:>10}  sha256", "file", "bytes");
    for (name, digest) in &manifest.files {
        println!("{name:<14} {:>10}  {}", digest.size, digest.sha256);
    }
    println!("kernel {} ({}), cmdline {:?}", manifest.kernel.release, manifest.kernel.source, manifest.cmdline);
    if let Some(launch) = &manifest.launch {
        println!("launch digest ({}): {}", launch.profile, launch.digest);
    }
    let igvm = &manifest.igvm;
    println!("launch digest (IGVM {}, {} MiB, 1 vCPU): {}", igvm.file, igvm.memory_mib, igvm.digest);
    Ok(())
}
