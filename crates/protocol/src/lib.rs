//! The wire protocol between the host and the Parma guest agent.
//!
//! It exists as its own crate because three parties must agree on it byte for
//! byte: the agent in the guest, the host CLI, and the tests. It must not
//! depend on anything guest- or host-specific (no tokio, no QEMU): it is pure
//! data and a decoder that is safe on hostile input.
//!
//! The same bytes flow over vsock (real hosts) and a virtio-serial port
//! (emulation and tests): see [`frame`] for the layout.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod boot;
pub mod frame;
pub mod message;

pub use frame::{Decoder, Frame, FrameError, FrameKind, MAX_BODY, VERSION, encode};
pub use message::{
    AgentError, ArpNeighbor, CapabilitySets, ContainerStats, DecodeError, ErrorCode, GuestInfo, Interface, Mount,
    MountInfo, Namespace, OutputStream, PingInfo, ProcessSpec, Request, RequestKind, Resources, Response, Rlimit,
    Route,
};

/// The virtio-serial port name the agent listens on (`-device virtserialport,name=...`).
pub const SERIAL_PORT_NAME: &str = "org.parma.agent";
/// The vsock port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;
/// The vsock port on the host (CID 2) the agent connects to for a key
/// broker: the host relays the stream to the broker's address.
pub const KBS_VSOCK_PORT: u32 = 1025;
/// Most `ProvisionSecret` exchanges that run aside at once in the agent
/// (all connections together; one outlives its connection): the agent
/// answers them when they end, after answers to later requests; one more
/// is answered `busy`.
pub const MAX_ASIDE: usize = 4;

/// Encode a request frame; a body over the frame limit (a host file or a
/// process too large to send) is refused.
pub fn try_encode_request(id: u32, request: &Request) -> Result<Vec<u8>, frame::BodyTooLarge> {
    encode(FrameKind::Request, id, &request.encode())
}

/// Encode a request frame; empty when the body is over the frame limit
/// (use [`try_encode_request`] to learn why).
pub fn encode_request(id: u32, request: &Request) -> Vec<u8> {
    try_encode_request(id, request).unwrap_or_default()
}

/// Encode a response frame. A response body over the limit (which the agent
/// never builds) is replaced by an error saying so.
pub fn encode_response(id: u32, response: &Response) -> Vec<u8> {
    encode(FrameKind::Response, id, &response.encode()).unwrap_or_else(|err| {
        let error = Response::Error(AgentError::new(ErrorCode::Failed, err.to_string()));
        encode(FrameKind::Response, id, &error.encode()).unwrap_or_default()
    })
}

impl From<&FrameError> for AgentError {
    fn from(err: &FrameError) -> Self {
        let code = match err {
            FrameError::BadMagic { .. } => ErrorCode::BadMagic,
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::UnknownKind { .. } => ErrorCode::UnknownKind,
            FrameError::Oversize { .. } => ErrorCode::Oversize,
        };
        AgentError::new(code, err.to_string())
    }
}

#[cfg(test)]
mod encode_tests {
    use super::*;

    #[test]
    fn a_request_over_the_frame_limit_is_refused_not_sent_empty() {
        let big = Request::CopyFile { path: "pod/hosts".into(), data: "A".repeat(MAX_BODY as usize), mode: 0o644 };
        assert!(try_encode_request(1, &big).is_err());
        assert!(encode_request(1, &big).is_empty());
        let small = Request::CopyFile { path: "pod/hosts".into(), data: "QUFB".into(), mode: 0o644 };
        assert!(!try_encode_request(1, &small).unwrap().is_empty());
    }
}
