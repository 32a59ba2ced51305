//! containerd's Task API for one pod: the sandbox's `Create` boots the UVM
//! and makes it the pod, each later `Create` is a container in it (its
//! layers hot-plugged and mounted through dm-verity, its files copied in),
//! and every request the guest acts on is decided there by the policy. A
//! denial reaches containerd as a gRPC error whose message is the agent's
//! explanation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::api::Status;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, Code, r#async::TtrpcContext};
use parma_protocol::{ErrorCode, ProcessSpec};
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::events::{Event, Publisher};
use crate::pod::{LayerDisk, Pod, PodError, agent};
use crate::spec::{Role, Spec, guest_mounts};
use crate::stdio::{self, Paths};

/// How a process ended: its status as a shell reports it, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    status: u32,
    at: SystemTime,
}

#[derive(Debug)]
enum State {
    Created,
    /// The agent is starting it.
    Starting,
    Running,
    Stopped,
}

#[derive(Debug)]
struct Proc {
    paths: Paths,
    /// An exec's process until it starts.
    spec: Option<ProcessSpec>,
    state: State,
    exit: watch::Sender<Option<Exit>>,
}

impl Proc {
    fn new(paths: Paths, spec: Option<ProcessSpec>) -> Self {
        Self { paths, spec, state: State::Created, exit: watch::channel(None).0 }
    }
}

#[derive(Debug)]
struct Container {
    bundle: String,
    role: Role,
    /// The root hashes of its layers, base first.
    layers: Vec<String>,
    /// Whether the guest holds it (an overlay and a container).
    in_guest: bool,
    /// Its seccomp profile, which its execs carry too.
    seccomp: Option<String>,
    /// Its init process (`""`) and its execs.
    procs: HashMap<String, Proc>,
    /// Its spec, from which kubelet's files are read again.
    spec: Spec,
    /// The sha256 of each file last copied in for it, by guest path.
    copied: HashMap<String, [u8; 32]>,
}

/// The shim's Task service.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Mutex<Option<Config>>,
    events: Publisher,
    pod: Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Signalled when the shim should exit.
    pub exit: Arc<Notify>,
}

fn status(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// A pod error as containerd should see it: a policy denial as
/// PERMISSION_DENIED with the agent's explanation, and so on.
fn rpc(err: PodError) -> ttrpc::Error {
    let code = match err.code() {
        Some(ErrorCode::PolicyDenied) => Code::PERMISSION_DENIED,
        Some(ErrorCode::NotFound) => Code::NOT_FOUND,
        Some(ErrorCode::AlreadyExists) => Code::ALREADY_EXISTS,
        Some(ErrorCode::WrongState) => Code::FAILED_PRECONDITION,
        Some(ErrorCode::InvalidArgument | ErrorCode::ExecutableNotFound | ErrorCode::CannotExecute) => {
            Code::INVALID_ARGUMENT
        }
        Some(ErrorCode::LimitReached | ErrorCode::Busy) => Code::RESOURCE_EXHAUSTED,
        Some(_) => Code::INTERNAL,
        None => match err {
            PodError::Refused(_) => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        },
    };
    status(code, err)
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut stamp = Timestamp::new();
    stamp.seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    stamp.nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    stamp
}

/// An id the agent takes: 1 to 64 of `[a-z0-9_-]`.
fn check_id(what: &str, id: &str) -> Result<(), ttrpc::Error> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(status(Code::INVALID_ARGUMENT, format!("{what} {id:?}: a UVM takes 1 to 64 of [a-z0-9_-]")))
    }
}

fn exec_of(exec_id: &str) -> Option<&str> {
    (!exec_id.is_empty()).then_some(exec_id)
}

/// The layers of a container from the parma snapshotter's rootfs mount:
/// one read-only bind (of the image's users files, for containerd's
/// lookups on the host) whose options name the layers, base first, as
/// `parma-layer=ROOT_HASH:HASH_OFFSET:IMAGE`.
pub fn layers_of(rootfs: &[containerd_shim_protos::api::Mount]) -> Result<Vec<LayerDisk>, String> {
    let [mount] = rootfs else {
        return Err(format!(
            "{} rootfs mounts: a confidential container's root comes from the parma snapshotter (one mount naming its layers)",
            rootfs.len()
        ));
    };
    let layers: Vec<&str> = mount.options.iter().filter_map(|option| option.strip_prefix("parma-layer=")).collect();
    if layers.is_empty() {
        return Err(format!(
            "a rootfs mount of type {:?} without parma-layer options: a confidential container's layers come from the parma snapshotter",
            mount.type_
        ));
    }
    layers
        .into_iter()
        .map(|layer| {
            let mut parts = layer.splitn(3, ':');
            let (Some(root_hash), Some(offset), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("parma-layer={layer}: not ROOT_HASH:HASH_OFFSET:IMAGE"));
            };
            let hash_offset =
                offset.parse().map_err(|_| format!("parma-layer={layer}: the hash offset is not a number"))?;
            if root_hash.is_empty() || !path.starts_with('/') {
                return Err(format!("parma-layer={layer}: not ROOT_HASH:HASH_OFFSET:IMAGE"));
            }
            Ok(LayerDisk { path: PathBuf::from(path), root_hash: root_hash.into(), hash_offset })
        })
        .collect()
}

impl Service {
    /// A service that publishes through `events`; `exit` is notified when
    /// containerd shuts it down.
    pub fn new(events: Publisher, exit: Arc<Notify>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: Mutex::new(None),
                events,
                pod: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                exit,
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.inner.containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pod(&self) -> Result<Arc<Pod>, ttrpc::Error> {
        self.inner
            .pod
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod's UVM is not running"))
    }

    fn config(&self) -> Result<Config, ttrpc::Error> {
        let mut config = self.inner.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if config.is_none() {
            let loaded =
                Config::load(&Config::path()).map_err(|err| status(Code::FAILED_PRECONDITION, err.to_string()))?;
            *config = Some(loaded);
        }
        config.clone().ok_or_else(|| status(Code::INTERNAL, "no configuration"))
    }

    /// The exit of a process, recorded once; its TaskExit published.
    fn exited(&self, id: &str, exec_id: Option<&str>, exit_status: u32, pid: u32) {
        let at = SystemTime::now();
        {
            let mut containers = self.containers();
            let Some(proc) = containers.get_mut(id).and_then(|c| c.procs.get_mut(exec_id.unwrap_or_default())) else {
                return;
            };
            if matches!(proc.state, State::Stopped) {
                return;
            }
            proc.state = State::Stopped;
            proc.exit.send_replace(Some(Exit { status: exit_status, at }));
        }
        self.inner.events.publish(Event::Exit(TaskExit {
            container_id: id.into(),
            id: exec_id.unwrap_or(id).into(),
            pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        }));
    }

    /// End a process that was created and never started, with `exit_status`
    /// (no event: containerd never saw it start). Whether it was such a one.
    fn never_ran(&self, id: &str, exec_id: &str, exit_status: u32) -> bool {
        let mut containers = self.containers();
        let Some(proc) = containers.get_mut(id).and_then(|c| c.procs.get_mut(exec_id)) else { return false };
        if !matches!(proc.state, State::Created | State::Starting) {
            return false;
        }
        proc.state = State::Stopped;
        proc.exit.send_replace(Some(Exit { status: exit_status, at: SystemTime::now() }));
        true
    }

    /// Notice the UVM ending by itself (a guest panic, QEMU killed): every
    /// process of the pod is then reported exited, the sandbox included, so
    /// kubelet recreates the pod instead of waiting on it.
    /// Copy in again the kubelet's files that changed on the host since
    /// they were copied (a configMap or secret edited, a service-account
    /// token rotated), with the checks of the first copy. The agent rewrites
    /// a file in place, so the containers' binds see the new bytes. (A key
    /// removed from a volume stays in the guest: there is no request to
    /// remove a copied file.)
    fn refresh_files(&self, pod: &Pod) {
        let running: Vec<(String, Spec)> = self
            .containers()
            .iter()
            .filter(|(_, c)| c.in_guest && c.procs.get("").is_some_and(|p| matches!(p.state, State::Running)))
            .map(|(id, c)| (id.clone(), c.spec.clone()))
            .collect();
        for (id, spec) in running {
            let files = match guest_mounts(&spec) {
                Ok(mounts) => mounts.files,
                Err(err) => {
                    tracing::warn!("{id}: kubelet's files are not copied again: {err}");
                    continue;
                }
            };
            for file in files {
                let digest = file_digest(&file.data);
                let same = self.containers().get(&id).and_then(|c| c.copied.get(&file.path)) == Some(&digest);
                if same {
                    continue;
                }
                match pod.with_client(|client| client.copy_file(&file.path, &file.data, file.mode)) {
                    Ok(()) => {
                        tracing::info!("{id}: copied {} again (it changed on the host)", file.path);
                        if let Some(container) = self.containers().get_mut(&id) {
                            container.copied.insert(file.path, digest);
                        }
                    }
                    Err(err) => tracing::warn!("{id}: cannot copy {} again: {err}", file.path),
                }
            }
        }
    }

    fn watch_vm(&self, pod: Arc<Pod>) {
        let service = self.clone();
        let refresh_s = self.config().map_or(0, |config| config.refresh_s);
        std::thread::spawn(move || {
            let mut seconds = 0u64;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                seconds += 1;
                if refresh_s > 0 && seconds.is_multiple_of(refresh_s) {
                    service.refresh_files(&pod);
                }
                let current = service.inner.pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                if !current.is_some_and(|current| Arc::ptr_eq(&current, &pod)) {
                    // Stopped on purpose.
                    return;
                }
                let ended = pod.vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).try_exit();
                if let Ok(Some(status)) = ended {
                    tracing::error!("the pod's UVM ended by itself ({status}); its processes are reported exited");
                    let running: Vec<(String, String)> = service
                        .containers()
                        .iter()
                        .flat_map(|(id, container)| {
                            container
                                .procs
                                .iter()
                                .filter(|(_, proc)| !matches!(proc.state, State::Stopped))
                                .map(|(exec, _)| (id.clone(), exec.clone()))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    for (id, exec) in running {
                        if !service.never_ran(&id, &exec, 255) {
                            service.exited(&id, exec_of(&exec), 255, pod.pid);
                        }
                    }
                    return;
                }
            }
        });
    }

    /// Copy the process's output until it exits, then record its exit.
    fn watch(&self, pod: Arc<Pod>, id: String, exec_id: Option<String>, paths: Paths) {
        let service = self.clone();
        std::thread::spawn(move || {
            let status = match stdio::pump(&pod, &id, exec_id.as_deref(), &paths) {
                Ok(status) => parma_host::run::exit_code(&status),
                Err(err) => {
                    tracing::error!("{id}: lost the process: {err}");
                    255
                }
            };
            service.exited(&id, exec_id.as_deref(), u32::try_from(status).unwrap_or(255), pod.pid);
        });
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, PodError> + Send + 'static,
    ) -> Result<T, ttrpc::Error> {
        tokio::task::spawn_blocking(work).await.map_err(|err| status(Code::INTERNAL, err)).and_then(|r| r.map_err(rpc))
    }
}

/// A copied file's digest: what [`Service::refresh_files`] compares.
fn file_digest(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// Put a container into the pod: its layers mounted (shared with the
/// pod's other containers), its overlay stacked, its files copied in, the
/// container created. Undone as far as it got on failure. Returns the
/// layers it holds and the digests of the files it copied.
#[allow(clippy::type_complexity)]
fn create_in_guest(
    pod: &Pod,
    id: &str,
    spec: &Spec,
    layers: &[LayerDisk],
) -> Result<(Vec<String>, HashMap<String, [u8; 32]>), PodError> {
    let process = spec.process().map_err(|err| PodError::Refused(err.to_string()))?;
    let mounts = guest_mounts(spec).map_err(|err| PodError::Refused(err.to_string()))?;
    let mut held = Vec::new();
    let mut overlay = false;
    let mut created = false;
    let result = (|| {
        let names = match pod.acquire_layers(layers) {
            Ok(names) => names,
            Err((err, taken)) => {
                held = taken;
                return Err(err);
            }
        };
        held = layers.iter().map(|layer| layer.root_hash.clone()).collect();
        let mounted = pod.with_client(|client| client.mount_overlay(id, &names, true));
        overlay = made_or_unknown(&mounted);
        mounted.map_err(agent("cannot mount the container's root"))?;
        for file in &mounts.files {
            pod.with_client(|client| client.copy_file(&file.path, &file.data, file.mode))
                .map_err(agent(format!("cannot copy {} into the UVM", file.path)))?;
        }
        let request = parma_protocol::Request::CreateContainer {
            container_id: id.into(),
            process,
            hostname: spec.hostname.clone().filter(|name| !name.is_empty()),
            readonly_rootfs: spec.readonly_rootfs(),
            resources: spec.resources(),
            mounts: mounts.mounts.clone(),
            masked_paths: spec.masked_paths(),
            readonly_paths: spec.readonly_paths(),
            namespaces: spec.namespaces(),
        };
        let entry = pod.with_client(|client| client.created(&request));
        created = made_or_unknown(&entry);
        let entry = entry.map_err(agent("cannot create the container"))?;
        // The secrets the policy lists for the container, before it starts:
        // planned (the policy read, the brokers resolved) without the
        // agent, then asked one by one.
        if let Some(entry) = entry {
            let planned = parma_host::secrets::plan(&pod.policy, &entry, &pod.routes).map_err(secret_error)?;
            for one in &planned {
                // Sent aside: the pod's other requests (exec probes, output)
                // go through while the agent fetches it.
                parma_host::secrets::ask_shared(&pod.client, id, one).map_err(secret_error)?;
                tracing::info!(
                    "{id}: secret {} from broker {:?} provisioned",
                    one.listed.secret.file,
                    one.listed.broker.name
                );
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok((held, mounts.files.iter().map(|file| (file.path.clone(), file_digest(&file.data))).collect())),
        Err(err) => {
            tear_down(pod, id, &held, created, overlay);
            Err(err)
        }
    }
}

/// A secret not provisioned, as the shim reports it.
fn secret_error(err: parma_host::secrets::SecretError) -> PodError {
    use parma_host::secrets::{BROKER_ADDRESSES_ANNOTATION, SecretError};
    match err {
        SecretError::Agent { source, broker, file } => {
            PodError::Agent { what: format!("cannot provision secret {file:?} from broker {broker:?}"), source }
        }
        err @ SecretError::Unresolved { .. } => {
            PodError::Refused(format!("{err}: give its address in the pod annotation {BROKER_ADDRESSES_ANNOTATION}"))
        }
        err => PodError::Refused(err.to_string()),
    }
}

/// Whether a request may have changed the guest: it did, or its answer was
/// lost (a timeout, a closed connection), so the agent may have carried it
/// out. Only an answer from the agent says it did not.
fn made_or_unknown<T>(result: &Result<T, parma_host::ClientError>) -> bool {
    match result {
        Ok(_) => true,
        Err(err) => err.code().is_none(),
    }
}

/// Take a container out of the guest: the container, its overlay, its use
/// of its layers. Best effort: each step is tried.
fn tear_down(pod: &Pod, id: &str, layers: &[String], container: bool, overlay: bool) {
    pod.with_client(|client| {
        if container && let Err(err) = client.delete_container(id) {
            tracing::warn!("{id}: cannot delete the container: {err}");
        }
        if overlay && let Err(err) = client.unmount_overlay(id) {
            tracing::warn!("{id}: cannot unmount the overlay: {err}");
        }
    });
    for root_hash in layers {
        pod.release_layer(root_hash);
    }
}

#[async_trait]
impl Task for Service {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        check_id("the container id", &req.id)?;
        if self.containers().contains_key(&req.id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {} exists", req.id)));
        }
        let spec = Spec::load(std::path::Path::new(&req.bundle))
            .map_err(|err| status(Code::INVALID_ARGUMENT, err.to_string()))?;
        let role = spec.role();
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut held = Vec::new();
        let mut copied = HashMap::new();
        if matches!(role, Role::Sandbox | Role::Standalone) {
            if self.inner.pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some() {
                return Err(status(Code::FAILED_PRECONDITION, "this shim's pod already has a sandbox"));
            }
            let config = self.config()?;
            let (bundle, id, boot_spec) = (PathBuf::from(&req.bundle), req.id.clone(), spec.clone());
            let pod = Arc::new(self.blocking(move || Pod::boot(&config, &bundle, &boot_spec, &id)).await?);
            *self.inner.pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pod.clone());
            self.watch_vm(pod);
        }
        let pod = self.pod()?;
        if role != Role::Sandbox {
            let layers = layers_of(&req.rootfs).map_err(|err| status(Code::INVALID_ARGUMENT, err))?;
            let (pod, id, spec) = (pod.clone(), req.id.clone(), spec.clone());
            match self.blocking(move || create_in_guest(&pod, &id, &spec, &layers)).await {
                Ok((layers, files)) => (held, copied) = (layers, files),
                Err(err) => {
                    if role == Role::Standalone {
                        self.stop_pod();
                    }
                    return Err(err);
                }
            }
        }
        let mut procs = HashMap::new();
        procs.insert(String::new(), Proc::new(paths.clone(), None));
        self.containers().insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                role,
                layers: held,
                in_guest: role != Role::Sandbox,
                seccomp: spec.seccomp(),
                procs,
                spec: spec.clone(),
                copied,
            },
        );
        self.inner.events.publish(Event::Create(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: paths.stdin,
                stdout: paths.stdout,
                stderr: paths.stderr,
                terminal: paths.terminal,
                ..Default::default()
            })
            .into(),
            pid: pod.pid,
            ..Default::default()
        }));
        Ok(CreateTaskResponse { pid: pod.pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pod = self.pod()?;
        let exec_id = exec_of(&req.exec_id).map(String::from);
        let (role, paths, spec) = {
            let mut containers = self.containers();
            let container = containers.get_mut(&req.id).ok_or_else(|| status(Code::NOT_FOUND, &req.id))?;
            let role = container.role;
            let proc = container
                .procs
                .get_mut(&req.exec_id)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("{}/{}", req.id, req.exec_id)))?;
            if !matches!(proc.state, State::Created) {
                return Err(status(Code::FAILED_PRECONDITION, "the process was started already"));
            }
            proc.state = State::Starting;
            (role, proc.paths.clone(), proc.spec.take())
        };
        if role != Role::Sandbox {
            let (id, exec, work_pod) = (req.id.clone(), exec_id.clone(), pod.clone());
            let started = self
                .blocking(move || match (&exec, spec) {
                    (Some(exec), Some(process)) => work_pod
                        .with_client(|client| client.exec_process(&id, exec, &process))
                        .map_err(agent("cannot start the process")),
                    _ => work_pod.with_client(|client| client.start_container(&id)).map_err(agent("cannot start")),
                })
                .await;
            if let Err(err) = started {
                // It never ran: whoever waits on it (containerd waits
                // before it starts) learns it is over.
                self.never_ran(&req.id, &req.exec_id, 255);
                return Err(err);
            }
        }
        if let Some(proc) = self.containers().get_mut(&req.id).and_then(|c| c.procs.get_mut(&req.exec_id))
            && matches!(proc.state, State::Starting)
        {
            proc.state = State::Running;
        }
        self.inner.events.publish(match &exec_id {
            Some(exec) => Event::ExecStarted(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: exec.clone(),
                pid: pod.pid,
                ..Default::default()
            }),
            None => Event::Start(TaskStart { container_id: req.id.clone(), pid: pod.pid, ..Default::default() }),
        });
        // Its exit is watched for only after its start was told: containerd
        // sees TaskStart before TaskExit.
        if role != Role::Sandbox {
            stdio::feed_stdin(pod.clone(), req.id.clone(), exec_id.clone(), paths.stdin.clone());
            self.watch(pod.clone(), req.id.clone(), exec_id.clone(), paths);
        }
        Ok(StartResponse { pid: pod.pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let pid = self.pod().map(|pod| pod.pid).unwrap_or(0);
        let containers = self.containers();
        let container = containers.get(&req.id).ok_or_else(|| status(Code::NOT_FOUND, &req.id))?;
        let proc = container
            .procs
            .get(&req.exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("{}/{}", req.id, req.exec_id)))?;
        let exit = *proc.exit.borrow();
        Ok(StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle: container.bundle.clone(),
            pid,
            status: match proc.state {
                State::Created | State::Starting => Status::CREATED,
                State::Running => Status::RUNNING,
                State::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: proc.paths.stdin.clone(),
            stdout: proc.paths.stdout.clone(),
            stderr: proc.paths.stderr.clone(),
            terminal: proc.paths.terminal,
            exit_status: exit.map_or(0, |exit| exit.status),
            exited_at: exit.map(|exit| timestamp(exit.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut exit = {
            let containers = self.containers();
            let proc = containers
                .get(&req.id)
                .and_then(|c| c.procs.get(&req.exec_id))
                .ok_or_else(|| status(Code::NOT_FOUND, format!("{}/{}", req.id, req.exec_id)))?;
            proc.exit.subscribe()
        };
        let ended = exit.wait_for(Option::is_some).await.map_err(|_| status(Code::NOT_FOUND, "the task went away"))?;
        let Some(ended) = *ended else { return Err(status(Code::INTERNAL, "no exit")) };
        Ok(WaitResponse {
            exit_status: ended.status,
            exited_at: Some(timestamp(ended.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod()?;
        let signal = i32::try_from(req.signal).map_err(|_| status(Code::INVALID_ARGUMENT, "no such signal"))?;
        let (role, running, execs) = {
            let containers = self.containers();
            let container = containers.get(&req.id).ok_or_else(|| status(Code::NOT_FOUND, &req.id))?;
            let proc = container
                .procs
                .get(&req.exec_id)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("{}/{}", req.id, req.exec_id)))?;
            let execs: Vec<String> = container
                .procs
                .iter()
                .filter(|(exec, proc)| !exec.is_empty() && matches!(proc.state, State::Running))
                .map(|(exec, _)| exec.clone())
                .collect();
            if matches!(proc.state, State::Starting) {
                return Err(status(Code::UNAVAILABLE, "the process is starting; signal it again"));
            }
            (container.role, matches!(proc.state, State::Running), execs)
        };
        if role == Role::Sandbox {
            // The sandbox runs nothing in the guest: a signal ends it, as it
            // would end the pause process.
            self.exited(&req.id, None, 128 + req.signal, pod.pid);
            return Ok(Empty::new());
        }
        if !running {
            // A process that never started ends with the signal; one that
            // finished is gone.
            if self.never_ran(&req.id, &req.exec_id, 128 + req.signal) {
                return Ok(Empty::new());
            }
            return Err(status(Code::NOT_FOUND, "process already finished"));
        }
        let (id, exec_id, all) = (req.id.clone(), exec_of(&req.exec_id).map(String::from), req.all);
        self.blocking(move || {
            pod.with_client(|client| {
                if all && exec_id.is_none() {
                    for exec in &execs {
                        let _ = client.signal_process(&id, Some(exec), signal);
                    }
                }
                match client.signal_process(&id, exec_id.as_deref(), signal) {
                    Err(err) if err.code() == Some(ErrorCode::WrongState) => Ok(()),
                    other => other,
                }
            })
            .map_err(agent(format!("cannot send signal {signal}")))
        })
        .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        check_id("the exec id", &req.exec_id)?;
        let any = req.spec.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "an exec without a process spec"))?;
        let mut process =
            crate::spec::exec_process(&any.value).map_err(|err| status(Code::INVALID_ARGUMENT, err.to_string()))?;
        process.terminal = process.terminal || req.terminal;
        {
            let mut containers = self.containers();
            let container = containers.get_mut(&req.id).ok_or_else(|| status(Code::NOT_FOUND, &req.id))?;
            if container.role == Role::Sandbox {
                return Err(status(Code::FAILED_PRECONDITION, "the sandbox runs no processes"));
            }
            if container.procs.contains_key(&req.exec_id) {
                return Err(status(Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
            }
            // An exec runs under its container's seccomp profile (the agent
            // requires the same one).
            process.seccomp = container.seccomp.clone();
            let paths = Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: process.terminal,
            };
            container.procs.insert(req.exec_id.clone(), Proc::new(paths, Some(process)));
        }
        self.inner.events.publish(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod()?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        let (id, exec_id) = (req.id.clone(), exec_of(&req.exec_id).map(String::from));
        self.blocking(move || {
            pod.with_client(|client| client.resize_terminal(&id, exec_id.as_deref(), rows, cols))
                .map_err(agent("cannot resize the terminal"))
        })
        .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if req.stdin {
            let pod = self.pod()?;
            let (id, exec_id) = (req.id.clone(), exec_of(&req.exec_id).map(String::from));
            self.blocking(move || {
                match pod.with_client(|client| client.write_stdin(&id, exec_id.as_deref(), &[], true)) {
                    Err(err) if !matches!(err.code(), Some(ErrorCode::StdinClosed | ErrorCode::WrongState)) => {
                        Err(agent("cannot close stdin")(err))
                    }
                    _ => Ok(()),
                }
            })
            .await?;
        }
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let pid = self.pod().map(|pod| pod.pid).unwrap_or(0);
        let exit = {
            let mut containers = self.containers();
            let container = containers.get_mut(&req.id).ok_or_else(|| status(Code::NOT_FOUND, &req.id))?;
            let proc = container
                .procs
                .get(&req.exec_id)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("{}/{}", req.id, req.exec_id)))?;
            if matches!(proc.state, State::Running) {
                return Err(status(Code::FAILED_PRECONDITION, "the process is still running"));
            }
            let exit = *proc.exit.borrow();
            if !req.exec_id.is_empty() {
                container.procs.remove(&req.exec_id);
                return Ok(DeleteResponse {
                    pid,
                    exit_status: exit.map_or(0, |exit| exit.status),
                    exited_at: exit.map(|exit| timestamp(exit.at)).into(),
                    ..Default::default()
                });
            }
            if container.procs.values().any(|proc| matches!(proc.state, State::Running)) {
                return Err(status(Code::FAILED_PRECONDITION, "an exec of the container still runs"));
            }
            if container.role == Role::Sandbox && containers.len() > 1 {
                return Err(status(Code::FAILED_PRECONDITION, "the pod still has containers"));
            }
            exit
        };
        let Some(container) = self.containers().remove(&req.id) else {
            return Err(status(Code::NOT_FOUND, &req.id));
        };
        if container.in_guest
            && let Ok(pod) = self.pod()
        {
            let (id, layers) = (req.id.clone(), container.layers.clone());
            self.blocking(move || {
                tear_down(&pod, &id, &layers, true, true);
                Ok(())
            })
            .await?;
        }
        if matches!(container.role, Role::Sandbox | Role::Standalone) {
            let service = self.clone();
            tokio::task::spawn_blocking(move || service.stop_pod()).await.map_err(|err| status(Code::INTERNAL, err))?;
        }
        let exit_status = exit.map_or(0, |exit| exit.status);
        let exited_at = timestamp(exit.map_or_else(SystemTime::now, |exit| exit.at));
        self.inner.events.publish(Event::Delete(TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status,
            exited_at: Some(exited_at.clone()).into(),
            ..Default::default()
        }));
        Ok(DeleteResponse { pid, exit_status, exited_at: Some(exited_at).into(), ..Default::default() })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pid = self.pod()?.pid;
        if !self.containers().contains_key(&req.id) {
            return Err(status(Code::NOT_FOUND, &req.id));
        }
        let mut info = containerd_shim_protos::api::ProcessInfo::new();
        info.pid = pid;
        Ok(PidsResponse { processes: vec![info], ..Default::default() })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod()?;
        let any =
            req.resources.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "an update without resources"))?;
        let resources: crate::spec::SpecResources = serde_json::from_slice(&any.value)
            .map_err(|err| status(Code::INVALID_ARGUMENT, format!("the resources are not LinuxResources: {err}")))?;
        let spec = Spec {
            linux: Some(crate::spec::Linux { resources: Some(resources), ..Default::default() }),
            ..Default::default()
        };
        let resources = spec.resources().unwrap_or_default();
        let id = req.id.clone();
        self.blocking(move || {
            pod.with_client(|client| client.update_container(&id, &resources))
                .map_err(agent("cannot update the container"))
        })
        .await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        use containerd_shim_protos::protobuf::Message as _;
        let pod = self.pod()?;
        let in_guest = self.containers().get(&req.id).map(|container| container.in_guest);
        let stats = match in_guest {
            None => return Err(status(Code::NOT_FOUND, &req.id)),
            // The sandbox is no container in the guest: it uses nothing.
            Some(false) => parma_protocol::ContainerStats::default(),
            Some(true) => {
                let id = req.id.clone();
                self.blocking(move || {
                    pod.with_client(|client| client.container_stats(&id))
                        .map_err(agent("cannot read the container's statistics"))
                })
                .await?
            }
        };
        let bytes = metrics(&stats)
            .write_to_bytes()
            .map_err(|err| status(Code::INTERNAL, format!("cannot encode the statistics: {err}")))?;
        let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
        any.type_url = METRICS_TYPE.into();
        any.value = bytes;
        Ok(StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod().map(|pod| pod.pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.containers().is_empty() {
            let service = self.clone();
            tokio::task::spawn_blocking(move || service.stop_pod()).await.map_err(|err| status(Code::INTERNAL, err))?;
            self.inner.exit.notify_one();
        }
        Ok(Empty::new())
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim_protos::api::PauseRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "pause is not implemented for confidential containers"))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim_protos::api::ResumeRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "resume is not implemented for confidential containers"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim_protos::api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(Code::UNIMPLEMENTED, "a confidential container's memory is not the host's to checkpoint"))
    }
}

/// The type containerd's CRI reads a task's statistics as (cgroup v2).
pub const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// A container's statistics as containerd's cgroup v2 metrics.
pub fn metrics(stats: &parma_protocol::ContainerStats) -> containerd_shim_protos::cgroups_v2::metrics::Metrics {
    use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
    let mut metrics = Metrics::new();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = stats.cpu_usage_usec;
    cpu.user_usec = stats.cpu_user_usec;
    cpu.system_usec = stats.cpu_system_usec;
    cpu.nr_periods = stats.cpu_nr_periods;
    cpu.nr_throttled = stats.cpu_nr_throttled;
    cpu.throttled_usec = stats.cpu_throttled_usec;
    metrics.set_cpu(cpu);
    let mut memory = MemoryStat::new();
    memory.usage = stats.memory_usage;
    memory.usage_limit = stats.memory_limit;
    memory.anon = stats.memory_anon;
    memory.file = stats.memory_file;
    memory.inactive_file = stats.memory_inactive_file;
    memory.active_file = stats.memory_active_file;
    memory.pgfault = stats.memory_pgfault;
    memory.pgmajfault = stats.memory_pgmajfault;
    metrics.set_memory(memory);
    let mut events = MemoryEvents::new();
    events.oom_kill = stats.memory_oom_kill;
    metrics.set_memory_events(events);
    let mut pids = PidsStat::new();
    pids.current = stats.pids_current;
    pids.limit = stats.pids_limit;
    metrics.set_pids(pids);
    metrics
}

impl Service {
    /// Shut the pod's UVM down, if it runs.
    fn stop_pod(&self) {
        let pod = self.inner.pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(pod) = pod {
            pod.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::api::Mount;

    #[test]
    fn only_the_agents_own_refusal_says_nothing_was_made() {
        use parma_host::ClientError;
        let refused = ClientError::Agent(parma_protocol::AgentError::new(ErrorCode::PolicyDenied, "no"));
        assert!(!made_or_unknown::<()>(&Err(refused)));
        assert!(made_or_unknown(&Ok(())));
        assert!(made_or_unknown::<()>(&Err(ClientError::Timeout(std::time::Duration::from_secs(60)))));
        assert!(made_or_unknown::<()>(&Err(ClientError::Closed)));
    }

    #[test]
    fn statistics_are_containerds_cgroup_v2_metrics() {
        use containerd_shim_protos::protobuf::Message as _;
        let stats = parma_protocol::ContainerStats {
            cpu_usage_usec: 1500,
            memory_usage: 4096,
            memory_limit: u64::MAX,
            memory_inactive_file: 512,
            pids_current: 3,
            pids_limit: 64,
            memory_oom_kill: 1,
            ..Default::default()
        };
        let bytes = metrics(&stats).write_to_bytes().unwrap();
        let decoded = containerd_shim_protos::cgroups_v2::metrics::Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded.cpu.usage_usec, 1500);
        assert_eq!(
            (decoded.memory.usage, decoded.memory.usage_limit, decoded.memory.inactive_file),
            (4096, u64::MAX, 512)
        );
        assert_eq!((decoded.pids.current, decoded.pids.limit), (3, 64));
        assert_eq!(decoded.memory_events.oom_kill, 1);
        assert_eq!(METRICS_TYPE, "io.containerd.cgroups.v2.Metrics");
    }

    fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            type_: kind.into(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn layers_come_only_from_the_snapshotters_mount() {
        let layers = layers_of(&[mount(
            "bind",
            "/var/lib/parma-snapshotter/users/ab",
            &["ro", "rbind", "parma-layer=ab:4096:/var/lib/p/l0.img", "parma-layer=cd:8192:/var/lib/p:x/l1.img"],
        )])
        .unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(
            layers[1],
            LayerDisk { path: "/var/lib/p:x/l1.img".into(), root_hash: "cd".into(), hash_offset: 8192 }
        );
        assert!(layers_of(&[]).unwrap_err().contains("parma snapshotter"));
        assert!(layers_of(&[mount("overlay", "overlay", &["lowerdir=/a"])]).unwrap_err().contains("\"overlay\""));
        assert!(layers_of(&[mount("bind", "/u", &["parma-layer=ab:x:/l"])]).unwrap_err().contains("not a number"));
        assert!(layers_of(&[mount("bind", "/u", &["parma-layer=ab:1"])]).is_err());
        assert!(layers_of(&[mount("bind", "/u", &["parma-layer=ab:1:relative"])]).is_err());
        let two = [mount("bind", "/u", &["parma-layer=ab:1:/l"]), mount("bind", "/u", &["parma-layer=ab:1:/l"])];
        assert!(layers_of(&two).unwrap_err().contains("2 rootfs mounts"));
    }

    #[test]
    fn ids_the_agent_cannot_take_are_refused_here() {
        assert!(check_id("id", "0123abcdef-_x").is_ok());
        for bad in ["", "Upper", "a.b", "a/b", &"x".repeat(65)] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_policy_denial_is_permission_denied_with_the_agents_words() {
        let denial = parma_protocol::AgentError::new(ErrorCode::PolicyDenied, "create_container: no container matches");
        let err = rpc(PodError::Agent { what: "cannot create".into(), source: parma_host::ClientError::Agent(denial) });
        let ttrpc::Error::RpcStatus(status) = err else { panic!("{err:?}") };
        assert_eq!(status.code(), Code::PERMISSION_DENIED);
        assert!(status.message().contains("no container matches"), "{}", status.message());
    }
}
