//! Running Debian's e2fsprogs against the images under test. A missing tool
//! fails the test: these checks are the point, never skipped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use parma_ext4::{Options, Writer};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: these tests need e2fsprogs (apt-get install e2fsprogs)");
}

/// `e2fsck -fn`: exit 0 and nothing but the five pass lines and the summary.
/// With `PARMA_EXT4_KEEP=DIR` the image is also copied there, for a look
/// with other tools (a kernel mount, say).
pub fn fsck(image: &Path) {
    if let Some(keep) = std::env::var_os("PARMA_EXT4_KEEP") {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{n}.ext4", std::thread::current().name().unwrap_or("image").replace("::", "-"));
        std::fs::copy(image, Path::new(&keep).join(name)).unwrap();
    }
    let out = Command::new(tool("e2fsck")).arg("-fn").arg(image).output().expect("run e2fsck");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("e2fsck -fn exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status.code());
    assert!(out.status.success(), "{report}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{report}");
    for (i, line) in lines.iter().take(5).enumerate() {
        assert!(line.starts_with(&format!("Pass {}: ", i + 1)), "{report}");
    }
    assert!(lines[5].contains(" files (") && lines[5].ends_with(" blocks"), "{report}");
    let stderr_lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("e2fsck ")).collect();
    assert!(stderr_lines.is_empty(), "{report}");
}

/// `debugfs -R REQUEST IMAGE`, stdout; fails on a debugfs error message.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new(tool("debugfs")).arg("-R").arg(request).arg(image).output().expect("run debugfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    assert!(out.status.success() && errors.is_empty(), "debugfs -R {request:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `debugfs -R 'dump PATH OUT'`: the file's bytes.
pub fn dump(image: &Path, path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dumped");
    debugfs(image, &format!("dump {path} {}", out.display()));
    std::fs::read(&out).unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn options() -> Options {
    Options::new(*b"parma-ext4-uuid!", *b"parma-hash-seed!")
}

/// A writer on a fresh file in `dir`.
pub fn writer(dir: &Path) -> (PathBuf, Writer<std::fs::File>) {
    let path = dir.join("image.ext4");
    let file = std::fs::File::create(&path).unwrap();
    (path.clone(), Writer::new(file, options()).unwrap())
}
