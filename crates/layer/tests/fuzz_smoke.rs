//! The fuzz target's property, run briefly in CI: [`tar_to_ext4`] never
//! panics, whatever the bytes, and answers every refusal with a typed
//! [`TarError`]. Inputs are deterministic: pure noise, random headers with
//! valid checksums, and mutations of valid layers (bit flips, interesting
//! bytes and numbers in header fields, hostile names, other entry types,
//! truncation, repeated or dropped blocks), their header checksums repaired
//! most of the time so the mutation reaches the converter rather than the
//! tar reader's checksum test. The real fuzzer is `crates/layer/fuzz`
//! (`cargo +nightly fuzz run tar_to_ext4`).

mod common;

use std::io::{self, Cursor, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use common::*;
use parma_layer::{TarError, tar_to_ext4};

/// Largest image kept in memory: a GNU sparse entry of a few hundred bytes
/// may announce gigabytes of zeros, which the writer would really write.
const CAP: u64 = 16 << 20;
const NOISE_CASES: usize = 300;
const HEADER_CASES: usize = 500;
const MUTATIONS_PER_SEED: usize = 320;

/// An in-memory cursor that refuses to grow past [`CAP`] (the same as the
/// fuzz target's).
struct Bounded(Cursor<Vec<u8>>);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.position().saturating_add(buf.len() as u64) > CAP {
            return Err(io::Error::other("image over the fuzzing cap"));
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Bounded {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

/// splitmix64.
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
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Run the conversion; a panic fails the test naming the case and input.
fn check(case: &str, input: &[u8]) -> Result<u64, String> {
    let options = parma_ext4::Options::new([1; 16], [2; 16]);
    let result = catch_unwind(AssertUnwindSafe(|| tar_to_ext4(input, options, Bounded(Cursor::new(Vec::new())))));
    let Ok(result) = result else {
        let shown: String = input.iter().take(2048).map(|b| format!("{b:02x}")).collect();
        panic!("{case}: tar_to_ext4 panicked on {} bytes: {shown}", input.len());
    };
    match result {
        Ok(size) => {
            assert!(size > 0 && size.is_multiple_of(4096), "{case}: image size {size}");
            Ok(size)
        }
        Err(err) => Err(describe(&err)),
    }
}

/// The whole error chain as text; every error must say something.
fn describe(err: &TarError) -> String {
    let mut text = err.to_string();
    assert!(!text.is_empty(), "an error with no message: {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------- seeds

fn set_octal(block: &mut [u8], range: std::ops::Range<usize>, value: u64) {
    let width = range.len() - 1;
    let text = format!("{value:0width$o}");
    let text = text.as_bytes();
    let field = &mut block[range];
    field.fill(0);
    let n = text.len().min(width);
    field[..n].copy_from_slice(&text[text.len() - n..]);
}

/// Recompute the checksum of the 512-byte header at `at`.
fn fix_checksum(tar: &mut [u8], at: usize) {
    let Some(block) = tar.get_mut(at..at + 512) else { return };
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
}

/// Offsets of the headers of a well-formed tar.
fn header_offsets(tar: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while let Some(block) = tar.get(at..at + 512) {
        if block.iter().all(|&b| b == 0) {
            break;
        }
        offsets.push(at);
        let header = tar::Header::from_byte_slice(block);
        let size = header.entry_size().unwrap_or(0) as usize;
        at += 512 + size.div_ceil(512) * 512;
    }
    offsets
}

/// An old-GNU sparse file: `real` bytes, `data` stored at `offset`.
fn sparse(name: &[u8], offset: u64, data: &[u8], real: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    let mut block = h.as_bytes().to_vec();
    // struct sparse { offset[12], numbytes[12] } x 4 at 386, realsize at 483;
    // an empty chunk at the real size ends the map, as GNU tar writes it.
    set_octal(&mut block, 386..398, offset);
    set_octal(&mut block, 398..410, data.len() as u64);
    set_octal(&mut block, 410..422, real);
    set_octal(&mut block, 422..434, 0);
    set_octal(&mut block, 483..495, real);
    fix_checksum(&mut block, 0);
    block.extend_from_slice(data);
    block.resize(block.len().div_ceil(512) * 512, 0);
    block
}

/// A ustar entry whose path uses the prefix field.
fn ustar_prefixed() -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    let path = format!("{}/{}", "p".repeat(120), "n".repeat(80));
    h.set_path(&path).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(3);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(b"abc");
    out.resize(1024, 0);
    out
}

fn finish(mut body: Vec<u8>) -> Vec<u8> {
    body.extend_from_slice(&[0; 1024]);
    body.resize(body.len().div_ceil(10240) * 10240, 0);
    body
}

fn seeds() -> Vec<Vec<u8>> {
    let long = "long-component-".repeat(13);
    let mixed = tar_of(&[
        E::dir("etc"),
        E::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").owner(0, 0),
        E::file("etc/empty", ""),
        E::file("bin/app", vec![0x7f; 5000]).mode(0o755).xattr("security.capability", [1, 0, 0, 2, 0, 32, 0, 0]),
        E::file("data/block", vec![0xa5; 4096]).owner(1000, 1000),
        E::symlink("bin/sh", "app"),
        E::symlink("bin/far", "/usr/lib/some/where/rather/far/away/from/here/so/the/target/is/slow"),
        E::link("bin/app2", "bin/app"),
        E::new("dev/null", Kind::Char(1, 3)).mode(0o666),
        E::new("dev/loop0", Kind::Block(7, 0)).mode(0o660),
        E::new("run/fifo", Kind::Fifo),
        E::dir("data").mode(0o700).owner(5, 5),
    ]);
    let mut pax_time = E::file("t/nanos", "x");
    pax_time.pax_mtime = Some((1_700_000_000, 123_456_789));
    let names = tar_of(&[
        E::file(format!("gnu/{long}/{long}"), "g"),
        E::file(format!("pax/{long}/{long}"), "p").pax(),
        E::symlink("gnu/link", format!("/{long}/{long}")),
        E::symlink("pax/link", format!("/{long}/{long}")).pax(),
        E::file("pax/xattr", "x").xattr("user.key", "value").pax(),
        pax_time,
    ]);
    let whiteouts = tar_of(&[
        E::dir("etc"),
        E::file("etc/.wh.passwd", ""),
        E::file("opt/app/.wh..wh..opq", ""),
        E::file("opt/app/keep", "k"),
        E::file("x/.wh..wh.plnk", ""),
    ]);
    let implicit = tar_of(&[E::file("a/b/c/d", "deep"), E::dir("a/b").mode(0o711), E::dir("a")]);
    let mut global = Tar::new();
    global.raw(b'g', b"pax_global_header", b"", 27, None, b"27 comment=global header\n");
    global.entry(&E::file("after-global", "y"));
    vec![
        mixed,
        names,
        whiteouts,
        implicit,
        global.finish(),
        finish(sparse(b"sparse", 8192, &[0x42; 600], 64 << 10)),
        finish(ustar_prefixed()),
        tar_of(&[]),
    ]
}

// ---------------------------------------------------------------- mutations

/// Numeric header fields: mode, uid, gid, size, mtime, devmajor, devminor,
/// and the GNU sparse map's first offset and length and the real size.
const FIELDS: [(usize, usize); 10] = [
    (100, 108),
    (108, 116),
    (116, 124),
    (124, 136),
    (136, 148),
    (329, 337),
    (337, 345),
    (386, 398),
    (398, 410),
    (483, 495),
];
const NUMBERS: [u64; 12] = [0, 1, 511, 512, 4095, 4096, 0o7777, 65_535, 1 << 32, (1 << 33) - 1, 1 << 40, 0o77777777777];
const BYTES: [u8; 16] = [0, 0xff, 0x80, b'0', b'7', b'/', b'.', b' ', b'x', b'L', b'K', b'S', b'1', b'2', b'5', b'\n'];
const TYPES: &[u8] = b"0123456789xgLKSDMNVA\0";
const NAMES: [&[u8]; 14] = [
    b"../escape",
    b"a/../../b",
    b"/",
    b".",
    b"./",
    b"a//b",
    b".wh..wh..opq",
    b"etc/.wh.passwd",
    b".wh.",
    b"bin/sh/through",
    b"etc/passwd",
    b"trusted.overlay.opaque",
    b"\xff\xfe",
    b"",
];

fn mutate(rng: &mut Rng, seed: &[u8], headers: &[usize]) -> Vec<u8> {
    let mut t = seed.to_vec();
    let header = |rng: &mut Rng| if headers.is_empty() { 0 } else { *rng.pick(headers) };
    for _ in 0..1 + rng.below(4) {
        if t.is_empty() {
            t = rng.bytes(512);
        }
        let len = t.len();
        match rng.below(9) {
            0 => {
                let i = rng.below(len);
                t[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len);
                t[i] = *rng.pick(&BYTES);
            }
            2 | 3 => {
                let at = header(rng);
                let (start, end) = *rng.pick(&FIELDS);
                if let Some(block) = t.get_mut(at..at + 512) {
                    if rng.below(6) == 0 {
                        // Base-256 (GNU binary) encoding.
                        block[start] = 0x80;
                        let value = rng.next().to_be_bytes();
                        let n = (end - start - 1).min(8);
                        block[end - n..end].copy_from_slice(&value[8 - n..]);
                    } else {
                        let value = *rng.pick(&NUMBERS) + rng.below(3) as u64;
                        set_octal(block, start..end, value);
                    }
                }
            }
            4 => {
                let at = header(rng);
                let name = *rng.pick(&NAMES);
                let field = if rng.below(3) == 0 { 157..257 } else { 0..100 };
                if let Some(block) = t.get_mut(at..at + 512) {
                    block[field.clone()].fill(0);
                    block[field.start..field.start + name.len()].copy_from_slice(name);
                }
            }
            5 => {
                let at = header(rng);
                let kind = *rng.pick(TYPES);
                if let Some(b) = t.get_mut(at + 156) {
                    *b = kind;
                }
            }
            6 => t.truncate(rng.below(len)),
            7 => {
                // Repeat a block (a duplicate entry, or data read as a header).
                let blocks = len / 512;
                if blocks > 0 {
                    let from = rng.below(blocks) * 512;
                    let to = rng.below(blocks + 1) * 512;
                    let copy = t[from..from + 512].to_vec();
                    t.splice(to..to, copy);
                }
            }
            _ => {
                let blocks = len / 512;
                if blocks > 0 {
                    let at = rng.below(blocks) * 512;
                    t.drain(at..at + 512);
                }
            }
        }
    }
    if rng.below(4) != 0 {
        for &at in headers {
            fix_checksum(&mut t, at);
        }
    }
    t
}

/// One to six headers of random fields with valid checksums and magic,
/// each followed by the data its size announces.
fn random_headers(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let mut block = rng.bytes(512);
        if rng.below(2) == 0 {
            let name_len = rng.below(100);
            let printable: Vec<u8> = (0..name_len).map(|_| b"ab/.wh_"[rng.below(7)]).collect();
            block[..100].fill(0);
            block[..name_len].copy_from_slice(&printable);
        }
        for &(start, end) in &FIELDS[..7] {
            if rng.below(4) != 0 {
                set_octal(&mut block, start..end, rng.next() % 0o10000);
            }
        }
        let size = rng.below(1500) as u64;
        set_octal(&mut block, 124..136, size);
        block[156] = *rng.pick(TYPES);
        block[257..265].copy_from_slice(if rng.below(2) == 0 { b"ustar\x0000" } else { b"ustar  \0" });
        fix_checksum(&mut block, 0);
        out.extend_from_slice(&block);
        out.extend(rng.bytes(size.div_ceil(512) as usize * 512));
    }
    if rng.below(2) == 0 { finish(out) } else { out }
}

// ---------------------------------------------------------------- tests

#[test]
fn seeds_are_valid_layers() {
    for (i, seed) in seeds().iter().enumerate() {
        if let Err(err) = check(&format!("seed {i}"), seed) {
            panic!("seed {i} is refused: {err}");
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let started = Instant::now();
    let mut rng = Rng(0x6675_7a7a);
    let (mut ok, mut refused) = (0usize, 0usize);
    let mut tally = |r: Result<u64, String>| if r.is_ok() { ok += 1 } else { refused += 1 };

    for i in 0..NOISE_CASES {
        let len = rng.below(3 * 1024);
        let input = rng.bytes(len);
        tally(check(&format!("noise {i}"), &input));
    }
    for i in 0..HEADER_CASES {
        let input = random_headers(&mut rng);
        tally(check(&format!("headers {i}"), &input));
    }
    for (s, seed) in seeds().iter().enumerate() {
        let headers = header_offsets(seed);
        for i in 0..MUTATIONS_PER_SEED {
            let input = mutate(&mut rng, seed, &headers);
            tally(check(&format!("seed {s} mutation {i}"), &input));
        }
    }
    let total = ok + refused;
    eprintln!("{total} inputs: {ok} converted, {refused} refused, in {:.2} s", started.elapsed().as_secs_f64());
    assert!(total >= 3000);
    // The mutations must reach past the tar reader often enough to matter.
    assert!(ok > total / 20, "only {ok} of {total} inputs converted");
}

/// A sparse entry announcing a large file costs output, not input: the
/// cap turns it into a typed write error rather than an allocation.
#[test]
fn sparse_amplification_is_a_typed_error_under_the_cap() {
    let input = finish(sparse(b"big", 0, &[1; 512], 1 << 30));
    let err = check("sparse 1 GiB", &input).unwrap_err();
    assert!(err.contains("fuzzing cap"), "{err}");
}
