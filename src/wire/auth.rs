//! Client-side authentication: decoding Authentication requests and answering them as a
//! PostgreSQL client would (cleartext, MD5, SCRAM-SHA-256 without channel binding). pgprism
//! uses it for its own connections to mirrors, shadows, the CDC source and in the bench
//! tool, and, in transaction pooling, to log in to the primary with what it learnt while
//! authenticating the client ([`ServerLogin`]: a password, a stored MD5 hash, or the SCRAM
//! ClientKey/ServerKey recovered from the client's proof). Sans-IO: it turns requests into
//! reply bytes and never touches a socket. It must never accept a SCRAM exchange whose
//! server signature does not verify, and never log or return the password or keys.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::cursor::Cursor;
use super::encode;
use super::error::WireError;

type HmacSha256 = Hmac<Sha256>;

/// The only SASL mechanism we speak.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Upper bound on the server's SCRAM iteration count. PostgreSQL's default is 4096; a
/// hostile or misconfigured server must not make a shard spin for minutes in PBKDF2.
pub const SCRAM_ITERATIONS_MAX: u32 = 1_000_000;

/// Random bytes in the client nonce (base64-encoded to 24 printable characters).
const NONCE_BYTES: usize = 18;

/// Authentication request codes (the first int32 of an `R` message).
pub(super) mod code {
    pub(crate) const OK: i32 = 0;
    pub(crate) const CLEARTEXT_PASSWORD: i32 = 3;
    pub(crate) const MD5_PASSWORD: i32 = 5;
    pub(crate) const SASL: i32 = 10;
    pub(crate) const SASL_CONTINUE: i32 = 11;
    pub(crate) const SASL_FINAL: i32 = 12;
}

/// A decoded Authentication (`R`) message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// AuthenticationSASL with the mechanisms the server offers.
    Sasl {
        mechanisms: Vec<&'a str>,
    },
    SaslContinue {
        data: &'a [u8],
    },
    SaslFinal {
        data: &'a [u8],
    },
    /// Kerberos, GSSAPI, SSPI and unknown codes.
    Unsupported(i32),
}

impl<'a> AuthRequest<'a> {
    /// Decodes the body of an `R` message.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let mut cur = Cursor::new(body, "Authentication");
        let request = match cur.i32()? {
            code::OK => Self::Ok,
            code::CLEARTEXT_PASSWORD => Self::CleartextPassword,
            code::MD5_PASSWORD => {
                let salt = cur.bytes(4)?;
                Self::Md5Password {
                    salt: [salt[0], salt[1], salt[2], salt[3]],
                }
            }
            code::SASL => {
                let mut mechanisms = Vec::new();
                loop {
                    let mechanism = cur.cstr()?;
                    if mechanism.is_empty() {
                        break;
                    }
                    mechanisms.push(mechanism);
                }
                Self::Sasl { mechanisms }
            }
            code::SASL_CONTINUE => {
                let data = cur.rest();
                cur = Cursor::new(&[], "Authentication");
                Self::SaslContinue { data }
            }
            code::SASL_FINAL => {
                let data = cur.rest();
                cur = Cursor::new(&[], "Authentication");
                Self::SaslFinal { data }
            }
            // Other methods may carry data (GSS continuation); we do not interpret it.
            other => return Ok(Self::Unsupported(other)),
        };
        cur.finish()?;
        Ok(request)
    }
}

/// What the caller does after [`ClientAuth::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthProgress {
    /// Reply bytes were appended to the output buffer: send them, then read the next
    /// Authentication message.
    Reply,
    /// Nothing to send (the server's SCRAM signature verified): read the next message.
    Continue,
    /// AuthenticationOk: the session moves on to ParameterStatus/BackendKeyData/ReadyForQuery.
    Authenticated,
}

enum State {
    Start,
    /// SASLInitialResponse sent; waiting for server-first.
    ScramFirstSent(ScramClient),
    /// SASLResponse sent; waiting for server-final, which must carry this signature.
    ScramFinalSent {
        server_signature: [u8; 32],
    },
    /// The server proved itself; only AuthenticationOk may follow.
    ScramVerified,
    /// A password was sent in clear or MD5; only AuthenticationOk may follow.
    PasswordSent,
    Authenticated,
}

/// How pgprism may log in to a server as a user: what [`ClientAuth`] answers with.
///
/// Besides a password, transaction pooling logs in with what the client's own
/// authentication left behind ([`crate::wire::ServerAuth`]), so pgprism never needs the
/// cleartext password of a user whose secret is a hash.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerLogin {
    /// The password itself: answers cleartext, MD5 and SCRAM.
    Password(String),
    /// A stored MD5 hash, `md5` + md5_hex(password + user) as in `pg_authid.rolpassword`:
    /// answers MD5 only (`md5_hex(hash_hex + salt)`).
    Md5Hash(String),
    /// SCRAM-SHA-256 keys recovered from a client's proof: answer SCRAM only, and only a
    /// server whose secret has the same salt and iteration count (the same secret), since
    /// the proof is computed from ClientKey without the salted password.
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// Nothing: only a server that asks for no password (trust) lets this login in.
    None,
}

impl ServerLogin {
    /// The kind of login, for error messages and logs (never the secret).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Password(_) => "password",
            Self::Md5Hash(_) => "MD5 hash",
            Self::ScramKeys { .. } => "SCRAM keys",
            Self::None => "no secret",
        }
    }
}

impl std::fmt::Debug for ServerLogin {
    // Hand-written so no secret reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerLogin({})", self.kind())
    }
}

/// Client side of PostgreSQL authentication, one per connection.
pub struct ClientAuth {
    user: String,
    login: ServerLogin,
    state: State,
}

impl std::fmt::Debug for ClientAuth {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("user", &self.user)
            .field("login", &self.login.kind())
            .finish_non_exhaustive()
    }
}

impl ClientAuth {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self::with_login(user, ServerLogin::Password(password.into()))
    }

    /// Answers with `login` instead of a password.
    pub fn with_login(user: impl Into<String>, login: ServerLogin) -> Self {
        Self {
            user: user.into(),
            login,
            state: State::Start,
        }
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated)
    }

    /// Answers one Authentication message, appending any reply to `out`.
    pub fn step(
        &mut self,
        request: &AuthRequest<'_>,
        out: &mut BytesMut,
    ) -> Result<AuthProgress, WireError> {
        self.step_with(request, out, random_nonce)
    }

    fn step_with(
        &mut self,
        request: &AuthRequest<'_>,
        out: &mut BytesMut,
        nonce: impl FnOnce() -> Result<String, WireError>,
    ) -> Result<AuthProgress, WireError> {
        let state = std::mem::replace(&mut self.state, State::Start);
        let (next, progress) = match (state, request) {
            (State::Start | State::PasswordSent | State::ScramVerified, AuthRequest::Ok) => {
                (State::Authenticated, AuthProgress::Authenticated)
            }
            (State::Start, AuthRequest::CleartextPassword) => {
                let ServerLogin::Password(password) = &self.login else {
                    return Err(self.cannot_answer("cleartext password"));
                };
                encode::password(out, password.as_bytes())?;
                (State::PasswordSent, AuthProgress::Reply)
            }
            (State::Start, AuthRequest::Md5Password { salt }) => {
                let hashed = match &self.login {
                    ServerLogin::Password(password) => md5_password(&self.user, password, *salt),
                    ServerLogin::Md5Hash(hash) => md5_salted(hash, *salt),
                    _ => return Err(self.cannot_answer("MD5")),
                };
                encode::password(out, hashed.as_bytes())?;
                (State::PasswordSent, AuthProgress::Reply)
            }
            (State::Start, AuthRequest::Sasl { mechanisms }) => {
                if !mechanisms.contains(&SCRAM_SHA_256) {
                    return Err(WireError::UnsupportedAuth {
                        method: format!("SASL {}", mechanisms.join(" ")),
                    });
                }
                if !matches!(
                    self.login,
                    ServerLogin::Password(_) | ServerLogin::ScramKeys { .. }
                ) {
                    return Err(self.cannot_answer(SCRAM_SHA_256));
                }
                // PostgreSQL takes the user from the startup packet and ignores this one.
                let scram = ScramClient::new("", nonce()?);
                encode::sasl_initial_response(
                    out,
                    SCRAM_SHA_256,
                    Some(scram.client_first().as_bytes()),
                )?;
                (State::ScramFirstSent(scram), AuthProgress::Reply)
            }
            (State::ScramFirstSent(scram), AuthRequest::SaslContinue { data }) => {
                let (client_final, server_signature) = scram.client_final(&self.login, data)?;
                encode::sasl_response(out, client_final.as_bytes())?;
                (
                    State::ScramFinalSent { server_signature },
                    AuthProgress::Reply,
                )
            }
            (State::ScramFinalSent { server_signature }, AuthRequest::SaslFinal { data }) => {
                verify_server_final(data, &server_signature)?;
                (State::ScramVerified, AuthProgress::Continue)
            }
            (_, AuthRequest::Unsupported(code)) => {
                return Err(WireError::UnsupportedAuth {
                    method: format!("code {code}"),
                });
            }
            // Includes AuthenticationOk before the server proved itself in SCRAM: accepting
            // it would let a man in the middle skip mutual authentication.
            (_, _) => {
                return Err(WireError::AuthOutOfOrder {
                    what: "unexpected authentication request",
                });
            }
        };
        self.state = next;
        Ok(progress)
    }
}

impl ClientAuth {
    #[cold]
    fn cannot_answer(&self, method: &str) -> WireError {
        WireError::UnsupportedAuth {
            method: format!(
                "{method}: pgprism holds only {} for user \"{}\", which cannot answer it",
                self.login.kind(),
                self.user
            ),
        }
    }
}

/// `"md5" + md5_hex(md5_hex(password + user) + salt)`, PostgreSQL's MD5 password reply.
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    md5_salted(&md5_secret(user, password), salt)
}

/// `"md5" + md5_hex(password + user)`: PostgreSQL's stored MD5 secret.
pub(super) fn md5_secret(user: &str, password: &str) -> String {
    let inner = Md5::new()
        .chain_update(password)
        .chain_update(user)
        .finalize();
    format!("md5{}", hex(&inner))
}

/// The MD5 reply from a stored hash (with or without its `md5` prefix):
/// `"md5" + md5_hex(hash_hex + salt)`.
pub(super) fn md5_salted(hash: &str, salt: [u8; 4]) -> String {
    let hex_part = hash.strip_prefix("md5").unwrap_or(hash);
    let outer = Md5::new()
        .chain_update(hex_part)
        .chain_update(salt)
        .finalize();
    format!("md5{}", hex(&outer))
}

/// Equality that takes the same time wherever the first difference is: for proofs,
/// signatures and hashes derived from secrets. Lengths are not secret.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

pub(super) fn random_nonce() -> Result<String, WireError> {
    let mut raw = [0u8; NONCE_BYTES];
    getrandom::fill(&mut raw).map_err(|source| WireError::Random { source })?;
    Ok(BASE64.encode(raw))
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block, which is SCRAM's `Hi()` (RFC 5802 §2.2).
pub(super) fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed =
        <HmacSha256 as KeyInit>::new_from_slice(password).unwrap_or_else(|_| unreachable!());
    // Cloning the keyed state saves re-hashing the key pads on every iteration.
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

/// State of one SCRAM-SHA-256 exchange after client-first.
struct ScramClient {
    nonce: String,
    client_first_bare: String,
}

impl ScramClient {
    fn new(user: &str, nonce: String) -> Self {
        // RFC 5802 saslname: ',' and '=' must be escaped.
        let user = user.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={user},r={nonce}");
        Self {
            nonce,
            client_first_bare,
        }
    }

    /// gs2 header `n,,`: no channel binding, no authzid.
    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Parses server-first, returns client-final and the server signature to expect.
    /// `login` is a password or SCRAM keys (the caller checked).
    fn client_final(
        &self,
        login: &ServerLogin,
        server_first: &[u8],
    ) -> Result<(String, [u8; 32]), WireError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| WireError::ScramMalformed {
                what: "server-first-message encoding",
            })?;
        let mut attrs = server_first.split(',');
        let mut attr = |prefix: &'static str, what: &'static str| {
            attrs
                .next()
                .and_then(|a| a.strip_prefix(prefix))
                .ok_or(WireError::ScramMalformed { what })
        };
        let nonce = attr("r=", "server-first nonce")?;
        let salt = attr("s=", "server-first salt")?;
        let iterations = attr("i=", "server-first iteration count")?;
        // Checked before any expensive work so a forged message costs us nothing.
        if nonce.len() <= self.nonce.len()
            || !nonce.starts_with(&self.nonce)
            || !nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(WireError::ScramNonceMismatch);
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|source| WireError::ScramBase64 {
                what: "salt",
                source,
            })?;
        let iterations: u64 = iterations.parse().map_err(|_| WireError::ScramMalformed {
            what: "server-first iteration count",
        })?;
        let iterations = match u32::try_from(iterations) {
            Ok(i @ 1..=SCRAM_ITERATIONS_MAX) => i,
            _ => {
                return Err(WireError::ScramIterations {
                    iterations,
                    max: SCRAM_ITERATIONS_MAX,
                });
            }
        };

        // biws = base64("n,,"), the gs2 header echoed back.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);

        let (client_key, server_key) = match login {
            ServerLogin::Password(password) => {
                // SASLprep is not applied: for ASCII passwords it is the identity, and
                // PostgreSQL itself falls back to the raw bytes when preparation fails.
                let salted = pbkdf2_sha256(password.as_bytes(), &salt, iterations);
                (
                    hmac(&salted, &[b"Client Key"]),
                    hmac(&salted, &[b"Server Key"]),
                )
            }
            // The salt and iterations are the server's; the keys only fit if they are the
            // ones the keys were made with, which the server's verdict tells.
            ServerLogin::ScramKeys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
            ServerLogin::Md5Hash(_) | ServerLogin::None => {
                return Err(WireError::AuthOutOfOrder {
                    what: "SCRAM without a password or keys",
                });
            }
        };
        let stored_key: [u8; 32] = <Sha256 as sha2::Digest>::digest(client_key).into();
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        let server_signature = hmac(&server_key, &[auth_message.as_bytes()]);
        Ok((
            format!("{without_proof},p={}", BASE64.encode(proof)),
            server_signature,
        ))
    }
}

/// Checks server-final (`v=<signature>` or `e=<error>`).
fn verify_server_final(data: &[u8], expected: &[u8; 32]) -> Result<(), WireError> {
    let text = std::str::from_utf8(data).map_err(|_| WireError::ScramMalformed {
        what: "server-final-message encoding",
    })?;
    let first = text.split(',').next().unwrap_or_default();
    if let Some(message) = first.strip_prefix("e=") {
        return Err(WireError::ScramServerError {
            message: message.to_owned(),
        });
    }
    let Some(signature) = first.strip_prefix("v=") else {
        return Err(WireError::ScramMalformed {
            what: "server-final-message",
        });
    };
    let signature = BASE64
        .decode(signature)
        .map_err(|source| WireError::ScramBase64 {
            what: "server signature",
            source,
        })?;
    // Constant-time comparison: the signature is a secret-derived value.
    if constant_time_eq(&signature, expected) {
        Ok(())
    } else {
        Err(WireError::ScramServerSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Frame, FrontendMessage, split_message};

    const RFC_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn pencil() -> ServerLogin {
        ServerLogin::Password("pencil".into())
    }

    fn one_frame(out: &mut BytesMut) -> Frame {
        let frame = split_message(out, 1 << 20).unwrap().unwrap();
        assert!(out.is_empty());
        frame
    }

    #[test]
    fn scram_matches_rfc_7677() {
        let scram = ScramClient::new("user", RFC_NONCE.to_owned());
        assert_eq!(scram.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let (client_final, signature) = scram
            .client_final(&pencil(), RFC_SERVER_FIRST.as_bytes())
            .unwrap();
        assert_eq!(client_final, RFC_CLIENT_FINAL);
        verify_server_final(RFC_SERVER_FINAL.as_bytes(), &signature).unwrap();
        let mut wrong = RFC_SERVER_FINAL.to_owned();
        wrong.replace_range(2..3, "7");
        assert!(matches!(
            verify_server_final(wrong.as_bytes(), &signature),
            Err(WireError::ScramServerSignature)
        ));
        assert!(matches!(
            verify_server_final(b"e=invalid-proof", &signature),
            Err(WireError::ScramServerError { .. })
        ));
    }

    #[test]
    fn scram_rejects_bad_server_first() {
        let scram = ScramClient::new("", RFC_NONCE.to_owned());
        let cases = [
            "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", // not extended
            "r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==",
            "m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
            "",
        ];
        for case in cases {
            assert!(
                scram.client_final(&pencil(), case.as_bytes()).is_err(),
                "{case}"
            );
        }
    }

    #[test]
    fn scram_state_machine_end_to_end() {
        let mut auth = ClientAuth::new("user", "pencil");
        let mut out = BytesMut::new();
        let sasl = AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256-PLUS", SCRAM_SHA_256],
        };
        let progress = auth
            .step_with(&sasl, &mut out, || Ok(RFC_NONCE.to_owned()))
            .unwrap();
        assert_eq!(progress, AuthProgress::Reply);
        let frame = one_frame(&mut out);
        let FrontendMessage::Password(p) =
            FrontendMessage::decode(frame.tag(), frame.body()).unwrap()
        else {
            panic!("not a password message");
        };
        let initial = p.sasl_initial().unwrap();
        assert_eq!(initial.mechanism, SCRAM_SHA_256);
        assert_eq!(initial.data, Some(&b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"[..]));

        // With the empty SCRAM user the auth message differs from the RFC's, so compute the
        // expected final message through the same primitive rather than the vector.
        let cont = AuthRequest::SaslContinue {
            data: RFC_SERVER_FIRST.as_bytes(),
        };
        assert_eq!(auth.step(&cont, &mut out).unwrap(), AuthProgress::Reply);
        let frame = one_frame(&mut out);
        let (expected, signature) = ScramClient::new("", RFC_NONCE.to_owned())
            .client_final(&pencil(), RFC_SERVER_FIRST.as_bytes())
            .unwrap();
        assert_eq!(frame.body(), expected.as_bytes());

        // AuthenticationOk before the server proved itself is refused.
        let mut early = ClientAuth::new("user", "pencil");
        early
            .step_with(&sasl, &mut out, || Ok(RFC_NONCE.to_owned()))
            .unwrap();
        out.clear();
        assert!(early.step(&AuthRequest::Ok, &mut out).is_err());

        let server_final = format!("v={}", BASE64.encode(signature));
        let fin = AuthRequest::SaslFinal {
            data: server_final.as_bytes(),
        };
        assert_eq!(auth.step(&fin, &mut out).unwrap(), AuthProgress::Continue);
        assert_eq!(
            auth.step(&AuthRequest::Ok, &mut out).unwrap(),
            AuthProgress::Authenticated
        );
        assert!(auth.is_authenticated());
        assert!(out.is_empty());
    }

    #[test]
    fn scram_wrong_server_signature_is_an_error() {
        let mut auth = ClientAuth::new("u", "pencil");
        let mut out = BytesMut::new();
        let sasl = AuthRequest::Sasl {
            mechanisms: vec![SCRAM_SHA_256],
        };
        auth.step_with(&sasl, &mut out, || Ok(RFC_NONCE.to_owned()))
            .unwrap();
        auth.step(
            &AuthRequest::SaslContinue {
                data: RFC_SERVER_FIRST.as_bytes(),
            },
            &mut out,
        )
        .unwrap();
        let err = auth
            .step(
                &AuthRequest::SaslFinal {
                    data: RFC_SERVER_FINAL.as_bytes(),
                },
                &mut out,
            )
            .unwrap_err();
        assert!(matches!(err, WireError::ScramServerSignature));
        assert_eq!(err.sqlstate(), "08001");
    }

    #[test]
    fn md5_reply_follows_the_formula() {
        // Independent computation of md5(md5(password || user) as hex || salt) as hex.
        let salt = [0x01, 0x02, 0x03, 0x04];
        let to_hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let inner = to_hex(&Md5::digest(b"secretalice"));
        let mut outer_input = inner.into_bytes();
        outer_input.extend_from_slice(&salt);
        let expected = format!("md5{}", to_hex(&Md5::digest(&outer_input)));
        assert_eq!(md5_password("alice", "secret", salt), expected);
        assert_eq!(expected.len(), 35);

        let mut auth = ClientAuth::new("alice", "secret");
        let mut out = BytesMut::new();
        assert_eq!(
            auth.step(&AuthRequest::Md5Password { salt }, &mut out)
                .unwrap(),
            AuthProgress::Reply
        );
        let frame = one_frame(&mut out);
        let FrontendMessage::Password(p) =
            FrontendMessage::decode(frame.tag(), frame.body()).unwrap()
        else {
            panic!("not a password message");
        };
        assert_eq!(p.password().unwrap(), expected.as_bytes());
        assert_eq!(
            auth.step(&AuthRequest::Ok, &mut out).unwrap(),
            AuthProgress::Authenticated
        );
    }

    #[test]
    fn cleartext_and_unsupported() {
        let mut auth = ClientAuth::new("alice", "pw");
        let mut out = BytesMut::new();
        auth.step(&AuthRequest::CleartextPassword, &mut out)
            .unwrap();
        assert_eq!(one_frame(&mut out).body(), b"pw\0");
        // A second password request in the same exchange is out of order.
        assert!(
            auth.step(&AuthRequest::CleartextPassword, &mut out)
                .is_err()
        );
        let mut auth = ClientAuth::new("alice", "pw");
        assert!(auth.step(&AuthRequest::Unsupported(7), &mut out).is_err());
        let mut auth = ClientAuth::new("alice", "pw");
        let sasl = AuthRequest::Sasl {
            mechanisms: vec!["OTHER"],
        };
        assert!(matches!(
            auth.step(&sasl, &mut out),
            Err(WireError::UnsupportedAuth { .. })
        ));
        assert!(!format!("{auth:?}").contains("pw\""));
    }

    #[test]
    fn parses_auth_requests() {
        assert_eq!(AuthRequest::parse(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert_eq!(
            AuthRequest::parse(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(),
            AuthRequest::Md5Password { salt: [1, 2, 3, 4] }
        );
        assert!(AuthRequest::parse(&[0, 0, 0, 5, 1, 2, 3]).is_err());
        assert!(AuthRequest::parse(&[0, 0, 0, 0, 1]).is_err());
        let mut sasl = vec![0, 0, 0, 10];
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(
            AuthRequest::parse(&sasl).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM_SHA_256]
            }
        );
        sasl.pop();
        assert!(AuthRequest::parse(&sasl).is_err());
        assert_eq!(
            AuthRequest::parse(&[0, 0, 0, 7]).unwrap(),
            AuthRequest::Unsupported(7)
        );
        assert!(AuthRequest::parse(&[0, 0]).is_err());
    }

    #[test]
    fn scram_keys_answer_like_the_password_they_come_from() {
        // RFC 7677's salt and iteration count, keys derived from "pencil" by hand.
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = pbkdf2_sha256(b"pencil", &salt, 4096);
        let keys = ServerLogin::ScramKeys {
            client_key: hmac(&salted, &[b"Client Key"]),
            server_key: hmac(&salted, &[b"Server Key"]),
        };
        let scram = ScramClient::new("user", RFC_NONCE.to_owned());
        let (client_final, signature) = scram
            .client_final(&keys, RFC_SERVER_FIRST.as_bytes())
            .unwrap();
        assert_eq!(client_final, RFC_CLIENT_FINAL);
        verify_server_final(RFC_SERVER_FINAL.as_bytes(), &signature).unwrap();
        // Keys of another secret make another proof (the server refuses it).
        let other = ServerLogin::ScramKeys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        let (wrong, _) = scram
            .client_final(&other, RFC_SERVER_FIRST.as_bytes())
            .unwrap();
        assert_ne!(wrong, RFC_CLIENT_FINAL);
    }

    #[test]
    fn md5_hash_answers_md5_as_the_password_would() {
        let salt = [9, 8, 7, 6];
        let hash = md5_secret("alice", "secret");
        assert_eq!(hash.len(), 35);
        for stored in [hash.clone(), hash[3..].to_owned()] {
            let mut auth = ClientAuth::with_login("alice", ServerLogin::Md5Hash(stored));
            let mut out = BytesMut::new();
            auth.step(&AuthRequest::Md5Password { salt }, &mut out)
                .unwrap();
            let frame = one_frame(&mut out);
            let FrontendMessage::Password(p) =
                FrontendMessage::decode(frame.tag(), frame.body()).unwrap()
            else {
                panic!("not a password message");
            };
            assert_eq!(
                p.password().unwrap(),
                md5_password("alice", "secret", salt).as_bytes()
            );
        }
    }

    #[test]
    fn derived_logins_refuse_what_they_cannot_answer() {
        let keys = ServerLogin::ScramKeys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        let md5 = ServerLogin::Md5Hash(md5_secret("u", "p"));
        let sasl = AuthRequest::Sasl {
            mechanisms: vec![SCRAM_SHA_256],
        };
        let cases = [
            (keys.clone(), AuthRequest::CleartextPassword),
            (keys.clone(), AuthRequest::Md5Password { salt: [0; 4] }),
            (md5.clone(), AuthRequest::CleartextPassword),
            (md5, sasl.clone()),
            (ServerLogin::None, AuthRequest::CleartextPassword),
            (ServerLogin::None, AuthRequest::Md5Password { salt: [0; 4] }),
            (ServerLogin::None, sasl),
        ];
        for (login, request) in cases {
            let kind = login.kind();
            let mut auth = ClientAuth::with_login("u", login);
            let mut out = BytesMut::new();
            let err = auth.step(&request, &mut out).unwrap_err();
            assert!(matches!(err, WireError::UnsupportedAuth { .. }), "{kind}");
            assert!(err.to_string().contains(kind), "{err}");
            assert!(out.is_empty());
        }
        // Trust needs nothing.
        let mut auth = ClientAuth::with_login("u", ServerLogin::None);
        let mut out = BytesMut::new();
        assert_eq!(
            auth.step(&AuthRequest::Ok, &mut out).unwrap(),
            AuthProgress::Authenticated
        );
        // No secret in Debug output.
        let shown = format!(
            "{:?} {:?}",
            ServerLogin::Password("hunter2".into()),
            ClientAuth::with_login("u", ServerLogin::Md5Hash("md5abc".into()))
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("md5abc"),
            "{shown}"
        );
    }

    #[test]
    fn pbkdf2_matches_rfc_7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1), first 32 bytes.
        let out = pbkdf2_sha256(b"passwd", b"salt", 1);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
