//! A tap device: the host side of a UVM's NIC on a real network (`parma vm
//! run --netns`), created in the network namespace of the calling thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TAP`: Ethernet frames.
const IFF_TAP: libc::c_short = 0x0002;
/// `IFF_NO_PI`: no packet information header before each frame.
const IFF_NO_PI: libc::c_short = 0x1000;

/// Create the tap device `name` (at most 15 bytes) in the calling thread's
/// network namespace and return its queue's fd (close-on-exec): frames the
/// device sends are read from it, frames written to it arrive on the
/// device. The device goes away when the fd is closed.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > 15 || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    // SAFETY: open a device node by a constant path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just opened and is owned here only.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed ifreq is a valid value (an empty name, no flags).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads the name and flags of `request`, which lives
    // across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// Make `command`'s child inherit `fd` (its number unchanged): the flag
/// close-on-exec is cleared in the child only, between fork and exec, so
/// no other process this one spawns meanwhile gets it.
pub fn inherit_in_child(command: &mut std::process::Command, fd: &OwnedFd) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and makes
    // one async-signal-safe call (fcntl) on a descriptor the parent keeps
    // open until the spawn returns (the caller borrows it for that long).
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
