//! Who may use the admin endpoint: the bearer token from `admin.token-file`, the rule that
//! decides which requests need it, and the constant-time comparison. It reads the token file
//! once, at start-up; it never logs the token or any part of it.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::config::{AdminConfig, ConfigError};

/// Shortest token accepted: a guessable token would make the check decoration.
const TOKEN_CHARS_MIN: usize = 16;
/// Longest token file read; a token is one line, so anything larger is a wrong path.
const TOKEN_FILE_BYTES_MAX: u64 = 4 << 10;

/// The access rule of one admin endpoint, built once from `[admin]` and its listen address.
pub(super) struct Access {
    token: Option<Vec<u8>>,
    /// Every request needs the token, reads included (an address beyond loopback).
    all_routes: bool,
    /// HTTPS instead of plain HTTP (`admin.cert-file`, `admin.key-file`).
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a request may do, decided before any route runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Allowed,
    /// No token, or the wrong one, where one is needed: 401, counted.
    Unauthorized,
    /// A state-changing request to an endpoint without a token: 403 naming the key.
    NoTokenConfigured,
}

impl Access {
    /// Reads `admin.token-file` and the certificate files for an endpoint on `addr`. An
    /// address beyond loopback without a token is refused here as in `Config::validate`, so
    /// no caller can start such an endpoint by skipping validation.
    pub(super) fn load(cfg: &AdminConfig, addr: SocketAddr) -> Result<Access, ConfigError> {
        let all_routes = !addr.ip().is_loopback();
        let token = match cfg.token_file.as_str() {
            "" if all_routes => {
                return Err(ConfigError::key(
                    "admin.token-file",
                    format!(
                        "the admin endpoint on {addr} is reachable beyond this machine, so \
                         every request must carry a bearer token: set admin.token-file or \
                         listen on 127.0.0.1"
                    ),
                ));
            }
            "" => None,
            path => Some(read_token(Path::new(path))?),
        };
        let tls = match (cfg.cert_file.as_str(), cfg.key_file.as_str()) {
            ("", "") => None,
            (cert, key) => Some(
                crate::tls::https_server_config(cert, key)
                    .map_err(|e| ConfigError::invalid("admin.cert-file", &e))?,
            ),
        };
        Ok(Access {
            token,
            all_routes,
            tls,
        })
    }

    /// Whether a request with `method` and the value of its `Authorization` header (if any)
    /// may proceed. GET is the only method that changes nothing.
    pub(super) fn check(&self, method: &str, authorization: Option<&[u8]>) -> Verdict {
        let changes_state = method != "GET";
        let Some(token) = &self.token else {
            return if changes_state {
                Verdict::NoTokenConfigured
            } else {
                Verdict::Allowed
            };
        };
        if !changes_state && !self.all_routes {
            return Verdict::Allowed;
        }
        match authorization.and_then(bearer) {
            Some(given) if equal_in_constant_time(given, token) => Verdict::Allowed,
            _ => Verdict::Unauthorized,
        }
    }
}

/// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii_start();
    (token.len() < rest.len()).then_some(token)
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guess was right. The length of the expected token is not secret enough to hide (it is
/// the loop bound), but a wrong length still costs the full loop.
fn equal_in_constant_time(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, &e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(!e);
    }
    std::hint::black_box(diff) == 0
}

/// The token in `path`: one line, surrounding whitespace removed, from a file nobody but its
/// owner may read or write.
fn read_token(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let shown = path.display();
    let fail = |message: String| ConfigError::key("admin.token-file", message);
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read `{shown}`: {e}")))?;
    if !meta.is_file() {
        return Err(fail(format!("`{shown}` is not a regular file")));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "`{shown}` has mode {mode:04o}: a token file must not be readable or writable by \
             group or others (as ssh refuses such keys); run `chmod 600 {shown}`"
        )));
    }
    if meta.len() > TOKEN_FILE_BYTES_MAX {
        return Err(fail(format!(
            "`{shown}` is {} bytes; a token file holds one line (at most {TOKEN_FILE_BYTES_MAX} bytes)",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read `{shown}`: {e}")))?;
    let token = bytes.trim_ascii();
    if token.len() < TOKEN_CHARS_MIN {
        return Err(fail(format!(
            "the token in `{shown}` has {} characters; use at least {TOKEN_CHARS_MIN} (e.g. \
             `openssl rand -hex 32`)",
            token.len()
        )));
    }
    if token.iter().any(|&b| !b.is_ascii_graphic()) {
        return Err(fail(format!(
            "the token in `{shown}` must be one line of visible ASCII characters"
        )));
    }
    Ok(token.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TOKEN: &str = "0123456789abcdef0123";

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pgprism-access-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn token_file(dir: &Path, text: &str, mode: u32) -> String {
        let path = dir.join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    }

    fn access(token_file: &str, listen: &str) -> Result<Access, ConfigError> {
        let cfg = AdminConfig {
            listen: listen.into(),
            token_file: token_file.into(),
            ..AdminConfig::default()
        };
        Access::load(&cfg, listen.parse().unwrap())
    }

    #[test]
    fn loopback_without_token_reads_freely_and_changes_nothing() {
        let a = access("", "127.0.0.1:9930").unwrap();
        assert_eq!(a.check("GET", None), Verdict::Allowed);
        assert_eq!(a.check("POST", None), Verdict::NoTokenConfigured);
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            a.check("POST", Some(bearer.as_bytes())),
            Verdict::NoTokenConfigured
        );
    }

    #[test]
    fn a_token_guards_changes_on_loopback_and_everything_beyond() {
        let dir = scratch("guard");
        let file = token_file(&dir, &format!("{TOKEN}\n"), 0o600);
        let right = format!("Bearer {TOKEN}");
        let lower = format!("bearer  {TOKEN}");
        let wrong = format!("Bearer {TOKEN}x");
        let local = access(&file, "127.0.0.1:9930").unwrap();
        assert_eq!(local.check("GET", None), Verdict::Allowed);
        assert_eq!(local.check("POST", None), Verdict::Unauthorized);
        assert_eq!(
            local.check("POST", Some(wrong.as_bytes())),
            Verdict::Unauthorized
        );
        assert_eq!(
            local.check("POST", Some(right.as_bytes())),
            Verdict::Allowed
        );
        assert_eq!(
            local.check("DELETE", Some(lower.as_bytes())),
            Verdict::Allowed
        );
        let wide = access(&file, "0.0.0.0:9930").unwrap();
        assert_eq!(wide.check("GET", None), Verdict::Unauthorized);
        assert_eq!(wide.check("GET", Some(right.as_bytes())), Verdict::Allowed);
        let basic = format!("Basic {TOKEN}");
        assert_eq!(
            wide.check("GET", Some(basic.as_bytes())),
            Verdict::Unauthorized
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_files_others_can_read_short_or_missing_are_refused_by_key() {
        let dir = scratch("refuse");
        let open = token_file(&dir, TOKEN, 0o644);
        let err = access(&open, "127.0.0.1:1").err().unwrap().to_string();
        assert!(
            err.contains("admin.token-file") && err.contains("0644"),
            "{err}"
        );
        let short = token_file(&dir, "short\n", 0o600);
        let err = access(&short, "127.0.0.1:1").err().unwrap().to_string();
        assert!(err.contains("at least 16"), "{err}");
        let missing = dir.join("nope").display().to_string();
        let err = access(&missing, "127.0.0.1:1").err().unwrap().to_string();
        assert!(err.contains("cannot read"), "{err}");
        let err = access("", "0.0.0.0:1").err().unwrap().to_string();
        assert!(err.contains("admin.token-file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn comparison_needs_every_byte_and_the_length() {
        assert!(equal_in_constant_time(b"abcdef", b"abcdef"));
        assert!(!equal_in_constant_time(b"abcdeg", b"abcdef"));
        assert!(!equal_in_constant_time(b"abcde", b"abcdef"));
        assert!(!equal_in_constant_time(b"abcdefg", b"abcdef"));
        assert!(!equal_in_constant_time(b"", b"abcdef"));
        assert_eq!(bearer(b"Bearer  tok "), Some(&b"tok"[..]));
        assert_eq!(bearer(b"Bearertok"), None);
        assert_eq!(bearer(b"Token tok"), None);
    }
}
