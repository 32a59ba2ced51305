//! `make bench`: boot to agent-ready under TCG, as a ratio to a floor
//! measured in the same run, plus image sizes and the warm `make image` time.
//!
//! The floor boots the same kernel with an initrd whose `/init` prints a
//! marker and powers off: no init, no agent, no protocol. Both are timed
//! from QEMU's start, wall clock, median of `BOOTS` runs each, interleaved
//! so a noisy machine hurts both alike. Writes `out/bench/boot.json`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parma_image::initrd::Initrd;
use parma_tests::{Boot, Guest, Paths, median_secs, write_initrd};
use serde::Serialize;

const BOOTS: usize = 7;
const MARKER: &str = "parma-floor: userspace reached";
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Serialize)]
struct Report {
    boots: usize,
    accel: &'static str,
    agent_ready_s: f64,
    floor_s: f64,
    ratio: f64,
    agent_ready_samples_s: Vec<f64>,
    floor_samples_s: Vec<f64>,
    guest_uptime_at_ready_ms: u64,
    vmlinuz_bytes: u64,
    initrd_bytes: u64,
    warm_make_image_s: f64,
}

fn floor_boot(paths: &Paths, initrd: &std::path::Path) -> anyhow::Result<Duration> {
    let mut guest = Guest::boot(paths, &Boot { initrd: Some(initrd.to_path_buf()), ..Boot::default() })?;
    loop {
        if guest.serial().contains(MARKER) {
            return Ok(guest.elapsed());
        }
        if guest.try_exit()?.is_some() && !guest.serial().contains(MARKER) {
            bail!("the floor guest exited without its marker:\n{}", guest.serial());
        }
        if guest.elapsed() > LIMIT {
            bail!("the floor guest did not reach userspace in {LIMIT:?}:\n{}", guest.serial());
        }
        // Polling the serial log file: 2 ms granularity on a ~3 s boot.
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn agent_boot(paths: &Paths) -> anyhow::Result<(Duration, u64)> {
    let mut guest = Guest::boot(paths, &Boot::default())?;
    let info = guest.wait_ready(LIMIT)?;
    let elapsed = guest.elapsed();
    guest.client(Duration::from_secs(10))?.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success(), "QEMU did not exit cleanly");
    guest.check_serial()?;
    Ok((elapsed, info.uptime_ms))
}

fn main() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let scratch = tempfile::tempdir()?;
    let floor_init = std::fs::read(paths.guest_binary("floor-init")?)?;
    let mut floor = Initrd::new();
    floor.dir("dev", 0o755)?.char_dev("dev/console", 0o600, 5, 1)?.file("init", 0o755, floor_init)?;
    let floor_initrd = write_initrd(scratch.path(), "floor.img", &floor)?;

    let mut agent_samples = Vec::new();
    let mut floor_samples = Vec::new();
    let mut uptime_ms = Vec::new();
    for i in 0..BOOTS {
        floor_samples.push(floor_boot(&paths, &floor_initrd)?);
        let (elapsed, uptime) = agent_boot(&paths)?;
        agent_samples.push(elapsed);
        uptime_ms.push(uptime);
        eprintln!(
            "boot {}/{BOOTS}: floor {:.3} s, agent ready {:.3} s",
            i + 1,
            floor_samples[i].as_secs_f64(),
            agent_samples[i].as_secs_f64()
        );
    }
    uptime_ms.sort_unstable();

    let started = Instant::now();
    let status = Command::new("make").arg("-s").arg("image").current_dir(&paths.repo).status().context("make image")?;
    ensure!(status.success(), "warm make image failed");
    let warm_make_image_s = started.elapsed().as_secs_f64();

    let size = |name: &str| std::fs::metadata(paths.uvm.join(name)).map(|m| m.len());
    let agent_ready_s = median_secs(&agent_samples);
    let floor_s = median_secs(&floor_samples);
    let report = Report {
        boots: BOOTS,
        accel: "tcg",
        agent_ready_s,
        floor_s,
        ratio: agent_ready_s / floor_s,
        agent_ready_samples_s: agent_samples.iter().map(Duration::as_secs_f64).collect(),
        floor_samples_s: floor_samples.iter().map(Duration::as_secs_f64).collect(),
        guest_uptime_at_ready_ms: uptime_ms.get(uptime_ms.len() / 2).copied().unwrap_or(0),
        vmlinuz_bytes: size(parma_image::files::KERNEL)?,
        initrd_bytes: size(parma_image::files::INITRD)?,
        warm_make_image_s,
    };

    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("boot.json"), serde_json::to_string_pretty(&report)? + "\n")?;

    println!("{:<34} {:>12}", "boot (TCG, median of 7)", "value");
    println!("{:<34} {:>10.3} s", "floor: kernel to marker", report.floor_s);
    println!("{:<34} {:>10.3} s", "agent ready (first ping answered)", report.agent_ready_s);
    println!("{:<34} {:>12.3}", "ratio agent/floor", report.ratio);
    println!("{:<34} {:>9} ms", "guest uptime at ready", report.guest_uptime_at_ready_ms);
    println!("{:<34} {:>12}", "vmlinuz bytes", report.vmlinuz_bytes);
    println!("{:<34} {:>12}", "initrd.img bytes", report.initrd_bytes);
    println!("{:<34} {:>10.2} s", "warm make image", report.warm_make_image_s);
    println!("wrote {}", out.join("boot.json").display());
    Ok(())
}
