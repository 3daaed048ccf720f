//! `postgres://user:password@host:port/database?options` URLs for backends pgprism connects to.
//! Only the parts pgprism uses are understood; anything else is an error, not ignored, except
//! query options other than `host` and `port` (`sslmode` and the like), which are skipped.
//!
//! As in libpq, a host starting with `/` is the directory of a Unix-domain socket, whose file
//! is `<dir>/.s.PGSQL.<port>`. It is written percent-encoded in the authority
//! (`postgres://u@%2Frun%2Fpostgresql:5432/db`) or as a query option
//! (`postgres://u@/db?host=/run/postgresql&port=5432`).

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::ParseIntError;
use std::path::PathBuf;
use std::str::FromStr;
use std::string::FromUtf8Error;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Why a URL or an `sslmode` was rejected. The messages never quote a whole URL once it may
/// hold a password (only one that is not `postgres://` at all).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("expected a postgres://host:port URL, got `{text}`")]
    Scheme { text: String },
    #[error(
        "no host in the URL (expected postgres://host:port, or a socket directory as \
         postgres://%2Fdir:port or postgres:///db?host=/dir)"
    )]
    NoHost,
    #[error("port `{port}` is not a number from 1 to 65535")]
    Port {
        port: String,
        #[source]
        source: ParseIntError,
    },
    #[error("socket path {} is longer than {SOCKET_PATH_BYTES_MAX} bytes", path.display())]
    SocketPathTooLong { path: PathBuf },
    #[error("unterminated IPv6 address in `{text}`")]
    UnterminatedIpv6 { text: String },
    #[error("bad %-escape in URL")]
    Escape,
    #[error("URL is not UTF-8 after %-decoding")]
    NotUtf8(#[source] FromUtf8Error),
    #[error("sslmode `{mode}`: expected disable, allow, prefer, require, verify-ca or verify-full")]
    SslMode { mode: String },
}

/// Where a backend is reached: resolved once, before the shards start (DNS blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// The socket file itself, `<dir>/.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => addr.fmt(f),
            Endpoint::Unix(path) => path.display().fmt(f),
        }
    }
}

/// The socket file PostgreSQL (and pgprism) listens on in `dir` for `port`.
pub fn socket_file(dir: &str, port: u16) -> PathBuf {
    PathBuf::from(dir).join(format!(".s.PGSQL.{port}"))
}

#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    /// libpq's TLS options: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl PgUrl {
    /// `text.parse::<PgUrl>()`, by name.
    pub fn parse(text: &str) -> Result<PgUrl, UrlError> {
        text.parse()
    }
}

impl FromStr for PgUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<PgUrl, UrlError> {
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| UrlError::Scheme {
                text: text.to_string(),
            })?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let ssl = SslOptions::parse(query)?;
        let (authority, database) = match rest.split_once('/') {
            Some((a, d)) if !d.is_empty() => (a, Some(percent_decode(d)?)),
            Some((a, _)) => (a, None),
            None => (rest, None),
        };
        let (user, password, hostport) = split_userinfo(authority)?;
        let (mut host, port) = split_host_port(hostport, text)?;
        let mut port = port.map(str::to_string);
        // libpq's query options override the authority's host and port.
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "host" => host = percent_decode(value)?,
                "port" => port = Some(percent_decode(value)?),
                _ => {}
            }
        }
        if host.is_empty() {
            // Not the URL itself: it may hold a password.
            return Err(UrlError::NoHost);
        }
        let port = match port {
            Some(p) if !p.is_empty() => p
                .parse::<u16>()
                .map_err(|source| UrlError::Port { port: p, source })?,
            _ => 5432,
        };
        if host.starts_with('/') {
            let path = socket_file(&host, port);
            if path.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
                return Err(UrlError::SocketPathTooLong { path });
            }
        }
        Ok(PgUrl {
            user: user.filter(|u| !u.is_empty()),
            password,
            host,
            port,
            database,
            sslmode: ssl.sslmode,
            sslrootcert: ssl.sslrootcert,
            sslcert: ssl.sslcert,
            sslkey: ssl.sslkey,
        })
    }
}

impl PgUrl {
    /// The socket file when the host is a directory (it starts with `/`, as in libpq).
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.host
            .starts_with('/')
            .then(|| socket_file(&self.host, self.port))
    }

    /// `host:port`, or the socket file's path: the form used in error messages.
    pub fn address(&self) -> String {
        if let Some(path) = self.socket_path() {
            path.display().to_string()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn masked(&self) -> String {
        let mut out = String::from("postgres://");
        if let Some(user) = &self.user {
            out.push_str(user);
            if self.password.is_some() {
                out.push_str(":***");
            }
            out.push('@');
        }
        if self.socket_path().is_some() {
            // Percent-encoded so the masked URL still parses (`pgprism check` output).
            for byte in self.host.bytes() {
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(byte));
                } else {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            out.push_str(&format!(":{}", self.port));
        } else {
            out.push_str(&self.address());
        }
        if let Some(db) = &self.database {
            out.push('/');
            out.push_str(db);
        }
        let options = [
            ("sslmode", &self.sslmode),
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ];
        let mut sep = '?';
        for (name, value) in options {
            if let Some(value) = value {
                out.push(sep);
                out.push_str(&format!("{name}={value}"));
                sep = '&';
            }
        }
        out
    }
}

impl PgUrl {
    /// Resolves the host with the system resolver (this blocks: call it before the shards
    /// start); a socket directory needs no resolving.
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        if let Some(path) = self.socket_path() {
            return Ok(Endpoint::Unix(path));
        }
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .map(Endpoint::Tcp)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
    }
}

/// libpq's TLS options from a URL's query.
struct SslOptions {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl SslOptions {
    /// Decodes every option's value (a bad escape anywhere is an error) and keeps the TLS
    /// ones; `sslmode` must be one libpq knows.
    fn parse(query: &str) -> Result<SslOptions, UrlError> {
        let (mut sslmode, mut sslrootcert, mut sslcert, mut sslkey) = (None, None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = Some(percent_decode(value)?);
            match key {
                "sslmode" => sslmode = value,
                "sslrootcert" => sslrootcert = value,
                "sslcert" => sslcert = value,
                "sslkey" => sslkey = value,
                _ => {}
            }
        }
        if let Some(mode) = &sslmode {
            SslMode::parse(mode)?;
        }
        Ok(SslOptions {
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
        })
    }
}

/// Splits `user:password@hostport` into the decoded user, the decoded password and the rest.
fn split_userinfo(authority: &str) -> Result<(Option<String>, Option<String>, &str), UrlError> {
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((u, p)) => (Some(percent_decode(u)?), Some(percent_decode(p)?)),
            None => (Some(percent_decode(info)?), None),
        },
        None => (None, None),
    };
    Ok((user, password, hostport))
}

/// Splits `host:port`, `[v6]:port` or a bare host into the decoded host and the port's text.
fn split_host_port<'a>(
    hostport: &'a str,
    text: &str,
) -> Result<(String, Option<&'a str>), UrlError> {
    if let Some(v6) = hostport.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::UnterminatedIpv6 {
                text: text.to_string(),
            })?;
        Ok((h.to_string(), tail.strip_prefix(':')))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => Ok((percent_decode(h)?, Some(p))),
            None => Ok((percent_decode(hostport)?, None)),
        }
    }
}

fn percent_decode(text: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(UrlError::Escape)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(UrlError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let u = PgUrl::parse("postgres://bob:p%40ss@db.local:5433/app?sslmode=disable").unwrap();
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.address(), "db.local:5433");
        assert_eq!(u.database.as_deref(), Some("app"));
        assert_eq!(
            u.masked(),
            "postgres://bob:***@db.local:5433/app?sslmode=disable"
        );
        assert_eq!(u.sslmode.as_deref(), Some("disable"));
    }

    #[test]
    fn host_only_and_ipv6() {
        assert_eq!(PgUrl::parse("postgresql://h").unwrap().port, 5432);
        assert_eq!(
            PgUrl::parse("postgres://[::1]:7/").unwrap().address(),
            "[::1]:7"
        );
    }

    #[test]
    fn socket_directory_in_the_authority_or_the_query() {
        let u = PgUrl::parse("postgres://bob@%2Fvar%2Frun%2Fpostgresql:5433/app").unwrap();
        assert_eq!(u.host, "/var/run/postgresql");
        assert_eq!(u.address(), "/var/run/postgresql/.s.PGSQL.5433");
        assert_eq!(
            u.endpoint().unwrap(),
            Endpoint::Unix("/var/run/postgresql/.s.PGSQL.5433".into())
        );
        assert_eq!(u.database.as_deref(), Some("app"));
        let q = PgUrl::parse("postgresql://bob@/app?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!(q, u);
        let q = PgUrl::parse("postgres:///app?host=%2Ftmp").unwrap();
        assert_eq!(q.address(), "/tmp/.s.PGSQL.5432");
        assert_eq!(q.user, None);
        // The masked form (what `pgprism check` prints) parses back to the same place.
        let m = PgUrl::parse("postgres://bob:pw@/app?host=/run/pg%20x&port=7").unwrap();
        assert_eq!(m.masked(), "postgres://bob:***@%2Frun%2Fpg%20x:7/app");
        let again = PgUrl::parse(&m.masked()).unwrap();
        assert_eq!(again.address(), "/run/pg x/.s.PGSQL.7");
        // A query host may also be a TCP host; it wins over the authority, as in libpq.
        let t = PgUrl::parse("postgres://a:1/db?sslmode=disable&host=b").unwrap();
        assert_eq!(t.address(), "b:1");
    }

    #[test]
    fn rejects_bad_socket_urls() {
        let long = format!("postgres:///db?host=/{}", "d".repeat(120));
        let err = long.parse::<PgUrl>().unwrap_err();
        assert!(matches!(err, UrlError::SocketPathTooLong { .. }), "{err:?}");
        assert!(err.to_string().contains("longer than"));
        assert!(
            PgUrl::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        assert!(PgUrl::parse("postgres:///db").is_err());
        assert!(PgUrl::parse("postgres:///db?host=/tmp&port=x").is_err());
        assert!(PgUrl::parse("postgres://%2Ftmp%zz/db").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(PgUrl::parse("mysql://x").is_err());
        assert!(PgUrl::parse("postgres://h:99999").is_err());
        assert!(PgUrl::parse("postgres://:5432").is_err());
        let err = "postgres://h?sslmode=sometimes"
            .parse::<PgUrl>()
            .unwrap_err();
        assert!(matches!(err, UrlError::SslMode { .. }), "{err:?}");
        assert!(err.to_string().starts_with("sslmode `sometimes`"));
        let err = "postgres://h:x".parse::<PgUrl>().unwrap_err();
        assert_eq!(err.to_string(), "port `x` is not a number from 1 to 65535");
        assert!(std::error::Error::source(&err).is_some());
    }
}

/// libpq's `sslmode` of a URL; what each mode does is `tls::Upstream`'s business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Result<SslMode, UrlError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(UrlError::SslMode {
                    mode: other.to_string(),
                });
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}
