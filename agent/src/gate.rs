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
//!   the HOST_DATA of this launch (on SNP from a fresh attestation report,
//!   fetched before the host's Rego is parsed); a second one is denied.
//!   The framework the policy binds to comes compiled in the image and is
//!   read on a low-priority thread from the agent's start, so that
//!   SetPolicy only adds the policy. A policy
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

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};

use parma_policy::input::{Empty, Input, MountDevice};
use parma_policy::{Decision, Engine, Framework, Point, Policy, PolicyError};
use parma_protocol::{AgentError, ErrorCode, Request, Response};

fn denied(message: impl Into<String>) -> AgentError {
    AgentError::new(ErrorCode::PolicyDenied, message)
}

/// The framework being read (or compiled) on a thread of its own.
#[derive(Debug)]
struct Reading {
    read: Receiver<Result<Framework, PolicyError>>,
    /// The reader's thread id (0 until it has started).
    thread: Arc<AtomicI32>,
}

/// The gate and the policy in force.
#[derive(Debug, Default)]
pub struct Gate {
    engine: Option<Engine>,
    lockdown: Option<String>,
    /// The framework, read ahead of the policy; taken by SetPolicy.
    framework: Option<Reading>,
}

/// The lowest scheduling priority: background work the guest does when idle.
const IDLE_NICE: i32 = 19;

/// Give `thread` (the calling one if `None`) the nice value `nice`.
fn renice(thread: Option<rustix::process::Pid>, nice: i32) {
    let thread = thread.unwrap_or_else(rustix::thread::gettid);
    if let Err(err) = rustix::process::setpriority_process(Some(thread), nice) {
        tracing::debug!("cannot give thread {} nice {nice}: {err}", thread.as_raw_nonzero());
    }
}

/// Where the image builder puts the framework compiled for the register VM
/// (`parma_policy::Framework::to_bytes`): part of the initrd, so of the
/// launch measurement.
const FRAMEWORK_PROGRAM: &str = "/etc/parma/framework.rvm";

/// The framework: the program the image carries, or, when it has none or
/// one another build wrote, compiled here (slower: the framework is parsed
/// and compiled when the policy comes).
fn read_framework() -> Result<Framework, PolicyError> {
    match std::fs::read(FRAMEWORK_PROGRAM) {
        Ok(bytes) => match Framework::from_bytes(&bytes) {
            Ok(framework) => return Ok(framework),
            Err(err) => tracing::warn!("{FRAMEWORK_PROGRAM}: {err}; compiling the framework instead"),
        },
        Err(err) => tracing::warn!("{FRAMEWORK_PROGRAM}: {err}; compiling the framework instead"),
    }
    Framework::compile()
}

/// Read the framework on a thread of its own at the lowest priority, so it
/// takes only CPU the boot and the agent leave idle; once it is handed
/// over, another such thread warms the engine up ([`warm_up`]).
fn read_framework_ahead() -> Option<Reading> {
    let (read, framework) = mpsc::sync_channel(1);
    let thread = Arc::new(AtomicI32::new(0));
    let tid = thread.clone();
    let spawned = std::thread::Builder::new().name("framework".into()).spawn(move || {
        tid.store(rustix::thread::gettid().as_raw_nonzero().get(), Ordering::Release);
        renice(None, IDLE_NICE);
        let result = read_framework();
        let warm = result.as_ref().ok().cloned();
        // No gate waiting any more (a policy was set without it): nothing to warm up for.
        if read.send(result).is_ok()
            && let Some(framework) = warm
        {
            let warming = std::thread::Builder::new().name("warm-up".into()).spawn(move || {
                renice(None, IDLE_NICE);
                warm_up(&framework);
            });
            if let Err(err) = warming {
                tracing::debug!("no warm-up: {err}");
            }
        }
    });
    match spawned {
        Ok(_) => Some(Reading { read: framework, thread }),
        Err(err) => {
            // SetPolicy parses it then.
            tracing::warn!("cannot start the framework reader: {err}");
            None
        }
    }
}

impl Reading {
    /// The framework read. A SetPolicy that comes before the reader is
    /// done puts it back to normal priority and waits (else it would wait
    /// on a thread that gets CPU only when nothing else wants it).
    fn take(self) -> Result<Framework, PolicyError> {
        match self.read.try_recv() {
            Ok(framework) => return framework,
            // The reader is gone (without the guest's panic=abort, a panic): read here.
            Err(TryRecvError::Disconnected) => return read_framework(),
            Err(TryRecvError::Empty) => {}
        }
        if let Some(thread) = rustix::process::Pid::from_raw(self.thread.load(Ordering::Acquire)) {
            renice(Some(thread), 0);
        }
        self.read.recv().unwrap_or_else(|_| read_framework())
    }
}

/// What the warm-up loads: every point bound to the framework, no containers.
fn warm_up_policy() -> String {
    let mut text = String::from("package policy\n\nimport rego.v1\n\napi_version := \"0.1.0\"\n\ncontainers := []\n");
    for point in Point::ALL {
        text.push_str(&format!("\n{0} := data.framework.{0}\n", point.rule()));
    }
    text
}

/// Load a built-in policy into a copy of the framework and decide once,
/// then drop it all. Loading a policy and deciding run a lot of code for
/// the first time; under emulation (TCG) translating that code costs most
/// of SetPolicy (measured: about 0.1 s of SetPolicy's 0.3 s is left when
/// the warm-up ran first). On this low-priority thread it uses time the
/// guest is idle before the host sends the policy; a SetPolicy that comes
/// sooner does not wait for it. Nothing of it is kept: the engine and its
/// decision are dropped, and the gate's engine is built anew from the
/// host's policy.
fn warm_up(framework: &Framework) {
    let engine = Policy::from_bytes(warm_up_policy().into_bytes())
        .and_then(|policy| Engine::with_framework(framework.clone(), &policy));
    match engine {
        Ok(mut engine) => {
            let input = Input::MountDevice(MountDevice { target: "/run/warm-up".into(), device_hash: "0".repeat(64) });
            let decision = engine.decide_input(&input);
            tracing::debug!("engine warmed up (a layer no policy lists: allowed {})", decision.allowed);
        }
        Err(err) => tracing::warn!("the engine's warm-up failed: {err}"),
    }
}

impl Gate {
    /// A gate with no policy, the framework already being read.
    pub fn new() -> Self {
        Self { framework: read_framework_ahead(), ..Self::default() }
    }

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
                | Request::ContainerStats { .. }
                | Request::StartContainer { .. }
                | Request::ExecProcess { .. }
                | Request::SignalProcess { .. }
                | Request::WaitProcess { .. }
                | Request::ReadOutput { .. }
                | Request::WriteStdin { .. }
                | Request::ResizeTerminal { .. }
                | Request::DeleteContainer { .. }
                | Request::CreateSandbox { .. }
                | Request::UpdateInterface { .. }
                | Request::UpdateRoutes { .. }
                | Request::AddArpNeighbors { .. }
                | Request::CopyFile { .. }
                | Request::ProvisionSecret { .. }
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
            | Request::ContainerStats { .. }
            | Request::ExecProcess { .. }
            | Request::SignalProcess { .. }
            | Request::DeleteContainer { .. }
            | Request::CreateSandbox { .. }
            | Request::UpdateInterface { .. }
            | Request::UpdateRoutes { .. }
            | Request::AddArpNeighbors { .. }
            | Request::CopyFile { .. }
            | Request::ProvisionSecret { .. } => {
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

    /// Decide one point that no host request meets (a container's own
    /// request): denied in lockdown and while no policy is set.
    pub fn decide_alone(&mut self, input: &Input) -> Result<(), AgentError> {
        let point = input.point();
        if let Some(reason) = &self.lockdown {
            return Err(denied(format!("{point} is denied: {reason}")));
        }
        let engine = self.engine.as_mut().ok_or_else(|| denied(format!("{point} is denied: no policy is set")))?;
        let decision = engine.decide(point, &input.to_value());
        match &decision.denial {
            Some(denial) => Err(denied(denial.line())),
            None if decision.allowed => Ok(()),
            None => Err(denied(format!("{point} is denied"))),
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
        // A reader that never started: read here.
        let framework = self.framework.take().map_or_else(read_framework, Reading::take);
        let engine = match framework.and_then(|framework| Engine::with_framework(framework, &policy)) {
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
    fn a_framework_parsed_ahead_decides_as_one_parsed_at_set_policy() {
        let policy = "package policy\nget_properties := data.framework.get_properties\n\
                      allow_properties_access := false\n";
        let mut ahead = Gate::new();
        // Whether or not the reader (and its warm-up) finished first.
        for gate in [&mut ahead, &mut Gate::default()] {
            assert_eq!(gate.set_policy(policy, hash_of(policy)), Ok(parma_policy::policy_hash(policy.as_bytes())));
            let err = gate.check(&Request::GuestInfo, &info_point()).unwrap_err();
            assert!(err.message.contains("allow_properties_access is false"), "{}", err.message);
        }
        // A gate whose reader was never waited for is dropped cleanly (the
        // thread warms up and ends on its own).
        drop(Gate::new());
    }

    #[test]
    fn the_warm_up_policy_binds_every_point_and_allows_no_layer() {
        let text = warm_up_policy();
        assert_eq!(parma_policy::bound_points(&text), Point::ALL.to_vec());
        let policy = Policy::from_bytes(text.into_bytes()).unwrap();
        let mut engine = Engine::with_framework(Framework::compile().unwrap(), &policy).unwrap();
        let input = Input::MountDevice(MountDevice { target: "/run/warm-up".into(), device_hash: "0".repeat(64) });
        assert!(!engine.decide_input(&input).allowed);
        warm_up(&Framework::compile().unwrap());
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
