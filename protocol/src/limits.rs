//! Length limits of the DMSC protocol.
//!
//! These are the protocol's hard ceilings: a receiver rejects anything longer whatever its own
//! configuration says. A gateway may be configured with lower limits (for example
//! `max_header_bytes`); `docs/PROTOCOL.md` lists both.

/// Largest request or response header block, not counting its length prefix.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest capability name, in bytes of UTF-8.
pub const MAX_CAPABILITY_BYTES: usize = 255;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Longest caller identity (a SPIFFE ID URI) stamped by a gateway, in bytes.
pub const MAX_IDENTITY_BYTES: usize = 2048;
/// Longest diagnostic message in a response header or a refusal, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Largest control-stream frame payload.
pub const MAX_CONTROL_FRAME_BYTES: usize = 256 * 1024;
/// Largest agent card carried in an `ATTACH` or `UPDATE_CARD` frame.
pub const MAX_CARD_BYTES: usize = crate::card::MAX_CARD_BYTES;
/// Most lane addresses in an `ATTACH_OK` frame.
pub const MAX_LANES: usize = 256;
/// Longest lane address (`host:port` text), in bytes.
pub const MAX_ADDRESS_BYTES: usize = 64;
/// Longest query string (prefix or tag) in a `DISCOVER` frame, in bytes.
pub const MAX_QUERY_BYTES: usize = 255;
/// Most entries in one `DISCOVER_RESULT` frame.
pub const MAX_DISCOVERY_ENTRIES: usize = 1024;
/// Most tags, input modes or output modes per discovery entry.
pub const MAX_LIST_ITEMS: usize = 32;
/// Longest tag, mode or description string in a discovery entry, in bytes.
pub const MAX_DISCOVERY_STRING_BYTES: usize = 1024;
/// Largest hop count a request may carry.
pub const MAX_HOPS: u64 = 255;
