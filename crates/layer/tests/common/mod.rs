//! Test fixtures made in the test: tar streams written header by header,
//! OCI layouts and docker save archives with correct digests, and the
//! independent checkers (e2fsck, debugfs, veritysetup). A missing tool fails
//! the test: these checks are the point, never skipped.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    let package = if name == "veritysetup" { "cryptsetup-bin" } else { "e2fsprogs" };
    panic!("{name} not found: these tests need it (apt-get install {package})");
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256(data))
}

// ---------------------------------------------------------------- tar model

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// How names over 100 bytes are written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Long {
    Gnu,
    Pax,
}

#[derive(Debug, Clone, PartialEq)]
pub struct E {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// PAX `mtime` with a fraction, when set: (seconds, nanoseconds).
    pub pax_mtime: Option<(u64, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub long: Long,
}

impl E {
    pub fn new(path: impl AsRef<[u8]>, kind: Kind) -> Self {
        let mode = match kind {
            Kind::Dir => 0o755,
            Kind::Symlink(_) => 0o777,
            _ => 0o644,
        };
        E {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            pax_mtime: None,
            xattrs: Vec::new(),
            long: Long::Gnu,
        }
    }
    pub fn dir(path: &str) -> Self {
        E::new(path, Kind::Dir)
    }
    pub fn file(path: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Self {
        E::new(path, Kind::File(data.as_ref().to_vec()))
    }
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        E::new(path, Kind::Symlink(target.as_ref().to_vec()))
    }
    pub fn link(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        E::new(path, Kind::HardLink(target.as_ref().to_vec()))
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.xattrs.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }
    pub fn pax(mut self) -> Self {
        self.long = Long::Pax;
        self
    }
}

fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        // "LEN key=value\n", LEN counting itself.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// Writes tar streams header by header, so tests can write anything
/// (absolute names, `..`, duplicates) the `tar` crate's builder refuses.
#[derive(Default)]
pub struct Tar {
    out: Vec<u8>,
}

impl Tar {
    pub fn new() -> Self {
        Tar::default()
    }

    /// One header (names truncated to 100 bytes) and its data.
    #[allow(clippy::too_many_arguments)]
    pub fn raw(&mut self, kind: u8, name: &[u8], link: &[u8], size: u64, e: Option<&E>, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link[..l]);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        let (mode, uid, gid, mtime) = e.map_or((0o644, 0, 0, 0), |e| (e.mode, e.uid, e.gid, e.mtime));
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        if let Some(E { kind: Kind::Char(major, minor) | Kind::Block(major, minor), .. }) = e {
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
        }
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.data(data);
    }

    /// Data padded to 512 bytes.
    pub fn data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn pax(&mut self, records: &[(String, Vec<u8>)]) {
        let body = pax_records(records);
        self.raw(b'x', b"PaxHeaders/x", b"", body.len() as u64, None, &body);
    }

    pub fn entry(&mut self, e: &E) -> &mut Self {
        let (kind, link, data): (u8, &[u8], &[u8]) = match &e.kind {
            Kind::Dir => (b'5', b"", b""),
            Kind::File(data) => (b'0', b"", data),
            Kind::Symlink(t) => (b'2', t, b""),
            Kind::HardLink(t) => (b'1', t, b""),
            Kind::Char(..) => (b'3', b"", b""),
            Kind::Block(..) => (b'4', b"", b""),
            Kind::Fifo => (b'6', b"", b""),
        };
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, value) in &e.xattrs {
            records.push((format!("SCHILY.xattr.{name}"), value.clone()));
        }
        if let Some((s, ns)) = e.pax_mtime {
            records.push(("mtime".into(), format!("{s}.{ns:09}").into_bytes()));
        }
        match e.long {
            Long::Pax => {
                if e.path.len() > 100 {
                    records.push(("path".into(), e.path.clone()));
                }
                if link.len() > 100 {
                    records.push(("linkpath".into(), link.to_vec()));
                }
            }
            Long::Gnu => {
                if e.path.len() > 100 {
                    let mut name = e.path.clone();
                    name.push(0);
                    self.raw(b'L', b"././@LongLink", b"", name.len() as u64, None, &name);
                }
                if link.len() > 100 {
                    let mut name = link.to_vec();
                    name.push(0);
                    self.raw(b'K', b"././@LongLink", b"", name.len() as u64, None, &name);
                }
            }
        }
        if !records.is_empty() {
            self.pax(&records);
        }
        self.raw(kind, &e.path, link, data.len() as u64, Some(e), data);
        self
    }

    pub fn entries(&mut self, es: &[E]) -> &mut Self {
        for e in es {
            self.entry(e);
        }
        self
    }

    /// The end-of-archive blocks, padded to a 10 KiB record as tar does.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend_from_slice(&[0u8; 1024]);
        while !out.len().is_multiple_of(10240) {
            out.push(0);
        }
        out
    }
}

pub fn tar_of(es: &[E]) -> Vec<u8> {
    Tar::new().entries(es).finish()
}

// ---------------------------------------------------------------- images

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => tar.to_vec(),
        Comp::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            gz.finish().unwrap()
        }
        Comp::Zstd => zstd::stream::encode_all(tar, 3).unwrap(),
    }
}

/// A layer as the manifest will describe it (each field can be spoiled).
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
    /// The descriptor's size (default: the blob's).
    pub size: Option<u64>,
}

impl Layer {
    pub fn new(tar: &[u8], comp: Comp) -> Self {
        let media_type = match comp {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        Layer { blob: compress(tar, comp), media_type: media_type.into(), diff_id: digest(tar), size: None }
    }
}

pub fn test_config(diff_ids: &[String]) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve", "8080"],
            "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "Labels": {"org.example.b": "2", "org.example.a": "1"},
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
            "StopSignal": "SIGTERM"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": []
    })
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&d), bytes).unwrap();
    format!("sha256:{d}")
}

/// An OCI layout with one image; returns the manifest digest.
pub fn oci_layout(dir: &Path, layers: &[Layer], ref_name: Option<&str>) -> String {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    oci_layout_with(dir, layers, &test_config(&diff_ids), ref_name)
}

pub fn oci_layout_with(dir: &Path, layers: &[Layer], config: &serde_json::Value, ref_name: Option<&str>) -> String {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifest = manifest_blob(dir, layers, config);
    let manifest_digest = put_blob(dir, &manifest);
    let mut desc = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest.len(),
    });
    if let Some(name) = ref_name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    }
    add_to_index(dir, desc);
    manifest_digest
}

/// Write the layers and config, return the manifest's bytes.
pub fn manifest_blob(dir: &Path, layers: &[Layer], config: &serde_json::Value) -> Vec<u8> {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let config = serde_json::to_vec(config).unwrap();
    let config_digest = put_blob(dir, &config);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let d = put_blob(dir, &l.blob);
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.size.unwrap_or(l.blob.len() as u64)})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap()
}

pub fn add_to_index(dir: &Path, desc: serde_json::Value) {
    let path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => serde_json::json!({"schemaVersion": 2, "manifests": []}),
    };
    index["manifests"].as_array_mut().unwrap().push(desc);
    std::fs::write(path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Put a blob in the layout, return its descriptor.
pub fn blob_desc(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let d = put_blob(dir, bytes);
    serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
}

/// A legacy `docker save` archive: manifest.json, `<hex>.json`, `<id>/layer.tar`.
pub fn docker_save(path: &Path, tars: &[Vec<u8>], tag: &str) {
    let diff_ids: Vec<String> = tars.iter().map(|t| digest(t)).collect();
    let config = serde_json::to_vec(&test_config(&diff_ids)).unwrap();
    let config_name = format!("{}.json", sha256(&config));
    let layer_names: Vec<String> = (0..tars.len()).map(|i| format!("{:064x}/layer.tar", i + 1)).collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [tag], "Layers": layer_names,
    }]))
    .unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    for (name, tar) in layer_names.iter().zip(tars) {
        add(name, tar);
    }
    add(&config_name, &config);
    add("manifest.json", &manifest);
    b.finish().unwrap();
}

// ---------------------------------------------------------------- checkers

/// `e2fsck -fn` on the ext4 part of a layer image: exit 0, nothing to fix.
pub fn fsck(image: &Path) {
    let out = Command::new(tool("e2fsck")).arg("-fn").arg(image).output().expect("run e2fsck");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "e2fsck -fn {}: {:?}\n{stdout}\n{stderr}", image.display(), out.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "e2fsck -fn:\n{stdout}\n{stderr}");
}

/// `veritysetup verify --hash-offset N IMG IMG ROOT`.
pub fn verity_verify(image: &Path, hash_offset: u64, root: &str) {
    let out = Command::new(tool("veritysetup"))
        .args(["verify", "--hash-offset", &hash_offset.to_string()])
        .arg(image)
        .arg(image)
        .arg(root)
        .output()
        .expect("run veritysetup");
    assert!(
        out.status.success(),
        "veritysetup verify {}: {:?}\n{}{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `debugfs -R REQUEST IMAGE`, stdout; fails on a debugfs error message.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new(tool("debugfs")).arg("-R").arg(request).arg(image).output().expect("run debugfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    assert!(out.status.success() && errors.is_empty(), "debugfs -R {request:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn dump(image: &Path, path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dumped");
    debugfs(image, &format!("dump {path} {}", out.display()));
    std::fs::read(&out).unwrap()
}

pub fn xattr_value(image: &Path, path: &str, name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("value");
    debugfs(image, &format!("ea_get -f {} {path} {name}", out.display()));
    std::fs::read(out).unwrap()
}

/// The number after `label` in debugfs output.
pub fn number_after(text: &str, label: &str) -> u64 {
    let rest = &text[text.find(label).unwrap_or_else(|| panic!("{label} not in {text}")) + label.len()..];
    rest.split_whitespace().next().unwrap().trim_end_matches(',').parse().unwrap()
}

/// `(inode, stat text)` of a path in the image.
pub fn stat(image: &Path, path: &str) -> (u64, String) {
    let s = debugfs(image, &format!("stat \"{path}\""));
    assert!(!s.is_empty(), "{path} not in the image");
    (number_after(&s, "Inode:"), s)
}

/// Check one tar entry against the image: kind, mode, owner, size, time,
/// contents by hash, link targets, device numbers, xattrs.
pub fn check_entry(image: &Path, e: &E, path: &str) {
    let (ino, s) = stat(image, path);
    let kind = match &e.kind {
        Kind::Dir => "directory",
        Kind::File(_) => "regular",
        Kind::Symlink(_) => "symlink",
        Kind::Char(..) => "character special",
        Kind::Block(..) => "block special",
        Kind::Fifo => "FIFO",
        Kind::HardLink(target) => {
            let target = String::from_utf8_lossy(target).trim_start_matches("./").to_string();
            let (target_ino, _) = stat(image, &format!("/{target}"));
            assert_eq!(ino, target_ino, "{path}: hard link to {target}");
            return;
        }
    };
    assert!(s.contains(&format!("Type: {kind} ")), "{path}: {s}");
    assert!(s.contains(&format!("Mode:  0{:03o}", e.mode)), "{path}: mode {:o}: {s}", e.mode);
    assert_eq!(number_after(&s, "User:"), e.uid, "{path}: {s}");
    assert_eq!(number_after(&s, "Group:"), e.gid, "{path}: {s}");
    let (secs, ns) = e.pax_mtime.unwrap_or((e.mtime, 0));
    assert!(s.contains(&format!("mtime: 0x{:08x}:{:08x}", secs as u32, ns << 2)), "{path}: {s}");
    match &e.kind {
        Kind::File(data) => {
            assert_eq!(number_after(&s, "Size:"), data.len() as u64, "{path}");
            assert_eq!(sha256(&dump(image, path)), sha256(data), "{path}: contents");
        }
        Kind::Symlink(target) if target.len() < 60 => {
            let want = format!("Fast link dest: \"{}\"", String::from_utf8_lossy(target));
            assert!(s.contains(&want), "{path}: {s}");
        }
        Kind::Symlink(target) => assert_eq!(dump(image, path), *target, "{path}: link target"),
        Kind::Char(major, minor) | Kind::Block(major, minor) => {
            assert!(s.contains(&format!("Device major/minor number: {major:02}:{minor:02} ")), "{path}: {s}");
        }
        _ => {}
    }
    for (name, value) in &e.xattrs {
        assert_eq!(xattr_value(image, path, name), *value, "{path}: xattr {name}");
    }
    if e.xattrs.is_empty() && !matches!(e.kind, Kind::Dir) {
        let ea = debugfs(image, &format!("ea_list \"{path}\""));
        assert!(!ea.contains(" = "), "{path}: unexpected xattrs {ea}");
    }
}

/// The names `ls` lists in a directory of the image, without `.` and `..`.
pub fn names(image: &Path, dir: &str) -> Vec<String> {
    let ls = debugfs(image, &format!("ls -p \"{dir}\""));
    let mut names: Vec<String> = ls
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_owned))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// Read layers.json and check every image with e2fsck and veritysetup.
pub fn check_output(out: &Path) -> serde_json::Value {
    let layers: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("layers.json")).unwrap()).unwrap();
    // The typed reader every consumer uses reads back exactly what was written.
    let typed = parma_layer::LayersFile::read(out).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), layers);
    for l in layers["layers"].as_array().unwrap() {
        let image = out.join(l["file"].as_str().unwrap());
        let hash_offset = l["hash_offset"].as_u64().unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), l["file_size"].as_u64().unwrap());
        assert_eq!(hash_offset, l["data_blocks"].as_u64().unwrap() * 4096);
        assert_eq!(l["file"].as_str().unwrap(), format!("{}.img", &l["diff_id"].as_str().unwrap()[7..]));
        fsck(&image);
        verity_verify(&image, hash_offset, l["root_hash"].as_str().unwrap());
    }
    layers
}

/// Nothing but final files in the output directory (no temporaries).
pub fn no_temporaries(out: &Path) {
    if let Ok(dir) = std::fs::read_dir(out) {
        for entry in dir {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.starts_with('.'), "temporary file left: {name}");
        }
    }
}

pub fn image_files(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.ends_with(".img")).collect())
        .unwrap_or_default();
    v.sort();
    v
}
