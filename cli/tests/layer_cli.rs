//! `parma layer build` on a small OCI layout made here, checked with
//! veritysetup and e2fsck.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn blob(dir: &Path, bytes: &[u8]) -> String {
    let digest = sha(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&digest), bytes).unwrap();
    digest
}

/// A one-layer OCI layout at `oci`; returns the layer's diff-id hex.
fn make_oci(oci: &Path) -> String {
    make_oci_with(oci, &[("hello.txt", b"hello from a confidential container\n")], "1000")
}

/// A one-layer OCI layout with these files and this `User`.
fn make_oci_with(oci: &Path, files: &[(&str, &[u8])], user: &str) -> String {
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    for (name, contents) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        layer.append_data(&mut header, name, *contents).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let layer_digest = blob(oci, &layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/hello"],"Env":["PATH=/usr/bin"],"WorkingDir":"/srv","User":"{user}"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let config_digest = blob(oci, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = blob(oci, manifest.as_bytes());
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        oci.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    layer_digest
}

#[test]
fn layer_build_writes_verity_images_and_layers_json() {
    let dir = tempfile::tempdir().unwrap();
    let oci = dir.path().join("oci");
    let layer_digest = make_oci(&oci);

    let out = dir.path().join("layers");
    let run = Command::new(env!("CARGO_BIN_EXE_parma"))
        .args(["layer", "build", "--oci"])
        .arg(&oci)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let layers: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("layers.json")).unwrap()).unwrap();
    let record = &layers["layers"][0];
    assert_eq!(record["diff_id"], format!("sha256:{layer_digest}"));
    let image = out.join(record["file"].as_str().unwrap());
    let root = record["root_hash"].as_str().unwrap();
    let offset = record["hash_offset"].as_u64().unwrap().to_string();
    let verify = Command::new("veritysetup")
        .args(["verify", "--hash-offset", &offset])
        .arg(&image)
        .arg(&image)
        .arg(root)
        .output()
        .expect("veritysetup (apt-get install cryptsetup-bin)");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains(root));
}

/// An image whose `User` is a name: `parma policy gen` pins the numbers the
/// image's own /etc/passwd and /etc/group give it, with its groups.
#[test]
fn policy_gen_resolves_a_user_name_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let oci = dir.path().join("oci");
    let passwd = b"root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/srv:/sbin/nologin\n";
    let group = b"root:x:0:\napp:x:2345:\naudio:x:29:app\n";
    make_oci_with(&oci, &[("etc/passwd", passwd), ("etc/group", group), ("hello", b"x")], "app");
    let generate = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parma"))
            .args(["policy", "gen", "--oci"])
            .arg(&oci)
            .arg("--layers-dir")
            .arg(dir.path().join("layers"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = generate(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let compact: String = text.split_whitespace().collect();
    assert!(compact.contains(r#""user":{"gid":2345,"uid":1234}"#), "{text}");
    assert!(compact.contains(r#""groups":[29]"#), "{text}");

    // A name the image does not have is an error that says so.
    let dir2 = tempfile::tempdir().unwrap();
    let oci = dir2.path().join("oci");
    make_oci_with(&oci, &[("etc/passwd", passwd)], "ghost");
    let out = Command::new(env!("CARGO_BIN_EXE_parma"))
        .args(["policy", "gen", "--oci"])
        .arg(&oci)
        .arg("--layers-dir")
        .arg(dir2.path().join("layers"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(r#"user "ghost" is not in the image's /etc/passwd"#), "{stderr}");
}

#[test]
fn policy_gen_allows_exactly_what_the_image_says() {
    use parma_policy::{Engine, Point, Policy};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let oci = dir.path().join("oci");
    make_oci(&oci);
    let policy_path = dir.path().join("policy.rego");
    let layers = dir.path().join("layers");
    let run = Command::new(env!("CARGO_BIN_EXE_parma"))
        .args(["policy", "gen", "--oci"])
        .arg(&oci)
        .arg("--layers-dir")
        .arg(&layers)
        .arg("--out")
        .arg(&policy_path)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let text = std::fs::read(&policy_path).unwrap();
    let hash = parma_policy::policy_hash(&text);
    assert!(String::from_utf8_lossy(&run.stderr).contains(&hash), "the generator prints the HOST_DATA");

    let built: serde_json::Value = serde_json::from_slice(&std::fs::read(layers.join("layers.json")).unwrap()).unwrap();
    let root = built["layers"][0]["root_hash"].as_str().unwrap();
    let mut engine = Engine::new(&Policy::from_bytes(text).unwrap()).unwrap();
    let mut step = |point, input: serde_json::Value, allowed: bool| {
        let decision = engine.decide(point, &input);
        assert_eq!(decision.allowed, allowed, "{point}: {:?}", decision.denial);
        engine.commit(&decision).unwrap();
        decision
    };
    step(Point::MountDevice, json!({"target": "/l0", "deviceHash": root}), true);
    step(Point::MountDevice, json!({"target": "/l1", "deviceHash": "0".repeat(64)}), false);
    step(Point::MountOverlay, json!({"containerID": "c", "layerPaths": ["/l0"], "target": "/r"}), true);
    let caps = parma_host::policy_gen::DEFAULT_CAPABILITIES;
    let create = json!({
        "containerID": "c", "argList": ["/hello"], "envList": ["PATH=/usr/bin"], "workingDir": "/srv",
        "user": {"uid": 1000}, "groups": [],
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
        "noNewPrivileges": false, "privileged": false, "seccompProfileSHA256": "", "mounts": [],
        "maskedPaths": parma_policy::DEFAULT_MASKED_PATHS, "readonlyPaths": parma_policy::DEFAULT_READONLY_PATHS,
        "terminal": false, "rlimits": [],
    });
    let mut extra_env = create.clone();
    extra_env["envList"] = json!(["PATH=/usr/bin", "DEBUG=1"]);
    let denied = step(Point::CreateContainer, extra_env, false);
    assert!(denied.denial.unwrap().line().contains(r#"env "DEBUG=1" matches no rule of container "container""#));
    let mut shell = create.clone();
    shell["argList"] = json!(["/bin/sh"]);
    step(Point::CreateContainer, shell, false);
    let mut unmasked = create.clone();
    unmasked["maskedPaths"] = json!([]);
    let denied = step(Point::CreateContainer, unmasked, false);
    assert!(denied.denial.unwrap().line().contains(r#"masked path "/proc/kcore" is required"#));
    let mut terminal = create.clone();
    terminal["terminal"] = json!(true);
    step(Point::CreateContainer, terminal, false);
    let allowed = step(Point::CreateContainer, create, true);
    assert!(allowed.allow_stdio_access, "generated policies let the host reach stdio");
    step(Point::StartContainer, json!({"containerID": "c"}), true);
    step(Point::UpdateContainer, json!({"containerID": "c", "resources": {"memory_max": 4096}}), false);
    step(Point::GetProperties, json!({}), false);
}
