//! Policy fragments: containers a trusted issuer adds to a running policy.
//!
//! The base policy (whose hash is HOST_DATA) lists, in `fragments`, which
//! issuers may extend it, for which feed, from which minimum security
//! version (SVN): `{"issuer": ISSUER, "feed": "...", "minimum_svn": N}`. An
//! issuer is the sha256 (lowercase hex) of its public key, an ECDSA P-384
//! key in SubjectPublicKeyInfo DER. A fragment is a JSON document
//! `{"feed": "...", "svn": N, "containers": [...]}` (containers in the base
//! policy's format), signed by the issuer: ECDSA P-384 with SHA-384 over the
//! exact bytes. Feed and SVN are inside the signed bytes, so the host can
//! change neither.
//!
//! Loading one: check the signature, then the `load_fragment` enforcement
//! point decides on `{issuer, feed, svn}` (the framework: issuer and feed
//! listed, SVN at least the minimum, the feed not loaded yet); only when that
//! allows it are the fragment's containers added to the policy's data.

use p384::ecdsa::signature::Verifier;
use p384::ecdsa::{Signature, VerifyingKey};
use p384::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The largest fragment accepted, in bytes.
pub const MAX_FRAGMENT: usize = 256 * 1024;

/// A fragment as the host hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedFragment {
    /// The fragment document, exactly as signed.
    pub payload: Vec<u8>,
    /// ECDSA P-384 signature over `payload` (SHA-384): DER, or r || s (96 bytes).
    pub signature: Vec<u8>,
    /// The issuer's public key, SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
}

/// A fragment whose signature checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    /// sha256 of the issuer's public key (SPKI DER), lowercase hex.
    pub issuer: String,
    /// The feed it belongs to.
    pub feed: String,
    /// Its security version.
    pub svn: u64,
    /// The containers it adds.
    pub containers: Vec<serde_json::Value>,
}

/// A fragment that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// Larger than [`MAX_FRAGMENT`].
    #[error("fragment of {0} bytes exceeds the limit of {MAX_FRAGMENT} bytes")]
    TooLarge(usize),
    /// Not a P-384 public key in SPKI DER.
    #[error("the issuer key is not an ECDSA P-384 public key (SubjectPublicKeyInfo DER)")]
    BadKey,
    /// Not a signature in DER or r || s form.
    #[error("the signature is not an ECDSA P-384 signature")]
    BadSignature,
    /// The signature does not verify with the key.
    #[error("the fragment's signature does not verify with issuer {0}")]
    Forged(String),
    /// The document is not a fragment.
    #[error("the fragment is not a document {{\"feed\", \"svn\", \"containers\"}}: {0}")]
    BadDocument(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    feed: String,
    svn: u64,
    containers: Vec<serde_json::Value>,
}

/// The issuer id of a public key: sha256 of its SPKI DER, lowercase hex.
pub fn issuer_id(public_key: &[u8]) -> String {
    hex::encode(Sha256::digest(public_key))
}

/// The issuer id of a key that must be an ECDSA P-384 public key (SPKI DER).
pub fn issuer_of(public_key: &[u8]) -> Result<String, FragmentError> {
    VerifyingKey::from_public_key_der(public_key).map_err(|_| FragmentError::BadKey)?;
    Ok(issuer_id(public_key))
}

impl SignedFragment {
    /// Check the signature, then read the document.
    pub fn verify(&self) -> Result<Fragment, FragmentError> {
        if self.payload.len() > MAX_FRAGMENT {
            return Err(FragmentError::TooLarge(self.payload.len()));
        }
        let key = VerifyingKey::from_public_key_der(&self.public_key).map_err(|_| FragmentError::BadKey)?;
        let signature = Signature::from_der(&self.signature)
            .or_else(|_| Signature::from_slice(&self.signature))
            .map_err(|_| FragmentError::BadSignature)?;
        let issuer = issuer_id(&self.public_key);
        key.verify(&self.payload, &signature).map_err(|_| FragmentError::Forged(issuer.clone()))?;
        let document: Document =
            serde_json::from_slice(&self.payload).map_err(|err| FragmentError::BadDocument(err.to_string()))?;
        if document.containers.iter().any(|c| !c.get("name").is_some_and(serde_json::Value::is_string)) {
            return Err(FragmentError::BadDocument("every container needs a name".into()));
        }
        // A fragment's issuer is trusted to add containers, not to receive
        // the tenant's secrets: HOST_DATA does not change when a fragment
        // loads, so a key broker could not tell.
        if document.containers.iter().any(|c| c.get("secrets").is_some_and(|s| !s.is_null())) {
            return Err(FragmentError::BadDocument("a fragment's containers may not list secrets".into()));
        }
        Ok(Fragment { issuer, feed: document.feed, svn: document.svn, containers: document.containers })
    }
}

impl Fragment {
    /// The `load_fragment` point's input: issuer, feed, SVN and the names of
    /// the containers it adds (a name that is not a string is given as null,
    /// which matches no container and is refused when the fragment is added).
    pub fn input(&self) -> serde_json::Value {
        let names: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|c| c.get("name").filter(|n| n.is_string()).cloned().unwrap_or_default())
            .collect();
        serde_json::json!({"issuer": self.issuer, "feed": self.feed, "svn": self.svn, "containers": names})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p384::ecdsa::SigningKey;
    use p384::ecdsa::signature::Signer;
    use p384::pkcs8::EncodePublicKey;

    fn signed(payload: &str, seed: u8) -> SignedFragment {
        let key = SigningKey::from_slice(&[seed; 48]).unwrap();
        let signature: Signature = key.sign(payload.as_bytes());
        let public_key = key.verifying_key().to_public_key_der().unwrap().as_bytes().to_vec();
        SignedFragment {
            payload: payload.as_bytes().to_vec(),
            signature: signature.to_der().as_bytes().to_vec(),
            public_key,
        }
    }

    const DOC: &str = r#"{"feed": "contoso/sidecar", "svn": 3, "containers": [{"name": "sidecar", "layers": []}]}"#;

    #[test]
    fn a_signed_fragment_verifies() {
        let fragment = signed(DOC, 7).verify().unwrap();
        assert_eq!((fragment.feed.as_str(), fragment.svn, fragment.containers.len()), ("contoso/sidecar", 3, 1));
        assert_eq!(fragment.issuer, issuer_id(&signed(DOC, 7).public_key));
        assert_eq!(fragment.issuer.len(), 64);
        // r || s works as well as DER.
        let mut raw = signed(DOC, 7);
        raw.signature = Signature::from_der(&raw.signature).unwrap().to_bytes().to_vec();
        assert_eq!(raw.verify().unwrap(), fragment);
    }

    #[test]
    fn tampering_is_refused_by_name() {
        let mut payload = signed(DOC, 7);
        payload.payload = DOC.replace("\"svn\": 3", "\"svn\": 9").into_bytes();
        assert!(matches!(payload.verify(), Err(FragmentError::Forged(_))));
        let mut other_key = signed(DOC, 7);
        other_key.public_key = signed(DOC, 8).public_key;
        assert!(matches!(other_key.verify(), Err(FragmentError::Forged(_))));
        let mut bad_key = signed(DOC, 7);
        bad_key.public_key = b"not a key".to_vec();
        assert_eq!(bad_key.verify(), Err(FragmentError::BadKey));
        let mut bad_signature = signed(DOC, 7);
        bad_signature.signature = vec![1, 2, 3];
        assert_eq!(bad_signature.verify(), Err(FragmentError::BadSignature));
        let unnamed = signed(r#"{"feed": "f", "svn": 1, "containers": [{"layers": []}]}"#, 7);
        assert!(matches!(unnamed.verify(), Err(FragmentError::BadDocument(_))));
        let extra = signed(r#"{"feed": "f", "svn": 1, "containers": [], "allow_all": true}"#, 7);
        assert!(matches!(extra.verify(), Err(FragmentError::BadDocument(_))));
        let secrets = r#"{"feed": "f", "svn": 1, "containers": [{"name": "x", "secrets": [{"broker": "b", "resource": "r/t/a", "file": "f"}]}]}"#;
        let secrets = signed(secrets, 7);
        assert_eq!(
            secrets.verify(),
            Err(FragmentError::BadDocument("a fragment's containers may not list secrets".into()))
        );
        let huge = SignedFragment { payload: vec![b' '; MAX_FRAGMENT + 1], ..signed(DOC, 7) };
        assert_eq!(huge.verify(), Err(FragmentError::TooLarge(MAX_FRAGMENT + 1)));
    }
}
