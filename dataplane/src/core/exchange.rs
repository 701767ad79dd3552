//! One request relayed between a caller leg and a target leg.
//!
//! An [`Exchange`] has a *down* leg towards the caller and, once routed, an *up* leg towards the
//! target. Each leg is a QUIC stream on this worker or a peer worker (a hand-off), and each has
//! a send half and a receive half that close independently. Bytes move in two flows: the
//! request (read from down, written to up) and the response (read from up, written to down),
//! always as the `Bytes` chunks quinn-proto produced, never copied.
//!
//! ```text
//!  Header ──(header parsed, target selected)──> Routed ──(first response byte)──> Responding
//!    │                                            │                                   │
//!    └── gateway answer (BAD_REQUEST, NO_ROUTE, …)┴── gateway answer (DEADLINE, …)    │
//!                                                                                      │
//!  finished when every half of every leg is closed  <──────────────────────────────────┘
//! ```
//!
//! Each flow is bounded: nothing more is read from a leg while bytes already read wait for the
//! other leg (QUIC flow control pushes back to the sender), and a flow into a hand-off leg has a
//! credit window ([`HANDOFF_WINDOW`]) that the receiving worker acknowledges. Once the response
//! began, an exchange in which no byte moves in either direction for `limits.stall_timeout_ms`
//! is ended on both legs with `STALLED`: a caller that does not read its answer, a target that
//! does not read its request or goes quiet in the middle of its response, holds its stream for
//! that long at most.

use std::time::Instant;

use bytes::Bytes;
use quinn_proto::{Dir, ReadError, StreamId, VarInt, WriteError};
use smallvec::SmallVec;

use dmsc_protocol::header::ResponseHeader;
use dmsc_protocol::{Status, StreamCode};

use super::{after, mark_dirty, ConnIdx, Core, IntoVarInt};
use crate::msg::{ExKey, HandoffEvent, HandoffId, ToHome, ToOrigin, WorkerMsg};
use crate::routing::{AgentIdx, MetricSlot, WorkerId};
use crate::stats::WorkerStats;

/// Bytes one hand-off flow may have in flight between workers before an acknowledgement.
pub(super) const HANDOFF_WINDOW: usize = 512 * 1024;
/// Rounds of read-then-write per pump of one exchange.
const PUMP_ROUNDS: usize = 64;

/// Where one leg of an exchange goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    /// A QUIC stream on a connection of this worker.
    Local { conn: ConnIdx, stream: StreamId },
    /// The exchange's twin on another worker (a hand-off).
    Remote { worker: WorkerId, id: HandoffId },
}

/// Which leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// Towards the caller.
    Down,
    /// Towards the target.
    Up,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Down => Side::Up,
            Side::Up => Side::Down,
        }
    }
}

/// One direction of one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Half {
    Open,
    Closed,
}

/// A leg and the state of its two halves.
#[derive(Debug, Clone, Copy)]
pub(super) struct LegState {
    pub(super) leg: Leg,
    pub(super) send: Half,
    pub(super) recv: Half,
}

impl LegState {
    pub(super) fn new(leg: Leg) -> Self {
        Self {
            leg,
            send: Half::Open,
            recv: Half::Open,
        }
    }

    fn done(&self) -> bool {
        self.send == Half::Closed && self.recv == Half::Closed
    }
}

/// How far the exchange has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for the whole request header.
    Header,
    /// Header handled (forwarded, or answered by the gateway); no response byte yet.
    Routed,
    /// At least one response byte was queued for the caller: no status can be sent any more.
    Responding,
}

/// Bytes in flight from one leg to the other.
#[derive(Debug, Default)]
pub(super) struct Flow {
    /// Bytes read from the source leg and not yet written to the destination.
    queue: SmallVec<[Bytes; 4]>,
    /// The source finished after `queue`.
    fin: bool,
    /// Bytes handed to a remote destination and not yet acknowledged.
    pub(super) unacked: usize,
    /// Bytes written to a local destination that came from a remote source, to acknowledge.
    to_ack: usize,
    /// Bytes queued here that the remote source never sent (the rewritten header on the home
    /// side, a gateway answer on the caller's side): written, but not acknowledged.
    uncounted: usize,
}

impl Flow {
    pub(super) fn clear(&mut self) {
        self.queue.clear();
    }
}

#[derive(Debug)]
pub(crate) struct Exchange {
    pub(super) phase: Phase,
    pub(super) down: LegState,
    pub(super) up: Option<LegState>,
    /// The agent counted in the router's outstanding requests, released at the end.
    pub(super) target: Option<AgentIdx>,
    /// Header bytes gathered while the header spans several chunks (rare).
    header_buf: Vec<u8>,
    /// The complete header, once it has arrived.
    pub(super) header_raw: Option<Bytes>,
    /// Caller -> target.
    pub(super) req: Flow,
    /// Target -> caller.
    pub(super) resp: Flow,
    /// The deadline currently filed for this exchange (header, request, or stall check).
    pub(super) deadline: Option<Instant>,
    /// Stall checks replaced the request deadline (the response began).
    stall_armed: bool,
    /// The exchange waits in the pump queue.
    scheduled: bool,
    /// When bytes last moved in either flow.
    last_progress: Instant,
    /// Metrics slot of the capability, once routed.
    pub(super) metric: Option<MetricSlot>,
    /// When the header arrived.
    pub(super) started: Option<Instant>,
    /// The answer's status, once known.
    status: Option<Status>,
    /// The peer slot of the trunk the request was forwarded over, released at the end.
    pub(super) trunk: Option<usize>,
}

impl Exchange {
    fn leg(&self, side: Side) -> Option<&LegState> {
        match side {
            Side::Down => Some(&self.down),
            Side::Up => self.up.as_ref(),
        }
    }

    fn leg_mut(&mut self, side: Side) -> Option<&mut LegState> {
        match side {
            Side::Down => Some(&mut self.down),
            Side::Up => self.up.as_mut(),
        }
    }

    /// The flow whose destination is `side`.
    pub(super) fn flow_into(&mut self, side: Side) -> &mut Flow {
        match side {
            Side::Down => &mut self.resp,
            Side::Up => &mut self.req,
        }
    }

    /// Closes both halves of the `side` leg; returns which were open.
    pub(super) fn close_leg(&mut self, side: Side) -> (bool, bool) {
        match self.leg_mut(side) {
            Some(l) => {
                let open = (l.send == Half::Open, l.recv == Half::Open);
                l.send = Half::Closed;
                l.recv = Half::Closed;
                open
            }
            None => (false, false),
        }
    }

    /// Bytes arrived from the remote `source` leg (a hand-off twin).
    pub(super) fn take_remote(
        &mut self,
        source: Side,
        chunks: SmallVec<[Bytes; 4]>,
        fin: bool,
        now: Instant,
    ) {
        if self.leg(source).is_none_or(|l| l.recv == Half::Closed) {
            // This side already ended the leg (a deadline answer, a cancel): what the twin
            // sent meanwhile is not wanted.
            return;
        }
        if source == Side::Up && !chunks.is_empty() {
            note_response(self, &chunks[0]);
            self.phase = Phase::Responding;
        }
        if !chunks.is_empty() {
            self.last_progress = now;
        }
        let flow = self.flow_into(source.other());
        flow.queue.extend(chunks);
        if fin {
            flow.fin = true;
            if let Some(l) = self.leg_mut(source) {
                l.recv = Half::Closed;
            }
        }
    }

    /// The remote `dest` leg wrote `n` bytes of what it was handed: bytes are moving.
    pub(super) fn acked(&mut self, dest: Side, n: usize, now: Instant) {
        let flow = self.flow_into(dest);
        flow.unacked = flow.unacked.saturating_sub(n);
        if n > 0 {
            self.last_progress = now;
        }
    }

    /// Whether the `side` leg has been ended on this worker (both halves closed).
    pub(super) fn leg_ended(&self, side: Side) -> bool {
        self.leg(side).is_some_and(LegState::done)
    }

    /// No byte moved in either direction for `stall_ms`.
    fn stalled(&self, now: Instant, stall_ms: u64) -> bool {
        after(self.last_progress, stall_ms) <= now
    }
}

impl Core {
    pub(super) fn new_exchange(&mut self, down: Leg, now: Instant) -> ExKey {
        self.exchanges.insert(Exchange {
            phase: Phase::Header,
            down: LegState::new(down),
            up: None,
            target: None,
            header_buf: Vec::new(),
            header_raw: None,
            req: Flow::default(),
            resp: Flow::default(),
            deadline: None,
            stall_armed: false,
            scheduled: false,
            last_progress: now,
            metric: None,
            started: None,
            status: None,
            trunk: None,
        })
    }

    pub(super) fn ex(&mut self, key: ExKey) -> Option<&mut Exchange> {
        self.exchanges.get_mut(key)
    }

    /// Queues exchange `key` to be pumped, once however many events ask for it.
    pub(super) fn schedule(&mut self, key: ExKey) {
        if let Some(x) = self.exchanges.get_mut(key) {
            if !x.scheduled {
                x.scheduled = true;
                self.pumps.push_back(key);
            }
        }
    }

    pub(super) fn run_pumps(&mut self, now: Instant) {
        while let Some(key) = self.pumps.pop_front() {
            if let Some(x) = self.exchanges.get_mut(key) {
                x.scheduled = false;
            }
            self.pump(key, now);
            self.pumped += 1;
            if self.pumped >= super::PUMP_BUDGET {
                break;
            }
        }
    }

    /// Moves everything that can move in exchange `key`, then frees it if it is complete.
    fn pump(&mut self, key: ExKey, now: Instant) {
        // Alternate reading and writing until nothing moves: a write that empties a queue
        // allows the next read, and QUIC will not signal "readable" again for data that was
        // already there.
        for _ in 0..PUMP_ROUNDS {
            let mut progress = false;
            for source in [Side::Down, Side::Up] {
                let Some(x) = self.ex(key) else {
                    return;
                };
                let dest = source.other();
                let readable = x
                    .leg(source)
                    .is_some_and(|l| l.recv == Half::Open && matches!(l.leg, Leg::Local { .. }));
                let flow = x.flow_into(dest);
                if readable && flow.queue.is_empty() && flow.unacked < HANDOFF_WINDOW {
                    progress |= self.read_leg(key, source, now);
                }
                progress |= self.flush(key, dest, now);
            }
            if !progress {
                break;
            }
        }
        self.maybe_finish(key, now);
    }

    /// Reads what arrived on the `side` leg (a local stream); true if anything happened.
    fn read_leg(&mut self, key: ExKey, side: Side, now: Instant) -> bool {
        let limit = self.shared.config.limits.max_header_bytes;
        let Some(x) = self.exchanges.get_mut(key) else {
            return false;
        };
        let Some(&LegState {
            leg: Leg::Local { conn: ci, stream },
            ..
        }) = x.leg(side)
        else {
            return false;
        };
        let Some(conn) = self.conns.get_mut(ci) else {
            return false;
        };
        let dest_remote = matches!(x.leg(side.other()).map(|l| l.leg), Some(Leg::Remote { .. }));
        // Into a hand-off, read no more than the credit window allows.
        let mut budget = if dest_remote {
            HANDOFF_WINDOW.saturating_sub(x.flow_into(side.other()).unacked)
        } else {
            usize::MAX
        };
        let mut outcome = ReadOutcome::Nothing;
        {
            let mut recv = conn.quic.recv_stream(stream);
            let Ok(mut chunks) = recv.read(true) else {
                if let Some(l) = x.leg_mut(side) {
                    l.recv = Half::Closed;
                }
                return true;
            };
            while budget > 0 {
                match chunks.next(budget) {
                    Ok(Some(chunk)) => {
                        if budget != usize::MAX {
                            budget -= chunk.bytes.len();
                        }
                        x.last_progress = now;
                        outcome = ReadOutcome::Data;
                        match side {
                            Side::Down if x.phase == Phase::Header => {
                                if split_header(x, chunk.bytes, limit) {
                                    outcome = ReadOutcome::Header;
                                    break;
                                }
                            }
                            Side::Down => x.req.queue.push(chunk.bytes),
                            Side::Up => {
                                note_response(x, &chunk.bytes);
                                x.phase = Phase::Responding;
                                x.resp.queue.push(chunk.bytes);
                            }
                        }
                    }
                    Ok(None) => {
                        if let Some(l) = x.leg_mut(side) {
                            l.recv = Half::Closed;
                        }
                        outcome = match side {
                            Side::Down => {
                                x.req.fin = true;
                                if x.phase == Phase::Header {
                                    ReadOutcome::Header
                                } else {
                                    ReadOutcome::Data
                                }
                            }
                            // The target ended its stream without answering.
                            Side::Up if x.phase != Phase::Responding => ReadOutcome::Failed,
                            Side::Up => {
                                x.resp.fin = true;
                                ReadOutcome::Data
                            }
                        };
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Reset(_)) => {
                        if let Some(l) = x.leg_mut(side) {
                            l.recv = Half::Closed;
                        }
                        outcome = ReadOutcome::Failed;
                        break;
                    }
                }
            }
            if chunks.finalize().should_transmit() {
                mark_dirty(&mut self.dirty, conn, ci);
            }
        }
        match (outcome, side) {
            (ReadOutcome::Nothing, _) => false,
            (ReadOutcome::Data, _) => true,
            (ReadOutcome::Header, _) => {
                self.header_arrived(key, now);
                true
            }
            (ReadOutcome::Failed, Side::Down) => {
                // The caller gave up: abandon the target side.
                self.abort(key, Side::Up, StreamCode::Cancelled);
                self.abort(key, Side::Down, StreamCode::Cancelled);
                true
            }
            (ReadOutcome::Failed, Side::Up) => {
                self.target_failed(key);
                true
            }
        }
    }

    /// Opens the target stream on `tci` and queues `header` on it. False if the target's
    /// connection allows no more streams.
    pub(super) fn open_up(&mut self, key: ExKey, tci: ConnIdx, header: Bytes) -> bool {
        let Some(conn) = self.conns.get_mut(tci) else {
            return false;
        };
        if conn.quic.is_closed() {
            return false;
        }
        let Some(stream) = conn.quic.streams().open(Dir::Bi) else {
            return false;
        };
        conn.streams.insert(stream, key);
        mark_dirty(&mut self.dirty, conn, tci);
        let Some(x) = self.ex(key) else {
            return false;
        };
        x.up = Some(LegState::new(Leg::Local { conn: tci, stream }));
        x.req.uncounted += header.len();
        x.req.queue.insert(0, header);
        self.schedule(key);
        true
    }

    /// Writes the bytes queued for the `dest` leg; true if any moved.
    fn flush(&mut self, key: ExKey, dest: Side, now: Instant) -> bool {
        let Some(x) = self.exchanges.get_mut(key) else {
            return false;
        };
        let Some(&LegState { leg, send, .. }) = x.leg(dest) else {
            return false;
        };
        if send == Half::Closed {
            x.flow_into(dest).clear();
            return false;
        }
        let source = x.leg(dest.other()).map(|l| l.leg);
        match leg {
            Leg::Local { conn: ci, stream } => {
                let Some(conn) = self.conns.get_mut(ci) else {
                    return false;
                };
                let flow = x.flow_into(dest);
                let mut wrote = 0;
                let mut send_stream = conn.quic.send_stream(stream);
                while !flow.queue.is_empty() {
                    match send_stream.write_chunks(&mut flow.queue[..]) {
                        Ok(w) => {
                            wrote += w.bytes;
                            // Whole chunks written go; a partly written one was advanced in
                            // place.
                            let mut done = w.chunks;
                            while flow.queue.get(done).is_some_and(Bytes::is_empty) {
                                done += 1;
                            }
                            flow.queue.drain(..done);
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
                let own = wrote.min(flow.uncounted);
                flow.uncounted -= own;
                flow.to_ack += wrote - own;
                let finished = flow.queue.is_empty() && flow.fin;
                if finished {
                    let _ = send_stream.finish();
                }
                let to_ack = std::mem::take(&mut flow.to_ack);
                if wrote > 0 {
                    x.last_progress = now;
                }
                if finished {
                    if let Some(l) = x.leg_mut(dest) {
                        l.send = Half::Closed;
                    }
                }
                if wrote > 0 || finished {
                    mark_dirty(&mut self.dirty, conn, ci);
                }
                if let (Some(Leg::Remote { worker, id }), true) = (source, to_ack > 0) {
                    // The source is a hand-off: give it credit for what was written.
                    let event = match dest {
                        Side::Up => HandoffEvent::ToOrigin(ToOrigin::Ack(to_ack)),
                        Side::Down => HandoffEvent::ToHome(ToHome::Ack(to_ack)),
                    };
                    self.post(worker, WorkerMsg::Handoff { id, event });
                }
                wrote > 0 || finished
            }
            Leg::Remote { worker, id } => {
                let flow = x.flow_into(dest);
                if flow.queue.is_empty() && !flow.fin {
                    return false;
                }
                let chunks = std::mem::take(&mut flow.queue);
                flow.unacked += chunks.iter().map(Bytes::len).sum::<usize>();
                let fin = flow.fin;
                if fin {
                    if let Some(l) = x.leg_mut(dest) {
                        l.send = Half::Closed;
                    }
                }
                x.last_progress = now;
                let event = match dest {
                    Side::Up => HandoffEvent::ToHome(ToHome::Data { chunks, fin }),
                    Side::Down => HandoffEvent::ToOrigin(ToOrigin::Data { chunks, fin }),
                };
                self.post(worker, WorkerMsg::Handoff { id, event });
                true
            }
        }
    }

    /// Answers the caller with a gateway-generated status and no payload.
    pub(super) fn answer(&mut self, key: ExKey, status: Status, message: &str) {
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
        x.phase = Phase::Responding;
        x.resp.queue.clear();
        x.resp.uncounted = out.len();
        x.resp.queue.push(Bytes::from(out));
        x.resp.fin = true;
        self.stop_request_body(key);
        self.schedule(key);
    }

    /// The rest of the caller's request body is not wanted (the answer is already decided, or
    /// the target stopped reading): STOP_SENDING on a local caller stream, or, on the home side
    /// of a hand-off, a request to the origin to do so.
    pub(super) fn stop_request_body(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        if let Some(up) = x.up.as_mut() {
            up.send = Half::Closed;
        }
        x.req.clear();
        if x.down.recv == Half::Closed {
            return;
        }
        x.down.recv = Half::Closed;
        match x.down.leg {
            Leg::Local { conn, stream } => {
                if let Some(c) = self.conns.get_mut(conn) {
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
                    event: HandoffEvent::ToOrigin(ToOrigin::StopRequest),
                },
            ),
        }
    }

    /// The exchange's filed deadline passed: the header timeout, the request deadline, or a
    /// stall check.
    pub(super) fn deadline_passed(&mut self, key: ExKey, now: Instant) {
        let stall_ms = self.shared.config.limits.stall_timeout_ms;
        let Some(x) = self.ex(key) else {
            return;
        };
        x.deadline = None;
        match x.phase {
            Phase::Header => self.answer(
                key,
                Status::BadRequest,
                "request header not received in time",
            ),
            Phase::Routed => {
                self.abort(key, Side::Up, StreamCode::DeadlineExceeded);
                self.answer(
                    key,
                    Status::DeadlineExceeded,
                    "deadline passed before the answer began",
                );
            }
            Phase::Responding if x.stalled(now, stall_ms) => {
                WorkerStats::add(&self.stats.stalled, 1);
                self.abort(key, Side::Up, StreamCode::Stalled);
                self.abort(key, Side::Down, StreamCode::Stalled);
            }
            Phase::Responding => self.arm_stall_check(key, now),
        }
    }

    /// Files the next stall check of a responding exchange.
    fn arm_stall_check(&mut self, key: ExKey, now: Instant) {
        let stall_ms = self.shared.config.limits.stall_timeout_ms;
        let Some(x) = self.ex(key) else {
            return;
        };
        let at = after(x.last_progress, stall_ms).max(after(now, stall_ms / 4));
        self.set_deadline(key, at);
    }

    /// The target side failed (reset, vanished): tell the caller.
    pub(super) fn target_failed(&mut self, key: ExKey) {
        let Some(x) = self.ex(key) else {
            return;
        };
        if let Some(up) = x.up.as_mut() {
            up.recv = Half::Closed;
        }
        x.req.clear();
        let started = x.phase == Phase::Responding;
        // Stop sending to the target too.
        self.abort(key, Side::Up, StreamCode::Cancelled);
        if started {
            self.abort(key, Side::Down, StreamCode::TargetFailed);
        } else {
            self.answer(key, Status::TargetFailed, "target failed before answering");
        }
    }

    /// Ends the `side` leg abruptly: reset what it still sends to, stop what it still reads.
    pub(super) fn abort(&mut self, key: ExKey, side: Side, code: StreamCode) {
        let Some(x) = self.ex(key) else {
            return;
        };
        let Some(leg) = x.leg(side).map(|l| l.leg) else {
            return;
        };
        let (send_open, recv_open) = x.close_leg(side);
        x.flow_into(side).clear();
        match leg {
            Leg::Local { conn, stream } => {
                if let Some(c) = self.conns.get_mut(conn) {
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
                let event = match side {
                    Side::Up if send_open || recv_open => {
                        Some(HandoffEvent::ToHome(ToHome::Cancel(code)))
                    }
                    Side::Down if send_open => {
                        Some(HandoffEvent::ToOrigin(ToOrigin::TargetFailed(code)))
                    }
                    _ => None,
                };
                if let Some(event) = event {
                    self.post(worker, WorkerMsg::Handoff { id, event });
                }
            }
        }
        self.schedule(key);
    }

    pub(super) fn stream_stopped(
        &mut self,
        key: ExKey,
        ci: ConnIdx,
        stream: StreamId,
        code: VarInt,
    ) {
        // RFC 9000 3.5: a STOP_SENDING is answered with a RESET_STREAM.
        if let Some(c) = self.conns.get_mut(ci) {
            let _ = c.quic.send_stream(stream).reset(code);
            mark_dirty(&mut self.dirty, c, ci);
        }
        let Some(x) = self.ex(key) else {
            return;
        };
        if x.down.leg == (Leg::Local { conn: ci, stream }) {
            // The caller does not want the answer: abandon everything.
            x.down.send = Half::Closed;
            self.abort(key, Side::Up, StreamCode::Cancelled);
            self.abort(key, Side::Down, StreamCode::Cancelled);
        } else {
            // The target stopped reading the request (it may answer without reading all of it).
            self.stop_request_body(key);
            self.schedule(key);
        }
    }

    /// A connection carrying one leg of `key` is gone.
    pub(super) fn leg_failed(&mut self, key: ExKey, ci: ConnIdx, stream: StreamId) {
        let Some(x) = self.ex(key) else {
            return;
        };
        if x.down.leg == (Leg::Local { conn: ci, stream }) {
            x.close_leg(Side::Down);
            x.resp.clear();
            self.abort(key, Side::Up, StreamCode::Cancelled);
        } else {
            x.close_leg(Side::Up);
            self.target_failed(key);
        }
        self.schedule(key);
    }

    pub(super) fn maybe_finish(&mut self, key: ExKey, now: Instant) {
        let Some(x) = self.ex(key) else {
            return;
        };
        if !(x.down.done() && x.up.as_ref().is_none_or(LegState::done)) {
            if x.phase == Phase::Responding && !x.stall_armed {
                // Once the answer began the request deadline no longer applies; stalls do.
                x.stall_armed = true;
                self.arm_stall_check(key, now);
            }
            return;
        }
        let Some(x) = self.exchanges.remove(key) else {
            return;
        };
        if let (Some(slot), Some(started)) = (x.metric, x.started) {
            self.metrics
                .finished(slot, x.status, now.saturating_duration_since(started));
        }
        for leg in [Some(x.down), x.up].into_iter().flatten() {
            match leg.leg {
                Leg::Local { conn, stream } => {
                    if let Some(c) = self.conns.get_mut(conn) {
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
        if let Some(peer) = x.trunk.and_then(|slot| self.trunks.peers.get_mut(slot)) {
            peer.outstanding = peer.outstanding.saturating_sub(1);
            if x.status != Some(Status::Ok) {
                peer.errors += 1;
            }
        }
        if let Some(target) = x.target {
            // A stale index (the agent left and another took its slot) releases nothing.
            if let Some(session) = self.router.finish(target) {
                self.check_detach(session);
            }
        }
    }
}

/// What one read of a leg produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadOutcome {
    Nothing,
    Data,
    /// The request header is complete (or certainly malformed, or the stream ended in it).
    Header,
    /// The leg failed (reset, or the target ended its stream without answering).
    Failed,
}

/// Takes the status of the target's answer from its first chunk, when the header is whole in
/// it (it practically always is; otherwise the status is recorded as unknown).
fn note_response(x: &mut Exchange, chunk: &[u8]) {
    if x.phase == Phase::Responding || x.status.is_some() {
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
            let all = if buffered {
                Bytes::from(std::mem::take(&mut x.header_buf))
            } else {
                chunk
            };
            x.header_raw = Some(all.slice(..total));
            if all.len() > total {
                x.req.queue.push(all.slice(total..));
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
