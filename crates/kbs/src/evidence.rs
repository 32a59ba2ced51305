//! The SNP evidence of the `attest` step, in the shape Trustee's SNP
//! attester (guest-components `attester/src/snp`) sends and its verifier
//! (`deps/verifier/src/snp`) reads:
//!
//! ```json
//! {"attestation_report": REPORT, "cert_chain": null}
//! ```
//!
//! where REPORT is virtee `sev`'s `AttestationReport` in its serde form
//! (numbers, byte arrays as arrays of numbers, TCB versions as objects),
//! and `cert_chain` the extended report's certificate table, or `null`
//! when the verifier fetches the VCEK itself.

use serde_json::{Value, json};

/// A report that `sev` does not parse.
#[derive(Debug, thiserror::Error)]
#[error("the report does not parse as an SEV-SNP attestation report: {0}")]
pub struct EvidenceError(String);

/// The evidence for one report (its 1184 bytes), with no certificate table.
pub fn snp(report: &[u8]) -> Result<Value, EvidenceError> {
    use sev::parser::ByteParser as _;
    let parsed =
        sev::firmware::guest::AttestationReport::from_bytes(report).map_err(|err| EvidenceError(err.to_string()))?;
    Ok(json!({"attestation_report": parsed, "cert_chain": null}))
}

/// The report's bytes back from evidence (the broker's side).
pub fn report_bytes_of(evidence: &Value) -> Result<Vec<u8>, EvidenceError> {
    use sev::parser::ByteParser as _;
    let report = report_of(evidence)?;
    let bytes = report.to_bytes().map_err(|err| EvidenceError(err.to_string()))?;
    Ok(bytes.to_vec())
}

/// The report back from evidence (the test broker's side).
pub fn report_of(evidence: &Value) -> Result<sev::firmware::guest::AttestationReport, EvidenceError> {
    let report = evidence.get("attestation_report").ok_or_else(|| EvidenceError("no attestation_report".into()))?;
    serde_json::from_value(report.clone()).map_err(|err| EvidenceError(err.to_string()))
}
