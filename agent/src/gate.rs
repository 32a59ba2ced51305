//! The policy gate: the one place that decides whether a request may run.
//!
//! Deny by default. Until a policy engine is plugged in (the execution
//! policy issue), the gate allows exactly the requests that change nothing in
//! the guest but its power state: Ping, GuestInfo and Shutdown. There is no
//! build and no flag that turns the gate off.

use parma_protocol::{AgentError, ErrorCode, Request, RequestKind};

/// Decides, before any handler runs, whether a request is allowed.
#[derive(Debug, Clone)]
pub struct Gate {
    allowed: &'static [RequestKind],
}

/// What the gate allows before any policy is set.
const BEFORE_POLICY: &[RequestKind] = &[RequestKind::Ping, RequestKind::GuestInfo, RequestKind::Shutdown];

impl Gate {
    /// The gate in force before a policy is set.
    pub fn before_policy() -> Self {
        Self { allowed: BEFORE_POLICY }
    }

    /// Allow the request, or say why not.
    pub fn check(&self, request: &Request) -> Result<(), AgentError> {
        let kind = request.kind();
        if self.allowed.contains(&kind) {
            Ok(())
        } else {
            Err(AgentError::new(
                ErrorCode::PolicyDenied,
                format!("{} is denied: no policy allows it (deny by default)", kind.as_str()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foundation_requests_pass() {
        let gate = Gate::before_policy();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request), Ok(()));
        }
    }

    #[test]
    fn an_empty_gate_denies_everything_with_a_reason() {
        let gate = Gate { allowed: &[] };
        let err = gate.check(&Request::Shutdown).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains("Shutdown is denied"), "{}", err.message);
    }
}
