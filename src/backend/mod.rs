//! Connections pgprism opens and authenticates itself (mirrors, shadows, EXPLAIN, and the
//! pooled primary connections of transaction mode): startup, client-side authentication
//! with the configured credentials or with what a client's own authentication left
//! ([`ServerLogin`]), and waiting for the first ReadyForQuery. Client sessions relayed in
//! session mode only use [`connect`]: their authentication is relayed from the client.

pub mod cancel;
pub mod pool;
pub mod replay;

use std::time::Duration;

use bytes::BytesMut;

use crate::config::Endpoint;
use crate::exec::net::Stream;
use crate::exec::within;
use crate::wire::{self, AuthProgress, AuthRequest, ClientAuth, ServerLogin, tag};

/// ParameterStatus messages kept from one startup. PostgreSQL sends about 15; a server
/// sending more than this is broken or hostile.
const PARAMETER_STATUS_MAX: usize = 256;

/// A session opened by [`open_as`], with what the server said during startup.
pub struct Opened {
    pub stream: Stream,
    /// ParameterStatus (name, value) in the order the server sent them.
    pub params: Vec<(String, String)>,
    /// BackendKeyData (process id, secret key), for cancelling.
    pub key: Option<(i32, i32)>,
    /// Bytes read after ReadyForQuery (normally empty: the server says nothing more until
    /// asked).
    pub leftover: BytesMut,
}

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
/// `password`, wait for ReadyForQuery. Everything within `limit`. The key it returns is for
/// cancelling what the session runs.
pub async fn open(
    addr: &Endpoint,
    limit: Duration,
    params: &[(&str, &str)],
    user: &str,
    password: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<Opened, BackendError> {
    let login = ServerLogin::Password(password.to_owned());
    open_as(addr, limit, params, &login, user, message_bytes_max, tls).await
}

/// Opens a session as [`open`] does, authenticating as `user` with `login` (a password, a
/// stored MD5 hash, SCRAM keys or nothing), and keeps what the server said during startup.
/// `params` must include `user`.
pub async fn open_as(
    addr: &Endpoint,
    limit: Duration,
    params: &[(&str, &str)],
    login: &ServerLogin,
    user: &str,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<Opened, BackendError> {
    let limit_ms = limit.as_millis() as u64;
    let auth = ClientAuth::with_login(user, login.clone());
    match within(
        limit,
        handshake(addr, limit, params, auth, message_bytes_max, tls),
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
    mut auth: ClientAuth,
    message_bytes_max: usize,
    tls: &crate::tls::Upstream,
) -> Result<Opened, BackendError> {
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
    let mut buf = BytesMut::new();
    let mut server_params = Vec::new();
    let mut key = None;
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
            tag::PARAMETER_STATUS => {
                if server_params.len() == PARAMETER_STATUS_MAX {
                    return Err(protocol(wire::WireError::TooManyItems {
                        what: "ParameterStatus messages during startup",
                        count: PARAMETER_STATUS_MAX + 1,
                    }));
                }
                let (name, value) = wire::ParameterStatus::new(frame.body())
                    .parts()
                    .map_err(protocol)?;
                server_params.push((name.to_owned(), value.to_owned()));
            }
            tag::BACKEND_KEY_DATA => {
                let data = wire::BackendKeyData::new(frame.body());
                key = Some((
                    data.pid().map_err(protocol)?,
                    data.secret().map_err(protocol)?,
                ));
            }
            tag::READY_FOR_QUERY => {
                // A server that lets us in without the exchange it started (or with none
                // while we hold a secret: trust) is fine; one that skips AuthenticationOk
                // is not talking PostgreSQL.
                if !auth.is_authenticated() {
                    return Err(protocol(wire::WireError::AuthOutOfOrder {
                        what: "ReadyForQuery before AuthenticationOk",
                    }));
                }
                return Ok(Opened {
                    stream,
                    params: server_params,
                    key,
                    leftover: buf,
                });
            }
            // NoticeResponse, NegotiateProtocolVersion.
            _ => {}
        }
    }
}
