//! The Trustee KBS attestation protocol, version 0.4.0, as Parma-rs speaks
//! it (`kbs/docs/kbs_attestation_protocol.md` in
//! confidential-containers/trustee). Pure functions, no I/O: the agent
//! runs the exchange, the test broker answers it.
//!
//! - [`binding`]: the runtime data (the broker's nonce and the TEE's key)
//!   and the REPORT_DATA that binds it, as Trustee checks it: SHA-384 of
//!   its RFC 8785 form, zero padded to 64 bytes.
//! - [`key`]: the TEE key, a fresh P-256 key per exchange, and its JWK.
//! - [`jwe`]: the resource a broker sends, a flattened JWE
//!   (`ECDH-ES+A256KW`, `A256GCM`), opened with the TEE key; with the
//!   `broker` feature, made too.
//! - [`client`] (feature `client`): the exchange over any byte stream,
//!   TLS with the broker's certificate pinned.
//! - [`evidence`] (feature `snp`): the SNP evidence in the JSON shape
//!   Trustee's SNP attester sends.
//!
//! The wire types are `kbs-types`' (re-exported as [`types`]).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod binding;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "snp")]
pub mod evidence;
pub mod jwe;
pub mod key;
pub mod url;

pub use kbs_types as types;

/// The whole exchange (three connections, TLS handshakes included) ends
/// within this, however the stream between is slowed.
pub const EXCHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(90);

/// The protocol version the agent announces in its `Request`.
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// The path prefix of the broker's endpoints.
pub const PREFIX: &str = "/kbs/v0";
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// A resource's path at the broker: `REPO/TYPE/TAG`, each 1 to 128 bytes
/// of `[A-Za-z0-9._-]`, none `.` or `..`.
pub fn check_resource(resource: &str) -> Result<(), String> {
    let parts: Vec<&str> = resource.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && p.len() <= 128
            && *p != "."
            && *p != ".."
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if parts.len() != 3 || !parts.iter().all(part_ok) {
        return Err(format!(
            "resource {:?} is not REPO/TYPE/TAG of [A-Za-z0-9._-]",
            resource.get(..resource.floor_char_boundary(64)).unwrap_or_default()
        ));
    }
    Ok(())
}

/// A secret's file name in the container's `/dev/parma/secrets/`: 1 to 64
/// bytes of `[A-Za-z0-9._-]`, not hidden.
pub fn check_secret_file(file: &str) -> Result<(), String> {
    let ok = !file.is_empty()
        && file.len() <= 64
        && !file.starts_with('.')
        && file.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err("the secret's file name is not 1 to 64 of [A-Za-z0-9._-], not hidden".into()) }
}
