//! A TEST FIXTURE, not a product: a key broker that speaks the endpoints
//! of Trustee's KBS attestation protocol 0.4.0 (`/kbs/v0/auth`,
//! `/kbs/v0/attest`, `/kbs/v0/resource/REPO/TYPE/TAG`) over TLS on
//! loopback, and checks evidence with `parma-snp` as a relying party
//! would: the report's signature against its chain (the emulation test
//! chain only when built with [`Config::insecure_emulation`]), its
//! MEASUREMENT and HOST_DATA against what it expects, and REPORT_DATA
//! against the binding of the session's nonce and the TEE key it computes
//! itself. The production path targets Trustee.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use parma_kbs::types::{Attestation, Request, TeePubKey};
use sha2::{Digest, Sha256};

/// What the broker holds and expects.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Resources by `REPO/TYPE/TAG`.
    pub resources: BTreeMap<String, Vec<u8>>,
    /// The MEASUREMENT a report must have (none: any).
    pub measurement: Option<[u8; 48]>,
    /// The HOST_DATA a report must have (none: any).
    pub host_data: Option<[u8; 32]>,
    /// INSECURE: accept reports signed by the emulation's test chain.
    pub insecure_emulation: bool,
    /// Say nothing on a new connection for this long first (a slow broker).
    pub hold: Option<Duration>,
}

/// One session, by its cookie.
#[derive(Debug, Clone)]
struct Session {
    nonce: String,
    /// The nonce was used by an `attest` (one try per challenge).
    used: bool,
    /// The TEE key once the evidence passed.
    attested: Option<TeePubKey>,
}

#[derive(Debug, Default)]
struct State {
    sessions: BTreeMap<String, Session>,
    /// What happened, one line per request, for the test to read.
    log: Vec<String>,
    /// Resources released, by path.
    released: Vec<String>,
    /// Connections accepted.
    connections: usize,
}

/// A running broker; stops when dropped.
#[derive(Debug)]
pub struct Broker {
    address: SocketAddr,
    pin: String,
    state: Arc<Mutex<State>>,
    config: Arc<Mutex<Config>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Broker {
    /// Start on 127.0.0.1 with a fresh self-signed certificate for `name`.
    pub fn start(config: Config, name: &str) -> anyhow::Result<Self> {
        Self::start_on(config, name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Start on `bind` (in the network namespace of the calling thread).
    pub fn start_on(config: Config, name: &str, bind: SocketAddr) -> anyhow::Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
        let der = certified.cert.der().to_vec();
        let pin = hex::encode(Sha256::digest(&der));
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .map_err(|err| anyhow::anyhow!("the broker's key: {err}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(vec![rustls::pki_types::CertificateDer::from(der)], key)?,
        );
        let listener = TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let config = Arc::new(Mutex::new(config));
        let thread = {
            let (state, stop, config) = (state.clone(), stop.clone(), config.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Ok(mut state) = state.lock() {
                                state.connections += 1;
                            }
                            let (tls, state, config) = (tls.clone(), state.clone(), config.clone());
                            std::thread::spawn(move || {
                                if let Err(err) = serve(stream, tls, &state, &config)
                                    && let Ok(mut state) = state.lock()
                                {
                                    state.log.push(format!("connection: {err:#}"));
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Ok(Self { address, pin, state, config, stop, thread: Some(thread) })
    }

    /// Its TCP address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// SHA-256 of its certificate (DER), lowercase hex: the policy's pin.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// Expect this HOST_DATA from now on (a policy that pins this broker's
    /// certificate is hashed after the broker starts).
    pub fn expect_host_data(&self, host_data: [u8; 32]) {
        if let Ok(mut config) = self.config.lock() {
            config.host_data = Some(host_data);
        }
    }

    /// Hold each new connection this long before answering (none: answer at once).
    pub fn hold(&self, hold: Option<Duration>) {
        if let Ok(mut config) = self.config.lock() {
            config.hold = hold;
        }
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.state.lock().map(|state| state.connections).unwrap_or_default()
    }

    /// What it did, one line per request.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().map(|state| state.log.clone()).unwrap_or_default()
    }

    /// The resources it released.
    pub fn released(&self) -> Vec<String> {
        self.state.lock().map(|state| state.released.clone()).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// 24 random bytes in hex: session ids and nonces.
fn random_token() -> String {
    let mut bytes = [0u8; 24];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    hex::encode(bytes)
}

/// One HTTP request on one TLS connection.
fn serve(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    state: &Mutex<State>,
    config: &Mutex<Config>,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    let hold = config.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.hold;
    if let Some(hold) = hold {
        std::thread::sleep(hold);
    }
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let connection = rustls::ServerConnection::new(tls)?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let (method, path, cookie, body) = read_request(&mut tls)?;
    let (status, set_cookie, answer) = {
        let config = config.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        let mut state = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let outcome = route(&mut state, &config, &method, &path, cookie.as_deref(), &body);
        let line = format!("{method} {path}: {} {}", outcome.0, String::from_utf8_lossy(&outcome.2));
        state.log.push(line.chars().take(300).collect());
        outcome
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.len()
    );
    if let Some(cookie) = set_cookie {
        head.push_str(&format!("Set-Cookie: {}={cookie}; Path=/kbs/v0; Secure\r\n", parma_kbs::SESSION_COOKIE));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes())?;
    tls.write_all(&answer)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

/// Method, path, the session cookie's value and the body.
fn read_request(tls: &mut impl Read) -> anyhow::Result<(String, String, Option<String>, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        anyhow::ensure!(buffer.len() < 64 * 1024, "the request head is too long");
        let n = tls.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "the request ended early");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..end].to_vec())?;
    let mut body = buffer[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
    let (mut length, mut cookie) = (0usize, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse()?,
            "cookie" => {
                cookie = value
                    .split(';')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .find(|(name, _)| *name == parma_kbs::SESSION_COOKIE)
                    .map(|(_, value)| value.to_string());
            }
            _ => {}
        }
    }
    anyhow::ensure!(length <= 4 << 20, "the body is too long");
    while body.len() < length {
        let n = tls.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "the body ended early");
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok((method, path, cookie, body))
}

type Outcome = (u16, Option<String>, Vec<u8>);

fn error(status: u16, detail: &str) -> Outcome {
    let body =
        serde_json::json!({"type": "https://github.com/confidential-containers/kbs/errors/Test", "detail": detail});
    (status, None, body.to_string().into_bytes())
}

fn route(state: &mut State, config: &Config, method: &str, path: &str, cookie: Option<&str>, body: &[u8]) -> Outcome {
    match (method, path) {
        ("POST", "/kbs/v0/auth") => {
            let request: Request = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(err) => return error(400, &format!("not a KBS Request: {err}")),
            };
            if request.version != parma_kbs::PROTOCOL_VERSION {
                return error(401, &format!("protocol version {} is not 0.4.0", request.version));
            }
            if serde_json::to_value(request.tee).ok() != Some(serde_json::json!("snp")) {
                return error(401, "only snp is attested here");
            }
            let (session, nonce) = (random_token(), random_token());
            state.sessions.insert(session.clone(), Session { nonce: nonce.clone(), used: false, attested: None });
            let challenge = serde_json::json!({"nonce": nonce, "extra-params": {}});
            (200, Some(session), challenge.to_string().into_bytes())
        }
        ("POST", "/kbs/v0/attest") => {
            let Some(session) = cookie.and_then(|c| state.sessions.get_mut(c)) else {
                return error(401, "no session");
            };
            if session.used {
                return error(401, "the challenge was used: ask for a new one");
            }
            session.used = true;
            let attestation: Attestation = match serde_json::from_slice(body) {
                Ok(attestation) => attestation,
                Err(err) => return error(400, &format!("not a KBS Attestation: {err}")),
            };
            match check(config, &session.nonce, &attestation) {
                Ok(()) => {
                    session.attested = Some(attestation.runtime_data.tee_pubkey.clone());
                    let token = serde_json::json!({"token": format!("test-broker.{}", random_token())});
                    (200, None, token.to_string().into_bytes())
                }
                Err(err) => error(401, &format!("{err:#}")),
            }
        }
        ("GET", path) if path.starts_with("/kbs/v0/resource/") => {
            let Some(key) = cookie.and_then(|c| state.sessions.get(c)).and_then(|s| s.attested.clone()) else {
                return error(401, "not attested");
            };
            let resource = &path["/kbs/v0/resource/".len()..];
            let Some(value) = config.resources.get(resource) else {
                return error(404, &format!("no resource {resource}"));
            };
            match parma_kbs::jwe::seal(value, &key) {
                Ok(jwe) => {
                    state.released.push(resource.to_string());
                    (200, None, jwe.into_bytes())
                }
                Err(err) => error(400, &err.to_string()),
            }
        }
        _ => error(404, "no such endpoint"),
    }
}

/// The evidence as a relying party checks it.
fn check(config: &Config, nonce: &str, attestation: &Attestation) -> anyhow::Result<()> {
    anyhow::ensure!(attestation.runtime_data.nonce == nonce, "the nonce is not this session's");
    let runtime = parma_kbs::binding::runtime_data(nonce, &attestation.runtime_data.tee_pubkey);
    let bound = parma_kbs::binding::report_data(&runtime)?;
    let bytes = parma_kbs::evidence::report_bytes_of(&attestation.tee_evidence.primary_evidence)?;
    let report = parma_snp::AttestationReport::parse(&bytes).context("the report")?;
    let certs = tempfile::tempdir()?;
    parma_snp::emulation::test_chain(&parma_snp::emulation::AGENT_SEED)?.write_dir(certs.path())?;
    let expect = parma_snp::Expectations {
        measurement: config.measurement,
        host_data: config.host_data,
        report_data: Some(bound),
        allow_insecure_emulation: config.insecure_emulation,
        ..parma_snp::Expectations::default()
    };
    let verification = parma_snp::verify(&report, &parma_snp::CertSource::Dir(certs.path().into()), &expect)?;
    let failed: Vec<String> = verification.failed().map(|check| format!("{check:?}")).collect();
    anyhow::ensure!(failed.is_empty(), "the evidence fails: {}", failed.join("; "));
    Ok(())
}
