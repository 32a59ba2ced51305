//! Images checked with the real e2fsprogs: `e2fsck -fn` must be silent and
//! `debugfs` must show what was written.

mod common;

use std::io::{Read, Seek, SeekFrom};

use common::{debugfs, dump, fsck, sha256, writer};
use parma_ext4::{Error, Metadata, Options, Special, Timestamp, Writer, Xattr};

/// Deterministic bytes for a file: every byte a function of its offset.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn meta(mode: u32, uid: u32, gid: u32) -> Metadata {
    Metadata::new(mode, uid, gid)
}

fn stat(image: &std::path::Path, path: &str) -> String {
    debugfs(image, &format!("stat {path}"))
}

/// One image with every kind of entry; debugfs must read each back.
#[test]
fn every_kind_of_entry_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = writer(dir.path());

    let mut root = meta(0o755, 0, 0);
    root.mtime = Timestamp::new(1_700_000_000, 5);
    w.set_metadata("/", &root).unwrap();

    let mut etc = meta(0o755, 0, 0);
    etc.atime = Timestamp::new(1_600_000_000, 123_456_789);
    etc.mtime = Timestamp::new(-86_400, 0); // 1969-12-31
    etc.ctime = Timestamp::new(4_102_444_800, 999_999_999); // 2100-01-01
    w.add_dir("/etc", &etc).unwrap();
    w.add_dir("etc/sub", &meta(0o1777, 100_000, 2_000_000_000)).unwrap();

    // Files of sizes around block boundaries, contents compared by sha256.
    let sizes = [0usize, 1, 59, 4095, 4096, 4097, 100_000, 1 << 20, (1 << 20) + 3];
    for (i, &size) in sizes.iter().enumerate() {
        let data = content(i as u64, size);
        let mode = if i % 2 == 0 { 0o644 } else { 0o4755 };
        w.add_file(format!("/etc/f{i}"), &meta(mode, i as u32, 70_000 + i as u32), size as u64, &data[..]).unwrap();
    }
    w.add_file("/etc/sub/hello", &meta(0o600, 1, 2), 12, &b"hello world\n"[..]).unwrap();

    // Symlinks: fast (under 60 bytes), slow (60 and more), the longest.
    let long59 = "a".repeat(59);
    let long60 = "b".repeat(60);
    let long4095 = "c/".repeat(2047) + "c";
    w.add_symlink("/etc/fast", &meta(0o777, 0, 0), b"sub/hello").unwrap();
    w.add_symlink("/etc/l59", &meta(0o777, 0, 0), long59.as_bytes()).unwrap();
    w.add_symlink("/etc/l60", &meta(0o777, 0, 0), long60.as_bytes()).unwrap();
    w.add_symlink("/etc/l4095", &meta(0o777, 0, 0), long4095.as_bytes()).unwrap();

    // Hard links: three names for one inode, one to a symlink.
    w.add_hard_link("/etc/link1", "/etc/sub/hello").unwrap();
    w.add_hard_link("/link2", "etc/link1").unwrap();
    w.add_hard_link("/etc/fastlink", "/etc/fast").unwrap();

    // Devices (old and new encodings), fifo, socket, overlay whiteout.
    w.add_special("/etc/null", &meta(0o666, 0, 0), Special::CharDevice { major: 1, minor: 3 }).unwrap();
    w.add_special("/etc/sda", &meta(0o660, 0, 6), Special::BlockDevice { major: 8, minor: 0 }).unwrap();
    w.add_special("/etc/big", &meta(0o600, 0, 0), Special::BlockDevice { major: 4095, minor: 1_048_575 }).unwrap();
    w.add_special("/etc/nvme", &meta(0o600, 0, 0), Special::CharDevice { major: 259, minor: 300 }).unwrap();
    w.add_special("/etc/fifo", &meta(0o644, 0, 0), Special::Fifo).unwrap();
    w.add_special("/etc/sock", &meta(0o755, 0, 0), Special::Socket).unwrap();
    w.add_special("/etc/gone", &meta(0, 0, 0), Special::CharDevice { major: 0, minor: 0 }).unwrap();

    // xattrs: inline (small), in a block (large), ACLs, on every kind.
    let cap = {
        // vfs_cap_data revision 2: cap_net_bind_service permitted+effective.
        let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
        v.extend_from_slice(&(1u32 << 10).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        v
    };
    let mut opaque = meta(0o755, 0, 0);
    opaque.xattrs = vec![Xattr::new("trusted.overlay.opaque", "y")];
    w.add_dir("/opaque", &opaque).unwrap();
    let mut capped = meta(0o755, 0, 0);
    capped.xattrs = vec![Xattr::new("security.capability", cap.clone())];
    w.add_file("/ping", &capped, 5, &b"ping\n"[..]).unwrap();
    let big_value = content(99, 3000);
    let mut blocky = meta(0o644, 0, 0);
    blocky.xattrs = vec![
        Xattr::new("user.big", big_value.clone()),
        Xattr::new("user.empty", ""),
        Xattr::new("trusted.overlay.opaque", "y"),
        Xattr::new("security.selinux", "system_u:object_r:bin_t:s0\0"),
    ];
    w.add_file("/blocky", &blocky, 3, &b"abc"[..]).unwrap();
    let acl = {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in
            [(1u16, 7u16, u32::MAX), (2, 5, 1000), (4, 5, u32::MAX), (0x10, 5, u32::MAX), (0x20, 0, u32::MAX)]
        {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    };
    let mut acled = meta(0o750, 0, 0);
    acled.xattrs = vec![Xattr::new("system.posix_acl_access", acl.clone())];
    w.add_dir("/acl", &acled).unwrap();
    let mut xlink = meta(0o777, 0, 0);
    xlink.xattrs = vec![Xattr::new("user.on-a-symlink", "1")];
    w.add_symlink("/xlink", &xlink, b"/etc").unwrap();

    let size = w.finish().unwrap();
    assert_eq!(size % 4096, 0);
    assert_eq!(size, std::fs::metadata(&image).unwrap().len());
    fsck(&image);

    // Names and kinds.
    let ls = debugfs(&image, "ls -l /etc");
    for name in [
        "f0", "f8", "sub", "fast", "l59", "l60", "l4095", "link1", "fastlink", "null", "sda", "big", "nvme", "fifo",
        "sock", "gone",
    ] {
        assert!(ls.split_whitespace().any(|w| w == name), "{name} missing from:\n{ls}");
    }

    // Root metadata and link counts: 2 + subdirectories.
    let s = stat(&image, "/");
    assert!(s.contains("Type: directory    Mode:  0755"), "{s}");
    assert!(s.contains("Links: 5"), "{s}"); // etc, opaque, acl
    assert!(s.contains(&format!("mtime: 0x{:08x}:{:08x}", 1_700_000_000u32, 5 << 2)), "{s}");
    let s = stat(&image, "/etc");
    assert!(s.contains("Links: 3"), "{s}");
    assert!(s.contains(&format!("atime: 0x{:08x}:{:08x}", 1_600_000_000u32, 123_456_789u32 << 2)), "{s}");
    assert!(s.contains(&format!("mtime: 0x{:08x}:{:08x}", (-86_400i32) as u32, 0)), "{s}");
    // 2100 is past 2038: low word wraps, epoch bit 1.
    let ctime_lo = 4_102_444_800u64 as u32;
    assert!(s.contains(&format!(" ctime: 0x{ctime_lo:08x}:{:08x}", (999_999_999u32 << 2) | 1)), "{s}");
    let s = stat(&image, "/etc/sub");
    assert!(s.contains("Mode:  01777"), "{s}");
    assert!(s.contains("User: 100000   Group: 2000000000"), "{s}");

    // File contents, sizes, owners, modes.
    for (i, &size) in sizes.iter().enumerate() {
        let path = format!("/etc/f{i}");
        let s = stat(&image, &path);
        assert!(s.contains(&format!("Size: {size}\n")), "{path}: {s}");
        let mode = if i % 2 == 0 { "0644" } else { "04755" };
        assert!(s.contains(&format!("Type: regular    Mode:  {mode}")), "{path}: {s}");
        assert!(s.contains(&format!("User: {:>5}   Group: {}", i, 70_000 + i)), "{path}: {s}");
        assert_eq!(sha256(&dump(&image, &path)), sha256(&content(i as u64, size)), "{path}");
    }
    assert_eq!(debugfs(&image, "cat /etc/sub/hello"), "hello world\n");
    assert_eq!(debugfs(&image, "cat /link2"), "hello world\n");
    assert!(stat(&image, "/etc/sub/hello").contains("Links: 3"));
    assert!(stat(&image, "/etc/fast").contains("Links: 2"));

    // Symlinks.
    let s = stat(&image, "/etc/fast");
    assert!(s.contains("Fast link dest: \"sub/hello\""), "{s}");
    assert!(stat(&image, "/etc/l59").contains(&format!("Fast link dest: \"{long59}\"")));
    for (path, target) in [("/etc/l60", &long60), ("/etc/l4095", &long4095)] {
        let s = stat(&image, path);
        assert!(s.contains(&format!("Size: {}\n", target.len())) && s.contains("EXTENTS"), "{path}: {s}");
        assert_eq!(dump(&image, path), target.as_bytes(), "{path}");
    }

    // Devices and other specials.
    for (path, kind, major, minor) in [
        ("/etc/null", "character special", 1, 3),
        ("/etc/sda", "block special", 8, 0),
        ("/etc/big", "block special", 4095, 1_048_575),
        ("/etc/nvme", "character special", 259, 300),
        ("/etc/gone", "character special", 0, 0),
    ] {
        let s = stat(&image, path);
        assert!(s.contains(&format!("Type: {kind}")), "{path}: {s}");
        assert!(s.contains(&format!("Device major/minor number: {major:02}:{minor:02} ")), "{path}: {s}");
    }
    assert!(stat(&image, "/etc/fifo").contains("Type: FIFO"));
    assert!(stat(&image, "/etc/sock").contains("Type: socket"));
    assert!(stat(&image, "/etc/gone").contains("Mode:  0000"));

    // xattrs.
    let ea = debugfs(&image, "ea_list /opaque");
    assert!(ea.contains("trusted.overlay.opaque (1) = \"y\""), "{ea}");
    assert!(stat(&image, "/opaque").contains("File ACL: 0"), "inline expected");
    let ea = debugfs(&image, "ea_list /ping");
    let cap_hex: String = cap.iter().map(|b| format!("{b:02x} ")).collect();
    assert!(ea.contains(&format!("security.capability (20) = {cap_hex}")), "{ea}");
    let s = stat(&image, "/blocky");
    assert!(!s.contains("File ACL: 0\n"), "xattr block expected: {s}");
    let ea = debugfs(&image, "ea_list /blocky");
    for needle in ["user.big (3000)", "user.empty (0)", "trusted.overlay.opaque (1) = \"y\"", "security.selinux (27)"] {
        assert!(ea.contains(needle), "{needle}: {ea}");
    }
    let got = dump_xattr(&image, "/blocky", "user.big");
    assert_eq!(sha256(&got), sha256(&big_value));
    // e2fsprogs renders the ids of owner/group/mask/other entries as 0 (the
    // kernel as -1); named entries keep theirs.
    let mut acl_as_e2fsprogs_shows = acl.clone();
    for entry in acl_as_e2fsprogs_shows[4..].chunks_mut(8) {
        if !matches!(entry[0], 2 | 8) {
            entry[4..].fill(0);
        }
    }
    assert_eq!(dump_xattr(&image, "/acl", "system.posix_acl_access"), acl_as_e2fsprogs_shows);
    assert!(debugfs(&image, "ea_list /xlink").contains("user.on-a-symlink (1) = \"1\""));
}

/// `ea_get -f OUT PATH NAME`: an xattr's raw value.
fn dump_xattr(image: &std::path::Path, path: &str, name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("value");
    debugfs(image, &format!("ea_get -f {} {path} {name}", out.display()));
    std::fs::read(out).unwrap()
}

#[test]
fn ten_thousand_entries_in_one_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = writer(dir.path());
    w.add_dir("/big", &meta(0o755, 0, 0)).unwrap();
    for i in 0..10_000u32 {
        let path = format!("/big/entry-with-a-longish-name-{i:05}");
        if i % 10 == 0 {
            w.add_dir(&path, &meta(0o700, i, i)).unwrap();
        } else {
            let data = i.to_le_bytes();
            w.add_file(&path, &meta(0o644, i, i), 4, &data[..]).unwrap();
        }
    }
    w.finish().unwrap();
    fsck(&image);
    let ls = debugfs(&image, "ls /big");
    let names = ls.split_whitespace().filter(|w| w.starts_with("entry-with")).count();
    assert_eq!(names, 10_000);
    let s = stat(&image, "/big");
    assert!(s.contains("Links: 1002"), "{s}");
    // The directory spans many blocks.
    let size: u64 = s.split("Size: ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(size > 50 * 4096, "{size}");
    assert_eq!(dump(&image, "/big/entry-with-a-longish-name-09999"), 9999u32.to_le_bytes());
    assert!(stat(&image, "/big/entry-with-a-longish-name-05000").contains("Type: directory    Mode:  0700"));
}

/// More than 65536 inodes: groups are added for inodes alone (the last,
/// group 2, holds no superblock copy and is a single block).
#[test]
fn more_inodes_than_two_groups_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = writer(dir.path());
    for d in 0..9 {
        w.add_dir(format!("/d{d}"), &meta(0o755, 0, 0)).unwrap();
        for i in 0..8_000 {
            w.add_file(format!("/d{d}/{i}"), &meta(0o644, 0, 0), 0, std::io::empty()).unwrap();
        }
    }
    w.finish().unwrap();
    fsck(&image);
    let super_info = debugfs(&image, "stats");
    assert!(super_info.contains("Inode count:              72"), "{super_info}");
    assert!(super_info.contains("Block count:              65537\n"), "{super_info}");
    assert!(stat(&image, "/d8/7999").contains("Type: regular"));
}

/// A generated file: every 4 KiB block is a fixed pattern stamped with its
/// block number, so any block can be checked without keeping the data.
struct Pattern {
    pos: u64,
    len: u64,
}

fn pattern_block() -> Vec<u8> {
    content(7, 4096)
}

fn expected_block(block: u64, template: &[u8]) -> Vec<u8> {
    let mut b = template.to_vec();
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        thread_local!(static TEMPLATE: Vec<u8> = pattern_block());
        let want = (buf.len() as u64).min(self.len - self.pos) as usize;
        let mut done = 0;
        TEMPLATE.with(|t| {
            while done < want {
                let block = self.pos / 4096;
                let at = (self.pos % 4096) as usize;
                let n = (4096 - at).min(want - done);
                let full = expected_block(block, t);
                buf[done..done + n].copy_from_slice(&full[at..at + n]);
                done += n;
                self.pos += n as u64;
            }
        });
        Ok(done)
    }
}

/// A file over 512 MiB: crosses superblock backups (groups 1 and 3), needs
/// more than 4 extents and so an extent index block.
#[test]
fn large_file_gets_an_extent_tree() {
    let len = (600u64 << 20) + 1234;
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = writer(dir.path());
    w.add_dir("/data", &meta(0o755, 0, 0)).unwrap();
    w.add_file("/data/small-before", &meta(0o644, 0, 0), 3, &b"abc"[..]).unwrap();
    w.add_file("/data/large", &meta(0o644, 0, 0), len, Pattern { pos: 0, len }).unwrap();
    w.add_file("/data/small-after", &meta(0o644, 0, 0), 3, &b"xyz"[..]).unwrap();
    let size = w.finish().unwrap();
    assert!(size > len);
    fsck(&image);

    let s = stat(&image, "/data/large");
    assert!(s.contains(&format!("Size: {len}\n")), "{s}");
    assert!(s.contains("(ETB0)"), "an extent index block expected: {s}");
    assert_eq!(debugfs(&image, "cat /data/small-after"), "xyz");

    // Sampled content: the first, last and a spread of blocks between.
    let dumped = dir.path().join("large");
    debugfs(&image, &format!("dump /data/large {}", dumped.display()));
    let mut f = std::fs::File::open(&dumped).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len);
    let template = pattern_block();
    let last = len / 4096;
    let mut got_all = Vec::new();
    let mut want_all = Vec::new();
    for i in 0..=64u64 {
        let block = last * i / 64;
        let want = expected_block(block, &template);
        let n = (len - block * 4096).min(4096) as usize;
        let mut got = vec![0u8; n];
        f.seek(SeekFrom::Start(block * 4096)).unwrap();
        f.read_exact(&mut got).unwrap();
        assert_eq!(got, want[..n], "block {block}");
        got_all.extend_from_slice(&got);
        want_all.extend_from_slice(&want[..n]);
    }
    assert_eq!(sha256(&got_all), sha256(&want_all));
}

fn sample_tree(options: Options) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut w = Writer::new(&mut out, options).unwrap();
    let mut m = meta(0o755, 1, 2);
    m.mtime = Timestamp::new(1_234_567_890, 42);
    m.xattrs = vec![Xattr::new("user.a", "b"), Xattr::new("user.big", vec![3u8; 500])];
    w.add_dir("/a", &m).unwrap();
    w.add_dir("/a/b", &meta(0o700, 0, 0)).unwrap();
    for i in 0..50u64 {
        let data = content(i, (i * 997) as usize);
        w.add_file(format!("/a/b/f{i}"), &m, data.len() as u64, &data[..]).unwrap();
    }
    w.add_symlink("/a/s", &m, &[b'x'; 80]).unwrap();
    w.add_hard_link("/a/h", "/a/b/f3").unwrap();
    w.add_special("/a/wh", &m, Special::CharDevice { major: 0, minor: 0 }).unwrap();
    w.finish().unwrap();
    out.into_inner()
}

#[test]
fn same_entries_give_the_same_bytes() {
    let one = sample_tree(common::options());
    let two = sample_tree(common::options());
    assert_eq!(one.len() % 4096, 0);
    assert!(one == two, "two builds differ");
    let mut other = common::options();
    other.uuid[0] ^= 1;
    assert!(sample_tree(other) != one, "the UUID must reach the image");

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::write(&image, &one).unwrap();
    fsck(&image);
}

#[test]
fn bad_entries_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let (image, mut w) = writer(dir.path());
    let m = meta(0o644, 0, 0);
    w.add_dir("/d", &meta(0o755, 0, 0)).unwrap();
    w.add_file("/d/f", &m, 1, &b"x"[..]).unwrap();

    let long = "n".repeat(256);
    let cases: Vec<(String, Error)> = vec![
        ("/d/f".into(), w.add_dir("/d/f", &m).unwrap_err()),
        ("/d/f".into(), w.add_file("/d/f", &m, 0, std::io::empty()).unwrap_err()),
        ("/missing/x".into(), w.add_dir("/missing/x", &m).unwrap_err()),
        ("/d/f/x".into(), w.add_dir("/d/f/x", &m).unwrap_err()),
        (format!("/d/{long}"), w.add_dir(format!("/d/{long}"), &m).unwrap_err()),
        ("/d/.".into(), w.add_dir("/d/.", &m).unwrap_err()),
        ("/d/..".into(), w.add_dir("/d/..", &m).unwrap_err()),
        ("/d//x".into(), w.add_dir("/d//x", &m).unwrap_err()),
        ("/d/x/".into(), w.add_dir("/d/x/", &m).unwrap_err()),
        ("/d/n\u{0}ul".into(), w.add_dir("/d/n\0ul", &m).unwrap_err()),
        ("/".into(), w.add_dir("/", &m).unwrap_err()),
        ("/d/hl".into(), w.add_hard_link("/d/hl", "/d").unwrap_err()),
        ("/d/hl".into(), w.add_hard_link("/d/hl", "/d/nope").unwrap_err()),
        ("/d/m".into(), w.add_dir("/d/m", &meta(0o100755, 0, 0)).unwrap_err()),
        ("/d/s".into(), w.add_symlink("/d/s", &m, b"").unwrap_err()),
        ("/d/s".into(), w.add_symlink("/d/s", &m, &[b'x'; 4096]).unwrap_err()),
        ("/d/s".into(), w.add_symlink("/d/s", &m, b"a\0b").unwrap_err()),
        ("/d/dev".into(), w.add_special("/d/dev", &m, Special::CharDevice { major: 4096, minor: 0 }).unwrap_err()),
        ("/nope".into(), w.set_metadata("/nope", &m).unwrap_err()),
    ];
    for (path, err) in &cases {
        let text = err.to_string();
        assert!(text.starts_with(&format!("{path}: ")), "{text:?} should name {path:?}");
    }
    assert!(matches!(cases[0].1, Error::AlreadyExists { .. }));
    assert!(matches!(cases[2].1, Error::ParentNotFound { .. }));
    assert!(matches!(cases[3].1, Error::ParentNotDirectory { .. }));
    assert!(matches!(cases[4].1, Error::NameTooLong { .. }));
    assert!(matches!(cases[5].1, Error::InvalidPath { .. }));
    assert!(matches!(cases[11].1, Error::LinkToDirectory { .. }));
    assert!(matches!(cases[12].1, Error::LinkTargetNotFound { .. }));
    assert!(matches!(cases[13].1, Error::InvalidMode { .. }));

    let with = |name: &str, value: Vec<u8>| {
        let mut m = meta(0o644, 0, 0);
        m.xattrs = vec![Xattr::new(name, value)];
        m
    };
    for (name, value) in
        [("os2.x", vec![]), ("user.", vec![]), ("system.foo", vec![]), ("system.posix_acl_access", vec![1])]
    {
        let err = w.add_dir("/d/x", &with(name, value)).unwrap_err();
        assert!(matches!(err, Error::InvalidXattr { .. }), "{name}: {err}");
    }
    let err = w.add_dir("/d/x", &with("user.huge", vec![0; 5000])).unwrap_err();
    assert!(matches!(err, Error::XattrsTooLarge { .. }), "{err}");
    let mut twice = meta(0o644, 0, 0);
    twice.xattrs = vec![Xattr::new("user.a", "1"), Xattr::new("user.a", "2")];
    assert!(matches!(w.add_dir("/d/x", &twice), Err(Error::InvalidXattr { .. })));
    let mut bad_time = meta(0o644, 0, 0);
    bad_time.mtime = Timestamp::new(0, 1_000_000_000);
    assert!(matches!(w.add_dir("/d/x", &bad_time), Err(Error::InvalidTimestamp { .. })));

    // Refused entries leave the writer usable and the image clean.
    w.add_dir("/d/x", &meta(0o755, 0, 0)).unwrap();
    w.finish().unwrap();
    fsck(&image);
}

#[test]
fn short_data_poisons_the_writer() {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut w = Writer::new(&mut out, common::options()).unwrap();
    let err = w.add_file("/f", &meta(0o644, 0, 0), 10_000, &[1u8; 100][..]).unwrap_err();
    assert!(matches!(err, Error::ShortRead { read: 100, expected: 10_000, .. }), "{err}");
    assert!(err.to_string().starts_with("/f: "));
    assert!(matches!(w.add_dir("/d", &meta(0o755, 0, 0)), Err(Error::Poisoned)));
    assert!(matches!(w.finish(), Err(Error::Poisoned)));
}
