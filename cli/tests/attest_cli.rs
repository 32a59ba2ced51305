//! `parma verify` and `parma measure`, as a relying party runs them.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parma(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parma")).args(args).current_dir(repo()).output().unwrap()
}

const REPORT: &str = "crates/snp/tests/data/report_milan.hex";
const VCEK: &str = "crates/snp/tests/data/vcek_milan.der";

#[test]
fn a_real_milan_report_verifies_and_expectations_are_enforced() {
    let out = parma(&["verify", "--report", REPORT, "--vcek", VCEK, "--product", "milan"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pass  report_signature"));

    // HOST_DATA of this report is all zero: any policy hash is refused.
    let policy_hash = "5541618991b19141a976bd776fa0b281292eba76cdf1f3da3602888f12defc52";
    let out = parma(&["verify", "--report", REPORT, "--vcek", VCEK, "--expect-host-data", policy_hash, "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["all_passed"], false);
    let checks = json["checks"].as_array().unwrap();
    let host_data = checks.iter().find(|c| c["name"] == "host_data").unwrap();
    assert_eq!(host_data["passed"], false);
    assert!(checks.iter().filter(|c| c["name"] != "host_data").all(|c| c["passed"] == true));

    // The Genoa roots do not sign a Milan chain.
    let out = parma(&["verify", "--report", REPORT, "--vcek", VCEK, "--product", "genoa"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn verify_errors_are_clear() {
    let out = parma(&["verify", "--report", "/nonexistent", "--vcek", VCEK]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent"));
    let out = parma(&["verify", "--report", REPORT]);
    assert!(!out.status.success(), "certificates are required");
}

#[test]
fn measure_prints_the_digest_of_the_firmware_alone_or_with_a_kernel() {
    let out = parma(&["measure", "--ovmf", "/usr/share/ovmf/OVMF.fd", "--vcpus", "2", "--vcpu-type", "EPYC-Milan"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let digest = String::from_utf8(out.stdout).unwrap();
    assert_eq!(digest.trim().len(), 96);
    let out = parma(&["measure", "--ovmf", "/usr/share/ovmf/OVMF.fd", "--vcpu-type", "Pentium"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown vCPU type \"Pentium\""));
}

#[test]
fn measure_an_igvm_file_and_launch_it() {
    // The digest make image recorded is the one `parma measure --igvm` computes.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join("out/uvm/manifest.json")).unwrap()).unwrap();
    let out = parma(&["measure", "--igvm", "out/uvm/uvm.igvm", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["launch_digest"], manifest["igvm"]["digest"]);
    assert_eq!(json["memory_mib"], 512);
    assert_eq!(json["pages"]["vmsa"], 1);
    assert_eq!(json["policy"], "0x30000");
    // A second vCPU starts in the reset state of its type: another digest.
    let two = parma(&["measure", "--igvm", "out/uvm/uvm.igvm", "--vcpus", "2", "--vcpu-type", "EPYC-Genoa"]);
    assert!(two.status.success(), "{}", String::from_utf8_lossy(&two.stderr));
    assert_ne!(String::from_utf8_lossy(&two.stdout).trim(), json["launch_digest"].as_str().unwrap());
    let out = parma(&["measure", "--igvm", "out/uvm/initrd.img"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot measure out/uvm/initrd.img"));
    let out = parma(&["measure"]);
    assert!(!out.status.success(), "a firmware or an IGVM file is required");

    // The same command without a way to boot the guest is refused, with the fix.
    let snp = |extra: &[&str]| {
        let mut args = vec!["vm", "run", "--uvm", "out/uvm", "--control", "/tmp/c.sock", "--accel", "kvm", "--snp"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--policy", "policies/allow_all.rego", "--print-command"]);
        parma(&args)
    };
    let out = snp(&["--igvm", "out/uvm/uvm.igvm", "--memory", "2048"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("-object igvm-cfg,id=igvm0,file=out/uvm/uvm.igvm"), "{line}");
    assert!(line.contains("igvm-cfg=igvm0") && line.contains("-m 512 "), "the file's memory wins: {line}");
    assert!(!line.contains("-kernel") && !line.contains("kernel-hashes"), "{line}");
    let out = snp(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--snp needs --ovmf FILE"), "{stderr}");
}

#[test]
fn snp_command_line_carries_the_policy_hash_as_host_data() {
    let out = parma(&[
        "vm",
        "run",
        "--uvm",
        "out/uvm",
        "--control",
        "/tmp/c.sock",
        "--accel",
        "kvm",
        "--snp",
        "--ovmf",
        "qemu/ovmf/ovmf_AmdSev_suffix.bin",
        "--policy",
        "policies/allow_all.rego",
        "--print-command",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let hash = parma(&["policy", "hash", "policies/allow_all.rego"]);
    let hash = hex::decode(String::from_utf8(hash.stdout).unwrap().trim()).unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(hash);
    assert!(line.contains(&format!("kernel-hashes=on,host-data={b64}")), "{line}");
    let out = parma(&[
        "vm",
        "run",
        "--uvm",
        "out/uvm",
        "--control",
        "/tmp/c.sock",
        "--snp",
        "--ovmf",
        "qemu/ovmf/ovmf_AmdSev_suffix.bin",
        "--policy",
        "policies/allow_all.rego",
        "--print-command",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --accel kvm"));
}

#[test]
fn run_snp_script_and_parma_agree_on_the_command_line() {
    // A stand-in QEMU that prints its arguments, one per line.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("qemu-system-x86_64");
    std::fs::write(&fake, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap());
    let policy = "policies/allow_all.rego";
    let host_data: [u8; 32] = hex::decode(String::from_utf8(parma(&["policy", "hash", policy]).stdout).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let uvm = repo().join("out/uvm");
    let ovmf = repo().join("qemu/ovmf/ovmf_AmdSev_suffix.bin");
    for (first, boot) in [
        (ovmf.to_str().unwrap(), parma_host::SnpBoot::KernelHashes { ovmf: ovmf.clone() }),
        ("--igvm", parma_host::SnpBoot::Igvm(uvm.join("uvm.igvm"))),
    ] {
        let out = Command::new("bash")
            .arg("qemu/run-snp.sh")
            .args([first, policy, uvm.to_str().unwrap(), "/tmp/c.sock"])
            .env("PATH", &path)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let script: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
        let mut config = parma_host::VmConfig::new(&uvm, "/tmp/c.sock");
        config.accel = parma_host::Accel::Kvm;
        config.snp = Some(parma_host::Snp { boot, host_data, vcpu_type: "EPYC-v4".into() });
        let ours: Vec<String> = config.args().unwrap().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(script, ours, "qemu/run-snp.sh {first}");
    }
}

/// `parma kbs reference-values`: the node image's signed values as
/// Trustee's reference values and a resource policy for a pod's policy;
/// a tampered file or another issuer is refused.
#[test]
fn kbs_reference_values_come_from_signed_values_only() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("release.pem");
    let out = parma(&["node", "keygen", "--out", key_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = std::fs::read_to_string(&key_path).unwrap();
    let key = <p384::ecdsa::SigningKey as p384::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&pem).unwrap();
    let values: parma_snp::reference::ReferenceValues = serde_json::from_value(serde_json::json!({
        "schema": 1, "handler": "parma-0123abcd", "uvm_manifest_sha256": "", "kernel_config_sha256": "",
        "initrd_sha256": "", "cmdline": "", "guest_policy": "0x30000", "min_tcb": "bl=3,tee=0,snp=8,ucode=115",
        "host_data": "sha256 of the policy",
        "launches": [{"boot": "igvm", "vcpus": 1, "vcpu_type": "EPYC-v4", "measurement": "ab".repeat(48)}],
    }))
    .unwrap();
    let signed = parma_snp::reference::Signed::sign(&values, &key).unwrap();
    let path = dir.path().join("reference-values.json");
    std::fs::write(&path, serde_json::to_vec(&signed).unwrap()).unwrap();
    let policy = "policies/allow_all.rego";
    let hash = parma(&["policy", "hash", policy]);
    let hash = String::from_utf8(hash.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    let issuer = signed.issuer().unwrap();
    let args = |values: &std::path::Path, issuer: &str| {
        [
            "kbs",
            "reference-values",
            "--values",
            values.to_str().unwrap(),
            "--policy",
            policy,
            "--json",
            "--issuer",
            issuer,
        ]
        .map(String::from)
    };
    let kbs =
        |args: &[String]| Command::new(env!("CARGO_BIN_EXE_parma")).args(args).current_dir(repo()).output().unwrap();
    let out = kbs(&args(&path, &issuer));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reference_values"]["snp_launch_measurement"], serde_json::json!(["ab".repeat(48)]));
    assert_eq!(json["host_data"], hash);
    assert!(json["resource_policy"].as_str().unwrap().contains(&format!("snp.init_data == \"{hash}\"")));
    // The signer is always checked: without --issuer, or with another
    // one, nothing is written.
    let out = kbs(&args(&path, &issuer)[..7]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--issuer"));
    let out = kbs(&args(&path, &"00".repeat(32)));
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(format!("{:?}", String::from_utf8_lossy(&out.stderr)).contains("not by the issuer"));
    // A changed value breaks the signature.
    let tampered = dir.path().join("tampered.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("0x30000", "0x31000");
    std::fs::write(&tampered, text).unwrap();
    let out = kbs(&args(&tampered, &issuer));
    assert!(!out.status.success() && out.stdout.is_empty());
}
