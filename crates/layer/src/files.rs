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
    let wanted: Vec<String> = wanted.iter().map(|path| normalise(path)).collect();
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
        let changes = scan_layer(&mut tar, &wanted).map_err(read_err)?;
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
    let wanted: Vec<String> = wanted.iter().map(|path| normalise(path)).collect();
    let mut buffered = BufReader::new(blob);
    let compression = sniff(buffered.fill_buf()?);
    let mut decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
    };
    let changes = scan_layer(&mut decoder, &wanted)?;
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

fn scan_layer(tar: &mut impl Read, wanted: &[String]) -> io::Result<LayerFiles> {
    let mut changes = LayerFiles::default();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes();
        let Ok(name) = std::str::from_utf8(&raw) else { continue };
        let path = normalise(name);
        let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        // Only whiteouts that hide a wanted path (or a directory above one)
        // are kept: a layer of a million whiteouts costs nothing here.
        let hides_wanted = |gone: &str| wanted.iter().any(|w| w == gone || under(w, gone));
        if base == ".wh..wh..opq" {
            if hides_wanted(dir) {
                changes.removed.push(dir.to_string());
            }
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let gone = if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
            if hides_wanted(&gone) {
                changes.removed.push(gone);
            }
            continue;
        }
        // A directory or file that replaces a wanted path's parent hides it too.
        if wanted.iter().any(|w| under(w, &path)) && !entry.header().entry_type().is_dir() {
            changes.removed.push(path.clone());
        }
        if !wanted.contains(&path) {
            continue;
        }
        let regular = entry.header().entry_type().is_file() && entry.size() <= MAX_FILE;
        let data = if regular {
            let mut data = Vec::new();
            entry.by_ref().take(MAX_FILE).read_to_end(&mut data)?;
            Some(data)
        } else {
            None
        };
        changes.entries.insert(path.clone(), data);
        changes.removed.push(path);
    }
    Ok(changes)
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
