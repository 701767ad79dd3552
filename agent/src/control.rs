//! The control stream: framing of [`ControlFrame`]s over the first bidirectional stream of a
//! connection, and the request-answer exchange that opens a connection (`ATTACH` or `LANE`).

use dmsc_protocol::control::{ControlFrame, FrameBuffer, Refusal};
use dmsc_protocol::limits::MAX_CONTROL_FRAME_BYTES;
use dmsc_protocol::{ConnectionCode, DecodeError};
use quinn::{Connection, ReadError, RecvStream, SendStream, VarInt, WriteError};

use crate::error::AgentError;

/// Why the control stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(#[from] quinn::ConnectionError),
    /// The gateway sent a malformed frame.
    #[error("malformed control frame: {0}")]
    Decode(#[from] DecodeError),
    /// The gateway finished or reset its side of the control stream.
    #[error("the gateway closed the control stream")]
    Closed,
    /// The gateway did not take a frame we sent within the bound (it stopped reading).
    #[error("the gateway stopped reading the control stream")]
    Stalled,
    /// A frame we were asked to send is over a protocol limit.
    #[error("cannot encode control frame: {0}")]
    Encode(DecodeError),
}

impl ControlError {
    /// The code to close the connection with because of this error.
    pub(crate) fn close_code(&self) -> ConnectionCode {
        match self {
            Self::Decode(DecodeError::TooLong { what: "frame", .. }) => {
                ConnectionCode::FrameTooLarge
            }
            Self::Decode(_) | Self::Closed => ConnectionCode::ProtocolViolation,
            Self::ConnectionLost(_) | Self::Encode(_) | Self::Stalled => ConnectionCode::NoError,
        }
    }
}

impl From<ControlError> for AgentError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::ConnectionLost(e) => AgentError::ConnectionLost(e),
            ControlError::Decode(e) => {
                AgentError::Protocol(format!("malformed control frame: {e}"))
            }
            ControlError::Closed => AgentError::Protocol("the control stream was closed".into()),
            ControlError::Encode(e) => AgentError::Protocol(format!("cannot encode a frame: {e}")),
            ControlError::Stalled => AgentError::Timeout("writing to the control stream"),
        }
    }
}

/// Why a request on the control stream got no accepting answer.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The control stream failed.
    Control(ControlError),
    /// The gateway refused (`ATTACH_REFUSED`, which answers both `ATTACH` and `LANE`).
    Refused { refusal: Refusal, reason: String },
    /// The gateway answered with a frame that does not answer the request.
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// No answer within the bound the caller set.
    Timeout { waiting: &'static str },
}

impl RequestError {
    /// The code to close the connection with because of this error.
    pub(crate) fn close_code(&self) -> ConnectionCode {
        match self {
            Self::Control(e) => e.close_code(),
            Self::Unexpected { .. } => ConnectionCode::ProtocolViolation,
            Self::Refused { .. } | Self::Timeout { .. } => ConnectionCode::NoError,
        }
    }

    /// The reason phrase to close the connection with.
    pub(crate) fn close_reason(&self) -> &'static [u8] {
        match self {
            Self::Control(_) => b"control stream failed",
            Self::Refused { .. } => b"refused",
            Self::Unexpected { .. } => b"unexpected answer",
            Self::Timeout { .. } => b"no answer in time",
        }
    }
}

impl From<ControlError> for RequestError {
    fn from(e: ControlError) -> Self {
        Self::Control(e)
    }
}

impl From<RequestError> for AgentError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Control(e) => e.into(),
            RequestError::Refused { refusal, reason } => AgentError::Refused { refusal, reason },
            RequestError::Unexpected { expected, got } => {
                AgentError::Protocol(format!("expected {expected}, got {got}"))
            }
            RequestError::Timeout { waiting } => AgentError::Timeout(waiting),
        }
    }
}

/// Both directions of a control stream.
#[derive(Debug)]
pub(crate) struct ControlStream {
    send: SendStream,
    recv: RecvStream,
    frames: FrameBuffer,
}

impl ControlStream {
    /// Opens the control stream: the first bidirectional stream of `connection`.
    pub(crate) async fn open(connection: &Connection) -> Result<Self, ControlError> {
        let (send, recv) = connection.open_bi().await?;
        Ok(Self {
            send,
            recv,
            frames: FrameBuffer::new(MAX_CONTROL_FRAME_BYTES),
        })
    }

    /// Sends one frame.
    pub(crate) async fn send(&mut self, frame: &ControlFrame) -> Result<(), ControlError> {
        let bytes = frame.to_bytes().map_err(ControlError::Encode)?;
        self.send.write_all(&bytes).await.map_err(|e| match e {
            WriteError::ConnectionLost(e) => ControlError::ConnectionLost(e),
            _ => ControlError::Closed,
        })
    }

    /// Sends `request`, then reads frames until `accept` takes one (returning its answer) or the
    /// gateway refuses; frames of unknown types are skipped, any other frame is an error. Not
    /// bounded in time: the caller bounds it (and then uses [`RequestError::Timeout`]).
    pub(crate) async fn request<T>(
        &mut self,
        request: &ControlFrame,
        accept: impl Fn(ControlFrame) -> Result<T, ControlFrame>,
    ) -> Result<T, RequestError> {
        self.send(request).await?;
        loop {
            match accept(self.next().await?) {
                Ok(answer) => return Ok(answer),
                Err(ControlFrame::AttachRefused { refusal, reason }) => {
                    return Err(RequestError::Refused { refusal, reason })
                }
                Err(ControlFrame::Unknown { .. }) => {}
                Err(other) => {
                    return Err(RequestError::Unexpected {
                        expected: answer_name(request).0,
                        got: frame_name(&other),
                    })
                }
            }
        }
    }

    /// The next frame from the gateway. Cancel-safe: a partial frame stays buffered.
    pub(crate) async fn next(&mut self) -> Result<ControlFrame, ControlError> {
        loop {
            if let Some(frame) = self.frames.next_frame()? {
                return Ok(frame);
            }
            match self.recv.read_chunk(MAX_CONTROL_FRAME_BYTES, true).await {
                Ok(Some(chunk)) => self.frames.extend(&chunk.bytes),
                Ok(None) => return Err(ControlError::Closed),
                Err(ReadError::ConnectionLost(e)) => return Err(ControlError::ConnectionLost(e)),
                Err(_) => return Err(ControlError::Closed),
            }
        }
    }
}

/// A connection code as a QUIC varint.
pub(crate) fn close_code(code: ConnectionCode) -> VarInt {
    VarInt::from_u64(code.code()).unwrap_or(VarInt::MAX)
}

/// The name of the frame that accepts `request`, and the text of a timeout waiting for it.
pub(crate) fn answer_name(request: &ControlFrame) -> (&'static str, &'static str) {
    match request {
        ControlFrame::Attach { .. } => ("ATTACH_OK", "waiting for ATTACH_OK"),
        ControlFrame::Lane { .. } => ("LANE_OK", "waiting for LANE_OK"),
        ControlFrame::UpdateCard { .. } => ("UPDATE_RESULT", "waiting for UPDATE_RESULT"),
        ControlFrame::Discover { .. } => ("DISCOVER_RESULT", "waiting for DISCOVER_RESULT"),
        ControlFrame::Detach => ("DETACHED", "waiting for DETACHED"),
        _ => ("no answer", "waiting for an answer"),
    }
}

/// The name of a frame, for logs and errors (never its contents, which may be large).
pub(crate) fn frame_name(frame: &ControlFrame) -> &'static str {
    match frame {
        ControlFrame::Attach { .. } => "ATTACH",
        ControlFrame::AttachOk { .. } => "ATTACH_OK",
        ControlFrame::AttachRefused { .. } => "ATTACH_REFUSED",
        ControlFrame::Lane { .. } => "LANE",
        ControlFrame::LaneOk { .. } => "LANE_OK",
        ControlFrame::UpdateCard { .. } => "UPDATE_CARD",
        ControlFrame::UpdateResult { .. } => "UPDATE_RESULT",
        ControlFrame::Discover { .. } => "DISCOVER",
        ControlFrame::DiscoverResult { .. } => "DISCOVER_RESULT",
        ControlFrame::Detach => "DETACH",
        ControlFrame::Detached => "DETACHED",
        ControlFrame::Drain { .. } => "DRAIN",
        ControlFrame::CapabilitiesRefused { .. } => "CAPABILITIES_REFUSED",
        ControlFrame::Unknown { .. } => "unknown",
    }
}
