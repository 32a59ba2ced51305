//! Stands in for the agent in a test initrd: says it is there, then exits
//! with status 42, so the test sees init power the VM off with the reason.

fn main() {
    eprintln!("dying-agent: exiting with status 42");
    std::process::exit(42);
}
