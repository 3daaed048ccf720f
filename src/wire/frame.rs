//! Framing: finds message boundaries in a connection's read buffer and splits complete
//! messages off as refcounted `Bytes` without copying. Never decodes message bodies and
//! never grows the buffer: reading more bytes is the caller's job.

use bytes::{Bytes, BytesMut};
use std::ops::ControlFlow;

use super::error::WireError;

/// Tag byte plus the i32 length field.
pub const HEADER_BYTES: usize = 5;

/// Smallest legal startup packet: the length field plus the request code.
const STARTUP_BYTES_MIN: usize = 8;

/// One complete tagged message, header included, so the proxy can forward it verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    tag: u8,
    bytes: Bytes,
}

impl Frame {
    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// The whole message: tag, length and body.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The whole message, for handing to a writer or a mirror queue.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The body after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        // A Frame is only built by `split_message`, which guarantees the header is present.
        self.bytes.get(HEADER_BYTES..).unwrap_or_default()
    }
}

/// Reads the header at the start of `buf`: `Ok(None)` if fewer than 5 bytes are there,
/// otherwise the total size of the message on the wire (tag included).
///
/// `message_bytes_max` bounds the length field (body + 4), as PostgreSQL's own limits do.
#[inline]
fn message_bytes(buf: &[u8], message_bytes_max: usize) -> Result<Option<usize>, WireError> {
    let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(too_small("message", i64::from(len), 4));
    }
    // len >= 4 here, so the cast is lossless.
    let len = len as usize;
    if len > message_bytes_max {
        return Err(WireError::MessageTooLarge {
            len,
            max: message_bytes_max,
        });
    }
    Ok(Some(len + 1))
}

#[cold]
fn too_small(what: &'static str, len: i64, min: i64) -> WireError {
    WireError::LengthTooSmall { what, len, min }
}

/// Splits the first tagged message off `buf`.
///
/// Returns `Ok(None)` until the whole message is buffered. A length below 4 or above
/// `message_bytes_max` is an error before the body arrives, so a hostile length never makes
/// the caller buffer more than the limit.
pub fn split_message(
    buf: &mut BytesMut,
    message_bytes_max: usize,
) -> Result<Option<Frame>, WireError> {
    let Some(total) = message_bytes(buf, message_bytes_max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let bytes = buf.split_to(total).freeze();
    let tag = bytes.first().copied().unwrap_or_default();
    Ok(Some(Frame { tag, bytes }))
}

/// How many bytes `buf` still needs before its first message is complete (0 if it is).
/// Lets the caller size one read instead of looping on small ones.
pub fn bytes_missing(buf: &[u8], message_bytes_max: usize) -> Result<usize, WireError> {
    Ok(match message_bytes(buf, message_bytes_max)? {
        None => HEADER_BYTES - buf.len(),
        Some(total) => total.saturating_sub(buf.len()),
    })
}

/// Walks the headers of all complete messages at the start of `buf`, calling
/// `visit(tag, body)` for each, and returns the length of that complete-message prefix.
///
/// The proxy fast path: forward `buf.split_to(prefix)` with one write, having looked only at
/// the tags (and the bodies it cares about). No allocation. An invalid header anywhere in the
/// prefix is an error, since the connection is closed anyway.
#[inline]
pub fn complete_prefix(
    buf: &[u8],
    message_bytes_max: usize,
    mut visit: impl FnMut(u8, &[u8]),
) -> Result<usize, WireError> {
    complete_prefix_until(buf, message_bytes_max, |tag, body| {
        visit(tag, body);
        ControlFlow::Continue(())
    })
}

/// Like [`complete_prefix`], but `visit` may stop the walk: `Break` ends the prefix right
/// after the message it was called for. The proxy uses this to stop at a message it must
/// handle itself (Terminate, a Sync it waits on) while still forwarding everything before.
#[inline]
pub fn complete_prefix_until(
    buf: &[u8],
    message_bytes_max: usize,
    mut visit: impl FnMut(u8, &[u8]) -> ControlFlow<()>,
) -> Result<usize, WireError> {
    let mut consumed = 0usize;
    while let Some(rest) = buf.get(consumed..) {
        let Some(total) = message_bytes(rest, message_bytes_max)? else {
            break;
        };
        let Some(message) = rest.get(..total) else {
            break;
        };
        let tag = message[0];
        consumed += total;
        if visit(tag, message.get(HEADER_BYTES..).unwrap_or_default()).is_break() {
            break;
        }
    }
    Ok(consumed)
}

/// Splits the untagged first packet of a connection (StartupMessage, SSLRequest,
/// GSSENCRequest or CancelRequest) off `buf`, length field included.
///
/// `startup_bytes_max` bounds the packet; PostgreSQL uses 10000.
pub fn split_startup(
    buf: &mut BytesMut,
    startup_bytes_max: usize,
) -> Result<Option<Bytes>, WireError> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(*header);
    if len < STARTUP_BYTES_MIN as i32 {
        return Err(too_small(
            "startup packet",
            i64::from(len),
            STARTUP_BYTES_MIN as i64,
        ));
    }
    let len = len as usize;
    if len > startup_bytes_max {
        return Err(WireError::MessageTooLarge {
            len,
            max: startup_bytes_max,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn buf(bytes: &[u8]) -> BytesMut {
        BytesMut::from(bytes)
    }

    #[test]
    fn splits_whole_messages_and_keeps_the_rest() {
        let mut b = buf(b"Q\0\0\0\x09abcd\0S\0\0\0\x04Z");
        let f = split_message(&mut b, MAX).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"abcd\0");
        assert_eq!(f.bytes().len(), 10);
        let f = split_message(&mut b, MAX).unwrap().unwrap();
        assert_eq!((f.tag(), f.body()), (b'S', &b""[..]));
        assert_eq!(split_message(&mut b, MAX).unwrap(), None);
        assert_eq!(&b[..], b"Z");
    }

    #[test]
    fn incomplete_is_none_and_untouched() {
        let mut b = buf(b"Q\0\0\0\x09ab");
        assert_eq!(split_message(&mut b, MAX).unwrap(), None);
        assert_eq!(b.len(), 7);
        assert_eq!(bytes_missing(&b, MAX).unwrap(), 3);
        assert_eq!(bytes_missing(b"Q\0", MAX).unwrap(), 3);
    }

    #[test]
    fn length_below_four_is_an_error() {
        for len in [3i32, 0, -1, i32::MIN] {
            let mut b = buf(b"Q");
            b.extend_from_slice(&len.to_be_bytes());
            let err = split_message(&mut b, MAX).unwrap_err();
            assert!(matches!(err, WireError::LengthTooSmall { .. }), "{err:?}");
            assert_eq!(err.sqlstate(), "08P01");
        }
    }

    #[test]
    fn huge_length_is_too_large_before_the_body_arrives() {
        let mut b = buf(b"Q");
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        let err = split_message(&mut b, MAX).unwrap_err();
        assert!(
            matches!(err, WireError::MessageTooLarge { len, max } if len == i32::MAX as usize && max == MAX)
        );
        assert_eq!(err.sqlstate(), "54000");
        // With a limit that admits it, it is merely incomplete.
        assert_eq!(split_message(&mut b, usize::MAX).unwrap(), None);
    }

    #[test]
    fn prefix_walks_complete_messages_only() {
        let data = b"P\0\0\0\x05xB\0\0\0\x04S\0\0\0\x04Q\0\0\0\x09ab";
        let mut seen = Vec::new();
        let n = complete_prefix(data, MAX, |t, body| seen.push((t, body.to_vec()))).unwrap();
        assert_eq!(n, 6 + 5 + 5);
        assert_eq!(
            seen,
            vec![(b'P', b"x".to_vec()), (b'B', vec![]), (b'S', vec![])]
        );
        let n = complete_prefix_until(data, MAX, |t, _| {
            if t == b'B' {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(n, 11);
        assert!(complete_prefix(b"S\0\0\0\x04X\0\0\0\x02", MAX, |_, _| ()).is_err());
        assert_eq!(complete_prefix(b"", MAX, |_, _| ()).unwrap(), 0);
    }

    #[test]
    fn startup_packet_bounds() {
        let mut b = buf(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f, 1]);
        let p = split_startup(&mut b, 10_000).unwrap().unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(&b[..], &[1]);
        let mut b = buf(&[0, 0, 0, 7, 0, 0, 0]);
        assert!(split_startup(&mut b, 10_000).is_err());
        let mut b = buf(&[0, 1, 0, 0]);
        assert!(matches!(
            split_startup(&mut b, 10_000),
            Err(WireError::MessageTooLarge { .. })
        ));
        let mut b = buf(&[0, 0, 0, 9, 0]);
        assert_eq!(split_startup(&mut b, 10_000).unwrap(), None);
    }
}
