//! Device-mapper through its control device's ioctls (`linux/dm-ioctl.h`).
//!
//! A device is created in three steps, as `dmsetup create` does:
//! `DM_DEV_CREATE` (a name, no table), `DM_TABLE_LOAD` (the targets, into the
//! inactive slot) and `DM_DEV_SUSPEND` without the suspend flag (resume: the
//! loaded table goes live). A failure after the create removes the device
//! again, so no half-made device is left behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// The control device (devtmpfs creates it as `mapper/control`).
pub const CONTROL: &str = "/dev/mapper/control";

const DM_IOCTL_TYPE: u32 = 0xfd;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
/// The interface version this code speaks (major must match the kernel's).
const VERSION: [u32; 3] = [4, 0, 0];

const DM_VERSION_CMD: u32 = 0;
const DM_DEV_CREATE_CMD: u32 = 3;
const DM_DEV_REMOVE_CMD: u32 = 4;
const DM_DEV_SUSPEND_CMD: u32 = 6;
const DM_DEV_STATUS_CMD: u32 = 7;
const DM_TABLE_LOAD_CMD: u32 = 9;
const DM_TABLE_STATUS_CMD: u32 = 12;

const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// Wipe the kernel's copy of the ioctl buffer (tables with keys).
const DM_SECURE_DATA_FLAG: u32 = 1 << 15;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`, followed by its NUL-terminated parameters.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

const _: () = assert!(size_of::<DmIoctl>() == 312);
const _: () = assert!(size_of::<DmTargetSpec>() == 40);

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn request(cmd: u32) -> u64 {
    (3u64 << 30) | ((size_of::<DmIoctl>() as u64) << 16) | ((DM_IOCTL_TYPE as u64) << 8) | cmd as u64
}

/// What went wrong with a device-mapper request.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The control device could not be opened.
    #[error("cannot open {CONTROL}: {0}")]
    Control(#[source] io::Error),
    /// A name, uuid, target type or parameter string the kernel cannot take.
    #[error("invalid device-mapper argument: {0}")]
    Invalid(String),
    /// The kernel refused an ioctl.
    #[error("device-mapper {op} of {name:?} failed: {source}")]
    Ioctl {
        /// Which step.
        op: &'static str,
        /// The device's name.
        name: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// The kernel's interface is not version 4.
    #[error("device-mapper interface {0}.{1}.{2} is not supported (need 4.x)")]
    Version(u32, u32, u32),
}

/// One line of a table: `length` sectors from `start`, handled by `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector (512 bytes) of the mapped device this target covers.
    pub start: u64,
    /// Sectors covered.
    pub length: u64,
    /// Target type: `verity`, `crypt`, `integrity`, `linear`.
    pub kind: String,
    /// The target's parameter string, as in a `dmsetup` table.
    pub params: String,
}

/// A live mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The name it was created with.
    pub name: String,
    /// Block device major number.
    pub major: u32,
    /// Block device minor number (`/dev/dm-<minor>`).
    pub minor: u32,
}

impl Device {
    /// The device node devtmpfs creates for it.
    pub fn path(&self) -> String {
        format!("/dev/dm-{}", self.minor)
    }
}

/// How a device is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreateFlags {
    /// The device refuses writes.
    pub read_only: bool,
    /// The table carries a secret (a dm-crypt key): the kernel wipes its buffers.
    pub secret: bool,
}

/// An open `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Open the control device and check the interface version.
    pub fn open() -> Result<Self, DmError> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL).map_err(DmError::Control)?;
        let control = Self { file };
        let mut buf = Buffer::new("", "", 0)?;
        control.ioctl(DM_VERSION_CMD, "version", "", &mut buf)?;
        let version = buf.header().version;
        if version[0] != VERSION[0] {
            return Err(DmError::Version(version[0], version[1], version[2]));
        }
        Ok(control)
    }

    /// Create `name` with `targets` and make it live. On any failure after
    /// the device exists, it is removed again.
    pub fn create(&self, name: &str, uuid: &str, targets: &[Target], flags: CreateFlags) -> Result<Device, DmError> {
        let mut buf = Buffer::new(name, uuid, 0)?;
        self.ioctl(DM_DEV_CREATE_CMD, "create", name, &mut buf)?;
        let dev = buf.header().dev;
        let device = Device { name: name.to_string(), major: dev_major(dev), minor: dev_minor(dev) };
        let loaded = self.load_and_resume(name, targets, flags);
        if let Err(err) = loaded {
            // Best effort: the device has no live table; removing it cannot expose anything.
            let _ = self.remove(name);
            return Err(err);
        }
        Ok(device)
    }

    fn load_and_resume(&self, name: &str, targets: &[Target], flags: CreateFlags) -> Result<(), DmError> {
        // Sized up front: a table that grew would leave copies of a key in
        // the memory it moved out of.
        let size = targets.iter().map(|t| size_of::<DmTargetSpec>() + (t.params.len() + 1).next_multiple_of(8)).sum();
        // Wiped when dropped, on an early error too.
        let mut table = zeroize::Zeroizing::new(Vec::with_capacity(size));
        for target in targets {
            push_target(&mut table, target)?;
        }
        let mut buf = Buffer::new(name, "", table.len())?;
        buf.set_payload(&table);
        let header = buf.header_mut();
        header.target_count = u32::try_from(targets.len()).map_err(|_| DmError::Invalid("too many targets".into()))?;
        if flags.read_only {
            header.flags |= DM_READONLY_FLAG;
        }
        if flags.secret {
            header.flags |= DM_SECURE_DATA_FLAG;
        }
        let loaded = self.ioctl(DM_TABLE_LOAD_CMD, "table load", name, &mut buf);
        if flags.secret {
            buf.wipe();
        }
        loaded?;
        let mut buf = Buffer::new(name, "", 0)?;
        self.ioctl(DM_DEV_SUSPEND_CMD, "resume", name, &mut buf)
    }

    /// Remove `name` (it must not be open or mounted).
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        let mut buf = Buffer::new(name, "", 0)?;
        self.ioctl(DM_DEV_REMOVE_CMD, "remove", name, &mut buf)
    }

    /// Whether `name` exists, with its numbers.
    pub fn status(&self, name: &str) -> Result<Option<Device>, DmError> {
        let mut buf = Buffer::new(name, "", 0)?;
        match self.ioctl(DM_DEV_STATUS_CMD, "status", name, &mut buf) {
            Ok(()) => {
                let dev = buf.header().dev;
                Ok(Some(Device { name: name.to_string(), major: dev_major(dev), minor: dev_minor(dev) }))
            }
            Err(DmError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The live table's status lines (`dmsetup status`): for verity, `V`
    /// (verified so far) or `C` (corruption seen).
    pub fn target_status(&self, name: &str) -> Result<Vec<String>, DmError> {
        let mut buf = Buffer::new(name, "", 16 * 1024)?;
        self.ioctl(DM_TABLE_STATUS_CMD, "table status", name, &mut buf)?;
        let header = *buf.header();
        if header.flags & DM_BUFFER_FULL_FLAG != 0 {
            return Err(DmError::Invalid("status larger than the buffer".into()));
        }
        let mut lines = Vec::new();
        let mut offset = header.data_start as usize;
        let bytes = buf.bytes();
        for _ in 0..header.target_count {
            let spec_bytes = bytes.get(offset..offset + size_of::<DmTargetSpec>()).ok_or_else(truncated)?;
            let spec = DmTargetSpec::read_from_bytes(spec_bytes).map_err(|_| truncated())?;
            let text_start = offset + size_of::<DmTargetSpec>();
            let text = bytes.get(text_start..).ok_or_else(truncated)?;
            let end = text.iter().position(|b| *b == 0).ok_or_else(truncated)?;
            lines.push(String::from_utf8_lossy(text.get(..end).ok_or_else(truncated)?).into_owned());
            // In replies, `next` is relative to the start of the data area.
            offset = header.data_start as usize + spec.next as usize;
        }
        Ok(lines)
    }

    fn ioctl(&self, cmd: u32, op: &'static str, name: &str, buf: &mut Buffer) -> Result<(), DmError> {
        // SAFETY: `buf` is a live, 8-byte aligned allocation of `data_size`
        // bytes that starts with a `struct dm_ioctl` whose `data_size` says
        // so; the kernel reads and writes only within it.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request(cmd) as _, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(DmError::Ioctl { op, name: name.to_string(), source: io::Error::last_os_error() });
        }
        Ok(())
    }
}

fn truncated() -> DmError {
    DmError::Invalid("truncated table status reply".into())
}

/// The kernel's `huge_encode_dev` format.
fn dev_major(dev: u64) -> u32 {
    ((dev >> 8) & 0xfff) as u32
}

fn dev_minor(dev: u64) -> u32 {
    ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32
}

fn push_target(table: &mut Vec<u8>, target: &Target) -> Result<(), DmError> {
    let mut kind = [0u8; 16];
    if target.kind.is_empty() || target.kind.len() >= kind.len() || target.kind.bytes().any(|b| b == 0) {
        return Err(DmError::Invalid(format!("target type {:?}", target.kind)));
    }
    kind.get_mut(..target.kind.len())
        .ok_or_else(|| DmError::Invalid("target type".into()))?
        .copy_from_slice(target.kind.as_bytes());
    if target.params.bytes().any(|b| b == 0) {
        return Err(DmError::Invalid("NUL in target parameters".into()));
    }
    // Parameters, NUL-terminated, padded so the next spec is 8-byte aligned.
    let params_len = (target.params.len() + 1).next_multiple_of(8);
    let next = size_of::<DmTargetSpec>() + params_len;
    let spec = DmTargetSpec {
        sector_start: target.start,
        length: target.length,
        status: 0,
        next: u32::try_from(next).map_err(|_| DmError::Invalid("target parameters too long".into()))?,
        target_type: kind,
    };
    table.extend_from_slice(spec.as_bytes());
    table.extend_from_slice(target.params.as_bytes());
    table.resize(table.len() + params_len - target.params.len(), 0);
    Ok(())
}

/// An ioctl buffer: the header, then `payload` bytes, 8-byte aligned;
/// wiped when dropped (a table load's holds a key), whatever path drops it.
struct Buffer {
    words: Vec<u64>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Buffer {
    fn new(name: &str, uuid: &str, payload: usize) -> Result<Self, DmError> {
        if name.len() >= DM_NAME_LEN || name.contains(['\0', '/']) {
            return Err(DmError::Invalid(format!("device name {name:?}")));
        }
        if uuid.len() >= DM_UUID_LEN || uuid.contains('\0') {
            return Err(DmError::Invalid(format!("device uuid {uuid:?}")));
        }
        let size = size_of::<DmIoctl>() + payload;
        let mut header = DmIoctl::new_zeroed();
        header.version = VERSION;
        header.data_size = u32::try_from(size).map_err(|_| DmError::Invalid("table too large".into()))?;
        header.data_start = size_of::<DmIoctl>() as u32;
        header
            .name
            .get_mut(..name.len())
            .ok_or_else(|| DmError::Invalid("name".into()))?
            .copy_from_slice(name.as_bytes());
        header
            .uuid
            .get_mut(..uuid.len())
            .ok_or_else(|| DmError::Invalid("uuid".into()))?
            .copy_from_slice(uuid.as_bytes());
        let mut buffer = Self { words: vec![0u64; size.div_ceil(8)] };
        buffer
            .bytes_mut()
            .get_mut(..size_of::<DmIoctl>())
            .ok_or_else(|| DmError::Invalid("buffer".into()))?
            .copy_from_slice(header.as_bytes());
        Ok(buffer)
    }

    fn bytes(&self) -> &[u8] {
        self.words.as_bytes()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.words.as_mut_bytes()
    }

    fn header(&self) -> &DmIoctl {
        // The buffer is at least a header long and u64-aligned, so this cannot fail.
        match DmIoctl::ref_from_prefix(self.bytes()) {
            Ok((header, _)) => header,
            Err(_) => unreachable!("buffer shorter than its header"),
        }
    }

    fn header_mut(&mut self) -> &mut DmIoctl {
        match DmIoctl::mut_from_prefix(self.bytes_mut()) {
            Ok((header, _)) => header,
            Err(_) => unreachable!("buffer shorter than its header"),
        }
    }

    fn set_payload(&mut self, payload: &[u8]) {
        let start = size_of::<DmIoctl>();
        if let Some(dst) = self.bytes_mut().get_mut(start..start + payload.len()) {
            dst.copy_from_slice(payload);
        }
    }

    fn wipe(&mut self) {
        zeroize::Zeroize::zeroize(self.words.as_mut_slice());
    }

    fn as_mut_ptr(&mut self) -> *mut u64 {
        self.words.as_mut_ptr()
    }
}

/// The dm-verity table of a device whose hash tree follows its data on the
/// same block device, in `veritysetup format`'s layout (4096-byte blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTable {
    /// The block device holding data and hashes.
    pub device: String,
    /// Data blocks (4096 bytes each).
    pub data_blocks: u64,
    /// The first hash block (the superblock excluded), in 4096-byte blocks.
    pub hash_start_block: u64,
    /// Hash algorithm (`sha256`).
    pub algorithm: String,
    /// Root hash, lowercase hex.
    pub root_hash: String,
    /// Salt, lowercase hex (`-` for none).
    pub salt: String,
}

impl VerityTable {
    /// The one table line. A corrupted block reads as EIO (no restart, no panic).
    pub fn target(&self) -> Target {
        Target {
            start: 0,
            length: self.data_blocks * 8,
            kind: "verity".into(),
            params: format!(
                "1 {dev} {dev} 4096 4096 {blocks} {hash} {alg} {root} {salt}",
                dev = self.device,
                blocks = self.data_blocks,
                hash = self.hash_start_block,
                alg = self.algorithm,
                root = self.root_hash,
                salt = if self.salt.is_empty() { "-" } else { &self.salt },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // DM_VERSION and DM_TABLE_LOAD as compiled from linux/dm-ioctl.h.
        assert_eq!(request(DM_VERSION_CMD), 0xc138_fd00);
        assert_eq!(request(DM_TABLE_LOAD_CMD), 0xc138_fd09);
    }

    #[test]
    fn dev_numbers_decode() {
        // major 253, minor 3 and minor 300 in huge_encode_dev form.
        assert_eq!((dev_major(0xfd03), dev_minor(0xfd03)), (253, 3));
        let encoded = (300 & 0xff) | (253 << 8) | ((300 & !0xff) << 12);
        assert_eq!((dev_major(encoded), dev_minor(encoded)), (253, 300));
    }

    #[test]
    fn targets_are_packed_and_aligned() {
        let mut table = Vec::new();
        let target = Target { start: 0, length: 8, kind: "verity".into(), params: "abc".into() };
        push_target(&mut table, &target).unwrap();
        assert_eq!(table.len(), 48);
        let spec = DmTargetSpec::read_from_bytes(&table[..40]).unwrap();
        assert_eq!(spec.next, 48);
        assert_eq!(&spec.target_type[..7], b"verity\0");
        assert_eq!(&table[40..44], b"abc\0");
        let bad = Target { kind: "a-very-long-target-type".into(), ..target.clone() };
        assert!(push_target(&mut table, &bad).is_err());
        let bad = Target { params: "a\0b".into(), ..target };
        assert!(push_target(&mut table, &bad).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(Buffer::new(&"x".repeat(128), "", 0).is_err());
        assert!(Buffer::new("a/b", "", 0).is_err());
        let buf = Buffer::new("layer-0", "PARMA-layer-0", 10).unwrap();
        assert_eq!(buf.header().data_size, 322);
        assert_eq!(&buf.header().name[..8], b"layer-0\0");
    }

    #[test]
    fn verity_table_line() {
        let table = VerityTable {
            device: "/dev/vdb".into(),
            data_blocks: 10,
            hash_start_block: 11,
            algorithm: "sha256".into(),
            root_hash: "ab".into(),
            salt: String::new(),
        };
        let target = table.target();
        assert_eq!(target.length, 80);
        assert_eq!(target.params, "1 /dev/vdb /dev/vdb 4096 4096 10 11 sha256 ab -");
    }
}
