//! A small, real OCI image for the end-to-end container tests, written as an
//! OCI image layout directory with correct digests and sizes.
//!
//! Two gzip-compressed layers: "base" (a static busybox from the host and
//! its shell tools, `/etc/passwd` and `/etc/group` with `app` 1000:1000, a
//! file and a directory for the next layer to hide, and device nodes a
//! hostile image could bring: the guest's disks and `/dev/mem` by number, in
//! `/layer-dev`) and "app" (the `oci-hello` test program as the entrypoint,
//! the in-container attack probe `parma-probe`, an OCI whiteout of
//! `/etc/remove-me` and an opaque `/opt/old`). Every header is fixed (mtime
//! 0, owner 0:0 except `/srv`) and gzip carries mtime 0, so the same inputs
//! give the same bytes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flate2::{Compression, GzBuilder};
use parma_layer::Digest;
use serde_json::json;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout};

/// The image's `org.opencontainers.image.ref.name`.
pub const REF_NAME: &str = "parma-test:1";
/// Where the `oci-hello` program is in the image: `config.Entrypoint`.
pub const ENTRYPOINT: &str = "/usr/bin/oci-hello";
/// Where the in-container attack probe is in the image.
pub const PROBE: &str = "/usr/bin/parma-probe";
/// Device nodes the base layer brings, by name in `/layer-dev`: (block?,
/// major, minor). A layer's nodes must open nothing in the guest.
pub const LAYER_DEVICES: [(&str, bool, u32, u32); 5] = [
    ("blk-254-0", true, 254, 0),
    ("blk-253-0", true, 253, 0),
    ("blk-252-0", true, 252, 0),
    ("chr-1-1", false, 1, 1),
    ("chr-10-0", false, 10, 0),
];
/// `config.Env`.
pub const ENV: [&str; 2] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"];
/// `config.WorkingDir`, owned by [`USER`].
pub const WORKING_DIR: &str = "/srv";
/// `config.User`: `app` in the image's `/etc/passwd`.
pub const USER: &str = "1000:1000";
/// The host's static busybox, copied into the image.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The links to busybox in the image's `/bin`.
pub const BUSYBOX_TOOLS: [&str; 11] = ["sh", "echo", "cat", "env", "id", "pwd", "sleep", "ls", "true", "false", "head"];
/// What `/etc/remove-me` holds in the base layer (the app layer whites it out).
pub const REMOVED_TEXT: &str = "secret of the base layer\n";

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Every tar header's mtime.
const MTIME: u64 = 0;

/// An image [`build_test_image`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImage {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// Its one manifest's `org.opencontainers.image.ref.name` ([`REF_NAME`]).
    pub reference: String,
    /// The manifest's digest, as `index.json` gives it.
    pub manifest_digest: Digest,
    /// sha256 of each uncompressed layer tar, base layer first.
    pub diff_ids: Vec<Digest>,
}

/// Write the test image as an OCI layout in `out` (created if missing),
/// with `hello` (the static `oci-hello` built by `scripts/build-guest.sh`)
/// as its entrypoint, `parma-probe` from the same directory, and the host's
/// static `/bin/busybox` as its shell.
pub fn build_test_image(out: &Path, hello: &Path) -> anyhow::Result<TestImage> {
    let busybox = read_static(Path::new(HOST_BUSYBOX), "install busybox-static (scripts/deps.sh)")?;
    let probe_path = hello.with_file_name("parma-probe");
    let hello = read_static(hello, "build it with scripts/build-guest.sh")?;
    let probe = read_static(&probe_path, "build it with scripts/build-guest.sh")?;
    let tars = [base_layer(&busybox)?, app_layer(&hello, &probe)?];

    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    let mut diff_ids = Vec::with_capacity(tars.len());
    let mut layers = Vec::with_capacity(tars.len());
    for tar in &tars {
        diff_ids.push(Digest::of(tar));
        layers.push(put_blob(&blobs, LAYER_TYPE, &gzip(tar)?)?.1);
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": [],
            "Env": ENV,
            "WorkingDir": WORKING_DIR,
            "User": USER,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (_, config) = put_blob(&blobs, CONFIG_TYPE, &serde_json::to_vec(&config)?)?;
    let manifest = json!({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config, "layers": layers});
    let (manifest_digest, mut descriptor) = put_blob(&blobs, MANIFEST_TYPE, &serde_json::to_vec(&manifest)?)?;
    descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": REF_NAME});
    let index =
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [descriptor]});
    write(&out.join("index.json"), &serde_json::to_vec(&index)?)?;
    write(&out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(TestImage { layout: out.to_owned(), reference: REF_NAME.to_owned(), manifest_digest, diff_ids })
}

/// Layer 0: the filesystem's skeleton, busybox, users, and what layer 1 hides.
fn base_layer(busybox: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tar = Tar::default();
    for dir in ["bin", "etc", "proc", "sys", "dev", "opt", "opt/old", "usr", "usr/bin"] {
        tar.dir(dir, 0o755, 0)?;
    }
    tar.dir("srv", 0o755, 1000)?;
    tar.dir("tmp", 0o1777, 0)?;
    tar.file("bin/busybox", 0o755, busybox)?;
    for tool in BUSYBOX_TOOLS {
        tar.symlink(&format!("bin/{tool}"), "busybox")?;
    }
    tar.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n")?;
    tar.file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")?;
    tar.file("etc/remove-me", 0o644, REMOVED_TEXT.as_bytes())?;
    tar.file("opt/old/old.txt", 0o644, b"hidden by the app layer's opaque /opt/old\n")?;
    tar.dir("layer-dev", 0o755, 0)?;
    for (name, block, major, minor) in LAYER_DEVICES {
        tar.device(&format!("layer-dev/{name}"), block, major, minor)?;
    }
    tar.finish()
}

/// Layer 1: the programs, a whiteout and an opaque directory.
fn app_layer(hello: &[u8], probe: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tar = Tar::default();
    for dir in ["etc", "opt", "opt/old", "usr", "usr/bin"] {
        tar.dir(dir, 0o755, 0)?;
    }
    tar.file("etc/.wh.remove-me", 0o644, b"")?;
    tar.file("opt/old/.wh..wh..opq", 0o644, b"")?;
    tar.file("opt/old/new.txt", 0o644, b"from the app layer\n")?;
    tar.file(ENTRYPOINT.trim_start_matches('/'), 0o755, hello)?;
    tar.file(PROBE.trim_start_matches('/'), 0o755, probe)?;
    tar.finish()
}

/// A tar stream with fixed headers.
struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
}

impl Tar {
    fn header(kind: tar::EntryType, mode: u32, owner: u64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(owner);
        header.set_gid(owner);
        header.set_mtime(MTIME);
        header.set_size(size);
        header
    }

    /// A directory owned by `owner:owner`.
    fn dir(&mut self, path: &str, mode: u32, owner: u64) -> anyhow::Result<()> {
        let mut header = Self::header(tar::EntryType::Directory, mode, owner, 0);
        self.0.append_data(&mut header, path, &[][..]).with_context(|| format!("tar: {path}"))
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let mut header = Self::header(tar::EntryType::Regular, mode, 0, data.len() as u64);
        self.0.append_data(&mut header, path, data).with_context(|| format!("tar: {path}"))
    }

    /// A block or character device node, mode 0666, owned by root.
    fn device(&mut self, path: &str, block: bool, major: u32, minor: u32) -> anyhow::Result<()> {
        let kind = if block { tar::EntryType::Block } else { tar::EntryType::Char };
        let mut header = Self::header(kind, 0o666, 0, 0);
        header.set_device_major(major).with_context(|| format!("tar: {path}"))?;
        header.set_device_minor(minor).with_context(|| format!("tar: {path}"))?;
        self.0.append_data(&mut header, path, &[][..]).with_context(|| format!("tar: {path}"))
    }

    fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut header, path, target).with_context(|| format!("tar: {path}"))
    }

    fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.0.into_inner()?)
    }
}

/// gzip with mtime 0 and no file name.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), Compression::default());
    std::io::Write::write_all(&mut gz, data)?;
    Ok(gz.finish()?)
}

/// Store a blob under its digest; its digest and OCI descriptor.
fn put_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> anyhow::Result<(Digest, serde_json::Value)> {
    let digest = Digest::of(bytes);
    write(&blobs.join(digest.hex()), bytes)?;
    Ok((digest, json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})))
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Read a program for the image, which has no libc: it must be a static
/// x86-64 ELF (no program interpreter). `fix` says how to get one.
fn read_static(path: &Path, fix: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!("{} is missing: {fix}", path.display()),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    if !is_static_x86_64(&bytes) {
        bail!("{} is not a static x86-64 ELF program: {fix}", path.display());
    }
    Ok(bytes)
}

/// The ELF64 file header.
#[derive(FromBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ElfHeader {
    ident: [u8; 16],
    kind: U16,
    machine: U16,
    version: U32,
    entry: U64,
    phoff: U64,
    shoff: U64,
    flags: U32,
    ehsize: U16,
    phentsize: U16,
    phnum: U16,
    shentsize: U16,
    shnum: U16,
    shstrndx: U16,
}

/// An ELF64 program header.
#[derive(FromBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ProgramHeader {
    kind: U32,
    flags: U32,
    offset: U64,
    vaddr: U64,
    paddr: U64,
    filesz: U64,
    memsz: U64,
    align: U64,
}

const _: () = assert!(size_of::<ElfHeader>() == 64 && size_of::<ProgramHeader>() == 56);

/// ELFCLASS64, ELFDATA2LSB.
const ELF64_LE: [u8; 6] = *b"\x7fELF\x02\x01";
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;

/// A little-endian x86-64 ELF64 with no `PT_INTERP` (static or static-pie).
fn is_static_x86_64(elf: &[u8]) -> bool {
    let Ok((header, _)) = ElfHeader::read_from_prefix(elf) else { return false };
    if !header.ident.starts_with(&ELF64_LE) || header.machine.get() != EM_X86_64 {
        return false;
    }
    let Ok(phoff) = usize::try_from(header.phoff.get()) else { return false };
    let entsize = usize::from(header.phentsize.get());
    if entsize < size_of::<ProgramHeader>() {
        return false;
    }
    (0..usize::from(header.phnum.get())).all(|i| {
        let entry = i.checked_mul(entsize).and_then(|o| o.checked_add(phoff)).and_then(|o| elf.get(o..));
        entry
            .and_then(|bytes| ProgramHeader::read_from_prefix(bytes).ok())
            .is_some_and(|(ph, _)| ph.kind.get() != PT_INTERP)
    })
}

/// The feed the fixture's policy takes fragments from.
pub const FRAGMENT_FEED: &str = "parma-tests/sidecar";

/// The signing key of the one issuer the fixture's policy lists.
fn fragment_signing_key(seed: u8) -> anyhow::Result<p384::ecdsa::SigningKey> {
    Ok(p384::ecdsa::SigningKey::from_slice(&[seed; 48])?)
}

/// The listed issuer's public key, SPKI DER.
pub fn fragment_issuer_key() -> Vec<u8> {
    use p384::pkcs8::EncodePublicKey as _;
    fragment_signing_key(7)
        .ok()
        .and_then(|key| key.verifying_key().to_public_key_der().ok())
        .map(|der| der.as_bytes().to_vec())
        .unwrap_or_default()
}

/// A fragment `{feed, svn, containers}` signed by the key made from `seed`
/// (7: the issuer the fixture's policy lists): (bytes, DER signature, SPKI key).
pub fn signed_fragment(
    seed: u8,
    feed: &str,
    svn: u64,
    containers: &[serde_json::Value],
) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    use p384::ecdsa::signature::Signer as _;
    use p384::pkcs8::EncodePublicKey as _;
    let key = fragment_signing_key(seed)?;
    let fragment = serde_json::to_vec(&serde_json::json!({"feed": feed, "svn": svn, "containers": containers}))?;
    let signature: p384::ecdsa::Signature = key.sign(&fragment);
    let public_key = key.verifying_key().to_public_key_der()?.as_bytes().to_vec();
    Ok((fragment, signature.to_der().as_bytes().to_vec(), public_key))
}

/// The test image built into a temporary directory, with its verity layers
/// and a policy from `parma policy gen` (the end-to-end tests' and
/// `bench-e2e`'s starting point).
#[derive(Debug)]
pub struct PolicyFixture {
    dir: tempfile::TempDir,
    /// The OCI layout.
    pub layout: PathBuf,
    /// What `parma layer build` made of it.
    pub built: parma_layer::Built,
    /// Where the layer images are.
    pub layers_dir: PathBuf,
    /// The generated policy.
    pub policy: PathBuf,
}

impl PolicyFixture {
    /// `parma run` (the binary `cli`) of this image under its policy, from the UVM in `uvm`, its
    /// layers reused from the fixture's layer directory; callers add flags
    /// and stdio.
    pub fn parma_run(&self, cli: &Path, uvm: &Path) -> std::process::Command {
        let mut command = std::process::Command::new(cli);
        command
            .arg("run")
            .arg("--uvm")
            .arg(uvm)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--oci")
            .arg(&self.layout)
            .args(["--ref", REF_NAME, "--layers-dir"])
            .arg(&self.layers_dir);
        command
    }

    /// Build the image with `hello` as its probe and generate a policy for
    /// container `name`: its command is `command` (default: the image's),
    /// `/bin/cat /etc/passwd` and two cgroup and status readers are its exec
    /// processes, signal 9 is allowed, `no_new_privileges` is required, and
    /// the seccomp profile with `seccomp_sha256` when given.
    pub fn new(
        hello: &Path,
        name: &str,
        command: Option<&[&str]>,
        seccomp_sha256: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::with_mounts(hello, name, command, seccomp_sha256, &[])
    }

    /// [`PolicyFixture::new`], with `mounts` as the container's mount rules.
    pub fn with_mounts(
        hello: &Path,
        name: &str,
        command: Option<&[&str]>,
        seccomp_sha256: Option<&str>,
        mounts: &[serde_json::Value],
    ) -> anyhow::Result<Self> {
        Self::with_spec(
            hello,
            serde_json::json!({
                "name": name,
                "command": command,
                "seccomp_profile_sha256": seccomp_sha256,
                "mounts": mounts,
            }),
        )
    }

    /// The fixture's policy from its default spec (see [`PolicyFixture::new`];
    /// also resource updates and scratch swap allowed), with the fields of
    /// `extra` (a `parma policy gen` spec object) replacing the defaults.
    pub fn with_spec(hello: &Path, extra: serde_json::Value) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let image = build_test_image(&dir.path().join("oci"), hello)?;
        let layers_dir = dir.path().join("layers");
        let mut spec = serde_json::json!({
            "name": "hello",
            "exec_processes": [
                {"command": ["/bin/cat", "/etc/passwd"], "signals": []},
                {"command": ["/bin/cat", "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max"], "signals": []},
                {"command": ["/bin/cat", "/proc/self/status"], "signals": []},
            ],
            "signals": [9],
            "no_new_privileges": true,
            "allow_resource_updates": true,
            "allow_scratch_swap": true,
            "fragments": [{"issuer": parma_policy::fragment::issuer_id(&fragment_issuer_key()), "feed": FRAGMENT_FEED, "minimum_svn": 1}],
        });
        if let (serde_json::Value::Object(spec), serde_json::Value::Object(extra)) = (&mut spec, extra) {
            spec.extend(extra);
        }
        let spec_path = dir.path().join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let text = parma_host::policy_gen::generate(&image.layout, Some(REF_NAME), Some(&spec_path), &layers_dir)?;
        let policy = dir.path().join("policy.rego");
        std::fs::write(&policy, &text)?;
        let built = parma_layer::build(&image.layout, Some(REF_NAME), &layers_dir, &|_| {})?;
        Ok(Self { layout: image.layout, dir, built, layers_dir, policy })
    }

    /// A scratch directory that lives as long as the fixture.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
