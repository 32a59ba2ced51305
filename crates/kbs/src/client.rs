//! The client side of the KBS exchange (feature `client`): what the agent
//! runs for `ProvisionSecret`, over any byte stream ([`Dial`]).
//!
//! TLS runs inside the client, and the broker's certificate is accepted
//! only if its SHA-256 is the pinned one, so whoever carries the stream
//! (the host, for the agent) reads and changes nothing. Then, one request
//! per stream (`Connection: close`):
//!
//! 1. `POST /kbs/v0/auth` `{"version": "0.4.0", "tee": "snp"}`: a nonce and
//!    the session cookie;
//! 2. a fresh P-256 TEE key; a report whose REPORT_DATA is the SHA-384 of
//!    the runtime data `{nonce, tee-pubkey}` as Trustee computes it
//!    ([`crate::binding`]); `POST /kbs/v0/attest` with the evidence;
//! 3. `GET /kbs/v0/resource/REPO/TYPE/TAG`: a JWE for the TEE key, opened
//!    here.
//!
//! Every read is bounded (headers 16 KiB, bodies 2 MiB).

use std::io::{Read, Write};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::types::{Attestation, Challenge, CompositeEvidence, Request, RuntimeData, Tee};

/// The most header bytes a broker's answer may have.
const MAX_HEAD: usize = 16 * 1024;
/// The most body bytes a broker's answer may have.
const MAX_BODY: usize = 2 << 20;

/// How the client reaches the broker: one fresh byte stream per request
/// (the agent: a vsock stream the host relays; tests: TCP).
pub trait Dial {
    /// The stream TLS runs over.
    type Stream: Read + Write;
    /// A new stream to the broker.
    fn dial(&self) -> Result<Self::Stream, String>;
    /// Bound each read and write on `stream` to `limit` (the client keeps
    /// this at the time left to the exchange's deadline, so a stream that
    /// dribbles bytes cannot stretch it).
    fn set_timeout(stream: &Self::Stream, limit: std::time::Duration) -> std::io::Result<()>;
}

pub use crate::EXCHANGE_DEADLINE;

/// A dialed stream whose every read and write waits at most until the
/// exchange's deadline.
struct Deadlined<D: Dial> {
    stream: D::Stream,
    deadline: std::time::Instant,
}

impl<D: Dial> Deadlined<D> {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the exchange took over {} s", EXCHANGE_DEADLINE.as_secs()),
            ));
        }
        D::set_timeout(&self.stream, left)
    }
}

impl<D: Dial> Read for Deadlined<D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl<D: Dial> Write for Deadlined<D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.arm()?;
        self.stream.flush()
    }
}

/// A broker as the policy lists it.
#[derive(Debug, Clone)]
pub struct Broker {
    /// The TLS server name (the URL's host).
    pub host: String,
    /// SHA-256 of its certificate (DER).
    pin: [u8; 32],
}

impl Broker {
    /// A broker from its URL (`https://HOST[:PORT]`, nothing after) and the
    /// hex SHA-256 of its certificate.
    pub fn new(url: &str, certificate_sha256: &str) -> Result<Self, String> {
        let host = crate::url::parse(url)?.host;
        let pin = hex::decode(certificate_sha256)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or("the broker's certificate pin is not 64 hex digits")?;
        if certificate_sha256.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("the broker's certificate pin is not lowercase hex".into());
        }
        Ok(Self { host, pin })
    }
}

pub use crate::check_resource;

/// A report binding REPORT_DATA: its bytes (the agent's provider).
pub type Reporter<'a> = dyn Fn(&[u8; 64]) -> Result<Vec<u8>, String> + 'a;

/// Fetch `resource` from `broker` through `dial`, attesting with a report
/// from `report`.
pub fn fetch<D: Dial>(
    dial: &D,
    broker: &Broker,
    resource: &str,
    report: &Reporter<'_>,
) -> Result<Zeroizing<Vec<u8>>, String> {
    check_resource(resource)?;
    let deadline = std::time::Instant::now() + EXCHANGE_DEADLINE;
    let request =
        Request { version: crate::PROTOCOL_VERSION.into(), tee: Tee::Snp, extra_params: serde_json::json!({}) };
    let body = serde_json::to_vec(&request).map_err(|err| err.to_string())?;
    let auth = exchange(dial, deadline, broker, "POST", "/kbs/v0/auth", None, Some(&body))?;
    auth.expect_ok("auth")?;
    let cookie = auth.session.clone().ok_or("the broker's auth answer set no kbs-session-id cookie")?;
    let challenge: Challenge =
        serde_json::from_slice(&auth.body).map_err(|err| format!("the broker's challenge does not parse: {err}"))?;
    if challenge.nonce.is_empty() || challenge.nonce.len() > 1024 {
        return Err("the broker's nonce is empty or over 1 KiB".into());
    }
    match challenge.extra_params.get("selected-hash-algorithm").and_then(|v| v.as_str()) {
        None => {}
        Some(name) if name.eq_ignore_ascii_case("sha384") => {}
        Some(other) => return Err(format!("the broker selects {other:?}; the agent binds with SHA-384 only")),
    }

    let key = crate::key::TeeKey::generate();
    let tee_pubkey = key.public_jwk();
    let runtime = crate::binding::runtime_data(&challenge.nonce, &tee_pubkey);
    let report_data = crate::binding::report_data(&runtime).map_err(|err| err.to_string())?;
    let evidence = crate::evidence::snp(&report(&report_data)?).map_err(|err| err.to_string())?;
    let attestation = Attestation {
        init_data: None,
        runtime_data: RuntimeData { nonce: challenge.nonce, tee_pubkey },
        tee_evidence: CompositeEvidence { primary_evidence: evidence, additional_evidence: String::new() },
    };
    let body = serde_json::to_vec(&attestation).map_err(|err| err.to_string())?;
    exchange(dial, deadline, broker, "POST", "/kbs/v0/attest", Some(&cookie), Some(&body))?.expect_ok("attest")?;
    let path = format!("/kbs/v0/resource/{resource}");
    let answer = exchange(dial, deadline, broker, "GET", &path, Some(&cookie), None)?;
    answer.expect_ok("resource")?;
    crate::jwe::open(&answer.body, &key).map_err(|err| err.to_string())
}

/// A broker's answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The `kbs-session-id` cookie it set, as `kbs-session-id=VALUE`.
    session: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn expect_ok(&self, step: &str) -> Result<(), String> {
        if self.status == 200 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.body);
        let shown = text.get(..text.floor_char_boundary(300)).unwrap_or_default();
        Err(format!("the broker refused {step} with HTTP {}: {shown}", self.status))
    }
}

/// One request on a connection of its own.
fn exchange<D: Dial>(
    dial: &D,
    deadline: std::time::Instant,
    broker: &Broker,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Answer, String> {
    let socket = Deadlined::<D> { stream: dial.dial()?, deadline };
    let name = rustls::pki_types::ServerName::try_from(broker.host.clone())
        .map_err(|err| format!("the broker's host is no TLS name: {err}"))?;
    let connection = rustls::ClientConnection::new(tls_config(broker.pin)?, name)
        .map_err(|err| format!("TLS to the broker: {err}"))?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    let host = if broker.host.contains(':') { format!("[{}]", broker.host) } else { broker.host.clone() };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(cookie) = cookie {
        head.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).map_err(|err| tls_error("send to", &err))?;
    if let Some(body) = body {
        tls.write_all(body).map_err(|err| tls_error("send to", &err))?;
    }
    tls.flush().map_err(|err| tls_error("send to", &err))?;
    read_answer(&mut tls, deadline)
}

fn tls_error(doing: &str, err: &std::io::Error) -> String {
    format!("cannot {doing} the broker: {err}")
}

/// Read an HTTP/1.1 answer: head, then a body by Content-Length, chunks,
/// or to the end.
fn read_answer(stream: &mut impl Read, deadline: std::time::Instant) -> Result<Answer, String> {
    let read_some = |stream: &mut dyn Read, chunk: &mut [u8]| {
        if std::time::Instant::now() > deadline {
            return Err(format!("the exchange took over {} s", EXCHANGE_DEADLINE.as_secs()));
        }
        stream.read(chunk).map_err(|err| tls_error("read from", &err))
    };
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buffer.len() > MAX_HEAD {
            return Err("the broker's answer head is over 16 KiB".into());
        }
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err("the broker closed before its answer's head ended".into());
        }
        buffer.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let head = std::str::from_utf8(buffer.get(..head_end).unwrap_or_default())
        .map_err(|_| "the broker's answer head is not UTF-8")?
        .to_string();
    let mut rest = buffer.get(head_end + 4..).unwrap_or_default().to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "the broker's answer has no HTTP/1 status line".to_string())?;
    let (mut length, mut chunked, mut session) = (None, false, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<usize>().map_err(|_| "a bad Content-Length")?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "set-cookie" => {
                let pair = value.split(';').next().unwrap_or_default().trim();
                if pair.starts_with(&format!("{}=", crate::SESSION_COOKIE)) && pair.len() <= 512 {
                    session = Some(pair.to_string());
                }
            }
            _ => {}
        }
    }
    if length.is_some_and(|n| n > MAX_BODY) {
        return Err("the broker's answer is over 2 MiB".into());
    }
    // Read to the end (the connection is closed after one answer), bounded.
    loop {
        if let Some(n) = length
            && rest.len() >= n
        {
            rest.truncate(n);
            break;
        }
        if rest.len() > MAX_BODY * 2 {
            return Err("the broker's answer is over 2 MiB".into());
        }
        // Only a clean end (TLS's close_notify) ends a body without a length.
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            if length.is_some() {
                return Err("the broker closed before the answer's body ended".into());
            }
            break;
        }
        rest.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let body = if chunked { dechunk(&rest)? } else { rest };
    if body.len() > MAX_BODY {
        return Err("the broker's answer is over 2 MiB".into());
    }
    Ok(Answer { status, session, body })
}

/// A chunked body's bytes.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let at = data.windows(2).position(|w| w == b"\r\n").ok_or("a chunk without its size line")?;
        let line = std::str::from_utf8(data.get(..at).unwrap_or_default()).map_err(|_| "a chunk size is not text")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
            .map_err(|_| "a chunk size is not hex")?;
        data = data.get(at + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        let bytes = data.get(..size).ok_or("a chunk is cut short")?;
        out.extend_from_slice(bytes);
        if out.len() > MAX_BODY {
            return Err("the broker's answer is over 2 MiB".into());
        }
        data = data.get(size + 2..).ok_or("a chunk is cut short")?;
    }
}

/// TLS that accepts exactly the pinned certificate (its signatures over
/// the handshake checked with the certificate's key, as usual).
fn tls_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned { pin, provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The broker's certificate, by its SHA-256.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            let _ = seen;
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_and_pins() {
        let pin = "ab".repeat(32);
        assert_eq!(Broker::new("https://kbs.example:8080", &pin).unwrap().host, "kbs.example");
        assert_eq!(Broker::new("https://10.0.0.1", &pin).unwrap().host, "10.0.0.1");
        assert_eq!(Broker::new("https://[::1]:443", &pin).unwrap().host, "::1");
        assert_eq!(Broker::new("https://[::1]", &pin).unwrap().host, "::1");
        assert!(Broker::new("https://[::1]x", &pin).is_err());
        assert!(Broker::new("https://[::1", &pin).is_err());
        for bad in ["http://kbs.example", "https://", "https://kbs.example:port", "https://kbs/x", "https://a b"] {
            assert!(Broker::new(bad, &pin).is_err(), "{bad}");
        }
        assert!(Broker::new("https://kbs.example", "ab").is_err());
        assert!(Broker::new("https://kbs.example", &"AB".repeat(32)).is_err());
    }

    #[test]
    fn resources_are_three_plain_parts() {
        assert!(check_resource("default/db/password").is_ok());
        for bad in ["default/db", "a/b/c/d", "../b/c", "a//c", "a/b/c?x", "a/b/ c", "./b/c"] {
            assert!(check_resource(bad).is_err(), "{bad}");
        }
    }

    fn far() -> std::time::Instant {
        std::time::Instant::now() + EXCHANGE_DEADLINE
    }

    struct Tcp(std::net::SocketAddr);

    impl Dial for Tcp {
        type Stream = std::net::TcpStream;
        fn dial(&self) -> Result<Self::Stream, String> {
            std::net::TcpStream::connect(self.0).map_err(|err| err.to_string())
        }
        fn set_timeout(stream: &Self::Stream, limit: std::time::Duration) -> std::io::Result<()> {
            stream.set_read_timeout(Some(limit))?;
            stream.set_write_timeout(Some(limit))
        }
    }

    #[test]
    fn a_silent_stream_ends_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dial = Tcp(listener.local_addr().unwrap());
        let soon = std::time::Instant::now() + std::time::Duration::from_millis(300);
        let mut stream = Deadlined::<Tcp> { stream: dial.dial().unwrap(), deadline: soon };
        let _held = listener.accept().unwrap();
        let started = std::time::Instant::now();
        let mut byte = [0u8; 1];
        // The read waits only for the time left, then every call is refused.
        assert!(stream.read(&mut byte).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let err = stream.read(&mut byte).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(stream.write(b"x").is_err());
    }

    #[test]
    fn a_dribbling_broker_meets_the_deadline() {
        let past = std::time::Instant::now() - std::time::Duration::from_secs(1);
        let err = read_answer(&mut &b"HTTP/1.1 200 OK\r\n\r\nbody"[..], past).unwrap_err();
        assert!(err.contains("took over 90 s"), "{err}");
    }

    #[test]
    fn answers_parse_with_bounds() {
        let plain = b"HTTP/1.1 200 OK\r\nSet-Cookie: kbs-session-id=abc; Path=/\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        let answer = read_answer(&mut &plain[..], far()).unwrap();
        assert_eq!(
            (answer.status, answer.session.as_deref(), &answer.body[..]),
            (200, Some("kbs-session-id=abc"), &b"hello"[..])
        );
        let chunked =
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let answer = read_answer(&mut &chunked[..], far()).unwrap();
        assert_eq!((answer.status, answer.session, &answer.body[..]), (401, None, &b"abcde"[..]));
        let to_end = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(read_answer(&mut &to_end[..], far()).unwrap().body, b"all of it");
        let other_cookie = b"HTTP/1.1 200 OK\r\nSet-Cookie: other=1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read_answer(&mut &other_cookie[..], far()).unwrap().session, None);
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert!(read_answer(&mut &short[..], far()).is_err());
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n";
        assert!(read_answer(&mut &huge[..], far()).is_err());
        let endless_head = vec![b'a'; MAX_HEAD + 10];
        assert!(read_answer(&mut &endless_head[..], far()).is_err());
        assert!(read_answer(&mut &b"SMTP ready\r\n\r\n"[..], far()).is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"10\r\nabc").is_err());
    }
}
