//! The gateway's side of `dmsc-ctl/1` (`docs/CONTROL.md` section 6): a session with the
//! control plane on a thread of its own, off the worker cores.
//!
//! The client says which table it holds, applies what the control plane pushes (decoding and
//! validating it on this thread, never on a worker), installs it on every worker through a
//! [`ControlLink`] and acknowledges only once every worker holds it. It saves each installed
//! table to disk, so a gateway restarted while the control plane is down starts from its last
//! good table (fail static), and it reconnects with backoff after any failure.
//!
//! Start-up order: [`ControlClient::start`] first (it connects at once), then
//! [`ControlClient::wait_first`] for the table to start the gateway with, then
//! [`ControlClient::attach`] with the running gateway's [`ControlLink`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dmsc_identity::{Credentials, PrincipalKind, Resumption, SpiffeVerifier};
use dmsc_protocol::ctl::{
    self, CloseCode, Frame, Hello, NackCode, Push, PushBody, Rejection, IDLE_TIMEOUT,
    INSTALL_TIMEOUT, KEEP_ALIVE, MAX_BACKOFF, MIN_BACKOFF,
};
use dmsc_protocol::table::sections::{apply_delta, DeltaError};
use dmsc_protocol::table::{Generation, Table, TableError};
use rustls::pki_types::CertificateDer;

use crate::core::DomainRoutes;
use crate::msg::{AgentInfo, AttachEvent, WorkerMsg};
use crate::routing::TableGeneration;
use crate::worker::Mailboxes;
use dmsc_protocol::domain::{self as ctl_domain, AgentChange, AgentReport, Report, Skill};

/// How often the gateway reports its agents (only when they changed).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The file, under the state directory, holding the last table installed.
pub const SAVED_TABLE: &str = "table/last-good.dmsct";

/// Where and as whom to reach the control plane.
#[derive(Debug)]
pub struct ControlSettings {
    /// The control plane's `dmsc-ctl/1` address.
    pub addr: SocketAddr,
    /// The trust domain (the control plane must be `spiffe://<domain>/control`).
    pub domain: String,
    /// This gateway's id, as in its certificate.
    pub gateway_id: String,
    /// The gateway's certificate and key (the same as for agents).
    pub credentials: Credentials,
    /// The domain CA certificates.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The state directory; the last good table is saved under it ([`SAVED_TABLE`]).
    pub state_dir: PathBuf,
}

impl ControlSettings {
    /// The settings of a gateway with `config` (its domain, id and state directory) and
    /// `identity`, reaching the control plane at `addr`.
    pub fn for_gateway(
        addr: SocketAddr,
        config: &crate::Config,
        identity: &crate::GatewayIdentity,
    ) -> Self {
        Self {
            addr,
            domain: config.domain.clone(),
            gateway_id: config.gateway_id.clone(),
            credentials: Credentials {
                cert_chain: identity.cert_chain.clone(),
                private_key: identity.private_key.clone_key(),
            },
            trust_anchors: identity.trust_anchors.clone(),
            state_dir: config.state_dir.clone(),
        }
    }
}

/// Why the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The TLS configuration could not be built.
    #[error("control-plane TLS setup: {0}")]
    Tls(#[from] dmsc_identity::TlsError),
    /// The client's thread or runtime could not be started.
    #[error("starting the control-plane client: {0}")]
    Start(#[from] std::io::Error),
}

/// What the gateway's admin endpoint shows of the session. Owned by the client, updated by
/// its thread; the gateway's admin thread reads it once [`ControlClient::attach`] has put it
/// in the gateway's slot.
#[derive(Debug, Default)]
pub struct ControlState {
    connected: AtomicBool,
    sessions: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    /// `REPORT` frames sent, agents the control plane refused, `ROUTES` installed.
    reports: AtomicU64,
    rejected: AtomicU64,
    routes: AtomicU64,
}

impl ControlState {
    /// The session's figures for one scrape.
    pub(crate) fn figures(&self) -> ControlFigures {
        ControlFigures {
            connected: self.connected.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            reports: self.reports.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            routes: self.routes.load(Ordering::Relaxed),
        }
    }
}

/// Where a gateway finds its control client's [`ControlState`]: empty when the gateway runs
/// without a control plane (then no `dmsc_control_*` series are served).
pub(crate) type ControlSlot = Arc<std::sync::OnceLock<Arc<ControlState>>>;

/// A copy of [`ControlState`] for one scrape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ControlFigures {
    pub(crate) connected: bool,
    pub(crate) sessions: u64,
    pub(crate) acks: u64,
    pub(crate) nacks: u64,
    pub(crate) reports: u64,
    pub(crate) rejected: u64,
    pub(crate) routes: u64,
}

/// Why a table could not be installed on every worker.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Some worker did not take the table in time (it is stopping, or its inbox is full).
    #[error("{missing} of {workers} workers did not take the table within {timeout:?}")]
    Timeout {
        /// Workers that had not confirmed.
        missing: usize,
        /// All workers.
        workers: usize,
        /// The time allowed.
        timeout: Duration,
    },
}

/// What the control client needs of a running gateway: installing tables on every worker and
/// reading its agents. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlLink {
    pub(crate) mailboxes: Arc<Mailboxes>,
    pub(crate) workers: usize,
    pub(crate) installs: Arc<AtomicU64>,
    pub(crate) snapshots: Arc<crate::admin::SnapshotCache>,
    pub(crate) state: ControlSlot,
    /// The compiled table every worker holds (what the gateway started with, then each one
    /// installed through a link).
    pub(crate) current: Arc<Mutex<Option<Generation>>>,
    /// The gateway's shared state: its attach events and trunk addresses.
    pub(crate) shared: Arc<crate::core::Shared>,
}

impl ControlLink {
    /// Installs `table` on every worker and returns once each has it (between its event-loop
    /// iterations; requests already routed finish on the table they started with).
    pub fn install(&self, table: Arc<Table>, timeout: Duration) -> Result<(), InstallError> {
        let generation = table.generation();
        if *self.current.lock().unwrap_or_else(PoisonError::into_inner) == Some(generation) {
            return Ok(());
        }
        let result = self.install_on_workers(table, timeout);
        // After a timeout, which table each worker ends on is unknown: the next install of any
        // table goes to every worker.
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            result.is_ok().then_some(generation);
        result
    }

    fn install_on_workers(&self, table: Arc<Table>, timeout: Duration) -> Result<(), InstallError> {
        let count = self.installs.fetch_add(1, Ordering::Relaxed) + 1;
        let generation = TableGeneration::compiled(crate::routing::Generation(count), table);
        let got = self.on_every_worker(timeout, |done| WorkerMsg::Install {
            table: generation.clone(),
            done: Some(done),
        });
        if got == self.workers {
            Ok(())
        } else {
            Err(InstallError::Timeout {
                missing: self.workers - got,
                workers: self.workers,
                timeout,
            })
        }
    }

    /// Installs domain routes on every worker; returns once each has them (or `timeout`).
    pub fn install_routes(&self, routes: Arc<DomainRoutes>, timeout: Duration) -> bool {
        let got = self.on_every_worker(timeout, |done| WorkerMsg::Routes {
            routes: routes.clone(),
            done: Some(done),
        });
        got == self.workers
    }

    /// Sends every worker the message `make` builds around a confirmation sender, and waits
    /// until `timeout` for the workers to confirm (between their iterations); returns how many
    /// did.
    fn on_every_worker(
        &self,
        timeout: Duration,
        make: impl Fn(crossbeam_channel::Sender<usize>) -> WorkerMsg,
    ) -> usize {
        let (done, confirmed) = crossbeam_channel::bounded(self.workers);
        let deadline = Instant::now() + timeout;
        let mut sent = 0;
        for w in 0..self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.mailboxes.senders[w]
                .send_timeout(make(done.clone()), left)
                .is_ok()
            {
                let _ = self.mailboxes.wakers[w].wake();
                sent += 1;
            }
        }
        drop(done);
        let mut got = 0;
        while got < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            match confirmed.recv_timeout(left) {
                Ok(_) => got += 1,
                Err(_) => break,
            }
        }
        got
    }

    /// Starts the flow of attach events to the control client, then has every worker report
    /// the agents it holds, so that none attached before is missed (an agent reported twice is
    /// the same `Up`).
    fn start_reporting(&self) {
        if self.shared.reporting.swap(true, Ordering::Relaxed) {
            return;
        }
        self.request_agents();
    }

    /// Has every worker send an `Up` for each agent it holds.
    fn request_agents(&self) {
        for w in 0..self.workers {
            let msg = WorkerMsg::ReportAgents;
            if self.mailboxes.senders[w]
                .send_timeout(msg, Duration::from_secs(1))
                .is_ok()
            {
                let _ = self.mailboxes.wakers[w].wake();
            }
        }
    }

    /// What the gateway tells the control plane of itself every `STATUS_INTERVAL`: its agents
    /// (`STATUS`) and its trunks and routes (`TRUNKS`), from one reading of every worker.
    pub fn figures(&self) -> (ctl::Status, ctl_domain::Trunks) {
        let snaps = crate::admin::snapshots(&self.mailboxes, &self.snapshots);
        (status_of(&snaps), trunks_of(&snaps))
    }
}

/// The trunk figures of every worker, summed per peer, and the routes every worker holds.
fn trunks_of(snaps: &[crate::metrics::WorkerSnapshot]) -> ctl_domain::Trunks {
    let mut per_peer: std::collections::BTreeMap<String, ctl_domain::TrunkFigures> =
        std::collections::BTreeMap::new();
    // The routes every worker holds: the lowest version (0 unless all hold some).
    let mut routes = snaps.first().and_then(|s| s.routes).unwrap_or((0, 0));
    for s in snaps {
        routes = match s.routes {
            Some(r) if r.0 == routes.0 => (r.0, r.1.min(routes.1)),
            _ => (0, 0),
        };
        for t in &s.trunks {
            let f = per_peer
                .entry(t.gateway.clone())
                .or_insert_with(|| ctl_domain::TrunkFigures {
                    gateway: t.gateway.clone(),
                    ..Default::default()
                });
            f.connected += u64::from(t.connected);
            f.requests += t.requests;
            f.errors += t.errors;
        }
    }
    ctl_domain::Trunks {
        routes_epoch: routes.0,
        routes_version: routes.1,
        trunks: per_peer.into_values().collect(),
    }
}

/// The agents attached, as reported in `STATUS`.
fn status_of(snaps: &[crate::metrics::WorkerSnapshot]) -> ctl::Status {
    let mut identities: Vec<String> = Vec::new();
    let mut capabilities = std::collections::BTreeSet::new();
    let mut agents = 0u64;
    for s in snaps {
        for a in &s.agents {
            agents += 1;
            identities.push(a.identity.clone());
            capabilities.extend(a.capabilities.iter().cloned());
        }
    }
    identities.sort_unstable();
    identities.dedup();
    identities.truncate(ctl::MAX_STATUS_AGENTS);
    // Keep the frame well inside its limit whatever the identities' lengths.
    let mut bytes = 0;
    let fit = identities
        .iter()
        .take_while(|id| {
            bytes += id.len() + 2;
            bytes <= ctl::MAX_STATUS_IDENTITY_BYTES
        })
        .count();
    identities.truncate(fit);
    ctl::Status {
        agents,
        capabilities: capabilities.len() as u64,
        identities,
    }
}

/// The running client. See the module documentation for the start-up order.
#[derive(Debug)]
pub struct ControlClient {
    first: crossbeam_channel::Receiver<Arc<Table>>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The session's counters (the runner updates the same ones).
    state: Arc<ControlState>,
    link: tokio::sync::watch::Sender<Option<ControlLink>>,
    saved: Option<Arc<Table>>,
}

impl ControlClient {
    /// Loads the saved table (if any, and valid for this domain) and starts the session
    /// thread, which connects at once.
    pub fn start(settings: ControlSettings) -> Result<Self, ControlError> {
        let saved = match load_saved(&settings.state_dir, &settings.domain) {
            Ok(t) => t.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the saved table");
                None
            }
        };
        let verifier = Arc::new(SpiffeVerifier::new(
            &settings.trust_anchors,
            &[PrincipalKind::Control],
            &[settings.domain.as_str()],
        )?);
        let crypto = dmsc_identity::client_config(
            dmsc_protocol::ALPN_CONTROL,
            settings.credentials.clone(),
            verifier,
            Resumption::Allowed,
        )?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
        transport.max_concurrent_bidi_streams(0u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        client.transport_config(Arc::new(transport));

        let (first_tx, first) = crossbeam_channel::bounded(1);
        let (link, link_rx) = tokio::sync::watch::channel(None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let state = Arc::new(ControlState::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let runner = Runner {
            stop: stop_rx,
            settings,
            client,
            held: saved.clone(),
            first: Some(first_tx),
            link: link_rx,
            state: state.clone(),
            nonce: 0,
            attached: std::collections::BTreeMap::new(),
            routes: None,
            routes_installed: false,
            retired: None,
            dropped_seen: 0,
            rejection_logged: None,
            rejections_held: 0,
        };
        let thread = std::thread::Builder::new()
            .name("dmsc-control".into())
            .spawn(move || runtime.block_on(runner.run()))?;
        Ok(Self {
            first,
            state,
            link,
            saved,
            stop,
            thread: Some(thread),
        })
    }

    /// The last good table saved on disk, if there is one.
    pub fn saved(&self) -> Option<&Arc<Table>> {
        self.saved.as_ref()
    }

    /// Waits up to `timeout` for the first table the control plane pushes (validated, not yet
    /// installed or acknowledged: the gateway is started with it, then [`ControlClient::attach`]
    /// acknowledges it).
    pub fn wait_first(&self, timeout: Duration) -> Option<Arc<Table>> {
        self.first.recv_timeout(timeout).ok()
    }

    /// Closes the session with `SHUTTING_DOWN` (so the control plane shows the gateway gone at
    /// once) and stops the client; waits at most a second.
    pub fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Hands the client the running gateway: from now on pushes are installed on its workers.
    /// The gateway's admin endpoint serves this client's session metrics from now on.
    pub fn attach(&self, link: ControlLink) {
        let _ = link.state.set(self.state.clone());
        link.start_reporting();
        let _ = self.link.send(Some(link));
    }
}

/// Reads the saved table; `Ok(None)` when there is none.
pub fn load_saved(state_dir: &Path, domain: &str) -> Result<Option<Table>, TableError> {
    let path = state_dir.join(SAVED_TABLE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved table");
            return Ok(None);
        }
    };
    let table = Table::decode(&bytes)?;
    table.expect_domain(domain)?;
    Ok(Some(table))
}

/// Writes `table` to the state directory atomically (temporary file, then rename).
fn save(state_dir: &Path, table: &Table) -> std::io::Result<()> {
    let path = state_dir.join(SAVED_TABLE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(table.encoded())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}

struct Runner {
    settings: ControlSettings,
    client: quinn::ClientConfig,
    /// The table the gateway serves (or will start with).
    held: Option<Arc<Table>>,
    /// Where the first pushed table goes before a gateway is attached.
    first: Option<crossbeam_channel::Sender<Arc<Table>>>,
    link: tokio::sync::watch::Receiver<Option<ControlLink>>,
    /// The session's counters, shown by the gateway once attached.
    state: Arc<ControlState>,
    /// The last push nonce seen on the current session.
    nonce: u64,
    /// Set when the gateway stops: close the session with `SHUTTING_DOWN`.
    stop: tokio::sync::watch::Receiver<bool>,
    /// The agents attached, by session, as reported (kept across sessions: a new session
    /// starts with all of them).
    attached: std::collections::BTreeMap<u64, AgentReport>,
    /// The last domain routes received, and whether every worker holds them.
    routes: Option<Arc<DomainRoutes>>,
    routes_installed: bool,
    /// The routes the workers held before `routes`, kept until every worker holds the new ones.
    retired: Option<Arc<DomainRoutes>>,
    /// `attach_events_dropped` when last looked at.
    dropped_seen: u64,
    /// When a refused agent was last logged, and the refusals not logged since.
    rejection_logged: Option<Instant>,
    rejections_held: u64,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {}", match .0 { quinn::WriteError::ConnectionLost(c) => format!("connection lost: {c}"), e => e.to_string() })]
    Write(#[from] quinn::WriteError),
    #[error("stream: {}", match .0 { quinn::ReadError::ConnectionLost(c) => format!("connection lost: {c}"), e => e.to_string() })]
    Read(#[from] quinn::ReadError),
    #[error("the control plane closed the session stream")]
    Finished,
    #[error("closed by us: {code:?}: {reason}")]
    Protocol { code: CloseCode, reason: String },
}

impl Runner {
    async fn run(mut self) {
        let bind: SocketAddr = if self.settings.addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = match quinn::Endpoint::client(bind) {
            Ok(mut e) => {
                e.set_default_client_config(self.client.clone());
                e
            }
            Err(e) => {
                tracing::error!(error = %e, "control-plane client cannot bind a UDP socket");
                return;
            }
        };
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        loop {
            let mut answered = false;
            let result = self.session(&endpoint, &mut answered).await;
            self.state.connected.store(false, Ordering::Relaxed);
            if *self.stop.borrow() {
                // Let the endpoint send the CONNECTION_CLOSE.
                endpoint.wait_idle().await;
                return;
            }
            // A session that was up, or the first attempt, is worth a warning; the retries of
            // an outage are not.
            match &result {
                Err(e) if answered || failures == 0 => tracing::warn!(
                    addr = %self.settings.addr,
                    error = %e,
                    "control-plane session ended; serving the installed table and reconnecting"
                ),
                Err(e) => tracing::debug!(error = %e, "control-plane session attempt failed"),
                Ok(()) => {}
            }
            if answered {
                backoff = MIN_BACKOFF;
                failures = 1;
            } else {
                failures = failures.saturating_add(1);
            }
            let jitter = 0.5 + 0.5 * (random_u32() as f64 / u32::MAX as f64);
            let pause = tokio::time::sleep(backoff.mul_f64(jitter));
            tokio::pin!(pause);
            let mut absorb = tokio::time::interval(REPORT_INTERVAL);
            loop {
                let wake = tokio::select! {
                    _ = &mut pause => Wake::Read(None),
                    _ = self.stop.wait_for(|stop| *stop) => Wake::Stop,
                    _ = absorb.tick() => Wake::Report,
                };
                match wake {
                    Wake::Stop => return,
                    // Between sessions attach events are still taken in (the next session
                    // starts with a full report of them), so the channel never fills.
                    Wake::Report => {
                        let link = self.link.borrow().clone();
                        if let Some(link) = link {
                            self.drain_events(&link);
                        }
                    }
                    _ => break,
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session(
        &mut self,
        endpoint: &quinn::Endpoint,
        answered: &mut bool,
    ) -> Result<(), SessionError> {
        let conn = endpoint.connect(self.settings.addr, "localhost")?.await?;
        let result = self.converse(&conn, answered).await;
        if let Err(SessionError::Protocol { code, reason }) = &result {
            conn.close(code.code().into(), reason.as_bytes());
        }
        result
    }

    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        answered: &mut bool,
    ) -> Result<(), SessionError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            version: ctl::VERSION,
            gateway_id: self.settings.gateway_id.clone(),
            domain: self.settings.domain.clone(),
            held: self.held.as_ref().map(|t| t.generation()),
            sections: self
                .held
                .as_ref()
                .map(|t| t.section_versions())
                .unwrap_or_default(),
        };
        let mut out = Vec::new();
        ctl::encode_frame(&Frame::Hello(hello), &mut out);
        send.write_all(&out).await?;
        self.nonce = 0;
        let state = &self.state;
        state.connected.store(true, Ordering::Relaxed);
        state.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(addr = %self.settings.addr, "connected to the control plane; HELLO sent");
        let mut established = false;

        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut last_status: Option<ctl::Status> = None;
        let mut last_trunks: Option<ctl_domain::Trunks> = None;
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        let mut report_tick = tokio::time::interval(REPORT_INTERVAL);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The full report goes at the first report tick with the gateway running (right after
        // HELLO when it already runs); the changes after it.
        let mut reported = false;
        loop {
            // Frames already buffered first.
            match ctl::decode_frame(&buf) {
                Err(e) => {
                    return Err(SessionError::Protocol {
                        code: e.close_code(),
                        reason: e.to_string(),
                    })
                }
                Ok(Some((frame, used))) => {
                    let reply = self.on_frame(frame).await?;
                    buf.drain(..used);
                    if let Some(reply) = reply {
                        send.write_all(&reply).await?;
                        *answered = true;
                        if !established {
                            established = true;
                            tracing::info!(addr = %self.settings.addr, "in session with the control plane");
                        }
                    }
                    continue;
                }
                Ok(None) => {}
            }
            let wake = tokio::select! {
                _ = self.stop.wait_for(|stop| *stop) => Wake::Stop,
                read = recv.read(&mut chunk) => Wake::Read(read?),
                _ = report_tick.tick() => Wake::Report,
                _ = tick.tick() => Wake::Status,
            };
            match wake {
                Wake::Stop => {
                    return Err(SessionError::Protocol {
                        code: CloseCode::ShuttingDown,
                        reason: "gateway stopping".into(),
                    });
                }
                Wake::Read(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                Wake::Read(None) => return Err(SessionError::Finished),
                Wake::Report => {
                    let link = self.link.borrow().clone();
                    let Some(link) = link else { continue };
                    if !self.routes_installed {
                        if let Some(routes) = self.routes.clone() {
                            self.install_routes(&link, routes).await;
                        }
                    }
                    link.start_reporting();
                    let dropped = link.shared.attach_events_dropped.load(Ordering::Relaxed);
                    if dropped != self.dropped_seen {
                        // Changes were lost: start over from what the workers hold now.
                        tracing::warn!(
                            dropped = dropped - self.dropped_seen,
                            "attach events were dropped; sending the control plane a full report"
                        );
                        self.dropped_seen = dropped;
                        self.attached.clear();
                        link.request_agents();
                        reported = false;
                    }
                    let changes = self.drain_events(&link);
                    let frames = if reported {
                        report_frames(false, Vec::new(), changes)
                    } else {
                        reported = true;
                        let all = self
                            .attached
                            .values()
                            .cloned()
                            .map(AgentChange::Up)
                            .collect();
                        report_frames(true, link.shared.trunk_addrs.clone(), all)
                    };
                    for frame in frames {
                        let mut out = Vec::new();
                        ctl::encode_frame(&Frame::Report(frame), &mut out);
                        send.write_all(&out).await?;
                        self.state.reports.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Wake::Status => {
                    let link = self.link.borrow().clone();
                    if let Some(link) = link {
                        let (status, trunks) = tokio::task::spawn_blocking(move || link.figures())
                            .await
                            .unwrap_or_default();
                        if last_trunks.as_ref() != Some(&trunks) {
                            let mut out = Vec::new();
                            ctl::encode_frame(&Frame::Trunks(trunks.clone()), &mut out);
                            send.write_all(&out).await?;
                            last_trunks = Some(trunks);
                        }
                        if last_status.as_ref() != Some(&status) {
                            let mut out = Vec::new();
                            ctl::encode_frame(&Frame::Status(status.clone()), &mut out);
                            send.write_all(&out).await?;
                            last_status = Some(status);
                        }
                    }
                }
            }
        }
    }

    /// Handles one frame from the control plane; returns the answer to send.
    async fn on_frame(&mut self, frame: Frame<'_>) -> Result<Option<Vec<u8>>, SessionError> {
        let push = match frame {
            Frame::Push(push) => push,
            Frame::Unknown(_) => return Ok(None),
            Frame::Routes(routes) => {
                let own = self.settings.gateway_id.clone();
                let routes = Arc::new(DomainRoutes::new(routes, &own));
                tracing::debug!(version = ?routes.version(), remote = routes.remote_capabilities(), "domain routes received");
                // The routes the workers hold now are freed here once they all hold the new
                // ones, not on a worker.
                if self.retired.is_none() {
                    self.retired = self.routes.take();
                }
                self.routes = Some(routes.clone());
                self.routes_installed = false;
                let link = self.link.borrow().clone();
                if let Some(link) = link {
                    self.install_routes(&link, routes).await;
                }
                return Ok(None);
            }
            Frame::ReportRejected(r) => {
                self.state.rejected.fetch_add(1, Ordering::Relaxed);
                // A storm of refused agents is one line per interval (all are counted).
                let now = Instant::now();
                if self
                    .rejection_logged
                    .is_none_or(|t| now.duration_since(t) >= REJECTION_LOG_INTERVAL)
                {
                    tracing::warn!(
                        session = r.session,
                        reason = %r.reason,
                        since_last = self.rejections_held,
                        "the control plane refused a reported agent; it is served on this gateway only"
                    );
                    self.rejection_logged = Some(now);
                    self.rejections_held = 0;
                } else {
                    self.rejections_held += 1;
                }
                return Ok(None);
            }
            other => {
                return Err(SessionError::Protocol {
                    code: CloseCode::UnexpectedFrame,
                    reason: format!("{} from the control plane", frame_name(&other)),
                })
            }
        };
        if push.nonce <= self.nonce {
            return Err(SessionError::Protocol {
                code: CloseCode::UnexpectedFrame,
                reason: format!("push nonce {} after {}", push.nonce, self.nonce),
            });
        }
        self.nonce = push.nonce;
        let (nonce, generation) = (push.nonce, push.generation);
        let answer = match self.apply(push) {
            Ok(table) if self.is_installed(&table) => {
                self.state.acks.fetch_add(1, Ordering::Relaxed);
                Frame::Ack { nonce, generation }
            }
            Ok(table) => match self.install(table.clone()).await {
                Ok(()) => {
                    if let Err(e) = save(&self.settings.state_dir, &table) {
                        tracing::warn!(error = %e, "cannot save the table; a restart without the control plane would not find it");
                    }
                    if self.held.as_ref().map(|t| t.generation()) != Some(generation) {
                        tracing::info!(%generation, "table installed on every worker");
                    }
                    self.held = Some(table);
                    self.state.acks.fetch_add(1, Ordering::Relaxed);
                    Frame::Ack { nonce, generation }
                }
                Err(e) => nack(self, nonce, generation, NackCode::InstallFailed, 0, &e),
            },
            Err((code, rejections)) => {
                tracing::warn!(%generation, code = code.as_str(), ?rejections, "push rejected; keeping the installed table");
                self.state.nacks.fetch_add(1, Ordering::Relaxed);
                Frame::Nack {
                    nonce,
                    generation,
                    code,
                    rejections,
                }
            }
        };
        let mut out = Vec::new();
        ctl::encode_frame(&answer, &mut out);
        return Ok(Some(out));

        fn nack(
            runner: &Runner,
            nonce: u64,
            generation: Generation,
            code: NackCode,
            resource: u64,
            e: &dyn std::fmt::Display,
        ) -> Frame<'static> {
            tracing::warn!(%generation, error = %e, "push not installed; keeping the installed table");
            runner.state.nacks.fetch_add(1, Ordering::Relaxed);
            Frame::Nack {
                nonce,
                generation,
                code,
                rejections: vec![Rejection {
                    resource,
                    reason: ctl::reason(&e.to_string()),
                }],
            }
        }
    }

    /// Installs `routes` on every worker of the gateway behind `link`.
    async fn install_routes(&mut self, link: &ControlLink, routes: Arc<DomainRoutes>) {
        let installing = link.clone();
        let done =
            tokio::task::spawn_blocking(move || installing.install_routes(routes, INSTALL_TIMEOUT))
                .await
                .unwrap_or(false);
        self.routes_installed = done;
        if done {
            self.retired = None;
            self.state.routes.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!("domain routes not installed on every worker in time; retrying");
        }
    }

    /// Takes the attach events the workers sent since the last call: the agents kept in
    /// `attached` are updated, and the changes returned (an agent's last state only).
    fn drain_events(&mut self, link: &ControlLink) -> Vec<AgentChange> {
        let mut changed: std::collections::BTreeMap<u64, bool> = std::collections::BTreeMap::new();
        let events = &link.shared.attach_events.1;
        for _ in 0..crate::msg::ATTACH_EVENTS {
            let Ok(event) = events.try_recv() else {
                break;
            };
            match event {
                AttachEvent::Up(info) => {
                    self.attached.insert(info.session.0, agent_report(&info));
                    changed.insert(info.session.0, true);
                }
                AttachEvent::Down(session) => {
                    if self.attached.remove(&session.0).is_some() {
                        changed.insert(session.0, false);
                    }
                }
            }
        }
        changed
            .into_iter()
            .map(|(session, up)| match self.attached.get(&session) {
                Some(report) if up => AgentChange::Up(report.clone()),
                _ => AgentChange::Down { session },
            })
            .collect()
    }

    /// Whether the attached gateway already serves `table` (a resync after a reconnect).
    fn is_installed(&self, table: &Table) -> bool {
        self.link.borrow().as_ref().is_some_and(|link| {
            *link.current.lock().unwrap_or_else(PoisonError::into_inner) == Some(table.generation())
        })
    }

    /// Builds the pushed table: decoded, validated, for this domain, the generation announced.
    fn apply(&self, push: Push<'_>) -> Result<Arc<Table>, (NackCode, Vec<Rejection>)> {
        let reject = |code, resource, reason: &dyn std::fmt::Display| {
            (
                code,
                vec![Rejection {
                    resource,
                    reason: ctl::reason(&reason.to_string()),
                }],
            )
        };
        // Already held: acknowledged at once, whatever the body (CONTROL.md 6.7, step 1).
        if let Some(held) = self
            .held
            .as_ref()
            .filter(|t| t.generation() == push.generation)
        {
            return Ok(held.clone());
        }
        let table = match push.body {
            PushBody::Snapshot(bytes) => Table::decode(bytes)
                .map_err(|e| reject(NackCode::Invalid, e.section_type().unwrap_or(0), &e))?,
            PushBody::Delta {
                base,
                upserts,
                removes,
            } => {
                let Some(held) = self.held.as_ref().filter(|t| t.generation() == base) else {
                    let held = self.held.as_ref().map(|t| t.generation().to_string());
                    return Err(reject(
                        NackCode::BaseMismatch,
                        0,
                        &format!(
                            "delta against {base}, but the gateway holds {}",
                            held.as_deref().unwrap_or("nothing")
                        ),
                    ));
                };
                apply_delta(held, &upserts, &removes).map_err(|e| {
                    let resource = match &e {
                        DeltaError::Duplicate(t) | DeltaError::RemovesAbsent(t) => *t,
                        // The section the error names; else the only section changed; else
                        // the table as a whole.
                        DeltaError::Table(t) => t
                            .section_type()
                            .or((upserts.len() == 1).then(|| upserts[0].ty))
                            .unwrap_or(0),
                    };
                    reject(NackCode::Invalid, resource, &e)
                })?
            }
        };
        if let Err(e) = table.expect_domain(&self.settings.domain) {
            return Err(reject(NackCode::WrongDomain, 0, &e));
        }
        if table.generation() != push.generation {
            return Err(reject(
                NackCode::GenerationMismatch,
                0,
                &format!(
                    "the table built is {}, the push announced {}",
                    table.generation(),
                    push.generation
                ),
            ));
        }
        Ok(Arc::new(table))
    }

    /// Installs on every worker of the attached gateway. Before a gateway is attached, offers
    /// the table as the one to start with and waits for the gateway.
    async fn install(&mut self, table: Arc<Table>) -> Result<(), InstallError> {
        if self.link.borrow().is_none() {
            if let Some(first) = self.first.take() {
                let _ = first.try_send(table.clone());
            }
            // The gateway starts (with this table or the saved one) and attaches.
            let _ = self.link.wait_for(Option::is_some).await;
        }
        let link = self.link.borrow().clone();
        let Some(link) = link else {
            return Ok(());
        };
        let installing = link.clone();
        let result =
            tokio::task::spawn_blocking(move || installing.install(table, INSTALL_TIMEOUT))
                .await
                .unwrap_or(Err(InstallError::Timeout {
                    missing: 0,
                    workers: 0,
                    timeout: INSTALL_TIMEOUT,
                }));
        if result.is_err() {
            // Some workers may take the new table late: queue the last good one behind it on
            // every worker, so they all end on the table the gateway reports it holds.
            if let Some(held) = self.held.clone() {
                let _ =
                    tokio::task::spawn_blocking(move || link.install(held, INSTALL_TIMEOUT)).await;
            }
        }
        result
    }
}

fn frame_name(frame: &Frame<'_>) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Push(_) => "PUSH",
        Frame::Ack { .. } => "ACK",
        Frame::Nack { .. } => "NACK",
        Frame::Status(_) => "STATUS",
        Frame::Report(_) => "REPORT",
        Frame::Routes(_) => "ROUTES",
        Frame::Trunks(_) => "TRUNKS",
        Frame::ReportRejected(_) => "REPORT_REJECTED",
        Frame::Unknown(_) => "an extension frame",
    }
}

/// Shortest interval between two log lines about agents the control plane refused.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What woke the session loop.
enum Wake {
    Stop,
    Read(Option<usize>),
    Report,
    Status,
}

/// How often attach changes are gathered into a `REPORT` (they are coalesced in between).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(5);
/// Bytes of changes per `REPORT` frame, well inside the frame limit.
const REPORT_FRAME_BUDGET: usize = ctl::MAX_FRAME_BYTES - 4096;

/// What the control plane learns of an attached agent: the skills the gateway routes to it.
fn agent_report(info: &AgentInfo) -> AgentReport {
    let mut skills: Vec<Skill> = info
        .card
        .skills
        .iter()
        .filter(|s| info.capabilities.iter().any(|c| **c == *s.id))
        .take(ctl_domain::MAX_REPORT_SKILLS)
        .map(|s| {
            Skill {
                id: s.id.clone(),
                description: s.description.clone(),
                tags: s.tags.clone(),
                input_modes: s.effective_input_modes(&info.card).to_vec(),
                output_modes: s.effective_output_modes(&info.card).to_vec(),
            }
            .trimmed()
        })
        .collect();
    // One agent must fit in one frame: a card with very many skills is cut (and the control
    // plane's per-agent limit is far lower anyway).
    let mut size = 128 + info.identity.len();
    let fit = skills
        .iter()
        .take_while(|s| {
            size += s.encoded_len();
            size <= REPORT_FRAME_BUDGET
        })
        .count();
    skills.truncate(fit);
    AgentReport {
        session: info.session.0,
        identity: info.identity.to_string(),
        card_digest: info.card_digest,
        card_bytes: u64::from(info.card_bytes),
        load: 0,
        limit: u64::from(info.limit),
        skills,
    }
}

/// `changes` cut into `REPORT` frames within the frame budget; all but the last say `more`.
/// A reset report is at least one frame, even with nothing attached.
fn report_frames(reset: bool, addresses: Vec<String>, changes: Vec<AgentChange>) -> Vec<Report> {
    let mut frames = Vec::new();
    let mut current = Report {
        reset,
        more: false,
        addresses,
        changes: Vec::new(),
    };
    let mut size = 0;
    for change in changes {
        let len = match &change {
            AgentChange::Up(a) => {
                96 + a.identity.len() + a.skills.iter().map(Skill::encoded_len).sum::<usize>()
            }
            AgentChange::Down { .. } => 16,
        };
        if !current.changes.is_empty()
            && (size + len > REPORT_FRAME_BUDGET
                || current.changes.len() >= ctl_domain::MAX_REPORT_CHANGES)
        {
            let next = Report::default();
            frames.push(std::mem::replace(&mut current, next));
            size = 0;
        }
        size += len;
        current.changes.push(change);
    }
    if reset || !current.changes.is_empty() {
        frames.push(current);
    }
    let n = frames.len();
    for (i, f) in frames.iter_mut().enumerate() {
        f.more = i + 1 < n;
    }
    frames
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    u32::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(session: u64, skills: usize) -> AgentChange {
        AgentChange::Up(AgentReport {
            session,
            identity: format!("spiffe://d/agent/a{session}"),
            skills: (0..skills)
                .map(|i| Skill {
                    id: format!("capability-{i:04}"),
                    description: "d".repeat(200),
                    ..Skill::default()
                })
                .collect(),
            ..AgentReport::default()
        })
    }

    #[test]
    fn a_full_report_is_cut_into_frames_that_fit_and_all_but_the_last_say_more() {
        let changes: Vec<AgentChange> = (1..=400).map(|s| up(s, 10)).collect();
        let frames = report_frames(true, vec!["127.0.0.1:1".into()], changes);
        assert!(frames.len() > 1);
        let mut total = 0;
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.more, i + 1 < frames.len());
            total += f.changes.len();
            let mut out = Vec::new();
            ctl::encode_frame(&Frame::Report(f.clone()), &mut out);
            assert!(
                out.len() <= ctl::MAX_FRAME_BYTES,
                "frame {i}: {} bytes",
                out.len()
            );
            let (back, _) = ctl::decode_frame(&out).unwrap().unwrap();
            assert_eq!(back, Frame::Report(f.clone()));
        }
        assert_eq!(total, 400);
        assert!(frames[0].reset);
    }

    #[test]
    fn an_empty_full_report_is_one_frame_and_no_changes_send_nothing() {
        let frames = report_frames(true, Vec::new(), Vec::new());
        assert_eq!(frames.len(), 1);
        assert!(frames[0].reset && !frames[0].more);
        assert!(report_frames(false, Vec::new(), Vec::new()).is_empty());
    }
}
