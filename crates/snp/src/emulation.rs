//! INSECURE emulation of SEV-SNP attestation for guests under TCG, where
//! there is no SNP: reports in the real format (version 3, Milan CPUID),
//! signed by a P-384 key derived from a seed that is not secret.
//!
//! Such a report proves nothing: anyone with the seed signs whatever they
//! like. The verifier accepts its chain ([`test_chain`], built from the same
//! seed) only when the caller sets `allow_insecure_emulation`, and then says
//! so (`Verification::insecure_emulation`). The guest turns this provider on
//! only through a kernel command-line flag, which changes the launch digest,
//! so an emulated guest can never pass for a real launch.
//!
//! Everything here is deterministic: the keys and the chip id come from the
//! seed, the signature is RFC 6979, the certificates have fixed dates, so the
//! same seed and fields give the same bytes.

use std::fmt;

use p384::ecdsa::signature::Signer as SignWith;
use p384::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256, Sha384, Sha512};
use zerocopy::FromZeros;
use zerocopy::byteorder::little_endian::{U32, U64};

use crate::policy::GuestPolicy;
use crate::report::{AttestationReport, Product, RawTcb, TcbVersion};

#[cfg(feature = "verifier")]
mod chain;
#[cfg(feature = "verifier")]
pub use chain::{ChainError, TestChain, test_chain};

/// Report format version: 3, the first with CPUID fields, so the verifier
/// tells the product ([`EMULATED_PRODUCT`]) from the report itself.
pub const EMULATED_VERSION: u32 = 3;
/// The seed of the Parma agent's emulated reports (and of the test chain
/// `parma agent attest --emulation-chain` writes). Public on purpose: anyone
/// can sign such reports, which is why they prove nothing.
pub const AGENT_SEED: [u8; 32] = *b"parma insecure SNP emulation v1!";
/// The product the emulated CPUID names; it fixes the TCB layout.
pub const EMULATED_PRODUCT: Product = Product::Milan;
/// CPUID family, model and stepping of a Milan B1 part.
pub const EMULATED_CPUID: [u8; 3] = [0x19, 0x01, 0x01];
/// Guest policy: SMT allowed, the reserved bit 17 set, debugging off.
pub const EMULATED_POLICY: u64 = GuestPolicy::SMT | GuestPolicy::RESERVED_ONE;
/// Current, reported, committed and launch TCB of every emulated report,
/// and the SPL extensions of the test VCEK (the levels of the Milan vector).
pub const EMULATED_TCB: TcbVersion = TcbVersion { fmc: None, bootloader: 3, tee: 0, snp: 8, microcode: 115 };
/// PLATFORM_INFO: SMT enabled.
pub const EMULATED_PLATFORM_INFO: u64 = 1;
/// Current and committed firmware: major, minor, build.
pub const EMULATED_FIRMWARE: (u8, u8, u8) = (1, 52, 4);

/// Domain separation for everything derived from the seed.
const DOMAIN: &[u8] = b"parma-snp INSECURE emulation v1";

/// The keys of the test chain, each derived from the seed under its role.
#[cfg_attr(not(feature = "verifier"), allow(dead_code, reason = "the guest needs the VCEK only"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Ark,
    Ask,
    Vcek,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Ark => b"ark",
            Role::Ask => b"ask",
            Role::Vcek => b"vcek",
        }
    }
}

/// The P-384 key of `role`: SHA-384 of the domain, the role, the seed and a
/// counter, taken as the scalar; a digest of zero or at least the group
/// order (probability about 2^-190) is skipped by counting on.
pub(crate) fn derive_key(seed: &[u8; 32], role: Role) -> SigningKey {
    let mut counter: u32 = 0;
    loop {
        let digest = Sha384::new()
            .chain_update(DOMAIN)
            .chain_update(b"/key/")
            .chain_update(role.label())
            .chain_update(seed)
            .chain_update(counter.to_be_bytes())
            .finalize();
        if let Ok(key) = SigningKey::from_bytes(&digest) {
            return key;
        }
        counter = counter.wrapping_add(1);
    }
}

/// The emulated CHIP_ID (and the test VCEK's hwID): SHA-512 of the seed.
pub fn chip_id(seed: &[u8; 32]) -> [u8; 64] {
    Sha512::new().chain_update(DOMAIN).chain_update(b"/chip-id/").chain_update(seed).finalize().into()
}

/// What the caller puts in an emulated report; everything else is fixed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EmulatedFields {
    /// MEASUREMENT: the launch digest the guest claims (for Parma, the
    /// expected digest of the image, computed ahead of time).
    pub measurement: [u8; 48],
    /// HOST_DATA: what the host gave at launch (the command line under emulation).
    pub host_data: [u8; 32],
    /// REPORT_DATA: chosen by the requester.
    pub report_data: [u8; 64],
}

impl Default for EmulatedFields {
    fn default() -> Self {
        EmulatedFields { measurement: [0; 48], host_data: [0; 32], report_data: [0; 64] }
    }
}

impl fmt::Debug for EmulatedFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedFields")
            .field("measurement", &hex::encode(self.measurement))
            .field("host_data", &hex::encode(self.host_data))
            .field("report_data", &hex::encode(self.report_data))
            .finish()
    }
}

/// Makes INSECURE emulated reports signed by the test VCEK of a seed.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    chip_id: [u8; 64],
    report_id_key: [u8; 32],
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("chip_id", &hex::encode(self.chip_id)).finish_non_exhaustive()
    }
}

impl Signer {
    /// The signer of the test chain made from `seed` (the seed is not a
    /// secret: it only keeps test chains apart).
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        Signer {
            key: derive_key(seed, Role::Vcek),
            chip_id: chip_id(seed),
            report_id_key: Sha256::new()
                .chain_update(DOMAIN)
                .chain_update(b"/report-id/")
                .chain_update(seed)
                .finalize()
                .into(),
        }
    }

    /// The test VCEK's public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        *self.key.verifying_key()
    }

    /// The emulated CHIP_ID.
    pub fn chip_id(&self) -> [u8; 64] {
        self.chip_id
    }

    /// A complete report with `fields`, signed (ECDSA P-384, SHA-384, RFC 6979)
    /// over bytes 0..0x2A0, R and S little endian, zero padded to 72 bytes.
    /// REPORT_ID is derived from the seed, the measurement and HOST_DATA, so
    /// it is fixed for one emulated launch, as a real one is.
    ///
    /// Signing fails only if R or S comes out zero (probability about
    /// 2^-383); the signature is then left zero, which no verifier accepts.
    pub fn report(&self, fields: EmulatedFields) -> AttestationReport {
        let tcb = RawTcb::encode(EMULATED_TCB, EMULATED_PRODUCT.tcb_layout());
        let (major, minor, build) = EMULATED_FIRMWARE;
        let [family, model, stepping] = EMULATED_CPUID;
        let mut r = AttestationReport::new_zeroed();
        r.version = U32::new(EMULATED_VERSION);
        r.guest_svn = U32::new(0);
        r.policy = U64::new(EMULATED_POLICY);
        r.vmpl = U32::new(0);
        r.signature_algo = U32::new(1);
        r.current_tcb = tcb;
        r.platform_info = U64::new(EMULATED_PLATFORM_INFO);
        // VCEK, no author key, chip id not masked.
        r.key_info = U32::new(0);
        r.report_data = fields.report_data;
        r.measurement = fields.measurement;
        r.host_data = fields.host_data;
        r.report_id = Sha256::new()
            .chain_update(self.report_id_key)
            .chain_update(fields.measurement)
            .chain_update(fields.host_data)
            .finalize()
            .into();
        r.reported_tcb = tcb;
        r.cpuid_fam_id = family;
        r.cpuid_mod_id = model;
        r.cpuid_step = stepping;
        r.chip_id = self.chip_id;
        r.committed_tcb = tcb;
        (r.current_major, r.current_minor, r.current_build) = (major, minor, build);
        (r.committed_major, r.committed_minor, r.committed_build) = (major, minor, build);
        r.launch_tcb = tcb;
        if let Ok(signature) = SignWith::<Signature>::try_sign(&self.key, r.signed_bytes()) {
            let (sig_r, sig_s) = signature.split_bytes();
            r.signature.r = le_padded(&sig_r);
            r.signature.s = le_padded(&sig_s);
        }
        r
    }
}

/// A 48-byte big-endian scalar as AMD stores it: little endian, zero padded
/// to 72 bytes.
fn le_padded(be: &p384::FieldBytes) -> [u8; 72] {
    let mut le = [0u8; 72];
    le.iter_mut().zip(be.iter().rev()).for_each(|(d, s)| *d = *s);
    le
}

#[cfg(test)]
mod tests {
    use p384::ecdsa::signature::Verifier as _;

    use super::*;

    fn fields() -> EmulatedFields {
        EmulatedFields { measurement: [0x11; 48], host_data: [0x22; 32], report_data: [0x33; 64] }
    }

    /// The signature, read back from AMD's layout with p384 alone.
    fn signature_of(r: &AttestationReport) -> Signature {
        let be = |le: &[u8; 72]| {
            assert!(le[48..].iter().all(|&b| b == 0), "zero padded");
            let mut be = p384::FieldBytes::default();
            be.iter_mut().zip(le[..48].iter().rev()).for_each(|(d, s)| *d = *s);
            be
        };
        Signature::from_scalars(be(&r.signature.r), be(&r.signature.s)).expect("valid scalars")
    }

    #[test]
    fn reports_are_complete_signed_and_deterministic() {
        let signer = Signer::from_seed(&[7; 32]);
        let r = signer.report(fields());
        assert_eq!(r.version.get(), 3);
        assert_eq!(r.policy.get(), 0x30000);
        assert!(!r.policy().debug_allowed());
        assert_eq!(r.signature_algo.get(), 1);
        assert_eq!(r.cpuid_product(), Some(Product::Milan));
        assert_eq!(r.reported_tcb.decode(Product::Milan.tcb_layout()), EMULATED_TCB);
        assert_eq!(r.chip_id, chip_id(&[7; 32]));
        assert_eq!((r.measurement, r.host_data, r.report_data), ([0x11; 48], [0x22; 32], [0x33; 64]));
        assert_ne!(r.report_id, [0; 32]);
        signer.verifying_key().verify(r.signed_bytes(), &signature_of(&r)).expect("signature verifies");
        assert_eq!(Signer::from_seed(&[7; 32]).report(fields()), r, "same seed and fields, same bytes");
    }

    #[test]
    fn seeds_and_roles_give_different_keys() {
        let a = Signer::from_seed(&[1; 32]);
        let b = Signer::from_seed(&[2; 32]);
        assert_ne!(a.verifying_key(), b.verifying_key());
        assert_ne!(a.chip_id(), b.chip_id());
        let seed = [1; 32];
        let keys = [Role::Ark, Role::Ask, Role::Vcek].map(|role| *derive_key(&seed, role).verifying_key());
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        assert_eq!(keys[2], a.verifying_key());
        let r = a.report(fields());
        assert!(b.verifying_key().verify(r.signed_bytes(), &signature_of(&r)).is_err());
    }

    #[test]
    fn report_id_follows_the_launch() {
        let signer = Signer::from_seed(&[3; 32]);
        let one = signer.report(fields());
        let other_data = signer.report(EmulatedFields { report_data: [0x44; 64], ..fields() });
        let other_launch = signer.report(EmulatedFields { host_data: [0x55; 32], ..fields() });
        assert_eq!(one.report_id, other_data.report_id);
        assert_ne!(one.report_id, other_launch.report_id);
    }
}
