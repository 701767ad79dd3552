//! The DMSC agent SDK: attach to a gateway with an agent card, serve your capabilities, and
//! invoke other agents' capabilities by name.
//!
//! An agent connects to a DMSC gateway over QUIC with mutual TLS (ALPN `dmsc/1`); its identity
//! is the SPIFFE ID in its certificate (`spiffe://<domain>/agent/<name>`), and it
//! authenticates the gateway the same way (`spiffe://<domain>/gateway/<id>`, chained to the
//! domain's trust anchors). It attaches with an A2A agent card whose skill ids are the
//! capabilities it serves. Invocations name a capability, never an address: the gateway
//! picks an agent that offers it and that policy allows, and stamps the caller's verified
//! identity on the request.
//!
//! # Quick start
//!
//! ```no_run
//! use std::path::Path;
//!
//! use dmsc_agent::{Agent, AgentCard, AgentConfig, HandlerError, Handlers, Request, Response, Skill};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let card = AgentCard::new("echo-agent", "Says everything twice", "1.0.0")
//!     .with_skill(Skill::new("echo", "Echo"));
//! let config = AgentConfig::from_files(
//!     "127.0.0.1:4433".parse()?,
//!     Path::new("pki/agents/echo.pem"),
//!     Path::new("pki/agents/echo.key"),
//!     Path::new("pki/ca.pem"),
//!     card,
//! )?;
//! let handlers = Handlers::new().on("echo", |mut req: Request| async move {
//!     let payload = req.payload().await?;
//!     Ok::<_, HandlerError>(Response::ok(payload))
//! });
//!
//! let agent = Agent::attach(config, handlers).await?;
//! let reply = agent.invoke("echo", "hello").await?;
//! assert_eq!(reply.into_result()?, "hello");
//! agent.detach().await?;
//! # Ok(())
//! # }
//! ```
//!
//! A runnable version is `examples/echo.rs`:
//!
//! ```text
//! cargo run -p dmsc-agent --example echo -- \
//!     --gateway 127.0.0.1:4433 --cert agent.pem --key agent.key --ca ca.pem
//! ```
//!
//! (or set `DMSC_GATEWAY`, `DMSC_CERT`, `DMSC_KEY`, `DMSC_CA`). It attaches with a card
//! offering `echo`, invokes `echo` once through the gateway (the gateway may route the
//! request back to the same agent), prints the answer and detaches.
//!
//! # What the SDK does for you
//!
//! - **Serving.** [`Handlers`] maps capabilities to async functions. Each request runs on its
//!   own task; the gateway can have at most [`AgentConfig::max_concurrent`] requests in flight
//!   per connection (a QUIC stream limit, so excess requests wait at the gateway instead of
//!   piling up in the agent). A failing handler answers `APPLICATION_ERROR`; a caller giving
//!   up aborts the handler.
//! - **Invoking.** [`Agent::invoke`] sends a whole payload and returns a whole [`Reply`];
//!   [`Agent::request`] adds a deadline, content type and trace context, and
//!   [`RequestBuilder::send_streaming`] streams large bodies in both directions without
//!   holding them in memory. Every status the gateway or the target answers is a [`Reply`];
//!   [`InvokeError`] is reserved for answers that never (completely) arrived, and
//!   [`InvokeError::status`] maps those to a [`Status`] too.
//! - **Lanes.** The gateway runs one worker per core. After attaching, the SDK opens one extra
//!   connection (a lane) to every other worker, so each worker reaches the agent without a
//!   cross-core hand-off; outgoing invocations are spread round-robin over all connections.
//!   Lanes that fail are reopened with backoff and never fail the agent.
//! - **Reconnecting.** If the gateway goes away (restart, `DRAIN`), the SDK reconnects with
//!   exponential backoff and jitter and re-attaches with the latest card. Invocations issued
//!   meanwhile wait for re-attachment until their deadline ([`InvokeError::Disconnected`]);
//!   invocations in flight on a lost connection fail with [`InvokeError::ConnectionLost`].
//!   Nothing waits without a bound.
//! - **Leaving.** [`Agent::detach`] asks the gateway to stop routing to the agent, lets the
//!   requests in flight finish and closes the connections; [`Agent::serve_until_signal`] does
//!   that when the process gets SIGTERM or SIGINT, so a stopped agent is not routed to until
//!   the gateway's idle timeout.
//! - **Policy.** The domain's policy may forbid the agent to advertise some capabilities of
//!   its card: the gateway routes the others, and [`Agent::refused`] lists those it does not
//!   (from `ATTACH_OK`, then from each `CAPABILITIES_REFUSED` a new policy brings). An agent
//!   left with nothing it may advertise is refused at attach.
//! - **Direct connections.** [`Agent::serve_connection`] serves requests arriving on a QUIC
//!   connection a caller opened to the agent itself, with the same handlers and dispatch as
//!   the gateway's streams (for benchmarks and tests; no gateway stamps the caller there).
//! - **Keeping connections open.** Every connection pings after a third of
//!   [`AgentConfig::idle_timeout`] without traffic (at most every 5 s). The agent cannot learn
//!   the gateway's idle timeout, so against a gateway configured below 15 s set
//!   `idle_timeout` to at most the gateway's value.
//! - **Fewer acknowledgements.** Every connection asks the gateway (QUIC ACK frequency
//!   extension) to acknowledge every 8th ack-eliciting packet or within 1 ms, as the gateway
//!   asks of the agent: most acknowledgements then ride on answers instead of packets of
//!   their own.
//!
//! # What it does not do
//!
//! It does not retry invocations (whether a request is safe to repeat is the caller's
//! business), does not interpret payloads, and does not load-balance between gateways: an
//! agent is attached to one gateway address at a time.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The modules, leaves first. Each imports only modules listed above it, so no module imports
// one that imports it back:
//
//   error                                   the public error types
//   config   -> error                       AgentConfig, Backoff
//   body     -> config, error               stream bodies and header reading
//   control  -> error                       control-stream framing, request/answer
//   tls      -> error                       TLS and QUIC client configuration
//   handle   -> config, control, error      Agent, Discovery, Shared, Settings, Link, ConnSet,
//                                             Command
//   handler  -> handle, body, error         Handlers, Request, Response
//   invoke   -> handle, handler, body,      impl Agent { invoke, request }, RequestBuilder,
//               error                         Reply
//   serve    -> handle, handler, body       accept loop; serving one invocation stream;
//                                             impl Agent { serve_connection }
//   connect  -> handle, control, tls,       QUIC connect, then ATTACH or LANE
//               error
//   lane     -> connect, serve, handle,     one task per lane
//               control, error
//   session  -> lane, connect, serve,       impl Agent { attach, discover, update_card,
//               handle, handler, control,     detach }; the session task and reconnects
//               config, error, tls
//   signal   -> handle, error               impl Agent { serve_until_signal }
mod body;
mod config;
mod connect;
mod control;
mod error;
mod handle;
mod handler;
mod invoke;
mod lane;
mod serve;
mod session;
mod signal;
mod tls;

pub use body::BodyWriter;
pub use config::{
    AgentConfig, Backoff, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT, DEFAULT_REQUEST_TIMEOUT,
};
pub use error::{AgentError, BodyError, HandlerError, InvokeError};
pub use handle::{Agent, Discovery};
pub use handler::{Handlers, Request, Response};
pub use invoke::{Reply, ReplyStream, RequestBuilder};

pub use bytes::Bytes;
pub use dmsc_protocol::card::{AgentCard, Skill};
pub use dmsc_protocol::control::{DiscoveryEntry, Refusal, SessionId};
pub use dmsc_protocol::header::TraceContext;
pub use dmsc_protocol::spiffe::SpiffeId;
pub use dmsc_protocol::{Status, StreamCode};
