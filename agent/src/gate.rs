//! The policy gate: the one place that decides whether a request may run.
//!
//! Deny by default, with no build and no flag that turns it off. Every
//! request type is listed below by name (no wildcard), so a new request
//! cannot reach a handler until this file says how it is decided.
//!
//! - `Ping`, `GuestInfo` and `Shutdown` are not enforcement points: they
//!   change nothing but the UVM's power state and pass in every state.
//! - `SetPolicy` installs the execution policy once, only if its sha256 is
//!   the HOST_DATA of this launch (from a fresh attestation report); a
//!   second one is denied. A policy whose hash differs puts the agent in
//!   lockdown: it refuses everything but `Ping`, `GuestInfo`,
//!   `GetAttestation` and `Shutdown`, saying why.
//! - `GetAttestation` is denied before a policy is set, passes in lockdown
//!   (so the host can show why), and otherwise is decided by the policy's
//!   `get_attestation` rule (a group can be attested only once complete).
//! - Requests that act on the guest (mounts, containers, exec, signals,
//!   delete) are decided by the policy engine at their enforcement points,
//!   with inputs the dispatcher builds from the request and the agent's own
//!   records; they are denied while no policy is set. The decisions' state
//!   changes are committed only after the action succeeded.
//! - `LoadFragment` needs a policy in force; the issuer's signature is
//!   checked first, then the policy's `load_fragment` rule decides on issuer,
//!   feed and SVN, and only then do the fragment's containers join the policy.
//! - `StartContainer`, `UpdateContainer` (limits only restrict), `WaitProcess`,
//!   `ReadOutput`, `WriteStdin` and `ResizeTerminal` act
//!   only on a container the policy already allowed (at `create_container`
//!   or `exec_in_container`); they need a policy in force.

use parma_policy::{Decision, Engine, Point, Policy};
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
    pub fn check(
        &mut self,
        request: &Request,
        points: &[(Point, serde_json::Value)],
    ) -> Result<Vec<Decision>, AgentError> {
        if let Some(reason) = &self.lockdown {
            return match request {
                Request::Ping | Request::GuestInfo | Request::GetAttestation { .. } | Request::Shutdown => {
                    Ok(Vec::new())
                }
                Request::SetPolicy { .. }
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
            Request::Ping | Request::GuestInfo | Request::Shutdown => Ok(Vec::new()),
            Request::SetPolicy { .. } => match self.policy_hash() {
                None => Ok(Vec::new()),
                Some(hash) => {
                    Err(denied(format!("SetPolicy is denied: policy {hash} is in force and cannot be replaced")))
                }
            },
            Request::GetAttestation { report_data } => match &mut self.engine {
                None => Err(denied("GetAttestation is denied: no policy is set")),
                Some(engine) => {
                    let decision =
                        engine.decide(Point::GetAttestation, &serde_json::json!({ "reportData": report_data }));
                    match decision.denial {
                        None => Ok(Vec::new()),
                        Some(denial) => Err(denied(denial.line())),
                    }
                }
            },
            Request::StartContainer { .. }
            | Request::UpdateContainer { .. }
            | Request::WaitProcess { .. }
            | Request::ReadOutput { .. }
            | Request::WriteStdin { .. }
            | Request::ResizeTerminal { .. }
            // Decided in `load_fragment`, after the signature checked.
            | Request::LoadFragment { .. } => {
                self.engine_for(request)?;
                Ok(Vec::new())
            }
            Request::MountLayer { .. }
            | Request::UnmountLayer { .. }
            | Request::MountOverlay { .. }
            | Request::UnmountOverlay { .. }
            | Request::MountScratch { .. }
            | Request::CreateContainer { .. }
            | Request::ExecProcess { .. }
            | Request::SignalProcess { .. }
            | Request::DeleteContainer { .. } => {
                let engine = self.engine_for(request)?;
                let mut decisions = Vec::with_capacity(points.len());
                for (point, input) in points {
                    let decision = engine.decide(*point, input);
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

    /// Compile a policy and install it if its hash is the HOST_DATA of this
    /// launch, which `host_data` fetches given the hash (only once the policy
    /// compiled); returns the hash. A hash that differs puts the agent in
    /// lockdown.
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
        // A policy that does not compile is refused as such, before its hash matters.
        let engine = Engine::new(&policy).map_err(failed)?;
        let host_data = host_data(&policy.hash()).map_err(|err| {
            AgentError::new(ErrorCode::Failed, format!("cannot check the policy against HOST_DATA: {err}"))
        })?;
        if policy.hash() != host_data {
            let reason = format!(
                "policy {} is not the HOST_DATA {} of this launch; the agent refuses every request but Ping, \
                 GuestInfo, GetAttestation and Shutdown",
                policy.hash_hex(),
                hex::encode(host_data)
            );
            self.lockdown = Some(reason.clone());
            return Err(denied(reason));
        }
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

    #[test]
    fn requests_that_are_not_enforcement_points_pass() {
        let mut gate = Gate::default();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
        // Before a policy, everything else is denied, attestation included.
        let err = gate.check(&attest(), &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert_eq!(err.message, "GetAttestation is denied: no policy is set");
        gate.set_policy(ALLOW_ALL, hash_of(ALLOW_ALL)).unwrap();
        for request in [Request::Ping, Request::GuestInfo, Request::Shutdown, attest()] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
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
    fn a_broken_policy_is_refused_and_leaves_none_in_force() {
        let mut gate = Gate::default();
        let broken = "package policy\nallow := \n";
        let err = gate.set_policy(broken, hash_of(broken)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Failed);
        assert!(err.message.contains("does not compile"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        let err = gate.set_policy(ALLOW_ALL, |_| Err("no provider".into())).unwrap_err();
        assert!(err.message.contains("cannot check the policy against HOST_DATA: no provider"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        assert_eq!(gate.check(&Request::SetPolicy { policy: ALLOW_ALL.into() }, &[]), Ok(vec![]));
    }

    #[test]
    fn a_policy_that_is_not_host_data_locks_the_agent_down() {
        let mut gate = Gate::default();
        let err = gate.set_policy(ALLOW_ALL, |_| Ok([0; 32])).unwrap_err();
        assert_eq!(err.code, ErrorCode::PolicyDenied);
        assert!(err.message.contains("is not the HOST_DATA 0000"), "{}", err.message);
        assert!(gate.policy_hash().is_none());
        for request in [Request::Ping, Request::GuestInfo, attest(), Request::Shutdown] {
            assert_eq!(gate.check(&request, &[]), Ok(vec![]));
        }
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
        let err = gate.check(&attest(), &[]).unwrap_err();
        assert!(err.message.contains("the container group is not complete: \"web\" not started"), "{}", err.message);
    }
}
