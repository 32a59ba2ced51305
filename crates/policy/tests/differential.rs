//! Differential test of the two evaluation backends: random policies in the
//! generator's shape (every point bound to the framework, so the register
//! VM runs the framework's code) and random sequences of requests at every
//! enforcement point, each decided by the VM and by the interpreter; the
//! decisions (allowed, state changes, stdio access, the denial's line) must
//! be the same, and both engines commit the same state. The VM is trusted to
//! enforce only because this finds no disagreement.
//!
//! CI runs a fixed number of seeds. For a long run, by hand:
//!
//! ```sh
//! PARMA_DIFF_SECONDS=600 cargo test --release -p parma-policy --test differential -- --nocapture
//! ```
//!
//! (`PARMA_DIFF_SEED` starts from another seed; a failure prints the seed
//! and the step that disagreed.)

use std::time::{Duration, Instant};

use parma_policy::{Backend, DEFAULT_BUDGET, Decision, Engine, Framework, Point, Policy};
use serde_json::{Value, json};

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random subset, in order.
    fn subset<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        items.iter().filter(|_| self.chance(50)).cloned().collect()
    }
}

const HASHES: [&str; 4] = [
    "1111111111111111111111111111111111111111111111111111111111111111",
    "2222222222222222222222222222222222222222222222222222222222222222",
    "3333333333333333333333333333333333333333333333333333333333333333",
    "4444444444444444444444444444444444444444444444444444444444444444",
];
const COMMANDS: [&[&str]; 5] = [&["/bin/server"], &["/bin/server", "-v"], &["/bin/sh", "-c", "id"], &["/health"], &[]];
const ENV: [&str; 7] = ["PATH=/bin", "MODE=prod", "MODE=dev", "ID=42", "ID=", "X=1", "LD_PRELOAD=/x.so"];
/// Env rules, with a variable each matches (none for the glob, which the
/// framework does not know).
const ENV_RULES: [(&str, &str, &str); 5] = [
    ("PATH=/bin", "string", "PATH=/bin"),
    ("MODE=(prod|staging)", "re2", "MODE=staging"),
    ("ID=[0-9]+", "re2", "ID=42"),
    ("X=1", "string", "X=1"),
    ("X=1", "glob", ""),
];
const DIRS: [&str; 3] = ["/", "/srv", "/tmp"];
const CAPS: [&str; 4] = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"];
const CAP_SETS: [&str; 5] = ["bounding", "effective", "permitted", "inheritable", "ambient"];
const PATHS: [&str; 4] = ["/proc/kcore", "/proc/sys", "/sys/firmware", "/proc/keys"];
const IDS: [&str; 4] = ["c1", "c2", "c3", "ghost"];
const TARGETS: [&str; 4] = ["/l0", "/l1", "/l2", "/l3"];
const ISSUERS: [&str; 2] = [
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
];
const FEEDS: [&str; 2] = ["contoso/a", "contoso/b"];

fn strings(items: &[&str]) -> Value {
    json!(items)
}

fn command(rng: &mut Rng) -> Value {
    let argv: &[&str] = rng.pick::<&[&str]>(&COMMANDS);
    strings(argv)
}

fn caps(rng: &mut Rng) -> Value {
    let mut sets = serde_json::Map::new();
    for set in CAP_SETS {
        if rng.chance(85) {
            sets.insert(set.into(), json!(rng.subset(&CAPS)));
        }
    }
    Value::Object(sets)
}

fn rlimits(rng: &mut Rng) -> Value {
    let kinds = ["RLIMIT_NOFILE", "RLIMIT_NPROC"];
    json!(
        (0..rng.below(3))
            .map(|_| json!({"type": rng.pick(&kinds), "soft": rng.below(4) * 512, "hard": rng.below(4) * 1024}))
            .collect::<Vec<_>>()
    )
}

fn paths(rng: &mut Rng) -> Value {
    json!(rng.subset(&PATHS))
}

fn mount(rng: &mut Rng) -> Value {
    const OPTIONS: [&[&str]; 3] = [&["rbind", "ro"], &["ro", "rbind"], &["rbind"]];
    let options: &[&str] = rng.pick::<&[&str]>(&OPTIONS);
    json!({
        "destination": rng.pick(&["/data", "/etc/hosts"]),
        "type": rng.pick(&["bind", "tmpfs"]),
        "source": rng.pick(&["/run/parma/volumes/v", "tmpfs", "/run/parma/volumes/w"]),
        "options": options,
    })
}

/// Makes a random value of a field.
type Make = fn(&mut Rng) -> Value;

/// One container of a random policy.
fn container(rng: &mut Rng, name: &str) -> Value {
    let mut c = json!({
        "name": name,
        "layers": (0..1 + rng.below(2)).map(|_| *rng.pick(&HASHES)).collect::<Vec<_>>(),
        "command": command(rng),
        "env_rules": (0..rng.below(4)).map(|_| {
            let (pattern, strategy, _) = *rng.pick(&ENV_RULES);
            // Now and then a pattern that is not a regular expression.
            let pattern = if strategy == "re2" && rng.chance(3) { "[" } else { pattern };
            json!({"pattern": pattern, "strategy": strategy, "required": rng.chance(30)})
        }).collect::<Vec<_>>(),
        "working_dir": rng.pick(&DIRS),
        "exec_processes": (0..rng.below(3)).map(|_| {
            json!({"command": command(rng), "signals": [rng.pick(&[9, 15])], "terminal": rng.chance(30)})
        }).collect::<Vec<_>>(),
        "signals": [rng.pick(&[2, 9, 15])],
        "mounts": (0..rng.below(3)).map(|_| {
            let mut rule = mount(rng);
            if rng.chance(40) {
                rule["required"] = json!(true);
            }
            rule
        }).collect::<Vec<_>>(),
    });
    let fields = c.as_object_mut().unwrap();
    let optional: [(&str, Make); 15] = [
        ("user", |rng| json!({"uid": rng.pick(&[0, 1000]), "gid": rng.pick(&[0, 1000])})),
        ("groups", |rng| json!(rng.subset(&[5, 1000]))),
        ("capabilities", caps),
        ("no_new_privileges", |rng| json!(rng.chance(50))),
        ("allow_elevated", |rng| json!(rng.chance(50))),
        ("seccomp_profile_sha256", |rng| json!(rng.pick(&["", "abc"]))),
        ("rlimits", rlimits),
        ("terminal", |rng| json!(rng.chance(50))),
        ("allow_stdio_access", |rng| json!(rng.chance(70))),
        ("allow_resource_updates", |rng| json!(rng.chance(50))),
        ("allow_attestation", |rng| json!(rng.chance(50))),
        (
            "secrets",
            |rng| json!([{"broker": rng.pick(&["b", "c"]), "resource": rng.pick(&["r/t/a", "r/t/b"]), "file": rng.pick(&["f", "g"])}]),
        ),
        ("masked_paths", paths),
        ("readonly_paths", paths),
        ("readonly_rootfs", |rng| json!(rng.chance(50))),
    ];
    for (field, make) in optional {
        if rng.chance(60) {
            fields.insert(field.into(), make(rng));
        }
    }
    c
}

/// A policy in the generator's shape, with random data and knobs.
fn policy(rng: &mut Rng) -> (String, Vec<Value>) {
    let names: Vec<String> = (0..1 + rng.below(4)).map(|i| format!("n{i}")).collect();
    let containers: Vec<Value> = names.iter().map(|name| container(rng, name)).collect();
    let mut text = String::from("package policy\n\nimport rego.v1\n\n");
    text.push_str(&format!(
        "containers := json.unmarshal(`{}`)\n\n",
        serde_json::to_string_pretty(&containers).unwrap()
    ));
    let external = json!([{"command": command(rng), "env_rules": [{"pattern": "PATH=/bin", "strategy": "string"}], "working_dir": "/"}]);
    text.push_str(&format!("external_processes := {external}\n\n"));
    for knob in [
        "allow_properties_access",
        "allow_runtime_logging",
        "allow_unencrypted_scratch",
        "allow_scratch_swap",
        "allow_capability_dropping",
    ] {
        text.push_str(&format!("{knob} := {}\n\n", rng.chance(50)));
    }
    let order: Vec<&String> = names.iter().filter(|_| rng.chance(60)).collect();
    text.push_str(&format!("start_order := {}\n\n", json!(order)));
    let required: Vec<&String> = names.iter().filter(|_| rng.chance(40)).collect();
    text.push_str(&format!("required_containers := {}\n\n", json!(required)));
    let fragments = json!([{"issuer": ISSUERS[0], "feed": FEEDS[0], "minimum_svn": rng.below(3)}]);
    text.push_str(&format!("fragments := {fragments}\n\n"));
    if rng.chance(70) {
        let brokers = json!([{"name": "b", "url": "https://b:1", "certificate_sha256": rng.pick(&["aa", "bb"])}]);
        text.push_str(&format!("brokers := {brokers}\n\n"));
    }
    for point in Point::ALL {
        text.push_str(&format!("{0} := data.framework.{0}\n\n", point.rule()));
    }
    (text, containers)
}

/// A create input close to one of the containers, changed a little.
fn create_input(rng: &mut Rng, containers: &[Value]) -> Value {
    let c = rng.pick(containers).clone();
    let mut env: Vec<String> = Vec::new();
    if rng.chance(80) {
        // What the container's rules allow, in some order.
        for rule in c["env_rules"].as_array().into_iter().flatten() {
            let sample = ENV_RULES.iter().find(|(p, s, _)| rule["pattern"] == *p && rule["strategy"] == *s);
            if let Some((_, _, var)) = sample
                && !var.is_empty()
                && rng.chance(85)
            {
                env.push(var.to_string());
            }
        }
    }
    for _ in 0..rng.below(2) {
        if rng.chance(30) {
            env.push(rng.pick(&ENV).to_string());
        }
    }
    let masked = c.get("masked_paths").cloned().unwrap_or_else(|| json!(parma_policy::DEFAULT_MASKED_PATHS));
    let readonly = c.get("readonly_paths").cloned().unwrap_or_else(|| json!(parma_policy::DEFAULT_READONLY_PATHS));
    let mut input = json!({
        "containerID": rng.pick(&IDS),
        "argList": if rng.chance(80) { c["command"].clone() } else { command(rng) },
        "envList": env,
        "workingDir": if rng.chance(80) { c["working_dir"].clone() } else { json!(rng.pick(&DIRS)) },
        "user": c.get("user").cloned().unwrap_or_else(|| json!({"uid": 0, "gid": 0})),
        "groups": c.get("groups").cloned().unwrap_or_else(|| json!([])),
        "capabilities": c.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        "noNewPrivileges": if rng.chance(80) { c.get("no_new_privileges").cloned().unwrap_or(json!(false)) } else { json!(rng.chance(50)) },
        "privileged": rng.chance(5),
        "seccompProfileSHA256": c.get("seccomp_profile_sha256").cloned().unwrap_or_else(|| json!("")),
        "mounts": if rng.chance(70) { c["mounts"].clone() } else { json!([mount(rng)]) },
        "maskedPaths": if rng.chance(80) { masked } else { paths(rng) },
        "readonlyPaths": if rng.chance(80) { readonly } else { paths(rng) },
        "terminal": rng.chance(10),
        "readonlyRootfs": rng.chance(50),
        "rlimits": if rng.chance(60) { c.get("rlimits").cloned().unwrap_or_else(|| json!([])) } else { rlimits(rng) },
    });
    if rng.chance(15) {
        input["capabilities"] = caps(rng);
    }
    if rng.chance(10) {
        input["user"] = json!({"uid": rng.pick(&[0, 1, 1000])});
    }
    input
}

/// A random request at a random point.
fn request(rng: &mut Rng, containers: &[Value]) -> (Point, Value) {
    let id = *rng.pick(&IDS);
    match rng.below(17) {
        0 | 1 | 15 => (Point::MountDevice, json!({"target": rng.pick(&TARGETS), "deviceHash": rng.pick(&HASHES)})),
        2 => (Point::UnmountDevice, json!({"unmountTarget": rng.pick(&TARGETS)})),
        3 | 4 => {
            let paths: Vec<&str> = (0..1 + rng.below(2)).map(|_| *rng.pick(&TARGETS)).collect();
            (Point::MountOverlay, json!({"containerID": id, "layerPaths": paths, "target": format!("/r/{id}")}))
        }
        5 => (Point::UnmountOverlay, json!({"unmountTarget": format!("/r/{id}")})),
        6 | 7 => (Point::CreateContainer, create_input(rng, containers)),
        8 | 16 => (Point::StartContainer, json!({"containerID": id})),
        9 => {
            let c = rng.pick(containers);
            let argv = match c["exec_processes"].as_array().and_then(|p| p.first()) {
                Some(process) if rng.chance(70) => process["command"].clone(),
                _ => command(rng),
            };
            let env: Vec<&str> = (0..rng.below(3)).map(|_| *rng.pick(&ENV)).collect();
            let input = json!({"containerID": id, "argList": argv, "envList": env, "workingDir": c["working_dir"],
                "terminal": rng.chance(30), "rlimits": if rng.chance(70) { json!([]) } else { rlimits(rng) }});
            (Point::ExecInContainer, input)
        }
        10 => {
            let argv = command(rng);
            (
                Point::SignalContainerProcess,
                json!({"containerID": id, "signal": rng.pick(&[2, 9, 15]), "isInitProcess": rng.chance(50), "argList": argv}),
            )
        }
        11 => (Point::ShutdownContainer, json!({"containerID": id})),
        12 => (Point::UpdateContainer, json!({"containerID": id, "resources": {"memory_max": 4096}})),
        13 => {
            let running: Vec<&str> = IDS.iter().copied().filter(|_| rng.chance(60)).collect();
            (Point::GetAttestation, json!({"reportData": "00", "running": running}))
        }
        _ => match rng.below(8) {
            6 => (Point::ContainerAttestation, json!({"containerID": id, "reportData": "00"})),
            7 => {
                let input = json!({"containerID": id, "brokerUrl": rng.pick(&["https://b:1", "https://c:1"]),
                    "brokerCertificateSHA256": rng.pick(&["aa", "bb"]), "resource": rng.pick(&["r/t/a", "r/t/b"]),
                    "file": rng.pick(&["f", "g"])});
                (Point::ReleaseSecret, input)
            }
            0 => (Point::ScratchMount, json!({"target": "swap", "encrypted": rng.chance(70), "swap": rng.chance(50)})),
            1 => (Point::GetProperties, json!({})),
            2 => (Point::RuntimeLogging, json!({})),
            3 => (Point::ExecExternal, json!({"argList": command(rng), "envList": ["PATH=/bin"], "workingDir": "/"})),
            4 => {
                let names: Vec<String> = (0..rng.below(3)).map(|_| format!("n{}", rng.below(6))).collect();
                let input = json!({"issuer": rng.pick(&ISSUERS), "feed": rng.pick(&FEEDS), "svn": rng.below(4), "containers": names});
                (Point::LoadFragment, input)
            }
            _ => (Point::ScratchUnmount, json!({"unmountTarget": "swap"})),
        },
    }
}

/// A container's life as a host that follows the policy drives it: its
/// layers, its overlay, create, start, an exec, a signal, an update,
/// attestation, delete and teardown (each may still be denied: the random
/// requests around it change the state).
fn script(rng: &mut Rng, containers: &[Value]) -> Vec<(Point, Value)> {
    let index = rng.below(containers.len());
    let c = &containers[index];
    let id = IDS[rng.below(3)];
    let layers: Vec<String> = c["layers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
    let targets: Vec<String> = (0..layers.len()).map(|i| format!("/s{index}{i}")).collect();
    let mut steps = Vec::new();
    for (target, hash) in targets.iter().zip(&layers) {
        steps.push((Point::MountDevice, json!({"target": target, "deviceHash": hash})));
    }
    steps.push((Point::MountOverlay, json!({"containerID": id, "layerPaths": targets, "target": format!("/r/{id}")})));
    let mut create = create_input(rng, std::slice::from_ref(c));
    create["containerID"] = json!(id);
    steps.push((Point::CreateContainer, create.clone()));
    steps.push((Point::StartContainer, json!({"containerID": id})));
    if let Some(process) = c["exec_processes"].as_array().and_then(|p| p.first()) {
        let exec = json!({"containerID": id, "argList": process["command"], "envList": create["envList"],
            "workingDir": create["workingDir"], "terminal": rng.chance(20), "rlimits": []});
        steps.push((Point::ExecInContainer, exec));
    }
    steps.push((
        Point::SignalContainerProcess,
        json!({"containerID": id, "signal": c["signals"][0], "isInitProcess": true, "argList": create["argList"]}),
    ));
    steps.push((Point::UpdateContainer, json!({"containerID": id, "resources": {"pids_max": 64}})));
    steps.push((Point::GetAttestation, json!({"reportData": "00", "running": [id]})));
    steps.push((Point::ContainerAttestation, json!({"containerID": id, "reportData": "00"})));
    steps.push((Point::ShutdownContainer, json!({"containerID": id})));
    steps.push((Point::UnmountOverlay, json!({"unmountTarget": format!("/r/{id}")})));
    for target in &targets {
        steps.push((Point::UnmountDevice, json!({"unmountTarget": target})));
    }
    steps.reverse();
    steps
}

/// What must be equal between the backends.
fn outcome(decision: &Decision) -> (bool, String, bool, bool, String) {
    let line = decision.denial.as_ref().map(|d| d.line()).unwrap_or_default();
    let ops = serde_json::to_string(&decision.ops).unwrap();
    (decision.allowed, ops, decision.allow_stdio_access, decision.allow_attestation, line)
}

/// The interpreter reports a builtin that fails as an error, the VM as an
/// undefined rule (or an expression that does not hold): the one difference
/// in reasons the backends may have. Both are denials.
fn same_reason(vm: &str, interpreter: &str) -> bool {
    vm == interpreter || interpreter.contains("policy error")
}

struct Totals {
    policies: u64,
    refused: u64,
    decisions: u64,
    allowed: u64,
}

/// Run one seed: a policy and `steps` requests on both backends.
/// Decide each request on the VM and the interpreter, on a VM engine
/// loaded into a copy of `framework` (compiled once for every seed, as the
/// agent reads it from the image ahead of SetPolicy), and on the VM with
/// the policy compiled together with the framework (the same policy plus a
/// rule that reads the data document, which rules out loading it alone):
/// all four must agree.
fn run_seed(seed: u64, steps: usize, framework: &Framework, totals: &mut Totals) {
    let mut rng = Rng(seed);
    let (text, containers) = policy(&mut rng);
    let policy = Policy::from_bytes(text.clone().into_bytes()).unwrap();
    let shared = Engine::with_framework(framework.clone(), &policy);
    assert_eq!(
        shared.as_ref().err().map(ToString::to_string),
        Engine::new(&policy).err().map(|e| e.to_string()),
        "seed {seed:#x}: a shared framework loads the policy as a fresh one does"
    );
    let (mut vm, mut interpreter) = match (
        Engine::with_backend(&policy, DEFAULT_BUDGET, Backend::Vm),
        Engine::with_backend(&policy, DEFAULT_BUDGET, Backend::Interpreter),
    ) {
        (Ok(vm), Ok(interpreter)) => (vm, interpreter),
        // A pattern that is not a regular expression is refused at load, by both.
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            assert!(a.to_string().contains("is not a valid regular expression"), "{a}");
            totals.refused += 1;
            return;
        }
        (a, b) => panic!("seed {seed:#x}: one backend loads the policy: {:?} / {:?}", a.err(), b.err()),
    };
    for point in Point::ALL {
        assert_eq!(vm.backend(point), Backend::Vm, "{point} of a generated policy runs on the VM");
    }
    let mut shared = shared.unwrap();
    let together = format!("{text}\nreads_the_data_document := data.parma_policy_data\n");
    let mut together = Engine::new(&Policy::from_bytes(together.into_bytes()).unwrap()).unwrap();
    totals.policies += 1;
    let mut scripted = Vec::new();
    for step in 0..steps {
        if scripted.is_empty() && rng.chance(10) {
            scripted = script(&mut rng, &containers);
        }
        let (point, input) = match scripted.pop() {
            Some(next) if rng.chance(75) => next,
            Some(next) => {
                scripted.push(next);
                request(&mut rng, &containers)
            }
            None => request(&mut rng, &containers),
        };
        let on_vm = vm.decide(point, &input);
        let on_interpreter = interpreter.decide(point, &input);
        let on_shared = shared.decide(point, &input);
        assert_eq!(on_shared, on_vm, "seed {seed:#x}, step {step}: {point} on a shared framework");
        let on_together = together.decide(point, &input);
        assert_eq!(on_together, on_vm, "seed {seed:#x}, step {step}: {point} compiled with the framework");
        let (a, b) = (outcome(&on_vm), outcome(&on_interpreter));
        let agree = a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.3 == b.3 && same_reason(&a.4, &b.4);
        assert!(
            agree,
            "seed {seed:#x}, step {step}: {point} on\n{input}\nVM: {a:?}\ninterpreter: {b:?}\nstate: {}\npolicy:\n{text}",
            vm.state().to_json()
        );
        totals.decisions += 1;
        if on_vm.allowed {
            totals.allowed += 1;
            // Most actions succeed; some fail in the guest and are not committed.
            if rng.chance(90) {
                let committed = (vm.commit(&on_vm), interpreter.commit(&on_interpreter));
                assert_eq!(shared.commit(&on_shared).is_ok(), committed.0.is_ok());
                assert_eq!(together.commit(&on_together).is_ok(), committed.0.is_ok());
                assert_eq!(committed.0.is_ok(), committed.1.is_ok(), "seed {seed:#x}, step {step}: commits differ");
            }
        }
        assert_eq!(vm.state(), interpreter.state(), "seed {seed:#x}, step {step}: states differ");
        assert_eq!(vm.state(), shared.state(), "seed {seed:#x}, step {step}: a shared framework's state differs");
        assert_eq!(vm.state(), together.state(), "seed {seed:#x}, step {step}: compiled together, the state differs");
    }
}

#[test]
fn the_vm_and_the_interpreter_decide_alike() {
    let seconds: u64 = std::env::var("PARMA_DIFF_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let first: u64 = std::env::var("PARMA_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut totals = Totals { policies: 0, refused: 0, decisions: 0, allowed: 0 };
    let framework = Framework::compile().unwrap();
    let started = Instant::now();
    let mut seed = first;
    if seconds == 0 {
        // CI: a fixed set of seeds.
        for _ in 0..32 {
            run_seed(seed, 60, &framework, &mut totals);
            seed += 1;
        }
    } else {
        while started.elapsed() < Duration::from_secs(seconds) {
            run_seed(seed, 200, &framework, &mut totals);
            seed += 1;
        }
    }
    eprintln!(
        "differential: {} policies ({} more refused at load by both), {} decisions ({} allowed) on both backends, no disagreement, seeds {first:#x}..{seed:#x}, {:.1} s",
        totals.policies,
        totals.refused,
        totals.decisions,
        totals.allowed,
        started.elapsed().as_secs_f64()
    );
    // A run that allows nothing compares nothing interesting.
    assert!(totals.allowed * 10 > totals.decisions, "{} of {} allowed", totals.allowed, totals.decisions);
}
