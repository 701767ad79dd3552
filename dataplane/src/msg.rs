//! Messages between workers.
//!
//! Workers share no mutable state; they exchange these through bounded `crossbeam` channels,
//! each followed by a wake-up of the receiver's `mio::Poll`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{LaneToken, SessionId};
use dmsc_protocol::Status;

use crate::core::Chunks;
use crate::routing::{TableGeneration, WorkerId};

/// What every worker learns of an attached agent.
#[derive(Debug)]
pub(crate) struct AgentInfo {
    pub(crate) session: SessionId,
    /// The worker holding the primary connection.
    pub(crate) home: WorkerId,
    /// The verified SPIFFE ID.
    pub(crate) identity: Arc<str>,
    pub(crate) lane_token: LaneToken,
    /// Concurrency limit per worker.
    pub(crate) limit: u32,
    pub(crate) card: AgentCard,
    pub(crate) capabilities: Arc<[Box<str>]>,
    /// SHA-256 of the card's JSON as the agent sent it, and its size.
    pub(crate) card_digest: [u8; 32],
    pub(crate) card_bytes: u32,
}

impl AgentInfo {
    /// The digest and size of a card's JSON, for [`AgentInfo::card_digest`].
    pub(crate) fn digest(json: &[u8]) -> ([u8; 32], u32) {
        let digest = dmsc_protocol::table::Generation::of(json).0;
        (digest, u32::try_from(json.len()).unwrap_or(u32::MAX))
    }
}

/// What the control client learns of attachments, from each agent's home worker, to report to
/// the control plane (`REPORT`).
#[derive(Debug)]
pub(crate) enum AttachEvent {
    /// The agent attached, or its card or admitted capabilities changed.
    Up(Arc<AgentInfo>),
    /// The agent started to detach or is gone: route nothing new to it.
    Down(SessionId),
}

/// Most attach events waiting for the control client; more are dropped and counted.
pub(crate) const ATTACH_EVENTS: usize = 65_536;

/// Names one handed-off request: the worker it arrived on and its exchange there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct HandoffId {
    pub(crate) origin: WorkerId,
    pub(crate) key: ExKey,
}

/// Names an exchange in a worker's table; a key kept after the exchange ended is stale.
pub(crate) type ExKey = crate::slab::Key<crate::core::Exchange>;

/// One step of a handed-off request, by the direction it travels.
#[derive(Debug)]
pub(crate) enum HandoffEvent {
    /// From the worker the request arrived on to the target's home worker.
    ToHome(ToHome),
    /// From the target's home worker back to the worker the request arrived on.
    ToOrigin(ToOrigin),
}

/// Origin -> home.
#[derive(Debug)]
pub(crate) enum ToHome {
    /// Open a stream to `session` and send `header` (already rewritten).
    Open { session: SessionId, header: Bytes },
    /// Request body bytes read together; `fin`: the body ends after them.
    Data { chunks: Chunks, fin: bool },
    /// The origin wrote this many response bytes to the caller: the home may send more.
    Ack(usize),
    /// The caller side abandoned the request (the code says why: the caller cancelled, or the
    /// deadline passed).
    Cancel(dmsc_protocol::StreamCode),
}

/// Home -> origin.
#[derive(Debug)]
pub(crate) enum ToOrigin {
    /// Response bytes read together; `fin`: the response ends after them.
    Data { chunks: Chunks, fin: bool },
    /// The home wrote this many request bytes to the target: the origin may send more.
    Ack(usize),
    /// The request failed with this status before any response byte.
    Fail(Status),
    /// The target failed after the response began (the caller's stream is reset with the code).
    TargetFailed(dmsc_protocol::StreamCode),
    /// The target stopped reading the request body; stop reading the caller's.
    StopRequest,
}

/// A message to a worker.
#[derive(Debug)]
pub(crate) enum WorkerMsg {
    /// An agent attached (or replaced its card).
    AgentUp(Arc<AgentInfo>),
    /// An agent asked to detach: route nothing new to it; answer `DetachDone` to its home
    /// once nothing is in flight to it here.
    AgentDetaching { session: SessionId },
    /// A worker has nothing in flight to the detaching `session`.
    DetachDone { session: SessionId },
    /// An agent's primary connection is gone.
    AgentDown { session: SessionId },
    /// A step of a handed-off request.
    Handoff { id: HandoffId, event: HandoffEvent },
    /// Install a new table generation between iterations; then send the worker's index on
    /// `done`, if given (the gateway acknowledges a pushed table once every worker has).
    Install {
        table: Arc<TableGeneration>,
        done: Option<crossbeam_channel::Sender<usize>>,
    },
    /// Stop accepting, tell agents to drain, close after `grace`.
    Drain { grace: Duration },
    /// Send an [`AttachEvent::Up`] for every agent whose home is this worker (the control
    /// client's starting point: agents that attached before it read events are not missed).
    ReportAgents,
    /// Install new domain routes between iterations; then send the worker's index on `done`.
    Routes {
        routes: Arc<crate::core::DomainRoutes>,
        done: Option<crossbeam_channel::Sender<usize>>,
    },
    /// Send a copy of the worker's metrics and agents (read between iterations).
    Snapshot {
        /// The metric versions the reader already holds: only changed ones are sent.
        known: crate::metrics::Known,
        reply: crossbeam_channel::Sender<crate::metrics::WorkerReport>,
    },
}
