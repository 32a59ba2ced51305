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

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use serde::Deserialize;

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

/// One syscall rule of a profile: the name and its argument conditions
/// (none: the syscall matches whatever its arguments).
#[derive(Debug, Clone)]
struct Rule {
    name: String,
    conditions: Vec<SeccompCondition>,
}

/// `seccompiler`'s action for an OCI action.
fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => match errno.unwrap_or(libc::EPERM as u32) {
            // The filter returns 16 bits of data; errno values end at 4095.
            errno @ 1..=4095 => SeccompAction::Errno(errno),
            other => return Err(format!("seccomp errnoRet {other} is not an errno (1 to 4095)")),
        },
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        other => return Err(format!("seccomp action {other:?} is not supported")),
    })
}

fn condition(arg: &Arg) -> Result<SeccompCondition, String> {
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        // OCI: value is the mask, valueTwo what the masked argument must equal.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => return Err(format!("seccomp operator {other:?} is not supported")),
    };
    SeccompCondition::new(arg.index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|err| format!("seccomp argument condition {arg:?}: {err}"))
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
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    // Every named syscall (for the default filter), and the rules of each
    // action other than allow, in the profile's order.
    let mut named = Vec::new();
    let mut groups: Vec<(SeccompAction, Vec<Rule>)> = Vec::new();
    for entry in &profile.syscalls {
        let this = action(&entry.action, entry.errno_ret.or(profile.default_errno_ret))?;
        if this == default {
            continue; // Same as the default: nothing to add.
        }
        let conditions = entry.args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
        // As runc: conditions on distinct arguments must all hold (one
        // rule); when an argument index repeats, each condition is a rule
        // of its own (any may hold), or a deny entry listing two values of
        // one argument would match neither.
        let mut indexes: Vec<u8> = entry.args.iter().map(|arg| arg.index).collect();
        indexes.sort_unstable();
        let repeated = indexes.windows(2).any(|pair| pair.first() == pair.get(1));
        let alternatives: Vec<Vec<SeccompCondition>> =
            if repeated { conditions.into_iter().map(|c| vec![c]).collect() } else { vec![conditions] };
        let rules: Vec<Rule> = entry
            .names
            .iter()
            .flat_map(|name| {
                alternatives.iter().map(|conditions| Rule { name: name.clone(), conditions: conditions.clone() })
            })
            .collect();
        named.extend(rules.iter().cloned());
        if this != SeccompAction::Allow {
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
    if default != SeccompAction::Allow {
        filters.push(compile_one(&default, &SeccompAction::Allow, &named)?);
    }
    for (action, rules) in groups {
        filters.push(compile_one(&SeccompAction::Allow, &action, &rules)?);
    }
    Ok(filters)
}

/// Whether a rule with this action may lose a name unknown on x86_64
/// without allowing anything the profile denies (see the module docs).
fn may_skip_unknown(matched: &SeccompAction) -> bool {
    matches!(matched, SeccompAction::Allow) || *matched == SeccompAction::Errno(libc::ENOSYS as u32)
}

/// The x86_64 number of a syscall name (the `syscalls` crate's x86_64
/// table, which must cover the guest kernel's syscalls: see the tests).
fn syscall_number(name: &str) -> Option<i64> {
    syscalls::x86_64::Sysno::from_str(name).ok().map(|sysno| i64::from(sysno.id()))
}

/// One filter: `matched` for the rules, `mismatch` for everything else.
/// Names unknown on x86_64 are dropped where that is safe
/// ([`may_skip_unknown`]), as libseccomp ignores them; elsewhere refused. A
/// syscall that one rule names without conditions matches whatever other
/// rules say of its arguments.
fn compile_one(
    mismatch: &SeccompAction,
    matched: &SeccompAction,
    rules: &[Rule],
) -> Result<Vec<libc::sock_filter>, String> {
    let mut by_number: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = BTreeSet::new();
    for rule in rules {
        let Some(number) = syscall_number(&rule.name) else {
            if may_skip_unknown(matched) {
                continue;
            }
            return Err(format!(
                "seccomp profile: syscall {:?} does not exist on x86_64, in a rule that denies it ({matched:?}): a \
                 misspelt name would leave that syscall allowed",
                rule.name
            ));
        };
        let conditions = by_number.entry(number).or_default();
        if rule.conditions.is_empty() {
            unconditional.insert(number);
        } else {
            let rule = SeccompRule::new(rule.conditions.clone()).map_err(|err| format!("seccomp rule: {err}"))?;
            conditions.push(rule);
        }
    }
    // No rule list: the syscall matches unconditionally.
    for number in unconditional {
        by_number.insert(number, Vec::new());
    }
    if by_number.is_empty() {
        return Err("seccomp profile: no syscall of a rule exists on x86_64".into());
    }
    let filter = SeccompFilter::new(by_number, mismatch.clone(), matched.clone(), TargetArch::x86_64)
        .map_err(|err| format!("seccomp profile: {err}"))?;
    let program = BpfProgram::try_from(filter).map_err(|err| format!("seccomp profile: {err}"))?;
    Ok(program.into_iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same filter through seccompiler's own JSON frontend and its
    /// syscall table: an independent compiler of the same rules.
    fn through_json(mismatch: &str, matched: &str, rules: &[(&str, &str)]) -> Vec<libc::sock_filter> {
        let rules: Vec<serde_json::Value> = rules
            .iter()
            .map(|(name, args)| match *args {
                "" => serde_json::json!({"syscall": name}),
                args => serde_json::json!({"syscall": name, "args": serde_json::from_str::<serde_json::Value>(args).unwrap()}),
            })
            .collect();
        let filter = serde_json::json!({"main": {
            "mismatch_action": serde_json::from_str::<serde_json::Value>(mismatch).unwrap(),
            "match_action": serde_json::from_str::<serde_json::Value>(matched).unwrap(),
            "filter": rules,
        }});
        let mut map =
            seccompiler::compile_from_json(serde_json::to_vec(&filter).unwrap().as_slice(), TargetArch::x86_64)
                .unwrap();
        map.remove("main")
            .unwrap()
            .into_iter()
            .map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
            .collect()
    }

    fn same(a: &[libc::sock_filter], b: &[libc::sock_filter]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x.code, x.jt, x.jf, x.k) == (y.code, y.jt, y.jf, y.k))
    }

    /// The typed rules compile to the very program seccompiler's JSON
    /// frontend makes of the same profile, names resolved by another table.
    #[test]
    fn typed_rules_match_seccompilers_json_frontend() {
        let profile = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
            {"names": ["read", "write", "exit_group", "openat", "mmap", "clone3", "pidfd_open", "cachestat"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}, {"index": 1, "value": 255, "valueTwo": 3, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#;
        let filters = compile(profile).unwrap();
        assert_eq!(filters.len(), 3);
        let allowed = [
            ("read", ""),
            ("write", ""),
            ("exit_group", ""),
            ("openat", ""),
            ("mmap", ""),
            ("clone3", ""),
            ("pidfd_open", ""),
            ("cachestat", ""),
            (
                "personality",
                r#"[{"index": 0, "type": "qword", "op": "eq", "val": 8}, {"index": 1, "type": "qword", "op": {"masked_eq": 255}, "val": 3}]"#,
            ),
            ("ptrace", ""),
            ("mount", ""),
            ("umount2", ""),
        ];
        assert!(same(&filters[0], &through_json(r#"{"errno": 1}"#, r#""allow""#, &allowed)));
        assert!(same(&filters[1], &through_json(r#""allow""#, r#""kill_process""#, &[("ptrace", "")])));
        assert!(same(&filters[2], &through_json(r#""allow""#, r#"{"errno": 13}"#, &[("mount", ""), ("umount2", "")])));
    }

    /// A syscall denied outright by one entry stays denied whatever another
    /// entry says of its arguments (seccompiler's JSON frontend would keep
    /// only the conditional rule, and let the syscall through otherwise).
    #[test]
    fn an_unconditional_rule_wins_over_a_conditional_one() {
        let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS", "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"}]}]}"#;
        let filters = compile(profile).unwrap();
        assert_eq!(filters.len(), 1);
        assert!(same(&filters[0], &through_json(r#""allow""#, r#""kill_process""#, &[("ptrace", "")])));
    }

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
        assert!(may_skip_unknown(&SeccompAction::Allow));
        assert!(may_skip_unknown(&SeccompAction::Errno(38)));
        assert!(!may_skip_unknown(&SeccompAction::Errno(1)));
        assert!(!may_skip_unknown(&SeccompAction::KillProcess));
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

    /// The table knows every syscall of the pinned guest kernel (6.12):
    /// a name it lacked would be skipped in an allow or ENOSYS rule, and a
    /// deny-list entry for it lost.
    #[test]
    fn the_syscall_table_covers_the_guest_kernel() {
        assert_eq!(syscall_number("mseal"), Some(462), "the newest syscall of Linux 6.12");
        assert_eq!(syscall_number("uretprobe"), Some(335));
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("arm_fadvise64_64"), None, "another architecture's");
        let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mseal"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#;
        let filters = compile(profile).unwrap();
        assert!(same(&filters[0], &through_json(r#""allow""#, r#"{"errno": 38}"#, &[("mseal", "")])));
    }

    /// Two conditions on one argument are alternatives (as runc adds them),
    /// conditions on distinct arguments all hold.
    #[test]
    fn repeated_argument_conditions_are_alternatives() {
        let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
             "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 17, "op": "SCMP_CMP_EQ"}]}]}"#;
        let filters = compile(profile).unwrap();
        let eq = |value: u64| format!(r#"[{{"index": 0, "type": "qword", "op": "eq", "val": {value}}}]"#);
        let (sixteen, seventeen) = (eq(16), eq(17));
        let alternatives =
            through_json(r#""allow""#, r#"{"errno": 97}"#, &[("socket", &sixteen), ("socket", &seventeen)]);
        assert!(same(&filters[0], &alternatives));
        let both = r#"[{"index": 0, "type": "qword", "op": "eq", "val": 16}, {"index": 0, "type": "qword", "op": "eq", "val": 17}]"#;
        assert!(!same(&filters[0], &through_json(r#""allow""#, r#"{"errno": 97}"#, &[("socket", both)])));
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
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["nope_nope"], "action": "SCMP_ACT_ALLOW"}]}"#,
                "no syscall of a rule exists",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 65536}]}"#,
                "is not an errno",
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
