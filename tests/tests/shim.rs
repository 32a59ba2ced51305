//! The containerd shim driven as containerd drives it: this test serves
//! containerd's events endpoint, runs `containerd-shim-parma-v2 start` in
//! a bundle as containerd 1.6 does, and calls the Task API over ttrpc: a
//! pod's sandbox (the UVM boots with the pod's policy), a container from
//! verity layer images (as the parma snapshotter names them) with
//! kubelet's files, an exec probe, denials as gRPC errors with the agent's
//! words, signals, exits, deletes and the shim's exit; then a shim killed
//! with -9 and containerd's `delete` cleaning up its UVM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use containerd_shim_protos::api::{
    ConnectRequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, Mount, ShutdownRequest,
    StartRequest, StateRequest, Status, WaitRequest,
};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, Events, TaskClient, create_events};
use containerd_shim_protos::ttrpc::{self, Code, r#async::TtrpcContext};
use parma_host::kube::{Images, generate_pod};
use parma_protocol::ProcessSpec;
use parma_tests::{Paths, oci};
use serde_json::{Value, json};

const POD: &str = r#"
kind: Pod
metadata: {name: web-1}
spec:
  volumes: [{name: cache, emptyDir: {}}, {name: settings, configMap: {name: settings}}]
  containers:
    - name: app
      image: parma-test:1
      args: ["pod", "8080"]
      env: [{name: MODE, value: fast}]
      volumeMounts:
        - {name: cache, mountPath: /cache}
        - {name: settings, mountPath: /etc/settings}
      livenessProbe:
        exec: {command: [/bin/cat, /etc/hostname]}
      readinessProbe:
        exec: {command: [/bin/cat, /etc/settings/mode]}
"#;

const NAMESPACE: &str = "k8s.io";
const SANDBOX: &str = "5a4d0c";

/// containerd's events endpoint: the topics the shim forwarded, in order.
#[derive(Debug, Default, Clone)]
struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

#[async_trait::async_trait]
impl Events for Recorder {
    async fn forward(
        &self,
        _ctx: &TtrpcContext,
        req: ForwardRequest,
    ) -> ttrpc::Result<containerd_shim_protos::api::Empty> {
        let envelope = req.envelope.into_option().unwrap_or_default();
        let type_url = envelope.event.as_ref().map(|any| any.type_url.clone()).unwrap_or_default();
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((envelope.topic, type_url));
        Ok(containerd_shim_protos::api::Empty::new())
    }
}

impl Recorder {
    fn topics(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|(t, _)| t.clone()).collect()
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(180).as_nanos() as i64)
}

/// The OCI process JSON CRI writes for `process`.
fn oci_process(process: &ProcessSpec) -> Value {
    json!({
        "terminal": process.terminal,
        "user": {"uid": process.uid, "gid": process.gid, "additionalGids": process.groups},
        "args": process.args,
        "env": process.env,
        "cwd": process.cwd,
        "capabilities": {
            "bounding": process.capabilities.bounding,
            "effective": process.capabilities.effective,
            "inheritable": process.capabilities.inheritable,
            "permitted": process.capabilities.permitted,
            "ambient": process.capabilities.ambient,
        },
        "noNewPrivileges": process.no_new_privileges,
        "oomScoreAdj": 1000,
    })
}

struct Fixture {
    dir: tempfile::TempDir,
    shim: PathBuf,
    config: PathBuf,
    events_address: String,
    containerd_address: String,
    recorder: Recorder,
    policy: String,
    layers: Vec<Mount>,
    process: ProcessSpec,
    _events: ttrpc::r#async::Server,
}

impl Fixture {
    async fn new() -> anyhow::Result<Self> {
        Self::with_pod(POD).await
    }

    /// The fixture for a variant of [`POD`] (its app as [`POD`]'s).
    async fn with_pod(pod: &str) -> anyhow::Result<Self> {
        let paths = Paths::get();
        let shim = paths.repo.join("target/release/containerd-shim-parma-v2");
        ensure!(shim.is_file(), "{} is missing: make test builds it", shim.display());
        let dir = tempfile::tempdir()?;
        let image = oci::build_test_image(&dir.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
        let images = Images::parse(&[format!("{}={}", oci::REF_NAME, image.layout.display())])?;
        let layers_dir = dir.path().join("layers");
        let (policies, _) = generate_pod(pod, &images, &layers_dir)?;
        let built = parma_layer::build(&image.layout, None, &layers_dir, &|_| {})?;
        // As the parma snapshotter hands them over: one bind of the users
        // files whose options name the layers, base first.
        let mut options = vec!["ro".to_string(), "rbind".to_string()];
        options.extend(built.layers.layers.iter().map(|layer| {
            format!("parma-layer={}:{}:{}", layer.root_hash, layer.hash_offset, layers_dir.join(&layer.file).display())
        }));
        let layers = vec![Mount {
            type_: "bind".into(),
            source: dir.path().display().to_string(),
            options,
            ..Default::default()
        }];
        let mut process = parma_host::run::process_from_config(
            &built.config,
            &[oci::ENTRYPOINT.into(), "pod".into(), "8080".into()],
        )?;
        process.env.extend(
            ["MODE=fast", "HOSTNAME=web-1", "KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443"]
                .map(String::from),
        );
        parma_tests::as_cri_makes_it(&mut process);
        let config = dir.path().join("shim.toml");
        std::fs::write(
            &config,
            format!(
                "uvm = {:?}\naccel = \"tcg\"\nmemory_mib = 512\nhotplug_slots = 4\nboot_deadline_s = 240\nrefresh_s = 1\nstate_dir = {:?}\n",
                paths.uvm.display().to_string(),
                dir.path().join("s").display().to_string()
            ),
        )?;
        let events_address = format!("unix://{}", dir.path().join("containerd.sock.ttrpc").display());
        let recorder = Recorder::default();
        let mut events = ttrpc::r#async::Server::new()
            .bind(&events_address)?
            .register_service(create_events(Arc::new(recorder.clone())));
        events.start().await?;
        Ok(Self {
            containerd_address: dir.path().join("containerd.sock").display().to_string(),
            dir,
            shim,
            config,
            events_address,
            recorder,
            policy: policies[0].policy.clone(),
            layers,
            process,
            _events: events,
        })
    }

    /// A bundle with this spec, as containerd lays one out.
    fn bundle(&self, id: &str, spec: &Value) -> anyhow::Result<PathBuf> {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs"))?;
        std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(spec)?)?;
        Ok(bundle)
    }

    fn sandbox_spec(&self) -> Value {
        self.sandbox_spec_on(None, &[])
    }

    /// The sandbox's spec with the network namespace at `netns` (as CNI
    /// prepared it) and `annotations` besides the policy.
    fn sandbox_spec_on(&self, netns: Option<&str>, annotations: &[(&str, String)]) -> Value {
        let mut spec = self.pod_sandbox_spec();
        if let Some(path) = netns {
            spec["linux"]["namespaces"][4]["path"] = json!(path);
        }
        for (key, value) in annotations {
            spec["annotations"][*key] = json!(value);
        }
        spec
    }

    fn pod_sandbox_spec(&self) -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["/pause"], "cwd": "/", "user": {"uid": 65535, "gid": 65535}},
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "web-1",
            "annotations": {
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": SANDBOX,
                "io.kubernetes.cri.sandbox-name": "web-1",
                "io.parma.policy": parma_host::annotation::encode(&self.policy),
            },
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]},
        })
    }

    /// A container's spec as CRI writes it, with kubelet's files on the host.
    fn container_spec(&self, process: &ProcessSpec) -> anyhow::Result<Value> {
        let host = self.dir.path().join("host");
        let sandbox_files = host.join("sandboxes").join(SANDBOX);
        let volumes = host.join("pods/uid-1/volumes");
        let settings = volumes.join("kubernetes.io~configmap/settings");
        let token = volumes.join("kubernetes.io~projected/kube-api-access-1");
        for dir in [&sandbox_files, &settings, &token, &volumes.join("kubernetes.io~empty-dir/cache")] {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(sandbox_files.join("hosts"), "127.0.0.1 localhost\n10.89.0.2 web-1\n")?;
        std::fs::write(sandbox_files.join("hostname"), "web-1\n")?;
        std::fs::write(sandbox_files.join("resolv.conf"), "nameserver 10.96.0.10\n")?;
        std::fs::write(settings.join("mode"), "fast")?;
        std::fs::write(token.join("token"), "a-token")?;
        std::fs::write(token.join("namespace"), "default")?;
        let bind = |destination: &str, source: &Path, mode: &str| json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind", "rprivate", mode]});
        let ns = |kind: &str| json!({"type": kind, "path": format!("/proc/4242/ns/{kind}")});
        Ok(json!({
            "ociVersion": "1.0.2-dev",
            "process": oci_process(process),
            "root": {"path": "rootfs"},
            "hostname": "web-1",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/shm", "type": "bind", "source": format!("/run/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/shm"), "options": ["rbind", "ro"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                bind("/etc/hosts", &sandbox_files.join("hosts"), "rw"),
                bind("/etc/hostname", &sandbox_files.join("hostname"), "rw"),
                bind("/etc/resolv.conf", &sandbox_files.join("resolv.conf"), "rw"),
                bind("/dev/termination-log", &host.join("termination-log"), "rw"),
                bind("/var/run/secrets/kubernetes.io/serviceaccount", &token, "ro"),
                bind("/cache", &volumes.join("kubernetes.io~empty-dir/cache"), "rw"),
                bind("/etc/settings", &settings, "ro"),
            ],
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.sandbox-id": SANDBOX,
            },
            "linux": {"namespaces": [ns("ipc"), ns("uts"), {"type": "mount"}, ns("network"), {"type": "pid"}]},
        }))
    }

    /// `containerd-shim-parma-v2 ... start` in `bundle`: the address it prints.
    fn start_shim(&self, id: &str, bundle: &Path) -> anyhow::Result<String> {
        let out = Command::new(&self.shim)
            .args(["-namespace", NAMESPACE, "-address", &self.containerd_address, "-publish-binary", "/bin/false"])
            .args(["-id", id, "start"])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.events_address)
            .env("PARMA_SHIM_CONFIG", &self.config)
            .output()?;
        ensure!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
        ensure!(
            out.stderr.is_empty(),
            "containerd reads start's combined output: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let address = String::from_utf8(out.stdout)?.trim().to_string();
        ensure!(address.starts_with("unix:///"), "{address}");
        ensure!(std::fs::read_to_string(bundle.join("address"))? == address);
        Ok(address)
    }
}

/// A FIFO like containerd's, read to its end on a thread.
fn fifo(dir: &Path, name: &str) -> anyhow::Result<(String, std::thread::JoinHandle<String>)> {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let reader_path = path.clone();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        if let Ok(mut file) = std::fs::File::open(&reader_path) {
            let _ = std::io::Read::read_to_string(&mut file, &mut out);
        }
        out
    });
    Ok((path.display().to_string(), reader))
}

fn rpc_status<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> anyhow::Result<(Code, String)> {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => Ok((status.code(), status.message().to_string())),
        other => bail!("expected an error status, got {other:?}"),
    }
}

/// Kills what a failed test left running: the shim, its QEMU.
#[derive(Debug, Default)]
struct Leftovers(Vec<u32>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in &self.0 {
            if let Ok(pid) = i32::try_from(*pid)
                && alive(pid.unsigned_abs())
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
}

fn create_request(id: &str, bundle: &Path, rootfs: Vec<Mount>, stdout: &str) -> CreateTaskRequest {
    CreateTaskRequest {
        id: id.into(),
        bundle: bundle.display().to_string(),
        rootfs,
        stdout: stdout.into(),
        ..Default::default()
    }
}

#[test]
fn containerd_drives_a_pod_through_the_shims_task_api() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let fixture = Fixture::new().await?;
        let sandbox_bundle = fixture.bundle(SANDBOX, &fixture.sandbox_spec())?;
        let address = fixture.start_shim(SANDBOX, &sandbox_bundle)?;
        let task = TaskClient::new(Client::connect(&address).await?);
        let shim_pid = task.connect(ctx(), &ConnectRequest::new()).await?.shim_pid;
        let mut leftovers = Leftovers(vec![shim_pid]);

        let slot = parma_tests::BootSlot::acquire()?;
        let created = task.create(ctx(), &create_request(SANDBOX, &sandbox_bundle, Vec::new(), "")).await?;
        drop(slot);
        let qemu = created.pid;
        leftovers.0.push(qemu);
        ensure!(alive(qemu), "QEMU {qemu} runs the pod");
        task.start(ctx(), &StartRequest { id: SANDBOX.into(), ..Default::default() }).await?;

        // The app: the same shim (grouped by the sandbox id).
        let app_bundle = fixture.bundle("app", &fixture.container_spec(&fixture.process)?)?;
        ensure!(fixture.start_shim("app", &app_bundle)? == address, "one shim per pod");
        let (stdout, output) = fifo(fixture.dir.path(), "app-stdout")?;
        task.create(ctx(), &create_request("app", &app_bundle, fixture.layers.clone(), &stdout)).await?;
        let state = task.state(ctx(), &StateRequest { id: "app".into(), ..Default::default() }).await?;
        ensure!(state.status.enum_value() == Ok(Status::CREATED), "{state:?}");
        task.start(ctx(), &StartRequest { id: "app".into(), ..Default::default() }).await?;

        // kubelet's probe runs; a process the policy does not list is refused with its reason.
        let exec = |exec_id: &str, args: &[&str], stdout: &str| {
            let mut process = fixture.process.clone();
            process.args = args.iter().map(|a| a.to_string()).collect();
            let mut spec = Any::new();
            spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
            spec.value = serde_json::to_vec(&oci_process(&process)).unwrap_or_default();
            ExecProcessRequest {
                id: "app".into(),
                exec_id: exec_id.into(),
                stdout: stdout.into(),
                spec: Some(spec).into(),
                ..Default::default()
            }
        };
        let (probe_out, probe_output) = fifo(fixture.dir.path(), "probe-stdout")?;
        task.exec(ctx(), &exec("probe", &["/bin/cat", "/etc/hostname"], &probe_out)).await?;
        task.start(ctx(), &StartRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        let waited =
            task.wait(ctx(), &WaitRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        ensure!(waited.exit_status == 0, "{waited:?}");
        task.delete(ctx(), &DeleteRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        let probe_output = probe_output.join().map_err(|_| anyhow::anyhow!("reader"))?;
        ensure!(probe_output == "web-1\n", "the probe read kubelet's file: {probe_output:?}");

        // kubelet updates the configMap on the host (as its atomic writer
        // does: a new file renamed over the old); the shim copies it in again.
        let settings = fixture.dir.path().join("host/pods/uid-1/volumes/kubernetes.io~configmap/settings");
        std::fs::write(settings.join(".mode.new"), "slow")?;
        std::fs::rename(settings.join(".mode.new"), settings.join("mode"))?;
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let exec_id = format!("ready-{attempt}");
            let (ready_out, ready_output) = fifo(fixture.dir.path(), &exec_id)?;
            task.exec(ctx(), &exec(&exec_id, &["/bin/cat", "/etc/settings/mode"], &ready_out)).await?;
            task.start(ctx(), &StartRequest { id: "app".into(), exec_id: exec_id.clone(), ..Default::default() })
                .await?;
            task.wait(ctx(), &WaitRequest { id: "app".into(), exec_id: exec_id.clone(), ..Default::default() }).await?;
            task.delete(ctx(), &DeleteRequest { id: "app".into(), exec_id, ..Default::default() }).await?;
            let seen = ready_output.join().map_err(|_| anyhow::anyhow!("reader"))?;
            if seen == "slow" {
                break;
            }
            ensure!(seen == "fast", "the container read {seen:?}");
            ensure!(std::time::Instant::now() < give_up, "the configMap's update never reached the container");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        task.exec(ctx(), &exec("shell", &["/bin/sh"], "")).await?;
        let (code, message) = rpc_status(
            task.start(ctx(), &StartRequest { id: "app".into(), exec_id: "shell".into(), ..Default::default() }).await,
        )?;
        ensure!(code == Code::PERMISSION_DENIED && message.contains("exec_in_container"), "{code:?}: {message}");
        ensure!(message.len() < 2048, "short enough for kubectl describe: {} bytes", message.len());
        task.delete(ctx(), &DeleteRequest { id: "app".into(), exec_id: "shell".into(), ..Default::default() }).await?;

        // A container the policy does not allow fails at Create, and the pod keeps serving.
        let mut other = fixture.process.clone();
        other.args[2] = "9090".into();
        let evil_bundle = fixture.bundle("evil", &fixture.container_spec(&other)?)?;
        let (code, message) =
            rpc_status(task.create(ctx(), &create_request("evil", &evil_bundle, fixture.layers.clone(), "")).await)?;
        ensure!(code == Code::PERMISSION_DENIED && message.contains("create_container"), "{code:?}: {message}");
        ensure!(message.contains("9090"), "the denial names the failing argument: {message}");
        let host_dir = json!({"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]});
        let mut spec = fixture.container_spec(&fixture.process)?;
        spec["mounts"].as_array_mut().context("mounts")?.push(host_dir);
        let hostile = fixture.bundle("hostile", &spec)?;
        let (code, message) =
            rpc_status(task.create(ctx(), &create_request("hostile", &hostile, fixture.layers.clone(), "")).await)?;
        ensure!(code == Code::FAILED_PRECONDITION && message.contains("/srv is a host path"), "{code:?}: {message}");
        let (code, _) = rpc_status(task.create(ctx(), &create_request("nolayers", &app_bundle, Vec::new(), "")).await)?;
        ensure!(code == Code::INVALID_ARGUMENT, "{code:?}");

        // kubelet stops the pod: SIGTERM then SIGKILL to the app (PID 1 of
        // its PID namespace ignores the first), its exit, deletes, the sandbox.
        task.kill(ctx(), &KillRequest { id: "app".into(), signal: 15, ..Default::default() }).await?;
        task.kill(ctx(), &KillRequest { id: "app".into(), signal: 9, ..Default::default() }).await?;
        let waited = task.wait(ctx(), &WaitRequest { id: "app".into(), ..Default::default() }).await?;
        ensure!(matches!(waited.exit_status, 137 | 143), "{waited:?}");
        let output = output.join().map_err(|_| anyhow::anyhow!("reader"))?;
        ensure!(output.contains("hostname=web-1") && output.contains("role=server"), "{output}");
        let (code, _) =
            rpc_status(task.kill(ctx(), &KillRequest { id: "app".into(), signal: 9, ..Default::default() }).await)?;
        ensure!(code == Code::NOT_FOUND, "a finished process: {code:?}");
        task.delete(ctx(), &DeleteRequest { id: "app".into(), ..Default::default() }).await?;
        task.kill(ctx(), &KillRequest { id: SANDBOX.into(), signal: 9, ..Default::default() }).await?;
        let waited = task.wait(ctx(), &WaitRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        ensure!(waited.exit_status == 137, "{waited:?}");
        task.delete(ctx(), &DeleteRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        ensure!(!alive(qemu), "the UVM is gone with the sandbox");
        task.shutdown(ctx(), &ShutdownRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while alive(shim_pid) {
            ensure!(std::time::Instant::now() < give_up, "the shim did not exit after Shutdown");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let topics = fixture.recorder.topics();
        let count = |topic: &str| topics.iter().filter(|t| *t == topic).count();
        let expected: HashMap<&str, usize> = [
            ("/tasks/create", 2),
            ("/tasks/start", 2),
            ("/tasks/exec-added", 2 + attempt),
            ("/tasks/exec-started", 1 + attempt),
            ("/tasks/exit", 3 + attempt),
            ("/tasks/delete", 2),
        ]
        .into();
        for (topic, n) in &expected {
            ensure!(count(topic) == *n, "{topic}: {} of {n} in {topics:?}", count(topic));
        }
        let first = |topic: &str| topics.iter().position(|t| t == topic);
        ensure!(first("/tasks/exec-started") < first("/tasks/exit"), "a start is told before its exit: {topics:?}");
        ensure!(
            fixture.recorder.0.lock().is_ok_and(|all| all.iter().any(|(_, url)| url == "containerd.events.TaskExit")),
            "events carry containerd's type names"
        );
        ensure!(std::fs::read_dir(fixture.dir.path().join("s"))?.next().is_none(), "the shim's socket is removed");
        anyhow::Ok(())
    })
}

#[test]
fn a_pod_without_a_policy_is_refused_and_a_killed_shim_is_cleaned_up_by_delete() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let fixture = Fixture::new().await?;
        let mut spec = fixture.sandbox_spec();
        spec["annotations"].as_object_mut().context("annotations")?.remove("io.parma.policy");
        let bare = fixture.bundle(SANDBOX, &spec)?;
        let address = fixture.start_shim(SANDBOX, &bare)?;
        let task = TaskClient::new(Client::connect(&address).await?);
        let mut leftovers = Leftovers(vec![task.connect(ctx(), &ConnectRequest::new()).await?.shim_pid]);
        let (code, message) = rpc_status(task.create(ctx(), &create_request(SANDBOX, &bare, Vec::new(), "")).await)?;
        ensure!(code == Code::FAILED_PRECONDITION && message.contains("io.parma.policy"), "{code:?}: {message}");

        let sandbox = fixture.dir.path().join("pod2");
        std::fs::create_dir_all(&sandbox)?;
        std::fs::write(sandbox.join("config.json"), serde_json::to_vec(&fixture.sandbox_spec())?)?;
        let slot = parma_tests::BootSlot::acquire()?;
        let created = task.create(ctx(), &create_request("pod2", &sandbox, Vec::new(), "")).await?;
        drop(slot);
        leftovers.0.push(created.pid);
        let shim_pid = task.connect(ctx(), &ConnectRequest::new()).await?.shim_pid;
        ensure!(alive(created.pid));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(shim_pid)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let out = Command::new(&fixture.shim)
            .args(["-namespace", NAMESPACE, "-address", &fixture.containerd_address, "-id", "pod2", "-bundle"])
            .arg(&sandbox)
            .arg("delete")
            .current_dir(&sandbox)
            .output()?;
        ensure!(out.status.success(), "delete: {}", String::from_utf8_lossy(&out.stderr));
        let response = containerd_shim_protos::api::DeleteResponse::parse_from_bytes(&out.stdout)?;
        ensure!(response.pid == created.pid && response.exit_status == 137, "{response:?}");
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while alive(created.pid) {
            ensure!(std::time::Instant::now() < give_up, "QEMU {} outlived delete", created.pid);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(!sandbox.join("parma-shim.json").exists(), "the record is removed");
        anyhow::Ok(())
    })
}

#[test]
fn a_uvm_that_dies_ends_the_pods_processes() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let fixture = Fixture::new().await?;
        let bundle = fixture.bundle(SANDBOX, &fixture.sandbox_spec())?;
        let address = fixture.start_shim(SANDBOX, &bundle)?;
        let task = TaskClient::new(Client::connect(&address).await?);
        let mut leftovers = Leftovers(vec![task.connect(ctx(), &ConnectRequest::new()).await?.shim_pid]);
        let slot = parma_tests::BootSlot::acquire()?;
        let created = task.create(ctx(), &create_request(SANDBOX, &bundle, Vec::new(), "")).await?;
        drop(slot);
        leftovers.0.push(created.pid);
        task.start(ctx(), &StartRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        // The guest goes away under the shim (a panic, QEMU killed).
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(created.pid)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            task.wait(ctx(), &WaitRequest { id: SANDBOX.into(), ..Default::default() }),
        )
        .await
        .context("Wait did not return after the UVM died")??;
        ensure!(waited.exit_status == 255, "{waited:?}");
        let state = task.state(ctx(), &StateRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        ensure!(state.status.enum_value() == Ok(Status::STOPPED), "{state:?}");
        anyhow::Ok(())
    })
}

/// [`POD`] with a secret for its app from the broker at `url` pinned to
/// `pin` (in the pod's annotations, as `parma policy gen --pod` reads
/// them) and a startup probe that reads it.
fn secrets_pod(url: &str, pin: &str) -> String {
    let annotations = format!(
        "metadata:\n  name: web-1\n  annotations:\n    io.parma.brokers: '[{{\"name\": \"good\", \"url\": \"{url}\", \
         \"certificate_sha256\": \"{pin}\"}}]'\n    io.parma.secrets: '{{\"app\": [{{\"broker\": \"good\", \
         \"resource\": \"default/db/password\", \"file\": \"db\"}}]}}'\n"
    );
    let probe =
        "      startupProbe:\n        exec: {command: [/bin/cat, /dev/parma/secrets/db]}\n      readinessProbe:\n";
    POD.replace("metadata: {name: web-1}\n", &annotations).replace("      readinessProbe:\n", probe)
}

/// The shim asks for the secrets the pod's policy lists for a container
/// between its create and its start, over the pod's network (a CNI-style
/// namespace, the broker in its peer, the route from the pod's
/// `io.parma.broker-addresses` annotation, as a cluster-internal broker
/// name does not resolve on the node): the container reads its secret. A
/// secret the broker refuses fails the create and leaves nothing behind:
/// the same container is created again once the broker releases it. While
/// a slow broker holds a second container's secret, the first container's
/// exec probe goes through (the shim sends the request aside).
#[test]
fn the_shim_provisions_the_secrets_the_pods_policy_lists() -> anyhow::Result<()> {
    use parma_tests::broker::{Broker, Config};
    use parma_tests::netns::CniNamespaces;
    const SECRET: &[u8] = b"correct horse battery staple";
    let namespaces = CniNamespaces::new("shimkbs")?;
    let peer = std::net::Ipv4Addr::from(CniNamespaces::OUTSIDE_ADDRESS);
    let config = Config {
        resources: std::collections::BTreeMap::from([("default/db/password".to_string(), SECRET.to_vec())]),
        insecure_emulation: true,
        ..Config::default()
    };
    let broker = namespaces.in_peer(|| Broker::start_on(config, "kbs.test", (peer, 0).into()))?;
    let pod = secrets_pod(&format!("https://kbs.test:{}", broker.address().port()), broker.pin());
    ensure!(pod.contains("io.parma.secrets: ") && pod.contains("startupProbe"), "{pod}");
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let fixture = Fixture::with_pod(&pod).await?;
        // First the broker expects another launch: it refuses the evidence.
        broker.expect_host_data([1; 32]);
        let route = format!("{peer}:{}", broker.address().port());
        let netns = CniNamespaces::path(&namespaces.pod);
        let routes = format!(r#"{{"good": "{route}"}}"#);
        let spec = fixture.sandbox_spec_on(Some(&netns), &[("io.parma.broker-addresses", routes)]);
        let sandbox_bundle = fixture.bundle(SANDBOX, &spec)?;
        let address = fixture.start_shim(SANDBOX, &sandbox_bundle)?;
        let task = TaskClient::new(Client::connect(&address).await?);
        let shim_pid = task.connect(ctx(), &ConnectRequest::new()).await?.shim_pid;
        let mut leftovers = Leftovers(vec![shim_pid]);
        let slot = parma_tests::BootSlot::acquire()?;
        let created = task.create(ctx(), &create_request(SANDBOX, &sandbox_bundle, Vec::new(), "")).await?;
        drop(slot);
        leftovers.0.push(created.pid);
        task.start(ctx(), &StartRequest { id: SANDBOX.into(), ..Default::default() }).await?;

        let app_bundle = fixture.bundle("app", &fixture.container_spec(&fixture.process)?)?;
        ensure!(fixture.start_shim("app", &app_bundle)? == address, "one shim per pod");
        // A secret that cannot be had: no container (the create fails with
        // the agent's words, and what it created is removed again).
        let (_, message) =
            rpc_status(task.create(ctx(), &create_request("app", &app_bundle, fixture.layers.clone(), "")).await)?;
        ensure!(message.contains("cannot provision secret \"db\" from broker \"good\""), "{message}");
        ensure!(broker.released().is_empty(), "{:?}", broker.log());
        broker.expect_host_data(parma_policy::Policy::from_bytes(fixture.policy.clone().into_bytes())?.hash());
        task.create(ctx(), &create_request("app", &app_bundle, fixture.layers.clone(), ""))
            .await
            .with_context(|| format!("the same container again; broker: {:?}", broker.log()))?;
        ensure!(broker.released() == ["default/db/password"], "{:?}", broker.log());
        task.start(ctx(), &StartRequest { id: "app".into(), ..Default::default() }).await?;
        let mut process = fixture.process.clone();
        process.args = ["/bin/cat", "/dev/parma/secrets/db"].map(String::from).to_vec();
        let mut exec_spec = Any::new();
        exec_spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
        exec_spec.value = serde_json::to_vec(&oci_process(&process))?;
        let (probe_out, probe_output) = fifo(fixture.dir.path(), "probe-stdout")?;
        let exec = ExecProcessRequest {
            id: "app".into(),
            exec_id: "probe".into(),
            stdout: probe_out,
            spec: Some(exec_spec).into(),
            ..Default::default()
        };
        task.exec(ctx(), &exec).await?;
        task.start(ctx(), &StartRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        let waited =
            task.wait(ctx(), &WaitRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        ensure!(waited.exit_status == 0, "{waited:?}");
        task.delete(ctx(), &DeleteRequest { id: "app".into(), exec_id: "probe".into(), ..Default::default() }).await?;
        let read = probe_output.join().map_err(|_| anyhow::anyhow!("reader"))?;
        ensure!(read.as_bytes() == SECRET, "the container read {read:?}");

        // A slow broker (each of the exchange's three connections held):
        // while the pod's second container waits for its secret, the first
        // one's exec probe goes through.
        const HOLD: Duration = Duration::from_secs(5);
        broker.hold(Some(HOLD));
        let second_bundle = fixture.bundle("second", &fixture.container_spec(&fixture.process)?)?;
        ensure!(fixture.start_shim("second", &second_bundle)? == address, "one shim per pod");
        let asked = std::time::Instant::now();
        let before = broker.connections();
        let second = create_request("second", &second_bundle, fixture.layers.clone(), "");
        let probe = async {
            // Once the agent is at the broker (which holds the connection).
            while broker.connections() == before && asked.elapsed() < HOLD {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (probe_out, probe_output) = fifo(fixture.dir.path(), "probe2-stdout")?;
            let exec = ExecProcessRequest { exec_id: "probe2".into(), stdout: probe_out, ..exec.clone() };
            task.exec(ctx(), &exec).await?;
            let start = StartRequest { id: "app".into(), exec_id: "probe2".into(), ..Default::default() };
            task.start(ctx(), &start).await?;
            let wait = WaitRequest { id: "app".into(), exec_id: "probe2".into(), ..Default::default() };
            let waited = task.wait(ctx(), &wait).await?;
            let probed = asked.elapsed();
            let delete = DeleteRequest { id: "app".into(), exec_id: "probe2".into(), ..Default::default() };
            task.delete(ctx(), &delete).await?;
            let read = probe_output.join().map_err(|_| anyhow::anyhow!("reader"))?;
            ensure!(waited.exit_status == 0 && read.as_bytes() == SECRET, "{waited:?} {read:?}");
            anyhow::Ok(probed)
        };
        let (created, probed) = tokio::join!(async { task.create(ctx(), &second).await }, probe);
        let (created, probed) = (created.context("the second container")?, probed?);
        let answered = asked.elapsed();
        broker.hold(None);
        ensure!(created.pid != 0 && broker.released().len() == 2, "{:?}", broker.log());
        ensure!(
            answered >= probed + HOLD,
            "the probe ended after {probed:?}, the second container's create after {answered:?} (the broker held \
             each connection {HOLD:?})"
        );
        task.delete(ctx(), &DeleteRequest { id: "second".into(), ..Default::default() }).await?;

        task.kill(ctx(), &KillRequest { id: "app".into(), signal: 9, ..Default::default() }).await?;
        task.wait(ctx(), &WaitRequest { id: "app".into(), ..Default::default() }).await?;
        task.delete(ctx(), &DeleteRequest { id: "app".into(), ..Default::default() }).await?;
        task.kill(ctx(), &KillRequest { id: SANDBOX.into(), signal: 9, ..Default::default() }).await?;
        task.wait(ctx(), &WaitRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        task.delete(ctx(), &DeleteRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        task.shutdown(ctx(), &ShutdownRequest { id: SANDBOX.into(), ..Default::default() }).await?;
        drop(leftovers);
        anyhow::Ok(())
    })
}
