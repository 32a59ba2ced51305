//! A broker's URL as a policy lists it: `https://HOST[:PORT]`, nothing
//! after. One reading for the agent (the TLS name and the route it dials),
//! the host (the route it resolves) and the policy generator (what it
//! refuses), so a URL one of them accepts the others do not refuse.

/// A broker URL's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Its host: a DNS name or an IP address (an IPv6 one without brackets).
    pub host: String,
    /// Its port (443 when the URL gives none).
    pub port: u16,
}

impl BrokerUrl {
    /// `HOST:PORT`, an IPv6 host in brackets: what a resolver takes.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Read `https://HOST[:PORT]`.
pub fn parse(url: &str) -> Result<BrokerUrl, String> {
    let rest = url.strip_prefix("https://").ok_or("the broker URL is not https://HOST[:PORT]")?;
    let (host, port) = match rest.strip_prefix('[') {
        // An IPv6 literal: [ADDRESS] or [ADDRESS]:PORT.
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("the broker URL's [address] is not closed")?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or("the broker URL has text after its address")?)),
            }
        }
        None => match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        },
    };
    let port = match port {
        Some(port) => {
            port.parse::<u16>().ok().filter(|port| *port != 0).ok_or("the broker URL's port is not 1 to 65535")?
        }
        None => 443,
    };
    let name_ok =
        !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    if !name_ok {
        return Err("the broker URL's host is not a DNS name or an IP address".into());
    }
    Ok(BrokerUrl { host: host.to_string(), port })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_url_is_https_host_and_port_and_nothing_after() {
        let read = |url: &str| parse(url).map(|u| (u.host.clone(), u.port, u.authority()));
        assert_eq!(read("https://kbs.example:8080").unwrap(), ("kbs.example".into(), 8080, "kbs.example:8080".into()));
        assert_eq!(read("https://10.0.0.1").unwrap(), ("10.0.0.1".into(), 443, "10.0.0.1:443".into()));
        assert_eq!(read("https://[fd00::1]:8443").unwrap(), ("fd00::1".into(), 8443, "[fd00::1]:8443".into()));
        assert_eq!(read("https://[::1]").unwrap(), ("::1".into(), 443, "[::1]:443".into()));
        for bad in [
            "http://kbs:80",
            "https://",
            "https://kbs:",
            "https://kbs:0",
            "https://kbs:99999",
            "https://kbs/kbs/v0",
            "https://kbs:8080/",
            "https://user@kbs",
            "https://kbs?x=1",
            "https://[::1",
            "https://[::1]x",
            "kbs:8080",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
