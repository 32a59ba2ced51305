//! `containerd-shim-parma-v2`: see the library's documentation.

use std::io::Write as _;
use std::process::ExitCode;

use parma_shim::bootstrap::{self, Action, Args};

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(err) => {
            // Not eprintln!: stderr may be a FIFO nobody reads any more.
            let _ = writeln!(std::io::stderr(), "containerd-shim-parma-v2: {err}");
            return ExitCode::from(2);
        }
    };
    let result = match args.action {
        Action::Version => {
            println!("containerd-shim-parma-v2 {} ({})", env!("CARGO_PKG_VERSION"), parma_shim::RUNTIME);
            Ok(())
        }
        Action::Start => bootstrap::start(&args),
        Action::Delete => bootstrap::delete(&args),
        Action::Serve => bootstrap::serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "containerd-shim-parma-v2: {err:#}");
            ExitCode::FAILURE
        }
    }
}
