//! `parma policy gen --pod FILE`: the policy of a Kubernetes workload (a
//! Pod, or the pod template of a Deployment, ReplicaSet, StatefulSet,
//! DaemonSet, Job or CronJob; several in one multi-document file), written
//! back with the policy as the pod's `io.parma.policy` annotation.
//!
//! Every container, init containers included, becomes one policy entry
//! from its image (layers, entrypoint, cmd, env, working dir, user) and its
//! Kubernetes fields: `command`/`args` as kubelet combines them with the
//! image's, `env` (literal values exactly; values the host fills in, from
//! `valueFrom` or with `$(...)` references, by name only), `workingDir`,
//! `securityContext` (user, group, capabilities added and dropped,
//! `allowPrivilegeEscalation: false` as `no_new_privileges`, a read-only
//! root), `tty`, exec probes and lifecycle hooks as the processes that may
//! be exec'd, SIGTERM and SIGKILL for kubelet's stop, and mounts: the files
//! kubelet hands every container (`/etc/hosts`, `/etc/hostname`,
//! `/etc/resolv.conf`, the service account's token unless
//! `automountServiceAccountToken: false`), `emptyDir` volumes as volumes in
//! guest memory, and `configMap`, `secret`, `downwardAPI` and `projected`
//! volumes as files the host copies in (read-only). Variables kubelet adds
//! (`HOSTNAME`, `KUBERNETES_*`, and the service links unless
//! `enableServiceLinks: false`) are allowed by pattern.
//!
//! What a confidential pod cannot have is refused by name rather than
//! dropped: `hostNetwork`, `hostPID`, `hostIPC`, privileged containers,
//! `hostPath` and other volumes whose contents the host serves unverified.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use parma_policy::data::{ExecProcess, MountRule, User};
use serde::Deserialize;
use serde_json::Value;

use crate::policy_gen::{EnvSpec, Knobs, SandboxSpec, Spec};

/// Where `emptyDir` volumes live in the guest (the agent's volumes).
pub const EMPTY_DIRS: &str = "/run/parma/volumes";
/// Where the host copies the files of a `configMap`, `secret`,
/// `downwardAPI` or `projected` volume: one directory per volume.
pub const FILE_VOLUMES: &str = "/run/parma/files/volumes";
/// The signals kubelet's stop sends a container's init: SIGTERM, then SIGKILL.
pub const STOP_SIGNALS: [u32; 2] = [15, 9];
/// A copied file's bind source: any directories of the host's choice (at
/// most three) under `/run/parma/files`, then this name.
fn copied_file(name: &str) -> String {
    format!("/run/parma/files/([A-Za-z0-9_-][A-Za-z0-9._-]*/){{0,3}}{name}")
}

/// The workload kinds whose pod template is `spec.template`.
const TEMPLATED: [&str; 5] = ["Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    containers: Vec<KubeContainer>,
    #[serde(default)]
    init_containers: Vec<KubeContainer>,
    #[serde(default)]
    volumes: Vec<Volume>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    share_process_namespace: Option<bool>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default, rename = "hostPID")]
    host_pid: Option<bool>,
    #[serde(default, rename = "hostIPC")]
    host_ipc: Option<bool>,
    #[serde(default)]
    automount_service_account_token: Option<bool>,
    #[serde(default)]
    enable_service_links: Option<bool>,
    #[serde(default)]
    security_context: Option<PodSecurityContext>,
    #[serde(default)]
    ephemeral_containers: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSecurityContext {
    #[serde(default)]
    run_as_user: Option<u32>,
    #[serde(default)]
    run_as_group: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KubeContainer {
    name: String,
    image: String,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    env_from: Vec<Value>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    security_context: Option<SecurityContext>,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    liveness_probe: Option<Probe>,
    #[serde(default)]
    readiness_probe: Option<Probe>,
    #[serde(default)]
    startup_probe: Option<Probe>,
    #[serde(default)]
    lifecycle: Option<Lifecycle>,
    #[serde(default)]
    tty: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_from: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    #[serde(default)]
    run_as_user: Option<u32>,
    #[serde(default)]
    run_as_group: Option<u32>,
    #[serde(default)]
    privileged: Option<bool>,
    #[serde(default)]
    allow_privilege_escalation: Option<bool>,
    #[serde(default)]
    read_only_root_filesystem: Option<bool>,
    #[serde(default)]
    capabilities: Option<Capabilities>,
}

#[derive(Debug, Default, Deserialize)]
struct Capabilities {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    sub_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: String,
    #[serde(flatten)]
    source: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Probe {
    #[serde(default)]
    exec: Option<ExecAction>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lifecycle {
    #[serde(default)]
    post_start: Option<Probe>,
    #[serde(default)]
    pre_stop: Option<Probe>,
}

#[derive(Debug, Default, Deserialize)]
struct ExecAction {
    #[serde(default)]
    command: Vec<String>,
}

/// What a volume is to the UVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeKind {
    /// A directory in guest memory (`/run/parma/volumes/NAME`).
    EmptyDir,
    /// Files the host copies in ([`FILE_VOLUMES`]`/NAME`), read-only.
    Files,
}

/// The images `--image IMAGE=PATH[#REF]` names: a workload's `image:` to a
/// local OCI layout or `docker save` archive (and the image in it); with a
/// [`Registry`](crate::registry::Registry), any other image is pulled from
/// its registry.
#[derive(Debug, Default)]
pub struct Images {
    local: BTreeMap<String, (PathBuf, Option<String>)>,
    registry: Option<crate::registry::Registry>,
    /// Images pulled in this run (a pod may name one several times).
    pulled: std::sync::Mutex<BTreeMap<String, PathBuf>>,
}

impl Images {
    /// Parse `IMAGE=PATH[#REF]` arguments.
    pub fn parse(arguments: &[String]) -> anyhow::Result<Self> {
        let mut images = BTreeMap::new();
        for argument in arguments {
            let (image, rest) =
                argument.split_once('=').with_context(|| format!("--image {argument:?} is not IMAGE=PATH[#REF]"))?;
            let (path, reference) = match rest.split_once('#') {
                Some((path, reference)) => (path, Some(reference.to_string())),
                None => (rest, None),
            };
            if images.insert(image.to_string(), (PathBuf::from(path), reference)).is_some() {
                bail!("--image {image:?} is given twice");
            }
        }
        Ok(Self { local: images, ..Default::default() })
    }

    /// Pull the images `--image` does not name through `registry`.
    pub fn with_registry(mut self, registry: crate::registry::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    fn get(&self, image: &str) -> anyhow::Result<(PathBuf, Option<String>)> {
        if let Some(local) = self.local.get(image) {
            return Ok(local.clone());
        }
        let Some(registry) = &self.registry else {
            bail!("no --image for {image:?}: give --image {image}=PATH (an OCI layout or a docker save archive)")
        };
        let mut pulled = self.pulled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(layout) = pulled.get(image) {
            return Ok((layout.clone(), None));
        }
        let layout = registry.pull(image).with_context(|| {
            format!("{image:?} (or give --image {image}=PATH, an OCI layout or a docker save archive)")
        })?;
        pulled.insert(image.to_string(), layout.clone());
        Ok((layout, None))
    }
}

/// One workload of the file: its pod template (the value, to annotate) and
/// what it says.
struct Workload<'a> {
    kind: String,
    name: String,
    metadata: &'a mut Value,
    spec: PodSpec,
}

/// The pod template of document `doc`, if it is a workload (other kinds,
/// ConfigMaps and Services included, stay as they are).
fn workload(doc: &mut Value) -> anyhow::Result<Option<Workload<'_>>> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
    let template = match kind.as_str() {
        "Pod" => doc,
        kind if TEMPLATED.contains(&kind) => doc.pointer_mut("/spec/template").context("no spec.template")?,
        "CronJob" => doc.pointer_mut("/spec/jobTemplate/spec/template").context("no spec.jobTemplate.spec.template")?,
        _ => return Ok(None),
    };
    let spec: PodSpec = serde_json::from_value(template.get("spec").cloned().unwrap_or(Value::Null))
        .with_context(|| format!("{kind} {name:?}: not a pod spec"))?;
    let Value::Object(template) = template else { bail!("{kind} {name:?}: the pod template is not a mapping") };
    let metadata = template.entry("metadata").or_insert_with(|| Value::Object(serde_json::Map::new()));
    Ok(Some(Workload { kind, name, metadata, spec }))
}

/// Refuse what a confidential pod cannot have.
fn check(workload: &Workload<'_>) -> anyhow::Result<BTreeMap<String, VolumeKind>> {
    let spec = &workload.spec;
    let what = format!("{} {:?}", workload.kind, workload.name);
    for (field, set) in [("hostNetwork", spec.host_network), ("hostPID", spec.host_pid), ("hostIPC", spec.host_ipc)] {
        if set == Some(true) {
            bail!(
                "{what}: {field} would put the pod in the host's namespaces, outside the UVM: not in a confidential pod"
            );
        }
    }
    if !spec.ephemeral_containers.is_empty() {
        bail!("{what}: ephemeral containers are added at run time; the policy cannot list them");
    }
    if spec.containers.is_empty() {
        bail!("{what}: no containers");
    }
    let mut volumes = BTreeMap::new();
    for volume in &spec.volumes {
        let kind = match volume.source.keys().next().map(String::as_str) {
            Some("emptyDir") => VolumeKind::EmptyDir,
            Some("configMap" | "secret" | "downwardAPI" | "projected") => VolumeKind::Files,
            Some(other) => bail!(
                "{what}: volume {:?} is a {other} volume, whose contents the host serves unverified: not in a \
                 confidential pod (emptyDir, configMap, secret, downwardAPI and projected volumes are)",
                volume.name
            ),
            None => bail!("{what}: volume {:?} has no source", volume.name),
        };
        volumes.insert(volume.name.clone(), kind);
    }
    Ok(volumes)
}

/// A shell-free quote of an RE2 literal.
fn re2_literal(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The capabilities containerd's CRI gives a container whose security
/// context changes none (containerd 1.6's `DefaultCapabilities`; no
/// inheritable set). Wider than `parma run`'s defaults by `CAP_MKNOD` and
/// `CAP_NET_RAW`: a pod that does not want them drops them in its
/// `securityContext`, and the policy follows.
pub const CRI_DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// [`CRI_DEFAULT_CAPABILITIES`] bounding, effective and permitted.
pub fn cri_default_capabilities() -> parma_protocol::CapabilitySets {
    crate::policy_gen::capability_sets(CRI_DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect())
}

/// The policy spec of one container.
fn container_spec(
    container: &KubeContainer,
    pod: &PodSpec,
    volumes: &BTreeMap<String, VolumeKind>,
    built: &parma_layer::Built,
    hostname: &str,
) -> anyhow::Result<Spec> {
    let what = format!("container {:?}", container.name);
    let context = container.security_context.as_ref();
    if context.and_then(|c| c.privileged) == Some(true) {
        bail!("{what}: privileged containers reach the guest's devices and kernel: not in a confidential pod");
    }
    if !container.env_from.is_empty() {
        bail!("{what}: envFrom names variables the policy cannot know; list them under env");
    }
    // kubelet: command replaces the entrypoint (and drops the image's cmd),
    // args replace the cmd.
    let config = &built.config;
    let command = match (&container.command, &container.args) {
        (Some(command), Some(args)) => [command.clone(), args.clone()].concat(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => [config.entrypoint.clone(), args.clone()].concat(),
        (None, None) => [config.entrypoint.clone(), config.cmd.clone()].concat(),
    };
    let mut env = Vec::new();
    for var in &container.env {
        let literal = var.value.as_deref().filter(|value| !value.contains("$(") && var.value_from.is_none());
        env.push(match literal {
            Some(value) => EnvSpec::Exact(format!("{}={value}", var.name)),
            None => EnvSpec::Rule(parma_policy::data::EnvRule {
                pattern: format!("{}=.*", re2_literal(&var.name)),
                strategy: parma_policy::data::Strategy::Re2,
                required: false,
            }),
        });
    }
    let pattern = |pattern: String| {
        EnvSpec::Rule(parma_policy::data::EnvRule {
            pattern,
            strategy: parma_policy::data::Strategy::Re2,
            required: false,
        })
    };
    env.push(pattern(format!("HOSTNAME={hostname}")));
    env.push(pattern(
        "KUBERNETES_(SERVICE_HOST|SERVICE_PORT(_HTTPS)?|PORT(_443_TCP(_PROTO|_PORT|_ADDR)?)?)=[a-z0-9.:/]*".into(),
    ));
    if pod.enable_service_links != Some(false) {
        env.push(pattern(
            "[A-Z_][A-Z0-9_]*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)=[a-z0-9.:/]*"
                .into(),
        ));
    }
    if container.tty {
        env.push(EnvSpec::Exact("TERM=xterm".into()));
    }
    let bind = |destination: &str, source: String, read_only: bool| MountRule {
        destination: destination.to_string(),
        kind: "bind".into(),
        source,
        options: vec!["rbind".into(), if read_only { "ro" } else { "rw" }.into()],
        // Every mount the pod's spec gives is one the workload relies on.
        required: true,
    };
    let mut mounts = vec![
        bind("/etc/hosts", copied_file("hosts"), true),
        bind("/etc/hostname", copied_file("hostname"), true),
        bind("/etc/resolv.conf", copied_file("resolv\\.conf"), true),
    ];
    if pod.automount_service_account_token != Some(false) {
        mounts.push(bind("/var/run/secrets/kubernetes.io/serviceaccount", copied_file("serviceaccount"), true));
    }
    for mount in &container.volume_mounts {
        if mount.sub_path.is_some() {
            bail!("{what}: volume mount {:?} has a subPath, which the UVM does not bind", mount.mount_path);
        }
        let source = match volumes.get(&mount.name) {
            Some(VolumeKind::EmptyDir) => {
                format!("{EMPTY_DIRS}/{}", re2_literal(&mount.name))
            }
            Some(VolumeKind::Files) => format!("{FILE_VOLUMES}/{}", re2_literal(&mount.name)),
            None => bail!("{what}: volume mount {:?} names no volume {:?}", mount.mount_path, mount.name),
        };
        let read_only = mount.read_only || volumes.get(&mount.name) == Some(&VolumeKind::Files);
        mounts.push(bind(&mount.mount_path, source, read_only));
    }
    let mut exec_processes = Vec::new();
    let probes = [&container.liveness_probe, &container.readiness_probe, &container.startup_probe];
    let hooks = container.lifecycle.iter().flat_map(|l| [&l.post_start, &l.pre_stop]);
    for probe in probes.into_iter().chain(hooks).flatten() {
        if let Some(exec) = &probe.exec
            && !exec.command.is_empty()
            && !exec_processes.iter().any(|p: &ExecProcess| p.command == exec.command)
        {
            exec_processes.push(ExecProcess { command: exec.command.clone(), signals: Vec::new(), terminal: false });
        }
    }
    let uid = context.and_then(|c| c.run_as_user).or(pod.security_context.as_ref().and_then(|c| c.run_as_user));
    let gid = context.and_then(|c| c.run_as_group).or(pod.security_context.as_ref().and_then(|c| c.run_as_group));
    let user = match (uid, gid) {
        (None, None) => None,
        (uid, gid) => {
            // What the image says fills in what the pod does not.
            let image = crate::policy_gen::user_of(&config.user);
            Some(User { uid: uid.or(image.uid), gid: gid.or(image.gid).or(Some(0)), name: None })
        }
    };
    let capabilities =
        Some(context.and_then(|c| c.capabilities.as_ref()).map_or_else(cri_default_capabilities, |caps| {
            let name = |cap: &String| if cap.starts_with("CAP_") { cap.clone() } else { format!("CAP_{cap}") };
            let drop: Vec<String> = caps.drop.iter().map(name).collect();
            let mut set: Vec<String> = if drop.iter().any(|cap| cap == "CAP_ALL") {
                Vec::new()
            } else {
                CRI_DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).filter(|c| !drop.contains(c)).collect()
            };
            for cap in caps.add.iter().map(name) {
                if !set.contains(&cap) {
                    set.push(cap);
                }
            }
            set.sort();
            crate::policy_gen::capability_sets(set)
        }));
    Ok(Spec {
        name: Some(container.name.clone()),
        command: Some(command),
        env,
        working_dir: container.working_dir.clone(),
        user,
        capabilities,
        mounts,
        exec_processes,
        signals: STOP_SIGNALS.to_vec(),
        no_new_privileges: context.and_then(|c| c.allow_privilege_escalation) == Some(false),
        terminal: container.tty,
        readonly_rootfs: context.and_then(|c| c.read_only_root_filesystem) == Some(true),
        ..Spec::default()
    })
}

/// The policy of one workload.
fn workload_policy(
    workload: &Workload<'_>,
    volumes: &BTreeMap<String, VolumeKind>,
    images: &Images,
    layers_dir: &Path,
) -> anyhow::Result<String> {
    let spec = &workload.spec;
    // A pod's host name: its own, else (a Pod) its name; a template's pods
    // get generated names.
    let hostname = match (&spec.hostname, workload.kind.as_str()) {
        (Some(hostname), _) => re2_literal(hostname),
        (None, "Pod") if !workload.name.is_empty() => re2_literal(&workload.name),
        _ => crate::policy_gen::RFC1123_HOSTNAME.to_string(),
    };
    let what = format!("{} {:?}", workload.kind, workload.name);
    let (brokers, mut secrets) = secret_annotations(workload.metadata, &what)?;
    if !secrets.is_empty() && spec.share_process_namespace == Some(true) {
        bail!(
            "{what}: shareProcessNamespace lets the pod's containers read each other's files through /proc/PID/root, \
             so no container of it may receive a secret (annotation {SECRETS_ANNOTATION})"
        );
    }
    let mut entries = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for container in spec.init_containers.iter().chain(&spec.containers) {
        if !names.insert(container.name.clone()) {
            bail!("{} {:?}: two containers are named {:?}", workload.kind, workload.name, container.name);
        }
        let (oci, reference) = images.get(&container.image)?;
        let oci = oci.as_path();
        let built = parma_layer::build(oci, reference.as_deref(), layers_dir, &|_| {})
            .with_context(|| format!("cannot build the layers of {} ({})", container.image, oci.display()))?;
        let mut container_spec = container_spec(container, spec, volumes, &built, &hostname)?;
        container_spec.secrets = secrets.remove(&container.name).unwrap_or_default();
        let resolved = if container_spec.user.is_none() && crate::user::needs_files(&built.config.user) {
            Some(crate::user::image_user(oci, reference.as_deref(), &built.config.user)?)
        } else {
            None
        };
        let mut entry = crate::policy_gen::container_for(&built, &container_spec, resolved.as_ref());
        crate::policy_gen::with_primary_group(&mut entry);
        entries.push(serde_json::to_value(entry)?);
    }
    if let Some(name) = secrets.keys().next() {
        bail!("{what}: annotation {SECRETS_ANNOTATION} names container {name:?}, which the pod does not have");
    }
    let mut copy_files: Vec<String> = crate::policy_gen::DEFAULT_COPY_FILES.map(String::from).to_vec();
    for (name, kind) in volumes {
        if *kind == VolumeKind::Files {
            copy_files.push(format!("{FILE_VOLUMES}/{}/[A-Za-z0-9_.-]+", re2_literal(name)));
        }
    }
    let knobs = Knobs {
        // kubelet reads every container's resource use (its stats, `kubectl
        // top`, evictions): CPU time, memory, pids, no contents.
        properties_access: true,
        scratch_swap: false,
        sandbox: SandboxSpec { hostname, share_pid: spec.share_process_namespace == Some(true) },
        network: None,
        copy_files: Some(copy_files),
        brokers,
    };
    let source = format!("{} {}", workload.kind, workload.name);
    let text = crate::policy_gen::rego_with_fragments(&entries, &[], &knobs, &source)?;
    parma_policy::Engine::new(&parma_policy::Policy::from_bytes(text.clone().into_bytes())?)
        .context("the generated policy does not load")?;
    Ok(text)
}

/// The pod annotation listing the key brokers its containers' secrets come
/// from: JSON, `[{"name", "url", "certificate_sha256"}]` (as `--spec`'s `brokers`).
pub const BROKERS_ANNOTATION: &str = "io.parma.brokers";
/// The pod annotation listing its containers' secrets: JSON, by container
/// name, `{"CONTAINER": [{"broker", "resource", "file"}]}` (each list as
/// `--spec`'s `secrets`). One annotation, so no name is too long for a key.
/// The runtime asks for each secret before its container starts.
pub const SECRETS_ANNOTATION: &str = "io.parma.secrets";

/// Secrets by container name, from the pod's annotations.
type SecretsByContainer = BTreeMap<String, Vec<parma_policy::data::SecretRule>>;

/// The brokers and each container's secrets from the pod template's
/// annotations; every secret's broker must be listed.
fn secret_annotations(
    metadata: &Value,
    what: &str,
) -> anyhow::Result<(Vec<parma_policy::data::Broker>, SecretsByContainer)> {
    let annotation = |key: &str| -> anyhow::Result<Option<String>> {
        match metadata.get("annotations").and_then(|all| all.get(key)) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => bail!("{what}: annotation {key} is not a string"),
        }
    };
    let brokers: Vec<parma_policy::data::Broker> = match annotation(BROKERS_ANNOTATION)? {
        None => Vec::new(),
        Some(text) => serde_json::from_str(&text).with_context(|| {
            format!("{what}: annotation {BROKERS_ANNOTATION} is not a JSON list of {{\"name\", \"url\", \"certificate_sha256\"}}")
        })?,
    };
    let secrets: SecretsByContainer = match annotation(SECRETS_ANNOTATION)? {
        None => SecretsByContainer::new(),
        Some(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{what}: annotation {SECRETS_ANNOTATION} is not a JSON object of container names to lists of \
                 {{\"broker\", \"resource\", \"file\"}}"
            )
        })?,
    };
    for (container, listed) in &secrets {
        if let Some(secret) = listed.iter().find(|secret| !brokers.iter().any(|broker| broker.name == secret.broker)) {
            bail!(
                "{what}: container {container:?} has a secret from broker {:?}, which annotation {BROKERS_ANNOTATION} \
                 does not list",
                secret.broker
            );
        }
    }
    crate::policy_gen::check_brokers(&brokers, &[])
        .with_context(|| format!("{what}: annotation {BROKERS_ANNOTATION}"))?;
    for (container, listed) in &secrets {
        crate::policy_gen::check_brokers(&brokers, listed)
            .with_context(|| format!("{what}: annotation {SECRETS_ANNOTATION}, container {container:?}"))?;
    }
    Ok((brokers, secrets))
}

/// One workload's policy, as `generate_pod` made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    /// `KIND NAME`.
    pub workload: String,
    /// The policy (Rego).
    pub policy: String,
}

/// The policies of every workload in `yaml` (a multi-document file), and
/// the file written back (as YAML) with each pod template annotated.
pub fn generate_pod(yaml: &str, images: &Images, layers_dir: &Path) -> anyhow::Result<(Vec<PodPolicy>, String)> {
    let mut docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("not a YAML file")?;
    docs.retain(|doc| !doc.is_null());
    let mut policies = Vec::new();
    for doc in &mut docs {
        let Some(workload) = workload(doc)? else { continue };
        let volumes = check(&workload)?;
        let policy = workload_policy(&workload, &volumes, images, layers_dir)?;
        let Value::Object(metadata) = workload.metadata else { bail!("metadata is not a mapping") };
        let annotations = metadata.entry("annotations").or_insert_with(|| Value::Object(serde_json::Map::new()));
        let Value::Object(annotations) = annotations else { bail!("metadata.annotations is not a mapping") };
        annotations.insert(
            crate::annotation::POLICY_ANNOTATION.to_string(),
            Value::String(crate::annotation::encode(&policy)),
        );
        policies.push(PodPolicy { workload: format!("{} {}", workload.kind, workload.name), policy });
    }
    if policies.is_empty() {
        bail!("no Pod, Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or CronJob in the file");
    }
    let written = serde_saphyr::to_string_multiple(&docs).context("cannot write the YAML back")?;
    Ok((policies, written))
}
