//! The initrd is reproducible: a clean build of the guest binaries in a new
//! target directory packs into the same bytes as the image `make image` built.

use std::process::Command;

use anyhow::ensure;
use parma_tests::Paths;

#[test]
fn initrd_from_a_clean_build_is_identical() -> anyhow::Result<()> {
    let paths = Paths::require_image()?;
    let target = tempfile::Builder::new().prefix("parma-repro-").tempdir()?;
    let status = Command::new(paths.repo.join("scripts/build-guest.sh")).arg(target.path()).status()?;
    ensure!(status.success(), "scripts/build-guest.sh failed");
    let bin = target.path().join("x86_64-unknown-linux-gnu/guest");
    let init = std::fs::read(bin.join("parma-init"))?;
    let agent = std::fs::read(bin.join("parma-agent"))?;
    let rebuilt = parma_image::initrd::uvm(init, agent)?.to_gz()?;
    let built = std::fs::read(paths.uvm.join(parma_image::files::INITRD))?;
    let hash = |b: &[u8]| parma_image::manifest::FileDigest::of(b).sha256;
    ensure!(
        rebuilt == built,
        "a clean rebuild gives initrd {} ({} bytes), make image gave {} ({} bytes)",
        hash(&rebuilt),
        rebuilt.len(),
        hash(&built),
        built.len()
    );
    Ok(())
}
