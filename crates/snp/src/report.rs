//! The ATTESTATION_REPORT structure of the SEV-SNP firmware ABI (AMD
//! specification 56860, table "ATTESTATION_REPORT structure"), as a typed
//! struct whose layout the compiler checks.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::policy::GuestPolicy;

/// Size of a report in bytes.
pub const REPORT_SIZE: usize = 1184;
/// The signature covers the bytes before this offset (0x2A0).
pub const SIGNED_LEN: usize = 0x2A0;

/// A TCB version as the firmware stores it: eight bytes, one security patch
/// level (SPL) per component; which byte is which depends on the product
/// ([`Product::tcb_layout`]).
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(transparent)]
pub struct RawTcb(pub [u8; 8]);

impl RawTcb {
    /// The 64-bit value (the bytes are little endian).
    pub fn as_u64(&self) -> u64 {
        u64::from_le_bytes(self.0)
    }

    /// The components, read with `layout`.
    pub fn decode(&self, layout: TcbLayout) -> TcbVersion {
        let [b0, b1, b2, b3, _, _, b6, b7] = self.0;
        match layout {
            TcbLayout::MilanGenoa => TcbVersion { fmc: None, bootloader: b0, tee: b1, snp: b6, microcode: b7 },
            TcbLayout::Turin => TcbVersion { fmc: Some(b0), bootloader: b1, tee: b2, snp: b3, microcode: b7 },
        }
    }

    /// The bytes of `tcb` in `layout` (the inverse of [`RawTcb::decode`]; an
    /// FMC level is dropped in the Milan/Genoa layout, which has none).
    pub fn encode(tcb: TcbVersion, layout: TcbLayout) -> RawTcb {
        let TcbVersion { fmc, bootloader, tee, snp, microcode } = tcb;
        match layout {
            TcbLayout::MilanGenoa => RawTcb([bootloader, tee, 0, 0, 0, 0, snp, microcode]),
            TcbLayout::Turin => RawTcb([fmc.unwrap_or(0), bootloader, tee, snp, 0, 0, 0, microcode]),
        }
    }
}

impl fmt::Debug for RawTcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawTcb({:#018x})", self.as_u64())
    }
}

/// Where the components sit in a [`RawTcb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcbLayout {
    /// Milan and Genoa: bootloader byte 0, TEE byte 1, SNP byte 6, microcode byte 7.
    MilanGenoa,
    /// Turin: FMC byte 0, bootloader byte 1, TEE byte 2, SNP byte 3, microcode byte 7.
    Turin,
}

/// The security patch levels of one TCB version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TcbVersion {
    /// Turin only: the FMC (firmware mask ROM) SPL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl TcbVersion {
    /// Whether every component is at least the one in `min` (an FMC level
    /// in `min` is met only by a version that has one).
    pub fn meets(&self, min: &TcbVersion) -> bool {
        let fmc_ok = match (self.fmc, min.fmc) {
            (_, None) => true,
            (Some(have), Some(want)) => have >= want,
            (None, Some(_)) => false,
        };
        fmc_ok
            && self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
    }
}

impl fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc={fmc},")?;
        }
        write!(f, "bl={},tee={},snp={},ucode={}", self.bootloader, self.tee, self.snp, self.microcode)
    }
}

/// Parses `bl=3,tee=0,snp=8,ucode=115` (also `bootloader=`, `microcode=`,
/// `fmc=`); a component left out is 0.
impl FromStr for TcbVersion {
    type Err = TcbParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tcb = TcbVersion::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| TcbParseError(part.to_owned()))?;
            let value: u8 = value.trim().parse().map_err(|_| TcbParseError(part.to_owned()))?;
            match key.trim().to_ascii_lowercase().as_str() {
                "fmc" => tcb.fmc = Some(value),
                "bl" | "bootloader" => tcb.bootloader = value,
                "tee" => tcb.tee = value,
                "snp" => tcb.snp = value,
                "ucode" | "microcode" => tcb.microcode = value,
                _ => return Err(TcbParseError(part.to_owned())),
            }
        }
        Ok(tcb)
    }
}

/// A TCB text that is not `name=level` pairs.
#[derive(Debug, thiserror::Error)]
#[error("bad TCB component {0:?} (expected e.g. bl=3,tee=0,snp=8,ucode=115; levels 0-255)")]
pub struct TcbParseError(String);

/// An AMD EPYC product line; it selects the root of trust and the TCB layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    Milan,
    Genoa,
    Turin,
}

impl Product {
    pub fn tcb_layout(self) -> TcbLayout {
        match self {
            Product::Milan | Product::Genoa => TcbLayout::MilanGenoa,
            Product::Turin => TcbLayout::Turin,
        }
    }

    /// The product of a CPUID family and model (as report version 3 and
    /// later carry them), if known.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Product::Milan),
            (0x19, 0x10..=0x1F | 0xA0..=0xAF) => Some(Product::Genoa),
            (0x1A, 0x00..=0x11) => Some(Product::Turin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "milan",
            Product::Genoa => "genoa",
            Product::Turin => "turin",
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Product {
    type Err = UnknownProduct;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "milan" => Ok(Product::Milan),
            "genoa" => Ok(Product::Genoa),
            "turin" => Ok(Product::Turin),
            _ => Err(UnknownProduct(s.to_owned())),
        }
    }
}

/// A product name other than milan, genoa or turin.
#[derive(Debug, thiserror::Error)]
#[error("unknown product {0:?} (expected milan, genoa or turin)")]
pub struct UnknownProduct(String);

/// The report's ECDSA P-384 signature: R and S little endian, zero padded
/// to 72 bytes each.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReportSignature {
    pub r: [u8; 72],
    pub s: [u8; 72],
    reserved: [u8; 368],
}

impl fmt::Debug for ReportSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportSignature").field("r", &hex::encode(self.r)).field("s", &hex::encode(self.s)).finish()
    }
}

/// One SEV-SNP attestation report, byte for byte (spec 56860, versions 2 to 5;
/// fields a version does not define read as zero).
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AttestationReport {
    pub version: U32,
    pub guest_svn: U32,
    pub policy: U64,
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub vmpl: U32,
    pub signature_algo: U32,
    pub current_tcb: RawTcb,
    pub platform_info: U64,
    /// Bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY.
    pub key_info: U32,
    reserved0: [u8; 4],
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub report_id: [u8; 32],
    pub report_id_ma: [u8; 32],
    pub reported_tcb: RawTcb,
    /// Version 3 and later.
    pub cpuid_fam_id: u8,
    pub cpuid_mod_id: u8,
    pub cpuid_step: u8,
    reserved1: [u8; 21],
    pub chip_id: [u8; 64],
    pub committed_tcb: RawTcb,
    pub current_build: u8,
    pub current_minor: u8,
    pub current_major: u8,
    reserved2: u8,
    pub committed_build: u8,
    pub committed_minor: u8,
    pub committed_major: u8,
    reserved3: u8,
    pub launch_tcb: RawTcb,
    reserved4: [u8; 168],
    pub signature: ReportSignature,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<AttestationReport>() == REPORT_SIZE);
    assert!(size_of::<ReportSignature>() == 512);
    assert!(offset_of!(AttestationReport, key_info) == 0x48);
    assert!(offset_of!(AttestationReport, report_data) == 0x50);
    assert!(offset_of!(AttestationReport, measurement) == 0x90);
    assert!(offset_of!(AttestationReport, host_data) == 0xC0);
    assert!(offset_of!(AttestationReport, id_key_digest) == 0xE0);
    assert!(offset_of!(AttestationReport, author_key_digest) == 0x110);
    assert!(offset_of!(AttestationReport, report_id) == 0x140);
    assert!(offset_of!(AttestationReport, report_id_ma) == 0x160);
    assert!(offset_of!(AttestationReport, reported_tcb) == 0x180);
    assert!(offset_of!(AttestationReport, cpuid_fam_id) == 0x188);
    assert!(offset_of!(AttestationReport, chip_id) == 0x1A0);
    assert!(offset_of!(AttestationReport, committed_tcb) == 0x1E0);
    assert!(offset_of!(AttestationReport, current_build) == 0x1E8);
    assert!(offset_of!(AttestationReport, committed_build) == 0x1EC);
    assert!(offset_of!(AttestationReport, launch_tcb) == 0x1F0);
    assert!(offset_of!(AttestationReport, signature) == SIGNED_LEN);
};

/// Which key signed the report (SIGNING_KEY, bits 4:2 of the key field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SigningKey {
    Vcek,
    Vlek,
    None,
    Reserved(u8),
}

impl fmt::Display for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Vcek => f.write_str("vcek"),
            SigningKey::Vlek => f.write_str("vlek"),
            SigningKey::None => f.write_str("none"),
            SigningKey::Reserved(v) => write!(f, "reserved({v})"),
        }
    }
}

/// Why bytes are not a report.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("a report is {REPORT_SIZE} bytes, got {0}")]
    Length(usize),
    #[error("hex text has a non-hex character {character:?} at byte {position}")]
    NotHex { position: usize, character: char },
    #[error("hex text has an odd number of digits ({0})")]
    OddDigits(usize),
    #[error("neither a {REPORT_SIZE}-byte binary report nor hex text ({0} bytes)")]
    NotAReport(usize),
}

impl AttestationReport {
    /// Reads exactly [`REPORT_SIZE`] raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        Self::read_from_bytes(bytes).map_err(|_| ParseError::Length(bytes.len()))
    }

    /// Reads hex text (either case, whitespace anywhere ignored).
    pub fn from_hex(text: &str) -> Result<Self, ParseError> {
        Self::from_bytes(&decode_hex_text(text.as_bytes())?)
    }

    /// Reads a report file's contents: hex text when every byte is a hex
    /// digit or whitespace (a binary report always has zero bytes), else
    /// exactly [`REPORT_SIZE`] raw bytes.
    pub fn parse(input: &[u8]) -> Result<Self, ParseError> {
        let textual = !input.is_empty() && input.iter().all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace());
        if textual {
            Self::from_bytes(&decode_hex_text(input)?)
        } else if input.len() == REPORT_SIZE {
            Self::from_bytes(input)
        } else if !input.is_empty() && input.is_ascii() {
            // Text with something else in it: name the culprit.
            decode_hex_text(input).and_then(|b| Self::from_bytes(&b))
        } else {
            Err(ParseError::NotAReport(input.len()))
        }
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        self.as_bytes().get(..SIGNED_LEN).unwrap_or_default()
    }

    pub fn policy(&self) -> GuestPolicy {
        GuestPolicy(self.policy.get())
    }

    pub fn author_key_en(&self) -> bool {
        self.key_info.get() & 1 != 0
    }

    pub fn mask_chip_key(&self) -> bool {
        self.key_info.get() & 2 != 0
    }

    pub fn signing_key(&self) -> SigningKey {
        match (self.key_info.get() >> 2) & 0b111 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            other => SigningKey::Reserved(other as u8),
        }
    }

    /// The product named by the CPUID fields (version 3 and later).
    pub fn cpuid_product(&self) -> Option<Product> {
        if self.version.get() < 3 {
            return None;
        }
        Product::from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)
    }
}

impl fmt::Debug for AttestationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttestationReport")
            .field("version", &self.version.get())
            .field("policy", &format_args!("{:#x}", self.policy.get()))
            .field("measurement", &hex::encode(self.measurement))
            .field("host_data", &hex::encode(self.host_data))
            .field("reported_tcb", &self.reported_tcb)
            .finish_non_exhaustive()
    }
}

fn decode_hex_text(input: &[u8]) -> Result<Vec<u8>, ParseError> {
    let mut digits = Vec::with_capacity(input.len());
    for (position, &b) in input.iter().enumerate() {
        if b.is_ascii_whitespace() {
            continue;
        }
        if !b.is_ascii_hexdigit() {
            return Err(ParseError::NotHex { position, character: char::from(b) });
        }
        digits.push(b);
    }
    if digits.len() % 2 != 0 {
        return Err(ParseError::OddDigits(digits.len()));
    }
    hex::decode(&digits).map_err(|_| ParseError::OddDigits(digits.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcb_layouts() {
        let raw = RawTcb([1, 2, 3, 4, 0, 0, 5, 6]);
        assert_eq!(
            raw.decode(TcbLayout::MilanGenoa),
            TcbVersion { fmc: None, bootloader: 1, tee: 2, snp: 5, microcode: 6 }
        );
        assert_eq!(
            raw.decode(TcbLayout::Turin),
            TcbVersion { fmc: Some(1), bootloader: 2, tee: 3, snp: 4, microcode: 6 }
        );
        assert_eq!(Product::Turin.tcb_layout(), TcbLayout::Turin);
        for layout in [TcbLayout::MilanGenoa, TcbLayout::Turin] {
            assert_eq!(RawTcb::encode(raw.decode(layout), layout).decode(layout), raw.decode(layout));
        }
        assert_eq!(RawTcb::encode(raw.decode(TcbLayout::Turin), TcbLayout::Turin), RawTcb([1, 2, 3, 4, 0, 0, 0, 6]));
    }

    #[test]
    fn tcb_text() {
        let t: TcbVersion = "bootloader=3, tee=0 ,snp=8,microcode=115".parse().expect("parses");
        assert_eq!(t.to_string(), "bl=3,tee=0,snp=8,ucode=115");
        assert!("bl=256".parse::<TcbVersion>().is_err());
        assert!("bl".parse::<TcbVersion>().is_err());
        assert!("psp=1".parse::<TcbVersion>().is_err());
        let turin = TcbVersion { fmc: Some(2), ..t };
        assert!(turin.meets(&t) && !t.meets(&turin));
    }

    #[test]
    fn products() {
        assert_eq!(Product::from_cpuid(0x19, 0x01), Some(Product::Milan));
        assert_eq!(Product::from_cpuid(0x19, 0x11), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x1A, 0x02), Some(Product::Turin));
        assert_eq!(Product::from_cpuid(0x17, 0x31), None);
        assert_eq!("Genoa".parse::<Product>().ok(), Some(Product::Genoa));
        assert!("naples".parse::<Product>().is_err());
    }
}
