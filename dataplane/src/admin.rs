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
//! | `/metrics` | Prometheus text format (version 0.0.4) |
//! | `/agents` | JSON array of attached agents |
//! | `/healthz` | `ok` while the gateway runs |

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::bounded;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

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
    pub(crate) control: Arc<crate::control::ControlState>,
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
            let mut body = render_metrics(
                &snapshots(&sources.mailboxes, &sources.cache),
                &StatsSnapshot::collect(&sources.shared.stats),
                &sources.verifier.refusals(),
            );
            sources.control.render(&mut body);
            (StatusCode::OK, "text/plain; version=0.0.4", body)
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

pub(crate) fn render_metrics(
    snaps: &[WorkerSnapshot],
    stats: &StatsSnapshot,
    refusals: &RefusalCounts,
) -> String {
    let mut o = String::with_capacity(8192);
    let counter = |o: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    counter(
        &mut o,
        "dmsc_requests_total",
        "Requests received from callers, by worker.",
        "counter",
    );
    for (w, n) in stats.per_worker_requests.iter().enumerate() {
        let _ = writeln!(o, "dmsc_requests_total{{worker=\"{w}\"}} {n}");
    }
    counter(
        &mut o,
        "dmsc_gateway_answers_total",
        "Answers the gateway generated itself, by status.",
        "counter",
    );
    for (code, n) in stats.answered.iter().enumerate() {
        let _ = writeln!(
            o,
            "dmsc_gateway_answers_total{{status=\"{}\"}} {n}",
            status_label(code)
        );
    }
    counter(
        &mut o,
        "dmsc_forwarded_local_total",
        "Requests forwarded on the core they arrived on.",
        "counter",
    );
    let _ = writeln!(o, "dmsc_forwarded_local_total {}", stats.forwarded_local);
    counter(
        &mut o,
        "dmsc_handoffs_total",
        "Requests handed to another worker (cross-core).",
        "counter",
    );
    let _ = writeln!(o, "dmsc_handoffs_total {}", stats.handoffs);
    counter(&mut o, "dmsc_attached_agents", "Agents attached.", "gauge");
    let _ = writeln!(o, "dmsc_attached_agents {}", stats.agents);
    counter(
        &mut o,
        "dmsc_connections",
        "Open QUIC connections.",
        "gauge",
    );
    let _ = writeln!(o, "dmsc_connections {}", stats.connections);
    counter(&mut o, "dmsc_lanes", "Lane connections bound.", "gauge");
    let _ = writeln!(o, "dmsc_lanes {}", stats.lanes);
    counter(
        &mut o,
        "dmsc_send_drops_total",
        "Datagrams dropped on full socket buffers.",
        "counter",
    );
    let _ = writeln!(o, "dmsc_send_drops_total {}", stats.send_drops);
    for (name, help, kind, value) in [
        (
            "dmsc_datagrams_received_total",
            "UDP datagrams received.",
            "counter",
            stats.datagrams_received,
        ),
        (
            "dmsc_datagrams_sent_total",
            "UDP datagrams (or GSO batches) sent.",
            "counter",
            stats.datagrams_sent,
        ),
        (
            "dmsc_wakeups_total",
            "Event-loop wake-ups of the workers.",
            "counter",
            stats.wakeups,
        ),
        (
            "dmsc_retries_total",
            "QUIC Retry packets sent to unvalidated addresses.",
            "counter",
            stats.retries,
        ),
        (
            "dmsc_handshakes_refused_total",
            "Handshakes refused by QUIC.",
            "counter",
            stats.handshakes_refused,
        ),
        (
            "dmsc_handshakes_failed_total",
            "Handshakes that failed (no or a refused certificate, a wrong ALPN, a timeout).",
            "counter",
            stats.handshakes_failed,
        ),
        (
            "dmsc_identity_limit_refusals_total",
            "Connections closed over max_connections_per_identity.",
            "counter",
            stats.identity_limit_refusals,
        ),
        (
            "dmsc_unresponsive_peers_total",
            "Connections closed because the peer stopped answering.",
            "counter",
            stats.unresponsive_peers,
        ),
        (
            "dmsc_stalled_exchanges_total",
            "Requests ended because a leg refused their bytes too long.",
            "counter",
            stats.stalled,
        ),
    ] {
        counter(&mut o, name, help, kind);
        let _ = writeln!(o, "{name} {value}");
    }
    counter(
        &mut o,
        "dmsc_certificate_refusals_total",
        "Client certificates refused at the handshake, by reason.",
        "counter",
    );
    for (reason, n) in refusals.iter() {
        let _ = writeln!(
            o,
            "dmsc_certificate_refusals_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    counter(
        &mut o,
        "dmsc_table_generation",
        "Installed table generation, by worker.",
        "gauge",
    );
    for s in snaps {
        let _ = writeln!(
            o,
            "dmsc_table_generation{{worker=\"{}\"}} {}",
            s.worker, s.generation
        );
    }
    counter(
        &mut o,
        "dmsc_table_info",
        "The compiled table each worker holds, by its content name (absent in standalone mode).",
        "gauge",
    );
    for s in snaps {
        if let Some(name) = s.table {
            let _ = writeln!(
                o,
                "dmsc_table_info{{worker=\"{}\",generation=\"{name}\"}} 1",
                s.worker
            );
        }
    }

    let caps = merge(snaps);
    counter(
        &mut o,
        "dmsc_responses_total",
        "Answers to routed requests, by capability and status.",
        "counter",
    );
    for (name, m) in &caps {
        for slot in 0..STATUS_SLOTS {
            if m.statuses[slot] > 0 {
                let _ = writeln!(
                    o,
                    "dmsc_responses_total{{capability=\"{}\",status=\"{}\"}} {}",
                    escape(name),
                    status_label(slot),
                    m.statuses[slot]
                );
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
        counter(&mut o, metric, help, "summary");
        for (name, m) in &caps {
            let h = pick(m);
            let name = escape(name);
            for q in [0.5, 0.9, 0.99, 0.999] {
                let v = if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(q) as f64 / 1e6
                };
                let _ = writeln!(o, "{metric}{{capability=\"{name}\",quantile=\"{q}\"}} {v}");
            }
            let sum = h.mean() * h.len() as f64 / 1e6;
            let _ = writeln!(o, "{metric}_sum{{capability=\"{name}\"}} {sum}");
            let _ = writeln!(o, "{metric}_count{{capability=\"{name}\"}} {}", h.len());
        }
    }
    o
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
