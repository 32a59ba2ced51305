//! The pod's network: `UpdateInterface`, `UpdateRoutes`, `AddArpNeighbors`
//! through rtnetlink (`parma_rtnl`, synchronously: handlers run on blocking
//! threads).
//!
//! A NIC the host gives the UVM appears in the agent's own network
//! namespace, which nothing else uses (the agent listens on vsock and the
//! virtio-serial port only). `UpdateInterface` finds it by its MAC address,
//! moves it into the pod's network namespace and configures it there; the
//! agent's namespace keeps only its loopback, down. Routes and neighbours
//! are added in the pod's namespace, through a socket opened there.
//!
//! Requests are parsed here before the policy decides: what the policy sees
//! is what the agent does (addresses canonical, the MAC in lowercase).

use std::net::IpAddr;

use parma_policy::input;
use parma_protocol::{ArpNeighbor, Interface, Route};
use parma_rtnl::Rtnl;
use parma_rtnl::netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE};
use parma_rtnl::netlink_packet_route::address::{AddressAttribute, AddressMessage};
use parma_rtnl::netlink_packet_route::link::{LinkAttribute, LinkFlags};
use parma_rtnl::netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use parma_rtnl::netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use parma_rtnl::netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::fault::Fault;
use crate::pod::Sandbox;

/// Most addresses one interface may get in a request.
const MAX_ADDRESSES: usize = 16;
/// Most routes or neighbours in one request.
const MAX_ENTRIES: usize = 64;
/// `IFF_NOARP`.
const NOARP: u32 = 0x80;

/// An interface request as the agent parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedInterface {
    name: String,
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
    noarp: bool,
    /// What the policy sees.
    pub input: input::UpdateInterface,
}

/// A route as the agent parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRoute {
    dest: (IpAddr, u8),
    gateway: Option<IpAddr>,
    device: String,
    source: Option<IpAddr>,
    scope: u8,
}

/// A neighbour as the agent parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedNeighbor {
    ip: IpAddr,
    device: String,
    mac: [u8; 6],
    state: u16,
    flags: u8,
}

fn invalid(message: String) -> Fault {
    Fault::invalid(message)
}

fn short(text: &str) -> &str {
    text.get(..text.floor_char_boundary(64)).unwrap_or_default()
}

/// An interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
fn check_device(name: &str) -> Result<(), Fault> {
    let valid = (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && name != "."
        && name != "..";
    if valid {
        Ok(())
    } else {
        Err(invalid(format!("interface name {:?} is not 1 to 15 of [A-Za-z0-9_.-]", short(name))))
    }
}

/// `aa:bb:cc:dd:ee:ff`, either case.
fn parse_mac(text: &str) -> Result<[u8; 6], Fault> {
    let bad = || invalid(format!("MAC address {:?} is not six hex bytes with colons", short(text)));
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An IP address, refusing IPv4-mapped IPv6 (the policy's loopback and
/// CIDR checks see every address in its own family).
fn parse_ip(text: &str) -> Result<IpAddr, Fault> {
    let ip: IpAddr = text.parse().map_err(|_| invalid(format!("{:?} is not an IP address", short(text))))?;
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(invalid(format!("{ip} is an IPv4-mapped IPv6 address: give the IPv4 address")));
    }
    Ok(ip)
}

/// `IP/PREFIX` with the prefix within the family's bits.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), Fault> {
    let (ip, prefix) = text.split_once('/').ok_or_else(|| invalid(format!("{:?} is not IP/PREFIX", short(text))))?;
    let ip = parse_ip(ip)?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid(format!("{:?}: the prefix is not a number", short(text))))?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > bits {
        return Err(invalid(format!("{ip}/{prefix}: the prefix is longer than {bits}")));
    }
    Ok((ip, prefix))
}

/// Parse an `UpdateInterface` request.
pub fn parse_interface(interface: &Interface) -> Result<ParsedInterface, Fault> {
    check_device(&interface.name)?;
    let mac = parse_mac(&interface.hw_addr)?;
    if !(68..=65535).contains(&interface.mtu) {
        return Err(invalid(format!("MTU {} is not 68 to 65535", interface.mtu)));
    }
    if interface.addresses.len() > MAX_ADDRESSES {
        return Err(invalid(format!("more than {MAX_ADDRESSES} addresses")));
    }
    let addresses = interface.addresses.iter().map(|a| parse_cidr(a)).collect::<Result<Vec<_>, _>>()?;
    let input = input::UpdateInterface {
        name: interface.name.clone(),
        hw_addr: format_mac(&mac),
        mtu: interface.mtu,
        addresses: addresses.iter().map(|(ip, prefix)| format!("{ip}/{prefix}")).collect(),
        raw_flags: interface.raw_flags,
    };
    // The policy refuses other flags; the agent sets NOARP or nothing.
    Ok(ParsedInterface {
        name: interface.name.clone(),
        mac,
        mtu: interface.mtu,
        addresses,
        noarp: interface.raw_flags == NOARP,
        input,
    })
}

/// Parse an `UpdateRoutes` request.
pub fn parse_routes(routes: &[Route]) -> Result<(Vec<ParsedRoute>, input::UpdateRoutes), Fault> {
    if routes.len() > MAX_ENTRIES {
        return Err(invalid(format!("more than {MAX_ENTRIES} routes")));
    }
    let mut parsed = Vec::with_capacity(routes.len());
    let mut inputs = Vec::with_capacity(routes.len());
    for route in routes {
        check_device(&route.device)?;
        let dest = match route.dest.as_str() {
            "default" => (IpAddr::from([0u8; 4]), 0),
            "default6" => (IpAddr::from([0u16; 8]), 0),
            cidr => parse_cidr(cidr)?,
        };
        let gateway = route.gateway.as_deref().map(parse_ip).transpose()?;
        let source = route.source.as_deref().map(parse_ip).transpose()?;
        if [gateway, source].iter().flatten().any(|ip| ip.is_ipv4() != dest.0.is_ipv4()) {
            return Err(invalid(format!("route to {}/{}: mixes IPv4 and IPv6", dest.0, dest.1)));
        }
        if ![0, 253, 254].contains(&route.scope) {
            return Err(invalid(format!("route scope {} is not 0, 253 or 254", route.scope)));
        }
        inputs.push(input::Route {
            dest: format!("{}/{}", dest.0, dest.1),
            gateway: gateway.map(|ip| ip.to_string()).unwrap_or_default(),
            device: route.device.clone(),
            source: source.map(|ip| ip.to_string()).unwrap_or_default(),
            scope: route.scope,
        });
        parsed.push(ParsedRoute { dest, gateway, device: route.device.clone(), source, scope: route.scope });
    }
    Ok((parsed, input::UpdateRoutes { routes: inputs }))
}

/// Parse an `AddArpNeighbors` request.
pub fn parse_neighbors(neighbors: &[ArpNeighbor]) -> Result<(Vec<ParsedNeighbor>, input::AddArpNeighbors), Fault> {
    if neighbors.len() > MAX_ENTRIES {
        return Err(invalid(format!("more than {MAX_ENTRIES} neighbours")));
    }
    let mut parsed = Vec::with_capacity(neighbors.len());
    let mut inputs = Vec::with_capacity(neighbors.len());
    for neighbor in neighbors {
        check_device(&neighbor.device)?;
        let ip = parse_ip(&neighbor.to_ip_address)?;
        let mac = parse_mac(&neighbor.ll_address)?;
        inputs.push(input::ArpNeighbor {
            to_ip_address: ip.to_string(),
            device: neighbor.device.clone(),
            lladdr: format_mac(&mac),
            state: neighbor.state,
            flags: neighbor.flags,
        });
        parsed.push(ParsedNeighbor {
            ip,
            device: neighbor.device.clone(),
            mac,
            state: neighbor.state,
            flags: neighbor.flags,
        });
    }
    Ok((parsed, input::AddArpNeighbors { neighbors: inputs }))
}

/// A link as a dump lists it: index, name, MAC.
/// A rtnetlink socket in the pod's network namespace.
fn in_pod(pod: &Sandbox) -> Result<Rtnl, Fault> {
    parma_sys::pod::in_network_of(pod.pidfd(), || Rtnl::open().map_err(std::io::Error::other))
        .map_err(|err| Fault::from(format!("cannot open rtnetlink in the pod: {err}")))
}

/// The index of the pod's interface `name`.
fn index_by_name(rtnl: &mut Rtnl, name: &str) -> Result<u32, Fault> {
    rtnl.index_by_name(name)
        .map_err(rtnl_fault)?
        .ok_or_else(|| Fault::not_found(format!("the pod has no interface {name:?}")))
}

fn rtnl_fault(err: parma_rtnl::Error) -> Fault {
    Fault::from(err.to_string())
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// Name, MTU and addresses (replacing those it had) of the pod's link `index`.
fn configure(inside: &mut Rtnl, index: u32, interface: &ParsedInterface) -> Result<(), Fault> {
    inside
        .set_link(index, vec![LinkAttribute::IfName(interface.name.clone()), LinkAttribute::Mtu(interface.mtu)], None)
        .map_err(rtnl_fault)?;
    // The request's addresses replace the interface's (the kernel's own
    // link-local ones stay): what the interface has is what the policy saw.
    for old in inside.addresses().map_err(rtnl_fault)? {
        if old.index != index || old.link_local || interface.addresses.contains(&(old.ip, old.prefix)) {
            continue;
        }
        let mut address = AddressMessage::default();
        address.header.family = family(&old.ip);
        address.header.prefix_len = old.prefix;
        address.header.index = index;
        address.attributes = vec![AddressAttribute::Local(old.ip), AddressAttribute::Address(old.ip)];
        match inside.request(RouteNetlinkMessage::DelAddress(address), NLM_F_ACK) {
            // Gone with a primary address deleted before it (no
            // promote_secondaries in a fresh namespace).
            Err(parma_rtnl::Error::Kernel(err))
                if matches!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::ENOENT)) => {}
            other => drop(other.map_err(rtnl_fault)?),
        }
    }
    for (ip, prefix) in &interface.addresses {
        let mut address = AddressMessage::default();
        address.header.family = family(ip);
        address.header.prefix_len = *prefix;
        address.header.index = index;
        address.attributes = vec![AddressAttribute::Local(*ip), AddressAttribute::Address(*ip)];
        inside
            .request(RouteNetlinkMessage::NewAddress(address), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(rtnl_fault)?;
    }
    Ok(())
}

/// Move the NIC with the request's MAC into the pod (if it is not there
/// yet) and configure it: down, name, MTU, addresses (replacing those it
/// had), then up.
pub fn update_interface(pod: &Sandbox, interface: &ParsedInterface) -> Result<(), Fault> {
    let mut inside = in_pod(pod)?;
    if inside.index_by_mac(&interface.mac).map_err(rtnl_fault)?.is_none() {
        let mut outside = Rtnl::open().map_err(rtnl_fault)?;
        let index = outside.index_by_mac(&interface.mac).map_err(rtnl_fault)?.ok_or_else(|| {
            Fault::not_found(format!("no network interface has MAC address {}", format_mac(&interface.mac)))
        })?;
        outside.set_link(index, vec![LinkAttribute::NetNsPid(pod.pid())], None).map_err(rtnl_fault)?;
    }
    let index = inside
        .index_by_mac(&interface.mac)
        .map_err(rtnl_fault)?
        .ok_or_else(|| Fault::from(format!("{} did not arrive in the pod", format_mac(&interface.mac))))?;
    inside.set_link(index, Vec::new(), Some((LinkFlags::empty(), LinkFlags::Up))).map_err(rtnl_fault)?;
    // Up again whatever the configuration did: a failed step (a name taken,
    // an address refused) must not leave the pod offline.
    let configured = configure(&mut inside, index, interface);
    let mut up = LinkFlags::Up;
    if interface.noarp {
        up |= LinkFlags::Noarp;
    }
    let raised = inside.set_link(index, Vec::new(), Some((up, LinkFlags::Up | LinkFlags::Noarp))).map_err(rtnl_fault);
    configured?;
    raised?;
    tracing::info!("pod interface {} ({}) is up", interface.name, format_mac(&interface.mac));
    Ok(())
}

/// Add routes in the pod, in order.
pub fn update_routes(pod: &Sandbox, routes: &[ParsedRoute]) -> Result<(), Fault> {
    let mut inside = in_pod(pod)?;
    for route in routes {
        let index = index_by_name(&mut inside, &route.device)?;
        let mut message = RouteMessage::default();
        message.header.address_family = family(&route.dest.0);
        message.header.destination_prefix_length = route.dest.1;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = route.scope.into();
        message.header.kind = RouteType::Unicast;
        let mut attributes = vec![RouteAttribute::Oif(index)];
        if route.dest.1 > 0 {
            attributes.push(RouteAttribute::Destination(RouteAddress::from(route.dest.0)));
        }
        if let Some(gateway) = route.gateway {
            attributes.push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        }
        if let Some(source) = route.source {
            attributes.push(RouteAttribute::PrefSource(RouteAddress::from(source)));
        }
        message.attributes = attributes;
        inside
            .request(RouteNetlinkMessage::NewRoute(message), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(rtnl_fault)?;
    }
    Ok(())
}

/// Add neighbour entries in the pod.
pub fn add_neighbors(pod: &Sandbox, neighbors: &[ParsedNeighbor]) -> Result<(), Fault> {
    let mut inside = in_pod(pod)?;
    for neighbor in neighbors {
        let index = index_by_name(&mut inside, &neighbor.device)?;
        let mut message = NeighbourMessage::default();
        message.header.family = family(&neighbor.ip);
        message.header.ifindex = index;
        message.header.state = neighbor.state.into();
        message.header.flags = NeighbourFlags::from_bits_retain(neighbor.flags);
        message.header.kind = RouteType::Unspec;
        let destination = match neighbor.ip {
            IpAddr::V4(ip) => NeighbourAddress::Inet(ip),
            IpAddr::V6(ip) => NeighbourAddress::Inet6(ip),
        };
        message.attributes = vec![
            NeighbourAttribute::Destination(destination),
            NeighbourAttribute::LinkLayerAddress(neighbor.mac.to_vec()),
        ];
        inside
            .request(RouteNetlinkMessage::NewNeighbour(message), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(rtnl_fault)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(name: &str, mac: &str, mtu: u32, addresses: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            hw_addr: mac.into(),
            mtu,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            raw_flags: 0,
        }
    }

    #[test]
    fn requests_are_parsed_to_what_the_policy_sees() {
        let parsed =
            parse_interface(&interface("eth0", "52:54:00:AB:cd:01", 1500, &["10.0.2.15/24", "FD00::0:15/64"])).unwrap();
        assert_eq!(parsed.input.hw_addr, "52:54:00:ab:cd:01");
        assert_eq!(parsed.input.addresses, vec!["10.0.2.15/24", "fd00::15/64"]);
        let (_, routes) = parse_routes(&[Route {
            dest: "default".into(),
            gateway: Some("10.0.2.2".into()),
            device: "eth0".into(),
            source: None,
            scope: 0,
        }])
        .unwrap();
        assert_eq!(routes.routes[0].dest, "0.0.0.0/0");
        assert_eq!(routes.routes[0].source, "");
    }

    #[test]
    fn malformed_requests_are_refused_before_the_policy() {
        for (bad, reason) in [
            (interface("", "52:54:00:00:00:01", 1500, &[]), "interface name"),
            (interface("a/b", "52:54:00:00:00:01", 1500, &[]), "interface name"),
            (interface("sixteen-bytes-xx", "52:54:00:00:00:01", 1500, &[]), "interface name"),
            (interface("eth0", "52:54:00:00:00", 1500, &[]), "six hex bytes"),
            (interface("eth0", "52:54:00:00:00:01:02", 1500, &[]), "six hex bytes"),
            (interface("eth0", "52:54:00:00:00:zz", 1500, &[]), "six hex bytes"),
            (interface("eth0", "52:54:00:00:00:01", 67, &[]), "MTU"),
            (interface("eth0", "52:54:00:00:00:01", 1500, &["10.0.2.15"]), "IP/PREFIX"),
            (interface("eth0", "52:54:00:00:00:01", 1500, &["10.0.2.15/33"]), "longer than 32"),
            (interface("eth0", "52:54:00:00:00:01", 1500, &["::ffff:127.0.0.1/128"]), "IPv4-mapped"),
            (interface("eth0", "52:54:00:00:00:01", 1500, &["host/8"]), "not an IP"),
        ] {
            let err = parse_interface(&bad).unwrap_err();
            assert!(err.message.contains(reason), "{bad:?}: {}", err.message);
        }
        let many: Vec<String> = (0..=MAX_ADDRESSES).map(|i| format!("10.0.0.{i}/32")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(parse_interface(&interface("eth0", "52:54:00:00:00:01", 1500, &refs)).is_err());
        let mixed = Route {
            dest: "default".into(),
            gateway: Some("fd00::1".into()),
            device: "eth0".into(),
            source: None,
            scope: 0,
        };
        assert!(parse_routes(&[mixed]).unwrap_err().message.contains("mixes"));
        let neighbor = ArpNeighbor {
            to_ip_address: "10.0.2.2".into(),
            device: "eth0".into(),
            ll_address: "nope".into(),
            state: 128,
            flags: 0,
        };
        assert!(parse_neighbors(&[neighbor]).is_err());
    }
}
