//! Validated lists shared by several messages: format codes, type OIDs and length-prefixed
//! nullable values. Each list is checked once when read, then iterates over the borrowed
//! bytes without allocating and without further error paths.

use super::cursor::Cursor;
use super::error::WireError;

/// A column or parameter format code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Text,
    Binary,
}

impl Format {
    /// The wire code: 0 text, 1 binary.
    pub fn code(self) -> i16 {
        match self {
            Self::Text => 0,
            Self::Binary => 1,
        }
    }

    pub(super) fn from_code(code: i16, what: &'static str) -> Result<Self, WireError> {
        match code {
            0 => Ok(Self::Text),
            1 => Ok(Self::Binary),
            other => Err(WireError::InvalidValue {
                what,
                value: i64::from(other),
            }),
        }
    }
}

/// A validated list of format codes (each 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Formats<'a> {
    raw: &'a [u8],
}

impl<'a> Formats<'a> {
    /// Reads `count: u16` then `count` int16 codes.
    pub(super) fn read(cur: &mut Cursor<'a>, what: &'static str) -> Result<Self, WireError> {
        let count = usize::from(cur.u16()?);
        let raw = cur.bytes(count * 2)?;
        for pair in raw.chunks_exact(2) {
            Format::from_code(i16::from_be_bytes([pair[0], pair[1]]), what)?;
        }
        Ok(Self { raw })
    }

    pub fn len(&self) -> usize {
        self.raw.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The format at `index`, if present.
    pub fn get(&self, index: usize) -> Option<Format> {
        let start = index.checked_mul(2)?;
        let pair = self.raw.get(start..start.checked_add(2)?)?;
        Some(if pair[1] == 0 {
            Format::Text
        } else {
            Format::Binary
        })
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Format> + 'a {
        // Validated in `read`: every pair is 0 or 1, so the low byte decides.
        self.raw.chunks_exact(2).map(|pair| {
            if pair[1] == 0 {
                Format::Text
            } else {
                Format::Binary
            }
        })
    }

    /// The format that applies to item `index` of `item_count` under the protocol's rule:
    /// no codes means all text, one code applies to all, otherwise one per item.
    pub fn for_item(&self, index: usize) -> Format {
        match self.len() {
            0 => Format::Text,
            1 => self.get(0).unwrap_or(Format::Text),
            _ => self.get(index).unwrap_or(Format::Text),
        }
    }
}

/// A list of type OIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oids<'a> {
    raw: &'a [u8],
}

impl<'a> Oids<'a> {
    /// Reads `count: u16` then `count` uint32 OIDs.
    pub(super) fn read(cur: &mut Cursor<'a>) -> Result<Self, WireError> {
        let count = usize::from(cur.u16()?);
        Ok(Self {
            raw: cur.bytes(count * 4)?,
        })
    }

    pub fn len(&self) -> usize {
        self.raw.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + 'a {
        self.raw
            .chunks_exact(4)
            .map(|q| u32::from_be_bytes([q[0], q[1], q[2], q[3]]))
    }
}

/// A validated list of length-prefixed values where length -1 is NULL (Bind parameters,
/// DataRow columns). Iterating yields `Option<&[u8]>` with no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Values<'a> {
    raw: &'a [u8],
    count: usize,
}

impl<'a> Values<'a> {
    /// Reads `count: u16` then that many values; any length below -1 is an error.
    pub(super) fn read(cur: &mut Cursor<'a>) -> Result<Self, WireError> {
        let count = usize::from(cur.u16()?);
        let start = cur.rest();
        for _ in 0..count {
            cur.nullable_value()?;
        }
        let used = start.len() - cur.remaining();
        Ok(Self {
            raw: start.get(..used).unwrap_or_default(),
            count,
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> ValuesIter<'a> {
        ValuesIter {
            cur: Cursor::new(self.raw, "values"),
            left: self.count,
        }
    }
}

impl<'a> IntoIterator for Values<'a> {
    type Item = Option<&'a [u8]>;
    type IntoIter = ValuesIter<'a>;
    fn into_iter(self) -> ValuesIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Values`].
#[derive(Clone, Debug)]
pub struct ValuesIter<'a> {
    cur: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for ValuesIter<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated in `Values::read`, so this cannot fail; stop rather than panic if it did.
        self.cur.nullable_value().ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for ValuesIter<'_> {}
