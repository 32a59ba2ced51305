//! The whole build: plan, one image per layer, config.json, layers.json.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::LayerError;
use crate::convert::{self, TarError};
use crate::digest::{Derived, Digest, HashReader};
use crate::files::Watch;
use crate::hasher::HashingFile;
use crate::image::{self, Plan, PlannedLayer};
use crate::pipe;
use crate::source::Source;

/// Buffer between the file and the decompressor.
const READ_BUFFER: usize = 1 << 20;
/// Buffer in front of the image file.
const WRITE_BUFFER: usize = 1 << 20;
/// Bytes between two [`Progress::Read`] reports.
const REPORT_EVERY: u64 = 8 << 20;

/// What [`build`] reports as it goes, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// Layer `index` (of `count`) starts; `size` is its blob's size in bytes.
    Layer { index: usize, count: usize, diff_id: Digest, size: u64 },
    /// `read` of the layer's `size` blob bytes have been read.
    Read { index: usize, read: u64, size: u64 },
    /// The ext4 image is written; its hash tree is being computed.
    Hashing { index: usize },
    /// The layer's image is in place.
    Done { index: usize, file_size: u64 },
    /// The layer has the same diff-id as an earlier one: its image is reused.
    Reused { index: usize },
}

/// One line of `layers.json`: where a layer's image is and how to open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    /// sha256 of the uncompressed tar, `sha256:<hex>`.
    pub diff_id: Digest,
    /// File name in the output directory: `<diff-id hex>.img`.
    pub file: String,
    /// dm-verity root hash, hex.
    pub root_hash: String,
    /// dm-verity salt, hex.
    pub salt: String,
    /// Always `sha256`.
    pub hash_algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    /// Blocks of ext4 data covered by the tree.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock (the ext4 size):
    /// `veritysetup verify --hash-offset`.
    pub hash_offset: u64,
    /// Size of the whole file: ext4, then the hash area.
    pub file_size: u64,
}

/// `layers.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayersFile {
    /// The chosen manifest's digest (absent for legacy docker save archives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
    /// sha256 of the image config.
    pub config_digest: Digest,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
}

/// `config.json`: what the policy generator needs from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    /// `PORT/PROTOCOL`, sorted.
    pub exposed_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

impl LayersFile {
    /// Read `DIR/layers.json` as [`build`] wrote it. Each layer's `file`
    /// must be a plain name in `DIR`.
    pub fn read(dir: &Path) -> Result<Self, LayerError> {
        let path = dir.join("layers.json");
        let name = path.display().to_string();
        let bytes = fs::read(&path).map_err(|source| LayerError::Input { path: path.clone(), source })?;
        let layers: LayersFile =
            serde_json::from_slice(&bytes).map_err(|source| LayerError::Json { name: name.clone(), source })?;
        if let Some(layer) = layers.layers.iter().find(|l| l.file.is_empty() || l.file.contains('/') || l.file == "..")
        {
            return Err(LayerError::MemberName {
                name: layer.file.clone(),
                reason: "not a plain file name in layers.json",
            });
        }
        Ok(layers)
    }
}

/// What [`build`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub layers: LayersFile,
    pub config: ImageConfig,
    /// `DIR/layers.json`.
    pub layers_json: PathBuf,
    /// `DIR/config.json`.
    pub config_json: PathBuf,
}

/// `parma layer build --oci PATH [--ref NAME] --out DIR`: turn the image at
/// `oci` (an OCI layout directory or a `docker save` archive) into
/// `DIR/<diff-id hex>.img` per layer, `DIR/config.json` and
/// `DIR/layers.json` (see the crate documentation). `out` is created if
/// missing; files are written under temporary names and renamed when
/// complete, `layers.json` last. `progress` is called from this thread.
pub fn build(
    oci: &Path,
    reference: Option<&str>,
    out: &Path,
    progress: &dyn Fn(Progress),
) -> Result<Built, LayerError> {
    let source = Source::open(oci)?;
    let plan = image::plan(&source, reference)?;
    fs::create_dir_all(out).map_err(|source| LayerError::Output { path: out.to_owned(), source })?;

    let count = plan.layers.len();
    let mut records = Vec::with_capacity(count);
    let mut done: HashMap<Digest, LayerRecord> = HashMap::new();
    for (index, layer) in plan.layers.iter().enumerate() {
        if let Some(record) = done.get(&layer.diff_id) {
            progress(Progress::Reused { index });
            records.push(record.clone());
            continue;
        }
        let record = build_layer(&source, layer, index, count, out, progress)?;
        progress(Progress::Done { index, file_size: record.file_size });
        done.insert(layer.diff_id, record.clone());
        records.push(record);
    }

    let config = image_config(&plan);
    let layers =
        LayersFile { manifest_digest: plan.manifest_digest, config_digest: plan.config_digest, layers: records };
    let config_json = out.join("config.json");
    write_json(out, &config_json, &config)?;
    let layers_json = out.join("layers.json");
    write_json(out, &layers_json, &layers)?;
    Ok(Built { layers, config, layers_json, config_json })
}

fn image_config(plan: &Plan) -> ImageConfig {
    let run = plan.config.config().as_ref();
    let list = |v: Option<&Vec<String>>| v.cloned().unwrap_or_default();
    let mut exposed_ports = list(run.and_then(|r| r.exposed_ports().as_ref()));
    exposed_ports.sort();
    exposed_ports.dedup();
    ImageConfig {
        entrypoint: list(run.and_then(|r| r.entrypoint().as_ref())),
        cmd: list(run.and_then(|r| r.cmd().as_ref())),
        env: list(run.and_then(|r| r.env().as_ref())),
        working_dir: run.and_then(|r| r.working_dir().clone()).unwrap_or_default(),
        user: run.and_then(|r| r.user().clone()).unwrap_or_default(),
        labels: run
            .and_then(|r| r.labels().as_ref())
            .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        exposed_ports,
        stop_signal: run.and_then(|r| r.stop_signal().clone()),
    }
}

fn write_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> Result<(), LayerError> {
    let output = |source| LayerError::Output { path: path.to_owned(), source };
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| output(io::Error::other(e)))?;
    text.push(b'\n');
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(output)?;
    tmp.write_all(&text).map_err(output)?;
    publish(tmp, path)
}

/// Give a finished temporary file its final name, readable by all.
fn publish(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), LayerError> {
    let output = |source| LayerError::Output { path: path.to_owned(), source };
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644)).map_err(output)?;
    }
    tmp.persist(path).map_err(|e| output(e.error))?;
    Ok(())
}

/// Compression, told by the stream's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn sniff(start: &[u8]) -> Compression {
    match start {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Turns the count of blob bytes read into [`Progress::Read`] reports.
struct Reporter<'p> {
    index: usize,
    size: u64,
    next_report: u64,
    progress: &'p dyn Fn(Progress),
}

impl Reporter<'_> {
    /// `read` blob bytes have been read: report every [`REPORT_EVERY`]
    /// bytes, and once at the end.
    fn read(&mut self, read: u64) {
        let end = read >= self.size;
        if self.next_report == u64::MAX || (read < self.next_report && !end) {
            return;
        }
        self.next_report = if end { u64::MAX } else { read.saturating_add(REPORT_EVERY) };
        (self.progress)(Progress::Read { index: self.index, read, size: self.size });
    }
}

/// The blob's buffered reader, telling a [`Reporter`] how far it has read.
struct Reporting<'r, 'p, R> {
    inner: BufReader<&'r mut HashReader<R>>,
    reporter: &'r mut Reporter<'p>,
}

impl<R: Read> Read for Reporting<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.reporter.read(consumed(&self.inner));
        Ok(n)
    }
}

/// Read everything left; returns how many bytes there were.
fn drain(reader: &mut impl Read) -> io::Result<u64> {
    io::copy(reader, &mut io::sink())
}

fn build_layer(
    source: &Source,
    layer: &PlannedLayer,
    index: usize,
    count: usize,
    out: &Path,
    progress: &dyn Fn(Progress),
) -> Result<LayerRecord, LayerError> {
    let (member, size) = source.open_member(&layer.member)?;
    convert_layer(member, size, layer, index, count, out, progress, None)
}

/// One layer blob on its own, as a containerd content store holds it:
/// what it must be (its digest and size, and the digest of the tar inside,
/// which names the image and seeds its ext4 and verity identifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// A name for errors (the blob's digest, say).
    pub name: String,
    /// The blob's digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// The uncompressed tar's digest (the image config's diff-id).
    pub diff_id: Digest,
}

/// Convert one layer blob (gzip, zstd or plain tar) read from `reader` into
/// `out/<diff-id hex>.img`, the same bytes [`build`] makes for that layer;
/// its digest, size and diff-id are checked. `watch`, if given, is told
/// what the layer does to its wanted paths in the same pass (a layer that
/// fails to convert leaves it incomplete).
pub fn convert_blob<R: Read + Send>(
    reader: R,
    blob: &Blob,
    out: &Path,
    watch: Option<&mut Watch>,
) -> Result<LayerRecord, LayerError> {
    fs::create_dir_all(out).map_err(|source| LayerError::Output { path: out.to_owned(), source })?;
    let layer = PlannedLayer { member: blob.name.clone(), blob: Some((blob.digest, blob.size)), diff_id: blob.diff_id };
    convert_layer(reader, blob.size, &layer, 0, 1, out, &|_| {}, watch)
}

#[allow(clippy::too_many_arguments)]
fn convert_layer<R: Read + Send>(
    member: R,
    size: u64,
    layer: &PlannedLayer,
    index: usize,
    count: usize,
    out: &Path,
    progress: &dyn Fn(Progress),
    watch: Option<&mut Watch>,
) -> Result<LayerRecord, LayerError> {
    if let Some((digest, expected)) = layer.blob
        && expected != size
    {
        return Err(LayerError::BlobSize { digest, expected, actual: size });
    }
    progress(Progress::Layer { index, count, diff_id: layer.diff_id, size });

    let derived = Derived::new(&layer.diff_id);
    let file_name = format!("{}.img", layer.diff_id.hex());
    let final_path = out.join(&file_name);
    let output = |source| LayerError::Output { path: final_path.clone(), source };
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").suffix(".img").tempfile_in(out).map_err(output)?;
    let options = parma_ext4::Options::new(derived.ext4_uuid, derived.ext4_hash_seed);

    let mut raw = HashReader::new(member, layer.blob.is_some());
    let mut reporter = Reporter { index, size, next_report: 0, progress };
    let read_err = |source| LayerError::Read { name: layer.member.clone(), source };
    // The verity digests of the data blocks are computed on a second thread
    // while the ext4 image is written.
    let params = parma_verity::Params::new(derived.verity_salt.to_vec(), derived.verity_uuid);
    let mut hashing = HashingFile::new(tmp.as_file(), &params).map_err(output)?;
    let converted = convert_stream(&mut raw, &mut reporter, layer.blob.is_some(), options, &mut hashing, watch);
    // Whatever happened, a blob whose digest is wrong is the first thing to say.
    if let Some((digest, _)) = layer.blob {
        if converted.is_err() {
            let _ = drain(&mut raw);
        }
        let actual = raw.digest().unwrap_or(digest);
        if actual != digest && raw.count() == size {
            return Err(LayerError::BlobDigest { digest, actual });
        }
        if converted.is_ok() && raw.count() != size {
            return Err(LayerError::BlobSize { digest, expected: size, actual: raw.count() });
        }
    }
    let (image_size, diff_id, trailing) = converted.map_err(|e| match e {
        StreamError::Tar(source) => LayerError::Layer { index, diff_id: layer.diff_id, source },
        StreamError::Read(source) => read_err(source),
    })?;
    if trailing {
        return Err(LayerError::TrailingData { index });
    }
    let diff_id = diff_id.or_else(|| raw.digest()).unwrap_or(layer.diff_id);
    if diff_id != layer.diff_id {
        return Err(LayerError::DiffId { index, expected: layer.diff_id, actual: diff_id });
    }

    progress(Progress::Hashing { index });
    let leaves = hashing.finish(image_size).map_err(output)?;
    let file = tmp.as_file_mut();
    file.set_len(image_size).map_err(output)?;
    let formatted = parma_verity::format_appended_with_leaves(&params, file, &leaves)
        .map_err(|source| LayerError::Verity { index, source })?;
    let file_size = file.metadata().map_err(output)?.len();
    publish(tmp, &final_path)?;
    Ok(LayerRecord {
        diff_id: layer.diff_id,
        file: file_name,
        root_hash: formatted.root_hash.to_hex(),
        salt: hex::encode(derived.verity_salt),
        hash_algorithm: params.hash.name().to_owned(),
        data_block_size: params.data_block_size,
        hash_block_size: params.hash_block_size,
        data_blocks: formatted.layout.data_blocks(),
        hash_offset: formatted.layout.hash_offset(),
        file_size,
    })
}

enum StreamError {
    Tar(TarError),
    Read(io::Error),
}

/// Decompress, hash and convert one layer blob. Returns the image size, the
/// diff-id unless it is the blob digest `raw` computes (an uncompressed
/// layer whose blob is hashed), and whether bytes followed the compressed
/// stream. A compressed blob is decompressed on a thread of its own
/// ([`pipe`]); the tar reader and the ext4 writer run on this one.
fn convert_stream<R: Read + Send>(
    raw: &mut HashReader<R>,
    reporter: &mut Reporter<'_>,
    raw_hashed: bool,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<(u64, Option<Digest>, bool), StreamError> {
    let mut buffered = BufReader::with_capacity(READ_BUFFER, raw);
    let compression = sniff(buffered.fill_buf().map_err(StreamError::Read)?);
    let decoder_err = |source| StreamError::Tar(TarError::Read { offset: 0, source });
    match compression {
        Compression::None => {
            let blob = Reporting { inner: buffered, reporter };
            // An uncompressed blob's digest is its diff-id: hash it once.
            let (image_size, diff_id) = convert_tar(HashReader::new(blob, !raw_hashed), options, image, watch)?;
            Ok((image_size, diff_id, false))
        }
        Compression::Gzip => {
            let decoder = Gzip(flate2::bufread::MultiGzDecoder::new(buffered));
            convert_piped(decoder, reporter, options, image, watch)
        }
        Compression::Zstd => {
            let decoder = Zstd(zstd::stream::read::Decoder::with_buffer(buffered).map_err(decoder_err)?);
            convert_piped(decoder, reporter, options, image, watch)
        }
    }
}

/// Convert a decompressed tar stream; returns the image size and the
/// stream's digest (if `tar` hashes). The end-of-archive blocks and the
/// padding after them are read too: they count in the diff-id.
fn convert_tar<R: Read>(
    tar: HashReader<R>,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<(u64, Option<Digest>), StreamError> {
    let mut archive = tar::Archive::new(tar);
    let image_size = {
        let sink = BufWriter::with_capacity(WRITE_BUFFER, &mut *image);
        convert::convert(&mut archive, options, sink, watch).map_err(StreamError::Tar)?
    };
    let mut rest = archive.into_inner();
    let offset = rest.count();
    drain(&mut rest).map_err(|source| StreamError::Tar(TarError::Read { offset, source }))?;
    Ok((image_size, rest.digest()))
}

/// [`convert_tar`] with `decoder` on a thread of its own and the diff-id
/// hashed on another.
fn convert_piped<D: BlobDecoder>(
    decoder: D,
    reporter: &mut Reporter<'_>,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<(u64, Option<Digest>, bool), StreamError> {
    let mut consumed = |read| reporter.read(read);
    std::thread::scope(|scope| {
        let (reader, decoding) = pipe::spawn(scope, decoder, &mut consumed).map_err(StreamError::Read)?;
        let converted = convert_tar(HashReader::new(reader, false), options, image, watch);
        let finished = decoding.finish().map_err(StreamError::Read)?;
        let (image_size, _) = converted?;
        // The tar was read to its end, so the stream ended: its digest is
        // the diff-id. What follows the compressed stream?
        let (decoder, diff_id) =
            finished.ok_or_else(|| StreamError::Read(io::Error::other("the decompression stopped early")))?;
        let mut blob = decoder.into_blob();
        let trailing = drain(&mut blob).map_err(StreamError::Read)? > 0;
        // The decoder's last chunk may have come before it read the stream's
        // trailer: the final count, once.
        consumed(D::read_from(&blob));
        Ok((image_size, Some(diff_id), trailing))
    })
}

/// A blob's decompressor for [`pipe`]: the blob reader comes back at the end.
trait BlobDecoder: pipe::Decoder {
    type Blob: BufRead;
    fn into_blob(self) -> Self::Blob;
    /// Blob bytes taken from `blob` so far.
    fn read_from(blob: &Self::Blob) -> u64;
}

struct Gzip<B>(flate2::bufread::MultiGzDecoder<B>);
struct Zstd<'a, B: BufRead>(zstd::stream::read::Decoder<'a, B>);

impl<B: BufRead> Read for Gzip<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<B: BufRead> Read for Zstd<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Send> pipe::Decoder for Gzip<BufReader<&mut HashReader<R>>> {
    fn consumed(&self) -> u64 {
        consumed(self.0.get_ref())
    }
}

impl<R: Read + Send> pipe::Decoder for Zstd<'_, BufReader<&mut HashReader<R>>> {
    fn consumed(&self) -> u64 {
        consumed(self.0.get_ref())
    }
}

/// Blob bytes the decompressor has taken from `blob`'s buffer.
fn consumed<R>(blob: &BufReader<&mut HashReader<R>>) -> u64 {
    blob.get_ref().count().saturating_sub(blob.buffer().len() as u64)
}

impl<'a, R: Read + Send> BlobDecoder for Gzip<BufReader<&'a mut HashReader<R>>> {
    type Blob = BufReader<&'a mut HashReader<R>>;
    fn into_blob(self) -> Self::Blob {
        self.0.into_inner()
    }
    fn read_from(blob: &Self::Blob) -> u64 {
        consumed(blob)
    }
}

impl<'a, R: Read + Send> BlobDecoder for Zstd<'a, BufReader<&'a mut HashReader<R>>> {
    type Blob = BufReader<&'a mut HashReader<R>>;
    fn into_blob(self) -> Self::Blob {
        self.0.finish()
    }
    fn read_from(blob: &Self::Blob) -> u64 {
        consumed(blob)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn progress_comes_every_few_mib_and_once_at_the_end() {
        let seen = RefCell::new(Vec::new());
        let progress = |event: Progress| {
            if let Progress::Read { read, .. } = event {
                seen.borrow_mut().push(read);
            }
        };
        let size = 3 * REPORT_EVERY + 5;
        let mut reporter = Reporter { index: 0, size, next_report: 0, progress: &progress };
        for read in [0, 10, REPORT_EVERY, REPORT_EVERY + 1, 2 * REPORT_EVERY + 7, size, size, size] {
            reporter.read(read);
        }
        assert_eq!(*seen.borrow(), [0, REPORT_EVERY, 2 * REPORT_EVERY + 7, size]);
    }
}
