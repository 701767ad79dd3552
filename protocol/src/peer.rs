//! `dmsc-peer/1`: the trunk between two gateways of a domain.
//!
//! A trunk is a QUIC connection with ALPN `dmsc-peer/1`, mutual TLS with gateway identities
//! (`spiffe://<domain>/gateway/<id>`) on both sides. The forwarding gateway opens one
//! bidirectional stream per request and writes a [`PeerHeader`] block, then the request
//! payload up to FIN; the receiving gateway answers exactly as on `dmsc/1`: a response header
//! block, then the response payload up to FIN.
//!
//! ```text
//! peer header block: visited_count (varint) | visited (str) * visited_count
//!                    | request header fields (as in a dmsc/1 request header block)
//! ```
//!
//! The block is length-prefixed like every header (`docs/TRUNK.md` section 4). `visited` lists,
//! in order, the ids of the gateways that forwarded the request so far, the ingress gateway
//! first; the embedded request carries the caller stamped by the ingress gateway, the deadline
//! left and the hop count. Decoding borrows from the input and allocates nothing.

use crate::codec::{block_prefix, put_bytes, Reader};
use crate::header::{header_prefix, RequestHeader};
use crate::limits::MAX_HEADER_BYTES;
use crate::{varint, DecodeError};

/// Most gateways a `visited` list may name; a request that would need more ends with
/// `LOOP_DETECTED`.
pub const MAX_VISITED: usize = 16;
/// Longest gateway id in a `visited` list, bytes.
pub const MAX_GATEWAY_ID_BYTES: usize = 255;

/// The header that opens every trunk stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerHeader<'a> {
    /// Gateways the request went through, ingress first; `len` of them are valid.
    visited: [&'a str; MAX_VISITED],
    len: usize,
    /// The request as forwarded: caller stamped, deadline left, hop count.
    pub request: RequestHeader<'a>,
}

impl<'a> PeerHeader<'a> {
    /// A header forwarding `request`, having visited `visited` (ingress first). `None` when
    /// `visited` names more than [`MAX_VISITED`] gateways.
    pub fn new(request: RequestHeader<'a>, visited: &[&'a str]) -> Option<Self> {
        if visited.len() > MAX_VISITED {
            return None;
        }
        let mut list = [""; MAX_VISITED];
        list[..visited.len()].copy_from_slice(visited);
        Some(Self {
            visited: list,
            len: visited.len(),
            request,
        })
    }

    /// The gateways visited so far, ingress first.
    pub fn visited(&self) -> &[&'a str] {
        &self.visited[..self.len]
    }

    /// Whether gateway `id` already forwarded this request.
    pub fn has_visited(&self, id: &str) -> bool {
        self.visited().contains(&id)
    }

    /// Appends the length-prefixed block to `out`; `scratch` is working space. Fails if a
    /// field exceeds its limit or the block would exceed [`MAX_HEADER_BYTES`].
    pub fn encode(&self, scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        scratch.clear();
        self.request.encode(scratch)?;
        let Some((fields_len, prefix)) = header_prefix(scratch, MAX_HEADER_BYTES)? else {
            return Err(DecodeError::Truncated { what: "header" });
        };
        let mut visited_len = varint::encoded_len(self.len as u64);
        for id in self.visited() {
            if id.len() > MAX_GATEWAY_ID_BYTES || id.is_empty() {
                return Err(DecodeError::InvalidValue {
                    what: "visited",
                    reason: "gateway id empty or over 255 bytes",
                });
            }
            visited_len += varint::encoded_len(id.len() as u64) + id.len();
        }
        let block = visited_len + fields_len;
        if block > MAX_HEADER_BYTES {
            return Err(DecodeError::TooLong {
                what: "header",
                len: block as u64,
                limit: MAX_HEADER_BYTES,
            });
        }
        out.reserve(block + 2);
        varint::encode(block as u64, out);
        varint::encode(self.len as u64, out);
        for id in self.visited() {
            put_bytes(out, id.as_bytes());
        }
        out.extend_from_slice(&scratch[prefix..prefix + fields_len]);
        Ok(())
    }

    /// Decodes a length-prefixed peer header from the start of `buf`: the header and the
    /// bytes it took, or `Ok(None)` if `buf` does not yet hold all of it. `limit` caps the
    /// block (at most [`MAX_HEADER_BYTES`] applies whatever is passed).
    pub fn decode(buf: &'a [u8], limit: usize) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some((block, prefix)) = block_prefix(buf, "header", limit.min(MAX_HEADER_BYTES))?
        else {
            return Ok(None);
        };
        let Some(bytes) = buf.get(prefix..prefix + block) else {
            return Ok(None);
        };
        let mut r = Reader::new(bytes);
        let len = r.count("visited", MAX_VISITED)?;
        if len == 0 {
            return Err(DecodeError::InvalidValue {
                what: "visited",
                reason: "empty: the forwarding gateway lists itself",
            });
        }
        let mut visited = [""; MAX_VISITED];
        for slot in visited.iter_mut().take(len) {
            let id = r.str("visited gateway id", MAX_GATEWAY_ID_BYTES)?;
            if id.is_empty() {
                return Err(DecodeError::InvalidValue {
                    what: "visited gateway id",
                    reason: "empty",
                });
            }
            *slot = id;
        }
        let request = RequestHeader::decode_fields(r.rest())?;
        Ok(Some((
            Self {
                visited,
                len,
                request,
            },
            prefix + block,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_keeps_the_visited_list_and_the_request() {
        let request = RequestHeader {
            caller: "spiffe://d/agent/a",
            deadline_ms: 900,
            hop_count: 1,
            ..RequestHeader::new("echo")
        };
        let h = PeerHeader::new(request, &["gw1", "gw2"]).unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        h.encode(&mut scratch, &mut out).unwrap();
        out.extend_from_slice(b"payload");
        let (back, used) = PeerHeader::decode(&out, MAX_HEADER_BYTES).unwrap().unwrap();
        assert_eq!(back, h);
        assert_eq!(&out[used..], b"payload");
        assert!(back.has_visited("gw2") && !back.has_visited("gw3"));
        // A prefix of the block asks for more.
        assert_eq!(
            PeerHeader::decode(&out[..used - 1], MAX_HEADER_BYTES),
            Ok(None)
        );
    }

    #[test]
    fn the_documented_example_decodes() {
        // docs/TRUNK.md section 4.1: gw1 forwards `echo` from spiffe://d/agent/a, 1200 ms left,
        // hop count 1, no trace context, no content type.
        let mut bytes = vec![0x01, 0x03, b'g', b'w', b'1', 0x04, b'e', b'c', b'h', b'o'];
        bytes.extend_from_slice(&[0x44, 0xb0, 0x01]);
        bytes.extend_from_slice(&[0; 25]);
        bytes.push(0x00);
        bytes.push(18);
        bytes.extend_from_slice(b"spiffe://d/agent/a");
        assert_eq!(bytes.len(), 0x3a);
        let mut full = vec![0x3a];
        full.extend_from_slice(&bytes);
        let (h, used) = PeerHeader::decode(&full, MAX_HEADER_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(used, full.len());
        assert_eq!(h.visited(), &["gw1"]);
        assert_eq!(h.request.capability, "echo");
        assert_eq!(h.request.deadline_ms, 1200);
        assert_eq!(h.request.hop_count, 1);
        assert_eq!(h.request.caller, "spiffe://d/agent/a");
        let (mut scratch, mut again) = (Vec::new(), Vec::new());
        h.encode(&mut scratch, &mut again).unwrap();
        assert_eq!(again, full);
    }

    #[test]
    fn too_many_or_empty_gateways_are_refused() {
        assert!(PeerHeader::new(RequestHeader::new("x"), &["g"; MAX_VISITED + 1]).is_none());
        let mut bad = vec![0x03, 0x01, 0x00, 0x00];
        bad[0] = 3;
        assert!(PeerHeader::decode(&bad, MAX_HEADER_BYTES).is_err());
        // No gateway visited: the sender did not list itself.
        assert!(PeerHeader::decode(&[0x02, 0x00, 0x00], MAX_HEADER_BYTES).is_err());
        let over = [0x02, 0x11, 0x00];
        assert!(matches!(
            PeerHeader::decode(&over, MAX_HEADER_BYTES),
            Err(DecodeError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = PeerHeader::decode(&bytes, MAX_HEADER_BYTES);
        }
    }
}
