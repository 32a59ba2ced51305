//! `parma-snapshotter`: a containerd proxy snapshotter for confidential
//! pods. When CRI unpacks a pulled image, each layer's `Prepare` carries
//! CRI's labels (`containerd.io/snapshot/cri.layer-digest`); the
//! snapshotter reads that blob from containerd's content store, converts it
//! with `parma-layer` into the ext4 + dm-verity image `parma layer build`
//! makes (the same bytes, so the same root hash `parma policy gen`
//! computed), keeps it by diff-id, and answers that the layer exists. A
//! container's snapshot then mounts as one `parma-layer` mount per layer,
//! base first, which the shim hot-plugs into the pod's UVM.
//!
//! Nothing here is trusted by the guest: a wrong image fails dm-verity or
//! the policy's root hashes there. What this crate owes is agreement, bit
//! for bit, with the policy generator.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]
// containerd-snapshots' trait returns tonic::Status, a large error by clippy's measure.
#![allow(clippy::result_large_err)]

pub mod content;
pub mod service;
pub mod store;

/// The rootfs mount type the shim takes: one layer image.
pub const MOUNT_TYPE: &str = "parma-layer";
/// CRI's label on each layer's `Prepare`: the compressed blob's digest.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// containerd's label naming the committed snapshot an unpack makes.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
