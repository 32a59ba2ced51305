//! `parma policy`: generate, hash and dry-run execution policies.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::output::print;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Generate a policy from a container image (and an optional container
    /// spec): the layers' root hashes, the command, env, working dir, user.
    #[command(
        after_help = "Example:\n  parma policy gen --oci image.tar --spec spec.json --out policy.rego\n  parma policy gen --pod pod.yaml --image nginx:1.27=nginx.tar --out pod-with-policy.yaml\n  parma policy gen --pod pod.yaml --plain-http 127.0.0.1:5000 --out pod-with-policy.yaml"
    )]
    Gen {
        /// An OCI image layout directory or a `docker save` archive.
        #[arg(long, required_unless_present = "pod", conflicts_with = "pod")]
        oci: Option<PathBuf>,
        /// The image to take (annotation org.opencontainers.image.ref.name).
        #[arg(long = "ref", conflicts_with = "pod")]
        reference: Option<String>,
        /// A container spec (JSON): name, command, env rules, mounts, user,
        /// capabilities, exec_processes, signals, no_new_privileges.
        #[arg(long, conflicts_with = "pod")]
        spec: Option<PathBuf>,
        /// Or a Kubernetes workload (Pod, Deployment, ReplicaSet,
        /// StatefulSet, DaemonSet, Job, CronJob; multi-document YAML): one
        /// policy per pod template, covering every container (init
        /// containers too); --out gets the YAML with each policy as the
        /// pod's io.parma.policy annotation.
        #[arg(long)]
        pod: Option<PathBuf>,
        /// With --pod: where an image of the YAML comes from,
        /// IMAGE=PATH[#REF] (an OCI layout or a docker save archive, and the
        /// image in it); one per image.
        #[arg(long = "image", requires = "pod")]
        images: Vec<String>,
        /// With --pod: the images no --image names are pulled from their
        /// registries (anonymously, over HTTPS) and kept here, an OCI
        /// layout per image.
        #[arg(long, requires = "pod", default_value = parma_host::run::DEFAULT_IMAGES_DIR)]
        images_dir: PathBuf,
        /// With --pod: a registry (HOST[:PORT]) to pull from over plain
        /// HTTP instead of HTTPS; one per registry.
        #[arg(long = "plain-http", requires = "pod")]
        plain_http: Vec<String>,
        /// Where the layer images go (they are built as `parma layer build`
        /// does; the same default as `parma run`, so an image is converted once).
        #[arg(long, default_value = parma_host::run::DEFAULT_LAYERS_DIR)]
        layers_dir: PathBuf,
        /// Write the policy here (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the policy's identity: sha256 of its exact bytes (what goes into HOST_DATA).
    #[command(after_help = "Example:\n  parma policy hash policy.rego")]
    Hash {
        /// The policy file (Rego).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the policy as the pod annotation a Kubernetes runtime reads:
    /// `io.parma.policy` = base64 of the gzip'd policy (deterministic).
    /// With --decode, print the policy an annotation value carries.
    #[command(
        after_help = "Example:\n  parma policy annotation policy.rego\n  parma policy annotation --decode value.txt\n  ctr run --annotation \"$(parma policy annotation --ctr policy.rego)\" ..."
    )]
    Annotation {
        /// The policy file (Rego), or with --decode a file holding the value.
        file: PathBuf,
        /// Decode an annotation value instead (refused by name when it is
        /// not base64, not gzip'd, or too large).
        #[arg(long)]
        decode: bool,
        /// Print `io.parma.policy=VALUE`, the argument `ctr run --annotation` takes.
        #[arg(long, conflicts_with = "decode")]
        ctr: bool,
    },
    /// Print a fragment issuer's id for a policy's `fragments` list: sha256
    /// of its public key (SubjectPublicKeyInfo DER).
    #[command(after_help = "Example:\n  parma policy issuer issuer.pub.der")]
    Issuer {
        /// The issuer's public key, DER (`openssl pkey -pubout -outform DER`).
        key: PathBuf,
    },
    /// Decide one request; exit 0 if allowed, 2 if denied.
    #[command(after_help = "Example:\n  parma policy eval --policy policy.rego --input request.json")]
    Eval(EvalArgs),
    /// Decide one request and explain it: every container tried and every field that failed.
    #[command(after_help = "Example:\n  parma policy explain --policy policy.rego --input request.json")]
    Explain(EvalArgs),
    /// Run a scenario of requests with expected decisions; exit non-zero on any mismatch.
    #[command(after_help = "Example:\n  parma policy simulate --policy policy.rego --scenario scenario.json")]
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
pub struct EvalArgs {
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

pub fn execute(command: PolicyCommand) -> anyhow::Result<i32> {
    match command {
        PolicyCommand::Gen { pod: Some(pod), images, images_dir, plain_http, layers_dir, out, .. } => {
            let yaml = std::fs::read_to_string(&pod).with_context(|| format!("cannot read {}", pod.display()))?;
            let registry = parma_host::registry::Registry::new(&images_dir).plain_http(&plain_http);
            let images = parma_host::kube::Images::parse(&images)?.with_registry(registry);
            let (policies, annotated) = parma_host::kube::generate_pod(&yaml, &images, &layers_dir)
                .with_context(|| format!("cannot make the policy of {}", pod.display()))?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &annotated).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{annotated}"),
            }
            for policy in &policies {
                let hash = parma_policy::policy_hash(policy.policy.as_bytes());
                eprintln!("{}: policy sha256 (HOST_DATA): {hash}", policy.workload);
            }
            Ok(0)
        }
        PolicyCommand::Gen { oci, reference, spec, layers_dir, out, .. } => {
            let oci = oci.context("--oci or --pod is needed")?;
            let text = parma_host::policy_gen::generate(&oci, reference.as_deref(), spec.as_deref(), &layers_dir)?;
            let hash = parma_policy::policy_hash(text.as_bytes());
            match out {
                Some(path) => {
                    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            eprintln!("policy sha256 (HOST_DATA): {hash}");
            Ok(0)
        }
        PolicyCommand::Issuer { key } => {
            let der = std::fs::read(&key).with_context(|| format!("cannot read {}", key.display()))?;
            let issuer = parma_policy::fragment::issuer_of(&der).with_context(|| key.display().to_string())?;
            println!("{issuer}");
            Ok(0)
        }
        PolicyCommand::Hash { file, json } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let hash = parma_policy::policy_hash(&bytes);
            print(json, &serde_json::json!({"file": file, "sha256": hash}), |_| hash.clone())
        }
        PolicyCommand::Annotation { file, decode, ctr } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            if decode {
                print!("{}", parma_host::annotation::decode(&text)?);
            } else if ctr {
                println!("{}={}", parma_host::annotation::POLICY_ANNOTATION, parma_host::annotation::encode(&text));
            } else {
                println!("{}: {}", parma_host::annotation::POLICY_ANNOTATION, parma_host::annotation::encode(&text));
            }
            Ok(0)
        }
        PolicyCommand::Eval(args) | PolicyCommand::Explain(args) if args.json => {
            let decision = crate::dry_run::eval(&args.policy, &args.input, args.state.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&decision)?);
            exit_for(&decision)
        }
        PolicyCommand::Eval(args) => {
            let decision = crate::dry_run::eval(&args.policy, &args.input, args.state.as_deref())?;
            match &decision.denial {
                None => println!("{}: allowed", decision.point),
                Some(denial) => println!("{}", denial.line()),
            }
            exit_for(&decision)
        }
        PolicyCommand::Explain(args) => {
            let decision = crate::dry_run::eval(&args.policy, &args.input, args.state.as_deref())?;
            println!("{}", crate::dry_run::explain(&decision));
            exit_for(&decision)
        }
        PolicyCommand::Simulate { policy, scenario, json } => crate::dry_run::simulate(&policy, &scenario, json),
    }
}

/// `parma policy eval` exits 2 on a denial, so scripts can tell it from an error (1).
fn exit_for(decision: &parma_policy::Decision) -> anyhow::Result<i32> {
    Ok(if decision.allowed { 0 } else { 2 })
}
