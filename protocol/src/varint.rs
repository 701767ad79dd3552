//! QUIC variable-length integers (RFC 9000, section 16).
//!
//! The two most significant bits of the first byte give the encoded length (1, 2, 4 or 8
//! bytes); the remaining bits hold the value in network byte order. Values up to 2^62 - 1 can
//! be encoded.

use crate::DecodeError;

/// The largest value a variable-length integer can hold: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Number of bytes `value` takes when encoded. Values above [`MAX`] are not encodable; callers
/// check with [`encode`].
pub fn encoded_len(value: u64) -> usize {
    if value < 1 << 6 {
        1
    } else if value < 1 << 14 {
        2
    } else if value < 1 << 30 {
        4
    } else {
        8
    }
}

/// Appends `value` to `out`.
///
/// # Panics
///
/// Panics if `value` exceeds [`MAX`]; every caller in this crate encodes lengths and codes that
/// are bounded far below it.
pub fn encode(value: u64, out: &mut Vec<u8>) {
    assert!(value <= MAX, "varint out of range");
    match encoded_len(value) {
        1 => out.push(value as u8),
        2 => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Decodes a variable-length integer from the start of `buf`.
///
/// Returns the value and the number of bytes it took, `Ok(None)` if `buf` ends before the
/// integer does.
pub fn decode(buf: &[u8]) -> Result<Option<(u64, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Ok(None);
    }
    let mut value = u64::from(first & 0x3f);
    for &b in &buf[1..len] {
        value = (value << 8) | u64::from(b);
    }
    Ok(Some((value, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_examples() {
        // The examples of RFC 9000, appendix A.1.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(decode(bytes).unwrap(), Some((value, bytes.len())));
            let mut out = Vec::new();
            encode(value, &mut out);
            assert_eq!(out, bytes);
        }
        // A non-minimal encoding decodes to the same value.
        assert_eq!(decode(&[0x40, 0x25]).unwrap(), Some((37, 2)));
    }

    #[test]
    fn short_input_asks_for_more() {
        assert_eq!(decode(&[]).unwrap(), None);
        assert_eq!(decode(&[0x7b]).unwrap(), None);
        assert_eq!(decode(&[0xc2, 0, 0]).unwrap(), None);
    }

    proptest! {
        #[test]
        fn round_trip(value in 0..=MAX) {
            let mut out = Vec::new();
            encode(value, &mut out);
            prop_assert_eq!(out.len(), encoded_len(value));
            prop_assert_eq!(decode(&out).unwrap(), Some((value, out.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Some((value, len)) = decode(&bytes).unwrap() {
                prop_assert!(value <= MAX);
                prop_assert!(len <= bytes.len());
            }
        }
    }
}
