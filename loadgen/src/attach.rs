//! `attach`: the gateway's attach rate, and its resident memory per idle attached agent.
//!
//! The loadgen starts a gateway (`serve-gateway`, with its agent and connection limits raised
//! for `--agents`), reads its `VmRSS`, then attaches `--agents` agents from this process, each
//! the way the SDK attaches one (docs/PROTOCOL.md, section 6.1): a QUIC handshake with the
//! agent certificate (a full TLS handshake: session resumption is off), a control stream,
//! `ATTACH` with a one-skill card, and `ATTACH_OK`. No lanes and no requests: each agent is
//! one connection, which then stays open and idle (client keep-alives hold it). After `--idle`
//! the loadgen reads `VmRSS` again and checks that every connection is still up.
//!
//! Each caller thread owns its share of `--endpoints` quinn endpoints (a UDP socket each) on a
//! single-threaded runtime, and runs its share of `--concurrency` *slots*. A slot attaches one
//! agent, records how it went, and starts the next one at once, so the gateway sees a
//! sustained stream of attaches with a bounded number in progress.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dmsc_dataplane::Limits;
use dmsc_identity::PrincipalKind;
use dmsc_protocol::card::{AgentCard, Skill};
use dmsc_protocol::control::{ControlFrame, Refusal};
use dmsc_protocol::ConnectionCode;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::caller::{micros, new_histogram, open_control, share, Live};
use crate::children::ChildProcess;
use crate::cli::AttachPlan;
use crate::pki::TempPki;
use crate::run::GatewayChild;
use crate::tls::{client_config, Credentials, Resumption, SERVER_NAME};
use crate::units::{format_duration, thousands};
use crate::{cpu, memory};

/// Bound on one attach, from the connect to `ATTACH_OK`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between handing the start to the threads and the start, so they start together.
const START_LEAD: Duration = Duration::from_millis(20);
/// How long the threads may take to answer beyond the bounds of what they were asked to do.
const ANSWER_GRACE: Duration = Duration::from_secs(10);
/// How long the threads may take to close their connections at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Receive buffer asked for each client socket (what the gateway asks for its own).
const CLIENT_RECEIVE_BUFFER: usize = 4 << 20;
/// The most workers a gateway has (`workers` is at most 256).
const MAX_WORKERS: usize = 256;
/// The capability every agent offers without `--distinct-capabilities`.
const SHARED_CAPABILITY: &str = "cap_shared";

/// How an `attach` run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Agents that did not attach, or did not stay attached while idle.
    pub failed: u64,
    /// Whether the gateway process exited during the run.
    pub gateway_died: bool,
}

impl Verdict {
    /// Whether every agent attached and stayed attached, and the gateway lived.
    pub fn passed(&self) -> bool {
        self.failed == 0 && !self.gateway_died
    }
}

/// Runs `plan` and reports; `Err` only for setup and runtime failures, failed attaches are in
/// the verdict.
pub fn run(plan: &AttachPlan) -> anyhow::Result<Verdict> {
    let pki = TempPki::create()?;
    let defaults = Limits::default();
    // Every attach in progress is a connection too; all of them may land on one worker, and
    // all have the same identity.
    let connections = plan.agents + plan.concurrency;
    let limits = [
        (
            "--max-streams-per-connection",
            plan.max_streams_per_connection as usize,
        ),
        ("--max-agents", plan.agents.max(defaults.max_agents)),
        (
            "--max-connections-per-worker",
            connections.max(defaults.max_connections_per_worker),
        ),
        ("--max-connections-per-identity", connections.max(1 << 16)),
    ];
    let mut gateway = GatewayChild::start(
        &pki,
        1,
        plan.gateway_workers,
        plan.pin_gateway,
        &limits,
        None,
    )?;
    // The agents share one identity, as replicas would.
    let creds = Credentials::load(&pki.agent.cert, &pki.agent.key, &pki.ca)
        .context("loading the agents' identity")?;
    // Both processes have loaded their certificates: the keys need not outlive this point.
    drop(pki);
    let setup = Arc::new(Setup {
        gateway: gateway.addr,
        config: client_config(&creds, PrincipalKind::Gateway, Resumption::Off)?,
        agents: plan.agents,
        threads: plan.callers,
        concurrency: plan.concurrency,
        endpoints: plan.endpoints,
        distinct_capabilities: plan.distinct_capabilities,
    });
    let mut threads = Threads::start(setup)?;
    let pid = gateway.process.pid();
    eprintln!(
        "dmsc-loadgen: gateway {} ({} workers, pid {pid}); {} caller threads, {} endpoints",
        gateway.addr, gateway.workers, plan.callers, plan.endpoints
    );

    let rss_before = memory::resident_bytes(pid);
    let (loadgen_before, gateway_before) = (cpu::this_process(), cpu::process(pid));
    let at = Instant::now() + START_LEAD;
    let deadline = at + plan.timeout;
    threads.order(|| Order::Start { at, deadline })?;
    let results = threads.attached(
        at,
        deadline + ATTACH_TIMEOUT + ANSWER_GRACE,
        &mut gateway.process,
    )?;
    let cpu_window = at.elapsed();
    let (loadgen_after, gateway_after) = (cpu::this_process(), cpu::process(pid));
    let rss_attached = memory::resident_bytes(pid);
    let idle_start = Instant::now();

    eprintln!(
        "  idle     {} with the agents attached",
        format_duration(plan.idle)
    );
    if gateway.process.is_running() {
        std::thread::sleep(plan.idle);
    }
    let rss_after = memory::resident_bytes(pid);
    let (idle_window, gateway_idle_after) = (idle_start.elapsed(), cpu::process(pid));
    let lost = threads.lost(Instant::now() + ANSWER_GRACE)?;
    let gateway_died = !gateway.process.is_running();
    // Closes the connections while the gateway still runs.
    threads.stop();

    let delta =
        |after: Option<cpu::CpuTime>, before: Option<cpu::CpuTime>| Some(after?.since(before?));
    let summary = AttachSummary::of(
        plan,
        gateway.workers,
        &results,
        &lost,
        Readings {
            rss_before_bytes: rss_before,
            rss_attached_bytes: rss_attached,
            rss_after_bytes: rss_after,
            gateway_cpu: delta(gateway_after, gateway_before),
            loadgen_cpu: delta(loadgen_after, loadgen_before),
            cpu_window,
            gateway_idle_cpu: delta(gateway_idle_after, gateway_after),
            idle_window,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    );
    println!();
    println!("{}", summary.text());
    if let Some(path) = &plan.json {
        let text = serde_json::to_string_pretty(&summary.to_json())? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("files: {}", path.display());
    }
    Ok(Verdict {
        failed: summary.failed(),
        gateway_died,
    })
}

/// Printed before the run starts.
pub fn banner(plan: &AttachPlan) -> String {
    format!(
        "dmsc-loadgen: attach {} agents, {} in progress, {} capabilities, then {} idle",
        thousands(plan.agents as u64),
        plan.concurrency,
        if plan.distinct_capabilities {
            "distinct"
        } else {
            "one shared"
        },
        format_duration(plan.idle)
    )
}

/// What `attach` measured, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachSummary {
    /// Agents asked for (`--agents`).
    pub agents: usize,
    /// Agents that received `ATTACH_OK`.
    pub attached: u64,
    /// Agents attached and still connected when the memory was read again.
    pub held: u64,
    /// Agents that did not attach or did not stay attached, by cause ([`Failure::name`]).
    pub failures: BTreeMap<String, u64>,
    /// From the first connect to the last `ATTACH_OK`.
    pub duration: Duration,
    /// Attach latency percentiles and maximum (connect to `ATTACH_OK`), µs.
    pub latency_us: Percentiles,
    /// Agents attached on each gateway worker (the `worker` of `ATTACH_OK`), by worker.
    pub agents_per_worker: Vec<u64>,
    /// What was read from `/proc`.
    pub readings: Readings,
    /// Attaches in progress at once.
    pub concurrency: usize,
    /// Caller threads.
    pub callers: usize,
    /// Client endpoints.
    pub endpoints: usize,
    /// Whether each agent had a capability of its own.
    pub distinct_capabilities: bool,
    /// Gateway workers.
    pub gateway_workers: usize,
    /// The gateway's `limits.max_streams_per_connection`.
    pub max_streams_per_connection: u32,
    /// Idle time before the second memory reading.
    pub idle: Duration,
    /// CPU of the busiest caller thread over its attaches.
    pub busiest_thread_cpu: Option<Duration>,
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// Memory and CPU figures read from `/proc` (`None` where unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readings {
    /// The gateway's `VmRSS` before the first connect.
    pub rss_before_bytes: Option<u64>,
    /// The gateway's `VmRSS` right after the last attach.
    pub rss_attached_bytes: Option<u64>,
    /// The gateway's `VmRSS` after the idle time.
    pub rss_after_bytes: Option<u64>,
    /// The gateway's CPU time over the attaches.
    pub gateway_cpu: Option<Duration>,
    /// This process's CPU time over the attaches.
    pub loadgen_cpu: Option<Duration>,
    /// The window the CPU times cover: from the start to the last thread's report.
    pub cpu_window: Duration,
    /// The gateway's CPU time while the agents were idle (keep-alives, timers).
    pub gateway_idle_cpu: Option<Duration>,
    /// How long the agents were idle.
    pub idle_window: Duration,
    /// Cores of the machine.
    pub cores: usize,
}

impl AttachSummary {
    /// Puts together the threads' results.
    fn of(
        plan: &AttachPlan,
        gateway_workers: usize,
        results: &[ThreadResult],
        lost: &BTreeMap<String, u64>,
        readings: Readings,
    ) -> AttachSummary {
        let mut latency = new_histogram();
        let mut failures = lost.clone();
        let mut agents_per_worker = vec![0u64; gateway_workers];
        for r in results {
            // Both histograms have the same bounds: adding cannot fail.
            let _ = latency.add(&r.latency);
            for (name, n) in &r.failures {
                *failures.entry(name.clone()).or_default() += n;
            }
            for (&worker, &n) in &r.workers {
                // A worker the gateway does not have would be a gateway bug: show it anyway.
                let i = usize::try_from(worker).map_or(MAX_WORKERS, |i| i.min(MAX_WORKERS));
                if i >= agents_per_worker.len() {
                    agents_per_worker.resize(i + 1, 0);
                }
                agents_per_worker[i] += n;
            }
        }
        let attached: u64 = results.iter().map(|r| r.attached).sum();
        let first = results.iter().filter_map(|r| r.first_start).min();
        let last = results.iter().filter_map(|r| r.last_attached).max();
        let duration = match (first, last) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        };
        AttachSummary {
            agents: plan.agents,
            attached,
            held: attached.saturating_sub(lost.values().sum()),
            failures,
            duration,
            latency_us: Percentiles {
                p50: latency.value_at_quantile(0.5),
                p90: latency.value_at_quantile(0.9),
                p99: latency.value_at_quantile(0.99),
                max: latency.max(),
            },
            agents_per_worker,
            readings,
            concurrency: plan.concurrency,
            callers: plan.callers,
            endpoints: plan.endpoints,
            distinct_capabilities: plan.distinct_capabilities,
            gateway_workers,
            max_streams_per_connection: plan.max_streams_per_connection,
            idle: plan.idle,
            busiest_thread_cpu: results.iter().filter_map(|r| r.cpu).max(),
        }
    }

    /// Agents that failed, in every way.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Completed attaches per second, from the first connect to the last `ATTACH_OK`.
    pub fn attaches_per_sec(&self) -> f64 {
        match self.duration.as_secs_f64() {
            s if s > 0.0 => self.attached as f64 / s,
            _ => 0.0,
        }
    }

    /// The gateway's growth in `VmRSS` divided by the agents it held at the second reading.
    pub fn rss_per_agent_bytes(&self) -> Option<i64> {
        let before = i64::try_from(self.readings.rss_before_bytes?).ok()?;
        let after = i64::try_from(self.readings.rss_after_bytes?).ok()?;
        (self.held > 0).then(|| ((after - before) as f64 / self.held as f64).round() as i64)
    }

    /// The gateway's CPU time over the attaches divided by the attaches, µs.
    pub fn gateway_cpu_us_per_attach(&self) -> Option<f64> {
        let cpu = self.readings.gateway_cpu?;
        (self.attached > 0).then(|| cpu.as_secs_f64() * 1e6 / self.attached as f64)
    }

    /// `cpu` over the CPU window, in % of one core.
    fn percent(&self, cpu: Option<Duration>) -> Option<f64> {
        let window = self.readings.cpu_window.as_secs_f64();
        (window > 0.0).then_some(cpu?.as_secs_f64() * 100.0 / window)
    }

    /// The gateway's CPU over the attaches, in % of one core.
    pub fn gateway_cpu_percent(&self) -> Option<f64> {
        self.percent(self.readings.gateway_cpu)
    }

    /// This process's CPU over the attaches, in % of one core.
    pub fn loadgen_cpu_percent(&self) -> Option<f64> {
        self.percent(self.readings.loadgen_cpu)
    }

    /// The busiest caller thread's CPU over the attaches, in % of one core.
    pub fn busiest_caller_thread_percent(&self) -> Option<f64> {
        self.percent(self.busiest_thread_cpu)
    }

    /// The gateway's CPU while the agents were idle, in % of one core.
    pub fn gateway_idle_cpu_percent(&self) -> Option<f64> {
        let window = self.readings.idle_window.as_secs_f64();
        (window > 0.0).then_some(self.readings.gateway_idle_cpu?.as_secs_f64() * 100.0 / window)
    }

    /// The JSON object of docs/LOADGEN.md.
    pub fn to_json(&self) -> Value {
        json!({
            "agents": self.agents,
            "attached": self.attached,
            "failures": self.failures,
            "duration_s": round(self.duration.as_secs_f64(), 3),
            "attaches_per_sec": round(self.attaches_per_sec(), 1),
            "attach_p50_us": self.latency_us.p50,
            "attach_p90_us": self.latency_us.p90,
            "attach_p99_us": self.latency_us.p99,
            "attach_max_us": self.latency_us.max,
            "agents_per_worker": self.agents_per_worker,
            "rss_before_bytes": self.readings.rss_before_bytes,
            "rss_attached_bytes": self.readings.rss_attached_bytes,
            "rss_after_bytes": self.readings.rss_after_bytes,
            "rss_per_agent_bytes": self.rss_per_agent_bytes(),
            "gateway_cpu_us_per_attach": self.gateway_cpu_us_per_attach().map(|v| round(v, 1)),
            "gateway_cpu_percent": self.gateway_cpu_percent().map(|v| round(v, 1)),
            "gateway_idle_cpu_percent": self.gateway_idle_cpu_percent().map(|v| round(v, 1)),
            "loadgen_cpu_percent": self.loadgen_cpu_percent().map(|v| round(v, 1)),
            "busiest_caller_thread_percent":
                self.busiest_caller_thread_percent().map(|v| round(v, 1)),
            "concurrency": self.concurrency,
            "callers": self.callers,
            "endpoints": self.endpoints,
            "distinct_capabilities": self.distinct_capabilities,
            "gateway_workers": self.gateway_workers,
            "max_streams_per_connection": self.max_streams_per_connection,
            "idle_s": round(self.idle.as_secs_f64(), 3),
        })
    }

    /// The printed report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== attach: {} agents, {} in progress, {} caller threads x {} endpoints, {} \
             capabilities, gateway {} workers and {} streams per connection",
            thousands(self.agents as u64),
            self.concurrency,
            self.callers,
            self.endpoints / self.callers.max(1),
            if self.distinct_capabilities {
                "distinct"
            } else {
                "one shared"
            },
            self.gateway_workers,
            self.max_streams_per_connection,
        );
        let _ = writeln!(
            out,
            "attached      {} of {} in {:.3}s: {:.1} attaches/s (first connect to last \
             ATTACH_OK)",
            thousands(self.attached),
            thousands(self.agents as u64),
            self.duration.as_secs_f64(),
            self.attaches_per_sec()
        );
        let _ = writeln!(out, "failures      {}", failures_text(&self.failures));
        let _ = writeln!(
            out,
            "latency (µs)  {:>9} {:>9} {:>9} {:>9}   (connect to ATTACH_OK)",
            "p50", "p90", "p99", "max"
        );
        let p = self.latency_us;
        let _ = writeln!(
            out,
            "              {:>9} {:>9} {:>9} {:>9}",
            p.p50, p.p90, p.p99, p.max
        );
        let _ = writeln!(
            out,
            "per worker    {}",
            self.agents_per_worker
                .iter()
                .map(|&n| thousands(n))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        let _ = writeln!(
            out,
            "gateway CPU   {} µs per attach ({}% of one core over the attaches)",
            opt(self.gateway_cpu_us_per_attach(), 1),
            opt(self.gateway_cpu_percent(), 0)
        );
        let together = match (self.gateway_cpu_percent(), self.loadgen_cpu_percent()) {
            (Some(g), Some(l)) => Some(g + l),
            _ => None,
        };
        let _ = writeln!(
            out,
            "loadgen CPU   {}% of one core (busiest caller thread {}%); with the gateway {}% of \
             the {} cores",
            opt(self.loadgen_cpu_percent(), 0),
            opt(self.busiest_caller_thread_percent(), 0),
            opt(together, 0),
            self.readings.cores,
        );
        let _ = writeln!(
            out,
            "              (the loadgen does the client half of every TLS handshake: certificate \
             check and signature)"
        );
        if self
            .busiest_caller_thread_percent()
            .is_some_and(|p| p > 90.0)
        {
            let _ = writeln!(
                out,
                "              warning: a caller thread was busy over 90% of the time; the \
                 loadgen may be the bottleneck (try more --callers)"
            );
        } else if together.is_some_and(|t| t > 90.0 * self.readings.cores as f64) {
            let _ = writeln!(
                out,
                "              warning: the gateway and the loadgen kept the cores over 90% \
                 busy; the rate is bounded by the CPU of both"
            );
        }
        let _ = writeln!(
            out,
            "idle gateway  {}% of one core over {} with the agents idle (keep-alives every 5s)",
            opt(self.gateway_idle_cpu_percent(), 1),
            format_duration(self.readings.idle_window),
        );
        let mib = |b: Option<u64>| {
            b.map_or_else(
                || "n/a".to_owned(),
                |b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)),
            )
        };
        let r = self.readings;
        let _ = writeln!(
            out,
            "gateway RSS   {} MiB before, {} MiB after the attaches, {} MiB after {} idle",
            mib(r.rss_before_bytes),
            mib(r.rss_attached_bytes),
            mib(r.rss_after_bytes),
            format_duration(self.idle),
        );
        let _ = writeln!(
            out,
            "              {} B per idle attached agent ({} agents attached at the last reading)",
            self.rss_per_agent_bytes()
                .map_or_else(|| "n/a".to_owned(), thousands_signed),
            thousands(self.held),
        );
        out
    }
}

/// `none`, or each failure cause with its count.
fn failures_text(failures: &BTreeMap<String, u64>) -> String {
    let list: Vec<String> = failures
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(name, &n)| format!("{name} {}", thousands(n)))
        .collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

fn thousands_signed(n: i64) -> String {
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}", thousands(n.unsigned_abs()))
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Why an agent did not attach, or did not stay attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// quinn would not start the connection (a local error, such as a stopping endpoint).
    Connect,
    /// The connection failed or closed before `ATTACH_OK`.
    Connection(quinn::ConnectionError),
    /// The control stream failed (reset, or an answer that does not decode).
    ControlStream,
    /// The gateway answered `ATTACH_REFUSED`.
    Refused(Refusal),
    /// The gateway answered something other than `ATTACH_OK` or `ATTACH_REFUSED`.
    UnexpectedAnswer,
    /// No `ATTACH_OK` within the attach timeout (10 s, or what was left of `--timeout`).
    Timeout,
    /// `--timeout` passed, or the gateway exited, before the attach was started.
    NotStarted,
    /// The attach was in progress when the gateway exited.
    Abandoned,
    /// Attached, then the connection closed before the memory was read again.
    LostWhileIdle(quinn::ConnectionError),
}

impl Failure {
    /// The name it is counted under: `CONNECT_ERROR`, a connection failure's name (below),
    /// `CONTROL_STREAM_ERROR`, `REFUSED_<refusal>` (`REFUSED_GATEWAY_FULL`),
    /// `UNEXPECTED_ANSWER`, `TIMEOUT`, `NOT_STARTED`, `ABANDONED`,
    /// `LOST_WHILE_IDLE:<connection failure>`.
    ///
    /// Connection failures: `CLOSED_<code>` when the gateway closed the connection with a
    /// DMSC connection code (`CLOSED_LIMIT_EXCEEDED`), `CONNECTION_REFUSED` when it refused
    /// the handshake, `ABORTED(<QUIC error code>)` for other QUIC-level closes (a TLS alert
    /// is `0x1nn`), `QUIC_TIMED_OUT`, `STATELESS_RESET`, `LOCAL_TRANSPORT_ERROR` (this side
    /// found a fault, such as a gateway certificate it does not accept), `VERSION_MISMATCH`,
    /// `LOCALLY_CLOSED`, `CIDS_EXHAUSTED`.
    pub fn name(&self) -> String {
        match self {
            Failure::Connect => "CONNECT_ERROR".into(),
            Failure::Connection(e) => connection_failure_name(e),
            Failure::ControlStream => "CONTROL_STREAM_ERROR".into(),
            Failure::Refused(refusal) => format!("REFUSED_{}", refusal_name(*refusal)),
            Failure::UnexpectedAnswer => "UNEXPECTED_ANSWER".into(),
            Failure::Timeout => "TIMEOUT".into(),
            Failure::NotStarted => "NOT_STARTED".into(),
            Failure::Abandoned => "ABANDONED".into(),
            Failure::LostWhileIdle(e) => format!("LOST_WHILE_IDLE:{}", connection_failure_name(e)),
        }
    }

    /// The failure behind an error of [`open_control`]: the connection's, if it was lost.
    fn of_control(error: &anyhow::Error) -> Failure {
        for cause in error.chain() {
            let lost = if let Some(e) = cause.downcast_ref::<quinn::ConnectionError>() {
                Some(e)
            } else if let Some(quinn::WriteError::ConnectionLost(e)) = cause.downcast_ref() {
                Some(e)
            } else if let Some(quinn::ReadError::ConnectionLost(e)) = cause.downcast_ref() {
                Some(e)
            } else {
                None
            };
            if let Some(e) = lost {
                return Failure::Connection(e.clone());
            }
        }
        Failure::ControlStream
    }
}

fn connection_failure_name(error: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match error {
        E::ApplicationClosed(close) => format!(
            "CLOSED_{}",
            connection_code_name(ConnectionCode::from_code(close.error_code.into_inner()))
        ),
        E::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            "CONNECTION_REFUSED".into()
        }
        E::ConnectionClosed(close) => format!("ABORTED({:#x})", u64::from(close.error_code)),
        E::TimedOut => "QUIC_TIMED_OUT".into(),
        E::Reset => "STATELESS_RESET".into(),
        E::TransportError(_) => "LOCAL_TRANSPORT_ERROR".into(),
        E::VersionMismatch => "VERSION_MISMATCH".into(),
        E::LocallyClosed => "LOCALLY_CLOSED".into(),
        E::CidsExhausted => "CIDS_EXHAUSTED".into(),
    }
}

fn connection_code_name(code: ConnectionCode) -> String {
    match code {
        ConnectionCode::NoError => "NO_ERROR".into(),
        ConnectionCode::ProtocolViolation => "PROTOCOL_VIOLATION".into(),
        ConnectionCode::FrameTooLarge => "FRAME_TOO_LARGE".into(),
        ConnectionCode::AttachRefused => "ATTACH_REFUSED".into(),
        ConnectionCode::ShuttingDown => "SHUTTING_DOWN".into(),
        ConnectionCode::LimitExceeded => "LIMIT_EXCEEDED".into(),
        ConnectionCode::InternalError => "INTERNAL_ERROR".into(),
        ConnectionCode::Unauthenticated => "UNAUTHENTICATED".into(),
        ConnectionCode::AttachTimeout => "ATTACH_TIMEOUT".into(),
        ConnectionCode::Unresponsive => "UNRESPONSIVE".into(),
        ConnectionCode::Unknown(code) => format!("{code:#x}"),
    }
}

fn refusal_name(refusal: Refusal) -> String {
    match refusal {
        Refusal::BadCard => "BAD_CARD".into(),
        Refusal::NotPermitted => "NOT_PERMITTED".into(),
        Refusal::GatewayFull => "GATEWAY_FULL".into(),
        Refusal::AlreadyAttached => "ALREADY_ATTACHED".into(),
        Refusal::Draining => "DRAINING".into(),
        Refusal::UnknownSession => "UNKNOWN_SESSION".into(),
        Refusal::Unknown(code) => format!("{code:#x}"),
    }
}

/// What the caller threads share.
#[derive(Debug)]
struct Setup {
    gateway: SocketAddr,
    config: quinn::ClientConfig,
    agents: usize,
    threads: usize,
    concurrency: usize,
    endpoints: usize,
    distinct_capabilities: bool,
}

/// What the main thread asks of a caller thread.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Start attaching at `at`; start no attach after `deadline`.
    Start { at: Instant, deadline: Instant },
    /// Say which attached connections have closed since.
    CountLost,
}

/// What a caller thread tells the main thread.
#[derive(Debug)]
enum Report {
    /// Its endpoints are bound, or could not be.
    Ready(anyhow::Result<()>),
    /// It has finished its share of the attaches.
    Attached(Box<ThreadResult>),
    /// Its attached connections that have closed, by failure name.
    Lost(BTreeMap<String, u64>),
}

/// One caller thread's share of the attaches.
#[derive(Debug)]
struct ThreadResult {
    latency: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    attached: u64,
    first_start: Option<Instant>,
    last_attached: Option<Instant>,
    /// Agents attached by gateway worker.
    workers: BTreeMap<u64, u64>,
    cpu: Option<Duration>,
}

impl ThreadResult {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            failures: BTreeMap::new(),
            attached: 0,
            first_start: None,
            last_attached: None,
            workers: BTreeMap::new(),
            cpu: None,
        }
    }
}

/// The caller threads, seen from the main thread.
#[derive(Debug)]
struct Threads {
    /// Orders for each thread; dropping them stops the threads.
    orders: Vec<tokio::sync::mpsc::UnboundedSender<Order>>,
    reports: mpsc::Receiver<Report>,
    live: Vec<Arc<Live>>,
    joins: Vec<JoinHandle<()>>,
    /// Set to abandon the attaches in progress and start no more.
    cancel: watch::Sender<bool>,
}

impl Threads {
    /// Starts the threads and waits until each has bound its endpoints.
    fn start(setup: Arc<Setup>) -> anyhow::Result<Threads> {
        let (report_tx, reports) = mpsc::channel();
        let (cancel, cancelled) = watch::channel(false);
        let mut threads = Threads {
            orders: Vec::new(),
            reports,
            live: Vec::new(),
            joins: Vec::new(),
            cancel,
        };
        for index in 0..setup.threads {
            let (order_tx, orders) = tokio::sync::mpsc::unbounded_channel();
            let live = Arc::new(Live::default());
            let thread = CallerThread {
                index,
                setup: setup.clone(),
                live: live.clone(),
                reports: report_tx.clone(),
                cancelled: cancelled.clone(),
            };
            let join = std::thread::Builder::new()
                .name(format!("attach-{index}"))
                .spawn(move || thread.run(orders))
                .context("starting a caller thread")?;
            threads.orders.push(order_tx);
            threads.live.push(live);
            threads.joins.push(join);
        }
        drop(report_tx);
        let deadline = Instant::now() + ANSWER_GRACE;
        for _ in 0..setup.threads {
            match threads.next(deadline)? {
                Report::Ready(Ok(())) => {}
                Report::Ready(Err(e)) => return Err(e),
                other => bail!("internal error: a caller thread reported {other:?} first"),
            }
        }
        Ok(threads)
    }

    /// Gives `order` to every thread.
    fn order(&self, order: impl Fn() -> Order) -> anyhow::Result<()> {
        for orders in &self.orders {
            orders
                .send(order())
                .map_err(|_| anyhow!("a caller thread has stopped"))?;
        }
        Ok(())
    }

    /// Waits for every thread's share of the attaches, printing progress once a second. If
    /// the gateway exits, the attaches in progress are abandoned and no more are started.
    fn attached(
        &self,
        start: Instant,
        deadline: Instant,
        gateway: &mut ChildProcess,
    ) -> anyhow::Result<Vec<ThreadResult>> {
        let mut results = Vec::with_capacity(self.orders.len());
        let mut next_tick = start + Duration::from_secs(1);
        let mut last_attached = 0;
        while results.len() < self.orders.len() {
            let now = Instant::now();
            if now >= deadline {
                bail!("the caller threads did not finish attaching in time");
            }
            if now >= next_tick {
                if !*self.cancel.borrow() && !gateway.is_running() {
                    eprintln!("dmsc-loadgen: the gateway process exited; abandoning the attaches");
                    self.cancel.send_replace(true);
                }
                let (attached, failed) = self.live();
                eprintln!(
                    "  attach {:>4}s  attached {:>9} ({:>7}/s)  failures {}",
                    (now - start).as_secs(),
                    thousands(attached),
                    thousands(attached - last_attached),
                    thousands(failed)
                );
                last_attached = attached;
                next_tick += Duration::from_secs(1);
                continue;
            }
            match self.reports.recv_timeout(next_tick.min(deadline) - now) {
                Ok(Report::Attached(result)) => results.push(*result),
                Ok(other) => bail!("internal error: a caller thread reported {other:?}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the caller threads have stopped")
                }
            }
        }
        Ok(results)
    }

    /// The attached connections that have closed, by failure name, over all threads.
    fn lost(&self, deadline: Instant) -> anyhow::Result<BTreeMap<String, u64>> {
        self.order(|| Order::CountLost)?;
        let mut lost = BTreeMap::new();
        for _ in 0..self.orders.len() {
            match self.next(deadline)? {
                Report::Lost(counts) => {
                    for (name, n) in counts {
                        *lost.entry(name).or_default() += n;
                    }
                }
                other => bail!("internal error: a caller thread reported {other:?}"),
            }
        }
        Ok(lost)
    }

    /// Agents attached and failures so far, over all threads.
    fn live(&self) -> (u64, u64) {
        self.live.iter().fold((0, 0), |(a, f), live| {
            (
                a + live.completed.load(Ordering::Relaxed),
                f + live.failed.load(Ordering::Relaxed),
            )
        })
    }

    fn next(&self, deadline: Instant) -> anyhow::Result<Report> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.reports.recv_timeout(left) {
            Ok(report) => Ok(report),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the caller threads did not answer"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the caller threads have stopped"),
        }
    }

    /// Closes every connection and stops the threads.
    fn stop(&mut self) {
        // Attaches in progress (if the main thread gave up on them) end at once; without
        // orders, a thread closes its endpoints and ends.
        self.cancel.send_replace(true);
        self.orders.clear();
        for join in self.joins.drain(..) {
            let _ = join.join();
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a caller thread is given.
struct CallerThread {
    index: usize,
    setup: Arc<Setup>,
    live: Arc<Live>,
    reports: mpsc::Sender<Report>,
    cancelled: watch::Receiver<bool>,
}

impl CallerThread {
    fn run(self, mut orders: tokio::sync::mpsc::UnboundedReceiver<Order>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = self.reports.send(Report::Ready(Err(e.into())));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let endpoints = match self.bind() {
                Ok(endpoints) => endpoints,
                Err(e) => {
                    let _ = self.reports.send(Report::Ready(Err(e)));
                    return;
                }
            };
            let _ = self.reports.send(Report::Ready(Ok(())));
            let mut held = Vec::new();
            while let Some(order) = orders.recv().await {
                let report = match order {
                    Order::Start { at, deadline } => {
                        let (result, attached) = self.attach(&endpoints, at, deadline).await;
                        held = attached;
                        Report::Attached(Box::new(result))
                    }
                    Order::CountLost => Report::Lost(lost(&held)),
                };
                if self.reports.send(report).is_err() {
                    break;
                }
            }
            for endpoint in &endpoints {
                endpoint.close(0u32.into(), b"done");
            }
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                for endpoint in &endpoints {
                    endpoint.wait_idle().await;
                }
            })
            .await;
        });
    }

    /// This thread's share of the endpoints, one UDP socket each.
    fn bind(&self) -> anyhow::Result<Vec<quinn::Endpoint>> {
        let bind: SocketAddr = if self.setup.gateway.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let count = share(self.setup.endpoints, self.setup.threads, self.index);
        (0..count).map(|_| client_endpoint(bind)).collect()
    }

    /// Attaches this thread's share of the agents (agents `index`, `index + threads`, ...)
    /// with its share of the slots; returns the result and the attached connections.
    async fn attach(
        &self,
        endpoints: &[quinn::Endpoint],
        at: Instant,
        deadline: Instant,
    ) -> (ThreadResult, Vec<Attached>) {
        let work = Rc::new(Work {
            index: self.index,
            setup: self.setup.clone(),
            endpoints: endpoints.to_vec(),
            count: share(self.setup.agents, self.setup.threads, self.index),
            next: Cell::new(0),
            deadline,
            cancelled: self.cancelled.clone(),
            live: self.live.clone(),
            result: RefCell::new(ThreadResult::new()),
            held: RefCell::new(Vec::new()),
        });
        tokio::time::sleep_until(at.into()).await;
        let cpu_before = cpu::this_thread();
        let mut slots = tokio::task::JoinSet::new();
        for _ in 0..share(self.setup.concurrency, self.setup.threads, self.index) {
            slots.spawn_local(slot(work.clone()));
        }
        while slots.join_next().await.is_some() {}
        let not_started = work.count - work.next.get();
        for _ in 0..not_started {
            work.record_failure(Failure::NotStarted);
        }
        let mut result = work.result.replace(ThreadResult::new());
        result.cpu = match (cpu_before, cpu::this_thread()) {
            (Some(before), Some(after)) => Some(after.since(before)),
            _ => None,
        };
        (result, work.held.take())
    }
}

/// A client endpoint on a new UDP socket with a large receive buffer: every handshake in
/// progress on it brings a flight of the gateway's (its certificate), and a burst of them would
/// overflow the default buffer (about 200 KiB on Linux), turning into retransmissions after
/// hundreds of milliseconds.
fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind).context("binding a client endpoint")?;
    // Best effort: the kernel caps the size at net.core.rmem_max.
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        let _ = state.set_recv_buffer_size((&socket).into(), CLIENT_RECEIVE_BUFFER);
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting a client endpoint")
}

/// An attached agent: its connection, and its control stream, which must stay open (the
/// gateway takes the end of the control stream for a detach).
#[derive(Debug)]
struct Attached {
    connection: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// The attached connections that have closed, by failure name.
fn lost(held: &[Attached]) -> BTreeMap<String, u64> {
    let mut lost = BTreeMap::new();
    for attached in held {
        if let Some(reason) = attached.connection.close_reason() {
            *lost
                .entry(Failure::LostWhileIdle(reason).name())
                .or_default() += 1;
        }
    }
    lost
}

/// A thread's attaches in progress.
struct Work {
    index: usize,
    setup: Arc<Setup>,
    endpoints: Vec<quinn::Endpoint>,
    /// Agents this thread attaches.
    count: usize,
    /// The next of them to start.
    next: Cell<usize>,
    deadline: Instant,
    cancelled: watch::Receiver<bool>,
    live: Arc<Live>,
    result: RefCell<ThreadResult>,
    held: RefCell<Vec<Attached>>,
}

impl Work {
    fn record_failure(&self, failure: Failure) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .result
            .borrow_mut()
            .failures
            .entry(failure.name())
            .or_default() += 1;
    }
}

/// Attaches agents one after the other until the thread's share is started, the deadline
/// passes, or the attaches are cancelled.
async fn slot(work: Rc<Work>) {
    let mut cancelled = work.cancelled.clone();
    loop {
        let k = work.next.get();
        let started = Instant::now();
        let left = work.deadline.saturating_duration_since(started);
        if k >= work.count || left.is_zero() || *cancelled.borrow() {
            return;
        }
        work.next.set(k + 1);
        {
            let mut result = work.result.borrow_mut();
            if result.first_start.is_none() {
                result.first_start = Some(started);
            }
        }
        let agent = work.index + k * work.setup.threads;
        let endpoint = &work.endpoints[k % work.endpoints.len()];
        let frame = attach_frame(agent, work.setup.distinct_capabilities);
        let attempt = tokio::time::timeout(
            ATTACH_TIMEOUT.min(left),
            attach_one(endpoint, &work.setup, &frame),
        );
        let outcome = tokio::select! {
            outcome = attempt => outcome.unwrap_or(Err(Failure::Timeout)),
            // Also when the main thread is gone (the sender dropped).
            _ = cancelled.wait_for(|&c| c) => Err(Failure::Abandoned),
        };
        match outcome {
            Ok((attached, worker)) => {
                let now = Instant::now();
                let mut result = work.result.borrow_mut();
                result.latency.saturating_record(micros(now - started));
                result.attached += 1;
                result.last_attached = Some(now);
                *result.workers.entry(worker).or_default() += 1;
                work.live.completed.fetch_add(1, Ordering::Relaxed);
                work.held.borrow_mut().push(attached);
            }
            Err(failure) => work.record_failure(failure),
        }
    }
}

/// The `ATTACH` of agent `agent`: a card with one skill, `cap_<agent>` or the shared one.
fn attach_frame(agent: usize, distinct_capabilities: bool) -> ControlFrame {
    let capability = if distinct_capabilities {
        format!("cap_{agent}")
    } else {
        SHARED_CAPABILITY.to_owned()
    };
    let card = AgentCard::new(
        format!("loadgen-agent-{agent}"),
        "dmsc-loadgen idle agent",
        env!("CARGO_PKG_VERSION"),
    )
    .with_skill(Skill::new(capability, "Idle"));
    ControlFrame::Attach {
        max_concurrent: 1,
        card: card.to_json(),
    }
}

/// Connects, attaches with `frame`, and returns the connection with the worker that took it.
async fn attach_one(
    endpoint: &quinn::Endpoint,
    setup: &Setup,
    frame: &ControlFrame,
) -> Result<(Attached, u64), Failure> {
    let connecting = endpoint
        .connect_with(setup.config.clone(), setup.gateway, SERVER_NAME)
        .map_err(|_| Failure::Connect)?;
    let connection = connecting.await.map_err(Failure::Connection)?;
    let (control, answer) = open_control(&connection, frame)
        .await
        .map_err(|e| Failure::of_control(&e))?;
    match answer {
        ControlFrame::AttachOk { worker, .. } => Ok((
            Attached {
                connection,
                _control: control,
            },
            worker,
        )),
        ControlFrame::AttachRefused { refusal, .. } => Err(Failure::Refused(refusal)),
        _ => Err(Failure::UnexpectedAnswer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> AttachSummary {
        AttachSummary {
            agents: 1000,
            attached: 1000,
            held: 1000,
            failures: BTreeMap::new(),
            duration: Duration::from_millis(500),
            latency_us: Percentiles {
                p50: 800,
                p90: 1500,
                p99: 3000,
                max: 9000,
            },
            agents_per_worker: vec![480, 520],
            readings: Readings {
                rss_before_bytes: Some(10 << 20),
                rss_attached_bytes: Some((10 << 20) + 31_000_000),
                rss_after_bytes: Some((10 << 20) + 30_000_000),
                gateway_cpu: Some(Duration::from_millis(400)),
                loadgen_cpu: Some(Duration::from_millis(450)),
                cpu_window: Duration::from_millis(500),
                gateway_idle_cpu: Some(Duration::from_millis(100)),
                idle_window: Duration::from_secs(2),
                cores: 2,
            },
            concurrency: 256,
            callers: 2,
            endpoints: 32,
            distinct_capabilities: true,
            gateway_workers: 2,
            max_streams_per_connection: 1024,
            idle: Duration::from_secs(2),
            busiest_thread_cpu: Some(Duration::from_millis(250)),
        }
    }

    #[test]
    fn the_json_has_the_documented_keys_and_figures() {
        let v = summary().to_json();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for key in [
            "agents",
            "attaches_per_sec",
            "attach_p50_us",
            "attach_p99_us",
            "failures",
            "rss_before_bytes",
            "rss_after_bytes",
            "rss_per_agent_bytes",
            "gateway_cpu_us_per_attach",
            "loadgen_cpu_percent",
            "duration_s",
        ] {
            assert!(keys.contains(&key), "{key} missing from {v}");
        }
        assert_eq!(v["agents"], 1000);
        assert_eq!(v["attaches_per_sec"], 2000.0);
        assert_eq!(v["attach_p50_us"], 800);
        assert_eq!(v["attach_p99_us"], 3000);
        assert_eq!(v["failures"], json!({}));
        assert_eq!(v["rss_per_agent_bytes"], 30_000);
        assert_eq!(v["gateway_cpu_us_per_attach"], 400.0);
        assert_eq!(v["loadgen_cpu_percent"], 90.0);
        assert_eq!(v["busiest_caller_thread_percent"], 50.0);
        assert_eq!(v["gateway_idle_cpu_percent"], 5.0);
        assert_eq!(v["duration_s"], 0.5);
        assert_eq!(v["agents_per_worker"], json!([480, 520]));
    }

    #[test]
    fn unknown_figures_are_null_and_memory_may_shrink() {
        let mut s = summary();
        s.readings.rss_after_bytes = None;
        s.readings.gateway_cpu = None;
        let v = s.to_json();
        assert!(v["rss_after_bytes"].is_null());
        assert!(v["rss_per_agent_bytes"].is_null());
        assert!(v["gateway_cpu_us_per_attach"].is_null());
        assert!(s.text().contains("after 2s idle"));
        assert!(s.text().contains("n/a B per idle attached agent"));

        let mut s = summary();
        s.readings.rss_after_bytes = Some((10 << 20) - 1000);
        s.held = 10;
        assert_eq!(s.rss_per_agent_bytes(), Some(-100));
        assert!(s.text().contains(" -100 B per idle attached agent"));
        s.held = 0;
        assert_eq!(s.rss_per_agent_bytes(), None);

        let mut s = summary();
        s.attached = 0;
        s.duration = Duration::ZERO;
        assert_eq!(s.attaches_per_sec(), 0.0);
        assert_eq!(s.gateway_cpu_us_per_attach(), None);
    }

    #[test]
    fn failures_are_counted_by_cause() {
        let mut s = summary();
        s.failures.insert(Failure::Timeout.name(), 2);
        s.failures
            .insert(Failure::Refused(Refusal::GatewayFull).name(), 3);
        assert_eq!(s.failed(), 5);
        assert_eq!(
            s.to_json()["failures"],
            json!({"REFUSED_GATEWAY_FULL": 3, "TIMEOUT": 2})
        );
        assert!(s
            .text()
            .contains("failures      REFUSED_GATEWAY_FULL 3, TIMEOUT 2"));
        assert!(summary().text().contains("failures      none"));
    }

    #[test]
    fn failure_names_say_who_closed_and_why() {
        let app = |code: ConnectionCode| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: quinn::VarInt::from_u64(code.code()).unwrap(),
                reason: Default::default(),
            })
        };
        assert_eq!(
            Failure::Connection(app(ConnectionCode::LimitExceeded)).name(),
            "CLOSED_LIMIT_EXCEEDED"
        );
        assert_eq!(
            Failure::Connection(app(ConnectionCode::Unknown(0x77))).name(),
            "CLOSED_0x77"
        );
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: Default::default(),
        });
        assert_eq!(Failure::Connection(refused).name(), "CONNECTION_REFUSED");
        assert_eq!(
            Failure::LostWhileIdle(quinn::ConnectionError::TimedOut).name(),
            "LOST_WHILE_IDLE:QUIC_TIMED_OUT"
        );
        assert_eq!(Failure::Refused(Refusal::Unknown(9)).name(), "REFUSED_0x9");
    }

    #[test]
    fn a_lost_connection_behind_a_control_stream_error_is_named() {
        let e = anyhow::Error::from(quinn::WriteError::ConnectionLost(
            quinn::ConnectionError::Reset,
        ))
        .context("writing ATTACH");
        assert_eq!(
            Failure::of_control(&e),
            Failure::Connection(quinn::ConnectionError::Reset)
        );
        let e = anyhow::Error::from(quinn::ReadError::Reset(0u32.into()));
        assert_eq!(Failure::of_control(&e), Failure::ControlStream);
        assert_eq!(
            Failure::of_control(&anyhow!("the control stream ended")),
            Failure::ControlStream
        );
    }

    #[test]
    fn cards_carry_a_distinct_or_a_shared_capability() {
        let capability = |frame: ControlFrame| match frame {
            ControlFrame::Attach { card, .. } => {
                let card = AgentCard::from_json(&card).unwrap();
                card.capabilities().map(str::to_owned).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(capability(attach_frame(7, true)), ["cap_7"]);
        assert_eq!(capability(attach_frame(7, false)), [SHARED_CAPABILITY]);
    }
}
