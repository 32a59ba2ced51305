//! Golden decision tables: every scenario in tests/golden runs against its
//! policy, and every decision and reason must be as written.

use std::path::Path;

use parma_policy::scenario::{self, Scenario};
use parma_policy::{Backend, DEFAULT_BUDGET, Engine, Policy};

#[test]
fn golden_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut cases = 0;
    let mut failures = Vec::new();
    for file in files {
        let scenario: Scenario = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let policy = dir.join(scenario.policy.as_deref().unwrap());
        let policy = Policy::from_bytes(std::fs::read(&policy).unwrap()).unwrap();
        for backend in [Backend::Vm, Backend::Interpreter] {
            let mut engine = Engine::with_backend(&policy, DEFAULT_BUDGET, backend).unwrap();
            for outcome in scenario::run(&mut engine, &scenario) {
                cases += 1;
                if let Some(mismatch) = outcome.mismatch {
                    failures.push(format!("{} ({backend:?}): {}: {mismatch}", file.display(), outcome.step));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {cases} steps differ:\n{}", failures.len(), failures.join("\n"));
    assert!(cases >= 2 * 60, "only {cases} golden cases (both backends)");
}
