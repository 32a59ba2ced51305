//! OCI seccomp profiles (`linux.seccomp` of the runtime spec) compiled to
//! BPF with rust-vmm's `seccompiler`.
//!
//! Supported: a default action, and syscall entries with any of the actions
//! below, with argument conditions. `seccompiler` builds filters with one
//! action on a match and one on a mismatch, so a profile becomes a chain of
//! filters, which the kernel runs together, taking the most restrictive
//! result:
//! - unless the default is to allow: mismatch = the default, match = allow,
//!   over every syscall the entries name;
//! - for each other action an entry uses besides allow: mismatch = allow,
//!   match = that action, over that action's entries.
//!
//! A syscall no entry names gets the default; one named by an allow entry is
//! allowed; one named by an entry of another action gets that action.
//! Anything else (notify listeners, flags, other architectures) is refused
//! with a clear error rather than approximated.
//!
//! Syscall names that do not exist on x86_64 are skipped, as libseccomp
//! does, only where skipping cannot allow more: in an allow rule (the
//! profile then allows less), and in an `SCMP_ACT_ERRNO` rule returning
//! `ENOSYS` (what the kernel answers for a syscall that does not exist). In
//! any other rule (kill, trap, another errno) an unknown name is refused: it
//! may be a misspelling of a syscall the profile meant to deny, and
//! dropping it silently would allow that syscall.

use serde::Deserialize;
use serde_json::{Value, json};

/// Most distinct names a profile may list.
const MAX_NAMES: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    syscalls: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    names: Vec<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Arg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Arg {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// `seccompiler`'s action for an OCI action.
fn action(name: &str, errno: Option<u32>) -> Result<Value, String> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => json!("allow"),
        "SCMP_ACT_ERRNO" => json!({"errno": errno.unwrap_or(libc::EPERM as u32)}),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => json!("kill_thread"),
        "SCMP_ACT_KILL_PROCESS" => json!("kill_process"),
        "SCMP_ACT_TRAP" => json!("trap"),
        "SCMP_ACT_LOG" => json!("log"),
        other => return Err(format!("seccomp action {other:?} is not supported")),
    })
}

fn condition(arg: &Arg) -> Result<Value, String> {
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_EQ" => (json!("eq"), arg.value),
        "SCMP_CMP_NE" => (json!("ne"), arg.value),
        "SCMP_CMP_LT" => (json!("lt"), arg.value),
        "SCMP_CMP_LE" => (json!("le"), arg.value),
        "SCMP_CMP_GT" => (json!("gt"), arg.value),
        "SCMP_CMP_GE" => (json!("ge"), arg.value),
        // OCI: value is the mask, valueTwo what the masked argument must equal.
        "SCMP_CMP_MASKED_EQ" => (json!({"masked_eq": arg.value}), arg.value_two),
        other => return Err(format!("seccomp operator {other:?} is not supported")),
    };
    Ok(json!({"index": arg.index, "type": "qword", "op": op, "val": value}))
}

/// Compile an OCI seccomp profile for x86_64 into the filters to install, in order.
pub fn compile(text: &str) -> Result<Vec<Vec<libc::sock_filter>>, String> {
    let profile: Profile = serde_json::from_str(text).map_err(|err| format!("seccomp profile: {err}"))?;
    if !profile.flags.is_empty() {
        return Err(format!("seccomp flags {:?} are not supported", profile.flags));
    }
    if !profile.architectures.is_empty() && !profile.architectures.iter().any(|a| a == "SCMP_ARCH_X86_64") {
        return Err("the seccomp profile does not cover SCMP_ARCH_X86_64".into());
    }
    let allow = json!("allow");
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    // Every named syscall (for the default filter), and the rules of each
    // action other than allow, in the profile's order.
    let mut named = Vec::new();
    let mut groups: Vec<(Value, Vec<Value>)> = Vec::new();
    for entry in &profile.syscalls {
        let this = action(&entry.action, entry.errno_ret.or(profile.default_errno_ret))?;
        if this == default {
            continue; // Same as the default: nothing to add.
        }
        let conditions = entry.args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
        let rules: Vec<Value> = entry
            .names
            .iter()
            .map(|name| {
                if conditions.is_empty() {
                    json!({"syscall": name})
                } else {
                    json!({"syscall": name, "args": conditions})
                }
            })
            .collect();
        named.extend(rules.iter().cloned());
        if this != allow {
            match groups.iter_mut().find(|(action, _)| *action == this) {
                Some((_, group)) => group.extend(rules),
                None => groups.push((this, rules)),
            }
        }
    }
    if named.len() > MAX_NAMES {
        return Err(format!("the seccomp profile lists {} syscalls; at most {MAX_NAMES}", named.len()));
    }
    if named.is_empty() {
        return Err("the seccomp profile has no entry with an action other than its default".into());
    }
    let mut filters = Vec::new();
    if default != allow {
        filters.push(compile_one(&default, &allow, named)?);
    }
    for (action, rules) in groups {
        filters.push(compile_one(&allow, &action, rules)?);
    }
    Ok(filters)
}

/// Whether a rule with this action may lose a name unknown on x86_64
/// without allowing anything the profile denies (see the module docs).
fn may_skip_unknown(matched: &Value) -> bool {
    *matched == json!("allow") || *matched == json!({"errno": libc::ENOSYS as u32})
}

/// One filter: `matched` for the rules, `mismatch` for everything else.
/// Names unknown on x86_64 are dropped one by one where that is safe
/// ([`may_skip_unknown`]), as libseccomp ignores them; elsewhere refused.
fn compile_one(mismatch: &Value, matched: &Value, mut rules: Vec<Value>) -> Result<Vec<libc::sock_filter>, String> {
    loop {
        let filter = json!({"main": {"mismatch_action": mismatch, "match_action": matched, "filter": rules}});
        let bytes = serde_json::to_vec(&filter).map_err(|err| err.to_string())?;
        match seccompiler::compile_from_json(bytes.as_slice(), seccompiler::TargetArch::x86_64) {
            Ok(mut map) => {
                let program = map.remove("main").ok_or("seccompiler returned no filter")?;
                return Ok(program
                    .into_iter()
                    .map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
                    .collect());
            }
            Err(err) => {
                // seccompiler keeps its syscall table and the error naming
                // the unknown syscall private; its message names it.
                let message = err.to_string();
                let Some(name) = unknown_syscall(&message) else {
                    return Err(format!("seccomp profile: {message}"));
                };
                if !may_skip_unknown(matched) {
                    return Err(format!(
                        "seccomp profile: syscall {name:?} does not exist on x86_64, in a rule that denies it \
                         ({matched}): a misspelt name would leave that syscall allowed"
                    ));
                }
                let before = rules.len();
                rules.retain(|rule| rule.get("syscall").and_then(Value::as_str) != Some(name));
                if rules.len() == before || rules.is_empty() {
                    return Err(format!("seccomp profile: syscall {name:?} cannot be resolved"));
                }
            }
        }
    }
}

/// The name in seccompiler's "Invalid syscall name: NAME for given arch" message.
fn unknown_syscall(message: &str) -> Option<&str> {
    let rest = message.split("Invalid syscall name: ").nth(1)?;
    rest.split(" for given arch").next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_compile_and_unknown_names_are_skipped() {
        let profile = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["read", "write", "exit_group", "arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}
            ]}"#;
        let filters = compile(profile).unwrap();
        assert_eq!(filters.len(), 1, "an allow-list is one filter");
        assert!(filters[0].len() > 5);
    }

    #[test]
    fn unknown_names_are_skipped_only_where_that_allows_nothing_more() {
        // Docker's profile: syscalls other architectures have, answered ENOSYS.
        let profile = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
            {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["bdflush", "clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#;
        assert_eq!(compile(profile).unwrap().len(), 2);
        assert!(may_skip_unknown(&json!("allow")));
        assert!(may_skip_unknown(&json!({"errno": 38})));
        assert!(!may_skip_unknown(&json!({"errno": 1})));
        assert!(!may_skip_unknown(&json!("kill_process")));
    }

    #[test]
    fn several_actions_become_a_chain_of_filters() {
        // Allow-list with an exception that fails differently: the default
        // filter allows every named syscall, then one filter per other action.
        let profile = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
            {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#;
        assert_eq!(compile(profile).unwrap().len(), 3);
        // Deny-list: no default filter, one per action.
        let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["write"], "action": "SCMP_ACT_KILL"}]}"#;
        assert_eq!(compile(profile).unwrap().len(), 2);
        // Entries with the default's action add nothing.
        let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#;
        assert_eq!(compile(profile).unwrap().len(), 1);
    }

    #[test]
    fn unsupported_profiles_are_refused() {
        for (profile, want) in [
            (r#"{"defaultAction": "SCMP_ACT_NOTIFY", "syscalls": []}"#, "not supported"),
            (r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_AARCH64"]}"#, "X86_64"),
            (r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x"}"#, "unknown field"),
            (r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}"#, "flags"),
            (r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}"#, "no entry"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["nope_nope"], "action": "SCMP_ACT_ERRNO"}]}"#,
                "does not exist on x86_64",
            ),
            // A deny-list with a misspelt name: refused, never dropped.
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["ptrace", "mount2"], "action": "SCMP_ACT_KILL"}]}"#,
                "\"mount2\" does not exist on x86_64",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["unshare", "unshare2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#,
                "a misspelt name",
            ),
        ] {
            let err = compile(profile).unwrap_err();
            assert!(err.contains(want), "{profile}: {err}");
        }
    }
}
