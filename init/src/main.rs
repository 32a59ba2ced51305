//! PID 1 of the Parma UVM.
//!
//! It mounts the pseudo filesystems, puts the console on stdio, starts the
//! guest agent and supervises it, reaping every zombie. When the agent exits,
//! when init itself hits an error, or on anything unexpected (a panic
//! included), it logs the reason on the console and powers the VM off. It
//! never returns, never panics into the kernel ("Attempted to kill init") and
//! never starts a shell: there is none in the image.
//!
//! It must stay small and synchronous: no async runtime, no parsing of host
//! input (the host reaches only the agent).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, dup2_stderr, dup2_stdin, dup2_stdout, sync};

/// Where the agent lives in the initrd.
const AGENT: &str = "/bin/parma-agent";

/// The agent's exit code when the host asked for a shutdown.
const AGENT_EXIT_SHUTDOWN: i32 = 0;

/// One filesystem init mounts, in order.
struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

const MOUNTS: &[MountSpec] = &[
    MountSpec { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
    MountSpec { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: "" },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0755",
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620",
    },
    MountSpec { source: "shm", target: "/dev/shm", fstype: "tmpfs", flags: NOSUID_NODEV_NOEXEC, data: "mode=1777" },
    // The agent's mounts, the containers' roots and their shared volumes:
    // bounded (what containers write is also charged to their cgroups).
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755,size=50%,nr_inodes=65536",
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
    MountSpec {
        source: "configfs",
        target: "/sys/kernel/config",
        fstype: "configfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

fn log(message: &str) {
    // Writing to the console can fail (no console); there is nothing better to do then.
    let _ = writeln!(std::io::stderr(), "parma-init: {message}");
}

fn main() {
    if nix::unistd::getpid() != Pid::from_raw(1) {
        // Refuse to power off a machine we were not started to own.
        log("must run as PID 1 of the UVM; exiting");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        log(&format!("internal error: {info}"));
        power_off();
    }));
    let reason = match run() {
        Ok(reason) => reason,
        Err(err) => format!("init failed: {err}"),
    };
    log(&reason);
    power_off();
}

/// Where the initramfs is copied before it becomes the root.
const NEW_ROOT: &str = "/.root";

/// Mount, start the agent, supervise. Returns why the VM must power off.
fn run() -> Result<String, String> {
    leave_rootfs()?;
    for spec in MOUNTS {
        mount_one(spec)?;
    }
    console_on_stdio()?;
    let agent = Command::new(AGENT)
        .env_clear()
        .stdin(Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot start the agent {AGENT}: {err}"))?;
    let agent = Pid::from_raw(i32::try_from(agent.id()).map_err(|_| "agent pid out of range")?);
    log(&format!("started agent {AGENT} (pid {agent})"));
    supervise(agent)
}

/// Copy the initramfs into a tmpfs and make that the root, as `switch_root`
/// does: containers need `pivot_root`, which cannot leave the kernel's
/// rootfs. The initramfs's files are removed from the rootfs to free the memory.
fn leave_rootfs() -> Result<(), String> {
    std::fs::create_dir(NEW_ROOT).map_err(|err| format!("cannot create {NEW_ROOT}: {err}"))?;
    mount(Some("root"), NEW_ROOT, Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=0755"))
        .map_err(|err| format!("cannot mount the root tmpfs: {err}"))?;
    copy_tree(Path::new("/"), Path::new(NEW_ROOT))?;
    let entries = std::fs::read_dir("/").map_err(|err| format!("cannot list the initramfs: {err}"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path == Path::new(NEW_ROOT) {
            continue;
        }
        // Freeing memory only: a file left behind is harmless, hidden under the new root.
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
    nix::unistd::chdir(NEW_ROOT).map_err(|err| format!("cannot enter {NEW_ROOT}: {err}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|err| format!("cannot move the root tmpfs to /: {err}"))?;
    nix::unistd::chroot(".").map_err(|err| format!("cannot chroot into the root tmpfs: {err}"))?;
    nix::unistd::chdir("/").map_err(|err| format!("cannot enter the new root: {err}"))
}

/// Copy directories, regular files and symlinks of `from` into `to`, which exists.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(from).map_err(|err| format!("cannot list {}: {err}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|err| format!("cannot list {}: {err}", from.display()))?;
        let source = entry.path();
        if source == Path::new(NEW_ROOT) {
            continue;
        }
        let target = to.join(entry.file_name());
        let meta =
            std::fs::symlink_metadata(&source).map_err(|err| format!("cannot stat {}: {err}", source.display()))?;
        let copied = if meta.is_dir() {
            std::fs::create_dir(&target)
                .and_then(|()| std::fs::set_permissions(&target, meta.permissions()))
                .map_err(|err| format!("cannot create {}: {err}", target.display()))
                .and_then(|()| copy_tree(&source, &target))
        } else if meta.is_file() {
            std::fs::copy(&source, &target).map(drop).map_err(|err| format!("cannot copy {}: {err}", source.display()))
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(&source)
                .and_then(|link| std::os::unix::fs::symlink(link, &target))
                .map_err(|err| format!("cannot copy link {}: {err}", source.display()))
        } else {
            // Device nodes (dev/console): devtmpfs provides them.
            Ok(())
        };
        copied?;
    }
    Ok(())
}

fn mount_one(spec: &MountSpec) -> Result<(), String> {
    match std::fs::create_dir_all(spec.target) {
        Ok(()) => {}
        Err(err) => return Err(format!("cannot create mount point {}: {err}", spec.target)),
    }
    let data = (!spec.data.is_empty()).then_some(spec.data);
    mount(Some(spec.source), spec.target, Some(spec.fstype), spec.flags, data)
        .map_err(|err| format!("cannot mount {} on {}: {err}", spec.fstype, spec.target))
}

/// Open /dev/console (from devtmpfs) as stdin, stdout and stderr.
fn console_on_stdio() -> Result<(), String> {
    let console = open("/dev/console", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|err| format!("cannot open /dev/console: {err}"))?;
    dup2_stdin(&console)
        .and_then(|()| dup2_stdout(&console))
        .and_then(|()| dup2_stderr(&console))
        .map_err(|err| format!("cannot put the console on stdio: {err}"))
}

/// Reap every child until the agent exits; return why.
fn supervise(agent: Pid) -> Result<String, String> {
    loop {
        match waitpid(None, None) {
            Ok(status) if status.pid() == Some(agent) => return Ok(exit_reason(status)),
            Ok(_) => {} // An orphan reaped.
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Err("no children left to supervise".into()),
            Err(err) => return Err(format!("waitpid failed: {err}")),
        }
    }
}

/// The line init prints when the agent ends.
fn exit_reason(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, AGENT_EXIT_SHUTDOWN) => "agent requested shutdown".into(),
        WaitStatus::Exited(_, code) => format!("agent exited with status {code}"),
        WaitStatus::Signaled(_, signal, core) => {
            format!("agent killed by signal {}{}", signal.as_str(), if core { " (core dumped)" } else { "" })
        }
        other => format!("agent stopped unexpectedly: {other:?}"),
    }
}

/// Where the kernel shows ACPI when it uses it.
const ACPI: &str = "/sys/firmware/acpi";

/// Stop everything, flush, power off. Never returns.
///
/// Power-off goes through ACPI. Without ACPI (an IGVM launch has no
/// firmware and so no ACPI tables) the kernel would turn it into a halt
/// and end init, so the UVM resets instead: QEMU's `-no-reboot` ends the VM
/// on a reset, and an SEV-SNP guest's reset ends it anyway.
fn power_off() -> ! {
    log("powering off");
    // PID 1 is not hit by kill(-1): every other process is.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    sync();
    if !Path::new(ACPI).exists() {
        log("no ACPI: resetting, which ends the VM");
        let Err(err) = reboot(RebootMode::RB_AUTOBOOT);
        log(&format!("reset failed: {err}; halting"));
        loop {
            nix::unistd::pause();
        }
    }
    let Err(err) = reboot(RebootMode::RB_POWER_OFF);
    log(&format!("power off failed: {err}; resetting instead"));
    let Err(err) = reboot(RebootMode::RB_AUTOBOOT);
    log(&format!("reset failed: {err}; halting"));
    loop {
        nix::unistd::pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_cause() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_reason(WaitStatus::Exited(pid, 0)), "agent requested shutdown");
        assert_eq!(exit_reason(WaitStatus::Exited(pid, 3)), "agent exited with status 3");
        assert_eq!(
            exit_reason(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)),
            "agent killed by signal SIGSEGV (core dumped)"
        );
    }

    #[test]
    fn mount_table_covers_what_the_agent_needs() {
        let targets: Vec<_> = MOUNTS.iter().map(|m| m.target).collect();
        for needed in ["/proc", "/sys", "/dev", "/run", "/sys/fs/cgroup", "/sys/kernel/config"] {
            assert!(targets.contains(&needed), "{needed} is not mounted");
        }
        // Parents come before children.
        for (i, spec) in MOUNTS.iter().enumerate() {
            for later in MOUNTS.iter().skip(i + 1) {
                assert!(!spec.target.starts_with(&format!("{}/", later.target)), "{} before its parent", spec.target);
            }
        }
    }
}
