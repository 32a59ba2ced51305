//! `parma policy`: hash a policy, and dry-run decisions on the host.

use std::path::Path;

use anyhow::Context;
use parma_policy::scenario::{self, Scenario};
use parma_policy::{Decision, Engine, Point, Policy, State};
use serde::Deserialize;

/// A request for `parma policy eval`: an enforcement point and its input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    /// The enforcement point's rule name (`create_container`).
    pub point: String,
    /// Its input, as the agent would build it.
    pub input: serde_json::Value,
}

/// Load a policy file into an engine.
pub fn load(path: &Path) -> anyhow::Result<(Policy, Engine)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let policy = Policy::from_bytes(bytes).with_context(|| format!("{} is not a usable policy", path.display()))?;
    let engine = Engine::new(&policy).with_context(|| format!("cannot load {}", path.display()))?;
    Ok((policy, engine))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// Decide one request, optionally from a given state.
pub fn eval(policy: &Path, request: &Path, state: Option<&Path>) -> anyhow::Result<Decision> {
    let (_, mut engine) = load(policy)?;
    if let Some(state) = state {
        engine.set_state(read_json::<State>(state)?);
    }
    let request: EvalRequest = read_json(request)?;
    let point: Point = request.point.parse()?;
    Ok(engine.decide(point, &request.input))
}

/// A decision, for people: the verdict, then each candidate's failures.
pub fn explain(decision: &Decision) -> String {
    match &decision.denial {
        None => {
            let mut out = format!("{}: allowed", decision.point);
            for op in &decision.ops {
                out.push_str(&format!("\n  state: {:?} {}[{:?}]", op.action, op.name, op.key));
            }
            out
        }
        Some(denial) => {
            let mut out = format!("{}: denied: {}", denial.point, denial.message);
            for candidate in &denial.candidates {
                out.push_str(&format!("\n  container {:?}:", candidate.container));
                for failure in &candidate.failures {
                    out.push_str(&format!("\n    - {failure}"));
                }
            }
            out
        }
    }
}

/// Run a scenario; print each step; exit 1 on any mismatch.
pub fn simulate(policy: &Path, scenario_path: &Path, json: bool) -> anyhow::Result<i32> {
    let (_, mut engine) = load(policy)?;
    let scenario: Scenario = read_json(scenario_path)?;
    let outcomes = scenario::run(&mut engine, &scenario);
    let mismatches = outcomes.iter().filter(|o| o.mismatch.is_some()).count();
    if json {
        let steps: Vec<_> = outcomes
            .iter()
            .map(|o| {
                serde_json::json!({
                    "step": o.step,
                    "decision": o.decision,
                    "mismatch": o.mismatch,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"steps": steps, "mismatches": mismatches}))?);
    } else {
        for outcome in &outcomes {
            let verdict = match &outcome.decision {
                Some(d) if d.allowed => "allowed",
                Some(_) => "denied",
                None => "error",
            };
            match &outcome.mismatch {
                None => println!("ok        {verdict:<8} {}", outcome.step),
                Some(why) => println!("MISMATCH  {verdict:<8} {}: {why}", outcome.step),
            }
        }
        println!("{} steps, {} passed, {} failed", outcomes.len(), outcomes.len() - mismatches, mismatches);
    }
    if mismatches > 0 {
        eprintln!("parma: {mismatches} step(s) did not get the expected decision");
        return Ok(1);
    }
    Ok(0)
}
