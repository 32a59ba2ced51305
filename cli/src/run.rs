//! The steps of `parma run`, each one agent request: attach the image's
//! verity layers as disks, mount them, stack the overlay, create and start
//! the container, pump its stdio, tear it down. Tests and benchmarks use the
//! same functions.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parma_layer::{Built, ImageConfig};
use parma_protocol::{CapabilitySets, OutputStream, ProcessSpec};

use crate::client::{Client, ClientError, ProcessStatus};
use crate::policy_gen::DEFAULT_CAPABILITIES;
use crate::qemu::Disk;

/// The guest's name for layer `index` (base layer 0).
pub fn layer_name(index: usize) -> String {
    format!("l{index}")
}

/// The virtio-blk serial of layer `index`'s disk.
pub fn layer_serial(index: usize) -> String {
    format!("parma-l{index}")
}

/// The virtio-blk serial of the scratch disk.
pub const SCRATCH_SERIAL: &str = "parma-scratch";

/// The read-only disks of an image's layers, base first.
pub fn layer_disks(built: &Built, layers_dir: &Path) -> Vec<Disk> {
    built
        .layers
        .layers
        .iter()
        .enumerate()
        .map(|(index, layer)| Disk { path: layers_dir.join(&layer.file), serial: layer_serial(index), writable: false })
        .collect()
}

/// A `--mount` argument: `TYPE:SOURCE:DESTINATION[:OPTION,...]`.
pub fn parse_mount(text: &str) -> Result<parma_protocol::Mount, String> {
    let mut parts = text.splitn(4, ':');
    let (Some(kind), Some(source), Some(destination)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{text:?} is not TYPE:SOURCE:DESTINATION[:OPTION,...]"));
    };
    if kind.is_empty() || source.is_empty() || destination.is_empty() {
        return Err(format!("{text:?} is not TYPE:SOURCE:DESTINATION[:OPTION,...]"));
    }
    let options =
        parts.next().map_or_else(Vec::new, |o| o.split(',').filter(|o| !o.is_empty()).map(str::to_string).collect());
    Ok(parma_protocol::Mount { destination: destination.into(), kind: kind.into(), source: source.into(), options })
}

/// The container's init process as the image config says (what `parma
/// policy gen` allows by default), with `args` replacing entrypoint + cmd
/// when given.
pub fn process_from_config(config: &ImageConfig, args: &[String]) -> anyhow::Result<ProcessSpec> {
    let args = if args.is_empty() { [config.entrypoint.clone(), config.cmd.clone()].concat() } else { args.to_vec() };
    if args.is_empty() {
        bail!("the image has no entrypoint or cmd: give the command after --");
    }
    let (uid, gid) = parse_user(&config.user)?;
    let caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    Ok(ProcessSpec {
        args,
        env: config.env.clone(),
        cwd: if config.working_dir.is_empty() { "/".into() } else { config.working_dir.clone() },
        uid,
        gid,
        groups: Vec::new(),
        capabilities: CapabilitySets {
            bounding: caps.clone(),
            effective: caps.clone(),
            inheritable: Vec::new(),
            permitted: caps,
            ambient: Vec::new(),
        },
        no_new_privileges: true,
        rlimits: Vec::new(),
        seccomp: None,
        terminal: false,
    })
}

/// `uid[:gid]` in numbers (names need the image's /etc/passwd, not read yet).
fn parse_user(user: &str) -> anyhow::Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = u.parse().with_context(|| format!("user {user:?}: only numeric uid[:gid] is supported"))?;
    let gid =
        if g.is_empty() { 0 } else { g.parse().with_context(|| format!("user {user:?}: gid is not a number"))? };
    Ok((uid, gid))
}

/// Mount every layer of `built` (attached as [`layer_disks`]); returns
/// their names, base first.
pub fn mount_layers(client: &mut Client, built: &Built) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for (index, layer) in built.layers.layers.iter().enumerate() {
        let name = layer_name(index);
        client
            .mount_layer(&name, &layer_serial(index), &layer.root_hash, layer.hash_offset)
            .with_context(|| format!("cannot mount layer {index} ({})", layer.diff_id))?;
        names.push(name);
    }
    Ok(names)
}

/// [`mount_layers`], then stack them as container `id`'s writable root.
pub fn mount_image(client: &mut Client, built: &Built, id: &str) -> anyhow::Result<()> {
    let names = mount_layers(client, built)?;
    client.mount_overlay(id, &names, true).context("cannot mount the container's overlay")?;
    Ok(())
}

/// Undo [`mount_image`] after the container was deleted.
pub fn unmount_image(client: &mut Client, built: &Built, id: &str) -> anyhow::Result<()> {
    client.unmount_overlay(id).context("cannot unmount the overlay")?;
    for index in 0..built.layers.layers.len() {
        client.unmount_layer(&layer_name(index)).with_context(|| format!("cannot unmount layer {index}"))?;
    }
    Ok(())
}

/// Bytes for a process's stdin, read from the host on a thread of its own
/// (a read may block; the agent connection must not), in chunks of at most
/// 64 KiB so each `WriteStdin` stays well inside a frame.
#[derive(Debug)]
pub struct Input {
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    ended: bool,
    closed: bool,
}

impl Input {
    /// Read `reader` to its end on a new thread.
    pub fn spawn(mut reader: impl Read + Send + 'static) -> Self {
        let (chunks, receiver) = mpsc::sync_channel(4);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let chunk = match reader.read(&mut buf) {
                    Ok(n) => Ok(buf.get(..n).unwrap_or_default().to_vec()),
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => Err(err),
                };
                let last = !matches!(&chunk, Ok(data) if !data.is_empty());
                if chunks.send(chunk).is_err() || last {
                    break;
                }
            }
        });
        Self { chunks: receiver, pending: Vec::new(), ended: false, closed: false }
    }

    /// Hand what the host has typed to the process, as much as its pipe
    /// takes now; close its stdin after the end. A process that closed its
    /// stdin (or exited) gets no more, as a pipe's reader that went away.
    fn feed(&mut self, client: &mut Client, id: &str, exec_id: Option<&str>) -> anyhow::Result<bool> {
        if self.closed {
            return Ok(false);
        }
        if self.pending.is_empty() && !self.ended {
            match self.chunks.try_recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Ok(Ok(chunk)) => self.pending = chunk,
                Ok(Err(err)) => return Err(err).context("cannot read stdin"),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => self.ended = true,
            }
        }
        let close = self.ended && self.pending.is_empty();
        if self.pending.is_empty() && !close {
            return Ok(false);
        }
        match client.write_stdin(id, exec_id, &self.pending, close) {
            Ok(written) => {
                let written = usize::try_from(written).unwrap_or(usize::MAX).min(self.pending.len());
                self.pending.drain(..written);
                self.closed = close;
                Ok(written > 0 || close)
            }
            Err(ClientError::Agent(_)) => {
                self.closed = true;
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// Copy a process's stdout and stderr to `stdout` and `stderr` until it
/// exited and both streams ended; returns how it ended. Fails after `timeout`.
pub fn pump(
    client: &mut Client,
    id: &str,
    exec_id: Option<&str>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    timeout: Duration,
) -> anyhow::Result<ProcessStatus> {
    pump_with(client, id, exec_id, None, stdout, stderr, timeout)
}

/// [`pump`], also feeding `input` to the process's stdin.
pub fn pump_with(
    client: &mut Client,
    id: &str,
    exec_id: Option<&str>,
    mut input: Option<&mut Input>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    timeout: Duration,
) -> anyhow::Result<ProcessStatus> {
    let give_up = Instant::now() + timeout;
    let mut open = [true, true];
    loop {
        let mut progress = false;
        if let Some(input) = input.as_deref_mut() {
            progress |= input.feed(client, id, exec_id)?;
        }
        for (stream, index) in [(OutputStream::Stdout, 0), (OutputStream::Stderr, 1)] {
            if !open[index] {
                continue;
            }
            let (data, eof) = client.read_output(id, exec_id, stream)?;
            progress |= !data.is_empty();
            let sink: &mut dyn Write = if index == 0 { &mut *stdout } else { &mut *stderr };
            sink.write_all(&data)?;
            sink.flush()?;
            open[index] = !eof;
        }
        if open == [false, false] {
            let status = client.wait_process(id, exec_id)?;
            if !status.running {
                return Ok(status);
            }
        }
        if Instant::now() >= give_up {
            bail!("container {id:?} still runs after {timeout:?}");
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The exit status a shell would report: the code, or 128 + the signal.
pub fn exit_code(status: &ProcessStatus) -> i32 {
    match (status.exit_code, status.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_type_source_destination_and_options() {
        let m = parse_mount("tmpfs:tmpfs:/scratch:size=64m,mode=1777").unwrap();
        assert_eq!((m.kind.as_str(), m.source.as_str(), m.destination.as_str()), ("tmpfs", "tmpfs", "/scratch"));
        assert_eq!(m.options, ["size=64m", "mode=1777"]);
        let m = parse_mount("bind:/run/parma/volumes/shared:/data").unwrap();
        assert!(m.options.is_empty());
        // The policy input is the OCI form: "type", not "kind".
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["type"], "bind");
        for bad in ["tmpfs", "tmpfs:tmpfs", "::/x", "bind::/data:ro"] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn users_are_numeric() {
        assert_eq!(parse_user("").unwrap(), (0, 0));
        assert_eq!(parse_user("1000").unwrap(), (1000, 0));
        assert_eq!(parse_user("1000:1001").unwrap(), (1000, 1001));
        assert!(parse_user("nginx").unwrap_err().to_string().contains("only numeric"));
        assert!(parse_user("1:x").is_err());
    }

    #[test]
    fn the_process_is_the_image_config() {
        let config = ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: String::new(),
            user: "7:8".into(),
            ..ImageConfig::default()
        };
        let process = process_from_config(&config, &[]).unwrap();
        assert_eq!(process.args, ["/bin/app", "--serve"]);
        assert_eq!((process.cwd.as_str(), process.uid, process.gid), ("/", 7, 8));
        assert_eq!(process.capabilities.bounding.len(), DEFAULT_CAPABILITIES.len());
        let process = process_from_config(&config, &["/bin/other".into()]).unwrap();
        assert_eq!(process.args, ["/bin/other"]);
        let empty = ImageConfig::default();
        assert!(process_from_config(&empty, &[]).is_err());
    }

    #[test]
    fn exit_codes() {
        let status = |exit_code, signal| ProcessStatus { running: false, exit_code, signal };
        assert_eq!(exit_code(&status(Some(3), None)), 3);
        assert_eq!(exit_code(&status(None, Some(9))), 137);
    }
}
