//! A small PostgreSQL client on the shard runtime: startup, authentication (trust, cleartext,
//! MD5, SCRAM-SHA-256 through [`wire::ClientAuth`]), simple queries and the extended protocol
//! with text parameters. `pgprism bench` drives it; it is kept general so other features that
//! need their own backend connections can reuse it.
//!
//! It owns one socket and its two buffers. It must never block the shard (name resolution is
//! done beforehand by [`ConnectParams::resolve`], off the shard), never panic on bytes from the
//! server, and never leave a response half read: every request is read through to its
//! ReadyForQuery, so after any `Ok` or [`ClientError::Server`] the connection is ready for the
//! next request. Any other error means the connection is unusable and should be dropped.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::BytesMut;

use crate::config::{Endpoint, PgUrl};
use crate::exec::{self, net::Stream};
use crate::wire::{
    self, AuthProgress, BackendMessage, ClientAuth, ErrorNotice, Frame, TransactionStatus,
    WireError, encode,
};

/// Largest message accepted from the server. PostgreSQL's own allocation limit is 1 GB;
/// benchmark results are far smaller, so a lower bound keeps a broken peer from making us
/// buffer a gigabyte.
const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Bytes asked for per read when the size of the next message is not known yet.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// Bound on the messages accepted between StartupMessage and the first ReadyForQuery
/// (ParameterStatus, notices, SASL steps): a server that never finishes startup is an error.
const STARTUP_MESSAGES_MAX: usize = 1024;

/// Everything needed to open a connection, with the host already resolved.
#[derive(Clone)]
pub struct ConnectParams {
    pub addr: Endpoint,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub application_name: String,
    /// Bound on TCP connect plus startup and authentication.
    pub connect_timeout: Duration,
}

impl fmt::Debug for ConnectParams {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl ConnectParams {
    /// Resolves `url`'s host with the system resolver (a socket directory needs none). This
    /// blocks: call it before entering a shard. A URL without a user connects as `$USER` (as
    /// libpq does), and without a database to the database named like the user.
    pub fn resolve(url: &PgUrl) -> Result<ConnectParams, ClientError> {
        let addr = url.endpoint().map_err(|source| ClientError::Resolve {
            address: url.address(),
            source,
        })?;
        let user = url
            .user
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_string());
        Ok(ConnectParams {
            addr,
            database: url.database.clone().unwrap_or_else(|| user.clone()),
            user,
            password: url.password.clone(),
            application_name: "pgprism".to_string(),
            connect_timeout: Duration::from_secs(10),
        })
    }
}

/// An error the server reported in an ErrorResponse. The connection survives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// The SQLSTATE (`42P01`, ...); empty if the server sent none.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    fn from_notice(notice: &ErrorNotice<'_>) -> Result<ServerError, WireError> {
        let fields = notice.parse()?;
        let owned = |v: Option<&str>| v.map(str::to_string);
        Ok(ServerError {
            severity: fields
                .severity_nonlocalized
                .or(fields.severity)
                .unwrap_or("ERROR")
                .to_string(),
            code: fields.code.unwrap_or_default().to_string(),
            message: fields.message.unwrap_or_default().to_string(),
            detail: owned(fields.detail),
            hint: owned(fields.hint),
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// An error from [`PgConnection`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot resolve {address}")]
    Resolve {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: Endpoint },
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("protocol error")]
    Wire(#[from] WireError),
    #[error("unexpected message {tag:?} from the server during {during}")]
    Unexpected { tag: char, during: &'static str },
    /// An ErrorResponse. After startup this leaves the connection usable.
    #[error("the server reported an error")]
    Server(#[source] Box<ServerError>),
}

impl ClientError {
    /// The server's error, when that is what this is; the connection is then still usable
    /// (except during startup, where any error ends the connection).
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ClientError::Server(err) => Some(err),
            _ => None,
        }
    }
}

/// What one request produced, summed over the statements it ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// DataRow messages received.
    pub rows_returned: u64,
    /// Sum of the counts in the command tags (`INSERT 0 5` → 5; `SELECT 3` counts too).
    pub rows_affected: u64,
    /// CommandComplete messages received.
    pub commands: u64,
}

/// One authenticated connection, ready for queries.
pub struct PgConnection {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    status: TransactionStatus,
    parameters: Vec<(String, String)>,
    backend_pid: Option<i32>,
}

impl PgConnection {
    /// Connects, authenticates and waits for the first ReadyForQuery, all within
    /// `params.connect_timeout`.
    pub async fn connect(params: &ConnectParams) -> Result<PgConnection, ClientError> {
        let addr = params.addr.clone();
        exec::within(params.connect_timeout, Self::connect_unbounded(params))
            .await
            .unwrap_or(Err(ClientError::ConnectTimeout { addr }))
    }

    async fn connect_unbounded(params: &ConnectParams) -> Result<PgConnection, ClientError> {
        let mut conn = PgConnection {
            stream: Self::open_stream(params).await?,
            read: BytesMut::with_capacity(READ_CHUNK_BYTES),
            write: BytesMut::with_capacity(1024),
            status: TransactionStatus::Idle,
            parameters: Vec::new(),
            backend_pid: None,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    /// Opens the TCP or Unix socket to `params.addr`.
    async fn open_stream(params: &ConnectParams) -> Result<Stream, ClientError> {
        let addr = &params.addr;
        let connected = match addr {
            Endpoint::Tcp(tcp) => Stream::connect(*tcp, params.connect_timeout).await,
            Endpoint::Unix(path) => Stream::connect_unix(path, params.connect_timeout).await,
        };
        let stream = connected.map_err(|source| match source.kind() {
            io::ErrorKind::TimedOut => ClientError::ConnectTimeout { addr: addr.clone() },
            _ => ClientError::Connect {
                addr: addr.clone(),
                source,
            },
        })?;
        // Requests are small and latency is the point: never let Nagle hold one back (a
        // no-op on a Unix socket).
        stream
            .set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        Ok(stream)
    }

    /// Sends the StartupMessage, authenticates and reads up to the first ReadyForQuery.
    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ClientError> {
        encode::startup_message(
            &mut self.write,
            &[
                ("user", &params.user),
                ("database", &params.database),
                ("application_name", &params.application_name),
            ],
        )?;
        self.flush().await?;
        let mut auth = ClientAuth::new(
            params.user.clone(),
            params.password.clone().unwrap_or_default(),
        );
        for _ in 0..STARTUP_MESSAGES_MAX {
            let frame = self.read_frame().await?;
            match BackendMessage::decode(frame.tag(), frame.body())? {
                BackendMessage::Authentication(request) => {
                    if auth.step(&request, &mut self.write)? == AuthProgress::Reply {
                        self.flush().await?;
                    }
                }
                BackendMessage::ParameterStatus(status) => {
                    let (name, value) = status.parts()?;
                    self.parameters.push((name.to_string(), value.to_string()));
                }
                BackendMessage::BackendKeyData(key) => self.backend_pid = Some(key.pid()?),
                BackendMessage::ErrorResponse(notice) => {
                    return Err(ClientError::Server(Box::new(ServerError::from_notice(
                        &notice,
                    )?)));
                }
                BackendMessage::ReadyForQuery(ready) if auth.is_authenticated() => {
                    self.status = ready.status()?;
                    return Ok(());
                }
                // We asked for protocol 3.0 and no options; a server may still say what it
                // supports, which changes nothing for us.
                BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion(_) => {
                }
                _ => return Err(unexpected(&frame, "startup")),
            }
        }
        Err(ClientError::Unexpected {
            tag: '?',
            during: "startup (too many messages before ReadyForQuery)",
        })
    }

    /// Transaction status from the last ReadyForQuery.
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// A server parameter reported at startup or since (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The backend's process id, from BackendKeyData.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Runs `sql` (one or more statements) with the simple query protocol.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Completion, ClientError> {
        encode::query(&mut self.write, sql)?;
        self.flush().await?;
        self.read_until_ready("a simple query").await
    }

    /// Parses `sql` as the named prepared statement. `param_types` may be empty (or hold 0s)
    /// to let the server infer the types.
    pub async fn prepare(
        &mut self,
        name: &str,
        sql: &str,
        param_types: &[u32],
    ) -> Result<(), ClientError> {
        encode::parse(&mut self.write, name, sql, param_types)?;
        encode::sync(&mut self.write);
        self.flush().await?;
        self.read_until_ready("Parse").await.map(|_| ())
    }

    /// Binds text `params` (`None` is NULL) to a prepared statement, executes it with all rows
    /// returned in text, and syncs: one round trip.
    pub async fn execute_prepared(
        &mut self,
        name: &str,
        params: &[Option<&[u8]>],
    ) -> Result<Completion, ClientError> {
        // No format codes means text for every parameter and every result column.
        encode::bind(&mut self.write, "", name, &[], params, &[])?;
        encode::execute(&mut self.write, "", 0)?;
        encode::sync(&mut self.write);
        self.flush().await?;
        self.read_until_ready("Bind/Execute").await
    }

    /// Sends Terminate and closes the socket (best effort: the server may already be gone).
    pub async fn close(mut self) {
        encode::terminate(&mut self.write);
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        let result = self.stream.write_all(&self.write).await;
        self.write.clear();
        result.map_err(ClientError::Io)
    }

    async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(frame) = wire::split_message(&mut self.read, MESSAGE_BYTES_MAX)? {
                return Ok(frame);
            }
            let missing = wire::bytes_missing(&self.read, MESSAGE_BYTES_MAX)?;
            let n = self
                .stream
                .read_buf(&mut self.read, missing.max(READ_CHUNK_BYTES))
                .await
                .map_err(ClientError::Io)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Reads the response to one request through its ReadyForQuery. An ErrorResponse is kept
    /// and returned only once the connection is ready again.
    async fn read_until_ready(&mut self, during: &'static str) -> Result<Completion, ClientError> {
        let mut done = Completion::default();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match BackendMessage::decode(frame.tag(), frame.body())? {
                BackendMessage::DataRow(_) => done.rows_returned += 1,
                BackendMessage::CommandComplete(complete) => {
                    done.commands += 1;
                    done.rows_affected += complete.rows()?.unwrap_or(0);
                }
                BackendMessage::ErrorResponse(notice) => {
                    // The first error is the cause; later ones (none in practice) would only
                    // repeat it.
                    if error.is_none() {
                        error = Some(ServerError::from_notice(&notice)?);
                    }
                }
                BackendMessage::ReadyForQuery(ready) => {
                    self.status = ready.status()?;
                    break;
                }
                BackendMessage::ParameterStatus(status) => {
                    let (name, value) = status.parts()?;
                    self.parameters.push((name.to_string(), value.to_string()));
                }
                BackendMessage::CopyInResponse(_) => {
                    // COPY FROM STDIN has no data to send here: refuse it, the server answers
                    // with an ErrorResponse and ReadyForQuery.
                    encode::copy_fail(&mut self.write, "pgprism sends no COPY data")?;
                    self.flush().await?;
                }
                BackendMessage::RowDescription(_)
                | BackendMessage::EmptyQueryResponse
                | BackendMessage::NoticeResponse(_)
                | BackendMessage::NotificationResponse(_)
                | BackendMessage::ParseComplete
                | BackendMessage::BindComplete
                | BackendMessage::CloseComplete
                | BackendMessage::NoData
                | BackendMessage::ParameterDescription(_)
                | BackendMessage::PortalSuspended
                | BackendMessage::CopyOutResponse(_)
                | BackendMessage::CopyData(_)
                | BackendMessage::CopyDone => {}
                _ => return Err(unexpected(&frame, during)),
            }
        }
        match error {
            Some(err) => Err(ClientError::Server(Box::new(err))),
            None => Ok(done),
        }
    }
}

#[cold]
fn unexpected(frame: &Frame, during: &'static str) -> ClientError {
    ClientError::Unexpected {
        tag: frame.tag() as char,
        during,
    }
}
