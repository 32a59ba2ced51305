//! `parma policy`: hash, eval, explain and simulate, as a user runs them.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parma(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parma")).args(args).current_dir(repo()).output().unwrap()
}

const POLICY: &str = "crates/policy/tests/golden/two_containers.rego";
const SCENARIO: &str = "crates/policy/tests/golden/two_containers.json";

#[test]
fn hash_equals_sha256sum() {
    let out = parma(&["policy", "hash", "policies/allow_all.rego"]);
    assert!(out.status.success());
    let sum = Command::new("sha256sum").arg("policies/allow_all.rego").current_dir(repo()).output().unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), sum.split_whitespace().next().unwrap());
}

/// The annotation decodes (with `gzip -dc`, independently of parma) to the
/// policy's exact bytes, so its hash is the HOST_DATA the pod launches with.
#[test]
fn the_policy_annotation_is_base64_of_gzip_and_decodes_back() {
    let out = parma(&["policy", "annotation", POLICY]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let value = line.strip_prefix("io.parma.policy: ").unwrap().trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, &value).unwrap();
    let gunzip =
        Command::new("sh").arg("-c").arg(format!("base64 -d < {} | gzip -dc", file.display())).output().unwrap();
    assert_eq!(gunzip.stdout, std::fs::read(repo().join(POLICY)).unwrap());
    let decoded = parma(&["policy", "annotation", "--decode", file.to_str().unwrap()]);
    assert_eq!(decoded.stdout, gunzip.stdout);
    std::fs::write(&file, "bm90IGd6aXA=").unwrap();
    let refused = parma(&["policy", "annotation", "--decode", file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not gzip'd"), "{refused:?}");
}

#[test]
fn eval_exit_codes_and_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("r.json");
    let h1 = "1".repeat(64);
    std::fs::write(&request, format!(r#"{{"point":"mount_device","input":{{"target":"/l0","deviceHash":"{h1}"}}}}"#))
        .unwrap();
    let out = parma(&["policy", "eval", "--policy", POLICY, "--input", request.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mount_device: allowed");

    let state = dir.path().join("s.json");
    std::fs::write(&state, format!(r#"{{"devices":{{"/l0":"{h1}"}}}}"#)).unwrap();
    let out = parma(&[
        "policy",
        "eval",
        "--policy",
        POLICY,
        "--input",
        request.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#"target "/l0" is already mounted"#));

    let out = parma(&["policy", "explain", "--policy", POLICY, "--input", request.to_str().unwrap(), "--json"]);
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["allowed"], true);
    assert_eq!(decision["ops"][0]["name"], "devices");

    std::fs::write(&request, r#"{"point":"format_disk","input":{}}"#).unwrap();
    let out = parma(&["policy", "eval", "--policy", POLICY, "--input", request.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown enforcement point \"format_disk\""));
}

#[test]
fn simulate_passes_the_golden_scenario_and_catches_a_wrong_expectation() {
    let out = parma(&["policy", "simulate", "--policy", POLICY, "--scenario", SCENARIO]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("82 steps, 82 passed, 0 failed"));

    let mut scenario: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join(SCENARIO)).unwrap()).unwrap();
    scenario["steps"][0]["allowed"] = serde_json::json!(false);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, serde_json::to_vec(&scenario).unwrap()).unwrap();
    let out = parma(&["policy", "simulate", "--policy", POLICY, "--scenario", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISMATCH  allowed  mount the base layer: expected denied"));
}

#[test]
fn openssl_made_issuer_keys_and_signatures_are_what_fragments_take() {
    // The flow docs/policy.md gives, with the openssl command-line tool.
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl (scripts/deps.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", &path("issuer.pem")]);
    openssl(&["pkey", "-in", &path("issuer.pem"), "-pubout", "-outform", "DER", "-out", &path("issuer.der")]);
    let payload = br#"{"feed": "contoso/sidecar", "svn": 3, "containers": [{"name": "sidecar", "layers": []}]}"#;
    std::fs::write(path("fragment.json"), payload).unwrap();
    openssl(&["dgst", "-sha384", "-sign", &path("issuer.pem"), "-out", &path("fragment.sig"), &path("fragment.json")]);

    let out = parma(&["policy", "issuer", &path("issuer.der")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let issuer = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let der = std::fs::read(path("issuer.der")).unwrap();
    use sha2::Digest as _;
    assert_eq!(issuer, hex::encode(sha2::Sha256::digest(&der)));
    let signed = parma_policy::SignedFragment {
        payload: payload.to_vec(),
        signature: std::fs::read(path("fragment.sig")).unwrap(),
        public_key: der,
    };
    let fragment = signed.verify().unwrap();
    assert_eq!((fragment.issuer, fragment.feed.as_str(), fragment.svn), (issuer, "contoso/sidecar", 3));

    let out = parma(&["policy", "issuer", &path("issuer.pem")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ECDSA P-384 public key"));
}
