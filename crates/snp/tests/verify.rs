//! Known-answer and negative tests against a real AMD-signed Milan report
//! (fixtures and their provenance in tests/data/).

use std::path::{Path, PathBuf};

use parma_snp::report::{REPORT_SIZE, SigningKey};
use parma_snp::{
    AttestationReport, CertSource, CheckName, Expectations, ParseError, Product, TcbVersion, Verification, verify,
};
use zerocopy::IntoBytes;

const MEASUREMENT_PREFIX: &str = "7a1e5c266c0108db";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn report_hex() -> String {
    std::fs::read_to_string(data("report_milan.hex")).expect("fixture")
}

fn report() -> AttestationReport {
    AttestationReport::from_hex(&report_hex()).expect("fixture parses")
}

fn vcek() -> CertSource {
    CertSource::Vcek(data("vcek_milan.der"))
}

/// A directory with vcek.der and the KDS cert_chain (ASK + ARK).
fn cert_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(data("vcek_milan.der"), dir.path().join("vcek.der")).expect("copy");
    std::fs::copy(data("cert_chain_milan"), dir.path().join("cert_chain")).expect("copy");
    dir
}

fn run(report: &AttestationReport, certs: &CertSource, expect: &Expectations) -> Verification {
    verify(report, certs, expect).expect("verification runs")
}

fn failed(v: &Verification) -> Vec<CheckName> {
    v.failed().map(|c| c.name).collect()
}

/// Every expectation set, to the report's true values.
fn full_expectations(r: &AttestationReport) -> Expectations {
    Expectations {
        product: Some(Product::Milan),
        measurement: Some(r.measurement),
        host_data: Some(r.host_data),
        report_data: Some(r.report_data),
        min_tcb: Some(r.reported_tcb.decode(Product::Milan.tcb_layout())),
        allow_insecure_emulation: false,
    }
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
fn known_answers_from_the_milan_report() {
    let r = report();
    assert_eq!(r.version.get(), 2);
    assert!(hex::encode(r.measurement).starts_with(MEASUREMENT_PREFIX));
    assert_eq!(r.policy.get(), 0x30000);
    assert!(r.policy().smt_allowed() && !r.policy().debug_allowed());
    assert_eq!(r.host_data, [0u8; 32]);
    assert_eq!(r.signature_algo.get(), 1);
    assert_eq!(r.signing_key(), SigningKey::Vcek);
    assert_eq!(r.vmpl.get(), 0);
    // The VCEK's extensions say bl=3, tee=0, snp=8, ucode=115 (0x73).
    let tcb = r.reported_tcb.decode(Product::Milan.tcb_layout());
    assert_eq!(tcb, TcbVersion { fmc: None, bootloader: 3, tee: 0, snp: 8, microcode: 115 });
    assert_eq!(r.reported_tcb.as_u64(), 0x7308_0000_0000_0003);
}

#[test]
fn binary_and_hex_forms_parse_alike() {
    let r = report();
    let binary = r.as_bytes().to_vec();
    assert_eq!(binary.len(), REPORT_SIZE);
    assert_eq!(AttestationReport::parse(&binary).expect("binary").as_bytes(), binary.as_slice());
    // Lowercase, wrapped at 64 columns, with a trailing newline.
    let wrapped: String = report_hex()
        .trim()
        .to_lowercase()
        .as_bytes()
        .chunks(64)
        .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
        .collect();
    assert_eq!(AttestationReport::parse(wrapped.as_bytes()).expect("hex").as_bytes(), binary.as_slice());
    assert_eq!(AttestationReport::from_hex(&format!("  {} \r\n", report_hex())).expect("hex").as_bytes(), binary);
}

#[test]
fn truncated_and_non_hex_input_is_refused() {
    let hex = report_hex();
    let hex = hex.trim();
    assert_eq!(AttestationReport::parse(&hex.as_bytes()[..hex.len() - 2]), Err(ParseError::Length(REPORT_SIZE - 1)));
    assert_eq!(AttestationReport::from_hex(&hex[..hex.len() - 1]), Err(ParseError::OddDigits(2 * REPORT_SIZE - 1)));
    let mut bad = hex.to_owned();
    bad.replace_range(10..11, "g");
    assert_eq!(AttestationReport::parse(bad.as_bytes()), Err(ParseError::NotHex { position: 10, character: 'g' }));
    let binary = report().as_bytes().to_vec();
    assert_eq!(AttestationReport::parse(&binary[..REPORT_SIZE - 1]), Err(ParseError::NotAReport(REPORT_SIZE - 1)));
    assert_eq!(AttestationReport::from_bytes(&binary[..100]), Err(ParseError::Length(100)));
    assert_eq!(AttestationReport::parse(b""), Err(ParseError::NotAReport(0)));
}

#[test]
fn the_real_report_verifies_with_every_check_and_its_values() {
    let r = report();
    let dir = cert_dir();
    for certs in [vcek(), CertSource::Dir(dir.path().to_owned())] {
        let v = run(&r, &certs, &full_expectations(&r));
        assert!(v.all_passed(), "{certs:?}: failed {:?}", failed(&v));
        assert!(!v.insecure_emulation());
        assert_eq!(v.product(), Product::Milan);
        let names: Vec<CheckName> = v.checks().iter().map(|c| c.name).collect();
        let mut want = BASE_CHECKS.to_vec();
        want.extend([CheckName::Measurement, CheckName::HostData, CheckName::ReportData, CheckName::MinTcb]);
        assert_eq!(names, want);
        for c in v.checks() {
            assert!(c.detail.is_some() || (c.expected.is_some() && c.actual.is_some()), "{c:?} has no values");
        }
        let m = v.check(CheckName::Measurement).expect("measurement check");
        assert!(m.actual.as_deref().is_some_and(|a| a.starts_with(MEASUREMENT_PREFIX)));
        let tcb = v.check(CheckName::VcekTcb).expect("tcb check");
        assert_eq!(tcb.expected.as_deref(), Some("bl=3,tee=0,snp=8,ucode=115"));
        assert_eq!(v.check(CheckName::VcekChipId).and_then(|c| c.actual.as_ref()), Some(&hex::encode(r.chip_id)));
    }
}

#[test]
fn product_is_taken_from_the_vcek_issuer_when_not_given() {
    // A version 2 report has no CPUID; the VCEK says CN=SEV-Milan.
    let v = run(&report(), &vcek(), &Expectations::default());
    assert!(v.all_passed(), "failed {:?}", failed(&v));
    assert_eq!(v.product(), Product::Milan);
    assert_eq!(v.checks().len(), BASE_CHECKS.len());
}

#[test]
fn json_lists_every_check() {
    let r = report();
    let v = run(&r, &vcek(), &full_expectations(&r));
    let json = serde_json::to_value(&v).expect("serialises");
    assert_eq!(json["all_passed"], true);
    assert_eq!(json["product"], "milan");
    assert_eq!((&json["ark_origin"], &json["ask_origin"]), (&"built_in".into(), &"built_in".into()));
    let dir = cert_dir();
    let from_dir = serde_json::to_value(run(&r, &CertSource::Dir(dir.path().to_owned()), &Expectations::default()))
        .expect("serialises");
    assert_eq!((&from_dir["ark_origin"], &from_dir["all_passed"]), (&"caller".into(), &true.into()));
    assert_eq!(json["report"]["policy"]["raw"], "0x30000");
    assert_eq!(json["report"]["policy"]["debug_allowed"], false);
    let checks = json["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 16);
    assert!(checks.iter().all(|c| c["passed"] == true && c["name"].is_string()));
    assert_eq!(checks[0]["name"], "report_version");
}

#[test]
fn a_flipped_measurement_bit_breaks_the_signature() {
    let original = report();
    let mut r = original;
    r.measurement[0] ^= 1;
    let v = run(&r, &vcek(), &Expectations { measurement: Some(original.measurement), ..Default::default() });
    assert_eq!(failed(&v), [CheckName::ReportSignature, CheckName::Measurement]);
    assert!(!v.all_passed());
}

#[test]
fn a_flipped_bit_in_any_signed_field_breaks_the_signature() {
    let original = report();
    // One byte in each field the signature covers, at its first offset.
    for offset in
        [0x00, 0x04, 0x08, 0x10, 0x20, 0x30, 0x34, 0x38, 0x40, 0x48, 0x50, 0x90, 0xC0, 0xE0, 0x110, 0x140, 0x160]
            .into_iter()
            .chain([0x180, 0x188, 0x1A0, 0x1E0, 0x1E8, 0x1EC, 0x1F0, 0x1F8, 0x29F])
    {
        let mut bytes = original.as_bytes().to_vec();
        bytes[offset] ^= 0x10;
        let r = AttestationReport::from_bytes(&bytes).expect("still 1184 bytes");
        let v = run(&r, &vcek(), &Expectations { product: Some(Product::Milan), ..Default::default() });
        assert!(failed(&v).contains(&CheckName::ReportSignature), "offset {offset:#x}: {:?}", failed(&v));
    }
}

#[test]
fn a_flipped_signature_bit_fails() {
    for flip in
        [|r: &mut AttestationReport| r.signature.r[0] ^= 1, |r: &mut AttestationReport| r.signature.s[47] ^= 0x80]
    {
        let mut r = report();
        flip(&mut r);
        assert_eq!(failed(&run(&r, &vcek(), &Expectations::default())), [CheckName::ReportSignature]);
    }
    // Non-zero padding above the 48 scalar bytes is refused too.
    let mut r = report();
    r.signature.r[60] = 1;
    let v = run(&r, &vcek(), &Expectations::default());
    assert_eq!(failed(&v), [CheckName::ReportSignature]);
    assert!(v.check(CheckName::ReportSignature).and_then(|c| c.detail.as_ref()).is_some_and(|d| d.contains("wider")));
}

#[test]
fn the_genoa_roots_do_not_sign_the_milan_vcek() {
    // Built-in Genoa ASK and ARK for the Milan VCEK.
    let v = run(&report(), &vcek(), &Expectations { product: Some(Product::Genoa), ..Default::default() });
    assert_eq!(failed(&v), [CheckName::VcekSignedByAsk]);
    // The Milan chain from a directory, checked as Genoa: its root is not Genoa's.
    let dir = cert_dir();
    let v = run(
        &report(),
        &CertSource::Dir(dir.path().to_owned()),
        &Expectations { product: Some(Product::Genoa), ..Default::default() },
    );
    assert_eq!(failed(&v), [CheckName::ArkTrusted]);
    let turin = Expectations { product: Some(Product::Turin), ..Default::default() };
    assert!(failed(&run(&report(), &vcek(), &turin)).contains(&CheckName::VcekSignedByAsk));
}

#[test]
fn a_foreign_root_is_refused_unless_insecure_emulation_is_allowed() {
    // A caller-supplied ARK that is not AMD's Milan root (here Genoa's).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(data("vcek_milan.der"), dir.path().join("vcek.der")).expect("copy");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("roots/genoa-ark.pem"), dir.path().join("ark.pem"))
        .expect("copy");
    let certs = CertSource::Dir(dir.path().to_owned());
    let strict = Expectations { product: Some(Product::Milan), ..Default::default() };
    let v = run(&report(), &certs, &strict);
    assert_eq!(failed(&v), [CheckName::ArkTrusted, CheckName::AskSignedByArk]);
    assert!(!v.insecure_emulation());
    let insecure = Expectations { allow_insecure_emulation: true, ..strict };
    let v = run(&report(), &certs, &insecure);
    // The root is accepted (and the result says so), but it must still sign the chain.
    assert_eq!(failed(&v), [CheckName::AskSignedByArk]);
    assert!(v.insecure_emulation());
    let ark = v.check(CheckName::ArkTrusted).and_then(|c| c.detail.as_deref()).unwrap_or_default();
    assert!(ark.starts_with("INSECURE"), "{ark}");
    // AMD's own root never sets the insecure flag, allowed or not.
    assert!(!run(&report(), &vcek(), &insecure).insecure_emulation());
}

#[test]
fn a_wrong_vcek_fails() {
    // The ASK in place of the VCEK: not issued by the ASK, and not a P-384 key.
    let ask = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("roots/milan-ask.pem")).expect("read");
    let certs = CertSource::Memory { vcek: ask, ask: None, ark: None };
    let v = run(&report(), &certs, &Expectations { product: Some(Product::Milan), ..Default::default() });
    let f = failed(&v);
    for name in [CheckName::VcekSignedByAsk, CheckName::ReportSignature, CheckName::VcekTcb, CheckName::VcekChipId] {
        assert!(f.contains(&name), "{name} passed: {f:?}");
    }
}

#[test]
fn wrong_expectations_fail_by_one_bit() {
    let r = report();
    let mut m = r.measurement;
    m[47] ^= 1;
    let mut h = r.host_data;
    h[0] ^= 0x80;
    let mut d = r.report_data;
    d[63] ^= 1;
    let cases = [
        (Expectations { measurement: Some(m), ..Default::default() }, CheckName::Measurement),
        (Expectations { host_data: Some(h), ..Default::default() }, CheckName::HostData),
        (Expectations { report_data: Some(d), ..Default::default() }, CheckName::ReportData),
    ];
    for (expect, name) in cases {
        let v = run(&r, &vcek(), &expect);
        assert_eq!(failed(&v), [name]);
        let c = v.check(name).expect("check present");
        assert!(c.expected.is_some() && c.actual.is_some() && c.expected != c.actual);
    }
}

#[test]
fn hex_expectations() {
    let r = report();
    let e = Expectations::default()
        .measurement_hex(&hex::encode(r.measurement))
        .and_then(|e| e.host_data_hex(&"00".repeat(32)))
        .and_then(|e| e.report_data_hex(&hex::encode(r.report_data)))
        .expect("valid hex");
    assert!(run(&r, &vcek(), &e).all_passed());
    assert!(Expectations::default().measurement_hex("7a1e").is_err());
    assert!(Expectations::default().host_data_hex(&"zz".repeat(32)).is_err());
    assert!(Expectations::default().report_data_hex(&"00".repeat(65)).is_err());
    let short = Expectations::default().report_data_hex("0xabcd").expect("short report data");
    let want: Vec<u8> = [0xab, 0xcd].into_iter().chain([0; 62]).collect();
    assert_eq!(short.report_data.map(|d| d.to_vec()), Some(want));
}

#[test]
fn a_debug_policy_fails_both_the_policy_and_the_signature() {
    let mut r = report();
    r.policy.set(r.policy.get() | 1 << 19);
    assert!(r.policy().debug_allowed());
    let v = run(&r, &vcek(), &Expectations::default());
    assert_eq!(failed(&v), [CheckName::ReportSignature, CheckName::DebugDisabled]);
    let c = v.check(CheckName::DebugDisabled).expect("debug check");
    assert_eq!((c.expected.as_deref(), c.actual.as_deref()), (Some("false"), Some("true")));
}

#[test]
fn a_tcb_below_the_minimum_fails() {
    let r = report();
    let met: TcbVersion = "bl=3,tee=0,snp=8,ucode=115".parse().expect("tcb");
    let v = run(&r, &vcek(), &Expectations { min_tcb: Some(met), ..Default::default() });
    assert!(v.all_passed());
    for min in ["bl=4", "snp=9", "ucode=116", "bl=2,tee=1", "fmc=1"] {
        let min: TcbVersion = min.parse().expect("tcb");
        let v = run(&r, &vcek(), &Expectations { min_tcb: Some(min), ..Default::default() });
        assert_eq!(failed(&v), [CheckName::MinTcb], "{min}");
    }
}

#[test]
fn missing_certificates_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(verify(&report(), &CertSource::Dir(dir.path().to_owned()), &Expectations::default()).is_err());
    std::fs::write(dir.path().join("vcek.der"), b"not a certificate").expect("write");
    assert!(verify(&report(), &CertSource::Dir(dir.path().to_owned()), &Expectations::default()).is_err());
}
