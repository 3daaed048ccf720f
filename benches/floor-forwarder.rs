//! The floor of any proxy on this machine: a byte forwarder that understands nothing of the
//! PostgreSQL protocol and does the least work a proxy can do per message. One thread, one
//! io_uring; every client connection gets one upstream connection (and, given a third
//! address, one mirror connection); each direction is one `recv` into a fixed buffer and one
//! `send` of what arrived, as io_uring operations, so a loop turn submits everything pending
//! and reaps all completions with a single `io_uring_enter`.
//!
//! `--threads N` runs N such loops, thread i pinned to core i mod the cores, each with its own
//! listening socket on the same address (`SO_REUSEPORT`: the kernel spreads the clients), as
//! pgprism's shards are laid out by default: the floor of a proxy with one event loop per
//! core, which sleeps and wakes per loop as pgprism's shards do.
//!
//! It exists to measure, in the same run as pgprism and PgBouncer, what the kernel alone costs
//! per pgbench transaction (`FLOOR=1 benches/proxy-pgbench.sh`): a PostgreSQL proxy receives
//! and sends every message this forwarder does, and more. With a mirror address it also sends
//! every client byte to the mirror and reads (and drops) the mirror's answers: the floor of a
//! proxy with one mirror or one shadow (`FLOOR=1 benches/mirror-pgbench.sh`); its clients must
//! not ask for TLS (`PGSSLMODE=disable`), since a byte copy of an SSLRequest followed by the
//! startup packet, unanswered, is refused by the mirror. It is not part of pgprism.
//!
//!   cargo bench --bench floor-forwarder -- [--threads N] 127.0.0.1:55504 127.0.0.1:55501 [127.0.0.1:55601]

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

const BUFFER: usize = 64 * 1024;
const ACCEPT: u64 = u64::MAX;

// Operations of a session, in the low bits of user_data (the session index above them).
const RECV_CLIENT: u64 = 0;
const SEND_SERVER: u64 = 1;
const SEND_MIRROR: u64 = 2;
const RECV_SERVER: u64 = 3;
const SEND_CLIENT: u64 = 4;
const RECV_MIRROR: u64 = 5;
const OP_BITS: u64 = 3;

/// A buffer being sent: `filled` bytes received, `sent` of them sent.
struct Outgoing {
    buffer: Box<[u8]>,
    filled: usize,
    sent_server: usize,
    sent_mirror: usize,
}

struct Session {
    client: RawFd,
    server: RawFd,
    mirror: Option<RawFd>,
    /// Client bytes on their way to the server (and the mirror).
    upstream: Outgoing,
    /// Server bytes on their way to the client (`sent_server` counts what the client got).
    downstream: Outgoing,
    /// The mirror's answers, read and dropped.
    sink: Box<[u8]>,
    /// Operations in flight; the session is closed when it ends and none is left.
    in_flight: u32,
    ended: bool,
}

fn outgoing() -> Outgoing {
    Outgoing {
        buffer: vec![0; BUFFER].into_boxed_slice(),
        filled: 0,
        sent_server: 0,
        sent_mirror: 0,
    }
}

fn main() -> io::Result<()> {
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut threads = 1usize;
    if args.first().map(String::as_str) == Some("--threads") {
        threads = args
            .get(1)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| usage());
        args.drain(..2);
    }
    let (Some(listen), Some(upstream)) = (args.first().cloned(), args.get(1).cloned()) else {
        usage()
    };
    let mirror = args.get(2).cloned();
    if threads == 1 {
        return serve(TcpListener::bind(&listen)?, &upstream, mirror.as_ref());
    }
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{listen}: {e}")))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::new();
    for i in 0..threads {
        // Every loop's listener is bound before any thread starts, so a client that connects
        // once the process is listening finds all of them.
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: TcpListener = socket.into();
        let (upstream, mirror) = (upstream.clone(), mirror.clone());
        handles.push(std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by CPU_SET below.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: the index is below the set's size (cores of this machine).
            unsafe { libc::CPU_SET(i % cores, &mut set) };
            // SAFETY: pins the calling thread (pid 0) to the set built above.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
            serve(listener, &upstream, mirror.as_ref())
        }));
    }
    for h in handles {
        h.join().expect("a floor loop panicked")?;
    }
    Ok(())
}

fn usage() -> ! {
    eprintln!("usage: floor-forwarder [--threads N] LISTEN_ADDR UPSTREAM_ADDR [MIRROR_ADDR]");
    std::process::exit(2);
}

/// One loop: accepts on `listener` and forwards every session it accepted.
fn serve(listener: TcpListener, upstream: &str, mirror: Option<&String>) -> io::Result<()> {
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)?;
    let mut sessions: Vec<Option<Session>> = Vec::new();
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    push(&mut ring, &accept);
    let mut ready: Vec<(u64, i32)> = Vec::new();
    loop {
        ring.submit_and_wait(1)?;
        ready.extend(
            ring.completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result())),
        );
        for (token, result) in ready.drain(..) {
            if token == ACCEPT {
                if result >= 0 {
                    // SAFETY: the kernel handed us this new descriptor.
                    let client = unsafe { TcpStream::from_raw_fd(result) };
                    if let Some(session) = open(client, upstream, mirror)? {
                        let index = sessions.len();
                        sessions.push(Some(session));
                        let session = sessions[index].as_mut().expect("just pushed");
                        submit(&mut ring, session, index, RECV_CLIENT);
                        submit(&mut ring, session, index, RECV_SERVER);
                        if session.mirror.is_some() {
                            submit(&mut ring, session, index, RECV_MIRROR);
                        }
                    }
                }
                push(&mut ring, &accept);
                continue;
            }
            let index = (token >> OP_BITS) as usize;
            let op = token & ((1 << OP_BITS) - 1);
            let Some(session) = sessions[index].as_mut() else {
                continue;
            };
            session.in_flight -= 1;
            if result <= 0 || session.ended {
                end(session);
                if session.in_flight == 0 {
                    close(session);
                    sessions[index] = None;
                }
                continue;
            }
            let n = result as usize;
            match op {
                RECV_CLIENT => {
                    let up = &mut session.upstream;
                    (up.filled, up.sent_server, up.sent_mirror) = (n, 0, 0);
                    submit(&mut ring, session, index, SEND_SERVER);
                    if session.mirror.is_some() {
                        submit(&mut ring, session, index, SEND_MIRROR);
                    }
                }
                SEND_SERVER | SEND_MIRROR => {
                    let up = &mut session.upstream;
                    let sent = if op == SEND_SERVER {
                        &mut up.sent_server
                    } else {
                        &mut up.sent_mirror
                    };
                    *sent += n;
                    if *sent < up.filled {
                        submit(&mut ring, session, index, op);
                    } else if up.sent_server == up.filled
                        && (session.mirror.is_none() || up.sent_mirror == up.filled)
                    {
                        // Both copies are out: read the client again.
                        submit(&mut ring, session, index, RECV_CLIENT);
                    }
                }
                RECV_SERVER => {
                    let down = &mut session.downstream;
                    (down.filled, down.sent_server) = (n, 0);
                    submit(&mut ring, session, index, SEND_CLIENT);
                }
                SEND_CLIENT => {
                    let down = &mut session.downstream;
                    down.sent_server += n;
                    let op = if down.sent_server < down.filled {
                        SEND_CLIENT
                    } else {
                        RECV_SERVER
                    };
                    submit(&mut ring, session, index, op);
                }
                _ => submit(&mut ring, session, index, RECV_MIRROR),
            }
        }
    }
}

fn open(client: TcpStream, upstream: &str, mirror: Option<&String>) -> io::Result<Option<Session>> {
    let Ok(server) = TcpStream::connect(upstream) else {
        return Ok(None);
    };
    let mirror = match mirror {
        Some(addr) => match TcpStream::connect(addr.as_str()) {
            Ok(m) => {
                m.set_nodelay(true)?;
                Some(m.into_raw_fd())
            }
            Err(_) => return Ok(None),
        },
        None => None,
    };
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok(Some(Session {
        client: client.into_raw_fd(),
        server: server.into_raw_fd(),
        mirror,
        upstream: outgoing(),
        downstream: outgoing(),
        sink: vec![0; BUFFER].into_boxed_slice(),
        in_flight: 0,
        ended: false,
    }))
}

/// Shuts every socket of the session down, so its operations in flight complete.
fn end(session: &mut Session) {
    if session.ended {
        return;
    }
    session.ended = true;
    for fd in [Some(session.client), Some(session.server), session.mirror]
        .into_iter()
        .flatten()
    {
        // SAFETY: shutdown of descriptors this process owns.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

fn close(session: &Session) {
    for fd in [Some(session.client), Some(session.server), session.mirror]
        .into_iter()
        .flatten()
    {
        // SAFETY: each descriptor is closed once, after its last operation completed.
        unsafe { libc::close(fd) };
    }
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    // SAFETY: every entry points into a session buffer that lives until its completion (a
    // session is dropped only when no operation of its is in flight).
    while unsafe { ring.submission().push(entry) }.is_err() {
        ring.submit().expect("io_uring_enter");
    }
}

fn submit(ring: &mut IoUring, session: &mut Session, index: usize, op: u64) {
    let user_data = ((index as u64) << OP_BITS) | op;
    let up = &mut session.upstream;
    let down = &mut session.downstream;
    let entry = match op {
        RECV_CLIENT => opcode::Recv::new(
            types::Fd(session.client),
            up.buffer.as_mut_ptr(),
            BUFFER as u32,
        )
        .build(),
        SEND_SERVER | SEND_MIRROR => {
            let (fd, from) = if op == SEND_SERVER {
                (session.server, up.sent_server)
            } else {
                (session.mirror.expect("a mirror"), up.sent_mirror)
            };
            let rest = &up.buffer[from..up.filled];
            opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32).build()
        }
        RECV_SERVER => opcode::Recv::new(
            types::Fd(session.server),
            down.buffer.as_mut_ptr(),
            BUFFER as u32,
        )
        .build(),
        SEND_CLIENT => {
            let rest = &down.buffer[down.sent_server..down.filled];
            opcode::Send::new(types::Fd(session.client), rest.as_ptr(), rest.len() as u32).build()
        }
        _ => opcode::Recv::new(
            types::Fd(session.mirror.expect("a mirror")),
            session.sink.as_mut_ptr(),
            BUFFER as u32,
        )
        .build(),
    };
    session.in_flight += 1;
    push(ring, &entry.user_data(user_data));
}
