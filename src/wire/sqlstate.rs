//! SQLSTATE codes pgprism itself reports (PostgreSQL Appendix A). Only codes the proxy
//! raises live here; codes relayed from a server are passed through as received.

/// 08P01: the peer broke the wire protocol.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// 08006: a backend connection failed mid-session.
pub const CONNECTION_FAILURE: &str = "08006";
/// 08001: the proxy could not open or authenticate its upstream connection.
pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
/// 08004: the proxy refuses the connection (e.g. by policy).
pub const SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION: &str = "08004";
/// 54000: a message or value exceeds a configured bound.
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// 57P01: the proxy is shutting down.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// 57014: a statement was cancelled.
pub const QUERY_CANCELED: &str = "57014";
/// 28P01: the client's password was wrong.
pub const INVALID_PASSWORD: &str = "28P01";
/// invalid_authorization_specification (e.g. no pg_hba.conf entry: TLS required).
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// 53300: the connection limit is reached.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// XX000: a bug in pgprism.
pub const INTERNAL_ERROR: &str = "XX000";
