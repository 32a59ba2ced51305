//! `make bench`: a confidential pod through Kubernetes' CRI, in one run, on
//! a containerd the benchmark starts (its own directory and network
//! namespace, the parma snapshotter and shim; `parma_tests::containerd`).
//!
//! 1. RunPodSandbox to the first byte of the container's output in its CRI
//!    log (sandbox, CreateContainer, StartContainer), against `parma run`'s
//!    start to first output (the library, `parma_host::run::run`) of the same
//!    image, interleaved, median of `RUNS` each. Goal: at most 1.2.
//! 2. The snapshotter's conversion of a generated gzip'd layer (text-like
//!    and random files, about 48 MiB of tar) as CRI pulls it, from its log,
//!    against `parma layer build` of the same layout in the same run.
//!    Goal: within 10%.
//! 3. An idle pod's host memory: QEMU's and the shim's resident set beside
//!    the UVM's configured RAM.
//!
//! Writes `out/bench/cri.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, PullImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use parma_host::kube::{Images, generate_pod};
use parma_host::run;
use parma_tests::containerd::{Containerd, HANDLER};
use parma_tests::{Paths, median_secs, oci};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

const RUNS: usize = 3;
const MEMORY_MIB: u32 = 512;

#[derive(Serialize)]
struct Report {
    accel: &'static str,
    runs: usize,
    cri_first_output_s: f64,
    run_first_output_s: f64,
    /// CRI's RunPodSandbox to first output / `parma run` start to first output.
    first_output_ratio: f64,
    cri_samples_s: Vec<f64>,
    run_samples_s: Vec<f64>,
    layer_blob_bytes: u64,
    layer_tar_bytes: u64,
    snapshotter_convert_s: f64,
    layer_build_s: f64,
    layer_build_samples_s: Vec<f64>,
    /// The snapshotter's conversion time / `parma layer build`'s (median).
    convert_ratio: f64,
    snapshotter_mb_per_s: f64,
    layer_build_mb_per_s: f64,
    uvm_memory_mib: u32,
    idle_qemu_rss_mib: f64,
    idle_shim_rss_mib: f64,
}

/// A small deterministic generator (xorshift), so the layer is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// An OCI layout with one gzip'd layer of text-like and random files;
/// returns (layout, blob size, tar size).
fn generated_image(dir: &Path) -> anyhow::Result<(PathBuf, u64, u64)> {
    let mut rng = Rng(0x005e_ed0f_9a2a);
    let words = ["config", "value", "path", "0", "1", "true", "enable", "user", "/usr/lib", "port", "=", "\n"];
    let mut tar = tar::Builder::new(Vec::new());
    let add = |tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data)?;
        Ok(())
    };
    for index in 0..2000 {
        let mut text = Vec::new();
        while text.len() < 8 * 1024 + (index % 8) * 1024 {
            text.extend_from_slice(words[(rng.next() % words.len() as u64) as usize].as_bytes());
            text.push(b' ');
        }
        add(&mut tar, &format!("usr/share/doc/pkg{}/file{index}.txt", index / 50), &text)?;
    }
    for index in 0..4 {
        let random: Vec<u8> = (0..8 << 20).map(|_| rng.next() as u8).collect();
        add(&mut tar, &format!("usr/lib/blob{index}.so"), &random)?;
    }
    let tar = tar.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar)?;
    let blob = gz.finish()?;
    let layout = dir.join("generated");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> anyhow::Result<(String, u64)> {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    };
    let (layer_digest, layer_size) = put(&blob)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": [oci::ENTRYPOINT], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "generated:1"}}],
        }))?,
    )?;
    Ok((layout, layer_size, tar.len() as u64))
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// The pid of the shim serving containerd at `address`.
fn shim_pid(address: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
        (cmdline.contains("containerd-shim-parma-v2") && cmdline.contains(address) && cmdline.contains("-socket"))
            .then(|| entry.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

/// `parma run` through the library: start to the first stdout byte.
fn parma_run(paths: &Paths, image: &oci::PolicyFixture) -> anyhow::Result<Duration> {
    struct First(Option<Instant>);
    impl Write for First {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !buf.is_empty() && self.0.is_none() {
                self.0 = Some(Instant::now());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut options = run::RunOptions::new(&paths.uvm, &image.policy, &image.layout);
    options.reference = Some(oci::REF_NAME.into());
    options.layers_dir = image.layers_dir.clone();
    options.memory_mib = MEMORY_MIB;
    let mut first = First(None);
    let started = Instant::now();
    let io = run::RunIo { stdin: None, stdout: &mut first, stderr: &mut std::io::sink(), forward: &mut run::NoForward };
    let outcome = run::run(&options, io, &|_| {})?;
    ensure!(outcome.exit_code == 0, "parma run exited {}", outcome.exit_code);
    Ok(first.0.context("parma run printed nothing")? - started)
}

fn main() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let work = tempfile::tempdir()?;
    let hello = paths.guest_binary("oci-hello")?;
    let fixture = oci::PolicyFixture::new(&hello, "app", None, None)?;
    let image = oci::build_test_image(&work.path().join("oci"), &hello)?;
    let (shim_config, _) = parma_tests::containerd::shim_config(work.path(), &paths.uvm, MEMORY_MIB, 4)?;
    let containerd = Containerd::start(&paths.repo, Some(&shim_config))?;
    let target = containerd.push(&image.layout, &image.reference, "parma/test:1")?;
    containerd.push(&image.layout, &image.reference, "parma/pause:1")?;
    let (generated, blob_bytes, tar_bytes) = generated_image(work.path())?;
    let generated_target = containerd.push(&generated, "generated:1", "parma/generated:1")?;
    let pod = format!(
        "kind: Pod\nmetadata: {{name: bench}}\nspec:\n  automountServiceAccountToken: false\n  containers: [{{name: app, image: {target}}}]\n"
    );
    let (policies, _) = generate_pod(
        &pod,
        &Images::parse(&[format!("{target}={}", image.layout.display())])?,
        &work.path().join("layers"),
    )?;
    let annotation = parma_host::annotation::encode(&policies[0].policy);
    let etc_hosts = work.path().join("kubelet/pods/bench/etc-hosts");
    std::fs::create_dir_all(etc_hosts.parent().context("parent")?)?;
    std::fs::write(&etc_hosts, "127.0.0.1 localhost\n")?;

    let mut cri_samples = Vec::new();
    let mut run_samples = Vec::new();
    let mut idle = (0.0, 0.0);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let convert_s = runtime.block_on(async {
        let channel = containerd.channel().await?;
        let mut cri = RuntimeServiceClient::new(channel.clone());
        let mut images = ImageServiceClient::new(channel);
        for image in [&target, &generated_target] {
            images
                .pull_image(PullImageRequest {
                    image: Some(ImageSpec { image: image.clone(), ..Default::default() }),
                    ..Default::default()
                })
                .await?;
        }
        let log = containerd.log("snapshotter");
        let convert_s: f64 = log
            .lines()
            .filter(|line| line.contains(&format!("converted {blob_bytes} bytes in ")))
            .find_map(|line| line.split("converted ").nth(1)?.split(" in ").nth(1)?.split(' ').next()?.parse().ok())
            .context("the snapshotter logged no conversion of the generated layer")?;
        for attempt in 0..RUNS {
            run_samples.push(tokio::task::block_in_place(|| parma_run(&paths, &fixture))?);
            let logs = work.path().join(format!("logs-{attempt}"));
            std::fs::create_dir_all(&logs)?;
            let sandbox_config = parma_tests::containerd::pod_sandbox("bench", "bench", &logs, annotation.clone());
            let started = Instant::now();
            let sandbox = cri
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(sandbox_config.clone()),
                    runtime_handler: HANDLER.into(),
                })
                .await?
                .into_inner()
                .pod_sandbox_id;
            let container = cri
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
                        image: Some(ImageSpec { image: target.clone(), ..Default::default() }),
                        mounts: vec![Mount {
                            container_path: "/etc/hosts".into(),
                            host_path: etc_hosts.display().to_string(),
                            ..Default::default()
                        }],
                        log_path: "app.log".into(),
                        linux: Some(LinuxContainerConfig {
                            security_context: Some(LinuxContainerSecurityContext {
                                namespace_options: Some(parma_tests::containerd::pod_namespaces()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    sandbox_config: Some(sandbox_config),
                })
                .await?
                .into_inner()
                .container_id;
            cri.start_container(StartContainerRequest { container_id: container }).await?;
            let log = logs.join("app.log");
            while std::fs::metadata(&log).map_or(0, |m| m.len()) == 0 {
                ensure!(started.elapsed() < Duration::from_secs(120), "no output in {}", log.display());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cri_samples.push(started.elapsed());
            if attempt == 0 {
                // Idle: the container has exited, the pod waits.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let bundle = containerd.dir.path().join("state/io.containerd.runtime.v2.task/k8s.io").join(&sandbox);
                let record: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(bundle.join("parma-shim.json"))?)?;
                let qemu = u32::try_from(record["qemu_pid"].as_u64().context("qemu_pid")?)?;
                let shim = shim_pid(&containerd.socket().display().to_string()).context("no shim")?;
                idle = (rss_mib(qemu)?, rss_mib(shim)?);
            }
            cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await?;
            cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sandbox }).await?;
        }
        anyhow::Ok(convert_s)
    })?;

    let mut build_samples = Vec::new();
    for attempt in 0..RUNS {
        let out = work.path().join(format!("built-{attempt}"));
        let started = Instant::now();
        parma_layer::build(&generated, None, &out, &|_| {})?;
        build_samples.push(started.elapsed());
    }
    let build_s = median_secs(&build_samples);
    let (cri_s, run_s) = (median_secs(&cri_samples), median_secs(&run_samples));
    let mb = tar_bytes as f64 / 1e6;
    let report = Report {
        accel: "tcg",
        runs: RUNS,
        cri_first_output_s: cri_s,
        run_first_output_s: run_s,
        first_output_ratio: cri_s / run_s,
        cri_samples_s: cri_samples.iter().map(Duration::as_secs_f64).collect(),
        run_samples_s: run_samples.iter().map(Duration::as_secs_f64).collect(),
        layer_blob_bytes: blob_bytes,
        layer_tar_bytes: tar_bytes,
        snapshotter_convert_s: convert_s,
        layer_build_s: build_s,
        layer_build_samples_s: build_samples.iter().map(Duration::as_secs_f64).collect(),
        convert_ratio: convert_s / build_s,
        snapshotter_mb_per_s: mb / convert_s,
        layer_build_mb_per_s: mb / build_s,
        uvm_memory_mib: MEMORY_MIB,
        idle_qemu_rss_mib: idle.0,
        idle_shim_rss_mib: idle.1,
    };
    let out = paths.repo.join("out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("cri.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("{:<44} {:>10} {:>10} {:>7}", "cri (TCG)", "parma", "baseline", "ratio");
    println!(
        "{:<44} {:>9.2}s {:>9.2}s {:>7.2}",
        "RunPodSandbox -> first output vs parma run", cri_s, run_s, report.first_output_ratio
    );
    println!(
        "{:<44} {:>9.3}s {:>9.3}s {:>7.2}",
        "snapshotter convert vs parma layer build", convert_s, build_s, report.convert_ratio
    );
    println!(
        "{:<44} {:>8.0}Mi {:>8}Mi {:>7.2}",
        "idle pod RSS (QEMU + shim) vs UVM RAM",
        idle.0 + idle.1,
        MEMORY_MIB,
        (idle.0 + idle.1) / f64::from(MEMORY_MIB)
    );
    println!("wrote {}", out.join("cri.json").display());
    Ok(())
}
