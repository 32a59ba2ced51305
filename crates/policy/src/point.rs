//! The enforcement points: one rule of the policy each.

use std::str::FromStr;

/// An enforcement point: a kind of host request the policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// Mount a layer's block device (through dm-verity) at a target.
    MountDevice,
    /// Unmount a layer device.
    UnmountDevice,
    /// Stack mounted layers into a container's root filesystem.
    MountOverlay,
    /// Remove a container's overlay.
    UnmountOverlay,
    /// Create a container (its init process is prepared, not started).
    CreateContainer,
    /// Start a created container's init process.
    StartContainer,
    /// Change a container's cgroup limits.
    UpdateContainer,
    /// Run a process in a started container.
    ExecInContainer,
    /// Run a process in the UVM itself.
    ExecExternal,
    /// Stop a container.
    ShutdownContainer,
    /// Signal a container's process.
    SignalContainerProcess,
    /// Mount the writable scratch space.
    ScratchMount,
    /// Unmount the scratch space.
    ScratchUnmount,
    /// Read the guest's properties (`GuestInfo`) once a policy is in force.
    GetProperties,
    /// Keep logging to the console the host reads (decided when the policy is set).
    RuntimeLogging,
    /// Load a policy fragment.
    LoadFragment,
    /// Give the host an attestation report.
    GetAttestation,
    /// Give a container an attestation report through its endpoint.
    ContainerAttestation,
    /// Fetch a secret from a key broker into a created container.
    ReleaseSecret,
    /// Make the UVM a pod: its shared namespaces and host name.
    CreateSandbox,
    /// Move a NIC into the pod and configure it.
    UpdateInterface,
    /// Add routes in the pod.
    UpdateRoutes,
    /// Add neighbour entries in the pod.
    AddArpNeighbors,
    /// Put a file from the orchestrator into the guest.
    CopyFile,
}

impl Point {
    /// Every enforcement point.
    pub const ALL: [Point; 24] = [
        Point::MountDevice,
        Point::UnmountDevice,
        Point::MountOverlay,
        Point::UnmountOverlay,
        Point::CreateContainer,
        Point::StartContainer,
        Point::UpdateContainer,
        Point::ExecInContainer,
        Point::ExecExternal,
        Point::ShutdownContainer,
        Point::SignalContainerProcess,
        Point::ScratchMount,
        Point::ScratchUnmount,
        Point::GetProperties,
        Point::RuntimeLogging,
        Point::LoadFragment,
        Point::GetAttestation,
        Point::ContainerAttestation,
        Point::ReleaseSecret,
        Point::CreateSandbox,
        Point::UpdateInterface,
        Point::UpdateRoutes,
        Point::AddArpNeighbors,
        Point::CopyFile,
    ];

    /// The rule name in the policy (`data.policy.<rule>`).
    pub fn rule(self) -> &'static str {
        match self {
            Point::MountDevice => "mount_device",
            Point::UnmountDevice => "unmount_device",
            Point::MountOverlay => "mount_overlay",
            Point::UnmountOverlay => "unmount_overlay",
            Point::CreateContainer => "create_container",
            Point::StartContainer => "start_container",
            Point::UpdateContainer => "update_container",
            Point::ExecInContainer => "exec_in_container",
            Point::ExecExternal => "exec_external",
            Point::ShutdownContainer => "shutdown_container",
            Point::SignalContainerProcess => "signal_container_process",
            Point::ScratchMount => "scratch_mount",
            Point::ScratchUnmount => "scratch_unmount",
            Point::GetProperties => "get_properties",
            Point::RuntimeLogging => "runtime_logging",
            Point::LoadFragment => "load_fragment",
            Point::GetAttestation => "get_attestation",
            Point::ContainerAttestation => "container_attestation",
            Point::ReleaseSecret => "release_secret",
            Point::CreateSandbox => "create_sandbox",
            Point::UpdateInterface => "update_interface",
            Point::UpdateRoutes => "update_routes",
            Point::AddArpNeighbors => "add_arp_neighbors",
            Point::CopyFile => "copy_file",
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.rule())
    }
}

/// A name that is not an enforcement point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown enforcement point {0:?}")]
pub struct UnknownPoint(pub String);

impl FromStr for Point {
    type Err = UnknownPoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Point::ALL.into_iter().find(|p| p.rule() == s).ok_or_else(|| UnknownPoint(s.chars().take(64).collect()))
    }
}
