//! A containerd of the test's own: Debian's containerd 1.6 with its config,
//! root, state and sockets in a temporary directory, inside a network
//! namespace the test makes (with a registry on its loopback, which
//! `skopeo` fills), the parma snapshotter as its CRI snapshotter and the
//! parma shim as its runtime. The machine's own containerd setup is never
//! touched. Everything stops, and the namespace goes, when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// The registry's address inside the namespace.
pub const REGISTRY: &str = "127.0.0.1:5000";
/// CRI's containerd namespace.
pub const NAMESPACE: &str = "k8s.io";
/// The runtime handler the config names (RuntimeClass `handler: parma`).
pub const HANDLER: &str = "parma";

/// Programs a CRI test needs, from Debian (scripts/deps.sh installs them).
const PROGRAMS: [&str; 5] =
    ["/usr/bin/containerd", "/usr/sbin/runc", "/usr/bin/docker-registry", "/usr/bin/skopeo", "/usr/lib/cni/bridge"];

/// The shim's configuration for a test under `dir` (TCG, the UVM at `uvm`,
/// its sockets in `dir/shim`): the file to start containerd with, and the
/// state directory, which is empty again once every pod is gone.
pub fn shim_config(dir: &Path, uvm: &Path, memory_mib: u32, hotplug_slots: u8) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (config, state) = (dir.join("shim.toml"), dir.join("shim"));
    std::fs::write(
        &config,
        format!(
            "uvm = {:?}\naccel = \"tcg\"\nmemory_mib = {memory_mib}\nhotplug_slots = {hotplug_slots}\nboot_deadline_s = 240\nstate_dir = {:?}\n",
            uvm.display().to_string(),
            state.display().to_string()
        ),
    )?;
    Ok((config, state))
}

/// The namespaces kubelet asks for: network and IPC of the pod, PID per container.
pub fn pod_namespaces() -> k8s_cri::v1::NamespaceOption {
    k8s_cri::v1::NamespaceOption { network: 0, pid: 1, ipc: 0, ..Default::default() }
}

/// A pod sandbox as kubelet describes one (namespace `default`, hostname
/// `name`, the pod's namespaces), its logs in `logs`, with `annotation` as
/// its `io.parma.policy`.
pub fn pod_sandbox(name: &str, uid: &str, logs: &Path, annotation: String) -> k8s_cri::v1::PodSandboxConfig {
    use k8s_cri::v1::{LinuxPodSandboxConfig, LinuxSandboxSecurityContext, PodSandboxConfig, PodSandboxMetadata};
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        annotations: std::collections::HashMap::from([(
            parma_host::annotation::POLICY_ANNOTATION.to_string(),
            annotation,
        )]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How containerd gets its runtime and snapshotter.
enum Setup<'a> {
    /// The repository's builds: runtime `parma`, the shim's config in the environment.
    Repo { shim_config: Option<&'a Path>, local_content: bool },
    /// What `parma node install` writes under `root`.
    Installed { root: &'a Path, install: Install<'a> },
}

/// `parma node install`, given the harness's directory; the handler.
type Install<'a> = Box<dyn FnOnce(&Path) -> anyhow::Result<String> + 'a>;

/// A running containerd with a registry and the parma snapshotter.
#[derive(Debug)]
pub struct Containerd {
    /// Its directory (config, root, state, sockets, logs).
    pub dir: tempfile::TempDir,
    /// The network namespace's name.
    pub netns: String,
    children: Vec<Child>,
    shim: PathBuf,
}

fn spawn_logged(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
    command.spawn().with_context(|| format!("cannot start {command:?}"))
}

fn wait_for(what: &str, give_up: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + give_up;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not come up within {give_up:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Containerd {
    /// Start a registry and the parma snapshotter, then containerd, with
    /// the shim config at `shim_config` in containerd's environment.
    /// The snapshotter reads blobs from containerd's content directory.
    pub fn start(repo: &Path, shim_config: Option<&Path>) -> anyhow::Result<Self> {
        Self::start_with(repo, shim_config, true)
    }

    /// [`Containerd::start`]; with `local_content` false the snapshotter
    /// reads blobs through containerd's content API instead.
    pub fn start_with(repo: &Path, shim_config: Option<&Path>, local_content: bool) -> anyhow::Result<Self> {
        Self::start_setup(repo, Setup::Repo { shim_config, local_content })
    }

    /// containerd as `parma node install` configures it: the test's config
    /// (without any parma runtime) is written to `root`'s
    /// etc/containerd/config.toml, then `install` is called with the
    /// harness's directory (its `containerd.sock`, its `root`) and returns
    /// the handler; the snapshotter runs as its installed systemd unit
    /// says, and containerd reads the installed drop-in.
    pub fn start_installed(
        repo: &Path,
        root: &Path,
        install: impl FnOnce(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<(Self, String)> {
        let mut handler = String::new();
        let made = Self::start_setup(
            repo,
            Setup::Installed {
                root,
                install: Box::new(|dir| {
                    handler = install(dir)?;
                    Ok(handler.clone())
                }),
            },
        )?;
        Ok((made, handler))
    }

    fn start_setup(repo: &Path, setup: Setup<'_>) -> anyhow::Result<Self> {
        for program in PROGRAMS {
            ensure!(Path::new(program).exists(), "{program} is missing: scripts/deps.sh installs it");
        }
        let snapshotter = repo.join("target/release/parma-snapshotter");
        let shim = repo.join("target/release/containerd-shim-parma-v2");
        for built in [&snapshotter, &shim] {
            ensure!(built.is_file(), "{} is missing: make test builds it", built.display());
        }
        let dir = tempfile::Builder::new().prefix("parma-cri-").tempdir()?;
        let netns = format!(
            "parma-cri-{}-{}",
            std::process::id(),
            dir.path().file_name().and_then(|n| n.to_str()).unwrap_or("x").trim_start_matches("parma-cri-")
        );
        let status = Command::new("ip").args(["netns", "add", &netns]).status()?;
        ensure!(status.success(), "ip netns add {netns}");
        let mut made = Self { dir, netns, children: Vec::new(), shim: shim.clone() };
        let ip = |args: &[&str]| Command::new("ip").args(args).status();
        ensure!(ip(&["-n", &made.netns, "link", "set", "lo", "up"])?.success(), "lo up");
        let path = made.dir.path().to_path_buf();

        // The registry, on the namespace's loopback.
        std::fs::write(
            path.join("registry.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {REGISTRY}}}\n",
                path.join("registry").display()
            ),
        )?;
        let registry = spawn_logged(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", made.netns))
                .arg("/usr/bin/docker-registry")
                .arg("serve")
                .arg(path.join("registry.yml")),
            &path.join("registry.log"),
        )?;
        made.children.push(registry);

        // The snapshotter (a unix socket: no network).
        let mut snapshotter_socket = path.join("snapshotter.sock");
        if let Setup::Repo { local_content, .. } = &setup {
            let mut snapshotter = Command::new(&snapshotter);
            if *local_content {
                snapshotter.arg("--content-dir").arg(path.join("root/io.containerd.content.v1.content"));
            }
            let snapshotter = spawn_logged(
                snapshotter
                    .arg("--root")
                    .arg(path.join("snapshotter"))
                    .arg("--socket")
                    .arg(&snapshotter_socket)
                    .arg("--containerd")
                    .arg(path.join("containerd.sock"))
                    .arg("--namespace")
                    .arg(NAMESPACE)
                    .env("RUST_LOG", "parma_snapshotter=debug"),
                &path.join("snapshotter.log"),
            )?;
            made.children.push(snapshotter);
        }

        std::fs::create_dir_all(path.join("cni"))?;
        std::fs::write(
            path.join("cni/10-parma.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "parma-test", "plugins": [
  {"type": "bridge", "bridge": "parma0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "IPAM_DIR", "ranges": [[{"subnet": "10.89.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
]}"#
            .replace("IPAM_DIR", &path.join("cni-ipam").display().to_string()),
        )?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

{proxy}
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{REGISTRY}/parma/pause:1"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # The pods' network namespaces under the test's state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
{runtime}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{dir}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{REGISTRY}"]
    endpoint = ["http://{REGISTRY}"]
"#,
            root = path.join("root").display(),
            state = path.join("state").display(),
            dir = path.display(),
            proxy = match &setup {
                Setup::Repo { .. } => format!(
                    "[proxy_plugins]\n  [proxy_plugins.parma]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                    snapshotter_socket.display()
                ),
                Setup::Installed { .. } => String::new(),
            },
            runtime = match &setup {
                Setup::Repo { .. } => format!(
                    r#"  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "parma"
    # CRI's layer labels reach the snapshotter only with this off (1.6 defaults to on).
    disable_snapshot_annotations = false
    default_runtime_name = "{HANDLER}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.parma.v2"
      pod_annotations = ["io.parma.*"]"#
                ),
                Setup::Installed { .. } => String::new(),
            },
        );
        let mut containerd = Command::new("nsenter");
        containerd.arg(format!("--net=/var/run/netns/{}", made.netns)).arg("/usr/bin/containerd").arg("--config");
        match setup {
            Setup::Repo { shim_config, .. } => {
                std::fs::write(path.join("config.toml"), config)?;
                containerd
                    .arg(path.join("config.toml"))
                    // The shim it starts finds itself by this PATH.
                    .env(
                        "PATH",
                        format!(
                            "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                            shim.parent().map_or_else(|| ".".into(), |p| p.display().to_string())
                        ),
                    );
                if let Some(shim_config) = shim_config {
                    containerd.env("PARMA_SHIM_CONFIG", shim_config);
                }
            }
            Setup::Installed { root, install } => {
                let main = root.join("etc/containerd/config.toml");
                std::fs::create_dir_all(main.parent().context("parent")?)?;
                std::fs::write(&main, config)?;
                let handler = install(&path)?;
                // The snapshotter as its unit runs it.
                let unit = std::fs::read_to_string(
                    root.join(format!("etc/systemd/system/parma-snapshotter-{handler}.service")),
                )?;
                let exec = unit
                    .lines()
                    .find_map(|line| line.strip_prefix("ExecStart="))
                    .context("the unit has no ExecStart")?;
                let args: Vec<&str> = exec.split_whitespace().collect();
                let (program, args) = args.split_first().context("an empty ExecStart")?;
                snapshotter_socket = args
                    .iter()
                    .skip_while(|arg| **arg != "--socket")
                    .nth(1)
                    .map(PathBuf::from)
                    .context("the unit names no --socket")?;
                let snapshotter = spawn_logged(
                    Command::new(program).args(args).env("RUST_LOG", "parma_snapshotter=debug"),
                    &path.join("snapshotter.log"),
                )?;
                made.children.push(snapshotter);
                made.shim = root.join(format!("opt/parma/{handler}/bin/containerd-shim-parma-v2"));
                containerd.arg(&main).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env_remove("PARMA_SHIM_CONFIG");
            }
        }
        made.children.push(spawn_logged(&mut containerd, &path.join("containerd.log"))?);

        let socket = path.join("containerd.sock");
        wait_for("containerd", Duration::from_secs(30), || std::os::unix::net::UnixStream::connect(&socket).is_ok())?;
        wait_for("the snapshotter", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&snapshotter_socket).is_ok()
        })?;
        let netns = made.netns.clone();
        wait_for("the registry", Duration::from_secs(10), || {
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{netns}"))
                .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{}/{}", "127.0.0.1", 5000)])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        Ok(made)
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The snapshotter's root (its layer images under `layers/`).
    pub fn snapshotter_root(&self) -> PathBuf {
        self.dir.path().join("snapshotter")
    }

    /// A log of one of the processes (`containerd`, `snapshotter`, `registry`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Push the OCI layout `layout` (its image `reference`) to the registry
    /// as `REGISTRY/NAME`.
    pub fn push(&self, layout: &Path, reference: &str, name: &str) -> anyhow::Result<String> {
        let target = format!("{REGISTRY}/{name}");
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .args(["skopeo", "copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{reference}", layout.display()))
            .arg(format!("docker://{target}"))
            .output()?;
        ensure!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
        Ok(target)
    }

    /// A tonic channel to containerd's socket (CRI and containerd's own services).
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let socket = self.socket();
        Ok(tonic::transport::Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await?)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // containerd first, then the rest.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd (it reconnects when it comes back); this
        // one will not: kill the shims it started, then clean up what they
        // ran as containerd would, with the shim's `delete`.
        let address = self.socket().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim-parma-v2")
                && cmdline.contains(&address)
                && let Some(pid) = entry.file_name().to_str().and_then(|pid| pid.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task");
        let bundles =
            std::fs::read_dir(&tasks).into_iter().flatten().flatten().flat_map(|ns| {
                std::fs::read_dir(ns.path()).into_iter().flatten().flatten().map(|bundle| bundle.path())
            });
        for bundle in bundles.collect::<Vec<_>>() {
            let _ = Command::new(&self.shim)
                .args(["-namespace", NAMESPACE, "-id", "cleanup", "-address", &address, "-bundle"])
                .arg(&bundle)
                .arg("delete")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).status();
        // Mounts containerd left under its state (a sandbox's shm).
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let dir = self.dir.path().display().to_string();
            for mount in
                mounts.lines().filter_map(|line| line.split_whitespace().nth(1)).filter(|m| m.starts_with(&dir))
            {
                let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
