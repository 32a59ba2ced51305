//! Container image layers to read-only ext4 + dm-verity images:
//! `parma layer build --oci PATH [--ref NAME] --out DIR` as a library.
//!
//! It is a crate of its own because it is the one place where OCI, tar and
//! compression meet the two format crates: [`parma_ext4`] must not know tar
//! or OCI, and [`parma_verity`] must not know files. It is host-only and must
//! not depend on anything guest-only (init, the agent), on tokio, on a
//! clock or randomness, on host tools (no `mkfs`, `tar`, `veritysetup`), or
//! on privileges (no root, mount or loop device).
//!
//! # What [`build`] does
//!
//! 1. Reads the image: an OCI image layout directory (`oci-layout`,
//!    `index.json`, `blobs/sha256/…`) or a tar archive holding one (docker
//!    25 and later `docker save`), or a legacy `docker save` archive
//!    (`manifest.json`, a config, one tar per layer). Archives are read in
//!    place through an index of member offsets, never unpacked. The image is
//!    the one whose `org.opencontainers.image.ref.name` (or
//!    `io.containerd.image.name`, or for legacy archives a `RepoTags` entry)
//!    is `reference`, or the only one; from an image index, linux/amd64.
//! 2. Checks every blob against the descriptor that names it: the size before
//!    reading, the sha256 while reading (small JSON blobs are checked before
//!    they are parsed; a layer's digest is checked when its stream ends, and
//!    nothing is renamed into place before it is). Legacy archives carry no
//!    digests for layers; there the diff-id check below covers the content.
//! 3. For each layer, in order: decompresses it (gzip, zstd or none, told by
//!    the stream's magic, as containerd does; the media type must be a layer
//!    type), hashes the tar stream into its diff-id, converts the tar to ext4
//!    on the fly ([`tar_to_ext4`]), appends the dm-verity hash area, checks
//!    the diff-id against the config's `rootfs.diff_ids[i]`, and renames
//!    `DIR/.tmp…` to `DIR/<diff-id hex>.img`.
//! 4. Writes `DIR/config.json` ([`ImageConfig`]) and then `DIR/layers.json`
//!    ([`LayersFile`]), each through a temporary name.
//!
//! # Determinism
//!
//! The same layer gives the same bytes every time. Everything random in the
//! formats is derived from the layer's diff-id `D` (its 32 raw bytes), with
//! `H(label) = sha256("parma-layer/v1/" || label || 0x00 || D)`:
//!
//! | field | value |
//! |---|---|
//! | ext4 UUID | `H("ext4-uuid")[..16]`, UUID version 8, RFC 4122 variant |
//! | ext4 directory hash seed | `H("ext4-hash-seed")[..16]` |
//! | verity salt | `H("verity-salt")`, 32 bytes |
//! | verity superblock UUID | `H("verity-uuid")[..16]`, UUID version 8, RFC 4122 variant |
//!
//! The diff-id used is the config's (it must be known before the first byte
//! is written); the stream's own hash must then equal it. Timestamps come from
//! the tar (atime and ctime are set to the mtime); directories the tar does
//! not list are 0755, 0:0, time 0. Temporary file names are random, which
//! changes no output byte.
//!
//! # Layer contents
//!
//! See [`tar_to_ext4`] for the rules: whiteouts, implicit parents, what is
//! refused (`..`, writes through symlinks, duplicates, …).
//!
//! # Memory
//!
//! Bounded by the number of entries (names and directory metadata), never by
//! file contents: the tar stream flows through fixed buffers into the image.
//! One caveat from the `tar` crate: a GNU long-name or PAX header entry is
//! read into memory whole.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod build;
mod convert;
mod digest;
mod files;
mod hasher;
mod image;
mod pipe;
mod source;

use std::path::PathBuf;

pub use build::{
    Blob, Built, IMAGE_FORMAT, ImageConfig, LayerRecord, LayersFile, Progress, build, build_reusing, convert_blob,
};
pub use convert::{TarError, tar_to_ext4};
pub use digest::{Derived, Digest};
pub use files::{LayerFiles, MAX_FILE, Watch, read_files, scan_blob, stack};

/// Why an image could not be turned into layer images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The input path could not be read.
    #[error("reading {path}")]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input is neither an OCI layout nor a `docker save` archive.
    #[error("{path}: not an OCI image layout or docker save archive: {reason}")]
    NotAnImage { path: PathBuf, reason: &'static str },
    /// The outer tar archive is corrupt.
    #[error("reading the archive {path}")]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A member name that is not allowed (absolute, `..`) or a link loop.
    #[error("{name}: {reason}")]
    MemberName { name: String, reason: &'static str },
    /// A file the image refers to is not in the layout or the archive.
    #[error("{name}: not found in the image")]
    Missing { name: String },
    /// Reading a file of the layout or a member of the archive failed.
    #[error("reading {name}")]
    Read {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (index, manifest, config) does not parse.
    #[error("{name}: invalid JSON")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON document is larger than this tool reads.
    #[error("{name}: {size} bytes is more than the {max} allowed")]
    TooLarge { name: String, size: u64, max: u64 },
    /// A digest that is not `sha256:` and 64 lower-case hex digits.
    #[error("unsupported or malformed digest {text:?} (only sha256 is supported)")]
    DigestText { text: String },
    /// A blob's size differs from its descriptor's.
    #[error("blob {digest}: descriptor says {expected} bytes, the blob has {actual}")]
    BlobSize { digest: Digest, expected: u64, actual: u64 },
    /// A blob's sha256 differs from its descriptor's digest.
    #[error("blob {digest}: content hashes to {actual}")]
    BlobDigest { digest: Digest, actual: Digest },
    /// A descriptor's media type is not one this tool reads there.
    #[error("{name}: unsupported media type {media_type:?}")]
    MediaType { name: String, media_type: String },
    /// No image carries the requested reference.
    #[error("no image named {reference:?} (available: {available:?})")]
    RefNotFound { reference: String, available: Vec<String> },
    /// Several images and no `--ref` to choose.
    #[error("several images, choose one with a reference (available: {available:?})")]
    Ambiguous { available: Vec<String> },
    /// An image index without exactly one linux/amd64 manifest.
    #[error("{name}: no single linux/amd64 manifest in the image index")]
    NoPlatform { name: String },
    /// Image indexes nested too deeply.
    #[error("image indexes nested more than {0} deep")]
    IndexDepth(usize),
    /// The config is for another platform.
    #[error("the image is for {os}/{architecture}, not linux/amd64")]
    Platform { os: String, architecture: String },
    /// The manifest and the config disagree on the number of layers.
    #[error("the manifest lists {layers} layers, the config {diff_ids} diff-ids")]
    LayerCount { layers: usize, diff_ids: usize },
    /// A layer's uncompressed tar does not hash to the config's diff-id.
    #[error("layer {index}: the tar hashes to {actual}, the config says {expected}")]
    DiffId { index: usize, expected: Digest, actual: Digest },
    /// Bytes follow the end of a layer's compressed stream.
    #[error("layer {index}: data after the end of the compressed stream")]
    TrailingData { index: usize },
    /// A layer's tar stream could not be converted (names the entry and offset).
    #[error("layer {index} ({diff_id})")]
    Layer {
        index: usize,
        diff_id: Digest,
        #[source]
        source: TarError,
    },
    /// The hash area could not be appended.
    #[error("layer {index}: building the dm-verity hash tree")]
    Verity {
        index: usize,
        #[source]
        source: parma_verity::Error,
    },
    /// Writing under the output directory failed.
    #[error("writing {path}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
