//! `dmsc-ctl/1`: the session between a gateway and its control plane.
//!
//! The gateway opens one bidirectional QUIC stream on a connection with ALPN `dmsc-ctl/1` and
//! both sides exchange frames on it:
//!
//! ```text
//! frame = type (varint) | length (varint) | payload (length bytes)
//! ```
//!
//! The gateway says which table it holds (`HELLO`), the control plane pushes a full table or a
//! delta of whole sections (`PUSH`), and the gateway answers every push with `ACK` once all its
//! workers hold the result, or `NACK` with the reasons. `STATUS` reports the gateway's agents.
//! The normative text, with every rule on ordering and limits, is `docs/CONTROL.md` section 6.

use crate::codec::{block_prefix, put_bytes, Reader};
use crate::table::sections::{SectionRef, SectionVersion};
use crate::table::{Generation, MAX_EXTENSION_SECTIONS, MAX_TABLE_BYTES};
use crate::{varint, DecodeError};

/// The protocol version a `HELLO` carries.
pub const VERSION: u64 = 1;

/// Largest payload of a `PUSH` frame: a whole table plus its framing.
pub const MAX_PUSH_BYTES: usize = MAX_TABLE_BYTES + 64 * 1024;
/// Largest payload of any other frame.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Most sections a `HELLO` or a delta may name (the known ones plus extensions).
pub const MAX_SECTIONS: usize = 16 + MAX_EXTENSION_SECTIONS;
/// Most rejections one `NACK` carries.
pub const MAX_REJECTIONS: usize = 64;
/// Longest rejection reason, bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most agent identities one `STATUS` lists (the count says how many there are in all).
pub const MAX_STATUS_AGENTS: usize = 256;
/// Most bytes of identities one `STATUS` carries (each counted with 2 bytes of length), so the
/// frame stays well inside [`MAX_FRAME_BYTES`] whatever the identities' lengths.
pub const MAX_STATUS_IDENTITY_BYTES: usize = 32 * 1024;
/// Longest gateway id or domain, bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest agent identity in a `STATUS`, bytes.
pub const MAX_IDENTITY_BYTES: usize = 2048;
/// Both sides send a QUIC PING at least this often (`docs/CONTROL.md` 6.6).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);
/// The QUIC idle timeout both sides use.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Time a gateway has after the handshake to open its stream and send `HELLO`.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// A gateway's first reconnect delay (before jitter); it doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// A gateway's longest reconnect delay (before jitter).
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);
/// Time a gateway's workers get to take a pushed table before it answers `INSTALL_FAILED`.
pub const INSTALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Frame types from here up are extensions: a receiver that does not know one skips it.
pub const FIRST_EXTENSION_TYPE: u64 = 0x20;

/// Frame type codes.
pub mod frame_type {
    /// Gateway -> control plane, first frame: who I am and what I hold.
    pub const HELLO: u64 = 0x01;
    /// Control plane -> gateway: a table generation, whole or as a delta.
    pub const PUSH: u64 = 0x02;
    /// Gateway -> control plane: every worker holds the pushed generation.
    pub const ACK: u64 = 0x03;
    /// Gateway -> control plane: the push was not applied; reasons.
    pub const NACK: u64 = 0x04;
    /// Gateway -> control plane: the gateway's attached agents.
    pub const STATUS: u64 = 0x05;
    /// Gateway -> control plane: attachments, whole or as changes (`docs/CONTROL.md` 7.1).
    pub const REPORT: u64 = 0x06;
    /// Control plane -> gateway: the domain's capabilities and where they are (7.2).
    pub const ROUTES: u64 = 0x07;
    /// Gateway -> control plane: routes held, trunk figures (7.3).
    pub const TRUNKS: u64 = 0x08;
    /// Control plane -> gateway: a report, or one agent of it, was refused (7.4).
    pub const REPORT_REJECTED: u64 = 0x09;
}

/// QUIC application error codes a side closes a `dmsc-ctl/1` connection with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close.
    NoError = 0x0,
    /// A frame could not be decoded, or has an unknown type below 0x20.
    ProtocolViolation = 0x1,
    /// A frame is longer than its limit.
    FrameTooLarge = 0x2,
    /// A frame arrived when it may not: a second `HELLO`, a `PUSH` before `HELLO` was
    /// answered or while another is unacknowledged, an `ACK` or `NACK` for no pending push.
    UnexpectedFrame = 0x3,
    /// The gateway is not listed in the domain configuration.
    NotListed = 0x4,
    /// The sender is shutting down; reconnect later.
    ShuttingDown = 0x5,
    /// The `HELLO` version is not supported.
    UnsupportedVersion = 0x6,
    /// The `HELLO` names another trust domain than the control plane's.
    WrongDomain = 0x7,
    /// The `HELLO` gateway id is not the one in the gateway's certificate.
    IdentityMismatch = 0x8,
    /// No frame arrived when one was due (the `HELLO` within its timeout).
    Timeout = 0x9,
}

impl CloseCode {
    /// The code as sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, if known.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0x0 => Self::NoError,
            0x1 => Self::ProtocolViolation,
            0x2 => Self::FrameTooLarge,
            0x3 => Self::UnexpectedFrame,
            0x4 => Self::NotListed,
            0x5 => Self::ShuttingDown,
            0x6 => Self::UnsupportedVersion,
            0x7 => Self::WrongDomain,
            0x8 => Self::IdentityMismatch,
            0x9 => Self::Timeout,
            _ => return None,
        })
    }

    /// A short lowercase name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoError => "no_error",
            Self::ProtocolViolation => "protocol_violation",
            Self::FrameTooLarge => "frame_too_large",
            Self::UnexpectedFrame => "unexpected_frame",
            Self::NotListed => "not_listed",
            Self::ShuttingDown => "shutting_down",
            Self::UnsupportedVersion => "unsupported_version",
            Self::WrongDomain => "wrong_domain",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Timeout => "timeout",
        }
    }
}

/// Why a gateway did not apply a push (the `code` of a `NACK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackCode {
    /// A delta against a generation the gateway does not hold. The control plane answers with
    /// a full snapshot.
    BaseMismatch,
    /// The table (or a section of the merged table) failed decoding or validation.
    Invalid,
    /// The table is for another trust domain.
    WrongDomain,
    /// The table applied is not the generation the push announced.
    GenerationMismatch,
    /// The workers did not all take the table in time; the gateway keeps its last good table.
    InstallFailed,
}

impl NackCode {
    /// The code as sent on the wire.
    pub fn code(self) -> u64 {
        match self {
            Self::BaseMismatch => 1,
            Self::Invalid => 2,
            Self::WrongDomain => 3,
            Self::GenerationMismatch => 4,
            Self::InstallFailed => 5,
        }
    }

    /// The code for a wire value; `None` for an unknown one (the frame is then a protocol
    /// violation).
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::BaseMismatch,
            2 => Self::Invalid,
            3 => Self::WrongDomain,
            4 => Self::GenerationMismatch,
            5 => Self::InstallFailed,
            _ => return None,
        })
    }

    /// A short lowercase name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BaseMismatch => "base_mismatch",
            Self::Invalid => "invalid",
            Self::WrongDomain => "wrong_domain",
            Self::GenerationMismatch => "generation_mismatch",
            Self::InstallFailed => "install_failed",
        }
    }
}

/// `HELLO`: the gateway's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version, [`VERSION`].
    pub version: u64,
    /// The gateway id (the `<id>` of its certificate's `spiffe://<domain>/gateway/<id>`).
    pub gateway_id: String,
    /// The trust domain the gateway serves.
    pub domain: String,
    /// The generation the gateway holds and serves, if any.
    pub held: Option<Generation>,
    /// The type and version of each section of the held table (empty when none is held).
    pub sections: Vec<(u64, SectionVersion)>,
}

/// The body of a `PUSH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushBody<'a> {
    /// A whole table encoding.
    Snapshot(&'a [u8]),
    /// Sections to replace or add and section types to remove, against `base`.
    Delta {
        /// The generation the delta applies to.
        base: Generation,
        /// Sections replaced or added, whole.
        upserts: Vec<SectionRef<'a>>,
        /// Section types removed.
        removes: Vec<u64>,
    },
}

/// `PUSH`: a table generation for the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push<'a> {
    /// Names this push in the `ACK` or `NACK`; strictly increasing on a session, from 1.
    pub nonce: u64,
    /// The generation the gateway holds once the push is applied.
    pub generation: Generation,
    /// The table or the delta.
    pub body: PushBody<'a>,
}

/// One reason in a `NACK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The section type at fault, or 0 for the table as a whole.
    pub resource: u64,
    /// What is wrong, for operators.
    pub reason: String,
}

/// `STATUS`: what the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// Agents attached.
    pub agents: u64,
    /// Distinct capabilities routed.
    pub capabilities: u64,
    /// Identities of attached agents, at most [`MAX_STATUS_AGENTS`] (sorted; `agents` is the
    /// full count).
    pub identities: Vec<String>,
}

/// A decoded frame. Borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `HELLO`.
    Hello(Hello),
    /// `PUSH`.
    Push(Push<'a>),
    /// `ACK`: every worker holds `generation`, pushed as `nonce`.
    Ack {
        /// The push's nonce.
        nonce: u64,
        /// The generation now held.
        generation: Generation,
    },
    /// `NACK`: the push `nonce` was not applied; the gateway keeps what it held.
    Nack {
        /// The push's nonce.
        nonce: u64,
        /// The generation the push announced.
        generation: Generation,
        /// Why.
        code: NackCode,
        /// What, by resource.
        rejections: Vec<Rejection>,
    },
    /// `STATUS`.
    Status(Status),
    /// `REPORT`.
    Report(crate::domain::Report),
    /// `ROUTES`.
    Routes(crate::domain::Routes),
    /// `TRUNKS`.
    Trunks(crate::domain::Trunks),
    /// `REPORT_REJECTED`.
    ReportRejected(crate::domain::ReportRejected),
    /// A frame of an extension type (>= 0x20) this implementation does not know: skipped.
    Unknown(u64),
}

impl<'a> Frame<'a> {
    /// The frame with nothing borrowed from the receive buffer. Only a `PUSH` borrows (its
    /// table or sections), and only a gateway receives one: a control plane keeps the others,
    /// and gets a `PUSH` back as `Err` (for it, always out of order).
    pub fn into_owned(self) -> Result<Frame<'static>, Push<'a>> {
        Ok(match self {
            Frame::Push(push) => return Err(push),
            Frame::Hello(h) => Frame::Hello(h),
            Frame::Ack { nonce, generation } => Frame::Ack { nonce, generation },
            Frame::Nack {
                nonce,
                generation,
                code,
                rejections,
            } => Frame::Nack {
                nonce,
                generation,
                code,
                rejections,
            },
            Frame::Status(s) => Frame::Status(s),
            Frame::Report(r) => Frame::Report(r),
            Frame::Routes(r) => Frame::Routes(r),
            Frame::Trunks(t) => Frame::Trunks(t),
            Frame::ReportRejected(x) => Frame::ReportRejected(x),
            Frame::Unknown(t) => Frame::Unknown(t),
        })
    }
}

/// Why a frame could not be taken from the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame announces more bytes than its type allows: close with `FRAME_TOO_LARGE`.
    #[error("frame type {ty:#x} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        /// The frame type.
        ty: u64,
        /// The announced length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// The frame could not be decoded: close with `PROTOCOL_VIOLATION`.
    #[error("frame type {ty:#x}: {source}")]
    Malformed {
        /// The frame type.
        ty: u64,
        /// What is wrong.
        source: DecodeError,
    },
}

impl FrameError {
    /// The code to close the connection with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::TooLarge { .. } => CloseCode::FrameTooLarge,
            FrameError::Malformed { .. } => CloseCode::ProtocolViolation,
        }
    }
}

/// The payload limit of frame type `ty`.
pub fn frame_limit(ty: u64) -> usize {
    if ty == frame_type::PUSH {
        MAX_PUSH_BYTES
    } else if ty == frame_type::ROUTES {
        crate::domain::MAX_ROUTES_BYTES
    } else {
        MAX_FRAME_BYTES
    }
}

/// Takes one frame from the front of `buf`.
///
/// Returns the frame and the bytes it used, `Ok(None)` when `buf` does not yet hold a whole
/// frame, or an error as soon as the type and length show the frame cannot be valid (a length
/// over the limit is refused before its bytes arrive).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    decode_frame_within(buf, MAX_PUSH_BYTES)
}

/// [`decode_frame`] with the receiver's own ceiling on payloads: a control plane passes
/// [`MAX_FRAME_BYTES`], since nothing a gateway may send is larger, so a gateway cannot make it
/// buffer a push-sized frame.
pub fn decode_frame_within(
    buf: &[u8],
    ceiling: usize,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let malformed = |ty, source| FrameError::Malformed { ty, source };
    let Some((ty, n)) = varint::decode(buf).map_err(|e| malformed(0, e))? else {
        return Ok(None);
    };
    let limit = frame_limit(ty).min(ceiling);
    let (len, m) = match block_prefix(&buf[n..], "frame", limit) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(DecodeError::TooLong { len, .. }) => {
            return Err(FrameError::TooLarge { ty, len, limit })
        }
        Err(e) => return Err(malformed(ty, e)),
    };
    let start = n + m;
    if buf.len() < start + len {
        return Ok(None);
    }
    let payload = &buf[start..start + len];
    let frame = decode_payload(ty, payload).map_err(|e| malformed(ty, e))?;
    Ok(Some((frame, start + len)))
}

fn decode_payload(ty: u64, payload: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let frame = match ty {
        frame_type::HELLO => {
            let version = r.varint("version")?;
            let gateway_id = r.str("gateway id", MAX_NAME_BYTES)?.to_owned();
            let domain = r.str("domain", MAX_NAME_BYTES)?.to_owned();
            let held = match r.varint("held flag")? {
                0 => None,
                1 => Some(Generation(r.array("held generation")?)),
                _ => {
                    return Err(DecodeError::InvalidValue {
                        what: "held flag",
                        reason: "not 0 or 1",
                    })
                }
            };
            let count = r.count("sections", MAX_SECTIONS)?;
            let mut sections = Vec::with_capacity(count.min(32));
            for _ in 0..count {
                let t = r.varint("section type")?;
                sections.push((t, r.array("section version")?));
            }
            if held.is_none() && !sections.is_empty() {
                return Err(DecodeError::InvalidValue {
                    what: "sections",
                    reason: "listed without a held generation",
                });
            }
            check_distinct(sections.iter().map(|(t, _)| *t))?;
            Frame::Hello(Hello {
                version,
                gateway_id,
                domain,
                held,
                sections,
            })
        }
        frame_type::PUSH => {
            let nonce = r.varint("nonce")?;
            if nonce == 0 {
                return Err(DecodeError::InvalidValue {
                    what: "nonce",
                    reason: "zero",
                });
            }
            let generation = Generation(r.array("generation")?);
            let body = match r.varint("push kind")? {
                0 => PushBody::Snapshot(r.bytes("table", MAX_TABLE_BYTES)?),
                1 => {
                    let base = Generation(r.array("base generation")?);
                    let count = r.count("upserts", MAX_SECTIONS)?;
                    let mut upserts = Vec::with_capacity(count.min(32));
                    for _ in 0..count {
                        let ty = r.varint("section type")?;
                        let body = r.bytes("section body", MAX_TABLE_BYTES)?;
                        upserts.push(SectionRef { ty, body });
                    }
                    let count = r.count("removes", MAX_SECTIONS)?;
                    let mut removes = Vec::with_capacity(count.min(32));
                    for _ in 0..count {
                        removes.push(r.varint("section type")?);
                    }
                    check_distinct(upserts.iter().map(|s| s.ty).chain(removes.iter().copied()))?;
                    PushBody::Delta {
                        base,
                        upserts,
                        removes,
                    }
                }
                _ => {
                    return Err(DecodeError::InvalidValue {
                        what: "push kind",
                        reason: "not 0 (snapshot) or 1 (delta)",
                    })
                }
            };
            Frame::Push(Push {
                nonce,
                generation,
                body,
            })
        }
        frame_type::ACK => Frame::Ack {
            nonce: r.varint("nonce")?,
            generation: Generation(r.array("generation")?),
        },
        frame_type::NACK => {
            let nonce = r.varint("nonce")?;
            let generation = Generation(r.array("generation")?);
            let code =
                NackCode::from_code(r.varint("nack code")?).ok_or(DecodeError::InvalidValue {
                    what: "nack code",
                    reason: "unknown",
                })?;
            let count = r.count("rejections", MAX_REJECTIONS)?;
            let mut rejections = Vec::with_capacity(count.min(8));
            for _ in 0..count {
                let resource = r.varint("resource")?;
                let reason = r.str("reason", MAX_REASON_BYTES)?.to_owned();
                rejections.push(Rejection { resource, reason });
            }
            Frame::Nack {
                nonce,
                generation,
                code,
                rejections,
            }
        }
        frame_type::STATUS => {
            let agents = r.varint("agents")?;
            let capabilities = r.varint("capabilities")?;
            let count = r.count("identities", MAX_STATUS_AGENTS)?;
            let mut identities = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                identities.push(r.str("identity", MAX_IDENTITY_BYTES)?.to_owned());
            }
            Frame::Status(Status {
                agents,
                capabilities,
                identities,
            })
        }
        frame_type::REPORT => Frame::Report(crate::domain::decode_report(&mut r)?),
        frame_type::ROUTES => Frame::Routes(crate::domain::decode_routes(&mut r)?),
        frame_type::TRUNKS => Frame::Trunks(crate::domain::decode_trunks(&mut r)?),
        frame_type::REPORT_REJECTED => {
            Frame::ReportRejected(crate::domain::decode_rejected(&mut r)?)
        }
        t if t >= FIRST_EXTENSION_TYPE => return Ok(Frame::Unknown(t)),
        _ => {
            return Err(DecodeError::InvalidValue {
                what: "frame type",
                reason: "unknown type below 0x20",
            })
        }
    };
    if !r.is_empty() {
        return Err(DecodeError::InvalidValue {
            what: "frame",
            reason: "bytes after the last field",
        });
    }
    Ok(frame)
}

fn check_distinct(types: impl Iterator<Item = u64>) -> Result<(), DecodeError> {
    let mut seen: smallvec::SmallVec<[u64; 16]> = smallvec::SmallVec::new();
    for t in types {
        if seen.contains(&t) {
            return Err(DecodeError::InvalidValue {
                what: "section type",
                reason: "named twice",
            });
        }
        seen.push(t);
    }
    Ok(())
}

/// Appends `frame` to `out`. An [`Frame::Unknown`] encodes as an empty frame of its type.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    let ty = match frame {
        Frame::Hello(h) => {
            varint::encode(h.version, &mut p);
            put_bytes(&mut p, h.gateway_id.as_bytes());
            put_bytes(&mut p, h.domain.as_bytes());
            match h.held {
                None => varint::encode(0, &mut p),
                Some(g) => {
                    varint::encode(1, &mut p);
                    p.extend_from_slice(&g.0);
                }
            }
            varint::encode(h.sections.len() as u64, &mut p);
            for (t, v) in &h.sections {
                varint::encode(*t, &mut p);
                p.extend_from_slice(v);
            }
            frame_type::HELLO
        }
        Frame::Push(push) => {
            p.reserve(match &push.body {
                PushBody::Snapshot(t) => t.len() + 48,
                PushBody::Delta { upserts, .. } => {
                    upserts.iter().map(|s| s.body.len() + 16).sum::<usize>() + 96
                }
            });
            varint::encode(push.nonce, &mut p);
            p.extend_from_slice(&push.generation.0);
            match &push.body {
                PushBody::Snapshot(table) => {
                    varint::encode(0, &mut p);
                    put_bytes(&mut p, table);
                }
                PushBody::Delta {
                    base,
                    upserts,
                    removes,
                } => {
                    varint::encode(1, &mut p);
                    p.extend_from_slice(&base.0);
                    varint::encode(upserts.len() as u64, &mut p);
                    for s in upserts {
                        varint::encode(s.ty, &mut p);
                        put_bytes(&mut p, s.body);
                    }
                    varint::encode(removes.len() as u64, &mut p);
                    for t in removes {
                        varint::encode(*t, &mut p);
                    }
                }
            }
            frame_type::PUSH
        }
        Frame::Ack { nonce, generation } => {
            varint::encode(*nonce, &mut p);
            p.extend_from_slice(&generation.0);
            frame_type::ACK
        }
        Frame::Nack {
            nonce,
            generation,
            code,
            rejections,
        } => {
            varint::encode(*nonce, &mut p);
            p.extend_from_slice(&generation.0);
            varint::encode(code.code(), &mut p);
            varint::encode(rejections.len() as u64, &mut p);
            for r in rejections {
                varint::encode(r.resource, &mut p);
                put_bytes(&mut p, r.reason.as_bytes());
            }
            frame_type::NACK
        }
        Frame::Status(s) => {
            varint::encode(s.agents, &mut p);
            varint::encode(s.capabilities, &mut p);
            varint::encode(s.identities.len() as u64, &mut p);
            for id in &s.identities {
                put_bytes(&mut p, id.as_bytes());
            }
            frame_type::STATUS
        }
        Frame::Report(r) => {
            crate::domain::encode_report(r, &mut p);
            frame_type::REPORT
        }
        Frame::Routes(r) => {
            crate::domain::encode_routes(r, &mut p);
            frame_type::ROUTES
        }
        Frame::Trunks(t) => {
            crate::domain::encode_trunks(t, &mut p);
            frame_type::TRUNKS
        }
        Frame::ReportRejected(x) => {
            crate::domain::encode_rejected(x, &mut p);
            frame_type::REPORT_REJECTED
        }
        Frame::Unknown(t) => *t,
    };
    varint::encode(ty, out);
    put_bytes(out, &p);
}

/// A rejection reason cut to [`MAX_REASON_BYTES`] on a character boundary.
pub fn reason(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(frame: Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(&frame, &mut out);
        let (back, used) = decode_frame(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(back, frame);
        // Every strict prefix asks for more bytes.
        for cut in 0..out.len() {
            assert_eq!(decode_frame(&out[..cut]), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let g = Generation([7; 32]);
        round_trip(Frame::Hello(Hello {
            version: VERSION,
            gateway_id: "gw1".into(),
            domain: "dmsc.local".into(),
            held: Some(g),
            sections: vec![(1, [1; 32]), (3, [3; 32])],
        }));
        round_trip(Frame::Hello(Hello {
            version: VERSION,
            gateway_id: "gw1".into(),
            domain: "dmsc.local".into(),
            held: None,
            sections: vec![],
        }));
        round_trip(Frame::Push(Push {
            nonce: 1,
            generation: g,
            body: PushBody::Snapshot(b"DMTB\x01"),
        }));
        round_trip(Frame::Push(Push {
            nonce: 9,
            generation: g,
            body: PushBody::Delta {
                base: Generation([2; 32]),
                upserts: vec![SectionRef {
                    ty: 3,
                    body: b"abc",
                }],
                removes: vec![9],
            },
        }));
        round_trip(Frame::Ack {
            nonce: 3,
            generation: g,
        });
        round_trip(Frame::Nack {
            nonce: 3,
            generation: g,
            code: NackCode::Invalid,
            rejections: vec![Rejection {
                resource: 4,
                reason: "members[0]: bad".into(),
            }],
        });
        round_trip(Frame::Status(Status {
            agents: 2,
            capabilities: 5,
            identities: vec!["spiffe://d/agent/a".into()],
        }));
        round_trip(Frame::Unknown(0x21));
    }

    #[test]
    fn oversized_frames_are_refused_before_their_bytes_arrive() {
        let mut out = Vec::new();
        varint::encode(frame_type::ACK, &mut out);
        varint::encode(MAX_FRAME_BYTES as u64 + 1, &mut out);
        assert!(matches!(
            decode_frame(&out),
            Err(FrameError::TooLarge { ty: 3, .. })
        ));
        let mut out = Vec::new();
        varint::encode(frame_type::PUSH, &mut out);
        varint::encode(MAX_PUSH_BYTES as u64 + 1, &mut out);
        let e = decode_frame(&out).unwrap_err();
        assert_eq!(e.close_code(), CloseCode::FrameTooLarge);
        // A receiver's own ceiling applies to every type.
        let mut out = Vec::new();
        varint::encode(frame_type::PUSH, &mut out);
        varint::encode(MAX_FRAME_BYTES as u64 + 1, &mut out);
        assert!(decode_frame(&out).unwrap().is_none());
        assert!(matches!(
            decode_frame_within(&out, MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { ty: 2, .. })
        ));
    }

    #[test]
    fn unknown_low_types_trailing_bytes_and_repeats_are_violations() {
        let violation = |bytes: &[u8]| {
            let e = decode_frame(bytes).unwrap_err();
            assert_eq!(e.close_code(), CloseCode::ProtocolViolation, "{e}");
        };
        violation(&[0x1f, 0]);
        // ACK with one byte too many.
        let mut out = Vec::new();
        encode_frame(
            &Frame::Ack {
                nonce: 1,
                generation: Generation([0; 32]),
            },
            &mut out,
        );
        out[1] += 1;
        out.push(0);
        violation(&out);
        // A delta naming a section twice.
        let mut out = Vec::new();
        encode_frame(
            &Frame::Push(Push {
                nonce: 1,
                generation: Generation([0; 32]),
                body: PushBody::Delta {
                    base: Generation([0; 32]),
                    upserts: vec![SectionRef { ty: 3, body: b"a" }],
                    removes: vec![3],
                },
            }),
            &mut out,
        );
        violation(&out);
        // A push with nonce 0.
        let mut out = Vec::new();
        encode_frame(
            &Frame::Push(Push {
                nonce: 0,
                generation: Generation([0; 32]),
                body: PushBody::Snapshot(b""),
            }),
            &mut out,
        );
        violation(&out);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut rest = &bytes[..];
            while let Ok(Some((_, used))) = decode_frame(rest) {
                prop_assert!(used > 0 && used <= rest.len());
                rest = &rest[used..];
            }
        }

        /// Valid frames of every type, then bytes flipped, cut or appended: decoding never
        /// panics, never reads past the buffer, and whatever decodes re-encodes to a frame that
        /// decodes to the same value.
        #[test]
        fn mutated_frames_never_panic(
            which in 0usize..6,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in any::<usize>(),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let g = Generation([5; 32]);
            let frame = match which {
                0 => Frame::Hello(Hello { version: VERSION, gateway_id: "gw1".into(), domain: "d.local".into(), held: Some(g), sections: vec![(1, [1; 32]), (5, [2; 32])] }),
                1 => Frame::Push(Push { nonce: 7, generation: g, body: PushBody::Snapshot(b"DMTB\x01\x01\x02\x01x") }),
                2 => Frame::Push(Push { nonce: 8, generation: g, body: PushBody::Delta { base: g, upserts: vec![SectionRef { ty: 3, body: b"\x01\x01a" }], removes: vec![9] } }),
                3 => Frame::Ack { nonce: 3, generation: g },
                4 => Frame::Nack { nonce: 3, generation: g, code: NackCode::Invalid, rejections: vec![Rejection { resource: 4, reason: "bad".into() }] },
                _ => Frame::Status(Status { agents: 3, capabilities: 2, identities: vec!["spiffe://d/agent/a".into()] }),
            };
            let mut bytes = Vec::new();
            encode_frame(&frame, &mut bytes);
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend_from_slice(&tail);
            if let Ok(Some((decoded, used))) = decode_frame(&bytes) {
                prop_assert!(used <= bytes.len());
                let mut again = Vec::new();
                encode_frame(&decoded, &mut again);
                let (back, _) = decode_frame(&again).unwrap().unwrap();
                prop_assert_eq!(back, decoded);
            }
        }

        #[test]
        fn status_round_trips(agents in any::<u32>(), ids in proptest::collection::vec("[a-z]{0,20}", 0..8)) {
            let frame = Frame::Status(Status { agents: agents.into(), capabilities: 1, identities: ids });
            let mut out = Vec::new();
            encode_frame(&frame, &mut out);
            let (back, _) = decode_frame(&out).unwrap().unwrap();
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn nack_round_trips(nonce in 1u64..1 << 40, reasons in proptest::collection::vec(("[ -~]{0,40}", 0u64..100), 0..8)) {
            let frame = Frame::Nack {
                nonce,
                generation: Generation([9; 32]),
                code: NackCode::BaseMismatch,
                rejections: reasons.into_iter().map(|(reason, resource)| Rejection { resource, reason }).collect(),
            };
            let mut out = Vec::new();
            encode_frame(&frame, &mut out);
            let (back, _) = decode_frame(&out).unwrap().unwrap();
            prop_assert_eq!(back, frame);
        }
    }
}
