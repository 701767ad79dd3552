//! End-to-end tests of the SDK against an in-test fake gateway.
//!
//! The fake speaks `dmsc/1` with quinn: it verifies agent certificates against the test CA,
//! answers `ATTACH` (optionally offering one lane on a second endpoint), `LANE`,
//! `UPDATE_CARD`, `DISCOVER` and `DETACH`, and forwards invocations to the first attached agent
//! offering the capability, stamping the caller's SPIFFE ID, by piping the streams chunk by
//! chunk. It is deliberately simple (no policy, no deadlines of its own).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use dmsc_agent::{
    Agent, AgentCard, AgentConfig, AgentError, Backoff, BodyError, HandlerError, Handlers,
    InvokeError, Refusal, Request, Response, Skill, Status, StreamCode, TraceContext,
};
use dmsc_identity::{
    spiffe_id_from_cert, CertificateAuthority, Credentials, IssuedIdentity, PrincipalKind,
    Resumption, SpiffeId, SpiffeVerifier,
};
use dmsc_protocol::control::{ControlFrame, DiscoveryEntry, FrameBuffer, LaneToken, SessionId};
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::limits::{MAX_CONTROL_FRAME_BYTES, MAX_HEADER_BYTES};
use dmsc_protocol::ALPN_AGENT;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const DOMAIN: &str = "test.local";

// ---------------------------------------------------------------------------------------------
// The fake gateway.

/// How the fake behaves.
#[derive(Clone, Default)]
struct Options {
    /// Offer one lane (worker 1) on a second endpoint.
    lanes: bool,
    /// Refuse every attach with this.
    refuse: Option<(Refusal, String)>,
    /// Answer at most this many discovery entries, flagging the answer truncated beyond.
    max_discovery_entries: Option<usize>,
}

struct FakeGateway {
    addr: SocketAddr,
    state: Arc<State>,
    endpoints: Vec<Endpoint>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct State {
    options: Options,
    /// Lane addresses announced in ATTACH_OK (empty without lanes).
    lane_list: Vec<String>,
    next_session: AtomicU64,
    sessions: Mutex<HashMap<u64, Session>>,
    /// Invocations that arrived on a lane connection.
    arrived_on_lane: AtomicUsize,
    /// Invocations that arrived on a primary connection.
    arrived_on_primary: AtomicUsize,
    /// Invocations forwarded to a target over one of its lanes.
    forwarded_on_lane: AtomicUsize,
    next_pick: AtomicUsize,
}

struct Session {
    identity: String,
    token: [u8; 16],
    card: AgentCard,
    primary: Connection,
    lanes: Vec<Connection>,
    detached: bool,
    /// Asks the primary connection's task to send DRAIN with this grace period.
    drain: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl FakeGateway {
    async fn start(ca: &CertificateAuthority, options: Options) -> anyhow::Result<Self> {
        let id = SpiffeId::gateway(DOMAIN, "g1")?;
        Self::start_with(ca, ca.issue(&id, &["localhost"])?, options, None).await
    }

    /// Starts a gateway presenting `identity`, on `addr` if given (retrying while the port is
    /// still held by a previous instance).
    async fn start_with(
        ca: &CertificateAuthority,
        identity: IssuedIdentity,
        options: Options,
        addr: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let config = server_config(ca, identity.cert_chain(), identity.private_key())?;
        let bind = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let mut attempt = 0;
        let main = loop {
            match Endpoint::server(config.clone(), bind) {
                Ok(endpoint) => break endpoint,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "port busy; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let addr = main.local_addr()?;
        let mut endpoints = vec![main];
        let mut lane_list = Vec::new();
        if options.lanes {
            let lane = Endpoint::server(config, "127.0.0.1:0".parse()?)?;
            // Worker 0 is the main endpoint; the lane's host is unspecified on purpose, so the
            // agent must substitute the gateway's address.
            lane_list.push(addr.to_string());
            lane_list.push(format!("0.0.0.0:{}", lane.local_addr()?.port()));
            endpoints.push(lane);
        }
        let state = Arc::new(State {
            options,
            lane_list,
            next_session: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            arrived_on_lane: AtomicUsize::new(0),
            arrived_on_primary: AtomicUsize::new(0),
            forwarded_on_lane: AtomicUsize::new(0),
            next_pick: AtomicUsize::new(0),
        });
        let mut tasks = Vec::new();
        for (worker, endpoint) in endpoints.iter().enumerate() {
            let endpoint = endpoint.clone();
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(state, incoming, worker as u64).await {
                            tracing::debug!(error = %e, "fake gateway connection ended");
                        }
                    });
                }
            }));
        }
        Ok(Self {
            addr,
            state,
            endpoints,
            tasks,
        })
    }

    /// Closes every agent connection as a restarting gateway would.
    fn kick_everyone(&self) {
        let sessions: Vec<Session> = self
            .state
            .sessions
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in sessions {
            for lane in &s.lanes {
                lane.close(VarInt::from_u32(4), b"shutting down");
            }
            s.primary.close(VarInt::from_u32(4), b"shutting down");
        }
    }

    /// Sends DRAIN to every attached agent, and closes their connections after `grace_ms`.
    fn drain_everyone(&self, grace_ms: u64) {
        for s in self.state.sessions.lock().unwrap().values() {
            let _ = s.drain.send(grace_ms);
        }
    }

    /// Stops the gateway completely (the port is released).
    async fn stop(self) {
        self.kick_everyone();
        for task in &self.tasks {
            task.abort();
        }
        for endpoint in &self.endpoints {
            endpoint.close(VarInt::from_u32(4), b"stopped");
        }
        for endpoint in &self.endpoints {
            endpoint.wait_idle().await;
        }
    }

    fn sessions(&self) -> usize {
        self.state
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter(|s| !s.detached)
            .count()
    }
}

fn server_config(
    ca: &CertificateAuthority,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<quinn::ServerConfig> {
    let verifier = SpiffeVerifier::new(&[ca.cert_der()], &[PrincipalKind::Agent], &[DOMAIN])?;
    let credentials = Credentials {
        cert_chain: chain,
        private_key: key,
    };
    let quic = dmsc_identity::server_config(
        ALPN_AGENT,
        credentials,
        Arc::new(verifier),
        Resumption::Allowed,
    )?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

fn peer_id(conn: &Connection) -> anyhow::Result<String> {
    let certs = conn
        .peer_identity()
        .context("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().context("empty chain")?;
    Ok(spiffe_id_from_cert(leaf.as_ref())?.to_string())
}

async fn next_frame(
    recv: &mut RecvStream,
    frames: &mut FrameBuffer,
) -> anyhow::Result<ControlFrame> {
    loop {
        if let Some(frame) = frames.next_frame()? {
            return Ok(frame);
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => frames.extend(&chunk.bytes),
            None => bail!("control stream finished"),
        }
    }
}

async fn send_frame(send: &mut SendStream, frame: &ControlFrame) -> anyhow::Result<()> {
    send.write_all(&frame.to_bytes()?).await?;
    Ok(())
}

async fn serve_connection(
    state: Arc<State>,
    incoming: quinn::Incoming,
    worker: u64,
) -> anyhow::Result<()> {
    let conn = incoming.await?;
    let identity = peer_id(&conn)?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut frames = FrameBuffer::new(MAX_CONTROL_FRAME_BYTES);
    let (drain_tx, mut drain_rx) = tokio::sync::mpsc::unbounded_channel();
    let (session, is_lane) = match next_frame(&mut recv, &mut frames).await? {
        ControlFrame::Attach { card, .. } => {
            if let Some((refusal, reason)) = state.options.refuse.clone() {
                send_frame(&mut send, &ControlFrame::AttachRefused { refusal, reason }).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.close(VarInt::from_u32(3), b"refused");
                return Ok(());
            }
            let card = AgentCard::from_json(&card)?;
            let session = state.next_session.fetch_add(1, Ordering::Relaxed);
            let token = [session as u8; 16];
            state.sessions.lock().unwrap().insert(
                session,
                Session {
                    identity: identity.clone(),
                    token,
                    card,
                    primary: conn.clone(),
                    lanes: Vec::new(),
                    detached: false,
                    drain: drain_tx,
                },
            );
            send_frame(
                &mut send,
                &ControlFrame::AttachOk {
                    session: SessionId(session),
                    lane_token: LaneToken(token),
                    worker: 0,
                    lanes: state.lane_list.clone(),
                    max_concurrent: 64,
                    refused: Vec::new(),
                },
            )
            .await?;
            (session, false)
        }
        ControlFrame::Lane {
            session,
            lane_token,
        } => {
            let bound = {
                let mut sessions = state.sessions.lock().unwrap();
                match sessions.get_mut(&session.0) {
                    Some(s) if s.token == lane_token.0 && s.identity == identity => {
                        s.lanes.push(conn.clone());
                        true
                    }
                    _ => false,
                }
            };
            if !bound {
                send_frame(
                    &mut send,
                    &ControlFrame::AttachRefused {
                        refusal: Refusal::UnknownSession,
                        reason: "no such session".into(),
                    },
                )
                .await?;
                conn.close(VarInt::from_u32(3), b"refused");
                return Ok(());
            }
            send_frame(&mut send, &ControlFrame::LaneOk { worker }).await?;
            (session.0, true)
        }
        other => {
            conn.close(VarInt::from_u32(1), b"expected ATTACH or LANE");
            bail!("unexpected first frame {other:?}");
        }
    };

    // Invocations from this agent.
    {
        let state = state.clone();
        let conn = conn.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            while let Ok((s, r)) = conn.accept_bi().await {
                if is_lane {
                    state.arrived_on_lane.fetch_add(1, Ordering::Relaxed);
                } else {
                    state.arrived_on_primary.fetch_add(1, Ordering::Relaxed);
                }
                let state = state.clone();
                let identity = identity.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward(state, identity, s, r).await {
                        tracing::debug!(error = %e, "forward failed");
                    }
                });
            }
        });
    }

    // Control frames.
    let result = loop {
        let frame = tokio::select! {
            frame = next_frame(&mut recv, &mut frames) => frame,
            Some(grace_ms) = drain_rx.recv() => {
                send_frame(&mut send, &ControlFrame::Drain { grace_ms }).await?;
                let conn = conn.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(grace_ms)).await;
                    conn.close(VarInt::from_u32(4), b"drained");
                });
                continue;
            }
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame {
            ControlFrame::UpdateCard { card } => {
                let result = match AgentCard::from_json(&card) {
                    Ok(card) => {
                        if let Some(s) = state.sessions.lock().unwrap().get_mut(&session) {
                            s.card = card;
                        }
                        ControlFrame::UpdateResult {
                            refusal: None,
                            reason: String::new(),
                        }
                    }
                    Err(e) => ControlFrame::UpdateResult {
                        refusal: Some(Refusal::BadCard),
                        reason: e.to_string(),
                    },
                };
                send_frame(&mut send, &result).await?;
            }
            ControlFrame::Discover {
                query_id,
                prefix,
                tag,
                ..
            } => {
                let mut entries = discover(&state, &prefix, &tag);
                let limit = state.options.max_discovery_entries.unwrap_or(usize::MAX);
                let truncated = entries.len() > limit;
                entries.truncate(limit);
                send_frame(
                    &mut send,
                    &ControlFrame::DiscoverResult {
                        query_id,
                        truncated,
                        entries,
                    },
                )
                .await?;
            }
            ControlFrame::Detach => {
                if let Some(s) = state.sessions.lock().unwrap().get_mut(&session) {
                    s.detached = true;
                }
                send_frame(&mut send, &ControlFrame::Detached).await?;
            }
            _ => {}
        }
    };
    if is_lane {
        if let Some(s) = state.sessions.lock().unwrap().get_mut(&session) {
            s.lanes.retain(|c| c.stable_id() != conn.stable_id());
        }
    } else {
        let mut sessions = state.sessions.lock().unwrap();
        if sessions
            .get(&session)
            .is_some_and(|s| s.primary.stable_id() == conn.stable_id())
        {
            sessions.remove(&session);
        }
    }
    result
}

fn discover(state: &State, prefix: &str, tag: &str) -> Vec<DiscoveryEntry> {
    let mut by_name: HashMap<String, DiscoveryEntry> = HashMap::new();
    for s in state
        .sessions
        .lock()
        .unwrap()
        .values()
        .filter(|s| !s.detached)
    {
        for skill in &s.card.skills {
            if !skill.id.starts_with(prefix)
                || !(tag.is_empty() || skill.tags.iter().any(|t| t == tag))
            {
                continue;
            }
            let entry = by_name
                .entry(skill.id.clone())
                .or_insert_with(|| DiscoveryEntry {
                    capability: skill.id.clone(),
                    description: skill.description.clone(),
                    tags: skill.tags.clone(),
                    ..DiscoveryEntry::default()
                });
            entry.providers += 1;
        }
    }
    let mut entries: Vec<_> = by_name.into_values().collect();
    entries.sort_by(|a, b| a.capability.cmp(&b.capability));
    entries
}

/// Picks a connection of an agent offering `capability`, round-robin over primary and lanes.
fn pick(state: &State, capability: &str) -> Option<(Connection, bool)> {
    let sessions = state.sessions.lock().unwrap();
    let mut ids: Vec<_> = sessions
        .iter()
        .filter(|(_, s)| !s.detached && s.card.capabilities().any(|c| c == capability))
        .map(|(id, _)| *id)
        .collect();
    ids.sort_unstable();
    let s = sessions.get(ids.first()?)?;
    let n = state.next_pick.fetch_add(1, Ordering::Relaxed) % (s.lanes.len() + 1);
    Some(if n == 0 {
        (s.primary.clone(), false)
    } else {
        (s.lanes[n - 1].clone(), true)
    })
}

async fn forward(
    state: Arc<State>,
    caller: String,
    mut csend: SendStream,
    mut crecv: RecvStream,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let (capability, deadline_ms, trace, content_type, used) = loop {
        let chunk = crecv
            .read_chunk(64 * 1024, true)
            .await?
            .context("eof before header")?;
        buf.extend_from_slice(&chunk.bytes);
        match RequestHeader::decode(&buf, MAX_HEADER_BYTES) {
            Ok(Some((h, used))) => {
                break (
                    h.capability.to_owned(),
                    h.deadline_ms,
                    h.trace,
                    h.content_type.to_owned(),
                    used,
                )
            }
            Ok(None) => {}
            Err(e) => {
                respond(&mut csend, Status::BadRequest, &e.to_string()).await?;
                return Ok(());
            }
        }
    };
    let Some((target, via_lane)) = pick(&state, &capability) else {
        let _ = crecv.stop(VarInt::from_u32(1));
        respond(
            &mut csend,
            Status::NoRoute,
            "no agent offers this capability",
        )
        .await?;
        return Ok(());
    };
    if via_lane {
        state.forwarded_on_lane.fetch_add(1, Ordering::Relaxed);
    }
    let (mut tsend, trecv) = match target.open_bi().await {
        Ok(streams) => streams,
        Err(e) => {
            respond(&mut csend, Status::TargetFailed, &e.to_string()).await?;
            return Ok(());
        }
    };
    let mut out = Vec::new();
    RequestHeader {
        capability: &capability,
        deadline_ms,
        hop_count: 1,
        trace,
        content_type: &content_type,
        caller: &caller,
        target_session: 0,
        on_behalf_of: "",
        via: "",
    }
    .encode(&mut out)?;
    out.extend_from_slice(&buf[used..]);
    tsend.write_all(&out).await?;
    let up = tokio::spawn(pipe(crecv, tsend, 1));
    pipe(trecv, csend, 2).await;
    let _ = up.await;
    Ok(())
}

async fn respond(send: &mut SendStream, status: Status, message: &str) -> anyhow::Result<()> {
    let mut out = Vec::new();
    ResponseHeader {
        status,
        content_type: "",
        message,
    }
    .encode(&mut out)?;
    send.write_all(&out).await?;
    send.finish()?;
    Ok(())
}

/// Copies `from` to `to`; a reset of `from` resets `to` with `reset_code`.
async fn pipe(mut from: RecvStream, mut to: SendStream, reset_code: u32) {
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                if to.write_chunk(chunk.bytes).await.is_err() {
                    let _ = from.stop(VarInt::from_u32(1));
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(_) => {
                let _ = to.reset(VarInt::from_u32(reset_code));
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn config(
    ca: &CertificateAuthority,
    name: &str,
    gateway: SocketAddr,
    card: AgentCard,
) -> AgentConfig {
    let issued = ca
        .issue(&SpiffeId::agent(DOMAIN, name).unwrap(), &[])
        .unwrap();
    let mut config = AgentConfig::new(
        gateway,
        issued.cert_chain(),
        issued.private_key(),
        vec![ca.cert_der()],
        card,
    );
    config.reconnect = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: true,
    };
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(10);
    config
}

fn card(name: &str, skills: &[&str]) -> AgentCard {
    skills
        .iter()
        .fold(AgentCard::new(name, "test agent", "1.0.0"), |card, id| {
            card.with_skill(Skill::new(*id, *id).with_tags(["test"]))
        })
}

/// Handlers of the serving test agent.
fn server_handlers() -> Handlers {
    Handlers::new()
        .on("echo", |mut req: Request| async move {
            let payload = req.payload().await?;
            Ok::<_, HandlerError>(Response::ok(payload).with_content_type(req.content_type))
        })
        .on("whoami", |req: Request| async move {
            let deadline = req.deadline.map_or(0, |d| d.as_millis());
            let body = format!("{}|{}|{}", req.caller, deadline, req.trace.flags);
            Ok::<_, HandlerError>(Response::ok(body))
        })
        .on("fail", |_req: Request| async move {
            Err::<Response, _>(
                HandlerError::new("boom").with_payload("application/json", r#"{"e":1}"#),
            )
        })
        .on("panic", |_req: Request| async move {
            if true {
                panic!("handler panic (expected by the test)");
            }
            Ok::<_, HandlerError>(Response::ok(""))
        })
        .on("slow", |_req: Request| async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok::<_, HandlerError>(Response::ok("late"))
        })
        .on("stream_echo", |mut req: Request| async move {
            let (response, mut body) = Response::streaming("application/octet-stream");
            tokio::spawn(async move {
                loop {
                    match req.chunk().await {
                        Ok(Some(chunk)) => {
                            if body.write(chunk).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return body.abort(),
                    }
                }
                let _ = body.finish().await;
            });
            Ok::<_, HandlerError>(response)
        })
        .on("half_then_fail", |_req: Request| async move {
            let (response, mut body) = Response::streaming("text/plain");
            tokio::spawn(async move {
                let _ = body.write("partial answer").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                body.abort();
            });
            Ok::<_, HandlerError>(response)
        })
}

const SERVER_SKILLS: &[&str] = &[
    "echo",
    "whoami",
    "fail",
    "panic",
    "slow",
    "stream_echo",
    "half_then_fail",
];

async fn attach_pair(ca: &CertificateAuthority, gw: SocketAddr) -> (Agent, Agent) {
    let server = Agent::attach(
        config(ca, "server", gw, card("server", SERVER_SKILLS)),
        server_handlers(),
    )
    .await
    .expect("server attaches");
    let client = Agent::attach(
        config(ca, "client", gw, card("client", &["noop"])),
        Handlers::new().on("noop", |_req: Request| async move {
            Ok::<_, HandlerError>(Response::ok(""))
        }),
    )
    .await
    .expect("client attaches");
    (server, client)
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_invoke_round_trips() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let (server, client) = attach_pair(&ca, gw.addr).await;
    assert!(server.is_attached() && client.is_attached());
    assert!(client.session().is_some());
    assert_ne!(client.session(), server.session());
    assert_eq!(client.lanes(), 0);
    assert_eq!(
        client.identity().as_str(),
        "spiffe://test.local/agent/client"
    );

    // Byte-exact echo of a payload spanning many QUIC packets.
    let payload = pattern(3 * 1024 * 1024 + 17);
    let reply = client
        .request("echo")
        .content_type("application/x-test")
        .send(payload.clone())
        .await?;
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.content_type, "application/x-test");
    assert!(reply.payload == payload, "echo payload differs");

    // Empty payload.
    assert_eq!(
        client.invoke("echo", Bytes::new()).await?.into_result()?,
        Bytes::new()
    );

    // The gateway stamps the caller; deadline and trace reach the handler.
    let trace = TraceContext {
        trace_id: [7; 16],
        span_id: [8; 8],
        flags: 1,
    };
    let reply = client
        .request("whoami")
        .deadline(Duration::from_secs(3))
        .trace(trace)
        .send("")
        .await?;
    let text = String::from_utf8(reply.into_result()?.to_vec())?;
    let parts: Vec<&str> = text.split('|').collect();
    assert_eq!(parts[0], "spiffe://test.local/agent/client");
    let deadline_ms: u64 = parts[1].parse()?;
    assert!(deadline_ms > 2000 && deadline_ms <= 3000, "{deadline_ms}");
    assert_eq!(parts[2], "1");

    // Handler failure -> APPLICATION_ERROR with the handler's message and detail.
    let reply = client.invoke("fail", "x").await?;
    assert_eq!(reply.status, Status::ApplicationError);
    assert_eq!(reply.message, "boom");
    assert_eq!(reply.content_type, "application/json");
    assert_eq!(reply.payload, r#"{"e":1}"#);
    let err = reply.into_result().unwrap_err();
    assert!(matches!(
        err,
        InvokeError::Status {
            status: Status::ApplicationError,
            ..
        }
    ));

    // A panicking handler is an APPLICATION_ERROR too, and the agent keeps serving.
    let reply = client.invoke("panic", "x").await?;
    assert_eq!(reply.status, Status::ApplicationError);
    assert_eq!(
        client.invoke("echo", "still alive").await?.payload,
        "still alive"
    );

    // Nobody offers it.
    let reply = client
        .invoke("nobody_offers_this", pattern(200_000))
        .await?;
    assert_eq!(reply.status, Status::NoRoute);

    // An invalid capability never leaves the agent.
    let err = client.invoke("", "x").await.unwrap_err();
    assert!(matches!(err, InvokeError::InvalidRequest(_)), "{err:?}");
    assert_eq!(err.status(), Status::BadRequest);

    // Many concurrent invocations.
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("request {i}");
            let reply = client.invoke("echo", body.clone()).await.unwrap();
            assert_eq!(reply.payload, body);
        }));
    }
    for t in tasks {
        t.await?;
    }

    // The deadline bounds the wait: the slow handler takes 20 s.
    let started = std::time::Instant::now();
    let err = client
        .request("slow")
        .deadline(Duration::from_millis(300))
        .send("")
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::DeadlineExceeded), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_card_and_discover() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let (server, client) = attach_pair(&ca, gw.addr).await;

    let found = client.discover("st", "").await?;
    let names: Vec<&str> = found.iter().map(|e| e.capability.as_str()).collect();
    assert_eq!(names, ["stream_echo"]);
    assert_eq!(client.discover("", "nope").await?.len(), 0);
    assert_eq!(
        client.discover("", "test").await?.len(),
        SERVER_SKILLS.len() + 1
    );

    // Drop every skill but `echo` and add `greet`: `fail` stops routing.
    let updated = card("server", &["echo", "greet"]);
    server.update_card(updated.clone()).await?;
    assert_eq!(server.card(), updated);
    let names: Vec<String> = client
        .discover("", "")
        .await?
        .into_iter()
        .map(|e| e.capability)
        .collect();
    assert_eq!(names, ["echo", "greet", "noop"]);
    assert_eq!(client.invoke("fail", "").await?.status, Status::NoRoute);
    // `greet` has no handler in the server: the SDK answers NO_ROUTE itself.
    let reply = client.invoke("greet", "").await?;
    assert_eq!(reply.status, Status::NoRoute);
    assert!(reply.message.contains("no handler"), "{}", reply.message);

    // An invalid card is refused locally.
    let err = server
        .update_card(AgentCard::new("x", "", ""))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Card(_)), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reports_truncation() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let options = Options {
        max_discovery_entries: Some(2),
        ..Options::default()
    };
    let gw = FakeGateway::start(&ca, options).await?;
    let (_server, client) = attach_pair(&ca, gw.addr).await;

    let all = client.discovery("", "").await?;
    assert!(all.truncated);
    assert_eq!(all.entries.len(), 2);
    // `discover` returns the same entries, without the flag.
    assert_eq!(client.discover("", "").await?, all.entries);

    let one = client.discovery("st", "").await?;
    assert!(!one.truncated);
    assert_eq!(one.entries.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_stops_routing_and_closes() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let (server, client) = attach_pair(&ca, gw.addr).await;
    assert_eq!(gw.sessions(), 2);
    let server_clone = server.clone();
    server.detach().await?;
    assert!(!server_clone.is_attached());
    assert!(matches!(
        server_clone.invoke("echo", "x").await,
        Err(InvokeError::Closed)
    ));
    assert!(matches!(
        server_clone.discover("", "").await,
        Err(AgentError::Closed)
    ));
    eventually("the server's connection to close", || gw.sessions() == 1).await;
    assert_eq!(client.invoke("echo", "x").await?.status, Status::NoRoute);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_opened_and_carry_traffic_both_ways() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(
        &ca,
        Options {
            lanes: true,
            ..Options::default()
        },
    )
    .await?;
    let (server, client) = attach_pair(&ca, gw.addr).await;
    eventually("lanes to open", || {
        server.lanes() == 1 && client.lanes() == 1
    })
    .await;
    for i in 0..20 {
        let body = pattern(10_000 + i);
        assert!(client.invoke("echo", body.clone()).await?.payload == body);
    }
    let on_lane = gw.state.arrived_on_lane.load(Ordering::Relaxed);
    let on_primary = gw.state.arrived_on_primary.load(Ordering::Relaxed);
    assert_eq!(on_lane + on_primary, 20);
    assert!(
        on_lane >= 5 && on_primary >= 5,
        "lane {on_lane}, primary {on_primary}"
    );
    assert!(gw.state.forwarded_on_lane.load(Ordering::Relaxed) >= 5);

    // A lane that dies is reopened, and the agent stays attached meanwhile.
    let lane = gw
        .state
        .sessions
        .lock()
        .unwrap()
        .values()
        .find(|s| s.identity.ends_with("/server"))
        .unwrap()
        .lanes[0]
        .clone();
    lane.close(VarInt::from_u32(6), b"worker restart");
    eventually("the lane to be reopened", || {
        gw.state.sessions.lock().unwrap().values().any(|s| {
            s.identity.ends_with("/server")
                && s.lanes.len() == 1
                && s.lanes[0].stable_id() != lane.stable_id()
        })
    })
    .await;
    assert!(server.is_attached());
    assert_eq!(client.invoke("echo", "after").await?.payload, "after");

    // With lanes disabled in the config, none are opened.
    let mut cfg = config(&ca, "nolanes", gw.addr, card("nolanes", &["noop2"]));
    cfg.lanes = false;
    let agent = Agent::attach(cfg, Handlers::new()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent.lanes(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_identity_is_verified() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    // A gateway whose certificate comes from another CA (it still trusts our agents).
    let rogue_ca = CertificateAuthority::generate(DOMAIN)?;
    let rogue = rogue_ca.issue(&SpiffeId::gateway(DOMAIN, "g1")?, &["localhost"])?;
    let gw = FakeGateway::start_with(&ca, rogue, Options::default(), None).await?;
    let err = Agent::attach(
        config(&ca, "a", gw.addr, card("a", &["x"])),
        Handlers::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AgentError::Handshake { .. }), "{err:?}");

    // A certificate from our CA that names an agent, not a gateway.
    let impostor = ca.issue(&SpiffeId::agent(DOMAIN, "mallory")?, &["localhost"])?;
    let gw = FakeGateway::start_with(&ca, impostor, Options::default(), None).await?;
    let err = Agent::attach(
        config(&ca, "a", gw.addr, card("a", &["x"])),
        Handlers::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AgentError::Handshake { .. }), "{err:?}");
    assert!(err.to_string().contains("expected a gateway"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_attach_is_reported() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let options = Options {
        refuse: Some((Refusal::NotPermitted, "agent a may not advertise x".into())),
        ..Options::default()
    };
    let gw = FakeGateway::start(&ca, options).await?;
    let err = Agent::attach(
        config(&ca, "a", gw.addr, card("a", &["x"])),
        Handlers::new(),
    )
    .await
    .unwrap_err();
    match err {
        AgentError::Refused { refusal, reason } => {
            assert_eq!(refusal, Refusal::NotPermitted);
            assert_eq!(reason, "agent a may not advertise x");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_gateway_restart() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let addr = gw.addr;
    let (server, client) = attach_pair(&ca, addr).await;
    let first_session = client.session();

    // An invocation in flight when the connections drop fails, never hangs: with
    // ConnectionLost when the caller's connection goes first, or with the fake gateway's
    // TARGET_FAILED reset when it notices the target's connection go first.
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.invoke("slow", "").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.kick_everyone();
    let err = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await??
        .unwrap_err();
    match &err {
        InvokeError::ConnectionLost(_) => assert_eq!(err.status(), Status::Unavailable),
        InvokeError::Reset { .. } => assert_eq!(err.status(), Status::TargetFailed),
        other => panic!("unexpected {other:?}"),
    }

    // Both re-attach by themselves, with new sessions.
    assert!(client.wait_attached(Duration::from_secs(5)).await);
    assert!(server.wait_attached(Duration::from_secs(5)).await);
    assert_ne!(client.session(), first_session);
    eventually("both sessions to be back", || gw.sessions() == 2).await;
    assert_eq!(client.invoke("echo", "again").await?.payload, "again");

    // Gateway gone entirely: invocations wait for the deadline, then fail Disconnected.
    gw.stop().await;
    eventually("the client to notice", || !client.is_attached()).await;
    let started = std::time::Instant::now();
    let err = client
        .request("echo")
        .deadline(Duration::from_millis(400))
        .send("x")
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::Disconnected), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(350));

    // An invocation issued while disconnected completes once the gateway is back.
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request("echo")
                .deadline(Duration::from_secs(8))
                .send("patient")
                .await
        })
    };
    let id = SpiffeId::gateway(DOMAIN, "g1")?;
    let gw = FakeGateway::start_with(
        &ca,
        ca.issue(&id, &["localhost"])?,
        Options::default(),
        Some(addr),
    )
    .await?;
    assert!(client.wait_attached(Duration::from_secs(8)).await);
    assert!(server.wait_attached(Duration::from_secs(8)).await);
    let reply = waiting.await??;
    // The server may have re-attached after the client's request was forwarded.
    assert!(
        reply.status == Status::Ok || reply.status == Status::NoRoute,
        "{reply:?}"
    );
    eventually("both sessions to be back", || gw.sessions() == 2).await;
    assert_eq!(client.invoke("echo", "back").await?.payload, "back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_the_agent_to_a_new_connection() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let (server, client) = attach_pair(&ca, gw.addr).await;
    let before = server.session();
    gw.drain_everyone(300);
    eventually("the drain to be seen", || !server.is_attached()).await;
    assert!(server.wait_attached(Duration::from_secs(5)).await);
    assert_ne!(server.session(), before);
    assert!(client.wait_attached(Duration::from_secs(5)).await);
    eventually("both sessions to be back", || gw.sessions() == 2).await;
    assert_eq!(client.invoke("echo", "drained").await?.payload, "drained");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(
        &ca,
        Options {
            lanes: true,
            ..Options::default()
        },
    )
    .await?;
    let (_server, client) = attach_pair(&ca, gw.addr).await;

    // 16 MiB up and back down, never held whole by either side's SDK.
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 64;
    let (mut body, reply) = client.request("stream_echo").send_streaming();
    let reply = tokio::spawn(reply);
    let writer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            body.write(Bytes::from(vec![i as u8; CHUNK]))
                .await
                .with_context(|| format!("writing chunk {i}"))?;
        }
        body.finish().await.context("finishing")
    });
    let mut reply = reply.await?.context("reply head")?;
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.content_type, "application/octet-stream");
    let mut received = 0usize;
    while let Some(chunk) = reply
        .chunk()
        .await
        .with_context(|| format!("reading at {received}"))?
    {
        for (k, b) in chunk.iter().enumerate() {
            assert_eq!(*b as usize, (received + k) / CHUNK, "byte {}", received + k);
        }
        received += chunk.len();
    }
    assert_eq!(received, CHUNK * CHUNKS);
    writer.await??;

    // A target that fails after its answer began: the caller sees TARGET_FAILED.
    let (body, reply) = client.request("half_then_fail").send_streaming();
    body.finish().await?;
    let mut reply = reply.await?;
    assert_eq!(reply.status, Status::Ok);
    let mut err = None;
    loop {
        match reply.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the body must fail");
    assert!(
        matches!(
            err,
            BodyError::Reset {
                code: StreamCode::TargetFailed
            }
        ),
        "{err:?}"
    );
    let err = client.invoke("half_then_fail", "").await.unwrap_err();
    assert_eq!(err.status(), Status::TargetFailed, "{err:?}");

    // The read-to-end helper enforces its limit.
    let mut cfg = config(&ca, "small", gw.addr, card("small", &["noop3"]));
    cfg.max_response_bytes = 1000;
    let small = Agent::attach(cfg, Handlers::new()).await?;
    let err = small.invoke("echo", pattern(5000)).await.unwrap_err();
    assert!(
        matches!(err, InvokeError::ResponseTooLarge { limit: 1000 }),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_agent() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let (server, _client) = attach_pair(&ca, gw.addr).await;
    eventually("two sessions", || gw.sessions() == 2).await;
    drop(server);
    eventually("the server's connection to close", || gw.sessions() == 1).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_invocation_never_delivers_a_truncated_body() -> anyhow::Result<()> {
    init_tracing();
    let ca = CertificateAuthority::generate(DOMAIN)?;
    let gw = FakeGateway::start(&ca, Options::default()).await?;
    let seen: Arc<Mutex<Vec<Result<usize, String>>>> = Arc::default();
    let handlers = {
        let seen = seen.clone();
        Handlers::new().on("sink", move |mut req: Request| {
            let seen = seen.clone();
            async move {
                // Read late, so that the upload stalls on flow control and can be cancelled
                // half-way.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let outcome = req
                    .payload()
                    .await
                    .map(|p| p.len())
                    .map_err(|e| e.to_string());
                seen.lock().unwrap().push(outcome.clone());
                let len = outcome.map_err(HandlerError::new)?;
                Ok::<_, HandlerError>(Response::ok(len.to_string()))
            }
        })
    };
    let mut cfg = config(&ca, "sink", gw.addr, card("sink", &["sink"]));
    cfg.max_request_bytes = 8 * 1024 * 1024;
    let _sink = Agent::attach(cfg, handlers).await?;
    let client = Agent::attach(
        config(&ca, "client", gw.addr, card("client", &["noop"])),
        Handlers::new(),
    )
    .await?;

    // Over the sink's max_request_bytes: its handler fails, the caller gets APPLICATION_ERROR.
    let reply = client.invoke("sink", pattern(9 * 1024 * 1024)).await?;
    assert_eq!(reply.status, Status::ApplicationError, "{reply:?}");
    assert!(reply.message.contains("limit"), "{}", reply.message);

    // Cancel an upload half-way by dropping the future.
    let big = pattern(6 * 1024 * 1024);
    let cancelled =
        tokio::time::timeout(Duration::from_millis(100), client.invoke("sink", big)).await;
    assert!(cancelled.is_err(), "the upload should still be in progress");
    eventually("the sink to see the cancelled request", || {
        seen.lock().unwrap().len() == 2
    })
    .await;
    let outcome = seen.lock().unwrap()[1].clone();
    // The request stream was reset, not finished: the sink sees an error, never a short body.
    assert!(outcome.is_err(), "the sink saw a body: {outcome:?}");
    Ok(())
}
