//! The boot benchmark's floor: a trivial static `/init` that prints a marker
//! and powers off. Boot time to this marker is the least any init can do.

use nix::sys::reboot::{RebootMode, reboot};

/// The marker the benchmark waits for on the serial console.
const MARKER: &str = "parma-floor: userspace reached";

fn main() {
    // No devtmpfs yet: the kernel opened /dev/console from the initrd for us.
    eprintln!("{MARKER}");
    let Err(err) = reboot(RebootMode::RB_POWER_OFF);
    eprintln!("parma-floor: power off failed: {err}");
    loop {
        std::thread::park();
    }
}
