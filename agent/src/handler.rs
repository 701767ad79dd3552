//! Serving capabilities: the handler registry, and the request and response a handler sees.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmsc_protocol::header::TraceContext;
use dmsc_protocol::Status;
use tokio::sync::oneshot;

use crate::body::{Body, BodyWriter, OpenStream};
use crate::error::{BodyError, HandlerError};
use crate::handle::Agent;

/// The future a handler returns, boxed.
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<Response, HandlerError>> + Send>>;

/// A capability handler, type-erased.
pub(crate) trait Handler: Send + Sync + 'static {
    fn call(&self, request: Request) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    fn call(&self, request: Request) -> HandlerFuture {
        Box::pin(self(request))
    }
}

/// The capabilities an agent serves: one async handler per capability name (skill id).
///
/// ```
/// use dmsc_agent::{Handlers, HandlerError, Request, Response, Status};
///
/// let handlers = Handlers::new()
///     .on("echo", |mut req: Request| async move {
///         let payload = req.payload().await?;
///         Ok::<_, HandlerError>(Response::ok(payload).with_content_type(req.content_type))
///     })
///     .on("whoami", |req: Request| async move {
///         Ok::<_, HandlerError>(Response::ok(req.caller))
///     })
///     .on("strict", |_req: Request| async move {
///         Ok::<_, HandlerError>(Response::error(Status::BadRequest, "never happy"))
///     });
/// assert_eq!(handlers.capabilities().count(), 3);
/// ```
///
/// A handler runs on its own tokio task per request. It returns a whole [`Response`], or a
/// streamed one made with [`Response::streaming`]; it reads the request body whole
/// ([`Request::payload`], [`Request::body`]) or chunk by chunk ([`Request::chunk`]). A handler
/// that returns `Err` (or panics) answers `APPLICATION_ERROR`. If the caller gives up (the
/// gateway stops the answer stream), the handler's task is aborted.
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Arc<dyn Handler>>,
    fallback: Option<Arc<dyn Handler>>,
}

impl Handlers {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `capability`, replacing any previous one.
    pub fn on<F, Fut>(mut self, capability: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
    {
        self.map.insert(capability.into(), Arc::new(handler));
        self
    }

    /// Registers `handler` for every capability without a handler of its own, replacing any
    /// previous fallback. [`Request::capability`] says which one was invoked.
    ///
    /// For agents whose capabilities are known only at run time, such as a bridge that
    /// advertises another agent's skills and may re-read them ([`Agent::update_card`]).
    /// Without a fallback, a request for a capability with no handler is answered
    /// `NO_ROUTE`.
    ///
    /// ```
    /// use dmsc_agent::{Handlers, HandlerError, Request, Response};
    ///
    /// let handlers = Handlers::new().fallback(|req: Request| async move {
    ///     Ok::<_, HandlerError>(Response::ok(format!("you asked for {}", req.capability)))
    /// });
    /// assert_eq!(handlers.capabilities().count(), 0);
    /// ```
    pub fn fallback<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
    {
        self.fallback = Some(Arc::new(handler));
        self
    }

    /// The capabilities with a handler of their own (not counting a fallback).
    pub fn capabilities(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The handler for `capability`: its own, else the fallback.
    pub(crate) fn get(&self, capability: &str) -> Option<Arc<dyn Handler>> {
        self.map.get(capability).or(self.fallback.as_ref()).cloned()
    }
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.capabilities().collect();
        names.sort_unstable();
        f.debug_struct("Handlers")
            .field("capabilities", &names)
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

/// An invocation received from the gateway.
///
/// The metadata is in public fields; the body is read with [`Request::payload`],
/// [`Request::body`] or, chunk by chunk, [`Request::chunk`].
pub struct Request {
    /// The capability invoked.
    pub capability: String,
    /// The caller's verified identity (`spiffe://<domain>/agent/<name>`), stamped by the
    /// gateway from the caller's certificate, or, for a request a bridge sent on behalf of
    /// someone, that someone (see [`Request::via`]).
    pub caller: String,
    /// The bridge that sent the request on behalf of `caller` (an A2A front door, say), as the
    /// gateway verified it; empty for a request the caller sent itself.
    pub via: String,
    /// The payload's media type; may be empty.
    pub content_type: String,
    /// The time left for the answer to begin, as the gateway computed it when it forwarded the
    /// request; `None` if the caller set no deadline.
    pub deadline: Option<Duration>,
    /// The caller's trace context (all zero if none).
    pub trace: TraceContext,
    /// How many gateways this request has crossed. A handler that invokes other capabilities
    /// on behalf of this request should pass it on ([`RequestBuilder::caused_by`]) so the
    /// gateway can stop loops (`LOOP_DETECTED`).
    ///
    /// [`RequestBuilder::caused_by`]: crate::RequestBuilder::caused_by
    pub hop_count: u8,
    body: Body,
    max_payload: usize,
    agent: Option<Agent>,
}

impl Request {
    pub(crate) fn new(
        header: &dmsc_protocol::header::RequestHeader<'_>,
        body: Body,
        max_payload: usize,
        agent: Option<Agent>,
    ) -> Self {
        Self {
            capability: header.capability.to_owned(),
            caller: header.caller.to_owned(),
            via: header.via.to_owned(),
            content_type: header.content_type.to_owned(),
            deadline: (header.deadline_ms > 0).then(|| Duration::from_millis(header.deadline_ms)),
            trace: header.trace,
            hop_count: header.hop_count,
            body,
            max_payload,
            agent,
        }
    }

    /// The rest of the body in one buffer, up to the agent's `max_request_bytes`.
    pub async fn payload(&mut self) -> Result<Bytes, BodyError> {
        self.body.read_to_end(self.max_payload).await
    }

    /// The rest of the body in one buffer; fails with [`BodyError::TooLarge`] once more than
    /// `limit` bytes have arrived.
    pub async fn body(&mut self, limit: usize) -> Result<Bytes, BodyError> {
        self.body.read_to_end(limit).await
    }

    /// The next chunk of the body, `None` at its end. Chunks are as QUIC delivered them; their
    /// boundaries mean nothing.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.body.chunk().await
    }

    /// The agent serving this request, for handlers that invoke other capabilities. `None`
    /// only while the agent is shutting down.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("capability", &self.capability)
            .field("caller", &self.caller)
            .field("via", &self.via)
            .field("content_type", &self.content_type)
            .field("deadline", &self.deadline)
            .field("trace", &self.trace)
            .field("body", &self.body)
            .finish()
    }
}

/// A handler's answer: a status, a content type, a message and a payload, whole or streamed.
pub struct Response {
    /// The status.
    pub status: Status,
    /// The payload's media type; may be empty.
    pub content_type: String,
    /// A diagnostic for the caller, usually empty on success (cut to the protocol's limit of
    /// 1024 bytes when sent).
    pub message: String,
    pub(crate) body: ResponseBody,
}

/// A response payload.
pub(crate) enum ResponseBody {
    /// All of it.
    Full(Bytes),
    /// Written by a [`BodyWriter`] once the header is sent.
    Stream(oneshot::Sender<OpenStream>),
}

impl Response {
    /// `OK` with this payload.
    pub fn ok(payload: impl Into<Bytes>) -> Self {
        Self {
            status: Status::Ok,
            content_type: String::new(),
            message: String::new(),
            body: ResponseBody::Full(payload.into()),
        }
    }

    /// A failure status with a diagnostic message and no payload.
    pub fn error(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            content_type: String::new(),
            message: message.into(),
            body: ResponseBody::Full(Bytes::new()),
        }
    }

    /// `OK` with a payload written chunk by chunk through the returned [`BodyWriter`].
    ///
    /// Return the response from the handler, and write the body from another task (the
    /// writer's first write waits until the SDK has sent the header, which happens once the
    /// handler has returned):
    ///
    /// ```
    /// use dmsc_agent::{HandlerError, Request, Response};
    ///
    /// async fn count(_req: Request) -> Result<Response, HandlerError> {
    ///     let (response, mut body) = Response::streaming("text/plain");
    ///     tokio::spawn(async move {
    ///         for i in 0..10 {
    ///             if body.write(format!("{i}\n")).await.is_err() {
    ///                 return; // the caller went away
    ///             }
    ///         }
    ///         let _ = body.finish().await;
    ///     });
    ///     Ok(response)
    /// }
    /// ```
    pub fn streaming(content_type: impl Into<String>) -> (Self, BodyWriter) {
        let (writer, tx) = BodyWriter::pending(None);
        (
            Self {
                status: Status::Ok,
                content_type: content_type.into(),
                message: String::new(),
                body: ResponseBody::Stream(tx),
            },
            writer,
        )
    }

    /// Sets the payload's media type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Sets the diagnostic message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Replaces the payload with this one (a streamed body is dropped, which aborts it).
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.body = ResponseBody::Full(payload.into());
        self
    }

    /// The payload, unless the body is streamed.
    pub fn payload(&self) -> Option<&Bytes> {
        match &self.body {
            ResponseBody::Full(payload) => Some(payload),
            ResponseBody::Stream(_) => None,
        }
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Response");
        d.field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("message", &self.message);
        match &self.body {
            ResponseBody::Full(payload) => d.field("payload_len", &payload.len()),
            ResponseBody::Stream(_) => d.field("payload", &"streamed"),
        };
        d.finish()
    }
}
