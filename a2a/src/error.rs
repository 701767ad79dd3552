//! A2A errors, in the two forms a caller may expect: a JSON-RPC error object (JSON-RPC
//! bindings), or an HTTP status with a `google.rpc.Status`-shaped body (HTTP+JSON binding).
//!
//! The A2A codes (-32001 to -32009) and the JSON-RPC ones are the specification's (A2A v1.0
//! §5.4); the HTTP statuses and `ErrorInfo` reasons are the ones the a2a-sdk maps them to, so
//! its clients raise the matching exception. The gateway's own outcomes (a capability nobody
//! offers, a denial, a rate limit, ...) get codes of their own in the JSON-RPC server-error
//! range, listed in `docs/A2A.md`.

use dmsc_protocol::Status;
use serde_json::{json, Value};

/// Every error the front door and the adapter produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON.
    Parse,
    /// The body is JSON but not a valid request (JSON-RPC envelope, or too large).
    InvalidRequest,
    /// No such method (JSON-RPC) or route (HTTP+JSON).
    MethodNotFound,
    /// The method's parameters are invalid.
    InvalidParams,
    /// Something failed inside the bridge.
    Internal,
    /// A2A `TaskNotFoundError`.
    TaskNotFound,
    /// A2A `TaskNotCancelableError`.
    TaskNotCancelable,
    /// A2A `PushNotificationNotSupportedError`: push notifications would reach the caller
    /// around the gateway, so the front door does not offer them.
    PushNotSupported,
    /// A2A `UnsupportedOperationError`.
    UnsupportedOperation,
    /// A2A `ContentTypeNotSupportedError`.
    ContentTypeNotSupported,
    /// A2A `InvalidAgentResponseError`: the agent's answer is not an A2A answer.
    InvalidAgentResponse,
    /// A2A `ExtendedAgentCardNotConfiguredError`.
    ExtendedCardNotConfigured,
    /// A2A `VersionNotSupportedError`.
    VersionNotSupported,
    /// No agent of the domain offers the capability (`NO_ROUTE`).
    CapabilityNotFound,
    /// Policy forbids the caller to invoke the capability (`DENIED`).
    Denied,
    /// The caller exceeded a rate limit (`RATE_LIMITED`).
    RateLimited,
    /// Every agent offering the capability is busy, or a queue is full (`OVERLOADED`), or the
    /// front door is at its concurrency limit.
    Overloaded,
    /// The agent failed or went away mid-request (`TARGET_FAILED`, `APPLICATION_ERROR`).
    TargetFailed,
    /// The answer did not begin in time (`DEADLINE_EXCEEDED`).
    DeadlineExceeded,
    /// The request went round in circles (`LOOP_DETECTED`).
    LoopDetected,
    /// The front door is not attached to a gateway, or the gateway is draining.
    GatewayUnavailable,
}

/// One row of the mapping: JSON-RPC code, HTTP status, `google.rpc` status name, reason.
struct Row {
    code: i64,
    http: u16,
    status: &'static str,
    reason: &'static str,
}

impl ErrorKind {
    fn row(self) -> Row {
        let (code, http, status, reason) = match self {
            Self::Parse => (-32700, 400, "INVALID_ARGUMENT", "JSON_PARSE_ERROR"),
            Self::InvalidRequest => (-32600, 400, "INVALID_ARGUMENT", "INVALID_REQUEST"),
            Self::MethodNotFound => (-32601, 404, "NOT_FOUND", "METHOD_NOT_FOUND"),
            Self::InvalidParams => (-32602, 400, "INVALID_ARGUMENT", "INVALID_PARAMS"),
            Self::Internal => (-32603, 500, "INTERNAL", "INTERNAL_ERROR"),
            Self::TaskNotFound => (-32001, 404, "NOT_FOUND", "TASK_NOT_FOUND"),
            Self::TaskNotCancelable => (-32002, 400, "FAILED_PRECONDITION", "TASK_NOT_CANCELABLE"),
            Self::PushNotSupported => (
                -32003,
                400,
                "FAILED_PRECONDITION",
                "PUSH_NOTIFICATION_NOT_SUPPORTED",
            ),
            Self::UnsupportedOperation => {
                (-32004, 400, "FAILED_PRECONDITION", "UNSUPPORTED_OPERATION")
            }
            Self::ContentTypeNotSupported => (
                -32005,
                400,
                "INVALID_ARGUMENT",
                "CONTENT_TYPE_NOT_SUPPORTED",
            ),
            Self::InvalidAgentResponse => (-32006, 500, "INTERNAL", "INVALID_AGENT_RESPONSE"),
            Self::ExtendedCardNotConfigured => (
                -32007,
                400,
                "FAILED_PRECONDITION",
                "EXTENDED_AGENT_CARD_NOT_CONFIGURED",
            ),
            Self::VersionNotSupported => {
                (-32009, 400, "FAILED_PRECONDITION", "VERSION_NOT_SUPPORTED")
            }
            Self::CapabilityNotFound => (-32060, 404, "NOT_FOUND", "CAPABILITY_NOT_FOUND"),
            Self::Denied => (-32061, 403, "PERMISSION_DENIED", "DENIED"),
            Self::RateLimited => (-32062, 429, "RESOURCE_EXHAUSTED", "RATE_LIMITED"),
            Self::Overloaded => (-32063, 503, "UNAVAILABLE", "OVERLOADED"),
            Self::TargetFailed => (-32064, 502, "UNAVAILABLE", "TARGET_FAILED"),
            Self::DeadlineExceeded => (-32065, 504, "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
            Self::LoopDetected => (-32066, 508, "ABORTED", "LOOP_DETECTED"),
            Self::GatewayUnavailable => (-32067, 503, "UNAVAILABLE", "GATEWAY_UNAVAILABLE"),
        };
        Row {
            code,
            http,
            status,
            reason,
        }
    }

    /// The JSON-RPC error code.
    pub fn code(self) -> i64 {
        self.row().code
    }

    /// The HTTP status of the HTTP+JSON binding.
    pub fn http_status(self) -> u16 {
        self.row().http
    }

    /// The `ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        self.row().reason
    }

    /// The kind with `ErrorInfo` reason `reason`, if it is one of ours.
    pub fn from_reason(reason: &str) -> Option<Self> {
        ALL.iter().copied().find(|k| k.reason() == reason)
    }

    /// The kind with JSON-RPC code `code`, if it is one of ours.
    pub fn from_code(code: i64) -> Option<Self> {
        ALL.iter().copied().find(|k| k.code() == code)
    }

    /// What a `dmsc/1` status other than `OK` means to an A2A caller.
    pub fn for_status(status: Status) -> Self {
        match status {
            Status::NoRoute => Self::CapabilityNotFound,
            Status::Denied => Self::Denied,
            Status::RateLimited => Self::RateLimited,
            Status::Overloaded => Self::Overloaded,
            Status::DeadlineExceeded => Self::DeadlineExceeded,
            Status::LoopDetected => Self::LoopDetected,
            Status::Unavailable => Self::GatewayUnavailable,
            Status::BadRequest => Self::InvalidRequest,
            Status::TargetFailed | Status::ApplicationError | Status::Unknown(_) => {
                Self::TargetFailed
            }
            // Not an error; callers never ask.
            Status::Ok => Self::Internal,
        }
    }
}

const ALL: [ErrorKind; 21] = [
    ErrorKind::Parse,
    ErrorKind::InvalidRequest,
    ErrorKind::MethodNotFound,
    ErrorKind::InvalidParams,
    ErrorKind::Internal,
    ErrorKind::TaskNotFound,
    ErrorKind::TaskNotCancelable,
    ErrorKind::PushNotSupported,
    ErrorKind::UnsupportedOperation,
    ErrorKind::ContentTypeNotSupported,
    ErrorKind::InvalidAgentResponse,
    ErrorKind::ExtendedCardNotConfigured,
    ErrorKind::VersionNotSupported,
    ErrorKind::CapabilityNotFound,
    ErrorKind::Denied,
    ErrorKind::RateLimited,
    ErrorKind::Overloaded,
    ErrorKind::TargetFailed,
    ErrorKind::DeadlineExceeded,
    ErrorKind::LoopDetected,
    ErrorKind::GatewayUnavailable,
];

/// An error for an A2A caller: a kind and a human-readable message.
#[derive(Debug, Clone, PartialEq)]
pub struct A2aError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
}

/// The `ErrorInfo` domain of the errors the gateway's bridge originates.
pub const ERROR_DOMAIN: &str = "dmsc";

impl A2aError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The JSON-RPC `error` member: code, message and a `google.rpc.ErrorInfo` in `data`, as
    /// the a2a-sdk writes it.
    pub fn jsonrpc_error(&self) -> Value {
        json!({
            "code": self.kind.code(),
            "message": self.message,
            "data": [error_info(self.kind.reason())],
        })
    }

    /// A whole JSON-RPC error response.
    pub fn jsonrpc_response(&self, id: &Value) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "error": self.jsonrpc_error()})
    }

    /// The HTTP+JSON binding's error body (`google.rpc.Status` in an `error` member).
    pub fn rest_body(&self) -> Value {
        let row = self.kind.row();
        rest_error(row.http, row.status, &self.message, row.reason)
    }
}

fn error_info(reason: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": ERROR_DOMAIN,
    })
}

fn rest_error(http: u16, status: &str, message: &str, reason: &str) -> Value {
    json!({"error": {
        "code": http,
        "status": status,
        "message": message,
        "details": [error_info(reason)],
    }})
}

/// The HTTP+JSON form of a JSON-RPC `error` object an agent answered: HTTP status and body.
/// The code picks the row; a code we do not know becomes 500 with the agent's message.
pub fn rest_from_jsonrpc(error: &Value) -> (u16, Value) {
    let code = error.get("code").and_then(Value::as_i64).unwrap_or(-32603);
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("the agent answered an error");
    let kind = ErrorKind::from_code(code).unwrap_or(ErrorKind::Internal);
    let row = kind.row();
    (
        row.http,
        rest_error(row.http, row.status, message, row.reason),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for kind in ALL {
            assert_eq!(ErrorKind::from_code(kind.code()), Some(kind), "{kind:?}");
        }
    }

    #[test]
    fn sdk_reasons_for_the_specification_codes() {
        // The a2a-sdk maps these reasons back to its exception classes.
        assert_eq!(ErrorKind::TaskNotFound.reason(), "TASK_NOT_FOUND");
        assert_eq!(ErrorKind::TaskNotFound.http_status(), 404);
        assert_eq!(ErrorKind::VersionNotSupported.code(), -32009);
        let (http, body) = rest_from_jsonrpc(&json!({"code": -32001, "message": "gone"}));
        assert_eq!(http, 404);
        assert_eq!(body["error"]["details"][0]["reason"], "TASK_NOT_FOUND");
        assert_eq!(body["error"]["message"], "gone");
    }

    #[test]
    fn every_failure_status_maps_to_a_gateway_error() {
        assert_eq!(
            ErrorKind::for_status(Status::NoRoute),
            ErrorKind::CapabilityNotFound
        );
        assert_eq!(ErrorKind::for_status(Status::Denied).http_status(), 403);
        assert_eq!(
            ErrorKind::for_status(Status::RateLimited).http_status(),
            429
        );
        assert_eq!(
            ErrorKind::for_status(Status::DeadlineExceeded).http_status(),
            504
        );
    }
}
