//! Confidential containers end to end under QEMU TCG: a real OCI image
//! (busybox-static and a static test program, two layers, whiteouts) turned
//! into dm-verity layers, a policy from `parma policy gen`, and the agent
//! mounting, stacking and running it, with every host request decided by
//! the policy. Then the attack table: each attack denied or failed with its
//! reason, and the agent still serving.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use parma_host::client::Client;
use parma_host::run;
use parma_protocol::{ErrorCode, ProcessSpec};
use parma_tests::{Boot, Guest, Paths, denied, oci, refused};
use serde_json::json;

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(60);
const ID: &str = "hello";

/// The test image, its layers and a generated policy.
struct Fixture(oci::PolicyFixture);

impl std::ops::Deref for Fixture {
    type Target = oci::PolicyFixture;
    fn deref(&self) -> &oci::PolicyFixture {
        &self.0
    }
}

impl Fixture {
    fn new() -> anyhow::Result<Self> {
        Self::with_command(None)
    }

    /// The policy's container runs `command` instead of the image's entrypoint.
    fn with_command(command: Option<&[&str]>) -> anyhow::Result<Self> {
        Self::with(command, None)
    }

    /// ... and must run under the seccomp profile with this sha256.
    fn with(command: Option<&[&str]>, seccomp_sha256: Option<&str>) -> anyhow::Result<Self> {
        let hello = Paths::get().guest_binary("oci-hello")?;
        Ok(Self(oci::PolicyFixture::new(&hello, "hello", command, seccomp_sha256)?))
    }

    /// The fixture's policy with `extra` spec fields (see `PolicyFixture::with_spec`).
    fn with_spec(extra: serde_json::Value) -> anyhow::Result<Self> {
        let hello = Paths::get().guest_binary("oci-hello")?;
        Ok(Self(oci::PolicyFixture::with_spec(&hello, extra)?))
    }

    fn boot(&self, disks: Vec<parma_host::Disk>) -> anyhow::Result<(Guest, Client)> {
        let mut boot = Boot::emulated_for_policy(&self.policy)?;
        boot.disks = disks;
        let mut guest = Guest::boot(&Paths::get(), &boot)?;
        let mut client = guest.ready_client(READY, CALL)?;
        if let Err(err) = client.set_policy(std::fs::read_to_string(&self.policy)?) {
            bail!("SetPolicy: {err}\nserial:\n{}", guest.serial());
        }
        Ok((guest, client))
    }

    fn process(&self) -> anyhow::Result<ProcessSpec> {
        run::process_from_config(&self.built.config, &[])
    }

    fn process_with(&self, args: &[&str]) -> anyhow::Result<ProcessSpec> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run::process_from_config(&self.built.config, &args)
    }
}

/// The agent still answers, the console shows no panic, the UVM powers off.
fn still_serving_then_shutdown(mut guest: Guest, mut client: Client) -> anyhow::Result<()> {
    guest.finish(&mut client)?;
    Ok(())
}

/// Everything the process printed, and how it ended.
fn output(client: &mut Client, id: &str, exec_id: Option<&str>) -> anyhow::Result<(String, String, i32)> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(client, id, exec_id, &mut stdout, &mut stderr, Duration::from_secs(120))?;
    Ok((String::from_utf8(stdout)?, String::from_utf8(stderr)?, run::exit_code(&status)))
}

#[test]
fn a_container_runs_as_its_policy_says_and_every_attack_is_refused() -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    let layers = &fixture.built.layers.layers;
    ensure!(layers.len() == 2, "the test image has two layers");

    // A layer whose root hash the policy does not name is not even opened.
    let mut wrong = layers[0].root_hash.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong)?;
    denied(client.mount_layer("l0", "parma-l0", &wrong, layers[0].hash_offset), "is not a layer of any container")?;
    // Nothing was mounted: the right hash still mounts under that name.
    for (index, layer) in layers.iter().enumerate() {
        client.mount_layer(&run::layer_name(index), &run::layer_serial(index), &layer.root_hash, layer.hash_offset)?;
    }
    // The same device cannot be mounted twice.
    denied(client.mount_layer("again", "parma-l0", &layers[0].root_hash, layers[0].hash_offset), "already mounted")?;
    // Layers in the wrong order match no container.
    denied(client.mount_overlay(ID, &["l1".into(), "l0".into()], true), "the layers match no container")?;
    client.mount_overlay(ID, &["l0".into(), "l1".into()], true)?;
    // A device under an overlay cannot be unmounted.
    denied(client.unmount_layer("l0"), "is in use by the overlay")?;
    // A fragment signed by an issuer the policy does not list adds nothing;
    // one whose bytes were changed after signing does not even reach the policy.
    let intruder = json!([{"name": "intruder", "layers": []}]);
    let (fragment, signature, key) = oci::signed_fragment(9, oci::FRAGMENT_FEED, 1, intruder.as_array().unwrap())?;
    let issuer = parma_policy::fragment::issuer_id(&key);
    denied(client.load_fragment(&fragment, &signature, &key), &format!("issuer \"{issuer}\" is not listed"))?;
    let mut forged = fragment.clone();
    forged[3] ^= 1;
    denied(client.load_fragment(&forged, &signature, &key), "signature does not verify")?;
    let (code, message) = refused(client.load_fragment(&fragment, b"not a signature", &key))?;
    ensure!(code == ErrorCode::PolicyDenied && message.contains("not an ECDSA P-384 signature"), "{message}");

    // Creates that differ from the policy in one field each.
    let good = fixture.process()?;
    let mut other_command = good.clone();
    other_command.args = vec!["/bin/sh".into(), "-c".into(), "cat /etc/remove-me".into()];
    denied(client.create_container(ID, &other_command), "command")?;
    let mut extra_env = good.clone();
    extra_env.env.push("DEBUG=1".into());
    denied(client.create_container(ID, &extra_env), "DEBUG=1")?;
    let mut root = good.clone();
    root.uid = 0;
    denied(client.create_container(ID, &root), "user")?;
    // Another container id has no overlay of its own.
    denied(client.create_container("intruder", &good), "has no overlay mounted through the policy")?;

    // The real thing.
    client.create_container(ID, &good)?;
    client.start_container(ID)?;
    client.write_stdin(ID, None, &[], true)?;
    let (stdout, stderr, code) = output(&mut client, ID, None)?;
    ensure!(code == 0, "exit code {code}\nstdout:\n{stdout}\nstderr:\n{stderr}\nserial:\n{}", guest.serial());
    for line in [
        "cwd=/srv",
        "uid=1000",
        "gid=1000",
        "env GREETING=hello",
        "whiteout_file=absent",
        "opaque_old=absent",
        "opaque_new=present",
    ] {
        ensure!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }
    ensure!(!stdout.contains("env DEBUG"), "{stdout}");

    // After it exited: exec and signals find no running container.
    denied(client.signal_process("nobody", None, 9), "")?;
    let (code, message) = refused(client.exec_process(ID, "cat", &good))?;
    ensure!(code == ErrorCode::PolicyDenied || code == ErrorCode::WrongState, "{code}: {message}");

    client.delete_container(ID)?;
    run::unmount_image(&mut client, &fixture.built, ID)?;
    still_serving_then_shutdown(guest, client)
}

/// The first data block of `file` in an ext4 image, by debugfs.
fn first_block(image: &Path, file: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("/sbin/debugfs")
        .args(["-R", &format!("blocks {file}")])
        .arg(image)
        .output()
        .context("cannot run debugfs (scripts/deps.sh installs e2fsprogs)")?;
    let text = String::from_utf8(out.stdout)?;
    text.split_whitespace().next().and_then(|b| b.parse().ok()).with_context(|| format!("no blocks for {file}: {text}"))
}

#[test]
fn a_flipped_byte_in_a_layer_reads_as_eio_and_nothing_runs() -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let layers = &fixture.built.layers.layers;
    // Copy the top layer and flip one byte of the test program's first block.
    let tampered = fixture.layers_dir.join("tampered.img");
    let original = fixture.layers_dir.join(&layers[1].file);
    std::fs::copy(&original, &tampered)?;
    let block = first_block(&tampered, oci::ENTRYPOINT)?;
    let mut bytes = std::fs::read(&tampered)?;
    let offset = usize::try_from(block * 4096 + 100)?;
    bytes[offset] ^= 0x01;
    std::fs::write(&tampered, &bytes)?;

    let mut disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    disks[1].path = tampered;
    let (guest, mut client) = fixture.boot(disks)?;
    // The metadata is intact, so the layer mounts with the policy's root hash...
    run::mount_image(&mut client, &fixture.built, ID)?;
    client.create_container(ID, &fixture.process()?)?;
    // ...but the program cannot be read: exec fails with EIO, nothing runs.
    let (code, message) = refused(client.start_container(ID))?;
    ensure!(code == ErrorCode::Failed, "{code}: {message}");
    ensure!(message.contains("os error 5"), "not EIO: {message}");
    still_serving_then_shutdown(guest, client)
}

#[test]
fn exec_and_signals_reach_only_what_the_policy_lists() -> anyhow::Result<()> {
    let command = ["/usr/bin/oci-hello", "sleep", "60000"];
    let fixture = Fixture::with_command(Some(&command))?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    run::mount_image(&mut client, &fixture.built, ID)?;
    let limits = parma_protocol::Resources { memory_max: Some(64 << 20), pids_max: Some(32), cpu_max: None };
    client.create_container_with(ID, &fixture.process_with(&command)?, Some(limits), &[])?;
    client.start_container(ID)?;
    ensure!(client.wait_process(ID, None)?.running, "the container should sleep");

    // It sees its own cgroup (a cgroup namespace) with the limits asked for.
    let limits = fixture.process_with(&["/bin/cat", "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max"])?;
    client.exec_process(ID, "limits", &limits)?;
    let (stdout, stderr, code) = output(&mut client, ID, Some("limits"))?;
    ensure!(code == 0 && stdout == "32\n67108864\n", "exit {code}: {stdout}{stderr}");

    // The policy's exec process runs in the container's namespaces and root.
    let cat = fixture.process_with(&["/bin/cat", "/etc/passwd"])?;
    client.exec_process(ID, "cat", &cat)?;
    let (stdout, stderr, code) = output(&mut client, ID, Some("cat"))?;
    ensure!(code == 0 && stdout.contains("app:x:1000:1000"), "exit {code}: {stdout}{stderr}");
    // It starts with default signal handling (the agent ignores SIGPIPE; the container must not).
    client.exec_process(ID, "status", &fixture.process_with(&["/bin/cat", "/proc/self/status"])?)?;
    let (stdout, stderr, code) = output(&mut client, ID, Some("status"))?;
    ensure!(code == 0, "exit {code}: {stderr}");
    for line in
        ["SigIgn:\t0000000000000000", "SigBlk:\t0000000000000000", "NoNewPrivs:\t1", "Uid:\t1000\t1000\t1000\t1000"]
    {
        ensure!(stdout.lines().any(|l| l == line), "no {line:?} in:\n{stdout}");
    }
    // Anything else is denied, with the reason.
    denied(client.exec_process(ID, "sh", &fixture.process_with(&["/bin/sh"])?), "no exec process of container")?;
    denied(client.exec_process("nobody", "cat", &cat), "is not running")?;
    // The allowed command as root: refused, an exec keeps the container's identity.
    let mut as_root = cat.clone();
    as_root.uid = 0;
    let (code, message) = refused(client.exec_process(ID, "root", &as_root))?;
    ensure!(code == ErrorCode::InvalidArgument && message.contains("must run with the container's uid"), "{message}");
    // Signal 15 is not in the policy's list; 9 is.
    denied(client.signal_process(ID, None, 15), "signal")?;
    denied(client.signal_process("nobody", None, 9), "is not running")?;
    ensure!(client.wait_process(ID, None)?.running, "a denied signal did nothing");
    client.signal_process(ID, None, 9)?;
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client.wait_process(ID, None)?;
        if !status.running || std::time::Instant::now() > give_up {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.signal == Some(9), "{status:?}");

    client.delete_container(ID)?;
    run::unmount_image(&mut client, &fixture.built, ID)?;
    still_serving_then_shutdown(guest, client)
}

#[test]
fn parma_run_runs_the_image_and_returns_its_exit_code() -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    let run = |extra: &[&str]| fixture.parma_run(&parma, &paths.uvm).args(extra).output();
    let out = run(&[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(0), "parma run: {}\n{stdout}\n{stderr}", out.status);
    ensure!(stdout.lines().any(|l| l == "whiteout_file=absent"), "{stdout}");
    ensure!(stdout.lines().any(|l| l == "uid=1000"), "{stdout}");
    ensure!(stderr.contains("INSECURE"), "emulation must say so: {stderr}");

    // A command the policy does not allow: denied, with the reason, nothing runs.
    let out = run(&["--", "/bin/sh", "-c", "echo pwned"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(126) && !stdout.contains("pwned"), "{}: {stdout}\n{stderr}", out.status);
    ensure!(stderr.contains("denied by the policy") && stderr.contains("command"), "{stderr}");

    // Checked before any work: an SEV-SNP launch under TCG converts no layer.
    let fresh = fixture.dir().join("fresh-layers");
    let out = std::process::Command::new(&parma)
        .args(["run", "--snp", "--ovmf", "/nonexistent/OVMF.fd", "--uvm"])
        .arg(&paths.uvm)
        .arg("--policy")
        .arg(&fixture.policy)
        .arg("--oci")
        .arg(&fixture.layout)
        .arg("--layers-dir")
        .arg(&fresh)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(125) && stderr.contains("needs --accel kvm"), "{}: {stderr}", out.status);
    ensure!(!fresh.exists(), "layers were built for a launch that cannot happen");
    Ok(())
}

/// `parma run` exits as `docker run` when the command cannot run: 127 for
/// an executable the image lacks, 126 for a file that is not one; each
/// says why, and the agent told it by an error code, not a message.
#[test]
fn parma_run_exits_127_for_a_missing_executable_and_126_for_one_that_cannot_run() -> anyhow::Result<()> {
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    for (command, code, says) in [("/bin/nope", 127, "is not in the image"), ("/etc/passwd", 126, "cannot run")] {
        let fixture = Fixture::with_command(Some(&[command]))?;
        let out = fixture.parma_run(&parma, &paths.uvm).args(["--", command]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(code), "{command}: {} (expected {code})\n{stderr}", out.status);
        ensure!(stderr.contains(says), "{command}: {stderr}");
    }
    Ok(())
}

#[test]
fn container_writes_reach_the_scratch_disk_only_encrypted_and_authenticated() -> anyhow::Result<()> {
    const MARKER: &str = "PARMA-PLAINTEXT-MARKER-0123456789";
    let script = format!(
        "/bin/busybox yes {MARKER} | head -c 20971520 > /srv/big; head -c 33 /srv/big; echo; read go; \
         cat /sys/fs/cgroup/memory.swap.current; read go; cat /srv/big > /dev/null; echo rc=$?"
    );
    let command = ["/bin/sh", "-c", script.as_str()];
    let fixture = Fixture::with_command(Some(&command))?;
    let scratch = fixture.dir().join("scratch.img");
    std::fs::File::create(&scratch)?.set_len(128 << 20)?;
    let mut disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    disks.push(parma_host::Disk { path: scratch.clone(), serial: run::SCRATCH_SERIAL.into(), writable: true });
    let (guest, mut client) = fixture.boot(disks)?;

    let (device, bytes) = client.mount_scratch(run::SCRATCH_SERIAL)?;
    ensure!(bytes > 96 << 20 && device.starts_with("/dev/dm-"), "{device}: {bytes} bytes");
    // Once per boot, and never on a layer's disk.
    let (code, message) = refused(client.mount_scratch(run::SCRATCH_SERIAL))?;
    ensure!(code == ErrorCode::Failed && message.contains("already"), "{message}");
    let (code, message) = refused(client.mount_scratch("parma-l0"))?;
    ensure!(code == ErrorCode::Failed, "{message}");

    // 20 MiB written to the container's upper layer (guest memory)...
    run::mount_image(&mut client, &fixture.built, ID)?;
    client.create_container(ID, &fixture.process_with(&command)?)?;
    client.start_container(ID)?;
    let first = read_lines(&mut client, 1)?;
    ensure!(first == [MARKER], "the data reads back: {first:?}");
    // ...then the container may keep only 4 MiB in memory: the rest goes to the scratch.
    let limits = parma_protocol::Resources { memory_max: Some(4 << 20), pids_max: None, cpu_max: None };
    client.update_container(ID, &limits)?;
    client.write_stdin(ID, None, b"go\n", false)?;
    let swapped: u64 = read_lines(&mut client, 1)?.concat().trim().parse().context("memory.swap.current")?;
    ensure!(swapped > 12 << 20, "only {swapped} bytes were swapped out");

    // The host's view of the disk: much was written, none of it readable.
    // memory.swap.current counts swap slots as they are allocated; the writes
    // behind them may still be in flight, so wait for them to land.
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    let (disk, written) = loop {
        let disk = std::fs::read(&scratch)?;
        let written = disk.chunks(4096).filter(|block| block.iter().any(|b| *b != 0)).count() as u64 * 4096;
        if written > swapped || std::time::Instant::now() >= give_up {
            break (disk, written);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    ensure!(written > swapped, "only {written} of {swapped} swapped bytes reached the disk");
    let marker = MARKER.as_bytes();
    ensure!(!disk.windows(marker.len()).any(|w| w == marker), "the scratch disk holds the plaintext");
    ensure!(!disk.windows(6).any(|w| w == b"PARMA-"), "the scratch disk holds a piece of the plaintext");

    // The host overwrites the swapped data: the container cannot read it back.
    let file = std::fs::OpenOptions::new().write(true).open(&scratch)?;
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0x5a; disk.len() - (1 << 20)], 1 << 20)?;
    file.sync_all()?;
    client.write_stdin(ID, None, b"go\n", true)?;
    let (rest, stderr, code) = output(&mut client, ID, None)?;
    ensure!(!rest.contains("rc=0"), "forged swap was read as data: {rest}\n{stderr}");
    ensure!(code != 0 || rest.contains("rc=1"), "exit {code}: {rest}\n{stderr}");
    still_serving_then_shutdown(guest, client)
}

/// The next `count` lines of the container's stdout.
fn read_lines(client: &mut Client, count: usize) -> anyhow::Result<Vec<String>> {
    let mut text = String::new();
    let give_up = std::time::Instant::now() + Duration::from_secs(240);
    while text.matches('\n').count() < count {
        let (data, eof) = client.read_output(ID, None, parma_protocol::OutputStream::Stdout)?;
        text.push_str(std::str::from_utf8(&data)?);
        if eof || std::time::Instant::now() >= give_up {
            let (stderr, _) = client.read_output(ID, None, parma_protocol::OutputStream::Stderr)?;
            bail!("the container stopped early: {text}\nstderr: {}", String::from_utf8_lossy(&stderr));
        }
        if data.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(text.lines().map(str::to_string).collect())
}

#[test]
fn a_fragment_from_the_listed_issuer_adds_a_container_the_base_policy_lacks() -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    run::mount_image(&mut client, &fixture.built, "side")?;
    let sidecar = fixture.process_with(&["/bin/busybox", "echo", "sidecar"])?;
    // The base policy has one container, "hello": this command is not its.
    denied(client.create_container("side", &sidecar), "tried \"hello\"")?;
    client.unmount_overlay("side")?;

    // The listed issuer adds "sidecar", same layers, that command.
    let spec: parma_host::policy_gen::Spec = serde_json::from_value(json!({
        "name": "sidecar", "command": ["/bin/busybox", "echo", "sidecar"], "no_new_privileges": true,
    }))?;
    let container = serde_json::to_value(parma_host::policy_gen::container(&fixture.built, &spec))?;
    let old = oci::signed_fragment(7, oci::FRAGMENT_FEED, 0, std::slice::from_ref(&container))?;
    denied(client.load_fragment(&old.0, &old.1, &old.2), "svn 0 of feed")?;
    let (fragment, signature, key) = oci::signed_fragment(7, oci::FRAGMENT_FEED, 2, &[container])?;
    let loaded = client.load_fragment(&fragment, &signature, &key)?;
    ensure!(loaded.feed == oci::FRAGMENT_FEED && loaded.svn == 2 && loaded.containers == 1, "{loaded:?}");
    ensure!(loaded.issuer == parma_policy::fragment::issuer_id(&oci::fragment_issuer_key()), "{loaded:?}");
    denied(client.load_fragment(&fragment, &signature, &key), "is already loaded")?;

    // Now the same request is allowed, and runs.
    client.mount_overlay("side", &["l0".into(), "l1".into()], true)?;
    client.create_container("side", &sidecar)?;
    client.start_container("side")?;
    let (stdout, stderr, code) = output(&mut client, "side", None)?;
    ensure!(stdout == "sidecar\n" && code == 0, "exit {code}: {stdout}\n{stderr}");
    still_serving_then_shutdown(guest, client)
}

#[test]
fn seccomp_profiles_and_rlimits_apply_to_the_container() -> anyhow::Result<()> {
    // A deny-list with two actions: mkdir fails with EPERM, rmdir with
    // ENOSYS, everything else is allowed.
    let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                     {"names": ["rmdir", "clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#;
    let digest = parma_policy::policy_hash(profile.as_bytes());
    let command = ["/bin/sh", "-c", "mkdir /srv/x; echo mkdir=$?; rmdir /srv; echo rmdir=$?; ulimit -n; read go"];
    let fixture = Fixture::with_spec(json!({
        "command": command,
        "seccomp_profile_sha256": digest,
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 64}],
    }))?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    run::mount_image(&mut client, &fixture.built, ID)?;
    let mut process = fixture.process_with(&command)?;
    // Without the profile, or with another one, the policy says no.
    denied(client.create_container(ID, &process), "seccomp profile")?;
    process.seccomp = Some(profile.replace("mkdirat", "chmod"));
    denied(client.create_container(ID, &process), "seccomp profile")?;
    process.seccomp = Some(profile.to_string());
    // A limit above the policy's is refused; at the policy's it is set.
    process.rlimits = vec![parma_protocol::Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 64, hard: 65 }];
    denied(client.create_container(ID, &process), "rlimit \"RLIMIT_NOFILE\" (soft 64, hard 65)")?;
    process.rlimits = vec![parma_protocol::Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 64, hard: 64 }];
    client.create_container(ID, &process)?;
    client.start_container(ID)?;
    // An exec under the same profile (which answers clone3 with ENOSYS, as
    // containerd's default does): the agent forks it before the filter.
    let mut cat = fixture.process_with(&["/bin/cat", "/etc/passwd"])?;
    cat.seccomp = process.seccomp.clone();
    cat.rlimits = process.rlimits.clone();
    client.exec_process(ID, "cat", &cat)?;
    let (passwd, _, code) = output(&mut client, ID, Some("cat"))?;
    ensure!(code == 0 && passwd.starts_with("root:"), "exec under the profile: {code} {passwd}");
    client.write_stdin(ID, None, b"go\n", true)?;
    let (stdout, stderr, code) = output(&mut client, ID, None)?;
    ensure!(code == 0, "exit {code}: {stdout}{stderr}");
    ensure!(stdout == "mkdir=1\nrmdir=1\n64\n", "{stdout}\n{stderr}");
    ensure!(stderr.contains("Operation not permitted"), "mkdir gets EPERM: {stderr}");
    ensure!(stderr.contains("Function not implemented"), "rmdir gets ENOSYS: {stderr}");
    still_serving_then_shutdown(guest, client)
}

#[test]
fn a_read_only_root_cannot_be_written() -> anyhow::Result<()> {
    let command = ["/bin/sh", "-c", "touch /srv/new; echo touch=$?; cat /etc/passwd > /dev/null; echo read=$?"];
    let fixture = Fixture::with_command(Some(&command))?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    run::mount_layers(&mut client, &fixture.built)?;
    // No upper layer, and the root remounted read-only inside the container.
    client.mount_overlay(ID, &["l0".into(), "l1".into()], false)?;
    let create = parma_protocol::Request::CreateContainer {
        container_id: ID.into(),
        process: fixture.process_with(&command)?,
        hostname: Some("ro-test".into()),
        readonly_rootfs: true,
        resources: None,
        mounts: Vec::new(),
        masked_paths: None,
        readonly_paths: None,
        namespaces: Vec::new(),
    };
    let response = client.call(&create)?;
    // The answer names the policy's entry the container was created as.
    let entry = parma_protocol::Response::Created { policy_container: Some("hello".into()) };
    ensure!(response == entry, "{response:?}");
    client.start_container(ID)?;
    client.write_stdin(ID, None, &[], true)?;
    let (stdout, stderr, code) = output(&mut client, ID, None)?;
    ensure!(code == 0 && stdout == "touch=1\nread=0\n", "exit {code}: {stdout}{stderr}");
    ensure!(stderr.contains("Read-only file system"), "{stderr}");
    ensure!(!stderr.contains("/dev/null"), "/dev/null must be writable by the container's user: {stderr}");
    client.delete_container(ID)?;
    client.unmount_overlay(ID)?;
    still_serving_then_shutdown(guest, client)
}

/// The policy's mount rules: a tmpfs with its size and mode, and a volume
/// bound read-write into one container and read-only into the next, which
/// reads what the first wrote. A mount the policy does not list is denied
/// with the reason, and nothing is left behind.
#[test]
fn mounts_are_as_the_policy_lists_and_volumes_are_shared() -> anyhow::Result<()> {
    let command = ["/bin/sh", "-c", "cat /data/f 2>/dev/null; echo hi > /data/f; echo write=$?; cat /proc/self/mounts"];
    let volume = "/run/parma/volumes/shared";
    let rules = [
        json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=64k", "mode=1770"]}),
        json!({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]}),
        json!({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "ro"]}),
    ];
    let hello = Paths::get().guest_binary("oci-hello")?;
    let fixture = Fixture(oci::PolicyFixture::with_mounts(&hello, "hello", Some(&command), None, &rules)?);
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    let process = fixture.process_with(&command)?;
    let scratch = run::parse_mount("tmpfs:tmpfs:/scratch:size=64k,mode=1770").map_err(anyhow::Error::msg)?;
    let mount_line = |stdout: &str, target: &str| -> anyhow::Result<String> {
        stdout
            .lines()
            .find(|line| line.split(' ').nth(1) == Some(target))
            .map(str::to_string)
            .with_context(|| format!("{target} is not mounted:\n{stdout}"))
    };

    // Not in the policy: denied, and the container does not exist.
    client.mount_overlay("other", &layers, true)?;
    let other = run::parse_mount("tmpfs:tmpfs:/other").map_err(anyhow::Error::msg)?;
    let (code, message) = refused(client.create_container_with("other", &process, None, &[other]))?;
    ensure!(code == ErrorCode::PolicyDenied && message.contains("matches no mount rule"), "{code:?}: {message}");
    client.unmount_overlay("other")?;

    for (id, options, expect_first, expect_write) in
        [("writer", "rbind,rw", "", "write=0"), ("reader", "rbind,ro", "hi\n", "write=1")]
    {
        let data = run::parse_mount(&format!("bind:{volume}:/data:{options}")).map_err(anyhow::Error::msg)?;
        client.mount_overlay(id, &layers, true)?;
        client.create_container_with(id, &process, None, &[scratch.clone(), data])?;
        client.start_container(id)?;
        client.write_stdin(id, None, &[], true)?;
        let (stdout, stderr, code) = output(&mut client, id, None)?;
        ensure!(code == 0, "{id}: exit {code}: {stdout}{stderr}");
        ensure!(stdout.starts_with(&format!("{expect_first}{expect_write}\n")), "{id}: {stdout}{stderr}");
        let tmpfs = mount_line(&stdout, "/scratch")?;
        ensure!(tmpfs.starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev"), "{id}: {tmpfs}");
        ensure!(tmpfs.contains("size=64k") && tmpfs.contains("mode=1770"), "{id}: {tmpfs}");
        let bind = mount_line(&stdout, "/data")?;
        let want = if options.ends_with("ro") { " ro,nosuid,nodev" } else { " rw,nosuid,nodev" };
        ensure!(bind.contains(want), "{id}: {bind}");
        client.delete_container(id)?;
        client.unmount_overlay(id)?;
    }
    still_serving_then_shutdown(guest, client)
}

/// The same protocol over vsock: the guest's virtio-vsock driver and the
/// agent's vsock listener, reached through a vhost-user backend (rust-vmm's
/// `vhost-device-vsock`; this host has no vhost-vsock) and its hybrid-vsock
/// unix socket. A container runs to completion over vsock while the
/// virtio-serial port still answers; a hostile frame on one vsock
/// connection does not disturb another; the UVM powers off over vsock.
#[test]
fn the_agent_serves_the_same_protocol_over_vsock() -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let mut boot = Boot::emulated_for_policy(&fixture.policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    boot.vsock = true;
    let mut guest = Guest::boot(&Paths::get(), &boot)?;
    guest.wait_ready(READY)?;
    let vsock = guest.vsock_control().context("booted with vsock")?;
    let mut client = Client::connect(&vsock, READY).with_context(|| format!("serial:\n{}", guest.serial()))?;
    client.set_timeout(CALL);
    client.ping()?;
    client.set_policy(std::fs::read_to_string(&fixture.policy)?)?;

    // A second vsock connection sends garbage: it is answered or closed,
    // and the first carries on.
    let mut hostile = Client::connect(&vsock, CALL)?;
    hostile.send_raw(&[0xff; 64])?;

    run::mount_image(&mut client, &fixture.built, ID)?;
    client.create_container(ID, &fixture.process()?)?;
    client.start_container(ID)?;
    client.write_stdin(ID, None, &[], true)?;
    let (stdout, stderr, code) = output(&mut client, ID, None)?;
    ensure!(code == 0 && stdout.contains("cwd=/srv"), "exit {code}: {stdout}{stderr}");
    // Denials travel the same way.
    let (code, message) = refused(client.create_container("other", &fixture.process()?))?;
    ensure!(code == ErrorCode::PolicyDenied && message.contains("no overlay"), "{code:?}: {message}");
    client.delete_container(ID)?;
    client.unmount_overlay(ID)?;

    // The virtio-serial port serves alongside.
    guest.client(CALL)?.ping()?;
    drop(hostile);
    client.ping()?;
    guest.check_serial()?;
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(60))?.success(), "QEMU did not exit cleanly");
    Ok(())
}

/// A process on a terminal: its stdin and stdout are a terminal, it reads
/// the window size the host set, its output (stderr included) comes as
/// stdout through the line discipline (`\n` becomes `\r\n`), and an exec
/// gets a terminal of its own. A process without one has none to resize.
#[test]
fn a_terminal_gives_the_process_a_tty_and_its_window_size() -> anyhow::Result<()> {
    let command = [
        "/bin/sh",
        "-c",
        "test -t 0 && echo in=tty; test -t 1 && echo out=tty; read line; /bin/busybox stty size; echo err >&2",
    ];
    // The policy must allow each terminal: on one, stdin can signal.
    let fixture = Fixture::with_spec(json!({
        "command": command,
        "terminal": true,
        "exec_processes": [{"command": ["/bin/cat", "/proc/self/status"], "signals": [], "terminal": true}],
    }))?;
    let (guest, mut client) = fixture.boot(run::layer_disks(&fixture.built, &fixture.layers_dir))?;
    run::mount_image(&mut client, &fixture.built, ID)?;
    let mut process = fixture.process_with(&command)?;
    process.terminal = true;
    client.create_container(ID, &process)?;
    client.start_container(ID)?;
    client.resize_terminal(ID, None, 33, 101)?;

    // While the init process waits for its line: an exec on a terminal, and one without.
    let mut status = fixture.process_with(&["/bin/cat", "/proc/self/status"])?;
    status.terminal = true;
    client.exec_process(ID, "tty", &status)?;
    let (stdout, stderr, code) = output(&mut client, ID, Some("tty"))?;
    ensure!(code == 0 && stderr.is_empty() && stdout.contains("Name:\tcat\r\n"), "exec: {code} {stdout:?} {stderr:?}");
    status.terminal = false;
    client.exec_process(ID, "plain", &status)?;
    let (code, message) = refused(client.resize_terminal(ID, Some("plain"), 10, 10))?;
    ensure!(code == ErrorCode::WrongState && message.contains("has no terminal"), "{code:?}: {message}");
    // A process the container never had is not found, by its code.
    let (code, message) = refused(client.wait_process(ID, Some("ghost")))?;
    ensure!(code == ErrorCode::NotFound && message.contains("no process \"ghost\""), "{code:?}: {message}");
    let (stdout, _, _) = output(&mut client, ID, Some("plain"))?;
    ensure!(stdout.contains("Name:\tcat\n"), "without a terminal, no \\r: {stdout:?}");

    client.write_stdin(ID, None, b"go\n", false)?;
    let (stdout, stderr, code) = output(&mut client, ID, None)?;
    ensure!(code == 0, "exit {code}: {stdout:?} {stderr:?}");
    ensure!(stderr.is_empty(), "a terminal has no separate stderr: {stderr:?}");
    for line in ["in=tty\r\n", "out=tty\r\n", "33 101\r\n", "err\r\n"] {
        ensure!(stdout.contains(line), "{line:?} missing from {stdout:?}");
    }
    client.delete_container(ID)?;
    client.unmount_overlay(ID)?;
    still_serving_then_shutdown(guest, client)
}

/// `parma run -i` streams its stdin to the container's: 300 KiB through
/// `/bin/cat` come back byte for byte (many `WriteStdin`s, partial writes
/// into a full pipe included), then the end of input ends `cat`. Without
/// `-i` the container's stdin is closed at once.
#[test]
fn parma_run_streams_stdin_with_interactive() -> anyhow::Result<()> {
    use std::io::Write as _;
    let fixture = Fixture::with_command(Some(&["/bin/cat"]))?;
    let paths = Paths::get();
    let parma = paths.repo.join("target/release/parma");
    ensure!(parma.is_file(), "{} is missing: make test builds it (cargo build --release -p parma)", parma.display());
    let input: Vec<u8> =
        (0..300 * 1024u32).map(|i| b"0123456789abcdefghijklmnopqrstuvwxyz\n"[(i % 37) as usize]).collect();
    let run = |extra: &[&str], input: Vec<u8>| -> anyhow::Result<std::process::Output> {
        let mut child = fixture
            .parma_run(&parma, &paths.uvm)
            .args(extra)
            .args(["--", "/bin/cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output()?;
        // Without -i nobody reads the pipe: the write may fail, which is fine.
        let _ = writer.join();
        Ok(out)
    };
    let out = run(&["-i"], input.clone())?;
    ensure!(out.status.code() == Some(0), "parma run -i: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    ensure!(out.stdout == input, "{} bytes came back, {} went in", out.stdout.len(), input.len());

    let out = run(&[], input)?;
    ensure!(out.status.code() == Some(0), "parma run: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    ensure!(out.stdout.is_empty(), "without -i, cat reads nothing: {} bytes", out.stdout.len());
    Ok(())
}
