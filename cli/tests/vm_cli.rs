//! The user's path, by hand: `parma vm run ... &`, then `parma agent ping`,
//! `info --json` and `shutdown`; QEMU (which `vm run` becomes) exits 0.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // The VM runs in its own process group; take all of it down.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

/// `parma vm run --uvm UVM --control CONTROL --serial-log SERIAL EXTRA...`
/// in a process group of its own, killed when dropped.
fn vm_run(uvm: &Path, control: &Path, serial: &Path, extra: &[&std::ffi::OsStr]) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_parma"))
            .args(["vm", "run", "--uvm"])
            .arg(uvm)
            .args(extra)
            .arg("--control")
            .arg(control)
            .arg("--serial-log")
            .arg(serial)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    )
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn uvm() -> PathBuf {
    std::env::var_os("PARMA_UVM")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../out/uvm"), PathBuf::from)
}

fn parma(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parma")).args(args).output().unwrap()
}

#[test]
fn vm_run_then_ping_info_shutdown() {
    let uvm = uvm();
    assert!(uvm.join("vmlinuz").is_file(), "{} has no image: run `make image` first", uvm.display());
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    let serial = dir.path().join("serial.log");
    let mut vm = vm_run(&uvm, &control, &serial, &[]);
    let control = control.to_str().unwrap();

    let started = Instant::now();
    let ping = parma(&["agent", "ping", "--control", control, "--timeout", "60"]);
    assert!(
        ping.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ping.stderr),
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
    let line = String::from_utf8_lossy(&ping.stdout);
    assert!(line.starts_with("agent 0.1.0 (protocol 1), kernel 6.12"), "{line}");
    eprintln!("ping answered {:.2} s after vm run", started.elapsed().as_secs_f64());

    let info = parma(&["agent", "info", "--control", control, "--json"]);
    assert!(
        info.status.success(),
        "{}\nserial:\n{}",
        String::from_utf8_lossy(&info.stderr),
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["cpus"], 1);
    assert_eq!(info["sev_guest_device"], false);

    let shutdown = parma(&["agent", "shutdown", "--control", control]);
    assert!(shutdown.status.success(), "{}", String::from_utf8_lossy(&shutdown.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = vm.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "QEMU still runs 10 s after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "vm run exited with {status}");
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(log.contains("parma-init: agent requested shutdown"), "{log}");
    assert!(!log.contains("panic"), "{log}");
}

#[test]
fn errors_are_clear() {
    let out = parma(&["vm", "run", "--uvm", "/nonexistent", "--control", "/tmp/x.sock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmlinuz"));
    let out = parma(&["agent", "ping", "--control", "/nonexistent/c.sock", "--timeout", "0.2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the agent at /nonexistent/c.sock"));
    // The control socket from PARMA_CONTROL, a timeout as a duration.
    let out = Command::new(env!("CARGO_BIN_EXE_parma"))
        .args(["agent", "ping", "--timeout", "200ms"])
        .env("PARMA_CONTROL", "/nonexistent/env.sock")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the agent at /nonexistent/env.sock"));
    let out = parma(&["agent", "ping", "--control", "/x.sock", "--timeout", "soon"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a duration like 30s"));
}

/// The README's attestation flow under emulation: the report binds the
/// host's data in the host's domain, never as the host's bytes.
#[test]
fn attest_then_verify_in_the_host_domain() {
    let uvm = uvm();
    assert!(uvm.join("vmlinuz").is_file(), "{} has no image: run `make image` first", uvm.display());
    let policy = repo_root().join("policies/allow_all.rego");
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    let serial = dir.path().join("serial.log");
    let _vm =
        vm_run(&uvm, &control, &serial, &["--insecure-emulate-snp".as_ref(), "--policy".as_ref(), policy.as_os_str()]);
    let control = control.to_str().unwrap();
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}\nserial:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
    };
    ok(&parma(&["agent", "ping", "--control", control, "--timeout", "60"]));
    ok(&parma(&["agent", "set-policy", "--control", control, policy.to_str().unwrap()]));
    let report = dir.path().join("report.bin");
    let chain = dir.path().join("chain");
    let attest = parma(&[
        "agent",
        "attest",
        "--control",
        control,
        "--report-data",
        "5a5a",
        "--out",
        report.to_str().unwrap(),
        "--emulation-chain",
        chain.to_str().unwrap(),
    ]);
    ok(&attest);
    let host_data = parma(&["policy", "hash", policy.to_str().unwrap()]);
    ok(&host_data);
    let host_data = String::from_utf8_lossy(&host_data.stdout).trim().to_string();
    let verify = |report_data: &str| {
        parma(&[
            "verify",
            "--report",
            report.to_str().unwrap(),
            "--certs",
            chain.to_str().unwrap(),
            "--allow-insecure-emulation",
            "--expect-host-data",
            &host_data,
            "--expect-report-data",
            report_data,
        ])
    };
    let passed = verify("host:5a5a");
    assert_eq!(passed.status.code(), Some(0), "{}", String::from_utf8_lossy(&passed.stdout));
    // The host's bytes as they are: REPORT_DATA fails, everything else passes.
    let raw = verify("raw:5a5a");
    assert_eq!(raw.status.code(), Some(2), "{}", String::from_utf8_lossy(&raw.stdout));
    let text = String::from_utf8_lossy(&raw.stdout);
    assert!(text.contains("FAIL  report_data") && text.contains("1 failed"), "{text}");
    // A value without its domain is refused before anything is checked.
    let bare = verify("5a5a");
    assert_eq!(bare.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("host:HEX"), "{}", String::from_utf8_lossy(&bare.stderr));
    ok(&parma(&["agent", "shutdown", "--control", control]));
}

/// `--netns` says what is wrong with the namespace before QEMU starts, and
/// does not mix with user-mode port forwards or a printed command line.
#[test]
fn vm_run_netns_refuses_a_missing_namespace_and_conflicting_flags() {
    let parma = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_parma")).args(args).output().unwrap();
    let missing = parma(&["vm", "run", "--control", "/tmp/none.sock", "--netns", "/var/run/netns/parma-no-such-ns"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("cannot open the network namespace /var/run/netns/parma-no-such-ns"), "{stderr}");
    for conflicting in [["-p", "8080:80"], ["--print-command", ""]] {
        let mut args = vec!["vm", "run", "--control", "/tmp/none.sock", "--netns", "/x"];
        args.extend(conflicting.iter().filter(|a| !a.is_empty()));
        let out = parma(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{out:?}");
    }
}
