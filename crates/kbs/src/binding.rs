//! What a report binds in the KBS exchange.
//!
//! Trustee's KBS hands the attestation service, for the primary evidence,
//! the runtime data
//!
//! ```json
//! {"tee-pubkey": JWK, "nonce": NONCE, "additional-evidence": ""}
//! ```
//!
//! (`additional-evidence` is the composite evidence's string of further
//! devices' evidence, empty for a guest with none), and the service
//! expects REPORT_DATA to be the SHA-384 of its RFC 8785 canonical form,
//! zero padded to 64 bytes (`kbs/src/attestation/backend.rs`,
//! `attestation-service/src/lib.rs`). guest-components' `kbs_protocol`
//! computes the same on the client's side. The last 16 bytes are zero,
//! which no other REPORT_DATA domain of Parma-rs produces (they are
//! SHA-512 outputs: see `parma_snp::report_data`).

use kbs_types::TeePubKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha384};

/// The runtime data a report binds: the broker's nonce and the TEE key.
pub fn runtime_data(nonce: &str, tee_pubkey: &TeePubKey) -> Value {
    json!({"tee-pubkey": tee_pubkey, "nonce": nonce, "additional-evidence": ""})
}

/// The RFC 8785 (JCS) bytes of a JSON value.
pub fn canonical(value: &Value) -> Result<Vec<u8>, BindingError> {
    serde_json_canonicalizer::to_vec(value).map_err(|err| BindingError(err.to_string()))
}

/// REPORT_DATA binding `runtime_data`: SHA-384 of its canonical form,
/// then 16 zero bytes.
pub fn report_data(runtime_data: &Value) -> Result<[u8; 64], BindingError> {
    let digest = Sha384::digest(canonical(runtime_data)?);
    let mut out = [0u8; 64];
    out.iter_mut().zip(digest.iter()).for_each(|(o, d)| *o = *d);
    Ok(out)
}

/// A value RFC 8785 cannot represent (a number out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the runtime data has no canonical form: {0}")]
pub struct BindingError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trustees_own_vector() {
        // attestation-service/src/lib.rs's test: Structured({"b": 1, "a":
        // "test", "c": {"d": "e"}}) with SHA-384.
        let value = json!({"b": 1, "a": "test", "c": {"d": "e"}});
        assert_eq!(canonical(&value).unwrap(), br#"{"a":"test","b":1,"c":{"d":"e"}}"#);
        assert_eq!(
            hex::encode(Sha384::digest(canonical(&value).unwrap())),
            "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3"
        );
    }

    #[test]
    fn the_binding_of_a_nonce_and_key() {
        let key = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "x-coordinate".into(),
            y: "y-coordinate".into(),
        };
        let data = runtime_data("a nonce", &key);
        assert_eq!(
            String::from_utf8(canonical(&data).unwrap()).unwrap(),
            r#"{"additional-evidence":"","nonce":"a nonce","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"x-coordinate","y":"y-coordinate"}}"#
        );
        // Python: hashlib.sha384(json.dumps(data, sort_keys=True,
        // separators=(",", ":")).encode()).hexdigest()
        let bound = report_data(&data).unwrap();
        assert_eq!(
            hex::encode(&bound[..48]),
            "a380434e16643841c4498a5accca1993eafc410117c63e08dc84453e5b9bbf5a9d9defb6342d20ca71194594eb5f7f1d"
        );
        assert_eq!(bound[48..], [0u8; 16]);
    }
}
