//! `make bench`: `parma layer build` on a generated layer against the host
//! tools doing the same job (`tar -x` + `mkfs.ext4 -d` + `veritysetup
//! format`), dm-verity hashing throughput against plain sha256 of the same
//! library, and the build's peak memory, all measured in one run. Writes
//! `out/bench/layer.json`.
//!
//! The layer is generated from a fixed seed (no clock): about 20,000 files
//! of 1-16 KiB in nested directories, 100 of 256 KiB, 3 of 40 MiB, symlinks
//! (short and long targets) and hard links, over 300 MB of uncompressed
//! tar, wrapped as an OCI layout with one uncompressed layer. The content
//! is made to compress and inflate as a distribution's does ([`Content`]):
//! most small files text-like (scripts, configuration, documentation), the
//! rest of the small files, the medium ones and two large ones code-like
//! (programs, libraries), one large file random (compressed data). With
//! gzip -6 the layer compresses about 2.6 to 1 and inflates at about the
//! speed this machine's own /usr does (/usr/share: 2.4 to 1, /usr/lib and
//! /usr/bin: 2.9 to 1, 530-610 MB/s with zlib-rs). An earlier generator,
//! a 32-word vocabulary and two random large files, inflated almost twice
//! as fast as real layers, which made every other step look slower. Both sides run
//! `RUNS` times, interleaved so a noisy machine hurts both alike; figures
//! are medians. Each build runs in a child process (this binary, re-executed
//! with `--child-build`) that reports its wall time and `VmHWM`.
//!
//! The compressed case: the same layer gzip'd (flate2, level 6) and zstd'd
//! (level 3), each built `RUNS` times interleaved with its decompression
//! alone (the same decoder the build links, flate2's zlib-rs backend and
//! libzstd, into a sink): the floor, and the build's ratio to it; and with
//! writing the image's bytes alone to a new file (the other floor: on a
//! virtual machine filling fresh page-cache pages can cost as much as
//! decompressing), and the ratio to the slower of the two. The root hashes
//! must equal the uncompressed build's.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use parma_tests::{Paths, median_secs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest as _;

const RUNS: usize = 3;
const SEED: u64 = 0x7061_726d_612d_6c79;
const SMALL_FILES: usize = 20_000;
const MEDIUM_FILES: usize = 100;
const MEDIUM_SIZE: usize = 256 << 10;
const LARGE_FILES: usize = 3;
const LARGE_SIZE: usize = 40 << 20;
const SYMLINKS: usize = 1_000;
const HARD_LINKS: usize = 1_000;
/// Leaf directories: `dAA/sBB/tCC`.
const TOP: usize = 20;
const MID: usize = 10;
const LEAF: usize = 10;
const MTIME: u64 = 1_700_000_000;
const CHILD_FLAG: &str = "--child-build";
const MB: f64 = 1e6;

/// splitmix64: fixed output for a fixed seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Random bytes (compressed data: archives, images).
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(v.get(..chunk.len()).unwrap_or(&[]));
        }
    }
}

/// Words of the text-like content.
const WORDS: usize = 5_000;
/// Short byte sequences ("instructions") of the code-like content.
const OPS: usize = 1_024;
/// Longest run code-like content repeats from its last 4 KiB.
const REPEAT: usize = 46;

/// A table from a 16-bit random value to an index in `0..n`, the indices
/// drawn with Zipf frequencies (exponent `s`): a few items are common, most
/// are rare, as words in text and instructions in code.
fn zipf_table(n: usize, s: f64) -> Vec<u16> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut table = Vec::with_capacity(1 << 16);
    let mut cumulative = 0.0;
    for (index, weight) in weights.iter().enumerate() {
        cumulative += weight / total;
        let upto = ((cumulative * 65536.0).round() as usize).min(1 << 16);
        table.resize(upto.max(table.len()), index as u16);
    }
    table.resize(1 << 16, (n - 1) as u16);
    table
}

/// Content that compresses (and inflates) as a distribution's files do.
/// Text: words of a 5,000-word vocabulary made of syllables, drawn with
/// Zipf frequencies, with numbers, punctuation, indentation and line
/// breaks (gzip -6: about 3.1 to 1, inflating at the speed of a real
/// /usr/share). Code: a 1,024-entry table of 1-6 byte sequences drawn with
/// Zipf frequencies, 32-bit immediates (some random, some small), runs of
/// zeros, and runs repeated from the last 4 KiB (gzip -6: about 3 to 1,
/// inflating about as fast as real /usr/lib and /usr/bin: checked here
/// against this machine's own: 2.9 to 1).
struct Content {
    rng: Rng,
    words: Vec<Vec<u8>>,
    word_table: Vec<u16>,
    ops: Vec<Vec<u8>>,
    op_table: Vec<u16>,
}

impl Content {
    fn new(mut rng: Rng) -> Self {
        const SYLLABLES: [&[u8]; 24] = [
            b"ka", b"to", b"ri", b"en", b"an", b"er", b"in", b"on", b"st", b"re", b"de", b"co", b"mi", b"la", b"se",
            b"pa", b"ti", b"ne", b"or", b"al", b"ve", b"us", b"ma", b"ex",
        ];
        let words = (0..WORDS)
            .map(|_| {
                let count = 1 + rng.below(4);
                (0..count)
                    .flat_map(|_| SYLLABLES.get(rng.below(SYLLABLES.len())).copied().unwrap_or(b"x"))
                    .copied()
                    .collect()
            })
            .collect();
        let ops = (0..OPS)
            .map(|_| {
                let count = 1 + rng.below(6);
                (0..count).map(|_| rng.next() as u8).collect()
            })
            .collect();
        Content { rng, words, word_table: zipf_table(WORDS, 1.0), ops, op_table: zipf_table(OPS, 1.2) }
    }

    /// Random bytes.
    fn fill_random(&mut self, buf: &mut [u8]) {
        self.rng.fill(buf);
    }

    /// Text-like bytes: scripts, configuration, documentation.
    fn fill_text(&mut self, buf: &mut Vec<u8>, len: usize) {
        buf.clear();
        while buf.len() < len {
            let r = self.rng.next();
            match r % 20 {
                0 => {
                    buf.push(b'\n');
                    if r & 0x100 != 0 {
                        buf.extend_from_slice(b"    ");
                    }
                }
                1 => buf.extend_from_slice(format!("{} ", (r >> 16) % 10_000).as_bytes()),
                2 => buf.extend_from_slice(b", "),
                _ => {
                    let index = self.word_table.get((r >> 16) as u16 as usize).copied().unwrap_or(0);
                    buf.extend_from_slice(self.words.get(usize::from(index)).map_or(&b"x"[..], Vec::as_slice));
                    buf.push(b' ');
                }
            }
        }
        buf.truncate(len);
    }

    /// Code-like bytes: executables and libraries.
    fn fill_code(&mut self, buf: &mut Vec<u8>, len: usize) {
        buf.clear();
        while buf.len() < len {
            let r = self.rng.next();
            match r % 32 {
                0 => buf.extend_from_slice(&((r >> 32) as u32).to_le_bytes()),
                1 | 2 => buf.extend_from_slice(&(((r >> 32) % 4096) as u32).to_le_bytes()),
                3 if r & 0xf000 == 0 => buf.resize(buf.len() + (r >> 20) as usize % 64, 0),
                4..=6 if buf.len() > 4096 => {
                    let back = 16 + (r >> 16) as usize % 4000;
                    let from = buf.len() - back;
                    for i in 0..6 + (r >> 40) as usize % (REPEAT - 6) {
                        let byte = buf.get(from + i).copied().unwrap_or(0);
                        buf.push(byte);
                    }
                }
                _ => {
                    let index = self.op_table.get((r >> 16) as u16 as usize).copied().unwrap_or(0);
                    buf.extend_from_slice(self.ops.get(usize::from(index)).map_or(&[0u8][..], Vec::as_slice));
                }
            }
        }
        buf.truncate(len);
    }
}

/// Hashes (the diff-id) and counts what is written through it.
struct HashWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or(&[]));
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Debug, Default, Serialize)]
struct LayerStats {
    tar_bytes: u64,
    diff_id: String,
    entries: usize,
    directories: usize,
    files: usize,
    symlinks: usize,
    hard_links: usize,
    file_bytes: u64,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

fn dir<W: Write>(tar: &mut tar::Builder<W>, stats: &mut LayerStats, name: &str) -> anyhow::Result<()> {
    tar.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), name, std::io::empty())?;
    stats.directories += 1;
    Ok(())
}

/// Write the generated layer to `path`; returns its statistics.
fn generate(path: &Path) -> anyhow::Result<LayerStats> {
    let mut rng = Rng(SEED);
    let mut content = Content::new(Rng(SEED ^ 0x636f_6e74_656e_7473));
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let sink = HashWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: sha2::Sha256::new(), count: 0 };
    let mut tar = tar::Builder::new(sink);
    let mut stats = LayerStats::default();
    let mut buf = Vec::with_capacity(LARGE_SIZE + REPEAT + 64);
    let mut small_paths = Vec::with_capacity(SMALL_FILES);

    let leaves = TOP * MID * LEAF;
    for leaf in 0..leaves {
        let (a, b, c) = (leaf / (MID * LEAF), leaf / LEAF % MID, leaf % LEAF);
        if b == 0 && c == 0 {
            dir(&mut tar, &mut stats, &format!("d{a:02}"))?;
        }
        if c == 0 {
            dir(&mut tar, &mut stats, &format!("d{a:02}/s{b:02}"))?;
        }
        let parent = format!("d{a:02}/s{b:02}/t{c:02}");
        dir(&mut tar, &mut stats, &parent)?;
        // Files `leaf`, `leaf + leaves`, ... live here.
        for index in (leaf..SMALL_FILES).step_by(leaves) {
            let size = 1024 + rng.below(15 * 1024 + 1);
            // Scripts, configuration and documentation; some small programs.
            if rng.below(10) < 7 {
                content.fill_text(&mut buf, size);
            } else {
                content.fill_code(&mut buf, size);
            }
            let data = buf.as_slice();
            let name = format!("{parent}/f{index:05}.dat");
            let mode = if rng.below(8) == 0 { 0o755 } else { 0o644 };
            tar.append_data(&mut header(tar::EntryType::Regular, mode, size as u64), &name, data)?;
            stats.files += 1;
            stats.file_bytes += size as u64;
            small_paths.push(name);
        }
    }
    for (top, count, size) in [("medium", MEDIUM_FILES, MEDIUM_SIZE), ("large", LARGE_FILES, LARGE_SIZE)] {
        dir(&mut tar, &mut stats, top)?;
        for i in 0..count {
            // Libraries and programs; the last large file is compressed data.
            if top == "large" && i + 1 == count {
                buf.resize(size, 0);
                content.fill_random(&mut buf);
            } else {
                content.fill_code(&mut buf, size);
            }
            let data = buf.as_slice();
            tar.append_data(
                &mut header(tar::EntryType::Regular, 0o644, size as u64),
                format!("{top}/b{i:03}.bin"),
                data,
            )?;
            stats.files += 1;
            stats.file_bytes += size as u64;
        }
    }
    dir(&mut tar, &mut stats, "links")?;
    for i in 0..SYMLINKS {
        let target = &small_paths[rng.below(small_paths.len())];
        // Half relative (fast symlinks, in the inode), half long (a data
        // block, and over 100 bytes: a GNU long link header).
        let target = if i % 2 == 0 {
            format!("../{target}")
        } else {
            format!("/opt/a-rather-long-installation-prefix/with/several/levels/of/directories/{target}")
        };
        tar.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), format!("links/l{i:04}"), &target)?;
        stats.symlinks += 1;
    }
    dir(&mut tar, &mut stats, "hard")?;
    for i in 0..HARD_LINKS {
        let target = &small_paths[rng.below(small_paths.len())];
        tar.append_link(&mut header(tar::EntryType::Link, 0o644, 0), format!("hard/h{i:04}"), target)?;
        stats.hard_links += 1;
    }
    let mut sink = tar.into_inner()?;
    sink.flush()?;
    stats.entries = stats.directories + stats.files + stats.symlinks + stats.hard_links;
    stats.tar_bytes = sink.count;
    stats.diff_id = format!("sha256:{}", hex::encode(sink.hasher.finalize()));
    sink.inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(stats)
}

/// Wrap the tar at `tar` as an OCI layout at `dir` (uncompressed layer,
/// moved into the layout); returns the layer blob's path.
fn oci_layout(dir: &Path, tar: &Path, stats: &LayerStats) -> anyhow::Result<PathBuf> {
    let layer_path = dir.join("blobs/sha256").join(stats.diff_id.trim_start_matches("sha256:"));
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::rename(tar, &layer_path)?;
    let layer = json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": stats.diff_id, "size": stats.tar_bytes});
    write_layout(dir, stats, layer)?;
    Ok(layer_path)
}

/// The config, manifest, `oci-layout` and `index.json` of a one-layer image
/// whose layer blob (described by `layer`) is already in `dir`.
fn write_layout(dir: &Path, stats: &LayerStats, layer: serde_json::Value) -> anyhow::Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8], media_type: &str| -> anyhow::Result<serde_json::Value> {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        fs::write(blobs.join(&hex), bytes)?;
        Ok(json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()}))
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [stats.diff_id]},
    }))?;
    let config_desc = put(&config, "application/vnd.oci.image.config.v1+json")?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer],
    }))?;
    let manifest_desc = put(&manifest, "application/vnd.oci.image.manifest.v1+json")?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [manifest_desc]}))?)?;
    Ok(())
}

/// How the compressed case compresses the layer.
#[derive(Debug, Clone, Copy)]
enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Compress `tar` into `out`.
    fn compress(self, tar: &Path, out: &Path) -> anyhow::Result<()> {
        let mut input = std::io::BufReader::with_capacity(1 << 20, File::open(tar)?);
        let output = BufWriter::with_capacity(1 << 20, File::create(out)?);
        match self {
            Compression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::new(6));
                std::io::copy(&mut input, &mut encoder)?;
                encoder.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(output, 3)?;
                std::io::copy(&mut input, &mut encoder)?;
                encoder.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Decompress `blob` into a sink, as the build's decoder does; the tar's length.
    fn decompress(self, blob: &Path) -> anyhow::Result<u64> {
        let input = std::io::BufReader::with_capacity(1 << 20, File::open(blob)?);
        Ok(match self {
            Compression::Gzip => std::io::copy(&mut flate2::bufread::MultiGzDecoder::new(input), &mut std::io::sink())?,
            Compression::Zstd => {
                std::io::copy(&mut zstd::stream::read::Decoder::with_buffer(input)?, &mut std::io::sink())?
            }
        })
    }
}

/// The layout of `tar` compressed as `kind`, at `dir`; returns the blob.
fn compressed_layout(dir: &Path, tar: &Path, stats: &LayerStats, kind: Compression) -> anyhow::Result<PathBuf> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let staged = dir.join("layer.blob");
    kind.compress(tar, &staged)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut File::open(&staged)?, &mut hasher)?;
    let blob_hex = hex::encode(hasher.finalize());
    let blob = blobs.join(&blob_hex);
    fs::rename(&staged, &blob)?;
    let size = fs::metadata(&blob)?.len();
    write_layout(
        dir,
        stats,
        json!({"mediaType": kind.media_type(), "digest": format!("sha256:{blob_hex}"), "size": size}),
    )?;
    Ok(blob)
}

/// The compressed case for one compression: builds and decompressions alone, interleaved.
fn compressed_case(
    scratch: &Path,
    tar: &Path,
    stats: &LayerStats,
    kind: Compression,
    root_hash: &str,
) -> anyhow::Result<serde_json::Value> {
    let dir = scratch.join(format!("oci-{}", kind.name()));
    let blob = compressed_layout(&dir, tar, stats, kind)?;
    let blob_bytes = fs::metadata(&blob)?.len();
    let (mut builds, mut floors, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        settle()?;
        let out = scratch.join(format!("parma-{}-{i}", kind.name()));
        let report = parma_run(&dir, &out)?;
        ensure!(
            report.root_hash == root_hash,
            "{}: root hash {} differs from {root_hash}",
            kind.name(),
            report.root_hash
        );
        fs::remove_dir_all(&out)?;
        let started = Instant::now();
        let tar_bytes = kind.decompress(&blob)?;
        floors.push(started.elapsed());
        ensure!(tar_bytes == stats.tar_bytes, "{} decompressed to {tar_bytes} bytes", kind.name());
        settle()?;
        writes.push(write_alone(&scratch.join(format!("write-{}-{i}", kind.name())), report.file_size)?);
        builds.push(Duration::from_secs_f64(report.secs));
        eprintln!(
            "{} run {}/{RUNS}: parma {:.3} s ({} MiB peak), decompression alone {:.3} s, writing alone {:.3} s",
            kind.name(),
            i + 1,
            report.secs,
            report.vm_hwm_kib / 1024,
            floors.last().map_or(0.0, Duration::as_secs_f64),
            writes.last().map_or(0.0, Duration::as_secs_f64)
        );
    }
    let (build, floor, write) = (median_secs(&builds), median_secs(&floors), median_secs(&writes));
    let fastest = |samples: &[Duration]| samples.iter().min().map_or(f64::NAN, Duration::as_secs_f64);
    Ok(json!({
        "blob_bytes": blob_bytes,
        "compression_ratio": stats.tar_bytes as f64 / blob_bytes as f64,
        "build_median_s": build,
        "build_samples_s": builds.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "decompress_median_s": floor,
        "decompress_samples_s": floors.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "decompress_mb_per_s": stats.tar_bytes as f64 / MB / floor,
        "ratio_to_decompression": build / floor,
        "write_median_s": write,
        "write_samples_s": writes.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "ratio_to_slower_floor": build / floor.max(write),
        // Noise only slows a run down: the fastest build against the fastest
        // decompression is the steadier figure where the page cache is noisy.
        "ratio_fastest_to_decompression": fastest(&builds) / fastest(&floors),
    }))
}

/// The other floor of a conversion: writing an image's worth of bytes to a
/// new file beside the build's output, as the build writes it (1 MiB
/// writes, no fsync), then removing it. On a virtual machine, filling new
/// page-cache pages can cost as much as decompressing.
fn write_alone(path: &Path, bytes: u64) -> anyhow::Result<Duration> {
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut file = File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64))?;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    drop(file);
    let took = started.elapsed();
    fs::remove_file(path)?;
    Ok(took)
}

/// What a `--child-build` process reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    secs: f64,
    vm_hwm_kib: u64,
    root_hash: String,
    file: String,
    salt: String,
    hash_offset: u64,
    file_size: u64,
}

fn vm_hwm_kib() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM in /proc/self/status")?;
    Ok(line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse()?)
}

/// The child: one `parma_layer::build`, timed, then its peak resident memory.
fn child(oci: &Path, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let built = parma_layer::build(oci, None, out, &|_| {})?;
    let secs = started.elapsed().as_secs_f64();
    let layer = built.layers.layers.first().context("no layer built")?;
    let report = ChildReport {
        secs,
        vm_hwm_kib: vm_hwm_kib()?,
        root_hash: layer.root_hash.clone(),
        file: layer.file.clone(),
        salt: layer.salt.clone(),
        hash_offset: layer.hash_offset,
        file_size: layer.file_size,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn parma_run(oci: &Path, out: &Path) -> anyhow::Result<ChildReport> {
    let output = Command::new(std::env::current_exe()?)
        .arg(CHILD_FLAG)
        .arg(oci)
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
        .context("starting the build child")?;
    ensure!(output.status.success(), "the build child failed: {}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().context("the build child printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found (the project's scripts install e2fsprogs and cryptsetup-bin)"))
}

fn run_tool(command: &mut Command) -> anyhow::Result<()> {
    let output = command.stdout(Stdio::null()).output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// `tar -x` + `mkfs.ext4 -d` + `veritysetup format`, timed as a whole;
/// returns the time of each of the three steps. What it makes stays in
/// `work` until the end of the benchmark: deleting tens of thousands of
/// files while the next run is timed slows that run down (several times
/// over for `tar -x` on a virtual disk with online discard).
fn baseline_run(tar: &Path, work: &Path, size_mib: u64) -> anyhow::Result<[Duration; 3]> {
    let dir = work.join("tree");
    let img = work.join("base.img");
    let hash = work.join("base.hash");
    fs::create_dir_all(&dir)?;
    let started = Instant::now();
    run_tool(Command::new(tool("tar")?).arg("-xf").arg(tar).arg("-C").arg(&dir))?;
    let extracted = started.elapsed();
    run_tool(
        Command::new(tool("mkfs.ext4")?)
            .args(["-q", "-d"])
            .arg(&dir)
            .args(["-b", "4096", "-O", "^has_journal"])
            .arg(&img)
            .arg(format!("{size_mib}M")),
    )?;
    let made = started.elapsed();
    run_tool(Command::new(tool("veritysetup")?).arg("format").arg(&img).arg(&hash))?;
    let hashed = started.elapsed();
    Ok([extracted, made - extracted, hashed - made])
}

/// Write back what earlier steps left dirty, so that no timed run pays for
/// another's writes (untimed).
fn settle() -> anyhow::Result<()> {
    run_tool(&mut Command::new(tool("sync")?))
}

/// Where the scratch directory goes: the system temporary directory unless
/// it is a tmpfs (the benchmark writes over a gigabyte), then `out/bench`.
fn scratch_base(repo: &Path) -> anyhow::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let fstype = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            tmp.starts_with(point).then_some((point.len(), fstype))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fstype)| fstype);
    if fstype == Some("tmpfs") {
        let dir = repo.join("out/bench");
        fs::create_dir_all(&dir)?;
        return Ok(dir);
    }
    Ok(tmp)
}

#[derive(Serialize)]
struct Side {
    median_s: f64,
    samples_s: Vec<f64>,
    tar_mb_per_s: f64,
}

fn side(samples: &[Duration], tar_bytes: u64) -> Side {
    let median_s = median_secs(samples);
    Side {
        median_s,
        samples_s: samples.iter().map(Duration::as_secs_f64).collect(),
        tar_mb_per_s: tar_bytes as f64 / MB / median_s,
    }
}

/// Time `f` `RUNS` times.
fn timed<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(Vec<Duration>, T)> {
    let mut samples = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let started = Instant::now();
        last = Some(f()?);
        samples.push(started.elapsed());
    }
    Ok((samples, last.context("no runs")?))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == CHILD_FLAG) {
        let (Some(oci), Some(out)) = (args.get(2), args.get(3)) else { bail!("usage: {CHILD_FLAG} OCI OUT") };
        return child(Path::new(oci), Path::new(out));
    }

    let paths = Paths::get();
    let scratch = tempfile::Builder::new().prefix("parma-bench-layer-").tempdir_in(scratch_base(&paths.repo)?)?;
    let started = Instant::now();
    let stats = generate(&scratch.path().join("layer.tar"))?;
    let generate_s = started.elapsed().as_secs_f64();
    let oci = scratch.path().join("oci");
    let tar = oci_layout(&oci, &scratch.path().join("layer.tar"), &stats)?;
    eprintln!(
        "generated {:.1} MB of tar, {} entries in {generate_s:.1} s under {}",
        stats.tar_bytes as f64 / MB,
        stats.entries,
        scratch.path().display()
    );
    let size_mib = (stats.tar_bytes * 3 / 2).div_ceil(1 << 20);

    let mut parma_samples = Vec::new();
    let mut base_samples = Vec::new();
    let mut base_steps: Vec<[Duration; 3]> = Vec::new();
    let mut reports: Vec<ChildReport> = Vec::new();
    // Every run writes to its own directories; all are removed at the end.
    for i in 0..RUNS {
        settle()?;
        let report = parma_run(&oci, &scratch.path().join(format!("parma-{i}")))?;
        settle()?;
        let steps = baseline_run(&tar, &scratch.path().join(format!("baseline-{i}")), size_mib)?;
        let base = steps.iter().sum::<Duration>();
        eprintln!(
            "run {}/{RUNS}: parma {:.3} s ({} MiB peak), baseline {:.3} s (tar -x {:.3}, mkfs {:.3}, veritysetup {:.3})",
            i + 1,
            report.secs,
            report.vm_hwm_kib / 1024,
            base.as_secs_f64(),
            steps[0].as_secs_f64(),
            steps[1].as_secs_f64(),
            steps[2].as_secs_f64()
        );
        base_steps.push(steps);
        parma_samples.push(Duration::from_secs_f64(report.secs));
        base_samples.push(base);
        reports.push(report);
    }
    let first = reports.first().context("no runs")?;
    let deterministic = reports.iter().all(|r| r.root_hash == first.root_hash);
    ensure!(deterministic, "the builds gave different root hashes");
    let peak_kib = reports.iter().map(|r| r.vm_hwm_kib).max().unwrap_or(0);
    let image = scratch.path().join("parma-0").join(&first.file);
    let fsck = Command::new(tool("e2fsck")?).arg("-fn").arg(&image).output()?;
    let e2fsck_clean = fsck.status.success();

    // Verity hashing alone, on the image's ext4 part in memory, against one
    // sha256 over the same bytes (same library, one core).
    let data_len = usize::try_from(first.hash_offset)?;
    let mut data = fs::read(&image)?;
    data.truncate(data_len);
    let params = parma_verity::Params::new(hex::decode(&first.salt)?, [0; 16]);
    let (verity_samples, root) = timed(|| Ok(parma_verity::root_hash(&params, &data[..], first.hash_offset)?))?;
    ensure!(root.to_hex() == first.root_hash, "root hash {root} differs from the build's {}", first.root_hash);
    let (sha_samples, _) = timed(|| Ok(sha2::Sha256::digest(&data)))?;
    drop(data);
    let verity_s = median_secs(&verity_samples);
    let sha_s = median_secs(&sha_samples);

    // The compressed case, from the same tar.
    let mut compressed = serde_json::Map::new();
    for kind in [Compression::Gzip, Compression::Zstd] {
        compressed.insert(kind.name().into(), compressed_case(scratch.path(), &tar, &stats, kind, &first.root_hash)?);
    }

    let parma = side(&parma_samples, stats.tar_bytes);
    let baseline = side(&base_samples, stats.tar_bytes);
    let ratio = baseline.median_s / parma.median_s;
    // The same without `tar -x`, whose cost is mostly per-file system calls
    // and varies most between machines: a lower bound for the ratio.
    let tools_only: Vec<Duration> = base_steps.iter().map(|s| s[1] + s[2]).collect();
    let ratio_without_tar_x = median_secs(&tools_only) / parma.median_s;
    // Noise only slows a run down: the fastest runs' ratio is the steadier one
    // where file creation times vary (virtual disks).
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio_fastest = fastest(&baseline.samples_s) / fastest(&parma.samples_s);
    let report = json!({
        "runs": RUNS,
        "seed": format!("{SEED:#x}"),
        "layer": stats,
        "parma": {
            "median_s": parma.median_s,
            "samples_s": parma.samples_s,
            "tar_mb_per_s": parma.tar_mb_per_s,
            "peak_rss_mib": peak_kib as f64 / 1024.0,
            "peak_rss_samples_kib": reports.iter().map(|r| r.vm_hwm_kib).collect::<Vec<_>>(),
            "image_bytes": first.file_size,
            "ext4_bytes": first.hash_offset,
            "root_hash": first.root_hash,
            "deterministic": deterministic,
            "e2fsck_clean": e2fsck_clean,
        },
        "baseline": {
            "what": "tar -x + mkfs.ext4 -q -d DIR -b 4096 -O ^has_journal + veritysetup format",
            "median_s": baseline.median_s,
            "samples_s": baseline.samples_s,
            "tar_mb_per_s": baseline.tar_mb_per_s,
            "mkfs_size_mib": size_mib,
            "steps_median_s": {
                "tar_x": median_secs(&base_steps.iter().map(|s| s[0]).collect::<Vec<_>>()),
                "mkfs_ext4": median_secs(&base_steps.iter().map(|s| s[1]).collect::<Vec<_>>()),
                "veritysetup_format": median_secs(&base_steps.iter().map(|s| s[2]).collect::<Vec<_>>()),
            },
        },
        "ratio": ratio,
        "ratio_without_tar_x": ratio_without_tar_x,
        "ratio_fastest": ratio_fastest,
        "compressed": compressed,
        "verity": {
            "bytes": data_len,
            "median_s": verity_s,
            "mb_per_s": data_len as f64 / MB / verity_s,
            "sha256_median_s": sha_s,
            "sha256_mb_per_s": data_len as f64 / MB / sha_s,
            "fraction_of_sha256": sha_s / verity_s,
        },
    });
    let out = paths.repo.join("out/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("layer.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    drop(scratch);

    println!(
        "layer: {:.1} MB tar, {} entries ({} files, {} dirs, {} symlinks, {} hard links)",
        stats.tar_bytes as f64 / MB,
        stats.entries,
        stats.files,
        stats.directories,
        stats.symlinks,
        stats.hard_links
    );
    println!("{:<40} {:>10} {:>12}", format!("median of {RUNS}"), "s", "MB/s of tar");
    println!("{:<40} {:>10.3} {:>12.0}", "parma layer build", parma.median_s, parma.tar_mb_per_s);
    println!(
        "{:<40} {:>10.3} {:>12.0}",
        "tar -x + mkfs.ext4 -d + veritysetup", baseline.median_s, baseline.tar_mb_per_s
    );
    println!("{:<40} {:>10.2}", "ratio baseline/parma (higher is better)", ratio);
    println!("{:<40} {:>10.2}", "ratio of the fastest runs", ratio_fastest);
    println!("{:<40} {:>10.2}", "ratio without tar -x (mkfs + veritysetup)", ratio_without_tar_x);
    println!(
        "{:<40} {:>10.0} MB/s = {:.2} of sha256 ({:.0} MB/s)",
        "verity hashing",
        data_len as f64 / MB / verity_s,
        sha_s / verity_s,
        data_len as f64 / MB / sha_s
    );
    println!("{:<40} {:>10.1} MiB", "parma peak memory (VmHWM)", peak_kib as f64 / 1024.0);
    for (name, case) in &compressed {
        let number = |field: &str| case.get(field).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "{:<40} {:>10.3} s, decompression alone {:.3} s ({:.0} MB/s): ratio {:.2} (blob {:.2}:1)",
            format!("parma layer build, {name}"),
            number("build_median_s"),
            number("decompress_median_s"),
            number("decompress_mb_per_s"),
            number("ratio_to_decompression"),
            number("compression_ratio")
        );
        println!(
            "{:<40} {:>10.3} s writing the image alone: ratio to the slower floor {:.2}; fastest runs' ratio {:.2}",
            "",
            number("write_median_s"),
            number("ratio_to_slower_floor"),
            number("ratio_fastest_to_decompression")
        );
    }
    println!("{:<40} {:>10}", "e2fsck -fn clean", e2fsck_clean);
    println!("wrote {}", out.join("layer.json").display());
    Ok(())
}
