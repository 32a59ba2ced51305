//! The policy gate: the one place that decides whether a request may run.
//!
//! Deny by default, with no build and no flag that turns it off. Every
//! request type is listed below by name (no wildcard), so a new request
//! cannot reach a handler until this file says how it is decided.
//!
//! - `Ping` and `Shutdown` are not enforcement points: they change nothing
//!   but the UVM's power state and pass in every state (the dispatcher
//!   answers them without the lock).
//! - `GuestInfo` passes before a policy is set and in lockdown (no tenant
//!   data exists yet); once a policy is in force it is decided by its
//!   `get_properties` rule.
//! - `SetPolicy` installs the execution policy once, only if its sha256 is
//!   the HOST_DATA of this launch (from a fresh attestation report, fetched
//!   before the host's Rego is parsed); a second one is denied. A policy
//!   whose hash differs, or that is HOST_DATA but does not compile, puts the
//!   agent in lockdown: it refuses everything but `Ping`, `GuestInfo` and
//!   `Shutdown`, saying why. Once it is in force, its
//!   `runtime_logging` rule decides whether the agent keeps logging to the
//!   console the host reads.
//! - `GetAttestation` is denied before a policy is set and in lockdown (the
//!   host chooses REPORT_DATA; with no policy deciding, a report would vouch
//!   for nothing), and otherwise is decided by the policy's
//!   `get_attestation` rule (a group can be attested only while complete).
//! - Requests that act on the guest (mounts, containers, start, updates,
//!   exec, signals, delete) are decided by the policy engine at their
//!   enforcement points, with inputs the dispatcher builds from the request
//!   and the agent's own records; they are denied while no policy is set.
//!   The decisions' state changes are committed only after the action
//!   succeeded.
//! - `LoadFragment` needs a policy in force; the issuer's signature is
//!   checked first, then the policy's `load_fragment` rule decides on issuer,
//!   feed, SVN and the names it adds, and only then do the fragment's
//!   containers join the policy.
//! - `WaitProcess`, `ReadOutput`, `WriteStdin` and `ResizeTerminal` act only
//!   on a process the policy already allowed (at `create_container` or
//!   `exec_in_container`), the last three only if that decision granted
//!   stdio access; they need a policy in force.

use parma_policy::input::{Empty, Input};
use parma_policy::{Decision, Engine, Policy};
use parma_protocol::{AgentError, ErrorCode, Request, Response};

/// The gate and the policy in force.
#[derive(Debug, Default)]
pub struct Gate {
    engine: Option<Engine>,
    lockdown: Option<String>,
}

fn denied(message: impl Into<String>) -> AgentError {
    AgentError::new(ErrorCode::PolicyDenied, message)
}

impl Gate {
    /// The sha256 of the policy in force, if any.
    pub fn policy_hash(&self) -> Option<&str> {
        self.engine.as_ref().map(Engine::policy_hash)
    }

    /// Allow the request, or say why not. `points` are the enforcement
    /// points the request meets, with their inputs; the allowed decisions
    /// are returned for [`Gate::commit`] once the action succeeded.
    pub fn check(&mut self, request: &Request, points: &[Input]) -> Result<Vec<Decision>, AgentError> {
        if let Some(reason) = &self.lockdown {
            return match request {
                Request::Ping | Request::GuestInfo | Request::Shutdown => Ok(Vec::new()),
                // A report now would carry the launch's measurement and
                // HOST_DATA with the host's REPORT_DATA, while no policy
                // decides anything: a relying party could not tell it from
                // one a complete group asked for.
                Request::GetAttestation { .. }
                | Request::SetPolicy { .. }
                | Request::MountLayer { .. }
                | Request::UnmountLayer { .. }
                | Request::MountOverlay { .. }
                | Request::UnmountOverlay { .. }
                | Request::MountScratch { .. }
                | Request::CreateContainer { .. }
                | Request::UpdateContainer { .. }
                | Request::StartContainer { .. }
                | Request::ExecProcess { .. }
                | Request::SignalProcess { .. }
                | Request::WaitProcess { .. }
                | Request::ReadOutput { .. }
                | Request::WriteStdin { .. }
                | Request::ResizeTerminal { .. }
                | Request::DeleteContainer { .. }
                | Request::LoadFragment { .. } => {
                    Err(denied(format!("{} is denied: {reason}", request.kind().as_str())))
                }
            };
        }
        match request {
            Request::Ping | Request::Shutdown => Ok(Vec::new()),
            Request::GuestInfo if self.engine.is_none() => Ok(Vec::new()),
            Request::SetPolicy { .. } => match self.policy_hash() {
                None => Ok(Vec::new()),
                Some(hash) => {
                    Err(denied(format!("SetPolicy is denied: policy {hash} is in force and cannot be replaced")))
                }
            },
            Request::WaitProcess { .. }
            | Request::ReadOutput { .. }
            | Request::WriteStdin { .. }
            | Request::ResizeTerminal { .. }
            // Decided in `load_fragment`, after the signature checked.
            | Request::LoadFragment { .. } => {
                self.engine_for(request)?;
                Ok(Vec::new())
            }
            Request::GuestInfo
            | Request::GetAttestation { .. }
            | Request::MountLayer { .. }
            | Request::UnmountLayer { .. }
            | Request::MountOverlay { .. }
            | Request::UnmountOverlay { .. }
            | Request::MountScratch { .. }
            | Request::CreateContainer { .. }
            | Request::StartContainer { .. }
            | Request::UpdateContainer { .. }
            | Request::ExecProcess { .. }
            | Request::SignalProcess { .. }
            | Request::DeleteContainer { .. } => {
                let engine = self.engine_for(request)?;
                let mut decisions = Vec::with_capacity(points.len());
                for input in points {
                    let decision = engine.decide(input.point(), &input.to_value());
                    if let Some(denial) = &decision.denial {
                        return Err(denied(denial.line()));
                    }
                    decisions.push(decision);
                }
                if decisions.is_empty() {
                    return Err(denied(format!("{} meets no enforcement point", request.kind().as_str())));
                }
                Ok(decisions)
            }
        }
    }

    /// Whether the policy in force lets the agent keep logging to the
    /// console (its `runtime_logging` rule); false without a policy.
    pub fn runtime_logging_allowed(&mut self) -> bool {
        self.engine.as_mut().is_some_and(|engine| engine.decide_input(&Input::RuntimeLogging(Empty {})).allowed)
    }

    fn engine_for(&mut self, request: &Request) -> Result<&mut Engine, AgentError> {
        let kind = request.kind().as_str();
        self.engine.as_mut().ok_or_else(|| denied(format!("{kind} is denied: no policy is set")))
    }

    /// Apply the state changes of decisions whose action succeeded.
    pub fn commit(&mut self, decisions: &[Decision]) {
        let Some(engine) = &mut self.engine else { return };
        for decision in decisions {
            if let Err(err) = engine.commit(decision) {
                tracing::error!("policy state not updated: {err}");
            }
        }
    }

    /// Check a fragment's signature, decide `load_fragment` on its issuer,
    /// feed and SVN, and add its containers to the policy in force.
    pub fn load_fragment(&mut self, signed: &parma_policy::SignedFragment) -> Result<Response, AgentError> {
        let engine = self.engine.as_mut().ok_or_else(|| denied("LoadFragment is denied: no policy is set"))?;
        let (decision, fragment) = engine.load_fragment(signed);
        let fragment = match (decision.denial.as_ref(), fragment) {
            (None, Some(fragment)) => fragment,
            (Some(denial), _) => return Err(denied(denial.line())),
            (None, None) => return Err(denied("load_fragment denied")),
        };
        let response = Response::FragmentLoaded {
            issuer: fragment.issuer.clone(),
            feed: fragment.feed.clone(),
            svn: fragment.svn,
            containers: fragment.containers.len() as u64,
        };
        engine
            .commit_fragment(&decision, fragment)
            .map_err(|err| AgentError::new(ErrorCode::Failed, err.to_string()))?;
        Ok(response)
    }

    /// Install a policy if its hash is the HOST_DATA of this launch, which
    /// `host_data` fetches given the hash; returns the hash. The host's text
    /// is hashed, checked against HOST_DATA, and only then parsed and
    /// compiled. A hash that differs, or a policy that is HOST_DATA but does
    /// not compile, puts the agent in lockdown.
    pub fn set_policy(
        &mut self,
        text: &str,
        host_data: impl FnOnce(&[u8; 32]) -> Result<[u8; 32], String>,
    ) -> Result<String, AgentError> {
        if let Some(hash) = self.policy_hash() {
            return Err(denied(format!("policy {hash} is already in force")));
        }
        if let Some(reason) = &self.lockdown {
            return Err(denied(reason.clone()));
        }
        let failed = |err: parma_policy::PolicyError| AgentError::new(ErrorCode::Failed, err.to_string());
        let policy = Policy::from_bytes(text.as_bytes().to_vec()).map_err(failed)?;
        let host_data = host_data(&policy.hash()).map_err(|err| {
            AgentError::new(ErrorCode::Failed, format!("cannot check the policy against HOST_DATA: {err}"))
        })?;
        if policy.hash() != host_data {
            let reason = format!(
                "policy {} is not the HOST_DATA {} of this launch; the agent refuses every request but Ping, \
                 GuestInfo and Shutdown",
                policy.hash_hex(),
                hex::encode(host_data)
            );
            self.lockdown = Some(reason.clone());
            return Err(denied(reason));
        }
        let engine = match Engine::new(&policy) {
            Ok(engine) => engine,
            Err(err) => {
                // The attested policy itself is broken: nothing can ever be allowed.
                let reason = format!(
                    "policy {} is the HOST_DATA of this launch but cannot be used ({err}); the agent refuses \
                     every request but Ping, GuestInfo and Shutdown",
                    policy.hash_hex()
                );
                self.lockdown = Some(reason.clone());
                return Err(AgentError::new(ErrorCode::Failed, reason));
            }
        };
        let hash = engine.policy_hash().to_string();
        self.engine = Some(engine);
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_ALL: &str = include_str!("../../policies/allow_all.rego");

    /// A launch whose HOST_DATA is this policy's hash.
    fn hash_of(text: &str) -> impl FnOnce(&[u8; 32]) -> Result<[u8; 32], String> {
        let hash = Policy::from_bytes(text.as_bytes().to_vec()).unwrap().hash();
        move |_| Ok(hash)
    }

    fn attest() -> Request {
        Request::GetAttestation { report_data: "00".into() }
    }

    fn attest_point() -> Vec<Input> {
        vec![Input::GetAttestation(parma_policy::input::GetAttestation { report_data: "00".into(), running: vec![] })]
    }

    fn info_point() -> Vec<Input> {
        vec![Input::GetProperties(parma_policy::input::Empty {})]
    }

    #[test]
    fn requests_that_are_not_enforcement_points_pass() {
        let mut gate = Gate::default();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
        // Before a policy, everything else is denied, attestation included.
        let err = gate.check(&attest(), &attest_point()).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert_eq!(err.message, "GetAttestation is denied: no policy is set");
        gate.set_policy(ALLOW_ALL, hash_of(ALLOW_ALL)).unwrap();
        for request in [Request::Ping, Request::Shutdown] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
        assert_eq!(gate.check(&attest(), &attest_point()).map(|d| d.len()), Ok(1));
        assert_eq!(gate.check(&Request::GuestInfo, &info_point()).map(|d| d.len()), Ok(1));
        assert!(gate.runtime_logging_allowed());
    }

    #[test]
    fn guest_info_and_logging_follow_the_knobs() {
        let policy = "package policy\nget_properties := data.framework.get_properties\n\
                      runtime_logging := data.framework.runtime_logging\nallow_properties_access := false\n";
        let mut gate = Gate::default();
        gate.set_policy(policy, hash_of(policy)).unwrap();
        let err = gate.check(&Request::GuestInfo, &info_point()).unwrap_err();
        assert!(err.message.contains("allow_properties_access is false"), "{}", err.message);
        assert!(!gate.runtime_logging_allowed());
    }

    #[test]
    fn a_policy_is_set_once() {
        let mut gate = Gate::default();
        let set = Request::SetPolicy { policy: ALLOW_ALL.into() };
        assert_eq!(gate.check(&set, &[]), Ok(vec![]));
        let hash = gate.set_policy(ALLOW_ALL, hash_of(ALLOW_ALL)).unwrap();
        assert_eq!(hash, parma_policy::policy_hash(ALLOW_ALL.as_bytes()));
        let err = gate.check(&set, &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains(&hash), "{}", err.message);
        assert_eq!(
            gate.set_policy("package policy\n", hash_of("package policy\n")).unwrap_err().code,
            ErrorCode::PolicyDenied
        );
    }

    #[test]
    fn host_data_is_checked_before_the_rego_is_parsed() {
        // Text that is not the launch's policy is never parsed: the answer
        // is the HOST_DATA mismatch, not a parse error.
        let mut gate = Gate::default();
        let err = gate.set_policy("package policy\nallow := \n", |_| Ok([1; 32])).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains("is not the HOST_DATA"), "{}", err.message);
        // No provider: no policy, and the agent may try again.
        let mut gate = Gate::default();
        let err = gate.set_policy(ALLOW_ALL, |_| Err("no provider".into())).unwrap_err();
        assert!(err.message.contains("cannot check the policy against HOST_DATA: no provider"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        assert_eq!(gate.check(&Request::SetPolicy { policy: ALLOW_ALL.into() }, &[]), Ok(vec![]));
    }

    #[test]
    fn an_attested_policy_that_does_not_compile_locks_the_agent_down() {
        let mut gate = Gate::default();
        let broken = "package policy\nallow := \n";
        let err = gate.set_policy(broken, hash_of(broken)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Failed);
        assert!(err.message.contains("does not compile"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        let err = gate.check(&Request::SetPolicy { policy: ALLOW_ALL.into() }, &[]).unwrap_err();
        assert!(err.message.contains("cannot be used"), "{}", err.message);
    }

    #[test]
    fn a_policy_that_is_not_host_data_locks_the_agent_down() {
        let mut gate = Gate::default();
        let err = gate.set_policy(ALLOW_ALL, |_| Ok([0; 32])).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains("is not the HOST_DATA 0000"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
        // No report with the host's REPORT_DATA while no policy decides.
        let err = gate.check(&attest(), &attest_point()).unwrap_err();
        assert!(err.message.contains("GetAttestation is denied: policy"), "{}", err.message);
        let err = gate.check(&Request::SetPolicy { policy: ALLOW_ALL.into() }, &[]).unwrap_err();
        assert!(err.message.contains("refuses every request but"), "{}", err.message);
        assert!(gate.set_policy(ALLOW_ALL, hash_of(ALLOW_ALL)).is_err(), "lockdown is final");
    }

    #[test]
    fn fragments_need_a_policy_a_listed_issuer_and_load_once() {
        use p384::ecdsa::signature::Signer as _;
        use p384::pkcs8::EncodePublicKey as _;
        let key = p384::ecdsa::SigningKey::from_slice(&[7; 48]).unwrap();
        let public_key = key.verifying_key().to_public_key_der().unwrap().as_bytes().to_vec();
        let payload = br#"{"feed": "contoso/sidecar", "svn": 2, "containers": [{"name": "sidecar", "layers": []}]}"#;
        let signature: p384::ecdsa::Signature = key.sign(payload);
        let signed = parma_policy::SignedFragment {
            payload: payload.to_vec(),
            signature: signature.to_der().as_bytes().to_vec(),
            public_key: public_key.clone(),
        };
        let request =
            Request::LoadFragment { fragment: String::new(), signature: String::new(), public_key: String::new() };

        let mut gate = Gate::default();
        assert!(gate.check(&request, &[]).unwrap_err().message.contains("no policy is set"));
        assert!(gate.load_fragment(&signed).unwrap_err().message.contains("no policy is set"));
        let issuer = parma_policy::fragment::issuer_id(&public_key);
        let policy = format!(
            "package policy\n\ncontainers := []\n\nfragments := [{{\"issuer\": \"{issuer}\", \"feed\": \"contoso/sidecar\", \"minimum_svn\": 1}}]\n\nload_fragment := data.framework.load_fragment\n"
        );
        gate.set_policy(&policy, hash_of(&policy)).unwrap();
        assert!(gate.check(&request, &[]).unwrap().is_empty());
        let loaded = gate.load_fragment(&signed).unwrap();
        assert_eq!(loaded, Response::FragmentLoaded { issuer, feed: "contoso/sidecar".into(), svn: 2, containers: 1 });
        let again = gate.load_fragment(&signed).unwrap_err();
        assert_eq!(again.code, ErrorCode::PolicyDenied);
        assert!(again.message.contains("is already loaded"), "{}", again.message);
        let mut forged = signed.clone();
        forged.payload[10] ^= 1;
        assert!(gate.load_fragment(&forged).unwrap_err().message.contains("does not verify"));
    }

    #[test]
    fn attestation_waits_for_a_complete_group() {
        let policy =
            "package policy\nget_attestation := data.framework.get_attestation\nrequired_containers := [\"web\"]\n";
        let mut gate = Gate::default();
        gate.set_policy(policy, hash_of(policy)).unwrap();
        let err = gate.check(&attest(), &attest_point()).unwrap_err();
        assert!(err.message.contains("the container group is not complete: \"web\" not running"), "{}", err.message);
    }
}
