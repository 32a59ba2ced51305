//! The resource a broker sends: a JWE in flattened JSON serialization
//! (RFC 7516 7.2.2), its content key wrapped for the TEE key with
//! `ECDH-ES+A256KW` (RFC 7518 4.6: ECDH on P-256, Concat KDF with SHA-256,
//! no PartyUInfo or PartyVInfo, AES-256 key wrap) and the content sealed
//! with `A256GCM`, as Trustee's KBS makes it (`kbs/src/jwe/mod.rs`).
//!
//! [`open`] is strict, because the bytes came through the host: one
//! algorithm pair, the header holds `alg`, `enc` and `epk` and nothing
//! else (no `zip`, `crit`, `apu`, `apv`), every member is well formed and
//! of its size, and the AAD is the protected header exactly as sent (plus
//! `.` and `aad` when one is sent). Anything else is a [`JweError`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::key::{ALGORITHM, CURVE, TeeKey, point};

/// The content encryption.
pub const ENCRYPTION: &str = "A256GCM";
/// The largest JWE [`open`] reads (a secret is small; 1 MiB of content
/// and its base64).
pub const MAX_JWE: usize = 1 << 21;

/// Why a JWE was not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JweError {
    /// Not a flattened JWE of the expected shape.
    #[error("the JWE is malformed: {0}")]
    Malformed(String),
    /// Another algorithm than `ECDH-ES+A256KW` with `A256GCM` on P-256.
    #[error("the JWE uses {0}, not ECDH-ES+A256KW with A256GCM on P-256")]
    Algorithm(String),
    /// The key does not unwrap, or the content does not authenticate: made
    /// for another key, or changed on the way.
    #[error("the JWE does not open with this TEE key: {0}")]
    Authentication(&'static str),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flattened {
    protected: String,
    encrypted_key: String,
    iv: String,
    ciphertext: String,
    tag: String,
    #[serde(default)]
    aad: Option<String>,
    /// The per-recipient unprotected header: only `epk` may be there
    /// (jwcrypto puts it there; Trustee in the protected header).
    #[serde(default)]
    header: Option<Unprotected>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    enc: String,
    #[serde(default)]
    epk: Option<Epk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unprotected {
    epk: Epk,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Epk {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

fn decode(what: &str, text: &str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD.decode(text).map_err(|_| JweError::Malformed(format!("{what} is not unpadded base64url")))
}

/// The key-wrapping key of ECDH-ES+A256KW from the shared secret `z`
/// (RFC 7518 4.6.2: one round of the Concat KDF, since 256 bits are one
/// SHA-256 output).
fn wrapping_key(z: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut sha = Sha256::new();
    sha.update(1u32.to_be_bytes());
    sha.update(z);
    sha.update((ALGORITHM.len() as u32).to_be_bytes());
    sha.update(ALGORITHM.as_bytes());
    sha.update(0u32.to_be_bytes()); // PartyUInfo: none
    sha.update(0u32.to_be_bytes()); // PartyVInfo: none
    sha.update(256u32.to_be_bytes()); // SuppPubInfo: the key's length in bits
    Zeroizing::new(sha.finalize().into())
}

/// Open a JWE the broker made for `key`: the resource's bytes.
pub fn open(jwe: &[u8], key: &TeeKey) -> Result<Zeroizing<Vec<u8>>, JweError> {
    if jwe.len() > MAX_JWE {
        return Err(JweError::Malformed(format!("it is over {MAX_JWE} bytes")));
    }
    let flat: Flattened =
        serde_json::from_slice(jwe).map_err(|err| JweError::Malformed(format!("not a flattened JWE: {err}")))?;
    let header: Header = serde_json::from_slice(&decode("the protected header", &flat.protected)?)
        .map_err(|err| JweError::Malformed(format!("the protected header: {err}")))?;
    // The JOSE header is the union of both: `epk` in exactly one.
    let epk = match (header.epk, flat.header) {
        (Some(epk), None) | (None, Some(Unprotected { epk })) => epk,
        (Some(_), Some(_)) => return Err(JweError::Malformed("epk is in both headers".into())),
        (None, None) => return Err(JweError::Malformed("the header has no epk".into())),
    };
    if header.alg != ALGORITHM || header.enc != ENCRYPTION || epk.kty != "EC" || epk.crv != CURVE {
        let shown = |s: &str| s.chars().take(32).collect::<String>();
        return Err(JweError::Algorithm(format!(
            "{} with {} on {} {}",
            shown(&header.alg),
            shown(&header.enc),
            shown(&epk.kty),
            shown(&epk.crv)
        )));
    }
    let epk = point(&epk.x, &epk.y).map_err(|err| JweError::Malformed(format!("epk: {err}")))?;
    let encrypted_key = decode("encrypted_key", &flat.encrypted_key)?;
    let iv: [u8; 12] =
        decode("iv", &flat.iv)?.try_into().map_err(|_| JweError::Malformed("iv is not 12 bytes".into()))?;
    let tag = decode("tag", &flat.tag)?;
    if tag.len() != 16 {
        return Err(JweError::Malformed("tag is not 16 bytes".into()));
    }
    if encrypted_key.len() != 40 {
        return Err(JweError::Malformed("encrypted_key is not a wrapped 256-bit key (40 bytes)".into()));
    }
    let mut sealed = decode("ciphertext", &flat.ciphertext)?;
    sealed.extend_from_slice(&tag);

    let shared = p256::ecdh::diffie_hellman(key.secret().to_nonzero_scalar(), epk.as_affine());
    let kek = aes_kw::KekAes256::from(*wrapping_key(shared.raw_secret_bytes()));
    let mut cek = Zeroizing::new([0u8; 32]);
    kek.unwrap(&encrypted_key, cek.as_mut_slice()).map_err(|_| JweError::Authentication("the key does not unwrap"))?;
    let aad = match &flat.aad {
        None => flat.protected.clone(),
        Some(aad) => format!("{}.{aad}", flat.protected),
    };
    let cipher = aes_gcm::Aes256Gcm::new(cek.as_slice().into());
    let plain = cipher
        .decrypt((&iv).into(), Payload { msg: &sealed, aad: aad.as_bytes() })
        .map_err(|_| JweError::Authentication("the content does not authenticate"))?;
    Ok(Zeroizing::new(plain))
}

/// Seal `plain` for the TEE key `recipient` as Trustee's KBS does: a
/// fresh ephemeral key and content key, no `aad` member.
#[cfg(feature = "broker")]
pub fn seal(plain: &[u8], recipient: &kbs_types::TeePubKey) -> Result<String, JweError> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use rand_core::RngCore;

    let recipient = crate::key::public_key_of(recipient).map_err(JweError::Algorithm)?;
    let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let shared = ephemeral.diffie_hellman(&recipient);
    let kek = aes_kw::KekAes256::from(*wrapping_key(shared.raw_secret_bytes()));
    let mut cek = Zeroizing::new([0u8; 32]);
    rand_core::OsRng.fill_bytes(cek.as_mut_slice());
    let mut encrypted_key = [0u8; 40];
    kek.wrap(cek.as_slice(), &mut encrypted_key).map_err(|_| JweError::Authentication("the key does not wrap"))?;
    let point = ephemeral.public_key().to_encoded_point(false);
    let coordinate = |c: Option<&p256::FieldBytes>| c.map(|c| URL_SAFE_NO_PAD.encode(c)).unwrap_or_default();
    let header = serde_json::json!({
        "alg": ALGORITHM,
        "enc": ENCRYPTION,
        "epk": {"crv": CURVE, "kty": "EC", "x": coordinate(point.x()), "y": coordinate(point.y())},
    });
    let protected = URL_SAFE_NO_PAD.encode(header.to_string());
    let mut iv = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut iv);
    let cipher = aes_gcm::Aes256Gcm::new(cek.as_slice().into());
    let sealed = cipher
        .encrypt((&iv).into(), Payload { msg: plain, aad: protected.as_bytes() })
        .map_err(|_| JweError::Authentication("the content does not seal"))?;
    let (ciphertext, tag) = sealed.split_at(sealed.len().saturating_sub(16));
    Ok(serde_json::json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(encrypted_key),
        "iv": URL_SAFE_NO_PAD.encode(iv),
        "ciphertext": URL_SAFE_NO_PAD.encode(ciphertext),
        "tag": URL_SAFE_NO_PAD.encode(tag),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(jwe: &str, field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut json: serde_json::Value = serde_json::from_str(jwe).unwrap();
        json[field] = value;
        json.to_string().into_bytes()
    }

    fn header_of(jwe: &str) -> serde_json::Value {
        let json: serde_json::Value = serde_json::from_str(jwe).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(json["protected"].as_str().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn a_sealed_resource_opens_with_its_key_only() {
        let key = TeeKey::generate();
        let jwe = seal(b"the database password", &key.public_jwk()).unwrap();
        assert_eq!(open(jwe.as_bytes(), &key).unwrap().as_slice(), b"the database password");
        let other = TeeKey::generate();
        assert_eq!(open(jwe.as_bytes(), &other).unwrap_err(), JweError::Authentication("the key does not unwrap"));
    }

    #[test]
    fn every_change_on_the_way_is_refused() {
        let key = TeeKey::generate();
        let jwe = seal(b"secret", &key.public_jwk()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&jwe).unwrap();
        let flip = |field: &str| {
            let mut bytes = URL_SAFE_NO_PAD.decode(json[field].as_str().unwrap()).unwrap();
            bytes[0] ^= 1;
            edit(&jwe, field, URL_SAFE_NO_PAD.encode(bytes).into())
        };
        for field in ["ciphertext", "tag", "iv"] {
            assert_eq!(
                open(&flip(field), &key).unwrap_err(),
                JweError::Authentication("the content does not authenticate"),
                "{field}"
            );
        }
        assert!(matches!(open(&flip("encrypted_key"), &key), Err(JweError::Authentication(_))));
        // An aad the broker did not authenticate.
        assert!(matches!(open(&edit(&jwe, "aad", "eHl6".into()), &key), Err(JweError::Authentication(_))));
        // The same header spelled otherwise is another AAD.
        let respelled = URL_SAFE_NO_PAD.encode(serde_json::to_string_pretty(&header_of(&jwe)).unwrap());
        assert!(matches!(open(&edit(&jwe, "protected", respelled.into()), &key), Err(JweError::Authentication(_))));
    }

    #[test]
    fn other_algorithms_and_shapes_are_refused() {
        let key = TeeKey::generate();
        let jwe = seal(b"secret", &key.public_jwk()).unwrap();
        let with_header =
            |header: serde_json::Value| edit(&jwe, "protected", URL_SAFE_NO_PAD.encode(header.to_string()).into());
        let mut header = header_of(&jwe);
        header["enc"] = "A128GCM".into();
        assert!(matches!(open(&with_header(header), &key), Err(JweError::Algorithm(_))));
        let mut header = header_of(&jwe);
        header["alg"] = "dir".into();
        assert!(matches!(open(&with_header(header), &key), Err(JweError::Algorithm(_))));
        let mut header = header_of(&jwe);
        header["zip"] = "DEF".into();
        assert!(matches!(open(&with_header(header), &key), Err(JweError::Malformed(_))));
        let mut header = header_of(&jwe);
        header["apu"] = "QWxpY2U".into();
        assert!(matches!(open(&with_header(header), &key), Err(JweError::Malformed(_))));
        let mut header = header_of(&jwe);
        header["epk"]["y"] = header["epk"]["x"].clone();
        assert!(matches!(open(&with_header(header), &key), Err(JweError::Malformed(_))));
        assert!(matches!(open(&edit(&jwe, "header", serde_json::json!({})), &key), Err(JweError::Malformed(_))));
        let epk = header_of(&jwe)["epk"].clone();
        let twice = edit(&jwe, "header", serde_json::json!({"epk": epk}));
        assert_eq!(open(&twice, &key).unwrap_err(), JweError::Malformed("epk is in both headers".into()));
        let mut header = header_of(&jwe);
        header.as_object_mut().unwrap().remove("epk");
        assert_eq!(open(&with_header(header), &key).unwrap_err(), JweError::Malformed("the header has no epk".into()));
        assert!(matches!(open(&edit(&jwe, "iv", "AAAA".into()), &key), Err(JweError::Malformed(_))));
        assert!(matches!(open(&edit(&jwe, "tag", "AA==".into()), &key), Err(JweError::Malformed(_))));
        assert!(matches!(open(b"{}", &key), Err(JweError::Malformed(_))));
        assert!(matches!(open(&vec![b' '; MAX_JWE + 1], &key), Err(JweError::Malformed(_))));
        assert!(matches!(open(b"\xff", &key), Err(JweError::Malformed(_))));
    }
}
