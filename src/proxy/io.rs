//! Socket helpers for sessions: reading through the shard's scratch buffer, splitting a socket
//! into a read half and a write half, timeouts, and last-gasp writes.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::AsyncRead;
use glommio::net::TcpStream;

/// Reads at most `chunk` bytes from `stream` and appends exactly the bytes read to `buf`.
///
/// Why a shard-wide scratch buffer instead of reading into `buf`'s spare capacity: that
/// capacity is uninitialised, and handing it to `poll_read` as `&mut [u8]` would be undefined
/// behaviour, while zeroing it on every read costs a memset of the whole chunk per message.
/// glommio's non-buffered `poll_read` is a plain non-blocking `recv` into the slice or a
/// `Pending` that keeps no reference to it, so the scratch borrow never outlives one poll and
/// one scratch buffer serves every connection of the shard. The copy is of the bytes actually
/// read only.
pub(crate) async fn read_into(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    scratch: &RefCell<Box<[u8]>>,
) -> io::Result<usize> {
    futures_lite::future::poll_fn(|cx| {
        let mut scratch = scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) => {
                buf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// A second handle on the same socket, so one task can read while another writes without a
/// lock between them (both tasks live on the same shard).
pub(crate) fn duplicate(stream: &TcpStream) -> io::Result<TcpStream> {
    let fd = duplicate_fd(stream.as_raw_fd())?;
    // SAFETY: `fd` is a fresh descriptor we own exclusively; the new TcpStream closes it.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// `dup(2)` into an owned descriptor.
pub(crate) fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `dup` has no memory-safety preconditions; a negative result is checked below.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Shuts both directions of a socket down so that every handle on it (the other task's
/// duplicate included) sees end-of-stream at once. Errors mean it is already closed.
pub(crate) fn shutdown_both(fd: RawFd) {
    // SAFETY: shutdown(2) on an fd we hold open; failure is harmless and ignored.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Best-effort, non-blocking write of a short message (an ErrorResponse) to a socket owned by
/// a task we are about to cancel or interrupt. A full socket buffer loses the message, which
/// is acceptable: the connection is being closed either way.
pub(crate) fn send_now(fd: RawFd, bytes: &[u8]) {
    // SAFETY: the pointer and length describe a live slice; MSG_NOSIGNAL avoids SIGPIPE.
    unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// Runs `fut` for at most `limit`; `None` when time ran out (the future is dropped).
pub(crate) async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}
