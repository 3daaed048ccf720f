//! Stream sockets on the shard runtime: TCP and Unix-domain alike, since both are read and
//! written with the same io_uring `RECV`/`SEND` operations (channel.rs). A [`Stream`] is a
//! cheap `Rc` handle: one task may read while another writes (each direction has its own
//! waker slot), with no lock and no `dup`. When the last handle is dropped the reactor sends
//! what is still queued, then closes the descriptor, so a raw fd number is never used after
//! the socket it named is gone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::channel::Channel;
use super::reactor::Source;
use super::tls::Tls;
use super::{current, sleep, within};

/// First and largest pause between connect attempts to a Unix socket whose backlog is full.
const UNIX_RETRY_FIRST: Duration = Duration::from_millis(1);
const UNIX_RETRY_MAX: Duration = Duration::from_millis(50);

/// A listener's descriptor, watched for readiness by a multishot poll.
struct Registered {
    fd: OwnedFd,
    source: Rc<Source>,
}

impl Registered {
    fn new(fd: OwnedFd) -> io::Result<Registered> {
        let source = current().reactor.register(fd.as_raw_fd())?;
        Ok(Registered { fd, source })
    }

    fn wait_readable(&self, cx: &Context<'_>) {
        self.source.readable.set(false);
        self.source.read_waker.set(Some(cx.waker().clone()));
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        super::CURRENT.with(|c| {
            if let Some(exec) = c.borrow().as_ref() {
                exec.reactor.release(&self.source);
            }
        });
    }
}

fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// A listening socket whose accepted connections belong to this shard. A Unix-domain
/// listener may be a `dup` of one socket that every shard accepts from: all of them are woken
/// by a new connection, one `accept4` wins and the others get EAGAIN and wait again.
pub struct Listener {
    io: Registered,
    unix: bool,
}

impl Listener {
    /// Takes over a bound, listening socket (built with socket2 by the caller).
    pub fn from_socket(socket: Socket) -> io::Result<Listener> {
        socket.set_nonblocking(true)?;
        let unix = socket.domain()? == Domain::UNIX;
        // SAFETY: into_raw_fd hands over sole ownership of the descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        Ok(Listener {
            io: Registered::new(fd)?,
            unix,
        })
    }

    /// Whether this listener is a Unix-domain socket (for logs and counters).
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    pub async fn accept(&self) -> io::Result<Stream> {
        let fd = self.accept_fd().await?;
        Stream::from_fd(fd, self.unix)
    }

    /// The next connection as a bare descriptor, not yet driven by any shard: the caller
    /// may serve it here ([`Stream::adopt`]) or hand it to another shard, which adopts it.
    pub async fn accept_fd(&self) -> io::Result<OwnedFd> {
        futures_lite::future::poll_fn(|cx| {
            loop {
                // SAFETY: accept4 with null address pointers is allowed; result checked.
                let fd = unsafe {
                    libc::accept4(
                        self.io.fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if fd >= 0 {
                    // SAFETY: a fresh descriptor owned by nobody else.
                    return Poll::Ready(Ok(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // The peer gave up before we accepted; try the next one.
                    io::ErrorKind::ConnectionAborted => continue,
                    _ if would_block(&err) => {
                        self.io.wait_readable(cx);
                        return Poll::Pending;
                    }
                    _ => return Poll::Ready(Err(err)),
                }
            }
        })
        .await
    }
}

/// A connected TCP or Unix-domain socket, optionally with TLS over it. Clone it to read in
/// one task and write in another.
#[derive(Clone)]
pub struct Stream {
    io: Rc<Conn>,
    tls: Option<Rc<Tls>>,
    /// AF_UNIX: there is no Nagle and no TCP option to set.
    unix: bool,
}

/// The handles' share of a channel: releases it to the reactor when the last one goes.
pub(super) struct Conn {
    pub(super) channel: Rc<Channel>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        super::CURRENT.with(|c| match c.borrow().as_ref() {
            Some(exec) => exec.reactor.release_channel(&self.channel),
            // No reactor, so nothing in flight: just close.
            // SAFETY: the channel's own descriptor, closed once.
            None => unsafe {
                libc::close(self.channel.fd);
            },
        });
    }
}

impl Stream {
    fn from_fd(fd: OwnedFd, unix: bool) -> io::Result<Stream> {
        let channel = current().reactor.register_channel(fd)?;
        Ok(Stream {
            io: Rc::new(Conn { channel }),
            unix,
            tls: None,
        })
    }

    /// Starts driving an accepted connection (from [`Listener::accept_fd`], on this shard or
    /// another) on the current shard.
    pub fn adopt(fd: OwnedFd, unix: bool) -> io::Result<Stream> {
        Stream::from_fd(fd, unix)
    }

    /// Takes the socket off this shard so that another shard can [`adopt`](Self::adopt) it
    /// (a pooled client moving between shards): waits until what was written is sent and a
    /// receive in flight has completed or been cancelled, appends what was received and not
    /// yet read to `buf`, and returns a descriptor for the same socket (this handle's own
    /// closes once dropped). Plain sockets, and the last handle, only: a TLS session's state
    /// lives in this shard's handle, and another handle could still read or write.
    pub async fn detach(self, buf: &mut BytesMut) -> io::Result<OwnedFd> {
        if self.tls.is_some() || Rc::strong_count(&self.io) != 1 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only the last handle of a plain socket can leave its shard",
            ));
        }
        let channel = &self.io.channel;
        futures_lite::future::poll_fn(|cx| channel.poll_room(cx, 0)).await?;
        current().reactor.cancel_recv(channel);
        futures_lite::future::poll_fn(|cx| channel.poll_quiet(cx, buf)).await?;
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on the channel's live descriptor returns a new one
        // (or -1, checked), owned by nobody else.
        let fd = unsafe { libc::fcntl(channel.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Whether bytes written to this socket still wait to be sent.
    pub fn sending(&self) -> bool {
        self.io.channel.sending()
    }

    /// The handles of this socket (this one included).
    pub fn handles(&self) -> usize {
        Rc::strong_count(&self.io)
    }

    /// The descriptor, borrowed for socket options.
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the channel keeps its descriptor open while any handle exists.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.io.channel.fd) }
    }

    /// Runs a TLS client handshake (after the server's `S`); from then on reads and writes
    /// carry plaintext through TLS. Call before cloning the handle.
    pub async fn start_tls_client(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let tls = Tls::client(config, name)?;
        tls.handshake(&self.io.channel).await?;
        self.tls = Some(Rc::new(tls));
        Ok(())
    }

    /// Runs a TLS server handshake (after answering `S`). Call before cloning the handle.
    pub async fn start_tls_server(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let tls = Tls::server(config)?;
        tls.handshake(&self.io.channel).await?;
        self.tls = Some(Rc::new(tls));
        Ok(())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| !t.is_handshaking())
    }

    /// Connects over TCP without blocking the shard, failing with `TimedOut` after `limit`.
    pub async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<Stream> {
        let domain = if addr.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let socket = Socket::new(
            domain,
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        Stream::connect_socket(socket, &addr.into(), false, limit).await
    }

    /// Connects to the Unix-domain socket at `path` (e.g. `/run/postgresql/.s.PGSQL.5432`),
    /// failing with `TimedOut` after `limit`.
    pub async fn connect_unix(path: &Path, limit: Duration) -> io::Result<Stream> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
        let addr = SockAddr::unix(path)?;
        Stream::connect_socket(socket, &addr, true, limit).await
    }

    async fn connect_socket(
        socket: Socket,
        addr: &SockAddr,
        unix: bool,
        limit: Duration,
    ) -> io::Result<Stream> {
        let deadline = Instant::now() + limit;
        let mut pause = UNIX_RETRY_FIRST;
        let in_progress = loop {
            match socket.connect(addr) {
                Ok(()) => break false,
                Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => break true,
                // A Unix socket whose listen backlog is full says EAGAIN and, unlike TCP, never
                // completes the connect later: try again shortly, within the limit.
                Err(err) if unix && would_block(&err) => {
                    if Instant::now() + pause > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection timed out (the server's listen backlog stayed full)",
                        ));
                    }
                    sleep(pause).await;
                    pause = (pause * 2).min(UNIX_RETRY_MAX);
                }
                Err(err) => return Err(err),
            }
        };
        // SAFETY: into_raw_fd hands over sole ownership of the descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        let stream = Stream::from_fd(fd, unix)?;
        if in_progress {
            let channel = &stream.io.channel;
            channel.connecting();
            let connected = within(
                limit,
                futures_lite::future::poll_fn(|cx| channel.poll_connected(cx)),
            )
            .await;
            match connected {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection timed out",
                    ));
                }
                Some(Err(err)) => return Err(err),
                Some(Ok(())) => {}
            }
            let fd = stream.fd();
            let probe = socket2::SockRef::from(&fd);
            if let Some(err) = probe.take_error()? {
                return Err(err);
            }
            // Confirms the connection (a refused connect reports here on some kernels).
            probe.peer_addr()?;
        }
        Ok(stream)
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.io.channel.fd
    }

    /// Whether this is a Unix-domain socket.
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// TCP_NODELAY on a TCP socket; nothing at all on a Unix socket, which has no Nagle (and
    /// would answer EOPNOTSUPP).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        if self.unix {
            return Ok(());
        }
        socket2::SockRef::from(&self.fd()).set_tcp_nodelay(on)
    }

    /// Reads what is available (at most `chunk` bytes) and appends it to `buf`. `Ok(0)` is
    /// end-of-stream. Cancel-safe: a dropped read leaves its receive in flight, and what it
    /// brings goes to the next read.
    pub fn read_buf<'a>(
        &'a self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + 'a {
        futures_lite::future::poll_fn(move |cx| match &self.tls {
            Some(tls) => tls.poll_read(&self.io.channel, cx, buf, chunk),
            None => self.io.channel.poll_read(cx, buf, chunk),
        })
    }

    /// Asks the kernel to stamp what this socket receives (`SO_TIMESTAMPNS`; its receives
    /// then cost a control buffer each): see [`received_at_ns`](Self::received_at_ns).
    pub fn stamp_receives(&self) -> io::Result<()> {
        self.io.channel.stamp_receives()
    }

    /// When the last bytes a read returned reached the socket, by the kernel's clock (ns
    /// since the Unix epoch); 0 unless [`stamp_receives`](Self::stamp_receives) was asked.
    pub fn received_at_ns(&self) -> u64 {
        self.io.channel.received_at_ns()
    }

    /// Whether bytes received from the socket wait for a read in this process (their reader
    /// was woken and has not run yet). Bytes still in the kernel's buffer do not count, nor,
    /// on a TLS stream, ciphertext rustls took already.
    pub fn has_unread(&self) -> bool {
        self.io.channel.has_received()
    }

    /// Writes all of `data`: returns once it is queued for the socket and the socket's queue
    /// is back within the send queue bound (backpressure). An error of an earlier send is
    /// reported here.
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            return tls.write_all(&self.io.channel, data).await;
        }
        self.write_bytes(Bytes::copy_from_slice(data)).await
    }

    /// As [`write_all`](Self::write_all), without a copy: the socket sends from `data`'s own
    /// buffer (a frame split off a read buffer goes out as it came in).
    pub async fn write_bytes(&self, data: Bytes) -> io::Result<()> {
        let channel = &self.io.channel;
        if let Some(tls) = &self.tls {
            return tls.write_all(channel, &data).await;
        }
        channel.queue(data)?;
        let limit = super::send_queue_bytes();
        futures_lite::future::poll_fn(|cx| channel.poll_room(cx, limit)).await
    }

    /// Best-effort write of a short message (an ErrorResponse to a connection being closed),
    /// without waiting: it is queued, and dropped if the socket fails.
    pub fn write_now(&self, data: &[u8]) {
        if let Some(tls) = &self.tls {
            tls.write_now(&self.io.channel, data);
            return;
        }
        let _ = self.io.channel.queue(Bytes::copy_from_slice(data));
    }

    /// Whether reads may be deferred by [`set_read_low_water`](Self::set_read_low_water) and
    /// made by [`read_now`](Self::read_now): plain TCP only. A Unix socket reports readable
    /// whatever its low-water mark, and TLS must read whole records through its own buffer.
    pub fn defers_reads(&self) -> bool {
        !self.unix && self.tls.is_none()
    }

    /// SO_RCVLOWAT: the socket reports readable (and wakes its poll) only once this many bytes
    /// are waiting, or at end-of-stream, on an error, or when its receive buffer runs short
    /// (the kernel caps the mark at half the largest TCP receive buffer). 1 is the default.
    pub fn set_read_low_water(&self, bytes: i32) -> io::Result<()> {
        let bytes: libc::c_int = bytes.max(1);
        // SAFETY: the option value is a live c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                self.io.channel.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Reads what is waiting now (at most `chunk` bytes) without waiting for the socket to
    /// report readable, for a reader that chose when to read (see
    /// [`set_read_low_water`](Self::set_read_low_water)). `Ok(None)`: nothing waiting;
    /// `Ok(Some(0))`: end-of-stream. Plain sockets only (see
    /// [`defers_reads`](Self::defers_reads)).
    pub fn read_now(&self, buf: &mut BytesMut, chunk: usize) -> io::Result<Option<usize>> {
        debug_assert!(self.tls.is_none(), "read_now bypasses TLS");
        self.io.channel.read_now(buf, chunk)
    }

    /// Completes once there is something to read (as the low-water mark of
    /// [`set_read_low_water`](Self::set_read_low_water) counts), the peer closed or the socket
    /// failed, without reading anything: then [`read_now`](Self::read_now) takes it. Plain
    /// sockets only (see [`defers_reads`](Self::defers_reads)).
    pub async fn readable(&self) -> io::Result<()> {
        debug_assert!(self.tls.is_none(), "readable bypasses TLS");
        futures_lite::future::poll_fn(|cx| self.io.channel.poll_readable(cx)).await
    }

    /// Shuts both directions down: every handle's reads see end-of-stream at once and its
    /// writes fail; what was already written still goes out before the peer reads
    /// end-of-stream.
    pub fn shutdown(&self) {
        if let Some(tls) = &self.tls {
            tls.close(&self.io.channel);
        }
        self.io.channel.shutdown();
    }

    /// Ends the sending direction only: the peer reads end-of-stream after what was written,
    /// and what it still sends can be read.
    pub fn shutdown_write(&self) {
        if let Some(tls) = &self.tls {
            tls.close(&self.io.channel);
        }
        self.io.channel.shutdown_write();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{set_send_queue_bytes, sleep};
    use super::*;

    #[test]
    fn unix_connect_waits_out_a_full_backlog_then_reads_and_writes() {
        let dir = std::env::temp_dir().join(format!("pgprism-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".s.PGSQL.9");
        let addr = SockAddr::unix(&path).unwrap();
        let server = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        server.bind(&addr).unwrap();
        server.listen(0).unwrap();
        // Fill the backlog: connects until the kernel says EAGAIN.
        let mut queued = Vec::new();
        loop {
            let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
            match s.connect(&addr) {
                Ok(()) => queued.push(s),
                Err(err) if would_block(&err) => break,
                Err(err) => panic!("{err}"),
            }
            assert!(queued.len() < 64, "the backlog never filled");
        }
        let probe = path.clone();
        run_in_shard(async move {
            let err = Stream::connect_unix(&probe, Duration::from_millis(20))
                .await
                .err()
                .expect("a full backlog times out");
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        });
        // Once the server accepts, a waiting connect gets through and the stream works.
        let acceptor = std::thread::spawn(move || {
            let mut accepted = Vec::new();
            for _ in 0..=queued.len() {
                accepted.push(server.accept().unwrap().0);
            }
            use std::io::{Read, Write};
            let mut buf = [0u8; 4];
            let mut last = accepted.pop().unwrap();
            last.read_exact(&mut buf).unwrap();
            last.write_all(b"pong").unwrap();
            assert_eq!(&buf, b"ping");
        });
        run_in_shard(async move {
            let stream = Stream::connect_unix(&path, Duration::from_secs(10))
                .await
                .unwrap();
            assert!(stream.is_unix());
            stream.set_nodelay(true).unwrap(); // a no-op, not EOPNOTSUPP
            stream.write_all(b"ping").await.unwrap();
            let mut buf = BytesMut::new();
            while buf.len() < 4 {
                assert!(stream.read_buf(&mut buf, 64).await.unwrap() > 0);
            }
            assert_eq!(&buf[..], b"pong");
        });
        acceptor.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connected TCP pair: the shard's end is connected inside the shard, the other is a
    /// plain blocking std socket for the test thread.
    fn tcp_peer() -> (std::net::SocketAddr, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (listener.local_addr().unwrap(), listener)
    }

    #[test]
    fn a_dropped_read_loses_nothing_and_queued_writes_arrive_in_order() {
        use std::io::{Read, Write};
        let (addr, listener) = tcp_peer();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut got = [0u8; 6];
            sock.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"abcdef");
            sock.write_all(b"late").unwrap();
            // Half-close: the shard reads the rest, then end-of-stream.
            sock.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            sock.read_to_end(&mut rest).unwrap();
            rest
        });
        run_in_shard(async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let mut buf = BytesMut::new();
            // Nothing to read yet: the read gives up, its receive stays in flight.
            let early = within(Duration::from_millis(20), stream.read_buf(&mut buf, 64)).await;
            assert!(early.is_none());
            stream.write_all(b"ab").await.unwrap();
            stream.write_bytes(Bytes::from_static(b"cd")).await.unwrap();
            stream.write_now(b"ef");
            while buf.len() < 4 {
                assert!(stream.read_buf(&mut buf, 64).await.unwrap() > 0);
            }
            assert_eq!(&buf[..], b"late");
            assert_eq!(stream.read_buf(&mut buf, 64).await.unwrap(), 0);
            // Queued, then shut down: the peer gets it all before its end-of-stream.
            stream.write_all(b"bye").await.unwrap();
            stream.shutdown();
            assert!(stream.write_all(b"too late").await.is_err());
        });
        assert_eq!(peer.join().unwrap(), b"bye");
    }

    #[test]
    fn a_writer_waits_for_a_slow_reader_and_a_dropped_stream_still_sends_its_queue() {
        use std::io::Read;
        const TOTAL: usize = 8 << 20;
        let (addr, listener) = tcp_peer();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            // Read nothing until the writer has been made to wait.
            rx.recv().unwrap();
            let mut all = Vec::new();
            sock.read_to_end(&mut all).unwrap();
            all
        });
        set_send_queue_bytes(64 << 10);
        run_in_shard(async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let chunk = Bytes::from(vec![7u8; 64 << 10]);
            let mut sent = 0;
            let mut waited = false;
            while sent < TOTAL {
                let write = stream.write_bytes(chunk.clone());
                match within(Duration::from_millis(200), write).await {
                    Some(result) => result.unwrap(),
                    None => {
                        // The kernel buffers and our queue are full: backpressure. The chunk
                        // was queued before the wait, so it counts as sent.
                        waited = true;
                        let _ = tx.send(());
                    }
                }
                sent += chunk.len();
            }
            assert!(
                waited,
                "8 MiB to a peer that reads nothing never made the writer wait"
            );
            // Dropped with data queued: the reactor sends it before closing.
        });
        let all = peer.join().unwrap();
        assert_eq!(all.len(), TOTAL);
        assert!(all.iter().all(|&b| b == 7));
    }

    #[test]
    fn read_now_never_overtakes_a_receive_in_flight() {
        use std::io::Write;
        let (addr, listener) = tcp_peer();
        let (go, go_rx) = std::sync::mpsc::channel::<&'static [u8]>();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            while let Ok(data) = go_rx.recv() {
                sock.write_all(data).unwrap();
                done.send(()).unwrap();
            }
        });
        run_in_shard(async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let mut buf = BytesMut::new();
            // A read given up: its receive stays in flight.
            let early = within(Duration::from_millis(20), stream.read_buf(&mut buf, 64)).await;
            assert!(early.is_none());
            go.send(b"AAAA").unwrap();
            done_rx.recv().unwrap();
            // Any system call of the shard lets the kernel complete that receive; its
            // completion waits for the next turn.
            std::thread::sleep(Duration::from_millis(30));
            go.send(b"BBBB").unwrap();
            done_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(30));
            let _ = stream.read_now(&mut buf, 64).unwrap();
            while buf.len() < 8 {
                assert!(stream.read_buf(&mut buf, 64).await.unwrap() > 0);
            }
            assert_eq!(&buf[..], b"AAAABBBB");
        });
        peer.join().unwrap();
    }

    #[test]
    fn readable_holds_to_the_low_water_mark_and_leaves_the_data_to_read_now() {
        use std::io::Write;
        let (addr, listener) = tcp_peer();
        let (go, go_rx) = std::sync::mpsc::channel::<&'static [u8]>();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            while let Ok(data) = go_rx.recv() {
                sock.write_all(data).unwrap();
            }
        });
        run_in_shard(async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            stream.set_read_low_water(8).unwrap();
            go.send(b"1234").unwrap();
            // Below the mark: not readable.
            let early = within(Duration::from_millis(100), stream.readable()).await;
            assert!(early.is_none());
            go.send(b"5678").unwrap();
            stream.readable().await.unwrap();
            // No receive was armed: read_now takes it all.
            let mut buf = BytesMut::new();
            assert_eq!(stream.read_now(&mut buf, 64).unwrap(), Some(8));
            assert_eq!(&buf[..], b"12345678");
            assert_eq!(stream.read_now(&mut buf, 64).unwrap(), None);
        });
        peer.join().unwrap();
    }

    #[test]
    fn a_stream_nobody_reads_is_cut_after_the_linger_time_when_the_shard_ends() {
        use std::io::Read;
        let (addr, listener) = tcp_peer();
        let (ended, ended_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            // Read nothing until the shard has ended.
            ended_rx.recv().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut total = 0usize;
            let mut chunk = vec![0u8; 1 << 16];
            loop {
                match sock.read(&mut chunk) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    // Cut in the middle of a send: a reset is an end too.
                    Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return Ok(total),
                    Err(err) => return Err((total, err.kind())),
                }
            }
        });
        set_send_queue_bytes(64 << 10);
        super::super::set_close_linger(Duration::from_millis(200));
        run_in_shard(async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let chunk = vec![7u8; 64 << 10];
            for _ in 0..256 {
                stream.write_now(&chunk);
            }
            sleep(Duration::from_millis(20)).await;
        });
        ended.send(()).unwrap();
        let got = peer.join().unwrap();
        let total = got.expect("the peer saw the end of the stream");
        assert!(
            total < 256 * (64 << 10),
            "16 MiB fit in the socket buffers?"
        );
    }

    fn run_in_shard(task: impl Future<Output = ()> + 'static) {
        super::super::run(64, task).unwrap();
    }

    /// Sessions talking to each other within one shard, so that turns reap several
    /// completions and the batching wait (`proxy.ring-batch-wait-us`) is taken, with and
    /// without deferred completion work: every request gets its own answer, in order, also
    /// across timers that end some waits.
    #[test]
    fn batching_waits_deliver_every_message_in_order() {
        use super::super::{WaitPolicy, set_wait_policy, spawn};
        const PAIRS: usize = 8;
        const ROUNDS: u32 = 200;
        for policy in [
            WaitPolicy {
                batch_wait_us: 200,
                defer_taskrun: false,
            },
            WaitPolicy {
                batch_wait_us: 200,
                defer_taskrun: true,
            },
            WaitPolicy {
                batch_wait_us: 0,
                defer_taskrun: true,
            },
        ] {
            set_wait_policy(policy);
            let answered = Rc::new(std::cell::Cell::new(0u32));
            let seen = answered.clone();
            run_in_shard(async move {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket
                    .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
                    .unwrap();
                socket.listen(64).unwrap();
                let addr = socket.local_addr().unwrap().as_socket().unwrap();
                let listener = Listener::from_socket(socket).unwrap();
                // One acceptor (a listener wakes one waiting task), an echo task per
                // connection: each 8-byte request comes back with every byte incremented.
                spawn(async move {
                    for _ in 0..PAIRS {
                        let stream = listener.accept().await.unwrap();
                        spawn(async move {
                            let mut buf = BytesMut::new();
                            loop {
                                while buf.len() < 8 {
                                    if stream.read_buf(&mut buf, 64).await.unwrap() == 0 {
                                        return;
                                    }
                                }
                                let request = buf.split_to(8);
                                let answer: Vec<u8> =
                                    request.iter().map(|b| b.wrapping_add(1)).collect();
                                stream.write_all(&answer).await.unwrap();
                            }
                        });
                    }
                });
                let done = Rc::new(std::cell::Cell::new(0));
                for pair in 0..PAIRS {
                    let (answered, done) = (answered.clone(), done.clone());
                    spawn(async move {
                        let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
                        let mut buf = BytesMut::new();
                        for round in 0..ROUNDS {
                            let request = (((pair as u64) << 32) | round as u64).to_le_bytes();
                            stream.write_all(&request).await.unwrap();
                            while buf.len() < 8 {
                                assert!(stream.read_buf(&mut buf, 64).await.unwrap() > 0);
                            }
                            let answer = buf.split_to(8);
                            let expected: Vec<u8> =
                                request.iter().map(|b| b.wrapping_add(1)).collect();
                            assert_eq!(&answer[..], &expected[..], "pair {pair} round {round}");
                            answered.set(answered.get() + 1);
                            if round % 50 == 0 {
                                // A timer ends some waits, batching or not.
                                sleep(Duration::from_millis(1)).await;
                            }
                        }
                        done.set(done.get() + 1);
                    });
                }
                while done.get() < PAIRS {
                    sleep(Duration::from_millis(2)).await;
                }
            });
            assert_eq!(seen.get(), PAIRS as u32 * ROUNDS, "{policy:?}");
        }
        set_wait_policy(WaitPolicy::default());
    }
}
