//! Whose REPORT_DATA a report carries.
//!
//! The agent signs reports for more than one asker, and a relying party
//! that checks REPORT_DATA must know whose binding it is looking at: a key
//! broker binds its nonce and the requester's fresh key, a container its
//! own data, the host whatever it likes. So no asker chooses REPORT_DATA
//! outright. Each asker has a [`Domain`], and REPORT_DATA is
//!
//! ```text
//! SHA-512("parma/report-data/v1/" || DOMAIN || 0x00 || IDENTITY || DATA)
//! ```
//!
//! where `DOMAIN` is the domain's label (`host`, `container`), `IDENTITY`
//! who in that domain asked (nothing for the host; for a container, its
//! name in the policy as a little-endian u64 length and the name's bytes,
//! taken from the agent's records, never from the request) and `DATA` the
//! asker's 64 bytes (a shorter value zero padded on the right, as requests
//! carry it). The digest fills REPORT_DATA's 64 bytes.
//!
//! - A value made in one domain is never one made in another, nor one made
//!   for one container one made for another: that would be a SHA-512
//!   collision between inputs with different prefixes (labels hold no NUL,
//!   and the name's length comes before it).
//! - A host cannot relay a key broker's challenge and get a report that
//!   satisfies it: Trustee's brokers expect REPORT_DATA to be the SHA-384 of
//!   their canonical JSON, zero padded, so its last 16 bytes are zero, which
//!   a SHA-512 output is with probability 2^-128; and a host that wants a
//!   given REPORT_DATA must invert SHA-512.
//!
//! `parma verify --expect-report-data host:HEX` checks a report the host
//! asked for (`parma agent attest --report-data HEX`),
//! `container:NAME:HEX` one that the policy's container NAME asked for
//! through its endpoint (`/dev/parma/attestation.sock`); `raw:HEX` checks
//! REPORT_DATA as it is.

use sha2::{Digest, Sha512};

/// What every domain's hash input starts with.
pub const PREFIX: &[u8] = b"parma/report-data/v1/";

/// Who asked for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain<'a> {
    /// The host (`GetAttestation`; `parma agent attest`).
    Host,
    /// A container, by its name in the policy (its endpoint inside the
    /// container; decided at `container_attestation`).
    Container(&'a str),
}

/// The domains' labels, as `--expect-report-data` spells them.
pub const LABELS: [&str; 2] = ["host:HEX", "container:NAME:HEX"];

impl<'a> Domain<'a> {
    /// The label hashed into REPORT_DATA.
    pub const fn label(self) -> &'static str {
        match self {
            Domain::Host => "host",
            Domain::Container(_) => "container",
        }
    }

    /// `host:HEX` or `container:NAME:HEX` (NAME ends at the last colon):
    /// the domain and the hex of its data; `None` for another label.
    pub fn parse(text: &'a str) -> Option<(Self, &'a str)> {
        let (label, rest) = text.split_once(':')?;
        match label {
            "host" => Some((Domain::Host, rest)),
            "container" => {
                let (name, hex) = rest.rsplit_once(':')?;
                Some((Domain::Container(name), hex))
            }
            _ => None,
        }
    }

    /// REPORT_DATA binding `data` in this domain.
    pub fn report_data(self, data: &[u8; 64]) -> [u8; 64] {
        let mut sha = Sha512::new();
        sha.update(PREFIX);
        sha.update(self.label().as_bytes());
        sha.update([0]);
        match self {
            Domain::Host => {}
            Domain::Container(name) => {
                sha.update((name.len() as u64).to_le_bytes());
                sha.update(name.as_bytes());
            }
        }
        sha.update(data);
        sha.finalize().into()
    }
}

impl std::fmt::Display for Domain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Domain::Host => f.write_str("host"),
            Domain::Container(name) => write!(f, "container {name:?}"),
        }
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
    fn container_domain_known_answers() {
        // Python's hashlib: sha512(b"parma/report-data/v1/container\0"
        //   + struct.pack("<Q", len(name)) + name + data).hexdigest()
        assert_eq!(
            hex::encode(Domain::Container("web").report_data(&padded(&[0x5a; 32]))),
            "2ce078423e7154b844c666ed86fae2875b11c85eab98bbe2861d5d8c71890be6\
             daa3edd406ac43ba42c9d3a174a72440107338f1585af247d350fd06933440ad"
        );
        assert_eq!(
            hex::encode(Domain::Container("").report_data(&[0; 64])),
            "954c8fc1db0b34ca3326744d3d2050bb906beaeb963c5933d8ba5f7de88eedb1\
             8a9c45c45b85128fd7814fe5dd0197b3328e9f491759daf4f47546de8a824e38"
        );
    }

    #[test]
    fn domains_and_names_never_share_a_value() {
        let data = padded(b"the same data");
        let values = [
            Domain::Host.report_data(&data),
            Domain::Container("web").report_data(&data),
            Domain::Container("web2").report_data(&data),
            Domain::Container("").report_data(&data),
        ];
        for (i, a) in values.iter().enumerate() {
            for b in values.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn labels_parse() {
        assert_eq!(Domain::parse("host:5a"), Some((Domain::Host, "5a")));
        assert_eq!(Domain::parse("host:"), Some((Domain::Host, "")));
        assert_eq!(Domain::parse("container:web:5a"), Some((Domain::Container("web"), "5a")));
        // A name is whatever comes before the last colon.
        assert_eq!(Domain::parse("container:a:b:"), Some((Domain::Container("a:b"), "")));
        assert_eq!(Domain::parse("container:5a"), None);
        assert_eq!(Domain::parse("raw:5a"), None);
        assert_eq!(Domain::parse("Host:5a"), None);
        assert_eq!(Domain::parse("host"), None);
        assert_eq!(Domain::Host.label(), "host");
        assert_eq!(Domain::Container("x").label(), "container");
    }
}
