//! Interim wire codec: only what the proxy needs while the full codec is built on its own
//! branch. Replaced wholesale by that work.

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message length {len} is invalid")]
    BadLength { len: i64 },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
}

impl WireError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WireError::MessageTooLarge { .. } => sqlstate::PROGRAM_LIMIT_EXCEEDED,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const UNABLE_TO_CONNECT: &str = "08001";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

pub fn split_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if len < 8 {
        return Err(WireError::BadLength { len });
    }
    if len as usize > max {
        return Err(WireError::MessageTooLarge {
            len: len as usize,
            max,
        });
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    Ok(Some(buf.split_to(len as usize).freeze()))
}

pub enum StartupPacket {
    Startup { protocol: u32 },
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
}

impl StartupPacket {
    pub fn parse(packet: &[u8]) -> Result<StartupPacket, WireError> {
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        Ok(match code {
            80877103 => StartupPacket::SslRequest,
            80877104 => StartupPacket::GssEncRequest,
            80877102 if packet.len() == 16 => StartupPacket::Cancel {
                pid: i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
                secret: i32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]),
            },
            c if c >> 16 == 3 => StartupPacket::Startup { protocol: c },
            _ => {
                return Err(WireError::Malformed {
                    what: "startup packet",
                });
            }
        })
    }
}

pub fn complete_prefix(
    buf: &[u8],
    max: usize,
    mut visit: impl FnMut(u8, &[u8]),
) -> Result<usize, WireError> {
    let mut at = 0;
    while buf.len() - at >= 5 {
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as i64;
        if len < 4 {
            return Err(WireError::BadLength { len });
        }
        if len as usize > max {
            return Err(WireError::MessageTooLarge {
                len: len as usize,
                max,
            });
        }
        let end = at + 1 + len as usize;
        if end > buf.len() {
            break;
        }
        visit(buf[at], &buf[at + 5..end]);
        at = end;
    }
    Ok(at)
}

pub mod encode {
    use super::*;
    pub fn error_response(
        buf: &mut BytesMut,
        severity: &str,
        code: &str,
        message: &str,
        detail: Option<&str>,
    ) {
        let start = buf.len();
        buf.put_u8(b'E');
        buf.put_i32(0);
        for (t, v) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            buf.put_u8(t);
            buf.put_slice(v.as_bytes());
            buf.put_u8(0);
        }
        if let Some(d) = detail {
            buf.put_u8(b'D');
            buf.put_slice(d.as_bytes());
            buf.put_u8(0);
        }
        buf.put_u8(0);
        let len = (buf.len() - start - 1) as i32;
        buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }
}
