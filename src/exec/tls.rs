//! TLS over a shard socket, with rustls driven by hand: ciphertext moves between the socket and
//! rustls through the socket's channel (io_uring receives and queued sends, channel.rs), so a
//! TLS session costs no thread and no extra task. The state sits behind the socket's `Rc`
//! handle like the socket itself: one task may read while another writes. Borrows of the
//! rustls connection never span an `.await`.
//!
//! Reads: plaintext rustls already holds goes out first; then ciphertext read earlier but not
//! yet taken by rustls; only then the socket. Writes: plaintext goes into rustls, the records
//! it makes are collected in `outgoing` and handed to the channel's send queue whole, so
//! records never interleave (both directions may hand records over: the read side for
//! handshake replies and alerts). Memory is bounded: one 16 KiB record in, the channel's send
//! queue bound out (a writer waits for room before handing rustls more).

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Write};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};

use super::channel::Channel;

/// The largest TLS record (16 KiB of payload plus header and expansion).
const RECORD_BYTES_MAX: usize = 16 * 1024 + 2048;

pub(super) struct Tls {
    conn: RefCell<rustls::Connection>,
    /// Ciphertext read from the socket and not yet taken by rustls, from `incoming_at`.
    incoming: RefCell<BytesMut>,
    incoming_at: Cell<usize>,
    /// Ciphertext made by rustls and not yet taken by the socket.
    outgoing: RefCell<Vec<u8>>,
}

fn tls_error(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

impl Tls {
    pub(super) fn new(conn: rustls::Connection) -> Tls {
        Tls {
            conn: RefCell::new(conn),
            incoming: RefCell::new(BytesMut::new()),
            incoming_at: Cell::new(0),
            outgoing: RefCell::new(Vec::new()),
        }
    }

    pub(super) fn client(
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<Tls> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        Ok(Tls::new(conn.into()))
    }

    pub(super) fn server(config: Arc<rustls::ServerConfig>) -> io::Result<Tls> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        Ok(Tls::new(conn.into()))
    }

    pub(super) fn is_handshaking(&self) -> bool {
        self.conn.borrow().is_handshaking()
    }

    /// Moves every record rustls has made into `outgoing`.
    fn collect_outgoing(&self) -> io::Result<()> {
        let mut conn = self.conn.borrow_mut();
        let mut out = self.outgoing.borrow_mut();
        while conn.wants_write() {
            conn.write_tls(&mut *out)?;
        }
        Ok(())
    }

    /// Feeds buffered ciphertext to rustls. `Ok(false)`: nothing was buffered.
    fn feed(&self, io: &Channel) -> io::Result<bool> {
        let at = self.incoming_at.get();
        let incoming = self.incoming.borrow();
        if at >= incoming.len() {
            return Ok(false);
        }
        let mut rest = &incoming[at..];
        let taken = self.conn.borrow_mut().read_tls(&mut rest)?;
        self.incoming_at.set(at + taken);
        drop(incoming);
        let processed = self.conn.borrow_mut().process_new_packets();
        // Handshake replies, alerts and key updates go out now, without waiting.
        self.collect_outgoing()?;
        self.try_flush(io);
        processed.map_err(tls_error)?;
        Ok(true)
    }

    /// Reads ciphertext from the socket into `incoming`. `Ready(Ok(0))` is end-of-stream.
    fn poll_fill(&self, io: &Channel, cx: &Context<'_>) -> Poll<io::Result<usize>> {
        let mut incoming = self.incoming.borrow_mut();
        incoming.clear();
        self.incoming_at.set(0);
        io.poll_read(cx, &mut incoming, RECORD_BYTES_MAX)
    }

    /// Hands every record in `outgoing` to the socket's send queue, without waiting.
    fn hand_over(&self, io: &Channel) -> io::Result<()> {
        let mut out = self.outgoing.borrow_mut();
        if out.is_empty() {
            return Ok(());
        }
        io.queue(Bytes::from(std::mem::take(&mut *out)))
    }

    /// As [`hand_over`](Self::hand_over), for callers that do not wait (an error shows in the
    /// next read or write).
    pub(super) fn try_flush(&self, io: &Channel) {
        let _ = self.hand_over(io);
    }

    /// Hands `outgoing` to the socket's send queue and waits for the queue to be within its
    /// bound.
    fn poll_flush(&self, io: &Channel, cx: &Context<'_>) -> Poll<io::Result<()>> {
        if let Err(err) = self.hand_over(io) {
            return Poll::Ready(Err(err));
        }
        io.poll_room(cx, super::send_queue_bytes())
    }

    pub(super) async fn flush(&self, io: &Channel) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| self.poll_flush(io, cx)).await
    }

    /// Runs the handshake to its end.
    pub(super) async fn handshake(&self, io: &Channel) -> io::Result<()> {
        loop {
            self.collect_outgoing()?;
            self.flush(io).await?;
            if !self.is_handshaking() {
                return Ok(());
            }
            if self.feed(io)? {
                continue;
            }
            let n = futures_lite::future::poll_fn(|cx| self.poll_fill(io, cx)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// Plaintext into `buf` (at most `chunk` bytes). `Ok(0)` is end-of-stream (close_notify
    /// or the socket's end).
    pub(super) fn poll_read(
        &self,
        io: &Channel,
        cx: &Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            {
                // Plaintext rustls holds is copied out as is (no zeroed buffer to read into).
                let mut conn = self.conn.borrow_mut();
                let mut reader = conn.reader();
                match reader.fill_buf() {
                    Ok(plain) => {
                        // Empty: the peer's close_notify, end-of-stream.
                        let n = plain.len().min(chunk.max(1));
                        buf.extend_from_slice(&plain[..n]);
                        reader.consume(n);
                        return Poll::Ready(Ok(n));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
            }
            match self.feed(io) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
            match self.poll_fill(io, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes all of `data` (encrypted), waiting for socket space as needed.
    pub(super) async fn write_all(&self, io: &Channel, mut data: &[u8]) -> io::Result<()> {
        loop {
            if !data.is_empty() {
                let n = self.conn.borrow_mut().writer().write(data)?;
                data = &data[n..];
            }
            self.collect_outgoing()?;
            self.flush(io).await?;
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Best effort, without waiting (see `Stream::write_now`).
    pub(super) fn write_now(&self, io: &Channel, data: &[u8]) {
        let _ = self.conn.borrow_mut().writer().write(data);
        if self.collect_outgoing().is_ok() {
            self.try_flush(io);
        }
    }

    /// Sends close_notify, best effort.
    pub(super) fn close(&self, io: &Channel) {
        self.conn.borrow_mut().send_close_notify();
        if self.collect_outgoing().is_ok() {
            self.try_flush(io);
        }
    }
}
