//! The pod: namespaces that every container created after `CreateSandbox`
//! shares, held by a process of the agent's own (no pause image from the
//! host).
//!
//! The holder is the agent's binary run again as [`PAUSE_ARGV0`]: PID 1 of
//! a PID namespace only the containers that share it see, as `nobody` with no capabilities and
//! `no_new_privs`, non-dumpable, in a cgroup of its own that allows one
//! task, its root an empty read-only directory with only its own binary
//! bound in. It owns the pod's network (loopback up), IPC and UTS
//! (the pod's host name) namespaces; containers join them by its pidfd.
//! Replacing its image with `execve` leaves nothing of the agent's memory
//! in it.

use std::ffi::CString;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use parma_protocol::Namespace;
use parma_sys::launch::{self, Capabilities, Child, Namespaces, NewContainer, PodPid, Process, RootOp};

use crate::fault::Fault;

/// `argv[0]` of the agent's binary when it runs as the pod's holder.
pub const PAUSE_ARGV0: &str = "parma-pause";
/// The holder's root: an empty directory in the guest's memory.
const PAUSE_ROOT: &str = "/run/parma/pod";
/// The `proc` of a pod that shares its PID namespace, in the agent's mount
/// namespace: what the `/proc` of its containers that join it binds.
pub const POD_PROC: &str = "/run/parma/pod-proc";
/// The holder's user and group: `nobody`.
const NOBODY: u32 = 65534;

/// The pod the UVM became.
#[derive(Debug)]
pub struct Sandbox {
    /// The process that holds the namespaces.
    holder: Child,
    /// The pod's host name.
    pub hostname: String,
    /// Containers that ask may share the holder's PID namespace.
    pub share_pid: bool,
}

impl Sandbox {
    /// Start the holder and bring the pod's loopback up.
    pub fn create(
        hostname: &str,
        share_pid: bool,
        last_cap: u32,
        cgroup: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Self, Fault> {
        check_hostname(hostname)?;
        let cstring = |text: &str| CString::new(text).map_err(|_| Fault::invalid(format!("{text:?} has a NUL byte")));
        let exe =
            std::fs::read_link("/proc/self/exe").map_err(|err| format!("cannot find the agent's binary: {err}"))?;
        std::fs::create_dir_all(PAUSE_ROOT).map_err(|err| format!("cannot create {PAUSE_ROOT}: {err}"))?;
        let binary = cstring(&format!("{PAUSE_ROOT}/pause"))?;
        let empty = cstring("")?;
        let root = NewContainer {
            rootfs: cstring(PAUSE_ROOT)?,
            ops: vec![
                RootOp::File { path: binary.clone(), mode: 0o555 },
                RootOp::Mount {
                    source: cstring(&exe.to_string_lossy())?,
                    target: binary.clone(),
                    fstype: empty.clone(),
                    flags: libc::MS_BIND,
                    data: empty.clone(),
                },
                RootOp::Mount {
                    source: empty.clone(),
                    target: binary,
                    fstype: empty.clone(),
                    flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    data: empty,
                },
            ],
            checks: Vec::new(),
            readonly_rootfs: true,
            hostname: Some(cstring(hostname)?),
        };
        let process = Process {
            exe: cstring("/pause")?,
            argv: vec![cstring(PAUSE_ARGV0)?],
            env: Vec::new(),
            cwd: cstring("/")?,
            uid: NOBODY,
            gid: NOBODY,
            groups: Vec::new(),
            capabilities: Capabilities::default(),
            no_new_privileges: true,
            last_cap,
            rlimits: Vec::new(),
            seccomp: Vec::new(),
            controlling_terminal: false,
        };
        let null = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(std::os::fd::OwnedFd::from)
                .map_err(|err| format!("cannot open /dev/null: {err}"))
        };
        let stdio = launch::Stdio { stdin: null()?, stdout: null()?, stderr: null()? };
        let holder = launch::spawn(&Namespaces::New(&root), &process, stdio, Some(cgroup))
            .map_err(|err| crate::containers::launch_fault("cannot start the pod's namespace holder", &err))?;
        let sandbox = Self { holder, hostname: hostname.to_string(), share_pid };
        if let Err(err) = parma_sys::pod::prepare_network(sandbox.pidfd()) {
            sandbox.stop();
            return Err(format!("cannot prepare the pod's network: {err}").into());
        }
        // Now, while no container runs in the pod's PID namespace to see
        // the child that mounts it.
        if share_pid && let Err(err) = mount_pod_proc(sandbox.pidfd()) {
            sandbox.stop();
            return Err(format!("cannot mount the pod's proc: {err}").into());
        }
        tracing::info!("the UVM is pod {hostname} (namespaces held by pid {})", sandbox.holder.pid);
        Ok(sandbox)
    }

    /// The holder's pidfd: what containers join.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.holder.pidfd.as_fd()
    }

    /// The holder's PID in the agent's PID namespace (the agent's unreaped
    /// child: it cannot name another process).
    pub fn pid(&self) -> u32 {
        self.holder.pid.unsigned_abs()
    }

    /// Kill and reap the holder.
    fn stop(&self) {
        let _ = self.holder.signal(libc::SIGKILL);
        let _ = self.holder.wait_blocking();
    }
}

/// Mount the `proc` of the pod's PID namespace on [`POD_PROC`].
fn mount_pod_proc(pod: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    std::fs::create_dir_all(POD_PROC)?;
    let target = CString::new(POD_PROC).map_err(std::io::Error::other)?;
    parma_sys::pod::mount_proc_of(pod, &target)
}

/// A pod's host name: 1 to 64 bytes of letters, digits, `.` and `-`.
fn check_hostname(hostname: &str) -> Result<(), Fault> {
    let valid = (1..=64).contains(&hostname.len())
        && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(Fault::invalid(format!(
            "host name {:?} is not 1 to 64 bytes of [A-Za-z0-9.-]",
            hostname.get(..hostname.floor_char_boundary(64)).unwrap_or_default()
        )))
    }
}

/// Whether a container with the OCI namespace list `namespaces` is one of
/// the pod's (`pod`: the UVM is one, and whether it shares a PID
/// namespace), and with which PID namespace. In a pod, network, IPC and
/// UTS are always the pod's (a path names them; a new one would leave the
/// pod); without one every namespace is the container's own. Mount and
/// cgroup namespaces are always new; PID is new, or the pod's where a path
/// asks for it and the pod shares one; user and time namespaces are
/// refused. Nothing the host names is ever a namespace of the agent's.
pub fn joins_pod(namespaces: &[Namespace], pod: Option<bool>) -> Result<Option<PodPid>, Fault> {
    let mut pid = PodPid::Own;
    let mut seen = Vec::with_capacity(namespaces.len());
    for namespace in namespaces {
        let kind = namespace.kind.as_str();
        if seen.contains(&kind) {
            return Err(Fault::invalid(format!("namespace {kind:?} is listed twice")));
        }
        seen.push(kind);
        let shared = matches!(kind, "network" | "ipc" | "uts");
        let in_pod = pod.is_some();
        match (kind, namespace.path.is_some()) {
            (_, true) if shared && in_pod => {}
            (_, true) if shared => {
                return Err(Fault::invalid(format!(
                    "no {kind} namespace to join: the UVM is not a pod (CreateSandbox first)"
                )));
            }
            (_, false) if shared && in_pod => {
                return Err(Fault::invalid(format!(
                    "a container of the pod shares its {kind} namespace; a new one is refused"
                )));
            }
            (_, false) if shared => {}
            ("pid" | "mount" | "cgroup", false) => {}
            ("pid", true) if pod == Some(true) => pid = PodPid::Shared,
            ("pid", true) => {
                return Err(Fault::invalid("no shared PID namespace to join: the pod does not share one"));
            }
            ("mount" | "cgroup", true) => {
                return Err(Fault::invalid(format!(
                    "a {kind} namespace cannot be joined: every container has its own"
                )));
            }
            ("user" | "time", _) => {
                return Err(Fault::invalid(format!("{kind} namespaces are not supported")));
            }
            _ => {
                return Err(Fault::invalid(format!(
                    "unknown namespace type {:?}",
                    kind.get(..kind.floor_char_boundary(32)).unwrap_or_default()
                )));
            }
        }
    }
    Ok(pod.map(|_| pid))
}

/// The holder's life: block every signal, reap whatever ends up its child,
/// never return. (As PID 1 of its PID namespace, no process inside can
/// signal it; the agent, outside, can kill it.)
pub fn pause() -> ! {
    // No core dump and no ptrace by an unprivileged process of its user.
    let _ = nix::sys::prctl::set_dumpable(false);
    // Every signal blocked and taken here: one that is not SIGCHLD is
    // dropped, so none stays queued (each queued one is charged to the
    // sender's user) however many a container sends.
    let all = SigSet::all();
    let _ = all.thread_block();
    loop {
        if all.wait() != Ok(Signal::SIGCHLD) {
            continue;
        }
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(kind: &str, path: Option<&str>) -> Namespace {
        Namespace { kind: kind.into(), path: path.map(Into::into) }
    }

    #[test]
    fn namespaces_map_to_the_pod_or_are_refused() {
        let cri = [
            ns("pid", None),
            ns("ipc", Some("/proc/42/ns/ipc")),
            ns("uts", Some("/proc/42/ns/uts")),
            ns("mount", None),
            ns("network", Some("/var/run/netns/cni-1")),
        ];
        assert_eq!(joins_pod(&cri, Some(false)).unwrap(), Some(PodPid::Own));
        assert_eq!(joins_pod(&cri, Some(true)).unwrap(), Some(PodPid::Own), "no pid path: its own");
        let mut sharing = cri.to_vec();
        sharing[0] = ns("pid", Some("/proc/4242/ns/pid"));
        assert_eq!(joins_pod(&sharing, Some(true)).unwrap(), Some(PodPid::Shared));
        // Not listed: the pod's all the same, never the agent's.
        assert_eq!(joins_pod(&[], Some(false)).unwrap(), Some(PodPid::Own));
        assert_eq!(joins_pod(&[ns("mount", None), ns("pid", None)], None).unwrap(), None);
        for (list, pod, reason) in [
            (vec![ns("network", None)], Some(false), "new one is refused"),
            (vec![ns("network", Some("/x"))], None, "not a pod"),
            (vec![ns("pid", Some("/proc/1/ns/pid"))], Some(false), "does not share"),
            (vec![ns("pid", Some("/proc/1/ns/pid"))], None, "does not share"),
            (vec![ns("mount", Some("/proc/1/ns/mnt"))], Some(true), "cannot be joined"),
            (vec![ns("user", None)], None, "not supported"),
            (vec![ns("time", None)], Some(true), "not supported"),
            (vec![ns("ipc", Some("/a")), ns("ipc", Some("/b"))], Some(false), "twice"),
            (vec![ns("bogus", None)], Some(false), "unknown namespace"),
        ] {
            let err = joins_pod(&list, pod).unwrap_err();
            assert!(err.message.contains(reason), "{list:?}: {}", err.message);
        }
    }

    #[test]
    fn host_names_are_checked() {
        for good in ["a", "web-1", "pod.example", &"x".repeat(64)] {
            check_hostname(good).unwrap();
        }
        for bad in ["", "a b", "a/b", "a\0", "é", &"x".repeat(65)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
