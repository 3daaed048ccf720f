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
//! `--pool N` makes it the pooled floor instead: the least a transaction pooler does per
//! transaction (`POOL_FLOOR=1 benches/pool-pgbench.sh`). N server connections in all, split
//! evenly over the loops (N >= loops), each opened and logged in (trust authentication, as
//! `--user` to `--database`, both `postgres` unless given) when its loop starts; each loop
//! lends only its own, as pgprism's shards do. The floor answers a client's startup itself
//! (SSLRequest and GSSENCRequest: 'N'; the startup packet, whatever parameters it asks for:
//! AuthenticationOk, the server's ParameterStatus messages as its first connection got them,
//! one BackendKeyData for the whole loop, ReadyForQuery 'I'; a CancelRequest is closed). After
//! that it frames each direction by the 5-byte message headers alone: a client with bytes to
//! send and no server connection takes the loop's idle connection last given back, or waits
//! in the loop's FIFO line (as long as the loop's clients, which file descriptors bound); what
//! one `recv` brought goes to the server in one `send`, and what the server sends goes to the
//! client as it came. A connection goes back when the server's ReadyForQuery says 'I' and no
//! other is due: one is due for every Query, Sync and FunctionCall the client sent, and none
//! while the client's last message sent is not one of those (or CopyDone, CopyFail), so a
//! pipelined or half-sent extended batch keeps it. A Terminate closes the client and is never
//! forwarded. A client that leaves holding a connection leaves it to drain its answers back
//! into the pool; one left inside a transaction block or mid-message is closed and opened
//! anew (blocking the loop for that login). No SQL is read and no prepared statement is
//! mapped: `pgbench -M simple` and `-M extended` (unnamed statements) work, `-M prepared` does
//! not (its named statements live on one server connection and its next transaction may get
//! another). No mirror with `--pool`.
//!
//!   cargo bench --bench floor-forwarder -- [--threads N] 127.0.0.1:55504 127.0.0.1:55501 [127.0.0.1:55601]
//!   cargo bench --bench floor-forwarder -- [--threads N] --pool 20 [--user U] [--database D] 127.0.0.1:55506 127.0.0.1:55501

use std::collections::VecDeque;
use std::io::{self, Read, Write};
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
    let mut pool: Option<usize> = None;
    let mut user = String::from("postgres");
    let mut database = String::from("postgres");
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let value = args.get(1).cloned().unwrap_or_else(|| usage());
        let count = || value.parse().ok().filter(|&n: &usize| n >= 1);
        match args[0].as_str() {
            "--threads" => threads = count().unwrap_or_else(|| usage()),
            "--pool" => pool = Some(count().unwrap_or_else(|| usage())),
            "--user" => user = value,
            "--database" => database = value,
            _ => usage(),
        }
        args.drain(..2);
    }
    let (Some(listen), Some(upstream)) = (args.first().cloned(), args.get(1).cloned()) else {
        usage()
    };
    let mirror = args.get(2).cloned();
    if pool.is_some_and(|n| n < threads) || (pool.is_some() && mirror.is_some()) {
        usage();
    }
    // Loop i's part of the pool: N split evenly, the first N mod loops one more.
    let pooled = move |i: usize| {
        pool.map(|n| Pooled {
            size: n / threads + usize::from(i < n % threads),
            user: user.clone(),
            database: database.clone(),
            key: i as u32 + 1,
        })
    };
    if threads == 1 {
        let listener = TcpListener::bind(&listen)?;
        return match pooled(0) {
            Some(p) => serve_pooled(listener, &upstream, &p),
            None => serve(listener, &upstream, mirror.as_ref()),
        };
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
        let (upstream, mirror, pooled) = (upstream.clone(), mirror.clone(), pooled(i));
        handles.push(std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by CPU_SET below.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: the index is below the set's size (cores of this machine).
            unsafe { libc::CPU_SET(i % cores, &mut set) };
            // SAFETY: pins the calling thread (pid 0) to the set built above.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
            match pooled {
                Some(p) => serve_pooled(listener, &upstream, &p),
                None => serve(listener, &upstream, mirror.as_ref()),
            }
        }));
    }
    for h in handles {
        h.join().expect("a floor loop panicked")?;
    }
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: floor-forwarder [--threads N] LISTEN_ADDR UPSTREAM_ADDR [MIRROR_ADDR]\n       \
         floor-forwarder [--threads N] --pool N [--user U] [--database D] LISTEN_ADDR UPSTREAM_ADDR\n\
         (--pool: at least one server connection per loop, no mirror)"
    );
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
    // SAFETY: every entry points into a buffer that lives until its completion: a session's
    // (a session is dropped only when no operation of its is in flight), a pooled client's
    // (likewise), a pooled server connection's or a pooled loop's greeting (both live as
    // long as the loop), or `REFUSE`.
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

// The pooled floor (`--pool N`).

/// PostgreSQL's own limit on a startup packet's length.
const STARTUP_MAX: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const PROTOCOL_3: u32 = 3 << 16;
/// The floor's server connections, as `pg_stat_activity.application_name` shows them.
const APPLICATION_NAME: &str = "pgprism-pool-floor";
/// Answer to an SSLRequest or a GSSENCRequest: not here.
static REFUSE: [u8; 1] = *b"N";

// Operations of the pooled floor, in the low bits of user_data (a client's or a server's index
// above them, as the comment of each says).
/// Client index: bytes from the client (its startup, then its messages).
const POOL_RECV_CLIENT: u64 = 0;
/// Client index: the floor's own answer to a startup packet or an SSLRequest.
const POOL_REPLY: u64 = 1;
/// Client index: the client's bytes to the server connection it holds.
const POOL_SEND_SERVER: u64 = 2;
/// Server index: bytes from a server connection.
const POOL_RECV_SERVER: u64 = 3;
/// Server index: a server connection's bytes to the client holding it.
const POOL_SEND_CLIENT: u64 = 4;

/// What one pooled loop lends and how it logs in.
struct Pooled {
    /// This loop's server connections.
    size: usize,
    user: String,
    database: String,
    /// Both halves of the BackendKeyData every client of the loop gets.
    key: u32,
}

/// Where a byte stream stands in its messages, found by their 5-byte headers alone.
#[derive(Default)]
struct Framer {
    header: [u8; 5],
    /// Header bytes seen of the current message (0: the next byte starts a message).
    have: usize,
    /// Body bytes still to come of the current message, once its header is whole.
    rest: usize,
}

/// What a [`Framer`] tells its caller.
enum Event {
    /// The first byte of a message, its type.
    Start(u8),
    /// The last byte of a message has been seen: its type and that byte.
    End(u8, u8),
}

enum Scan {
    Done,
    /// The caller stopped the walk at the first byte of a message at this offset.
    Stopped(usize),
    /// A length below 4: not this protocol.
    Bad,
}

impl Framer {
    /// Walks `bytes`, telling `on` of every message's start and end; `on` returning true at a
    /// start stops the walk there.
    fn scan(&mut self, bytes: &[u8], mut on: impl FnMut(Event) -> bool) -> Scan {
        let mut i = 0;
        while i < bytes.len() {
            if self.rest > 0 {
                let skip = self.rest.min(bytes.len() - i);
                i += skip;
                self.rest -= skip;
                if self.rest == 0 {
                    on(Event::End(self.header[0], bytes[i - 1]));
                }
                continue;
            }
            if self.have == 0 && on(Event::Start(bytes[i])) {
                return Scan::Stopped(i);
            }
            self.header[self.have] = bytes[i];
            self.have += 1;
            i += 1;
            if self.have == 5 {
                self.have = 0;
                let length = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if length < 4 {
                    return Scan::Bad;
                }
                self.rest = length - 4;
                if self.rest == 0 {
                    on(Event::End(self.header[0], self.header[4]));
                }
            }
        }
        Scan::Done
    }
}

struct Client {
    fd: RawFd,
    /// The startup packet, then what one `recv` brought, until it has all been sent.
    buffer: Box<[u8]>,
    filled: usize,
    sent: usize,
    /// Past the startup packet.
    ready: bool,
    /// The floor's answer being sent: `REFUSE` or the greeting (`greeted`), and how far.
    greeted: bool,
    reply_sent: usize,
    framer: Framer,
    /// ReadyForQuery messages the bytes in `buffer` will be owed.
    syncs: u32,
    /// The last message begun is not a Query, Sync, FunctionCall, CopyDone or CopyFail.
    tail_open: bool,
    /// A Terminate came after the bytes in `buffer`: close once they are sent.
    closing: bool,
    waiting: bool,
    server: Option<usize>,
    /// The server connection the `POOL_SEND_SERVER` in flight writes to.
    sending_to: usize,
    in_flight: u32,
    ended: bool,
}

struct Server {
    fd: RawFd,
    buffer: Box<[u8]>,
    filled: usize,
    sent: usize,
    framer: Framer,
    /// ReadyForQuery messages still due for what the holder sent.
    expect: u32,
    /// The holder's stream, as sent, ends inside an unfinished request.
    tail_open: bool,
    /// The bytes in `buffer` end the lease: give the connection back once they are sent.
    release: bool,
    holder: Option<usize>,
    /// Its holder left: answers are dropped until the lease would have ended.
    orphan: bool,
    /// The client the `POOL_SEND_CLIENT` in flight writes to.
    sending_to: usize,
    in_flight: u32,
    /// Shut down: closed and opened anew once no operation of it is in flight.
    broken: bool,
}

struct PoolLoop<'a> {
    ring: IoUring,
    upstream: &'a str,
    pooled: &'a Pooled,
    /// What every client's startup packet is answered with.
    greeting: Vec<u8>,
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    servers: Vec<Server>,
    /// Idle server connections, the last given back on top.
    idle: Vec<usize>,
    /// Clients with bytes to send and no server connection, first come first served.
    line: VecDeque<usize>,
}

/// One pooled loop: opens its server connections, then accepts on `listener` and lends them.
fn serve_pooled(listener: TcpListener, upstream: &str, pooled: &Pooled) -> io::Result<()> {
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)?;
    let mut floor = PoolLoop {
        ring,
        upstream,
        pooled,
        greeting: Vec::new(),
        clients: Vec::new(),
        free: Vec::new(),
        servers: Vec::new(),
        idle: Vec::new(),
        line: VecDeque::new(),
    };
    for s in 0..pooled.size {
        let (server, parameters) = login(upstream, pooled)?;
        if s == 0 {
            floor.greeting = greeting(&parameters, pooled.key);
        }
        floor.servers.push(Server {
            fd: server.into_raw_fd(),
            buffer: vec![0; BUFFER].into_boxed_slice(),
            filled: 0,
            sent: 0,
            framer: Framer::default(),
            expect: 0,
            tail_open: false,
            release: false,
            holder: None,
            orphan: false,
            sending_to: 0,
            in_flight: 0,
            broken: false,
        });
        floor.submit(POOL_RECV_SERVER, s);
        floor.idle.push(s);
    }
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    push(&mut floor.ring, &accept);
    let mut ready: Vec<(u64, i32)> = Vec::new();
    loop {
        floor.ring.submit_and_wait(1)?;
        ready.extend(
            floor
                .ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result())),
        );
        for (token, result) in ready.drain(..) {
            if token == ACCEPT {
                if result >= 0 {
                    floor.accepted(result);
                }
                push(&mut floor.ring, &accept);
                continue;
            }
            let index = (token >> OP_BITS) as usize;
            match token & ((1 << OP_BITS) - 1) {
                POOL_RECV_CLIENT => floor.client_received(index, result),
                POOL_REPLY => floor.replied(index, result),
                POOL_SEND_SERVER => floor.sent_to_server(index, result),
                POOL_RECV_SERVER => floor.server_received(index, result),
                _ => floor.sent_to_client(index, result),
            }
        }
    }
}

/// Opens a server connection and logs it in with trust authentication: the connection and
/// the ParameterStatus messages the server sent, as they came.
fn login(upstream: &str, pooled: &Pooled) -> io::Result<(TcpStream, Vec<u8>)> {
    let mut server = TcpStream::connect(upstream)?;
    server.set_nodelay(true)?;
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    for (key, value) in [
        ("user", pooled.user.as_str()),
        ("database", pooled.database.as_str()),
        ("application_name", APPLICATION_NAME),
    ] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = (body.len() as u32 + 4).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    server.write_all(&packet)?;
    let refused = |why: String| io::Error::other(format!("{upstream}: {why}"));
    let mut parameters = Vec::new();
    loop {
        let mut header = [0u8; 5];
        server.read_exact(&mut header)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=STARTUP_MAX).contains(&length) {
            return Err(refused(format!("a message of {length} bytes at login")));
        }
        let mut body = vec![0; length - 4];
        server.read_exact(&mut body)?;
        match header[0] {
            b'R' if body != [0; 4] => {
                return Err(refused(format!(
                    "asks for authentication ({body:?}); the pooled floor logs in with trust only"
                )));
            }
            b'S' => {
                parameters.extend_from_slice(&header);
                parameters.extend_from_slice(&body);
            }
            b'E' => return Err(refused(String::from_utf8_lossy(&body).replace('\0', " "))),
            b'Z' => return Ok((server, parameters)),
            _ => {} // AuthenticationOk, BackendKeyData, notices
        }
    }
}

/// AuthenticationOk, the server's ParameterStatus messages, BackendKeyData, ReadyForQuery 'I'.
fn greeting(parameters: &[u8], key: u32) -> Vec<u8> {
    let mut g = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    g.extend_from_slice(parameters);
    g.extend_from_slice(&[b'K', 0, 0, 0, 12]);
    g.extend_from_slice(&key.to_be_bytes());
    g.extend_from_slice(&key.to_be_bytes());
    g.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    g
}

/// A client the loop still holds (its slot is emptied only when it has ended and no operation
/// of it is in flight, so an index in a completion or a link always finds it).
fn live(clients: &mut [Option<Client>], c: usize) -> &mut Client {
    clients[c].as_mut().expect("a live client")
}

impl PoolLoop<'_> {
    fn accepted(&mut self, fd: RawFd) {
        // SAFETY: the kernel handed us this new descriptor.
        let client = unsafe { TcpStream::from_raw_fd(fd) };
        // Without it the answers wait on Nagle: slower, not wrong.
        let _ = client.set_nodelay(true);
        let client = Client {
            fd: client.into_raw_fd(),
            buffer: vec![0; BUFFER].into_boxed_slice(),
            filled: 0,
            sent: 0,
            ready: false,
            greeted: false,
            reply_sent: 0,
            framer: Framer::default(),
            syncs: 0,
            tail_open: false,
            closing: false,
            waiting: false,
            server: None,
            sending_to: 0,
            in_flight: 0,
            ended: false,
        };
        let c = match self.free.pop() {
            Some(c) => {
                self.clients[c] = Some(client);
                c
            }
            None => {
                self.clients.push(Some(client));
                self.clients.len() - 1
            }
        };
        self.submit(POOL_RECV_CLIENT, c);
    }

    fn client_received(&mut self, c: usize, result: i32) {
        let client = live(&mut self.clients, c);
        client.in_flight -= 1;
        if result <= 0 || client.ended {
            self.end_client(c);
            self.reap_client(c);
            return;
        }
        client.filled += result as usize;
        if client.ready {
            self.messages(c);
        } else {
            self.startup(c);
        }
    }

    /// Answers the startup packet (or SSLRequest) in the buffer, or reads on for it.
    fn startup(&mut self, c: usize) {
        let client = live(&mut self.clients, c);
        if client.filled < 8 {
            self.submit(POOL_RECV_CLIENT, c);
            return;
        }
        let word = |at: usize| u32::from_be_bytes(client.buffer[at..at + 4].try_into().unwrap());
        let (length, code) = (word(0) as usize, word(4));
        if !(8..=STARTUP_MAX).contains(&length) {
            self.end_client(c);
            self.reap_client(c);
            return;
        }
        if client.filled < length {
            self.submit(POOL_RECV_CLIENT, c);
            return;
        }
        // Whatever came after the packet is the client's first messages.
        client.buffer.copy_within(length..client.filled, 0);
        client.filled -= length;
        client.reply_sent = 0;
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            client.greeted = false;
        } else if code >> 16 == 3 {
            (client.greeted, client.ready) = (true, true);
        } else {
            // A CancelRequest (nothing to cancel: the floor's keys name no backend) or junk.
            self.end_client(c);
            self.reap_client(c);
            return;
        }
        self.submit(POOL_REPLY, c);
    }

    fn replied(&mut self, c: usize, result: i32) {
        let greeting_length = self.greeting.len();
        let client = live(&mut self.clients, c);
        client.in_flight -= 1;
        if result <= 0 || client.ended {
            self.end_client(c);
            self.reap_client(c);
            return;
        }
        client.reply_sent += result as usize;
        let length = if client.greeted {
            greeting_length
        } else {
            REFUSE.len()
        };
        if client.reply_sent < length {
            self.submit(POOL_REPLY, c);
        } else if !client.ready {
            self.startup(c);
        } else if client.filled > 0 {
            self.messages(c);
        } else {
            self.submit(POOL_RECV_CLIENT, c);
        }
    }

    /// Frames the client's new bytes (the whole buffer), then sends them to its server
    /// connection, takes an idle one, or joins the line.
    fn messages(&mut self, c: usize) {
        let client = live(&mut self.clients, c);
        let (mut syncs, mut tail_open) = (0, client.tail_open);
        let scan = client
            .framer
            .scan(&client.buffer[..client.filled], |event| match event {
                Event::Start(b'X') => true,
                Event::Start(_) => {
                    tail_open = true;
                    false
                }
                // Query, Sync, FunctionCall: a ReadyForQuery is owed.
                Event::End(b'Q' | b'S' | b'F', _) => {
                    syncs += 1;
                    tail_open = false;
                    false
                }
                // CopyDone, CopyFail: the COPY's statement ends with the ReadyForQuery owed.
                Event::End(b'c' | b'f', _) => {
                    tail_open = false;
                    false
                }
                Event::End(..) => false,
            });
        (client.syncs, client.tail_open) = (syncs, tail_open);
        match scan {
            Scan::Done => {}
            Scan::Stopped(at) => (client.filled, client.closing) = (at, true),
            Scan::Bad => client.filled = 0,
        }
        if client.filled == 0 {
            // Terminate, or not this protocol.
            self.end_client(c);
            self.reap_client(c);
            return;
        }
        client.sent = 0;
        if client.server.is_some() {
            self.send_to_server(c);
        } else if let Some(s) = self.idle.pop() {
            self.lend(s, c);
        } else {
            live(&mut self.clients, c).waiting = true;
            self.line.push_back(c);
        }
    }

    fn lend(&mut self, s: usize, c: usize) {
        let client = live(&mut self.clients, c);
        (client.server, client.waiting) = (Some(s), false);
        let server = &mut self.servers[s];
        (server.holder, server.orphan) = (Some(c), false);
        self.send_to_server(c);
    }

    /// The first `send` of the client's buffer: the server connection is owed its answers.
    fn send_to_server(&mut self, c: usize) {
        let client = live(&mut self.clients, c);
        let s = client.server.expect("a server connection");
        let (syncs, tail_open) = (client.syncs, client.tail_open);
        client.syncs = 0;
        let server = &mut self.servers[s];
        server.expect += syncs;
        server.tail_open = tail_open;
        // More of the lease: a pipelining client's bytes can overtake the answer that would
        // have ended it.
        server.release = false;
        self.submit(POOL_SEND_SERVER, c);
    }

    fn sent_to_server(&mut self, c: usize, result: i32) {
        let client = live(&mut self.clients, c);
        client.in_flight -= 1;
        let s = client.sending_to;
        self.servers[s].in_flight -= 1;
        let client = live(&mut self.clients, c);
        if result > 0 {
            client.sent += result as usize;
        }
        if client.sent < client.filled {
            if result > 0 && !client.ended && !self.servers[s].broken {
                self.submit(POOL_SEND_SERVER, c);
            } else {
                // Half a message reached the server: it would wait for the rest.
                self.end_client(c);
                self.break_server(s);
            }
        } else if client.closing {
            self.end_client(c);
        } else if !client.ended {
            client.filled = 0;
            self.submit(POOL_RECV_CLIENT, c);
        }
        self.reap_client(c);
        self.settle_server(s);
    }

    fn server_received(&mut self, s: usize, result: i32) {
        let server = &mut self.servers[s];
        server.in_flight -= 1;
        if result <= 0 || server.broken {
            if !server.broken {
                eprintln!("floor: a server connection closed ({result}); opening another");
            }
            self.break_server(s);
            self.settle_server(s);
            return;
        }
        (server.filled, server.sent) = (result as usize, 0);
        let Server {
            framer,
            buffer,
            expect,
            tail_open,
            release,
            filled,
            ..
        } = &mut *server;
        let scan = framer.scan(&buffer[..*filled], |event| {
            if let Event::End(b'Z', status) = event {
                *expect = expect.saturating_sub(1);
                *release = *expect == 0 && status == b'I' && !*tail_open;
            }
            false
        });
        if matches!(scan, Scan::Bad) {
            self.break_server(s);
            self.settle_server(s);
            return;
        }
        match server.holder {
            Some(c) => {
                server.sending_to = c;
                self.submit(POOL_SEND_CLIENT, s);
            }
            None => self.server_sent(s),
        }
    }

    fn sent_to_client(&mut self, s: usize, result: i32) {
        let server = &mut self.servers[s];
        server.in_flight -= 1;
        let c = server.sending_to;
        live(&mut self.clients, c).in_flight -= 1;
        let server = &mut self.servers[s];
        if result > 0 {
            server.sent += result as usize;
        }
        let client = self.clients[c].as_ref().expect("a live client");
        if server.sent < server.filled && result > 0 && !client.ended && !server.broken {
            self.submit(POOL_SEND_CLIENT, s);
            return;
        }
        if result <= 0 {
            self.end_client(c);
        }
        self.reap_client(c);
        self.server_sent(s);
    }

    /// The server's bytes in the buffer are sent (or dropped): end the lease if they did, and
    /// read on.
    fn server_sent(&mut self, s: usize) {
        let server = &mut self.servers[s];
        server.filled = 0;
        if server.broken {
            self.settle_server(s);
            return;
        }
        if server.release {
            server.release = false;
            if let Some(c) = server.holder.take() {
                live(&mut self.clients, c).server = None;
            }
            self.give(s);
        } else if server.orphan && server.expect == 0 {
            // Its client left inside a transaction block.
            self.break_server(s);
            self.settle_server(s);
            return;
        }
        self.submit(POOL_RECV_SERVER, s);
    }

    /// Hands an idle server connection to the first in line, or keeps it.
    fn give(&mut self, s: usize) {
        self.servers[s].orphan = false;
        match self.line.pop_front() {
            Some(c) => self.lend(s, c),
            None => self.idle.push(s),
        }
    }

    /// Shuts the client down; the server connection it holds drains or is replaced.
    fn end_client(&mut self, c: usize) {
        let client = live(&mut self.clients, c);
        if client.ended {
            return;
        }
        client.ended = true;
        // SAFETY: shutdown of a descriptor this loop owns; its operations in flight complete.
        unsafe { libc::shutdown(client.fd, libc::SHUT_RDWR) };
        if client.waiting {
            client.waiting = false;
            self.line.retain(|&w| w != c);
        }
        let Some(s) = live(&mut self.clients, c).server.take() else {
            return;
        };
        let server = &mut self.servers[s];
        (server.holder, server.orphan) = (None, true);
        // Left mid-request, or idle in a transaction block: the connection cannot be lent.
        if server.tail_open || (server.expect == 0 && !server.release) {
            self.break_server(s);
        }
    }

    /// Closes the client once it has ended and no operation of it is in flight.
    fn reap_client(&mut self, c: usize) {
        let client = live(&mut self.clients, c);
        if client.ended && client.in_flight == 0 {
            // SAFETY: closed once, after its last operation completed.
            unsafe { libc::close(client.fd) };
            self.clients[c] = None;
            self.free.push(c);
        }
    }

    fn break_server(&mut self, s: usize) {
        let server = &mut self.servers[s];
        if server.broken {
            return;
        }
        server.broken = true;
        // SAFETY: shutdown of a descriptor this loop owns; its operations in flight complete.
        unsafe { libc::shutdown(server.fd, libc::SHUT_RDWR) };
        self.idle.retain(|&i| i != s);
        if let Some(c) = self.servers[s].holder.take() {
            live(&mut self.clients, c).server = None;
            self.end_client(c);
            self.reap_client(c);
        }
    }

    /// Replaces a broken server connection once no operation of it is in flight.
    fn settle_server(&mut self, s: usize) {
        let server = &mut self.servers[s];
        if !server.broken || server.in_flight > 0 {
            return;
        }
        // SAFETY: closed once, after its last operation completed.
        unsafe { libc::close(server.fd) };
        let fd = match login(self.upstream, self.pooled) {
            Ok((fresh, _)) => fresh.into_raw_fd(),
            Err(e) => {
                eprintln!("floor: cannot open a server connection again: {e}");
                std::process::exit(1);
            }
        };
        let server = &mut self.servers[s];
        (server.fd, server.filled, server.sent, server.framer) = (fd, 0, 0, Framer::default());
        (server.expect, server.tail_open, server.release) = (0, false, false);
        (server.holder, server.orphan, server.broken) = (None, false, false);
        self.submit(POOL_RECV_SERVER, s);
        self.give(s);
    }

    fn submit(&mut self, op: u64, index: usize) {
        let user_data = ((index as u64) << OP_BITS) | op;
        let entry = match op {
            POOL_RECV_CLIENT => {
                let client = self.clients[index].as_mut().expect("a live client");
                client.in_flight += 1;
                let free = &mut client.buffer[client.filled..];
                opcode::Recv::new(types::Fd(client.fd), free.as_mut_ptr(), free.len() as u32)
                    .build()
            }
            POOL_REPLY => {
                let client = self.clients[index].as_mut().expect("a live client");
                client.in_flight += 1;
                let reply: &[u8] = if client.greeted {
                    &self.greeting
                } else {
                    &REFUSE
                };
                let rest = &reply[client.reply_sent..];
                opcode::Send::new(types::Fd(client.fd), rest.as_ptr(), rest.len() as u32).build()
            }
            POOL_SEND_SERVER => {
                let client = self.clients[index].as_mut().expect("a live client");
                let s = client.server.expect("a server connection");
                client.in_flight += 1;
                client.sending_to = s;
                let server = &mut self.servers[s];
                server.in_flight += 1;
                let rest = &client.buffer[client.sent..client.filled];
                opcode::Send::new(types::Fd(server.fd), rest.as_ptr(), rest.len() as u32).build()
            }
            POOL_RECV_SERVER => {
                let server = &mut self.servers[index];
                server.in_flight += 1;
                opcode::Recv::new(
                    types::Fd(server.fd),
                    server.buffer.as_mut_ptr(),
                    BUFFER as u32,
                )
                .build()
            }
            _ => {
                let server = &mut self.servers[index];
                let client = self.clients[server.sending_to]
                    .as_mut()
                    .expect("a live client");
                server.in_flight += 1;
                client.in_flight += 1;
                let rest = &server.buffer[server.sent..server.filled];
                opcode::Send::new(types::Fd(client.fd), rest.as_ptr(), rest.len() as u32).build()
            }
        };
        push(&mut self.ring, &entry.user_data(user_data));
    }
}
