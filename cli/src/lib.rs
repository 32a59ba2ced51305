//! The host side of Parma: boot the UVM under QEMU, talk to its agent.
//!
//! `parma` (the binary) is a thin layer of argument parsing over this
//! library; the test harness uses the library directly, so tests boot the
//! UVM exactly as users do.

pub mod client;
pub mod policy;
pub mod policy_gen;
pub mod qemu;
pub mod run;

pub use client::{Client, ClientError, Control};
pub use qemu::{Accel, Disk, Serial, Snp, SnpBoot, VmConfig, VmError};
