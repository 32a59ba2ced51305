//! `containerd-shim-parma-v2`: the containerd runtime `io.containerd.parma.v2`.
//!
//! One shim process and one UVM per pod (containers grouped by CRI's
//! `io.kubernetes.cri.sandbox-id`). The sandbox's `Create` boots the UVM
//! with the pod's policy (the `io.parma.policy` annotation; its sha256 is
//! HOST_DATA) and makes it the pod; each later `Create` puts a container in
//! it from the layer images the parma snapshotter names. Everything the
//! guest does is decided there by the policy; the shim only asks.
//!
//! Modules: [`bootstrap`] (`start`, `delete`, serving the socket), [`service`]
//! (the Task API), [`pod`] (the UVM), [`spec`] (the bundle's OCI spec to the
//! agent's requests), [`stdio`] (containerd's FIFOs), [`events`] (to
//! containerd), [`config`] (`/etc/parma/shim.toml`).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod bootstrap;
pub mod config;
pub mod events;
pub mod pod;
pub mod service;
pub mod spec;
pub mod stdio;

/// The runtime type containerd knows the shim by.
pub const RUNTIME: &str = "io.containerd.parma.v2";
