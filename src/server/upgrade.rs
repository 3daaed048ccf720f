//! Upgrade without dropping a client (SIGUSR2), as nginx and HAProxy do it: the serving
//! process starts the binary at the path it was started from, with the same arguments, and
//! hands it every listening socket (the shards' TCP sockets, the Unix socket, the admin
//! socket) over a Unix socketpair with `SCM_RIGHTS`. The new process starts on those sockets
//! (binding only what is missing), says READY to systemd with its pid, then says `ready` on
//! the socketpair; only then does the old process stop accepting and drain. The sockets stay
//! open throughout, so a connection waiting in a backlog is accepted by whichever process
//! accepts next: none is refused.
//!
//! This module owns the hand-over protocol and the child process; it never touches a shard
//! or a session. A failed new binary (bad config, crash, silence past
//! `proxy.upgrade-timeout-ms`) costs the old process nothing: it keeps serving and says why.
//!
//! The protocol on the socketpair (SOCK_SEQPACKET, so each message keeps its bounds):
//! old → new: messages of at most [`FDS_PER_MESSAGE`] descriptors, each with one text line
//! per descriptor (`tcp`, `unix PATH`, `admin`), then `end`; new → old: `ready PID`; old →
//! new: `ack`; then, from a process that runs parts which cannot run twice (the embedded
//! servers' supervision, CDC and its replication slot), `released NAME` as it lets go of each
//! in turn, or nothing more (the channel closes with the old process, or at once when it runs
//! none). The new process accepts from the
//! sockets once it can serve, says `ready`, and
//! only after the `ack` (the old process has let go: it will not kill it any more) writes the
//! pid file and tells systemd its MAINPID. So a new process the old one kills (too slow, a
//! stop signal) has never become the unit's main process, and once it has, nothing the old
//! one does on its way out touches it: it sends no signal, leaves the pid file and the Unix
//! socket's file alone, and tells systemd nothing.
//!
//! Between fork and exec the child blocks SIGUSR2 and SIGHUP (a second `systemctl kill -s USR2`
//! reaching every process of the unit, say): their default action would end it. The mask
//! carries over the exec; the new pgprism blocks both anyway and drops a SIGUSR2 that came
//! while it started (it is the upgrade that signal asked for). The child's signal state is
//! reset first (`crate::subprocess`: the control thread's mask would otherwise carry over,
//! SIGTERM and SIGINT included), then those two are blocked on purpose.

use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use socket2::Socket;

/// The environment variable naming the new process's end of the socketpair.
const ENV_FD: &str = "PGPRISM_UPGRADE_FD";
/// Descriptors per message, below the kernel's SCM_MAX_FD (253).
const FDS_PER_MESSAGE: usize = 200;
/// Largest hand-over message: one line per descriptor, a Unix path the longest.
const MESSAGE_BYTES_MAX: usize = 64 << 10;
/// How long the new process waits for the sockets, which the old one sends right after the
/// spawn, and for the `ack` to its `ready`: only a wedged old process takes longer.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `PGPRISM_UPGRADE_FD` as this process was started with, taken out of the environment by
/// [`take_environment`] so nothing this process spawns inherits it.
static HANDED: std::sync::OnceLock<Option<OsString>> = std::sync::OnceLock::new();

/// Takes `PGPRISM_UPGRADE_FD` out of the environment: embedded servers, `pgbench` runs and a
/// later upgrade must not see a descriptor number that means nothing to them. Call it first
/// thing in `main`, before any thread exists.
pub fn take_environment() {
    let value = std::env::var_os(ENV_FD);
    if let Some(text) = &value {
        // SAFETY: called at the top of `main` (`cli::main`), before any other thread exists,
        // so no thread reads the environment while it changes.
        unsafe { std::env::remove_var(ENV_FD) };
        // And the descriptor itself is close-on-exec from here on, whoever reads it: a
        // command that never takes it over (`pgprism embed`) must not pass it on either.
        let fd = text.to_str().and_then(|t| t.parse::<RawFd>().ok());
        if let Some(fd) = fd.filter(|fd| *fd > 2) {
            // SAFETY: F_SETFD only changes a descriptor's close-on-exec flag; on a number that
            // names no open descriptor it fails and changes nothing.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    let _ = HANDED.set(value);
}

/// The hand-over channel's descriptor number this process was started with, if any. A
/// library caller that never ran [`take_environment`] reads the environment (and leaves it).
fn handed() -> Option<OsString> {
    HANDED.get_or_init(|| std::env::var_os(ENV_FD)).clone()
}

/// Whether this process was started by an upgrade (for the upgrade's failpoints).
pub(super) fn started_by_upgrade() -> bool {
    handed().is_some()
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{ENV_FD}=`{value}` does not name a descriptor")]
    BadFd { value: String },
    #[error("cannot receive the listening sockets from the process being replaced")]
    Receive(#[source] io::Error),
    #[error("the hand-over from the process being replaced is malformed: {0}")]
    Malformed(String),
    #[error(
        "proxy.listen is {configured} but the process being replaced listens on {inherited}: \
         an upgrade keeps the listening sockets, so restart pgprism to move it"
    )]
    ListenChanged {
        configured: SocketAddr,
        inherited: SocketAddr,
    },
    #[error(
        "the Unix socket would be {configured} but the process being replaced serves {inherited}: \
         an upgrade keeps the listening sockets, so restart pgprism to change \
         proxy.unix-socket-dir"
    )]
    UnixChanged {
        configured: String,
        inherited: String,
    },
}

/// How this process was started, captured once at start-up: the path a SIGUSR2 starts again
/// (after a package upgrade `/proc/self/exe` names the old, deleted file; this names the path,
/// which now holds the new one) and the arguments.
pub(super) struct Invocation {
    program: PathBuf,
    args: Vec<OsString>,
}

impl Invocation {
    pub(super) fn program(&self) -> &Path {
        &self.program
    }

    pub(super) fn current() -> Invocation {
        let mut args = std::env::args_os();
        let argv0 = args.next();
        let program = argv0
            .as_deref()
            .and_then(|argv0| resolve(Path::new(argv0)))
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("pgprism"));
        Invocation {
            program,
            args: args.collect(),
        }
    }
}

/// `argv[0]` as the shell found it: a path with a slash is made absolute (against the
/// working directory at start), a bare name is looked up in `PATH`.
fn resolve(argv0: &Path) -> Option<PathBuf> {
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        return std::path::absolute(argv0).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(argv0))
        .find(|candidate| candidate.is_file())
        .and_then(|found| std::path::absolute(found).ok())
}

/// The listening sockets the process being replaced handed over.
#[derive(Default)]
pub(super) struct Inherited {
    pub(super) tcp: Vec<Socket>,
    pub(super) unix: Option<(PathBuf, Socket)>,
    pub(super) admin: Option<TcpListener>,
}

impl Inherited {
    /// The TCP sockets, when they listen where `configured` asks (port 0 asks for any port).
    pub(super) fn take_tcp(&mut self, configured: SocketAddr) -> Result<Vec<Socket>, UpgradeError> {
        let sockets = std::mem::take(&mut self.tcp);
        for socket in &sockets {
            let inherited = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| UpgradeError::Malformed("a tcp socket without an address".into()))?;
            if !same_address(configured, inherited) {
                return Err(UpgradeError::ListenChanged {
                    configured,
                    inherited,
                });
            }
        }
        Ok(sockets)
    }

    /// The Unix socket, when it is the one `configured` names (None: no Unix socket now).
    pub(super) fn take_unix(
        &mut self,
        configured: Option<&Path>,
    ) -> Result<Option<(PathBuf, Socket)>, UpgradeError> {
        match (self.unix.take(), configured) {
            (None, None) => Ok(None),
            (Some((path, socket)), Some(wanted)) if path == wanted => Ok(Some((path, socket))),
            (inherited, configured) => Err(UpgradeError::UnixChanged {
                configured: configured.map_or("none".into(), |p| p.display().to_string()),
                inherited: inherited.map_or("none".into(), |(p, _)| p.display().to_string()),
            }),
        }
    }

    /// The admin socket, when it listens where `configured` asks.
    pub(super) fn take_admin(&mut self, configured: Option<SocketAddr>) -> Option<TcpListener> {
        let listener = self.admin.take()?;
        let inherited = listener.local_addr().ok()?;
        configured
            .filter(|c| same_address(*c, inherited))
            .map(|_| listener)
    }
}

fn same_address(configured: SocketAddr, inherited: SocketAddr) -> bool {
    configured.ip() == inherited.ip()
        && (configured.port() == 0 || configured.port() == inherited.port())
}

/// The new process's line back to the process it replaces.
pub(super) struct Predecessor {
    channel: OwnedFd,
}

impl Predecessor {
    /// When this process was started by an upgrade: the sockets handed over, and the channel
    /// to say `ready` on. `None` for an ordinary start.
    pub(super) fn take() -> Result<Option<(Predecessor, Inherited)>, UpgradeError> {
        let Some(value) = handed() else {
            return Ok(None);
        };
        // Before this process blocks any signal: where a second SIGUSR2 would end it but for
        // the mask the old process set between fork and exec.
        crate::cdc::failpoint::hit("upgrade-start");
        let text = value.to_string_lossy().into_owned();
        let fd: RawFd = text
            .parse()
            .ok()
            .filter(|fd| *fd > 2)
            .ok_or(UpgradeError::BadFd {
                value: text.clone(),
            })?;
        // SAFETY: fcntl on a number only reads its flags; it fails for a closed descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(UpgradeError::BadFd { value: text });
        }
        // SAFETY: the descriptor is open (checked above) and nothing else in this process
        // knows its number: the old process made it for us alone.
        let channel = unsafe { OwnedFd::from_raw_fd(fd) };
        // Our own children (embedded servers, a later upgrade) must not inherit it.
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(channel.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let channel = Socket::from(channel);
        channel
            .set_read_timeout(Some(RECEIVE_TIMEOUT))
            .map_err(UpgradeError::Receive)?;
        let inherited = receive(&channel)?;
        Ok(Some((
            Predecessor {
                channel: channel.into(),
            },
            inherited,
        )))
    }

    /// Tells the old process this one serves (it stops accepting and drains) and waits
    /// (bounded) for its `ack`: from then on it will not kill this one, which may become the
    /// unit's main process. The channel stays open for the old process's [`Release`].
    pub(super) fn ready(self) -> Release {
        crate::cdc::failpoint::hit("upgrade-before-ready-message");
        let line = format!("ready {}", std::process::id());
        if let Err(err) = send(self.channel.as_raw_fd(), line.as_bytes(), &[]) {
            // It died meanwhile, or is gone: either way we serve, and a leftover old process
            // keeps only its own sessions.
            tracing::warn!(error = %err, "cannot tell the replaced process that this one is ready");
            return Release {
                channel: None,
                said: Vec::new(),
            };
        }
        let channel = Socket::from(self.channel);
        let mut buf = [0u8; 16];
        match recv(channel.as_raw_fd(), &mut buf) {
            Ok((len, _)) if &buf[..len] == b"ack" => {}
            // Closed: the old process is gone; nothing can kill this one now.
            Ok((0, _)) => {}
            Ok((len, _)) => tracing::warn!(
                answer = %String::from_utf8_lossy(&buf[..len]),
                "the replaced process answered `ready` with something else than `ack`"
            ),
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
            Err(err) => tracing::warn!(
                error = %err,
                "no `ack` from the replaced process; serving all the same"
            ),
        }
        Release {
            channel: Some(channel),
            said: Vec::new(),
        }
    }
}

/// How the process an upgrade replaced let go of a part that cannot run twice (CDC and its
/// replication slot, the embedded servers), as the new process saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// It said `released`: it stopped them, cleanly.
    Said,
    /// The channel closed without it: the old process ran none of them, or it exited (and
    /// what it ran ended with it).
    Gone,
    /// Neither within the limit: it still runs them, or is wedged stopping them.
    TimedOut,
}

/// The new process's end of the upgrade channel after the `ack`: the old process says on it
/// when it has let go of each part that cannot run twice (`released NAME`).
pub(super) struct Release {
    channel: Option<Socket>,
    /// Parts released before anyone asked for them.
    said: Vec<String>,
}

impl Release {
    /// Waits up to `limit` for the old process's `released NAME`, or for the channel to
    /// close.
    pub(super) fn wait_for(&mut self, name: &str, limit: Duration) -> Released {
        if let Some(at) = self.said.iter().position(|n| n == name) {
            self.said.swap_remove(at);
            return Released::Said;
        }
        let Some(channel) = &self.channel else {
            return Released::Gone;
        };
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 64];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Released::TimedOut;
            }
            // A zero read timeout would mean none: at least a millisecond.
            if channel
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                self.channel = None;
                return Released::Gone;
            }
            match recv(channel.as_raw_fd(), &mut buf) {
                Ok((0, _)) => {
                    self.channel = None;
                    return Released::Gone;
                }
                Ok((len, _)) => {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    match text.strip_prefix(RELEASED) {
                        Some(part) if part == name => return Released::Said,
                        Some(part) => self.said.push(part.to_string()),
                        None => tracing::warn!(
                            message = %text,
                            "unexpected message from the replaced process; waiting on"
                        ),
                    }
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    self.channel = None;
                    return Released::Gone;
                }
            }
        }
    }
}

/// What the old process says once it has stopped a part that cannot run twice, before the
/// part's name.
const RELEASED: &str = "released ";

/// The old process's end of the upgrade channel once the new process serves.
pub(super) struct ReleaseSender {
    channel: OwnedFd,
}

impl ReleaseSender {
    /// Tells the new process that the part `name` has stopped here.
    pub(super) fn released(&self, name: &str) {
        let line = format!("{RELEASED}{name}");
        if let Err(err) = send(self.channel.as_raw_fd(), line.as_bytes(), &[]) {
            // Gone or not waiting: a new process that left has nothing to start.
            tracing::warn!(error = %err, part = name, "cannot tell the new process that a part is released");
        }
    }

    /// Says nothing more and keeps the channel open until this process exits: what did not
    /// stop in time ends with it, and the new process learns so when the channel closes.
    pub(super) fn hold(self) {
        std::mem::forget(self.channel);
    }
}

/// Reads the hand-over messages up to `end`.
fn receive(channel: &Socket) -> Result<Inherited, UpgradeError> {
    let mut inherited = Inherited::default();
    let mut buf = vec![0u8; MESSAGE_BYTES_MAX];
    loop {
        let (len, fds) = recv(channel.as_raw_fd(), &mut buf).map_err(UpgradeError::Receive)?;
        if len == 0 && fds.is_empty() {
            return Err(UpgradeError::Malformed(
                "the channel closed before `end`".into(),
            ));
        }
        let text = std::str::from_utf8(&buf[..len])
            .map_err(|_| UpgradeError::Malformed("a message is not UTF-8".into()))?;
        if text == "end" {
            return Ok(inherited);
        }
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != fds.len() {
            return Err(UpgradeError::Malformed(format!(
                "{} descriptions for {} descriptors",
                lines.len(),
                fds.len()
            )));
        }
        for (line, fd) in lines.into_iter().zip(fds) {
            match line.split_once(' ').unwrap_or((line, "")) {
                ("tcp", "") => inherited.tcp.push(Socket::from(fd)),
                ("unix", path) if !path.is_empty() => {
                    inherited.unix = Some((PathBuf::from(path), Socket::from(fd)));
                }
                ("admin", "") => inherited.admin = Some(TcpListener::from(fd)),
                _ => return Err(UpgradeError::Malformed(format!("unknown socket `{line}`"))),
            }
        }
    }
}

/// What a serving process can hand over: a descriptor of each listening socket, kept by the
/// control thread while the shards accept from theirs.
pub(super) struct HandOver {
    pub(super) tcp: Vec<Socket>,
    pub(super) unix: Option<(PathBuf, Socket)>,
}

/// An upgrade under way, as the old process sees it.
pub(super) struct Successor {
    child: Child,
    channel: OwnedFd,
    deadline: Instant,
    /// Set once the new process serves: from then on it is none of our business.
    serving: bool,
}

impl Drop for Successor {
    /// An upgrade abandoned half-way (this process stops meanwhile) takes its child with it.
    fn drop(&mut self) {
        if !self.serving {
            self.abort();
        }
    }
}

/// Where an upgrade under way stands.
pub(super) enum Progress {
    Waiting,
    /// The new process serves (its pid).
    Ready(u32),
    /// It will not: why, for the log. The child is gone.
    Failed(String),
}

impl Successor {
    /// Starts the binary at the invocation's path with the same arguments and sends it the
    /// sockets; the caller polls [`Successor::progress`] from then on.
    pub(super) fn start(
        invocation: &Invocation,
        hand_over: &HandOver,
        admin: Option<&TcpListener>,
        timeout: Duration,
    ) -> io::Result<Successor> {
        let (ours, theirs) = socket2::Socket::pair(
            socket2::Domain::UNIX,
            socket2::Type::SEQPACKET.cloexec(),
            None,
        )?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(&invocation.program);
        // First: a clean mask and default dispositions, then the two blocks below on top.
        crate::subprocess::reset_signals(&mut command);
        command
            .args(&invocation.args)
            .env(ENV_FD, theirs_fd.to_string())
            // systemd's watchdog pid is ours; without it the new process pings by its
            // interval alone, and systemd takes its pings once MAINPID names it.
            .env_remove("WATCHDOG_PID");
        // SAFETY: fcntl, sigemptyset, sigaddset and pthread_sigmask are async-signal-safe and
        // the closure allocates nothing; it clears close-on-exec on the new process's end of
        // the pair and blocks SIGUSR2 and SIGHUP up to the new pgprism's own signal mask, after
        // anything std did to the child's mask (see the module comment).
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR2);
                libc::sigaddset(&mut set, libc::SIGHUP);
                let failed = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                if failed != 0 {
                    return Err(io::Error::from_raw_os_error(failed));
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        let mut successor = Successor {
            child,
            channel: ours.into(),
            deadline: Instant::now() + timeout,
            serving: false,
        };
        match successor.send_sockets(hand_over, admin) {
            Ok(()) => {}
            // It died already (a crash at start): `progress` reports how it ended.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(err) => {
                successor.abort();
                return Err(err);
            }
        }
        // From here on the channel is polled.
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe {
            let fd = successor.channel.as_raw_fd();
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            );
        }
        Ok(successor)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// After [`Successor::handed_over`]: the channel, for saying when what cannot run twice
    /// has stopped here. The new process is none of our business any more.
    /// `None` when the descriptor cannot be duplicated: the channel then closes now, which
    /// the new process takes as "nothing held here" only once it finds the slot free.
    pub(super) fn into_release(mut self) -> Option<ReleaseSender> {
        self.serving = true;
        match self.channel.try_clone() {
            Ok(channel) => Some(ReleaseSender { channel }),
            Err(err) => {
                tracing::warn!(error = %err, "cannot keep the upgrade channel");
                None
            }
        }
    }

    /// The new process serves; dropping this no longer stops it, and it hears so (`ack`)
    /// before it tells systemd it is the main process.
    pub(super) fn handed_over(&mut self) {
        self.serving = true;
        if let Err(err) = send(self.channel.as_raw_fd(), b"ack", &[]) {
            // It waits for the ack a bounded time, then serves all the same.
            tracing::warn!(error = %err, "cannot acknowledge the new process's ready");
        }
    }

    fn send_sockets(&self, hand_over: &HandOver, admin: Option<&TcpListener>) -> io::Result<()> {
        let mut all: Vec<(String, RawFd)> = hand_over
            .tcp
            .iter()
            .map(|s| ("tcp".to_string(), s.as_raw_fd()))
            .collect();
        if let Some((path, socket)) = &hand_over.unix {
            all.push((format!("unix {}", path.display()), socket.as_raw_fd()));
        }
        if let Some(listener) = admin {
            all.push(("admin".to_string(), listener.as_raw_fd()));
        }
        let fd = self.channel.as_raw_fd();
        for chunk in all.chunks(FDS_PER_MESSAGE) {
            let text: Vec<&str> = chunk.iter().map(|(line, _)| line.as_str()).collect();
            let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| *fd).collect();
            send(fd, text.join("\n").as_bytes(), &fds)?;
        }
        send(fd, b"end", &[])
    }

    /// Whether the new process said `ready`, failed, or is still starting; past the deadline
    /// it is killed (a new binary that cannot say ready in time is not trusted to serve).
    pub(super) fn progress(&mut self) -> Progress {
        let mut buf = [0u8; 64];
        match recv(self.channel.as_raw_fd(), &mut buf) {
            Ok((len, _)) if len > 0 => {
                let text = String::from_utf8_lossy(&buf[..len]);
                if let Some(pid) = text.strip_prefix("ready ").and_then(|p| p.parse().ok()) {
                    return Progress::Ready(pid);
                }
                self.abort();
                return Progress::Failed(format!("it sent `{text}` instead of ready"));
            }
            // A process that exits with our message unread resets the pair instead.
            Ok(_) => return self.exited("it closed the upgrade channel"),
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {
                return self.exited("it closed the upgrade channel");
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                self.abort();
                return Progress::Failed(format!("the upgrade channel failed: {err}"));
            }
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            return Progress::Failed(format!("it exited ({status}) before it was ready"));
        }
        if Instant::now() >= self.deadline {
            self.abort();
            return Progress::Failed(
                "it was not ready within proxy.upgrade-timeout-ms; killed it".into(),
            );
        }
        Progress::Waiting
    }

    /// Like [`Successor::progress`], but waits up to `limit` for an answer: a stop signal
    /// during an upgrade must not kill a new process that is about to say it serves (it may
    /// have written the pid file and told systemd already).
    pub(super) fn settle(&mut self, limit: Duration) -> Progress {
        let deadline = Instant::now() + limit;
        loop {
            match self.progress() {
                Progress::Waiting if Instant::now() < deadline => {
                    // Polling interval of this bounded wait for the new process's answer.
                    std::thread::sleep(Duration::from_millis(10));
                }
                Progress::Waiting => {
                    self.abort();
                    return Progress::Failed("stopped before it was ready".into());
                }
                settled => return settled,
            }
        }
    }

    /// The channel closed: the child is exiting or gone; reap it (bounded) and say how it ended.
    fn exited(&mut self, what: &str) -> Progress {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Progress::Failed(format!(
                    "{what} and exited ({status}) before it was ready"
                ));
            }
            // Polling interval of a bounded wait for an exit already under way.
            std::thread::sleep(Duration::from_millis(10));
        }
        self.abort();
        Progress::Failed(format!("{what} before it was ready; killed it"))
    }

    fn abort(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One SOCK_SEQPACKET message with `fds` attached.
fn send(fd: RawFd, text: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid (no name, no control yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, aligned, so the first
        // header and its data fit; we write exactly fd_bytes of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One message into `buf`, with the descriptors that came with it (close-on-exec).
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let fd_bytes = FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the pointers set below stay live for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg describes live, writable buffers of the sizes given.
    let len = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR/NXTHDR stay within
    // msg_controllen, and each SCM_RIGHTS header carries whole descriptors after its header.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let raw = data
                        .add(i * std::mem::size_of::<RawFd>())
                        .cast::<RawFd>()
                        .read_unaligned();
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        // The descriptors received so far close with `fds`.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a hand-over message did not fit",
        ));
    }
    Ok((len as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn sockets_cross_a_socketpair_and_still_listen() {
        let (a, b) = socket2::Socket::pair(
            socket2::Domain::UNIX,
            socket2::Type::SEQPACKET.cloexec(),
            None,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hand_over = HandOver {
            tcp: vec![Socket::from(OwnedFd::from(listener.try_clone().unwrap()))],
            unix: None,
        };
        send(a.as_raw_fd(), b"tcp", &[hand_over.tcp[0].as_raw_fd()]).unwrap();
        send(a.as_raw_fd(), b"admin", &[listener.as_raw_fd()]).unwrap();
        send(a.as_raw_fd(), b"end", &[]).unwrap();
        drop(hand_over);
        let mut inherited = receive(&b).unwrap();
        drop(listener);
        let tcp = inherited.take_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(tcp.len(), 1);
        let err = inherited
            .take_unix(Some(Path::new("/tmp/x")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("proxy.unix-socket-dir"), "{err}");
        // The received descriptor is the same listening socket: a client gets through.
        let mut client = TcpStream::connect(addr).unwrap();
        let (mut served, _) = TcpListener::from(OwnedFd::from(tcp.into_iter().next().unwrap()))
            .accept()
            .unwrap();
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        served.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        let moved = std::net::SocketAddr::from(([127, 0, 0, 1], port ^ 1));
        let mut again = Inherited {
            tcp: vec![Socket::from(OwnedFd::from(other))],
            ..Inherited::default()
        };
        let err = again.take_tcp(moved).err().unwrap();
        assert!(err.to_string().contains("restart pgprism"), "{err}");
    }

    /// Runs `program args` as the "new binary" of an upgrade, with an empty hand-over.
    fn successor(program: &str, args: &[&str], timeout: Duration) -> Successor {
        let invocation = Invocation {
            program: PathBuf::from(program),
            args: args.iter().map(OsString::from).collect(),
        };
        let hand_over = HandOver {
            tcp: Vec::new(),
            unix: None,
        };
        Successor::start(&invocation, &hand_over, None, timeout).expect("spawn")
    }

    fn settle(successor: &mut Successor) -> Progress {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match successor.progress() {
                Progress::Waiting if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    #[test]
    fn a_new_process_that_says_ready_is_left_running_and_others_fail_with_a_reason() {
        // bash, as a stand-in for the new binary: it answers on the descriptor it is given.
        let mut ready = successor(
            "bash",
            &[
                "-c",
                "printf 'ready %s' $$ >&\"$PGPRISM_UPGRADE_FD\"; exec sleep 30",
            ],
            Duration::from_secs(20),
        );
        let pid = ready.pid();
        assert!(matches!(settle(&mut ready), Progress::Ready(p) if p == pid));
        ready.handed_over();
        // Left running by the upgrade (it serves now); the test ends it.
        let _ = ready.child.kill();
        let _ = ready.child.wait();
        drop(ready);

        let mut crashed = successor("false", &[], Duration::from_secs(20));
        match settle(&mut crashed) {
            Progress::Failed(why) => assert!(why.contains("exit"), "{why}"),
            _ => panic!("a process that exits is not ready"),
        }

        let mut silent = successor("sleep", &["30"], Duration::from_millis(200));
        let pid = silent.pid();
        match settle(&mut silent) {
            Progress::Failed(why) => {
                assert!(why.contains("proxy.upgrade-timeout-ms"), "{why}");
            }
            _ => panic!("a silent process is not ready"),
        }
        // Killed and reaped: no such process any more.
        // SAFETY: kill with signal 0 only checks that the pid exists.
        assert_ne!(unsafe { libc::kill(pid as libc::pid_t, 0) }, 0);
    }

    #[test]
    fn released_parts_are_heard_in_any_order_and_a_closed_channel_means_gone() {
        let (old, new) = socket2::Socket::pair(
            socket2::Domain::UNIX,
            socket2::Type::SEQPACKET.cloexec(),
            None,
        )
        .unwrap();
        let sender = ReleaseSender {
            channel: old.into(),
        };
        let mut release = Release {
            channel: Some(new),
            said: Vec::new(),
        };
        // Nothing said yet: the wait ends at its limit.
        assert_eq!(
            release.wait_for("embed", Duration::from_millis(50)),
            Released::TimedOut
        );
        sender.released("cdc");
        sender.released("embed");
        assert_eq!(
            release.wait_for("embed", Duration::from_secs(5)),
            Released::Said
        );
        // Heard while waiting for the other one, kept for its own wait.
        assert_eq!(
            release.wait_for("cdc", Duration::from_millis(1)),
            Released::Said
        );
        drop(sender);
        assert_eq!(
            release.wait_for("cdc", Duration::from_secs(5)),
            Released::Gone
        );
    }

    #[test]
    fn a_bare_program_name_is_found_on_path_and_a_relative_path_made_absolute() {
        let found = resolve(Path::new("sh")).expect("sh on PATH");
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        let relative = resolve(Path::new("./target/pgprism")).unwrap();
        assert!(relative.is_absolute(), "{relative:?}");
    }
}
