//! Network namespaces for the tests and benchmarks of `--netns`.

use std::net::Ipv4Addr;

use anyhow::{Context, ensure};

/// Two network namespaces joined by a veth pair, as a CNI bridge plugin
/// leaves a pod's (`eth0` at .2/24, a default route through .1) and its
/// peer (.1/24, and [`CniNamespaces::OUTSIDE_ADDRESS`]), made with `ip`
/// (the test plays the CNI plugin; `parma` reads them with rtnetlink);
/// removed when dropped.
#[derive(Debug)]
pub struct CniNamespaces {
    /// The pod's namespace's name (under /var/run/netns).
    pub pod: String,
    /// The peer's.
    pub peer: String,
}

impl CniNamespaces {
    /// The pod's address.
    pub const POD_ADDRESS: [u8; 4] = [10, 89, 0, 2];
    /// The peer's address (the pod's gateway).
    pub const PEER_ADDRESS: [u8; 4] = [10, 89, 0, 1];
    /// Another address of the peer, outside the pod's subnet: the pod
    /// reaches it only through its default route.
    pub const OUTSIDE_ADDRESS: [u8; 4] = [10, 90, 0, 1];

    /// Make the pair, named after this process and `tag`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let tag = format!("parma-{}-{tag}", std::process::id());
        let made = Self { pod: format!("{tag}-pod"), peer: format!("{tag}-peer") };
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let status = std::process::Command::new("ip").args(args).status().context("ip (iproute2)")?;
            ensure!(status.success(), "ip {args:?}: {status}");
            Ok(())
        };
        let (pod, peer) = (made.pod.as_str(), made.peer.as_str());
        ip(&["netns", "add", pod])?;
        ip(&["netns", "add", peer])?;
        ip(&["-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "veth-pod", "netns", peer])?;
        let (pod_address, peer_address) = (Ipv4Addr::from(Self::POD_ADDRESS), Ipv4Addr::from(Self::PEER_ADDRESS));
        ip(&["-n", pod, "addr", "add", &format!("{pod_address}/24"), "dev", "eth0"])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        ip(&["-n", pod, "link", "set", "lo", "up"])?;
        ip(&["-n", pod, "route", "add", "default", "via", &peer_address.to_string()])?;
        ip(&["-n", peer, "addr", "add", &format!("{peer_address}/24"), "dev", "veth-pod"])?;
        let outside = Ipv4Addr::from(Self::OUTSIDE_ADDRESS);
        ip(&["-n", peer, "addr", "add", &format!("{outside}/32"), "dev", "veth-pod"])?;
        ip(&["-n", peer, "link", "set", "veth-pod", "up"])?;
        ip(&["-n", peer, "link", "set", "lo", "up"])?;
        Ok(made)
    }

    /// The path of namespace `name`.
    pub fn path(name: &str) -> String {
        format!("/var/run/netns/{name}")
    }

    /// Run `step` on a thread in the peer's network namespace.
    pub fn in_peer<T: Send>(&self, step: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        in_namespace(&self.peer, step)
    }

    /// Run `step` on a thread in the pod's network namespace.
    pub fn in_pod<T: Send>(&self, step: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        in_namespace(&self.pod, step)
    }
}

/// Run `step` on a thread in the network namespace `name`.
fn in_namespace<T: Send>(name: &str, step: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let file = std::fs::File::open(CniNamespaces::path(name))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                step()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {name} panicked"))?
    })
}

impl Drop for CniNamespaces {
    fn drop(&mut self) {
        for name in [&self.pod, &self.peer] {
            let _ = std::process::Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}
