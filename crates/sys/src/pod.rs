//! A pod's network namespace, from the agent's side.
//!
//! The agent never enters a pod's namespaces itself: the network steps run
//! on a short-lived thread that joins the pod's network namespace (a
//! thread's namespaces are its own) and ends with the step.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Bring the loopback interface of the network namespace of the process
/// `pod` names (a pidfd) up, as a pod's `localhost`.
pub fn loopback_up(pod: BorrowedFd<'_>) -> io::Result<()> {
    in_network_of(pod, || {
        let socket = socket(libc::AF_INET)?;
        // SAFETY: a zeroed ifreq is a valid value (an empty name, no flags).
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `request`.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the flags member is the one SIOCGIFFLAGS set.
        unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads `request`.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const request) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Run `step` on a new thread inside the network namespace of the process
/// `pod` names; the thread ends with the step (a socket it opens stays in
/// that namespace, usable from any thread).
pub fn in_network_of<T: Send>(pod: BorrowedFd<'_>, step: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let fd = pod.as_raw_fd();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("pod-net".into()).spawn_scoped(scope, move || {
            // SAFETY: setns changes this thread's network namespace only;
            // the fd stays open for the scope.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            step()
        })?;
        thread.join().map_err(|_| io::Error::other("the pod's network thread panicked"))?
    })
}

/// A datagram socket of `domain`, close-on-exec, in the calling thread's
/// network namespace.
fn socket(domain: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new fd or -1.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
