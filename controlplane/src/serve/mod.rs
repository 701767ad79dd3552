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

use dmsc_identity::{Credentials, PrincipalKind, Resumption, SpiffeVerifier};
use dmsc_protocol::ctl::{self, CloseCode, IDLE_TIMEOUT, KEEP_ALIVE};
use dmsc_protocol::domain::Trunks;
use dmsc_protocol::table::{Generation, Table};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::compile::compile;
use crate::config::DomainConfig;
use crate::metrics::Metrics;
use crate::routes::{Domain, Limits, Published};

mod session;
use session::accept;

/// Most gateway ids whose refusal is remembered so it is logged once.
const MAX_REMEMBERED_REFUSALS: usize = 4096;
/// Most concurrent handshakes and sessions (listed gateways are at most 4,096).
const MAX_CONNECTIONS: usize = 8192;
/// Most capability names `/status` lists per gateway (the count is always the full one).
const MAX_STATUS_CAPABILITIES: usize = 1024;
/// Most encoded frames (pushes, refusals of reported agents) a session queues for its writer;
/// beyond, a push waits for the writer to catch up, and refusals are dropped (they are counted
/// in the metrics), so reports keep being read.
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
