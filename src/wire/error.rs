//! The one error type of the wire module: everything that can go wrong while framing,
//! decoding, encoding or authenticating, with enough structure for the caller to pick the
//! SQLSTATE it answers with.

use super::sqlstate;

/// An error from the wire module.
///
/// Decoding errors carry `what`: the message or field being read, so a log line says where a
/// peer broke the protocol without us keeping the (possibly large, possibly secret) bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A length field smaller than the smallest legal value (4 for tagged messages, 8 for the
    /// startup packet).
    #[error("{what}: length field {len} is below the minimum of {min}")]
    LengthTooSmall {
        what: &'static str,
        len: i64,
        min: i64,
    },

    /// A length field above the configured limit (answer with 54000, like PostgreSQL does for
    /// oversized messages).
    #[error("message length {len} exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },

    /// The message body ended before a field did.
    #[error("{what}: message truncated")]
    Truncated { what: &'static str },

    /// A string field has no terminating NUL inside the message.
    #[error("{what}: string is not NUL-terminated")]
    UnterminatedString { what: &'static str },

    /// A string field is not UTF-8.
    #[error("{what}: string is not valid UTF-8")]
    InvalidUtf8 {
        what: &'static str,
        #[source]
        source: simdutf8::basic::Utf8Error,
    },

    /// Bytes left over after the last field of a message.
    #[error("{what}: {count} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, count: usize },

    /// A field holds a value the protocol does not allow (bad format code, bad column
    /// length, bad transaction status, ...).
    #[error("{what}: invalid value {value}")]
    InvalidValue { what: &'static str, value: i64 },

    /// A message arrived with a tag other than the one the decoder was asked for.
    #[error("expected message tag {expected:?}, found {found:?}", expected = *expected as char, found = *found as char)]
    UnexpectedTag { expected: u8, found: u8 },

    /// The startup packet asks for a protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },

    /// The startup packet has no `user` parameter, which PostgreSQL requires.
    #[error("startup packet has no user parameter")]
    MissingUser,

    /// A builder was given a string with a NUL byte, which cannot be sent as a C string.
    #[error("{what}: string contains a NUL byte")]
    InteriorNul { what: &'static str },

    /// A builder was given more items than the 16-bit count field can hold.
    #[error("{what}: {count} items do not fit a 16-bit count")]
    TooManyItems { what: &'static str, count: usize },

    /// The server asked for an authentication method we do not implement.
    #[error("unsupported authentication method {method}")]
    UnsupportedAuth { method: String },

    /// The server sent an authentication message that does not fit the exchange so far.
    #[error("authentication exchange out of order: {what}")]
    AuthOutOfOrder { what: &'static str },

    /// A SCRAM message from the server is malformed.
    #[error("SCRAM: malformed {what}")]
    ScramMalformed { what: &'static str },

    /// A SCRAM field is not valid base64.
    #[error("SCRAM: {what} is not valid base64")]
    ScramBase64 {
        what: &'static str,
        #[source]
        source: base64::DecodeError,
    },

    /// The server's nonce does not extend ours: a replay or a broken server.
    #[error("SCRAM: server nonce does not start with the client nonce")]
    ScramNonceMismatch,

    /// The server's iteration count is zero or above our bound.
    #[error("SCRAM: iteration count {iterations} outside 1..={max}")]
    ScramIterations { iterations: u64, max: u32 },

    /// The server failed to prove it knows the password: never continue such a session.
    #[error("SCRAM: server signature does not match")]
    ScramServerSignature,

    /// The server ended the SCRAM exchange with an `e=` error attribute.
    #[error("SCRAM: server reported error {message}")]
    ScramServerError { message: String },

    /// No randomness for the client nonce.
    #[error("no randomness for the SCRAM nonce")]
    Random {
        #[source]
        source: getrandom::Error,
    },
}

impl WireError {
    /// The SQLSTATE the proxy answers a client with when this error ends its session.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::MessageTooLarge { .. } | Self::TooManyItems { .. } => {
                sqlstate::PROGRAM_LIMIT_EXCEEDED
            }
            // Authentication towards a backend failed: from the client's point of view the
            // proxy could not establish its upstream connection.
            Self::UnsupportedAuth { .. }
            | Self::AuthOutOfOrder { .. }
            | Self::ScramMalformed { .. }
            | Self::ScramBase64 { .. }
            | Self::ScramNonceMismatch
            | Self::ScramIterations { .. }
            | Self::ScramServerSignature
            | Self::ScramServerError { .. } => {
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
            }
            Self::Random { .. } | Self::InteriorNul { .. } => sqlstate::INTERNAL_ERROR,
            Self::LengthTooSmall { .. }
            | Self::Truncated { .. }
            | Self::UnterminatedString { .. }
            | Self::InvalidUtf8 { .. }
            | Self::TrailingBytes { .. }
            | Self::InvalidValue { .. }
            | Self::UnexpectedTag { .. }
            | Self::UnsupportedProtocol { .. }
            | Self::MissingUser => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}
