//! The JWE against an independent implementation: Debian's
//! python3-jwcrypto (installed by scripts/deps.sh) opens what
//! `parma_kbs::jwe::seal` makes (as Trustee's KBS makes it), and
//! `parma_kbs::jwe::open` opens what jwcrypto makes for the TEE key.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parma_kbs::jwe;
use parma_kbs::key::TeeKey;
use parma_kbs::types::TeePubKey;

/// Debian's interpreter: its python3-jwcrypto, not a virtualenv's.
const PYTHON: &str = "/usr/bin/python3";

const SCALAR: [u8; 32] = [0x42; 32];

/// The TEE key as a private JWK jwcrypto reads.
fn private_jwk(key: &TeeKey) -> serde_json::Value {
    let TeePubKey::EC { crv, x, y, .. } = key.public_jwk() else { panic!("not EC") };
    serde_json::json!({"kty": "EC", "crv": crv, "x": x, "y": y, "d": URL_SAFE_NO_PAD.encode(SCALAR)})
}

fn python(script: &str, input: &str) -> String {
    let mut child = Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/deps.sh installs python3-jwcrypto)");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn jwcrypto_opens_what_the_broker_side_seals() {
    let key = TeeKey::from_bytes(&SCALAR).unwrap();
    let sealed = jwe::seal(b"a resource from the broker", &key.public_jwk()).unwrap();
    let script = r#"
import json, sys
from jwcrypto import jwe, jwk
data = json.load(sys.stdin)
key = jwk.JWK(**data["key"])
token = jwe.JWE()
token.deserialize(json.dumps(data["jwe"]), key=key)
sys.stdout.write(token.payload.decode())
"#;
    let input = serde_json::json!({"key": private_jwk(&key), "jwe": serde_json::from_str::<serde_json::Value>(&sealed).unwrap()});
    assert_eq!(python(script, &input.to_string()), "a resource from the broker");
}

#[test]
fn what_jwcrypto_seals_for_the_tee_key_opens() {
    let key = TeeKey::from_bytes(&SCALAR).unwrap();
    let TeePubKey::EC { crv, x, y, .. } = key.public_jwk() else { panic!("not EC") };
    let script = r#"
import json, sys
from jwcrypto import jwe, jwk
public = jwk.JWK(**json.load(sys.stdin))
token = jwe.JWE(b"sealed by jwcrypto", protected=json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}))
token.add_recipient(public)
sys.stdout.write(token.serialize(compact=False))
"#;
    let public = serde_json::json!({"kty": "EC", "crv": crv, "x": x, "y": y});
    let sealed = python(script, &public.to_string());
    let opened = jwe::open(sealed.as_bytes(), &key).unwrap_or_else(|err| panic!("{err}: {sealed}"));
    assert_eq!(opened.as_slice(), b"sealed by jwcrypto");
    // Made for another key: refused.
    let other = TeeKey::generate();
    assert!(matches!(jwe::open(sealed.as_bytes(), &other), Err(jwe::JweError::Authentication(_))));
}
