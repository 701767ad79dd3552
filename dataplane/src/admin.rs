//! The admin HTTP endpoint: Prometheus metrics, attached agents, health.
//!
//! HTTP/1.1 from hyper, on one thread of its own running a single-threaded tokio runtime, off
//! the worker cores (loopback by default): one request per connection, `GET` only (405
//! otherwise), request heads of at most 8 KiB (431 beyond, hyper's own check) that must arrive
//! within 2 seconds, and at most 10 seconds for a whole exchange. At most [`MAX_CONNECTIONS`]
//! connections are served at once; more are answered 503. An idle or slow client never delays
//! another: connections are tasks, and the work of a scrape runs on a blocking thread. It never
//! touches the data plane's state directly: it asks each worker for a snapshot through its
//! inbox and merges the answers; scrapes are serialised so that concurrent ones never apply the
//! workers' changes out of order.
//!
//! | path | content |
//! |---|---|
//! | `/metrics` | Prometheus metrics, OpenMetrics 1.0 text (encoded by `prometheus-client`) |
//! | `/agents` | JSON array of attached agents |
//! | `/healthz` | `ok` while the gateway runs |

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::bounded;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use dmsc_protocol::Status;

use dmsc_identity::{RefusalCounts, SpiffeVerifier};

use crate::core::Shared;
use crate::metrics::{CapabilityMetrics, Known, MetricsChange, WorkerSnapshot, STATUS_SLOTS};
use crate::msg::WorkerMsg;
use crate::stats::StatsSnapshot;
use crate::worker::Mailboxes;

/// Largest request head accepted, bytes (hyper's smallest read buffer).
const MAX_HEAD: usize = 8 * 1024;

/// Time a client has to send its whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Time a whole exchange may take, head to last byte of the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin connections served at once; more are answered 503.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// What the admin endpoint reads from.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    pub(crate) shared: Arc<Shared>,
    pub(crate) mailboxes: Arc<Mailboxes>,
    pub(crate) verifier: Arc<SpiffeVerifier>,
    pub(crate) cache: Arc<SnapshotCache>,
    pub(crate) control: crate::control::ControlSlot,
}

/// Serves admin requests on `listener` until the process exits. Runs on the calling thread.
pub(crate) fn serve(listener: TcpListener, sources: Sources) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_CONNECTIONS)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint cannot start its runtime");
            return;
        }
    };
    runtime.block_on(accept(listener, Arc::new(sources)));
}

async fn accept(listener: TcpListener, sources: Arc<Sources>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint cannot use its socket");
            return;
        }
    };
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let permit = open.clone().try_acquire_owned().ok();
        let sources = sources.clone();
        tokio::spawn(async move {
            let busy = permit.is_none();
            let service = hyper::service::service_fn(move |request| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(route(request, sources, busy).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false);
            let exchange = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                tracing::debug!(error = %e, "admin exchange timed out");
            }
            drop(permit);
        });
    }
}

async fn route(
    request: Request<hyper::body::Incoming>,
    sources: Arc<Sources>,
    busy: bool,
) -> Response<Full<Bytes>> {
    if busy {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "busy\n".into(),
        );
    }
    if request.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let path = request.uri().path().to_owned();
    let work = move || match path.as_str() {
        "/metrics" => {
            let body = render_metrics(
                &snapshots(&sources.mailboxes, &sources.cache),
                &StatsSnapshot::of_gateway(&sources.shared),
                &sources.verifier.refusals(),
                sources.control.get().map(|s| &**s),
            );
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        "/agents" => (
            StatusCode::OK,
            "application/json",
            render_agents(&snapshots(&sources.mailboxes, &sources.cache)),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/" => (
            StatusCode::OK,
            "text/plain",
            "dmsc-gateway admin: /metrics /agents /healthz\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    // Scrapes wait for every worker's answer: off the runtime's thread.
    match tokio::task::spawn_blocking(work).await {
        Ok((status, content_type, body)) => respond(status, content_type, body),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "scrape failed\n".into(),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// The metrics the readers (admin endpoint, gateway handle) hold of each worker, refreshed with
/// only what changed: a scrape costs the workers in proportion to the capabilities whose
/// metrics moved since the last one. The lock is taken by readers only, never by a worker.
#[derive(Debug, Default)]
pub(crate) struct SnapshotCache {
    workers: Mutex<Vec<CachedWorker>>,
    /// Held for a whole refresh, so that two readers never apply answers out of order.
    refresh: Mutex<()>,
}

#[derive(Debug, Default, Clone)]
struct CachedWorker {
    known: Known,
    slots: Vec<Option<(String, CapabilityMetrics)>>,
    other: Option<CapabilityMetrics>,
}

impl CachedWorker {
    fn apply(&mut self, change: MetricsChange) {
        match change.slot {
            Some(i) => {
                if self.slots.len() <= i {
                    self.slots.resize(i + 1, None);
                    self.known.slots.resize(i + 1, 0);
                }
                self.slots[i] = Some((change.name, change.metrics));
                self.known.slots[i] = change.version;
            }
            None => {
                self.other = Some(change.metrics);
                self.known.other = change.version;
            }
        }
    }

    fn capabilities(&self) -> Vec<(String, CapabilityMetrics)> {
        let mut out: Vec<(String, CapabilityMetrics)> =
            self.slots.iter().flatten().cloned().collect();
        if let Some(other) = &self.other {
            out.push(("_other".to_owned(), other.clone()));
        }
        out
    }
}

/// Asks every worker for what changed; a worker that does not answer within a second is left
/// out (the data plane is never blocked on the admin endpoint).
pub(crate) fn snapshots(mailboxes: &Mailboxes, cache: &SnapshotCache) -> Vec<WorkerSnapshot> {
    let _refresh = cache.refresh.lock().unwrap_or_else(PoisonError::into_inner);
    let workers = mailboxes.senders.len();
    let known: Vec<Known> = {
        let mut cached = cache.workers.lock().unwrap_or_else(PoisonError::into_inner);
        cached.resize_with(workers, CachedWorker::default);
        cached.iter().map(|c| c.known.clone()).collect()
    };
    let (tx, rx) = bounded(workers);
    let mut asked = 0;
    for (w, (sender, known)) in mailboxes.senders.iter().zip(known).enumerate() {
        let msg = WorkerMsg::Snapshot {
            known,
            reply: tx.clone(),
        };
        if sender.send_timeout(msg, Duration::from_millis(200)).is_ok() {
            let _ = mailboxes.wakers[w].wake();
            asked += 1;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut reports = Vec::with_capacity(asked);
    while reports.len() < asked {
        match rx.recv_deadline(deadline) {
            Ok(r) => reports.push(r),
            Err(_) => break,
        }
    }
    let mut cached = cache.workers.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out: Vec<WorkerSnapshot> = reports
        .into_iter()
        .filter_map(|report| {
            let entry = cached.get_mut(report.worker)?;
            for change in report.changes {
                entry.apply(change);
            }
            Some(WorkerSnapshot {
                worker: report.worker,
                generation: report.generation,
                table: report.table,
                capabilities: entry.capabilities(),
                agents: report.agents,
                trunks: report.trunks,
                routes: report.routes,
                remote_capabilities: report.remote_capabilities,
            })
        })
        .collect();
    out.sort_by_key(|s| s.worker);
    out
}

/// Merges per-worker capability metrics by capability name.
pub(crate) fn merge(snaps: &[WorkerSnapshot]) -> Vec<(String, CapabilityMetrics)> {
    let mut merged: Vec<(String, CapabilityMetrics)> = Vec::new();
    for snap in snaps {
        for (name, m) in &snap.capabilities {
            match merged.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => acc.merge(m),
                None => merged.push((name.clone(), m.clone())),
            }
        }
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    merged
}

fn status_label(slot: usize) -> &'static str {
    Status::ALL.get(slot).map_or("UNKNOWN", |s| s.name())
}

/// Histogram bucket bounds of the latency metrics, seconds.
const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The figures of one scrape, encoded by `prometheus-client` (as a collector: the values are
/// read from the workers at scrape time, not kept in the library's metric types).
#[derive(Debug)]
struct Scrape {
    snaps: Vec<WorkerSnapshot>,
    stats: StatsSnapshot,
    refusals: RefusalCounts,
    control: Option<crate::control::ControlFigures>,
}

/// The Prometheus text of the gateway's metrics (OpenMetrics 1.0 text, as
/// `prometheus-client` writes it).
pub(crate) fn render_metrics(
    snaps: &[WorkerSnapshot],
    stats: &StatsSnapshot,
    refusals: &RefusalCounts,
    control: Option<&crate::control::ControlState>,
) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape {
        snaps: snaps.to_vec(),
        stats: stats.clone(),
        refusals: *refusals,
        control: control.map(crate::control::ControlState::figures),
    }));
    let mut out = String::with_capacity(8192);
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let stats = &self.stats;
        // Counters are named without `_total`: the encoder appends it.
        let mut m = e.encode_descriptor(
            "dmsc_requests",
            "Requests received from callers, by worker.",
            None,
            MetricType::Counter,
        )?;
        for (w, n) in stats.per_worker_requests.iter().enumerate() {
            let worker = w.to_string();
            counter(m.encode_family(&[("worker", worker.as_str())])?, *n)?;
        }
        let mut m = e.encode_descriptor(
            "dmsc_gateway_answers",
            "Answers the gateway generated itself, by status.",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in stats.answered.iter().enumerate() {
            counter(m.encode_family(&[("status", status_label(code))])?, *n)?;
        }
        for (name, help, value) in [
            (
                "dmsc_forwarded_local",
                "Requests forwarded on the core they arrived on.",
                stats.forwarded_local,
            ),
            (
                "dmsc_handoffs",
                "Requests handed to another worker (cross-core).",
                stats.handoffs,
            ),
            (
                "dmsc_trunk_forwarded",
                "Requests forwarded over a trunk to another gateway.",
                stats.forwarded_trunk,
            ),
            (
                "dmsc_trunk_requests_received",
                "Requests received over trunks from other gateways.",
                stats.trunk_requests_in,
            ),
            (
                "dmsc_trunk_handshakes_refused",
                "Trunk handshakes refused (not a gateway of the table, or wrong protocol).",
                stats.trunks_refused,
            ),
            (
                "dmsc_send_drops",
                "Datagrams dropped on full socket buffers.",
                stats.send_drops,
            ),
            (
                "dmsc_datagrams_received",
                "UDP datagrams received.",
                stats.datagrams_received,
            ),
            (
                "dmsc_datagrams_sent",
                "UDP datagrams (or GSO batches) sent.",
                stats.datagrams_sent,
            ),
            (
                "dmsc_ack_only_sent",
                "Datagrams sent that carried only a QUIC acknowledgement.",
                stats.ack_only_sent,
            ),
            (
                "dmsc_wakeups",
                "Event-loop wake-ups of the workers.",
                stats.wakeups,
            ),
            (
                "dmsc_retries",
                "QUIC Retry packets sent to unvalidated addresses.",
                stats.retries,
            ),
            (
                "dmsc_handshakes_refused",
                "Handshakes refused by QUIC.",
                stats.handshakes_refused,
            ),
            (
                "dmsc_handshakes_failed",
                "Handshakes that failed (no or a refused certificate, a wrong ALPN, a timeout).",
                stats.handshakes_failed,
            ),
            (
                "dmsc_identity_limit_refusals",
                "Connections closed over max_connections_per_identity.",
                stats.identity_limit_refusals,
            ),
            (
                "dmsc_unresponsive_peers",
                "Connections closed because the peer stopped answering.",
                stats.unresponsive_peers,
            ),
            (
                "dmsc_stalled_exchanges",
                "Requests ended because a leg refused their bytes too long.",
                stats.stalled,
            ),
        ] {
            counter(
                e.encode_descriptor(name, help, None, MetricType::Counter)?,
                value,
            )?;
        }
        for (name, help, value) in [
            ("dmsc_attached_agents", "Agents attached.", stats.agents),
            (
                "dmsc_connections",
                "Open QUIC connections.",
                stats.connections,
            ),
            ("dmsc_lanes", "Lane connections bound.", stats.lanes),
            (
                "dmsc_trunks_in",
                "Trunks other gateways hold open to this gateway.",
                stats.trunks_in,
            ),
        ] {
            gauge(
                e.encode_descriptor(name, help, None, MetricType::Gauge)?,
                value,
            )?;
        }
        let mut m = e.encode_descriptor(
            "dmsc_certificate_refusals",
            "Client certificates refused at the handshake, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in self.refusals.iter() {
            counter(m.encode_family(&[("reason", reason.as_str())])?, n)?;
        }
        let mut m = e.encode_descriptor(
            "dmsc_table_generation",
            "Tables installed by each worker since it started (0: the one it started with).",
            None,
            MetricType::Gauge,
        )?;
        for s in &self.snaps {
            let worker = s.worker.to_string();
            gauge(
                m.encode_family(&[("worker", worker.as_str())])?,
                s.generation,
            )?;
        }
        let mut m = e.encode_descriptor(
            "dmsc_table_info",
            "The compiled table each worker holds, by its content name (absent in standalone mode).",
            None,
            MetricType::Gauge,
        )?;
        for s in &self.snaps {
            if let Some(name) = s.table {
                let (worker, generation) = (s.worker.to_string(), name.to_string());
                let labels = [
                    ("worker", worker.as_str()),
                    ("generation", generation.as_str()),
                ];
                gauge(m.encode_family(&labels)?, 1)?;
            }
        }
        if let Some(c) = &self.control {
            gauge(
                e.encode_descriptor(
                    "dmsc_control_connected",
                    "1 while the session with the control plane is up.",
                    None,
                    MetricType::Gauge,
                )?,
                u64::from(c.connected),
            )?;
            counter(
                e.encode_descriptor(
                    "dmsc_control_sessions",
                    "Sessions established with the control plane.",
                    None,
                    MetricType::Counter,
                )?,
                c.sessions,
            )?;
            let mut m = e.encode_descriptor(
                "dmsc_control_answers",
                "Pushes from the control plane answered, by answer (ack, nack).",
                None,
                MetricType::Counter,
            )?;
            counter(m.encode_family(&[("result", "ack")])?, c.acks)?;
            counter(m.encode_family(&[("result", "nack")])?, c.nacks)?;
            for (name, help, value) in [
                (
                    "dmsc_control_reports",
                    "REPORT frames sent to the control plane (attachments).",
                    c.reports,
                ),
                (
                    "dmsc_control_report_rejections",
                    "Reported agents the control plane refused (REPORT_REJECTED).",
                    c.rejected,
                ),
                (
                    "dmsc_control_routes_installed",
                    "Domain routes (ROUTES) installed on every worker.",
                    c.routes,
                ),
                (
                    "dmsc_control_attach_events_dropped",
                    "Attach events dropped because the control client did not keep up.",
                    stats.attach_events_dropped,
                ),
            ] {
                counter(
                    e.encode_descriptor(name, help, None, MetricType::Counter)?,
                    value,
                )?;
            }
        }
        let mut trunks: std::collections::BTreeMap<&str, (u64, u64, u64, u64)> =
            std::collections::BTreeMap::new();
        for snap in &self.snaps {
            for t in &snap.trunks {
                let e = trunks.entry(&t.gateway).or_default();
                e.0 += u64::from(t.connected);
                e.1 += u64::from(t.outstanding);
                e.2 += t.requests;
                e.3 += t.errors;
            }
        }
        if let Some(worker0) = self.snaps.first() {
            gauge(
                e.encode_descriptor(
                    "dmsc_domain_remote_capabilities",
                    "Capabilities the installed domain routes place behind other gateways \
                     (worker 0's view).",
                    None,
                    MetricType::Gauge,
                )?,
                worker0.remote_capabilities as u64,
            )?;
            gauge(
                e.encode_descriptor(
                    "dmsc_domain_routes_version",
                    "Version of the domain routes installed on worker 0 (0: none).",
                    None,
                    MetricType::Gauge,
                )?,
                worker0.routes.map_or(0, |r| r.1),
            )?;
        }
        if !trunks.is_empty() {
            let peers: Vec<String> = trunks.keys().map(|p| escape(p)).collect();
            for (name, help, kind, pick) in [
                (
                    "dmsc_trunk_connected",
                    "Workers with a connected trunk to the peer gateway.",
                    MetricType::Gauge,
                    0usize,
                ),
                (
                    "dmsc_trunk_outstanding",
                    "Requests in flight over trunks to the peer gateway.",
                    MetricType::Gauge,
                    1,
                ),
                (
                    "dmsc_trunk_requests",
                    "Requests forwarded to the peer gateway.",
                    MetricType::Counter,
                    2,
                ),
                (
                    "dmsc_trunk_errors",
                    "Requests to the peer gateway that ended in an error status or a trunk failure.",
                    MetricType::Counter,
                    3,
                ),
            ] {
                let mut m = e.encode_descriptor(name, help, None, kind)?;
                for (peer, v) in peers.iter().zip(trunks.values()) {
                    let value = [v.0, v.1, v.2, v.3][pick];
                    let labels = [("peer", peer.as_str())];
                    if matches!(kind, MetricType::Gauge) {
                        gauge(m.encode_family(&labels)?, value)?;
                    } else {
                        counter(m.encode_family(&labels)?, value)?;
                    }
                }
            }
        }

        let caps = merge(&self.snaps);
        let names: Vec<String> = caps.iter().map(|(name, _)| escape(name)).collect();
        let mut m = e.encode_descriptor(
            "dmsc_responses",
            "Answers to routed requests, by capability and status.",
            None,
            MetricType::Counter,
        )?;
        for ((_, cm), name) in caps.iter().zip(&names) {
            for slot in 0..STATUS_SLOTS {
                if cm.statuses[slot] > 0 {
                    let labels = [
                        ("capability", name.as_str()),
                        ("status", status_label(slot)),
                    ];
                    counter(m.encode_family(&labels)?, cm.statuses[slot])?;
                }
            }
        }
        for (metric, help, pick) in [
            (
                "dmsc_request_duration_seconds",
                "From request header arrival to the end of the exchange, by capability.",
                (|m: &CapabilityMetrics| &m.duration_us)
                    as fn(&CapabilityMetrics) -> &hdrhistogram::Histogram<u64>,
            ),
            (
                "dmsc_residence_seconds",
                "Time a request spends inside the gateway before it is forwarded, by capability.",
                |m: &CapabilityMetrics| &m.residence_us,
            ),
        ] {
            let mut m = e.encode_descriptor(metric, help, None, MetricType::Histogram)?;
            for ((_, cm), name) in caps.iter().zip(&names) {
                let h = pick(cm);
                let buckets = histogram_buckets(h);
                let sum = h.mean() * h.len() as f64 / 1e6;
                m.encode_family(&[("capability", name.as_str())])?
                    .encode_histogram::<NoLabelSet>(sum, h.len(), &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// Per-bucket counts (the encoder accumulates them) of a histogram of microseconds, at
/// [`LATENCY_BUCKETS`] and `+Inf`.
fn histogram_buckets(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
    let mut below = 0u64;
    for bound in LATENCY_BUCKETS {
        let up_to = if h.is_empty() {
            0
        } else {
            h.count_between(0, (bound * 1e6) as u64)
        };
        out.push((bound, up_to.saturating_sub(below)));
        below = up_to.max(below);
    }
    out.push((f64::MAX, h.len().saturating_sub(below)));
    out
}

fn counter(mut m: MetricEncoder<'_>, value: u64) -> std::fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(mut m: MetricEncoder<'_>, value: u64) -> std::fmt::Result {
    m.encode_gauge(&i64::try_from(value).unwrap_or(i64::MAX))
}

pub(crate) fn render_agents(snaps: &[WorkerSnapshot]) -> String {
    let agents: Vec<serde_json::Value> = snaps
        .iter()
        .flat_map(|s| &s.agents)
        .map(|a| {
            serde_json::json!({
                "session": a.session,
                "identity": a.identity,
                "name": a.name,
                "capabilities": a.capabilities,
                "home_worker": a.home_worker,
                "max_concurrent": a.max_concurrent,
                "detaching": a.detaching,
            })
        })
        .collect();
    serde_json::to_string_pretty(&agents).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
