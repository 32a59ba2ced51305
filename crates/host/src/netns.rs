//! A UVM's NIC on a real network (`--netns PATH`): a tap in a network
//! namespace that a CNI plugin prepared (one veth, its addresses and
//! routes), connected to that veth with tc: an `ingress` qdisc on each and
//! a filter that redirects every frame arriving on one to the other's
//! egress (Kata's default model). The guest's NIC gets the veth's MAC, and
//! the pod the veth's addresses and routes, through the policy's network
//! points. The namespace's configuration is read with rtnetlink; nothing
//! shells out to `ip` or `tc`.
//!
//! The host's stack in that namespace sees no frame of the veth any more
//! (every one goes to the UVM), so the addresses it keeps there do no harm.
//! The tap goes away with its last fd (QEMU's); [`Attached`] also removes
//! the veth's `ingress` qdisc when dropped, and attaching removes one left
//! behind (by a UVM whose CLI was killed).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use parma_protocol::{Interface, Route};
use parma_rtnl::Rtnl;
use parma_rtnl::netlink_packet_core::NLM_F_ACK;
use parma_rtnl::netlink_packet_route::RouteNetlinkMessage;
use parma_rtnl::netlink_packet_route::link::{LinkAttribute, LinkFlags};
use parma_rtnl::netlink_packet_route::tc::{TcHandle, TcMessage};

/// The tap's name in the namespace.
pub const TAP_NAME: &str = "parma-tap0";

/// A tap queue's fd, shared by the [`Attached`] that made it and the VM's
/// configuration (QEMU inherits it: [`parma_sys::tap::inherit_in_child`]).
#[derive(Debug, Clone)]
pub struct TapFd(pub Arc<OwnedFd>);

impl PartialEq for TapFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TapFd {}

/// Clear close-on-exec on the tap's fd for good, for a process that
/// becomes QEMU with `exec` (`parma vm run`): nothing else is spawned
/// before.
pub fn inherit_across_exec(tap: &TapFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(&*tap.0, FcntlArg::F_SETFD(FdFlag::empty())).map(drop).map_err(std::io::Error::from)
}

/// A namespace's veth connected to a new tap.
#[derive(Debug)]
pub struct Attached {
    /// The tap's queue, for QEMU.
    pub tap: TapFd,
    /// The veth's MAC: the guest's NIC gets it.
    pub mac: [u8; 6],
    /// The pod's interface as the namespace has it (`UpdateInterface`):
    /// the veth's name, MAC, MTU and global addresses.
    pub interface: Interface,
    /// The namespace's routes through the veth (`UpdateRoutes`), without
    /// those the kernel makes for an address's subnet.
    pub routes: Vec<Route>,
    /// The namespace itself (not its path, which may name another later).
    namespace: File,
    veth: parma_rtnl::Link,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let veth = self.veth.clone();
        let _ = in_namespace(&self.namespace, move || {
            let mut rtnl = Rtnl::open()?;
            // Still the veth it was (not a link that took its index)?
            let same = rtnl.links()?.iter().any(|link| link.index == veth.index && link.mac == veth.mac);
            if same && rtnl.ingress_qdisc(veth.index)?.as_deref() == Some("ingress") {
                delete_ingress(&mut rtnl, veth.index)?;
            }
            Ok(())
        });
    }
}

/// Run `step` on a new thread inside the network namespace `namespace`.
fn in_namespace<T: Send>(namespace: &File, step: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("netns".into()).spawn_scoped(scope, move || {
            // A thread's network namespace is its own; it ends with the step.
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("cannot enter the network namespace")?;
            step()
        })?;
        thread.join().map_err(|_| anyhow::anyhow!("the network namespace thread panicked"))?
    })
}

/// At most this many interface names in an error.
const NAMES_SHOWN: usize = 8;

/// Remove link `index`'s `ingress` qdisc (and its filters); none is fine.
fn delete_ingress(rtnl: &mut Rtnl, index: u32) -> Result<(), parma_rtnl::Error> {
    let mut message = TcMessage::default();
    message.header.index = i32::try_from(index).unwrap_or(0);
    message.header.handle = TcHandle { major: 0xffff, minor: 0 };
    message.header.parent = TcHandle::INGRESS;
    match rtnl.request(RouteNetlinkMessage::DelQueueDiscipline(message), NLM_F_ACK) {
        Ok(_) => Ok(()),
        Err(parma_rtnl::Error::Kernel(err))
            if matches!(err.raw_os_error(), Some(libc_errno::ENOENT | libc_errno::EINVAL)) =>
        {
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// Errno values the kernel answers with (std has no constants for them).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EINVAL: i32 = 22;
}

/// Connect a new tap to the one veth of the network namespace `path`
/// names, and read what the guest's NIC must become.
pub fn attach(path: &Path) -> anyhow::Result<Attached> {
    let namespace =
        File::open(path).with_context(|| format!("cannot open the network namespace {}", path.display()))?;
    let (tap, veth, interface, routes) = in_namespace(&namespace, || {
        let mut rtnl = Rtnl::open()?;
        let links = rtnl.links()?;
        let candidates: Vec<_> =
            links.iter().filter(|link| link.name != "lo" && link.name != TAP_NAME && link.mac.is_some()).collect();
        let veth = match candidates.as_slice() {
            [one] => (*one).clone(),
            [] => bail!("the network namespace has no interface but lo: nothing to connect the UVM to"),
            many => bail!(
                "the network namespace has {} interfaces ({:?}); --netns takes a namespace with one, as CNI leaves it",
                many.len(),
                many.iter().take(NAMES_SHOWN).map(|link| link.name.as_str()).collect::<Vec<_>>()
            ),
        };
        let mac: [u8; 6] = veth
            .mac
            .as_deref()
            .and_then(|mac| mac.try_into().ok())
            .with_context(|| format!("{:?} has no Ethernet address", veth.name))?;
        let tap = parma_sys::tap::open_tap(TAP_NAME)
            .with_context(|| format!("cannot create the tap {TAP_NAME} (does another UVM use this namespace?)"))?;
        let tap_index = rtnl.index_by_name(TAP_NAME)?.context("the new tap is not in the namespace")?;
        let mtu = if veth.mtu == 0 { 1500 } else { veth.mtu };
        rtnl.set_link(tap_index, vec![LinkAttribute::Mtu(mtu)], Some((LinkFlags::Up, LinkFlags::Up)))?;
        // An ingress qdisc left behind by an earlier UVM goes first (the new
        // tap exists, so no UVM attached here still runs); any other qdisc
        // there (a CNI plugin's clsact) stays, and the UVM does not attach.
        match rtnl.ingress_qdisc(veth.index)?.as_deref() {
            None => {}
            Some("ingress") => delete_ingress(&mut rtnl, veth.index)?,
            Some(other) => {
                bail!("{:?} has a {other:?} qdisc at its ingress (a CNI plugin's?): not replaced", veth.name)
            }
        }
        rtnl.add_ingress_qdisc(veth.index).context("cannot add an ingress qdisc to the veth")?;
        rtnl.add_ingress_qdisc(tap_index).context("cannot add an ingress qdisc to the tap")?;
        let redirected =
            rtnl.redirect_ingress(veth.index, tap_index).and_then(|()| rtnl.redirect_ingress(tap_index, veth.index));
        if let Err(err) = redirected {
            let _ = delete_ingress(&mut rtnl, veth.index);
            return Err(anyhow::Error::from(err).context("cannot redirect between the veth and the tap"));
        }
        let addresses = rtnl
            .addresses()?
            .into_iter()
            .filter(|address| address.index == veth.index && !address.link_local)
            .map(|address| format!("{}/{}", address.ip, address.prefix))
            .collect();
        let routes = rtnl
            .routes()?
            .into_iter()
            .filter(|route| route.oif == Some(veth.index) && route.unicast && !route.kernel)
            .filter(|route| !matches!(route.dest.0, std::net::IpAddr::V6(ip) if ip.segments()[0] == 0xfe80))
            .map(|route| Route {
                dest: if route.dest.1 == 0 && route.dest.0.is_ipv4() {
                    "default".into()
                } else {
                    format!("{}/{}", route.dest.0, route.dest.1)
                },
                gateway: route.gateway.map(|ip| ip.to_string()),
                device: veth.name.clone(),
                source: route.source.map(|ip| ip.to_string()),
                scope: route.scope,
            })
            .collect();
        let interface =
            Interface { name: veth.name.clone(), hw_addr: crate::Nic::format_mac(&mac), mtu, addresses, raw_flags: 0 };
        Ok((tap, veth, interface, routes))
    })?;
    let mac = crate::Nic::parse_mac(&interface.hw_addr).context("the veth's MAC")?;
    Ok(Attached { tap: TapFd(Arc::new(tap)), mac, interface, routes, namespace, veth })
}
