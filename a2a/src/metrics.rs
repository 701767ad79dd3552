//! The front door's Prometheus metrics (prefix `dmsc_a2a_front`), served on its admin listener
//! (`--admin-listen`) at `/metrics`; names and labels in `docs/A2A.md` §1.6.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::method::Dialect;

/// Labels of a request: its dialect, its method (v1.0 name, or `unknown` before it is known)
/// and how it ended (`OK`, `AGENT_ERROR` for an A2A error the agent answered, `STREAM` for a
/// stream that began, or the `ErrorInfo` reason of the front door's own error).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    dialect: &'static str,
    method: &'static str,
    outcome: &'static str,
}

/// Label `dialect`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialectLabel {
    dialect: &'static str,
}

/// Every metric of a front door, registered once.
#[derive(Debug)]
pub struct FrontMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    seconds: Family<DialectLabel, Histogram>,
    pub(crate) streams_open: Gauge,
    pub(crate) connections_open: Gauge,
    pub(crate) connections_refused: Counter,
}

impl Default for FrontMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FrontMetrics {
    /// A fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dmsc_a2a_front");
        let requests = Family::<RequestLabels, Counter>::default();
        // 50 µs to about 26 s.
        let seconds = Family::<DialectLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
        });
        let streams_open = Gauge::default();
        let connections_open = Gauge::default();
        let connections_refused = Counter::default();
        registry.register(
            "requests",
            "A2A requests answered, by dialect, method and outcome",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time from a request's arrival to its answer (for a stream, to the agent's answer head)",
            seconds.clone(),
        );
        registry.register(
            "streams_open",
            "Event streams being relayed",
            streams_open.clone(),
        );
        registry.register(
            "connections_open",
            "HTTP connections open",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "HTTP connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        Self {
            registry,
            requests,
            seconds,
            streams_open,
            connections_open,
            connections_refused,
        }
    }

    /// Counts a request that ended with `outcome` after `elapsed`.
    pub fn answered(
        &self,
        dialect: Option<Dialect>,
        method: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        let dialect = dialect_label(dialect);
        self.requests
            .get_or_create(&RequestLabels {
                dialect,
                method,
                outcome,
            })
            .inc();
        self.seconds
            .get_or_create(&DialectLabel { dialect })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn dialect_label(dialect: Option<Dialect>) -> &'static str {
    match dialect {
        Some(Dialect::JsonRpc1) => "jsonrpc-1.0",
        Some(Dialect::Rest1) => "http+json-1.0",
        Some(Dialect::JsonRpc03) => "jsonrpc-0.3",
        None => "unknown",
    }
}
