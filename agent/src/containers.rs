//! Containers: create on a mounted overlay, start, exec, signal, wait, stdio
//! and delete.
//!
//! The launch itself (`clone3` into namespaces and the container's cgroup,
//! mounts, `pivot_root`, user, capabilities, `execve`) is in `parma-sys`;
//! this module prepares what it needs from the host's request and keeps
//! each process's pipes and exit status. Nothing here blocks: stdio pipes
//! are non-blocking on the agent's side, waits poll. A process that writes
//! more than the host reads blocks in its own `write`, so nothing it writes
//! is lost and the agent's memory stays bounded.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2};
use nix::sys::stat::Mode;
use parma_protocol::{ContainerStats, ErrorCode, OutputStream, ProcessSpec, Resources};
use parma_sys::launch::{
    self, Capabilities, Child, Exit, MountCheck, Namespaces, NewContainer, PodPid, Process, RootOp,
};

use crate::fault::Fault;
use crate::pod::Sandbox;
use crate::storage;

/// The cgroup under which every container gets its own.
const CGROUP_PARENT: &str = "/sys/fs/cgroup/parma";
/// Where the agent keeps secrets from a key broker, a directory per
/// container, bound read-only at [`IN_CONTAINER_SECRETS`].
const SECRETS: &str = "/run/parma/secrets";
/// Where a container finds its secrets.
pub const IN_CONTAINER_SECRETS: &str = "/dev/parma/secrets";
/// The cgroup of the pod's namespace holder (a sibling of the containers').
const HOLDER_CGROUP: &str = "/sys/fs/cgroup/parma-pod";
/// Memory kept out of the containers' reach (all of them together), for the
/// agent and the kernel: at least this, or an eighth of the guest's.
const RESERVED_MEMORY: u64 = 64 << 20;
/// Tasks kept out of the containers' reach, below the kernel's `threads-max`.
const RESERVED_TASKS: u64 = 256;
/// Most containers at once.
pub const MAX_CONTAINERS: usize = 128;
/// Most exec'd process records per container: running ones, and exited
/// ones whose status or output the host has not collected yet.
pub const MAX_EXECS: usize = 64;
/// Most masked or read-only paths a request may name.
const MAX_PATHS: usize = 64;
/// Most bytes one `ReadOutput` returns.
pub const MAX_READ: usize = 256 * 1024;
/// The `PATH` searched when the process's env has none (the OCI default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process the agent started, with its pipes.
#[derive(Debug)]
struct Proc {
    child: Child,
    args: Vec<String>,
    /// The policy let the host reach its stdio (else it is /dev/null).
    stdio: bool,
    /// The host got its exit status through `WaitProcess`.
    reported: bool,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The terminal's master, for `ResizeTerminal`; none without a terminal.
    terminal: Option<OwnedFd>,
    exit: Option<Exit>,
}

impl Proc {
    fn poll_exit(&mut self) -> Result<Option<Exit>, String> {
        if self.exit.is_none() {
            self.exit =
                self.child.try_wait().map_err(|err| format!("cannot wait for pid {}: {err}", self.child.pid))?;
        }
        Ok(self.exit)
    }

    /// Exited, its status reported and its output read to the end: nothing
    /// left for the host to collect.
    fn collected(&self) -> bool {
        self.exit.is_some() && self.reported && self.stdout.is_none() && self.stderr.is_none()
    }
}

/// A container: prepared by `create`, running after `start`.
#[derive(Debug)]
struct Container {
    spec: ProcessSpec,
    prepared: Option<(NewContainer, Process)>,
    init: Option<Proc>,
    execs: BTreeMap<String, Proc>,
    cgroup: String,
    /// The policy let the host reach the stdio of its processes.
    stdio: bool,
    /// It shares the pod's network, IPC and UTS namespaces (and with
    /// `Shared` its PID namespace).
    in_pod: Option<PodPid>,
    /// Its secrets directory, once a secret was provisioned (bound at its start).
    secrets: Option<String>,
    /// Which container of this boot it is: an id can be deleted and
    /// created again while a secret for the first is fetched.
    serial: u64,
    /// Secrets being fetched for it ([`Containers::begin_secret`]): it does
    /// not start before they end.
    fetching: usize,
}

/// A secret being fetched for a created container, outside the agent's
/// lock: [`Containers::end_secret`] writes it only into that container,
/// never into a later one of the same id.
#[derive(Debug)]
pub struct SecretTicket {
    id: String,
    serial: u64,
}

/// How a container is created, besides its process.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// The agent-side socket of its attestation endpoint, bound at
    /// [`crate::endpoint::IN_CONTAINER`] (none: nothing is there).
    pub attestation: Option<&'a str>,
    /// Its host name (default: its id).
    pub hostname: Option<&'a str>,
    /// Mount its root read-only.
    pub readonly_rootfs: bool,
    /// Its cgroup limits.
    pub resources: Resources,
    /// Its mounts beyond the defaults, as the policy allowed them.
    pub mounts: &'a [parma_protocol::Mount],
    /// Paths under `/proc` and `/sys` it sees empty.
    pub masked_paths: &'a [String],
    /// Paths under `/proc` and `/sys` it sees read-only.
    pub readonly_paths: &'a [String],
    /// The policy let the host reach its processes' stdio.
    pub stdio: bool,
    /// The OCI spec's namespace list (see `pod::joins_pod`).
    pub namespaces: &'a [parma_protocol::Namespace],
}

/// What a process's status is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Still running.
    pub running: bool,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Killing signal, when one did.
    pub signal: Option<i32>,
}

/// Every container of this boot.
#[derive(Debug, Default)]
pub struct Containers {
    containers: BTreeMap<String, Container>,
    /// The pod, once `CreateSandbox` made the UVM one.
    sandbox: Option<Sandbox>,
    /// The containers' parent cgroup has its guest-wide limits.
    guest_limits: bool,
    /// The serial the next container gets.
    next_serial: u64,
}

impl Containers {
    /// Make the UVM a pod: its namespaces held by a process of the agent's.
    /// Only before any container exists (those would have namespaces of
    /// their own, outside the pod), and once.
    pub fn create_sandbox(&mut self, hostname: &str, share_pid: bool) -> Result<(), Fault> {
        if self.sandbox.is_some() {
            return Err(Fault::wrong_state("the UVM is already a pod"));
        }
        if !self.containers.is_empty() {
            return Err(Fault::wrong_state("containers exist outside a pod: the sandbox comes first"));
        }
        if !self.guest_limits {
            guest_limits()?;
            self.guest_limits = true;
        }
        // The holder's own cgroup, outside the containers': one task, so
        // that nothing can ever fork from it (not even through ptrace, in a
        // shared PID namespace) outside a container's limits.
        if let Err(err) = std::fs::create_dir(HOLDER_CGROUP)
            && err.kind() != ErrorKind::AlreadyExists
        {
            return Err(format!("cannot create cgroup {HOLDER_CGROUP}: {err}").into());
        }
        limit(HOLDER_CGROUP, &Resources { pids_max: Some(1), ..Resources::default() })?;
        let cgroup = File::open(HOLDER_CGROUP).map_err(|err| format!("cannot open {HOLDER_CGROUP}: {err}"))?;
        self.sandbox = Some(Sandbox::create(hostname, share_pid, last_cap(), cgroup.as_fd())?);
        Ok(())
    }

    /// The pod, for its network requests.
    pub fn sandbox(&self) -> Result<&Sandbox, Fault> {
        self.sandbox.as_ref().ok_or_else(|| Fault::wrong_state("the UVM is not a pod: CreateSandbox first"))
    }

    /// Whether `id` exists.
    pub fn exists(&self, id: &str) -> bool {
        self.containers.contains_key(id)
    }

    /// The command of a container's init or exec process (for signal decisions).
    pub fn command(&self, id: &str, exec_id: Option<&str>) -> Option<Vec<String>> {
        let container = self.containers.get(id)?;
        match exec_id {
            None => Some(container.spec.args.clone()),
            Some(exec_id) => container.execs.get(exec_id).map(|p| p.args.clone()),
        }
    }

    /// Whether the host may reach the stdio of a process (the policy's
    /// `allow_stdio_access` when it was allowed).
    pub fn stdio_allowed(&self, id: &str, exec_id: Option<&str>) -> bool {
        let Some(container) = self.containers.get(id) else { return false };
        match exec_id {
            None => container.stdio,
            Some(exec_id) => container.execs.get(exec_id).is_some_and(|p| p.stdio),
        }
    }

    /// The ids of the containers whose init process runs.
    pub fn running_ids(&mut self) -> Vec<String> {
        self.containers
            .iter_mut()
            .filter_map(|(id, c)| {
                c.init.as_mut().is_some_and(|p| matches!(p.poll_exit(), Ok(None))).then(|| id.clone())
            })
            .collect()
    }

    /// Whether any process of container `id` still runs.
    pub fn running(&mut self, id: &str) -> bool {
        let Some(container) = self.containers.get_mut(id) else { return false };
        let init = container.init.as_mut().is_some_and(|p| matches!(p.poll_exit(), Ok(None)));
        init || container.execs.values_mut().any(|p| matches!(p.poll_exit(), Ok(None)))
    }

    /// Prepare container `id` on its mounted overlay.
    pub fn create(&mut self, id: &str, spec: &ProcessSpec, options: &Options<'_>) -> Result<(), Fault> {
        if self.containers.contains_key(id) {
            return Err(Fault::new(ErrorCode::AlreadyExists, format!("container {id:?} already exists")));
        }
        if self.containers.len() >= MAX_CONTAINERS {
            return Err(Fault::new(
                ErrorCode::LimitReached,
                format!("{MAX_CONTAINERS} containers exist: delete one first"),
            ));
        }
        if spec.terminal && !options.stdio {
            return Err(Fault::new(
                ErrorCode::PolicyDenied,
                "a terminal needs stdio access, which the policy does not allow",
            ));
        }
        let rootfs = storage::rootfs_target(id);
        let in_pod = crate::pod::joins_pod(options.namespaces, self.sandbox.as_ref().map(|pod| pod.share_pid))?;
        if options.attestation.is_some() && in_pod == Some(PodPid::Shared) {
            // A neighbour with the same user could trace its processes and
            // have them ask in its name.
            return Err(Fault::new(
                ErrorCode::PolicyDenied,
                format!("container {id:?} has an attestation endpoint: it may not share the pod's PID namespace"),
            ));
        }
        let hostname = match (&self.sandbox, options.hostname) {
            (Some(pod), Some(asked)) if asked != pod.hostname => {
                return Err(Fault::invalid(format!(
                    "host name {:?} is not the pod's {:?}: a pod has one",
                    asked.get(..asked.floor_char_boundary(64)).unwrap_or_default(),
                    pod.hostname
                )));
            }
            (Some(_), _) => None,
            (None, asked) => Some(asked.unwrap_or(id)),
        };
        if let Some(hostname) = hostname
            && (hostname.is_empty() || hostname.len() > 64 || hostname.contains('\0'))
        {
            return Err(Fault::invalid(format!("host name {hostname:?} is not 1 to 64 bytes")));
        }
        let process = prepare_process(&rootfs, spec)?;
        check_mount_points(&rootfs)?;
        let mut ops = root_ops(&rootfs, in_pod == Some(PodPid::Shared))?;
        if let Some(socket) = options.attestation {
            ops.extend(endpoint_ops(&rootfs, socket)?);
        }
        let (path_ops, mut checks) = path_ops(&rootfs, options.masked_paths, options.readonly_paths)?;
        ops.extend(path_ops);
        ops.extend(crate::mounts::prepare(&rootfs, options.mounts)?);
        checks.splice(0..0, standard_checks()?);
        let new = NewContainer {
            rootfs: cstring(&rootfs)?,
            ops,
            checks,
            readonly_rootfs: options.readonly_rootfs,
            hostname: hostname.map(cstring).transpose()?,
        };
        let cgroup = format!("{CGROUP_PARENT}/{id}");
        if !self.guest_limits {
            guest_limits()?;
            self.guest_limits = true;
        }
        make_cgroup(&cgroup)?;
        if let Err(err) = limit(&cgroup, &options.resources) {
            let _ = std::fs::remove_dir(&cgroup);
            return Err(err.into());
        }
        self.next_serial += 1;
        self.containers.insert(
            id.to_string(),
            Container {
                spec: spec.clone(),
                prepared: Some((new, process)),
                init: None,
                execs: BTreeMap::new(),
                cgroup,
                stdio: options.stdio,
                in_pod,
                secrets: None,
                serial: self.next_serial,
                fetching: 0,
            },
        );
        Ok(())
    }

    /// Whether container `id` can take a secret: it exists and has not started.
    pub fn check_secret_target(&self, id: &str) -> Result<(), Fault> {
        let container = self.containers.get(id).ok_or_else(|| no_container(id))?;
        if container.in_pod == Some(PodPid::Shared) {
            // Another container of the pod could read it through /proc/PID/root.
            return Err(Fault::new(
                ErrorCode::PolicyDenied,
                format!("container {id:?} shares the pod's PID namespace: its secrets would be its neighbours'"),
            ));
        }
        match container.prepared {
            Some(_) => Ok(()),
            None => Err(Fault::wrong_state(format!("container {id:?} has started: a secret goes in before the start"))),
        }
    }

    /// A secret is about to be fetched for container `id` (which can take
    /// one: [`Containers::check_secret_target`]); it does not start until
    /// [`Containers::end_secret`] is called with the ticket.
    pub fn begin_secret(&mut self, id: &str) -> Result<SecretTicket, Fault> {
        self.check_secret_target(id)?;
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        container.fetching += 1;
        Ok(SecretTicket { id: id.to_string(), serial: container.serial })
    }

    /// The fetch of `ticket` ended: with the secret, write it as `file`
    /// ([`Containers::add_secret`]) if the container it was fetched for is
    /// still there (not deleted, nor another of its id created since).
    pub fn end_secret(&mut self, ticket: SecretTicket, secret: Option<(&str, &[u8])>) -> Result<(), Fault> {
        let SecretTicket { id, serial } = ticket;
        match self.containers.get_mut(&id) {
            Some(container) if container.serial == serial => {
                container.fetching = container.fetching.saturating_sub(1);
            }
            _ => {
                return Err(Fault::wrong_state(format!(
                    "container {id:?} was deleted while its secret was fetched; the secret is dropped"
                )));
            }
        }
        match secret {
            Some((file, data)) => self.add_secret(&id, file, data),
            None => Ok(()),
        }
    }

    /// Write a secret from a key broker as `file` in created container
    /// `id`'s secrets directory (mode 0440, owned by its user and group; a
    /// file of that name is replaced), which its start binds read-only at
    /// [`IN_CONTAINER_SECRETS`].
    pub fn add_secret(&mut self, id: &str, file: &str, data: &[u8]) -> Result<(), Fault> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        self.check_secret_target(id)?;
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        let dir = format!("{SECRETS}/{id}");
        if container.secrets.is_none() {
            // A fresh directory: nothing of an earlier container with this id.
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => return Err(format!("cannot clear {dir}: {err}").into()),
            }
            std::fs::create_dir_all(SECRETS).map_err(|err| format!("cannot create {SECRETS}: {err}"))?;
            std::fs::create_dir(&dir).map_err(|err| format!("cannot create {dir}: {err}"))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|err| format!("cannot set {dir}'s mode: {err}"))?;
        let path = format!("{dir}/{file}");
        let _ = std::fs::remove_file(&path);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o440)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|err| format!("cannot create {path}: {err}"))?;
        let written = std::io::Write::write_all(&mut out, data)
            .and_then(|()| std::os::unix::fs::fchown(&out, Some(container.spec.uid), Some(container.spec.gid)));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&path);
            return Err(format!("cannot write {path}: {err}").into());
        }
        if container.secrets.is_none() {
            let Some((new, _)) = container.prepared.as_mut() else {
                return Err(Fault::wrong_state(format!("container {id:?} has started")));
            };
            let rootfs = new.rootfs.to_string_lossy().into_owned();
            new.ops.extend(secrets_ops(&rootfs, &dir)?);
            container.secrets = Some(dir);
        }
        Ok(())
    }

    /// Container `id`'s cgroup as `/proc/PID/cgroup` names it (`/parma/ID`).
    pub fn cgroup_path(&self, id: &str) -> Option<String> {
        let container = self.containers.get(id)?;
        container.cgroup.strip_prefix("/sys/fs/cgroup").map(str::to_string)
    }

    /// Write new limits into container `id`'s cgroup.
    pub fn update(&mut self, id: &str, resources: &Resources) -> Result<(), Fault> {
        let container = self.containers.get(id).ok_or_else(|| no_container(id))?;
        Ok(limit(&container.cgroup, resources)?)
    }

    /// Container `id`'s resource use, from its cgroup.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, Fault> {
        let container = self.containers.get(id).ok_or_else(|| no_container(id))?;
        Ok(cgroup_stats(&container.cgroup)?)
    }

    /// Start a created container's init process; returns its PID.
    pub fn start(&mut self, id: &str) -> Result<i32, Fault> {
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        if container.fetching > 0 {
            return Err(Fault::wrong_state(format!(
                "container {id:?} waits for a secret being fetched from its broker: it starts after"
            )));
        }
        let pod = match (container.in_pod, &self.sandbox) {
            (None, _) => None,
            (Some(pid), Some(sandbox)) => Some((sandbox.pidfd(), pid)),
            (Some(_), None) => {
                return Err(Fault::wrong_state(format!("container {id:?} belongs to a pod that is gone")));
            }
        };
        let (new, process) = container
            .prepared
            .take()
            .ok_or_else(|| Fault::wrong_state(format!("container {id:?} was already started")))?;
        let launched =
            pipes(container.spec.terminal, container.stdio).map_err(Fault::from).and_then(|(stdio, pipes)| {
                let cgroup =
                    File::open(&container.cgroup).map_err(|err| format!("cannot open {}: {err}", container.cgroup))?;
                let namespaces = match pod {
                    Some((pod, pid)) => Namespaces::InPod(&new, pod, pid),
                    None => Namespaces::New(&new),
                };
                launch::spawn(&namespaces, &process, stdio, Some(cgroup.as_fd()))
                    .map(|child| (child, pipes))
                    .map_err(|err| launch_fault(&format!("cannot start container {id:?}"), &err))
            });
        // A start that failed may be tried again: the policy still says created.
        let (child, pipes) = match launched {
            Ok(launched) => launched,
            Err(err) => {
                container.prepared = Some((new, process));
                return Err(err);
            }
        };
        let pid = child.pid;
        container.init = Some(pipes.into_proc(child, container.spec.args.clone(), container.stdio));
        tracing::info!("container {id} started as pid {pid}");
        Ok(pid)
    }

    /// Start `spec` in running container `id` as `exec_id`; `stdio`: the
    /// policy lets the host reach its stdio.
    pub fn exec(&mut self, id: &str, exec_id: &str, spec: &ProcessSpec, stdio: bool) -> Result<i32, Fault> {
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        if container.execs.contains_key(exec_id) {
            return Err(Fault::new(
                ErrorCode::AlreadyExists,
                format!("process {exec_id:?} already exists in container {id:?}"),
            ));
        }
        if container.execs.len() >= MAX_EXECS {
            return Err(Fault::new(
                ErrorCode::LimitReached,
                format!(
                    "container {id:?} has {MAX_EXECS} exec'd processes the host has not collected (wait for them and \
                 read their output to the end)"
                ),
            ));
        }
        if spec.terminal && !stdio {
            return Err(Fault::new(
                ErrorCode::PolicyDenied,
                "a terminal needs stdio access, which the policy does not allow",
            ));
        }
        // The policy decides an exec by its command, env and working dir; its
        // identity must be the container's, so an exec cannot gain privileges.
        let same_identity = spec.uid == container.spec.uid
            && spec.gid == container.spec.gid
            && spec.groups == container.spec.groups
            && spec.capabilities == container.spec.capabilities
            && spec.seccomp == container.spec.seccomp
            && (spec.no_new_privileges || !container.spec.no_new_privileges);
        if !same_identity {
            return Err(Fault::invalid(format!(
                "an exec in container {id:?} must run with the container's uid, gid, groups, capabilities, \
                 seccomp profile and no_new_privileges"
            )));
        }
        let init =
            container.init.as_mut().ok_or_else(|| Fault::wrong_state(format!("container {id:?} has not started")))?;
        if init.poll_exit()?.is_some() {
            return Err(Fault::wrong_state(format!("container {id:?} has exited")));
        }
        let process = prepare_process(&storage::rootfs_target(id), spec)?;
        let (child_stdio, pipes) = pipes(spec.terminal, stdio)?;
        let cgroup = File::open(&container.cgroup).map_err(|err| format!("cannot open {}: {err}", container.cgroup))?;
        let child =
            launch::spawn(&Namespaces::Join(init.child.pidfd.as_fd()), &process, child_stdio, Some(cgroup.as_fd()))
                .map_err(|err| launch_fault(&format!("cannot exec in container {id:?}"), &err))?;
        let pid = child.pid;
        container.execs.insert(exec_id.to_string(), pipes.into_proc(child, spec.args.clone(), stdio));
        Ok(pid)
    }

    /// Drop an exec'd process's record once the host collected everything
    /// of it (its status and its output): a pod probed every few seconds for
    /// weeks keeps a bounded number of records and fds.
    fn reclaim(&mut self, id: &str, exec_id: Option<&str>) {
        let Some(exec_id) = exec_id else { return };
        if let Some(container) = self.containers.get_mut(id)
            && container.execs.get(exec_id).is_some_and(Proc::collected)
        {
            container.execs.remove(exec_id);
        }
    }

    fn proc_mut(&mut self, id: &str, exec_id: Option<&str>) -> Result<&mut Proc, Fault> {
        let container = self.containers.get_mut(id).ok_or_else(|| no_container(id))?;
        match exec_id {
            None => {
                container.init.as_mut().ok_or_else(|| Fault::wrong_state(format!("container {id:?} has not started")))
            }
            Some(exec_id) => container
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| Fault::not_found(format!("container {id:?} has no process {exec_id:?}"))),
        }
    }

    /// Send `signal` to a process.
    pub fn signal(&mut self, id: &str, exec_id: Option<&str>, signal: i32) -> Result<(), Fault> {
        let proc = self.proc_mut(id, exec_id)?;
        if proc.poll_exit()?.is_some() {
            return Err(Fault::wrong_state(format!("the process of container {id:?} has exited")));
        }
        Ok(proc.child.signal(signal).map_err(|err| format!("cannot send signal {signal}: {err}"))?)
    }

    /// Whether a process runs, or how it exited. An exec'd process whose
    /// status and output the host now has is forgotten.
    pub fn wait(&mut self, id: &str, exec_id: Option<&str>) -> Result<Status, Fault> {
        let proc = self.proc_mut(id, exec_id)?;
        let status = match proc.poll_exit()? {
            None => Status { running: true, exit_code: None, signal: None },
            Some(Exit::Code(code)) => Status { running: false, exit_code: Some(code), signal: None },
            Some(Exit::Signal(signal)) => Status { running: false, exit_code: None, signal: Some(signal) },
        };
        if !status.running {
            proc.reported = true;
            self.reclaim(id, exec_id);
        }
        Ok(status)
    }

    /// Read what a process wrote so far (at most [`MAX_READ`] bytes); `true` at end of stream.
    pub fn read(&mut self, id: &str, exec_id: Option<&str>, stream: OutputStream) -> Result<(Vec<u8>, bool), Fault> {
        let proc = self.proc_mut(id, exec_id)?;
        let slot = match stream {
            OutputStream::Stdout => &mut proc.stdout,
            OutputStream::Stderr => &mut proc.stderr,
        };
        let terminal = proc.terminal.is_some();
        let Some(file) = slot else { return Ok((Vec::new(), true)) };
        // Grows with what is there (a poll that finds nothing allocates nothing).
        let mut data = Vec::new();
        let eof = loop {
            let room = MAX_READ.saturating_sub(data.len()) as u64;
            match Read::by_ref(file).take(room).read_to_end(&mut data) {
                // End of the stream, unless the limit stopped the read first.
                Ok(_) => break data.len() < MAX_READ,
                Err(err) if err.kind() == ErrorKind::WouldBlock => break false,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                // A terminal whose every other end closed reads as EIO: the end.
                Err(err) if terminal && err.raw_os_error() == Some(libc::EIO) => break true,
                Err(err) => return Err(format!("cannot read the process's output: {err}").into()),
            }
        };
        if eof {
            *slot = None;
            self.reclaim(id, exec_id);
        }
        Ok((data, eof))
    }

    /// Write to a process's stdin (as much as the pipe takes now); returns the bytes written.
    pub fn write_stdin(&mut self, id: &str, exec_id: Option<&str>, data: &[u8], close: bool) -> Result<usize, Fault> {
        let proc = self.proc_mut(id, exec_id)?;
        let file = proc
            .stdin
            .as_mut()
            .ok_or_else(|| Fault::new(ErrorCode::StdinClosed, format!("stdin of container {id:?} is closed")))?;
        let mut written = 0;
        while written < data.len() {
            match file.write(data.get(written..).unwrap_or_default()) {
                Ok(n) => written += n,
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::BrokenPipe => {
                    return Err(Fault::new(ErrorCode::StdinClosed, format!("the process closed its stdin: {err}")));
                }
                Err(err) => return Err(format!("cannot write to stdin: {err}").into()),
            }
        }
        if close && written == data.len() {
            proc.stdin = None;
        }
        Ok(written)
    }

    /// Set the window size of a process's terminal.
    pub fn resize_terminal(&mut self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<(), Fault> {
        let proc = self.proc_mut(id, exec_id)?;
        let master = proc
            .terminal
            .as_ref()
            .ok_or_else(|| Fault::wrong_state(format!("the process of container {id:?} has no terminal")))?;
        Ok(launch::set_window_size(master.as_fd(), rows, cols)
            .map_err(|err| format!("cannot resize the terminal: {err}"))?)
    }

    /// Remove container `id`, whose processes must all have exited, and its cgroup.
    pub fn delete(&mut self, id: &str) -> Result<(), Fault> {
        if self.running(id) {
            return Err(Fault::wrong_state(format!("container {id:?} still runs")));
        }
        let container = self.containers.get(id).ok_or_else(|| no_container(id))?;
        if container.in_pod == Some(PodPid::Shared) {
            // In the pod's PID namespace the container's processes outlive
            // its init (they are the holder's then): they end with it.
            end_cgroup(&container.cgroup)?;
        }
        if let Err(err) = std::fs::remove_dir(&container.cgroup)
            && err.kind() != ErrorKind::NotFound
        {
            return Err(format!("cannot remove {}: {err}", container.cgroup).into());
        }
        if let Some(dir) = self.containers.get(id).and_then(|c| c.secrets.as_ref())
            && let Err(err) = std::fs::remove_dir_all(dir)
            && err.kind() != ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {dir}: {err}");
        }
        self.containers.remove(id);
        Ok(())
    }
}

/// The agent's ends of a process's pipes, before the process exists (none
/// when the policy gives the host no stdio access).
struct Pipes {
    stdin: Option<File>,
    stdout: Option<File>,
    /// None on a terminal: everything comes through its master.
    stderr: Option<File>,
    terminal: Option<OwnedFd>,
}

impl Pipes {
    fn into_proc(self, child: Child, args: Vec<String>, stdio: bool) -> Proc {
        Proc {
            child,
            args,
            stdio,
            reported: false,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            terminal: self.terminal,
            exit: None,
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| format!("cannot create a pipe: {err}"))
}

fn nonblocking(fd: OwnedFd) -> Result<File, String> {
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|err| format!("cannot set O_NONBLOCK: {err}"))?;
    Ok(File::from(fd))
}

/// The child's stdio and the agent's non-blocking ends: three pipes, or a
/// terminal whose other end is all three; `/dev/null` for all three when
/// the policy gives the host no stdio access.
fn pipes(terminal: bool, stdio: bool) -> Result<(launch::Stdio, Pipes), String> {
    if !stdio {
        let null = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|err| format!("cannot open /dev/null: {err}"))
        };
        let stdio = launch::Stdio { stdin: null()?, stdout: null()?, stderr: null()? };
        return Ok((stdio, Pipes { stdin: None, stdout: None, stderr: None, terminal: None }));
    }
    if terminal {
        let (master, peer) = launch::open_pty().map_err(|err| format!("cannot open a terminal: {err}"))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|err| format!("cannot duplicate the terminal: {err}"));
        let stdio = launch::Stdio { stdin: dup(&peer)?, stdout: dup(&peer)?, stderr: peer };
        let pipes = Pipes {
            stdin: Some(nonblocking(dup(&master)?)?),
            stdout: Some(nonblocking(dup(&master)?)?),
            stderr: None,
            terminal: Some(master),
        };
        return Ok((stdio, pipes));
    }
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let stdio = launch::Stdio { stdin: stdin_r, stdout: stdout_w, stderr: stderr_w };
    let pipes = Pipes {
        stdin: Some(nonblocking(stdin_w)?),
        stdout: Some(nonblocking(stdout_r)?),
        stderr: Some(nonblocking(stderr_r)?),
        terminal: None,
    };
    Ok((stdio, pipes))
}

fn cstring(text: &str) -> Result<CString, String> {
    CString::new(text)
        .map_err(|_| format!("{:?} contains a NUL byte", text.get(..text.floor_char_boundary(64)).unwrap_or_default()))
}

/// The launch's view of a process spec, with the executable resolved in the rootfs.
fn prepare_process(rootfs: &str, spec: &ProcessSpec) -> Result<Process, Fault> {
    let arg0 = spec.args.first().ok_or_else(|| Fault::invalid("the process has no args"))?;
    if !spec.cwd.starts_with('/') {
        return Err(Fault::invalid(format!("working dir {:?} is not absolute", spec.cwd)));
    }
    let exe = resolve(rootfs, arg0, &spec.env)?;
    process_of(spec, &exe).map_err(Fault::invalid)
}

/// The rest of [`prepare_process`]: the checks of a spec's values.
fn process_of(spec: &ProcessSpec, exe: &str) -> Result<Process, String> {
    let caps = &spec.capabilities;
    let mask = |set: &[String], name: &str| {
        launch::capability_mask(set).map_err(|unknown| format!("capabilities.{name}: unknown capability {unknown:?}"))
    };
    let capabilities = Capabilities {
        bounding: mask(&caps.bounding, "bounding")?,
        effective: mask(&caps.effective, "effective")?,
        permitted: mask(&caps.permitted, "permitted")?,
        inheritable: mask(&caps.inheritable, "inheritable")?,
        ambient: mask(&caps.ambient, "ambient")?,
    };
    // A tracer in the container could take an exec'd process between its
    // fork and its execve, while its memory is still a copy of the agent's
    // (and hold it, so the agent could not reap it). Not supported until an
    // exec no longer starts as such a copy.
    let ptrace = launch::capability_mask(&["CAP_SYS_PTRACE"]).unwrap_or(0);
    let all = capabilities.bounding
        | capabilities.effective
        | capabilities.permitted
        | capabilities.inheritable
        | capabilities.ambient;
    if all & ptrace != 0 {
        return Err("CAP_SYS_PTRACE is not supported in a container of the UVM (see docs/threat-model.md)".into());
    }
    let seccomp = match &spec.seccomp {
        None => Vec::new(),
        Some(_) if !spec.no_new_privileges => {
            return Err("a seccomp profile needs no_new_privileges (the filter is installed as the user)".into());
        }
        Some(profile) => crate::seccomp::compile(profile)?,
    };
    let rlimits = spec
        .rlimits
        .iter()
        .map(|limit| {
            let resource = rlimit_resource(&limit.kind).ok_or_else(|| format!("unknown rlimit {:?}", limit.kind))?;
            if limit.soft > limit.hard {
                return Err(format!("rlimit {}: soft {} exceeds hard {}", limit.kind, limit.soft, limit.hard));
            }
            Ok((resource, limit.soft, limit.hard))
        })
        .collect::<Result<Vec<_>, String>>()?;
    for env in &spec.env {
        if !env.contains('=') {
            return Err(format!(
                "env entry {:?} is not NAME=value",
                env.get(..env.floor_char_boundary(64)).unwrap_or_default()
            ));
        }
    }
    Ok(Process {
        exe: cstring(exe)?,
        argv: spec.args.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?,
        env: spec.env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?,
        cwd: cstring(&spec.cwd)?,
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        capabilities,
        no_new_privileges: spec.no_new_privileges,
        last_cap: last_cap(),
        rlimits,
        seccomp,
        controlling_terminal: spec.terminal,
    })
}

fn no_container(id: &str) -> Fault {
    Fault::not_found(format!("container {id:?} does not exist"))
}

/// A failed launch's code: `execve` finding no file is a missing
/// executable, one it cannot run (permissions, format) cannot execute.
pub(crate) fn launch_fault(doing: &str, err: &launch::LaunchError) -> Fault {
    let code = match err {
        launch::LaunchError::Setup { step: launch::Step::Exec, source } => match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => ErrorCode::ExecutableNotFound,
            Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM | libc::ELOOP) => ErrorCode::CannotExecute,
            _ => ErrorCode::Failed,
        },
        _ => ErrorCode::Failed,
    };
    Fault::new(code, format!("{doing}: {err}"))
}

/// `args[0]` as an absolute path inside the container: as given when it has
/// a `/`, else the first `PATH` entry (of the process's env) that has it.
fn resolve(rootfs: &str, arg0: &str, env: &[String]) -> Result<String, Fault> {
    if arg0.contains('/') {
        return Ok(arg0.to_string());
    }
    let path = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let root = nix::fcntl::open(rootfs, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|err| format!("cannot open the container's root {rootfs}: {err}"))?;
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{}/{arg0}", dir.trim_end_matches('/'));
        // Looked up as the container would (its links resolved inside its
        // root, never in the agent's view, which would tell a process of the
        // container whether a path exists elsewhere); the entry's own
        // metadata: a link is followed by execve inside the container.
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        if openat2(&root, candidate.as_str(), how).is_ok() {
            return Ok(candidate);
        }
    }
    Err(Fault::new(
        ErrorCode::ExecutableNotFound,
        format!("executable {arg0:?} not found in PATH {path:?} of the container"),
    ))
}

/// The `RLIMIT_*` number of an OCI rlimit type.
fn rlimit_resource(kind: &str) -> Option<u32> {
    Some(match kind {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

/// The devices a container gets (the OCI defaults), bound from the guest's
/// devtmpfs: the container's `/dev` itself is `nodev`, so a node made there
/// (or brought by a layer) opens nothing.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The container's standard mounts and devices (as runc's defaults), every
/// one `nodev` but the bound device files and devpts; with `shared_pid` its
/// `/proc` is the pod's (a bind keeps the source mount's `nosuid`, `nodev`
/// and `noexec`).
fn root_ops(rootfs: &str, shared_pid: bool) -> Result<Vec<RootOp>, String> {
    let p = |path: &str| cstring(&format!("{rootfs}{path}"));
    let c = cstring;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut ops = vec![
        RootOp::Mkdir { path: p("/proc")?, mode: 0o555 },
        // The launch's setup child is not in the pod's PID namespace: a
        // `proc` it mounted would show the agent's.
        if shared_pid {
            RootOp::Mount {
                source: c(crate::pod::POD_PROC)?,
                target: p("/proc")?,
                fstype: c("")?,
                flags: libc::MS_BIND,
                data: c("")?,
            }
        } else {
            RootOp::Mount {
                source: c("proc")?,
                target: p("/proc")?,
                fstype: c("proc")?,
                flags: nosuid_nodev_noexec,
                data: c("")?,
            }
        },
        RootOp::Mkdir { path: p("/dev")?, mode: 0o755 },
        RootOp::Mount {
            source: c("tmpfs")?,
            target: p("/dev")?,
            fstype: c("tmpfs")?,
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_STRICTATIME,
            data: c("mode=755,size=65536k")?,
        },
    ];
    for name in DEVICES {
        // An empty file to bind onto; the bind keeps devtmpfs's nosuid, noexec.
        ops.push(RootOp::File { path: p(&format!("/dev/{name}"))?, mode: 0o666 });
        ops.push(RootOp::Mount {
            source: c(&format!("/dev/{name}"))?,
            target: p(&format!("/dev/{name}"))?,
            fstype: c("")?,
            flags: libc::MS_BIND,
            data: c("")?,
        });
    }
    ops.extend([
        RootOp::Mkdir { path: p("/dev/pts")?, mode: 0o755 },
        RootOp::Mount {
            source: c("devpts")?,
            target: p("/dev/pts")?,
            fstype: c("devpts")?,
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: c("newinstance,ptmxmode=0666,mode=0620")?,
        },
        RootOp::Symlink { target: c("pts/ptmx")?, path: p("/dev/ptmx")? },
        RootOp::Mkdir { path: p("/dev/shm")?, mode: 0o1777 },
        RootOp::Mount {
            source: c("shm")?,
            target: p("/dev/shm")?,
            fstype: c("tmpfs")?,
            flags: nosuid_nodev_noexec,
            data: c("mode=1777,size=65536k")?,
        },
        RootOp::Symlink { target: c("/proc/self/fd")?, path: p("/dev/fd")? },
        RootOp::Symlink { target: c("/proc/self/fd/0")?, path: p("/dev/stdin")? },
        RootOp::Symlink { target: c("/proc/self/fd/1")?, path: p("/dev/stdout")? },
        RootOp::Symlink { target: c("/proc/self/fd/2")?, path: p("/dev/stderr")? },
        RootOp::Mkdir { path: p("/sys")?, mode: 0o555 },
        RootOp::Mount {
            source: c("sysfs")?,
            target: p("/sys")?,
            fstype: c("sysfs")?,
            flags: nosuid_nodev_noexec | libc::MS_RDONLY,
            data: c("")?,
        },
        RootOp::Mount {
            source: c("cgroup2")?,
            target: p("/sys/fs/cgroup")?,
            fstype: c("cgroup2")?,
            flags: nosuid_nodev_noexec | libc::MS_RDONLY,
            data: c("")?,
        },
    ]);
    Ok(ops)
}

/// The attestation endpoint's socket, bound on the container's own `/dev`
/// tmpfs (made by [`root_ops`] before these), so nothing of the image
/// decides where it lands.
fn endpoint_ops(rootfs: &str, socket: &str) -> Result<Vec<RootOp>, String> {
    let p = |path: &str| cstring(&format!("{rootfs}{path}"));
    Ok(vec![
        RootOp::Mkdir { path: p(crate::endpoint::IN_CONTAINER_DIR)?, mode: 0o755 },
        RootOp::File { path: p(crate::endpoint::IN_CONTAINER)?, mode: 0o666 },
        RootOp::Mount {
            source: cstring(socket)?,
            target: p(crate::endpoint::IN_CONTAINER)?,
            fstype: cstring("")?,
            flags: libc::MS_BIND,
            data: cstring("")?,
        },
    ])
}

/// The secrets directory, bound read-only (and nosuid, nodev, noexec) on the
/// container's own `/dev` tmpfs.
fn secrets_ops(rootfs: &str, dir: &str) -> Result<Vec<RootOp>, String> {
    let p = |path: &str| cstring(&format!("{rootfs}{path}"));
    let target = p(IN_CONTAINER_SECRETS)?;
    Ok(vec![
        RootOp::Mkdir { path: p(crate::endpoint::IN_CONTAINER_DIR)?, mode: 0o755 },
        RootOp::Mkdir { path: target.clone(), mode: 0o755 },
        RootOp::Mount {
            source: cstring(dir)?,
            target: target.clone(),
            fstype: cstring("")?,
            flags: libc::MS_BIND,
            data: cstring("")?,
        },
        read_only_again(target)?,
    ])
}

/// Make the bind mount at `target` read-only, nosuid, nodev and noexec.
fn read_only_again(target: CString) -> Result<RootOp, String> {
    Ok(RootOp::Mount {
        source: cstring("")?,
        target,
        fstype: cstring("")?,
        flags: libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: cstring("")?,
    })
}

/// The image decides what is at `/proc`, `/dev` and `/sys` until the agent
/// mounts there: a symbolic link would lead those mounts (and the masks
/// under them) elsewhere. Only directories, or nothing, will do. (The
/// container has not run yet, so nothing changes them before its start;
/// the checks after the pivot confirm it.)
fn check_mount_points(rootfs: &str) -> Result<(), String> {
    for top in ["proc", "dev", "sys"] {
        match std::fs::symlink_metadata(format!("{rootfs}/{top}")) {
            Ok(meta) if !meta.is_dir() => {
                return Err(format!("the image's /{top} is not a directory (a link or a file): refused"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A masked or read-only path: absolute, under `/proc` or `/sys` (fresh
/// mounts of the container's own, with nothing of the image's in them),
/// normal components only.
fn kernel_path(what: &str, path: &str) -> Result<(), String> {
    let components: Vec<&str> = path.split('/').skip(1).collect();
    let normal = path.starts_with('/')
        && path.len() <= 256
        && !components.iter().any(|c| c.is_empty() || *c == "." || *c == ".." || c.contains('\0'));
    match components.first() {
        Some(&"proc") | Some(&"sys") if normal && components.len() > 1 => Ok(()),
        _ => Err(format!(
            "{what} {:?} is not a normal path under /proc or /sys",
            path.get(..path.floor_char_boundary(64)).unwrap_or_default()
        )),
    }
}

/// What masks and write-protects `/proc` and `/sys` paths (after those are
/// mounted): a masked directory gets an empty read-only tmpfs, a masked
/// file `/dev/null`; a read-only path is bound onto itself read-only. Paths
/// the guest's kernel does not have are skipped (as runc does); whether a
/// path is a directory is the guest's own `/proc` and `/sys`'s answer.
fn path_ops(rootfs: &str, masked: &[String], readonly: &[String]) -> Result<(Vec<RootOp>, Vec<MountCheck>), String> {
    if masked.len() > MAX_PATHS || readonly.len() > MAX_PATHS {
        return Err(format!("at most {MAX_PATHS} masked and {MAX_PATHS} read-only paths"));
    }
    let c = cstring;
    let mut ops = Vec::new();
    let mut checks = Vec::new();
    for path in readonly {
        kernel_path("read-only path", path)?;
        if std::fs::symlink_metadata(path).is_err() {
            continue;
        }
        checks.push(MountCheck { path: c(path)?, fs_type: None, read_only: true });
        let target = c(&format!("{rootfs}{path}"))?;
        ops.push(RootOp::Mount {
            source: target.clone(),
            target: target.clone(),
            fstype: c("")?,
            flags: libc::MS_BIND | libc::MS_REC,
            data: c("")?,
        });
        ops.push(read_only_again(target)?);
    }
    for path in masked {
        kernel_path("masked path", path)?;
        let Ok(meta) = std::fs::symlink_metadata(path) else { continue };
        let target = c(&format!("{rootfs}{path}"))?;
        ops.push(if meta.is_dir() {
            RootOp::Mount {
                source: c("tmpfs")?,
                target,
                fstype: c("tmpfs")?,
                flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data: c("size=0,mode=0555")?,
            }
        } else {
            RootOp::Mount { source: c("/dev/null")?, target, fstype: c("")?, flags: libc::MS_BIND, data: c("")? }
        });
    }
    Ok((ops, checks))
}

/// What the container's `/proc`, `/sys` and `/dev` must be after the pivot:
/// the agent's own mounts, whatever the image held there.
fn standard_checks() -> Result<Vec<MountCheck>, String> {
    [("/proc", libc::PROC_SUPER_MAGIC), ("/sys", libc::SYSFS_MAGIC), ("/dev", libc::TMPFS_MAGIC)]
        .into_iter()
        .map(|(path, magic)| Ok(MountCheck { path: cstring(path)?, fs_type: Some(magic), read_only: false }))
        .collect()
}

/// Write the container's limits into its cgroup.
fn limit(cgroup: &str, resources: &Resources) -> Result<(), String> {
    let write = |file: &str, value: String| {
        std::fs::write(format!("{cgroup}/{file}"), &value).map_err(|err| format!("cannot set {file} to {value}: {err}"))
    };
    if let Some(bytes) = resources.memory_max {
        write("memory.max", bytes.to_string())?;
    }
    if let Some(pids) = resources.pids_max {
        write("pids.max", pids.to_string())?;
    }
    if let Some((quota, period)) = resources.cpu_max {
        write("cpu.max", format!("{quota} {period}"))?;
    }
    Ok(())
}

/// The largest cgroup statistics file read (the kernel's; `memory.stat`
/// is about 1.5 KiB).
const MAX_STAT_FILE: u64 = 64 << 10;

/// A cgroup file's text (empty when the controller is not there).
fn stat_file(cgroup: &str, file: &str) -> Result<String, String> {
    let path = format!("{cgroup}/{file}");
    match File::open(&path) {
        Ok(file) => {
            let mut text = String::new();
            file.take(MAX_STAT_FILE).read_to_string(&mut text).map_err(|err| format!("cannot read {path}: {err}"))?;
            Ok(text)
        }
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(String::new()),
        Err(err) => Err(format!("cannot read {path}: {err}")),
    }
}

/// `KEY VALUE` lines (`cpu.stat`, `memory.stat`, `memory.events`): the value of `key`, 0 when absent.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.split_once(' ').filter(|(name, _)| *name == key).map(|(_, value)| value.trim()))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// A single-value use file (`memory.current`, `pids.current`): a number, 0 when absent.
fn single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// A limit file: a number, or `max`; a limit that is not there (or does
/// not parse) is no limit (`u64::MAX`), never a limit of 0.
fn limit_of(text: &str) -> u64 {
    match text.trim() {
        "max" | "" => u64::MAX,
        value => value.parse().unwrap_or(u64::MAX),
    }
}

/// A container's resource use from its cgroup (v2) files.
fn cgroup_stats(cgroup: &str) -> Result<ContainerStats, String> {
    let cpu = stat_file(cgroup, "cpu.stat")?;
    let memory = stat_file(cgroup, "memory.stat")?;
    let events = stat_file(cgroup, "memory.events")?;
    Ok(ContainerStats {
        cpu_usage_usec: keyed(&cpu, "usage_usec"),
        cpu_user_usec: keyed(&cpu, "user_usec"),
        cpu_system_usec: keyed(&cpu, "system_usec"),
        cpu_nr_periods: keyed(&cpu, "nr_periods"),
        cpu_nr_throttled: keyed(&cpu, "nr_throttled"),
        cpu_throttled_usec: keyed(&cpu, "throttled_usec"),
        memory_usage: single(&stat_file(cgroup, "memory.current")?),
        memory_limit: limit_of(&stat_file(cgroup, "memory.max")?),
        memory_anon: keyed(&memory, "anon"),
        memory_file: keyed(&memory, "file"),
        memory_inactive_file: keyed(&memory, "inactive_file"),
        memory_active_file: keyed(&memory, "active_file"),
        memory_pgfault: keyed(&memory, "pgfault"),
        memory_pgmajfault: keyed(&memory, "pgmajfault"),
        memory_oom_kill: keyed(&events, "oom_kill"),
        pids_current: single(&stat_file(cgroup, "pids.current")?),
        pids_limit: limit_of(&stat_file(cgroup, "pids.max")?),
    })
}

/// Kill every process left in a cgroup and wait (at most 5 s) until it is empty.
fn end_cgroup(cgroup: &str) -> Result<(), String> {
    let kill = format!("{cgroup}/cgroup.kill");
    std::fs::write(&kill, "1").map_err(|err| format!("cannot write {kill}: {err}"))?;
    let events = format!("{cgroup}/cgroup.events");
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&events).map_err(|err| format!("cannot read {events}: {err}"))?;
        if text.lines().any(|line| line == "populated 0") {
            return Ok(());
        }
        if std::time::Instant::now() >= give_up {
            return Err(format!("the processes of {cgroup} did not end after SIGKILL"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The container's cgroup, under the parent that holds all of them to what
/// the guest can give without starving the agent (see [`guest_limits`]): a
/// container without limits of its own cannot take the memory or the tasks
/// the agent needs.
fn make_cgroup(path: &str) -> Result<(), String> {
    std::fs::create_dir(path).map_err(|err| format!("cannot create cgroup {path}: {err}"))
}

/// The parent of every container's cgroup, with the memory, pids and cpu
/// controllers enabled and its guest-wide limits written; done before the
/// first container, and again until it succeeded (no container runs
/// without them).
fn guest_limits() -> Result<(), String> {
    if let Err(err) = std::fs::create_dir(CGROUP_PARENT)
        && err.kind() != ErrorKind::AlreadyExists
    {
        return Err(format!("cannot create {CGROUP_PARENT}: {err}"));
    }
    for dir in ["/sys/fs/cgroup", CGROUP_PARENT] {
        let control = format!("{dir}/cgroup.subtree_control");
        // Controllers the kernel lacks are left out; placement works without them.
        for controller in ["+memory", "+pids", "+cpu"] {
            let _ = std::fs::write(&control, controller);
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let threads = std::fs::read_to_string("/proc/sys/kernel/threads-max").unwrap_or_default();
    let (memory, tasks) = guest_wide_limits(&meminfo, &threads)
        .ok_or_else(|| "cannot read the guest's memory and task limits".to_string())?;
    for (file, value) in [("memory.max", memory), ("pids.max", tasks)] {
        std::fs::write(format!("{CGROUP_PARENT}/{file}"), value.to_string())
            .map_err(|err| format!("cannot set {CGROUP_PARENT}/{file} to {value}: {err}"))?;
    }
    Ok(())
}

/// The containers' `memory.max` and `pids.max` together, from
/// `/proc/meminfo` and `threads-max`: all but [`RESERVED_MEMORY`] (or an
/// eighth) and all but [`RESERVED_TASKS`].
fn guest_wide_limits(meminfo: &str, threads_max: &str) -> Option<(u64, u64)> {
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())?;
    let total = total_kib.checked_mul(1024)?;
    let memory = total.checked_sub(RESERVED_MEMORY.max(total / 8))?;
    let tasks = threads_max.trim().parse::<u64>().ok()?.checked_sub(RESERVED_TASKS)?;
    (memory > 0 && tasks > 0).then_some((memory, tasks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parma_protocol::CapabilitySets;

    #[test]
    fn cgroup_statistics_from_the_kernels_files() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = dir.path().to_str().unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.path().join(file), text).unwrap();
        write(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\nnr_throttled 1\nthrottled_usec 20\n",
        );
        write("memory.current", "4096000\n");
        write("memory.max", "max\n");
        write(
            "memory.stat",
            "anon 1024\nfile 2048\nkernel_stack 16384\ninactive_file 512\nactive_file 1536\npgfault 77\npgmajfault 2\n",
        );
        write("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n");
        write("pids.current", "3\n");
        write("pids.max", "64\n");
        let stats = cgroup_stats(cgroup).unwrap();
        assert_eq!((stats.cpu_usage_usec, stats.cpu_user_usec, stats.cpu_system_usec), (1500, 1000, 500));
        assert_eq!((stats.cpu_nr_periods, stats.cpu_nr_throttled, stats.cpu_throttled_usec), (3, 1, 20));
        assert_eq!((stats.memory_usage, stats.memory_limit), (4_096_000, u64::MAX));
        assert_eq!((stats.memory_anon, stats.memory_file), (1024, 2048));
        assert_eq!((stats.memory_inactive_file, stats.memory_active_file), (512, 1536));
        assert_eq!((stats.memory_pgfault, stats.memory_pgmajfault, stats.memory_oom_kill), (77, 2, 1));
        assert_eq!((stats.pids_current, stats.pids_limit), (3, 64));
        // "file" is not "file_mapped", and a controller that is not there reads as nothing.
        write("memory.stat", "file_mapped 9\n");
        std::fs::remove_file(dir.path().join("pids.max")).unwrap();
        let stats = cgroup_stats(cgroup).unwrap();
        assert_eq!((stats.memory_file, stats.pids_limit), (0, u64::MAX), "no pids.max: no limit, not 0");
    }

    fn spec(args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            groups: vec![],
            capabilities: CapabilitySets { bounding: vec!["CAP_KILL".into()], ..Default::default() },
            no_new_privileges: true,
            rlimits: Vec::new(),
            seccomp: None,
            terminal: false,
        }
    }

    /// A created container's record as `create` leaves it (its root and
    /// cgroup are not there: nothing here starts it).
    fn created_record(containers: &mut Containers, id: &str) {
        let spec = spec(&["/bin/true"]);
        let process = process_of(&spec, "/bin/true").unwrap();
        let new = NewContainer {
            rootfs: CString::new("/nonexistent").unwrap(),
            ops: Vec::new(),
            checks: Vec::new(),
            readonly_rootfs: false,
            hostname: None,
        };
        containers.next_serial += 1;
        let container = Container {
            spec,
            prepared: Some((new, process)),
            init: None,
            execs: BTreeMap::new(),
            cgroup: "/nonexistent".into(),
            stdio: false,
            in_pod: None,
            secrets: None,
            serial: containers.next_serial,
            fetching: 0,
        };
        containers.containers.insert(id.into(), container);
    }

    #[test]
    fn a_secret_goes_only_into_the_container_it_was_fetched_for() {
        let mut containers = Containers::default();
        created_record(&mut containers, "a");
        let ticket = containers.begin_secret("a").unwrap();
        // It does not start while its secret is fetched.
        let err = containers.start("a").unwrap_err();
        assert!(err.code == ErrorCode::WrongState && err.message.contains("secret being fetched"), "{err:?}");
        // Deleted and created again under its id meanwhile: the secret that
        // comes is dropped, and the new container is not marked.
        containers.containers.remove("a");
        created_record(&mut containers, "a");
        let err = containers.end_secret(ticket, Some(("db", b"s3cret"))).unwrap_err();
        assert!(err.code == ErrorCode::WrongState && err.message.contains("deleted while its secret"), "{err:?}");
        let again = containers.containers.get("a").unwrap();
        assert!(again.secrets.is_none() && again.fetching == 0, "{again:?}");
        // Two fetches for one container: marked until both end.
        let (first, second) = (containers.begin_secret("a").unwrap(), containers.begin_secret("a").unwrap());
        containers.end_secret(first, None).unwrap();
        assert!(containers.start("a").is_err());
        containers.end_secret(second, None).unwrap();
        assert_eq!(containers.containers.get("a").unwrap().fetching, 0);
        // Gone for good: the fetch's end says so.
        let ticket = containers.begin_secret("a").unwrap();
        containers.containers.remove("a");
        assert!(containers.end_secret(ticket, None).is_err());
    }

    #[test]
    fn containers_together_leave_room_for_the_agent() {
        let meminfo = "MemTotal:         498340 kB\nMemFree: 1 kB\n";
        let (memory, tasks) = guest_wide_limits(meminfo, "3893\n").unwrap();
        assert_eq!(memory, 498_340 * 1024 - (64 << 20));
        assert_eq!(tasks, 3893 - 256);
        let big = "MemTotal: 16777216 kB\n";
        assert_eq!(guest_wide_limits(big, "100000").unwrap().0, (16u64 << 30) - (2 << 30));
        assert_eq!(guest_wide_limits("MemTotal: 1000 kB\n", "3893"), None, "too small to share");
        assert_eq!(guest_wide_limits("", "3893"), None);
        assert_eq!(guest_wide_limits(meminfo, "100"), None);
    }

    #[test]
    fn an_image_cannot_lead_the_standard_mounts_elsewhere() {
        let root = tempfile::tempdir().unwrap();
        let rootfs = root.path().to_str().unwrap();
        assert!(check_mount_points(rootfs).is_ok(), "absent: the agent makes them");
        std::fs::create_dir_all(root.path().join("dev/fd-target")).unwrap();
        std::fs::create_dir(root.path().join("sys")).unwrap();
        // The layer of the review: proc -> dev/fd/../.. (through the agent's own /dev/fd link).
        std::os::unix::fs::symlink("dev/fd/../..", root.path().join("proc")).unwrap();
        let err = check_mount_points(rootfs).unwrap_err();
        assert!(err.contains("the image's /proc is not a directory"), "{err}");
        std::fs::remove_file(root.path().join("proc")).unwrap();
        std::fs::write(root.path().join("proc"), b"").unwrap();
        assert!(check_mount_points(rootfs).is_err(), "a file");
        std::fs::remove_file(root.path().join("proc")).unwrap();
        std::fs::remove_dir(root.path().join("sys")).unwrap();
        std::os::unix::fs::symlink("/", root.path().join("sys")).unwrap();
        assert!(check_mount_points(rootfs).unwrap_err().contains("/sys"));
    }

    #[test]
    fn masked_and_read_only_paths_stay_in_proc_and_sys() {
        for good in ["/proc/sys", "/proc/acpi", "/sys/firmware", "/sys/devices/virtual/powercap"] {
            assert!(kernel_path("p", good).is_ok(), "{good}");
        }
        for bad in ["/etc/passwd", "/proc", "/sys/", "proc/sys", "/proc/../etc", "/proc//sys", "/proc/./sys", "/"] {
            let err = kernel_path("masked path", bad).unwrap_err();
            assert!(err.contains("is not a normal path under /proc or /sys"), "{bad}: {err}");
        }
        let root = "/run/parma/containers/c/rootfs";
        let (ops, checks) =
            path_ops(root, &["/proc/kcore".into(), "/proc/nonexistent-entry".into()], &["/proc/sys".into()]).unwrap();
        assert_eq!(checks, vec![MountCheck { path: cstring("/proc/sys").unwrap(), fs_type: None, read_only: true }]);
        // /proc/sys: bound onto itself, then remounted read-only (and nodev).
        assert!(matches!(&ops[0], RootOp::Mount { flags, .. } if *flags == libc::MS_BIND | libc::MS_REC));
        assert!(
            matches!(&ops[1], RootOp::Mount { flags, .. } if flags & libc::MS_RDONLY != 0 && flags & libc::MS_NODEV != 0)
        );
        // A path this kernel lacks is skipped; /proc/kcore exists here only
        // with CONFIG_PROC_KCORE, as a file: /dev/null over it.
        let kcore = std::path::Path::new("/proc/kcore").exists();
        assert_eq!(ops.len(), 2 + usize::from(kcore));
        assert!(path_ops(root, &["/etc/shadow".into()], &[]).is_err());
        assert!(path_ops(root, &vec!["/proc/x".to_string(); MAX_PATHS + 1], &[]).is_err());
    }

    #[test]
    fn the_container_dev_is_nodev_and_devices_are_bound() {
        let ops = root_ops("/r", false).unwrap();
        let dev = ops
            .iter()
            .find_map(|op| match op {
                RootOp::Mount { target, flags, .. } if target.as_bytes() == b"/r/dev" => Some(*flags),
                _ => None,
            })
            .unwrap();
        assert!(dev & libc::MS_NODEV != 0);
        // No node is made: each device is an empty file with a bind on it.
        assert!(!ops.iter().any(|op| matches!(op, RootOp::CharDevice { .. })));
        for name in DEVICES {
            let target = format!("/r/dev/{name}");
            assert!(ops.iter().any(|op| matches!(op, RootOp::Mount { source, target: t, flags, .. }
                if t.as_bytes() == target.as_bytes() && *flags == libc::MS_BIND
                    && source.as_bytes() == format!("/dev/{name}").as_bytes())));
        }
        // Every other mount of the container's own is nodev, devpts aside.
        for op in &ops {
            if let RootOp::Mount { fstype, flags, .. } = op
                && !fstype.is_empty()
                && fstype.as_bytes() != b"devpts"
            {
                assert!(flags & libc::MS_NODEV != 0, "{op:?}");
            }
        }
    }

    #[test]
    fn executables_resolve_inside_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::write(root.path().join("usr/bin/tool"), b"").unwrap();
        std::os::unix::fs::symlink("/usr/bin/tool", root.path().join("usr/bin/link")).unwrap();
        let rootfs = root.path().to_str().unwrap();
        let env = vec!["PATH=/bin:/usr/bin".to_string()];
        assert_eq!(resolve(rootfs, "tool", &env).unwrap(), "/usr/bin/tool");
        assert_eq!(resolve(rootfs, "link", &env).unwrap(), "/usr/bin/link");
        assert_eq!(resolve(rootfs, "/x/y", &env).unwrap(), "/x/y");
        // A link in the container's PATH that points out of its root is
        // resolved inside it: it finds nothing of the agent's view.
        std::fs::create_dir_all(root.path().join("usr/local")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret-tool"), b"").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("usr/local/bin")).unwrap();
        let env_local = vec!["PATH=/usr/local/bin".to_string()];
        assert!(resolve(rootfs, "secret-tool", &env_local).is_err(), "resolved through the agent's view");
        let err = resolve(rootfs, "nope", &env).unwrap_err();
        assert_eq!(err.code, ErrorCode::ExecutableNotFound);
        assert!(err.message.contains("not found in PATH"), "{err:?}");
    }

    /// The message of a spec refused as an invalid argument.
    fn invalid(result: Result<Process, Fault>) -> String {
        let fault = result.err().unwrap();
        assert_eq!(fault.code, ErrorCode::InvalidArgument, "{fault:?}");
        fault.message
    }

    #[test]
    fn bad_specs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let rootfs = root.path().to_str().unwrap();
        assert!(invalid(prepare_process(rootfs, &spec(&[]))).contains("no args"));
        let mut bad = spec(&["/bin/x"]);
        bad.cwd = "srv".into();
        assert!(invalid(prepare_process(rootfs, &bad)).contains("not absolute"));
        let mut bad = spec(&["/bin/x"]);
        bad.capabilities.bounding = vec!["CAP_SYS_PTRACE".into()];
        assert!(invalid(prepare_process(rootfs, &bad)).contains("CAP_SYS_PTRACE is not supported"));
        let mut bad = spec(&["/bin/x"]);
        bad.capabilities.effective = vec!["CAP_EVERYTHING".into()];
        assert!(invalid(prepare_process(rootfs, &bad)).contains("unknown capability \"CAP_EVERYTHING\""));
        let mut bad = spec(&["/bin/x"]);
        bad.env.push("NOEQUALS".into());
        assert!(invalid(prepare_process(rootfs, &bad)).contains("is not NAME=value"));
        let mut bad = spec(&["/bin/x\0y"]);
        bad.args.push("z".into());
        assert!(invalid(prepare_process(rootfs, &bad)).contains("NUL"));
        let mut bad = spec(&["/bin/x"]);
        bad.rlimits.push(parma_protocol::Rlimit { kind: "RLIMIT_WISHES".into(), soft: 1, hard: 1 });
        assert!(invalid(prepare_process(rootfs, &bad)).contains("unknown rlimit"));
        let mut bad = spec(&["/bin/x"]);
        bad.rlimits.push(parma_protocol::Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 2, hard: 1 });
        assert!(invalid(prepare_process(rootfs, &bad)).contains("exceeds hard"));
        let mut bad = spec(&["/bin/x"]);
        bad.no_new_privileges = false;
        bad.seccomp = Some("{}".into());
        assert!(invalid(prepare_process(rootfs, &bad)).contains("needs no_new_privileges"));
        let good = prepare_process(rootfs, &spec(&["/bin/x", "a"])).unwrap();
        assert_eq!(good.capabilities.bounding, 1 << 5);
        assert_eq!(good.argv.len(), 2);
    }
}
