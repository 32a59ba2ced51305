//! Secrets released by a key broker speaking Trustee's KBS protocol
//! (0.4.0), against the test broker (`parma_tests::broker`, a fixture that
//! checks evidence with parma-snp; emulated reports only because it is
//! started with `insecure_emulation`):
//!
//! - the client and the broker on the host, with emulated reports: a
//!   report bound to the session passes; a host-domain report, a report
//!   for another nonce (replayed), another HOST_DATA or MEASUREMENT, and a
//!   swapped broker certificate do not;
//! - end to end under TCG: `ProvisionSecret` makes the agent run the
//!   exchange over vsock through the host's relay, and the container the
//!   policy lists starts with the secret in `/dev/parma/secrets/`; a
//!   container or resource the policy does not list is refused before any
//!   byte goes out; a broker with another certificate fails the TLS pin; a
//!   broker expecting another HOST_DATA refuses the evidence; the host's
//!   own report for the binding cannot pass; a broker that holds the
//!   exchange holds up no other request on the connection (the exchange
//!   runs aside, without the agent's lock), and the container does not
//!   start until it ends; a secret fetched for a container deleted and
//!   created again meanwhile reaches neither; 12 exchanges in a row (3
//!   times as many as run at once) leave no slot or mark behind;
//! - over the pod's own network instead (a CNI-style namespace, the broker
//!   in its peer), once the UVM is a pod.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, ensure};
use parma_host::policy_gen::{self, Knobs, Spec};
use parma_host::relay::Relay;
use parma_host::run;
use parma_kbs::client::{Broker as BrokerRef, Dial};
use parma_protocol::{ErrorCode, ProcessSpec, Request, Response};
use parma_snp::emulation::{AGENT_SEED, EmulatedFields, Signer};
use parma_tests::broker::{Broker, Config};
use parma_tests::{Boot, Guest, Paths, denied, oci, refused};
use serde_json::json;

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(120);
const RESOURCE: &str = "default/db/password";
const SECRET: &[u8] = b"correct horse battery staple";
const NAME: &str = "kbs.test";

/// TCP to the test broker (on the host; in the UVM the host relays vsock).
struct Tcp(std::net::SocketAddr);

impl Dial for Tcp {
    type Stream = TcpStream;
    fn dial(&self) -> Result<TcpStream, String> {
        TcpStream::connect(self.0).map_err(|err| err.to_string())
    }
    fn set_timeout(stream: &TcpStream, limit: Duration) -> std::io::Result<()> {
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))
    }
}

fn config(host_data: [u8; 32]) -> Config {
    Config {
        resources: BTreeMap::from([(RESOURCE.to_string(), SECRET.to_vec())]),
        host_data: Some(host_data),
        insecure_emulation: true,
        ..Config::default()
    }
}

fn url(broker: &Broker) -> String {
    format!("https://{NAME}:{}", broker.address().port())
}

#[test]
fn the_broker_releases_only_to_a_report_bound_to_its_session() -> anyhow::Result<()> {
    let host_data = [7u8; 32];
    let broker = Broker::start(config(host_data), NAME)?;
    let dial = Tcp(broker.address());
    let reference = BrokerRef::new(&url(&broker), broker.pin()).map_err(anyhow::Error::msg)?;
    let signer = Signer::from_seed(&AGENT_SEED);
    let sign = |report_data: [u8; 64], host_data: [u8; 32]| {
        zerocopy::IntoBytes::as_bytes(&signer.report(EmulatedFields {
            report_data,
            host_data,
            ..EmulatedFields::default()
        }))
        .to_vec()
    };
    // Bound to the session: released.
    let last = std::cell::RefCell::new(Vec::new());
    let bound = |report_data: &[u8; 64]| {
        let report = sign(*report_data, host_data);
        *last.borrow_mut() = report.clone();
        Ok(report)
    };
    let secret = parma_kbs::client::fetch(&dial, &reference, RESOURCE, &bound).map_err(anyhow::Error::msg)?;
    ensure!(secret.as_slice() == SECRET);
    // That report again, for the next session's nonce: stale.
    let replayed = |_: &[u8; 64]| Ok(last.borrow().clone());
    let err = parma_kbs::client::fetch(&dial, &reference, RESOURCE, &replayed).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401") && err.contains("ReportData"), "{err}");
    // What the host gets for the same binding: the host domain's value.
    let host =
        |report_data: &[u8; 64]| Ok(sign(parma_snp::report_data::Domain::Host.report_data(report_data), host_data));
    let err = parma_kbs::client::fetch(&dial, &reference, RESOURCE, &host).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401") && err.contains("ReportData"), "{err}");
    // Another HOST_DATA (another policy).
    let other = |report_data: &[u8; 64]| Ok(sign(*report_data, [8u8; 32]));
    let err = parma_kbs::client::fetch(&dial, &reference, RESOURCE, &other).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401") && err.contains("HostData"), "{err}");
    // A broker that expects another MEASUREMENT (another UVM).
    let pinned_uvm = Broker::start(Config { measurement: Some([1; 48]), ..config(host_data) }, NAME)?;
    let pinned_ref = BrokerRef::new(&url(&pinned_uvm), pinned_uvm.pin()).map_err(anyhow::Error::msg)?;
    let err = parma_kbs::client::fetch(&Tcp(pinned_uvm.address()), &pinned_ref, RESOURCE, &bound).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401") && err.contains("Measurement"), "{err}");
    // Another broker's certificate behind the same name: the pin fails.
    let impostor = Broker::start(config(host_data), NAME)?;
    let err = parma_kbs::client::fetch(&Tcp(impostor.address()), &reference, RESOURCE, &bound).unwrap_err();
    ensure!(err.contains("cannot send to the broker") || err.contains("invalid peer certificate"), "{err}");
    ensure!(impostor.released().is_empty() && broker.released() == [RESOURCE], "{:?}", broker.log());
    // A resource it does not hold.
    let err = parma_kbs::client::fetch(&dial, &reference, "default/db/other", &bound).unwrap_err();
    ensure!(err.contains("refused resource with HTTP 404"), "{err}");
    // Without the insecure flag the emulation's chain is no root.
    let strict = Broker::start(Config { insecure_emulation: false, ..config(host_data) }, NAME)?;
    let reference = BrokerRef::new(&url(&strict), strict.pin()).map_err(anyhow::Error::msg)?;
    let err = parma_kbs::client::fetch(&Tcp(strict.address()), &reference, RESOURCE, &bound).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401"), "{err}");
    Ok(())
}

/// `parma kbs relay` as an operator runs it; killed when dropped.
struct CliRelay(std::process::Child);

impl CliRelay {
    fn start(paths: &Paths, listen: &std::path::Path, broker: std::net::SocketAddr) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(listen);
        let child = std::process::Command::new(paths.repo.join("target/release/parma"))
            .args(["kbs", "relay", "--listen"])
            .arg(listen)
            .args(["--broker", &broker.to_string()])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("parma kbs relay (make image builds target/release/parma)")?;
        let relay = Self(child);
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while !listen.exists() {
            ensure!(std::time::Instant::now() < give_up, "parma kbs relay made no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(relay)
    }
}

impl Drop for CliRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long [`Staller`] holds each connection.
const STALL: Duration = Duration::from_secs(8);

/// A TCP listener that holds each connection, saying nothing, then closes it.
struct Staller {
    address: std::net::SocketAddr,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Staller {
    fn start(hold: Duration) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        let address = listener.local_addr()?;
        let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    std::thread::sleep(hold);
                    drop(stream);
                });
            }
        });
        Ok(Self { address, held })
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn create(id: &str, process: &ProcessSpec) -> Request {
    parma_tests::create_request(id, process, Vec::new())
}

fn provision(id: &str, url: &str, pin: &str, resource: &str, file: &str) -> Request {
    Request::ProvisionSecret {
        container_id: id.into(),
        broker_url: url.into(),
        broker_certificate_sha256: pin.into(),
        resource: resource.into(),
        file: file.into(),
        broker_address: None,
    }
}

#[test]
fn a_listed_container_starts_with_its_secret_and_nothing_else_gets_one() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    // The broker first: the policy pins its certificate, and it learns the
    // policy's hash (HOST_DATA) once the policy is written.
    let good = Broker::start(config([0; 32]), NAME)?;
    let reader = ["/bin/cat", "/dev/parma/secrets/db"];
    let entry = |name: &str, command: &[&str], secrets: serde_json::Value| json!({"name": name, "command": command, "user": {"uid": 1000, "gid": 1000}, "secrets": secrets, "signals": [9]});
    let fixture = oci::PolicyFixture::with_spec(&hello, entry("reader", &reader, json!([])))?;
    let spec = |value: serde_json::Value| -> anyhow::Result<Spec> { Ok(serde_json::from_value(value)?) };
    let listed = json!([{"broker": "good", "resource": RESOURCE, "file": "db"}]);
    let containers = [
        serde_json::to_value(policy_gen::container(&fixture.built, &spec(entry("reader", &reader, listed))?))?,
        serde_json::to_value(policy_gen::container(
            &fixture.built,
            &spec(entry("other", &["/bin/cat", "/etc/passwd"], json!([])))?,
        ))?,
    ];
    let brokers =
        serde_json::from_value(json!([{"name": "good", "url": url(&good), "certificate_sha256": good.pin()}]))?;
    let text = policy_gen::rego_with_fragments(&containers, &[], &Knobs { brokers, ..Knobs::default() }, "secrets")?;
    let policy = fixture.dir().join("secrets.rego");
    std::fs::write(&policy, &text)?;
    let host_data = parma_policy::Policy::from_bytes(text.clone().into_bytes())?.hash();
    good.expect_host_data(host_data);

    let mut boot = Boot::emulated_for_policy(&policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.vsock = true;
    let mut guest = Guest::boot(&paths, &boot)?;
    let relay_path = guest.vsock_host_port(parma_protocol::KBS_VSOCK_PORT).context("no vsock")?;
    let relay = Relay::start(&relay_path, good.address())?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(text.clone()).with_context(|| guest.serial())?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let process = |command: &[&str]| -> anyhow::Result<ProcessSpec> {
        let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        let mut process = run::process_from_config(&fixture.built.config, &args)?;
        (process.uid, process.gid, process.groups) = (1000, 1000, Vec::new());
        Ok(process)
    };
    let (url, pin) = (url(&good), good.pin().to_string());
    client.mount_overlay("a", &layers, true)?;
    client.created(&create("a", &process(&reader)?))?;

    // Refused by the policy before any byte goes out: another resource,
    // another file name, another pin, a container that lists none.
    let before = good.log().len();
    denied(client.done(&provision("a", &url, &pin, "default/db/other", "db")), "lists no secret")?;
    denied(client.done(&provision("a", &url, &pin, RESOURCE, "other")), "lists no secret")?;
    denied(client.done(&provision("a", &url, &"ab".repeat(32), RESOURCE, "db")), "lists no secret")?;
    client.mount_overlay("b", &layers, true)?;
    client.created(&create("b", &process(&["/bin/cat", "/etc/passwd"])?))?;
    denied(client.done(&provision("b", &url, &pin, RESOURCE, "db")), "lists no secret")?;
    let (code, message) = refused(client.done(&provision("a", &url, &pin, RESOURCE, "../db")))?;
    ensure!(code == ErrorCode::Malformed && message.contains("file name"), "{code}: {message}");
    ensure!(good.log().len() == before, "bytes went out: {:?}", good.log());

    // The host routes the exchange to another broker: the TLS pin fails.
    let impostor = Broker::start(config(host_data), NAME)?;
    drop(relay);
    let relay = Relay::start(&relay_path, impostor.address())?;
    let (code, message) = refused(client.done(&provision("a", &url, &pin, RESOURCE, "db")))?;
    ensure!(code == ErrorCode::Failed && message.contains("key broker exchange failed"), "{code}: {message}");
    ensure!(impostor.released().is_empty(), "{:?}", impostor.log());

    // A broker that holds the exchange (the host controls the route): the
    // agent fetches beside the connection's other requests and without
    // its lock, so they are answered meanwhile; the container does not
    // start before the fetch ends; the answer comes when the broker lets go.
    drop(relay);
    let staller = Staller::start(STALL)?;
    let relay = Relay::start(&relay_path, staller.address)?;
    // One more than runs aside at once is answered busy, at once.
    let asked = std::time::Instant::now();
    let mut asides = Vec::new();
    for _ in 0..=parma_protocol::MAX_ASIDE {
        asides.push(client.send_aside(&provision("a", &url, &pin, RESOURCE, "db"))?);
    }
    let (code, message) = refused(client.start_container("a"))?;
    ensure!(code == ErrorCode::WrongState && message.contains("secret being fetched"), "{code}: {message}");
    client.delete_container("b")?;
    let busy = asides.pop().context("no requests sent aside")?;
    let answer = client.answer(busy, Duration::from_secs(1))?;
    ensure!(matches!(&answer, Some(Response::Error(err)) if err.code == ErrorCode::Busy), "{answer:?}");
    let others = asked.elapsed();
    for aside in asides {
        let answer = loop {
            if let Some(answer) = client.answer(aside, Duration::from_secs(1))? {
                break answer;
            }
            ensure!(asked.elapsed() < CALL, "no answer to the held exchange within {CALL:?}");
        };
        ensure!(
            matches!(&answer, Response::Error(err) if err.message.contains("key broker exchange failed")),
            "{answer:?}"
        );
    }
    let answered = asked.elapsed();
    ensure!(staller.held() == parma_protocol::MAX_ASIDE, "{} exchanges reached the broker", staller.held());
    // The held exchanges ran at once, not one after another.
    ensure!(
        others < STALL && answered >= STALL && answered < STALL * 2,
        "the other requests took {others:?}, the held exchanges {answered:?} (the broker held each {STALL:?})"
    );
    // The right broker, expecting another HOST_DATA: the evidence is refused.
    // (From here the relay is the CLI's, `parma kbs relay`.)
    drop(relay);
    let relay = CliRelay::start(&paths, &relay_path, good.address())?;
    good.expect_host_data([9; 32]);
    let (_, message) = refused(client.done(&provision("a", &url, &pin, RESOURCE, "db")))?;
    ensure!(message.contains("refused attest with HTTP 401") && message.contains("HostData"), "{message}");
    ensure!(good.released().is_empty(), "{:?}", good.log());

    // As the policy says: released, in the container's file before it starts.
    good.expect_host_data(host_data);
    client.done(&provision("a", &url, &pin, RESOURCE, "db")).with_context(|| format!("{:?}", good.log()))?;
    ensure!(good.released() == [RESOURCE], "{:?}", good.log());
    client.start_container("a")?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(&mut client, "a", None, &mut stdout, &mut stderr, Duration::from_secs(120))?;
    ensure!(run::exit_code(&status) == 0, "{status:?} {}", String::from_utf8_lossy(&stderr));
    ensure!(stdout == SECRET, "the container read {:?}", String::from_utf8_lossy(&stdout));
    // Started: no more secrets.
    denied(client.done(&provision("a", &url, &pin, RESOURCE, "db")), "already started")?;

    // The host's own report for the broker's binding cannot pass: it is
    // in the host domain.
    let dial = Tcp(good.address());
    let reference = BrokerRef::new(&url, &pin).map_err(anyhow::Error::msg)?;
    let client_cell = std::cell::RefCell::new(&mut client);
    let hosts = |report_data: &[u8; 64]| {
        client_cell.borrow_mut().attestation(report_data).map(|(report, _)| report).map_err(|err| err.to_string())
    };
    let err = parma_kbs::client::fetch(&dial, &reference, RESOURCE, &hosts).unwrap_err();
    ensure!(err.contains("refused attest with HTTP 401") && err.contains("ReportData"), "{err}");
    ensure!(good.released() == [RESOURCE], "{:?}", good.log());

    // The container a secret is fetched for is deleted and created again
    // under its id (the same entry) while the broker holds the exchange:
    // the broker releases, the agent drops it, and the new container
    // starts without it.
    good.hold(Some(Duration::from_secs(2)));
    client.mount_overlay("d", &layers, true)?;
    client.created(&create("d", &process(&reader)?))?;
    let asked = std::time::Instant::now();
    let aside = client.send_aside(&provision("d", &url, &pin, RESOURCE, "db"))?;
    client.delete_container("d")?;
    client.created(&create("d", &process(&reader)?))?;
    let answer = loop {
        if let Some(answer) = client.answer(aside, Duration::from_secs(1))? {
            break answer;
        }
        ensure!(asked.elapsed() < CALL, "no answer to the exchange within {CALL:?}");
    };
    ensure!(
        matches!(&answer, Response::Error(err) if err.code == ErrorCode::WrongState
            && err.message.contains("deleted while its secret was fetched")),
        "{answer:?}"
    );
    ensure!(good.released() == [RESOURCE, RESOURCE], "the broker did not release the second: {:?}", good.log());
    good.hold(None);
    client.start_container("d")?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(&mut client, "d", None, &mut stdout, &mut stderr, Duration::from_secs(120))?;
    let stderr = String::from_utf8_lossy(&stderr);
    ensure!(run::exit_code(&status) != 0 && stdout.is_empty(), "{status:?} {stdout:?} {stderr}");

    // Many exchanges on one UVM, each collected (here each ends at once: a
    // broker that closes every connection): every one gets its slot back
    // and its container's mark, so none is answered busy and the container
    // starts.
    drop(relay);
    let closer = Staller::start(Duration::ZERO)?;
    let relay = Relay::start(&relay_path, closer.address)?;
    client.delete_container("a")?;
    client.delete_container("d")?;
    client.mount_overlay("e", &layers, true)?;
    client.created(&create("e", &process(&reader)?))?;
    let many = std::time::Instant::now();
    for round in 0..EXCHANGES {
        let aside = client.send_aside(&provision("e", &url, &pin, RESOURCE, "db"))?;
        let one = std::time::Instant::now();
        let answer = loop {
            if let Some(answer) = client.answer(aside, Duration::from_secs(1))? {
                break answer;
            }
            ensure!(one.elapsed() < CALL, "exchange {round} was not answered in {:?}", one.elapsed());
        };

        ensure!(
            matches!(&answer, Response::Error(err) if err.code == ErrorCode::Failed
                && err.message.contains("key broker exchange failed")),
            "exchange {round}: {answer:?}"
        );
    }
    eprintln!("{EXCHANGES} exchanges collected in {:?}", many.elapsed());
    ensure!(closer.held() > 0, "no exchange reached the broker");
    drop(relay);
    client.start_container("e")?;
    let status = run::pump(&mut client, "e", None, &mut Vec::new(), &mut Vec::new(), Duration::from_secs(120))?;
    ensure!(run::exit_code(&status) != 0, "e read a secret: {status:?}");
    client.delete_container("e")?;
    guest.finish(&mut client)?;
    Ok(())
}

/// How many exchanges [`a_listed_container_starts_with_its_secret_and_nothing_else_gets_one`]
/// runs and collects on one UVM at its end.
const EXCHANGES: usize = 12;

/// The pod's network as the route: the UVM's NIC is a tap in a namespace
/// prepared as a CNI plugin would, the broker listens in the peer
/// namespace behind it, and the agent opens its TCP stream in the pod's
/// network namespace (TLS and the pin as over the relay).
#[test]
fn a_pod_fetches_its_secret_over_its_own_network() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let namespaces = parma_tests::netns::CniNamespaces::new("kbs")?;
    let peer = std::net::Ipv4Addr::from(parma_tests::netns::CniNamespaces::OUTSIDE_ADDRESS);
    let broker = namespaces.in_peer(|| Broker::start_on(config([0; 32]), NAME, (peer, 0).into()))?;
    let reader = ["/bin/cat", "/dev/parma/secrets/db"];
    let spec = json!({"name": "reader", "command": reader, "user": {"uid": 1000, "gid": 1000}, "signals": [9],
        "secrets": [{"broker": "good", "resource": RESOURCE, "file": "db"}],
        "brokers": [{"name": "good", "url": url(&broker), "certificate_sha256": broker.pin()}]});
    let fixture = oci::PolicyFixture::with_spec(&hello, spec.clone())?;
    let container =
        serde_json::to_value(policy_gen::container(&fixture.built, &serde_json::from_value::<Spec>(spec)?))?;
    let brokers =
        serde_json::from_value(json!([{"name": "good", "url": url(&broker), "certificate_sha256": broker.pin()}]))?;
    let knobs = Knobs { brokers, sandbox: serde_json::from_value(json!({"share_pid": true}))?, ..Knobs::default() };
    let text = policy_gen::rego_with_fragments(&[container], &[], &knobs, "secrets over the pod network")?;
    let policy = fixture.dir().join("pod.rego");
    std::fs::write(&policy, &text)?;
    broker.expect_host_data(parma_policy::Policy::from_bytes(text.clone().into_bytes())?.hash());

    let attached =
        parma_host::netns::attach(std::path::Path::new(&parma_tests::netns::CniNamespaces::path(&namespaces.pod)))?;
    let mut boot = Boot::emulated_for_policy(&policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.nic = Some(parma_host::Nic { mac: attached.mac, forwards: Vec::new(), tap: Some(attached.tap.clone()) });
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(text).with_context(|| guest.serial())?;
    client.create_sandbox("pod-kbs", true)?;
    client.update_interface(&attached.interface)?;
    client.update_routes(&attached.routes)?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = reader.iter().map(|a| a.to_string()).collect();
    let mut process = run::process_from_config(&fixture.built.config, &args)?;
    (process.uid, process.gid, process.groups) = (1000, 1000, Vec::new());
    client.mount_overlay("a", &layers, true)?;
    let request = parma_tests::create_request("a", &process, parma_tests::cri_namespaces(false));
    client.created(&request)?;
    let address = format!("{peer}:{}", broker.address().port());
    // A container in the pod's shared PID namespace gets no secret: its
    // neighbours could read it through /proc/PID/root.
    client.mount_overlay("s", &layers, true)?;
    client.created(&parma_tests::create_request("s", &process, parma_tests::cri_namespaces(true)))?;
    let outcome = client.provision_secret("s", &url(&broker), broker.pin(), RESOURCE, "db", Some(&address));
    denied(outcome, "shares the pod's PID namespace")?;
    ensure!(broker.log().is_empty(), "bytes went out: {:?}", broker.log());
    client.delete_container("s")?;
    client
        .provision_secret("a", &url(&broker), broker.pin(), RESOURCE, "db", Some(&address))
        .with_context(|| format!("{:?}", broker.log()))?;
    ensure!(broker.released() == [RESOURCE], "{:?}", broker.log());
    client.start_container("a")?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(&mut client, "a", None, &mut stdout, &mut stderr, Duration::from_secs(120))?;
    ensure!(run::exit_code(&status) == 0 && stdout == SECRET, "{status:?} {}", String::from_utf8_lossy(&stdout));
    client.delete_container("a")?;
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    drop(attached);
    Ok(())
}

/// `parma run --netns`: the secrets the policy lists for the container are
/// provisioned before it starts, over the pod's network, with no request
/// of the user's naming them (the agent says which entry the container was
/// created as; `--broker-address` gives the route to a broker whose name
/// this host cannot resolve). Without a network `parma run` says what it
/// needs, and no byte goes to the broker.
#[test]
fn parma_run_provisions_the_secrets_the_policy_lists_for_its_container() -> anyhow::Result<()> {
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    let hello = paths.guest_binary("oci-hello")?;
    let namespaces = parma_tests::netns::CniNamespaces::new("kbsrun")?;
    let peer = std::net::Ipv4Addr::from(parma_tests::netns::CniNamespaces::OUTSIDE_ADDRESS);
    let broker = namespaces.in_peer(|| Broker::start_on(config([0; 32]), NAME, (peer, 0).into()))?;
    let reader = ["/bin/cat", "/dev/parma/secrets/db"];
    let spec = json!({"name": "reader", "command": reader, "signals": [9],
        "secrets": [{"broker": "good", "resource": RESOURCE, "file": "db"}],
        "brokers": [{"name": "good", "url": url(&broker), "certificate_sha256": broker.pin()}]});
    let fixture = oci::PolicyFixture::with_spec(&hello, spec)?;
    let text = std::fs::read(&fixture.policy)?;
    broker.expect_host_data(parma_policy::Policy::from_bytes(text)?.hash());
    let pod_path = parma_tests::netns::CniNamespaces::path(&namespaces.pod);
    let route = format!("good={peer}:{}", broker.address().port());

    // No network: refused after the create, before a byte goes out.
    let out = fixture.parma_run(&parma, &paths.uvm).args(["-q", "--"]).args(reader).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(125), "{}: {stderr}", out.status);
    ensure!(stderr.contains("secrets from broker \"good\"") && stderr.contains("--netns"), "{stderr}");
    ensure!(broker.log().is_empty(), "bytes went out: {:?}", broker.log());

    let out = fixture
        .parma_run(&parma, &paths.uvm)
        .args(["-q", "--netns", &pod_path, "--broker-address", &route, "--"])
        .args(reader)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(0), "{}: {stderr}\n{:?}", out.status, broker.log());
    ensure!(out.stdout == SECRET, "{:?}", String::from_utf8_lossy(&out.stdout));
    ensure!(broker.released() == [RESOURCE], "{:?}", broker.log());
    Ok(())
}
