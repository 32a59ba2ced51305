//! `parma`: the host CLI of Parma.
//!
//! Argument parsing and output only; the work is in `parma-host` (and the
//! crates below it). Each command is a module of [`commands`].

mod commands;
mod dry_run;
mod output;
mod terminal;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "parma",
    version,
    about = "Confidential containers with attested execution policies",
    after_help = "Example:\n  parma run --policy policy.rego --oci image/ -- /bin/echo hello\n\n\
                  parma run exits as docker run: 125 when parma fails, 126 when the command cannot run\n\
                  (denied by the policy included), 127 when it is not found, else the container's code."
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let code = match commands::execute(Cli::parse().command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("parma: {err:#}");
            1
        }
    };
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
