//! Whose REPORT_DATA a report carries.
//!
//! The agent signs reports for more than one asker, and a relying party
//! that checks REPORT_DATA must know whose binding it is looking at: a key
//! broker binds its nonce and the requester's fresh key, a container its
//! own data, the host whatever it likes. So no asker chooses REPORT_DATA
//! outright. Each asker has a [`Domain`], and REPORT_DATA is
//!
//! ```text
//! SHA-512("parma/report-data/v1/" || DOMAIN || 0x00 || DATA)
//! ```
//!
//! where `DOMAIN` is the domain's label (`host`) and `DATA` the asker's 64
//! bytes (a shorter value zero padded on the right, as requests carry it).
//! The digest fills REPORT_DATA's 64 bytes.
//!
//! - A value made in one domain is never one made in another: that would be
//!   a SHA-512 collision between inputs with different prefixes.
//! - A host cannot relay a key broker's challenge and get a report that
//!   satisfies it: Trustee's brokers expect REPORT_DATA to be the SHA-384 of
//!   their canonical JSON, zero padded, so its last 16 bytes are zero, which
//!   a SHA-512 output is with probability 2^-128; and a host that wants a
//!   given REPORT_DATA must invert SHA-512.
//!
//! `parma verify --expect-report-data host:HEX` checks a report the host
//! asked for (`parma agent attest --report-data HEX`); `raw:HEX` checks
//! REPORT_DATA as it is.

use sha2::{Digest, Sha512};

/// What every domain's hash input starts with.
pub const PREFIX: &[u8] = b"parma/report-data/v1/";

/// Who asked for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain {
    /// The host (`GetAttestation`; `parma agent attest`).
    Host,
}

impl Domain {
    /// Every domain.
    pub const ALL: [Domain; 1] = [Domain::Host];

    /// The label hashed into REPORT_DATA, and its name on the command line.
    pub const fn label(self) -> &'static str {
        match self {
            Domain::Host => "host",
        }
    }

    /// The domain with this label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|domain| domain.label() == label)
    }

    /// REPORT_DATA binding `data` in this domain.
    pub fn report_data(self, data: &[u8; 64]) -> [u8; 64] {
        let mut sha = Sha512::new();
        sha.update(PREFIX);
        sha.update(self.label().as_bytes());
        sha.update([0]);
        sha.update(data);
        sha.finalize().into()
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(bytes: &[u8]) -> [u8; 64] {
        let mut data = [0u8; 64];
        data[..bytes.len()].copy_from_slice(bytes);
        data
    }

    #[test]
    fn host_domain_known_answers() {
        // Python's hashlib: sha512(b"parma/report-data/v1/host\0" + data).hexdigest()
        assert_eq!(
            hex::encode(Domain::Host.report_data(&padded(&[0x5a; 32]))),
            "336f0db8d3be38ba7c8db82b37a20a482148eac4ad75708bc36bedb2d89aecf9\
             8d48448ea5c7b8910ed28c506a68b61ad07ee5a236cc213347fb8955bf183e95"
        );
        assert_eq!(
            hex::encode(Domain::Host.report_data(&[0; 64])),
            "48c85adde264572929c46820b8837fe3498500cc005454b155835fd4593b4058\
             34380a81e57415a9e490eea9244c7e042c47db68689ab8c10ac03a2d986b3c66"
        );
    }

    #[test]
    fn the_host_never_gets_its_own_bytes() {
        for data in [[0u8; 64], [0xff; 64], padded(b"a broker's nonce and key hash")] {
            let bound = Domain::Host.report_data(&data);
            assert_ne!(bound, data);
            // Not the shape of a SHA-384 binding, zero padded.
            assert_ne!(bound[48..], [0u8; 16]);
        }
    }

    #[test]
    fn labels_round_trip() {
        for domain in Domain::ALL {
            assert_eq!(Domain::from_label(domain.label()), Some(domain));
        }
        assert_eq!(Domain::from_label("raw"), None);
        assert_eq!(Domain::from_label("Host"), None);
    }
}
