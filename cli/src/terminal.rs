//! The host's terminal and signals for `parma run`: raw mode while the
//! container has the terminal, its size, and Ctrl-C, SIGTERM and window
//! changes passed on to the container's process.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parma_host::run::Forward;

/// Raw mode on stdin until dropped (nothing when stdin is no terminal).
pub struct Raw(nix::sys::termios::Termios);

impl Raw {
    /// Put stdin in raw mode, if it is a terminal.
    pub fn stdin() -> anyhow::Result<Option<Self>> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(Some(Self(saved)))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

/// The host terminal's rows and columns (TIOCGWINSZ on stdin).
pub fn size() -> Option<(u16, u16)> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    let size = rustix::termios::tcgetwinsize(&stdin).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// What the host passes on to `parma run`'s container: with a terminal,
/// its size whenever it changes (SIGWINCH); without raw mode, Ctrl-C and
/// SIGTERM as signals (in raw mode Ctrl-C is a byte the container's
/// terminal turns into SIGINT itself). A second Ctrl-C before the first
/// was passed on stops `parma` the default way.
pub struct HostForward {
    tty: bool,
    size: Option<(u16, u16)>,
    winch: Arc<AtomicBool>,
    signals: Vec<(i32, Arc<AtomicBool>)>,
}

impl HostForward {
    /// Watch the host's signals; `tty`: the container's process has a terminal.
    pub fn install(tty: bool) -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};
        let winch = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(SIGWINCH, Arc::clone(&winch))?;
        let mut signals = Vec::new();
        for signal in [SIGINT, SIGTERM] {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register_conditional_default(signal, Arc::clone(&flag))?;
            signal_hook::flag::register(signal, Arc::clone(&flag))?;
            signals.push((signal, flag));
        }
        Ok(Self { tty, size: if tty { size() } else { None }, winch, signals })
    }
}

impl Forward for HostForward {
    fn window_size(&mut self) -> Option<(u16, u16)> {
        if self.tty && self.winch.swap(false, Ordering::Relaxed) {
            self.size = size().or(self.size);
        }
        self.size
    }

    fn take_signal(&mut self) -> Option<i32> {
        self.signals.iter().find(|(_, flag)| flag.swap(false, Ordering::Relaxed)).map(|(signal, _)| *signal)
    }
}
