//! The UVM as a pod under QEMU TCG: `CreateSandbox` decided by the policy,
//! then two containers of the test image that share the pod's network, IPC
//! and UTS namespaces (one serves on localhost, the other reaches it) and
//! keep PID namespaces of their own. The hostile requests around it are
//! refused with their reasons, and the agent keeps serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parma_host::client::Client;
use parma_host::run;
use parma_protocol::{ArpNeighbor, ErrorCode, Interface, Namespace, OutputStream, ProcessSpec, Request, Route};
use parma_tests::netns::CniNamespaces;
use parma_tests::{Boot, Guest, Paths, denied, oci, refused};

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(60);
const PORT: &str = "7000";

fn cri_namespaces() -> Vec<Namespace> {
    parma_tests::cri_namespaces(false)
}

fn create(id: &str, process: &ProcessSpec, namespaces: Vec<Namespace>, hostname: Option<&str>) -> Request {
    let mut request = parma_tests::create_request(id, process, namespaces);
    if let Request::CreateContainer { hostname: name, .. } = &mut request {
        *name = hostname.map(Into::into);
    }
    request
}

/// Stdout of container `id` until a line starts with `prefix`.
fn read_until(client: &mut Client, id: &str, prefix: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    while !text.lines().any(|line| line.starts_with(prefix)) {
        let (data, eof) = client.read_output(id, None, OutputStream::Stdout)?;
        text.push_str(std::str::from_utf8(&data)?);
        if eof || Instant::now() >= give_up {
            let (stderr, _) = client.read_output(id, None, OutputStream::Stderr)?;
            bail!("{id} printed no {prefix:?}: {text}\nstderr: {}", String::from_utf8_lossy(&stderr));
        }
        if data.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(text)
}

/// The rest of a process's stdout and its exit code.
fn finish(client: &mut Client, id: &str) -> anyhow::Result<(String, i32)> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(client, id, None, &mut stdout, &mut stderr, Duration::from_secs(120))?;
    let code = run::exit_code(&status);
    ensure!(code == 0, "{id} exited {code}: {}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    Ok((String::from_utf8(stdout)?, code))
}

/// `key=value` pairs of the `ns ...` line and the other `key=value` lines.
fn facts(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .flat_map(|line| line.strip_prefix("ns ").unwrap_or(line).split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn two_containers_of_a_pod_share_its_network_ipc_and_host_name_and_nothing_else() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let command = [oci::ENTRYPOINT, "pod", PORT];
    let fixture = oci::PolicyFixture::new(&hello, "member", Some(&command), None)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    let process = run::process_from_config(&fixture.built.config, &args)?;

    // Not a pod yet: the pod's namespaces cannot be joined.
    client.mount_overlay("early", &layers, true)?;
    let (code, message) = refused(client.created(&create("early", &process, cri_namespaces(), None)))?;
    ensure!(code == ErrorCode::InvalidArgument && message.contains("not a pod"), "{code}: {message}");

    // The policy's sandbox rule (parma policy gen's default): RFC 1123 host
    // names, no shared PID namespace; once.
    denied(client.create_sandbox("Not_A_Hostname", false), "does not match")?;
    denied(client.create_sandbox("pod-1", true), "shared PID namespace")?;
    client.create_sandbox("pod-1", false)?;
    denied(client.create_sandbox("pod-2", false), "already a pod")?;

    // In the pod: no network of its own, no other host name, no user or
    // time namespace, no joining a mount namespace by path.
    let hostile: [(Vec<Namespace>, Option<&str>, &str); 4] = [
        (vec![Namespace { kind: "network".into(), path: None }], None, "new one is refused"),
        (cri_namespaces(), Some("elsewhere"), "not the pod's"),
        (vec![Namespace { kind: "user".into(), path: None }], None, "not supported"),
        (vec![Namespace { kind: "mount".into(), path: Some("/proc/1/ns/mnt".into()) }], None, "cannot be joined"),
    ];
    for (namespaces, hostname, reason) in hostile {
        let (code, message) = refused(client.created(&create("early", &process, namespaces, hostname)))?;
        ensure!(code == ErrorCode::InvalidArgument && message.contains(reason), "{reason}: {code}: {message}");
    }
    client.unmount_overlay("early")?;

    // The server first; the client finds the port taken in the shared
    // network namespace and reaches the server over the pod's loopback.
    client.mount_overlay("server", &layers, true)?;
    client.created(&create("server", &process, cri_namespaces(), Some("pod-1")))?;
    client.start_container("server")?;
    let server_head = read_until(&mut client, "server", "role=")?;
    ensure!(server_head.contains("role=server"), "{server_head}");
    client.mount_overlay("client", &layers, true)?;
    // No namespace list at all: still the pod's, never the agent's.
    client.created(&create("client", &process, Vec::new(), None))?;
    client.start_container("client")?;
    let (client_out, _) = finish(&mut client, "client")?;
    let (server_rest, _) = finish(&mut client, "server")?;
    let server = facts(&format!("{server_head}{server_rest}"));
    let member = facts(&client_out);
    ensure!(member.get("role").map(String::as_str) == Some("client"), "{client_out}");
    ensure!(client_out.contains("role=client got=hello-from-pod-1"), "{client_out}");
    for key in ["net", "ipc", "uts"] {
        ensure!(server.contains_key(key) && server.get(key) == member.get(key), "{key}: {server:?} vs {member:?}");
    }
    ensure!(server.get("pid") != member.get("pid"), "one PID namespace: {server:?} vs {member:?}");
    // One IPC namespace: the client finds the segment the server made and
    // wrote (its PID is 1 in its own PID namespace).
    ensure!(server.get("shm").map(String::as_str) == Some("none"), "{server:?}");
    ensure!(member.get("shm").map(String::as_str) == Some("shm-from-pod-1-1"), "{member:?}");
    // Before the server bound its port, nothing listened in the pod's network
    // namespace: not the agent, not the namespace holder; then only the server.
    ensure!(server.get("listening").map(String::as_str) == Some(""), "{server:?}");
    ensure!(member.get("listening").map(String::as_str) == Some(PORT), "{member:?}");
    for facts in [&server, &member] {
        ensure!(facts.get("hostname").map(String::as_str) == Some("pod-1"), "{facts:?}");
        // Each sees its own process only: not the other's, not the holder.
        ensure!(facts.get("pids").map(String::as_str) == Some("1"), "{facts:?}");
        // No raw sockets (no CAP_NET_RAW by default) but ping; no user
        // namespaces (none in the kernel); the host configures the network
        // only through requests (no router advertisements or redirects).
        ensure!(facts.get("raw_socket").is_some_and(|r| r.starts_with("EPERM")), "{facts:?}");
        ensure!(facts.get("ping_socket").map(String::as_str) == Some("open"), "{facts:?}");
        ensure!(facts.get("userns").is_some_and(|r| r.starts_with('E')), "{facts:?}");
        ensure!(facts.get("netconf").map(String::as_str) == Some("0,0,0,0"), "{facts:?}");
    }
    for id in ["server", "client"] {
        client.delete_container(id)?;
        client.unmount_overlay(id)?;
    }

    guest.finish(&mut client)?;
    Ok(())
}

/// A port on 127.0.0.1 that nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The pod's NIC on QEMU user-mode networking: the hostile network requests
/// are refused with their reasons, the NIC moves into the pod configured as
/// the host asked, and a container serving on it answers a client on the
/// host through a forwarded port on 127.0.0.1.
#[test]
fn a_pods_container_serves_the_host_through_the_nic_the_policy_allowed() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let command = [oci::ENTRYPOINT, "pod", "8080"];
    // A service on the host's loopback, which the pod must not reach.
    let host_service = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let service_port = host_service.local_addr()?.port();
    let reach_host = [oci::ENTRYPOINT.to_string(), "connect".into(), format!("10.0.2.2:{service_port}")];
    let spec = serde_json::json!({
        "name": "web", "command": command, "exec_processes": [{"command": reach_host, "signals": []}],
    });
    let fixture = oci::PolicyFixture::with_spec(&hello, spec)?;
    let host_port = free_port()?;
    let mac = parma_host::qemu::DEFAULT_MAC;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.nic = Some(parma_host::Nic::user(vec![parma_host::PortForward { udp: false, host: host_port, guest: 8080 }]));
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    let nic = parma_host::Nic::format_mac(&mac);
    let interface = |name: &str, hw_addr: &str, addresses: &[&str], raw_flags: u32| Interface {
        name: name.into(),
        hw_addr: hw_addr.into(),
        mtu: 1500,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        raw_flags,
    };
    let route = |dest: &str, gateway: Option<&str>, device: &str| Route {
        dest: dest.into(),
        gateway: gateway.map(Into::into),
        device: device.into(),
        source: None,
        scope: 0,
    };
    let eth0 = interface("eth0", &nic, &[parma_host::qemu::USER_NET_GUEST], 0);

    // No pod yet: nowhere to put the NIC.
    let (code, message) = refused(client.update_interface(&eth0))?;
    ensure!(code == ErrorCode::WrongState && message.contains("not a pod"), "{code}: {message}");
    client.create_sandbox("web-1", false)?;

    // Refused by the framework, whatever the policy says.
    denied(client.update_interface(&interface("lo", &nic, &[], 0)), "loopback interface")?;
    denied(client.update_interface(&interface("eth0", "01:00:5e:00:00:01", &[], 0)), "multicast")?;
    denied(client.update_interface(&interface("eth0", "00:00:00:00:00:00", &[], 0)), "zero")?;
    denied(client.update_interface(&interface("eth0", &nic, &[], 0x100)), "not 0 or NOARP")?;
    denied(client.update_interface(&interface("eth0", &nic, &["127.0.0.9/8"], 0)), "loopback address")?;
    // Malformed: refused before the policy.
    let (code, message) = refused(client.update_interface(&interface("eth0", "52:54:00", &[], 0)))?;
    ensure!(code == ErrorCode::InvalidArgument && message.contains("six hex bytes"), "{code}: {message}");
    // A MAC no NIC has.
    let (code, message) = refused(client.update_interface(&interface("eth0", "52:54:00:99:99:99", &[], 0)))?;
    ensure!(code == ErrorCode::NotFound && message.contains("no network interface"), "{code}: {message}");

    // A second request replaces the interface's addresses.
    client.update_interface(&interface("eth0", &nic, &["10.0.2.99/24", "10.0.2.15/24"], 0))?;
    client.update_interface(&eth0)?;
    denied(client.update_routes(&[route("default", Some("10.0.2.2"), "lo")]), "through lo")?;
    denied(client.update_routes(&[route("default", Some("127.0.0.1"), "eth0")]), "loopback address")?;
    client.update_routes(&[route("default", Some(parma_host::qemu::USER_NET_GATEWAY), "eth0")])?;
    let gateway = ArpNeighbor {
        to_ip_address: parma_host::qemu::USER_NET_GATEWAY.into(),
        device: "eth0".into(),
        ll_address: "52:55:0a:00:02:02".into(),
        state: 128,
        flags: 0,
    };
    denied(client.add_arp_neighbors(&[ArpNeighbor { state: 2, ..gateway.clone() }]), "not permanent")?;
    client.add_arp_neighbors(&[gateway])?;

    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    let process = run::process_from_config(&fixture.built.config, &args)?;
    client.mount_overlay("web", &layers, true)?;
    client.created(&create("web", &process, cri_namespaces(), None))?;
    client.start_container("web")?;
    let head = read_until(&mut client, "web", "role=")?;
    ensure!(head.contains("role=server"), "{head}");
    // With the NIC up, nothing listened in the pod's network namespace
    // before the container: the agent serves vsock and virtio-serial only,
    // from a network namespace of its own.
    ensure!(head.lines().any(|line| line == "listening="), "{head}");
    ensure!(head.lines().any(|line| line == "local=10.0.2.15"), "{head}");

    // QEMU's user-mode network is restricted: the pod cannot reach the
    // host (10.0.2.2 is the host's loopback there) or anything beyond it.
    client.exec_process("web", "reach", &run::process_from_config(&fixture.built.config, &reach_host)?)?;
    let mut reach = Vec::new();
    let status = run::pump(&mut client, "web", Some("reach"), &mut reach, &mut Vec::new(), Duration::from_secs(60))?;
    let reach = String::from_utf8(reach)?;
    ensure!(run::exit_code(&status) == 0 && reach.starts_with("connect=") && reach.trim() != "connect=ok", "{reach}");
    drop(host_service);

    // The host's client, through QEMU's forward on 127.0.0.1.
    let forwarded = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    let give_up = Instant::now() + Duration::from_secs(60);
    let answer = answer_of(forwarded, b"", give_up, &mut || true)
        .with_context(|| format!("no answer through the forwarded port\n{}", guest.serial()))?;
    ensure!(answer == "hello-from-web-1", "{answer:?}");
    finish(&mut client, "web")?;
    client.delete_container("web")?;
    client.unmount_overlay("web")?;

    guest.finish(&mut client)?;
    Ok(())
}

/// `parma run -p HOST:GUEST`: the README's example. The UVM becomes a pod
/// with a NIC on QEMU user-mode networking, each step decided by the
/// policy `parma policy gen` wrote, and busybox's `httpd` in the container
/// answers an HTTP client on the host through 127.0.0.1 (it serves for
/// 20 s, then the container's shell ends and `parma run` with it).
#[test]
fn parma_run_publishes_a_container_port_on_the_hosts_loopback() -> anyhow::Result<()> {
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    let hello = paths.guest_binary("oci-hello")?;
    let command = ["/bin/sh", "-c", "/bin/busybox httpd -p 8080 -h /etc && /bin/sleep 20"];
    let fixture = oci::PolicyFixture::new(&hello, "web", Some(&command), None)?;
    let host_port = free_port()?;
    let mut child = fixture
        .parma_run(&parma, &paths.uvm)
        .args(["-q", "--id", "web", "-p", &format!("{host_port}:8080"), "--"])
        .args(command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let forwarded = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    let give_up = Instant::now() + Duration::from_secs(240);
    let request = b"GET /passwd HTTP/1.0\r\nHost: web\r\n\r\n";
    let answer = answer_of(forwarded, request, give_up, &mut || child.try_wait().is_ok_and(|status| status.is_none()));
    let out = child.wait_with_output()?;
    let answer = answer.with_context(|| format!("no answer\n{}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(answer.starts_with("HTTP/1.") && answer.contains(" 200 "), "{answer}");
    // The image's /etc/passwd, served from its dm-verity layers.
    ensure!(answer.contains("app:x:1000:1000"), "{answer}");
    ensure!(out.status.code() == Some(0), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `CopyFile`: a file the orchestrator hands in lands where the policy
/// allows, and reaches a container only as the bind mount its policy
/// entry lists; a copy over it updates what containers see. Hostile copies
/// are refused with their reasons.
#[test]
fn files_the_orchestrator_hands_in_reach_containers_only_through_listed_binds() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let command = ["/bin/cat", "/etc/hosts"];
    let rule = |options: [&str; 2]| {
        serde_json::json!({
            "destination": "/etc/hosts", "type": "bind", "source": "/run/parma/files/pod/[a-z]+", "options": options,
        })
    };
    // The policy would even allow a writable bind; the agent does not.
    let rules = [rule(["rbind", "ro"]), rule(["rbind", "rw"])];
    let fixture = oci::PolicyFixture::with_mounts(&hello, "reader", Some(&command), None, &rules)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;

    let big = vec![b'x'; 600 * 1024];
    for (path, data, mode, code, reason) in [
        ("../etc/passwd", &b"x"[..], 0o644, ErrorCode::InvalidArgument, "components"),
        ("/etc/hosts", b"x", 0o644, ErrorCode::InvalidArgument, "components"),
        ("pod/.hosts", b"x", 0o644, ErrorCode::InvalidArgument, "hidden"),
        ("pod/hosts", b"x", 0o4755, ErrorCode::InvalidArgument, "beyond 0777"),
        ("pod/hosts", &big, 0o644, ErrorCode::InvalidArgument, "at most"),
        ("pod/passwd", b"root::0:0::/:/bin/sh\n", 0o644, ErrorCode::PolicyDenied, "matches none"),
    ] {
        let (got, message) = refused(client.copy_file(path, data, mode))?;
        ensure!(got == code && message.contains(reason), "{reason}: {got}: {message}");
    }
    client.copy_file("pod/hosts", b"10.0.2.15 web-1\n", 0o644)?;

    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    let process = run::process_from_config(&fixture.built.config, &args)?;
    let bind = |source: &str| parma_protocol::Mount {
        destination: "/etc/hosts".into(),
        kind: "bind".into(),
        source: source.into(),
        options: vec!["rbind".into(), "ro".into()],
    };
    // Allowed by the mount rule, but never copied: refused, nothing runs.
    client.mount_overlay("early", &layers, true)?;
    let (code, message) =
        refused(client.create_container_with("early", &process, None, &[bind("/run/parma/files/pod/hostname")]))?;
    ensure!(message.contains("was not copied in"), "{code}: {message}");
    let mut writable = bind("/run/parma/files/pod/hosts");
    writable.options = vec!["rbind".into(), "rw".into()];
    let (code, message) = refused(client.create_container_with("early", &process, None, &[writable]))?;
    ensure!(message.contains("bound read-only"), "{code}: {message}");
    // Not a source the policy lists.
    denied(
        client.create_container_with("early", &process, None, &[bind("/run/parma/volumes/pod")]),
        "matches no mount rule",
    )?;
    client.unmount_overlay("early")?;

    for (id, expected) in [("first", "10.0.2.15 web-1\n"), ("second", "10.0.2.16 web-1\n")] {
        if id == "second" {
            // The orchestrator updates the file: same path, new contents.
            client.copy_file("pod/hosts", expected.as_bytes(), 0o644)?;
        }
        client.mount_overlay(id, &layers, true)?;
        client.create_container_with(id, &process, None, &[bind("/run/parma/files/pod/hosts")])?;
        client.start_container(id)?;
        client.write_stdin(id, None, &[], true)?;
        let (stdout, code) = finish(&mut client, id)?;
        ensure!(code == 0 && stdout == expected, "{id}: {code}: {stdout:?}");
        client.delete_container(id)?;
        client.unmount_overlay(id)?;
    }
    guest.finish(&mut client)?;
    Ok(())
}

/// A pod container's namespaces (the CRI's) asking for the pod's PID namespace.
fn sharing_pid() -> Vec<Namespace> {
    parma_tests::cri_namespaces(true)
}

/// `process` as root.
fn as_root(mut process: ProcessSpec) -> ProcessSpec {
    (process.uid, process.gid, process.groups) = (0, 0, Vec::new());
    process
}

/// Wait until a process of container `id` (its init without `exec`) has
/// exited (30 s at most).
fn wait_exited(client: &mut Client, id: &str, exec: Option<&str>) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(30);
    while client.wait_process(id, exec)?.running {
        ensure!(Instant::now() < give_up, "{id} still runs after 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A pod that shares its PID namespace (Kubernetes' `shareProcessNamespace`,
/// allowed by the policy's `sandbox.share_pid`): containers that ask see
/// each other's processes and the namespace holder as PID 1; one that does
/// not ask keeps its own.
#[test]
fn containers_of_a_pod_that_shares_its_pid_namespace_see_each_other() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let command = [oci::ENTRYPOINT, "pod", PORT];
    let attack = [oci::ENTRYPOINT, "stop-all"];
    // Members run as root (as many images do): one may signal every root
    // process it sees.
    let spec = serde_json::json!({
        "name": "member", "command": command, "sandbox": {"share_pid": true}, "user": {"uid": 0, "gid": 0},
        "exec_processes": [{"command": attack, "signals": [9]}],
    });
    let fixture = oci::PolicyFixture::with_spec(&hello, spec)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    let process = as_root(run::process_from_config(&fixture.built.config, &args)?);
    client.create_sandbox("pod-3", true)?;
    let sharing = sharing_pid();

    client.mount_overlay("server", &layers, true)?;
    client.created(&create("server", &process, sharing.clone(), None))?;
    client.start_container("server")?;
    let server_head = read_until(&mut client, "server", "role=")?;
    ensure!(server_head.contains("role=server"), "{server_head}");
    client.mount_overlay("client", &layers, true)?;
    client.created(&create("client", &process, sharing, None))?;
    client.start_container("client")?;
    let (client_out, _) = finish(&mut client, "client")?;
    let (server_rest, _) = finish(&mut client, "server")?;
    let server = facts(&format!("{server_head}{server_rest}"));
    let member = facts(&client_out);
    ensure!(client_out.contains("role=client got=hello-from-pod-3"), "{client_out}");
    ensure!(server.contains_key("pid") && server.get("pid") == member.get("pid"), "{server:?} vs {member:?}");
    // The holder and itself; then the holder, the server and itself.
    ensure!(server.get("pids").map(String::as_str) == Some("2"), "{server:?}");
    ensure!(member.get("pids").map(String::as_str) == Some("3"), "{member:?}");

    // Without the path, a container of the same pod keeps its own.
    client.mount_overlay("alone", &layers, true)?;
    client.created(&create("alone", &process, cri_namespaces(), None))?;
    client.start_container("alone")?;
    let alone_head = read_until(&mut client, "alone", "role=")?;
    let alone = facts(&alone_head);
    ensure!(alone.get("pids").map(String::as_str) == Some("1") && alone.get("pid") != server.get("pid"), "{alone:?}");
    client.signal_process("alone", None, 9)?;
    wait_exited(&mut client, "alone", None)?;
    for id in ["server", "client", "alone"] {
        client.delete_container(id)?;
        client.unmount_overlay(id)?;
    }

    // From the inside: a member that stops every process it sees while
    // other containers join. A joining container's setup, with the agent's
    // privileges, is never in the pod's PID namespace; what is (the
    // process, unprivileged, before its execve) is killed after the launch
    // deadline at most: the agent answers throughout.
    client.mount_overlay("stopper", &layers, true)?;
    client.created(&create("stopper", &process, sharing_pid(), None))?;
    client.start_container("stopper")?;
    read_until(&mut client, "stopper", "role=server")?;
    let attack =
        as_root(run::process_from_config(&fixture.built.config, &[oci::ENTRYPOINT.into(), "stop-all".into()])?);
    client.exec_process("stopper", "attack", &attack)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut outcomes = Vec::new();
    for round in 0..3 {
        let id = format!("victim-{round}");
        client.mount_overlay(&id, &layers, true)?;
        client.created(&create(&id, &process, sharing_pid(), None))?;
        let began = Instant::now();
        let started = client.start_container(&id);
        let took = began.elapsed();
        ensure!(took < Duration::from_secs(30), "starting {id} took {took:?}");
        client.ping().with_context(|| guest.serial())?;
        outcomes.push(started.as_ref().map(|_| "started").map_err(ToString::to_string));
        if started.is_ok() {
            client.signal_process(&id, None, 9)?;
            wait_exited(&mut client, &id, None)?;
        }
        client.delete_container(&id)?;
        client.unmount_overlay(&id)?;
    }
    eprintln!("joining while a member stops everything: {outcomes:?}");
    client.signal_process("stopper", Some("attack"), 9)?;
    wait_exited(&mut client, "stopper", Some("attack"))?;
    client.signal_process("stopper", None, 9)?;
    wait_exited(&mut client, "stopper", None)?;
    client.delete_container("stopper")?;
    client.unmount_overlay("stopper")?;
    // The pod works on: a member starts and sees the holder and itself.
    client.mount_overlay("after", &layers, true)?;
    client.created(&create("after", &process, sharing_pid(), None))?;
    client.start_container("after")?;
    let after = facts(&read_until(&mut client, "after", "role=server")?);
    ensure!(after.get("pids").map(String::as_str) == Some("2"), "{after:?}");
    client.signal_process("after", None, 9)?;
    wait_exited(&mut client, "after", None)?;
    client.delete_container("after")?;
    client.unmount_overlay("after")?;
    guest.finish(&mut client)?;
    Ok(())
}

/// What a server at `address` answers one connection on which `request`
/// was sent, tried until `give_up` while `alive` says the server may still
/// come.
fn answer_of(
    address: std::net::SocketAddr,
    request: &[u8],
    give_up: Instant,
    alive: &mut dyn FnMut() -> bool,
) -> Option<String> {
    use std::io::{Read, Write};
    loop {
        let attempt = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            stream.write_all(request)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).map(|_| answer)
        });
        match attempt {
            Ok(answer) if !answer.is_empty() => return Some(answer),
            _ if Instant::now() < give_up && alive() => std::thread::sleep(Duration::from_millis(200)),
            _ => return None,
        }
    }
}

/// `parma run` of the `web` pod member answered `answer` and exited 0 with
/// the member's facts; its stdout.
fn served_web(mut child: std::process::Child, answer: Option<String>) -> anyhow::Result<String> {
    let Some(answer) = answer else {
        let _ = child.kill();
        let out = child.wait_with_output()?;
        bail!("no answer\n{}", String::from_utf8_lossy(&out.stderr));
    };
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(answer == "hello-from-web", "{answer:?}");
    ensure!(out.status.code() == Some(0), "{}: {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    ensure!(stdout.contains("role=server") && stdout.contains("hostname=web"), "{stdout}");
    Ok(stdout)
}

/// `parma run --netns PATH`: the UVM's NIC is a tap in a namespace a CNI
/// plugin prepared, tc-redirected to and from its veth; the pod takes the
/// veth's MAC, address and route (each decided by the policy); the
/// container reaches a server in the peer namespace through the route, and
/// a client there reaches the container at the pod's address. Afterwards
/// the namespace is as the plugin left it.
#[test]
fn parma_run_puts_the_pod_on_a_network_namespace_through_a_tap() -> anyhow::Result<()> {
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    let hello = paths.guest_binary("oci-hello")?;
    // First the container calls the peer's server (out through its default
    // route), then serves the peer.
    let peer = std::net::Ipv4Addr::from(CniNamespaces::OUTSIDE_ADDRESS);
    let script = format!("/bin/busybox wget -q -O - http://{peer}:8081/ && echo && exec {} pod 8080", oci::ENTRYPOINT);
    let command = ["/bin/sh", "-c", script.as_str()];
    let fixture = oci::PolicyFixture::new(&hello, "web", Some(&command), None)?;
    let namespaces = CniNamespaces::new("run")?;
    let pod_path = CniNamespaces::path(&namespaces.pod);
    let peer_server = namespaces.in_peer(|| Ok(std::net::TcpListener::bind((peer, 8081))?))?;
    let peer_thread = std::thread::spawn(move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let (mut stream, from) = peer_server.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut request = [0u8; 512];
        let n = stream.read(&mut request)?;
        stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nhello-from-peer")?;
        Ok(format!("{from} {}", String::from_utf8_lossy(request.get(..n).unwrap_or_default())))
    });
    let child = fixture
        .parma_run(&parma, &paths.uvm)
        .args(["-q", "--id", "web", "--netns", &pod_path, "--"])
        .args(command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let server = std::net::SocketAddr::from((CniNamespaces::POD_ADDRESS, 8080));
    let give_up = Instant::now() + Duration::from_secs(240);
    let answer = namespaces.in_peer(|| Ok(answer_of(server, b"", give_up, &mut || true)))?;
    let stdout = served_web(child, answer)?;
    ensure!(stdout.lines().any(|line| line == "local=10.89.0.2"), "the veth's address: {stdout}");
    ensure!(stdout.lines().any(|line| line == "hello-from-peer"), "the peer's answer: {stdout}");
    let asked = peer_thread.join().map_err(|_| anyhow::anyhow!("the peer's server panicked"))??;
    ensure!(asked.starts_with("10.89.0.2:") && asked.contains("GET / HTTP"), "{asked}");
    // The tap went with QEMU, the veth's ingress qdisc with parma.
    let links = std::process::Command::new("ip").args(["-n", &namespaces.pod, "-o", "link", "show"]).output()?;
    let links = String::from_utf8_lossy(&links.stdout);
    ensure!(!links.contains(parma_host::netns::TAP_NAME) && links.contains("eth0"), "{links}");
    let qdiscs =
        std::process::Command::new("tc").args(["-n", &namespaces.pod, "qdisc", "show", "dev", "eth0"]).output()?;
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    ensure!(!qdiscs.contains("ingress"), "{qdiscs}");
    Ok(())
}

/// A pod's containers come after its boot, and their layers with them: the
/// host adds the layer disks to empty PCIe root ports over QMP while the
/// UVM runs, and the agent mounts them through dm-verity as it does the
/// disks it booted with, and runs a container on them.
#[test]
fn layers_added_while_the_uvm_runs_carry_a_container() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let fixture = oci::PolicyFixture::new(&hello, "late", None, None)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    let disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.hotplug_slots = u8::try_from(disks.len())?;
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?).with_context(|| guest.serial())?;
    let mut qmp = guest.qmp()?;
    for (slot, disk) in disks.iter().enumerate() {
        qmp.attach_disk(disk, u8::try_from(slot)?)?;
    }
    let layers = run::mount_layers(&mut client, &fixture.built).with_context(|| guest.serial())?;
    let process = run::process_from_config(&fixture.built.config, &[])?;
    client.mount_overlay("late", &layers, true)?;
    client.create_container("late", &process)?;
    client.start_container("late")?;
    let (out, _) = finish(&mut client, "late")?;
    ensure!(out.contains("uid=1000"), "{out}");
    client.delete_container("late")?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(())
}
