//! The inputs of the enforcement points, as typed structs: what the agent
//! builds from a request and the policy sees as `input` (field names as
//! hcsshim's framework has them). [`Input::to_value`] is the JSON the
//! engine evaluates; `docs/policy.md` lists the same fields.

use parma_protocol::{CapabilitySets, Mount, Resources, Rlimit};
use serde::Serialize;

use crate::Point;

/// `mount_device`: a layer opened through dm-verity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MountDevice {
    /// Where the layer is mounted.
    pub target: String,
    /// The dm-verity root hash the request names.
    pub device_hash: String,
}

/// `unmount_device` and `unmount_overlay`: what is unmounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unmount {
    /// The mount point.
    pub unmount_target: String,
}

/// `mount_overlay`: layers stacked as a container's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MountOverlay {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The layers' mount points, base first.
    pub layer_paths: Vec<String>,
    /// The root's mount point.
    pub target: String,
}

/// `scratch_mount`: writable storage for a container, or swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScratchMount {
    /// The mount point, or `swap`.
    pub target: String,
    /// Whether the host cannot read it.
    pub encrypted: bool,
    /// Whether it is swap on a host disk (no freshness).
    pub swap: bool,
}

/// `exec_in_container`, and the process part of `create_container`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The command.
    pub arg_list: Vec<String>,
    /// The environment, `NAME=value`.
    pub env_list: Vec<String>,
    /// The working directory.
    pub working_dir: String,
    /// Whether it runs on a terminal.
    pub terminal: bool,
    /// Its rlimits.
    pub rlimits: Vec<Rlimit>,
}

/// A user, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct User {
    /// The uid.
    pub uid: u32,
    /// The gid.
    pub gid: u32,
}

/// `create_container`: everything a container is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateContainer {
    /// The process.
    #[serde(flatten)]
    pub process: Process,
    /// Its user.
    pub user: User,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// Its capability sets.
    pub capabilities: CapabilitySets,
    /// `no_new_privileges`.
    pub no_new_privileges: bool,
    /// Always false: the UVM runs no privileged container.
    pub privileged: bool,
    /// sha256 of the seccomp profile's text, or empty for none.
    #[serde(rename = "seccompProfileSHA256")]
    pub seccomp_profile_sha256: String,
    /// Mounts beyond the defaults.
    pub mounts: Vec<Mount>,
    /// Paths hidden from the container.
    pub masked_paths: Vec<String>,
    /// Paths the container sees read-only.
    pub readonly_paths: Vec<String>,
    /// Whether its root is read-only.
    pub readonly_rootfs: bool,
}

/// `start_container` and `shutdown_container`: the container named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
}

/// `update_container`: new cgroup limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateContainer {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The limits.
    pub resources: Resources,
}

/// `signal_container_process`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signal {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The signal number.
    pub signal: i32,
    /// Whether it goes to the container's init process.
    pub is_init_process: bool,
    /// The command of the process it goes to.
    pub arg_list: Vec<String>,
}

/// `get_attestation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GetAttestation {
    /// REPORT_DATA, 64 bytes in hex (zero padded).
    pub report_data: String,
    /// The containers whose processes run.
    pub running: Vec<String>,
}

/// `container_attestation`: a container asks for a report through its
/// endpoint. The agent fills it from its records (which endpoint the
/// connection came to, the caller's cgroup), never from the caller's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerAttestation {
    /// The container the endpoint belongs to.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The container's data, 64 bytes in hex (zero padded).
    pub report_data: String,
}

/// `release_secret`: a secret from a key broker for a created container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSecret {
    /// The container that receives it.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The broker's URL (`https://HOST[:PORT]`).
    pub broker_url: String,
    /// The SHA-256 of the broker's TLS certificate (DER), lowercase hex.
    #[serde(rename = "brokerCertificateSHA256")]
    pub broker_certificate_sha256: String,
    /// The resource at the broker (`REPO/TYPE/TAG`).
    pub resource: String,
    /// The file it becomes in the container's `/dev/parma/secrets/`.
    pub file: String,
}

/// `create_sandbox`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSandbox {
    /// The pod's host name.
    pub hostname: String,
    /// Whether containers may share one PID namespace.
    pub share_pid: bool,
}

/// `update_interface`: the request as the agent parsed it (addresses in
/// canonical form, the MAC in lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateInterface {
    /// Its name in the pod.
    pub name: String,
    /// Its MAC address, lowercase.
    pub hw_addr: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses, `IP/PREFIX`.
    pub addresses: Vec<String>,
    /// Link flags besides up.
    pub raw_flags: u32,
}

/// One route of `update_routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// `IP/PREFIX` (`default` is `0.0.0.0/0` or `::/0`).
    pub dest: String,
    /// The next hop's IP, or "".
    pub gateway: String,
    /// The interface.
    pub device: String,
    /// The preferred source IP, or "".
    pub source: String,
    /// `RT_SCOPE_*`.
    pub scope: u8,
}

/// `update_routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateRoutes {
    /// The routes, in order.
    pub routes: Vec<Route>,
}

/// One entry of `add_arp_neighbors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArpNeighbor {
    /// Its IP.
    #[serde(rename = "toIPAddress")]
    pub to_ip_address: String,
    /// The interface.
    pub device: String,
    /// Its MAC address, lowercase.
    pub lladdr: String,
    /// `NUD_*`.
    pub state: u16,
    /// `NTF_*`.
    pub flags: u8,
}

/// `add_arp_neighbors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddArpNeighbors {
    /// The entries.
    pub neighbors: Vec<ArpNeighbor>,
}

/// `copy_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyFile {
    /// The guest path it is written to.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// A point with no input fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Empty {}

/// One enforcement point with its input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Input {
    /// `mount_device`.
    MountDevice(MountDevice),
    /// `unmount_device`.
    UnmountDevice(Unmount),
    /// `mount_overlay`.
    MountOverlay(MountOverlay),
    /// `scratch_mount`.
    ScratchMount(ScratchMount),
    /// `unmount_overlay`.
    UnmountOverlay(Unmount),
    /// `create_container`.
    CreateContainer(Box<CreateContainer>),
    /// `start_container`.
    StartContainer(Container),
    /// `update_container`.
    UpdateContainer(UpdateContainer),
    /// `exec_in_container`.
    ExecInContainer(Process),
    /// `signal_container_process`.
    SignalContainerProcess(Signal),
    /// `shutdown_container`.
    ShutdownContainer(Container),
    /// `get_properties`.
    GetProperties(Empty),
    /// `get_attestation`.
    GetAttestation(GetAttestation),
    /// `container_attestation`.
    ContainerAttestation(ContainerAttestation),
    /// `release_secret`.
    ReleaseSecret(ReleaseSecret),
    /// `runtime_logging`.
    RuntimeLogging(Empty),
    /// `create_sandbox`.
    CreateSandbox(CreateSandbox),
    /// `update_interface`.
    UpdateInterface(UpdateInterface),
    /// `update_routes`.
    UpdateRoutes(UpdateRoutes),
    /// `add_arp_neighbors`.
    AddArpNeighbors(AddArpNeighbors),
    /// `copy_file`.
    CopyFile(CopyFile),
}

impl Input {
    /// The enforcement point.
    pub fn point(&self) -> Point {
        match self {
            Input::MountDevice(_) => Point::MountDevice,
            Input::UnmountDevice(_) => Point::UnmountDevice,
            Input::MountOverlay(_) => Point::MountOverlay,
            Input::ScratchMount(_) => Point::ScratchMount,
            Input::UnmountOverlay(_) => Point::UnmountOverlay,
            Input::CreateContainer(_) => Point::CreateContainer,
            Input::StartContainer(_) => Point::StartContainer,
            Input::UpdateContainer(_) => Point::UpdateContainer,
            Input::ExecInContainer(_) => Point::ExecInContainer,
            Input::SignalContainerProcess(_) => Point::SignalContainerProcess,
            Input::ShutdownContainer(_) => Point::ShutdownContainer,
            Input::GetProperties(_) => Point::GetProperties,
            Input::GetAttestation(_) => Point::GetAttestation,
            Input::ContainerAttestation(_) => Point::ContainerAttestation,
            Input::ReleaseSecret(_) => Point::ReleaseSecret,
            Input::CreateSandbox(_) => Point::CreateSandbox,
            Input::UpdateInterface(_) => Point::UpdateInterface,
            Input::UpdateRoutes(_) => Point::UpdateRoutes,
            Input::AddArpNeighbors(_) => Point::AddArpNeighbors,
            Input::CopyFile(_) => Point::CopyFile,
            Input::RuntimeLogging(_) => Point::RuntimeLogging,
        }
    }

    /// The JSON object the policy sees as `input` (before the engine adds
    /// `state`). Plain data with string keys cannot fail to serialise; if
    /// it did, the input is `null`, which the engine denies (never `{}`,
    /// which would leave every field to the framework's defaults).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_have_the_frameworks_field_names() {
        let create = Input::CreateContainer(Box::new(CreateContainer {
            process: Process {
                container_id: "c".into(),
                arg_list: vec!["/bin/app".into()],
                env_list: vec!["A=1".into()],
                working_dir: "/".into(),
                terminal: false,
                rlimits: vec![Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 1, hard: 2 }],
            },
            user: User { uid: 1, gid: 2 },
            groups: vec![3],
            capabilities: CapabilitySets::default(),
            no_new_privileges: true,
            privileged: false,
            seccomp_profile_sha256: String::new(),
            mounts: Vec::new(),
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: Vec::new(),
            readonly_rootfs: false,
        }));
        assert_eq!(create.point(), Point::CreateContainer);
        let value = create.to_value();
        for field in [
            "containerID",
            "argList",
            "envList",
            "workingDir",
            "terminal",
            "rlimits",
            "user",
            "groups",
            "capabilities",
            "noNewPrivileges",
            "privileged",
            "seccompProfileSHA256",
            "mounts",
            "maskedPaths",
            "readonlyPaths",
            "readonlyRootfs",
        ] {
            assert!(value.get(field).is_some(), "{field} missing from {value}");
        }
        assert_eq!(value["rlimits"], json!([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2}]));
        assert_eq!(value["user"], json!({"uid": 1, "gid": 2}));
        assert_eq!(Input::GetProperties(Empty {}).to_value(), json!({}));
        let signal = Input::SignalContainerProcess(Signal {
            container_id: "c".into(),
            signal: 9,
            is_init_process: true,
            arg_list: vec![],
        });
        assert_eq!(signal.to_value(), json!({"containerID": "c", "signal": 9, "isInitProcess": true, "argList": []}));
        let attestation =
            Input::ContainerAttestation(ContainerAttestation { container_id: "c".into(), report_data: "00".into() });
        assert_eq!(attestation.to_value(), json!({"containerID": "c", "reportData": "00"}));
        let mount = Input::MountDevice(MountDevice { target: "/l0".into(), device_hash: "ab".into() });
        assert_eq!(mount.to_value(), json!({"target": "/l0", "deviceHash": "ab"}));
    }
}
