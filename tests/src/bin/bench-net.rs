//! `make bench`: the pod's network from the host, under TCG.
//!
//! A container of the test image serves the benchmark protocol
//! (`oci-hello bench-serve`) in a pod; the host measures TCP
//! request/response latency (64-byte messages, one at a time) and bulk
//! throughput (host to container, acknowledged at the end; and container
//! to host), on both NIC
//! paths, each against a baseline without the UVM measured in the same
//! run (the ratios track regressions; the absolute numbers mean little
//! under TCG):
//!
//! - user-mode networking (`parma run -p`): through the forwarded port on
//!   127.0.0.1; baseline: the same server logic on the host's loopback;
//! - a tap in a network namespace (`--netns`, real hosts): from the peer
//!   namespace of a veth pair to the pod's address; baseline: the same
//!   server logic in the pod's namespace of a second pair, no UVM.
//!
//! Writes `out/bench/net.json`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use parma_host::run;
use parma_tests::netns::CniNamespaces;
use parma_tests::{Boot, Guest, Paths, median_secs, oci};
use serde::Serialize;

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(60);
/// Round trips per latency sample set, and sample sets.
const ROUND_TRIPS: usize = 200;
/// Bytes per bulk transfer, and transfers.
const BULK: u64 = 32 << 20;
const REPEATS: usize = 3;
const GUEST_PORT: u16 = 8080;
/// The header bit that asks the server to send (container to host).
const SEND: u64 = 1 << 63;

#[derive(Serialize)]
struct Path {
    round_trip_median_us: f64,
    bulk_mb_per_s: f64,
    bulk_samples_mb_per_s: Vec<f64>,
    bulk_from_container_mb_per_s: f64,
    bulk_from_container_samples_mb_per_s: Vec<f64>,
}

#[derive(Serialize)]
struct Comparison {
    path: &'static str,
    baseline: &'static str,
    container: Path,
    without_uvm: Path,
    round_trip_ratio: f64,
    bulk_slowdown_ratio: f64,
    bulk_from_container_slowdown_ratio: f64,
}

impl Comparison {
    fn new(path: &'static str, baseline: &'static str, container: Path, without_uvm: Path) -> Self {
        Self {
            path,
            baseline,
            round_trip_ratio: container.round_trip_median_us / without_uvm.round_trip_median_us,
            bulk_slowdown_ratio: without_uvm.bulk_mb_per_s / container.bulk_mb_per_s,
            bulk_from_container_slowdown_ratio: without_uvm.bulk_from_container_mb_per_s
                / container.bulk_from_container_mb_per_s,
            container,
            without_uvm,
        }
    }
}

#[derive(Serialize)]
struct Report {
    accel: &'static str,
    message_bytes: usize,
    bulk_bytes: u64,
    user_mode: Comparison,
    tap: Comparison,
}

/// The server side of the protocol, for the host's baseline (the guest's is
/// `oci-hello bench-serve`).
fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let mut header = [0u8; 8];
        if stream.read_exact(&mut header).is_err() {
            continue;
        }
        let mut left = u64::from_le_bytes(header);
        if left & SEND != 0 {
            left &= !SEND;
            let chunk = vec![0xa5u8; 64 * 1024];
            while left > 0 {
                let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                if stream.write_all(&chunk[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
            continue;
        }
        if left == 0 {
            let mut message = [0u8; 64];
            while stream.read_exact(&mut message).is_ok() && stream.write_all(&message).is_ok() {}
            continue;
        }
        let mut buffer = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            match stream.read(&mut buffer[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n as u64,
            }
        }
        let _ = stream.write_all(b"k");
    }
}

fn connect(address: SocketAddr, header: u64) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(30))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(&header.to_le_bytes())?;
    Ok(stream)
}

fn measure(address: SocketAddr) -> anyhow::Result<Path> {
    let mut round_trips = Vec::with_capacity(ROUND_TRIPS * REPEATS);
    let mut bulk = Vec::with_capacity(REPEATS);
    let mut back_bulk = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let mut stream = connect(address, 0)?;
        let message = [0x5au8; 64];
        let mut back = [0u8; 64];
        for _ in 0..ROUND_TRIPS {
            let start = Instant::now();
            stream.write_all(&message)?;
            stream.read_exact(&mut back)?;
            round_trips.push(start.elapsed());
            ensure!(back == message, "the echo differs");
        }
        drop(stream);
        let mut stream = connect(address, BULK)?;
        let chunk = vec![0xa5u8; 64 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < BULK {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack)?;
        bulk.push(BULK as f64 / 1e6 / start.elapsed().as_secs_f64());
        let mut stream = connect(address, BULK | SEND)?;
        let mut buffer = vec![0u8; 64 * 1024];
        let start = Instant::now();
        let mut received = 0u64;
        while received < BULK {
            let n = stream.read(&mut buffer)?;
            ensure!(n > 0, "the server closed after {received} bytes");
            received += n as u64;
        }
        back_bulk.push(BULK as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    let median = |samples: &[f64]| {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(Path {
        round_trip_median_us: median_secs(&round_trips) * 1e6,
        bulk_mb_per_s: median(&bulk),
        bulk_samples_mb_per_s: bulk,
        bulk_from_container_mb_per_s: median(&back_bulk),
        bulk_from_container_samples_mb_per_s: back_bulk,
    })
}

/// Start `bench-serve` in a pod of a booted UVM whose NIC is `interface`.
fn serve_in_pod(
    guest: &mut Guest,
    fixture: &oci::PolicyFixture,
    interface: &parma_protocol::Interface,
    routes: &[parma_protocol::Route],
) -> anyhow::Result<parma_host::Client> {
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    run::pod_network(&mut client, "bench", interface, routes)?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let port = GUEST_PORT.to_string();
    let args: Vec<String> = [oci::ENTRYPOINT, "bench-serve", port.as_str()].iter().map(|a| a.to_string()).collect();
    let process = run::process_from_config(&fixture.built.config, &args)?;
    client.mount_overlay("bench", &layers, true)?;
    client.create_container("bench", &process)?;
    client.start_container("bench")?;
    // Serving once the first line is out.
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let (data, eof) = client.read_output("bench", None, parma_protocol::OutputStream::Stdout)?;
        ensure!(!eof && Instant::now() < give_up, "the server did not start:\n{}", guest.serial());
        if String::from_utf8_lossy(&data).contains("serving=") {
            return Ok(client);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut guest: Guest, mut client: parma_host::Client) -> anyhow::Result<()> {
    client.signal_process("bench", None, 9)?;
    let _ = client.shutdown();
    let _ = guest.wait_exit(Duration::from_secs(60));
    Ok(())
}

fn print(title: &str, comparison: &Comparison) {
    println!("{:<40} {:>14} {:>14}", title, "container", "without UVM");
    println!(
        "{:<40} {:>11.1} us {:>11.1} us",
        "64-byte round trip (median)",
        comparison.container.round_trip_median_us,
        comparison.without_uvm.round_trip_median_us
    );
    println!(
        "{:<40} {:>9.1} MB/s {:>9.1} MB/s",
        "bulk host to container (median of 3)",
        comparison.container.bulk_mb_per_s,
        comparison.without_uvm.bulk_mb_per_s
    );
    println!(
        "{:<40} {:>9.1} MB/s {:>9.1} MB/s",
        "bulk container to host (median of 3)",
        comparison.container.bulk_from_container_mb_per_s,
        comparison.without_uvm.bulk_from_container_mb_per_s
    );
    println!("{:<40} {:>14.1}", "round trip ratio", comparison.round_trip_ratio);
    println!("{:<40} {:>14.1}", "bulk slowdown ratio, to container", comparison.bulk_slowdown_ratio);
    println!("{:<40} {:>14.1}", "bulk slowdown ratio, from container", comparison.bulk_from_container_slowdown_ratio);
}

fn main() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let hello = paths.guest_binary("oci-hello")?;
    let port = GUEST_PORT.to_string();
    let command = [oci::ENTRYPOINT, "bench-serve", port.as_str()];
    let fixture = oci::PolicyFixture::new(&hello, "bench", Some(&command), None)?;

    // User-mode networking, against the host's loopback.
    let host_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.nic =
        Some(parma_host::Nic::user(vec![parma_host::PortForward { udp: false, host: host_port, guest: GUEST_PORT }]));
    let mut guest = Guest::boot(&paths, &boot)?;
    let (interface, routes) = run::user_network();
    let client = serve_in_pod(&mut guest, &fixture, &interface, &routes)?;
    let container = measure(SocketAddr::from(([127, 0, 0, 1], host_port)))?;
    stop(guest, client)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let baseline_address = listener.local_addr()?;
    std::thread::spawn(move || serve(listener));
    let host_loopback = measure(baseline_address)?;
    let user_mode = Comparison::new(
        "QEMU user-mode networking, forwarded port on 127.0.0.1",
        "the same server on the host's loopback",
        container,
        host_loopback,
    );

    // A tap in a network namespace, against a veth pair without a UVM.
    let pod_address = SocketAddr::from((CniNamespaces::POD_ADDRESS, GUEST_PORT));
    let namespaces = CniNamespaces::new("bench")?;
    let attached = parma_host::netns::attach(std::path::Path::new(&CniNamespaces::path(&namespaces.pod)))?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.nic = Some(parma_host::Nic { mac: attached.mac, forwards: Vec::new(), tap: Some(attached.tap.clone()) });
    let mut guest = Guest::boot(&paths, &boot)?;
    let client = serve_in_pod(&mut guest, &fixture, &attached.interface, &attached.routes)?;
    let container = namespaces.in_peer(|| measure(pod_address))?;
    stop(guest, client)?;
    drop(attached);
    drop(namespaces);
    let baseline = CniNamespaces::new("base")?;
    let listener = baseline.in_pod(|| Ok(TcpListener::bind(pod_address)?))?;
    std::thread::spawn(move || serve(listener));
    let veth = baseline.in_peer(|| measure(pod_address))?;
    let tap = Comparison::new(
        "a tap in the pod's network namespace, tc-redirected to its veth (--netns)",
        "the same server in the pod's namespace of another veth pair",
        container,
        veth,
    );

    let report = Report { accel: "tcg", message_bytes: 64, bulk_bytes: BULK, user_mode, tap };
    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("net.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    print("network (TCG, user-mode NIC, -p)", &report.user_mode);
    print("network (TCG, tap, --netns)", &report.tap);
    println!("wrote {}", out.join("net.json").display());
    Ok(())
}
