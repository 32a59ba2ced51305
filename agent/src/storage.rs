//! Layers and container roots: dm-verity devices, their read-only ext4
//! mounts, and the overlayfs stacks built on them.
//!
//! The host names a disk (by its virtio-blk serial) and a root hash; the
//! disk's bytes are untrusted. The kernel's dm-verity checks every block read
//! against the root hash the policy allowed, so a tampered block reads as EIO,
//! never as other data. The verity superblock on the disk gives the salt and
//! block counts; forging them can only make reads fail, since the root hash
//! covers the salt and every block.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use parma_sys::dm::{Control, CreateFlags, Device, VerityTable};
use parma_verity::{Layout, RootHash, Superblock};

/// Where layers are mounted: `<LAYERS>/<name>`.
pub const LAYERS: &str = "/run/parma/layers";
/// Where container roots live: `<CONTAINERS>/<id>/rootfs`.
pub const CONTAINERS: &str = "/run/parma/containers";

/// Check a host-chosen name: 1 to 64 of `[a-z0-9_-]`, not starting with `-`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(format!("{what} {:?} is not 1 to 64 of [a-z0-9_-]", bounded(name))) }
}

fn bounded(text: &str) -> &str {
    text.get(..text.floor_char_boundary(64)).unwrap_or_default()
}

/// Where layer `name` is mounted.
pub fn layer_target(name: &str) -> String {
    format!("{LAYERS}/{name}")
}

/// A container's directory.
pub fn container_dir(id: &str) -> String {
    format!("{CONTAINERS}/{id}")
}

/// A container's root filesystem (the overlay's mount point).
pub fn rootfs_target(id: &str) -> String {
    format!("{CONTAINERS}/{id}/rootfs")
}

/// A container's scratch directory (the overlay's upper and work dirs).
pub fn scratch_target(id: &str) -> String {
    format!("{CONTAINERS}/{id}/scratch")
}

/// A mounted layer.
#[derive(Debug)]
struct Layer {
    device: Device,
    target: String,
    serial: String,
}

/// A mounted overlay.
#[derive(Debug)]
struct Overlay {
    layers: Vec<String>,
    scratch: bool,
}

/// Why a teardown did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Teardown {
    /// Nothing changed: the records still say what is mounted.
    Unchanged(String),
    /// The mount is gone and so is its record (nothing can stack on it
    /// again), but something under it lingers, named in the message; the
    /// agent tries again to remove it at the next teardown.
    Partly(String),
}

/// The system calls a teardown makes, behind a trait so the records'
/// agreement with what is mounted is tested without root.
pub trait Unmounter: std::fmt::Debug + Send {
    /// `umount2(target)`, lazily (`MNT_DETACH`) if `detach`.
    fn unmount(&self, target: &str, detach: bool) -> Result<(), String>;
    /// `DM_DEV_REMOVE` of a device-mapper device.
    fn remove_device(&self, name: &str) -> Result<(), String>;
}

/// The real system calls.
#[derive(Debug, Default)]
struct System;

impl Unmounter for System {
    fn unmount(&self, target: &str, detach: bool) -> Result<(), String> {
        let flags = if detach { MntFlags::MNT_DETACH } else { MntFlags::empty() };
        umount2(target, flags).map_err(|err| format!("cannot unmount {target}: {err}"))
    }

    fn remove_device(&self, name: &str) -> Result<(), String> {
        let control = Control::open().map_err(|err| err.to_string())?;
        control.remove(name).map_err(|err| err.to_string())
    }
}

/// Every layer and overlay the agent mounted.
#[derive(Debug)]
pub struct Storage {
    layers: BTreeMap<String, Layer>,
    overlays: BTreeMap<String, Overlay>,
    scratch: Option<crate::scratch::Scratch>,
    /// Device-mapper devices whose mount is gone but whose removal failed.
    lingering: Vec<String>,
    system: Box<dyn Unmounter>,
}

impl Default for Storage {
    fn default() -> Self {
        Self::with_unmounter(Box::new(System))
    }
}

impl Storage {
    /// Storage whose teardowns go through `system`.
    pub fn with_unmounter(system: Box<dyn Unmounter>) -> Self {
        Self { layers: BTreeMap::new(), overlays: BTreeMap::new(), scratch: None, lingering: Vec::new(), system }
    }

    /// Try again to remove devices an earlier teardown left behind.
    fn retry_lingering(&mut self) {
        let system = &self.system;
        self.lingering.retain(|name| system.remove_device(name).is_err());
    }

    /// Whether container `id` has an overlay.
    pub fn has_overlay(&self, id: &str) -> bool {
        self.overlays.contains_key(id)
    }

    /// Open the disk with `serial` through dm-verity with `root_hash` and mount it read-only.
    pub fn mount_layer(
        &mut self,
        name: &str,
        serial: &str,
        root_hash: &str,
        hash_offset: u64,
    ) -> Result<String, String> {
        if self.layers.contains_key(name) {
            return Err(format!("layer {name:?} is already mounted"));
        }
        let root = RootHash::from_hex(root_hash).map_err(|err| format!("root hash: {err}"))?;
        if self.scratch.as_ref().is_some_and(|s| s.serial == serial) {
            return Err(format!("disk {serial:?} is the scratch disk"));
        }
        let disk = find_disk(serial)?;
        let table = verity_table(&disk, &root, hash_offset)?;
        let control = Control::open().map_err(|err| err.to_string())?;
        let dm_name = format!("parma-layer-{name}");
        let device = control
            .create(
                &dm_name,
                &format!("PARMA-VERITY-{name}"),
                &[table.target()],
                CreateFlags { read_only: true, secret: false },
            )
            .map_err(|err| err.to_string())?;
        let target = layer_target(name);
        let mounted =
            std::fs::create_dir_all(&target).map_err(|err| format!("cannot create {target}: {err}")).and_then(|()| {
                mount(
                    Some(device.path().as_str()),
                    target.as_str(),
                    Some("ext4"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                    Some("noload"),
                )
                .map_err(|err| format!("cannot mount layer {name:?} ({}) on {target}: {err}", device.path()))
            });
        if let Err(err) = mounted {
            let _ = control.remove(&dm_name);
            return Err(err);
        }
        let path = device.path();
        self.layers.insert(name.to_string(), Layer { device, target: target.clone(), serial: serial.to_string() });
        tracing::info!("layer {name} ({root_hash}) from disk {serial} on {target} through {path}");
        Ok(path)
    }

    /// Make the disk with `serial` the encrypted scratch (swap).
    pub fn mount_scratch(&mut self, serial: &str) -> Result<&crate::scratch::Scratch, String> {
        if let Some(scratch) = &self.scratch {
            return Err(format!("the scratch is already on disk {:?}", scratch.serial));
        }
        if let Some((name, _)) = self.layers.iter().find(|(_, layer)| layer.serial == serial) {
            return Err(format!("disk {serial:?} holds layer {name:?}"));
        }
        let disk = find_disk(serial)?;
        let size = block_device_size(&disk)?;
        Ok(self.scratch.insert(crate::scratch::setup(serial, &disk, size)?))
    }

    /// Unmount layer `name` and remove its dm-verity device. Once the
    /// unmount succeeded the layer's record goes, whatever happens to the
    /// device: a record always means a verified layer is mounted there.
    pub fn unmount_layer(&mut self, name: &str) -> Result<(), Teardown> {
        self.retry_lingering();
        let layer =
            self.layers.get(name).ok_or_else(|| Teardown::Unchanged(format!("layer {name:?} is not mounted")))?;
        if let Some((id, _)) = self.overlays.iter().find(|(_, overlay)| overlay.layers.iter().any(|l| l == name)) {
            return Err(Teardown::Unchanged(format!("layer {name:?} is in use by the overlay of container {id:?}")));
        }
        self.system.unmount(&layer.target, false).map_err(Teardown::Unchanged)?;
        let _ = std::fs::remove_dir(&layer.target);
        let device = layer.device.name.clone();
        self.layers.remove(name);
        if let Err(err) = self.system.remove_device(&device) {
            self.lingering.push(device.clone());
            return Err(Teardown::Partly(format!(
                "layer {name:?} is unmounted, but its device {device} could not be removed ({err}); the agent \
                 tries again at the next unmount"
            )));
        }
        Ok(())
    }

    /// Stack `layers` (base first) as container `id`'s root, with a writable
    /// upper layer in guest memory when `writable`.
    pub fn mount_overlay(&mut self, id: &str, layers: &[String], writable: bool) -> Result<String, String> {
        if self.overlays.contains_key(id) {
            return Err(format!("container {id:?} already has an overlay"));
        }
        if self.overlays.len() >= crate::containers::MAX_CONTAINERS {
            return Err(format!("{} overlays are mounted: unmount one first", self.overlays.len()));
        }
        if layers.is_empty() {
            return Err("an overlay needs at least one layer".into());
        }
        for name in layers {
            if !self.layers.contains_key(name) {
                return Err(format!("layer {name:?} is not mounted"));
            }
        }
        let dir = container_dir(id);
        let rootfs = rootfs_target(id);
        std::fs::create_dir_all(&rootfs).map_err(|err| format!("cannot create {rootfs}: {err}"))?;
        // overlayfs lists lower layers top first.
        let lower: Vec<String> = layers.iter().rev().map(|name| layer_target(name)).collect();
        let mut options = format!("lowerdir={}", lower.join(":"));
        let scratch = scratch_target(id);
        if writable {
            // The upper layer lives in guest memory (tmpfs): under SEV-SNP the
            // hardware encrypts and integrity-protects it against the host.
            std::fs::create_dir_all(&scratch).map_err(|err| format!("cannot create {scratch}: {err}"))?;
            mount(Some("scratch"), scratch.as_str(), Some("tmpfs"), MsFlags::MS_NODEV, Some("mode=0700"))
                .map_err(|err| format!("cannot mount the scratch of {id:?}: {err}"))?;
            for sub in ["upper", "work"] {
                let path = format!("{scratch}/{sub}");
                if let Err(err) = std::fs::create_dir(&path) {
                    let _ = umount2(scratch.as_str(), MntFlags::MNT_DETACH);
                    return Err(format!("cannot create {path}: {err}"));
                }
            }
            options.push_str(&format!(",upperdir={scratch}/upper,workdir={scratch}/work"));
        }
        // nodev: a device node in a layer or written by the container opens
        // nothing (the container's devices are bound in from the guest).
        let flags = if writable { MsFlags::MS_NODEV } else { MsFlags::MS_RDONLY | MsFlags::MS_NODEV };
        if let Err(err) = mount(Some("overlay"), rootfs.as_str(), Some("overlay"), flags, Some(options.as_str())) {
            if writable {
                let _ = umount2(scratch.as_str(), MntFlags::MNT_DETACH);
            }
            return Err(format!("cannot mount the overlay of {id:?}: {err}"));
        }
        self.overlays.insert(id.to_string(), Overlay { layers: layers.to_vec(), scratch: writable });
        tracing::info!("overlay of {id} on {rootfs} ({dir})");
        Ok(rootfs)
    }

    /// Unmount container `id`'s overlay and its scratch. Once the overlay
    /// is unmounted its record goes (nothing may run on an empty directory
    /// where the overlay was); its scratch is then detached lazily.
    pub fn unmount_overlay(&mut self, id: &str) -> Result<(), Teardown> {
        let overlay =
            self.overlays.get(id).ok_or_else(|| Teardown::Unchanged(format!("container {id:?} has no overlay")))?;
        let scratch = overlay.scratch;
        self.system.unmount(&rootfs_target(id), false).map_err(Teardown::Unchanged)?;
        self.overlays.remove(id);
        if scratch && let Err(err) = self.system.unmount(&scratch_target(id), true) {
            return Err(Teardown::Partly(format!("the overlay of {id:?} is unmounted, but not its scratch: {err}")));
        }
        let _ = std::fs::remove_dir_all(container_dir(id));
        Ok(())
    }
}

/// How long a disk may take to appear: one the host hot-plugs just before
/// asking (a pod's layers) is enumerated by the guest's PCIe hot-plug
/// driver, after the slot's attention-button delay (5 s).
const DISK_APPEARS: std::time::Duration = std::time::Duration::from_secs(10);

/// The virtio-blk disk whose serial is `serial`, waiting [`DISK_APPEARS`]
/// at most for it to appear.
fn find_disk(serial: &str) -> Result<PathBuf, String> {
    if !parma_protocol::boot::valid_disk_serial(serial) {
        return Err(format!("disk serial {:?} is not 1 to 20 of [A-Za-z0-9-]", bounded(serial)));
    }
    let give_up = std::time::Instant::now() + DISK_APPEARS;
    loop {
        let found = disk_with_serial(serial);
        if found.is_ok() || std::time::Instant::now() >= give_up {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The virtio-blk disk whose serial is `serial`, now.
fn disk_with_serial(serial: &str) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir("/sys/block").map_err(|err| format!("cannot list /sys/block: {err}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vd") {
            continue;
        }
        let Ok(found) = std::fs::read_to_string(entry.path().join("serial")) else { continue };
        if found.trim_end_matches(['\0', '\n', ' ']) == serial {
            return Ok(Path::new("/dev").join(name));
        }
    }
    Err(format!("no virtio-blk disk has serial {serial:?}"))
}

/// The dm-verity table for a layer disk, from its (untrusted) verity superblock.
fn verity_table(disk: &Path, root: &RootHash, hash_offset: u64) -> Result<VerityTable, String> {
    let file = File::open(disk).map_err(|err| format!("cannot open {}: {err}", disk.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let size = if size == 0 { block_device_size(disk)? } else { size };
    if !hash_offset.is_multiple_of(4096) || hash_offset >= size {
        return Err(format!("hash offset {hash_offset} is not a 4096-byte block inside the disk of {size} bytes"));
    }
    let mut block = vec![0u8; 4096];
    file.read_exact_at(&mut block, hash_offset)
        .map_err(|err| format!("cannot read the verity superblock of {}: {err}", disk.display()))?;
    let superblock = Superblock::parse(&block).map_err(|err| format!("verity superblock: {err}"))?;
    let params = superblock.params().map_err(|err| format!("verity superblock: {err}"))?;
    if params.data_block_size != 4096 || params.hash_block_size != 4096 {
        return Err(format!(
            "verity blocks of {}/{} bytes; layers use 4096",
            params.data_block_size, params.hash_block_size
        ));
    }
    let data_blocks = superblock.data_blocks();
    if data_blocks.checked_mul(4096).is_none_or(|data| data > hash_offset) {
        return Err(format!("{data_blocks} data blocks overlap the hash area at {hash_offset}"));
    }
    let layout = Layout::new(&params, data_blocks, hash_offset).map_err(|err| format!("verity layout: {err}"))?;
    if layout.tree_offset() + layout.tree_size() > size {
        return Err(format!("the hash tree ends past the disk's {size} bytes"));
    }
    Ok(VerityTable {
        device: disk.display().to_string(),
        data_blocks,
        hash_start_block: layout.tree_offset() / 4096,
        algorithm: params.hash.name().to_string(),
        root_hash: root.to_hex(),
        salt: hex::encode(&params.salt),
    })
}

/// A block device's size in bytes, from sysfs (512-byte sectors).
fn block_device_size(disk: &Path) -> Result<u64, String> {
    let name = disk.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .map_err(|err| format!("cannot read the size of {}: {err}", disk.display()))?;
    sectors.trim().parse::<u64>().map(|s| s * 512).map_err(|err| format!("size of {}: {err}", disk.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what a teardown did; fails the calls it is told to.
    #[derive(Debug, Default, Clone)]
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        fail_unmount: bool,
        fail_remove: Arc<Mutex<bool>>,
    }

    impl Unmounter for Fake {
        fn unmount(&self, target: &str, detach: bool) -> Result<(), String> {
            self.calls.lock().unwrap().push(format!("umount {target} {detach}"));
            if self.fail_unmount { Err(format!("cannot unmount {target}: EBUSY")) } else { Ok(()) }
        }

        fn remove_device(&self, name: &str) -> Result<(), String> {
            self.calls.lock().unwrap().push(format!("remove {name}"));
            if *self.fail_remove.lock().unwrap() { Err("EBUSY".into()) } else { Ok(()) }
        }
    }

    fn with_layer(fake: &Fake) -> Storage {
        let mut storage = Storage::with_unmounter(Box::new(fake.clone()));
        let device = Device { name: "parma-layer-l0".into(), major: 253, minor: 0 };
        storage.layers.insert("l0".into(), Layer { device, target: layer_target("l0"), serial: "parma-l0".into() });
        storage
    }

    #[test]
    fn a_failed_unmount_changes_nothing() {
        let fake = Fake { fail_unmount: true, ..Fake::default() };
        let mut storage = with_layer(&fake);
        let err = storage.unmount_layer("l0").unwrap_err();
        assert!(matches!(err, Teardown::Unchanged(ref m) if m.contains("EBUSY")), "{err:?}");
        assert!(storage.layers.contains_key("l0"), "still mounted, still recorded");
        assert_eq!(*fake.calls.lock().unwrap(), vec![format!("umount {} false", layer_target("l0"))]);
    }

    #[test]
    fn a_device_that_lingers_leaves_no_record_of_a_mounted_layer() {
        let fake = Fake::default();
        *fake.fail_remove.lock().unwrap() = true;
        let mut storage = with_layer(&fake);
        let err = storage.unmount_layer("l0").unwrap_err();
        assert!(matches!(err, Teardown::Partly(ref m) if m.contains("parma-layer-l0")), "{err:?}");
        // Nothing may stack the empty directory as a verified layer now.
        assert!(!storage.layers.contains_key("l0"));
        let overlay = storage.mount_overlay("c", &["l0".into()], false).unwrap_err();
        assert!(overlay.contains("layer \"l0\" is not mounted"), "{overlay}");
        // The next teardown tries the device again, and it goes.
        *fake.fail_remove.lock().unwrap() = false;
        assert!(storage.unmount_layer("l0").is_err());
        assert!(storage.lingering.is_empty());
        assert_eq!(fake.calls.lock().unwrap().iter().filter(|c| *c == "remove parma-layer-l0").count(), 2);
    }

    #[test]
    fn an_unmounted_overlay_is_forgotten_even_if_its_scratch_lingers() {
        #[derive(Debug)]
        struct ScratchStuck;
        impl Unmounter for ScratchStuck {
            fn unmount(&self, target: &str, detach: bool) -> Result<(), String> {
                if detach { Err(format!("cannot unmount {target}: EINVAL")) } else { Ok(()) }
            }
            fn remove_device(&self, _: &str) -> Result<(), String> {
                Ok(())
            }
        }
        let mut storage = Storage::with_unmounter(Box::new(ScratchStuck));
        storage.overlays.insert("c".into(), Overlay { layers: vec!["l0".into()], scratch: true });
        let err = storage.unmount_overlay("c").unwrap_err();
        assert!(matches!(err, Teardown::Partly(_)), "{err:?}");
        assert!(!storage.has_overlay("c"), "no container can be created on the empty root");
    }

    #[test]
    fn names_are_checked() {
        for good in ["l0", "web", "a_b-c", &"x".repeat(64)] {
            assert!(check_name("layer", good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "A", "a/b", "..", "a b", &"x".repeat(65), "é"] {
            let err = check_name("layer", bad).unwrap_err();
            assert!(err.contains("is not 1 to 64"), "{err}");
        }
    }

    #[test]
    fn verity_tables_come_from_the_superblock() {
        // A real layer image: data, then the superblock and the tree.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.img");
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::io::Write::write_all(&mut file, &vec![7u8; 3 * 4096]).unwrap();
        let params = parma_verity::Params::new(vec![1, 2, 3], [9; 16]);
        let formatted = parma_verity::format_appended(&params, &mut file).unwrap();
        let table = verity_table(&path, &formatted.root_hash, 3 * 4096).unwrap();
        assert_eq!(table.data_blocks, 3);
        assert_eq!(table.hash_start_block, 4);
        assert_eq!(table.salt, "010203");
        assert_eq!(table.root_hash, formatted.root_hash.to_hex());

        for (offset, want) in
            [(4096, "bad signature"), (3 * 4096 + 1, "not a 4096-byte block"), (1 << 40, "inside the disk")]
        {
            let err = verity_table(&path, &formatted.root_hash, offset).unwrap_err();
            assert!(err.contains(want), "{offset}: {err}");
        }
        let err = verity_table(&path, &formatted.root_hash, 0).unwrap_err();
        assert!(err.contains("superblock"), "{err}");
    }
}
