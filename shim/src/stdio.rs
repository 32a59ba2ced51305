//! A process's stdio between the agent and containerd's FIFOs: one thread
//! per running process copies what the agent holds of its output to the
//! stdout and stderr FIFOs and notices its exit; another feeds the stdin
//! FIFO to it. Both end with the process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parma_host::ClientError;
use parma_host::client::ProcessStatus;
use parma_protocol::{ErrorCode, OutputStream};

use crate::pod::Pod;

/// containerd's names for a process's stdio (FIFO paths, or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paths {
    /// Its stdin FIFO.
    pub stdin: String,
    /// Its stdout FIFO.
    pub stdout: String,
    /// Its stderr FIFO.
    pub stderr: String,
    /// On a terminal (output on stdout only).
    pub terminal: bool,
}

/// The longest wait between two polls of an idle process.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// The first wait after output.
const BUSY_POLL: Duration = Duration::from_millis(5);
/// How long output is still copied after the process exited.
const EXIT_DRAIN: Duration = Duration::from_secs(2);

/// Open where output goes: a FIFO or file path, or `file://PATH`; none for
/// an empty name. A FIFO's reader (containerd) is already there.
fn open_sink(name: &str) -> std::io::Result<Option<File>> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Some(path) = name.strip_prefix("file://") {
        return std::fs::OpenOptions::new().append(true).create(true).open(path).map(Some);
    }
    if name.contains("://") {
        return Err(std::io::Error::other(format!("{name}: only FIFOs and file:// are supported")));
    }
    // Read and write, as runc's shim opens it: the open never waits for a
    // reader, and a reader that goes away (containerd restarting) does not
    // make writes fail for good.
    std::fs::OpenOptions::new().read(true).write(true).open(name).map(Some)
}

/// Copy `id`'s (or its exec's) output to `paths` until it exited and its
/// streams ended; returns how it ended. An agent that stops answering ends
/// the copy with that error.
pub fn pump(pod: &Pod, id: &str, exec_id: Option<&str>, paths: &Paths) -> Result<ProcessStatus, ClientError> {
    let mut sinks = [OutputStream::Stdout, OutputStream::Stderr].map(|stream| {
        let name = match stream {
            OutputStream::Stdout => &paths.stdout,
            OutputStream::Stderr => &paths.stderr,
        };
        match open_sink(name) {
            Ok(sink) => sink,
            Err(err) => {
                tracing::warn!("{id}: cannot open {name}: {err}; the output is dropped");
                None
            }
        }
    });
    let mut open = [true, !paths.terminal];
    let mut pause = BUSY_POLL;
    // Once the process exited, its output is drained for a while more; a
    // child it left holding the streams does not hide the exit.
    let mut exited: Option<(ProcessStatus, std::time::Instant)> = None;
    let mut polls: u32 = 0;
    loop {
        let mut progress = false;
        for ((stream, open), sink) in
            [OutputStream::Stdout, OutputStream::Stderr].into_iter().zip(open.iter_mut()).zip(sinks.iter_mut())
        {
            if !*open {
                continue;
            }
            let (data, eof) = match pod.with_client(|client| client.read_output(id, exec_id, stream)) {
                Ok(read) => read,
                // The policy keeps the output from the host: nothing to copy.
                Err(err) if err.code() == Some(ErrorCode::PolicyDenied) => (Vec::new(), true),
                // A slow answer is not the end of the process.
                Err(ClientError::Timeout(_)) => (Vec::new(), false),
                Err(err) => return Err(err),
            };
            progress |= !data.is_empty();
            if let Some(file) = sink
                && !data.is_empty()
                && let Err(err) = file.write_all(&data)
            {
                tracing::warn!("{id}: the output's reader went away: {err}");
                *sink = None;
            }
            *open = !eof;
        }
        polls = polls.wrapping_add(1);
        if exited.is_none() && (open == [false, false] || polls.is_multiple_of(8)) {
            match pod.with_client(|client| client.wait_process(id, exec_id)) {
                Ok(status) if !status.running => exited = Some((status, std::time::Instant::now())),
                Ok(_) | Err(ClientError::Timeout(_)) => {}
                Err(err) => return Err(err),
            }
        }
        if let Some((status, at)) = exited
            && (open == [false, false] || at.elapsed() > EXIT_DRAIN)
        {
            return Ok(status);
        }
        pause = if progress { BUSY_POLL } else { (pause * 2).min(IDLE_POLL) };
        std::thread::sleep(pause);
    }
}

/// Feed the stdin FIFO at `path` to the process on a thread of its own,
/// closing its stdin at the FIFO's end; with no FIFO its stdin is closed
/// now.
pub fn feed_stdin(pod: Arc<Pod>, id: String, exec_id: Option<String>, path: String) {
    let close = |pod: &Pod, id: &str, exec_id: Option<&str>| match pod
        .with_client(|client| client.write_stdin(id, exec_id, &[], true))
    {
        Ok(_) => {}
        Err(err) if matches!(err.code(), Some(ErrorCode::StdinClosed | ErrorCode::WrongState)) => {}
        Err(err) => tracing::warn!("{id}: cannot close stdin: {err}"),
    };
    if path.is_empty() {
        close(&pod, &id, exec_id.as_deref());
        return;
    }
    std::thread::spawn(move || {
        let exec_id = exec_id.as_deref();
        // Opening a FIFO's read end blocks until a writer comes; containerd
        // holds the write end already. O_NONBLOCK only for the open.
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(Path::new(&path));
        let mut file = match file.and_then(|file| {
            clear_nonblocking(&file)?;
            Ok(file)
        }) {
            Ok(file) => file,
            Err(err) => {
                tracing::warn!("{id}: cannot open stdin {path}: {err}");
                close(&pod, &id, exec_id);
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!("{id}: reading stdin: {err}");
                    0
                }
            };
            let Some(mut pending) = buf.get(..n) else { return };
            if pending.is_empty() {
                close(&pod, &id, exec_id);
                return;
            }
            while !pending.is_empty() {
                match pod.with_client(|client| client.write_stdin(&id, exec_id, pending, false)) {
                    Ok(written) => {
                        let written = usize::try_from(written).unwrap_or(usize::MAX).min(pending.len());
                        pending = pending.get(written..).unwrap_or_default();
                        if written == 0 {
                            std::thread::sleep(BUSY_POLL * 4);
                        }
                    }
                    // It closed its stdin or exited: it takes no more.
                    Err(_) => return,
                }
            }
        }
    });
}

fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_are_fifos_files_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_sink("").unwrap().is_none());
        let log = dir.path().join("log");
        open_sink(&format!("file://{}", log.display())).unwrap().unwrap().write_all(b"x").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"x");
        assert!(open_sink("binary:///usr/bin/logger").unwrap_err().to_string().contains("only FIFOs"));
    }
}
