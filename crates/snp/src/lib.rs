//! SEV-SNP attestation reports (AMD specification 56860) and a verifier a
//! relying party can run on its own: AMD's certificate chain, the report's
//! signature, the VCEK's TCB and chip id, the guest policy and the caller's
//! expectations, each reported as a named check with its values.
//!
//! A crate of its own because it is host-side relying-party code with a
//! heavy dependency (RustCrypto RSA, P-384, X.509) that the guest never
//! needs. It must not depend on tokio, QEMU or anything guest-only.

pub mod certs;
pub mod policy;
pub mod report;
pub mod verify;

pub use certs::{CertError, CertSource};
pub use policy::{GuestPolicy, PolicyBits};
pub use report::{AttestationReport, ParseError, Product, RawTcb, TcbLayout, TcbVersion};
pub use verify::{Check, CheckName, Expectations, Verification, VerifyError, verify};
