//! A connected socket driven by io_uring operations (completion, not readiness): reads are
//! `IORING_OP_RECV` into a buffer the channel owns, writes are `IORING_OP_SEND` of queued
//! `Bytes`. Operations are queued in the submission ring and go to the kernel together with
//! everything else at the next `io_uring_enter` of the shard's turn, so a turn that relays
//! messages for many sessions costs one system call, not one `recv` and one `send` each (the
//! readiness design it replaces paid 4.4 system calls per pgbench transaction; this one pays
//! well under one, see benches/floor-forwarder.rs and the README).
//!
//! A socket that asked for kernel receive timestamps (compare mode's primary legs) reads with
//! `IORING_OP_RECVMSG` instead, with a control buffer for `SCM_TIMESTAMPNS`; every other
//! socket pays nothing for it.
//!
//! Buffers the kernel uses must stay put until the operation's completion: the receive buffer
//! is only touched while no receive is in flight, queued `Bytes` are immutable, and the
//! channel itself is held by the reactor's slot (not only by its handles) until its last
//! operation has completed. Dropping a read future therefore never lets the kernel write into
//! freed memory: the receive stays in flight and its data waits for the next read.
//!
//! Writes return once the data is queued and the queue holds at most `send_queue_bytes`
//! (backpressure beyond it). A channel whose handles are dropped keeps sending what was queued
//! (an error message before a close, say) for at most the close linger time
//! (`proxy.close-linger-ms`), then its descriptor closes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

thread_local! {
    /// Whether this kernel takes `IORING_RECVSEND_POLL_FIRST` (Linux 5.19+); cleared by the
    /// first receive it refuses.
    static POLL_FIRST: Cell<bool> = const { Cell::new(true) };
}

/// A receive is armed with at least this much room; below it the buffer takes a new block.
const RECV_ROOM_MIN: usize = 2048;
/// Size of a new receive block: small messages share one allocation, several hundred of them.
const RECV_BLOCK: usize = 64 << 10;
/// Queued `Bytes` up to this many bytes in all are merged into one send.
const MERGE_BYTES_MAX: usize = 64 << 10;

/// The state of one socket, shared by its `Stream` handles and the reactor's slot.
pub(crate) struct Channel {
    pub(super) token: u64,
    pub(super) fd: RawFd,
    // -- receiving
    /// Received bytes not yet taken by a reader; while a receive is in flight it is empty and
    /// the kernel writes into its spare capacity.
    rx: RefCell<BytesMut>,
    /// Length the receive in flight was armed with (for the completion's bounds check).
    rx_armed: Cell<usize>,
    /// The last receive filled all it was armed with: more is probably waiting.
    rx_filled: Cell<bool>,
    /// The receive in flight was armed with `POLL_FIRST`.
    rx_poll_first: Cell<bool>,
    pub(super) recv_busy: Cell<bool>,
    rx_end: Cell<bool>,
    rx_error: Cell<Option<i32>>,
    read_waker: Cell<Option<Waker>>,
    /// Kernel receive timestamps, for a socket that asked (see [`Channel::stamp_receives`]):
    /// the receive is then a `RECVMSG` whose header, vector and control buffer live here
    /// (boxed: they stay put while the kernel holds pointers to them).
    rx_stamps: RefCell<Option<Box<RxStamps>>>,
    /// The kernel's receive time of the last bytes received (ns since the Unix epoch; 0:
    /// none yet, or the socket does not stamp).
    rx_stamp_ns: Cell<u64>,
    // -- sending
    /// Data to send, front first; the front is in flight while `send_busy`, from `tx_sent`.
    tx: RefCell<VecDeque<Bytes>>,
    tx_sent: Cell<usize>,
    /// Bytes queued and not yet sent.
    tx_bytes: Cell<usize>,
    pub(super) send_busy: Cell<bool>,
    tx_error: Cell<Option<i32>>,
    /// No more writes (shut down locally): writers get an error.
    write_closed: Cell<bool>,
    /// `shutdown(2)` the sending side once the queue is sent.
    shut_when_sent: Cell<bool>,
    write_waker: Cell<Option<Waker>>,
    // -- readiness without reading (a reader that chose when to read, see `poll_readable`)
    pub(super) readable_busy: Cell<bool>,
    readable: Cell<bool>,
    // -- connecting
    pub(super) connect_busy: Cell<bool>,
    connected: Cell<bool>,
    // -- lifetime
    /// Every handle is gone; the slot frees once no operation is in flight.
    pub(super) released: Cell<bool>,
    /// Released with data still queued: sending stops at this instant.
    pub(super) linger_until: Cell<Option<Instant>>,
}

/// What the reactor must do after a completion or a request of the channel's.
pub(crate) enum Submit {
    /// `poll_first`: nothing is expected to be waiting, so the kernel should wait for data
    /// before trying (`IORING_RECVSEND_POLL_FIRST`), not try a receive that finds nothing.
    Recv {
        ptr: *mut u8,
        len: u32,
        poll_first: bool,
    },
    /// A receive with its kernel timestamp: `msg` (the channel's) describes the buffer.
    RecvMsg {
        msg: *mut libc::msghdr,
        poll_first: bool,
    },
    Send {
        ptr: *const u8,
        len: u32,
    },
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn broken_pipe() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the socket was shut down")
}

impl Channel {
    pub(super) fn new(token: u64, fd: RawFd) -> Channel {
        Channel {
            token,
            fd,
            rx: RefCell::new(BytesMut::new()),
            rx_armed: Cell::new(0),
            rx_filled: Cell::new(false),
            rx_poll_first: Cell::new(false),
            recv_busy: Cell::new(false),
            rx_end: Cell::new(false),
            rx_error: Cell::new(None),
            read_waker: Cell::new(None),
            rx_stamps: RefCell::new(None),
            rx_stamp_ns: Cell::new(0),
            tx: RefCell::new(VecDeque::new()),
            tx_sent: Cell::new(0),
            tx_bytes: Cell::new(0),
            send_busy: Cell::new(false),
            tx_error: Cell::new(None),
            write_closed: Cell::new(false),
            shut_when_sent: Cell::new(false),
            write_waker: Cell::new(None),
            readable_busy: Cell::new(false),
            readable: Cell::new(false),
            connect_busy: Cell::new(false),
            connected: Cell::new(true),
            released: Cell::new(false),
            linger_until: Cell::new(None),
        }
    }

    pub(super) fn busy(&self) -> bool {
        self.recv_busy.get()
            || self.send_busy.get()
            || self.connect_busy.get()
            || self.readable_busy.get()
    }

    // ---------------------------------------------------------------- receiving

    /// Hands what was received to `buf` (appended; without a copy when `buf` is empty or
    /// continues the same block), or arms a receive of at most `chunk` bytes and waits.
    pub(super) fn poll_read(
        &self,
        cx: &Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        if let Some(n) = self.take_received(buf) {
            return Poll::Ready(Ok(n));
        }
        if let Some(code) = self.rx_error.get() {
            return Poll::Ready(Err(os_error(code)));
        }
        if self.rx_end.get() {
            return Poll::Ready(Ok(0));
        }
        self.read_waker.set(Some(cx.waker().clone()));
        if !self.recv_busy.get()
            && let Err(err) = super::current().reactor.submit(self, self.arm_recv(chunk))
        {
            return Poll::Ready(Err(err));
        }
        Poll::Pending
    }

    /// Ready once no receive is in flight (after [`Reactor::cancel_recv`]), with what
    /// receives brought in and no read took moved to `buf`; an error a receive met, or the
    /// end of the stream, is reported.
    ///
    /// [`Reactor::cancel_recv`]: super::reactor::Reactor::cancel_recv
    pub(super) fn poll_quiet(&self, cx: &Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<()>> {
        if self.recv_busy.get() || self.readable_busy.get() || self.connect_busy.get() {
            self.read_waker.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        let _ = self.take_received(buf);
        if let Some(code) = self.rx_error.get() {
            return Poll::Ready(Err(os_error(code)));
        }
        if self.rx_end.get() {
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        }
        Poll::Ready(Ok(()))
    }

    /// Bytes written and not yet sent.
    pub(super) fn sending(&self) -> bool {
        self.tx_bytes.get() > 0 || self.send_busy.get()
    }

    /// Bytes a receive brought in that no read has taken yet (its reader is woken, not run).
    pub(super) fn has_received(&self) -> bool {
        !self.recv_busy.get() && !self.rx.borrow().is_empty()
    }

    fn take_received(&self, buf: &mut BytesMut) -> Option<usize> {
        if self.recv_busy.get() {
            return None;
        }
        let mut rx = self.rx.borrow_mut();
        if rx.is_empty() {
            return None;
        }
        let got = rx.split();
        let n = got.len();
        buf.unsplit(got);
        Some(n)
    }

    /// What is waiting now, without waiting: first what a receive brought in, then a
    /// non-blocking `recv` of at most `chunk` bytes. `Ok(None)`: nothing.
    pub(super) fn read_now(&self, buf: &mut BytesMut, chunk: usize) -> io::Result<Option<usize>> {
        if let Some(n) = self.take_received(buf) {
            return Ok(Some(n));
        }
        if let Some(code) = self.rx_error.get() {
            return Err(os_error(code));
        }
        if self.rx_end.get() {
            return Ok(Some(0));
        }
        if self.recv_busy.get() {
            // The receive may already hold earlier bytes (completed in the kernel, its
            // completion not yet reaped): a `recv` now would return later ones first.
            return Ok(None);
        }
        buf.reserve(chunk);
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(chunk.max(1));
        loop {
            // SAFETY: the kernel writes at most `want` bytes into the spare capacity; they are
            // marked initialised by `set_len` below only after it did.
            let n =
                unsafe { libc::recv(self.fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n >= 0 {
                // SAFETY: recv initialised exactly `n` bytes after the current length.
                unsafe { buf.set_len(buf.len() + n as usize) };
                return Ok(Some(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }

    /// Ready once the socket has something to read (as its `SO_RCVLOWAT` counts), has ended
    /// or failed, without reading it: a one-shot poll, so a reader that chose when to read
    /// (`read_now`) leaves no receive in flight. A receive already in flight, or data it
    /// brought, counts as readable too.
    pub(super) fn poll_readable(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        if self.readable.replace(false)
            || !self.rx.borrow().is_empty()
            || self.rx_end.get()
            || self.rx_error.get().is_some()
        {
            return Poll::Ready(Ok(()));
        }
        self.read_waker.set(Some(cx.waker().clone()));
        if !self.recv_busy.get() && !self.readable_busy.get() {
            super::current().reactor.watch_readable(self)?;
        }
        Poll::Pending
    }

    /// The readiness poll completed.
    pub(super) fn readable_done(&self) {
        self.readable_busy.set(false);
        self.readable.set(true);
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    fn arm_recv(&self, chunk: usize) -> Submit {
        let mut rx = self.rx.borrow_mut();
        debug_assert!(rx.is_empty());
        let room = RECV_ROOM_MIN.min(chunk.max(1));
        if rx.capacity() - rx.len() < room {
            rx.reserve(RECV_BLOCK.max(chunk));
        }
        let spare = rx.spare_capacity_mut();
        let len = spare.len().min(chunk.max(1)).min(u32::MAX as usize);
        self.rx_armed.set(len);
        self.recv_busy.set(true);
        let poll_first = !self.rx_filled.get() && POLL_FIRST.with(Cell::get);
        self.rx_poll_first.set(poll_first);
        if let Some(stamps) = self.rx_stamps.borrow_mut().as_mut() {
            return Submit::RecvMsg {
                msg: stamps.arm(spare.as_mut_ptr().cast(), len),
                poll_first,
            };
        }
        Submit::Recv {
            ptr: spare.as_mut_ptr().cast(),
            len: len as u32,
            // A request/response peer has not answered yet when the reader comes back for
            // more; a stream that filled the last receive has more waiting.
            poll_first,
        }
    }

    /// A receive completed with `result` (bytes, 0 at end-of-stream, or -errno).
    pub(super) fn received(&self, result: i32) {
        self.recv_busy.set(false);
        match result {
            n if n > 0 => {
                let n = (n as usize).min(self.rx_armed.get());
                self.rx_filled.set(n == self.rx_armed.get());
                let mut rx = self.rx.borrow_mut();
                // SAFETY: the kernel initialised `n` bytes of the spare capacity the receive
                // was armed with (at most `rx_armed`), right after the (empty) contents.
                let len = rx.len() + n;
                unsafe { rx.set_len(len) };
                drop(rx);
                // A receive that brought no timestamp leaves none: an older one would stand
                // for bytes that came later.
                if let Some(stamps) = self.rx_stamps.borrow().as_ref() {
                    self.rx_stamp_ns.set(stamps.stamp().unwrap_or(0));
                }
            }
            0 => self.rx_end.set(true),
            n if -n == libc::EINVAL && self.rx_poll_first.get() => {
                // A kernel older than POLL_FIRST: the reader's next receive goes without it.
                POLL_FIRST.with(|p| p.set(false));
            }
            n if -n == libc::ECANCELED || -n == libc::EINTR || -n == libc::EAGAIN => {}
            n => self.rx_error.set(Some(-n)),
        }
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    /// Asks the kernel to stamp what this socket receives (`SO_TIMESTAMPNS`): its receives
    /// become `RECVMSG` with a control buffer, and [`received_at_ns`](Self::received_at_ns)
    /// tells when the last bytes reached the socket. Only sockets that need it pay for it
    /// (compare mode's primary legs: the order of the primary's answers).
    pub(super) fn stamp_receives(&self) -> io::Result<()> {
        if self.rx_stamps.borrow().is_some() {
            return Ok(());
        }
        let on: libc::c_int = 1;
        // SAFETY: a plain setsockopt of an int on a descriptor this channel owns.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Taken by the next receive armed (one in flight now completes without a stamp).
        *self.rx_stamps.borrow_mut() = Some(Box::new(RxStamps::new()));
        Ok(())
    }

    /// The kernel's receive time of the last bytes received, in ns since the Unix epoch
    /// (`CLOCK_REALTIME`); 0 when the socket does not stamp.
    pub(super) fn received_at_ns(&self) -> u64 {
        self.rx_stamp_ns.get()
    }

    // ---------------------------------------------------------------- sending

    /// Queues `data`; it goes to the kernel with the shard's next `io_uring_enter`.
    pub(super) fn queue(&self, data: Bytes) -> io::Result<()> {
        if let Some(code) = self.tx_error.get() {
            return Err(os_error(code));
        }
        if self.write_closed.get() {
            return Err(broken_pipe());
        }
        if data.is_empty() {
            return Ok(());
        }
        self.tx_bytes.set(self.tx_bytes.get() + data.len());
        self.tx.borrow_mut().push_back(data);
        if !self.send_busy.get() {
            let submit = self.arm_send();
            if let Err(err) = super::current().reactor.submit(self, submit) {
                // The ring failed: nothing queued on this socket can go out any more.
                self.sent(-libc::EIO);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Ready once at most `limit` bytes wait to be sent (or the socket failed).
    pub(super) fn poll_room(&self, cx: &Context<'_>, limit: usize) -> Poll<io::Result<()>> {
        if let Some(code) = self.tx_error.get() {
            return Poll::Ready(Err(os_error(code)));
        }
        if self.tx_bytes.get() <= limit {
            return Poll::Ready(Ok(()));
        }
        if self.write_closed.get() {
            return Poll::Ready(Err(broken_pipe()));
        }
        self.write_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }

    fn arm_send(&self) -> Submit {
        let mut tx = self.tx.borrow_mut();
        if tx.len() > 1 && self.tx_bytes.get() <= MERGE_BYTES_MAX {
            let mut merged = BytesMut::with_capacity(self.tx_bytes.get());
            let sent = self.tx_sent.replace(0);
            for (i, part) in tx.drain(..).enumerate() {
                merged.extend_from_slice(if i == 0 { &part[sent..] } else { &part });
            }
            tx.push_back(merged.freeze());
        }
        let front = tx.front().expect("arm_send with data queued");
        let rest = &front[self.tx_sent.get()..];
        self.send_busy.set(true);
        Submit::Send {
            ptr: rest.as_ptr(),
            len: rest.len().min(u32::MAX as usize) as u32,
        }
    }

    /// A send completed with `result` (bytes sent or -errno). Returns the next send to
    /// submit, if any.
    pub(super) fn sent(&self, result: i32) -> Option<Submit> {
        self.send_busy.set(false);
        let expired = self
            .linger_until
            .get()
            .is_some_and(|until| Instant::now() >= until);
        if result >= 0 && !expired {
            let mut left = result as usize;
            self.tx_bytes.set(self.tx_bytes.get().saturating_sub(left));
            let mut tx = self.tx.borrow_mut();
            while left > 0 {
                let Some(front) = tx.front() else { break };
                let unsent = front.len() - self.tx_sent.get();
                if left >= unsent {
                    left -= unsent;
                    tx.pop_front();
                    self.tx_sent.set(0);
                } else {
                    self.tx_sent.set(self.tx_sent.get() + left);
                    left = 0;
                }
            }
        } else {
            if result < 0 && -result != libc::ECANCELED {
                self.tx_error.set(Some(-result));
            }
            // Failed, cancelled or out of time: what is queued will never go.
            self.tx.borrow_mut().clear();
            self.tx_sent.set(0);
            self.tx_bytes.set(0);
            if result >= 0 || -result == libc::ECANCELED {
                self.write_closed.set(true);
            }
        }
        let next = if self.tx.borrow().is_empty() {
            if self.shut_when_sent.replace(false) {
                // SAFETY: shutdown of the descriptor this channel owns.
                unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
            }
            None
        } else {
            Some(self.arm_send())
        };
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
        next
    }

    // ---------------------------------------------------------------- connecting, closing

    /// Marks a non-blocking connect in progress (before [`Channel::poll_connected`]).
    pub(super) fn connecting(&self) {
        self.connected.set(false);
    }

    pub(super) fn poll_connected(&self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        if self.connected.get() {
            return Poll::Ready(Ok(()));
        }
        self.write_waker.set(Some(cx.waker().clone()));
        if !self.connect_busy.get() {
            super::current().reactor.watch_connect(self)?;
        }
        Poll::Pending
    }

    /// The connect's one-shot write poll completed.
    pub(super) fn connect_done(&self) {
        self.connect_busy.set(false);
        self.connected.set(true);
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
    }

    /// Ends both directions for every handle: reads see end-of-stream now (a receive in
    /// flight is ended by `SHUT_RD`), writes fail from now on, and what was queued still goes
    /// out before the sending side is shut down.
    pub(super) fn shutdown(&self) {
        self.rx_end.set(true);
        // SAFETY: shutdown of the descriptor this channel owns.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
        self.shutdown_write();
    }

    /// Ends the sending side once what was queued has gone out; writes fail from now on.
    pub(super) fn shutdown_write(&self) {
        self.write_closed.set(true);
        if self.tx_bytes.get() == 0 && !self.send_busy.get() {
            // SAFETY: shutdown of the descriptor this channel owns.
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        } else {
            self.shut_when_sent.set(true);
        }
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
    }
}

/// What a stamped receive hands the kernel: the message header, its one vector and the
/// control buffer the timestamp comes back in.
pub(crate) struct RxStamps {
    msg: libc::msghdr,
    iov: libc::iovec,
    /// Room for one `SCM_TIMESTAMPNS` (a `cmsghdr` and a `timespec`, 32 bytes) and more;
    /// `u64`s for the alignment `cmsghdr` needs.
    control: [u64; 8],
}

impl RxStamps {
    fn new() -> RxStamps {
        RxStamps {
            // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid
            // (null pointers, zero lengths).
            msg: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            control: [0; 8],
        }
    }

    /// Points the header at `len` bytes at `ptr` and at the control buffer; returns it.
    fn arm(&mut self, ptr: *mut u8, len: usize) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        self.msg.msg_name = std::ptr::null_mut();
        self.msg.msg_namelen = 0;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = self.control.as_mut_ptr().cast();
        self.msg.msg_controllen = std::mem::size_of_val(&self.control);
        self.msg.msg_flags = 0;
        &mut self.msg
    }

    /// The `SCM_TIMESTAMPNS` the last receive brought, in ns since the Unix epoch.
    fn stamp(&self) -> Option<u64> {
        if self.msg.msg_controllen > std::mem::size_of_val(&self.control) {
            return None;
        }
        // SAFETY: the header points at this struct's control buffer, whose length the
        // kernel set (checked above to lie within it); the CMSG_* walk stays inside it.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&self.msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                    let ns = (ts.tv_sec as u64)
                        .saturating_mul(1_000_000_000)
                        .saturating_add(ts.tv_nsec as u64);
                    return Some(ns);
                }
                cmsg = libc::CMSG_NXTHDR(&self.msg, cmsg);
            }
        }
        None
    }
}
