//! Scenarios: a sequence of requests with the decisions they should get.
//!
//! The golden tests and `parma policy simulate` run the same files. Each
//! step names an enforcement point and its input, given whole (`input`) or
//! as a named template with some fields replaced (`template` + `patch`),
//! the expected decision, and for denials a fragment of the reason. Allowed
//! steps are committed (their action is taken to succeed) unless
//! `action_fails` says the action failed in the guest.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Decision, Engine, Point};

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The policy file, relative to the scenario (informational for callers).
    #[serde(default)]
    pub policy: Option<String>,
    /// Named inputs steps can start from.
    #[serde(default)]
    pub templates: Map<String, Value>,
    /// The requests, in order.
    pub steps: Vec<Step>,
}

/// One request and its expected decision.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step shows.
    pub name: String,
    /// The enforcement point's rule name.
    pub point: String,
    /// Start from this template.
    #[serde(default)]
    pub template: Option<String>,
    /// Fields that replace the template's.
    #[serde(default)]
    pub patch: Option<Map<String, Value>>,
    /// The whole input (instead of a template).
    #[serde(default)]
    pub input: Option<Value>,
    /// The expected decision.
    pub allowed: bool,
    /// For denials: a fragment the denial line must contain.
    #[serde(default)]
    pub reason: Option<String>,
    /// The action fails after an allowed decision: nothing is committed.
    #[serde(default)]
    pub action_fails: bool,
    /// For allowed steps: whether the decision grants stdio access.
    #[serde(default)]
    pub stdio: Option<bool>,
}

/// What one step got.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The step's name.
    pub step: String,
    /// The decision, when the step could be run.
    pub decision: Option<Decision>,
    /// What differs from the expectation, if anything.
    pub mismatch: Option<String>,
}

impl Step {
    fn input(&self, templates: &Map<String, Value>) -> Result<Value, String> {
        match (&self.template, &self.input) {
            (Some(name), None) => {
                let Some(Value::Object(base)) = templates.get(name) else {
                    return Err(format!("no template {name:?}"));
                };
                let mut input = base.clone();
                for (key, value) in self.patch.iter().flatten() {
                    input.insert(key.clone(), value.clone());
                }
                Ok(Value::Object(input))
            }
            (None, Some(input)) => Ok(input.clone()),
            _ => Err("a step needs exactly one of `template` and `input`".into()),
        }
    }
}

/// Run every step in order on `engine`.
pub fn run(engine: &mut Engine, scenario: &Scenario) -> Vec<Outcome> {
    scenario
        .steps
        .iter()
        .map(|step| {
            let prepared = step
                .point
                .parse::<Point>()
                .map_err(|err| err.to_string())
                .and_then(|point| Ok((point, step.input(&scenario.templates)?)));
            let (point, input) = match prepared {
                Ok(prepared) => prepared,
                Err(err) => return Outcome { step: step.name.clone(), decision: None, mismatch: Some(err) },
            };
            let decision = engine.decide(point, &input);
            let mut mismatch = check(step, &decision);
            if decision.allowed
                && !step.action_fails
                && let Err(err) = engine.commit(&decision)
            {
                mismatch = Some(format!("cannot commit the decision: {err}"));
            }
            Outcome { step: step.name.clone(), decision: Some(decision), mismatch }
        })
        .collect()
}

fn check(step: &Step, decision: &Decision) -> Option<String> {
    let line = decision.denial.as_ref().map(|d| d.line()).unwrap_or_default();
    if decision.allowed != step.allowed {
        let got = if decision.allowed { "allowed".to_string() } else { line };
        return Some(format!("expected {}, got {got}", if step.allowed { "allowed" } else { "denied" }));
    }
    if let Some(stdio) = step.stdio
        && decision.allow_stdio_access != stdio
    {
        return Some(format!("expected allow_stdio_access {stdio}, got {}", decision.allow_stdio_access));
    }
    match &step.reason {
        Some(fragment) if !line.contains(fragment.as_str()) => {
            Some(format!("the denial does not contain {fragment:?}: {line}"))
        }
        _ => None,
    }
}
