//! Attaching, and the session task that owns the primary connection and reconnects.
//!
//! # Connection set
//!
//! An attachment is a *primary* connection, on which the agent sent `ATTACH`, plus one *lane*
//! connection per other gateway worker (see [`ConnSet`] and `lane.rs`). All of them carry
//! invocations both ways; outgoing invocations go round-robin over the open ones.
//!
//! # The session task
//!
//! One tokio task per agent ([`run`]) owns the control stream of the primary connection. API
//! calls that use the control stream (`discover`, `update_card`, `detach`) send it a
//! [`Command`] and wait for the answer on a oneshot channel. The task publishes the state of
//! the attachment in a `watch` channel ([`Link`]), which invocations read to pick a connection
//! or to wait for one.
//!
//! When the primary connection is lost, the task closes the lanes, publishes
//! [`Link::Connecting`], and reconnects with exponential backoff and jitter, re-attaching with
//! the latest accepted card. A `DRAIN` from the gateway publishes `Connecting` at once (no new
//! invocations start on the draining gateway), lets in-flight ones finish, and reconnects once
//! the gateway closes the connection (or the announced grace period has passed).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{ControlFrame, DiscoveryEntry};
use dmsc_protocol::ConnectionCode;
use quinn::Endpoint;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

use crate::config::AgentConfig;
use crate::connect::{handshake, limit_streams, transport_config};
use crate::control::{close_code, frame_name, ControlError, ControlStream};
use crate::error::{AgentError, InvokeError};
use crate::handle::{lock, Agent, Command, ConnSet, Discovery, Link, Settings, Shared};
use crate::handler::Handlers;
use crate::lane::{spawn_lanes, Ticket};
use crate::serve::{accept_loop, Server};
use crate::tls::client_config;

/// Most control-stream queries (discover, card update) awaiting an answer at once.
const MAX_PENDING_QUERIES: usize = 1024;
/// Extra time granted after a `DRAIN`'s grace period before the agent closes the connection
/// itself.
const DRAIN_SLACK: Duration = Duration::from_secs(1);
/// Longest drain grace period honoured; a larger one is capped.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(300);
/// An attachment that lasted this long resets the reconnect backoff.
const STABLE_ATTACHMENT: Duration = Duration::from_secs(10);

impl Agent {
    /// Connects to the gateway, attaches with the configured card, and opens the lanes the
    /// gateway offers. Returns once attached; the lanes open in the background.
    ///
    /// Fails if the configuration is invalid, the handshake fails (including when the
    /// gateway's certificate does not name a gateway of the agent's trust domain), or the
    /// gateway refuses the attach. After that first attach, losing the gateway is handled by
    /// reconnecting, not by failing.
    pub async fn attach(config: AgentConfig, handlers: Handlers) -> Result<Agent, AgentError> {
        config.validate()?;
        for capability in config.card.capabilities() {
            if handlers.get(capability).is_none() {
                tracing::warn!(
                    capability,
                    "the card advertises a capability with no handler; requests for it will \
                     be answered NO_ROUTE"
                );
            }
        }
        let (mut client, identity) =
            client_config(config.cert_chain, config.private_key, &config.trust_anchors)?;
        client.transport_config(Arc::new(transport_config(
            config.max_concurrent,
            config.idle_timeout,
        )?));
        let bind: SocketAddr = match config.gateway {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut endpoint = Endpoint::client(bind)?;
        endpoint.set_default_client_config(client);

        let settings = Settings {
            gateway: config.gateway,
            max_concurrent: config.max_concurrent,
            lanes: config.lanes,
            reconnect: config.reconnect,
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            max_response_bytes: config.max_response_bytes,
            max_request_bytes: config.max_request_bytes,
        };
        let (shared, command_rx, shutdown_rx) =
            Shared::new(settings, identity, config.card, endpoint);
        let attached = match attach_once(&shared).await {
            Ok(attached) => attached,
            Err(e) => {
                shared
                    .endpoint
                    .close(close_code(ConnectionCode::NoError), b"attach failed");
                return Err(e);
            }
        };
        shared.publish(Link::Attached(attached.set.clone()));
        let agent = Agent::from_shared(shared.clone());
        tracing::info!(
            agent = %shared.identity,
            session = attached.set.session.0,
            lanes = attached.lanes.len().saturating_sub(1),
            "attached"
        );
        let server = Arc::new(Server::new(shared, handlers));
        agent.set_server(server.clone());
        tokio::spawn(run(server, command_rx, shutdown_rx, attached));
        Ok(agent)
    }

    /// Asks the gateway which capabilities this agent may invoke: those whose name starts
    /// with `prefix` and that carry tag `tag` (empty strings match everything).
    ///
    /// If the gateway truncated the answer to its size limit, the entries it sent are
    /// returned; [`Agent::discovery`] also says whether that happened.
    pub async fn discover(
        &self,
        prefix: &str,
        tag: &str,
    ) -> Result<Vec<DiscoveryEntry>, AgentError> {
        Ok(self.discovery(prefix, tag).await?.entries)
    }

    /// Like [`Agent::discover`], and also says whether the gateway truncated the answer to its
    /// size limit.
    pub async fn discovery(&self, prefix: &str, tag: &str) -> Result<Discovery, AgentError> {
        self.discovery_for("", prefix, tag).await
    }

    /// Like [`Agent::discovery`], for a bridge: answers what agent `identity` (a SPIFFE ID of
    /// the domain) may invoke, not what this agent may. The gateway answers so only to a caller
    /// in a group the domain marks `bridge = true`; to anyone else, and for an identity that is
    /// not an agent of the domain, the answer is empty. An empty `identity` asks for this agent.
    pub async fn discovery_for(
        &self,
        identity: &str,
        prefix: &str,
        tag: &str,
    ) -> Result<Discovery, AgentError> {
        let (reply, answer) = oneshot::channel();
        self.command(
            Command::Discover {
                prefix: prefix.to_owned(),
                tag: tag.to_owned(),
                on_behalf_of: identity.to_owned(),
                reply,
            },
            answer,
            "waiting for DISCOVER_RESULT",
        )
        .await
    }

    /// Replaces the agent's card (and so its capabilities). The new card is also the one used
    /// when re-attaching after a reconnect.
    ///
    /// The handlers are those given to [`Agent::attach`]: a new capability needs a handler
    /// registered there.
    pub async fn update_card(&self, card: AgentCard) -> Result<(), AgentError> {
        card.validate()?;
        let (reply, answer) = oneshot::channel();
        self.command(
            Command::UpdateCard { card, reply },
            answer,
            "waiting for UPDATE_RESULT",
        )
        .await
    }

    /// Leaves gracefully: asks the gateway to stop routing to this agent, waits (at most
    /// `request_timeout`) until the requests in flight to it have finished (`DETACHED`), then
    /// closes every connection. Every clone of this handle is closed too; their invocations
    /// still in flight fail with [`InvokeError::ConnectionLost`].
    ///
    /// Detaching while disconnected just closes the agent.
    pub async fn detach(self) -> Result<(), AgentError> {
        let shared = self.shared().clone();
        let (reply, answer) = oneshot::channel();
        if shared
            .commands
            .send(Command::Detach { reply })
            .await
            .is_err()
        {
            return Err(AgentError::Closed);
        }
        // The session task bounds the wait for DETACHED; this bound only guards against the
        // task itself being gone.
        let bound = shared.settings.request_timeout + shared.settings.connect_timeout;
        match timeout(bound, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => Err(AgentError::Timeout("waiting for DETACHED")),
        }
    }

    /// Sends a control command once attached, and waits for its answer; all within
    /// `request_timeout`.
    async fn command<T>(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<T, AgentError>>,
        waiting: &'static str,
    ) -> Result<T, AgentError> {
        let shared = self.shared();
        let deadline = Instant::now() + shared.settings.request_timeout;
        shared.attached(deadline).await.map_err(|e| match e {
            InvokeError::Closed => AgentError::Closed,
            _ => AgentError::Disconnected,
        })?;
        if shared.commands.send(command).await.is_err() {
            return Err(AgentError::Closed);
        }
        match timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => Err(AgentError::Timeout(waiting)),
        }
    }
}

/// The outcome of a successful attach.
struct Attached {
    set: Arc<ConnSet>,
    control: ControlStream,
    worker: u64,
    lanes: Vec<String>,
    ticket: Ticket,
}

/// Connects to the gateway and attaches.
async fn attach_once(shared: &Shared) -> Result<Attached, AgentError> {
    let request = ControlFrame::Attach {
        max_concurrent: u64::from(shared.settings.max_concurrent),
        card: lock(&shared.card).to_json(),
    };
    let (connection, control, (session, lane_token, worker, lanes, gateway_limit)) = handshake(
        shared,
        shared.settings.gateway,
        &request,
        |frame| match frame {
            ControlFrame::AttachOk {
                session,
                lane_token,
                worker,
                lanes,
                max_concurrent,
                refused,
            } => {
                if !refused.is_empty() {
                    // The domain's policy does not let this agent offer these: requests for
                    // them will not come (PROTOCOL.md 6.1).
                    tracing::warn!(
                        ?refused,
                        "the gateway refused some capabilities of the card"
                    );
                }
                *lock(&shared.refused) = refused;
                Ok((session, lane_token, worker, lanes, max_concurrent))
            }
            other => Err(other),
        },
    )
    .await?;
    limit_streams(&connection, shared.settings.max_concurrent, gateway_limit);
    Ok(Attached {
        set: Arc::new(ConnSet::new(session, connection)),
        control,
        worker,
        lanes,
        ticket: Ticket {
            session,
            lane_token,
            gateway_limit,
        },
    })
}

/// How an attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The primary connection was lost or drained: reconnect.
    Lost,
    /// Detached, or every handle dropped: stop.
    Closed,
}

/// The session task: drives attachments and reconnects until the agent is closed.
async fn run(
    server: Arc<Server>,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<bool>,
    first: Attached,
) {
    let shared = &server.shared;
    let mut next = Some(first);
    let mut attempt: u32 = 0;
    loop {
        let attached = match next.take() {
            Some(attached) => attached,
            None => {
                shared.publish(Link::Connecting);
                let delay = shared.settings.reconnect.next_delay(attempt);
                attempt = attempt.saturating_add(1);
                let reconnect = async {
                    sleep(delay).await;
                    attach_once(shared).await
                };
                match while_serving_commands(reconnect, &mut commands, &mut shutdown).await {
                    None => break,
                    Some(Ok(attached)) => {
                        tracing::info!(session = attached.set.session.0, "re-attached");
                        attached
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, attempt, "reconnect failed");
                        continue;
                    }
                }
            }
        };
        let started = Instant::now();
        match drive(&server, attached, &mut commands, &mut shutdown).await {
            End::Closed => break,
            End::Lost => {
                if started.elapsed() >= STABLE_ATTACHMENT {
                    attempt = 0;
                }
            }
        }
    }
    shared.link.send_replace(Link::Closed);
    shared
        .endpoint
        .close(close_code(ConnectionCode::NoError), b"agent closed");
    // Fail whatever is still queued.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        command.fail(|| AgentError::Closed);
    }
}

/// Runs `future` while answering commands as "disconnected" (and a detach by closing).
/// Returns `None` if the agent must close.
async fn while_serving_commands<F: std::future::Future>(
    future: F,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<F::Output> {
    tokio::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return Some(output),
            () = closing(shutdown) => return None,
            command = commands.recv() => match command {
                None => return None,
                Some(Command::Detach { reply }) => {
                    let _ = reply.send(Ok(()));
                    return None;
                }
                Some(other) => other.fail(|| AgentError::Disconnected),
            },
        }
    }
}

/// Resolves once the agent must close (every handle dropped).
async fn closing(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means closing.
    let _ = shutdown.wait_for(|&closed| closed).await;
}

/// Where a `DETACH` stands.
struct Detaching {
    reply: oneshot::Sender<Result<(), AgentError>>,
    deadline: Instant,
}

/// Serves one attachment until it ends.
async fn drive(
    server: &Arc<Server>,
    attached: Attached,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let shared = &server.shared;
    let Attached {
        set,
        mut control,
        worker,
        lanes,
        ticket,
    } = attached;
    tokio::spawn(accept_loop(server.clone(), set.primary.clone()));
    let mut lane_tasks = JoinSet::new();
    if shared.settings.lanes {
        spawn_lanes(&mut lane_tasks, server, &set, worker, &lanes, ticket);
    }
    shared.publish(Link::Attached(set.clone()));

    let mut updates: VecDeque<(AgentCard, oneshot::Sender<Result<(), AgentError>>)> =
        VecDeque::new();
    let mut discoveries: HashMap<u64, oneshot::Sender<Result<Discovery, AgentError>>> =
        HashMap::new();
    let mut next_query: u64 = 0;
    let mut detaching: Option<Detaching> = None;
    let mut drain_until: Option<Instant> = None;

    let end = loop {
        let timer = match (&detaching, drain_until) {
            (Some(d), _) => Some(d.deadline),
            (None, until) => until,
        };
        tokio::select! {
            () = closing(shutdown) => {
                set.close(ConnectionCode::NoError, b"agent closed");
                break End::Closed;
            }
            error = set.primary.closed() => {
                tracing::warn!(%error, "connection to the gateway lost");
                shared.publish(Link::Connecting);
                if let Some(d) = detaching.take() {
                    let _ = d.reply.send(Err(AgentError::ConnectionLost(error)));
                    set.close(ConnectionCode::NoError, b"detached");
                    break End::Closed;
                }
                set.close(ConnectionCode::NoError, b"primary lost");
                break End::Lost;
            }
            _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                if let Some(d) = detaching.take() {
                    tracing::warn!("no DETACHED from the gateway in time; closing");
                    let _ = d.reply.send(Err(AgentError::Timeout("waiting for DETACHED")));
                    set.close(ConnectionCode::NoError, b"detached");
                    break End::Closed;
                }
                tracing::info!("drain grace period over; closing and reconnecting");
                set.close(ConnectionCode::NoError, b"drained");
                break End::Lost;
            }
            command = commands.recv() => {
                let Some(command) = command else {
                    set.close(ConnectionCode::NoError, b"agent closed");
                    break End::Closed;
                };
                let frame = match command {
                    Command::Discover {
                        prefix,
                        tag,
                        on_behalf_of,
                        reply,
                    } => {
                        discoveries.retain(|_, waiter| !waiter.is_closed());
                        if discoveries.len() >= MAX_PENDING_QUERIES {
                            let _ = reply.send(Err(AgentError::Timeout(
                                "too many discoveries awaiting an answer",
                            )));
                            continue;
                        }
                        next_query += 1;
                        discoveries.insert(next_query, reply);
                        ControlFrame::Discover {
                            query_id: next_query,
                            prefix,
                            tag,
                            on_behalf_of,
                        }
                    }
                    Command::UpdateCard { card, reply } => {
                        if updates.len() >= MAX_PENDING_QUERIES {
                            let _ = reply.send(Err(AgentError::Timeout(
                                "too many card updates awaiting an answer",
                            )));
                            continue;
                        }
                        let frame = ControlFrame::UpdateCard { card: card.to_json() };
                        updates.push_back((card, reply));
                        frame
                    }
                    Command::Detach { reply } => {
                        if detaching.is_some() {
                            let _ = reply.send(Err(AgentError::Closed));
                            continue;
                        }
                        // No new invocations from now on: the agent is leaving.
                        shared.link.send_replace(Link::Closed);
                        detaching = Some(Detaching {
                            reply,
                            deadline: Instant::now() + shared.settings.request_timeout,
                        });
                        ControlFrame::Detach
                    }
                };
                let sent = timeout(shared.settings.request_timeout, control.send(&frame))
                    .await
                    .unwrap_or(Err(ControlError::Stalled));
                if let Err(e) = sent {
                    tracing::warn!(error = %e, frame = frame_name(&frame), "control stream failed");
                    set.close(e.close_code(), b"control stream failed");
                    if let Some(d) = detaching.take() {
                        let _ = d.reply.send(Err(e.into()));
                        break End::Closed;
                    }
                    break End::Lost;
                }
            }
            frame = control.next() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        match &e {
                            ControlError::ConnectionLost(error) => {
                                tracing::warn!(%error, "connection to the gateway lost");
                            }
                            _ => tracing::warn!(error = %e, "control stream failed"),
                        }
                        set.close(e.close_code(), b"control stream failed");
                        if let Some(d) = detaching.take() {
                            let _ = d.reply.send(Err(e.into()));
                            break End::Closed;
                        }
                        break End::Lost;
                    }
                };
                match frame {
                    ControlFrame::UpdateResult { refusal, reason } => {
                        match updates.pop_front() {
                            Some((card, reply)) => {
                                let result = match refusal {
                                    None => {
                                        *lock(&shared.card) = card;
                                        Ok(())
                                    }
                                    Some(refusal) => Err(AgentError::Refused { refusal, reason }),
                                };
                                let _ = reply.send(result);
                            }
                            None => tracing::debug!("UPDATE_RESULT without an update; ignored"),
                        }
                    }
                    ControlFrame::DiscoverResult { query_id, truncated, entries } => {
                        match discoveries.remove(&query_id) {
                            Some(reply) => drop(reply.send(Ok(Discovery { entries, truncated }))),
                            None => tracing::debug!(query_id, "unexpected DISCOVER_RESULT; ignored"),
                        }
                    }
                    ControlFrame::Detached => {
                        if let Some(d) = detaching.take() {
                            set.close(ConnectionCode::NoError, b"detached");
                            let _ = d.reply.send(Ok(()));
                            break End::Closed;
                        }
                        tracing::debug!("DETACHED without a DETACH; ignored");
                    }
                    ControlFrame::Drain { grace_ms } => {
                        let grace = Duration::from_millis(grace_ms).min(MAX_DRAIN_GRACE);
                        tracing::info!(grace_ms, "the gateway is draining");
                        if detaching.is_none() {
                            shared.publish(Link::Connecting);
                        }
                        drain_until = Some(Instant::now() + grace + DRAIN_SLACK);
                    }
                    ControlFrame::CapabilitiesRefused { refused } => {
                        // A new policy of the domain: requests for these will not come.
                        tracing::warn!(?refused, "the gateway no longer routes these capabilities");
                        *lock(&shared.refused) = refused;
                    }
                    ControlFrame::Unknown { .. } => {}
                    other => {
                        tracing::debug!(frame = frame_name(&other), "unexpected control frame; ignored");
                    }
                }
            }
        }
    };
    if end == End::Lost {
        // Invocations wait for the next attachment instead of picking a dead connection.
        shared.publish(Link::Connecting);
    }
    // Stop the lane tasks, then close what they may have opened meanwhile.
    lane_tasks.shutdown().await;
    set.close(ConnectionCode::NoError, b"attachment ended");
    // Pending queries are answered by dropping their senders (the API reports Closed), or
    // explicitly here to say why.
    for (_, reply) in updates {
        let _ = reply.send(Err(AgentError::Disconnected));
    }
    for (_, reply) in discoveries {
        let _ = reply.send(Err(AgentError::Disconnected));
    }
    end
}
