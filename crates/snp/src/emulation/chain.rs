//! The INSECURE test chain of the emulation provider: a root (ARK), an
//! intermediate (ASK) and a VCEK, all ECDSA P-384 with SHA-384, built with
//! x509-cert's builder from keys derived from the seed. The VCEK carries
//! AMD's extensions (blSPL, teeSPL, snpSPL, ucodeSPL, hwID) matching the
//! emulated reports. Fixed dates and RFC 6979 signatures: the same seed
//! gives the same bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use der::asn1::{OctetString, UtcTime};
use der::oid::{AssociatedOid, ObjectIdentifier};
use der::pem::LineEnding;
use der::{Any, DateTime, Decode, Encode};
use p384::ecdsa::{DerSignature, SigningKey};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::ext::{AsExtension, Extension};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

use super::{EMULATED_TCB, Role, chip_id, derive_key};
use crate::certs::{CertSource, oid};

const ARK_NAME: &str = "CN=ARK Parma INSECURE emulation,OU=INSECURE test chain - not AMD,O=Parma INSECURE emulation";
const ASK_NAME: &str = "CN=ASK Parma INSECURE emulation,OU=INSECURE test chain - not AMD,O=Parma INSECURE emulation";
const VCEK_NAME: &str = "CN=VCEK Parma INSECURE emulation,OU=INSECURE test chain - not AMD,O=Parma INSECURE emulation";

/// The three certificates, DER encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestChain {
    pub ark_der: Vec<u8>,
    pub ask_der: Vec<u8>,
    pub vcek_der: Vec<u8>,
}

/// The test chain could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("building the test {0} certificate")]
    Build(&'static str, #[source] x509_cert::builder::Error),
    #[error("encoding the test chain")]
    Der(#[from] der::Error),
    #[error("cannot write {path}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl TestChain {
    /// The chain as the verifier takes it from memory.
    pub fn cert_source(&self) -> CertSource {
        CertSource::Memory {
            vcek: self.vcek_der.clone(),
            ask: Some(self.ask_der.clone()),
            ark: Some(self.ark_der.clone()),
        }
    }

    /// Writes `ark.pem`, `ask.pem` and `vcek.der` into `dir` (created if
    /// missing), for `parma verify --certs DIR --allow-insecure-emulation`.
    pub fn write_dir(&self, dir: &Path) -> Result<(), ChainError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ChainError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let files = [
            ("ark.pem", pem(&self.ark_der)?.into_bytes()),
            ("ask.pem", pem(&self.ask_der)?.into_bytes()),
            ("vcek.der", self.vcek_der.clone()),
        ];
        for (name, bytes) in files {
            let path = dir.join(name);
            fs::write(&path, bytes).map_err(io(&path))?;
        }
        Ok(())
    }
}

fn pem(der: &[u8]) -> Result<String, ChainError> {
    Ok(der::pem::encode_string("CERTIFICATE", LineEnding::LF, der).map_err(der::Error::from)?)
}

/// One of AMD's VCEK extensions: an OID of AMD's arc and a DER value.
struct AmdExtension {
    id: ObjectIdentifier,
    value: Any,
}

impl AmdExtension {
    fn new(id: ObjectIdentifier, value: &impl Encode) -> Result<AmdExtension, der::Error> {
        Ok(AmdExtension { id, value: Any::from_der(&value.to_der()?)? })
    }
}

impl AssociatedOid for AmdExtension {
    /// AMD's arc for SEV (each value overrides it in `to_extension`).
    const OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1");
}

impl Encode for AmdExtension {
    fn encoded_len(&self) -> der::Result<der::Length> {
        self.value.encoded_len()
    }

    fn encode(&self, writer: &mut impl der::Writer) -> der::Result<()> {
        self.value.encode(writer)
    }
}

impl AsExtension for AmdExtension {
    fn critical(&self, _subject: &Name, _extensions: &[Extension]) -> bool {
        false
    }

    fn to_extension(&self, _subject: &Name, _extensions: &[Extension]) -> Result<Extension, der::Error> {
        Ok(Extension { extn_id: self.id, critical: false, extn_value: OctetString::new(self.value.to_der()?)? })
    }
}

/// 2025-01-01 to 2049-12-31: fixed, as the verifier reads no clock.
fn validity() -> Result<Validity, der::Error> {
    let at = |y, mo, d, h, mi, s| -> Result<Time, der::Error> {
        Ok(Time::UtcTime(UtcTime::from_date_time(DateTime::new(y, mo, d, h, mi, s)?)?))
    };
    Ok(Validity { not_before: at(2025, 1, 1, 0, 0, 0)?, not_after: at(2049, 12, 31, 23, 59, 59)? })
}

fn certificate(
    what: &'static str,
    profile: Profile,
    serial: u32,
    subject: &str,
    key: &SigningKey,
    signer: &SigningKey,
    extensions: &[AmdExtension],
) -> Result<Vec<u8>, ChainError> {
    let build = |e| ChainError::Build(what, e);
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key())
        .map_err(|e| build(x509_cert::builder::Error::from(e)))?;
    let mut builder = CertificateBuilder::new(
        profile,
        SerialNumber::from(serial),
        validity()?,
        Name::from_str(subject)?,
        spki,
        signer,
    )
    .map_err(build)?;
    for extension in extensions {
        builder.add_extension(extension).map_err(build)?;
    }
    Ok(builder.build::<DerSignature>().map_err(build)?.to_der()?)
}

/// The INSECURE test chain of `seed`, whose VCEK is the key of
/// [`super::Signer::from_seed`] with the TCB and chip id of its reports.
pub fn test_chain(seed: &[u8; 32]) -> Result<TestChain, ChainError> {
    let [ark, ask, vcek] = [Role::Ark, Role::Ask, Role::Vcek].map(|role| derive_key(seed, role));
    let ark_name = Name::from_str(ARK_NAME)?;
    let ask_name = Name::from_str(ASK_NAME)?;
    let ark_der = certificate("ARK", Profile::Root, 1, ARK_NAME, &ark, &ark, &[])?;
    let ask_profile = Profile::SubCA { issuer: ark_name, path_len_constraint: Some(0) };
    let ask_der = certificate("ASK", ask_profile, 2, ASK_NAME, &ask, &ark, &[])?;
    let tcb = EMULATED_TCB;
    let vcek_extensions = [
        AmdExtension::new(oid::BL_SPL, &tcb.bootloader)?,
        AmdExtension::new(oid::TEE_SPL, &tcb.tee)?,
        AmdExtension::new(oid::SNP_SPL, &tcb.snp)?,
        AmdExtension::new(oid::UCODE_SPL, &tcb.microcode)?,
        AmdExtension::new(oid::HW_ID, &OctetString::new(chip_id(seed).to_vec())?)?,
    ];
    let vcek_profile = Profile::Leaf { issuer: ask_name, enable_key_agreement: false, enable_key_encipherment: false };
    let vcek_der = certificate("VCEK", vcek_profile, 3, VCEK_NAME, &vcek, &ask, &vcek_extensions)?;
    Ok(TestChain { ark_der, ask_der, vcek_der })
}
