//! Boot the real UVM under QEMU TCG and talk to its agent.

use std::time::Duration;

use anyhow::{Context, ensure};
use parma_protocol::frame::MAGIC;
use parma_protocol::{ErrorCode, Request, Response, VERSION, encode_request};
use parma_tests::{Boot, Guest, Paths, write_initrd};

/// Generous for TCG on a loaded 2-core machine; a healthy boot takes ~3 s.
const READY: Duration = Duration::from_secs(60);
const ANSWER: Duration = Duration::from_secs(10);

fn header(version: u16, kind: u16, id: u32, len: u32) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// A ping on a fresh connection still answers.
fn still_serving(guest: &mut Guest) -> anyhow::Result<()> {
    let info = guest.ping_until(std::time::Instant::now() + ANSWER).context("the agent stopped serving")?;
    ensure!(info.protocol_version == VERSION);
    Ok(())
}

fn error_code(response: Response) -> anyhow::Result<ErrorCode> {
    match response {
        Response::Error(err) => Ok(err.code),
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
}

#[test]
fn boot_ping_info_shutdown() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let mut guest = Guest::boot(&paths, &Boot::default())?;
    let info = guest.wait_ready(READY)?;
    let release = std::fs::read_to_string(paths.uvm.join("kernel.release"))?;
    ensure!(info.kernel_release == release.trim(), "kernel {} is not the image's {release}", info.kernel_release);
    ensure!(info.agent_version == env!("CARGO_PKG_VERSION"));
    ensure!(info.uptime_ms > 0);

    let mut client = guest.client(ANSWER)?;
    let guest_info = client.guest_info()?;
    ensure!(guest_info.cpus == 1, "{guest_info:?}");
    ensure!((400_000..=524_288).contains(&guest_info.memory_total_kib), "{guest_info:?}");
    ensure!(!guest_info.sev_guest_device, "TCG has no SEV guest device");
    ensure!(guest_info.tsm_report, "configfs TSM report directory missing: {guest_info:?}");
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/run", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
        ("/sys/kernel/config", "configfs"),
    ] {
        ensure!(
            guest_info.mounts.iter().any(|m| m.target == target && m.fstype == fstype),
            "{target} ({fstype}) is not mounted: {:?}",
            guest_info.mounts
        );
    }

    client.shutdown()?;
    let status = guest.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "QEMU exited with {status}");
    let serial = guest.serial();
    ensure!(serial.contains("parma-init: agent requested shutdown"), "{serial}");
    // No ACPI (acpi=off, as an IGVM launch has none): the reset ends the VM.
    ensure!(serial.contains("parma-init: no ACPI: resetting"), "{serial}");
    guest.check_serial()
}

#[test]
fn hostile_input_is_answered_and_survived() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let mut guest = Guest::boot(&paths, &Boot::default())?;
    guest.wait_ready(READY)?;

    // A well-framed body that is not JSON: typed error, same connection keeps working.
    let mut client = guest.client(ANSWER)?;
    let mut frame = header(VERSION, 1, 77, 9);
    frame.extend_from_slice(b"{not json");
    client.send_raw(&frame)?;
    let (id, response) = client.recv()?;
    ensure!(id == 77 && error_code(response)? == ErrorCode::Malformed);
    client.ping().context("same connection after a malformed frame")?;

    // Unknown request type and unknown protocol version: typed errors, same connection.
    let body = br#"{"type":"MountEverything"}"#;
    let mut frame = header(VERSION, 1, 78, body.len() as u32);
    frame.extend_from_slice(body);
    client.send_raw(&frame)?;
    let (id, response) = client.recv()?;
    ensure!(id == 78 && error_code(response)? == ErrorCode::UnknownType);
    let mut frame = header(VERSION + 1, 1, 79, 4);
    frame.extend_from_slice(b"abcd");
    client.send_raw(&frame)?;
    let (id, response) = client.recv()?;
    ensure!(id == 79 && error_code(response)? == ErrorCode::UnsupportedVersion);
    client.ping()?;
    drop(client);

    // An oversize length: refused at once, without waiting for the body.
    let mut client = guest.client(ANSWER)?;
    client.send_raw(&header(VERSION, 1, 80, u32::MAX))?;
    let (id, response) = client.recv()?;
    ensure!(id == 80 && error_code(response)? == ErrorCode::Oversize);
    drop(client);
    still_serving(&mut guest).context("after an oversize length")?;

    // Random garbage (deterministic), then disconnect.
    let mut client = guest.client(ANSWER)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let garbage: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    client.send_raw(&garbage)?;
    let (_, response) = client.recv()?;
    ensure!(error_code(response)? == ErrorCode::BadMagic);
    drop(client);
    still_serving(&mut guest).context("after random garbage")?;

    // Half a frame, then disconnect.
    let mut client = guest.client(ANSWER)?;
    let ping = encode_request(81, &Request::Ping);
    client.send_raw(&ping[..ping.len() / 2])?;
    drop(client);
    still_serving(&mut guest).context("after half a frame")?;

    // A response frame sent to the agent.
    let mut client = guest.client(ANSWER)?;
    let body = br#"{"type":"Ping"}"#;
    let mut frame = header(VERSION, 2, 82, body.len() as u32);
    frame.extend_from_slice(body);
    client.send_raw(&frame)?;
    let (id, response) = client.recv()?;
    ensure!(id == 82 && error_code(response)? == ErrorCode::UnknownKind);
    client.ping()?;

    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    guest.check_serial()
}

#[test]
fn policy_is_set_once_and_compiled_in_the_guest() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let allow_all_path = paths.repo.join("policies/allow_all.rego");
    let mut guest = Guest::boot(&paths, &Boot::emulated_for_policy(&allow_all_path)?)?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;

    let allow_all = std::fs::read_to_string(&allow_all_path)?;
    let sha256 = client.set_policy(allow_all.clone())?;
    ensure!(sha256 == parma_policy::policy_hash(allow_all.as_bytes()));

    // A second policy is denied, naming the one in force.
    let err = client.set_policy("package policy\n".into()).unwrap_err();
    ensure!(err.to_string().contains(&format!("policy {sha256} is in force")), "{err}");
    client.ping()?;
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    // The framework's program came from the image: the agent says when it
    // found none (or another build's) and had to compile the framework.
    let serial = guest.serial();
    ensure!(!serial.contains("compiling the framework instead"), "{serial}");
    guest.check_serial()
}

#[test]
fn an_attested_policy_that_does_not_compile_locks_the_agent_down() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let dir = tempfile::tempdir()?;
    let broken = dir.path().join("broken.rego");
    std::fs::write(&broken, "package policy\nallow := \n")?;
    // HOST_DATA is the broken policy's hash: it is checked, then parsed.
    let mut guest = Guest::boot(&paths, &Boot::emulated_for_policy(&broken)?)?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;
    let err = client.set_policy(std::fs::read_to_string(&broken)?).unwrap_err();
    ensure!(err.to_string().contains("cannot be used") && err.to_string().contains("does not compile"), "{err}");
    let allow_all = std::fs::read_to_string(paths.repo.join("policies/allow_all.rego"))?;
    let err = client.set_policy(allow_all).unwrap_err();
    ensure!(err.to_string().contains("refuses every request but"), "{err}");
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    guest.check_serial()
}

#[test]
fn a_policy_that_is_not_host_data_locks_the_agent_down() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    // HOST_DATA is the hash of allow_all; the host sends another policy.
    let mut guest = Guest::boot(&paths, &Boot::emulated_for_policy(&paths.repo.join("policies/allow_all.rego"))?)?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;
    let other = "package policy\n\nmount_device := {\"allowed\": true}\n";
    let err = client.set_policy(other.into()).unwrap_err();
    ensure!(err.to_string().contains("is not the HOST_DATA"), "{err}");
    // Lockdown: Ping, GuestInfo, Shutdown only, with the reason; no report
    // carries the host's REPORT_DATA while no policy decides.
    client.ping()?;
    client.guest_info()?;
    let err = client.attestation(b"still here").unwrap_err();
    ensure!(err.to_string().contains("GetAttestation is denied: policy"), "{err}");
    let allow_all = std::fs::read_to_string(paths.repo.join("policies/allow_all.rego"))?;
    let err = client.set_policy(allow_all).unwrap_err();
    ensure!(err.to_string().contains("refuses every request but Ping, GuestInfo and Shutdown"), "{err}");
    // Container requests too, even those the other policy would allow.
    let err = client.mount_layer("l0", "parma-l0", &"ab".repeat(32), 4096).unwrap_err();
    ensure!(err.to_string().contains("MountLayer is denied: policy"), "{err}");
    let err = client.delete_container("c0").unwrap_err();
    ensure!(err.to_string().contains("DeleteContainer is denied: policy"), "{err}");
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    guest.check_serial()
}

#[test]
fn emulated_attestation_binds_policy_and_report_data_and_needs_the_insecure_flag() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let allow_all_path = paths.repo.join("policies/allow_all.rego");
    let mut guest = Guest::boot(&paths, &Boot::emulated_for_policy(&allow_all_path)?)?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;
    let policy_hash = client.set_policy(std::fs::read_to_string(&allow_all_path)?)?;

    let public_key_hash = [0x5a_u8; 32];
    let (bytes, provider) = client.attestation(&public_key_hash)?;
    ensure!(provider == "insecure-emulation");
    let report = parma_snp::AttestationReport::parse(&bytes)?;
    let chain = parma_snp::emulation::test_chain(&parma_snp::emulation::AGENT_SEED)?;
    let expect = parma_snp::Expectations { allow_insecure_emulation: true, ..Default::default() }
        .host_data_hex(&policy_hash)?
        .report_data_in(parma_snp::report_data::Domain::Host, &hex::encode(public_key_hash))?;
    let verification = parma_snp::verify(&report, &chain.cert_source(), &expect)?;
    ensure!(verification.all_passed(), "{:?}", verification.failed().collect::<Vec<_>>());
    ensure!(verification.insecure_emulation());

    // The host asked: its bytes are bound in the host's domain, never put
    // into REPORT_DATA as they are (a binding a relying party made for
    // someone else, such as a key broker's, cannot be met by the host).
    let raw = expect.clone().report_data_hex(&hex::encode(public_key_hash))?;
    let verification = parma_snp::verify(&report, &chain.cert_source(), &raw)?;
    ensure!(
        verification.failed().map(|check| check.name).collect::<Vec<_>>() == [parma_snp::CheckName::ReportData],
        "{:?}",
        verification.failed().collect::<Vec<_>>()
    );

    // Without the insecure flag, the same report is refused.
    let strict = parma_snp::Expectations { allow_insecure_emulation: false, ..expect };
    ensure!(!parma_snp::verify(&report, &chain.cert_source(), &strict)?.all_passed());

    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    guest.check_serial()
}

#[test]
fn without_a_report_provider_no_policy_is_accepted() -> anyhow::Result<()> {
    // Plain TCG: no SNP, no emulation flag. The agent cannot check a policy
    // against HOST_DATA, so it takes none (and nothing can run).
    let paths = Paths::require_image()?;
    let mut guest = Guest::boot(&paths, &Boot::default())?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;
    let allow_all = std::fs::read_to_string(paths.repo.join("policies/allow_all.rego"))?;
    let err = client.set_policy(allow_all).unwrap_err();
    ensure!(err.to_string().contains("cannot check the policy against HOST_DATA: no attestation provider"), "{err}");
    // Attestation needs a policy in force, like everything but Ping,
    // GuestInfo, SetPolicy and Shutdown.
    let err = client.attestation(b"x").unwrap_err();
    ensure!(err.to_string().contains("GetAttestation is denied: no policy is set"), "{err}");
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    guest.check_serial()
}

#[test]
fn agent_death_powers_the_vm_off_with_the_reason() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let init = std::fs::read(paths.guest_binary("parma-init")?)?;
    let dying = std::fs::read(paths.guest_binary("dying-agent")?)?;
    let scratch = tempfile::tempdir()?;
    let initrd = write_initrd(scratch.path(), "dying.img", &parma_image::initrd::uvm(init, dying)?)?;
    let mut guest = Guest::boot(&paths, &Boot { initrd: Some(initrd), ..Boot::default() })?;
    let status = guest.wait_exit(READY)?;
    let serial = guest.serial();
    ensure!(status.success(), "QEMU exited with {status}:\n{serial}");
    ensure!(serial.contains("dying-agent: exiting with status 42"), "{serial}");
    ensure!(serial.contains("parma-init: agent exited with status 42"), "{serial}");
    ensure!(serial.contains("parma-init: powering off"), "{serial}");
    guest.check_serial()
}
