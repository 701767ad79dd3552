//! Shared reading and writing helpers for the DMSC binary formats.

use crate::varint;

/// Why a DMSC frame or header could not be decoded.
///
/// Every decoder in this crate returns this error rather than panicking; the receiver answers
/// the peer as `docs/PROTOCOL.md` prescribes (a `BAD_REQUEST` status on an invocation stream, a
/// `PROTOCOL_VIOLATION` close on the control stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A length prefix announced more bytes than the limit for that item allows.
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    TooLong {
        /// The item whose length was announced.
        what: &'static str,
        /// The announced length.
        len: u64,
        /// The limit in force.
        limit: usize,
    },
    /// The enclosing frame or header ended in the middle of a field.
    #[error("{what} is truncated")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// A string field did not hold valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
    },
    /// A field held a value outside its defined range.
    #[error("{what} has an invalid value: {reason}")]
    InvalidValue {
        /// The field being read.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A cursor over a complete, length-delimited block (a header or a frame payload).
///
/// Running out of bytes inside a block is an error ([`DecodeError::Truncated`]), not a request
/// for more input: the enclosing length prefix already said how long the block is.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        match varint::decode(self.buf)? {
            Some((value, len)) => {
                self.buf = &self.buf[len..];
                Ok(value)
            }
            None => Err(DecodeError::Truncated { what }),
        }
    }

    /// A varint that must fit in `max`.
    pub(crate) fn bounded(
        &mut self,
        what: &'static str,
        max: u64,
        reason: &'static str,
    ) -> Result<u64, DecodeError> {
        let value = self.varint(what)?;
        if value > max {
            return Err(DecodeError::InvalidValue { what, reason });
        }
        Ok(value)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < len {
            return Err(DecodeError::Truncated { what });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// A varint length `<= limit`, then that many bytes.
    pub(crate) fn bytes(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong { what, len, limit });
        }
        self.take(len as usize, what)
    }

    /// Like [`Reader::bytes`], and the bytes must be UTF-8.
    pub(crate) fn str(&mut self, what: &'static str, limit: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what, limit)?).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// A count `<= limit` of items that follow.
    pub(crate) fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, DecodeError> {
        let len = self.varint(what)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong { what, len, limit });
        }
        Ok(len as usize)
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    varint::encode(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Reads the varint length prefix of a block at the start of `buf`.
///
/// Returns `(block_len, prefix_len)`, `Ok(None)` when more bytes are needed, or
/// [`DecodeError::TooLong`] when the announced block exceeds `limit`.
pub(crate) fn block_prefix(
    buf: &[u8],
    what: &'static str,
    limit: usize,
) -> Result<Option<(usize, usize)>, DecodeError> {
    let Some((len, prefix)) = varint::decode(buf)? else {
        return Ok(None);
    };
    if len > limit as u64 {
        return Err(DecodeError::TooLong { what, len, limit });
    }
    Ok(Some((len as usize, prefix)))
}
