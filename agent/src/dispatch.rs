//! The one dispatcher: decode, then the policy gate, then the handler.
//!
//! A handler cannot be reached without passing [`Gate::check`]: the only way
//! from a frame to a handler is [`Dispatcher::dispatch`].

use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use zerocopy::IntoBytes;

use parma_policy::Point;
use parma_protocol::{AgentError, ErrorCode, Frame, FrameKind, PingInfo, ProcessSpec, Request, Response, VERSION};

use crate::attest::{Provider, report_data_from_hex};
use crate::containers::{self, Containers};
use crate::gate::Gate;
use crate::guest;
use crate::storage::{self, Storage, check_name};

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
/// The gate (and the policy state in it) and what the agent mounted and
/// started are behind one lock, held from the decision to the end of the
/// handler, so decisions and the state they build happen in one order.
#[derive(Debug)]
pub struct Dispatcher {
    guest: Mutex<Guest>,
    attestation: Provider,
}

/// The gate and the agent's own records of the guest.
#[derive(Debug, Default)]
struct Guest {
    gate: Gate,
    storage: Storage,
    containers: Containers,
}

impl Dispatcher {
    /// A dispatcher with no policy set, getting reports from `attestation`.
    pub fn new(attestation: Provider) -> Self {
        Self { guest: Mutex::new(Guest::default()), attestation }
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
        let mut guest = self.guest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let points = match points(&request, &guest.containers) {
            Ok(points) => points,
            Err(err) => return (Response::Error(err), After::Continue),
        };
        let decisions = match guest.gate.check(&request, &points) {
            Ok(decisions) => decisions,
            Err(err) => {
                tracing::warn!(id = frame.id, "denied: {}", err.message);
                return (Response::Error(err), After::Continue);
            }
        };
        let gate = &mut guest.gate;
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
                self.set_policy(gate, &policy, host_data)
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
            Request::LoadFragment { fragment, signature, public_key } => {
                let decode = |what: &str, text: &str| {
                    BASE64.decode(text.as_bytes()).map_err(|err| malformed(format!("{what} is not base64: {err}")))
                };
                let signed = (|| {
                    Ok(parma_policy::SignedFragment {
                        payload: decode("fragment", &fragment)?,
                        signature: decode("signature", &signature)?,
                        public_key: decode("public_key", &public_key)?,
                    })
                })();
                let response = match signed.and_then(|signed| gate.load_fragment(&signed)) {
                    Ok(response) => response,
                    Err(err) => {
                        tracing::warn!(id = frame.id, "LoadFragment refused: {}", err.message);
                        Response::Error(err)
                    }
                };
                (response, After::Continue)
            }
            request => {
                let response = match act(&mut guest, request) {
                    Ok(response) => {
                        guest.gate.commit(&decisions);
                        response
                    }
                    Err(message) => {
                        tracing::warn!(id = frame.id, "failed: {message}");
                        Response::Error(AgentError::new(ErrorCode::Failed, message))
                    }
                };
                (response, After::Continue)
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

/// Carry out an allowed request that acts on the guest.
fn act(guest: &mut Guest, request: Request) -> Result<Response, String> {
    let Guest { storage, containers, .. } = guest;
    match request {
        Request::MountLayer { name, serial, root_hash, hash_offset } => {
            let device = storage.mount_layer(&name, &serial, &root_hash, hash_offset)?;
            Ok(Response::LayerMounted { target: storage::layer_target(&name), device })
        }
        Request::UnmountLayer { name } => storage.unmount_layer(&name).map(|()| Response::Done),
        Request::MountOverlay { container_id, layers, writable } => {
            let target = storage.mount_overlay(&container_id, &layers, writable)?;
            Ok(Response::OverlayMounted { target })
        }
        Request::MountScratch { serial } => {
            let scratch = storage.mount_scratch(&serial)?;
            Ok(Response::ScratchMounted { device: scratch.device.clone(), bytes: scratch.bytes })
        }
        Request::UnmountOverlay { container_id } => {
            if containers.exists(&container_id) {
                return Err(format!("container {container_id:?} still exists: delete it first"));
            }
            storage.unmount_overlay(&container_id).map(|()| Response::Done)
        }
        Request::CreateContainer { container_id, process, hostname, readonly_rootfs, resources, mounts } => {
            if !storage.has_overlay(&container_id) {
                return Err(format!("container {container_id:?} has no overlay"));
            }
            let options = containers::Options {
                hostname: hostname.as_deref(),
                readonly_rootfs,
                resources: resources.unwrap_or_default(),
                mounts: &mounts,
            };
            containers.create(&container_id, &process, &options).map(|()| Response::Done)
        }
        Request::StartContainer { container_id } => {
            containers.start(&container_id).map(|pid| Response::Started { pid })
        }
        Request::UpdateContainer { container_id, resources } => {
            containers.update(&container_id, &resources).map(|()| Response::Done)
        }
        Request::ExecProcess { container_id, exec_id, process } => {
            containers.exec(&container_id, &exec_id, &process).map(|pid| Response::Started { pid })
        }
        Request::SignalProcess { container_id, exec_id, signal } => {
            containers.signal(&container_id, exec_id.as_deref(), signal).map(|()| Response::Done)
        }
        Request::WaitProcess { container_id, exec_id } => {
            let status = containers.wait(&container_id, exec_id.as_deref())?;
            Ok(Response::ProcessStatus { running: status.running, exit_code: status.exit_code, signal: status.signal })
        }
        Request::ReadOutput { container_id, exec_id, stream } => {
            let (data, eof) = containers.read(&container_id, exec_id.as_deref(), stream)?;
            Ok(Response::Output { data: BASE64.encode(data), eof })
        }
        Request::WriteStdin { container_id, exec_id, data, close } => {
            let data = BASE64.decode(data.as_bytes()).map_err(|err| format!("stdin data is not base64: {err}"))?;
            let bytes = containers.write_stdin(&container_id, exec_id.as_deref(), &data, close)?;
            Ok(Response::Written { bytes: bytes as u64 })
        }
        Request::ResizeTerminal { container_id, exec_id, rows, cols } => {
            containers.resize_terminal(&container_id, exec_id.as_deref(), rows, cols).map(|()| Response::Done)
        }
        Request::DeleteContainer { container_id } => containers.delete(&container_id).map(|()| Response::Done),
        Request::Ping
        | Request::GuestInfo
        | Request::Shutdown
        | Request::SetPolicy { .. }
        | Request::GetAttestation { .. }
        | Request::LoadFragment { .. } => Err("internal error: request routed to the wrong handler".into()),
    }
}

fn malformed(message: String) -> AgentError {
    AgentError::new(ErrorCode::Malformed, message)
}

/// The enforcement points a request meets, with their inputs (field names
/// as hcsshim's). Names are checked here, before any decision.
fn points(request: &Request, containers: &Containers) -> Result<Vec<(Point, Value)>, AgentError> {
    let name = |what: &str, name: &str| check_name(what, name).map_err(malformed);
    Ok(match request {
        Request::Ping
        | Request::GuestInfo
        | Request::Shutdown
        | Request::SetPolicy { .. }
        | Request::GetAttestation { .. }
        | Request::LoadFragment { .. } => Vec::new(),
        Request::MountLayer { name: layer, root_hash, .. } => {
            name("layer", layer)?;
            vec![(Point::MountDevice, json!({"target": storage::layer_target(layer), "deviceHash": root_hash}))]
        }
        Request::UnmountLayer { name: layer } => {
            name("layer", layer)?;
            vec![(Point::UnmountDevice, json!({"unmountTarget": storage::layer_target(layer)}))]
        }
        Request::MountOverlay { container_id, layers, writable } => {
            name("container id", container_id)?;
            for layer in layers {
                name("layer", layer)?;
            }
            let paths: Vec<String> = layers.iter().map(|l| storage::layer_target(l)).collect();
            let mut points = vec![(
                Point::MountOverlay,
                json!({"containerID": container_id, "layerPaths": paths, "target": storage::rootfs_target(container_id)}),
            )];
            if *writable {
                // Guest memory: encrypted and integrity-protected by SEV-SNP.
                points.push((
                    Point::ScratchMount,
                    json!({"target": storage::scratch_target(container_id), "encrypted": true}),
                ));
            }
            points
        }
        Request::MountScratch { .. } => {
            // Authenticated dm-crypt over dm-integrity: encrypted.
            vec![(Point::ScratchMount, json!({"target": "swap", "encrypted": true}))]
        }
        Request::UnmountOverlay { container_id } => {
            name("container id", container_id)?;
            vec![(Point::UnmountOverlay, json!({"unmountTarget": storage::rootfs_target(container_id)}))]
        }
        Request::CreateContainer { container_id, process, mounts, .. } => {
            name("container id", container_id)?;
            let mut input = process_input(container_id, process);
            if let Value::Object(fields) = &mut input {
                fields.insert("user".into(), json!({"uid": process.uid, "gid": process.gid}));
                fields.insert("groups".into(), json!(process.groups));
                fields.insert("capabilities".into(), json!(process.capabilities));
                fields.insert("noNewPrivileges".into(), json!(process.no_new_privileges));
                fields.insert("privileged".into(), json!(false));
                let seccomp =
                    process.seccomp.as_deref().map_or_else(String::new, |p| parma_policy::policy_hash(p.as_bytes()));
                fields.insert("seccompProfileSHA256".into(), json!(seccomp));
                fields.insert("mounts".into(), json!(mounts));
            }
            vec![(Point::CreateContainer, input)]
        }
        Request::ExecProcess { container_id, exec_id, process } => {
            name("container id", container_id)?;
            name("exec id", exec_id)?;
            vec![(Point::ExecInContainer, process_input(container_id, process))]
        }
        Request::SignalProcess { container_id, exec_id, signal } => {
            name("container id", container_id)?;
            if let Some(exec_id) = exec_id {
                name("exec id", exec_id)?;
            }
            let command = containers.command(container_id, exec_id.as_deref()).unwrap_or_default();
            vec![(
                Point::SignalContainerProcess,
                json!({"containerID": container_id, "signal": signal, "isInitProcess": exec_id.is_none(), "argList": command}),
            )]
        }
        Request::DeleteContainer { container_id } => {
            name("container id", container_id)?;
            vec![(Point::ShutdownContainer, json!({"containerID": container_id}))]
        }
        Request::StartContainer { container_id }
        | Request::UpdateContainer { container_id, .. }
        | Request::WaitProcess { container_id, .. }
        | Request::ReadOutput { container_id, .. }
        | Request::WriteStdin { container_id, .. }
        | Request::ResizeTerminal { container_id, .. } => {
            name("container id", container_id)?;
            Vec::new()
        }
    })
}

fn process_input(container_id: &str, process: &ProcessSpec) -> Value {
    json!({
        "containerID": container_id,
        "argList": process.args,
        "envList": process.env,
        "workingDir": process.cwd,
    })
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
