//! The untagged first packet of a connection: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest. Parses a packet already split off by `split_startup`; never reads sockets
//! and never decides policy (whether to accept SSL is the proxy's call).

use super::cursor::Cursor;
use super::error::WireError;

/// Protocol 3.0 as sent in a StartupMessage (major << 16 | minor).
pub const PROTOCOL_3_0: u32 = 196_608;
/// Request code of SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// A decoded startup-phase packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupPacket {
    /// StartupMessage. Params are kept in the order sent; owned, because the session keeps
    /// them for its whole life and this runs once per connection.
    Startup {
        protocol: u32,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    /// CancelRequest with a protocol 3.0 (4-byte) secret key.
    Cancel {
        pid: i32,
        secret: i32,
    },
}

impl StartupPacket {
    /// Parses a whole packet, length field included, as returned by `split_startup`.
    pub fn parse(packet: &[u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(packet, "startup packet");
        let len = cur.i32()?;
        if usize::try_from(len).ok() != Some(packet.len()) {
            return Err(WireError::InvalidValue {
                what: "startup packet length",
                value: i64::from(len),
            });
        }
        let code = cur.u32()?;
        match code {
            SSL_REQUEST_CODE => {
                cur.finish()?;
                Ok(Self::SslRequest)
            }
            GSSENC_REQUEST_CODE => {
                cur.finish()?;
                Ok(Self::GssEncRequest)
            }
            CANCEL_REQUEST_CODE => {
                let mut cur = Cursor::new(cur.rest(), "CancelRequest");
                let pid = cur.i32()?;
                let secret = cur.i32()?;
                cur.finish()?;
                Ok(Self::Cancel { pid, secret })
            }
            protocol => {
                let (major, minor) = ((protocol >> 16) as u16, protocol as u16);
                // Minor versions above 0 are negotiated down by the server
                // (NegotiateProtocolVersion), so only the major version is a hard error.
                if major != 3 {
                    return Err(WireError::UnsupportedProtocol { major, minor });
                }
                let params = parse_params(Cursor::new(cur.rest(), "StartupMessage"))?;
                if !params.iter().any(|(name, _)| name == "user") {
                    return Err(WireError::MissingUser);
                }
                Ok(Self::Startup { protocol, params })
            }
        }
    }

    /// The value of a StartupMessage parameter, if this is one and the parameter is set.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Self::Startup { params, .. } => params
                .iter()
                .rev() // a repeated name: the last one wins, as in PostgreSQL
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Name/value C-string pairs ending with an empty name. PostgreSQL takes any bytes here (a
/// client in a Latin-1 locale sends its application name or role that way), so bytes that are
/// not UTF-8 are accepted, read as U+FFFD. The packet itself is relayed to the primary
/// verbatim; these decoded values serve pgprism's own sessions (mirrors, shadow) and logs.
fn parse_params(mut cur: Cursor<'_>) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        let name = cur.cstr_bytes()?;
        if name.is_empty() {
            cur.finish()?;
            return Ok(params);
        }
        let value = cur.cstr_bytes()?;
        params.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&((8 + rest.len()) as i32).to_be_bytes());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn parses_startup_message() {
        let p = packet(PROTOCOL_3_0, b"user\0alice\0database\0db\0\0");
        let parsed = StartupPacket::parse(&p).unwrap();
        assert_eq!(parsed.param("user"), Some("alice"));
        assert_eq!(parsed.param("database"), Some("db"));
        assert_eq!(parsed.param("nope"), None);
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            StartupPacket::parse(&packet(SSL_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            StartupPacket::parse(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::GssEncRequest
        );
        let p = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe]);
        assert_eq!(
            StartupPacket::parse(&p).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: -2 }
        );
        assert!(StartupPacket::parse(&packet(SSL_REQUEST_CODE, b"x")).is_err());
        assert!(StartupPacket::parse(&packet(CANCEL_REQUEST_CODE, &[0; 7])).is_err());
    }

    #[test]
    fn rejects_bad_startup_messages() {
        let cases: [&[u8]; 3] = [
            b"database\0db\0\0", // no user
            b"user\0alice\0",    // no final terminator
            b"user\0ali",        // unterminated value
        ];
        for rest in cases {
            assert!(
                StartupPacket::parse(&packet(PROTOCOL_3_0, rest)).is_err(),
                "{rest:?}"
            );
        }
        // Bytes that are not UTF-8 are PostgreSQL's to judge (it takes them): accepted.
        let latin1 = StartupPacket::parse(&packet(
            PROTOCOL_3_0,
            b"user\0alice\0application_name\0caf\xe9\0\0",
        ))
        .unwrap();
        assert_eq!(latin1.param("application_name"), Some("caf\u{fffd}"));
        let err = StartupPacket::parse(&packet(2 << 16, b"user\0a\0\0")).unwrap_err();
        assert!(matches!(
            err,
            WireError::UnsupportedProtocol { major: 2, minor: 0 }
        ));
        // Length field disagreeing with the packet.
        let mut p = packet(PROTOCOL_3_0, b"user\0a\0\0");
        p.push(0);
        assert!(StartupPacket::parse(&p).is_err());
        assert!(StartupPacket::parse(&[0, 0]).is_err());
    }
}
