//! Client-side authentication: decoding Authentication requests and answering them as a
//! PostgreSQL client would (cleartext, MD5, SCRAM-SHA-256 without channel binding). pgprism
//! uses it for its own connections to mirrors, shadows, the CDC source and in the bench
//! tool. Sans-IO: it turns requests into reply bytes and never touches a socket. It must
//! never accept a SCRAM exchange whose server signature does not verify, and never log or
//! return the password.

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
mod code {
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

/// Client side of PostgreSQL authentication, one per connection.
pub struct ClientAuth {
    user: String,
    password: String,
    state: State,
}

impl std::fmt::Debug for ClientAuth {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ClientAuth {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
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
                encode::password(out, self.password.as_bytes())?;
                (State::PasswordSent, AuthProgress::Reply)
            }
            (State::Start, AuthRequest::Md5Password { salt }) => {
                let hashed = md5_password(&self.user, &self.password, *salt);
                encode::password(out, hashed.as_bytes())?;
                (State::PasswordSent, AuthProgress::Reply)
            }
            (State::Start, AuthRequest::Sasl { mechanisms }) => {
                if !mechanisms.contains(&SCRAM_SHA_256) {
                    return Err(WireError::UnsupportedAuth {
                        method: format!("SASL {}", mechanisms.join(" ")),
                    });
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
                let (client_final, server_signature) = scram.client_final(&self.password, data)?;
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

/// `"md5" + md5_hex(md5_hex(password + user) + salt)`, PostgreSQL's MD5 password reply.
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::new()
        .chain_update(password)
        .chain_update(user)
        .finalize());
    let outer = Md5::new().chain_update(inner).chain_update(salt).finalize();
    format!("md5{}", hex(&outer))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn random_nonce() -> Result<String, WireError> {
    let mut raw = [0u8; NONCE_BYTES];
    getrandom::fill(&mut raw).map_err(|source| WireError::Random { source })?;
    Ok(BASE64.encode(raw))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block, which is SCRAM's `Hi()` (RFC 5802 §2.2).
fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
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
    fn client_final(
        &self,
        password: &str,
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

        // SASLprep is not applied: for ASCII passwords it is the identity, and PostgreSQL
        // itself falls back to the raw bytes when preparation fails.
        let salted = pbkdf2_sha256(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = <Sha256 as sha2::Digest>::digest(client_key).into();
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        let server_key = hmac(&salted, &[b"Server Key"]);
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
    if signature.len() == expected.len()
        && signature
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    {
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
            .client_final("pencil", RFC_SERVER_FIRST.as_bytes())
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
                scram.client_final("pencil", case.as_bytes()).is_err(),
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
            .client_final("pencil", RFC_SERVER_FIRST.as_bytes())
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
    fn pbkdf2_matches_rfc_7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1), first 32 bytes.
        let out = pbkdf2_sha256(b"passwd", b"salt", 1);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
