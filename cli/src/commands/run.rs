//! `parma run`: a container image in a fresh UVM, as `docker run` would.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use parma_host::Accel;
use parma_host::run::{RunError, RunIo, RunOptions, SnpLaunch, Step};

use crate::output::{Progress, duration};
use crate::terminal;

pub const AFTER_HELP: &str = "Example:\n  parma run --policy policy.rego --oci image/ -it -- /bin/sh\n\n\
    Exit codes, as docker run's: 125 parma failed; 126 the command cannot run (denied by the policy\n\
    included, with the policy's explanation); 127 the executable is not in the image; otherwise the\n\
    container's own code (128 + N when signal N killed it).";

#[derive(Args)]
pub struct RunArgs {
    /// The UVM directory (from `make image`).
    #[arg(long, default_value = "out/uvm")]
    uvm: PathBuf,
    /// The execution policy (Rego); its sha256 becomes HOST_DATA.
    #[arg(long)]
    policy: PathBuf,
    /// The image: an OCI layout directory or a `docker save` archive.
    #[arg(long)]
    oci: PathBuf,
    /// Which image of the layout (annotation org.opencontainers.image.ref.name).
    #[arg(long = "ref")]
    reference: Option<String>,
    /// Where the layer images are built (reused across runs of the same
    /// image, and the same default as `parma policy gen` and `parma layer build`).
    #[arg(long, default_value = parma_host::run::DEFAULT_LAYERS_DIR)]
    layers_dir: PathBuf,
    /// The accelerator: tcg (anywhere) or kvm.
    #[arg(long, default_value = "tcg")]
    accel: Accel,
    /// Launch as an SEV-SNP guest (an SNP host, --accel kvm, and --ovmf or --igvm).
    #[arg(long)]
    snp: bool,
    /// With --snp: an AmdSevX64 OVMF build.
    #[arg(long, requires = "snp", conflicts_with = "igvm")]
    ovmf: Option<PathBuf>,
    /// With --snp: the UVM's IGVM file (QEMU 10.1 or newer).
    #[arg(long, requires = "snp")]
    igvm: Option<PathBuf>,
    /// With --snp: the vCPU type.
    #[arg(long, default_value = "EPYC-v4")]
    vcpu_type: String,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Write the guest's serial console here (default: discarded).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// The container's id in the guest.
    #[arg(long, default_value = "c0")]
    id: String,
    /// Give the guest an encrypted scratch disk of this many MiB (a sparse
    /// file, deleted afterwards): the containers' writes that do not fit in
    /// guest memory go there, encrypted and authenticated. 0: none.
    #[arg(long, default_value_t = 0)]
    scratch_mib: u64,
    /// A mount beyond the defaults, TYPE:SOURCE:DESTINATION[:OPTION,...]:
    /// `tmpfs:tmpfs:/scratch:size=64m` or `bind:/run/parma/volumes/NAME:/data:ro`
    /// (a volume in guest memory). The policy must list it. Repeatable.
    #[arg(long = "mount", value_parser = parma_host::run::parse_mount)]
    mounts: Vec<parma_protocol::Mount>,
    /// Publish a container port on 127.0.0.1: HOST:GUEST[/tcp|udp]
    /// (repeatable). The UVM becomes a pod with a NIC on QEMU user-mode
    /// networking; the policy decides the pod and its network.
    #[arg(short = 'p', long = "publish")]
    publish: Vec<parma_host::PortForward>,
    /// Connect the UVM to the network namespace at this path (e.g.
    /// /var/run/netns/pod1, with one veth as a CNI plugin leaves it): a tap
    /// in that namespace, tc-redirected to and from the veth; the pod gets
    /// the veth's MAC, addresses and routes, as the policy allows.
    #[arg(long, conflicts_with = "publish")]
    netns: Option<std::path::PathBuf>,
    /// Where the pod reaches a key broker of the policy, NAME=IP:PORT
    /// (repeatable; NAME as in the policy's `brokers`). The secrets the
    /// policy lists for the container are provisioned before it starts,
    /// over the pod's network (--netns); a broker not named here is
    /// reached at its URL's host, resolved on this host. Only a route: TLS
    /// and the policy's pin decide who the broker is
    #[arg(long = "broker-address", value_name = "NAME=IP:PORT", value_parser = broker_address, requires = "netns")]
    broker_addresses: Vec<(String, std::net::SocketAddr)>,
    /// Give up on the container after this long (`90s`, `10m`, or seconds).
    #[arg(long, default_value = "10m", value_parser = duration)]
    timeout: Duration,
    /// Give up on the boot if the agent has not answered this long after QEMU started.
    #[arg(long, default_value = "2m", value_parser = duration)]
    boot_timeout: Duration,
    /// Forward this command's stdin to the container's (default: the
    /// container's stdin is closed at once).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the container's process on a terminal (sized as this one, and
    /// resized with it; this terminal goes raw meanwhile). With -i for an
    /// interactive shell.
    #[arg(short = 't', long)]
    tty: bool,
    /// No progress lines (they go to stderr, on a terminal only).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The command, replacing the image's entrypoint and cmd.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Run it; the exit code as `docker run`'s.
pub fn execute(args: RunArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("parma run: {err:#}");
            err.exit_code()
        }
    }
}

fn run(args: RunArgs) -> Result<i32, RunError> {
    let snp = match (args.snp, args.ovmf, args.igvm) {
        (false, _, _) => None,
        (true, Some(ovmf), None) => Some(parma_host::SnpBoot::KernelHashes { ovmf }),
        (true, None, Some(igvm)) => Some(parma_host::SnpBoot::Igvm(igvm)),
        (true, _, _) => return Err(RunError::Usage("--snp needs --ovmf FILE (kernel hashes) or --igvm FILE".into())),
    };
    let progress = Progress::new(args.quiet);
    if snp.is_none() {
        eprintln!("parma run: INSECURE emulation: no SEV-SNP; the guest emulates attestation reports");
    }
    let options = RunOptions {
        reference: args.reference,
        layers_dir: args.layers_dir,
        accel: args.accel,
        snp: snp.map(|boot| SnpLaunch { boot, vcpu_type: args.vcpu_type }),
        memory_mib: args.memory,
        serial_log: args.serial_log,
        id: args.id,
        scratch_mib: args.scratch_mib,
        mounts: args.mounts,
        boot_deadline: args.boot_timeout,
        timeout: args.timeout,
        tty: args.tty,
        args: args.args,
        publish: args.publish,
        netns: args.netns,
        broker_addresses: args.broker_addresses,
        ..RunOptions::new(args.uvm, args.policy, args.oci)
    };
    let mut forward = terminal::HostForward::install(args.tty).map_err(RunError::Failed)?;
    let stdin = args.interactive.then(|| parma_host::run::Input::spawn(std::io::stdin()));
    // The terminal goes raw when the container starts: it is the container's from then on.
    let raw = std::cell::RefCell::new(None);
    let io = RunIo { stdin, stdout: &mut std::io::stdout(), stderr: &mut std::io::stderr(), forward: &mut forward };
    let outcome = parma_host::run::run(&options, io, &|step| match step {
        Step::Layer(event) => progress.layer(event),
        Step::Booting => progress.line("booting the UVM"),
        Step::Ready(after) => progress.line(&format!("agent ready {:.2} s after QEMU started", after.as_secs_f64())),
        Step::PolicySet(sha256) => progress.line(&format!("policy {sha256} in force")),
        Step::LayersMounted => progress.line("layers mounted through dm-verity"),
        Step::OverlayMounted | Step::Created => {}
        Step::SecretProvisioned(file) => progress.line(&format!("secret {file} provisioned")),
        Step::Started(pid) => {
            progress.line(&format!("container started (pid {pid} in the guest)"));
            if args.tty {
                match terminal::Raw::stdin() {
                    Ok(mode) => *raw.borrow_mut() = mode,
                    Err(err) => eprintln!("parma run: cannot put the terminal in raw mode: {err:#}"),
                }
            }
        }
        Step::Exited(_) | Step::Stopped(_) => {
            raw.borrow_mut().take();
        }
    });
    drop(raw);
    Ok(outcome?.exit_code)
}

/// `NAME=IP:PORT` for `--broker-address`.
fn broker_address(text: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (name, address) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=IP:PORT"))?;
    if name.is_empty() {
        return Err(format!("{text:?} has no broker name before '='"));
    }
    let address = address.parse().map_err(|err| format!("{address:?} is not IP:PORT: {err}"))?;
    Ok((name.to_string(), address))
}
