//! What every command shares: printing a result as text or JSON, reading
//! JSON files, durations on the command line, progress lines.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

/// Print `value` as pretty JSON, or as the line `human` makes of it.
pub fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", human(value));
    }
    Ok(0)
}

/// A JSON file as `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// A duration: `30s`, `2m`, `1h 30m`, `250ms`, or plain seconds (`0.5`).
pub fn duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.trim().parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|err| format!("{text:?}: {err}"));
    }
    humantime::parse_duration(text).map_err(|err| format!("{text:?} is not a duration like 30s or 2m: {err}"))
}

/// Progress lines on stderr: only on a terminal, and never with `--quiet`
/// or `--json` (scripts read stdout; logs stay clean).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    on: bool,
}

impl Progress {
    /// Progress for a command run with these flags.
    pub fn new(quiet: bool) -> Self {
        Self { on: !quiet && std::io::stderr().is_terminal() }
    }

    /// A line of its own.
    pub fn line(&self, text: &str) {
        if self.on {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
    }

    /// A layer conversion event: a line per layer, a counter that rewrites itself.
    pub fn layer(&self, event: &parma_layer::Progress) {
        if !self.on {
            return;
        }
        let mut err = std::io::stderr().lock();
        let mib = |bytes: u64| bytes as f64 / 1048576.0;
        let _ = match event {
            parma_layer::Progress::Layer { index, count, diff_id, .. } => {
                writeln!(err, "layer {}/{count} {diff_id}", index + 1)
            }
            parma_layer::Progress::Read { read, size, .. } => {
                write!(err, "\r  {:>6.1} of {:.1} MiB", mib(*read), mib(*size))
            }
            parma_layer::Progress::Hashing { .. } => write!(err, "\r  hashing the verity tree          "),
            parma_layer::Progress::Done { file_size, .. } => {
                writeln!(err, "\r  done: {:.1} MiB image              ", mib(*file_size))
            }
            parma_layer::Progress::Reused { .. } => writeln!(err, "  same as an earlier layer: reused"),
            parma_layer::Progress::Cached { index } => writeln!(err, "layer {}: built before, reused", index + 1),
            _ => Ok(()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("0.2").unwrap(), Duration::from_millis(200));
        assert_eq!(duration("60").unwrap(), Duration::from_secs(60));
        assert!(duration("soon").unwrap_err().contains("not a duration"));
        assert!(duration("-1").is_err());
    }
}
