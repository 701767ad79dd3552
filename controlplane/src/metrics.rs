//! The control plane's Prometheus metrics, kept and encoded by `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label `kind` (push kind: `snapshot` or `delta`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Kind {
    pub(crate) kind: &'static str,
}
/// Label `reason` (a close or NACK code name, or the limit a reported agent was over).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    pub(crate) reason: &'static str,
}
/// Label `result` (of a reload: `changed`, `unchanged` or `error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Result {
    pub(crate) result: &'static str,
}
/// Label `generation`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GenerationLabel {
    generation: String,
}

/// Every metric, registered once.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) gateways_connected: Gauge,
    pub(crate) gateways_listed: Gauge,
    pub(crate) pushes: Family<Kind, Counter>,
    pub(crate) acks: Counter,
    pub(crate) rejections: Family<Reason, Counter>,
    pub(crate) refused: Family<Reason, Counter>,
    pub(crate) applies: Family<Result, Counter>,
    pub(crate) push_ack_seconds: Histogram,
    pub(crate) compile_seconds: Histogram,
    generation: Family<GenerationLabel, Gauge>,
    pub(crate) reports: Counter,
    pub(crate) report_rejections: Family<Reason, Counter>,
    pub(crate) routes_compiles: Counter,
    pub(crate) routes_pushes: Counter,
    pub(crate) routes_version: Gauge,
    pub(crate) domain_agents: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("dmsc_control");
        let m = Self {
            gateways_connected: Gauge::default(),
            gateways_listed: Gauge::default(),
            pushes: Family::default(),
            acks: Counter::default(),
            rejections: Family::default(),
            refused: Family::default(),
            applies: Family::default(),
            // 0.25 ms to about 8 s.
            push_ack_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            // 1 ms to about 32 s.
            compile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            generation: Family::default(),
            reports: Counter::default(),
            report_rejections: Family::default(),
            routes_compiles: Counter::default(),
            routes_pushes: Counter::default(),
            routes_version: Gauge::default(),
            domain_agents: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "gateways_connected",
            "Gateways with a session up",
            m.gateways_connected.clone(),
        );
        registry.register(
            "gateways_listed",
            "Gateways listed in the configuration",
            m.gateways_listed.clone(),
        );
        registry.register("pushes", "Pushes sent, by kind", m.pushes.clone());
        registry.register("acks", "Pushes acknowledged", m.acks.clone());
        registry.register(
            "rejections",
            "Pushes rejected (NACK), by code",
            m.rejections.clone(),
        );
        registry.register(
            "refused_sessions",
            "Sessions refused or closed by the control plane, by reason",
            m.refused.clone(),
        );
        registry.register(
            "applies",
            "Configuration reloads (apply, SIGHUP), by result",
            m.applies.clone(),
        );
        registry.register(
            "push_to_ack_seconds",
            "Time from sending a push to its acknowledgement (every worker of the gateway holds it)",
            m.push_ack_seconds.clone(),
        );
        registry.register(
            "compile_seconds",
            "Time to read and compile the configuration",
            m.compile_seconds.clone(),
        );
        registry.register(
            "generation",
            "The generation in force (value 1, labelled with its content name)",
            m.generation.clone(),
        );
        registry.register(
            "reports",
            "REPORT frames received from gateways",
            m.reports.clone(),
        );
        registry.register(
            "report_rejections",
            "Reported agents refused with REPORT_REJECTED, by the limit they were over",
            m.report_rejections.clone(),
        );
        registry.register(
            "routes_compiles",
            "Times the domain's routes were compiled (whether or not they changed)",
            m.routes_compiles.clone(),
        );
        registry.register(
            "routes_pushes",
            "ROUTES frames sent, counted per gateway",
            m.routes_pushes.clone(),
        );
        registry.register(
            "routes_version",
            "The version of the current routes (0 before the first)",
            m.routes_version.clone(),
        );
        registry.register(
            "domain_agents",
            "Agents in the current routes, summed over the gateways",
            m.domain_agents.clone(),
        );
        Self { registry, ..m }
    }

    /// Marks `generation` as the one in force.
    pub(crate) fn set_generation(&self, generation: &str) {
        self.generation.clear();
        self.generation
            .get_or_create(&GenerationLabel {
                generation: generation.to_owned(),
            })
            .set(1);
    }

    /// The metrics in the Prometheus text format (OpenMetrics flavour).
    pub(crate) fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
