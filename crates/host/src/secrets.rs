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
use std::time::Duration;

use parma_policy::data::Broker;
use parma_policy::{ListedSecret, Policy, PolicyError};

use crate::client::{Client, ClientError};

/// How long the host waits for one `ProvisionSecret`: the agent's whole
/// exchange with the broker ends within [`parma_kbs::EXCHANGE_DEADLINE`].
pub const PROVISION_CALL: Duration = parma_kbs::EXCHANGE_DEADLINE.saturating_add(Duration::from_secs(30));

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
    #[error("broker {broker:?}: URL {url:?}: {reason}")]
    BadUrl {
        /// The broker's name.
        broker: String,
        /// Its URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A route was given for a broker the policy does not list (a typo).
    #[error("a route is given for broker {0:?}, which the policy does not list")]
    UnknownRoute(String),
    /// Two routes for one broker.
    #[error("two routes are given for broker {0:?}")]
    DuplicateRoute(String),
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

/// The pod annotation that gives the routes to brokers: JSON, by broker
/// name as in the policy's `brokers`, `{"NAME": "IP:PORT"}`: for a broker
/// whose URL's host the node cannot resolve (a cluster-internal name). The
/// shim reads it from the sandbox's spec.
pub const BROKER_ADDRESSES_ANNOTATION: &str = "io.parma.broker-addresses";

/// The broker addresses in `annotations` ([`BROKER_ADDRESSES_ANNOTATION`]).
pub fn addresses_from_annotations(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, SocketAddr)>, String> {
    let Some(text) = annotations.get(BROKER_ADDRESSES_ANNOTATION) else { return Ok(Vec::new()) };
    let key = BROKER_ADDRESSES_ANNOTATION;
    let named: std::collections::BTreeMap<String, String> = serde_json::from_str(text)
        .map_err(|err| format!("annotation {key} is not a JSON object of broker names to \"IP:PORT\": {err}"))?;
    named
        .into_iter()
        .map(|(name, address)| {
            if name.is_empty() {
                return Err(format!("annotation {key} names no broker"));
            }
            let parsed = address
                .parse()
                .map_err(|err| format!("annotation {key}: {:?} is not IP:PORT: {err}", bounded(&address)))?;
            Ok((name, parsed))
        })
        .collect()
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
    /// its URL's host (`https://HOST[:PORT]`, port 443 by default) resolved
    /// here, an IPv4 address first (a pod network is more often IPv4 only).
    pub fn address_of(&self, broker: &Broker) -> Result<SocketAddr, SecretError> {
        if let Some((_, address)) = self.addresses.iter().find(|(name, _)| *name == broker.name) {
            return Ok(*address);
        }
        let url = parma_kbs::url::parse(&broker.url).map_err(|reason| SecretError::BadUrl {
            broker: broker.name.clone(),
            url: broker.url.clone(),
            reason,
        })?;
        let found: Vec<SocketAddr> =
            (url.host.as_str(), url.port).to_socket_addrs().map(Iterator::collect).unwrap_or_default();
        found
            .iter()
            .find(|address| address.is_ipv4())
            .or_else(|| found.first())
            .copied()
            .ok_or_else(|| SecretError::Unresolved { broker: broker.name.clone(), host: url.authority() })
    }

    /// Check the routes against the policy's brokers: each names one the
    /// policy lists, once.
    pub fn check(&self, brokers: &[Broker]) -> Result<(), SecretError> {
        for (index, (name, _)) in self.addresses.iter().enumerate() {
            if !brokers.iter().any(|broker| broker.name == *name) {
                return Err(SecretError::UnknownRoute(name.clone()));
            }
            if self.addresses.iter().take(index).any(|(earlier, _)| earlier == name) {
                return Err(SecretError::DuplicateRoute(name.clone()));
            }
        }
        Ok(())
    }
}

/// One `ProvisionSecret` to send: the secret and where the UVM reaches its broker.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The secret and its broker.
    pub listed: ListedSecret,
    /// The route.
    pub address: SocketAddr,
}

/// What to ask for the container created as `policy`'s entry `entry`:
/// each secret the policy lists for it, with its route (each broker
/// resolved once). Nothing is planned unless every route is known.
pub fn plan(policy: &Policy, entry: &str, routes: &Routes) -> Result<Vec<Planned>, SecretError> {
    let listed = parma_policy::listed_secrets(policy, entry)?;
    let Some(first) = listed.first() else { return Ok(Vec::new()) };
    if !routes.networked {
        return Err(SecretError::NoNetwork { container: entry.to_string(), broker: first.broker.name.clone() });
    }
    let mut resolved: Vec<(String, SocketAddr)> = Vec::new();
    let mut planned = Vec::with_capacity(listed.len());
    for listed in listed {
        let address = match resolved.iter().find(|(name, _)| *name == listed.broker.name) {
            Some((_, address)) => *address,
            None => {
                let address = routes.address_of(&listed.broker)?;
                resolved.push((listed.broker.name.clone(), address));
                address
            }
        };
        planned.push(Planned { listed, address });
    }
    Ok(planned)
}

/// Send one planned `ProvisionSecret` for container `id`, waiting up to
/// [`PROVISION_CALL`] (the client's own timeout may be shorter).
pub fn ask(client: &mut Client, id: &str, planned: &Planned) -> Result<(), SecretError> {
    let Planned { listed, address } = planned;
    let before = client.timeout();
    client.set_timeout(before.max(PROVISION_CALL));
    let result = client.provision_secret(
        id,
        &listed.broker.url,
        &listed.broker.certificate_sha256,
        &listed.secret.resource,
        &listed.secret.file,
        Some(&address.to_string()),
    );
    client.set_timeout(before);
    result.map_err(agent_error(planned))
}

/// How long [`ask_shared`] holds the client for each look at the answer.
const SHARED_LOOK: Duration = Duration::from_millis(10);
/// How long it lets others have the client between looks.
const SHARED_GAP: Duration = Duration::from_millis(40);

/// [`ask`] through a client other threads use too (the shim's, for a pod's
/// exec probes and output): the request is sent aside and its answer
/// looked for in short turns, so while the agent fetches the secret (the
/// exchange runs beside its other requests) their requests go through.
pub fn ask_shared(client: &std::sync::Mutex<Client>, id: &str, planned: &Planned) -> Result<(), SecretError> {
    let Planned { listed, address } = planned;
    let lock = || client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let request = parma_protocol::Request::ProvisionSecret {
        container_id: id.into(),
        broker_url: listed.broker.url.clone(),
        broker_certificate_sha256: listed.broker.certificate_sha256.clone(),
        resource: listed.secret.resource.clone(),
        file: listed.secret.file.clone(),
        broker_address: Some(address.to_string()),
    };
    let sent = lock().send_aside(&request).map_err(agent_error(planned))?;
    let give_up = std::time::Instant::now() + PROVISION_CALL;
    loop {
        let answer = {
            let mut client = lock();
            let answer = client.answer(sent, SHARED_LOOK);
            if matches!(answer, Ok(None)) && std::time::Instant::now() >= give_up {
                client.forget(sent);
                return Err(agent_error(planned)(ClientError::Timeout(PROVISION_CALL)));
            }
            answer.map_err(agent_error(planned))?
        };
        match answer {
            Some(parma_protocol::Response::Done) => return Ok(()),
            Some(other) => return Err(agent_error(planned)(crate::client::unexpected(other))),
            None => std::thread::sleep(SHARED_GAP),
        }
    }
}

fn agent_error(planned: &Planned) -> impl FnOnce(ClientError) -> SecretError + '_ {
    |source| SecretError::Agent {
        broker: planned.listed.broker.name.clone(),
        file: planned.listed.secret.file.clone(),
        source,
    }
}

/// Ask the agent for every secret `policy` lists for its entry `entry`, for
/// container `id` (created, not started): [`plan`], then [`ask`] each;
/// `done` hears of each provisioned. Returns how many.
pub fn provision(
    client: &mut Client,
    policy: &Policy,
    id: &str,
    entry: &str,
    routes: &Routes,
    done: &dyn Fn(&ListedSecret),
) -> Result<usize, SecretError> {
    let planned = plan(policy, entry, routes)?;
    for one in &planned {
        ask(client, id, one)?;
        done(&one.listed);
    }
    Ok(planned.len())
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
            ("https://[::1]:8443", "[::1]:8443"),
            ("https://[::1]", "[::1]:443"),
        ] {
            assert_eq!(routes.address_of(&broker(url)).unwrap(), expected.parse::<SocketAddr>().unwrap(), "{url}");
        }
        // A name from /etc/hosts: an IPv4 address first.
        let found = routes.address_of(&broker("https://localhost:8443")).unwrap();
        assert_eq!(found, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
        for url in [
            "http://127.0.0.1:80",
            "https://",
            "https://user@127.0.0.1:8443",
            "kbs:8080",
            "https://127.0.0.1:8443/kbs/v0",
            "https://127.0.0.1:",
            "https://127.0.0.1:99999",
        ] {
            let err = routes.address_of(&broker(url)).unwrap_err();
            assert!(matches!(err, SecretError::BadUrl { .. }), "{url}: {err}");
        }
        // (A name that does not resolve would ask the machine's DNS server: not tested here.)
    }

    #[test]
    fn routes_name_brokers_the_policy_lists_once_each() {
        let address: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let brokers = [broker("https://kbs.example")];
        let routes = |names: &[&str]| Routes {
            networked: true,
            addresses: names.iter().map(|name| (name.to_string(), address)).collect(),
        };
        routes(&["kbs"]).check(&brokers).unwrap();
        routes(&[]).check(&brokers).unwrap();
        assert!(matches!(routes(&["kbz"]).check(&brokers), Err(SecretError::UnknownRoute(name)) if name == "kbz"));
        assert!(
            matches!(routes(&["kbs", "kbs"]).check(&brokers), Err(SecretError::DuplicateRoute(name)) if name == "kbs")
        );
    }

    #[test]
    fn a_pods_annotation_gives_broker_addresses() {
        let annotations = |value: &str| {
            std::collections::BTreeMap::from([
                (BROKER_ADDRESSES_ANNOTATION.to_string(), value.to_string()),
                ("io.parma.policy".to_string(), "H4sI...".to_string()),
            ])
        };
        let found =
            addresses_from_annotations(&annotations(r#"{"trustee": "10.96.0.20:8080", "v6": "[fd00::1]:443"}"#))
                .unwrap();
        assert_eq!(
            found,
            [
                ("trustee".to_string(), "10.96.0.20:8080".parse().unwrap()),
                ("v6".to_string(), "[fd00::1]:443".parse().unwrap())
            ]
        );
        assert!(addresses_from_annotations(&std::collections::BTreeMap::new()).unwrap().is_empty());
        for (value, expected) in [
            (r#"{"": "10.0.0.1:1"}"#, "names no broker"),
            (r#"{"kbs": "kbs.svc:8080"}"#, "is not IP:PORT"),
            (r#"["10.0.0.1:1"]"#, "is not a JSON object"),
        ] {
            let err = addresses_from_annotations(&annotations(value)).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
