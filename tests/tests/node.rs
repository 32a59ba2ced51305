//! The node image (`make node-image` → out/node): rebuilt to the same
//! digest, its reference values what `parma measure` computes from its own
//! files; published to a registry (Debian's docker-registry, in a network
//! namespace the test makes) and pulled back by Debian's skopeo byte for
//! byte; installed under a temporary root where Debian's containerd, reading
//! only what the installer wrote, runs a pod through CRI with the installed
//! handler, and uninstalled to the root as it was; an emulated report of
//! the installed UVM verified against the signed reference values, and
//! refused, by name, when a measurement bit or the signed file changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec, KeyValue,
    LinuxContainerConfig, LinuxContainerSecurityContext, PullImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use parma_host::node::image::Layout;
use parma_tests::containerd::Containerd;
use parma_tests::{Boot, Guest, Paths, oci};

const READY: Duration = Duration::from_secs(60);
const ANSWER: Duration = Duration::from_secs(10);

/// The node image `make node-image` wrote.
fn node_image(paths: &Paths) -> anyhow::Result<PathBuf> {
    let dir = paths.repo.join("out/node");
    ensure!(dir.join("index.json").is_file(), "{} is missing: make test runs make node-image first", dir.display());
    Ok(dir)
}

fn parma(paths: &Paths) -> Command {
    Command::new(paths.repo.join("target/release/parma"))
}

fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("cannot run {command:?}"))?;
    Ok(output)
}

fn ok(command: &mut Command) -> anyhow::Result<String> {
    let output = run(command)?;
    ensure!(
        output.status.success(),
        "{command:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every file, directory and link under `root`: path → (kind and mode, bytes).
fn tree(root: &Path) -> anyhow::Result<BTreeMap<String, (String, Vec<u8>)>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let name = path.strip_prefix(root)?.display().to_string();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.insert(name, (format!("dir {mode:o}"), Vec::new()));
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                out.insert(name, ("link".into(), std::fs::read_link(&path)?.into_os_string().into_encoded_bytes()));
            } else {
                out.insert(name, (format!("file {mode:o}"), std::fs::read(&path)?));
            }
        }
    }
    Ok(out)
}

/// The release key `make node-image` signed with.
fn release_key() -> anyhow::Result<PathBuf> {
    let key = match std::env::var_os("PARMA_RELEASE_KEY") {
        Some(key) => PathBuf::from(key),
        None => PathBuf::from(std::env::var("HOME")?).join(".config/parma/release-key.pem"),
    };
    ensure!(key.is_file(), "{} is missing: make node-image makes it", key.display());
    Ok(key)
}

#[test]
fn the_node_image_rebuilds_to_its_digest_and_states_what_parma_measure_measures() -> anyhow::Result<()> {
    let paths = Paths::get();
    let node = node_image(&paths)?;
    let work = tempfile::tempdir()?;
    let ovmf_hash = std::fs::read_to_string(paths.repo.join("qemu/ovmf/ovmf_AmdSev.hash"))?;
    let rebuilt = work.path().join("node");
    ok(parma(&paths)
        .args(["node", "build", "--uvm"])
        .arg(&paths.uvm)
        .arg("--bin-dir")
        .arg(paths.repo.join("target/x86_64-unknown-linux-gnu/release"))
        .arg("--release-key")
        .arg(release_key()?)
        .arg("--ovmf")
        .arg(paths.repo.join("qemu/ovmf/ovmf_AmdSev_suffix.bin"))
        .args(["--ovmf-hash", ovmf_hash.trim(), "--out"])
        .arg(&rebuilt))?;
    // The same inputs: the same index, so the same manifest digest, and the same blobs.
    ensure!(std::fs::read(rebuilt.join("index.json"))? == std::fs::read(node.join("index.json"))?, "another digest");
    let (ours, theirs) = (Layout::open(&rebuilt)?, Layout::open(&node)?);
    ensure!(ours.digest == theirs.digest && ours.layers == theirs.layers && ours.config == theirs.config);

    let payload = theirs.payload()?;
    let manifest = &payload.files()["uvm/manifest.json"];
    ensure!(payload.handler() == parma_host::node::handler_of(manifest));
    ensure!(payload.handler().len() == "parma-".len() + 8);
    // The reference values, signed, are what parma measure says of the image's own files.
    let uvm = work.path().join("uvm");
    std::fs::create_dir_all(&uvm)?;
    for (path, bytes) in payload.files() {
        if let Some(name) = path.strip_prefix("uvm/") {
            std::fs::write(uvm.join(name), bytes)?;
        }
    }
    let signed = parma_snp::reference::Signed::parse(&payload.files()["reference-values.json"])?;
    ensure!(std::fs::read(node.join("reference-values.json"))? == payload.files()["reference-values.json"]);
    let values = signed.verify(None)?;
    ensure!(values.handler == payload.handler());
    ensure!(values.launches.len() == 2, "an IGVM and an OVMF launch: {:?}", values.launches);
    for launch in &values.launches {
        let mut measure = parma(&paths);
        measure.arg("measure").args(["--vcpu-type", &launch.vcpu_type]);
        match launch.boot.as_str() {
            "igvm" => measure.arg("--igvm").arg(uvm.join("uvm.igvm")),
            "ovmf-kernel-hashes" => measure
                .arg("--uvm")
                .arg(&uvm)
                .arg("--ovmf")
                .arg(paths.repo.join("qemu/ovmf/ovmf_AmdSev_suffix.bin"))
                .args(["--ovmf-hash", ovmf_hash.trim()]),
            other => bail!("a launch {other}"),
        };
        let measured = ok(&mut measure)?;
        ensure!(measured.trim() == launch.measurement, "{}: parma measure says {measured}", launch.describe());
    }
    let config: serde_json::Value = serde_json::from_slice(&ours.config)?;
    ensure!(config["config"]["Labels"]["io.parma.handler"] == payload.handler());
    Ok(())
}

/// A registry on the loopback of a network namespace of the test's own.
struct Registry {
    netns: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let netns = format!("parma-node-{}", std::process::id());
        ensure!(Command::new("ip").args(["netns", "add", &netns]).status()?.success(), "ip netns add");
        ensure!(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]).status()?.success());
        std::fs::write(
            dir.path().join("registry.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:5000}}\n",
                dir.path().join("data").display()
            ),
        )?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .args(["/usr/bin/docker-registry", "serve"])
            .arg(dir.path().join("registry.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let registry = Self { netns, child, _dir: dir };
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while !registry.inside("bash").args(["-c", "exec 3<>/dev/tcp/127.0.0.1/5000"]).status()?.success() {
            ensure!(std::time::Instant::now() < give_up, "the registry did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }

    fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/var/run/netns/{}", self.netns)).arg(program);
        command
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).status();
    }
}

#[test]
fn the_node_image_publishes_to_a_registry_pulls_back_byte_for_byte_and_installs_from_there() -> anyhow::Result<()> {
    let paths = Paths::get();
    let node = node_image(&paths)?;
    let registry = Registry::start()?;
    let target = "127.0.0.1:5000/parma/node:test";
    let pushed = ok(registry
        .inside(paths.repo.join("target/release/parma"))
        .args(["node", "publish", "--image"])
        .arg(&node)
        .args(["--to", target, "--insecure"]))?;
    let layout = Layout::open(&node)?;
    ensure!(pushed.trim() == format!("{target}@{}", layout.digest), "{pushed}");
    // Without --insecure, HTTPS only: refused.
    let plain = run(registry
        .inside(paths.repo.join("target/release/parma"))
        .args(["node", "publish", "--image"])
        .arg(&node)
        .args(["--to", "127.0.0.1:5000/parma/node:https"]))?;
    ensure!(!plain.status.success(), "a push over plain HTTP without --insecure");

    // skopeo, independently: the same manifest and blobs, byte for byte.
    let work = tempfile::tempdir()?;
    let copy = work.path().join("copy");
    ok(registry
        .inside("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{target}"))
        .arg(format!("oci:{}:test", copy.display())))?;
    let pulled = Layout::open(&copy)?;
    ensure!(pulled.digest == layout.digest, "skopeo pulled {}, pushed {}", pulled.digest, layout.digest);
    ensure!(pulled.manifest == layout.manifest && pulled.config == layout.config && pulled.layers == layout.layers);

    // Installing from the registry: the same payload as from the layout.
    let root = work.path().join("root");
    std::fs::create_dir_all(&root)?;
    let installed = ok(registry
        .inside(paths.repo.join("target/release/parma"))
        .args(["node", "install", "--from", target, "--plain-http", "127.0.0.1:5000", "--root"])
        .arg(&root)
        .args(["--accel", "tcg", "--insecure-emulation"]))?;
    let handler = layout.payload()?.handler().to_string();
    ensure!(installed.contains(&format!("installed {handler}")), "{installed}");
    for (path, bytes) in layout.payload()?.files() {
        ensure!(std::fs::read(root.join("opt/parma").join(&handler).join(path))? == *bytes, "{path} differs");
    }
    Ok(())
}

#[test]
fn install_refuses_what_the_host_lacks_and_uninstall_leaves_the_root_as_it_was() -> anyhow::Result<()> {
    let paths = Paths::get();
    let node = node_image(&paths)?;
    let work = tempfile::tempdir()?;
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc/containerd"))?;
    let config = "# the node's own\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"example.com/pause:3\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n    runtime_type = \"io.containerd.runc.v2\"\n";
    std::fs::write(root.join("etc/containerd/config.toml"), config)?;
    let before = tree(&root)?;
    let install = |extra: &[&str]| {
        let mut command = parma(&paths);
        command.args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&root).args(extra);
        run(&mut command)
    };
    // Named refusals: no SNP opt-in, a QEMU that is not there, --snp on a host without SNP.
    for (extra, says) in [
        (&["--accel", "tcg"][..], "--insecure-emulation"),
        (&["--accel", "tcg", "--insecure-emulation", "--qemu", "/nonexistent/qemu"], "/nonexistent/qemu"),
        (&["--accel", "tcg", "--snp"], "--snp needs --accel kvm"),
    ] {
        let output = install(extra)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success() && stderr.contains(says), "{extra:?}: {stderr}");
        ensure!(tree(&root)? == before, "a refused install wrote something");
    }
    // A refusal after the payload was written (containerd's config is
    // version 1) leaves nothing behind either.
    let old_config = work.path().join("old-config");
    std::fs::create_dir_all(old_config.join("etc/containerd"))?;
    std::fs::write(old_config.join("etc/containerd/config.toml"), "[plugins.cri]\n")?;
    let untouched = tree(&old_config)?;
    let mut command = parma(&paths);
    command.args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&old_config);
    let output = run(command.args(["--accel", "tcg", "--insecure-emulation"]))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success() && stderr.contains("config version 1"), "{stderr}");
    ensure!(tree(&old_config)? == untouched, "a failed install left {:?}", diff(&untouched, &tree(&old_config)?));

    // A link in the handler's place (another root) is replaced, never written through.
    let handler = Layout::open(&node)?.payload()?.handler().to_string();
    let (linked, elsewhere) = (work.path().join("linked"), work.path().join("elsewhere"));
    std::fs::create_dir_all(linked.join("opt/parma"))?;
    std::fs::create_dir_all(&elsewhere)?;
    std::os::unix::fs::symlink(&elsewhere, linked.join("opt/parma").join(&handler))?;
    let mut command = parma(&paths);
    command.args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&linked);
    ok(command.args(["--accel", "tcg", "--insecure-emulation"]))?;
    ensure!(std::fs::read_dir(&elsewhere)?.next().is_none(), "install wrote through a link");
    ensure!(std::fs::symlink_metadata(linked.join("opt/parma").join(&handler))?.is_dir());

    let output = install(&["--accel", "tcg", "--insecure-emulation"])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let once = tree(&root)?;
    // Idempotent.
    ensure!(install(&["--accel", "tcg", "--insecure-emulation"])?.status.success());
    ensure!(tree(&root)? == once, "a second install changed the root");
    // Installing again over a config.toml it must refuse (containerd 2's
    // version 3) leaves the installed handler as it was.
    let config_path = root.join("etc/containerd/config.toml");
    let installed_config = std::fs::read_to_string(&config_path)?;
    std::fs::write(&config_path, installed_config.replace("version = 2", "version = 3"))?;
    let output = install(&["--accel", "tcg", "--insecure-emulation"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success() && stderr.contains("config version 3"), "{stderr}");
    std::fs::write(&config_path, &installed_config)?;
    ensure!(tree(&root)? == once, "a refused install changed {:?}", diff(&once, &tree(&root)?));
    // One that fails after its files took the handler's place (the drop-in
    // cannot be written) puts the handler's previous directory back, and
    // every file it wrote.
    let handler_dir = root.join("opt/parma").join(&handler);
    std::fs::write(handler_dir.join("marker"), "the directory before")?;
    let drop_in_path = root.join("etc/containerd/conf.d/parma.toml");
    let drop_in_text = std::fs::read_to_string(&drop_in_path)?;
    std::fs::remove_file(&drop_in_path)?;
    std::fs::create_dir(&drop_in_path)?;
    let output = install(&["--accel", "tcg", "--insecure-emulation"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success() && stderr.contains("in the way"), "{stderr}");
    ensure!(handler_dir.join("marker").is_file(), "the failed install kept its new directory");
    std::fs::remove_dir(&drop_in_path)?;
    std::fs::write(&drop_in_path, drop_in_text)?;
    std::fs::remove_file(handler_dir.join("marker"))?;
    ensure!(tree(&root)? == once, "a failed install changed {:?}", diff(&once, &tree(&root)?));
    // The drop-in carries config.toml's CRI section with the runtime, and config.toml imports it.
    let drop_in = std::fs::read_to_string(root.join("etc/containerd/conf.d/parma.toml"))?;
    let parsed: toml::Table = drop_in.parse()?;
    let cri = &parsed["plugins"]["io.containerd.grpc.v1.cri"];
    ensure!(cri["sandbox_image"].as_str() == Some("example.com/pause:3"), "{drop_in}");
    ensure!(cri["containerd"]["runtimes"]["runc"]["runtime_type"].as_str() == Some("io.containerd.runc.v2"));
    let runtime = &cri["containerd"]["runtimes"][handler.as_str()];
    let shim = root.join(format!("opt/parma/{handler}/bin/containerd-shim-parma-v2"));
    ensure!(runtime["runtime_type"].as_str() == Some(shim.to_str().context("utf-8")?), "{drop_in}");
    ensure!(runtime["runtime_path"].as_str() == Some(shim.to_str().context("utf-8")?));
    ensure!(parsed["proxy_plugins"][handler.as_str()]["type"].as_str() == Some("snapshot"));
    let main = std::fs::read_to_string(root.join("etc/containerd/config.toml"))?;
    ensure!(main.contains(&format!("imports = [\"{}/etc/containerd/conf.d/parma.toml\"]", root.display())), "{main}");
    // containerd itself reads the two as one config with the runtime in it.
    let dump = ok(Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(root.join("etc/containerd/config.toml"))
        .args(["config", "dump"]))?;
    ensure!(dump.contains(&format!("runtimes.{handler}]")) && dump.contains("example.com/pause:3"), "{dump}");

    // A record that names a file install never writes: refused, nothing removed.
    let record_path = root.join("opt/parma").join(&handler).join("install.json");
    let record = std::fs::read_to_string(&record_path)?;
    std::fs::write(
        &record_path,
        record.replace("etc/systemd/system/parma-snapshotter", "etc/containerd/config.toml#"),
    )?;
    let refused = run(parma(&paths).args(["node", "uninstall", "--root"]).arg(&root).args(["--handler", &handler]))?;
    ensure!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("install never writes"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ensure!(root.join("etc/containerd/config.toml").is_file());
    std::fs::write(&record_path, record)?;
    let uninstall = ok(parma(&paths).args(["node", "uninstall", "--root"]).arg(&root).args(["--handler", &handler]))?;
    ensure!(uninstall.contains("removed"));
    ensure!(tree(&root)? == before, "uninstall left {:?}", diff(&before, &tree(&root)?));
    let again = run(parma(&paths).args(["node", "uninstall", "--root"]).arg(&root).args(["--handler", &handler]))?;
    ensure!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not installed"));

    // A config.toml install wrote (there was none) and the user changed
    // since stays; one link among the state's parents stops --purge.
    let bare = work.path().join("bare");
    let (state, elsewhere) = (bare.join("var/lib"), work.path().join("state-elsewhere"));
    std::fs::create_dir_all(&state)?;
    std::fs::create_dir_all(elsewhere.join(&handler))?;
    std::fs::write(elsewhere.join(&handler).join("keep"), "not the handler's")?;
    std::os::unix::fs::symlink(&elsewhere, state.join("parma"))?;
    let mut command = parma(&paths);
    command.args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&bare);
    ok(command.args(["--accel", "tcg", "--insecure-emulation"]))?;
    let config_path = bare.join("etc/containerd/config.toml");
    let written = std::fs::read_to_string(&config_path)?;
    std::fs::write(&config_path, format!("{written}# the operator's own line\n"))?;
    let purge = |root: &Path| {
        run(parma(&paths).args(["node", "uninstall", "--root"]).arg(root).args(["--handler", &handler, "--purge"]))
    };
    let refused = purge(&bare)?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success() && stderr.contains("symbolic link"), "{stderr}");
    ensure!(elsewhere.join(&handler).join("keep").is_file(), "--purge removed through a link");
    ensure!(bare.join("opt/parma").join(&handler).join("install.json").is_file(), "the refused purge removed files");
    std::fs::remove_file(state.join("parma"))?;
    let purged = purge(&bare)?;
    ensure!(purged.status.success(), "{}", String::from_utf8_lossy(&purged.stderr));
    // Changed since install wrote it: it stays, without install's imports line.
    let config = std::fs::read_to_string(&config_path)?;
    ensure!(config == "version = 2\n# the operator's own line\n", "{config}");
    // The same with a record an older install wrote (no hash, no line).
    std::fs::remove_file(&config_path)?;
    let mut command = parma(&paths);
    command.args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&bare);
    ok(command.args(["--accel", "tcg", "--insecure-emulation"]))?;
    let record_path = bare.join("opt/parma/containerd.json");
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&record_path)?)?;
    ensure!(record["created_config"] == true && record["config_sha256"].is_string(), "{record}");
    record.as_object_mut().context("an object")?.remove("config_sha256");
    record["imports"] = serde_json::Value::Null;
    std::fs::write(&record_path, serde_json::to_vec(&record)?)?;
    let written = std::fs::read_to_string(&config_path)?;
    std::fs::write(&config_path, format!("{written}# the operator's own line\n"))?;
    ensure!(purge(&bare)?.status.success());
    let config = std::fs::read_to_string(&config_path)?;
    ensure!(config == "version = 2\n# the operator's own line\n", "{config}");
    Ok(())
}

fn diff(before: &BTreeMap<String, (String, Vec<u8>)>, after: &BTreeMap<String, (String, Vec<u8>)>) -> Vec<String> {
    let mut out: Vec<String> = after.keys().filter(|k| before.get(*k) != after.get(*k)).cloned().collect();
    out.extend(before.keys().filter(|k| !after.contains_key(*k)).map(|k| format!("-{k}")));
    out
}

#[test]
fn an_installed_handler_runs_a_pod_through_cri() -> anyhow::Result<()> {
    let paths = Paths::get();
    let node = node_image(&paths)?;
    let work = tempfile::tempdir()?;
    let root = work.path().join("root");
    for dir in ["run", "var/lib", "etc"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let image = oci::build_test_image(&work.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let mut before = BTreeMap::new();
    let (containerd, handler) = Containerd::start_installed(&paths.repo, &root, |dir| {
        before = tree(&root)?;
        let output = ok(parma(&paths)
            .args(["node", "install", "--from"])
            .arg(&node)
            .arg("--root")
            .arg(&root)
            .args(["--accel", "tcg", "--insecure-emulation", "--boot-deadline-s", "240", "--cri-snapshotter"])
            .arg("--containerd-socket")
            .arg(dir.join("containerd.sock"))
            .arg("--containerd-root")
            .arg(dir.join("root")))?;
        let handler = output
            .lines()
            .find_map(|line| line.strip_prefix("installed "))
            .and_then(|rest| rest.split_whitespace().next())
            .context("no handler")?;
        Ok(handler.to_string())
    })?;
    let target = containerd.push(&image.layout, &image.reference, "parma/test:1")?;
    containerd.push(&image.layout, &image.reference, "parma/pause:1")?;
    let images = parma_host::kube::Images::parse(&[format!("{target}={}", image.layout.display())])?;
    let pod = format!(
        "kind: Pod\nmetadata: {{name: web-1, namespace: default}}\nspec:\n  automountServiceAccountToken: false\n  containers:\n    - name: app\n      image: {target}\n      args: [\"pod\", \"8080\"]\n      livenessProbe:\n        exec: {{command: [/bin/cat, /etc/hostname]}}\n"
    );
    let (policies, _) = parma_host::kube::generate_pod(&pod, &images, &work.path().join("layers"))?;
    let policy = policies[0].policy.clone();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let diagnose = |what: &str| {
        let containerd_log: Vec<String> = containerd
            .log("containerd")
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .map(str::to_string)
            .collect();
        format!(
            "{what}\n--- containerd:\n{}\n--- snapshotter:\n{}\n--- drop-in:\n{}",
            containerd_log.join("\n"),
            containerd.log("snapshotter"),
            std::fs::read_to_string(root.join("etc/containerd/conf.d/parma.toml")).unwrap_or_default()
        )
    };
    let slot = parma_tests::BootSlot::acquire()?;
    let outcome = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let channel = containerd.channel().await?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(ImageSpec { image: target.clone(), ..Default::default() }),
                ..Default::default()
            })
            .await
            .with_context(|| diagnose("PullImage"))?;
        let sandbox_config = parma_tests::containerd::pod_sandbox(
            "web-1",
            "0c0ffee0-0000-4000-8000-000000000015",
            &logs,
            parma_host::annotation::encode(&policy),
        );
        let sandbox_id = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: handler.clone(),
            })
            .await
            .with_context(|| diagnose("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
            image: Some(ImageSpec { image: target.clone(), ..Default::default() }),
            args: vec!["pod".into(), "8080".into()],
            log_path: "app/0.log".into(),
            envs: vec![KeyValue { key: "HOSTNAME".into(), value: "web-1".into() }],
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(parma_tests::containerd::pod_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .with_context(|| diagnose("CreateContainer"))?
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest { container_id: id.clone() })
            .await
            .with_context(|| diagnose("StartContainer"))?;
        let probe = runtime
            .exec_sync(ExecSyncRequest {
                container_id: id,
                cmd: vec!["/bin/cat".into(), "/etc/hostname".into()],
                timeout: 60,
            })
            .await
            .with_context(|| diagnose("ExecSync"))?
            .into_inner();
        ensure!(probe.exit_code == 0 && probe.stdout == b"web-1\n", "{probe:?}");
        runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: sandbox_id.clone() }).await?;
        runtime.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sandbox_id }).await?;
        anyhow::Ok(())
    });
    drop(slot);
    outcome?;
    // The layers came from the installed snapshotter, under the handler's state.
    ensure!(
        std::fs::read_dir(root.join(format!("var/lib/parma/{handler}/snapshotter/layers")))?.next().is_some(),
        "the installed snapshotter converted no layer"
    );
    drop(containerd);
    ok(parma(&paths).args(["node", "uninstall", "--purge", "--root"]).arg(&root).args(["--handler", &handler]))?;
    let after = tree(&root)?;
    ensure!(after == before, "uninstall --purge left {:?}", diff(&before, &after));
    Ok(())
}

#[test]
fn reference_values_verify_an_emulated_report_of_the_installed_uvm_and_name_what_differs() -> anyhow::Result<()> {
    let paths = Paths::get();
    let node = node_image(&paths)?;
    let work = tempfile::tempdir()?;
    let root = work.path().join("root");
    std::fs::create_dir_all(&root)?;
    ok(parma(&paths).args(["node", "install", "--from"]).arg(&node).arg("--root").arg(&root).args([
        "--accel",
        "tcg",
        "--insecure-emulation",
    ]))?;
    let handler = Layout::open(&node)?.payload()?.handler().to_string();
    let installed = root.join("opt/parma").join(&handler);
    let values_path = installed.join("reference-values.json");

    // Boot the installed UVM (emulated reports state its IGVM launch digest).
    let mut booted = Paths::get();
    booted.uvm = installed.join("uvm");
    let policy_path = paths.repo.join("policies/allow_all.rego");
    let mut guest = Guest::boot(&booted, &Boot::emulated_for_policy(&policy_path)?)?;
    guest.wait_ready(READY)?;
    let mut client = guest.client(ANSWER)?;
    let policy_hash = client.set_policy(std::fs::read_to_string(&policy_path)?)?;
    let (report, provider) = client.attestation(&[0x5a; 32])?;
    ensure!(provider == "insecure-emulation");
    client.shutdown()?;
    ensure!(guest.wait_exit(Duration::from_secs(10))?.success());
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    parma_snp::emulation::test_chain(&parma_snp::emulation::AGENT_SEED)?.write_dir(&certs)?;
    let report_path = work.path().join("report.bin");
    std::fs::write(&report_path, &report)?;

    let signed = parma_snp::reference::Signed::parse(&std::fs::read(&values_path)?)?;
    let issuer = signed.issuer()?;
    let verify_as = |report: &Path, values: &Path, issuer: Option<&str>, extra: &[&str]| {
        let mut command = parma(&paths);
        command.args(["verify", "--report"]).arg(report).arg("--certs").arg(&certs);
        command.args(["--allow-insecure-emulation", "--reference-values"]).arg(values).args(extra);
        if let Some(issuer) = issuer {
            command.args(["--issuer", issuer]);
        }
        run(&mut command)
    };
    let host_data = ["--expect-host-data", policy_hash.as_str(), "--expect-handler", handler.as_str()];
    let verify = |report: &Path, values: &Path, issuer: &str| verify_as(report, values, Some(issuer), &host_data);
    let passed = verify(&report_path, &values_path, &issuer)?;
    let text = String::from_utf8_lossy(&passed.stdout).into_owned();
    ensure!(passed.status.success(), "{text}{}", String::from_utf8_lossy(&passed.stderr));
    let pass_line = format!("pass  reference_values: {handler} igvm with 1 vCPU EPYC-v4");
    ensure!(text.lines().any(|line| line == pass_line), "{text}");
    ensure!(text.lines().last().is_some_and(|l| l.ends_with(" failed") && l.contains(", 0 failed")), "{text}");
    // Without the pod's policy hash the values still pass, saying HOST_DATA went unchecked.
    let no_host_data = verify_as(&report_path, &values_path, Some(&issuer), &[])?;
    let text = String::from_utf8_lossy(&no_host_data.stdout).into_owned();
    ensure!(no_host_data.status.success(), "{text}");
    ensure!(text.contains(&format!("{pass_line}; HOST_DATA not checked")), "{text}");
    // Without --issuer the launch matches, but the check fails and names the signer.
    let unchecked = verify_as(&report_path, &values_path, None, &host_data)?;
    let text = String::from_utf8_lossy(&unchecked.stdout).into_owned();
    ensure!(unchecked.status.code() == Some(2), "{text}");
    ensure!(text.contains("FAIL  reference_values") && text.contains("signer was not checked"), "{text}");
    ensure!(text.contains(&issuer) && text.contains(", 1 failed"), "{text}");
    // Values for another handler (the same key signs every UVM's) fail.
    let other_handler = verify_as(&report_path, &values_path, Some(&issuer), &["--expect-handler", "parma-00000000"])?;
    let text = String::from_utf8_lossy(&other_handler.stdout).into_owned();
    ensure!(other_handler.status.code() == Some(2), "{text}");
    ensure!(
        text.contains(&format!("FAIL  reference_values: they are for {handler}, not for parma-00000000")),
        "{text}"
    );
    let json = verify_as(&report_path, &values_path, None, &["--json", "--expect-host-data", &policy_hash])?;
    ensure!(json.status.code() == Some(2));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    ensure!(json["all_passed"] == false && json["reference_values"]["passed"] == false, "{json}");
    ensure!(json["reference_values"]["issuer_checked"] == false && json["reference_values"]["issuer"] == *issuer);

    // One measurement bit changed, signed again by the emulation's key:
    // only the reference values fail, and they name the field.
    let parsed = parma_snp::AttestationReport::parse(&report)?;
    let mut measurement = parsed.measurement;
    measurement[0] ^= 1;
    let resigned = parma_snp::emulation::Signer::from_seed(&parma_snp::emulation::AGENT_SEED).report(
        parma_snp::emulation::EmulatedFields {
            measurement,
            host_data: parsed.host_data,
            report_data: parsed.report_data,
        },
    );
    let changed = work.path().join("changed.bin");
    std::fs::write(&changed, zerocopy::IntoBytes::as_bytes(&resigned))?;
    let failed = verify(&changed, &values_path, &issuer)?;
    let text = String::from_utf8_lossy(&failed.stdout).into_owned();
    ensure!(failed.status.code() == Some(2), "{text}");
    ensure!(text.contains("FAIL  reference_values") && text.contains("differs in measurement (expected"), "{text}");
    ensure!(text.lines().filter(|l| l.starts_with("FAIL")).count() == 1, "{text}");

    // The signed file tampered with: refused on its signature.
    let mut tampered = signed.clone();
    tampered.payload = tampered.payload.replacen("\"vcpus\":1", "\"vcpus\":2", 1);
    ensure!(tampered.payload != signed.payload);
    let tampered_path = work.path().join("tampered.json");
    std::fs::write(&tampered_path, serde_json::to_vec(&tampered)?)?;
    let refused = verify(&report_path, &tampered_path, &issuer)?;
    ensure!(
        refused.status.code() == Some(1)
            && String::from_utf8_lossy(&refused.stderr).contains("signature does not verify"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Signed by a key other than the issuer asked for.
    let other = verify(&report_path, &values_path, &"00".repeat(32))?;
    ensure!(other.status.code() == Some(1) && String::from_utf8_lossy(&other.stderr).contains("not by the issuer"));
    guest.check_serial()
}

#[test]
fn the_deploy_manifests_are_kubernetes_objects_of_their_kinds() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::node::v1::RuntimeClass;
    let paths = Paths::get();
    let render = |name: &str| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(paths.repo.join("deploy").join(name))?
            .replace("parma-HANDLER", "parma-1a2b3c4d")
            .replace("IMAGE", "registry.example/parma/node@sha256:0000"))
    };
    let class: RuntimeClass = serde_saphyr::from_str(&render("runtimeclass.yaml")?)?;
    ensure!(class.handler == "parma-1a2b3c4d");
    let overhead = class.overhead.and_then(|o| o.pod_fixed).context("no overhead")?;
    ensure!(overhead.contains_key("memory") && overhead.contains_key("cpu"));
    let selector = class.scheduling.and_then(|s| s.node_selector).context("no node selector")?;
    ensure!(selector.get("io.parma/runtime").map(String::as_str) == Some("true"));

    let daemonset: DaemonSet = serde_saphyr::from_str(&render("daemonset.yaml")?)?;
    let spec = daemonset.spec.context("no spec")?.template.spec.context("no pod spec")?;
    ensure!(spec.node_selector.unwrap_or_default().get("io.parma/runtime").map(String::as_str) == Some("true"));
    let container = spec.containers.first().context("no container")?;
    let command = container.command.clone().unwrap_or_default();
    for arg in ["install", "--snp", "--restart-containerd", "--wait", "/host"] {
        ensure!(command.iter().any(|a| a == arg), "{command:?} lacks {arg}");
    }
    // hostPath mounts: only what install writes.
    let host_paths: Vec<String> =
        spec.volumes.unwrap_or_default().into_iter().filter_map(|v| v.host_path.map(|h| h.path)).collect();
    ensure!(host_paths == ["/opt/parma", "/etc/containerd", "/etc/systemd/system"], "{host_paths:?}");
    Ok(())
}
