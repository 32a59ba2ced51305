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
//! - [`pod`]: a pod's network namespace from the agent's side (a thread
//!   that joins it for one step: the loopback interface up).
//! - [`swap`]: `swapon`/`swapoff` for the encrypted scratch device.
//!
//! Linux only, x86_64 is what is tested.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod dm;
pub mod launch;
pub mod pod;
pub mod swap;
