//! The one crate of Parma that uses `unsafe`.
//!
//! Everything else in the workspace denies `unsafe_code`; the Linux
//! interfaces that neither std nor nix wrap safely live here, each behind a
//! typed, safe API:
//!
//! - [`dm`]: device-mapper ioctls (create a dm-verity or dm-crypt device,
//!   remove it), the way `dmsetup` does, without libdevmapper.
//! - [`launch`]: start a container process with `clone3` in new namespaces
//!   and directly in its cgroup, set up its root with `pivot_root`, drop to
//!   its user and capabilities and `execve` it. The child runs only raw
//!   system calls on data prepared before the clone: no allocation, no lock.
//! - [`pod`]: a pod's namespaces from the agent's side (a thread that joins
//!   its network namespace for one step: settings, the loopback interface
//!   up; a child that mounts the `proc` of its PID namespace).
//! - [`swap`]: `swapon`/`swapoff` for the encrypted scratch device.
//! - [`tap`]: a tap device (`TUNSETIFF`), the host side of a UVM's NIC on a
//!   real network (the host CLI's `--netns`).
//!
//! Linux only, x86_64 is what is tested.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod dm;
pub mod launch;
pub mod pod;
pub mod swap;
pub mod tap;
