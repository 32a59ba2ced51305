//! A bundle's OCI runtime spec (`config.json`, as containerd and its CRI
//! plugin write it) to the agent's requests: the process, the mounts (with
//! the files the orchestrator hands in, copied into the guest), the
//! namespaces, the cgroup limits.
//!
//! The spec is read with the few fields the agent takes, their strings
//! unchanged (capability and rlimit names reach the policy exactly as
//! written). What a UVM cannot honour (a host directory shared into the
//! container, a user namespace) is refused by name here, before the guest
//! sees it; everything else is the policy's to decide.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parma_protocol::{CapabilitySets, Mount, Namespace, ProcessSpec, Resources, Rlimit};
use serde::Deserialize;

/// The annotation CRI puts on every container: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The annotation CRI puts on every container: its pod's sandbox id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod annotation carrying the policy (see `parma_host::annotation`).
pub use parma_host::annotation::POLICY_ANNOTATION;

/// Where the agent keeps files the host copied in (`CopyFile`).
pub const GUEST_FILES: &str = "/run/parma/files";
/// Where the agent keeps the pod's volumes (emptyDir).
pub const GUEST_VOLUMES: &str = "/run/parma/volumes";

/// At most this many files in one volume handed in (a configMap, a secret).
const MAX_VOLUME_FILES: usize = 256;
/// At most this many bytes in one file handed in: its base64 in one
/// `CopyFile` frame, and what the agent takes (512 KiB).
pub const MAX_FILE: u64 = 512 << 10;
/// At most this many bytes of files for one container, all volumes together.
pub const MAX_FILES_TOTAL: u64 = 8 << 20;
/// The annotation CRI puts on a pod's containers: the pod's uid.
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Why a spec cannot become requests.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `config.json` cannot be read or parsed.
    #[error("cannot read the bundle's config.json: {0}")]
    Read(String),
    /// The spec has no process (a container needs one).
    #[error("the spec has no process")]
    NoProcess,
    /// A mount that has no meaning inside a UVM.
    #[error("mount {destination}: {reason}")]
    Mount {
        /// Where in the container.
        destination: String,
        /// Why.
        reason: String,
    },
    /// A file the orchestrator hands in cannot be read.
    #[error("cannot read {path} for the guest: {reason}")]
    File {
        /// The host file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The parts of an OCI runtime spec the shim reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Spec {
    /// The container's process.
    pub process: Option<Process>,
    /// Its root.
    pub root: Option<Root>,
    /// Its host name.
    pub hostname: Option<String>,
    /// Its mounts, in order.
    pub mounts: Vec<SpecMount>,
    /// Annotations (CRI's, the pod's policy).
    pub annotations: BTreeMap<String, String>,
    /// Linux specifics.
    pub linux: Option<Linux>,
}

/// `process`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Process {
    /// On a terminal.
    pub terminal: bool,
    /// Identity.
    pub user: User,
    /// argv.
    pub args: Vec<String>,
    /// `NAME=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Capability sets.
    pub capabilities: Option<Capabilities>,
    /// Resource limits.
    pub rlimits: Vec<SpecRlimit>,
    /// `no_new_privs`.
    pub no_new_privileges: bool,
}

/// `process.user`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct User {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// `process.capabilities`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Vec<String>,
    /// Effective set.
    pub effective: Vec<String>,
    /// Inheritable set.
    pub inheritable: Vec<String>,
    /// Permitted set.
    pub permitted: Vec<String>,
    /// Ambient set.
    pub ambient: Vec<String>,
}

/// One of `process.rlimits`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecRlimit {
    /// `RLIMIT_NOFILE`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// `root`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Root {
    /// Read-only root.
    pub readonly: bool,
}

/// One of `mounts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecMount {
    /// In the container.
    pub destination: String,
    /// `bind`, `tmpfs`, `proc`, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// On the host.
    pub source: Option<String>,
    /// Options.
    pub options: Vec<String>,
}

/// `linux`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Linux {
    /// Namespaces.
    pub namespaces: Vec<SpecNamespace>,
    /// cgroup limits.
    pub resources: Option<SpecResources>,
    /// Masked paths.
    pub masked_paths: Option<Vec<String>>,
    /// Read-only paths.
    pub readonly_paths: Option<Vec<String>>,
    /// The seccomp profile, as written.
    pub seccomp: Option<serde_json::Value>,
}

/// One of `linux.namespaces`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecNamespace {
    /// `pid`, `network`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// A namespace to join.
    pub path: Option<String>,
}

/// `linux.resources`, the parts a UVM's cgroup v2 takes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecResources {
    /// Memory.
    pub memory: Option<SpecMemory>,
    /// CPU.
    pub cpu: Option<SpecCpu>,
    /// Tasks.
    pub pids: Option<SpecPids>,
}

/// `linux.resources.memory`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecMemory {
    /// Bytes; zero or negative is none.
    pub limit: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecCpu {
    /// Microseconds per period; zero or negative is none.
    pub quota: Option<i64>,
    /// The period in microseconds.
    pub period: Option<u64>,
}

/// `linux.resources.pids`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpecPids {
    /// Tasks; zero or negative is none.
    pub limit: i64,
}

impl Spec {
    /// Read `config.json` from a bundle (at most 4 MiB: containerd writes a
    /// few KiB).
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let bytes =
            read_bounded(&path, 4 << 20).map_err(|err| SpecError::Read(format!("{}: {err}", path.display())))?;
        Self::parse(&bytes)
    }

    /// Parse a spec's JSON.
    pub fn parse(bytes: &[u8]) -> Result<Self, SpecError> {
        serde_json::from_slice(bytes).map_err(|err| SpecError::Read(err.to_string()))
    }

    /// What CRI says this container is.
    pub fn role(&self) -> Role {
        match self.annotations.get(CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Role::Sandbox,
            Some(_) => Role::PodContainer,
            None => Role::Standalone,
        }
    }

    /// The pod this container belongs to (CRI's sandbox id), if any.
    pub fn sandbox_id(&self) -> Option<&str> {
        self.annotations.get(SANDBOX_ID).map(String::as_str)
    }

    /// The process, as the agent takes it.
    pub fn process(&self) -> Result<ProcessSpec, SpecError> {
        process_spec(self.process.as_ref().ok_or(SpecError::NoProcess)?, self.seccomp())
    }

    /// The seccomp profile's JSON text, if the spec has one.
    pub fn seccomp(&self) -> Option<String> {
        self.linux.as_ref().and_then(|linux| linux.seccomp.as_ref()).map(serde_json::Value::to_string)
    }

    /// The namespaces, as the agent takes them.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.linux
            .iter()
            .flat_map(|linux| &linux.namespaces)
            .map(|ns| Namespace { kind: ns.kind.clone(), path: ns.path.clone() })
            .collect()
    }

    /// Whether the container asks for a PID namespace by path (a pod's shared one).
    pub fn joins_pid_namespace(&self) -> bool {
        self.linux.iter().flat_map(|linux| &linux.namespaces).any(|ns| ns.kind == "pid" && ns.path.is_some())
    }

    /// The cgroup limits, if any.
    pub fn resources(&self) -> Option<Resources> {
        self.linux.as_ref().and_then(|linux| linux.resources.as_ref()).and_then(resources)
    }

    /// `linux.maskedPaths`.
    pub fn masked_paths(&self) -> Option<Vec<String>> {
        self.linux.as_ref().and_then(|linux| linux.masked_paths.clone())
    }

    /// `linux.readonlyPaths`.
    pub fn readonly_paths(&self) -> Option<Vec<String>> {
        self.linux.as_ref().and_then(|linux| linux.readonly_paths.clone())
    }

    /// Whether the root is read-only.
    pub fn readonly_rootfs(&self) -> bool {
        self.root.as_ref().is_some_and(|root| root.readonly)
    }
}

/// What a bundle is, by CRI's annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A pod's sandbox (CRI's pause container): the UVM becomes the pod; it
    /// runs nothing.
    Sandbox,
    /// A container of a pod whose sandbox came first.
    PodContainer,
    /// A container without a pod (`ctr run`): a UVM of its own.
    Standalone,
}

/// An OCI process (an exec's spec too) as the agent takes it.
pub fn process_spec(process: &Process, seccomp: Option<String>) -> Result<ProcessSpec, SpecError> {
    let caps = process.capabilities.clone().unwrap_or_default();
    Ok(ProcessSpec {
        args: process.args.clone(),
        env: process.env.clone(),
        cwd: if process.cwd.is_empty() { "/".into() } else { process.cwd.clone() },
        uid: process.user.uid,
        gid: process.user.gid,
        groups: process.user.additional_gids.clone(),
        capabilities: CapabilitySets {
            bounding: caps.bounding,
            effective: caps.effective,
            inheritable: caps.inheritable,
            permitted: caps.permitted,
            ambient: caps.ambient,
        },
        no_new_privileges: process.no_new_privileges,
        rlimits: process
            .rlimits
            .iter()
            .map(|limit| Rlimit { kind: limit.kind.clone(), soft: limit.soft, hard: limit.hard })
            .collect(),
        seccomp,
        terminal: process.terminal,
    })
}

/// An exec's process spec (the `Any` containerd sends: the OCI process as JSON).
pub fn exec_process(json: &[u8]) -> Result<ProcessSpec, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(|err| SpecError::Read(err.to_string()))?;
    process_spec(&process, None)
}

fn resources(spec: &SpecResources) -> Option<Resources> {
    let positive = |value: i64| u64::try_from(value).ok().filter(|value| *value > 0);
    let memory_max = spec.memory.as_ref().and_then(|memory| memory.limit).and_then(positive);
    let pids_max = spec.pids.as_ref().and_then(|pids| positive(pids.limit));
    let cpu_max = spec.cpu.as_ref().and_then(|cpu| {
        Some((cpu.quota.and_then(positive)?, cpu.period.filter(|period| *period > 0).unwrap_or(100_000)))
    });
    let resources = Resources { memory_max, pids_max, cpu_max };
    (resources != Resources::default()).then_some(resources)
}

/// A file the orchestrator hands in: `CopyFile` to `path` (relative to
/// [`GUEST_FILES`]) with these bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Relative to [`GUEST_FILES`]: `pod/hosts`, `volumes/NAME/KEY`.
    pub path: String,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Its mode.
    pub mode: u32,
}

/// A container's mounts in the guest, and the files to copy in first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestMounts {
    /// Beyond the agent's defaults, in the spec's order.
    pub mounts: Vec<Mount>,
    /// Files to copy in before the container is created.
    pub files: Vec<GuestFile>,
}

/// Destinations the agent sets up itself in every container.
const DEFAULT_DESTINATIONS: &[&str] =
    &["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/dev/shm", "/sys", "/sys/fs/cgroup", "/run"];

/// Files of the pod that CRI writes on the host and binds into every container.
const POD_FILES: &[&str] = &["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// The kubelet's termination log: the kubelet reads it on the host, which a
/// confidential container cannot write to; it is left out.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Where a service account's token is mounted.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The spec's mounts in the guest: the agent's own defaults left out, the
/// pod's files and the kubelet's volumes of files (configMap, secret,
/// projected) copied in and bound read-only, emptyDir volumes bound from
/// guest memory, tmpfs as it is; a host directory or device anything else
/// is refused.
pub fn guest_mounts(spec: &Spec) -> Result<GuestMounts, SpecError> {
    let mut out = GuestMounts::default();
    for mount in &spec.mounts {
        let destination = mount.destination.trim_end_matches('/');
        let refuse = |reason: &str| SpecError::Mount { destination: mount.destination.clone(), reason: reason.into() };
        let kind = mount.kind.as_deref().unwrap_or("bind");
        if DEFAULT_DESTINATIONS.contains(&destination) || destination == TERMINATION_LOG {
            continue;
        }
        match kind {
            "tmpfs" => {
                let options = mount.options.iter().filter(|option| !is_propagation(option)).cloned().collect();
                out.mounts.push(Mount {
                    destination: destination.into(),
                    kind: "tmpfs".into(),
                    source: "tmpfs".into(),
                    options,
                });
                continue;
            }
            "bind" | "rbind" => {}
            _ => return Err(refuse(&format!("a {kind} mount is not possible in a UVM"))),
        }
        let source = mount.source.as_deref().ok_or_else(|| refuse("a bind mount without a source"))?;
        let read_only = mount.options.iter().any(|option| option == "ro");
        let bind = |source: String, writable: bool| Mount {
            destination: destination.into(),
            kind: "bind".into(),
            source,
            options: vec!["rbind".into(), if writable { "rw" } else { "ro" }.into()],
        };
        if POD_FILES.contains(&destination) {
            let host = pod_file(spec, destination, source).map_err(|reason| refuse(&reason))?;
            let name = destination.rsplit('/').next().unwrap_or_default();
            let path = format!("pod/{name}");
            out.files.push(GuestFile { data: read_file(&host)?, path: path.clone(), mode: 0o644 });
            out.mounts.push(bind(format!("{GUEST_FILES}/{path}"), false));
        } else if let Some((volume, dir)) = kubelet_volume(spec, source) {
            match volume {
                Volume::EmptyDir(name) => out.mounts.push(bind(format!("{GUEST_VOLUMES}/{name}"), !read_only)),
                Volume::Files(name) => {
                    let base = if destination == SERVICE_ACCOUNT {
                        "pod/serviceaccount".to_string()
                    } else {
                        format!("volumes/{name}")
                    };
                    for (key, data) in read_volume(&dir)? {
                        out.files.push(GuestFile { path: format!("{base}/{key}"), data, mode: 0o644 });
                    }
                    out.mounts.push(bind(format!("{GUEST_FILES}/{base}"), false));
                }
            }
        } else {
            return Err(refuse(&format!(
                "{source} is a host path; a confidential container sees no host directory (use an emptyDir, a configMap or a secret)"
            )));
        }
        let total: u64 = out.files.iter().map(|file| file.data.len() as u64).sum();
        if total > MAX_FILES_TOTAL {
            return Err(refuse(&format!("the files handed in come to more than {MAX_FILES_TOTAL} bytes")));
        }
    }
    Ok(out)
}

fn is_propagation(option: &str) -> bool {
    matches!(option, "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable")
}

/// A kubelet volume by its host path.
#[derive(Debug, PartialEq, Eq)]
enum Volume {
    /// `kubernetes.io~empty-dir/NAME`: memory of the guest.
    EmptyDir(String),
    /// `kubernetes.io~{configmap,secret,projected,downward-api}/NAME`: files to copy in.
    Files(String),
}

/// The host file behind one of the pod's files (`/etc/hosts`,
/// `/etc/hostname`, `/etc/resolv.conf`), resolved through any links: CRI's
/// file of this pod's sandbox (`.../SANDBOX-ID/NAME`) or kubelet's
/// `.../pods/UID/etc-hosts` (this pod's uid, where CRI names it). Anything
/// else (a hostPath someone mounted there) is refused.
fn pod_file(spec: &Spec, destination: &str, source: &str) -> Result<PathBuf, String> {
    let host = std::fs::canonicalize(source).map_err(|err| format!("{source}: {err}"))?;
    let name = destination.rsplit('/').next().unwrap_or_default();
    let parent = host.parent().and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or_default();
    let file = host.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let sandbox = spec.sandbox_id().is_some_and(|id| parent == id) && file == name;
    let grandparent =
        host.parent().and_then(Path::parent).and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or_default();
    let uid_ok = spec.annotations.get(SANDBOX_UID).is_none_or(|uid| uid == parent);
    let kubelet = destination == "/etc/hosts" && file == "etc-hosts" && grandparent == "pods" && uid_ok;
    if sandbox || kubelet {
        Ok(host)
    } else {
        Err(format!("{source} is not this pod's {name} (CRI's sandbox file or kubelet's etc-hosts)"))
    }
}

/// A kubelet volume by its host path, resolved through any links: exactly
/// `.../pods/UID/volumes/kubernetes.io~PLUGIN/NAME` (this pod's uid, where
/// CRI names it).
fn kubelet_volume(spec: &Spec, source: &str) -> Option<(Volume, PathBuf)> {
    let host = std::fs::canonicalize(source).ok()?;
    let parts: Vec<&str> = host.iter().filter_map(|part| part.to_str()).collect();
    let [.., pods, uid, volumes, plugin, name] = parts.as_slice() else { return None };
    if *pods != "pods" || *volumes != "volumes" || name.starts_with('.') {
        return None;
    }
    if spec.annotations.get(SANDBOX_UID).is_some_and(|pod| pod != uid) {
        return None;
    }
    let volume = match plugin.strip_prefix("kubernetes.io~")? {
        "empty-dir" => Volume::EmptyDir(name.to_string()),
        "configmap" | "secret" | "projected" | "downward-api" => Volume::Files(name.to_string()),
        _ => return None,
    };
    Some((volume, host))
}

fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut data = Vec::new();
    file.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(data)
}

fn read_file(path: &Path) -> Result<Vec<u8>, SpecError> {
    read_bounded(path, MAX_FILE)
        .map_err(|err| SpecError::File { path: path.display().to_string(), reason: err.to_string() })
}

/// The files of a kubelet volume, by key: the top level's regular files
/// (through the atomic writer's `..data` links), sorted; the writer's own
/// `..` entries are skipped.
fn read_volume(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, SpecError> {
    let fail = |reason: String| SpecError::File { path: dir.display().to_string(), reason };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| fail(err.to_string()))? {
        let entry = entry.map_err(|err| fail(err.to_string()))?;
        let Some(key) = entry.file_name().to_str().map(String::from) else { continue };
        if key.starts_with("..") {
            continue;
        }
        // The atomic writer's links (`KEY -> ..data/KEY`) stay inside the
        // volume; a link out of it is not followed.
        let Ok(path) = std::fs::canonicalize(entry.path()) else { continue };
        if !path.starts_with(dir) || !std::fs::metadata(&path).map_err(|err| fail(err.to_string()))?.is_file() {
            continue;
        }
        files.push((key, read_file(&path)?));
        if files.len() > MAX_VOLUME_FILES {
            return Err(fail(format!("more than {MAX_VOLUME_FILES} files")));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        Spec::parse(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_process_keeps_the_specs_strings() {
        let spec = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]},
                "args": ["/bin/app", "--port", "80"],
                "env": ["PATH=/bin", "HOSTNAME=web"],
                "cwd": "",
                "capabilities": {"bounding": ["CAP_NET_BIND_SERVICE"], "effective": ["CAP_NET_BIND_SERVICE"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                "noNewPrivileges": true,
                "apparmorProfile": "cri-containerd.apparmor.d",
                "oomScoreAdj": 1000
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "web",
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/7/ns/net"}],
                "resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 50000, "period": 100000, "shares": 2}, "pids": {"limit": 0}},
                "maskedPaths": ["/proc/kcore"],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}
            }
        }));
        let process = spec.process().unwrap();
        assert_eq!(process.args, ["/bin/app", "--port", "80"]);
        assert_eq!(process.cwd, "/");
        assert_eq!((process.uid, process.gid, process.groups.clone()), (1000, 1000, vec![1000, 10]));
        assert_eq!(process.capabilities.bounding, ["CAP_NET_BIND_SERVICE"]);
        assert!(process.capabilities.permitted.is_empty());
        assert_eq!(process.rlimits, [Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 512, hard: 1024 }]);
        assert!(process.no_new_privileges);
        assert_eq!(process.seccomp.as_deref(), Some(r#"{"defaultAction":"SCMP_ACT_ERRNO"}"#));
        assert!(spec.readonly_rootfs());
        assert_eq!(
            spec.resources(),
            Some(Resources { memory_max: Some(256 << 20), pids_max: None, cpu_max: Some((50_000, 100_000)) })
        );
        assert_eq!(spec.masked_paths(), Some(vec!["/proc/kcore".to_string()]));
        assert_eq!(spec.readonly_paths(), None);
        assert_eq!(spec.namespaces()[1], Namespace { kind: "network".into(), path: Some("/proc/7/ns/net".into()) });
        assert!(!spec.joins_pid_namespace());
        assert_eq!(spec.role(), Role::Standalone);
    }

    #[test]
    fn cri_annotations_name_the_role_and_the_pod() {
        let sandbox = spec(serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "abc"}}));
        assert_eq!((sandbox.role(), sandbox.sandbox_id()), (Role::Sandbox, Some("abc")));
        let member = spec(serde_json::json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "abc"}}));
        assert_eq!(member.role(), Role::PodContainer);
        assert!(matches!(spec(serde_json::json!({})).process(), Err(SpecError::NoProcess)));
        assert!(matches!(Spec::parse(b"{\"mounts\": 7}"), Err(SpecError::Read(_))));
    }

    #[test]
    fn kubelets_files_are_copied_in_and_bound_read_only() {
        let host = tempfile::tempdir().unwrap();
        let sandbox = host.path().join("sandboxes/abc");
        std::fs::create_dir_all(&sandbox).unwrap();
        for name in ["hosts", "hostname", "resolv.conf"] {
            std::fs::write(sandbox.join(name), format!("{name}\n")).unwrap();
        }
        let pod = host.path().join("pods/uid/volumes");
        let token = pod.join("kubernetes.io~projected/kube-api-access-x");
        let settings = pod.join("kubernetes.io~configmap/settings");
        for dir in [&token, &settings, &pod.join("kubernetes.io~empty-dir/cache")] {
            std::fs::create_dir_all(dir.join("..2026_12_03")).unwrap();
        }
        std::fs::write(token.join("..2026_12_03/token"), "a-token").unwrap();
        std::os::unix::fs::symlink("..2026_12_03", token.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", token.join("token")).unwrap();
        std::fs::write(settings.join("mode"), "fast").unwrap();
        let source = |path: &Path| path.display().to_string();
        let bind = |destination: &str, source: String, options: &[&str]| serde_json::json!({"destination": destination, "type": "bind", "source": source, "options": options});
        let spec = spec(serde_json::json!({"annotations": {SANDBOX_ID: "abc", SANDBOX_UID: "uid"}, "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/shm"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "rprivate", "size=65536k"]},
            bind("/etc/hosts", source(&sandbox.join("hosts")), &["rbind", "rprivate", "rw"]),
            bind("/etc/resolv.conf", source(&sandbox.join("resolv.conf")), &["rbind", "rprivate", "rw"]),
            bind("/dev/termination-log", "/var/lib/kubelet/pods/uid/containers/app/1".into(), &["rbind", "rw"]),
            bind(SERVICE_ACCOUNT, source(&token), &["rbind", "rprivate", "ro"]),
            bind("/etc/settings", source(&settings), &["rbind", "rprivate", "ro"]),
            bind("/cache", source(&pod.join("kubernetes.io~empty-dir/cache")), &["rbind", "rprivate", "rw"]),
        ]}));
        let guest = guest_mounts(&spec).unwrap();
        let summary: Vec<(String, String, Vec<String>)> =
            guest.mounts.iter().map(|m| (m.destination.clone(), m.source.clone(), m.options.clone())).collect();
        let ro = || vec!["rbind".to_string(), "ro".to_string()];
        assert_eq!(
            summary,
            [
                ("/tmp".into(), "tmpfs".into(), vec!["nosuid".into(), "size=65536k".into()]),
                ("/etc/hosts".into(), "/run/parma/files/pod/hosts".into(), ro()),
                ("/etc/resolv.conf".into(), "/run/parma/files/pod/resolv.conf".into(), ro()),
                (SERVICE_ACCOUNT.into(), "/run/parma/files/pod/serviceaccount".into(), ro()),
                ("/etc/settings".into(), "/run/parma/files/volumes/settings".into(), ro()),
                ("/cache".into(), "/run/parma/volumes/cache".into(), vec!["rbind".into(), "rw".into()]),
            ]
        );
        let files: Vec<(&str, &[u8])> = guest.files.iter().map(|f| (f.path.as_str(), f.data.as_slice())).collect();
        assert_eq!(
            files,
            [
                ("pod/hosts", b"hosts\n".as_slice()),
                ("pod/resolv.conf", b"resolv.conf\n"),
                ("pod/serviceaccount/token", b"a-token"),
                ("volumes/settings/mode", b"fast"),
            ]
        );
    }

    #[test]
    fn a_host_directory_or_device_is_refused_by_name() {
        for (mount, reason) in [
            (
                serde_json::json!({"destination": "/data", "type": "bind", "source": "/srv/data"}),
                "/srv/data is a host path",
            ),
            (
                serde_json::json!({"destination": "/data", "type": "bind", "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount"}),
                "host path",
            ),
            (serde_json::json!({"destination": "/mnt", "type": "ext4", "source": "/dev/sda"}), "ext4 mount"),
            (serde_json::json!({"destination": "/x", "type": "bind"}), "without a source"),
        ] {
            let err = guest_mounts(&spec(serde_json::json!({"mounts": [mount]}))).unwrap_err();
            assert!(err.to_string().contains(reason), "{reason}: {err}");
        }
        let missing = spec(serde_json::json!({"mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts"}
        ]}));
        assert!(matches!(guest_mounts(&missing), Err(SpecError::Mount { .. })));
    }

    #[test]
    fn only_this_pods_files_are_copied_and_links_stay_inside_a_volume() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("etc-secret");
        std::fs::write(&secret, "root:x:0:0").unwrap();
        let elsewhere = host.path().join("etc");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("hosts"), "not the pod's").unwrap();
        let mine = host.path().join("pods/uid-a/volumes/kubernetes.io~configmap/settings");
        let theirs = host.path().join("pods/uid-b/volumes/kubernetes.io~secret/token");
        for dir in [&mine, &theirs] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(mine.join("mode"), "fast").unwrap();
        std::os::unix::fs::symlink(&secret, mine.join("shadow")).unwrap();
        std::fs::write(theirs.join("token"), "their token").unwrap();
        let annotations = serde_json::json!({SANDBOX_ID: "sb", SANDBOX_UID: "uid-a"});
        let with = |mount: serde_json::Value| spec(serde_json::json!({"annotations": annotations, "mounts": [mount]}));
        let bind = |destination: &str, source: &Path| serde_json::json!({"destination": destination, "type": "bind", "source": source.display().to_string()});
        // A hostPath file mounted where kubelet's files go.
        for source in [&elsewhere.join("hosts"), &secret] {
            let err = guest_mounts(&with(bind("/etc/hosts", source))).unwrap_err();
            assert!(err.to_string().contains("is not this pod's hosts"), "{err}");
        }
        // Another pod's volume, directly or through a link.
        let link = host.path().join("pods/uid-a/volumes/kubernetes.io~secret/stolen");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        for source in [&theirs, &link] {
            let err = guest_mounts(&with(bind("/data", source))).unwrap_err();
            assert!(err.to_string().contains("is a host path"), "{err}");
        }
        // In this pod's volume, a link out of it is not followed.
        let copied = guest_mounts(&with(bind("/etc/settings", &mine))).unwrap();
        let paths: Vec<&str> = copied.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["volumes/settings/mode"]);
        // Files over the frame's limit, or too many bytes in all.
        std::fs::write(mine.join("big"), vec![b'x'; MAX_FILE as usize + 1]).unwrap();
        assert!(matches!(guest_mounts(&with(bind("/etc/settings", &mine))), Err(SpecError::File { .. })));
    }

    #[test]
    fn an_exec_spec_is_a_process() {
        let process = exec_process(br#"{"args": ["/bin/cat", "/cache/ready"], "env": ["A=1"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": true}"#).unwrap();
        assert_eq!(process.args, ["/bin/cat", "/cache/ready"]);
        assert!(process.terminal && process.seccomp.is_none());
        assert!(exec_process(br#"{"args": 7}"#).is_err());
    }
}
