//! A failed request's error code and message, as the handlers return it:
//! the code tells the host what went wrong (a missing container, a missing
//! executable, a full guest) without parsing the message.

use parma_protocol::{AgentError, ErrorCode};

/// Why an allowed request failed in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The wire error code.
    pub code: ErrorCode,
    /// One readable line.
    pub message: String,
}

impl Fault {
    /// A fault with this code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The request names something that does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// The object is not in a state that allows the request.
    pub fn wrong_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::WrongState, message)
    }

    /// A value in the request is out of range or ill-formed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
}

/// Any other failure of the guest (a system call, a device).
impl From<String> for Fault {
    fn from(message: String) -> Self {
        Self::new(ErrorCode::Failed, message)
    }
}

impl From<Fault> for AgentError {
    fn from(fault: Fault) -> Self {
        AgentError::new(fault.code, fault.message)
    }
}
