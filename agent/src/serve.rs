//! Serving invocations the gateway forwards to this agent.
//!
//! Each connection (primary or lane) runs an accept loop; each stream the gateway opens gets
//! its own task, which reads the request header, runs the handler on a task of its own (so a
//! panic becomes an `APPLICATION_ERROR` answer, and a caller that gives up aborts it), and
//! writes the answer. The number of concurrent streams is bounded by QUIC: the gateway may open
//! at most `max_concurrent` at once per connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::limits::{MAX_CONTENT_TYPE_BYTES, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES};
use dmsc_protocol::{Status, StreamCode};
use quinn::{Connection, RecvStream, SendStream};
use tokio::time::timeout;

use crate::body::{code, read_header, write_idle, Body, HeaderError};
use crate::handle::Shared;
use crate::handler::{Handlers, Request, Response, ResponseBody};

/// What serving needs: the agent's shared state and its handlers.
pub(crate) struct Server {
    pub(crate) shared: Arc<Shared>,
    handlers: Handlers,
}

impl Server {
    pub(crate) fn new(shared: Arc<Shared>, handlers: Handlers) -> Self {
        Self { shared, handlers }
    }
}

/// Accepts the streams the gateway opens on `connection` until it closes.
pub(crate) async fn accept_loop(server: Arc<Server>, connection: Connection) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        tokio::spawn(serve_stream(server.clone(), send, recv));
    }
}

impl crate::Agent {
    /// Serves invocations that arrive on `connection`, a QUIC connection a caller opened to
    /// this agent directly, not through a gateway: each bidirectional stream is one request
    /// in the `dmsc/1` framing (request header, payload; response header, payload), served by
    /// the agent's handlers exactly as the gateway's streams are. Returns when the connection
    /// closes. The caller identity a handler sees is whatever the header carries, since no
    /// gateway stamped it: authenticate the connection yourself (its TLS peer certificate).
    ///
    /// Meant for benchmarks that compare the gateway with direct calls on the same serving
    /// path, and for tests.
    pub async fn serve_connection(&self, connection: Connection) {
        if let Some(server) = self.server().and_then(|s| s.downcast::<Server>().ok()) {
            accept_loop(server, connection).await;
        }
    }
}

/// Serves one invocation stream.
async fn serve_stream(server: Arc<Server>, mut send: SendStream, mut recv: RecvStream) {
    let shared = &server.shared;
    let idle = shared.settings.request_timeout;
    let (block, first) = match timeout(idle, read_header(&mut recv)).await {
        Ok(Ok(header)) => header,
        Ok(Err(HeaderError::Read(_))) => {
            // Reset by the gateway or connection lost: nobody to answer.
            let _ = send.reset(code(StreamCode::Cancelled));
            return;
        }
        Ok(Err(HeaderError::Decode(e))) => {
            tracing::debug!(error = %e, "malformed request header from the gateway");
            return violation(send, recv);
        }
        Ok(Err(HeaderError::Finished)) => return violation(send, recv),
        Err(_) => {
            let _ = send.reset(code(StreamCode::Cancelled));
            let _ = recv.stop(code(StreamCode::Cancelled));
            return;
        }
    };
    let header = match RequestHeader::decode(&block, MAX_HEADER_BYTES) {
        Ok(Some((header, _))) => header,
        Ok(None) | Err(_) => return violation(send, recv),
    };
    let Some(handler) = server.handlers.get(header.capability) else {
        let message = format!("this agent has no handler for {:?}", header.capability);
        let _ = recv.stop(code(StreamCode::Cancelled));
        let response = Response::error(Status::NoRoute, message);
        return write_response(send, response, idle).await;
    };
    let request = Request::new(
        &header,
        Body::new(first, recv, idle),
        shared.settings.max_request_bytes,
        shared.agent(),
    );
    let handler = handler.call(request);

    let stopped = send.stopped();
    let mut task = tokio::spawn(handler);
    let outcome = tokio::select! {
        outcome = &mut task => outcome,
        _ = stopped => {
            // The caller gave up (or the connection is gone): nobody wants the answer.
            task.abort();
            let _ = send.reset(code(StreamCode::Cancelled));
            return;
        }
    };
    let response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => Response::error(Status::ApplicationError, error.message())
            .with_content_type(error.content_type())
            .with_payload(error.payload().clone()),
        Err(join) => {
            tracing::warn!(error = %join, "capability handler panicked");
            Response::error(Status::ApplicationError, "the handler panicked")
        }
    };
    write_response(send, response, idle).await;
}

/// Writes `response`: header, then payload (or hands the stream to the response's writer).
async fn write_response(mut send: SendStream, response: Response, idle: Duration) {
    let mut header = Vec::new();
    let mut message = response.message.as_str();
    if message.len() > MAX_MESSAGE_BYTES {
        message = truncate(message, MAX_MESSAGE_BYTES);
    }
    let encoded = if response.content_type.len() > MAX_CONTENT_TYPE_BYTES {
        ResponseHeader {
            status: Status::ApplicationError,
            content_type: "",
            message: "the handler's content type is over the protocol limit",
        }
        .encode(&mut header)
        .map(|()| false)
    } else {
        ResponseHeader {
            status: response.status,
            content_type: &response.content_type,
            message,
        }
        .encode(&mut header)
        .map(|()| true)
    };
    let keep_body = match encoded {
        Ok(keep) => keep,
        Err(e) => {
            // Only an unencodable status code gets here; tell the caller something went wrong.
            tracing::warn!(error = %e, "cannot encode the handler's response header");
            header.clear();
            let fallback = ResponseHeader::new(Status::ApplicationError).encode(&mut header);
            if fallback.is_err() {
                let _ = send.reset(code(StreamCode::TargetFailed));
                return;
            }
            false
        }
    };
    if let Err(e) = write_idle(&mut send, Bytes::from(header), idle).await {
        tracing::debug!(error = %e, "cannot write the answer header");
        return;
    }
    match response.body {
        ResponseBody::Full(payload) => {
            if keep_body {
                if let Err(e) = write_idle(&mut send, payload, idle).await {
                    tracing::debug!(error = %e, "cannot write the answer payload");
                    return;
                }
            }
            let _ = send.finish();
        }
        ResponseBody::Stream(handover) if keep_body => {
            if let Err((mut send, _)) = handover.send((send, idle)) {
                // The writer was dropped before writing: that is an aborted body.
                let _ = send.reset(code(StreamCode::Cancelled));
            }
        }
        ResponseBody::Stream(_) => {
            let _ = send.finish();
        }
    }
}

/// Answers a stream that broke the protocol.
fn violation(mut send: SendStream, mut recv: RecvStream) {
    let _ = send.reset(code(StreamCode::ProtocolViolation));
    let _ = recv.stop(code(StreamCode::ProtocolViolation));
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        assert!(truncate(&long, MAX_MESSAGE_BYTES).len() <= MAX_MESSAGE_BYTES);
    }
}
