//! A deliberately small HTTP/1.1 server for the admin endpoint: GET only (plus whatever
//! methods [`ExtraRoutes`] answer), one request per connection, bounded request size and read
//! time. It runs on its own thread so a slow scraper
//! can never delay the control loop, let alone a shard.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{SharedState, lock, render};

/// Largest request head accepted; admin requests are one short line plus a few headers.
const REQUEST_BYTES_MAX: usize = 8 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A response produced by [`ExtraRoutes`].
pub struct RouteResponse {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Routes another subsystem adds to the endpoint (e.g. `pgprism embed`'s `/instances`),
/// called with the method and the path (query removed) before the built-in routes, for any
/// method; `None` falls through to them. Runs on the admin thread, so it may block briefly.
pub type ExtraRoutes = Arc<dyn Fn(&str, &str) -> Option<RouteResponse> + Send + Sync>;

pub struct AdminServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    pub fn start(addr: SocketAddr, state: SharedState) -> io::Result<AdminServer> {
        AdminServer::start_with_routes(addr, state, None)
    }

    /// Like [`AdminServer::start`], consulting `extra` before the built-in routes.
    pub fn start_with_routes(
        addr: SocketAddr,
        state: SharedState,
        extra: Option<ExtraRoutes>,
    ) -> io::Result<AdminServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pgprism-admin".into())
                .spawn(move || serve(listener, state, extra, stop))?
        };
        Ok(AdminServer {
            addr,
            stop,
            thread: Some(thread),
        })
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

fn serve(
    listener: TcpListener,
    state: SharedState,
    extra: Option<ExtraRoutes>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(err) = handle(stream, &state, extra.as_ref()) {
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

fn handle(
    mut stream: TcpStream,
    state: &SharedState,
    extra: Option<&ExtraRoutes>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > REQUEST_BYTES_MAX {
            return respond(&mut stream, 431, "text/plain", "request too large\n");
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if let Some(response) = extra.and_then(|routes| routes(method, path)) {
        return respond(
            &mut stream,
            response.code,
            response.content_type,
            &response.body,
        );
    }
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET is supported\n");
    }
    match path {
        "/health" => {
            let draining = lock(state).draining;
            if draining {
                respond(&mut stream, 503, "text/plain", "draining\n")
            } else {
                respond(&mut stream, 200, "text/plain", "ok\n")
            }
        }
        "/metrics" => {
            let body = render::metrics(&lock(state));
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body)
        }
        "/status" => {
            let body = render::status(&lock(state));
            respond(&mut stream, 200, "application/json", &body)
        }
        _ => respond(
            &mut stream,
            404,
            "text/plain",
            "not found: try /metrics, /status, /health\n",
        ),
    }
}

fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
