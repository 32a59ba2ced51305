//! Images from a registry, for `parma policy gen --pod`: the OCI
//! distribution API (through `oci-client`) into a local OCI image layout,
//! which the layer builder then reads like any other.
//!
//! - The reference is the workload's `image:` as Kubernetes reads it
//!   (`nginx:1.27` is `docker.io/library/nginx:1.27`); an image index is
//!   resolved to its one linux/amd64 manifest.
//! - Anonymous pulls; HTTPS, or plain HTTP only for the registries named
//!   with [`Registry::plain_http`].
//! - Every digest the registry names is `sha256:` and 64 hex digits before
//!   it becomes a file name; the manifest's digest is checked here (against
//!   the one asked for, if the reference pins one), blobs by `oci-client`
//!   as they arrive and again by the layer builder as it reads them.
//! - A blob is written only up to the size the manifest gives it (at most
//!   16 GiB): a registry that sends more is cut off there.
//! - The layout is `DIR/<manifest digest hex>`, kept between runs: a blob
//!   already there is not fetched again. The same image gives the same
//!   layout, so the same policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The manifests and indexes asked for.
const ACCEPTED: [&str; 4] =
    [OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE];
/// The largest manifest or index read.
const MAX_MANIFEST: usize = 4 << 20;
/// The most layers an image may have.
const MAX_LAYERS: usize = 256;
/// The largest blob (config or layer) a manifest may name.
const MAX_BLOB: u64 = 16 << 30;

/// A blob's file that takes no byte past the size its descriptor gives: a
/// registry streaming more is cut off there, not after filling the disk.
struct Capped {
    file: tokio::fs::File,
    size: u64,
    written: u64,
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.written.saturating_add(buf.len() as u64) > this.size {
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "the registry sent more than the {} bytes the manifest gives",
                this.size
            ))));
        }
        let written = std::pin::Pin::new(&mut this.file).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            this.written += n as u64;
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// Where images are pulled from, and where they are kept.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    plain_http: Vec<String>,
}

/// The fields of a manifest or an index read here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Entry>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

/// The 64 hex digits of a `sha256:` digest, or why it is not one.
pub(crate) fn digest_hex(digest: &str) -> anyhow::Result<&str> {
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("{digest:?} is not a sha256 digest"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{digest:?} is not a sha256 digest"
    );
    Ok(hex)
}

impl Registry {
    /// Keep pulled images under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), plain_http: Vec::new() }
    }

    /// Reach these registries (`HOST[:PORT]`) over plain HTTP.
    pub fn plain_http(mut self, registries: &[String]) -> Self {
        self.plain_http = registries.to_vec();
        self
    }

    /// Pull `image` into an OCI layout under the directory and return the
    /// layout's path.
    pub fn pull(&self, image: &str) -> anyhow::Result<PathBuf> {
        let reference: Reference = image.parse().with_context(|| format!("{image:?} is not an image reference"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the registry client's runtime")?;
        runtime.block_on(self.pull_async(&reference)).with_context(|| format!("cannot pull {image}"))
    }

    async fn pull_async(&self, reference: &Reference) -> anyhow::Result<PathBuf> {
        // reqwest's rustls takes the process's provider: ring (a second
        // install is refused, harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.plain_http.clone()),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = RegistryAuth::Anonymous;
        let (mut bytes, mut digest) = manifest(&client, reference, &auth).await?;
        let mut parsed: Manifest = serde_json::from_slice(&bytes).context("the manifest is not JSON")?;
        if let Some(entries) = &parsed.manifests {
            let entry = entries
                .iter()
                .find(|entry| entry.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
                .context("the image index has no linux/amd64 manifest")?;
            let pinned = Reference::with_digest(
                reference.resolve_registry().to_string(),
                reference.repository().to_string(),
                entry.digest.clone(),
            );
            (bytes, digest) = manifest(&client, &pinned, &auth).await?;
            ensure!(digest == entry.digest, "the registry answered {digest} for {}", entry.digest);
            parsed = serde_json::from_slice(&bytes).context("the manifest is not JSON")?;
            ensure!(parsed.manifests.is_none(), "the index's linux/amd64 entry is another index");
        }
        let config = parsed.config.clone().context("the manifest has no config")?;
        ensure!(parsed.layers.len() <= MAX_LAYERS, "more than {MAX_LAYERS} layers");
        let media_type = parsed.media_type.clone().unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string());

        let layout = self.dir.join(digest_hex(&digest)?);
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).with_context(|| format!("cannot make {}", blobs.display()))?;
        write_new(&blobs.join(digest_hex(&digest)?), &bytes)?;
        for descriptor in std::iter::once(&config).chain(&parsed.layers) {
            let path = blobs.join(digest_hex(&descriptor.digest)?);
            if std::fs::metadata(&path).is_ok_and(|meta| meta.len() == descriptor.size) {
                continue;
            }
            let layer = oci_client::manifest::OciDescriptor {
                media_type: descriptor.media_type.clone(),
                digest: descriptor.digest.clone(),
                size: i64::try_from(descriptor.size).context("a blob size over i64")?,
                ..Default::default()
            };
            ensure!(
                descriptor.size <= MAX_BLOB,
                "blob {} is {} bytes, over the limit of {MAX_BLOB}",
                descriptor.digest,
                descriptor.size
            );
            let partial = tempfile::NamedTempFile::new_in(&blobs).context("cannot make a temporary blob")?;
            let file = Capped {
                file: tokio::fs::File::from_std(partial.reopen().context("cannot open the temporary blob")?),
                size: descriptor.size,
                written: 0,
            };
            client
                .pull_blob(reference, &layer, file)
                .await
                .with_context(|| format!("cannot fetch blob {}", descriptor.digest))?;
            let size = partial.as_file().metadata().context("cannot read the blob's size")?.len();
            ensure!(
                size == descriptor.size,
                "blob {}: {size} bytes, the manifest says {}",
                descriptor.digest,
                descriptor.size
            );
            partial.persist(&path).with_context(|| format!("cannot keep {}", path.display()))?;
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest,
                "size": bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": reference.whole()},
            }],
        });
        write_new(&layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        write_new(&layout.join("index.json"), &serde_json::to_vec(&index)?)?;
        Ok(layout)
    }
}

/// A manifest or index, whole, and its digest (checked here).
async fn manifest(client: &Client, reference: &Reference, auth: &RegistryAuth) -> anyhow::Result<(Vec<u8>, String)> {
    let (bytes, digest) =
        client.pull_manifest_raw(reference, auth, &ACCEPTED).await.context("cannot fetch the manifest")?;
    if bytes.len() > MAX_MANIFEST {
        bail!("the manifest is larger than {MAX_MANIFEST} bytes");
    }
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    ensure!(digest == actual, "the manifest hashes to {actual}, the registry says {digest}");
    if let Some(pinned) = reference.digest() {
        ensure!(pinned == actual, "the manifest hashes to {actual}, the reference pins {pinned}");
    }
    Ok((bytes.to_vec(), actual))
}

/// Write `bytes` to `path` through a temporary name.
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a path without a parent")?;
    let mut file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_file_takes_no_byte_past_its_size() {
        use tokio::io::AsyncWriteExt as _;
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let partial = tempfile::NamedTempFile::new().unwrap();
        let file = tokio::fs::File::from_std(partial.reopen().unwrap());
        let mut capped = Capped { file, size: 10, written: 0 };
        runtime.block_on(async {
            capped.write_all(b"0123456").await.unwrap();
            let err = capped.write_all(b"789ab").await.unwrap_err();
            assert!(err.to_string().contains("more than the 10 bytes"), "{err}");
            capped.write_all(b"789").await.unwrap();
            capped.flush().await.unwrap();
        });
        assert_eq!(std::fs::read(partial.path()).unwrap(), b"0123456789");
    }

    #[test]
    fn digests_become_file_names_only_when_they_are_sha256() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(digest_hex(&good).unwrap(), "ab".repeat(32));
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}/", "ab".repeat(32)),
            "sha256:".to_string(),
        ] {
            assert!(digest_hex(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_read_as_kubernetes_reads_them() {
        let short: Reference = "nginx:1.27".parse().unwrap();
        assert_eq!(short.resolve_registry(), "index.docker.io");
        assert_eq!(short.repository(), "library/nginx");
        let local: Reference = "127.0.0.1:5000/parma/test:1".parse().unwrap();
        assert_eq!((local.registry(), local.repository(), local.tag()), ("127.0.0.1:5000", "parma/test", Some("1")));
    }
}
