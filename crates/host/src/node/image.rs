//! Building the node image as an OCI image layout, and reading one back.
//!
//! The same inputs give the same bytes: one layer, a tar whose entries are
//! sorted, owned by root, dated 0, with fixed modes, gzip'd by miniz_oxide
//! (whose output does not depend on the CPU); a config without dates; JSON
//! with sorted keys; the reference values signed deterministically
//! (RFC 6979). So the image's digest is a function of the UVM, the three
//! binaries and the release key.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use parma_image::files;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{BINARIES, FileEntry, HANDLER_ANNOTATION, MAX_FILE, PAYLOAD_DIR, PAYLOAD_FILE, Payload, PayloadList};
use super::{REFERENCE_VALUES, handler_of, plain_path};

/// OCI media types written and read.
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The deflate level of the layer (miniz_oxide's default).
const LEVEL: u8 = 6;
/// The largest manifest, config or index read.
const MAX_JSON: u64 = 1 << 20;
/// The largest layer read (compressed and not).
const MAX_LAYER: u64 = 1 << 30;

/// What a node image is built from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The UVM directory `make image` writes.
    pub uvm: PathBuf,
    /// The directory with [`BINARIES`] (static builds).
    pub binaries: PathBuf,
    /// The release key that signs the reference values.
    pub key: p384::ecdsa::SigningKey,
    /// The OVMF (or its tail, with the digest of the rest) whose direct
    /// boot the reference values list besides the IGVM file's.
    pub ovmf: Option<(PathBuf, Option<String>)>,
    /// The vCPU types listed.
    pub vcpu_types: Vec<String>,
    /// The least TCB accepted.
    pub min_tcb: parma_snp::TcbVersion,
}

/// A built (or opened) node image.
#[derive(Debug, Clone)]
pub struct Built {
    /// The runtime handler.
    pub handler: String,
    /// `sha256:` digest of the image manifest.
    pub digest: String,
}

/// The reference values of the UVM in `uvm` (its files as read here).
pub fn reference_values(inputs: &Inputs, manifest: &[u8]) -> anyhow::Result<parma_snp::reference::ReferenceValues> {
    #[derive(Deserialize)]
    struct Partial {
        kernel: Kernel,
        cmdline: String,
        files: BTreeMap<String, parma_image::manifest::FileDigest>,
    }
    #[derive(Deserialize)]
    struct Kernel {
        config_sha256: String,
    }
    let parsed: Partial = serde_json::from_slice(manifest).context("the UVM's manifest.json is not a UVM manifest")?;
    let initrd = parsed.files.get(files::INITRD).context("the UVM's manifest lists no initrd")?;
    let igvm = std::fs::read(inputs.uvm.join(files::IGVM))
        .with_context(|| format!("cannot read {}", inputs.uvm.join(files::IGVM).display()))?;
    let mut launches = Vec::new();
    for vcpu_type in &inputs.vcpu_types {
        let measured = parma_igvm::measure(&igvm, 1, Some(vcpu_type)).context("cannot measure the IGVM file")?;
        launches.push(parma_snp::reference::Launch {
            boot: "igvm".into(),
            vcpus: measured.vcpus,
            vcpu_type: vcpu_type.clone(),
            memory_mib: u32::try_from(measured.memory_mib).ok(),
            firmware: None,
            measurement: measured.digest,
        });
        if let Some((ovmf, ovmf_hash)) = &inputs.ovmf {
            // acpi=off: OVMF hands the kernel no MP table, so one vCPU.
            let launch = parma_measure::Launch {
                ovmf: ovmf.clone(),
                ovmf_hash: ovmf_hash.clone(),
                vcpus: 1,
                vcpu_type: vcpu_type.clone(),
                direct_boot: Some(parma_measure::DirectBoot {
                    kernel: inputs.uvm.join(files::KERNEL),
                    initrd: inputs.uvm.join(files::INITRD),
                    cmdline: parsed.cmdline.clone(),
                }),
                guest_features: 1,
            };
            let digest = parma_measure::launch_digest(&launch).context("cannot measure the OVMF launch")?;
            let name = ovmf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            launches.push(parma_snp::reference::Launch {
                boot: "ovmf-kernel-hashes".into(),
                vcpus: 1,
                vcpu_type: vcpu_type.clone(),
                memory_mib: None,
                firmware: Some(match ovmf_hash {
                    Some(hash) => format!("{name} (pages before it: {hash})"),
                    None => name,
                }),
                measurement: hex::encode(digest),
            });
        }
    }
    Ok(parma_snp::reference::ReferenceValues {
        schema: parma_snp::reference::SCHEMA,
        handler: handler_of(manifest),
        uvm_manifest_sha256: hex::encode(Sha256::digest(manifest)),
        kernel_config_sha256: parsed.kernel.config_sha256,
        initrd_sha256: initrd.sha256.clone(),
        cmdline: parsed.cmdline,
        guest_policy: format!("{:#x}", parma_igvm::DEFAULT_POLICY),
        min_tcb: inputs.min_tcb.to_string(),
        host_data: "sha256 of the pod's execution policy, the io.parma.policy annotation decoded (parma policy hash)"
            .into(),
        launches,
    })
}

/// Payload files: path under [`PAYLOAD_DIR`] → bytes and mode.
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Read a file of at most [`MAX_FILE`] bytes, not through a link.
fn read_plain(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata()?;
    ensure!(meta.is_file(), "{} is not a regular file", path.display());
    ensure!(meta.len() <= MAX_FILE, "{} is larger than {MAX_FILE} bytes", path.display());
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The payload's files (path under [`PAYLOAD_DIR`] → bytes and mode) from
/// the inputs; the UVM's files checked against its manifest.
fn gather(inputs: &Inputs) -> anyhow::Result<(String, Files)> {
    let manifest_path = inputs.uvm.join(files::MANIFEST);
    let manifest = read_plain(&manifest_path)?;
    #[derive(Deserialize)]
    struct Listing {
        files: BTreeMap<String, parma_image::manifest::FileDigest>,
    }
    let listing: Listing = serde_json::from_slice(&manifest)
        .with_context(|| format!("{} is not a UVM manifest", manifest_path.display()))?;
    let mut out = BTreeMap::new();
    for (name, digest) in &listing.files {
        ensure!(plain_path(name) && !name.contains('/'), "the UVM manifest lists {name:?}");
        let bytes = read_plain(&inputs.uvm.join(name))?;
        ensure!(
            parma_image::manifest::FileDigest::of(&bytes) == *digest,
            "{} differs from the UVM's manifest: rebuild with make image",
            inputs.uvm.join(name).display()
        );
        out.insert(format!("uvm/{name}"), (bytes, 0o644));
    }
    ensure!(out.contains_key(&format!("uvm/{}", files::IGVM)), "the UVM has no {}", files::IGVM);
    for binary in BINARIES {
        let bytes = read_plain(&inputs.binaries.join(binary))?;
        out.insert(format!("bin/{binary}"), (bytes, 0o755));
    }
    let values = reference_values(inputs, &manifest)?;
    let signed = parma_snp::reference::Signed::sign(&values, &inputs.key)?;
    let mut document = serde_json::to_vec_pretty(&signed)?;
    document.push(b'\n');
    out.insert(REFERENCE_VALUES.to_string(), (document, 0o644));
    out.insert(format!("uvm/{}", files::MANIFEST), (manifest.clone(), 0o644));
    Ok((handler_of(&manifest), out))
}

/// The layer: a tar of the payload under [`PAYLOAD_DIR`], deterministic.
fn layer_tar(handler: &str, files: &Files) -> anyhow::Result<Vec<u8>> {
    let list = PayloadList {
        handler: handler.to_string(),
        files: files.iter().map(|(path, (bytes, mode))| (path.clone(), FileEntry::of(bytes, *mode))).collect(),
    };
    let mut list_bytes = serde_json::to_vec_pretty(&list)?;
    list_bytes.push(b'\n');
    let mut entries: BTreeMap<String, Option<(&[u8], u32)>> = BTreeMap::new();
    for (path, (bytes, mode)) in files {
        entries.insert(format!("{PAYLOAD_DIR}/{path}"), Some((bytes, *mode)));
    }
    entries.insert(format!("{PAYLOAD_DIR}/{PAYLOAD_FILE}"), Some((&list_bytes, 0o644)));
    // Every parent directory, once.
    let dirs: Vec<String> = entries
        .keys()
        .flat_map(|path| {
            let parts: Vec<&str> = path.split('/').collect();
            (1..parts.len()).map(move |n| parts.get(..n).map(|p| p.join("/")).unwrap_or_default()).collect::<Vec<_>>()
        })
        .collect();
    for dir in dirs {
        entries.insert(dir, None);
    }
    let mut tar = tar::Builder::new(Vec::new());
    for (path, entry) in &entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                header.set_path(format!("{path}/"))?;
                header.set_cksum();
                tar.append(&header, std::io::empty())?;
            }
            Some((bytes, mode)) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(bytes.len() as u64);
                header.set_path(path)?;
                header.set_cksum();
                tar.append(&header, *bytes)?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Build the node image into `out` (an OCI image layout, with the signed
/// reference values beside it). `out` must be absent, empty or an earlier
/// layout: it is replaced whole.
pub fn build(inputs: &Inputs, out: &Path) -> anyhow::Result<Built> {
    let (handler, files) = gather(inputs)?;
    let tar = layer_tar(&handler, &files)?;
    let diff_id = sha256_digest(&tar);
    let layer = parma_image::initrd::gzip_level(&tar, LEVEL);
    let layer_digest = sha256_digest(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            // The DaemonSet's container: install from the image's own files
            // into the host's root (mounted at /host), then wait.
            "Entrypoint": [format!("/{PAYLOAD_DIR}/bin/parma"), "node", "install", "--from", format!("/{PAYLOAD_DIR}"),
                "--root", "/host", "--host-path", "/", "--wait"],
            "Labels": {HANDLER_ANNOTATION: handler},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer.len()}],
        "annotations": {
            HANDLER_ANNOTATION: handler,
            "org.opencontainers.image.title": "Parma-rs node image",
            "org.opencontainers.image.description": "The Parma UVM, containerd shim and snapshotter, and their installer",
        },
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let digest = sha256_digest(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": handler, HANDLER_ANNOTATION: handler},
        }],
    });

    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        ensure!(
            empty || out.join("oci-layout").is_file(),
            "{} exists and is not an OCI layout: refusing to replace it",
            out.display()
        );
        std::fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("cannot make {}", blobs.display()))?;
    for blob in [&config, &layer, &manifest] {
        let name = hex::encode(Sha256::digest(blob));
        std::fs::write(blobs.join(name), blob)?;
    }
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index)?)?;
    let (values, _) = files.get(REFERENCE_VALUES).context("no reference values")?;
    std::fs::write(out.join(REFERENCE_VALUES), values)?;
    Ok(Built { handler, digest })
}

/// An OCI image layout of a node image, read with every digest checked.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
    /// The image manifest, exactly.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub digest: String,
    /// The config, exactly.
    pub config: Vec<u8>,
    /// The config's descriptor digest.
    pub config_digest: String,
    /// The layer's media type, digest and bytes.
    pub layers: Vec<(String, String, Vec<u8>)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// A blob of the layout, checked against its descriptor.
fn blob(dir: &Path, descriptor: &Descriptor, limit: u64) -> anyhow::Result<Vec<u8>> {
    let hex = crate::registry::digest_hex(&descriptor.digest)?;
    ensure!(descriptor.size <= limit, "blob {} of {} bytes is over the limit", descriptor.digest, descriptor.size);
    let path = dir.join("blobs/sha256").join(hex);
    let bytes = read_plain(&path)?;
    ensure!(bytes.len() as u64 == descriptor.size, "blob {}: {} bytes, expected {}", hex, bytes.len(), descriptor.size);
    ensure!(sha256_digest(&bytes) == descriptor.digest, "blob {} does not hash to its digest", descriptor.digest);
    Ok(bytes)
}

impl Layout {
    /// Open the layout at `dir`: its one image, every blob checked.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let index = read_plain(&dir.join("index.json"))?;
        ensure!(index.len() as u64 <= MAX_JSON, "index.json is too large");
        let index: Index = serde_json::from_slice(&index).context("index.json is not an OCI index")?;
        let [entry] = index.manifests.as_slice() else {
            bail!("{} holds {} images; a node image layout holds one", dir.display(), index.manifests.len());
        };
        ensure!(entry.media_type == MANIFEST_TYPE, "the image is a {}, not an OCI image manifest", entry.media_type);
        let manifest_bytes = blob(dir, entry, MAX_JSON)?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).context("not an OCI image manifest")?;
        let config = blob(dir, &manifest.config, MAX_JSON)?;
        let parsed: Config = serde_json::from_slice(&config).context("not an OCI image config")?;
        ensure!(parsed.rootfs.diff_ids.len() == manifest.layers.len(), "the config's diff_ids do not match the layers");
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            layers.push((layer.media_type.clone(), layer.digest.clone(), blob(dir, layer, MAX_LAYER)?));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            digest: entry.digest.clone(),
            manifest: manifest_bytes,
            config_digest: manifest.config.digest.clone(),
            config,
            layers,
        })
    }

    /// The payload of the image's one layer: decompressed, its diff id
    /// checked, every file under [`PAYLOAD_DIR`] read (links, devices and
    /// odd paths refused) and checked against the payload list.
    pub fn payload(&self) -> anyhow::Result<Payload> {
        let [(media_type, _, bytes)] = self.layers.as_slice() else {
            bail!("a node image has one layer, this one {}", self.layers.len());
        };
        ensure!(media_type == LAYER_TYPE, "the layer is a {media_type}, not {LAYER_TYPE}");
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .take(MAX_LAYER + 1)
            .read_to_end(&mut tar)
            .context("the layer is not gzip")?;
        ensure!(tar.len() as u64 <= MAX_LAYER, "the layer is over {MAX_LAYER} bytes unpacked");
        let parsed: Config = serde_json::from_slice(&self.config)?;
        ensure!(
            parsed.rootfs.diff_ids.first() == Some(&sha256_digest(&tar)),
            "the layer does not unpack to the config's diff_id"
        );
        let mut files = BTreeMap::new();
        let mut list = None;
        let prefix = format!("{PAYLOAD_DIR}/");
        let mut archive = tar::Archive::new(tar.as_slice());
        for entry in archive.entries().context("the layer is not a tar")? {
            let mut entry = entry.context("the layer is not a tar")?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let path = path.trim_end_matches('/');
            match entry.header().entry_type() {
                tar::EntryType::Directory => continue,
                tar::EntryType::Regular => {}
                other => bail!("the layer holds {path} of type {other:?}: a node image holds files and directories"),
            }
            let relative = path
                .strip_prefix(&prefix)
                .filter(|p| plain_path(p))
                .with_context(|| format!("the layer holds {path:?}, outside {PAYLOAD_DIR} or not a plain path"))?;
            let mut bytes = Vec::new();
            entry.by_ref().take(MAX_FILE + 1).read_to_end(&mut bytes)?;
            ensure!(bytes.len() as u64 <= MAX_FILE, "{path} is larger than {MAX_FILE} bytes");
            if relative == PAYLOAD_FILE {
                list = Some(bytes);
            } else {
                ensure!(files.insert(relative.to_string(), bytes).is_none(), "{path} is in the layer twice");
            }
        }
        let list = list.with_context(|| format!("the layer has no {PAYLOAD_DIR}/{PAYLOAD_FILE}"))?;
        Payload::checked(&list, files)
    }
}

/// The payload of an unpacked node image (`DIR` is the image's
/// `/opt/parma`, as the DaemonSet's container sees it): the files its list
/// names, each checked.
pub fn payload_from_dir(dir: &Path) -> anyhow::Result<Payload> {
    let list = read_plain(&dir.join(PAYLOAD_FILE))?;
    let parsed: PayloadList =
        serde_json::from_slice(&list).with_context(|| format!("{} is not a payload list", PAYLOAD_FILE))?;
    let total = parsed.files.values().try_fold(0u64, |sum, entry| sum.checked_add(entry.size));
    ensure!(
        total.is_some_and(|t| t <= super::MAX_PAYLOAD),
        "{PAYLOAD_FILE} lists more than {} bytes",
        super::MAX_PAYLOAD
    );
    let mut files = BTreeMap::new();
    for path in parsed.files.keys() {
        ensure!(super::payload_path(path), "{PAYLOAD_FILE} lists {path:?}, which is not a payload path");
        files.insert(path.clone(), read_plain(&dir.join(path))?);
    }
    Payload::checked(&list, files)
}

/// `parma measure`'s view is the reference values' view: used by tests and
/// by `parma node show`.
pub fn handler_of_layout(dir: &Path) -> anyhow::Result<Built> {
    let layout = Layout::open(dir)?;
    let payload = layout.payload()?;
    Ok(Built { handler: payload.handler().to_string(), digest: layout.digest })
}
