//! Connection timers and request deadlines.
//!
//! Both live in heaps with lazy deletion, since both move far more often than they fire: a
//! connection's timer changes on most transmits, and a request's deadline is usually cancelled
//! by its answer. Moving a timer pushes a new entry and leaves the old one; an entry is ignored
//! when it comes due if it no longer matches (the connection's current timer, or the exchange's
//! current deadline: exchange keys carry a generation, so an entry of an ended exchange never
//! matches its slot's next occupant). A heap is compacted when stale entries outnumber live
//! ones, so it stays within twice the live entries plus a constant.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::{mark_dirty, ConnIdx, Core};
use crate::msg::ExKey;

/// Stale entries tolerated beyond twice the live ones before a heap is compacted.
const SLACK: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Timers {
    conns: BinaryHeap<Reverse<(Instant, ConnIdx)>>,
    deadlines: BinaryHeap<Reverse<(Instant, ExKey)>>,
}

impl Timers {
    /// The earliest time anything is due.
    pub(super) fn next(&self) -> Option<Instant> {
        let conn = self.conns.peek().map(|Reverse(t)| t.0);
        let deadline = self.deadlines.peek().map(|Reverse(t)| t.0);
        match (conn, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Core {
    /// Re-files connection `ci` under its next due time: the earliest of its QUIC timer, its
    /// attach deadline and the moment it would count as unresponsive.
    pub(super) fn update_conn_timer(&mut self, ci: ConnIdx) {
        let peer_timeout = self.shared.config.limits.peer_timeout_ms;
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let next = [
            conn.quic.poll_timeout(),
            conn.attach_deadline,
            conn.silent_deadline(peer_timeout),
        ]
        .into_iter()
        .flatten()
        .min();
        if next == conn.timer {
            return;
        }
        conn.timer = next;
        let Some(at) = next else {
            return;
        };
        let live = self.conn_count;
        let heap = &mut self.timers.conns;
        heap.push(Reverse((at, ci)));
        if heap.len() > 2 * live + SLACK {
            let conns = &self.conns;
            heap.retain(|Reverse((at, ci))| conns.get(*ci).is_some_and(|c| c.timer == Some(*at)));
        }
    }

    /// Sets (or moves) the deadline of exchange `key`.
    pub(super) fn set_deadline(&mut self, key: ExKey, at: Instant) {
        let Some(x) = self.ex(key) else {
            return;
        };
        x.deadline = Some(at);
        let live = self.exchanges.len();
        let heap = &mut self.timers.deadlines;
        heap.push(Reverse((at, key)));
        if heap.len() > 2 * live + SLACK {
            let exchanges = &self.exchanges;
            heap.retain(|Reverse((at, key))| {
                exchanges.get(*key).is_some_and(|x| x.deadline == Some(*at))
            });
        }
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, ci))) = self.timers.conns.peek() {
            if at > now {
                break;
            }
            self.timers.conns.pop();
            let Some(conn) = self.conns.get_mut(ci).filter(|c| c.timer == Some(at)) else {
                continue;
            };
            conn.timer = None;
            if conn.quic.poll_timeout().is_some_and(|t| t <= now) {
                conn.quic.handle_timeout(now);
            }
            mark_dirty(&mut self.dirty, conn, ci);
            self.conn_deadlines(ci, now);
        }
        while let Some(&Reverse((at, key))) = self.timers.deadlines.peek() {
            if at > now {
                break;
            }
            self.timers.deadlines.pop();
            if self.ex(key).is_some_and(|x| x.deadline == Some(at)) {
                self.deadline_passed(key, now);
            }
        }
    }
}
