//! `swapon` and `swapoff`, which neither std nor nix wrap.

use std::ffi::CStr;
use std::io;

/// Start swapping to the block device at `path` (it must carry a swap header).
pub fn swapon(path: &CStr) -> io::Result<()> {
    // SAFETY: swapon with a valid NUL-terminated path and no flags.
    let rc = unsafe { libc::swapon(path.as_ptr(), 0) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Stop swapping to `path`; the pages on it are read back into memory.
pub fn swapoff(path: &CStr) -> io::Result<()> {
    // SAFETY: swapoff with a valid NUL-terminated path.
    let rc = unsafe { libc::swapoff(path.as_ptr()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
