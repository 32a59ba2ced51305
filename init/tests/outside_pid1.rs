//! Run outside a VM, init must refuse to act (it would power the machine off).

#[test]
fn refuses_to_run_outside_pid_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parma-init")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as PID 1"));
}
