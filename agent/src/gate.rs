//! The policy gate: the one place that decides whether a request may run.
//!
//! Deny by default, with no build and no flag that turns it off. Every
//! request type is listed below by name (no wildcard), so a new request
//! cannot reach a handler until this file says how it is decided.
//!
//! - `Ping`, `GuestInfo` and `Shutdown` are not enforcement points: they
//!   change nothing but the UVM's power state and pass in every state.
//! - `SetPolicy` installs the execution policy once; a second one is denied.
//! - Requests that act on the guest (mounts, containers, exec: the container
//!   lifecycle issue) are decided by the policy engine at their enforcement
//!   point, and denied while no policy is set.

use parma_policy::{Engine, Policy};
use parma_protocol::{AgentError, ErrorCode, Request};

/// The gate and the policy in force.
#[derive(Debug, Default)]
pub struct Gate {
    engine: Option<Engine>,
}

impl Gate {
    /// A gate with no policy set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sha256 of the policy in force, if any.
    pub fn policy_hash(&self) -> Option<&str> {
        self.engine.as_ref().map(Engine::policy_hash)
    }

    /// Allow the request, or say why not.
    pub fn check(&self, request: &Request) -> Result<(), AgentError> {
        match request {
            Request::Ping | Request::GuestInfo | Request::Shutdown => Ok(()),
            Request::SetPolicy { .. } => match self.policy_hash() {
                None => Ok(()),
                Some(hash) => Err(AgentError::new(
                    ErrorCode::PolicyDenied,
                    format!("SetPolicy is denied: policy {hash} is in force and cannot be replaced"),
                )),
            },
        }
    }

    /// Compile and install a policy; returns its hash.
    pub fn set_policy(&mut self, text: &str) -> Result<String, AgentError> {
        if let Some(hash) = self.policy_hash() {
            return Err(AgentError::new(ErrorCode::PolicyDenied, format!("policy {hash} is already in force")));
        }
        let failed = |err: parma_policy::PolicyError| AgentError::new(ErrorCode::Failed, err.to_string());
        let policy = Policy::from_bytes(text.as_bytes().to_vec()).map_err(failed)?;
        let engine = Engine::new(&policy).map_err(failed)?;
        let hash = engine.policy_hash().to_string();
        self.engine = Some(engine);
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_ALL: &str = include_str!("../../policies/allow_all.rego");

    #[test]
    fn requests_that_are_not_enforcement_points_pass() {
        let mut gate = Gate::new();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request), Ok(()));
        }
        gate.set_policy(ALLOW_ALL).unwrap();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request), Ok(()));
        }
    }

    #[test]
    fn a_policy_is_set_once() {
        let mut gate = Gate::new();
        let set = Request::SetPolicy { policy: ALLOW_ALL.into() };
        assert_eq!(gate.check(&set), Ok(()));
        let hash = gate.set_policy(ALLOW_ALL).unwrap();
        assert_eq!(hash, parma_policy::policy_hash(ALLOW_ALL.as_bytes()));
        let err = gate.check(&set).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains(&hash), "{}", err.message);
        assert_eq!(gate.set_policy("package policy\n").unwrap_err().code, ErrorCode::PolicyDenied);
    }

    #[test]
    fn a_broken_policy_is_refused_and_leaves_none_in_force() {
        let mut gate = Gate::new();
        let err = gate.set_policy("package policy\nallow := \n").unwrap_err();
        assert_eq!(err.code, ErrorCode::Failed);
        assert!(err.message.contains("does not compile"), "{}", err.message);
        assert_eq!(gate.set_policy("package other\n").unwrap_err().code, ErrorCode::Failed);
        assert!(gate.policy_hash().is_none());
    }
}
