//! `parma node`: the node image (build, publish, install, uninstall) and
//! the release key that signs its reference values.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use parma_host::node::{self, image, install};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Build the node image (an OCI image layout) from a UVM and static
    /// builds of parma, the shim and the snapshotter; the same inputs give
    /// the same image digest.
    #[command(
        after_help = "Example:\n  parma node build --uvm out/uvm --bin-dir target/x86_64-unknown-linux-gnu/release \\\n    --release-key release-key.pem --ovmf qemu/ovmf/ovmf_AmdSev_suffix.bin \\\n    --ovmf-hash $(cat qemu/ovmf/ovmf_AmdSev.hash) --out out/node"
    )]
    Build(BuildArgs),
    /// Make a release key (ECDSA P-384, PKCS#8 PEM, mode 0600) and print its issuer id.
    #[command(after_help = "Example:\n  parma node keygen --out release-key.pem")]
    Keygen {
        /// Where to write the private key (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Push a node image layout to a registry (the OCI distribution API).
    #[command(
        after_help = "Example:\n  parma node publish --image out/node --to 127.0.0.1:5000/parma/node:v1 --insecure"
    )]
    Publish {
        /// The layout (`make node-image` writes out/node).
        #[arg(long)]
        image: PathBuf,
        /// Where: HOST[:PORT]/REPOSITORY:TAG.
        #[arg(long)]
        to: String,
        /// Plain HTTP to that registry (a local one).
        #[arg(long)]
        insecure: bool,
    },
    /// Install a node image on this node (or under --root): the payload,
    /// checked against the image's digests, the shim's config, the
    /// snapshotter's unit and containerd's drop-in. Idempotent.
    #[command(
        after_help = "Example:\n  parma node install --from out/node --root / --snp --restart-containerd\n  parma node install --from 127.0.0.1:5000/parma/node:v1 --plain-http 127.0.0.1:5000 --root / --insecure-emulation"
    )]
    Install(InstallArgs),
    /// Remove exactly what `install` added for a handler.
    #[command(after_help = "Example:\n  parma node uninstall --root / --handler parma-1a2b3c4d")]
    Uninstall {
        /// The node's root.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The handler to remove.
        #[arg(long)]
        handler: String,
        /// The path at which containerd sees --root (default: --root).
        #[arg(long)]
        host_path: Option<PathBuf>,
        /// containerd's config, relative to --root.
        #[arg(long, default_value = "etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// Also remove the handler's state (the snapshotter's layers, the shims' records).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Args)]
pub struct BuildArgs {
    /// The UVM directory (`make image`).
    #[arg(long, default_value = "out/uvm")]
    uvm: PathBuf,
    /// The directory with parma, containerd-shim-parma-v2 and parma-snapshotter.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The release key (ECDSA P-384, PKCS#8 or SEC1 PEM): signs the reference values.
    #[arg(long)]
    release_key: PathBuf,
    /// An OVMF (or its tail, with --ovmf-hash) whose direct boot the
    /// reference values list besides the IGVM launch.
    #[arg(long)]
    ovmf: Option<PathBuf>,
    /// The digest of the firmware pages before the tail (96 hex digits).
    #[arg(long, requires = "ovmf")]
    ovmf_hash: Option<String>,
    /// vCPU types listed (QEMU's -cpu names).
    #[arg(long = "vcpu-type", default_values_t = ["EPYC-v4".to_string()])]
    vcpu_types: Vec<String>,
    /// The least TCB the reference values accept.
    #[arg(long, default_value = "bl=3,tee=0,snp=8,ucode=115")]
    min_tcb: parma_snp::TcbVersion,
    /// The layout to write (replaced whole).
    #[arg(long, default_value = "out/node")]
    out: PathBuf,
}

#[derive(Args)]
pub struct InstallArgs {
    /// A node image layout, an unpacked image's /opt/parma, or a registry reference.
    #[arg(long)]
    from: String,
    /// Reach the --from registry over plain HTTP.
    #[arg(long)]
    plain_http: Vec<String>,
    /// The node's root.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The path at which containerd sees --root (default: --root; the
    /// DaemonSet mounts the host's / at /host and passes /).
    #[arg(long)]
    host_path: Option<PathBuf>,
    /// kvm, or tcg for development hosts.
    #[arg(long, default_value = "kvm")]
    accel: parma_host::Accel,
    /// Launch pods as SEV-SNP guests (the IGVM file); refused on a host without SNP.
    #[arg(long, conflicts_with = "insecure_emulation")]
    snp: bool,
    /// INSECURE: install on a host without SNP; pods' attestation is emulated.
    #[arg(long)]
    insecure_emulation: bool,
    /// The QEMU binary the shim runs.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The UVM's memory, MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    /// How long a UVM may take to boot, seconds (TCG hosts need more).
    #[arg(long, default_value_t = 60)]
    boot_deadline_s: u64,
    /// containerd's config, relative to --root.
    #[arg(long, default_value = "etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// containerd's socket, as containerd sees it.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// containerd's root directory, as containerd sees it.
    #[arg(long, default_value = "/var/lib/containerd")]
    containerd_root: PathBuf,
    /// Make the parma snapshotter CRI's snapshotter for every pod
    /// (containerd 1.6 has no per-runtime snapshotter: a node for parma pods only).
    #[arg(long)]
    cri_snapshotter: bool,
    /// Then reload systemd, start the snapshotter and restart containerd.
    #[arg(long)]
    restart_containerd: bool,
    /// Then wait for SIGTERM (the DaemonSet's container).
    #[arg(long)]
    wait: bool,
}

pub fn execute(command: NodeCommand) -> anyhow::Result<i32> {
    match command {
        NodeCommand::Build(args) => build(args),
        NodeCommand::Keygen { out } => keygen(&out),
        NodeCommand::Publish { image, to, insecure } => {
            let layout = image::Layout::open(&image).with_context(|| format!("cannot read {}", image.display()))?;
            let digest = node::publish::publish(&layout, &to, insecure)?;
            println!("{to}@{digest}");
            Ok(0)
        }
        NodeCommand::Install(args) => install_command(args),
        NodeCommand::Uninstall { root, handler, host_path, containerd_config, purge } => {
            let mut options = install::Options::new(&root);
            options.host_path = host_path.unwrap_or(root);
            options.containerd_config = containerd_config;
            install::uninstall(&options, &handler, purge)?;
            println!("removed {handler}");
            Ok(0)
        }
    }
}

fn build(args: BuildArgs) -> anyhow::Result<i32> {
    let key = load_key(&args.release_key)?;
    let inputs = image::Inputs {
        uvm: args.uvm,
        binaries: args.bin_dir,
        key,
        ovmf: args.ovmf.map(|ovmf| (ovmf, args.ovmf_hash)),
        vcpu_types: args.vcpu_types,
        min_tcb: args.min_tcb,
    };
    let built = image::build(&inputs, &args.out)?;
    let issuer = parma_snp::reference::issuer_id(
        inputs.key.verifying_key().to_public_key_der().context("the release key")?.as_bytes(),
    );
    println!("handler: {}", built.handler);
    println!("image: {} ({})", args.out.display(), built.digest);
    println!("reference values: {} (issuer {issuer})", args.out.join(node::REFERENCE_VALUES).display());
    Ok(0)
}

/// A P-384 private key from PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`).
fn load_key(path: &Path) -> anyhow::Result<p384::ecdsa::SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let secret = p384::SecretKey::from_pkcs8_pem(&text)
        .or_else(|_| p384::SecretKey::from_sec1_pem(&text))
        .map_err(|_| anyhow::anyhow!("{} is not an ECDSA P-384 private key in PEM", path.display()))?;
    Ok(p384::ecdsa::SigningKey::from(secret))
}

fn keygen(out: &Path) -> anyhow::Result<i32> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut random = std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    let secret = loop {
        let mut bytes = zeroize::Zeroizing::new([0u8; 48]);
        random.read_exact(bytes.as_mut())?;
        // Below the group order: almost always.
        if let Ok(secret) = p384::SecretKey::from_slice(bytes.as_ref()) {
            break secret;
        }
    };
    let pem = secret.to_pkcs8_pem(p384::pkcs8::LineEnding::LF).context("cannot encode the key")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    file.write_all(pem.as_bytes())?;
    let public = secret.public_key().to_public_key_der().context("cannot encode the public key")?;
    println!("{}", parma_snp::reference::issuer_id(public.as_bytes()));
    Ok(0)
}

fn install_command(args: InstallArgs) -> anyhow::Result<i32> {
    let from = Path::new(&args.from);
    let payload = if from.join("index.json").is_file() {
        image::Layout::open(from)?.payload()?
    } else if from.join(node::PAYLOAD_FILE).is_file() {
        image::payload_from_dir(from)?
    } else if from.exists() {
        anyhow::bail!(
            "{} is neither a node image layout (index.json) nor an unpacked payload ({})",
            from.display(),
            node::PAYLOAD_FILE
        );
    } else {
        let dir = tempfile::Builder::new().prefix("parma-node-").tempdir()?;
        let registry = parma_host::registry::Registry::new(dir.path()).plain_http(&args.plain_http);
        let layout = registry.pull(&args.from)?;
        image::Layout::open(&layout)?.payload()?
    };
    let mut options = install::Options::new(&args.root);
    options.host_path = args.host_path.unwrap_or_else(|| args.root.clone());
    options.accel = args.accel;
    options.snp = args.snp;
    options.insecure_emulation = args.insecure_emulation;
    options.qemu = args.qemu;
    options.memory_mib = args.memory_mib;
    options.boot_deadline_s = args.boot_deadline_s;
    options.containerd_config = args.containerd_config;
    options.containerd_socket = args.containerd_socket;
    options.containerd_root = args.containerd_root;
    options.cri_snapshotter = args.cri_snapshotter;
    let installed = install::install(&payload, &options)?;
    println!("installed {} in {}", installed.handler, installed.dir.display());
    println!("snapshotter unit: {}", installed.unit.display());
    println!("containerd drop-in: {}", installed.drop_in.display());
    if !args.snp {
        println!("WARNING: pods of {} run with INSECURE emulated attestation", installed.handler);
    }
    if args.restart_containerd {
        install::restart_containerd(&options, &installed.handler)?;
        println!("containerd restarted with runtime handler {}", installed.handler);
    }
    if args.wait {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, stop.clone())?;
        }
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    Ok(0)
}
