//! The execution policy engine of Parma.
//!
//! A policy is a Rego module (package `policy`) whose identity is the sha256
//! of its exact bytes: the host puts that hash in SNP HOST_DATA, and the
//! agent refuses a policy whose hash differs. The policy binds each
//! enforcement point (`mount_device`, `create_container`, ...) to a rule,
//! usually one of the framework's (`data.framework.*`, shipped in this
//! crate, so the launch measurement covers it), and supplies the data those
//! rules check: the containers, their layers, commands, env rules and so on.
//!
//! Decisions are deny by default: an undefined rule, a rule that errors, a
//! result that is neither `true` nor `{"allowed": true, ...}`, or an
//! evaluation over its time budget is a denial, with a reason. There is no
//! switch that turns enforcement off.
//!
//! Decisions are stateful: an allowed decision carries the state changes
//! (which device is mounted where, which overlay belongs to which container,
//! which container started) that the caller applies with
//! [`Engine::commit`] once the action succeeded; a failed action is simply
//! not committed. The state reaches the rules as `input.state`, built by
//! the engine, never by the host.
//!
//! This crate is shared by the guest agent (enforcement) and the host CLI
//! (hashing, dry runs). It must not depend on tokio or do I/O.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod decision;
mod point;
pub mod scenario;
mod state;

use std::num::NonZeroU32;
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use sha2::{Digest, Sha256};

pub use decision::{Candidate, Decision, Denial};
pub use point::{Point, UnknownPoint};
pub use state::{Action, MetadataOp, State, StateError};

/// The framework the tenant's policy binds its rules to (package `framework`).
pub const FRAMEWORK: &str = include_str!("framework.rego");

/// The largest policy accepted, in bytes.
pub const MAX_POLICY: usize = 512 * 1024;

/// Default wall-clock budget of one decision.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(500);

/// A policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Larger than [`MAX_POLICY`].
    #[error("policy of {0} bytes exceeds the limit of {MAX_POLICY} bytes")]
    TooLarge(usize),
    /// Not UTF-8 text.
    #[error("policy is not UTF-8 text")]
    NotUtf8,
    /// Rego that does not parse or compile.
    #[error("policy does not compile: {0}")]
    Rego(String),
    /// The module's package is not `policy`.
    #[error("policy must be `package policy`, found {0}")]
    WrongPackage(String),
}

/// A policy's text and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    text: String,
    hash: [u8; 32],
}

/// sha256 of policy bytes, lowercase hex: what goes into HOST_DATA.
pub fn policy_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Policy {
    /// A policy from its exact bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, PolicyError> {
        if bytes.len() > MAX_POLICY {
            return Err(PolicyError::TooLarge(bytes.len()));
        }
        let hash = Sha256::digest(&bytes).into();
        let text = String::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8)?;
        Ok(Self { text, hash })
    }

    /// The Rego text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// sha256 of the exact bytes.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// sha256 of the exact bytes, lowercase hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

/// The policy engine: the framework and one policy loaded into regorus,
/// plus the state the decisions build up.
#[derive(Debug)]
pub struct Engine {
    rego: regorus::Engine,
    state: State,
    policy_hash: String,
}

impl Engine {
    /// Load a policy with the default budget.
    pub fn new(policy: &Policy) -> Result<Self, PolicyError> {
        Self::with_budget(policy, DEFAULT_BUDGET)
    }

    /// Load a policy; each decision may take at most `budget` of wall-clock time.
    pub fn with_budget(policy: &Policy, budget: Duration) -> Result<Self, PolicyError> {
        let mut rego = regorus::Engine::new();
        rego.set_strict_builtin_errors(true);
        rego.set_execution_timer_config(ExecutionTimerConfig {
            limit: budget,
            check_interval: NonZeroU32::MIN.saturating_add(63),
        });
        rego.add_policy("framework.rego".into(), FRAMEWORK.into())
            .map_err(|err| PolicyError::Rego(format!("framework: {err}")))?;
        let package = rego
            .add_policy("policy.rego".into(), policy.text.clone())
            .map_err(|err| PolicyError::Rego(err.to_string()))?;
        if package != "data.policy" {
            return Err(PolicyError::WrongPackage(package));
        }
        load_policy_data(&mut rego)?;
        Ok(Self { rego, state: State::default(), policy_hash: policy.hash_hex() })
    }

    /// The hash of the loaded policy.
    pub fn policy_hash(&self) -> &str {
        &self.policy_hash
    }

    /// The state built by committed decisions.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Replace the state (host-side dry runs start from a given state).
    pub fn set_state(&mut self, state: State) {
        self.state = state;
    }

    /// Decide one request at one enforcement point.
    ///
    /// `request` is the point's input (a JSON object, see docs/policy.md); a
    /// `state` field in it is replaced by the engine's own state.
    pub fn decide(&mut self, point: Point, request: &serde_json::Value) -> Decision {
        if !request.is_object() {
            return Decision::deny(point, "the request is not a JSON object");
        }
        let mut input = match state::to_rego(request) {
            Ok(input) => input,
            Err(err) => return Decision::deny(point, format!("cannot build the policy input: {err}")),
        };
        // The engine's state replaces whatever `state` the request carried.
        if let Ok(fields) = input.as_object_mut() {
            fields.insert(regorus::Value::from("state"), self.state.rego().clone());
        }
        self.rego.set_input(input);
        let result = match self.rego.eval_rule(format!("data.policy.{}", point.rule())) {
            Ok(result) => result,
            Err(err) => return Decision::deny(point, rule_error(point, &err.to_string())),
        };
        Decision::from_rule_result(point, &result)
    }

    /// Apply an allowed decision's state changes, once its action succeeded.
    pub fn commit(&mut self, decision: &Decision) -> Result<(), StateError> {
        if !decision.allowed {
            return Ok(());
        }
        self.state.apply(&decision.ops)
    }
}

/// The policy's data rules the framework reads (see framework.rego).
pub const DATA_RULES: &[&str] = &[
    "containers",
    "external_processes",
    "allow_properties_access",
    "allow_dump_stacks",
    "allow_runtime_logging",
    "allow_unencrypted_scratch",
    "allow_capability_dropping",
    "start_order",
    "required_containers",
];

/// Evaluate the policy's data rules once and hand them to the framework as
/// the data document `parma_policy_data`.
fn load_policy_data(rego: &mut regorus::Engine) -> Result<(), PolicyError> {
    let mut data = regorus::Value::new_object();
    let fields = data.as_object_mut().map_err(|err| PolicyError::Rego(err.to_string()))?;
    for name in DATA_RULES {
        match rego.eval_rule(format!("data.policy.{name}")) {
            Ok(regorus::Value::Undefined) => {}
            Ok(value) => {
                fields.insert(regorus::Value::from(*name), value);
            }
            // A policy that does not declare the rule simply has no such data.
            Err(err) if err.to_string().contains("not a valid rule path") => {}
            Err(err) => return Err(PolicyError::Rego(format!("data.policy.{name}: {err}"))),
        }
    }
    let mut root = regorus::Value::new_object();
    root.as_object_mut()
        .map_err(|err| PolicyError::Rego(err.to_string()))?
        .insert(regorus::Value::from("parma_policy_data"), data);
    rego.add_data(root).map_err(|err| PolicyError::Rego(err.to_string()))
}

/// The reason for a rule that failed to evaluate: the error on one line.
fn rule_error(point: Point, error: &str) -> String {
    if error.contains("not a valid rule path") {
        return format!("the policy does not define {point} (deny by default)");
    }
    let flat: Vec<&str> = error.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("policy error: {}", flat.join(" "))
}
