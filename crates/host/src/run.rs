//! `parma run` as a library ([`run`]), and its steps, each one agent
//! request: attach the image's verity layers as disks, mount them, stack
//! the overlay, create and start the container, pump its stdio, tear it
//! down. Tests and benchmarks use the same functions.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parma_layer::{Built, ImageConfig};
use parma_protocol::{AgentError, ErrorCode, Interface, Mount, OutputStream, ProcessSpec, Route};

use crate::client::{Client, ClientError, ProcessStatus};
use crate::policy_gen::default_capabilities;
use crate::qemu::{Accel, Disk, Serial, Snp, SnpBoot, VmConfig, VmError};
use crate::user::ResolvedUser;
use crate::vm::{StartOptions, StopReason, Vm};

/// Where `parma layer build`, `parma policy gen` and `parma run` put layer
/// images unless told otherwise: one place, so an image is converted once.
pub const DEFAULT_LAYERS_DIR: &str = "out/layers";
/// Where `parma policy gen --pod` keeps the images it pulls.
pub const DEFAULT_IMAGES_DIR: &str = "out/images";

/// `parma run`'s exit code when `parma` itself failed (as `docker run`).
pub const EXIT_FAILED: i32 = 125;
/// Its exit code when the container's command cannot be run: the policy
/// denied it, or the executable is not a program.
pub const EXIT_CANNOT_RUN: i32 = 126;
/// Its exit code when the container's executable is not in the image.
pub const EXIT_NOT_FOUND: i32 = 127;

/// What [`run`] runs, and how.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The UVM directory (`make image`'s `out/uvm`).
    pub uvm: PathBuf,
    /// The execution policy (Rego); its sha256 is HOST_DATA.
    pub policy: PathBuf,
    /// The image: an OCI layout directory or a `docker save` archive.
    pub oci: PathBuf,
    /// Which image of the layout.
    pub reference: Option<String>,
    /// Where the layer images are built (and reused).
    pub layers_dir: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// An SEV-SNP launch; `None` is the INSECURE emulation.
    pub snp: Option<SnpLaunch>,
    /// Guest memory (an IGVM launch takes the file's).
    pub memory_mib: u32,
    /// Keep the guest's serial console here (default: in the VM's directory).
    pub serial_log: Option<PathBuf>,
    /// The container's id in the guest.
    pub id: String,
    /// An encrypted scratch disk of this many MiB; 0: none.
    pub scratch_mib: u64,
    /// Mounts beyond the defaults (the policy must list them).
    pub mounts: Vec<Mount>,
    /// How long the agent may take to answer after QEMU started.
    pub boot_deadline: Duration,
    /// How long the container may run.
    pub timeout: Duration,
    /// Run the process on a terminal.
    pub tty: bool,
    /// The command, replacing the image's entrypoint and cmd.
    pub args: Vec<String>,
    /// Ports of 127.0.0.1 forwarded to the container's (`-p`): the UVM
    /// becomes a pod (named after the container's id) with a NIC on QEMU
    /// user-mode networking, configured through the policy's network points.
    pub publish: Vec<crate::PortForward>,
    /// Or a network namespace (`--netns`, a path such as
    /// `/var/run/netns/NAME`): the UVM becomes a pod whose NIC is a tap
    /// connected to the namespace's veth, with its MAC, addresses and routes.
    pub netns: Option<PathBuf>,
    /// Where the pod reaches a key broker (`--broker-address NAME=IP:PORT`),
    /// by the broker's name in the policy; a broker not named here is
    /// reached at its URL's host, resolved on this host. Only a route: TLS
    /// and the policy's pin decide who the broker is.
    pub broker_addresses: Vec<(String, SocketAddr)>,
}

impl RunOptions {
    /// Defaults for an image and a policy: TCG, 512 MiB, emulation, the
    /// default layers directory, container `c0`, 2 minutes to boot, 10 to run.
    pub fn new(uvm: impl Into<PathBuf>, policy: impl Into<PathBuf>, oci: impl Into<PathBuf>) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            uvm: uvm.into(),
            policy: policy.into(),
            oci: oci.into(),
            reference: None,
            layers_dir: PathBuf::from(DEFAULT_LAYERS_DIR),
            accel: Accel::Tcg,
            snp: None,
            memory_mib: 512,
            serial_log: None,
            id: "c0".into(),
            scratch_mib: 0,
            mounts: Vec::new(),
            boot_deadline: Duration::from_secs(120),
            timeout: Duration::from_secs(600),
            tty: false,
            args: Vec::new(),
            publish: Vec::new(),
            netns: None,
            broker_addresses: Vec::new(),
        }
    }
}

/// How an SEV-SNP launch boots.
#[derive(Debug, Clone)]
pub struct SnpLaunch {
    /// An AmdSevX64 OVMF (kernel hashes), or the UVM's IGVM file.
    pub boot: SnpBoot,
    /// The vCPU type (the launch digest depends on it).
    pub vcpu_type: String,
}

/// Set how `config` launches: inside an SEV-SNP launch with `host_data`
/// (the policy's hash) as its HOST_DATA, or, without `snp`, INSECURE
/// emulation with `host_data` on the guest's command line. An SNP launch
/// under TCG is refused (emulation has no SNP); an IGVM file fixes the
/// guest's memory. `parma run` and the containerd shim both launch through
/// this.
pub fn configure_launch(config: &mut VmConfig, snp: Option<&SnpLaunch>, host_data: [u8; 32]) -> Result<(), VmError> {
    match snp {
        Some(_) if config.accel == Accel::Tcg => Err(VmError::SnpNeedsKvm),
        Some(snp) => {
            let (boot, memory_mib) = crate::qemu::snp_boot(snp.boot.clone(), config.memory_mib)?;
            config.memory_mib = memory_mib;
            config.snp = Some(Snp { boot, host_data, vcpu_type: snp.vcpu_type.clone() });
            config.insecure_emulated_host_data = None;
            config.insecure_emulated_measurement = None;
            Ok(())
        }
        None => {
            config.snp = None;
            config.insecure_emulated_host_data = Some(host_data);
            config.insecure_emulated_measurement = igvm_digest(&config.uvm);
            Ok(())
        }
    }
}

/// The IGVM launch digest the UVM's manifest states, if it states one
/// (what an emulated launch's reports give as MEASUREMENT).
pub fn igvm_digest(uvm: &std::path::Path) -> Option<[u8; 48]> {
    let manifest = std::fs::read(uvm.join(parma_image::files::MANIFEST)).ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).ok()?;
    let digest = manifest.get("igvm")?.get("digest")?.as_str()?;
    hex::decode(digest).ok()?.try_into().ok()
}

/// The host's side of a running container's stdio.
#[allow(missing_debug_implementations)]
pub struct RunIo<'a> {
    /// What to feed to the container's stdin (`parma run -i`); `None`
    /// closes it at once.
    pub stdin: Option<Input>,
    /// Where its stdout goes.
    pub stdout: &'a mut dyn Write,
    /// Where its stderr goes.
    pub stderr: &'a mut dyn Write,
    /// The host's terminal size and signals, passed on.
    pub forward: &'a mut dyn Forward,
}

/// What the host passes on to a running process besides its stdin.
pub trait Forward {
    /// The host terminal's size, polled while the process runs: a change is
    /// sent to the process's terminal.
    fn window_size(&mut self) -> Option<(u16, u16)> {
        None
    }

    /// A signal the host received for the process (Ctrl-C on a host that
    /// is no raw terminal), taken once.
    fn take_signal(&mut self) -> Option<i32> {
        None
    }
}

/// Nothing to pass on.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoForward;

impl Forward for NoForward {}

/// Where [`run`] is; for progress lines.
#[derive(Debug)]
pub enum Step<'a> {
    /// Converting the image's layers.
    Layer(&'a parma_layer::Progress),
    /// QEMU is starting the UVM.
    Booting,
    /// The agent answered, this long after QEMU started.
    Ready(Duration),
    /// The policy is in force.
    PolicySet(&'a str),
    /// Every layer is open through dm-verity and mounted.
    LayersMounted,
    /// The container's overlay is mounted.
    OverlayMounted,
    /// The container is created.
    Created,
    /// The agent holds a secret the policy lists for the container (its
    /// file in `/dev/parma/secrets/`).
    SecretProvisioned(&'a str),
    /// The container started.
    Started(i32),
    /// The container's process ended.
    Exited(&'a ProcessStatus),
    /// The UVM stopped.
    Stopped(&'a StopReason),
}

/// How a [`run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How the container's process ended.
    pub status: ProcessStatus,
    /// The code `parma run` exits with: the process's own.
    pub exit_code: i32,
    /// The agent answered this long after QEMU started.
    pub ready_after: Duration,
    /// How the UVM stopped.
    pub stopped: StopReason,
}

/// Why [`run`] did not run the container to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options do not fit together: found before anything started, or,
    /// where only the agent's answer shows it, after the create (a secret
    /// the policy lists for the container, which the UVM has no route to).
    #[error("{0}")]
    Usage(String),
    /// The policy denied a step: nothing ran that it did not allow.
    #[error("{step}: denied by the policy: {message}")]
    Denied {
        /// What was refused.
        step: &'static str,
        /// The agent's explanation.
        message: String,
    },
    /// The container's executable is not in its image.
    #[error("{step}: the executable is not in the image: {message}")]
    NotFound {
        /// What failed.
        step: &'static str,
        /// The agent's message.
        message: String,
    },
    /// The executable is there but cannot be run.
    #[error("{step}: the executable cannot run: {message}")]
    CannotExecute {
        /// What failed.
        step: &'static str,
        /// The agent's message.
        message: String,
    },
    /// Anything else (the image, QEMU, the agent).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl RunError {
    /// The exit code, as `docker run`'s: 126 the command cannot be run
    /// (denied included), 127 it is not found, 125 any other failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Denied { .. } | RunError::CannotExecute { .. } => EXIT_CANNOT_RUN,
            RunError::NotFound { .. } => EXIT_NOT_FOUND,
            RunError::Usage(_) | RunError::Failed(_) => EXIT_FAILED,
        }
    }

    /// The error of an agent call at `step`, by its code.
    fn of(step: &'static str, err: ClientError) -> Self {
        match err {
            ClientError::Agent(AgentError { code: ErrorCode::PolicyDenied, message }) => {
                RunError::Denied { step, message }
            }
            ClientError::Agent(AgentError { code: ErrorCode::ExecutableNotFound, message }) => {
                RunError::NotFound { step, message }
            }
            ClientError::Agent(AgentError { code: ErrorCode::CannotExecute, message }) => {
                RunError::CannotExecute { step, message }
            }
            other => RunError::Failed(anyhow::Error::new(other).context(step)),
        }
    }
}

/// Boot a fresh UVM, set the policy, mount the image's verity layers,
/// create and start the container, stream its stdio, tear it all down;
/// returns how the container ended. Every check that needs no work is made
/// before any: an SNP launch under TCG is refused before a layer is built.
pub fn run(options: &RunOptions, io: RunIo<'_>, progress: &dyn Fn(Step<'_>)) -> Result<Outcome, RunError> {
    if options.snp.is_some() && options.accel == Accel::Tcg {
        return Err(RunError::Usage("an SEV-SNP launch needs --accel kvm on an SNP host (TCG has no SEV-SNP)".into()));
    }
    if options.id.is_empty() {
        return Err(RunError::Usage("the container id is empty".into()));
    }
    let policy = std::fs::read_to_string(&options.policy)
        .with_context(|| format!("cannot read the policy {}", options.policy.display()))?;
    let parsed = parma_policy::Policy::from_bytes(policy.into_bytes())
        .with_context(|| format!("{} is not a policy", options.policy.display()))?;
    let host_data = parsed.hash();
    if !options.broker_addresses.is_empty() {
        let brokers = parma_policy::listed_brokers(&parsed).map_err(anyhow::Error::from)?;
        secret_routes(options).check(&brokers).map_err(|err| RunError::Usage(format!("--broker-address: {err}")))?;
    }
    let mut config = VmConfig::new(&options.uvm, "unused");
    config.qemu = options.qemu.clone();
    config.accel = options.accel;
    config.memory_mib = options.memory_mib;
    configure_launch(&mut config, options.snp.as_ref(), host_data).map_err(anyhow::Error::from)?;
    // The UVM's files are checked before the image is converted.
    config.args().map_err(anyhow::Error::from)?;
    // Layers an earlier run (or policy gen) converted are reused: the guest
    // checks each against the policy's root hash, so a wrong one is refused.
    let built = parma_layer::build_reusing(&options.oci, options.reference.as_deref(), &options.layers_dir, &|event| {
        progress(Step::Layer(&event));
    })
    .with_context(|| format!("cannot build the layers of {}", options.oci.display()))?;
    let user = crate::user::image_user(&options.oci, options.reference.as_deref(), &built.config.user)?;
    let mut process = process_for_user(&built.config, &options.args, &user)?;
    process.terminal = options.tty;
    config.disks = layer_disks(&built, &options.layers_dir);
    let scratch = if options.scratch_mib > 0 {
        let file =
            tempfile::Builder::new().prefix("parma-scratch-").tempfile().context("cannot make the scratch disk")?;
        file.as_file().set_len(options.scratch_mib << 20).context("cannot size the scratch disk")?;
        config.disks.push(Disk { path: file.path().to_path_buf(), serial: SCRATCH_SERIAL.into(), writable: true });
        Some(file)
    } else {
        None
    };
    if let Some(path) = &options.serial_log {
        config.serial = Serial::File(path.clone());
    }
    // The tap (and the namespace's tc redirects) live as long as `attached`.
    let attached = match &options.netns {
        Some(_) if !options.publish.is_empty() => {
            return Err(
                anyhow::anyhow!("-p and --netns exclude each other: a namespace's network reaches the pod").into()
            );
        }
        Some(path) => Some(
            crate::netns::attach(path).with_context(|| format!("cannot attach to the network {}", path.display()))?,
        ),
        None => None,
    };
    let network = match &attached {
        Some(attached) => {
            config.nic = Some(crate::Nic { mac: attached.mac, forwards: Vec::new(), tap: Some(attached.tap.clone()) });
            Some((attached.interface.clone(), attached.routes.clone()))
        }
        None if !options.publish.is_empty() => {
            config.nic = Some(crate::Nic::user(options.publish.clone()));
            Some(user_network())
        }
        None => None,
    };
    progress(Step::Booting);
    let mut vm = Vm::start(config, &StartOptions::default()).map_err(anyhow::Error::from)?;
    let result = drive(&mut vm, options, &parsed, &built, &process, scratch.is_some(), network.as_ref(), io, progress);
    let (status, ready_after) = match result {
        Ok(done) => done,
        Err(err) => {
            vm.kill();
            return Err(match err {
                RunError::Failed(err) => RunError::Failed(err.context(format!("guest console:\n{}", vm.serial()))),
                other => other,
            });
        }
    };
    progress(Step::Exited(&status));
    // The agent powers the UVM off after answering Shutdown.
    let stopped = vm.stop(Duration::from_secs(30));
    progress(Step::Stopped(&stopped));
    drop(scratch);
    Ok(Outcome { exit_code: exit_code(&status), status, ready_after, stopped })
}

/// Ask the agent for each secret the policy lists for the container's
/// entry `entry`, over the pod's network (`parma run` gives the UVM no
/// vsock to relay through). Each is decided in the guest on its own.
fn provision_secrets(
    client: &mut Client,
    options: &RunOptions,
    policy: &parma_policy::Policy,
    id: &str,
    entry: &str,
    progress: &dyn Fn(Step<'_>),
) -> Result<(), RunError> {
    use crate::secrets::SecretError;
    match crate::secrets::provision(client, policy, id, entry, &secret_routes(options), &|listed| {
        progress(Step::SecretProvisioned(&listed.secret.file));
    }) {
        Ok(_) => Ok(()),
        Err(err @ SecretError::NoNetwork { .. }) => Err(RunError::Usage(format!(
            "{err}: give --netns (and --broker-address NAME=IP:PORT where this host cannot resolve the broker)"
        ))),
        Err(SecretError::Unresolved { broker, host }) => Err(RunError::Usage(format!(
            "broker {broker:?}: {host} does not resolve on this host: give --broker-address {broker}=IP:PORT"
        ))),
        Err(SecretError::Agent { source, .. }) => {
            Err(RunError::of("cannot provision a secret the policy lists", source))
        }
        Err(err) => Err(anyhow::Error::from(err).into()),
    }
}

/// Where the UVM reaches key brokers in this run.
fn secret_routes(options: &RunOptions) -> crate::secrets::Routes {
    crate::secrets::Routes { networked: options.netns.is_some(), addresses: options.broker_addresses.clone() }
}

/// [`run`] once QEMU runs: everything through the agent.
#[allow(clippy::too_many_arguments)]
fn drive(
    vm: &mut Vm,
    options: &RunOptions,
    policy: &parma_policy::Policy,
    built: &Built,
    process: &ProcessSpec,
    scratch: bool,
    network: Option<&(Interface, Vec<Route>)>,
    io: RunIo<'_>,
    progress: &dyn Fn(Step<'_>),
) -> Result<(ProcessStatus, Duration), RunError> {
    let id = options.id.as_str();
    let mut client = vm.ready_client(options.boot_deadline, Duration::from_secs(60)).map_err(anyhow::Error::from)?;
    let ready_after = vm.elapsed();
    progress(Step::Ready(ready_after));
    let sha256 = client
        .set_policy(policy.text().to_string())
        .map_err(|err| RunError::of("the agent refused the policy", err))?;
    progress(Step::PolicySet(&sha256));
    if let Some((interface, routes)) = network {
        pod_network(&mut client, id, interface, routes)
            .map_err(|err| RunError::of("cannot set up the pod's network", err))?;
    }
    if scratch {
        client.mount_scratch(SCRATCH_SERIAL).map_err(|err| RunError::of("cannot set up the encrypted scratch", err))?;
    }
    for (index, layer) in built.layers.layers.iter().enumerate() {
        client
            .mount_layer(&layer_name(index), &layer_serial(index), &layer.root_hash, layer.hash_offset)
            .map_err(|err| RunError::of("cannot mount a layer", err))?;
    }
    progress(Step::LayersMounted);
    let names: Vec<String> = (0..built.layers.layers.len()).map(layer_name).collect();
    client.mount_overlay(id, &names, true).map_err(|err| RunError::of("cannot mount the container's overlay", err))?;
    progress(Step::OverlayMounted);
    let entry = client
        .create_container_with(id, process, None, &options.mounts)
        .map_err(|err| RunError::of("cannot create the container", err))?;
    progress(Step::Created);
    if let Some(entry) = entry {
        provision_secrets(&mut client, options, policy, id, &entry, progress)?;
    }
    let pid = client.start_container(id).map_err(|err| RunError::of("cannot start the container", err))?;
    progress(Step::Started(pid));
    let RunIo { stdin, stdout, stderr, forward } = io;
    let mut stdin = match stdin {
        Some(input) => Some(input),
        None => {
            client.write_stdin(id, None, &[], true).map_err(|err| RunError::of("cannot close stdin", err))?;
            None
        }
    };
    let status = pump_with(&mut client, id, None, stdin.as_mut(), stdout, stderr, forward, options.timeout)?;
    client.delete_container(id).map_err(|err| RunError::of("cannot delete the container", err))?;
    unmount_image(&mut client, built, id)?;
    client.shutdown().map_err(|err| RunError::of("cannot shut the UVM down", err))?;
    Ok((status, ready_after))
}

/// The NIC's configuration on QEMU user-mode networking: `eth0` at
/// [`crate::qemu::USER_NET_GUEST`], routed through the gateway.
pub fn user_network() -> (Interface, Vec<Route>) {
    let interface = Interface {
        name: "eth0".into(),
        hw_addr: crate::Nic::user(Vec::new()).mac_string(),
        mtu: 1500,
        addresses: vec![crate::qemu::USER_NET_GUEST.into()],
        raw_flags: 0,
    };
    let routes = vec![Route {
        dest: "default".into(),
        gateway: Some(crate::qemu::USER_NET_GATEWAY.into()),
        device: "eth0".into(),
        source: None,
        scope: 0,
    }];
    (interface, routes)
}

/// Make the UVM a pod named `hostname` whose NIC is `interface`, with
/// `routes`: each step decided by the policy.
pub fn pod_network(
    client: &mut Client,
    hostname: &str,
    interface: &Interface,
    routes: &[Route],
) -> Result<(), crate::ClientError> {
    client.create_sandbox(hostname, false)?;
    client.update_interface(interface)?;
    if routes.is_empty() { Ok(()) } else { client.update_routes(routes) }
}

/// The guest's name for layer `index` (base layer 0).
pub fn layer_name(index: usize) -> String {
    format!("l{index}")
}

pub use parma_protocol::boot::{SCRATCH_SERIAL, layer_serial};

/// The read-only disks of an image's layers, base first.
pub fn layer_disks(built: &Built, layers_dir: &Path) -> Vec<Disk> {
    layer_disks_of(&built.layers, layers_dir)
}

/// The read-only disks of the layers a `layers.json` in `layers_dir` lists
/// ([`parma_layer::LayersFile::read`]), base first.
pub fn layer_disks_of(layers: &parma_layer::LayersFile, layers_dir: &Path) -> Vec<Disk> {
    layers
        .layers
        .iter()
        .enumerate()
        .map(|(index, layer)| Disk { path: layers_dir.join(&layer.file), serial: layer_serial(index), writable: false })
        .collect()
}

/// A `--mount` argument: `TYPE:SOURCE:DESTINATION[:OPTION,...]`.
pub fn parse_mount(text: &str) -> Result<parma_protocol::Mount, String> {
    let mut parts = text.splitn(4, ':');
    let (Some(kind), Some(source), Some(destination)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{text:?} is not TYPE:SOURCE:DESTINATION[:OPTION,...]"));
    };
    if kind.is_empty() || source.is_empty() || destination.is_empty() {
        return Err(format!("{text:?} is not TYPE:SOURCE:DESTINATION[:OPTION,...]"));
    }
    let options =
        parts.next().map_or_else(Vec::new, |o| o.split(',').filter(|o| !o.is_empty()).map(str::to_string).collect());
    Ok(parma_protocol::Mount { destination: destination.into(), kind: kind.into(), source: source.into(), options })
}

/// The container's init process as the image config says (what `parma
/// policy gen` allows by default), with `args` replacing entrypoint + cmd
/// when given. The image's `User` must be numeric here; [`process_for_user`]
/// takes one resolved from the image's files.
pub fn process_from_config(config: &ImageConfig, args: &[String]) -> anyhow::Result<ProcessSpec> {
    let user = crate::user::resolve(&config.user, "", "")
        .with_context(|| format!("user {:?}: a name needs the image's files (parma run reads them)", config.user))?;
    process_for_user(config, args, &user)
}

/// [`process_from_config`] as `user`.
pub fn process_for_user(config: &ImageConfig, args: &[String], user: &ResolvedUser) -> anyhow::Result<ProcessSpec> {
    let args = if args.is_empty() { [config.entrypoint.clone(), config.cmd.clone()].concat() } else { args.to_vec() };
    if args.is_empty() {
        bail!("the image has no entrypoint or cmd: give the command after --");
    }
    Ok(ProcessSpec {
        args,
        env: config.env.clone(),
        cwd: if config.working_dir.is_empty() { "/".into() } else { config.working_dir.clone() },
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.clone(),
        capabilities: default_capabilities(),
        no_new_privileges: true,
        rlimits: Vec::new(),
        seccomp: None,
        terminal: false,
    })
}

/// Mount every layer of `built` (attached as [`layer_disks`]); returns
/// their names, base first.
pub fn mount_layers(client: &mut Client, built: &Built) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for (index, layer) in built.layers.layers.iter().enumerate() {
        let name = layer_name(index);
        client
            .mount_layer(&name, &layer_serial(index), &layer.root_hash, layer.hash_offset)
            .with_context(|| format!("cannot mount layer {index} ({})", layer.diff_id))?;
        names.push(name);
    }
    Ok(names)
}

/// [`mount_layers`], then stack them as container `id`'s writable root.
pub fn mount_image(client: &mut Client, built: &Built, id: &str) -> anyhow::Result<()> {
    let names = mount_layers(client, built)?;
    client.mount_overlay(id, &names, true).context("cannot mount the container's overlay")?;
    Ok(())
}

/// Undo [`mount_image`] after the container was deleted.
pub fn unmount_image(client: &mut Client, built: &Built, id: &str) -> anyhow::Result<()> {
    client.unmount_overlay(id).context("cannot unmount the overlay")?;
    for index in 0..built.layers.layers.len() {
        client.unmount_layer(&layer_name(index)).with_context(|| format!("cannot unmount layer {index}"))?;
    }
    Ok(())
}

/// Bytes for a process's stdin, read from the host on a thread of its own
/// (a read may block; the agent connection must not), in chunks of at most
/// 64 KiB so each `WriteStdin` stays well inside a frame.
#[derive(Debug)]
pub struct Input {
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    ended: bool,
    closed: bool,
}

impl Input {
    /// Read `reader` to its end on a new thread.
    pub fn spawn(mut reader: impl Read + Send + 'static) -> Self {
        let (chunks, receiver) = mpsc::sync_channel(4);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let chunk = match reader.read(&mut buf) {
                    Ok(n) => Ok(buf.get(..n).unwrap_or_default().to_vec()),
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => Err(err),
                };
                let last = !matches!(&chunk, Ok(data) if !data.is_empty());
                if chunks.send(chunk).is_err() || last {
                    break;
                }
            }
        });
        Self { chunks: receiver, pending: Vec::new(), ended: false, closed: false }
    }

    /// Hand what the host has typed to the process, as much as its pipe
    /// takes now; close its stdin after the end. A process that closed its
    /// stdin (or exited) gets no more, as a pipe's reader that went away.
    fn feed(&mut self, client: &mut Client, id: &str, exec_id: Option<&str>) -> anyhow::Result<bool> {
        if self.closed {
            return Ok(false);
        }
        if self.pending.is_empty() && !self.ended {
            match self.chunks.try_recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Ok(Ok(chunk)) => self.pending = chunk,
                Ok(Err(err)) => return Err(err).context("cannot read stdin"),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => self.ended = true,
            }
        }
        let close = self.ended && self.pending.is_empty();
        if self.pending.is_empty() && !close {
            return Ok(false);
        }
        match client.write_stdin(id, exec_id, &self.pending, close) {
            Ok(written) => {
                let written = usize::try_from(written).unwrap_or(usize::MAX).min(self.pending.len());
                self.pending.drain(..written);
                self.closed = close;
                Ok(written > 0 || close)
            }
            // The process closed its stdin, or exited: it takes no more.
            Err(err) if matches!(err.code(), Some(ErrorCode::StdinClosed | ErrorCode::WrongState)) => {
                self.closed = true;
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// Copy a process's stdout and stderr to `stdout` and `stderr` until it
/// exited and both streams ended; returns how it ended. Fails after `timeout`.
pub fn pump(
    client: &mut Client,
    id: &str,
    exec_id: Option<&str>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    timeout: Duration,
) -> anyhow::Result<ProcessStatus> {
    pump_with(client, id, exec_id, None, stdout, stderr, &mut NoForward, timeout)
}

/// [`pump`], also feeding `input` to the process's stdin and passing on
/// what `forward` has (the terminal's size, signals).
#[allow(clippy::too_many_arguments)]
pub fn pump_with(
    client: &mut Client,
    id: &str,
    exec_id: Option<&str>,
    mut input: Option<&mut Input>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    forward: &mut dyn Forward,
    timeout: Duration,
) -> anyhow::Result<ProcessStatus> {
    let give_up = Instant::now() + timeout;
    let mut open = [true, true];
    let mut size = None;
    loop {
        let mut progress = false;
        let now = forward.window_size();
        if now.is_some() && now != size {
            size = now;
            if let Some((rows, cols)) = now {
                client.resize_terminal(id, exec_id, rows, cols).context("cannot resize the terminal")?;
            }
        }
        if let Some(signal) = forward.take_signal() {
            match client.signal_process(id, exec_id, signal) {
                Ok(()) => {}
                // It may have exited meanwhile; its status comes next.
                Err(err) if err.code() == Some(ErrorCode::WrongState) => {}
                // The policy decides which signals the host may send: a
                // refused one is reported, and the process keeps running.
                Err(err) if err.code() == Some(ErrorCode::PolicyDenied) => {
                    tracing::warn!("signal {signal} not passed on: {err}");
                }
                Err(err) => return Err(err).context(format!("cannot pass signal {signal} on")),
            }
        }
        if let Some(input) = input.as_deref_mut() {
            progress |= input.feed(client, id, exec_id)?;
        }
        for (stream, open) in [OutputStream::Stdout, OutputStream::Stderr].into_iter().zip(open.iter_mut()) {
            if !*open {
                continue;
            }
            let (data, eof) = client.read_output(id, exec_id, stream)?;
            progress |= !data.is_empty();
            let sink: &mut dyn Write = match stream {
                OutputStream::Stdout => &mut *stdout,
                OutputStream::Stderr => &mut *stderr,
            };
            sink.write_all(&data)?;
            sink.flush()?;
            *open = !eof;
        }
        if open == [false, false] {
            let status = client.wait_process(id, exec_id)?;
            if !status.running {
                return Ok(status);
            }
        }
        if Instant::now() >= give_up {
            bail!("container {id:?} still runs after {timeout:?}");
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The exit status a shell would report: the code, or 128 + the signal.
pub fn exit_code(status: &ProcessStatus) -> i32 {
    match (status.exit_code, status.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_type_source_destination_and_options() {
        let m = parse_mount("tmpfs:tmpfs:/scratch:size=64m,mode=1777").unwrap();
        assert_eq!((m.kind.as_str(), m.source.as_str(), m.destination.as_str()), ("tmpfs", "tmpfs", "/scratch"));
        assert_eq!(m.options, ["size=64m", "mode=1777"]);
        let m = parse_mount("bind:/run/parma/volumes/shared:/data").unwrap();
        assert!(m.options.is_empty());
        // The policy input is the OCI form: "type", not "kind".
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["type"], "bind");
        for bad in ["tmpfs", "tmpfs:tmpfs", "::/x", "bind::/data:ro"] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_launch_carries_host_data_in_snp_or_emulated() {
        let mut config = VmConfig::new(Path::new("/nonexistent/uvm"), "unused");
        let snp = SnpLaunch { boot: SnpBoot::KernelHashes { ovmf: "/fw/OVMF.fd".into() }, vcpu_type: "EPYC-v4".into() };
        // TCG has no SNP: refused, and the configuration is left as it was.
        assert!(matches!(configure_launch(&mut config, Some(&snp), [1; 32]), Err(VmError::SnpNeedsKvm)));
        assert!(config.snp.is_none() && config.insecure_emulated_host_data.is_none());
        configure_launch(&mut config, None, [2; 32]).unwrap();
        assert_eq!(config.insecure_emulated_host_data, Some([2; 32]));
        config.accel = Accel::Kvm;
        configure_launch(&mut config, Some(&snp), [3; 32]).unwrap();
        let launched = config.snp.as_ref().unwrap();
        assert_eq!((launched.host_data, launched.vcpu_type.as_str()), ([3; 32], "EPYC-v4"));
        assert_eq!(config.insecure_emulated_host_data, None, "never both");
        // An IGVM file that is not one is refused by name.
        let igvm = SnpLaunch { boot: SnpBoot::Igvm("/nonexistent/uvm.igvm".into()), vcpu_type: "EPYC-v4".into() };
        assert!(matches!(configure_launch(&mut config, Some(&igvm), [4; 32]), Err(VmError::Igvm { .. })));
    }

    #[test]
    fn users_without_files_are_numeric() {
        let config = |user: &str| ImageConfig { user: user.into(), cmd: vec!["/x".into()], ..ImageConfig::default() };
        let process = process_from_config(&config("1000:1001"), &[]).unwrap();
        assert_eq!((process.uid, process.gid), (1000, 1001));
        let err = format!("{:#}", process_from_config(&config("nginx"), &[]).unwrap_err());
        assert!(err.contains("a name needs the image's files"), "{err}");
        let named = ResolvedUser { uid: 101, gid: 102, groups: vec![4] };
        let process = process_for_user(&config("nginx"), &[], &named).unwrap();
        assert_eq!((process.uid, process.gid, process.groups.as_slice()), (101, 102, &[4][..]));
    }

    #[test]
    fn the_process_is_the_image_config() {
        let config = ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: String::new(),
            user: "7:8".into(),
            ..ImageConfig::default()
        };
        let process = process_from_config(&config, &[]).unwrap();
        assert_eq!(process.args, ["/bin/app", "--serve"]);
        assert_eq!((process.cwd.as_str(), process.uid, process.gid), ("/", 7, 8));
        assert_eq!(process.capabilities.bounding.len(), crate::policy_gen::DEFAULT_CAPABILITIES.len());
        let process = process_from_config(&config, &["/bin/other".into()]).unwrap();
        assert_eq!(process.args, ["/bin/other"]);
        let empty = ImageConfig::default();
        assert!(process_from_config(&empty, &[]).is_err());
    }

    /// A stand-in agent on a unix socket for the pump: the process runs
    /// until it gets a signal; it records the signals and terminal sizes
    /// it was sent. `deny` lists signals the "policy" refuses.
    fn fake_agent(socket: &Path, deny: Vec<i32>) -> std::thread::JoinHandle<Vec<parma_protocol::Request>> {
        use parma_protocol::{AgentError, Decoder, Request, Response, encode_response};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut decoder = Decoder::new();
            let mut seen = Vec::new();
            let mut killed = None;
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    return seen;
                }
                decoder.push(&buf[..n]);
                while let Some(Ok(frame)) = decoder.next_frame() {
                    let request = Request::decode(&frame.body).unwrap();
                    let response = match &request {
                        Request::SignalProcess { signal, .. } if deny.contains(signal) => {
                            Response::Error(AgentError::new(ErrorCode::PolicyDenied, "signal_container_process"))
                        }
                        Request::SignalProcess { signal, .. } => {
                            killed = Some(*signal);
                            Response::Done
                        }
                        Request::ResizeTerminal { .. } => Response::Done,
                        Request::ReadOutput { .. } => Response::Output { data: String::new(), eof: killed.is_some() },
                        Request::WaitProcess { .. } => {
                            Response::ProcessStatus { running: killed.is_none(), exit_code: None, signal: killed }
                        }
                        other => panic!("unexpected {other:?}"),
                    };
                    if !matches!(request, Request::ReadOutput { .. } | Request::WaitProcess { .. }) {
                        seen.push(request);
                    }
                    stream.write_all(&encode_response(frame.id, &response)).unwrap();
                }
            }
        })
    }

    /// The host's terminal size and signals, scripted: the size changes
    /// once, then SIGTERM (denied by the policy) and SIGINT arrive.
    struct Script {
        polls: usize,
    }

    impl Forward for Script {
        fn window_size(&mut self) -> Option<(u16, u16)> {
            self.polls += 1;
            Some(if self.polls < 5 { (24, 80) } else { (50, 132) })
        }

        fn take_signal(&mut self) -> Option<i32> {
            match self.polls {
                10 => Some(15),
                20 => Some(2),
                _ => None,
            }
        }
    }

    /// `parma run -t` passes the terminal's size on when it changes (once
    /// per change), and Ctrl-C as SIGINT; a signal the policy refuses is
    /// reported and the process keeps running.
    #[test]
    fn the_pump_passes_on_window_sizes_and_signals() {
        use parma_protocol::Request;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let agent = fake_agent(&socket, vec![15]);
        let mut client = Client::connect(&crate::Control::Unix(socket), Duration::from_secs(5)).unwrap();
        let status = pump_with(
            &mut client,
            "c0",
            None,
            None,
            &mut std::io::sink(),
            &mut std::io::sink(),
            &mut Script { polls: 0 },
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(exit_code(&status), 130);
        drop(client);
        let seen = agent.join().unwrap();
        let sizes: Vec<(u16, u16)> = seen
            .clone()
            .into_iter()
            .filter_map(|r| match r {
                Request::ResizeTerminal { rows, cols, .. } => Some((rows, cols)),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [(24, 80), (50, 132)], "one resize per change");
        let signals: Vec<i32> = seen
            .into_iter()
            .filter_map(|r| match r {
                Request::SignalProcess { signal, .. } => Some(signal),
                _ => None,
            })
            .collect();
        assert_eq!(signals, [15, 2], "SIGTERM was refused and the pump went on to pass SIGINT");
    }

    #[test]
    fn exit_codes() {
        let status = |exit_code, signal| ProcessStatus { running: false, exit_code, signal };
        assert_eq!(exit_code(&status(Some(3), None)), 3);
        assert_eq!(exit_code(&status(None, Some(9))), 137);
    }
}
