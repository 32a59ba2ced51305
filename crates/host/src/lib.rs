//! The host side of Parma: boot the UVM under QEMU, talk to its agent, run
//! a container in it.
//!
//! The `parma` binary, the VM test harness and the containerd shim are thin
//! layers over this library, so tests boot the UVM exactly as users do:
//!
//! - [`qemu`]: the QEMU command line ([`VmConfig`]);
//! - [`vm`]: one UVM's life ([`Vm`]): start, wait for the agent while
//!   watching QEMU and the serial console, stop;
//! - [`client`]: the agent client ([`Client`]), one typed call per request;
//! - [`run`]: `parma run`'s steps and the whole of it ([`run::run`]);
//! - [`policy_gen`]: execution policies generated from an image and a spec.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod annotation;
pub mod client;
pub mod kube;
pub mod netns;
pub mod node;
pub mod policy_gen;
pub mod qemu;
pub mod qmp;
pub mod registry;
pub mod relay;
pub mod run;
pub mod secrets;
pub mod user;
pub mod vm;

pub use client::{Client, ClientError, Control};
pub use qemu::{Accel, Disk, Nic, PortForward, Serial, Snp, SnpBoot, VmConfig, VmError};
pub use vm::{StartOptions, StopReason, Vm};
