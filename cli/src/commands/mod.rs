//! The commands of `parma`, one module each (as cargo and youki lay theirs
//! out): each has its arguments and a function that runs it and returns
//! the exit code.

mod agent;
mod kbs;
mod layer;
mod measure;
mod node;
mod policy;
mod run;
mod verify;
mod vm;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Boot and manage the utility VM.
    #[command(subcommand, after_help = "Example:\n  parma vm run --uvm out/uvm --control /tmp/agent.sock")]
    Vm(vm::VmCommand),
    /// Talk to the guest agent.
    #[command(subcommand, after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent ping")]
    Agent(agent::AgentCommand),
    /// Generate, hash and dry-run execution policies on the host.
    #[command(subcommand, after_help = "Example:\n  parma policy gen --oci image.tar --out policy.rego")]
    Policy(policy::PolicyCommand),
    /// Turn container images into dm-verity protected ext4 layers.
    #[command(subcommand, after_help = "Example:\n  parma layer build --oci image.tar")]
    Layer(layer::LayerCommand),
    /// Compute the expected SEV-SNP launch digest of a UVM.
    #[command(after_help = "Example:\n  parma measure --uvm out/uvm --ovmf qemu/ovmf/ovmf_AmdSev_suffix.bin \
                            --ovmf-hash $(cat qemu/ovmf/ovmf_AmdSev.hash)")]
    Measure(measure::MeasureArgs),
    /// Verify an SEV-SNP attestation report: AMD's chain, the signature, the
    /// TCB, the policy, and what you expect; exit 0 only if every check passes.
    #[command(after_help = "Example:\n  parma verify --report report.bin --vcek vcek.der \
                            --expect-host-data $(parma policy hash policy.rego)")]
    Verify(verify::VerifyArgs),
    /// Run a container image in a fresh UVM under an execution policy:
    /// boot, set the policy, mount the verity layers, create, start, stream
    /// output, exit with the container's code.
    #[command(after_help = run::AFTER_HELP)]
    Run(run::RunArgs),
    /// The node image: build it, publish it to a registry, install it on a
    /// node as a containerd runtime handler, uninstall it.
    #[command(
        subcommand,
        after_help = "Example:\n  parma node install --from out/node --root / --snp --restart-containerd"
    )]
    Node(node::NodeCommand),
    /// Secrets from a key broker (Trustee's KBS protocol): the relay the
    /// agent's exchange goes through, and what to register in Trustee.
    #[command(
        subcommand,
        after_help = "Example:\n  parma kbs reference-values --values out/node/reference-values.json --policy policy.rego"
    )]
    Kbs(kbs::KbsCommand),
}

/// Run `command`; its exit code.
pub fn execute(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Vm(command) => vm::execute(command),
        Command::Agent(command) => agent::execute(command),
        Command::Policy(command) => policy::execute(command),
        Command::Layer(command) => layer::execute(command),
        Command::Measure(args) => measure::execute(args),
        Command::Verify(args) => verify::execute(args),
        Command::Run(args) => Ok(run::execute(args)),
        Command::Node(command) => node::execute(command),
        Command::Kbs(command) => kbs::execute(command),
    }
}
