//! The end-to-end tests' container program (the test OCI image's entrypoint):
//! prints what it sees as `key=value` lines, one fact a line, so a test can
//! check the process, the environment and the overlay from inside.
//!
//! Arguments, any number, in any order (other words only show in `args=`):
//! `write PATH TEXT` writes TEXT 256 times to PATH and fsyncs it before
//! printing; `stderr TEXT` prints TEXT on stderr after the facts; `sleep MS`
//! sleeps before exiting; `exit N` exits with status N. Any failure prints
//! `error=...` and exits with status 70.
//!
//! `pod PORT` (first) is a pod member instead: it prints its namespaces
//! (`ns net=... ipc=... uts=... pid=...`), `hostname=`, `pids=` (the
//! processes it sees), `listening=` (the TCP ports anything in its
//! network namespace listens on, from /proc/net/tcp and tcp6, comma
//! separated), `shm=` (the text in the pod's System V shared memory
//! segment with key [`SHM_KEY`] before this process wrote its own
//! `shm-from-<hostname>-<pid>` there, or `none`), `raw_socket=` and `ping_socket=` (`open` or the error of
//! opening a raw and a ping ICMP socket), `userns=` (`made` or the error of
//! unsharing a user namespace) and `netconf=` (its network namespace's
//! `accept_ra`, `autoconf` and IPv4 and IPv6 `accept_redirects` defaults,
//! comma separated), `local=` (its IPv4 addresses but loopback, from
//! /proc/net/fib_trie, comma separated), then binds PORT on every address. If it can, it is
//! the server (`role=server`): it answers one connection (from the pod's
//! loopback or its NIC) with `hello-from-<hostname>` and exits. If the port
//! is taken, a process in the same network namespace holds it: it is the
//! client, reaches it on 127.0.0.1, reads the answer and prints
//! `role=client got=...`.
//!
//! `connect ADDRESS:PORT` tries a TCP connection (5 s at most) and prints
//! `connect=ok` or `connect=<the error>`.
//!
//! `attest PATH DATA` asks the attestation endpoint at unix socket PATH for
//! a report binding DATA (hex) and prints `status=<HTTP status>` and
//! `body=<the answer's body>`, or `attest=<the error>` when it cannot
//! connect. `attest-others DATA` does the same through every other
//! process's `/proc/PID/root/dev/parma/attestation.sock` it can see (in a
//! pod's shared PID namespace: another container's endpoint), printing
//! `pid=PID` before each, and `others=N` at the end. `attest-many PATH
//! DATA N` asks N times, one after the other, and prints `statuses=` with
//! each status seen and how often (`200x1000`).
//!
//! `stop-all` attacks its PID namespace: prints `stopping=1`, then sends
//! SIGSTOP to every process it may signal (`kill(-1)`) in a loop, forever.
//!
//! `bench-serve PORT` serves `make bench`'s network benchmark until killed:
//! each connection starts with a little-endian u64 N; N = 0: echo 64-byte
//! messages until end of file; N with its top bit set: send N without it
//! bytes, then close; else: read N bytes, answer one byte.

// The pod mode's shared memory segment is System V IPC, which nix does not
// wrap: one function makes the raw calls, and says why they are sound.
#![allow(unsafe_code)]

use std::ffi::OsString;

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
use std::io::{ErrorKind, Write};
use std::time::Duration;

/// The exit status after an error (EX_SOFTWARE).
const FAILED: i32 = 70;

fn main() {
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let code = match run(&args) {
        Ok(code) => code,
        Err(err) => {
            println!("error={err}");
            FAILED
        }
    };
    std::process::exit(code);
}

fn run(args: &[String]) -> Result<i32, String> {
    if let [mode, port] = args
        && mode == "pod"
    {
        return pod(port.parse().map_err(|e| format!("pod: port: {e}"))?);
    }
    if let [mode, port] = args
        && mode == "bench-serve"
    {
        return bench_serve(port.parse().map_err(|e| format!("bench-serve: port: {e}"))?);
    }
    if let [mode, address] = args
        && mode == "connect"
    {
        let address: std::net::SocketAddr = address.parse().map_err(|e| format!("connect: {e}"))?;
        match std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(_) => println!("connect=ok"),
            Err(e) => println!("connect={e}"),
        }
        return Ok(0);
    }
    if let [mode] = args
        && mode == "unshare-user"
    {
        match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
            Ok(()) => println!("made"),
            Err(errno) => println!("{errno:?}"),
        }
        return Ok(0);
    }
    if let [mode, path, data] = args
        && mode == "attest"
    {
        attest(path, data);
        return Ok(0);
    }
    if let [mode, path, data, count] = args
        && mode == "attest-many"
    {
        let count: u32 = count.parse().map_err(|e| format!("attest-many: {e}"))?;
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..count {
            *seen.entry(request(path, data).map_or_else(|e| e, |(status, _)| status)).or_default() += 1;
        }
        let shown: Vec<String> = seen.iter().map(|(status, n)| format!("{status}x{n}")).collect();
        println!("statuses={}", shown.join(","));
        return Ok(0);
    }
    if let [mode, data] = args
        && mode == "attest-others"
    {
        let own = std::process::id().to_string();
        let mut others = 0;
        let entries = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if pid == own || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = format!("/proc/{pid}/root/dev/parma/attestation.sock");
            if std::fs::symlink_metadata(&path).is_ok() {
                others += 1;
                println!("pid={pid}");
                attest(&path, data);
            }
        }
        println!("others={others}");
        return Ok(0);
    }
    if let [mode] = args
        && mode == "stop-all"
    {
        return stop_all();
    }
    let mut code = 0;
    let mut sleep = None;
    let mut stderr = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let mut value = |what: &str| words.next().ok_or_else(|| format!("{word} needs {what}"));
        match word.as_str() {
            "write" => {
                let path = value("PATH and TEXT")?;
                let text = value("TEXT")?;
                write(path, text).map_err(|e| format!("write {path}: {e}"))?;
            }
            "exit" => code = value("N")?.parse().map_err(|e| format!("exit: {e}"))?,
            "sleep" => sleep = Some(Duration::from_millis(value("MS")?.parse().map_err(|e| format!("sleep: {e}"))?)),
            "stderr" => stderr.push(value("TEXT")?.clone()),
            _ => {}
        }
    }

    let mut out = format!("args={args:?}\n");
    let cwd = std::env::current_dir().map_err(|e| format!("cwd: {e}"))?;
    out.push_str(&format!("cwd={}\n", cwd.display()));
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    out.push_str(&format!("uid={}\n", status_field(&status, "Uid:", true)?));
    out.push_str(&format!("gid={}\n", status_field(&status, "Gid:", true)?));
    out.push_str(&format!("groups={}\n", status_field(&status, "Groups:", false)?));
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    env.sort();
    for (name, value) in env {
        out.push_str(&format!("env {}={}\n", name.to_string_lossy(), value.to_string_lossy()));
    }
    for (key, path) in
        [("whiteout_file", "/etc/remove-me"), ("opaque_old", "/opt/old/old.txt"), ("opaque_new", "/opt/old/new.txt")]
    {
        out.push_str(&format!("{key}={}\n", presence(path)?));
    }

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))?;
    for text in stderr {
        eprintln!("{text}");
    }
    if let Some(duration) = sleep {
        std::thread::sleep(duration);
    }
    Ok(code)
}

/// A line of `/proc/self/status`: its first number (the real id), or all of
/// them joined by commas (the supplementary groups, as getgroups gives them).
fn status_field(status: &str, label: &str, first: bool) -> Result<String, String> {
    let line = status.lines().find_map(|l| l.strip_prefix(label)).ok_or_else(|| format!("no {label} in status"))?;
    let mut numbers = line.split_whitespace();
    if first {
        numbers.next().map(str::to_owned).ok_or_else(|| format!("empty {label} in status"))
    } else {
        Ok(numbers.collect::<Vec<_>>().join(","))
    }
}

fn presence(path: &str) -> Result<&'static str, String> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok("present"),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok("absent"),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

fn write(path: &str, text: &str) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(text.repeat(256).as_bytes())?;
    file.sync_all()
}

/// The `pod PORT` mode (see the module docs).
fn pod(port: u16) -> Result<i32, String> {
    use std::io::Read;
    let ns = |kind: &str| {
        std::fs::read_link(format!("/proc/self/ns/{kind}"))
            .map(|link| link.to_string_lossy().into_owned())
            .map_err(|e| format!("/proc/self/ns/{kind}: {e}"))
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|e| format!("hostname: {e}"))?;
    let hostname = hostname.trim_end();
    let pids = std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .count();
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| out.write_all(format!("{line}\n").as_bytes()).and_then(|()| out.flush());
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).map_err(|e| format!("{table}: {e}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if let (Some(local), Some(&"0A")) = (fields.get(1), fields.get(3))
                && let Some((_, port)) = local.rsplit_once(':')
            {
                listening.push(u16::from_str_radix(port, 16).map_err(|e| format!("{table}: {e}"))?);
            }
        }
    }
    listening.sort_unstable();
    listening.dedup();
    let listening: Vec<String> = listening.iter().map(u16::to_string).collect();
    say(format!("ns net={} ipc={} uts={} pid={}", ns("net")?, ns("ipc")?, ns("uts")?, ns("pid")?))
        .and_then(|()| say(format!("hostname={hostname}")))
        .and_then(|()| say(format!("pids={pids}")))
        .and_then(|()| say(format!("listening={}", listening.join(","))))
        .and_then(|()| say(format!("shm={}", shared_memory(&format!("shm-from-{hostname}-{}", std::process::id())))))
        .and_then(|()| say(format!("raw_socket={}", icmp_socket(SockType::Raw))))
        .and_then(|()| say(format!("ping_socket={}", icmp_socket(SockType::Datagram))))
        .and_then(|()| say(format!("userns={}", userns())))
        .and_then(|()| say(format!("netconf={}", netconf())))
        .and_then(|()| say(format!("local={}", local_addresses())))
        .map_err(|e| format!("stdout: {e}"))?;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    match std::net::TcpListener::bind(any) {
        Ok(listener) => {
            say("role=server".into()).map_err(|e| format!("stdout: {e}"))?;
            let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            stream.write_all(format!("hello-from-{hostname}").as_bytes()).map_err(|e| format!("send: {e}"))?;
            Ok(0)
        }
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| format!("timeout: {e}"))?;
            let mut got = String::new();
            stream.read_to_string(&mut got).map_err(|e| format!("receive: {e}"))?;
            say(format!("role=client got={got}")).map_err(|e| format!("stdout: {e}"))?;
            Ok(0)
        }
        Err(e) => Err(format!("bind {any}: {e}")),
    }
}

/// The key of the pod members' System V shared memory segment.
const SHM_KEY: libc::key_t = 0x7061_726d;
/// Its size.
const SHM_SIZE: usize = 64;

/// What the IPC namespace's segment [`SHM_KEY`] held (`none` if it was
/// just made), after which `text` (at most 63 bytes) replaces it.
fn shared_memory(text: &str) -> String {
    // SAFETY: shmget/shmat/shmdt on a segment of SHM_SIZE bytes; every
    // access stays inside the attached SHM_SIZE bytes, and the mapping is
    // detached before returning.
    unsafe {
        let mut made = true;
        let mut id = libc::shmget(SHM_KEY, SHM_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o666);
        if id < 0 {
            made = false;
            id = libc::shmget(SHM_KEY, SHM_SIZE, 0);
        }
        if id < 0 {
            return format!("shmget: {}", std::io::Error::last_os_error());
        }
        let base = libc::shmat(id, std::ptr::null(), 0);
        if base as isize == -1 {
            return format!("shmat: {}", std::io::Error::last_os_error());
        }
        let bytes = std::slice::from_raw_parts_mut(base.cast::<u8>(), SHM_SIZE);
        let before = if made {
            "none".to_string()
        } else {
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(SHM_SIZE);
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        let new = text.as_bytes();
        let len = new.len().min(SHM_SIZE - 1);
        bytes[..len].copy_from_slice(&new[..len]);
        bytes[len] = 0;
        libc::shmdt(base);
        before
    }
}

/// `open`, or why an ICMP socket of `kind` cannot be opened.
fn icmp_socket(kind: SockType) -> String {
    match socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, SockProtocol::Icmp) {
        Ok(_) => "open".into(),
        Err(errno) => format!("{errno:?}"),
    }
}

/// `made`, or why no user namespace can be made (by this program run
/// again as `unshare-user`: the test process itself stays as it is).
fn userns() -> String {
    match std::process::Command::new("/proc/self/exe").arg("unshare-user").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(e) => format!("spawn: {e}"),
    }
}

/// The namespace's local IPv4 addresses but loopback, sorted: in
/// /proc/net/fib_trie each `|-- IP` line that a `/32 host LOCAL` line follows.
fn local_addresses() -> String {
    let text = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last = "";
    let mut found = std::collections::BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip;
        } else if line.contains("/32 host LOCAL") && !last.starts_with("127.") {
            found.insert(last.to_string());
        }
    }
    found.into_iter().collect::<Vec<_>>().join(",")
}

/// The network namespace's defaults for new interfaces.
fn netconf() -> String {
    [
        "/proc/sys/net/ipv6/conf/default/accept_ra",
        "/proc/sys/net/ipv6/conf/default/autoconf",
        "/proc/sys/net/ipv4/conf/default/accept_redirects",
        "/proc/sys/net/ipv6/conf/default/accept_redirects",
    ]
    .iter()
    .map(|path| std::fs::read_to_string(path).map_or_else(|e| format!("{e}"), |v| v.trim().to_string()))
    .collect::<Vec<_>>()
    .join(",")
}

/// The `stop-all` mode (see the module docs).
/// One request to the attestation endpoint at `path`, printed.
fn attest(path: &str, data: &str) {
    match request(path, data) {
        Ok((status, body)) => println!("status={status}\nbody={body}"),
        Err(e) => println!("attest={e}"),
    }
}

/// One request to the attestation endpoint at `path`: its status and body.
fn request(path: &str, data: &str) -> Result<(String, String), String> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let request = format!("GET /report?data={data} HTTP/1.1\r\nHost: parma\r\n\r\n");
    let mut answer = String::new();
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_string(&mut answer))
        .map_err(|e| e.to_string())?;
    let status = answer.split(' ').nth(1).unwrap_or("none").to_string();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Ok((status, body))
}

fn stop_all() -> Result<i32, String> {
    println!("stopping=1");
    std::io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    loop {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGSTOP);
    }
}

/// The `bench-serve` header bit that asks the server to send.
const SEND: u64 = 1 << 63;

/// The `bench-serve PORT` mode (see the module docs).
fn bench_serve(port: u16) -> Result<i32, String> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
        .map_err(|e| format!("bind: {e}"))?;
    println!("serving={port}");
    std::io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let mut header = [0u8; 8];
        if stream.read_exact(&mut header).is_err() {
            continue;
        }
        let mut left = u64::from_le_bytes(header);
        let mut buffer = vec![0u8; 64 * 1024];
        if left & SEND != 0 {
            left &= !SEND;
            while left > 0 {
                let chunk = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                if stream.write_all(&buffer[..chunk]).is_err() {
                    break;
                }
                left -= chunk as u64;
            }
            continue;
        }
        if left == 0 {
            let mut message = [0u8; 64];
            while stream.read_exact(&mut message).is_ok() && stream.write_all(&message).is_ok() {}
            continue;
        }
        while left > 0 {
            let want = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            match stream.read(&mut buffer[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n as u64,
            }
        }
        let _ = stream.write_all(b"k");
    }
    Ok(0)
}
