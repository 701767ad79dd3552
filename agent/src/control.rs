//! The control stream: framing of [`ControlFrame`]s over the first bidirectional stream of a
//! connection.

use dmsc_protocol::control::{ControlFrame, FrameBuffer};
use dmsc_protocol::limits::MAX_CONTROL_FRAME_BYTES;
use dmsc_protocol::{ConnectionCode, DecodeError};
use quinn::{Connection, ReadError, RecvStream, SendStream, VarInt, WriteError};

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
        ControlFrame::Unknown { .. } => "unknown",
    }
}
