//! The guarantee from the other side: a process inside an allowed container
//! (tenant code an attacker may have compromised, or a layer the host
//! chose) attacks the guest. The test image carries `parma-probe`, which
//! tries every known way out (vsock to the agent, device nodes made by
//! number or brought by a layer, the guest's kernel knobs, masked and
//! read-only paths, mounts, a user namespace, kernel interfaces, cgroups and
//! sysfs) and prints one line per attempt; this test runs it as root and as
//! an unprivileged user in a UVM under QEMU TCG that has everything a real
//! one has (vsock, dm-verity layers, the encrypted scratch's dm devices) and
//! asserts that every attempt is blocked. The host-side half of the same
//! holes (terminals, stdio, updates, properties, logging) is checked on the
//! way.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use parma_host::client::Client;
use parma_host::run;
use parma_protocol::{CapabilitySets, ErrorCode, Resources};
use parma_tests::{Boot, Guest, Paths, denied, oci, refused};
use serde_json::json;

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(60);
const ID: &str = "probe";

/// Attempts that must be in the probe's output, blocked (not absent: each
/// target exists in this UVM). A probe that stopped early or was changed
/// to print less fails here.
const MUST_BE_BLOCKED: &[&str] = &[
    "vsock_cid1",
    "vsock_cid2",
    "vsock_cid3",
    "blockdev/vda",
    "layer_node/blk-254-0",
    "layer_node/blk-253-0",
    "layer_node/blk-252-0",
    "layer_node/chr-1-1",
    "layer_node/chr-10-0",
    "dev_listing",
    "sysctl/kernel.randomize_va_space",
    "sysctl/vm.panic_on_oom",
    "sysctl/fs.protected_symlinks",
    "sysctl/kernel.printk",
    "sysctl/vm.overcommit_memory",
    "masked/proc/timer_list",
    "masked/sys/firmware",
    "readonly/proc/fs",
    "readonly/proc/bus/pci",
    "readonly/proc/irq/default_smp_affinity",
    "mount/tmpfs",
    "mount/proc",
    "mount/devtmpfs",
    "mount/sysfs",
    "mount/remount_root",
    "umount/proc/sys",
    "umount/sys/firmware",
    "userns/blockdev",
    "userns/devtmpfs",
    "dmesg",
    "iopl",
    "module_load",
    "kexec",
    "bpf",
    "agent_visible",
    "run_parma",
    "cgroup/memory.max",
    "cgroup/mkdir",
    "sysfs/read_ahead_kb",
];

/// The probe's lines: attempt name to (status, detail).
fn parse(stdout: &str) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let mut attempts = BTreeMap::new();
    let mut done = None;
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("probe ") else { continue };
        if let Some(summary) = rest.strip_prefix("done: ") {
            done = Some(summary.to_string());
            continue;
        }
        let (name, rest) = rest.split_once(": ").with_context(|| format!("a malformed line: {line:?}"))?;
        let (status, detail) = rest.split_once(": ").unwrap_or((rest, ""));
        attempts.insert(name.to_string(), (status.to_string(), detail.to_string()));
    }
    let done = done.with_context(|| format!("the probe did not finish:\n{stdout}"))?;
    ensure!(done.ends_with(", 0 escaped"), "probe done: {done}\n{stdout}");
    Ok(attempts)
}

/// Run the probe in a container of its own UVM, as root with the default
/// capabilities or as uid 1000 with none; its stdout.
fn probe(as_root: bool) -> anyhow::Result<String> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let caps: Vec<String> = parma_host::policy_gen::DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    let (uid, capabilities) = if as_root {
        (
            0,
            CapabilitySets {
                bounding: caps.clone(),
                effective: caps.clone(),
                permitted: caps,
                ..CapabilitySets::default()
            },
        )
    } else {
        (1000, CapabilitySets { bounding: caps, ..CapabilitySets::default() })
    };
    let fixture = oci::PolicyFixture::with_spec(
        &hello,
        json!({
            "name": ID,
            "command": [oci::PROBE],
            "user": {"uid": uid, "gid": uid},
            "capabilities": capabilities,
        }),
    )?;
    let scratch = fixture.dir().join("scratch.img");
    std::fs::File::create(&scratch)?.set_len(64 << 20)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.disks.push(parma_host::Disk { path: scratch, serial: run::SCRATCH_SERIAL.into(), writable: true });
    // A vsock device, so the agent listens on vsock while the probe runs.
    boot.vsock = true;
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?)?;
    // The policy keeps the console quiet: nothing after this line.
    let quiet = "the policy does not allow runtime logging";
    ensure!(guest.serial().contains(quiet), "no word that logging stops:\n{}", guest.serial());
    denied(client.guest_info(), "reading properties is not allowed by the policy")?;
    client.mount_scratch(run::SCRATCH_SERIAL)?;
    run::mount_image(&mut client, &fixture.built, ID)?;

    let mut process = run::process_from_config(&fixture.built.config, &[oci::PROBE.to_string()])?;
    process.uid = uid;
    process.gid = uid;
    process.capabilities = capabilities;
    // What the policy does not say the host may not add: a terminal (whose
    // ^C, ^\ and ^Z would signal the process), raised limits, /proc/sys
    // writable.
    let mut terminal = process.clone();
    terminal.terminal = true;
    denied(client.create_container(ID, &terminal), "may not run on a terminal")?;
    let mut limits = process.clone();
    limits.rlimits = vec![parma_protocol::Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 1 << 20, hard: 1 << 20 }];
    denied(client.create_container(ID, &limits), "rlimit \"RLIMIT_NOFILE\"")?;
    let mut writable_sys = parma_tests::create_request(ID, &process, Vec::new());
    if let parma_protocol::Request::CreateContainer { readonly_paths, .. } = &mut writable_sys {
        *readonly_paths = Some(vec!["/proc/bus".into()]);
    }
    match client.call(&writable_sys)? {
        parma_protocol::Response::Error(err) if err.code == ErrorCode::PolicyDenied => {
            ensure!(err.message.contains("read-only path \"/proc/sys\" is required"), "{}", err.message);
        }
        other => bail!("a writable /proc/sys was not denied: {other:?}"),
    }

    client.create_container(ID, &process)?;
    client.start_container(ID)?;
    denied(client.start_container(ID), "was already started")?;
    // The container's resource use is a property too: this policy keeps it.
    denied(client.container_stats(ID), "reading properties is not allowed by the policy")?;
    client.write_stdin(ID, None, &[], true)?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(&mut client, ID, None, &mut stdout, &mut stderr, Duration::from_secs(300))?;
    let stdout = String::from_utf8(stdout)?;
    let stderr = String::from_utf8_lossy(&stderr);
    ensure!(run::exit_code(&status) == 0, "probe exit {status:?}\n{stdout}\n{stderr}");
    // The policy allows resource updates for this container (the fixture's
    // spec); the host's update is a decision, then carried out.
    client.update_container(ID, &Resources { memory_max: None, pids_max: Some(64), cpu_max: None })?;
    client.delete_container(ID)?;
    run::unmount_image(&mut client, &fixture.built, ID)?;
    let serial = guest.serial();
    let after = serial.split(quiet).nth(1).unwrap_or_default();
    ensure!(!after.contains("parma-agent") && !after.contains(" INFO ") && !after.contains("container"), "{after}");
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(stdout)
}

fn check(stdout: &str, who: &str) -> anyhow::Result<()> {
    let attempts = parse(stdout).with_context(|| format!("as {who}"))?;
    let escaped: Vec<String> = attempts
        .iter()
        .filter(|(_, (status, _))| status == "ESCAPED")
        .map(|(name, (_, detail))| format!("{name}: {detail}"))
        .collect();
    ensure!(escaped.is_empty(), "as {who}, escaped:\n{}\n\n{stdout}", escaped.join("\n"));
    for name in MUST_BE_BLOCKED {
        match attempts.get(*name) {
            Some((status, _)) if status == "blocked" => {}
            Some((status, detail)) => bail!("as {who}, {name} is {status} ({detail}), not blocked\n{stdout}"),
            None => bail!("as {who}, the probe did not try {name}\n{stdout}"),
        }
    }
    // The layers' verity devices, the scratch's plaintext and its integrity
    // device: blocked by number.
    for dm in ["parma-layer-l0", "parma-layer-l1", "parma-scratch-crypt", "parma-scratch-integrity"] {
        let line =
            attempts.iter().find(|(name, _)| name.starts_with("blockdev/dm-") && name.ends_with(&format!("({dm})")));
        let (name, (status, detail)) = line.with_context(|| format!("as {who}, no attempt on {dm}\n{stdout}"))?;
        ensure!(status == "blocked", "as {who}, {name} is {status}: {detail}");
    }
    Ok(())
}

#[test]
fn a_root_container_cannot_reach_the_agent_devices_keys_or_kernel_knobs() -> anyhow::Result<()> {
    let stdout = probe(true)?;
    check(&stdout, "root")
}

#[test]
fn a_user_container_cannot_reach_the_agent_devices_keys_or_kernel_knobs() -> anyhow::Result<()> {
    let stdout = probe(false)?;
    check(&stdout, "uid 1000")
}

/// A disk whose every read takes `latency`: the host stalling I/O.
fn stalled_disk(serial: &str, latency: Duration) -> parma_host::Disk {
    // QEMU's null-co driver under the raw format, named by a json: path.
    let spec = json!({"file": {
        "driver": "null-co",
        "size": 64 << 20,
        "latency-ns": latency.as_nanos() as u64,
        "read-zeroes": true,
    }});
    parma_host::Disk { path: format!("json:{spec}").into(), serial: serial.into(), writable: false }
}

#[test]
fn a_request_stuck_on_a_stalled_disk_does_not_wedge_the_agent() -> anyhow::Result<()> {
    let paths = Paths::get();
    let policy = paths.repo.join("policies/allow_all.rego");
    let mut boot = Boot::emulated_for_policy(&policy)?;
    // The kernel's partition scan at boot waits for the disk too.
    let latency = Duration::from_secs(8);
    boot.disks.push(stalled_disk("parma-l0", latency));
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY + Duration::from_secs(60), CALL)?;
    client.set_policy(std::fs::read_to_string(&policy)?)?;
    // The mount reads the disk's verity superblock: `latency`.
    let mount = parma_protocol::Request::MountLayer {
        name: "l0".into(),
        serial: "parma-l0".into(),
        root_hash: "0".repeat(64),
        hash_offset: 4096,
    };
    let started = std::time::Instant::now();
    let mount_id = client.send(&mount)?;
    // Meanwhile the agent answers, and powers off when asked.
    client.ping()?;
    let (id, response) = {
        client.send(&parma_protocol::Request::Shutdown)?;
        client.recv()?
    };
    ensure!(id != mount_id && response == parma_protocol::Response::ShuttingDown, "{id}: {response:?}");
    // Answered first, before the mount: no waiting for the disk.
    ensure!(started.elapsed() < latency, "the answers waited for the disk: {:?}", started.elapsed());
    let status = guest.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "QEMU exited with {status}");
    Ok(())
}

/// A pod probed every few seconds for weeks: far more execs than the agent
/// keeps records for, each collected (waited for, output read), and the
/// agent still takes more; a process whose output is not collected is kept
/// until the bound, then further execs are refused by name.
#[test]
fn many_execs_on_one_uvm_keep_the_agent_bounded() -> anyhow::Result<()> {
    const EXECS: usize = 1000;
    let (fixture, mut guest, mut client) = started(512, json!({}), &[oci::ENTRYPOINT, "sleep", "600000"])?;
    let exec = run::process_from_config(&fixture.built.config, &["/bin/cat".into(), "/etc/passwd".into()])?;
    let started = std::time::Instant::now();
    for round in 0..EXECS {
        let exec_id = format!("probe-{}", round % 3);
        client.exec_process("hello", &exec_id, &exec).with_context(|| format!("exec {round}"))?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = run::pump(&mut client, "hello", Some(&exec_id), &mut out, &mut err, Duration::from_secs(60))?;
        ensure!(run::exit_code(&status) == 0 && out.starts_with(b"root:"), "exec {round}: {status:?}");
    }
    let per_exec = started.elapsed() / EXECS as u32;
    // Uncollected processes are bounded.
    for n in 0..parma_agent_max_execs() {
        client.exec_process("hello", &format!("left-{n}"), &exec)?;
    }
    let (code, message) = refused(client.exec_process("hello", "one-more", &exec))?;
    ensure!(code == ErrorCode::LimitReached && message.contains("has not collected"), "{code}: {message}");
    eprintln!("{EXECS} execs collected, {per_exec:?} each under TCG");
    client.signal_process("hello", None, 9)?;
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// The agent's bound on uncollected exec'd processes per container
/// (`MAX_EXECS` in agent/src/containers.rs).
fn parma_agent_max_execs() -> usize {
    64
}

/// A container whose init stops every other process in it, over and over:
/// an exec's process appears in the container only once it is unprivileged,
/// and the agent waits for its `execve` at most `JOIN_DEADLINE`; it answers
/// the exec (one way or the other) and keeps serving.
#[test]
fn a_container_that_stops_every_process_cannot_wedge_an_exec() -> anyhow::Result<()> {
    let command = ["/bin/sh", "-c", "while :; do kill -STOP -1 2>/dev/null; done"];
    let (fixture, mut guest, mut client) = started(512, json!({}), &command)?;
    let exec = run::process_from_config(&fixture.built.config, &["/bin/cat".into(), "/etc/passwd".into()])?;
    for round in 0..3 {
        let started = std::time::Instant::now();
        let outcome = client.exec_process("hello", &format!("stopped-{round}"), &exec);
        ensure!(started.elapsed() < Duration::from_secs(30), "exec {round} took {:?}", started.elapsed());
        eprintln!("exec {round}: {outcome:?} after {:?}", started.elapsed());
        client.ping()?;
    }
    client.signal_process("hello", None, 9)?;
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// Boot a UVM of `memory_mib` for a fixture with `extra` spec fields, mount
/// its image as container `hello` and create and start it with `command`.
fn started(
    memory_mib: u32,
    extra: serde_json::Value,
    command: &[&str],
) -> anyhow::Result<(oci::PolicyFixture, Guest, Client)> {
    let hello = Paths::get().guest_binary("oci-hello")?;
    let mut spec = json!({"command": command});
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    let fixture = oci::PolicyFixture::with_spec(&hello, spec)?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.memory_mib = memory_mib;
    let mut guest = Guest::boot(&Paths::get(), &boot)?;
    let mut client: Client = guest.ready_client(READY, CALL)?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?)?;
    run::mount_image(&mut client, &fixture.built, "hello")?;
    let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    client.create_container("hello", &run::process_from_config(&fixture.built.config, &args)?)?;
    client.start_container("hello")?;
    Ok((fixture, guest, client))
}

/// Wait until container `hello`'s init process exited; how.
fn exited(client: &mut Client) -> anyhow::Result<parma_host::client::ProcessStatus> {
    let give_up = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let status = client.wait_process("hello", None)?;
        if !status.running {
            return Ok(status);
        }
        ensure!(std::time::Instant::now() < give_up, "still running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Without `allow_stdio_access` the process's stdio is /dev/null and the
/// host can neither read its output nor write its input nor resize.
#[test]
fn without_stdio_access_the_host_reads_and_writes_nothing() -> anyhow::Result<()> {
    let (_fixture, mut guest, mut client) =
        started(512, json!({"allow_stdio_access": false}), &[oci::ENTRYPOINT, "stderr", "secret", "sleep", "2000"])?;
    let stream = parma_protocol::OutputStream::Stdout;
    denied(client.read_output("hello", None, stream), "does not allow stdio access")?;
    denied(client.write_stdin("hello", None, b"x", false), "does not allow stdio access")?;
    denied(client.resize_terminal("hello", None, 10, 10), "does not allow stdio access")?;
    // It ran to its end all the same, writing to /dev/null.
    let status = exited(&mut client)?;
    ensure!(status.exit_code == Some(0), "{status:?}");
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// A container with no memory limit of its own is held by the containers'
/// guest-wide limit (memory less an eighth, here 896 MiB of 1 GiB): one
/// that takes 920 MiB, which the guest could give it, is killed by that
/// limit (without it, it would get them and leave the agent next to
/// nothing); the agent keeps serving.
#[test]
fn a_container_without_limits_cannot_take_the_agents_memory() -> anyhow::Result<()> {
    let hog = "exec /bin/busybox dd if=/dev/zero of=/dev/null bs=920M count=1";
    let (_fixture, mut guest, mut client) = started(1024, json!({}), &["/bin/sh", "-c", hog])?;
    let status = exited(&mut client)?;
    ensure!(status.signal == Some(9), "the hog was not OOM-killed: {status:?}");
    client.ping()?;
    client.delete_container("hello")?;
    guest.check_serial()?;
    client.shutdown()?;
    guest.wait_exit(Duration::from_secs(60))?;
    Ok(())
}
