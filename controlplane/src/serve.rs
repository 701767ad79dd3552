//! `dmsc-control serve`: the control plane's server. It holds the domain configuration and its
//! compiled table, keeps a `dmsc-ctl/1` session with every listed gateway and pushes each the
//! current table (`docs/CONTROL.md` section 6), takes the gateways' reports of their agents and
//! pushes every gateway the domain's routes compiled from them (section 7, [`crate::routes`]),
//! and serves its admin endpoint: `/status`, `/metrics`, `POST /apply`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dmsc_identity::{Credentials, Principal, PrincipalKind, Resumption, SpiffeId, SpiffeVerifier};
use dmsc_protocol::ctl::{
    self, CloseCode, Frame, NackCode, Push, PushBody, HELLO_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE,
};
use dmsc_protocol::domain::{Report, Trunks};
use dmsc_protocol::table::sections::{diff, SectionVersion};
use dmsc_protocol::table::{Generation, Table};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::compile::compile;
use crate::config::DomainConfig;
use crate::metrics::Metrics;
use crate::routes::{Domain, Limits, Published};

/// Most gateway ids whose refusal is remembered so it is logged once.
const MAX_REMEMBERED_REFUSALS: usize = 4096;
/// Most concurrent handshakes and sessions (listed gateways are at most 4,096).
const MAX_CONNECTIONS: usize = 8192;
/// Most capability names `/status` lists per gateway (the count is always the full one).
const MAX_STATUS_CAPABILITIES: usize = 1024;
/// Most encoded frames (pushes, refusals of reported agents) a session queues for its writer;
/// beyond, the session stops reading the gateway's frames until the writer catches up.
const MAX_QUEUED_FRAMES: usize = 1024;

/// How the domain's routes are compiled and pushed (`docs/CONTROL.md` section 7).
#[derive(Debug, Clone, Copy)]
pub struct RoutesSettings {
    /// A change waits this long before the routes are compiled and pushed, so that every change
    /// within it goes in one push.
    pub interval: Duration,
    /// How long a gateway whose session ended keeps its agents in the routes; also the longest
    /// the routes are held back at start for the listed gateways to report.
    pub grace: Duration,
    /// What one gateway may report.
    pub limits: Limits,
}

impl Default for RoutesSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            grace: Duration::from_millis(3000),
            limits: Limits::default(),
        }
    }
}

/// How the server is set up.
#[derive(Debug)]
pub struct ServeSettings {
    /// The domain configuration file; `None` serves the embedded development domain.
    pub config_path: Option<PathBuf>,
    /// The configuration read at start.
    pub config: DomainConfig,
    /// The `dmsc-ctl/1` address gateways connect to.
    pub listen: SocketAddr,
    /// The admin HTTP address (`/status`, `/metrics`, `POST /apply`).
    pub admin_listen: SocketAddr,
    /// The control plane's certificate and key (`spiffe://<domain>/control`).
    pub credentials: Credentials,
    /// The domain CA certificates gateways must chain to.
    pub trust_anchors: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Reloads closer together than this are merged into one compile.
    pub debounce: Duration,
    /// Reports and routes.
    pub routes: RoutesSettings,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] dmsc_identity::TlsError),
    /// The configuration did not compile.
    #[error(transparent)]
    Compile(#[from] crate::compile::CompileError),
    /// A socket could not be bound or the runtime could not start.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The shared state of the server.
pub struct Hub {
    pub(crate) domain: String,
    config_path: Option<PathBuf>,
    state: Mutex<HubState>,
    desired: watch::Sender<Arc<Table>>,
    /// Woken whenever a gateway answers a push, connects or disconnects.
    pub(crate) changed: Notify,
    pub(crate) metrics: Metrics,
    reload: mpsc::Sender<oneshot::Sender<ApplyOutcome>>,
    /// The `dmsc-ctl/1` endpoint, closed at shutdown.
    endpoint: quinn::Endpoint,
    /// The routes every session sends; `None` until the first are published.
    routes: watch::Sender<Option<Arc<Published>>>,
    /// Woken when the reports changed in a way the routes may show (a batch ended, a gateway
    /// left, the listed gateways changed).
    routes_changed: Notify,
    /// Pushes of routes are at least this far apart.
    routes_interval: Duration,
}

struct HubState {
    listed: Vec<String>,
    domain: Domain,
    gateways: BTreeMap<String, GatewayEntry>,
    refused: HashSet<String>,
    last_error: Option<String>,
    next_session: u64,
}

#[derive(Debug, Default, Clone)]
struct GatewayEntry {
    session: Option<u64>,
    conn: Option<quinn::Connection>,
    addr: Option<SocketAddr>,
    connected_since: Option<u64>,
    acked: Option<Generation>,
    pending: Option<Generation>,
    rejected: Option<RejectedView>,
    status: ctl::Status,
    sessions: u64,
    last_ack_ms: Option<f64>,
    /// Its latest `TRUNKS` and when it came.
    trunks: Option<(Trunks, Instant)>,
}

/// A rejection as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedView {
    /// The generation rejected.
    pub generation: String,
    /// The NACK code.
    pub code: &'static str,
    /// The reasons, `section: reason`.
    pub reasons: Vec<String>,
}

/// One gateway in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayView {
    /// The gateway id.
    pub id: String,
    /// Whether `domain.toml` lists it.
    pub listed: bool,
    /// Whether its session is up.
    pub connected: bool,
    /// Its address, while connected.
    pub addr: Option<String>,
    /// Seconds since the Unix epoch at which the current session started.
    pub connected_since: Option<u64>,
    /// The generation it last acknowledged (it holds and serves it).
    pub acked_generation: Option<String>,
    /// Whether that is the current generation.
    pub in_sync: bool,
    /// The generation pushed and not yet answered.
    pub pending_generation: Option<String>,
    /// The last rejection, while it is the newest answer.
    pub rejected: Option<RejectedView>,
    /// Agents attached to it.
    pub agents: u64,
    /// Distinct capabilities they offer.
    pub capabilities: u64,
    /// Their identities (at most 256).
    pub identities: Vec<String>,
    /// Sessions it has opened since the control plane started.
    pub sessions: u64,
    /// Push-to-acknowledgement time of its last push, milliseconds.
    pub last_push_to_ack_ms: Option<f64>,
    /// Its reports of its agents (`REPORT`).
    pub report: ReportView,
    /// The routes version it holds, from its latest `TRUNKS` (0: none, or routes of an earlier
    /// control-plane run); `None` before its first `TRUNKS`.
    pub routes_version: Option<u64>,
    /// Whether it holds the current routes (by its latest `TRUNKS`; a gateway that sent none
    /// counts as holding none).
    pub routes_current: bool,
    /// Milliseconds since the first routes version it lacks was published; 0 when current.
    pub routes_behind_ms: u64,
    /// Milliseconds since its latest `TRUNKS`.
    pub trunks_age_ms: Option<u64>,
    /// Its trunks to the other gateways, from its latest `TRUNKS`.
    pub trunks: Vec<TrunkView>,
}

/// A gateway's reports in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportView {
    /// `none` (nothing reported), `reporting` (a batch is open), `complete`, or `grace` (its
    /// session ended: its agents stay in the routes until the grace period ends).
    pub state: &'static str,
    /// Milliseconds left of its grace period, in state `grace`.
    pub grace_left_ms: Option<u64>,
    /// Agents reported.
    pub agents: u64,
    /// Distinct capabilities they offer.
    pub capability_count: u64,
    /// Their names, sorted, at most 1,024.
    pub capabilities: Vec<String>,
    /// Its trunk addresses, one per worker.
    pub addresses: Vec<String>,
    /// Agents refused with `REPORT_REJECTED` since the control plane started.
    pub rejections: u64,
}

/// One trunk of a gateway in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct TrunkView {
    /// The peer gateway.
    pub peer: String,
    /// Workers with a connected trunk to it.
    pub connected: u64,
    /// Requests forwarded to it since the gateway started.
    pub requests: u64,
    /// Of those, ended with a gateway status or a trunk failure.
    pub errors: u64,
}

/// The domain's routes in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesView {
    /// The current version; 0 before the first routes are published.
    pub version: u64,
    /// This control-plane run's epoch, 16 hex digits.
    pub epoch: String,
    /// Whether the start-up hold is on (no routes sent yet).
    pub held: bool,
    /// Listed gateways the start-up hold waits for.
    pub waiting_for: Vec<String>,
    /// Gateways in the current routes.
    pub gateways: u64,
    /// Capabilities in the current routes.
    pub capabilities: u64,
    /// Agents in the current routes.
    pub agents: u64,
    /// Size of the current `ROUTES` frame, bytes.
    pub bytes: u64,
    /// Compiles since start.
    pub compiles: u64,
    /// `ROUTES` frames sent since start, counted per gateway.
    pub pushes: u64,
    /// Why the latest compile could not be published, until one is.
    pub last_error: Option<String>,
}

/// `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The trust domain.
    pub domain: String,
    /// The configuration file, if any.
    pub config: Option<String>,
    /// The current generation.
    pub generation: String,
    /// The last failed reload, if the last reload failed.
    pub last_error: Option<String>,
    /// The domain's routes.
    pub routes: RoutesView,
    /// Every listed gateway, and unlisted ones still connected.
    pub gateways: Vec<GatewayView>,
}

/// The outcome of a reload (`apply` or SIGHUP).
#[derive(Debug, Clone, Serialize)]
pub struct ApplyOutcome {
    /// The generation in force after the reload.
    pub generation: String,
    /// Whether it differs from the one before.
    pub changed: bool,
    /// Why the configuration was refused (the generation in force did not change).
    pub error: Option<String>,
}

/// What one gateway did with an applied generation.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyGateway {
    /// The gateway id.
    pub id: String,
    /// `acked`, `rejected`, `pending` (no answer within the wait) or `disconnected`.
    pub result: &'static str,
    /// The rejection, if rejected.
    pub rejected: Option<RejectedView>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn current(&self) -> Arc<Table> {
        self.desired.borrow().clone()
    }

    /// Asks for a reload of the configuration file (coalesced with others close in time).
    pub(crate) async fn request_reload(&self) -> ApplyOutcome {
        let (tx, rx) = oneshot::channel();
        if self.reload.send(tx).await.is_err() {
            return ApplyOutcome {
                generation: self.current().generation().to_string(),
                changed: false,
                error: Some("the control plane is stopping".into()),
            };
        }
        rx.await.unwrap_or_else(|_| ApplyOutcome {
            generation: self.current().generation().to_string(),
            changed: false,
            error: Some("the reload was abandoned".into()),
        })
    }

    /// Waits until every connected listed gateway has answered `generation` (or `wait`
    /// passes) and says what each did.
    pub(crate) async fn wait_for(
        &self,
        generation: Generation,
        wait: Duration,
    ) -> Vec<ApplyGateway> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            let (results, settled) = {
                let s = self.lock();
                let mut settled = true;
                let results: Vec<ApplyGateway> = s
                    .listed
                    .iter()
                    .map(|id| {
                        let e = s.gateways.get(id);
                        let connected = e.is_some_and(|e| e.session.is_some());
                        let acked = e.is_some_and(|e| e.acked == Some(generation));
                        let rejected = e
                            .and_then(|e| e.rejected.clone())
                            .filter(|r| r.generation == generation.to_string());
                        let result = if acked {
                            "acked"
                        } else if rejected.is_some() {
                            "rejected"
                        } else if !connected {
                            "disconnected"
                        } else {
                            settled = false;
                            "pending"
                        };
                        ApplyGateway {
                            id: id.clone(),
                            result,
                            rejected,
                        }
                    })
                    .collect();
                (results, settled)
            };
            if settled || tokio::time::Instant::now() >= deadline {
                return results;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// What `/status` shows.
    pub fn status(&self) -> StatusView {
        let current = self.current().generation();
        let now = Instant::now();
        let s = self.lock();
        let routes = s.domain.current();
        let mut ids: Vec<&String> = s.listed.iter().collect();
        for (id, e) in &s.gateways {
            if e.session.is_some() && !s.listed.contains(id) {
                ids.push(id);
            }
        }
        let gateways = ids
            .into_iter()
            .map(|id| {
                let e = s.gateways.get(id).cloned().unwrap_or_default();
                let report = s.domain.view(id, MAX_STATUS_CAPABILITIES, now);
                let (held_epoch, held_version) = e
                    .trunks
                    .as_ref()
                    .map_or((0, 0), |(t, _)| (t.routes_epoch, t.routes_version));
                let behind = s.domain.behind(held_epoch, held_version, now);
                let current_routes = routes.as_ref().is_none_or(|r| {
                    held_epoch == r.routes.epoch && held_version >= r.routes.version
                });
                GatewayView {
                    id: id.clone(),
                    listed: s.listed.contains(id),
                    connected: e.session.is_some(),
                    addr: e
                        .addr
                        .filter(|_| e.session.is_some())
                        .map(|a| a.to_string()),
                    connected_since: e.connected_since.filter(|_| e.session.is_some()),
                    acked_generation: e.acked.map(|g| g.to_string()),
                    in_sync: e.acked == Some(current),
                    pending_generation: e.pending.map(|g| g.to_string()),
                    rejected: e.rejected.clone(),
                    agents: e.status.agents,
                    capabilities: e.status.capabilities,
                    identities: e.status.identities.clone(),
                    sessions: e.sessions,
                    last_push_to_ack_ms: e.last_ack_ms,
                    report: ReportView {
                        state: report.state,
                        grace_left_ms: report.grace_left_ms,
                        agents: report.agents,
                        capability_count: report.capability_count,
                        capabilities: report.capabilities,
                        addresses: report.addresses,
                        rejections: report.rejections,
                    },
                    routes_version: e.trunks.as_ref().map(|(t, _)| {
                        if t.routes_epoch == s.domain.epoch() {
                            t.routes_version
                        } else {
                            0
                        }
                    }),
                    routes_current: current_routes,
                    routes_behind_ms: behind.as_millis() as u64,
                    trunks_age_ms: e
                        .trunks
                        .as_ref()
                        .map(|(_, at)| now.saturating_duration_since(*at).as_millis() as u64),
                    trunks: e
                        .trunks
                        .as_ref()
                        .map(|(t, _)| {
                            t.trunks
                                .iter()
                                .map(|f| TrunkView {
                                    peer: f.gateway.clone(),
                                    connected: f.connected,
                                    requests: f.requests,
                                    errors: f.errors,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        let routes = RoutesView {
            version: routes.as_ref().map_or(0, |r| r.routes.version),
            epoch: format!("{:016x}", s.domain.epoch()),
            held: s.domain.is_held(),
            waiting_for: s.domain.waiting_for(),
            gateways: routes
                .as_ref()
                .map_or(0, |r| r.routes.gateways.len() as u64),
            capabilities: routes
                .as_ref()
                .map_or(0, |r| r.routes.capabilities.len() as u64),
            agents: routes.as_ref().map_or(0, |r| r.agents),
            bytes: routes.as_ref().map_or(0, |r| r.frame.len() as u64),
            compiles: s.domain.compiles(),
            pushes: self.metrics.routes_pushes.get(),
            last_error: s.domain.last_error().map(str::to_owned),
        };
        StatusView {
            domain: self.domain.clone(),
            config: self.config_path.as_ref().map(|p| p.display().to_string()),
            generation: current.to_string(),
            last_error: s.last_error.clone(),
            routes,
            gateways,
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Closes every session with `SHUTTING_DOWN` and accepts no new one.
    pub fn shut_down(&self) {
        self.endpoint.close(
            CloseCode::ShuttingDown.code().into(),
            b"control plane stopping",
        );
    }

    /// Reloads the configuration (as `apply` and SIGHUP do).
    pub async fn reload(&self) -> ApplyOutcome {
        self.request_reload().await
    }
}

/// A running server: its sockets are bound and it serves while the future [`start`] returned
/// is polled.
#[derive(Debug)]
pub struct Server {
    /// The server's state, for reloads and shutdown.
    pub hub: Arc<Hub>,
    /// The bound `dmsc-ctl/1` address.
    pub listen: SocketAddr,
    /// The bound admin address.
    pub admin: SocketAddr,
    /// The generation in force at start.
    pub generation: Generation,
}

/// Starts the server on the current tokio runtime and returns once its sockets are bound.
pub async fn start(
    settings: ServeSettings,
) -> Result<(Server, impl std::future::Future<Output = ()>), ServeError> {
    let started = Instant::now();
    let table = Arc::new(compile(&settings.config)?);
    let metrics = Metrics::new();
    metrics
        .compile_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.set_generation(&table.generation().to_string());
    let domain = settings.config.domain.name.get_ref().clone();
    let verifier = Arc::new(SpiffeVerifier::new(
        &settings.trust_anchors,
        &[PrincipalKind::Gateway],
        &[domain.as_str()],
    )?);
    let crypto = dmsc_identity::server_config(
        dmsc_protocol::ALPN_CONTROL,
        settings.credentials,
        verifier,
        Resumption::Allowed,
    )?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    server.migration(false);
    let io = |what: String| move |source| ServeError::Io { what, source };
    let endpoint = quinn::Endpoint::server(server, settings.listen)
        .map_err(io(format!("cannot bind {}", settings.listen)))?;
    let listen = endpoint.local_addr().map_err(io("local address".into()))?;
    let admin = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .map_err(io(format!("cannot bind {}", settings.admin_listen)))?;
    let admin_addr = admin.local_addr().map_err(io("local address".into()))?;

    let (desired, _) = watch::channel(table.clone());
    let (reload_tx, reload_rx) = mpsc::channel(64);
    let listed = listed_gateways(&settings.config);
    metrics.gateways_listed.set(listed.len() as i64);
    let routes = Domain::new(
        settings.routes.limits,
        settings.routes.grace,
        epoch(),
        listed.clone(),
        Instant::now(),
    );
    let hub = Arc::new(Hub {
        domain,
        config_path: settings.config_path,
        state: Mutex::new(HubState {
            listed,
            domain: routes,
            gateways: BTreeMap::new(),
            refused: HashSet::new(),
            last_error: None,
            next_session: 0,
        }),
        desired,
        changed: Notify::new(),
        metrics,
        reload: reload_tx,
        endpoint: endpoint.clone(),
        routes: watch::channel(None).0,
        routes_changed: Notify::new(),
        routes_interval: settings.routes.interval,
    });
    let generation = table.generation();
    let run = {
        let hub = hub.clone();
        async move {
            tokio::spawn(reloader(hub.clone(), reload_rx, settings.debounce));
            tokio::spawn(router(hub.clone()));
            tokio::spawn(crate::admin::serve(admin, hub.clone()));
            accept(endpoint, hub).await;
        }
    };
    Ok((
        Server {
            hub,
            listen,
            admin: admin_addr,
            generation,
        },
        run,
    ))
}

/// A random epoch naming this control-plane run: nonzero, and a varint (below 2^62).
fn epoch() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness: the clock still tells two runs apart.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = nanos.to_le_bytes();
    }
    (u64::from_le_bytes(b) & dmsc_protocol::varint::MAX).max(1)
}

/// Compiles the domain's routes and publishes them to every session: after a change, waits the
/// routes interval (so every change within it goes in one push), then compiles once; also runs
/// when a grace period or the start-up hold ends.
async fn router(hub: Arc<Hub>) {
    loop {
        let deadline = hub.lock().domain.next_deadline();
        match deadline {
            Some(at) => {
                tokio::select! {
                    _ = hub.routes_changed.notified() => {}
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                }
            }
            None => hub.routes_changed.notified().await,
        }
        tokio::time::sleep(hub.routes_interval).await;
        let inputs = {
            let mut s = hub.lock();
            let now = Instant::now();
            s.domain.expire(now);
            s.domain.prepare(now)
        };
        let Some(inputs) = inputs else { continue };
        hub.metrics.routes_compiles.inc();
        // Merging and encoding take time in proportion to the domain: outside the lock.
        let merged = tokio::task::spawn_blocking(move || crate::routes::merge(&inputs))
            .await
            .unwrap_or_else(|e| Err(format!("the routes compile failed: {e}")));
        match merged {
            Ok(None) => {}
            Ok(Some(published)) => {
                let published = Arc::new(published);
                let (version, bytes) = (published.routes.version, published.frame.len());
                hub.metrics.routes_version.set(version as i64);
                hub.metrics.domain_agents.set(published.agents as i64);
                hub.lock().domain.install(published.clone(), Instant::now());
                if version == 1 {
                    tracing::info!(
                        gateways = published.routes.gateways.len(),
                        capabilities = published.routes.capabilities.len(),
                        "first domain routes published"
                    );
                }
                tracing::debug!(
                    version,
                    bytes,
                    gateways = published.routes.gateways.len(),
                    capabilities = published.routes.capabilities.len(),
                    "routes published"
                );
                hub.routes.send_replace(Some(published));
            }
            Err(error) => {
                tracing::warn!(%error, "the domain's routes cannot be sent; gateways keep the last ones");
                hub.lock().domain.failed(error);
            }
        }
    }
}

fn listed_gateways(config: &DomainConfig) -> Vec<String> {
    let mut ids: Vec<String> = config
        .gateway
        .iter()
        .map(|g| g.id.get_ref().clone())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Reloads the configuration on request, merging requests that come within `debounce` of the
/// last compile into one.
async fn reloader(
    hub: Arc<Hub>,
    mut requests: mpsc::Receiver<oneshot::Sender<ApplyOutcome>>,
    debounce: Duration,
) {
    let mut last: Option<tokio::time::Instant> = None;
    while let Some(first) = requests.recv().await {
        if let Some(last) = last {
            tokio::time::sleep_until(last + debounce).await;
        }
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        last = Some(tokio::time::Instant::now());
        let outcome = reload(&hub).await;
        for w in waiting {
            let _ = w.send(outcome.clone());
        }
    }
}

async fn reload(hub: &Arc<Hub>) -> ApplyOutcome {
    let before = hub.current().generation();
    let path = hub.config_path.clone();
    let domain = hub.domain.clone();
    let compiled = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let config = match &path {
            Some(path) => DomainConfig::load(path).map_err(|e| e.to_string())?,
            None => DomainConfig::development(),
        };
        if config.domain.name.get_ref() != &domain {
            return Err(format!(
                "the configuration is for trust domain {:?}, this control plane serves {domain:?} (restart it to change domains)",
                config.domain.name.get_ref()
            ));
        }
        let table = compile(&config).map_err(|e| e.to_string())?;
        Ok((config, table, started.elapsed()))
    })
    .await
    .unwrap_or_else(|e| Err(format!("compile task failed: {e}")));
    match compiled {
        Err(error) => {
            tracing::warn!(%error, generation = %before, "configuration refused; the running generation stays in force");
            hub.metrics
                .applies
                .get_or_create(&crate::metrics::Result { result: "error" })
                .inc();
            hub.lock().last_error = Some(error.clone());
            ApplyOutcome {
                generation: before.to_string(),
                changed: false,
                error: Some(error),
            }
        }
        Ok((config, table, took)) => {
            hub.metrics.compile_seconds.observe(took.as_secs_f64());
            let generation = table.generation();
            let changed = generation != before;
            {
                let mut s = hub.lock();
                s.last_error = None;
                // A gateway refused before may be listed now: log its next refusal again.
                s.refused.clear();
                s.listed = listed_gateways(&config);
                let listed = s.listed.clone();
                s.domain.set_listed(listed);
                hub.metrics.gateways_listed.set(s.listed.len() as i64);
                // Gateways no longer listed lose their session.
                for (id, e) in s.gateways.iter_mut() {
                    if !config.gateway.iter().any(|g| g.id.get_ref() == id) {
                        if let Some(conn) = e.conn.take() {
                            conn.close(CloseCode::NotListed.code().into(), b"no longer listed");
                        }
                    }
                }
            }
            // The start-up hold may wait for fewer gateways now.
            hub.routes_changed.notify_one();
            if changed {
                tracing::info!(%generation, took_ms = took.as_secs_f64() * 1e3, "new generation compiled; pushing");
                hub.metrics.set_generation(&generation.to_string());
                hub.desired.send_replace(Arc::new(table));
            }
            hub.metrics
                .applies
                .get_or_create(&crate::metrics::Result {
                    result: if changed { "changed" } else { "unchanged" },
                })
                .inc();
            ApplyOutcome {
                generation: generation.to_string(),
                changed,
                error: None,
            }
        }
    }
}

async fn accept(endpoint: quinn::Endpoint, hub: Arc<Hub>) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = open.clone().try_acquire_owned() else {
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: "connection_limit",
                })
                .inc();
            incoming.refuse();
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "control handshake failed");
                    hub.metrics
                        .refused
                        .get_or_create(&crate::metrics::Reason {
                            reason: "handshake",
                        })
                        .inc();
                    return;
                }
            };
            session(hub, conn).await;
        });
    }
}

/// The gateway id of the connection's peer certificate (the verifier accepted only gateways
/// of the domain).
fn peer_gateway(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let id: SpiffeId = dmsc_identity::spiffe_id_from_cert(certs.first()?).ok()?;
    match id.principal() {
        Principal::Gateway(g) => Some(g.to_owned()),
        _ => None,
    }
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(code.code().into(), reason.as_bytes());
}

async fn session(hub: Arc<Hub>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Some(id) = peer_gateway(&conn) else {
        close(&conn, CloseCode::NotListed, "not a gateway identity");
        return;
    };
    {
        let mut s = hub.lock();
        if !s.listed.contains(&id) {
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: "not_listed",
                })
                .inc();
            if s.refused.len() < MAX_REMEMBERED_REFUSALS && s.refused.insert(id.clone()) {
                tracing::warn!(gateway = %id, %remote, "refusing a gateway not listed in the configuration (logged once per gateway)");
            }
            drop(s);
            close(
                &conn,
                CloseCode::NotListed,
                "gateway not listed in the domain configuration",
            );
            return;
        }
    }
    let hello_by = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let accepted = tokio::time::timeout_at(hello_by, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = accepted else {
        close(&conn, CloseCode::Timeout, "no session stream");
        return;
    };
    // The writer sends while the session keeps reading: a gateway writing a long report while
    // the control plane writes long routes never waits on a control plane waiting on it.
    let (out, queue) = mpsc::channel(MAX_QUEUED_FRAMES);
    let writer = tokio::spawn(writer(
        hub.clone(),
        id.clone(),
        send,
        queue,
        hub.routes.subscribe(),
    ));
    let mut s = Session {
        hub: hub.clone(),
        id: id.clone(),
        conn: conn.clone(),
        out,
        recv,
        buf: Vec::with_capacity(4096),
        nonce: 0,
        held: None,
        held_sections: Vec::new(),
        pending: None,
        session: 0,
        snapshot_retried: None,
    };
    let result = s.run(hello_by).await;
    let session_id = s.session;
    drop(s);
    writer.abort();
    match &result {
        Ok(()) => {}
        Err(End::Closed(code, reason)) => {
            tracing::warn!(gateway = %id, %remote, code = code.as_str(), %reason, "closing control session");
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: code.as_str(),
                })
                .inc();
            close(&conn, *code, reason);
        }
        Err(End::Lost(e)) => {
            tracing::info!(gateway = %id, %remote, error = %e, "control session ended")
        }
    }
    // A gateway that closed with SHUTTING_DOWN is gone for good: its agents leave the routes
    // at once. Any other end keeps them for the grace period.
    let shutting_down = matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code.into_inner() == u64::from(CloseCode::ShuttingDown.code())
    );
    let mut st = hub.lock();
    let mut ended = false;
    if let Some(e) = st.gateways.get_mut(&id) {
        if e.session == Some(session_id) && session_id != 0 {
            e.session = None;
            e.conn = None;
            e.pending = None;
            hub.metrics.gateways_connected.dec();
            ended = true;
        }
    }
    if ended {
        if shutting_down {
            tracing::info!(gateway = %id, "gateway shutting down; its agents leave the routes");
            st.domain.remove(&id);
        } else {
            st.domain.session_ended(&id, Instant::now());
        }
    }
    drop(st);
    if ended {
        hub.routes_changed.notify_one();
    }
    hub.changed.notify_waiters();
}

/// The push a session waits for an answer to.
struct Pending {
    nonce: u64,
    generation: Generation,
    /// The table pushed; `None` for a confirmation (an empty delta of what the gateway holds).
    table: Option<Arc<Table>>,
    /// Whether it went as a delta.
    delta: bool,
    sent: Instant,
}

enum End {
    Closed(CloseCode, String),
    Lost(String),
}

/// Writes a session's frames: those the session queues, in order, and after the first of them
/// (the session's first push) the current routes, then each newer version of the routes as it
/// is published (only the newest, if several were published during a write).
async fn writer(
    hub: Arc<Hub>,
    id: String,
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut routes: watch::Receiver<Option<Arc<Published>>>,
) {
    let Some(first) = queue.recv().await else {
        return;
    };
    if send.write_all(&first).await.is_err() {
        return;
    }
    let mut next = routes.borrow_and_update().clone();
    loop {
        if let Some(r) = next.take() {
            tracing::debug!(gateway = %id, version = r.routes.version, bytes = r.frame.len(), "routes");
            hub.metrics.routes_pushes.inc();
            if send.write_all(&r.frame).await.is_err() {
                return;
            }
        }
        tokio::select! {
            biased;
            frame = queue.recv() => {
                let Some(frame) = frame else { return };
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    return;
                }
                next = routes.borrow_and_update().clone();
            }
        }
    }
}

struct Session {
    hub: Arc<Hub>,
    id: String,
    conn: quinn::Connection,
    /// Frames for the writer task.
    out: mpsc::Sender<Vec<u8>>,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    nonce: u64,
    held: Option<Generation>,
    held_sections: Vec<(u64, SectionVersion)>,
    /// The push awaiting an answer.
    pending: Option<Pending>,
    session: u64,
    /// The generation last retried as a snapshot after its delta was refused.
    snapshot_retried: Option<Generation>,
}

impl Session {
    async fn next_frame(&mut self) -> Result<Frame<'static>, End> {
        loop {
            match ctl::decode_frame_within(&self.buf, ctl::MAX_FRAME_BYTES) {
                Err(e) => return Err(End::Closed(e.close_code(), e.to_string())),
                Ok(Some((frame, used))) => {
                    let frame = frame.into_owned().map_err(|_| {
                        End::Closed(CloseCode::UnexpectedFrame, "PUSH from a gateway".into())
                    })?;
                    self.buf.drain(..used);
                    return Ok(frame);
                }
                Ok(None) => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.recv.read(&mut chunk).await {
                Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(None) => return Err(End::Lost("the gateway finished its stream".into())),
                Err(e) => return Err(End::Lost(e.to_string())),
            }
        }
    }

    async fn run(&mut self, hello_by: tokio::time::Instant) -> Result<(), End> {
        let hello = loop {
            match tokio::time::timeout_at(hello_by, self.next_frame()).await {
                Err(_) => return Err(End::Closed(CloseCode::Timeout, "no HELLO in time".into())),
                Ok(frame) => match frame? {
                    Frame::Hello(h) => break h,
                    // Extension frames are skipped in any state.
                    Frame::Unknown(_) => continue,
                    _ => {
                        return Err(End::Closed(
                            CloseCode::UnexpectedFrame,
                            "first frame is not HELLO".into(),
                        ))
                    }
                },
            }
        };
        if hello.version != ctl::VERSION {
            return Err(End::Closed(
                CloseCode::UnsupportedVersion,
                format!("version {}", hello.version),
            ));
        }
        if hello.domain != self.hub.domain {
            return Err(End::Closed(
                CloseCode::WrongDomain,
                format!("domain {:?}", hello.domain),
            ));
        }
        if hello.gateway_id != self.id {
            return Err(End::Closed(
                CloseCode::IdentityMismatch,
                format!(
                    "HELLO says {:?}, the certificate {:?}",
                    hello.gateway_id, self.id
                ),
            ));
        }
        self.held = hello.held;
        self.held_sections = hello.sections;
        self.register();
        tracing::info!(gateway = %self.id, addr = %self.conn.remote_address(), held = ?self.held.map(|g| g.to_string()), "gateway connected");
        let mut desired = self.hub.desired.subscribe();
        // The first push always goes, even when the gateway holds the current generation (then
        // as an empty delta): its acknowledgement tells the gateway it is in sync.
        let first = desired.borrow_and_update().clone();
        let rejected = self.rejected_generation() == Some(first.generation());
        match self.held {
            // It rejected the current generation before: confirm what it holds instead of
            // pushing the same table again.
            Some(held) if rejected => self.confirm(held).await?,
            _ => self.push(first, true).await?,
        }
        // The writer follows the first push with the current routes.
        loop {
            tokio::select! {
                frame = self.next_frame() => self.on_frame(frame?).await?,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if self.pending.is_none() {
                        let table = desired.borrow_and_update().clone();
                        self.push(table, false).await?;
                    }
                }
            }
        }
    }

    fn register(&mut self) {
        let mut s = self.hub.lock();
        s.next_session += 1;
        self.session = s.next_session;
        let entry = s.gateways.entry(self.id.clone()).or_default();
        if let Some(old) = entry.conn.replace(self.conn.clone()) {
            tracing::warn!(
                gateway = %self.id,
                old = %old.remote_address(),
                new = %self.conn.remote_address(),
                "a second session for this gateway id replaces the first (two gateways with one id?)"
            );
            old.close(
                CloseCode::NoError.code().into(),
                b"replaced by a newer session",
            );
        } else {
            self.hub.metrics.gateways_connected.inc();
        }
        entry.session = Some(self.session);
        entry.addr = Some(self.conn.remote_address());
        entry.connected_since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        entry.sessions += 1;
        // Nothing is known held until the gateway acknowledges a push on this session.
        entry.acked = None;
        entry.pending = None;
        // Its earlier reports stay only if this session reports afresh in time.
        s.domain.session_started(&self.id, Instant::now());
        drop(s);
        self.hub.routes_changed.notify_one();
        self.hub.changed.notify_waiters();
    }

    fn update(&self, f: impl FnOnce(&mut GatewayEntry)) {
        let mut s = self.hub.lock();
        if let Some(e) = s
            .gateways
            .get_mut(&self.id)
            .filter(|e| e.session == Some(self.session))
        {
            f(e);
        }
        drop(s);
        self.hub.changed.notify_waiters();
    }

    fn rejected_generation(&self) -> Option<Generation> {
        let s = self.hub.lock();
        let rejected = s.gateways.get(&self.id)?.rejected.as_ref()?;
        let current = self.hub.current().generation();
        (rejected.generation == current.to_string()).then_some(current)
    }

    /// Pushes an empty delta of the generation the gateway holds: its acknowledgement confirms
    /// the gateway is in sync with what the control plane is willing to give it.
    async fn confirm(&mut self, held: Generation) -> Result<(), End> {
        let body = PushBody::Delta {
            base: held,
            upserts: Vec::new(),
            removes: Vec::new(),
        };
        let out = self.encode(held, body);
        self.send(out, held, None, true).await
    }

    /// Pushes `table` unless the gateway holds it (or rejected it) already; `always` pushes
    /// even then (the session's first push). A delta against what the gateway holds when that
    /// is smaller, else (or when nothing is known held) a snapshot.
    async fn push(&mut self, table: Arc<Table>, always: bool) -> Result<(), End> {
        let generation = table.generation();
        if !always {
            if self.held == Some(generation) {
                return Ok(());
            }
            let rejected = {
                let s = self.hub.lock();
                s.gateways.get(&self.id).and_then(|e| e.rejected.clone())
            };
            if rejected.is_some_and(|r| r.generation == generation.to_string()) {
                return Ok(());
            }
        }
        let (upserts, removes) = diff(&self.held_sections, &table);
        let delta_len: usize =
            upserts.iter().map(|s| s.body.len() + 12).sum::<usize>() + removes.len() * 8;
        let body = match self.held {
            Some(base) if delta_len < table.encoded().len() => PushBody::Delta {
                base,
                upserts,
                removes,
            },
            _ => PushBody::Snapshot(table.encoded()),
        };
        let delta = matches!(body, PushBody::Delta { .. });
        let out = self.encode(generation, body);
        self.send(out, generation, Some(table), delta).await
    }

    /// The next `PUSH` of this session, encoded.
    fn encode(&mut self, generation: Generation, body: PushBody<'_>) -> Vec<u8> {
        self.nonce += 1;
        let mut out = Vec::new();
        ctl::encode_frame(
            &Frame::Push(Push {
                nonce: self.nonce,
                generation,
                body,
            }),
            &mut out,
        );
        out
    }

    /// Sends the encoded push just made and records it as the one awaiting an answer.
    async fn send(
        &mut self,
        out: Vec<u8>,
        generation: Generation,
        table: Option<Arc<Table>>,
        delta: bool,
    ) -> Result<(), End> {
        let kind = if delta { "delta" } else { "snapshot" };
        self.hub
            .metrics
            .pushes
            .get_or_create(&crate::metrics::Kind { kind })
            .inc();
        tracing::debug!(gateway = %self.id, %generation, kind, bytes = out.len(), "push");
        self.pending = Some(Pending {
            nonce: self.nonce,
            generation,
            table,
            delta,
            sent: Instant::now(),
        });
        self.update(|e| e.pending = Some(generation));
        self.write(out).await
    }

    /// Queues encoded frames for the writer.
    async fn write(&self, frames: Vec<u8>) -> Result<(), End> {
        self.out
            .send(frames)
            .await
            .map_err(|_| End::Lost("the session's stream can no longer be written".into()))
    }

    /// Applies a `REPORT` and answers refused agents with `REPORT_REJECTED`.
    async fn on_report(&mut self, report: Report) -> Result<(), End> {
        self.hub.metrics.reports.inc();
        let applied = {
            let mut s = self.hub.lock();
            // A session replaced by a newer one reports no more.
            if s.gateways.get(&self.id).and_then(|e| e.session) != Some(self.session) {
                return Ok(());
            }
            s.domain.report(&self.id, report)
        };
        if applied.batch_ended {
            self.hub.routes_changed.notify_one();
        }
        if applied.rejected.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for (over, rejected) in applied.rejected {
            self.hub
                .metrics
                .report_rejections
                .get_or_create(&crate::metrics::Reason {
                    reason: over.as_str(),
                })
                .inc();
            tracing::debug!(gateway = %self.id, session = rejected.session, reason = %rejected.reason, "reported agent refused");
            ctl::encode_frame(&Frame::ReportRejected(rejected), &mut out);
        }
        self.write(out).await
    }

    async fn on_frame(&mut self, frame: Frame<'static>) -> Result<(), End> {
        match frame {
            Frame::Status(status) => {
                self.update(|e| e.status = status);
                Ok(())
            }
            Frame::Report(report) => self.on_report(report).await,
            Frame::Trunks(trunks) => {
                self.update(|e| e.trunks = Some((trunks, Instant::now())));
                Ok(())
            }
            Frame::Routes(_) | Frame::ReportRejected(_) => Err(End::Closed(
                CloseCode::UnexpectedFrame,
                "ROUTES or REPORT_REJECTED from a gateway".into(),
            )),
            Frame::Unknown(_) => Ok(()),
            Frame::Ack { nonce, generation } => {
                let Pending { table, sent, .. } = self.answered(nonce, generation)?;
                let took = sent.elapsed();
                self.hub.metrics.acks.inc();
                self.held = Some(generation);
                // A confirmation (no table) says the gateway is in sync with what it holds; it
                // neither clears a rejection of the current generation nor times a push.
                let pushed = table.is_some();
                if let Some(table) = table {
                    self.held_sections = table.section_versions();
                    self.hub
                        .metrics
                        .push_ack_seconds
                        .observe(took.as_secs_f64());
                }
                self.update(|e| {
                    e.acked = Some(generation);
                    e.pending = None;
                    if pushed {
                        e.rejected = None;
                        e.last_ack_ms = Some(took.as_secs_f64() * 1e3);
                    }
                });
                tracing::debug!(gateway = %self.id, %generation, took_ms = took.as_secs_f64() * 1e3, "acknowledged");
                self.push_newest().await
            }
            Frame::Nack {
                nonce,
                generation,
                code,
                rejections,
            } => {
                let answered = self.answered(nonce, generation)?;
                self.hub
                    .metrics
                    .rejections
                    .get_or_create(&crate::metrics::Reason {
                        reason: code.as_str(),
                    })
                    .inc();
                let view = RejectedView {
                    generation: generation.to_string(),
                    code: code.as_str(),
                    reasons: rejections
                        .iter()
                        .map(|r| match r.resource {
                            0 => r.reason.clone(),
                            s => format!("section {s:#04x}: {}", r.reason),
                        })
                        .collect(),
                };
                // A delta the gateway could not turn into the announced table: our view of its
                // sections may be wrong; a snapshot settles it (once per generation).
                let stale_view = matches!(code, NackCode::GenerationMismatch | NackCode::Invalid)
                    && answered.delta
                    && self.snapshot_retried != Some(generation);
                if stale_view {
                    self.snapshot_retried = Some(generation);
                }
                if code == NackCode::BaseMismatch || stale_view {
                    // The gateway does not hold what it said (or what we thought): start over
                    // from a snapshot.
                    tracing::info!(gateway = %self.id, code = code.as_str(), "delta refused; sending a snapshot");
                    // Nothing known held: the next push is a snapshot.
                    self.held = None;
                    self.held_sections.clear();
                    self.update(|e| e.pending = None);
                    let table = self.hub.current();
                    return self.push(table, true).await;
                }
                tracing::warn!(gateway = %self.id, %generation, code = code.as_str(), reasons = ?view.reasons, "gateway rejected a push; it keeps its last good table");
                self.update(|e| {
                    e.pending = None;
                    e.rejected = Some(view);
                });
                self.push_newest().await
            }
            Frame::Hello(_) | Frame::Push(_) => Err(End::Closed(
                CloseCode::UnexpectedFrame,
                "HELLO after the session began".into(),
            )),
        }
    }

    fn answered(&mut self, nonce: u64, generation: Generation) -> Result<Pending, End> {
        match self.pending.take() {
            Some(p) if p.nonce == nonce && p.generation == generation => Ok(p),
            other => {
                self.pending = other;
                Err(End::Closed(
                    CloseCode::UnexpectedFrame,
                    format!("answer to push {nonce}, which is not the pending one"),
                ))
            }
        }
    }

    /// After an answer: pushes the newest generation if the gateway does not hold it (changes
    /// made while a push was pending are merged into this one).
    async fn push_newest(&mut self) -> Result<(), End> {
        let table = self.hub.current();
        self.push(table, false).await
    }
}
