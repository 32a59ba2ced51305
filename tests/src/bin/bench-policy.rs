//! `make bench`: latency of full stateful policy decisions (evaluation plus
//! state commit) per enforcement point, for generated policies of 1, 10 and
//! 100 containers, the policy load time, the same after 3,000 container lives
//! (the state keeps them all), and the cost of the checks on one
//! container start against `allow_all.rego`, all in one run; and what
//! SetPolicy's engine work costs with the framework parsed ahead (as the
//! agent does from its start) against parsing it at SetPolicy. Writes
//! `out/bench/policy.json`.
//!
//! Each container of a generated policy has 3-8 layers, 5-15 env rules (a
//! third of them regexes) and 2 mounts, as the policy issue specifies.

use std::time::{Duration, Instant};

use parma_policy::{Backend, DEFAULT_BUDGET, Engine, Framework, Point, Policy};
use serde::Serialize;
use serde_json::{Value, json};

const SIZES: [usize; 3] = [1, 10, 100];
/// Policy loads timed each way for SetPolicy's engine work.
const SET_POLICY_RUNS: usize = 21;
/// Container starts measured per policy size.
const ROUNDS: usize = 200;
/// Container lives of the long-lived agent (the first and last `ROUNDS` compared).
const LONG_LIVES: usize = 3000;

fn hash(container: usize, layer: usize) -> String {
    format!("{:016x}{:048x}", container as u64 * 1000 + layer as u64, 0xabcdef_u64)
}

fn layers(c: usize) -> usize {
    3 + c % 6
}

fn env_rules(c: usize) -> Vec<Value> {
    (0..5 + c % 11)
        .map(|i| {
            if i % 3 == 2 {
                json!({"pattern": format!("VAR{i}=[a-z]+[0-9]*"), "strategy": "re2", "required": false})
            } else {
                json!({"pattern": format!("VAR{i}=value{i}"), "strategy": "string", "required": i == 0})
            }
        })
        .collect()
}

fn env_list(c: usize) -> Vec<String> {
    (0..5 + c % 11).map(|i| if i % 3 == 2 { format!("VAR{i}=abc{i}") } else { format!("VAR{i}=value{i}") }).collect()
}

fn container(c: usize) -> Value {
    json!({
        "name": format!("c{c}"),
        "layers": (0..layers(c)).map(|l| hash(c, l)).collect::<Vec<_>>(),
        "command": ["/bin/app", format!("--id={c}")],
        "env_rules": env_rules(c),
        "working_dir": "/app",
        "user": {"uid": 1000, "gid": 1000},
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"], "inheritable": [], "ambient": []},
        "no_new_privileges": true,
        "mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": "/run/parma/[a-z0-9]+/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "bind", "source": "/run/parma/[a-z0-9]+/data", "options": ["rbind", "rw"]},
        ],
        "exec_processes": [{"command": ["/bin/health"], "signals": [15]}],
        "signals": [15],
    })
}

fn generated_policy(n: usize) -> String {
    let containers: Vec<Value> = (0..n).map(container).collect();
    // The policy `parma policy gen` writes for these containers.
    parma_host::policy_gen::rego(&containers, "bench-policy").unwrap_or_default()
}

/// The requests of one container's life, in order.
fn lifecycle(c: usize, round: usize) -> Vec<(Point, Value)> {
    let id = format!("r{round}");
    let paths: Vec<String> = (0..layers(c)).map(|l| format!("/run/layers/{round}-{l}")).collect();
    let mut steps: Vec<(Point, Value)> = paths
        .iter()
        .enumerate()
        .map(|(l, path)| (Point::MountDevice, json!({"target": path, "deviceHash": hash(c, l)})))
        .collect();
    steps.push((
        Point::MountOverlay,
        json!({"containerID": id, "layerPaths": paths, "target": format!("/run/{id}/rootfs")}),
    ));
    steps.push((
        Point::CreateContainer,
        json!({
            "containerID": id,
            "argList": ["/bin/app", format!("--id={c}")],
            "envList": env_list(c),
            "workingDir": "/app",
            "user": {"uid": 1000, "gid": 1000},
            "groups": [],
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"], "inheritable": [], "ambient": []},
            "noNewPrivileges": true,
            "privileged": false,
            "seccompProfileSHA256": "",
            "mounts": [
                {"destination": "/etc/hosts", "type": "bind", "source": format!("/run/parma/{id}/hosts"), "options": ["ro", "rbind"]},
                {"destination": "/data", "type": "bind", "source": format!("/run/parma/{id}/data"), "options": ["rw", "rbind"]},
            ],
            "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS,
            "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS,
            "terminal": false,
            "rlimits": [],
        }),
    ));
    steps.push((Point::StartContainer, json!({"containerID": id})));
    steps.push((
        Point::ExecInContainer,
        json!({"containerID": id, "argList": ["/bin/health"], "envList": env_list(c), "workingDir": "/app",
               "terminal": false, "rlimits": []}),
    ));
    steps.push((
        Point::SignalContainerProcess,
        json!({"containerID": id, "signal": 15, "isInitProcess": true, "argList": []}),
    ));
    steps.push((Point::ShutdownContainer, json!({"containerID": id})));
    steps.push((Point::UnmountOverlay, json!({"unmountTarget": format!("/run/{id}/rootfs")})));
    steps.extend(paths.iter().map(|path| (Point::UnmountDevice, json!({"unmountTarget": path}))));
    steps
}

#[derive(Default, Serialize)]
struct PointStats {
    samples: usize,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct SizeReport {
    containers: usize,
    policy_bytes: usize,
    load_ms: f64,
    points: std::collections::BTreeMap<&'static str, PointStats>,
    container_start_us: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// The latencies of one point, sorted.
fn sorted(samples: &[(Point, Duration)], point: Point) -> Vec<Duration> {
    let mut times: Vec<Duration> = samples.iter().filter(|(p, _)| *p == point).map(|(_, d)| *d).collect();
    times.sort();
    times
}

/// Run `ROUNDS` container lives; returns per-point latencies and the median
/// time of one container start (all decisions of one life up to create).
fn run(engine: &mut Engine, containers: usize) -> anyhow::Result<(Vec<(Point, Duration)>, f64)> {
    run_rounds(engine, containers, ROUNDS)
}

/// [`run`] for `rounds` container lives; samples stay in order.
fn run_rounds(engine: &mut Engine, containers: usize, rounds: usize) -> anyhow::Result<(Vec<(Point, Duration)>, f64)> {
    let mut samples = Vec::new();
    let mut starts = Vec::new();
    for round in 0..rounds {
        let c = round % containers;
        let mut start = Duration::ZERO;
        for (point, input) in lifecycle(c, round) {
            let t = Instant::now();
            let decision = engine.decide(point, &input);
            engine.commit(&decision)?;
            let elapsed = t.elapsed();
            anyhow::ensure!(decision.allowed, "{point} denied in round {round}: {:?}", decision.denial);
            if matches!(
                point,
                Point::MountDevice | Point::MountOverlay | Point::CreateContainer | Point::StartContainer
            ) {
                start += elapsed;
            }
            samples.push((point, elapsed));
        }
        starts.push(start);
    }
    starts.sort();
    Ok((samples, percentile(&starts, 0.5)))
}

fn main() -> anyhow::Result<()> {
    let mut reports = Vec::new();
    let mut interpreter = Vec::new();
    for n in SIZES {
        let text = generated_policy(n);
        let policy = Policy::from_bytes(text.clone().into_bytes())?;
        // The baseline: the same decisions through regorus's interpreter.
        let mut engine = Engine::with_backend(&policy, DEFAULT_BUDGET, Backend::Interpreter)?;
        let (samples, start_us) = run(&mut engine, n)?;
        let create: Vec<Duration> = sorted(&samples, Point::CreateContainer);
        interpreter.push((percentile(&create, 0.5), start_us));

        let started = Instant::now();
        let mut engine = Engine::new(&policy)?;
        // The first decision prepares the engine: part of loading.
        let _ = engine.decide(Point::GetProperties, &json!({}));
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let (samples, container_start_us) = run(&mut engine, n)?;
        let mut points = std::collections::BTreeMap::new();
        for point in Point::ALL {
            let times = sorted(&samples, point);
            if times.is_empty() {
                continue;
            }
            points.insert(
                point.rule(),
                PointStats { samples: times.len(), p50_us: percentile(&times, 0.5), p99_us: percentile(&times, 0.99) },
            );
        }
        reports.push(SizeReport { containers: n, policy_bytes: text.len(), load_ms, points, container_start_us });
    }

    // SetPolicy's engine work for the 10-container policy: everything from
    // the framework's text (Engine::new) against loading into a copy of a
    // framework parsed ahead, interleaved, each up to its first decision.
    let policy = Policy::from_bytes(generated_policy(10).into_bytes())?;
    let framework = Framework::compile()?;
    let (mut fresh, mut ahead) = (Vec::new(), Vec::new());
    for _ in 0..SET_POLICY_RUNS {
        let started = Instant::now();
        let mut engine = Engine::new(&policy)?;
        let _ = engine.decide(Point::GetProperties, &json!({}));
        fresh.push(started.elapsed());
        let started = Instant::now();
        let mut engine = Engine::with_framework(framework.clone(), &policy)?;
        let _ = engine.decide(Point::GetProperties, &json!({}));
        ahead.push(started.elapsed());
    }
    let (fresh_ms, ahead_ms) = (parma_tests::median_secs(&fresh) * 1e3, parma_tests::median_secs(&ahead) * 1e3);

    // A long-lived agent: the state keeps every container ever started, so
    // a decision (and its commit) must not grow with it.
    let mut engine = Engine::new(&Policy::from_bytes(generated_policy(10).into_bytes())?)?;
    let (samples, _) = run_rounds(&mut engine, 10, LONG_LIVES)?;
    let creates: Vec<Duration> =
        samples.iter().filter(|(p, _)| *p == Point::CreateContainer).map(|(_, d)| *d).collect();
    let p50_of = |lives: &[Duration]| {
        let mut lives = lives.to_vec();
        lives.sort();
        percentile(&lives, 0.5)
    };
    let early_us = p50_of(creates.get(..ROUNDS).unwrap_or_default());
    let late_us = p50_of(creates.get(creates.len().saturating_sub(ROUNDS)..).unwrap_or_default());

    // The same container starts under allow_all, in the same run.
    let allow_all = std::fs::read(parma_tests::Paths::get().repo.join("policies/allow_all.rego"))?;
    let mut engine = Engine::new(&Policy::from_bytes(allow_all)?)?;
    let (_, allow_all_start_us) = run(&mut engine, 10)?;
    let generated_start_us = reports.get(1).map_or(0.0, |r| r.container_start_us);

    let baseline: Vec<Value> = reports
        .iter()
        .zip(&interpreter)
        .map(|(r, (create_us, start_us))| {
            let vm_create = r.points.get("create_container").map_or(0.0, |s| s.p50_us);
            json!({"containers": r.containers, "create_container_p50_us": create_us, "container_start_us": start_us,
                   "create_container_speedup": create_us / vm_create,
                   "container_start_speedup": start_us / r.container_start_us})
        })
        .collect();
    let report = json!({
        "rounds": ROUNDS,
        "backend": "regorus register VM (RVM)",
        "sizes": reports,
        "interpreter_baseline": baseline,
        "long_lived": {"lives": LONG_LIVES, "create_container_p50_us_first": early_us,
                       "create_container_p50_us_last": late_us, "ratio": late_us / early_us},
        "container_start_us": {"generated_10": generated_start_us, "allow_all": allow_all_start_us,
                               "ratio": generated_start_us / allow_all_start_us},
        "set_policy_engine_ms": {"runs": SET_POLICY_RUNS, "framework_parsed_at_set_policy": fresh_ms,
                                 "framework_parsed_ahead": ahead_ms, "ratio": fresh_ms / ahead_ms},
    });
    let out = parma_tests::Paths::get().repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("policy.json"), serde_json::to_string_pretty(&report)? + "\n")?;

    println!("{:<26} {:>10} {:>10} {:>10}", "p50 / p99 (us)", "1", "10", "100");
    let rules: Vec<&str> = reports.first().map(|r| r.points.keys().copied().collect()).unwrap_or_default();
    for rule in rules {
        let cells: Vec<String> = reports
            .iter()
            .map(|r| r.points.get(rule).map_or("-".into(), |s| format!("{:.0}/{:.0}", s.p50_us, s.p99_us)))
            .collect();
        println!("{rule:<26} {:>10} {:>10} {:>10}", cells[0], cells[1], cells[2]);
    }
    let loads: Vec<String> = reports.iter().map(|r| format!("{:.1}", r.load_ms)).collect();
    println!("{:<26} {:>10} {:>10} {:>10}", "load (ms)", loads[0], loads[1], loads[2]);
    for (r, (create_us, start_us)) in reports.iter().zip(&interpreter) {
        let vm_create = r.points.get("create_container").map_or(0.0, |s| s.p50_us);
        println!(
            "{:>3} containers: interpreter create_container {create_us:.0} us, start {start_us:.0} us; VM {:.1}x, {:.1}x faster",
            r.containers,
            create_us / vm_create,
            start_us / r.container_start_us
        );
    }
    println!(
        "container start decisions: {generated_start_us:.0} us generated (10 containers) vs {allow_all_start_us:.0} us allow_all"
    );
    println!(
        "long-lived agent (10 containers): create_container p50 {early_us:.0} us over the first {ROUNDS} lives, \
         {late_us:.0} us over the last {ROUNDS} of {LONG_LIVES} ({:.2}x)",
        late_us / early_us
    );
    println!(
        "SetPolicy engine work (10 containers): {fresh_ms:.2} ms parsing the framework then, {ahead_ms:.2} ms with it \
         parsed ahead ({:.2}x)",
        fresh_ms / ahead_ms
    );
    println!("wrote {}", out.join("policy.json").display());
    Ok(())
}
