//! One data-plane worker: a thread with its own sockets, `mio::Poll`, QUIC endpoint,
//! connections, routing overlay and exchanges.
//!
//! # The event loop
//!
//! Each iteration of [`Worker::run`]:
//!
//! 1. waits in `poll` until a socket is readable or writable, the waker fires, or the next timer
//!    is due;
//! 2. drains the inbox of messages from other workers (attach/detach broadcasts, hand-offs,
//!    table generations, drain) — a new table generation is therefore installed *between*
//!    iterations, never in the middle of handling a packet;
//! 3. feeds received datagrams to the `quinn_proto::Endpoint` and its connections;
//! 4. fires due connection timers and request deadlines;
//! 5. drives every connection touched so far: endpoint events, application events (which create
//!    and advance exchanges), then transmits.
//!
//! # Exchanges
//!
//! An [`Exchange`] is one request as seen by this worker. It has a *down* leg towards the caller
//! and an *up* leg towards the target; each leg is either a QUIC stream on this worker or a peer
//! worker (a hand-off). The request header is parsed on arrival; everything after it moves
//! between the legs as the `Bytes` chunks `quinn-proto` produced, through `write_chunks`, never
//! copied. Each direction is bounded: nothing more is read from a leg while the bytes already
//! read have not been written to the other (QUIC flow control pushes back to the sender), and a
//! hand-off leg has a credit window acknowledged by the receiving worker.

use std::collections::{BTreeSet, VecDeque};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use hashbrown::{HashMap, HashSet};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, ReadError, ServerConfig, StreamEvent,
    StreamId, VarInt, WriteError,
};
use quinn_udp::{RecvMeta, UdpSocketState};
use tracing::{debug, debug_span, warn};

use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{
    ControlFrame, DiscoveryEntry, FrameBuffer, LaneToken, Refusal, SessionId,
};
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::limits::{MAX_CONTROL_FRAME_BYTES, MAX_DISCOVERY_ENTRIES};
use dmsc_protocol::{ConnectionCode, Status, StreamCode};

use crate::config::Config;
use crate::metrics::{AgentView, WorkerMetrics, WorkerSnapshot};
use crate::msg::{AgentInfo, ExKey, HandoffEvent, HandoffId, WorkerMsg};
use crate::routing::{AgentEntry, AgentIdx, MetricSlot, Router, Selection, TableGeneration};
use crate::stats::WorkerStats;

const WAKER: Token = Token(usize::MAX);
/// Bytes one hand-off direction may have in flight between workers before an acknowledgement.
const HANDOFF_WINDOW: usize = 512 * 1024;
/// Datagrams received per `recvmmsg` call.
const BATCH: usize = 16;
/// Bytes of request headers encoded into one shared buffer before it is replaced.
const HEADER_ARENA: usize = 64 * 1024;

/// What all workers share: configuration, the channels to each other, and counters.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) senders: Vec<Sender<WorkerMsg>>,
    pub(crate) wakers: Vec<Arc<Waker>>,
    pub(crate) stats: Vec<Arc<WorkerStats>>,
    /// Agents attached across the gateway (checked against `limits.max_agents` at attach).
    pub(crate) agents: AtomicUsize,
    /// Lane address of each worker, as sent in `ATTACH_OK`.
    pub(crate) lane_addrs: Vec<String>,
}

/// A bound UDP socket with its quinn-udp state.
pub(crate) struct Socket {
    pub(crate) io: UdpSocket,
    pub(crate) state: UdpSocketState,
    /// A transmit that met a full send buffer, retried when the socket is writable.
    blocked: Option<(SocketAddr, Vec<u8>, Option<usize>)>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("io", &self.io).finish()
    }
}

impl Socket {
    pub(crate) fn new(io: UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&io).into())?;
        Ok(Self {
            io,
            state,
            blocked: None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Handshake done or in progress; no `ATTACH`/`LANE` yet.
    Pending,
    /// The agent's primary connection.
    Primary(SessionId),
    /// A lane of the session.
    Lane(SessionId),
}

/// Index of a connection in [`Worker::conns`] (the quinn-proto connection handle).
pub type ConnIdx = usize;

struct Conn {
    quic: quinn_proto::Connection,
    socket: usize,
    identity: Option<Arc<str>>,
    role: Role,
    control: Option<StreamId>,
    ctl_in: FrameBuffer,
    ctl_out: Vec<u8>,
    streams: HashMap<StreamId, ExKey>,
    timer: Option<Instant>,
    attach_deadline: Option<Instant>,
    /// Close with this code once the control stream's last frame is delivered (a refusal).
    close_after: Option<(ConnectionCode, &'static str)>,
    /// The agent sent DETACH.
    detaching: bool,
    dirty: bool,
    span: tracing::Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Local { conn: ConnIdx, stream: StreamId },
    Remote { worker: usize, id: HandoffId },
}

#[derive(Debug, Default)]
struct Flow {
    /// Bytes read from one leg and not yet written to the other.
    queue: VecDeque<Bytes>,
    /// The source finished after `queue`.
    fin: bool,
    /// Bytes handed to a remote leg and not yet acknowledged.
    unacked: usize,
    /// Bytes written to a local stream that came from a remote leg, to acknowledge.
    to_ack: usize,
}

#[derive(Debug)]
struct Exchange {
    gen: u32,
    down: Leg,
    up: Option<Leg>,
    /// The agent counted in the router's outstanding requests, released at the end.
    target: Option<AgentIdx>,
    /// Header bytes gathered while the header spans several chunks (rare).
    header_buf: Vec<u8>,
    /// The complete header, once it has arrived.
    header_raw: Option<Bytes>,
    header_done: bool,
    /// Caller -> target.
    req: Flow,
    /// Target -> caller.
    resp: Flow,
    /// Any response byte has been queued for the caller.
    response_started: bool,
    down_send_closed: bool,
    down_recv_closed: bool,
    up_send_closed: bool,
    up_recv_closed: bool,
    deadline: Option<Instant>,
    /// Metrics slot of the capability, once routed.
    metric: Option<MetricSlot>,
    /// When the header arrived.
    started: Option<Instant>,
    /// The answer's status, once known.
    status: Option<Status>,
}

/// One worker thread's state. See the module docs for the loop.
pub(crate) struct Worker {
    index: usize,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    poll: Poll,
    sockets: Vec<Socket>,
    endpoint: Endpoint,
    server_config: Arc<ServerConfig>,
    accepting: bool,
    conns: Vec<Option<Conn>>,
    conn_count: usize,
    per_identity: HashMap<Arc<str>, usize>,
    exchanges: Vec<Option<Exchange>>,
    ex_gens: Vec<u32>,
    ex_free: Vec<u32>,
    handoffs_in: HashMap<HandoffId, ExKey>,
    router: Router<ConnIdx>,
    agents: HashMap<SessionId, Arc<AgentInfo>>,
    /// Connections of each session on this worker (its primary here, and its lanes), so that
    /// per-session lookups never scan every connection.
    session_conns: HashMap<SessionId, smallvec::SmallVec<[ConnIdx; 2]>>,
    /// Home worker: detaching sessions and how many workers have yet to report done.
    detach_waiting: HashMap<SessionId, usize>,
    /// Sessions detaching whose home waits for this worker's `DetachDone`.
    detach_watch: HashSet<SessionId>,
    /// Connection timers (QUIC timers and attach deadlines), ordered by when they are due.
    conn_timers: BTreeSet<(Instant, ConnIdx)>,
    /// Request deadlines; an entry is removed when its exchange ends.
    deadlines: BTreeSet<(Instant, u32, u32)>,
    dirty: Vec<ConnIdx>,
    pumps: VecDeque<ExKey>,
    outbox: VecDeque<(usize, WorkerMsg)>,
    inbox: Receiver<WorkerMsg>,
    recv_bufs: Vec<Vec<u8>>,
    send_buf: Vec<u8>,
    arena: BytesMut,
    drain_deadline: Option<Instant>,
    session_seq: u64,
    metrics: WorkerMetrics,
    /// Requests forwarded in this iteration, whose residence is recorded at its end.
    residence_batch: Vec<MetricSlot>,
    /// When this iteration's receive batch was taken.
    iteration_start: Instant,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared>,
        poll: Poll,
        sockets: Vec<Socket>,
        endpoint: Endpoint,
        server_config: Arc<ServerConfig>,
        inbox: Receiver<WorkerMsg>,
        table: Arc<TableGeneration>,
    ) -> Self {
        let stats = shared.stats[index].clone();
        let gro = sockets
            .iter()
            .map(|s| s.state.gro_segments())
            .max()
            .unwrap_or(1);
        let buf_len = (1500 * gro).clamp(1500, 65_535);
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        Self {
            index,
            stats,
            poll,
            sockets,
            endpoint,
            server_config,
            accepting: true,
            conns: Vec::new(),
            conn_count: 0,
            per_identity: HashMap::new(),
            exchanges: Vec::new(),
            ex_gens: Vec::new(),
            ex_free: Vec::new(),
            handoffs_in: HashMap::new(),
            router: Router::new(
                table,
                u64::from_le_bytes(seed) ^ index as u64,
                shared.config.limits.max_metric_capabilities,
            ),
            metrics: WorkerMetrics::default(),
            residence_batch: Vec::new(),
            iteration_start: Instant::now(),
            agents: HashMap::new(),
            session_conns: HashMap::new(),
            detach_waiting: HashMap::new(),
            detach_watch: HashSet::new(),
            conn_timers: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            dirty: Vec::new(),
            pumps: VecDeque::new(),
            outbox: VecDeque::new(),
            inbox,
            recv_bufs: (0..BATCH).map(|_| vec![0; buf_len]).collect(),
            send_buf: Vec::with_capacity(65_536),
            arena: BytesMut::with_capacity(HEADER_ARENA),
            drain_deadline: None,
            session_seq: 0,
            shared,
        }
    }

    /// Runs the event loop until the worker has drained and closed every connection.
    pub(crate) fn run(mut self) {
        let _span = debug_span!("worker", index = self.index).entered();
        let mut events = Events::with_capacity(256);
        for (i, s) in self.sockets.iter_mut().enumerate() {
            if let Err(e) = self.poll.registry().register(
                &mut s.io,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!(error = %e, "cannot register socket");
                return;
            }
        }
        loop {
            let now = Instant::now();
            let timeout = if !self.outbox.is_empty() || !self.pumps.is_empty() {
                Some(Duration::from_millis(1))
            } else {
                [
                    self.conn_timers.first().map(|t| t.0),
                    self.deadlines.first().map(|t| t.0),
                    self.drain_deadline,
                ]
                .into_iter()
                .flatten()
                .min()
                .map(|at| at.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!(error = %e, "poll failed");
                    return;
                }
            }
            let now = Instant::now();
            self.iteration_start = now;
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    Token(i) => {
                        if ev.is_writable() {
                            self.flush_blocked(i);
                        }
                        if ev.is_readable() {
                            self.receive(i, now);
                        }
                    }
                }
            }
            self.drain_inbox(now);
            self.flush_outbox();
            self.fire_timers(now);
            self.run_pumps(now);
            self.drive_dirty(now);
            if !self.residence_batch.is_empty() {
                let residence = self.iteration_start.elapsed();
                for slot in std::mem::take(&mut self.residence_batch) {
                    self.metrics.residence(slot, residence);
                }
            }
            if self.finished_draining(now) {
                return;
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Sockets and the endpoint
    // ---------------------------------------------------------------------------------------

    fn receive(&mut self, socket: usize, now: Instant) {
        let mut metas = [RecvMeta::default(); BATCH];
        let mut recv_bufs = std::mem::take(&mut self.recv_bufs);
        self.receive_into(socket, now, &mut metas, &mut recv_bufs);
        self.recv_bufs = recv_bufs;
    }

    fn receive_into(
        &mut self,
        socket: usize,
        now: Instant,
        metas: &mut [RecvMeta; BATCH],
        recv_bufs: &mut [Vec<u8>],
    ) {
        loop {
            let s = &self.sockets[socket];
            // A fixed array, not a Vec: no allocation per receive batch. `recv_bufs` holds
            // exactly BATCH buffers (built so in `Worker::new`).
            let mut slots = recv_bufs.iter_mut();
            let mut bufs: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(slots.next().expect("BATCH receive buffers"))
            });
            let n = match s.state.recv((&s.io).into(), &mut bufs, metas) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "recv failed");
                    return;
                }
            };
            for (meta, buf) in metas.iter().zip(recv_bufs.iter()).take(n) {
                let mut data = BytesMut::from(&buf[..meta.len]);
                while !data.is_empty() {
                    let stride = meta.stride.min(data.len()).max(1);
                    let datagram = data.split_to(stride);
                    self.handle_datagram(socket, now, meta, datagram);
                }
            }
        }
    }

    fn handle_datagram(&mut self, socket: usize, now: Instant, meta: &RecvMeta, data: BytesMut) {
        let mut buf = std::mem::take(&mut self.send_buf);
        buf.clear();
        match self.endpoint.handle(
            now,
            meta.addr,
            meta.dst_ip,
            meta.ecn.map(ecn_in),
            data,
            &mut buf,
        ) {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(conn) = self.conns.get_mut(ch.0).and_then(Option::as_mut) {
                    conn.quic.handle_event(ev);
                    mark_dirty(&mut self.dirty, conn, ch.0);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if !self.accepting
                    || self.conn_count >= self.shared.config.limits.max_connections_per_worker
                {
                    let t = self.endpoint.refuse(incoming, &mut buf);
                    self.send(socket, &t, &buf);
                } else {
                    match self.endpoint.accept(
                        incoming,
                        now,
                        &mut buf,
                        Some(self.server_config.clone()),
                    ) {
                        Ok((ch, quic)) => self.add_conn(ch, quic, socket, now),
                        Err(e) => {
                            debug!(error = %e.cause, "handshake refused");
                            if let Some(t) = e.response {
                                self.send(socket, &t, &buf);
                            }
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => self.send(socket, &t, &buf),
            None => {}
        }
        self.send_buf = buf;
    }

    fn add_conn(
        &mut self,
        ch: ConnectionHandle,
        quic: quinn_proto::Connection,
        socket: usize,
        now: Instant,
    ) {
        let span =
            debug_span!("conn", id = ch.0, worker = self.index, remote = %quic.remote_address());
        if self.conns.len() <= ch.0 {
            self.conns.resize_with(ch.0 + 1, || None);
        }
        let attach_deadline =
            now + Duration::from_millis(self.shared.config.limits.attach_timeout_ms);
        self.conns[ch.0] = Some(Conn {
            quic,
            socket,
            identity: None,
            role: Role::Pending,
            control: None,
            ctl_in: FrameBuffer::new(self.shared.config.limits.max_card_bytes + 1024),
            ctl_out: Vec::new(),
            streams: HashMap::new(),
            timer: None,
            attach_deadline: Some(attach_deadline),
            close_after: None,
            detaching: false,
            dirty: false,
            span,
        });
        self.conn_count += 1;
        WorkerStats::add(&self.stats.connections, 1);
        self.dirty.push(ch.0);
        if let Some(c) = self.conns[ch.0].as_mut() {
            c.dirty = true;
        }
    }

    fn send(&mut self, socket: usize, t: &quinn_proto::Transmit, buf: &[u8]) {
        let s = &mut self.sockets[socket];
        if s.blocked.is_some() {
            WorkerStats::add(&self.stats.send_drops, 1);
            return;
        }
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t.ecn.map(ecn_out),
            contents: &buf[..t.size],
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        match s.state.try_send((&s.io).into(), &transmit) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.blocked = Some((t.destination, buf[..t.size].to_vec(), t.segment_size));
            }
            Err(e) => debug!(error = %e, "send failed"),
        }
    }

    fn flush_blocked(&mut self, socket: usize) {
        let s = &mut self.sockets[socket];
        let Some((dest, data, segment_size)) = s.blocked.take() else {
            return;
        };
        let transmit = quinn_udp::Transmit {
            destination: dest,
            ecn: None,
            contents: &data,
            segment_size,
            src_ip: None,
        };
        match s.state.try_send((&s.io).into(), &transmit) {
            Ok(()) => {
                // Connections that stopped transmitting because of the blocked socket go on.
                for (i, c) in self.conns.iter_mut().enumerate() {
                    if let Some(c) = c {
                        if c.socket == socket {
                            mark_dirty(&mut self.dirty, c, i);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.blocked = Some((dest, data, segment_size));
            }
            Err(e) => debug!(error = %e, "send failed"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Timers
    // ---------------------------------------------------------------------------------------

    /// Re-files connection `ci` under its next due time: the earlier of its QUIC timer and
    /// its attach deadline.
    fn update_conn_timer(&mut self, ci: ConnIdx) {
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return;
        };
        let next = match (conn.quic.poll_timeout(), conn.attach_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next == conn.timer {
            return;
        }
        if let Some(old) = conn.timer {
            self.conn_timers.remove(&(old, ci));
        }
        conn.timer = next;
        if let Some(at) = next {
            self.conn_timers.insert((at, ci));
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&(at, ci)) = self.conn_timers.first() {
            if at > now {
                break;
            }
            self.conn_timers.pop_first();
            let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                continue;
            };
            conn.timer = None;
            if conn.quic.poll_timeout().is_some_and(|t| t <= now) {
                conn.quic.handle_timeout(now);
            }
            if let (Some((code, reason)), true) = (
                conn.close_after,
                conn.attach_deadline.is_some_and(|t| t <= now),
            ) {
                conn.attach_deadline = None;
                close(conn, now, code, reason);
            } else if conn.role == Role::Pending && conn.attach_deadline.is_some_and(|t| t <= now) {
                conn.attach_deadline = None;
                debug!(parent: &conn.span, "no ATTACH or LANE in time");
                close(conn, now, ConnectionCode::AttachTimeout, "attach timeout");
            }
            mark_dirty(&mut self.dirty, conn, ci);
        }
        while let Some(&(at, idx, gen)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_passed(ExKey { idx, gen });
        }
    }

    // ---------------------------------------------------------------------------------------
    // Driving connections
    // ---------------------------------------------------------------------------------------

    fn drive_dirty(&mut self, now: Instant) {
        // Handling one connection's events may dirty others (forwarded data); loop until quiet.
        for _ in 0..64 {
            if self.dirty.is_empty() {
                break;
            }
            let dirty = std::mem::take(&mut self.dirty);
            for ci in dirty {
                self.drive(ci, now);
            }
            self.run_pumps(now);
        }
    }

    fn drive(&mut self, ci: ConnIdx, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return;
        };
        conn.dirty = false;
        // Endpoint events (connection ids, draining) go through the endpoint and may come back.
        while let Some(ev) = conn.quic.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(ci), ev) {
                conn.quic.handle_event(back);
            }
        }
        // Application events.
        loop {
            let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                return;
            };
            let Some(ev) = conn.quic.poll() else {
                break;
            };
            self.on_event(ci, ev, now);
        }
        self.flush_control(ci);
        // Transmit.
        let Some(socket) = self
            .conns
            .get(ci)
            .and_then(Option::as_ref)
            .map(|c| c.socket)
        else {
            return;
        };
        let max_gso = self.sockets[socket].state.max_gso_segments();
        let mut buf = std::mem::take(&mut self.send_buf);
        while self.sockets[socket].blocked.is_none() {
            let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                break;
            };
            buf.clear();
            let Some(t) = conn.quic.poll_transmit(now, max_gso, &mut buf) else {
                break;
            };
            self.send(socket, &t, &buf);
        }
        self.send_buf = buf;
        self.update_conn_timer(ci);
        if self.conns[ci].as_ref().is_some_and(|c| c.quic.is_drained()) {
            self.remove_conn(ci);
        }
    }

    fn on_event(&mut self, ci: ConnIdx, ev: Event, now: Instant) {
        match ev {
            Event::Connected => {
                let Some(conn) = self.conns[ci].as_mut() else {
                    return;
                };
                let Some(id) = crate::tls::peer_spiffe_id(&conn.quic) else {
                    // The verifier accepted the certificate, so this cannot happen; refuse anyway.
                    close(conn, now, ConnectionCode::Unauthenticated, "no identity");
                    return;
                };
                let id: Arc<str> = id.into();
                let count = self.per_identity.entry(id.clone()).or_insert(0);
                *count += 1;
                let over = *count > self.shared.config.limits.max_connections_per_identity;
                debug!(parent: &conn.span, identity = %id, "handshake complete");
                conn.identity = Some(id);
                if over {
                    warn!("too many connections for one identity");
                    close(
                        conn,
                        now,
                        ConnectionCode::LimitExceeded,
                        "too many connections",
                    );
                }
            }
            Event::HandshakeDataReady | Event::DatagramReceived | Event::DatagramsUnblocked => {}
            Event::ConnectionLost { reason } => {
                if let Some(conn) = self.conns[ci].as_ref() {
                    debug!(parent: &conn.span, %reason, "connection lost");
                }
                self.connection_gone(ci);
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => self.accept_streams(ci, now),
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {}
            Event::Stream(StreamEvent::Readable { id } | StreamEvent::Writable { id }) => {
                let Some(conn) = self.conns[ci].as_mut() else {
                    return;
                };
                if conn.control == Some(id) {
                    self.read_control(ci, now);
                } else if let Some(&key) = conn.streams.get(&id) {
                    self.pumps.push_back(key);
                }
            }
            Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                let Some(conn) = self.conns[ci].as_mut() else {
                    return;
                };
                if conn.control == Some(id) {
                    close(
                        conn,
                        now,
                        ConnectionCode::ProtocolViolation,
                        "control stream stopped",
                    );
                } else if let Some(&key) = conn.streams.get(&id) {
                    self.stream_stopped(key, ci, id, error_code);
                }
            }
            Event::Stream(StreamEvent::Finished { id }) => {
                let Some(conn) = self.conns[ci].as_mut() else {
                    return;
                };
                if conn.control == Some(id) {
                    if let Some((code, reason)) = conn.close_after {
                        close(conn, now, code, reason);
                    }
                }
            }
            Event::Stream(StreamEvent::Available { .. }) => {}
        }
    }

    fn accept_streams(&mut self, ci: ConnIdx, now: Instant) {
        loop {
            let Some(conn) = self.conns[ci].as_mut() else {
                return;
            };
            let Some(id) = conn.quic.streams().accept(Dir::Bi) else {
                return;
            };
            if conn.control.is_none() && conn.role == Role::Pending {
                conn.control = Some(id);
                self.read_control(ci, now);
                continue;
            }
            if conn.role == Role::Pending {
                // Invocations before ATTACH/LANE completes are refused.
                let _ = conn
                    .quic
                    .recv_stream(id)
                    .stop(StreamCode::ProtocolViolation.into_varint());
                let _ = conn
                    .quic
                    .send_stream(id)
                    .reset(StreamCode::ProtocolViolation.into_varint());
                continue;
            }
            let key = self.new_exchange(Leg::Local {
                conn: ci,
                stream: id,
            });
            // The header must arrive within the attach timeout; the request's own deadline
            // replaces this once it has.
            let header_by =
                now + Duration::from_millis(self.shared.config.limits.attach_timeout_ms);
            if let Some(x) = self.ex(key) {
                x.deadline = Some(header_by);
            }
            self.deadlines.insert((header_by, key.idx, key.gen));
            if let Some(conn) = self.conns[ci].as_mut() {
                conn.streams.insert(id, key);
            }
            WorkerStats::add(&self.stats.requests, 1);
            self.pumps.push_back(key);
        }
    }

    fn connection_gone(&mut self, ci: ConnIdx) {
        let Some(conn) = self.conns[ci].as_mut() else {
            return;
        };
        let keys: Vec<(StreamId, ExKey)> = conn.streams.drain().collect();
        let role = conn.role;
        conn.role = Role::Pending;
        conn.control = None;
        if let Role::Primary(session) | Role::Lane(session) = role {
            if let Some(list) = self.session_conns.get_mut(&session) {
                list.retain(|&mut c| c != ci);
                if list.is_empty() {
                    self.session_conns.remove(&session);
                }
            }
        }
        for (stream, key) in keys {
            self.leg_failed(key, ci, stream);
        }
        match role {
            Role::Primary(session) => {
                self.broadcast(|| WorkerMsg::AgentDown { session });
                self.agent_down(session);
                self.shared.agents.fetch_sub(1, Ordering::Relaxed);
                WorkerStats::sub(&self.stats.agents, 1);
            }
            Role::Lane(session) => {
                if self
                    .router
                    .find(session)
                    .and_then(|i| self.router.agent(i)?.local)
                    == Some(ci)
                {
                    self.router.set_local(session, None);
                }
                WorkerStats::sub(&self.stats.lanes, 1);
            }
            Role::Pending => {}
        }
    }

    fn remove_conn(&mut self, ci: ConnIdx) {
        self.connection_gone(ci);
        if let Some(conn) = self.conns[ci].take() {
            if let Some(t) = conn.timer {
                self.conn_timers.remove(&(t, ci));
            }
            if let Some(id) = conn.identity {
                if let Some(n) = self.per_identity.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_identity.remove(&id);
                    }
                }
            }
            self.conn_count -= 1;
            WorkerStats::sub(&self.stats.connections, 1);
        }
    }

    // ---------------------------------------------------------------------------------------
    // The control stream
    // ---------------------------------------------------------------------------------------

    fn read_control(&mut self, ci: ConnIdx, now: Instant) {
        let Some(conn) = self.conns[ci].as_mut() else {
            return;
        };
        let Some(id) = conn.control else {
            return;
        };
        let mut finished = false;
        let mut frames = Vec::new();
        let mut error = None;
        {
            let mut recv = conn.quic.recv_stream(id);
            let Ok(mut chunks) = recv.read(true) else {
                return;
            };
            'read: loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        // Decode as we go, so the buffer only ever holds one partial frame.
                        conn.ctl_in.extend(&chunk.bytes);
                        loop {
                            match conn.ctl_in.next_frame() {
                                Ok(Some(frame)) => frames.push(frame),
                                Ok(None) => break,
                                Err(e) => {
                                    error = Some(e);
                                    break 'read;
                                }
                            }
                        }
                    }
                    Ok(None) | Err(ReadError::Reset(_)) => {
                        finished = true;
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                }
            }
            let _ = chunks.finalize();
        }
        if let Some(e) = error {
            debug!(parent: &conn.span, error = %e, "malformed control frame");
            let code = if matches!(e, dmsc_protocol::DecodeError::TooLong { what: "frame", .. }) {
                ConnectionCode::FrameTooLarge
            } else {
                ConnectionCode::ProtocolViolation
            };
            close(conn, now, code, "malformed control frame");
            return;
        }
        for frame in frames {
            self.on_control(ci, frame, now);
        }
        if finished {
            if let Some(conn) = self.conns[ci].as_mut().filter(|c| c.close_after.is_none()) {
                // The agent closed its control stream: it is leaving.
                close(conn, now, ConnectionCode::NoError, "control stream closed");
            }
        }
        self.flush_control(ci);
    }

    fn write_control(&mut self, ci: ConnIdx, frame: &ControlFrame) {
        if let Some(conn) = self.conns[ci].as_mut() {
            if let Err(e) = frame.encode(&mut conn.ctl_out) {
                warn!(error = %e, "control frame not encodable");
            }
            mark_dirty(&mut self.dirty, conn, ci);
        }
    }

    fn flush_control(&mut self, ci: ConnIdx) {
        let Some(conn) = self.conns[ci].as_mut() else {
            return;
        };
        let Some(id) = conn.control else {
            return;
        };
        if conn.ctl_out.is_empty() && conn.close_after.is_none() {
            return;
        }
        match conn.quic.send_stream(id).write(&conn.ctl_out) {
            Ok(n) => {
                conn.ctl_out.drain(..n);
            }
            Err(WriteError::Blocked) => {}
            Err(_) => conn.ctl_out.clear(),
        }
        if conn.ctl_out.is_empty() && conn.close_after.is_some() {
            // Nothing more will be said; the close follows when the peer has it all.
            let _ = conn.quic.send_stream(id).finish();
        }
    }

    fn refuse(
        &mut self,
        ci: ConnIdx,
        refusal: Refusal,
        reason: String,
        now: Instant,
        close_conn: bool,
    ) {
        if let Some(conn) = self.conns[ci].as_ref() {
            debug!(parent: &conn.span, ?refusal, %reason, "attach refused");
        }
        self.write_control(ci, &ControlFrame::AttachRefused { refusal, reason });
        if close_conn {
            if let Some(conn) = self.conns[ci].as_mut() {
                // Close once the refusal has been delivered (or after a short bound), so the
                // agent learns why.
                conn.close_after = Some((ConnectionCode::AttachRefused, "attach refused"));
                conn.attach_deadline = Some(now + Duration::from_secs(2));
            }
        }
        self.flush_control(ci);
    }

    fn on_control(&mut self, ci: ConnIdx, frame: ControlFrame, now: Instant) {
        let Some(conn) = self.conns[ci].as_mut() else {
            return;
        };
        let role = conn.role;
        let detaching = conn.detaching;
        let Some(identity) = conn.identity.clone() else {
            close(conn, now, ConnectionCode::Unauthenticated, "no identity");
            return;
        };
        match (role, frame) {
            (Role::Pending, ControlFrame::Attach { .. } | ControlFrame::Lane { .. })
                if self.drain_deadline.is_some() =>
            {
                self.refuse(
                    ci,
                    Refusal::Draining,
                    "gateway is draining".into(),
                    now,
                    true,
                )
            }
            (
                Role::Pending,
                ControlFrame::Attach {
                    max_concurrent,
                    card,
                },
            ) => self.attach(ci, identity, max_concurrent, &card, now),
            (
                Role::Pending,
                ControlFrame::Lane {
                    session,
                    lane_token,
                },
            ) => self.bind_lane(ci, identity, session, lane_token, now),
            (Role::Primary(_), ControlFrame::UpdateCard { .. }) if detaching => {
                self.write_control(
                    ci,
                    &ControlFrame::UpdateResult {
                        refusal: Some(Refusal::NotPermitted),
                        reason: "the agent is detaching".into(),
                    },
                );
            }
            (Role::Primary(session), ControlFrame::UpdateCard { card }) => {
                let (refusal, reason) = match self.parse_card(&card) {
                    Ok(card) => {
                        if let Some(old) = self.agents.get(&session) {
                            let info = Arc::new(AgentInfo {
                                session,
                                home: self.index,
                                identity: old.identity.clone(),
                                lane_token: old.lane_token,
                                limit: old.limit,
                                capabilities: card.capabilities().map(Box::from).collect(),
                                card,
                            });
                            self.broadcast(|| WorkerMsg::AgentUp(info.clone()));
                            self.agent_up(info);
                        }
                        (None, String::new())
                    }
                    Err(reason) => (Some(Refusal::BadCard), reason),
                };
                self.write_control(ci, &ControlFrame::UpdateResult { refusal, reason });
            }
            (
                Role::Primary(_) | Role::Lane(_),
                ControlFrame::Discover {
                    query_id,
                    prefix,
                    tag,
                },
            ) => {
                let frame = self.discover(query_id, &prefix, &tag);
                self.write_control(ci, &frame);
            }
            (Role::Primary(session), ControlFrame::Detach) => {
                if detaching {
                    return;
                }
                if let Some(conn) = self.conns[ci].as_mut() {
                    conn.detaching = true;
                    debug!(parent: &conn.span, ?session, "detaching");
                }
                let workers = self.shared.senders.len();
                self.detach_waiting.insert(session, workers);
                self.broadcast(|| WorkerMsg::AgentDetaching { session });
                self.agent_detaching(session);
            }
            (_, ControlFrame::Unknown { .. }) => {}
            (_, ControlFrame::Attach { .. } | ControlFrame::Lane { .. }) => self.refuse(
                ci,
                Refusal::AlreadyAttached,
                "already attached".into(),
                now,
                false,
            ),
            (_, _) => {
                if let Some(conn) = self.conns[ci].as_mut() {
                    close(
                        conn,
                        now,
                        ConnectionCode::ProtocolViolation,
                        "unexpected control frame",
                    );
                }
            }
        }
    }

    fn parse_card(&self, json: &[u8]) -> Result<AgentCard, String> {
        if json.len() > self.shared.config.limits.max_card_bytes {
            return Err(format!(
                "card is {} bytes, over the gateway's limit of {} (limits.max_card_bytes)",
                json.len(),
                self.shared.config.limits.max_card_bytes
            ));
        }
        AgentCard::from_json(json).map_err(|e| e.to_string())
    }

    fn attach(
        &mut self,
        ci: ConnIdx,
        identity: Arc<str>,
        max_concurrent: u64,
        card: &[u8],
        now: Instant,
    ) {
        let card = match self.parse_card(card) {
            Ok(card) => card,
            Err(reason) => return self.refuse(ci, Refusal::BadCard, reason, now, true),
        };
        let limits = &self.shared.config.limits;
        let attached = self.shared.agents.fetch_add(1, Ordering::Relaxed);
        if attached >= limits.max_agents {
            self.shared.agents.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(
                ci,
                Refusal::GatewayFull,
                format!("gateway holds its maximum of {} agents", limits.max_agents),
                now,
                true,
            );
        }
        let limit = match max_concurrent {
            0 => limits.max_inflight_per_agent,
            n => n.min(u64::from(limits.max_inflight_per_agent)) as u32,
        };
        self.session_seq += 1;
        let session = SessionId(((self.index as u64) << 48) | self.session_seq);
        let mut token = [0u8; 16];
        if getrandom::getrandom(&mut token).is_err() {
            self.shared.agents.fetch_sub(1, Ordering::Relaxed);
            if let Some(conn) = self.conns[ci].as_mut() {
                close(conn, now, ConnectionCode::InternalError, "no randomness");
            }
            return;
        }
        let info = Arc::new(AgentInfo {
            session,
            home: self.index,
            identity,
            lane_token: LaneToken(token),
            limit,
            capabilities: card.capabilities().map(Box::from).collect(),
            card,
        });
        self.session_conns.entry(session).or_default().push(ci);
        if let Some(conn) = self.conns[ci].as_mut() {
            conn.role = Role::Primary(session);
            conn.attach_deadline = None;
            debug!(parent: &conn.span, ?session, identity = %info.identity, capabilities = info.capabilities.len(), "agent attached");
        }
        WorkerStats::add(&self.stats.agents, 1);
        self.broadcast(|| WorkerMsg::AgentUp(info.clone()));
        self.agent_up(info);
        self.router.set_local(session, Some(ci));
        let lanes = if self.shared.config.lanes {
            self.shared.lane_addrs.clone()
        } else {
            Vec::new()
        };
        self.write_control(
            ci,
            &ControlFrame::AttachOk {
                session,
                lane_token: LaneToken(token),
                worker: self.index as u64,
                lanes,
                max_concurrent: u64::from(limit),
            },
        );
    }

    fn bind_lane(
        &mut self,
        ci: ConnIdx,
        identity: Arc<str>,
        session: SessionId,
        token: LaneToken,
        now: Instant,
    ) {
        let home = self.agents.get(&session).map(|a| a.home);
        let ok = self
            .agents
            .get(&session)
            .is_some_and(|a| a.lane_token == token && a.identity == identity);
        if !ok {
            return self.refuse(
                ci,
                Refusal::UnknownSession,
                "no such session for this identity".into(),
                now,
                true,
            );
        }
        self.session_conns.entry(session).or_default().push(ci);
        if let Some(conn) = self.conns[ci].as_mut() {
            conn.role = Role::Lane(session);
            conn.attach_deadline = None;
            debug!(parent: &conn.span, ?session, "lane bound");
        }
        WorkerStats::add(&self.stats.lanes, 1);
        // On the agent's home worker the primary connection stays the route.
        if home != Some(self.index)
            && !self.detach_watch.contains(&session)
            && !self.detach_waiting.contains_key(&session)
        {
            self.router.set_local(session, Some(ci));
        }
        self.write_control(
            ci,
            &ControlFrame::LaneOk {
                worker: self.index as u64,
            },
        );
    }

    fn snapshot(&self) -> WorkerSnapshot {
        let agents = self
            .agents
            .values()
            .filter(|a| a.home == self.index)
            .map(|a| {
                let entry = self
                    .router
                    .find(a.session)
                    .and_then(|i| self.router.agent(i));
                AgentView {
                    session: a.session.0,
                    identity: a.identity.to_string(),
                    name: a.card.name.clone(),
                    capabilities: entry
                        .map(|e| e.capabilities.iter().map(|c| c.to_string()).collect())
                        .unwrap_or_default(),
                    home_worker: a.home,
                    max_concurrent: a.limit,
                    detaching: self.detach_waiting.contains_key(&a.session),
                }
            })
            .collect();
        WorkerSnapshot {
            worker: self.index,
            generation: self.router.table().generation.0,
            capabilities: self.metrics.snapshot(self.router.metric_names()),
            agents,
        }
    }

    fn discover(&self, query_id: u64, prefix: &str, tag: &str) -> ControlFrame {
        let mut entries: Vec<DiscoveryEntry> = Vec::new();
        let mut truncated = false;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for info in self.agents.values() {
            let routable = self
                .router
                .find(info.session)
                .and_then(|i| self.router.agent(i))
                .is_some_and(|a| !a.capabilities.is_empty());
            if !routable {
                continue;
            }
            for skill in &info.card.skills {
                if !skill.id.starts_with(prefix)
                    || (!tag.is_empty() && !skill.tags.iter().any(|t| t == tag))
                {
                    continue;
                }
                if let Some(&i) = seen.get(skill.id.as_str()) {
                    entries[i].providers += 1;
                    continue;
                }
                if entries.len() >= MAX_DISCOVERY_ENTRIES {
                    truncated = true;
                    continue;
                }
                seen.insert(&skill.id, entries.len());
                let clip = |v: &[String]| -> Vec<String> {
                    v.iter()
                        .take(dmsc_protocol::limits::MAX_LIST_ITEMS)
                        .map(|s| truncate(s, dmsc_protocol::limits::MAX_DISCOVERY_STRING_BYTES))
                        .collect()
                };
                entries.push(DiscoveryEntry {
                    capability: skill.id.clone(),
                    description: truncate(
                        &skill.description,
                        dmsc_protocol::limits::MAX_DISCOVERY_STRING_BYTES,
                    ),
                    providers: 1,
                    tags: clip(&skill.tags),
                    input_modes: clip(skill.effective_input_modes(&info.card)),
                    output_modes: clip(skill.effective_output_modes(&info.card)),
                });
            }
        }
        // Keep the frame under the control-frame limit.
        let mut size = 0;
        let mut keep = entries.len();
        for (i, e) in entries.iter().enumerate() {
            size += 16
                + e.capability.len()
                + e.description.len()
                + e.tags
                    .iter()
                    .chain(&e.input_modes)
                    .chain(&e.output_modes)
                    .map(|s| s.len() + 4)
                    .sum::<usize>();
            if size > MAX_CONTROL_FRAME_BYTES - 1024 {
                keep = i;
                truncated = true;
                break;
            }
        }
        entries.truncate(keep);
        entries.sort_by(|a, b| a.capability.cmp(&b.capability));
        ControlFrame::DiscoverResult {
            query_id,
            truncated,
            entries,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Agents across workers
    // ---------------------------------------------------------------------------------------

    fn broadcast(&mut self, make: impl Fn() -> WorkerMsg) {
        for w in 0..self.shared.senders.len() {
            if w != self.index {
                self.post(w, make());
            }
        }
    }

    fn post(&mut self, worker: usize, msg: WorkerMsg) {
        if !self.outbox.is_empty() {
            self.outbox.push_back((worker, msg));
            return;
        }
        match self.shared.senders[worker].try_send(msg) {
            Ok(()) => {
                let _ = self.shared.wakers[worker].wake();
            }
            Err(TrySendError::Full(msg)) => self.outbox.push_back((worker, msg)),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn flush_outbox(&mut self) {
        let mut woken = vec![false; self.shared.senders.len()];
        while let Some((worker, msg)) = self.outbox.pop_front() {
            match self.shared.senders[worker].try_send(msg) {
                Ok(()) => woken[worker] = true,
                Err(TrySendError::Full(msg)) => {
                    self.outbox.push_front((worker, msg));
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        for (w, woke) in woken.into_iter().enumerate() {
            if woke {
                let _ = self.shared.wakers[w].wake();
            }
        }
    }

    fn agent_up(&mut self, info: Arc<AgentInfo>) {
        let withdrawn = self.detach_watch.contains(&info.session)
            || self.detach_waiting.contains_key(&info.session);
        self.router.insert(AgentEntry {
            session: info.session,
            home: info.home,
            local: None,
            outstanding: 0,
            limit: info.limit,
            capabilities: if withdrawn {
                Arc::from([])
            } else {
                info.capabilities.clone()
            },
        });
        self.agents.insert(info.session, info);
    }

    fn agent_detaching(&mut self, session: SessionId) {
        self.detach_watch.insert(session);
        if let Some(info) = self.agents.get(&session) {
            let home = info.home;
            self.router.insert(AgentEntry {
                session,
                home,
                local: None,
                outstanding: 0,
                limit: 0,
                capabilities: Arc::from([]),
            });
        }
        self.check_detach(session);
    }

    fn check_detach(&mut self, session: SessionId) {
        if !self.detach_watch.contains(&session) {
            return;
        }
        let idle = self
            .router
            .find(session)
            .and_then(|i| self.router.agent(i))
            .is_none_or(|a| a.outstanding == 0);
        if !idle {
            return;
        }
        self.detach_watch.remove(&session);
        let home = self.agents.get(&session).map_or(self.index, |a| a.home);
        if home == self.index {
            self.detach_done(session);
        } else {
            self.post(home, WorkerMsg::DetachDone { session });
        }
    }

    /// This worker's connection of `session` with `role`, if any.
    fn session_conn(&self, session: SessionId, role: Role) -> Option<ConnIdx> {
        self.session_conns
            .get(&session)?
            .iter()
            .copied()
            .find(|&ci| {
                self.conns
                    .get(ci)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.role == role)
            })
    }

    fn detach_done(&mut self, session: SessionId) {
        let Some(left) = self.detach_waiting.get_mut(&session) else {
            return;
        };
        *left -= 1;
        if *left > 0 {
            return;
        }
        self.detach_waiting.remove(&session);
        if let Some(ci) = self.session_conn(session, Role::Primary(session)) {
            self.write_control(ci, &ControlFrame::Detached);
        }
    }

    fn agent_down(&mut self, session: SessionId) {
        // The session is over: its lanes on this worker have nothing left to carry.
        let now = Instant::now();
        for ci in self.session_conns.remove(&session).unwrap_or_default() {
            if let Some(conn) = self.conns[ci].as_mut() {
                if conn.role == Role::Lane(session) {
                    close(conn, now, ConnectionCode::NoError, "session ended");
                    mark_dirty(&mut self.dirty, conn, ci);
                }
            }
        }
        self.router.remove(session);
        self.agents.remove(&session);
        self.detach_watch.remove(&session);
        self.detach_waiting.remove(&session);
    }

    fn drain_inbox(&mut self, now: Instant) {
        // Bounded per iteration so a flood of messages cannot starve the sockets.
        for _ in 0..4096 {
            let Ok(msg) = self.inbox.try_recv() else {
                return;
            };
            match msg {
                WorkerMsg::AgentUp(info) => {
                    let session = info.session;
                    let lane = self.session_conn(session, Role::Lane(session));
                    self.agent_up(info);
                    let routed = self
                        .router
                        .find(session)
                        .and_then(|i| self.router.agent(i))
                        .is_some_and(|a| a.local.is_some());
                    if let (Some(ci), false) = (lane, routed) {
                        self.router.set_local(session, Some(ci));
                    }
                }
                WorkerMsg::AgentDetaching { session } => self.agent_detaching(session),
                WorkerMsg::DetachDone { session } => self.detach_done(session),
                WorkerMsg::AgentDown { session } => self.agent_down(session),
                WorkerMsg::Handoff { id, to_home, event } => {
                    self.on_handoff(id, to_home, event, now)
                }
                WorkerMsg::Install(table) => self.router.install(table),
                WorkerMsg::Snapshot(reply) => {
                    let _ = reply.try_send(self.snapshot());
                }
                WorkerMsg::Drain { grace } => self.start_drain(now, grace),
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Draining
    // ---------------------------------------------------------------------------------------

    fn start_drain(&mut self, now: Instant, grace: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.accepting = false;
        self.drain_deadline = Some(now + grace);
        let grace_ms = grace.as_millis() as u64;
        for ci in 0..self.conns.len() {
            let primary = self.conns[ci]
                .as_ref()
                .is_some_and(|c| matches!(c.role, Role::Primary(_)));
            if primary {
                self.write_control(ci, &ControlFrame::Drain { grace_ms });
            }
        }
        debug!(worker = self.index, grace_ms, "draining");
    }

    fn finished_draining(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        let busy = self.exchanges.iter().any(Option::is_some);
        if busy && now < deadline {
            return false;
        }
        // Close everything that is still open, once.
        let mut open = false;
        for ci in 0..self.conns.len() {
            if let Some(conn) = self.conns[ci].as_mut() {
                if !conn.quic.is_closed() {
                    close(
                        conn,
                        now,
                        ConnectionCode::ShuttingDown,
                        "gateway shutting down",
                    );
                    mark_dirty(&mut self.dirty, conn, ci);
                }
                open = true;
            }
        }
        self.drive_dirty(now);
        // Give closes a moment to reach peers, bounded.
        !open || now >= deadline + Duration::from_millis(250)
    }

    // ---------------------------------------------------------------------------------------
    // Exchanges
    // ---------------------------------------------------------------------------------------

    fn new_exchange(&mut self, down: Leg) -> ExKey {
        let ex = Exchange {
            gen: 0,
            down,
            up: None,
            target: None,
            header_buf: Vec::new(),
            header_raw: None,
            header_done: false,
            req: Flow::default(),
            resp: Flow::default(),
            response_started: false,
            down_send_closed: false,
            down_recv_closed: false,
            up_send_closed: false,
            up_recv_closed: false,
            deadline: None,
            metric: None,
            started: None,
            status: None,
        };
        let idx = match self.ex_free.pop() {
            Some(i) => i,
            None => {
                self.exchanges.push(None);
                self.ex_gens.push(0);
                self.exchanges.len() as u32 - 1
            }
        };
        let gen = self.ex_gens[idx as usize];
        self.exchanges[idx as usize] = Some(Exchange { gen, ..ex });
        ExKey { idx, gen }
    }

    fn ex(&mut self, key: ExKey) -> Option<&mut Exchange> {
        self.exchanges
            .get_mut(key.idx as usize)?
            .as_mut()
            .filter(|x| x.gen == key.gen)
    }

    fn run_pumps(&mut self, now: Instant) {
        let mut budget = 100_000;
        while let Some(key) = self.pumps.pop_front() {
            self.pump(key, now);
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
    }

    /// Moves everything that can move in exchange `key`, then frees it if it is complete.
    fn pump(&mut self, key: ExKey, now: Instant) {
        // Alternate reading and writing until nothing moves: a write that empties a queue
        // allows the next read, and QUIC will not signal "readable" again for data that was
        // already there.
        for _ in 0..64 {
            let Some(x) = self.ex(key) else {
                return;
            };
            let mut progress = false;
            // Request body: caller -> target.
            if let Leg::Local { conn, stream } = x.down {
                if !x.down_recv_closed && x.req.queue.is_empty() && x.req.unacked < HANDOFF_WINDOW {
                    progress |= self.read_down(key, conn, stream, now);
                }
            }
            progress |= self.flush(key, true);
            // Response: target -> caller.
            if let Some(Some(Leg::Local { conn, stream })) = self.ex(key).map(|x| x.up) {
                let x = self.ex(key).expect("checked above");
                if !x.up_recv_closed && x.resp.queue.is_empty() && x.resp.unacked < HANDOFF_WINDOW {
                    progress |= self.read_up(key, conn, stream);
                }
            }
            progress |= self.flush(key, false);
            if !progress {
                break;
            }
        }
        self.maybe_finish(key);
    }

    /// Reads what the caller sent; true if anything happened.
    fn read_down(&mut self, key: ExKey, ci: ConnIdx, stream: StreamId, now: Instant) -> bool {
        let limit = self.shared.config.limits.max_header_bytes;
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return false;
        };
        let Some(x) = self
            .exchanges
            .get_mut(key.idx as usize)
            .and_then(Option::as_mut)
        else {
            return false;
        };
        let mut reset = None;
        let mut header_ready = false;
        let before = (x.req.queue.len(), x.req.fin, x.header_buf.len());
        {
            let mut recv = conn.quic.recv_stream(stream);
            let Ok(mut chunks) = recv.read(true) else {
                x.down_recv_closed = true;
                return true;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        if x.header_done {
                            x.req.queue.push_back(chunk.bytes);
                        } else if split_header(x, chunk.bytes, limit) {
                            header_ready = true;
                            break;
                        }
                    }
                    Ok(None) => {
                        x.req.fin = true;
                        x.down_recv_closed = true;
                        header_ready |= !x.header_done;
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Reset(code)) => {
                        reset = Some(code);
                        x.down_recv_closed = true;
                        break;
                    }
                }
            }
            if chunks.finalize().should_transmit() {
                mark_dirty(&mut self.dirty, conn, ci);
            }
        }
        let moved = before != (x.req.queue.len(), x.req.fin, x.header_buf.len());
        if reset.is_some() {
            // The caller gave up: abandon the target side.
            self.cancel_up(key, StreamCode::Cancelled);
            self.close_down_send(key, StreamCode::Cancelled);
            return true;
        }
        if header_ready {
            self.header_arrived(key, now);
            return true;
        }
        moved
    }

    fn header_arrived(&mut self, key: ExKey, now: Instant) {
        let limit = self.shared.config.limits.max_header_bytes;
        let Some(x) = self.ex(key) else {
            return;
        };
        let raw = match x.header_raw.take() {
            Some(raw) => raw,
            None if x.down_recv_closed => {
                return self.answer(key, Status::BadRequest, "stream ended inside the header")
            }
            None => return,
        };
        let header = match RequestHeader::decode(&raw, limit) {
            Ok(Some((h, _))) => h,
            Ok(None) => {
                return self.answer(key, Status::BadRequest, "stream ended inside the header")
            }
            Err(e) => {
                let msg = format!("malformed request header: {e}");
                return self.answer(key, Status::BadRequest, &msg);
            }
        };
        let Leg::Local { conn: ci, .. } = x.down else {
            return;
        };
        x.header_done = true;
        let limits = &self.shared.config.limits;
        if self.drain_deadline.is_some() {
            return self.answer(key, Status::Unavailable, "gateway is draining");
        }
        if u64::from(header.hop_count) >= u64::from(limits.max_hops) {
            return self.answer(key, Status::LoopDetected, "hop limit reached");
        }
        let deadline_ms = match header.deadline_ms {
            0 => limits.default_deadline_ms,
            d => d.min(limits.max_deadline_ms),
        };
        let Some(caller) = self.conns[ci].as_ref().and_then(|c| c.identity.clone()) else {
            return self.answer(key, Status::Denied, "no caller identity");
        };
        let selection = self.router.select(&caller, header.capability);
        let (target, local, metric) = match selection {
            Selection::Local(t, m) => (t, true, m),
            Selection::Handoff(t, m) => (t, false, m),
            Selection::NoRoute => {
                return self.answer(key, Status::NoRoute, "no agent offers this capability")
            }
            Selection::Denied => {
                return self.answer(key, Status::Denied, "policy denies this call")
            }
            Selection::Overloaded => {
                return self.answer(key, Status::Overloaded, "every candidate is at its limit")
            }
        };
        let forwarded = RequestHeader {
            caller: &caller,
            deadline_ms,
            hop_count: header.hop_count + 1,
            ..header
        };
        let encoded = self.encode_header(&forwarded);
        let deadline = now + Duration::from_millis(deadline_ms);
        let Some(x) = self.ex(key) else {
            return;
        };
        x.target = Some(target);
        x.metric = Some(metric);
        x.started = Some(now);
        if let Some(old) = x.deadline.replace(deadline) {
            self.deadlines.remove(&(old, key.idx, key.gen));
        }
        self.deadlines.insert((deadline, key.idx, key.gen));
        self.residence_batch.push(metric);
        let Some(entry) = self.router.agent(target) else {
            return;
        };
        let session = entry.session;
        if local {
            let Some(tci) = entry.local else {
                return self.answer(key, Status::TargetFailed, "target unreachable");
            };
            match self.open_up(key, tci, encoded) {
                true => WorkerStats::add(&self.stats.forwarded_local, 1),
                false => self.answer(key, Status::Overloaded, "target has no stream capacity"),
            }
        } else {
            let home = entry.home;
            let id = HandoffId {
                origin: self.index,
                key,
            };
            if let Some(x) = self.ex(key) {
                x.up = Some(Leg::Remote { worker: home, id });
            }
            WorkerStats::add(&self.stats.handoffs, 1);
            self.post(
                home,
                WorkerMsg::Handoff {
                    id,
                    to_home: true,
                    event: HandoffEvent::Open {
                        session,
                        header: encoded,
                    },
                },
            );
        }
    }

    /// Opens the target stream on `tci` and queues `header` on it. False if the target's
    /// connection allows no more streams.
    fn open_up(&mut self, key: ExKey, tci: ConnIdx, header: Bytes) -> bool {
        let Some(conn) = self.conns.get_mut(tci).and_then(Option::as_mut) else {
            return false;
        };
        let Some(stream) = conn.quic.streams().open(Dir::Bi) else {
            return false;
        };
        conn.streams.insert(stream, key);
        mark_dirty(&mut self.dirty, conn, tci);
        let Some(x) = self.ex(key) else {
            return false;
        };
        x.up = Some(Leg::Local { conn: tci, stream });
        x.req.queue.push_front(header);
        self.pumps.push_back(key);
        true
    }

    fn encode_header(&mut self, header: &RequestHeader<'_>) -> Bytes {
        // Headers are encoded into a shared arena and split off, so forwarding a request does
        // not allocate per request (one allocation per HEADER_ARENA bytes of headers).
        let mut tmp = std::mem::take(&mut self.send_buf);
        tmp.clear();
        if header.encode(&mut tmp).is_err() {
            // Every field was decoded under the same limits, and caller ids are bounded by the
            // certificate verifier; fall back to an empty caller rather than fail.
            tmp.clear();
            let _ = RequestHeader {
                caller: "",
                ..*header
            }
            .encode(&mut tmp);
        }
        if self.arena.capacity() < tmp.len() {
            self.arena = BytesMut::with_capacity(HEADER_ARENA.max(tmp.len()));
        }
        self.arena.extend_from_slice(&tmp);
        let out = self.arena.split().freeze();
        self.send_buf = tmp;
        out
    }

    /// Reads what the target sent; true if anything happened.
    fn read_up(&mut self, key: ExKey, ci: ConnIdx, stream: StreamId) -> bool {
        let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
            return false;
        };
        let Some(x) = self
            .exchanges
            .get_mut(key.idx as usize)
            .and_then(Option::as_mut)
        else {
            return false;
        };
        let mut reset = false;
        let before = (x.resp.queue.len(), x.resp.fin);
        {
            let mut recv = conn.quic.recv_stream(stream);
            let Ok(mut chunks) = recv.read(true) else {
                x.up_recv_closed = true;
                return true;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        note_response(x, &chunk.bytes);
                        x.response_started = true;
                        x.resp.queue.push_back(chunk.bytes);
                    }
                    Ok(None) => {
                        x.up_recv_closed = true;
                        if x.response_started {
                            x.resp.fin = true;
                        } else {
                            // The target ended its stream without answering.
                            reset = true;
                        }
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Reset(_)) => {
                        reset = true;
                        x.up_recv_closed = true;
                        break;
                    }
                }
            }
            if chunks.finalize().should_transmit() {
                mark_dirty(&mut self.dirty, conn, ci);
            }
        }
        let moved = before != (x.resp.queue.len(), x.resp.fin);
        if reset {
            self.target_failed(key);
            return true;
        }
        moved
    }

    /// Writes queued bytes of one direction to its destination leg; true if any moved.
    fn flush(&mut self, key: ExKey, request: bool) -> bool {
        let Some(x) = self.ex(key) else {
            return false;
        };
        let (dest, closed) = if request {
            (x.up, x.up_send_closed)
        } else {
            (Some(x.down), x.down_send_closed)
        };
        let Some(dest) = dest else {
            return false;
        };
        if closed {
            let flow = if request { &mut x.req } else { &mut x.resp };
            flow.queue.clear();
            return false;
        }
        match dest {
            Leg::Local { conn: ci, stream } => {
                let Some(conn) = self.conns.get_mut(ci).and_then(Option::as_mut) else {
                    return false;
                };
                let Some(x) = self
                    .exchanges
                    .get_mut(key.idx as usize)
                    .and_then(Option::as_mut)
                else {
                    return false;
                };
                let flow = if request { &mut x.req } else { &mut x.resp };
                let mut wrote_any = false;
                let mut send = conn.quic.send_stream(stream);
                while !flow.queue.is_empty() {
                    let (front, _) = flow.queue.as_mut_slices();
                    match send.write_chunks(front) {
                        Ok(w) => {
                            wrote_any |= w.bytes > 0;
                            flow.to_ack += w.bytes;
                            for _ in 0..w.chunks {
                                flow.queue.pop_front();
                            }
                            // A partly written chunk was advanced in place; drop emptied ones.
                            while flow.queue.front().is_some_and(Bytes::is_empty) {
                                flow.queue.pop_front();
                            }
                            if w.bytes == 0 {
                                break;
                            }
                        }
                        Err(WriteError::Blocked) => break,
                        Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                            flow.queue.clear();
                            break;
                        }
                    }
                }
                let mut finished = false;
                if flow.queue.is_empty() && flow.fin {
                    let _ = send.finish();
                    finished = true;
                }
                let to_ack = std::mem::take(&mut flow.to_ack);
                if finished {
                    if request {
                        x.up_send_closed = true;
                    } else {
                        x.down_send_closed = true;
                    }
                }
                let remote_src = if request {
                    x.down
                } else {
                    x.up.unwrap_or(x.down)
                };
                if wrote_any || finished {
                    mark_dirty(&mut self.dirty, conn, ci);
                }
                if let Leg::Remote { worker, id } = remote_src {
                    if to_ack > 0 {
                        self.post(
                            worker,
                            WorkerMsg::Handoff {
                                id,
                                to_home: !request,
                                event: HandoffEvent::Ack(to_ack),
                            },
                        );
                    }
                }
                wrote_any || finished
            }
            Leg::Remote { worker, id } => {
                let flow = if request { &mut x.req } else { &mut x.resp };
                let mut msgs: smallvec::SmallVec<[HandoffEvent; 4]> = smallvec::SmallVec::new();
                while let Some(chunk) = flow.queue.pop_front() {
                    flow.unacked += chunk.len();
                    msgs.push(HandoffEvent::Data(chunk));
                }
                if flow.fin {
                    msgs.push(HandoffEvent::Fin);
                    if request {
                        x.up_send_closed = true;
                    } else {
                        x.down_send_closed = true;
                    }
                }
                let moved = !msgs.is_empty();
                for event in msgs {
                    self.post(
                        worker,
                        WorkerMsg::Handoff {
                            id,
                            to_home: request,
                            event,
                        },
                    );
                }
                moved
            }
        }
    }

    /// Answers the caller with a gateway-generated status and no payload.
    fn answer(&mut self, key: ExKey, status: Status, message: &str) {
        self.stats.answered(status);
        let mut out = Vec::with_capacity(16 + message.len());
        let _ = ResponseHeader {
            status,
            content_type: "",
            message,
        }
        .encode(&mut out);
        let Some(x) = self.ex(key) else {
            return;
        };
        x.status.get_or_insert(status);
        x.header_done = true;
        x.response_started = true;
        x.resp.queue.clear();
        x.resp.queue.push_back(Bytes::from(out));
        x.resp.fin = true;
        self.stop_request_body(key);
        self.pumps.push_back(key);
    }

    /// The rest of the caller's request body is not wanted (the answer is already decided, or
    /// the target stopped reading): STOP_SENDING on a local caller stream, or, on the home side
    /// of a hand-off, a request to the origin to do so.
    fn stop_request_body(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        x.up_send_closed = true;
        x.req.queue.clear();
        if x.down_recv_closed {
            return;
        }
        x.down_recv_closed = true;
        match x.down {
            Leg::Local { conn, stream } => {
                if let Some(c) = self.conns.get_mut(conn).and_then(Option::as_mut) {
                    let _ = c
                        .quic
                        .recv_stream(stream)
                        .stop(StreamCode::Cancelled.into_varint());
                    mark_dirty(&mut self.dirty, c, conn);
                }
            }
            Leg::Remote { worker, id } => self.post(
                worker,
                WorkerMsg::Handoff {
                    id,
                    to_home: false,
                    event: HandoffEvent::StopRequest,
                },
            ),
        }
    }

    fn deadline_passed(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        x.deadline = None;
        if !x.header_done {
            return self.answer(
                key,
                Status::BadRequest,
                "request header not received in time",
            );
        }
        if x.response_started {
            return;
        }
        self.cancel_up(key, StreamCode::DeadlineExceeded);
        self.answer(
            key,
            Status::DeadlineExceeded,
            "deadline passed before the answer began",
        );
    }

    /// The target side failed (reset, vanished): tell the caller.
    fn target_failed(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        x.up_recv_closed = true;
        x.req.queue.clear();
        let started = x.response_started;
        // Stop sending to the target too.
        self.cancel_up(key, StreamCode::Cancelled);
        if started {
            self.close_down_send(key, StreamCode::TargetFailed);
        } else {
            self.answer(key, Status::TargetFailed, "target failed before answering");
        }
    }

    /// Abandons the target leg.
    fn cancel_up(&mut self, key: ExKey, code: StreamCode) {
        let Some(x) = self.ex(key) else {
            return;
        };
        let up = x.up;
        let send_open = !x.up_send_closed;
        let recv_open = !x.up_recv_closed;
        x.up_send_closed = true;
        x.up_recv_closed = true;
        x.req.queue.clear();
        match up {
            Some(Leg::Local { conn, stream }) => {
                if let Some(c) = self.conns.get_mut(conn).and_then(Option::as_mut) {
                    if send_open {
                        let _ = c.quic.send_stream(stream).reset(code.into_varint());
                    }
                    if recv_open {
                        let _ = c.quic.recv_stream(stream).stop(code.into_varint());
                    }
                    mark_dirty(&mut self.dirty, c, conn);
                }
            }
            Some(Leg::Remote { worker, id }) if send_open || recv_open => {
                self.post(
                    worker,
                    WorkerMsg::Handoff {
                        id,
                        to_home: true,
                        event: HandoffEvent::Cancel(code),
                    },
                );
            }
            Some(Leg::Remote { .. }) | None => {}
        }
        self.pumps.push_back(key);
    }

    /// Ends the caller leg abruptly (after the response began, no status can be sent).
    fn close_down_send(&mut self, key: ExKey, code: StreamCode) {
        let Some(x) = self.ex(key) else {
            return;
        };
        let down = x.down;
        let send_open = !x.down_send_closed;
        let recv_open = !x.down_recv_closed;
        x.down_send_closed = true;
        x.down_recv_closed = true;
        x.resp.queue.clear();
        match down {
            Leg::Local { conn, stream } => {
                if let Some(c) = self.conns.get_mut(conn).and_then(Option::as_mut) {
                    if send_open {
                        let _ = c.quic.send_stream(stream).reset(code.into_varint());
                    }
                    if recv_open {
                        let _ = c.quic.recv_stream(stream).stop(code.into_varint());
                    }
                    mark_dirty(&mut self.dirty, c, conn);
                }
            }
            Leg::Remote { worker, id } => {
                if send_open {
                    self.post(
                        worker,
                        WorkerMsg::Handoff {
                            id,
                            to_home: false,
                            event: HandoffEvent::Cancel(code),
                        },
                    );
                }
            }
        }
        self.pumps.push_back(key);
    }

    fn stream_stopped(&mut self, key: ExKey, ci: ConnIdx, stream: StreamId, code: VarInt) {
        // RFC 9000 3.5: a STOP_SENDING is answered with a RESET_STREAM.
        if let Some(c) = self.conns.get_mut(ci).and_then(Option::as_mut) {
            let _ = c.quic.send_stream(stream).reset(code);
            mark_dirty(&mut self.dirty, c, ci);
        }
        let Some(x) = self.ex(key) else {
            return;
        };
        if x.down == (Leg::Local { conn: ci, stream }) {
            // The caller does not want the answer: abandon everything.
            x.down_send_closed = true;
            self.cancel_up(key, StreamCode::Cancelled);
            self.close_down_send(key, StreamCode::Cancelled);
        } else {
            // The target stopped reading the request (it may answer without reading all of it).
            self.stop_request_body(key);
            self.pumps.push_back(key);
        }
    }

    /// A connection carrying one leg of `key` is gone.
    fn leg_failed(&mut self, key: ExKey, ci: ConnIdx, stream: StreamId) {
        let Some(x) = self.ex(key) else {
            return;
        };
        if x.down == (Leg::Local { conn: ci, stream }) {
            x.down_send_closed = true;
            x.down_recv_closed = true;
            x.resp.queue.clear();
            self.cancel_up(key, StreamCode::Cancelled);
        } else {
            x.up_send_closed = true;
            x.up_recv_closed = true;
            self.target_failed(key);
        }
        self.pumps.push_back(key);
    }

    fn maybe_finish(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        let down_done = x.down_send_closed && x.down_recv_closed;
        let up_done = x.up.is_none() || (x.up_send_closed && x.up_recv_closed);
        if !(down_done && up_done) {
            return;
        }
        let Some(x) = self.exchanges[key.idx as usize].take() else {
            return;
        };
        self.ex_gens[key.idx as usize] = x.gen.wrapping_add(1);
        if let Some(at) = x.deadline {
            self.deadlines.remove(&(at, key.idx, key.gen));
        }
        if let (Some(slot), Some(started)) = (x.metric, x.started) {
            self.metrics.finished(
                slot,
                x.status,
                self.iteration_start.saturating_duration_since(started),
            );
        }
        self.ex_free.push(key.idx);
        for leg in [Some(x.down), x.up].into_iter().flatten() {
            match leg {
                Leg::Local { conn, stream } => {
                    if let Some(c) = self.conns.get_mut(conn).and_then(Option::as_mut) {
                        c.streams.remove(&stream);
                    }
                }
                Leg::Remote { id, .. } => {
                    if id.origin != self.index {
                        self.handoffs_in.remove(&id);
                    }
                }
            }
        }
        if let Some(target) = x.target {
            self.router.finish(target);
            if let Some(session) = self.router.agent(target).map(|a| a.session) {
                self.check_detach(session);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Hand-offs
    // ---------------------------------------------------------------------------------------

    fn on_handoff(&mut self, id: HandoffId, to_home: bool, event: HandoffEvent, _now: Instant) {
        if to_home {
            if let HandoffEvent::Open { session, header } = event {
                return self.handoff_open(id, session, header);
            }
            let Some(&key) = self.handoffs_in.get(&id) else {
                return;
            };
            match event {
                HandoffEvent::Data(b) => {
                    if let Some(x) = self.ex(key) {
                        x.req.queue.push_back(b);
                    }
                }
                HandoffEvent::Fin => {
                    if let Some(x) = self.ex(key) {
                        x.req.fin = true;
                        x.down_recv_closed = true;
                    }
                }
                HandoffEvent::Ack(n) => {
                    if let Some(x) = self.ex(key) {
                        x.resp.unacked = x.resp.unacked.saturating_sub(n);
                    }
                }
                HandoffEvent::Cancel(code) => {
                    if let Some(x) = self.ex(key) {
                        x.down_send_closed = true;
                        x.down_recv_closed = true;
                        x.resp.queue.clear();
                    }
                    self.cancel_up(key, code);
                }
                HandoffEvent::Open { .. } | HandoffEvent::Fail(_) | HandoffEvent::StopRequest => {}
            }
            self.pumps.push_back(key);
        } else {
            let key = id.key;
            let Some(x) = self.ex(key) else {
                return;
            };
            match event {
                HandoffEvent::Data(b) => {
                    note_response(x, &b);
                    x.response_started = true;
                    x.resp.queue.push_back(b);
                }
                HandoffEvent::Fin => {
                    x.resp.fin = true;
                    x.up_recv_closed = true;
                }
                HandoffEvent::Ack(n) => x.req.unacked = x.req.unacked.saturating_sub(n),
                HandoffEvent::Fail(status) => {
                    x.up_send_closed = true;
                    x.up_recv_closed = true;
                    if !x.response_started {
                        let message = match status {
                            Status::Overloaded => "the target has no stream capacity",
                            _ => "the target is no longer reachable",
                        };
                        self.answer(key, status, message);
                    } else {
                        self.close_down_send(key, StreamCode::TargetFailed);
                    }
                }
                HandoffEvent::Cancel(_) => {
                    x.up_send_closed = true;
                    x.up_recv_closed = true;
                    self.target_failed(key);
                }
                HandoffEvent::StopRequest => self.stop_request_body(key),
                HandoffEvent::Open { .. } => {}
            }
            self.pumps.push_back(key);
        }
    }

    /// Home side of a hand-off: open the stream to the agent's primary connection here.
    fn handoff_open(&mut self, id: HandoffId, session: SessionId, header: Bytes) {
        let fail = |w: &mut Self, status| {
            w.post(
                id.origin,
                WorkerMsg::Handoff {
                    id,
                    to_home: false,
                    event: HandoffEvent::Fail(status),
                },
            );
        };
        let Some(idx) = self.router.find(session) else {
            return fail(self, Status::TargetFailed);
        };
        let Some(tci) = self.router.agent(idx).and_then(|a| a.local) else {
            return fail(self, Status::TargetFailed);
        };
        let key = self.new_exchange(Leg::Remote {
            worker: id.origin,
            id,
        });
        if let Some(x) = self.ex(key) {
            x.header_done = true;
            x.target = Some(idx);
        }
        self.router.begin(idx);
        self.handoffs_in.insert(id, key);
        if !self.open_up(key, tci, header) {
            if let Some(x) = self.ex(key) {
                x.down_send_closed = true;
                x.down_recv_closed = true;
            }
            self.maybe_finish(key);
            fail(self, Status::Overloaded);
        }
    }
}

/// Takes the status of the target's answer from its first chunk, when the header is whole in
/// it (it practically always is; otherwise the status is recorded as unknown).
fn note_response(x: &mut Exchange, chunk: &[u8]) {
    if x.response_started || x.status.is_some() {
        return;
    }
    if let Ok(Some((header, _))) =
        ResponseHeader::decode(chunk, dmsc_protocol::limits::MAX_HEADER_BYTES)
    {
        x.status = Some(header.status);
    }
}

/// Feeds one chunk of a request's first bytes to `x`'s header. Returns true once the header is
/// complete (or certainly malformed), with `x.header_raw` holding exactly the header and any
/// payload bytes after it queued for the target. When the header arrives in one chunk (the
/// common case) nothing is copied: the header and the payload are slices of that chunk.
fn split_header(x: &mut Exchange, chunk: Bytes, limit: usize) -> bool {
    let buffered = !x.header_buf.is_empty();
    let view: &[u8] = if buffered {
        x.header_buf.extend_from_slice(&chunk);
        &x.header_buf
    } else {
        &chunk
    };
    match dmsc_protocol::header::header_prefix(view, limit) {
        Ok(Some((block, prefix))) if view.len() >= block + prefix => {
            let total = block + prefix;
            if buffered {
                let all = Bytes::from(std::mem::take(&mut x.header_buf));
                x.header_raw = Some(all.slice(..total));
                if all.len() > total {
                    x.req.queue.push_back(all.slice(total..));
                }
            } else {
                x.header_raw = Some(chunk.slice(..total));
                if chunk.len() > total {
                    x.req.queue.push_back(chunk.slice(total..));
                }
            }
            true
        }
        Ok(_) => {
            if !buffered {
                x.header_buf.extend_from_slice(&chunk);
            }
            false
        }
        Err(_) => {
            // Over the limit or unreadable: let the decoder name the problem.
            x.header_raw = Some(if buffered {
                Bytes::from(std::mem::take(&mut x.header_buf))
            } else {
                chunk
            });
            true
        }
    }
}

fn mark_dirty(dirty: &mut Vec<ConnIdx>, conn: &mut Conn, ci: ConnIdx) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(ci);
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

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn ecn_in(e: quinn_udp::EcnCodepoint) -> quinn_proto::EcnCodepoint {
    match e {
        quinn_udp::EcnCodepoint::Ect0 => quinn_proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => quinn_proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => quinn_proto::EcnCodepoint::Ce,
    }
}

fn ecn_out(e: quinn_proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match e {
        quinn_proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        quinn_proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        quinn_proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
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
