//! The adapter: attaches an unmodified A2A agent (JSON-RPC of A2A 1.x or 0.3, or HTTP+JSON of
//! 1.x) to a gateway.
//!
//! It reads the agent's card from `/.well-known/agent-card.json`, attaches with it (each skill
//! a capability, tags and modes kept), and turns each invocation on the A2A binding into a
//! JSON-RPC call on the agent: `SendMessage` and friends are POSTed as they are,
//! `SendStreamingMessage` and `SubscribeToTask` are read back as server-sent events and relayed
//! one event per line. An agent that speaks only A2A 0.3 gets v0.3 calls and its answers are
//! turned back into v1.0 ([`convert`]); one that offers only HTTP+JSON gets each call on its
//! route, and its answers wrapped into JSON-RPC responses. It re-reads the card every `card_interval` (with `If-None-Match`) and
//! updates the capabilities when it changed; after `unhealthy_after` failed reads in a row it
//! detaches, so the gateway stops routing to a dead agent, and attaches again once the card
//! can be read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dmsc_agent::{
    Agent, AgentCard, AgentConfig, HandlerError, Handlers, Request, Response, SessionId, Status,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE as HTTP_CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::binding::{self, Call, CONTENT_TYPE, STREAM_CONTENT_TYPE};
use crate::convert;
use crate::error::{A2aError, ErrorKind};
use crate::method::Method;
use crate::sse::SseParser;
use crate::task_id::{self, ForeignTask};

/// The header carrying the caller's verified identity to the agent.
pub const CALLER_HEADER: &str = "dmsc-caller";

/// The header carrying the bridge that sent the request on the caller's behalf, if any.
pub const VIA_HEADER: &str = "dmsc-via";

/// Adapter settings.
#[derive(Debug, Clone)]
pub struct AdaptConfig {
    /// The agent's base URL; its card is at `<agent_url>/.well-known/agent-card.json`.
    pub agent_url: String,
    /// Where to send JSON-RPC calls; `None` takes the card's first JSON-RPC 1.x interface.
    pub rpc_url: Option<String>,
    /// How often the card is re-read (and the agent's health checked).
    pub card_interval: Duration,
    /// Failed card reads in a row after which the capabilities are withdrawn.
    pub unhealthy_after: u32,
    /// Time the agent has to begin its answer (or the caller's deadline, if shorter).
    pub upstream_timeout: Duration,
    /// Largest answer or streamed event accepted from the agent (bytes).
    pub max_message_bytes: usize,
}

impl AdaptConfig {
    /// Defaults for the agent at `agent_url`.
    pub fn new(agent_url: impl Into<String>) -> Self {
        Self {
            agent_url: agent_url.into().trim_end_matches('/').to_owned(),
            rpc_url: None,
            card_interval: Duration::from_secs(30),
            unhealthy_after: 3,
            upstream_timeout: Duration::from_secs(60),
            max_message_bytes: binding::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why the card could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CardProblem {
    /// The agent could not be reached or answered an HTTP error.
    #[error("reading the card: {0}")]
    Unreachable(String),
    /// The card is not a card this adapter can attach with.
    #[error("the card: {0}")]
    Invalid(String),
}

/// The result of reading the card.
#[derive(Debug)]
pub enum CardFetch {
    /// A card (new, or changed since the ETag given).
    Changed {
        /// The parsed card.
        card: Box<AgentCard>,
        /// Its ETag, if the agent sent one.
        etag: Option<String>,
    },
    /// The card is the one with the ETag given (HTTP 304).
    Unchanged,
}

/// How the agent is called: the binding and A2A version of the interface chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstreamed {
    /// JSON-RPC, A2A 1.x: calls are passed on as they are.
    V1,
    /// JSON-RPC, A2A 0.3: calls are converted to v0.3 and answers back to v1.0.
    V03,
    /// HTTP+JSON, A2A 1.x: each call becomes its route, each answer a JSON-RPC response.
    Rest,
}

/// The A2A agent seen over HTTP.
#[derive(Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    config: AdaptConfig,
    rpc: Mutex<Option<(Uri, Upstreamed)>>,
}

const CARD_PATH: &str = "/.well-known/agent-card.json";
const CARD_READ_LIMIT: usize = 1 << 20;
const CARD_TIMEOUT: Duration = Duration::from_secs(5);

impl Upstream {
    /// An HTTP client for the agent in `config`.
    pub fn new(config: AdaptConfig) -> Result<Self, CardProblem> {
        let rpc = match &config.rpc_url {
            Some(url) => Some((parse_uri(url)?, Upstreamed::V1)),
            None => None,
        };
        parse_uri(&config.agent_url)?;
        // Requests are small and latency-bound: no Nagle delay on the agent's connections.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            config,
            rpc: Mutex::new(rpc),
        })
    }

    /// Reads the card (conditionally, if `etag` is given), all of it within 5 s.
    pub async fn fetch_card(&self, etag: Option<&str>) -> Result<CardFetch, CardProblem> {
        tokio::time::timeout(CARD_TIMEOUT, self.read_card(etag))
            .await
            .unwrap_or_else(|_| {
                Err(CardProblem::Unreachable(format!(
                    "no whole card within {CARD_TIMEOUT:?}"
                )))
            })
    }

    async fn read_card(&self, etag: Option<&str>) -> Result<CardFetch, CardProblem> {
        let uri = parse_uri(&format!("{}{CARD_PATH}", self.config.agent_url))?;
        let mut request = hyper::Request::get(uri).header("a2a-version", "1.0");
        if let Some(etag) = etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| CardProblem::Invalid(e.to_string()))?;
        let unreachable = |e: String| CardProblem::Unreachable(e);
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(CardFetch::Unchanged);
        }
        if !response.status().is_success() {
            return Err(unreachable(format!("HTTP {}", response.status())));
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(response.into_body(), CARD_READ_LIMIT)
            .await
            .map_err(unreachable)?;
        let card = AgentCard::from_json(&body).map_err(|e| CardProblem::Invalid(e.to_string()))?;
        if self.config.rpc_url.is_none() {
            let (url, version) = agent_interface(&card)?;
            *self.rpc.lock().unwrap_or_else(|p| p.into_inner()) = Some((parse_uri(&url)?, version));
        }
        Ok(CardFetch::Changed {
            card: Box::new(card),
            etag,
        })
    }

    fn rpc_uri(&self) -> Option<(Uri, Upstreamed)> {
        self.rpc.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves one invocation: the whole A2A exchange with the agent.
    pub async fn serve(&self, mut request: Request) -> Result<Response, HandlerError> {
        if request.content_type != CONTENT_TYPE {
            return Ok(Response::error(
                Status::BadRequest,
                format!(
                    "this agent speaks A2A: send content type {CONTENT_TYPE}, not {:?}",
                    request.content_type
                ),
            ));
        }
        let body = request.payload().await?;
        let mut call = match Call::decode(&body) {
            Ok(call) => call,
            Err((e, id)) => return Ok(whole(&e.jsonrpc_response(&id))),
        };
        // Task ids arrive qualified with this agent's session; the agent knows its own.
        let session = request.agent().and_then(Agent::session);
        let mut stripped = false;
        if let Some(session) = session {
            match task_id::strip(call.method, &mut call.params, session) {
                Ok(changed) => stripped = changed,
                Err(ForeignTask(id)) => {
                    let e = A2aError::new(
                        ErrorKind::TaskNotFound,
                        format!("task {id:?} is held by another agent"),
                    );
                    return Ok(whole(&e.jsonrpc_response(&call.id)));
                }
            }
        }
        let Some((uri, version)) = self.rpc_uri() else {
            return Ok(Response::error(
                Status::Unavailable,
                "the A2A agent's card has not been read yet",
            ));
        };
        let built = match version {
            // The request as it came, unless a task id in it was rewritten.
            Upstreamed::V1 if !stripped => Ok((hyper::Method::POST, uri.clone(), body)),
            Upstreamed::V1 => Ok((hyper::Method::POST, uri.clone(), Bytes::from(call.encode()))),
            Upstreamed::V03 => {
                v03_request(&call).map(|body| (hyper::Method::POST, uri.clone(), body))
            }
            Upstreamed::Rest => rest_request(&call, &uri),
        };
        let (http_method, target, body) = match built {
            Ok(built) => built,
            Err(e) => return Ok(whole(&e.jsonrpc_response(&call.id))),
        };
        let header = if version == Upstreamed::V03 {
            "0.3"
        } else {
            "1.0"
        };
        let mut http = hyper::Request::builder()
            .method(http_method)
            .uri(target)
            .header(HTTP_CONTENT_TYPE, "application/json")
            .header("a2a-version", header);
        if let Ok(caller) = HeaderValue::from_str(&request.caller) {
            http = http.header(CALLER_HEADER, caller);
        }
        if let Ok(via) = HeaderValue::from_str(&request.via) {
            if !request.via.is_empty() {
                http = http.header(VIA_HEADER, via);
            }
        }
        if call.method.is_streaming() {
            http = http.header(ACCEPT, "text/event-stream");
        }
        let http = http
            .body(Full::new(body))
            .map_err(|e| HandlerError::new(e.to_string()))?;
        // The caller's deadline, if shorter.
        let wait = request.deadline.map_or(self.config.upstream_timeout, |d| {
            d.min(self.config.upstream_timeout)
        });
        let response = match tokio::time::timeout(wait, self.client.request(http)).await {
            Err(_) => {
                return Ok(Response::error(
                    Status::DeadlineExceeded,
                    format!("the A2A agent did not answer within {wait:?}"),
                ))
            }
            Ok(Err(e)) => {
                return Ok(Response::error(
                    Status::TargetFailed,
                    format!("the A2A agent at {uri} is unreachable: {e}"),
                ))
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let is_events = response
            .headers()
            .get(HTTP_CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let limit = self.config.max_message_bytes;
        if is_events && status.is_success() {
            return Ok(relay_events(
                response.into_body(),
                call,
                session,
                version,
                limit,
            ));
        }
        let body = match read_limited(response.into_body(), limit).await {
            Ok(body) => body,
            Err(e) => {
                return Ok(Response::error(
                    Status::TargetFailed,
                    format!("reading the A2A agent's answer: {e}"),
                ))
            }
        };
        match answer_v1(&body, status, &call, version) {
            Ok(mut answer) => {
                let qualified =
                    session.is_some_and(|s| task_id::qualify_answer(call.method, &mut answer, s));
                if version == Upstreamed::V1 && !qualified {
                    // The agent's bytes as they came: checked, nothing to rewrite.
                    Ok(Response::ok(body).with_content_type(CONTENT_TYPE))
                } else {
                    Ok(whole(&answer))
                }
            }
            Err(e) => Ok(Response::error(
                Status::TargetFailed,
                format!("the A2A agent answered HTTP {status}: {}", e.message),
            )),
        }
    }
}

fn parse_uri(url: &str) -> Result<Uri, CardProblem> {
    let uri: Uri = url
        .parse()
        .map_err(|e| CardProblem::Invalid(format!("{url:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(CardProblem::Invalid(format!(
            "{url:?}: only http:// agents are supported (the adapter runs beside the agent)"
        )));
    }
    Ok(uri)
}

/// The interface to call: the card's first JSON-RPC one of protocol version 1.x; else its first
/// HTTP+JSON one of version 1.x; else its first JSON-RPC one of version 0.x; else, for a v0.3
/// card, its `url` (preferred transport JSON-RPC, the default).
pub fn agent_interface(card: &AgentCard) -> Result<(String, Upstreamed), CardProblem> {
    let major = |version: Option<&str>, m: &str| {
        version.is_some_and(|v| v == m || v.starts_with(&format!("{m}.")))
    };
    let jsonrpc = |i: &&dmsc_protocol::card::AgentInterface| {
        i.protocol_binding.eq_ignore_ascii_case("JSONRPC")
    };
    let find = |m: &str| {
        card.interfaces
            .iter()
            .filter(jsonrpc)
            .find(|i| major(i.protocol_version.as_deref(), m))
            .map(|i| i.url.clone())
    };
    if let Some(url) = find("1") {
        return Ok((url, Upstreamed::V1));
    }
    let rest = card.interfaces.iter().find(|i| {
        i.protocol_binding.eq_ignore_ascii_case("HTTP+JSON")
            && major(i.protocol_version.as_deref(), "1")
    });
    if let Some(interface) = rest {
        return Ok((interface.url.clone(), Upstreamed::Rest));
    }
    if let Some(url) = find("0") {
        return Ok((url, Upstreamed::V03));
    }
    let legacy_jsonrpc = card
        .preferred_transport
        .as_deref()
        .is_none_or(|t| t.eq_ignore_ascii_case("JSONRPC"));
    let legacy_v03 = card
        .protocol_version
        .as_deref()
        .is_none_or(|v| major(Some(v), "0"));
    match &card.url {
        Some(url) if legacy_jsonrpc && legacy_v03 => Ok((url.clone(), Upstreamed::V03)),
        _ => Err(CardProblem::Invalid(
            "the agent offers no JSON-RPC (1.x or 0.3) or HTTP+JSON (1.x) interface; give \
             --rpc-url to name a JSON-RPC 1.x one"
                .into(),
        )),
    }
}

/// The v0.3 JSON-RPC request for `call`.
fn v03_request(call: &Call) -> Result<Bytes, A2aError> {
    let method = call.method.v03_name().ok_or_else(|| {
        A2aError::new(
            ErrorKind::UnsupportedOperation,
            format!(
                "the agent speaks A2A 0.3, which has no {}",
                call.method.name()
            ),
        )
    })?;
    let params = convert::params_v1_to_v03(call.method, &call.params)?;
    Ok(Bytes::from(binding::request_bytes(
        &call.id, method, &params,
    )))
}

/// The agent's answer (a whole body with its HTTP status, or one event) as a v1.0 JSON-RPC
/// response: JSON-RPC answers are checked (and a v0.3 `result` converted; errors are the same
/// in both versions); an HTTP+JSON answer is wrapped, its error body mapped back to a JSON-RPC
/// error by its `ErrorInfo` reason (else by its HTTP status).
fn answer_v1(
    bytes: &[u8],
    status: StatusCode,
    call: &Call,
    version: Upstreamed,
) -> Result<Value, A2aError> {
    if version != Upstreamed::Rest {
        let mut answer = binding::parse_answer(bytes)?;
        if version == Upstreamed::V03 {
            if let Some(result) = answer.get("result") {
                let converted = convert::result_v03_to_v1(call.method, result)?;
                answer["result"] = converted;
            }
        }
        return Ok(answer);
    }
    let body: Value = serde_json::from_slice(bytes).map_err(|e| {
        A2aError::new(
            ErrorKind::InvalidAgentResponse,
            format!("the agent answered HTTP {status}, not JSON: {e}"),
        )
    })?;
    let error = body.get("error").filter(|e| e.is_object());
    if status.is_success() && error.is_none() {
        return Ok(json!({"jsonrpc": "2.0", "id": call.id, "result": body}));
    }
    let error = error.cloned().unwrap_or_default();
    let reason = error["details"]
        .as_array()
        .and_then(|details| details.iter().find_map(|d| d["reason"].as_str()));
    let kind = reason
        .and_then(ErrorKind::from_reason)
        .unwrap_or(match status.as_u16() {
            404 => ErrorKind::TaskNotFound,
            400 => ErrorKind::InvalidParams,
            _ => ErrorKind::Internal,
        });
    let message = error["message"].as_str().map_or_else(
        || format!("the agent answered HTTP {status}"),
        str::to_owned,
    );
    Ok(A2aError::new(kind, message).jsonrpc_response(&call.id))
}

/// The HTTP+JSON request for `call` on the interface at `base`: method, URL and body.
fn rest_request(call: &Call, base: &Uri) -> Result<(hyper::Method, Uri, Bytes), A2aError> {
    use hyper::Method as M;
    let base = base.to_string();
    let base = base.trim_end_matches('/');
    let id = || {
        call.params["id"]
            .as_str()
            .map(crate::front::encode_segment)
            .ok_or_else(|| A2aError::new(ErrorKind::InvalidParams, "params.id is required"))
    };
    let params_json = || Bytes::from(serde_json::to_vec(&call.params).unwrap_or_default());
    let query = |keys: &[&str]| {
        let pairs: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                let v = &call.params[*k];
                let text = v
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| v.as_i64().map(|n| n.to_string()))?;
                Some(format!("{k}={}", crate::front::encode_segment(&text)))
            })
            .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    };
    let (method, path, body) = match call.method {
        Method::SendMessage => (M::POST, "/message:send".to_owned(), params_json()),
        Method::SendStreamingMessage => (M::POST, "/message:stream".to_owned(), params_json()),
        Method::GetTask => (
            M::GET,
            format!("/tasks/{}{}", id()?, query(&["historyLength"])),
            Bytes::new(),
        ),
        Method::CancelTask => (M::POST, format!("/tasks/{}:cancel", id()?), params_json()),
        Method::SubscribeToTask => (M::POST, format!("/tasks/{}:subscribe", id()?), Bytes::new()),
        Method::ListTasks => (
            M::GET,
            format!(
                "/tasks{}",
                query(&[
                    "contextId",
                    "status",
                    "pageSize",
                    "pageToken",
                    "historyLength"
                ])
            ),
            Bytes::new(),
        ),
        other => {
            return Err(A2aError::new(
                ErrorKind::UnsupportedOperation,
                format!("{} is not forwarded to HTTP+JSON agents", other.name()),
            ))
        }
    };
    let uri = format!("{base}{path}").parse().map_err(|e| {
        A2aError::new(
            ErrorKind::InvalidParams,
            format!("a URL for the agent: {e}"),
        )
    })?;
    Ok((method, uri, body))
}

async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, String> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| format!("{e} (limit {limit} bytes)"))
}

fn whole(response: &Value) -> Response {
    Response::ok(serde_json::to_vec(response).unwrap_or_default()).with_content_type(CONTENT_TYPE)
}

/// Relays the agent's event stream as the binding's lines. A broken or malformed stream ends
/// with an error line, so the caller gets a terminal event rather than a silent end.
fn relay_events(
    mut body: Incoming,
    call: Call,
    session: Option<SessionId>,
    version: Upstreamed,
    limit: usize,
) -> Response {
    let (response, mut writer) = Response::streaming(STREAM_CONTENT_TYPE);
    tokio::spawn(async move {
        let mut parser = SseParser::new(limit);
        let mut events = Vec::new();
        let failure = loop {
            let frame = match body.frame().await {
                None => break None,
                Some(Err(e)) => {
                    break Some(A2aError::new(
                        ErrorKind::TargetFailed,
                        format!("the A2A agent's event stream broke: {e}"),
                    ))
                }
                Some(Ok(frame)) => frame,
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if let Err(e) = parser.push(data, &mut events) {
                break Some(e);
            }
            let mut bad = None;
            for event in events.drain(..) {
                match answer_v1(&event, StatusCode::OK, &call, version) {
                    Ok(mut value) => {
                        if let Some(session) = session {
                            task_id::qualify_answer(call.method, &mut value, session);
                        }
                        let mut line = serde_json::to_vec(&value).unwrap_or_default();
                        line.push(b'\n');
                        if writer.write(line).await.is_err() {
                            return; // the caller went away
                        }
                    }
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
            if bad.is_some() {
                break bad;
            }
        };
        if let Some(e) = failure {
            let mut line = serde_json::to_vec(&e.jsonrpc_response(&call.id)).unwrap_or_default();
            line.push(b'\n');
            let _ = writer.write(line).await;
        }
        let _ = writer.finish().await;
    });
    response
}

/// The handlers of an adapted agent: every capability goes to `upstream`.
pub fn handlers(upstream: Arc<Upstream>) -> Handlers {
    Handlers::new().fallback(move |request: Request| {
        let upstream = upstream.clone();
        async move { upstream.serve(request).await }
    })
}

/// Runs the adapter until `shutdown` completes: attach when the card can be read, update on
/// change, withdraw while the agent is unhealthy, detach at the end. `attach_config` turns a
/// card into the SDK configuration (identity, gateway).
pub async fn run(
    config: AdaptConfig,
    attach_config: impl Fn(AgentCard) -> anyhow::Result<AgentConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let interval = config.card_interval;
    let unhealthy_after = config.unhealthy_after.max(1);
    let upstream = Arc::new(Upstream::new(config)?);
    let handlers = handlers(upstream.clone());
    let mut attached: Option<Agent> = None;
    let mut etag: Option<String> = None;
    let mut failures = 0u32;
    tokio::pin!(shutdown);
    loop {
        let fetched = tokio::select! {
            fetched = upstream.fetch_card(etag.as_deref()) => fetched,
            () = &mut shutdown => break,
        };
        match fetched {
            Ok(CardFetch::Unchanged) => failures = 0,
            Ok(CardFetch::Changed { card, etag: new }) => {
                failures = 0;
                let skills: Vec<String> = card.capabilities().map(str::to_owned).collect();
                match &attached {
                    Some(agent) => match agent.update_card(*card).await {
                        Ok(()) => {
                            etag = new;
                            println!("dmsc-a2a adapt: card updated: {}", skills.join(" "));
                        }
                        Err(e) => tracing::warn!("updating the card at the gateway: {e}"),
                    },
                    None => match Agent::attach(attach_config(*card)?, handlers.clone()).await {
                        Ok(agent) => {
                            etag = new;
                            println!("dmsc-a2a adapt: attached: {}", skills.join(" "));
                            let refused = agent.refused();
                            if !refused.is_empty() {
                                tracing::warn!("policy refused capabilities: {refused:?}");
                            }
                            attached = Some(agent);
                        }
                        Err(e) => tracing::warn!("attaching to the gateway: {e}"),
                    },
                }
            }
            Err(e @ CardProblem::Invalid(_)) => tracing::warn!("{e}; retrying"),
            Err(e) => {
                failures += 1;
                // Warn on the first failure and at withdrawal, not at every read after.
                if failures == 1 || failures == unhealthy_after {
                    tracing::warn!("the A2A agent is unhealthy ({failures} in a row): {e}");
                } else {
                    tracing::debug!("the A2A agent is unhealthy ({failures} in a row): {e}");
                }
                if failures >= unhealthy_after {
                    if let Some(agent) = attached.take() {
                        println!("dmsc-a2a adapt: withdrawn: the agent is unhealthy");
                        etag = None;
                        if let Err(e) = agent.detach().await {
                            tracing::warn!("detaching: {e}");
                        }
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut shutdown => break,
        }
    }
    if let Some(agent) = attached {
        agent.detach().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(json: &str) -> AgentCard {
        AgentCard::from_json(json.as_bytes()).unwrap()
    }

    /// A card with these extra members (interfaces, `url`, ...) and one skill.
    fn card_with(members: &str) -> AgentCard {
        card(&format!(
            r#"{{"name":"a","description":"","version":"1",{members},
               "skills":[{{"id":"s","name":"s","description":"","tags":[]}}]}}"#
        ))
    }

    fn interface(binding: &str, version: &str, url: &str) -> String {
        format!(r#"{{"url":"{url}","protocolBinding":"{binding}","protocolVersion":"{version}"}}"#)
    }

    #[test]
    fn the_interface_called_is_the_newest_json_rpc_one() {
        let interfaces = |list: &[String]| format!(r#""supportedInterfaces":[{}]"#, list.join(","));
        let rest = interface("HTTP+JSON", "1.0", "http://h/rest");
        let dual = card_with(&interfaces(&[
            rest.clone(),
            interface("JSONRPC", "0.3", "http://h/old"),
            interface("JSONRPC", "1.0", "http://h/"),
        ]));
        let chosen = |card: &AgentCard| agent_interface(card).unwrap();
        assert_eq!(chosen(&dual), ("http://h/".to_owned(), Upstreamed::V1));
        let v03 = card_with(&interfaces(&[interface("JSONRPC", "0.3", "http://h/")]));
        assert_eq!(chosen(&v03), ("http://h/".to_owned(), Upstreamed::V03));
        // A card of v0.3 itself: `url` and (by default) JSON-RPC.
        let legacy = card_with(r#""url":"http://h/","protocolVersion":"0.3.0""#);
        assert_eq!(chosen(&legacy), ("http://h/".to_owned(), Upstreamed::V03));
        let rest_only = card_with(&interfaces(&[rest]));
        assert_eq!(
            chosen(&rest_only),
            ("http://h/rest".to_owned(), Upstreamed::Rest)
        );
        let grpc_only = card_with(&interfaces(&[interface("GRPC", "1.0", "h:1")]));
        assert!(agent_interface(&grpc_only).is_err());
    }
}
