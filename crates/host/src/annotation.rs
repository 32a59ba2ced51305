//! The pod's policy as a Kubernetes annotation: `io.parma.policy` holds
//! base64 of the gzip'd Rego (annotations of one object share 256 KiB, so
//! the policy goes compressed), as Kata carries its policy in
//! `io.katacontainers.config.agent.policy`. The runtime decodes it with
//! bounds on both sides: the annotation comes through the orchestrator,
//! which the tenant does not trust either (what it decodes is only ever
//! the policy whose hash the UVM is launched with, so a wrong one fails
//! attestation, but it must not exhaust the node first).

use std::io::{Read, Write};

use base64::Engine as _;

/// The annotation's key.
pub const POLICY_ANNOTATION: &str = "io.parma.policy";
/// The longest annotation value accepted (Kubernetes' limit for all of an
/// object's annotations together).
pub const MAX_ENCODED: usize = 256 * 1024;
/// The largest policy it may decompress to.
pub const MAX_POLICY: usize = 4 * 1024 * 1024;

/// Why an annotation is not a policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    /// Longer than [`MAX_ENCODED`].
    #[error("the {POLICY_ANNOTATION} annotation is {0} bytes; at most {MAX_ENCODED}")]
    TooLong(usize),
    /// Not standard base64.
    #[error("the {POLICY_ANNOTATION} annotation is not base64: {0}")]
    NotBase64(String),
    /// Not a gzip stream (or a damaged one).
    #[error("the {POLICY_ANNOTATION} annotation is not gzip'd: {0}")]
    NotGzip(String),
    /// Decompresses to more than [`MAX_POLICY`].
    #[error("the {POLICY_ANNOTATION} annotation decompresses to more than {MAX_POLICY} bytes")]
    TooLarge,
    /// Not UTF-8 text.
    #[error("the {POLICY_ANNOTATION} annotation is not UTF-8 text")]
    NotText,
    /// Empty.
    #[error("the {POLICY_ANNOTATION} annotation is empty")]
    Empty,
}

/// `rego` as the annotation's value: base64 (standard, padded) of gzip at
/// the best compression, with no file name or time in the header, so the
/// same policy always gives the same value.
pub fn encode(rego: &str) -> String {
    let mut gzip = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = gzip.write_all(rego.as_bytes());
    let bytes = gzip.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The policy an annotation value carries.
pub fn decode(value: &str) -> Result<String, AnnotationError> {
    let value = value.trim();
    if value.len() > MAX_ENCODED {
        return Err(AnnotationError::TooLong(value.len()));
    }
    if value.is_empty() {
        return Err(AnnotationError::Empty);
    }
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|err| AnnotationError::NotBase64(err.to_string()))?;
    let mut policy = Vec::new();
    // One byte more than allowed tells a policy at the limit from a larger one.
    flate2::read::GzDecoder::new(compressed.as_slice())
        .take(MAX_POLICY as u64 + 1)
        .read_to_end(&mut policy)
        .map_err(|err| AnnotationError::NotGzip(err.to_string()))?;
    if policy.len() > MAX_POLICY {
        return Err(AnnotationError::TooLarge);
    }
    if policy.is_empty() {
        return Err(AnnotationError::Empty);
    }
    String::from_utf8(policy).map_err(|_| AnnotationError::NotText)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "package policy\n\ncontainers := []\n";

    #[test]
    fn a_policy_round_trips_and_encodes_the_same_every_time() {
        let value = encode(POLICY);
        assert_eq!(value, encode(POLICY));
        assert_eq!(decode(&value).unwrap(), POLICY);
        assert_eq!(decode(&format!("  {value}\n")).unwrap(), POLICY, "YAML may add white space");
        // A gzip header: magic, deflate, no name, mtime 0.
        let raw = base64::engine::general_purpose::STANDARD.decode(&value).unwrap();
        assert_eq!(&raw[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn bad_annotations_are_refused_by_name() {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        assert_eq!(decode(""), Err(AnnotationError::Empty));
        assert!(matches!(decode("not base64!"), Err(AnnotationError::NotBase64(_))));
        assert!(matches!(decode(&b64(POLICY.as_bytes())), Err(AnnotationError::NotGzip(_))));
        // A gzip stream cut short.
        let value = encode(POLICY);
        let raw = base64::engine::general_purpose::STANDARD.decode(&value).unwrap();
        assert!(matches!(decode(&b64(&raw[..raw.len() - 6])), Err(AnnotationError::NotGzip(_))));
        assert_eq!(decode(&"A".repeat(MAX_ENCODED + 4)), Err(AnnotationError::TooLong(MAX_ENCODED + 4)));
        // A bomb: 64 MiB of zeros in a few dozen KiB.
        let bomb = encode(&"\0".repeat(64 << 20));
        assert!(bomb.len() < MAX_ENCODED, "{}", bomb.len());
        assert_eq!(decode(&bomb), Err(AnnotationError::TooLarge));
        assert_eq!(decode(&encode(&"x".repeat(MAX_POLICY))).map(|p| p.len()), Ok(MAX_POLICY));
        let mut gzip = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&[0xff, 0xfe, 0x00]).unwrap();
        assert_eq!(decode(&b64(&gzip.finish().unwrap())), Err(AnnotationError::NotText));
        assert_eq!(decode(&encode("")), Err(AnnotationError::Empty));
    }
}
