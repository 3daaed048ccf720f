//! Server-side authentication: pgprism checking a client's password itself, as PostgreSQL
//! does, when it shares primary connections between clients (transaction pooling). It
//! owns the secret formats of `pg_authid.rolpassword` ([`Secret`]), the requests pgprism
//! sends (AuthenticationSASL/SASLContinue/SASLFinal, MD5Password, CleartextPassword) and
//! the checks of the client's `p` messages, and it tells the caller how pgprism may then
//! log in to the server as that user ([`ServerLogin`]).
//!
//! Sans-IO: bytes in, bytes out. It must never panic on a client's bytes, never accept a
//! proof without checking it in constant time, never tell a client whether a user exists
//! (a user without a secret goes through a full, failing exchange), and never put a secret
//! in an error or a log line.
//!
//! It has its own error type rather than [`super::WireError`]'s: its failures are the server's
//! verdicts (28P01) and client protocol violations (08P01), where `WireError` describes
//! what a peer's bytes broke and maps authentication failures to 08001 (pgprism as client).

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, BytesMut};
use sha2::{Digest as _, Sha256};

use super::auth::{
    SCRAM_ITERATIONS_MAX, SCRAM_SHA_256, ServerLogin, code, constant_time_eq, hex, hmac,
    md5_salted, md5_secret, pbkdf2_sha256,
};
use super::frontend::Password;
use super::sqlstate;
use super::tag;

/// Iterations for a SCRAM secret pgprism derives from a plain password (PostgreSQL's
/// `scram_iterations` default).
pub const SCRAM_ITERATIONS_DEFAULT: u32 = 4096;

/// Salt bytes of a derived SCRAM secret (PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`).
const SCRAM_SALT_BYTES: usize = 16;

/// Largest salt accepted in a SCRAM secret: PostgreSQL makes 16 bytes; more than this is a
/// corrupt secret, not a choice.
const SCRAM_SALT_BYTES_MAX: usize = 1024;

/// Random bytes in the server's part of the nonce (PostgreSQL's `SCRAM_RAW_NONCE_LEN`).
const SERVER_NONCE_BYTES: usize = 18;

/// Largest `p` message body accepted during authentication (PostgreSQL's
/// `PG_MAX_AUTH_TOKEN_LENGTH`). SCRAM messages are about 100 bytes.
pub const AUTH_MESSAGE_BYTES_MAX: usize = 65_535;

/// A user's secret as PostgreSQL stores it in `pg_authid.rolpassword` (and PgBouncer in its
/// auth file): a password, an MD5 hash or a SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A cleartext password. An empty one never authenticates anyone (PostgreSQL refuses
    /// empty passwords too).
    Plain(String),
    /// The 32 lowercase hex digits of md5(password || user), without the `md5` prefix.
    Md5([u8; 32]),
    Scram(ScramSecret),
}

/// Why a secret could not be read. Never quotes the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SCRAM-SHA-256 secret: {what}")]
pub struct SecretError {
    what: &'static str,
}

impl Secret {
    /// Reads a stored secret: `md5` + 32 hex digits is MD5, `SCRAM-SHA-256$...` is SCRAM
    /// (an error when malformed: a typo must not turn a verifier into a password), and
    /// anything else is a plain password, as PostgreSQL classifies `rolpassword`.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        if text.starts_with("SCRAM-SHA-256$") {
            return ScramSecret::parse(text).map(Secret::Scram);
        }
        if let Some(digits) = text.strip_prefix("md5")
            && let Ok(digits) = <[u8; 32]>::try_from(digits.as_bytes())
            && digits.iter().all(u8::is_ascii_hexdigit)
        {
            // PostgreSQL writes lowercase, and the MD5 reply hashes these digits as text.
            return Ok(Secret::Md5(digits.map(|d| d.to_ascii_lowercase())));
        }
        Ok(Secret::Plain(text.to_owned()))
    }

    /// An MD5 secret from a password, as PostgreSQL stores it with
    /// `password_encryption = md5`.
    pub fn md5_of(user: &str, password: &str) -> Secret {
        let text = md5_secret(user, password);
        let mut digits = [0u8; 32];
        digits.copy_from_slice(text.as_bytes().get(3..).unwrap_or_default());
        Secret::Md5(digits)
    }

    /// How pgprism may log in to the server with this secret alone (no client exchange):
    /// a password as itself, an MD5 hash as a hash; a SCRAM verifier cannot log in.
    pub fn server_login(&self) -> ServerLogin {
        match self {
            Secret::Plain(password) if !password.is_empty() => {
                ServerLogin::Password(password.clone())
            }
            Secret::Md5(digits) => ServerLogin::Md5Hash(md5_text(digits)),
            Secret::Plain(_) | Secret::Scram(_) => ServerLogin::None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5(_) => "md5",
            Secret::Scram(_) => "SCRAM-SHA-256",
        }
    }
}

impl std::fmt::Debug for Secret {
    // Hand-written so no secret reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.kind())
    }
}

/// `md5` + the digits, as `rolpassword` holds it.
fn md5_text(digits: &[u8; 32]) -> String {
    // Digits are ASCII hex (checked by `Secret::parse`, made by `md5_of`).
    format!("md5{}", String::from_utf8_lossy(digits))
}

/// A SCRAM-SHA-256 verifier (RFC 5803 as PostgreSQL writes it):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64 parts.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramSecret {
    pub fn parse(text: &str) -> Result<ScramSecret, SecretError> {
        let bad = |what| SecretError { what };
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(bad("expected the SCRAM-SHA-256$ prefix"))?;
        let (salting, keys) = rest
            .split_once('$')
            .ok_or(bad("expected '$' before the keys"))?;
        let (iterations, salt) = salting
            .split_once(':')
            .ok_or(bad("expected <iterations>:<salt>"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(bad("expected <StoredKey>:<ServerKey>"))?;
        let iterations = match iterations.parse::<u32>() {
            Ok(i @ 1..=SCRAM_ITERATIONS_MAX) => i,
            _ => return Err(bad("iteration count outside 1..=1000000")),
        };
        let salt = BASE64.decode(salt).map_err(|_| bad("salt is not base64"))?;
        if salt.is_empty() || salt.len() > SCRAM_SALT_BYTES_MAX {
            return Err(bad("salt length outside 1..=1024 bytes"));
        }
        let key = |text: &str, what| -> Result<[u8; 32], SecretError> {
            BASE64
                .decode(text)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or(bad(what))
        };
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: key(stored_key, "StoredKey is not 32 bytes of base64")?,
            server_key: key(server_key, "ServerKey is not 32 bytes of base64")?,
        })
    }

    /// The verifier of `password` with this salt and iteration count (what PostgreSQL
    /// stores with `password_encryption = scram-sha-256`, SASLprep aside: see
    /// [`super::ClientAuth`]).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = pbkdf2_sha256(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// The text form, as in `rolpassword` and an auth file.
    pub fn to_rolpassword(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Whether `password` is the one this verifier was made from (cleartext
    /// authentication against a SCRAM secret): costs one PBKDF2 of `iterations`.
    fn verifies(&self, password: &[u8]) -> bool {
        let salted = pbkdf2_sha256(password, &self.salt, self.iterations);
        let stored_key: [u8; 32] = Sha256::digest(hmac(&salted, &[b"Client Key"])).into();
        let server_key = hmac(&salted, &[b"Server Key"]);
        // Both, as PostgreSQL's scram_verify_plain_password does.
        constant_time_eq(&stored_key, &self.stored_key)
            & constant_time_eq(&server_key, &self.server_key)
    }
}

/// How pgprism asks clients for their password (`pool.auth-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// SCRAM-SHA-256; a user whose secret is an MD5 hash is asked for MD5 instead (a hash
    /// cannot run SCRAM).
    ScramSha256,
    /// MD5; a user whose secret is a SCRAM verifier is asked for SCRAM instead (a verifier
    /// cannot check MD5).
    Md5,
    /// The password in clear (only sensible over TLS).
    Cleartext,
    /// No password at all.
    Trust,
}

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
pub enum ServerAuthError {
    /// Wrong password, or no such user, or a user without a usable secret: the client must
    /// not be able to tell these apart.
    #[error("password authentication failed for user \"{user}\"")]
    Failed { user: String },
    /// The client broke the authentication protocol.
    #[error("{what}")]
    Protocol { what: &'static str },
    /// No randomness for a nonce or salt.
    #[error("no randomness for authentication")]
    Random {
        #[source]
        source: getrandom::Error,
    },
}

impl ServerAuthError {
    /// The SQLSTATE of the FATAL error the client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::Failed { .. } => sqlstate::INVALID_PASSWORD,
            Self::Protocol { .. } => sqlstate::PROTOCOL_VIOLATION,
            Self::Random { .. } => sqlstate::INTERNAL_ERROR,
        }
    }
}

#[cold]
fn protocol(what: &'static str) -> ServerAuthError {
    ServerAuthError::Protocol { what }
}

/// What the caller does after [`ServerAuth::start`] or [`ServerAuth::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerProgress {
    /// A request was appended to the output: send it, then pass the client's next message
    /// to [`ServerAuth::step`].
    Reply,
    /// The client is authenticated. Send what was appended to the output (SCRAM's
    /// SASLFinal), then AuthenticationOk and the rest of the startup answer. The login is
    /// how pgprism may log in to the server as this user.
    Done(ServerLogin),
}

/// Server side of PostgreSQL authentication, one per client connection. Abandon it after
/// an error, as the connection is.
pub struct ServerAuth {
    user: String,
    state: ServerState,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

enum ServerState {
    /// AuthenticationSASL sent; waiting for SASLInitialResponse.
    ScramInitial(Box<Scram>),
    /// SASLContinue (server-first) sent; waiting for client-final in a SASLResponse.
    ScramFinal(Box<Scram>, ScramExchange),
    /// AuthenticationMD5Password sent; `expected` (from its salt) is the only right answer.
    /// A fake exchange expects a random string nobody can send.
    Md5 {
        expected: String,
        login: Option<ServerLogin>,
    },
    /// AuthenticationCleartextPassword sent.
    Cleartext { secret: Option<Secret> },
    /// Succeeded, failed or abandoned: any further message is out of order.
    Finished,
}

/// One SCRAM exchange's secret and what pgprism knows after it.
struct Scram {
    secret: ScramSecret,
    /// The server nonce, drawn at start so a step needs no randomness.
    server_nonce: String,
    /// The password when the secret was derived from a plain one: a better login than keys.
    password: Option<String>,
    /// A fake exchange for a user without a secret: the proof never verifies.
    fake: bool,
}

/// What client-first fixed for client-final.
struct ScramExchange {
    /// `n,,` or `y,,`: the `c=` attribute must echo it.
    gs2_header: &'static [u8],
    nonce: String,
    client_first_bare: String,
    server_first: String,
}

type Fill<'a> = &'a mut dyn FnMut(&mut [u8]) -> Result<(), getrandom::Error>;

impl ServerAuth {
    /// Begins authenticating `user`, whose secret is `secret` (`None`: unknown user, still
    /// taken through a whole exchange that fails), appending the first request to `out`.
    pub fn start(
        user: &str,
        secret: Option<&Secret>,
        method: AuthMethod,
        out: &mut BytesMut,
    ) -> Result<(ServerAuth, ServerProgress), ServerAuthError> {
        Self::start_with(user, secret, method, out, &mut |buf| getrandom::fill(buf))
    }

    fn start_with(
        user: &str,
        secret: Option<&Secret>,
        method: AuthMethod,
        out: &mut BytesMut,
        fill: Fill<'_>,
    ) -> Result<(ServerAuth, ServerProgress), ServerAuthError> {
        // An empty password never authenticates: the same fake exchange as no user.
        let secret = secret.filter(|s| !matches!(s, Secret::Plain(p) if p.is_empty()));
        let mut random =
            |buf: &mut [u8]| fill(buf).map_err(|source| ServerAuthError::Random { source });
        let state = match (method, secret) {
            (AuthMethod::Trust, secret) => {
                let login = secret.map_or(ServerLogin::None, Secret::server_login);
                let auth = ServerAuth {
                    user: user.to_owned(),
                    state: ServerState::Finished,
                };
                return Ok((auth, ServerProgress::Done(login)));
            }
            (AuthMethod::Cleartext, secret) => {
                auth_request(out, code::CLEARTEXT_PASSWORD, &[]);
                ServerState::Cleartext {
                    secret: secret.cloned(),
                }
            }
            (AuthMethod::ScramSha256, Some(Secret::Md5(digits)))
            | (AuthMethod::Md5, Some(Secret::Md5(digits))) => {
                let hash = md5_text(digits);
                Self::md5(
                    out,
                    &hash,
                    Some(ServerLogin::Md5Hash(hash.clone())),
                    &mut random,
                )?
            }
            (AuthMethod::Md5, Some(Secret::Plain(password))) => {
                let hash = md5_secret(user, password);
                Self::md5(
                    out,
                    &hash,
                    Some(ServerLogin::Password(password.clone())),
                    &mut random,
                )?
            }
            (AuthMethod::Md5, None) => {
                let mut noise = [0u8; 16];
                random(&mut noise)?;
                // A hash nobody's password has: the answer is compared and refused.
                Self::md5(out, &format!("md5{}", hex(&noise)), None, &mut random)?
            }
            (AuthMethod::ScramSha256 | AuthMethod::Md5, Some(Secret::Scram(secret))) => {
                Self::scram(out, secret.clone(), None, false, &mut random)?
            }
            (AuthMethod::ScramSha256, Some(Secret::Plain(password))) => {
                // The per-user salt, not a fresh one: a salt that changes on every attempt
                // would tell this user apart from one that does not exist.
                let salt = per_user_salt(user, &mut random)?;
                let secret = ScramSecret::from_password(password, &salt, SCRAM_ITERATIONS_DEFAULT);
                Self::scram(out, secret, Some(password.clone()), false, &mut random)?
            }
            (AuthMethod::ScramSha256, None) => {
                let secret = fake_scram_secret(user, &mut random)?;
                Self::scram(out, secret, None, true, &mut random)?
            }
        };
        let auth = ServerAuth {
            user: user.to_owned(),
            state,
        };
        Ok((auth, ServerProgress::Reply))
    }

    fn md5(
        out: &mut BytesMut,
        hash: &str,
        login: Option<ServerLogin>,
        random: &mut dyn FnMut(&mut [u8]) -> Result<(), ServerAuthError>,
    ) -> Result<ServerState, ServerAuthError> {
        let mut salt = [0u8; 4];
        random(&mut salt)?;
        auth_request(out, code::MD5_PASSWORD, &salt);
        Ok(ServerState::Md5 {
            expected: md5_salted(hash, salt),
            login,
        })
    }

    fn scram(
        out: &mut BytesMut,
        secret: ScramSecret,
        password: Option<String>,
        fake: bool,
        random: &mut dyn FnMut(&mut [u8]) -> Result<(), ServerAuthError>,
    ) -> Result<ServerState, ServerAuthError> {
        let mut nonce = [0u8; SERVER_NONCE_BYTES];
        random(&mut nonce)?;
        // Only SCRAM-SHA-256: without channel binding there is no -PLUS to offer, and
        // offering it would make a client's `y` flag a downgrade signal.
        let mut mechanisms = Vec::with_capacity(SCRAM_SHA_256.len() + 2);
        mechanisms.extend_from_slice(SCRAM_SHA_256.as_bytes());
        mechanisms.extend_from_slice(&[0, 0]);
        auth_request(out, code::SASL, &mechanisms);
        Ok(ServerState::ScramInitial(Box::new(Scram {
            secret,
            server_nonce: BASE64.encode(nonce),
            password,
            fake,
        })))
    }

    /// Checks the client's next message (`tag`, `body`), appending the next request to
    /// `out`. Any error ends the exchange.
    pub fn step(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<ServerProgress, ServerAuthError> {
        let state = std::mem::replace(&mut self.state, ServerState::Finished);
        if matches!(state, ServerState::Finished) {
            return Err(protocol(
                "authentication message after authentication ended",
            ));
        }
        if tag != tag::PASSWORD {
            return Err(protocol(
                "expected a password response during authentication",
            ));
        }
        if body.len() > AUTH_MESSAGE_BYTES_MAX {
            return Err(protocol("password response too long"));
        }
        let message = Password::new(body);
        match state {
            ServerState::ScramInitial(scram) => {
                let initial = message
                    .sasl_initial()
                    .map_err(|_| protocol("malformed SASLInitialResponse"))?;
                if initial.mechanism != SCRAM_SHA_256 {
                    return Err(protocol(
                        "client selected an invalid SASL authentication mechanism",
                    ));
                }
                let data = initial
                    .data
                    .ok_or(protocol("SASLInitialResponse without client-first-message"))?;
                let exchange = client_first(data, &scram)?;
                auth_request(out, code::SASL_CONTINUE, exchange.server_first.as_bytes());
                self.state = ServerState::ScramFinal(scram, exchange);
                Ok(ServerProgress::Reply)
            }
            ServerState::ScramFinal(scram, exchange) => {
                let (server_final, login) =
                    self.client_final(message.sasl_response(), &scram, &exchange)?;
                auth_request(out, code::SASL_FINAL, server_final.as_bytes());
                Ok(ServerProgress::Done(login))
            }
            ServerState::Md5 { expected, login } => {
                let answer = message
                    .password()
                    .map_err(|_| protocol("malformed password message"))?;
                match login {
                    Some(login) if constant_time_eq(answer, expected.as_bytes()) => {
                        Ok(ServerProgress::Done(login))
                    }
                    _ => Err(self.failed()),
                }
            }
            ServerState::Cleartext { secret } => {
                let password = message
                    .password()
                    .map_err(|_| protocol("malformed password message"))?;
                let verified = match &secret {
                    Some(Secret::Plain(expected)) => {
                        constant_time_eq(password, expected.as_bytes())
                    }
                    Some(Secret::Md5(digits)) => match std::str::from_utf8(password) {
                        Ok(text) => constant_time_eq(
                            md5_secret(&self.user, text).as_bytes(),
                            md5_text(digits).as_bytes(),
                        ),
                        Err(_) => false,
                    },
                    Some(Secret::Scram(verifier)) => verifier.verifies(password),
                    None => false,
                };
                let Some(secret) = secret.filter(|_| verified) else {
                    return Err(self.failed());
                };
                // The client told us the password: the best login there is.
                let login = match std::str::from_utf8(password) {
                    Ok(text) => ServerLogin::Password(text.to_owned()),
                    Err(_) => secret.server_login(),
                };
                Ok(ServerProgress::Done(login))
            }
            ServerState::Finished => Err(protocol(
                "authentication message after authentication ended",
            )),
        }
    }

    /// Checks client-final's binding, nonce and proof; returns server-final and the login.
    fn client_final(
        &self,
        data: &[u8],
        scram: &Scram,
        exchange: &ScramExchange,
    ) -> Result<(String, ServerLogin), ServerAuthError> {
        let text = std::str::from_utf8(data)
            .map_err(|_| protocol("malformed SCRAM message: client-final is not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(protocol(
            "malformed SCRAM message: client-final without proof",
        ))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(protocol(
                "malformed SCRAM message: expected channel binding",
            ))?;
        let binding = BASE64
            .decode(binding)
            .map_err(|_| protocol("malformed SCRAM message: channel binding is not base64"))?;
        if binding != exchange.gs2_header {
            return Err(protocol("SCRAM channel binding check failed"));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(protocol("malformed SCRAM message: expected nonce"))?;
        if nonce != exchange.nonce {
            return Err(protocol("SCRAM nonce does not match"));
        }
        // Extensions may follow; PostgreSQL ignores them too.
        if !attrs.all(is_attribute) {
            return Err(protocol(
                "malformed SCRAM message: bad attribute in client-final",
            ));
        }
        let proof = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| <[u8; 32]>::try_from(p).ok())
            .ok_or(protocol(
                "malformed SCRAM message: proof is not 32 bytes of base64",
            ))?;

        let auth_message = format!(
            "{},{},{without_proof}",
            exchange.client_first_bare, exchange.server_first
        );
        let secret = &scram.secret;
        let client_signature = hmac(&secret.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored_key, &secret.stored_key) || scram.fake {
            return Err(self.failed());
        }
        let server_signature = hmac(&secret.server_key, &[auth_message.as_bytes()]);
        let login = match &scram.password {
            Some(password) => ServerLogin::Password(password.clone()),
            None => ServerLogin::ScramKeys {
                client_key,
                server_key: secret.server_key,
            },
        };
        Ok((format!("v={}", BASE64.encode(server_signature)), login))
    }

    #[cold]
    fn failed(&self) -> ServerAuthError {
        ServerAuthError::Failed {
            user: self.user.clone(),
        }
    }
}

/// Reads client-first (RFC 5802 §7, PostgreSQL's read_client_first_message) and makes
/// server-first.
fn client_first(data: &[u8], scram: &Scram) -> Result<ScramExchange, ServerAuthError> {
    let text = std::str::from_utf8(data)
        .map_err(|_| protocol("malformed SCRAM message: client-first is not UTF-8"))?;
    let gs2_header: &'static [u8] = match text.as_bytes() {
        [b'n', b',', ..] => b"n,,",
        // The client could bind but believes we cannot: right, we offered no -PLUS.
        [b'y', b',', ..] => b"y,,",
        [b'p', ..] => {
            return Err(protocol(
                "client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data",
            ));
        }
        _ => {
            return Err(protocol(
                "malformed SCRAM message: unexpected channel-binding flag",
            ));
        }
    };
    let rest = text.get(2..).unwrap_or_default();
    if rest.starts_with("a=") {
        return Err(protocol(
            "client uses authorization identity, which is not supported",
        ));
    }
    let bare = rest.strip_prefix(',').ok_or(protocol(
        "malformed SCRAM message: expected ',' after the gs2 header",
    ))?;
    let mut attrs = bare.split(',');
    match attrs.next() {
        Some(a) if a.starts_with("m=") => {
            return Err(protocol("client requires an unsupported SCRAM extension"));
        }
        // The user name here is ignored: the startup packet's is the one authenticated.
        Some(a) if a.starts_with("n=") => {}
        _ => return Err(protocol("malformed SCRAM message: expected user name")),
    }
    let client_nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(protocol("malformed SCRAM message: expected nonce"))?;
    if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(protocol("malformed SCRAM message: nonce is not printable"));
    }
    if !attrs.all(is_attribute) {
        return Err(protocol(
            "malformed SCRAM message: bad attribute in client-first",
        ));
    }
    let nonce = format!("{client_nonce}{}", scram.server_nonce);
    let server_first = format!(
        "r={nonce},s={},i={}",
        BASE64.encode(&scram.secret.salt),
        scram.secret.iterations
    );
    Ok(ScramExchange {
        gs2_header,
        nonce,
        client_first_bare: bare.to_owned(),
        server_first,
    })
}

/// An RFC 5802 extension attribute: one ASCII letter and `=`.
fn is_attribute(attr: &str) -> bool {
    matches!(attr.as_bytes(), [letter, b'=', ..] if letter.is_ascii_alphabetic())
}

/// A salt for a user whose secret has none (a plain password, or no secret at all): the
/// same on every attempt for the same name within this process, and different between
/// names, as a stored verifier's would be (PostgreSQL's scram_mock_salt does the same for
/// unknown users), so the exchange does not show whether the user exists.
fn per_user_salt(
    user: &str,
    random: &mut dyn FnMut(&mut [u8]) -> Result<(), ServerAuthError>,
) -> Result<[u8; SCRAM_SALT_BYTES], ServerAuthError> {
    static SALT_KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = match SALT_KEY.get() {
        Some(key) => key,
        None => {
            let mut key = [0u8; 32];
            random(&mut key)?;
            // A racing shard may have set it first: either key is as good, one wins.
            SALT_KEY.get_or_init(|| key)
        }
    };
    let mac = hmac(key, &[user.as_bytes()]);
    let mut salt = [0u8; SCRAM_SALT_BYTES];
    salt.copy_from_slice(
        mac.get(..SCRAM_SALT_BYTES)
            .unwrap_or(&[0; SCRAM_SALT_BYTES]),
    );
    Ok(salt)
}

/// A verifier for a user without a secret, so the exchange looks like a real one: the
/// per-user salt, the default iteration count, and keys that match no password.
fn fake_scram_secret(
    user: &str,
    random: &mut dyn FnMut(&mut [u8]) -> Result<(), ServerAuthError>,
) -> Result<ScramSecret, ServerAuthError> {
    let salt = per_user_salt(user, random)?;
    let mut stored_key = [0u8; 32];
    let mut server_key = [0u8; 32];
    random(&mut stored_key)?;
    random(&mut server_key)?;
    Ok(ScramSecret {
        iterations: SCRAM_ITERATIONS_DEFAULT,
        salt: salt.to_vec(),
        stored_key,
        server_key,
    })
}

/// Appends an Authentication (`R`) request: `code` then `data`. Bodies here are a few
/// hundred bytes at most (server-first with a salt of at most 1 KiB).
fn auth_request(out: &mut BytesMut, code: i32, data: &[u8]) {
    out.reserve(9 + data.len());
    out.put_u8(tag::AUTHENTICATION);
    out.put_i32(8 + data.len() as i32);
    out.put_i32(code);
    out.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AuthProgress, AuthRequest, ClientAuth, encode, split_message};

    const USER: &str = "alice";
    const PASSWORD: &str = "correct horse";

    fn scram_secret(password: &str) -> Secret {
        Secret::Scram(ScramSecret::from_password(
            password,
            b"0123456789abcdef",
            4096,
        ))
    }

    /// Drives `ServerAuth` against `ClientAuth` in memory until one side stops.
    fn exchange(
        secret: Option<&Secret>,
        method: AuthMethod,
        client: &mut ClientAuth,
    ) -> Result<ServerLogin, ServerAuthError> {
        let mut to_client = BytesMut::new();
        let (mut server, mut progress) = ServerAuth::start(USER, secret, method, &mut to_client)?;
        for _ in 0..8 {
            // The server's requests go to the client; the client's answer back.
            let mut to_server = BytesMut::new();
            while let Some(frame) = split_message(&mut to_client, 1 << 20).unwrap() {
                assert_eq!(frame.tag(), tag::AUTHENTICATION);
                let request = AuthRequest::parse(frame.body()).unwrap();
                client
                    .step(&request, &mut to_server)
                    .expect("the client accepts the server's request");
            }
            if let ServerProgress::Done(login) = progress {
                assert_eq!(
                    client.step(&AuthRequest::Ok, &mut to_server).unwrap(),
                    AuthProgress::Authenticated
                );
                return Ok(login);
            }
            let frame = split_message(&mut to_server, 1 << 20).unwrap().unwrap();
            progress = server.step(frame.tag(), frame.body(), &mut to_client)?;
        }
        panic!("the exchange did not end");
    }

    fn first_request(secret: Option<&Secret>, method: AuthMethod) -> (ServerAuth, i32) {
        let mut out = BytesMut::new();
        let (auth, progress) = ServerAuth::start(USER, secret, method, &mut out).unwrap();
        assert_eq!(progress, ServerProgress::Reply);
        let frame = split_message(&mut out, 1 << 20).unwrap().unwrap();
        assert!(out.is_empty());
        let code = i32::from_be_bytes(frame.body()[..4].try_into().unwrap());
        (auth, code)
    }

    #[test]
    fn scram_with_a_verifier_recovers_the_client_key() {
        let secret = scram_secret(PASSWORD);
        let mut client = ClientAuth::new(USER, PASSWORD);
        let login = exchange(Some(&secret), AuthMethod::ScramSha256, &mut client).unwrap();
        let ServerLogin::ScramKeys {
            client_key,
            server_key,
        } = login
        else {
            panic!("expected SCRAM keys, got {login:?}");
        };
        // The keys are the ones the password derives with the secret's salt.
        let salted = pbkdf2_sha256(PASSWORD.as_bytes(), b"0123456789abcdef", 4096);
        assert_eq!(client_key, hmac(&salted, &[b"Client Key"]));
        assert_eq!(server_key, hmac(&salted, &[b"Server Key"]));
    }

    #[test]
    fn recovered_keys_log_in_to_a_server_holding_the_same_secret_only() {
        let secret = scram_secret(PASSWORD);
        let mut client = ClientAuth::new(USER, PASSWORD);
        let keys = exchange(Some(&secret), AuthMethod::ScramSha256, &mut client).unwrap();
        // pgprism, now the client, answers the server's SCRAM with the keys alone.
        let mut pgprism = ClientAuth::with_login(USER, keys.clone());
        let again = exchange(Some(&secret), AuthMethod::ScramSha256, &mut pgprism).unwrap();
        assert_eq!(again, keys);
        // Another verifier of the same password (another salt) refuses them.
        let other = Secret::Scram(ScramSecret::from_password(PASSWORD, b"another salt", 4096));
        let mut pgprism = ClientAuth::with_login(USER, keys);
        assert!(matches!(
            exchange(Some(&other), AuthMethod::ScramSha256, &mut pgprism),
            Err(ServerAuthError::Failed { .. })
        ));
    }

    #[test]
    fn scram_with_a_plain_secret_gives_the_password() {
        let secret = Secret::Plain(PASSWORD.into());
        for method in [
            AuthMethod::ScramSha256,
            AuthMethod::Md5,
            AuthMethod::Cleartext,
        ] {
            let mut client = ClientAuth::new(USER, PASSWORD);
            let login = exchange(Some(&secret), method, &mut client).unwrap();
            assert_eq!(login, ServerLogin::Password(PASSWORD.into()), "{method:?}");
        }
    }

    #[test]
    fn a_wrong_password_fails_with_28p01_under_every_method() {
        let secrets = [
            Secret::Plain(PASSWORD.into()),
            Secret::md5_of(USER, PASSWORD),
            scram_secret(PASSWORD),
        ];
        for secret in &secrets {
            for method in [
                AuthMethod::ScramSha256,
                AuthMethod::Md5,
                AuthMethod::Cleartext,
            ] {
                let mut client = ClientAuth::new(USER, "wrong");
                let err = exchange(Some(secret), method, &mut client).unwrap_err();
                assert!(
                    matches!(err, ServerAuthError::Failed { .. }),
                    "{secret:?} {method:?}: {err}"
                );
                assert_eq!(err.sqlstate(), "28P01");
                assert_eq!(
                    err.to_string(),
                    "password authentication failed for user \"alice\""
                );
                // And the right password passes.
                let mut client = ClientAuth::new(USER, PASSWORD);
                exchange(Some(secret), method, &mut client)
                    .unwrap_or_else(|e| panic!("{secret:?} {method:?}: {e}"));
            }
        }
    }

    #[test]
    fn each_secret_is_asked_for_what_it_can_check() {
        use code::{CLEARTEXT_PASSWORD, MD5_PASSWORD, SASL};
        let md5 = Secret::md5_of(USER, PASSWORD);
        let scram = scram_secret(PASSWORD);
        let plain = Secret::Plain(PASSWORD.into());
        let cases = [
            (Some(&md5), AuthMethod::ScramSha256, MD5_PASSWORD),
            (Some(&md5), AuthMethod::Md5, MD5_PASSWORD),
            (Some(&scram), AuthMethod::Md5, SASL),
            (Some(&scram), AuthMethod::ScramSha256, SASL),
            (Some(&plain), AuthMethod::ScramSha256, SASL),
            (Some(&plain), AuthMethod::Md5, MD5_PASSWORD),
            (Some(&scram), AuthMethod::Cleartext, CLEARTEXT_PASSWORD),
            (None, AuthMethod::ScramSha256, SASL),
            (None, AuthMethod::Md5, MD5_PASSWORD),
            (None, AuthMethod::Cleartext, CLEARTEXT_PASSWORD),
        ];
        for (secret, method, expected) in cases {
            assert_eq!(
                first_request(secret, method).1,
                expected,
                "{secret:?} {method:?}"
            );
        }
        // The SASL request offers SCRAM-SHA-256 alone, never -PLUS.
        let mut out = BytesMut::new();
        ServerAuth::start(USER, Some(&scram), AuthMethod::ScramSha256, &mut out).unwrap();
        let frame = split_message(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(
            AuthRequest::parse(frame.body()).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM_SHA_256]
            }
        );
    }

    #[test]
    fn md5_secret_logs_in_with_its_hash() {
        let secret = Secret::md5_of(USER, PASSWORD);
        let mut client = ClientAuth::new(USER, PASSWORD);
        let login = exchange(Some(&secret), AuthMethod::ScramSha256, &mut client).unwrap();
        assert_eq!(login, ServerLogin::Md5Hash(md5_secret(USER, PASSWORD)));
        // That hash answers a server's MD5 challenge holding the same secret.
        let mut pgprism = ClientAuth::with_login(USER, login.clone());
        assert_eq!(
            exchange(Some(&secret), AuthMethod::Md5, &mut pgprism).unwrap(),
            login
        );
        // Cleartext against an MD5 secret learns the password.
        let mut client = ClientAuth::new(USER, PASSWORD);
        assert_eq!(
            exchange(Some(&secret), AuthMethod::Cleartext, &mut client).unwrap(),
            ServerLogin::Password(PASSWORD.into())
        );
    }

    #[test]
    fn trust_asks_nothing_and_logs_in_with_what_the_secret_allows() {
        let cases = [
            (None, ServerLogin::None),
            (
                Some(Secret::Plain("pw".into())),
                ServerLogin::Password("pw".into()),
            ),
            (
                Some(Secret::md5_of(USER, "pw")),
                ServerLogin::Md5Hash(md5_secret(USER, "pw")),
            ),
            (Some(scram_secret("pw")), ServerLogin::None),
        ];
        for (secret, expected) in cases {
            let mut out = BytesMut::new();
            let (mut auth, progress) =
                ServerAuth::start(USER, secret.as_ref(), AuthMethod::Trust, &mut out).unwrap();
            assert_eq!(progress, ServerProgress::Done(expected));
            assert!(out.is_empty());
            assert!(auth.step(b'p', b"x\0", &mut out).is_err());
        }
    }

    #[test]
    fn a_user_without_a_secret_goes_through_a_whole_exchange_and_fails() {
        for secret in [None, Some(Secret::Plain(String::new()))] {
            for method in [
                AuthMethod::ScramSha256,
                AuthMethod::Md5,
                AuthMethod::Cleartext,
            ] {
                // Even the empty password (which an empty secret would otherwise match).
                for password in [PASSWORD, ""] {
                    let mut client = ClientAuth::new(USER, password);
                    let err = exchange(secret.as_ref(), method, &mut client).unwrap_err();
                    assert!(
                        matches!(err, ServerAuthError::Failed { .. }),
                        "{method:?}: {err}"
                    );
                }
            }
        }
    }

    /// server-first for `user` with `secret`, from a fixed client-first.
    fn server_first_for(user: &str, secret: Option<&Secret>) -> String {
        let mut out = BytesMut::new();
        let (mut auth, _) =
            ServerAuth::start(user, secret, AuthMethod::ScramSha256, &mut out).unwrap();
        out.clear();
        let mut msg = BytesMut::new();
        encode::sasl_initial_response(&mut msg, SCRAM_SHA_256, Some(b"n,,n=,r=abc")).unwrap();
        let frame = split_message(&mut msg, 1 << 20).unwrap().unwrap();
        auth.step(frame.tag(), frame.body(), &mut out).unwrap();
        let frame = split_message(&mut out, 1 << 20).unwrap().unwrap();
        let AuthRequest::SaslContinue { data } = AuthRequest::parse(frame.body()).unwrap() else {
            panic!("not SASLContinue");
        };
        String::from_utf8(data.to_vec()).unwrap()
    }

    #[test]
    fn unknown_and_plain_users_show_the_same_salt_every_time() {
        let salt = |first: &str| first.split(',').nth(1).unwrap().to_owned();
        let a1 = server_first_for("ghost", None);
        let a2 = server_first_for("ghost", None);
        let b = server_first_for("phantom", None);
        assert_eq!(salt(&a1), salt(&a2));
        assert_ne!(salt(&a1), salt(&b));
        assert!(a1.ends_with(",i=4096"), "{a1}");
        // The nonce, unlike the salt, is fresh.
        assert_ne!(a1, a2);
        // A plain secret looks the same: a stable salt of the same size, 4096 iterations.
        let plain = Secret::Plain(PASSWORD.into());
        let p1 = server_first_for("real", Some(&plain));
        let p2 = server_first_for("real", Some(&plain));
        assert_eq!(salt(&p1), salt(&p2));
        assert_eq!(salt(&p1).len(), salt(&a1).len());
        assert!(p1.ends_with(",i=4096"), "{p1}");
    }

    /// Starts a SCRAM exchange for the RFC-style secret and returns it after client-first
    /// `first`, with the server-first it answered.
    fn after_first(first: &[u8]) -> Result<(ServerAuth, String), ServerAuthError> {
        let secret = scram_secret(PASSWORD);
        let mut out = BytesMut::new();
        let (mut auth, _) = ServerAuth::start_with(
            USER,
            Some(&secret),
            AuthMethod::ScramSha256,
            &mut out,
            &mut |buf| {
                buf.fill(7);
                Ok(())
            },
        )?;
        out.clear();
        let mut msg = BytesMut::new();
        encode::sasl_initial_response(&mut msg, SCRAM_SHA_256, Some(first)).unwrap();
        let frame = split_message(&mut msg, 1 << 20).unwrap().unwrap();
        auth.step(frame.tag(), frame.body(), &mut out)?;
        let frame = split_message(&mut out, 1 << 20).unwrap().unwrap();
        let server_first = frame.body().get(4..).unwrap();
        Ok((auth, String::from_utf8(server_first.to_vec()).unwrap()))
    }

    /// The client-final a correct client sends for `server_first` with gs2 header `gs2`.
    fn good_final(first_bare: &str, server_first: &str, gs2: &str) -> String {
        let nonce = server_first.split(',').next().unwrap();
        let without_proof = format!("c={},{nonce}", BASE64.encode(gs2));
        let salted = pbkdf2_sha256(PASSWORD.as_bytes(), b"0123456789abcdef", 4096);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored, &[auth_message.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    #[test]
    fn scram_accepts_y_and_extensions_and_checks_the_binding() {
        let (mut auth, server_first) = after_first(b"y,,n=x,r=cnonce,e=ext").unwrap();
        assert!(server_first.starts_with("r=cnonce"), "{server_first}");
        let fin = good_final("n=x,r=cnonce,e=ext", &server_first, "y,,");
        let mut out = BytesMut::new();
        let progress = auth.step(b'p', fin.as_bytes(), &mut out).unwrap();
        assert!(matches!(
            progress,
            ServerProgress::Done(ServerLogin::ScramKeys { .. })
        ));
        let frame = split_message(&mut out, 1 << 20).unwrap().unwrap();
        assert!(matches!(
            AuthRequest::parse(frame.body()).unwrap(),
            AuthRequest::SaslFinal { data } if data.starts_with(b"v=")
        ));
        // Done: nothing more is accepted.
        assert!(auth.step(b'p', fin.as_bytes(), &mut out).is_err());

        // `y` in client-first, `n` echoed in client-final: a binding mismatch.
        let (mut auth, server_first) = after_first(b"y,,n=x,r=cnonce").unwrap();
        let fin = good_final("n=x,r=cnonce", &server_first, "n,,");
        let err = auth.step(b'p', fin.as_bytes(), &mut out).unwrap_err();
        assert_eq!(err.sqlstate(), "08P01", "{err}");
    }

    #[test]
    fn scram_protocol_violations_are_08p01() {
        let firsts: [&[u8]; 10] = [
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,a=someone,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=ab\x7fc",
            b"x,,n=,r=abc",
            b"n,,n=,r=abc,bad",
            b"",
            b"\xff,,n=,r=abc",
        ];
        for first in firsts {
            let err = after_first(first).err().unwrap_or_else(|| {
                panic!("{} accepted", String::from_utf8_lossy(first));
            });
            assert_eq!(err.sqlstate(), "08P01", "{err}");
        }

        let (_, server_first) = after_first(b"n,,n=,r=abc").unwrap();
        let good = good_final("n=,r=abc", &server_first, "n,,");
        let nonce = server_first.split(',').next().unwrap();
        let finals = [
            good.replace("c=biws", "c=eSws"),
            good.replace("c=biws", "c=!!"),
            good.replacen(nonce, "r=abcdef", 1),
            format!("c=biws,{nonce}"),
            format!("c=biws,{nonce},p=AAAA"),
            format!("c=biws,{nonce},p=!!!"),
            format!("{nonce},c=biws,p=AAAA"),
            good.replacen(",p=", ",bad,p=", 1),
        ];
        for fin in finals {
            let (mut auth, _) = after_first(b"n,,n=,r=abc").unwrap();
            let err = auth
                .step(b'p', fin.as_bytes(), &mut BytesMut::new())
                .unwrap_err();
            assert_eq!(err.sqlstate(), "08P01", "{fin}: {err}");
        }
        // A good final with the wrong proof is a failed password, not a protocol error.
        let (mut auth, _) = after_first(b"n,,n=,r=abc").unwrap();
        let mut wrong = good.clone();
        let at = wrong.rfind("p=").unwrap() + 2;
        let flipped = if &wrong[at..=at] == "A" { "B" } else { "A" };
        wrong.replace_range(at..=at, flipped);
        let err = auth
            .step(b'p', wrong.as_bytes(), &mut BytesMut::new())
            .unwrap_err();
        assert_eq!(err.sqlstate(), "28P01", "{err}");
        // And the good one passes.
        let (mut auth, _) = after_first(b"n,,n=,r=abc").unwrap();
        auth.step(b'p', good.as_bytes(), &mut BytesMut::new())
            .unwrap();
    }

    #[test]
    fn wrong_mechanism_tag_or_size_is_08p01() {
        let secret = scram_secret(PASSWORD);
        let start = || {
            let mut out = BytesMut::new();
            ServerAuth::start(USER, Some(&secret), AuthMethod::ScramSha256, &mut out)
                .unwrap()
                .0
        };
        let mut msg = BytesMut::new();
        encode::sasl_initial_response(&mut msg, "SCRAM-SHA-256-PLUS", Some(b"n,,n=,r=a")).unwrap();
        let frame = split_message(&mut msg, 1 << 20).unwrap().unwrap();
        let mut out = BytesMut::new();
        let err = start()
            .step(frame.tag(), frame.body(), &mut out)
            .unwrap_err();
        assert_eq!(err.sqlstate(), "08P01");
        encode::sasl_initial_response(&mut msg, SCRAM_SHA_256, None).unwrap();
        let frame = split_message(&mut msg, 1 << 20).unwrap().unwrap();
        assert!(start().step(frame.tag(), frame.body(), &mut out).is_err());
        assert!(start().step(b'Q', b"SELECT 1\0", &mut out).is_err());
        let huge = vec![b'a'; AUTH_MESSAGE_BYTES_MAX + 1];
        let err = start().step(b'p', &huge, &mut out).unwrap_err();
        assert_eq!(err.sqlstate(), "08P01");
        assert!(out.is_empty());
        // MD5 and cleartext want one NUL-terminated string.
        for method in [AuthMethod::Md5, AuthMethod::Cleartext] {
            let plain = Secret::Plain(PASSWORD.into());
            let (mut auth, _) =
                ServerAuth::start(USER, Some(&plain), method, &mut BytesMut::new()).unwrap();
            let err = auth.step(b'p', b"no terminator", &mut out).unwrap_err();
            assert_eq!(err.sqlstate(), "08P01");
        }
    }

    #[test]
    fn secrets_parse_as_postgresql_classifies_them() {
        let scram = ScramSecret::from_password("pencil", b"salt", 4096);
        let text = scram.to_rolpassword();
        assert_eq!(Secret::parse(&text).unwrap(), Secret::Scram(scram.clone()));
        assert_eq!(ScramSecret::parse(&text).unwrap().iterations(), 4096);
        assert_eq!(ScramSecret::parse(&text).unwrap().salt(), b"salt");

        let md5 = md5_secret("admin", "1234");
        // PgBouncer's documented example.
        assert_eq!(md5, "md545f2603610af569b6155c45067268c6b");
        assert_eq!(
            Secret::parse(&md5).unwrap(),
            Secret::md5_of("admin", "1234")
        );
        assert_eq!(
            Secret::parse(&md5.to_uppercase().replacen("MD5", "md5", 1)).unwrap(),
            Secret::md5_of("admin", "1234")
        );
        // Not quite MD5: a password that happens to start with md5.
        for plain in [
            "md5",
            "md5abc",
            "md545f2603610af569b6155c45067268c6bx",
            "md5 45f2603610af569b6155c45067268c6",
            "hunter2",
            "",
        ] {
            assert_eq!(Secret::parse(plain).unwrap(), Secret::Plain(plain.into()));
        }
        // A verifier that does not parse is an error, never a password.
        let bad = [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$99999999999:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        ];
        for text in bad {
            let err = Secret::parse(text).unwrap_err();
            assert!(!err.to_string().contains("AAAA"), "{err}");
        }
        let shown = format!(
            "{:?} {:?}",
            Secret::Plain("hunter2".into()),
            Secret::Scram(scram)
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn cleartext_against_a_scram_secret_checks_both_keys() {
        let secret = ScramSecret::from_password(PASSWORD, b"s", 16);
        assert!(secret.verifies(PASSWORD.as_bytes()));
        assert!(!secret.verifies(b"other"));
        let mut tampered = secret.clone();
        tampered.server_key[0] ^= 1;
        assert!(!tampered.verifies(PASSWORD.as_bytes()));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn secrets() -> Vec<Option<Secret>> {
            vec![
                None,
                Some(Secret::Plain(PASSWORD.into())),
                Some(Secret::md5_of(USER, PASSWORD)),
                Some(Secret::Scram(ScramSecret::from_password(PASSWORD, b"s", 2))),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]

            /// Any bytes as the client's messages: an answer or an error, never a panic,
            /// and never a success without the password.
            #[test]
            fn arbitrary_client_messages_never_panic(
                tags in proptest::collection::vec(prop_oneof![Just(b'p'), any::<u8>()], 3),
                bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 3),
            ) {
                for secret in secrets() {
                    for method in [AuthMethod::ScramSha256, AuthMethod::Md5, AuthMethod::Cleartext] {
                        // A plain secret runs the same SCRAM steps as a verifier, after a
                        // 4096-round PBKDF2 that would only make this test slow.
                        if method == AuthMethod::ScramSha256 && matches!(secret, Some(Secret::Plain(_))) {
                            continue;
                        }
                        let mut out = BytesMut::new();
                        let (mut auth, _) = ServerAuth::start(USER, secret.as_ref(), method, &mut out).unwrap();
                        for (tag, body) in tags.iter().zip(&bodies) {
                            match auth.step(*tag, body, &mut out) {
                                Ok(ServerProgress::Done(_)) => {
                                    // Only the cleartext password itself gets in.
                                    prop_assert_eq!(method, AuthMethod::Cleartext);
                                    prop_assert!(body.starts_with(PASSWORD.as_bytes()));
                                }
                                Ok(ServerProgress::Reply) => {}
                                Err(_) => break,
                            }
                        }
                    }
                }
            }

            /// Client-first and client-final made of SCRAM-looking pieces.
            #[test]
            fn scram_shaped_messages_never_panic(
                first in "[nyp]?,?(a=[a-z]*)?,(m=)?(n=[a-z,=]*)?,?(r=[!-~]{0,8})?(,[a-z]=[^,]*){0,2}",
                last in "(c=[A-Za-z0-9+/=]{0,8})?,?(r=[!-~]{0,40})?(,[a-z]=[^,]*){0,2},?(p=[A-Za-z0-9+/=]{0,48})?",
            ) {
                let secret = Secret::Scram(ScramSecret::from_password(PASSWORD, b"s", 2));
                let mut out = BytesMut::new();
                let (mut auth, _) = ServerAuth::start(USER, Some(&secret), AuthMethod::ScramSha256, &mut out).unwrap();
                let mut msg = BytesMut::new();
                encode::sasl_initial_response(&mut msg, SCRAM_SHA_256, Some(first.as_bytes())).unwrap();
                let frame = split_message(&mut msg, 1 << 20).unwrap().unwrap();
                if auth.step(frame.tag(), frame.body(), &mut out).is_ok() {
                    let result = auth.step(b'p', last.as_bytes(), &mut out);
                    prop_assert!(result.is_err());
                }
            }

            #[test]
            fn arbitrary_secret_text_never_panics(text in "(SCRAM-SHA-256\\$|md5)?[ -~]{0,80}") {
                let _ = Secret::parse(&text);
            }
        }
    }
}
