//! Frames of the agent control stream.
//!
//! The control stream is the first bidirectional stream an agent opens on a connection. It
//! carries a sequence of frames in each direction:
//!
//! ```text
//! frame = type (varint) | length (varint) | payload (length bytes)
//! ```
//!
//! A receiver skips frames of unknown type, and ignores payload bytes after the fields it knows
//! (extensions from later revisions). A frame longer than the receiver's limit is a connection
//! error (`FRAME_TOO_LARGE`). The frame layouts are in `docs/PROTOCOL.md`.

use crate::card::MAX_SKILLS;
use crate::codec::{block_prefix, put_bytes, Reader};
use crate::limits::{
    MAX_ADDRESS_BYTES, MAX_CAPABILITY_BYTES, MAX_CARD_BYTES, MAX_CONTROL_FRAME_BYTES,
    MAX_DISCOVERY_ENTRIES, MAX_DISCOVERY_STRING_BYTES, MAX_IDENTITY_BYTES, MAX_LANES,
    MAX_LIST_ITEMS, MAX_MESSAGE_BYTES, MAX_QUERY_BYTES,
};
use crate::{varint, DecodeError};

/// Frame type codes.
pub mod frame_type {
    /// Agent -> gateway: attach with an agent card.
    pub const ATTACH: u64 = 0x01;
    /// Gateway -> agent: the attach succeeded.
    pub const ATTACH_OK: u64 = 0x02;
    /// Gateway -> agent: the attach (or lane) was refused.
    pub const ATTACH_REFUSED: u64 = 0x03;
    /// Agent -> gateway: this connection is a lane of an attached session.
    pub const LANE: u64 = 0x04;
    /// Gateway -> agent: the lane is bound.
    pub const LANE_OK: u64 = 0x05;
    /// Agent -> gateway: replace the card (and so the capabilities) of this session.
    pub const UPDATE_CARD: u64 = 0x06;
    /// Gateway -> agent: outcome of an `UPDATE_CARD`.
    pub const UPDATE_RESULT: u64 = 0x07;
    /// Agent -> gateway: which capabilities can I invoke?
    pub const DISCOVER: u64 = 0x08;
    /// Gateway -> agent: answer to a `DISCOVER`.
    pub const DISCOVER_RESULT: u64 = 0x09;
    /// Agent -> gateway: stop routing to me; tell me when my in-flight requests are done.
    pub const DETACH: u64 = 0x0a;
    /// Gateway -> agent: no requests for this agent remain in flight.
    pub const DETACHED: u64 = 0x0b;
    /// Gateway -> agent: the gateway is shutting down.
    pub const DRAIN: u64 = 0x0c;
    /// Gateway -> agent: a new policy changed which capabilities of the card are routed.
    pub const CAPABILITIES_REFUSED: u64 = 0x0d;
}

/// Why an attach, a lane or a card update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The agent card is malformed or over a limit; the reason text names the field.
    BadCard,
    /// The request is not permitted now: a card update from a detaching agent, or (once the
    /// control plane pushes policy) an identity that may not attach or advertise a capability.
    NotPermitted,
    /// The gateway holds as many agents as it is configured for.
    GatewayFull,
    /// This connection already attached (or is already a lane).
    AlreadyAttached,
    /// The gateway is draining.
    Draining,
    /// A `LANE` named an unknown session or a wrong token, or an identity that is not the
    /// session's.
    UnknownSession,
    /// A code this implementation does not know.
    Unknown(u64),
}

impl Refusal {
    /// The wire value.
    pub fn code(self) -> u64 {
        match self {
            Self::BadCard => 1,
            Self::NotPermitted => 2,
            Self::GatewayFull => 3,
            Self::AlreadyAttached => 4,
            Self::Draining => 5,
            Self::UnknownSession => 6,
            Self::Unknown(code) => code,
        }
    }

    /// The refusal for a wire value.
    pub fn from_code(code: u64) -> Self {
        match code {
            1 => Self::BadCard,
            2 => Self::NotPermitted,
            3 => Self::GatewayFull,
            4 => Self::AlreadyAttached,
            5 => Self::Draining,
            6 => Self::UnknownSession,
            other => Self::Unknown(other),
        }
    }
}

/// A session identifier chosen by the gateway at attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// The secret that binds a lane connection to its session.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneToken(pub [u8; 16]);

impl std::fmt::Debug for LaneToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A bearer-like secret: never printed.
        f.write_str("LaneToken(..)")
    }
}

/// One entry of a discovery answer: a capability and what its providers say of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiscoveryEntry {
    /// The capability name.
    pub capability: String,
    /// The skill description of one provider.
    pub description: String,
    /// How many attached agents offer it.
    pub providers: u64,
    /// Skill tags.
    pub tags: Vec<String>,
    /// Accepted input media types.
    pub input_modes: Vec<String>,
    /// Produced output media types.
    pub output_modes: Vec<String>,
}

/// A control-stream frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    /// Attach this connection as a new agent session.
    Attach {
        /// Most requests the agent will serve at once through each gateway worker; 0 lets the
        /// gateway choose.
        max_concurrent: u64,
        /// The A2A agent card, as JSON.
        card: Vec<u8>,
    },
    /// The attach succeeded.
    AttachOk {
        /// The new session.
        session: SessionId,
        /// The secret a lane presents to join the session.
        lane_token: LaneToken,
        /// The index of the gateway worker serving this connection.
        worker: u64,
        /// One address per worker (index = worker); the agent opens a lane to each one other
        /// than `worker`. Empty when the gateway offers no lanes.
        lanes: Vec<String>,
        /// The concurrency limit the gateway applies per worker.
        max_concurrent: u64,
        /// Capabilities of the card the domain's policy does not let this agent advertise: the
        /// agent is attached without them. On the wire only when not empty (a trailing field
        /// older receivers ignore).
        refused: Vec<String>,
    },
    /// The attach, lane or update was refused; the gateway then closes the connection (for an
    /// attach or lane) with `ATTACH_REFUSED`.
    AttachRefused {
        /// Why.
        refusal: Refusal,
        /// Details for a human, naming the offending field where there is one.
        reason: String,
    },
    /// Bind this connection as a lane of `session`.
    Lane {
        /// The session from `ATTACH_OK`.
        session: SessionId,
        /// The token from `ATTACH_OK`.
        lane_token: LaneToken,
    },
    /// The lane is bound.
    LaneOk {
        /// The index of the worker serving this lane.
        worker: u64,
    },
    /// Replace the session's card.
    UpdateCard {
        /// The new A2A agent card, as JSON.
        card: Vec<u8>,
    },
    /// Outcome of `UPDATE_CARD`; `refusal` is `None` when accepted.
    UpdateResult {
        /// Why the update was refused, if it was.
        refusal: Option<Refusal>,
        /// Details for a human.
        reason: String,
    },
    /// Ask which capabilities are invocable.
    Discover {
        /// Chosen by the agent; echoed in the answer.
        query_id: u64,
        /// Only capabilities whose name starts with this (empty: all).
        prefix: String,
        /// Only capabilities with this tag (empty: any).
        tag: String,
        /// Sent by a bridge only: answer for this agent identity instead (what it may
        /// discover); empty: for the sender. Left out of the frame when empty.
        on_behalf_of: String,
    },
    /// Answer to `DISCOVER`.
    DiscoverResult {
        /// The query's id.
        query_id: u64,
        /// Whether entries were left out because of the size limit.
        truncated: bool,
        /// The matching capabilities.
        entries: Vec<DiscoveryEntry>,
    },
    /// Stop routing new requests to this agent.
    Detach,
    /// No requests for this agent remain in flight; the agent may close.
    Detached,
    /// The gateway is shutting down and will close within `grace_ms`.
    Drain {
        /// Milliseconds until the gateway closes the connection.
        grace_ms: u64,
    },
    /// A new policy of the domain changed which capabilities of the agent's card it may
    /// advertise: these (the complete list, possibly empty) are not routed to it any more; the
    /// others are.
    CapabilitiesRefused {
        /// The capabilities of the card not routed to the agent.
        refused: Vec<String>,
    },
    /// A frame of a type this implementation does not know; receivers ignore it.
    Unknown {
        /// Its type code.
        frame_type: u64,
    },
}

impl ControlFrame {
    /// Appends the encoded frame to `out`.
    ///
    /// Fails if a field exceeds its protocol limit, so nothing unreadable is ever sent.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let mut p = Vec::new();
        let ty = match self {
            Self::Attach {
                max_concurrent,
                card,
            } => {
                check("card", card.len(), MAX_CARD_BYTES)?;
                varint::encode((*max_concurrent).min(varint::MAX), &mut p);
                put_bytes(&mut p, card);
                frame_type::ATTACH
            }
            Self::AttachOk {
                session,
                lane_token,
                worker,
                lanes,
                max_concurrent,
                refused,
            } => {
                check("lanes", lanes.len(), MAX_LANES)?;
                check("refused", refused.len(), MAX_SKILLS)?;
                p.extend_from_slice(&session.0.to_be_bytes());
                p.extend_from_slice(&lane_token.0);
                varint::encode(*worker, &mut p);
                varint::encode(lanes.len() as u64, &mut p);
                for lane in lanes {
                    check("lane address", lane.len(), MAX_ADDRESS_BYTES)?;
                    put_bytes(&mut p, lane.as_bytes());
                }
                varint::encode(*max_concurrent, &mut p);
                if !refused.is_empty() {
                    varint::encode(refused.len() as u64, &mut p);
                    for capability in refused {
                        check("refused capability", capability.len(), MAX_CAPABILITY_BYTES)?;
                        put_bytes(&mut p, capability.as_bytes());
                    }
                }
                frame_type::ATTACH_OK
            }
            Self::AttachRefused { refusal, reason } => {
                check("reason", reason.len(), MAX_MESSAGE_BYTES)?;
                varint::encode(refusal.code(), &mut p);
                put_bytes(&mut p, reason.as_bytes());
                frame_type::ATTACH_REFUSED
            }
            Self::Lane {
                session,
                lane_token,
            } => {
                p.extend_from_slice(&session.0.to_be_bytes());
                p.extend_from_slice(&lane_token.0);
                frame_type::LANE
            }
            Self::LaneOk { worker } => {
                varint::encode(*worker, &mut p);
                frame_type::LANE_OK
            }
            Self::UpdateCard { card } => {
                check("card", card.len(), MAX_CARD_BYTES)?;
                put_bytes(&mut p, card);
                frame_type::UPDATE_CARD
            }
            Self::UpdateResult { refusal, reason } => {
                check("reason", reason.len(), MAX_MESSAGE_BYTES)?;
                varint::encode(refusal.map_or(0, Refusal::code), &mut p);
                put_bytes(&mut p, reason.as_bytes());
                frame_type::UPDATE_RESULT
            }
            Self::Discover {
                query_id,
                prefix,
                tag,
                on_behalf_of,
            } => {
                check("prefix", prefix.len(), MAX_QUERY_BYTES)?;
                check("tag", tag.len(), MAX_QUERY_BYTES)?;
                check("on_behalf_of", on_behalf_of.len(), MAX_IDENTITY_BYTES)?;
                varint::encode(*query_id, &mut p);
                put_bytes(&mut p, prefix.as_bytes());
                put_bytes(&mut p, tag.as_bytes());
                if !on_behalf_of.is_empty() {
                    put_bytes(&mut p, on_behalf_of.as_bytes());
                }
                frame_type::DISCOVER
            }
            Self::DiscoverResult {
                query_id,
                truncated,
                entries,
            } => {
                check("entries", entries.len(), MAX_DISCOVERY_ENTRIES)?;
                varint::encode(*query_id, &mut p);
                p.push(u8::from(*truncated));
                varint::encode(entries.len() as u64, &mut p);
                for e in entries {
                    check("capability", e.capability.len(), MAX_CAPABILITY_BYTES)?;
                    check(
                        "description",
                        e.description.len(),
                        MAX_DISCOVERY_STRING_BYTES,
                    )?;
                    put_bytes(&mut p, e.capability.as_bytes());
                    put_bytes(&mut p, e.description.as_bytes());
                    varint::encode(e.providers, &mut p);
                    for list in [&e.tags, &e.input_modes, &e.output_modes] {
                        check("list", list.len(), MAX_LIST_ITEMS)?;
                        varint::encode(list.len() as u64, &mut p);
                        for item in list {
                            check("list item", item.len(), MAX_DISCOVERY_STRING_BYTES)?;
                            put_bytes(&mut p, item.as_bytes());
                        }
                    }
                }
                frame_type::DISCOVER_RESULT
            }
            Self::Detach => frame_type::DETACH,
            Self::Detached => frame_type::DETACHED,
            Self::Drain { grace_ms } => {
                varint::encode((*grace_ms).min(varint::MAX), &mut p);
                frame_type::DRAIN
            }
            Self::CapabilitiesRefused { refused } => {
                check("refused", refused.len(), MAX_SKILLS)?;
                varint::encode(refused.len() as u64, &mut p);
                for capability in refused {
                    check("refused capability", capability.len(), MAX_CAPABILITY_BYTES)?;
                    put_bytes(&mut p, capability.as_bytes());
                }
                frame_type::CAPABILITIES_REFUSED
            }
            Self::Unknown { frame_type } => (*frame_type).min(varint::MAX),
        };
        check("frame", p.len(), MAX_CONTROL_FRAME_BYTES)?;
        varint::encode(ty, out);
        put_bytes(out, &p);
        Ok(())
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes one frame from the start of `buf`.
    ///
    /// Returns the frame and the bytes it took, or `Ok(None)` when `buf` does not hold a whole
    /// frame yet. A payload longer than `limit` (capped at [`MAX_CONTROL_FRAME_BYTES`]) is
    /// [`DecodeError::TooLong`] as soon as its length prefix has arrived, so a receiver never
    /// buffers more than `limit` bytes of one frame.
    pub fn decode(buf: &[u8], limit: usize) -> Result<Option<(Self, usize)>, DecodeError> {
        let Some((ty, ty_len)) = varint::decode(buf)? else {
            return Ok(None);
        };
        let Some((len, len_len)) =
            block_prefix(&buf[ty_len..], "frame", limit.min(MAX_CONTROL_FRAME_BYTES))?
        else {
            return Ok(None);
        };
        let start = ty_len + len_len;
        let Some(payload) = buf.get(start..start + len) else {
            return Ok(None);
        };
        let frame = Self::decode_payload(ty, payload)?;
        Ok(Some((frame, start + len)))
    }

    fn decode_payload(ty: u64, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let frame = match ty {
            frame_type::ATTACH => Self::Attach {
                max_concurrent: r.varint("max_concurrent")?,
                card: r.bytes("card", MAX_CARD_BYTES)?.to_vec(),
            },
            frame_type::ATTACH_OK => {
                let session = SessionId(u64::from_be_bytes(r.array("session")?));
                let lane_token = LaneToken(r.array("lane_token")?);
                let worker = r.varint("worker")?;
                let count = r.count("lanes", MAX_LANES)?;
                // Grow with what actually arrives, never preallocate what a peer announces.
                let mut lanes = Vec::with_capacity(count.min(16));
                for _ in 0..count {
                    lanes.push(r.str("lane address", MAX_ADDRESS_BYTES)?.to_owned());
                }
                let max_concurrent = r.varint("max_concurrent")?;
                let mut refused = Vec::new();
                if !r.is_empty() {
                    let count = r.count("refused", MAX_SKILLS)?;
                    for _ in 0..count {
                        let capability = r.str("refused capability", MAX_CAPABILITY_BYTES)?;
                        refused.push(capability.to_owned());
                    }
                }
                Self::AttachOk {
                    session,
                    lane_token,
                    worker,
                    lanes,
                    max_concurrent,
                    refused,
                }
            }
            frame_type::ATTACH_REFUSED => Self::AttachRefused {
                refusal: Refusal::from_code(r.varint("refusal")?),
                reason: r.str("reason", MAX_MESSAGE_BYTES)?.to_owned(),
            },
            frame_type::LANE => Self::Lane {
                session: SessionId(u64::from_be_bytes(r.array("session")?)),
                lane_token: LaneToken(r.array("lane_token")?),
            },
            frame_type::LANE_OK => Self::LaneOk {
                worker: r.varint("worker")?,
            },
            frame_type::UPDATE_CARD => Self::UpdateCard {
                card: r.bytes("card", MAX_CARD_BYTES)?.to_vec(),
            },
            frame_type::UPDATE_RESULT => {
                let code = r.varint("refusal")?;
                Self::UpdateResult {
                    refusal: (code != 0).then(|| Refusal::from_code(code)),
                    reason: r.str("reason", MAX_MESSAGE_BYTES)?.to_owned(),
                }
            }
            frame_type::DISCOVER => Self::Discover {
                query_id: r.varint("query_id")?,
                prefix: r.str("prefix", MAX_QUERY_BYTES)?.to_owned(),
                tag: r.str("tag", MAX_QUERY_BYTES)?.to_owned(),
                on_behalf_of: if r.is_empty() {
                    String::new()
                } else {
                    r.str("on_behalf_of", MAX_IDENTITY_BYTES)?.to_owned()
                },
            },
            frame_type::DISCOVER_RESULT => {
                let query_id = r.varint("query_id")?;
                let truncated = match r.array::<1>("truncated")?[0] {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(DecodeError::InvalidValue {
                            what: "truncated",
                            reason: "not 0 or 1",
                        })
                    }
                };
                let count = r.count("entries", MAX_DISCOVERY_ENTRIES)?;
                let mut entries = Vec::with_capacity(count.min(16));
                for _ in 0..count {
                    let capability = r.str("capability", MAX_CAPABILITY_BYTES)?.to_owned();
                    let description = r.str("description", MAX_DISCOVERY_STRING_BYTES)?.to_owned();
                    let providers = r.varint("providers")?;
                    let mut lists: [Vec<String>; 3] = Default::default();
                    for list in &mut lists {
                        let n = r.count("list", MAX_LIST_ITEMS)?;
                        for _ in 0..n {
                            list.push(r.str("list item", MAX_DISCOVERY_STRING_BYTES)?.to_owned());
                        }
                    }
                    let [tags, input_modes, output_modes] = lists;
                    entries.push(DiscoveryEntry {
                        capability,
                        description,
                        providers,
                        tags,
                        input_modes,
                        output_modes,
                    });
                }
                Self::DiscoverResult {
                    query_id,
                    truncated,
                    entries,
                }
            }
            frame_type::DETACH => Self::Detach,
            frame_type::DETACHED => Self::Detached,
            frame_type::DRAIN => Self::Drain {
                grace_ms: r.varint("grace_ms")?,
            },
            frame_type::CAPABILITIES_REFUSED => {
                let count = r.count("refused", MAX_SKILLS)?;
                let mut refused = Vec::new();
                for _ in 0..count {
                    refused.push(
                        r.str("refused capability", MAX_CAPABILITY_BYTES)?
                            .to_owned(),
                    );
                }
                Self::CapabilitiesRefused { refused }
            }
            other => Self::Unknown { frame_type: other },
        };
        // Bytes left in `r` are extensions: ignored.
        let _ = r.is_empty();
        Ok(frame)
    }
}

fn check(what: &'static str, len: usize, limit: usize) -> Result<(), DecodeError> {
    if len > limit {
        return Err(DecodeError::TooLong {
            what,
            len: len as u64,
            limit,
        });
    }
    Ok(())
}

/// Reassembles control frames from a byte stream that arrives in arbitrary pieces.
///
/// Holds at most one frame's worth of bytes (bounded by the limit given to [`FrameBuffer::new`]).
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    limit: usize,
}

impl FrameBuffer {
    /// A buffer for frames whose payload is at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit: limit.min(MAX_CONTROL_FRAME_BYTES),
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<ControlFrame>, DecodeError> {
        match ControlFrame::decode(&self.buf, self.limit)? {
            Some((frame, used)) => {
                self.buf.drain(..used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<ControlFrame> {
        vec![
            ControlFrame::Attach {
                max_concurrent: 64,
                card: br#"{"name":"a","skills":[{"id":"x","name":"x"}]}"#.to_vec(),
            },
            ControlFrame::AttachOk {
                session: SessionId(0x0102_0304_0506_0708),
                lane_token: LaneToken([7; 16]),
                worker: 1,
                lanes: vec!["127.0.0.1:4434".into(), "127.0.0.1:4435".into()],
                max_concurrent: 256,
                refused: Vec::new(),
            },
            ControlFrame::AttachOk {
                session: SessionId(3),
                lane_token: LaneToken([9; 16]),
                worker: 0,
                lanes: Vec::new(),
                max_concurrent: 8,
                refused: vec!["billing.refund".into(), "secret".into()],
            },
            ControlFrame::CapabilitiesRefused {
                refused: vec!["secret".into()],
            },
            ControlFrame::CapabilitiesRefused {
                refused: Vec::new(),
            },
            ControlFrame::AttachRefused {
                refusal: Refusal::BadCard,
                reason: "skills[0].id: missing".into(),
            },
            ControlFrame::Lane {
                session: SessionId(9),
                lane_token: LaneToken([1; 16]),
            },
            ControlFrame::LaneOk { worker: 3 },
            ControlFrame::UpdateCard {
                card: b"{}".to_vec(),
            },
            ControlFrame::UpdateResult {
                refusal: None,
                reason: String::new(),
            },
            ControlFrame::UpdateResult {
                refusal: Some(Refusal::NotPermitted),
                reason: "no".into(),
            },
            ControlFrame::Discover {
                query_id: 5,
                prefix: "cur".into(),
                tag: String::new(),
                on_behalf_of: String::new(),
            },
            ControlFrame::Discover {
                query_id: 6,
                prefix: String::new(),
                tag: "t".into(),
                on_behalf_of: "spiffe://d/agent/alice".into(),
            },
            ControlFrame::DiscoverResult {
                query_id: 5,
                truncated: true,
                entries: vec![DiscoveryEntry {
                    capability: "currency_conversion".into(),
                    description: "Helps".into(),
                    providers: 2,
                    tags: vec!["currency".into()],
                    input_modes: vec!["text/plain".into()],
                    output_modes: vec![],
                }],
            },
            ControlFrame::Detach,
            ControlFrame::Detached,
            ControlFrame::Drain { grace_ms: 5000 },
        ]
    }

    #[test]
    fn every_frame_round_trips_through_a_byte_at_a_time_buffer() {
        let mut wire = Vec::new();
        for f in samples() {
            f.encode(&mut wire).unwrap();
        }
        let mut fb = FrameBuffer::new(MAX_CONTROL_FRAME_BYTES);
        let mut got = Vec::new();
        for b in wire {
            fb.extend(&[b]);
            while let Some(f) = fb.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, samples());
        assert_eq!(fb.pending(), 0);
    }

    #[test]
    fn detach_layout_matches_the_spec() {
        assert_eq!(ControlFrame::Detach.to_bytes().unwrap(), [0x0a, 0x00]);
        assert_eq!(
            ControlFrame::LaneOk { worker: 1 }.to_bytes().unwrap(),
            [0x05, 0x01, 0x01]
        );
    }

    #[test]
    fn unknown_frames_and_extensions_are_skipped() {
        let wire = [0x3f, 0x02, 0xaa, 0xbb, 0x05, 0x02, 0x01, 0xff];
        let (f, used) = ControlFrame::decode(&wire, 1024).unwrap().unwrap();
        assert_eq!(f, ControlFrame::Unknown { frame_type: 0x3f });
        let (f, _) = ControlFrame::decode(&wire[used..], 1024).unwrap().unwrap();
        assert_eq!(f, ControlFrame::LaneOk { worker: 1 });
    }

    #[test]
    fn oversized_frame_is_refused_before_its_payload_arrives() {
        // ATTACH announcing a 100 000-byte payload, limit 65 536.
        let wire = [0x01, 0x80, 0x01, 0x86, 0xa0];
        assert!(matches!(
            ControlFrame::decode(&wire, 65_536),
            Err(DecodeError::TooLong { what: "frame", .. })
        ));
    }

    /// A card frame of `card_len` bytes, built by hand (the encoder refuses oversize cards).
    fn card_frame(ty: u64, max_concurrent: Option<u64>, card_len: usize) -> Vec<u8> {
        let mut payload = Vec::new();
        if let Some(n) = max_concurrent {
            varint::encode(n, &mut payload);
        }
        varint::encode(card_len as u64, &mut payload);
        payload.resize(payload.len() + card_len, b' ');
        let mut wire = Vec::new();
        varint::encode(ty, &mut wire);
        varint::encode(payload.len() as u64, &mut wire);
        wire.extend_from_slice(&payload);
        wire
    }

    /// What a gateway whose `limits.max_card_bytes` is `max_card` makes of a card frame: `Ok`
    /// (the card goes on to the size check and validation, `BAD_CARD` if over `max_card`), or
    /// the decode error (`frame`: `FRAME_TOO_LARGE`; anything else: `PROTOCOL_VIOLATION`).
    fn gateway_reads(max_card: usize, wire: &[u8]) -> Result<(), &'static str> {
        let mut fb = FrameBuffer::new(max_card + 1024);
        fb.extend(wire);
        match fb.next_frame() {
            Ok(Some(ControlFrame::Attach { .. } | ControlFrame::UpdateCard { .. })) => Ok(()),
            Err(DecodeError::TooLong { what, .. }) => Err(what),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversize_card_outcomes_match_the_spec() {
        // docs/PROTOCOL.md section 5.4 (card size): default limits.max_card_bytes = 65536.
        let update = |len| card_frame(frame_type::UPDATE_CARD, None, len);
        let attach = |len| card_frame(frame_type::ATTACH, Some(100), len);
        assert_eq!(gateway_reads(65_536, &update(65_536)), Ok(()));
        assert_eq!(gateway_reads(65_536, &update(65_537)), Err("card"));
        assert_eq!(gateway_reads(65_536, &update(66_556)), Err("card"));
        assert_eq!(gateway_reads(65_536, &update(66_557)), Err("frame"));
        assert_eq!(gateway_reads(65_536, &attach(66_554)), Err("card"));
        assert_eq!(gateway_reads(65_536, &attach(66_555)), Err("frame"));
        // limits.max_card_bytes = 4096: frame limit 5120.
        assert_eq!(gateway_reads(4_096, &update(5_118)), Ok(()));
        assert_eq!(gateway_reads(4_096, &update(5_119)), Err("frame"));
        assert_eq!(gateway_reads(4_096, &attach(5_116)), Ok(()));
        assert_eq!(gateway_reads(4_096, &attach(5_117)), Err("frame"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut fb = FrameBuffer::new(512);
            fb.extend(&bytes);
            for _ in 0..bytes.len() + 1 {
                match fb.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn discover_round_trip(
            query_id in 0..=varint::MAX,
            prefix in "[a-z]{0,20}",
            tag in "[a-z ]{0,20}",
            on_behalf_of in "[a-z:/]{0,30}",
        ) {
            let f = ControlFrame::Discover { query_id, prefix, tag, on_behalf_of };
            let bytes = f.to_bytes().unwrap();
            prop_assert_eq!(ControlFrame::decode(&bytes, 1024).unwrap(), Some((f, bytes.len())));
        }
    }
}
