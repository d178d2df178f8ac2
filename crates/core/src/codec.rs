//! Compact binary encoding helpers for aggregation states (LEB128 varints, zigzag, raw floats).
//!
//! States are stored in DynamoDB items and Parquet columns, so the encoding is compact,
//! deterministic (equal states encode to equal bytes) and versioned by a leading byte.

/// Why bytes could not be decoded into a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes end before the value does.
    #[error("state bytes end unexpectedly (truncated or corrupt)")]
    Truncated,
    /// A format version this build does not know.
    #[error("unknown state format version {0} (this build reads version {1})")]
    UnknownVersion(u8, u8),
    /// The stored state is for another aggregation kind.
    #[error("stored state is a `{found}` state but `{expected}` was expected")]
    KindMismatch {
        /// The tag in the bytes.
        found: String,
        /// The tag the aggregation needs.
        expected: String,
    },
    /// Anything else malformed.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

/// Appends values to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded bytes.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Unsigned LEB128.
    #[inline]
    pub fn u64(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }
    /// Unsigned LEB128 of a u128.
    #[inline]
    pub fn u128(&mut self, mut v: u128) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }
    /// Zigzag-encoded i64.
    #[inline]
    pub fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64)
    }
    /// Zigzag-encoded i128.
    #[inline]
    pub fn i128(&mut self, v: i128) {
        self.u128(((v << 1) ^ (v >> 127)) as u128)
    }
    /// Raw little-endian f64 (bit exact).
    #[inline]
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes())
    }
    /// One byte.
    #[inline]
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v)
    }
    /// Length-prefixed bytes.
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
}

/// Reads values written by [`Writer`].
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The error of a read past the end, made only when one happens (`ok_or(CodecError::Truncated)`
/// built and dropped an error on every read: a visible part of the feature pass).
#[cold]
fn truncated() -> CodecError {
    CodecError::Truncated
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    /// True when every byte was consumed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    /// Bytes not consumed yet.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    /// The next byte, not consumed.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }
    /// One byte.
    #[inline]
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        let b = *self.buf.get(self.pos).ok_or_else(truncated)?;
        self.pos += 1;
        Ok(b)
    }
    /// Unsigned LEB128.
    #[inline]
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        // One byte: most counts, lengths and small values.
        match self.one_byte() {
            Some(b) => Ok(b as u64),
            None => self.u64_long(),
        }
    }
    /// Unsigned LEB128 u128.
    #[inline]
    pub fn u128(&mut self) -> Result<u128, CodecError> {
        match self.one_byte() {
            Some(b) => Ok(b as u128),
            None => self.u128_long(),
        }
    }
    /// The next byte if it is a whole varint (below 0x80), consumed.
    #[inline]
    fn one_byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos).filter(|b| **b < 0x80)?;
        self.pos += 1;
        Some(b)
    }
    // The two loops below differ only in their accumulator: one generic loop over a u128 made
    // the feature pass 5-9% slower (`cargo bench -p lambda-core --bench row_features`), as bucket
    // starts are multi-byte u64 varints.
    /// [`Reader::u64`] of two or more bytes (out of line: the one-byte case is inlined).
    #[inline(never)]
    fn u64_long(&mut self) -> Result<u64, CodecError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(CodecError::Corrupt("varint overflows u64".into()));
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Corrupt("varint too long".into()))
    }
    /// [`Reader::u128`] of two or more bytes.
    #[inline(never)]
    fn u128_long(&mut self) -> Result<u128, CodecError> {
        // The first 63 bits in a u64 (decimal sums rarely need more; u128 shifts cost 8% of the
        // feature pass), the rest in the u128 loop.
        let mut low: u64 = 0;
        for shift in (0..63).step_by(7) {
            let b = self.u8()?;
            low |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(low as u128);
            }
        }
        let mut v = low as u128;
        for shift in (63..133).step_by(7) {
            let b = self.u8()?;
            if shift == 126 && b > 3 {
                return Err(CodecError::Corrupt("varint overflows u128".into()));
            }
            v |= ((b & 0x7f) as u128) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Corrupt("varint too long".into()))
    }
    /// Zigzag i64.
    #[inline]
    pub fn i64(&mut self) -> Result<i64, CodecError> {
        let u = self.u64()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    /// Zigzag i128.
    #[inline]
    pub fn i128(&mut self) -> Result<i128, CodecError> {
        let u = self.u128()?;
        Ok(((u >> 1) as i128) ^ -((u & 1) as i128))
    }
    /// Raw f64.
    #[inline]
    pub fn f64(&mut self) -> Result<f64, CodecError> {
        let end = self.pos + 8;
        let s = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(f64::from_le_bytes(s.try_into().map_err(|_| truncated())?))
    }
    /// Length-prefixed bytes.
    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = usize::try_from(self.u64()?).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let s = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// Length-prefixed UTF-8.
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| CodecError::Corrupt("invalid UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        let mut w = Writer::default();
        for v in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            w.i64(v);
        }
        for v in [0i128, -5, i128::MAX, i128::MIN] {
            w.i128(v);
        }
        w.f64(-0.0);
        w.bytes(b"abc");
        let mut r = Reader::new(&w.buf);
        for v in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(r.i64().unwrap(), v);
        }
        for v in [0i128, -5, i128::MAX, i128::MIN] {
            assert_eq!(r.i128().unwrap(), v);
        }
        assert_eq!(r.f64().unwrap().to_bits(), (-0.0f64).to_bits());
        assert_eq!(r.str().unwrap(), "abc");
        assert!(r.is_empty());
        assert_eq!(r.u8(), Err(CodecError::Truncated));
    }

    #[test]
    fn one_and_many_byte_varints_round_trip_and_truncation_is_an_error() {
        let (small, big) = (
            [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX],
            // Around the 63 bits `u128_long` reads in a u64 before going on in a u128.
            [
                0u128,
                127,
                128,
                (1 << 56) - 1,
                1 << 56,
                (1 << 63) - 1,
                1 << 63,
                u64::MAX as u128,
                1 << 64,
                (1 << 70) + 5,
                u128::MAX,
            ],
        );
        let mut w = Writer::default();
        small.iter().for_each(|v| w.u64(*v));
        big.iter().for_each(|v| w.u128(*v));
        let mut r = Reader::new(&w.buf);
        for v in small {
            assert_eq!(r.u64().unwrap(), v);
        }
        for v in big {
            assert_eq!(r.u128().unwrap(), v);
        }
        assert!(r.is_empty());
        // A continuation byte with nothing after it.
        assert_eq!(Reader::new(&[0x80]).u64(), Err(CodecError::Truncated));
        assert_eq!(
            Reader::new(&[0xff, 0xff]).u128(),
            Err(CodecError::Truncated)
        );
        assert_eq!(Reader::new(&[]).u64(), Err(CodecError::Truncated));
        // A last byte with more bits than the type has left.
        let over = |n: usize, last: u8| [vec![0xff; n], vec![last]].concat();
        assert_eq!(Reader::new(&over(9, 1)).u64(), Ok(u64::MAX));
        let too_big = Reader::new(&over(9, 2)).u64();
        assert!(matches!(too_big, Err(CodecError::Corrupt(m)) if m.contains("u64")));
        assert_eq!(Reader::new(&over(18, 3)).u128(), Ok(u128::MAX));
        let too_big = Reader::new(&over(18, 4)).u128();
        assert!(matches!(too_big, Err(CodecError::Corrupt(m)) if m.contains("u128")));
    }
}
