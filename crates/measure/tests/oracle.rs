//! The launch digest equals the independent `sev-snp-measure` tool's, for
//! several vCPU counts, vCPU types and command lines: with Debian's OVMF.fd
//! (firmware only: it has no kernel-hashes section) and with the AmdSev
//! firmware tail plus its precomputed hash (direct boot with kernel,
//! initrd and cmdline, including the UVM's own files).

use std::path::{Path, PathBuf};
use std::process::Command;

use parma_measure::{DirectBoot, Launch, launch_digest};

const AMDSEV_HASH: &str =
    "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74";
const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The oracle, installed by scripts/oracle.sh (make test runs it first).
fn oracle() -> PathBuf {
    let path = std::env::var_os("PARMA_SNP_MEASURE")
        .map_or_else(|| repo().join("out/venv-oracle/bin/sev-snp-measure"), PathBuf::from);
    assert!(path.is_file(), "{} is missing: run scripts/oracle.sh (make test does)", path.display());
    path
}

fn oracle_digest(launch: &Launch) -> String {
    let mut command = Command::new(oracle());
    command.args(["--mode", "snp", "--vmm-type", "QEMU", "--vcpus", &launch.vcpus.to_string()]);
    command.args(["--vcpu-type", &launch.vcpu_type, "--ovmf"]).arg(&launch.ovmf);
    if let Some(hash) = &launch.ovmf_hash {
        command.args(["--snp-ovmf-hash", hash]);
    }
    if let Some(boot) = &launch.direct_boot {
        command.arg("--kernel").arg(&boot.kernel).arg("--initrd").arg(&boot.initrd);
        command.args(["--append", &boot.cmdline]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "sev-snp-measure failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn check(launch: &Launch) {
    let ours = hex::encode(launch_digest(launch).unwrap());
    assert_eq!(ours, oracle_digest(launch), "{launch:?}");
}

#[test]
fn debian_ovmf_without_kernel() {
    assert!(Path::new(DEBIAN_OVMF).is_file(), "{DEBIAN_OVMF} is missing: apt-get install ovmf (scripts/deps.sh does)");
    for vcpus in [1, 2, 4] {
        for vcpu_type in ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"] {
            check(&Launch {
                ovmf: DEBIAN_OVMF.into(),
                ovmf_hash: None,
                vcpus,
                vcpu_type: vcpu_type.into(),
                direct_boot: None,
                guest_features: 1,
            });
        }
    }
}

#[test]
fn amdsev_ovmf_with_kernel_initrd_cmdline() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&kernel, (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
    std::fs::write(&initrd, (0..123_457u32).map(|i| (i * 13 % 241) as u8).collect::<Vec<_>>()).unwrap();
    let ovmf = repo().join("qemu/ovmf/ovmf_AmdSev_suffix.bin");
    let mut digests = std::collections::HashSet::new();
    for (vcpus, vcpu_type, cmdline) in [
        (1, "EPYC-v4", "console=ttyS0"),
        (2, "EPYC-v4", "console=ttyS0 quiet panic=-1"),
        (4, "EPYC-Milan", ""),
        (3, "EPYC-Genoa", "console=ttyS0 parma.debug=0 with spaces and = signs"),
    ] {
        let launch = Launch {
            ovmf: ovmf.clone(),
            ovmf_hash: Some(AMDSEV_HASH.into()),
            vcpus,
            vcpu_type: vcpu_type.into(),
            direct_boot: Some(DirectBoot { kernel: kernel.clone(), initrd: initrd.clone(), cmdline: cmdline.into() }),
            guest_features: 1,
        };
        check(&launch);
        digests.insert(launch_digest(&launch).unwrap());
    }
    assert_eq!(digests.len(), 4, "different launches must give different digests");
}

#[test]
fn the_uvm_of_make_image() {
    let uvm = std::env::var_os("PARMA_UVM").map_or_else(|| repo().join("out/uvm"), PathBuf::from);
    assert!(uvm.join("vmlinuz").is_file(), "{} has no image: run `make image` first", uvm.display());
    let cmdline = std::fs::read_to_string(uvm.join("cmdline")).unwrap();
    let launch = Launch {
        ovmf: repo().join("qemu/ovmf/ovmf_AmdSev_suffix.bin"),
        ovmf_hash: Some(AMDSEV_HASH.into()),
        vcpus: 2,
        vcpu_type: "EPYC-v4".into(),
        direct_boot: Some(DirectBoot {
            kernel: uvm.join("vmlinuz"),
            initrd: uvm.join("initrd.img"),
            cmdline: cmdline.trim().into(),
        }),
        guest_features: 1,
    };
    check(&launch);
}
