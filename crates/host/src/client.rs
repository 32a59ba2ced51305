//! A blocking client for the guest agent, over the unix socket QEMU exposes
//! for the virtio-serial port, or over vsock on real hosts.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use parma_protocol::{
    AgentError, DecodeError, Decoder, ErrorCode, FrameError, FrameKind, GuestInfo, Mount, OutputStream, PingInfo,
    ProcessSpec, Request, Resources, Response,
};

/// Where the agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// QEMU's unix socket for the agent's virtio-serial port.
    Unix(PathBuf),
    /// A vsock address (`vsock:CID[:PORT]`).
    Vsock {
        /// The guest's context id.
        cid: u32,
        /// The agent's port.
        port: u32,
    },
    /// The guest's vsock through a host unix socket (`vsock-uds:PATH[:PORT]`):
    /// the "hybrid vsock" of Firecracker, Cloud Hypervisor and rust-vmm's
    /// `vhost-device-vsock`, entered with `CONNECT PORT\n` and `OK ...\n`.
    VsockUds {
        /// The backend's unix socket for host-side connections.
        path: PathBuf,
        /// The agent's port.
        port: u32,
    },
}

impl FromStr for Control {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("vsock-uds:") {
            let (path, port) = match rest.rsplit_once(':') {
                Some((path, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                    (path, port.parse().map_err(|_| format!("bad vsock port in {s:?}"))?)
                }
                _ => (rest, parma_protocol::VSOCK_PORT),
            };
            if path.is_empty() {
                return Err(format!("no socket path in {s:?}"));
            }
            return Ok(Control::VsockUds { path: PathBuf::from(path), port });
        }
        let Some(rest) = s.strip_prefix("vsock:") else {
            return Ok(Control::Unix(PathBuf::from(s)));
        };
        let (cid, port) = rest.split_once(':').unwrap_or((rest, ""));
        let cid = cid.parse().map_err(|_| format!("bad vsock CID in {s:?}"))?;
        let port = if port.is_empty() {
            parma_protocol::VSOCK_PORT
        } else {
            port.parse().map_err(|_| format!("bad vsock port in {s:?}"))?
        };
        Ok(Control::Vsock { cid, port })
    }
}

impl std::fmt::Display for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Unix(path) => write!(f, "{}", path.display()),
            Control::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Control::VsockUds { path, port } => write!(f, "vsock-uds:{}:{port}", path.display()),
        }
    }
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect before the deadline.
    #[error("cannot connect to the agent at {control}")]
    Connect {
        /// Where.
        control: String,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to the agent")]
    Io(#[from] std::io::Error),
    /// No answer before the deadline.
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent (or QEMU) closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// The agent sent bytes that are not a frame.
    #[error("bad frame from the agent")]
    Frame(#[from] FrameError),
    /// The request does not fit in one frame (nothing was sent).
    #[error("the request is too large to send: {0}")]
    TooLarge(parma_protocol::frame::BodyTooLarge),
    /// [`Client::answer`] was asked for a request not sent aside, or
    /// already collected.
    #[error("request {0} was not sent aside, or its answer was collected")]
    NotAside(u32),
    /// The agent sent a frame whose body is not a response.
    #[error("bad response from the agent")]
    Decode(#[from] DecodeError),
    /// The agent refused or failed the request.
    #[error("the agent answered with an error: {0}")]
    Agent(AgentError),
    /// The agent answered with the wrong kind of response.
    #[error("unexpected response from the agent: {0:?}")]
    Unexpected(Box<Response>),
}

impl ClientError {
    /// The agent's error code, when the agent answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent(err) => Some(err.code),
            _ => None,
        }
    }
}

trait Stream: Read + Write + Send {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Stream for vsock::VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        vsock::VsockStream::set_read_timeout(self, timeout)
    }
}

/// A connection to the agent.
pub struct Client {
    stream: Box<dyn Stream>,
    decoder: Decoder,
    next_id: u32,
    timeout: Duration,
    /// Requests sent with [`Client::send_aside`] whose answers were not
    /// collected yet, with the answer once it came.
    aside: std::collections::BTreeMap<u32, Option<Response>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("next_id", &self.next_id).field("timeout", &self.timeout).finish()
    }
}

/// Connect to port `port` of the guest through a hybrid-vsock unix socket:
/// send `CONNECT PORT\n`, expect a line starting `OK `. Until the agent
/// listens, the backend closes the connection: a retryable error.
fn connect_vsock_uds(path: &std::path::Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout.min(Duration::from_secs(10))))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the agent's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => {
                return if line.starts_with(b"OK ") {
                    stream.set_read_timeout(None)?;
                    Ok(stream)
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!("the vsock backend answered {:?}", String::from_utf8_lossy(&line)),
                    ))
                };
            }
            _ => line.push(byte[0]),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        format!("no agent listens on vsock port {port} yet"),
    ))
}

/// Ids start at a value unlikely to match a stale answer left on the port
/// by an earlier client.
fn first_id() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(16)) | 1
}

impl Client {
    /// How long each call waits for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connect, retrying until `timeout` (QEMU creates the socket a moment
    /// after it starts). Each call then waits up to `timeout` for its answer.
    pub fn connect(control: &Control, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt: std::io::Result<Box<dyn Stream>> = match control {
                Control::Unix(path) => UnixStream::connect(path).map(|s| Box::new(s) as Box<dyn Stream>),
                Control::Vsock { cid, port } => {
                    vsock::VsockStream::connect_with_cid_port(*cid, *port).map(|s| Box::new(s) as Box<dyn Stream>)
                }
                Control::VsockUds { path, port } => {
                    connect_vsock_uds(path, *port, timeout).map(|s| Box::new(s) as Box<dyn Stream>)
                }
            };
            match attempt {
                Ok(stream) => {
                    return Ok(Self {
                        stream,
                        decoder: Decoder::new(),
                        next_id: first_id(),
                        timeout,
                        aside: std::collections::BTreeMap::new(),
                    });
                }
                Err(source) if Instant::now() >= deadline => {
                    return Err(ClientError::Connect { control: control.to_string(), source });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// [`Client::connect`], then a ping answered on that connection, trying
    /// new connections until `timeout`; each call then waits up to
    /// `timeout`. On virtio-serial a request sent right after a host
    /// connects can be lost: its bytes can reach the agent before the
    /// guest learns that this host is there, so the agent takes the
    /// previous host's leaving for this one's and drops the session with
    /// the request in it. A ping answered on the connection shows the agent
    /// is in step with it.
    pub fn connect_in_step(control: &Control, timeout: Duration) -> Result<(Self, PingInfo), ClientError> {
        /// How long one ping waits before a new connection is tried.
        const IN_STEP_PING: Duration = Duration::from_secs(1);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let attempt = Self::connect(control, left).and_then(|mut client| {
                client.set_timeout(IN_STEP_PING.min(left));
                let info = client.ping()?;
                client.set_timeout(timeout);
                Ok((client, info))
            });
            match attempt {
                Ok(answered) => return Ok(answered),
                Err(err) if Instant::now() >= deadline => return Err(err),
                Err(err) => {
                    tracing::debug!("no answer on a new connection yet: {err}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// How long each call waits for its answer from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Send raw bytes (tests use this to send hostile input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Send a request; returns its id.
    pub fn send(&mut self, request: &Request) -> Result<u32, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        // An oversize body fails here, at once, not as a silent empty frame
        // and a timeout.
        let frame = parma_protocol::try_encode_request(id, request).map_err(ClientError::TooLarge)?;
        self.send_raw(&frame)?;
        Ok(id)
    }

    /// The next response frame, whatever its id.
    pub fn recv(&mut self) -> Result<(u32, Response), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(item) = self.decoder.next_frame() {
                let frame = item?;
                if frame.kind != FrameKind::Response {
                    return Err(ClientError::Unexpected(Box::new(Response::Error(AgentError::new(
                        parma_protocol::ErrorCode::UnknownKind,
                        "the agent sent a request frame",
                    )))));
                }
                return Ok((frame.id, Response::decode(&frame.body)?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(self.timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.decoder.push(buf.get(..n).unwrap_or_default()),
                Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Send a request and wait for its answer, skipping stale answers to
    /// other ids (an answer to a request sent aside is kept).
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let id = self.send(request)?;
        loop {
            let (got, response) = self.recv()?;
            if got == id {
                return Ok(response);
            }
            self.keep_or_skip(got, response);
        }
    }

    fn keep_or_skip(&mut self, got: u32, response: Response) {
        match self.aside.get_mut(&got) {
            Some(slot) => *slot = Some(response),
            None => tracing::debug!("skipping a stale answer to request {got}"),
        }
    }

    /// Send a request whose answer [`Client::answer`] collects later: calls
    /// made meanwhile keep it when it comes. For a request the agent runs
    /// beside later ones (`ProvisionSecret`), so that a caller sharing the
    /// client need not hold it while the agent works.
    pub fn send_aside(&mut self, request: &Request) -> Result<u32, ClientError> {
        let id = self.send(request)?;
        self.aside.insert(id, None);
        Ok(id)
    }

    /// The answer to request `id` sent with [`Client::send_aside`], waiting
    /// at most `wait` for it: none yet when it has not come (ask again).
    /// Once returned (or on an error other than none yet) it is forgotten.
    pub fn answer(&mut self, id: u32, wait: Duration) -> Result<Option<Response>, ClientError> {
        match self.aside.get(&id) {
            None => return Err(ClientError::NotAside(id)),
            Some(Some(_)) => return Ok(self.aside.remove(&id).flatten()),
            Some(None) => {}
        }
        let before = self.timeout;
        // One deadline for the whole wait, however many other answers come.
        let deadline = Instant::now() + wait;
        let got = loop {
            self.timeout = deadline.saturating_duration_since(Instant::now());
            match self.recv() {
                Ok((got, response)) if got == id => break Ok(Some(response)),
                Ok((got, response)) => self.keep_or_skip(got, response),
                Err(ClientError::Timeout(_)) => break Ok(None),
                Err(err) => break Err(err),
            }
        };
        self.timeout = before;
        if !matches!(got, Ok(None)) {
            self.aside.remove(&id);
        }
        got
    }

    /// Stop waiting for the answer to request `id` sent aside: when it
    /// comes it is skipped.
    pub fn forget(&mut self, id: u32) {
        self.aside.remove(&id);
    }

    /// `Ping`.
    pub fn ping(&mut self) -> Result<PingInfo, ClientError> {
        match self.call(&Request::Ping)? {
            Response::Pong(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// `GuestInfo`.
    pub fn guest_info(&mut self) -> Result<GuestInfo, ClientError> {
        match self.call(&Request::GuestInfo)? {
            Response::GuestInfo(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// `SetPolicy`: returns the sha256 the agent computed.
    pub fn set_policy(&mut self, policy: String) -> Result<String, ClientError> {
        match self.call(&Request::SetPolicy { policy })? {
            Response::PolicySet { sha256 } => Ok(sha256),
            other => Err(unexpected(other)),
        }
    }

    /// `GetAttestation`: the report's bytes and its provider.
    pub fn attestation(&mut self, report_data: &[u8]) -> Result<(Vec<u8>, String), ClientError> {
        match self.call(&Request::GetAttestation { report_data: hex::encode(report_data) })? {
            Response::Attestation { report, provider } => {
                let bytes = hex::decode(&report).map_err(|_| {
                    ClientError::Decode(parma_protocol::DecodeError::Malformed("the report is not hex".into()))
                })?;
                Ok((bytes, provider))
            }
            other => Err(unexpected(other)),
        }
    }

    /// `Shutdown`: the UVM powers off after answering.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        match self.call(&Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// A policy fragment the agent took (`LoadFragment`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FragmentLoaded {
    /// sha256 of the issuer's key, lowercase hex.
    pub issuer: String,
    /// The fragment's feed.
    pub feed: String,
    /// Its SVN.
    pub svn: u64,
    /// How many containers it added.
    pub containers: u64,
}

/// How a process ended, or that it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStatus {
    /// Still running.
    pub running: bool,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The killing signal, when one did.
    pub signal: Option<i32>,
}

/// The container requests, one method each.
impl Client {
    /// Any request whose success answer is `Done` (one built in full, with
    /// fields the methods below leave at their defaults).
    pub fn done(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.call(request)? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn started(&mut self, request: &Request) -> Result<i32, ClientError> {
        match self.call(request)? {
            Response::Started { pid } => Ok(pid),
            other => Err(unexpected(other)),
        }
    }

    /// `MountLayer`: returns the dm-verity device.
    pub fn mount_layer(
        &mut self,
        name: &str,
        serial: &str,
        root_hash: &str,
        hash_offset: u64,
    ) -> Result<String, ClientError> {
        let request =
            Request::MountLayer { name: name.into(), serial: serial.into(), root_hash: root_hash.into(), hash_offset };
        match self.call(&request)? {
            Response::LayerMounted { device, .. } => Ok(device),
            other => Err(unexpected(other)),
        }
    }

    /// `UnmountLayer`.
    pub fn unmount_layer(&mut self, name: &str) -> Result<(), ClientError> {
        self.done(&Request::UnmountLayer { name: name.into() })
    }

    /// `MountOverlay`: returns the container's root in the guest.
    pub fn mount_overlay(
        &mut self,
        container_id: &str,
        layers: &[String],
        writable: bool,
    ) -> Result<String, ClientError> {
        let request = Request::MountOverlay { container_id: container_id.into(), layers: layers.to_vec(), writable };
        match self.call(&request)? {
            Response::OverlayMounted { target } => Ok(target),
            other => Err(unexpected(other)),
        }
    }

    /// `MountScratch`.
    /// Returns the swap device and its usable bytes.
    pub fn mount_scratch(&mut self, serial: &str) -> Result<(String, u64), ClientError> {
        match self.call(&Request::MountScratch { serial: serial.into() })? {
            Response::ScratchMounted { device, bytes } => Ok((device, bytes)),
            other => Err(unexpected(other)),
        }
    }

    /// `UnmountOverlay`.
    pub fn unmount_overlay(&mut self, container_id: &str) -> Result<(), ClientError> {
        self.done(&Request::UnmountOverlay { container_id: container_id.into() })
    }

    /// `CreateContainer` with no limits ([`Client::created`]'s answer).
    pub fn create_container(
        &mut self,
        container_id: &str,
        process: &ProcessSpec,
    ) -> Result<Option<String>, ClientError> {
        self.create_container_with(container_id, process, None, &[])
    }

    /// A `CreateContainer` request: returns the policy's container entry it
    /// was created as, when the policy's decision names one (an agent older
    /// than that answer says `Done`: no entry).
    pub fn created(&mut self, request: &Request) -> Result<Option<String>, ClientError> {
        match self.call(request)? {
            Response::Created { policy_container } => Ok(policy_container),
            Response::Done => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// `CreateContainer` with cgroup limits and mounts ([`Client::created`]'s answer).
    pub fn create_container_with(
        &mut self,
        container_id: &str,
        process: &ProcessSpec,
        resources: Option<Resources>,
        mounts: &[Mount],
    ) -> Result<Option<String>, ClientError> {
        self.created(&Request::CreateContainer {
            container_id: container_id.into(),
            process: process.clone(),
            hostname: None,
            readonly_rootfs: false,
            resources,
            mounts: mounts.to_vec(),
            // runc's defaults, which the agent applies and the policy sees.
            masked_paths: None,
            readonly_paths: None,
            namespaces: Vec::new(),
        })
    }

    /// `CreateSandbox`: the UVM becomes a pod with this host name.
    pub fn create_sandbox(&mut self, hostname: &str, share_pid: bool) -> Result<(), ClientError> {
        self.done(&Request::CreateSandbox { hostname: hostname.into(), share_pid })
    }

    /// `UpdateInterface`: the NIC with the interface's MAC moves into the pod, configured.
    pub fn update_interface(&mut self, interface: &parma_protocol::Interface) -> Result<(), ClientError> {
        self.done(&Request::UpdateInterface { interface: interface.clone() })
    }

    /// `UpdateRoutes`.
    pub fn update_routes(&mut self, routes: &[parma_protocol::Route]) -> Result<(), ClientError> {
        self.done(&Request::UpdateRoutes { routes: routes.to_vec() })
    }

    /// `ProvisionSecret`: the agent fetches `resource` from the broker at
    /// `broker_url` (its certificate pinned by `certificate_sha256`) over
    /// the host's relay ([`crate::relay::Relay`]) into created container
    /// `container_id`'s `/dev/parma/secrets/FILE`; with `broker_address`
    /// (`IP:PORT`) over the pod's network instead of the relay.
    pub fn provision_secret(
        &mut self,
        container_id: &str,
        broker_url: &str,
        certificate_sha256: &str,
        resource: &str,
        file: &str,
        broker_address: Option<&str>,
    ) -> Result<(), ClientError> {
        self.done(&Request::ProvisionSecret {
            container_id: container_id.into(),
            broker_url: broker_url.into(),
            broker_certificate_sha256: certificate_sha256.into(),
            resource: resource.into(),
            file: file.into(),
            broker_address: broker_address.map(Into::into),
        })
    }

    /// `CopyFile`: `data` to `/run/parma/files/PATH` in the guest.
    pub fn copy_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        self.done(&Request::CopyFile { path: path.into(), data, mode })
    }

    /// `AddArpNeighbors`.
    pub fn add_arp_neighbors(&mut self, neighbors: &[parma_protocol::ArpNeighbor]) -> Result<(), ClientError> {
        self.done(&Request::AddArpNeighbors { neighbors: neighbors.to_vec() })
    }

    /// `UpdateContainer`.
    pub fn update_container(&mut self, container_id: &str, resources: &Resources) -> Result<(), ClientError> {
        self.done(&Request::UpdateContainer { container_id: container_id.into(), resources: resources.clone() })
    }

    /// `ContainerStats`: the container's resource use.
    pub fn container_stats(&mut self, container_id: &str) -> Result<parma_protocol::ContainerStats, ClientError> {
        match self.call(&Request::ContainerStats { container_id: container_id.into() })? {
            Response::Stats(stats) => Ok(*stats),
            other => Err(unexpected(other)),
        }
    }

    /// `StartContainer`: the init process's PID.
    pub fn start_container(&mut self, container_id: &str) -> Result<i32, ClientError> {
        self.started(&Request::StartContainer { container_id: container_id.into() })
    }

    /// `ExecProcess`: the process's PID.
    pub fn exec_process(
        &mut self,
        container_id: &str,
        exec_id: &str,
        process: &ProcessSpec,
    ) -> Result<i32, ClientError> {
        self.started(&Request::ExecProcess {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process: process.clone(),
        })
    }

    /// `SignalProcess`.
    pub fn signal_process(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        signal: i32,
    ) -> Result<(), ClientError> {
        self.done(&Request::SignalProcess {
            container_id: container_id.into(),
            exec_id: exec_id.map(Into::into),
            signal,
        })
    }

    /// `WaitProcess`: does not block.
    pub fn wait_process(&mut self, container_id: &str, exec_id: Option<&str>) -> Result<ProcessStatus, ClientError> {
        let request = Request::WaitProcess { container_id: container_id.into(), exec_id: exec_id.map(Into::into) };
        match self.call(&request)? {
            Response::ProcessStatus { running, exit_code, signal } => Ok(ProcessStatus { running, exit_code, signal }),
            other => Err(unexpected(other)),
        }
    }

    /// `ReadOutput`: new bytes, and whether the stream ended.
    pub fn read_output(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        stream: OutputStream,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        let request =
            Request::ReadOutput { container_id: container_id.into(), exec_id: exec_id.map(Into::into), stream };
        match self.call(&request)? {
            Response::Output { data, eof } => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD.decode(data.as_bytes()).map_err(|_| {
                    ClientError::Decode(parma_protocol::DecodeError::Malformed("output is not base64".into()))
                })?;
                Ok((bytes, eof))
            }
            other => Err(unexpected(other)),
        }
    }

    /// `WriteStdin`: the bytes the pipe took.
    pub fn write_stdin(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        data: &[u8],
        close: bool,
    ) -> Result<u64, ClientError> {
        use base64::Engine as _;
        let request = Request::WriteStdin {
            container_id: container_id.into(),
            exec_id: exec_id.map(Into::into),
            data: base64::engine::general_purpose::STANDARD.encode(data),
            close,
        };
        match self.call(&request)? {
            Response::Written { bytes } => Ok(bytes),
            other => Err(unexpected(other)),
        }
    }

    /// `ResizeTerminal`.
    pub fn resize_terminal(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        self.done(&Request::ResizeTerminal {
            container_id: container_id.into(),
            exec_id: exec_id.map(Into::into),
            rows,
            cols,
        })
    }

    /// `DeleteContainer`.
    pub fn delete_container(&mut self, container_id: &str) -> Result<(), ClientError> {
        self.done(&Request::DeleteContainer { container_id: container_id.into() })
    }

    /// `LoadFragment`: the signed fragment bytes, its signature and the
    /// issuer's SPKI DER key; returns the agent's `FragmentLoaded` answer.
    pub fn load_fragment(
        &mut self,
        fragment: &[u8],
        signature: &[u8],
        public_key: &[u8],
    ) -> Result<FragmentLoaded, ClientError> {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let request =
            Request::LoadFragment { fragment: b64(fragment), signature: b64(signature), public_key: b64(public_key) };
        match self.call(&request)? {
            Response::FragmentLoaded { issuer, feed, svn, containers } => {
                Ok(FragmentLoaded { issuer, feed, svn, containers })
            }
            other => Err(unexpected(other)),
        }
    }
}

/// The error for an answer of the wrong kind (an agent's error as itself).
pub(crate) fn unexpected(response: Response) -> ClientError {
    match response {
        Response::Error(err) => ClientError::Agent(err),
        other => ClientError::Unexpected(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_addresses() {
        assert_eq!("/tmp/c.sock".parse(), Ok(Control::Unix("/tmp/c.sock".into())));
        assert_eq!("vsock:3".parse(), Ok(Control::Vsock { cid: 3, port: 1024 }));
        assert_eq!("vsock:3:99".parse(), Ok(Control::Vsock { cid: 3, port: 99 }));
        assert!("vsock:x".parse::<Control>().is_err());
        assert!("vsock:3:".parse::<Control>().is_ok());
        assert!("vsock:3:y".parse::<Control>().is_err());
        let uds = |path: &str, port| Control::VsockUds { path: PathBuf::from(path), port };
        assert_eq!("vsock-uds:/run/v.sock".parse(), Ok(uds("/run/v.sock", 1024)));
        assert_eq!("vsock-uds:/run/v.sock:77".parse(), Ok(uds("/run/v.sock", 77)));
        assert_eq!("vsock-uds:/a:b/v.sock".parse(), Ok(uds("/a:b/v.sock", 1024)));
        assert!("vsock-uds:".parse::<Control>().is_err());
        assert_eq!(uds("/v", 5).to_string(), "vsock-uds:/v:5");
    }

    #[test]
    fn skips_stale_answers_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut decoder = Decoder::new();
            let mut buf = [0u8; 1024];
            let id = loop {
                let n = conn.read(&mut buf).unwrap();
                decoder.push(&buf[..n]);
                if let Some(frame) = decoder.next_frame() {
                    break frame.unwrap().id;
                }
            };
            // A stale answer first, then the real one; then silence.
            conn.write_all(&parma_protocol::encode_response(id.wrapping_add(1000), &Response::ShuttingDown)).unwrap();
            conn.write_all(&parma_protocol::encode_response(id, &Response::ShuttingDown)).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut client = Client::connect(&Control::Unix(path), Duration::from_millis(200)).unwrap();
        client.shutdown().unwrap();
        assert!(matches!(client.ping(), Err(ClientError::Timeout(_))));
        server.join().unwrap();
    }

    #[test]
    fn an_answer_to_a_request_sent_aside_is_kept_until_collected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut decoder = Decoder::new();
            let mut buf = [0u8; 1024];
            let mut next_id = |conn: &mut std::os::unix::net::UnixStream| loop {
                if let Some(frame) = decoder.next_frame() {
                    break frame.unwrap().id;
                }
                let n = conn.read(&mut buf).unwrap();
                decoder.push(&buf[..n]);
            };
            let pong = Response::Pong(parma_protocol::PingInfo {
                protocol_version: parma_protocol::VERSION,
                agent_version: "test".into(),
                kernel_release: "test".into(),
                uptime_ms: 0,
            });
            let answer = |conn: &mut std::os::unix::net::UnixStream, id, response: &Response| {
                conn.write_all(&parma_protocol::encode_response(id, response)).unwrap();
            };
            // The aside's answer comes while the ping waits for its own.
            let (aside, ping) = (next_id(&mut conn), next_id(&mut conn));
            answer(&mut conn, aside, &Response::Done);
            answer(&mut conn, ping, &pong);
            // Another comes later than the first look.
            let later = next_id(&mut conn);
            std::thread::sleep(Duration::from_millis(200));
            answer(&mut conn, later, &Response::Done);
            // A forgotten one's answer is skipped by the next call.
            let (forgotten, ping) = (next_id(&mut conn), next_id(&mut conn));
            answer(&mut conn, forgotten, &Response::Done);
            answer(&mut conn, ping, &pong);
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut client = Client::connect(&Control::Unix(path), Duration::from_secs(5)).unwrap();
        let aside = client.send_aside(&Request::GuestInfo).unwrap();
        client.ping().unwrap();
        assert!(matches!(client.answer(aside, Duration::ZERO), Ok(Some(Response::Done))));
        assert!(matches!(client.answer(aside, Duration::ZERO), Err(ClientError::NotAside(_))));
        let later = client.send_aside(&Request::GuestInfo).unwrap();
        assert!(matches!(client.answer(later, Duration::from_millis(1)), Ok(None)));
        assert!(matches!(client.answer(later, Duration::from_secs(5)), Ok(Some(Response::Done))));
        let forgotten = client.send_aside(&Request::GuestInfo).unwrap();
        client.forget(forgotten);
        client.ping().unwrap();
        assert!(matches!(client.answer(forgotten, Duration::ZERO), Err(ClientError::NotAside(_))));
        server.join().unwrap();
    }
}
