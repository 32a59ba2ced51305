//! The engine's contract: identity by hash, deny by default, bounded
//! evaluation, state only through commits.

use std::time::Duration;

use parma_policy::{Backend, DEFAULT_BUDGET, Engine, Point, Policy, PolicyError, policy_hash, uses_every};
use proptest::prelude::*;
use serde_json::{Value, json};

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn engine(rego: &str) -> Engine {
    Engine::new(&Policy::from_bytes(rego.as_bytes().to_vec()).unwrap()).unwrap()
}

#[test]
fn hash_is_sha256sum_of_the_exact_bytes() {
    let path = repo().join("policies/allow_all.rego");
    let out = std::process::Command::new("sha256sum").arg(&path).output().unwrap();
    let expected = String::from_utf8(out.stdout).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(policy_hash(&bytes), expected.split_whitespace().next().unwrap());
    assert_eq!(Policy::from_bytes(bytes).unwrap().hash_hex(), policy_hash(&std::fs::read(&path).unwrap()));
    // One byte more is another policy.
    assert_ne!(policy_hash(b"package policy\n"), policy_hash(b"package policy\n\n"));
}

#[test]
fn allow_all_allows_every_point() {
    let mut engine =
        Engine::new(&Policy::from_bytes(std::fs::read(repo().join("policies/allow_all.rego")).unwrap()).unwrap())
            .unwrap();
    for point in Point::ALL {
        let decision = engine.decide(point, &json!({"containerID": "x"}));
        assert!(decision.allowed, "{point}: {:?}", decision.denial);
    }
}

#[test]
fn an_empty_policy_denies_everything() {
    let mut engine = engine("package policy\n");
    for point in Point::ALL {
        let decision = engine.decide(point, &json!({}));
        assert!(!decision.allowed);
        assert!(decision.denial.unwrap().line().contains("does not define"), "{point}");
    }
}

#[test]
fn results_other_than_allow_are_denials() {
    let mut engine = engine(
        r#"package policy
mount_device := "yes"
unmount_device := {"allowed": 1}
mount_overlay := false
create_container := {"allowed": false}
"#,
    );
    for point in [Point::MountDevice, Point::UnmountDevice, Point::MountOverlay, Point::CreateContainer] {
        assert!(!engine.decide(point, &json!({})).allowed, "{point}");
    }
    let line = engine.decide(Point::MountDevice, &json!({})).denial.unwrap().line();
    assert!(line.contains(r#"the rule returned "yes", not an allow decision"#), "{line}");
}

#[test]
fn a_rule_that_errors_denies() {
    let mut engine = engine(
        r#"package policy
mount_device := {"allowed": to_number(input.target) > 0}
"#,
    );
    let decision = engine.decide(Point::MountDevice, &json!({"target": "not a number"}));
    assert!(!decision.allowed);
    // The interpreter reports the builtin's error; the register VM leaves the
    // failed expression undefined. Either way: a denial that says so.
    let line = decision.denial.unwrap().line();
    assert!(
        line.starts_with("mount_device denied: policy error:")
            || line
                == "mount_device denied: the policy's mount_device rule is undefined for this input (deny by default)",
        "{line}"
    );
    assert!(engine.decide(Point::MountDevice, &json!({"target": "12"})).allowed);
}

#[test]
fn evaluation_over_budget_denies() {
    let policy = Policy::from_bytes(
        br#"package policy
mount_device := {"allowed": count([1 | some i in numbers.range(1, 3000); some j in numbers.range(1, 3000)]) > 0}
"#
        .to_vec(),
    )
    .unwrap();
    // A rule of the policy's own runs on the interpreter: the wall clock bounds it.
    let mut engine = Engine::with_budget(&policy, Duration::from_millis(20)).unwrap();
    let started = std::time::Instant::now();
    let decision = engine.decide(Point::MountDevice, &json!({}));
    assert!(!decision.allowed);
    assert!(started.elapsed() < Duration::from_secs(5), "the budget did not stop evaluation");
    let line = decision.denial.unwrap().line();
    assert!(line.contains("policy error") && line.contains("time limit"), "{line}");
}

/// The framework's rules run on the register VM, whose budget is a count of
/// instructions: the same decision on every machine, fast or emulated.
#[test]
fn framework_decisions_have_an_instruction_budget() {
    let policy = Policy::from_bytes(
        b"package policy\nget_properties := data.framework.get_properties\nallow_properties_access := true\n".to_vec(),
    )
    .unwrap();
    let mut engine = Engine::new(&policy).unwrap();
    assert!(engine.decide(Point::GetProperties, &json!({})).allowed, "the default budget denies a plain decision");
    engine.set_instruction_limit(3);
    for _ in 0..3 {
        let line = engine.decide(Point::GetProperties, &json!({})).denial.unwrap().line();
        assert!(line.contains("policy error") && line.contains("nstruction limit"), "{line}");
    }
    engine.set_instruction_limit(parma_policy::DEFAULT_INSTRUCTIONS);
    assert!(engine.decide(Point::GetProperties, &json!({})).allowed);
}

#[test]
fn bad_policies_are_refused_at_load() {
    let load = |bytes: &[u8]| Engine::new(&Policy::from_bytes(bytes.to_vec())?);
    // A name is one container: repeated or missing names are refused.
    let twice = br#"package policy
containers := [{"name": "web", "layers": ["11"], "command": ["/a"]}, {"name": "web", "layers": ["22"], "command": ["/b"]}]
"#;
    assert!(matches!(load(twice), Err(PolicyError::DuplicateContainer(n)) if n == "\"web\""));
    let unnamed = b"package policy\ncontainers := [{\"layers\": [], \"command\": []}]\n";
    assert!(matches!(load(unnamed), Err(PolicyError::UnnamedContainer(0))));
    // A pattern that is not a regular expression, in an env rule or a mount source.
    let env = br#"package policy
containers := [{"name": "web", "env_rules": [{"pattern": "A=(", "strategy": "re2"}]}]
"#;
    assert!(matches!(load(env), Err(PolicyError::BadPattern { .. })));
    let mount = br#"package policy
containers := [{"name": "web", "mounts": [{"destination": "/d", "type": "bind", "source": "[", "options": []}]}]
"#;
    let err = load(mount).unwrap_err().to_string();
    assert!(
        err.contains("the mount source of container \"web\"") && err.contains("not a valid regular expression"),
        "{err}"
    );
    assert!(matches!(load(b"package other\n"), Err(PolicyError::WrongPackage(p)) if p == "data.other"));
    assert!(matches!(load(b"package policy\nx := \n"), Err(PolicyError::Rego(_))));
    assert!(matches!(Policy::from_bytes(vec![0xff, 0xfe]), Err(PolicyError::NotUtf8)));
    assert!(matches!(Policy::from_bytes(vec![b' '; parma_policy::MAX_POLICY + 1]), Err(PolicyError::TooLarge(_))));
}

#[test]
fn denied_and_uncommitted_decisions_leave_state_alone() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/two_containers.rego");
    let mut engine = Engine::new(&Policy::from_bytes(std::fs::read(golden).unwrap()).unwrap()).unwrap();
    let h1 = "1".repeat(64);
    let allowed = engine.decide(Point::MountDevice, &json!({"target": "/a", "deviceHash": h1}));
    assert!(allowed.allowed);
    assert!(engine.state().get("devices", "/a").is_none(), "state changed before commit");
    let denied = engine.decide(Point::MountDevice, &json!({"target": "/b", "deviceHash": "0".repeat(64)}));
    engine.commit(&denied).unwrap();
    assert_eq!(engine.state().to_json(), json!({}));
    engine.commit(&allowed).unwrap();
    assert_eq!(engine.state().get("devices", "/a"), Some(&Value::String(h1)));
}

/// The golden policy's "web" container, mounted and ready for create_container.
fn web_ready() -> (Engine, Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut engine =
        Engine::new(&Policy::from_bytes(std::fs::read(dir.join("two_containers.rego")).unwrap()).unwrap()).unwrap();
    let scenario: Value = serde_json::from_slice(&std::fs::read(dir.join("two_containers.json")).unwrap()).unwrap();
    for (target, hash) in [("/l0", "1".repeat(64)), ("/l1", "2".repeat(64))] {
        let d = engine.decide(Point::MountDevice, &json!({"target": target, "deviceHash": hash}));
        engine.commit(&d).unwrap();
    }
    let d =
        engine.decide(Point::MountOverlay, &json!({"containerID": "c1", "layerPaths": ["/l0", "/l1"], "target": "/r"}));
    engine.commit(&d).unwrap();
    (engine, scenario["templates"]["web"].clone())
}

#[derive(Debug, Clone)]
enum Mutation {
    ExtraArg(String),
    ExtraEnv(String),
    Mode(String),
    WorkingDir(String),
    Uid(u32),
    ExtraCap(String),
    DropNoNewPrivileges,
    Privileged,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        "[a-z-]{1,12}".prop_map(Mutation::ExtraArg),
        "[A-Z_]{1,10}=[a-z0-9]{0,8}".prop_map(Mutation::ExtraEnv),
        prop_oneof![Just("prod".to_string()), Just("staging".to_string()), "[a-z]{1,10}"].prop_map(Mutation::Mode),
        "/[a-z]{1,10}".prop_map(Mutation::WorkingDir),
        (0u32..100_000).prop_map(Mutation::Uid),
        "CAP_[A-Z_]{3,12}".prop_map(Mutation::ExtraCap),
        Just(Mutation::DropNoNewPrivileges),
        Just(Mutation::Privileged),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any one change to an allowed request is denied, unless it is a
    /// change the policy allows (MODE may be prod or staging).
    #[test]
    fn mutations_of_an_allowed_request_are_denied(m in mutation()) {
        let (mut engine, mut input) = web_ready();
        prop_assert!(engine.decide(Point::CreateContainer, &input).allowed);
        let expect_allowed = match &m {
            Mutation::ExtraArg(arg) => { input["argList"].as_array_mut().unwrap().push(json!(arg)); false }
            Mutation::ExtraEnv(var) => { input["envList"].as_array_mut().unwrap().push(json!(var)); var == "MODE=prod" || var == "MODE=staging" }
            Mutation::Mode(mode) => {
                input["envList"] = json!(["PATH=/usr/bin:/bin", format!("MODE={mode}")]);
                mode == "prod" || mode == "staging"
            }
            Mutation::WorkingDir(dir) => { input["workingDir"] = json!(dir); dir == "/srv" }
            Mutation::Uid(uid) => { input["user"]["uid"] = json!(uid); *uid == 1000 }
            Mutation::ExtraCap(cap) => {
                input["capabilities"]["effective"].as_array_mut().unwrap().push(json!(cap));
                cap == "CAP_NET_BIND_SERVICE"
            }
            Mutation::DropNoNewPrivileges => { input["noNewPrivileges"] = json!(false); false }
            Mutation::Privileged => { input["privileged"] = json!(true); false }
        };
        let decision = engine.decide(Point::CreateContainer, &input);
        prop_assert_eq!(decision.allowed, expect_allowed, "{:?}: {:?}", m, decision.denial);
        if !decision.allowed {
            prop_assert!(decision.denial.unwrap().candidates.iter().any(|c| c.container == "web" && !c.failures.is_empty()));
        }
    }
}

/// External processes' env rules match as containers' do: exact strings and
/// whole-variable re2 patterns (which never matched before they were indexed
/// at load like the containers' rules).
#[test]
fn external_processes_match_exact_and_re2_env_rules() {
    let mut engine = engine(
        r#"package policy
external_processes := [{"command": ["/bin/date"], "working_dir": "/", "env_rules": [
	{"pattern": "TZ=UTC", "strategy": "string"},
	{"pattern": "LANG=[a-z]+_[A-Z]+", "strategy": "re2"},
]}]
exec_external := data.framework.exec_external
"#,
    );
    let request = |env: &[&str]| json!({"argList": ["/bin/date"], "envList": env, "workingDir": "/"});
    for env in [&[][..], &["TZ=UTC"], &["LANG=en_US"], &["TZ=UTC", "LANG=de_DE"]] {
        let decision = engine.decide(Point::ExecExternal, &request(env));
        assert!(decision.allowed, "{env:?}: {:?}", decision.denial);
    }
    for env in [&["TZ=CET"][..], &["LANG=en_US.UTF-8"], &["XLANG=en_US"], &["TZ=UTC", "HOME=/"]] {
        let decision = engine.decide(Point::ExecExternal, &request(env));
        assert!(!decision.allowed, "{env:?} is allowed");
        let line = decision.denial.unwrap().line();
        assert!(line.contains("matches no rule"), "{env:?}: {line}");
    }
}

/// regorus 0.14.1's register VM evaluates this `every` to true although
/// `m["b"]` is 2. A point whose rule the policy writes itself is decided by
/// the interpreter, so the answer is right on either backend asked for; the
/// VM runs only points bound to the framework.
#[test]
fn a_rule_of_the_policy_is_decided_by_the_interpreter() {
    let text = r#"package policy
import rego.v1
m := {"a": 1, "b": 2}
get_properties := {"allowed": true, "metadata": []} if {
	every x in input.xs {
		m[x] == 1
	}
}
"#;
    for backend in [Backend::Vm, Backend::Interpreter] {
        let policy = Policy::from_bytes(text.as_bytes().to_vec()).unwrap();
        let mut engine = Engine::with_backend(&policy, DEFAULT_BUDGET, backend).unwrap();
        assert_eq!(engine.backend(Point::GetProperties), Backend::Interpreter);
        assert!(engine.decide(Point::GetProperties, &json!({"xs": ["a"]})).allowed);
        assert!(!engine.decide(Point::GetProperties, &json!({"xs": ["a", "b"]})).allowed, "{backend:?}");
    }
    // Bound to the framework: the VM decides.
    let bound =
        engine("package policy\nget_properties := data.framework.get_properties\nallow_properties_access := true\n");
    assert_eq!(bound.backend(Point::GetProperties), Backend::Vm);
}

#[test]
fn only_a_plain_binding_counts_as_bound_to_the_framework() {
    use parma_policy::bound_to_framework;
    let point = Point::CreateContainer;
    let plain = "package policy\ncreate_container := data.framework.create_container\n";
    assert!(bound_to_framework(plain, point));
    assert!(bound_to_framework("create_container:=data.framework.create_container # bound\n", point));
    // Anything else that names the point keeps it on the interpreter.
    for other in [
        "create_container := data.framework.create_container\ndefault create_container := {\"allowed\": true}\n",
        "create_container := data.framework.create_container\ncreate_container := true if input.x\n",
        "create_container := data.framework.exec_in_container\n",
        "create_container := x\nx := data.framework.create_container\n",
        "create_container := data.framework.create_container\ny := data.policy.create_container\n",
        "create_container := data.framework.create_container\ncreate_container := data.framework.create_container\n",
        "",
        // The review's: a binding inside a raw string, the rule itself elsewhere.
        "x := `\ncreate_container := data.framework.create_container\n`\ndefault create_container := {\"allowed\": true}\ncreate_container := {\"allowed\": false} if { false }\n",
        // A body or else on the next line.
        "create_container := data.framework.create_container\n{ false }\n",
        "create_container := data.framework.create_container\n  if { input.x }\n",
        "create_container := data.framework.create_container\nelse := true\n",
        "create_container := data.framework.create_container with input as {}\n",
        "x := 1 create_container := data.framework.create_container\n",
    ] {
        assert!(!bound_to_framework(other, point), "{other}");
    }
    // A comment or a string that names it does not count.
    let commented =
        "# create_container is bound\ncreate_container := data.framework.create_container\nx := \"create_container\"\n";
    assert!(bound_to_framework(commented, point));
}

#[test]
fn every_is_found_as_a_keyword_only() {
    assert!(uses_every("p if {\n\tevery x in xs { x }\n}"));
    assert!(uses_every("import future.keywords.every"));
    assert!(!uses_every("# every comment\np := \"every \\\" string\"\nq := `every raw`\neveryone := 1\n"));
    // The framework avoids it, so generated policies run on the VM.
    assert!(!uses_every(parma_policy::FRAMEWORK));
}

#[test]
fn a_sandbox_is_created_once_with_the_host_name_and_pid_sharing_the_policy_allows() {
    let bind = "create_sandbox := data.framework.create_sandbox\n";
    let sandbox = |input: Value| json!({"hostname": input["h"], "sharePid": input["p"]});
    // No sandbox rule: no pod.
    let mut none = engine(&format!("package policy\n{bind}"));
    let denial = none.decide(Point::CreateSandbox, &sandbox(json!({"h": "web", "p": false}))).denial.unwrap();
    assert!(denial.line().contains("allows no sandbox"), "{}", denial.line());

    let mut pod =
        engine(&format!("package policy\n{bind}sandbox := {{\"hostname\": \"web-[0-9]+\", \"share_pid\": false}}\n"));
    for (hostname, share_pid, reason) in [
        ("web", false, "does not match"),
        // Anchored: a match inside the name is not one.
        ("xweb-1", false, "does not match"),
        ("web-1x", false, "does not match"),
        ("web-1", true, "shared PID namespace"),
    ] {
        let decision = pod.decide(Point::CreateSandbox, &sandbox(json!({"h": hostname, "p": share_pid})));
        let denial = decision.denial.unwrap_or_else(|| panic!("{hostname} {share_pid} was allowed"));
        assert!(denial.line().contains(reason), "{hostname}: {}", denial.line());
    }
    // Malformed input is denied, not an error.
    let decision = pod.decide(Point::CreateSandbox, &json!({"hostname": 1, "sharePid": false}));
    assert!(decision.denial.unwrap().line().contains("missing hostname"));

    let decision = pod.decide(Point::CreateSandbox, &sandbox(json!({"h": "web-1", "p": false})));
    assert!(decision.allowed, "{:?}", decision.denial);
    pod.commit(&decision).unwrap();
    let again = pod.decide(Point::CreateSandbox, &sandbox(json!({"h": "web-2", "p": false})));
    assert!(again.denial.unwrap().line().contains("already a pod"));

    // Sharing allowed: both ways pass.
    let mut sharing =
        engine(&format!("package policy\n{bind}sandbox := {{\"hostname\": \".*\", \"share_pid\": true}}\n"));
    for share_pid in [true, false] {
        let decision = sharing.decide(Point::CreateSandbox, &sandbox(json!({"h": "p", "p": share_pid})));
        assert!(decision.allowed, "{share_pid}: {:?}", decision.denial);
    }
}

#[test]
fn the_pods_network_refuses_what_genpolicy_refuses_and_the_policy_narrows_it() {
    let bind = "update_interface := data.framework.update_interface\nupdate_routes := data.framework.update_routes\n\
                add_arp_neighbors := data.framework.add_arp_neighbors\n";
    let interface = |name: &str, mac: &str, mtu: u32, addresses: &[&str], flags: u32| json!({"name": name, "hwAddr": mac, "mtu": mtu, "addresses": addresses, "rawFlags": flags});
    let route = |dest: &str, gateway: &str, device: &str, source: &str| json!({"routes": [{"dest": dest, "gateway": gateway, "device": device, "source": source, "scope": 0}]});
    let neighbor = |ip: &str, device: &str, mac: &str, state: u16, flags: u8| json!({"neighbors": [{"toIPAddress": ip, "device": device, "lladdr": mac, "state": state, "flags": flags}]});
    let mac = "52:54:00:12:34:56";
    let narrowing =
        "network := {\"allowed_cidrs\": [\"10.0.0.0/8\", \"fd00::/8\"], \"mtu\": {\"min\": 1280, \"max\": 1500}}\n";
    for backend in [Backend::Vm, Backend::Interpreter] {
        let with = |extra: &str| {
            let policy = Policy::from_bytes(format!("package policy\n{bind}{extra}").into_bytes()).unwrap();
            Engine::with_backend(&policy, Duration::from_secs(5), backend).unwrap()
        };
        let mut open = with("");
        let mut narrow = with(narrowing);
        // Allowed by both.
        for (point, input) in [
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["10.0.2.15/24", "fd00::15/64"], 0)),
            (Point::UpdateInterface, interface("eth0", mac, 1280, &[], 128)),
            (Point::UpdateRoutes, route("0.0.0.0/0", "10.0.2.2", "eth0", "")),
            (Point::UpdateRoutes, route("10.0.2.0/24", "", "eth0", "10.0.2.15")),
            (Point::UpdateRoutes, route("fd00:1::/64", "fd00::1", "eth0", "")),
            (Point::AddArpNeighbors, neighbor("10.0.2.2", "eth0", mac, 128, 0)),
        ] {
            for engine in [&mut open, &mut narrow] {
                let decision = engine.decide(point, &input);
                assert!(decision.allowed, "{point} {input}: {:?}", decision.denial);
            }
        }
        // Refused whatever the policy says.
        for (point, input, reason) in [
            (Point::UpdateInterface, interface("lo", mac, 1500, &[], 0), "loopback interface"),
            (Point::UpdateInterface, interface("eth0", "00:00:00:00:00:00", 1500, &[], 0), "zero"),
            (Point::UpdateInterface, interface("eth0", "01:00:5e:00:00:01", 1500, &[], 0), "multicast"),
            (Point::UpdateInterface, interface("eth0", "33:33:00:00:00:01", 1500, &[], 0), "multicast"),
            (Point::UpdateInterface, interface("eth0", mac, 1500, &[], 0x100), "not 0 or NOARP"),
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["127.0.0.2/8"], 0), "loopback address"),
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["::1/128"], 0), "loopback address"),
            (Point::UpdateRoutes, route("0.0.0.0/0", "", "lo", ""), "through lo"),
            (Point::UpdateRoutes, route("10.0.0.0/8", "", "eth0", "127.0.0.1"), "loopback"),
            (Point::UpdateRoutes, route("10.0.0.0/8", "::1", "eth0", ""), "loopback"),
            (Point::UpdateRoutes, route("127.0.0.0/8", "", "eth0", ""), "destination is loopback"),
            (Point::AddArpNeighbors, neighbor("10.0.2.2", "lo", mac, 128, 0), "on lo"),
            (Point::AddArpNeighbors, neighbor("10.0.2.2", "eth0", mac, 2, 0), "not permanent"),
            (Point::AddArpNeighbors, neighbor("10.0.2.2", "eth0", mac, 128, 1), "flags"),
            (Point::AddArpNeighbors, neighbor("10.0.2.2", "eth0", "ff:ff:ff:ff:ff:ff", 128, 0), "multicast"),
            (Point::AddArpNeighbors, neighbor("127.0.0.1", "eth0", mac, 128, 0), "loopback"),
        ] {
            for engine in [&mut open, &mut narrow] {
                let denial = engine.decide(point, &input).denial.unwrap_or_else(|| panic!("{point} {input} allowed"));
                assert!(denial.line().contains(reason), "{point} {input}: {}", denial.line());
            }
        }
        // Refused by the narrowing policy only.
        for (point, input, reason) in [
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["192.168.1.2/24"], 0), "allowed_cidrs"),
            (Point::UpdateInterface, interface("eth0", mac, 9000, &[], 0), "MTU 9000"),
            (Point::UpdateInterface, interface("eth0", mac, 576, &[], 0), "MTU 576"),
            (Point::UpdateRoutes, route("0.0.0.0/0", "192.168.1.1", "eth0", ""), "allowed_cidrs"),
            (Point::AddArpNeighbors, neighbor("2001:db8::1", "eth0", mac, 128, 0), "allowed_cidrs"),
            // An allowed address with a prefix that reaches beyond the allowed networks.
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["10.0.2.15/1"], 0), "allowed_cidrs"),
            (Point::UpdateInterface, interface("eth0", mac, 1500, &["fd00::15/7"], 0), "allowed_cidrs"),
            // A route to a network outside them, through an allowed gateway.
            (Point::UpdateRoutes, route("192.168.0.0/16", "10.0.2.2", "eth0", ""), "route destination"),
            (Point::UpdateRoutes, route("2001:db8::/32", "fd00::1", "eth0", ""), "route destination"),
        ] {
            assert!(open.decide(point, &input).allowed, "{point} {input}");
            let denial = narrow.decide(point, &input).denial.unwrap_or_else(|| panic!("{point} {input} allowed"));
            assert!(denial.line().contains(reason), "{point} {input}: {}", denial.line());
        }
        // Malformed input is denied, not an error.
        for point in [Point::UpdateInterface, Point::UpdateRoutes, Point::AddArpNeighbors] {
            let denial = open.decide(point, &json!({"routes": 1, "neighbors": "x"})).denial.unwrap();
            assert!(denial.line().contains("input is missing"), "{point}: {}", denial.line());
        }
    }
}

/// `container_attestation`: a running container whose entry says
/// `allow_attestation`, and `create_container` tells the agent so.
#[test]
fn a_container_attests_only_while_it_runs_and_only_if_its_entry_says_so() {
    // Entries with every field (serde's defaults), as policy gen writes them.
    let entry = |name: &str, command: &str, allow: bool| {
        let layer = &command[1..];
        let minimal = json!({"name": name, "layers": [layer], "command": [command], "allow_attestation": allow});
        let full: parma_policy::data::Container = serde_json::from_value(minimal).unwrap();
        serde_json::to_value(full).unwrap()
    };
    let containers = json!([entry("attested", "/a", true), entry("plain", "/p", false)]);
    let mut rego = format!("package policy\ncontainers := {containers}\n");
    for point in Point::ALL {
        rego.push_str(&format!("{0} := data.framework.{0}\n", point.rule()));
    }
    let mut engine = engine(&rego);
    let run = |engine: &mut Engine, id: &str, command: &str| -> bool {
        let target = format!("/l/{id}");
        for (point, input) in [
            (Point::MountDevice, json!({"target": target, "deviceHash": &command[1..]})),
            (Point::MountOverlay, json!({"containerID": id, "layerPaths": [target], "target": format!("/r/{id}")})),
        ] {
            let decision = engine.decide(point, &input);
            assert!(decision.allowed, "{point}: {:?}", decision.denial);
            engine.commit(&decision).unwrap();
        }
        let create = json!({"containerID": id, "argList": [command], "envList": [], "workingDir": "/",
            "terminal": false, "rlimits": [], "user": {"uid": 0, "gid": 0}, "groups": [],
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "noNewPrivileges": false, "privileged": false, "seccompProfileSHA256": "", "mounts": [],
            "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS, "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS});
        let decision = engine.decide(Point::CreateContainer, &create);
        assert!(decision.allowed, "{:?}", decision.denial);
        engine.commit(&decision).unwrap();
        decision.allow_attestation
    };
    let ask = |engine: &mut Engine, id: &str| {
        engine.decide(Point::ContainerAttestation, &json!({"containerID": id, "reportData": "00"}))
    };
    assert!(run(&mut engine, "a", "/a"), "create_container tells the agent to open the endpoint");
    let line = ask(&mut engine, "a").denial.unwrap().line();
    assert!(line.contains("container \"a\" is not running"), "created, not started: {line}");
    let started = engine.decide(Point::StartContainer, &json!({"containerID": "a"}));
    engine.commit(&started).unwrap();
    assert!(ask(&mut engine, "a").allowed);
    assert!(!run(&mut engine, "p", "/p"), "no endpoint for an entry without allow_attestation");
    let started = engine.decide(Point::StartContainer, &json!({"containerID": "p"}));
    engine.commit(&started).unwrap();
    let line = ask(&mut engine, "p").denial.unwrap().line();
    assert!(line.contains("\"plain\" may not get attestation reports"), "{line}");
    assert!(!ask(&mut engine, "nobody").allowed);
    assert!(!engine.decide(Point::ContainerAttestation, &json!({"containerID": "a"})).allowed, "no data: denied");
}

/// `release_secret`: a created container whose entry lists the resource,
/// as that file, from a listed broker with that certificate.
#[test]
fn a_secret_is_released_only_as_the_policy_lists_it_and_before_the_start() {
    let pin = "ab".repeat(32);
    let minimal = json!({"name": "web", "layers": ["w"], "command": ["/w"],
        "secrets": [{"broker": "trustee", "resource": "default/db/password", "file": "db"}]});
    let full: parma_policy::data::Container = serde_json::from_value(minimal).unwrap();
    let mut rego = format!("package policy\ncontainers := [{}]\n", serde_json::to_value(full).unwrap());
    rego.push_str(&format!(
        "brokers := [{{\"name\": \"trustee\", \"url\": \"https://kbs.example:8080\", \"certificate_sha256\": \"{pin}\"}}]\n"
    ));
    for point in Point::ALL {
        rego.push_str(&format!("{0} := data.framework.{0}\n", point.rule()));
    }
    let mut engine = engine(&rego);
    for (point, input) in [
        (Point::MountDevice, json!({"target": "/l/w", "deviceHash": "w"})),
        (Point::MountOverlay, json!({"containerID": "c", "layerPaths": ["/l/w"], "target": "/r/c"})),
        (
            Point::CreateContainer,
            json!({"containerID": "c", "argList": ["/w"], "envList": [], "workingDir": "/", "terminal": false,
                "rlimits": [], "user": {"uid": 0, "gid": 0}, "groups": [],
                "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
                "noNewPrivileges": false, "privileged": false, "seccompProfileSHA256": "", "mounts": [],
                "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS, "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS}),
        ),
    ] {
        let decision = engine.decide(point, &input);
        assert!(decision.allowed, "{point}: {:?}", decision.denial);
        engine.commit(&decision).unwrap();
    }
    let ask = |engine: &mut Engine, change: &dyn Fn(&mut Value)| {
        let mut input = json!({"containerID": "c", "brokerUrl": "https://kbs.example:8080",
            "brokerCertificateSHA256": pin, "resource": "default/db/password", "file": "db"});
        change(&mut input);
        engine.decide(Point::ReleaseSecret, &input)
    };
    assert!(ask(&mut engine, &|_| {}).allowed);
    for (field, value) in [
        ("resource", "default/db/other"),
        ("file", "other"),
        ("brokerUrl", "https://evil.example:8080"),
        ("brokerCertificateSHA256", "cd"),
    ] {
        let denial = ask(&mut engine, &|input| input[field] = json!(value)).denial.unwrap().line();
        assert!(denial.contains("lists no secret"), "{field}: {denial}");
    }
    let denial = ask(&mut engine, &|input| input["containerID"] = json!("nobody")).denial.unwrap().line();
    assert!(denial.contains("does not exist"), "{denial}");
    let started = engine.decide(Point::StartContainer, &json!({"containerID": "c"}));
    engine.commit(&started).unwrap();
    let denial = ask(&mut engine, &|_| {}).denial.unwrap().line();
    assert!(denial.contains("was already started"), "{denial}");
}
