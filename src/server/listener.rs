//! One listening socket per shard, all on the same address with SO_REUSEPORT so the kernel
//! spreads connections across shards. Before binding them, a probe bind *without*
//! SO_REUSEPORT makes sure no other process already serves the address: otherwise a second
//! pgprism (or anything else with SO_REUSEPORT) would silently take half of the connections.
//!
//! The optional Unix-domain listener is different: AF_UNIX has no SO_REUSEPORT balancing, so
//! there is one listening socket, made here before the shards start, and every shard accepts
//! from its own `dup` of it. A socket file left by a pgprism that died is replaced; one that
//! something still answers on is not.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::{Config, parse_addr, socket_file};

use super::RuntimeError;
use super::upgrade::Inherited;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{addr} is already served by another process (is another pgprism running?); \
         stop it or choose another proxy.listen"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is already served by another process (is another pgprism running?); \
         stop it or choose another proxy.unix-socket-dir or proxy.listen port",
        path.display()
    )]
    UnixInUse { path: PathBuf },
    #[error(
        "{} exists and is not a socket; remove it or choose another proxy.unix-socket-dir",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {} (proxy.unix-socket-dir)", path.display())]
    UnixBind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
}

/// Fails when anything is bound to `addr` already.
fn ensure_free(addr: SocketAddr) -> Result<(), ListenError> {
    let probe = socket_for(addr).map_err(|source| ListenError::Bind { addr, source })?;
    // SO_REUSEADDR (not REUSEPORT) lets the probe ignore TIME_WAIT leftovers while still
    // failing against a listening socket.
    let _ = probe.set_reuse_address(true);
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => Err(ListenError::InUse { addr }),
        Err(source) => Err(ListenError::Bind { addr, source }),
    }
}

/// A socket for one shard, listening unless `listen` is false (then [`listen`] later). `addr`
/// may have port 0 only for the first shard; the caller passes the resolved address to the
/// others.
fn bind_shard(addr: SocketAddr, backlog: u32, listen: bool) -> Result<Socket, ListenError> {
    let wrap = |source| ListenError::Bind { addr, source };
    let socket = socket_for(addr).map_err(wrap)?;
    socket.set_reuse_address(true).map_err(wrap)?;
    socket.set_reuse_port(true).map_err(wrap)?;
    socket.set_nonblocking(true).map_err(wrap)?;
    socket.bind(&addr.into()).map_err(wrap)?;
    if listen {
        self::listen(&socket, backlog).map_err(wrap)?;
    }
    Ok(socket)
}

/// Starts listening on a socket [`bind_all`] left bound only.
pub(super) fn listen(socket: &Socket, backlog: u32) -> io::Result<()> {
    socket.listen(backlog.min(i32::MAX as u32) as i32)
}

/// Every listening socket of the proxy, bound before any shard starts.
pub(super) struct Listeners {
    /// The TCP address, with the port the first bind picked when `proxy.listen` asks for 0.
    pub(super) listen: SocketAddr,
    /// One SO_REUSEPORT socket per shard, listening (or more, inherited from an upgrade).
    pub(super) sockets: Vec<Socket>,
    /// After an upgrade to more shards than before: the extra shards' sockets, bound but not
    /// listening until the process is ready. A listening member of the SO_REUSEPORT group
    /// gets its share of new connections at once, and a new process that failed its start-up
    /// would take the ones in its backlog with it.
    pub(super) pending: Vec<Socket>,
    /// The one Unix listener every shard accepts from through its own dup.
    pub(super) unix_socket: Option<Socket>,
    /// Removes the Unix socket's file when dropped: at the start of a drain, or on any early
    /// return of the start-up.
    pub(super) unix_file: Option<SocketFile>,
}

/// Checks that `proxy.listen` is free, binds one socket per shard on it and, when
/// `proxy.unix-socket-dir` is set, the Unix socket named for the port. After an upgrade the
/// sockets the old process handed over are used instead and only what is missing is bound:
/// more shards than before join the same SO_REUSEPORT group once ready (`pending`); fewer
/// keep every inherited
/// socket (the spawner gives the extra ones to shards as second listeners), because closing
/// a listener of the group would reset the connections waiting in its backlog.
pub(super) fn bind_all(
    cfg: &Config,
    shards: usize,
    inherited: Option<&mut Inherited>,
) -> Result<Listeners, RuntimeError> {
    let mut listen = parse_addr("proxy.listen", &cfg.proxy.listen)?;
    let mut sockets = Vec::with_capacity(shards);
    let mut unix_inherited = None;
    let upgrading = inherited.is_some();
    match inherited {
        Some(inherited) => {
            sockets = inherited.take_tcp(listen).map_err(RuntimeError::Upgrade)?;
            if let Some(local) = sockets
                .first()
                .and_then(|s| s.local_addr().ok())
                .and_then(|a| a.as_socket())
            {
                listen = local;
            }
            let wanted = match cfg.proxy.unix_socket_dir.as_str() {
                "" => None,
                dir => Some(socket_file(dir, listen.port())),
            };
            unix_inherited = inherited
                .take_unix(wanted.as_deref())
                .map_err(RuntimeError::Upgrade)?;
        }
        None => ensure_free(listen)?,
    }
    if sockets.is_empty() {
        // An old process without TCP sockets (none handed over) would leave the port free.
        ensure_free(listen)?;
    }
    let mut pending = Vec::new();
    while sockets.len() + pending.len() < shards {
        let socket = bind_shard(listen, cfg.proxy.backlog, !upgrading)?;
        if listen.port() == 0 {
            // Port 0: the first bind picks the port, the other shards join it.
            if let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
                listen = local;
            }
        }
        if upgrading {
            pending.push(socket);
        } else {
            sockets.push(socket);
        }
    }
    let (unix_socket, unix_file) = match (unix_inherited, cfg.proxy.unix_socket_dir.as_str()) {
        (Some((path, socket)), _) => {
            let file = SocketFile::adopt(&path)?;
            (Some(socket), Some(file))
        }
        (None, "") => (None, None),
        (None, dir) => {
            let path = socket_file(dir, listen.port());
            let (socket, file) = bind_unix(&path, cfg.proxy.backlog)?;
            (Some(socket), Some(file))
        }
    };
    Ok(Listeners {
        listen,
        sockets,
        pending,
        unix_socket,
        unix_file,
    })
}

/// The socket file pgprism created. Dropping it removes the file, unless another process has
/// replaced it meanwhile (then it is that process's file, not ours). Device and inode alone
/// do not tell: tmpfs hands a freed inode number to the next file, so the change time (with
/// nanoseconds) is compared too.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    identity: (u64, u64, i64, i64),
    /// Whether dropping it removes the file: a file adopted from an upgrade is the old
    /// process's until this one is ready (a new process that fails before must not remove
    /// the file the old one still serves).
    armed: std::cell::Cell<bool>,
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

impl SocketFile {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Takes charge of the file of a socket handed over by an upgrade: once this process is
    /// ready ([`SocketFile::arm`]) it removes the file when it stops, as if it had bound it.
    fn adopt(path: &Path) -> Result<SocketFile, ListenError> {
        let meta = std::fs::symlink_metadata(path).map_err(|source| ListenError::UnixBind {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(SocketFile {
            path: path.to_path_buf(),
            identity: identity(&meta),
            armed: std::cell::Cell::new(false),
        })
    }

    /// The file is this process's now (it serves the socket): removed when it stops.
    pub(super) fn arm(&self) {
        self.armed.set(true);
    }

    /// Leaves the file in place: the process this one handed its sockets to serves it now.
    pub(super) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.armed.get() {
            return;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if identity(&meta) == self.identity => {
                if let Err(err) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %err, "cannot remove the socket file");
                }
            }
            _ => {}
        }
    }
}

/// The one Unix-domain listening socket at `path` (mode 0777, as PostgreSQL's, so every local
/// user may connect; pg_hba-style checks are the primary's job), and the guard that removes
/// its file. The caller hands each shard a `dup` of the socket.
fn bind_unix(path: &Path, backlog: u32) -> Result<(Socket, SocketFile), ListenError> {
    let wrap = |source| ListenError::UnixBind {
        path: path.to_path_buf(),
        source,
    };
    remove_if_stale(path)?;
    let addr = SockAddr::unix(path).map_err(wrap)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(wrap)?;
    match socket.bind(&addr) {
        Ok(()) => {}
        // Another process bound it between our check and our bind.
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            return Err(ListenError::UnixInUse {
                path: path.to_path_buf(),
            });
        }
        Err(err) => return Err(wrap(err)),
    }
    // The file is ours now: remove it again if anything below fails.
    let chmod = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777));
    let file = chmod
        .and_then(|()| std::fs::symlink_metadata(path))
        .map(|meta| SocketFile {
            path: path.to_path_buf(),
            identity: identity(&meta),
            armed: std::cell::Cell::new(true),
        })
        .map_err(|err| {
            let _ = std::fs::remove_file(path);
            wrap(err)
        })?;
    socket.set_nonblocking(true).map_err(wrap)?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(wrap)?;
    Ok((socket, file))
}

/// Leaves `path` free to bind: nothing there, or a socket file nobody listens on any more
/// (a crashed pgprism's), which is removed. Refuses a live socket and anything not a socket.
fn remove_if_stale(path: &Path) -> Result<(), ListenError> {
    let wrap = |source| ListenError::UnixBind {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(wrap(err)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // Non-blocking, so a live server with a full backlog answers EAGAIN instead of making
    // the probe wait.
    let probe =
        Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).map_err(wrap)?;
    let addr = SockAddr::unix(path).map_err(wrap)?;
    match probe.connect(&addr) {
        Ok(()) => Err(ListenError::UnixInUse {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Err(ListenError::UnixInUse {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket file nobody listens on");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(wrap(err)),
            }
        }
        Err(err) => Err(wrap(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgprism-l-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unix_socket_replaces_stale_refuses_live_and_cleans_up() {
        let dir = scratch("unix");
        let path = dir.join(".s.PGSQL.7");
        // A stale file: bound, then its socket closed (the file stays, as after a crash).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (socket, file) = bind_unix(&path, 16).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        let err = bind_unix(&path, 16).unwrap_err();
        assert!(matches!(err, ListenError::UnixInUse { .. }), "{err}");
        assert!(err.to_string().contains("already served"), "{err}");
        drop(socket);
        drop(file);
        assert!(!path.exists(), "the guard removes the socket file");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = bind_unix(&path, 16).unwrap_err();
        assert!(matches!(err, ListenError::NotASocket { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_guard_leaves_a_replaced_file_alone() {
        let dir = scratch("replaced");
        let path = dir.join(".s.PGSQL.8");
        let (socket, file) = bind_unix(&path, 16).unwrap();
        drop(socket);
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(file);
        assert!(path.exists(), "someone else's socket file stays");
        drop(other);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
