//! Small files of an image's final filesystem, read from its layers with
//! their whiteouts applied: the image's `/etc/passwd` and `/etc/group`,
//! through which a `User` given as a name becomes numbers.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use crate::LayerError;
use crate::build::{Compression, sniff};
use crate::digest::HashReader;
use crate::image;
use crate::source::Source;

/// The largest file [`read_files`] returns.
pub const MAX_FILE: u64 = 1 << 20;

/// The contents of the `wanted` paths (absolute, such as `/etc/passwd`) in
/// the filesystem the image's layers stack up to: an upper layer's file
/// replaces a lower one's, and whiteouts (`.wh.NAME`, an opaque
/// `.wh..wh..opq`) remove lower ones. A path that is absent, or not a
/// regular file in the end (a link, a directory), is not in the map. Each
/// layer's tar is checked against its diff-id as it is read.
pub fn read_files(
    oci: &Path,
    reference: Option<&str>,
    wanted: &[&str],
) -> Result<BTreeMap<String, Vec<u8>>, LayerError> {
    let source = Source::open(oci)?;
    let plan = image::plan(&source, reference)?;
    let mut layers = Vec::new();
    for (index, layer) in plan.layers.iter().enumerate() {
        let (member, _) = source.open_member(&layer.member)?;
        let read_err = |source| LayerError::Read { name: layer.member.clone(), source };
        let mut buffered = BufReader::new(member);
        let compression = sniff(buffered.fill_buf().map_err(read_err)?);
        let decoder: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(read_err)?),
        };
        let mut tar = HashReader::new(decoder, true);
        let changes = scan_layer(&mut tar, wanted).map_err(read_err)?;
        io::copy(&mut tar, &mut io::sink()).map_err(read_err)?;
        let actual = tar.digest().unwrap_or(layer.diff_id);
        if actual != layer.diff_id {
            return Err(LayerError::DiffId { index, expected: layer.diff_id, actual });
        }
        layers.push(changes);
    }
    Ok(stack(&layers))
}

/// What one layer blob (gzip, zstd or plain tar) does to the `wanted`
/// paths: [`read_files`] for a layer on its own (the snapshotter's case),
/// to be stacked with [`stack`].
pub fn scan_blob(blob: impl Read, wanted: &[&str]) -> io::Result<LayerFiles> {
    let mut buffered = BufReader::new(blob);
    let compression = sniff(buffered.fill_buf()?);
    let mut decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
    };
    let changes = scan_layer(&mut decoder, wanted)?;
    io::copy(&mut decoder, &mut io::sink())?;
    Ok(changes)
}

/// The wanted files of the filesystem `layers` (base first) stack up to.
pub fn stack(layers: &[LayerFiles]) -> BTreeMap<String, Vec<u8>> {
    let mut found: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for changes in layers {
        // A layer's whiteouts hide what is below it, never its own entries.
        found.retain(|path, _| !changes.removed.iter().any(|gone| path == gone || under(path, gone)));
        found.extend(changes.entries.clone());
    }
    found.into_iter().filter_map(|(path, data)| Some((format!("/{path}"), data?))).collect()
}

/// What one layer does to the wanted paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerFiles {
    /// Paths (and directories) its whiteouts remove from the layers below.
    pub removed: Vec<String>,
    /// Wanted paths it has: their contents, `None` when not a regular file.
    pub entries: BTreeMap<String, Option<Vec<u8>>>,
}

/// Collects what one layer does to a few wanted paths, entry by entry, as
/// the layer is read: by [`scan_blob`] on its own, or by the converter
/// while it writes the image ([`crate::convert_blob`]), so that a layer
/// is decompressed once for both.
#[derive(Debug, Clone)]
pub struct Watch {
    wanted: Vec<String>,
    files: LayerFiles,
}

impl Watch {
    /// Watch for `wanted` (absolute paths such as `/etc/passwd`).
    pub fn new(wanted: &[&str]) -> Self {
        Self { wanted: wanted.iter().map(|path| normalise(path)).collect(), files: LayerFiles::default() }
    }

    /// What the layer did to the wanted paths.
    pub fn into_files(self) -> LayerFiles {
        self.files
    }

    /// A whiteout of `gone` (a relative, normalised path; the directory of
    /// an opaque marker). Only whiteouts that hide a wanted path (or a
    /// directory above one) are kept: a layer of a million whiteouts costs
    /// nothing here.
    pub(crate) fn whiteout(&mut self, gone: &[u8]) {
        let Ok(gone) = std::str::from_utf8(gone) else { return };
        if self.wanted.iter().any(|w| w == gone || under(w, gone)) {
            self.files.removed.push(gone.to_string());
        }
    }

    /// Any other entry at `path` (relative, normalised). Returns whether it
    /// is a wanted path whose contents [`Watch::found`] must then be told.
    pub(crate) fn entry(&mut self, path: &[u8], is_dir: bool) -> bool {
        let Ok(path) = std::str::from_utf8(path) else { return false };
        // A file that replaces a wanted path's parent hides it too.
        if !is_dir && self.wanted.iter().any(|w| under(w, path)) {
            self.files.removed.push(path.to_string());
        }
        self.wanted.iter().any(|w| w == path)
    }

    /// The contents of a wanted `path` (`None`: not a regular file, or
    /// over [`MAX_FILE`]).
    pub(crate) fn found(&mut self, path: &[u8], data: Option<Vec<u8>>) {
        let Ok(path) = std::str::from_utf8(path) else { return };
        self.files.entries.insert(path.to_string(), data);
        self.files.removed.push(path.to_string());
    }

    /// Whether a wanted entry of this type and size is kept with its bytes.
    pub(crate) fn keeps(kind: tar::EntryType, size: u64) -> bool {
        kind.is_file() && size <= MAX_FILE
    }
}

fn scan_layer(tar: &mut impl Read, wanted: &[&str]) -> io::Result<LayerFiles> {
    let mut watch = Watch::new(wanted);
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        // As the converter: a PAX global header is no file.
        if entry.header().entry_type().is_pax_global_extensions() {
            continue;
        }
        let raw = entry.path_bytes();
        let Ok(name) = std::str::from_utf8(&raw) else { continue };
        let path = normalise(name);
        let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        if base == ".wh..wh..opq" {
            watch.whiteout(dir.as_bytes());
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let gone = if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
            watch.whiteout(gone.as_bytes());
            continue;
        }
        let kind = entry.header().entry_type();
        if !watch.entry(path.as_bytes(), kind.is_dir()) {
            continue;
        }
        let data = if Watch::keeps(kind, entry.size()) {
            let mut data = Vec::new();
            entry.by_ref().take(MAX_FILE).read_to_end(&mut data)?;
            Some(data)
        } else {
            None
        };
        watch.found(path.as_bytes(), data);
    }
    Ok(watch.into_files())
}

/// A tar member name or an absolute path as `etc/passwd`.
fn normalise(path: &str) -> String {
    path.split('/').filter(|part| !part.is_empty() && *part != ".").collect::<Vec<_>>().join("/")
}

/// Whether `path` is strictly below directory `dir` (`""` is the root).
fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normalise("./etc/passwd"), "etc/passwd");
        assert_eq!(normalise("/etc//passwd"), "etc/passwd");
        assert!(under("etc/passwd", "etc"));
        assert!(under("etc/passwd", ""));
        assert!(!under("etc/passwd", "et"));
        assert!(!under("etc", "etc"));
    }
}
