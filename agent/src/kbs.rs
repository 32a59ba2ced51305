//! The agent's key broker exchange for `ProvisionSecret`: `parma_kbs`'s
//! client over a vsock stream to the host (CID 2, port
//! [`parma_protocol::KBS_VSOCK_PORT`]), which relays it to the broker, with
//! reports from the agent's provider. REPORT_DATA is Trustee's binding of
//! the broker's nonce and the agent's fresh key: no host request or
//! container can make such a value (theirs are SHA-512 domains).

use std::time::Duration;

use zeroize::Zeroizing;

use crate::attest::Provider;

pub use parma_kbs::client::{Broker, check_resource};

/// How long each read and write on the relayed stream may take (and the
/// whole exchange at most `parma_kbs::client::EXCHANGE_DEADLINE`).
const IO_DEADLINE: Duration = Duration::from_secs(30);
/// The host's vsock CID.
const HOST_CID: u32 = 2;

/// The host's relay, over vsock.
struct Vsock;

impl parma_kbs::client::Dial for Vsock {
    type Stream = vsock::VsockStream;

    fn dial(&self) -> Result<Self::Stream, String> {
        let port = parma_protocol::KBS_VSOCK_PORT;
        let socket = vsock::VsockStream::connect_with_cid_port(HOST_CID, port)
            .map_err(|err| format!("no relay to the broker (vsock port {port}): {err}"))?;
        Ok(socket)
    }

    fn set_timeout(stream: &Self::Stream, limit: Duration) -> std::io::Result<()> {
        stream.set_read_timeout(Some(limit.min(IO_DEADLINE)))?;
        stream.set_write_timeout(Some(limit.min(IO_DEADLINE)))
    }
}

/// TCP over the pod's network: the socket is opened in the pod's network
/// namespace (the agent itself never joins it).
struct PodTcp<'a> {
    pod: std::os::fd::BorrowedFd<'a>,
    address: std::net::SocketAddr,
}

impl parma_kbs::client::Dial for PodTcp<'_> {
    type Stream = std::net::TcpStream;

    fn dial(&self) -> Result<Self::Stream, String> {
        let address = self.address;
        let stream = parma_sys::pod::in_network_of(self.pod, move || {
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
        })
        .map_err(|err| format!("cannot reach the broker at {address} over the pod's network: {err}"))?;
        Ok(stream)
    }

    fn set_timeout(stream: &Self::Stream, limit: Duration) -> std::io::Result<()> {
        stream.set_read_timeout(Some(limit.min(IO_DEADLINE)))?;
        stream.set_write_timeout(Some(limit.min(IO_DEADLINE)))
    }
}

/// How the agent reaches the broker.
pub enum Route<'a> {
    /// The host's relay on vsock.
    Vsock,
    /// The pod's network (the pod holder's pidfd), to this address.
    Pod(std::os::fd::BorrowedFd<'a>, std::net::SocketAddr),
}

/// Fetch `resource` from `broker` by `route`, attesting with `provider`'s reports.
pub fn fetch(
    broker: &Broker,
    route: Route<'_>,
    resource: &str,
    provider: &Provider,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let report = |report_data: &[u8; 64]| {
        provider.report(report_data).map(|report| zerocopy::IntoBytes::as_bytes(&report).to_vec())
    };
    match route {
        Route::Vsock => parma_kbs::client::fetch(&Vsock, broker, resource, &report),
        Route::Pod(pod, address) => parma_kbs::client::fetch(&PodTcp { pod, address }, broker, resource, &report),
    }
}
