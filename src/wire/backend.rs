//! Lazy views over backend (server → client) message bodies: what the proxy, the compare
//! engine, CDC and the bench client read from PostgreSQL. Views borrow the body and decode
//! on demand; every accessor returns `Result`. Lists are validated once, then iterate
//! without allocating.

use super::auth::AuthRequest;
use super::cursor::{Cursor, expect_empty, utf8};
use super::error::WireError;
use super::format::{Format, Formats, Oids, Values};
use super::frontend::view;
use super::tag;

/// A backend message, classified by tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication(AuthRequest<'a>),
    BackendKeyData(BackendKeyData<'a>),
    ParameterStatus(ParameterStatus<'a>),
    ReadyForQuery(ReadyForQuery<'a>),
    RowDescription(RowDescription<'a>),
    DataRow(DataRow<'a>),
    CommandComplete(CommandComplete<'a>),
    EmptyQueryResponse,
    ErrorResponse(ErrorNotice<'a>),
    NoticeResponse(ErrorNotice<'a>),
    NotificationResponse(NotificationResponse<'a>),
    CopyInResponse(CopyResponse<'a>),
    CopyOutResponse(CopyResponse<'a>),
    CopyBothResponse(CopyResponse<'a>),
    CopyData(&'a [u8]),
    CopyDone,
    ParameterDescription(ParameterDescription<'a>),
    NoData,
    ParseComplete,
    BindComplete,
    CloseComplete,
    PortalSuspended,
    NegotiateProtocolVersion(NegotiateProtocolVersion<'a>),
    /// FunctionCallResponse and anything else forwarded without being understood.
    Other {
        tag: u8,
        body: &'a [u8],
    },
}

impl<'a> BackendMessage<'a> {
    /// Classifies a backend message. Authentication requests are decoded eagerly (they are
    /// small and rare); empty-bodied messages are checked to be empty.
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self, WireError> {
        fn empty<'a>(
            body: &[u8],
            what: &'static str,
            message: BackendMessage<'a>,
        ) -> Result<BackendMessage<'a>, WireError> {
            expect_empty(body, what)?;
            Ok(message)
        }
        Ok(match tag {
            tag::AUTHENTICATION => Self::Authentication(AuthRequest::parse(body)?),
            tag::BACKEND_KEY_DATA => Self::BackendKeyData(BackendKeyData::new(body)),
            tag::PARAMETER_STATUS => Self::ParameterStatus(ParameterStatus::new(body)),
            tag::READY_FOR_QUERY => Self::ReadyForQuery(ReadyForQuery::new(body)),
            tag::ROW_DESCRIPTION => Self::RowDescription(RowDescription::new(body)),
            tag::DATA_ROW => Self::DataRow(DataRow::new(body)),
            tag::COMMAND_COMPLETE => Self::CommandComplete(CommandComplete::new(body)),
            tag::EMPTY_QUERY_RESPONSE => {
                empty(body, "EmptyQueryResponse", Self::EmptyQueryResponse)?
            }
            tag::ERROR_RESPONSE => Self::ErrorResponse(ErrorNotice::new(body)),
            tag::NOTICE_RESPONSE => Self::NoticeResponse(ErrorNotice::new(body)),
            tag::NOTIFICATION_RESPONSE => {
                Self::NotificationResponse(NotificationResponse::new(body))
            }
            tag::COPY_IN_RESPONSE => Self::CopyInResponse(CopyResponse::new(body)),
            tag::COPY_OUT_RESPONSE => Self::CopyOutResponse(CopyResponse::new(body)),
            tag::COPY_BOTH_RESPONSE => Self::CopyBothResponse(CopyResponse::new(body)),
            tag::COPY_DATA => Self::CopyData(body),
            tag::COPY_DONE => empty(body, "CopyDone", Self::CopyDone)?,
            tag::PARAMETER_DESCRIPTION => {
                Self::ParameterDescription(ParameterDescription::new(body))
            }
            tag::NO_DATA => empty(body, "NoData", Self::NoData)?,
            tag::PARSE_COMPLETE => empty(body, "ParseComplete", Self::ParseComplete)?,
            tag::BIND_COMPLETE => empty(body, "BindComplete", Self::BindComplete)?,
            tag::CLOSE_COMPLETE => empty(body, "CloseComplete", Self::CloseComplete)?,
            tag::PORTAL_SUSPENDED => empty(body, "PortalSuspended", Self::PortalSuspended)?,
            tag::NEGOTIATE_PROTOCOL_VERSION => {
                Self::NegotiateProtocolVersion(NegotiateProtocolVersion::new(body))
            }
            tag => Self::Other { tag, body },
        })
    }
}

/// Transaction status from ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block; statements are rejected until rollback.
    Failed,
}

impl TransactionStatus {
    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }

    pub fn from_byte(byte: u8) -> Result<Self, WireError> {
        match byte {
            b'I' => Ok(Self::Idle),
            b'T' => Ok(Self::InTransaction),
            b'E' => Ok(Self::Failed),
            other => Err(WireError::InvalidValue {
                what: "ReadyForQuery status",
                value: i64::from(other),
            }),
        }
    }
}

view!(
    /// ReadyForQuery: the server is idle, with this transaction status.
    ReadyForQuery
);

impl ReadyForQuery<'_> {
    pub fn status(&self) -> Result<TransactionStatus, WireError> {
        let mut cur = Cursor::new(self.body, "ReadyForQuery");
        let byte = cur.u8()?;
        cur.finish()?;
        TransactionStatus::from_byte(byte)
    }
}

view!(
    /// ParameterStatus: a run-time parameter the server reports (name, value).
    ParameterStatus
);

impl<'a> ParameterStatus<'a> {
    pub fn parts(&self) -> Result<(&'a str, &'a str), WireError> {
        let mut cur = Cursor::new(self.body, "ParameterStatus");
        let name = cur.cstr()?;
        let value = cur.cstr()?;
        cur.finish()?;
        Ok((name, value))
    }
}

view!(
    /// BackendKeyData: the process id and secret key a client needs to cancel.
    BackendKeyData
);

impl<'a> BackendKeyData<'a> {
    /// Process id and the secret key bytes. Protocol 3.0 keys are 4 bytes; 3.2 allows up
    /// to 256, so the key is returned as bytes.
    pub fn parts(&self) -> Result<(i32, &'a [u8]), WireError> {
        let mut cur = Cursor::new(self.body, "BackendKeyData");
        let pid = cur.i32()?;
        let key = cur.rest();
        if key.len() < 4 || key.len() > 256 {
            return Err(WireError::InvalidValue {
                what: "BackendKeyData secret key length",
                value: key.len() as i64,
            });
        }
        Ok((pid, key))
    }

    pub fn pid(&self) -> Result<i32, WireError> {
        Ok(self.parts()?.0)
    }

    /// The secret as protocol 3.0's int32; an error for longer (3.2) keys.
    pub fn secret(&self) -> Result<i32, WireError> {
        let mut cur = Cursor::new(self.parts()?.1, "BackendKeyData secret key");
        let secret = cur.i32()?;
        cur.finish()?;
        Ok(secret)
    }
}

/// One column of a RowDescription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    pub name: &'a str,
    /// OID of the source table, or 0.
    pub table_oid: u32,
    /// Attribute number in the source table, or 0.
    pub column_attr: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable-width types.
    pub type_size: i16,
    pub type_modifier: i32,
    pub format: Format,
}

fn read_field<'a>(cur: &mut Cursor<'a>) -> Result<FieldDescription<'a>, WireError> {
    Ok(FieldDescription {
        name: cur.cstr()?,
        table_oid: cur.u32()?,
        column_attr: cur.i16()?,
        type_oid: cur.u32()?,
        type_size: cur.i16()?,
        type_modifier: cur.i32()?,
        format: Format::from_code(cur.i16()?, "RowDescription format")?,
    })
}

view!(
    /// RowDescription: the columns of the rows that follow.
    RowDescription
);

impl<'a> RowDescription<'a> {
    /// Validates all fields once; the returned iterator then cannot fail.
    pub fn fields(&self) -> Result<Fields<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "RowDescription");
        let count = usize::from(cur.u16()?);
        let start = cur;
        for _ in 0..count {
            read_field(&mut cur)?;
        }
        cur.finish()?;
        Ok(Fields {
            cur: start,
            left: count,
        })
    }
}

/// Iterator over validated RowDescription fields.
#[derive(Clone, Debug)]
pub struct Fields<'a> {
    cur: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = FieldDescription<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated in `fields()`; stop rather than panic if that ever changes.
        read_field(&mut self.cur).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Fields<'_> {}

view!(
    /// DataRow: one row of column values.
    DataRow
);

impl<'a> DataRow<'a> {
    /// Column values, `None` for NULL. Lengths below -1 and trailing bytes are errors.
    pub fn columns(&self) -> Result<Values<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "DataRow");
        let values = Values::read(&mut cur)?;
        cur.finish()?;
        Ok(values)
    }
}

view!(
    /// CommandComplete: the command tag, e.g. `INSERT 0 5`.
    CommandComplete
);

impl<'a> CommandComplete<'a> {
    pub fn tag(&self) -> Result<&'a str, WireError> {
        let mut cur = Cursor::new(self.body, "CommandComplete");
        let tag = cur.cstr()?;
        cur.finish()?;
        Ok(tag)
    }

    /// The row count, for the commands that report one (`SELECT 3` → 3, `INSERT 0 5` → 5);
    /// `None` for tags without a count (`CREATE TABLE`, `BEGIN`).
    pub fn rows(&self) -> Result<Option<u64>, WireError> {
        Ok(command_rows(self.tag()?))
    }
}

/// Row count of a command tag, see [`CommandComplete::rows`].
pub fn command_rows(tag: &str) -> Option<u64> {
    let mut words = tag.split(' ');
    let command = words.next()?;
    let expected_words = match command {
        // INSERT carries an OID (always 0 since PostgreSQL 12) before the count.
        "INSERT" => 2,
        "SELECT" | "UPDATE" | "DELETE" | "MERGE" | "MOVE" | "FETCH" | "COPY" => 1,
        _ => return None,
    };
    let rest: Vec<&str> = words.collect();
    if rest.len() != expected_words {
        return None;
    }
    let count = rest.last()?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    count.parse().ok()
}

/// Field type codes in ErrorResponse and NoticeResponse.
pub mod error_field {
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6+).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const DETAIL: u8 = b'D';
    pub const HINT: u8 = b'H';
    pub const POSITION: u8 = b'P';
    pub const INTERNAL_POSITION: u8 = b'p';
    pub const INTERNAL_QUERY: u8 = b'q';
    pub const WHERE: u8 = b'W';
    pub const SCHEMA: u8 = b's';
    pub const TABLE: u8 = b't';
    pub const COLUMN: u8 = b'c';
    pub const DATA_TYPE: u8 = b'd';
    pub const CONSTRAINT: u8 = b'n';
    pub const FILE: u8 = b'F';
    pub const LINE: u8 = b'L';
    pub const ROUTINE: u8 = b'R';
}

/// The commonly used fields of an ErrorResponse or NoticeResponse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: Option<&'a str>,
    pub severity_nonlocalized: Option<&'a str>,
    /// The SQLSTATE.
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
    pub position: Option<&'a str>,
    pub where_: Option<&'a str>,
    pub schema: Option<&'a str>,
    pub table: Option<&'a str>,
    pub column: Option<&'a str>,
    pub data_type: Option<&'a str>,
    pub constraint: Option<&'a str>,
}

view!(
    /// ErrorResponse or NoticeResponse (same layout): typed fields ending with a zero byte.
    ErrorNotice
);

impl<'a> ErrorNotice<'a> {
    /// Validates all fields; the iterator yields `(field type, value)` for every field,
    /// including ones this module has no name for.
    pub fn fields(&self) -> Result<ErrorFieldsIter<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "ErrorResponse");
        let start = cur;
        loop {
            if cur.u8()? == 0 {
                cur.finish()?;
                return Ok(ErrorFieldsIter { cur: start });
            }
            cur.cstr()?;
        }
    }

    /// The named fields; for a repeated field the last one wins.
    pub fn parse(&self) -> Result<ErrorFields<'a>, WireError> {
        use error_field as f;
        let mut out = ErrorFields::default();
        for (kind, value) in self.fields()? {
            let slot = match kind {
                f::SEVERITY => &mut out.severity,
                f::SEVERITY_NONLOCALIZED => &mut out.severity_nonlocalized,
                f::CODE => &mut out.code,
                f::MESSAGE => &mut out.message,
                f::DETAIL => &mut out.detail,
                f::HINT => &mut out.hint,
                f::POSITION => &mut out.position,
                f::WHERE => &mut out.where_,
                f::SCHEMA => &mut out.schema,
                f::TABLE => &mut out.table,
                f::COLUMN => &mut out.column,
                f::DATA_TYPE => &mut out.data_type,
                f::CONSTRAINT => &mut out.constraint,
                _ => continue,
            };
            *slot = Some(value);
        }
        Ok(out)
    }

    /// The SQLSTATE, if the server sent one.
    pub fn code(&self) -> Result<Option<&'a str>, WireError> {
        Ok(self.parse()?.code)
    }
}

/// Iterator over validated error/notice fields.
#[derive(Clone, Debug)]
pub struct ErrorFieldsIter<'a> {
    cur: Cursor<'a>,
}

impl<'a> Iterator for ErrorFieldsIter<'a> {
    type Item = (u8, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let kind = self.cur.u8().ok()?;
        if kind == 0 {
            return None;
        }
        Some((kind, self.cur.cstr().ok()?))
    }
}

view!(
    /// NotificationResponse from LISTEN/NOTIFY.
    NotificationResponse
);

impl<'a> NotificationResponse<'a> {
    /// Sending process id, channel and payload.
    pub fn parts(&self) -> Result<(i32, &'a str, &'a str), WireError> {
        let mut cur = Cursor::new(self.body, "NotificationResponse");
        let pid = cur.i32()?;
        let channel = cur.cstr()?;
        let payload = cur.cstr()?;
        cur.finish()?;
        Ok((pid, channel, payload))
    }
}

view!(
    /// CopyInResponse, CopyOutResponse or CopyBothResponse (same layout).
    CopyResponse
);

impl<'a> CopyResponse<'a> {
    /// Overall format and per-column formats.
    pub fn parts(&self) -> Result<(Format, Formats<'a>), WireError> {
        let mut cur = Cursor::new(self.body, "CopyResponse");
        let overall = Format::from_code(i16::from(cur.u8()?), "CopyResponse format")?;
        let columns = Formats::read(&mut cur, "CopyResponse column format")?;
        cur.finish()?;
        Ok((overall, columns))
    }
}

view!(
    /// ParameterDescription: the parameter types of a described statement.
    ParameterDescription
);

impl<'a> ParameterDescription<'a> {
    pub fn types(&self) -> Result<Oids<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "ParameterDescription");
        let oids = Oids::read(&mut cur)?;
        cur.finish()?;
        Ok(oids)
    }
}

view!(
    /// NegotiateProtocolVersion: the newest minor version the server supports and the
    /// protocol options it did not recognise.
    NegotiateProtocolVersion
);

impl<'a> NegotiateProtocolVersion<'a> {
    /// Newest supported minor version and the count of unrecognised options.
    pub fn newest_minor(&self) -> Result<i32, WireError> {
        let mut cur = Cursor::new(self.body, "NegotiateProtocolVersion");
        let minor = cur.i32()?;
        let count = cur.i32()?;
        if count < 0 {
            return Err(WireError::InvalidValue {
                what: "NegotiateProtocolVersion option count",
                value: i64::from(count),
            });
        }
        for _ in 0..count {
            cur.cstr()?;
        }
        cur.finish()?;
        Ok(minor)
    }

    /// The unrecognised option names (after validating the whole message).
    pub fn options(&self) -> Result<impl Iterator<Item = &'a str> + use<'a>, WireError> {
        self.newest_minor()?;
        let rest = self.body.get(8..).unwrap_or_default();
        Ok(rest
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| utf8(s, "NegotiateProtocolVersion").ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_row_columns() {
        let mut body = vec![0, 3];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ab");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        let cols: Vec<_> = DataRow::new(&body).columns().unwrap().iter().collect();
        assert_eq!(cols, vec![Some(&b"ab"[..]), None, Some(&b""[..])]);
    }

    #[test]
    fn data_row_rejects_bad_lengths() {
        for len in [-2i32, i32::MIN] {
            let mut body = vec![0, 1];
            body.extend_from_slice(&len.to_be_bytes());
            let err = DataRow::new(&body).columns().unwrap_err();
            assert!(matches!(err, WireError::InvalidValue { .. }), "{err:?}");
        }
        // Count larger than the values present; trailing bytes.
        assert!(DataRow::new(&[0, 2, 0, 0, 0, 0]).columns().is_err());
        assert!(DataRow::new(&[0, 0, 9]).columns().is_err());
        assert!(DataRow::new(&[0]).columns().is_err());
    }

    #[test]
    fn command_tags() {
        let rows = |t: &str| command_rows(t);
        assert_eq!(rows("INSERT 0 5"), Some(5));
        assert_eq!(rows("SELECT 3"), Some(3));
        assert_eq!(rows("UPDATE 0"), Some(0));
        assert_eq!(rows("COPY 12"), Some(12));
        assert_eq!(rows("CREATE TABLE"), None);
        assert_eq!(rows("INSERT 5"), None);
        assert_eq!(rows("SELECT +3"), None);
        assert_eq!(rows("SELECT 99999999999999999999999"), None);
        assert_eq!(CommandComplete::new(b"DELETE 7\0").rows().unwrap(), Some(7));
        assert!(CommandComplete::new(b"DELETE 7").rows().is_err());
    }

    #[test]
    fn error_fields() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0P15\0Zfuture\0\0";
        let e = ErrorNotice::new(body);
        let f = e.parse().unwrap();
        assert_eq!(f.code, Some("42P01"));
        assert_eq!(f.severity, Some("ERROR"));
        assert_eq!(f.position, Some("15"));
        assert_eq!(e.fields().unwrap().count(), 6);
        assert!(ErrorNotice::new(b"SERROR\0").fields().is_err());
        assert!(ErrorNotice::new(b"SERROR").fields().is_err());
        assert!(ErrorNotice::new(b"\0x").fields().is_err());
    }

    #[test]
    fn row_description_and_status() {
        let mut body = vec![0, 1];
        body.extend_from_slice(b"id\0");
        body.extend_from_slice(&16384u32.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&23u32.to_be_bytes());
        body.extend_from_slice(&4i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let fields: Vec<_> = RowDescription::new(&body).fields().unwrap().collect();
        assert_eq!(fields.len(), 1);
        assert_eq!(
            (fields[0].name, fields[0].type_oid, fields[0].format),
            ("id", 23, Format::Text)
        );
        body.pop();
        assert!(RowDescription::new(&body).fields().is_err());
        assert_eq!(
            ReadyForQuery::new(b"T").status().unwrap(),
            TransactionStatus::InTransaction
        );
        assert!(ReadyForQuery::new(b"X").status().is_err());
        assert!(ReadyForQuery::new(b"").status().is_err());
        assert!(BackendMessage::decode(tag::NO_DATA, b"x").is_err());
        let key = BackendKeyData::new(&[0, 0, 0, 9, 0, 0, 0, 1]);
        assert_eq!((key.pid().unwrap(), key.secret().unwrap()), (9, 1));
        assert!(BackendKeyData::new(&[0, 0, 0, 9, 0]).pid().is_err());
    }
}
