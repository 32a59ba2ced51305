//! The whole build: plan, one image per layer, config.json, layers.json.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::thread::Scope;

use serde::Serialize;

use crate::LayerError;
use crate::convert::{self, TarError};
use crate::digest::{Derived, Digest, HashReader};
use crate::files::Watch;
use crate::hasher::HashingFile;
use crate::image::{self, Plan, PlannedLayer};
use crate::pipe::{self, Drain, Ended};
use crate::source::Source;

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
    /// [`build_reusing`] found the layer's image from an earlier build.
    Cached { index: usize },
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
    build_with(oci, reference, out, false, progress)
}

/// [`build`], but a layer whose image an earlier build left in `out` (the
/// image and its record `<diff-id hex>.json`, written by a build of this
/// [`IMAGE_FORMAT`], the image's size as recorded and not modified since)
/// is not converted again: for a host that runs the image (`parma run`),
/// whose layers the guest checks against the policy's root hashes anyway,
/// so a wrong image in `out` is refused there, not trusted. Never for
/// computing a policy's root hashes (`build` converts every layer from
/// the image's own, digest-checked, blobs); the `layers.json` it writes
/// carries the cached records, so root hashes for a policy are not taken
/// from it either.
pub fn build_reusing(
    oci: &Path,
    reference: Option<&str>,
    out: &Path,
    progress: &dyn Fn(Progress),
) -> Result<Built, LayerError> {
    build_with(oci, reference, out, true, progress)
}

/// The version of the layer images this crate writes, in each image's
/// record: raise it whenever a layer's image bytes change, so
/// [`build_reusing`] converts again what an older build left.
pub const IMAGE_FORMAT: u32 = 1;

/// `<diff-id hex>.json` beside each image [`build`] writes.
#[derive(Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedRecord {
    format: u32,
    record: LayerRecord,
}

/// The largest image record read back (a record is a few hundred bytes).
const MAX_RECORD: u64 = 64 << 10;

/// The record of `diff_id`'s image in `out`, if an earlier build of this
/// format left both and the image is as it recorded.
fn cached(out: &Path, diff_id: &Digest) -> Option<LayerRecord> {
    let hex = diff_id.hex();
    let record_path = out.join(format!("{hex}.json"));
    let image_path = out.join(format!("{hex}.img"));
    let record_meta = fs::symlink_metadata(&record_path).ok()?;
    let image_meta = fs::symlink_metadata(&image_path).ok()?;
    if !record_meta.is_file() || record_meta.len() > MAX_RECORD || !image_meta.is_file() {
        return None;
    }
    let cached: CachedRecord = serde_json::from_slice(&fs::read(&record_path).ok()?).ok()?;
    let record = cached.record;
    let fits = cached.format == IMAGE_FORMAT
        && record.diff_id == *diff_id
        && record.file == format!("{hex}.img")
        && record.file_size == image_meta.len()
        && image_meta.modified().ok()? <= record_meta.modified().ok()?;
    fits.then_some(record)
}

fn build_with(
    oci: &Path,
    reference: Option<&str>,
    out: &Path,
    reuse: bool,
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
        if let Some(record) = reuse.then(|| cached(out, &layer.diff_id)).flatten() {
            progress(Progress::Cached { index });
            done.insert(layer.diff_id, record.clone());
            records.push(record);
            continue;
        }
        let record = build_layer(&source, layer, index, count, out, progress)?;
        // Its record, after the image: a later build_reusing finds both.
        let cached = CachedRecord { format: IMAGE_FORMAT, record: record.clone() };
        write_json(out, &out.join(format!("{}.json", layer.diff_id.hex())), &cached)?;
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

/// The stream the tar reader reads, telling a [`Reporter`] how far in the
/// blob it has got.
struct Reporting<'r, 'p> {
    inner: pipe::PipeReader,
    reporter: &'r mut Reporter<'p>,
}

impl Read for Reporting<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.reporter.read(self.inner.progress());
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

    let mut reporter = Reporter { index, size, next_report: 0, progress };
    let read_err = |source| LayerError::Read { name: layer.member.clone(), source };
    // The verity digests of the data blocks are computed on a second thread
    // while the ext4 image is written.
    let params = parma_verity::Params::new(derived.verity_salt.to_vec(), derived.verity_uuid);
    let mut hashing = HashingFile::new(tmp.as_file(), &params).map_err(output)?;
    let streamed = convert_stream(member, layer.blob.is_some(), &mut reporter, options, &mut hashing, watch);
    let (converted, read, blob_sum) = match streamed {
        Ok(streamed) => (streamed.converted, streamed.read, streamed.blob),
        Err(err) => (Err(err), 0, None),
    };
    // Whatever happened, a blob whose digest is wrong is the first thing to
    // say (its stage read it to the end, whatever the converter did).
    if let Some((digest, _)) = layer.blob {
        let actual = blob_sum.unwrap_or(digest);
        if actual != digest && read == size {
            return Err(LayerError::BlobDigest { digest, actual });
        }
        if converted.is_ok() && read != size {
            return Err(LayerError::BlobSize { digest, expected: size, actual: read });
        }
    }
    let (image_size, diff_id, trailing) = converted.map_err(|e| match e {
        StreamError::Tar(source) => LayerError::Layer { index, diff_id: layer.diff_id, source },
        StreamError::Read(source) => read_err(source),
    })?;
    if trailing {
        return Err(LayerError::TrailingData { index });
    }
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

/// What reading and converting one blob gave.
struct Streamed {
    /// Blob bytes read: all of them, unless reading failed.
    read: u64,
    /// The sha256 of those bytes, when the blob was hashed.
    blob: Option<Digest>,
    /// The image size, the diff-id, and whether bytes followed the
    /// compressed stream.
    converted: Result<(u64, Digest, bool), StreamError>,
}

/// The blob as its stage reads it, counted.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read + Send> pipe::Source for Counted<R> {
    fn consumed(&self) -> u64 {
        self.count
    }
}

/// The first bytes of `reader` (up to 4, fewer only at its end): enough to
/// tell its compression.
fn first_bytes(reader: &mut impl Read) -> io::Result<([u8; 4], usize)> {
    let mut start = [0u8; 4];
    let mut filled = 0;
    while filled < start.len() {
        match reader.read(start.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok((start, filled))
}

/// Read, hash, decompress and convert one layer blob: the blob is read
/// (and hashed, if `hash_blob` or it is an uncompressed tar, whose digest
/// is the diff-id) on a thread of its own, a compressed one decompressed on
/// another, each sha256 sum computed on one of its own ([`pipe`]); the tar
/// reader and the ext4 writer run on this one. An error here is one that
/// stopped the threads themselves; the conversion's own is in [`Streamed`].
fn convert_stream<R: Read + Send>(
    mut member: R,
    hash_blob: bool,
    reporter: &mut Reporter<'_>,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<Streamed, StreamError> {
    let (start, filled) = first_bytes(&mut member).map_err(StreamError::Read)?;
    let start = start.get(..filled).unwrap_or_default();
    let compression = sniff(start);
    let spawn_err = StreamError::Read;
    std::thread::scope(|scope| {
        let raw = Counted { inner: start.chain(member), count: 0 };
        // A blob being hashed is read to its end whatever the converter does.
        let (blob_hasher, drain) = if hash_blob || compression == Compression::None {
            let (to_hash, hasher) = pipe::hasher(scope, "layer-blob-sha256").map_err(spawn_err)?;
            (Some((to_hash, hasher)), Drain::ToEnd)
        } else {
            (None, Drain::Stop)
        };
        let (to_hash, blob_hasher) = blob_hasher.unzip();
        let (blob, reading) = pipe::stage(scope, "layer-read", raw, to_hash, drain).map_err(spawn_err)?;
        let converted = match compression {
            Compression::None => {
                let tar = Reporting { inner: blob, reporter: &mut *reporter };
                convert_tar(tar, options, image, watch).map(|size| (size, None, false))
            }
            Compression::Gzip => {
                let decoder = Gzip(flate2::bufread::MultiGzDecoder::new(blob));
                convert_piped(scope, decoder, reporter, options, image, watch)
            }
            Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(blob) {
                Ok(decoder) => convert_piped(scope, Zstd(decoder), reporter, options, image, watch),
                Err(source) => Err(StreamError::Tar(TarError::Read { offset: 0, source })),
            },
        };
        let (raw, _) = pipe::join(reading, "blob reading").map_err(spawn_err)?;
        let blob_sum = blob_hasher.map(|hasher| pipe::join(hasher, "blob digest")).transpose().map_err(spawn_err)?;
        reporter.read(raw.count);
        // An uncompressed blob's digest is its diff-id.
        let converted = converted.and_then(|(size, diff_id, trailing)| match diff_id.or(blob_sum) {
            Some(diff_id) => Ok((size, diff_id, trailing)),
            None => Err(StreamError::Read(io::Error::other("the layer's tar was not hashed"))),
        });
        Ok(Streamed { read: raw.count, blob: blob_sum, converted })
    })
}

/// Convert a decompressed tar stream; returns the image size. The
/// end-of-archive blocks and the padding after them are read too: they
/// count in the diff-id.
fn convert_tar<R: Read>(
    tar: R,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<u64, StreamError> {
    let mut archive = tar::Archive::new(HashReader::new(tar, false));
    let image_size = {
        let sink = BufWriter::with_capacity(WRITE_BUFFER, &mut *image);
        convert::convert(&mut archive, options, sink, watch).map_err(StreamError::Tar)?
    };
    let mut rest = archive.into_inner();
    let offset = rest.count();
    drain(&mut rest).map_err(|source| StreamError::Tar(TarError::Read { offset, source }))?;
    Ok(image_size)
}

/// [`convert_tar`] with `decoder` on a thread of its own and its output
/// hashed on another. Returns the image size, the diff-id, and whether
/// bytes followed the compressed stream.
fn convert_piped<'scope, D: BlobDecoder + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    decoder: D,
    reporter: &mut Reporter<'_>,
    options: parma_ext4::Options,
    image: &mut (impl Write + Seek),
    watch: Option<&mut Watch>,
) -> Result<(u64, Option<Digest>, bool), StreamError> {
    let (to_hash, hasher) = pipe::hasher(scope, "layer-diff-id").map_err(StreamError::Read)?;
    let (reader, decoding) =
        pipe::stage(scope, "layer-decompress", decoder, Some(to_hash), Drain::Stop).map_err(StreamError::Read)?;
    let converted = convert_tar(Reporting { inner: reader, reporter }, options, image, watch);
    let (decoder, ended) = pipe::join(decoding, "decompression").map_err(StreamError::Read)?;
    let diff_id = pipe::join(hasher, "diff-id").map_err(StreamError::Read)?;
    let image_size = converted?;
    // The tar was read to its end, so the stream ended. What follows the
    // compressed stream? (The blob's stage is never left waiting on a
    // reader: this one is read to its end or dropped here.)
    let mut blob = decoder.into_blob();
    if ended != Ended::End {
        return Err(StreamError::Read(io::Error::other("the decompression stopped early")));
    }
    let trailing = drain(&mut blob).map_err(StreamError::Read)? > 0;
    Ok((image_size, Some(diff_id), trailing))
}

/// A blob's decompressor for [`pipe`]: the blob's stream comes back at the end.
trait BlobDecoder: pipe::Source {
    fn into_blob(self) -> pipe::PipeReader;
}

struct Gzip(flate2::bufread::MultiGzDecoder<pipe::PipeReader>);
struct Zstd(zstd::stream::read::Decoder<'static, pipe::PipeReader>);

impl Read for Gzip {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Read for Zstd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl pipe::Source for Gzip {
    fn consumed(&self) -> u64 {
        self.0.get_ref().taken()
    }
}

impl pipe::Source for Zstd {
    fn consumed(&self) -> u64 {
        self.0.get_ref().taken()
    }
}

impl BlobDecoder for Gzip {
    fn into_blob(self) -> pipe::PipeReader {
        self.0.into_inner()
    }
}

impl BlobDecoder for Zstd {
    fn into_blob(self) -> pipe::PipeReader {
        self.0.finish()
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
