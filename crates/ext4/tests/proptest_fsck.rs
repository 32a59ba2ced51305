//! Random small trees must always give an image `e2fsck -fn` accepts, and
//! file contents must read back.

mod common;

use parma_ext4::{Error, Metadata, Special, Timestamp, Xattr};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Dir,
    File { size: usize, seed: u8 },
    Symlink { len: usize },
    HardLink { target: usize },
    Special { kind: u8, major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    parent: usize,
    name: String,
    op: Op,
    mode: u32,
    uid: u32,
    time: (i64, u32),
    xattrs: Vec<(usize, usize)>,
}

const XATTR_NAMES: [&str; 5] =
    ["user.a", "user.longer-name", "trusted.overlay.opaque", "security.capability", "user.z"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Dir),
        4 => (0usize..20_000, any::<u8>()).prop_map(|(size, seed)| Op::File { size, seed }),
        2 => (1usize..200).prop_map(|len| Op::Symlink { len }),
        1 => any::<usize>().prop_map(|target| Op::HardLink { target }),
        1 => (0u8..4, 0u32..4096, 0u32..(1 << 20)).prop_map(|(kind, major, minor)| Op::Special { kind, major, minor }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<usize>(),
        "[a-z0-9._-]{1,20}",
        op(),
        0u32..0o7777,
        any::<u32>(),
        (-(1i64 << 31)..(1i64 << 33), 0u32..1_000_000_000),
        proptest::collection::vec((0usize..XATTR_NAMES.len(), 0usize..1000), 0..4),
    )
        .prop_map(|(parent, name, op, mode, uid, time, xattrs)| Entry {
            parent,
            name,
            op,
            mode,
            uid,
            time,
            xattrs,
        })
}

fn build(entries: &[Entry]) -> (tempfile::TempDir, std::path::PathBuf, Vec<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = common::writer(dir.path());
    let mut dirs = vec![String::new()];
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for e in entries {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let parent = &dirs[e.parent % dirs.len()];
        let path = format!("{parent}/{}", e.name);
        let mut meta = Metadata::new(e.mode, e.uid, e.uid / 3);
        meta.mtime = Timestamp::new(e.time.0, e.time.1);
        meta.atime = Timestamp::new(e.time.0 / 2, e.time.1 / 2);
        meta.xattrs = e.xattrs.iter().map(|&(n, len)| Xattr::new(XATTR_NAMES[n], vec![n as u8; len])).collect();
        let result = match &e.op {
            Op::Dir => w.add_dir(&path, &meta),
            Op::File { size, seed } => {
                let data: Vec<u8> = (0..*size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(*seed)).collect();
                let r = w.add_file(&path, &meta, data.len() as u64, &data[..]);
                if r.is_ok() {
                    files.push((path.clone(), data));
                }
                r
            }
            Op::Symlink { len } => w.add_symlink(&path, &meta, "t".repeat(*len).as_bytes()),
            Op::HardLink { target } if !files.is_empty() => {
                let target = files[target % files.len()].0.clone();
                w.add_hard_link(&path, target)
            }
            Op::HardLink { .. } => continue,
            Op::Special { kind, major, minor } => {
                let special = match kind {
                    0 => Special::CharDevice { major: *major, minor: *minor },
                    1 => Special::BlockDevice { major: *major, minor: *minor },
                    2 => Special::Fifo,
                    _ => Special::Socket,
                };
                w.add_special(&path, &meta, special)
            }
        };
        match result {
            Ok(()) if matches!(e.op, Op::Dir) => dirs.push(path),
            Ok(()) => {}
            // Random names collide, and duplicate xattr names are refused.
            Err(Error::AlreadyExists { .. } | Error::InvalidXattr { reason: "given twice", .. }) => {}
            Err(err) => panic!("{path}: {err}"),
        }
    }
    w.finish().unwrap();
    (dir, image, files)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_pass_fsck(entries in proptest::collection::vec(entry(), 1..60)) {
        let (_dir, image, files) = build(&entries);
        common::fsck(&image);
        if let Some((path, data)) = files.last() {
            prop_assert_eq!(common::sha256(&common::dump(&image, path)), common::sha256(data));
        }
    }
}
