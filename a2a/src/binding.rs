//! The A2A binding on `dmsc/1` (normative text: `docs/A2A.md` §3).
//!
//! A request is one `dmsc/1` invocation of the capability, content type [`CONTENT_TYPE`], whose
//! body is an A2A v1.0 JSON-RPC 2.0 request object. The answer (status `OK`) is either one
//! JSON-RPC response object (content type [`CONTENT_TYPE`]) or, for the streaming methods, a
//! sequence of JSON-RPC response objects each followed by one line feed (content type
//! [`STREAM_CONTENT_TYPE`]), sent as the events happen. A `dmsc/1` status other than `OK` is
//! the gateway's or the serving agent's own failure, never an A2A error.

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use crate::error::{A2aError, ErrorKind};
use crate::method::Method;

/// The content type of a request and of a whole answer.
pub const CONTENT_TYPE: &str = "application/vnd.dmsc.a2a+json";

/// The content type of a streamed answer: JSON-RPC response objects, one per line.
pub const STREAM_CONTENT_TYPE: &str = "application/vnd.dmsc.a2a-stream+jsonl";

/// Default limit on one request body, one whole answer or one streamed event (bytes).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// An A2A request: v1.0 method, v1.0 params, the caller's JSON-RPC id.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The operation.
    pub method: Method,
    /// Its parameters, in v1.0 form.
    pub params: Value,
    /// The JSON-RPC id (a string, a number, or null).
    pub id: Value,
}

impl Call {
    /// The request body on the binding.
    pub fn encode(&self) -> Vec<u8> {
        request_bytes(&self.id, self.method.name(), &self.params)
    }

    /// Parses a request body of the binding (or of the A2A v1.0 JSON-RPC binding: they are
    /// the same JSON).
    pub fn decode(body: &[u8]) -> Result<Self, (A2aError, Value)> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| (A2aError::new(ErrorKind::Parse, e.to_string()), Value::Null))?;
        let (name, params, id) = envelope(&value)?;
        let method = Method::from_v1(name).ok_or_else(|| {
            (
                A2aError::new(
                    ErrorKind::MethodNotFound,
                    format!("method {name:?} not found"),
                ),
                id.clone(),
            )
        })?;
        Ok(Self { method, params, id })
    }
}

/// A JSON-RPC 2.0 request object, serialized from borrowed parts (nothing is copied first).
pub fn request_bytes(id: &Value, method: &str, params: &Value) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Request<'a> {
        jsonrpc: &'static str,
        id: &'a Value,
        method: &'a str,
        params: &'a Value,
    }
    let request = Request {
        jsonrpc: "2.0",
        id,
        method,
        params,
    };
    serde_json::to_vec(&request).unwrap_or_default()
}

/// The method name, params and id of a JSON-RPC 2.0 request object; an invalid envelope is
/// `InvalidRequest` (with the id, if one could be read).
pub fn envelope(value: &Value) -> Result<(&str, Value, Value), (A2aError, Value)> {
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let bad = |why: &str| {
        (
            A2aError::new(ErrorKind::InvalidRequest, why.to_owned()),
            id.clone(),
        )
    };
    if !value.is_object() {
        return Err(bad("a JSON-RPC request must be an object"));
    }
    if value.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(bad("jsonrpc must be \"2.0\""));
    }
    if !(id.is_string() || id.is_number() || id.is_null()) {
        return Err(bad("id must be a string, a number or null"));
    }
    let Some(name) = value.get("method").and_then(Value::as_str) else {
        return Err(bad("method must be a string"));
    };
    let params = match value.get("params") {
        None => json!({}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err((
                A2aError::new(ErrorKind::InvalidParams, "params must be an object"),
                id,
            ))
        }
    };
    Ok((name, params, id))
}

/// Checks that `bytes` is one JSON-RPC response object (a `result` or an `error`) and returns
/// it parsed.
pub fn parse_answer(bytes: &[u8]) -> Result<Value, A2aError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        A2aError::new(
            ErrorKind::InvalidAgentResponse,
            format!("the agent's answer is not JSON: {e}"),
        )
    })?;
    let is_response = value.is_object()
        && (value.get("result").is_some() || value.get("error").is_some_and(Value::is_object));
    if !is_response {
        return Err(A2aError::new(
            ErrorKind::InvalidAgentResponse,
            "the agent's answer is not a JSON-RPC response",
        ));
    }
    Ok(value)
}

/// Cuts a streamed answer into lines, each at most `limit` bytes.
#[derive(Debug)]
pub struct LineBuffer {
    pending: BytesMut,
    /// How much of `pending` is known to hold no line feed.
    scanned: usize,
    limit: usize,
}

impl LineBuffer {
    /// Lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            scanned: 0,
            limit,
        }
    }

    /// Adds a chunk; pushes each completed line (without its line feed, empty lines skipped)
    /// onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) -> Result<(), A2aError> {
        self.pending.extend_from_slice(chunk);
        // Only the bytes not scanned before are searched, so a long line arriving in small
        // chunks costs its length once, not once per chunk.
        while let Some(at) = self.pending[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = self.scanned + at;
            self.scanned = 0;
            if end > self.limit {
                return Err(self.too_long());
            }
            let line = self.pending.split_to(end + 1).freeze().slice(..end);
            if !line.is_empty() {
                out.push(line);
            }
        }
        self.scanned = self.pending.len();
        if self.pending.len() > self.limit {
            return Err(self.too_long());
        }
        Ok(())
    }

    fn too_long(&self) -> A2aError {
        A2aError::new(
            ErrorKind::InvalidAgentResponse,
            format!("an event is longer than the limit of {} bytes", self.limit),
        )
    }

    /// What is left after the last line feed, if anything (a final line without one).
    pub fn finish(self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip() {
        let call = Call {
            method: Method::GetTask,
            params: json!({"id": "t1"}),
            id: json!(7),
        };
        assert_eq!(Call::decode(&call.encode()).unwrap(), call);
    }

    #[test]
    fn bad_requests_are_typed() {
        let kind = |body: &[u8]| Call::decode(body).unwrap_err().0.kind;
        assert_eq!(kind(b"{"), ErrorKind::Parse);
        assert_eq!(kind(b"[]"), ErrorKind::InvalidRequest);
        assert_eq!(
            kind(br#"{"method":"GetTask","id":1}"#),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(br#"{"jsonrpc":"2.0","method":"GetTask","id":{}}"#),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(br#"{"jsonrpc":"2.0","method":"Nope","id":1}"#),
            ErrorKind::MethodNotFound
        );
        assert_eq!(
            kind(br#"{"jsonrpc":"2.0","method":"GetTask","id":1,"params":[1]}"#),
            ErrorKind::InvalidParams
        );
        let (_, id) = Call::decode(br#"{"jsonrpc":"2.0","method":"Nope","id":"x"}"#).unwrap_err();
        assert_eq!(id, json!("x"));
    }

    #[test]
    fn answers_must_be_responses() {
        assert!(parse_answer(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).is_ok());
        assert!(parse_answer(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#).is_ok());
        for bad in [&b"nope"[..], b"[]", br#"{"id":1}"#, br#"{"error":3}"#] {
            let e = parse_answer(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidAgentResponse);
        }
    }

    #[test]
    fn lines_across_chunks_and_limit() {
        let mut lines = LineBuffer::new(8);
        let mut out = Vec::new();
        lines.push(b"ab", &mut out).unwrap();
        lines.push(b"c\n\nde\nf", &mut out).unwrap();
        assert_eq!(out, vec![Bytes::from("abc"), Bytes::from("de")]);
        assert_eq!(lines.finish(), Some(Bytes::from("f")));
        let mut lines = LineBuffer::new(4);
        assert!(lines.push(b"12345", &mut out).is_err());
        // A whole line over the limit, arriving with its line feed, too.
        let mut lines = LineBuffer::new(4);
        assert!(lines.push(b"123456\n", &mut out).is_err());
    }
}
