//! The TEE key: a fresh P-256 key per exchange, made in the guest; the
//! broker wraps the resource's key for it, and only its JWK leaves.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;

/// The key agreement and key wrap the TEE key is for (RFC 7518 4.6).
pub const ALGORITHM: &str = "ECDH-ES+A256KW";
/// Its curve's JWK name.
pub const CURVE: &str = "P-256";

/// A TEE key. Its secret is wiped when it is dropped (p256's `SecretKey`).
pub struct TeeKey {
    secret: p256::SecretKey,
}

impl std::fmt::Debug for TeeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeKey").field("public", &self.public_jwk()).finish_non_exhaustive()
    }
}

impl TeeKey {
    /// A fresh key from the OS's randomness.
    pub fn generate() -> Self {
        Self { secret: p256::SecretKey::random(&mut rand_core::OsRng) }
    }

    /// The key from its 32-byte scalar (tests, known answers).
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Self> {
        p256::SecretKey::from_bytes(bytes.into()).ok().map(|secret| Self { secret })
    }

    /// The public key as the protocol's JWK (`kty` EC, `crv` P-256, `alg`
    /// ECDH-ES+A256KW, `x` and `y` in unpadded base64url).
    pub fn public_jwk(&self) -> TeePubKey {
        let point = self.secret.public_key().to_encoded_point(false);
        let coordinate = |c: Option<&p256::FieldBytes>| c.map(|c| URL_SAFE_NO_PAD.encode(c)).unwrap_or_default();
        TeePubKey::EC { crv: CURVE.into(), alg: ALGORITHM.into(), x: coordinate(point.x()), y: coordinate(point.y()) }
    }

    pub(crate) fn secret(&self) -> &p256::SecretKey {
        &self.secret
    }
}

/// A P-256 public key from the protocol's JWK.
pub fn public_key_of(jwk: &TeePubKey) -> Result<p256::PublicKey, String> {
    let TeePubKey::EC { crv, alg, x, y } = jwk else {
        return Err("the key is not an EC key".into());
    };
    if crv != CURVE || alg != ALGORITHM {
        return Err(format!("the key is {crv} for {alg}, not {CURVE} for {ALGORITHM}"));
    }
    point(x, y)
}

/// A P-256 point from unpadded base64url coordinates of 32 bytes each.
pub(crate) fn point(x: &str, y: &str) -> Result<p256::PublicKey, String> {
    let coordinate = |name: &str, text: &str| -> Result<[u8; 32], String> {
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| format!("{name} is not base64url"))?;
        bytes.try_into().map_err(|_| format!("{name} is not 32 bytes"))
    };
    let (x, y) = (coordinate("x", x)?, coordinate("y", y)?);
    let encoded = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
    Option::from(p256::PublicKey::from_sec1_bytes(encoded.as_bytes()).ok())
        .flatten()
        .ok_or_else(|| "the point is not on P-256".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jwk_round_trips() {
        let key = TeeKey::generate();
        let jwk = key.public_jwk();
        assert_eq!(public_key_of(&jwk).unwrap(), key.secret().public_key());
        let TeePubKey::EC { x, y, .. } = &jwk else { panic!() };
        assert_eq!((x.len(), y.len()), (43, 43));
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn foreign_keys_are_refused() {
        let key = TeeKey::generate();
        let TeePubKey::EC { x, y, .. } = key.public_jwk() else { panic!() };
        let p384 = TeePubKey::EC { crv: "P-384".into(), alg: ALGORITHM.into(), x: x.clone(), y: y.clone() };
        assert!(public_key_of(&p384).is_err());
        let flipped = {
            let mut bytes = URL_SAFE_NO_PAD.decode(&y).unwrap();
            bytes[31] ^= 1;
            URL_SAFE_NO_PAD.encode(bytes)
        };
        let off_curve = TeePubKey::EC { crv: CURVE.into(), alg: ALGORITHM.into(), x, y: flipped };
        assert_eq!(public_key_of(&off_curve).unwrap_err(), "the point is not on P-256");
        let rsa = TeePubKey::RSA { alg: "RSA-OAEP-256".into(), k_mod: "AQAB".into(), k_exp: "AQAB".into() };
        assert!(public_key_of(&rsa).is_err());
    }
}
