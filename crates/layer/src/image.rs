//! Choosing the image and its layers: OCI layouts (directory or archive) and
//! legacy `docker save` archives. Every JSON blob is checked against its
//! descriptor before it is parsed.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, OciLayout};
use serde::Deserialize;

use crate::LayerError;
use crate::digest::Digest;
use crate::source::{Source, blob_name};

/// Largest index, manifest or config read.
const MAX_JSON: u64 = 4 << 20;
/// Image indexes followed inside one another.
const MAX_INDEX_DEPTH: usize = 4;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// One image of a legacy `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The image config (the OCI image spec's, as oci-spec reads it).
pub(crate) type Config = ImageConfiguration;

/// A layer to convert.
#[derive(Debug)]
pub(crate) struct PlannedLayer {
    /// The file in the layout or archive.
    pub member: String,
    /// Digest and size the blob must have, where the image names them.
    pub blob: Option<(Digest, u64)>,
    pub diff_id: Digest,
}

/// The chosen image.
#[derive(Debug)]
pub(crate) struct Plan {
    pub manifest_digest: Option<Digest>,
    pub config_digest: Digest,
    pub config: Config,
    pub layers: Vec<PlannedLayer>,
}

fn json<'a, T: Deserialize<'a>>(name: &str, bytes: &'a [u8]) -> Result<T, LayerError> {
    serde_json::from_slice(bytes).map_err(|source| LayerError::Json { name: name.to_owned(), source })
}

fn digest(text: &str) -> Result<Digest, LayerError> {
    Digest::parse(text).ok_or_else(|| LayerError::DigestText { text: text.to_owned() })
}

/// Choose the image and list its layers.
pub(crate) fn plan(source: &Source, reference: Option<&str>) -> Result<Plan, LayerError> {
    if source.has("oci-layout") && source.has("index.json") {
        let layout: OciLayout = json("oci-layout", &source.read_small("oci-layout", MAX_JSON)?)?;
        if layout.image_layout_version() != "1.0.0" {
            return Err(LayerError::NotAnImage {
                path: source.describe().to_owned(),
                reason: "oci-layout's imageLayoutVersion is not 1.0.0",
            });
        }
        return plan_oci(source, reference);
    }
    if let Source::Archive { .. } = source
        && source.has("manifest.json")
    {
        return plan_docker(source, reference);
    }
    Err(LayerError::NotAnImage { path: source.describe().to_owned(), reason: "no oci-layout and index.json" })
}

fn names(descriptor: &Descriptor) -> impl Iterator<Item = &str> {
    let annotations = descriptor.annotations().as_ref();
    [REF_NAME, CONTAINERD_NAME].into_iter().filter_map(move |key| annotations?.get(key).map(String::as_str))
}

fn is_amd64(descriptor: &Descriptor) -> bool {
    descriptor
        .platform()
        .as_ref()
        .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
}

fn plan_oci(source: &Source, reference: Option<&str>) -> Result<Plan, LayerError> {
    let index: ImageIndex = json("index.json", &source.read_small("index.json", MAX_JSON)?)?;
    let available: Vec<String> = index.manifests().iter().flat_map(names).map(str::to_owned).collect();
    let candidates: Vec<&Descriptor> = match reference {
        Some(reference) => index.manifests().iter().filter(|d| names(d).any(|n| n == reference)).collect(),
        None => index.manifests().iter().collect(),
    };
    let chosen = match candidates.as_slice() {
        [] => match reference {
            Some(reference) => return Err(LayerError::RefNotFound { reference: reference.to_owned(), available }),
            None => return Err(LayerError::Ambiguous { available }),
        },
        [one] => *one,
        several => {
            let amd64: Vec<&&Descriptor> = several.iter().filter(|d| is_amd64(d)).collect();
            match amd64.as_slice() {
                [one] => **one,
                _ => return Err(LayerError::Ambiguous { available }),
            }
        }
    };
    resolve(source, chosen, 0)
}

fn resolve(source: &Source, descriptor: &Descriptor, depth: usize) -> Result<Plan, LayerError> {
    let d = digest(descriptor.digest().as_ref())?;
    let name = blob_name(&d);
    let media_type = descriptor.media_type().to_string();
    if INDEX_TYPES.contains(&media_type.as_str()) {
        if depth >= MAX_INDEX_DEPTH {
            return Err(LayerError::IndexDepth(MAX_INDEX_DEPTH));
        }
        let index: ImageIndex = json(&name, &source.read_blob(&d, descriptor.size(), MAX_JSON)?)?;
        let amd64: Vec<&Descriptor> = index.manifests().iter().filter(|m| is_amd64(m)).collect();
        let chosen = match (amd64.as_slice(), index.manifests().as_slice()) {
            ([one], _) => *one,
            ([], [only]) if only.platform().is_none() => only,
            _ => return Err(LayerError::NoPlatform { name }),
        };
        return resolve(source, chosen, depth + 1);
    }
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(LayerError::MediaType { name, media_type });
    }
    let manifest: ImageManifest = json(&name, &source.read_blob(&d, descriptor.size(), MAX_JSON)?)?;
    let config_digest = digest(manifest.config().digest().as_ref())?;
    let config_name = blob_name(&config_digest);
    let config: Config = json(&config_name, &source.read_blob(&config_digest, manifest.config().size(), MAX_JSON)?)?;
    check_config(&config, manifest.layers().len())?;
    let layers = manifest
        .layers()
        .iter()
        .zip(config.rootfs().diff_ids())
        .map(|(layer, diff_id)| {
            let blob = digest(layer.digest().as_ref())?;
            let media_type = layer.media_type().to_string();
            if !LAYER_TYPES.contains(&media_type.as_str()) {
                return Err(LayerError::MediaType { name: blob_name(&blob), media_type });
            }
            Ok(PlannedLayer { member: blob_name(&blob), blob: Some((blob, layer.size())), diff_id: digest(diff_id)? })
        })
        .collect::<Result<_, _>>()?;
    Ok(Plan { manifest_digest: Some(d), config_digest, config, layers })
}

fn check_config(config: &Config, layers: usize) -> Result<(), LayerError> {
    let (os, architecture) = (config.os().to_string(), config.architecture().to_string());
    if os != "linux" || architecture != "amd64" {
        return Err(LayerError::Platform { os, architecture });
    }
    let diff_ids = config.rootfs().diff_ids().len();
    if diff_ids != layers {
        return Err(LayerError::LayerCount { layers, diff_ids });
    }
    Ok(())
}

/// The digest a docker save member name states: `<hex>.json` (legacy
/// configs) or `blobs/sha256/<hex>` (docker 25 and later).
fn digest_in_name(name: &str) -> Option<Digest> {
    let name = name.trim_start_matches("./");
    name.strip_prefix("blobs/sha256/").or_else(|| name.strip_suffix(".json")).and_then(Digest::from_hex)
}

fn plan_docker(source: &Source, reference: Option<&str>) -> Result<Plan, LayerError> {
    let images: Vec<DockerImage> = json("manifest.json", &source.read_small("manifest.json", MAX_JSON)?)?;
    let tags = |image: &DockerImage| image.repo_tags.clone().unwrap_or_default();
    let available: Vec<String> = images.iter().flat_map(tags).collect();
    let chosen: Vec<&DockerImage> = match reference {
        Some(reference) => images.iter().filter(|i| tags(i).iter().any(|t| t == reference)).collect(),
        None => images.iter().collect(),
    };
    let image = match (chosen.as_slice(), reference) {
        ([one], _) => *one,
        ([], Some(reference)) => {
            return Err(LayerError::RefNotFound { reference: reference.to_owned(), available });
        }
        _ => return Err(LayerError::Ambiguous { available }),
    };
    let bytes = source.read_small(&image.config, MAX_JSON)?;
    let config_digest = Digest::of(&bytes);
    if let Some(stated) = digest_in_name(&image.config)
        && stated != config_digest
    {
        return Err(LayerError::BlobDigest { digest: stated, actual: config_digest });
    }
    let config: Config = json(&image.config, &bytes)?;
    check_config(&config, image.layers.len())?;
    let layers = image
        .layers
        .iter()
        .zip(config.rootfs().diff_ids())
        .map(|(member, diff_id)| {
            let blob = match digest_in_name(member) {
                Some(stated) => Some((stated, source.open_member(member)?.1)),
                None => None,
            };
            Ok(PlannedLayer { member: member.clone(), blob, diff_id: digest(diff_id)? })
        })
        .collect::<Result<_, LayerError>>()?;
    Ok(Plan { manifest_digest: None, config_digest, config, layers })
}
