//! Reference values: what a relying party expects of a report from one
//! published UVM (a node image's runtime handler), signed by the release key.
//!
//! The document (`reference-values.json`) is an envelope around the exact
//! bytes that were signed, with the same key handling as policy fragments:
//! ECDSA P-384 with SHA-384 over the payload, the public key in
//! SubjectPublicKeyInfo DER, the issuer id the sha256 of that key.
//!
//! ```json
//! {"payload": "{\"schema\":1,\"handler\":\"parma-1a2b3c4d\",...}",
//!  "signature": "HEX (DER)", "public_key": "HEX (SPKI DER)"}
//! ```
//!
//! A report matches when one launch entry has its MEASUREMENT, the guest
//! policy equals the one listed, and REPORTED_TCB meets the minimum. When no
//! entry matches, the nearest (fewest differing fields) is named with every
//! field that differs.

use p384::ecdsa::signature::{Signer as _, Verifier as _};
use p384::ecdsa::{Signature, SigningKey, VerifyingKey};
use p384::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::report::{AttestationReport, Product, TcbVersion};

/// The version of the reference values' layout.
pub const SCHEMA: u32 = 1;
/// The largest reference-values document read.
pub const MAX_DOCUMENT: usize = 1 << 20;

/// Reference values of one runtime handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValues {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The runtime handler (`parma-` and the first 8 hex digits of the
    /// sha256 of the UVM's manifest).
    pub handler: String,
    /// sha256 of the UVM's `manifest.json`, lowercase hex.
    pub uvm_manifest_sha256: String,
    /// sha256 of the kernel's final `.config`.
    pub kernel_config_sha256: String,
    /// sha256 of the initrd.
    pub initrd_sha256: String,
    /// The kernel command line every boot path measures.
    pub cmdline: String,
    /// The guest policy a launch must have, hex (`0x30000`).
    pub guest_policy: String,
    /// The least REPORTED_TCB accepted (`bl=3,tee=0,snp=8,ucode=115`).
    pub min_tcb: String,
    /// How HOST_DATA is made: the rule, for the reader (the value is per pod).
    pub host_data: String,
    /// One entry per supported launch.
    pub launches: Vec<Launch>,
}

/// One supported launch and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// `igvm` (QEMU 10.1+ with the UVM's IGVM file) or `ovmf-kernel-hashes`
    /// (an AmdSevX64 OVMF measuring the kernel, initrd and command line).
    pub boot: String,
    /// vCPUs.
    pub vcpus: u32,
    /// The vCPU type (QEMU's `-cpu`).
    pub vcpu_type: String,
    /// Guest memory the digest fixes (IGVM), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// The firmware measured (OVMF), by name and hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// The launch digest, 96 hex digits.
    pub measurement: String,
}

impl Launch {
    /// One line naming the launch.
    pub fn describe(&self) -> String {
        format!("{} with {} vCPU {}", self.boot, self.vcpus, self.vcpu_type)
    }
}

/// The signed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// The reference values, exactly as signed (JSON text).
    pub payload: String,
    /// ECDSA P-384 signature over `payload` (SHA-384), DER, hex.
    pub signature: String,
    /// The release key, SubjectPublicKeyInfo DER, hex.
    pub public_key: String,
}

/// Reference values that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Larger than [`MAX_DOCUMENT`].
    #[error("the reference values are {0} bytes, more than the limit of {MAX_DOCUMENT}")]
    TooLarge(usize),
    /// Not the envelope.
    #[error("not a signed reference-values document {{payload, signature, public_key}}: {0}")]
    BadEnvelope(String),
    /// Not a P-384 key.
    #[error("the release key is not an ECDSA P-384 public key (SubjectPublicKeyInfo DER)")]
    BadKey,
    /// Not a signature.
    #[error("the signature is not an ECDSA P-384 signature")]
    BadSignature,
    /// The signature does not verify.
    #[error("the reference values' signature does not verify with release key {0}")]
    Forged(String),
    /// Signed by a key other than the one asked for.
    #[error("the reference values are signed by {actual}, not by the issuer {expected} asked for")]
    WrongIssuer { expected: String, actual: String },
    /// The payload is not reference values.
    #[error("the signed payload is not reference values (schema {SCHEMA}): {0}")]
    BadPayload(String),
    /// The release key cannot sign.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// The issuer id of a public key: sha256 of its SPKI DER, lowercase hex.
pub fn issuer_id(public_key_der: &[u8]) -> String {
    hex::encode(Sha256::digest(public_key_der))
}

impl Signed {
    /// Sign `values` with `key`. The payload is compact JSON; P-384 ECDSA
    /// signing is deterministic (RFC 6979), so the same values and key give
    /// the same document.
    pub fn sign(values: &ReferenceValues, key: &SigningKey) -> Result<Self, ReferenceError> {
        let payload = serde_json::to_string(values).map_err(|err| ReferenceError::Sign(err.to_string()))?;
        let signature: Signature = key.sign(payload.as_bytes());
        let public_key = key
            .verifying_key()
            .to_public_key_der()
            .map_err(|err| ReferenceError::Sign(err.to_string()))?
            .as_bytes()
            .to_vec();
        Ok(Self { payload, signature: hex::encode(signature.to_der().as_bytes()), public_key: hex::encode(public_key) })
    }

    /// Read an envelope.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReferenceError> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(ReferenceError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|err| ReferenceError::BadEnvelope(err.to_string()))
    }

    /// The release key's issuer id.
    pub fn issuer(&self) -> Result<String, ReferenceError> {
        let der = hex::decode(&self.public_key).map_err(|_| ReferenceError::BadKey)?;
        VerifyingKey::from_public_key_der(&der).map_err(|_| ReferenceError::BadKey)?;
        Ok(issuer_id(&der))
    }

    /// Check the signature (and the issuer, when one is given), then read
    /// the values.
    pub fn verify(&self, issuer: Option<&str>) -> Result<ReferenceValues, ReferenceError> {
        let der = hex::decode(&self.public_key).map_err(|_| ReferenceError::BadKey)?;
        let key = VerifyingKey::from_public_key_der(&der).map_err(|_| ReferenceError::BadKey)?;
        let actual = issuer_id(&der);
        if let Some(expected) = issuer
            && !expected.trim().eq_ignore_ascii_case(&actual)
        {
            return Err(ReferenceError::WrongIssuer { expected: expected.trim().to_owned(), actual });
        }
        let signature = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| Signature::from_der(&bytes).ok())
            .ok_or(ReferenceError::BadSignature)?;
        key.verify(self.payload.as_bytes(), &signature).map_err(|_| ReferenceError::Forged(actual))?;
        let values: ReferenceValues =
            serde_json::from_str(&self.payload).map_err(|err| ReferenceError::BadPayload(err.to_string()))?;
        if values.schema != SCHEMA {
            return Err(ReferenceError::BadPayload(format!("schema {}", values.schema)));
        }
        Ok(values)
    }
}

/// One field of a launch entry a report does not meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `measurement`, `guest_policy`, `min_tcb` or `host_data`.
    pub field: &'static str,
    /// What the reference values (or the caller) expect.
    pub expected: String,
    /// What the report has.
    pub actual: String,
}

/// How a report compares with the reference values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Comparison {
    /// This entry matches in every field.
    Matches(Launch),
    /// None matches; this one differs least.
    Nearest { launch: Launch, differences: Vec<Difference> },
    /// The values list no launch at all.
    Empty,
}

impl ReferenceValues {
    /// Compare `report` (of `product`, for its TCB layout) with every
    /// launch entry; `host_data`, when given, is checked too (the values
    /// state the rule, the caller knows the pod's policy).
    pub fn compare(&self, report: &AttestationReport, product: Product, host_data: Option<&[u8; 32]>) -> Comparison {
        let mut common = Vec::new();
        let policy = format!("{:#x}", report.policy().0);
        let expected_policy = u64::from_str_radix(self.guest_policy.trim_start_matches("0x"), 16).ok();
        if expected_policy != Some(report.policy().0) {
            common.push(Difference { field: "guest_policy", expected: self.guest_policy.clone(), actual: policy });
        }
        let reported = report.reported_tcb.decode(product.tcb_layout());
        match self.min_tcb.parse::<TcbVersion>() {
            Ok(min) if reported.meets(&min) => {}
            _ => common.push(Difference {
                field: "min_tcb",
                expected: format!("at least {}", self.min_tcb),
                actual: reported.to_string(),
            }),
        }
        if let Some(expected) = host_data
            && *expected != report.host_data
        {
            common.push(Difference {
                field: "host_data",
                expected: hex::encode(expected),
                actual: hex::encode(report.host_data),
            });
        }
        let measurement = hex::encode(report.measurement);
        let mut nearest: Option<(Launch, Vec<Difference>)> = None;
        for launch in &self.launches {
            let mut differences = common.clone();
            if !launch.measurement.eq_ignore_ascii_case(&measurement) {
                differences.insert(
                    0,
                    Difference {
                        field: "measurement",
                        expected: launch.measurement.clone(),
                        actual: measurement.clone(),
                    },
                );
            }
            if differences.is_empty() {
                return Comparison::Matches(launch.clone());
            }
            if nearest.as_ref().is_none_or(|(_, best)| differences.len() < best.len()) {
                nearest = Some((launch.clone(), differences));
            }
        }
        match nearest {
            Some((launch, differences)) => Comparison::Nearest { launch, differences },
            None => Comparison::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulation::{EmulatedFields, Signer};

    fn values() -> ReferenceValues {
        ReferenceValues {
            schema: SCHEMA,
            handler: "parma-01234567".into(),
            uvm_manifest_sha256: "01234567".repeat(8),
            kernel_config_sha256: "aa".repeat(32),
            initrd_sha256: "bb".repeat(32),
            cmdline: "console=ttyS0".into(),
            guest_policy: "0x30000".into(),
            min_tcb: "bl=3,tee=0,snp=8,ucode=115".into(),
            host_data: "sha256 of the pod's policy".into(),
            launches: vec![
                Launch {
                    boot: "igvm".into(),
                    vcpus: 1,
                    vcpu_type: "EPYC-v4".into(),
                    memory_mib: Some(512),
                    firmware: None,
                    measurement: "11".repeat(48),
                },
                Launch {
                    boot: "ovmf-kernel-hashes".into(),
                    vcpus: 2,
                    vcpu_type: "EPYC-v4".into(),
                    memory_mib: None,
                    firmware: Some("ovmf".into()),
                    measurement: "22".repeat(48),
                },
            ],
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 48]).unwrap()
    }

    #[test]
    fn signed_values_verify_and_are_deterministic() {
        let signed = Signed::sign(&values(), &key(7)).unwrap();
        assert_eq!(signed, Signed::sign(&values(), &key(7)).unwrap(), "RFC 6979: same key, same bytes");
        let text = serde_json::to_vec(&signed).unwrap();
        let parsed = Signed::parse(&text).unwrap();
        assert_eq!(parsed.verify(None).unwrap(), values());
        let issuer = parsed.issuer().unwrap();
        assert_eq!(parsed.verify(Some(&issuer.to_uppercase())).unwrap(), values());
        assert!(matches!(parsed.verify(Some(&"00".repeat(32))), Err(ReferenceError::WrongIssuer { .. })));
    }

    #[test]
    fn tampering_fails_on_the_signature() {
        let signed = Signed::sign(&values(), &key(7)).unwrap();
        let mut changed = signed.clone();
        changed.payload = changed.payload.replace("\"vcpus\":1", "\"vcpus\":3");
        assert_ne!(changed.payload, signed.payload);
        assert!(matches!(changed.verify(None), Err(ReferenceError::Forged(_))));
        let mut other_key = signed.clone();
        other_key.public_key = Signed::sign(&values(), &key(8)).unwrap().public_key;
        assert!(matches!(other_key.verify(None), Err(ReferenceError::Forged(_))));
        let mut bad = signed.clone();
        bad.signature = "00".into();
        assert_eq!(bad.verify(None), Err(ReferenceError::BadSignature));
        let mut bad = signed;
        bad.public_key = "zz".into();
        assert_eq!(bad.verify(None), Err(ReferenceError::BadKey));
        assert!(matches!(Signed::parse(b"{\"payload\": 1}"), Err(ReferenceError::BadEnvelope(_))));
        assert!(matches!(Signed::parse(&vec![b' '; MAX_DOCUMENT + 1]), Err(ReferenceError::TooLarge(_))));
    }

    #[test]
    fn a_report_matches_its_entry_or_names_the_nearest_and_the_field() {
        let signer = Signer::from_seed(&[5; 32]);
        let report =
            |measurement: u8| signer.report(EmulatedFields { measurement: [measurement; 48], ..Default::default() });
        let values = values();
        match values.compare(&report(0x22), Product::Milan, None) {
            Comparison::Matches(launch) => assert_eq!(launch.vcpus, 2),
            other => panic!("{other:?}"),
        }
        match values.compare(&report(0x33), Product::Milan, None) {
            Comparison::Nearest { differences, .. } => {
                assert_eq!(differences.len(), 1);
                assert_eq!(differences[0].field, "measurement");
                assert_eq!(differences[0].actual, "33".repeat(48));
            }
            other => panic!("{other:?}"),
        }
        // The HOST_DATA the caller expects, and a minimum TCB above the report's.
        let higher = ReferenceValues { min_tcb: "bl=3,tee=0,snp=9,ucode=115".into(), ..values.clone() };
        match higher.compare(&report(0x11), Product::Milan, Some(&[9; 32])) {
            Comparison::Nearest { launch, differences } => {
                assert_eq!(launch.boot, "igvm");
                let fields: Vec<_> = differences.iter().map(|d| d.field).collect();
                assert_eq!(fields, ["min_tcb", "host_data"]);
            }
            other => panic!("{other:?}"),
        }
        let other_policy = ReferenceValues { guest_policy: "0x30001".into(), ..values.clone() };
        assert!(matches!(
            other_policy.compare(&report(0x11), Product::Milan, None),
            Comparison::Nearest { differences, .. } if differences[0].field == "guest_policy"
        ));
        let empty = ReferenceValues { launches: vec![], ..values };
        assert_eq!(empty.compare(&report(0x11), Product::Milan, None), Comparison::Empty);
    }
}
