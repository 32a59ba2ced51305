//! A synchronous rtnetlink socket (`netlink-packet-route` messages on a
//! `netlink-sys` socket), shared by the agent, which configures the pod's
//! network in the guest, and the host CLI, which reads a network
//! namespace's configuration and connects a tap to it.
//!
//! A socket belongs to the network namespace of the thread that opened it,
//! whichever thread uses it later. Every answer is awaited
//! [`RECEIVE_TIMEOUT`] at most.

use std::net::IpAddr;
use std::os::fd::AsFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector,
    TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use netlink_packet_core;
pub use netlink_packet_route;

/// The largest netlink answer read at once.
const RECEIVE: usize = 64 * 1024;
/// How long one rtnetlink answer may take (the kernel answers at once).
pub const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// `ETH_P_ALL` in network byte order, as a filter's protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket itself.
    #[error("rtnetlink {what}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel refused the request.
    #[error("rtnetlink: {0}")]
    Kernel(std::io::Error),
    /// An answer that does not parse.
    #[error("rtnetlink answer: {0}")]
    Answer(String),
}

/// A link: its index, name, MAC (none for some kinds), MTU and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its hardware address, if it has one.
    pub mac: Option<Vec<u8>>,
    /// Its MTU (0 when not reported).
    pub mtu: u32,
    /// `IFF_*` flags.
    pub flags: LinkFlags,
}

/// An address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The interface index.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Whether it is link-local or narrower (not global).
    pub link_local: bool,
}

/// A route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The destination and prefix length (`0.0.0.0/0`, `::/0`: default).
    pub dest: (IpAddr, u8),
    /// The gateway, if any.
    pub gateway: Option<IpAddr>,
    /// The output interface index.
    pub oif: Option<u32>,
    /// The preferred source, if any.
    pub source: Option<IpAddr>,
    /// The route's scope (`RT_SCOPE_*`).
    pub scope: u8,
    /// Whether the kernel made it (an address's subnet; the guest's kernel
    /// makes its own).
    pub kernel: bool,
    /// Whether it is a unicast route.
    pub unicast: bool,
}

/// A rtnetlink socket.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

fn socket_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Socket { what, source }
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_error("socket"))?;
        socket.bind_auto().map_err(socket_error("bind"))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(socket_error("connect"))?;
        let timeout = nix::sys::time::TimeVal::new(RECEIVE_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|errno| Error::Socket { what: "timeout", source: errno.into() })?;
        Ok(Self { socket, sequence: 0 })
    }

    /// Send one request and collect the answers until its ack or the end
    /// of a dump; an error answer becomes [`Error::Kernel`] with the
    /// kernel's errno.
    pub fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(socket_error("send"))?;
        let mut answers = Vec::new();
        let mut buffer = Vec::with_capacity(RECEIVE);
        loop {
            buffer.clear();
            let n = self.socket.recv(&mut buffer, 0).map_err(socket_error("receive"))?;
            let mut offset = 0;
            while offset < n {
                let bytes = buffer.get(offset..n).unwrap_or_default();
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|err| Error::Answer(err.to_string()))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    return Err(Error::Answer("length 0".into()));
                }
                offset = offset.saturating_add(length.next_multiple_of(4));
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::Error(error) => match error.code {
                        None => return Ok(answers),
                        Some(_) => return Err(Error::Kernel(error.to_io())),
                    },
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => {
                    let mut found = Link {
                        index: link.header.index,
                        name: String::new(),
                        mac: None,
                        mtu: 0,
                        flags: link.header.flags,
                    };
                    for attribute in link.attributes {
                        match attribute {
                            LinkAttribute::IfName(name) => found.name = name,
                            LinkAttribute::Address(mac) => found.mac = Some(mac),
                            LinkAttribute::Mtu(mtu) => found.mtu = mtu,
                            _ => {}
                        }
                    }
                    Some(found)
                }
                _ => None,
            })
            .collect())
    }

    /// The index of the link with hardware address `mac`, if any.
    pub fn index_by_mac(&mut self, mac: &[u8; 6]) -> Result<Option<u32>, Error> {
        Ok(self.links()?.into_iter().find(|link| link.mac.as_deref() == Some(mac.as_slice())).map(|link| link.index))
    }

    /// The index of the link named `name`, if any.
    pub fn index_by_name(&mut self, name: &str) -> Result<Option<u32>, Error> {
        Ok(self.links()?.into_iter().find(|link| link.name == name).map(|link| link.index))
    }

    /// Set attributes of link `index`, and with `flags` (set, mask) its flags.
    pub fn set_link(
        &mut self,
        index: u32,
        attributes: Vec<LinkAttribute>,
        flags: Option<(LinkFlags, LinkFlags)>,
    ) -> Result<(), Error> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        if let Some((set, mask)) = flags {
            link.header.flags = set;
            link.header.change_mask = mask;
        }
        link.attributes = attributes;
        self.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK).map(drop)
    }

    /// Every address of every interface.
    pub fn addresses(&mut self) -> Result<Vec<Address>, Error> {
        let answers = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(address) => {
                    // IFA_LOCAL is the interface's own address where it
                    // differs from IFA_ADDRESS (point-to-point); else the same.
                    let ip = address
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            AddressAttribute::Local(ip) => Some(*ip),
                            _ => None,
                        })
                        .or_else(|| {
                            address.attributes.iter().find_map(|a| match a {
                                AddressAttribute::Address(ip) => Some(*ip),
                                _ => None,
                            })
                        })?;
                    Some(Address {
                        index: address.header.index,
                        ip,
                        prefix: address.header.prefix_len,
                        link_local: address.header.scope != AddressScope::Universe,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Every route of the main table, IPv4 and IPv6.
    pub fn routes(&mut self) -> Result<Vec<Route>, Error> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = RouteMessage::default();
            message.header.address_family = family;
            for answer in self.request(RouteNetlinkMessage::GetRoute(message), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRoute(route) = answer else { continue };
                if route.header.table != RouteHeader::RT_TABLE_MAIN {
                    continue;
                }
                let unspecified: IpAddr = match family {
                    AddressFamily::Inet6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
                    _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
                };
                let mut found = Route {
                    dest: (unspecified, route.header.destination_prefix_length),
                    gateway: None,
                    oif: None,
                    source: None,
                    scope: route.header.scope.into(),
                    kernel: route.header.protocol == RouteProtocol::Kernel,
                    unicast: route.header.kind == RouteType::Unicast,
                };
                for attribute in route.attributes {
                    match attribute {
                        RouteAttribute::Destination(address) => {
                            if let Some(ip) = route_ip(address) {
                                found.dest.0 = ip;
                            }
                        }
                        RouteAttribute::Gateway(address) => found.gateway = route_ip(address),
                        RouteAttribute::PrefSource(address) => found.source = route_ip(address),
                        RouteAttribute::Oif(index) => found.oif = Some(index),
                        _ => {}
                    }
                }
                routes.push(found);
            }
        }
        Ok(routes)
    }

    /// The kind (`ingress`, `clsact`) of link `index`'s qdisc at the ingress
    /// parent, if it has one.
    pub fn ingress_qdisc(&mut self, index: u32) -> Result<Option<String>, Error> {
        let answers = self.request(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), NLM_F_DUMP)?;
        Ok(answers.into_iter().find_map(|answer| match answer {
            RouteNetlinkMessage::NewQueueDiscipline(qdisc)
                if qdisc.header.index == index_i32(index).ok()? && qdisc.header.parent == TcHandle::INGRESS =>
            {
                qdisc.attributes.into_iter().find_map(|attribute| match attribute {
                    TcAttribute::Kind(kind) => Some(kind),
                    _ => None,
                })
            }
            _ => None,
        }))
    }

    /// Add an `ingress` qdisc to link `index` (handle `ffff:`).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        let mut message = TcMessage::default();
        message.header.index = index_i32(index)?;
        message.header.handle = TcHandle { major: 0xffff, minor: 0 };
        message.header.parent = TcHandle::INGRESS;
        message.attributes = vec![TcAttribute::Kind("ingress".into())];
        self.request(RouteNetlinkMessage::NewQueueDiscipline(message), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Redirect every frame that arrives on link `from` (its ingress qdisc)
    /// to the egress of link `to`: a `u32` filter that matches all, with a
    /// `mirred` egress redirect (`tc filter add dev FROM parent ffff:
    /// protocol all u32 match u8 0 0 action mirred egress redirect dev TO`).
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<(), Error> {
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
        ];
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut message = TcMessage::default();
        message.header.index = index_i32(from)?;
        message.header.parent = TcHandle { major: 0xffff, minor: 0 };
        // tcm_info: the priority (high 16 bits) and the protocol.
        message.header.info = (1u32 << 16) | u32::from(ETH_P_ALL_BE);
        message.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.request(RouteNetlinkMessage::NewTrafficFilter(message), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }
}

fn index_i32(index: u32) -> Result<i32, Error> {
    i32::try_from(index).map_err(|_| Error::Answer(format!("interface index {index} out of range")))
}

fn route_ip(address: RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(ip.into()),
        RouteAddress::Inet6(ip) => Some(ip.into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every network namespace has `lo`, with 127.0.0.1/8 when it is up
    /// (this process's is the host's: it is).
    #[test]
    fn the_loopback_interface_is_listed_with_its_address() {
        let mut rtnl = Rtnl::open().unwrap();
        let links = rtnl.links().unwrap();
        let lo = links.iter().find(|link| link.name == "lo").unwrap();
        assert_eq!(rtnl.index_by_name("lo").unwrap(), Some(lo.index));
        assert!(lo.mtu > 0);
        let addresses = rtnl.addresses().unwrap();
        let loopback: IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
        assert!(
            addresses.iter().any(|a| a.index == lo.index && a.ip == loopback && a.prefix == 8 && a.link_local),
            "{addresses:?}"
        );
    }

    #[test]
    fn kernel_refusals_carry_the_errno() {
        let mut rtnl = Rtnl::open().unwrap();
        let err = rtnl.set_link(u32::MAX >> 1, Vec::new(), Some((LinkFlags::Up, LinkFlags::Up))).unwrap_err();
        assert!(matches!(&err, Error::Kernel(io) if io.raw_os_error() == Some(19)), "{err}");
    }
}
