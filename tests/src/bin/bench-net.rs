//! `make bench`: the pod's network from the host, under TCG.
//!
//! A container of the test image serves the benchmark protocol
//! (`oci-hello bench-serve`) in a pod whose NIC is on QEMU user-mode
//! networking (the `parma run -p` path); the host measures TCP
//! request/response latency (64-byte messages, one at a time) and bulk
//! throughput (host to container, acknowledged at the end) through the
//! forwarded port on 127.0.0.1. The same server logic on the host's
//! loopback, measured in the same run, is the baseline: the ratios track
//! regressions, the absolute numbers mean little under TCG. The tap path
//! of real hosts (`--netns`) is not built yet.
//!
//! Writes `out/bench/net.json`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use parma_host::run;
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

#[derive(Serialize)]
struct Path {
    round_trip_median_us: f64,
    bulk_mb_per_s: f64,
    bulk_samples_mb_per_s: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    accel: &'static str,
    path: &'static str,
    message_bytes: usize,
    bulk_bytes: u64,
    container: Path,
    host_loopback: Path,
    round_trip_ratio: f64,
    bulk_slowdown_ratio: f64,
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
    }
    let mut sorted = bulk.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Path {
        round_trip_median_us: median_secs(&round_trips) * 1e6,
        bulk_mb_per_s: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        bulk_samples_mb_per_s: bulk,
    })
}

fn main() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let hello = paths.guest_binary("oci-hello")?;
    let port = GUEST_PORT.to_string();
    let command = [oci::ENTRYPOINT, "bench-serve", port.as_str()];
    let fixture = oci::PolicyFixture::new(&hello, "bench", Some(&command), None)?;
    let host_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.nic = Some(parma_host::Nic {
        mac: parma_host::qemu::DEFAULT_MAC,
        forwards: vec![parma_host::PortForward { udp: false, host: host_port, guest: GUEST_PORT }],
    });
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    run::pod_network(&mut client, "bench")?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
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
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let container = measure(SocketAddr::from(([127, 0, 0, 1], host_port)))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let baseline_address = listener.local_addr()?;
    std::thread::spawn(move || serve(listener));
    let host_loopback = measure(baseline_address)?;

    client.signal_process("bench", None, 9)?;
    let _ = client.shutdown();
    let _ = guest.wait_exit(Duration::from_secs(60));

    let report = Report {
        accel: "tcg",
        path: "QEMU user-mode networking, forwarded port on 127.0.0.1",
        message_bytes: 64,
        bulk_bytes: BULK,
        round_trip_ratio: container.round_trip_median_us / host_loopback.round_trip_median_us,
        bulk_slowdown_ratio: host_loopback.bulk_mb_per_s / container.bulk_mb_per_s,
        container,
        host_loopback,
    };
    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("net.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{:<40} {:>14} {:>14}", "network (TCG, user-mode NIC)", "container", "host loopback");
    println!(
        "{:<40} {:>11.1} us {:>11.1} us",
        "64-byte round trip (median)", report.container.round_trip_median_us, report.host_loopback.round_trip_median_us
    );
    println!(
        "{:<40} {:>9.1} MB/s {:>9.1} MB/s",
        "bulk host to container (median of 3)", report.container.bulk_mb_per_s, report.host_loopback.bulk_mb_per_s
    );
    println!("{:<40} {:>14.1}", "round trip ratio", report.round_trip_ratio);
    println!("{:<40} {:>14.1}", "bulk slowdown ratio", report.bulk_slowdown_ratio);
    println!("wrote {}", out.join("net.json").display());
    Ok(())
}
