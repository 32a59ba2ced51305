//! The secrets a policy lists for a container, asked for before it starts
//! (`parma run --netns` and the containerd shim).
//!
//! The agent answers `CreateContainer` with the policy entry the container
//! was created as; [`parma_policy::listed_secrets`] gives that entry's
//! secrets and their brokers, evaluated as the agent evaluates the policy;
//! each is then one `ProvisionSecret`, decided in the guest on its own
//! (`release_secret`). The host only chooses the route: the UVM reaches a
//! broker over the pod's network, at an address given for the broker's name
//! or its URL's host resolved here. TLS ends in the agent and the policy's
//! pin decides who the broker is, so a wrong route fails, it does not
//! mislead.

use std::net::{SocketAddr, ToSocketAddrs as _};

use parma_policy::data::Broker;
use parma_policy::{ListedSecret, Policy, PolicyError};

use crate::client::{Client, ClientError};

/// Why the secrets were not provisioned.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The policy's secrets for the container cannot be read.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The UVM has no network to reach a broker over.
    #[error(
        "the policy gives container {container:?} secrets from broker {broker:?}, which the UVM reaches over the \
         pod's network, and this UVM has none"
    )]
    NoNetwork {
        /// The container's entry in the policy.
        container: String,
        /// The first broker it needs.
        broker: String,
    },
    /// A broker's URL is not `https://HOST[:PORT]`.
    #[error("broker {broker:?}: its URL {url:?} is not https://HOST[:PORT]")]
    BadUrl {
        /// The broker's name.
        broker: String,
        /// Its URL.
        url: String,
    },
    /// Its host name does not resolve here, and no address was given.
    #[error("broker {broker:?}: {host} does not resolve on this host, and no address was given for it")]
    Unresolved {
        /// The broker's name.
        broker: String,
        /// Its URL's `HOST[:PORT]`.
        host: String,
    },
    /// The agent refused or failed one.
    #[error("secret {file:?} from broker {broker:?}: {source}")]
    Agent {
        /// The broker's name.
        broker: String,
        /// The file it was to become.
        file: String,
        /// The agent's answer.
        source: ClientError,
    },
}

/// The prefix of the pod annotation that gives the route to a broker,
/// `io.parma.broker-address.NAME: IP:PORT` (NAME as in the policy's
/// `brokers`): for a broker whose URL's host the node cannot resolve (a
/// cluster-internal name). The shim reads it from the sandbox's spec.
pub const BROKER_ADDRESS_ANNOTATION_PREFIX: &str = "io.parma.broker-address.";

/// The broker addresses among `annotations` ([`BROKER_ADDRESS_ANNOTATION_PREFIX`]).
pub fn addresses_from_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut addresses = Vec::new();
    for (key, value) in annotations {
        let Some(name) = key.strip_prefix(BROKER_ADDRESS_ANNOTATION_PREFIX) else { continue };
        if name.is_empty() {
            return Err(format!("annotation {key} names no broker"));
        }
        let address =
            value.parse().map_err(|err| format!("annotation {key}: {:?} is not IP:PORT: {err}", bounded(value)))?;
        addresses.push((name.to_string(), address));
    }
    Ok(addresses)
}

/// At most 64 characters of a host-given text, for a message.
fn bounded(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Where the UVM reaches brokers: by broker name, and whether it has a
/// network at all.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Whether the UVM is a pod with a network interface.
    pub networked: bool,
    /// Addresses given for brokers, by their name in the policy.
    pub addresses: Vec<(String, SocketAddr)>,
}

impl Routes {
    /// Where the UVM reaches `broker`: the address given for its name, else
    /// its URL's host (`https://HOST[:PORT]`, port 443 by default) resolved here.
    pub fn address_of(&self, broker: &Broker) -> Result<SocketAddr, SecretError> {
        if let Some((_, address)) = self.addresses.iter().find(|(name, _)| *name == broker.name) {
            return Ok(*address);
        }
        let bad = || SecretError::BadUrl { broker: broker.name.clone(), url: broker.url.clone() };
        let rest = broker.url.strip_prefix("https://").ok_or_else(bad)?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let has_port = match authority.rsplit_once(':') {
            Some((host, port)) => {
                (!host.contains(':') || host.ends_with(']')) && !port.is_empty() && port.parse::<u16>().is_ok()
            }
            None => false,
        };
        let with_port = if has_port { authority.to_string() } else { format!("{authority}:443") };
        with_port
            .to_socket_addrs()
            .ok()
            .and_then(|mut found| found.next())
            .ok_or_else(|| SecretError::Unresolved { broker: broker.name.clone(), host: authority.to_string() })
    }
}

/// Ask the agent for every secret `policy` lists for its entry `entry`, for
/// container `id` (created, not started); `done` hears of each provisioned.
/// Returns how many. Nothing is asked unless every route is known.
pub fn provision(
    client: &mut Client,
    policy: &Policy,
    id: &str,
    entry: &str,
    routes: &Routes,
    done: &dyn Fn(&ListedSecret),
) -> Result<usize, SecretError> {
    let listed = parma_policy::listed_secrets(policy, entry)?;
    let Some(first) = listed.first() else { return Ok(0) };
    if !routes.networked {
        return Err(SecretError::NoNetwork { container: entry.to_string(), broker: first.broker.name.clone() });
    }
    let addresses = listed.iter().map(|secret| routes.address_of(&secret.broker)).collect::<Result<Vec<_>, _>>()?;
    for (secret, address) in listed.iter().zip(addresses) {
        client
            .provision_secret(
                id,
                &secret.broker.url,
                &secret.broker.certificate_sha256,
                &secret.secret.resource,
                &secret.secret.file,
                Some(&address.to_string()),
            )
            .map_err(|source| SecretError::Agent {
                broker: secret.broker.name.clone(),
                file: secret.secret.file.clone(),
                source,
            })?;
        done(secret);
    }
    Ok(listed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(url: &str) -> Broker {
        Broker { name: "kbs".into(), url: url.into(), certificate_sha256: "ab".into() }
    }

    #[test]
    fn a_broker_is_reached_at_its_given_address_or_its_urls_host() {
        let given: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let routes = Routes { networked: true, addresses: vec![("kbs".into(), given)] };
        assert_eq!(routes.address_of(&broker("https://kbs.invalid:1")).unwrap(), given);
        let routes = Routes { networked: true, addresses: Vec::new() };
        for (url, expected) in [
            ("https://127.0.0.1:8443", "127.0.0.1:8443"),
            ("https://127.0.0.1", "127.0.0.1:443"),
            ("https://127.0.0.1:8443/kbs/v0", "127.0.0.1:8443"),
            ("https://[::1]:8443", "[::1]:8443"),
            ("https://[::1]", "[::1]:443"),
            ("https://localhost:8443", "127.0.0.1:8443"),
        ] {
            let found = routes.address_of(&broker(url)).unwrap();
            if url.contains("localhost") {
                assert_eq!(found.port(), 8443, "{url}");
                assert!(found.ip().is_loopback(), "{url}");
            } else {
                assert_eq!(found, expected.parse().unwrap(), "{url}");
            }
        }
        for url in ["http://127.0.0.1:80", "https://", "https://user@127.0.0.1:8443", "kbs:8080"] {
            let err = routes.address_of(&broker(url)).unwrap_err();
            assert!(matches!(err, SecretError::BadUrl { .. }), "{url}: {err}");
        }
        // (A name that does not resolve would ask the machine's DNS server: not tested here.)
    }

    #[test]
    fn a_pods_annotations_give_broker_addresses() {
        let annotations: std::collections::BTreeMap<String, String> = [
            ("io.parma.broker-address.trustee", "10.96.0.20:8080"),
            ("io.parma.broker-address.v6", "[fd00::1]:443"),
            ("io.parma.policy", "H4sI..."),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let found = addresses_from_annotations(&annotations).unwrap();
        assert_eq!(
            found,
            [
                ("trustee".to_string(), "10.96.0.20:8080".parse().unwrap()),
                ("v6".to_string(), "[fd00::1]:443".parse().unwrap())
            ]
        );
        for (key, value, expected) in [
            ("io.parma.broker-address.", "10.0.0.1:1", "names no broker"),
            ("io.parma.broker-address.kbs", "kbs.svc:8080", "is not IP:PORT"),
        ] {
            let one = std::collections::BTreeMap::from([(key.to_string(), value.to_string())]);
            let err = addresses_from_annotations(&one).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
