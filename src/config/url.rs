//! `postgres://user:password@host:port/database?options` URLs for backends pgprism connects to.
//! Only the parts pgprism uses are understood; anything else is an error, not ignored.

use std::fmt;

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
    pub fn parse(text: &str) -> Result<PgUrl, String> {
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("expected a postgres://host:port URL, got `{text}`"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
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
            crate::tls::SslMode::parse(mode)?;
        }
        let (authority, database) = match rest.split_once('/') {
            Some((a, d)) if !d.is_empty() => (a, Some(percent_decode(d)?)),
            Some((a, _)) => (a, None),
            None => (rest, None),
        };
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
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("unterminated IPv6 address in `{text}`"))?;
            (h.to_string(), tail.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            // Not the URL itself: it may hold a password.
            return Err("no host in the URL (expected postgres://host:port)".to_string());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("port `{p}` is not a number from 1 to 65535"))?,
            None => 5432,
        };
        Ok(PgUrl {
            user: user.filter(|u| !u.is_empty()),
            password,
            host,
            port,
            database,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
        })
    }

    /// The TLS side of connections to this database (files are read here: call it at
    /// start-up). Without `sslmode`, `prefer`, as with libpq.
    pub fn tls(&self) -> Result<crate::tls::Upstream, String> {
        let mode = match &self.sslmode {
            Some(mode) => crate::tls::SslMode::parse(mode)?,
            None => crate::tls::SslMode::Prefer,
        };
        crate::tls::Upstream::new(
            mode,
            &self.host,
            self.sslrootcert.as_deref(),
            self.sslcert.as_deref(),
            self.sslkey.as_deref(),
        )
    }

    /// [`tls`](Self::tls), built once per thread and URL (shards open many connections).
    pub fn tls_cached(&self) -> Result<crate::tls::Upstream, String> {
        thread_local! {
            static BUILT: std::cell::RefCell<std::collections::HashMap<String, crate::tls::Upstream>> =
                std::cell::RefCell::default();
        }
        let key = format!(
            "{}\0{:?}\0{:?}\0{:?}\0{:?}",
            self.host, self.sslmode, self.sslrootcert, self.sslcert, self.sslkey
        );
        BUILT.with(|built| {
            if let Some(tls) = built.borrow().get(&key) {
                return Ok(tls.clone());
            }
            let tls = self.tls()?;
            built.borrow_mut().insert(key, tls.clone());
            Ok(tls)
        })
    }

    /// `host:port`, the form used to connect and in error messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
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
        out.push_str(&self.address());
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

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad %-escape in URL".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "URL is not UTF-8 after %-decoding".to_string())
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
    fn rejects_garbage() {
        assert!(PgUrl::parse("mysql://x").is_err());
        assert!(PgUrl::parse("postgres://h:99999").is_err());
        assert!(PgUrl::parse("postgres://:5432").is_err());
    }
}
