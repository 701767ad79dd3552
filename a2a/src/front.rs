//! The front door: an HTTP server where every capability of the domain is a virtual A2A agent.
//!
//! Routes (all under the base URL; `{cap}` is a capability name, percent-encoded):
//!
//! | Route | What |
//! |---|---|
//! | `GET /.well-known/api-catalog` | RFC 9727 catalog: a linkset with one item per capability card |
//! | `GET /a2a/c/{cap}/.well-known/agent-card.json` | the capability's card |
//! | `POST /a2a/c/{cap}` | JSON-RPC, A2A v1.0 and v0.3 |
//! | `/a2a/c/{cap}/rest/...` | HTTP+JSON, A2A v1.0 (also with a `/{tenant}` prefix) |
//!
//! Every request is forwarded as one `dmsc/1` invocation of `{cap}` on the A2A binding
//! ([`crate::binding`]); the gateway picks the agent. HTTP and tokio stay here, in the front
//! door's process: the gateway's workers see ordinary `dmsc/1` requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use dmsc_agent::{
    Agent, AgentCard, DiscoveryEntry, HandlerError, Handlers, InvokeError, Skill, Status,
};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt as _;

use crate::binding::{self, Call, LineBuffer, CONTENT_TYPE, STREAM_CONTENT_TYPE};
use crate::convert;
use crate::error::{rest_from_jsonrpc, A2aError, ErrorKind};
use crate::method::{self, Dialect, Method};
use crate::metrics::FrontMetrics;
use crate::task_id;

/// Front-door settings.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// The URL clients reach the front door at, without a trailing slash; cards point there.
    pub public_url: String,
    /// Largest request body accepted (bytes); larger ones get HTTP 413.
    pub max_body_bytes: usize,
    /// Largest answer, or streamed event, accepted from an agent (bytes).
    pub max_answer_bytes: usize,
    /// Requests forwarded at once; beyond it callers get `OVERLOADED` (HTTP 503).
    pub max_concurrent: usize,
    /// Time an agent has to begin its answer.
    pub request_timeout: Duration,
    /// HTTP connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Who the HTTP clients are, for the domain's policy.
    pub clients: ClientIdentity,
    /// Where requests are counted (serve them with [`admin_router`]).
    pub metrics: Arc<FrontMetrics>,
}

/// Who the front door's HTTP clients are for the domain's policy (`docs/A2A.md` §1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// Every client is the front door itself: requests carry no delegated identity.
    FrontDoor,
    /// Development mode: every client of this (loopback) listener is this agent identity,
    /// sent as the delegated identity of every request.
    Fixed(String),
    /// HTTPS, and every client presents a certificate of the domain: its SPIFFE ID is sent as
    /// the delegated identity of its requests.
    Certificate,
}

/// The skill every front door's own card offers (a card needs one). It is left out of the
/// catalog and has no card: it is not an A2A agent.
pub const FRONT_DOOR_SKILL: &str = "dmsc.a2a.front";

/// Events of one stream waiting for a slow client, at most.
const STREAM_BUFFER_EVENTS: usize = 4;

/// Time a request body may take to arrive, whole.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The front door's own card: it invokes, and serves nothing (its one skill,
/// [`FRONT_DOOR_SKILL`], is there because a card needs one).
pub fn own_card() -> AgentCard {
    AgentCard::new(
        "dmsc-a2a-front",
        "The A2A front door: HTTP A2A clients invoke the domain's capabilities through it",
        env!("CARGO_PKG_VERSION"),
    )
    .with_skill(Skill::new(FRONT_DOOR_SKILL, "A2A front door"))
}

/// The front door's handlers: a request for its own skill is answered `NO_ROUTE`.
pub fn own_handlers() -> Handlers {
    Handlers::new().fallback(|_request| async {
        Ok::<_, HandlerError>(dmsc_agent::Response::error(
            Status::NoRoute,
            "the A2A front door invokes capabilities for HTTP clients; it serves none",
        ))
    })
}

/// Time a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request's head (request line and headers) may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long, at shutdown, connections may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce() + Send) -> impl Drop + Send {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The identity a connection's requests are sent on behalf of (a request extension).
#[derive(Debug, Clone)]
struct Caller(Option<Arc<str>>);

impl FrontConfig {
    /// Defaults for a front door reached at `public_url`.
    pub fn new(public_url: impl Into<String>) -> Self {
        Self {
            public_url: public_url.into().trim_end_matches('/').to_owned(),
            max_body_bytes: 1 << 20,
            max_answer_bytes: binding::DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent: 1024,
            request_timeout: Duration::from_secs(60),
            max_connections: 1024,
            clients: ClientIdentity::FrontDoor,
            metrics: Arc::new(FrontMetrics::new()),
        }
    }
}

struct Shared {
    agent: Agent,
    config: FrontConfig,
    permits: Arc<Semaphore>,
}

/// The front door's routes, invoking through `agent`.
pub fn router(agent: Agent, config: FrontConfig) -> Router {
    let permits = Arc::new(Semaphore::new(config.max_concurrent));
    let shared = Arc::new(Shared {
        agent,
        config,
        permits,
    });
    Router::new()
        .route("/.well-known/api-catalog", get(catalog))
        .route("/a2a/c/{cap}/.well-known/agent-card.json", get(card))
        .route("/a2a/c/{cap}", post(jsonrpc))
        .route("/a2a/c/{cap}/", post(jsonrpc))
        .route("/a2a/c/{cap}/rest/{*path}", axum::routing::any(rest))
        .with_state(shared)
}

/// Serves the front door on `listener` until `shutdown` completes, over HTTPS if `tls` is
/// given (with [`ClientIdentity::Certificate`], `tls` must require client certificates). At
/// most `max_connections` connections are served at once; at shutdown, connections get
/// 5 s to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    agent: Agent,
    config: FrontConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let max_connections = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let fixed: Option<Arc<str>> = match &config.clients {
        ClientIdentity::Fixed(id) => Some(id.as_str().into()),
        _ => None,
    };
    let need_identity = config.clients == ClientIdentity::Certificate;
    let metrics = config.metrics.clone();
    let app = router(agent, config);
    // Flipped at shutdown: each connection then finishes its request in flight and closes.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let slots = Arc::new(Semaphore::new(max_connections));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    tracing::warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("at the connection limit ({max_connections}): closing a new one");
            metrics.connections_refused.inc();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let fixed = fixed.clone();
        let closing = closing.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            metrics.connections_open.inc();
            let _open = scopeguard(move || {
                metrics.connections_open.dec();
            });
            match acceptor {
                None => serve_connection(TokioIo::new(tcp), app, Caller(fixed), closing).await,
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => return tracing::debug!("TLS handshake: {e}"),
                            Err(_) => return tracing::debug!("TLS handshake timed out"),
                        };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| dmsc_identity::spiffe_id_from_cert(cert).ok())
                        .map(|id| Arc::from(id.as_str()));
                    if need_identity && identity.is_none() {
                        // Never fall back to the front door's own rights.
                        return tracing::debug!("a client certificate without a SPIFFE ID");
                    }
                    let caller = Caller(identity.or(fixed));
                    serve_connection(TokioIo::new(stream), app, caller, closing).await
                }
            }
        });
    }
    // Stop accepting (new clients are refused at once); let the connections in flight finish,
    // for a while.
    drop(listener);
    let _ = closing_tx.send(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)).await;
    Ok(())
}

/// Serves one HTTP/1.1 connection, every request tagged with `caller`, until the client
/// closes it or, once `closing` turns true, its request in flight is answered.
async fn serve_connection<I>(
    io: TokioIo<I>,
    app: Router,
    caller: Caller,
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(caller.clone());
        app.clone().oneshot(request)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = async { drop(closing.wait_for(|closing| *closing).await) } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("HTTP connection: {e}");
    }
}

/// The front door's admin routes: `GET /metrics` (OpenMetrics text of `metrics`) and
/// `GET /healthz` (200 while `agent` is attached to a gateway, 503 otherwise).
pub fn admin_router(metrics: Arc<FrontMetrics>, agent: Agent) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    ([(header::CONTENT_TYPE, kind)], metrics.encode())
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let attached = agent.is_attached();
                async move {
                    if attached {
                        (StatusCode::OK, "attached\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not attached to a gateway\n",
                        )
                    }
                }
            }),
        )
}

// ---- cards and the catalog ----

/// `{cap}` as a URL path segment.
pub fn encode_segment(cap: &str) -> String {
    let mut out = String::with_capacity(cap.len());
    for b in cap.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The card of the virtual agent for capability `entry`, served at `base`.
pub fn capability_card(base: &str, entry: &DiscoveryEntry) -> Value {
    let url = format!("{base}/a2a/c/{}", encode_segment(&entry.capability));
    let modes = |m: &[String]| -> Value {
        if m.is_empty() {
            json!(["text/plain"])
        } else {
            json!(m)
        }
    };
    let description = if entry.description.is_empty() {
        format!(
            "The capability {:?}, served by the agents of the domain",
            entry.capability
        )
    } else {
        entry.description.clone()
    };
    json!({
        "name": entry.capability,
        "description": description,
        "version": "1.0.0",
        // v1.0 clients take the first interface they support: JSON-RPC 1.0, then HTTP+JSON,
        // then JSON-RPC 0.3; the legacy fields below keep v0.3 clients on the front door too.
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": format!("{url}/rest"), "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
        ],
        "capabilities": {"streaming": true, "pushNotifications": false},
        "defaultInputModes": modes(&entry.input_modes),
        "defaultOutputModes": modes(&entry.output_modes),
        "skills": [{
            "id": entry.capability,
            "name": entry.capability,
            "description": description,
            "tags": entry.tags,
        }],
        "url": url,
        "preferredTransport": "JSONRPC",
        "protocolVersion": "0.3.0",
    })
}

/// The capabilities the client (`caller`, or the front door itself) may discover, starting
/// with `prefix`, front doors' own skill left out.
async fn discover(
    shared: &Shared,
    caller: &Caller,
    prefix: &str,
) -> Result<Vec<DiscoveryEntry>, A2aError> {
    let identity = caller.0.as_deref().unwrap_or_default();
    let found = shared.agent.discovery_for(identity, prefix, "").await;
    let mut entries = found.map(|d| d.entries).map_err(|e| {
        A2aError::new(
            ErrorKind::GatewayUnavailable,
            format!("the gateway did not answer discovery: {e}"),
        )
    })?;
    entries.retain(|e| e.capability != FRONT_DOOR_SKILL);
    Ok(entries)
}

async fn card(
    State(shared): State<Arc<Shared>>,
    Path(cap): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    let entries = match discover(&shared, &caller, &cap).await {
        Ok(entries) => entries,
        Err(e) => return rest_error(&e),
    };
    let Some(entry) = entries.iter().find(|e| e.capability == cap) else {
        let e = A2aError::new(
            ErrorKind::CapabilityNotFound,
            format!("no agent of the domain offers {cap:?} that this client may discover"),
        );
        return rest_error(&e);
    };
    let body =
        serde_json::to_vec(&capability_card(&shared.config.public_url, entry)).unwrap_or_default();
    let etag = format!("\"{:016x}\"", fnv1a(&body));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == etag)
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_response(StatusCode::OK, body)
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

async fn catalog(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let entries = match discover(&shared, &caller, "").await {
        Ok(entries) => entries,
        Err(e) => return rest_error(&e),
    };
    let base = &shared.config.public_url;
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "href": format!("{base}/a2a/c/{}/.well-known/agent-card.json", encode_segment(&e.capability)),
                "type": "application/json",
                "title": e.capability,
            })
        })
        .collect();
    let body = json!({"linkset": [{
        "anchor": format!("{base}/.well-known/api-catalog"),
        "item": items,
    }]});
    let mut response = json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/linkset+json"),
    );
    response
}

// ---- JSON-RPC ----

fn version_header(headers: &HeaderMap) -> Option<&str> {
    headers.get("a2a-version").and_then(|v| v.to_str().ok())
}

async fn jsonrpc(
    State(shared): State<Arc<Shared>>,
    Path(cap): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let body = match read_counted(&shared, body, None, started).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match jsonrpc_call(&cap, &headers, &body) {
        Ok((call, dialect)) => forward(&shared, &cap, &caller, call, dialect, started).await,
        Err(Refusal {
            error,
            id,
            dialect,
            method,
        }) => {
            let method = method.map_or("unknown", Method::name);
            let elapsed = started.elapsed();
            shared
                .config
                .metrics
                .answered(dialect, method, error.kind.reason(), elapsed);
            rpc_error(&error, &id)
        }
    }
}

/// A request the front door answers itself, with what is known of it.
struct Refusal {
    error: A2aError,
    id: Value,
    dialect: Option<Dialect>,
    method: Option<Method>,
}

impl Refusal {
    fn new(error: A2aError, id: Value) -> Self {
        Self {
            error,
            id,
            dialect: None,
            method: None,
        }
    }
}

/// A JSON-RPC request body as a v1.0 call, and the caller's dialect.
fn jsonrpc_call(cap: &str, headers: &HeaderMap, body: &[u8]) -> Result<(Call, Dialect), Refusal> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        let error = A2aError::new(ErrorKind::Parse, format!("the body is not JSON: {e}"));
        Refusal::new(error, Value::Null)
    })?;
    let (name, params, id) =
        binding::envelope(&value).map_err(|(error, id)| Refusal::new(error, id))?;
    let (method, dialect) =
        method::jsonrpc_dialect(name, version_header(headers)).map_err(|error| Refusal {
            method: Method::from_v1(name),
            ..Refusal::new(error, id.clone())
        })?;
    let params = prepare(method, dialect, cap, params).map_err(|error| Refusal {
        error,
        id: id.clone(),
        dialect: Some(dialect),
        method: Some(method),
    })?;
    Ok((Call { method, params, id }, dialect))
}

/// Checks the tenant, refuses what the front door does not forward, and converts v0.3 params.
fn prepare(method: Method, dialect: Dialect, cap: &str, params: Value) -> Result<Value, A2aError> {
    if let Some(tenant) = params.get("tenant").and_then(Value::as_str) {
        if !tenant.is_empty() && tenant != cap {
            return Err(A2aError::new(
                ErrorKind::InvalidParams,
                format!("tenant {tenant:?} disagrees with the capability {cap:?} in the path"),
            ));
        }
    }
    if !method.is_forwarded() {
        return Err(method.refusal());
    }
    if dialect == Dialect::JsonRpc03 {
        convert::params_v03_to_v1(method, &params)
    } else {
        Ok(params)
    }
}

// ---- HTTP+JSON ----

async fn rest(
    State(shared): State<Arc<Shared>>,
    Path((cap, path)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
    http_method: HttpMethod,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let rest = Some(Dialect::Rest1);
    let body = match read_counted(&shared, body, rest, started).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match rest_call(&cap, &path, &http_method, &query, &headers, &body) {
        Ok(call) => forward(&shared, &cap, &caller, call, Dialect::Rest1, started).await,
        Err(Refusal { error, method, .. }) => {
            let method = method.map_or("unknown", Method::name);
            shared
                .config
                .metrics
                .answered(rest, method, error.kind.reason(), started.elapsed());
            rest_error(&error)
        }
    }
}

/// An HTTP+JSON request as a v1.0 call.
fn rest_call(
    cap: &str,
    path: &str,
    http_method: &HttpMethod,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Call, Refusal> {
    let version = version_header(headers);
    let refuse = |error| Refusal {
        dialect: Some(Dialect::Rest1),
        ..Refusal::new(error, Value::Null)
    };
    if method::header_major(version).map_err(refuse)? != 1 {
        return Err(refuse(method::unsupported_version(version)));
    }
    let (method, params) = rest_route(cap, path, http_method, query, body).map_err(refuse)?;
    let params = prepare(method, Dialect::Rest1, cap, params).map_err(|error| Refusal {
        method: Some(method),
        ..refuse(error)
    })?;
    Ok(Call {
        method,
        params,
        id: json!(1),
    })
}

/// The method and params of an HTTP+JSON request to `/rest/{path}`.
fn rest_route(
    cap: &str,
    path: &str,
    http_method: &HttpMethod,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<(Method, Value), A2aError> {
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let known = |s: &str| s.starts_with("message:") || s == "tasks" || s == "extendedAgentCard";
    let mut tenant = None;
    if segments.len() > 1 && !known(segments[0]) {
        tenant = Some(segments.remove(0));
    }
    if let Some(tenant) = tenant {
        if tenant != cap {
            return Err(A2aError::new(
                ErrorKind::InvalidParams,
                format!("tenant {tenant:?} disagrees with the capability {cap:?} in the path"),
            ));
        }
    }
    let json_body = || -> Result<Value, A2aError> {
        if body.is_empty() {
            return Ok(json!({}));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| A2aError::new(ErrorKind::Parse, format!("the body is not JSON: {e}")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(A2aError::new(
                ErrorKind::InvalidParams,
                "the body must be a JSON object",
            ))
        }
    };
    let not_found = || {
        A2aError::new(
            ErrorKind::MethodNotFound,
            format!("no A2A operation at {http_method} /rest/{path}"),
        )
    };
    let is_post = http_method == HttpMethod::POST;
    let is_get = http_method == HttpMethod::GET;
    match segments.as_slice() {
        ["message:send"] if is_post => Ok((Method::SendMessage, json_body()?)),
        ["message:stream"] if is_post => Ok((Method::SendStreamingMessage, json_body()?)),
        ["extendedAgentCard"] if is_get => Ok((Method::GetExtendedAgentCard, json!({}))),
        ["tasks"] if is_get => Ok((Method::ListTasks, query_params(query))),
        ["tasks", _, "pushNotificationConfigs", ..] => Ok((Method::CreatePushConfig, json!({}))),
        ["tasks", action] => {
            let custom = action
                .rsplit_once(':')
                .filter(|(_, verb)| matches!(*verb, "cancel" | "subscribe"));
            if let Some((id, verb)) = custom {
                let method = match verb {
                    "cancel" if is_post => Method::CancelTask,
                    "subscribe" if is_post || is_get => Method::SubscribeToTask,
                    _ => return Err(not_found()),
                };
                let mut params = json_body()?;
                params["id"] = json!(id);
                Ok((method, params))
            } else if is_get {
                let mut params = query_params(query);
                params["id"] = json!(action);
                Ok((Method::GetTask, params))
            } else {
                Err(not_found())
            }
        }
        _ => Err(not_found()),
    }
}

/// Query parameters as JSON params: the integer ones (`historyLength`, `pageSize`) as numbers,
/// the rest as strings.
fn query_params(query: &HashMap<String, String>) -> Value {
    let map = query
        .iter()
        .map(|(k, v)| {
            let numeric = matches!(k.as_str(), "historyLength" | "pageSize");
            let value = match v.parse::<i64>() {
                Ok(n) if numeric => json!(n),
                _ => json!(v),
            };
            (k.clone(), value)
        })
        .collect();
    Value::Object(map)
}

// ---- forwarding ----

/// Forwards `call` and answers the caller in its dialect; counts the request.
async fn forward(
    shared: &Shared,
    cap: &str,
    caller: &Caller,
    call: Call,
    dialect: Dialect,
    started: Instant,
) -> Response {
    let (method, id) = (call.method, call.id.clone());
    let (response, outcome) = match exchange(shared, cap, caller, call, dialect).await {
        Ok(Answered::Whole(answer)) => {
            let outcome = if answer.get("error").is_some() {
                "AGENT_ERROR"
            } else {
                "OK"
            };
            (render(dialect, method, answer, &id), outcome)
        }
        Ok(Answered::Stream(response)) => (response, "STREAM"),
        Err(e) => (error_for(dialect, &e, &id), e.kind.reason()),
    };
    let elapsed = started.elapsed();
    shared
        .config
        .metrics
        .answered(Some(dialect), method.name(), outcome, elapsed);
    response
}

/// What an agent answered: one JSON-RPC response, or a stream being relayed.
enum Answered {
    Whole(Value),
    Stream(Response),
}

/// One `dmsc/1` exchange for `call`.
async fn exchange(
    shared: &Shared,
    cap: &str,
    caller: &Caller,
    call: Call,
    dialect: Dialect,
) -> Result<Answered, A2aError> {
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        let e = A2aError::new(
            ErrorKind::Overloaded,
            format!(
                "OVERLOADED: the front door is serving its limit of {} requests",
                shared.config.max_concurrent
            ),
        );
        return Err(e);
    };
    let mut request = shared
        .agent
        .request(cap)
        .content_type(CONTENT_TYPE)
        .deadline(shared.config.request_timeout);
    // A follow-up goes to the agent holding the task, named in its id.
    let task = task_id::referenced(call.method, &call.params)
        .and_then(|id| task_id::session_of(id).map(|s| (id.to_owned(), s)));
    if let Some((_, session)) = &task {
        request = request.target_session(*session);
    }
    // Policy judges the HTTP client, if the front door knows who it is.
    if let Some(identity) = &caller.0 {
        request = request.on_behalf_of(identity.as_ref());
    }
    let (mut writer, answer) = request.send_streaming();
    let payload = Bytes::from(call.encode());
    let write = async move {
        writer.write(payload).await?;
        writer.finish().await
    };
    let (written, answer) = tokio::join!(write, answer);
    let mut answer = match answer {
        Ok(answer) => answer,
        Err(e) => return Err(invoke_error(&e)),
    };
    if answer.status != Status::Ok {
        let e = match &task {
            Some((id, _)) if answer.status == Status::NoRoute => A2aError::new(
                ErrorKind::TaskNotFound,
                format!("the agent holding task {id:?} is no longer reachable"),
            ),
            _ => status_error(answer.status, &answer.message),
        };
        return Err(e);
    }
    if let Err(e) = written {
        let e = A2aError::new(ErrorKind::TargetFailed, format!("sending the request: {e}"));
        return Err(e);
    }
    let limit = shared.config.max_answer_bytes;
    if answer.content_type == STREAM_CONTENT_TYPE {
        let metrics = shared.config.metrics.clone();
        let stream = stream_events(answer, call, dialect, limit, permit, metrics);
        return Ok(Answered::Stream(stream));
    }
    if answer.content_type != CONTENT_TYPE {
        let e = A2aError::new(
            ErrorKind::InvalidAgentResponse,
            format!(
                "the agent answered content type {:?}, not the A2A binding's",
                answer.content_type
            ),
        );
        return Err(e);
    }
    let body = match answer.body(limit).await {
        Ok(body) => body,
        Err(e @ dmsc_agent::BodyError::TooLarge { .. }) => {
            let e = A2aError::new(ErrorKind::InvalidAgentResponse, format!("the answer: {e}"));
            return Err(e);
        }
        Err(e) => {
            let e = A2aError::new(ErrorKind::TargetFailed, format!("reading the answer: {e}"));
            return Err(e);
        }
    };
    binding::parse_answer(&body).map(Answered::Whole)
}

fn invoke_error(e: &InvokeError) -> A2aError {
    let status = e.status();
    A2aError::new(ErrorKind::for_status(status), format!("{status}: {e}"))
}

fn status_error(status: Status, message: &str) -> A2aError {
    let message = if message.is_empty() {
        format!("the gateway answered {status}")
    } else {
        format!("{status}: {message}")
    };
    A2aError::new(ErrorKind::for_status(status), message)
}

/// An agent's JSON-RPC response in the caller's dialect: the JSON to send, and for an
/// HTTP+JSON error its HTTP status. The result is moved, not copied.
fn in_dialect(
    dialect: Dialect,
    method: Method,
    mut answer: Value,
    id: &Value,
) -> (Value, Option<u16>) {
    if let Some(error) = answer.get_mut("error").map(Value::take) {
        if dialect == Dialect::Rest1 {
            let (status, body) = rest_from_jsonrpc(&error);
            return (body, Some(status));
        }
        return (json!({"jsonrpc": "2.0", "id": id, "error": error}), None);
    }
    let result = answer
        .get_mut("result")
        .map(Value::take)
        .unwrap_or_default();
    let result = match dialect {
        Dialect::Rest1 => return (result, None),
        Dialect::JsonRpc1 => result,
        Dialect::JsonRpc03 => convert::result_v1_to_v03(method, &result),
    };
    let mut out = serde_json::Map::with_capacity(3);
    out.insert("jsonrpc".into(), "2.0".into());
    out.insert("id".into(), id.clone());
    out.insert("result".into(), result);
    (Value::Object(out), None)
}

/// A whole JSON-RPC response from the agent, in the caller's dialect.
fn render(dialect: Dialect, method: Method, answer: Value, id: &Value) -> Response {
    let (body, status) = in_dialect(dialect, method, answer, id);
    json_value(status_code(status.unwrap_or(200)), &body)
}

/// A streamed answer as server-sent events, one JSON-RPC response (or, for HTTP+JSON, one
/// stream response) per event. A failure mid-stream ends the stream with an error event.
/// The stream holds `permit` (one of `--max-concurrent`) for as long as it lasts; at most
/// [`STREAM_BUFFER_EVENTS`] events wait for a slow client.
fn stream_events(
    mut answer: dmsc_agent::ReplyStream,
    call: Call,
    dialect: Dialect,
    limit: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<FrontMetrics>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(STREAM_BUFFER_EVENTS);
    tokio::spawn(async move {
        let _permit = permit;
        metrics.streams_open.inc();
        let _open = scopeguard(move || {
            metrics.streams_open.dec();
        });
        let mut lines = LineBuffer::new(limit);
        let mut ready = Vec::new();
        loop {
            let chunk = match answer.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    let e = A2aError::new(
                        ErrorKind::TargetFailed,
                        format!("the agent's stream failed: {e}"),
                    );
                    let _ = tx.send(error_event(dialect, &e, &call.id)).await;
                    return;
                }
            };
            if let Err(e) = lines.push(&chunk, &mut ready) {
                let _ = tx.send(error_event(dialect, &e, &call.id)).await;
                return;
            }
            for line in ready.drain(..) {
                let (event, last) = match binding::parse_answer(&line) {
                    Ok(response) => (event(dialect, call.method, response, &call.id), false),
                    // Not an A2A event: say so and end the stream.
                    Err(e) => (error_event(dialect, &e, &call.id), true),
                };
                if tx.send(event).await.is_err() || last {
                    return; // the client went away (dropping the answer cancels it), or failed
                }
            }
        }
        if let Some(rest) = lines.finish() {
            let event = match binding::parse_answer(&rest) {
                Ok(response) => event(dialect, call.method, response, &call.id),
                Err(e) => error_event(dialect, &e, &call.id),
            };
            let _ = tx.send(event).await;
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One event of a stream, in the caller's dialect (an HTTP+JSON error is an `error` event).
fn event(dialect: Dialect, method: Method, response: Value, id: &Value) -> Event {
    match in_dialect(dialect, method, response, id) {
        (body, Some(_)) => Event::default().event("error").data(body.to_string()),
        (body, None) => Event::default().data(body.to_string()),
    }
}

fn error_event(dialect: Dialect, e: &A2aError, id: &Value) -> Event {
    match dialect {
        Dialect::Rest1 => Event::default()
            .event("error")
            .data(e.rest_body().to_string()),
        _ => Event::default().data(e.jsonrpc_response(id).to_string()),
    }
}

// ---- responses ----

/// [`read_body`] with the front door's limit; a refusal is counted.
async fn read_counted(
    shared: &Shared,
    body: Body,
    dialect: Option<Dialect>,
    started: Instant,
) -> Result<Bytes, Response> {
    read_body(body, shared.config.max_body_bytes)
        .await
        .inspect_err(|_| {
            let reason = ErrorKind::InvalidRequest.reason();
            let metrics = &shared.config.metrics;
            metrics.answered(dialect, "unknown", reason, started.elapsed());
        })
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    let Ok(read) = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await
    else {
        let message = format!("the request body did not arrive within {BODY_TIMEOUT:?}");
        let body = A2aError::new(ErrorKind::InvalidRequest, message).rest_body();
        return Err(json_value(StatusCode::REQUEST_TIMEOUT, &body));
    };
    read.map_err(|e| {
        let message =
            format!("the request body is over the limit of {limit} bytes, or broken ({e})");
        let body = A2aError::new(ErrorKind::InvalidRequest, message).rest_body();
        json_value(StatusCode::PAYLOAD_TOO_LARGE, &body)
    })
}

fn error_for(dialect: Dialect, e: &A2aError, id: &Value) -> Response {
    match dialect {
        Dialect::Rest1 => rest_error(e),
        _ => rpc_error(e, id),
    }
}

fn rpc_error(e: &A2aError, id: &Value) -> Response {
    json_value(StatusCode::OK, &e.jsonrpc_response(id))
}

fn rest_error(e: &A2aError) -> Response {
    json_value(status_code(e.kind.http_status()), &e.rest_body())
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_value(status: StatusCode, value: &Value) -> Response {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The address a front door listening on `addr` is reached at, for cards.
pub fn default_public_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, method: HttpMethod, body: &[u8]) -> Result<(Method, Value), ErrorKind> {
        rest_route("echo", path, &method, &HashMap::new(), body).map_err(|e| e.kind)
    }

    #[test]
    fn rest_routes() {
        use HttpMethod as H;
        let found = [
            (
                "message:send",
                H::POST,
                &b"{\"message\":{}}"[..],
                Method::SendMessage,
                json!({"message": {}}),
            ),
            (
                "echo/message:stream",
                H::POST,
                b"",
                Method::SendStreamingMessage,
                json!({}),
            ),
            (
                "tasks/t1",
                H::GET,
                b"",
                Method::GetTask,
                json!({"id": "t1"}),
            ),
            (
                "tasks/t1:cancel",
                H::POST,
                b"",
                Method::CancelTask,
                json!({"id": "t1"}),
            ),
            (
                "tasks/t1:subscribe",
                H::POST,
                b"",
                Method::SubscribeToTask,
                json!({"id": "t1"}),
            ),
            (
                "tasks/a:b",
                H::GET,
                b"",
                Method::GetTask,
                json!({"id": "a:b"}),
            ),
        ];
        for (path, method, body, expected, params) in found {
            assert_eq!(route(path, method, body), Ok((expected, params)), "{path}");
        }
        let refused = [
            (
                "other/message:send",
                H::POST,
                &b""[..],
                ErrorKind::InvalidParams,
            ),
            ("message:send", H::GET, b"", ErrorKind::MethodNotFound),
            ("tasks/t1:explode", H::POST, b"", ErrorKind::MethodNotFound),
            ("message:send", H::POST, b"[1]", ErrorKind::InvalidParams),
            ("message:send", H::POST, b"{", ErrorKind::Parse),
        ];
        for (path, method, body, expected) in refused {
            assert_eq!(route(path, method, body), Err(expected), "{path}");
        }
    }

    #[test]
    fn tenant_must_match_the_path() {
        let params = json!({"tenant": "other", "message": {}});
        let e = prepare(Method::SendMessage, Dialect::JsonRpc1, "echo", params).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidParams);
        let params = json!({"tenant": "echo", "message": {}});
        assert!(prepare(Method::SendMessage, Dialect::JsonRpc1, "echo", params).is_ok());
    }

    #[test]
    fn cards_keep_clients_on_the_front_door() {
        let entry = DiscoveryEntry {
            capability: "sum up".into(),
            description: String::new(),
            providers: 2,
            tags: vec!["text".into()],
            input_modes: vec![],
            output_modes: vec!["application/json".into()],
        };
        let card = capability_card("http://gw:8080", &entry);
        assert_eq!(card["url"], "http://gw:8080/a2a/c/sum%20up");
        for interface in card["supportedInterfaces"].as_array().unwrap() {
            assert!(interface["url"]
                .as_str()
                .unwrap()
                .starts_with("http://gw:8080/a2a/c/sum%20up"));
        }
        assert_eq!(card["supportedInterfaces"][0]["protocolVersion"], "1.0");
        assert_eq!(card["skills"][0]["id"], "sum up");
        assert_eq!(card["defaultOutputModes"], json!(["application/json"]));
    }
}
