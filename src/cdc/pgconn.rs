//! A small blocking PostgreSQL client on top of `wire`: startup and authentication, simple
//! queries, and the CopyBoth stream of a replication connection.
//!
//! Why blocking std::net and not the shard runtime: CDC holds one replication connection
//! and one checkpoint connection per stream, the work per byte is parsing and JSON encoding
//! (CPU, not waiting), and the StarRocks loader is blocking HTTP anyway. A dedicated thread
//! per stream keeps the source loop a plain loop with read timeouts as its only timer, and
//! keeps CDC off the proxy shards' cores' event loops entirely. Every read has a timeout and
//! every message a size limit.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::{Endpoint, PgUrl};
use crate::wire::{self, AuthProgress, BackendMessage, ClientAuth, encode};

/// Largest message accepted from the server (a row of a big TOAST value fits easily).
const MESSAGE_BYTES_MAX: usize = 1 << 30;
const READ_CHUNK_BYTES: usize = 256 << 10;

/// An error from PostgreSQL itself, with its SQLSTATE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("PostgreSQL error {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to PostgreSQL lost")]
    Io(#[source] std::io::Error),
    #[error("PostgreSQL closed the connection")]
    Closed,
    #[error("protocol error talking to PostgreSQL")]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("unexpected message {tag:?} from PostgreSQL while {during}", tag = *tag as char)]
    Unexpected { tag: u8, during: &'static str },
}

impl PgError {
    /// The SQLSTATE: the server's when it reported the error, 08P01 (protocol violation)
    /// when it sent a message that does not belong where it came.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server(e) => Some(&e.code),
            PgError::Unexpected { .. } => Some(wire::sqlstate::PROTOCOL_VIOLATION),
            _ => None,
        }
    }
}

/// One row of a simple-query result, text format.
pub type Row = Vec<Option<String>>;

pub struct PgConn {
    /// TCP or Unix-domain, whichever the URL names (see [`PgUrl::endpoint`]).
    stream: Socket,
    /// TLS over `stream` when the URL's `sslmode` asked for it and the server agreed.
    tls: Option<rustls::ClientConnection>,
    inbuf: BytesMut,
    out: BytesMut,
    /// What rustls decrypts into (TLS only; allocated at the first read).
    chunk: Vec<u8>,
    /// See [`PgConn::coalesce_reads`]; zero: every read(2) at once.
    coalesce: std::time::Duration,
    /// The last read(2) returned less than [`COALESCE_BELOW`] bytes.
    last_small: bool,
}

/// A read(2) that returns less than this caught up with the server (see
/// [`PgConn::coalesce_reads`]).
const COALESCE_BELOW: usize = 32 << 10;

impl PgConn {
    /// Connects and authenticates. `replication` adds `replication=database` so the
    /// connection accepts replication commands as well as SQL.
    pub fn connect(url: &PgUrl, replication: bool, timeout: Duration) -> Result<PgConn, PgError> {
        let addr = url.address();
        let connect_err = |source| PgError::Connect {
            addr: addr.clone(),
            source,
        };
        let stream = open_socket(url, timeout, connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(PgError::Io)?;
        let mut stream = stream;
        // CDC's own thread, a connection at start and per reconnect: reading the certificate
        // files here costs no shard anything.
        let tls = crate::tls::Upstream::try_from(url)
            .map_err(|e| connect_err(std::io::Error::other(e)))?
            .negotiate_blocking(&mut stream)
            .map_err(connect_err)?;
        let mut conn = PgConn {
            stream,
            tls,
            inbuf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            coalesce: std::time::Duration::ZERO,
            last_small: false,
            out: BytesMut::new(),
            chunk: Vec::new(),
        };
        conn.start_up(url, replication)?;
        Ok(conn)
    }

    /// Sends the startup message and answers authentication until the server is ready.
    fn start_up(&mut self, url: &PgUrl, replication: bool) -> Result<(), PgError> {
        let user = url.user.clone().unwrap_or_else(|| "postgres".into());
        let database = url.database.clone().unwrap_or_else(|| user.clone());
        let mut params = vec![
            ("user", user.as_str()),
            ("database", database.as_str()),
            ("application_name", "pgprism-cdc"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        encode::startup_message(&mut self.out, &params)?;
        self.flush()?;
        let mut auth = ClientAuth::new(user.clone(), url.password.clone().unwrap_or_default());
        loop {
            let frame = self.read_frame()?;
            match BackendMessage::decode(frame.tag(), frame.body())? {
                BackendMessage::Authentication(req) => {
                    let progress = auth.step(&req, &mut self.out)?;
                    if progress == AuthProgress::Reply {
                        self.flush()?;
                    }
                }
                BackendMessage::ErrorResponse(e) => return Err(server_error(&e)?.into()),
                BackendMessage::ReadyForQuery(_) => return Ok(()),
                _ => {}
            }
        }
    }

    /// Sets the read timeout used by [`PgConn::read_copy_data`] and queries.
    pub fn set_read_timeout(&self, timeout: Duration) -> Result<(), PgError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(PgError::Io)
    }

    /// Asks the kernel to wake a read only once `bytes` arrived (or the read timeout passed,
    /// which then returns whatever is there). The walsender writes each change as its own
    /// small segment; without this, a fast stream costs one wake-up and one recv per row.
    /// The read timeout bounds the added latency when the stream is slow.
    pub fn set_receive_low_water(&self, bytes: usize) -> Result<(), PgError> {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is a live socket owned by `self.stream`; the option value is a
        // c_int on our stack whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(PgError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PgError> {
        match &mut self.tls {
            Some(tls) => {
                let mut io = rustls::Stream::new(tls, &mut self.stream);
                io.write_all(&self.out).map_err(PgError::Io)?;
                io.flush().map_err(PgError::Io)?;
            }
            None => self.stream.write_all(&self.out).map_err(PgError::Io)?,
        }
        self.out.clear();
        Ok(())
    }

    /// Reads one whole message, waiting as long as the read timeout allows.
    fn read_frame(&mut self) -> Result<wire::Frame, PgError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().map_err(PgError::Io)?;
        }
    }

    fn try_frame(&mut self) -> Result<Option<wire::Frame>, PgError> {
        Ok(wire::split_message(&mut self.inbuf, MESSAGE_BYTES_MAX)?)
    }

    /// Lets the server's bytes pile up for `wait` before a read(2) that follows a small one
    /// (`cdc.snapshot-read-coalesce-us`, snapshot workers only). A snapshot worker parses
    /// rows faster than PostgreSQL writes them, so without it nearly every read(2) found one
    /// of PostgreSQL's 8 KiB writes and put the thread to sleep until the next: a wake-up per
    /// 8 KiB, about a quarter of the worker's CPU in the scheduler on this machine (perf).
    /// Waiting a little after a small read lets the kernel's socket buffer take the writes
    /// and one read(2) take many of them. Bounded: one `wait` per read, only after a read
    /// that returned less than 32 KiB; a read that returns more reads on at once.
    pub fn coalesce_reads(&mut self, wait: std::time::Duration) {
        self.coalesce = wait;
    }

    /// One read(2) into the input buffer. EOF becomes `UnexpectedEof`.
    ///
    /// Without TLS the kernel writes straight into the input buffer's spare room: a
    /// snapshot receives every row of every table here, and a read into `chunk` and a copy
    /// from it was a second pass over all of those bytes.
    fn fill(&mut self) -> std::io::Result<()> {
        let n = match &mut self.tls {
            Some(tls) => {
                if self.chunk.is_empty() {
                    self.chunk.resize(READ_CHUNK_BYTES, 0);
                }
                let n = rustls::Stream::new(tls, &mut self.stream).read(&mut self.chunk)?;
                self.inbuf.extend_from_slice(&self.chunk[..n]);
                n
            }
            None => {
                if self.last_small && !self.coalesce.is_zero() {
                    std::thread::sleep(self.coalesce);
                }
                self.inbuf.reserve(READ_CHUNK_BYTES);
                let len = self.inbuf.len();
                let n = self.stream.recv(self.inbuf.spare_capacity_mut())?;
                assert!(n <= self.inbuf.capacity() - len, "recv past its buffer");
                // SAFETY: recv(2) initialized the first `n` bytes of the spare capacity it
                // was given (and reports no more than it was given, asserted above).
                unsafe { self.inbuf.set_len(len + n) };
                self.last_small = n < COALESCE_BELOW;
                n
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Runs SQL (possibly several statements) and returns the rows of all results.
    pub fn query(&mut self, sql: &str) -> Result<Vec<Row>, PgError> {
        let mut rows = Vec::new();
        self.query_each(sql, |values| {
            rows.push(
                values
                    .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                    .collect(),
            )
        })?;
        Ok(rows)
    }

    /// Runs one query and hands each row's values to `each` as views over the receive buffer
    /// (no per-value allocation: the snapshot reads millions of rows this way). Returns the
    /// number of rows.
    pub fn query_each(
        &mut self,
        sql: &str,
        mut each: impl FnMut(wire::ValuesIter<'_>),
    ) -> Result<u64, PgError> {
        self.query_sets(sql, |_, row| each(row))
    }

    /// [`query_each`](Self::query_each) for several statements in one round trip: `each`
    /// also gets the number of the result the row belongs to (each statement that returns
    /// rows starts one, from 0, even when it returns none).
    pub fn query_sets(
        &mut self,
        sql: &str,
        each: impl FnMut(usize, wire::ValuesIter<'_>),
    ) -> Result<u64, PgError> {
        self.query_sets_copy(sql, each, None::<fn(&[u8])>)
    }

    /// [`query_sets`](Self::query_sets) where a statement may be `COPY ... TO STDOUT`: each
    /// CopyData payload (one row: the server sends one message per row) goes to `copy` as a
    /// view over the receive buffer; its rows are counted too. Without `copy`, a COPY OUT is
    /// a protocol error.
    pub fn query_sets_copy(
        &mut self,
        sql: &str,
        mut each: impl FnMut(usize, wire::ValuesIter<'_>),
        mut copy: Option<impl FnMut(&[u8])>,
    ) -> Result<u64, PgError> {
        encode::query(&mut self.out, sql)?;
        self.flush()?;
        let mut rows = 0u64;
        let mut set = None::<usize>;
        let mut failure = None;
        // Between a CopyOutResponse and the end of its data: CopyData belongs only there.
        let mut copying = false;
        loop {
            if copying && let Some(copy) = copy.as_mut() {
                rows += self.drain_copy_data(copy);
            }
            let frame = self.read_frame()?;
            if frame.tag() == wire::tag::COPY_DATA {
                let Some(copy) = copy.as_mut().filter(|_| copying) else {
                    return Err(PgError::Unexpected {
                        tag: frame.tag(),
                        during: "a simple query, outside a COPY TO STDOUT",
                    });
                };
                rows += 1;
                copy(frame.body());
                continue;
            }
            match BackendMessage::decode(frame.tag(), frame.body())? {
                BackendMessage::CopyDone | BackendMessage::CommandComplete(_) => copying = false,
                BackendMessage::RowDescription(_) => set = Some(set.map_or(0, |s| s + 1)),
                BackendMessage::DataRow(row) => {
                    rows += 1;
                    each(set.unwrap_or(0), row.columns()?.iter());
                }
                BackendMessage::ErrorResponse(e) => {
                    copying = false;
                    failure = Some(server_error(&e)?);
                }
                BackendMessage::ReadyForQuery(_) => {
                    return match failure {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    };
                }
                BackendMessage::CopyOutResponse(_) if copy.is_some() => copying = true,
                BackendMessage::CopyBothResponse(_) | BackendMessage::CopyOutResponse(_) => {
                    return Err(PgError::Unexpected {
                        tag: frame.tag(),
                        during: "a simple query",
                    });
                }
                _ => {}
            }
        }
    }

    /// Hands the complete CopyData messages at the head of the input buffer to `copy`,
    /// without splitting each off as a frame of its own (an allocation and a reference count
    /// per row of a COPY); stops at anything else, which the general path then reads (a
    /// header it must refuse included). Returns the messages handed over.
    fn drain_copy_data(&mut self, copy: &mut impl FnMut(&[u8])) -> u64 {
        use bytes::Buf;
        let (mut consumed, mut n) = (0usize, 0u64);
        while let Some(h) = self.inbuf.get(consumed..consumed + wire::HEADER_BYTES) {
            if h[0] != wire::tag::COPY_DATA {
                break;
            }
            let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
            let Ok(len) = usize::try_from(len) else {
                break;
            };
            if !(4..=MESSAGE_BYTES_MAX).contains(&len) {
                break;
            }
            let end = consumed + 1 + len;
            let Some(body) = self.inbuf.get(consumed + wire::HEADER_BYTES..end) else {
                break;
            };
            copy(body);
            n += 1;
            consumed = end;
        }
        self.inbuf.advance(consumed);
        n
    }

    /// Sends a command that answers with CopyBothResponse (START_REPLICATION).
    pub fn start_copy_both(&mut self, sql: &str) -> Result<(), PgError> {
        encode::query(&mut self.out, sql)?;
        self.flush()?;
        loop {
            let frame = self.read_frame()?;
            match BackendMessage::decode(frame.tag(), frame.body())? {
                BackendMessage::CopyBothResponse(_) => return Ok(()),
                BackendMessage::ErrorResponse(e) => {
                    let err = server_error(&e)?;
                    // Drain to ReadyForQuery so the error is the whole story.
                    return Err(err.into());
                }
                BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus(_) => {}
                _ => {
                    return Err(PgError::Unexpected {
                        tag: frame.tag(),
                        during: "START_REPLICATION",
                    });
                }
            }
        }
    }

    /// Next CopyData payload in the replication stream. `Ok(None)` when the read timeout
    /// passed with nothing complete (the caller runs its timers), or the server ended the copy.
    /// The payload shares the connection buffer (no copy).
    pub fn read_copy_data(&mut self) -> Result<Option<Bytes>, PgError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                match frame.tag() {
                    wire::tag::COPY_DATA => {
                        let mut bytes = frame.into_bytes();
                        let _ = bytes.split_to(wire::HEADER_BYTES);
                        return Ok(Some(bytes));
                    }
                    wire::tag::ERROR_RESPONSE => {
                        let msg = BackendMessage::decode(frame.tag(), frame.body())?;
                        if let BackendMessage::ErrorResponse(e) = msg {
                            return Err(server_error(&e)?.into());
                        }
                    }
                    wire::tag::COPY_DONE => return Err(PgError::Closed),
                    // Notices and parameter changes may arrive at any time.
                    _ => continue,
                }
            }
            match self.fill() {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(PgError::Closed);
                }
                Err(e) => return Err(PgError::Io(e)),
            }
        }
    }

    /// Sends one CopyData message (a standby status update).
    pub fn send_copy_data(&mut self, data: &[u8]) -> Result<(), PgError> {
        encode::copy_data(&mut self.out, data)?;
        self.flush()
    }
}

/// A connected socket to the URL's endpoint, TCP or Unix-domain; errors go through
/// `connect_err`.
fn open_socket(
    url: &PgUrl,
    timeout: Duration,
    connect_err: impl Fn(std::io::Error) -> PgError,
) -> Result<Socket, PgError> {
    Ok(match url.endpoint().map_err(&connect_err)? {
        Endpoint::Tcp(sock) => {
            let domain = Domain::for_address(sock);
            let stream = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))
                .map_err(&connect_err)?;
            stream
                .connect_timeout(&sock.into(), timeout)
                .map_err(&connect_err)?;
            let _ = stream.set_tcp_nodelay(true);
            stream
        }
        Endpoint::Unix(path) => {
            let stream =
                Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(&connect_err)?;
            let sock = SockAddr::unix(&path).map_err(&connect_err)?;
            // A blocking connect: a Unix socket with a full backlog makes it wait (up to
            // the send timeout), where a non-blocking one would say EAGAIN and never
            // complete.
            stream
                .set_write_timeout(Some(timeout))
                .map_err(&connect_err)?;
            stream.connect(&sock).map_err(&connect_err)?;
            stream.set_write_timeout(None).map_err(&connect_err)?;
            stream
        }
    })
}

fn server_error(e: &wire::ErrorNotice<'_>) -> Result<ServerError, PgError> {
    let f = e.parse()?;
    Ok(ServerError {
        code: f.code.unwrap_or("XX000").to_string(),
        message: f.message.unwrap_or("").to_string(),
        detail: f.detail.map(str::to_string),
    })
}

/// Quotes an SQL identifier (`"name"`, doubling inner quotes).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'text'`, doubling inner quotes).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose server has already sent `answer` (the bytes, as read off the
    /// socket): what the client writes goes to the other end of a socket pair, unread.
    fn answered(answer: &[u8]) -> (PgConn, Socket) {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut inbuf = BytesMut::new();
        inbuf.extend_from_slice(answer);
        let conn = PgConn {
            stream: ours,
            tls: None,
            inbuf,
            out: BytesMut::new(),
            chunk: vec![0; 64],
            coalesce: Duration::ZERO,
            last_small: false,
        };
        (conn, theirs)
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn copy_query(answer: &[u8]) -> (Result<u64, PgError>, Vec<Vec<u8>>) {
        let (mut conn, _server) = answered(answer);
        let mut rows = Vec::new();
        let result = conn.query_sets_copy(
            "COPY t TO STDOUT",
            |_, _| {},
            Some(|row: &[u8]| rows.push(row.to_vec())),
        );
        (result, rows)
    }

    #[test]
    fn copy_data_is_read_only_after_a_copy_out_response() {
        let copy_out = message(b'H', &[0, 0, 0]);
        let done = [
            message(b'c', &[]),
            message(b'C', b"COPY 2\0"),
            message(b'Z', b"I"),
        ]
        .concat();
        let rows = [message(b'd', b"1\n"), message(b'd', b"2\n")].concat();
        let (result, got) = copy_query(&[&copy_out[..], &rows, &done].concat());
        assert_eq!(result.unwrap(), 2);
        assert_eq!(got, [b"1\n".to_vec(), b"2\n".to_vec()]);
        // CopyData before the CopyOutResponse (or after the COPY ended): a protocol
        // violation, none of it handed over.
        for answer in [
            [&rows[..], &copy_out, &done].concat(),
            [
                &copy_out[..],
                &done[..done.len() - 6],
                &rows,
                &message(b'Z', b"I"),
            ]
            .concat(),
        ] {
            let (result, got) = copy_query(&answer);
            let err = result.unwrap_err();
            assert!(
                matches!(err, PgError::Unexpected { tag: b'd', .. }),
                "{err:?}"
            );
            assert_eq!(err.code(), Some("08P01"));
            assert!(got.is_empty(), "{got:?}");
        }
    }
}
