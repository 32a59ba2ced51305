//! The parma snapshotter under a real containerd (Debian's 1.6, started by
//! the test in its own directory and network namespace): an image pushed
//! to a registry on the namespace's loopback and pulled through CRI is
//! converted layer by layer into exactly the bytes `parma layer build`
//! makes from the same image, so the root hashes are those `parma policy
//! gen` puts in the policy; a container's snapshot mounts as the one bind
//! the shim reads its layers from, with the image's users files for
//! containerd's lookups.

use std::collections::HashMap;

use anyhow::{Context, ensure};
use containerd_client::services::v1::CreateRequest;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::with_namespace;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use parma_tests::containerd::{Containerd, NAMESPACE};
use parma_tests::{Paths, oci};
use sha2::{Digest, Sha256};
use tonic::Request;

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// containerd's chain id of the layers with these diff-ids.
fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = String::new();
    for diff_id in diff_ids {
        chain = if chain.is_empty() {
            diff_id.clone()
        } else {
            format!("sha256:{}", hex::encode(Sha256::digest(format!("{chain} {diff_id}").as_bytes())))
        };
    }
    chain
}

#[test]
fn layers_pulled_through_cri_become_the_images_parma_layer_build_makes() -> anyhow::Result<()> {
    let paths = Paths::get();
    let work = tempfile::tempdir()?;
    let image = oci::build_test_image(&work.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let expected = parma_layer::build(&image.layout, None, &work.path().join("layers"), &|_| {})?;
    // Blobs through the content API here (the other tests read containerd's files).
    let containerd = Containerd::start_with(&paths.repo, None, false)?;
    let target = containerd.push(&image.layout, &image.reference, "parma/test:1")?;

    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let channel = containerd.channel().await?;
        let mut images = ImageServiceClient::new(channel.clone());
        let pull = |images: &mut ImageServiceClient<tonic::transport::Channel>| {
            let mut images = images.clone();
            let target = target.clone();
            async move {
                images
                    .pull_image(PullImageRequest {
                        image: Some(ImageSpec { image: target, ..Default::default() }),
                        ..Default::default()
                    })
                    .await
            }
        };
        let pulled = pull(&mut images).await.with_context(|| {
            format!(
                "PullImage\ncontainerd:\n{}\nsnapshotter:\n{}",
                containerd.log("containerd"),
                containerd.log("snapshotter")
            )
        })?;
        ensure!(pulled.into_inner().image_ref.starts_with("sha256:"));

        // Bit for bit what parma layer build made, for every layer.
        for layer in &expected.layers.layers {
            let ours = containerd.snapshotter_root().join("layers").join(&layer.file);
            let theirs = work.path().join("layers").join(&layer.file);
            ensure!(sha256_file(&ours)? == sha256_file(&theirs)?, "{} differs from parma layer build's", layer.file);
        }
        let converted = |log: &str| log.matches("converted").count();
        ensure!(
            converted(&containerd.log("snapshotter")) == expected.layers.layers.len(),
            "{}",
            containerd.log("snapshotter")
        );
        // A second pull finds the layers there.
        pull(&mut images).await?;
        ensure!(converted(&containerd.log("snapshotter")) == expected.layers.layers.len(), "converted again");

        // A container's root: the layers, base first, as the shim takes them.
        let diff_ids: Vec<String> = image.diff_ids.iter().map(|d| d.to_string()).collect();
        // Under a lease, as a container holds its snapshot: containerd's
        // garbage collector removes an unreferenced one at any time.
        let mut leases = LeasesClient::new(channel.clone());
        let lease = CreateRequest { id: "snapshotter-test".into(), labels: HashMap::new() };
        leases.create(with_namespace!(lease, NAMESPACE)).await?;
        let mut snapshots = SnapshotsClient::new(channel);
        let request = PrepareSnapshotRequest {
            snapshotter: "parma".into(),
            key: "container-1".into(),
            parent: chain_id(&diff_ids),
            labels: HashMap::new(),
        };
        let mut request = with_namespace!(request, NAMESPACE);
        request.metadata_mut().insert("containerd-lease", "snapshotter-test".parse()?);
        let mounts = snapshots.prepare(request).await?.into_inner().mounts;
        ensure!(mounts.len() == 1 && mounts[0].r#type == "bind", "{mounts:?}");
        let layers_dir = containerd.snapshotter_root().join("layers");
        let want: Vec<String> = ["ro".to_string(), "rbind".to_string()]
            .into_iter()
            .chain(expected.layers.layers.iter().map(|l| {
                format!("parma-layer={}:{}:{}", l.root_hash, l.hash_offset, layers_dir.join(&l.file).display())
            }))
            .collect();
        let summary = mounts[0].options.clone();
        // What containerd reads on the host to resolve the user: the image's files, and nothing more.
        let users = std::path::Path::new(&mounts[0].source);
        let image_files = parma_layer::read_files(&image.layout, None, &["/etc/passwd", "/etc/group"])?;
        let passwd = std::fs::read(users.join("etc/passwd"))
            .with_context(|| format!("{}\n{}", users.display(), containerd.log("snapshotter")))?;
        ensure!(passwd == image_files["/etc/passwd"], "passwd");
        ensure!(std::fs::read(users.join("etc/group")).ok() == image_files.get("/etc/group").cloned(), "group");
        ensure!(std::fs::read_dir(users)?.count() == 1, "only etc/");
        ensure!(summary == want, "{summary:?} != {want:?}");
        let request = RemoveSnapshotRequest { snapshotter: "parma".into(), key: "container-1".into() };
        snapshots.remove(with_namespace!(request, NAMESPACE)).await?;
        anyhow::Ok(())
    })
}
