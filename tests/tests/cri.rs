//! A confidential pod driven the way kubelet drives one: Debian's
//! containerd 1.6 (started by the test, in its own directory and network
//! namespace, with CNI's bridge), the parma snapshotter, the parma shim as
//! runtime handler `parma`, and the test calling CRI: RunPodSandbox with the
//! pod's policy annotation, PullImage, CreateContainer for two containers,
//! StartContainer, ExecSync (the liveness probe), ContainerStatus, the
//! container log, a container the policy refuses (the explained denial at
//! StartContainer, where containerd 1.6 creates the task), StopPodSandbox, RemovePodSandbox, and nothing left
//! behind. The pod's policy is generated from the image's OCI layout, and
//! again by `parma policy gen --pod` pulling the image from the registry:
//! the same bytes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatsRequest, ContainerStatusRequest, CreateContainerRequest,
    DnsConfig, ExecSyncRequest, ImageSpec, KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext, Mount,
    PodSandboxConfig, PullImageRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use parma_host::kube::{Images, generate_pod};
use parma_tests::containerd::{Containerd, HANDLER, pod_namespaces, pod_sandbox};
use parma_tests::{Paths, oci};

const POD_UID: &str = "0c0ffee0-0000-4000-8000-000000000001";

const POD: &str = r#"
kind: Pod
metadata: {name: web-1, namespace: default}
spec:
  automountServiceAccountToken: false
  containers:
    - name: app
      image: IMAGE
      args: ["pod", "8080"]
      env: [{name: MODE, value: fast}]
      livenessProbe:
        exec: {command: [/bin/cat, /etc/hostname]}
    - name: sidecar
      image: IMAGE
      command: [/bin/sleep]
      args: ["3600"]
"#;

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

#[test]
fn kubelets_cri_calls_run_a_confidential_pod_and_leave_nothing_behind() -> anyhow::Result<()> {
    let paths = Paths::get();
    let work = tempfile::tempdir()?;
    let image = oci::build_test_image(&work.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let (shim_config, shim_state) = parma_tests::containerd::shim_config(work.path(), &paths.uvm, 512, 8)?;
    let containerd = Containerd::start(&paths.repo, Some(&shim_config))?;
    let target = containerd.push(&image.layout, &image.reference, "parma/test:1")?;
    containerd.push(&image.layout, &image.reference, "parma/pause:1")?;
    let pod_yaml = POD.replace("IMAGE", &target);
    let images = Images::parse(&[format!("{target}={}", image.layout.display())])?;
    let (policies, annotated) = generate_pod(&pod_yaml, &images, &work.path().join("layers"))?;
    let policy = &policies[0].policy;
    // `parma policy gen --pod` with the image pulled from the registry (in
    // the test's network namespace) writes the same bytes.
    let pod_file = work.path().join("pod.yaml");
    std::fs::write(&pod_file, &pod_yaml)?;
    let pulled = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", containerd.netns))
        .arg(paths.repo.join("target/release/parma"))
        .args(["policy", "gen", "--pod"])
        .arg(&pod_file)
        .args(["--plain-http", parma_tests::containerd::REGISTRY, "--images-dir"])
        .arg(work.path().join("images"))
        .arg("--layers-dir")
        .arg(work.path().join("pulled-layers"))
        .output()?;
    ensure!(pulled.status.success(), "policy gen from the registry: {}", String::from_utf8_lossy(&pulled.stderr));
    ensure!(pulled.stdout == annotated.as_bytes(), "the registry's image gave another policy");
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    // Where kubelet keeps a pod's hosts file.
    let etc_hosts = work.path().join("kubelet/pods").join(POD_UID).join("etc-hosts");
    std::fs::create_dir_all(etc_hosts.parent().context("parent")?)?;
    std::fs::write(&etc_hosts, "127.0.0.1 localhost\n")?;
    let diagnose = |what: &str| {
        format!(
            "{what}\n--- containerd:\n{}\n--- snapshotter:\n{}",
            containerd
                .log("containerd")
                .lines()
                .filter(|l| !l.contains("loading plugin"))
                .collect::<Vec<_>>()
                .join("\n"),
            containerd.log("snapshotter")
        )
    };

    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("{:>7.2} s  {what}", started.elapsed().as_secs_f64());
    let outcome = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let channel = containerd.channel().await?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let mut image_service = ImageServiceClient::new(channel);
        image_service
            .pull_image(PullImageRequest {
                image: Some(ImageSpec { image: target.clone(), ..Default::default() }),
                ..Default::default()
            })
            .await
            .with_context(|| diagnose("PullImage"))?;

        let sandbox_config = PodSandboxConfig {
            dns_config: Some(DnsConfig { servers: vec!["10.96.0.10".into()], ..Default::default() }),
            ..pod_sandbox("web-1", POD_UID, &logs, parma_host::annotation::encode(policy))
        };
        step("pulled");
        let sandbox_id = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: HANDLER.into(),
            })
            .await
            .with_context(|| diagnose("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        step("sandbox");
        // The QEMU the shim started, from the record it keeps in the sandbox's bundle.
        let bundle = containerd.dir.path().join("state/io.containerd.runtime.v2.task/k8s.io").join(&sandbox_id);
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("parma-shim.json"))?)?;
        let qemu = u32::try_from(record["qemu_pid"].as_u64().context("qemu_pid")?)?;
        ensure!(alive(qemu));

        let container = |name: &str, command: &[&str], args: &[&str]| ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(ImageSpec { image: target.clone(), ..Default::default() }),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: [("MODE", "fast"), ("KUBERNETES_SERVICE_HOST", "10.96.0.1"), ("KUBERNETES_SERVICE_PORT", "443")]
                .iter()
                .filter(|(key, _)| name == "app" || *key != "MODE")
                .map(|(key, value)| KeyValue { key: key.to_string(), value: value.to_string() })
                .collect(),
            mounts: vec![Mount {
                container_path: "/etc/hosts".into(),
                host_path: etc_hosts.display().to_string(),
                ..Default::default()
            }],
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let create = |config: ContainerConfig| CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        };

        // A container the policy does not allow: containerd 1.6's CRI makes
        // the task (the shim's Create, where the guest decides) at
        // StartContainer, which is refused with the agent's reason.
        let refused_id = runtime
            .create_container(create(container("app", &[], &["pod", "9090"])))
            .await
            .with_context(|| diagnose("CreateContainer"))?
            .into_inner()
            .container_id;
        let refused = runtime.start_container(StartContainerRequest { container_id: refused_id.clone() }).await;
        let message = refused.err().map(|status| status.message().to_string()).unwrap_or_default();
        ensure!(message.contains("create_container") && message.contains("9090"), "{}", diagnose(&message));
        runtime.remove_container(RemoveContainerRequest { container_id: refused_id }).await?;

        step("refused");
        let mut ids = Vec::new();
        for config in [container("app", &[], &["pod", "8080"]), container("sidecar", &["/bin/sleep"], &["3600"])] {
            let id = runtime
                .create_container(create(config))
                .await
                .with_context(|| diagnose("CreateContainer"))?
                .into_inner()
                .container_id;
            runtime
                .start_container(StartContainerRequest { container_id: id.clone() })
                .await
                .with_context(|| diagnose("StartContainer"))?;
            ids.push(id);
        }
        step("started");
        let probe = runtime
            .exec_sync(ExecSyncRequest {
                container_id: ids[0].clone(),
                cmd: vec!["/bin/cat".into(), "/etc/hostname".into()],
                timeout: 60,
            })
            .await
            .with_context(|| diagnose("ExecSync"))?
            .into_inner();
        ensure!(probe.exit_code == 0 && probe.stdout == b"web-1\n", "{probe:?}");
        step("probed");
        // kubelet's container stats: the container's cgroup in the guest,
        // through the shim's Stats (the policy gen --pod policy allows it).
        let stats = runtime
            .container_stats(ContainerStatsRequest { container_id: ids[1].clone() })
            .await
            .with_context(|| diagnose("ContainerStats"))?
            .into_inner()
            .stats
            .context("no stats")?;
        let cpu = stats.cpu.and_then(|cpu| cpu.usage_core_nano_seconds).map_or(0, |v| v.value);
        let memory = stats.memory.and_then(|memory| memory.usage_bytes).map_or(0, |v| v.value);
        ensure!(cpu > 0 && memory > 0, "the sidecar's stats: cpu {cpu} ns, memory {memory} bytes");
        step("stats");
        let shell = runtime
            .exec_sync(ExecSyncRequest { container_id: ids[0].clone(), cmd: vec!["/bin/sh".into()], timeout: 60 })
            .await;
        let message = shell.err().map(|status| status.message().to_string()).unwrap_or_default();
        ensure!(message.contains("exec_in_container"), "a shell the policy does not list: {message}");

        step("execs");
        let status = runtime
            .container_status(ContainerStatusRequest { container_id: ids[0].clone(), verbose: false })
            .await?
            .into_inner()
            .status
            .context("no status")?;
        ensure!(status.state == 1, "running: {status:?}");
        let log = logs.join("app/0.log");
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("hostname=web-1") {
            ensure!(std::time::Instant::now() < give_up, "the container log: {:?}", std::fs::read_to_string(&log));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        step("logged");
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: sandbox_id.clone() })
            .await
            .with_context(|| diagnose("StopPodSandbox"))?;
        step("stopped");
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sandbox_id.clone() })
            .await
            .with_context(|| diagnose("RemovePodSandbox"))?;
        step("removed");
        anyhow::Ok(qemu)
    });
    let qemu = outcome?;
    // Nothing left: no QEMU, no shim socket, no pod network namespace, no bundle.
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while alive(qemu) {
        ensure!(std::time::Instant::now() < give_up, "QEMU {qemu} outlived the pod");
        std::thread::sleep(Duration::from_millis(100));
    }
    while std::fs::read_dir(&shim_state)?.next().is_some() {
        ensure!(std::time::Instant::now() < give_up, "the shim's socket outlived the pod");
        std::thread::sleep(Duration::from_millis(100));
    }
    let empty = |dir: &Path| std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
    let state = containerd.dir.path().join("state");
    ensure!(empty(&state.join("io.containerd.grpc.v1.cri/netns")), "the pod's network namespace is gone");
    ensure!(empty(&state.join("io.containerd.runtime.v2.task/k8s.io")), "the bundles are gone");
    Ok(())
}
