//! The SNP evidence has the shape of Trustee's sample SNP evidence
//! (`attestation-service/tests/e2e/evidence.json` in
//! confidential-containers/trustee: every member, its JSON type and, for
//! byte arrays, its length, written down here), made from the real
//! AMD-signed report of crates/snp's tests, and reads back to the same
//! report.

use serde_json::Value;

fn report() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../snp/tests/data/report_milan.hex");
    hex::decode(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

/// Trustee's sample: member, JSON type ("int", "null", "bytesN" for an
/// array of N numbers, or an object's members).
fn tcb() -> Value {
    serde_json::json!({"fmc": "null|int", "bootloader": "int", "tee": "int", "snp": "int", "microcode": "int"})
}

fn trustee_shape() -> Value {
    let version = serde_json::json!({"major": "int", "minor": "int", "build": "int"});
    serde_json::json!({
        "attestation_report": {
            "version": "int", "guest_svn": "int", "policy": "int", "family_id": "bytes16", "image_id": "bytes16",
            "vmpl": "int", "sig_algo": "int", "current_tcb": tcb(), "plat_info": "int", "key_info": "int",
            "report_data": "bytes64", "measurement": "bytes48", "host_data": "bytes32", "id_key_digest": "bytes48",
            "author_key_digest": "bytes48", "report_id": "bytes32", "report_id_ma": "bytes32",
            "reported_tcb": tcb(), "cpuid_fam_id": "null|int", "cpuid_mod_id": "null|int", "cpuid_step": "null|int",
            "chip_id": "bytes64", "committed_tcb": tcb(), "current": version.clone(), "committed": version,
            "launch_tcb": tcb(), "signature": {"r": "bytes72", "s": "bytes72"},
        },
        "cert_chain": "null",
    })
}

/// Where `value` differs from `shape` (members the shape lacks are allowed
/// only if null: Trustee's reader takes a missing Option as None).
fn differences(path: &str, value: &Value, shape: &Value, out: &mut Vec<String>) {
    match shape {
        Value::Object(members) => {
            let Some(object) = value.as_object() else { return out.push(format!("{path}: not an object")) };
            for (name, inner) in members {
                match object.get(name) {
                    Some(v) => differences(&format!("{path}.{name}"), v, inner, out),
                    None => out.push(format!("{path}.{name}: missing")),
                }
            }
            for (name, v) in object {
                if !members.contains_key(name) && !v.is_null() {
                    out.push(format!("{path}.{name}: not in Trustee's evidence"));
                }
            }
        }
        Value::String(kind) => {
            let fits = kind.split('|').any(|kind| match kind {
                "int" => value.is_u64(),
                "null" => value.is_null(),
                bytes => bytes.strip_prefix("bytes").and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| {
                    value
                        .as_array()
                        .is_some_and(|a| a.len() == n && a.iter().all(|b| b.as_u64().is_some_and(|b| b < 256)))
                }),
            });
            if !fits {
                out.push(format!("{path}: {value} is not {kind}"));
            }
        }
        _ => unreachable!(),
    }
}

#[test]
fn the_evidence_has_trustees_shape_and_reads_back() {
    let bytes = report();
    let evidence = parma_kbs::evidence::snp(&bytes).unwrap();
    let mut found = Vec::new();
    differences("", &evidence, &trustee_shape(), &mut found);
    assert!(found.is_empty(), "{found:#?}\n{evidence}");
    let report = &evidence["attestation_report"];
    // The fields are the report's own bytes.
    let parsed = parma_snp::AttestationReport::parse(&bytes).unwrap();
    let bytes_of = |v: &Value| v.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect::<Vec<u8>>();
    assert_eq!(bytes_of(&report["report_data"]), parsed.report_data);
    assert_eq!(bytes_of(&report["measurement"]), parsed.measurement);
    assert_eq!(bytes_of(&report["host_data"]), parsed.host_data);
    assert_eq!(report["version"], parsed.version.get());
    // The broker's side reads it back to the same report.
    let back = parma_kbs::evidence::report_of(&evidence).unwrap();
    assert_eq!(back.report_data, parsed.report_data);
    assert_eq!(serde_json::to_value(back).unwrap(), *report);
    assert!(parma_kbs::evidence::snp(&bytes[..100]).is_err());
}

#[test]
fn the_reports_bytes_come_back() {
    let bytes = report();
    let evidence = parma_kbs::evidence::snp(&bytes).unwrap();
    assert_eq!(parma_kbs::evidence::report_bytes_of(&evidence).unwrap(), bytes);
}
