//! The one dispatcher: decode, then the policy gate, then the handler.
//!
//! A handler cannot be reached without passing [`Gate::check`]: the only way
//! from a frame to a handler is [`Dispatcher::dispatch`].

use std::sync::Mutex;

use zerocopy::IntoBytes;

use parma_protocol::{AgentError, ErrorCode, Frame, FrameKind, PingInfo, Request, Response, VERSION};

use crate::attest::{Provider, report_data_from_hex};
use crate::gate::Gate;
use crate::guest;

/// What to do after the response is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// The host asked for a shutdown: exit once the response is out.
    Shutdown,
}

/// The dispatcher shared by every transport.
///
/// The gate (and the policy state in it) is behind one lock, held from the
/// decision to the end of the handler, so decisions and the state they
/// build happen in one order.
#[derive(Debug)]
pub struct Dispatcher {
    gate: Mutex<Gate>,
    attestation: Provider,
}

impl Dispatcher {
    /// A dispatcher with no policy set, getting reports from `attestation`.
    pub fn new(attestation: Provider) -> Self {
        Self { gate: Mutex::new(Gate::new()), attestation }
    }

    /// Handle one frame from the host.
    pub async fn dispatch(&self, frame: &Frame) -> (Response, After) {
        if frame.kind != FrameKind::Request {
            let err = AgentError::new(ErrorCode::UnknownKind, "the agent accepts request frames only");
            return (Response::Error(err), After::Continue);
        }
        let request = match Request::decode(&frame.body) {
            Ok(request) => request,
            Err(err) => return (Response::Error(err.into()), After::Continue),
        };
        // A handler that panicked while holding the lock left the gate as it
        // was before its decision; keep serving with it.
        let mut gate = self.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = gate.check(&request) {
            tracing::warn!(id = frame.id, "denied: {}", err.message);
            return (Response::Error(err), After::Continue);
        }
        match request {
            Request::Ping => (Response::Pong(ping()), After::Continue),
            Request::GuestInfo => match guest::info() {
                Ok(info) => (Response::GuestInfo(info), After::Continue),
                Err(err) => (Response::Error(AgentError::new(ErrorCode::Failed, err)), After::Continue),
            },
            Request::Shutdown => (Response::ShuttingDown, After::Shutdown),
            Request::SetPolicy { policy } => {
                // A fresh report, binding the policy's hash, gives HOST_DATA.
                let host_data = |hash: &[u8; 32]| {
                    let mut report_data = [0u8; 64];
                    report_data.iter_mut().zip(hash).for_each(|(d, s)| *d = *s);
                    self.attestation.report(&report_data).map(|report| report.host_data)
                };
                self.set_policy(&mut gate, &policy, host_data)
            }
            Request::GetAttestation { report_data } => {
                let report = report_data_from_hex(&report_data).and_then(|data| self.attestation.report(&data));
                match report {
                    Ok(report) => (
                        Response::Attestation {
                            report: hex::encode(report.as_bytes()),
                            provider: self.attestation.name().to_string(),
                        },
                        After::Continue,
                    ),
                    Err(err) => (Response::Error(AgentError::new(ErrorCode::Failed, err)), After::Continue),
                }
            }
        }
    }

    fn set_policy(
        &self,
        gate: &mut Gate,
        policy: &str,
        host_data: impl FnOnce(&[u8; 32]) -> Result<[u8; 32], String>,
    ) -> (Response, After) {
        match gate.set_policy(policy, host_data) {
            Ok(sha256) => {
                tracing::info!("policy {sha256} is in force");
                (Response::PolicySet { sha256 }, After::Continue)
            }
            Err(err) => {
                tracing::warn!("SetPolicy refused: {}", err.message);
                (Response::Error(err), After::Continue)
            }
        }
    }
}

fn ping() -> PingInfo {
    PingInfo {
        protocol_version: VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: guest::kernel_release(),
        uptime_ms: guest::uptime_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parma_protocol::frame::FrameKind;

    fn frame(body: &[u8]) -> Frame {
        Frame { kind: FrameKind::Request, id: 1, body: body.to_vec() }
    }

    #[tokio::test]
    async fn ping_answers_with_versions() {
        let (response, after) =
            Dispatcher::new(Provider::Emulated { host_data: [0; 32] }).dispatch(&frame(br#"{"type":"Ping"}"#)).await;
        let Response::Pong(info) = response else { panic!("{response:?}") };
        assert_eq!(info.protocol_version, VERSION);
        assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(!info.kernel_release.is_empty());
        assert_eq!(after, After::Continue);
    }

    #[tokio::test]
    async fn shutdown_is_answered_then_acted_on() {
        let (response, after) = Dispatcher::new(Provider::Emulated { host_data: [0; 32] })
            .dispatch(&frame(br#"{"type":"Shutdown"}"#))
            .await;
        assert_eq!(response, Response::ShuttingDown);
        assert_eq!(after, After::Shutdown);
    }

    #[tokio::test]
    async fn bad_bodies_get_typed_errors() {
        let cases: [(&[u8], ErrorCode); 3] = [
            (b"{", ErrorCode::Malformed),
            (br#"{"type":"RunAsRoot"}"#, ErrorCode::UnknownType),
            (br#"{"type":"Ping","as":"root"}"#, ErrorCode::Malformed),
        ];
        for (body, code) in cases {
            let (response, after) =
                Dispatcher::new(Provider::Emulated { host_data: [0; 32] }).dispatch(&frame(body)).await;
            let Response::Error(err) = response else { panic!("{response:?}") };
            assert_eq!(err.code, code);
            assert_eq!(after, After::Continue);
        }
    }

    #[tokio::test]
    async fn response_frames_are_refused() {
        let mut frame = frame(br#"{"type":"Ping"}"#);
        frame.kind = FrameKind::Response;
        let (response, _) = Dispatcher::new(Provider::Emulated { host_data: [0; 32] }).dispatch(&frame).await;
        assert!(matches!(response, Response::Error(AgentError { code: ErrorCode::UnknownKind, .. })));
    }
}
