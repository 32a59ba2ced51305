//! `parma`: the host CLI of Parma.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use parma::qemu::shell_words;
use parma::{Accel, Client, Control, Serial, VmConfig};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "parma", version, about = "Confidential containers with attested execution policies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot and manage the utility VM.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Talk to the guest agent.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Hash execution policies and dry-run their decisions on the host.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Turn container images into dm-verity protected ext4 layers.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Compute the expected SEV-SNP launch digest of a UVM (QEMU direct boot, kernel-hashes=on).
    Measure(MeasureArgs),
    /// Verify an SEV-SNP attestation report: AMD's chain, the signature, the
    /// TCB, the policy, and what you expect; exit 0 only if every check passes.
    Verify(VerifyArgs),
    /// Run a container image in a fresh UVM under an execution policy:
    /// boot, set the policy, mount the verity layers, create, start, stream
    /// output, exit with the container's code.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
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
    /// Where the layer images are built (reused across runs of the same image).
    #[arg(long, default_value = "out/layers")]
    layers_dir: PathBuf,
    /// The accelerator: tcg (anywhere) or kvm.
    #[arg(long, value_enum, default_value = "tcg")]
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
    #[arg(long = "mount", value_parser = parma::run::parse_mount)]
    mounts: Vec<parma_protocol::Mount>,
    /// Give up on the container after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Forward this command's stdin to the container's (default: the
    /// container's stdin is closed at once).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the container's process on a terminal (sized as this one; this
    /// terminal goes raw meanwhile). With -i for an interactive shell.
    #[arg(short = 't', long)]
    tty: bool,
    /// The command, replacing the image's entrypoint and cmd.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("certificates").required(true).args(["certs", "vcek"])))]
struct VerifyArgs {
    /// The report: 1184 bytes, or hex text.
    #[arg(long)]
    report: PathBuf,
    /// A directory with vcek.der (or .pem) and optionally ark.pem, ask.pem or cert_chain.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// The VCEK alone (DER or PEM); ASK and ARK are AMD's, built in.
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// milan, genoa or turin (default: from the report or the VCEK).
    #[arg(long)]
    product: Option<parma_snp::Product>,
    /// The launch digest you expect (96 hex digits; see `parma measure`).
    #[arg(long)]
    expect_measurement: Option<String>,
    /// The HOST_DATA you expect (64 hex digits; for Parma, `parma policy hash`).
    #[arg(long)]
    expect_host_data: Option<String>,
    /// The REPORT_DATA you expect (hex, up to 64 bytes; shorter is zero padded).
    #[arg(long)]
    expect_report_data: Option<String>,
    /// The least TCB you accept, e.g. bl=3,tee=0,snp=8,ucode=115.
    #[arg(long)]
    min_tcb: Option<parma_snp::TcbVersion>,
    /// INSECURE: accept a chain rooted elsewhere than AMD (the emulation provider's).
    #[arg(long)]
    allow_insecure_emulation: bool,
    /// Print JSON: every check with its values.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum LayerCommand {
    /// Write each layer of an image as ext4 + dm-verity (DIR/<diff-id>.img),
    /// DIR/layers.json (root hashes) and DIR/config.json (for the policy generator).
    Build {
        /// An OCI image layout directory or a `docker save` archive.
        #[arg(long)]
        oci: PathBuf,
        /// The image to take (annotation org.opencontainers.image.ref.name); default: the only one.
        #[arg(long = "ref")]
        reference: Option<String>,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// Print layers.json to stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct MeasureArgs {
    /// The UVM directory: its vmlinuz, initrd.img and cmdline are measured
    /// through the firmware's kernel-hashes table. Without it, the firmware alone.
    #[arg(long, conflicts_with = "igvm")]
    uvm: Option<PathBuf>,
    /// The firmware: an OVMF build (AmdSevX64 for direct boot), or its last
    /// pages when --ovmf-hash gives the digest of the rest.
    #[arg(long, required_unless_present = "igvm", conflicts_with = "igvm")]
    ovmf: Option<PathBuf>,
    /// Measure an IGVM file (out/uvm/uvm.igvm) as QEMU 10.1+ and KVM launch
    /// it, instead of a firmware launch.
    #[arg(long)]
    igvm: Option<PathBuf>,
    /// Precomputed digest of the firmware pages (96 hex digits).
    #[arg(long)]
    ovmf_hash: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// vCPU type, as QEMU's -cpu names it (EPYC-v4, EPYC-Milan, EPYC-Genoa, ...).
    #[arg(long, default_value = "EPYC-v4")]
    vcpu_type: String,
    /// The kernel command line (default: the UVM's cmdline file).
    #[arg(long)]
    append: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Generate a policy from a container image (and an optional container
    /// spec): the layers' root hashes, the command, env, working dir, user.
    Gen {
        /// An OCI image layout directory or a `docker save` archive.
        #[arg(long)]
        oci: PathBuf,
        /// The image to take (annotation org.opencontainers.image.ref.name).
        #[arg(long = "ref")]
        reference: Option<String>,
        /// A container spec (JSON): name, command, env rules, mounts, user,
        /// capabilities, exec_processes, signals, no_new_privileges.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Where the layer images go (they are built as `parma layer build` does).
        #[arg(long, default_value = "layers")]
        layers_dir: PathBuf,
        /// Write the policy here (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the policy's identity: sha256 of its exact bytes (what goes into HOST_DATA).
    Hash {
        /// The policy file (Rego).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a fragment issuer's id for a policy's `fragments` list: sha256
    /// of its public key (SubjectPublicKeyInfo DER).
    Issuer {
        /// The issuer's public key, DER (`openssl pkey -pubout -outform DER`).
        key: PathBuf,
    },
    /// Decide one request; exit 0 if allowed, 2 if denied.
    Eval(EvalArgs),
    /// Decide one request and explain it: every container tried and every field that failed.
    Explain(EvalArgs),
    /// Run a scenario of requests with expected decisions; exit non-zero on any mismatch.
    Simulate {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The scenario (JSON: templates and steps).
        #[arg(long)]
        scenario: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    /// The request: {"point": "create_container", "input": {...}}.
    #[arg(long)]
    input: PathBuf,
    /// Decide from this state (as the agent keeps it) instead of an empty one.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot the UVM with QEMU; runs until the VM powers off and exits with QEMU's status.
    Run(VmRun),
}

#[derive(Args)]
struct VmRun {
    /// The UVM directory `make image` wrote.
    #[arg(long, default_value = "out/uvm")]
    uvm: PathBuf,
    /// tcg (emulation, anywhere) or kvm (real hosts).
    #[arg(long, value_enum, default_value = "tcg")]
    accel: Accel,
    /// The unix socket for the agent's virtio-serial port.
    #[arg(long)]
    control: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Write the serial console here instead of to stdout.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Also give the guest vsock with this CID (needs /dev/vhost-vsock).
    #[arg(long)]
    vsock_cid: Option<u32>,
    /// Or give the guest vsock served by a vhost-user backend listening at
    /// this socket, e.g. `vhost-device-vsock --socket S --uds-path U`; then
    /// `--control vsock-uds:U` reaches the agent over vsock. Not with --snp.
    #[arg(long, conflicts_with = "vsock_cid")]
    vhost_user_vsock: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Print the QEMU command line instead of running it.
    #[arg(long)]
    print_command: bool,
    /// Launch as an SEV-SNP guest (needs --accel kvm on an SNP host): with
    /// --ovmf (QEMU 9.1 or newer) or --igvm (QEMU 10.1 or newer).
    #[arg(long, requires = "policy")]
    snp: bool,
    /// With --snp: an AmdSevX64 OVMF build (it has the kernel-hashes section).
    #[arg(long, conflicts_with = "igvm")]
    ovmf: Option<PathBuf>,
    /// With --snp: boot the UVM's IGVM file (out/uvm/uvm.igvm) instead of
    /// firmware plus kernel; the guest memory is the file's.
    #[arg(long, requires = "snp")]
    igvm: Option<PathBuf>,
    /// With --snp or --insecure-emulate-snp: the execution policy; its sha256 becomes HOST_DATA.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// INSECURE, for development under TCG: the guest emulates SEV-SNP
    /// reports (signed by a public test key, with HOST_DATA = sha256 of
    /// --policy); `parma verify` refuses them without --allow-insecure-emulation.
    #[arg(long, requires = "policy", conflicts_with = "snp")]
    insecure_emulate_snp: bool,
    /// With --snp: the vCPU type, which the launch digest depends on.
    #[arg(long, default_value = "EPYC-v4")]
    vcpu_type: String,
    /// Attach the layers `parma layer build` wrote to this directory as
    /// read-only disks with serials parma-l0, parma-l1, ... (base first).
    #[arg(long)]
    layers: Option<PathBuf>,
    /// Attach this file as the writable scratch disk (serial parma-scratch),
    /// for `parma agent mount-scratch`. Its contents are destroyed.
    #[arg(long)]
    scratch: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    /// The agent: a unix socket path (virtio-serial), vsock:CID[:PORT], or
    /// vsock-uds:PATH[:PORT] (a hybrid-vsock unix socket).
    #[arg(long)]
    control: Control,
    /// Seconds to wait for the agent (connecting and answering).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Check the agent answers; print its versions and uptime.
    Ping(AgentArgs),
    /// Print what the guest has: memory, CPUs, mounts, SEV devices.
    Info(AgentArgs),
    /// Power the UVM off.
    Shutdown(AgentArgs),
    /// Get an SEV-SNP attestation report binding REPORT_DATA; write it to a file.
    Attest {
        #[command(flatten)]
        agent: AgentArgs,
        /// REPORT_DATA in hex (up to 64 bytes; e.g. the hash of a public key).
        #[arg(long, default_value = "")]
        report_data: String,
        /// Where to write the report (1184 bytes).
        #[arg(long)]
        out: PathBuf,
        /// Also write the INSECURE emulation's test chain here (ark.pem,
        /// ask.pem, vcek.der) for `parma verify --certs DIR --allow-insecure-emulation`.
        #[arg(long)]
        emulation_chain: Option<PathBuf>,
    },
    /// Install the execution policy (once per boot); prints its sha256.
    SetPolicy {
        #[command(flatten)]
        agent: AgentArgs,
        /// The policy file (Rego).
        policy: PathBuf,
    },
    /// Open a layer disk through dm-verity and mount it (policy: mount_device).
    MountLayer {
        #[command(flatten)]
        agent: AgentArgs,
        /// The layer's name in the guest.
        #[arg(long)]
        name: String,
        /// The disk's virtio-blk serial (`parma vm run --layers` uses parma-l0, parma-l1, ...).
        #[arg(long)]
        serial: String,
        /// The dm-verity root hash.
        #[arg(long)]
        root_hash: String,
        /// The verity superblock's offset (layers.json: hash_offset).
        #[arg(long)]
        hash_offset: u64,
    },
    /// Unmount a layer and close its dm-verity device (policy: unmount_device).
    UnmountLayer {
        #[command(flatten)]
        agent: AgentArgs,
        /// The layer's name.
        #[arg(long)]
        name: String,
    },
    /// Stack mounted layers (base first) as a container's root (policy: mount_overlay, scratch_mount).
    MountOverlay {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// Layer names, base first, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        layers: Vec<String>,
        /// No writable upper layer.
        #[arg(long)]
        read_only: bool,
    },
    /// Make a writable disk the encrypted scratch: swap over authenticated
    /// dm-crypt and dm-integrity with a key made in the guest (policy: scratch_mount).
    MountScratch {
        #[command(flatten)]
        agent: AgentArgs,
        /// The disk's virtio-blk serial (`parma vm run --scratch` uses parma-scratch).
        #[arg(long, default_value = "parma-scratch")]
        serial: String,
    },
    /// Unmount a container's overlay (policy: unmount_overlay).
    UnmountOverlay {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Create a container on its overlay (policy: create_container).
    Create {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// The process as JSON (args, env, cwd, uid, gid, groups, capabilities, no_new_privileges).
        #[arg(long, conflicts_with = "config")]
        process: Option<PathBuf>,
        /// Or: the image's config.json from `parma layer build` (entrypoint, env, user...).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A mount beyond the defaults, TYPE:SOURCE:DESTINATION[:OPTION,...]
        /// (see `parma run --help`). Repeatable.
        #[arg(long = "mount", value_parser = parma::run::parse_mount)]
        mounts: Vec<parma_protocol::Mount>,
        /// Run the process on a terminal (its output then comes as stdout
        /// only; `parma agent resize` sizes it).
        #[arg(long)]
        terminal: bool,
        /// The command, replacing the config's entrypoint and cmd.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Change a container's cgroup limits.
    Update {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// memory.max in bytes.
        #[arg(long)]
        memory_max: Option<u64>,
        /// pids.max.
        #[arg(long)]
        pids_max: Option<u64>,
    },
    /// Start a created container.
    Start {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Run another process in a running container (policy: exec_in_container).
    Exec {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// The process's id within the container.
        #[arg(long)]
        exec_id: String,
        /// The process as JSON.
        #[arg(long)]
        process: PathBuf,
        /// Run it on a terminal.
        #[arg(long)]
        terminal: bool,
    },
    /// Set the window size of a process's terminal.
    Resize {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// An exec id (default: the init process).
        #[arg(long)]
        exec_id: Option<String>,
        /// Rows.
        #[arg(long)]
        rows: u16,
        /// Columns.
        #[arg(long)]
        cols: u16,
    },
    /// Signal a container's init or exec process (policy: signal_container_process).
    Signal {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// An exec id (default: the init process).
        #[arg(long)]
        exec_id: Option<String>,
        /// The signal number.
        #[arg(long)]
        signal: i32,
    },
    /// Copy a process's output until it exits; exit with its code.
    Wait {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// An exec id (default: the init process).
        #[arg(long)]
        exec_id: Option<String>,
    },
    /// Delete a container whose processes exited (policy: shutdown_container).
    Delete {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Add a signed fragment's containers to the policy in force (policy:
    /// load_fragment, after the issuer's signature checked).
    LoadFragment {
        #[command(flatten)]
        agent: AgentArgs,
        /// The fragment document {"feed", "svn", "containers"}, as signed.
        #[arg(long)]
        fragment: PathBuf,
        /// Its ECDSA P-384 / SHA-384 signature (DER, as `openssl dgst -sha384 -sign` writes it).
        #[arg(long)]
        signature: PathBuf,
        /// The issuer's public key, SubjectPublicKeyInfo DER.
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Cli::parse().command {
        Command::Vm(VmCommand::Run(args)) => vm_run(args),
        Command::Agent(command) => agent(command),
        Command::Policy(command) => policy(command),
        Command::Layer(LayerCommand::Build { oci, reference, out, json }) => {
            layer_build(&oci, reference.as_deref(), &out, json)
        }
        Command::Measure(args) => measure(args),
        Command::Verify(args) => verify(args),
        Command::Run(args) => {
            let code = run_container(args)?;
            std::process::exit(code);
        }
    }
}

/// How an SNP launch boots, and its guest memory: an IGVM file fixes it.
fn snp_boot(ovmf: Option<PathBuf>, igvm: Option<PathBuf>, memory_mib: u32) -> anyhow::Result<(parma::SnpBoot, u32)> {
    match (ovmf, igvm) {
        (Some(ovmf), None) => Ok((parma::SnpBoot::KernelHashes { ovmf }, memory_mib)),
        (None, Some(file)) => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let measured = parma_igvm::measure(&bytes, 1, None)
                .with_context(|| format!("{} is not a UVM IGVM file", file.display()))?;
            let memory = u32::try_from(measured.memory_mib).context("the IGVM file's memory is too large")?;
            Ok((parma::SnpBoot::Igvm(file), memory))
        }
        _ => anyhow::bail!("--snp needs --ovmf FILE (kernel hashes) or --igvm FILE"),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.report).with_context(|| format!("cannot read {}", args.report.display()))?;
    let report = parma_snp::AttestationReport::parse(&bytes)
        .with_context(|| format!("{} is not an SEV-SNP report", args.report.display()))?;
    let certs = match (args.certs, args.vcek) {
        (Some(dir), _) => parma_snp::CertSource::Dir(dir),
        (None, Some(vcek)) => parma_snp::CertSource::Vcek(vcek),
        (None, None) => anyhow::bail!("give --certs DIR or --vcek FILE"),
    };
    let mut expect = parma_snp::Expectations {
        product: args.product,
        min_tcb: args.min_tcb,
        allow_insecure_emulation: args.allow_insecure_emulation,
        ..Default::default()
    };
    if let Some(hex) = &args.expect_measurement {
        expect = expect.measurement_hex(hex)?;
    }
    if let Some(hex) = &args.expect_host_data {
        expect = expect.host_data_hex(hex)?;
    }
    if let Some(hex) = &args.expect_report_data {
        expect = expect.report_data_hex(hex)?;
    }
    let verification = parma_snp::verify(&report, &certs, &expect)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&verification)?);
    } else {
        for check in verification.checks() {
            let mut line = format!("{}  {}", if check.passed { "pass" } else { "FAIL" }, check.name);
            if let Some(actual) = &check.actual {
                line.push_str(&format!(": {actual}"));
            }
            if !check.passed {
                if let Some(expected) = &check.expected {
                    line.push_str(&format!(" (expected {expected})"));
                }
                if let Some(detail) = &check.detail {
                    line.push_str(&format!(" ({detail})"));
                }
            }
            println!("{line}");
        }
        if verification.insecure_emulation() {
            println!("WARNING: the chain is not AMD's (insecure emulation): this report proves nothing about hardware");
        }
        let failed = verification.failed().count();
        println!(
            "{} checks, {} passed, {failed} failed",
            verification.checks().len(),
            verification.checks().len() - failed
        );
    }
    if !verification.all_passed() {
        std::process::exit(2);
    }
    Ok(())
}

fn layer_build(
    oci: &std::path::Path,
    reference: Option<&str>,
    out: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stderr().is_terminal();
    let progress = |event: parma_layer::Progress| {
        let mut err = std::io::stderr().lock();
        let _ = match event {
            parma_layer::Progress::Layer { index, count, diff_id, .. } if terminal => {
                writeln!(err, "layer {}/{count} {diff_id}", index + 1)
            }
            parma_layer::Progress::Read { read, size, .. } if terminal => {
                write!(err, "\r  {:>6.1} of {:.1} MiB", read as f64 / 1048576.0, size as f64 / 1048576.0)
            }
            parma_layer::Progress::Hashing { .. } if terminal => write!(err, "\r  hashing the verity tree          "),
            parma_layer::Progress::Done { file_size, .. } if terminal => {
                writeln!(err, "\r  done: {:.1} MiB image              ", file_size as f64 / 1048576.0)
            }
            parma_layer::Progress::Reused { .. } if terminal => writeln!(err, "  same as an earlier layer: reused"),
            _ => Ok(()),
        };
    };
    let built = parma_layer::build(oci, reference, out, &progress)
        .with_context(|| format!("cannot build the layers of {}", oci.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&built.layers)?);
    } else {
        for layer in &built.layers.layers {
            println!("{}  {}", layer.root_hash, layer.file);
        }
        println!("wrote {} and {}", built.layers_json.display(), built.config_json.display());
    }
    Ok(())
}

fn measure(args: MeasureArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.igvm {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let measured = parma_igvm::measure(&bytes, args.vcpus, Some(&args.vcpu_type))
            .with_context(|| format!("cannot measure {}", file.display()))?;
        let json = serde_json::json!({
            "launch_digest": measured.digest,
            "igvm": file,
            "vcpus": measured.vcpus,
            "vcpu_type": args.vcpu_type,
            "memory_mib": measured.memory_mib,
            "policy": measured.policy.map(|p| format!("{p:#x}")),
            "pages": measured.pages,
        });
        return print(args.json, &json, |_| measured.digest.clone());
    }
    let Some(ovmf) = args.ovmf else { anyhow::bail!("give --ovmf FILE or --igvm FILE") };
    let direct_boot = match &args.uvm {
        None => None,
        Some(uvm) => {
            let cmdline = match args.append {
                Some(cmdline) => cmdline,
                None => std::fs::read_to_string(uvm.join(parma_image::files::CMDLINE))
                    .with_context(|| format!("cannot read the cmdline of {}", uvm.display()))?
                    .trim()
                    .to_string(),
            };
            Some(parma_measure::DirectBoot {
                kernel: uvm.join(parma_image::files::KERNEL),
                initrd: uvm.join(parma_image::files::INITRD),
                cmdline,
            })
        }
    };
    let launch = parma_measure::Launch {
        ovmf,
        ovmf_hash: args.ovmf_hash,
        vcpus: args.vcpus,
        vcpu_type: args.vcpu_type,
        direct_boot,
        guest_features: 1,
    };
    let digest = hex::encode(parma_measure::launch_digest(&launch)?);
    let json = serde_json::json!({
        "launch_digest": digest,
        "vcpus": launch.vcpus,
        "vcpu_type": launch.vcpu_type,
        "ovmf": launch.ovmf,
        "cmdline": launch.direct_boot.as_ref().map(|b| b.cmdline.clone()),
    });
    print(args.json, &json, |_| digest.clone())
}

fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Gen { oci, reference, spec, layers_dir, out } => {
            let text = parma::policy_gen::generate(&oci, reference.as_deref(), spec.as_deref(), &layers_dir)?;
            let hash = parma_policy::policy_hash(text.as_bytes());
            match out {
                Some(path) => {
                    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            eprintln!("policy sha256 (HOST_DATA): {hash}");
            Ok(())
        }
        PolicyCommand::Issuer { key } => {
            let der = std::fs::read(&key).with_context(|| format!("cannot read {}", key.display()))?;
            let issuer = parma_policy::fragment::issuer_of(&der).with_context(|| key.display().to_string())?;
            println!("{issuer}");
            Ok(())
        }
        PolicyCommand::Hash { file, json } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let hash = parma_policy::policy_hash(&bytes);
            print(json, &serde_json::json!({"file": file, "sha256": hash}), |_| hash.clone())
        }
        PolicyCommand::Eval(args) | PolicyCommand::Explain(args) if args.json => {
            let decision = parma::policy::eval(&args.policy, &args.input, args.state.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&decision)?);
            exit_for(&decision)
        }
        PolicyCommand::Eval(args) => {
            let decision = parma::policy::eval(&args.policy, &args.input, args.state.as_deref())?;
            match &decision.denial {
                None => println!("{}: allowed", decision.point),
                Some(denial) => println!("{}", denial.line()),
            }
            exit_for(&decision)
        }
        PolicyCommand::Explain(args) => {
            let decision = parma::policy::eval(&args.policy, &args.input, args.state.as_deref())?;
            println!("{}", parma::policy::explain(&decision));
            exit_for(&decision)
        }
        PolicyCommand::Simulate { policy, scenario, json } => parma::policy::simulate(&policy, &scenario, json),
    }
}

/// `parma policy eval` exits 2 on a denial, so scripts can tell it from an error (1).
fn exit_for(decision: &parma_policy::Decision) -> anyhow::Result<()> {
    if !decision.allowed {
        std::process::exit(2);
    }
    Ok(())
}

fn vm_run(args: VmRun) -> anyhow::Result<()> {
    let config = VmConfig {
        qemu: args.qemu,
        uvm: args.uvm,
        initrd: None,
        accel: args.accel,
        control: args.control,
        memory_mib: args.memory,
        cpus: args.cpus,
        serial: args.serial_log.map_or(Serial::Stdio, Serial::File),
        vsock_cid: args.vsock_cid,
        vhost_user_vsock: args.vhost_user_vsock,
        snp: None,
        insecure_emulated_host_data: None,
        disks: {
            let mut disks = match &args.layers {
                Some(dir) => layer_disks_of(dir)?,
                None => Vec::new(),
            };
            if let Some(path) = &args.scratch {
                disks.push(parma::Disk {
                    path: path.clone(),
                    serial: parma::run::SCRATCH_SERIAL.into(),
                    writable: true,
                });
            }
            disks
        },
    };
    let host_data = match &args.policy {
        Some(policy) => {
            let bytes = std::fs::read(policy).with_context(|| format!("cannot read {}", policy.display()))?;
            Some(parma_policy::Policy::from_bytes(bytes)?.hash())
        }
        None => None,
    };
    let config = match (args.snp, args.insecure_emulate_snp, host_data) {
        (true, _, Some(host_data)) => {
            let (boot, memory_mib) = snp_boot(args.ovmf, args.igvm, config.memory_mib)?;
            let snp = parma::Snp { boot, host_data, vcpu_type: args.vcpu_type };
            VmConfig { snp: Some(snp), memory_mib, ..config }
        }
        (false, true, Some(host_data)) => {
            tracing::warn!("INSECURE: the guest emulates SEV-SNP attestation reports");
            VmConfig { insecure_emulated_host_data: Some(host_data), ..config }
        }
        (true, _, None) | (false, true, None) => anyhow::bail!("--snp and --insecure-emulate-snp need --policy"),
        (false, false, _) => config,
    };
    let qemu_args = config.args()?;
    if args.print_command {
        println!("{}", shell_words(&config.qemu, &qemu_args));
        return Ok(());
    }
    tracing::info!("{}", shell_words(&config.qemu, &qemu_args));
    // Become QEMU: its exit status is ours, and signals reach it directly.
    let err = std::process::Command::new(&config.qemu).args(&qemu_args).exec();
    Err(err).with_context(|| format!("cannot run {}", config.qemu.display()))
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", human(value));
    }
    Ok(())
}

fn connect(args: &AgentArgs) -> anyhow::Result<Client> {
    let timeout = Duration::try_from_secs_f64(args.timeout).context("bad --timeout")?;
    Ok(Client::connect(&args.control, timeout)?)
}

fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Ping(args) => {
            let info = connect(&args)?.ping()?;
            print(args.json, &info, |i| {
                format!(
                    "agent {} (protocol {}), kernel {}, up {:.3} s",
                    i.agent_version,
                    i.protocol_version,
                    i.kernel_release,
                    i.uptime_ms as f64 / 1000.0
                )
            })
        }
        AgentCommand::Info(args) => {
            let info = connect(&args)?.guest_info()?;
            print(args.json, &info, |i| {
                let mut out = format!(
                    "memory {} KiB ({} KiB available), {} cpu(s), sev-guest device: {}, tsm report: {}\n",
                    i.memory_total_kib,
                    i.memory_available_kib,
                    i.cpus,
                    if i.sev_guest_device { "yes" } else { "no" },
                    if i.tsm_report { "yes" } else { "no" },
                );
                for m in &i.mounts {
                    out.push_str(&format!("  {} on {} type {} ({})\n", m.source, m.target, m.fstype, m.options));
                }
                out.trim_end().to_string()
            })
        }
        AgentCommand::Attest { agent: args, report_data, out, emulation_chain } => {
            let data = hex::decode(&report_data).context("--report-data is not hex")?;
            anyhow::ensure!(data.len() <= 64, "--report-data is longer than 64 bytes");
            let (report, provider) = connect(&args)?.attestation(&data)?;
            std::fs::write(&out, &report).with_context(|| format!("cannot write {}", out.display()))?;
            if let Some(dir) = &emulation_chain {
                std::fs::create_dir_all(dir)?;
                parma_snp::emulation::test_chain(&parma_snp::emulation::AGENT_SEED)?.write_dir(dir)?;
            }
            if provider != "sev-guest" {
                eprintln!("WARNING: {provider}: this report proves nothing about hardware");
            }
            print(args.json, &serde_json::json!({"report": out, "provider": provider}), |_| {
                format!("wrote {} ({} bytes, {provider})", out.display(), report.len())
            })
        }
        AgentCommand::SetPolicy { agent: args, policy } => {
            let text = std::fs::read_to_string(&policy).with_context(|| format!("cannot read {}", policy.display()))?;
            let local = parma_policy::policy_hash(text.as_bytes());
            let sha256 = connect(&args)?.set_policy(text)?;
            anyhow::ensure!(sha256 == local, "the agent hashed the policy as {sha256}, this host as {local}");
            print(args.json, &serde_json::json!({"sha256": sha256}), |_| format!("policy {sha256} is in force"))
        }
        AgentCommand::Shutdown(args) => {
            connect(&args)?.shutdown()?;
            print(args.json, &serde_json::json!({"shutting_down": true}), |_| "the UVM is powering off".into())
        }
        AgentCommand::MountLayer { agent: args, name, serial, root_hash, hash_offset } => {
            let device = connect(&args)?.mount_layer(&name, &serial, &root_hash, hash_offset)?;
            print(args.json, &serde_json::json!({"device": device}), |_| {
                format!("layer {name} mounted through {device}")
            })
        }
        AgentCommand::UnmountLayer { agent: args, name } => {
            connect(&args)?.unmount_layer(&name)?;
            print(args.json, &serde_json::json!({"unmounted": name}), |_| format!("layer {name} unmounted"))
        }
        AgentCommand::MountOverlay { agent: args, id, layers, read_only } => {
            let target = connect(&args)?.mount_overlay(&id, &layers, !read_only)?;
            print(args.json, &serde_json::json!({"target": target}), |_| format!("overlay of {id} on {target}"))
        }
        AgentCommand::MountScratch { agent: args, serial } => {
            let (device, bytes) = connect(&args)?.mount_scratch(&serial)?;
            print(args.json, &serde_json::json!({"device": device, "bytes": bytes}), |_| {
                format!("encrypted scratch: {bytes} bytes of swap on {device}")
            })
        }
        AgentCommand::UnmountOverlay { agent: args, id } => {
            connect(&args)?.unmount_overlay(&id)?;
            print(args.json, &serde_json::json!({"unmounted": id}), |_| format!("overlay of {id} unmounted"))
        }
        AgentCommand::Create { agent: args, id, process, config, mounts, terminal, args: command } => {
            let mut process = match (process, config) {
                (Some(path), _) => read_json::<parma_protocol::ProcessSpec>(&path)?,
                (None, Some(path)) => {
                    let config: parma_layer::ImageConfig = read_json(&path)?;
                    parma::run::process_from_config(&config, &command)?
                }
                (None, None) => anyhow::bail!("give --process FILE or --config FILE"),
            };
            process.terminal |= terminal;
            connect(&args)?.create_container_with(&id, &process, None, &mounts)?;
            print(args.json, &serde_json::json!({"created": id}), |_| format!("container {id} created"))
        }
        AgentCommand::Update { agent: args, id, memory_max, pids_max } => {
            let resources = parma_protocol::Resources { memory_max, pids_max, cpu_max: None };
            connect(&args)?.update_container(&id, &resources)?;
            print(args.json, &serde_json::json!({"updated": id}), |_| format!("container {id} updated"))
        }
        AgentCommand::Start { agent: args, id } => {
            let pid = connect(&args)?.start_container(&id)?;
            print(args.json, &serde_json::json!({"pid": pid}), |_| format!("container {id} started (pid {pid})"))
        }
        AgentCommand::Exec { agent: args, id, exec_id, process, terminal } => {
            let mut process = read_json::<parma_protocol::ProcessSpec>(&process)?;
            process.terminal |= terminal;
            let pid = connect(&args)?.exec_process(&id, &exec_id, &process)?;
            print(args.json, &serde_json::json!({"pid": pid}), |_| format!("process {exec_id} started (pid {pid})"))
        }
        AgentCommand::Resize { agent: args, id, exec_id, rows, cols } => {
            connect(&args)?.resize_terminal(&id, exec_id.as_deref(), rows, cols)?;
            print(args.json, &serde_json::json!({"resized": id, "rows": rows, "cols": cols}), |_| {
                format!("terminal of {id} is {rows}x{cols}")
            })
        }
        AgentCommand::Signal { agent: args, id, exec_id, signal } => {
            connect(&args)?.signal_process(&id, exec_id.as_deref(), signal)?;
            print(args.json, &serde_json::json!({"signalled": id}), |_| format!("signal {signal} sent"))
        }
        AgentCommand::Wait { agent: args, id, exec_id } => {
            let mut client = connect(&args)?;
            let status = parma::run::pump(
                &mut client,
                &id,
                exec_id.as_deref(),
                &mut std::io::stdout(),
                &mut std::io::stderr(),
                Duration::from_secs(24 * 3600),
            )?;
            std::process::exit(parma::run::exit_code(&status));
        }
        AgentCommand::Delete { agent: args, id } => {
            connect(&args)?.delete_container(&id)?;
            print(args.json, &serde_json::json!({"deleted": id}), |_| format!("container {id} deleted"))
        }
        AgentCommand::LoadFragment { agent: args, fragment, signature, key } => {
            let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
            let loaded = connect(&args)?.load_fragment(&read(&fragment)?, &read(&signature)?, &read(&key)?)?;
            let json = serde_json::to_value(&loaded)?;
            print(args.json, &json, |j| {
                let body = &j["FragmentLoaded"];
                format!(
                    "fragment {} (svn {}) of issuer {} added {} container(s)",
                    body["feed"], body["svn"], body["issuer"], body["containers"]
                )
            })
        }
    }
}

/// The disks of the layers listed in `dir/layers.json`, base first.
fn layer_disks_of(dir: &Path) -> anyhow::Result<Vec<parma::Disk>> {
    let listing: serde_json::Value = read_json(&dir.join("layers.json"))?;
    let layers = listing.get("layers").and_then(serde_json::Value::as_array).context("layers.json has no layers")?;
    layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let file = layer.get("file").and_then(serde_json::Value::as_str).context("a layer has no file")?;
            anyhow::ensure!(!file.contains('/'), "layer file {file:?} is not a plain name");
            Ok(parma::Disk { path: dir.join(file), serial: parma::run::layer_serial(index), writable: false })
        })
        .collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// `parma run`: returns the container's exit code.
fn run_container(args: RunArgs) -> anyhow::Result<i32> {
    let policy =
        std::fs::read_to_string(&args.policy).with_context(|| format!("cannot read {}", args.policy.display()))?;
    let host_data = parma_policy::Policy::from_bytes(policy.clone().into_bytes())?.hash();
    let built = parma_layer::build(&args.oci, args.reference.as_deref(), &args.layers_dir, &|_| {})
        .with_context(|| format!("cannot build the layers of {}", args.oci.display()))?;
    let process = parma::run::process_from_config(&built.config, &args.args)?;
    let dir = tempfile::Builder::new().prefix("parma-run-").tempdir()?;
    let control = dir.path().join("control.sock");
    let mut config = VmConfig::new(&args.uvm, &control);
    config.accel = args.accel;
    config.memory_mib = args.memory;
    config.disks = parma::run::layer_disks(&built, &args.layers_dir);
    if args.scratch_mib > 0 {
        let path = dir.path().join("scratch.img");
        std::fs::File::create(&path)?.set_len(args.scratch_mib << 20)?;
        config.disks.push(parma::Disk { path, serial: parma::run::SCRATCH_SERIAL.into(), writable: true });
    }
    config.serial = Serial::File(args.serial_log.clone().unwrap_or_else(|| dir.path().join("serial.log")));
    if args.snp {
        let (boot, memory_mib) = snp_boot(args.ovmf.clone(), args.igvm.clone(), config.memory_mib)?;
        config.memory_mib = memory_mib;
        config.snp = Some(parma::Snp { boot, host_data, vcpu_type: args.vcpu_type.clone() });
    } else {
        eprintln!("parma run: INSECURE emulation: no SEV-SNP; the guest emulates attestation reports");
        config.insecure_emulated_host_data = Some(host_data);
    }
    let mut qemu = config
        .command()?
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", config.qemu.display()))?;
    let result = drive_container(&control, &policy, &built, &args, &process);
    let code = match result {
        Ok(code) => {
            // The agent powers the UVM off after answering Shutdown.
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            while qemu.try_wait()?.is_none() && std::time::Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
            code
        }
        Err(err) => {
            let _ = qemu.kill();
            let _ = qemu.wait();
            let serial = std::fs::read_to_string(match &args.serial_log {
                Some(path) => path.clone(),
                None => dir.path().join("serial.log"),
            })
            .unwrap_or_default();
            return Err(err.context(format!("guest console:\n{serial}")));
        }
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    Ok(code)
}

fn drive_container(
    control: &Path,
    policy: &str,
    built: &parma_layer::Built,
    args: &RunArgs,
    process: &parma_protocol::ProcessSpec,
) -> anyhow::Result<i32> {
    let control = Control::Unix(control.to_path_buf());
    let timeout = Duration::try_from_secs_f64(args.timeout).context("bad --timeout")?;
    let mut client = wait_for_agent(&control, Duration::from_secs(120))?;
    client.set_policy(policy.to_string()).context("the agent refused the policy")?;
    if args.scratch_mib > 0 {
        client.mount_scratch(parma::run::SCRATCH_SERIAL).context("cannot set up the encrypted scratch")?;
    }
    parma::run::mount_image(&mut client, built, &args.id)?;
    let mut process = process.clone();
    process.terminal = args.tty;
    client.create_container_with(&args.id, &process, None, &args.mounts).context("cannot create the container")?;
    client.start_container(&args.id).context("cannot start the container")?;
    let _raw = if args.tty { terminal::Raw::stdin()? } else { None };
    if args.tty
        && let Some((rows, cols)) = terminal::size()
    {
        client.resize_terminal(&args.id, None, rows, cols)?;
    }
    let mut input = if args.interactive {
        Some(parma::run::Input::spawn(std::io::stdin()))
    } else {
        client.write_stdin(&args.id, None, &[], true)?;
        None
    };
    let status = parma::run::pump_with(
        &mut client,
        &args.id,
        None,
        input.as_mut(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        timeout,
    )?;
    client.delete_container(&args.id).context("cannot delete the container")?;
    parma::run::unmount_image(&mut client, built, &args.id)?;
    client.shutdown()?;
    Ok(parma::run::exit_code(&status))
}

/// Connect and ping until the agent answers (each try on a new connection:
/// a virtio-serial port has no connection boundaries).
fn wait_for_agent(control: &Control, deadline: Duration) -> anyhow::Result<Client> {
    let give_up = std::time::Instant::now() + deadline;
    loop {
        match Client::connect(control, Duration::from_secs(1)).and_then(|mut c| c.ping().map(|_| c)) {
            Ok(mut client) => {
                client.set_timeout(Duration::from_secs(60));
                return Ok(client);
            }
            Err(err) if std::time::Instant::now() >= give_up => {
                return Err(err).context("the agent did not answer");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The host's terminal for `parma run --tty`.
mod terminal {
    use std::io::IsTerminal;

    /// Raw mode on stdin until dropped (nothing when stdin is no terminal).
    pub struct Raw(nix::sys::termios::Termios);

    impl Raw {
        pub fn stdin() -> anyhow::Result<Option<Self>> {
            use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
            let stdin = std::io::stdin();
            if !stdin.is_terminal() {
                return Ok(None);
            }
            let saved = tcgetattr(&stdin)?;
            let mut raw = saved.clone();
            cfmakeraw(&mut raw);
            tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
            Ok(Some(Self(saved)))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
        }
    }

    /// The host terminal's rows and columns, as `stty size` reads them.
    pub fn size() -> Option<(u16, u16)> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let out = std::process::Command::new("stty").arg("size").stdin(std::process::Stdio::inherit()).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut words = text.split_whitespace();
        Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
    }
}
