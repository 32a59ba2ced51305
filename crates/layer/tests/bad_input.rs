//! Every kind of bad input gives a typed error naming the entry or offset,
//! and leaves nothing under a final name.

mod common;

use std::io::Cursor;
use std::path::Path;

use common::*;
use parma_layer::{LayerError, TarError, tar_to_ext4};

fn convert(tar: &[u8]) -> Result<u64, TarError> {
    let options = parma_ext4::Options::new([1; 16], [2; 16]);
    tar_to_ext4(tar, options, Cursor::new(Vec::new()))
}

fn convert_err(tar: &[u8]) -> TarError {
    let err = convert(tar).unwrap_err();
    eprintln!("{err}: {:?}", std::error::Error::source(&err).map(ToString::to_string));
    err
}

/// Build `layers` as an OCI layout; the build must fail, leave no image and
/// no temporary file behind.
fn build_err(layers: &[Layer]) -> LayerError {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    oci_layout(&oci, layers, None);
    build_err_at(&oci, &tmp.path().join("out"))
}

fn build_err_at(input: &Path, out: &Path) -> LayerError {
    let err = parma_layer::build(input, None, out, &|_| {}).unwrap_err();
    eprintln!("{err}");
    assert!(image_files(out).is_empty(), "an image was left: {:?}", image_files(out));
    assert!(!out.join("layers.json").exists());
    no_temporaries(out);
    err
}

#[test]
fn dot_dot_anywhere_is_refused() {
    for name in [&b"../etc/passwd"[..], b"a/../../b", b"a/b/.."] {
        let mut tar = Tar::new();
        tar.raw(b'0', name, b"", 1, None, b"x");
        let err = convert_err(&tar.finish());
        assert!(matches!(&err, TarError::DotDot { entry, offset: 0 } if entry.as_bytes() == name), "{err}");
    }
    // In a hard link target too.
    let err = convert_err(&tar_of(&[E::file("a", "x"), E::link("b", "x/../a")]));
    assert!(matches!(err, TarError::DotDot { offset: 1024, .. }), "{err}");
}

#[test]
fn absolute_paths_are_made_relative() {
    let tar = tar_of(&[E::file("/etc/abs", "x"), E::dir("/"), E::symlink("//lnk", "/etc/abs")]);
    convert(&tar).unwrap();
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let err = convert_err(&tar_of(&[E::symlink("etc", "/host/etc"), E::file("etc/passwd", "pwned")]));
    assert!(
        matches!(&err, TarError::ThroughSymlink { entry, symlink, offset: 512 } if entry == "etc/passwd" && symlink == "etc"),
        "{err}"
    );
    // Deeper, through a hard link to a symlink, and through a whiteout or opaque marker.
    let cases = [
        vec![E::dir("a"), E::symlink("a/l", "."), E::file("a/l/b/c", "x")],
        vec![E::symlink("s", "/"), E::link("h", "s"), E::file("h/x", "x")],
        vec![E::symlink("s", "/"), E::file("s/.wh.x", "")],
        vec![E::symlink("s", "/"), E::file("s/.wh..wh..opq", "")],
        vec![E::symlink("s", "/"), E::dir("s/d")],
    ];
    for case in cases {
        let err = convert_err(&tar_of(&case));
        assert!(matches!(err, TarError::ThroughSymlink { .. }), "{case:?}: {err}");
    }
    // Under a regular file.
    let err = convert_err(&tar_of(&[E::file("f", "x"), E::file("f/g", "y")]));
    assert!(matches!(err, TarError::ParentNotDirectory { .. }), "{err}");
}

#[test]
fn duplicates_are_refused() {
    let cases = [
        vec![E::file("a", "1"), E::file("a", "2")],
        vec![E::file("a", "1"), E::file("./a", "2")],
        vec![E::dir("d"), E::dir("d/")],
        vec![E::dir("d"), E::file("d", "x")],
        vec![E::file("x", "1"), E::file(".wh.x", "")],
        vec![E::file(".wh.x", ""), E::file("x", "1")],
        vec![E::file("d/.wh..wh..opq", ""), E::file("d/.wh..wh..opq", "")],
        vec![E::dir("./"), E::dir(".")],
        vec![E::file("a", "1"), E::link("a", "a")],
    ];
    for case in cases {
        let err = convert_err(&tar_of(&case));
        assert!(matches!(err, TarError::Duplicate { .. }), "{case:?}: {err}");
    }
    // A directory listed after its children is not a duplicate.
    convert(&tar_of(&[E::file("d/x", "1"), E::dir("d")])).unwrap();
}

#[test]
fn hard_links_need_an_earlier_target() {
    for case in [
        vec![E::link("a", "missing")],
        vec![E::link("a", "b"), E::file("b", "later")],
        vec![E::dir("d"), E::link("a", "d")],
        vec![E::link("a", "")],
    ] {
        let err = convert_err(&tar_of(&case));
        assert!(matches!(err, TarError::LinkTargetMissing { .. } | TarError::Invalid { .. }), "{case:?}: {err}");
    }
}

#[test]
fn names_over_255_bytes_are_refused() {
    let long = "n".repeat(256);
    for e in [E::file(format!("dir/{long}"), "x").pax(), E::file(format!("dir/{long}"), "x")] {
        let err = convert_err(&tar_of(&[e]));
        assert!(matches!(&err, TarError::NameTooLong { entry, .. } if entry.ends_with(&long)), "{err}");
    }
    // 255 is fine.
    convert(&tar_of(&[E::file("n".repeat(255), "x").pax()])).unwrap();
}

#[test]
fn truncated_and_corrupt_tars_are_refused() {
    let tar = tar_of(&[E::file("a", vec![7u8; 10_000]), E::file("b", "b")]);
    // Cut inside a header, inside file data, inside the second header.
    for cut in [100, 3000, 10_752 + 200] {
        let err = convert_err(&tar[..cut]);
        assert!(matches!(err, TarError::Read { .. } | TarError::Ext4 { .. }), "cut {cut}: {err}");
    }
    // A header checksum that does not match.
    let mut bad = tar.clone();
    bad[10] ^= 0x40;
    let err = convert_err(&bad);
    assert!(matches!(err, TarError::Read { offset: 0, .. }), "{err}");
    // An unsupported entry type ('V', a volume label).
    let mut t = Tar::new();
    t.raw(b'V', b"label", b"", 0, None, b"");
    assert!(matches!(convert_err(&t.finish()), TarError::UnsupportedType { kind: 'V', .. }));
    // trusted.overlay xattrs are not taken from the tar.
    let err = convert_err(&tar_of(&[E::dir("d").xattr("trusted.overlay.opaque", "y")]));
    assert!(matches!(err, TarError::Invalid { .. }), "{err}");
}

#[test]
fn sizes_that_overflow_are_refused() {
    // A base-256 size of 2^63 + 1, and a PAX size past 1 TiB.
    let mut t = Tar::new();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..4].copy_from_slice(b"huge");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    let size = &mut h.as_gnu_mut().unwrap().size;
    size.fill(0xff);
    size[0] = 0x80;
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&t.finish());
    let err = convert_err(&bytes);
    assert!(matches!(err, TarError::Read { .. } | TarError::Ext4 { .. }), "{err}");

    let mut t = Tar::new();
    t.pax(&[("size".into(), b"99999999999999999999999".to_vec())]);
    t.raw(b'0', b"f", b"", 0, None, b"");
    let err = convert_err(&t.finish());
    assert!(matches!(&err, TarError::Field { entry, offset: 1024, .. } if entry == "f"), "{err}");

    let mut t = Tar::new();
    t.pax(&[("size".into(), (2u64 << 40).to_string().into_bytes())]);
    t.raw(b'0', b"f", b"", 0, None, b"");
    let err = convert_err(&t.finish());
    assert!(matches!(err, TarError::Ext4 { source: parma_ext4::Error::FileTooLarge { .. }, .. }), "{err}");
}

#[test]
fn truncated_or_corrupt_compression_fails_the_build() {
    let tar = tar_of(&[E::file("a", vec![1u8; 300_000]), E::file("b", "b")]);
    for comp in [Comp::Gzip, Comp::Zstd] {
        let good = Layer::new(&tar, comp);
        let mut truncated = good.clone();
        truncated.blob.truncate(good.blob.len() - 10);
        let mut corrupt = good.clone();
        let middle = corrupt.blob.len() / 2;
        corrupt.blob[middle] ^= 0xff;
        corrupt.blob[middle + 1] ^= 0x55;
        for (what, layer) in [("truncated", truncated), ("corrupt", corrupt)] {
            let err = build_err(&[layer]);
            assert!(
                matches!(err, LayerError::Layer { index: 0, .. } | LayerError::DiffId { .. } | LayerError::Read { .. }),
                "{comp:?} {what}: {err}"
            );
        }
        // Garbage after the compressed stream.
        let mut trailing = good.clone();
        trailing.blob.extend_from_slice(b"garbage after the stream");
        let err = build_err(&[trailing]);
        assert!(matches!(err, LayerError::Layer { .. } | LayerError::TrailingData { .. }), "{comp:?}: {err}");
    }
    // An uncompressed layer cut short: the diff-id no longer matches.
    let mut short = Layer::new(&tar, Comp::None);
    short.blob.truncate(10_240);
    let err = build_err(&[short]);
    assert!(matches!(err, LayerError::Layer { .. } | LayerError::DiffId { .. }), "{err}");
}

#[test]
fn blob_digest_and_size_mismatches_are_refused() {
    let tar = tar_of(&[E::file("a", "a")]);
    // Descriptor size differs.
    let mut layer = Layer::new(&tar, Comp::Gzip);
    layer.size = Some(layer.blob.len() as u64 + 1);
    assert!(matches!(build_err(&[layer]), LayerError::BlobSize { .. }));

    // Blob content replaced after the manifest was written (same size).
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let layer = Layer::new(&tar, Comp::Gzip);
    oci_layout(&oci, std::slice::from_ref(&layer), None);
    let path = oci.join("blobs/sha256").join(sha256(&layer.blob));
    let mut bytes = layer.blob.clone();
    let n = bytes.len();
    bytes[n - 5] ^= 1; // in the gzip trailer: decompression alone might not notice
    std::fs::write(&path, &bytes).unwrap();
    let err = build_err_at(&oci, &tmp.path().join("out"));
    assert!(matches!(&err, LayerError::BlobDigest { digest, .. } if digest.hex() == sha256(&layer.blob)), "{err}");

    // The same for the config blob.
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    oci_layout(&oci, &[Layer::new(&tar, Comp::Gzip)], None);
    let config = serde_json::to_vec(&test_config(&[digest(&tar)])).unwrap();
    let path = oci.join("blobs/sha256").join(sha256(&config));
    let mut bytes = config.clone();
    bytes[0] = b' ';
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(build_err_at(&oci, &tmp.path().join("out")), LayerError::BlobDigest { .. }));

    // A missing blob.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(build_err_at(&oci, &tmp.path().join("out")), LayerError::Missing { .. }));
}

#[test]
fn diff_id_mismatch_is_refused() {
    let tar = tar_of(&[E::file("a", "a")]);
    let mut layer = Layer::new(&tar, Comp::Zstd);
    layer.diff_id = digest(b"something else");
    let err = build_err(&[layer]);
    assert!(matches!(err, LayerError::DiffId { index: 0, .. }), "{err}");
}

#[test]
fn second_layer_failing_keeps_no_partial_image() {
    let good = Layer::new(&tar_of(&[E::file("a", "a")]), Comp::Gzip);
    let bad = Layer::new(&tar_of(&[E::file("b", "1"), E::file("b", "2")]), Comp::Gzip);
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    oci_layout(&oci, &[good, bad], None);
    let out = tmp.path().join("out");
    let err = parma_layer::build(&oci, None, &out, &|_| {}).unwrap_err();
    assert!(
        matches!(&err, LayerError::Layer { index: 1, source: TarError::Duplicate { entry, offset: 1024 }, .. } if entry == "b"),
        "{err}"
    );
    // The first layer is complete; the second left nothing; no layers.json.
    assert_eq!(image_files(&out).len(), 1);
    assert!(!out.join("layers.json").exists());
    no_temporaries(&out);
}

#[test]
fn bad_layouts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(build_err_at(&empty, &tmp.path().join("o1")), LayerError::NotAnImage { .. }));
    let not_tar = tmp.path().join("file");
    std::fs::write(&not_tar, b"not a tar").unwrap();
    assert!(matches!(
        build_err_at(&not_tar, &tmp.path().join("o2")),
        LayerError::NotAnImage { .. } | LayerError::Archive { .. }
    ));

    // An unknown layer media type, and a config for another platform.
    let tar = tar_of(&[E::file("a", "a")]);
    let mut layer = Layer::new(&tar, Comp::None);
    layer.media_type = "application/x-unknown".into();
    assert!(matches!(build_err(&[layer]), LayerError::MediaType { .. }));
    let oci = tmp.path().join("arm");
    let mut config = test_config(&[digest(&tar)]);
    config["architecture"] = "arm64".into();
    oci_layout_with(&oci, &[Layer::new(&tar, Comp::None)], &config, None);
    assert!(matches!(build_err_at(&oci, &tmp.path().join("o3")), LayerError::Platform { .. }));
    // More layers than diff-ids.
    let oci = tmp.path().join("count");
    oci_layout_with(&oci, &[Layer::new(&tar, Comp::None)], &test_config(&[]), None);
    assert!(matches!(build_err_at(&oci, &tmp.path().join("o4")), LayerError::LayerCount { .. }));
    // A digest with another algorithm.
    let oci = tmp.path().join("sha512");
    std::fs::create_dir_all(&oci).unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    add_to_index(
        &oci,
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha512:{}", "0".repeat(128)), "size": 2}),
    );
    assert!(matches!(build_err_at(&oci, &tmp.path().join("o5")), LayerError::DigestText { .. }));
}
