//! PostgreSQL wire protocol v3, sans-IO: framing of the client and server byte streams,
//! lazy zero-copy views over message bodies, builders for the messages pgprism writes,
//! the startup phase (StartupMessage, SSL/GSS requests, CancelRequest), authentication on
//! both sides (cleartext, MD5, SCRAM-SHA-256: pgprism as a client, and as the server that
//! checks its own clients when it pools connections) and the SQLSTATEs pgprism reports.
//!
//! This module owns the byte layout of the protocol and nothing else. It must never do I/O,
//! never block, never panic on bytes from a peer (every decoder returns `Result`), and never
//! copy a message body the caller did not ask to copy: frames are split off the connection
//! buffer as refcounted `Bytes` and views borrow from them.

mod auth;
mod auth_server;
mod backend;
mod cursor;
pub mod encode;
mod error;
mod format;
mod frame;
mod frontend;
#[doc(hidden)]
pub mod fuzzing;
pub mod sqlstate;
mod startup;
pub mod tag;

pub use auth::{
    AuthProgress, AuthRequest, ClientAuth, SCRAM_ITERATIONS_MAX, SCRAM_SHA_256, ServerLogin,
    md5_password,
};
pub use auth_server::{
    AUTH_MESSAGE_BYTES_MAX, AuthMethod, SCRAM_ITERATIONS_DEFAULT, ScramSecret, Secret, SecretError,
    ServerAuth, ServerAuthError, ServerProgress,
};
pub use backend::{
    BackendKeyData, BackendMessage, CommandComplete, CopyResponse, DataRow, ErrorFields,
    ErrorFieldsIter, ErrorNotice, FieldDescription, Fields, NegotiateProtocolVersion,
    NotificationResponse, ParameterDescription, ParameterStatus, ReadyForQuery, RowDescription,
    TransactionStatus, command_rows, error_field,
};
pub use encode::ErrorSpec;
pub use error::WireError;
pub use format::{Format, Formats, Oids, Values, ValuesIter};
pub use frame::{
    Frame, HEADER_BYTES, bytes_missing, complete_prefix, complete_prefix_until, split_message,
    split_startup,
};
pub use frontend::{
    Bind, BindParts, Close, CopyFail, Describe, Execute, FrontendMessage, ObjectKind, Parse,
    Password, Query, SaslInitial,
};
pub use startup::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE, StartupPacket,
};
