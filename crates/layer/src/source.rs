//! Where the image's files come from: a directory, or a tar archive read in
//! place through an index of member offsets (never unpacked).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Take};
use std::path::{Path, PathBuf};

use crate::LayerError;
use crate::digest::Digest;

/// Symlink and hard link hops followed inside an archive.
const MAX_HOPS: usize = 8;

#[derive(Debug)]
pub(crate) enum Member {
    Data { offset: u64, size: u64 },
    Link(String),
}

#[derive(Debug)]
pub(crate) enum Source {
    Dir(PathBuf),
    Archive { path: PathBuf, members: HashMap<String, Member> },
}

impl Source {
    pub(crate) fn open(path: &Path) -> Result<Self, LayerError> {
        let input = |source| LayerError::Input { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(input)?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_owned()));
        }
        if !meta.is_file() {
            return Err(LayerError::NotAnImage { path: path.to_owned(), reason: "neither a directory nor a file" });
        }
        let archive_err = |source| LayerError::Archive { path: path.to_owned(), source };
        let file = File::open(path).map_err(input)?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(archive_err)? {
            let entry = entry.map_err(archive_err)?;
            let raw = entry.path_bytes();
            let name = member_name(&String::from_utf8_lossy(&raw))?;
            let kind = entry.header().entry_type();
            let member = if kind.is_file() || kind.is_contiguous() {
                Member::Data { offset: entry.raw_file_position(), size: entry.size() }
            } else if kind.is_symlink() || kind.is_hard_link() {
                let target = entry.link_name_bytes().unwrap_or_default();
                let target = String::from_utf8_lossy(&target);
                let target = if kind.is_symlink() && !target.starts_with('/') {
                    // Relative to the link's directory.
                    match name.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target.into_owned(),
                    }
                } else {
                    target.into_owned()
                };
                Member::Link(target)
            } else {
                continue;
            };
            if members.insert(name.clone(), member).is_some() {
                return Err(LayerError::MemberName { name, reason: "listed twice in the archive" });
            }
        }
        if members.is_empty() {
            return Err(LayerError::NotAnImage { path: path.to_owned(), reason: "an empty or non-tar file" });
        }
        Ok(Source::Archive { path: path.to_owned(), members })
    }

    pub(crate) fn describe(&self) -> &Path {
        match self {
            Source::Dir(path) | Source::Archive { path, .. } => path,
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => member_name(name).map(|n| dir.join(n).is_file()).unwrap_or(false),
            Source::Archive { .. } => self.locate(name).ok().flatten().is_some(),
        }
    }

    /// Offset and size of an archive member, links followed.
    fn locate(&self, name: &str) -> Result<Option<(u64, u64)>, LayerError> {
        let Source::Archive { members, .. } = self else { return Ok(None) };
        let mut name = member_name(name)?;
        for _ in 0..MAX_HOPS {
            match members.get(&name) {
                None => return Ok(None),
                Some(Member::Data { offset, size }) => return Ok(Some((*offset, *size))),
                Some(Member::Link(target)) => name = member_name(target)?,
            }
        }
        Err(LayerError::MemberName { name, reason: "too many levels of links" })
    }

    /// Open a file of the image; its reader yields exactly its bytes.
    pub(crate) fn open_member(&self, name: &str) -> Result<(Take<File>, u64), LayerError> {
        let missing = || LayerError::Missing { name: name.to_owned() };
        let read = |source| LayerError::Read { name: name.to_owned(), source };
        match self {
            Source::Dir(dir) => {
                let path = dir.join(member_name(name)?);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => missing(),
                    _ => read(e),
                })?;
                let meta = file.metadata().map_err(read)?;
                if !meta.is_file() {
                    return Err(LayerError::MemberName { name: name.to_owned(), reason: "not a regular file" });
                }
                Ok((file.take(meta.len()), meta.len()))
            }
            Source::Archive { path, .. } => {
                let (offset, size) = self.locate(name)?.ok_or_else(missing)?;
                let mut file = File::open(path).map_err(read)?;
                file.seek(SeekFrom::Start(offset)).map_err(read)?;
                Ok((file.take(size), size))
            }
        }
    }

    /// Read a whole small file, at most `max` bytes.
    pub(crate) fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, LayerError> {
        let (mut reader, size) = self.open_member(name)?;
        if size > max {
            return Err(LayerError::TooLarge { name: name.to_owned(), size, max });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader.read_to_end(&mut bytes).map_err(|source| LayerError::Read { name: name.to_owned(), source })?;
        Ok(bytes)
    }

    /// Read a whole blob of at most `max` bytes, checked against its
    /// descriptor's size and digest before it is returned.
    pub(crate) fn read_blob(&self, digest: &Digest, size: u64, max: u64) -> Result<Vec<u8>, LayerError> {
        let name = blob_name(digest);
        if size > max {
            return Err(LayerError::TooLarge { name, size, max });
        }
        let (_, actual) = self.open_member(&name)?;
        if actual != size {
            return Err(LayerError::BlobSize { digest: *digest, expected: size, actual });
        }
        let bytes = self.read_small(&name, max)?;
        let hashed = Digest::of(&bytes);
        if hashed != *digest {
            return Err(LayerError::BlobDigest { digest: *digest, actual: hashed });
        }
        Ok(bytes)
    }
}

/// Where a blob lives in an OCI layout.
pub(crate) fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// A member name made relative: `./` and leading `/` dropped, `.`
/// components removed, `..` resolved inside the archive (never above it).
fn member_name(name: &str) -> Result<String, LayerError> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(LayerError::MemberName { name: name.to_owned(), reason: "leads outside the image" });
                }
            }
            _ => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(LayerError::MemberName { name: name.to_owned(), reason: "empty name" });
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::member_name;

    #[test]
    fn member_names() {
        assert_eq!(member_name("./a/b").unwrap(), "a/b");
        assert_eq!(member_name("/a//./b/../c").unwrap(), "a/c");
        assert!(member_name("../x").is_err());
        assert!(member_name("a/../../x").is_err());
        assert!(member_name("./").is_err());
    }
}
