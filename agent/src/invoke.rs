//! Invoking capabilities: the request builder and the answers.
//!
//! One invocation is one bidirectional QUIC stream to the gateway, on whichever of the agent's
//! connections (primary or lane) is next in round-robin order. The request header and payload
//! are written while the answer is read, so a target that answers while the request is still
//! arriving (a streaming echo, or a gateway refusing early) never deadlocks on flow control.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use dmsc_protocol::control::SessionId;
use dmsc_protocol::header::{RequestHeader, ResponseHeader, TraceContext};
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::{Status, StreamCode};
use quinn::{ReadError, RecvStream, SendStream};
use tokio::time::{timeout_at, Instant};

use crate::body::{code, read_header, write_idle, Body, BodyWriter, HeaderError, SendGuard};
use crate::error::status_for_reset;
use crate::error::{BodyError, InvokeError};
use crate::handle::Agent;
use crate::handler::Request;

impl Agent {
    /// Invokes `capability` with a whole payload and returns the whole answer, using the
    /// default deadline (`request_timeout`).
    ///
    /// Shorthand for `agent.request(capability).send(payload)`; see
    /// [`RequestBuilder::send`].
    pub async fn invoke(
        &self,
        capability: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Reply, InvokeError> {
        self.request(capability).send(payload).await
    }

    /// Prepares an invocation of `capability` with options (deadline, content type, trace
    /// context) and a whole or streamed payload.
    pub fn request(&self, capability: &str) -> RequestBuilder {
        RequestBuilder::new(self.clone(), capability)
    }
}

/// A complete answer to an invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The outcome: `OK`, or why the gateway or the target could not serve the request.
    pub status: Status,
    /// The payload's media type; may be empty.
    pub content_type: String,
    /// A diagnostic, usually empty on success.
    pub message: String,
    /// The answer's payload.
    pub payload: Bytes,
}

impl Reply {
    /// Whether the status is `OK`.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The payload if the status is `OK`, else [`InvokeError::Status`].
    pub fn into_result(self) -> Result<Bytes, InvokeError> {
        if self.is_ok() {
            Ok(self.payload)
        } else {
            Err(InvokeError::Status {
                status: self.status,
                message: self.message,
                payload: self.payload,
            })
        }
    }
}

/// An answer whose payload is read chunk by chunk.
pub struct ReplyStream {
    /// The outcome.
    pub status: Status,
    /// The payload's media type; may be empty.
    pub content_type: String,
    /// A diagnostic, usually empty on success.
    pub message: String,
    body: Body,
    max_payload: usize,
}

impl ReplyStream {
    /// The next chunk of the payload, `None` at its end. A reset of the stream (for example
    /// the target failing half-way) is [`BodyError::Reset`] with a code mapping to
    /// `TARGET_FAILED` ([`InvokeError::status`] does the mapping).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.body.chunk().await
    }

    /// The rest of the payload in one buffer; fails once more than `limit` bytes have arrived.
    pub async fn body(&mut self, limit: usize) -> Result<Bytes, BodyError> {
        self.body.read_to_end(limit).await
    }

    /// Reads the rest of the payload (up to the agent's `max_response_bytes`) into a [`Reply`].
    pub async fn into_reply(mut self) -> Result<Reply, InvokeError> {
        let payload = self
            .body
            .read_to_end(self.max_payload)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => InvokeError::ResponseTooLarge { limit },
                other => body_failure(other),
            })?;
        Ok(Reply {
            status: self.status,
            content_type: std::mem::take(&mut self.content_type),
            message: std::mem::take(&mut self.message),
            payload,
        })
    }
}

impl fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("message", &self.message)
            .field("body", &self.body)
            .finish()
    }
}

/// An invocation being prepared: set its options, then [`send`](RequestBuilder::send) it.
///
/// ```no_run
/// # async fn demo(agent: dmsc_agent::Agent) -> Result<(), dmsc_agent::InvokeError> {
/// use std::time::Duration;
///
/// let reply = agent
///     .request("currency_conversion")
///     .deadline(Duration::from_millis(500))
///     .content_type("application/json")
///     .send(r#"{"from":"EUR","to":"USD","amount":10}"#)
///     .await?;
/// println!("{}: {:?}", reply.status, reply.payload);
/// # Ok(())
/// # }
/// ```
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    agent: Agent,
    capability: String,
    deadline: Option<Duration>,
    content_type: String,
    trace: TraceContext,
    hop_count: u8,
    target_session: u64,
    on_behalf_of: String,
}

impl RequestBuilder {
    fn new(agent: Agent, capability: &str) -> Self {
        Self {
            agent,
            capability: capability.to_owned(),
            deadline: None,
            content_type: String::new(),
            trace: TraceContext::default(),
            hop_count: 0,
            target_session: 0,
            on_behalf_of: String::new(),
        }
    }

    /// How long to wait for the answer (default: the agent's `request_timeout`). It bounds the
    /// wait for an attached connection, and is sent to the gateway as the time the target has
    /// to begin its answer. [`send`](RequestBuilder::send) applies it to the whole exchange.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The payload's media type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// The W3C trace context to propagate.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    /// Asks the gateway to deliver the request to the agent of `session` and no other: a
    /// follow-up to work that agent holds (an A2A task, say), when several agents offer the
    /// capability. If that agent is gone, no longer offers the capability, or may not be
    /// invoked by this caller, the answer is `NO_ROUTE` or `DENIED` as usual; the gateway
    /// never substitutes another agent. An agent learns its own session from
    /// [`Agent::session`].
    pub fn target_session(mut self, session: SessionId) -> Self {
        self.target_session = session.0;
        self
    }

    /// Invokes on behalf of `identity` (a SPIFFE ID of the domain): for bridges such as the A2A
    /// front door, which forward requests of clients that are not agents. The gateway accepts
    /// it only from a caller in a group the domain marks `bridge = true`, answering `DENIED`
    /// otherwise; it then applies policy to `identity` instead of this agent, and the target
    /// sees `identity` as the caller and this agent as `via`.
    pub fn on_behalf_of(mut self, identity: impl Into<String>) -> Self {
        self.on_behalf_of = identity.into();
        self
    }

    /// Marks this invocation as made on behalf of `request` (one a handler is serving): it
    /// carries the request's hop count and trace context on, so a chain of agents calling each
    /// other in a circle ends with `LOOP_DETECTED` instead of running forever.
    pub fn caused_by(mut self, request: &Request) -> Self {
        self.hop_count = request.hop_count;
        self.trace = request.trace;
        self
    }

    /// Sends the whole payload and reads the whole answer (at most the agent's
    /// `max_response_bytes`), all within the deadline.
    ///
    /// Any status the gateway or target answers is `Ok(Reply)`; check [`Reply::status`] or use
    /// [`Reply::into_result`]. `Err` means no complete answer arrived.
    pub async fn send(self, payload: impl Into<Bytes>) -> Result<Reply, InvokeError> {
        let payload = payload.into();
        let deadline = self.deadline_instant();
        let (send, mut recv) = self.open(deadline).await?;
        let mut send = SendGuard::new(send);
        let header = self.header(deadline)?;
        let limit = self.agent.shared().settings.max_response_bytes;

        let exchange = async {
            let mut write_done = false;
            let result = {
                let write = async {
                    send.write_all_chunks(&mut [header, payload]).await?;
                    send.finish()?;
                    Ok::<_, quinn::WriteError>(())
                };
                let read = read_reply(&mut recv, limit);
                tokio::pin!(write, read);
                loop {
                    tokio::select! {
                        written = &mut write, if !write_done => {
                            write_done = true;
                            match written {
                                // Stopped: the gateway answered without reading everything
                                // (for example NO_ROUTE); the answer is still to be read.
                                Ok(()) | Err(quinn::WriteError::Stopped(_)) => {}
                                Err(quinn::WriteError::ConnectionLost(e)) => {
                                    break Err(InvokeError::ConnectionLost(e));
                                }
                                Err(e) => break Err(InvokeError::Protocol(e.to_string())),
                            }
                        }
                        reply = &mut read => break reply,
                    }
                }
            };
            (result, write_done)
        };
        match timeout_at(deadline, exchange).await {
            Ok((result, write_done)) => {
                if !write_done {
                    // The whole answer arrived before the request was sent: the rest of the
                    // request is not wanted.
                    send.reset();
                }
                if result.is_err() {
                    send.reset();
                    let _ = recv.stop(code(StreamCode::Cancelled));
                }
                result
            }
            Err(_) => {
                send.reset();
                let _ = recv.stop(code(StreamCode::Cancelled));
                Err(InvokeError::DeadlineExceeded)
            }
        }
    }

    /// Starts an invocation whose payload is written chunk by chunk.
    ///
    /// Returns the body writer and a future of the answer. The invocation starts at once (on a
    /// task of its own): the writer's first write waits until the stream is open and the
    /// header sent, and the future can be awaited before, during or after the writing. Call
    /// [`BodyWriter::finish`] after the last chunk; a writer dropped without `finish` aborts
    /// the request.
    ///
    /// The future resolves when the answer begins (its header has arrived), bounded by the
    /// deadline; read the answer's payload from the [`ReplyStream`]. Body reads and writes are
    /// bounded by the idle timeout (`request_timeout`), not by the deadline.
    ///
    /// ```no_run
    /// # async fn demo(agent: dmsc_agent::Agent) -> anyhow::Result<()> {
    /// let (mut body, reply) = agent.request("upload").send_streaming();
    /// for part in 0..100u8 {
    ///     body.write(vec![part; 1 << 20]).await?;
    /// }
    /// body.finish().await?;
    /// let mut reply = reply.await?;
    /// while let Some(chunk) = reply.chunk().await? {
    ///     println!("{} bytes", chunk.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn send_streaming(
        self,
    ) -> (
        BodyWriter,
        impl Future<Output = Result<ReplyStream, InvokeError>> + Send + 'static,
    ) {
        let idle = self.agent.shared().settings.request_timeout;
        let wait = self.deadline.unwrap_or(idle);
        let (writer, handover) = BodyWriter::pending(Some(wait));
        let self_runtime = self.agent.shared().runtime.clone();
        let answer = async move {
            let deadline = self.deadline_instant();
            let (mut send, mut recv) = self.open(deadline).await?;
            let header = self.header(deadline)?;
            match timeout_at(deadline, write_idle(&mut send, header, idle)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(body_failure(e)),
                Err(_) => {
                    let _ = send.reset(code(StreamCode::Cancelled));
                    return Err(InvokeError::DeadlineExceeded);
                }
            }
            if let Err((mut send, _)) = handover.send((send, idle)) {
                // The writer is gone without finishing: abort the request body, but still
                // report whatever the gateway answers.
                let _ = send.reset(code(StreamCode::Cancelled));
            }
            match timeout_at(deadline, read_reply_head(&mut recv)).await {
                Ok(Ok((status, content_type, message, first))) => Ok(ReplyStream {
                    status,
                    content_type,
                    message,
                    body: Body::new(first, recv, idle),
                    max_payload: self.agent.shared().settings.max_response_bytes,
                }),
                Ok(Err(e)) => {
                    let _ = recv.stop(code(StreamCode::Cancelled));
                    Err(e)
                }
                Err(_) => {
                    let _ = recv.stop(code(StreamCode::Cancelled));
                    Err(InvokeError::DeadlineExceeded)
                }
            }
        };
        let task = self_runtime.spawn(answer);
        let answer = async move { task.await.unwrap_or(Err(InvokeError::Closed)) };
        (writer, answer)
    }

    fn deadline_instant(&self) -> Instant {
        let budget = self
            .deadline
            .unwrap_or(self.agent.shared().settings.request_timeout);
        Instant::now() + budget
    }

    /// Waits (until `deadline`) for an attached connection and opens a stream on it.
    ///
    /// A connection that turns out to be closed sent nothing, so the next one is tried (after
    /// waiting for re-attachment if need be).
    async fn open(&self, deadline: Instant) -> Result<(SendStream, RecvStream), InvokeError> {
        loop {
            let connection = self.agent.shared().connection(deadline).await?;
            match timeout_at(deadline, connection.open_bi()).await {
                Ok(Ok(streams)) => return Ok(streams),
                Ok(Err(e)) if Instant::now() >= deadline => {
                    return Err(InvokeError::ConnectionLost(e))
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "connection closed; trying another"),
                Err(_) => return Err(InvokeError::DeadlineExceeded),
            }
        }
    }

    /// The encoded request header, with the time left until `deadline`.
    fn header(&self, deadline: Instant) -> Result<Bytes, InvokeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let deadline_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut out = Vec::new();
        RequestHeader {
            capability: &self.capability,
            deadline_ms,
            hop_count: self.hop_count,
            trace: self.trace,
            content_type: &self.content_type,
            caller: "",
            target_session: self.target_session,
            on_behalf_of: &self.on_behalf_of,
            via: "",
        }
        .encode(&mut out)
        .map_err(InvokeError::InvalidRequest)?;
        Ok(Bytes::from(out))
    }
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("capability", &self.capability)
            .field("deadline", &self.deadline)
            .field("content_type", &self.content_type)
            .field("trace", &self.trace)
            .field("target_session", &self.target_session)
            .finish()
    }
}

/// Reads a whole answer: header, then payload up to `limit` bytes.
async fn read_reply(recv: &mut RecvStream, limit: usize) -> Result<Reply, InvokeError> {
    let (status, content_type, message, first) = read_reply_head(recv).await?;
    let mut chunks = Vec::new();
    let mut total = first.len();
    if !first.is_empty() {
        chunks.push(first);
    }
    if total > limit {
        return Err(InvokeError::ResponseTooLarge { limit });
    }
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                total = total.saturating_add(chunk.bytes.len());
                if total > limit {
                    return Err(InvokeError::ResponseTooLarge { limit });
                }
                chunks.push(chunk.bytes);
            }
            Ok(None) => break,
            Err(e) => return Err(read_failure(e)),
        }
    }
    Ok(Reply {
        status,
        content_type,
        message,
        payload: crate::body::concat(chunks, total),
    })
}

/// Reads the answer's header; returns its fields and the payload bytes that came with it.
async fn read_reply_head(
    recv: &mut RecvStream,
) -> Result<(Status, String, String, Bytes), InvokeError> {
    let (block, first) = read_header(recv).await.map_err(|e| match e {
        HeaderError::Decode(e) => InvokeError::Protocol(format!("malformed response header: {e}")),
        HeaderError::Finished => {
            InvokeError::Protocol("the answer ended before its header".to_owned())
        }
        HeaderError::Read(e) => read_failure(e),
    })?;
    match ResponseHeader::decode(&block, MAX_HEADER_BYTES) {
        Ok(Some((h, _))) => Ok((
            h.status,
            h.content_type.to_owned(),
            h.message.to_owned(),
            first,
        )),
        Ok(None) => Err(InvokeError::Protocol(
            "incomplete response header".to_owned(),
        )),
        Err(e) => Err(InvokeError::Protocol(format!(
            "malformed response header: {e}"
        ))),
    }
}

fn read_failure(e: ReadError) -> InvokeError {
    match e {
        ReadError::Reset(c) => {
            let code = StreamCode::from_code(c.into_inner());
            InvokeError::Reset {
                code,
                status: status_for_reset(code),
            }
        }
        ReadError::ConnectionLost(e) => InvokeError::ConnectionLost(e),
        other => InvokeError::Protocol(other.to_string()),
    }
}

fn body_failure(e: BodyError) -> InvokeError {
    match e {
        BodyError::Reset { code } => InvokeError::Reset {
            code,
            status: status_for_reset(code),
        },
        BodyError::ConnectionLost(e) => InvokeError::ConnectionLost(e),
        BodyError::TimedOut => InvokeError::DeadlineExceeded,
        other => InvokeError::Body(other),
    }
}
