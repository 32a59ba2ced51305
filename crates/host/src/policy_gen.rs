//! `parma policy gen`: a policy from a container image and an optional
//! small container spec, like `az confcom acipolicygen` and Kata's
//! `genpolicy`. Without a spec it allows exactly what the image config
//! says: its entrypoint and cmd, its env, working dir and user, the layers'
//! dm-verity root hashes in order, and the default capability set.

use std::path::Path;

use anyhow::Context;
use parma_policy::Point;
use parma_policy::data::{Container, EnvRule, ExecProcess, MountRule, Strategy, User};
use parma_protocol::{CapabilitySets, Rlimit};
use serde::Deserialize;
use serde_json::Value;

use crate::user::ResolvedUser;

/// The capabilities an unprivileged container gets by default: the OCI
/// runtime defaults of containerd and Docker without `CAP_MKNOD` (a device
/// node made in a container opens nothing in the UVM anyway: every mount
/// of a container is `nodev`) and without `CAP_NET_RAW` (as containerd 2
/// drops it: raw IP sockets would let a container forge and read traffic
/// of the pod's other containers; `ping` works without it, the pod's
/// `ping_group_range` allows every group).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// An env rule in a spec: `NAME=value` exactly, or a rule as the policy has it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EnvSpec {
    /// Exactly this `NAME=value`.
    Exact(String),
    /// A rule as the framework takes it (`pattern`, `strategy` string or re2, `required`).
    Rule(EnvRule),
}

impl EnvSpec {
    fn rule(&self) -> EnvRule {
        match self {
            EnvSpec::Exact(var) => exact(var),
            EnvSpec::Rule(rule) => rule.clone(),
        }
    }
}

fn exact(var: &str) -> EnvRule {
    EnvRule { pattern: var.to_string(), strategy: Strategy::String, required: false }
}

/// The optional container spec: everything the image config does not say,
/// or says differently.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The container's name in the policy (default `container`).
    #[serde(default)]
    pub name: Option<String>,
    /// Whose defaults fill what the spec leaves out: `parma` (`parma run`,
    /// the default) or `containerd` (`ctr run` through the parma shim:
    /// containerd's capabilities, masked paths and open-files limit, the
    /// primary group among the supplementary ones).
    #[serde(default)]
    pub runtime: Runtime,
    /// The command and arguments (default: entrypoint + cmd).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Env rules, added to the image's own variables.
    #[serde(default)]
    pub env: Vec<EnvSpec>,
    /// The working dir (default: the image's, else `/`).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The user (default: from the image's `User`).
    #[serde(default)]
    pub user: Option<User>,
    /// Capability sets (default: the OCI defaults).
    #[serde(default)]
    pub capabilities: Option<CapabilitySets>,
    /// Mount rules.
    #[serde(default)]
    pub mounts: Vec<MountRule>,
    /// Processes that may be exec'd in the container.
    #[serde(default)]
    pub exec_processes: Vec<ExecProcess>,
    /// Signals the container's init process may get.
    #[serde(default)]
    pub signals: Vec<u32>,
    /// Require no_new_privileges.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// Allow privileged containers.
    #[serde(default)]
    pub allow_elevated: bool,
    /// sha256 of the OCI seccomp profile the container must run under (none: no profile).
    #[serde(default)]
    pub seccomp_profile_sha256: Option<String>,
    /// May the host read the container's output and write its input
    /// (default yes)? Without it the processes' stdio is `/dev/null`.
    #[serde(default)]
    pub allow_stdio_access: Option<bool>,
    /// May the container's process run on a terminal (whoever writes its
    /// input can then send it SIGINT, SIGQUIT and SIGTSTP)?
    #[serde(default)]
    pub terminal: bool,
    /// Resource limits the host may set, `{"type": "RLIMIT_NOFILE", "soft", "hard"}`:
    /// at most these values.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// May the host change the container's cgroup limits once it exists?
    #[serde(default)]
    pub allow_resource_updates: bool,
    /// Secrets it receives from a key broker before it starts:
    /// `[{"broker": NAME, "resource": "REPO/TYPE/TAG", "file": NAME}]`.
    #[serde(default)]
    pub secrets: Vec<parma_policy::data::SecretRule>,
    /// Does the container get an attestation endpoint
    /// (`/dev/parma/attestation.sock`) for reports binding its own data?
    #[serde(default)]
    pub allow_attestation: bool,
    /// Must the container's root be read-only?
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// Supplementary groups (default: the image user's, as resolved from
    /// its /etc/group; none for a numeric user).
    #[serde(default)]
    pub groups: Option<Vec<u32>>,
    /// Paths the container must see empty (default: runc's).
    #[serde(default)]
    pub masked_paths: Option<Vec<String>>,
    /// Paths the container must see read-only (default: runc's).
    #[serde(default)]
    pub readonly_paths: Option<Vec<String>>,
    /// Policy-wide: may the host read the guest's and the containers'
    /// resource use (`GuestInfo`, `ContainerStats`: containerd's `Stats`)?
    #[serde(default)]
    pub allow_properties_access: bool,
    /// Policy-wide: may the host add swap on a disk of its own (encrypted
    /// and authenticated, but without freshness: it can replay old blocks)?
    #[serde(default)]
    pub allow_scratch_swap: bool,
    /// Issuers that may add containers to the policy later:
    /// `{"issuer": sha256 of the key (parma policy issuer), "feed", "minimum_svn"}`.
    #[serde(default)]
    pub fragments: Vec<FragmentSpec>,
    /// Policy-wide: the pod the UVM may become (`CreateSandbox`); default:
    /// any RFC 1123 host name (as Kubernetes allows), no shared PID namespace.
    #[serde(default)]
    pub sandbox: SandboxSpec,
    /// Policy-wide: narrow the pod's network (`{"allowed_cidrs": [...],
    /// "mtu": {"min", "max"}}`); absent: only the framework's refusals.
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// Policy-wide: the key brokers secrets may come from,
    /// `[{"name", "url": "https://HOST[:PORT]", "certificate_sha256"}]`.
    #[serde(default)]
    pub brokers: Vec<parma_policy::data::Broker>,
    /// Policy-wide: RE2 patterns of the guest paths `CopyFile` may write
    /// (default [`DEFAULT_COPY_FILES`]: what Kubernetes hands every
    /// container; `[]`: none).
    #[serde(default)]
    pub copy_files: Option<Vec<String>>,
}

/// Whose defaults a [`Spec`] leaves to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// `parma run`'s.
    #[default]
    Parma,
    /// containerd 1.6's default spec (`ctr run`).
    Containerd,
}

/// The paths containerd 1.6's default spec masks (`ctr run`; runc's newer
/// defaults add `/proc/interrupts` and `/sys/devices/virtual/powercap`).
pub const CONTAINERD_MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// The open-files limit containerd's default spec sets (soft and hard).
pub const CONTAINERD_NOFILE: u64 = 1024;

/// containerd (1.6.18 and later, the fix for CVE-2023-25173), through CRI
/// or `ctr`, lists a process's primary group among its supplementary ones.
pub fn with_primary_group(container: &mut Container) {
    if let (Some(gid), Some(groups)) = (container.user.gid, container.groups.as_mut())
        && !groups.contains(&gid)
    {
        groups.insert(0, gid);
    }
}

/// The files Kubernetes hands every container, under `/run/parma/files/`
/// (at most three directories deep): hosts, hostname, resolv.conf, the
/// termination log, a service account's token, CA and namespace.
pub const DEFAULT_COPY_FILES: [&str; 2] = [
    "/run/parma/files/([A-Za-z0-9_-][A-Za-z0-9._-]*/){0,3}(hosts|hostname|resolv\\.conf|termination-log)",
    "/run/parma/files/([A-Za-z0-9_-][A-Za-z0-9._-]*/){0,3}serviceaccount/(token|ca\\.crt|namespace)",
];

/// The `network` rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Every address, gateway, source and neighbour must be inside one of these CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_cidrs: Option<Vec<String>>,
    /// MTU bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<MtuBounds>,
}

/// Inclusive MTU bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtuBounds {
    /// Lowest.
    pub min: u32,
    /// Highest.
    pub max: u32,
}

/// The `sandbox` rule: what `CreateSandbox` may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// An RE2 pattern the pod's host name must match in full (default:
    /// [`RFC1123_HOSTNAME`]).
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// May the pod's containers share one PID namespace?
    #[serde(default)]
    pub share_pid: bool,
}

/// Host names as Kubernetes allows them: RFC 1123 subdomains.
pub const RFC1123_HOSTNAME: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

fn default_hostname() -> String {
    RFC1123_HOSTNAME.to_string()
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self { hostname: default_hostname(), share_pid: false }
    }
}

/// One issuer and feed a policy takes fragments from.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FragmentSpec {
    /// sha256 of the issuer's ECDSA P-384 public key (SPKI DER), lowercase hex.
    pub issuer: String,
    /// The feed.
    pub feed: String,
    /// The lowest SVN accepted.
    #[serde(default)]
    pub minimum_svn: u64,
}

/// The image's `User` as a policy user: `uid[:gid]` numbers, or a name.
/// A numeric user without a group runs with gid 0 (as `parma run` starts
/// it), and the policy says so: an unpinned gid would let the host pick any.
pub(crate) fn user_of(user: &str) -> User {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = if u.is_empty() { Some(0) } else { u.parse().ok() };
    let name = if uid.is_none() { Some(u.to_string()) } else { None };
    let gid = match g.parse() {
        Ok(gid) => Some(gid),
        Err(_) if g.is_empty() && uid.is_some() => Some(0),
        Err(_) => None,
    };
    User { uid, gid, name }
}

/// The default capability sets: [`DEFAULT_CAPABILITIES`] bounding,
/// effective and permitted.
pub fn default_capabilities() -> CapabilitySets {
    capability_sets(DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect())
}

/// `caps` as the bounding, effective and permitted sets (none inheritable
/// or ambient): what runc, CRI and `parma run` give a process.
pub fn capability_sets(caps: Vec<String>) -> CapabilitySets {
    CapabilitySets {
        bounding: caps.clone(),
        effective: caps.clone(),
        permitted: caps,
        inheritable: Vec::new(),
        ambient: Vec::new(),
    }
}

/// The container entry of the policy, from the built layers and the spec
/// (the image's `User` numeric, or a name left for the policy to match).
pub fn container(built: &parma_layer::Built, spec: &Spec) -> Container {
    container_for(built, spec, None)
}

/// [`container`], with the image's `User` resolved from its files
/// ([`crate::user::image_user`]): the policy pins its uid, gid and groups.
pub fn container_for(built: &parma_layer::Built, spec: &Spec, resolved: Option<&ResolvedUser>) -> Container {
    let config = &built.config;
    let image_user = match resolved {
        Some(user) => User { uid: Some(user.uid), gid: Some(user.gid), name: None },
        None => user_of(&config.user),
    };
    let image_groups = resolved.map(|user| user.groups.clone()).unwrap_or_default();
    let env_rules = config.env.iter().map(|var| exact(var)).chain(spec.env.iter().map(EnvSpec::rule)).collect();
    let working_dir = spec
        .working_dir
        .clone()
        .unwrap_or_else(|| if config.working_dir.is_empty() { "/".to_string() } else { config.working_dir.clone() });
    let containerd = spec.runtime == Runtime::Containerd;
    let capabilities = match &spec.capabilities {
        Some(sets) => sets.clone(),
        None if containerd => crate::kube::cri_default_capabilities(),
        None => default_capabilities(),
    };
    let rlimits = if spec.rlimits.is_empty() && containerd {
        vec![Rlimit { kind: "RLIMIT_NOFILE".into(), soft: CONTAINERD_NOFILE, hard: CONTAINERD_NOFILE }]
    } else {
        spec.rlimits.clone()
    };
    let masked_paths = match &spec.masked_paths {
        None if containerd => Some(CONTAINERD_MASKED_PATHS.map(String::from).to_vec()),
        paths => paths.clone(),
    };
    let mut entry = Container {
        name: spec.name.clone().unwrap_or_else(|| "container".into()),
        layers: built.layers.layers.iter().map(|l| l.root_hash.clone()).collect(),
        command: spec.command.clone().unwrap_or_else(|| [config.entrypoint.clone(), config.cmd.clone()].concat()),
        env_rules,
        working_dir,
        user: spec.user.clone().unwrap_or(image_user),
        capabilities,
        no_new_privileges: spec.no_new_privileges,
        seccomp_profile_sha256: spec.seccomp_profile_sha256.clone().unwrap_or_default(),
        allow_elevated: spec.allow_elevated,
        mounts: spec.mounts.clone(),
        exec_processes: spec.exec_processes.clone(),
        signals: spec.signals.clone(),
        allow_stdio_access: spec.allow_stdio_access.unwrap_or(true),
        terminal: spec.terminal,
        rlimits,
        allow_resource_updates: spec.allow_resource_updates,
        allow_attestation: spec.allow_attestation,
        secrets: spec.secrets.clone(),
        readonly_rootfs: spec.readonly_rootfs,
        groups: Some(spec.groups.clone().unwrap_or(image_groups)),
        // Absent: the framework requires runc's defaults.
        masked_paths,
        readonly_paths: spec.readonly_paths.clone(),
    };
    if containerd && spec.groups.is_none() {
        with_primary_group(&mut entry);
    }
    entry
}

/// The policy's Rego text for these containers: data, knobs all off, every
/// enforcement point bound to the framework.
pub fn rego(containers: &[Value], source: &str) -> anyhow::Result<String> {
    rego_with_fragments(containers, &[], &Knobs::default(), source)
}

/// The policy-wide knobs a spec may turn on (all off by default) and the pod's rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knobs {
    /// `allow_properties_access`: the guest's and the containers' resource
    /// use (`GuestInfo`, `ContainerStats`) once the policy is in force.
    pub properties_access: bool,
    /// `allow_scratch_swap`.
    pub scratch_swap: bool,
    /// `sandbox`.
    pub sandbox: SandboxSpec,
    /// `network`, when given.
    pub network: Option<NetworkSpec>,
    /// `copy_files` (none: [`DEFAULT_COPY_FILES`]).
    pub copy_files: Option<Vec<String>>,
    /// `brokers` (none: no secret can be released).
    pub brokers: Vec<parma_policy::data::Broker>,
}

/// Refuse brokers and secrets the agent would refuse: each broker's URL is
/// `https://HOST[:PORT]` as the agent reads it, its pin 64 lowercase hex
/// digits, its name given once; each secret comes from a listed broker, its
/// resource is `REPO/TYPE/TAG` and its file a plain name.
pub fn check_brokers(
    brokers: &[parma_policy::data::Broker],
    secrets: &[parma_policy::data::SecretRule],
) -> anyhow::Result<()> {
    for (index, broker) in brokers.iter().enumerate() {
        parma_kbs::url::parse(&broker.url).map_err(|reason| anyhow::anyhow!("broker {:?}: {reason}", broker.name))?;
        let pin = &broker.certificate_sha256;
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            anyhow::bail!("broker {:?}: its certificate_sha256 is not 64 lowercase hex digits", broker.name);
        }
        if brokers.iter().take(index).any(|earlier| earlier.name == broker.name) {
            anyhow::bail!("two brokers are named {:?}", broker.name);
        }
    }
    for secret in secrets {
        if !brokers.iter().any(|broker| broker.name == secret.broker) {
            anyhow::bail!("a secret comes from broker {:?}, which the policy's brokers do not list", secret.broker);
        }
        parma_kbs::check_resource(&secret.resource).map_err(anyhow::Error::msg)?;
        parma_kbs::check_secret_file(&secret.file).map_err(|err| anyhow::anyhow!("{err}: {:?}", secret.file))?;
    }
    Ok(())
}

/// [`rego`], taking fragments from these issuers and feeds, with these knobs.
pub fn rego_with_fragments(
    containers: &[Value],
    fragments: &[FragmentSpec],
    knobs: &Knobs,
    source: &str,
) -> anyhow::Result<String> {
    let mut out = String::new();
    out.push_str(&format!("# Generated by parma policy gen from {source}.\n"));
    out.push_str("package policy\n\nimport rego.v1\n\napi_version := \"0.1.0\"\n\nframework_version := \"0.1.0\"\n\n");
    // The containers as JSON in a raw string: regorus parses a large Rego
    // literal about 80 times slower than json.unmarshal reads the same data
    // (100 containers: 80 ms against 1 ms of the policy's load). A backtick
    // in the data (it cannot be in a raw string) falls back to the literal.
    let json = serde_json::to_string_pretty(containers)?;
    if json.contains('`') {
        out.push_str(&format!("containers := {json}\n\n"));
    } else {
        out.push_str(&format!("containers := json.unmarshal(`{json}`)\n\n"));
    }
    out.push_str("external_processes := []\n\n");
    for (knob, value) in [
        ("allow_properties_access", knobs.properties_access),
        ("allow_runtime_logging", false),
        ("allow_unencrypted_scratch", false),
        ("allow_scratch_swap", knobs.scratch_swap),
        ("allow_capability_dropping", false),
    ] {
        out.push_str(&format!("{knob} := {value}\n\n"));
    }
    // Fragments: list {"issuer": sha256 of the key (parma policy issuer),
    // "feed": "...", "minimum_svn": N} here to let an issuer add containers.
    out.push_str(&format!("fragments := {}\n\n", serde_json::to_string_pretty(fragments)?));
    out.push_str(&format!("sandbox := {}\n\n", serde_json::to_string_pretty(&knobs.sandbox)?));
    let copy_files = knobs.copy_files.clone().unwrap_or_else(|| DEFAULT_COPY_FILES.map(String::from).to_vec());
    out.push_str(&format!("copy_files := {}\n\n", serde_json::to_string_pretty(&copy_files)?));
    if let Some(network) = &knobs.network {
        out.push_str(&format!("network := {}\n\n", serde_json::to_string_pretty(network)?));
    }
    if !knobs.brokers.is_empty() {
        out.push_str(&format!("brokers := {}\n\n", serde_json::to_string_pretty(&knobs.brokers)?));
    }
    for point in Point::ALL {
        out.push_str(&format!("{0} := data.framework.{0}\n\n", point.rule()));
    }
    Ok(out.trim_end().to_string() + "\n")
}

/// Build the image's layers into `layers_dir`, then write the policy.
pub fn generate(oci: &Path, reference: Option<&str>, spec: Option<&Path>, layers_dir: &Path) -> anyhow::Result<String> {
    let spec: Spec = match spec {
        None => Spec::default(),
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a valid container spec", path.display()))?
        }
    };
    let built = parma_layer::build(oci, reference, layers_dir, &|_| {})
        .with_context(|| format!("cannot build the layers of {}", oci.display()))?;
    for fragment in &spec.fragments {
        if fragment.issuer.len() != 64
            || !fragment.issuer.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            anyhow::bail!(
                "fragment issuer {:?} is not a sha256 in lowercase hex (parma policy issuer KEY)",
                fragment.issuer
            );
        }
    }
    check_brokers(&spec.brokers, &spec.secrets)?;
    let knobs = Knobs {
        properties_access: spec.allow_properties_access,
        scratch_swap: spec.allow_scratch_swap,
        sandbox: spec.sandbox.clone(),
        network: spec.network.clone(),
        copy_files: spec.copy_files.clone(),
        brokers: spec.brokers.clone(),
    };
    // A user by name: its numbers from the image's own /etc/passwd and /etc/group.
    let resolved = if spec.user.is_none() && crate::user::needs_files(&built.config.user) {
        Some(crate::user::image_user(oci, reference, &built.config.user)?)
    } else {
        None
    };
    let entry = serde_json::to_value(container_for(&built, &spec, resolved.as_ref()))?;
    let text = rego_with_fragments(&[entry], &spec.fragments, &knobs, &oci.display().to_string())?;
    // The policy must load: a generator that writes a broken policy is a bug.
    parma_policy::Engine::new(&parma_policy::Policy::from_bytes(text.clone().into_bytes())?)
        .context("the generated policy does not load")?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        let user = |uid, gid, name: Option<&str>| User { uid, gid, name: name.map(str::to_string) };
        assert_eq!(user_of(""), user(Some(0), Some(0), None));
        assert_eq!(user_of("1000"), user(Some(1000), Some(0), None));
        assert_eq!(user_of("1000:1001"), user(Some(1000), Some(1001), None));
        assert_eq!(user_of("nginx"), user(None, None, Some("nginx")));
    }

    #[test]
    fn spec_env_forms() {
        let spec: Spec = serde_json::from_str(
            r#"{"env": ["A=1", {"pattern": "B=[0-9]+", "strategy": "re2", "required": true}], "signals": [15]}"#,
        )
        .unwrap();
        assert_eq!(spec.env.len(), 2);
        assert_eq!(spec.env[1].rule(), EnvRule { pattern: "B=[0-9]+".into(), strategy: Strategy::Re2, required: true });
        assert!(serde_json::from_str::<Spec>(r#"{"comand": ["x"]}"#).is_err(), "typos are refused");
    }

    #[test]
    fn containerds_defaults_for_ctr_run() {
        let built = parma_layer::Built {
            layers: serde_json::from_value(
                serde_json::json!({"config_digest": format!("sha256:{}", "0".repeat(64)), "layers": []}),
            )
            .unwrap(),
            config: parma_layer::ImageConfig { user: "1000:1001".into(), ..Default::default() },
            layers_json: "layers.json".into(),
            config_json: "config.json".into(),
        };
        let parma = container(&built, &serde_json::from_str(r#"{}"#).unwrap());
        assert_eq!(parma.capabilities, default_capabilities());
        assert!(parma.rlimits.is_empty() && parma.masked_paths.is_none());
        assert_eq!(parma.groups, Some(vec![]));
        let ctr = container(&built, &serde_json::from_str(r#"{"runtime": "containerd"}"#).unwrap());
        assert_eq!(ctr.capabilities, crate::kube::cri_default_capabilities());
        assert_eq!(ctr.rlimits, vec![Rlimit { kind: "RLIMIT_NOFILE".into(), soft: 1024, hard: 1024 }]);
        assert_eq!(ctr.masked_paths.as_deref().map(<[String]>::len), Some(CONTAINERD_MASKED_PATHS.len()));
        assert_eq!(ctr.groups, Some(vec![1001]), "the primary group, as containerd lists it");
        // What the spec says wins.
        let narrowed: Spec =
            serde_json::from_str(r#"{"runtime": "containerd", "groups": [], "masked_paths": ["/proc/kcore"], "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 64}]}"#)
                .unwrap();
        let ctr = container(&built, &narrowed);
        assert_eq!(ctr.groups, Some(vec![]));
        assert_eq!(ctr.masked_paths, Some(vec!["/proc/kcore".to_string()]));
        assert_eq!(ctr.rlimits[0].soft, 64);
        assert!(serde_json::from_str::<Spec>(r#"{"runtime": "docker"}"#).is_err());
    }

    #[test]
    fn the_pod_rules_of_a_spec_reach_the_policy() {
        let spec: Spec = serde_json::from_str(
            r#"{"sandbox": {"share_pid": true}, "network": {"allowed_cidrs": ["10.0.0.0/8"], "mtu": {"min": 1280, "max": 1500}}}"#,
        )
        .unwrap();
        assert_eq!(spec.sandbox.hostname, RFC1123_HOSTNAME, "the host name pattern defaults");
        let knobs = Knobs { sandbox: spec.sandbox, network: spec.network, ..Knobs::default() };
        let text = rego_with_fragments(&[], &[], &knobs, "test").unwrap();
        let policy = parma_policy::Policy::from_bytes(text.into_bytes()).unwrap();
        let mut engine = parma_policy::Engine::new(&policy).unwrap();
        let sandbox = |hostname: &str| serde_json::json!({"hostname": hostname, "sharePid": true});
        for (hostname, allowed) in
            [("web-1", true), ("a.b-c.d", true), ("Web_1", false), ("-web", false), ("web.", false)]
        {
            assert_eq!(engine.decide(Point::CreateSandbox, &sandbox(hostname)).allowed, allowed, "{hostname}");
        }
        let interface = |address: &str, mtu: u32| serde_json::json!({"name": "eth0", "hwAddr": "52:54:00:12:34:56", "mtu": mtu, "addresses": [address], "rawFlags": 0});
        assert!(engine.decide(Point::UpdateInterface, &interface("10.0.2.15/24", 1500)).allowed);
        assert!(!engine.decide(Point::UpdateInterface, &interface("192.168.0.2/24", 1500)).allowed);
        assert!(!engine.decide(Point::UpdateInterface, &interface("10.0.2.15/24", 9000)).allowed);
        // Without a network rule, only the framework's refusals.
        let text = rego_with_fragments(&[], &[], &Knobs::default(), "test").unwrap();
        assert!(!text.contains("network :="), "{text}");
        let mut open =
            parma_policy::Engine::new(&parma_policy::Policy::from_bytes(text.into_bytes()).unwrap()).unwrap();
        assert!(open.decide(Point::UpdateInterface, &interface("192.168.0.2/24", 9000)).allowed);
        assert!(!open.decide(Point::CreateSandbox, &sandbox("web-1")).allowed, "no shared PID by default");
        // The default copy_files: Kubernetes' files, nothing else.
        let file = |path: &str| serde_json::json!({"path": path, "size": 10, "mode": 420});
        for (path, allowed) in [
            ("/run/parma/files/pod-1/hosts", true),
            ("/run/parma/files/pod-1/c1/resolv.conf", true),
            ("/run/parma/files/hostname", true),
            ("/run/parma/files/pod-1/serviceaccount/token", true),
            ("/run/parma/files/pod-1/passwd", false),
            ("/run/parma/files/pod-1/resolvXconf", false),
            ("/run/parma/files/a/b/c/d/hosts", false),
            ("/etc/hosts", false),
        ] {
            assert_eq!(open.decide(Point::CopyFile, &file(path)).allowed, allowed, "{path}");
        }
    }
}
