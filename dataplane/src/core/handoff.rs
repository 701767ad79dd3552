//! Hand-offs: the legs of an exchange that cross to another worker.
//!
//! When the worker a request arrived on (its *origin*) reaches the target only through the
//! target's home worker, the exchange is split in two twins joined by messages: the origin's
//! up leg and the home's down leg are both [`Leg::Remote`](super::exchange::Leg). Each flow
//! across has a credit window: the sender reads no more than
//! [`HANDOFF_WINDOW`](super::exchange::HANDOFF_WINDOW) bytes ahead of the acknowledgements the
//! receiver sends as it writes them to its QUIC stream, and a run of chunks read together
//! travels as one message.

use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use dmsc_protocol::control::SessionId;
use dmsc_protocol::Status;

use super::exchange::{Half, Leg, Phase, Side};
use super::Core;
use crate::msg::{HandoffEvent, HandoffId, ToHome, ToOrigin, WorkerMsg};

impl Core {
    pub(super) fn on_handoff(&mut self, id: HandoffId, event: HandoffEvent, now: Instant) {
        match event {
            HandoffEvent::ToHome(ToHome::Open { session, header }) => {
                self.handoff_open(id, session, header, now)
            }
            HandoffEvent::ToHome(event) => {
                let Some(&key) = self.handoffs_in.get(&id) else {
                    return;
                };
                let Some(x) = self.ex(key) else {
                    return;
                };
                match event {
                    ToHome::Data { chunks, fin } => x.take_remote(Side::Down, chunks, fin, now),
                    ToHome::Ack(n) => x.acked(Side::Down, n, now),
                    ToHome::Cancel(code) => {
                        x.close_leg(Side::Down);
                        x.flow_into(Side::Down).clear();
                        self.abort(key, Side::Up, code);
                    }
                    ToHome::Open { .. } => {}
                }
                self.schedule(key);
            }
            HandoffEvent::ToOrigin(event) => {
                let key = id.key;
                let Some(x) = self.ex(key) else {
                    return;
                };
                match event {
                    ToOrigin::Data { chunks, fin } => x.take_remote(Side::Up, chunks, fin, now),
                    ToOrigin::Ack(n) => x.acked(Side::Up, n, now),
                    // This side already ended the target leg (its deadline answer, a cancel):
                    // the home's news of the target comes too late to matter.
                    ToOrigin::Fail(_) | ToOrigin::TargetFailed(_) if x.leg_ended(Side::Up) => {}
                    ToOrigin::Fail(status) => {
                        x.close_leg(Side::Up);
                        if x.phase != Phase::Responding {
                            let message = match status {
                                Status::Overloaded => "the target has no stream capacity",
                                _ => "the target is no longer reachable",
                            };
                            self.answer(key, status, message);
                        } else {
                            self.abort(key, Side::Down, dmsc_protocol::StreamCode::TargetFailed);
                        }
                    }
                    ToOrigin::TargetFailed(code) => {
                        x.close_leg(Side::Up);
                        if x.phase == Phase::Responding {
                            self.abort(key, Side::Down, code);
                        } else {
                            self.target_failed(key);
                        }
                    }
                    ToOrigin::StopRequest => self.stop_request_body(key),
                }
                self.schedule(key);
            }
        }
    }

    /// Home side of a hand-off: open the stream to the agent over its connection here.
    fn handoff_open(&mut self, id: HandoffId, session: SessionId, header: Bytes, now: Instant) {
        let fail = |core: &mut Self, status| {
            let event = HandoffEvent::ToOrigin(ToOrigin::Fail(status));
            core.post(id.origin, WorkerMsg::Handoff { id, event });
        };
        let Some(idx) = self.router.find(session) else {
            return fail(self, Status::TargetFailed);
        };
        let Some(tci) = self.router.agent(idx).and_then(|a| a.local) else {
            return fail(self, Status::TargetFailed);
        };
        // Counted even at the agent's limit (the origin applied its own, PROTOCOL.md 6.2);
        // refused only when the agent is detaching here.
        if !self.router.begin(idx) {
            return fail(self, Status::TargetFailed);
        }
        let key = self.new_exchange(
            Leg::Remote {
                worker: id.origin,
                id,
            },
            now,
        );
        if let Some(x) = self.ex(key) {
            x.phase = Phase::Routed;
            x.target = Some(idx);
        }
        self.handoffs_in.insert(id, key);
        if !self.open_up(key, tci, header) {
            if let Some(x) = self.ex(key) {
                x.down.send = Half::Closed;
                x.down.recv = Half::Closed;
            }
            self.maybe_finish(key, now);
            fail(self, Status::Overloaded);
        }
    }
}

/// A run of chunks read together, sent as one hand-off message.
pub(crate) type Chunks = SmallVec<[Bytes; 4]>;
