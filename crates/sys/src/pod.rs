//! A pod's namespaces, from the agent's side.
//!
//! The agent never enters a pod's namespaces itself: the network steps run
//! on a short-lived thread that joins the pod's network namespace (a
//! thread's namespaces are its own) and ends with the step; the pod's
//! `proc` is mounted by a short-lived child made in its PID namespace.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

/// The network settings of a pod's namespace, written before any
/// interface is moved in (a new interface takes the `default` ones): the
/// host configures addresses and routes only through requests the policy
/// decides, never by router advertisements or redirects; and ICMP echo
/// sockets need no `CAP_NET_RAW` (which containers do not get by default).
const POD_SYSCTLS: [(&str, &str); 11] = [
    ("net/ipv4/ping_group_range", "0 2147483647"),
    ("net/ipv4/conf/all/accept_redirects", "0"),
    ("net/ipv4/conf/default/accept_redirects", "0"),
    ("net/ipv4/conf/all/accept_source_route", "0"),
    ("net/ipv4/conf/default/accept_source_route", "0"),
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
    ("net/ipv6/conf/all/autoconf", "0"),
    ("net/ipv6/conf/default/autoconf", "0"),
    ("net/ipv6/conf/all/accept_redirects", "0"),
    ("net/ipv6/conf/default/accept_redirects", "0"),
];

/// Prepare the network namespace of the process `pod` names (a pidfd): its
/// settings ([`POD_SYSCTLS`]), then its loopback interface up, as the pod's
/// `localhost`.
pub fn prepare_network(pod: BorrowedFd<'_>) -> io::Result<()> {
    in_network_of(pod, || {
        // A thread's view of /proc/sys/net is its own network namespace's.
        for (name, value) in POD_SYSCTLS {
            std::fs::write(format!("/proc/sys/{name}"), value)
                .map_err(|err| io::Error::new(err.kind(), format!("{name}: {err}")))?;
        }
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

/// Mount a `proc` of the PID namespace of the process `pod` names (a
/// pidfd) on `target`, in the caller's mount namespace, `nosuid`, `nodev`
/// and `noexec`. A `proc` shows the PID namespace of the task that mounts
/// it, so a short-lived child made in that namespace (on a thread that
/// joined it for its children) mounts it and exits. Call it before any
/// process of the namespace could see, stop or trace that child.
pub fn mount_proc_of(pod: BorrowedFd<'_>, target: &std::ffi::CStr) -> io::Result<()> {
    let fd = pod.as_raw_fd();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("pod-proc".into()).spawn_scoped(scope, move || {
            // SAFETY: setns(CLONE_NEWPID) changes the PID namespace of this
            // thread's children only; the thread ends with this closure.
            if unsafe { libc::setns(fd, libc::CLONE_NEWPID) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            // SAFETY: the child makes async-signal-safe calls only (mount,
            // _exit) on strings prepared before the fork.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above.
                unsafe {
                    let rc = libc::mount(c"proc".as_ptr(), target.as_ptr(), c"proc".as_ptr(), flags, ptr::null());
                    libc::_exit(if rc < 0 { *libc::__errno_location() } else { 0 });
                }
            }
            if pid < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut status = 0;
            // SAFETY: wait for this thread's own child by PID.
            while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => Ok(()),
                (true, errno) => Err(io::Error::from_raw_os_error(errno)),
                (false, _) => Err(io::Error::other("the mounting child was killed")),
            }
        })?;
        thread.join().map_err(|_| io::Error::other("the pod's proc thread panicked"))?
    })
}
