//! Graceful shutdown: stop accepting, tell agents to go, let requests in flight finish within
//! the grace period, then close every connection with `SHUTTING_DOWN`.

use std::time::{Duration, Instant};

use tracing::debug;

use dmsc_protocol::control::ControlFrame;
use dmsc_protocol::ConnectionCode;

use super::conn::Role;
use super::Core;

/// How long closes get to reach peers after the last connection was closed.
const CLOSE_LINGER: Duration = Duration::from_millis(250);

impl Core {
    pub(super) fn start_drain(&mut self, now: Instant, grace: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.accepting = false;
        self.drain_deadline = Some(now + grace);
        let grace_ms = grace.as_millis() as u64;
        let primaries: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.role, Role::Primary(_)))
            .map(|(ci, _)| ci)
            .collect();
        for ci in primaries {
            self.write_control(ci, &ControlFrame::Drain { grace_ms });
        }
        debug!(worker = self.index.0, grace_ms, "draining");
    }

    /// Whether the drain is complete: no exchange left (or the grace period over), every
    /// connection closed, and the closes given a moment to reach peers.
    pub(super) fn finished_draining(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        let busy = !self.exchanges.is_empty();
        if busy && now < deadline {
            return false;
        }
        // Close everything that is still open, once.
        let mut open = false;
        for ci in self.conns.indices() {
            let Some(conn) = self.conns.get(ci) else {
                continue;
            };
            open = true;
            if !conn.quic.is_closed() {
                self.close_conn(
                    ci,
                    now,
                    ConnectionCode::ShuttingDown,
                    "gateway shutting down",
                );
            }
        }
        !open || now >= deadline + CLOSE_LINGER
    }
}

impl Core {
    /// When the drain next needs the core: the end of the grace period, then the end of the
    /// linger after it.
    pub(super) fn drain_timer(&self) -> Option<Instant> {
        let deadline = self.drain_deadline?;
        Some(if self.now < deadline {
            deadline
        } else {
            deadline + CLOSE_LINGER
        })
    }
}
