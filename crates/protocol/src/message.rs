//! Typed requests and responses: the JSON bodies of frames.
//!
//! Every body is a JSON object with a `"type"` field naming the variant.
//! Unknown fields are refused, so a typo on the host is an error, not a
//! silently ignored option.

use serde::{Deserialize, Serialize};

/// Longest string the agent puts in an error message (bytes).
pub const MAX_MESSAGE: usize = 4096;

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Request {
    /// Liveness and versions.
    Ping,
    /// What the guest has: memory, CPUs, mounts, SEV devices.
    GuestInfo,
    /// Power the UVM off once the response is sent.
    Shutdown,
    /// Install the execution policy (Rego text). Once per boot: a policy,
    /// once set, cannot be replaced.
    SetPolicy {
        /// The policy's exact text; its sha256 is its identity.
        policy: String,
    },
    /// An SEV-SNP attestation report whose REPORT_DATA is the caller's.
    GetAttestation {
        /// REPORT_DATA in hex: up to 64 bytes, zero padded on the right.
        report_data: String,
    },
    /// Open a layer disk through dm-verity with the given root hash and mount
    /// it read-only at `/run/parma/layers/<name>` (policy: `mount_device`).
    MountLayer {
        /// The layer's name in the guest: 1 to 64 of `[a-z0-9_-]`.
        name: String,
        /// The virtio-blk serial of the disk holding the layer's image.
        serial: String,
        /// The dm-verity root hash, lowercase hex.
        root_hash: String,
        /// Byte offset of the verity superblock on the disk (`layers.json`'s `hash_offset`).
        hash_offset: u64,
    },
    /// Unmount a layer and close its dm-verity device (policy: `unmount_device`).
    UnmountLayer {
        /// The layer's name.
        name: String,
    },
    /// Stack mounted layers, base first, with overlayfs as a container's root
    /// at `/run/parma/containers/<id>/rootfs` (policy: `mount_overlay`, and
    /// `scratch_mount` for its writable upper layer).
    MountOverlay {
        /// The container's id: 1 to 64 of `[a-z0-9_-]`.
        container_id: String,
        /// Layer names, base layer first.
        layers: Vec<String>,
        /// Give the container a writable upper layer (in encrypted guest memory).
        writable: bool,
    },
    /// Use a disk from the host as the encrypted scratch: swap through
    /// dm-integrity and authenticated dm-crypt with a key made in the guest
    /// (policy: `scratch_mount`). Once per boot.
    MountScratch {
        /// The virtio-blk serial of the (writable) disk.
        serial: String,
    },
    /// Unmount a container's overlay (policy: `unmount_overlay`).
    UnmountOverlay {
        /// The container's id.
        container_id: String,
    },
    /// Prepare a container on its overlay (policy: `create_container`).
    CreateContainer {
        /// The container's id (its overlay must be mounted).
        container_id: String,
        /// Its init process.
        process: ProcessSpec,
        /// Its host name (default: the id).
        hostname: Option<String>,
        /// Mount its root read-only.
        readonly_rootfs: bool,
        /// cgroup v2 limits of the container (all its processes).
        resources: Option<Resources>,
        /// Mounts beyond the defaults (`/proc`, `/dev`, `/sys`, ...), in order.
        #[serde(default)]
        mounts: Vec<Mount>,
        /// Paths under `/proc` and `/sys` the container sees empty (the OCI
        /// spec's `linux.maskedPaths`); none: runc's defaults. The policy
        /// decides on the list the agent applies.
        #[serde(default)]
        masked_paths: Option<Vec<String>>,
        /// Paths under `/proc` and `/sys` the container sees read-only
        /// (`linux.readonlyPaths`); none: runc's defaults.
        #[serde(default)]
        readonly_paths: Option<Vec<String>>,
        /// The OCI spec's `linux.namespaces`. Without a pod every namespace
        /// is the container's own and a path is refused; in a pod
        /// (`CreateSandbox`) the container always shares the pod's network,
        /// IPC and UTS namespaces (a path there names the pod's, a new one
        /// is refused), and the pod's PID namespace where a path asks for it
        /// and the pod shares one. Mount and cgroup namespaces are always
        /// the container's own; user and time namespaces are refused.
        #[serde(default)]
        namespaces: Vec<Namespace>,
    },
    /// Change a container's cgroup limits (policy: `update_container`;
    /// lowering `memory_max` below its use reclaims at once: to swap, when
    /// there is encrypted scratch).
    UpdateContainer {
        /// The container's id.
        container_id: String,
        /// The new limits; absent fields are left as they are.
        resources: Resources,
    },
    /// Read a container's resource use from its cgroup (policy:
    /// `get_properties`, the `allow_properties_access` knob): containerd's
    /// `Stats`, kubelet's container stats.
    ContainerStats {
        /// The container's id.
        container_id: String,
    },
    /// Start a created container's init process (policy: `start_container`).
    StartContainer {
        /// The container's id.
        container_id: String,
    },
    /// Start another process in a running container (policy: `exec_in_container`).
    ExecProcess {
        /// The container's id.
        container_id: String,
        /// The new process's id within the container: 1 to 64 of `[a-z0-9_-]`.
        exec_id: String,
        /// The process.
        process: ProcessSpec,
    },
    /// Signal a container's init process or an exec'd process (policy:
    /// `signal_container_process`).
    SignalProcess {
        /// The container's id.
        container_id: String,
        /// An exec id; none for the init process.
        exec_id: Option<String>,
        /// The signal number.
        signal: i32,
    },
    /// Whether a process has exited, and how. Does not block.
    WaitProcess {
        /// The container's id.
        container_id: String,
        /// An exec id; none for the init process.
        exec_id: Option<String>,
    },
    /// Read what a process wrote to stdout or stderr so far. Does not block.
    ReadOutput {
        /// The container's id.
        container_id: String,
        /// An exec id; none for the init process.
        exec_id: Option<String>,
        /// Which stream.
        stream: OutputStream,
    },
    /// Write to a process's stdin, and optionally close it.
    WriteStdin {
        /// The container's id.
        container_id: String,
        /// An exec id; none for the init process.
        exec_id: Option<String>,
        /// Bytes, base64.
        data: String,
        /// Close stdin after writing.
        close: bool,
    },
    /// Set the window size of a process's terminal (it gets SIGWINCH).
    ResizeTerminal {
        /// The container's id.
        container_id: String,
        /// An exec id; none for the init process.
        exec_id: Option<String>,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Remove a container whose processes have all exited (policy:
    /// `shutdown_container`), with its cgroup; the overlay stays until
    /// `UnmountOverlay`.
    DeleteContainer {
        /// The container's id.
        container_id: String,
    },
    /// Make the UVM a pod (policy: `create_sandbox`), once: network, IPC
    /// and UTS namespaces (a loopback interface up, this host name) that
    /// every container created afterwards shares, and optionally a PID
    /// namespace. The agent holds them with a process of its own (no pause
    /// image from the host).
    CreateSandbox {
        /// The pod's host name: 1 to 64 bytes of `[A-Za-z0-9.-]`.
        hostname: String,
        /// Containers that ask for it share one PID namespace.
        #[serde(default)]
        share_pid: bool,
    },
    /// Move the NIC with this MAC address into the pod's network namespace
    /// and configure it (policy: `update_interface`; Kata's name). Needs
    /// the pod (`CreateSandbox`).
    UpdateInterface {
        /// What the interface becomes.
        interface: Interface,
    },
    /// Add routes in the pod's network namespace, in order (policy:
    /// `update_routes`; Kata's name).
    UpdateRoutes {
        /// The routes.
        routes: Vec<Route>,
    },
    /// Add permanent neighbour entries in the pod's network namespace
    /// (policy: `add_arp_neighbors`; Kata's name).
    AddArpNeighbors {
        /// The entries.
        neighbors: Vec<ArpNeighbor>,
    },
    /// Put a file the orchestrator hands in (`/etc/hosts`, `resolv.conf`, a
    /// token) under `/run/parma/files/` (policy: `copy_file`, on the guest
    /// path); containers get it only as a bind mount their policy lists. A
    /// copy over an existing file replaces its contents.
    CopyFile {
        /// Relative to `/run/parma/files`: 1 to 8 components of `[A-Za-z0-9._-]`.
        path: String,
        /// The contents, base64 (at most 512 KiB decoded).
        data: String,
        /// Permission bits (no set-id or sticky); default 0644.
        #[serde(default = "file_mode")]
        mode: u32,
    },
    /// Fetch a secret from a key broker (Trustee's KBS protocol) into a
    /// created container's `/dev/parma/secrets/FILE`, before it starts
    /// (policy: `release_secret`: the container's entry lists the
    /// resource as that file from that broker with that certificate). The
    /// agent runs the exchange itself over a vsock stream the host relays
    /// to the broker (guest port [`crate::KBS_VSOCK_PORT`]), with TLS that
    /// ends in the agent and the broker's certificate pinned, so the host
    /// sees neither the report's key nor the secret.
    ProvisionSecret {
        /// The container.
        container_id: String,
        /// The broker, `https://HOST[:PORT]` (the TLS name is HOST).
        broker_url: String,
        /// SHA-256 of the broker's TLS certificate (DER), lowercase hex.
        broker_certificate_sha256: String,
        /// The resource at the broker, `REPO/TYPE/TAG`.
        resource: String,
        /// The file name in `/dev/parma/secrets/`: 1 to 64 bytes of `[A-Za-z0-9._-]`, not hidden.
        file: String,
        /// Reach the broker at this `IP:PORT` over the pod's network (the
        /// UVM must be a pod with its interface up) instead of the host's
        /// vsock relay. Either way TLS ends in the agent and the pin
        /// decides who the broker is; the address is only a route.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        broker_address: Option<String>,
    },
    /// Add a signed policy fragment's containers to the policy in force
    /// (policy: `load_fragment`, on the issuer, feed and SVN, once the
    /// issuer's signature over the fragment checked).
    LoadFragment {
        /// The fragment document `{"feed", "svn", "containers"}`, base64 of the signed bytes.
        fragment: String,
        /// ECDSA P-384 / SHA-384 signature over those bytes (DER or r || s), base64.
        signature: String,
        /// The issuer's public key, SubjectPublicKeyInfo DER, base64.
        public_key: String,
    },
}

/// The variant names of [`Request`], as on the wire.
pub const REQUEST_TYPES: &[&str] = &[
    "Ping",
    "GuestInfo",
    "Shutdown",
    "SetPolicy",
    "GetAttestation",
    "MountLayer",
    "UnmountLayer",
    "MountOverlay",
    "UnmountOverlay",
    "MountScratch",
    "CreateContainer",
    "UpdateContainer",
    "ContainerStats",
    "StartContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "ReadOutput",
    "WriteStdin",
    "ResizeTerminal",
    "DeleteContainer",
    "LoadFragment",
    "CreateSandbox",
    "UpdateInterface",
    "UpdateRoutes",
    "AddArpNeighbors",
    "CopyFile",
    "ProvisionSecret",
];

/// A network interface of the pod, as `UpdateInterface` sets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Its name in the pod (`eth0`): 1 to 15 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`: how the agent finds the NIC.
    pub hw_addr: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses in CIDR form (`10.0.2.15/24`, `fd00::15/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Link flags besides up: 0, or `IFF_NOARP` (0x80).
    #[serde(default)]
    pub raw_flags: u32,
}

/// A route of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination in CIDR form, or `default` (IPv4) / `default6`.
    pub dest: String,
    /// The next hop, if any.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The interface's name in the pod.
    pub device: String,
    /// Preferred source address, if any.
    #[serde(default)]
    pub source: Option<String>,
    /// `RT_SCOPE_*`: 0 universe (default), 253 link, 254 host.
    #[serde(default)]
    pub scope: u8,
}

/// A neighbour entry of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArpNeighbor {
    /// Its IP address.
    pub to_ip_address: String,
    /// The interface's name in the pod.
    pub device: String,
    /// Its MAC address.
    pub ll_address: String,
    /// `NUD_*` state (128: permanent, the only one allowed by default).
    #[serde(default = "permanent")]
    pub state: u16,
    /// `NTF_*` flags.
    #[serde(default)]
    pub flags: u8,
}

fn file_mode() -> u32 {
    0o644
}

fn permanent() -> u16 {
    128
}

/// An entry of the OCI spec's `linux.namespaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// `network`, `ipc`, `uts`, `pid`, `mount`, `cgroup` (`user` and `time`
    /// are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// A namespace to join instead of a new one: the host's path, which in
    /// the guest only ever means the pod's.
    #[serde(default)]
    pub path: Option<String>,
}

/// A process as the host asks for it (a subset of the OCI runtime spec's `process`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// Capability sets by OCI name (`CAP_CHOWN`).
    pub capabilities: CapabilitySets,
    /// Set `no_new_privs`.
    pub no_new_privileges: bool,
    /// Resource limits (`RLIMIT_NOFILE` and the like), set before the process starts.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// An OCI seccomp profile (`linux.seccomp` of the runtime spec) as JSON
    /// text; the policy sees its sha256. Needs `no_new_privileges`.
    #[serde(default)]
    pub seccomp: Option<String>,
    /// Run on a terminal (a pseudo-terminal as stdin, stdout and stderr, and
    /// the controlling terminal of the process's session): its output comes
    /// as stdout only, through the terminal's line discipline. Size it with
    /// `ResizeTerminal`. Closing stdin does not end a terminal's input: send
    /// its end-of-file character (`^D`) instead.
    #[serde(default)]
    pub terminal: bool,
}

/// One resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, `RLIMIT_NPROC`, ... as the OCI spec names them.
    #[serde(rename = "type")]
    pub kind: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// A mount of a container beyond the defaults, as the OCI runtime spec
/// writes one. The policy decides on all four fields (`create_container`'s
/// `mounts`); the agent then allows `tmpfs`, and `bind` of a volume of the
/// UVM: a directory `/run/parma/volumes/NAME` in guest memory, made on first
/// use and shared by every container that binds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Where, inside the container: an absolute path.
    pub destination: String,
    /// `tmpfs` or `bind`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `tmpfs` for tmpfs; `/run/parma/volumes/NAME` for bind.
    pub source: String,
    /// Options: `ro`, `rw`, `nosuid`, `nodev`, `noexec`, `exec`, for bind
    /// `bind`/`rbind`, for tmpfs `size=N[k|m|g]` and `mode=OCTAL`.
    #[serde(default)]
    pub options: Vec<String>,
}

/// cgroup v2 limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
    /// `cpu.max`: quota and period in microseconds.
    pub cpu_max: Option<(u64, u64)>,
}

/// The five capability sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitySets {
    /// Bounding.
    pub bounding: Vec<String>,
    /// Effective.
    pub effective: Vec<String>,
    /// Inheritable.
    pub inheritable: Vec<String>,
    /// Permitted.
    pub permitted: Vec<String>,
    /// Ambient.
    pub ambient: Vec<String>,
}

/// A process's output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// fd 1.
    Stdout,
    /// fd 2.
    Stderr,
}

impl Request {
    /// The variant name, as on the wire (`"Ping"`).
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Ping => RequestKind::Ping,
            Request::GuestInfo => RequestKind::GuestInfo,
            Request::Shutdown => RequestKind::Shutdown,
            Request::SetPolicy { .. } => RequestKind::SetPolicy,
            Request::GetAttestation { .. } => RequestKind::GetAttestation,
            Request::MountLayer { .. } => RequestKind::MountLayer,
            Request::UnmountLayer { .. } => RequestKind::UnmountLayer,
            Request::MountOverlay { .. } => RequestKind::MountOverlay,
            Request::UnmountOverlay { .. } => RequestKind::UnmountOverlay,
            Request::MountScratch { .. } => RequestKind::MountScratch,
            Request::CreateContainer { .. } => RequestKind::CreateContainer,
            Request::UpdateContainer { .. } => RequestKind::UpdateContainer,
            Request::ContainerStats { .. } => RequestKind::ContainerStats,
            Request::StartContainer { .. } => RequestKind::StartContainer,
            Request::ExecProcess { .. } => RequestKind::ExecProcess,
            Request::SignalProcess { .. } => RequestKind::SignalProcess,
            Request::WaitProcess { .. } => RequestKind::WaitProcess,
            Request::ReadOutput { .. } => RequestKind::ReadOutput,
            Request::WriteStdin { .. } => RequestKind::WriteStdin,
            Request::ResizeTerminal { .. } => RequestKind::ResizeTerminal,
            Request::DeleteContainer { .. } => RequestKind::DeleteContainer,
            Request::LoadFragment { .. } => RequestKind::LoadFragment,
            Request::CreateSandbox { .. } => RequestKind::CreateSandbox,
            Request::UpdateInterface { .. } => RequestKind::UpdateInterface,
            Request::UpdateRoutes { .. } => RequestKind::UpdateRoutes,
            Request::AddArpNeighbors { .. } => RequestKind::AddArpNeighbors,
            Request::CopyFile { .. } => RequestKind::CopyFile,
            Request::ProvisionSecret { .. } => RequestKind::ProvisionSecret,
        }
    }
}

/// The kind of a request without its arguments: what the policy gate decides on first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestKind {
    /// [`Request::Ping`].
    Ping,
    /// [`Request::GuestInfo`].
    GuestInfo,
    /// [`Request::Shutdown`].
    Shutdown,
    /// [`Request::SetPolicy`].
    SetPolicy,
    /// [`Request::GetAttestation`].
    GetAttestation,
    /// [`Request::MountLayer`].
    MountLayer,
    /// [`Request::UnmountLayer`].
    UnmountLayer,
    /// [`Request::MountOverlay`].
    MountOverlay,
    /// [`Request::UnmountOverlay`].
    UnmountOverlay,
    /// [`Request::MountScratch`].
    MountScratch,
    /// [`Request::CreateContainer`].
    CreateContainer,
    /// [`Request::UpdateContainer`].
    UpdateContainer,
    /// [`Request::ContainerStats`].
    ContainerStats,
    /// [`Request::StartContainer`].
    StartContainer,
    /// [`Request::ExecProcess`].
    ExecProcess,
    /// [`Request::SignalProcess`].
    SignalProcess,
    /// [`Request::WaitProcess`].
    WaitProcess,
    /// [`Request::ReadOutput`].
    ReadOutput,
    /// [`Request::WriteStdin`].
    WriteStdin,
    /// [`Request::ResizeTerminal`].
    ResizeTerminal,
    /// [`Request::DeleteContainer`].
    DeleteContainer,
    /// [`Request::LoadFragment`].
    LoadFragment,
    /// [`Request::CreateSandbox`].
    CreateSandbox,
    /// [`Request::UpdateInterface`].
    UpdateInterface,
    /// [`Request::UpdateRoutes`].
    UpdateRoutes,
    /// [`Request::AddArpNeighbors`].
    AddArpNeighbors,
    /// [`Request::CopyFile`].
    CopyFile,
    /// [`Request::ProvisionSecret`].
    ProvisionSecret,
}

impl RequestKind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Ping => "Ping",
            RequestKind::GuestInfo => "GuestInfo",
            RequestKind::Shutdown => "Shutdown",
            RequestKind::SetPolicy => "SetPolicy",
            RequestKind::GetAttestation => "GetAttestation",
            RequestKind::MountLayer => "MountLayer",
            RequestKind::UnmountLayer => "UnmountLayer",
            RequestKind::MountOverlay => "MountOverlay",
            RequestKind::UnmountOverlay => "UnmountOverlay",
            RequestKind::MountScratch => "MountScratch",
            RequestKind::CreateContainer => "CreateContainer",
            RequestKind::UpdateContainer => "UpdateContainer",
            RequestKind::ContainerStats => "ContainerStats",
            RequestKind::StartContainer => "StartContainer",
            RequestKind::ExecProcess => "ExecProcess",
            RequestKind::SignalProcess => "SignalProcess",
            RequestKind::WaitProcess => "WaitProcess",
            RequestKind::ReadOutput => "ReadOutput",
            RequestKind::WriteStdin => "WriteStdin",
            RequestKind::ResizeTerminal => "ResizeTerminal",
            RequestKind::DeleteContainer => "DeleteContainer",
            RequestKind::LoadFragment => "LoadFragment",
            RequestKind::CreateSandbox => "CreateSandbox",
            RequestKind::UpdateInterface => "UpdateInterface",
            RequestKind::UpdateRoutes => "UpdateRoutes",
            RequestKind::AddArpNeighbors => "AddArpNeighbors",
            RequestKind::CopyFile => "CopyFile",
            RequestKind::ProvisionSecret => "ProvisionSecret",
        }
    }
}

/// A response from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong(PingInfo),
    /// Answer to [`Request::GuestInfo`].
    GuestInfo(GuestInfo),
    /// Answer to [`Request::Shutdown`]: the UVM powers off after this.
    ShuttingDown,
    /// Answer to [`Request::SetPolicy`]: the policy is in force.
    PolicySet {
        /// sha256 of the policy's exact bytes, lowercase hex.
        sha256: String,
    },
    /// Answer to [`Request::GetAttestation`].
    Attestation {
        /// The 1184-byte report, lowercase hex.
        report: String,
        /// Who made it: `sev-guest` (SEV-SNP firmware, through configfs TSM)
        /// or `insecure-emulation` (a test key; proves nothing).
        provider: String,
    },
    /// Answer to [`Request::MountLayer`].
    LayerMounted {
        /// Where it is mounted in the guest.
        target: String,
        /// The dm-verity device.
        device: String,
    },
    /// Answer to [`Request::MountOverlay`].
    OverlayMounted {
        /// The container's root in the guest.
        target: String,
    },
    /// Answer to [`Request::MountScratch`].
    ScratchMounted {
        /// The swap device (dm-crypt over dm-integrity).
        device: String,
        /// Usable bytes.
        bytes: u64,
    },
    /// Answer to [`Request::CreateContainer`]: created, not started.
    Created {
        /// The policy's container entry it was created as (its `name`),
        /// when the policy's decision names one: what a host looks up the
        /// container's secrets by. The policy is the host's own document;
        /// this says which of its entries matched.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_container: Option<String>,
    },
    /// Answer to [`Request::StartContainer`] and [`Request::ExecProcess`].
    Started {
        /// The process's PID in the guest.
        pid: i32,
    },
    /// Answer to [`Request::WaitProcess`].
    ProcessStatus {
        /// Still running.
        running: bool,
        /// Its exit code, once it exited normally.
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// Answer to [`Request::ReadOutput`].
    Output {
        /// Bytes, base64 (empty: nothing new yet).
        data: String,
        /// The stream is closed and everything was read.
        eof: bool,
    },
    /// Answer to [`Request::WriteStdin`].
    Written {
        /// Bytes the pipe took now; the host sends the rest later.
        bytes: u64,
    },
    /// Answer to [`Request::LoadFragment`].
    FragmentLoaded {
        /// sha256 of the issuer's key, lowercase hex.
        issuer: String,
        /// The fragment's feed.
        feed: String,
        /// Its SVN.
        svn: u64,
        /// How many containers it added.
        containers: u64,
    },
    /// Answer to [`Request::ContainerStats`] (boxed: the largest answer).
    Stats(Box<ContainerStats>),
    /// Answer to requests that return nothing but success (unmounts,
    /// signal, delete).
    Done,
    /// The request was refused or failed.
    Error(AgentError),
}

/// Versions and liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingInfo {
    /// Protocol version the agent speaks.
    pub protocol_version: u16,
    /// The agent's crate version.
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// Time since the guest kernel booted, in milliseconds.
    pub uptime_ms: u64,
}

/// A container's resource use, from its cgroup (v2) in the guest. A limit
/// of `u64::MAX` is none (`max`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStats {
    /// `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: u64,
    /// `cpu.stat` `user_usec`.
    pub cpu_user_usec: u64,
    /// `cpu.stat` `system_usec`.
    pub cpu_system_usec: u64,
    /// `cpu.stat` `nr_periods`, `nr_throttled`, `throttled_usec`.
    pub cpu_nr_periods: u64,
    /// Periods throttled.
    pub cpu_nr_throttled: u64,
    /// Time throttled.
    pub cpu_throttled_usec: u64,
    /// `memory.current`, bytes.
    pub memory_usage: u64,
    /// `memory.max`, bytes.
    pub memory_limit: u64,
    /// `memory.stat` `anon`, `file`, `inactive_file`, `active_file`, bytes.
    pub memory_anon: u64,
    /// Page cache.
    pub memory_file: u64,
    /// Reclaimable page cache (what kubelet subtracts for the working set).
    pub memory_inactive_file: u64,
    /// Active page cache.
    pub memory_active_file: u64,
    /// `memory.stat` `pgfault`, `pgmajfault`.
    pub memory_pgfault: u64,
    /// Major faults.
    pub memory_pgmajfault: u64,
    /// `memory.events` `oom_kill`.
    pub memory_oom_kill: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `pids.max`.
    pub pids_limit: u64,
}

/// What the guest has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestInfo {
    /// `MemTotal` from /proc/meminfo, KiB.
    pub memory_total_kib: u64,
    /// `MemAvailable` from /proc/meminfo, KiB.
    pub memory_available_kib: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// Mounted filesystems, in /proc/self/mounts order.
    pub mounts: Vec<MountInfo>,
    /// Whether `/dev/sev-guest` exists (an SEV-SNP guest).
    pub sev_guest_device: bool,
    /// Whether the configfs TSM report interface is mounted and present.
    pub tsm_report: bool,
}

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountInfo {
    /// Device or pseudo-filesystem name.
    pub source: String,
    /// Mount point.
    pub target: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount options.
    pub options: String,
}

/// Why a request failed, as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct AgentError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// One readable line, at most [`MAX_MESSAGE`] bytes.
    pub message: String,
}

impl AgentError {
    /// An error with a message cut to [`MAX_MESSAGE`] bytes on a char boundary.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self { code, message }
    }
}

/// Error codes. Stable on the wire; new ones are added at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bytes were not a frame (bad magic); the agent skipped to the next one.
    BadMagic,
    /// The frame's protocol version is not spoken by the agent.
    UnsupportedVersion,
    /// The frame kind is not a request.
    UnknownKind,
    /// The body is longer than the protocol allows.
    Oversize,
    /// The body is not a valid request (bad JSON, wrong fields).
    Malformed,
    /// The body names a request type the agent does not know.
    UnknownType,
    /// The policy denied the request; nothing happened.
    PolicyDenied,
    /// The request was allowed but failed in the guest.
    Failed,
    /// Too many requests are waiting on this connection; nothing happened.
    Busy,
    /// The container, process, layer or overlay the request names does not exist.
    NotFound,
    /// What the request would create (a container, a process) already exists.
    AlreadyExists,
    /// The object is not in a state that allows the request (a container
    /// not started yet, or still running; a process that exited).
    WrongState,
    /// The process's executable is not in the container (`docker run` exits 127).
    ExecutableNotFound,
    /// The executable is there but cannot be run: not executable, not a
    /// program (`docker run` exits 126).
    CannotExecute,
    /// A value in the request is out of range or ill-formed (a relative
    /// working directory, an rlimit whose soft exceeds its hard).
    InvalidArgument,
    /// A bound of the guest is reached (containers, processes); delete some first.
    LimitReached,
    /// The process's stdin is closed (it closed it, or exited).
    StdinClosed,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::BadMagic => "bad_magic",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::Oversize => "oversize",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::Failed => "failed",
            ErrorCode::Busy => "busy",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::ExecutableNotFound => "executable_not_found",
            ErrorCode::CannotExecute => "cannot_execute",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::StdinClosed => "stdin_closed",
        };
        f.write_str(name)
    }
}

/// A body that did not decode into a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A JSON object with a `"type"` the agent does not know.
    #[error("unknown request type {0:?}")]
    UnknownType(String),
    /// Anything else: not JSON, not an object, missing or extra fields.
    #[error("malformed request: {0}")]
    Malformed(String),
}

impl From<DecodeError> for AgentError {
    fn from(err: DecodeError) -> Self {
        let code = match err {
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::Malformed(_) => ErrorCode::Malformed,
        };
        AgentError::new(code, err.to_string())
    }
}

impl Request {
    /// Decode a request body.
    ///
    /// Fields the request type does not have are refused (serde cannot do
    /// that for unit variants of an internally tagged enum, so it is checked
    /// here against the request's own serialisation: request types must not
    /// skip fields when serialising).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|err| DecodeError::Malformed(err.to_string()))?;
        if let Some(ty) = value.get("type").and_then(serde_json::Value::as_str)
            && !REQUEST_TYPES.contains(&ty)
        {
            return Err(DecodeError::UnknownType(bounded(ty)));
        }
        let request = Request::deserialize(&value).map_err(|err| DecodeError::Malformed(err.to_string()))?;
        if let (serde_json::Value::Object(input), Ok(serde_json::Value::Object(known))) =
            (&value, serde_json::to_value(&request))
            && let Some(extra) = input.keys().find(|key| !known.contains_key(*key))
        {
            return Err(DecodeError::Malformed(format!("unknown field `{}`", bounded(extra))));
        }
        Ok(request)
    }

    /// Encode a request body.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain enums cannot fail; an empty body would be
        // refused as malformed by the agent rather than sent wrong.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A host-chosen name, cut to 128 bytes for error messages.
fn bounded(name: &str) -> String {
    name.get(..name.floor_char_boundary(128)).unwrap_or_default().to_string()
}

impl Response {
    /// Decode a response body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(body).map_err(|err| DecodeError::Malformed(err.to_string()))
    }

    /// Encode a response body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
