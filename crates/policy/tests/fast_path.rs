//! The framework decides allowed requests on a fast path (`container_ok`,
//! `exec_ok`: checks that build no messages) and explains denials with the
//! failure lists (`container_failures`, `exec_failures`). The two must agree
//! on every request, or the engine would allow what its explanation calls a
//! failure. A probe policy compares them on random requests.

use parma_policy::{Engine, Point, Policy};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The containers: exact and re2 env rules (one required), mounts,
/// capabilities, groups, rlimits, a terminal for one exec process, masked
/// paths of its own for one container, and a seccomp hash.
const PROBE: &str = r#"package policy

import rego.v1

containers := [
	{
		"name": "web",
		"layers": ["1111111111111111111111111111111111111111111111111111111111111111"],
		"command": ["/bin/server", "--port", "8080"],
		"env_rules": [
			{"pattern": "PATH=/usr/bin:/bin", "strategy": "string", "required": true},
			{"pattern": "MODE=(prod|staging)", "strategy": "re2", "required": false},
			{"pattern": "ID=[0-9]+", "strategy": "re2", "required": true},
			{"pattern": "ODD=x", "strategy": "glob"},
		],
		"working_dir": "/srv",
		"user": {"uid": 1000, "gid": 1000},
		"groups": [1000, 5],
		"capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []},
		"no_new_privileges": true,
		"seccomp_profile_sha256": "abc",
		"mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/[a-z0-9]+/hosts", "options": ["rbind", "ro"]}],
		"exec_processes": [{"command": ["/bin/health"]}, {"command": ["/bin/sh", "-c", "true"], "terminal": true}],
		"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
	},
	{
		"name": "worker",
		"layers": ["1111111111111111111111111111111111111111111111111111111111111111"],
		"command": ["/bin/work"],
		"env_rules": [{"pattern": "PATH=/usr/bin:/bin", "strategy": "string"}],
		"working_dir": "/",
		"allow_elevated": true,
		"masked_paths": ["/proc/kcore"],
		"readonly_paths": [],
		"terminal": true,
	},
]

allow_capability_dropping := true

ok := {c.name | some c in data.framework.policy_containers; data.framework.container_ok(c)}

clean := {c.name | some c in data.framework.policy_containers; count(data.framework.container_failures(c)) == 0}

create_container := {"allowed": true, "metadata": []} if ok == clean

create_container := {"allowed": false, "reason": {"message": sprintf("container_ok %v but failures empty for %v", [ok, clean]), "candidates": []}} if ok != clean

# Allowed when some container passes, so the test can tell both kinds of request apart.
mount_device := {"allowed": true, "metadata": []} if count(clean) > 0

exec_ok := {[c.name, i] | some c in data.framework.policy_containers; some i, p in object.get(c, "exec_processes", []); data.framework.exec_ok(c, p)}

exec_clean := {[c.name, i] | some c in data.framework.policy_containers; some i, p in object.get(c, "exec_processes", []); count(data.framework.exec_failures(c, p)) == 0}

exec_in_container := {"allowed": true, "metadata": []} if exec_ok == exec_clean

exec_in_container := {"allowed": false, "reason": {"message": sprintf("exec_ok %v, exec failures empty for %v", [exec_ok, exec_clean]), "candidates": []}} if exec_ok != exec_clean
"#;

fn request() -> Value {
    json!({
        "containerID": "c1",
        "argList": ["/bin/server", "--port", "8080"],
        "envList": ["PATH=/usr/bin:/bin", "MODE=prod", "ID=42"],
        "workingDir": "/srv",
        "user": {"uid": 1000, "gid": 1000},
        "groups": [5, 1000],
        "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []},
        "noNewPrivileges": true,
        "privileged": false,
        "seccompProfileSHA256": "abc",
        "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/c1/hosts", "options": ["ro", "rbind"]}],
        "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS,
        "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS,
        "terminal": false,
        "rlimits": [],
    })
}

/// One change to a field of the request; several are applied at once.
fn change() -> impl Strategy<Value = (usize, usize)> {
    (0usize..15, 0usize..6)
}

fn apply(input: &mut Value, (field, pick): (usize, usize)) {
    const ARGS: [&[&str]; 6] = [
        &["/bin/work"],
        &["/bin/server"],
        &["/bin/health"],
        &["/bin/sh", "-c", "true"],
        &[],
        &["/bin/server", "--port", "8081"],
    ];
    const ENV: [&str; 6] = ["MODE=dev", "ID=", "ID=7", "ODD=x", "PATH=/usr/bin:/bin", "MODE=staging"];
    match field {
        0 => input["argList"] = json!(ARGS[pick]),
        1 => input["envList"].as_array_mut().unwrap().push(json!(ENV[pick])),
        2 => {
            let env = input["envList"].as_array_mut().unwrap();
            if !env.is_empty() {
                env.remove(pick % env.len());
            }
        }
        3 => input["workingDir"] = json!(["/srv", "/", "/srv/", "", "/tmp", "/srv"][pick]),
        4 => {
            input["user"] = [
                json!({"uid": 0}),
                json!({"uid": 1000}),
                json!({"uid": 1000, "gid": 0}),
                json!({"uid": 1000, "gid": 1000, "name": "x"}),
                json!({"uid": 1000, "gid": 1000}),
                json!({"uid": 1}),
            ][pick]
                .clone()
        }
        5 => {
            input["groups"] =
                [json!([]), json!([1000, 5]), json!([5]), json!([5, 1000, 7]), json!([1000, 5]), json!([0])][pick]
                    .clone()
        }
        6 => {
            let set = ["bounding", "effective", "permitted", "inheritable", "ambient", "effective"][pick];
            input["capabilities"][set].as_array_mut().unwrap().push(json!("CAP_SYS_ADMIN"));
        }
        7 => {
            let set = ["bounding", "effective", "permitted", "bounding", "effective", "permitted"][pick];
            input["capabilities"][set].as_array_mut().unwrap().pop();
        }
        8 => input["noNewPrivileges"] = json!(pick % 2 == 0),
        9 => input["privileged"] = json!(pick % 3 == 0),
        10 => input["seccompProfileSHA256"] = json!(["", "abc", "abd", "abc", "", "x"][pick]),
        11 => {
            let mounts = [
                json!([]),
                json!([{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/../hosts", "options": ["ro", "rbind"]}]),
                json!([{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/c1/hosts", "options": ["rbind"]}]),
                json!([{"destination": "/data", "type": "bind", "source": "/run/parma/c1/hosts", "options": ["ro", "rbind"]}]),
                json!([{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/c1/hosts", "options": ["rbind", "ro"]}]),
                json!([{"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/c1/hostsX", "options": ["ro", "rbind"]}]),
            ];
            input["mounts"] = mounts[pick].clone();
        }
        12 => {
            let paths = ["/proc/kcore", "/proc/sys", "/proc/cpuinfo", "/sys/firmware", "/proc/kcore", "/proc/sys"];
            let list = if pick % 2 == 0 { "maskedPaths" } else { "readonlyPaths" };
            let entries = input[list].as_array_mut().unwrap();
            match entries.iter().position(|p| p == paths[pick]) {
                Some(at) => drop(entries.remove(at)),
                None => entries.push(json!(paths[pick])),
            }
        }
        13 => input["terminal"] = json!(pick % 2 == 0),
        _ => {
            input["rlimits"] = [
                json!([]),
                json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]),
                json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4097}]),
                json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}]),
                json!([{"type": "RLIMIT_NPROC", "soft": 1, "hard": 1}]),
                json!([{"type": "RLIMIT_NOFILE", "soft": 1025, "hard": 1025}]),
            ][pick]
                .clone()
        }
    }
}

fn engine() -> Engine {
    Engine::new(&Policy::from_bytes(PROBE.as_bytes().to_vec()).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_fast_path_agrees_with_the_failure_lists(changes in proptest::collection::vec(change(), 0..4)) {
        let mut input = request();
        for c in &changes {
            apply(&mut input, *c);
        }
        let mut engine = engine();
        let decision = engine.decide(Point::CreateContainer, &input);
        prop_assert!(decision.allowed, "{:?} on {}", decision.denial, input);
        // The exec processes' commands too, with the same env and dir.
        for command in [input["argList"].clone(), json!(["/bin/health"]), json!(["/bin/sh", "-c", "true"])] {
            input["argList"] = command;
            let decision = engine.decide(Point::ExecInContainer, &input);
            prop_assert!(decision.allowed, "{:?} on {}", decision.denial, input);
        }
    }
}

/// The probe itself tells passing requests from failing ones: the base
/// request passes as `web`, and fails with `/proc/sys` writable, on a
/// terminal or with a larger limit.
#[test]
fn the_probe_sees_both_outcomes() {
    let mut engine = engine();
    assert!(engine.decide(Point::MountDevice, &request()).allowed, "the base request passes");
    let mut input = request();
    apply(&mut input, (12, 1));
    assert!(!engine.decide(Point::MountDevice, &input).allowed, "/proc/sys must be read-only");
    let mut input = request();
    input["terminal"] = json!(true);
    assert!(!engine.decide(Point::MountDevice, &input).allowed, "web has no terminal");
    let mut input = request();
    apply(&mut input, (14, 2));
    assert!(!engine.decide(Point::MountDevice, &input).allowed, "a hard limit above the policy's");
    let mut input = request();
    input["argList"] = json!(["/bin/work"]);
    input["envList"] = json!(["PATH=/usr/bin:/bin"]);
    input["workingDir"] = json!("/");
    assert!(!engine.decide(Point::MountDevice, &input).allowed, "worker's defaults: no user given");
    input["user"] = json!({"uid": 0});
    input["groups"] = json!([]);
    input["capabilities"] = json!({});
    input["noNewPrivileges"] = json!(false);
    input["seccompProfileSHA256"] = json!("");
    input["mounts"] = json!([]);
    input["maskedPaths"] = json!(["/proc/kcore"]);
    input["readonlyPaths"] = json!([]);
    input["terminal"] = json!(true);
    assert!(engine.decide(Point::MountDevice, &input).allowed, "worker's own paths and its terminal");
}

/// Malformed container data, on which the failure lists fail (a denial),
/// gets no index, so the fast path denies it too; a well-formed container
/// with the same request passes. Index fields a policy writes itself are
/// replaced by the engine's.
#[test]
fn malformed_container_data_fails_the_fast_path_too() {
    let request = json!({
        "argList": ["/bin/app"], "envList": ["A=1"], "workingDir": "/", "user": {"uid": 0},
        "groups": [], "capabilities": {}, "noNewPrivileges": false, "privileged": false,
        "seccompProfileSHA256": "", "mounts": [],
        "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS, "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS,
    });
    let base = json!({"name": "c", "layers": [], "command": ["/bin/app"], "env_rules": [{"pattern": "A=1", "strategy": "string"}]});
    let variant = |field: &str, value: Value| {
        let mut c = base.clone();
        c[field] = value;
        c
    };
    let cases = [
        (base.clone(), true),
        (variant("capabilities", json!("x")), false),
        (variant("capabilities", json!([])), false),
        (variant("env_rules", json!(["A=1"])), false),
        (variant("env_rules", json!({"pattern": "A=1", "strategy": "string"})), false),
        // The policy's own index fields do not count.
        (variant("env_strings", json!({"B=2": true})), true),
        (
            {
                let mut c = variant("env_rules", json!("A=1"));
                c["env_strings"] = json!({"A=1": true});
                c["env_patterns"] = json!([]);
                c["env_required_strings"] = json!([]);
                c["env_required_patterns"] = json!([]);
                c["env_required_other"] = json!(0);
                c
            },
            false,
        ),
    ];
    for (container, allowed) in cases {
        let policy = format!(
            "package policy\nimport rego.v1\ncontainers := [{container}]\n\
             get_properties := {{\"allowed\": true, \"metadata\": []}} if {{\n\
             \tsome c in data.framework.policy_containers\n\tdata.framework.container_ok(c)\n}}\n"
        );
        let mut engine = Engine::new(&Policy::from_bytes(policy.into_bytes()).unwrap()).unwrap();
        let decision = engine.decide(Point::GetProperties, &request);
        assert_eq!(decision.allowed, allowed, "{container}: {:?}", decision.denial);
    }
}
