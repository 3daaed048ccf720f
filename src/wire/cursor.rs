//! A bounds-checked reader over a message body. Every read returns `Result`, so decoders
//! built on it cannot index out of bounds on hostile input.

use super::error::WireError;

/// Reads big-endian integers and NUL-terminated strings from a borrowed body.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cursor<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(body: &'a [u8], what: &'static str) -> Self {
        Self { rest: body, what }
    }

    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(super) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub(super) fn bytes(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < count {
            return Err(WireError::Truncated { what: self.what });
        }
        let (head, tail) = self.rest.split_at(count);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let head = self.bytes(N)?;
        // `bytes(N)` returned exactly N bytes, so the conversion cannot fail; map it anyway
        // rather than unwrap, to keep this file free of panicking paths.
        head.try_into()
            .map_err(|_| WireError::Truncated { what: self.what })
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    /// Counts in the protocol are sent as int16 but read by PostgreSQL as unsigned.
    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(super) fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// The bytes of a NUL-terminated string, without the NUL.
    pub(super) fn cstr_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let Some(nul) = memchr::memchr(0, self.rest) else {
            return Err(WireError::UnterminatedString { what: self.what });
        };
        let (head, tail) = self.rest.split_at(nul);
        self.rest = tail.get(1..).unwrap_or_default();
        Ok(head)
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self) -> Result<&'a str, WireError> {
        let raw = self.cstr_bytes()?;
        utf8(raw, self.what)
    }

    /// A length-prefixed value where -1 means NULL (DataRow columns, Bind parameters).
    pub(super) fn nullable_value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let len = self.i32()?;
        match len {
            -1 => Ok(None),
            0.. => self.bytes(len as usize).map(Some),
            _ => Err(WireError::InvalidValue {
                what: self.what,
                value: i64::from(len),
            }),
        }
    }

    /// Ends decoding: leftover bytes mean the peer and we disagree about the layout.
    pub(super) fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what: self.what,
                count: self.rest.len(),
            })
        }
    }
}

/// Validates UTF-8 with the SIMD validator; the error keeps the field name.
pub(super) fn utf8<'a>(raw: &'a [u8], what: &'static str) -> Result<&'a str, WireError> {
    simdutf8::basic::from_utf8(raw).map_err(|source| WireError::InvalidUtf8 { what, source })
}

/// Checks that a body is empty, for messages that carry nothing but their tag.
pub(super) fn expect_empty(body: &[u8], what: &'static str) -> Result<(), WireError> {
    Cursor::new(body, what).finish()
}
