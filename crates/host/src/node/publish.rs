//! `parma node publish`: a node image layout pushed to a registry through
//! the OCI distribution API (`oci-client`), byte for byte: every blob under
//! its digest, then the manifest exactly as the layout holds it, so the
//! image's digest in the registry is the layout's.

use std::time::Duration;

use anyhow::{Context, ensure};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::image::{Layout, MANIFEST_TYPE};

/// Push `layout` to `target` (`HOST[:PORT]/REPO:TAG`); plain HTTP only
/// when `insecure`. Returns the pushed manifest's digest.
pub fn publish(layout: &Layout, target: &str, insecure: bool) -> anyhow::Result<String> {
    let reference: Reference = target.parse().with_context(|| format!("{target:?} is not an image reference"))?;
    ensure!(reference.digest().is_none(), "publish to a tag, not a digest: the registry names the digest");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the registry client's runtime")?;
    runtime.block_on(push(layout, &reference, insecure)).with_context(|| format!("cannot publish to {target}"))
}

async fn push(layout: &Layout, reference: &Reference, insecure: bool) -> anyhow::Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if insecure {
        ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(300)),
        ..Default::default()
    });
    client
        .auth(reference, &RegistryAuth::Anonymous, RegistryOperation::Push)
        .await
        .context("the registry refused an anonymous push")?;
    let blobs = std::iter::once((&layout.config_digest, &layout.config))
        .chain(layout.layers.iter().map(|(_, digest, bytes)| (digest, bytes)));
    for (digest, bytes) in blobs {
        if client.blob_exists(reference, digest).await.unwrap_or(false) {
            continue;
        }
        client.push_blob(reference, bytes.clone(), digest).await.with_context(|| format!("cannot push {digest}"))?;
    }
    let content_type = MANIFEST_TYPE.parse().context("a media type")?;
    client
        .push_manifest_raw(reference, layout.manifest.clone(), content_type)
        .await
        .context("cannot push the manifest")?;
    let (_, digest) = client
        .pull_manifest_raw(reference, &RegistryAuth::Anonymous, &[MANIFEST_TYPE])
        .await
        .context("cannot read the manifest back")?;
    ensure!(digest == layout.digest, "the registry holds {digest} under the tag, not {}", layout.digest);
    Ok(digest)
}
