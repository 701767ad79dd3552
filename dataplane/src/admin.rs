//! The admin HTTP endpoint: Prometheus metrics, attached agents, health.
//!
//! A deliberately small HTTP/1.1 server (loopback by default): one request per connection,
//! `GET` only (405 otherwise), request heads of at most 8 KiB that must arrive within 2 seconds,
//! 2-second write timeouts. An accept thread hands each connection to a thread of its own, at
//! most [`MAX_CONNECTIONS`] at once (more are answered 503 and closed), so an idle or slow
//! client never delays another. It never touches the data plane's state directly: it asks each
//! worker for a snapshot through its inbox and merges the answers; scrapes are serialised so
//! that concurrent ones never apply the workers' changes out of order.
//!
//! | path | content |
//! |---|---|
//! | `/metrics` | Prometheus text format (version 0.0.4) |
//! | `/agents` | JSON array of attached agents |
//! | `/healthz` | `ok` while the gateway runs |

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use dmsc_protocol::Status;

use dmsc_identity::{RefusalCounts, SpiffeVerifier};

use crate::core::Shared;
use crate::metrics::{CapabilityMetrics, Known, MetricsChange, WorkerSnapshot, STATUS_SLOTS};
use crate::msg::WorkerMsg;
use crate::stats::StatsSnapshot;
use crate::worker::Mailboxes;

const MAX_HEAD: usize = 8 * 1024;

/// Time a client has to send its whole request head, and the timeout of each write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Admin connections served at once, each on a thread of its own; more are answered 503.
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

/// Serves admin requests on `listener` until the process exits: this thread only accepts, and
/// each connection is handled on a thread of its own (at most [`MAX_CONNECTIONS`] at once).
pub(crate) fn serve(listener: TcpListener, sources: Sources) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            continue;
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            // Never block the accept thread on a client: a fresh socket's send buffer takes
            // this short answer at once, and the socket is closed without reading.
            let _ = stream.set_nonblocking(true);
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                  content-length: 5\r\nconnection: close\r\n\r\nbusy\n",
            );
            continue;
        }
        let slot = OpenSlot(Arc::clone(&open));
        let sources = sources.clone();
        let spawned = std::thread::Builder::new()
            .name("dmsc-admin-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = handle(stream, &sources) {
                    tracing::debug!(error = %e, "admin request failed");
                }
            });
        // On failure the closure, and with it the slot, is dropped.
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "admin endpoint could not start a connection thread");
        }
    }
}

/// One of the [`MAX_CONNECTIONS`], given back when dropped.
struct OpenSlot(Arc<AtomicUsize>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn handle(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let Sources {
        shared,
        mailboxes,
        verifier,
        cache,
        control,
    } = sources;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return respond(
                &mut stream,
                "408 Request Timeout",
                "text/plain",
                "request head too slow\n",
            );
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            );
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let mut body = render_metrics(
                &snapshots(mailboxes, cache),
                &StatsSnapshot::collect(&shared.stats),
                &verifier.refusals(),
            );
            control.render(&mut body);
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body)
        }
        "/agents" => {
            let body = render_agents(&snapshots(mailboxes, cache));
            respond(&mut stream, "200 OK", "application/json", &body)
        }
        "/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
        "/" => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            "dmsc-gateway admin: /metrics /agents /healthz\n",
        ),
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
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
