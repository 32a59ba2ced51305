//! `parma layer build`: an image's layers as ext4 + dm-verity images.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::output::Progress;

#[derive(Subcommand)]
pub enum LayerCommand {
    /// Write each layer of an image as ext4 + dm-verity (DIR/<diff-id>.img),
    /// DIR/layers.json (root hashes) and DIR/config.json (for the policy generator).
    #[command(after_help = "Example:\n  parma layer build --oci image.tar --out out/layers")]
    Build {
        /// An OCI image layout directory or a `docker save` archive.
        #[arg(long)]
        oci: PathBuf,
        /// The image to take (annotation org.opencontainers.image.ref.name); default: the only one.
        #[arg(long = "ref")]
        reference: Option<String>,
        /// The output directory (the one `parma policy gen` and `parma run` use by default).
        #[arg(long, default_value = parma_host::run::DEFAULT_LAYERS_DIR)]
        out: PathBuf,
        /// Print layers.json to stdout.
        #[arg(long)]
        json: bool,
        /// No progress lines (they go to stderr, on a terminal only).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
}

pub fn execute(command: LayerCommand) -> anyhow::Result<i32> {
    match command {
        LayerCommand::Build { oci, reference, out, json, quiet } => {
            layer_build(&oci, reference.as_deref(), &out, json, quiet)
        }
    }
}

fn layer_build(oci: &Path, reference: Option<&str>, out: &Path, json: bool, quiet: bool) -> anyhow::Result<i32> {
    let progress = Progress::new(quiet || json);
    let built = parma_layer::build(oci, reference, out, &|event| progress.layer(&event))
        .with_context(|| format!("cannot build the layers of {}", oci.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&built.layers)?);
    } else {
        for layer in &built.layers.layers {
            println!("{}  {}", layer.root_hash, layer.file);
        }
        println!("wrote {} and {}", built.layers_json.display(), built.config_json.display());
    }
    Ok(0)
}
