//! Whole builds from OCI layouts and docker save archives made in the test,
//! checked with e2fsck, veritysetup and debugfs.

mod common;

use std::cell::RefCell;
use std::path::Path;

use common::*;
use parma_layer::{Progress, build};

fn capability() -> Vec<u8> {
    // vfs_cap_data revision 2: cap_net_raw permitted + effective.
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v
}

fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Bottom layer: every kind of entry, long names, xattrs, implicit parents.
fn layer1() -> Vec<E> {
    let gnu_dir = format!("deep/{}", "d".repeat(150));
    vec![
        E::dir("./").mode(0o755),
        E::dir("etc/").mode(0o755),
        E::file("etc/hosts", "127.0.0.1 localhost\n").mode(0o644),
        E::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").mode(0o644),
        E::file("etc/shadow", "root:*::0:::::\n").mode(0o640).owner(0, 42),
        E::dir("bin").mode(0o755),
        E::file("bin/busybox", content(1, 200_000)).mode(0o755),
        E::symlink("bin/sh", "busybox"),
        E::link("bin/ls", "bin/busybox"),
        E::file("bin/ping", content(2, 5000)).mode(0o4755).xattr("security.capability", capability()),
        E::file("/abs/file", "absolute path, stored as abs/file"),
        E::file("etc/commented", "x").xattr("user.comment", "hello").xattr("user.bin", [0u8, 1, 2, 255]),
        E::dir("dev"),
        E::new("dev/null", Kind::Char(1, 3)).mode(0o666),
        E::new("dev/sda", Kind::Block(8, 0)).mode(0o660).owner(0, 6),
        E::new("dev/fifo", Kind::Fifo).mode(0o600),
        // GNU long name, long symlink target (GNU 'K'), PAX path and linkpath.
        E::dir(&gnu_dir),
        E::file(format!("{gnu_dir}/{}", "f".repeat(200)), content(3, 10_000)),
        E::symlink("long-gnu-link", "t/".repeat(100)),
        E::file(format!("{}/{}", "p".repeat(120), "q".repeat(255)), "pax name").pax(),
        E::symlink("long-pax-link", "u".repeat(300)).pax(),
        E::link(format!("{}/hard", "p".repeat(120)), format!("{}/{}", "p".repeat(120), "q".repeat(255))).pax(),
        // Parents listed after their children; 'implicit2' never listed.
        E::file("implicit/sub/file", "deep").owner(7, 8),
        E::dir("implicit").mode(0o700).owner(5, 6),
        E::file("implicit2/a", "a"),
        E::file("big", content(4, 1 << 20)).mode(0o600).owner(1000, 1000),
        E::file("empty", ""),
        E::file("times", "t").owner(3, 4),
        E::dir("opt"),
        E::dir("opt/app"),
        E::file("opt/app/old", "old"),
        E::file("opt/app/keep-not", "hidden by the opaque dir above"),
    ]
    .into_iter()
    .map(|mut e| {
        if e.path == b"times" {
            e.pax_mtime = Some((1_600_000_000, 123_456_789));
        }
        e
    })
    .collect()
}

/// Top layer: whiteouts, an opaque directory, new files.
fn layer2() -> Vec<E> {
    vec![
        E::file("etc/.wh.passwd", ""),
        E::file("opt/app/.wh..wh..opq", ""),
        E::file("opt/app/new", "new"),
        E::file("etc/motd", "welcome\n"),
        E::file("newdir/.wh..wh..opq", ""),
        E::dir("newdir").mode(0o750),
    ]
}

fn layer3() -> Vec<E> {
    vec![E::file("srv/data", content(5, 70_000)).owner(1000, 1000)]
}

fn strip(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path).into_owned();
    format!("/{}", s.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/'))
}

#[test]
fn oci_layout_with_three_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let out = tmp.path().join("out");
    let tars = [tar_of(&layer1()), tar_of(&layer2()), tar_of(&layer3())];
    let layers = [Layer::new(&tars[0], Comp::Gzip), Layer::new(&tars[1], Comp::Zstd), Layer::new(&tars[2], Comp::None)];
    let manifest_digest = oci_layout(&oci, &layers, Some("test:1"));

    let events = RefCell::new(Vec::new());
    let built = build(&oci, Some("test:1"), &out, &|p| events.borrow_mut().push(p)).unwrap();
    let events = events.into_inner();
    no_temporaries(&out);

    // layers.json, and every image checked by e2fsck and veritysetup.
    let json = check_output(&out);
    assert_eq!(json["manifest_digest"], manifest_digest);
    let records = json["layers"].as_array().unwrap();
    assert_eq!(records.len(), 3);
    for (record, tar) in records.iter().zip(&tars) {
        assert_eq!(record["diff_id"], digest(tar));
        assert_eq!(record["hash_algorithm"], "sha256");
        assert_eq!(record["salt"].as_str().unwrap().len(), 64);
    }
    assert_eq!(built.layers.layers.len(), 3);
    assert_eq!(built.layers.layers[0].root_hash, records[0]["root_hash"].as_str().unwrap());

    // Progress: start, reads up to the blob size, hashing, done; per layer.
    for (index, layer) in layers.iter().enumerate() {
        let size = layer.blob.len() as u64;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Progress::Layer { index: i, count: 3, size: s, .. } if *i == index && *s == size))
        );
        assert!(
            events.iter().any(|e| matches!(e, Progress::Read { index: i, read, .. } if *i == index && *read == size))
        );
        assert!(events.iter().any(|e| matches!(e, Progress::Done { index: i, .. } if *i == index)));
    }

    // config.json for the policy generator.
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({
            "entrypoint": ["/bin/app"], "cmd": ["--serve", "8080"], "env": ["PATH=/usr/bin:/bin", "MODE=test"],
            "working_dir": "/srv", "user": "1000:1000", "labels": {"org.example.a": "1", "org.example.b": "2"},
            "exposed_ports": ["53/udp", "8080/tcp"], "stop_signal": "SIGTERM"
        })
    );

    // Layer 1: every entry of the tar, as debugfs sees it.
    let img1 = out.join(records[0]["file"].as_str().unwrap());
    for e in layer1() {
        check_entry(&img1, &e, &strip(&e.path));
    }
    assert_eq!(
        names(&img1, "/"),
        [
            "abs",
            "big",
            "bin",
            "deep",
            "dev",
            "empty",
            "etc",
            "implicit",
            "implicit2",
            "long-gnu-link",
            "long-pax-link",
            "opt",
            &"p".repeat(120),
            "times"
        ]
    );
    assert_eq!(names(&img1, "/bin"), ["busybox", "ls", "ping", "sh"]);
    // Parents listed later took the tar's metadata; never-listed ones are 0755 0:0 at time 0.
    let (_, s) = stat(&img1, "/implicit");
    assert!(s.contains("Mode:  0700") && number_after(&s, "User:") == 5 && number_after(&s, "Group:") == 6, "{s}");
    for dir in ["/implicit/sub", "/implicit2", "/abs"] {
        let (_, s) = stat(&img1, dir);
        assert!(s.contains("Type: directory    Mode:  0755") && number_after(&s, "User:") == 0, "{dir}: {s}");
        assert!(s.contains("mtime: 0x00000000:00000000"), "{dir}: {s}");
    }
    let (_, s) = stat(&img1, "/bin/busybox");
    assert!(s.contains("Links: 2"), "{s}");

    // Layer 2: whiteouts are 0:0 character devices, opaque dirs carry the xattr.
    let img2 = out.join(records[1]["file"].as_str().unwrap());
    let (_, s) = stat(&img2, "/etc/passwd");
    assert!(s.contains("Type: character special    Mode:  0000"), "{s}");
    assert!(s.contains("Device major/minor number: 00:00 "), "{s}");
    assert_eq!(names(&img2, "/etc"), ["motd", "passwd"]);
    for dir in ["/opt/app", "/newdir"] {
        assert_eq!(xattr_value(&img2, dir, "trusted.overlay.opaque"), b"y", "{dir}");
    }
    assert_eq!(names(&img2, "/opt/app"), ["new"]);
    let (_, s) = stat(&img2, "/newdir");
    assert!(s.contains("Mode:  0750"), "opaque dir listed after its marker keeps its mode: {s}");
    let ea = debugfs(&img2, "ea_list /opt");
    assert!(!ea.contains("opaque"), "{ea}");

    // Layer 3 (uncompressed).
    let img3 = out.join(records[2]["file"].as_str().unwrap());
    check_entry(&img3, &layer3()[0], "/srv/data");
}

#[test]
fn builds_are_deterministic_and_independent_of_compression_and_format() {
    let tmp = tempfile::tempdir().unwrap();
    let tars = [tar_of(&layer1()), tar_of(&layer2())];
    let oci = tmp.path().join("oci");
    oci_layout(&oci, &[Layer::new(&tars[0], Comp::Gzip), Layer::new(&tars[1], Comp::Gzip)], None);
    let oci_zstd = tmp.path().join("oci-zstd");
    oci_layout(&oci_zstd, &[Layer::new(&tars[0], Comp::Zstd), Layer::new(&tars[1], Comp::None)], None);
    let archive = tmp.path().join("image.tar");
    docker_save(&archive, &tars, "example/app:latest");

    let read_all = |out: &Path| {
        let json = check_output(out);
        json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| std::fs::read(out.join(l["file"].as_str().unwrap())).unwrap())
            .collect::<Vec<_>>()
    };
    let mut outputs = Vec::new();
    for (input, reference) in
        [(&oci, None), (&oci, None), (&oci_zstd, None), (&archive, Some("example/app:latest")), (&archive, None)]
    {
        let out = tempfile::tempdir_in(tmp.path()).unwrap();
        build(input, reference, out.path(), &|_| {}).unwrap();
        no_temporaries(out.path());
        outputs.push((read_all(out.path()), std::fs::read(out.path().join("config.json")).unwrap()));
    }
    for (i, other) in outputs.iter().enumerate().skip(1) {
        assert!(other.0 == outputs[0].0, "build {i}: layer images differ");
        assert_eq!(other.1, outputs[0].1, "build {i}: config.json differs");
    }
    // The image's content from the docker archive, as from the layout.
    let out = tempfile::tempdir_in(tmp.path()).unwrap();
    let built = build(&archive, None, out.path(), &|_| {}).unwrap();
    assert!(built.layers.manifest_digest.is_none());
    let img = out.path().join(&built.layers.layers[0].file);
    check_entry(&img, &layer1()[6], "/bin/busybox");
}

#[test]
fn repeated_layers_are_built_once_and_listed_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = tar_of(&layer3());
    let oci = tmp.path().join("oci");
    oci_layout(&oci, &[Layer::new(&tar, Comp::Gzip), Layer::new(&tar, Comp::Gzip)], None);
    let out = tmp.path().join("out");
    let events = RefCell::new(Vec::new());
    let built = build(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap();
    assert_eq!(built.layers.layers.len(), 2);
    assert_eq!(built.layers.layers[0], built.layers.layers[1]);
    assert!(events.borrow().contains(&Progress::Reused { index: 1 }));
    assert_eq!(image_files(&out).len(), 1);
    check_output(&out);
}

#[test]
fn image_index_picks_linux_amd64_and_refs_choose_images() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let amd64 = tar_of(&[E::file("arch", "amd64")]);
    let arm64 = tar_of(&[E::file("arch", "arm64")]);
    let manifest = |tar: &[u8], arch: &str| {
        let mut config = test_config(&[digest(tar)]);
        config["architecture"] = arch.into();
        let bytes = manifest_blob(&oci, &[Layer::new(tar, Comp::Gzip)], &config);
        let mut desc = blob_desc(&oci, "application/vnd.oci.image.manifest.v1+json", &bytes);
        desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        desc
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "manifests": [manifest(&arm64, "arm64"), manifest(&amd64, "amd64")]
    }))
    .unwrap();
    let mut desc = blob_desc(&oci, "application/vnd.oci.image.index.v1+json", &index);
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "multi"});
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    add_to_index(&oci, desc);
    // A second image in the same layout.
    let other = tar_of(&[E::file("other", "x")]);
    oci_layout(&oci, &[Layer::new(&other, Comp::None)], Some("other"));

    let out = tmp.path().join("out");
    let built = build(&oci, Some("multi"), &out, &|_| {}).unwrap();
    assert_eq!(built.layers.layers[0].diff_id.to_string(), digest(&amd64));
    check_output(&out);

    let err = build(&oci, None, &tmp.path().join("out2"), &|_| {}).unwrap_err();
    assert!(matches!(err, parma_layer::LayerError::Ambiguous { .. }), "{err}");
    let err = build(&oci, Some("nope"), &tmp.path().join("out3"), &|_| {}).unwrap_err();
    assert!(matches!(&err, parma_layer::LayerError::RefNotFound { available, .. } if available.len() == 2), "{err}");
}

/// The image's final files through its layers: an upper layer replaces a
/// lower one's file, a whiteout or an opaque directory removes it, a file
/// that replaces its parent directory hides it, and links are not files.
#[test]
fn read_files_applies_whiteouts_and_opaque_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let base = vec![
        E::file("etc/passwd", "base passwd"),
        E::file("etc/group", "base group"),
        E::file("etc/hostname", "base"),
        E::file("opt/a/x", "old"),
        E::file("srv/y", "gone with srv"),
        E::file("usr/z", "under a link later"),
    ];
    let top = vec![
        E::file("etc/.wh.group", ""),
        E::file("./etc/passwd", "top passwd"),
        E::file("opt/a/.wh..wh..opq", ""),
        E::file("opt/a/new", "new"),
        E::file("srv", "a file where a directory was"),
        E::symlink("usr/link", "z"),
    ];
    let tars = [tar_of(&base), tar_of(&top)];
    oci_layout(&oci, &[Layer::new(&tars[0], Comp::Gzip), Layer::new(&tars[1], Comp::Zstd)], None);
    let wanted =
        ["/etc/passwd", "/etc/group", "/etc/hostname", "/opt/a/x", "/opt/a/new", "/srv/y", "/usr/link", "/none"];
    let files = parma_layer::read_files(&oci, None, &wanted).unwrap();
    let text = |path: &str| files.get(path).map(|data| String::from_utf8_lossy(data).into_owned());
    assert_eq!(text("/etc/passwd").as_deref(), Some("top passwd"));
    assert_eq!(text("/etc/hostname").as_deref(), Some("base"));
    assert_eq!(text("/opt/a/new").as_deref(), Some("new"));
    for gone in ["/etc/group", "/opt/a/x", "/srv/y", "/usr/link", "/none"] {
        assert_eq!(text(gone), None, "{gone}");
    }
}

/// The conversion reads the wanted files in the same pass (the
/// snapshotter's case): what it finds equals a scan of the blob on its own,
/// for every compression and for each shape a wanted path can take (file,
/// large file, link, directory, whiteout, opaque parent, a file replacing
/// a parent), and watching changes no byte of the image.
#[test]
fn converting_a_blob_reads_the_wanted_files_in_the_same_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let base = vec![
        E::file("etc/passwd", "base passwd"),
        E::file("etc/group", "base group"),
        E::file("etc/big", content(9, (parma_layer::MAX_FILE + 1) as usize)),
        E::dir("etc/dir"),
        E::file("opt/a/x", "old"),
        E::file("srv/y", "gone with srv"),
        E::link("etc/hard", "etc/passwd"),
    ];
    let top = vec![
        E::file("etc/.wh.group", ""),
        E::file("./etc/passwd", "top passwd"),
        E::file("opt/a/.wh..wh..opq", ""),
        E::file("opt/a/new", "new"),
        E::file("srv", "a file where a directory was"),
        E::symlink("usr/link", "z"),
        E::file("unrelated/.wh.thing", ""),
    ];
    let wanted = [
        "/etc/passwd",
        "/etc/group",
        "/etc/big",
        "/etc/dir",
        "/etc/hard",
        "/opt/a/x",
        "/opt/a/new",
        "/srv/y",
        "/usr/link",
        "/none",
    ];
    let mut stacked = Vec::new();
    for (n, entries) in [base, top].iter().enumerate() {
        // A PAX global header named like a wanted file is no file, to both.
        let mut tar = Tar::new();
        let record = b"20 comment=ignored\n";
        tar.raw(b'g', b"etc/passwd", b"", record.len() as u64, None, record);
        tar.entries(entries);
        let tar = tar.finish();
        let diff_id = parma_layer::Digest::of(&tar);
        let mut images = Vec::new();
        let mut found = Vec::new();
        for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
            let blob_bytes = compress(&tar, comp);
            let blob = parma_layer::Blob {
                name: format!("layer {n} {comp:?}"),
                digest: parma_layer::Digest::of(&blob_bytes),
                size: blob_bytes.len() as u64,
                diff_id,
            };
            let scanned = parma_layer::scan_blob(blob_bytes.as_slice(), &wanted).unwrap();
            let out = tmp.path().join(format!("{n}-{comp:?}"));
            let mut watch = parma_layer::Watch::new(&wanted);
            let record = parma_layer::convert_blob(blob_bytes.as_slice(), &blob, &out, Some(&mut watch)).unwrap();
            let watched = watch.into_files();
            assert_eq!(watched, scanned, "layer {n} {comp:?}");
            let plain = tmp.path().join(format!("{n}-{comp:?}-plain"));
            let unwatched = parma_layer::convert_blob(blob_bytes.as_slice(), &blob, &plain, None).unwrap();
            assert_eq!(record, unwatched);
            let bytes = std::fs::read(out.join(&record.file)).unwrap();
            assert_eq!(bytes, std::fs::read(plain.join(&record.file)).unwrap());
            images.push(bytes);
            found.push(watched);
        }
        assert!(images.windows(2).all(|pair| pair[0] == pair[1]));
        stacked.push(found.swap_remove(0));
    }
    let files = parma_layer::stack(&stacked);
    let text = |path: &str| files.get(path).map(|data| String::from_utf8_lossy(data).into_owned());
    assert_eq!(text("/etc/passwd").as_deref(), Some("top passwd"));
    for gone in ["/etc/group", "/etc/big", "/etc/dir", "/etc/hard", "/opt/a/x", "/srv/y", "/usr/link", "/none"] {
        assert_eq!(text(gone), None, "{gone}");
    }
    assert_eq!(text("/opt/a/new").as_deref(), Some("new"));
    // The base layer alone: the link and the directory are there, but not files.
    assert_eq!(stacked[0].entries.get("etc/hard"), Some(&None));
    assert_eq!(stacked[0].entries.get("etc/dir"), Some(&None));
    assert_eq!(stacked[0].entries.get("etc/big"), Some(&None));
    assert_eq!(stacked[1].removed.iter().filter(|path| path.starts_with("unrelated")).count(), 0);
}

/// The images of two fixed layers, pinned: a change to how layers are read
/// (threads, decompressors, buffers) must not change a byte of the output.
/// Values from the single-threaded build with miniz_oxide (before the
/// decompression thread and zlib-rs).
#[test]
fn fixed_layers_give_pinned_images_from_every_compression() {
    const PINNED: [(&str, &str); 2] = [
        (
            "9c6f517da9a56640fb8782de48b43644cf36ebf5fef2d9aaaed68f7204d4138c",
            "97e64ee8bf45d0908af3ee3c8c51bc05333a8125e92f4c7e877e8cf47283ad1b",
        ),
        (
            "adc6338b01febbcd50de2b4e7f2106565cf350a495ae708b6c17d3a5613983cb",
            "0f5c4d52e4bc593bb8a545a525c7cf760f3b8622a439b9a6e850c4a5a7532148",
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let tars = [tar_of(&layer1()), tar_of(&layer2())];
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let oci = tmp.path().join(format!("oci-{comp:?}"));
        oci_layout(&oci, &[Layer::new(&tars[0], comp), Layer::new(&tars[1], comp)], None);
        let out = tmp.path().join(format!("out-{comp:?}"));
        let built = build(&oci, None, &out, &|_| {}).unwrap();
        for (layer, (root, file)) in built.layers.layers.iter().zip(PINNED) {
            let bytes = std::fs::read(out.join(&layer.file)).unwrap();
            assert_eq!(layer.root_hash, root, "{comp:?}");
            assert_eq!(sha256(&bytes), file, "{comp:?}");
        }
    }
}

#[test]
fn a_run_reuses_what_an_earlier_build_left_and_a_build_never_does() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let (one, two) = (tar_of(&layer1()), tar_of(&layer3()));
    oci_layout(&oci, &[Layer::new(&one, Comp::Gzip), Layer::new(&two, Comp::Zstd)], None);
    let out = tmp.path().join("out");
    let cached = |events: &RefCell<Vec<Progress>>| {
        events.borrow().iter().filter(|p| matches!(p, Progress::Cached { .. })).count()
    };
    // Nothing there yet: converted, with a record beside each image.
    let events = RefCell::new(Vec::new());
    let first = parma_layer::build_reusing(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap();
    assert_eq!(cached(&events), 0);
    for layer in &first.layers.layers {
        assert!(out.join(format!("{}.json", layer.diff_id.hex())).is_file());
    }
    // Again: both reused, the same result.
    let events = RefCell::new(Vec::new());
    let again = parma_layer::build_reusing(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap();
    assert_eq!(cached(&events), 2);
    assert_eq!(again, first);
    check_output(&out);
    no_temporaries(&out);

    // The first image swapped for the second's, its record claiming it (a
    // poisoned cache): build_reusing takes it (the guest would refuse its
    // root hash), build converts it again and gives the true root hash.
    let [a, b] = [&first.layers.layers[0], &first.layers.layers[1]];
    let record = |layer: &parma_layer::LayerRecord| out.join(format!("{}.json", layer.diff_id.hex()));
    std::fs::copy(out.join(&b.file), out.join(&a.file)).unwrap();
    let mut forged: serde_json::Value = serde_json::from_slice(&std::fs::read(record(a)).unwrap()).unwrap();
    forged["record"]["root_hash"] = b.root_hash.clone().into();
    forged["record"]["file_size"] = b.file_size.into();
    std::fs::write(record(a), serde_json::to_vec(&forged).unwrap()).unwrap();
    let poisoned = parma_layer::build_reusing(&oci, None, &out, &|_| {}).unwrap();
    assert_eq!(poisoned.layers.layers[0].root_hash, b.root_hash);
    let events = RefCell::new(Vec::new());
    let rebuilt = build(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap();
    assert_eq!(cached(&events), 0);
    assert_eq!(rebuilt, first);
    check_output(&out);

    // An image changed after its record, of another size, another format,
    // or a record that is not one: converted again.
    let image = out.join(&a.file);
    let bump = |path: &std::path::Path| {
        let file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    };
    bump(&image);
    let mut format: serde_json::Value = serde_json::from_slice(&std::fs::read(record(b)).unwrap()).unwrap();
    format["format"] = (parma_layer::IMAGE_FORMAT + 1).into();
    std::fs::write(record(b), serde_json::to_vec(&format).unwrap()).unwrap();
    let events = RefCell::new(Vec::new());
    assert_eq!(parma_layer::build_reusing(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap(), first);
    assert_eq!(cached(&events), 0);
    std::fs::OpenOptions::new().append(true).open(&image).unwrap().set_len(a.file_size + 4096).unwrap();
    std::fs::write(record(b), b"not json").unwrap();
    let events = RefCell::new(Vec::new());
    assert_eq!(parma_layer::build_reusing(&oci, None, &out, &|p| events.borrow_mut().push(p)).unwrap(), first);
    assert_eq!(cached(&events), 0);
    check_output(&out);
}
