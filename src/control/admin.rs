//! A deliberately small HTTP/1.1 server for the admin endpoint: GET only (plus whatever
//! methods [`ExtraRoutes`] answer), one request per connection, bounded request size and read
//! time, optionally over TLS. Every request passes the access rule (`access`) before any
//! route sees it. It runs on its own thread so a slow scraper can never delay the control
//! loop, let alone a shard.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{AdminConfig, ConfigError, parse_addr};

use super::access::{Access, Verdict};
use super::{SharedState, lock, render};

/// Largest request head accepted; admin requests are one short line plus a few headers.
const REQUEST_BYTES_MAX: usize = 8 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The most one connection may take, TLS handshake, request and answer together: the thread
/// serves one connection at a time, so a peer trickling a byte per read timeout must not hold
/// it (and `/health`, and an upgrade's hand-over, which waits for this thread) for hours.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// A response produced by [`ExtraRoutes`].
pub struct RouteResponse {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Routes another subsystem adds to the endpoint (e.g. `pgprism embed`'s `/instances`),
/// called with the method and the path (query removed) before the built-in routes, for any
/// method; `None` falls through to them. Runs on the admin thread, so it may block briefly.
/// The access rule has been applied before: a route never sees an unauthorised request.
pub type ExtraRoutes = Arc<dyn Fn(&str, &str) -> Option<RouteResponse> + Send + Sync>;

/// Why the admin endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (admin.listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the admin endpoint's listening socket is unusable")]
    Socket(#[source] io::Error),
    #[error("cannot start the admin endpoint's thread")]
    Thread(#[source] io::Error),
}

pub struct AdminServer {
    pub addr: SocketAddr,
    /// A second descriptor of the listening socket, for an upgrade to hand over.
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `admin.listen` and serves there with the access rule of `cfg`; `None` when
    /// `admin.listen` is empty. `extra` is consulted before the built-in routes.
    pub fn start(
        cfg: &AdminConfig,
        state: SharedState,
        extra: Option<ExtraRoutes>,
    ) -> Result<Option<AdminServer>, AdminError> {
        if cfg.listen.is_empty() {
            return Ok(None);
        }
        let addr = parse_addr("admin.listen", &cfg.listen)?;
        // Token and certificates first: a refused configuration binds nothing.
        let access = Access::load(cfg, addr)?;
        let listener =
            TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
        AdminServer::serve_on(listener, access, state, extra).map(Some)
    }

    /// Serves on a listening socket made elsewhere (handed over by the process an upgrade
    /// replaces), with the access rule of `cfg`.
    pub fn start_on(
        listener: TcpListener,
        cfg: &AdminConfig,
        state: SharedState,
        extra: Option<ExtraRoutes>,
    ) -> Result<AdminServer, AdminError> {
        let addr = listener.local_addr().map_err(AdminError::Socket)?;
        let access = Access::load(cfg, addr)?;
        AdminServer::serve_on(listener, access, state, extra)
    }

    fn serve_on(
        listener: TcpListener,
        access: Access,
        state: SharedState,
        extra: Option<ExtraRoutes>,
    ) -> Result<AdminServer, AdminError> {
        let addr = listener.local_addr().map_err(AdminError::Socket)?;
        let wrap = |source| AdminError::Bind { addr, source };
        listener.set_nonblocking(true).map_err(wrap)?;
        let kept = listener.try_clone().map_err(wrap)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let endpoint = Endpoint {
                access,
                state,
                extra,
            };
            std::thread::Builder::new()
                .name("pgprism-admin".into())
                .spawn(move || serve(listener, endpoint, stop))
                .map_err(AdminError::Thread)?
        };
        Ok(AdminServer {
            addr,
            listener: kept,
            stop,
            thread: Some(thread),
        })
    }

    /// A new descriptor of the listening socket (for the hand-over of an upgrade).
    pub fn listener(&self) -> io::Result<TcpListener> {
        self.listener.try_clone()
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connection whose every read and write ends by `until` (each also within
/// [`IO_TIMEOUT`]).
struct Deadline {
    stream: TcpStream,
    until: Instant,
}

impl Deadline {
    fn remaining(&self) -> io::Result<Duration> {
        match self.until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left.min(IO_TIMEOUT)),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin connection past its deadline",
            )),
        }
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// What the admin thread answers with.
struct Endpoint {
    access: Access,
    state: SharedState,
    extra: Option<ExtraRoutes>,
}

fn serve(listener: TcpListener, endpoint: Endpoint, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(err) = endpoint.connection(stream) {
                    tracing::debug!(error = %err, "admin request failed");
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One parsed request head: what the routes and the access rule look at.
struct Request {
    method: String,
    path: String,
    authorization: Option<Vec<u8>>,
}

impl Endpoint {
    /// One request on one connection, over TLS when the endpoint has a certificate.
    fn connection(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let stream = Deadline {
            stream,
            until: Instant::now() + CONNECTION_DEADLINE,
        };
        match &self.access.tls {
            None => self.exchange(&mut { stream }),
            Some(config) => {
                let conn =
                    rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, stream);
                self.exchange(&mut tls)?;
                tls.conn.send_close_notify();
                tls.flush()
            }
        }
    }

    /// Reads the request head, applies the access rule, answers.
    fn exchange(&self, stream: &mut (impl Read + Write)) -> io::Result<()> {
        let request = match read_head(stream)? {
            Head::Request(request) => request,
            Head::TooLarge => {
                return respond(stream, 431, "text/plain", "request too large\n", &[]);
            }
            Head::Closed => return Ok(()),
        };
        match self
            .access
            .check(&request.method, request.authorization.as_deref())
        {
            Verdict::Allowed => self.route(stream, &request),
            Verdict::Unauthorized => {
                lock(&self.state).admin_unauthorized += 1;
                let challenge = if request.authorization.is_some() {
                    "Bearer realm=\"pgprism\", error=\"invalid_token\""
                } else {
                    "Bearer realm=\"pgprism\""
                };
                respond(
                    stream,
                    401,
                    "text/plain",
                    "a bearer token is required: send Authorization: Bearer <the token in admin.token-file>\n",
                    &[("WWW-Authenticate", challenge)],
                )
            }
            Verdict::NoTokenConfigured => {
                lock(&self.state).admin_forbidden += 1;
                respond(
                    stream,
                    403,
                    "text/plain",
                    "state-changing requests need a bearer token and none is configured: set \
                     admin.token-file and send Authorization: Bearer <token>\n",
                    &[],
                )
            }
        }
    }

    /// The extra routes first, then the built-in ones (GET only).
    fn route(&self, stream: &mut impl Write, request: &Request) -> io::Result<()> {
        let (method, path) = (request.method.as_str(), request.path.as_str());
        if let Some(response) = self.extra.as_ref().and_then(|routes| routes(method, path)) {
            return respond(
                stream,
                response.code,
                response.content_type,
                &response.body,
                &[],
            );
        }
        if method != "GET" {
            return respond(stream, 405, "text/plain", "only GET is supported\n", &[]);
        }
        let state = &self.state;
        match path {
            "/health" => {
                let draining = lock(state).draining;
                if draining {
                    respond(stream, 503, "text/plain", "draining\n", &[])
                } else {
                    respond(stream, 200, "text/plain", "ok\n", &[])
                }
            }
            "/metrics" => {
                let body = render::metrics(&lock(state));
                respond(stream, 200, "text/plain; version=0.0.4", &body, &[])
            }
            "/status" => {
                let body = render::status(&lock(state));
                respond(stream, 200, "application/json", &body, &[])
            }
            _ => respond(
                stream,
                404,
                "text/plain",
                "not found: try /metrics, /status, /health\n",
                &[],
            ),
        }
    }
}

/// What reading a request head gave.
enum Head {
    Request(Request),
    /// Longer than [`REQUEST_BYTES_MAX`].
    TooLarge,
    /// The peer closed before the head ended (a port probe): nothing to answer or count.
    Closed,
}

/// Reads up to the end of the head and parses the request line and `Authorization`.
fn read_head(stream: &mut impl Read) -> io::Result<Head> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > REQUEST_BYTES_MAX {
            return Ok(Head::TooLarge);
        }
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = String::from_utf8_lossy(lines.next().unwrap_or(&[])).into_owned();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("").to_string();
    let authorization = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let colon = l.iter().position(|&b| b == b':')?;
        let (name, value) = l.split_at(colon);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"authorization")
            .then(|| value[1..].trim_ascii().to_vec())
    });
    Ok(Head::Request(Request {
        method,
        path,
        authorization,
    }))
}

fn respond(
    stream: &mut impl Write,
    code: u16,
    content_type: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Head {
        read_head(&mut std::io::Cursor::new(bytes.to_vec())).expect("a cursor does not fail")
    }

    #[test]
    fn request_heads_parse_without_trusting_the_bytes() {
        let Head::Request(r) = parse(
            b"POST /cdc/pause?x=1 HTTP/1.1\r\nHost: a\r\nauthorization:  Bearer t0k \r\n\r\n",
        ) else {
            panic!("a request");
        };
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/cdc/pause"));
        assert_eq!(r.authorization.as_deref(), Some(&b"Bearer t0k"[..]));
        // A header named like it in the body is not one; headers end at the empty line.
        let Head::Request(r) = parse(b"GET / HTTP/1.1\r\nX: y\r\n\r\nAuthorization: Bearer z\r\n")
        else {
            panic!("a request");
        };
        assert_eq!(r.authorization, None);
        for junk in [
            &b"\r\n\r\n"[..],
            b"\xff\xfe \x00\r\n:\r\n\r\n",
            b"GET\r\nAuthorization\r\n: \r\n\r\n",
            b"GET / HTTP/1.1\nAuthorization:\n\n\r\n\r\n",
        ] {
            assert!(matches!(parse(junk), Head::Request(_)));
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Head::Closed));
        let long = [b'a'; REQUEST_BYTES_MAX + 10];
        assert!(matches!(parse(&long), Head::TooLarge));
    }
}
