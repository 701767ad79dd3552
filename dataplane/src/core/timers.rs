//! Connection timers and request deadlines.
//!
//! Connection timers are few and move often (a connection's QUIC timer changes on most
//! transmits), so they live in an ordered set keyed by due time. Request deadlines are many and
//! mostly cancelled (the answer comes first), so they live in a heap with lazy deletion: an
//! entry names its exchange with a generation and is ignored when it fires if the exchange has
//! ended or its deadline changed. The heap is compacted when stale entries outnumber live ones.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Instant;

use super::{mark_dirty, ConnIdx, Core};
use crate::msg::ExKey;

/// Stale deadline entries tolerated beyond twice the live exchanges before compaction.
const DEADLINE_SLACK: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Timers {
    conns: BTreeSet<(Instant, ConnIdx)>,
    deadlines: BinaryHeap<Reverse<(Instant, ExKey)>>,
}

impl Timers {
    /// The earliest time anything is due.
    pub(super) fn next(&self) -> Option<Instant> {
        let conn = self.conns.first().map(|t| t.0);
        let deadline = self.deadlines.peek().map(|Reverse(t)| t.0);
        match (conn, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn remove_conn(&mut self, at: Instant, ci: ConnIdx) {
        self.conns.remove(&(at, ci));
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
        if let Some(old) = conn.timer {
            self.timers.conns.remove(&(old, ci));
        }
        conn.timer = next;
        if let Some(at) = next {
            self.timers.conns.insert((at, ci));
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
        if heap.len() > 2 * live + DEADLINE_SLACK {
            let exchanges = &self.exchanges;
            heap.retain(|Reverse((at, key))| {
                exchanges.get(*key).is_some_and(|x| x.deadline == Some(*at))
            });
        }
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(&(at, ci)) = self.timers.conns.first() {
            if at > now {
                break;
            }
            self.timers.conns.pop_first();
            let Some(conn) = self.conns.get_mut(ci) else {
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
