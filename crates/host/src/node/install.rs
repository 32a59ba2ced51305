//! `parma node install` and `uninstall`: a node image's payload onto a
//! node, with what containerd needs to run it as a runtime handler.
//!
//! Under `ROOT` (the node's `/`, or the host's root mounted into the
//! DaemonSet's container):
//!
//! - `opt/parma/HANDLER/`: `bin/` (parma, the shim, the snapshotter),
//!   `uvm/`, `reference-values.json`, `payload.json`, the shim's
//!   `shim.toml` and `install.json` (what this install added);
//! - `etc/systemd/system/parma-snapshotter-HANDLER.service`: the
//!   snapshotter, a containerd proxy plugin;
//! - `etc/containerd/conf.d/parma.toml`: the drop-in, for every handler
//!   installed; and, when `config.toml` does not import it yet, one
//!   `imports` line there.
//!
//! containerd 1.x merges an imported file's plugin sections whole (a
//! drop-in's `plugins."io.containerd.grpc.v1.cri"` replaces config.toml's),
//! so the drop-in carries config.toml's CRI section with the runtimes
//! added; installing again after editing that section brings it along.
//!
//! Uninstalling the last handler removes the drop-in and the `imports` edit,
//! and every directory install made; with `--purge`, the handler's state
//! too. Files are checked against the payload's hashes before they are
//! written; every write goes through a temporary name. Whatever can refuse
//! (containerd's config, the other handlers' records) does before the first
//! write; the handler's files are written to `.HANDLER.new` and take its
//! place only when all are there, and a failure after that puts back the
//! directory and every file that was there before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{PAYLOAD_FILE, Payload, valid_handler};

/// The CRI plugin's name in containerd 1.x's config version 2.
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// The drop-in, under the root.
pub const DROP_IN: &str = "etc/containerd/conf.d/parma.toml";
/// The record of the shared edits (the drop-in, config.toml, directories).
const SHARED_RECORD: &str = "opt/parma/containerd.json";
/// A handler's record.
const RECORD: &str = "install.json";
/// The least QEMU a UVM runs on (Debian 12's); SNP with the IGVM file needs 10.1.
const QEMU_MIN: (u32, u32) = (7, 2);
const QEMU_SNP_IGVM: (u32, u32) = (10, 1);

/// How and where to install.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node's root as the installer sees it.
    pub root: PathBuf,
    /// The same root as containerd sees it (`/` from the DaemonSet, which
    /// mounts the host's root at `/host`); paths in the files written use it.
    pub host_path: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: crate::Accel,
    /// Launch pods as SEV-SNP guests (the IGVM file); needs an SNP host.
    pub snp: bool,
    /// Accept a host without SNP: pods run with INSECURE emulated attestation.
    pub insecure_emulation: bool,
    /// The QEMU the shim runs (checked here).
    pub qemu: PathBuf,
    /// The UVM's memory.
    pub memory_mib: u32,
    /// How long a UVM may take to boot, seconds.
    pub boot_deadline_s: u64,
    /// containerd's config, relative to the root.
    pub containerd_config: PathBuf,
    /// containerd's socket, as containerd sees it.
    pub containerd_socket: PathBuf,
    /// containerd's root directory (its content store), as containerd sees it.
    pub containerd_root: PathBuf,
    /// Make the parma snapshotter CRI's snapshotter for every pod
    /// (containerd 1.6, which has no per-runtime snapshotter).
    pub cri_snapshotter: bool,
}

impl Options {
    /// Defaults for a node's root.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            host_path: root.to_path_buf(),
            accel: crate::Accel::Kvm,
            snp: false,
            insecure_emulation: false,
            qemu: PathBuf::from("qemu-system-x86_64"),
            memory_mib: 512,
            boot_deadline_s: 60,
            containerd_config: PathBuf::from("etc/containerd/config.toml"),
            containerd_socket: PathBuf::from("/run/containerd/containerd.sock"),
            containerd_root: PathBuf::from("/var/lib/containerd"),
            cri_snapshotter: false,
        }
    }

    /// A path under the root as containerd (the host) sees it.
    fn host(&self, relative: &str) -> PathBuf {
        self.host_path.join(relative)
    }
}

/// A handler's record: what its install wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    handler: String,
    /// The runtime's table in the drop-in.
    runtime: BTreeMap<String, toml::Value>,
    /// The snapshotter's socket (host view).
    snapshotter_socket: String,
    cri_snapshotter: bool,
    /// Files outside the handler's directory (relative to the root).
    files: Vec<String>,
    /// State directories the handler's programs make (relative to the root).
    state: Vec<String>,
}

/// The shared record: the edit of config.toml and the directories made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Shared {
    /// config.toml did not exist: install wrote it.
    created_config: bool,
    /// The sha256 of the config.toml install wrote: uninstall removes it
    /// only while it has it (else only the `imports` line goes).
    #[serde(default)]
    config_sha256: Option<String>,
    /// The `imports` line: (what was there, if anything; what install wrote).
    imports: Option<(Option<String>, String)>,
    /// Directories install made, relative to the root, parents first.
    dirs: Vec<String>,
}

/// Check that the host can run the UVM as asked: the missing piece named.
pub fn check_host(options: &Options) -> anyhow::Result<()> {
    // From the DaemonSet's container (another root than containerd's), the
    // host's QEMU is looked at in the host's mount namespace.
    let mut command = if options.root == options.host_path {
        Command::new(&options.qemu)
    } else {
        let mut nsenter = Command::new("nsenter");
        nsenter.args(["--target", "1", "--mount", "--"]).arg(&options.qemu);
        nsenter
    };
    let output = command
        .arg("--version")
        .output()
        .with_context(|| format!("this host has no {} (QEMU runs every pod's UVM)", options.qemu.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = qemu_version(&text).with_context(|| format!("cannot read QEMU's version from {text:?}"))?;
    ensure!(
        version >= QEMU_MIN,
        "QEMU {}.{} is too old: the UVM needs {}.{} or newer",
        version.0,
        version.1,
        QEMU_MIN.0,
        QEMU_MIN.1
    );
    if options.accel == crate::Accel::Kvm {
        ensure!(
            Path::new("/dev/kvm").exists(),
            "this host has no /dev/kvm: pods need KVM (or --accel tcg, for development)"
        );
    }
    if options.snp {
        ensure!(options.accel == crate::Accel::Kvm, "--snp needs --accel kvm");
        let snp = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev_snp").unwrap_or_default();
        ensure!(
            snp.trim() == "Y",
            "this host does not offer SEV-SNP (/sys/module/kvm_amd/parameters/sev_snp is not Y): install without --snp and with --insecure-emulation only for development"
        );
        ensure!(
            version >= QEMU_SNP_IGVM,
            "QEMU {}.{} cannot launch the IGVM file: SEV-SNP launches need {}.{} or newer",
            version.0,
            version.1,
            QEMU_SNP_IGVM.0,
            QEMU_SNP_IGVM.1
        );
    } else {
        ensure!(
            options.insecure_emulation,
            "without --snp, pods' attestation is INSECURE emulation (no hardware behind it): pass --insecure-emulation to install for development, or --snp on an SNP host"
        );
    }
    Ok(())
}

/// `QEMU emulator version 7.2.19 (Debian ...)` → (7, 2).
fn qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Write `bytes` to `path` through a temporary name, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().context("a path without a parent")?;
    let mut file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    file.write_all(bytes)?;
    file.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.as_file().sync_all()?;
    file.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Make `relative` (and its parents) under the root, recording in `made`
/// each directory that was not there.
fn make_dirs(root: &Path, relative: &str, made: &mut Vec<String>) -> anyhow::Result<()> {
    let mut path = String::new();
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(part);
        let full = root.join(&path);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!("{} is in the way: not a directory", full.display()),
            Err(_) => {
                std::fs::create_dir(&full).with_context(|| format!("cannot make {}", full.display()))?;
                made.push(path.clone());
            }
        }
    }
    Ok(())
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))?))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The handlers installed under the root, with their records.
fn installed(root: &Path) -> anyhow::Result<BTreeMap<String, Record>> {
    let mut out = BTreeMap::new();
    let dir = root.join("opt/parma");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if valid_handler(&name)
            && let Some(record) = read_json::<Record>(&entry.path().join(RECORD))?
        {
            out.insert(name, record);
        }
    }
    Ok(out)
}

/// What was installed.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The handler.
    pub handler: String,
    /// Its directory (installer's view).
    pub dir: PathBuf,
    /// The snapshotter's systemd unit (installer's view).
    pub unit: PathBuf,
    /// The drop-in (installer's view).
    pub drop_in: PathBuf,
}

/// Install `payload` under the root. Idempotent: installing the same
/// payload again writes the same files.
pub fn install(payload: &Payload, options: &Options) -> anyhow::Result<Installed> {
    check_host(options)?;
    let root = &options.root;
    let handler = payload.handler().to_string();
    ensure!(valid_handler(&handler), "{handler:?} is not a handler name");
    let shared_path = root.join(SHARED_RECORD);
    let mut dirs = Vec::new();
    // One install or uninstall at a time on this root (two handlers'
    // DaemonSets, say): the drop-in and the records are shared.
    let prepared = lock_root(root, Some(&mut dirs)).and_then(|lock| {
        let shared: Shared = read_json(&shared_path)?.unwrap_or_default();
        // Whatever can refuse (containerd's config, the other handlers'
        // records) does so before anything else is written.
        let mut handlers = installed(root)?;
        handlers.insert(handler.clone(), record_of(options, &handler));
        let rendered = render_drop_in(options, &handlers)?;
        Ok((lock, shared, rendered))
    });
    let mut undo = Undo::default();
    let (_lock, mut shared, rendered) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            undo.dirs.extend(dirs.iter().map(|dir| root.join(dir)));
            undo.undo();
            return Err(err);
        }
    };
    let made = ["etc/systemd/system", "etc/containerd/conf.d"]
        .iter()
        .try_for_each(|relative| make_dirs(root, relative, &mut dirs));
    undo.dirs.extend(dirs.iter().map(|dir| root.join(dir)));
    shared.dirs.extend(dirs);
    // The handler's files are written to a directory of their own and take
    // the handler's place only when all are there; until the end, the
    // directory that was there stays beside it, to be put back on a failure.
    let staging = root.join(format!("opt/parma/.{handler}.new"));
    let old = root.join(format!("opt/parma/.{handler}.old"));
    let dir = root.join(format!("opt/parma/{handler}"));
    let mut swapped = Swap::default();
    let result = made.and_then(|()| {
        remove_any(&staging)?;
        remove_any(&old)?;
        std::fs::create_dir(&staging).with_context(|| format!("cannot make {}", staging.display()))?;
        write_handler(payload, options, &handler, &staging)?;
        // The handler's directory is wholly install's: replaced, never
        // written through whatever (a link included) is in its place.
        if std::fs::symlink_metadata(&dir).is_ok() {
            std::fs::rename(&dir, &old).with_context(|| format!("cannot replace {}", dir.display()))?;
            swapped.old = true;
        }
        std::fs::rename(&staging, &dir).with_context(|| format!("cannot move the new {}", dir.display()))?;
        swapped.new = true;
        undo.write(&root.join(unit_of(&handler)), snapshotter_unit(options, &handler).as_bytes(), 0o644)?;
        write_drop_in(options, rendered, &mut shared, &mut undo)?;
        undo.write(&shared_path, &serde_json::to_vec_pretty(&shared)?, 0o644)
    });
    if let Err(err) = result {
        // Put back what was there: the files written, the handler's directory.
        let _ = remove_any(&staging);
        if swapped.new {
            let _ = remove_any(&dir);
        }
        if swapped.old {
            let _ = std::fs::rename(&old, &dir);
        }
        undo.undo();
        return Err(err);
    }
    if let Err(err) = remove_any(&old) {
        tracing::warn!("the handler's previous files stay in {}: {err:#}", old.display());
    }
    Ok(Installed { handler: handler.clone(), dir, unit: root.join(unit_of(&handler)), drop_in: root.join(DROP_IN) })
}

/// What an install moved: the handler's directory there before (to
/// `.HANDLER.old`), the new one (from `.HANDLER.new`).
#[derive(Default)]
struct Swap {
    old: bool,
    new: bool,
}

/// An exclusive lock on `ROOT/opt/parma`, held while it lives.
#[derive(Debug)]
struct RootLock {
    _dir: std::fs::File,
}

/// Wait for the lock on `ROOT/opt/parma`, the directory every install on
/// this root (the node's own, or a DaemonSet pod's, which mounts it from
/// the node) shares; with `made`, the directory is made if missing (and
/// recorded there). A directory removed or replaced while waiting (the
/// last handler's uninstall takes it) is locked afresh.
fn lock_root(root: &Path, mut made: Option<&mut Vec<String>>) -> anyhow::Result<RootLock> {
    use std::os::unix::fs::MetadataExt as _;
    let path = root.join("opt/parma");
    loop {
        if let Some(made) = made.as_deref_mut() {
            make_dirs(root, "opt/parma", made)?;
        }
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("cannot look at {}", path.display()))?;
        ensure!(meta.is_dir(), "{} is in the way: not a directory", path.display());
        let dir = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        dir.lock().with_context(|| format!("cannot lock {}", path.display()))?;
        let held = dir.metadata()?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.is_dir() && now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok(RootLock { _dir: dir });
            }
            // Gone: without `made`, nothing is installed there any more.
            Err(_) if made.is_none() => bail!("{} is gone", path.display()),
            _ => continue,
        }
    }
}

/// Remove `path`, whatever it is (a link itself, not what it names), if it is there.
fn remove_any(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
    .with_context(|| format!("cannot remove {}", path.display()))
}

/// The snapshotter's unit of `handler`, relative to the root.
fn unit_of(handler: &str) -> String {
    format!("etc/systemd/system/parma-snapshotter-{handler}.service")
}

/// The state directories of `handler`'s programs, relative to the root.
fn state_of(handler: &str) -> [String; 2] {
    [format!("run/parma/{handler}"), format!("var/lib/parma/{handler}")]
}

/// Write `handler`'s files into `dir` (its directory to be): the payload,
/// each file checked again as it is written, `shim.toml` and the record.
fn write_handler(payload: &Payload, options: &Options, handler: &str, dir: &Path) -> anyhow::Result<Record> {
    let base = format!("opt/parma/{handler}");
    for (path, bytes) in payload.files() {
        let entry = payload.list().files.get(path).context("a payload file without an entry")?;
        // Checked again as written: the path and mode too.
        ensure!(super::payload_path(path) && entry.mode == super::payload_mode(path), "{path} is not a payload file");
        ensure!(super::FileEntry::of(bytes, entry.mode) == *entry, "{path} changed after it was checked");
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        write_file(&target, bytes, entry.mode)?;
    }
    let list = serde_json::to_vec_pretty(payload.list())?;
    write_file(&dir.join(PAYLOAD_FILE), &list, 0o644)?;

    // The shim's configuration, beside its binary's directory.
    let host_dir = options.host(&base);
    let state = state_of(handler);
    let mut shim = format!(
        "# Written by parma node install for {handler}; parma node uninstall removes it.\nuvm = {:?}\nqemu = {:?}\naccel = {:?}\nmemory_mib = {}\nboot_deadline_s = {}\nstate_dir = {:?}\n",
        host_dir.join("uvm").display().to_string(),
        options.qemu.display().to_string(),
        options.accel.to_string(),
        options.memory_mib,
        options.boot_deadline_s,
        options.host(&state[0]).join("shim").display().to_string(),
    );
    if options.snp {
        shim.push_str(&format!(
            "\n[snp]\nigvm = {:?}\n",
            host_dir.join("uvm").join(parma_image::files::IGVM).display().to_string()
        ));
    }
    write_file(&dir.join("shim.toml"), shim.as_bytes(), 0o644)?;

    let record = record_of(options, handler);
    write_file(&dir.join(RECORD), &serde_json::to_vec_pretty(&record)?, 0o644)?;
    Ok(record)
}

/// The record of `handler` installed with `options`.
fn record_of(options: &Options, handler: &str) -> Record {
    let host_dir = options.host(&format!("opt/parma/{handler}"));
    let socket = snapshotter_socket(options, handler);
    // The shim (runtime io.containerd.parma.v2) by its absolute path:
    // containerd 1.6 does not honour runtime_path, but takes a runtime
    // type that is a path as the shim binary; 1.7 and later read both.
    let shim_path = toml::Value::from(host_dir.join("bin/containerd-shim-parma-v2").display().to_string());
    let mut runtime = BTreeMap::new();
    runtime.insert("runtime_type".to_string(), shim_path.clone());
    runtime.insert("runtime_path".to_string(), shim_path);
    runtime.insert("pod_annotations".to_string(), toml::Value::Array(vec![toml::Value::from("io.parma.*")]));
    // containerd 1.7 and later: this runtime's pods use this snapshotter.
    runtime.insert("snapshotter".to_string(), toml::Value::from(handler.to_string()));
    Record {
        handler: handler.to_string(),
        runtime,
        snapshotter_socket: socket,
        cri_snapshotter: options.cri_snapshotter,
        files: vec![unit_of(handler)],
        state: state_of(handler).to_vec(),
    }
}

/// The snapshotter's socket (as the host sees it).
fn snapshotter_socket(options: &Options, handler: &str) -> String {
    options.host(&state_of(handler)[0]).join("snapshotter.sock").display().to_string()
}

/// The snapshotter's systemd unit.
fn snapshotter_unit(options: &Options, handler: &str) -> String {
    let host_dir = options.host(&format!("opt/parma/{handler}"));
    let state = state_of(handler);
    let socket = snapshotter_socket(options, handler);
    format!(
        "# Written by parma node install; parma node uninstall removes it.\n[Unit]\nDescription=Parma snapshotter for {handler} (containerd proxy plugin)\nBefore=containerd.service\n\n[Service]\nExecStart={} --root {} --socket {socket} --containerd {} --namespace k8s.io --content-dir {}\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n",
        host_dir.join("bin/parma-snapshotter").display(),
        options.host(&state[1]).join("snapshotter").display(),
        options.containerd_socket.display(),
        options.containerd_root.join("io.containerd.content.v1.content").display(),
    )
}

/// Write the drop-in [`render_drop_in`] made, and config.toml importing it.
fn write_drop_in(
    options: &Options,
    (text, Plan { config_path, edit, .. }): (String, Plan),
    shared: &mut Shared,
    undo: &mut Undo,
) -> anyhow::Result<()> {
    let root = &options.root;
    undo.write(&root.join(DROP_IN), text.as_bytes(), 0o644)?;
    match edit {
        None => {}
        Some(Edit::Create { text, line }) => {
            let mut made = Vec::new();
            let result = make_dirs(root, &parent_of(&options.containerd_config), &mut made);
            undo.dirs.extend(made.iter().map(|dir| root.join(dir)));
            shared.dirs.extend(made);
            result?;
            undo.write(&config_path, text.as_bytes(), 0o644)?;
            shared.created_config = true;
            shared.config_sha256 = Some(hex::encode(Sha256::digest(text.as_bytes())));
            shared.imports = Some((None, line));
        }
        Some(Edit::Line { text, before, line }) => {
            undo.write(&config_path, text.as_bytes(), mode_of(&config_path))?;
            shared.imports = Some((before, line));
        }
    }
    Ok(())
}

/// The drop-in for `handlers` and how config.toml comes to import it:
/// everything that can refuse, before anything is written.
fn render_drop_in(options: &Options, handlers: &BTreeMap<String, Record>) -> anyhow::Result<(String, Plan)> {
    let plan = plan_config(options)?;
    let config = &plan.config;
    // config.toml's CRI section, with every parma runtime added.
    let mut cri = config
        .get("plugins")
        .and_then(|p| p.get(CRI_PLUGIN))
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_default();
    let containerd = cri.entry("containerd").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let containerd = containerd.as_table_mut().context("the CRI plugin's containerd is not a table")?;
    // The snapshotter needs CRI's layer labels (containerd 1.6 leaves them out by default).
    containerd.insert("disable_snapshot_annotations".into(), toml::Value::Boolean(false));
    // containerd decodes a runtimes table over its defaults whole: its
    // built-in runc must stay when config.toml relied on it.
    let default = containerd.get("default_runtime_name").and_then(toml::Value::as_str).unwrap_or("runc").to_string();
    let runtimes = containerd.entry("runtimes").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let runtimes = runtimes.as_table_mut().context("the CRI plugin's runtimes is not a table")?;
    if default == "runc" && !runtimes.contains_key("runc") {
        let mut runc = toml::Table::new();
        runc.insert("runtime_type".into(), toml::Value::from("io.containerd.runc.v2"));
        runtimes.insert("runc".into(), toml::Value::Table(runc));
    }
    let mut proxies = toml::Table::new();
    for (name, record) in handlers {
        runtimes.insert(name.clone(), toml::Value::Table(record.runtime.clone().into_iter().collect()));
        let mut proxy = toml::Table::new();
        proxy.insert("type".into(), toml::Value::from("snapshot"));
        proxy.insert("address".into(), toml::Value::from(record.snapshotter_socket.clone()));
        proxies.insert(name.clone(), toml::Value::Table(proxy));
    }
    if let Some(name) = handlers.iter().filter(|(_, r)| r.cri_snapshotter).map(|(name, _)| name).next_back() {
        containerd.insert("snapshotter".into(), toml::Value::from(name.clone()));
    }
    let mut plugins = toml::Table::new();
    plugins.insert(CRI_PLUGIN.into(), toml::Value::Table(cri));
    let mut drop_in = toml::Table::new();
    drop_in.insert("version".into(), toml::Value::Integer(2));
    drop_in.insert("proxy_plugins".into(), toml::Value::Table(proxies));
    drop_in.insert("plugins".into(), toml::Value::Table(plugins));
    let text = format!(
        "# Written by parma node install for {}; parma node uninstall removes it.\n# containerd 1.x replaces a plugin's whole section with an imported one:\n# this carries {}'s CRI section with the parma runtimes added.\n# Run parma node install again after editing that section.\n{}",
        handlers.keys().cloned().collect::<Vec<_>>().join(", "),
        options.containerd_config.display(),
        toml::to_string(&drop_in).context("cannot write the drop-in")?
    );

    Ok((text, plan))
}

/// A file's bytes and mode before install wrote it.
type Before = (Vec<u8>, u32);

/// What one install wrote, with what was there before, so that a failure
/// puts every file back.
#[derive(Default)]
struct Undo {
    /// Each file written, with its bytes and mode before (none: it was not there).
    files: Vec<(PathBuf, Option<Before>)>,
    /// Directories made, parents first.
    dirs: Vec<PathBuf>,
}

impl Undo {
    /// Write `path` (a file or nothing before), remembering what was there.
    fn write(&mut self, path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
        let before = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => {
                use std::os::unix::fs::PermissionsExt as _;
                let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                Some((bytes, meta.permissions().mode() & 0o7777))
            }
            Ok(_) => bail!("{} is in the way: not a file", path.display()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(err).with_context(|| format!("cannot look at {}", path.display())),
        };
        self.files.push((path.to_path_buf(), before));
        write_file(path, bytes, mode)
    }

    /// Put back what was there, last write first.
    fn undo(self) {
        for (path, before) in self.files.into_iter().rev() {
            let _ = match before {
                Some((bytes, mode)) => write_file(&path, &bytes, mode),
                None => std::fs::remove_file(&path).map_err(Into::into),
            };
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// containerd's config as install finds it, and the edit that makes it
/// import the drop-in (none when it does already).
struct Plan {
    config_path: PathBuf,
    config: toml::Table,
    edit: Option<Edit>,
}

/// Read and check containerd's config (version 2, an `imports` line install
/// can edit): every refusal of it comes before install writes anything.
fn plan_config(options: &Options) -> anyhow::Result<Plan> {
    let config_path = options.root.join(&options.containerd_config);
    let config_text = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", config_path.display())),
    };
    let config: toml::Table = match &config_text {
        Some(text) => text.parse().with_context(|| format!("{} is not TOML", config_path.display()))?,
        None => toml::Table::new(),
    };
    if config_text.is_some() {
        let version = config.get("version").and_then(toml::Value::as_integer);
        ensure!(
            version == Some(2),
            "{} is containerd config version {}: parma node install writes version 2 (containerd 1.5 to 1.7)",
            config_path.display(),
            version.map_or_else(|| "1 (no version key)".to_string(), |v| v.to_string())
        );
    }
    let import = options.host(DROP_IN).display().to_string();
    let imports: Vec<String> = config
        .get("imports")
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let glob = options.host("etc/containerd/conf.d/*.toml").display().to_string();
    let edit = if imports.iter().any(|i| *i == import || *i == glob) {
        None
    } else {
        Some(import_edit(&config_path, config_text.as_deref(), &imports, &import)?)
    };
    Ok(Plan { config_path, config, edit })
}

/// How config.toml comes to import the drop-in.
enum Edit {
    /// There is none: this text, whose `imports` line is `line`.
    Create { text: String, line: String },
    /// The whole new text, the `imports` line there was and the one written.
    Line { text: String, before: Option<String>, line: String },
}

/// The edit that makes config.toml (`text`, when there is one) import `import`.
fn import_edit(config_path: &Path, text: Option<&str>, imports: &[String], import: &str) -> anyhow::Result<Edit> {
    match text {
        None => {
            let line = format!("imports = [{import:?}]");
            Ok(Edit::Create { text: format!("version = 2\n{line}\n"), line })
        }
        Some(text) => {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            let top_level = lines.iter().position(|l| l.trim_start().starts_with('[')).unwrap_or(lines.len());
            let existing = lines.iter().take(top_level).position(|l| l.trim_start().starts_with("imports"));
            let (before, line) = match existing {
                Some(at) => {
                    let old = lines.get(at).cloned().unwrap_or_default();
                    let mut all = imports.to_vec();
                    ensure!(
                        old.trim_end().ends_with(']') && toml::from_str::<toml::Table>(&old).is_ok(),
                        "{}: its imports spans lines; add {import:?} to it yourself",
                        config_path.display()
                    );
                    all.push(import.to_string());
                    let new =
                        format!("imports = {}", toml::Value::Array(all.into_iter().map(toml::Value::from).collect()));
                    if let Some(slot) = lines.get_mut(at) {
                        *slot = new.clone();
                    }
                    (Some(old), new)
                }
                None => {
                    let at = lines
                        .iter()
                        .take(top_level)
                        .position(|l| l.trim_start().starts_with("version"))
                        .map_or(0, |v| v + 1);
                    let new = format!("imports = [{import:?}]");
                    lines.insert(at, new.clone());
                    (None, new)
                }
            };
            let mut out = lines.join("\n");
            if text.ends_with('\n') {
                out.push('\n');
            }
            Ok(Edit::Line { text: out, before, line })
        }
    }
}

fn parent_of(path: &Path) -> String {
    path.parent().map(|p| p.display().to_string()).unwrap_or_default()
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// Remove what installing `handler` added; with `purge`, its programs'
/// state as well. The last handler takes the drop-in and config.toml's
/// edit with it.
pub fn uninstall(options: &Options, handler: &str, purge: bool) -> anyhow::Result<()> {
    let root = &options.root;
    ensure!(valid_handler(handler), "{handler:?} is not a handler name (parma-XXXXXXXX)");
    let _lock =
        lock_root(root, None).with_context(|| format!("{handler} is not installed under {}", root.display()))?;
    let dir = root.join(format!("opt/parma/{handler}"));
    let record: Record = read_json(&dir.join(RECORD))?
        .with_context(|| format!("{handler} is not installed under {}", root.display()))?;
    // Only what install writes for this handler, whatever the record says.
    let unit = unit_of(handler);
    let state = state_of(handler);
    for file in &record.files {
        ensure!(*file == unit, "the record of {handler} names {file:?}, which install never writes");
    }
    if purge {
        for recorded in &record.state {
            ensure!(state.contains(recorded), "the record of {handler} names {recorded:?} as its state");
            // Never through a link (run/parma -> /, say) to remove what
            // is not the handler's; refused before anything is removed.
            ensure!(
                no_links(root, recorded)?,
                "{} is reached through a symbolic link: remove it yourself",
                root.join(recorded).display()
            );
        }
    }
    for file in &record.files {
        match std::fs::remove_file(root.join(file)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("cannot remove {file}"));
            }
            _ => {}
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    // What an interrupted install may have left beside it.
    for stale in [format!("opt/parma/.{handler}.new"), format!("opt/parma/.{handler}.old")] {
        remove_any(&root.join(stale))?;
    }
    if purge {
        for recorded in &record.state {
            let path = root.join(recorded);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
            // run/parma and var/lib/parma when nothing else is left there.
            if let Some(parent) = path.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }

    settle(options)
}

/// Whether no part of `relative` under the root (the last one included)
/// is a symbolic link; parts that do not exist are none.
fn no_links(root: &Path, relative: &str) -> anyhow::Result<bool> {
    let mut path = root.to_path_buf();
    for part in relative.split('/') {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => return Ok(false),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(err) => return Err(err).with_context(|| format!("cannot look at {}", path.display())),
        }
    }
    Ok(true)
}

/// The shared edits for the handlers installed now: the drop-in naming
/// them; with none left, the drop-in, config.toml's edit and the
/// directories install made removed.
fn settle(options: &Options) -> anyhow::Result<()> {
    let root = &options.root;
    let shared_path = root.join(SHARED_RECORD);
    let mut shared: Shared = read_json(&shared_path)?.unwrap_or_default();
    let handlers = installed(root)?;
    if !handlers.is_empty() {
        write_drop_in(options, render_drop_in(options, &handlers)?, &mut shared, &mut Undo::default())?;
        return write_file(&shared_path, &serde_json::to_vec_pretty(&shared)?, 0o644);
    }
    std::fs::remove_file(root.join(DROP_IN)).or_else(ignore_missing)?;
    let config_path = root.join(&options.containerd_config);
    let current = match std::fs::read(&config_path) {
        Ok(bytes) => Some(hex::encode(Sha256::digest(&bytes))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", config_path.display())),
    };
    // A config.toml install made goes while it is as install wrote it;
    // changed since, only its imports line goes. (A record without the
    // hash is older: what install wrote then is this text.)
    if shared.created_config
        && shared.config_sha256.is_none()
        && let Edit::Create { text, line } =
            import_edit(&config_path, None, &[], &options.host(DROP_IN).display().to_string())?
    {
        shared.config_sha256 = Some(hex::encode(Sha256::digest(text.as_bytes())));
        shared.imports.get_or_insert((None, line));
    }
    let unchanged = shared.config_sha256.is_some() && current == shared.config_sha256;
    if current.is_some() && shared.created_config && unchanged {
        std::fs::remove_file(&config_path)?;
    } else if current.is_some()
        && let Some((before, line)) = &shared.imports
    {
        let text =
            std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
        let mut lines: Vec<&str> = text.lines().collect();
        match lines.iter().position(|l| l == line) {
            Some(at) => match before {
                Some(before) => {
                    if let Some(slot) = lines.get_mut(at) {
                        *slot = before;
                    }
                }
                None => {
                    lines.remove(at);
                }
            },
            None => tracing::warn!("{} no longer has the line {line:?}: left as it is", config_path.display()),
        }
        let mut out = lines.join("\n");
        if text.ends_with('\n') {
            out.push('\n');
        }
        write_file(&config_path, out.as_bytes(), mode_of(&config_path))?;
    }
    std::fs::remove_file(&shared_path).or_else(ignore_missing)?;
    // The directories install made, deepest first, when empty.
    for dir in shared.dirs.iter().rev() {
        if super::plain_path(dir) {
            let _ = std::fs::remove_dir(root.join(dir));
        }
    }
    Ok(())
}

fn ignore_missing(err: std::io::Error) -> std::io::Result<()> {
    if err.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(err) }
}

/// Reload systemd, start the handler's snapshotter and restart containerd.
/// On the node itself (`--root /`) directly; from the DaemonSet's
/// container (host PID namespace) in the host's namespaces through PID 1.
pub fn restart_containerd(options: &Options, handler: &str) -> anyhow::Result<()> {
    let unit = format!("parma-snapshotter-{handler}.service");
    let steps: [&[&str]; 3] = [
        &["systemctl", "daemon-reload"],
        &["systemctl", "enable", "--now", &unit],
        &["systemctl", "restart", "containerd"],
    ];
    for step in steps {
        let mut command = if options.root == Path::new("/") {
            Command::new(step.first().copied().unwrap_or("systemctl"))
        } else {
            let mut nsenter = Command::new("nsenter");
            nsenter.args(["--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--"]);
            nsenter.arg(step.first().copied().unwrap_or("systemctl"));
            nsenter
        };
        command.args(step.get(1..).unwrap_or_default());
        let status = command.status().with_context(|| {
            format!("cannot run {step:?}: --restart-containerd needs systemd on the node (and the host's PID namespace from a container)")
        })?;
        ensure!(status.success(), "{step:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_on_one_root_take_turns() {
        let root = tempfile::tempdir().unwrap();
        let mut made = Vec::new();
        let first = lock_root(root.path(), Some(&mut made)).unwrap();
        assert_eq!(made, ["opt", "opt/parma"]);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = root.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let lock = lock_root(&path, Some(&mut Vec::new()));
            tx.send(()).unwrap();
            lock.map(drop)
        });
        // The second waits while the first holds the lock...
        assert!(rx.recv_timeout(std::time::Duration::from_millis(500)).is_err());
        // ...and takes a fresh directory when the first removed its own.
        std::fs::remove_dir(root.path().join("opt/parma")).unwrap();
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        waiter.join().unwrap().unwrap();
        assert!(root.path().join("opt/parma").is_dir());
        // Uninstall's lock makes nothing: a root without opt/parma has nothing installed.
        let empty = tempfile::tempdir().unwrap();
        assert!(lock_root(empty.path(), None).is_err());
        assert!(!empty.path().join("opt").exists());
    }

    #[test]
    fn qemu_versions_are_read() {
        assert_eq!(qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n"), Some((7, 2)));
        assert_eq!(qemu_version("QEMU emulator version 10.1.0\n"), Some((10, 1)));
        assert_eq!(qemu_version("nothing"), None);
    }
}
