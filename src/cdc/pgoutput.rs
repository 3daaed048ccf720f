//! Zero-copy views over pgoutput messages (logical replication protocol versions 1 and 2).
//!
//! Every message is validated once when it is decoded, so the iterators over tuples and
//! relation columns afterwards cannot fail and never allocate. Bytes from the server are
//! outside input: nothing here panics on them, every decoder returns `Result`.

use super::lsn::Lsn;

/// A malformed pgoutput message: what was being read when the bytes ran out or made no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {what} message: {problem}")]
pub struct DecodeError {
    pub what: &'static str,
    pub problem: &'static str,
}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    /// An unchanged TOASTed value: not sent; take it from the old row or leave it out.
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A validated TupleData: iterate with [`Tuple::iter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple<'a> {
    raw: &'a [u8],
    count: usize,
}

impl<'a> Tuple<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            cur: Cursor::new(self.raw, "tuple"),
            left: self.count,
        }
    }

    /// True when any column is the unchanged-TOAST marker.
    pub fn has_unchanged(&self) -> bool {
        self.iter().any(|d| d == Datum::Unchanged)
    }

    fn read(cur: &mut Cursor<'a>) -> Result<Self, DecodeError> {
        let count = usize::from(cur.u16()?);
        let start = cur.buf;
        for _ in 0..count {
            read_datum(cur)?;
        }
        let used = start.len() - cur.buf.len();
        Ok(Tuple {
            raw: &start[..used],
            count,
        })
    }
}

fn read_datum<'a>(cur: &mut Cursor<'a>) -> Result<Datum<'a>, DecodeError> {
    Ok(match cur.u8()? {
        b'n' => Datum::Null,
        b'u' => Datum::Unchanged,
        b't' => {
            let len = cur.len32()?;
            Datum::Text(cur.take(len)?)
        }
        b'b' => {
            let len = cur.len32()?;
            Datum::Binary(cur.take(len)?)
        }
        _ => return Err(cur.bad("unknown column kind")),
    })
}

pub struct TupleIter<'a> {
    cur: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = Datum<'a>;

    fn next(&mut self) -> Option<Datum<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated in `Tuple::read`; stop rather than panic if that ever changes.
        read_datum(&mut self.cur).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for TupleIter<'_> {}

/// One column of a Relation message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelColumn<'a> {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_mod: i32,
}

/// A Relation message: the table's identity and columns as the publication sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relation<'a> {
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    columns_raw: &'a [u8],
    column_count: usize,
}

impl<'a> Relation<'a> {
    pub fn columns(&self) -> impl Iterator<Item = RelColumn<'a>> + use<'a> {
        let mut cur = Cursor::new(self.columns_raw, "Relation");
        (0..self.column_count).map_while(move |_| read_column(&mut cur).ok())
    }
}

fn read_column<'a>(cur: &mut Cursor<'a>) -> Result<RelColumn<'a>, DecodeError> {
    let flags = cur.u8()?;
    let name = cur.cstr()?;
    let type_oid = cur.u32()?;
    let type_mod = cur.u32()? as i32;
    Ok(RelColumn {
        key: flags & 1 == 1,
        name,
        type_oid,
        type_mod,
    })
}

/// Which old row an Update or Delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica identity key columns (others are null).
    Key,
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// A decoded pgoutput message. `xid` is present only inside a streamed block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: Lsn,
        commit_ts_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts_us: i64,
    },
    Origin {
        lsn: Lsn,
        name: &'a str,
    },
    Relation {
        xid: Option<u32>,
        rel: Relation<'a>,
    },
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: &'a str,
        name: &'a str,
    },
    Insert {
        xid: Option<u32>,
        rel: u32,
        new: Tuple<'a>,
    },
    Update {
        xid: Option<u32>,
        rel: u32,
        old: Option<(OldKind, Tuple<'a>)>,
        new: Tuple<'a>,
    },
    Delete {
        xid: Option<u32>,
        rel: u32,
        old_kind: OldKind,
        old: Tuple<'a>,
    },
    Truncate {
        xid: Option<u32>,
        cascade: bool,
        restart_identity: bool,
        rels: RelIds<'a>,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: Lsn,
        prefix: &'a str,
        content: &'a [u8],
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts_us: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// The relation ids of a Truncate message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelIds<'a> {
    raw: &'a [u8],
}

impl<'a> RelIds<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u32> + use<'a> {
        self.raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

impl<'a> Message<'a> {
    /// Decodes one pgoutput message. `in_stream` says whether we are between Stream Start
    /// and Stream Stop, where data messages carry the xid of their (sub)transaction.
    pub fn decode(body: &'a [u8], in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let Some((&tag, rest)) = body.split_first() else {
            return Err(DecodeError {
                what: "empty",
                problem: "no message type",
            });
        };
        let mut cur = Cursor::new(rest, name_of(tag));
        let cur = &mut cur;
        let msg = match tag {
            b'B' => Message::Begin {
                final_lsn: cur.lsn()?,
                commit_ts_us: cur.i64()?,
                xid: cur.u32()?,
            },
            b'C' => Self::commit(cur)?,
            b'O' => Message::Origin {
                lsn: cur.lsn()?,
                name: cur.cstr()?,
            },
            b'R' => Self::relation(cur, in_stream)?,
            b'Y' => Message::Type {
                xid: cur.xid(in_stream)?,
                oid: cur.u32()?,
                namespace: cur.cstr()?,
                name: cur.cstr()?,
            },
            b'I' => Self::insert(cur, in_stream)?,
            b'U' => Self::update(cur, in_stream)?,
            b'D' => Self::delete(cur, in_stream)?,
            b'T' => Self::truncate(cur, in_stream)?,
            b'M' => Self::logical_message(cur, in_stream)?,
            b'S' => Message::StreamStart {
                xid: cur.u32()?,
                first_segment: cur.u8()? == 1,
            },
            b'E' => Message::StreamStop,
            b'c' => Self::stream_commit(cur)?,
            b'A' => Self::stream_abort(cur)?,
            _ => {
                return Err(DecodeError {
                    what: "unknown",
                    problem: "unknown message type",
                });
            }
        };
        if !cur.buf.is_empty() {
            return Err(cur.bad("trailing bytes"));
        }
        Ok(msg)
    }

    // The readers of the message kinds with more than plain fields, one each, called from
    // `decode`'s small match (which checks for trailing bytes after them). `#[inline]` keeps
    // the hot path what it was when they were arms of that match.

    #[inline]
    fn commit(cur: &mut Cursor<'a>) -> Result<Message<'a>, DecodeError> {
        let _flags = cur.u8()?;
        Ok(Message::Commit {
            commit_lsn: cur.lsn()?,
            end_lsn: cur.lsn()?,
            commit_ts_us: cur.i64()?,
        })
    }

    #[inline]
    fn relation(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let oid = cur.u32()?;
        let namespace = cur.cstr()?;
        let name = cur.cstr()?;
        let replica_identity = cur.u8()?;
        let column_count = usize::from(cur.u16()?);
        let start = cur.buf;
        for _ in 0..column_count {
            read_column(cur)?;
        }
        let used = start.len() - cur.buf.len();
        Ok(Message::Relation {
            xid,
            rel: Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns_raw: &start[..used],
                column_count,
            },
        })
    }

    #[inline]
    fn insert(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let rel = cur.u32()?;
        if cur.u8()? != b'N' {
            return Err(cur.bad("expected N before the new tuple"));
        }
        Ok(Message::Insert {
            xid,
            rel,
            new: Tuple::read(cur)?,
        })
    }

    #[inline]
    fn update(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let rel = cur.u32()?;
        let mut marker = cur.u8()?;
        let mut old = None;
        if marker == b'K' || marker == b'O' {
            let kind = if marker == b'K' {
                OldKind::Key
            } else {
                OldKind::Full
            };
            old = Some((kind, Tuple::read(cur)?));
            marker = cur.u8()?;
        }
        if marker != b'N' {
            return Err(cur.bad("expected N before the new tuple"));
        }
        Ok(Message::Update {
            xid,
            rel,
            old,
            new: Tuple::read(cur)?,
        })
    }

    #[inline]
    fn delete(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let rel = cur.u32()?;
        let old_kind = match cur.u8()? {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            _ => return Err(cur.bad("expected K or O before the old tuple")),
        };
        Ok(Message::Delete {
            xid,
            rel,
            old_kind,
            old: Tuple::read(cur)?,
        })
    }

    #[inline]
    fn truncate(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let count = cur.u32()? as usize;
        let options = cur.u8()?;
        let raw = cur.take(count.checked_mul(4).ok_or(cur.bad("count"))?)?;
        Ok(Message::Truncate {
            xid,
            cascade: options & 1 != 0,
            restart_identity: options & 2 != 0,
            rels: RelIds { raw },
        })
    }

    /// A logical decoding message (`pg_logical_emit_message`).
    #[inline]
    fn logical_message(cur: &mut Cursor<'a>, in_stream: bool) -> Result<Message<'a>, DecodeError> {
        let xid = cur.xid(in_stream)?;
        let transactional = cur.u8()? & 1 == 1;
        let lsn = cur.lsn()?;
        let prefix = cur.cstr()?;
        let len = cur.len32()?;
        Ok(Message::Message {
            xid,
            transactional,
            lsn,
            prefix,
            content: cur.take(len)?,
        })
    }

    #[inline]
    fn stream_commit(cur: &mut Cursor<'a>) -> Result<Message<'a>, DecodeError> {
        let xid = cur.u32()?;
        let _flags = cur.u8()?;
        Ok(Message::StreamCommit {
            xid,
            commit_lsn: cur.lsn()?,
            end_lsn: cur.lsn()?,
            commit_ts_us: cur.i64()?,
        })
    }

    #[inline]
    fn stream_abort(cur: &mut Cursor<'a>) -> Result<Message<'a>, DecodeError> {
        let xid = cur.u32()?;
        let subxid = cur.u32()?;
        // Protocol 4 (`streaming parallel`) appends the abort LSN and time; we ask
        // for version 2, but tolerate the extra fields rather than reject them.
        cur.buf = &[];
        Ok(Message::StreamAbort { xid, subxid })
    }
}

fn name_of(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => "unknown",
    }
}

/// Big-endian reader over a borrowed slice; every read checks the length.
#[derive(Clone, Copy)]
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    #[cold]
    fn bad(&self, problem: &'static str) -> DecodeError {
        DecodeError {
            what: self.what,
            problem,
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad("message ends early"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    /// The (sub)transaction xid that data messages carry only inside a streamed block.
    #[inline]
    fn xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.i64()? as u64))
    }

    /// An Int32 length that must not be negative.
    fn len32(&mut self) -> Result<usize, DecodeError> {
        let len = self.u32()? as i32;
        usize::try_from(len).map_err(|_| self.bad("negative length"))
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = memchr::memchr(0, self.buf).ok_or_else(|| self.bad("unterminated string"))?;
        let s = self.take(end)?;
        self.buf = &self.buf[1..];
        simdutf8::basic::from_utf8(s).map_err(|_| self.bad("string is not UTF-8"))
    }
}

/// Builders for pgoutput messages, for tests, fuzzing and the pipeline benchmark.
#[doc(hidden)]
pub mod build {
    use super::Lsn;

    pub fn begin(out: &mut Vec<u8>, final_lsn: Lsn, xid: u32) {
        out.push(b'B');
        out.extend_from_slice(&final_lsn.0.to_be_bytes());
        out.extend_from_slice(&0i64.to_be_bytes());
        out.extend_from_slice(&xid.to_be_bytes());
    }

    pub fn commit(out: &mut Vec<u8>, commit_lsn: Lsn, end_lsn: Lsn) {
        out.push(b'C');
        out.push(0);
        out.extend_from_slice(&commit_lsn.0.to_be_bytes());
        out.extend_from_slice(&end_lsn.0.to_be_bytes());
        out.extend_from_slice(&0i64.to_be_bytes());
    }

    /// `columns`: (key, name, type oid).
    pub fn relation(
        out: &mut Vec<u8>,
        oid: u32,
        ns: &str,
        name: &str,
        columns: &[(bool, &str, u32)],
    ) {
        out.push(b'R');
        out.extend_from_slice(&oid.to_be_bytes());
        for s in [ns, name] {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out.push(b'd');
        out.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for (key, col, ty) in columns {
            out.push(u8::from(*key));
            out.extend_from_slice(col.as_bytes());
            out.push(0);
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&(-1i32).to_be_bytes());
        }
    }

    /// `None` is NULL, `Some(None)` is unchanged TOAST.
    pub fn tuple(out: &mut Vec<u8>, values: &[Option<Option<&str>>]) {
        out.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(None) => out.push(b'u'),
                Some(Some(text)) => {
                    out.push(b't');
                    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }

    pub fn insert(out: &mut Vec<u8>, rel: u32, values: &[Option<Option<&str>>]) {
        out.push(b'I');
        out.extend_from_slice(&rel.to_be_bytes());
        out.push(b'N');
        tuple(out, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_relation_insert_update_delete() {
        let mut b = Vec::new();
        build::relation(
            &mut b,
            42,
            "public",
            "t",
            &[(true, "id", 23), (false, "v", 25)],
        );
        let Message::Relation { xid: None, rel } = Message::decode(&b, false).unwrap() else {
            panic!()
        };
        assert_eq!((rel.oid, rel.name, rel.namespace), (42, "t", "public"));
        let cols: Vec<_> = rel.columns().map(|c| (c.key, c.name, c.type_oid)).collect();
        assert_eq!(cols, vec![(true, "id", 23), (false, "v", 25)]);

        let mut b = Vec::new();
        build::insert(&mut b, 42, &[Some(Some("1")), None]);
        let Message::Insert { rel, new, .. } = Message::decode(&b, false).unwrap() else {
            panic!()
        };
        assert_eq!(rel, 42);
        let vals: Vec<_> = new.iter().collect();
        assert_eq!(vals, vec![Datum::Text(b"1"), Datum::Null]);

        // Update with a full old row and an unchanged TOAST column.
        let mut b = vec![b'U'];
        b.extend_from_slice(&42u32.to_be_bytes());
        b.push(b'O');
        build::tuple(&mut b, &[Some(Some("1")), Some(Some("big"))]);
        b.push(b'N');
        build::tuple(&mut b, &[Some(Some("1")), Some(None)]);
        let Message::Update {
            old: Some((OldKind::Full, old)),
            new,
            ..
        } = Message::decode(&b, false).unwrap()
        else {
            panic!()
        };
        assert!(new.has_unchanged());
        assert!(!old.has_unchanged());

        // Streamed delete carries the xid.
        let mut b = vec![b'D'];
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&42u32.to_be_bytes());
        b.push(b'K');
        build::tuple(&mut b, &[Some(Some("1")), None]);
        assert!(matches!(
            Message::decode(&b, true).unwrap(),
            Message::Delete {
                xid: Some(7),
                rel: 42,
                old_kind: OldKind::Key,
                ..
            }
        ));
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        let mut b = Vec::new();
        build::insert(&mut b, 42, &[Some(Some("hello"))]);
        for cut in 0..b.len() {
            assert!(Message::decode(&b[..cut], false).is_err(), "cut {cut}");
        }
        assert!(Message::decode(b"Z", false).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(Message::decode(&long, false).is_err());
        // A negative length never panics.
        let mut neg = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        neg.extend_from_slice(&(-5i32).to_be_bytes());
        assert!(Message::decode(&neg, false).is_err());
    }

    #[test]
    fn decodes_commit_and_stream_control() {
        let mut b = Vec::new();
        build::commit(&mut b, Lsn(10), Lsn(20));
        assert!(matches!(
            Message::decode(&b, false).unwrap(),
            Message::Commit {
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                ..
            }
        ));
        let mut s = vec![b'S'];
        s.extend_from_slice(&9u32.to_be_bytes());
        s.push(1);
        assert_eq!(
            Message::decode(&s, false).unwrap(),
            Message::StreamStart {
                xid: 9,
                first_segment: true
            }
        );
        let mut a = vec![b'A'];
        a.extend_from_slice(&9u32.to_be_bytes());
        a.extend_from_slice(&11u32.to_be_bytes());
        assert_eq!(
            Message::decode(&a, false).unwrap(),
            Message::StreamAbort { xid: 9, subxid: 11 }
        );
    }
}
