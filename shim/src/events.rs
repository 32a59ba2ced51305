//! Task events to containerd: `Forward` on its ttrpc events service
//! (`TTRPC_ADDRESS`), from a queue so a handler never waits on containerd.

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// One event, as containerd names it.
#[derive(Debug, Clone)]
pub enum Event {
    /// `/tasks/create`.
    Create(TaskCreate),
    /// `/tasks/start`.
    Start(TaskStart),
    /// `/tasks/exit`.
    Exit(TaskExit),
    /// `/tasks/delete`.
    Delete(TaskDelete),
    /// `/tasks/exec-added`.
    ExecAdded(TaskExecAdded),
    /// `/tasks/exec-started`.
    ExecStarted(TaskExecStarted),
}

impl Event {
    /// The topic and the type URL containerd's registry knows the event by.
    pub fn topic(&self) -> (&'static str, &'static str) {
        match self {
            Event::Create(_) => ("/tasks/create", "containerd.events.TaskCreate"),
            Event::Start(_) => ("/tasks/start", "containerd.events.TaskStart"),
            Event::Exit(_) => ("/tasks/exit", "containerd.events.TaskExit"),
            Event::Delete(_) => ("/tasks/delete", "containerd.events.TaskDelete"),
            Event::ExecAdded(_) => ("/tasks/exec-added", "containerd.events.TaskExecAdded"),
            Event::ExecStarted(_) => ("/tasks/exec-started", "containerd.events.TaskExecStarted"),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>, containerd_shim_protos::protobuf::Error> {
        match self {
            Event::Create(event) => event.write_to_bytes(),
            Event::Start(event) => event.write_to_bytes(),
            Event::Exit(event) => event.write_to_bytes(),
            Event::Delete(event) => event.write_to_bytes(),
            Event::ExecAdded(event) => event.write_to_bytes(),
            Event::ExecStarted(event) => event.write_to_bytes(),
        }
    }

    /// The envelope `Forward` carries.
    pub fn envelope(&self, namespace: &str) -> Result<Envelope, containerd_shim_protos::protobuf::Error> {
        let (topic, type_url) = self.topic();
        let mut any = Any::new();
        any.type_url = type_url.into();
        any.value = self.bytes()?;
        let mut envelope = Envelope::new();
        envelope.timestamp = Some(Timestamp::now()).into();
        envelope.namespace = namespace.into();
        envelope.topic = topic.into();
        envelope.event = Some(any).into();
        Ok(envelope)
    }
}

/// Queues events for containerd, in order.
#[derive(Debug, Clone)]
pub struct Publisher {
    queue: mpsc::UnboundedSender<Event>,
    /// Events queued and not yet handed to containerd (or given up on).
    pending: Arc<AtomicUsize>,
}

impl Publisher {
    /// A publisher to the ttrpc address (`unix:///...`); none: events are
    /// only logged (a shim started by hand).
    pub fn start(address: Option<String>, namespace: String) -> Self {
        // containerd 1.6 gives TTRPC_ADDRESS as a bare path.
        let address = address.map(|a| if a.contains("://") { a } else { format!("unix://{a}") });
        let (queue, mut events) = mpsc::unbounded_channel::<Event>();
        let pending = Arc::new(AtomicUsize::new(0));
        let done = pending.clone();
        tokio::spawn(async move {
            let mut client: Option<EventsClient> = None;
            while let Some(event) = events.recv().await {
                forward(&mut client, address.as_deref(), &namespace, &event).await;
                done.fetch_sub(1, Ordering::SeqCst);
            }
        });
        Self { queue, pending }
    }

    /// Queue an event.
    pub fn publish(&self, event: Event) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.queue.send(event).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("the event queue is gone");
        }
    }

    /// Wait until every queued event went out, at most `timeout`.
    pub async fn flush(&self, timeout: std::time::Duration) {
        let give_up = tokio::time::Instant::now() + timeout;
        while self.pending.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Hand one event to containerd, reconnecting once.
async fn forward(client: &mut Option<EventsClient>, address: Option<&str>, namespace: &str, event: &Event) {
    let Some(address) = address else {
        tracing::info!(topic = event.topic().0, "event (no containerd to tell)");
        return;
    };
    let envelope = match event.envelope(namespace) {
        Ok(envelope) => envelope,
        Err(err) => {
            tracing::error!("cannot encode an event: {err}");
            return;
        }
    };
    let mut request = ForwardRequest::new();
    request.envelope = Some(envelope).into();
    // One reconnection per event: containerd may have restarted.
    for _ in 0..2 {
        if client.is_none() {
            match Client::connect(address).await {
                Ok(connected) => *client = Some(EventsClient::new(connected)),
                Err(err) => {
                    tracing::warn!("cannot reach containerd at {address}: {err}");
                    return;
                }
            }
        }
        let Some(events) = client.as_ref() else { return };
        let context = containerd_shim_protos::ttrpc::context::with_timeout(5_000_000_000);
        match events.forward(context, &request).await {
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(topic = event.topic().0, "cannot forward an event: {err}");
                *client = None;
            }
        }
    }
}
