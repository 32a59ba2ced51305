//! `parma vm run`: boot the UVM under QEMU, in the foreground.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use parma_host::qemu::shell_words;
use parma_host::{Accel, Serial, VmConfig};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot the UVM with QEMU; runs until the VM powers off and exits with QEMU's status.
    #[command(
        after_help = "Example:\n  parma vm run --uvm out/uvm --control /tmp/agent.sock --serial-log /tmp/serial.log"
    )]
    Run(VmRun),
}

#[derive(Args)]
pub struct VmRun {
    /// The UVM directory `make image` wrote.
    #[arg(long, default_value = "out/uvm")]
    uvm: PathBuf,
    /// tcg (emulation, anywhere) or kvm (real hosts).
    #[arg(long, default_value = "tcg")]
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
    /// Give the UVM a NIC on QEMU user-mode networking and forward this
    /// port of 127.0.0.1 to the guest's (HOST:GUEST[/tcp|udp], repeatable).
    /// The pod still has to configure the NIC (UpdateInterface).
    #[arg(short = 'p', long = "publish")]
    publish: Vec<parma_host::PortForward>,
    /// Or give the UVM a NIC on the network namespace at this path (one
    /// veth, as a CNI plugin leaves it): a tap there, tc-redirected to and
    /// from the veth, with the veth's MAC. Prints the UpdateInterface and
    /// UpdateRoutes requests (JSON) that configure the pod as the namespace
    /// has it.
    #[arg(long, conflicts_with_all = ["publish", "print_command"])]
    netns: Option<PathBuf>,
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

pub fn execute(command: VmCommand) -> anyhow::Result<i32> {
    match command {
        VmCommand::Run(args) => vm_run(args),
    }
}

fn vm_run(args: VmRun) -> anyhow::Result<i32> {
    let attached = match &args.netns {
        Some(path) => Some(
            parma_host::netns::attach(path)
                .with_context(|| format!("cannot attach to the network {}", path.display()))?,
        ),
        None => None,
    };
    let nic = match &attached {
        Some(attached) => {
            let requests = serde_json::json!({
                "update_interface": {"interface": &attached.interface},
                "update_routes": {"routes": &attached.routes},
            });
            eprintln!("{requests}");
            Some(parma_host::Nic { mac: attached.mac, forwards: Vec::new(), tap: Some(attached.tap.clone()) })
        }
        None => (!args.publish.is_empty()).then(|| parma_host::Nic::user(args.publish.clone())),
    };
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
        nic,
        hotplug_slots: 0,
        qmp: None,
        snp: None,
        insecure_emulated_host_data: None,
        insecure_emulated_measurement: None,
        disks: {
            let mut disks = match &args.layers {
                Some(dir) => parma_host::run::layer_disks_of(&parma_layer::LayersFile::read(dir)?, dir),
                None => Vec::new(),
            };
            if let Some(path) = &args.scratch {
                disks.push(parma_host::Disk {
                    path: path.clone(),
                    serial: parma_protocol::boot::SCRATCH_SERIAL.into(),
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
            let boot = match (args.ovmf, args.igvm) {
                (Some(ovmf), None) => parma_host::SnpBoot::KernelHashes { ovmf },
                (None, Some(igvm)) => parma_host::SnpBoot::Igvm(igvm),
                _ => anyhow::bail!("--snp needs --ovmf FILE (kernel hashes) or --igvm FILE"),
            };
            let (boot, memory_mib) = parma_host::qemu::snp_boot(boot, config.memory_mib)?;
            let snp = parma_host::Snp { boot, host_data, vcpu_type: args.vcpu_type };
            VmConfig { snp: Some(snp), memory_mib, ..config }
        }
        (false, true, Some(host_data)) => {
            tracing::warn!("INSECURE: the guest emulates SEV-SNP attestation reports");
            let measurement = parma_host::run::igvm_digest(&config.uvm);
            VmConfig {
                insecure_emulated_host_data: Some(host_data),
                insecure_emulated_measurement: measurement,
                ..config
            }
        }
        (true, _, None) | (false, true, None) => anyhow::bail!("--snp and --insecure-emulate-snp need --policy"),
        (false, false, _) => config,
    };
    let qemu_args = config.args()?;
    if args.print_command {
        println!("{}", shell_words(&config.qemu, &qemu_args));
        return Ok(0);
    }
    tracing::info!("{}", shell_words(&config.qemu, &qemu_args));
    // Become QEMU: its exit status is ours, and signals reach it directly.
    // It inherits the tap's fd; the veth's qdisc stays behind it (the next
    // attach removes it).
    if let Some(attached) = &attached {
        parma_host::netns::inherit_across_exec(&attached.tap)?;
    }
    let err = std::process::Command::new(&config.qemu).args(&qemu_args).exec();
    Err(err).with_context(|| format!("cannot run {}", config.qemu.display()))
}
