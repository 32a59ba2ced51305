//! QEMU's machine protocol (QMP), synchronously, for what changes while a
//! UVM runs: disks added to the hot-plug root ports (a pod's containers
//! come after its boot, and their layers with them).
//!
//! JSON lines over the unix socket QEMU listens on (`-qmp
//! unix:PATH,server=on,wait=off`): the greeting, `qmp_capabilities`, then
//! one command at a time, skipping the asynchronous events between.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// How long QEMU may take to answer one command.
const ANSWER: Duration = Duration::from_secs(30);
/// The longest line read (QEMU's answers here are small).
const MAX_LINE: u64 = 1 << 20;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket.
    #[error("QMP: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU's answer does not parse, or is not one.
    #[error("QMP: unexpected answer {0}")]
    Answer(String),
    /// QEMU refused the command.
    #[error("QMP {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect to QEMU's QMP socket and enter command mode.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(ANSWER))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Answer(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Answer("end of file".into()));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Answer(line.trim_end().to_string()))
    }

    /// Run `command` with `arguments`; its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .map_err(|err| QmpError::Answer(err.to_string()))?;
        request.push(b'\n');
        self.writer.write_all(&request)?;
        loop {
            let answer = self.line()?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
                return Err(QmpError::Refused { command: command.into(), class: text("class"), desc: text("desc") });
            }
            // An event (`{"event": ...}`): not the answer.
        }
    }

    /// Add `disk` (read-only unless writable) on hot-plug root port `slot`
    /// as a virtio-blk device with its serial.
    pub fn attach_disk(&mut self, disk: &crate::Disk, slot: u8) -> Result<(), QmpError> {
        let node = format!("hotdisk{slot}");
        let read_only = !disk.writable;
        self.execute(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": read_only,
                "file": {"driver": "file", "filename": disk.path.to_string_lossy(), "read-only": read_only},
            }),
        )?;
        let added = self.execute(
            "device_add",
            json!({
                "driver": "virtio-blk-pci",
                "id": format!("hotdev{slot}"),
                "drive": node,
                "serial": disk.serial,
                "bus": crate::qemu::hotplug_port(slot),
            }),
        );
        if let Err(err) = added {
            let _ = self.execute("blockdev-del", json!({"node-name": node}));
            return Err(err);
        }
        Ok(())
    }
}
