//! The escape tests' container program: an attack probe. Run inside a
//! container (as root with the Docker default capabilities less CAP_MKNOD,
//! and as uid 1000 with none), it tries every way we know for a container
//! process to step outside its box, and prints one line per attempt:
//!
//! ```text
//! probe NAME: blocked: DETAIL    the attempt failed (the errno, what refused it)
//! probe NAME: absent: DETAIL     the target is not there (/dev/sev-guest under emulation)
//! probe NAME: ESCAPED: DETAIL    the attempt worked: a hole
//! probe NAME: info: DETAIL       a fact for the log, never a hole
//! probe NAME: allowed: DETAIL    it worked, and may: it stays in the container's own namespaces
//! probe done: N attempts, M escaped
//! ```
//!
//! NAME is stable and made of `[a-z0-9_.:/()-]`; DETAIL is at most 120
//! characters and never more of a file than a short value. Every attempt that
//! could block has a timeout (vsock connects and replies 2 s, the user
//! namespace child 5 s; device nodes open non-blocking), and an attempt that
//! works is undone where it can be: a sysctl is written back with the value
//! it had, a mount is unmounted, a node removed, so an escape changes nothing.
//! The exit status is 0 whatever happened: the VM test in `tests/tests/` reads
//! the lines and asserts that none says ESCAPED and that the names it expects
//! are all there.
//!
//! The attempts, in order: vsock to the agent's port (`vsock_*`); device
//! nodes made by number for each block device, misc, memory, virtio port and
//! serial console device the guest's sysfs lists (`blockdev/*`, `chardev/*`);
//! device nodes shipped in the image's layer (`layer_node/*`); the devices in
//! `/dev` (`dev_listing`); global sysctls and sysrq (`sysctl/*`,
//! `sysrq_trigger`, and `sysctl_netns/*`, which is per network namespace);
//! the masked paths (`masked/*`) and read-only paths (`readonly/*`); mounts
//! and unmounts (`mount/*`, `umount/*`); a user namespace's way to devices
//! (`userns/*`); kernel interfaces (`dmesg`, `kmsg`, `iopl`, `module_load*`,
//! `kexec`, `perf_event`, `bpf`); what the container sees of the guest
//! (`agent_visible`, `run_parma*`, `pids_visible`); its cgroup (`cgroup/*`);
//! and sysfs writes (`sysfs/*`).

// A test probe: it must make the raw system calls nix does not wrap
// (klogctl, iopl, init_module, kexec_load, perf_event_open, bpf, an ioctl)
// and fork. Every unsafe block says why it is sound.
#![allow(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr, connect, getsockopt, recv, send, socket, sockopt,
};
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getgid, getuid, pipe2};

/// Longest DETAIL printed, in characters.
const DETAIL_MAX: usize = 120;
/// Most bytes read from anything.
const PEEK: usize = 4096;
/// How long a vsock connect, or the agent's reply, may take (ms).
const VSOCK_WAIT_MS: u16 = 2000;
/// How long the user namespace child may take.
const CHILD_WAIT: Duration = Duration::from_secs(5);
/// The agent's vsock port.
const AGENT_PORT: u32 = 1024;
/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`: `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::Ioctl = 0x7b9;
/// Where device nodes are made, in order: the first that is there and
/// writable decides.
const NODE_DIRS: [&str; 3] = ["/tmp", "/dev", "/dev/shm"];
/// Where the mount attempts mount: the first that can be made is used.
const MOUNT_DIRS: [&str; 3] = ["/tmp/probe-mnt", "/dev/shm/probe-mnt", "/probe-mnt"];

fn main() {
    let mut report = Report::default();
    vsock(&mut report);
    let disks = devices(&mut report);
    let disk = first_disk(&disks);
    layer_nodes(&mut report);
    dev_listing(&mut report);
    sysctls(&mut report);
    masked(&mut report);
    readonly(&mut report);
    let target = MountTarget::new();
    mounts(&mut report, &target.path);
    userns(&mut report, disk, &target.path);
    drop(target);
    kernel(&mut report);
    processes(&mut report);
    cgroup(&mut report);
    sysfs_writes(&mut report, disk);
    say(&format!("probe done: {} attempts, {} escaped", report.attempts, report.escaped));
}

// ---------------------------------------------------------------------------
// Outcomes and the report
// ---------------------------------------------------------------------------

/// How an attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Blocked,
    Absent,
    Escaped,
    Info,
    Allowed,
}

impl Status {
    const ALL: [Status; 5] = [Status::Blocked, Status::Absent, Status::Escaped, Status::Info, Status::Allowed];

    fn word(self) -> &'static str {
        match self {
            Status::Blocked => "blocked",
            Status::Absent => "absent",
            Status::Escaped => "ESCAPED",
            Status::Info => "info",
            Status::Allowed => "allowed",
        }
    }

    fn from_word(word: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.word() == word)
    }
}

/// An attempt's status and a short detail.
#[derive(Debug, Clone)]
struct Outcome {
    status: Status,
    detail: String,
}

impl Outcome {
    fn new(status: Status, detail: impl Into<String>) -> Self {
        Outcome { status, detail: detail.into() }
    }

    fn prefixed(self, prefix: &str) -> Self {
        Outcome { status: self.status, detail: format!("{prefix}{}", self.detail) }
    }
}

fn blocked(detail: impl Into<String>) -> Outcome {
    Outcome::new(Status::Blocked, detail)
}

fn absent(detail: impl Into<String>) -> Outcome {
    Outcome::new(Status::Absent, detail)
}

fn escaped(detail: impl Into<String>) -> Outcome {
    Outcome::new(Status::Escaped, detail)
}

fn info(detail: impl Into<String>) -> Outcome {
    Outcome::new(Status::Info, detail)
}

fn allowed(detail: impl Into<String>) -> Outcome {
    Outcome::new(Status::Allowed, detail)
}

/// Prints the lines and counts them.
#[derive(Debug, Default)]
struct Report {
    attempts: usize,
    escaped: usize,
}

impl Report {
    fn line(&mut self, name: &str, outcome: Outcome) {
        self.attempts += 1;
        if outcome.status == Status::Escaped {
            self.escaped += 1;
        }
        say(&format!("probe {}: {}: {}", clean_name(name), outcome.status.word(), clean_detail(&outcome.detail)));
    }
}

/// One line on stdout, flushed at once (the user namespace child forks with
/// nothing buffered). A broken stdout has nowhere to be reported.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// A NAME of `[a-z0-9_.:/()-]`: letters lowered, anything else `_`.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:/()-".contains(c) { c } else { '_' }
        })
        .collect()
}

/// A DETAIL on one line, at most [`DETAIL_MAX`] characters.
fn clean_detail(detail: &str) -> String {
    let mut chars: Vec<char> = detail.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if chars.len() > DETAIL_MAX {
        chars.truncate(DETAIL_MAX - 3);
        chars.extend("...".chars());
    }
    chars.into_iter().collect()
}

/// An I/O error as its errno's name (`EPERM`).
fn errno(err: &io::Error) -> String {
    err.raw_os_error().map_or_else(|| err.to_string(), |n| format!("{:?}", Errno::from_raw(n)))
}

/// The last system call's errno.
fn last_errno() -> Errno {
    Errno::last()
}

/// A short value read from a file, on one line.
fn show_value(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let value = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if value.chars().count() > 40 { format!("{}...", value.chars().take(37).collect::<String>()) } else { value }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Opens for reading without blocking (FIFOs, devices) and without taking a
/// controlling terminal.
fn open_ro(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

/// Opens for writing, as [`open_ro`]; nothing is truncated or created.
fn open_wo(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

/// One read of up to [`PEEK`] bytes: the count, or the errno.
fn peek(file: &mut File) -> Result<usize, String> {
    let mut buf = [0u8; PEEK];
    file.read(&mut buf).map_err(|e| errno(&e))
}

/// Up to [`PEEK`] bytes of a file.
fn read_some(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_ro(path)?.take(PEEK as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A directory's entry names, sorted.
fn list_dir(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(path)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// A file's absence is `absent`, any other failure to reach it `blocked`.
fn missing_or_blocked(what: &str, err: &io::Error) -> Outcome {
    if err.kind() == ErrorKind::NotFound {
        absent(format!("{what}: ENOENT"))
    } else {
        blocked(format!("{what}: {}", errno(err)))
    }
}

/// Reads a file and writes the same bytes back: a write that works changes
/// nothing, and is an escape.
fn write_back(path: &str) -> Outcome {
    let path = Path::new(path);
    let value = match fs::read(path) {
        Ok(value) => value,
        Err(e) => return missing_or_blocked("read", &e),
    };
    let shown = show_value(&value);
    let mut file = match open_wo(path) {
        Ok(file) => file,
        Err(e) => return blocked(format!("open for write: {} (value {shown})", errno(&e))),
    };
    match file.write_all(&value) {
        Ok(()) => escaped(format!("wrote back {shown}")),
        Err(e) => blocked(format!("write: {} (value {shown})", errno(&e))),
    }
}

/// Opens a file for writing and writes nothing: the open working is the
/// escape.
fn open_for_write(path: &str) -> Outcome {
    match open_wo(Path::new(path)) {
        Ok(_) => escaped(format!("opened {path} for writing (nothing written)")),
        Err(e) => missing_or_blocked("open for write", &e),
    }
}

/// Whether a path is on a read-only mount, for a detail.
fn mount_note(path: &str) -> &'static str {
    match statvfs(path) {
        Ok(s) if s.flags().contains(FsFlags::ST_RDONLY) => " (read-only mount)",
        Ok(_) => " (read-write mount)",
        Err(_) => "",
    }
}

// ---------------------------------------------------------------------------
// 1. vsock to the agent
// ---------------------------------------------------------------------------

fn vsock(report: &mut Report) {
    for (name, cid) in [("vsock_cid1", 1), ("vsock_cid2", 2), ("vsock_cid3", 3)] {
        report.line(name, vsock_connect(cid));
    }
    let local = match local_cid() {
        Ok(cid) => vsock_connect(cid).prefixed(&format!("local cid {cid}: ")),
        Err(outcome) => outcome,
    };
    report.line("vsock_local", local);
}

/// The guest's own CID, from `/dev/vsock` if the container can open it.
fn local_cid() -> Result<u32, Outcome> {
    let file = open_ro(Path::new("/dev/vsock")).map_err(|e| missing_or_blocked("open /dev/vsock", &e))?;
    let mut cid: u32 = 0;
    // SAFETY: the fd is open for the whole call, and this ioctl writes one
    // u32 through its argument, which points at `cid`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &raw mut cid) };
    if rc < 0 {
        return Err(blocked(format!("ioctl GET_LOCAL_CID: {:?}", last_errno())));
    }
    Ok(cid)
}

/// Connects to the agent's port at `cid`; any connection is an escape.
fn vsock_connect(cid: u32) -> Outcome {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let sock = match socket(AddressFamily::Vsock, SockType::Stream, flags, None) {
        Ok(sock) => sock,
        Err(e) => return blocked(format!("socket: {e:?}")),
    };
    match connect(sock.as_raw_fd(), &VsockAddr::new(cid, AGENT_PORT)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => {
            match wait_for(&sock, PollFlags::POLLOUT) {
                Ok(true) => {}
                Ok(false) => return blocked("connect: no answer in 2 s"),
                Err(e) => return blocked(format!("connect: poll {e:?}")),
            }
            match getsockopt(&sock, sockopt::SocketError) {
                Ok(0) => {}
                Ok(err) => return blocked(format!("connect: {:?}", Errno::from_raw(err))),
                Err(e) => return blocked(format!("connect: SO_ERROR {e:?}")),
            }
        }
        Err(e) => return blocked(format!("connect: {e:?}")),
    }
    let connected = format!("connected to {cid}:{AGENT_PORT}");
    if let Err(e) = send(sock.as_raw_fd(), &agent_request(), MsgFlags::MSG_NOSIGNAL) {
        return escaped(format!("{connected}, send {e:?}"));
    }
    match wait_for(&sock, PollFlags::POLLIN) {
        Ok(true) => {
            let mut buf = [0u8; PEEK];
            match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => escaped(format!("{connected}, closed without a reply")),
                Ok(n) => escaped(format!("agent answered {n} bytes ({connected})")),
                Err(e) => escaped(format!("{connected}, recv {e:?}")),
            }
        }
        Ok(false) => escaped(format!("{connected}, no reply in 2 s")),
        Err(e) => escaped(format!("{connected}, poll {e:?}")),
    }
}

/// Whether `events` came on the socket within [`VSOCK_WAIT_MS`].
fn wait_for(sock: &OwnedFd, events: PollFlags) -> nix::Result<bool> {
    let mut fds = [PollFd::new(sock.as_fd(), events)];
    Ok(poll(&mut fds, PollTimeout::from(VSOCK_WAIT_MS))? > 0)
}

/// A GuestInfo request frame of the agent protocol: the 16-byte header
/// (magic, version 1, kind 1 = request, id 7, body length; little endian),
/// then the JSON body.
fn agent_request() -> Vec<u8> {
    const BODY: &[u8] = br#"{"type":"GuestInfo"}"#;
    let mut frame = Vec::with_capacity(16 + BODY.len());
    frame.extend_from_slice(b"PRMA");
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend_from_slice(&7u32.to_le_bytes());
    frame.extend_from_slice(&u32::try_from(BODY.len()).unwrap_or(u32::MAX).to_le_bytes());
    frame.extend_from_slice(BODY);
    frame
}

// ---------------------------------------------------------------------------
// 2. Device nodes made by number
// ---------------------------------------------------------------------------

/// A device the guest's sysfs lists.
#[derive(Debug, Clone)]
struct SysDev {
    /// The sysfs entry's name (`vda`, `dm-0`).
    name: String,
    /// The name in a probe's NAME: dm devices add their dm name,
    /// `dm-0(parma-scratch-crypt)`.
    label: String,
    major: u32,
    minor: u32,
}

/// What to do with a device node once it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Open it and read [`PEEK`] bytes.
    Read,
    /// Open it only: reading could take bytes meant for someone else, or
    /// touch hardware.
    OpenOnly,
    /// Do not even open it: that would change the guest's state.
    Skip,
}

/// The character device classes probed, and which of their devices.
const CHAR_CLASSES: [&str; 4] = ["misc", "mem", "virtio-ports", "tty"];

/// Character devices that get a line even when the guest lacks them.
const EXPECTED_CHAR: [(&str, &str); 4] = [("misc", "sev-guest"), ("misc", "vsock"), ("mem", "mem"), ("mem", "kmsg")];

/// What to do with a character device the guest lists, or `None` to leave
/// it out (those a container is given on purpose, the virtual terminals).
fn char_use(class: &str, name: &str) -> Option<Use> {
    match class {
        "mem" => match name {
            "null" | "zero" | "full" | "random" | "urandom" => None,
            "port" => Some(Use::OpenOnly),
            _ => Some(Use::Read),
        },
        "misc" if name.starts_with("watchdog") || name == "snapshot" => Some(Use::Skip),
        "misc" => Some(Use::Read),
        "virtio-ports" => Some(Use::OpenOnly),
        "tty" if name == "console" || name.starts_with("ttyS") || name.starts_with("hvc") => Some(Use::OpenOnly),
        _ => None,
    }
}

/// The block devices, then the character devices, by number. Returns the
/// block devices for the user namespace and sysfs attempts.
fn devices(report: &mut Report) -> Vec<SysDev> {
    let disks = match sys_devices("/sys/block") {
        Ok(disks) if disks.is_empty() => {
            report.line("blockdev", blocked("/sys/block lists no devices"));
            disks
        }
        Ok(disks) => disks,
        Err(outcome) => {
            report.line("blockdev", outcome);
            Vec::new()
        }
    };
    for disk in &disks {
        let outcome = make_node(SFlag::S_IFBLK, disk.major, disk.minor, Use::Read);
        report.line(&format!("blockdev/{}", disk.label), outcome);
    }
    for class in CHAR_CLASSES {
        let dir = format!("/sys/class/{class}");
        let listed = sys_devices(&dir);
        let devs = match &listed {
            Ok(devs) => devs.as_slice(),
            Err(outcome) => {
                report.line(&format!("chardev/{class}"), outcome.clone());
                &[]
            }
        };
        for dev in devs {
            if let Some(usage) = char_use(class, &dev.name) {
                let outcome = make_node(SFlag::S_IFCHR, dev.major, dev.minor, usage);
                report.line(&format!("chardev/{}", dev.label), outcome);
            }
        }
        for (_, name) in EXPECTED_CHAR.iter().filter(|(c, _)| *c == class) {
            if !devs.iter().any(|d| d.name == *name) {
                let outcome = match &listed {
                    Ok(_) => absent(format!("not in {dir}")),
                    Err(outcome) => outcome.clone(),
                };
                report.line(&format!("chardev/{name}"), outcome);
            }
        }
    }
    disks
}

/// The devices of a sysfs directory: each entry with a `dev` file, by name.
fn sys_devices(dir: &str) -> Result<Vec<SysDev>, Outcome> {
    let names = list_dir(Path::new(dir)).map_err(|e| missing_or_blocked(&format!("list {dir}"), &e))?;
    let mut devs = Vec::new();
    for name in names {
        let entry = Path::new(dir).join(&name);
        let Some((major, minor)) = fs::read_to_string(entry.join("dev")).ok().as_deref().and_then(parse_dev) else {
            continue;
        };
        let label = match fs::read_to_string(entry.join("dm/name")) {
            Ok(dm) if name.starts_with("dm-") => format!("{name}({})", dm.trim()),
            _ => name.clone(),
        };
        devs.push(SysDev { name, label, major, minor });
    }
    Ok(devs)
}

/// `MAJ:MIN` as a sysfs `dev` file has it.
fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The disk the user namespace and sysfs attempts use: a virtio, SCSI or
/// NVMe disk if there is one, else any but a loop or RAM disk, else any.
fn first_disk(disks: &[SysDev]) -> Option<&SysDev> {
    let real = |d: &&SysDev| ["vd", "sd", "nvme", "xvd"].iter().any(|p| d.name.starts_with(p));
    let not_virtual = |d: &&SysDev| !["loop", "ram", "zram"].iter().any(|p| d.name.starts_with(p));
    disks.iter().find(real).or_else(|| disks.iter().find(not_virtual)).or_else(|| disks.first())
}

/// Makes a device node with these numbers and uses it as `usage` says.
fn make_node(kind: SFlag, major: u32, minor: u32, usage: Use) -> Outcome {
    let numbers = format!("{major}:{minor}");
    let mut tried = Vec::new();
    for dir in NODE_DIRS {
        let path = PathBuf::from(dir).join(format!("parma-probe-node-{}", std::process::id()));
        let _ = fs::remove_file(&path);
        match mknod(&path, kind, Mode::from_bits_truncate(0o600), libc::makedev(major, minor)) {
            Ok(()) => {
                let outcome = use_node(&path, usage).prefixed(&format!("{numbers}: mknod in {dir} worked; "));
                let _ = fs::remove_file(&path);
                return outcome;
            }
            Err(e @ (Errno::EROFS | Errno::ENOENT)) => tried.push(format!("{e:?} in {dir}")),
            Err(e) => return blocked(format!("{numbers}: mknod {e:?} in {dir}")),
        }
    }
    blocked(format!("{numbers}: mknod {}", tried.join(", ")))
}

/// Opens (and reads) a device node: an open that works is an escape.
fn use_node(path: &Path, usage: Use) -> Outcome {
    if usage == Use::Skip {
        return info("open skipped: it would change the guest's state");
    }
    let mut file = match open_ro(path) {
        Ok(file) => file,
        Err(e) => return blocked(format!("open {}", errno(&e))),
    };
    if usage == Use::OpenOnly {
        return escaped("opened (not read)");
    }
    match peek(&mut file) {
        Ok(n) => escaped(format!("opened, read {n} bytes")),
        Err(e) => escaped(format!("opened, read {e}")),
    }
}

// ---------------------------------------------------------------------------
// 3. Device nodes shipped in the image
// ---------------------------------------------------------------------------

/// Device nodes the test image ships in its layer.
const LAYER_NODES: [&str; 5] = [
    "/layer-dev/blk-254-0",
    "/layer-dev/blk-253-0",
    "/layer-dev/blk-252-0",
    "/layer-dev/chr-1-1",
    "/layer-dev/chr-10-0",
];

fn layer_nodes(report: &mut Report) {
    for path in LAYER_NODES {
        let file_name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        report.line(&format!("layer_node/{file_name}"), layer_node(Path::new(path)));
    }
}

fn layer_node(path: &Path) -> Outcome {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return missing_or_blocked("stat", &e),
    };
    let kind = meta.file_type();
    let what = if kind.is_block_device() {
        "block"
    } else if kind.is_char_device() {
        "char"
    } else {
        return blocked(format!("not a device node: {}", type_name(&kind)));
    };
    let numbers = format!("{what} {}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let mut file = match open_ro(path) {
        Ok(file) => file,
        Err(e) => return blocked(format!("{numbers}: open {}", errno(&e))),
    };
    match peek(&mut file) {
        Ok(n) => escaped(format!("{numbers}: opened, read {n} bytes")),
        Err(e) => escaped(format!("{numbers}: opened, read {e}")),
    }
}

fn type_name(kind: &fs::FileType) -> &'static str {
    if kind.is_file() {
        "regular file"
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_symlink() {
        "symlink"
    } else if kind.is_fifo() {
        "fifo"
    } else if kind.is_socket() {
        "socket"
    } else {
        "other"
    }
}

// ---------------------------------------------------------------------------
// 4. The devices in /dev
// ---------------------------------------------------------------------------

/// The character devices an OCI runtime gives every container: name and
/// numbers.
const OCI_DEVICES: [(&str, u32, u32); 7] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
    ("ptmx", 5, 2),
];

/// Majors of Unix98 pseudo-terminal slaves (`/dev/console` may be a bind
/// of one).
const PTS_MAJORS: std::ops::RangeInclusive<u32> = 136..=143;

fn dev_listing(report: &mut Report) {
    let names = match list_dir(Path::new("/dev")) {
        Ok(names) => names,
        Err(e) => return report.line("dev_listing", missing_or_blocked("list /dev", &e)),
    };
    let mut seen = Vec::new();
    let mut bad = 0;
    for name in names {
        if name == "pts" || name == "shm" {
            seen.push(format!("{name}/"));
            continue;
        }
        let path = PathBuf::from("/dev").join(&name);
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            seen.push(format!("{name}/"));
            for sub in list_dir(&path).unwrap_or_default() {
                let rel = format!("{name}/{sub}");
                if let Ok(meta) = fs::symlink_metadata(path.join(&sub)) {
                    bad += usize::from(check_dev(report, &rel, &meta, false));
                }
            }
        } else {
            seen.push(if meta.is_symlink() { format!("{name}@") } else { name.clone() });
            bad += usize::from(check_dev(report, &name, &meta, true));
        }
    }
    let outcome = if bad == 0 {
        blocked(format!("only the OCI default devices: {}", seen.join(" ")))
    } else {
        escaped(format!("{bad} device nodes beyond the OCI defaults"))
    };
    report.line("dev_listing", outcome);
}

/// Reports `/dev/REL` if it is a device a container must not have; says
/// whether it did.
fn check_dev(report: &mut Report, rel: &str, meta: &fs::Metadata, top: bool) -> bool {
    let kind = meta.file_type();
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let what = if kind.is_block_device() {
        "block"
    } else if kind.is_char_device() {
        let oci = top && OCI_DEVICES.contains(&(rel, major, minor));
        let console = top && rel == "console" && PTS_MAJORS.contains(&major);
        if oci || console {
            return false;
        }
        "char"
    } else {
        return false;
    };
    report.line(&format!("dev_listing/{rel}"), escaped(format!("/dev/{rel} is a {what} device ({major}:{minor})")));
    true
}

// ---------------------------------------------------------------------------
// 5. Global kernel knobs
// ---------------------------------------------------------------------------

/// Global sysctls, under `/proc/sys`: each is read and written back.
const SYSCTLS: [&str; 7] = [
    "kernel/randomize_va_space",
    "kernel/core_pattern",
    "vm/panic_on_oom",
    "fs/protected_symlinks",
    "kernel/printk",
    "vm/overcommit_memory",
    "kernel/modprobe",
];

fn sysctls(report: &mut Report) {
    for sysctl in SYSCTLS {
        report.line(&format!("sysctl/{}", sysctl.replace('/', ".")), write_back(&format!("/proc/sys/{sysctl}")));
    }
    let sysrq = match open_wo(Path::new("/proc/sysrq-trigger")) {
        Ok(_) => escaped("opened for writing (nothing written)"),
        Err(e) => missing_or_blocked("open for write", &e),
    };
    report.line("sysrq_trigger", sysrq);
    // Per network namespace: the container may change its own.
    let somaxconn = write_back("/proc/sys/net/core/somaxconn");
    let somaxconn = match somaxconn.status {
        Status::Escaped => allowed(format!("per network namespace: {}", somaxconn.detail)),
        _ => somaxconn,
    };
    report.line("sysctl_netns/net.core.somaxconn", somaxconn);
}

// ---------------------------------------------------------------------------
// 6. Masked paths
// ---------------------------------------------------------------------------

/// What a masked path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Masked {
    File,
    Dir,
    /// A directory whose entries are counted all the way down.
    Tree,
}

/// Paths a container must find empty or missing.
const MASKED: [(&str, Masked); 14] = [
    ("/proc/kcore", Masked::File),
    ("/proc/keys", Masked::File),
    ("/proc/timer_list", Masked::File),
    ("/proc/sched_debug", Masked::File),
    ("/proc/latency_stats", Masked::File),
    ("/proc/timer_stats", Masked::File),
    ("/proc/acpi", Masked::Dir),
    ("/proc/scsi", Masked::Dir),
    ("/proc/asound", Masked::Dir),
    ("/sys/firmware", Masked::Tree),
    ("/sys/devices/virtual/powercap", Masked::Dir),
    ("/sys/kernel/config", Masked::Dir),
    ("/sys/kernel/security", Masked::Dir),
    ("/sys/kernel/debug", Masked::Dir),
];

fn masked(report: &mut Report) {
    for (path, kind) in MASKED {
        let outcome = match kind {
            Masked::File => masked_file(Path::new(path)),
            Masked::Dir | Masked::Tree => masked_dir(Path::new(path), kind == Masked::Tree),
        };
        report.line(&format!("masked{path}"), outcome);
    }
}

fn masked_file(path: &Path) -> Outcome {
    match read_some(path) {
        Ok(bytes) if bytes.is_empty() => blocked("empty"),
        Ok(bytes) => escaped(format!("read {} bytes", bytes.len())),
        Err(e) => missing_or_blocked("read", &e),
    }
}

fn masked_dir(path: &Path, tree: bool) -> Outcome {
    let names = match list_dir(path) {
        Ok(names) => names,
        Err(e) => return missing_or_blocked("list", &e),
    };
    if names.is_empty() {
        return blocked("empty");
    }
    let count = if tree { count_tree(path, 8, &mut 10_000) } else { names.len() };
    let first: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    escaped(format!("{count} entries: {}", first.join(" ")))
}

/// Entries under `dir`, down to `depth` levels, at most `budget` of them;
/// symlinks are not followed.
fn count_tree(dir: &Path, depth: usize, budget: &mut usize) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut count = 0;
    for entry in entries.flatten() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        count += 1;
        if depth > 0 && entry.file_type().is_ok_and(|t| t.is_dir()) {
            count += count_tree(&entry.path(), depth - 1, budget);
        }
    }
    count
}

// ---------------------------------------------------------------------------
// 7. Read-only paths
// ---------------------------------------------------------------------------

fn readonly(report: &mut Report) {
    report.line("readonly/proc/bus", create_in("/proc/bus"));
    report.line("readonly/proc/bus/pci", pci_config());
    report.line("readonly/proc/fs", create_in("/proc/fs"));
    report.line("readonly/proc/irq/default_smp_affinity", write_back("/proc/irq/default_smp_affinity"));
}

/// Creates a file in a directory: that working is an escape.
fn create_in(dir: &str) -> Outcome {
    if let Err(e) = fs::metadata(dir) {
        return missing_or_blocked("stat", &e);
    }
    let path = Path::new(dir).join("parma-probe");
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {
            let _ = fs::remove_file(&path);
            escaped(format!("created {} (removed)", path.display()))
        }
        Err(e) => blocked(format!("create: {}{}", errno(&e), mount_note(dir))),
    }
}

/// Opens a PCI device's config space (`/proc/bus/pci/BUS/DEV.FN`) for
/// writing: root could rewrite the device's registers through it.
fn pci_config() -> Outcome {
    let buses = match list_dir(Path::new("/proc/bus/pci")) {
        Ok(buses) => buses,
        Err(e) => return missing_or_blocked("list /proc/bus/pci", &e),
    };
    let device = buses.iter().map(|bus| Path::new("/proc/bus/pci").join(bus)).filter(|p| p.is_dir()).find_map(|bus| {
        let first = list_dir(&bus).ok()?.into_iter().next()?;
        Some(bus.join(first))
    });
    let Some(device) = device else { return absent("no PCI device under /proc/bus/pci") };
    let shown = device.display().to_string();
    match open_wo(&device) {
        Ok(_) => escaped(format!("opened {shown} for writing (nothing written)")),
        Err(e) => blocked(format!("open {shown} for write: {}{}", errno(&e), mount_note(&shown))),
    }
}

// ---------------------------------------------------------------------------
// 8. Mounts
// ---------------------------------------------------------------------------

/// The directory the mount attempts mount on; removed on drop if made here.
#[derive(Debug)]
struct MountTarget {
    path: PathBuf,
    made: bool,
}

impl MountTarget {
    fn new() -> Self {
        for dir in MOUNT_DIRS {
            match fs::create_dir(dir) {
                Ok(()) => return MountTarget { path: dir.into(), made: true },
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return MountTarget { path: dir.into(), made: false },
                Err(_) => {}
            }
        }
        let existing = ["/mnt", "/tmp", "/dev/shm"].into_iter().find(|d| Path::new(d).is_dir()).unwrap_or("/");
        MountTarget { path: existing.into(), made: false }
    }
}

impl Drop for MountTarget {
    fn drop(&mut self) {
        if self.made {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// Filesystems mounted fresh: (source, type).
const MOUNTS: [(&str, &str); 5] =
    [("tmpfs", "tmpfs"), ("proc", "proc"), ("devtmpfs", "devtmpfs"), ("sysfs", "sysfs"), ("configfs", "configfs")];

fn mounts(report: &mut Report, target: &Path) {
    for (source, fstype) in MOUNTS {
        report.line(&format!("mount/{fstype}"), mount_fresh(source, fstype, target));
    }
    report.line("mount/remount_root", remount_root());
    report.line("umount/proc/sys", unmount("/proc/sys", restore_proc_sys));
    report.line("umount/sys/firmware", unmount("/sys/firmware", restore_sys_firmware));
}

/// Mounts a fresh filesystem on `target`, and unmounts it if that worked.
fn mount_fresh(source: &str, fstype: &str, target: &Path) -> Outcome {
    match mount(Some(source), target, Some(fstype), MsFlags::empty(), None::<&str>) {
        Ok(()) => {
            let undone = if umount2(target, MntFlags::MNT_DETACH).is_ok() { "unmounted" } else { "still mounted" };
            escaped(format!("mounted {fstype} on {} ({undone})", target.display()))
        }
        Err(e) => blocked(format!("{e:?}")),
    }
}

/// Remounts `/` read-write, and back read-only if it was.
fn remount_root() -> Outcome {
    let was_ro = statvfs("/").is_ok_and(|s| s.flags().contains(FsFlags::ST_RDONLY));
    match mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT, None::<&str>) {
        Ok(()) => {
            if was_ro {
                let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
            }
            escaped(format!("remounted / read-write (it was {})", if was_ro { "read-only" } else { "read-write" }))
        }
        Err(e) => blocked(format!("{e:?}")),
    }
}

/// Detaches a mount that hides or guards something, and puts a stand-in
/// back if that worked.
fn unmount(path: &str, restore: fn() -> bool) -> Outcome {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) => escaped(format!("detached {path} ({})", if restore() { "put back" } else { "not put back" })),
        Err(e) => blocked(format!("{e:?}")),
    }
}

/// `/proc/sys` again as a read-only bind of itself.
fn restore_proc_sys() -> bool {
    let none = None::<&str>;
    mount(Some("/proc/sys"), "/proc/sys", none, MsFlags::MS_BIND | MsFlags::MS_REC, none).is_ok()
        && mount(none, "/proc/sys", none, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, none).is_ok()
}

/// `/sys/firmware` masked again by an empty read-only tmpfs.
fn restore_sys_firmware() -> bool {
    mount(Some("tmpfs"), "/sys/firmware", Some("tmpfs"), MsFlags::MS_RDONLY, None::<&str>).is_ok()
}

// ---------------------------------------------------------------------------
// 9. The user namespace route
// ---------------------------------------------------------------------------

/// A child in a new user and mount namespace mounts a tmpfs, makes a node
/// for the disk in it and reads it, and tries devtmpfs; it reports on a pipe.
fn userns(report: &mut Report, disk: Option<&SysDev>, target: &Path) {
    // Without /sys/block, the number the guest's first virtio disk usually has.
    let (major, minor) = disk.map_or((254, 0), |d| (d.major, d.minor));
    let (blockdev, devtmpfs) = match userns_child(major, minor, target) {
        Ok(outcomes) => outcomes,
        Err(outcome) => (outcome.clone(), outcome),
    };
    report.line("userns/blockdev", blockdev);
    report.line("userns/devtmpfs", devtmpfs);
}

/// Forks the child and reads its two outcomes.
fn userns_child(major: u32, minor: u32, target: &Path) -> Result<(Outcome, Outcome), Outcome> {
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(|e| blocked(format!("pipe: {e:?}")))?;
    // SAFETY: the probe never starts a thread, so the child is a copy of a
    // single-threaded process and may run any code.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read_end);
            let (blockdev, devtmpfs) = userns_attempts(major, minor, target);
            let text = format!(
                "blockdev\t{}\t{}\ndevtmpfs\t{}\t{}\n",
                blockdev.status.word(),
                clean_detail(&blockdev.detail),
                devtmpfs.status.word(),
                clean_detail(&devtmpfs.detail)
            );
            let _ = File::from(write_end).write_all(text.as_bytes());
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(blocked(format!("fork: {e:?}"))),
    };
    drop(write_end);
    let text = read_child(read_end);
    let how = reap(child);
    let find = |key: &str| {
        text.lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, '\t');
                let (k, status, detail) = (parts.next()?, parts.next()?, parts.next()?);
                (k == key).then_some(Outcome::new(Status::from_word(status)?, detail))
            })
            .next()
            .unwrap_or_else(|| blocked(format!("no report from the child ({how})")))
    };
    Ok((find("blockdev"), find("devtmpfs")))
}

/// What the child writes before it exits or [`CHILD_WAIT`] runs out.
fn read_child(fd: OwnedFd) -> String {
    let deadline = Instant::now() + CHILD_WAIT;
    let mut file = File::from(fd);
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    while text.len() < PEEK {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => break,
            Ok(_) => match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(buf.get(..n).unwrap_or_default()),
            },
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Waits a second for the child, then kills it; how it ended.
fn reap(child: Pid) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(WaitStatus::StillAlive) => {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return "child killed after the timeout".into();
            }
            Ok(WaitStatus::Exited(_, code)) => return format!("child exited {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => return format!("child killed by {signal:?}"),
            Ok(other) => return format!("child {other:?}"),
            Err(Errno::EINTR) => {}
            Err(e) => return format!("waitpid {e:?}"),
        }
    }
}

/// In the child: the user namespace, then the disk's node on a fresh
/// tmpfs, then devtmpfs.
fn userns_attempts(major: u32, minor: u32, target: &Path) -> (Outcome, Outcome) {
    let (uid, gid) = (getuid(), getgid());
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        let outcome = blocked(format!("unshare {e:?}"));
        return (outcome.clone(), outcome);
    }
    let mut notes = Vec::new();
    for (file, text) in
        [("setgroups", "deny".to_owned()), ("uid_map", format!("0 {uid} 1")), ("gid_map", format!("0 {gid} 1"))]
    {
        let written = OpenOptions::new()
            .write(true)
            .open(Path::new("/proc/self").join(file))
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            notes.push(format!("{file} {}", errno(&e)));
        }
    }
    let mapped = if notes.is_empty() { "userns".to_owned() } else { format!("userns ({})", notes.join(", ")) };
    // Nothing mounted here may reach the container's mount namespace.
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>);
    if let Err(e) = mount(Some("tmpfs"), target, Some("tmpfs"), MsFlags::empty(), None::<&str>) {
        return (blocked(format!("{mapped}; mount tmpfs {e:?}")), devtmpfs_attempt(target));
    }
    let node = target.join("disk");
    let blockdev = match mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), libc::makedev(major, minor)) {
        Err(e) => blocked(format!("{mapped}, tmpfs; mknod {major}:{minor} {e:?}")),
        Ok(()) => match open_ro(&node) {
            Err(e) => blocked(format!("{mapped}, tmpfs, mknod {major}:{minor}; open {}", errno(&e))),
            Ok(mut file) => match peek(&mut file) {
                Ok(n) => escaped(format!("read {n} bytes of {major}:{minor}")),
                Err(e) => escaped(format!("opened {major}:{minor}, read {e}")),
            },
        },
    };
    (blockdev, devtmpfs_attempt(target))
}

fn devtmpfs_attempt(target: &Path) -> Outcome {
    match mount(Some("devtmpfs"), target, Some("devtmpfs"), MsFlags::empty(), None::<&str>) {
        Ok(()) => {
            let count = list_dir(target).map(|names| names.len()).unwrap_or(0);
            let _ = umount2(target, MntFlags::MNT_DETACH);
            escaped(format!("mounted devtmpfs: {count} entries"))
        }
        Err(e) => blocked(format!("mount devtmpfs {e:?}")),
    }
}

// ---------------------------------------------------------------------------
// 10. Kernel interfaces
// ---------------------------------------------------------------------------

/// `SYSLOG_ACTION_READ_ALL`.
const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
/// `PERF_TYPE_SOFTWARE`, `PERF_COUNT_SW_CPU_CLOCK`, `PERF_ATTR_SIZE_VER0`.
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `disabled | exclude_kernel | exclude_hv` in `perf_event_attr`'s flags.
const PERF_FLAGS: u64 = 1 | (1 << 5) | (1 << 6);
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `BPF_PROG_LOAD`, `BPF_PROG_TYPE_SOCKET_FILTER`.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `r0 = 0; exit`.
static BPF_INSNS: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
/// A `kexec_load` architecture no kernel is: past the permission check the
/// call fails with EINVAL, before it touches anything.
const KEXEC_BAD_ARCH: libc::c_ulong = 0xffff_0000;

fn kernel(report: &mut Report) {
    report.line("dmesg", dmesg());
    let kmsg = match open_ro(Path::new("/dev/kmsg")) {
        Ok(mut file) => match peek(&mut file) {
            Ok(n) => escaped(format!("opened, read {n} bytes")),
            Err(e) => escaped(format!("opened, read {e}")),
        },
        Err(e) => missing_or_blocked("open /dev/kmsg", &e),
    };
    report.line("kmsg", kmsg);
    report.line("iopl", iopl());
    report.line("module_load", module_load());
    report.line("module_load_fd", module_load_fd());
    report.line("kexec", kexec());
    report.line("perf_event", perf_event());
    report.line("bpf", bpf());
}

/// A system call's result: `Ok` with its value, or its errno.
fn syscall_result(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc < 0 { Err(last_errno()) } else { Ok(rc) }
}

/// The errnos that mean a permission check (or a missing feature) refused
/// the call; any other means it got past the check.
fn refused(e: Errno) -> bool {
    matches!(e, Errno::EPERM | Errno::EACCES | Errno::ENOSYS)
}

/// An errno past which the call failed: refused, or past the check.
fn checked(call: &str, e: Errno) -> Outcome {
    if refused(e) { blocked(format!("{e:?}")) } else { escaped(format!("{call} got past the permission check: {e:?}")) }
}

fn dmesg() -> Outcome {
    let mut buf = [0u8; PEEK];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(0);
    // SAFETY: klogctl writes at most `len` bytes to the buffer, which is
    // that long and lives through the call.
    let rc = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), len) };
    match syscall_result(rc.into()) {
        Ok(n) => escaped(format!("read {n} bytes of the kernel log")),
        Err(e) => blocked(format!("{e:?}")),
    }
}

#[cfg(target_arch = "x86_64")]
fn iopl() -> Outcome {
    // SAFETY: iopl only changes this thread's I/O privilege level; it takes
    // no pointers.
    match syscall_result(unsafe { libc::syscall(libc::SYS_iopl, 3) }) {
        Ok(_) => {
            // SAFETY: as above, back to level 0.
            let _ = unsafe { libc::syscall(libc::SYS_iopl, 0) };
            escaped("iopl(3) worked (set back to 0)")
        }
        Err(e) => blocked(format!("{e:?}")),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn iopl() -> Outcome {
    absent("iopl is x86 only")
}

fn module_load() -> Outcome {
    let image = [0u8; 64];
    // SAFETY: init_module reads `len` bytes of the image, which is that long,
    // and the parameters, a NUL-terminated string; both live through the call.
    let rc = unsafe { libc::syscall(libc::SYS_init_module, image.as_ptr(), image.len(), c"".as_ptr()) };
    match syscall_result(rc) {
        Ok(_) => escaped("init_module loaded 64 zero bytes"),
        Err(e) => checked("init_module", e),
    }
}

fn module_load_fd() -> Outcome {
    // SAFETY: finit_module with fd -1 reads nothing but the parameters, a
    // NUL-terminated string that lives through the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) };
    match syscall_result(rc) {
        Ok(_) => escaped("finit_module(-1) worked"),
        Err(e) => checked("finit_module", e),
    }
}

fn kexec() -> Outcome {
    // SAFETY: no segments and a null segment pointer: the kernel reads no
    // memory of ours, and refuses the bad architecture before loading.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            std::ptr::null::<u8>(),
            KEXEC_BAD_ARCH,
        )
    };
    match syscall_result(rc) {
        Ok(_) => escaped("kexec_load worked"),
        Err(e) => checked("kexec_load", e),
    }
}

/// A self-profiling software counter is open to any process when
/// `perf_event_paranoid` allows it: informational, not an escape.
fn perf_event() -> Outcome {
    let mut attr = Vec::with_capacity(64);
    attr.extend_from_slice(&PERF_TYPE_SOFTWARE.to_le_bytes());
    attr.extend_from_slice(&PERF_ATTR_SIZE_VER0.to_le_bytes());
    attr.extend_from_slice(&PERF_COUNT_SW_CPU_CLOCK.to_le_bytes());
    attr.extend_from_slice(&0u64.to_le_bytes()); // sample_period
    attr.extend_from_slice(&0u64.to_le_bytes()); // sample_type
    attr.extend_from_slice(&0u64.to_le_bytes()); // read_format
    attr.extend_from_slice(&PERF_FLAGS.to_le_bytes());
    attr.extend_from_slice(&0u32.to_le_bytes()); // wakeup_events
    attr.extend_from_slice(&0u32.to_le_bytes()); // bp_type
    attr.extend_from_slice(&0u64.to_le_bytes()); // config1
    // SAFETY: the kernel reads the attribute's declared size (64 bytes) from
    // the buffer, which is that long; pid 0, cpu -1 and group -1 name no
    // memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            0 as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    match syscall_result(rc) {
        Ok(fd) => {
            close_fd(fd);
            allowed("a self-profiling software counter (perf_event_paranoid allows it)")
        }
        Err(e) => blocked(format!("{e:?}")),
    }
}

fn bpf() -> Outcome {
    let license = c"GPL";
    let mut attr = Vec::with_capacity(48);
    attr.extend_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_le_bytes());
    attr.extend_from_slice(&2u32.to_le_bytes()); // insn_cnt
    attr.extend_from_slice(&(BPF_INSNS.as_ptr() as u64).to_le_bytes());
    attr.extend_from_slice(&(license.as_ptr() as u64).to_le_bytes());
    attr.extend_from_slice(&[0u8; 24]); // log_level, log_size, log_buf, kern_version, prog_flags
    let size = libc::c_uint::try_from(attr.len()).unwrap_or(0);
    // SAFETY: the kernel reads `size` bytes of the attribute, which is that
    // long, and through it the two instructions and the NUL-terminated
    // license, all of which live through the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), size) };
    match syscall_result(rc) {
        Ok(fd) => {
            close_fd(fd);
            escaped("loaded a socket filter: the BPF verifier is reachable")
        }
        Err(e) => blocked(format!("{e:?}")),
    }
}

/// Closes a descriptor a raw system call returned.
fn close_fd(fd: libc::c_long) {
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: the system call just returned this descriptor and nothing
        // else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

// ---------------------------------------------------------------------------
// 11. What the container sees of the guest
// ---------------------------------------------------------------------------

/// Words in a process's name or command line that mean the guest's own
/// programs are visible.
const GUEST_PROGRAMS: [&str; 2] = ["parma-agent", "parma-init"];

fn processes(report: &mut Report) {
    let me = std::process::id().to_string();
    let pids: Vec<String> = list_dir(Path::new("/proc"))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    let mut seen = Vec::new();
    let mut guest = None;
    for pid in &pids {
        let dir = Path::new("/proc").join(pid);
        let comm = fs::read_to_string(dir.join("comm")).map(|c| c.trim().to_owned()).unwrap_or_default();
        let cmdline =
            read_some(&dir.join("cmdline")).map(|c| String::from_utf8_lossy(&c).replace('\0', " ")).unwrap_or_default();
        seen.push(format!("{pid}:{comm}"));
        if *pid != me && guest.is_none() && GUEST_PROGRAMS.iter().any(|p| comm.contains(p) || cmdline.contains(p)) {
            guest = Some(format!("pid {pid} is {comm}: {}", cmdline.trim()));
        }
    }
    let agent = match guest {
        Some(found) => escaped(found),
        None => blocked(format!("{} pids, none of {}", pids.len(), GUEST_PROGRAMS.join(" or "))),
    };
    report.line("agent_visible", agent);
    let run_parma = match fs::symlink_metadata("/proc/1/root/run/parma") {
        Ok(_) => escaped("/proc/1/root/run/parma exists"),
        Err(e) if e.kind() == ErrorKind::NotFound => blocked("no /proc/1/root/run/parma"),
        Err(e) => blocked(format!("stat /proc/1/root/run/parma: {}", errno(&e))),
    };
    report.line("run_parma", run_parma);
    let volumes = match list_dir(Path::new("/run/parma/volumes")) {
        Ok(names) => info(format!("/run/parma/volumes has {} entries", names.len())),
        Err(e) if e.kind() == ErrorKind::NotFound => info("no /run/parma/volumes"),
        Err(e) => info(format!("list /run/parma/volumes: {}", errno(&e))),
    };
    report.line("run_parma_volumes", volumes);
    report.line("pids_visible", info(format!("{} pids: {}", pids.len(), seen.join(" "))));
}

// ---------------------------------------------------------------------------
// 12. cgroup
// ---------------------------------------------------------------------------

fn cgroup(report: &mut Report) {
    // The limit as it is: a write that works changes nothing.
    report.line("cgroup/memory.max", write_back("/sys/fs/cgroup/memory.max"));
    let procs = match open_wo(Path::new("/sys/fs/cgroup/cgroup.procs")) {
        Ok(mut file) => match file.write_all(std::process::id().to_string().as_bytes()) {
            Ok(()) => escaped("moved itself into its own cgroup"),
            Err(e) => escaped(format!("opened for writing, write {}", errno(&e))),
        },
        Err(e) => missing_or_blocked("open for write", &e),
    };
    report.line("cgroup/cgroup.procs", procs);
    let dir = Path::new("/sys/fs/cgroup/parma-probe");
    let mkdir = match fs::create_dir(dir) {
        Ok(()) => {
            let _ = fs::remove_dir(dir);
            escaped("made /sys/fs/cgroup/parma-probe (removed)")
        }
        Err(e) => missing_or_blocked("mkdir", &e),
    };
    report.line("cgroup/mkdir", mkdir);
}

// ---------------------------------------------------------------------------
// 13. sysfs writes
// ---------------------------------------------------------------------------

fn sysfs_writes(report: &mut Report, disk: Option<&SysDev>) {
    let read_ahead = match disk {
        Some(disk) => open_for_write(&format!("/sys/block/{}/queue/read_ahead_kb", disk.name)),
        None => absent("no block device in /sys/block"),
    };
    report.line("sysfs/read_ahead_kb", read_ahead);
    report.line("sysfs/thp_enabled", open_for_write("/sys/kernel/mm/transparent_hugepage/enabled"));
}
