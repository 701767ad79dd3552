//! Messages waiting for other workers, one queue per destination.
//!
//! A slow worker delays only the messages addressed to it. Each queue has a soft bound (the
//! `limits.handoff_queue` setting): over it, new hand-offs to that worker are refused with
//! `OVERLOADED` ([`Outboxes::has_room`]); messages of hand-offs already under way are bounded by
//! their credit window, and registry broadcasts (attach, detach) are never dropped, since every
//! worker must see every one of them.

use std::collections::VecDeque;

use crate::msg::WorkerMsg;
use crate::routing::WorkerId;

#[derive(Debug)]
pub(super) struct Outboxes {
    queues: Vec<VecDeque<WorkerMsg>>,
    limit: usize,
    /// Messages waiting in all queues.
    waiting: usize,
}

impl Outboxes {
    pub(super) fn new(workers: usize, limit: usize) -> Self {
        Self {
            queues: (0..workers).map(|_| VecDeque::new()).collect(),
            limit,
            waiting: 0,
        }
    }

    pub(super) fn push(&mut self, to: WorkerId, msg: WorkerMsg) {
        if let Some(q) = self.queues.get_mut(to.index()) {
            q.push_back(msg);
            self.waiting += 1;
        }
    }

    pub(super) fn push_front(&mut self, to: WorkerId, msg: WorkerMsg) {
        if let Some(q) = self.queues.get_mut(to.index()) {
            q.push_front(msg);
            self.waiting += 1;
        }
    }

    pub(super) fn pop(&mut self, to: WorkerId) -> Option<WorkerMsg> {
        let msg = self.queues.get_mut(to.index())?.pop_front()?;
        self.waiting -= 1;
        Some(msg)
    }

    /// Whether a new hand-off to `to` may start.
    pub(super) fn has_room(&self, to: WorkerId) -> bool {
        self.queues
            .get(to.index())
            .is_some_and(|q| q.len() < self.limit)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting == 0
    }
}
