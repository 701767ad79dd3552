//! The sans-IO per-core gateway state machine.
//!
//! [`Core`] is everything one worker knows and decides: its QUIC endpoint and connections, the
//! agent sessions whose control streams it serves, its copy of the cross-worker agent registry,
//! the exchanges (requests) it relays, and its routing state. It opens no socket, reads no
//! clock, draws no randomness of its own and touches no channel: the I/O shell
//! ([`crate::worker`]) or the deterministic test harness feeds it inputs and carries out what it
//! asks for. Submodules own its concerns:
//!
//! | module | concern |
//! |---|---|
//! | `conn` | QUIC connections: accepting, events, removal, per-identity limits, liveness |
//! | `session` | the agent session on a connection's control stream: attach, lanes, cards, discovery |
//! | `registry` | what this worker knows of agents attached anywhere; detach counting |
//! | `catalog` | the capabilities offered, by name, for discovery |
//! | `route` | a request's header checked, its target or peer gateway chosen |
//! | `exchange` | one request relayed between a caller leg and a target leg |
//! | `handoff` | the legs that cross to another worker, with their credit window |
//! | `drain` | graceful shutdown |
//! | `timers` | connection timers, request deadlines |
//! | `outbox` | bounded per-destination queues of messages to other workers |
//!
//! # Calling contract
//!
//! The methods come in four kinds, after `quinn_proto::Connection`:
//!
//! - **inputs**, `handle_*`: [`Core::handle_datagram`], [`Core::handle_message`],
//!   [`Core::handle_timeout`] and [`Core::handle_writable`]. Each takes the current time;
//!   times passed to a core must never go backwards (quinn-proto's rule, which the core passes
//!   on to its connections).
//! - **outputs**, `poll_*`: [`Core::poll_transmit`] (a datagram to send, and on which socket),
//!   [`Core::poll_message`] (a message for another worker) and [`Core::poll_timeout`] (when
//!   the core next needs [`Core::handle_timeout`], or the current time if work is left over).
//! - **the iteration boundary**: [`Core::end_iteration`].
//! - **getters**, for tests and the admin view.
//!
//! One iteration of the event loop, in this order:
//!
//! 1. wait until a socket is readable or writable, a message arrives, or `poll_timeout()`;
//! 2. read `now`; feed at most [`RECV_BUDGET`] datagrams per socket to `handle_datagram`, call
//!    `handle_writable` for a socket that can send again, feed at most [`INBOX_BUDGET`] inbox
//!    messages to `handle_message`, then call `handle_timeout(now)` (it fires only what is due);
//! 3. call `poll_transmit` until it returns `None`, sending each datagram (a socket that
//!    reports "would block" keeps that one datagram and is excluded through the `sendable`
//!    argument until it is writable again); then `poll_message` for each destination until
//!    `None` or until that destination's channel is full (the message goes back with
//!    [`Core::requeue_message`]);
//! 4. call `end_iteration` with a fresh clock reading; stop the thread when it says so.
//!
//! # Budgets
//!
//! Work per iteration is bounded so that no input can starve the others (a flood of datagrams
//! must not keep the worker from its timers, inbox or streams):
//!
//! - the shell reads at most [`RECV_BUDGET`] datagrams per socket and [`INBOX_BUDGET`] inbox
//!   messages per iteration, and polls again at once (zero timeout) when it stopped short;
//! - one sequence of `poll_transmit` calls drives at most [`DRIVE_BUDGET`] connections and
//!   pumps at most [`PUMP_BUDGET`] exchanges; when a budget runs out it returns `None` early
//!   and `poll_timeout` returns the current time, so the shell goes round again without
//!   sleeping;
//! - control-stream work is bounded: a connection's control stream is not read while an answer
//!   written on it still waits to be handed to QUIC (so one `DISCOVER` or `UPDATE_CARD` is
//!   outstanding at a time, and an agent that does not read its answers stops being read), at
//!   most 16 frames are decoded per read, and a worker handles at most 256 frames' worth of
//!   control work per iteration (a `DISCOVER` counts 32), deferring the rest.
//!
//! # Invariants
//!
//! - An [`ExKey`] may be stale (its exchange ended and the slot was reused); every handler
//!   looks the exchange up again and ignores a key whose generation does not match.
//! - An [`AgentIdx`](crate::routing::AgentIdx) carries a generation too: an exchange that ends
//!   after its agent left (and another agent took the slot) releases nothing of the new one.
//! - Only `handle_message` and control-stream handling change the routing overlay; selection
//!   reads it while handling stream data.
//! - A new table generation ([`WorkerMsg::Install`]) is installed by `handle_message`, that is,
//!   between requests: a request routed before it finishes on the table it started with.
//! - The core never blocks: messages to other workers wait in bounded per-destination outboxes
//!   (`OVERLOADED` for new hand-offs when one is full); control broadcasts are never dropped.

mod catalog;
mod conn;
mod drain;
mod exchange;
mod handoff;
mod outbox;
mod ratelimit;
mod registry;
mod route;
mod session;
mod timers;
mod trunk;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashbrown::{HashMap, HashSet};
use quinn_proto::{DatagramEvent, EcnCodepoint, Endpoint, ServerConfig, VarInt};
use tracing::warn;

use dmsc_protocol::control::{ControlFrame, SessionId};
use dmsc_protocol::{ConnectionCode, StreamCode};

use crate::config::Config;
use crate::metrics::WorkerMetrics;
use crate::msg::{AgentInfo, ExKey, HandoffId, WorkerMsg};
use crate::routing::{MetricSlot, Router, TableGeneration, WorkerId};
use crate::slab::Slab;
use crate::stats::WorkerStats;

pub(crate) use conn::ConnIdx;
use conn::{Conn, Conns};
pub(crate) use exchange::Exchange;
pub(crate) use handoff::Chunks;
use outbox::Outboxes;
use timers::Timers;
pub use trunk::DomainRoutes;

/// Datagrams the shell feeds per socket per iteration before it looks at other work.
pub(crate) const RECV_BUDGET: usize = 256;
/// Inbox messages the shell feeds per iteration.
pub(crate) const INBOX_BUDGET: usize = 4096;
/// Connections driven (events, then transmits) per sequence of `poll_transmit` calls.
pub(crate) const DRIVE_BUDGET: usize = 4096;
/// Exchange pumps per sequence of `poll_transmit` calls.
pub(crate) const PUMP_BUDGET: usize = 65_536;
/// Bytes of request headers encoded into one shared buffer before it is replaced.
const HEADER_ARENA: usize = 64 * 1024;
/// Endpoint-level answers (refusals, version negotiation, resets) kept for sending; more in one
/// iteration are dropped (their peers retry).
const MAX_ENDPOINT_RESPONSES: usize = 1024;

/// Most identities whose groups a worker keeps for delegated requests; beyond it the cache is
/// emptied and refilled (each refill costs one membership lookup per identity).
pub(crate) const MAX_DELEGATED_IDENTITIES: usize = 4096;

/// What every worker's core shares: configuration and counters. Immutable apart from the
/// attach-time agent count and the per-worker counters (each written by one worker only).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) stats: Vec<Arc<WorkerStats>>,
    /// Agents attached across the gateway (checked against `limits.max_agents` at attach).
    pub(crate) agents: AtomicUsize,
    /// Lane address of each worker, as sent in `ATTACH_OK`.
    pub(crate) lane_addrs: Vec<String>,
    /// Trunk address of each worker, as reported to the control plane (empty: no trunks).
    pub(crate) trunk_addrs: Vec<String>,
    /// This gateway's tag in session ids ([`gateway_tag`] of its id).
    pub(crate) gateway_tag: u16,
    /// Attachments for the control client to report; only sent once a client reads them.
    pub(crate) attach_events: (
        crossbeam_channel::Sender<crate::msg::AttachEvent>,
        crossbeam_channel::Receiver<crate::msg::AttachEvent>,
    ),
    /// A control client reads `attach_events`.
    pub(crate) reporting: std::sync::atomic::AtomicBool,
    /// Attach events dropped because the control client did not keep up.
    pub(crate) attach_events_dropped: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The shared state of `config.worker_count()` workers whose lane addresses are
    /// `lane_addrs`.
    pub(crate) fn new(config: Config, lane_addrs: Vec<String>) -> Self {
        Self {
            stats: (0..config.worker_count())
                .map(|_| Arc::new(WorkerStats::default()))
                .collect(),
            agents: AtomicUsize::new(0),
            lane_addrs,
            trunk_addrs: Vec::new(),
            gateway_tag: gateway_tag(&config.gateway_id),
            attach_events: crossbeam_channel::bounded(crate::msg::ATTACH_EVENTS),
            reporting: std::sync::atomic::AtomicBool::new(false),
            attach_events_dropped: std::sync::atomic::AtomicU64::new(0),
            config,
        }
    }

    /// Number of workers.
    pub(crate) fn workers(&self) -> usize {
        self.stats.len()
    }

    /// Tells the control client (if one reads) of an attachment change.
    pub(crate) fn report_attach(&self, event: crate::msg::AttachEvent) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.reporting.load(Relaxed) && self.attach_events.0.try_send(event).is_err() {
            self.attach_events_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// The 16 bits that name gateway `id` in the session ids it hands out (bits 32 to 47): the
/// first two bytes of the SHA-256 of the id. Gateways of a domain rarely share one; when two
/// do, a follow-up goes to one of them and may get `NO_ROUTE` (docs/TRUNK.md section 6).
pub(crate) fn gateway_tag(id: &str) -> u16 {
    let digest = dmsc_protocol::table::Generation::of(id.as_bytes()).0;
    u16::from_be_bytes([digest[0], digest[1]])
}

/// The gateway tag of session id `session` (see [`gateway_tag`]).
pub(crate) fn session_gateway_tag(session: u64) -> u16 {
    (session >> 32) as u16
}

/// What a worker keeps per verified identity.
#[derive(Debug)]
struct Principal {
    /// Connections of the identity on this worker that count against its limit.
    conns: usize,
    /// The identity's token bucket on this worker, if the installed table limits it.
    bucket: Option<ratelimit::Bucket>,
}

/// Where a core gets unpredictable bytes (lane tokens, selection seeds). The shell passes the
/// operating system's generator; tests pass a seeded one.
pub(crate) trait Random: Send {
    /// Fills `buf`; false when no randomness is available.
    fn fill(&mut self, buf: &mut [u8]) -> bool;
}

/// The operating system's random generator.
#[derive(Debug, Default)]
pub(crate) struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) -> bool {
        getrandom::getrandom(buf).is_ok()
    }
}

/// What the shell knows of one socket that the core needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SocketCaps {
    /// Most GSO segments one transmit may carry.
    pub(crate) max_gso_segments: usize,
}

/// A datagram for the shell to send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transmit {
    /// Index of the socket to send on.
    pub(crate) socket: usize,
    /// Where to.
    pub(crate) destination: SocketAddr,
    /// Bytes of the caller's buffer that make up the transmit.
    pub(crate) size: usize,
    /// GSO segment size, when several datagrams are batched.
    pub(crate) segment_size: Option<usize>,
    /// ECN codepoint to set.
    pub(crate) ecn: Option<EcnCodepoint>,
    /// Source address to send from, when the socket is bound to a wildcard.
    pub(crate) src_ip: Option<IpAddr>,
}

/// One worker's sans-IO state. See the module docs for the calling contract.
pub(crate) struct Core {
    index: WorkerId,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    sockets: Vec<SocketCaps>,
    endpoint: Endpoint,
    server_config: Arc<ServerConfig>,
    /// The socket trunks arrive on and leave from, and how trunks are accepted there.
    trunk_socket: Option<usize>,
    peer_server_config: Option<Arc<ServerConfig>>,
    random: Box<dyn Random>,
    accepting: bool,
    conns: Conns,
    conn_count: usize,
    /// Per verified identity on this worker: its connections and its rate limit.
    per_identity: HashMap<Arc<str>, Principal>,
    /// The groups of identities bridges invoked on behalf of, under the installed table
    /// (computed at an identity's first delegated request, at most
    /// [`MAX_DELEGATED_IDENTITIES`] kept; emptied when a table is installed).
    delegated: HashMap<Box<str>, dmsc_protocol::table::GroupSet>,
    exchanges: Slab<Exchange>,
    handoffs_in: HashMap<HandoffId, ExKey>,
    router: Router<ConnIdx>,
    agents: HashMap<SessionId, Arc<AgentInfo>>,
    /// The capabilities offered, for discovery.
    catalog: catalog::Catalog,
    /// Connections of each session on this worker (its primary here, and its lanes), so that
    /// per-session lookups never scan every connection.
    session_conns: HashMap<SessionId, smallvec::SmallVec<[ConnIdx; 2]>>,
    /// Home worker: detaching sessions and how many workers have yet to report done.
    detach_waiting: HashMap<SessionId, usize>,
    /// Sessions detaching whose home waits for this worker's `DetachDone`.
    detach_watch: HashSet<SessionId>,
    timers: Timers,
    /// Connections with work to do (events to poll, data to transmit), in arrival order.
    dirty: VecDeque<ConnIdx>,
    /// The connection whose transmits `poll_transmit` is handing out.
    transmitting: Option<ConnIdx>,
    /// Exchanges with data to move.
    pumps: VecDeque<ExKey>,
    /// Connections whose control streams wait for the next iteration's control budget.
    control_deferred: VecDeque<ConnIdx>,
    /// Control work done in this iteration (see `session::CONTROL_BUDGET`).
    control_work: usize,
    /// Endpoint-level answers waiting to be sent: socket, transmit, bytes.
    responses: VecDeque<(usize, quinn_proto::Transmit, Vec<u8>)>,
    outboxes: Outboxes,
    /// Scratch for encoding.
    scratch: Vec<u8>,
    /// Second scratch, for the request fields of a trunk header.
    peer_scratch: Vec<u8>,
    /// Trunks to the other gateways of the domain, and the domain routes.
    trunks: trunk::Trunks,
    arena: BytesMut,
    drain_deadline: Option<Instant>,
    session_seq: u64,
    metrics: WorkerMetrics,
    /// Requests forwarded in this iteration, whose residence is recorded at its end.
    residence_batch: Vec<MetricSlot>,
    /// When this iteration began (the first input's `now`).
    iteration_start: Option<Instant>,
    /// The latest time any input carried.
    now: Instant,
    /// Connections driven and exchanges pumped in the current `poll_transmit` sequence.
    drives: usize,
    pumped: usize,
    /// A budget ran out: there is work left for the next iteration.
    leftover: bool,
    /// Rate limit of the failed-handshake log line.
    handshake_log: conn::LogLimiter,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("index", &self.index)
            .field("connections", &self.conn_count)
            .field("agents", &self.agents.len())
            .field("dirty", &self.dirty.len())
            .field("pumps", &self.pumps.len())
            .field("control_deferred", &self.control_deferred.len())
            .field("leftover", &self.leftover)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A core for worker `index` of `shared.workers()`, with its QUIC endpoint and sockets.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: WorkerId,
        shared: Arc<Shared>,
        endpoint: Endpoint,
        server_config: Arc<ServerConfig>,
        sockets: Vec<SocketCaps>,
        table: Arc<TableGeneration>,
        mut random: Box<dyn Random>,
        now: Instant,
    ) -> Self {
        let stats = shared.stats[index.index()].clone();
        let mut seed = [0u8; 8];
        random.fill(&mut seed);
        let workers = shared.workers();
        let outbox_limit = shared.config.limits.handoff_queue;
        Self {
            index,
            stats,
            sockets,
            endpoint,
            server_config,
            trunk_socket: None,
            peer_server_config: None,
            random,
            accepting: true,
            conns: Conns::default(),
            conn_count: 0,
            per_identity: HashMap::new(),
            delegated: HashMap::new(),
            exchanges: Slab::default(),
            handoffs_in: HashMap::new(),
            router: Router::new(
                table,
                u64::from_le_bytes(seed) ^ u64::from(index.0),
                shared.config.limits.max_metric_capabilities,
            ),
            metrics: WorkerMetrics::default(),
            residence_batch: Vec::new(),
            iteration_start: None,
            now,
            agents: HashMap::new(),
            catalog: catalog::Catalog::default(),
            session_conns: HashMap::new(),
            detach_waiting: HashMap::new(),
            detach_watch: HashSet::new(),
            timers: Timers::default(),
            dirty: VecDeque::new(),
            transmitting: None,
            pumps: VecDeque::new(),
            control_deferred: VecDeque::new(),
            control_work: 0,
            responses: VecDeque::new(),
            outboxes: Outboxes::new(workers, outbox_limit),
            scratch: Vec::with_capacity(65_536),
            peer_scratch: Vec::with_capacity(1024),
            trunks: trunk::Trunks::default(),
            arena: BytesMut::with_capacity(HEADER_ARENA),
            drain_deadline: None,
            session_seq: 0,
            drives: 0,
            pumped: 0,
            leftover: false,
            handshake_log: conn::LogLimiter::default(),
            shared,
        }
    }

    /// Makes socket `socket` this worker's trunk socket: trunks from other gateways are
    /// accepted there with `server` (ALPN `dmsc-peer/1`, gateways only), and this worker's own
    /// trunks leave from it with `client`. Without it, routes are installed but nothing is
    /// forwarded and no trunk is accepted.
    pub(crate) fn enable_trunks(
        &mut self,
        socket: usize,
        server: Arc<ServerConfig>,
        client: quinn_proto::ClientConfig,
    ) {
        self.trunk_socket = Some(socket);
        self.peer_server_config = Some(server);
        self.trunks.client = Some(client);
    }

    /// This worker's index.
    pub(crate) fn index(&self) -> WorkerId {
        self.index
    }

    /// Exchanges in progress on this worker.
    #[cfg(test)]
    pub(crate) fn exchanges_len(&self) -> usize {
        self.exchanges.len()
    }

    /// A line per connection, for diagnosing a test.
    #[cfg(test)]
    pub(crate) fn describe_connections(&mut self) -> Vec<String> {
        let now = self.now;
        self.conns
            .iter_mut()
            .map(|(ci, c)| {
                format!(
                    "{ci:?} role={:?} closed={} drained={} timer={:?} quic_timeout={:?} attach={:?} last_heard={:?} streams={} now={now:?}",
                    c.role,
                    c.quic.is_closed(),
                    c.quic.is_drained(),
                    c.timer,
                    c.quic.poll_timeout(),
                    c.attach_deadline,
                    c.last_heard,
                    c.streams.len()
                )
            })
            .collect()
    }

    /// Connections open on this worker (including ones closing).
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.conn_count
    }

    /// Bytes of control-stream answers waiting to be handed to QUIC, over all connections.
    #[cfg(test)]
    pub(crate) fn control_backlog(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.ctl_out.len()).sum()
    }

    fn tick(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        self.iteration_start.get_or_insert(now);
    }

    // ---------------------------------------------------------------------------------------
    // Inputs
    // ---------------------------------------------------------------------------------------

    /// A datagram arrived on `socket` from `remote` (addressed to `local_ip`, when known).
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        socket: usize,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        self.tick(now);
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        match self
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                let ci = ConnIdx::from(ch);
                if let Some(conn) = self.conns.get_mut(ci) {
                    // Only the peer's own address counts: migration is off, so quinn drops what
                    // comes from another one (a NAT rebinding, or a spoofer that knows the
                    // connection id), and that must not keep the connection alive.
                    if remote == conn.quic.remote_address() {
                        conn.last_heard = now;
                    }
                    conn.quic.handle_event(ev);
                    mark_dirty(&mut self.dirty, conn, ci);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.incoming(now, socket, incoming, &mut buf);
            }
            Some(DatagramEvent::Response(t)) => self.respond(socket, t, &buf),
            None => {}
        }
        self.scratch = buf;
    }

    /// A message from another worker (or from the gateway handle).
    pub(crate) fn handle_message(&mut self, now: Instant, msg: WorkerMsg) {
        self.tick(now);
        match msg {
            WorkerMsg::AgentUp(info) => self.remote_agent_up(info),
            WorkerMsg::AgentDetaching { session } => self.agent_detaching(session),
            WorkerMsg::DetachDone { session } => self.detach_done(session),
            WorkerMsg::AgentDown { session } => self.agent_down(session, now),
            WorkerMsg::Handoff { id, event } => self.on_handoff(id, event, now),
            WorkerMsg::Install { table, done } => {
                self.install(table);
                if let Some(done) = done {
                    let _ = done.try_send(self.index.index());
                }
            }
            WorkerMsg::Snapshot { known, reply } => {
                let _ = reply.try_send(self.report(&known));
            }
            WorkerMsg::Drain { grace } => self.start_drain(now, grace),
            WorkerMsg::ReportAgents => {
                for info in self.agents.values() {
                    if info.home == self.index && !self.detach_waiting.contains_key(&info.session) {
                        self.shared
                            .report_attach(crate::msg::AttachEvent::Up(info.clone()));
                    }
                }
            }
            WorkerMsg::Routes { routes, done } => {
                self.install_routes(routes, now);
                if let Some(done) = done {
                    let _ = done.try_send(self.index.index());
                }
            }
        }
    }

    /// Fires whatever is due at `now`: QUIC timers, attach and header deadlines, request
    /// deadlines, silent peers. Cheap when nothing is due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        self.fire_timers(now);
        if self.trunks.next_retry().is_some_and(|t| t <= now) {
            self.connect_trunks(now);
        }
    }

    /// `socket` can take transmits again: the connections that stopped on it go on.
    pub(crate) fn handle_writable(&mut self, socket: usize) {
        for (ci, conn) in self.conns.iter_mut() {
            if conn.socket == socket {
                mark_dirty(&mut self.dirty, conn, ci);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Outputs
    // ---------------------------------------------------------------------------------------

    /// The next datagram to send, written into `buf`, on a socket for which `sendable` is true.
    ///
    /// Drives connections with pending work (their events create and advance exchanges) as it
    /// goes. `None` ends the sequence for this iteration: nothing is left, or a budget ran out
    /// (then [`Core::poll_timeout`] returns the current time).
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        sendable: impl Fn(usize) -> bool,
    ) -> Option<Transmit> {
        self.tick(now);
        if let Some((socket, t, bytes)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&bytes[..t.size]);
            return Some(transmit(socket, &t));
        }
        loop {
            if let Some(ci) = self.transmitting {
                if let Some(conn) = self.conns.get_mut(ci) {
                    let socket = conn.socket;
                    if sendable(socket) {
                        buf.clear();
                        let max_gso = self.sockets[socket].max_gso_segments;
                        if let Some(t) = conn.quic.poll_transmit(now, max_gso, buf) {
                            let sent = FramesSent::of(&conn.quic.stats().frame_tx);
                            if t.segment_size.is_none() && sent.ack_only_since(conn.frames_sent) {
                                WorkerStats::add(&self.stats.ack_only_sent, 1);
                            }
                            conn.frames_sent = sent;
                            return Some(transmit(socket, &t));
                        }
                    }
                }
                self.transmitting = None;
                self.update_conn_timer(ci);
                if self.conns.get(ci).is_some_and(|c| c.quic.is_drained()) {
                    self.remove_conn(ci, now);
                }
            }
            if self.drives >= DRIVE_BUDGET || self.pumped >= PUMP_BUDGET {
                self.leftover = !self.dirty.is_empty() || !self.pumps.is_empty();
                self.drives = 0;
                self.pumped = 0;
                return None;
            }
            if let Some(ci) = self.dirty.pop_front() {
                self.drives += 1;
                self.drive(ci, now);
                self.transmitting = Some(ci);
                continue;
            }
            if !self.pumps.is_empty() {
                self.run_pumps(now);
                continue;
            }
            if self.resume_control(now) {
                continue;
            }
            self.drives = 0;
            self.pumped = 0;
            self.leftover = false;
            return None;
        }
    }

    /// The next message for worker `to`, if any.
    pub(crate) fn poll_message(&mut self, to: WorkerId) -> Option<WorkerMsg> {
        self.outboxes.pop(to)
    }

    /// Puts back a message `poll_message` gave out that `to`'s channel could not take.
    pub(crate) fn requeue_message(&mut self, to: WorkerId, msg: WorkerMsg) {
        self.outboxes.push_front(to, msg);
    }

    /// Whether any message waits for another worker.
    pub(crate) fn has_messages(&self) -> bool {
        !self.outboxes.is_empty()
    }

    /// When [`Core::handle_timeout`] should next be called: the current time if work was left
    /// over by a budget, otherwise the earliest timer, `None` if none is set.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.leftover
            || !self.control_deferred.is_empty()
            || !self.dirty.is_empty()
            || !self.pumps.is_empty()
            || !self.responses.is_empty()
        {
            return Some(self.now);
        }
        [
            self.timers.next(),
            self.drain_timer(),
            self.trunks.next_retry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ends an iteration: records how long this iteration's requests stayed in the gateway.
    /// Returns true once the worker has drained and closed every connection (the thread ends).
    pub(crate) fn end_iteration(&mut self, now: Instant) -> bool {
        self.tick(now);
        self.control_work = 0;
        if let Some(start) = self.iteration_start.take() {
            let residence = now.saturating_duration_since(start);
            for slot in self.residence_batch.drain(..) {
                self.metrics.residence(slot, residence);
            }
        }
        self.finished_draining(now)
    }

    // ---------------------------------------------------------------------------------------
    // Endpoint
    // ---------------------------------------------------------------------------------------

    fn incoming(
        &mut self,
        now: Instant,
        socket: usize,
        incoming: quinn_proto::Incoming,
        buf: &mut Vec<u8>,
    ) {
        if !self.accepting
            || self.conn_count >= self.shared.config.limits.max_connections_per_worker
        {
            WorkerStats::add(&self.stats.handshakes_refused, 1);
            let t = self.endpoint.refuse(incoming, buf);
            return self.respond(socket, t, buf);
        }
        // Above the threshold, make unvalidated peers prove their address first (a Retry
        // costs one round trip and no connection state).
        let threshold = self.shared.config.limits.retry_above_connections;
        if self.conn_count >= threshold && !incoming.remote_address_validated() {
            match self.endpoint.retry(incoming, buf) {
                Ok(t) => {
                    WorkerStats::add(&self.stats.retries, 1);
                    return self.respond(socket, t, buf);
                }
                Err(e) => {
                    let t = self.endpoint.refuse(e.into_incoming(), buf);
                    return self.respond(socket, t, buf);
                }
            }
        }
        let remote = incoming.remote_address();
        let config = if self.trunk_socket == Some(socket) {
            match &self.peer_server_config {
                Some(c) => c.clone(),
                None => {
                    let t = self.endpoint.refuse(incoming, buf);
                    return self.respond(socket, t, buf);
                }
            }
        } else {
            self.server_config.clone()
        };
        match self.endpoint.accept(incoming, now, buf, Some(config)) {
            Ok((ch, quic)) => self.add_conn(ch, quic, socket, now),
            Err(e) => {
                // A malformed Initial, or a ClientHello TLS refuses outright (no acceptable
                // ALPN, no common cipher suite): peer-triggered, so rate-limited.
                WorkerStats::add(&self.stats.handshakes_refused, 1);
                if let Some(suppressed) = self.handshake_log.admit(now) {
                    warn!(%remote, error = %e.cause, suppressed, "handshake refused");
                }
                if let Some(t) = e.response {
                    self.respond(socket, t, buf);
                }
            }
        }
    }

    fn respond(&mut self, socket: usize, t: quinn_proto::Transmit, buf: &[u8]) {
        if self.responses.len() < MAX_ENDPOINT_RESPONSES {
            let bytes = buf[..t.size].to_vec();
            self.responses.push_back((socket, t, bytes));
        }
    }

    /// Installs a table generation: the router recomputes its capabilities' policy columns,
    /// every connection its identity's groups, every principal its rate limit. Requests
    /// already routed are not affected.
    fn install(&mut self, table: Arc<TableGeneration>) {
        let workers = self.shared.workers();
        let now = self.now;
        for (id, principal) in self.per_identity.iter_mut() {
            let groups = table.groups_of(id);
            let old = principal.bucket.take();
            principal.bucket = table.rate_limit_of(&groups).map(|limit| match old {
                Some(old) => old.resized(limit, workers, now),
                None => ratelimit::Bucket::new(limit, workers, now),
            });
        }
        for (_, conn) in self.conns.iter_mut() {
            let Some(id) = conn.identity.as_deref() else {
                continue;
            };
            conn.groups = table.groups_of(id);
            conn.bridge = table.is_bridge(&conn.groups);
            conn.rate_limited = self
                .per_identity
                .get(id)
                .is_some_and(|p| p.bucket.is_some());
        }
        self.delegated.clear();
        self.router.install(table);
        self.recompute_remote_columns();
        self.close_unlisted_trunks();
        self.readmit_home_agents();
    }

    /// After a new table: the agents whose home is this worker may now advertise more or fewer
    /// of their cards' capabilities. Those whose set changed are re-announced to every worker
    /// and told which capabilities are now refused (`CAPABILITIES_REFUSED`).
    fn readmit_home_agents(&mut self) {
        let homes: Vec<Arc<AgentInfo>> = self
            .agents
            .values()
            .filter(|a| a.home == self.index && !self.detach_waiting.contains_key(&a.session))
            .cloned()
            .collect();
        for info in homes {
            let session = info.session;
            let Some(ci) = self.session_conn(session, conn::Role::Primary(session)) else {
                continue;
            };
            let Some(groups) = self.conns.get(ci).map(|c| c.groups) else {
                continue;
            };
            let (capabilities, refused) = self.admit(&groups, &info.card);
            if capabilities == info.capabilities {
                continue;
            }
            let updated = Arc::new(AgentInfo {
                session,
                home: info.home,
                identity: info.identity.clone(),
                lane_token: info.lane_token,
                limit: info.limit,
                card: info.card.clone(),
                capabilities,
                card_digest: info.card_digest,
                card_bytes: info.card_bytes,
            });
            self.broadcast(|| WorkerMsg::AgentUp(updated.clone()));
            self.shared
                .report_attach(crate::msg::AttachEvent::Up(updated.clone()));
            self.agent_up(updated);
            self.write_control(ci, &ControlFrame::CapabilitiesRefused { refused });
        }
    }

    /// Polls connection `ci`'s endpoint and application events.
    fn drive(&mut self, ci: ConnIdx, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        conn.dirty = false;
        // Endpoint events (connection ids, draining) go through the endpoint and may come back.
        while let Some(ev) = conn.quic.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ci.into(), ev) {
                conn.quic.handle_event(back);
            }
        }
        loop {
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            let Some(ev) = conn.quic.poll() else {
                break;
            };
            self.on_event(ci, ev, now);
        }
        self.flush_control(ci, now);
    }
}

/// A connection's frames sent so far, as quinn counts them: ACK frames, and all others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct FramesSent {
    acks: u64,
    others: u64,
}

impl FramesSent {
    fn of(f: &quinn_proto::FrameStats) -> Self {
        Self {
            acks: f.acks,
            others: frames_other_than_ack(f),
        }
    }

    /// Whether the one packet sent since `before` carried an ACK frame and nothing else
    /// (padding aside).
    fn ack_only_since(self, before: Self) -> bool {
        self.acks == before.acks + 1 && self.others == before.others
    }
}

fn frames_other_than_ack(f: &quinn_proto::FrameStats) -> u64 {
    f.ack_frequency
        + f.crypto
        + f.connection_close
        + f.data_blocked
        + f.datagram
        + u64::from(f.handshake_done)
        + f.immediate_ack
        + f.max_data
        + f.max_stream_data
        + f.max_streams_bidi
        + f.max_streams_uni
        + f.new_connection_id
        + f.new_token
        + f.path_challenge
        + f.path_response
        + f.ping
        + f.reset_stream
        + f.retire_connection_id
        + f.stream_data_blocked
        + f.streams_blocked_bidi
        + f.streams_blocked_uni
        + f.stop_sending
        + f.stream
}

fn transmit(socket: usize, t: &quinn_proto::Transmit) -> Transmit {
    Transmit {
        socket,
        destination: t.destination,
        size: t.size,
        segment_size: t.segment_size,
        ecn: t.ecn,
        src_ip: t.src_ip,
    }
}

fn mark_dirty(dirty: &mut VecDeque<ConnIdx>, conn: &mut Conn, ci: ConnIdx) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push_back(ci);
    }
}

fn close(conn: &mut Conn, now: Instant, code: ConnectionCode, reason: &'static str) {
    if !conn.quic.is_closed() {
        conn.quic.close(
            now,
            VarInt::from_u64(code.code()).unwrap_or(VarInt::from_u32(0)),
            Bytes::from_static(reason.as_bytes()),
        );
    }
}

/// Conversion of protocol codes to QUIC varints.
trait IntoVarInt {
    fn into_varint(self) -> VarInt;
}

impl IntoVarInt for StreamCode {
    fn into_varint(self) -> VarInt {
        VarInt::from_u64(self.code()).unwrap_or(VarInt::from_u32(0))
    }
}

/// Deadline for something a peer must do within `ms` milliseconds of `now`.
fn after(now: Instant, ms: u64) -> Instant {
    now + Duration::from_millis(ms)
}
