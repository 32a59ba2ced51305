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
//! evaluation over its budget ([`DEFAULT_INSTRUCTIONS`], backed by the wall
//! clock) is a denial, with a reason. There is no
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

pub mod data;
mod decision;
pub mod fragment;
pub mod input;
mod point;
pub mod scenario;
mod state;

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use sha2::{Digest, Sha256};

pub use decision::{Candidate, Decision, Denial};
pub use fragment::{Fragment, FragmentError, SignedFragment};
pub use point::{Point, UnknownPoint};
pub use state::{Action, MetadataOp, State, StateError};

/// The framework the tenant's policy binds its rules to (package `framework`).
pub const FRAMEWORK: &str = include_str!("framework.rego");

/// The largest policy accepted, in bytes.
pub const MAX_POLICY: usize = 512 * 1024;

/// Paths of `/proc` and `/sys` a container sees empty when its request
/// names none (runc's and containerd's defaults), and that the framework
/// requires when a container of the policy names none.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Paths of `/proc` a container sees read-only when its request names none
/// (runc's defaults): the kernel's global knobs.
pub const DEFAULT_READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// How many register-VM instructions one decision may execute: the budget
/// that decides, the same on every machine (under TCG as on hardware). A
/// decision of the framework over a generated 100-container policy
/// executes under 1,000 (measured with `Engine::set_instruction_limit`);
/// the limit leaves four orders of magnitude for larger policies.
pub const DEFAULT_INSTRUCTIONS: usize = 10_000_000;

/// The wall-clock bound of one decision: a backstop for the agent's
/// liveness (a builtin slow on a huge input, a rule the interpreter runs),
/// set far above what the instruction budget allows even under emulation,
/// so a slow or loaded machine does not turn a decision into a race.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(5);

/// A policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Larger than [`MAX_POLICY`].
    #[error("policy of {0} bytes exceeds the limit of {MAX_POLICY} bytes")]
    TooLarge(usize),
    /// Not UTF-8 text.
    #[error("policy is not UTF-8 text")]
    NotUtf8,
    /// A control character other than tab, line feed and carriage return:
    /// regorus stops reading at a NUL, so the rules after one would be
    /// hashed into HOST_DATA (and read by a reviewer) but never enforced;
    /// it refuses the others.
    #[error(
        "policy has the control character {byte:#04x} at byte {offset}: a policy is text (tab, newline, carriage return)"
    )]
    ControlCharacter {
        /// The character.
        byte: u8,
        /// Where.
        offset: usize,
    },
    /// Rego that does not parse or compile.
    #[error("policy does not compile: {0}")]
    Rego(String),
    /// The module's package is not `policy`.
    #[error("policy must be `package policy`, found {0}")]
    WrongPackage(String),
    /// Two containers with one name: a name must identify one container.
    #[error("container name {0} appears more than once (a name identifies one container)")]
    DuplicateContainer(String),
    /// A container without a name.
    #[error("container {0} of the policy has no name (a string)")]
    UnnamedContainer(usize),
    /// A container's secrets, or the brokers they name, are not of the
    /// form `docs/policy.md` gives.
    #[error("the secrets of container {container}: {reason}")]
    BadSecrets {
        /// The container's name.
        container: String,
        /// What is wrong.
        reason: String,
    },
    /// A pattern (an re2 env rule, a mount source) that is not a valid regular expression.
    #[error("{what} pattern {pattern:?} is not a valid regular expression: {reason}")]
    BadPattern {
        /// Whose pattern.
        what: String,
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
}

/// A secret the policy lists for one of its containers, with the broker
/// it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSecret {
    /// The container's rule.
    pub secret: data::SecretRule,
    /// The policy's broker it names.
    pub broker: data::Broker,
}

/// The policy's data as the agent evaluates it (its data rules, indexed).
fn evaluated_data(policy: &Policy) -> Result<regorus::Value, PolicyError> {
    let mut rego = parsed_framework(DEFAULT_BUDGET)?;
    Engine::add_policy(&mut rego, policy)?;
    policy_data(&mut rego)
}

/// A data field as JSON; absent (undefined) or null: `Null`. A value JSON
/// cannot hold is an error, not nothing.
fn data_json(value: &regorus::Value) -> Result<serde_json::Value, String> {
    match value {
        regorus::Value::Undefined | regorus::Value::Null => Ok(serde_json::Value::Null),
        value => serde_json::to_value(value).map_err(|err| format!("not JSON: {err}")),
    }
}

/// The brokers of the evaluated data `fields`.
fn brokers_of(fields: &regorus::Value) -> Result<Vec<data::Broker>, String> {
    match data_json(&fields["brokers"]).map_err(|err| format!("the policy's brokers: {err}"))? {
        serde_json::Value::Null => Ok(Vec::new()),
        value => serde_json::from_value(value).map_err(|err| format!("the policy's brokers: {err}")),
    }
}

/// The key brokers the policy lists (`brokers`).
pub fn listed_brokers(policy: &Policy) -> Result<Vec<data::Broker>, PolicyError> {
    let data = evaluated_data(policy)?;
    brokers_of(&data[POLICY_DATA]).map_err(PolicyError::Rego)
}

/// The secrets the policy lists for its container `name` (none when no
/// container has that name), from the policy's data evaluated as the
/// agent evaluates it: what a host asks the agent to provision before the
/// container starts. Each request is still decided on its own in the
/// guest (`release_secret`); this only says what to ask for.
pub fn listed_secrets(policy: &Policy, name: &str) -> Result<Vec<ListedSecret>, PolicyError> {
    let data = evaluated_data(policy)?;
    let fields = &data[POLICY_DATA];
    let bad = |reason: String| PolicyError::BadSecrets { container: name.to_string(), reason };
    let container = match &fields["containers"] {
        regorus::Value::Array(containers) => {
            containers.iter().find(|container| container["name"].as_string().is_ok_and(|n| n.as_ref() == name))
        }
        _ => None,
    };
    let Some(container) = container else { return Ok(Vec::new()) };
    let secrets: Vec<data::SecretRule> = match data_json(&container["secrets"]).map_err(bad)? {
        serde_json::Value::Null => Vec::new(),
        value => serde_json::from_value(value).map_err(|err| bad(format!("not a list of secret rules: {err}")))?,
    };
    if secrets.is_empty() {
        return Ok(Vec::new());
    }
    let brokers = brokers_of(fields).map_err(bad)?;
    secrets
        .into_iter()
        .map(|secret| {
            let broker = brokers
                .iter()
                .find(|broker| broker.name == secret.broker)
                .cloned()
                .ok_or_else(|| bad(format!("broker {:?} is not among the policy's brokers", secret.broker)))?;
            Ok(ListedSecret { secret, broker })
        })
        .collect()
}

/// Check that `pattern` parses as regorus will compile it (anchored).
fn check_pattern(what: impl Fn() -> String, pattern: &str) -> Result<(), PolicyError> {
    regex_syntax::Parser::new().parse(&format!("^(?:{pattern})$")).map(drop).map_err(|err| PolicyError::BadPattern {
        what: what(),
        pattern: pattern.chars().take(128).collect(),
        reason: err.to_string().lines().last().unwrap_or_default().trim().to_string(),
    })
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
        let control = |byte: &u8| byte.is_ascii_control() && !matches!(byte, b'\t' | b'\n' | b'\r');
        if let Some(offset) = bytes.iter().position(control) {
            return Err(PolicyError::ControlCharacter { byte: bytes.get(offset).copied().unwrap_or_default(), offset });
        }
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

/// How regorus evaluates the rules. Both give the same decisions (the golden
/// tables run on both, and a differential test holds them to it on random
/// policies and requests); they differ in speed and in one reason: a builtin
/// that fails is an error in the interpreter and an undefined rule in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// regorus's register VM (RVM) for every enforcement point the policy
    /// binds to the framework (`create_container := data.framework.create_container`
    /// and nothing else naming it), compiled once at load: about 3x faster
    /// per decision. Points whose rules the policy writes itself are decided
    /// by the interpreter: the VM runs only the framework's code, which the
    /// differential test covers. The default.
    Vm,
    /// regorus's tree-walking interpreter for every point.
    Interpreter,
}

/// The policy compiled for regorus's register VM.
struct Vm {
    machine: regorus::rvm::RegoVM,
    /// Loaded again after each decision, which drops what the run left behind.
    program: Arc<regorus::rvm::Program>,
    /// Which rules are the program's entry points.
    entry: Entry,
}

/// The entry points of a [`Vm`]'s program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// `data.policy.RULE`: the policy compiled with the framework.
    Policy,
    /// `data.framework.RULE`: the framework's own program, for a policy
    /// that binds the point to it.
    Framework,
}

impl Entry {
    fn rule(self, point: Point) -> String {
        match self {
            Self::Policy => format!("data.policy.{}", point.rule()),
            Self::Framework => framework_entry(point),
        }
    }
}

/// The policy engine: the framework and one policy loaded into regorus,
/// plus the state the decisions build up.
pub struct Engine {
    rego: regorus::Engine,
    /// The policy compiled for regorus's register VM, with the points the
    /// policy defines as entry points; `None`: the tree-walking interpreter.
    vm: Option<Vm>,
    /// Entry points of `vm`.
    entry_points: Vec<String>,
    /// The data document (`data.parma_policy_data` and its indexes); fragments extend it.
    data: regorus::Value,
    state: State,
    policy_hash: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy_hash", &self.policy_hash)
            .field("backend", &if self.vm.is_some() { Backend::Vm } else { Backend::Interpreter })
            .field("entry_points", &self.entry_points)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The framework ready for decisions: its rules compiled for regorus's
/// register VM, one entry point per enforcement point
/// (`data.framework.RULE`). The framework is a constant of this crate, so
/// the program is the same for every policy: the image builder compiles it
/// once and puts it in the UVM ([`Framework::to_bytes`]), and the agent
/// reads it back at boot ([`Framework::from_bytes`]) instead of parsing
/// and compiling the framework when the policy comes. Cloning it is cheap
/// (the program is shared).
#[derive(Clone)]
pub struct Framework {
    program: Arc<regorus::rvm::Program>,
    budget: Duration,
}

impl std::fmt::Debug for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framework")
            .field("budget", &self.budget)
            .field("entry_points", &self.program.entry_points.len())
            .finish_non_exhaustive()
    }
}

/// The framework's program (or why it does not compile), compiled once per process.
static FRAMEWORK_PROGRAM: OnceLock<Result<Arc<regorus::rvm::Program>, String>> = OnceLock::new();

/// The VM entry point of `point` in the framework's program.
fn framework_entry(point: Point) -> String {
    format!("data.framework.{}", point.rule())
}

/// A regorus engine configured for decisions: strict builtin errors, and
/// each evaluation bounded by `budget` of wall-clock time.
fn decision_engine(budget: Duration) -> regorus::Engine {
    let mut rego = regorus::Engine::new();
    rego.set_strict_builtin_errors(true);
    rego.set_execution_timer_config(ExecutionTimerConfig {
        limit: budget,
        check_interval: NonZeroU32::MIN.saturating_add(63),
    });
    rego
}

/// The framework parsed into a decision engine (for the interpreter).
fn parsed_framework(budget: Duration) -> Result<regorus::Engine, PolicyError> {
    let mut rego = decision_engine(budget);
    rego.add_policy("framework.rego".into(), FRAMEWORK.into())
        .map_err(|err| PolicyError::Rego(format!("framework: {err}")))?;
    Ok(rego)
}

/// Compile the framework alone for the register VM, every point an entry point.
fn compile_framework() -> Result<Arc<regorus::rvm::Program>, PolicyError> {
    let error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("framework for the register VM: {err}"));
    let mut rego = parsed_framework(DEFAULT_BUDGET)?;
    let names: Vec<String> = Point::ALL.into_iter().map(framework_entry).collect();
    let first = names.first().ok_or_else(|| error(&"no enforcement points"))?;
    let compiled = rego.compile_with_entrypoint(&first.as_str().into()).map_err(|err| error(&err))?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &names).map_err(|err| error(&err))
}

impl Framework {
    /// The framework compiled here (once per process), for engines with the
    /// default budget.
    pub fn compile() -> Result<Self, PolicyError> {
        Self::with_budget(DEFAULT_BUDGET)
    }

    /// The framework compiled here (once per process), for engines whose
    /// decisions may each take at most `budget` of wall-clock time.
    pub fn with_budget(budget: Duration) -> Result<Self, PolicyError> {
        let compiled = FRAMEWORK_PROGRAM.get_or_init(|| compile_framework().map_err(|err| err.to_string()));
        let program = compiled.clone().map_err(PolicyError::Rego)?;
        Self::checked(program, budget)
    }

    /// The framework's program as [`Framework::to_bytes`] wrote it, for
    /// engines with the default budget. Refused unless it is complete
    /// (regorus's format of this build), is the program of this crate's
    /// framework (its source, byte for byte) and has exactly one entry
    /// point per enforcement point. These checks catch a mistake (an image
    /// another build made), not tampering: the compiled code itself is not
    /// checked, so the bytes must come from where the agent's own do (the
    /// measured initrd).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PolicyError> {
        let error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("the framework's program: {err}"));
        let program = match regorus::rvm::Program::deserialize_binary(bytes).map_err(|err| error(&err))? {
            regorus::rvm::program::DeserializationResult::Complete(program) => program,
            regorus::rvm::program::DeserializationResult::Partial(_) => {
                return Err(error(&"written by another version of regorus (only partly readable)"));
            }
        };
        let source = program.sources.iter().map(|source| source.content.as_str()).collect::<Vec<_>>();
        if source != [FRAMEWORK] {
            return Err(error(&"compiled from another framework than this build's"));
        }
        Self::checked(Arc::new(program), DEFAULT_BUDGET)
    }

    /// The program, serialized (regorus's binary format; the same bytes for
    /// the same framework and regorus, so the image stays reproducible).
    pub fn to_bytes(&self) -> Result<Vec<u8>, PolicyError> {
        self.program.serialize_binary().map_err(|err| PolicyError::Rego(format!("the framework's program: {err}")))
    }

    fn checked(program: Arc<regorus::rvm::Program>, budget: Duration) -> Result<Self, PolicyError> {
        let mut names: Vec<&str> = program.entry_points.keys().map(String::as_str).collect();
        let mut expected: Vec<String> = Point::ALL.into_iter().map(framework_entry).collect();
        names.sort_unstable();
        expected.sort_unstable();
        if names != expected.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(PolicyError::Rego(format!(
                "the framework's program has entry points {names:?}, not one per enforcement point"
            )));
        }
        Ok(Self { program, budget })
    }
}

/// Whether every `data` of the policy's text is the start of one of its
/// bindings of an enforcement point to the framework (`RULE :=
/// data.framework.RULE`, `declared`: the points so bound that are rules of
/// the policy, not a line of the same form inside a rule's body, which
/// regorus says): then nothing else in it reads the framework or any other
/// document, and its rules mean the same alone as beside the framework.
/// Any other use of `data` (an import, a reference, a variable so named, a
/// body's assignment from the framework) says no.
fn self_contained(text: &str, declared: &[Point]) -> bool {
    identifiers(text).filter(|ident| *ident == "data").count() == declared.len()
}

impl Engine {
    /// Load a policy with the default budget.
    pub fn new(policy: &Policy) -> Result<Self, PolicyError> {
        Self::with_budget(policy, DEFAULT_BUDGET)
    }

    /// Load a policy for the register VM with an already compiled (or read)
    /// framework and its budget: the same engine as [`Engine::new`] gives.
    pub fn with_framework(framework: Framework, policy: &Policy) -> Result<Self, PolicyError> {
        Self::load(framework, policy)
    }

    /// Load a policy; each decision may take at most `budget` of wall-clock time.
    pub fn with_budget(policy: &Policy, budget: Duration) -> Result<Self, PolicyError> {
        Self::with_backend(policy, budget, Backend::Vm)
    }

    /// Load a policy for one evaluation backend.
    pub fn with_backend(policy: &Policy, budget: Duration, backend: Backend) -> Result<Self, PolicyError> {
        match backend {
            Backend::Vm => Self::load(Framework::with_budget(budget)?, policy),
            Backend::Interpreter => Self::load_interpreted(policy, budget),
        }
    }

    /// The policy's module in `rego`, checked to be package `policy`.
    fn add_policy(rego: &mut regorus::Engine, policy: &Policy) -> Result<(), PolicyError> {
        let package = rego
            .add_policy("policy.rego".into(), policy.text.clone())
            .map_err(|err| PolicyError::Rego(err.to_string()))?;
        if package != "data.policy" {
            return Err(PolicyError::WrongPackage(package));
        }
        Ok(())
    }

    /// Every point decided by the interpreter, the framework beside the policy.
    fn load_interpreted(policy: &Policy, budget: Duration) -> Result<Self, PolicyError> {
        let mut rego = parsed_framework(budget)?;
        Self::add_policy(&mut rego, policy)?;
        let data = policy_data(&mut rego)?;
        rego.add_data(data.clone()).map_err(|err| PolicyError::Rego(err.to_string()))?;
        Ok(Self {
            rego,
            vm: None,
            entry_points: Vec::new(),
            data,
            state: State::default(),
            policy_hash: policy.hash_hex(),
        })
    }

    /// The points the policy binds to the framework on the register VM,
    /// the others on the interpreter.
    fn load(framework: Framework, policy: &Policy) -> Result<Self, PolicyError> {
        let Framework { program, budget } = framework;
        let bound = bound_points(&policy.text);
        // The policy alone first: what it declares says whether it is
        // self-contained.
        let mut alone = decision_engine(budget);
        Self::add_policy(&mut alone, policy)?;
        let declared: Vec<Point> = bound
            .iter()
            .copied()
            .filter(|point| alone.has_declared_rule_rooted_at("policy.rego", point.rule()).unwrap_or(false))
            .collect();
        if self_contained(&policy.text, &declared) {
            // Its data rules and the points it decides itself read nothing
            // of the framework. The points it binds run the framework's
            // program, which does not depend on the policy.
            let mut rego = alone;
            let data = policy_data(&mut rego)?;
            let vm =
                (!declared.is_empty()).then(|| vm_of(program, data.clone(), budget, Entry::Framework)).transpose()?;
            rego.add_data(data.clone()).map_err(|err| PolicyError::Rego(err.to_string()))?;
            let entry_points = declared.into_iter().map(|point| format!("data.policy.{}", point.rule())).collect();
            return Ok(Self { rego, vm, entry_points, data, state: State::default(), policy_hash: policy.hash_hex() });
        }
        let mut rego = parsed_framework(budget)?;
        Self::add_policy(&mut rego, policy)?;
        // Evaluating the data rules analyses the modules; compiling for the
        // VM reuses that analysis, so the data document (which makes
        // regorus analyse everything again) goes into the interpreter last.
        // The VM gets it directly; the interpreter analyses again only if
        // it is ever asked (a point the policy does not bind).
        let data = policy_data(&mut rego)?;
        let (vm, entry_points) = compile_vm(&mut rego, data.clone(), budget, &bound)?;
        rego.add_data(data.clone()).map_err(|err| PolicyError::Rego(err.to_string()))?;
        Ok(Self { rego, vm, entry_points, data, state: State::default(), policy_hash: policy.hash_hex() })
    }

    /// The backend that decides `point`: the VM only for a point the policy
    /// binds to the framework (and only when the VM was asked for).
    pub fn backend(&self, point: Point) -> Backend {
        let rule = format!("data.policy.{}", point.rule());
        if self.vm.is_some() && self.entry_points.contains(&rule) { Backend::Vm } else { Backend::Interpreter }
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

    /// Set how many VM instructions one decision may execute (the
    /// deterministic budget; [`DEFAULT_INSTRUCTIONS`] unless set).
    pub fn set_instruction_limit(&mut self, limit: usize) {
        if let Some(vm) = &mut self.vm {
            vm.machine.set_max_instructions(limit);
        }
    }

    /// Decide one typed input ([`input::Input`]) at its point.
    pub fn decide_input(&mut self, input: &input::Input) -> Decision {
        self.decide(input.point(), &input.to_value())
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
        let rule = format!("data.policy.{}", point.rule());
        let on_vm = self.entry_points.contains(&rule);
        let result = match &mut self.vm {
            Some(vm) if on_vm => {
                vm.machine.set_input(input);
                let entry = vm.entry.rule(point);
                let result = vm.machine.execute_entry_point_by_name(&entry).map_err(|err| err.to_string());
                // Drop the input's share of the state, so the next commit
                // changes it in place instead of copying it.
                vm.machine.set_input(regorus::Value::Null);
                // And the rule values and registers the VM keeps until its
                // next run: they share the state's maps too, and would make
                // every commit copy them (a cost growing with every
                // container ever started).
                vm.machine.load_program(vm.program.clone());
                result
            }
            _ => {
                self.rego.set_input(input);
                let result = self.rego.eval_rule(rule).map_err(|err| err.to_string());
                self.rego.set_input(regorus::Value::Null);
                result
            }
        };
        let result = match result {
            Ok(regorus::Value::Undefined) if on_vm => {
                // The rule is declared (an entry point) but has no value: a
                // condition failed or a builtin failed on this input.
                let reason = format!("the policy's {point} rule is undefined for this input (deny by default)");
                return Decision::deny(point, reason);
            }
            Ok(result) => result,
            Err(err) => return Decision::deny(point, rule_error(point, &err)),
        };
        Decision::from_rule_result(point, &result)
    }

    /// Check a fragment's signature and decide `load_fragment` on its
    /// issuer, feed and SVN. The fragment comes back only when allowed; its
    /// containers count once [`Engine::commit_fragment`] took it.
    pub fn load_fragment(&mut self, signed: &SignedFragment) -> (Decision, Option<Fragment>) {
        let fragment = match signed.verify() {
            Ok(fragment) => fragment,
            Err(err) => return (Decision::deny(Point::LoadFragment, err.to_string()), None),
        };
        let decision = self.decide(Point::LoadFragment, &fragment.input());
        let fragment = decision.allowed.then_some(fragment);
        (decision, fragment)
    }

    /// Commit an allowed `load_fragment` decision and add the fragment's
    /// containers to the policy's data, after the base policy's.
    pub fn commit_fragment(&mut self, decision: &Decision, fragment: Fragment) -> Result<(), PolicyError> {
        if !decision.allowed {
            return Ok(());
        }
        let error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("adding the fragment: {err}"));
        let mut data = self.data.clone();
        let root = data.as_object_mut().map_err(|err| error(&err))?;
        let fields = root
            .get_mut(&regorus::Value::from(POLICY_DATA))
            .and_then(|fields| fields.as_object_mut().ok())
            .ok_or_else(|| error(&"no policy data"))?;
        let mut containers: Vec<regorus::Value> = match fields.get(&regorus::Value::from("containers")) {
            Some(value) => value.as_array().map(|list| list.iter().cloned().collect()).unwrap_or_default(),
            None => Vec::new(),
        };
        for container in &fragment.containers {
            containers.push(state::to_rego(container).map_err(|err| error(&err))?);
        }
        fields.insert(regorus::Value::from("containers"), regorus::Value::from(containers));
        index_containers(fields)?;
        // All or nothing: the new data goes to both backends, then the state
        // records the feed; any failure puts the old data back.
        let result = self.set_data(&data).and_then(|()| self.commit(decision).map_err(|err| error(&err)));
        match result {
            Ok(()) => {
                self.data = data;
                Ok(())
            }
            Err(err) => {
                let old = self.data.clone();
                self.set_data(&old)?;
                Err(err)
            }
        }
    }

    /// Hand a data document to the interpreter and, if any, the VM.
    fn set_data(&mut self, data: &regorus::Value) -> Result<(), PolicyError> {
        let error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("setting the policy data: {err}"));
        if let Some(vm) = &mut self.vm {
            vm.machine.set_data(data.clone()).map_err(|err| error(&err))?;
        }
        self.rego.clear_data();
        self.rego.add_data(data.clone()).map_err(|err| error(&err))
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
    "allow_runtime_logging",
    "allow_unencrypted_scratch",
    "allow_scratch_swap",
    "allow_capability_dropping",
    "start_order",
    "required_containers",
    "fragments",
    "sandbox",
    "network",
    "copy_files",
    "brokers",
];

/// The data document the framework reads the policy's data from.
const POLICY_DATA: &str = "parma_policy_data";

/// Compile the policy and the framework for regorus's register VM, with one
/// entry point per enforcement point in `bound` (those the policy binds to
/// the framework).
fn compile_vm(
    rego: &mut regorus::Engine,
    data: regorus::Value,
    budget: Duration,
    bound: &[Point],
) -> Result<(Option<Vm>, Vec<String>), PolicyError> {
    let vm_error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("register VM: {err}"));
    let entry_points: Vec<String> = bound
        .iter()
        .filter(|point| rego.has_declared_rule_rooted_at("policy.rego", point.rule()).unwrap_or(false))
        .map(|point| format!("data.policy.{}", point.rule()))
        .collect();
    let Some(first) = entry_points.first() else {
        return Ok((None, entry_points));
    };
    let compiled = rego.compile_with_entrypoint(&first.as_str().into()).map_err(|err| vm_error(&err))?;
    let names: Vec<&str> = entry_points.iter().map(String::as_str).collect();
    let program = regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &names)
        .map_err(|err| vm_error(&err))?;
    Ok((Some(vm_of(program, data, budget, Entry::Policy)?), entry_points))
}

/// A register VM running `program` on `data`, configured for decisions.
fn vm_of(
    program: Arc<regorus::rvm::Program>,
    data: regorus::Value,
    budget: Duration,
    entry: Entry,
) -> Result<Vm, PolicyError> {
    let mut vm = regorus::rvm::RegoVM::new();
    vm.load_program(program.clone());
    vm.set_data(data).map_err(|err| PolicyError::Rego(format!("register VM: {err}")))?;
    // The instruction budget decides (deterministic); the wall clock below
    // is only a backstop.
    vm.set_max_instructions(DEFAULT_INSTRUCTIONS);
    // As in the interpreter: a builtin that fails is an error (a denial with
    // the reason), not a silently undefined expression.
    vm.set_strict_builtin_errors(true);
    vm.set_execution_timer_config(Some(ExecutionTimerConfig {
        limit: budget,
        check_interval: NonZeroU32::MIN.saturating_add(63),
    }));
    Ok(Vm { machine: vm, program, entry })
}

/// Evaluate the policy's data rules once, for the framework's data document
/// `parma_policy_data`; returns the whole data document (not yet added).
fn policy_data(rego: &mut regorus::Engine) -> Result<regorus::Value, PolicyError> {
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
    index_containers(fields)?;
    let paths = |list: &[&str]| regorus::Value::from(list.iter().map(|p| regorus::Value::from(*p)).collect::<Vec<_>>());
    fields.insert(regorus::Value::from("default_masked_paths"), paths(DEFAULT_MASKED_PATHS));
    fields.insert(regorus::Value::from("default_readonly_paths"), paths(DEFAULT_READONLY_PATHS));
    let mut root = regorus::Value::new_object();
    root.as_object_mut()
        .map_err(|err| PolicyError::Rego(err.to_string()))?
        .insert(regorus::Value::from(POLICY_DATA), data);
    Ok(root)
}

/// What the framework looks up instead of scanning every container on every
/// decision, built once from the policy's `containers`:
/// - `layer_hashes`: every layer root hash, as `{hash: true}`;
/// - `containers_by_name`: each container by its name, which must be a
///   string and unique (a policy or fragment repeating one is refused);
/// - `containers_by_layers`: container names by the JSON of their layer list;
/// - each re2 env rule gets `anchored`, its pattern as `^(?:PATTERN)$`.
fn index_containers(fields: &mut regorus::value::Object) -> Result<(), PolicyError> {
    let error = |err: &dyn std::fmt::Display| PolicyError::Rego(format!("indexing the policy's containers: {err}"));
    let mut hashes = regorus::Value::new_object();
    let mut by_name = regorus::Value::new_object();
    let mut by_layers = regorus::Value::new_object();
    let containers = match fields.get(&regorus::Value::from("containers")).map(regorus::Value::as_array) {
        Some(Ok(containers)) => containers.iter().cloned().collect(),
        _ => Vec::new(),
    };
    let mut indexed = Vec::with_capacity(containers.len());
    for (position, mut container) in containers.into_iter().enumerate() {
        let layers = container["layers"].clone();
        if let Ok(list) = layers.as_array() {
            let hash_index = hashes.as_object_mut().map_err(|err| error(&err))?;
            for layer in list.iter().filter(|layer| layer.as_string().is_ok()) {
                hash_index.insert(layer.clone(), regorus::Value::from(true));
            }
            let key = regorus::Value::from(serde_json::to_string(&layers).map_err(|err| error(&err))?);
            let names = by_layers.as_object_mut().map_err(|err| error(&err))?;
            if !names.contains_key(&key) {
                names.insert(key.clone(), regorus::Value::from(Vec::<regorus::Value>::new()));
            }
            if let Some(entry) = names.get_mut(&key) {
                entry.as_array_mut().map_err(|err| error(&err))?.push(container["name"].clone());
            }
        }
        index_env(&mut container)?;
        index_mounts_and_capabilities(&mut container)?;
        let name = container["name"].clone();
        let Ok(text) = name.as_string() else { return Err(PolicyError::UnnamedContainer(position)) };
        let names = by_name.as_object_mut().map_err(|err| error(&err))?;
        if names.contains_key(&name) {
            return Err(PolicyError::DuplicateContainer(format!("{:?}", text.as_ref())));
        }
        names.insert(name, container.clone());
        indexed.push(container);
    }
    if fields.contains_key(&regorus::Value::from("containers")) {
        fields.insert(regorus::Value::from("containers"), regorus::Value::from(indexed));
    }
    let key = regorus::Value::from("external_processes");
    if let Some(Ok(processes)) = fields.get(&key).map(regorus::Value::as_array) {
        let mut processes: Vec<regorus::Value> = processes.iter().cloned().collect();
        for process in &mut processes {
            index_env(process)?;
        }
        fields.insert(key, regorus::Value::from(processes));
    }
    fields.insert(regorus::Value::from("layer_hashes"), hashes);
    fields.insert(regorus::Value::from("containers_by_name"), by_name);
    fields.insert(regorus::Value::from("containers_by_layers"), by_layers);
    Ok(())
}

/// Index a container's (or external process's) env rules for the framework's
/// fast path, which needs no function call per variable:
/// - `env_strings`: `{pattern: true}` of the exact-string rules;
/// - `env_patterns`: the re2 rules as `^(?:PATTERN)$` (each re2 rule also
///   gets it as `anchored`), so a pattern matches a whole variable, never a
///   part of it;
/// - `env_required_strings`, `env_required_patterns`: the same for the rules
///   marked `required` (any value but `false`, as Rego reads it);
/// - `env_required_other`: how many required rules can never match (another
///   strategy, or a pattern that is not a string).
///
/// Rules of any other strategy match nothing, as in the failure lists. A
/// process whose `env_rules` is not a list of objects gets no index (and
/// loses any index fields the policy wrote itself), so the fast path allows
/// none of its requests, as the failure lists, which fail on it, deny them.
fn index_env(process: &mut regorus::Value) -> Result<(), PolicyError> {
    const FIELDS: [&str; 5] =
        ["env_strings", "env_patterns", "env_required_strings", "env_required_patterns", "env_required_other"];
    if let Ok(object) = process.as_object_mut() {
        for field in FIELDS {
            object.remove(&regorus::Value::from(field));
        }
    }
    let no_rules = regorus::Value::from(Vec::<regorus::Value>::new());
    let rules = match &process["env_rules"] {
        regorus::Value::Undefined => &no_rules,
        rules => rules,
    };
    let Ok(rules) = rules.as_array() else { return Ok(()) };
    if rules.iter().any(|rule| rule.as_object().is_err()) {
        return Ok(());
    }
    let owner = || match process["name"].as_string() {
        Ok(name) => format!("the env rule of container {:?}", name.as_ref()),
        Err(_) => "an env rule".to_string(),
    };
    for rule in rules.iter() {
        if let (Ok(pattern), Ok(strategy)) = (rule["pattern"].as_string(), rule["strategy"].as_string())
            && strategy.as_ref() == "re2"
        {
            check_pattern(owner, pattern)?;
        }
    }
    let mut strings = std::collections::BTreeMap::new();
    let (mut patterns, mut required_strings, mut required_patterns) = (Vec::new(), Vec::new(), Vec::new());
    let mut required_other = 0u64;
    let string = regorus::Value::from("string");
    let re2 = regorus::Value::from("re2");
    let anchored: Vec<regorus::Value> = rules
        .iter()
        .map(|rule| {
            let mut rule = rule.clone();
            let required = !matches!(rule["required"], regorus::Value::Undefined | regorus::Value::Bool(false));
            match (rule["pattern"].as_string().cloned(), &rule["strategy"]) {
                (Ok(pattern), strategy) if *strategy == string => {
                    let pattern = regorus::Value::from(pattern.as_ref());
                    strings.insert(pattern.clone(), regorus::Value::from(true));
                    if required {
                        required_strings.push(pattern);
                    }
                }
                (Ok(pattern), strategy) if *strategy == re2 => {
                    let whole = regorus::Value::from(format!("^(?:{pattern})$"));
                    if let Ok(object) = rule.as_object_mut() {
                        object.insert(regorus::Value::from("anchored"), whole.clone());
                    }
                    if required {
                        required_patterns.push(whole.clone());
                    }
                    patterns.push(whole);
                }
                _ => required_other += u64::from(required),
            }
            rule
        })
        .collect();
    if let Ok(object) = process.as_object_mut() {
        let fields = [
            ("env_rules", regorus::Value::from(anchored)),
            ("env_strings", regorus::Value::from(strings)),
            ("env_patterns", regorus::Value::from(patterns)),
            ("env_required_strings", regorus::Value::from(required_strings)),
            ("env_required_patterns", regorus::Value::from(required_patterns)),
            ("env_required_other", regorus::Value::from(required_other)),
        ];
        for (name, value) in fields {
            object.insert(regorus::Value::from(name), value);
        }
    }
    Ok(())
}

/// Index a container's mount rules and capabilities for the framework:
/// each mount rule gets `anchored_source` (`^(?:SOURCE)$`) and
/// `options_sorted`; `capabilities_sorted` holds each of the five sets
/// sorted (a missing set is empty; a set that is not a list is left out,
/// and `capabilities` that is not an object gives no index, so no request
/// passes them). Index fields the policy wrote itself are replaced.
fn index_mounts_and_capabilities(container: &mut regorus::Value) -> Result<(), PolicyError> {
    if let Ok(object) = container.as_object_mut() {
        object.remove(&regorus::Value::from("capabilities_sorted"));
    }
    if let Ok(rules) = container["mounts"].as_array() {
        for rule in rules.iter() {
            if let Ok(source) = rule["source"].as_string() {
                let name = container["name"].as_string().map(|n| n.to_string()).unwrap_or_default();
                check_pattern(|| format!("the mount source of container {name:?}"), source)?;
            }
        }
        let rules: Vec<regorus::Value> = rules
            .iter()
            .map(|rule| {
                let mut rule = rule.clone();
                if let Ok(object) = rule.as_object_mut() {
                    object.remove(&regorus::Value::from("anchored_source"));
                    object.remove(&regorus::Value::from("options_sorted"));
                }
                let source = rule["source"].as_string().map(|source| format!("^(?:{source})$"));
                let options = rule["options"].as_array().map(|options| {
                    let mut sorted = options.to_vec();
                    sorted.sort();
                    sorted
                });
                if let Ok(object) = rule.as_object_mut() {
                    if let Ok(source) = source {
                        object.insert(regorus::Value::from("anchored_source"), regorus::Value::from(source));
                    }
                    if let Ok(options) = options {
                        object.insert(regorus::Value::from("options_sorted"), regorus::Value::from(options));
                    }
                }
                rule
            })
            .collect();
        if let Ok(object) = container.as_object_mut() {
            object.insert(regorus::Value::from("mounts"), regorus::Value::from(rules));
        }
    }
    if !matches!(container["capabilities"], regorus::Value::Undefined | regorus::Value::Object(_)) {
        return Ok(());
    }
    let mut sorted = std::collections::BTreeMap::new();
    for set in ["bounding", "effective", "inheritable", "permitted", "ambient"] {
        match &container["capabilities"][set] {
            regorus::Value::Undefined => {
                sorted.insert(regorus::Value::from(set), regorus::Value::from(Vec::<regorus::Value>::new()));
            }
            value => {
                if let Ok(list) = value.as_array() {
                    let mut list = list.to_vec();
                    list.sort();
                    sorted.insert(regorus::Value::from(set), regorus::Value::from(list));
                }
            }
        }
    }
    if let Ok(object) = container.as_object_mut() {
        object.insert(regorus::Value::from("capabilities_sorted"), regorus::Value::from(sorted));
    }
    Ok(())
}

/// Whether the policy binds `point` to the framework and does nothing else
/// with its name: one statement `POINT := data.framework.POINT` on a line of
/// its own (nothing continues it: no body, no `else`, no `with`), and the
/// name nowhere else outside comments and strings (so no other rule,
/// default or reference can change what the point decides). Only such
/// points run on the register VM: there it executes the framework's code
/// alone, which the differential test holds to the interpreter. A false
/// negative only costs speed.
pub fn bound_to_framework(text: &str, point: Point) -> bool {
    bound_in(&tokens(text).collect::<Vec<_>>(), point)
}

/// The points of [`Point::ALL`] the policy binds to the framework
/// ([`bound_to_framework`]), tokenizing the text once.
pub fn bound_points(text: &str) -> Vec<Point> {
    let tokens: Vec<Token<'_>> = tokens(text).collect();
    Point::ALL.into_iter().filter(|point| bound_in(&tokens, *point)).collect()
}

fn bound_in(tokens: &[Token<'_>], point: Point) -> bool {
    let name = point.rule();
    let binding = [
        Token::Ident(name),
        Token::Punct(":="),
        Token::Ident("data"),
        Token::Punct("."),
        Token::Ident("framework"),
        Token::Punct("."),
        Token::Ident(name),
    ];
    let bindings = (0..tokens.len())
        .filter(|&at| tokens.get(at..at + binding.len()) == Some(&binding[..]))
        .filter(|&at| {
            let starts_line = at == 0 || tokens.get(at - 1) == Some(&Token::Newline);
            let next = tokens.get(at + binding.len());
            let ends_line = matches!(next, None | Some(Token::Newline));
            let continued = tokens.iter().skip(at + binding.len()).find(|t| **t != Token::Newline).is_some_and(
                |t| !matches!(t, Token::Ident(word) if !["if", "else", "with", "as", "contains", "in"].contains(word)),
            );
            starts_line && ends_line && !continued
        })
        .count();
    let mentions = tokens.iter().filter(|t| **t == Token::Ident(name)).count();
    bindings == 1 && mentions == 2
}

/// A token of Rego text, outside comments and string literals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// A name or keyword.
    Ident(&'a str),
    /// Punctuation (`:=` as one), a number's characters, or a string
    /// literal (as `"`).
    Punct(&'a str),
    /// The end of a line.
    Newline,
}

/// The tokens of Rego text; comments are skipped, string literals (raw or
/// not) become one `"` token each.
fn tokens(text: &str) -> impl Iterator<Item = Token<'_>> {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while let Some(&byte) = bytes.get(i) {
            match byte {
                b'#' => {
                    while bytes.get(i).is_some_and(|b| *b != b'\n') {
                        i += 1;
                    }
                }
                b'\n' => {
                    i += 1;
                    return Some(Token::Newline);
                }
                b'"' => {
                    i += 1;
                    while let Some(&b) = bytes.get(i) {
                        i += if b == b'\\' { 2 } else { 1 };
                        if b == b'"' {
                            break;
                        }
                    }
                    return Some(Token::Punct("\""));
                }
                b'`' => {
                    i += 1;
                    while bytes.get(i).is_some_and(|b| *b != b'`') {
                        i += 1;
                    }
                    i += 1;
                    return Some(Token::Punct("\""));
                }
                b if b.is_ascii_alphabetic() || b == b'_' => {
                    let start = i;
                    while bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
                        i += 1;
                    }
                    return text.get(start..i).map(Token::Ident);
                }
                b if b.is_ascii_whitespace() => i += 1,
                b':' if bytes.get(i + 1) == Some(&b'=') => {
                    i += 2;
                    return Some(Token::Punct(":="));
                }
                _ => {
                    let start = i;
                    i += 1;
                    while !text.is_char_boundary(i) {
                        i += 1;
                    }
                    return text.get(start..i).map(Token::Punct);
                }
            }
        }
        None
    })
}

/// The identifiers of Rego text, outside comments and string literals.
fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    tokens(text).filter_map(|token| match token {
        Token::Ident(name) => Some(name),
        _ => None,
    })
}

/// Whether the Rego text uses the keyword `every` (outside comments and
/// string literals).
///
/// regorus 0.14.1's register VM evaluates `every x in xs { m[x] == 1 }` to
/// true when one element fails (a lookup by the loop variable in the body),
/// and loops until the time budget on a comprehension in the body; its
/// interpreter gets both right. The framework, the only code the VM runs,
/// uses no `every` (a test checks it).
pub fn uses_every(text: &str) -> bool {
    identifiers(text).any(|ident| ident == "every")
}

/// The reason for a rule that failed to evaluate: the error on one line.
fn rule_error(point: Point, error: &str) -> String {
    if error.contains("not a valid rule path") {
        return format!("the policy does not define {point} (deny by default)");
    }
    let flat: Vec<&str> = error.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("policy error: {}", flat.join(" "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_bytes(text.as_bytes().to_vec()).unwrap()
    }

    /// The points of `engine`'s VM and which program runs them.
    fn on_vm(engine: &Engine) -> Option<Entry> {
        engine.vm.as_ref().map(|vm| vm.entry)
    }

    const BOUND: &str = "package policy\nimport rego.v1\n\ncontainers := [{\"name\": \"c\", \"layers\": [\"aa\"]}]\n\
        mount_device := data.framework.mount_device\nexec_external := {\"allowed\": input.argList == [\"/bin/ok\"]}\n";

    #[test]
    fn a_host_reads_the_secrets_the_policy_lists_for_a_container() {
        let text = |secrets: &str, brokers: &str| {
            policy(&format!(
                "package policy\nimport rego.v1\n\ncontainers := [\n  {{\"name\": \"web\", \"layers\": [\"aa\"], \"secrets\": {secrets}}},\n  \
                 {{\"name\": \"plain\", \"layers\": [\"aa\"]}},\n]\n{brokers}\n"
            ))
        };
        let brokers =
            "brokers := [{\"name\": \"kbs\", \"url\": \"https://kbs.example:8080\", \"certificate_sha256\": \"ab\"}]";
        let one = "[{\"broker\": \"kbs\", \"resource\": \"default/db/password\", \"file\": \"db\"}]";
        let listed = listed_secrets(&text(one, brokers), "web").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].secret.resource, "default/db/password");
        assert_eq!(listed[0].secret.file, "db");
        assert_eq!(listed[0].broker.url, "https://kbs.example:8080");
        assert_eq!(listed[0].broker.certificate_sha256, "ab");
        // A container without secrets, and a name no container has: none.
        assert!(listed_secrets(&text(one, brokers), "plain").unwrap().is_empty());
        assert!(listed_secrets(&text(one, brokers), "nobody").unwrap().is_empty());
        // A broker the policy does not list, and a malformed rule: an error, not nothing.
        let err = listed_secrets(&text(one, "brokers := []"), "web").unwrap_err().to_string();
        assert!(err.contains("broker \"kbs\" is not among the policy's brokers"), "{err}");
        let err = listed_secrets(&text("[{\"broker\": \"kbs\"}]", brokers), "web").unwrap_err().to_string();
        assert!(err.contains("the secrets of container web: not a list of secret rules"), "{err}");
        // Computed data is evaluated, as in the guest.
        let computed = text(
            "[{\"broker\": \"kbs\", \"resource\": concat(\"/\", [\"a\", \"b\", \"c\"]), \"file\": \"x\"}]",
            brokers,
        );
        assert_eq!(listed_secrets(&computed, "web").unwrap()[0].secret.resource, "a/b/c");
    }

    #[test]
    fn a_policy_is_text_without_control_characters() {
        // After a NUL regorus reads nothing: these rules would be hashed, not enforced.
        let err = Policy::from_bytes(b"package policy\n\0exec_external := true\n".to_vec()).unwrap_err();
        assert!(matches!(err, PolicyError::ControlCharacter { byte: 0, offset: 15 }), "{err}");
        for byte in [0x01u8, 0x1b, 0x7f] {
            let err = Policy::from_bytes(vec![b'#', byte, b'\n']).unwrap_err().to_string();
            assert!(err.contains(&format!("{byte:#04x} at byte 1")), "{err}");
        }
        let text = "package policy\r\n\nimport rego.v1\n\nexec_external := {\"allowed\":\ttrue}\r\n";
        let mut engine = Engine::new(&Policy::from_bytes(text.as_bytes().to_vec()).unwrap()).unwrap();
        assert!(engine.decide(Point::ExecExternal, &serde_json::json!({})).allowed);
    }

    #[test]
    fn the_framework_program_round_trips_and_is_reproducible() {
        let framework = Framework::compile().unwrap();
        let bytes = framework.to_bytes().unwrap();
        assert_eq!(bytes, Framework::compile().unwrap().to_bytes().unwrap());
        // Compiled afresh (not the process's cached program): the same bytes.
        let fresh = Framework::checked(compile_framework().unwrap(), DEFAULT_BUDGET).unwrap();
        assert_eq!(fresh.to_bytes().unwrap(), bytes);
        let read = Framework::from_bytes(&bytes).unwrap();
        assert_eq!(read.to_bytes().unwrap(), bytes);
        // A policy on the program read back decides as one on the compiled program.
        let text = policy(BOUND);
        let mut a = Engine::with_framework(read, &text).unwrap();
        let mut b = Engine::new(&text).unwrap();
        for hash in ["aa", "bb"] {
            let input = serde_json::json!({"target": "/run/l0", "deviceHash": hash});
            let (x, y) = (a.decide(Point::MountDevice, &input), b.decide(Point::MountDevice, &input));
            assert_eq!(x, y);
            assert_eq!(x.allowed, hash == "aa", "{x:?}");
        }
    }

    #[test]
    fn a_program_of_another_framework_or_format_is_refused() {
        let bytes = Framework::compile().unwrap().to_bytes().unwrap();
        let refused = |bytes: &[u8]| Framework::from_bytes(bytes).unwrap_err().to_string();
        assert!(refused(&[]).contains("the framework's program"), "{}", refused(&[]));
        assert!(refused(&bytes[..bytes.len() / 2]).contains("the framework's program"));
        // The same program with one character of the framework's source changed.
        let at = bytes.windows(16).position(|w| w == b"package framewor").unwrap();
        let mut other = bytes.clone();
        other[at + 8] = b'F';
        assert!(refused(&other).contains("another framework"), "{}", refused(&other));
        // A program compiled from the framework with one entry point only.
        let mut rego = parsed_framework(DEFAULT_BUDGET).unwrap();
        let compiled = rego.compile_with_entrypoint(&"data.framework.mount_device".into()).unwrap();
        let one = regorus::languages::rego::compiler::Compiler::compile_from_policy(
            &compiled,
            &["data.framework.mount_device"],
        )
        .unwrap();
        let err = Framework::checked(one, DEFAULT_BUDGET).unwrap_err().to_string();
        assert!(err.contains("not one per enforcement point"), "{err}");
    }

    #[test]
    fn a_self_contained_policy_runs_the_framework_program() {
        let mut engine = Engine::new(&policy(BOUND)).unwrap();
        assert_eq!(on_vm(&engine), Some(Entry::Framework));
        assert_eq!(engine.backend(Point::MountDevice), Backend::Vm);
        // A point the policy decides itself: the interpreter, on the policy alone.
        assert_eq!(engine.backend(Point::ExecExternal), Backend::Interpreter);
        let ok = engine.decide(Point::ExecExternal, &serde_json::json!({"argList": ["/bin/ok"]}));
        let no = engine.decide(Point::ExecExternal, &serde_json::json!({"argList": ["/bin/no"]}));
        assert!(ok.allowed && !no.allowed, "{ok:?} {no:?}");
        // A point it does not define: denied, saying so.
        let none = engine.decide(Point::CreateContainer, &serde_json::json!({}));
        assert!(
            !none.allowed && none.denial.as_ref().is_some_and(|d| d.message.contains("does not define")),
            "{none:?}"
        );
    }

    #[test]
    fn a_policy_reading_data_elsewhere_is_compiled_with_the_framework() {
        // A data rule that reads the framework's document, a helper through
        // an import, a variable named data: each needs the framework beside
        // the policy, so the whole is compiled as before, and decides alike.
        for (import, extra) in [
            ("", "masked := data.framework.default_masked_paths_unused\n"),
            ("import data.framework as fw\n", "x := fw.unused\n"),
            ("", "f(data) := data\n"),
        ] {
            let text = BOUND.replacen("import rego.v1\n", &format!("import rego.v1\n{import}"), 1) + extra;
            assert!(!self_contained(&text, &bound_points(&text)), "{extra}: more data than bindings");
            let mut engine = Engine::new(&policy(&text)).unwrap();
            assert_eq!(on_vm(&engine), Some(Entry::Policy), "{extra}");
            let mut interpreter = Engine::with_backend(&policy(&text), DEFAULT_BUDGET, Backend::Interpreter).unwrap();
            for hash in ["aa", "bb"] {
                let input = serde_json::json!({"target": "/run/l0", "deviceHash": hash});
                let (x, y) =
                    (engine.decide(Point::MountDevice, &input), interpreter.decide(Point::MountDevice, &input));
                assert_eq!((x.allowed, hash), (y.allowed, hash), "{extra}");
                assert_eq!(x.allowed, hash == "aa", "{extra}: {x:?}");
            }
        }
        // A line of a binding's form inside a rule's body is an assignment
        // from the framework, not a binding: with the policy alone it would
        // be undefined, and `not r` true. Compiled with the framework, it
        // decides as the interpreter does.
        let body = format!(
            "{BOUND}\nr if {{\n\tevery k in [1] {{\n\t\tcreate_container := data.framework.create_container\n\t\tk == 1\n\t}}\n}}\n\n\
             get_properties := {{\"allowed\": true}} if {{\n\tnot r\n}}\n"
        );
        assert!(bound_points(&body).contains(&Point::CreateContainer), "the line has a binding's form");
        let mut engine = Engine::new(&policy(&body)).unwrap();
        assert_eq!(on_vm(&engine), Some(Entry::Policy));
        let mut interpreter = Engine::with_backend(&policy(&body), DEFAULT_BUDGET, Backend::Interpreter).unwrap();
        let (x, y) = (
            engine.decide(Point::GetProperties, &serde_json::json!({})),
            interpreter.decide(Point::GetProperties, &serde_json::json!({})),
        );
        assert_eq!(x, y);
        assert!(!x.allowed, "r holds beside the framework: {x:?}");
        assert!(self_contained(BOUND, &bound_points(BOUND)));
        // `data` in comments and strings is not a reference.
        let quiet = format!("{BOUND}# data.framework\nnote := \"data.framework\"\n");
        assert!(self_contained(&quiet, &bound_points(&quiet)));
    }
}
