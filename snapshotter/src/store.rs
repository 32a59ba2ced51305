//! The snapshots the snapshotter holds, kept in `ROOT/snapshots.json`
//! (written whole to a temporary file and renamed, so a crash leaves the
//! old state or the new one), and the layer images in `ROOT/layers`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A snapshot's kind, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A container's read-only view.
    View,
    /// A container's root (writable in the guest, on its overlay).
    Active,
    /// A layer.
    Committed,
}

/// A converted layer image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The file under `ROOT/layers`.
    pub file: String,
    /// The dm-verity root hash.
    pub root_hash: String,
    /// Where the verity superblock starts.
    pub hash_offset: u64,
    /// The uncompressed tar's digest.
    pub diff_id: String,
    /// The image's size.
    pub file_size: u64,
    /// What the layer does to `/etc/passwd` and `/etc/group` (containerd
    /// reads the image's users on the host before a container starts).
    #[serde(default)]
    pub files: parma_layer::LayerFiles,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its kind.
    pub kind: Kind,
    /// Its parent's key, or empty.
    pub parent: String,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch.
    pub created: u64,
    /// Seconds since the epoch.
    pub updated: u64,
    /// A committed snapshot's layer.
    pub layer: Option<Layer>,
}

/// Why the store refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such snapshot.
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    /// The key is taken.
    #[error("snapshot {0} already exists")]
    Exists(String),
    /// The request does not fit the snapshot's state.
    #[error("{0}")]
    Precondition(String),
    /// The metadata file.
    #[error("snapshot metadata {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// All snapshots.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    snapshots: BTreeMap<String, Snapshot>,
}

/// Seconds since the epoch now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// A time stored as seconds.
pub fn time(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

impl Store {
    /// Open (or start) the store in `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let io = |reason: String| StoreError::Io { path: root.display().to_string(), reason };
        std::fs::create_dir_all(root.join("layers")).map_err(|err| io(err.to_string()))?;
        let path = root.join("snapshots.json");
        let snapshots = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| io(err.to_string()))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(err) => return Err(io(err.to_string())),
        };
        Ok(Self { root: root.to_path_buf(), snapshots })
    }

    /// Where layer images go.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.root.join("snapshots.json");
        let io = |reason: String| StoreError::Io { path: path.display().to_string(), reason };
        let bytes = serde_json::to_vec(&self.snapshots).map_err(|err| io(err.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root).map_err(|err| io(err.to_string()))?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(|err| io(err.to_string()))?;
        tmp.as_file().sync_all().map_err(|err| io(err.to_string()))?;
        tmp.persist(&path).map_err(|err| io(err.error.to_string()))?;
        Ok(())
    }

    /// A snapshot by key.
    pub fn get(&self, key: &str) -> Result<&Snapshot, StoreError> {
        self.snapshots.get(key).ok_or_else(|| StoreError::NotFound(key.into()))
    }

    /// Every snapshot.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.snapshots.iter()
    }

    /// How many layers lie under `parent` (0 for none).
    pub fn depth(&self, parent: &str) -> Result<usize, StoreError> {
        Ok(self.chain(parent)?.len())
    }

    /// The layers from the base up to `parent` itself (none for no parent).
    pub fn chain(&self, parent: &str) -> Result<Vec<Layer>, StoreError> {
        let mut layers = Vec::new();
        let mut key = parent;
        while !key.is_empty() {
            let snapshot = self.get(key)?;
            let layer = snapshot
                .layer
                .clone()
                .ok_or_else(|| StoreError::Precondition(format!("{key} is not a layer this snapshotter made")))?;
            layers.push(layer);
            if layers.len() > 1024 {
                return Err(StoreError::Precondition("a chain of more than 1024 layers".into()));
            }
            key = &snapshot.parent;
        }
        layers.reverse();
        Ok(layers)
    }

    /// Record a converted layer as the committed snapshot `key`.
    pub fn commit_layer(
        &mut self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        layer: Layer,
    ) -> Result<(), StoreError> {
        if self.snapshots.contains_key(key) {
            return Err(StoreError::Exists(key.into()));
        }
        self.chain(parent)?;
        let now = now();
        let snapshot = Snapshot {
            kind: Kind::Committed,
            parent: parent.into(),
            labels,
            created: now,
            updated: now,
            layer: Some(layer),
        };
        self.snapshots.insert(key.into(), snapshot);
        self.save()
    }

    /// A container's snapshot on `parent`'s layers; the layers, base first.
    pub fn add(
        &mut self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Layer>, StoreError> {
        if self.snapshots.contains_key(key) {
            return Err(StoreError::Exists(key.into()));
        }
        let layers = self.chain(parent)?;
        if layers.is_empty() {
            return Err(StoreError::Precondition(
                "a container's snapshot needs a parent layer: a confidential container's root is its image".into(),
            ));
        }
        let now = now();
        self.snapshots.insert(
            key.into(),
            Snapshot { kind, parent: parent.into(), labels, created: now, updated: now, layer: None },
        );
        self.save()?;
        Ok(layers)
    }

    /// Replace a snapshot's labels.
    pub fn set_labels(&mut self, key: &str, labels: BTreeMap<String, String>) -> Result<Snapshot, StoreError> {
        let snapshot = self.snapshots.get_mut(key).ok_or_else(|| StoreError::NotFound(key.into()))?;
        snapshot.labels = labels;
        snapshot.updated = now();
        let updated = snapshot.clone();
        self.save()?;
        Ok(updated)
    }

    /// Remove a snapshot nothing stands on; the layer image goes with the
    /// last snapshot that names it. Returns the image file removed, if any.
    pub fn remove(&mut self, key: &str) -> Result<Option<PathBuf>, StoreError> {
        let snapshot = self.get(key)?.clone();
        if self.snapshots.values().any(|other| other.parent == key) {
            return Err(StoreError::Precondition(format!("snapshot {key} has children")));
        }
        self.snapshots.remove(key);
        self.save()?;
        let Some(layer) = snapshot.layer else { return Ok(None) };
        let still_used =
            self.snapshots.values().any(|other| other.layer.as_ref().is_some_and(|l| l.file == layer.file));
        Ok((!still_used).then(|| self.layers_dir().join(&layer.file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> Layer {
        Layer {
            file: format!("{n}.img"),
            root_hash: format!("{n:02x}"),
            hash_offset: 4096,
            diff_id: format!("sha256:{n}"),
            file_size: 8192,
            files: Default::default(),
        }
    }

    #[test]
    fn layers_chain_base_first_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.commit_layer("ns/1/sha256:a", "", BTreeMap::new(), layer(1)).unwrap();
        store.commit_layer("ns/2/sha256:b", "ns/1/sha256:a", BTreeMap::new(), layer(2)).unwrap();
        assert!(matches!(
            store.commit_layer("ns/2/sha256:b", "", BTreeMap::new(), layer(2)),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(store.commit_layer("x", "nope", BTreeMap::new(), layer(3)), Err(StoreError::NotFound(_))));
        let layers = store.add("ns/3/app", Kind::Active, "ns/2/sha256:b", BTreeMap::new()).unwrap();
        assert_eq!(layers, [layer(1), layer(2)]);
        assert!(matches!(store.add("ns/4/bare", Kind::Active, "", BTreeMap::new()), Err(StoreError::Precondition(_))));
        assert!(matches!(
            store.add("ns/5/on-active", Kind::View, "ns/3/app", BTreeMap::new()),
            Err(StoreError::Precondition(_))
        ));
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.chain("ns/2/sha256:b").unwrap(), [layer(1), layer(2)]);
        assert_eq!(reopened.depth("ns/2/sha256:b").unwrap(), 2);
        assert_eq!(reopened.get("ns/3/app").unwrap().kind, Kind::Active);
    }

    #[test]
    fn a_layer_goes_with_its_last_snapshot_and_not_under_a_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.commit_layer("a", "", BTreeMap::new(), layer(1)).unwrap();
        store.commit_layer("a-again", "", BTreeMap::new(), layer(1)).unwrap();
        store.add("c", Kind::Active, "a", BTreeMap::new()).unwrap();
        assert!(matches!(store.remove("a"), Err(StoreError::Precondition(_))));
        assert_eq!(store.remove("c").unwrap(), None);
        assert_eq!(store.remove("a").unwrap(), None, "another snapshot names the same image");
        assert_eq!(store.remove("a-again").unwrap(), Some(dir.path().join("layers/1.img")));
        assert!(matches!(store.remove("a"), Err(StoreError::NotFound(_))));
    }
}
