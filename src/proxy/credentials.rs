//! Where transaction pooling finds a user's secret: the auth file (PgBouncer's userlist
//! format) and `pool.auth-query` run on the primary. The secret formats themselves
//! ([`Secret`], [`ScramSecret`]) live in `wire`, next to the exchanges that use them.
//!
//! Never prints a secret: parse errors name the line and what is wrong with it, never its
//! text, and `Debug` of a [`Userlist`] shows only the user count. The user name is sent to
//! the primary only as a Bind parameter, never spliced into SQL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;

use crate::backend::{self, BackendError};
use crate::config::Endpoint;
use crate::exec::net::Stream;
use crate::exec::within;
use crate::tls::Upstream;
use crate::wire::{self, Format, ServerLogin, WireError, tag};

pub use crate::wire::{ScramSecret, Secret, SecretError};

/// Largest auth file read: about 100 000 users with SCRAM secrets. A bigger file is a
/// mistake (a wrong path), not a user list.
pub const USERLIST_BYTES_MAX: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read auth file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth file {} is larger than {max} bytes", .path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("auth file {}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<CredentialsError>,
    },
    /// A line of a user list that does not parse. Never carries the line's text.
    #[error("line {line}: {what}")]
    Line {
        line: usize,
        what: &'static str,
        #[source]
        source: Option<SecretError>,
    },
    #[error("auth-query could not connect")]
    Connect {
        #[source]
        source: BackendError,
    },
    #[error("auth-query did not answer within {limit_ms} ms")]
    Timeout { limit_ms: u64 },
    #[error("auth-query failed on the primary: {code} {message}")]
    Query { code: String, message: String },
    #[error("auth-query returned more than one row for one user")]
    Rows,
    #[error("auth-query returned {columns} columns; expected (user, secret) or (secret)")]
    Columns { columns: usize },
    #[error("auth-query returned a secret that is not UTF-8")]
    SecretEncoding,
    #[error("auth-query returned an unreadable secret")]
    Secret {
        #[source]
        source: SecretError,
    },
    #[error("auth-query: protocol error from the primary")]
    Protocol {
        #[source]
        source: WireError,
    },
    #[error("auth-query: the primary closed the connection")]
    Closed,
    #[error("auth-query: connection to the primary failed")]
    Io {
        #[source]
        source: std::io::Error,
    },
}

/// The users and secrets of an auth file.
#[derive(Default, Clone)]
pub struct Userlist {
    users: HashMap<String, Secret>,
}

impl std::fmt::Debug for Userlist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userlist")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Userlist {
    /// Reads and parses an auth file (at most [`USERLIST_BYTES_MAX`]).
    pub fn load(path: &Path) -> Result<Userlist, CredentialsError> {
        let read = |source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > USERLIST_BYTES_MAX {
            return Err(CredentialsError::TooLarge {
                path: path.to_owned(),
                max: USERLIST_BYTES_MAX,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Userlist::parse(&text).map_err(|source| CredentialsError::File {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses PgBouncer's auth file format: per line `"user" "secret"`, each field in double
    /// quotes with `""` for a quote inside, anything after the second field ignored; blank
    /// lines and lines starting with `;` or `#` skipped. A user listed twice keeps the last
    /// secret, as in PgBouncer.
    pub fn parse(text: &str) -> Result<Userlist, CredentialsError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim_start();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let bad = |what| CredentialsError::Line {
                line: line_no,
                what,
                source: None,
            };
            let (user, rest) = quoted(line).ok_or(bad("expected a user name in double quotes"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            let (secret, _ignored) = quoted(rest.trim_start()).ok_or(bad(
                "expected a password or secret in double quotes after the user",
            ))?;
            let secret = Secret::parse(&secret).map_err(|source| CredentialsError::Line {
                line: line_no,
                what: "unreadable secret",
                source: Some(source),
            })?;
            users.insert(user, secret);
        }
        Ok(Userlist { users })
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Reads one `"..."` field at the start of `text` (`""` is a quote inside), returning it
/// unescaped and the text after its closing quote; `None` when `text` does not start with
/// a quote or the field does not end on this line.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut rest = text.strip_prefix('"')?;
    let mut field = String::new();
    loop {
        let end = rest.find('"')?;
        field.push_str(rest.get(..end)?);
        rest = rest.get(end + 1..)?;
        match rest.strip_prefix('"') {
            Some(after) => {
                field.push('"');
                rest = after;
            }
            None => return Some((field, rest)),
        }
    }
}

/// Where and as whom `pool.auth-query` runs.
#[derive(Debug, Clone, Copy)]
pub struct AuthQuery<'a> {
    pub addr: &'a Endpoint,
    /// Bounds the connection and the query together.
    pub limit: Duration,
    /// `pool.auth-query`; `$1` is the user name.
    pub query: &'a str,
    pub database: &'a str,
    /// `pool.auth-user`, and how pgprism logs in as it.
    pub auth_user: &'a str,
    pub login: &'a ServerLogin,
    pub message_bytes_max: usize,
    pub tls: &'a Upstream,
}

/// Looks `user`'s secret up with `pool.auth-query` on a fresh connection as `auth-user`:
/// `None` when the query finds no row or a NULL secret.
pub async fn lookup(
    target: &AuthQuery<'_>,
    user: &str,
) -> Result<Option<Secret>, CredentialsError> {
    let params = [
        ("user", target.auth_user),
        ("database", target.database),
        ("application_name", "pgprism auth-query"),
    ];
    let opened = backend::open_as(
        target.addr,
        target.limit,
        &params,
        target.login,
        target.auth_user,
        target.message_bytes_max,
        target.tls,
    )
    .await
    .map_err(|source| CredentialsError::Connect { source })?;
    let mut buf = opened.leftover;
    let found = within(
        target.limit,
        lookup_on(
            &opened.stream,
            &mut buf,
            target.query,
            user,
            target.message_bytes_max,
        ),
    )
    .await
    .unwrap_or(Err(CredentialsError::Timeout {
        limit_ms: target.limit.as_millis() as u64,
    }));
    let mut bye = BytesMut::new();
    wire::encode::terminate(&mut bye);
    // Best effort: the connection is dropped either way.
    let _ = opened.stream.write_all(&bye).await;
    found
}

/// Runs `query` with `$1` = `user` on an open, idle connection (Parse/Bind/Execute/Sync, so
/// the name is a parameter, never SQL) and reads the answer up to ReadyForQuery, leaving
/// the connection idle again. `buf` holds bytes already read from `stream`.
pub async fn lookup_on(
    stream: &Stream,
    buf: &mut BytesMut,
    query: &str,
    user: &str,
    message_bytes_max: usize,
) -> Result<Option<Secret>, CredentialsError> {
    let protocol = |source| CredentialsError::Protocol { source };
    let mut out = BytesMut::new();
    query_messages(&mut out, query, user).map_err(protocol)?;
    stream
        .write_all(&out)
        .await
        .map_err(|source| CredentialsError::Io { source })?;
    let mut reply = QueryReply::default();
    loop {
        match wire::split_message(buf, message_bytes_max).map_err(protocol)? {
            Some(frame) => {
                if let Some(result) = reply.frame(frame.tag(), frame.body()) {
                    return result;
                }
            }
            None => {
                let read = stream
                    .read_buf(buf, 8192)
                    .await
                    .map_err(|source| CredentialsError::Io { source })?;
                if read == 0 {
                    return Err(CredentialsError::Closed);
                }
            }
        }
    }
}

/// The unnamed statement and portal, one text parameter, text results.
fn query_messages(out: &mut BytesMut, query: &str, user: &str) -> Result<(), WireError> {
    wire::encode::parse(out, "", query, &[])?;
    wire::encode::bind(
        out,
        "",
        "",
        &[Format::Text],
        &[Some(user.as_bytes())],
        &[Format::Text],
    )?;
    // Two rows are one too many; asking for at most two keeps a bad query cheap.
    wire::encode::execute(out, "", 2)?;
    wire::encode::sync(out);
    Ok(())
}

/// Reads the primary's answer to [`query_messages`], sans-IO. The verdict comes at
/// ReadyForQuery, so the connection is idle whatever happened.
#[derive(Default)]
struct QueryReply {
    rows: usize,
    /// The secret column of the one row, `None` for NULL.
    secret: Option<String>,
    /// The first thing that went wrong; reported at ReadyForQuery.
    error: Option<CredentialsError>,
}

impl QueryReply {
    /// Takes one message; `Some` with the verdict at ReadyForQuery.
    fn frame(&mut self, tag: u8, body: &[u8]) -> Option<Result<Option<Secret>, CredentialsError>> {
        match tag {
            tag::DATA_ROW => {
                self.rows += 1;
                if self.rows > 1 {
                    self.fail(CredentialsError::Rows);
                } else if let Err(err) = self.row(body) {
                    self.fail(err);
                }
            }
            tag::ERROR_RESPONSE => {
                let err = match wire::ErrorNotice::new(body).parse() {
                    Ok(fields) => CredentialsError::Query {
                        code: fields.code.unwrap_or("XX000").to_owned(),
                        message: fields.message.unwrap_or("").to_owned(),
                    },
                    Err(source) => CredentialsError::Protocol { source },
                };
                self.fail(err);
            }
            tag::READY_FOR_QUERY => {
                return Some(match self.error.take() {
                    Some(err) => Err(err),
                    None => match self.secret.take() {
                        Some(text) => Secret::parse(&text)
                            .map(Some)
                            .map_err(|source| CredentialsError::Secret { source }),
                        None => Ok(None),
                    },
                });
            }
            // ParseComplete, BindComplete, CommandComplete, PortalSuspended, notices,
            // ParameterStatus.
            _ => {}
        }
        None
    }

    fn row(&mut self, body: &[u8]) -> Result<(), CredentialsError> {
        let columns = wire::DataRow::new(body)
            .columns()
            .map_err(|source| CredentialsError::Protocol { source })?;
        if !(1..=2).contains(&columns.len()) {
            return Err(CredentialsError::Columns {
                columns: columns.len(),
            });
        }
        // The secret is the last column: (usename, passwd) or (passwd).
        let Some(value) = columns.iter().last().flatten() else {
            return Ok(());
        };
        let text = std::str::from_utf8(value).map_err(|_| CredentialsError::SecretEncoding)?;
        self.secret = Some(text.to_owned());
        Ok(())
    }

    fn fail(&mut self, err: CredentialsError) {
        self.secret = None;
        if self.error.is_none() {
            self.error = Some(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BindParts, FrontendMessage, TransactionStatus, split_message};

    fn line_of(err: &CredentialsError) -> usize {
        match err {
            CredentialsError::Line { line, .. } => *line,
            other => panic!("not a line error: {other}"),
        }
    }

    #[test]
    fn parses_pgbouncer_userlists() {
        let scram = ScramSecret::from_password("pw", b"salt", 4096).to_rolpassword();
        let text = format!(
            "; a comment\n\
             # another\n\
             \n\
             \"alice\" \"plain pass\"\n\
             \t \"bob\"   \"md545f2603610af569b6155c45067268c6b\" trailing fields ignored\n\
             \"carol\" \"{scram}\"\n\
             \"say \"\"hi\"\"\" \"pa\"\"ss\"\r\n\
             \"empty\" \"\"\n\
             \"alice\" \"second wins\"\n"
        );
        let list = Userlist::parse(&text).unwrap();
        assert_eq!(list.len(), 5);
        assert_eq!(
            list.get("alice"),
            Some(&Secret::Plain("second wins".into()))
        );
        assert_eq!(list.get("bob"), Some(&Secret::md5_of("admin", "1234")));
        assert!(matches!(list.get("carol"), Some(Secret::Scram(_))));
        assert_eq!(
            list.get("say \"hi\""),
            Some(&Secret::Plain("pa\"ss".into()))
        );
        assert_eq!(list.get("empty"), Some(&Secret::Plain(String::new())));
        assert_eq!(list.get("nobody"), None);
        assert!(!format!("{list:?}").contains("pass"));
        assert!(Userlist::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_lines_name_their_number_and_never_the_secret() {
        let cases = [
            ("\"a\" \"ok\"\nalice \"hunter2\"\n", 2),
            ("\n\n\"alice\"\n", 3),
            ("\"alice\" hunter2\n", 1),
            ("\"alice\" \"hunter2\n", 1),
            ("\"alice\n\" \"x\"", 1),
            ("\"\" \"hunter2\"", 1),
            ("# ok\n\"alice\" \"SCRAM-SHA-256$4096:hunter2\"", 2),
        ];
        for (text, line) in cases {
            let err = Userlist::parse(text).unwrap_err();
            assert_eq!(line_of(&err), line, "{text:?}: {err}");
            let mut chain = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                chain.push_str(&s.to_string());
                source = s.source();
            }
            assert!(!chain.contains("hunter2"), "{chain}");
        }
    }

    #[test]
    fn loads_a_file_and_names_it_in_errors() {
        let dir = std::env::temp_dir().join(format!("pgprism-userlist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.txt");
        std::fs::write(&good, "\"u\" \"p\"\n").unwrap();
        assert_eq!(
            Userlist::load(&good).unwrap().get("u"),
            Some(&Secret::Plain("p".into()))
        );
        let bad = dir.join("bad.txt");
        std::fs::write(&bad, "u p\n").unwrap();
        let err = Userlist::load(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.txt"), "{err}");
        assert!(matches!(
            Userlist::load(&dir.join("missing.txt")),
            Err(CredentialsError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_user_name_travels_as_a_bind_parameter() {
        let mut out = BytesMut::new();
        let name = "x'; DROP TABLE t; --";
        query_messages(
            &mut out,
            "SELECT usename, passwd FROM pg_shadow WHERE usename = $1",
            name,
        )
        .unwrap();
        let tags: Vec<u8> = std::iter::from_fn(|| split_message(&mut out, 1 << 20).unwrap())
            .map(|frame| {
                if let Ok(FrontendMessage::Bind(bind)) =
                    FrontendMessage::decode(frame.tag(), frame.body())
                {
                    let BindParts { params, .. } = bind.parts().unwrap();
                    let values: Vec<_> = params.iter().collect();
                    assert_eq!(values, vec![Some(name.as_bytes())]);
                }
                if let Ok(FrontendMessage::Parse(parse)) =
                    FrontendMessage::decode(frame.tag(), frame.body())
                {
                    assert!(!parse.query().unwrap().contains("DROP"));
                }
                frame.tag()
            })
            .collect();
        assert_eq!(tags, b"PBES");
    }

    /// Feeds backend messages built with `encode` to a QueryReply.
    fn reply(build: impl FnOnce(&mut BytesMut)) -> Result<Option<Secret>, CredentialsError> {
        let mut buf = BytesMut::new();
        build(&mut buf);
        wire::encode::ready_for_query(&mut buf, TransactionStatus::Idle);
        let mut reply = QueryReply::default();
        while let Some(frame) = split_message(&mut buf, 1 << 20).unwrap() {
            if let Some(result) = reply.frame(frame.tag(), frame.body()) {
                assert!(buf.is_empty(), "verdict before ReadyForQuery");
                return result;
            }
        }
        panic!("no verdict");
    }

    #[test]
    fn reads_the_secret_from_the_reply() {
        let scram = ScramSecret::from_password("pw", b"salt", 4096);
        let text = scram.to_rolpassword();
        let found = reply(|b| {
            wire::encode::data_row(b, &[Some(b"alice"), Some(text.as_bytes())]).unwrap();
            wire::encode::command_complete(b, "SELECT 1").unwrap();
        });
        assert_eq!(found.unwrap(), Some(Secret::Scram(scram)));
        // One column is the secret itself.
        let found = reply(|b| wire::encode::data_row(b, &[Some(b"pw")]).unwrap());
        assert_eq!(found.unwrap(), Some(Secret::Plain("pw".into())));
        // No row, or NULL: no secret.
        assert_eq!(
            reply(|b| wire::encode::command_complete(b, "SELECT 0").unwrap()).unwrap(),
            None
        );
        assert_eq!(
            reply(|b| wire::encode::data_row(b, &[Some(b"alice"), None]).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn reply_errors_wait_for_ready_for_query() {
        let two_rows = reply(|b| {
            wire::encode::data_row(b, &[Some(b"a"), Some(b"x")]).unwrap();
            wire::encode::data_row(b, &[Some(b"a"), Some(b"y")]).unwrap();
        });
        assert!(matches!(two_rows, Err(CredentialsError::Rows)));
        let three = reply(|b| wire::encode::data_row(b, &[None, None, None]).unwrap());
        assert!(matches!(
            three,
            Err(CredentialsError::Columns { columns: 3 })
        ));
        let failed = reply(|b| {
            let spec =
                wire::ErrorSpec::new("ERROR", "42501", "permission denied for view pg_shadow");
            wire::encode::error_response(b, &spec).unwrap();
        });
        assert!(
            matches!(&failed, Err(CredentialsError::Query { code, .. }) if code == "42501"),
            "{failed:?}"
        );
        let bad =
            reply(|b| wire::encode::data_row(b, &[Some(b"a"), Some(b"SCRAM-SHA-256$x")]).unwrap());
        assert!(matches!(bad, Err(CredentialsError::Secret { .. })));
        let binary = reply(|b| wire::encode::data_row(b, &[Some(b"a"), Some(b"\xff")]).unwrap());
        assert!(matches!(binary, Err(CredentialsError::SecretEncoding)));
        let mut reply = QueryReply::default();
        assert!(
            reply
                .frame(tag::DATA_ROW, b"\x00\x01\x00\x00\x00\x09ab")
                .is_none()
        );
        assert!(matches!(
            reply.frame(tag::READY_FOR_QUERY, b"I"),
            Some(Err(CredentialsError::Protocol { .. }))
        ));
    }
}
