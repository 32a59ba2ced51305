//! `parma agent`: one request to the guest agent per command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use parma_host::{Client, Control};

use crate::output::{duration, print, read_json};

#[derive(Args)]
pub struct AgentArgs {
    /// The agent: a unix socket path (virtio-serial), vsock:CID[:PORT], or
    /// vsock-uds:PATH[:PORT] (a hybrid-vsock unix socket).
    #[arg(long, env = "PARMA_CONTROL")]
    control: Control,
    /// How long to wait for the agent, connecting and for each answer
    /// (`30s`, `2m`, or seconds).
    #[arg(long, default_value = "30s", value_parser = duration)]
    timeout: Duration,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Check the agent answers; print its versions and uptime.
    #[command(after_help = "Example:\n  parma agent ping --control /tmp/agent.sock")]
    Ping(AgentArgs),
    /// Print what the guest has: memory, CPUs, mounts, SEV devices.
    #[command(after_help = "Example:\n  parma agent info --control /tmp/agent.sock --json")]
    Info(AgentArgs),
    /// Power the UVM off.
    #[command(after_help = "Example:\n  parma agent shutdown --control /tmp/agent.sock")]
    Shutdown(AgentArgs),
    /// Get an SEV-SNP attestation report binding REPORT_DATA; write it to a file.
    #[command(
        after_help = "Example:\n  parma agent attest --control /tmp/agent.sock --report-data 00ff --out report.bin"
    )]
    Attest {
        #[command(flatten)]
        agent: AgentArgs,
        /// Data to bind, in hex (up to 64 bytes; e.g. the hash of a public
        /// key). The report's REPORT_DATA is its SHA-512 in the host's domain.
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
    #[command(after_help = "Example:\n  parma agent set-policy --control /tmp/agent.sock policy.rego")]
    SetPolicy {
        #[command(flatten)]
        agent: AgentArgs,
        /// The policy file (Rego).
        policy: PathBuf,
    },
    /// Open a layer disk through dm-verity and mount it (policy: mount_device).
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent mount-layer --name l0 --serial parma-l0 --root-hash HASH --hash-offset 4096000"
    )]
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
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent unmount-layer --name l0")]
    UnmountLayer {
        #[command(flatten)]
        agent: AgentArgs,
        /// The layer's name.
        #[arg(long)]
        name: String,
    },
    /// Stack mounted layers (base first) as a container's root (policy: mount_overlay, scratch_mount).
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent mount-overlay --id c0 --layers l0,l1"
    )]
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
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent mount-scratch --serial parma-scratch"
    )]
    MountScratch {
        #[command(flatten)]
        agent: AgentArgs,
        /// The disk's virtio-blk serial (`parma vm run --scratch` uses parma-scratch).
        #[arg(long, default_value = parma_protocol::boot::SCRATCH_SERIAL)]
        serial: String,
    },
    /// Unmount a container's overlay (policy: unmount_overlay).
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent unmount-overlay --id c0")]
    UnmountOverlay {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Create a container on its overlay (policy: create_container).
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent create --id c0 --config out/layers/config.json"
    )]
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
        #[arg(long = "mount", value_parser = parma_host::run::parse_mount)]
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
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent update --id c0 --memory-max 268435456"
    )]
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
    /// Have the agent fetch a secret from a key broker into a created
    /// container's /dev/parma/secrets/FILE before it starts (policy:
    /// release_secret). The agent attests to the broker itself over TLS it
    /// ends, through the host's relay (`parma kbs relay`).
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent provision-secret --id c0 \\\n    \
                            --broker-url https://kbs.example:8080 --certificate-sha256 HEX \\\n    \
                            --resource default/db/password --file db")]
    ProvisionSecret {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
        /// The broker, https://HOST[:PORT], as the policy lists it.
        #[arg(long)]
        broker_url: String,
        /// SHA-256 of the broker's TLS certificate (DER), as the policy pins it.
        #[arg(long)]
        certificate_sha256: String,
        /// The resource, REPO/TYPE/TAG.
        #[arg(long)]
        resource: String,
        /// The file name in /dev/parma/secrets/.
        #[arg(long)]
        file: String,
        /// Reach the broker at IP:PORT over the pod's network instead of
        /// the host's relay (the UVM must be a pod with its interface up).
        #[arg(long)]
        broker_address: Option<String>,
    },
    /// Start a created container.
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent start --id c0")]
    Start {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Run another process in a running container (policy: exec_in_container).
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent exec --id c0 --exec-id probe1 --process probe.json"
    )]
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
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent resize --id c0 --rows 40 --cols 120")]
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
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent signal --id c0 --signal 15")]
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
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent wait --id c0 --json")]
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
    #[command(after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent delete --id c0")]
    Delete {
        #[command(flatten)]
        agent: AgentArgs,
        /// The container's id.
        #[arg(long)]
        id: String,
    },
    /// Add a signed fragment's containers to the policy in force (policy:
    /// load_fragment, after the issuer's signature checked).
    #[command(
        after_help = "Example:\n  PARMA_CONTROL=/tmp/agent.sock parma agent load-fragment --fragment f.json --signature f.sig --key issuer.der"
    )]
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

/// A connection the agent has answered a ping on (see `Client::connect_in_step`).
fn connect(args: &AgentArgs) -> anyhow::Result<Client> {
    Ok(Client::connect_in_step(&args.control, args.timeout)?.0)
}

pub fn execute(command: AgentCommand) -> anyhow::Result<i32> {
    match command {
        AgentCommand::Ping(args) => {
            let (_, info) = Client::connect_in_step(&args.control, args.timeout)?;
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
            // What the agent put into REPORT_DATA: the data in the host's domain.
            let mut padded = [0u8; 64];
            padded.iter_mut().zip(&data).for_each(|(d, s)| *d = *s);
            let bound = hex::encode(parma_snp::report_data::Domain::Host.report_data(&padded));
            let value = serde_json::json!({"report": out, "provider": provider, "report_data": bound});
            print(args.json, &value, |_| {
                format!(
                    "wrote {} ({} bytes, {provider}); REPORT_DATA {bound} (check with --expect-report-data host:{report_data})",
                    out.display(),
                    report.len()
                )
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
                    parma_host::run::process_from_config(&config, &command)?
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
        AgentCommand::ProvisionSecret {
            agent: args,
            id,
            broker_url,
            certificate_sha256,
            resource,
            file,
            broker_address,
        } => {
            let mut client = connect(&args)?;
            client.provision_secret(
                &id,
                &broker_url,
                &certificate_sha256,
                &resource,
                &file,
                broker_address.as_deref(),
            )?;
            let value = serde_json::json!({"container": id, "resource": resource, "file": file});
            print(args.json, &value, |_| format!("{resource} is in container {id}'s /dev/parma/secrets/{file}"))
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
            let status = parma_host::run::pump(
                &mut client,
                &id,
                exec_id.as_deref(),
                &mut std::io::stdout(),
                &mut std::io::stderr(),
                Duration::from_secs(24 * 3600),
            )?;
            let code = parma_host::run::exit_code(&status);
            if args.json {
                // After the process's output, the last line on stdout.
                let json = serde_json::json!({"exit_code": status.exit_code, "signal": status.signal, "code": code});
                println!("{json}");
            }
            Ok(code)
        }
        AgentCommand::Delete { agent: args, id } => {
            connect(&args)?.delete_container(&id)?;
            print(args.json, &serde_json::json!({"deleted": id}), |_| format!("container {id} deleted"))
        }
        AgentCommand::LoadFragment { agent: args, fragment, signature, key } => {
            let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
            let loaded = connect(&args)?.load_fragment(&read(&fragment)?, &read(&signature)?, &read(&key)?)?;
            print(args.json, &loaded, |l| {
                format!(
                    "fragment {} (svn {}) of issuer {} added {} container(s)",
                    l.feed, l.svn, l.issuer, l.containers
                )
            })
        }
    }
}
