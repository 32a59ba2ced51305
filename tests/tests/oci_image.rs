//! The end-to-end tests' OCI image: `parma_layer::build` takes it (two
//! layers, the config as written, the whiteout as a 0:0 character device,
//! the opaque directory marked), and it is the same bytes when built twice.
//!
//! A missing `oci-hello` or busybox is a failure, never a skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use parma_tests::Paths;
use parma_tests::oci::{self, TestImage};

fn hello() -> anyhow::Result<PathBuf> {
    Paths::get().guest_binary("oci-hello")
}

/// `debugfs -R REQUEST IMAGE`'s stdout; fails on any error it reports.
fn debugfs(image: &Path, request: &str) -> anyhow::Result<String> {
    let out = Command::new("/sbin/debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .context("cannot run /sbin/debugfs (install e2fsprogs: scripts/deps.sh)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    ensure!(out.status.success() && errors.is_empty(), "debugfs -R {request:?}: {stderr}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line of `debugfs ls -l` output naming `name`, split into fields:
/// inode, mode, `(file type)`, uid, gid, size, date, time, name.
fn ls_entry(listing: &str, name: &str) -> Option<Vec<String>> {
    listing
        .lines()
        .find(|l| l.split_whitespace().last() == Some(name))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(next) = todo.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.strip_prefix(dir)?.to_owned(), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

#[test]
fn test_image_builds_into_layer_images() -> anyhow::Result<()> {
    let hello = hello()?;
    let dir = tempfile::Builder::new().prefix("parma-oci-image-").tempdir()?;
    let image = oci::build_test_image(&dir.path().join("oci"), &hello)?;
    assert_eq!(image.reference, oci::REF_NAME);
    assert_eq!(image.diff_ids.len(), 2);

    let out = dir.path().join("layers");
    let built = parma_layer::build(&image.layout, Some(&image.reference), &out, &|_| {})?;
    assert_eq!(built.layers.manifest_digest, Some(image.manifest_digest));
    let diff_ids: Vec<_> = built.layers.layers.iter().map(|l| l.diff_id).collect();
    assert_eq!(diff_ids, image.diff_ids);

    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&built.config_json)?)?;
    assert_eq!(
        config,
        serde_json::json!({
            "entrypoint": ["/usr/bin/oci-hello"],
            "cmd": [],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"],
            "working_dir": "/srv",
            "user": "1000:1000",
            "labels": {},
            "exposed_ports": [],
        })
    );

    let base = out.join(&built.layers.layers[0].file);
    let app = out.join(&built.layers.layers[1].file);
    // The base layer: busybox and its links, /srv for the app user, /tmp sticky.
    let bin = debugfs(&base, "ls -l /bin")?;
    for tool in oci::BUSYBOX_TOOLS {
        let entry = ls_entry(&bin, tool).with_context(|| format!("no /bin/{tool}:\n{bin}"))?;
        assert_eq!(entry[1..3], ["120777", "(7)"], "/bin/{tool} is a symlink: {entry:?}");
    }
    let root = debugfs(&base, "ls -l /")?;
    let srv = ls_entry(&root, "srv").context("no /srv")?;
    assert_eq!(srv[1..5], ["40755", "(2)", "1000", "1000"], "{srv:?}");
    let tmp = ls_entry(&root, "tmp").context("no /tmp")?;
    assert_eq!(tmp[1], "41777", "{tmp:?}");
    let removed = debugfs(&base, "cat /etc/remove-me")?;
    assert_eq!(removed, oci::REMOVED_TEXT);
    // The device nodes a hostile image could bring, kept as nodes.
    let devices = debugfs(&base, "ls -l /layer-dev")?;
    for (name, block, ..) in oci::LAYER_DEVICES {
        let entry = ls_entry(&devices, name).with_context(|| format!("no /layer-dev/{name}:\n{devices}"))?;
        assert_eq!(entry[1], if block { "60666" } else { "20666" }, "{entry:?}");
    }

    // The app layer: the whiteout is a 0:0 character device, /opt/old is opaque.
    let etc = debugfs(&app, "ls -l /etc")?;
    let whiteout = ls_entry(&etc, "remove-me").with_context(|| format!("no whiteout in /etc:\n{etc}"))?;
    assert_eq!(whiteout[1..5], ["20000", "(3)", "0", "0"], "{etc}");
    let stat = debugfs(&app, "stat /etc/remove-me")?;
    assert!(stat.contains("Device major/minor number: 00:00 "), "{stat}");
    assert!(!etc.contains(".wh."), "{etc}");
    let opaque = debugfs(&app, "ea_list /opt/old")?;
    assert!(opaque.contains("trusted.overlay.opaque") && opaque.contains("\"y\""), "{opaque}");
    let old = debugfs(&app, "ls /opt/old")?;
    assert!(old.contains("new.txt") && !old.contains(".wh."), "{old}");
    let usr_bin = debugfs(&app, "ls -l /usr/bin")?;
    ls_entry(&usr_bin, "parma-probe").context("no /usr/bin/parma-probe")?;
    let program = ls_entry(&usr_bin, "oci-hello").context("no /usr/bin/oci-hello")?;
    assert_eq!(program[1..5], ["100755", "(1)", "0", "0"], "{program:?}");
    assert_eq!(program[5].parse::<u64>()?, std::fs::metadata(&hello)?.len());
    Ok(())
}

#[test]
fn test_image_is_reproducible() -> anyhow::Result<()> {
    let hello = hello()?;
    let dir = tempfile::Builder::new().prefix("parma-oci-image-").tempdir()?;
    let build = |name: &str| -> anyhow::Result<(TestImage, BTreeMap<PathBuf, Vec<u8>>)> {
        let image = oci::build_test_image(&dir.path().join(name), &hello)?;
        let files = tree(&image.layout)?;
        Ok((image, files))
    };
    let (first, first_files) = build("one")?;
    let (second, second_files) = build("two")?;
    assert_eq!(first.manifest_digest, second.manifest_digest);
    assert_eq!(first.diff_ids, second.diff_ids);
    // oci-layout, index.json, the manifest, the config and two layers.
    assert_eq!(first_files.len(), 6, "{:?}", first_files.keys());
    ensure!(first_files == second_files, "two builds of the test image differ");
    Ok(())
}

#[test]
fn a_dynamic_program_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("parma-oci-image-").tempdir()?;
    // This test binary needs the host's libc and loader.
    let dynamic = std::env::current_exe()?;
    let err = oci::build_test_image(dir.path(), &dynamic).expect_err("a dynamic entrypoint");
    assert!(format!("{err:#}").contains("is not a static x86-64 ELF program"), "{err:#}");
    Ok(())
}
