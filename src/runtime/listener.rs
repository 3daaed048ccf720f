//! One listening socket per shard, all on the same address with SO_REUSEPORT so the kernel
//! spreads connections across shards. Before binding them, a probe bind *without*
//! SO_REUSEPORT makes sure no other process already serves the address: otherwise a second
//! pgprism (or anything else with SO_REUSEPORT) would silently take half of the connections.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

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
pub(super) fn ensure_free(addr: SocketAddr) -> Result<(), ListenError> {
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

/// A listening socket for one shard. `addr` may have port 0 only for the first shard; the
/// caller passes the resolved address to the others.
pub(super) fn bind_shard(addr: SocketAddr, backlog: u32) -> Result<Socket, ListenError> {
    let wrap = |source| ListenError::Bind { addr, source };
    let socket = socket_for(addr).map_err(wrap)?;
    socket.set_reuse_address(true).map_err(wrap)?;
    socket.set_reuse_port(true).map_err(wrap)?;
    socket.set_nonblocking(true).map_err(wrap)?;
    socket.bind(&addr.into()).map_err(wrap)?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(wrap)?;
    Ok(socket)
}
