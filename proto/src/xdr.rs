//! XDR (RFC 4506) encoding and decoding, as libvirt's RPC layer uses it.
//!
//! Every item is big-endian and padded to a multiple of four bytes. Decoding never trusts
//! a length word: strings, opaques and arrays are checked against their declared maximum
//! and against the bytes actually left before anything is allocated, so a hostile peer
//! cannot make us reserve memory it did not send.

use thiserror::Error;

/// Why a payload failed to decode. The server turns any of these into libvirt's
/// "Unable to decode message payload" reply; the connection stays up.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum XdrError {
    #[error("payload truncated: needed {needed} more bytes, {left} left")]
    Truncated { needed: usize, left: usize },
    #[error("length {len} exceeds the maximum {max}")]
    TooLong { len: usize, max: usize },
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("bad union discriminant {0}")]
    BadDiscriminant(i32),
}

/// Number of zero bytes that pad `len` bytes to a four-byte boundary.
#[inline]
pub const fn pad(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

/// Appends XDR items to a growable buffer.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_buffer(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Fixed-length opaque (`opaque[N]`): the bytes and their padding, no length word.
    pub fn fixed_opaque(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self.buf.extend_from_slice(&[0u8; 3][..pad(v.len())]);
        self
    }

    /// Variable-length opaque or string: length word, bytes, padding.
    pub fn opaque(&mut self, v: &[u8]) -> &mut Self {
        // Lengths above u32::MAX cannot be represented; callers bound their inputs
        // far below that (4 MiB strings, 32 MiB messages).
        self.u32(v.len() as u32);
        self.fixed_opaque(v)
    }

    pub fn string(&mut self, v: &str) -> &mut Self {
        self.opaque(v.as_bytes())
    }

    /// Optional item (`T *x`): a boolean, then the item when present.
    pub fn optional<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => {
                self.u32(0);
            }
            Some(x) => {
                self.u32(1);
                f(self, x);
            }
        }
        self
    }

    pub fn optional_string(&mut self, v: Option<&str>) -> &mut Self {
        self.optional(v, |e, s| {
            e.string(s);
        })
    }
}

/// Reads XDR items from a byte slice.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let left = self.remaining();
        if n > left {
            return Err(XdrError::Truncated { needed: n, left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn word(&mut self) -> Result<[u8; 4], XdrError> {
        let s = self.take(4)?;
        Ok([s[0], s[1], s[2], s[3]])
    }

    pub fn u32(&mut self) -> Result<u32, XdrError> {
        Ok(u32::from_be_bytes(self.word()?))
    }

    pub fn i32(&mut self) -> Result<i32, XdrError> {
        Ok(i32::from_be_bytes(self.word()?))
    }

    pub fn u64(&mut self) -> Result<u64, XdrError> {
        let s = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Ok(u64::from_be_bytes(b))
    }

    pub fn i64(&mut self) -> Result<i64, XdrError> {
        Ok(self.u64()? as i64)
    }

    pub fn f64(&mut self) -> Result<f64, XdrError> {
        Ok(f64::from_bits(self.u64()?))
    }

    /// glibc's `xdr_bool` takes any non-zero word as true; so do we.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        Ok(self.u32()? != 0)
    }

    pub fn fixed_opaque(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let s = self.take(n)?;
        // libvirt's decoders skip padding without checking it; so do we.
        self.take(pad(n))?;
        Ok(s)
    }

    pub fn uuid(&mut self) -> Result<[u8; 16], XdrError> {
        let s = self.fixed_opaque(16)?;
        let mut u = [0u8; 16];
        u.copy_from_slice(s);
        Ok(u)
    }

    /// Variable-length opaque bounded by `max`; the bound is checked before the data.
    pub fn opaque(&mut self, max: usize) -> Result<&'a [u8], XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { len, max });
        }
        self.fixed_opaque(len)
    }

    /// A `string<max>`. libvirt strings are C strings; we require UTF-8 only when the
    /// caller asks for `&str`, see [`Decoder::string_lossless`] for raw bytes.
    pub fn string(&mut self, max: usize) -> Result<String, XdrError> {
        let b = self.opaque(max)?;
        String::from_utf8(b.to_vec()).map_err(|_| XdrError::NotUtf8)
    }

    /// A `string<max>` kept as raw bytes (paths on Linux need not be UTF-8).
    pub fn string_lossless(&mut self, max: usize) -> Result<Vec<u8>, XdrError> {
        Ok(self.opaque(max)?.to_vec())
    }

    pub fn optional<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, XdrError>,
    ) -> Result<Option<T>, XdrError> {
        if self.bool()? {
            Ok(Some(f(self)?))
        } else {
            Ok(None)
        }
    }

    pub fn optional_string(&mut self, max: usize) -> Result<Option<String>, XdrError> {
        self.optional(|d| d.string(max))
    }

    /// Array length word, checked against the array's maximum and against what is left
    /// (every element takes at least `min_elem_size` bytes), so a forged count never
    /// drives a large allocation.
    pub fn array_len(&mut self, max: usize, min_elem_size: usize) -> Result<usize, XdrError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(XdrError::TooLong { len: n, max });
        }
        let need = n.saturating_mul(min_elem_size.max(1));
        if need > self.remaining() {
            return Err(XdrError::Truncated {
                needed: need,
                left: self.remaining(),
            });
        }
        Ok(n)
    }
}

/// Text for display only (owner names, inspect listings): invalid UTF-8 becomes U+FFFD
/// instead of failing the message. Never for names that name files.
pub fn lossy(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn string_padding() {
        let mut e = Encoder::new();
        e.string("vm1");
        assert_eq!(e.as_bytes(), &[0, 0, 0, 3, b'v', b'm', b'1', 0]);
        let mut e = Encoder::new();
        e.string("");
        assert_eq!(e.as_bytes(), &[0, 0, 0, 0]);
    }

    #[test]
    fn oversized_string_is_rejected_before_reading() {
        let bytes = [0xff, 0xff, 0xff, 0xff];
        let mut d = Decoder::new(&bytes);
        assert!(matches!(d.string(4_194_304), Err(XdrError::TooLong { .. })));
    }

    #[test]
    fn forged_array_count_is_rejected() {
        let bytes = [0, 0, 1, 0];
        let mut d = Decoder::new(&bytes);
        assert!(matches!(
            d.array_len(1024, 8),
            Err(XdrError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip(a: u32, b: i32, c: u64, d: i64, s in ".{0,64}", o in proptest::collection::vec(any::<u8>(), 0..64), opt: Option<String>, flag: bool) {
            let mut e = Encoder::new();
            e.u32(a).i32(b).u64(c).i64(d).string(&s).opaque(&o).optional_string(opt.as_deref()).bool(flag);
            let bytes = e.into_inner();
            prop_assert_eq!(bytes.len() % 4, 0);
            let mut r = Decoder::new(&bytes);
            prop_assert_eq!(r.u32().unwrap(), a);
            prop_assert_eq!(r.i32().unwrap(), b);
            prop_assert_eq!(r.u64().unwrap(), c);
            prop_assert_eq!(r.i64().unwrap(), d);
            prop_assert_eq!(r.string(1 << 22).unwrap(), s);
            prop_assert_eq!(r.opaque(1 << 22).unwrap(), &o[..]);
            prop_assert_eq!(r.optional_string(1 << 22).unwrap(), opt);
            prop_assert_eq!(r.bool().unwrap(), flag);
            prop_assert_eq!(r.remaining(), 0);
        }

        /// Every strict prefix of a valid encoding fails to decode instead of panicking
        /// or inventing data.
        #[test]
        fn truncation_always_fails(s in ".{1,64}", c: u64) {
            let mut e = Encoder::new();
            e.string(&s).u64(c);
            let bytes = e.into_inner();
            for cut in 0..bytes.len() {
                let mut r = Decoder::new(&bytes[..cut]);
                let res = r.string(1 << 22).and_then(|_| r.u64());
                prop_assert!(res.is_err());
            }
        }

        /// Arbitrary bytes never panic the decoder, whatever the bound.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128), max in 0usize..1024) {
            let mut r = Decoder::new(&bytes);
            let _ = r.string(max);
            let _ = r.optional_string(max);
            let _ = r.array_len(max, 4);
            let _ = r.u64();
        }
    }
}
