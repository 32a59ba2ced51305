//! containerd's snapshot API over the [`Store`]: layers come in through
//! CRI's unpack (converted from the content store), containers get
//! `parma-layer` mounts.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use containerd_snapshots::{Info, Kind as ApiKind, Snapshotter, Usage, api};
use tokio::sync::Mutex;
use tonic::Status;

use crate::content::{Content, chain_of_key};
use crate::store::{Kind, Layer, Snapshot, Store, StoreError, time};
use crate::{LAYER_DIGEST_LABEL, MOUNT_TYPE, TARGET_LABEL};

fn status(err: StoreError) -> Status {
    match err {
        StoreError::NotFound(_) => Status::not_found(err.to_string()),
        StoreError::Exists(_) => Status::already_exists(err.to_string()),
        StoreError::Precondition(_) => Status::failed_precondition(err.to_string()),
        StoreError::Io { .. } => Status::internal(err.to_string()),
    }
}

/// A layer containerd unpacks the slow way: its blob was not in the
/// content store yet when it asked (containerd fetches only once a layer's
/// `Prepare` did not find it), so containerd extracts it into a scratch
/// directory and commits; the commit converts the blob, then there.
#[derive(Debug)]
struct Extraction {
    parent: String,
    digest: String,
    scratch: tempfile::TempDir,
}

/// The snapshotter.
#[derive(Debug, Clone)]
pub struct Service {
    store: Arc<Mutex<Store>>,
    content: Content,
    extracting: Arc<Mutex<HashMap<String, Extraction>>>,
    root: PathBuf,
    /// One conversion at a time per layer: a second unpack of the same
    /// layer waits for the first and finds it.
    converting: Arc<Mutex<()>>,
}

/// The paths of an image's users a container runtime looks up.
pub const USER_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// A container snapshot's one mount: a read-only bind of a directory with
/// the image's `/etc/passwd` and `/etc/group` (what containerd reads on the
/// host to resolve the user; nothing else of the image is on the host's
/// side), whose options name the layers, base first, as
/// `parma-layer=ROOT_HASH:HASH_OFFSET:IMAGE` (a bind mount ignores options
/// the kernel does not know; the shim reads them).
pub fn mounts(users: &std::path::Path, layers_dir: &std::path::Path, layers: &[Layer]) -> Vec<api::types::Mount> {
    let mut options = vec!["ro".to_string(), "rbind".to_string()];
    options.extend(layers.iter().map(|layer| {
        format!("{MOUNT_TYPE}={}:{}:{}", layer.root_hash, layer.hash_offset, layers_dir.join(&layer.file).display())
    }));
    vec![api::types::Mount {
        r#type: "bind".into(),
        source: users.display().to_string(),
        target: String::new(),
        options,
    }]
}

/// Write the users directory of a container snapshot: the files `layers`
/// stack up to.
fn write_users(dir: &std::path::Path, layers: &[Layer]) -> std::io::Result<()> {
    let files: Vec<parma_layer::LayerFiles> = layers.iter().map(|layer| layer.files.clone()).collect();
    std::fs::create_dir_all(dir.join("etc"))?;
    for (path, data) in parma_layer::stack(&files) {
        if USER_FILES.contains(&path.as_str()) {
            std::fs::write(dir.join(path.trim_start_matches('/')), data)?;
        }
    }
    Ok(())
}

fn info(key: &str, snapshot: &Snapshot) -> Info {
    Info {
        kind: match snapshot.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        },
        name: key.into(),
        parent: snapshot.parent.clone(),
        labels: snapshot.labels.clone().into_iter().collect(),
        created_at: time(snapshot.created),
        updated_at: time(snapshot.updated),
    }
}

impl Service {
    /// A snapshotter keeping its state in `store`, reading blobs from `content`.
    pub fn new(root: &std::path::Path, store: Store, content: Content) -> Self {
        // Scratch directories of unpacks a previous run did not finish.
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if entry.file_name().to_str().is_some_and(|name| name.starts_with("extract-")) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Self {
            store: Arc::new(Mutex::new(store)),
            content,
            extracting: Arc::new(Mutex::new(HashMap::new())),
            root: root.to_path_buf(),
            converting: Arc::new(Mutex::new(())),
        }
    }

    /// Convert the layer CRI is unpacking (making chain `target` on
    /// `parent`) into the committed snapshot `key`.
    async fn unpack(
        &self,
        key: &str,
        target: &str,
        parent: &str,
        digest: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let _one = self.converting.lock().await;
        let (index, layers_dir) = {
            let store = self.store.lock().await;
            if store.get(key).is_ok() {
                return Ok(());
            }
            (store.depth(parent).map_err(status)?, store.layers_dir())
        };
        let parent_chain = (!parent.is_empty()).then(|| chain_of_key(parent));
        let diff_id = self
            .content
            .diff_id(digest, index, parent_chain, target)
            .await
            .map_err(|err| Status::failed_precondition(err.to_string()))?;
        let size = self.content.size(digest).await.map_err(|err| Status::failed_precondition(err.to_string()))?;
        let blob = parma_layer::Blob {
            name: digest.into(),
            digest: parma_layer::Digest::parse(digest)
                .ok_or_else(|| Status::invalid_argument(format!("{digest} is not a sha256 digest")))?,
            size,
            diff_id: parma_layer::Digest::parse(&diff_id)
                .ok_or_else(|| Status::invalid_argument(format!("{diff_id} is not a sha256 diff-id")))?,
        };
        // The image, and the layer's users files (containerd resolves a
        // container's user from the image on the host), in one pass.
        let started = std::time::Instant::now();
        let reader = self.content.reader(digest);
        let converting = tokio::task::spawn_blocking(move || {
            let mut watch = parma_layer::Watch::new(&USER_FILES);
            parma_layer::convert_blob(reader, &blob, &layers_dir, Some(&mut watch)).map(|record| (record, watch))
        });
        let (record, watch) = converting
            .await
            .map_err(|err| Status::internal(err.to_string()))?
            .map_err(|err| Status::failed_precondition(format!("cannot convert layer {digest}: {}", chain(&err))))?;
        let files = watch.into_files();
        tracing::debug!(layer = digest, files = ?files.entries.keys().collect::<Vec<_>>(), removed = ?files.removed, "user files");
        tracing::info!(
            layer = digest,
            %diff_id,
            root_hash = %record.root_hash,
            "converted {size} bytes in {:.3} s",
            started.elapsed().as_secs_f64()
        );
        let layer = Layer {
            files,
            file: record.file,
            root_hash: record.root_hash,
            hash_offset: record.hash_offset,
            diff_id,
            file_size: record.file_size,
        };
        self.store.lock().await.commit_layer(key, parent, labels, layer).map_err(status)
    }

    async fn add(
        &self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::types::Mount>, Status> {
        let mut store = self.store.lock().await;
        let layers = store.add(key, kind, parent, labels.into_iter().collect()).map_err(status)?;
        let users = self.users_dir(key);
        if let Err(err) = write_users(&users, &layers) {
            let _ = store.remove(key);
            return Err(Status::internal(format!("cannot write {}: {err}", users.display())));
        }
        Ok(mounts(&users, &store.layers_dir(), &layers))
    }

    /// A scratch directory for containerd to extract the layer with blob
    /// `digest` into, as the unpack `key` on `parent`; its commit converts
    /// the blob, and what was extracted is thrown away.
    async fn scratch(&self, key: String, parent: String, digest: String) -> Result<Vec<api::types::Mount>, Status> {
        let scratch = tempfile::Builder::new()
            .prefix("extract-")
            .tempdir_in(&self.root)
            .map_err(|err| Status::internal(err.to_string()))?;
        let mount = api::types::Mount {
            r#type: "bind".into(),
            source: scratch.path().display().to_string(),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        };
        self.extracting.lock().await.insert(key, Extraction { parent, digest, scratch });
        Ok(vec![mount])
    }

    /// The users directory of a container snapshot.
    fn users_dir(&self, key: &str) -> PathBuf {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(key.as_bytes());
        self.root.join("users").join(hex::encode(digest.get(..16).unwrap_or_default()))
    }
}

/// An error with its causes, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The labels a layer's snapshot keeps: all of them. containerd finds a
/// layer a `Prepare` answered "exists" for by walking the snapshots for
/// a committed one whose `containerd.io/snapshot.ref` is the target and
/// whose parent is the one it asked on.
fn inherited(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The chain id an unpack's key names: containerd's unpackers prepare
/// `extract-UNIQUE CHAIN_ID` (`snapshots.UnpackKeyFormat`), under the
/// metadata store's `NAMESPACE/ID/` prefix.
fn unpack_target(key: &str) -> Option<&str> {
    let name = key.splitn(3, '/').nth(2).unwrap_or(key);
    let (unique, chain) = name.strip_prefix("extract-")?.split_once(' ')?;
    (!unique.is_empty() && chain.starts_with("sha256:") && !chain.contains([' ', '/'])).then_some(chain)
}

/// The key of the layer that makes chain `target` on `parent` (a chain id
/// alone is not unique: containerd namespaces parents).
fn layer_key(target: &str, parent: &str) -> String {
    if parent.is_empty() { target.to_string() } else { format!("{target}@{parent}") }
}

#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;
    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        tracing::debug!(key, "stat");
        let store = self.store.lock().await;
        Ok(info(&key, store.get(&key).map_err(status)?))
    }

    async fn update(&self, info_in: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let mut store = self.store.lock().await;
        let mut labels = store.get(&info_in.name).map_err(status)?.labels.clone();
        match fieldpaths {
            Some(paths) if !paths.is_empty() => {
                for path in paths {
                    if path == "labels" {
                        labels = info_in.labels.clone().into_iter().collect();
                    } else if let Some(key) = path.strip_prefix("labels.") {
                        match info_in.labels.get(key) {
                            Some(value) => labels.insert(key.into(), value.clone()),
                            None => labels.remove(key),
                        };
                    } else {
                        return Err(Status::invalid_argument(format!("cannot update {path}")));
                    }
                }
            }
            _ => labels = info_in.labels.clone().into_iter().collect(),
        }
        let updated = store.set_labels(&info_in.name, labels).map_err(status)?;
        Ok(info(&info_in.name, &updated))
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let store = self.store.lock().await;
        let snapshot = store.get(&key).map_err(status)?;
        let size = snapshot.layer.as_ref().map_or(0, |layer| i64::try_from(layer.file_size).unwrap_or(i64::MAX));
        Ok(Usage { size, inodes: 0 })
    }

    async fn mounts(&self, key: String) -> Result<Vec<api::types::Mount>, Status> {
        let store = self.store.lock().await;
        let snapshot = store.get(&key).map_err(status)?;
        if snapshot.kind == Kind::Committed {
            return Err(Status::failed_precondition(format!("{key} is a layer, not a container's snapshot")));
        }
        let layers = store.chain(&snapshot.parent).map_err(status)?;
        Ok(mounts(&self.users_dir(&key), &store.layers_dir(), &layers))
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::types::Mount>, Status> {
        tracing::debug!(key, parent, ?labels, "prepare");
        if let Some(target) = labels.get(TARGET_LABEL).cloned() {
            let digest = match labels.get(LAYER_DIGEST_LABEL) {
                Some(digest) => digest.clone(),
                // A pull that labels the target but not the blob (CRI with
                // snapshot annotations off): the manifests name the blob.
                None => {
                    let index = self.store.lock().await.depth(&parent).map_err(status)?;
                    let parent_chain = (!parent.is_empty()).then(|| chain_of_key(&parent));
                    let (digest, _) = self
                        .content
                        .layer_of_chain(index, parent_chain, &target)
                        .await
                        .map_err(|err| Status::failed_precondition(err.to_string()))?;
                    digest
                }
            };
            if self.store.lock().await.get(&layer_key(&target, &parent)).is_err() {
                if self.content.size(&digest).await.is_err() {
                    // Not fetched yet: containerd fetches it once this
                    // Prepare answers, extracts it here, and commits.
                    return self.scratch(key, parent, digest).await;
                }
                self.unpack(&layer_key(&target, &parent), &target, &parent, &digest, inherited(&labels)).await?;
            }
            // containerd's remote-snapshot protocol: the layer is there.
            return Err(Status::already_exists(format!("target snapshot {target:?} exists")));
        }
        if let Some(target) = unpack_target(&key) {
            // An unpack without labels (`ctr images pull`): containerd
            // extracts the layer into a scratch directory and commits, and
            // the commit converts the blob the image's manifest names. (An
            // "exists" answer would not do: containerd records the layer
            // only on a label's say-so.)
            let index = self.store.lock().await.depth(&parent).map_err(status)?;
            let parent_chain = (!parent.is_empty()).then(|| chain_of_key(&parent));
            let (digest, _) = self
                .content
                .layer_of_chain(index, parent_chain, target)
                .await
                .map_err(|err| Status::failed_precondition(err.to_string()))?;
            return self.scratch(key, parent, digest).await;
        }
        self.add(&key, Kind::Active, &parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::types::Mount>, Status> {
        self.add(&key, Kind::View, &parent, labels).await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Status> {
        tracing::debug!(name, key, "commit");
        let extraction = self.extracting.lock().await.remove(&key);
        if let Some(extraction) = extraction {
            // The blob is in the content store now; what containerd
            // extracted is not used.
            let target = labels.get(TARGET_LABEL).cloned().unwrap_or_else(|| chain_of_key(&name).to_string());
            let converted =
                self.unpack(&name, &target, &extraction.parent, &extraction.digest, inherited(&labels)).await;
            drop(extraction.scratch);
            return converted;
        }
        Err(Status::failed_precondition(format!(
            "cannot commit {name}: the parma snapshotter's layers are images converted from pulled blobs, never a container's changes"
        )))
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        if self.extracting.lock().await.remove(&key).is_some() {
            return Ok(());
        }
        let file: Option<PathBuf> = self.store.lock().await.remove(&key).map_err(status)?;
        let _ = std::fs::remove_dir_all(self.users_dir(&key));
        if let Some(file) = file
            && let Err(err) = std::fs::remove_file(&file)
        {
            tracing::warn!("cannot remove {}: {err}", file.display());
        }
        Ok(())
    }

    async fn list(&self, _snapshotter: String, _filters: Vec<String>) -> Result<Self::InfoStream, Status> {
        let store = self.store.lock().await;
        let infos: Vec<Result<Info, Status>> = store.all().map(|(key, snapshot)| Ok(info(key, snapshot))).collect();
        Ok(tokio_stream::iter(infos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_keys_name_their_chain() {
        let chain = "sha256:7d3f77d8865f1783040856758d87be770c9c71ea3277eb4a5fad6ed0011dce12";
        assert_eq!(unpack_target(&format!("k8s.io/1/extract-442653350-UDrm {chain}")), Some(chain));
        assert_eq!(unpack_target(&format!("extract-1 {chain}")), Some(chain));
        // A container's snapshot, or anything else, is not an unpack.
        assert_eq!(unpack_target("k8s.io/7/hello-1"), None);
        assert_eq!(unpack_target(&format!("k8s.io/7/{chain}")), None);
        assert_eq!(unpack_target(&format!("k8s.io/1/extract- {chain}")), None);
        assert_eq!(unpack_target("k8s.io/1/extract-1 md5:abc"), None);
        assert_eq!(unpack_target(&format!("k8s.io/1/extract-1 {chain} x")), None);
    }
}
