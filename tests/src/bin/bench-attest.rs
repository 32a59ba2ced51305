//! `make bench`: the time to verify one SEV-SNP report (AMD chain
//! included) and to measure the default image's launch digest, each as a
//! ratio to a floor measured in the same run: for verification, the report's
//! ECDSA P-384 signature check alone; for measurement, the sha256 of the
//! kernel and initrd that any kernel-hashes measurement must compute; for the
//! IGVM file, the sha384 of the file. Writes `out/bench/attest.json`.

use std::time::{Duration, Instant};

use parma_snp::{AttestationReport, CertSource, Expectations};
use serde_json::json;
use sha2::{Digest, Sha256};

const ROUNDS: usize = 21;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples.get(samples.len() / 2).map_or(0.0, Duration::as_secs_f64)
}

fn time<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        f()?;
        samples.push(started.elapsed());
    }
    Ok(median(samples))
}

fn main() -> anyhow::Result<()> {
    let paths = parma_tests::Paths::require_image()?;
    let data = paths.repo.join("crates/snp/tests/data");
    let report = AttestationReport::parse(&std::fs::read(data.join("report_milan.hex"))?)?;
    let certs = CertSource::Vcek(data.join("vcek_milan.der"));
    let expect = Expectations::default();

    let verify_s = time(|| {
        let verification = parma_snp::verify(&report, &certs, &expect)?;
        anyhow::ensure!(verification.all_passed(), "the reference report must verify");
        Ok(())
    })?;
    // Floor: one report signature check alone (ECDSA P-384 over the signed
    // part), with the key already parsed: what any verifier must do.
    let signer = parma_snp::emulation::Signer::from_seed(&parma_snp::emulation::AGENT_SEED);
    let emulated = signer.report(Default::default());
    let key = signer.verifying_key();
    let bytes = zerocopy::IntoBytes::as_bytes(&emulated).to_vec();
    let signed = bytes.get(..0x2A0).unwrap_or_default().to_vec();
    let be = |offset: usize| -> Vec<u8> {
        let mut v = bytes.get(offset..offset + 48).unwrap_or_default().to_vec();
        v.reverse();
        v
    };
    let mut rs = be(0x2A0);
    rs.extend(be(0x2A0 + 72));
    let signature = p384::ecdsa::Signature::from_slice(&rs)?;
    let signature_s = time(|| {
        use p384::ecdsa::signature::Verifier;
        Ok(key.verify(&signed, &signature)?)
    })?;

    let ovmf = paths.repo.join("qemu/ovmf/ovmf_AmdSev_suffix.bin");
    let ovmf_hash = std::fs::read_to_string(paths.repo.join("qemu/ovmf/ovmf_AmdSev.hash"))?.trim().to_string();
    let cmdline = std::fs::read_to_string(paths.uvm.join("cmdline"))?.trim().to_string();
    let launch = parma_measure::Launch {
        ovmf: ovmf.clone(),
        ovmf_hash: Some(ovmf_hash),
        vcpus: 1,
        vcpu_type: "EPYC-v4".into(),
        direct_boot: Some(parma_measure::DirectBoot {
            kernel: paths.uvm.join("vmlinuz"),
            initrd: paths.uvm.join("initrd.img"),
            cmdline,
        }),
        guest_features: 1,
    };
    let digest = hex::encode(parma_measure::launch_digest(&launch)?);
    let measure_s = time(|| Ok(parma_measure::launch_digest(&launch)?))?;
    let files = [paths.uvm.join("vmlinuz"), paths.uvm.join("initrd.img")];
    let sha256_s = time(|| {
        let mut digests = Vec::new();
        for file in &files {
            digests.push(Sha256::digest(std::fs::read(file)?));
        }
        Ok(digests)
    })?;

    // The IGVM file: every page of 512 MiB is chained, so the floor is the
    // sha384 of the pages that carry data.
    let igvm = std::fs::read(paths.uvm.join("uvm.igvm"))?;
    let igvm_digest = parma_igvm::measure(&igvm, 1, None)?.digest;
    let igvm_s = time(|| Ok(parma_igvm::measure(&igvm, 1, None)?))?;
    let igvm_floor_s = time(|| Ok(sha2::Sha384::digest(&igvm)))?;

    let report_json = json!({
        "rounds": ROUNDS,
        "verify_ms": verify_s * 1e3,
        "signature_only_ms": signature_s * 1e3,
        "verify_ratio": verify_s / signature_s,
        "measure_ms": measure_s * 1e3,
        "sha256_of_kernel_initrd_ms": sha256_s * 1e3,
        "measure_ratio": measure_s / sha256_s,
        "default_launch_digest": digest,
        "measure_igvm_ms": igvm_s * 1e3,
        "sha384_of_igvm_file_ms": igvm_floor_s * 1e3,
        "measure_igvm_ratio": igvm_s / igvm_floor_s,
        "igvm_launch_digest": igvm_digest,
    });
    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("attest.json"), serde_json::to_string_pretty(&report_json)? + "\n")?;
    println!("{:<40} {:>10}", "attestation (median of 21)", "value");
    println!("{:<40} {:>7.3} ms", "verify one report, chain included", verify_s * 1e3);
    println!("{:<40} {:>7.3} ms", "floor: report signature alone", signature_s * 1e3);
    println!("{:<40} {:>10.1}", "ratio", verify_s / signature_s);
    println!("{:<40} {:>7.3} ms", "measure the default image", measure_s * 1e3);
    println!("{:<40} {:>7.3} ms", "floor: sha256 of kernel and initrd", sha256_s * 1e3);
    println!("{:<40} {:>10.2}", "ratio", measure_s / sha256_s);
    println!("{:<40} {:>7.3} ms", "measure the IGVM file", igvm_s * 1e3);
    println!("{:<40} {:>7.3} ms", "floor: sha384 of the IGVM file", igvm_floor_s * 1e3);
    println!("{:<40} {:>10.2}", "ratio", igvm_s / igvm_floor_s);
    println!("default launch digest: {digest}");
    println!("IGVM launch digest: {igvm_digest}");
    println!("wrote {}", out.join("attest.json").display());
    Ok(())
}
