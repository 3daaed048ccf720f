//! Message type bytes, in one place. Several bytes mean different things depending on the
//! direction (`D` is Describe from the client but DataRow from the server), so each constant
//! is named for its message and says which side sends it; never match on a tag without
//! knowing the direction.

// Frontend (client → server).
/// Frontend: simple Query.
pub const QUERY: u8 = b'Q';
/// Frontend: Parse (extended protocol).
pub const PARSE: u8 = b'P';
/// Frontend: Bind.
pub const BIND: u8 = b'B';
/// Frontend: Describe. Same byte as backend DataRow.
pub const DESCRIBE: u8 = b'D';
/// Frontend: Execute. Same byte as backend ErrorResponse.
pub const EXECUTE: u8 = b'E';
/// Frontend: Sync. Same byte as backend ParameterStatus.
pub const SYNC: u8 = b'S';
/// Frontend: Close. Same byte as backend CommandComplete.
pub const CLOSE: u8 = b'C';
/// Frontend: Flush. Same byte as backend CopyOutResponse.
pub const FLUSH: u8 = b'H';
/// Frontend: Terminate.
pub const TERMINATE: u8 = b'X';
/// Frontend: FunctionCall (legacy fast-path).
pub const FUNCTION_CALL: u8 = b'F';
/// Frontend: CopyFail.
pub const COPY_FAIL: u8 = b'f';
/// Frontend: PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share this
/// byte; which one it is depends on the authentication exchange in progress.
pub const PASSWORD: u8 = b'p';

// Both directions.
/// Both: CopyData.
pub const COPY_DATA: u8 = b'd';
/// Both: CopyDone.
pub const COPY_DONE: u8 = b'c';

// Backend (server → client).
/// Backend: Authentication* (the body's first int32 says which).
pub const AUTHENTICATION: u8 = b'R';
/// Backend: BackendKeyData.
pub const BACKEND_KEY_DATA: u8 = b'K';
/// Backend: ParameterStatus. Same byte as frontend Sync.
pub const PARAMETER_STATUS: u8 = b'S';
/// Backend: ReadyForQuery.
pub const READY_FOR_QUERY: u8 = b'Z';
/// Backend: RowDescription.
pub const ROW_DESCRIPTION: u8 = b'T';
/// Backend: DataRow. Same byte as frontend Describe.
pub const DATA_ROW: u8 = b'D';
/// Backend: CommandComplete. Same byte as frontend Close.
pub const COMMAND_COMPLETE: u8 = b'C';
/// Backend: EmptyQueryResponse.
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
/// Backend: ErrorResponse. Same byte as frontend Execute.
pub const ERROR_RESPONSE: u8 = b'E';
/// Backend: NoticeResponse.
pub const NOTICE_RESPONSE: u8 = b'N';
/// Backend: NotificationResponse.
pub const NOTIFICATION_RESPONSE: u8 = b'A';
/// Backend: CopyInResponse.
pub const COPY_IN_RESPONSE: u8 = b'G';
/// Backend: CopyOutResponse. Same byte as frontend Flush.
pub const COPY_OUT_RESPONSE: u8 = b'H';
/// Backend: CopyBothResponse (replication).
pub const COPY_BOTH_RESPONSE: u8 = b'W';
/// Backend: ParameterDescription.
pub const PARAMETER_DESCRIPTION: u8 = b't';
/// Backend: NoData.
pub const NO_DATA: u8 = b'n';
/// Backend: ParseComplete.
pub const PARSE_COMPLETE: u8 = b'1';
/// Backend: BindComplete.
pub const BIND_COMPLETE: u8 = b'2';
/// Backend: CloseComplete.
pub const CLOSE_COMPLETE: u8 = b'3';
/// Backend: PortalSuspended.
pub const PORTAL_SUSPENDED: u8 = b's';
/// Backend: NegotiateProtocolVersion.
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
/// Backend: FunctionCallResponse.
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';

/// The single byte a server answers SSLRequest/GSSENCRequest with to refuse encryption.
pub const ENCRYPTION_REFUSED: u8 = b'N';
/// The single byte a server answers SSLRequest/GSSENCRequest with to accept encryption.
pub const ENCRYPTION_ACCEPTED: u8 = b'S';
