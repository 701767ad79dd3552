//! Invocation stream headers.
//!
//! Every invocation is one bidirectional QUIC stream. The opener writes a [`RequestHeader`]
//! and then the opaque request payload up to FIN; the other side answers with a
//! [`ResponseHeader`] and the opaque response payload up to FIN. Each header is a block preceded
//! by its length as a varint:
//!
//! ```text
//! request header block:  capability (str) | deadline_ms (varint) | hop_count (varint)
//!                        | trace_id (16 bytes) | span_id (8 bytes) | trace_flags (1 byte)
//!                        | content_type (str) | caller (str)
//!                        | [target_session (varint) | [on_behalf_of (str) | [via (str)]]]
//!                        | ...extensions
//! response header block: status (varint) | content_type (str) | message (str) | ...extensions
//! str = varint length, then that many bytes of UTF-8
//! ```
//!
//! Bytes after the last known field of a block are extensions from a later revision and are
//! ignored. Headers borrow their strings from the input, so decoding allocates nothing.

use crate::codec::{block_prefix, put_bytes, Reader};
use crate::limits::{
    MAX_CAPABILITY_BYTES, MAX_CONTENT_TYPE_BYTES, MAX_HEADER_BYTES, MAX_HOPS, MAX_IDENTITY_BYTES,
    MAX_MESSAGE_BYTES,
};
use crate::{varint, DecodeError, Status};

/// W3C Trace Context identifiers, carried in binary form.
///
/// An all-zero `trace_id` means "no trace context".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceContext {
    /// The 16-byte trace id.
    pub trace_id: [u8; 16],
    /// The 8-byte id of the caller's span (the parent of the callee's span).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Whether a trace context is present.
    pub fn is_present(&self) -> bool {
        self.trace_id != [0; 16]
    }
}

/// The header that opens every invocation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader<'a> {
    /// The capability to invoke: an A2A skill id, 1 to 255 bytes of UTF-8.
    pub capability: &'a str,
    /// Milliseconds the caller is willing to wait for the answer to begin, counted from when the
    /// header is sent; 0 means no deadline beyond the gateway's default.
    pub deadline_ms: u64,
    /// How many gateways have forwarded this request so far.
    pub hop_count: u8,
    /// Distributed tracing context.
    pub trace: TraceContext,
    /// The media type of the payload (for example `application/json`); may be empty.
    pub content_type: &'a str,
    /// The verified identity of the caller, stamped by the gateway on requests it forwards. A
    /// caller sends it empty; gateways overwrite whatever a caller puts here.
    pub caller: &'a str,
    /// The agent session that must serve the request (a follow-up to work that agent holds,
    /// such as an A2A task); 0, the default, lets the gateway choose.
    pub target_session: u64,
    /// Sent by a bridge (a caller the domain marks as one, such as an A2A front door): the
    /// identity it acts for, which the gateway's policy then evaluates instead of the bridge's
    /// own and stamps as `caller`. Empty otherwise; gateways never forward it.
    pub on_behalf_of: &'a str,
    /// Stamped by the gateway when it forwards a request a bridge sent on behalf of `caller`:
    /// the bridge's verified identity. Callers send it empty.
    pub via: &'a str,
}

// The last three fields are optional on the wire: a sender leaves out the trailing ones at
// their defaults (0, empty), so a header using none of them is byte for byte one of the
// revision before they existed.

/// The header that opens every invocation answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader<'a> {
    /// The outcome.
    pub status: Status,
    /// The media type of the payload; may be empty.
    pub content_type: &'a str,
    /// A human-readable diagnostic, usually empty on success.
    pub message: &'a str,
}

impl<'a> RequestHeader<'a> {
    /// A header for `capability` with every other field at its default.
    pub fn new(capability: &'a str) -> Self {
        Self {
            capability,
            ..Self::default()
        }
    }

    /// Appends the length-prefixed header block to `out`.
    ///
    /// Fails if a field exceeds its limit, so nothing unreadable is ever sent.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        check_len("capability", self.capability.len(), MAX_CAPABILITY_BYTES)?;
        if self.capability.is_empty() {
            return Err(DecodeError::InvalidValue {
                what: "capability",
                reason: "empty",
            });
        }
        check_len(
            "content_type",
            self.content_type.len(),
            MAX_CONTENT_TYPE_BYTES,
        )?;
        check_len("caller", self.caller.len(), MAX_IDENTITY_BYTES)?;
        check_len("on_behalf_of", self.on_behalf_of.len(), MAX_IDENTITY_BYTES)?;
        check_len("via", self.via.len(), MAX_IDENTITY_BYTES)?;
        if self.deadline_ms > varint::MAX {
            return Err(DecodeError::InvalidValue {
                what: "deadline_ms",
                reason: "above 2^62-1",
            });
        }
        if self.target_session > varint::MAX {
            return Err(DecodeError::InvalidValue {
                what: "target_session",
                reason: "above 2^62-1",
            });
        }
        // How many of the optional trailing fields are written.
        let optional = if !self.via.is_empty() {
            3
        } else if !self.on_behalf_of.is_empty() {
            2
        } else {
            usize::from(self.target_session != 0)
        };
        let optional_len = [
            varint::encoded_len(self.target_session),
            str_len(self.on_behalf_of),
            str_len(self.via),
        ][..optional]
            .iter()
            .sum::<usize>();
        let block_len = str_len(self.capability)
            + varint::encoded_len(self.deadline_ms)
            + varint::encoded_len(u64::from(self.hop_count))
            + 16
            + 8
            + 1
            + str_len(self.content_type)
            + str_len(self.caller)
            + optional_len;
        out.reserve(block_len + 2);
        varint::encode(block_len as u64, out);
        put_bytes(out, self.capability.as_bytes());
        varint::encode(self.deadline_ms, out);
        varint::encode(u64::from(self.hop_count), out);
        out.extend_from_slice(&self.trace.trace_id);
        out.extend_from_slice(&self.trace.span_id);
        out.push(self.trace.flags);
        put_bytes(out, self.content_type.as_bytes());
        put_bytes(out, self.caller.as_bytes());
        if optional >= 1 {
            varint::encode(self.target_session, out);
        }
        if optional >= 2 {
            put_bytes(out, self.on_behalf_of.as_bytes());
        }
        if optional >= 3 {
            put_bytes(out, self.via.as_bytes());
        }
        Ok(())
    }

    /// Decodes a length-prefixed header from the start of `buf`.
    ///
    /// Returns the header and the number of bytes it took (prefix included), or `Ok(None)` if
    /// `buf` does not yet hold the whole header. `limit` caps the block length (at most
    /// [`MAX_HEADER_BYTES`] applies whatever is passed).
    pub fn decode(buf: &'a [u8], limit: usize) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some((block, prefix)) = header_prefix(buf, limit)? else {
            return Ok(None);
        };
        let Some(block_bytes) = buf.get(prefix..prefix + block) else {
            return Ok(None);
        };
        Ok(Some((Self::decode_fields(block_bytes)?, prefix + block)))
    }

    /// Decodes the fields of a request header block (without its length prefix): the whole of
    /// `block` is the header. Used for blocks that embed the request fields after fields of
    /// their own (the `dmsc-peer/1` trunk header).
    pub fn decode_fields(block_bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(block_bytes);
        let capability = r.str("capability", MAX_CAPABILITY_BYTES)?;
        if capability.is_empty() {
            return Err(DecodeError::InvalidValue {
                what: "capability",
                reason: "empty",
            });
        }
        let deadline_ms = r.varint("deadline_ms")?;
        let hop_count = r.bounded("hop_count", MAX_HOPS, "above 255")? as u8;
        let trace = TraceContext {
            trace_id: r.array("trace_id")?,
            span_id: r.array("span_id")?,
            flags: r.array::<1>("trace_flags")?[0],
        };
        let content_type = r.str("content_type", MAX_CONTENT_TYPE_BYTES)?;
        let caller = r.str("caller", MAX_IDENTITY_BYTES)?;
        let target_session = if r.is_empty() {
            0
        } else {
            r.varint("target_session")?
        };
        let on_behalf_of = if r.is_empty() {
            ""
        } else {
            r.str("on_behalf_of", MAX_IDENTITY_BYTES)?
        };
        let via = if r.is_empty() {
            ""
        } else {
            r.str("via", MAX_IDENTITY_BYTES)?
        };
        // Remaining bytes are extensions of a later revision: ignored.
        Ok(Self {
            capability,
            deadline_ms,
            hop_count,
            trace,
            content_type,
            caller,
            target_session,
            on_behalf_of,
            via,
        })
    }
}

impl<'a> ResponseHeader<'a> {
    /// A header with `status` and empty content type and message.
    pub fn new(status: Status) -> Self {
        Self {
            status,
            content_type: "",
            message: "",
        }
    }

    /// Appends the length-prefixed header block to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        check_len(
            "content_type",
            self.content_type.len(),
            MAX_CONTENT_TYPE_BYTES,
        )?;
        check_len("message", self.message.len(), MAX_MESSAGE_BYTES)?;
        let code = self.status.code();
        if code > varint::MAX {
            return Err(DecodeError::InvalidValue {
                what: "status",
                reason: "above 2^62-1",
            });
        }
        let block_len =
            varint::encoded_len(code) + str_len(self.content_type) + str_len(self.message);
        out.reserve(block_len + 2);
        varint::encode(block_len as u64, out);
        varint::encode(code, out);
        put_bytes(out, self.content_type.as_bytes());
        put_bytes(out, self.message.as_bytes());
        Ok(())
    }

    /// Decodes a length-prefixed response header from the start of `buf`; see
    /// [`RequestHeader::decode`].
    pub fn decode(buf: &'a [u8], limit: usize) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some((block, prefix)) = header_prefix(buf, limit)? else {
            return Ok(None);
        };
        let Some(block_bytes) = buf.get(prefix..prefix + block) else {
            return Ok(None);
        };
        let mut r = Reader::new(block_bytes);
        let status = Status::from_code(r.varint("status")?);
        let content_type = r.str("content_type", MAX_CONTENT_TYPE_BYTES)?;
        let message = r.str("message", MAX_MESSAGE_BYTES)?;
        Ok(Some((
            Self {
                status,
                content_type,
                message,
            },
            prefix + block,
        )))
    }
}

/// Reads only the length prefix of a header: `(block_len, prefix_len)`, or `Ok(None)` if more
/// bytes are needed. Lets a receiver know how many bytes to gather before decoding.
pub fn header_prefix(buf: &[u8], limit: usize) -> Result<Option<(usize, usize)>, DecodeError> {
    block_prefix(buf, "header", limit.min(MAX_HEADER_BYTES))
}

fn str_len(s: &str) -> usize {
    varint::encoded_len(s.len() as u64) + s.len()
}

fn check_len(what: &'static str, len: usize, limit: usize) -> Result<(), DecodeError> {
    if len > limit {
        return Err(DecodeError::TooLong {
            what,
            len: len as u64,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout_matches_the_spec_example() {
        // The worked example of docs/PROTOCOL.md, section "Request header".
        let header = RequestHeader {
            capability: "echo",
            deadline_ms: 1500,
            hop_count: 0,
            trace: TraceContext::default(),
            content_type: "text/plain",
            caller: "",
            target_session: 0,
            on_behalf_of: "",
            via: "",
        };
        let mut out = Vec::new();
        header.encode(&mut out).unwrap();
        let mut expected = vec![0x2d, 0x04, b'e', b'c', b'h', b'o', 0x45, 0xdc, 0x00];
        expected.extend_from_slice(&[0; 25]);
        expected.push(0x0a);
        expected.extend_from_slice(b"text/plain");
        expected.push(0x00);
        assert_eq!(out, expected);
        assert_eq!(out.len(), 1 + 0x2d);
        let (decoded, used) = RequestHeader::decode(&out, MAX_HEADER_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, header);
        assert_eq!(used, out.len());
    }

    #[test]
    fn response_layout_matches_the_spec_example() {
        let mut out = Vec::new();
        ResponseHeader {
            status: Status::NoRoute,
            content_type: "",
            message: "no agent offers capability",
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(&out[..4], &[0x1d, 0x01, 0x00, 0x1a]);
        assert_eq!(&out[4..], b"no agent offers capability");
    }

    #[test]
    fn partial_input_asks_for_more_and_extensions_are_skipped() {
        let mut out = Vec::new();
        RequestHeader::new("cap").encode(&mut out).unwrap();
        for cut in 0..out.len() {
            assert_eq!(
                RequestHeader::decode(&out[..cut], MAX_HEADER_BYTES).unwrap(),
                None
            );
        }
        // The optional trailing fields are absent at their defaults: headers of earlier
        // revisions.
        let (h, _) = RequestHeader::decode(&out, MAX_HEADER_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!((h.target_session, h.on_behalf_of, h.via), (0, "", ""));
        let len = |header: RequestHeader<'_>| {
            let mut v = Vec::new();
            header.encode(&mut v).unwrap();
            v.len()
        };
        let base = RequestHeader::new("cap");
        let with_target = RequestHeader {
            target_session: 5,
            ..base
        };
        assert_eq!(len(with_target), out.len() + 1);
        // A later field set: the earlier ones are written at their defaults.
        let with_via = RequestHeader { via: "v", ..base };
        assert_eq!(len(with_via), out.len() + 1 + 1 + 2);
        let mut targeted = Vec::new();
        let header = RequestHeader {
            target_session: 5,
            via: "spiffe://d/agent/bridge",
            ..base
        };
        header.encode(&mut targeted).unwrap();
        // Append two extension bytes inside the block: still decodes, extension ignored.
        let mut extended = vec![(targeted[0] + 2)];
        extended.extend_from_slice(&targeted[1..]);
        extended.extend_from_slice(&[0xff, 0xee]);
        extended.extend_from_slice(b"payload");
        let (h, used) = RequestHeader::decode(&extended, MAX_HEADER_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(h, header);
        assert_eq!(&extended[used..], b"payload");
    }

    #[test]
    fn malformed_headers_are_errors() {
        // Empty capability.
        let mut bad = vec![0x1d, 0x00];
        bad.extend_from_slice(&[0; 28]);
        assert!(matches!(
            RequestHeader::decode(&bad, MAX_HEADER_BYTES),
            Err(DecodeError::InvalidValue {
                what: "capability",
                ..
            })
        ));
        // Block longer than the limit.
        assert!(matches!(
            RequestHeader::decode(&[0x50, 0x00], 100),
            Err(DecodeError::TooLong { what: "header", .. })
        ));
        // Block ends inside the trace id.
        assert!(matches!(
            RequestHeader::decode(&[0x05, 0x01, b'x', 0x00, 0x00, 0xaa], MAX_HEADER_BYTES),
            Err(DecodeError::Truncated { what: "trace_id" })
        ));
        // Invalid UTF-8 capability.
        assert!(matches!(
            RequestHeader::decode(&[0x03, 0x02, 0xff, 0xfe], MAX_HEADER_BYTES),
            Err(DecodeError::InvalidUtf8 { what: "capability" })
        ));
    }

    fn arb_str(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[a-zA-Z0-9_./-]{{0,{max}}}")).unwrap()
    }

    proptest! {
        #[test]
        fn request_round_trip(
            capability in proptest::string::string_regex("[a-z_]{1,40}").unwrap(),
            deadline_ms in 0..=varint::MAX,
            hop_count: u8,
            trace_id: [u8; 16],
            span_id: [u8; 8],
            flags: u8,
            content_type in arb_str(64),
            caller in arb_str(200),
            target_session in prop_oneof![Just(0u64), 1..=varint::MAX],
            on_behalf_of in prop_oneof![Just(String::new()), arb_str(100)],
            via in prop_oneof![Just(String::new()), arb_str(100)],
        ) {
            let header = RequestHeader {
                capability: &capability,
                deadline_ms,
                hop_count,
                trace: TraceContext { trace_id, span_id, flags },
                content_type: &content_type,
                caller: &caller,
                target_session,
                on_behalf_of: &on_behalf_of,
                via: &via,
            };
            let mut out = Vec::new();
            header.encode(&mut out).unwrap();
            out.extend_from_slice(b"tail");
            let (decoded, used) = RequestHeader::decode(&out, MAX_HEADER_BYTES).unwrap().unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(&out[used..], b"tail");
        }

        #[test]
        fn response_round_trip(code in 0..=varint::MAX, content_type in arb_str(64), message in arb_str(300)) {
            let header = ResponseHeader { status: Status::from_code(code), content_type: &content_type, message: &message };
            let mut out = Vec::new();
            header.encode(&mut out).unwrap();
            let (decoded, used) = ResponseHeader::decode(&out, MAX_HEADER_BYTES).unwrap().unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(used, out.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), limit in 0..20_000usize) {
            if let Ok(Some((h, used))) = RequestHeader::decode(&bytes, limit) {
                prop_assert!(used <= bytes.len());
                prop_assert!(used <= limit.min(MAX_HEADER_BYTES) + 8);
                prop_assert!(!h.capability.is_empty());
            }
            if let Ok(Some((_, used))) = ResponseHeader::decode(&bytes, limit) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
