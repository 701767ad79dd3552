//! Streamed bodies: the header that opens an invocation stream, the payload that follows it,
//! and a writer for payloads produced chunk by chunk.
//!
//! Payload bytes are passed around as the `Bytes` chunks quinn hands out, so reading and
//! writing copy nothing; only the read-to-end helpers join chunks into one buffer, and only
//! when there is more than one.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dmsc_protocol::header::header_prefix;
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::{DecodeError, StreamCode};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::config::DEFAULT_REQUEST_TIMEOUT;
use crate::error::BodyError;

/// How the opening header of a stream failed to arrive.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// The header is malformed or over the limit.
    Decode(DecodeError),
    /// The stream ended before the header was complete.
    Finished,
    /// Reading failed (reset, connection lost).
    Read(ReadError),
}

/// Gathers the length-prefixed header block at the start of a stream from chunks of any size.
///
/// Holds at most one header plus one chunk: the length prefix is checked against
/// [`MAX_HEADER_BYTES`] as soon as it has arrived.
#[derive(Debug, Default)]
pub(crate) struct HeaderAccumulator {
    buf: BytesMut,
}

impl HeaderAccumulator {
    /// Feeds one chunk. Once the whole header has arrived, returns it (length prefix included)
    /// and the payload bytes that came after it in the same chunk.
    pub(crate) fn push(&mut self, chunk: Bytes) -> Result<Option<(Bytes, Bytes)>, DecodeError> {
        if self.buf.is_empty() {
            // Common case: the whole header is in the first chunk. Split it without copying.
            if let Some((block, prefix)) = header_prefix(&chunk, MAX_HEADER_BYTES)? {
                if chunk.len() >= prefix + block {
                    let mut rest = chunk;
                    let header = rest.split_to(prefix + block);
                    return Ok(Some((header, rest)));
                }
            }
        }
        self.buf.extend_from_slice(&chunk);
        if let Some((block, prefix)) = header_prefix(&self.buf, MAX_HEADER_BYTES)? {
            if self.buf.len() >= prefix + block {
                let mut rest = std::mem::take(&mut self.buf);
                let header = rest.split_to(prefix + block).freeze();
                return Ok(Some((header, rest.freeze())));
            }
        }
        Ok(None)
    }
}

/// Reads the header block that opens `recv`; returns it and the payload bytes read with it.
pub(crate) async fn read_header(recv: &mut RecvStream) -> Result<(Bytes, Bytes), HeaderError> {
    let mut acc = HeaderAccumulator::default();
    loop {
        match recv.read_chunk(MAX_HEADER_BYTES + 8, true).await {
            Ok(Some(chunk)) => {
                if let Some(done) = acc.push(chunk.bytes).map_err(HeaderError::Decode)? {
                    return Ok(done);
                }
            }
            Ok(None) => return Err(HeaderError::Finished),
            Err(e) => return Err(HeaderError::Read(e)),
        }
    }
}

/// The payload of a stream after its header, read chunk by chunk.
pub(crate) struct Body {
    first: Bytes,
    recv: RecvStream,
    idle: Duration,
    finished: bool,
}

impl Body {
    /// A body whose first bytes (`first`, possibly empty) came with the header.
    pub(crate) fn new(first: Bytes, recv: RecvStream, idle: Duration) -> Self {
        Self {
            first,
            recv,
            idle,
            finished: false,
        }
    }

    /// The next chunk, or `None` at the end of the body.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if !self.first.is_empty() {
            return Ok(Some(std::mem::take(&mut self.first)));
        }
        if self.finished {
            return Ok(None);
        }
        match timeout(self.idle, self.recv.read_chunk(usize::MAX, true)).await {
            Ok(Ok(Some(chunk))) => Ok(Some(chunk.bytes)),
            Ok(Ok(None)) => {
                self.finished = true;
                Ok(None)
            }
            Ok(Err(e)) => {
                self.finished = true;
                Err(read_error(e))
            }
            Err(_) => {
                self.abandon();
                Err(BodyError::TimedOut)
            }
        }
    }

    /// The rest of the body in one buffer; fails once more than `limit` bytes have arrived.
    pub(crate) async fn read_to_end(&mut self, limit: usize) -> Result<Bytes, BodyError> {
        let mut chunks = Vec::new();
        let mut total = 0usize;
        while let Some(chunk) = self.chunk().await? {
            total = total.saturating_add(chunk.len());
            if total > limit {
                self.abandon();
                return Err(BodyError::TooLarge { limit });
            }
            chunks.push(chunk);
        }
        Ok(concat(chunks, total))
    }

    /// Tells the peer to stop sending (the rest of the body is not wanted).
    pub(crate) fn abandon(&mut self) {
        if !self.finished {
            self.finished = true;
            self.first = Bytes::new();
            let _ = self.recv.stop(code(StreamCode::Cancelled));
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("stream", &self.recv.id())
            .field("finished", &self.finished)
            .finish()
    }
}

/// Joins chunks, copying only when there is more than one.
pub(crate) fn concat(mut chunks: Vec<Bytes>, total: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut out = BytesMut::with_capacity(total);
            for chunk in chunks {
                out.extend_from_slice(&chunk);
            }
            out.freeze()
        }
    }
}

/// Writes a body chunk by chunk, with flow control: each `write` returns once QUIC has taken
/// the chunk, so a slow reader slows the writer down instead of filling memory.
///
/// Obtained from [`RequestBuilder::send_streaming`](crate::RequestBuilder::send_streaming)
/// (a request body) or [`Response::streaming`](crate::Response::streaming) (an answer body).
/// Call [`BodyWriter::finish`] at the end: a writer dropped without `finish` aborts the body
/// (the stream is reset), so a producer that fails half-way is never mistaken for a complete
/// body.
///
/// Each write fails with [`BodyError::TimedOut`] if the peer accepts no data for the
/// configured `request_timeout`.
pub struct BodyWriter {
    state: WriterState,
}

enum WriterState {
    /// The stream is not open yet; the invocation or the handler's answer hands it over.
    Pending(oneshot::Receiver<OpenStream>, Duration),
    /// Writing.
    Open(SendStream, Duration),
    /// Finished, aborted or failed.
    Done,
}

/// A send stream handed to a [`BodyWriter`] once its header has been written, with the idle
/// timeout for writes.
pub(crate) type OpenStream = (SendStream, Duration);

impl BodyWriter {
    /// A writer whose stream arrives later through the returned sender. `wait` bounds how long
    /// a write waits for it.
    pub(crate) fn pending(wait: Option<Duration>) -> (Self, oneshot::Sender<OpenStream>) {
        let (tx, rx) = oneshot::channel();
        let wait = wait.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        (
            Self {
                state: WriterState::Pending(rx, wait),
            },
            tx,
        )
    }

    /// Sends one chunk of the body; returns once QUIC has accepted all of it.
    pub async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), BodyError> {
        let chunk = chunk.into();
        let (send, idle) = self.stream().await?;
        let idle = *idle;
        match write_idle(send, chunk, idle).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail();
                Err(e)
            }
        }
    }

    /// Ends the body (QUIC FIN).
    pub async fn finish(mut self) -> Result<(), BodyError> {
        let (send, _) = self.stream().await?;
        let result = send.finish().map_err(|_| BodyError::Finished);
        self.state = WriterState::Done;
        result
    }

    /// Abandons the body: the stream is reset, and the other side sees the request (or answer)
    /// fail.
    pub fn abort(mut self) {
        self.fail();
    }

    async fn stream(&mut self) -> Result<(&mut SendStream, &mut Duration), BodyError> {
        if let WriterState::Pending(rx, wait) = &mut self.state {
            match timeout(*wait, rx).await {
                Ok(Ok((send, idle))) => self.state = WriterState::Open(send, idle),
                Ok(Err(_)) => {
                    self.state = WriterState::Done;
                    return Err(BodyError::NotOpened);
                }
                Err(_) => {
                    self.state = WriterState::Done;
                    return Err(BodyError::TimedOut);
                }
            }
        }
        match &mut self.state {
            WriterState::Open(send, idle) => Ok((send, idle)),
            _ => Err(BodyError::Finished),
        }
    }

    fn fail(&mut self) {
        if let WriterState::Open(send, _) = &mut self.state {
            let _ = send.reset(code(StreamCode::Cancelled));
        }
        self.state = WriterState::Done;
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.fail();
    }
}

impl fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            WriterState::Pending(..) => "pending",
            WriterState::Open(..) => "open",
            WriterState::Done => "done",
        };
        f.debug_struct("BodyWriter").field("state", &state).finish()
    }
}

/// A send stream that is reset, not finished, when dropped before [`SendGuard::finish`]:
/// quinn finishes a dropped stream, which would pass a half-written request off as complete
/// when the future writing it is cancelled.
#[derive(Debug)]
pub(crate) struct SendGuard {
    stream: SendStream,
    finished: bool,
}

impl SendGuard {
    pub(crate) fn new(stream: SendStream) -> Self {
        Self {
            stream,
            finished: false,
        }
    }

    /// Writes all of `bufs`.
    pub(crate) async fn write_all_chunks(&mut self, bufs: &mut [Bytes]) -> Result<(), WriteError> {
        self.stream.write_all_chunks(bufs).await
    }

    /// Ends the stream (FIN).
    pub(crate) fn finish(&mut self) -> Result<(), WriteError> {
        self.finished = true;
        self.stream.finish()?;
        Ok(())
    }

    /// Abandons the stream (RESET_STREAM `CANCELLED`).
    pub(crate) fn reset(&mut self) {
        self.finished = true;
        let _ = self.stream.reset(code(StreamCode::Cancelled));
    }
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(code(StreamCode::Cancelled));
        }
    }
}

/// Writes `data` to `send` without copying it; fails if no byte is accepted for `idle`, after
/// resetting the stream.
pub(crate) async fn write_idle(
    send: &mut SendStream,
    data: Bytes,
    idle: Duration,
) -> Result<(), BodyError> {
    let mut bufs = [data];
    while !bufs[0].is_empty() {
        match timeout(idle, send.write_chunks(&mut bufs)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(write_error(e)),
            Err(_) => {
                let _ = send.reset(code(StreamCode::Cancelled));
                return Err(BodyError::TimedOut);
            }
        }
    }
    Ok(())
}

/// A stream code as a QUIC varint (every `StreamCode` this crate sends is small).
pub(crate) fn code(code: StreamCode) -> VarInt {
    VarInt::from_u64(code.code()).unwrap_or(VarInt::MAX)
}

/// The body error for a failed read.
pub(crate) fn read_error(e: ReadError) -> BodyError {
    match e {
        ReadError::Reset(c) => BodyError::Reset {
            code: StreamCode::from_code(c.into_inner()),
        },
        ReadError::ConnectionLost(e) => BodyError::ConnectionLost(e),
        _ => BodyError::Finished,
    }
}

/// The body error for a failed write.
pub(crate) fn write_error(e: WriteError) -> BodyError {
    match e {
        WriteError::Stopped(c) => BodyError::Stopped {
            code: StreamCode::from_code(c.into_inner()),
        },
        WriteError::ConnectionLost(e) => BodyError::ConnectionLost(e),
        _ => BodyError::Finished,
    }
}

#[cfg(test)]
mod tests {
    use dmsc_protocol::header::{RequestHeader, ResponseHeader};
    use dmsc_protocol::Status;

    use super::*;

    fn wire() -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        RequestHeader {
            content_type: "text/plain",
            caller: "spiffe://test.local/agent/a",
            ..RequestHeader::new("echo")
        }
        .encode(&mut out)
        .unwrap();
        let header_len = out.len();
        out.extend_from_slice(b"payload bytes");
        (out, header_len)
    }

    #[test]
    fn a_header_in_one_chunk_is_split_without_copying() {
        let (wire, header_len) = wire();
        let chunk = Bytes::from(wire);
        let ptr = chunk.as_ptr();
        let (header, rest) = HeaderAccumulator::default().push(chunk).unwrap().unwrap();
        assert_eq!(header.len(), header_len);
        assert_eq!(header.as_ptr(), ptr);
        assert_eq!(&rest[..], b"payload bytes");
        let (h, _) = RequestHeader::decode(&header, MAX_HEADER_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(h.caller, "spiffe://test.local/agent/a");
    }

    #[test]
    fn a_header_arriving_byte_by_byte_is_reassembled() {
        let (wire, header_len) = wire();
        let mut acc = HeaderAccumulator::default();
        for (i, b) in wire.iter().enumerate() {
            match acc.push(Bytes::copy_from_slice(&[*b])).unwrap() {
                None => assert!(i + 1 < header_len),
                Some((header, rest)) => {
                    assert_eq!(i + 1, header_len);
                    assert_eq!(header.len(), header_len);
                    assert!(rest.is_empty());
                    return;
                }
            }
        }
        panic!("header never completed");
    }

    #[test]
    fn an_oversized_header_is_refused_from_its_prefix() {
        // Length prefix announcing 1 MiB.
        let mut acc = HeaderAccumulator::default();
        let err = acc
            .push(Bytes::from_static(&[0x80, 0x10, 0x00, 0x00]))
            .unwrap_err();
        assert!(matches!(err, DecodeError::TooLong { .. }));
        let mut out = Vec::new();
        ResponseHeader::new(Status::Ok).encode(&mut out).unwrap();
        let (h, rest) = HeaderAccumulator::default()
            .push(Bytes::from(out))
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            ResponseHeader::decode(&h, MAX_HEADER_BYTES)
                .unwrap()
                .unwrap()
                .0
                .status,
            Status::Ok
        );
    }

    #[test]
    fn concat_copies_only_several_chunks() {
        assert!(concat(vec![], 0).is_empty());
        let one = Bytes::from_static(b"abc");
        assert_eq!(concat(vec![one.clone()], 3).as_ptr(), one.as_ptr());
        assert_eq!(
            &concat(vec![one, Bytes::from_static(b"de")], 5)[..],
            b"abcde"
        );
    }
}
