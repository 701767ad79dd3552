//! Status codes of invocation responses and the QUIC error codes DMSC uses.

use std::fmt;

/// The status carried in a response header.
///
/// Codes 0 to 10 are defined by `dmsc/1`; any other value decodes as [`Status::Unknown`] and is
/// treated as a failure by receivers, so new codes can be added without breaking old agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The target handled the request; the payload is its answer.
    Ok,
    /// No attached agent offers the capability.
    NoRoute,
    /// Policy forbids this caller from invoking this capability.
    Denied,
    /// The caller exceeded a rate limit. Reserved: sent once the control plane pushes rate
    /// limits.
    RateLimited,
    /// Every candidate is at its concurrency limit, or a gateway queue is full. Retry later.
    Overloaded,
    /// The request's deadline passed before the answer began.
    DeadlineExceeded,
    /// The target vanished, reset the stream, or broke the protocol mid-request.
    TargetFailed,
    /// The request header was malformed or over a limit.
    BadRequest,
    /// The hop count exceeded the limit: the request is going round in circles.
    LoopDetected,
    /// The gateway is draining and accepts no new requests.
    Unavailable,
    /// The target's handler failed; the payload may hold the agent's own error detail.
    ApplicationError,
    /// A code this implementation does not know. Treated as a failure.
    Unknown(u64),
}

impl Status {
    /// The wire value.
    pub fn code(self) -> u64 {
        match self {
            Self::Ok => 0,
            Self::NoRoute => 1,
            Self::Denied => 2,
            Self::RateLimited => 3,
            Self::Overloaded => 4,
            Self::DeadlineExceeded => 5,
            Self::TargetFailed => 6,
            Self::BadRequest => 7,
            Self::LoopDetected => 8,
            Self::Unavailable => 9,
            Self::ApplicationError => 10,
            Self::Unknown(code) => code,
        }
    }

    /// The status for a wire value.
    pub fn from_code(code: u64) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::NoRoute,
            2 => Self::Denied,
            3 => Self::RateLimited,
            4 => Self::Overloaded,
            5 => Self::DeadlineExceeded,
            6 => Self::TargetFailed,
            7 => Self::BadRequest,
            8 => Self::LoopDetected,
            9 => Self::Unavailable,
            10 => Self::ApplicationError,
            other => Self::Unknown(other),
        }
    }

    /// The name used in docs, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::NoRoute => "NO_ROUTE",
            Self::Denied => "DENIED",
            Self::RateLimited => "RATE_LIMITED",
            Self::Overloaded => "OVERLOADED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::TargetFailed => "TARGET_FAILED",
            Self::BadRequest => "BAD_REQUEST",
            Self::LoopDetected => "LOOP_DETECTED",
            Self::Unavailable => "UNAVAILABLE",
            Self::ApplicationError => "APPLICATION_ERROR",
            Self::Unknown(_) => "UNKNOWN",
        }
    }

    /// Every defined status, in code order.
    pub const ALL: [Status; 11] = [
        Self::Ok,
        Self::NoRoute,
        Self::Denied,
        Self::RateLimited,
        Self::Overloaded,
        Self::DeadlineExceeded,
        Self::TargetFailed,
        Self::BadRequest,
        Self::LoopDetected,
        Self::Unavailable,
        Self::ApplicationError,
    ];
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(code) => write!(f, "UNKNOWN({code})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Application error codes used in QUIC `RESET_STREAM` and `STOP_SENDING` on invocation streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamCode {
    /// The sender gave up on the request (the caller cancelled, or the gateway is abandoning it).
    Cancelled,
    /// The other leg of a forwarded request failed after the response header was sent, so no
    /// status can be delivered in-band any more.
    TargetFailed,
    /// The request's deadline passed (sent by the gateway to the target when it abandons a
    /// request whose answer did not begin in time).
    DeadlineExceeded,
    /// The stream broke the protocol (for example a malformed header on a stream the gateway
    /// opened).
    ProtocolViolation,
    /// The exchange made no progress for longer than the gateway allows (a caller that does
    /// not read its response, or a target that does not read its request or stops answering
    /// mid-body), so the gateway ended both legs.
    Stalled,
    /// A code this implementation does not know.
    Unknown(u64),
}

impl StreamCode {
    /// The wire value.
    pub fn code(self) -> u64 {
        match self {
            Self::Cancelled => 0x1,
            Self::TargetFailed => 0x2,
            Self::DeadlineExceeded => 0x3,
            Self::ProtocolViolation => 0x4,
            Self::Stalled => 0x5,
            Self::Unknown(code) => code,
        }
    }

    /// The code for a wire value.
    pub fn from_code(code: u64) -> Self {
        match code {
            0x1 => Self::Cancelled,
            0x2 => Self::TargetFailed,
            0x3 => Self::DeadlineExceeded,
            0x4 => Self::ProtocolViolation,
            0x5 => Self::Stalled,
            other => Self::Unknown(other),
        }
    }
}

/// Application error codes used in QUIC `CONNECTION_CLOSE` on `dmsc/1` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionCode {
    /// Orderly close: detach completed, or the peer is done.
    NoError,
    /// The peer broke the protocol (malformed control frame, wrong first frame, ...).
    ProtocolViolation,
    /// A control frame exceeded its length limit.
    FrameTooLarge,
    /// The attach was refused; the `ATTACH_REFUSED` frame before the close says why.
    AttachRefused,
    /// The gateway is shutting down; reconnect later.
    ShuttingDown,
    /// A gateway limit on connections was reached (connections per identity).
    LimitExceeded,
    /// The gateway failed internally.
    InternalError,
    /// The peer's certificate identity is not acceptable for this connection.
    Unauthenticated,
    /// No attach or lane frame arrived within the attach timeout.
    AttachTimeout,
    /// The peer sent nothing, not even an acknowledgement of the gateway's keep-alives, for
    /// longer than the gateway's peer timeout; the gateway gave it up as gone.
    Unresponsive,
    /// A code this implementation does not know.
    Unknown(u64),
}

impl ConnectionCode {
    /// The wire value.
    pub fn code(self) -> u64 {
        match self {
            Self::NoError => 0x0,
            Self::ProtocolViolation => 0x1,
            Self::FrameTooLarge => 0x2,
            Self::AttachRefused => 0x3,
            Self::ShuttingDown => 0x4,
            Self::LimitExceeded => 0x5,
            Self::InternalError => 0x6,
            Self::Unauthenticated => 0x7,
            Self::AttachTimeout => 0x8,
            Self::Unresponsive => 0x9,
            Self::Unknown(code) => code,
        }
    }

    /// The code for a wire value.
    pub fn from_code(code: u64) -> Self {
        match code {
            0x0 => Self::NoError,
            0x1 => Self::ProtocolViolation,
            0x2 => Self::FrameTooLarge,
            0x3 => Self::AttachRefused,
            0x4 => Self::ShuttingDown,
            0x5 => Self::LimitExceeded,
            0x6 => Self::InternalError,
            0x7 => Self::Unauthenticated,
            0x8 => Self::AttachTimeout,
            0x9 => Self::Unresponsive,
            other => Self::Unknown(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), status);
        }
        assert_eq!(Status::from_code(99), Status::Unknown(99));
        for code in 0..=0x10 {
            assert_eq!(StreamCode::from_code(code).code(), code);
            assert_eq!(ConnectionCode::from_code(code).code(), code);
        }
    }
}
