//! A container's own attestation endpoint.
//!
//! A container whose policy entry says `allow_attestation` gets a unix
//! socket at [`IN_CONTAINER`] (bound from the agent's [`DIR`] onto the
//! container's own `/dev` tmpfs, so no path of the image decides where it
//! lands); other containers get nothing there. Through it the container
//! asks for a report binding data of its own:
//!
//! ```text
//! GET /report?data=HEX HTTP/1.1     (HEX: 0 to 64 bytes, zero padded)
//! ```
//!
//! and gets `{"report", "report_data", "container", "data", "provider"}`,
//! where REPORT_DATA is the container domain's binding of the data and
//! the container's name in the policy (`parma_snp::report_data`), or
//! `{"error": {"code", "message"}}` with a 4xx or 5xx status. `curl
//! --unix-socket /dev/parma/attestation.sock http://parma/report?data=...`
//! is a client.
//!
//! Who asks is never taken from the request: it is the container whose
//! endpoint the connection came to, and the caller must be in that
//! container's cgroup (read from `/proc/PID/cgroup` of the process that
//! connected, through its pidfd), so a process of another container that
//! reached the socket is refused. Every call is
//! decided at `container_attestation` with the container's id from the
//! agent's records; the name bound is the one the policy matched at
//! create. Requests are bounded (8 KiB, 5 s), each container has at most
//! [`MAX_CONNECTIONS`] in flight and all of them [`MAX_SIGNING`] reports
//! being made. A container with an endpoint may not share the pod's PID
//! namespace: a neighbour with its user could trace its processes and
//! have them ask.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::dispatch::Dispatcher;
use crate::fault::Fault;

/// Where the agent keeps the containers' sockets (never inside a container).
pub const DIR: &str = "/run/parma/attestation";
/// Where a container finds its endpoint.
pub const IN_CONTAINER_DIR: &str = "/dev/parma";
/// The endpoint's path inside the container.
pub const IN_CONTAINER: &str = "/dev/parma/attestation.sock";
/// Connections one container may have in flight; more are refused.
const MAX_CONNECTIONS: usize = 2;
/// Reports being made for all containers at once (each takes a thread of
/// the agent's blocking pool, which host requests use too).
const MAX_SIGNING: usize = 4;
/// The longest request head the endpoint reads.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a caller has to send its request, and to read the answer.
const IO_DEADLINE: Duration = Duration::from_secs(5);

/// The endpoints of this boot's containers.
#[derive(Debug)]
pub struct Endpoints {
    open: BTreeMap<String, Endpoint>,
    /// Tells endpoints apart across a container id used again.
    serial: u64,
    /// The runtime and the dispatcher the endpoints serve with (absent in
    /// unit tests, which open none).
    serving: Option<(tokio::runtime::Handle, Weak<Dispatcher>)>,
    /// [`MAX_SIGNING`] permits, shared by every endpoint.
    signing: Arc<Semaphore>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self { open: BTreeMap::new(), serial: 0, serving: None, signing: Arc::new(Semaphore::new(MAX_SIGNING)) }
    }
}

#[derive(Debug)]
struct Endpoint {
    serial: u64,
    /// The container's name in the policy, as `create_container` matched it.
    name: String,
    path: PathBuf,
    task: tokio::task::AbortHandle,
}

/// The caller, as the agent's records name it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The container's id.
    pub id: String,
    /// Its name in the policy.
    pub name: String,
    serial: u64,
}

impl Endpoints {
    /// Endpoints served on this runtime for this dispatcher.
    pub fn serving(handle: tokio::runtime::Handle, dispatcher: Weak<Dispatcher>) -> Self {
        Self { serving: Some((handle, dispatcher)), ..Self::default() }
    }

    /// Open container `id`'s endpoint (`name`: its policy entry's); the
    /// agent-side socket path to bind into the container.
    pub fn open(&mut self, id: &str, name: &str) -> Result<String, Fault> {
        let (handle, dispatcher) = self
            .serving
            .clone()
            .ok_or_else(|| Fault::from("internal error: no runtime serves endpoints".to_string()))?;
        self.close(id);
        std::fs::create_dir_all(DIR).map_err(|err| format!("cannot create {DIR}: {err}"))?;
        std::fs::set_permissions(DIR, std::fs::Permissions::from_mode(0o700))
            .map_err(|err| format!("cannot restrict {DIR}: {err}"))?;
        self.serial = self.serial.wrapping_add(1);
        let path = PathBuf::from(format!("{DIR}/{}.sock", self.serial));
        let _ = std::fs::remove_file(&path);
        let _guard = handle.enter();
        let listener = UnixListener::bind(&path).map_err(|err| format!("cannot bind {}: {err}", path.display()))?;
        // Any user of the container may ask; only the container reaches it.
        if let Err(err) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)) {
            let _ = std::fs::remove_file(&path);
            return Err(format!("cannot open {} to the container: {err}", path.display()).into());
        }
        let caller = Caller { id: id.to_string(), name: name.to_string(), serial: self.serial };
        let task = handle.spawn(serve(listener, caller, dispatcher, self.signing.clone())).abort_handle();
        let shown = path.to_string_lossy().into_owned();
        self.open.insert(id.to_string(), Endpoint { serial: self.serial, name: name.to_string(), path, task });
        Ok(shown)
    }

    /// Close container `id`'s endpoint, if it has one: no new connection
    /// is taken, and one in flight is refused at its decision.
    pub fn close(&mut self, id: &str) {
        if let Some(endpoint) = self.open.remove(id) {
            endpoint.task.abort();
            let _ = std::fs::remove_file(&endpoint.path);
        }
    }

    /// Whether `caller`'s endpoint is still the one open for its container.
    pub fn current(&self, caller: &Caller) -> bool {
        self.open.get(&caller.id).is_some_and(|open| open.serial == caller.serial && open.name == caller.name)
    }
}

/// The container's name in the policy from `create_container`'s decision:
/// the record it adds for `id`.
pub fn policy_name(decisions: &[parma_policy::Decision], id: &str) -> Option<String> {
    decisions.iter().flat_map(|decision| &decision.ops).find_map(|op| {
        let value = op.value.as_ref()?;
        (op.name == "containers" && op.key == id).then(|| value.get("name")?.as_str().map(str::to_string))?
    })
}

/// Take connections until the endpoint is closed.
async fn serve(listener: UnixListener, caller: Caller, dispatcher: Weak<Dispatcher>, signing: Arc<Semaphore>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::debug!("attestation endpoint of {:?}: accept: {err}", caller.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Answered without reading: the connection is closed at once.
            tokio::spawn(async move {
                let mut stream = stream;
                let answer = Answer::error(503, "busy", "too many requests in flight: try again");
                let _ = tokio::time::timeout(IO_DEADLINE, answer.write(&mut stream)).await;
            });
            continue;
        };
        let (caller, dispatcher, signing) = (caller.clone(), dispatcher.clone(), signing.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection(stream, caller, dispatcher, signing).await;
        });
    }
}

/// One request and its answer.
async fn connection(mut stream: UnixStream, caller: Caller, dispatcher: Weak<Dispatcher>, signing: Arc<Semaphore>) {
    let peer = peer_cgroup(&stream);
    let answer = match tokio::time::timeout(IO_DEADLINE, read_head(&mut stream)).await {
        Err(_) => Answer::error(408, "invalid_argument", "no complete request in 5 s"),
        Ok(Err(answer)) => answer,
        Ok(Ok(head)) => match parse(&head) {
            Err(answer) => answer,
            Ok(data) => match tokio::time::timeout(IO_DEADLINE, signing.acquire_owned()).await {
                Ok(Ok(permit)) => {
                    let dispatcher = dispatcher.upgrade();
                    let asked = caller.clone();
                    let decided = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        match dispatcher {
                            Some(dispatcher) => dispatcher.container_report(&asked, peer, &data),
                            None => Err(Answer::error(503, "failed", "the agent is stopping")),
                        }
                    })
                    .await;
                    match decided {
                        Ok(Ok(report)) => Answer::ok(&report),
                        Ok(Err(answer)) => answer,
                        Err(err) => Answer::error(500, "failed", &format!("internal error: {err}")),
                    }
                }
                _ => Answer::error(503, "busy", "the agent is making other reports: try again"),
            },
        },
    };
    // Debug only: a container sending garbage in a loop must not flood the console.
    if answer.status != 200 {
        tracing::debug!("attestation endpoint of {:?}: {} {}", caller.id, answer.status, answer.body);
    }
    let _ = tokio::time::timeout(IO_DEADLINE, answer.write(&mut stream)).await;
}

/// The request head, up to its blank line.
async fn read_head(stream: &mut UnixStream) -> Result<Vec<u8>, Answer> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n =
            stream.read(&mut chunk).await.map_err(|err| Answer::error(400, "invalid_argument", &err.to_string()))?;
        let Some(read) = chunk.get(..n) else { return Err(Answer::error(500, "failed", "read past the buffer")) };
        if n == 0 {
            return Err(Answer::error(400, "invalid_argument", "the request ended before its blank line"));
        }
        head.extend_from_slice(read);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(Answer::error(431, "invalid_argument", "the request head is over 8 KiB"));
        }
    }
}

/// The data a request asks to bind: `GET /report[?data=HEX]`.
fn parse(head: &[u8]) -> Result<[u8; 64], Answer> {
    let bad = |message: &str| Answer::error(400, "invalid_argument", message);
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| bad("the request line is not UTF-8"))?.trim_end_matches('\r');
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad("the request line is not METHOD TARGET VERSION"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1 request"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/report" {
        return Err(Answer::error(404, "not_found", "the endpoint serves GET /report?data=HEX"));
    }
    if method != "GET" {
        return Err(Answer::error(405, "invalid_argument", "the endpoint serves GET only"));
    }
    let mut data = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("data", hex)) if data.is_none() => data = Some(hex),
            _ => return Err(bad("the query takes one parameter, data=HEX")),
        }
    }
    crate::attest::report_data_from_hex(data.unwrap_or_default()).map_err(|err| bad(&err))
}

/// The caller's cgroup (`0::PATH` of `/proc/PID/cgroup`, cgroup v2):
/// that of the process that connected, named by a pidfd the kernel took at
/// connect (`SO_PEERPIDFD`), so a PID used again by another process is
/// never read in its place; `None` if it cannot be told.
fn peer_cgroup(stream: &UnixStream) -> Option<String> {
    let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok()?;
    let pid = pidfd_pid(&pidfd)?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // The pidfd's process still holds the PID (a reaped one reads -1), so
    // the file read was its own.
    if pidfd_pid(&pidfd) != Some(pid) {
        return None;
    }
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string)
}

/// The PID (in the agent's namespace) of a pidfd's live process.
fn pidfd_pid(pidfd: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let pid: i32 = info.lines().find_map(|line| line.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// A report for the caller.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The report, in hex.
    pub report: String,
    /// Its REPORT_DATA, in hex.
    pub report_data: String,
    /// The container's name in the policy.
    pub container: String,
    /// The caller's data as bound (64 bytes, in hex).
    pub data: String,
    /// Where the report came from (`sev-guest`, `insecure-emulation`).
    pub provider: String,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn ok(report: &Report) -> Self {
        match serde_json::to_string(report) {
            Ok(body) => Self { status: 200, body },
            Err(err) => Self::error(500, "failed", &err.to_string()),
        }
    }

    /// An error answer: `{"error": {"code", "message"}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
        Self { status, body }
    }

    async fn write(&self, stream: &mut UnixStream) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(self.body.as_bytes()).await?;
        stream.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(result: Result<[u8; 64], Answer>) -> u16 {
        result.err().map_or(200, |answer| answer.status)
    }

    #[test]
    fn requests_parse_strictly() {
        let data = parse(b"GET /report?data=abcd HTTP/1.1\r\nHost: parma\r\n\r\n").unwrap();
        assert_eq!(&data[..3], &[0xab, 0xcd, 0]);
        assert_eq!(parse(b"GET /report HTTP/1.0\r\n\r\n").unwrap(), [0; 64]);
        assert_eq!(status(parse(b"POST /report HTTP/1.1\r\n\r\n")), 405);
        assert_eq!(status(parse(b"GET /reports HTTP/1.1\r\n\r\n")), 404);
        assert_eq!(status(parse(b"GET /report?data=ab&data=cd HTTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET /report?container=web HTTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET /report?data=zz HTTP/1.1\r\n\r\n")), 400);
        let long = format!("GET /report?data={} HTTP/1.1\r\n\r\n", "00".repeat(65));
        assert_eq!(status(parse(long.as_bytes())), 400);
        assert_eq!(status(parse(b"GET /report HTTP/2\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET  /report HTTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(parse(b"\xff\xfe\r\n\r\n")), 400);
    }

    #[test]
    fn the_name_comes_from_the_create_decision() {
        let op = |key: &str, name: &str| parma_policy::MetadataOp {
            name: "containers".into(),
            action: parma_policy::Action::Add,
            key: key.into(),
            value: Some(serde_json::json!({"name": name, "status": "created"})),
        };
        let decision = parma_policy::Decision {
            point: parma_policy::Point::CreateContainer,
            allowed: true,
            ops: vec![op("other", "db"), op("c1", "web")],
            allow_stdio_access: false,
            allow_attestation: true,
            denial: None,
        };
        assert_eq!(policy_name(std::slice::from_ref(&decision), "c1").as_deref(), Some("web"));
        assert_eq!(policy_name(&[decision], "c2"), None);
    }

    #[test]
    fn the_peer_is_the_process_that_connected() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = runtime.enter();
        let stream = UnixStream::from_std(theirs).unwrap();
        let pidfd = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerPidfd).unwrap();
        assert_eq!(pidfd_pid(&pidfd), Some(i32::try_from(std::process::id()).unwrap()));
        drop(ours);
    }

    #[test]
    fn a_reaped_peer_has_no_pid() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pid = rustix::process::Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        assert_eq!(pidfd_pid(&pidfd), Some(i32::try_from(child.id()).unwrap()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_pid(&pidfd), None, "its PID may be someone else's now");
    }

    #[test]
    fn a_closed_endpoint_is_not_current() {
        let endpoints = Endpoints::default();
        let caller = Caller { id: "c1".into(), name: "web".into(), serial: 1 };
        assert!(!endpoints.current(&caller));
    }
}
