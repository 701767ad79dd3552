//! The agent handle and the state its tasks share: the leaf of the crate's module graph.
//!
//! Everything here is data plus synchronous accessors (and waits on that data): [`Agent`], the
//! handle users hold; [`Shared`], the state shared by the handles, the session task, the lane
//! tasks and the serving tasks; [`Settings`]; [`Link`], the state of the attachment as
//! invocations see it; [`ConnSet`], the connections of one attachment; and [`Command`], what
//! the API asks of the session task. The `impl Agent` blocks that do I/O live with that I/O:
//! attaching and the control-stream operations in `session.rs`, invoking in `invoke.rs`,
//! leaving on a signal in `signal.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{DiscoveryEntry, SessionId};
use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::ConnectionCode;
use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout_at, Instant};

use crate::config::Backoff;
use crate::control::close_code;
use crate::error::{AgentError, InvokeError};

/// A connected, attached agent: serves its capabilities and invokes others'.
///
/// `Agent` is a cheap handle (clone it freely). The agent stays attached, and reconnects after
/// a gateway restart, for as long as a handle exists; [`Agent::detach`] leaves gracefully, and
/// dropping the last handle closes the connections at once.
#[derive(Clone)]
pub struct Agent {
    handle: Arc<Handle>,
}

/// The shared part of every [`Agent`] clone; dropping the last one shuts the agent down.
struct Handle {
    shared: Arc<Shared>,
    /// The agent's serving state (`serve::Server`: its handlers), once attached, for
    /// [`Agent::serve_connection`]. Type-erased so that this module stays below `serve` in the
    /// crate's module order.
    server: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Agent {
    /// The first handle on `shared`; `shared` keeps a weak reference to it for
    /// [`Shared::agent`].
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Agent {
        let handle = Arc::new(Handle {
            shared: shared.clone(),
            server: OnceLock::new(),
        });
        let _ = shared.handle.set(Arc::downgrade(&handle));
        Agent { handle }
    }

    /// The current session, while attached.
    pub fn session(&self) -> Option<SessionId> {
        match &*self.shared().link.borrow() {
            Link::Attached(set) => Some(set.session),
            _ => None,
        }
    }

    /// How many lane connections are open (0 when the gateway offers none).
    pub fn lanes(&self) -> usize {
        match &*self.shared().link.borrow() {
            Link::Attached(set) => set.lane_count(),
            _ => 0,
        }
    }

    /// Whether the agent is attached now (not reconnecting, not draining, not closed).
    pub fn is_attached(&self) -> bool {
        matches!(&*self.shared().link.borrow(), Link::Attached(_))
    }

    /// Waits until the agent is attached (for example after a gateway restart), at most
    /// `timeout`. Returns whether it is.
    pub async fn wait_attached(&self, timeout: Duration) -> bool {
        self.shared()
            .attached(Instant::now() + timeout)
            .await
            .is_ok()
    }

    /// The agent's own identity, from its certificate.
    pub fn identity(&self) -> &SpiffeId {
        &self.shared().identity
    }

    /// The latest card the gateway accepted.
    pub fn card(&self) -> AgentCard {
        lock(&self.shared().card).clone()
    }

    /// The capabilities of the card that the gateway does not route to this agent because the
    /// domain's policy does not let it advertise them: as `ATTACH_OK` listed them, then as the
    /// latest `CAPABILITIES_REFUSED` (sent when a new policy changes the list) replaced them.
    /// Empty when everything is routed.
    pub fn refused(&self) -> Vec<String> {
        lock(&self.shared().refused).clone()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    pub(crate) fn set_server(&self, server: Arc<dyn std::any::Any + Send + Sync>) {
        let _ = self.handle.server.set(server);
    }

    pub(crate) fn server(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.handle.server.get().cloned()
    }
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("identity", &self.shared().identity.as_str())
            .field("gateway", &self.shared().settings.gateway)
            .field("session", &self.session())
            .field("lanes", &self.lanes())
            .finish()
    }
}

/// The answer to [`Agent::discovery`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Discovery {
    /// The capabilities found.
    pub entries: Vec<DiscoveryEntry>,
    /// Whether the gateway left entries out to keep its answer within its size limit (a
    /// narrower prefix or tag finds the rest).
    pub truncated: bool,
}

/// The configuration values the running agent needs.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) gateway: SocketAddr,
    pub(crate) max_concurrent: u32,
    pub(crate) lanes: bool,
    pub(crate) reconnect: Backoff,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_response_bytes: usize,
    pub(crate) max_request_bytes: usize,
}

/// State shared by the agent handles, the session task, the lane tasks and the serving tasks.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) identity: SpiffeId,
    /// The latest card the gateway accepted: what a re-attach sends.
    pub(crate) card: Mutex<AgentCard>,
    pub(crate) endpoint: Endpoint,
    pub(crate) link: watch::Sender<Link>,
    pub(crate) commands: mpsc::Sender<Command>,
    /// Set to `true` when the agent must close at once.
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) next_connection: AtomicUsize,
    /// The agent handle, for handlers that invoke other capabilities; weak so that it does not
    /// keep the agent alive.
    handle: OnceLock<Weak<Handle>>,
    /// The runtime the agent was attached on, for work started from synchronous calls.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Capabilities of the card the domain's policy does not route to this agent, as the
    /// gateway last said (`ATTACH_OK`, `CAPABILITIES_REFUSED`).
    pub(crate) refused: Mutex<Vec<String>>,
}

/// Capacity of the channel of commands to the session task.
const COMMAND_QUEUE: usize = 64;

impl Shared {
    /// The state of an agent that is not attached yet, with the receiving ends of its command
    /// and shutdown channels (for the session task).
    pub(crate) fn new(
        settings: Settings,
        identity: SpiffeId,
        card: AgentCard,
        endpoint: Endpoint,
    ) -> (Arc<Self>, mpsc::Receiver<Command>, watch::Receiver<bool>) {
        let (link, _) = watch::channel(Link::Connecting);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let shared = Arc::new(Self {
            settings,
            identity,
            card: Mutex::new(card),
            endpoint,
            link,
            commands,
            shutdown,
            next_connection: AtomicUsize::new(0),
            handle: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            refused: Mutex::new(Vec::new()),
        });
        (shared, command_rx, shutdown_rx)
    }

    /// A handle on the agent, unless it is shutting down.
    pub(crate) fn agent(&self) -> Option<Agent> {
        let handle = self.handle.get()?.upgrade()?;
        Some(Agent { handle })
    }

    /// An open connection to start an invocation on, waiting for (re-)attachment until
    /// `deadline`.
    pub(crate) async fn connection(&self, deadline: Instant) -> Result<Connection, InvokeError> {
        self.wait_link(deadline, |set| set.pick(&self.next_connection))
            .await
    }

    /// The attached connection set, waiting for it until `deadline`.
    pub(crate) async fn attached(&self, deadline: Instant) -> Result<Arc<ConnSet>, InvokeError> {
        self.wait_link(deadline, |set| Some(set.clone())).await
    }

    /// Waits until `deadline` for an attachment from which `take` gets something.
    async fn wait_link<T>(
        &self,
        deadline: Instant,
        take: impl Fn(&Arc<ConnSet>) -> Option<T>,
    ) -> Result<T, InvokeError> {
        let mut link = self.link.subscribe();
        loop {
            match &*link.borrow_and_update() {
                Link::Attached(set) => {
                    // `None`: every connection of the set is closed, and the session task is
                    // about to publish that; wait for it.
                    if let Some(value) = take(set) {
                        return Ok(value);
                    }
                }
                Link::Closed => return Err(InvokeError::Closed),
                Link::Connecting => {}
            }
            match timeout_at(deadline, link.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(InvokeError::Closed),
                Err(_) => return Err(InvokeError::Disconnected),
            }
        }
    }

    /// Publishes `link` unless the agent is already closed.
    pub(crate) fn publish(&self, link: Link) {
        self.link.send_if_modified(|current| {
            if matches!(current, Link::Closed) {
                return false;
            }
            *current = link;
            true
        });
    }
}

/// The state of the attachment, as invocations see it.
#[derive(Clone)]
pub(crate) enum Link {
    /// Not attached: connecting, reconnecting, or draining. Invocations wait.
    Connecting,
    /// Attached; invocations use these connections.
    Attached(Arc<ConnSet>),
    /// Detached or shut down for good.
    Closed,
}

/// The connections of one attachment: the primary and the lanes that are open.
#[derive(Debug)]
pub(crate) struct ConnSet {
    pub(crate) session: SessionId,
    pub(crate) primary: Connection,
    /// `(worker index, connection)` of the open lanes.
    lanes: Mutex<Vec<(u64, Connection)>>,
}

impl ConnSet {
    /// A set of just the primary connection.
    pub(crate) fn new(session: SessionId, primary: Connection) -> Self {
        Self {
            session,
            primary,
            lanes: Mutex::new(Vec::new()),
        }
    }

    /// The next open connection in round-robin order.
    fn pick(&self, counter: &AtomicUsize) -> Option<Connection> {
        let lanes = lock(&self.lanes);
        let n = lanes.len() + 1;
        let start = counter.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let connection = match (start + i) % n {
                0 => &self.primary,
                k => &lanes[k - 1].1,
            };
            if connection.close_reason().is_none() {
                return Some(connection.clone());
            }
        }
        None
    }

    pub(crate) fn lane_count(&self) -> usize {
        lock(&self.lanes).len()
    }

    pub(crate) fn add_lane(&self, worker: u64, connection: Connection) {
        lock(&self.lanes).push((worker, connection));
    }

    pub(crate) fn remove_lane(&self, worker: u64) {
        lock(&self.lanes).retain(|(w, _)| *w != worker);
    }

    /// Closes the primary and every lane.
    pub(crate) fn close(&self, code: ConnectionCode, reason: &[u8]) {
        let code = close_code(code);
        for (_, lane) in lock(&self.lanes).drain(..) {
            lane.close(code, reason);
        }
        self.primary.close(code, reason);
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical section
/// here is a single push, retain, read or replacement).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request from the API to the session task.
pub(crate) enum Command {
    Discover {
        prefix: String,
        tag: String,
        on_behalf_of: String,
        reply: oneshot::Sender<Result<Discovery, AgentError>>,
    },
    UpdateCard {
        card: AgentCard,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Detach {
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
}

impl Command {
    /// Answers the command with `error` (it cannot be carried out).
    pub(crate) fn fail(self, error: impl FnOnce() -> AgentError) {
        match self {
            Self::Discover { reply, .. } => drop(reply.send(Err(error()))),
            Self::UpdateCard { reply, .. } => drop(reply.send(Err(error()))),
            Self::Detach { reply } => drop(reply.send(Err(error()))),
        }
    }
}
