//! containerd's own client, `ctr`, without Kubernetes: Debian's containerd
//! 1.6 (started by the test, in its own directory and network namespace),
//! `ctr images pull --snapshotter parma` (no CRI labels: the snapshotter
//! finds each layer's blob through the image's manifest), then
//! `parma policy gen --spec '{"runtime": "containerd", …}'`, then
//! `ctr run --runtime io.containerd.parma.v2 --annotation "$(parma policy
//! annotation --ctr policy.rego)"` (the README's flow):
//! the container runs in its own UVM under the policy, its output on ctr's
//! stdout; a command the policy does not allow and a container without a
//! policy are refused with the reason; nothing is left behind.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, ensure};
use parma_tests::containerd::{Containerd, NAMESPACE};
use parma_tests::{Paths, oci};

/// The container spec the policy is generated from (`parma policy gen
/// --spec`): what `ctr run IMAGE ID /usr/bin/oci-hello from-ctr` asks for.
fn ctr_spec() -> serde_json::Value {
    serde_json::json!({"runtime": "containerd", "name": "hello", "command": [oci::ENTRYPOINT, "from-ctr"]})
}

fn ctr(containerd: &Containerd, args: &[&str]) -> anyhow::Result<Output> {
    // In the test's network namespace: the registry is on its loopback.
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", containerd.netns))
        .arg("ctr")
        .arg("--address")
        .arg(containerd.socket())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run ctr")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn ctr_pulls_and_runs_a_confidential_container() -> anyhow::Result<()> {
    let paths = Paths::get();
    let work = tempfile::tempdir()?;
    let image = oci::build_test_image(&work.path().join("oci"), &paths.guest_binary("oci-hello")?)?;
    let (shim_config, shim_state) = parma_tests::containerd::shim_config(work.path(), &paths.uvm, 512, 8)?;
    let containerd = Containerd::start(&paths.repo, Some(&shim_config))?;
    let target = containerd.push(&image.layout, &image.reference, "parma/ctr:1")?;
    let layers = work.path().join("layers");
    let spec = work.path().join("spec.json");
    std::fs::write(&spec, serde_json::to_vec(&ctr_spec())?)?;
    // As the README shows it: parma policy gen, then the annotation for ctr.
    let parma = paths.repo.join("target/release/parma");
    let policy = work.path().join("policy.rego");
    let generated = Command::new(&parma)
        .args(["policy", "gen", "--oci"])
        .arg(&image.layout)
        .arg("--spec")
        .arg(&spec)
        .arg("--layers-dir")
        .arg(&layers)
        .arg("--out")
        .arg(&policy)
        .output()?;
    ensure!(generated.status.success(), "parma policy gen: {}", text(&generated));
    let annotated = Command::new(&parma).args(["policy", "annotation", "--ctr"]).arg(&policy).output()?;
    ensure!(annotated.status.success(), "parma policy annotation: {}", text(&annotated));
    let annotation = String::from_utf8(annotated.stdout)?.trim_end().to_string();
    ensure!(
        annotation
            == format!(
                "{}={}",
                parma_host::annotation::POLICY_ANNOTATION,
                parma_host::annotation::encode(&std::fs::read_to_string(&policy)?)
            ),
        "{annotation}"
    );
    let diagnose = |output: &Output| {
        format!("{}\n--- snapshotter:\n{}\n--- containerd:\n{}", text(output), containerd.log("snapshotter"), {
            let log = containerd.log("containerd");
            log.lines().filter(|l| !l.contains("loading plugin")).collect::<Vec<_>>().join("\n")
        })
    };

    let pulled = ctr(&containerd, &["images", "pull", "--plain-http", "--snapshotter", "parma", &target])?;
    ensure!(pulled.status.success(), "ctr images pull: {}", diagnose(&pulled));
    // Every layer converted, to the images parma layer build makes (the
    // root hashes the policy names).
    let built = parma_layer::build(&image.layout, None, &layers, &|_| {})?;
    for layer in &built.layers.layers {
        let ours = std::fs::read(containerd.snapshotter_root().join("layers").join(&layer.file))
            .with_context(|| diagnose(&pulled))?;
        ensure!(ours == std::fs::read(layers.join(&layer.file))?, "{} differs", layer.file);
    }

    let run = |id: &str, annotation: Option<&str>, args: &[&str]| {
        let mut command = vec!["run", "--rm", "--snapshotter", "parma", "--runtime", "io.containerd.parma.v2"];
        if let Some(annotation) = annotation {
            command.extend(["--annotation", annotation]);
        }
        command.extend([target.as_str(), id]);
        command.extend(args);
        ctr(&containerd, &command)
    };

    // The container the policy allows: its output is ctr's.
    let allowed = run("hello-1", Some(&annotation), &[oci::ENTRYPOINT, "from-ctr"])?;
    let stdout = String::from_utf8_lossy(&allowed.stdout);
    ensure!(allowed.status.success(), "ctr run: {}", diagnose(&allowed));
    ensure!(stdout.contains("from-ctr") && stdout.contains("GREETING=hello"), "{}", diagnose(&allowed));

    // A command the policy does not list: refused, with the rule.
    let refused = run("hello-1", Some(&annotation), &[oci::ENTRYPOINT, "something-else"])?;
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "a command outside the policy ran: {}", text(&refused));
    ensure!(said.contains("create_container"), "{}", diagnose(&refused));
    ensure!(!String::from_utf8_lossy(&refused.stdout).contains("something-else"), "{}", text(&refused));

    // No policy at all: refused by name, no allow-all.
    let bare = run("hello-1", None, &[oci::ENTRYPOINT, "from-ctr"])?;
    ensure!(!bare.status.success(), "a container without a policy ran: {}", text(&bare));
    ensure!(
        String::from_utf8_lossy(&bare.stderr).contains(parma_host::annotation::POLICY_ANNOTATION),
        "{}",
        diagnose(&bare)
    );

    // Nothing left: no container, no task, no shim socket, no bundle.
    let listed = ctr(&containerd, &["containers", "list", "--quiet"])?;
    ensure!(listed.stdout.is_empty(), "{}", text(&listed));
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    let empty = |dir: &Path| std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
    while !empty(&shim_state) {
        ensure!(std::time::Instant::now() < give_up, "the shim's socket outlived the container");
        std::thread::sleep(Duration::from_millis(100));
    }
    let bundles = containerd.dir.path().join("state/io.containerd.runtime.v2.task").join(NAMESPACE);
    ensure!(empty(&bundles), "the bundles are gone");
    Ok(())
}
