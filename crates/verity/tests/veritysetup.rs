//! The hash areas this crate builds, checked against the real `veritysetup`
//! (Debian's cryptsetup-bin): same root hash, same bytes, and `veritysetup
//! verify` accepts ours and rejects tampered data. `format` and `verify` work
//! on plain files, no device-mapper needed.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use parma_verity::{Params, RootHash, format, format_appended, verify};
use proptest::prelude::*;

/// The `veritysetup` binary; a missing one fails the test, never skips it.
fn veritysetup() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/sbin/veritysetup"), PathBuf::from("/sbin/veritysetup")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("veritysetup")));
    }
    candidates.into_iter().find(|path| path.is_file()).unwrap_or_else(|| {
        panic!(
            "veritysetup not found: these tests compare against it; install it with `apt-get install cryptsetup-bin`"
        )
    })
}

fn run(args: &[&str]) -> Output {
    Command::new(veritysetup()).args(args).output().unwrap()
}

fn uuid_string(uuid: &[u8; 16]) -> String {
    let hex = hex::encode(uuid);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

fn salt_arg(salt: &[u8]) -> String {
    if salt.is_empty() { "-".to_owned() } else { hex::encode(salt) }
}

/// Deterministic pseudo-random bytes (splitmix64).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn params(seed: u64, data_block_size: u32, hash_block_size: u32) -> Params {
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&bytes(seed ^ 0x55, 16));
    Params { data_block_size, hash_block_size, ..Params::new(bytes(seed ^ 0xaa, 32), uuid) }
}

/// `veritysetup format` of `data` into a fresh `hash` file (extra arguments
/// first); returns the root hash it prints.
fn their_format(params: &Params, data: &Path, hash: &Path, extra: &[&str]) -> RootHash {
    let dbs = params.data_block_size.to_string();
    let hbs = params.hash_block_size.to_string();
    let salt = salt_arg(&params.salt);
    let uuid = uuid_string(&params.uuid);
    let mut args = vec!["format", "--hash", "sha256", "--data-block-size", &dbs, "--hash-block-size", &hbs];
    args.extend_from_slice(&["--salt", &salt, "--uuid", &uuid]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&[data.to_str().unwrap(), hash.to_str().unwrap()]);
    let output = run(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "veritysetup format failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let line = stdout.lines().find_map(|line| line.strip_prefix("Root hash:")).unwrap();
    RootHash::from_hex(line).unwrap()
}

/// Whether `veritysetup verify` accepts the data with this hash area and root.
fn their_verify(data: &Path, hash: &Path, root: &RootHash, extra: &[&str]) -> bool {
    let root = root.to_hex();
    let mut args = vec!["verify"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[data.to_str().unwrap(), hash.to_str().unwrap(), &root]);
    run(&args).status.success()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut contents = fs::read(path).unwrap();
    contents[offset as usize] ^= 0x40;
    fs::write(path, contents).unwrap();
}

/// Ours and theirs agree on the root and every byte; theirs verifies ours,
/// and fails once one data byte changes.
fn check_separate(params: &Params, blocks: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data");
    let ours_path = dir.path().join("ours");
    let theirs_path = dir.path().join("theirs");
    let data = bytes(seed, blocks as usize * params.data_block_size as usize);
    fs::write(&data_path, &data).unwrap();

    let formatted =
        format(params, File::open(&data_path).unwrap(), data.len() as u64, File::create(&ours_path).unwrap(), 0)
            .unwrap();
    let theirs = their_format(params, &data_path, &theirs_path, &[]);
    let case = format!("{blocks} blocks of {} / {}", params.data_block_size, params.hash_block_size);
    assert_eq!(formatted.root_hash, theirs, "{case}");
    assert_eq!(formatted.layout.data_blocks(), blocks);
    let ours = fs::read(&ours_path).unwrap();
    assert_eq!(ours.len() as u64, formatted.layout.hash_area_size(), "{case}");
    assert!(ours == fs::read(&theirs_path).unwrap(), "{case}: hash areas differ");

    assert!(their_verify(&data_path, &ours_path, &formatted.root_hash, &[]), "{case}");
    verify(params, &data[..], data.len() as u64, &formatted.root_hash).unwrap();
    flip_byte(&data_path, (blocks - 1) * u64::from(params.data_block_size) + 17);
    assert!(!their_verify(&data_path, &ours_path, &formatted.root_hash, &[]), "{case}: tampered data verified");
}

#[test]
fn separate_hash_file_matches_veritysetup() {
    for (seed, blocks) in [1, 2, 127, 128, 129, 1000].into_iter().enumerate() {
        check_separate(&params(seed as u64, 4096, 4096), blocks, seed as u64);
    }
}

#[test]
fn three_levels_match_veritysetup() {
    // 128 * 128 + 1 blocks (64 MiB): the first size with a third level.
    check_separate(&params(7, 4096, 4096), 128 * 128 + 1, 7);
}

#[test]
fn other_block_sizes_and_an_empty_salt_match_veritysetup() {
    check_separate(&params(8, 512, 1024), 33 * 32 + 5, 8);
    check_separate(&params(9, 1024, 512), 300, 9);
    check_separate(&Params { salt: Vec::new(), ..params(10, 4096, 4096) }, 200, 10);
}

/// Data and hash area in one image, the hash area appended at the data size.
fn check_appended(params: &Params, blocks: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("image");
    let theirs_path = dir.path().join("theirs");
    let data = bytes(seed, blocks as usize * params.data_block_size as usize);
    fs::write(&image_path, &data).unwrap();
    fs::write(&theirs_path, &data).unwrap();

    let mut image = OpenOptions::new().read(true).write(true).open(&image_path).unwrap();
    let formatted = format_appended(params, &mut image).unwrap();
    assert_eq!(image.stream_position().unwrap(), data.len() as u64 + formatted.layout.hash_area_size());
    drop(image);
    assert_eq!(formatted.layout.hash_offset(), data.len() as u64);

    let offset = data.len().to_string();
    let data_blocks = blocks.to_string();
    let case = format!("{blocks} blocks of {} / {} appended", params.data_block_size, params.hash_block_size);
    let theirs =
        their_format(params, &theirs_path, &theirs_path, &["--hash-offset", &offset, "--data-blocks", &data_blocks]);
    assert_eq!(formatted.root_hash, theirs, "{case}");
    assert!(fs::read(&image_path).unwrap() == fs::read(&theirs_path).unwrap(), "{case}: images differ");

    let extra = ["--hash-offset", offset.as_str()];
    assert!(their_verify(&image_path, &image_path, &formatted.root_hash, &extra), "{case}");
    flip_byte(&image_path, 5);
    assert!(!their_verify(&image_path, &image_path, &formatted.root_hash, &extra), "{case}: tampered data verified");
}

#[test]
fn appended_hash_area_matches_veritysetup() {
    check_appended(&params(20, 4096, 4096), 1, 20);
    check_appended(&params(21, 4096, 4096), 300, 21);
    // A data size that is not a whole number of hash blocks: the tree starts at
    // the next hash block boundary after the superblock.
    check_appended(&params(22, 512, 4096), 77, 22);
}

#[test]
fn format_into_an_open_file_after_other_bytes() {
    // The writer's position is byte `hash_offset` of the hash device.
    let params = params(30, 4096, 4096);
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("image");
    let data = bytes(30, 50 * 4096);
    let mut image = File::create(&image_path).unwrap();
    image.write_all(&data).unwrap();
    let formatted = format(&params, &data[..], data.len() as u64, &mut image, data.len() as u64).unwrap();
    image.seek(SeekFrom::Start(0)).unwrap();
    drop(image);
    let extra = ["--hash-offset".to_owned(), data.len().to_string()];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    assert!(their_verify(&image_path, &image_path, &formatted.root_hash, &extra));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random sizes, block sizes and salts: our `verify` accepts what `format`
    /// returned and refuses a changed byte; `veritysetup verify` accepts our
    /// hash area.
    #[test]
    fn verify_round_trips(
        seed in any::<u64>(),
        blocks in 1u64..400,
        data_shift in 0u32..4,
        hash_shift in 0u32..4,
        salt_len in 0usize..=256,
        flip in any::<prop::sample::Index>(),
    ) {
        let mut params = params(seed, 512 << data_shift, 512 << hash_shift);
        params.salt.resize(salt_len, 0x5a);
        let data = bytes(seed, blocks as usize * params.data_block_size as usize);

        let dir = tempfile::tempdir().unwrap();
        let data_path = dir.path().join("data");
        let hash_path = dir.path().join("hash");
        fs::write(&data_path, &data).unwrap();
        let formatted = format(&params, &data[..], data.len() as u64, File::create(&hash_path).unwrap(), 0).unwrap();
        prop_assert_eq!(fs::metadata(&hash_path).unwrap().len(), formatted.layout.hash_area_size());

        prop_assert!(verify(&params, &data[..], data.len() as u64, &formatted.root_hash).is_ok());
        prop_assert!(their_verify(&data_path, &hash_path, &formatted.root_hash, &[]));

        let mut tampered = data.clone();
        tampered[flip.index(data.len())] ^= 1;
        prop_assert!(verify(&params, &tampered[..], data.len() as u64, &formatted.root_hash).is_err());
    }
}
