//! Per-capability request metrics, recorded by each worker into its own histograms and merged
//! only when read.
//!
//! A worker records into plain (non-atomic) counters and HdrHistograms it alone owns, so the
//! request path takes no lock and does no atomic read-modify-write. A reader (the admin
//! endpoint) asks every worker for a report through its inbox, saying which version of each
//! capability's metrics it already holds; the worker, between event-loop iterations, copies out
//! only the capabilities whose metrics changed since, so a scrape costs the workers in
//! proportion to what changed, not to every histogram. The reader keeps the copies and merges
//! them into [`WorkerSnapshot`]s.

use std::time::Duration;

use hdrhistogram::Histogram;

use dmsc_protocol::Status;

use crate::routing::MetricSlot;

/// Slots for status codes 0..=10 plus one for any other code.
pub const STATUS_SLOTS: usize = 12;

/// Metrics of one capability on one worker.
#[derive(Debug, Clone)]
pub struct CapabilityMetrics {
    /// Answers by status (index = code, 11 = unknown codes).
    pub statuses: [u64; STATUS_SLOTS],
    /// From the request header's arrival to the end of the exchange, in microseconds.
    pub duration_us: Histogram<u64>,
    /// Time the request spent inside the gateway before being forwarded (from the receive batch
    /// holding its header to the send of the forwarded header), in microseconds.
    pub residence_us: Histogram<u64>,
}

impl Default for CapabilityMetrics {
    fn default() -> Self {
        Self {
            statuses: [0; STATUS_SLOTS],
            duration_us: new_histogram(),
            residence_us: new_histogram(),
        }
    }
}

impl CapabilityMetrics {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &CapabilityMetrics) {
        for (a, b) in self.statuses.iter_mut().zip(other.statuses) {
            *a += b;
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.duration_us.add(&other.duration_us);
        let _ = self.residence_us.add(&other.residence_us);
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 us .. 1 hour at 2 significant digits: about 2.5 KiB per histogram. The bounds are
    // constants, so construction cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// A worker's metrics, indexed by [`MetricSlot`], each with a version bumped on every record.
#[derive(Debug, Default)]
pub(crate) struct WorkerMetrics {
    slots: Vec<(u64, CapabilityMetrics)>,
    other: (u64, CapabilityMetrics),
}

/// The versions of a worker's metrics a reader already holds: by slot, then `_other`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Known {
    pub(crate) slots: Vec<u64>,
    pub(crate) other: u64,
}

/// The metrics of one capability that changed since the version the reader holds.
#[derive(Debug, Clone)]
pub(crate) struct MetricsChange {
    /// Slot index, or `None` for `_other`.
    pub(crate) slot: Option<usize>,
    pub(crate) name: String,
    pub(crate) version: u64,
    pub(crate) metrics: CapabilityMetrics,
}

/// What a worker answers a snapshot request with.
#[derive(Debug, Clone)]
pub(crate) struct WorkerReport {
    pub(crate) worker: usize,
    pub(crate) generation: u64,
    pub(crate) table: Option<dmsc_protocol::table::Generation>,
    pub(crate) changes: Vec<MetricsChange>,
    pub(crate) agents: Vec<AgentView>,
    pub(crate) trunks: Vec<TrunkView>,
    pub(crate) routes: Option<(u64, u64)>,
    pub(crate) remote_capabilities: usize,
}

impl WorkerMetrics {
    fn slot(&mut self, slot: MetricSlot) -> &mut CapabilityMetrics {
        let entry = if slot == MetricSlot::OTHER {
            &mut self.other
        } else {
            let i = slot.0 as usize;
            if self.slots.len() <= i {
                // Grows once per capability slot, bounded by the router's metric-name limit.
                self.slots.resize_with(i + 1, Default::default);
            }
            &mut self.slots[i]
        };
        entry.0 += 1;
        &mut entry.1
    }

    pub(crate) fn finished(
        &mut self,
        slot: MetricSlot,
        status: Option<Status>,
        duration: Duration,
    ) {
        let m = self.slot(slot);
        let code = status.map_or(STATUS_SLOTS as u64 - 1, Status::code);
        m.statuses[(code as usize).min(STATUS_SLOTS - 1)] += 1;
        m.duration_us
            .saturating_record(duration.as_micros().max(1) as u64);
    }

    pub(crate) fn residence(&mut self, slot: MetricSlot, residence: Duration) {
        self.slot(slot)
            .residence_us
            .saturating_record(residence.as_micros().max(1) as u64);
    }

    /// Copies out, under their capability names (`names` = the router's metric names by
    /// slot), the metrics whose version differs from what the reader holds (`known`).
    pub(crate) fn changes(&self, names: &[Box<str>], known: &Known) -> Vec<MetricsChange> {
        let mut out: Vec<MetricsChange> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, (version, _))| known.slots.get(*i).copied().unwrap_or(0) != *version)
            .filter_map(|(i, (version, m))| {
                Some(MetricsChange {
                    slot: Some(i),
                    name: names.get(i)?.to_string(),
                    version: *version,
                    metrics: m.clone(),
                })
            })
            .collect();
        if self.other.0 != known.other {
            out.push(MetricsChange {
                slot: None,
                name: "_other".to_owned(),
                version: self.other.0,
                metrics: self.other.1.clone(),
            });
        }
        out
    }
}

/// One worker's trunk to a peer gateway, as the admin endpoint shows it.
#[derive(Debug, Clone)]
pub struct TrunkView {
    /// The peer gateway's id.
    pub gateway: String,
    /// The trunk completed its handshake and is usable.
    pub connected: bool,
    /// Requests in flight over it.
    pub outstanding: u32,
    /// Requests forwarded over it since the worker started.
    pub requests: u64,
    /// Of those, ended with a gateway status or a trunk failure.
    pub errors: u64,
}

/// One attached agent, as the admin endpoint shows it.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// Session id.
    pub session: u64,
    /// SPIFFE ID.
    pub identity: String,
    /// The card's name.
    pub name: String,
    /// Capabilities offered (empty while detaching).
    pub capabilities: Vec<String>,
    /// The worker holding the primary connection.
    pub home_worker: usize,
    /// Concurrency limit per worker.
    pub max_concurrent: u32,
    /// Whether the agent is detaching.
    pub detaching: bool,
}

/// What one worker reports when asked.
#[derive(Debug, Clone, Default)]
pub struct WorkerSnapshot {
    /// The worker.
    pub worker: usize,
    /// How many tables this worker has installed since it started.
    pub generation: u64,
    /// The content name (SHA-256) of the installed compiled table; `None` in standalone mode.
    pub table: Option<dmsc_protocol::table::Generation>,
    /// Per-capability metrics.
    pub capabilities: Vec<(String, CapabilityMetrics)>,
    /// Agents whose primary connection is on this worker.
    pub agents: Vec<AgentView>,
    /// This worker's trunks to the other gateways of the domain.
    pub trunks: Vec<TrunkView>,
    /// The domain routes installed (epoch, version), if any.
    pub routes: Option<(u64, u64)>,
    /// Capabilities those routes place behind other gateways.
    pub remote_capabilities: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_merge_and_overflow_goes_to_other() {
        let mut w = WorkerMetrics::default();
        w.finished(MetricSlot(1), Some(Status::Ok), Duration::from_micros(150));
        w.finished(
            MetricSlot(1),
            Some(Status::TargetFailed),
            Duration::from_micros(50),
        );
        w.finished(
            MetricSlot::OTHER,
            Some(Status::Unknown(77)),
            Duration::from_micros(10),
        );
        w.residence(MetricSlot(1), Duration::from_micros(7));
        let names: Vec<Box<str>> = vec!["a".into(), "b".into()];
        let changes = w.changes(&names, &Known::default());
        let snap: Vec<(String, CapabilityMetrics)> = changes
            .iter()
            .map(|c| (c.name.clone(), c.metrics.clone()))
            .collect();
        let b = &snap.iter().find(|(n, _)| n == "b").unwrap().1;
        assert_eq!(b.statuses[0], 1);
        assert_eq!(b.statuses[6], 1);
        assert_eq!(b.duration_us.len(), 2);
        assert_eq!(b.residence_us.len(), 1);
        let other = &snap.iter().find(|(n, _)| n == "_other").unwrap().1;
        assert_eq!(other.statuses[STATUS_SLOTS - 1], 1);
        let mut merged = b.clone();
        merged.merge(b);
        assert_eq!(merged.duration_us.len(), 4);
        assert_eq!(merged.statuses[0], 2);
        // A reader holding these versions gets only what changes afterwards.
        let mut known = Known::default();
        for c in &changes {
            match c.slot {
                Some(i) => {
                    known.slots.resize(i + 1, 0);
                    known.slots[i] = c.version;
                }
                None => known.other = c.version,
            }
        }
        assert!(w.changes(&names, &known).is_empty());
        w.residence(MetricSlot(1), Duration::from_micros(9));
        let again = w.changes(&names, &known);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].name, "b");
    }
}
