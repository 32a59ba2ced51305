//! The policy's data, as typed structs: a container entry of the policy's
//! `containers` (what `parma policy gen` writes and a fragment adds), with
//! the fields the framework reads (`docs/policy.md` describes each).

use parma_protocol::{CapabilitySets, Rlimit};
use serde::{Deserialize, Serialize};

/// One container the policy allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Its name: unique in the policy, and what denials cite.
    pub name: String,
    /// The dm-verity root hashes of its layers, base first.
    pub layers: Vec<String>,
    /// The command and arguments of its init process.
    pub command: Vec<String>,
    /// The environment variables it may have.
    #[serde(default)]
    pub env_rules: Vec<EnvRule>,
    /// Its working directory.
    #[serde(default = "root")]
    pub working_dir: String,
    /// Its user.
    #[serde(default)]
    pub user: User,
    /// Its capability sets.
    #[serde(default)]
    pub capabilities: CapabilitySets,
    /// Whether it must run with `no_new_privileges`.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// sha256 of the seccomp profile it must run under; empty: none.
    #[serde(default)]
    pub seccomp_profile_sha256: String,
    /// Whether it may be privileged.
    #[serde(default)]
    pub allow_elevated: bool,
    /// Mounts it may have beyond the defaults.
    #[serde(default)]
    pub mounts: Vec<MountRule>,
    /// Processes that may be exec'd in it.
    #[serde(default)]
    pub exec_processes: Vec<ExecProcess>,
    /// Signals its init process may get.
    #[serde(default)]
    pub signals: Vec<u32>,
    /// Whether the host may read its output and write its input (absent: no).
    #[serde(default)]
    pub allow_stdio_access: bool,
    /// Whether its process may run on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// The rlimits the host may set, at most these values.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// Whether the host may change its cgroup limits.
    #[serde(default)]
    pub allow_resource_updates: bool,
    /// Secrets it may receive from a key broker before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRule>,
    /// Whether it gets an attestation endpoint (`/dev/parma/attestation.sock`)
    /// for reports binding its own data (absent: no).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_attestation: bool,
    /// Whether its root must be read-only.
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// Its supplementary groups (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<u32>>,
    /// Paths it must see empty (absent: runc's defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_paths: Option<Vec<String>>,
    /// Paths it must see read-only (absent: runc's defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly_paths: Option<Vec<String>>,
}

/// A secret a container may receive (`release_secret`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRule {
    /// The broker's name in the policy's `brokers`.
    pub broker: String,
    /// The resource at the broker, `REPO/TYPE/TAG`.
    pub resource: String,
    /// The file it becomes in the container's `/dev/parma/secrets/`.
    pub file: String,
}

/// A key broker secrets may come from (the policy's `brokers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    /// Its name, which containers' `secrets` use.
    pub name: String,
    /// Its URL, `https://HOST[:PORT]`.
    pub url: String,
    /// SHA-256 of its TLS certificate (DER), lowercase hex: the agent pins it.
    pub certificate_sha256: String,
}

fn root() -> String {
    "/".into()
}

/// An environment rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRule {
    /// `NAME=value` exactly, or an RE2 pattern over it.
    pub pattern: String,
    /// How `pattern` matches.
    #[serde(default)]
    pub strategy: Strategy,
    /// Whether some variable must match it.
    #[serde(default)]
    pub required: bool,
}

/// How an [`EnvRule`]'s pattern matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The whole `NAME=value`, exactly.
    #[default]
    String,
    /// An RE2 regular expression, anchored.
    Re2,
}

/// A user: each field given pins it, each absent one leaves it free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// A user name (requests carry numbers: a policy that names one allows no request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A mount the container may have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRule {
    /// Where, inside the container.
    pub destination: String,
    /// `tmpfs` or `bind`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The source: an RE2 pattern, anchored.
    pub source: String,
    /// The options, in any order.
    #[serde(default)]
    pub options: Vec<String>,
    /// Whether the container must have a mount that matches this rule (a
    /// host that leaves out a volume or a file the workload relies on is
    /// refused); otherwise the mount is allowed, not needed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

/// A process that may be exec'd in a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProcess {
    /// Its command and arguments.
    pub command: Vec<String>,
    /// Signals it may get.
    #[serde(default)]
    pub signals: Vec<u32>,
    /// Whether it may run on a terminal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_entry_takes_the_frameworks_defaults_and_unknown_fields_are_refused() {
        let entry: Container = serde_json::from_str(r#"{"name": "c", "layers": ["ab"], "command": ["/app"]}"#).unwrap();
        assert_eq!(entry.working_dir, "/");
        assert!(!entry.allow_stdio_access && !entry.terminal && entry.masked_paths.is_none());
        let text = serde_json::to_value(&entry).unwrap();
        assert!(text.get("masked_paths").is_none(), "absent means runc's defaults: {text}");
        assert_eq!(text["user"], serde_json::json!({}));
        assert!(
            serde_json::from_str::<Container>(r#"{"name": "c", "layers": [], "command": [], "comand": []}"#).is_err()
        );
        let rule: EnvRule = serde_json::from_str(r#"{"pattern": "A=.*", "strategy": "re2"}"#).unwrap();
        assert_eq!(rule.strategy, Strategy::Re2);
        assert!(serde_json::from_str::<EnvRule>(r#"{"pattern": "A", "strategy": "glob"}"#).is_err());
    }
}
