//! The SDK's error types.
//!
//! - [`AgentError`]: attaching, configuration and the control-stream operations (discover, card
//!   update, detach).
//! - [`InvokeError`]: an invocation that produced no complete answer, or (through
//!   [`Reply::into_result`](crate::Reply::into_result)) an answer whose status is not OK.
//! - [`BodyError`]: reading or writing a streamed request or response body.
//! - [`HandlerError`]: what a capability handler returns when it fails; the caller receives it
//!   as an `APPLICATION_ERROR` answer.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use dmsc_protocol::card::CardError;
use dmsc_protocol::control::Refusal;
use dmsc_protocol::{DecodeError, Status, StreamCode};

/// Why attaching, or an operation on the agent's control stream, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A certificate, key or trust-anchor file could not be loaded.
    #[error("cannot load the {what} from {}: {reason}", path.display())]
    Credentials {
        /// Which file: `certificate chain`, `private key` or `trust anchors`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The configuration cannot work; the text says which setting and why.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// The agent card is invalid.
    #[error("invalid agent card: {0}")]
    Card(#[from] CardError),
    /// The TLS configuration was rejected (for example a key that does not match the
    /// certificate, or an unusable trust anchor).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The local UDP socket could not be opened.
    #[error("cannot open the local QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// A connection to the gateway could not even be started.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The gateway (or lane) address.
        addr: SocketAddr,
        /// Why quinn refused to start the connection.
        source: quinn::ConnectError,
    },
    /// The QUIC or TLS handshake with the gateway failed (for example the gateway's
    /// certificate is not from the trust anchors or does not name a gateway of our trust
    /// domain).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The gateway (or lane) address.
        addr: SocketAddr,
        /// The connection error quinn reported.
        source: quinn::ConnectionError,
    },
    /// The connection to the gateway was lost before the operation completed.
    #[error("connection to the gateway lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// The gateway refused the attach or the card update.
    #[error("refused by the gateway ({refusal:?}): {reason}")]
    Refused {
        /// Why, as a code.
        refusal: Refusal,
        /// Why, for a human.
        reason: String,
    },
    /// The gateway broke the `dmsc/1` protocol.
    #[error("protocol violation by the gateway: {0}")]
    Protocol(String),
    /// The operation did not complete in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The agent is not attached (it is reconnecting) and did not re-attach in time.
    #[error("not attached to the gateway")]
    Disconnected,
    /// The agent has detached or shut down.
    #[error("the agent is closed")]
    Closed,
}

/// Why an invocation failed.
///
/// [`InvokeError::status`] maps every variant to the [`Status`] that best describes it, so a
/// caller can treat transport failures and in-band failures alike.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum InvokeError {
    /// The agent was not attached to a gateway (it is reconnecting) and did not re-attach
    /// before the request's deadline.
    #[error("not attached to a gateway before the deadline")]
    Disconnected,
    /// The connection carrying the request was lost before the answer was complete.
    #[error("connection to the gateway lost mid-request: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// The gateway reset the invocation stream.
    #[error("the gateway reset the request ({code:?}, status {status})")]
    Reset {
        /// The stream error code.
        code: StreamCode,
        /// What the code means as a status (for example `TARGET_FAILED` when the target
        /// failed after the answer had begun).
        status: Status,
    },
    /// The request's deadline passed before the answer was complete.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The answer's payload is longer than the configured limit.
    #[error("the answer is longer than the limit of {limit} bytes")]
    ResponseTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// A body chunk could not be read or written.
    #[error("request or response body: {0}")]
    Body(#[from] BodyError),
    /// The gateway sent a malformed answer.
    #[error("protocol violation by the gateway: {0}")]
    Protocol(String),
    /// The request cannot be sent as given (empty or over-long capability or content type).
    #[error("invalid request: {0}")]
    InvalidRequest(DecodeError),
    /// The agent has detached or shut down.
    #[error("the agent is closed")]
    Closed,
    /// The answer arrived, with a status other than OK (returned by
    /// [`Reply::into_result`](crate::Reply::into_result)).
    #[error("{status}: {message}")]
    Status {
        /// The answer's status.
        status: Status,
        /// The answer's diagnostic message.
        message: String,
        /// The answer's payload (for `APPLICATION_ERROR`, the target's own error detail).
        payload: Bytes,
    },
}

impl InvokeError {
    /// The status that describes this failure.
    ///
    /// Lost or missing connections are `UNAVAILABLE`, resets map by their stream code
    /// (`TARGET_FAILED`, `DEADLINE_EXCEEDED`, ...), a local deadline is `DEADLINE_EXCEEDED`,
    /// an invalid request is `BAD_REQUEST`, and a malformed or over-long answer is
    /// `TARGET_FAILED`.
    pub fn status(&self) -> Status {
        match self {
            Self::Disconnected | Self::ConnectionLost(_) | Self::Closed => Status::Unavailable,
            Self::Reset { status, .. } | Self::Status { status, .. } => *status,
            Self::DeadlineExceeded => Status::DeadlineExceeded,
            Self::InvalidRequest(_) => Status::BadRequest,
            Self::Body(BodyError::TimedOut) => Status::DeadlineExceeded,
            Self::Body(BodyError::Reset { code } | BodyError::Stopped { code }) => {
                status_for_reset(*code)
            }
            Self::Body(BodyError::ConnectionLost(_)) => Status::Unavailable,
            Self::ResponseTooLarge { .. } | Self::Body(_) | Self::Protocol(_) => {
                Status::TargetFailed
            }
        }
    }
}

/// The status a stream reset code stands for.
pub(crate) fn status_for_reset(code: StreamCode) -> Status {
    match code {
        StreamCode::TargetFailed => Status::TargetFailed,
        StreamCode::DeadlineExceeded => Status::DeadlineExceeded,
        // The gateway ended an exchange that made no progress for too long.
        StreamCode::Stalled => Status::DeadlineExceeded,
        StreamCode::ProtocolViolation => Status::BadRequest,
        StreamCode::Cancelled => Status::Unavailable,
        StreamCode::Unknown(_) => Status::TargetFailed,
    }
}

/// Why a request or response body could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is longer than the limit given to the read-to-end helper.
    #[error("body longer than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The peer abandoned the stream (QUIC `RESET_STREAM`).
    #[error("stream reset by the peer ({code:?})")]
    Reset {
        /// The stream error code.
        code: StreamCode,
    },
    /// The peer no longer reads the stream (QUIC `STOP_SENDING`), for example because the
    /// caller gave up or the answer has already been decided.
    #[error("the peer stopped reading ({code:?})")]
    Stopped {
        /// The stream error code.
        code: StreamCode,
    },
    /// The connection was lost.
    #[error("connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// No data could be read or written for the configured `request_timeout`.
    #[error("no progress within the idle timeout")]
    TimedOut,
    /// The stream was never opened: the invocation (or the handler's answer) failed before its
    /// body could be written; the invocation's own result says why.
    #[error("the stream was not opened")]
    NotOpened,
    /// The writer was already finished or aborted.
    #[error("the body was already finished")]
    Finished,
}

/// A capability handler's failure.
///
/// The caller receives an `APPLICATION_ERROR` answer whose message is this error's message and
/// whose payload is the optional detail set with [`HandlerError::with_payload`].
///
/// Any `std::error::Error` converts into it, so handlers can use `?` freely; the message is
/// the error's display text followed by its sources. Like `anyhow::Error`, `HandlerError`
/// itself deliberately does not implement `std::error::Error` (that would make the blanket
/// conversion impossible).
pub struct HandlerError {
    message: String,
    content_type: String,
    payload: Bytes,
}

impl HandlerError {
    /// An error with this message and no payload.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            content_type: String::new(),
            payload: Bytes::new(),
        }
    }

    /// Attaches an error detail payload (for example a JSON problem document) sent to the
    /// caller with the `APPLICATION_ERROR` status.
    pub fn with_payload(
        mut self,
        content_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        self.content_type = content_type.into();
        self.payload = payload.into();
        self
    }

    /// The message sent to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The detail payload's media type (empty when there is none).
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The detail payload (empty when there is none).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("message", &self.message)
            .field("content_type", &self.content_type)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn handler_error_from_an_error_keeps_its_sources() {
        let e: HandlerError = Outer(std::io::Error::other("inner")).into();
        assert_eq!(e.message(), "outer: inner");
        assert!(e.payload().is_empty());
        let e = HandlerError::new("bad").with_payload("application/json", "{}");
        assert_eq!(e.to_string(), "bad");
        assert_eq!(e.content_type(), "application/json");
    }

    #[test]
    fn every_invoke_error_maps_to_a_status() {
        assert_eq!(InvokeError::Disconnected.status(), Status::Unavailable);
        assert_eq!(
            InvokeError::DeadlineExceeded.status(),
            Status::DeadlineExceeded
        );
        assert_eq!(
            InvokeError::Reset {
                code: StreamCode::TargetFailed,
                status: status_for_reset(StreamCode::TargetFailed)
            }
            .status(),
            Status::TargetFailed
        );
        assert_eq!(
            status_for_reset(StreamCode::DeadlineExceeded),
            Status::DeadlineExceeded
        );
        assert_eq!(
            InvokeError::Body(BodyError::Reset {
                code: StreamCode::TargetFailed
            })
            .status(),
            Status::TargetFailed
        );
    }
}
