//! AMD's certificate chain: where the certificates come from (built-in roots,
//! a directory, one VCEK file), and the signature checks between them.

use std::fs;
use std::path::{Path, PathBuf};

use der::asn1::OctetString;
use der::oid::ObjectIdentifier;
use der::{Decode, DecodePem, Encode};
use p384::ecdsa::signature::Verifier as _;
use rsa::pkcs1::{DecodeRsaPublicKey, RsaPssParams};
use sha2::Sha384;
use x509_cert::Certificate;

use crate::report::Product;

/// Certificates larger than this are refused unread (AMD's are under 2 KiB).
const MAX_CERT_FILE: u64 = 64 * 1024;

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const MGF1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.8");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// AMD's VCEK extensions (AMD document 57230, "VCEK Certificate and KDS
/// Interface Specification").
pub(crate) mod oid {
    use der::oid::ObjectIdentifier;
    pub const BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
    pub const TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
    pub const SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
    pub const UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
    pub const FMC_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
    pub const HW_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");
}

/// Where the verifier gets the certificates. A root (ARK) is trusted only
/// when it is AMD's built-in root for the product, or when the caller
/// allows insecure emulation.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// A directory with `vcek.der` or `vcek.pem`, and optionally `ark.pem`
    /// and `ask.pem` (or `.der`), or a `cert_chain` / `cert_chain.pem` with
    /// ASK and ARK as AMD's KDS serves them. Missing ones are the built-in
    /// ASK and ARK of the product.
    Dir(PathBuf),
    /// One VCEK file (DER or PEM); ASK and ARK are built in.
    Vcek(PathBuf),
    /// Certificates in memory (each DER or PEM); missing ones are built in.
    Memory { vcek: Vec<u8>, ask: Option<Vec<u8>>, ark: Option<Vec<u8>> },
}

/// Certificates that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is larger than {MAX_CERT_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("no {what} in {dir}")]
    Missing { what: &'static str, dir: PathBuf },
    #[error("{what} is not an X.509 certificate in DER or PEM")]
    Malformed { what: String, source: der::Error },
    #[error("{path}: expected ASK and ARK (two certificates, one self-issued), found {found}")]
    BadChain { path: PathBuf, found: usize },
}

/// Where a certificate of the chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    BuiltIn,
    Caller,
}

/// The three certificates, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub ark: Certificate,
    pub ark_origin: Origin,
    pub ask: Certificate,
    pub ask_origin: Origin,
    pub vcek: Certificate,
}

fn builtin_pem(product: Product) -> (&'static str, &'static str) {
    match product {
        Product::Milan => (include_str!("../roots/milan-ark.pem"), include_str!("../roots/milan-ask.pem")),
        Product::Genoa => (include_str!("../roots/genoa-ark.pem"), include_str!("../roots/genoa-ask.pem")),
        Product::Turin => (include_str!("../roots/turin-ark.pem"), include_str!("../roots/turin-ask.pem")),
    }
}

/// AMD's root (ARK) and signing key (ASK) for a product, as built in.
pub fn builtin_roots(product: Product) -> Result<(Certificate, Certificate), CertError> {
    let (ark, ask) = builtin_pem(product);
    Ok((parse_cert(ark.as_bytes(), &format!("built-in {product} ARK"))?, parse_cert(ask.as_bytes(), "built-in ASK")?))
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

pub(crate) fn parse_cert(bytes: &[u8], what: &str) -> Result<Certificate, CertError> {
    let parsed = if is_pem(bytes) { Certificate::from_pem(bytes) } else { Certificate::from_der(bytes) };
    parsed.map_err(|source| CertError::Malformed { what: what.to_owned(), source })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, CertError> {
    let io = |source| CertError::Io { path: path.to_owned(), source };
    if fs::metadata(path).map_err(io)?.len() > MAX_CERT_FILE {
        return Err(CertError::TooLarge { path: path.to_owned() });
    }
    fs::read(path).map_err(io)
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn read_cert(path: &Path) -> Result<Certificate, CertError> {
    parse_cert(&read_bounded(path)?, &path.display().to_string())
}

impl CertSource {
    /// The VCEK the caller gave.
    pub(crate) fn load_vcek(&self) -> Result<Certificate, CertError> {
        match self {
            CertSource::Dir(dir) => {
                let path = first_existing(dir, &["vcek.der", "vcek.pem", "vcek.crt"])
                    .ok_or_else(|| CertError::Missing { what: "vcek.der or vcek.pem", dir: dir.clone() })?;
                read_cert(&path)
            }
            CertSource::Vcek(path) => read_cert(path),
            CertSource::Memory { vcek, .. } => parse_cert(vcek, "VCEK"),
        }
    }

    /// ASK and ARK the caller gave, if any.
    fn load_ask_ark(&self) -> Result<(Option<Certificate>, Option<Certificate>), CertError> {
        match self {
            CertSource::Vcek(_) => Ok((None, None)),
            CertSource::Memory { ask, ark, .. } => Ok((
                ask.as_deref().map(|b| parse_cert(b, "ASK")).transpose()?,
                ark.as_deref().map(|b| parse_cert(b, "ARK")).transpose()?,
            )),
            CertSource::Dir(dir) => {
                let ask = first_existing(dir, &["ask.pem", "ask.der"]).map(|p| read_cert(&p)).transpose()?;
                let ark = first_existing(dir, &["ark.pem", "ark.der"]).map(|p| read_cert(&p)).transpose()?;
                if ask.is_some() || ark.is_some() {
                    return Ok((ask, ark));
                }
                match first_existing(dir, &["cert_chain", "cert_chain.pem"]) {
                    None => Ok((None, None)),
                    Some(path) => {
                        let bytes = read_bounded(&path)?;
                        let certs = Certificate::load_pem_chain(&bytes)
                            .map_err(|source| CertError::Malformed { what: path.display().to_string(), source })?;
                        let self_issued = |c: &Certificate| c.tbs_certificate.issuer == c.tbs_certificate.subject;
                        match certs.as_slice() {
                            [a, b] if self_issued(b) && !self_issued(a) => Ok((Some(a.clone()), Some(b.clone()))),
                            [a, b] if self_issued(a) && !self_issued(b) => Ok((Some(b.clone()), Some(a.clone()))),
                            _ => Err(CertError::BadChain { path, found: certs.len() }),
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn load(&self, product: Product, vcek: Certificate) -> Result<Chain, CertError> {
        let (builtin_ark, builtin_ask) = builtin_roots(product)?;
        let (ask, ark) = self.load_ask_ark()?;
        let (ask, ask_origin) = match ask {
            Some(c) => (c, Origin::Caller),
            None => (builtin_ask, Origin::BuiltIn),
        };
        let (ark, ark_origin) = match ark {
            Some(c) => (c, Origin::Caller),
            None => (builtin_ark, Origin::BuiltIn),
        };
        Ok(Chain { ark, ark_origin, ask, ask_origin, vcek })
    }
}

/// The product a VCEK's issuer names (`CN=SEV-Milan`), if any; only a hint:
/// the chain must still end in that product's AMD root.
pub(crate) fn issuer_product(vcek: &Certificate) -> Option<Product> {
    let issuer = vcek.tbs_certificate.issuer.to_string();
    ["milan", "genoa", "turin"]
        .iter()
        .find_map(|p| issuer.to_ascii_lowercase().contains(&format!("sev-{p}")).then(|| p.parse().ok()).flatten())
}

/// Whether `a` and `b` carry the same public key.
pub(crate) fn same_key(a: &Certificate, b: &Certificate) -> bool {
    match (a.tbs_certificate.subject_public_key_info.to_der(), b.tbs_certificate.subject_public_key_info.to_der()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Checks that `issuer` signed `cert` (names chained, signature valid):
/// RSASSA-PSS with SHA-384 and MGF1-SHA-384 (AMD's certificates), or ECDSA
/// P-384 with SHA-384. The key type must match the algorithm.
pub(crate) fn check_signed_by(cert: &Certificate, issuer: &Certificate) -> Result<String, String> {
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(format!(
            "issuer {} is not the signer's subject {}",
            cert.tbs_certificate.issuer, issuer.tbs_certificate.subject
        ));
    }
    let tbs = cert.tbs_certificate.to_der().map_err(|e| format!("re-encoding the certificate: {e}"))?;
    let signature = cert.signature.as_bytes().ok_or("the signature is not a whole number of bytes")?;
    let alg = &cert.signature_algorithm;
    let spki = &issuer.tbs_certificate.subject_public_key_info;
    if alg.oid == RSASSA_PSS {
        let params = alg.parameters.as_ref().ok_or("RSASSA-PSS without parameters")?;
        let params_der = params.to_der().map_err(|e| e.to_string())?;
        let params = RsaPssParams::from_der(&params_der).map_err(|e| format!("RSASSA-PSS parameters: {e}"))?;
        let mgf_hash = params.mask_gen.parameters.as_ref().map(|h| h.oid);
        if params.hash.oid != SHA384 || params.mask_gen.oid != MGF1 || mgf_hash != Some(SHA384) {
            return Err("RSASSA-PSS must use SHA-384 with MGF1-SHA-384".to_owned());
        }
        if spki.algorithm.oid != RSA_ENCRYPTION && spki.algorithm.oid != RSASSA_PSS {
            return Err(format!("the signer's key is {}, not RSA", spki.algorithm.oid));
        }
        let key = rsa::RsaPublicKey::from_pkcs1_der(spki.subject_public_key.raw_bytes())
            .map_err(|e| format!("the signer's RSA key: {e}"))?;
        let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
        let verifier = rsa::pss::VerifyingKey::<Sha384>::new_with_salt_len(key, usize::from(params.salt_len));
        let sig = rsa::pss::Signature::try_from(signature).map_err(|e| format!("signature: {e}"))?;
        rsa::signature::Verifier::verify(&verifier, &tbs, &sig).map_err(|_| "RSA-PSS signature invalid".to_owned())?;
        Ok(format!("RSASSA-PSS SHA-384 (salt {}), RSA-{bits} key", params.salt_len))
    } else if alg.oid == ECDSA_WITH_SHA384 {
        let key = p384_key(spki)?;
        let sig = p384::ecdsa::Signature::from_der(signature).map_err(|e| format!("signature: {e}"))?;
        key.verify(&tbs, &sig).map_err(|_| "ECDSA P-384 signature invalid".to_owned())?;
        Ok("ECDSA P-384 SHA-384".to_owned())
    } else {
        Err(format!("unsupported signature algorithm {}", alg.oid))
    }
}

/// The P-384 public key of a certificate.
pub(crate) fn p384_key(spki: &x509_cert::spki::SubjectPublicKeyInfoOwned) -> Result<p384::ecdsa::VerifyingKey, String> {
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if spki.algorithm.oid != EC_PUBLIC_KEY || curve != Some(SECP384R1) {
        return Err(format!("the key is {} on {curve:?}, not EC P-384", spki.algorithm.oid));
    }
    p384::ecdsa::VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
        .map_err(|e| format!("the P-384 key: {e}"))
}

/// The value of an extension, if the certificate has it.
fn extension<'a>(cert: &'a Certificate, id: &ObjectIdentifier) -> Option<&'a [u8]> {
    cert.tbs_certificate.extensions.as_ref()?.iter().find(|e| e.extn_id == *id).map(|e| e.extn_value.as_bytes())
}

/// A security patch level extension (a DER INTEGER, 0-255).
pub(crate) fn spl(cert: &Certificate, id: &ObjectIdentifier) -> Result<u8, String> {
    let value = extension(cert, id).ok_or_else(|| format!("no extension {id}"))?;
    u8::from_der(value).map_err(|e| format!("extension {id}: {e}"))
}

/// The hwID extension: the chip id (an OCTET STRING, or the raw bytes).
pub(crate) fn hw_id(cert: &Certificate) -> Result<Vec<u8>, String> {
    let value = extension(cert, &oid::HW_ID).ok_or_else(|| format!("no extension {} (hwID)", oid::HW_ID))?;
    Ok(OctetString::from_der(value).map(OctetString::into_bytes).unwrap_or_else(|_| value.to_vec()))
}
