//! Turning phase results into per-mode statistics, summaries, the printed report and the JSON
//! document.
//!
//! Definitions (also in docs/LOADGEN.md): `requests` counts the requests *started* in the
//! measured windows that completed, successfully or not (each is waited for, up to the
//! timeout); `requests_per_sec` divides them by the measured time; latency percentiles are of
//! successful requests only; CPU per request divides each role's CPU time over the windows
//! (draining included) by `requests`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::caller::{is_transport_error, new_histogram, PhaseResult};
use crate::cli::{Load, Route};
use crate::counters::{Counts, RoleCounts};
use crate::units::{format_duration, thousands};

/// CPU time per role over a window; `None` where unknown (no `/proc`, or a process the
/// loadgen did not start).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoleCpu {
    /// This process: the callers (and the idle main thread).
    pub callers: Option<Duration>,
    /// The gateway process.
    pub gateway: Option<Duration>,
    /// The agents process.
    pub agents: Option<Duration>,
}

/// One interval of the `.hlog`.
#[derive(Debug, Clone)]
pub struct Interval {
    /// When it began (wall clock).
    pub start: SystemTime,
    /// Its length (1 s, or less for the last of a window).
    pub length: Duration,
    /// Latencies of the successful requests started in it (µs).
    pub histogram: Histogram<u64>,
}

/// One measured phase, as the orchestrator collected it.
#[derive(Debug)]
pub struct PhaseMeasurement {
    /// Wall-clock start of the window.
    pub wall_start: SystemTime,
    /// The window: requests were started during this long.
    pub duration: Duration,
    /// From the window's start until the last request completed.
    pub elapsed: Duration,
    /// Each caller thread's result.
    pub results: Vec<PhaseResult>,
    /// CPU per role over `elapsed`.
    pub cpu: RoleCpu,
    /// Datagrams and wake-ups per role over `elapsed` (callers' datagrams from `results`).
    pub counts: RoleCounts,
}

/// Everything measured for one mode, over all its windows.
#[derive(Debug)]
pub struct ModeStats {
    /// The mode.
    pub route: Route,
    /// Latencies of successful requests (µs).
    pub latency: Histogram<u64>,
    /// Per-second histograms, in time order.
    pub intervals: Vec<Interval>,
    /// Open loop: send lateness (µs).
    pub send_lag: Histogram<u64>,
    /// Requests completed (any outcome).
    pub requests: u64,
    /// Failures by name.
    pub errors: BTreeMap<String, u64>,
    /// Sum of the windows.
    pub measured: Duration,
    /// Sum of the windows' elapsed times.
    pub elapsed: Duration,
    /// CPU per role, summed.
    pub cpu: RoleCpu,
    /// CPU of each caller thread, summed.
    pub thread_cpu: Vec<Option<Duration>>,
    /// Datagrams and wake-ups per role, summed.
    pub counts: RoleCounts,
}

impl ModeStats {
    /// Nothing measured yet.
    pub fn new(route: Route) -> Self {
        Self {
            route,
            latency: new_histogram(),
            intervals: Vec::new(),
            send_lag: new_histogram(),
            requests: 0,
            errors: BTreeMap::new(),
            measured: Duration::ZERO,
            elapsed: Duration::ZERO,
            cpu: RoleCpu {
                callers: Some(Duration::ZERO),
                gateway: Some(Duration::ZERO),
                agents: Some(Duration::ZERO),
            },
            thread_cpu: Vec::new(),
            counts: RoleCounts::zero(),
        }
    }

    /// Adds a measured window.
    pub fn add(&mut self, phase: PhaseMeasurement) {
        let seconds = phase.results.iter().map(|r| r.intervals.len()).max();
        for k in 0..seconds.unwrap_or(0) {
            let mut histogram = new_histogram();
            for result in &phase.results {
                if let Some(h) = result.intervals.get(k) {
                    // Same bounds everywhere: addition cannot fail.
                    let _ = histogram.add(h);
                }
            }
            let offset = Duration::from_secs(k as u64);
            let _ = self.latency.add(&histogram);
            self.intervals.push(Interval {
                start: phase.wall_start + offset,
                length: (phase.duration - offset).min(Duration::from_secs(1)),
                histogram,
            });
        }
        if self.thread_cpu.len() < phase.results.len() {
            self.thread_cpu
                .resize(phase.results.len(), Some(Duration::ZERO));
        }
        for (i, result) in phase.results.iter().enumerate() {
            let _ = self.send_lag.add(&result.send_lag);
            self.requests += result.requests;
            for (name, n) in &result.errors {
                *self.errors.entry(name.clone()).or_default() += n;
            }
            self.thread_cpu[i] = add(self.thread_cpu[i], result.cpu);
        }
        self.measured += phase.duration;
        self.elapsed += phase.elapsed;
        self.cpu = RoleCpu {
            callers: add(self.cpu.callers, phase.cpu.callers),
            gateway: add(self.cpu.gateway, phase.cpu.gateway),
            agents: add(self.cpu.agents, phase.cpu.agents),
        };
        self.counts = self.counts.plus(phase.counts);
    }

    /// Failed requests.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn add(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    Some(a? + b?)
}

/// What the reader needs to interpret a summary: the load and the deployment.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The load.
    pub load: Load,
    /// Request payload bytes.
    pub request_bytes: usize,
    /// Response payload bytes.
    pub response_bytes: usize,
    /// Caller threads.
    pub callers: usize,
    /// Connections per caller thread.
    pub connections: usize,
    /// Echo agents started (`None`: an external gateway's agents).
    pub agents: Option<usize>,
    /// Gateway workers (`None`: unknown, or direct only).
    pub gateway_workers: Option<usize>,
    /// Where the loadgen placed its processes: the gateway's busy polling (µs), and the CPUs
    /// of `--gateway-cpu` and `--load-cpu`.
    pub placement: Placement,
    /// Whether the gateway and agents are the loadgen's children (their CPU is known).
    pub self_contained: bool,
    /// The table generation the gateway had acknowledged at the end (pushed by the loadgen's
    /// control plane); `None` without one.
    pub table_generation: Option<String>,
    /// With `--swap-tables-ms`: generations installed and acknowledged during the run, and
    /// swaps that failed.
    pub table_swaps: Option<(u64, u64)>,
    /// How the loadgen's agents serve direct requests: `sdk` (the SDK's handler dispatch, as
    /// through the gateway) or `bare` (the reference path); `None` with an external gateway.
    pub direct_path: Option<&'static str>,
}

/// The figures of one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `gateway` or `direct`.
    pub mode: &'static str,
    /// Requests completed (any outcome).
    pub requests: u64,
    /// Failures by name.
    pub errors: BTreeMap<String, u64>,
    /// `requests` / measured seconds.
    pub requests_per_sec: f64,
    /// Latency percentiles (µs) of successful requests: p50, p90, p99, p99.9, max.
    pub p50_us: u64,
    /// p90.
    pub p90_us: u64,
    /// p99.
    pub p99_us: u64,
    /// p99.9.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
    /// CPU µs per request of each role.
    pub cpu_us_per_request: CpuPerRequest,
    /// Measured time.
    pub duration: Duration,
    /// This process's CPU over the windows, in % of one core.
    pub loadgen_cpu_percent: Option<f64>,
    /// The busiest caller thread's CPU, in % of one core.
    pub busiest_caller_percent: Option<f64>,
    /// Open loop: send lag p50, p99 and max (µs).
    pub send_lag_us: Option<[u64; 3]>,
    /// Per request, of each role: datagrams sent and received, and wake-ups (see
    /// [`crate::counters`]).
    pub per_request: RolePerRequest,
}

/// The settings of a self-contained run that decide where each role's CPU comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// The gateway's `busy_poll_us`.
    pub gateway_busy_poll_us: u64,
    /// `--gateway-cpu`.
    pub gateway_cpu: Option<usize>,
    /// `--load-cpu`.
    pub load_cpu: Option<usize>,
}

/// A role's datagrams and wake-ups per request (`None`: unknown, or not in this mode).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerRequest {
    /// Datagrams sent per request.
    pub sent: Option<f64>,
    /// Datagrams received per request.
    pub received: Option<f64>,
    /// Wake-ups (voluntary context switches) per request.
    pub wakeups: Option<f64>,
    /// Of the datagrams sent, those carrying only an acknowledgement, per request (the
    /// gateway's only).
    pub ack_only: Option<f64>,
}

/// [`PerRequest`] of each role.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RolePerRequest {
    /// The callers.
    pub callers: PerRequest,
    /// The gateway (gateway mode only).
    pub gateway: PerRequest,
    /// The agents.
    pub agents: PerRequest,
}

impl PerRequest {
    fn of(counts: Counts, requests: u64) -> PerRequest {
        let per = |v: Option<u64>| {
            let v = v?;
            (requests > 0).then(|| v as f64 / requests as f64)
        };
        PerRequest {
            sent: per(counts.sent),
            received: per(counts.received),
            wakeups: per(counts.wakeups),
            ack_only: per(counts.ack_only),
        }
    }

    fn json(&self) -> serde_json::Value {
        let r = |v: Option<f64>| v.map(|v| round(v, 3));
        let mut v = json!({"datagrams_sent": r(self.sent), "datagrams_received": r(self.received), "wakeups": r(self.wakeups)});
        if let Some(a) = self.ack_only {
            v["ack_only_sent"] = json!(round(a, 3));
        }
        v
    }

    fn text(&self) -> String {
        let o = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
        let ack_only = self
            .ack_only
            .map_or_else(String::new, |a| format!(" ({a:.2} ack-only)"));
        format!(
            "{} out{ack_only} {} in {} wake",
            o(self.sent),
            o(self.received),
            o(self.wakeups)
        )
    }
}

/// CPU µs per request, by role.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuPerRequest {
    /// The loadgen process.
    pub callers: Option<f64>,
    /// The gateway process (`None` in direct mode).
    pub gateway: Option<f64>,
    /// The agents process.
    pub agents: Option<f64>,
}

impl CpuPerRequest {
    /// Sum of the known roles; `None` if the callers' or agents' share is unknown.
    pub fn total(&self) -> Option<f64> {
        Some(self.callers? + self.agents? + self.gateway.unwrap_or(0.0))
    }
}

impl Summary {
    /// The summary of `stats`.
    pub fn of(stats: &ModeStats, info: &RunInfo) -> Summary {
        let h = &stats.latency;
        let per_request = |cpu: Option<Duration>| {
            let cpu = cpu?;
            (stats.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / stats.requests as f64)
        };
        let elapsed = stats.elapsed.as_secs_f64();
        let percent = |cpu: Option<Duration>| {
            let cpu = cpu?;
            (elapsed > 0.0).then(|| cpu.as_secs_f64() / elapsed * 100.0)
        };
        let gateway = match (stats.route, info.self_contained) {
            (Route::Gateway | Route::TwoGateways, true) => per_request(stats.cpu.gateway),
            _ => None,
        };
        let agents = if info.self_contained {
            per_request(stats.cpu.agents)
        } else {
            None
        };
        Summary {
            mode: stats.route.name(),
            requests: stats.requests,
            errors: stats.errors.clone(),
            requests_per_sec: if stats.measured.is_zero() {
                0.0
            } else {
                stats.requests as f64 / stats.measured.as_secs_f64()
            },
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
            cpu_us_per_request: CpuPerRequest {
                callers: per_request(stats.cpu.callers),
                gateway,
                agents,
            },
            duration: stats.measured,
            loadgen_cpu_percent: percent(stats.cpu.callers),
            busiest_caller_percent: stats
                .thread_cpu
                .iter()
                .map(|&cpu| percent(cpu))
                .collect::<Option<Vec<f64>>>()
                .and_then(|all| all.into_iter().reduce(f64::max)),
            per_request: RolePerRequest {
                callers: PerRequest::of(stats.counts.callers, stats.requests),
                gateway: match (stats.route, info.self_contained) {
                    (Route::Gateway, true) => PerRequest::of(stats.counts.gateway, stats.requests),
                    _ => PerRequest::default(),
                },
                agents: if info.self_contained {
                    PerRequest::of(stats.counts.agents, stats.requests)
                } else {
                    PerRequest::default()
                },
            },
            send_lag_us: matches!(info.load, Load::Open { .. }).then(|| {
                [
                    stats.send_lag.value_at_quantile(0.5),
                    stats.send_lag.value_at_quantile(0.99),
                    stats.send_lag.max(),
                ]
            }),
        }
    }

    /// Failed requests.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The JSON object of docs/LOADGEN.md.
    pub fn to_json(&self, info: &RunInfo) -> Value {
        let (concurrency, rate) = match info.load {
            Load::Closed { concurrency } => (Some(concurrency), None),
            Load::Open { rate } => (None, Some(rate)),
        };
        let transport_errors: u64 = self
            .errors
            .iter()
            .filter(|(name, _)| is_transport_error(name))
            .map(|(_, n)| n)
            .sum();
        json!({
            "mode": self.mode,
            "concurrency": concurrency,
            "rate": rate,
            "requests": self.requests,
            "errors": self.errors,
            "transport_errors": transport_errors,
            "requests_per_sec": round(self.requests_per_sec, 1),
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "mean_us": round(self.mean_us, 1),
            "cpu_us_per_request": {
                "callers": self.cpu_us_per_request.callers.map(|v| round(v, 2)),
                "gateway": self.cpu_us_per_request.gateway.map(|v| round(v, 2)),
                "agents": self.cpu_us_per_request.agents.map(|v| round(v, 2)),
                "total": self.cpu_us_per_request.total().map(|v| round(v, 2)),
            },
            "duration_s": round(self.duration.as_secs_f64(), 3),
            "request_bytes": info.request_bytes,
            "response_bytes": info.response_bytes,
            "loadgen_cpu_percent": self.loadgen_cpu_percent.map(|v| round(v, 1)),
            "busiest_caller_thread_percent": self.busiest_caller_percent.map(|v| round(v, 1)),
            "send_lag_us": self.send_lag_us.map(|[p50, p99, max]| json!({
                "p50": p50, "p99": p99, "max": max,
            })),
            "per_request": {
                "callers": self.per_request.callers.json(),
                "gateway": self.per_request.gateway.json(),
                "agents": self.per_request.agents.json(),
            },
            "callers": info.callers,
            "connections": info.connections,
            "agents": info.agents,
            "gateway_workers": if self.mode != "direct" { info.gateway_workers } else { None },
            "gateway_busy_poll_us": if self.mode != "direct" && info.self_contained { Some(info.placement.gateway_busy_poll_us) } else { None },
            "gateway_cpu": if self.mode != "direct" { info.placement.gateway_cpu } else { None },
            "load_cpu": info.placement.load_cpu,
            "table_generation": if self.mode != "direct" { info.table_generation.clone() } else { None },
            "direct_serving_path": if self.mode == "direct" { info.direct_path } else { None },
            "table_swaps": match info.table_swaps {
                Some((acked, failed)) if self.mode != "direct" => json!({"acked": acked, "failed": failed}),
                _ => serde_json::Value::Null,
            },
        })
    }

    /// The printed report of one mode.
    pub fn text(&self, info: &RunInfo) -> String {
        let mut out = String::new();
        let load = match info.load {
            Load::Closed { concurrency } => format!("closed loop, {concurrency} in flight"),
            Load::Open { rate } => format!("open loop, {rate} requests/s"),
        };
        let _ = writeln!(
            out,
            "== {}: {load}, {} B requests, {} B responses, {} caller threads x {} connections, \
             {} measured",
            self.mode,
            info.request_bytes,
            info.response_bytes,
            info.callers,
            info.connections,
            format_duration(self.duration),
        );
        let _ = writeln!(
            out,
            "requests      {} ({:.1}/s)",
            thousands(self.requests),
            self.requests_per_sec
        );
        let _ = writeln!(out, "errors        {}", errors_text(&self.errors));
        let _ = writeln!(
            out,
            "latency (µs)  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        let _ = writeln!(
            out,
            "              {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us, self.mean_us
        );
        if let Some([p50, p99, max]) = self.send_lag_us {
            let _ = writeln!(
                out,
                "send lag (µs) p50 {p50}, p99 {p99}, max {max} (included in the latencies)"
            );
        }
        if self.mode == "direct" {
            match info.direct_path {
                Some("sdk") => {
                    let _ = writeln!(
                        out,
                        "serving path  the SDK's handler dispatch, as through the gateway"
                    );
                }
                Some(_) => {
                    let _ = writeln!(
                        out,
                        "serving path  the agents' bare reference path (no SDK dispatch)"
                    );
                }
                None => {}
            }
        }
        if self.mode != "direct" {
            if let Some(generation) = &info.table_generation {
                let _ = writeln!(
                    out,
                    "table         generation {generation} (pushed by the control plane)"
                );
            }
            if let Some((acked, failed)) = info.table_swaps {
                let _ = writeln!(
                    out,
                    "table swaps   {acked} generations installed and acknowledged during the run, {failed} failed"
                );
            }
        }
        let cpu = self.cpu_us_per_request;
        let _ = writeln!(
            out,
            "CPU µs/req    callers {}   gateway {}   agents {}   total {}",
            opt(cpu.callers, 1),
            if self.mode == "direct" {
                "-".to_owned()
            } else {
                opt(cpu.gateway, 1)
            },
            opt(cpu.agents, 1),
            opt(cpu.total(), 1)
        );
        let p = &self.per_request;
        let _ = writeln!(
            out,
            "per request   callers {}   gateway {}   agents {}",
            p.callers.text(),
            if self.mode == "direct" {
                "-".to_owned()
            } else {
                p.gateway.text()
            },
            p.agents.text()
        );
        let _ = writeln!(
            out,
            "loadgen CPU   {}% of one core (busiest caller thread {}%)",
            opt(self.loadgen_cpu_percent, 0),
            opt(self.busiest_caller_percent, 0)
        );
        if self.busiest_caller_percent.is_some_and(|p| p > 90.0) {
            let _ = writeln!(
                out,
                "              warning: a caller thread was busy over 90% of the time; the \
                 loadgen may be the bottleneck (try more --callers)"
            );
        }
        out
    }
}

/// Ratios and differences between the gateway and direct summaries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Gateway requests/s over direct.
    pub requests_per_sec: Option<f64>,
    /// Gateway p50 over direct.
    pub p50: Option<f64>,
    /// Gateway p99 over direct.
    pub p99: Option<f64>,
    /// Gateway total CPU per request over direct.
    pub cpu_us_per_request_total: Option<f64>,
    /// Gateway p50 minus direct p50, µs.
    pub added_p50_us: i64,
    /// Gateway p99 minus direct p99, µs.
    pub added_p99_us: i64,
}

impl Comparison {
    /// Compares `gateway` with `direct`.
    pub fn of(gateway: &Summary, direct: &Summary) -> Comparison {
        let ratio = |g: f64, d: f64| (d > 0.0).then(|| g / d);
        Comparison {
            requests_per_sec: ratio(gateway.requests_per_sec, direct.requests_per_sec),
            p50: ratio(gateway.p50_us as f64, direct.p50_us as f64),
            p99: ratio(gateway.p99_us as f64, direct.p99_us as f64),
            cpu_us_per_request_total: match (
                gateway.cpu_us_per_request.total(),
                direct.cpu_us_per_request.total(),
            ) {
                (Some(g), Some(d)) => ratio(g, d),
                _ => None,
            },
            added_p50_us: gateway.p50_us as i64 - direct.p50_us as i64,
            added_p99_us: gateway.p99_us as i64 - direct.p99_us as i64,
        }
    }

    /// The `compare --json` document.
    pub fn to_json(&self, gateway: Value, direct: Value, rounds: u32) -> Value {
        json!({
            "gateway": gateway,
            "direct": direct,
            "rounds": rounds,
            "ratios": self.ratios(),
            "added_latency_us": self.added_latency(),
        })
    }

    /// The ratios and added latency alone, as JSON (the two-gateway comparisons).
    pub fn ratios_json(&self) -> Value {
        let mut ratios = self.ratios();
        ratios["added_latency_us"] = self.added_latency();
        ratios
    }

    fn ratios(&self) -> Value {
        let r = |v: Option<f64>| v.map(|v| round(v, 3));
        json!({
            "requests_per_sec": r(self.requests_per_sec),
            "p50": r(self.p50),
            "p99": r(self.p99),
            "cpu_us_per_request_total": r(self.cpu_us_per_request_total),
        })
    }

    fn added_latency(&self) -> Value {
        json!({"p50": self.added_p50_us, "p99": self.added_p99_us})
    }

    /// The printed comparison table.
    pub fn text(&self, gateway: &Summary, direct: &Summary, rounds: u32) -> String {
        self.text_labeled(("gateway", "direct"), gateway, direct, rounds)
    }

    /// The printed comparison table of `a` (the mode compared) and `b` (the baseline).
    pub fn text_labeled(
        &self,
        (a_name, b_name): (&str, &str),
        gateway: &Summary,
        direct: &Summary,
        rounds: u32,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {a_name} vs {b_name} ({rounds} interleaved round{} each)",
            if rounds == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>12} {:>16}",
            "",
            a_name,
            b_name,
            format!("{a_name}/{b_name}")
        );
        let row = |out: &mut String, name: &str, g: String, d: String, r: Option<f64>| {
            let _ = writeln!(out, "{name:<20} {g:>12} {d:>12} {:>16}", opt(r, 2));
        };
        row(
            &mut out,
            "requests/s",
            format!("{:.0}", gateway.requests_per_sec),
            format!("{:.0}", direct.requests_per_sec),
            self.requests_per_sec,
        );
        row(
            &mut out,
            "p50 (µs)",
            gateway.p50_us.to_string(),
            direct.p50_us.to_string(),
            self.p50,
        );
        row(
            &mut out,
            "p99 (µs)",
            gateway.p99_us.to_string(),
            direct.p99_us.to_string(),
            self.p99,
        );
        row(
            &mut out,
            "CPU µs/request",
            opt(gateway.cpu_us_per_request.total(), 1),
            opt(direct.cpu_us_per_request.total(), 1),
            self.cpu_us_per_request_total,
        );
        let _ = writeln!(
            out,
            "{a_name} adds {} µs at p50 and {} µs at p99",
            self.added_p50_us, self.added_p99_us
        );
        out
    }
}

/// `none`, or the failures by status and then the transport failures.
pub fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.values().all(|&n| n == 0) {
        return "none".to_owned();
    }
    let list = |transport: bool| {
        errors
            .iter()
            .filter(|(name, n)| is_transport_error(name) == transport && **n > 0)
            .map(|(name, n)| format!("{name} {}", thousands(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (statuses, transport) = (list(false), list(true));
    match (statuses.is_empty(), transport.is_empty()) {
        (false, true) => format!("by status: {statuses}"),
        (true, false) => format!("transport: {transport}"),
        _ => format!("by status: {statuses}; transport: {transport}"),
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            load: Load::Closed { concurrency: 64 },
            request_bytes: 100,
            response_bytes: 100,
            callers: 2,
            connections: 4,
            agents: Some(2),
            gateway_workers: Some(2),
            placement: Placement::default(),
            table_generation: None,
            table_swaps: None,
            direct_path: None,
            self_contained: true,
        }
    }

    fn stats(route: Route, latencies: &[u64], errors: &[(&str, u64)]) -> ModeStats {
        let mut s = ModeStats::new(route);
        let mut h = new_histogram();
        for &v in latencies {
            h.record(v).unwrap();
        }
        let result = PhaseResult {
            intervals: vec![h],
            send_lag: new_histogram(),
            requests: latencies.len() as u64 + errors.iter().map(|(_, n)| n).sum::<u64>(),
            errors: errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            cpu: Some(Duration::from_millis(100)),
            datagrams: (0, 0),
        };
        s.add(PhaseMeasurement {
            wall_start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_secs(1),
            elapsed: Duration::from_secs(1),
            results: vec![result],
            cpu: RoleCpu {
                callers: Some(Duration::from_millis(100)),
                gateway: Some(Duration::from_millis(50)),
                agents: Some(Duration::from_millis(25)),
            },
            counts: RoleCounts::zero(),
        });
        s
    }

    const SUMMARY_KEYS: [&str; 16] = [
        "mode",
        "concurrency",
        "rate",
        "requests",
        "errors",
        "requests_per_sec",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "cpu_us_per_request",
        "duration_s",
        "request_bytes",
        "response_bytes",
        "loadgen_cpu_percent",
    ];

    #[test]
    fn the_summary_json_has_every_documented_key() {
        let s = Summary::of(&stats(Route::Gateway, &[100, 200, 300], &[]), &info());
        let v = s.to_json(&info());
        for key in SUMMARY_KEYS {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        for key in ["callers", "gateway", "agents"] {
            assert!(v["cpu_us_per_request"].get(key).is_some(), "cpu.{key}");
        }
        assert_eq!(v["mode"], "gateway");
        assert_eq!(v["concurrency"], 64);
        assert!(v["rate"].is_null());
        assert_eq!(v["requests"], 3);
        assert_eq!(v["errors"], json!({}));
        assert_eq!(v["requests_per_sec"], 3.0);
        // 100 ms of loadgen CPU over 3 requests.
        assert_eq!(v["cpu_us_per_request"]["callers"], 33333.33);
        assert_eq!(v["cpu_us_per_request"]["gateway"], 16666.67);
        assert_eq!(v["loadgen_cpu_percent"], 10.0);
    }

    #[test]
    fn direct_mode_has_no_gateway_cpu_and_open_loop_no_concurrency() {
        let mut open = info();
        open.load = Load::Open { rate: 1000.0 };
        let s = Summary::of(&stats(Route::Direct, &[100], &[("TIMEOUT", 2)]), &open);
        let v = s.to_json(&open);
        assert!(v["cpu_us_per_request"]["gateway"].is_null());
        assert!(v["concurrency"].is_null());
        assert_eq!(v["rate"], 1000.0);
        assert_eq!(v["errors"], json!({"TIMEOUT": 2}));
        assert_eq!(v["transport_errors"], 2);
        assert_eq!(v["requests"], 3);
        assert!(v["send_lag_us"].is_object());
    }

    #[test]
    fn the_compare_json_has_both_modes_ratios_and_added_latency() {
        let g = Summary::of(&stats(Route::Gateway, &[200, 400], &[]), &info());
        let d = Summary::of(&stats(Route::Direct, &[100, 100], &[]), &info());
        let c = Comparison::of(&g, &d);
        let v = c.to_json(g.to_json(&info()), d.to_json(&info()), 3);
        for key in SUMMARY_KEYS {
            assert!(v["gateway"].get(key).is_some(), "gateway.{key}");
            assert!(v["direct"].get(key).is_some(), "direct.{key}");
        }
        for key in ["requests_per_sec", "p50", "p99", "cpu_us_per_request_total"] {
            assert!(v["ratios"].get(key).is_some(), "ratios.{key}");
        }
        assert_eq!(v["ratios"]["requests_per_sec"], 1.0);
        assert_eq!(v["ratios"]["p50"], 2.0);
        assert_eq!(v["added_latency_us"]["p50"], 100);
        assert_eq!(v["added_latency_us"]["p99"], 300);
        // Gateway total 175 ms over 2 requests, direct 125 ms (its gateway share is not its).
        assert_eq!(v["ratios"]["cpu_us_per_request_total"], 1.4);
    }

    #[test]
    fn errors_are_listed_by_status_then_transport() {
        let mut errors = BTreeMap::new();
        assert_eq!(errors_text(&errors), "none");
        errors.insert("OVERLOADED".to_owned(), 1200);
        assert_eq!(errors_text(&errors), "by status: OVERLOADED 1,200");
        errors.insert("CONNECTION_LOST".to_owned(), 3);
        assert_eq!(
            errors_text(&errors),
            "by status: OVERLOADED 1,200; transport: CONNECTION_LOST 3"
        );
    }
}
