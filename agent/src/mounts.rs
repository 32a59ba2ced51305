//! A container's mounts beyond the defaults, once the policy allowed them.
//!
//! The policy decides on destination, type, source and options; this module
//! then holds the host to what the agent can do safely and turns each mount
//! into the root operations the launch runs in the child before
//! `pivot_root`:
//!
//! - `tmpfs`, with `size=` and `mode=`;
//! - `bind` of a volume of the UVM, `/run/parma/volumes/NAME`: a directory in
//!   guest memory (encrypted under SEV-SNP), made on first use and shared by
//!   every container that binds it, for the UVM's life (an `emptyDir`);
//! - `bind` of a file or directory the host copied in (`CopyFile`, under
//!   `/run/parma/files/`): `/etc/hosts` and the like, read-only.
//!
//! Both are always `nosuid` and `nodev`. Destinations must not nest. A
//! destination under `/proc`, `/dev` or `/sys` (the agent's own mounts), one
//! that passes through a symbolic link or a non-directory of the image, and
//! any option not listed is refused with the reason.

use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

use parma_protocol::Mount;
use parma_sys::launch::RootOp;

/// Where the volumes that bind mounts come from: a tmpfs of their own, so
/// that what containers write there (files, inodes) cannot use up `/run`,
/// where the agent makes its mount points.
pub const VOLUMES: &str = "/run/parma/volumes";
/// The volumes' tmpfs: a quarter of the guest's memory at most, and a bound
/// on files (what containers write is charged to their cgroups as well).
const VOLUMES_TMPFS: &str = "mode=0755,size=25%,nr_inodes=32768";
/// Most mounts one container may ask for.
const MAX_MOUNTS: usize = 32;
/// Longest destination accepted.
const MAX_PATH: usize = 1024;
/// Top-level directories the agent mounts itself.
const RESERVED: [&str; 3] = ["proc", "dev", "sys"];

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Check `mounts`, make their mount points in `rootfs` and the volumes they
/// bind, and return the operations that mount them, in order.
pub fn prepare(rootfs: &str, mounts: &[Mount]) -> Result<Vec<RootOp>, String> {
    if mounts.len() > MAX_MOUNTS {
        return Err(format!("{} mounts asked for; at most {MAX_MOUNTS}", mounts.len()));
    }
    let mut destinations: Vec<Vec<String>> = Vec::new();
    for mount in mounts {
        let components = destination(&mount.destination)?;
        // The child looks each target up by path after the earlier mounts:
        // one inside another would be looked up in a volume or tmpfs, whose
        // contents (a symbolic link another container planted) are not the
        // image's.
        for other in &destinations {
            if other == &components {
                return Err(format!("mount destination {:?} is given twice", mount.destination));
            }
            if other.starts_with(&components) || components.starts_with(other) {
                return Err(format!(
                    "mount destinations {:?} and /{} nest: mounts inside mounts are not supported",
                    mount.destination,
                    other.join("/")
                ));
            }
        }
        destinations.push(components);
    }
    let mut ops = Vec::new();
    for (mount, components) in mounts.iter().zip(&destinations) {
        let copied = if mount.kind == "bind" && mount.source.starts_with(crate::files::FILES) {
            Some(copied(&mount.source)?)
        } else {
            None
        };
        let target = match &copied {
            Some((_, false)) => file_mount_point(rootfs, components)?,
            _ => mount_point(rootfs, components)?,
        };
        let options = Options::parse(mount)?;
        if copied.is_some() && options.flags & libc::MS_RDONLY == 0 {
            // Only the agent writes there: a container that could would
            // plant links for the agent's next copy or for another bind.
            return Err(format!(
                "a file the host copied in is bound read-only: add \"ro\" to the mount at {}",
                mount.destination
            ));
        }
        let target = cstring(&target)?;
        match mount.kind.as_str() {
            "tmpfs" => {
                if mount.source != "tmpfs" {
                    return Err(format!("a tmpfs mount's source must be \"tmpfs\", not {:?}", mount.source));
                }
                ops.push(RootOp::Mount {
                    source: cstring("tmpfs")?,
                    target,
                    fstype: cstring("tmpfs")?,
                    flags: options.flags,
                    data: cstring(&options.tmpfs_data())?,
                });
            }
            "bind" => {
                let source = match copied {
                    Some((path, _)) => path,
                    None => volume(&mount.source)?,
                };
                ops.push(RootOp::Mount {
                    source: cstring(&source)?,
                    target: target.clone(),
                    fstype: cstring("")?,
                    flags: libc::MS_BIND | if options.recursive { libc::MS_REC } else { 0 },
                    data: cstring("")?,
                });
                // A bind takes its flags only from a remount.
                ops.push(RootOp::Mount {
                    source: cstring("")?,
                    target,
                    fstype: cstring("")?,
                    flags: libc::MS_REMOUNT | libc::MS_BIND | options.flags,
                    data: cstring("")?,
                });
            }
            other => return Err(format!("mount type {other:?} is not supported (tmpfs or bind)")),
        }
    }
    Ok(ops)
}

/// The components of an absolute, normal destination that is not one of
/// the agent's own mounts.
fn destination(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') || path.len() > MAX_PATH || path.contains('\0') {
        return Err(format!("mount destination {path:?} is not an absolute path of at most {MAX_PATH} bytes"));
    }
    let components: Vec<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
    if components.iter().any(|c| c == "." || c == "..") {
        return Err(format!("mount destination {path:?} has . or .. in it"));
    }
    match components.first() {
        None => Err("a mount over the container's root is not allowed".into()),
        Some(top) if RESERVED.contains(&top.as_str()) => {
            Err(format!("mount destination {path:?} is under /{top}, which the agent mounts itself"))
        }
        Some(_) => Ok(components),
    }
}

/// Make the mount point under `rootfs` (directories, 0755), refusing a path
/// through a symbolic link (it could point out of the root) or a file.
fn mount_point(rootfs: &str, components: &[String]) -> Result<String, String> {
    let mut path = rootfs.to_string();
    let mut inside = String::new();
    for component in components {
        path.push('/');
        path.push_str(component);
        inside.push('/');
        inside.push_str(component);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!("mount destination {inside:?} is a symbolic link in the image"));
            }
            Ok(meta) if !meta.is_dir() => return Err(format!("mount destination {inside:?} is not a directory")),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .map_err(|err| format!("cannot make the mount point {inside:?}: {err}"))?;
            }
            Err(err) => return Err(format!("cannot inspect the mount point {inside:?}: {err}")),
        }
    }
    Ok(path)
}

/// The mount point of a file bound over a path of the image: its parent
/// directories as in [`mount_point`], and the file itself a regular file of
/// the image or made empty (0644), never a symbolic link or a directory.
fn file_mount_point(rootfs: &str, components: &[String]) -> Result<String, String> {
    let (last, parents) = components.split_last().ok_or("a file cannot be bound over the root")?;
    let parent = if parents.is_empty() { rootfs.to_string() } else { mount_point(rootfs, parents)? };
    let path = format!("{parent}/{last}");
    let inside = format!("/{}", components.join("/"));
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(format!("mount destination {inside:?} is not a regular file in the image")),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
                .map_err(|err| format!("cannot make the mount point {inside:?}: {err}"))?;
            Ok(path)
        }
        Err(err) => Err(format!("cannot inspect the mount point {inside:?}: {err}")),
    }
}

/// A file or directory the host copied in, as a bind source: its path and
/// whether it is a directory. It must exist (copied before the container
/// is created) and be no symbolic link.
fn copied(source: &str) -> Result<(String, bool), String> {
    let relative = source
        .strip_prefix(crate::files::FILES)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(|| format!("bind source {source:?} is not under {}", crate::files::FILES))?;
    let path = crate::files::guest_path(relative).map_err(|fault| fault.message)?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => Ok((path, false)),
        Ok(meta) if meta.is_dir() => Ok((path, true)),
        Ok(_) => Err(format!("bind source {source:?} is neither a file nor a directory")),
        Err(_) => Err(format!("bind source {source:?} was not copied in (CopyFile first)")),
    }
}

/// The volume directory a bind mount names, made if new: mode 1777, as
/// `/tmp`, so containers of other users can share it but not remove each
/// other's files.
fn volume(source: &str) -> Result<String, String> {
    let name = source
        .strip_prefix(VOLUMES)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|name| volume_name_ok(name))
        .ok_or_else(|| {
            format!("bind source {source:?} is not a volume {VOLUMES}/NAME (NAME: a-z, 0-9, '.', '_', '-', 1 to 63)")
        })?;
    let path = format!("{VOLUMES}/{name}");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(VOLUMES)
        .map_err(|err| format!("cannot make {VOLUMES}: {err}"))?;
    volumes_filesystem()?;
    match std::fs::DirBuilder::new().mode(0o1777).create(&path) {
        Ok(()) => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777))
            .map_err(|err| format!("cannot open up volume {name:?}: {err}")),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(format!("cannot make volume {name:?}: {err}")),
    }?;
    Ok(path)
}

/// Mount the volumes' own tmpfs on [`VOLUMES`] unless it is there already
/// (the directory is then a mount point: another device than its parent).
fn volumes_filesystem() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dev = |path: &str| std::fs::metadata(path).map(|m| m.dev()).map_err(|err| format!("cannot stat {path}: {err}"));
    let parent = VOLUMES.rsplit_once('/').map_or("/", |(parent, _)| parent);
    if dev(VOLUMES)? != dev(parent)? {
        return Ok(());
    }
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    nix::mount::mount(Some("volumes"), VOLUMES, Some("tmpfs"), flags, Some(VOLUMES_TMPFS))
        .map_err(|err| format!("cannot mount the volumes' tmpfs on {VOLUMES}: {err}"))
}

fn volume_name_ok(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !name.starts_with('.')
}

/// The options of one mount, checked against its type.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    flags: u64,
    recursive: bool,
    size: Option<String>,
    mode: Option<u32>,
}

impl Options {
    fn parse(mount: &Mount) -> Result<Self, String> {
        let bind = mount.kind == "bind";
        let mut options = Self { flags: libc::MS_NOSUID | libc::MS_NODEV, recursive: false, size: None, mode: None };
        for option in &mount.options {
            let refuse =
                || format!("mount option {option:?} is not supported for {} at {}", mount.kind, mount.destination);
            match option.as_str() {
                "ro" => options.flags |= libc::MS_RDONLY,
                "noexec" => options.flags |= libc::MS_NOEXEC,
                "rw" | "nosuid" | "nodev" | "exec" => {}
                "bind" if bind => {}
                "rbind" if bind => options.recursive = true,
                _ if !bind && option.starts_with("size=") => {
                    let size = option.trim_start_matches("size=");
                    let digits = size.trim_end_matches(['k', 'm', 'g']);
                    // size=0 would be a tmpfs without a limit.
                    if digits.is_empty()
                        || !digits.bytes().all(|b| b.is_ascii_digit())
                        || digits.bytes().all(|b| b == b'0')
                        || size.len() - digits.len() > 1
                    {
                        return Err(refuse());
                    }
                    options.size = Some(size.to_string());
                }
                _ if !bind && option.starts_with("mode=") => {
                    let mode = u32::from_str_radix(option.trim_start_matches("mode="), 8).map_err(|_| refuse())?;
                    // Permission bits and the sticky bit; no set-id bits.
                    if mode & !0o1777 != 0 {
                        return Err(refuse());
                    }
                    options.mode = Some(mode);
                }
                _ => return Err(refuse()),
            }
        }
        Ok(options)
    }

    fn tmpfs_data(&self) -> String {
        let mut data = Vec::new();
        if let Some(size) = &self.size {
            data.push(format!("size={size}"));
        }
        if let Some(mode) = self.mode {
            data.push(format!("mode={mode:o}"));
        }
        data.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, source: &str, destination: &str, options: &[&str]) -> Mount {
        Mount {
            destination: destination.into(),
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn tmpfs_options_become_flags_and_data() {
        let m = mount("tmpfs", "tmpfs", "/scratch", &["ro", "noexec", "size=1m", "mode=1777"]);
        let options = Options::parse(&m).unwrap();
        assert_eq!(options.flags, libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY | libc::MS_NOEXEC);
        assert_eq!(options.tmpfs_data(), "size=1m,mode=1777");
        assert_eq!(Options::parse(&mount("tmpfs", "tmpfs", "/t", &[])).unwrap().tmpfs_data(), "");
    }

    #[test]
    fn unsafe_or_unknown_options_are_refused() {
        for (kind, option) in [
            ("tmpfs", "suid"),
            ("tmpfs", "dev"),
            ("tmpfs", "mode=4755"),
            ("tmpfs", "mode=9"),
            ("tmpfs", "size="),
            ("tmpfs", "size=1mm"),
            ("tmpfs", "size=-1"),
            ("tmpfs", "size=0"),
            ("tmpfs", "size=00k"),
            ("tmpfs", "rbind"),
            ("bind", "size=1m"),
            ("bind", "mode=0777"),
            ("bind", "shared"),
        ] {
            let err = Options::parse(&mount(kind, "x", "/d", &[option])).unwrap_err();
            assert!(err.contains("is not supported"), "{kind} {option}: {err}");
        }
    }

    #[test]
    fn destinations_must_be_absolute_normal_and_not_the_agents() {
        assert_eq!(destination("/var//lib/data/").unwrap(), ["var", "lib", "data"]);
        for bad in ["relative", "/", "", "/a/../etc", "/a/./b", "/proc/sys", "/dev/shm", "/sys", "/a\0b"] {
            assert!(destination(bad).is_err(), "{bad:?}");
        }
        assert!(destination(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn volume_names_are_checked() {
        for good in ["shared", "a", "data-1.v_2"] {
            assert!(volume_name_ok(good), "{good}");
        }
        for bad in ["", ".hidden", "..", "a/b", "UPPER", "sp ace", &"a".repeat(64)] {
            assert!(!volume_name_ok(bad), "{bad:?}");
        }
        for source in ["/", "/run/parma/volumes", "/run/parma/volumes/", "/run/parma/volumes/a/b", "/etc"] {
            assert!(volume(source).unwrap_err().contains("is not a volume"), "{source}");
        }
    }

    #[test]
    fn mount_points_are_made_and_links_and_files_refused() {
        let root = tempfile::tempdir().unwrap();
        let rootfs = root.path().to_str().unwrap();
        std::fs::create_dir(root.path().join("srv")).unwrap();
        std::os::unix::fs::symlink("/", root.path().join("escape")).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();

        let made = mount_point(rootfs, &["srv".into(), "new".into(), "deeper".into()]).unwrap();
        assert_eq!(made, format!("{rootfs}/srv/new/deeper"));
        assert!(root.path().join("srv/new/deeper").is_dir());

        let err = mount_point(rootfs, &["escape".into(), "etc".into()]).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let err = mount_point(rootfs, &["file".into()]).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        let err = mount_point(rootfs, &["file".into(), "below".into()]).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_tmpfs_becomes_one_mount_and_duplicates_and_other_types_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let rootfs = root.path().to_str().unwrap();
        let ops = prepare(rootfs, &[mount("tmpfs", "tmpfs", "/scratch", &["size=64k"])]).unwrap();
        assert!(
            matches!(&ops[..], [RootOp::Mount { fstype, data, .. }] if fstype.as_bytes() == b"tmpfs" && data.as_bytes() == b"size=64k")
        );
        let twice = [mount("tmpfs", "tmpfs", "/a", &[]), mount("tmpfs", "tmpfs", "/a/", &[])];
        assert!(prepare(rootfs, &twice).unwrap_err().contains("given twice"));
        // Nested either way round: the inner one would be looked up inside the outer.
        for pair in [["/data", "/data/bin"], ["/data/bin", "/data"]] {
            let nested = [mount("tmpfs", "tmpfs", pair[0], &[]), mount("tmpfs", "tmpfs", pair[1], &[])];
            assert!(prepare(rootfs, &nested).unwrap_err().contains("nest"), "{pair:?}");
        }
        // Siblings, even with a common prefix, are fine.
        let siblings = [mount("tmpfs", "tmpfs", "/data", &[]), mount("tmpfs", "tmpfs", "/database", &[])];
        assert_eq!(prepare(rootfs, &siblings).unwrap().len(), 2);
        let err = prepare(rootfs, &[mount("proc", "proc", "/p", &[])]).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = prepare(rootfs, &[mount("tmpfs", "/etc", "/t", &[])]).unwrap_err();
        assert!(err.contains("source must be"), "{err}");
        let many: Vec<Mount> = (0..=MAX_MOUNTS).map(|i| mount("tmpfs", "tmpfs", &format!("/m{i}"), &[])).collect();
        assert!(prepare(rootfs, &many).unwrap_err().contains("at most"));
    }
}
