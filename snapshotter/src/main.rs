//! `parma-snapshotter`: see the library's documentation.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use parma_snapshotter::{content::Content, service::Service, store::Store};

/// A containerd proxy snapshotter converting pulled layers into ext4 + dm-verity images.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where snapshots and layer images are kept.
    #[arg(long, default_value = "/var/lib/parma-snapshotter")]
    root: PathBuf,
    /// The socket containerd's `proxy_plugins` names.
    #[arg(long, default_value = "/run/parma-snapshotter/snapshotter.sock")]
    socket: PathBuf,
    /// containerd's socket (its content store holds the pulled blobs).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// containerd's content directory (ROOT/io.containerd.content.v1.content):
    /// blobs are read from their files there instead of through the API
    /// (faster; the converter checks every blob's digest either way).
    #[arg(long)]
    content_dir: Option<PathBuf>,
    /// The containerd namespace whose content is read (CRI's is k8s.io).
    #[arg(long, default_value = "k8s.io")]
    namespace: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A log whose reader went away must not become a panic.
        .log_internal_errors(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let store = Store::open(&args.root)?;
        // containerd may start after the snapshotter: connect lazily.
        let containerd = args.containerd.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?.connect_with_connector_lazy(
            tower::service_fn(move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(containerd.clone())),
        );
        let mut content = Content::new(channel, &args.namespace);
        if let Some(dir) = &args.content_dir {
            content = content.with_local(dir);
        }
        let service = Service::new(&args.root, store, content);
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&args.socket);
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
        tracing::info!("serving {}", args.socket.display());
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tonic::transport::Server::builder()
            .add_service(containerd_snapshots::server(std::sync::Arc::new(service)))
            .serve_with_incoming_shutdown(incoming, async move {
                terminate.recv().await;
            })
            .await?;
        let _ = std::fs::remove_file(&args.socket);
        anyhow::Ok(())
    })
}
