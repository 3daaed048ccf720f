//! Lazy views over frontend (client → server) message bodies. A view only borrows the body;
//! nothing is decoded until an accessor is called, and every accessor returns `Result`
//! because the bytes came off a socket. Views never allocate and never copy.

use super::cursor::{Cursor, expect_empty};
use super::error::WireError;
use super::format::{Format, Formats, Oids, Values};
use super::tag;

/// A frontend message, classified by tag. Bodies of messages that are not empty by
/// definition are checked only when their accessors are called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query(Query<'a>),
    Parse(Parse<'a>),
    Bind(Bind<'a>),
    Describe(Describe<'a>),
    Execute(Execute<'a>),
    Sync,
    Close(Close<'a>),
    Flush,
    Terminate,
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail(CopyFail<'a>),
    /// Tag `p`: PasswordMessage, SASLInitialResponse or SASLResponse; the auth state says which.
    Password(Password<'a>),
    /// FunctionCall and anything else the proxy forwards without understanding.
    Other {
        tag: u8,
        body: &'a [u8],
    },
}

impl<'a> FrontendMessage<'a> {
    /// Classifies a frontend message. Fails only for messages whose body must be empty.
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self, WireError> {
        Ok(match tag {
            tag::QUERY => Self::Query(Query { body }),
            tag::PARSE => Self::Parse(Parse { body }),
            tag::BIND => Self::Bind(Bind { body }),
            tag::DESCRIBE => Self::Describe(Describe { body }),
            tag::EXECUTE => Self::Execute(Execute { body }),
            tag::SYNC => {
                expect_empty(body, "Sync")?;
                Self::Sync
            }
            tag::CLOSE => Self::Close(Close { body }),
            tag::FLUSH => {
                expect_empty(body, "Flush")?;
                Self::Flush
            }
            tag::TERMINATE => {
                expect_empty(body, "Terminate")?;
                Self::Terminate
            }
            tag::COPY_DATA => Self::CopyData(body),
            tag::COPY_DONE => {
                expect_empty(body, "CopyDone")?;
                Self::CopyDone
            }
            tag::COPY_FAIL => Self::CopyFail(CopyFail { body }),
            tag::PASSWORD => Self::Password(Password { body }),
            tag => Self::Other { tag, body },
        })
    }
}

macro_rules! view {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name<'a> {
            body: &'a [u8],
        }

        impl<'a> $name<'a> {
            /// Wraps a body (the bytes after the 5-byte header); decodes nothing yet.
            pub fn new(body: &'a [u8]) -> Self {
                Self { body }
            }

            /// The raw body.
            pub fn body(&self) -> &'a [u8] {
                self.body
            }
        }
    };
}
pub(super) use view;

view!(
    /// Simple Query: one SQL string, possibly several statements.
    Query
);

impl<'a> Query<'a> {
    pub fn query(&self) -> Result<&'a str, WireError> {
        let mut cur = Cursor::new(self.body, "Query");
        let query = cur.cstr()?;
        cur.finish()?;
        Ok(query)
    }
}

view!(
    /// Parse: statement name, SQL, parameter type OIDs.
    Parse
);

impl<'a> Parse<'a> {
    /// The prepared statement name; empty for the unnamed statement.
    pub fn statement(&self) -> Result<&'a str, WireError> {
        Cursor::new(self.body, "Parse").cstr()
    }

    pub fn query(&self) -> Result<&'a str, WireError> {
        Ok(self.parts()?.1)
    }

    pub fn param_types(&self) -> Result<Oids<'a>, WireError> {
        Ok(self.parts()?.2)
    }

    /// Statement name, query and parameter types in one pass.
    pub fn parts(&self) -> Result<(&'a str, &'a str, Oids<'a>), WireError> {
        let mut cur = Cursor::new(self.body, "Parse");
        let statement = cur.cstr()?;
        let query = cur.cstr()?;
        let types = Oids::read(&mut cur)?;
        cur.finish()?;
        Ok((statement, query, types))
    }
}

/// Everything in a Bind message, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindParts<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub param_formats: Formats<'a>,
    pub params: Values<'a>,
    pub result_formats: Formats<'a>,
}

impl BindParts<'_> {
    /// The format of parameter `index` under the protocol's 0/1/N rule.
    pub fn param_format(&self, index: usize) -> Format {
        self.param_formats.for_item(index)
    }
}

view!(
    /// Bind: portal, statement, parameter formats and values, result formats.
    Bind
);

impl<'a> Bind<'a> {
    /// The destination portal; empty for the unnamed portal.
    pub fn portal(&self) -> Result<&'a str, WireError> {
        Cursor::new(self.body, "Bind").cstr()
    }

    /// The source prepared statement; empty for the unnamed statement.
    pub fn statement(&self) -> Result<&'a str, WireError> {
        let mut cur = Cursor::new(self.body, "Bind");
        cur.cstr_bytes()?;
        cur.cstr()
    }

    pub fn param_formats(&self) -> Result<Formats<'a>, WireError> {
        Ok(self.parts()?.param_formats)
    }

    /// Parameter values, `None` for SQL NULL.
    pub fn params(&self) -> Result<Values<'a>, WireError> {
        Ok(self.parts()?.params)
    }

    pub fn result_formats(&self) -> Result<Formats<'a>, WireError> {
        Ok(self.parts()?.result_formats)
    }

    /// Decodes and validates the whole message in one pass.
    pub fn parts(&self) -> Result<BindParts<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "Bind");
        let portal = cur.cstr()?;
        let statement = cur.cstr()?;
        let param_formats = Formats::read(&mut cur, "Bind parameter format")?;
        let params = Values::read(&mut cur)?;
        // PostgreSQL's rule: zero format codes (all text), one (applies to all), or exactly
        // one per parameter. Anything else is a protocol violation.
        let formats = param_formats.len();
        if formats > 1 && formats != params.len() {
            return Err(WireError::InvalidValue {
                what: "Bind parameter format count",
                value: formats as i64,
            });
        }
        let result_formats = Formats::read(&mut cur, "Bind result format")?;
        cur.finish()?;
        Ok(BindParts {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }
}

/// What Describe and Close refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Statement,
    Portal,
}

impl ObjectKind {
    /// The wire byte: `S` or `P`.
    pub fn byte(self) -> u8 {
        match self {
            Self::Statement => b'S',
            Self::Portal => b'P',
        }
    }
}

fn target_and_name<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(ObjectKind, &'a str), WireError> {
    let mut cur = Cursor::new(body, what);
    let target = match cur.u8()? {
        b'S' => ObjectKind::Statement,
        b'P' => ObjectKind::Portal,
        other => {
            return Err(WireError::InvalidValue {
                what,
                value: i64::from(other),
            });
        }
    };
    let name = cur.cstr()?;
    cur.finish()?;
    Ok((target, name))
}

view!(
    /// Describe a statement or portal.
    Describe
);

impl<'a> Describe<'a> {
    pub fn target(&self) -> Result<(ObjectKind, &'a str), WireError> {
        target_and_name(self.body, "Describe")
    }
}

view!(
    /// Close a statement or portal.
    Close
);

impl<'a> Close<'a> {
    pub fn target(&self) -> Result<(ObjectKind, &'a str), WireError> {
        target_and_name(self.body, "Close")
    }
}

view!(
    /// Execute a portal.
    Execute
);

impl<'a> Execute<'a> {
    /// Portal name and row limit (0 = no limit).
    pub fn parts(&self) -> Result<(&'a str, i32), WireError> {
        let mut cur = Cursor::new(self.body, "Execute");
        let portal = cur.cstr()?;
        let max_rows = cur.i32()?;
        cur.finish()?;
        Ok((portal, max_rows))
    }

    pub fn portal(&self) -> Result<&'a str, WireError> {
        Ok(self.parts()?.0)
    }

    pub fn max_rows(&self) -> Result<i32, WireError> {
        Ok(self.parts()?.1)
    }
}

view!(
    /// CopyFail with the client's reason.
    CopyFail
);

impl<'a> CopyFail<'a> {
    pub fn message(&self) -> Result<&'a str, WireError> {
        let mut cur = Cursor::new(self.body, "CopyFail");
        let message = cur.cstr()?;
        cur.finish()?;
        Ok(message)
    }
}

/// SASLInitialResponse contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaslInitial<'a> {
    pub mechanism: &'a str,
    /// The client-first message; `None` when the client sent length -1.
    pub data: Option<&'a [u8]>,
}

view!(
    /// Tag `p`. Which message it is depends on the authentication request that preceded
    /// it, so the caller picks the accessor.
    Password
);

impl<'a> Password<'a> {
    /// As PasswordMessage: the password (cleartext or `md5...`). Bytes, because PostgreSQL
    /// does not require passwords to be UTF-8.
    pub fn password(&self) -> Result<&'a [u8], WireError> {
        let mut cur = Cursor::new(self.body, "PasswordMessage");
        let password = cur.cstr_bytes()?;
        cur.finish()?;
        Ok(password)
    }

    /// As SASLInitialResponse.
    pub fn sasl_initial(&self) -> Result<SaslInitial<'a>, WireError> {
        let mut cur = Cursor::new(self.body, "SASLInitialResponse");
        let mechanism = cur.cstr()?;
        let data = cur.nullable_value()?;
        cur.finish()?;
        Ok(SaslInitial { mechanism, data })
    }

    /// As SASLResponse: the whole body is mechanism data.
    pub fn sasl_response(&self) -> &'a [u8] {
        self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_body(formats: &[i16], params: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
        let mut b = b"portal\0stmt\0".to_vec();
        b.extend_from_slice(&(formats.len() as u16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            match p {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b.extend_from_slice(&(results.len() as u16).to_be_bytes());
        for f in results {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b
    }

    #[test]
    fn bind_decodes() {
        let body = bind_body(&[1], &[Some(b"ab"), None], &[0, 1]);
        let bind = Bind::new(&body);
        assert_eq!(bind.portal().unwrap(), "portal");
        assert_eq!(bind.statement().unwrap(), "stmt");
        let parts = bind.parts().unwrap();
        assert_eq!(
            parts.params.iter().collect::<Vec<_>>(),
            vec![Some(&b"ab"[..]), None]
        );
        assert_eq!(parts.param_format(1), Format::Binary);
        assert_eq!(
            parts.result_formats.iter().collect::<Vec<_>>(),
            vec![Format::Text, Format::Binary]
        );
    }

    #[test]
    fn bind_rejects_bad_layouts() {
        // More format codes than parameters.
        assert!(
            Bind::new(&bind_body(&[0, 1, 0], &[None, None], &[]))
                .parts()
                .is_err()
        );
        // Unknown format code.
        assert!(Bind::new(&bind_body(&[2], &[None], &[])).parts().is_err());
        // Negative length other than -1.
        let mut body = b"\0\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&(-2i32).to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        assert!(Bind::new(&body).parts().is_err());
        // Value longer than the body.
        let mut body = b"\0\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(Bind::new(&body).parts().is_err());
        // Trailing bytes.
        let mut body = bind_body(&[], &[], &[]);
        body.push(0);
        assert!(Bind::new(&body).parts().is_err());
    }

    #[test]
    fn simple_views() {
        assert_eq!(Query::new(b"select 1\0").query().unwrap(), "select 1");
        assert!(Query::new(b"select 1").query().is_err());
        assert!(Query::new(b"select \xff\0").query().is_err());
        assert!(Query::new(b"a\0b").query().is_err());
        let parse = Parse::new(b"s1\0select $1\0\0\x01\0\0\0\x17");
        assert_eq!(parse.statement().unwrap(), "s1");
        assert_eq!(parse.query().unwrap(), "select $1");
        assert_eq!(
            parse.param_types().unwrap().iter().collect::<Vec<_>>(),
            vec![23]
        );
        assert!(Parse::new(b"s1\0select\0\0\x02\0\0\0\x17").parts().is_err());
        assert_eq!(
            Describe::new(b"Pp\0").target().unwrap(),
            (ObjectKind::Portal, "p")
        );
        assert!(Close::new(b"Xp\0").target().is_err());
        assert_eq!(Execute::new(b"\0\0\0\0\x05").parts().unwrap(), ("", 5));
        let p = Password::new(b"SCRAM-SHA-256\0\0\0\0\x03abc");
        assert_eq!(p.sasl_initial().unwrap().data, Some(&b"abc"[..]));
        assert!(p.password().is_err());
        assert!(FrontendMessage::decode(tag::SYNC, b"x").is_err());
        assert_eq!(
            FrontendMessage::decode(tag::SYNC, b"").unwrap(),
            FrontendMessage::Sync
        );
    }
}
