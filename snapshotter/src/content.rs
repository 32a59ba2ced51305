//! containerd's content store, as a client: a layer blob's size, its
//! diff-id (from the image config of a manifest that names it), and its
//! bytes as a blocking reader for the converter.

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{InfoRequest, ListContentRequest, ReadContentRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::with_namespace;
use sha2::{Digest as _, Sha256};
use tonic::Request;

/// Why a blob could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// containerd answered with an error.
    #[error("containerd's content store: {0}")]
    Rpc(#[from] tonic::Status),
    /// Something it holds is not what it should be.
    #[error("{0}")]
    Invalid(String),
}

/// The image config's `rootfs.diff_ids`.
#[derive(Debug, serde::Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Debug, serde::Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// containerd's chain id of a layer on `parent` (a chain id, or none).
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(parent) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{parent} {diff_id}").as_bytes()))),
    }
}

/// The chain id inside a backend key (containerd's metadata store names a
/// proxy snapshotter's snapshots `NAMESPACE/ID/NAME`).
pub fn chain_of_key(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// A content store of one containerd namespace.
#[derive(Debug, Clone)]
pub struct Content {
    client: ContentClient<Channel>,
    namespace: String,
    /// containerd's content directory on this host, if told: a blob found
    /// there is read from its file (no gRPC stream to decode). Content is
    /// addressed by digest and the converter checks the digest, so the
    /// file can only be the bytes asked for.
    local: Option<std::path::PathBuf>,
}

impl Content {
    /// Content of `namespace` over `channel`.
    pub fn new(channel: Channel, namespace: &str) -> Self {
        Self { client: ContentClient::new(channel), namespace: namespace.into(), local: None }
    }

    /// Read blobs from containerd's content directory `dir` (its
    /// `blobs/sha256/HEX` files) where they are, through the API otherwise.
    pub fn with_local(mut self, dir: &std::path::Path) -> Self {
        self.local = Some(dir.to_path_buf());
        self
    }

    /// A blob's size.
    pub async fn size(&self, digest: &str) -> Result<u64, ContentError> {
        let namespace = self.namespace.as_str();
        let request = InfoRequest { digest: digest.into() };
        let info = self.client.clone().info(with_namespace!(request, namespace)).await?.into_inner();
        let info = info.info.ok_or_else(|| ContentError::Invalid(format!("no info for {digest}")))?;
        u64::try_from(info.size).map_err(|_| ContentError::Invalid(format!("{digest}: a negative size")))
    }

    /// A small blob (a manifest, a config), whole.
    async fn read_small(&self, digest: &str) -> Result<Vec<u8>, ContentError> {
        if self.size(digest).await? > 4 << 20 {
            return Err(ContentError::Invalid(format!("{digest} is larger than 4 MiB")));
        }
        let namespace = self.namespace.as_str();
        let request = ReadContentRequest { digest: digest.into(), offset: 0, size: 0 };
        let mut stream = self.client.clone().read(with_namespace!(request, namespace)).await?.into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
            if data.len() > 4 << 20 {
                return Err(ContentError::Invalid(format!("{digest} is larger than 4 MiB")));
            }
        }
        Ok(data)
    }

    /// An image config, or `None` (logged) when it cannot be read: another
    /// manifest (an artifact, a collected config) must not stop the search.
    async fn config(&self, digest: &str) -> Option<Config> {
        let read = self.read_small(digest).await.and_then(|bytes| {
            serde_json::from_slice::<Config>(&bytes)
                .map_err(|err| ContentError::Invalid(format!("the image config {digest}: {err}")))
        });
        read.map_err(|err| tracing::debug!("skipped: {err}")).ok()
    }

    /// The diff-id of the layer blob `digest` at position `index` of its
    /// image, from the config of a manifest whose garbage-collection labels
    /// name it there (containerd sets them as it fetches). `target` is the
    /// chain id the layer must make on `parent`: a diff-id that does not
    /// make it is refused.
    pub async fn diff_id(
        &self,
        digest: &str,
        index: usize,
        parent: Option<&str>,
        target: &str,
    ) -> Result<String, ContentError> {
        let namespace = self.namespace.as_str();
        let filter = format!("labels.\"containerd.io/gc.ref.content.l.{index}\"=={digest}");
        let request = ListContentRequest { filters: vec![filter] };
        let mut stream = self.client.clone().list(with_namespace!(request, namespace)).await?.into_inner();
        let mut manifests = Vec::new();
        while let Some(listed) = stream.message().await? {
            manifests.extend(listed.info);
        }
        for manifest in manifests {
            let Some(config) = manifest.labels.get("containerd.io/gc.ref.content.config") else { continue };
            let Some(config) = self.config(config).await else { continue };
            if let Some(diff_id) = config.rootfs.diff_ids.get(index)
                && chain_id(parent, diff_id) == target
            {
                return Ok(diff_id.clone());
            }
        }
        Err(ContentError::Invalid(format!(
            "no image config in containerd's content store gives layer {index} ({digest}) a diff-id that makes chain {target}"
        )))
    }

    /// The blob and diff-id of the layer at position `index` of an image
    /// that makes chain `target` on `parent`, for an unpack that does not
    /// name its blob (`ctr images pull`; CRI's labels name it): from the
    /// config of any manifest whose garbage-collection labels name a layer
    /// there (containerd sets them when it writes the manifest, before the
    /// layers are fetched).
    pub async fn layer_of_chain(
        &self,
        index: usize,
        parent: Option<&str>,
        target: &str,
    ) -> Result<(String, String), ContentError> {
        let namespace = self.namespace.as_str();
        let layer_label = format!("containerd.io/gc.ref.content.l.{index}");
        let request = ListContentRequest { filters: vec![format!("labels.\"{layer_label}\"")] };
        let mut stream = self.client.clone().list(with_namespace!(request, namespace)).await?.into_inner();
        let mut manifests = Vec::new();
        while let Some(listed) = stream.message().await? {
            manifests.extend(listed.info);
        }
        for manifest in manifests {
            let (Some(config), Some(blob)) =
                (manifest.labels.get("containerd.io/gc.ref.content.config"), manifest.labels.get(&layer_label))
            else {
                continue;
            };
            let Some(config) = self.config(config).await else { continue };
            if let Some(diff_id) = config.rootfs.diff_ids.get(index)
                && chain_id(parent, diff_id) == target
            {
                return Ok((blob.clone(), diff_id.clone()));
            }
        }
        Err(ContentError::Invalid(format!(
            "no image in containerd's content store has a layer {index} that makes chain {target}"
        )))
    }

    /// A blob's bytes as a blocking reader: its file in containerd's
    /// content directory where that is known and holds it, else the
    /// content API's stream (call from a blocking thread).
    pub fn reader(&self, digest: &str) -> Box<dyn std::io::Read + Send> {
        let file = self.local.as_ref().zip(digest.strip_prefix("sha256:")).and_then(|(dir, hex)| {
            // A digest names a file only as 64 hex digits (no path tricks).
            let hex = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            hex.then(|| dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:")))
        });
        // Not through a link, not blocking on a FIFO, and only a regular file.
        let open = |path: std::path::PathBuf| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
                .ok()
                .filter(|file| file.metadata().is_ok_and(|meta| meta.is_file()))
        };
        match file.and_then(open) {
            Some(file) => Box::new(file),
            None => Box::new(self.stream(digest)),
        }
    }

    /// A blob's bytes streamed through the content API, as a blocking
    /// reader fed by a task (call from a blocking thread).
    pub fn stream(&self, digest: &str) -> BlobReader {
        let (chunks, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(8);
        let mut client = self.client.clone();
        let namespace = self.namespace.clone();
        let digest = digest.to_string();
        tokio::spawn(async move {
            let namespace = namespace.as_str();
            let request = ReadContentRequest { digest, offset: 0, size: 0 };
            let mut stream = match client.read(with_namespace!(request, namespace)).await {
                Ok(stream) => stream.into_inner(),
                Err(err) => {
                    let _ = chunks.send(Err(err.to_string())).await;
                    return;
                }
            };
            loop {
                let next = match stream.message().await {
                    Ok(Some(chunk)) => Ok(chunk.data),
                    Ok(None) => return,
                    Err(err) => Err(err.to_string()),
                };
                let failed = next.is_err();
                // A send fails only once the reader is gone.
                let sent = chunks.send(next).await;
                if sent.is_err() || failed {
                    return;
                }
            }
        });
        BlobReader { chunks: receiver, pending: Vec::new(), offset: 0 }
    }
}

/// A blob streamed from containerd, read on a blocking thread.
#[derive(Debug)]
pub struct BlobReader {
    chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    pending: Vec<u8>,
    offset: usize,
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.offset >= self.pending.len() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.pending = chunk;
                    self.offset = 0;
                }
                Some(Err(err)) => return Err(std::io::Error::other(err)),
                // The stream ended.
                None => return Ok(0),
            }
        }
        let rest = self.pending.get(self.offset..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf.get_mut(..n).unwrap_or_default().copy_from_slice(rest.get(..n).unwrap_or_default());
        self.offset += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_containerds() {
        // identity.ChainID of two layers: sha256("<diff1> <diff2>").
        let base = "sha256:aaaa";
        assert_eq!(chain_id(None, base), base);
        let top = chain_id(Some(base), "sha256:bbbb");
        assert_eq!(top, format!("sha256:{}", hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))));
        assert_eq!(chain_of_key("k8s.io/12/sha256:abc"), "sha256:abc");
        assert_eq!(chain_of_key("sha256:abc"), "sha256:abc");
    }
}
