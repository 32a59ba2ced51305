//! Start a container process: `clone3` into new namespaces (or into a running
//! container's), its root set up with mounts and `pivot_root`, then its user,
//! groups and capabilities, `no_new_privs`, its working directory and `execve`.
//!
//! Everything the child needs is prepared before the clone as C strings and
//! pointer arrays; the child makes raw system calls only, with no allocation
//! and no lock, so it is safe whatever threads the parent has. A failing step
//! writes `(step, errno)` to a close-on-exec pipe and exits with 127; the
//! parent reads the pipe (EOF means the `execve` succeeded) and turns it into
//! a typed [`LaunchError::Setup`].
//!
//! A new container's clone shares the agent's memory (`CLONE_VM |
//! CLONE_VFORK`, as `posix_spawn` does) instead of copying it: the child runs
//! on a stack of its own while the calling thread waits until it calls
//! `execve` or exits. So starting a container costs the same whatever the
//! agent's size (no page tables to copy, no copy-on-write faults
//! afterwards), which matters most under emulation. Until `execve` the child
//! is PID 1 of a PID namespace no one else sees. An exec joins a running
//! container (and a pod's container that shares the pod's PID namespace
//! joins the containers already there, the same way, its root built by
//! the setup child), whose processes must not see anything of the agent: a
//! fork-like copy of the agent, still in the agent's PID namespace (no
//! process of the container can see, signal or trace it) and keeping the
//! agent's OOM score (the container's memory limit cannot get it killed),
//! starts in the container's cgroup, joins the container's namespaces,
//! closes every other descriptor and takes the process's identity, and only
//! then forks the process itself into the container's PID namespace
//! (`CLONE_PARENT`: the agent's child), which installs its seccomp filters
//! and calls `execve` at once. The agent waits
//! for that at most [`JOIN_DEADLINE`], reading the setup pipe to its end so
//! that whatever was forked is known, killed on a failure and reaped, and
//! then sets the process's `oom_score_adj` back to 0 (the copy keeps the
//! agent's -1000). Because the memory may be shared,
//! the child keeps to calls that change only itself: the ids are set with
//! the raw system calls (glibc's wrappers would signal the agent's threads
//! to change theirs too), and every signal is blocked across the clone so
//! that no handler of the agent runs in the child before it resets them.
//! (One effect does reach the agent: changing ids makes the shared memory
//! non-dumpable, which the agent already is: see its `main`.)

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// The `clone3` flag that starts the child in the cgroup `cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The child's stack: its frames are small and it allocates nothing.
const CHILD_STACK: usize = 256 * 1024;

/// How long an exec's setup may take before it is killed: the process is
/// already in the container's PID namespace for the last steps, where a
/// process of the container could stop it (SIGSTOP); the agent does not
/// wait for that.
pub const JOIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// The code of the setup pipe's message that carries the exec'd process's
/// PID (not a [`Step`]).
const PID_MESSAGE: u32 = 0xffff_fffe;

/// One step of preparing the container's root, run in order in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootOp {
    /// `mkdir(path, mode)`; an existing directory is fine.
    Mkdir {
        /// Absolute path in the parent's view (under the rootfs).
        path: CString,
        /// Permission bits.
        mode: u32,
    },
    /// `mount(source, target, fstype, flags, data)`.
    Mount {
        /// Source (`proc`, `tmpfs`, a path for binds).
        source: CString,
        /// Absolute target path in the parent's view (under the rootfs).
        target: CString,
        /// Filesystem type; empty for binds and remounts.
        fstype: CString,
        /// `MS_*` flags.
        flags: u64,
        /// Filesystem options; empty for none.
        data: CString,
    },
    /// `mknod(path, S_IFCHR | mode, makedev(major, minor))`.
    CharDevice {
        /// Absolute path in the parent's view (under the rootfs).
        path: CString,
        /// Permission bits.
        mode: u32,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// An empty regular file (`open(path, O_CREAT)`), to bind a file onto.
    File {
        /// Absolute path in the parent's view (under the rootfs).
        path: CString,
        /// Permission bits.
        mode: u32,
    },
    /// `symlink(target, path)`.
    Symlink {
        /// What the link points to.
        target: CString,
        /// Absolute path of the link in the parent's view.
        path: CString,
    },
}

/// What a path must be once the container's root is in place, checked in
/// the child after `pivot_root`: a mount of the kind the root operations
/// meant to put there, whatever the image's files were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountCheck {
    /// The path inside the container.
    pub path: CString,
    /// The filesystem's magic number (`statfs`'s `f_type`), if it must be one.
    pub fs_type: Option<i64>,
    /// It must be mounted read-only.
    pub read_only: bool,
}

/// A new container: its root, prepared by [`RootOp`]s, then pivoted into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewContainer {
    /// The mounted root filesystem (the overlay), absolute.
    pub rootfs: CString,
    /// Mounts, device nodes and links made under it before the pivot.
    pub ops: Vec<RootOp>,
    /// Checked after the pivot, in order; a failure stops the launch.
    pub checks: Vec<MountCheck>,
    /// Remount the root read-only after the pivot.
    pub readonly_rootfs: bool,
    /// The UTS namespace's host name; none in a pod, whose UTS namespace
    /// is shared and named once.
    pub hostname: Option<CString>,
}

/// Capability sets as bit masks (bit N is capability N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// The bounding set.
    pub bounding: u64,
    /// Effective.
    pub effective: u64,
    /// Permitted.
    pub permitted: u64,
    /// Inheritable.
    pub inheritable: u64,
    /// Ambient.
    pub ambient: u64,
}

/// The process to run, as the container sees it.
#[derive(Debug, Clone)]
pub struct Process {
    /// The executable's path inside the container (already resolved against PATH).
    pub exe: CString,
    /// argv, argv[0] included.
    pub argv: Vec<CString>,
    /// `NAME=value` entries.
    pub env: Vec<CString>,
    /// Working directory inside the container.
    pub cwd: CString,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Capability sets.
    pub capabilities: Capabilities,
    /// Set `no_new_privs` before `execve`.
    pub no_new_privileges: bool,
    /// The highest capability number the kernel knows (`/proc/sys/kernel/cap_last_cap`).
    pub last_cap: u32,
    /// Resource limits: (`RLIMIT_*` number, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    /// Compiled seccomp filters, installed in order last before `execve`
    /// (none: no filter). The kernel runs every installed filter and takes
    /// the most restrictive result.
    pub seccomp: Vec<Vec<libc::sock_filter>>,
    /// Make stdin (a terminal's other end, see [`open_pty`]) the
    /// controlling terminal of the process's new session.
    pub controlling_terminal: bool,
}

/// Where the process runs.
#[derive(Debug)]
pub enum Namespaces<'a> {
    /// New mount, PID, UTS, IPC, network and cgroup namespaces, with this root.
    New(&'a NewContainer),
    /// A container of a pod: new mount and cgroup namespaces, with this
    /// root, and the network, IPC and UTS namespaces of the process the
    /// pidfd names (the pod's, held by the agent), joined first; the PID
    /// namespace is new, or with [`PodPid::Shared`] the holder's.
    InPod(&'a NewContainer, BorrowedFd<'a>, PodPid),
    /// The namespaces of a running container, named by its init's pidfd.
    Join(BorrowedFd<'a>),
}

/// A pod container's PID namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPid {
    /// Its own.
    Own,
    /// The pod holder's: the container's processes see the other
    /// containers' that share it (Kubernetes' `shareProcessNamespace`).
    Shared,
}

/// The child's stdin, stdout and stderr.
#[derive(Debug)]
pub struct Stdio {
    /// Becomes fd 0.
    pub stdin: OwnedFd,
    /// Becomes fd 1.
    pub stdout: OwnedFd,
    /// Becomes fd 2.
    pub stderr: OwnedFd,
}

/// The step of the child's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Putting the pipes on fds 0, 1, 2.
    Stdio,
    /// `setsid`.
    Setsid,
    /// Making every mount private.
    MountPrivate,
    /// Binding the root onto itself.
    BindRoot,
    /// The root operation with this index.
    RootOp(u32),
    /// `pivot_root`.
    PivotRoot,
    /// Detaching the old root.
    DetachOldRoot,
    /// Remounting the root read-only.
    ReadonlyRoot,
    /// `sethostname`.
    Hostname,
    /// Joining the container's namespaces.
    JoinNamespaces,
    /// Dropping capabilities from the bounding set.
    Bounding,
    /// `setgroups`.
    Groups,
    /// `setresgid`.
    Gid,
    /// `setresuid`.
    Uid,
    /// `capset`.
    Capset,
    /// Raising ambient capabilities.
    Ambient,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// `chdir` to the working directory.
    Cwd,
    /// `execve`.
    Exec,
    /// Resetting signal dispositions and the mask.
    Signals,
    /// `setrlimit`.
    Rlimits,
    /// Installing the seccomp filter.
    Seccomp,
    /// Taking the terminal as the controlling terminal.
    Terminal,
    /// Setting `oom_score_adj` back to 0 (the agent's is -1000).
    OomScore,
    /// Forking the exec'd process into the container's PID namespace.
    Fork,
    /// A mount check after the pivot, by index.
    Check(u32),
    /// The exec's setup did not finish within [`JOIN_DEADLINE`].
    Deadline,
    /// A step number this code does not know.
    Unknown(u32),
}

impl Step {
    fn code(self) -> u32 {
        match self {
            Step::Stdio => 1,
            Step::Setsid => 2,
            Step::MountPrivate => 3,
            Step::BindRoot => 4,
            Step::PivotRoot => 5,
            Step::DetachOldRoot => 6,
            Step::ReadonlyRoot => 7,
            Step::Hostname => 8,
            Step::JoinNamespaces => 9,
            Step::Bounding => 10,
            Step::Groups => 11,
            Step::Gid => 12,
            Step::Uid => 13,
            Step::Capset => 14,
            Step::Ambient => 15,
            Step::NoNewPrivs => 16,
            Step::Cwd => 17,
            Step::Exec => 18,
            Step::Signals => 19,
            Step::Rlimits => 20,
            Step::Seccomp => 21,
            Step::Terminal => 22,
            Step::OomScore => 23,
            Step::Fork => 24,
            Step::Deadline => 25,
            Step::RootOp(index) => 0x1000_0000 | index,
            Step::Check(index) => 0x2000_0000 | index,
            Step::Unknown(code) => code,
        }
    }

    fn from_code(code: u32) -> Self {
        match code {
            1 => Step::Stdio,
            2 => Step::Setsid,
            3 => Step::MountPrivate,
            4 => Step::BindRoot,
            5 => Step::PivotRoot,
            6 => Step::DetachOldRoot,
            7 => Step::ReadonlyRoot,
            8 => Step::Hostname,
            9 => Step::JoinNamespaces,
            10 => Step::Bounding,
            11 => Step::Groups,
            12 => Step::Gid,
            13 => Step::Uid,
            14 => Step::Capset,
            15 => Step::Ambient,
            16 => Step::NoNewPrivs,
            17 => Step::Cwd,
            18 => Step::Exec,
            19 => Step::Signals,
            20 => Step::Rlimits,
            21 => Step::Seccomp,
            22 => Step::Terminal,
            23 => Step::OomScore,
            24 => Step::Fork,
            25 => Step::Deadline,
            code if code & 0xf000_0000 == 0x1000_0000 => Step::RootOp(code & 0x0fff_ffff),
            code if code & 0xf000_0000 == 0x2000_0000 => Step::Check(code & 0x0fff_ffff),
            code => Step::Unknown(code),
        }
    }
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A system call in the parent failed.
    #[error("{what}: {source}")]
    Parent {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The child's setup failed before `execve` completed.
    #[error("container setup failed at {step:?}: {source}")]
    Setup {
        /// The step.
        step: Step,
        /// Its errno.
        #[source]
        source: io::Error,
    },
}

fn parent(what: &'static str) -> LaunchError {
    LaunchError::Parent { what, source: io::Error::last_os_error() }
}

/// A started process.
#[derive(Debug)]
pub struct Child {
    /// Its PID in the agent's PID namespace.
    pub pid: i32,
    /// A pidfd for it: signals and waits cannot hit a recycled PID.
    pub pidfd: OwnedFd,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Child {
    /// Send `signal` through the pidfd.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a null siginfo and no flags.
        let rc =
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, ptr::null::<u8>(), 0) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Wait until the process exits and reap it.
    pub fn wait_blocking(&self) -> io::Result<Exit> {
        loop {
            // SAFETY: siginfo_t is plain data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our pidfd with a valid siginfo_t out pointer.
            let rc =
                unsafe { libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            // SAFETY: waitid filled `info`.
            let status = unsafe { info.si_status() };
            return Ok(if info.si_code == libc::CLD_EXITED { Exit::Code(status) } else { Exit::Signal(status) });
        }
    }

    /// Reap the process if it has exited; `None` while it runs.
    pub fn try_wait(&self) -> io::Result<Option<Exit>> {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our pidfd with a valid siginfo_t out pointer.
        let rc = unsafe {
            libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` (si_pid is 0 when nothing has exited yet).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(if info.si_code == libc::CLD_EXITED { Exit::Code(status) } else { Exit::Signal(status) }))
    }
}

/// `struct clone_args` (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The kernel's `struct sigaction` on x86_64 (not glibc's).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A NULL-terminated array of pointers into C strings that outlive it.
struct CArray<'a> {
    ptrs: Vec<*const libc::c_char>,
    _strings: std::marker::PhantomData<&'a CStr>,
}

impl<'a> CArray<'a> {
    fn new(strings: &'a [CString]) -> Self {
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(ptr::null());
        Self { ptrs, _strings: std::marker::PhantomData }
    }
}

/// Everything the child reads, borrowed or prepared before the clone.
struct Plan<'a> {
    namespaces: &'a Namespaces<'a>,
    process: &'a Process,
    stdio: [RawFd; 3],
    argv: CArray<'a>,
    envp: CArray<'a>,
    error_pipe: RawFd,
}

/// Start `process` in `namespaces`, directly in the cgroup `cgroup` (a
/// directory fd of cgroup v2) when given.
pub fn spawn(
    namespaces: &Namespaces<'_>,
    process: &Process,
    stdio: Stdio,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Child, LaunchError> {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(parent("cannot create the setup pipe"));
    }
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let plan = Plan {
        namespaces,
        process,
        stdio: [stdio.stdin.as_raw_fd(), stdio.stdout.as_raw_fd(), stdio.stderr.as_raw_fd()],
        argv: CArray::new(&process.argv),
        envp: CArray::new(&process.env),
        error_pipe: write_end.as_raw_fd(),
    };
    // The children rearrange fds 0 to 2 and close the others but these: none
    // of them may be one of 0 to 2 (the agent's stdio, from init, always is).
    if plan.stdio.iter().chain([&plan.error_pipe]).any(|fd| *fd < 3) {
        return Err(LaunchError::Parent { what: "a launch fd is one of 0 to 2", source: io::Error::other("") });
    }

    match namespaces {
        Namespaces::New(_) | Namespaces::InPod(_, _, PodPid::Own) => {
            spawn_new(plan, read_end, write_end, stdio, cgroup)
        }
        Namespaces::InPod(_, _, PodPid::Shared) | Namespaces::Join(_) => {
            spawn_staged(plan, read_end, write_end, stdio, cgroup)
        }
    }
}

/// A new container's init: `clone3` into new namespaces, sharing the
/// agent's memory until `execve` (see the module docs).
fn spawn_new(
    plan: Plan<'_>,
    read_end: OwnedFd,
    write_end: OwnedFd,
    stdio: Stdio,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Child, LaunchError> {
    let mut flags =
        (libc::CLONE_PIDFD | libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP | libc::CLONE_VM | libc::CLONE_VFORK) as u64;
    match plan.namespaces {
        Namespaces::New(_) => {
            flags |= (libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET) as u64;
        }
        Namespaces::InPod(..) => flags |= libc::CLONE_NEWPID as u64,
        Namespaces::Join(_) => {}
    }
    if cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let stack = Stack::new(CHILD_STACK)
        .map_err(|source| LaunchError::Parent { what: "cannot map the child's stack", source })?;
    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags,
        pidfd: &raw mut pidfd as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.base as u64,
        stack_size: stack.len as u64,
        cgroup: cgroup.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    let pid = {
        let _blocked = BlockedSignals::all();
        // SAFETY: the child runs `child_entry(&plan)` on its own stack and
        // never returns; this thread waits (CLONE_VFORK) until the child
        // called `execve` or exited, so `plan` and the stack outlive its use.
        unsafe { clone3_vm(&args, child_entry, (&raw const plan).cast()) }
    };
    drop(stack);
    if pid < 0 {
        let source = io::Error::from_raw_os_error(i32::try_from(-pid).unwrap_or(libc::EINVAL));
        return Err(LaunchError::Parent { what: "clone3 failed", source });
    }
    drop(plan);
    drop(write_end);
    drop(stdio);
    // SAFETY: clone3 stored a new pidfd owned by nobody else.
    let child = Child { pid: pid as i32, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) } };
    // The child has called execve or exited (CLONE_VFORK): the pipe holds
    // its report, if any, already.
    match read_report(&read_end, None)? {
        Report::End => Ok(child),
        Report::Failed(step, source) => {
            // The child failed and exits with 127: reap it so no zombie stays.
            let _ = child.wait_blocking();
            Err(LaunchError::Setup { step, source })
        }
        Report::Pid(_) => Err(LaunchError::Setup { step: Step::Unknown(PID_MESSAGE), source: io::Error::other("") }),
    }
}

/// An exec, or a container joining its pod's PID namespace: a setup child
/// in the agent's PID namespace, which forks the process into the
/// container's (or pod's) once it is unprivileged (see the module docs); at
/// most [`JOIN_DEADLINE`].
fn spawn_staged(
    plan: Plan<'_>,
    read_end: OwnedFd,
    write_end: OwnedFd,
    stdio: Stdio,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Child, LaunchError> {
    let mut pidfd: RawFd = -1;
    // Into the container's cgroup already: once in the container's cgroup
    // namespace, no task may move in from outside it. A new container's
    // mount and cgroup namespaces are made by the clone, as in `spawn_new`.
    let mut flags = libc::CLONE_PIDFD as u64;
    if let Namespaces::InPod(..) = plan.namespaces {
        flags |= (libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) as u64;
    }
    if cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let args = CloneArgs {
        flags,
        pidfd: &raw mut pidfd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    let pid = {
        let _blocked = BlockedSignals::all();
        // SAFETY: clone3 without CLONE_VM and with no stack behaves like
        // fork: the child gets a copy of this address space and continues
        // here, where it only runs `staged_child`, which never returns.
        let pid = unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
        if pid == 0 {
            staged_child(&plan);
        }
        pid
    };
    if pid < 0 {
        return Err(parent("clone3 failed"));
    }
    drop(plan);
    drop(write_end);
    drop(stdio);
    // SAFETY: clone3 stored a new pidfd owned by nobody else.
    let setup = Child { pid: pid as i32, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) } };
    // Read to the end: the setup child's report (a failure, or the PID) and
    // the process's (a failure before execve) may come in either order.
    let deadline = std::time::Instant::now() + JOIN_DEADLINE;
    let mut forked: Option<i32> = None;
    let mut failure: Option<LaunchError> = None;
    loop {
        match read_report(&read_end, Some(deadline)) {
            Ok(Report::End) => break,
            Ok(Report::Pid(pid)) if forked.is_none() => forked = Some(pid),
            Ok(Report::Pid(_)) => {
                let source = io::Error::other("a second PID");
                failure.get_or_insert(LaunchError::Setup { step: Step::Unknown(PID_MESSAGE), source });
            }
            Ok(Report::Failed(step, source)) => drop(failure.get_or_insert(LaunchError::Setup { step, source })),
            Err(err) => {
                failure.get_or_insert(err);
                break;
            }
        }
    }
    let process = match forked.map(|pid| (pid, pidfd_open(pid))) {
        None => None,
        Some((pid, Ok(pidfd))) => Some(Child { pid, pidfd }),
        Some((pid, Err(source))) => {
            // The agent's own unreaped child: its PID is still its own.
            // SAFETY: kill and reap that child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, ptr::null_mut(), 0);
            }
            failure.get_or_insert(LaunchError::Parent { what: "cannot open the process's pidfd", source });
            None
        }
    };
    if failure.is_none() && process.is_none() {
        failure = Some(LaunchError::Setup { step: Step::Fork, source: io::Error::other("no process was forked") });
    }
    // The setup child has exited, or is killed now (a deadline passed).
    if failure.is_some() {
        let _ = setup.signal(libc::SIGKILL);
    }
    let _ = setup.wait_blocking();
    // A PID the setup child reported after the last read (the deadline
    // passed meanwhile): that process is the agent's child, unknown to the
    // caller; it must not run.
    if failure.is_some() && process.is_none() {
        while let Ok(report) = read_report(&read_end, Some(std::time::Instant::now())) {
            match report {
                Report::Pid(pid) => {
                    // SAFETY: kill and reap the agent's own unreaped child.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, ptr::null_mut(), 0);
                    }
                }
                Report::End => break,
                Report::Failed(..) => {}
            }
        }
    }
    match (failure, process) {
        (Some(err), process) => {
            if let Some(process) = process {
                let _ = process.signal(libc::SIGKILL);
                let _ = process.wait_blocking();
            }
            Err(err)
        }
        (None, Some(process)) => {
            // The process carries the agent's -1000 from its copy; set it
            // back (it may have exited already: nothing to do then).
            let _ = std::fs::write(format!("/proc/{}/oom_score_adj", process.pid), "0");
            Ok(process)
        }
        (None, None) => Err(LaunchError::Setup { step: Step::Fork, source: io::Error::other("no process") }),
    }
}

/// What the setup pipe said.
enum Report {
    /// End of file: every child holding it called `execve` (or exited).
    End,
    /// A step failed with this errno.
    Failed(Step, io::Error),
    /// The exec'd process's PID in the agent's PID namespace.
    Pid(i32),
}

/// The next report on the setup pipe, waiting until `deadline` at most.
fn read_report(read_end: &OwnedFd, deadline: Option<std::time::Instant>) -> Result<Report, LaunchError> {
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut poll = libc::pollfd { fd: read_end.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: poll one pollfd owned here.
            let ready = unsafe { libc::poll(&raw mut poll, 1, ms) };
            if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if ready < 0 {
                return Err(parent("cannot poll the setup pipe"));
            }
            if ready == 0 {
                return Err(LaunchError::Setup {
                    step: Step::Deadline,
                    source: io::Error::from_raw_os_error(libc::ETIMEDOUT),
                });
            }
        }
        let rest = report.get_mut(got..).unwrap_or_default();
        // SAFETY: read into the remaining part of `report`.
        let n = unsafe { libc::read(read_end.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(parent("cannot read the setup pipe"));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    if got == 0 {
        return Ok(Report::End);
    }
    let code = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let value = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    if got < report.len() {
        return Err(LaunchError::Setup { step: Step::Unknown(code), source: io::Error::other("a short report") });
    }
    Ok(if code == PID_MESSAGE {
        Report::Pid(value)
    } else {
        Report::Failed(Step::from_code(code), io::Error::from_raw_os_error(value))
    })
}

/// `pidfd_open(pid)`: the process is the agent's own child, not reaped yet,
/// so its PID cannot have been reused.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just opened and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// An anonymous mapping for the child's stack, with a guard page below it.
struct Stack {
    base: *mut u8,
    len: usize,
    mapping: *mut libc::c_void,
    mapped: usize,
}

impl Stack {
    fn new(len: usize) -> io::Result<Self> {
        let page = 4096;
        let mapped = len + page;
        // SAFETY: a fresh private anonymous mapping, owned by the result.
        let mapping = unsafe {
            libc::mmap(
                ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping just made becomes the guard.
        if unsafe { libc::mprotect(mapping, page, libc::PROT_NONE) } < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: unmap what was mapped above.
            unsafe { libc::munmap(mapping, mapped) };
            return Err(err);
        }
        // SAFETY: `page` is inside the mapping.
        let base = unsafe { mapping.cast::<u8>().add(page) };
        Ok(Self { base, len, mapping, mapped })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no child runs on it any more.
        unsafe { libc::munmap(self.mapping, self.mapped) };
    }
}

/// Every signal blocked on this thread until dropped: a handler of the agent
/// must not run in the child, which may share its memory, before the child
/// reset them. The raw call: glibc's would leave its own signals 32 and 33
/// unblocked.
struct BlockedSignals(u64);

impl BlockedSignals {
    fn all() -> Self {
        let all = u64::MAX;
        let mut old = 0u64;
        // SAFETY: rt_sigprocmask with 8-byte masks owned here.
        unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &raw const all, &raw mut old, 8usize) };
        Self(old)
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: put back the mask saved in `all`.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &raw const self.0,
                ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
}

/// `clone3` with `CLONE_VM`: the child starts on the stack `args` names and
/// calls `entry(arg)`, which must never return; the parent gets the child's
/// PID or a negative errno. Written out because the child cannot return
/// through the frames of the thread it was cloned from.
///
/// # Safety
/// `args` must name a stack that stays mapped until the child called
/// `execve` or exited (CLONE_VFORK waits for that), and `entry` must not
/// return, allocate or take locks.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vm(args: &CloneArgs, entry: extern "C" fn(*const u8) -> !, arg: *const u8) -> i64 {
    let result: i64;
    // SAFETY: the caller's contract above. The kernel starts the child with
    // rsp at the top of its stack (16-byte aligned, so `call` leaves the
    // alignment the ABI expects) and rax = 0; the parent continues at 2.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => result,
            in("rdi") std::ptr::from_ref(args),
            in("rsi") size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    result
}

/// Where the child starts, on its own stack.
extern "C" fn child_entry(plan: *const u8) -> ! {
    // SAFETY: `spawn` passes its `Plan`, alive while the parent waits.
    let plan = unsafe { &*plan.cast::<Plan<'_>>() };
    child(plan)
}

/// The child: never returns.
fn child(plan: &Plan<'_>) -> ! {
    let failed = match setup(plan) {
        Ok(never) => match never {},
        Err(step) => step,
    };
    fail(plan, failed)
}

/// Report `step` with the current errno on the setup pipe and exit 127.
fn fail(plan: &Plan<'_>, step: Step) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    report(plan, step.code(), errno);
    // SAFETY: exit without running any of the parent's atexit handlers or destructors.
    unsafe { libc::_exit(127) }
}

/// Write one 8-byte report (atomic: less than PIPE_BUF) to the setup pipe.
fn report(plan: &Plan<'_>, code: u32, value: i32) {
    let mut report = [0u8; 8];
    let (head, tail) = report.split_at_mut(4);
    head.copy_from_slice(&code.to_ne_bytes());
    tail.copy_from_slice(&value.to_ne_bytes());
    // SAFETY: write a stack buffer to the setup pipe.
    unsafe { libc::write(plan.error_pipe, report.as_ptr().cast(), report.len()) };
}

/// A staged launch's setup child (in the agent's PID namespace): never returns.
fn staged_child(plan: &Plan<'_>) -> ! {
    let forked = match plan.namespaces {
        Namespaces::Join(_) => join_setup(plan),
        _ => shared_setup(plan),
    };
    match forked {
        Ok(pid) => {
            report(plan, PID_MESSAGE, pid);
            // SAFETY: exit at once, as above.
            unsafe { libc::_exit(0) }
        }
        Err(step) => fail(plan, step),
    }
}

/// What an exec's process does in the container's PID namespace, already
/// with its identity: never returns.
fn join_process(plan: &Plan<'_>) -> ! {
    // SAFETY: see `setup`.
    let failed = unsafe {
        if libc::setsid() < 0 {
            Step::Setsid
        } else if plan.process.controlling_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            Step::Terminal
        } else if let Err(step) = seccomp(plan.process) {
            // Last before execve: a profile may deny what the steps above need.
            step
        } else {
            libc::execve(plan.process.exe.as_ptr(), plan.argv.ptrs.as_ptr(), plan.envp.ptrs.as_ptr());
            Step::Exec
        }
    };
    fail(plan, failed)
}

enum Never {}

/// Check a libc return value; a negative one fails `step`.
fn check(rc: libc::c_long, step: Step) -> Result<(), Step> {
    if rc < 0 { Err(step) } else { Ok(()) }
}

/// What every child does first: stdio, default signals, descriptors marked
/// close-on-exec, and with `reset_oom` the OOM score back to normal.
///
/// # Safety
/// Raw system calls on what `plan` keeps alive; in the child only.
unsafe fn prelude(plan: &Plan<'_>, reset_oom: bool) -> Result<(), Step> {
    // SAFETY: see `setup`.
    unsafe {
        for (fd, target) in plan.stdio.iter().zip(0..) {
            if *fd == target {
                check(libc::fcntl(target, libc::F_SETFD, 0).into(), Step::Stdio)?;
            } else {
                check(libc::dup2(*fd, target).into(), Step::Stdio)?;
            }
        }
        // Signal dispositions and the mask are the agent's (Rust ignores
        // SIGPIPE; an ignored signal stays ignored across execve): the
        // container starts with the defaults, as under any OCI runtime.
        // The raw system call: glibc refuses to touch its own signals 32 and 33.
        let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, signal, &raw const default, ptr::null_mut::<u8>(), 8usize);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut()).into(), Step::Signals)?;
        // Nothing else crosses the execve, whatever the parent left open.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
        if !reset_oom {
            return Ok(());
        }
        // The agent keeps the OOM killer off itself (-1000); the container's
        // processes are fair game like any other.
        let oom = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(oom.into(), Step::OomScore)?;
        let written = libc::write(oom, c"0".as_ptr().cast(), 1);
        libc::close(oom);
        check(written as libc::c_long, Step::OomScore)?;
    }
    Ok(())
}

/// Install the process's seccomp filters (the last thing before the
/// process runs its own code).
///
/// # Safety
/// Raw system calls; in the child only.
unsafe fn seccomp(process: &Process) -> Result<(), Step> {
    for filter in process.seccomp.iter().filter(|filter| !filter.is_empty()) {
        let len = u16::try_from(filter.len()).map_err(|_| Step::Seccomp)?;
        let program = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut() };
        // SAFETY: the filter outlives the call; the kernel copies it.
        let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const program, 0, 0) };
        check(rc.into(), Step::Seccomp)?;
    }
    Ok(())
}

/// A new container's init (`Namespaces::New`, `Namespaces::InPod`).
fn setup(plan: &Plan<'_>) -> Result<Never, Step> {
    let (container, pod) = match plan.namespaces {
        Namespaces::New(container) => (*container, None),
        Namespaces::InPod(container, pod, _) => (*container, Some(pod)),
        Namespaces::Join(_) => return Err(Step::JoinNamespaces),
    };
    // SAFETY: raw system calls on C strings and pointer arrays that `plan`
    // keeps alive; nothing allocates.
    unsafe {
        if let Some(pod) = pod {
            // Into the pod's namespaces before anything else: the network,
            // IPC and UTS namespaces the clone did not make new.
            let flags = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            check(libc::setns(pod.as_raw_fd(), flags).into(), Step::JoinNamespaces)?;
        }
        prelude(plan, true)?;
        check(libc::setsid().into(), Step::Setsid)?;
        if plan.process.controlling_terminal {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0).into(), Step::Terminal)?;
        }
        new_root(container)?;
        identity(plan.process)?;
        check(libc::chdir(plan.process.cwd.as_ptr()).into(), Step::Cwd)?;
        // Last before execve, so the filter constrains the container only.
        seccomp(plan.process)?;
        libc::execve(plan.process.exe.as_ptr(), plan.argv.ptrs.as_ptr(), plan.envp.ptrs.as_ptr());
        Err(Step::Exec)
    }
}

/// An exec's setup child, in the agent's PID namespace where no process of
/// the container sees it, keeping the agent's OOM score: join the
/// container's namespaces (its PID namespace for the next child only),
/// close every descriptor but stdio and the setup pipe, take the process's
/// identity and working directory, then fork the process as the agent's
/// child; returns its PID.
fn join_setup(plan: &Plan<'_>) -> Result<i32, Step> {
    let Namespaces::Join(pidfd) = plan.namespaces else { return Err(Step::JoinNamespaces) };
    // SAFETY: see `setup`.
    unsafe {
        prelude(plan, false)?;
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWCGROUP
            | libc::CLONE_NEWPID;
        check(libc::setns(pidfd.as_raw_fd(), flags).into(), Step::JoinNamespaces)?;
        close_all_but_stdio(plan)?;
        identity(plan.process)?;
        check(libc::chdir(plan.process.cwd.as_ptr()).into(), Step::Cwd)?;
        fork_process(plan)
    }
}

/// The setup child of a container that joins its pod's PID namespace, in
/// the agent's PID namespace (no process of the pod sees it, so none can
/// stop or trace it while it holds the agent's privileges), already in the
/// container's new mount and cgroup namespaces: join the pod's network,
/// IPC and UTS namespaces (and its PID namespace for the next child only),
/// build the root, close every descriptor but stdio and the setup pipe,
/// take the process's identity, then fork the container's init into the
/// pod's PID namespace as the agent's child; returns its PID. Its `/proc`
/// must be a mount of the pod's PID namespace, made beforehand (a `proc`
/// mounted here would show the agent's).
fn shared_setup(plan: &Plan<'_>) -> Result<i32, Step> {
    let Namespaces::InPod(container, pod, PodPid::Shared) = plan.namespaces else {
        return Err(Step::JoinNamespaces);
    };
    // SAFETY: see `setup`.
    unsafe {
        let flags = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID;
        check(libc::setns(pod.as_raw_fd(), flags).into(), Step::JoinNamespaces)?;
        prelude(plan, true)?;
        new_root(container)?;
        close_all_but_stdio(plan)?;
        identity(plan.process)?;
        check(libc::chdir(plan.process.cwd.as_ptr()).into(), Step::Cwd)?;
        fork_process(plan)
    }
}

/// Close every descriptor but 0 to 2 and the setup pipe: nothing of the
/// agent's reaches the process, not even until `execve`.
///
/// # Safety
/// Raw system calls; in a setup child only.
unsafe fn close_all_but_stdio(plan: &Plan<'_>) -> Result<(), Step> {
    let pipe = u32::try_from(plan.error_pipe).map_err(|_| Step::Stdio)?;
    // SAFETY: close_range on this child's own descriptor table.
    unsafe {
        if pipe > 3 {
            check(libc::syscall(libc::SYS_close_range, 3u32, pipe - 1, 0u32), Step::Stdio)?;
        }
        check(libc::syscall(libc::SYS_close_range, pipe + 1, u32::MAX, 0u32), Step::Stdio)?;
    }
    Ok(())
}

/// Fork the process itself: the agent's child (`CLONE_PARENT`), in the PID
/// namespace this setup child joined for its children, unprivileged from
/// its first instruction; returns its PID.
///
/// # Safety
/// Raw system calls; in a setup child only.
unsafe fn fork_process(plan: &Plan<'_>) -> Result<i32, Step> {
    let args = CloneArgs { flags: libc::CLONE_PARENT as u64, ..CloneArgs::default() };
    // SAFETY: a fork-like clone3; the child only runs `join_process`.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
    if pid == 0 {
        join_process(plan);
    }
    if pid < 0 {
        return Err(Step::Fork);
    }
    i32::try_from(pid).map_err(|_| Step::Fork)
}

/// Mounts, pivot and host name of a new container (in the child).
///
/// # Safety
/// Raw system calls on the container's prepared C strings.
unsafe fn new_root(container: &NewContainer) -> Result<(), Step> {
    let null = ptr::null::<libc::c_char>();
    // SAFETY: see `setup`.
    unsafe {
        check(
            libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, ptr::null()).into(),
            Step::MountPrivate,
        )?;
        let root = container.rootfs.as_ptr();
        check(libc::mount(root, root, null, libc::MS_BIND | libc::MS_REC, ptr::null()).into(), Step::BindRoot)?;
        // Device nodes and directories get exactly their modes (/dev/null is
        // 0666); the process itself starts with the OCI default umask below.
        libc::umask(0);
        for (op, index) in container.ops.iter().zip(0u32..) {
            let step = Step::RootOp(index);
            match op {
                RootOp::Mkdir { path, mode } => {
                    if libc::mkdir(path.as_ptr(), *mode) < 0 && *libc::__errno_location() != libc::EEXIST {
                        return Err(step);
                    }
                }
                RootOp::Mount { source, target, fstype, flags, data } => {
                    let fstype = if fstype.is_empty() { null } else { fstype.as_ptr() };
                    let data = if data.is_empty() { ptr::null() } else { data.as_ptr().cast() };
                    check(libc::mount(source.as_ptr(), target.as_ptr(), fstype, *flags, data).into(), step)?;
                }
                RootOp::CharDevice { path, mode, major, minor } => {
                    let dev = libc::makedev(*major, *minor);
                    check(libc::mknod(path.as_ptr(), libc::S_IFCHR | *mode, dev).into(), step)?;
                }
                RootOp::File { path, mode } => {
                    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
                    let fd = libc::open(path.as_ptr(), flags, *mode);
                    check(fd.into(), step)?;
                    libc::close(fd);
                }
                RootOp::Symlink { target, path } => {
                    check(libc::symlink(target.as_ptr(), path.as_ptr()).into(), step)?;
                }
            }
        }
        libc::umask(0o022);
        check(libc::chdir(root).into(), Step::PivotRoot)?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()), Step::PivotRoot)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into(), Step::DetachOldRoot)?;
        check(libc::chdir(c"/".as_ptr()).into(), Step::DetachOldRoot)?;
        if container.readonly_rootfs {
            // A bind remount sets the mount's flags to exactly these: keep nodev.
            let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NODEV;
            check(libc::mount(null, c"/".as_ptr(), null, flags, ptr::null()).into(), Step::ReadonlyRoot)?;
        }
        if let Some(name) = &container.hostname {
            let name = name.as_bytes();
            check(libc::sethostname(name.as_ptr().cast(), name.len()).into(), Step::Hostname)?;
        }
        // Whatever the image held at those paths (a symbolic link leading a
        // mount elsewhere included), each must now be what was meant.
        for (check, index) in container.checks.iter().zip(0u32..) {
            let step = Step::Check(index);
            let mut fs: libc::statfs = std::mem::zeroed();
            if libc::statfs(check.path.as_ptr(), &mut fs) < 0 {
                return Err(step);
            }
            let mut vfs: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(check.path.as_ptr(), &mut vfs) < 0 {
                return Err(step);
            }
            let wrong_type = check.fs_type.is_some_and(|want| fs.f_type != want);
            let writable = check.read_only && (vfs.f_flag & libc::ST_RDONLY) == 0;
            if wrong_type || writable {
                *libc::__errno_location() = libc::EXDEV;
                return Err(step);
            }
        }
    }
    Ok(())
}

/// Bounding set, groups, ids, capabilities, no_new_privs (in the child).
fn identity(process: &Process) -> Result<(), Step> {
    let caps = process.capabilities;
    // SAFETY: see `setup`.
    unsafe {
        // Limits first: raising a hard limit needs CAP_SYS_RESOURCE, gone after setresuid.
        for (resource, soft, hard) in &process.rlimits {
            let limit = libc::rlimit { rlim_cur: *soft, rlim_max: *hard };
            check(libc::setrlimit(*resource, &limit).into(), Step::Rlimits)?;
        }
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into(), Step::Bounding)?;
        for cap in 0..=process.last_cap.min(63) {
            if caps.bounding & (1 << cap) == 0 {
                check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0).into(), Step::Bounding)?;
            }
        }
        // The raw calls: they change this task only (see the module docs).
        check(libc::syscall(libc::SYS_setgroups, process.groups.len(), process.groups.as_ptr()), Step::Groups)?;
        check(libc::syscall(libc::SYS_setresgid, process.gid, process.gid, process.gid), Step::Gid)?;
        check(libc::syscall(libc::SYS_setresuid, process.uid, process.uid, process.uid), Step::Uid)?;
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [
            CapData {
                effective: caps.effective as u32,
                permitted: caps.permitted as u32,
                inheritable: caps.inheritable as u32,
            },
            CapData {
                effective: (caps.effective >> 32) as u32,
                permitted: (caps.permitted >> 32) as u32,
                inheritable: (caps.inheritable >> 32) as u32,
            },
        ];
        check(libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()), Step::Capset)?;
        check(
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0).into(),
            Step::Ambient,
        )?;
        for cap in 0..=process.last_cap.min(63) {
            if caps.ambient & (1 << cap) != 0 {
                let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
                check(libc::prctl(libc::PR_CAP_AMBIENT, raise, cap as libc::c_ulong, 0, 0).into(), Step::Ambient)?;
            }
        }
        if process.no_new_privileges {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(), Step::NoNewPrivs)?;
        }
    }
    Ok(())
}

/// A new pseudo-terminal from the devpts instance at `/dev/pts`: its
/// master (for the agent) and its other end (the process's stdio), both
/// close-on-exec. The other end is opened through the master
/// (`TIOCGPTPEER`), with no path lookup.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: open returns a new fd or -1.
    let master = unsafe { libc::open(c"/dev/pts/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just opened and is owned here only.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new fd or -1.
    let peer = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if peer < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just opened and is owned here only.
    Ok((master, unsafe { OwnedFd::from_raw_fd(peer) }))
}

/// Set a terminal's window size (`TIOCSWINSZ` on its master); the process
/// on it gets SIGWINCH.
pub fn set_window_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Capability names as the OCI spec writes them (`CAP_CHOWN`), by number.
pub const CAPABILITY_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The bit mask of capability names; an unknown name is returned as the error.
pub fn capability_mask<S: AsRef<str>>(names: &[S]) -> Result<u64, String> {
    let mut mask = 0u64;
    for name in names {
        let name = name.as_ref();
        let bit = CAPABILITY_NAMES.iter().position(|known| *known == name).ok_or_else(|| name.to_string())?;
        mask |= 1 << bit;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip() {
        for step in [Step::Stdio, Step::PivotRoot, Step::Exec, Step::RootOp(7), Step::Capset] {
            assert_eq!(Step::from_code(step.code()), step);
        }
        assert_eq!(Step::from_code(999), Step::Unknown(999));
    }

    #[test]
    fn capability_names_map_to_kernel_numbers() {
        assert_eq!(capability_mask(&["CAP_CHOWN"]).unwrap(), 1);
        assert_eq!(capability_mask(&["CAP_SYS_ADMIN"]).unwrap(), 1 << 21);
        assert_eq!(capability_mask(&["CAP_CHECKPOINT_RESTORE"]).unwrap(), 1 << 40);
        assert_eq!(capability_mask(&["CAP_CHOWN", "CAP_NOPE"]).unwrap_err(), "CAP_NOPE");
    }

    #[test]
    fn clone_args_is_version_2() {
        assert_eq!(size_of::<CloneArgs>(), 88);
    }
}
