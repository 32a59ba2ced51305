//! The one dispatcher: decode, then the policy gate, then the handler.
//!
//! A handler cannot be reached without passing [`Gate::check`]: the only way
//! from a request to a handler is [`Dispatcher::begin`] (a request it
//! leaves [`Handled::Aside`] was decided and begun there). `Ping` and
//! `Shutdown` are answered by [`immediate`] without the guest's lock, so a
//! handler stuck on a disk the host stalls cannot keep the host from
//! powering the UVM off.

use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use zerocopy::IntoBytes;

use parma_policy::Decision;
use parma_policy::input::{self, Input};
use parma_protocol::{AgentError, ErrorCode, Frame, FrameKind, PingInfo, ProcessSpec, Request, Response, VERSION};

use crate::attest::{Provider, report_data_from_hex};
use crate::containers::{self, Containers};
use crate::endpoint::{self, Answer, Caller, Endpoints};
use crate::fault::Fault;
use crate::files;
use crate::gate::Gate;
use crate::guest;
use crate::network;
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
/// handler, so decisions and the state they build happen in one order. The
/// one exception is `ProvisionSecret`'s key broker exchange, which runs
/// without it ([`Handled::Aside`]) between a start under the lock (the
/// container marked) and an end under it (the secret written, into that
/// container only).
#[derive(Debug)]
pub struct Dispatcher {
    guest: Mutex<Guest>,
    attestation: Provider,
    /// Requests whose rest runs aside, in the whole agent (they outlive
    /// their connection): at most `parma_protocol::MAX_ASIDE`.
    aside: Arc<tokio::sync::Semaphore>,
}

/// The gate and the agent's own records of the guest.
#[derive(Debug, Default)]
struct Guest {
    gate: Gate,
    storage: Storage,
    containers: Containers,
    /// The containers' attestation endpoints.
    endpoints: Endpoints,
}

/// Decode a frame into a request, or the error to answer with.
pub fn decode(frame: &Frame) -> Result<Request, Response> {
    if frame.kind != FrameKind::Request {
        return Err(Response::Error(AgentError::new(ErrorCode::UnknownKind, "the agent accepts request frames only")));
    }
    Request::decode(&frame.body).map_err(|err| Response::Error(err.into()))
}

/// The answer to a request that needs neither the guest's records nor the
/// policy (`Ping`, `Shutdown`: allowed in every state, lockdown included),
/// given at once; `None` for every other request.
pub fn immediate(request: &Request) -> Option<(Response, After)> {
    match request {
        Request::Ping => Some((Response::Pong(ping()), After::Continue)),
        Request::Shutdown => Some((Response::ShuttingDown, After::Shutdown)),
        _ => None,
    }
}

impl Dispatcher {
    /// A dispatcher with no policy set, getting reports from `attestation`
    /// (it serves no endpoints).
    #[cfg(test)]
    pub fn new(attestation: Provider) -> Self {
        Self {
            guest: Mutex::new(Guest { gate: Gate::new(), ..Guest::default() }),
            attestation,
            aside: Arc::new(tokio::sync::Semaphore::new(parma_protocol::MAX_ASIDE)),
        }
    }

    /// A dispatcher that serves the containers' attestation endpoints on
    /// the current runtime.
    pub fn serving(attestation: Provider) -> Arc<Self> {
        let handle = tokio::runtime::Handle::current();
        Arc::new_cyclic(|weak| {
            let endpoints = Endpoints::serving(handle, weak.clone());
            Self {
                guest: Mutex::new(Guest { gate: Gate::new(), endpoints, ..Guest::default() }),
                attestation,
                aside: Arc::new(tokio::sync::Semaphore::new(parma_protocol::MAX_ASIDE)),
            }
        })
    }

    /// A report for a container that asked through its endpoint: decided at
    /// `container_attestation` with the container the agent's records name
    /// (`caller`, whose endpoint is still open), for a caller in that
    /// container's cgroup (`peer_cgroup`), binding `data` with the
    /// container's policy name in the container domain.
    pub fn container_report(
        &self,
        caller: &Caller,
        peer_cgroup: Option<String>,
        data: &[u8; 64],
    ) -> Result<endpoint::Report, Answer> {
        let denied = |message: &str| Answer::error(403, &ErrorCode::PolicyDenied.to_string(), message);
        {
            let mut guest = self.lock();
            if !guest.endpoints.current(caller) {
                return Err(denied("the endpoint's container is gone"));
            }
            let expected = guest.containers.cgroup_path(&caller.id);
            match (&peer_cgroup, &expected) {
                (Some(peer), Some(own)) if peer == own || peer.starts_with(&format!("{own}/")) => {}
                _ => {
                    return Err(denied(&format!(
                        "the caller is not a process of container {:?} (its cgroup: {})",
                        caller.id,
                        peer_cgroup.as_deref().unwrap_or("unknown")
                    )));
                }
            }
            let input = Input::ContainerAttestation(input::ContainerAttestation {
                container_id: caller.id.clone(),
                report_data: hex::encode(data),
            });
            if let Err(err) = guest.gate.decide_alone(&input) {
                return Err(denied(&err.message));
            }
        }
        // Signed outside the lock: a container asking over and over holds
        // up no host request while the firmware works.
        let report_data = parma_snp::report_data::Domain::Container(&caller.name).report_data(data);
        let report = self
            .attestation
            .report(&report_data)
            .map_err(|err| Answer::error(500, &ErrorCode::Failed.to_string(), &err))?;
        Ok(endpoint::Report {
            report: hex::encode(report.as_bytes()),
            report_data: hex::encode(report_data),
            container: caller.name.clone(),
            data: hex::encode(data),
            provider: self.attestation.name().to_string(),
        })
    }

    /// The guest's records, locked. A poisoned lock means a handler panicked
    /// halfway through a change: the records may not match the guest any
    /// more, so the agent stops (init powers the UVM off) rather than serve
    /// on them. (The guest build aborts on a panic, so this is a last line.)
    fn lock(&self) -> MutexGuard<'_, Guest> {
        match self.guest.lock() {
            Ok(guest) => guest,
            Err(_) => crate::fail_closed("the agent's records are poisoned by a panic"),
        }
    }

    /// Handle one frame from the host (decode, then [`Dispatcher::handle`]).
    #[cfg(test)]
    pub fn dispatch(&self, frame: &Frame) -> (Response, After) {
        match decode(frame) {
            Ok(request) => immediate(&request).unwrap_or_else(|| self.handle(frame.id, request)),
            Err(response) => (response, After::Continue),
        }
    }

    /// Decide and carry out one request, the part left aside included. May
    /// block (a disk the host stalls): transports run it off their event loop.
    #[cfg(test)]
    pub fn handle(&self, id: u32, request: Request) -> (Response, After) {
        match self.begin(id, request) {
            Handled::Now(response, after) => (response, after),
            Handled::Aside(rest) => (rest(self), After::Continue),
        }
    }

    /// Decide one request and carry it out, but for what it may leave to run
    /// beside the connection's later requests ([`Handled::Aside`]). May block.
    pub fn begin(&self, id: u32, request: Request) -> Handled {
        if let Some((response, after)) = immediate(&request) {
            return Handled::Now(response, after);
        }
        let mut guest = self.lock();
        let points = match points(&request, &mut guest.containers) {
            Ok(points) => points,
            Err(err) => return Handled::Now(Response::Error(err), After::Continue),
        };
        let decisions = match guest.gate.check(&request, &points) {
            Ok(decisions) => decisions,
            Err(err) => {
                tracing::warn!(id, "denied: {}", err.message);
                return Handled::Now(Response::Error(err), After::Continue);
            }
        };
        let gate = &mut guest.gate;
        let response = match request {
            Request::Ping | Request::Shutdown => Response::Error(AgentError::new(
                ErrorCode::Failed,
                "internal error: request routed to the wrong handler",
            )),
            Request::GuestInfo => match guest::info() {
                Ok(info) => Response::GuestInfo(info),
                Err(err) => Response::Error(AgentError::new(ErrorCode::Failed, err)),
            },
            Request::SetPolicy { policy } => {
                // HOST_DATA, from a fresh report binding the policy's hash on SNP.
                let host_data = |hash: &[u8; 32]| {
                    let mut report_data = [0u8; 64];
                    report_data.iter_mut().zip(hash).for_each(|(d, s)| *d = *s);
                    self.attestation.host_data(&report_data)
                };
                match gate.set_policy(&policy, host_data) {
                    Ok(sha256) => {
                        tracing::info!("policy {sha256} is in force");
                        crate::log::apply_policy(gate.runtime_logging_allowed());
                        Response::PolicySet { sha256 }
                    }
                    Err(err) => {
                        tracing::warn!("SetPolicy refused: {}", err.message);
                        Response::Error(err)
                    }
                }
            }
            Request::GetAttestation { report_data } => {
                // The host's data, in the host's domain: never REPORT_DATA as the host chose it.
                let report = report_data_from_hex(&report_data)
                    .and_then(|data| self.attestation.report(&parma_snp::report_data::Domain::Host.report_data(&data)));
                match report {
                    Ok(report) => Response::Attestation {
                        report: hex::encode(report.as_bytes()),
                        provider: self.attestation.name().to_string(),
                    },
                    Err(err) => Response::Error(AgentError::new(ErrorCode::Failed, err)),
                }
            }
            Request::ProvisionSecret {
                container_id,
                broker_url,
                broker_certificate_sha256,
                resource,
                file,
                broker_address,
            } => {
                let asked =
                    Secret { container_id, broker_url, broker_certificate_sha256, resource, file, broker_address };
                return self.provision_secret(guest, id, asked);
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
                match signed.and_then(|signed| gate.load_fragment(&signed)) {
                    Ok(response) => response,
                    Err(err) => {
                        tracing::warn!(id, "LoadFragment refused: {}", err.message);
                        Response::Error(err)
                    }
                }
            }
            request => match act(&mut guest, request, &decisions) {
                Ok(response) => {
                    guest.gate.commit(&decisions);
                    response
                }
                Err(Failure::Denied(message)) => {
                    tracing::warn!(id, "denied: {message}");
                    Response::Error(AgentError::new(ErrorCode::PolicyDenied, message))
                }
                Err(Failure::Failed(fault)) => {
                    tracing::warn!(id, "failed ({}): {}", fault.code, fault.message);
                    Response::Error(fault.into())
                }
                Err(Failure::Partly(message)) => {
                    // The guest changed (a layer is unmounted, its device
                    // lingers): the policy's records follow what is mounted.
                    guest.gate.commit(&decisions);
                    tracing::warn!(id, "failed halfway: {message}");
                    Response::Error(AgentError::new(ErrorCode::Failed, message))
                }
            },
        };
        Handled::Now(response, After::Continue)
    }
}

/// What [`Dispatcher::begin`] left of a request.
pub enum Handled {
    /// Answered.
    Now(Response, After),
    /// Allowed and begun under the lock, in the connection's order; the
    /// rest (a key broker exchange) runs without the lock and gives the
    /// answer.
    Aside(Aside),
}

/// The rest of a request that runs aside.
pub type Aside = Box<dyn FnOnce(&Dispatcher) -> Response + Send>;

/// A `ProvisionSecret` the policy allowed.
struct Secret {
    container_id: String,
    broker_url: String,
    broker_certificate_sha256: String,
    resource: String,
    file: String,
    broker_address: Option<String>,
}

impl Dispatcher {
    /// Begin an allowed `ProvisionSecret`: one of the agent's
    /// `parma_protocol::MAX_ASIDE` slots is taken (none free: `busy`, nothing
    /// done), the container is checked and marked under the lock (it does not
    /// start until the fetch ends); the exchange with the broker is left aside,
    /// without the lock (it may take up to `parma_kbs::EXCHANGE_DEADLINE` on a
    /// route the host controls: no other request waits for it); the secret is
    /// then written under the lock again, into the same container only: one
    /// deleted meanwhile, or created again under its id, gets nothing.
    fn provision_secret(&self, mut guest: MutexGuard<'_, Guest>, id: u32, asked: Secret) -> Handled {
        let Secret { container_id, broker_url, broker_certificate_sha256, resource, file, broker_address } = asked;
        let failed = move |fault: Fault| {
            tracing::warn!(id, "ProvisionSecret failed ({}): {}", fault.code, fault.message);
            Response::Error(fault.into())
        };
        let begun = (|| -> Result<_, Fault> {
            let slot = self.aside.clone().try_acquire_owned().map_err(|_| {
                let max = parma_protocol::MAX_ASIDE;
                Fault::new(
                    ErrorCode::Busy,
                    format!("busy: {max} key broker exchanges already run in the agent; nothing was done"),
                )
            })?;
            let broker = crate::kbs::Broker::new(&broker_url, &broker_certificate_sha256).map_err(Fault::invalid)?;
            let pod = match broker_address {
                None => None,
                Some(address) => {
                    let address: std::net::SocketAddr =
                        address.parse().map_err(|_| Fault::invalid("broker_address is not IP:PORT"))?;
                    let pidfd = guest.containers.sandbox()?.pidfd().try_clone_to_owned().map_err(|err| {
                        Fault::from(format!("cannot hold the pod's namespaces for the exchange: {err}"))
                    })?;
                    Some((pidfd, address))
                }
            };
            let ticket = guest.containers.begin_secret(&container_id)?;
            Ok((slot, broker, pod, ticket))
        })();
        let (slot, broker, pod, ticket) = match begun {
            Ok(begun) => begun,
            Err(fault) => return Handled::Now(failed(fault), After::Continue),
        };
        drop(guest);
        Handled::Aside(Box::new(move |dispatcher: &Dispatcher| {
            let route = match &pod {
                None => crate::kbs::Route::Vsock,
                Some((pidfd, address)) => crate::kbs::Route::Pod(std::os::fd::AsFd::as_fd(pidfd), *address),
            };
            let fetched = crate::kbs::fetch(&broker, route, &resource, &dispatcher.attestation)
                .map_err(|err| Fault::from(format!("the key broker exchange failed: {err}")));
            let mut guest = dispatcher.lock();
            let written = match fetched {
                Ok(secret) => guest.containers.end_secret(ticket, Some((&file, &secret))).map(|()| secret.len()),
                Err(fault) => {
                    // The exchange's failure is the answer, whatever became of the container.
                    let _ = guest.containers.end_secret(ticket, None);
                    Err(fault)
                }
            };
            drop(guest);
            drop(slot);
            match written {
                Ok(bytes) => {
                    tracing::info!(id, "secret {resource:?} ({bytes} bytes) provisioned for {container_id:?}");
                    Response::Done
                }
                Err(fault) => failed(fault),
            }
        }))
    }
}

#[cfg(test)]
impl Dispatcher {
    /// Hold the guest's records until told (a handler stuck on a disk).
    pub fn hold_lock_until(&self, locked: &std::sync::mpsc::Sender<()>, release: &std::sync::mpsc::Receiver<()>) {
        let _guest = self.lock();
        let _ = locked.send(());
        let _ = release.recv();
    }
}

/// Why an allowed request did not complete.
#[derive(Debug)]
enum Failure {
    /// Refused after all, by what the policy decided (stdio the policy did
    /// not grant).
    Denied(String),
    /// Failed in the guest; nothing changed.
    Failed(Fault),
    /// Failed after changing the guest: the decision is committed so the
    /// policy's records match what is mounted.
    Partly(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Failed(message.into())
    }
}

impl From<Fault> for Failure {
    fn from(fault: Fault) -> Self {
        Failure::Failed(fault)
    }
}

/// Whether the allowed decisions let the host reach the process's stdio.
fn stdio_allowed(decisions: &[Decision]) -> bool {
    decisions.iter().any(|decision| decision.allow_stdio_access)
}

/// Carry out an allowed request that acts on the guest.
fn act(guest: &mut Guest, request: Request, decisions: &[Decision]) -> Result<Response, Failure> {
    let Guest { storage, containers, endpoints, .. } = guest;
    let stdio = |containers: &Containers, id: &str, exec_id: Option<&str>| {
        if containers.stdio_allowed(id, exec_id) {
            Ok(())
        } else {
            Err(Failure::Denied(format!("the policy does not allow stdio access to the process of container {id:?}")))
        }
    };
    match request {
        Request::MountLayer { name, serial, root_hash, hash_offset } => {
            let device = storage.mount_layer(&name, &serial, &root_hash, hash_offset)?;
            Ok(Response::LayerMounted { target: storage::layer_target(&name), device })
        }
        Request::UnmountLayer { name } => match storage.unmount_layer(&name) {
            Ok(()) => Ok(Response::Done),
            Err(storage::Teardown::Unchanged(message)) => Err(Failure::Failed(message.into())),
            Err(storage::Teardown::Partly(message)) => Err(Failure::Partly(message)),
        },
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
                return Err(Failure::Failed(Fault::wrong_state(format!(
                    "container {container_id:?} still exists: delete it first"
                ))));
            }
            match storage.unmount_overlay(&container_id) {
                Ok(()) => Ok(Response::Done),
                Err(storage::Teardown::Unchanged(message)) => Err(Failure::Failed(message.into())),
                Err(storage::Teardown::Partly(message)) => Err(Failure::Partly(message)),
            }
        }
        Request::CreateContainer {
            container_id,
            process,
            hostname,
            readonly_rootfs,
            resources,
            mounts,
            masked_paths,
            readonly_paths,
            namespaces,
        } => {
            if !storage.has_overlay(&container_id) {
                return Err(Failure::Failed(Fault::wrong_state(format!("container {container_id:?} has no overlay"))));
            }
            // The endpoint exists before the container, so its bind finds it.
            let endpoint = if decisions.iter().any(|decision| decision.allow_attestation) {
                let name = endpoint::policy_name(decisions, &container_id).ok_or_else(|| {
                    Fault::from(format!("internal error: no policy name for container {container_id:?}"))
                })?;
                Some(endpoints.open(&container_id, &name)?)
            } else {
                None
            };
            let options = containers::Options {
                attestation: endpoint.as_deref(),
                hostname: hostname.as_deref(),
                readonly_rootfs,
                resources: resources.unwrap_or_default(),
                mounts: &mounts,
                masked_paths: &masked_paths.unwrap_or_else(default_masked_paths),
                readonly_paths: &readonly_paths.unwrap_or_else(default_readonly_paths),
                stdio: stdio_allowed(decisions),
                namespaces: &namespaces,
            };
            if let Err(err) = containers.create(&container_id, &process, &options) {
                endpoints.close(&container_id);
                return Err(err.into());
            }
            Ok(Response::Created { policy_container: endpoint::policy_name(decisions, &container_id) })
        }
        Request::StartContainer { container_id } => {
            Ok(containers.start(&container_id).map(|pid| Response::Started { pid })?)
        }
        Request::UpdateContainer { container_id, resources } => {
            Ok(containers.update(&container_id, &resources).map(|()| Response::Done)?)
        }
        Request::ContainerStats { container_id } => {
            Ok(containers.stats(&container_id).map(|stats| Response::Stats(Box::new(stats)))?)
        }
        Request::ExecProcess { container_id, exec_id, process } => {
            let pid = containers.exec(&container_id, &exec_id, &process, stdio_allowed(decisions))?;
            Ok(Response::Started { pid })
        }
        Request::SignalProcess { container_id, exec_id, signal } => {
            Ok(containers.signal(&container_id, exec_id.as_deref(), signal).map(|()| Response::Done)?)
        }
        Request::WaitProcess { container_id, exec_id } => {
            let status = containers.wait(&container_id, exec_id.as_deref())?;
            Ok(Response::ProcessStatus { running: status.running, exit_code: status.exit_code, signal: status.signal })
        }
        Request::ReadOutput { container_id, exec_id, stream } => {
            stdio(containers, &container_id, exec_id.as_deref())?;
            let (data, eof) = containers.read(&container_id, exec_id.as_deref(), stream)?;
            Ok(Response::Output { data: BASE64.encode(data), eof })
        }
        Request::WriteStdin { container_id, exec_id, data, close } => {
            stdio(containers, &container_id, exec_id.as_deref())?;
            let data = BASE64.decode(data.as_bytes()).map_err(|err| format!("stdin data is not base64: {err}"))?;
            let bytes = containers.write_stdin(&container_id, exec_id.as_deref(), &data, close)?;
            Ok(Response::Written { bytes: bytes as u64 })
        }
        Request::ResizeTerminal { container_id, exec_id, rows, cols } => {
            stdio(containers, &container_id, exec_id.as_deref())?;
            Ok(containers.resize_terminal(&container_id, exec_id.as_deref(), rows, cols).map(|()| Response::Done)?)
        }
        Request::DeleteContainer { container_id } => {
            containers.delete(&container_id)?;
            endpoints.close(&container_id);
            Ok(Response::Done)
        }
        Request::CreateSandbox { hostname, share_pid } => {
            Ok(containers.create_sandbox(&hostname, share_pid).map(|()| Response::Done)?)
        }
        Request::UpdateInterface { interface } => {
            let parsed = network::parse_interface(&interface)?;
            network::update_interface(containers.sandbox()?, &parsed)?;
            Ok(Response::Done)
        }
        Request::UpdateRoutes { routes } => {
            let (parsed, _) = network::parse_routes(&routes)?;
            network::update_routes(containers.sandbox()?, &parsed)?;
            Ok(Response::Done)
        }
        Request::AddArpNeighbors { neighbors } => {
            let (parsed, _) = network::parse_neighbors(&neighbors)?;
            network::add_neighbors(containers.sandbox()?, &parsed)?;
            Ok(Response::Done)
        }
        Request::CopyFile { path, data, mode } => {
            let data = decode_file(&data)?;
            files::copy(&files::guest_path(&path)?, &data, mode)?;
            Ok(Response::Done)
        }
        Request::Ping
        | Request::GuestInfo
        | Request::Shutdown
        | Request::SetPolicy { .. }
        | Request::GetAttestation { .. }
        | Request::ProvisionSecret { .. }
        | Request::LoadFragment { .. } => {
            Err(Failure::Failed(Fault::from(String::from("internal error: request routed to the wrong handler"))))
        }
    }
}

/// A copied file's contents, within [`files::MAX_FILE`].
/// A secret's file name in `/dev/parma/secrets/`: 1 to 64 bytes of
/// `[A-Za-z0-9._-]`, not hidden.
fn decode_file(data: &str) -> Result<Vec<u8>, Fault> {
    if data.len() > files::MAX_FILE.div_ceil(3) * 4 {
        return Err(Fault::invalid(format!("a copied file has at most {} bytes", files::MAX_FILE)));
    }
    BASE64.decode(data.as_bytes()).map_err(|err| Fault::invalid(format!("file data is not base64: {err}")))
}

fn malformed(message: String) -> AgentError {
    AgentError::new(ErrorCode::Malformed, message)
}

fn default_masked_paths() -> Vec<String> {
    parma_policy::DEFAULT_MASKED_PATHS.iter().map(|p| p.to_string()).collect()
}

fn default_readonly_paths() -> Vec<String> {
    parma_policy::DEFAULT_READONLY_PATHS.iter().map(|p| p.to_string()).collect()
}

/// The enforcement points a request meets, with their inputs (field names
/// as hcsshim's). Names are checked here, before any decision; what the
/// policy sees is what the agent acts on (defaults filled in, report data
/// decoded), never the host's spelling of it.
fn points(request: &Request, containers: &mut Containers) -> Result<Vec<Input>, AgentError> {
    let name = |what: &str, name: &str| check_name(what, name).map_err(malformed);
    let container = |id: &str| input::Container { container_id: id.to_string() };
    Ok(match request {
        Request::Ping | Request::Shutdown | Request::SetPolicy { .. } | Request::LoadFragment { .. } => Vec::new(),
        Request::GuestInfo => vec![Input::GetProperties(input::Empty {})],
        Request::ContainerStats { container_id } => {
            name("container id", container_id)?;
            vec![Input::GetProperties(input::Empty {})]
        }
        Request::CreateSandbox { hostname, share_pid } => {
            vec![Input::CreateSandbox(input::CreateSandbox { hostname: hostname.clone(), share_pid: *share_pid })]
        }
        Request::UpdateInterface { interface } => {
            vec![Input::UpdateInterface(network::parse_interface(interface).map_err(AgentError::from)?.input)]
        }
        Request::UpdateRoutes { routes } => {
            vec![Input::UpdateRoutes(network::parse_routes(routes).map_err(AgentError::from)?.1)]
        }
        Request::AddArpNeighbors { neighbors } => {
            vec![Input::AddArpNeighbors(network::parse_neighbors(neighbors).map_err(AgentError::from)?.1)]
        }
        Request::CopyFile { path, data, mode } => {
            let path = files::guest_path(path).map_err(AgentError::from)?;
            files::check_mode(*mode).map_err(AgentError::from)?;
            let size = decode_file(data).map_err(AgentError::from)?.len() as u64;
            vec![Input::CopyFile(input::CopyFile { path, size, mode: *mode })]
        }
        Request::ProvisionSecret {
            container_id,
            broker_url,
            broker_certificate_sha256,
            resource,
            file,
            broker_address,
        } => {
            check_name("container id", container_id).map_err(malformed)?;
            if let Some(address) = broker_address {
                address
                    .parse::<std::net::SocketAddr>()
                    .map_err(|_| malformed("broker_address is not IP:PORT".to_string()))?;
            }
            parma_kbs::check_secret_file(file).map_err(malformed)?;
            crate::kbs::check_resource(resource).map_err(malformed)?;
            crate::kbs::Broker::new(broker_url, broker_certificate_sha256).map_err(malformed)?;
            vec![Input::ReleaseSecret(input::ReleaseSecret {
                container_id: container_id.clone(),
                broker_url: broker_url.clone(),
                broker_certificate_sha256: broker_certificate_sha256.clone(),
                resource: resource.clone(),
                file: file.clone(),
            })]
        }
        Request::GetAttestation { report_data } => {
            let data = report_data_from_hex(report_data).map_err(malformed)?;
            vec![Input::GetAttestation(input::GetAttestation {
                report_data: hex::encode(data),
                running: containers.running_ids(),
            })]
        }
        Request::MountLayer { name: layer, root_hash, .. } => {
            name("layer", layer)?;
            vec![Input::MountDevice(input::MountDevice {
                target: storage::layer_target(layer),
                device_hash: root_hash.clone(),
            })]
        }
        Request::UnmountLayer { name: layer } => {
            name("layer", layer)?;
            vec![Input::UnmountDevice(input::Unmount { unmount_target: storage::layer_target(layer) })]
        }
        Request::MountOverlay { container_id, layers, writable } => {
            name("container id", container_id)?;
            for layer in layers {
                name("layer", layer)?;
            }
            let mut points = vec![Input::MountOverlay(input::MountOverlay {
                container_id: container_id.clone(),
                layer_paths: layers.iter().map(|l| storage::layer_target(l)).collect(),
                target: storage::rootfs_target(container_id),
            })];
            if *writable {
                // Guest memory: encrypted and integrity-protected by SEV-SNP.
                points.push(Input::ScratchMount(input::ScratchMount {
                    target: storage::scratch_target(container_id),
                    encrypted: true,
                    swap: false,
                }));
            }
            points
        }
        Request::MountScratch { .. } => {
            // Authenticated dm-crypt over dm-integrity: encrypted, but swap
            // on a host disk, without freshness.
            vec![Input::ScratchMount(input::ScratchMount { target: "swap".into(), encrypted: true, swap: true })]
        }
        Request::UnmountOverlay { container_id } => {
            name("container id", container_id)?;
            vec![Input::UnmountOverlay(input::Unmount { unmount_target: storage::rootfs_target(container_id) })]
        }
        Request::CreateContainer {
            container_id,
            process,
            mounts,
            masked_paths,
            readonly_paths,
            readonly_rootfs,
            ..
        } => {
            name("container id", container_id)?;
            let seccomp =
                process.seccomp.as_deref().map_or_else(String::new, |p| parma_policy::policy_hash(p.as_bytes()));
            vec![Input::CreateContainer(Box::new(input::CreateContainer {
                process: process_input(container_id, process),
                user: input::User { uid: process.uid, gid: process.gid },
                groups: process.groups.clone(),
                capabilities: process.capabilities.clone(),
                no_new_privileges: process.no_new_privileges,
                privileged: false,
                seccomp_profile_sha256: seccomp,
                mounts: mounts.clone(),
                masked_paths: masked_paths.clone().unwrap_or_else(default_masked_paths),
                readonly_paths: readonly_paths.clone().unwrap_or_else(default_readonly_paths),
                readonly_rootfs: *readonly_rootfs,
            }))]
        }
        Request::StartContainer { container_id } => {
            name("container id", container_id)?;
            vec![Input::StartContainer(container(container_id))]
        }
        Request::UpdateContainer { container_id, resources } => {
            name("container id", container_id)?;
            vec![Input::UpdateContainer(input::UpdateContainer {
                container_id: container_id.clone(),
                resources: resources.clone(),
            })]
        }
        Request::ExecProcess { container_id, exec_id, process } => {
            name("container id", container_id)?;
            name("exec id", exec_id)?;
            vec![Input::ExecInContainer(process_input(container_id, process))]
        }
        Request::SignalProcess { container_id, exec_id, signal } => {
            name("container id", container_id)?;
            if let Some(exec_id) = exec_id {
                name("exec id", exec_id)?;
            }
            let command = containers.command(container_id, exec_id.as_deref()).unwrap_or_default();
            vec![Input::SignalContainerProcess(input::Signal {
                container_id: container_id.clone(),
                signal: *signal,
                is_init_process: exec_id.is_none(),
                arg_list: command,
            })]
        }
        Request::DeleteContainer { container_id } => {
            name("container id", container_id)?;
            vec![Input::ShutdownContainer(container(container_id))]
        }
        Request::WaitProcess { container_id, .. }
        | Request::ReadOutput { container_id, .. }
        | Request::WriteStdin { container_id, .. }
        | Request::ResizeTerminal { container_id, .. } => {
            name("container id", container_id)?;
            Vec::new()
        }
    })
}

/// What the create and exec points see of a process.
fn process_input(container_id: &str, process: &ProcessSpec) -> input::Process {
    input::Process {
        container_id: container_id.to_string(),
        arg_list: process.args.clone(),
        env_list: process.env.clone(),
        working_dir: process.cwd.clone(),
        terminal: process.terminal,
        rlimits: process.rlimits.clone(),
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
    use serde_json::json;

    fn frame(body: &[u8]) -> Frame {
        Frame { kind: FrameKind::Request, id: 1, body: body.to_vec() }
    }

    fn dispatcher() -> Dispatcher {
        Dispatcher::new(Provider::Emulated { host_data: [0; 32], measurement: [0; 48] })
    }

    #[test]
    fn ping_answers_with_versions() {
        let (response, after) = dispatcher().dispatch(&frame(br#"{"type":"Ping"}"#));
        let Response::Pong(info) = response else { panic!("{response:?}") };
        assert_eq!(info.protocol_version, VERSION);
        assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(!info.kernel_release.is_empty());
        assert_eq!(after, After::Continue);
    }

    #[test]
    fn shutdown_is_answered_then_acted_on() {
        let (response, after) = dispatcher().dispatch(&frame(br#"{"type":"Shutdown"}"#));
        assert_eq!(response, Response::ShuttingDown);
        assert_eq!(after, After::Shutdown);
    }

    #[test]
    fn ping_and_shutdown_need_no_lock() {
        // While a handler holds the guest's records (a stalled disk), the
        // host can still ping and power off.
        let dispatcher = dispatcher();
        let _held = dispatcher.lock();
        assert!(matches!(immediate(&Request::Ping), Some((Response::Pong(_), After::Continue))));
        assert_eq!(immediate(&Request::Shutdown), Some((Response::ShuttingDown, After::Shutdown)));
        assert_eq!(immediate(&Request::GuestInfo), None);
    }

    #[test]
    fn bad_bodies_get_typed_errors() {
        let cases: [(&[u8], ErrorCode); 3] = [
            (b"{", ErrorCode::Malformed),
            (br#"{"type":"RunAsRoot"}"#, ErrorCode::UnknownType),
            (br#"{"type":"Ping","as":"root"}"#, ErrorCode::Malformed),
        ];
        for (body, code) in cases {
            let (response, after) = dispatcher().dispatch(&frame(body));
            let Response::Error(err) = response else { panic!("{response:?}") };
            assert_eq!(err.code, code);
            assert_eq!(after, After::Continue);
        }
    }

    #[test]
    fn response_frames_are_refused() {
        let mut frame = frame(br#"{"type":"Ping"}"#);
        frame.kind = FrameKind::Response;
        let (response, _) = dispatcher().dispatch(&frame);
        assert!(matches!(response, Response::Error(AgentError { code: ErrorCode::UnknownKind, .. })));
    }

    #[test]
    fn the_policy_sees_report_data_as_the_agent_uses_it() {
        // Upper case, short: one REPORT_DATA, one spelling for the policy.
        let mut containers = Containers::default();
        for spelling in ["ABCD", "abcd", "abcd00"] {
            let points = points(&Request::GetAttestation { report_data: spelling.into() }, &mut containers).unwrap();
            let expected = format!("abcd{}", "0".repeat(124));
            let input = points[0].to_value();
            assert_eq!(input["reportData"], json!(expected), "{spelling}");
            assert_eq!(input["running"], json!([]));
        }
        let err = points(&Request::GetAttestation { report_data: "xyz".into() }, &mut containers).unwrap_err();
        assert_eq!(err.code, ErrorCode::Malformed);
    }

    #[test]
    fn defaults_reach_the_policy_as_applied() {
        let mut containers = Containers::default();
        let process = ProcessSpec {
            args: vec!["/bin/x".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            groups: vec![],
            capabilities: Default::default(),
            no_new_privileges: false,
            rlimits: vec![parma_protocol::Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 1, hard: 2 }],
            seccomp: None,
            terminal: true,
        };
        let request = Request::CreateContainer {
            container_id: "c".into(),
            process,
            hostname: None,
            readonly_rootfs: false,
            resources: None,
            mounts: vec![],
            masked_paths: None,
            readonly_paths: None,
            namespaces: vec![],
        };
        let points = points(&request, &mut containers).unwrap();
        let input = &points[0].to_value();
        assert_eq!(input["maskedPaths"], json!(parma_policy::DEFAULT_MASKED_PATHS));
        assert_eq!(input["readonlyPaths"], json!(parma_policy::DEFAULT_READONLY_PATHS));
        assert_eq!(input["terminal"], json!(true));
        assert_eq!(input["rlimits"], json!([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2}]));
    }
}
