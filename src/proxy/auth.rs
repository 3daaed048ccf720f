//! Authenticating a client in transaction pooling, where pgprism is the server the client
//! logs in to: drives [`ServerAuth`] over the client's socket and answers a failure with
//! PostgreSQL's own FATAL error. The exchange's rules live in `wire::auth_server`; this
//! file only moves its bytes.
//!
//! It must never send AuthenticationOk (the caller does, with the ParameterStatus,
//! BackendKeyData and ReadyForQuery that follow it, in one write) and never tell a client
//! whether a user exists. Its reads are bounded in size; the caller bounds them in time.

use bytes::BytesMut;

use crate::config::AuthType;
use crate::exec::net::Stream;
use crate::wire::{
    self, AUTH_MESSAGE_BYTES_MAX, AuthMethod, ErrorSpec, Secret, ServerAuth, ServerAuthError,
    ServerLogin, ServerProgress, WireError, sqlstate, tag,
};

/// Bytes asked of one read while authenticating: SCRAM messages are about 100 bytes.
const READ_CHUNK_BYTES: usize = 8192;

/// Why a client did not get in. Every variant but `Closed` and `Io` has already been
/// answered with a FATAL ErrorResponse.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailed {
    /// Wrong password, unknown user, or an exchange the client broke (28P01 or 08P01 sent).
    #[error("client authentication failed")]
    Rejected {
        #[source]
        source: ServerAuthError,
    },
    /// A message the framing refused (a bad or oversized length): 08P01 sent.
    #[error("client sent an unreadable message during authentication")]
    Framing {
        #[source]
        source: WireError,
    },
    /// The client went away (libpq does this to prompt for a password): not an error.
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("client socket failed during authentication")]
    Io {
        #[source]
        source: std::io::Error,
    },
}

impl AuthFailed {
    /// The SQLSTATE sent to the client, if one was.
    pub fn sqlstate(&self) -> Option<&'static str> {
        match self {
            Self::Rejected { source } => Some(source.sqlstate()),
            Self::Framing { .. } => Some(sqlstate::PROTOCOL_VIOLATION),
            Self::Closed | Self::Io { .. } => None,
        }
    }

    /// A benign disconnect, not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Self::Closed | Self::Io { .. })
    }
}

/// How `pool.auth-type` asks clients.
pub fn auth_method(auth_type: AuthType) -> AuthMethod {
    match auth_type {
        AuthType::ScramSha256 => AuthMethod::ScramSha256,
        AuthType::Md5 => AuthMethod::Md5,
        AuthType::Plain => AuthMethod::Cleartext,
        AuthType::Trust => AuthMethod::Trust,
    }
}

/// Authenticates `user` (from the startup packet) against `secret` (`None`: no such user,
/// which still goes through a whole exchange and fails with 28P01, except under trust).
/// `buf` is the client's read buffer: it may hold bytes already read and keeps any read
/// past the last authentication message. On success everything up to AuthenticationOk has
/// been sent, and the login says how pgprism may log in to the server as this user.
pub async fn authenticate(
    client: &Stream,
    buf: &mut BytesMut,
    user: &str,
    secret: Option<&Secret>,
    auth_type: AuthType,
    message_bytes_max: usize,
) -> Result<ServerLogin, AuthFailed> {
    // The length field counts itself: a body of AUTH_MESSAGE_BYTES_MAX is 4 bytes more.
    let bound = message_bytes_max.min(AUTH_MESSAGE_BYTES_MAX + 4);
    let mut out = BytesMut::new();
    let (mut auth, mut progress) =
        match ServerAuth::start(user, secret, auth_method(auth_type), &mut out) {
            Ok(started) => started,
            Err(source) => return Err(reject(client, source).await),
        };
    // The exchange ends itself (SCRAM takes two client messages, the others one): every
    // turn either finishes it or moves its state machine forward.
    loop {
        if !out.is_empty() {
            client
                .write_all(&out)
                .await
                .map_err(|source| AuthFailed::Io { source })?;
            out.clear();
        }
        if let ServerProgress::Done(login) = progress {
            return Ok(login);
        }
        let frame = loop {
            match wire::split_message(buf, bound) {
                Ok(Some(frame)) => break frame,
                Ok(None) => {}
                Err(source) => {
                    fatal(client, sqlstate::PROTOCOL_VIOLATION, &source.to_string()).await;
                    return Err(AuthFailed::Framing { source });
                }
            }
            let read = client
                .read_buf(buf, READ_CHUNK_BYTES)
                .await
                .map_err(|source| AuthFailed::Io { source })?;
            if read == 0 {
                return Err(AuthFailed::Closed);
            }
        };
        if frame.tag() == tag::TERMINATE {
            return Err(AuthFailed::Closed);
        }
        progress = match auth.step(frame.tag(), frame.body(), &mut out) {
            Ok(progress) => progress,
            Err(source) => return Err(reject(client, source).await),
        };
    }
}

async fn reject(client: &Stream, source: ServerAuthError) -> AuthFailed {
    fatal(client, source.sqlstate(), &source.to_string()).await;
    AuthFailed::Rejected { source }
}

/// Sends a FATAL ErrorResponse; the connection closes after it, so a failed write changes
/// nothing.
async fn fatal(client: &Stream, code: &str, message: &str) {
    let mut out = BytesMut::new();
    let mut message = message.to_owned();
    // A user name with a NUL cannot come from a startup packet, but a NUL would cost the
    // client its error.
    message.retain(|c| c != '\0');
    if wire::encode::error_response(&mut out, &ErrorSpec::new("FATAL", code, &message)).is_ok() {
        let _ = client.write_all(&out).await;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;
    use crate::wire::{AuthProgress, AuthRequest, ClientAuth, ScramSecret};

    const PASSWORD: &str = "s3cret";

    fn read_message(sock: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        sock.read_exact(&mut header).ok()?;
        let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        sock.read_exact(&mut body).ok()?;
        Some((header[0], body))
    }

    /// A PostgreSQL client (blocking, on its own thread) logging in with `password`:
    /// returns the SQLSTATE of the error it got, or None when it got AuthenticationOk.
    fn client(sock: &mut TcpStream, password: &str) -> Option<String> {
        let mut auth = ClientAuth::new("alice", password);
        loop {
            let (tag, body) = read_message(sock).expect("a message from pgprism");
            if tag == b'E' {
                let fields = wire::ErrorNotice::new(&body).parse().unwrap();
                assert_eq!(fields.severity, Some("FATAL"));
                return fields.code.map(str::to_owned);
            }
            assert_eq!(tag, b'R');
            let mut out = BytesMut::new();
            let request = AuthRequest::parse(&body).unwrap();
            if auth.step(&request, &mut out).unwrap() == AuthProgress::Authenticated {
                return None;
            }
            sock.write_all(&out).unwrap();
        }
    }

    /// Runs `authenticate` on a shard against `peer` on a thread; returns both results.
    fn run<T: Send + 'static>(
        secret: Option<Secret>,
        auth_type: AuthType,
        peer: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (Result<ServerLogin, AuthFailed>, T) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            peer(sock)
        });
        let result = std::rc::Rc::new(std::cell::RefCell::new(None));
        let slot = result.clone();
        crate::exec::run(64, async move {
            let stream = Stream::connect(addr, Duration::from_secs(5)).await.unwrap();
            let mut buf = BytesMut::new();
            let got = authenticate(
                &stream,
                &mut buf,
                "alice",
                secret.as_ref(),
                auth_type,
                1 << 20,
            )
            .await;
            if got.is_ok() {
                let mut ok = BytesMut::new();
                wire::encode::authentication_ok(&mut ok);
                stream.write_all(&ok).await.unwrap();
            }
            *slot.borrow_mut() = Some(got);
        })
        .unwrap();
        let got = result.borrow_mut().take().unwrap();
        (got, peer.join().unwrap())
    }

    #[test]
    fn scram_over_a_socket_gives_the_keys() {
        let secret = Secret::Scram(ScramSecret::from_password(PASSWORD, b"salt", 4096));
        let (got, code) = run(Some(secret), AuthType::ScramSha256, |mut sock| {
            client(&mut sock, PASSWORD)
        });
        assert_eq!(code, None);
        assert!(matches!(got, Ok(ServerLogin::ScramKeys { .. })), "{got:?}");
    }

    #[test]
    fn md5_and_cleartext_over_a_socket() {
        for auth_type in [AuthType::Md5, AuthType::Plain] {
            let secret = Secret::Plain(PASSWORD.into());
            let (got, code) = run(Some(secret), auth_type, |mut sock| {
                client(&mut sock, PASSWORD)
            });
            assert_eq!(code, None);
            assert_eq!(got.unwrap(), ServerLogin::Password(PASSWORD.into()));
        }
    }

    #[test]
    fn a_wrong_password_gets_28p01() {
        let secret = Secret::Scram(ScramSecret::from_password(PASSWORD, b"salt", 4096));
        let (got, code) = run(Some(secret), AuthType::ScramSha256, |mut sock| {
            client(&mut sock, "wrong")
        });
        assert_eq!(code.as_deref(), Some("28P01"));
        let err = got.unwrap_err();
        assert_eq!(err.sqlstate(), Some("28P01"));
        assert!(!err.is_disconnect());
    }

    #[test]
    fn an_unknown_user_gets_the_same_28p01() {
        for auth_type in [AuthType::ScramSha256, AuthType::Md5, AuthType::Plain] {
            let (got, code) = run(None, auth_type, |mut sock| client(&mut sock, PASSWORD));
            assert_eq!(code.as_deref(), Some("28P01"), "{auth_type:?}");
            assert_eq!(got.unwrap_err().sqlstate(), Some("28P01"));
        }
        // Trust lets anyone in and sends nothing before AuthenticationOk.
        let (got, code) = run(None, AuthType::Trust, |mut sock| client(&mut sock, ""));
        assert_eq!(code, None);
        assert_eq!(got.unwrap(), ServerLogin::None);
    }

    #[test]
    fn an_oversized_message_gets_08p01() {
        let secret = Secret::Plain(PASSWORD.into());
        let (got, code) = run(Some(secret), AuthType::Plain, |mut sock| {
            let _ = read_message(&mut sock);
            sock.write_all(&[b'p', 0x7f, 0, 0, 0]).unwrap();
            read_message(&mut sock).map(|(tag, body)| {
                assert_eq!(tag, b'E');
                wire::ErrorNotice::new(&body)
                    .code()
                    .unwrap()
                    .unwrap()
                    .to_owned()
            })
        });
        assert_eq!(code.as_deref(), Some("08P01"));
        assert!(matches!(got, Err(AuthFailed::Framing { .. })));
    }

    #[test]
    fn a_client_that_leaves_is_a_disconnect() {
        let secret = Secret::Plain(PASSWORD.into());
        let (got, ()) = run(Some(secret.clone()), AuthType::ScramSha256, |mut sock| {
            let _ = read_message(&mut sock);
        });
        assert!(got.unwrap_err().is_disconnect());
        let (got, ()) = run(Some(secret), AuthType::Md5, |mut sock| {
            let _ = read_message(&mut sock);
            sock.write_all(&[b'X', 0, 0, 0, 4]).unwrap();
            let _ = read_message(&mut sock);
        });
        let err = got.unwrap_err();
        assert!(matches!(err, AuthFailed::Closed), "{err:?}");
        assert_eq!(err.sqlstate(), None);
    }
}
