//! Files the orchestrator hands in (`CopyFile`): `/etc/hosts`,
//! `/etc/resolv.conf`, `/etc/hostname`, a termination log, service-account
//! tokens. Each lands under [`FILES`], a tmpfs of its own in guest memory
//! (bounded in size and files, `nosuid,nodev,noexec`), at a path the policy
//! allowed (`copy_file`), and reaches a container only as a bind mount its
//! policy entry lists.
//!
//! A copy to a path that exists replaces the file's contents in place (the
//! same inode), so containers that bind it see the update (a rotated token);
//! a reader may see a write in progress.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use crate::fault::Fault;

/// Where copied files live in the guest.
pub const FILES: &str = "/run/parma/files";
/// The files' tmpfs: bounded, whatever the host copies.
const FILES_TMPFS: &str = "mode=0755,size=16m,nr_inodes=4096";
/// Largest file one request copies.
pub const MAX_FILE: usize = 512 * 1024;
/// Deepest relative path.
const MAX_DEPTH: usize = 8;

/// The guest path for a relative path the host names: 1 to [`MAX_DEPTH`]
/// components of `[A-Za-z0-9._-]`, none `.` or `..` or hidden.
pub fn guest_path(relative: &str) -> Result<String, Fault> {
    let components: Vec<&str> = relative.split('/').collect();
    let ok = relative.len() <= 255
        && (1..=MAX_DEPTH).contains(&components.len())
        && components.iter().all(|c| {
            !c.is_empty() && !c.starts_with('.') && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if !ok {
        return Err(Fault::invalid(format!(
            "file path {:?} is not 1 to {MAX_DEPTH} components of [A-Za-z0-9._-] (none hidden, no . or ..)",
            relative.get(..relative.floor_char_boundary(64)).unwrap_or_default()
        )));
    }
    Ok(format!("{FILES}/{relative}"))
}

/// Check a file's mode: permission bits only (no set-id, no sticky).
pub fn check_mode(mode: u32) -> Result<(), Fault> {
    if mode & !0o777 != 0 {
        return Err(Fault::invalid(format!("file mode {mode:o} has bits beyond 0777 (no set-id or sticky)")));
    }
    Ok(())
}

/// Write `data` to `path` (a [`guest_path`]) with `mode`, making its parent
/// directories (0755). Every step resolves beneath [`FILES`] with no
/// symbolic link followed (`openat2`), and the file written must be a
/// regular file (opened non-blocking: a FIFO there cannot stall the agent).
/// Only the agent writes under [`FILES`] (containers bind it read-only), so
/// this is defence in depth.
pub fn copy(path: &str, data: &[u8], mode: u32) -> Result<(), Fault> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use nix::sys::stat::Mode;
    check_mode(mode)?;
    if data.len() > MAX_FILE {
        return Err(Fault::invalid(format!("{} bytes: a copied file has at most {MAX_FILE}", data.len())));
    }
    filesystem()?;
    let relative = path.strip_prefix(FILES).and_then(|r| r.strip_prefix('/')).ok_or_else(|| {
        Fault::invalid(format!(
            "{:?} is not under {FILES}",
            path.get(..path.floor_char_boundary(64)).unwrap_or_default()
        ))
    })?;
    let resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV;
    let open_dir = |dir: &std::os::fd::OwnedFd, name: &str| {
        let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(resolve);
        openat2(dir, name, how).map_err(|err| Fault::from(format!("cannot open {FILES}/{name}: {err}")))
    };
    let root = std::fs::File::open(FILES).map_err(|err| format!("cannot open {FILES}: {err}"))?;
    let mut dir = std::os::fd::OwnedFd::from(root);
    let components: Vec<&str> = relative.split('/').collect();
    let (last, parents) = components.split_last().ok_or_else(|| Fault::invalid("an empty file path"))?;
    for component in parents {
        match nix::sys::stat::mkdirat(&dir, *component, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(err) => return Err(format!("cannot make {component} under {FILES}: {err}").into()),
        }
        dir = open_dir(&dir, component)?;
    }
    let how = OpenHow::new()
        .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(resolve);
    let fd = openat2(&dir, *last, how).map_err(|err| Fault::invalid(format!("cannot open {path}: {err}")))?;
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|err| format!("cannot stat {path}: {err}"))?;
    if !meta.is_file() {
        return Err(Fault::invalid(format!("{path} exists and is not a regular file")));
    }
    file.set_len(0).map_err(|err| format!("cannot truncate {path}: {err}"))?;
    file.write_all(data).map_err(|err| format!("cannot write {path}: {err}"))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|err| format!("cannot chmod {path}: {err}"))?;
    Ok(())
}

/// Mount the files' tmpfs on [`FILES`] unless it is there already.
fn filesystem() -> Result<(), Fault> {
    use std::os::unix::fs::MetadataExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(FILES)
        .map_err(|err| format!("cannot make {FILES}: {err}"))?;
    let dev = |path: &str| std::fs::metadata(path).map(|m| m.dev()).map_err(|err| format!("cannot stat {path}: {err}"));
    let parent = FILES.rsplit_once('/').map_or("/", |(parent, _)| parent);
    if dev(FILES)? != dev(parent)? {
        return Ok(());
    }
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("files"), FILES, Some("tmpfs"), flags, Some(FILES_TMPFS))
        .map_err(|err| Fault::from(format!("cannot mount the files' tmpfs on {FILES}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_files_directory() {
        assert_eq!(guest_path("pod/hosts").unwrap(), "/run/parma/files/pod/hosts");
        assert_eq!(guest_path("resolv.conf").unwrap(), "/run/parma/files/resolv.conf");
        for bad in ["", "/etc/hosts", "a/../b", "..", "a//b", "a/", ".hidden", "a/.b", "a b", "a/b/c/d/e/f/g/h/i", "é"]
        {
            assert!(guest_path(bad).is_err(), "{bad:?}");
        }
        assert!(guest_path(&"x".repeat(256)).is_err());
    }

    #[test]
    fn modes_are_permission_bits_only() {
        check_mode(0o644).unwrap();
        check_mode(0o600).unwrap();
        for bad in [0o4755, 0o2755, 0o1777, 0o10644] {
            assert!(check_mode(bad).is_err(), "{bad:o}");
        }
    }
}
