//! SEV-SNP attestation reports (AMD specification 56860) and a verifier a
//! relying party can run on its own: AMD's certificate chain, the report's
//! signature, the VCEK's TCB and chip id, the guest policy and the caller's
//! expectations, each reported as a named check with its values.
//!
//! A crate of its own because it is shared by the host (the verifier, with
//! heavy RustCrypto RSA and X.509 dependencies) and the guest (the report
//! format and, under TCG only, the INSECURE emulation provider). It must not
//! depend on tokio, QEMU or anything guest-only.
//!
//! Features:
//! - `verifier` (default): [`verify`], [`certs`]; RSA, X.509, DER.
//! - `emulation`: [`emulation::Signer`], which makes reports in the real
//!   format signed by an INSECURE test key, with P-384 only (what the guest
//!   agent links). With `verifier` too, [`emulation::test_chain`] builds the
//!   matching test certificates.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

#[cfg(feature = "verifier")]
pub mod certs;
#[cfg(feature = "emulation")]
pub mod emulation;
pub mod policy;
#[cfg(feature = "verifier")]
pub mod reference;
pub mod report;
pub mod report_data;
#[cfg(feature = "verifier")]
pub mod verify;

#[cfg(feature = "verifier")]
pub use certs::{CertError, CertSource};
pub use policy::{GuestPolicy, PolicyBits};
pub use report::{AttestationReport, ParseError, Product, RawTcb, TcbLayout, TcbVersion};
#[cfg(feature = "verifier")]
pub use verify::{Check, CheckName, Expectations, Verification, VerifyError, verify};
