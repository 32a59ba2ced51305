//! The INSECURE emulation provider against the verifier: emulated reports
//! and their ECDSA P-384 test chain pass every check only when insecure
//! emulation is allowed, and every other check still bites.

use parma_snp::emulation::{EMULATED_TCB, EmulatedFields, Signer, TestChain, test_chain};
use parma_snp::verify::ProductSource;
use parma_snp::{AttestationReport, CertSource, CheckName, Expectations, Product, Verification, verify};
use zerocopy::IntoBytes;

const SEED: [u8; 32] = *b"parma-snp emulation test seed 01";

fn fields() -> EmulatedFields {
    let mut measurement = [0u8; 48];
    measurement.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    EmulatedFields { measurement, host_data: [0xa5; 32], report_data: [0x5a; 64] }
}

fn report() -> AttestationReport {
    Signer::from_seed(&SEED).report(fields())
}

fn chain() -> TestChain {
    test_chain(&SEED).expect("test chain builds")
}

fn insecure() -> Expectations {
    Expectations { allow_insecure_emulation: true, ..Default::default() }
}

fn run(report: &AttestationReport, certs: &CertSource, expect: &Expectations) -> Verification {
    verify(report, certs, expect).expect("verification runs")
}

fn failed(v: &Verification) -> Vec<CheckName> {
    v.failed().map(|c| c.name).collect()
}

fn detail(v: &Verification, name: CheckName) -> String {
    v.check(name).and_then(|c| c.detail.clone()).unwrap_or_default()
}

const BASE_CHECKS: [CheckName; 12] = [
    CheckName::ReportVersion,
    CheckName::SignatureAlgorithm,
    CheckName::SigningKey,
    CheckName::Product,
    CheckName::ArkTrusted,
    CheckName::ArkSelfSigned,
    CheckName::AskSignedByArk,
    CheckName::VcekSignedByAsk,
    CheckName::ReportSignature,
    CheckName::VcekTcb,
    CheckName::VcekChipId,
    CheckName::DebugDisabled,
];

#[test]
fn an_emulated_report_passes_every_check_when_insecure_emulation_is_allowed() {
    let v = run(&report(), &chain().cert_source(), &insecure());
    assert!(v.all_passed(), "failed: {:?}", failed(&v));
    assert!(v.insecure_emulation());
    assert_eq!(v.checks().iter().map(|c| c.name).collect::<Vec<_>>(), BASE_CHECKS);
    assert_eq!(v.product(), Product::Milan);
    assert!(detail(&v, CheckName::ArkTrusted).starts_with("INSECURE"));
    assert!(detail(&v, CheckName::ArkTrusted).contains("Parma INSECURE emulation"));
    // The chain is ECDSA P-384 throughout: the verifier's ECDSA path checked it.
    for name in [CheckName::ArkSelfSigned, CheckName::AskSignedByArk, CheckName::VcekSignedByAsk] {
        assert_eq!(detail(&v, name), "ECDSA P-384 SHA-384", "{name}");
    }
    let json = serde_json::to_value(&v).expect("json");
    assert_eq!(json["insecure_emulation"], true);
    assert_eq!(json["all_passed"], true);
    assert_eq!(json["product_source"], serde_json::json!(ProductSource::ReportCpuid));
}

#[test]
fn without_the_flag_the_test_root_is_refused() {
    let v = run(&report(), &chain().cert_source(), &Expectations::default());
    assert_eq!(failed(&v), [CheckName::ArkTrusted]);
    assert!(!v.all_passed());
    assert!(!v.insecure_emulation());
    // Naming the product does not help.
    let milan = Expectations { product: Some(Product::Milan), ..Default::default() };
    assert_eq!(failed(&run(&report(), &chain().cert_source(), &milan)), [CheckName::ArkTrusted]);
}

#[test]
fn amd_roots_do_not_sign_the_test_vcek() {
    // The test VCEK alone: ASK and ARK are AMD's built-in ones, which did not sign it.
    let certs = CertSource::Memory { vcek: chain().vcek_der, ask: None, ark: None };
    let v = run(&report(), &certs, &insecure());
    assert_eq!(failed(&v), [CheckName::VcekSignedByAsk]);
    assert!(!v.insecure_emulation());
}

#[test]
fn expectations_are_enforced_on_emulated_reports() {
    let f = fields();
    let all = Expectations {
        measurement: Some(f.measurement),
        host_data: Some(f.host_data),
        report_data: Some(f.report_data),
        min_tcb: Some(EMULATED_TCB),
        ..insecure()
    };
    assert!(run(&report(), &chain().cert_source(), &all).all_passed());
    let (mut m, mut h, mut d) = (f.measurement, f.host_data, f.report_data);
    m[0] ^= 1;
    h[31] ^= 0x80;
    d[17] ^= 4;
    let mut tcb = EMULATED_TCB;
    tcb.snp += 1;
    let cases = [
        (Expectations { measurement: Some(m), ..insecure() }, CheckName::Measurement),
        (Expectations { host_data: Some(h), ..insecure() }, CheckName::HostData),
        (Expectations { report_data: Some(d), ..insecure() }, CheckName::ReportData),
        (Expectations { min_tcb: Some(tcb), ..insecure() }, CheckName::MinTcb),
    ];
    for (expect, name) in cases {
        let v = run(&report(), &chain().cert_source(), &expect);
        assert_eq!(failed(&v), [name]);
        assert!(!v.all_passed());
    }
}

#[test]
fn a_tampered_emulated_report_fails_the_signature() {
    let certs = chain().cert_source();
    let mut r = report();
    r.host_data[0] ^= 1;
    assert_eq!(failed(&run(&r, &certs, &insecure())), [CheckName::ReportSignature]);
    let mut r = report();
    r.signature.s[0] ^= 1;
    assert_eq!(failed(&run(&r, &certs, &insecure())), [CheckName::ReportSignature]);
    let mut r = report();
    r.policy.set(r.policy.get() | 1 << 19);
    assert_eq!(failed(&run(&r, &certs, &insecure())), [CheckName::ReportSignature, CheckName::DebugDisabled]);
}

#[test]
fn another_seed_is_another_chain() {
    let other = test_chain(&[0x42; 32]).expect("test chain builds");
    // This seed's report under another seed's chain: wrong key, wrong chip.
    let v = run(&report(), &other.cert_source(), &insecure());
    assert_eq!(failed(&v), [CheckName::ReportSignature, CheckName::VcekChipId]);
    // Mixed chains: the ECDSA chain checks catch a certificate from elsewhere.
    let mine = chain();
    let mixed = CertSource::Memory { vcek: mine.vcek_der.clone(), ask: Some(mine.ask_der), ark: Some(other.ark_der) };
    assert_eq!(failed(&run(&report(), &mixed, &insecure())), [CheckName::AskSignedByArk]);
    let mixed = CertSource::Memory { vcek: mine.vcek_der, ask: Some(other.ask_der), ark: Some(mine.ark_der) };
    assert_eq!(failed(&run(&report(), &mixed, &insecure())), [CheckName::AskSignedByArk, CheckName::VcekSignedByAsk]);
}

#[test]
fn reports_and_chains_are_deterministic() {
    assert_eq!(report().as_bytes(), Signer::from_seed(&SEED).report(fields()).as_bytes());
    assert_eq!(chain(), test_chain(&SEED).expect("test chain builds"));
    assert_ne!(report().as_bytes(), Signer::from_seed(&[0x42; 32]).report(fields()).as_bytes());
}

#[test]
fn emulated_reports_round_trip_through_binary_and_hex() {
    let r = report();
    assert_eq!(AttestationReport::parse(r.as_bytes()).expect("binary"), r);
    let text = hex::encode(r.as_bytes());
    assert_eq!(AttestationReport::parse(text.as_bytes()).expect("hex"), r);
    assert_eq!(AttestationReport::from_hex(&text.to_uppercase()).expect("hex"), r);
}

#[test]
fn the_chain_written_to_a_directory_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs_dir = dir.path().join("certs");
    chain().write_dir(&certs_dir).expect("write");
    for name in ["ark.pem", "ask.pem"] {
        let text = std::fs::read_to_string(certs_dir.join(name)).expect("read");
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"), "{name}");
    }
    assert_eq!(std::fs::read(certs_dir.join("vcek.der")).expect("read"), chain().vcek_der);
    let certs = CertSource::Dir(certs_dir);
    let v = run(&report(), &certs, &insecure());
    assert!(v.all_passed(), "failed: {:?}", failed(&v));
    assert_eq!(failed(&run(&report(), &certs, &Expectations::default())), [CheckName::ArkTrusted]);
}
