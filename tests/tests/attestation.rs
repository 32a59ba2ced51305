//! Attestation that belongs to a container: a container whose policy entry
//! says `allow_attestation` finds an endpoint at
//! `/dev/parma/attestation.sock` and gets reports binding its own data and
//! its name in the policy, in the container domain of REPORT_DATA; a
//! container without it has no endpoint, and an attested container may not
//! share the pod's PID namespace (where a neighbour could reach and drive
//! its processes); the caller's cgroup is checked besides. The host's own report binds the same
//! data in the host domain, never the container's value. Under QEMU TCG
//! with emulated reports, checked with `parma verify`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use parma_host::client::Client;
use parma_host::policy_gen::{self, Knobs, Spec};
use parma_host::run;
use parma_protocol::{ProcessSpec, Request};
use parma_snp::report_data::Domain;
use parma_tests::{Boot, Guest, Paths, denied, oci};
use serde_json::json;

const READY: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(60);
const SOCKET: &str = "/dev/parma/attestation.sock";
/// What the attested container binds: a key's hash, say.
const DATA: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
/// Requests on one UVM, one after the other.
const MANY: &str = "300";

/// CreateContainer in the pod, sharing its PID namespace or not.
fn create_in(id: &str, process: &ProcessSpec, share_pid: bool) -> Request {
    parma_tests::create_request(id, process, parma_tests::cri_namespaces(share_pid))
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Run exec process `exec_id` (`command`) in container `id` to its end; its stdout.
fn exec(client: &mut Client, id: &str, exec_id: &str, process: &ProcessSpec) -> anyhow::Result<String> {
    client.exec_process(id, exec_id, process)?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = run::pump(client, id, Some(exec_id), &mut stdout, &mut stderr, Duration::from_secs(600))?;
    let (stdout, stderr) = (String::from_utf8(stdout)?, String::from_utf8_lossy(&stderr));
    ensure!(run::exit_code(&status) == 0, "{id}/{exec_id}: {status:?}\n{stdout}\n{stderr}");
    Ok(stdout)
}

/// `key=value` lines.
fn facts(stdout: &str) -> BTreeMap<String, String> {
    stdout.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

#[test]
fn a_container_gets_reports_of_its_own_and_no_other_container_or_the_host_gets_them() -> anyhow::Result<()> {
    let paths = Paths::get();
    let hello = paths.guest_binary("oci-hello")?;
    let attest = [oci::ENTRYPOINT, "attest", SOCKET, DATA];
    let many = [oci::ENTRYPOINT, "attest-many", SOCKET, DATA, MANY];
    let others = [oci::ENTRYPOINT, "attest-others", DATA];
    let entry = |name: &str, allow: bool, ms: &str| {
        json!({
            "name": name,
            "command": [oci::ENTRYPOINT, "sleep", ms],
            "user": {"uid": 0, "gid": 0},
            "allow_attestation": allow,
            "exec_processes": [
                {"command": attest, "signals": []},
                {"command": many, "signals": []},
                {"command": others, "signals": []},
            ],
            "signals": [9],
        })
    };
    let fixture = oci::PolicyFixture::with_spec(&hello, entry("attested", true, "600000"))?;
    let spec = |value: serde_json::Value| -> anyhow::Result<Spec> { Ok(serde_json::from_value(value)?) };
    // Two entries told apart by their command (the first entry that passes
    // is the one a container is created under).
    let containers = [
        serde_json::to_value(policy_gen::container(&fixture.built, &spec(entry("attested", true, "600000"))?))?,
        serde_json::to_value(policy_gen::container(&fixture.built, &spec(entry("plain", false, "600001"))?))?,
    ];
    let knobs = Knobs { sandbox: serde_json::from_value(json!({"share_pid": true}))?, ..Knobs::default() };
    let text = policy_gen::rego_with_fragments(&containers, &[], &knobs, "the attestation test")?;
    ensure!(text.contains("\"allow_attestation\": true") && text.contains("container_attestation := data.framework"));
    let policy = fixture.dir().join("two.rego");
    std::fs::write(&policy, &text)?;

    let mut boot = Boot::emulated_for_policy(&policy)?;
    boot.disks = run::layer_disks(&fixture.built, &fixture.layers_dir);
    let mut guest = Guest::boot(&paths, &boot)?;
    let mut client = guest.ready_client(READY, CALL)?;
    let policy_hash = client.set_policy(text.clone()).with_context(|| guest.serial())?;
    let layers = run::mount_layers(&mut client, &fixture.built)?;
    client.create_sandbox("pod-a", true)?;
    let root = |words: &[&str]| -> anyhow::Result<ProcessSpec> {
        let mut process = run::process_from_config(&fixture.built.config, &args(words))?;
        (process.uid, process.gid, process.groups) = (0, 0, Vec::new());
        Ok(process)
    };
    // An attested container may not share the pod's PID namespace: a
    // neighbour with its user could trace its processes and ask through them.
    client.mount_overlay("a", &layers, true)?;
    let attested = root(&[oci::ENTRYPOINT, "sleep", "600000"])?;
    denied(client.created(&create_in("a", &attested, true)), "may not share the pod's PID namespace")?;
    client.created(&create_in("a", &attested, false))?;
    client.start_container("a")?;
    client.mount_overlay("b", &layers, true)?;
    client.created(&create_in("b", &root(&[oci::ENTRYPOINT, "sleep", "600001"])?, true))?;
    client.start_container("b")?;

    // The attested container's own report.
    let out = exec(&mut client, "a", "attest", &root(&attest)?)?;
    let seen = facts(&out);
    ensure!(seen.get("status").map(String::as_str) == Some("200"), "{out}");
    let body: serde_json::Value = serde_json::from_str(seen.get("body").context("no body")?)?;
    let mut data = [0u8; 64];
    data[..32].copy_from_slice(&hex::decode(DATA)?);
    let bound = Domain::Container("attested").report_data(&data);
    ensure!(body["container"] == "attested" && body["provider"] == "insecure-emulation", "{body}");
    ensure!(body["report_data"] == hex::encode(bound) && body["data"] == hex::encode(data), "{body}");
    let report = hex::decode(body["report"].as_str().context("no report")?)?;
    let parsed = parma_snp::AttestationReport::parse(&report)?;
    ensure!(parsed.report_data == bound, "REPORT_DATA is not the container domain's binding");
    ensure!(hex::encode(parsed.host_data) == policy_hash, "HOST_DATA is not the policy's hash");

    // A relying party checks it with parma verify, naming the container.
    let work = tempfile::tempdir()?;
    let expect = |domain: &str| format!("{domain}:{DATA}");
    let host_data = ["--expect-host-data", policy_hash.as_str()];
    let passed = verify(
        &paths,
        work.path(),
        &report,
        &[&host_data[..], &["--expect-report-data", &expect("container:attested")]].concat(),
    )?;
    ensure!(
        passed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&passed.stdout),
        String::from_utf8_lossy(&passed.stderr)
    );
    for wrong in ["container:plain", "host"] {
        let failed = verify(&paths, work.path(), &report, &["--expect-report-data", &expect(wrong)])?;
        ensure!(!failed.status.success(), "a report of \"attested\" passed as {wrong}");
    }

    // The host's report for the same data binds it in the host domain.
    let (host_report, _) = client.attestation(&data[..32])?;
    let host = parma_snp::AttestationReport::parse(&host_report)?;
    ensure!(host.report_data == Domain::Host.report_data(&data) && host.report_data != bound);

    // The other container has no endpoint, and from the pod's shared PID
    // namespace it sees no process of the attested one to go through.
    let out = exec(&mut client, "b", "attest", &root(&attest)?)?;
    ensure!(out.trim() == "attest=No such file or directory (os error 2)", "{out}");
    let out = exec(&mut client, "b", "others", &root(&others)?)?;
    ensure!(facts(&out).get("others").map(String::as_str) == Some("0"), "container b reached an endpoint:\n{out}");
    ensure!(!any_ok(&out), "container b got a report through another container's endpoint:\n{out}");

    // Many requests on one UVM: each answered, nothing held.
    let began = Instant::now();
    let out = exec(&mut client, "a", "many", &root(&many)?)?;
    ensure!(out.trim() == format!("statuses=200x{MANY}"), "{out}");
    eprintln!("{MANY} reports in {:?} under TCG", began.elapsed());

    // Gone with its container: a new container under the plain entry
    // with the same id gets nothing.
    client.signal_process("a", None, 9)?;
    let give_up = Instant::now() + Duration::from_secs(30);
    while client.wait_process("a", None)?.running {
        ensure!(Instant::now() < give_up, "a still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    client.delete_container("a")?;
    client.created(&create_in("a", &root(&[oci::ENTRYPOINT, "sleep", "600001"])?, false))?;
    client.start_container("a")?;
    let out = exec(&mut client, "a", "attest", &root(&attest)?)?;
    ensure!(out.trim() == "attest=No such file or directory (os error 2)", "{out}");
    guest.finish(&mut client)?;
    Ok(())
}

/// Whether `stdout` lists `status=200` anywhere.
fn any_ok(stdout: &str) -> bool {
    stdout.lines().any(|line| line == "status=200")
}

/// `parma verify` of an emulated `report` with these expectations.
fn verify(paths: &Paths, dir: &Path, report: &[u8], expect: &[&str]) -> anyhow::Result<std::process::Output> {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    parma_snp::emulation::test_chain(&parma_snp::emulation::AGENT_SEED)?.write_dir(&certs)?;
    let path = dir.join("report.bin");
    std::fs::write(&path, report)?;
    let output = Command::new(paths.repo.join("target/release/parma"))
        .args(["verify", "--report"])
        .arg(&path)
        .arg("--certs")
        .arg(&certs)
        .arg("--allow-insecure-emulation")
        .args(expect)
        .output()?;
    Ok(output)
}
