//! Connections pgprism opens and authenticates itself (mirrors, shadows, EXPLAIN): startup,
//! client-side authentication with the configured credentials, and waiting for the first
//! ReadyForQuery. Client sessions to the primary only use [`connect`]: their authentication
//! is relayed from the client.

use std::time::Duration;

use bytes::BytesMut;

use crate::config::Endpoint;
use crate::exec::net::Stream;
use crate::exec::within;
use crate::wire::{self, AuthProgress, AuthRequest, ClientAuth, tag};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not complete startup within {limit_ms} ms")]
    Timeout { addr: Endpoint, limit_ms: u64 },
    #[error("{addr} closed the connection during startup")]
    Closed { addr: Endpoint },
    #[error("{addr} refused the session: {code} {message}")]
    Refused {
        addr: Endpoint,
        code: String,
        message: String,
    },
    #[error("TLS settings for {addr}: {message}")]
    Tls { addr: Endpoint, message: String },
    #[error("protocol error talking to {addr}")]
    Protocol {
        addr: Endpoint,
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

/// Connects to a backend over TCP (with TCP_NODELAY: protocol messages are small and latency
/// is the point) or over its Unix socket, failing with `TimedOut` after `limit`.
pub async fn connect(addr: &Endpoint, limit: Duration) -> std::io::Result<Stream> {
    match addr {
        Endpoint::Tcp(addr) => {
            let stream = Stream::connect(*addr, limit).await?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Endpoint::Unix(path) => Stream::connect_unix(path, limit).await,
    }
}

/// Opens a session: connect, StartupMessage with `params`, authenticate as `user` with
/// `password`, wait for ReadyForQuery. Everything within `limit`.
pub async fn open(
    addr: &Endpoint,
    limit: Duration,
    params: &[(&str, &str)],
    user: &str,
    password: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<Stream, BackendError> {
    let limit_ms = limit.as_millis() as u64;
    match within(
        limit,
        handshake(addr, limit, params, user, password, message_bytes_max, tls),
    )
    .await
    {
        Some(result) => result,
        None => Err(BackendError::Timeout {
            addr: addr.clone(),
            limit_ms,
        }),
    }
}

async fn handshake(
    addr: &Endpoint,
    limit: Duration,
    params: &[(&str, &str)],
    user: &str,
    password: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<Stream, BackendError> {
    let protocol = |source| BackendError::Protocol {
        addr: addr.clone(),
        source,
    };
    let io = |source| BackendError::Connect {
        addr: addr.clone(),
        source,
    };
    let mut stream = connect(addr, limit).await.map_err(io)?;
    tls.negotiate(&mut stream).await.map_err(io)?;
    let mut out = BytesMut::new();
    wire::encode::startup_message(&mut out, params).map_err(protocol)?;
    stream.write_all(&out).await.map_err(io)?;
    let mut auth = ClientAuth::new(user, password);
    let mut buf = BytesMut::new();
    loop {
        let frame = match wire::split_message(&mut buf, message_bytes_max).map_err(protocol)? {
            Some(frame) => frame,
            None => {
                if stream.read_buf(&mut buf, 8192).await.map_err(io)? == 0 {
                    return Err(BackendError::Closed { addr: addr.clone() });
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
                    addr: addr.clone(),
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
