//! The callers: threads that open QUIC connections and keep requests flowing over them.
//!
//! Each caller thread owns one QUIC endpoint on a single-threaded tokio runtime, so the
//! per-request path takes no lock and crosses no thread: the connections, the request tasks
//! and the recorder of a thread live on that thread alone. The main thread drives the threads
//! through [`CallerPool`]: it starts them (they connect, and through a gateway attach), then runs
//! *phases* (a warm-up, a measured window, a round of `compare`), each of which every thread
//! runs on its share of the load and answers with a [`PhaseResult`]. Between phases the
//! connections stay open (keep-alives hold them), so `compare` can alternate between the
//! gateway's connections and the direct ones without reconnecting.
//!
//! Requests use the raw `dmsc/1` framing on both routes: a bidirectional stream carrying the
//! request header, the payload and FIN, answered by the response header, the payload and FIN.
//! The routes differ only in where the connections go: to the gateway, or to the agents' direct
//! listeners (round-robin over the agents). Through the gateway, connections come in sessions:
//! a primary connection that attaches, plus a lane to every other worker, as the SDK opens
//! them. That spreads each thread's requests evenly over the workers: connections from one UDP
//! socket all hash to the same worker of the gateway's `SO_REUSEPORT` group, so without lanes a
//! thread would load one worker only.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use dmsc_protocol::card::{AgentCard, Skill};
use dmsc_protocol::control::{ControlFrame, FrameBuffer, Refusal};
use dmsc_protocol::header::ResponseHeader;
use dmsc_protocol::limits::{MAX_CONTROL_FRAME_BYTES, MAX_HEADER_BYTES};
use dmsc_protocol::{Status, StreamCode};
use hdrhistogram::Histogram;
use tokio::sync::Notify;

use crate::cli::{Load, Route};
use crate::cpu;
use crate::tls::SERVER_NAME;

/// Highest latency the histograms hold, in µs (60 s); anything slower is recorded as this.
pub const HIGHEST_US: u64 = 60_000_000;
/// Significant figures of the histograms.
pub const SIGNIFICANT_FIGURES: u8 = 3;
/// Pause of a closed-loop slot after a transport failure, so a dead connection does not turn
/// into a busy loop of instant failures.
const FAILURE_PAUSE: Duration = Duration::from_millis(10);
/// Bound on connecting, attaching and binding lanes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lane attempts before doing without (a lane may be refused while the worker has not yet
/// learnt of a brand-new session: docs/PROTOCOL.md, 6.3).
const LANE_ATTEMPTS: u32 = 6;

/// A new latency histogram: 1 µs to 60 s, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: `new_with_bounds` only fails for low < 1, high < 2 * low or
    // sigfig > 5.
    Histogram::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_FIGURES).expect("valid bounds")
}

/// What the callers connect to and send.
#[derive(Debug)]
pub struct CallerSetup {
    /// Gateway route: its address and the client configuration expecting a gateway.
    pub gateway: Option<(SocketAddr, quinn::ClientConfig)>,
    /// Two-gateway route: the first gateway's address (the agents are behind the second).
    pub ingress: Option<(SocketAddr, quinn::ClientConfig)>,
    /// Direct route: the agents' listeners and the client configuration expecting agents.
    pub direct: Option<(Vec<SocketAddr>, quinn::ClientConfig)>,
    /// Connections per thread and route. Through the gateway they are the primary connections
    /// and lanes of attached sessions, rounded up to whole sessions.
    pub connections: usize,
    /// One request, header and payload, sent as is for every invocation.
    pub request: Bytes,
    /// The response payload size to insist on, when the agents are ours.
    pub expected_response_bytes: Option<usize>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// One phase of load, as the main thread asks for it.
#[derive(Debug, Clone, Copy)]
pub struct PhaseSpec {
    /// Which connections to use.
    pub route: Route,
    /// The whole load, over all threads.
    pub load: Load,
    /// When sending starts.
    pub start: Instant,
    /// How long requests are started for. Requests started in the window are waited for.
    pub duration: Duration,
}

/// What one thread measured in one phase.
#[derive(Debug)]
pub struct PhaseResult {
    /// Latencies of successful requests (µs), one histogram per second of the phase, by
    /// (intended) start time.
    pub intervals: Vec<Histogram<u64>>,
    /// Open loop only: how late requests were sent after their intended time (µs).
    pub send_lag: Histogram<u64>,
    /// Requests started in the window that completed, successfully or not.
    pub requests: u64,
    /// Failed requests by error name ([`Failure::name`]).
    pub errors: BTreeMap<String, u64>,
    /// CPU time of this thread during the phase.
    pub cpu: Option<Duration>,
    /// UDP datagrams (sent, received) on this thread's connections during the phase, as quinn
    /// counts them.
    pub datagrams: (u64, u64),
}

/// Counters the main thread reads for the progress line.
#[derive(Debug, Default)]
#[repr(align(128))] // one cache line pair per thread: no false sharing between callers
pub struct Live {
    /// Requests completed (any outcome) since the thread started.
    pub completed: AtomicU64,
    /// Requests failed since the thread started.
    pub failed: AtomicU64,
}

/// The caller threads.
#[derive(Debug)]
pub struct CallerPool {
    threads: Vec<CallerThread>,
    results: mpsc::Receiver<(usize, PhaseResult)>,
}

#[derive(Debug)]
struct CallerThread {
    /// Phases to run; closing it stops the thread.
    phases: Option<tokio::sync::mpsc::UnboundedSender<PhaseSpec>>,
    live: Arc<Live>,
    join: Option<JoinHandle<()>>,
}

impl CallerPool {
    /// Starts `threads` caller threads and waits until each has opened (and through a gateway,
    /// attached) its connections.
    pub fn start(setup: Arc<CallerSetup>, threads: usize) -> anyhow::Result<CallerPool> {
        let (result_tx, results) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let mut pool = CallerPool {
            threads: Vec::with_capacity(threads),
            results,
        };
        for index in 0..threads {
            let (phases, phase_rx) = tokio::sync::mpsc::unbounded_channel();
            let live = Arc::new(Live::default());
            let thread = ThreadContext {
                index,
                threads,
                setup: setup.clone(),
                live: live.clone(),
                results: result_tx.clone(),
            };
            let ready_tx = ready_tx.clone();
            let join = std::thread::Builder::new()
                .name(format!("caller-{index}"))
                .spawn(move || thread.run(phase_rx, ready_tx))
                .context("starting a caller thread")?;
            pool.threads.push(CallerThread {
                phases: Some(phases),
                live,
                join: Some(join),
            });
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready.recv_timeout(CONNECT_TIMEOUT * 3) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("caller threads did not connect in time"),
            }
        }
        Ok(pool)
    }

    /// Starts a phase on every thread; collect the results with
    /// [`CallerPool::next_result`].
    pub fn begin(&self, spec: PhaseSpec) -> anyhow::Result<()> {
        for thread in &self.threads {
            thread
                .phases
                .as_ref()
                .and_then(|phases| phases.send(spec).ok())
                .ok_or_else(|| anyhow!("a caller thread has stopped"))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next thread's phase result.
    pub fn next_result(&self, timeout: Duration) -> Result<Option<PhaseResult>, anyhow::Error> {
        match self.results.recv_timeout(timeout) {
            Ok((_, result)) => Ok(Some(result)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the caller threads have stopped"),
        }
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Requests completed and failed so far, over all threads.
    pub fn live(&self) -> (u64, u64) {
        self.threads.iter().fold((0, 0), |(c, f), t| {
            (
                c + t.live.completed.load(Ordering::Relaxed),
                f + t.live.failed.load(Ordering::Relaxed),
            )
        })
    }

    /// Closes every connection and stops the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for thread in &mut self.threads {
            // Closing the phase channel ends the thread's loop; it then closes its endpoint.
            thread.phases = None;
        }
        for thread in &mut self.threads {
            if let Some(join) = thread.join.take() {
                let _ = join.join();
            }
        }
    }
}

impl Drop for CallerPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a caller thread is given.
struct ThreadContext {
    index: usize,
    threads: usize,
    setup: Arc<CallerSetup>,
    live: Arc<Live>,
    results: mpsc::Sender<(usize, PhaseResult)>,
}

impl ThreadContext {
    fn run(
        self,
        mut phases: tokio::sync::mpsc::UnboundedReceiver<PhaseSpec>,
        ready: mpsc::Sender<anyhow::Result<()>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let connections = match Connections::open(&self.setup).await {
                Ok(connections) => {
                    let _ = ready.send(Ok(()));
                    Rc::new(connections)
                }
                Err(e) => {
                    let _ = ready.send(Err(e.context(format!("caller thread {}", self.index))));
                    return;
                }
            };
            while let Some(spec) = phases.recv().await {
                let result = self.phase(&connections, spec).await;
                if self.results.send((self.index, result)).is_err() {
                    break;
                }
            }
            connections.close().await;
        });
    }

    /// Runs this thread's share of a phase and waits for every request it started.
    async fn phase(&self, connections: &Rc<Connections>, spec: PhaseSpec) -> PhaseResult {
        let cpu_before = cpu::this_thread();
        let datagrams_before = datagrams(connections.route(spec.route));
        let end = spec.start + spec.duration;
        let ctx = Rc::new(PhaseContext {
            connections: connections.route(spec.route).to_vec(),
            next: Cell::new(self.index),
            setup: self.setup.clone(),
            recorder: RefCell::new(Recorder::new(spec.start, spec.duration, self.live.clone())),
            in_flight: Cell::new(0),
            idle: Notify::new(),
        });
        tokio::time::sleep_until(spec.start.into()).await;
        if ctx.connections.is_empty() {
            // The setup opens connections for every route a run uses; this is a loadgen bug.
            ctx.recorder
                .borrow_mut()
                .record(spec.start, Duration::ZERO, Err(Failure::Loadgen));
            let empty = Recorder::new(spec.start, Duration::ZERO, self.live.clone());
            return ctx.recorder.replace(empty).into_result(None);
        }
        match spec.load {
            Load::Closed { concurrency } => {
                let slots = share(concurrency as usize, self.threads, self.index);
                for _ in 0..slots {
                    ctx.in_flight.set(ctx.in_flight.get() + 1);
                    tokio::task::spawn_local(closed_slot(ctx.clone(), end));
                }
            }
            Load::Open { rate } => {
                // The schedule is kept by a pacer thread: tokio's timer has a 1 ms resolution,
                // which would make requests up to 1 ms late (and, counted from their intended
                // time as they must be, that much slower); a thread sleeping with nanosleep is
                // late by tens of µs. It hands each request's intended time over as it falls
                // due; the lateness that remains is reported as the send lag.
                let (due_tx, mut due) = tokio::sync::mpsc::unbounded_channel();
                let schedule = Schedule {
                    start: spec.start,
                    end,
                    rate: rate / self.threads as f64,
                    // Threads interleave their schedules: thread i sends at (k + i/T) / r.
                    offset: self.index as f64 / self.threads as f64,
                };
                let pacer = std::thread::Builder::new()
                    .name(format!("pacer-{}", self.index))
                    .spawn(move || schedule.run(&due_tx));
                if pacer.is_ok() {
                    while let Some(intended) = due.recv().await {
                        ctx.in_flight.set(ctx.in_flight.get() + 1);
                        tokio::task::spawn_local(open_request(ctx.clone(), intended));
                    }
                } else {
                    ctx.recorder.borrow_mut().record(
                        spec.start,
                        Duration::ZERO,
                        Err(Failure::Loadgen),
                    );
                }
            }
        }
        while ctx.in_flight.get() > 0 {
            ctx.idle.notified().await;
        }
        let recorder =
            ctx.recorder
                .replace(Recorder::new(spec.start, Duration::ZERO, self.live.clone()));
        let cpu = match (cpu_before, cpu::this_thread()) {
            (Some(before), Some(after)) => Some(after.since(before)),
            _ => None,
        };
        let after = datagrams(connections.route(spec.route));
        let mut result = recorder.into_result(cpu);
        result.datagrams = (
            after.0.saturating_sub(datagrams_before.0),
            after.1.saturating_sub(datagrams_before.1),
        );
        result
    }
}

/// UDP datagrams (sent, received) on `connections` so far.
fn datagrams(connections: &[quinn::Connection]) -> (u64, u64) {
    connections.iter().fold((0, 0), |(s, r), c| {
        let stats = c.stats();
        (s + stats.udp_tx.datagrams, r + stats.udp_rx.datagrams)
    })
}

/// An open-loop schedule: requests at `start + (k + offset) / rate` for k = 0, 1, ... while
/// before `end`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    end: Instant,
    rate: f64,
    offset: f64,
}

impl Schedule {
    /// Sends each intended time to `due` when it comes (all that are past at once).
    fn run(self, due: &tokio::sync::mpsc::UnboundedSender<Instant>) {
        for k in 0u64.. {
            let intended =
                self.start + Duration::from_secs_f64((k as f64 + self.offset) / self.rate);
            if intended >= self.end {
                break;
            }
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if due.send(intended).is_err() {
                break;
            }
        }
    }
}

/// The `index`th of `parts` shares of `total`, the remainder going to the first shares.
pub fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

/// One phase's state on one thread.
struct PhaseContext {
    connections: Vec<quinn::Connection>,
    next: Cell<usize>,
    setup: Arc<CallerSetup>,
    recorder: RefCell<Recorder>,
    in_flight: Cell<usize>,
    idle: Notify,
}

impl PhaseContext {
    /// The next connection, round-robin.
    fn connection(&self) -> &quinn::Connection {
        let i = self.next.get();
        self.next.set(i.wrapping_add(1));
        &self.connections[i % self.connections.len()]
    }

    fn done(&self) {
        let left = self.in_flight.get() - 1;
        self.in_flight.set(left);
        if left == 0 {
            self.idle.notify_one();
        }
    }
}

/// A closed-loop slot: one request at a time, the next as soon as the last one completed.
async fn closed_slot(ctx: Rc<PhaseContext>, end: Instant) {
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let outcome = invoke(&ctx).await;
        let finished = Instant::now();
        let transport_failure = matches!(&outcome, Err(f) if f.is_transport());
        ctx.recorder
            .borrow_mut()
            .record(started, finished - started, outcome);
        if transport_failure {
            tokio::time::sleep(FAILURE_PAUSE).await;
        }
    }
    ctx.done();
}

/// An open-loop request: latency counts from when it should have been sent.
async fn open_request(ctx: Rc<PhaseContext>, intended: Instant) {
    let lag = Instant::now().saturating_duration_since(intended);
    let outcome = invoke(&ctx).await;
    let latency = Instant::now().saturating_duration_since(intended);
    {
        let mut recorder = ctx.recorder.borrow_mut();
        recorder.send_lag.saturating_record(micros(lag));
        recorder.record(intended, latency, outcome);
    }
    ctx.done();
}

/// Sends the request on the next connection and reads the whole answer.
async fn invoke(ctx: &PhaseContext) -> Result<(), Failure> {
    let setup = &ctx.setup;
    let connection = ctx.connection();
    match tokio::time::timeout(
        setup.timeout,
        exchange(
            connection,
            setup.request.clone(),
            setup.expected_response_bytes,
        ),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Timeout),
    }
}

async fn exchange(
    connection: &quinn::Connection,
    request: Bytes,
    expected: Option<usize>,
) -> Result<(), Failure> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|_| Failure::ConnectionLost)?;
    match send.write_chunk(request).await {
        Ok(()) => {
            let _ = send.finish();
        }
        // The peer may stop reading early to answer an error status: read the answer anyway.
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(_) => return Err(Failure::ConnectionLost),
    }
    let limit = MAX_HEADER_BYTES + 16 + expected.unwrap_or(crate::cli::MAX_PAYLOAD_BYTES);
    let answer = recv.read_to_end(limit).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => Failure::Malformed,
        quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) => {
            Failure::Reset(code.into_inner())
        }
        quinn::ReadToEndError::Read(_) => Failure::ConnectionLost,
    })?;
    let Ok(Some((header, used))) = ResponseHeader::decode(&answer, MAX_HEADER_BYTES) else {
        return Err(Failure::Malformed);
    };
    if header.status != Status::Ok {
        return Err(Failure::Status(header.status));
    }
    match expected {
        Some(n) if answer.len() - used != n => Err(Failure::WrongSize),
        _ => Ok(()),
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The answer carried a status other than `OK`.
    Status(Status),
    /// The answer stream was reset with this code.
    Reset(u64),
    /// The connection closed (or the stream could not be opened or written).
    ConnectionLost,
    /// No complete answer within the timeout.
    Timeout,
    /// The answer did not start with a valid response header, or was too long.
    Malformed,
    /// The answer payload did not have the expected size.
    WrongSize,
    /// The loadgen itself failed (it could not start a pacer thread).
    Loadgen,
}

impl Failure {
    /// The key under which it is counted: the status name for statuses (`OVERLOADED`), else
    /// `RESET_<stream code>`, `CONNECTION_LOST`, `TIMEOUT`, `MALFORMED_RESPONSE`,
    /// `WRONG_RESPONSE_SIZE`.
    pub fn name(self) -> String {
        match self {
            Failure::Status(status) => status.to_string(),
            Failure::Reset(code) => match StreamCode::from_code(code) {
                StreamCode::Cancelled => "RESET_CANCELLED".into(),
                StreamCode::TargetFailed => "RESET_TARGET_FAILED".into(),
                StreamCode::DeadlineExceeded => "RESET_DEADLINE_EXCEEDED".into(),
                StreamCode::ProtocolViolation => "RESET_PROTOCOL_VIOLATION".into(),
                StreamCode::Stalled => "RESET_STALLED".into(),
                StreamCode::Unknown(code) => format!("RESET({code:#x})"),
            },
            Failure::ConnectionLost => "CONNECTION_LOST".into(),
            Failure::Timeout => "TIMEOUT".into(),
            Failure::Malformed => "MALFORMED_RESPONSE".into(),
            Failure::WrongSize => "WRONG_RESPONSE_SIZE".into(),
            Failure::Loadgen => "LOADGEN_FAILURE".into(),
        }
    }

    /// Whether the failure is below the protocol (no status arrived).
    pub fn is_transport(self) -> bool {
        !matches!(self, Failure::Status(_))
    }
}

/// Whether an error name (a key of [`PhaseResult::errors`]) is a transport failure rather
/// than a status.
pub fn is_transport_error(name: &str) -> bool {
    name.starts_with("RESET")
        || matches!(
            name,
            "CONNECTION_LOST"
                | "TIMEOUT"
                | "MALFORMED_RESPONSE"
                | "WRONG_RESPONSE_SIZE"
                | "LOADGEN_FAILURE"
        )
}

/// Records the outcome of each request of a phase on one thread.
struct Recorder {
    start: Instant,
    intervals: Vec<Histogram<u64>>,
    send_lag: Histogram<u64>,
    requests: u64,
    errors: BTreeMap<String, u64>,
    live: Arc<Live>,
}

impl Recorder {
    fn new(start: Instant, duration: Duration, live: Arc<Live>) -> Self {
        let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
        Self {
            start,
            intervals: (0..seconds).map(|_| new_histogram()).collect(),
            send_lag: new_histogram(),
            requests: 0,
            errors: BTreeMap::new(),
            live,
        }
    }

    /// Records a request that started (or should have) at `started`.
    fn record(&mut self, started: Instant, latency: Duration, outcome: Result<(), Failure>) {
        self.requests += 1;
        self.live.completed.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                let second = started.saturating_duration_since(self.start).as_secs() as usize;
                let last = self.intervals.len().saturating_sub(1);
                if let Some(h) = self.intervals.get_mut(second.min(last)) {
                    h.saturating_record(micros(latency));
                }
            }
            Err(failure) => {
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                *self.errors.entry(failure.name()).or_default() += 1;
            }
        }
    }

    fn into_result(self, cpu: Option<Duration>) -> PhaseResult {
        PhaseResult {
            intervals: self.intervals,
            send_lag: self.send_lag,
            requests: self.requests,
            errors: self.errors,
            cpu,
            datagrams: (0, 0),
        }
    }
}

/// A latency in whole µs, at least 1 (the histograms' lowest value).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// A thread's connections, per route.
struct Connections {
    endpoint: quinn::Endpoint,
    gateway: Vec<quinn::Connection>,
    ingress: Vec<quinn::Connection>,
    direct: Vec<quinn::Connection>,
    /// Control streams of the gateway connections: dropping one would end its session.
    _control: Vec<(quinn::SendStream, quinn::RecvStream)>,
}

impl Connections {
    async fn open(setup: &CallerSetup) -> anyhow::Result<Connections> {
        let family_of = setup
            .gateway
            .as_ref()
            .or(setup.ingress.as_ref())
            .map(|(addr, _)| *addr)
            .or_else(|| {
                setup
                    .direct
                    .as_ref()
                    .and_then(|(addrs, _)| addrs.first().copied())
            })
            .context("nothing to connect to")?;
        let bind: SocketAddr = if family_of.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).context("binding a caller endpoint")?;
        let mut connections = Connections {
            endpoint,
            gateway: Vec::new(),
            ingress: Vec::new(),
            direct: Vec::new(),
            _control: Vec::new(),
        };
        if let Some((addr, config)) = &setup.gateway {
            // Sessions until there are enough connections: each session has one connection
            // on every gateway worker (its primary and its lanes), so the count is rounded up
            // to a whole number of sessions.
            while connections.gateway.len() < setup.connections {
                let session = connections.attach_session(*addr, config).await?;
                connections.gateway.extend(session);
            }
        }
        if let Some((addr, config)) = &setup.ingress {
            while connections.ingress.len() < setup.connections {
                let session = connections.attach_session(*addr, config).await?;
                connections.ingress.extend(session);
            }
        }
        if let Some((addrs, config)) = &setup.direct {
            for i in 0..setup.connections {
                let addr = addrs[i % addrs.len()];
                let connection = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    connect(&connections.endpoint, config, addr),
                )
                .await
                .map_err(|_| anyhow!("connecting to agent {addr}: timed out"))?
                .with_context(|| format!("connecting to agent {addr}"))?;
                connections.direct.push(connection);
            }
        }
        Ok(connections)
    }

    /// Opens a primary connection to the gateway, attaches with the caller card, and opens a
    /// lane to every other worker.
    async fn attach_session(
        &mut self,
        gateway: SocketAddr,
        config: &quinn::ClientConfig,
    ) -> anyhow::Result<Vec<quinn::Connection>> {
        let mut session_connections = Vec::new();
        let card = AgentCard::new(
            "loadgen-caller",
            "dmsc-loadgen caller",
            env!("CARGO_PKG_VERSION"),
        )
        .with_skill(Skill::new("loadgen_caller", "Load generator caller"));
        let attach = ControlFrame::Attach {
            max_concurrent: 1,
            card: card.to_json(),
        };
        let (primary, control, answer) = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let primary = connect(&self.endpoint, config, gateway).await?;
            let (control, answer) = open_control(&primary, &attach).await?;
            anyhow::Ok((primary, control, answer))
        })
        .await
        .map_err(|_| anyhow!("attaching to the gateway {gateway}: timed out"))?
        .with_context(|| format!("attaching to the gateway {gateway}"))?;
        let (session, lane_token, worker, lanes) = match answer {
            ControlFrame::AttachOk {
                session,
                lane_token,
                worker,
                lanes,
                ..
            } => (session, lane_token, worker, lanes),
            ControlFrame::AttachRefused { refusal, reason } => {
                bail!("the gateway refused the callers' ATTACH: {refusal:?}: {reason}")
            }
            other => bail!("unexpected answer to ATTACH: {other:?}"),
        };
        session_connections.push(primary);
        self._control.push(control);
        let lane = ControlFrame::Lane {
            session,
            lane_token,
        };
        for (index, address) in lanes.iter().enumerate() {
            if index as u64 == worker {
                continue;
            }
            let addr: SocketAddr = address
                .parse()
                .with_context(|| format!("lane address {address:?} from the gateway"))?;
            match self.open_lane(addr, config, &lane).await {
                Ok((connection, control)) => {
                    session_connections.push(connection);
                    self._control.push(control);
                }
                Err(e) => eprintln!(
                    "dmsc-loadgen: warning: no lane to gateway worker {index} ({e:#}); requests \
                     reach it only through hand-offs"
                ),
            }
        }
        Ok(session_connections)
    }

    async fn open_lane(
        &self,
        addr: SocketAddr,
        config: &quinn::ClientConfig,
        lane: &ControlFrame,
    ) -> anyhow::Result<(quinn::Connection, (quinn::SendStream, quinn::RecvStream))> {
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 1;
        loop {
            let result = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let connection = connect(&self.endpoint, config, addr).await?;
                let (control, answer) = open_control(&connection, lane).await?;
                anyhow::Ok((connection, control, answer))
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("timed out")));
            let error = match result {
                Ok((connection, control, ControlFrame::LaneOk { .. })) => {
                    return Ok((connection, control))
                }
                Ok((_, _, ControlFrame::AttachRefused { refusal, reason }))
                    if refusal != Refusal::UnknownSession =>
                {
                    bail!("LANE refused: {refusal:?}: {reason}")
                }
                Ok((_, _, other)) => anyhow!("unexpected answer to LANE: {other:?}"),
                Err(e) => e,
            };
            if attempt == LANE_ATTEMPTS {
                return Err(error.context(format!("after {attempt} attempts")));
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    fn route(&self, route: Route) -> &[quinn::Connection] {
        match route {
            Route::Gateway => &self.gateway,
            Route::TwoGateways => &self.ingress,
            Route::Direct => &self.direct,
        }
    }

    async fn close(&self) {
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
) -> anyhow::Result<quinn::Connection> {
    Ok(endpoint
        .connect_with(config.clone(), addr, SERVER_NAME)?
        .await?)
}

/// Opens the control stream, sends `frame`, and returns the stream with the first known frame
/// of the answer.
pub(crate) async fn open_control(
    connection: &quinn::Connection,
    frame: &ControlFrame,
) -> anyhow::Result<((quinn::SendStream, quinn::RecvStream), ControlFrame)> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&frame.to_bytes()?).await?;
    let mut frames = FrameBuffer::new(MAX_CONTROL_FRAME_BYTES);
    loop {
        match frames.next_frame()? {
            Some(ControlFrame::Unknown { .. }) => continue,
            Some(answer) => return Ok(((send, recv), answer)),
            None => {}
        }
        let chunk = recv
            .read_chunk(64 * 1024, true)
            .await?
            .ok_or_else(|| anyhow!("the control stream ended"))?;
        frames.extend(&chunk.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for total in [0, 1, 2, 3, 64, 65, 1000] {
            for parts in 1..=5 {
                let shares: Vec<usize> = (0..parts).map(|i| share(total, parts, i)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.unwrap() - min.unwrap() <= 1, "{shares:?}");
            }
        }
    }

    #[test]
    fn failures_have_stable_names_and_kinds() {
        assert_eq!(Failure::Status(Status::Overloaded).name(), "OVERLOADED");
        assert!(!Failure::Status(Status::Overloaded).is_transport());
        assert_eq!(Failure::Reset(2).name(), "RESET_TARGET_FAILED");
        assert_eq!(Failure::Reset(0x99).name(), "RESET(0x99)");
        for failure in [
            Failure::Reset(1),
            Failure::Reset(0x99),
            Failure::ConnectionLost,
            Failure::Timeout,
            Failure::Malformed,
            Failure::WrongSize,
            Failure::Loadgen,
        ] {
            assert!(failure.is_transport());
            assert!(is_transport_error(&failure.name()), "{failure:?}");
        }
        for status in Status::ALL {
            assert!(!is_transport_error(&Failure::Status(status).name()));
        }
    }

    #[test]
    fn the_recorder_files_latencies_by_second_and_counts_failures() {
        let live = Arc::new(Live::default());
        let start = Instant::now();
        let mut r = Recorder::new(start, Duration::from_millis(2500), live.clone());
        assert_eq!(r.intervals.len(), 3);
        r.record(start, Duration::from_micros(100), Ok(()));
        r.record(
            start + Duration::from_millis(2100),
            Duration::from_micros(300),
            Ok(()),
        );
        r.record(
            start + Duration::from_millis(1500),
            Duration::from_micros(5),
            Err(Failure::Timeout),
        );
        let result = r.into_result(None);
        assert_eq!(result.requests, 3);
        assert_eq!(result.intervals[0].len(), 1);
        assert_eq!(result.intervals[1].len(), 0);
        assert_eq!(result.intervals[2].len(), 1);
        assert_eq!(result.errors.get("TIMEOUT"), Some(&1));
        assert_eq!(live.completed.load(Ordering::Relaxed), 3);
        assert_eq!(live.failed.load(Ordering::Relaxed), 1);
    }
}
