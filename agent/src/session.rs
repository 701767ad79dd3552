//! The agent handle and the background task that owns its connections to the gateway.
//!
//! # Connection set
//!
//! An attachment is a *primary* connection, on which the agent sent `ATTACH`, plus one *lane*
//! connection per other gateway worker (see [`ConnSet`]). All of them carry invocations both
//! ways; outgoing invocations go round-robin over the open ones.
//!
//! # The session task
//!
//! One tokio task per agent ([`run`]) owns the control stream of the primary connection. API
//! calls that use the control stream (`discover`, `update_card`, `detach`) send it a
//! [`Command`] and wait for the answer on a oneshot channel. The task publishes the state of
//! the attachment in a `watch` channel ([`Link`]), which invocations read to pick a connection
//! or to wait for one.
//!
//! When the primary connection is lost, the task closes the lanes, publishes
//! [`Link::Connecting`], and reconnects with exponential backoff and jitter, re-attaching with
//! the latest accepted card. A `DRAIN` from the gateway publishes `Connecting` at once (no new
//! invocations start on the draining gateway), lets in-flight ones finish, and reconnects once
//! the gateway closes the connection (or the announced grace period has passed).
//!
//! Each lane has a task of its own that opens the lane, registers it in the [`ConnSet`], and
//! reopens it with backoff when it fails; a lane failing never affects the attachment.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{ControlFrame, DiscoveryEntry, LaneToken, SessionId};
use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::ConnectionCode;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

use crate::config::Backoff;
use crate::control::{close_code, frame_name, ControlError, ControlStream};
use crate::invoke::RequestBuilder;
use crate::tls::{client_config, SERVER_NAME};
use crate::{serve, AgentConfig, AgentError, Handlers, InvokeError, Reply};

/// Most control-stream queries (discover, card update) awaiting an answer at once.
const MAX_PENDING_QUERIES: usize = 1024;
/// Extra time granted after a `DRAIN`'s grace period before the agent closes the connection
/// itself.
const DRAIN_SLACK: Duration = Duration::from_secs(1);
/// Longest drain grace period honoured; a larger one is capped.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(300);
/// An attachment that lasted this long resets the reconnect backoff.
const STABLE_ATTACHMENT: Duration = Duration::from_secs(10);

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
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Agent {
    /// Connects to the gateway, attaches with the configured card, and opens the lanes the
    /// gateway offers. Returns once attached; the lanes open in the background.
    ///
    /// Fails if the configuration is invalid, the handshake fails (including when the
    /// gateway's certificate does not name a gateway of the agent's trust domain), or the
    /// gateway refuses the attach. After that first attach, losing the gateway is handled by
    /// reconnecting, not by failing.
    pub async fn attach(config: AgentConfig, handlers: Handlers) -> Result<Agent, AgentError> {
        config.validate()?;
        for capability in config.card.capabilities() {
            if handlers.capabilities().all(|c| c != capability) {
                tracing::warn!(
                    capability,
                    "the card advertises a capability with no handler; requests for it will \
                     be answered NO_ROUTE"
                );
            }
        }
        let (client, identity) = client_config(
            config.cert_chain,
            config.private_key,
            &config.trust_anchors,
            config.max_concurrent,
        )?;
        let bind: SocketAddr = match config.gateway {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut endpoint = Endpoint::client(bind)?;
        endpoint.set_default_client_config(client);

        let (link, _) = watch::channel(Link::Connecting);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (commands, command_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            settings: Settings {
                gateway: config.gateway,
                max_concurrent: config.max_concurrent,
                lanes: config.lanes,
                reconnect: config.reconnect,
                request_timeout: config.request_timeout,
                connect_timeout: config.connect_timeout,
                max_response_bytes: config.max_response_bytes,
                max_request_bytes: config.max_request_bytes,
            },
            identity,
            card: Mutex::new(config.card),
            handlers,
            endpoint,
            link,
            commands,
            shutdown,
            next_connection: AtomicUsize::new(0),
            handle: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        let attached = match attach_once(&shared).await {
            Ok(attached) => attached,
            Err(e) => {
                shared
                    .endpoint
                    .close(close_code(ConnectionCode::NoError), b"attach failed");
                return Err(e);
            }
        };
        shared.publish(Link::Attached(attached.set.clone()));
        let handle = Arc::new(Handle {
            shared: shared.clone(),
        });
        let _ = shared.handle.set(Arc::downgrade(&handle));
        tracing::info!(
            agent = %shared.identity,
            session = attached.session.0,
            lanes = attached.lanes.len().saturating_sub(1),
            "attached"
        );
        tokio::spawn(run(shared, command_rx, shutdown_rx, attached));
        Ok(Agent { handle })
    }

    /// Invokes `capability` with a whole payload and returns the whole answer, using the
    /// default deadline (`request_timeout`).
    ///
    /// Shorthand for `agent.request(capability).send(payload)`; see
    /// [`RequestBuilder::send`].
    pub async fn invoke(
        &self,
        capability: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Reply, InvokeError> {
        self.request(capability).send(payload).await
    }

    /// Prepares an invocation of `capability` with options (deadline, content type, trace
    /// context) and a whole or streamed payload.
    pub fn request(&self, capability: &str) -> RequestBuilder {
        RequestBuilder::new(self.clone(), capability)
    }

    /// Asks the gateway which capabilities this agent may invoke: those whose name starts
    /// with `prefix` and that carry tag `tag` (empty strings match everything).
    ///
    /// If the gateway truncated the answer to its size limit, the entries it sent are
    /// returned.
    pub async fn discover(
        &self,
        prefix: &str,
        tag: &str,
    ) -> Result<Vec<DiscoveryEntry>, AgentError> {
        let (reply, answer) = oneshot::channel();
        self.command(
            Command::Discover {
                prefix: prefix.to_owned(),
                tag: tag.to_owned(),
                reply,
            },
            answer,
            "waiting for DISCOVER_RESULT",
        )
        .await
    }

    /// Replaces the agent's card (and so its capabilities). The new card is also the one used
    /// when re-attaching after a reconnect.
    ///
    /// The handlers are those given to [`Agent::attach`]: a new capability needs a handler
    /// registered there.
    pub async fn update_card(&self, card: AgentCard) -> Result<(), AgentError> {
        card.validate()?;
        let (reply, answer) = oneshot::channel();
        self.command(
            Command::UpdateCard { card, reply },
            answer,
            "waiting for UPDATE_RESULT",
        )
        .await
    }

    /// Leaves gracefully: asks the gateway to stop routing to this agent, waits (at most
    /// `request_timeout`) until the requests in flight to it have finished (`DETACHED`), then
    /// closes every connection. Every clone of this handle is closed too; their invocations
    /// still in flight fail with [`InvokeError::ConnectionLost`].
    ///
    /// Detaching while disconnected just closes the agent.
    pub async fn detach(self) -> Result<(), AgentError> {
        let shared = self.shared().clone();
        let (reply, answer) = oneshot::channel();
        if shared
            .commands
            .send(Command::Detach { reply })
            .await
            .is_err()
        {
            return Err(AgentError::Closed);
        }
        // The session task bounds the wait for DETACHED; this bound only guards against the
        // task itself being gone.
        let bound = shared.settings.request_timeout + shared.settings.connect_timeout;
        match timeout(bound, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => Err(AgentError::Timeout("waiting for DETACHED")),
        }
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

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Sends a control command once attached, and waits for its answer; all within
    /// `request_timeout`.
    async fn command<T>(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<T, AgentError>>,
        waiting: &'static str,
    ) -> Result<T, AgentError> {
        let shared = self.shared();
        let deadline = Instant::now() + shared.settings.request_timeout;
        shared.attached(deadline).await.map_err(|e| match e {
            InvokeError::Closed => AgentError::Closed,
            _ => AgentError::Disconnected,
        })?;
        if shared.commands.send(command).await.is_err() {
            return Err(AgentError::Closed);
        }
        match timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => Err(AgentError::Timeout(waiting)),
        }
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
    identity: SpiffeId,
    /// The latest card the gateway accepted: what a re-attach sends.
    card: Mutex<AgentCard>,
    pub(crate) handlers: Handlers,
    endpoint: Endpoint,
    link: watch::Sender<Link>,
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    next_connection: AtomicUsize,
    /// The agent handle, for handlers that invoke other capabilities; weak so that it does not
    /// keep the agent alive.
    handle: OnceLock<Weak<Handle>>,
    /// The runtime the agent was attached on, for work started from synchronous calls.
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Shared {
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
    async fn attached(&self, deadline: Instant) -> Result<Arc<ConnSet>, InvokeError> {
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
    fn publish(&self, link: Link) {
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
enum Link {
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
    session: SessionId,
    primary: Connection,
    /// `(worker index, connection)` of the open lanes.
    lanes: Mutex<Vec<(u64, Connection)>>,
}

impl ConnSet {
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

    fn lane_count(&self) -> usize {
        lock(&self.lanes).len()
    }

    fn add_lane(&self, worker: u64, connection: Connection) {
        lock(&self.lanes).push((worker, connection));
    }

    fn remove_lane(&self, worker: u64) {
        lock(&self.lanes).retain(|(w, _)| *w != worker);
    }

    /// Closes the primary and every lane.
    fn close(&self, code: ConnectionCode, reason: &[u8]) {
        let code = close_code(code);
        for (_, lane) in lock(&self.lanes).drain(..) {
            lane.close(code, reason);
        }
        self.primary.close(code, reason);
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical section
/// here is a single push, retain or read).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request from the API to the session task.
enum Command {
    Discover {
        prefix: String,
        tag: String,
        reply: oneshot::Sender<Result<Vec<DiscoveryEntry>, AgentError>>,
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
    fn fail(self, error: impl FnOnce() -> AgentError) {
        match self {
            Self::Discover { reply, .. } => drop(reply.send(Err(error()))),
            Self::UpdateCard { reply, .. } => drop(reply.send(Err(error()))),
            Self::Detach { reply } => drop(reply.send(Err(error()))),
        }
    }
}

/// The outcome of a successful attach.
struct Attached {
    set: Arc<ConnSet>,
    control: ControlStream,
    session: SessionId,
    lane_token: LaneToken,
    worker: u64,
    lanes: Vec<String>,
    /// The per-connection concurrency limit the gateway announced (0: none).
    gateway_limit: u64,
}

/// Connects to the gateway and attaches, all within `connect_timeout`.
async fn attach_once(shared: &Arc<Shared>) -> Result<Attached, AgentError> {
    let gateway = shared.settings.gateway;
    let connection = connect(shared, gateway).await?;
    let card = lock(&shared.card).to_json();
    let exchange = async {
        let mut control = ControlStream::open(&connection).await?;
        control
            .send(&ControlFrame::Attach {
                max_concurrent: u64::from(shared.settings.max_concurrent),
                card,
            })
            .await?;
        loop {
            match control.next().await? {
                ControlFrame::AttachOk {
                    session,
                    lane_token,
                    worker,
                    lanes,
                    max_concurrent,
                } => {
                    return Ok(Ok((
                        control,
                        session,
                        lane_token,
                        worker,
                        lanes,
                        max_concurrent,
                    )))
                }
                ControlFrame::AttachRefused { refusal, reason } => {
                    return Ok(Err(AgentError::Refused { refusal, reason }))
                }
                ControlFrame::Unknown { .. } => {}
                other => {
                    return Ok(Err(AgentError::Protocol(format!(
                        "expected ATTACH_OK, got {}",
                        frame_name(&other)
                    ))))
                }
            }
        }
    };
    let result: Result<Result<_, AgentError>, ControlError> =
        match timeout(shared.settings.connect_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Ok(Err(AgentError::Timeout("waiting for ATTACH_OK"))),
        };
    let (control, session, lane_token, worker, lanes, max_concurrent) = match result {
        Ok(Ok(attached)) => attached,
        Ok(Err(e)) => {
            let code = match e {
                AgentError::Protocol(_) => ConnectionCode::ProtocolViolation,
                _ => ConnectionCode::NoError,
            };
            connection.close(close_code(code), b"attach failed");
            return Err(e);
        }
        Err(e) => {
            connection.close(close_code(e.close_code()), b"attach failed");
            return Err(control_error(e));
        }
    };
    limit_streams(&connection, shared.settings.max_concurrent, max_concurrent);
    Ok(Attached {
        set: Arc::new(ConnSet {
            session,
            primary: connection,
            lanes: Mutex::new(Vec::new()),
        }),
        control,
        session,
        lane_token,
        worker,
        lanes,
        gateway_limit: max_concurrent,
    })
}

/// Opens a QUIC connection to `addr`, bounded by `connect_timeout`.
async fn connect(shared: &Shared, addr: SocketAddr) -> Result<Connection, AgentError> {
    let connecting = shared
        .endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|source| AgentError::Connect { addr, source })?;
    match timeout(shared.settings.connect_timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(AgentError::Handshake { addr, source }),
        Err(_) => Err(AgentError::Timeout("connecting to the gateway")),
    }
}

/// Lowers the limit of gateway-opened streams to what the gateway said it applies, when that
/// is lower than ours.
/// Lowers the stream credit to twice the gateway's per-worker limit when that is below ours
/// (the headroom covers credit that is still on its way back; see `tls.rs`).
fn limit_streams(connection: &Connection, ours: u32, gateway: u64) {
    if gateway > 0 && gateway < u64::from(ours) {
        if let Ok(limit) = VarInt::from_u64(gateway.saturating_mul(2)) {
            connection.set_max_concurrent_bi_streams(limit);
        }
    }
}

fn control_error(e: ControlError) -> AgentError {
    match e {
        ControlError::ConnectionLost(e) => AgentError::ConnectionLost(e),
        ControlError::Decode(e) => AgentError::Protocol(format!("malformed control frame: {e}")),
        ControlError::Closed => AgentError::Protocol("the control stream was closed".into()),
        ControlError::Encode(e) => AgentError::Protocol(format!("cannot encode a frame: {e}")),
        ControlError::Stalled => AgentError::Timeout("writing to the control stream"),
    }
}

/// How an attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The primary connection was lost or drained: reconnect.
    Lost,
    /// Detached, or every handle dropped: stop.
    Closed,
}

/// The session task: drives attachments and reconnects until the agent is closed.
async fn run(
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<bool>,
    first: Attached,
) {
    let mut next = Some(first);
    let mut attempt: u32 = 0;
    loop {
        let attached = match next.take() {
            Some(attached) => attached,
            None => {
                shared.publish(Link::Connecting);
                let delay = shared.settings.reconnect.next_delay(attempt);
                attempt = attempt.saturating_add(1);
                let reconnect = async {
                    sleep(delay).await;
                    attach_once(&shared).await
                };
                match while_serving_commands(reconnect, &mut commands, &mut shutdown).await {
                    None => break,
                    Some(Ok(attached)) => {
                        tracing::info!(session = attached.session.0, "re-attached");
                        attached
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, attempt, "reconnect failed");
                        continue;
                    }
                }
            }
        };
        let started = Instant::now();
        match drive(&shared, attached, &mut commands, &mut shutdown).await {
            End::Closed => break,
            End::Lost => {
                if started.elapsed() >= STABLE_ATTACHMENT {
                    attempt = 0;
                }
            }
        }
    }
    shared.link.send_replace(Link::Closed);
    shared
        .endpoint
        .close(close_code(ConnectionCode::NoError), b"agent closed");
    // Fail whatever is still queued.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        command.fail(|| AgentError::Closed);
    }
}

/// Runs `future` while answering commands as "disconnected" (and a detach by closing).
/// Returns `None` if the agent must close.
async fn while_serving_commands<F: std::future::Future>(
    future: F,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<F::Output> {
    tokio::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return Some(output),
            () = closing(shutdown) => return None,
            command = commands.recv() => match command {
                None => return None,
                Some(Command::Detach { reply }) => {
                    let _ = reply.send(Ok(()));
                    return None;
                }
                Some(other) => other.fail(|| AgentError::Disconnected),
            },
        }
    }
}

/// Resolves once the agent must close (every handle dropped).
async fn closing(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means closing.
    let _ = shutdown.wait_for(|&closed| closed).await;
}

/// Where a `DETACH` stands.
struct Detaching {
    reply: oneshot::Sender<Result<(), AgentError>>,
    deadline: Instant,
}

/// Serves one attachment until it ends.
async fn drive(
    shared: &Arc<Shared>,
    attached: Attached,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let Attached {
        set,
        mut control,
        session,
        lane_token,
        worker,
        lanes,
        gateway_limit,
    } = attached;
    tokio::spawn(serve::accept_loop(shared.clone(), set.primary.clone()));
    let mut lane_tasks = JoinSet::new();
    if shared.settings.lanes {
        let gateway = set.primary.remote_address();
        for (index, address) in lanes.iter().enumerate() {
            let index = index as u64;
            if index == worker {
                continue;
            }
            match lane_address(address, gateway) {
                Ok(addr) => {
                    lane_tasks.spawn(run_lane(
                        shared.clone(),
                        set.clone(),
                        index,
                        LaneBinding {
                            addr,
                            session,
                            lane_token,
                            gateway_limit,
                        },
                    ));
                }
                Err(reason) => {
                    tracing::warn!(lane = index, address = %address, reason, "lane not opened");
                }
            }
        }
    }
    shared.publish(Link::Attached(set.clone()));

    let mut updates: VecDeque<(AgentCard, oneshot::Sender<Result<(), AgentError>>)> =
        VecDeque::new();
    let mut discoveries: HashMap<u64, oneshot::Sender<Result<Vec<DiscoveryEntry>, AgentError>>> =
        HashMap::new();
    let mut next_query: u64 = 0;
    let mut detaching: Option<Detaching> = None;
    let mut drain_until: Option<Instant> = None;

    let end = loop {
        let timer = match (&detaching, drain_until) {
            (Some(d), _) => Some(d.deadline),
            (None, until) => until,
        };
        tokio::select! {
            () = closing(shutdown) => {
                set.close(ConnectionCode::NoError, b"agent closed");
                break End::Closed;
            }
            error = set.primary.closed() => {
                tracing::warn!(%error, "connection to the gateway lost");
                shared.publish(Link::Connecting);
                if let Some(d) = detaching.take() {
                    let _ = d.reply.send(Err(AgentError::ConnectionLost(error)));
                    set.close(ConnectionCode::NoError, b"detached");
                    break End::Closed;
                }
                set.close(ConnectionCode::NoError, b"primary lost");
                break End::Lost;
            }
            _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                if let Some(d) = detaching.take() {
                    tracing::warn!("no DETACHED from the gateway in time; closing");
                    let _ = d.reply.send(Err(AgentError::Timeout("waiting for DETACHED")));
                    set.close(ConnectionCode::NoError, b"detached");
                    break End::Closed;
                }
                tracing::info!("drain grace period over; closing and reconnecting");
                set.close(ConnectionCode::NoError, b"drained");
                break End::Lost;
            }
            command = commands.recv() => {
                let Some(command) = command else {
                    set.close(ConnectionCode::NoError, b"agent closed");
                    break End::Closed;
                };
                let frame = match command {
                    Command::Discover { prefix, tag, reply } => {
                        discoveries.retain(|_, waiter| !waiter.is_closed());
                        if discoveries.len() >= MAX_PENDING_QUERIES {
                            let _ = reply.send(Err(AgentError::Timeout(
                                "too many discoveries awaiting an answer",
                            )));
                            continue;
                        }
                        next_query += 1;
                        discoveries.insert(next_query, reply);
                        ControlFrame::Discover { query_id: next_query, prefix, tag }
                    }
                    Command::UpdateCard { card, reply } => {
                        if updates.len() >= MAX_PENDING_QUERIES {
                            let _ = reply.send(Err(AgentError::Timeout(
                                "too many card updates awaiting an answer",
                            )));
                            continue;
                        }
                        let frame = ControlFrame::UpdateCard { card: card.to_json() };
                        updates.push_back((card, reply));
                        frame
                    }
                    Command::Detach { reply } => {
                        if detaching.is_some() {
                            let _ = reply.send(Err(AgentError::Closed));
                            continue;
                        }
                        // No new invocations from now on: the agent is leaving.
                        shared.link.send_replace(Link::Closed);
                        detaching = Some(Detaching {
                            reply,
                            deadline: Instant::now() + shared.settings.request_timeout,
                        });
                        ControlFrame::Detach
                    }
                };
                let sent = timeout(shared.settings.request_timeout, control.send(&frame))
                    .await
                    .unwrap_or(Err(ControlError::Stalled));
                if let Err(e) = sent {
                    tracing::warn!(error = %e, frame = frame_name(&frame), "control stream failed");
                    set.close(e.close_code(), b"control stream failed");
                    if let Some(d) = detaching.take() {
                        let _ = d.reply.send(Err(control_error(e)));
                        break End::Closed;
                    }
                    break End::Lost;
                }
            }
            frame = control.next() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        match &e {
                            ControlError::ConnectionLost(error) => {
                                tracing::warn!(%error, "connection to the gateway lost");
                            }
                            _ => tracing::warn!(error = %e, "control stream failed"),
                        }
                        set.close(e.close_code(), b"control stream failed");
                        if let Some(d) = detaching.take() {
                            let _ = d.reply.send(Err(control_error(e)));
                            break End::Closed;
                        }
                        break End::Lost;
                    }
                };
                match frame {
                    ControlFrame::UpdateResult { refusal, reason } => {
                        match updates.pop_front() {
                            Some((card, reply)) => {
                                let result = match refusal {
                                    None => {
                                        *lock(&shared.card) = card;
                                        Ok(())
                                    }
                                    Some(refusal) => Err(AgentError::Refused { refusal, reason }),
                                };
                                let _ = reply.send(result);
                            }
                            None => tracing::debug!("UPDATE_RESULT without an update; ignored"),
                        }
                    }
                    ControlFrame::DiscoverResult { query_id, truncated, entries } => {
                        if truncated {
                            tracing::debug!(query_id, "discovery answer truncated by the gateway");
                        }
                        match discoveries.remove(&query_id) {
                            Some(reply) => drop(reply.send(Ok(entries))),
                            None => tracing::debug!(query_id, "unexpected DISCOVER_RESULT; ignored"),
                        }
                    }
                    ControlFrame::Detached => {
                        if let Some(d) = detaching.take() {
                            set.close(ConnectionCode::NoError, b"detached");
                            let _ = d.reply.send(Ok(()));
                            break End::Closed;
                        }
                        tracing::debug!("DETACHED without a DETACH; ignored");
                    }
                    ControlFrame::Drain { grace_ms } => {
                        let grace = Duration::from_millis(grace_ms).min(MAX_DRAIN_GRACE);
                        tracing::info!(grace_ms, "the gateway is draining");
                        if detaching.is_none() {
                            shared.publish(Link::Connecting);
                        }
                        drain_until = Some(Instant::now() + grace + DRAIN_SLACK);
                    }
                    ControlFrame::Unknown { .. } => {}
                    other => {
                        tracing::debug!(frame = frame_name(&other), "unexpected control frame; ignored");
                    }
                }
            }
        }
    };
    if end == End::Lost {
        // Invocations wait for the next attachment instead of picking a dead connection.
        shared.publish(Link::Connecting);
    }
    // Stop the lane tasks, then close what they may have opened meanwhile.
    lane_tasks.shutdown().await;
    set.close(ConnectionCode::NoError, b"attachment ended");
    // Pending queries are answered by dropping their senders (the API reports Closed), or
    // explicitly here to say why.
    for (_, reply) in updates {
        let _ = reply.send(Err(AgentError::Disconnected));
    }
    for (_, reply) in discoveries {
        let _ = reply.send(Err(AgentError::Disconnected));
    }
    end
}

/// Keeps one lane open: opens it, serves it until it closes, reopens it with backoff.
async fn run_lane(shared: Arc<Shared>, set: Arc<ConnSet>, worker: u64, lane: LaneBinding) {
    let addr = lane.addr;
    let mut attempt: u32 = 0;
    loop {
        match open_lane(&shared, &lane).await {
            Ok((connection, mut control)) => {
                tracing::debug!(lane = worker, %addr, "lane open");
                let opened = Instant::now();
                set.add_lane(worker, connection.clone());
                tokio::spawn(serve::accept_loop(shared.clone(), connection.clone()));
                loop {
                    tokio::select! {
                        _ = connection.closed() => break,
                        frame = control.next() => match frame {
                            Ok(ControlFrame::Drain { .. }) => {
                                // Stop starting invocations here; in-flight ones finish and
                                // the gateway closes the lane.
                                set.remove_lane(worker);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                connection.close(close_code(e.close_code()), b"lane control failed");
                                break;
                            }
                        },
                    }
                }
                set.remove_lane(worker);
                tracing::debug!(lane = worker, reason = ?connection.close_reason(), "lane closed");
                if opened.elapsed() >= STABLE_ATTACHMENT {
                    attempt = 0;
                }
            }
            Err(e) => tracing::debug!(lane = worker, %addr, error = %e, "lane failed"),
        }
        sleep(shared.settings.reconnect.next_delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// What a lane task needs to open its lane.
struct LaneBinding {
    addr: SocketAddr,
    session: SessionId,
    lane_token: LaneToken,
    gateway_limit: u64,
}

/// Opens a lane connection and binds it to the session.
async fn open_lane(
    shared: &Shared,
    lane: &LaneBinding,
) -> Result<(Connection, ControlStream), AgentError> {
    let connection = connect(shared, lane.addr).await?;
    let exchange = async {
        let mut control = ControlStream::open(&connection).await?;
        control
            .send(&ControlFrame::Lane {
                session: lane.session,
                lane_token: lane.lane_token,
            })
            .await?;
        loop {
            match control.next().await? {
                ControlFrame::LaneOk { .. } => {
                    return Ok::<_, ControlError>(Ok(control));
                }
                ControlFrame::AttachRefused { refusal, reason } => {
                    return Ok(Err(AgentError::Refused { refusal, reason }))
                }
                ControlFrame::Unknown { .. } => {}
                other => {
                    return Ok(Err(AgentError::Protocol(format!(
                        "expected LANE_OK, got {}",
                        frame_name(&other)
                    ))))
                }
            }
        }
    };
    match timeout(shared.settings.connect_timeout, exchange).await {
        Ok(Ok(Ok(control))) => {
            limit_streams(
                &connection,
                shared.settings.max_concurrent,
                lane.gateway_limit,
            );
            Ok((connection, control))
        }
        Ok(Ok(Err(e))) => {
            connection.close(close_code(ConnectionCode::NoError), b"lane refused");
            Err(e)
        }
        Ok(Err(e)) => {
            connection.close(close_code(e.close_code()), b"lane failed");
            Err(control_error(e))
        }
        Err(_) => {
            connection.close(close_code(ConnectionCode::NoError), b"lane timeout");
            Err(AgentError::Timeout("waiting for LANE_OK"))
        }
    }
}

/// The socket address of a lane: `ip:port`, where an unspecified IP (`0.0.0.0`, `::`) means
/// the gateway's own address.
fn lane_address(address: &str, gateway: SocketAddr) -> Result<SocketAddr, &'static str> {
    let mut addr: SocketAddr = address.parse().map_err(|_| "not an ip:port address")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(gateway.ip());
    }
    let family_matches = matches!(
        (addr.ip(), gateway.ip()),
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
    );
    if !family_matches {
        return Err("address family differs from the gateway's");
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_addresses_resolve_against_the_gateway() {
        let gw: SocketAddr = "10.0.0.7:4433".parse().unwrap();
        assert_eq!(
            lane_address("0.0.0.0:4501", gw).unwrap(),
            "10.0.0.7:4501".parse().unwrap()
        );
        assert_eq!(
            lane_address("10.0.0.8:4502", gw).unwrap(),
            "10.0.0.8:4502".parse().unwrap()
        );
        assert!(lane_address("gateway.example:4501", gw).is_err());
        assert!(lane_address("[::1]:4501", gw).is_err());
        let gw6: SocketAddr = "[fd00::7]:4433".parse().unwrap();
        assert_eq!(
            lane_address("[::]:4501", gw6).unwrap(),
            "[fd00::7]:4501".parse().unwrap()
        );
    }
}
