//! Decisions, and denials explained.

use serde::{Deserialize, Serialize};

use crate::point::Point;
use crate::state::MetadataOp;

/// Longest denial line, in bytes; longer ones are cut.
const MAX_LINE: usize = 2048;

/// The outcome of one enforcement point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Where it was decided.
    pub point: Point,
    /// Allowed or not.
    pub allowed: bool,
    /// State changes to apply once the action succeeded (allowed only).
    pub ops: Vec<MetadataOp>,
    /// Whether the host may read the process's output and write its input
    /// (`create_container` and `exec_in_container`: the rule's
    /// `allow_stdio_access`, false when it does not say).
    pub allow_stdio_access: bool,
    /// Whether the container may ask for attestation reports through its
    /// endpoint (`create_container`: the rule's `allow_attestation`, false
    /// when it does not say).
    pub allow_attestation: bool,
    /// Why not (denied only).
    pub denial: Option<Denial>,
}

/// Why a request was denied, computed by the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// The enforcement point.
    pub point: Point,
    /// The rule's summary.
    pub message: String,
    /// Each container of the policy that was tried, with what failed.
    pub candidates: Vec<Candidate>,
}

/// One container the rule tried, and the fields that did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The container's name in the policy.
    pub container: String,
    /// One line per failed field.
    pub failures: Vec<String>,
}

impl Denial {
    /// One readable line: the point, the message, then each candidate's failures.
    pub fn line(&self) -> String {
        let mut line = format!("{} denied: {}", self.point, self.message);
        for candidate in &self.candidates {
            line.push_str(&format!(" | {:?}: {}", candidate.container, candidate.failures.join("; ")));
        }
        if line.len() > MAX_LINE {
            line.truncate(line.floor_char_boundary(MAX_LINE - 3));
            line.push_str("...");
        }
        line
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line())
    }
}

#[derive(Deserialize)]
struct RuleResult {
    allowed: bool,
    #[serde(default)]
    metadata: Vec<MetadataOp>,
    #[serde(default)]
    allow_stdio_access: bool,
    #[serde(default)]
    allow_attestation: bool,
    #[serde(default)]
    reason: Option<RuleReason>,
}

#[derive(Deserialize)]
struct RuleReason {
    #[serde(default)]
    message: String,
    #[serde(default)]
    candidates: Vec<Candidate>,
}

impl Decision {
    /// A denial with a message and no candidates.
    pub fn deny(point: Point, message: impl Into<String>) -> Self {
        let denial = Denial { point, message: message.into(), candidates: Vec::new() };
        Self {
            point,
            allowed: false,
            ops: Vec::new(),
            allow_stdio_access: false,
            allow_attestation: false,
            denial: Some(denial),
        }
    }

    /// Interpret what a policy rule evaluated to. Anything but `true` or
    /// `{"allowed": true, ...}` is a denial.
    pub fn from_rule_result(point: Point, value: &regorus::Value) -> Self {
        if *value == regorus::Value::Undefined {
            return Self::deny(point, format!("the policy does not define {point} (deny by default)"));
        }
        let json = match serde_json::to_value(value) {
            Ok(json) => json,
            Err(err) => return Self::deny(point, format!("the rule returned a value that is not JSON: {err}")),
        };
        if json == serde_json::Value::Bool(true) {
            return Self {
                point,
                allowed: true,
                ops: Vec::new(),
                allow_stdio_access: false,
                allow_attestation: false,
                denial: None,
            };
        }
        let result: RuleResult = match serde_json::from_value(json.clone()) {
            Ok(result) => result,
            Err(_) => {
                let mut shown = json.to_string();
                shown.truncate(shown.floor_char_boundary(200));
                return Self::deny(point, format!("the rule returned {shown}, not an allow decision"));
            }
        };
        if result.allowed {
            return Self {
                point,
                allowed: true,
                ops: result.metadata,
                allow_stdio_access: result.allow_stdio_access,
                allow_attestation: result.allow_attestation,
                denial: None,
            };
        }
        let reason = result.reason.unwrap_or(RuleReason { message: String::new(), candidates: Vec::new() });
        let message = if reason.message.is_empty() { "the policy denies it".to_string() } else { reason.message };
        Self {
            point,
            allowed: false,
            ops: Vec::new(),
            allow_stdio_access: false,
            allow_attestation: false,
            denial: Some(Denial { point, message, candidates: reason.candidates }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(json: &str) -> Decision {
        Decision::from_rule_result(Point::CreateContainer, &regorus::Value::from_json_str(json).unwrap())
    }

    #[test]
    fn shapes_of_results() {
        assert!(decide("true").allowed);
        assert!(decide(r#"{"allowed": true}"#).allowed);
        assert!(!decide("false").allowed);
        assert!(!decide(r#"{"allowed": "yes"}"#).allowed);
        assert!(!decide(r#"{"allowed": true, "metadata": [{"name": 1}]}"#).allowed);
        let undefined = Decision::from_rule_result(Point::StartContainer, &regorus::Value::Undefined);
        assert_eq!(undefined.denial.unwrap().message, "the policy does not define start_container (deny by default)");
        assert!(!decide(r#"{"allowed": true}"#).allow_stdio_access, "stdio is denied unless the rule allows it");
        assert!(decide(r#"{"allowed": true, "allow_stdio_access": true}"#).allow_stdio_access);
        assert!(!decide(r#"{"allowed": true}"#).allow_attestation, "no endpoint unless the rule allows it");
        assert!(decide(r#"{"allowed": true, "allow_attestation": true}"#).allow_attestation);
        assert!(!decide(r#"{"allowed": true, "allow_attestation": 1}"#).allowed, "a malformed result is a denial");
        assert!(!decide(r#"{"allowed": true, "allow_stdio_access": "yes"}"#).allowed, "a malformed result is a denial");
    }

    #[test]
    fn denial_line_names_point_candidates_and_fields() {
        let d = decide(
            r#"{"allowed": false, "reason": {"message": "no container allows it",
                "candidates": [{"container": "web", "failures": ["env \"DEBUG=1\" matches no rule of container \"web\""]}]}}"#,
        );
        assert_eq!(
            d.denial.unwrap().line(),
            r#"create_container denied: no container allows it | "web": env "DEBUG=1" matches no rule of container "web""#
        );
    }
}
