//! Fragments: a listed issuer's signed containers join the policy only after
//! `load_fragment` allowed them; anything else is refused by name.

use p384::ecdsa::signature::Signer;
use p384::ecdsa::{Signature, SigningKey};
use p384::pkcs8::EncodePublicKey;
use parma_policy::fragment::issuer_id;
use parma_policy::{Backend, DEFAULT_BUDGET, Engine, Point, Policy, SignedFragment};
use serde_json::json;

const WEB: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const BASE: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const SIDECAR: &str = "3333333333333333333333333333333333333333333333333333333333333333";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 48]).unwrap()
}

fn public_key(seed: u8) -> Vec<u8> {
    key(seed).verifying_key().to_public_key_der().unwrap().as_bytes().to_vec()
}

fn signed(seed: u8, feed: &str, svn: u64) -> SignedFragment {
    let payload = serde_json::to_vec(&json!({
        "feed": feed,
        "svn": svn,
        "containers": [{"name": "sidecar", "layers": [BASE, SIDECAR], "command": ["/bin/proxy"],
                        "env_rules": [], "working_dir": "/"}],
    }))
    .unwrap();
    let signature: Signature = key(seed).sign(&payload);
    SignedFragment { payload, signature: signature.to_der().as_bytes().to_vec(), public_key: public_key(seed) }
}

fn policy() -> Policy {
    let mut text = String::from("package policy\n\nimport rego.v1\n\n");
    text.push_str(&format!(
        "containers := [{{\"name\": \"web\", \"layers\": [\"{BASE}\", \"{WEB}\"], \"command\": [\"/bin/web\"]}}]\n\n"
    ));
    text.push_str(&format!(
        "fragments := [{{\"issuer\": \"{}\", \"feed\": \"contoso/sidecar\", \"minimum_svn\": 2}}]\n\n",
        issuer_id(&public_key(7))
    ));
    for point in Point::ALL {
        text.push_str(&format!("{0} := data.framework.{0}\n\n", point.rule()));
    }
    Policy::from_bytes(text.into_bytes()).unwrap()
}

fn mount(engine: &mut Engine, target: &str, hash: &str) -> parma_policy::Decision {
    let decision = engine.decide(Point::MountDevice, &json!({"target": target, "deviceHash": hash}));
    engine.commit(&decision).unwrap();
    decision
}

#[test]
fn a_listed_issuers_fragment_adds_its_containers_and_nothing_else_does() {
    for backend in [Backend::Vm, Backend::Interpreter] {
        let mut engine = Engine::with_backend(&policy(), DEFAULT_BUDGET, backend).unwrap();
        assert!(mount(&mut engine, "/l0", BASE).allowed);
        // Before the fragment, its layer is nobody's.
        let denied = mount(&mut engine, "/l1", SIDECAR);
        assert!(denied.denial.unwrap().line().contains("is not a layer of any container in the policy"));

        // Refused, each with its reason, and nothing changes.
        let refuse = |engine: &mut Engine, fragment: &SignedFragment, reason: &str| {
            let (decision, fragment) = engine.load_fragment(fragment);
            assert!(!decision.allowed && fragment.is_none(), "{backend:?}: {reason}");
            let line = decision.denial.unwrap().line();
            assert!(line.starts_with("load_fragment denied: ") && line.contains(reason), "{backend:?}: {line}");
        };
        let unlisted = issuer_id(&public_key(8));
        refuse(
            &mut engine,
            &signed(8, "contoso/sidecar", 3),
            &format!("issuer \"{unlisted}\" is not listed in the policy"),
        );
        refuse(&mut engine, &signed(7, "contoso/other", 3), "feed \"contoso/other\" is not listed for issuer");
        refuse(
            &mut engine,
            &signed(7, "contoso/sidecar", 1),
            "svn 1 of feed \"contoso/sidecar\" is below the minimum 2",
        );
        let mut forged = signed(7, "contoso/sidecar", 3);
        forged.payload = signed(7, "contoso/sidecar", 4).payload;
        refuse(&mut engine, &forged, "signature does not verify with issuer");
        let mut stolen_name = signed(8, "contoso/sidecar", 3);
        stolen_name.public_key = public_key(7);
        refuse(&mut engine, &stolen_name, "signature does not verify");
        assert!(!mount(&mut engine, "/l1", SIDECAR).allowed);

        // The listed issuer, feed and SVN: allowed, and the containers count.
        let (decision, fragment) = engine.load_fragment(&signed(7, "contoso/sidecar", 3));
        assert!(decision.allowed, "{backend:?}: {:?}", decision.denial);
        engine.commit_fragment(&decision, fragment.unwrap()).unwrap();
        assert_eq!(engine.state().get("fragments", "contoso/sidecar").unwrap()["svn"], 3);
        assert!(mount(&mut engine, "/l1", SIDECAR).allowed);
        let overlay = engine.decide(
            Point::MountOverlay,
            &json!({"containerID": "c2", "layerPaths": ["/l0", "/l1"], "target": "/run/c2"}),
        );
        assert!(overlay.allowed, "{backend:?}: {:?}", overlay.denial);
        assert_eq!(overlay.ops[0].value.as_ref().unwrap()["candidates"], json!(["sidecar"]));
        // Once per feed.
        refuse(&mut engine, &signed(7, "contoso/sidecar", 4), "feed \"contoso/sidecar\" is already loaded");
    }
}

#[test]
fn a_policy_without_fragments_loads_none() {
    let text = "package policy\n\ncontainers := []\n\nload_fragment := data.framework.load_fragment\n".to_string();
    let mut engine = Engine::new(&Policy::from_bytes(text.into_bytes()).unwrap()).unwrap();
    let (decision, _) = engine.load_fragment(&signed(7, "contoso/sidecar", 3));
    assert!(decision.denial.unwrap().line().contains("is not listed in the policy"));
    // And a policy that does not bind the point denies by default.
    let mut engine =
        Engine::new(&Policy::from_bytes(b"package policy\n\ncontainers := []\n".to_vec()).unwrap()).unwrap();
    let (decision, _) = engine.load_fragment(&signed(7, "contoso/sidecar", 3));
    assert!(decision.denial.unwrap().line().contains("does not define load_fragment"));
}
