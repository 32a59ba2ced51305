//! The verifier: every check a relying party needs, each recorded with its
//! values, so that a caller (and `parma verify --json`) sees why a report
//! passed or failed.

use std::fmt;

use p384::ecdsa::signature::Verifier as _;
use serde::Serialize;

use crate::certs::{self, CertError, CertSource, Chain, Origin};
use crate::policy::PolicyBits;
use crate::report::{AttestationReport, Product, SigningKey, TcbVersion};

/// What the caller expects of the report beyond AMD's chain and the policy.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// The product line; `None` takes the report's CPUID (version 3 and
    /// later), else the VCEK issuer's name. It selects the built-in root.
    pub product: Option<Product>,
    /// The launch digest (MEASUREMENT).
    pub measurement: Option<[u8; 48]>,
    /// HOST_DATA (for Parma, the sha256 of the execution policy).
    pub host_data: Option<[u8; 32]>,
    /// REPORT_DATA; see [`Expectations::report_data_hex`] for shorter values.
    pub report_data: Option<[u8; 64]>,
    /// Every component of REPORTED_TCB must be at least this.
    pub min_tcb: Option<TcbVersion>,
    /// INSECURE: accept a root (ARK) that is not AMD's, as the emulation
    /// provider's test chain is. Such a report proves nothing about hardware.
    pub allow_insecure_emulation: bool,
}

/// A hex expectation that is not hex or has the wrong length.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexError {
    #[error("{what} is not hex")]
    NotHex { what: &'static str },
    #[error("{what} must be {expected} bytes, got {actual}")]
    Length { what: &'static str, expected: String, actual: usize },
}

fn decode_hex(what: &'static str, s: &str) -> Result<Vec<u8>, HexError> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(s).map_err(|_| HexError::NotHex { what })
}

fn hex_exact<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], HexError> {
    let bytes = decode_hex(what, s)?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| HexError::Length {
        what,
        expected: N.to_string(),
        actual: bytes.len(),
    })
}

impl Expectations {
    /// Expects a 48-byte measurement given as 96 hex digits.
    pub fn measurement_hex(mut self, s: &str) -> Result<Self, HexError> {
        self.measurement = Some(hex_exact("measurement", s)?);
        Ok(self)
    }

    /// Expects a 32-byte HOST_DATA given as 64 hex digits.
    pub fn host_data_hex(mut self, s: &str) -> Result<Self, HexError> {
        self.host_data = Some(hex_exact("host data", s)?);
        Ok(self)
    }

    /// Expects REPORT_DATA given as 1 to 64 bytes of hex; shorter values are
    /// zero padded on the right (a 32-byte hash fills the first half).
    pub fn report_data_hex(mut self, s: &str) -> Result<Self, HexError> {
        let bytes = decode_hex("report data", s)?;
        if bytes.is_empty() || bytes.len() > 64 {
            return Err(HexError::Length { what: "report data", expected: "1 to 64".to_owned(), actual: bytes.len() });
        }
        let mut full = [0u8; 64];
        full.iter_mut().zip(&bytes).for_each(|(d, s)| *d = *s);
        self.report_data = Some(full);
        Ok(self)
    }

    /// Expects the REPORT_DATA the agent makes in `domain` from 0 to 64
    /// bytes of hex (zero padded, as the request carried them): see
    /// [`crate::report_data`].
    pub fn report_data_in(mut self, domain: crate::report_data::Domain, s: &str) -> Result<Self, HexError> {
        let bytes = decode_hex("report data", s)?;
        if bytes.len() > 64 {
            return Err(HexError::Length { what: "report data", expected: "0 to 64".to_owned(), actual: bytes.len() });
        }
        let mut data = [0u8; 64];
        data.iter_mut().zip(&bytes).for_each(|(d, s)| *d = *s);
        self.report_data = Some(domain.report_data(&data));
        Ok(self)
    }
}

/// The name of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckName {
    /// The report's format version is one this verifier reads (2 to 5).
    ReportVersion,
    /// SIGNATURE_ALGO is 1 (ECDSA P-384 with SHA-384).
    SignatureAlgorithm,
    /// The report is signed by a VCEK (VLEK is not supported).
    SigningKey,
    /// The product agrees with the report's CPUID (version 3 and later).
    Product,
    /// The root (ARK) is AMD's built-in root for the product.
    ArkTrusted,
    ArkSelfSigned,
    AskSignedByArk,
    VcekSignedByAsk,
    /// The report's ECDSA P-384 signature over bytes 0..0x2A0 by the VCEK.
    ReportSignature,
    /// The VCEK's TCB extensions equal REPORTED_TCB.
    VcekTcb,
    /// The VCEK's hwID equals CHIP_ID.
    VcekChipId,
    /// The guest policy does not allow debugging.
    DebugDisabled,
    Measurement,
    HostData,
    ReportData,
    /// REPORTED_TCB is at least the caller's minimum.
    MinTcb,
}

impl fmt::Display for CheckName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CheckName {
    /// The name as `--json` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckName::ReportVersion => "report_version",
            CheckName::SignatureAlgorithm => "signature_algorithm",
            CheckName::SigningKey => "signing_key",
            CheckName::Product => "product",
            CheckName::ArkTrusted => "ark_trusted",
            CheckName::ArkSelfSigned => "ark_self_signed",
            CheckName::AskSignedByArk => "ask_signed_by_ark",
            CheckName::VcekSignedByAsk => "vcek_signed_by_ask",
            CheckName::ReportSignature => "report_signature",
            CheckName::VcekTcb => "vcek_tcb",
            CheckName::VcekChipId => "vcek_chip_id",
            CheckName::DebugDisabled => "debug_disabled",
            CheckName::Measurement => "measurement",
            CheckName::HostData => "host_data",
            CheckName::ReportData => "report_data",
            CheckName::MinTcb => "min_tcb",
        }
    }
}

/// One check and the values it compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: CheckName,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    fn compare(name: CheckName, expected: String, actual: String) -> Check {
        Check { name, passed: expected == actual, expected: Some(expected), actual: Some(actual), detail: None }
    }

    fn outcome(name: CheckName, result: Result<String, String>) -> Check {
        let passed = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        Check { name, passed, expected: None, actual: None, detail: Some(detail) }
    }

    fn detail(mut self, detail: impl Into<String>) -> Check {
        self.detail = Some(detail.into());
        self
    }
}

/// How the product was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductSource {
    Caller,
    ReportCpuid,
    VcekIssuer,
}

/// The report's fields, for display and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSummary {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: PolicyBits,
    pub family_id: String,
    pub image_id: String,
    pub vmpl: u32,
    pub signature_algo: u32,
    pub platform_info: String,
    pub author_key_en: bool,
    pub mask_chip_key: bool,
    pub signing_key: SigningKey,
    pub report_data: String,
    pub measurement: String,
    pub host_data: String,
    pub id_key_digest: String,
    pub author_key_digest: String,
    pub report_id: String,
    pub report_id_ma: String,
    pub current_tcb: TcbVersion,
    pub reported_tcb: TcbVersion,
    pub committed_tcb: TcbVersion,
    pub launch_tcb: TcbVersion,
    /// Family, model, stepping (version 3 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<[u8; 3]>,
    pub chip_id: String,
    pub current_firmware: String,
    pub committed_firmware: String,
}

impl ReportSummary {
    pub fn new(r: &AttestationReport, product: Product) -> ReportSummary {
        let layout = product.tcb_layout();
        ReportSummary {
            version: r.version.get(),
            guest_svn: r.guest_svn.get(),
            policy: r.policy().decoded(),
            family_id: hex::encode(r.family_id),
            image_id: hex::encode(r.image_id),
            vmpl: r.vmpl.get(),
            signature_algo: r.signature_algo.get(),
            platform_info: format!("{:#x}", r.platform_info.get()),
            author_key_en: r.author_key_en(),
            mask_chip_key: r.mask_chip_key(),
            signing_key: r.signing_key(),
            report_data: hex::encode(r.report_data),
            measurement: hex::encode(r.measurement),
            host_data: hex::encode(r.host_data),
            id_key_digest: hex::encode(r.id_key_digest),
            author_key_digest: hex::encode(r.author_key_digest),
            report_id: hex::encode(r.report_id),
            report_id_ma: hex::encode(r.report_id_ma),
            current_tcb: r.current_tcb.decode(layout),
            reported_tcb: r.reported_tcb.decode(layout),
            committed_tcb: r.committed_tcb.decode(layout),
            launch_tcb: r.launch_tcb.decode(layout),
            cpuid: (r.version.get() >= 3).then_some([r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step]),
            chip_id: hex::encode(r.chip_id),
            current_firmware: format!("{}.{}.{}", r.current_major, r.current_minor, r.current_build),
            committed_firmware: format!("{}.{}.{}", r.committed_major, r.committed_minor, r.committed_build),
        }
    }
}

/// The outcome: the product and chain used, the report's fields, and every
/// check with its values. It passes only if every check passed.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    product: Product,
    product_source: ProductSource,
    ark_origin: Origin,
    ask_origin: Origin,
    /// True when a root other than AMD's was accepted (allow_insecure_emulation).
    insecure_emulation: bool,
    all_passed: bool,
    report: ReportSummary,
    checks: Vec<Check>,
}

impl Verification {
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    pub fn check(&self, name: CheckName) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }

    pub fn product(&self) -> Product {
        self.product
    }

    pub fn insecure_emulation(&self) -> bool {
        self.insecure_emulation
    }

    pub fn report(&self) -> &ReportSummary {
        &self.report
    }
}

/// Verification could not start: certificates missing or unreadable, or no
/// way to tell the product.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("loading certificates")]
    Certs(#[from] CertError),
    #[error("cannot tell the product from the report or the VCEK: name it (milan, genoa or turin)")]
    UnknownProduct,
}

/// Verifies `report` against AMD's chain for the product, with the VCEK
/// (and optionally ASK and ARK) from `certs`, and checks `expect`.
///
/// Returns every check, passed or not; `Err` only when the certificates
/// cannot be loaded or the product cannot be told.
pub fn verify(
    report: &AttestationReport,
    certs: &CertSource,
    expect: &Expectations,
) -> Result<Verification, VerifyError> {
    let vcek = certs.load_vcek()?;
    let (product, product_source) = match (expect.product, report.cpuid_product(), certs::issuer_product(&vcek)) {
        (Some(p), _, _) => (p, ProductSource::Caller),
        (None, Some(p), _) => (p, ProductSource::ReportCpuid),
        (None, None, Some(p)) => (p, ProductSource::VcekIssuer),
        (None, None, None) => return Err(VerifyError::UnknownProduct),
    };
    let chain = certs.load(product, vcek)?;
    let (builtin_ark, _) = certs::builtin_roots(product)?;
    let layout = product.tcb_layout();
    let mut checks = Vec::new();

    let version = report.version.get();
    checks.push(Check {
        name: CheckName::ReportVersion,
        passed: (2..=5).contains(&version),
        expected: Some("2 to 5".to_owned()),
        actual: Some(version.to_string()),
        detail: None,
    });
    checks.push(Check::compare(
        CheckName::SignatureAlgorithm,
        "1 (ECDSA P-384 SHA-384)".to_owned(),
        match report.signature_algo.get() {
            1 => "1 (ECDSA P-384 SHA-384)".to_owned(),
            other => other.to_string(),
        },
    ));
    checks.push(Check::compare(CheckName::SigningKey, "vcek".to_owned(), report.signing_key().to_string()));
    checks.push(match report.cpuid_product() {
        Some(p) => Check::compare(CheckName::Product, product.to_string(), p.to_string()),
        None => Check::outcome(
            CheckName::Product,
            Ok(format!("{product} ({product_source:?}); the report (version {version}) names no known CPU")),
        ),
    });

    let insecure;
    checks.push(if certs::same_key(&chain.ark, &builtin_ark) {
        insecure = false;
        Check::outcome(CheckName::ArkTrusted, Ok(format!("AMD's {product} root ({:?})", chain.ark_origin)))
    } else if expect.allow_insecure_emulation {
        insecure = true;
        Check::outcome(
            CheckName::ArkTrusted,
            Ok(format!(
                "INSECURE: root {} is not AMD's {product} root, accepted because insecure emulation is allowed",
                chain.ark.tbs_certificate.subject
            )),
        )
    } else {
        insecure = false;
        Check::outcome(
            CheckName::ArkTrusted,
            Err(format!("root {} is not AMD's {product} root", chain.ark.tbs_certificate.subject)),
        )
    });
    checks.push(Check::outcome(CheckName::ArkSelfSigned, certs::check_signed_by(&chain.ark, &chain.ark)));
    checks.push(Check::outcome(CheckName::AskSignedByArk, certs::check_signed_by(&chain.ask, &chain.ark)));
    checks.push(Check::outcome(CheckName::VcekSignedByAsk, certs::check_signed_by(&chain.vcek, &chain.ask)));
    checks.push(Check::outcome(CheckName::ReportSignature, check_report_signature(report, &chain)));

    let reported = report.reported_tcb.decode(layout);
    checks.push(match vcek_tcb(&chain, product) {
        Ok(tcb) => Check::compare(CheckName::VcekTcb, tcb.to_string(), reported.to_string()),
        Err(e) => Check::outcome(CheckName::VcekTcb, Err(e)).actual_value(reported.to_string()),
    });
    checks.push(match certs::hw_id(&chain.vcek) {
        Ok(hw_id) => {
            // Turin VCEKs carry only the first 8 bytes of the chip id.
            let n = if product == Product::Turin && hw_id.len() == 8 { 8 } else { report.chip_id.len() };
            let actual = report.chip_id.get(..n).unwrap_or_default();
            Check::compare(CheckName::VcekChipId, hex::encode(&hw_id), hex::encode(actual))
        }
        Err(e) => Check::outcome(CheckName::VcekChipId, Err(e)).actual_value(hex::encode(report.chip_id)),
    });
    let policy = report.policy();
    checks.push(
        Check::compare(CheckName::DebugDisabled, "false".to_owned(), policy.debug_allowed().to_string())
            .detail(format!("policy {:#x}, debug is bit 19", policy.0)),
    );

    if let Some(m) = expect.measurement {
        checks.push(Check::compare(CheckName::Measurement, hex::encode(m), hex::encode(report.measurement)));
    }
    if let Some(h) = expect.host_data {
        checks.push(Check::compare(CheckName::HostData, hex::encode(h), hex::encode(report.host_data)));
    }
    if let Some(d) = expect.report_data {
        checks.push(Check::compare(CheckName::ReportData, hex::encode(d), hex::encode(report.report_data)));
    }
    if let Some(min) = expect.min_tcb {
        checks.push(Check {
            name: CheckName::MinTcb,
            passed: reported.meets(&min),
            expected: Some(format!(">= {min}")),
            actual: Some(reported.to_string()),
            detail: None,
        });
    }

    let mut verification = Verification {
        product,
        product_source,
        ark_origin: chain.ark_origin,
        ask_origin: chain.ask_origin,
        insecure_emulation: insecure,
        all_passed: false,
        report: ReportSummary::new(report, product),
        checks,
    };
    verification.all_passed = verification.all_passed();
    Ok(verification)
}

impl Check {
    fn actual_value(mut self, actual: String) -> Check {
        self.actual = Some(actual);
        self
    }
}

/// The VCEK's TCB extensions.
fn vcek_tcb(chain: &Chain, product: Product) -> Result<TcbVersion, String> {
    use certs::oid;
    let v = &chain.vcek;
    Ok(TcbVersion {
        fmc: if product == Product::Turin { Some(certs::spl(v, &oid::FMC_SPL)?) } else { None },
        bootloader: certs::spl(v, &oid::BL_SPL)?,
        tee: certs::spl(v, &oid::TEE_SPL)?,
        snp: certs::spl(v, &oid::SNP_SPL)?,
        microcode: certs::spl(v, &oid::UCODE_SPL)?,
    })
}

/// A 72-byte little-endian, zero-padded scalar as 48 big-endian bytes.
fn scalar_be(le: &[u8; 72]) -> Result<p384::FieldBytes, String> {
    let (value, padding) = le.split_at(48);
    if padding.iter().any(|&b| b != 0) {
        return Err("signature component is wider than 48 bytes".to_owned());
    }
    let mut be = p384::FieldBytes::default();
    be.iter_mut().zip(value.iter().rev()).for_each(|(d, s)| *d = *s);
    Ok(be)
}

fn check_report_signature(report: &AttestationReport, chain: &Chain) -> Result<String, String> {
    let key = certs::p384_key(&chain.vcek.tbs_certificate.subject_public_key_info)?;
    let r = scalar_be(&report.signature.r)?;
    let s = scalar_be(&report.signature.s)?;
    let sig = p384::ecdsa::Signature::from_scalars(r, s).map_err(|e| format!("signature: {e}"))?;
    key.verify(report.signed_bytes(), &sig).map_err(|_| "ECDSA P-384 signature invalid under the VCEK".to_owned())?;
    Ok("ECDSA P-384 SHA-384 over bytes 0..0x2A0, VCEK key".to_owned())
}
