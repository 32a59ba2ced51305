//! `make bench`: the container lifecycle end to end under TCG, in one run.
//!
//! 1. Create and start latency of the test image's container under its
//!    generated policy and under `allow_all.rego`, each policy the HOST_DATA
//!    of its own UVM. Both UVMs are booted at once and driven rep by rep in
//!    turn, so a noisy machine hurts both alike; the first `WARMUP` reps of
//!    each are discarded. Only `CreateContainer` + `StartContainer` are
//!    timed: the overlay, the output and the teardown are not.
//! 2. The time from starting `parma run` (the release CLI) to the
//!    container's first stdout byte and to its exit, against plain boots to
//!    agent-ready, interleaved, median of `RUNS` each.
//! 3. Where `parma run`'s time goes: the same run through the library
//!    (`parma_host::run::run`), each step timed from its progress events and
//!    the first stdout byte, median of `RUNS`; each step's share of the gap
//!    between first output and agent-ready (everything but the boot). The
//!    rounds of 2 and 3 are interleaved (a CLI run, a plain boot, a library
//!    run), so the breakdown is of the same minutes as the ratio.
//! 4. SetPolicy's latency sent at agent-ready (as `parma run` sends it) and
//!    after the agent sat idle for 2 s (when its low-priority thread has
//!    parsed the framework and warmed the engine up): under TCG most of
//!    SetPolicy is translating code that runs for the first time.
//!
//! Writes `out/bench/e2e.json`.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parma_host::client::Client;
use parma_host::run;
use parma_protocol::ProcessSpec;
use parma_tests::{Boot, Guest, Paths, median_secs, oci};
use serde::Serialize;

/// Container lives per UVM; the first `WARMUP` are discarded.
const REPS: usize = 42;
const WARMUP: usize = 2;
/// `parma run`s and plain boots.
const RUNS: usize = 9;
const READY: Duration = Duration::from_secs(90);
/// Boots for each SetPolicy timing.
const SET_POLICY_BOOTS: usize = 3;
/// How long the agent sits idle before the second SetPolicy timing.
const IDLE: Duration = Duration::from_secs(2);
const CALL: Duration = Duration::from_secs(60);
/// A `parma run` still going after this is killed and the bench fails.
const RUN_LIMIT: Duration = Duration::from_secs(180);

#[derive(Serialize)]
struct Latency {
    median_s: f64,
    p90_s: f64,
    samples_s: Vec<f64>,
}

impl Latency {
    fn of(samples: &[Duration]) -> Self {
        let mut sorted: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        sorted.sort_by(f64::total_cmp);
        let p90 = ((sorted.len() as f64 - 1.0) * 0.9).round() as usize;
        Self {
            median_s: median_secs(samples),
            p90_s: sorted.get(p90).copied().unwrap_or(0.0),
            samples_s: samples.iter().map(Duration::as_secs_f64).collect(),
        }
    }
}

#[derive(Serialize)]
struct Lifecycle {
    create: Latency,
    start: Latency,
    create_start: Latency,
}

#[derive(Serialize)]
struct Report {
    accel: &'static str,
    reps: usize,
    warmup: usize,
    generated: Lifecycle,
    allow_all: Lifecycle,
    /// Median create+start, generated / allow_all.
    overhead_ratio: f64,
    /// The same from the reps' pairs (generated and allow_all run back to
    /// back): 1 + median(generated - allow_all) / median(allow_all). Less
    /// noisy than the ratio of medians, whose start times vary by +-50%.
    overhead_ratio_paired: f64,
    /// Median of the pairs' create differences: the policy decision's cost
    /// under TCG, the only step that differs.
    create_extra_s: f64,
    /// The policy's extra create+start time as a share of `parma run`'s
    /// time to first output (the whole start of a container, as the paper counts it).
    overhead_of_run: f64,
    runs: usize,
    run_first_output_s: f64,
    run_exit_s: f64,
    agent_ready_s: f64,
    /// First output of `parma run` / boot to agent-ready.
    first_output_ratio: f64,
    /// Median over the rounds of that round's `parma run` first output /
    /// its plain boot to agent-ready (run back to back).
    first_output_ratio_paired: f64,
    /// Median over the library runs of (boot to first output) / (boot to
    /// agent-ready) of the same UVM: the steps against the boot that ran
    /// them, free of the spread between boots (0.2-0.5 s here).
    first_output_ratio_within_run: f64,
    run_first_output_samples_s: Vec<f64>,
    run_exit_samples_s: Vec<f64>,
    agent_ready_samples_s: Vec<f64>,
    /// Where `parma run`'s time goes (the library, median of `runs`).
    breakdown: Vec<StepShare>,
    /// SetPolicy sent at agent-ready, median of [`SET_POLICY_BOOTS`] boots.
    set_policy_at_ready_s: f64,
    /// SetPolicy sent after `set_policy_idle_s` of idle agent (warmed up).
    set_policy_after_idle_s: f64,
    set_policy_idle_s: f64,
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values.get(n / 2).copied().unwrap_or_default(),
        n => {
            (values.get(n / 2 - 1).copied().unwrap_or_default() + values.get(n / 2).copied().unwrap_or_default()) / 2.0
        }
    }
}

/// The test image, its layers and its generated policy.
type Image = oci::PolicyFixture;

/// A UVM whose HOST_DATA is its policy's hash, with the image's layers mounted.
struct Vm {
    name: &'static str,
    guest: Guest,
    client: Client,
    create: Vec<Duration>,
    create_start: Vec<Duration>,
}

impl Vm {
    /// Start QEMU; [`Vm::ready`] waits for it.
    fn boot(paths: &Paths, policy: &Path, image: &Image) -> anyhow::Result<Guest> {
        let mut boot = Boot::emulated_for_policy(policy)?;
        boot.disks = run::layer_disks(&image.built, &image.layers_dir);
        Guest::boot(paths, &boot)
    }

    /// Wait for the agent, set the policy, mount the layers once.
    fn ready(name: &'static str, mut guest: Guest, policy: &Path, image: &Image) -> anyhow::Result<Self> {
        guest.wait_ready(READY)?;
        let mut client = guest.client(CALL)?;
        client.set_policy(std::fs::read_to_string(policy)?).with_context(|| format!("{name}: set_policy"))?;
        for (index, layer) in image.built.layers.layers.iter().enumerate() {
            client
                .mount_layer(&run::layer_name(index), &run::layer_serial(index), &layer.root_hash, layer.hash_offset)
                .with_context(|| format!("{name}: mount layer {index}"))?;
        }
        Ok(Self { name, guest, client, create: Vec::new(), create_start: Vec::new() })
    }

    /// One container's life; only create + start are timed.
    fn rep(&mut self, id: &str, layers: &[String], process: &ProcessSpec) -> anyhow::Result<(Duration, Duration)> {
        self.client.mount_overlay(id, layers, true).context("mount_overlay")?;
        let started = Instant::now();
        self.client.create_container(id, process).context("create_container")?;
        let create = started.elapsed();
        self.client.start_container(id).context("start_container")?;
        let create_start = started.elapsed();
        self.client.write_stdin(id, None, &[], true).context("write_stdin")?;
        let status = run::pump(&mut self.client, id, None, &mut std::io::sink(), &mut std::io::sink(), CALL)?;
        ensure!(run::exit_code(&status) == 0, "the container exited with {}", run::exit_code(&status));
        self.client.delete_container(id).context("delete_container")?;
        self.client.unmount_overlay(id).context("unmount_overlay")?;
        Ok((create, create_start))
    }

    fn lifecycle(&self) -> Lifecycle {
        let start: Vec<Duration> = self.create_start.iter().zip(&self.create).map(|(both, c)| *both - *c).collect();
        Lifecycle {
            create: Latency::of(&self.create),
            start: Latency::of(&start),
            create_start: Latency::of(&self.create_start),
        }
    }

    /// Unmount the layers and power off cleanly, with no panic on the console.
    fn finish(mut self, layers: &[String]) -> anyhow::Result<()> {
        for name in layers {
            self.client.unmount_layer(name).with_context(|| format!("{}: unmount {name}", self.name))?;
        }
        self.client.ping()?;
        self.guest.check_serial()?;
        self.client.shutdown()?;
        ensure!(self.guest.wait_exit(Duration::from_secs(30))?.success(), "{}: QEMU did not exit cleanly", self.name);
        Ok(())
    }
}

/// `parma run` of the image: time to the first stdout byte and to exit.
fn parma_run(paths: &Paths, cli: &Path, image: &Image) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut command = image.parma_run(cli, &paths.uvm);
    command.current_dir(&paths.repo).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, QEMU included, so a hung run can be killed whole.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().with_context(|| format!("cannot run {}", cli.display()))?;
    let group = Pid::from_raw(i32::try_from(child.id())?);
    let (done, watch) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(RUN_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
            let _ = killpg(group, Signal::SIGKILL);
        }
    });
    let mut stderr_pipe = child.stderr.take().context("no stderr pipe")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let mut stdout_pipe = child.stdout.take().context("no stdout pipe")?;
    let mut byte = [0u8; 1];
    let first = match stdout_pipe.read(&mut byte)? {
        0 => None,
        _ => Some(started.elapsed()),
    };
    let mut stdout = byte.to_vec();
    stdout.truncate(usize::from(first.is_some()));
    stdout_pipe.read_to_end(&mut stdout)?;
    let status = child.wait()?;
    let exit = started.elapsed();
    let _ = done.send(());
    let _ = watchdog.join();
    let stderr = stderr.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&stdout);
    ensure!(status.success(), "parma run: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(stdout.lines().any(|l| l == "cwd=/srv"), "parma run printed no cwd=/srv:\n{stdout}\nstderr:\n{stderr}");
    let Some(first) = first else { bail!("parma run printed nothing\nstderr:\n{stderr}") };
    Ok((first, exit))
}

/// A sink that notes when the first byte came.
struct FirstByte<'a> {
    at: &'a std::cell::Cell<Option<Instant>>,
}

impl std::io::Write for FirstByte<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.at.get().is_none() {
            self.at.set(Some(Instant::now()));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The steps of one `run::run`, in order, as (name, time since the previous).
const STEPS: [&str; 8] = [
    "prepare",
    "boot to agent-ready",
    "set policy",
    "mount layers",
    "mount overlay",
    "create",
    "start",
    "first output",
];

/// One `parma run` through the library: each step's duration.
fn timed_run(paths: &Paths, image: &Image) -> anyhow::Result<[Duration; 8]> {
    let mut options = run::RunOptions::new(&paths.uvm, &image.policy, &image.layout);
    options.reference = Some(oci::REF_NAME.into());
    options.layers_dir = image.layers_dir.clone();
    options.boot_deadline = READY;
    let marks = std::cell::RefCell::new(vec![Instant::now()]);
    let first = std::cell::Cell::new(None);
    let io = run::RunIo {
        stdin: None,
        stdout: &mut FirstByte { at: &first },
        stderr: &mut std::io::sink(),
        forward: &mut run::NoForward,
    };
    let outcome = run::run(&options, io, &|step| match step {
        run::Step::Booting
        | run::Step::Ready(_)
        | run::Step::PolicySet(_)
        | run::Step::LayersMounted
        | run::Step::OverlayMounted
        | run::Step::Created
        | run::Step::Started(_) => marks.borrow_mut().push(Instant::now()),
        _ => {}
    })?;
    ensure!(outcome.exit_code == 0, "the container exited {}", outcome.exit_code);
    let mut marks = marks.into_inner();
    marks.push(first.get().context("the container printed nothing")?);
    ensure!(marks.len() == STEPS.len() + 1, "{} progress marks", marks.len());
    let mut steps = [Duration::ZERO; 8];
    for (step, pair) in steps.iter_mut().zip(marks.windows(2)) {
        if let [before, after] = pair {
            *step = after.saturating_duration_since(*before);
        }
    }
    Ok(steps)
}

#[derive(Serialize)]
struct StepShare {
    step: &'static str,
    median_s: f64,
    /// Share of the gap: everything but the boot to agent-ready.
    share_of_gap: f64,
}

/// Boot the image as it is and wait for the agent; time from spawning QEMU.
fn plain_boot(paths: &Paths) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut guest = Guest::boot(paths, &Boot::default())?;
    guest.wait_ready(READY)?;
    let elapsed = started.elapsed();
    guest.client(Duration::from_secs(10))?.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success(), "QEMU did not exit cleanly");
    guest.check_serial()?;
    Ok(elapsed)
}

/// SetPolicy's latency for the generated policy, sent at agent-ready (as
/// `parma run` does) and after the agent sat idle for [`IDLE`] (time the
/// agent's low-priority thread uses to parse the framework and warm the
/// engine up), one boot each, alternating.
fn set_policy_latency(paths: &Paths, image: &Image) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let text = std::fs::read_to_string(&image.policy)?;
    let (mut at_ready, mut after_idle) = (Vec::new(), Vec::new());
    for i in 0..SET_POLICY_BOOTS {
        for idle in [Duration::ZERO, IDLE] {
            let mut guest = Vm::boot(paths, &image.policy, image)?;
            guest.wait_ready(READY)?;
            let mut client = guest.client(CALL)?;
            std::thread::sleep(idle);
            let started = Instant::now();
            client.set_policy(text.clone()).context("set_policy")?;
            let took = started.elapsed();
            client.shutdown()?;
            ensure!(guest.wait_exit(Duration::from_secs(10))?.success(), "QEMU did not exit cleanly");
            guest.check_serial()?;
            eprintln!(
                "set policy {}/{SET_POLICY_BOOTS} after {:.1} s idle: {:.3} s",
                i + 1,
                idle.as_secs_f64(),
                took.as_secs_f64()
            );
            if idle.is_zero() { at_ready.push(took) } else { after_idle.push(took) }
        }
    }
    Ok((at_ready, after_idle))
}

fn main() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let cli = paths.repo.join("target/release/parma");
    if !cli.is_file() {
        bail!("{} is missing: run `cargo build --release -p parma` first", cli.display());
    }
    let image = Image::new(&paths.guest_binary("oci-hello")?, "bench", None, None)?;
    let allow_all = paths.repo.join("policies/allow_all.rego");
    let process = run::process_from_config(&image.built.config, &[])?;
    let layers: Vec<String> = (0..image.built.layers.layers.len()).map(run::layer_name).collect();
    ensure!(layers == ["l0", "l1"], "the test image has two layers");

    // 1. Both UVMs at once, reps in turn.
    let generated = Vm::boot(&paths, &image.policy, &image)?;
    let allowing = Vm::boot(&paths, &allow_all, &image)?;
    let mut vms = [
        Vm::ready("generated", generated, &image.policy, &image)?,
        Vm::ready("allow_all", allowing, &allow_all, &image)?,
    ];
    for i in 0..REPS {
        let id = format!("c{i}");
        for vm in &mut vms {
            let (create, create_start) = vm
                .rep(&id, &layers, &process)
                .with_context(|| format!("{} rep {i}\nserial:\n{}", vm.name, vm.guest.serial()))?;
            eprintln!(
                "rep {}/{REPS} {:<9}: create {:.2} ms, start {:.2} ms{}",
                i + 1,
                vm.name,
                create.as_secs_f64() * 1e3,
                (create_start - create).as_secs_f64() * 1e3,
                if i < WARMUP { " (warm-up)" } else { "" }
            );
            if i >= WARMUP {
                vm.create.push(create);
                vm.create_start.push(create_start);
            }
        }
    }
    let [generated, allowing] = vms;
    let (generated_lifecycle, allow_all_lifecycle) = (generated.lifecycle(), allowing.lifecycle());
    let paired = |generated: &[Duration], allowing: &[Duration]| {
        let diffs: Vec<f64> = generated.iter().zip(allowing).map(|(g, a)| g.as_secs_f64() - a.as_secs_f64()).collect();
        median_f64(diffs)
    };
    let create_start_extra_s = paired(&generated.create_start, &allowing.create_start);
    let create_extra_s = paired(&generated.create, &allowing.create);
    generated.finish(&layers)?;
    allowing.finish(&layers)?;

    // 2. `parma run` to first output, plain boots, and (3.) the steps of
    // the same run through the library, interleaved so that each round
    // sees the machine alike.
    let (mut firsts, mut exits, mut readies) = (Vec::new(), Vec::new(), Vec::new());
    let mut samples: Vec<[Duration; 8]> = Vec::new();
    for i in 0..RUNS {
        let (first, exit) = parma_run(&paths, &cli, &image)?;
        let ready = plain_boot(&paths)?;
        let steps = timed_run(&paths, &image)?;
        eprintln!(
            "round {}/{RUNS}: parma run first output {:.3} s, exit {:.3} s; boot to ready {:.3} s; library: {}",
            i + 1,
            first.as_secs_f64(),
            exit.as_secs_f64(),
            ready.as_secs_f64(),
            STEPS.iter().zip(&steps).map(|(n, d)| format!("{n} {:.3}", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
        );
        firsts.push(first);
        exits.push(exit);
        readies.push(ready);
        samples.push(steps);
    }
    // 4. SetPolicy at ready and after the agent was idle.
    let (at_ready, after_idle) = set_policy_latency(&paths, &image)?;

    let medians: Vec<f64> = (0..STEPS.len())
        .map(|i| median_secs(&samples.iter().filter_map(|s| s.get(i).copied()).collect::<Vec<_>>()))
        .collect();
    let boot_index = 1;
    let gap: f64 = medians.iter().enumerate().filter(|(i, _)| *i != boot_index).map(|(_, m)| m).sum();
    let breakdown: Vec<StepShare> = STEPS
        .iter()
        .zip(&medians)
        .enumerate()
        .map(|(i, (step, median))| StepShare {
            step,
            median_s: *median,
            share_of_gap: if i == boot_index || gap <= 0.0 { 0.0 } else { median / gap },
        })
        .collect();

    let paired_ratios: Vec<f64> =
        firsts.iter().zip(&readies).map(|(first, ready)| first.as_secs_f64() / ready.as_secs_f64()).collect();
    let within_run: Vec<f64> = samples
        .iter()
        .filter_map(|steps| {
            let to_ready: f64 = steps.iter().take(boot_index + 1).map(Duration::as_secs_f64).sum();
            let to_first: f64 = steps.iter().map(Duration::as_secs_f64).sum();
            (to_ready > 0.0).then(|| to_first / to_ready)
        })
        .collect();
    let run_first_output_s = median_secs(&firsts);
    let agent_ready_s = median_secs(&readies);
    let policy_extra_s = generated_lifecycle.create_start.median_s - allow_all_lifecycle.create_start.median_s;
    let report = Report {
        accel: "tcg",
        reps: REPS,
        warmup: WARMUP,
        overhead_ratio: generated_lifecycle.create_start.median_s / allow_all_lifecycle.create_start.median_s,
        overhead_ratio_paired: 1.0 + create_start_extra_s / allow_all_lifecycle.create_start.median_s,
        create_extra_s,
        generated: generated_lifecycle,
        allow_all: allow_all_lifecycle,
        runs: RUNS,
        run_first_output_s,
        run_exit_s: median_secs(&exits),
        agent_ready_s,
        first_output_ratio: run_first_output_s / agent_ready_s,
        first_output_ratio_paired: median_f64(paired_ratios),
        first_output_ratio_within_run: median_f64(within_run),
        overhead_of_run: policy_extra_s / run_first_output_s,
        run_first_output_samples_s: firsts.iter().map(Duration::as_secs_f64).collect(),
        run_exit_samples_s: exits.iter().map(Duration::as_secs_f64).collect(),
        agent_ready_samples_s: readies.iter().map(Duration::as_secs_f64).collect(),
        breakdown,
        set_policy_at_ready_s: median_secs(&at_ready),
        set_policy_after_idle_s: median_secs(&after_idle),
        set_policy_idle_s: IDLE.as_secs_f64(),
    };

    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("e2e.json"), serde_json::to_string_pretty(&report)? + "\n")?;

    let kept = REPS - WARMUP;
    println!("{:<34} {:>12} {:>12}", format!("lifecycle (TCG, {kept} reps)"), "generated", "allow_all");
    let rows = [
        ("create median", report.generated.create.median_s, report.allow_all.create.median_s),
        ("create p90", report.generated.create.p90_s, report.allow_all.create.p90_s),
        ("start median", report.generated.start.median_s, report.allow_all.start.median_s),
        ("start p90", report.generated.start.p90_s, report.allow_all.start.p90_s),
        ("create+start median", report.generated.create_start.median_s, report.allow_all.create_start.median_s),
        ("create+start p90", report.generated.create_start.p90_s, report.allow_all.create_start.p90_s),
    ];
    for (name, generated, allowing) in rows {
        println!("{name:<34} {:>9.2} ms {:>9.2} ms", generated * 1e3, allowing * 1e3);
    }
    println!("{:<34} {:>12.4}", "ratio generated/allow_all", report.overhead_ratio);
    println!("{:<34} {:>12.4}", "ratio from paired reps", report.overhead_ratio_paired);
    println!("{:<34} {:>9.2} ms", "create extra (paired median)", report.create_extra_s * 1e3);
    println!("{:<34} {:>12}", format!("parma run (TCG, median of {RUNS})"), "value");
    println!("{:<34} {:>10.3} s", "start to first stdout byte", report.run_first_output_s);
    println!("{:<34} {:>10.3} s", "start to exit", report.run_exit_s);
    println!("{:<34} {:>10.3} s", "plain boot to agent ready", report.agent_ready_s);
    println!("{:<34} {:>12.3}", "ratio first output/ready", report.first_output_ratio);
    println!("{:<34} {:>12.3}", "  median of the rounds' ratios", report.first_output_ratio_paired);
    println!("{:<34} {:>12.3}", "  within one UVM (library)", report.first_output_ratio_within_run);
    println!("{:<34} {:>11.3}%", "policy overhead / first output", report.overhead_of_run * 100.0);
    println!("{:<34} {:>12} {:>10}", format!("parma run's steps (median of {RUNS})"), "time", "of gap");
    for step in &report.breakdown {
        println!("{:<34} {:>10.3} s {:>9.1}%", step.step, step.median_s, step.share_of_gap * 100.0);
    }
    println!(
        "{:<34} {:>10.3} s, after {:.0} s idle {:.3} s",
        format!("set policy at ready (median of {SET_POLICY_BOOTS})"),
        report.set_policy_at_ready_s,
        report.set_policy_idle_s,
        report.set_policy_after_idle_s
    );
    println!("wrote {}", out.join("e2e.json").display());
    Ok(())
}
