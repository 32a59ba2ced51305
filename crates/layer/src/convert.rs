//! One layer's tar stream to an ext4 image, entry by entry, as it is read.

use std::collections::HashMap;
use std::io::{self, Read, Seek, Write};

use parma_ext4::{Metadata, Options, Special, Timestamp, Writer, Xattr};

use crate::files::Watch;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const NAME_MAX: usize = 255;
/// A sparse entry may expand beyond this only to 64 times its stored bytes.
const MAX_SPARSE_EXPANSION: u64 = 1 << 30;

/// Why a layer's tar stream was refused. Entries are named as the tar names
/// them (lossily decoded); offsets are bytes into the uncompressed tar, at
/// the entry's header.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TarError {
    /// The stream is corrupt or ends early (a tar header, or the
    /// decompressor under it).
    #[error("corrupt or truncated layer stream near tar offset {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A `..` component anywhere in a path or hard link target.
    #[error("{entry} (tar offset {offset}): '..' is not allowed in a layer")]
    DotDot { entry: String, offset: u64 },
    /// A path component over 255 bytes.
    #[error("{entry} (tar offset {offset}): a name is longer than 255 bytes")]
    NameTooLong { entry: String, offset: u64 },
    /// A path that goes through a symbolic link the layer made.
    #[error("{entry} (tar offset {offset}): goes through the symbolic link {symlink}")]
    ThroughSymlink { entry: String, offset: u64, symlink: String },
    /// A path under something that is not a directory.
    #[error("{entry} (tar offset {offset}): {parent} is not a directory")]
    ParentNotDirectory { entry: String, offset: u64, parent: String },
    /// A path the layer already holds (a whiteout counts as its target name).
    #[error("{entry} (tar offset {offset}): listed twice in the layer")]
    Duplicate { entry: String, offset: u64 },
    /// A hard link to a path that is not earlier in the layer.
    #[error("{entry} (tar offset {offset}): hard link target {target} is not earlier in the layer")]
    LinkTargetMissing { entry: String, offset: u64, target: String },
    /// An entry type this tool does not convert.
    #[error("{entry} (tar offset {offset}): unsupported tar entry type {kind:?}")]
    UnsupportedType { entry: String, offset: u64, kind: char },
    /// A header field that does not parse or is out of range.
    #[error("{entry} (tar offset {offset}): invalid {field}")]
    Field { entry: String, offset: u64, field: &'static str },
    /// Any other refusal.
    #[error("{entry} (tar offset {offset}): {reason}")]
    Invalid { entry: String, offset: u64, reason: &'static str },
    /// The ext4 writer refused the entry (its message names the path).
    #[error("tar offset {offset}")]
    Ext4 {
        offset: u64,
        #[source]
        source: parma_ext4::Error,
    },
    /// The image could not be started or finished.
    #[error("writing the image")]
    Image(#[source] parma_ext4::Error),
}

/// What a path of the layer is, as far as later entries care.
#[derive(Debug)]
enum Seen {
    Dir { meta: Metadata, explicit: bool, opaque: bool },
    Symlink,
    Other,
}

/// Convert a layer's uncompressed tar stream into an ext4 image written to
/// `out`; returns the image size in bytes (a multiple of 4096).
///
/// - Regular files, directories, symlinks, hard links, character and block
///   devices and fifos, with mode, uid, gid, mtime (PAX `mtime` with its
///   fraction) and xattrs (PAX `SCHILY.xattr.*`). Long names and link
///   targets come from PAX or GNU headers. PAX global headers are ignored.
/// - OCI whiteouts: `DIR/.wh.NAME` becomes `DIR/NAME`, a character device
///   0:0 with mode 0 (the whiteout's owner and mtime); `DIR/.wh..wh..opq`
///   sets `trusted.overlay.opaque=y` on `DIR`. Other `.wh..wh.*` names are
///   aufs bookkeeping and are skipped, as containerd does. A tar that
///   carries `trusted.overlay.*` xattrs itself is refused.
/// - Paths: a leading `/`, `./` and `.` components are dropped (`/x` is
///   `x`, as `tar -x` extracts it); `..` anywhere is refused. A missing
///   parent directory is created 0755 0:0 at time 0 and takes the tar's
///   metadata if the tar lists it later.
/// - Refused: a path through a symlink the layer made, a path under a
///   non-directory, a second entry for a path (tar would let the later one
///   win; a layer that needs that is malformed, and the writer streams, so
///   the earlier data is already written), a whiteout for a name the layer
///   also holds, a hard link to anything not earlier in the layer, names
///   over 255 bytes, unsupported entry types, and whatever the ext4 writer
///   refuses.
pub fn tar_to_ext4<R: Read, W: Write + Seek>(tar: R, options: Options, out: W) -> Result<u64, TarError> {
    let mut archive = tar::Archive::new(tar);
    convert(&mut archive, options, out, None)
}

/// [`tar_to_ext4`] on an archive, telling `watch` (if any) what each entry
/// does to its wanted paths.
pub(crate) fn convert<R: Read, W: Write + Seek>(
    archive: &mut tar::Archive<R>,
    options: Options,
    out: W,
    watch: Option<&mut Watch>,
) -> Result<u64, TarError> {
    let writer = Writer::new(out, options).map_err(TarError::Image)?;
    let mut c = Converter { w: writer, seen: HashMap::new(), last_dir: Vec::new(), watch };
    c.seen.insert(Box::default(), Seen::Dir { meta: implicit_dir(), explicit: false, opaque: false });
    let mut next = 0u64;
    let entries = archive.entries().map_err(|source| TarError::Read { offset: 0, source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| TarError::Read { offset: next, source })?;
        let offset = entry.raw_header_position();
        next = entry.raw_file_position().saturating_add(entry.size().div_ceil(512).saturating_mul(512));
        c.entry(&mut entry, offset)?;
    }
    c.w.finish().map_err(TarError::Image)
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn implicit_dir() -> Metadata {
    Metadata::new(0o755, 0, 0)
}

/// The path made relative and canonical: no leading `/`, no `.` or empty
/// components; the root is the empty path.
fn normalize(raw: &[u8], offset: u64) -> Result<Vec<u8>, TarError> {
    let mut out = Vec::with_capacity(raw.len());
    for name in raw.split(|&b| b == b'/') {
        match name {
            b"" | b"." => continue,
            b".." => return Err(TarError::DotDot { entry: show(raw), offset }),
            _ if name.len() > NAME_MAX => return Err(TarError::NameTooLong { entry: show(raw), offset }),
            _ => {}
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(name);
    }
    Ok(out)
}

/// `(parent, last name)`; the root's parent is the root.
fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (path.get(..i).unwrap_or_default(), path.get(i + 1..).unwrap_or_default()),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(parent.len() + 1 + name.len());
    path.extend_from_slice(parent);
    if !parent.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

/// Seconds and nanoseconds of a PAX time: `-?digits(.digits)?`.
fn pax_time(value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let negative = whole.starts_with('-');
    let seconds: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos = 0u32;
    for i in 0..9 {
        let digit = fraction.as_bytes().get(i).map_or(0, |d| u32::from(d - b'0'));
        nanos = nanos * 10 + digit;
    }
    if negative && nanos > 0 {
        // -1.5 is 1.5 s before the epoch: -2 s + 0.5 s.
        return Some(Timestamp::new(seconds.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    Some(Timestamp::new(seconds, nanos))
}

struct Converter<'w, W: Write + Seek> {
    w: Writer<W>,
    seen: HashMap<Box<[u8]>, Seen>,
    /// The last directory [`Converter::ensure_dir`] checked: entries come
    /// grouped by directory, so most checks stop here.
    last_dir: Vec<u8>,
    /// Told what each entry does to a few wanted paths.
    watch: Option<&'w mut Watch>,
}

/// A reader that keeps a copy of what it reads.
struct Tee<'a, R> {
    inner: R,
    copy: &'a mut Vec<u8>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

impl<W: Write + Seek> Converter<'_, W> {
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>, offset: u64) -> Result<(), TarError> {
        let kind = e.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = e.path_bytes().into_owned();
        let path = normalize(&raw, offset)?;
        let meta = metadata(e, &raw, offset)?;
        let ext4 = |source| TarError::Ext4 { offset, source };
        let (parent, name) = split_last(&path);

        if let Some(target) = name.strip_prefix(WHITEOUT) {
            if name == OPAQUE {
                if let Some(watch) = self.watch.as_deref_mut() {
                    watch.whiteout(parent);
                }
                return self.opaque(parent, &raw, offset);
            }
            if target.starts_with(WHITEOUT) {
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(TarError::Invalid { entry: show(&raw), offset, reason: "whiteout of an invalid name" });
            }
            let target = join(parent, target);
            if let Some(watch) = self.watch.as_deref_mut() {
                watch.whiteout(&target);
            }
            self.ensure_dir(parent, &raw, offset)?;
            self.claim(&target, &raw, offset)?;
            let gone = Metadata { mode: 0, xattrs: Vec::new(), ..meta };
            self.w.add_special(&target, &gone, Special::CharDevice { major: 0, minor: 0 }).map_err(ext4)?;
            self.seen.insert(target.into(), Seen::Other);
            return Ok(());
        }

        let watched = self.watch.as_deref_mut().is_some_and(|watch| watch.entry(&path, kind.is_dir()));
        if kind.is_dir() {
            if watched && let Some(watch) = self.watch.as_deref_mut() {
                watch.found(&path, None);
            }
            return self.dir(&path, meta, &raw, offset);
        }
        if path.is_empty() {
            return Err(TarError::Invalid { entry: show(&raw), offset, reason: "the root must be a directory" });
        }
        self.ensure_dir(parent, &raw, offset)?;
        self.claim(&path, &raw, offset)?;
        let seen = if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            let size = e.size();
            // A GNU sparse entry expands its holes to zeros: a few stored
            // bytes could otherwise announce gigabytes of output.
            let stored = e.header().entry_size().unwrap_or(0);
            if kind.is_gnu_sparse() && size > MAX_SPARSE_EXPANSION && size / 64 > stored {
                return Err(TarError::Invalid {
                    entry: show(&raw),
                    offset,
                    reason: "sparse entry expands to over 1 GiB and 64 times its stored size",
                });
            }
            if watched && let Some(watch) = self.watch.as_deref_mut() {
                // A wanted file: its bytes are kept as they go into the image.
                let mut data = Vec::new();
                let keep = Watch::keeps(kind, size);
                if keep {
                    self.w.add_file(&path, &meta, size, &mut Tee { inner: &mut *e, copy: &mut data }).map_err(ext4)?;
                } else {
                    self.w.add_file(&path, &meta, size, &mut *e).map_err(ext4)?;
                }
                watch.found(&path, keep.then_some(data));
            } else {
                self.w.add_file(&path, &meta, size, &mut *e).map_err(ext4)?;
            }
            Seen::Other
        } else if kind.is_symlink() {
            let target = e.link_name_bytes().ok_or_else(|| TarError::Invalid {
                entry: show(&raw),
                offset,
                reason: "symbolic link without a target",
            })?;
            self.w.add_symlink(&path, &meta, &target).map_err(ext4)?;
            Seen::Symlink
        } else if kind.is_hard_link() {
            let target_raw = e.link_name_bytes().unwrap_or_default();
            let target = normalize(&target_raw, offset)?;
            let missing = || TarError::LinkTargetMissing { entry: show(&raw), offset, target: show(&target_raw) };
            let seen = match self.seen.get(target.as_slice()) {
                None => return Err(missing()),
                Some(Seen::Dir { .. }) => {
                    return Err(TarError::Invalid { entry: show(&raw), offset, reason: "hard link to a directory" });
                }
                Some(Seen::Symlink) => Seen::Symlink,
                Some(Seen::Other) => Seen::Other,
            };
            self.w.add_hard_link(&path, &target).map_err(ext4)?;
            seen
        } else if kind.is_character_special() || kind.is_block_special() {
            let field = |field| TarError::Field { entry: show(&raw), offset, field };
            let major = e.header().device_major().map_err(|_| field("device major"))?.unwrap_or(0);
            let minor = e.header().device_minor().map_err(|_| field("device minor"))?.unwrap_or(0);
            let special = if kind.is_character_special() {
                Special::CharDevice { major, minor }
            } else {
                Special::BlockDevice { major, minor }
            };
            self.w.add_special(&path, &meta, special).map_err(ext4)?;
            Seen::Other
        } else if kind.is_fifo() {
            self.w.add_special(&path, &meta, Special::Fifo).map_err(ext4)?;
            Seen::Other
        } else {
            return Err(TarError::UnsupportedType { entry: show(&raw), offset, kind: char::from(kind.as_byte()) });
        };
        if watched
            && !matches!(kind, k if k.is_file() || k.is_contiguous() || k.is_gnu_sparse())
            && let Some(watch) = self.watch.as_deref_mut()
        {
            watch.found(&path, None);
        }
        self.seen.insert(path.into(), seen);
        Ok(())
    }

    /// Refuse a path the layer already holds.
    fn claim(&self, path: &[u8], raw: &[u8], offset: u64) -> Result<(), TarError> {
        if self.seen.contains_key(path) {
            return Err(TarError::Duplicate { entry: show(raw), offset });
        }
        Ok(())
    }

    /// Make `dir` and every directory above it exist, creating missing ones;
    /// refuse symlinks and non-directories on the way.
    fn ensure_dir(&mut self, dir: &[u8], raw: &[u8], offset: u64) -> Result<(), TarError> {
        if dir == self.last_dir.as_slice() {
            return Ok(());
        }
        let ends = dir.iter().enumerate().filter(|&(_, &b)| b == b'/').map(|(i, _)| i).chain([dir.len()]);
        for end in ends {
            let prefix = dir.get(..end).unwrap_or_default();
            match self.seen.get(prefix) {
                Some(Seen::Dir { .. }) => {}
                Some(Seen::Symlink) => {
                    return Err(TarError::ThroughSymlink { entry: show(raw), offset, symlink: show(prefix) });
                }
                Some(Seen::Other) => {
                    return Err(TarError::ParentNotDirectory { entry: show(raw), offset, parent: show(prefix) });
                }
                None => {
                    let meta = implicit_dir();
                    self.w.add_dir(prefix, &meta).map_err(|source| TarError::Ext4 { offset, source })?;
                    self.seen.insert(prefix.into(), Seen::Dir { meta, explicit: false, opaque: false });
                }
            }
        }
        self.last_dir.clear();
        self.last_dir.extend_from_slice(dir);
        Ok(())
    }

    fn dir(&mut self, path: &[u8], meta: Metadata, raw: &[u8], offset: u64) -> Result<(), TarError> {
        let ext4 = |source| TarError::Ext4 { offset, source };
        match self.seen.get_mut(path) {
            Some(Seen::Dir { meta: stored, explicit: explicit @ false, opaque }) => {
                *stored = meta;
                *explicit = true;
                let applied = with_opaque(stored, *opaque);
                self.w.set_metadata(path, &applied).map_err(ext4)
            }
            Some(_) => Err(TarError::Duplicate { entry: show(raw), offset }),
            None => {
                let (parent, _) = split_last(path);
                self.ensure_dir(parent, raw, offset)?;
                self.w.add_dir(path, &meta).map_err(ext4)?;
                self.seen.insert(path.into(), Seen::Dir { meta, explicit: true, opaque: false });
                Ok(())
            }
        }
    }

    fn opaque(&mut self, dir: &[u8], raw: &[u8], offset: u64) -> Result<(), TarError> {
        self.ensure_dir(dir, raw, offset)?;
        let Some(Seen::Dir { meta, opaque, .. }) = self.seen.get_mut(dir) else {
            return Err(TarError::Invalid { entry: show(raw), offset, reason: "opaque marker outside a directory" });
        };
        if *opaque {
            return Err(TarError::Duplicate { entry: show(raw), offset });
        }
        *opaque = true;
        let applied = with_opaque(meta, true);
        self.w.set_metadata(dir, &applied).map_err(|source| TarError::Ext4 { offset, source })
    }
}

fn with_opaque(meta: &Metadata, opaque: bool) -> Metadata {
    let mut applied = meta.clone();
    if opaque {
        applied.xattrs.push(Xattr::new(OPAQUE_XATTR, "y"));
    }
    applied
}

/// Mode, owner, times and xattrs of an entry.
fn metadata<R: Read>(e: &mut tar::Entry<'_, R>, raw: &[u8], offset: u64) -> Result<Metadata, TarError> {
    let field = |field| TarError::Field { entry: show(raw), offset, field };
    let header = e.header();
    let mode = header.mode().map_err(|_| field("mode"))? & 0o7777;
    let uid = header.uid().ok().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| field("uid"))?;
    let gid = header.gid().ok().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| field("gid"))?;
    let seconds = header.mtime().ok().and_then(|v| i64::try_from(v).ok()).ok_or_else(|| field("mtime"))?;
    let mut mtime = Timestamp::new(seconds, 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = e.pax_extensions().map_err(|source| TarError::Read { offset, source })? {
        for ext in pax {
            let ext = ext.map_err(|_| field("PAX record"))?;
            let key = ext.key_bytes();
            if matches!(key, b"size" | b"uid" | b"gid")
                && std::str::from_utf8(ext.value_bytes()).ok().and_then(|v| v.parse::<u64>().ok()).is_none()
            {
                // The tar crate ignores what does not parse; other readers may not.
                return Err(field("PAX size, uid or gid"));
            }
            if key == b"mtime" {
                mtime = pax_time(ext.value_bytes()).ok_or_else(|| field("PAX mtime"))?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.starts_with(b"trusted.overlay.") {
                    return Err(TarError::Invalid {
                        entry: show(raw),
                        offset,
                        reason: "trusted.overlay.* xattrs are not taken from a tar (whiteouts are .wh. entries)",
                    });
                }
                xattrs.push(Xattr::new(name, ext.value_bytes()));
            }
        }
    }
    Ok(Metadata { mode, uid, gid, atime: mtime, mtime, ctime: mtime, xattrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normalize(b"./a//b/./c/", 0).unwrap(), b"a/b/c");
        assert_eq!(normalize(b"/abs", 0).unwrap(), b"abs");
        assert_eq!(normalize(b"./", 0).unwrap(), b"");
        assert!(matches!(normalize(b"a/../b", 0), Err(TarError::DotDot { .. })));
        assert!(matches!(normalize(&[b'x'; 256], 0), Err(TarError::NameTooLong { .. })));
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"1700000000"), Some(Timestamp::new(1_700_000_000, 0)));
        assert_eq!(pax_time(b"1700000000.5"), Some(Timestamp::new(1_700_000_000, 500_000_000)));
        assert_eq!(pax_time(b"1.123456789123"), Some(Timestamp::new(1, 123_456_789)));
        assert_eq!(pax_time(b"-1.5"), Some(Timestamp::new(-2, 500_000_000)));
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.x"), None);
    }
}
