//! Random trees: whatever the tar holds, the built image passes e2fsck and
//! veritysetup, and debugfs shows every entry as the tar has it.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Raw {
    path: Vec<u8>,
    kind: u8,
    mode: u32,
    uid: u64,
    size: usize,
    gnu: bool,
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "dd", "long-name-of-120-bytes"]), 1..4),
        0u8..6,
        0u32..0o7777,
        0u64..70_000,
        0usize..20_000,
        any::<bool>(),
    )
        .prop_map(|(names, kind, mode, uid, size, gnu)| {
            let names: Vec<String> =
                names.iter().map(|n| if n.starts_with("long") { "L".repeat(120) } else { (*n).to_owned() }).collect();
            Raw { path: names.join("/").into_bytes(), kind, mode, uid, size, gnu }
        })
}

/// Turn random entries into a valid layer: no path twice, nothing under a
/// non-directory, hard links only to earlier files.
fn tree(raws: Vec<Raw>) -> Vec<E> {
    let mut dirs: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut others: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    for (i, r) in raws.into_iter().enumerate() {
        let parents: Vec<&[u8]> =
            r.path.iter().enumerate().filter(|&(_, &b)| b == b'/').map(|(j, _)| &r.path[..j]).collect();
        if dirs.contains(&r.path) || others.contains(&r.path) || parents.iter().any(|p| others.contains(*p)) {
            continue;
        }
        for p in parents {
            dirs.insert(p.to_vec());
        }
        let data: Vec<u8> = (0..r.size).map(|j| (j * 7 + i) as u8).collect();
        let kind = match r.kind {
            0 => Kind::Dir,
            1 | 2 => Kind::File(data),
            3 => Kind::Symlink(format!("target-{}", "t".repeat(r.size % 150)).into_bytes()),
            4 if !files.is_empty() => Kind::HardLink(files[r.size % files.len()].clone()),
            4 => Kind::Fifo,
            _ => Kind::Char((r.size % 300) as u32, r.uid as u32 % 1000),
        };
        let mut e = E::new(&r.path, kind).mode(r.mode).owner(r.uid, r.uid / 3);
        e.mtime = 1_500_000_000 + r.uid;
        if !r.gnu {
            e = e.pax();
        }
        if r.kind == 2 {
            e = e.xattr("user.random", format!("value {}", r.size));
        }
        match e.kind {
            Kind::Dir => {
                dirs.insert(r.path.clone());
            }
            Kind::File(_) => {
                files.push(r.path.clone());
                others.insert(r.path.clone());
            }
            _ => {
                others.insert(r.path.clone());
            }
        }
        out.push(e);
    }
    // Directories listed after their children get the listed metadata;
    // directories never listed stay implicit.
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_build_and_read_back(raws in prop::collection::vec(raw(), 1..16), gzip in any::<bool>()) {
        let entries = tree(raws);
        let tar = tar_of(&entries);
        let tmp = tempfile::tempdir().unwrap();
        let oci = tmp.path().join("oci");
        oci_layout(&oci, &[Layer::new(&tar, if gzip { Comp::Gzip } else { Comp::None })], None);
        let out = tmp.path().join("out");
        parma_layer::build(&oci, None, &out, &|_| {}).unwrap();
        let json = check_output(&out);
        let image = out.join(json["layers"][0]["file"].as_str().unwrap());
        for e in &entries {
            check_entry(&image, e, &format!("/{}", String::from_utf8_lossy(&e.path)));
        }
    }
}
