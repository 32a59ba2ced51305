//! The agent's log, and whether the host may read it.
//!
//! The agent logs to its stderr, which init made the console: the host reads
//! it. Until a policy is in force the log holds nothing of the tenant's;
//! once one is, its `runtime_logging` rule decides whether the agent keeps
//! logging. When it may not, the agent writes nothing more (a panic says
//! only that it happened) and turns the kernel's console messages down to
//! emergencies, so OOM kills, device-mapper errors and the like do not
//! reach the host either.
//!
//! The switch is one process-wide flag: the log itself is process-wide
//! (tracing's subscriber), and the flag only ever goes from on to off.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the console may still get the agent's log.
static CONSOLE: AtomicBool = AtomicBool::new(true);

/// The kernel's console log level once logging is off: `KERN_EMERG` only.
const QUIET_PRINTK: &str = "1";

/// Whether the agent may write its log to the console.
pub fn enabled() -> bool {
    CONSOLE.load(Ordering::Relaxed)
}

/// stderr while logging is on; nothing once the policy turned it off.
#[derive(Debug, Clone, Copy)]
pub struct Console;

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if enabled() { std::io::stderr().write(buf) } else { Ok(buf.len()) }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Log through [`Console`].
pub fn init() {
    tracing_subscriber::fmt().with_writer(|| Console).with_ansi(false).without_time().with_target(false).init();
}

/// Act on the policy's `runtime_logging` decision.
pub fn apply_policy(allowed: bool) {
    if allowed {
        return;
    }
    tracing::info!("the policy does not allow runtime logging: the agent logs nothing more");
    CONSOLE.store(false, Ordering::Relaxed);
    if let Err(err) = std::fs::write("/proc/sys/kernel/printk", QUIET_PRINTK) {
        // Said once on stderr directly: the host learns only that this failed.
        let _ = writeln!(std::io::stderr(), "parma-agent: cannot quiet the kernel's console messages: {err}");
    }
}

/// The panic hook: a panic is always reported (init then powers off), its
/// message only while logging is on.
pub fn panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let mut stderr = std::io::stderr();
    let _ = if enabled() {
        writeln!(stderr, "parma-agent: internal error: {info}")
    } else {
        writeln!(stderr, "parma-agent: internal error (details withheld: the policy does not allow runtime logging)")
    };
}
