//! One pod's UVM as the shim holds it: QEMU, the agent connection, the
//! hot-plug ports its containers' layer disks go on, and the record that
//! lets `delete` clean up after a shim that died.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use parma_host::{Client, ClientError, Disk, Vm, VmConfig};
use parma_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::spec::{Role, Spec};

/// The file in the sandbox's bundle that names what the shim started.
pub const RECORD: &str = "parma-shim.json";

/// What `delete` needs to clean up after a shim that died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// QEMU's pid (the leader of its process group).
    pub qemu_pid: u32,
    /// QEMU's start time in clock ticks after boot (`/proc/PID/stat`
    /// field 22), so a reused pid is never signalled.
    pub qemu_start: u64,
    /// The UVM's private directory (sockets, serial log).
    pub vm_dir: PathBuf,
}

/// Why a pod could not be set up, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The caller's mistake or a refusal: reported as it is.
    #[error("{0}")]
    Refused(String),
    /// The agent refused or failed.
    #[error("{what}: {source}")]
    Agent {
        /// What the shim was doing.
        what: String,
        /// The agent's answer.
        source: ClientError,
    },
    /// Anything else (QEMU, files).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl PodError {
    /// The agent's error code, if the agent answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            PodError::Agent { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// `what` failed at the agent.
pub fn agent(what: impl Into<String>) -> impl FnOnce(ClientError) -> PodError {
    let what = what.into();
    move |source| PodError::Agent { what, source }
}

/// A layer disk of the pod on a hot-plug port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDisk {
    /// The image file.
    pub path: PathBuf,
    /// The dm-verity root hash (the policy decides whether it may be mounted).
    pub root_hash: String,
    /// Where the verity superblock starts.
    pub hash_offset: u64,
}

/// The UVM of one pod.
#[derive(Debug)]
pub struct Pod {
    /// QEMU.
    pub vm: Mutex<Vm>,
    /// The agent: one request at a time.
    pub client: Mutex<Client>,
    /// QEMU's pid.
    pub pid: u32,
    /// The hot-plug ports: free, in use, or released (the guest may still
    /// hold the device; the port is reused once QEMU lets go of its disk).
    slots: Mutex<Vec<Slot>>,
    /// The layers mounted in the guest by root hash: their port and how
    /// many of the pod's containers use them (the guest mounts a device
    /// once; containers of one image share its layers).
    layers: Mutex<std::collections::HashMap<String, (u8, usize)>>,
    /// The tap on the pod's network namespace and its redirects, removed
    /// when the pod goes.
    _network: Option<parma_host::netns::Attached>,
    /// The pod's policy: what secrets its containers are listed for.
    pub policy: parma_policy::Policy,
    /// Where the UVM reaches key brokers.
    pub routes: parma_host::secrets::Routes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Used,
    Released,
}

/// The policy of a pod, from its annotation.
pub fn policy_of(spec: &Spec) -> Result<String, PodError> {
    let value = spec.annotations.get(crate::spec::POLICY_ANNOTATION).ok_or_else(|| {
        PodError::Refused(format!(
            "the pod has no {} annotation: a Parma pod runs only under a policy (parma policy gen --pod adds it)",
            crate::spec::POLICY_ANNOTATION
        ))
    })?;
    parma_host::annotation::decode(value).map_err(|err| PodError::Refused(format!("{err}")))
}

impl Pod {
    /// Boot the UVM for a sandbox (or a container without a pod), set its
    /// policy, and make it a pod: host name, shared PID namespace where the
    /// policy allows one, the network namespace's interface and routes.
    pub fn boot(config: &Config, bundle: &Path, spec: &Spec, id: &str) -> Result<Self, PodError> {
        let policy = policy_of(spec)?;
        let parsed = parma_policy::Policy::from_bytes(policy.clone().into_bytes())
            .map_err(|err| PodError::Refused(format!("the pod's policy does not load: {err}")))?;
        let broker_addresses =
            parma_host::secrets::addresses_from_annotations(&spec.annotations).map_err(PodError::Refused)?;
        if !broker_addresses.is_empty() {
            let brokers = parma_policy::listed_brokers(&parsed)
                .map_err(|err| PodError::Refused(format!("the pod's policy does not load: {err}")))?;
            let routes = parma_host::secrets::Routes { networked: true, addresses: broker_addresses.clone() };
            routes.check(&brokers).map_err(|err| PodError::Refused(format!("the pod's annotations: {err}")))?;
        }
        let accel = config.accel().map_err(PodError::Refused)?;
        let mut vm_config = VmConfig::new(&config.uvm, "unused");
        vm_config.qemu = config.qemu.clone();
        vm_config.accel = accel;
        vm_config.memory_mib = config.memory_mib;
        vm_config.cpus = config.cpus;
        vm_config.hotplug_slots = config.hotplug_slots;
        // HOST_DATA is the policy's hash: in the SNP launch, or emulated.
        let snp = config.snp_launch().map_err(PodError::Refused)?;
        if snp.is_none() {
            tracing::warn!("INSECURE: no SEV-SNP; the policy's hash is given to the agent as emulated HOST_DATA");
        }
        parma_host::run::configure_launch(&mut vm_config, snp.as_ref(), parsed.hash())
            .map_err(|err| PodError::Refused(err.to_string()))?;
        let netns = spec
            .linux
            .iter()
            .flat_map(|linux| &linux.namespaces)
            .find(|ns| ns.kind == "network")
            .and_then(|ns| ns.path.clone());
        let attached = match &netns {
            Some(path) => Some(parma_host::netns::attach(Path::new(path)).map_err(PodError::Failed)?),
            None => None,
        };
        if let Some(attached) = &attached {
            vm_config.nic =
                Some(parma_host::Nic { mac: attached.mac, forwards: Vec::new(), tap: Some(attached.tap.clone()) });
        }
        let mut vm = Vm::start(vm_config, &parma_host::StartOptions::default())
            .map_err(|err| PodError::Failed(anyhow::anyhow!(err).context("cannot start QEMU")))?;
        let record = Record {
            qemu_pid: vm.pid(),
            qemu_start: start_time(vm.pid()).unwrap_or(0),
            vm_dir: vm.dir().to_path_buf(),
        };
        if let Err(err) = write_record(bundle, &record) {
            vm.kill();
            return Err(PodError::Failed(err));
        }
        let setup = (|| {
            let mut client = vm
                .ready_client(Duration::from_secs(config.boot_deadline_s), Duration::from_secs(60))
                .map_err(|err| PodError::Failed(anyhow::anyhow!(err).context("the UVM did not become ready")))?;
            client.set_policy(policy.clone()).map_err(agent("the agent refused the pod's policy"))?;
            let hostname = spec.hostname.clone().filter(|name| !name.is_empty()).unwrap_or_else(|| id.to_string());
            let in_pod = spec.role() == Role::Sandbox || attached.is_some();
            if in_pod {
                let share_pid = spec.role() == Role::Sandbox && policy_allows_shared_pid(&parsed, &hostname);
                client.create_sandbox(&hostname, share_pid).map_err(agent("cannot create the pod"))?;
            }
            if let Some(attached) = &attached {
                client.update_interface(&attached.interface).map_err(agent("cannot set up the pod's interface"))?;
                if !attached.routes.is_empty() {
                    client.update_routes(&attached.routes).map_err(agent("cannot set up the pod's routes"))?;
                }
            }
            Ok(client)
        })();
        match setup {
            Ok(client) => Ok(Self {
                pid: vm.pid(),
                vm: Mutex::new(vm),
                client: Mutex::new(client),
                slots: Mutex::new(vec![Slot::Free; usize::from(config.hotplug_slots)]),
                layers: Mutex::new(std::collections::HashMap::new()),
                routes: parma_host::secrets::Routes { networked: attached.is_some(), addresses: broker_addresses },
                _network: attached,
                policy: parsed,
            }),
            Err(err) => {
                let serial = vm.serial();
                vm.kill();
                tracing::error!("the pod did not come up: {err}\nguest console:\n{serial}");
                Err(err)
            }
        }
    }

    /// Run `call` with the agent.
    pub fn with_client<T>(&self, call: impl FnOnce(&mut Client) -> T) -> T {
        let mut client = self.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        call(&mut client)
    }

    /// The guest's names of `wanted` (base first), each mounted through
    /// dm-verity: the one already mounted for another container, or its
    /// disk hot-plugged now. All new disks are plugged first and mounted
    /// after, so the guest's hot-plug delays overlap. On failure, the root
    /// hashes this call took a use of come back with the error: the caller
    /// gives them back with [`Pod::release_layer`].
    pub fn acquire_layers(&self, wanted: &[LayerDisk]) -> Result<Vec<String>, (PodError, Vec<String>)> {
        let mut layers = self.layers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut held = Vec::new();
        let mut names = Vec::new();
        let mut fresh = Vec::new();
        for layer in wanted {
            if let Some((slot, users)) = layers.get_mut(&layer.root_hash) {
                *users += 1;
                held.push(layer.root_hash.clone());
                names.push(layer_name(*slot));
                continue;
            }
            let slot = match self.attach(layer) {
                Ok(slot) => slot,
                Err(err) => return Err((err, held)),
            };
            layers.insert(layer.root_hash.clone(), (slot, 1));
            held.push(layer.root_hash.clone());
            names.push(layer_name(slot));
            fresh.push((layer, slot));
        }
        for (layer, slot) in fresh {
            let mounted = self.with_client(|client| {
                client.mount_layer(&layer_name(slot), &slot_serial(slot), &layer.root_hash, layer.hash_offset)
            });
            if let Err(err) = mounted {
                return Err((PodError::Agent { what: "cannot mount a layer".into(), source: err }, held));
            }
        }
        Ok(names)
    }

    /// A container no longer uses the layer with `root_hash`: the last
    /// user unmounts it and unplugs its disk.
    pub fn release_layer(&self, root_hash: &str) {
        let mut layers = self.layers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((slot, users)) = layers.get_mut(root_hash) else { return };
        *users = users.saturating_sub(1);
        if *users > 0 {
            return;
        }
        let slot = *slot;
        layers.remove(root_hash);
        match self.with_client(|client| client.unmount_layer(&layer_name(slot))) {
            // Mounted, or never mounted (a failed acquire): the disk can go.
            Ok(()) => self.release(slot),
            Err(err) if err.code() == Some(parma_protocol::ErrorCode::NotFound) => self.release(slot),
            // Still in use in the guest: the disk and its port stay.
            Err(err) => tracing::warn!("cannot unmount layer {}: {err}; its disk stays", layer_name(slot)),
        }
    }

    /// Put `disk` on a free hot-plug port as a read-only virtio-blk; its port.
    fn attach(&self, disk: &LayerDisk) -> Result<u8, PodError> {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let vm = self.vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut qmp = vm.qmp().map_err(|err| PodError::Failed(anyhow::anyhow!(err).context("QMP")))?;
        // A released port is free once QEMU can drop its disk (the guest let go).
        for (index, slot) in slots.iter_mut().enumerate() {
            if *slot == Slot::Released
                && qmp.execute("blockdev-del", serde_json::json!({"node-name": format!("hotdisk{index}")})).is_ok()
            {
                *slot = Slot::Free;
            }
        }
        let index = slots.iter().position(|slot| *slot == Slot::Free).ok_or_else(|| {
            PodError::Refused(format!("all {} hot-plug ports of the pod's UVM hold layers", slots.len()))
        })?;
        let slot = u8::try_from(index).map_err(|_| PodError::Refused("too many ports".into()))?;
        let serial = slot_serial(slot);
        qmp.attach_disk(&Disk { path: disk.path.clone(), serial, writable: false }, slot)
            .map_err(|err| PodError::Failed(anyhow::anyhow!(err).context("cannot hot-plug a layer disk")))?;
        if let Some(entry) = slots.get_mut(index) {
            *entry = Slot::Used;
        }
        Ok(slot)
    }

    /// Ask QEMU to unplug the disk on `slot` (the guest unmounted it); the
    /// port is reused once the guest released the device.
    fn release(&self, slot: u8) {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let vm = self.vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match vm.qmp() {
            Ok(mut qmp) => {
                if let Err(err) = qmp.execute("device_del", serde_json::json!({"id": format!("hotdev{slot}")})) {
                    tracing::warn!("cannot unplug the disk on port {slot}: {err}");
                }
            }
            Err(err) => tracing::warn!("QMP: {err}"),
        }
        if let Some(entry) = slots.get_mut(usize::from(slot)) {
            *entry = Slot::Released;
        }
    }

    /// Shut the UVM down: the agent powers it off, or QEMU is killed.
    pub fn stop(&self) {
        let answered = self.with_client(|client| client.shutdown());
        let mut vm = self.vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = answered {
            tracing::warn!("the agent did not take the shutdown: {err}");
            vm.kill();
        } else {
            let stopped = vm.stop(Duration::from_secs(10));
            tracing::info!("UVM stopped: {stopped}");
        }
    }
}

/// The guest's name for the layer on hot-plug port `slot`.
pub fn layer_name(slot: u8) -> String {
    format!("h{slot}")
}

/// The virtio-blk serial of the disk on hot-plug port `slot`.
pub fn slot_serial(slot: u8) -> String {
    format!("parma-h{slot}")
}

fn policy_allows_shared_pid(policy: &parma_policy::Policy, hostname: &str) -> bool {
    use parma_policy::input::{CreateSandbox, Input};
    match parma_policy::Engine::new(policy) {
        Ok(mut engine) => {
            engine
                .decide_input(&Input::CreateSandbox(CreateSandbox { hostname: hostname.into(), share_pid: true }))
                .allowed
        }
        Err(_) => false,
    }
}

/// A process's start time (`/proc/PID/stat` field 22).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn write_record(bundle: &Path, record: &Record) -> anyhow::Result<()> {
    let path = bundle.join(RECORD);
    let text = serde_json::to_vec(record)?;
    std::fs::write(&path, text).map_err(|err| anyhow::anyhow!("cannot write {}: {err}", path.display()))
}

/// Read the record a shim left in `bundle`, if any.
pub fn read_record(bundle: &Path) -> Option<Record> {
    let bytes = std::fs::read(bundle.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Kill what a record names, if it is still that QEMU, and remove its files.
pub fn clean_up(record: &Record) {
    let alive = start_time(record.qemu_pid);
    if alive.is_some()
        && alive == Some(record.qemu_start)
        && let Ok(pid) = i32::try_from(record.qemu_pid)
    {
        {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                if start_time(record.qemu_pid) != Some(record.qemu_start) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if record.vm_dir.starts_with(std::env::temp_dir()) && record.vm_dir.file_name().is_some() {
        let _ = std::fs::remove_dir_all(&record.vm_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_without_the_annotation_is_refused_by_name() {
        let spec = Spec::parse(b"{}").unwrap();
        let err = policy_of(&spec).unwrap_err().to_string();
        assert!(err.contains("io.parma.policy") && err.contains("policy gen --pod"), "{err}");
        let bad = Spec::parse(br#"{"annotations": {"io.parma.policy": "not base64!"}}"#).unwrap();
        assert!(policy_of(&bad).unwrap_err().to_string().contains("base64"));
    }

    #[test]
    fn the_start_time_is_read_past_the_command_name() {
        let own = start_time(std::process::id()).unwrap();
        assert!(own > 0);
        assert_eq!(start_time(std::process::id()), Some(own));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_record_that_names_a_dead_or_other_process_kills_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record { qemu_pid: std::process::id(), qemu_start: 1, vm_dir: dir.path().join("gone") };
        clean_up(&record);
        write_record(dir.path(), &record).unwrap();
        assert_eq!(read_record(dir.path()), Some(record));
    }
}
