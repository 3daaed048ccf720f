//! Builders for the messages pgprism writes. Each appends one complete message to a
//! `BytesMut` with a correct length prefix. Builders that take caller strings return
//! `Result` (a NUL inside a C string or a count above 16 bits cannot be encoded) and leave
//! the buffer exactly as it was on error, so a half-written message is never sent.

use bytes::{BufMut, BytesMut};

use super::backend::{FieldDescription, TransactionStatus, error_field};
use super::error::WireError;
use super::format::Format;
use super::frontend::ObjectKind;
use super::startup::{CANCEL_REQUEST_CODE, PROTOCOL_3_0};
use super::tag;

/// Writes `tag` (if any), a length placeholder, the body from `write`, then patches the
/// length. On error the buffer is truncated back to where it started.
fn framed(
    buf: &mut BytesMut,
    tag: Option<u8>,
    write: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = buf.len();
    if let Some(tag) = tag {
        buf.put_u8(tag);
    }
    let len_at = buf.len();
    buf.put_i32(0);
    let result = write(buf).and_then(|()| {
        let len = buf.len() - len_at;
        i32::try_from(len).map_err(|_| WireError::MessageTooLarge {
            len,
            max: i32::MAX as usize,
        })
    });
    match result {
        Ok(len) => {
            buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(err) => {
            buf.truncate(start);
            Err(err)
        }
    }
}

/// For bodies that cannot fail (fixed layouts).
fn framed_infallible(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.reserve(5 + body.len());
    buf.put_u8(tag);
    // Only used for bodies of a few bytes, far below i32::MAX.
    buf.put_i32(4 + body.len() as i32);
    buf.put_slice(body);
}

fn put_cstr(buf: &mut BytesMut, s: &[u8], what: &'static str) -> Result<(), WireError> {
    if memchr::memchr(0, s).is_some() {
        return Err(WireError::InteriorNul { what });
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

fn put_count(buf: &mut BytesMut, count: usize, what: &'static str) -> Result<(), WireError> {
    let count = u16::try_from(count).map_err(|_| WireError::TooManyItems { what, count })?;
    buf.put_u16(count);
    Ok(())
}

fn put_value(buf: &mut BytesMut, value: Option<&[u8]>) -> Result<(), WireError> {
    match value {
        None => buf.put_i32(-1),
        Some(v) => {
            let len = i32::try_from(v.len()).map_err(|_| WireError::MessageTooLarge {
                len: v.len(),
                max: i32::MAX as usize,
            })?;
            buf.put_i32(len);
            buf.put_slice(v);
        }
    }
    Ok(())
}

fn put_formats(
    buf: &mut BytesMut,
    formats: &[Format],
    what: &'static str,
) -> Result<(), WireError> {
    put_count(buf, formats.len(), what)?;
    for f in formats {
        buf.put_i16(f.code());
    }
    Ok(())
}

/// What goes into an ErrorResponse or NoticeResponse pgprism writes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorSpec<'a> {
    /// `ERROR`, `FATAL`, `WARNING`, `NOTICE`, ...; sent as both `S` and `V`.
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

impl<'a> ErrorSpec<'a> {
    /// An error without detail or hint.
    pub fn new(severity: &'a str, code: &'a str, message: &'a str) -> Self {
        Self {
            severity,
            code,
            message,
            detail: None,
            hint: None,
        }
    }
}

/// A `FATAL` ErrorResponse describing `err` with its SQLSTATE: what the proxy sends a
/// client before closing a connection that broke the protocol or hit a limit.
pub fn fatal_for(buf: &mut BytesMut, err: &WireError) {
    let mut message = err.to_string();
    // The text may quote a peer's bytes (a SCRAM error from a server); a NUL there must not
    // cost the client its error message.
    message.retain(|c| c != '\0');
    let spec = ErrorSpec::new("FATAL", err.sqlstate(), &message);
    // Cannot fail: no field contains NUL and the message is far below i32::MAX.
    let _ = error_response(buf, &spec);
}

fn error_notice(buf: &mut BytesMut, tag: u8, spec: &ErrorSpec<'_>) -> Result<(), WireError> {
    framed(buf, Some(tag), |b| {
        let mut field = |kind: u8, value: &str| {
            b.put_u8(kind);
            put_cstr(b, value.as_bytes(), "error field")
        };
        field(error_field::SEVERITY, spec.severity)?;
        field(error_field::SEVERITY_NONLOCALIZED, spec.severity)?;
        field(error_field::CODE, spec.code)?;
        field(error_field::MESSAGE, spec.message)?;
        if let Some(detail) = spec.detail {
            field(error_field::DETAIL, detail)?;
        }
        if let Some(hint) = spec.hint {
            field(error_field::HINT, hint)?;
        }
        b.put_u8(0);
        Ok(())
    })
}

/// ErrorResponse.
pub fn error_response(buf: &mut BytesMut, spec: &ErrorSpec<'_>) -> Result<(), WireError> {
    error_notice(buf, tag::ERROR_RESPONSE, spec)
}

/// NoticeResponse.
pub fn notice_response(buf: &mut BytesMut, spec: &ErrorSpec<'_>) -> Result<(), WireError> {
    error_notice(buf, tag::NOTICE_RESPONSE, spec)
}

/// ReadyForQuery.
pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    framed_infallible(buf, tag::READY_FOR_QUERY, &[status.byte()]);
}

/// The one-byte answer refusing SSLRequest or GSSENCRequest (not a tagged message).
pub fn encryption_refused(buf: &mut BytesMut) {
    buf.put_u8(tag::ENCRYPTION_REFUSED);
}

/// StartupMessage for protocol 3.0 with the given parameters (include `user`).
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) -> Result<(), WireError> {
    framed(buf, None, |b| {
        b.put_u32(PROTOCOL_3_0);
        for (name, value) in params {
            if name.is_empty() {
                // An empty name would end the list early and misframe the rest.
                return Err(WireError::InvalidValue {
                    what: "startup parameter name",
                    value: 0,
                });
            }
            put_cstr(b, name.as_bytes(), "startup parameter name")?;
            put_cstr(b, value.as_bytes(), "startup parameter value")?;
        }
        b.put_u8(0);
        Ok(())
    })
}

/// CancelRequest (untagged, protocol 3.0 key).
pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_u32(CANCEL_REQUEST_CODE);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// Simple Query.
pub fn query(buf: &mut BytesMut, sql: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::QUERY), |b| {
        put_cstr(b, sql.as_bytes(), "Query")
    })
}

/// Parse.
pub fn parse(
    buf: &mut BytesMut,
    statement: &str,
    sql: &str,
    param_types: &[u32],
) -> Result<(), WireError> {
    framed(buf, Some(tag::PARSE), |b| {
        put_cstr(b, statement.as_bytes(), "Parse statement")?;
        put_cstr(b, sql.as_bytes(), "Parse query")?;
        put_count(b, param_types.len(), "Parse parameter types")?;
        for oid in param_types {
            b.put_u32(*oid);
        }
        Ok(())
    })
}

/// Bind. `param_formats` follows the protocol's 0/1/N rule; values are `None` for NULL.
pub fn bind(
    buf: &mut BytesMut,
    portal: &str,
    statement: &str,
    param_formats: &[Format],
    params: &[Option<&[u8]>],
    result_formats: &[Format],
) -> Result<(), WireError> {
    if param_formats.len() > 1 && param_formats.len() != params.len() {
        return Err(WireError::InvalidValue {
            what: "Bind parameter format count",
            value: param_formats.len() as i64,
        });
    }
    framed(buf, Some(tag::BIND), |b| {
        put_cstr(b, portal.as_bytes(), "Bind portal")?;
        put_cstr(b, statement.as_bytes(), "Bind statement")?;
        put_formats(b, param_formats, "Bind parameter formats")?;
        put_count(b, params.len(), "Bind parameters")?;
        for p in params {
            put_value(b, *p)?;
        }
        put_formats(b, result_formats, "Bind result formats")
    })
}

/// Describe a statement or portal.
pub fn describe(buf: &mut BytesMut, target: ObjectKind, name: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::DESCRIBE), |b| {
        b.put_u8(target.byte());
        put_cstr(b, name.as_bytes(), "Describe name")
    })
}

/// Close a statement or portal.
pub fn close(buf: &mut BytesMut, target: ObjectKind, name: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::CLOSE), |b| {
        b.put_u8(target.byte());
        put_cstr(b, name.as_bytes(), "Close name")
    })
}

/// Execute a portal; `max_rows` 0 means all rows.
pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: i32) -> Result<(), WireError> {
    framed(buf, Some(tag::EXECUTE), |b| {
        put_cstr(b, portal.as_bytes(), "Execute portal")?;
        b.put_i32(max_rows);
        Ok(())
    })
}

/// Sync.
pub fn sync(buf: &mut BytesMut) {
    framed_infallible(buf, tag::SYNC, &[]);
}

/// Flush.
pub fn flush(buf: &mut BytesMut) {
    framed_infallible(buf, tag::FLUSH, &[]);
}

/// Terminate.
pub fn terminate(buf: &mut BytesMut) {
    framed_infallible(buf, tag::TERMINATE, &[]);
}

/// PasswordMessage (cleartext or `md5...`).
pub fn password(buf: &mut BytesMut, password: &[u8]) -> Result<(), WireError> {
    framed(buf, Some(tag::PASSWORD), |b| {
        put_cstr(b, password, "PasswordMessage")
    })
}

/// SASLInitialResponse; `data` `None` is sent as length -1.
pub fn sasl_initial_response(
    buf: &mut BytesMut,
    mechanism: &str,
    data: Option<&[u8]>,
) -> Result<(), WireError> {
    framed(buf, Some(tag::PASSWORD), |b| {
        put_cstr(b, mechanism.as_bytes(), "SASL mechanism")?;
        put_value(b, data)
    })
}

/// SASLResponse.
pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) -> Result<(), WireError> {
    framed(buf, Some(tag::PASSWORD), |b| {
        b.put_slice(data);
        Ok(())
    })
}

/// CopyData (either direction).
pub fn copy_data(buf: &mut BytesMut, data: &[u8]) -> Result<(), WireError> {
    framed(buf, Some(tag::COPY_DATA), |b| {
        b.put_slice(data);
        Ok(())
    })
}

/// CopyDone (either direction).
pub fn copy_done(buf: &mut BytesMut) {
    framed_infallible(buf, tag::COPY_DONE, &[]);
}

/// CopyFail with a reason.
pub fn copy_fail(buf: &mut BytesMut, message: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::COPY_FAIL), |b| {
        put_cstr(b, message.as_bytes(), "CopyFail")
    })
}

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    framed_infallible(buf, tag::AUTHENTICATION, &0i32.to_be_bytes());
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::PARAMETER_STATUS), |b| {
        put_cstr(b, name.as_bytes(), "ParameterStatus name")?;
        put_cstr(b, value.as_bytes(), "ParameterStatus value")
    })
}

/// BackendKeyData with a protocol 3.0 (4-byte) key.
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&pid.to_be_bytes());
    body[4..].copy_from_slice(&secret.to_be_bytes());
    framed_infallible(buf, tag::BACKEND_KEY_DATA, &body);
}

/// RowDescription.
pub fn row_description(
    buf: &mut BytesMut,
    fields: &[FieldDescription<'_>],
) -> Result<(), WireError> {
    framed(buf, Some(tag::ROW_DESCRIPTION), |b| {
        put_count(b, fields.len(), "RowDescription fields")?;
        for f in fields {
            put_cstr(b, f.name.as_bytes(), "RowDescription name")?;
            b.put_u32(f.table_oid);
            b.put_i16(f.column_attr);
            b.put_u32(f.type_oid);
            b.put_i16(f.type_size);
            b.put_i32(f.type_modifier);
            b.put_i16(f.format.code());
        }
        Ok(())
    })
}

/// DataRow; `None` is NULL.
pub fn data_row(buf: &mut BytesMut, columns: &[Option<&[u8]>]) -> Result<(), WireError> {
    framed(buf, Some(tag::DATA_ROW), |b| {
        put_count(b, columns.len(), "DataRow columns")?;
        for c in columns {
            put_value(b, *c)?;
        }
        Ok(())
    })
}

/// CommandComplete with a command tag such as `SELECT 3`.
pub fn command_complete(buf: &mut BytesMut, command_tag: &str) -> Result<(), WireError> {
    framed(buf, Some(tag::COMMAND_COMPLETE), |b| {
        put_cstr(b, command_tag.as_bytes(), "CommandComplete")
    })
}

/// EmptyQueryResponse.
pub fn empty_query_response(buf: &mut BytesMut) {
    framed_infallible(buf, tag::EMPTY_QUERY_RESPONSE, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ErrorNotice, split_message};

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        let spec = ErrorSpec {
            severity: "FATAL",
            code: "08P01",
            message: "bad frame",
            detail: None,
            hint: Some("reconnect"),
        };
        error_response(&mut buf, &spec).unwrap();
        let frame = split_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(frame.tag(), b'E');
        let fields = ErrorNotice::new(frame.body()).parse().unwrap();
        assert_eq!(
            (fields.code, fields.message, fields.hint),
            (Some("08P01"), Some("bad frame"), Some("reconnect"))
        );
        assert_eq!(fields.detail, None);
    }

    #[test]
    fn fatal_for_carries_the_sqlstate() {
        let mut buf = BytesMut::new();
        let err = WireError::MessageTooLarge { len: 10, max: 5 };
        fatal_for(&mut buf, &err);
        let frame = split_message(&mut buf, 1 << 20).unwrap().unwrap();
        let fields = ErrorNotice::new(frame.body()).parse().unwrap();
        assert_eq!(
            (fields.severity, fields.code),
            (Some("FATAL"), Some("54000"))
        );
        let err = WireError::ScramServerError {
            message: "a\0b".into(),
        };
        fatal_for(&mut buf, &err);
        let frame = split_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            ErrorNotice::new(frame.body()).code().unwrap(),
            Some("08001")
        );
    }

    #[test]
    fn failed_builders_leave_the_buffer_untouched() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        assert!(query(&mut buf, "a\0b").is_err());
        assert!(
            bind(
                &mut buf,
                "",
                "",
                &[Format::Text, Format::Text],
                &[None],
                &[]
            )
            .is_err()
        );
        assert!(startup_message(&mut buf, &[("", "x")]).is_err());
        let many = vec![None; 70_000];
        assert!(matches!(
            data_row(&mut buf, &many),
            Err(WireError::TooManyItems { .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn fixed_messages_are_exact() {
        let mut buf = BytesMut::new();
        sync(&mut buf);
        ready_for_query(&mut buf, TransactionStatus::Idle);
        authentication_ok(&mut buf);
        cancel_request(&mut buf, 1, 2);
        assert_eq!(
            &buf[..],
            b"S\0\0\0\x04Z\0\0\0\x05IR\0\0\0\x08\0\0\0\0\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x01\0\0\0\x02"
        );
    }
}
