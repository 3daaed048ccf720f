//! The floor of any proxy on this machine: a byte forwarder that understands nothing of the
//! PostgreSQL protocol and does the least work a proxy can do per message. One thread, one
//! io_uring; every client connection gets one upstream connection; each direction is one
//! `recv` into a fixed buffer and one `send` of what arrived, both as io_uring operations, so
//! a loop turn submits all pending operations and reaps all completions with a single
//! `io_uring_enter`.
//!
//! It exists to measure, in the same run as pgprism and PgBouncer, what the kernel alone costs
//! per pgbench transaction (`FLOOR=1 benches/proxy-pgbench.sh`): a PostgreSQL proxy receives
//! and sends every message this forwarder does, and more. It is not part of pgprism.
//!
//!   cargo bench --bench floor-forwarder -- 127.0.0.1:55504 127.0.0.1:55501

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use io_uring::{IoUring, opcode, types};

const BUFFER: usize = 64 * 1024;
const ACCEPT: u64 = u64::MAX;

/// One direction of a connection pair: bytes read from `from` are written to `to`.
struct Pipe {
    from: RawFd,
    to: RawFd,
    buffer: Box<[u8]>,
    /// Bytes of `buffer` received and not yet sent, and how many of them were sent.
    filled: usize,
    sent: usize,
    closed: bool,
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: floor-forwarder LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(listen)?;
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)?;
    let mut pipes: Vec<Option<Pipe>> = Vec::new();
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    // SAFETY: accept references no user memory.
    unsafe { ring.submission().push(&accept) }.expect("empty queue");
    let mut ready: Vec<(u64, i32)> = Vec::new();
    loop {
        ring.submit_and_wait(1)?;
        ready.extend(
            ring.completion()
                .map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result())),
        );
        for (token, result) in ready.drain(..) {
            if token == ACCEPT {
                if result >= 0 {
                    // SAFETY: the kernel handed us this new descriptor.
                    let client =
                        unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(result) };
                    if let Ok(server) = TcpStream::connect(upstream.as_str()) {
                        client.set_nodelay(true)?;
                        server.set_nodelay(true)?;
                        let (c, s) = (client.into_raw_fd(), server.into_raw_fd());
                        for (from, to) in [(c, s), (s, c)] {
                            let index = pipes.len();
                            pipes.push(Some(Pipe {
                                from,
                                to,
                                buffer: vec![0; BUFFER].into_boxed_slice(),
                                filled: 0,
                                sent: 0,
                                closed: false,
                            }));
                            submit_recv(&mut ring, &mut pipes, index);
                        }
                    }
                }
                // SAFETY: as above.
                unsafe { ring.submission().push(&accept) }.expect("queue drained by submit");
                continue;
            }
            let index = (token >> 1) as usize;
            let is_send = token & 1 == 1;
            let Some(pipe) = pipes[index].as_mut() else {
                continue;
            };
            if result <= 0 {
                // End of stream or an error: close this pair's direction (the kernel's close
                // ends the peer direction's recv with 0 or an error in turn).
                if !pipe.closed {
                    pipe.closed = true;
                    // SAFETY: shutdown of descriptors this process owns.
                    unsafe {
                        libc::shutdown(pipe.from, libc::SHUT_RDWR);
                        libc::shutdown(pipe.to, libc::SHUT_RDWR);
                    }
                }
                let partner = index ^ 1;
                if pipes[partner].as_ref().is_none_or(|p| p.closed) {
                    for i in [index, partner] {
                        if let Some(p) = pipes[i].take() {
                            // SAFETY: each descriptor is closed once, by the pipe reading it.
                            unsafe { libc::close(p.from) };
                        }
                    }
                }
                continue;
            }
            if is_send {
                pipe.sent += result as usize;
                if pipe.sent < pipe.filled {
                    submit_send(&mut ring, &mut pipes, index);
                } else {
                    submit_recv(&mut ring, &mut pipes, index);
                }
            } else {
                pipe.filled = result as usize;
                pipe.sent = 0;
                submit_send(&mut ring, &mut pipes, index);
            }
        }
    }
}

fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) {
    // SAFETY: the entry points into a pipe buffer that lives until its completion.
    while unsafe { ring.submission().push(entry) }.is_err() {
        ring.submit().expect("io_uring_enter");
    }
}

fn submit_recv(ring: &mut IoUring, pipes: &mut [Option<Pipe>], index: usize) {
    let pipe = pipes[index].as_mut().expect("live pipe");
    let entry = opcode::Recv::new(
        types::Fd(pipe.from),
        pipe.buffer.as_mut_ptr(),
        pipe.buffer.len() as u32,
    )
    .build()
    .user_data((index as u64) << 1);
    push(ring, &entry);
}

fn submit_send(ring: &mut IoUring, pipes: &mut [Option<Pipe>], index: usize) {
    let pipe = pipes[index].as_mut().expect("live pipe");
    let rest = &pipe.buffer[pipe.sent..pipe.filled];
    let entry = opcode::Send::new(types::Fd(pipe.to), rest.as_ptr(), rest.len() as u32)
        .build()
        .user_data(((index as u64) << 1) | 1);
    push(ring, &entry);
}
