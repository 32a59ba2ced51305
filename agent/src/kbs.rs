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

/// How long each read and write on the relayed stream may take.
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
        socket.set_read_timeout(Some(IO_DEADLINE)).map_err(|err| err.to_string())?;
        socket.set_write_timeout(Some(IO_DEADLINE)).map_err(|err| err.to_string())?;
        Ok(socket)
    }
}

/// Fetch `resource` from `broker`, attesting with `provider`'s reports.
pub fn fetch(broker: &Broker, resource: &str, provider: &Provider) -> Result<Zeroizing<Vec<u8>>, String> {
    let report = |report_data: &[u8; 64]| {
        provider.report(report_data).map(|report| zerocopy::IntoBytes::as_bytes(&report).to_vec())
    };
    parma_kbs::client::fetch(&Vsock, broker, resource, &report)
}
