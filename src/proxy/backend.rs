//! Connections pgprism opens and authenticates itself (mirrors, and later shadows): startup,
//! client-side authentication with the configured credentials, and waiting for the first
//! ReadyForQuery. Client sessions to the primary do not use this: their authentication is
//! relayed from the client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;

use crate::runtime::exec::net::TcpStream;
use crate::runtime::exec::within;
use crate::wire::{self, AuthProgress, AuthRequest, ClientAuth, tag};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not complete startup within {limit_ms} ms")]
    Timeout { addr: SocketAddr, limit_ms: u64 },
    #[error("{addr} closed the connection during startup")]
    Closed { addr: SocketAddr },
    #[error("{addr} refused the session: {code} {message}")]
    Refused {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    #[error("TLS settings for {addr}: {message}")]
    Tls { addr: SocketAddr, message: String },
    #[error("protocol error talking to {addr}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: wire::WireError,
    },
}

impl BackendError {
    /// SQLSTATE for counting: the server's own, or a connection-class one.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Refused { code, .. } => code,
            BackendError::Protocol { .. } => wire::sqlstate::PROTOCOL_VIOLATION,
            _ => wire::sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        }
    }
}

/// Opens a session: connect, StartupMessage with `params`, authenticate as `user` with
/// `password`, wait for ReadyForQuery. Everything within `limit`.
pub async fn open(
    addr: SocketAddr,
    limit: Duration,
    params: &[(&str, &str)],
    user: &str,
    password: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<TcpStream, BackendError> {
    let limit_ms = limit.as_millis() as u64;
    match within(
        limit,
        handshake(addr, limit, params, user, password, message_bytes_max, tls),
    )
    .await
    {
        Some(result) => result,
        None => Err(BackendError::Timeout { addr, limit_ms }),
    }
}

async fn handshake(
    addr: SocketAddr,
    limit: Duration,
    params: &[(&str, &str)],
    user: &str,
    password: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<TcpStream, BackendError> {
    let protocol = |source| BackendError::Protocol { addr, source };
    let mut stream = TcpStream::connect(addr, limit)
        .await
        .map_err(|source| BackendError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    tls.negotiate(&mut stream)
        .await
        .map_err(|source| BackendError::Connect { addr, source })?;
    let mut out = BytesMut::new();
    wire::encode::startup_message(&mut out, params).map_err(protocol)?;
    let io = |source| BackendError::Connect { addr, source };
    stream.write_all(&out).await.map_err(io)?;
    let mut auth = ClientAuth::new(user, password);
    let mut buf = BytesMut::new();
    loop {
        let frame = match wire::split_message(&mut buf, message_bytes_max).map_err(protocol)? {
            Some(frame) => frame,
            None => {
                if stream.read_buf(&mut buf, 8192).await.map_err(io)? == 0 {
                    return Err(BackendError::Closed { addr });
                }
                continue;
            }
        };
        match frame.tag() {
            tag::AUTHENTICATION => {
                let request = AuthRequest::parse(frame.body()).map_err(protocol)?;
                out.clear();
                if auth.step(&request, &mut out).map_err(protocol)? == AuthProgress::Reply {
                    stream.write_all(&out).await.map_err(io)?;
                }
            }
            tag::ERROR_RESPONSE => {
                let fields = wire::ErrorNotice::new(frame.body())
                    .parse()
                    .map_err(protocol)?;
                return Err(BackendError::Refused {
                    addr,
                    code: fields.code.unwrap_or("XX000").to_string(),
                    message: fields.message.unwrap_or("").to_string(),
                });
            }
            tag::READY_FOR_QUERY => return Ok(stream),
            // ParameterStatus, BackendKeyData, NoticeResponse, NegotiateProtocolVersion.
            _ => {}
        }
    }
}
