//! sha256 digests as OCI writes them, hashing readers, and the values derived
//! from a diff-id.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A sha256 digest, written `sha256:<64 lower-case hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parse `sha256:<hex>`; any other algorithm or form is refused.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:")?;
        Self::from_hex(hex)
    }

    /// Parse 64 lower-case hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).ok()?;
        Some(Digest(bytes))
    }

    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not sha256:<64 hex digits>")))
    }
}

/// The identifiers and salt of one layer's image, derived from its diff-id
/// (see the crate documentation for the formulas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    pub ext4_uuid: [u8; 16],
    pub ext4_hash_seed: [u8; 16],
    pub verity_salt: [u8; 32],
    pub verity_uuid: [u8; 16],
}

impl Derived {
    pub fn new(diff_id: &Digest) -> Self {
        let h = |label: &str| -> [u8; 32] {
            let mut hasher = Sha256::new();
            hasher.update(b"parma-layer/v1/");
            hasher.update(label.as_bytes());
            hasher.update([0]);
            hasher.update(diff_id.as_bytes());
            hasher.finalize().into()
        };
        Derived {
            ext4_uuid: uuid_v8(h("ext4-uuid")),
            ext4_hash_seed: first16(h("ext4-hash-seed")),
            verity_salt: h("verity-salt"),
            verity_uuid: uuid_v8(h("verity-uuid")),
        }
    }
}

fn first16(bytes: [u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b;
    }
    out
}

/// The first 16 bytes as a version 8 (custom) UUID with the RFC 4122 variant.
fn uuid_v8(bytes: [u8; 32]) -> [u8; 16] {
    let mut out = first16(bytes);
    if let Some(b) = out.get_mut(6) {
        *b = (*b & 0x0f) | 0x80;
    }
    if let Some(b) = out.get_mut(8) {
        *b = (*b & 0x3f) | 0x80;
    }
    out
}

/// A reader that hashes (optionally) and counts what passes through it.
pub(crate) struct HashReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
}

impl<R> HashReader<R> {
    pub(crate) fn new(inner: R, hash: bool) -> Self {
        HashReader { inner, hasher: hash.then(Sha256::new), count: 0 }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// The digest of everything read so far (None when not hashing).
    pub(crate) fn digest(&self) -> Option<Digest> {
        self.hasher.as_ref().map(|h| Digest(h.clone().finalize().into()))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(buf.get(..n).unwrap_or_default());
        }
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let d = Digest::of(b"");
        let text = d.to_string();
        assert_eq!(text, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&text), Some(d));
        assert_eq!(Digest::parse(&text.to_uppercase()), None);
        assert_eq!(Digest::parse("sha512:00"), None);
        assert_eq!(Digest::parse(&text[..70]), None);
    }

    #[test]
    fn derived_values_differ_and_are_stable() {
        let a = Derived::new(&Digest::of(b"a"));
        assert_eq!(a, Derived::new(&Digest::of(b"a")));
        assert_ne!(a, Derived::new(&Digest::of(b"b")));
        assert_ne!(a.ext4_uuid, a.verity_uuid);
        assert_eq!(a.ext4_uuid[6] >> 4, 8);
        assert_eq!(a.ext4_uuid[8] >> 6, 2);
    }
}
