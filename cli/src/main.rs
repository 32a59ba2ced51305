//! `parma`: the host CLI of Parma.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
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
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the policy's identity: sha256 of its exact bytes (what goes into HOST_DATA).
    Hash {
        /// The policy file (Rego).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Print the QEMU command line instead of running it.
    #[arg(long)]
    print_command: bool,
}

#[derive(Args)]
struct AgentArgs {
    /// The agent: a unix socket path (virtio-serial), or vsock:CID[:PORT].
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
    /// Install the execution policy (once per boot); prints its sha256.
    SetPolicy {
        #[command(flatten)]
        agent: AgentArgs,
        /// The policy file (Rego).
        policy: PathBuf,
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
    }
}

fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
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
    }
}
