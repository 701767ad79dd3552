//! QUIC connections: accepting, events, removal, per-identity limits and liveness.
//!
//! A connection is closed by the gateway through [`Core::close_conn`], which also ends at once
//! everything that depended on it (its exchanges, its route, its count against the identity's
//! limit): quinn-proto reports no `ConnectionLost` for a close it was asked to make, and the
//! connection lingers for three PTOs while it drains.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use quinn_proto::{ConnectionHandle, Dir, Event, StreamEvent, StreamId};
use tracing::{debug, warn};

use dmsc_protocol::control::{FrameBuffer, SessionId};
use dmsc_protocol::table::GroupSet;
use dmsc_protocol::{ConnectionCode, StreamCode};

use super::exchange::Leg;
use super::ratelimit::Bucket;
use super::FramesSent;
use super::{after, close, mark_dirty, Core, IntoVarInt, Principal};
use crate::msg::{ExKey, WorkerMsg};
use crate::stats::WorkerStats;

/// Names a connection in the core's table: quinn-proto's connection handle. quinn-proto reuses
/// a handle only after the connection was drained and removed, and removal first ends every
/// exchange with a leg on it (`Core::connection_gone`), so no leg outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnIdx(usize);

impl From<ConnectionHandle> for ConnIdx {
    fn from(ch: ConnectionHandle) -> Self {
        ConnIdx(ch.0)
    }
}

impl From<ConnIdx> for ConnectionHandle {
    fn from(ci: ConnIdx) -> Self {
        ConnectionHandle(ci.0)
    }
}

/// The core's connections, by [`ConnIdx`].
#[derive(Default)]
pub(super) struct Conns(Vec<Option<Conn>>);

impl Conns {
    pub(super) fn get(&self, ci: ConnIdx) -> Option<&Conn> {
        self.0.get(ci.0)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, ci: ConnIdx) -> Option<&mut Conn> {
        self.0.get_mut(ci.0)?.as_mut()
    }

    fn insert(&mut self, ci: ConnIdx, conn: Conn) {
        if self.0.len() <= ci.0 {
            self.0.resize_with(ci.0 + 1, || None);
        }
        self.0[ci.0] = Some(conn);
    }

    pub(super) fn take(&mut self, ci: ConnIdx) -> Option<Conn> {
        self.0.get_mut(ci.0)?.take()
    }

    /// Every index that may hold a connection.
    pub(super) fn indices(&self) -> impl Iterator<Item = ConnIdx> {
        (0..self.0.len()).map(ConnIdx)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (ConnIdx, &Conn)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((ConnIdx(i), c.as_ref()?)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (ConnIdx, &mut Conn)> {
        self.0
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| Some((ConnIdx(i), c.as_mut()?)))
    }
}

/// What a connection is to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Handshake done or in progress; no `ATTACH`/`LANE` yet (or no longer anything).
    Pending,
    /// The agent's primary connection.
    Primary(SessionId),
    /// A lane of the session.
    Lane(SessionId),
    /// A trunk another gateway of the domain opened to this worker (`dmsc-peer/1`).
    TrunkIn,
    /// This worker's trunk to the peer gateway in this slot of its trunk table.
    TrunkOut(usize),
}

/// One QUIC connection and the gateway's state for it.
pub(super) struct Conn {
    pub(super) quic: quinn_proto::Connection,
    pub(super) socket: usize,
    /// The verified SPIFFE ID, once the handshake completed.
    pub(super) identity: Option<Arc<str>>,
    /// Whether this connection counts against its identity's connection limit.
    pub(super) counted: bool,
    /// The policy groups of the identity under the installed table (computed at the handshake
    /// and again when a generation is installed, never per request).
    pub(super) groups: GroupSet,
    /// The installed table limits the identity's rate (its bucket is in the core's principals).
    pub(super) rate_limited: bool,
    /// The identity is a bridge under the installed table: it may invoke on behalf of others.
    pub(super) bridge: bool,
    pub(super) role: Role,
    pub(super) control: Option<StreamId>,
    pub(super) ctl_in: FrameBuffer,
    pub(super) ctl_out: Vec<u8>,
    /// The control stream was not read because answers were waiting; read it once they
    /// are out.
    pub(super) control_stalled: bool,
    /// The control stream waits in the core's deferred list (per-iteration budget).
    pub(super) control_deferred: bool,
    pub(super) streams: HashMap<StreamId, ExKey>,
    /// When the connection is filed in the timer set.
    pub(super) timer: Option<Instant>,
    pub(super) attach_deadline: Option<Instant>,
    /// When the peer last sent anything.
    pub(super) last_heard: Instant,
    /// Close with this code once the control stream's last frame is delivered (a refusal).
    pub(super) close_after: Option<(ConnectionCode, &'static str)>,
    /// The agent sent DETACH.
    pub(super) detaching: bool,
    pub(super) dirty: bool,
    /// quinn's count of ACK frames and of every other frame sent, as of this connection's
    /// last transmit: what tells an ACK-only packet from the next transmit's count.
    pub(super) frames_sent: FramesSent,
    pub(super) span: tracing::Span,
}

impl Core {
    pub(super) fn add_conn(
        &mut self,
        ch: ConnectionHandle,
        quic: quinn_proto::Connection,
        socket: usize,
        now: Instant,
    ) {
        let span = debug_span_conn(ch.0, self.index.index(), quic.remote_address());
        let ci = ConnIdx::from(ch);
        let limits = &self.shared.config.limits;
        let conn = Conn {
            quic,
            socket,
            identity: None,
            counted: false,
            groups: GroupSet::EMPTY,
            bridge: false,
            rate_limited: false,
            role: Role::Pending,
            control: None,
            ctl_in: FrameBuffer::new(limits.max_card_bytes + 1024),
            ctl_out: Vec::new(),
            control_stalled: false,
            control_deferred: false,
            streams: HashMap::new(),
            timer: None,
            attach_deadline: Some(after(now, limits.attach_timeout_ms)),
            last_heard: now,
            close_after: None,
            detaching: false,
            dirty: false,
            frames_sent: FramesSent::default(),
            span,
        };
        self.conns.insert(ci, conn);
        self.conn_count += 1;
        WorkerStats::add(&self.stats.connections, 1);
        if let Some(conn) = self.conns.get_mut(ci) {
            mark_dirty(&mut self.dirty, conn, ci);
        }
    }

    /// Closes connection `ci` with `code` and ends at once everything that relied on it.
    pub(super) fn close_conn(
        &mut self,
        ci: ConnIdx,
        now: Instant,
        code: ConnectionCode,
        reason: &'static str,
    ) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        close(conn, now, code, reason);
        mark_dirty(&mut self.dirty, conn, ci);
        self.connection_gone(ci, now);
    }

    pub(super) fn on_event(&mut self, ci: ConnIdx, ev: Event, now: Instant) {
        match ev {
            Event::Connected => self.connected(ci, now),
            Event::HandshakeDataReady | Event::DatagramReceived | Event::DatagramsUnblocked => {}
            Event::ConnectionLost { reason } => {
                if let Some(conn) = self.conns.get(ci) {
                    debug!(parent: &conn.span, %reason, "connection lost");
                    if matches!(conn.role, Role::TrunkOut(_)) {
                        // A trunk attempt to a peer that is down: retried with backoff.
                        debug!(parent: &conn.span, %reason, "trunk lost");
                    } else if conn.identity.is_none() {
                        // The handshake failed: no certificate, a refused one, a wrong ALPN.
                        WorkerStats::add(&self.stats.handshakes_failed, 1);
                        let remote = conn.quic.remote_address();
                        if let Some(suppressed) = self.handshake_log.admit(now) {
                            warn!(%remote, %reason, suppressed, "handshake failed");
                        }
                    }
                }
                self.connection_gone(ci, now);
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => self.accept_streams(ci, now),
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {}
            Event::Stream(StreamEvent::Readable { id } | StreamEvent::Writable { id }) => {
                let Some(conn) = self.conns.get_mut(ci) else {
                    return;
                };
                if conn.control == Some(id) {
                    self.read_control(ci, now);
                } else if let Some(&key) = conn.streams.get(&id) {
                    self.schedule(key);
                }
            }
            Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                let Some(conn) = self.conns.get_mut(ci) else {
                    return;
                };
                if conn.control == Some(id) {
                    self.close_conn(
                        ci,
                        now,
                        ConnectionCode::ProtocolViolation,
                        "control stream stopped",
                    );
                } else if let Some(&key) = conn.streams.get(&id) {
                    self.stream_stopped(key, ci, id, error_code);
                }
            }
            Event::Stream(StreamEvent::Finished { id }) => {
                let Some(conn) = self.conns.get_mut(ci) else {
                    return;
                };
                if conn.control == Some(id) {
                    if let Some((code, reason)) = conn.close_after {
                        self.close_conn(ci, now, code, reason);
                    }
                }
            }
            Event::Stream(StreamEvent::Available { .. }) => {}
        }
    }

    fn connected(&mut self, ci: ConnIdx, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        if let Role::TrunkOut(slot) = conn.role {
            return self.trunk_connected(ci, slot, now);
        }
        let Some(id) = crate::tls::peer_spiffe_id(&conn.quic) else {
            // The verifier accepted the certificate, so this cannot happen; refuse anyway.
            return self.close_conn(ci, now, ConnectionCode::Unauthenticated, "no identity");
        };
        // On a trunk socket the verifier admitted only gateways of the domain (dmsc-peer/1);
        // only those the installed table lists may forward requests.
        if self.trunk_socket == Some(conn.socket) {
            let gateway = match dmsc_protocol::spiffe::SpiffeId::parse(&id) {
                Ok(sid) => match sid.principal() {
                    dmsc_protocol::spiffe::Principal::Gateway(g) => Some(g.to_string()),
                    _ => None,
                },
                Err(_) => None,
            };
            let listed = gateway
                .as_deref()
                .is_some_and(|g| self.is_domain_gateway(g));
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            if !listed {
                debug!(parent: &conn.span, identity = %id, "trunk from a gateway not in the table");
                WorkerStats::add(&self.stats.trunks_refused, 1);
                return self.close_conn(
                    ci,
                    now,
                    ConnectionCode::Unauthenticated,
                    "not a gateway of this domain's table",
                );
            }
            conn.role = Role::TrunkIn;
            conn.attach_deadline = None;
            // A trunk carries the requests of a whole peer worker, not of one agent.
            conn.quic.set_max_concurrent_streams(
                Dir::Bi,
                quinn_proto::VarInt::from_u32(super::trunk::TRUNK_MAX_STREAMS),
            );
            debug!(parent: &conn.span, identity = %id, "trunk accepted");
            WorkerStats::add(&self.stats.trunks_in, 1);
        }
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let id: Arc<str> = id.into();
        let table = self.router.table();
        let groups = table.groups_of(&id);
        let workers = self.shared.workers();
        let principal = self
            .per_identity
            .entry(id.clone())
            .or_insert_with(|| Principal {
                conns: 0,
                bucket: table
                    .rate_limit_of(&groups)
                    .map(|limit| Bucket::new(limit, workers, now)),
            });
        principal.conns += 1;
        conn.counted = true;
        conn.rate_limited = principal.bucket.is_some();
        let over = principal.conns > self.shared.config.limits.max_connections_per_identity;
        debug!(parent: &conn.span, identity = %id, "handshake complete");
        conn.bridge = table.is_bridge(&groups);
        conn.groups = groups;
        conn.identity = Some(id);
        if over {
            debug!(parent: &conn.span, "too many connections for one identity");
            WorkerStats::add(&self.stats.identity_limit_refusals, 1);
            self.close_conn(
                ci,
                now,
                ConnectionCode::LimitExceeded,
                "too many connections",
            );
        }
    }

    fn accept_streams(&mut self, ci: ConnIdx, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            let Some(id) = conn.quic.streams().accept(Dir::Bi) else {
                return;
            };
            if matches!(conn.role, Role::TrunkOut(_)) {
                // Only this side opens streams on its own trunk.
                let code = StreamCode::ProtocolViolation.into_varint();
                let _ = conn.quic.recv_stream(id).stop(code);
                let _ = conn.quic.send_stream(id).reset(code);
                continue;
            }
            if conn.control.is_none() && conn.role == Role::Pending {
                conn.control = Some(id);
                self.read_control(ci, now);
                continue;
            }
            if conn.role == Role::Pending {
                // Invocations before ATTACH/LANE completes are refused.
                let code = StreamCode::ProtocolViolation.into_varint();
                let _ = conn.quic.recv_stream(id).stop(code);
                let _ = conn.quic.send_stream(id).reset(code);
                continue;
            }
            let key = self.new_exchange(
                Leg::Local {
                    conn: ci,
                    stream: id,
                },
                now,
            );
            // The header must arrive within the header timeout; the request's own deadline
            // replaces this once it has.
            let header_by = after(now, self.shared.config.limits.header_timeout_ms);
            self.set_deadline(key, header_by);
            if let Some(conn) = self.conns.get_mut(ci) {
                conn.streams.insert(id, key);
            }
            WorkerStats::add(&self.stats.requests, 1);
            self.schedule(key);
        }
    }

    /// Connection `ci` is closed or lost: fail its exchanges, end its role, release its count.
    /// Idempotent.
    pub(super) fn connection_gone(&mut self, ci: ConnIdx, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let keys: smallvec::SmallVec<[(StreamId, ExKey); 8]> = conn.streams.drain().collect();
        let role = conn.role;
        conn.role = Role::Pending;
        conn.control = None;
        conn.attach_deadline = None;
        conn.ctl_out = Vec::new();
        if std::mem::take(&mut conn.counted) {
            if let Some(id) = conn.identity.as_ref() {
                if let Some(p) = self.per_identity.get_mut(id) {
                    p.conns -= 1;
                    if p.conns == 0 {
                        self.per_identity.remove(id);
                    }
                }
            }
        }
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
                self.shared
                    .report_attach(crate::msg::AttachEvent::Down(session));
                self.agent_down(session, now);
                self.shared.agents.fetch_sub(1, Ordering::Relaxed);
                WorkerStats::sub(&self.stats.agents, 1);
            }
            Role::Lane(session) => {
                let routed_here = self
                    .router
                    .find(session)
                    .and_then(|i| self.router.agent(i)?.local)
                    == Some(ci);
                if routed_here {
                    self.router.set_local(session, None);
                }
                WorkerStats::sub(&self.stats.lanes, 1);
            }
            Role::TrunkOut(slot) => self.trunk_gone(ci, slot, now),
            Role::TrunkIn => WorkerStats::sub(&self.stats.trunks_in, 1),
            Role::Pending => {}
        }
    }

    /// Frees connection `ci` once quinn-proto has drained it.
    pub(super) fn remove_conn(&mut self, ci: ConnIdx, now: Instant) {
        self.connection_gone(ci, now);
        if self.conns.take(ci).is_some() {
            self.conn_count -= 1;
            WorkerStats::sub(&self.stats.connections, 1);
        }
    }

    /// Checks connection `ci`'s gateway-side deadlines at `now`: a refusal's close, the attach
    /// deadline, and the peer timeout of an attached agent's connection.
    pub(super) fn conn_deadlines(&mut self, ci: ConnIdx, now: Instant) {
        let peer_timeout = self.shared.config.limits.peer_timeout_ms;
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let attach_due = conn.attach_deadline.is_some_and(|t| t <= now);
        if let (Some((code, reason)), true) = (conn.close_after, attach_due) {
            conn.attach_deadline = None;
            return self.close_conn(ci, now, code, reason);
        }
        if conn.role == Role::Pending && attach_due {
            conn.attach_deadline = None;
            debug!(parent: &conn.span, "no ATTACH or LANE in time");
            return self.close_conn(ci, now, ConnectionCode::AttachTimeout, "attach timeout");
        }
        if conn.role != Role::Pending && !conn.quic.is_closed() {
            if let Some(silent_since) = conn.silent_deadline(peer_timeout) {
                if silent_since <= now {
                    debug!(parent: &conn.span, "peer unresponsive");
                    WorkerStats::add(&self.stats.unresponsive_peers, 1);
                    self.close_conn(ci, now, ConnectionCode::Unresponsive, "peer unresponsive");
                }
            }
        }
    }
}

impl Conn {
    /// When this connection counts as silent, if the peer timeout is on (`timeout_ms` > 0).
    pub(super) fn silent_deadline(&self, timeout_ms: u64) -> Option<Instant> {
        (timeout_ms > 0 && self.role != Role::Pending).then(|| after(self.last_heard, timeout_ms))
    }
}

fn debug_span_conn(id: usize, worker: usize, remote: std::net::SocketAddr) -> tracing::Span {
    tracing::debug_span!("conn", id, worker, remote = %remote)
}

/// Lets one log line through per interval and counts the ones held back, so that peers cannot
/// flood the log at handshake rate.
#[derive(Debug, Default)]
pub(super) struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Interval between two lines.
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

    /// `Some(lines held back since the last one)` if a line may be logged at `now`.
    pub(super) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < Self::INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Defect 8: peer-triggered log lines are let through once per interval, with a count of
    /// the ones held back.
    #[test]
    fn the_log_limiter_lets_one_line_through_per_interval_and_counts_the_rest() {
        let mut limiter = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.admit(t0), Some(0));
        for i in 1..=100 {
            assert_eq!(limiter.admit(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(limiter.admit(t0 + Duration::from_secs(5)), Some(100));
        assert_eq!(limiter.admit(t0 + Duration::from_secs(6)), None);
        assert_eq!(limiter.admit(t0 + Duration::from_secs(11)), Some(1));
    }
}
