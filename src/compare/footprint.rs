//! What a statement touches, as the ordered shadow dispatch needs it: the relations it names
//! (one lane each), whether it writes them, and whether its result can differ between two
//! servers by nature (volatile functions, server-local values, LIMIT without ORDER BY).
//!
//! A byte scan of the statement text, not a parser: it may name a relation that is none (a
//! CTE, a function in FROM), which only costs parallelism, and what it cannot read (DDL,
//! CALL, DO, unknown statements) touches everything ("wild"). It never looks inside
//! functions: a function that writes a table the statement does not name is a known limit.

use std::sync::Arc;

use crate::sql;

/// The relations one statement (or one sync point, or a transaction so far) touches, and
/// for some of them the rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Hashes of the relation names (unqualified, folded to lower case unless quoted), sorted
    /// and without duplicates. Shared, as `probes`: a footprint is copied several times per
    /// sync point (what it touched as it started, in flight, pending in the ledger), and a
    /// copy of two vectors cost two allocations and their release each time.
    pub lanes: Arc<[u64]>,
    /// The rows of some of those relations, sorted by lane: a relation with probes is
    /// touched only in rows that match one of them; one without is touched whole.
    pub probes: Arc<[Probe]>,
    /// It writes (or locks rows of) what it touches.
    pub write: bool,
    /// It may touch any relation.
    pub wild: bool,
    /// It ends a transaction that wrote (COMMIT, ROLLBACK, END): it waits only for earlier
    /// reads of what it touches. Earlier writes there that conflicted at the row level had
    /// to wait for its row locks on the primary, so they came after it; when the completion
    /// order says otherwise, pgprism saw the two answers in the other order (microseconds
    /// apart), and waiting for such a write would wait for it to get the lock this
    /// transaction holds on the shadow: a cycle only the bound would break.
    pub ends: bool,
}

/// Rows of one relation: those where every `column = value` pair holds (a top-level
/// conjunction of equalities in a WHERE, or the values of one row an INSERT writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub lane: u64,
    /// (column hash, value), sorted by column, one per column, never empty. Shared: a
    /// probe is copied into every footprint that joins it (a sync point, its transaction,
    /// the ledger's history), and a copy must not cost an allocation.
    pub pairs: std::sync::Arc<[(u64, Value)]>,
}

/// A value a key column is compared with, in a canonical form: two spellings of one value
/// must never read as two different values (that would order two statements on one row as
/// if they touched two). Forms of different kinds are never taken for different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// An integer spelled canonically (a bare number, or a string or text parameter of
    /// digits without leading zeros), at most 15 digits (exact in a float8 too).
    Int(i64),
    /// Any other string or text parameter, folded (ASCII case, whitespace, `-`, braces and
    /// boolean spellings): a hash.
    Text(u64),
    /// A binary parameter: its length and a hash of its bytes.
    Bytes(u32, u64),
    /// Parameter `$n` (1-based) of an extended-protocol statement, not bound yet.
    Param(u16),
    /// Literal `k` (0-based, in text order) of a statement shape, not bound yet (see
    /// [`super::shape`]); `true`: written after a minus.
    Lit(u16, bool),
}

impl Value {
    /// Whether the two are certainly different values.
    fn differs(self, other: Value) -> bool {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a != b,
            (Value::Text(a), Value::Text(b)) => a != b,
            (Value::Bytes(la, a), Value::Bytes(lb, b)) => la == lb && a != b,
            _ => false,
        }
    }
}

impl Probe {
    /// Whether no row matches both: a column both name with certainly different values.
    fn disjoint(&self, other: &Probe) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.pairs.len() && j < other.pairs.len() {
            let (a, b) = (self.pairs[i], other.pairs[j]);
            match a.0.cmp(&b.0) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    if a.1.differs(b.1) {
                        return true;
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        false
    }
}

/// Whether two statements' rows of one relation (empty: the whole relation) cannot meet.
pub fn rows_disjoint(a: &[Probe], b: &[Probe]) -> bool {
    !a.is_empty() && !b.is_empty() && a.iter().all(|x| b.iter().all(|y| x.disjoint(y)))
}

/// Whether every row of `rows` (never the whole relation) is one `locked` names by the same
/// key values, none a parameter not bound yet: a write of `rows` waits on the primary for
/// the row locks of a transaction that wrote `locked`.
pub fn rows_within(rows: &[Probe], locked: &[Probe]) -> bool {
    !rows.is_empty()
        && rows.iter().all(|p| {
            !p.pairs
                .iter()
                .any(|(_, v)| matches!(v, Value::Param(_) | Value::Lit(..)))
                && locked.contains(p)
        })
}

/// Pairs of a probe resolved without a vector (see `Footprint::resolve`).
const PAIRS_ON_STACK: usize = 8;

/// Probes of one relation kept per footprint; beyond it, the relation is touched whole (a
/// transaction that wrote many rows of it, a long IN list).
const PROBES_MAX: usize = 32;

impl Footprint {
    /// Every relation, written.
    pub fn wild() -> Footprint {
        Footprint {
            lanes: Arc::default(),
            probes: Arc::default(),
            write: true,
            wild: true,
            ends: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty() && !self.wild
    }

    /// The rows of relation `lane` it touches (empty: all of them, or none if it does not
    /// touch the relation).
    pub fn rows(&self, lane: u64) -> &[Probe] {
        &self.probes[self.rows_span(lane)]
    }

    /// Where [`rows`](Self::rows) of `lane` lie in `probes`.
    pub fn rows_span(&self, lane: u64) -> std::ops::Range<usize> {
        let start = self.probes.partition_point(|p| p.lane < lane);
        start..start + self.probes[start..].partition_point(|p| p.lane == lane)
    }

    /// Adds `other`'s relations and rows (a write to any of them makes the union a write).
    pub fn join(&mut self, other: &Footprint) {
        self.write |= other.write;
        self.wild |= other.wild;
        if other.lanes.is_empty() {
            return;
        }
        if self.lanes.is_empty() {
            self.lanes.clone_from(&other.lanes);
            self.probes.clone_from(&other.probes);
            return;
        }
        // The common case (a sync point joined with what it touched as it started): nothing
        // to merge.
        let same = |a: &Arc<[u64]>, b: &Arc<[u64]>| Arc::ptr_eq(a, b) || a == b;
        if same(&self.lanes, &other.lanes)
            && (Arc::ptr_eq(&self.probes, &other.probes) || self.probes == other.probes)
        {
            return;
        }
        let mut lanes = Vec::with_capacity(self.lanes.len() + other.lanes.len());
        let mut probes = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.lanes.len() || j < other.lanes.len() {
            let (a, b) = (self.lanes.get(i), other.lanes.get(j));
            let lane = match (a, b) {
                (Some(&a), Some(&b)) => a.min(b),
                (Some(&a), None) => a,
                (None, Some(&b)) => b,
                (None, None) => break,
            };
            let in_self = a == Some(&lane);
            let in_other = b == Some(&lane);
            let (mine, theirs) = (self.rows(lane), other.rows(lane));
            // A relation touched whole by either side is touched whole by the union.
            let whole = (in_self && mine.is_empty())
                || (in_other && theirs.is_empty())
                || mine.len() + theirs.len() > PROBES_MAX;
            if !whole {
                for p in mine.iter().chain(theirs) {
                    if !probes.contains(p) {
                        probes.push(p.clone());
                    }
                }
            }
            lanes.push(lane);
            i += usize::from(in_self);
            j += usize::from(in_other);
        }
        self.lanes = lanes.into();
        self.probes = probes.into();
    }

    /// Whether a sync point of this footprint waits for an earlier conflicting one that
    /// writes (`write`) or only reads.
    pub fn waits_for(&self, write: bool) -> bool {
        if self.ends {
            !write
        } else {
            write || self.write
        }
    }

    /// Only the relations `self` writes (empty when it only reads).
    pub fn written(&self) -> Footprint {
        if self.write {
            self.clone()
        } else {
            Footprint::default()
        }
    }

    /// Whether the two may see each other's effects: they share a relation (or one is wild)
    /// and at least one writes, and, when only one writes, their rows of that relation may
    /// meet.
    ///
    /// Two writes of one relation conflict whatever their rows: a unique (or exclusion)
    /// constraint on a column neither statement names makes the second of two writes to
    /// different rows fail, so their order decides which one does, and the statement text
    /// cannot tell which columns are unique. (A departure from ordering writes by row too;
    /// reads, which are what contended rows make differ, are ordered by row.)
    pub fn conflicts(&self, other: &Footprint) -> bool {
        self.conflicts_as(other, other.write)
    }

    /// [`conflicts`](Self::conflicts), with `other` taken as writing or not (`write`)
    /// whatever it does: the ledger asks whether anything `other` touched may have held this
    /// one, without a copy of `other` marked as a write.
    pub fn conflicts_as(&self, other: &Footprint, write: bool) -> bool {
        if !(self.write || write) {
            return false;
        }
        if self.wild || other.wild {
            return !(self.is_empty() || other.is_empty());
        }
        // Both sorted: a merge walk.
        let (mut i, mut j) = (0, 0);
        while i < self.lanes.len() && j < other.lanes.len() {
            match self.lanes[i].cmp(&other.lanes[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let lane = self.lanes[i];
                    if (self.write && write) || !rows_disjoint(self.rows(lane), other.rows(lane)) {
                        return true;
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        false
    }

    /// Whether an access to relation `lane` (`write`, in rows `rows`) and this footprint's
    /// conflict there (the ledger's per-relation check).
    pub fn conflicts_in(&self, lane: u64, write: bool, rows: &[Probe]) -> bool {
        (self.write && write) || !rows_disjoint(self.rows(lane), rows)
    }

    /// The footprint with parameters bound: `value(n)` gives parameter `$n`'s canonical
    /// value, or None (NULL, unknown): a pair whose value is unknown says nothing, and a
    /// probe left without pairs makes its relation touched whole.
    pub fn bind(&self, value: impl Fn(u16) -> Option<Value>) -> Footprint {
        self.resolve(
            |v| matches!(v, Value::Param(_)),
            |v| match v {
                Value::Param(n) => value(n),
                v => Some(v),
            },
        )
    }

    /// A statement shape's footprint with its literals bound: `value(k, negative)` gives
    /// literal `k`'s canonical value, or None (not read: a string that starts with a digit
    /// and is no canonical integer, say). As in a scan of the text, the first equality of a
    /// column whose value is read is the column's pair (see [`fresh`]).
    pub(super) fn bind_literals(&self, value: impl Fn(u16, bool) -> Option<Value>) -> Footprint {
        self.resolve(
            |v| matches!(v, Value::Lit(..)),
            |v| match v {
                Value::Lit(k, negative) => value(k, negative),
                v => Some(v),
            },
        )
    }

    /// The footprint with the values `unbound` picks out resolved by `value` (None: unknown,
    /// the pair goes). Pairs are sorted by column (stably: in text order within one), and
    /// the first one left per column stays.
    fn resolve(
        &self,
        unbound: impl Fn(Value) -> bool,
        value: impl Fn(Value) -> Option<Value>,
    ) -> Footprint {
        if !self
            .probes
            .iter()
            .any(|p| p.pairs.iter().any(|&(_, v)| unbound(v)))
        {
            return self.clone();
        }
        // One probe (most statements that name rows): one allocation for the shared
        // slice, where collecting into a vector first cost a second and a copy.
        if let [one] = &*self.probes {
            let probes: Arc<[Probe]> = match resolve_probe(one, &unbound, &value) {
                Some(probe) => Arc::from([probe]),
                None => Arc::from([]),
            };
            return Footprint {
                lanes: self.lanes.clone(),
                probes,
                write: self.write,
                wild: self.wild,
                ends: self.ends,
            };
        }
        let mut probes: Vec<Probe> = Vec::with_capacity(self.probes.len());
        let mut whole: Vec<u64> = Vec::new();
        for probe in self.probes.iter() {
            match resolve_probe(probe, &unbound, &value) {
                Some(probe) => probes.push(probe),
                None => whole.push(probe.lane),
            }
        }
        probes.retain(|p| !whole.contains(&p.lane));
        Footprint {
            lanes: self.lanes.clone(),
            probes: probes.into(),
            write: self.write,
            wild: self.wild,
            ends: self.ends,
        }
    }
}

/// `probe` with the values `unbound` picks out resolved by `value` (see
/// [`Footprint::resolve`]); None when no pair is left (its relation is touched whole).
fn resolve_probe(
    probe: &Probe,
    unbound: &impl Fn(Value) -> bool,
    value: &impl Fn(Value) -> Option<Value>,
) -> Option<Probe> {
    if !probe.pairs.iter().any(|&(_, v)| unbound(v)) {
        return Some(probe.clone());
    }
    // Resolved on the stack when few (most probes have one or two pairs): the shared slice
    // is then the one allocation.
    let mut small = [(0u64, Value::Int(0)); PAIRS_ON_STACK];
    let mut many: Vec<(u64, Value)> = Vec::new();
    let mut n = 0;
    for &(c, v) in probe.pairs.iter() {
        let Some(v) = value(v) else {
            continue;
        };
        let seen = if many.is_empty() {
            &small[..n]
        } else {
            &many[..]
        };
        if seen.iter().any(|(k, _)| *k == c) {
            continue;
        }
        if n < PAIRS_ON_STACK {
            small[n] = (c, v);
            n += 1;
        } else {
            if many.is_empty() {
                many.extend_from_slice(&small);
            }
            many.push((c, v));
        }
    }
    let pairs: &[(u64, Value)] = if many.is_empty() { &small[..n] } else { &many };
    (!pairs.is_empty()).then(|| Probe {
        lane: probe.lane,
        pairs: pairs.into(),
    })
}

/// What the scan found in one statement.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub footprint: Footprint,
    /// Its result may differ between two servers whatever the order: why, for the report.
    pub nondeterministic: Option<&'static str>,
}

/// Functions whose result depends on the moment, chance or the server (called with `(`).
const VOLATILE_CALLS: &[(&str, &str)] = &[
    ("now", "now()"),
    ("clock_timestamp", "clock_timestamp()"),
    ("statement_timestamp", "statement_timestamp()"),
    ("transaction_timestamp", "transaction_timestamp()"),
    ("timeofday", "timeofday()"),
    ("random", "random()"),
    ("random_normal", "random_normal()"),
    ("gen_random_uuid", "gen_random_uuid()"),
    ("uuid_generate_v1", "uuid_generate_v1()"),
    ("uuid_generate_v4", "uuid_generate_v4()"),
    ("nextval", "a sequence (nextval)"),
    ("currval", "a sequence (currval)"),
    ("lastval", "a sequence (lastval)"),
    ("setval", "a sequence (setval)"),
    ("version", "version()"),
    ("pg_backend_pid", "a backend pid"),
    ("pg_terminate_backend", "a backend pid"),
    ("pg_cancel_backend", "a backend pid"),
    ("pg_blocking_pids", "backend pids"),
    ("txid_current", "a transaction id"),
    ("txid_current_if_assigned", "a transaction id"),
    ("pg_current_xact_id", "a transaction id"),
    ("pg_current_xact_id_if_assigned", "a transaction id"),
    ("txid_current_snapshot", "a snapshot"),
    ("pg_current_snapshot", "a snapshot"),
    ("pg_current_wal_lsn", "a WAL position"),
    ("pg_current_wal_insert_lsn", "a WAL position"),
    ("pg_current_wal_flush_lsn", "a WAL position"),
    ("inet_server_port", "the server's address"),
    ("inet_server_addr", "the server's address"),
    ("inet_client_port", "the client's address"),
    ("inet_client_addr", "the client's address"),
    ("pg_postmaster_start_time", "the server's start time"),
    ("pg_conf_load_time", "the server's configuration time"),
    ("pg_relation_filenode", "a file node"),
    ("pg_relation_filepath", "a file path"),
    ("pg_relation_size", "a relation size"),
    ("pg_total_relation_size", "a relation size"),
    ("pg_table_size", "a relation size"),
    ("pg_indexes_size", "a relation size"),
    ("pg_database_size", "a database size"),
];

/// Words that name something only one server has (its clock, its catalog's OIDs, its
/// backends), whatever precedes them.
const LOCAL_WORDS: &[(&str, &str)] = &[
    ("current_timestamp", "current_timestamp"),
    ("localtimestamp", "localtimestamp"),
    ("current_time", "current_time"),
    ("localtime", "localtime"),
    ("pg_stat_activity", "pg_stat_activity"),
    ("pg_locks", "pg_locks"),
    ("pg_prepared_statements", "pg_prepared_statements"),
    ("pg_prepared_xacts", "pg_prepared_xacts"),
    ("pg_stat_statements", "pg_stat_statements"),
    ("pg_cursors", "pg_cursors"),
    ("regclass", "an OID (regclass)"),
    ("regtype", "an OID (regtype)"),
    ("regproc", "an OID (regproc)"),
    ("regprocedure", "an OID (regprocedure)"),
    ("regnamespace", "an OID (regnamespace)"),
    ("oid", "an OID"),
    ("tableoid", "an OID (tableoid)"),
    ("ctid", "a tuple position (ctid)"),
    ("xmin", "a transaction id (xmin)"),
    ("xmax", "a transaction id (xmax)"),
    ("tablesample", "TABLESAMPLE"),
];

/// For each first letter (folded, `& 31`), a bit per length (63: longer) of the words in
/// `words`: a word whose bit is clear is none of them. Most words of a statement (its
/// keywords, table and column names) are ruled out by this one look-up instead of a
/// comparison with each of the ~65 names below (about 2,000 instructions per `-S` query).
const fn first_letter_lengths(words: &[(&str, &str)]) -> [u64; 32] {
    let mut table = [0u64; 32];
    let mut i = 0;
    while i < words.len() {
        let w = words[i].0.as_bytes();
        let len = if w.len() > 63 { 63 } else { w.len() };
        table[(w[0].to_ascii_lowercase() & 31) as usize] |= 1 << len;
        i += 1;
    }
    table
}

const VOLATILE_SHAPES: [u64; 32] = first_letter_lengths(VOLATILE_CALLS);
const LOCAL_SHAPES: [u64; 32] = first_letter_lengths(LOCAL_WORDS);

/// Whether `word` may be one of the words `shapes` was made of (see
/// [`first_letter_lengths`]).
fn may_be(shapes: &[u64; 32], word: &[u8]) -> bool {
    word.first().is_some_and(|&b| {
        shapes[usize::from(b.to_ascii_lowercase() & 31)] & (1 << word.len().min(63)) != 0
    })
}

/// One token of the scan.
#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted word, as written.
    Word(&'a [u8]),
    /// A quoted identifier, without its quotes.
    Quoted(&'a [u8]),
    Punct(u8),
    /// A plain string literal, without its quotes (a doubled quote still doubled).
    Str(&'a [u8]),
    /// A bare number, as written.
    Num(&'a [u8]),
    /// Parameter `$n`.
    Param(u16),
    /// A literal whose value the scan does not read (a prefixed or dollar-quoted string).
    Opaque,
}

/// The tokens of `sql`, stepping over comments.
fn tokens(sql: &[u8]) -> impl Iterator<Item = Token<'_>> {
    let mut i = 0usize;
    std::iter::from_fn(move || {
        while i < sql.len() {
            let c = sql[i];
            match c {
                b'\'' => {
                    let start = i;
                    i = crate::sql::skip_quoted(sql, i);
                    // E'..', B'..', X'..', U&'..' and N'..' read otherwise: not read.
                    let prefixed = start > 0
                        && (sql[start - 1].is_ascii_alphanumeric()
                            || sql[start - 1] == b'_'
                            || sql[start - 1] == b'&');
                    let inner = sql.get(start + 1..i.saturating_sub(1).max(start + 1));
                    return Some(match inner {
                        Some(inner) if !prefixed && i > start + 1 && sql[i - 1] == b'\'' => {
                            Token::Str(inner)
                        }
                        _ => Token::Opaque,
                    });
                }
                b'"' => {
                    let end = crate::sql::skip_quoted(sql, i);
                    let inner = &sql[i + 1..end.saturating_sub(1).max(i + 1)];
                    i = end;
                    return Some(Token::Quoted(inner));
                }
                b'-' if sql.get(i + 1) == Some(&b'-') => {
                    // Ends at `\n` or `\r`, as PostgreSQL's scanner ends it.
                    i = memchr::memchr2(b'\n', b'\r', &sql[i..]).map_or(sql.len(), |n| i + n + 1);
                }
                b'/' if sql.get(i + 1) == Some(&b'*') => i = crate::sql::skip_block_comment(sql, i),
                b'$' => match dollar_tag(sql, i) {
                    Some(tag_end) => {
                        let tag = &sql[i..tag_end];
                        i = memchr::memmem::find(&sql[tag_end..], tag)
                            .map_or(sql.len(), |n| tag_end + n + tag.len());
                        return Some(Token::Opaque);
                    }
                    None => {
                        let start = i + 1;
                        i = start;
                        while i < sql.len() && sql[i].is_ascii_digit() {
                            i += 1;
                        }
                        if i == start {
                            return Some(Token::Punct(b'$'));
                        }
                        let n = std::str::from_utf8(&sql[start..i])
                            .ok()
                            .and_then(|d| d.parse::<u16>().ok());
                        return Some(n.map_or(Token::Opaque, Token::Param));
                    }
                },
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let start = i;
                    while i < sql.len()
                        && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_' || sql[i] >= 0x80)
                    {
                        i += 1;
                    }
                    return Some(Token::Word(&sql[start..i]));
                }
                b'0'..=b'9' => {
                    let start = i;
                    while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.') {
                        i += 1;
                    }
                    return Some(Token::Num(&sql[start..i]));
                }
                c if c.is_ascii_whitespace() => i += 1,
                c => {
                    i += 1;
                    return Some(Token::Punct(c));
                }
            }
        }
        None
    })
}

/// The end of a dollar-quote opening tag (`$$` or `$tag$`) at `i`, if one is there.
fn dollar_tag(sql: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < sql.len() && (sql[j].is_ascii_alphanumeric() || sql[j] == b'_') {
        if j == i + 1 && sql[j].is_ascii_digit() {
            return None; // `$1`: a parameter
        }
        j += 1;
    }
    (sql.get(j) == Some(&b'$')).then_some(j + 1)
}

fn lane(name: &[u8], quoted: bool) -> u64 {
    // FNV-1a over the folded name: stable, cheap, and a collision only costs parallelism.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        let b = if quoted { b } else { b.to_ascii_lowercase() };
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.eq_ignore_ascii_case(word.as_bytes()))
}

/// Words after which a relation name follows.
const BEFORE_RELATION: &[&str] = &["from", "join", "update", "into", "table", "truncate"];
/// Words that may sit between such a word and the name.
const NOT_NAMES: &[&str] = &["only", "lateral", "if", "exists", "not"];
/// Words that end a FROM list item's alias position (never an alias).
const CLAUSES: &[&str] = &[
    "where",
    "join",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "on",
    "using",
    "group",
    "order",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "except",
    "intersect",
    "window",
    "having",
    "set",
    "values",
    "select",
    "returning",
    "default",
    "as",
];

/// Scans one statement of class `class`.
pub fn scan(text: &str, class: sql::Class) -> Scan {
    scan_with(text, class, None)
}

/// The masked literals of a statement shape (see [`super::shape`]): where each starts in
/// the text (a string's after its opening quote), in text order. A scan given them reads
/// such a literal as [`Value::Lit`] instead of its value: what it finds then holds for
/// every text of the shape.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lits<'a> {
    /// The address of the text's first byte.
    pub base: usize,
    pub starts: &'a [u32],
}

impl Lits<'_> {
    /// The number of the masked literal whose bytes are `bytes` (a slice of the text).
    fn index(&self, bytes: &[u8]) -> Option<u16> {
        let at = (bytes.as_ptr() as usize).checked_sub(self.base)?;
        let at = u32::try_from(at).ok()?;
        let k = self.starts.binary_search(&at).ok()?;
        u16::try_from(k).ok()
    }
}

/// [`scan`], reading the masked literals `lits` as [`Value::Lit`] (the shape of a
/// statement) or, without them, every literal as its value.
pub(super) fn scan_with(text: &str, class: sql::Class, lits: Option<&Lits>) -> Scan {
    let sql = text.as_bytes();
    // Sized once for short statements (a token takes about two bytes of text or more):
    // collected from an iterator without a size hint, the vector grew four or five times
    // per statement. Long texts grow from there.
    let mut all: Vec<Token> = Vec::with_capacity((sql.len() / 2 + 1).min(256));
    all.extend(tokens(sql));
    let mut lanes = Vec::new();
    let mut nondeterministic = None;
    let mut locks_rows = false;
    let mut limit = false;
    for (i, token) in all.iter().enumerate() {
        let Token::Word(w) = token else {
            continue;
        };
        let next_is_call = matches!(all.get(i + 1), Some(Token::Punct(b'(')));
        let local = may_be(&LOCAL_SHAPES, w)
            .then(|| {
                LOCAL_WORDS
                    .iter()
                    .find(|(name, _)| w.eq_ignore_ascii_case(name.as_bytes()))
            })
            .flatten();
        let call = (next_is_call && may_be(&VOLATILE_SHAPES, w))
            .then(|| {
                VOLATILE_CALLS
                    .iter()
                    .find(|(name, _)| w.eq_ignore_ascii_case(name.as_bytes()))
            })
            .flatten();
        if let Some((_, why)) = call.or(local) {
            nondeterministic = Some(*why);
            break;
        }
    }
    let mut i = 0;
    while i < all.len() {
        let token = &all[i];
        if let Token::Word(w) = token {
            if w.eq_ignore_ascii_case(b"limit") || w.eq_ignore_ascii_case(b"fetch") {
                limit = true;
            }
            if w.eq_ignore_ascii_case(b"for")
                && all.get(i + 1).is_some_and(|t| {
                    ["update", "share", "no", "key"]
                        .iter()
                        .any(|k| is_word(t, k))
                })
            {
                locks_rows = true;
            }
            // DELETE ... USING names relations too (JOIN ... USING is followed by a
            // parenthesis).
            let using = w.eq_ignore_ascii_case(b"using")
                && !matches!(all.get(i + 1), Some(Token::Punct(b'(')));
            if using
                || BEFORE_RELATION
                    .iter()
                    .any(|b| w.eq_ignore_ascii_case(b.as_bytes()))
            {
                i = relation_list(&all, i + 1, &mut lanes);
                continue;
            }
        }
        i += 1;
    }
    if nondeterministic.is_none() && limit && !sql::has_top_level_order_by(sql) {
        nondeterministic = Some("LIMIT without ORDER BY");
    }
    let references = lanes.len();
    lanes.sort_unstable();
    lanes.dedup();
    // Rows only for a statement naming one relation once (a join's rows are not one key's).
    let rows = |lanes: &[u64]| match (references, lanes) {
        (1, [lane]) if matches!(class, sql::Class::Select | sql::Class::Dml) => {
            probes(&all, *lane, lits)
        }
        _ => Vec::new(),
    };
    let footprint = match class {
        sql::Class::Select => Footprint {
            probes: rows(&lanes).into(),
            lanes: lanes.into(),
            write: locks_rows,
            wild: false,
            ends: false,
        },
        sql::Class::Dml => {
            let first = all.first();
            if first.is_some_and(|t| is_word(t, "call") || is_word(t, "do")) {
                Footprint::wild()
            } else {
                Footprint {
                    probes: rows(&lanes).into(),
                    lanes: lanes.into(),
                    write: true,
                    wild: false,
                    ends: false,
                }
            }
        }
        sql::Class::Session | sql::Class::Transaction | sql::Class::Empty => Footprint::default(),
        sql::Class::Ddl | sql::Class::Other => Footprint::wild(),
    };
    Scan {
        footprint,
        nondeterministic,
    }
}

/// The canonical value of a string literal's or a text parameter's bytes (a literal still
/// with its doubled quotes: `quoted`), or None when the scan cannot be sure of one spelling
/// per value: a string that starts with a digit but is no canonical integer (`03`, `3.0`,
/// `1e3`, a date, an interval), one with a backslash (an escape with
/// `standard_conforming_strings` off), or text not in UTF-8.
pub fn text_value(bytes: &[u8], quoted: bool) -> Option<Value> {
    if let Some(n) = canonical_int(bytes) {
        return Some(Value::Int(n));
    }
    if bytes.contains(&b'\\') || std::str::from_utf8(bytes).is_err() {
        return None;
    }
    let mut folded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        if quoted && b == b'\'' {
            // The second quote of a doubled one.
            i += usize::from(bytes.get(i) == Some(&b'\''));
        }
        // Spellings one type reads as the same value fold to one: case (uuid, citext in
        // ASCII, booleans), blanks (bpchar, numbers), a uuid's hyphens and braces.
        if !(b.is_ascii_whitespace() || b == b'-' || b == b'{' || b == b'}') {
            folded.push(b.to_ascii_lowercase());
        }
    }
    if folded
        .first()
        .is_some_and(|b| b.is_ascii_digit() || *b == b'+' || *b == b'.')
        && !(folded.len() == 32 && folded.iter().all(u8::is_ascii_hexdigit))
    {
        return None;
    }
    // Every spelling of a boolean (its unique prefixes included) is one of two values.
    let boolean =
        |word: &str, short: usize| folded.len() >= short && word.as_bytes().starts_with(&folded);
    if boolean("true", 1) || boolean("yes", 1) || folded == b"on" {
        folded = b"true".to_vec();
    } else if boolean("false", 1) || boolean("no", 1) || boolean("off", 2) {
        folded = b"false".to_vec();
    }
    Some(Value::Text(lane(&folded, true)))
}

/// A binary parameter's canonical value: its bytes, of its length.
pub fn binary_value(bytes: &[u8]) -> Value {
    Value::Bytes(
        u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        lane(bytes, true),
    )
}

/// `-?[1-9][0-9]{0,14}` or `0`: the one spelling of an integer every type that reads it
/// (integers, numeric, floats, text) takes for a value of its own.
fn canonical_int(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    let ok = match digits {
        [b'0'] => !negative,
        [first, ..] => {
            *first != b'0' && digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit)
        }
        [] => false,
    };
    if !ok {
        return None;
    }
    let n: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if negative { -n } else { n })
}

/// A bare number's value: an integer of at most 15 digits (leading zeros are no other
/// spelling of a number written bare); anything with a point or exponent is not read.
pub(super) fn number_value(digits: &[u8], negative: bool) -> Option<Value> {
    let trimmed = match digits.iter().position(|&b| b != b'0') {
        Some(at) => &digits[at..],
        None if !digits.is_empty() => b"0".as_slice(),
        None => return None,
    };
    if trimmed.len() > 15 || !trimmed.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 15 digits: no overflow (a UTF-8 check and `parse` cost about 100
    // instructions more per number, callgrind).
    let n = trimmed
        .iter()
        .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
    Some(Value::Int(if negative { -n } else { n }))
}

/// The value at `at` (a literal, a parameter, or a minus and a number) and the index after
/// it; a literal `lits` masks is read as [`Value::Lit`].
fn value_at(all: &[Token], at: usize, lits: Option<&Lits>) -> Option<(Value, usize)> {
    let masked = |bytes: &[u8], negative: bool| {
        lits.and_then(|l| l.index(bytes))
            .map(|k| Value::Lit(k, negative))
    };
    match all.get(at)? {
        Token::Str(s) => Some((masked(s, false).or_else(|| text_value(s, true))?, at + 1)),
        Token::Num(n) => Some((masked(n, false).or_else(|| number_value(n, false))?, at + 1)),
        Token::Param(n) => Some((Value::Param(*n), at + 1)),
        Token::Punct(b'-') => match all.get(at + 1)? {
            Token::Num(n) => Some((masked(n, true).or_else(|| number_value(n, true))?, at + 2)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether an equality of `column` is one more pair: not when the column has one already,
/// unless all it has are literals of a shape, whose values may turn out not to be read when
/// bound (a scan of the text then takes the next equality of the column; so does the
/// binding, which keeps the first pair it reads per column).
fn fresh(pairs: &[(u64, Value)], column: u64) -> bool {
    !pairs
        .iter()
        .any(|(c, v)| *c == column && !matches!(v, Value::Lit(..)))
}

/// A column name at `at` (possibly qualified: its last part) and the index after it.
fn column_at(all: &[Token], at: usize) -> Option<(u64, usize)> {
    let (name, quoted, end) = qualified_name(all, at)?;
    if !quoted
        && ["true", "false", "null", "default"]
            .iter()
            .any(|w| name.eq_ignore_ascii_case(w.as_bytes()))
    {
        return None;
    }
    Some((lane(name, quoted), end))
}

/// Functions that read no relation and so cannot widen what a statement touches.
const PLAIN_CALLS: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "abs",
    "lower",
    "upper",
    "length",
    "char_length",
    "round",
    "trunc",
    "floor",
    "ceil",
    "ceiling",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "substr",
    "substring",
    "concat",
    "cast",
    "now",
];
/// Words a `(` may follow without being a call.
const BEFORE_PAREN: &[&str] = &[
    "in",
    "values",
    "and",
    "or",
    "not",
    "where",
    "set",
    "on",
    "when",
    "then",
    "else",
    "any",
    "all",
    "is",
    "as",
    "by",
    "using",
    "select",
    "row",
    "distinct",
    "returning",
];

/// Whether `all` calls a function that may read rows the text does not name.
fn calls(all: &[Token]) -> bool {
    all.windows(2).any(|w| match (&w[0], &w[1]) {
        (Token::Word(name), Token::Punct(b'(')) => !PLAIN_CALLS
            .iter()
            .chain(BEFORE_PAREN)
            .any(|k| name.eq_ignore_ascii_case(k.as_bytes())),
        (Token::Quoted(_), Token::Punct(b'(')) => true,
        _ => false,
    })
}

/// Words that end a WHERE clause's conjunction.
const AFTER_WHERE: &[&str] = &[
    "order",
    "group",
    "limit",
    "offset",
    "fetch",
    "for",
    "returning",
    "having",
    "window",
];

/// The rows of relation `lane` a statement of one relation reference touches, when its text
/// says so with certainty (see [`Probe`]); empty otherwise (the relation whole).
fn probes(all: &[Token], relation: u64, lits: Option<&Lits>) -> Vec<Probe> {
    let Some(Token::Word(first)) = all.first() else {
        return Vec::new();
    };
    let select = first.eq_ignore_ascii_case(b"select");
    let update = first.eq_ignore_ascii_case(b"update");
    let delete = first.eq_ignore_ascii_case(b"delete");
    if first.eq_ignore_ascii_case(b"insert") {
        return insert_probes(all, relation, lits);
    }
    if !(select || update || delete) {
        return Vec::new();
    }
    // A subquery, a set operation or a CTE reads more than the WHERE says.
    let selects = all.iter().filter(|t| is_word(t, "select")).count();
    if selects != usize::from(select)
        || all.iter().any(|t| {
            ["with", "union", "intersect", "except"]
                .iter()
                .any(|w| is_word(t, w))
        })
        || calls(all)
    {
        return Vec::new();
    }
    let mut depth = 0i32;
    let mut where_at = None;
    let mut assigned: Vec<u64> = Vec::new();
    let mut in_set = false;
    for (i, t) in all.iter().enumerate() {
        match t {
            Token::Punct(b'(' | b'[') => depth += 1,
            Token::Punct(b')' | b']') => depth -= 1,
            _ if depth != 0 => {}
            _ if is_word(t, "where") => {
                where_at = Some(i);
                break;
            }
            _ if update && is_word(t, "set") => in_set = true,
            _ if in_set && (is_word(t, "from") || is_word(t, "returning")) => in_set = false,
            _ => {}
        }
        // UPDATE's targets: the name after SET or a comma (a row of targets is not read).
        if in_set && depth == 0 && (is_word(t, "set") || matches!(t, Token::Punct(b','))) {
            match all.get(i + 1) {
                Some(Token::Punct(b'(')) => return Vec::new(),
                Some(Token::Word(w)) => assigned.push(lane(w, false)),
                Some(Token::Quoted(q)) => assigned.push(lane(q, true)),
                _ => {}
            }
        }
    }
    let Some(where_at) = where_at else {
        return Vec::new();
    };
    let mut pairs: Vec<(u64, Value)> = Vec::new();
    let mut depth = 0i32;
    let mut start = where_at + 1;
    let mut i = start;
    loop {
        let t = all.get(i);
        let end = match t {
            None | Some(Token::Punct(b';')) => true,
            Some(t) if depth == 0 => AFTER_WHERE.iter().any(|w| is_word(t, w)),
            _ => false,
        };
        if end || (depth == 0 && t.is_some_and(|t| is_word(t, "and"))) {
            if let Some((column, value)) = equality(&all[start..i], lits)
                && fresh(&pairs, column)
            {
                pairs.push((column, value));
            }
            if end {
                break;
            }
            start = i + 1;
        }
        match t {
            Some(Token::Punct(b'(' | b'[')) => depth += 1,
            Some(Token::Punct(b')' | b']')) => depth -= 1,
            // Not a conjunction (and BETWEEN's AND is not one).
            Some(t) if depth == 0 && (is_word(t, "or") || is_word(t, "between")) => {
                return Vec::new();
            }
            _ => {}
        }
        i += 1;
    }
    // An UPDATE that moves rows out of the key (or into another) touches more than it says.
    // (With a shape's literals, a pair whose value turns out not to be read counts too: a
    // wider footprint than the text's own scan, in that rare case, never a narrower one.)
    if pairs.is_empty() || pairs.iter().any(|(c, _)| assigned.contains(c)) {
        return Vec::new();
    }
    // Stable: a shape's pairs of one column stay in text order (see `fresh`).
    pairs.sort_by_key(|(c, _)| *c);
    vec![Probe {
        lane: relation,
        pairs: pairs.into(),
    }]
}

/// `column = value` or `value = column`, the whole of one conjunct.
fn equality(conjunct: &[Token], lits: Option<&Lits>) -> Option<(u64, Value)> {
    if let Some((column, at)) = column_at(conjunct, 0)
        && conjunct.get(at) == Some(&Token::Punct(b'='))
        && let Some((value, end)) = value_at(conjunct, at + 1, lits)
        && end == conjunct.len()
    {
        return Some((column, value));
    }
    let (value, at) = value_at(conjunct, 0, lits)?;
    if conjunct.get(at) != Some(&Token::Punct(b'=')) {
        return None;
    }
    let (column, end) = column_at(conjunct, at + 1)?;
    (end == conjunct.len()).then_some((column, value))
}

/// The rows an `INSERT INTO t (columns) VALUES (...), ...` writes: one probe per row, of the
/// columns given a plain value. Anything else (a SELECT, ON CONFLICT, DEFAULT VALUES, no
/// column list, an expression with parentheses) is not read.
fn insert_probes(all: &[Token], relation: u64, lits: Option<&Lits>) -> Vec<Probe> {
    let mut at = 1;
    if !all.get(at).is_some_and(|t| is_word(t, "into")) {
        return Vec::new();
    }
    let Some((_, _, end)) = qualified_name(all, at + 1) else {
        return Vec::new();
    };
    at = end;
    if all.get(at).is_some_and(|t| is_word(t, "as")) {
        at += 2;
    }
    if all.get(at) != Some(&Token::Punct(b'(')) {
        return Vec::new();
    }
    let mut columns: Vec<u64> = Vec::new();
    at += 1;
    loop {
        match all.get(at) {
            Some(Token::Word(w)) => columns.push(lane(w, false)),
            Some(Token::Quoted(q)) => columns.push(lane(q, true)),
            _ => return Vec::new(),
        }
        match all.get(at + 1) {
            Some(Token::Punct(b',')) => at += 2,
            Some(Token::Punct(b')')) => {
                at += 2;
                break;
            }
            _ => return Vec::new(),
        }
    }
    if !all.get(at).is_some_and(|t| is_word(t, "values")) {
        return Vec::new();
    }
    at += 1;
    let mut probes = Vec::new();
    loop {
        if all.get(at) != Some(&Token::Punct(b'(')) {
            return Vec::new();
        }
        at += 1;
        let mut pairs: Vec<(u64, Value)> = Vec::new();
        for (k, &column) in columns.iter().enumerate() {
            let start = at;
            while !matches!(all.get(at), None | Some(Token::Punct(b',' | b')' | b'('))) {
                at += 1;
            }
            let closes = k + 1 == columns.len();
            match all.get(at) {
                Some(Token::Punct(b',')) if !closes => {}
                Some(Token::Punct(b')')) if closes => {}
                _ => return Vec::new(),
            }
            if let Some((value, end)) = value_at(all, start, lits)
                && end == at
                && fresh(&pairs, column)
            {
                pairs.push((column, value));
            }
            at += 1;
        }
        if pairs.is_empty() || probes.len() == PROBES_MAX {
            return Vec::new();
        }
        pairs.sort_by_key(|(c, _)| *c);
        probes.push(Probe {
            lane: relation,
            pairs: pairs.into(),
        });
        match all.get(at) {
            Some(Token::Punct(b',')) => at += 1,
            None | Some(Token::Punct(b';')) => return probes,
            Some(t) if is_word(t, "returning") => {
                return if calls(&all[at..]) || all[at..].iter().any(|t| is_word(t, "select")) {
                    Vec::new()
                } else {
                    probes
                };
            }
            _ => return Vec::new(),
        }
    }
}

/// Reads relation names from `at` on (a comma list, each with an optional alias); returns
/// where the scan goes on.
fn relation_list(all: &[Token], mut at: usize, lanes: &mut Vec<u64>) -> usize {
    loop {
        while all
            .get(at)
            .is_some_and(|t| NOT_NAMES.iter().any(|w| is_word(t, w)))
        {
            at += 1;
        }
        let Some((name, quoted, end)) = qualified_name(all, at) else {
            return at;
        };
        if !quoted
            && CLAUSES
                .iter()
                .any(|w| name.eq_ignore_ascii_case(w.as_bytes()))
        {
            return at;
        }
        lanes.push(lane(name, quoted));
        at = end;
        // An alias, with or without AS.
        if all.get(at).is_some_and(|t| is_word(t, "as")) {
            at += 1;
        }
        match all.get(at) {
            Some(Token::Word(w))
                if !CLAUSES.iter().any(|c| w.eq_ignore_ascii_case(c.as_bytes())) =>
            {
                at += 1
            }
            Some(Token::Quoted(_)) => at += 1,
            _ => {}
        }
        if matches!(all.get(at), Some(Token::Punct(b','))) {
            at += 1;
            continue;
        }
        return at;
    }
}

/// A possibly schema-qualified name at `at`: its last part, whether quoted, and the index
/// after it.
fn qualified_name<'a>(all: &[Token<'a>], mut at: usize) -> Option<(&'a [u8], bool, usize)> {
    let mut last = None;
    loop {
        let part = match all.get(at)? {
            Token::Word(w) => (*w, false),
            Token::Quoted(q) => (*q, true),
            _ => return last.map(|(n, q)| (n, q, at)),
        };
        last = Some(part);
        at += 1;
        if matches!(all.get(at), Some(Token::Punct(b'.'))) {
            at += 1;
            continue;
        }
        return last.map(|(n, q)| (n, q, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(text: &str) -> Footprint {
        scan(text, sql::classify(text.as_bytes())).footprint
    }

    #[test]
    fn relations_and_writes_are_read_from_the_text() {
        let update = fp("UPDATE hot SET v = v + 1 WHERE id = 3");
        let select = fp("SELECT v FROM hot WHERE id = 3");
        let other = fp("SELECT v FROM public.cold c WHERE id = 3");
        assert!(update.write && !select.write);
        assert_eq!(update.lanes, select.lanes);
        assert!(update.conflicts(&select));
        assert!(!select.conflicts(&select));
        assert!(!other.conflicts(&update));
        let join = fp("SELECT * FROM a x, \"B\" AS y JOIN c ON true WHERE 1 = 1");
        assert_eq!(join.lanes.len(), 3);
        assert!(fp("SELECT 1 FROM hot FOR UPDATE").write);
        assert!(fp("INSERT INTO pgbench_history (tid) VALUES (1)").write);
        assert!(fp("CREATE TABLE t (a int)").wild);
        assert!(fp("CALL p()").wild);
        assert!(fp("BEGIN").is_empty() && fp("SET x = 1").is_empty());
        // A name in a literal or a comment is no relation.
        assert!(fp("SELECT 'from hot' -- from hot\n").is_empty());
    }

    /// The rows `text` touches of its one relation, with parameters bound to `params`
    /// (text format).
    fn rows(text: &str, params: &[&str]) -> Vec<Vec<(u64, Value)>> {
        let f = fp(text).bind(|n| {
            params
                .get(usize::from(n) - 1)
                .and_then(|v| text_value(v.as_bytes(), false))
        });
        f.probes.iter().map(|p| p.pairs.to_vec()).collect()
    }

    fn col(name: &str) -> u64 {
        lane(name.as_bytes(), false)
    }

    #[test]
    fn rows_are_read_from_equalities_in_a_top_level_conjunction() {
        let id3 = vec![vec![(col("id"), Value::Int(3))]];
        assert_eq!(rows("SELECT v FROM hot WHERE id = 3", &[]), id3);
        assert_eq!(rows("UPDATE hot SET v = v + 1 WHERE id = $1", &["3"]), id3);
        assert_eq!(rows("SELECT v FROM hot h WHERE h.id = '3'", &[]), id3);
        assert_eq!(
            rows("DELETE FROM hot WHERE 3 = \"id\" RETURNING v", &[]),
            id3
        );
        assert_eq!(
            rows("SELECT v FROM hot WHERE id = 3 AND v > 0 FOR UPDATE", &[]),
            id3
        );
        assert_eq!(
            rows(
                "SELECT count(*) FROM hot WHERE (v > 0 OR v < 0) AND id = 03",
                &[]
            ),
            id3
        );
        let two = rows("SELECT * FROM t WHERE b = -2 AND a = 'x'", &[]);
        assert_eq!(two[0].len(), 2);
        // What is not read with certainty touches the whole relation.
        for whole in [
            "SELECT v FROM hot",
            "SELECT v FROM hot WHERE id = 3 OR id = 4",
            "SELECT v FROM hot WHERE id BETWEEN 1 AND 3",
            "SELECT v FROM hot WHERE id = (SELECT max(id) FROM cold)",
            "SELECT v FROM hot WHERE id = f(3)",
            "SELECT f(v) FROM hot WHERE id = 3",
            "SELECT v FROM hot a JOIN hot b USING (id) WHERE a.id = 3",
            "SELECT v FROM hot, cold WHERE hot.id = 3",
            "WITH x AS (SELECT 1) SELECT v FROM hot WHERE id = 3",
            "UPDATE hot SET id = 4 WHERE id = 3",
            "UPDATE hot SET (id, v) = (4, 0) WHERE id = 3",
            "UPDATE hot SET v = 1 FROM cold WHERE hot.id = 3",
            "DELETE FROM hot USING cold WHERE hot.id = 3",
            "SELECT v FROM hot WHERE id = 3.0",
            "SELECT v FROM hot WHERE id = E'3'",
            "SELECT v FROM hot WHERE id = '2024-01-01'",
            "SELECT v FROM hot WHERE id >= 3",
            "SELECT v FROM hot WHERE id = $1",
        ] {
            assert_eq!(rows(whole, &[]), Vec::<Vec<_>>::new(), "{whole}");
        }
        // DELETE ... USING names its other relations.
        assert_eq!(
            fp("DELETE FROM hot USING cold WHERE hot.id = cold.id")
                .lanes
                .len(),
            2
        );
    }

    #[test]
    fn inserts_name_the_rows_they_write() {
        let r = rows(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            &["1", "2", "3", "-5"],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len(), 4);
        assert_eq!(rows("INSERT INTO t (a) VALUES (1), (2)", &[]).len(), 2);
        for whole in [
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t (a) SELECT 1",
            "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2",
            "INSERT INTO t (a) VALUES (f(1))",
            "INSERT INTO t (a, b) VALUES (1)",
            "INSERT INTO t DEFAULT VALUES",
        ] {
            assert_eq!(rows(whole, &[]), Vec::<Vec<_>>::new(), "{whole}");
        }
    }

    #[test]
    fn values_of_one_row_spelled_apart_are_never_different_rows() {
        let v = |s: &str| text_value(s.as_bytes(), false);
        let differ = |a: &str, b: &str| match (v(a), v(b)) {
            (Some(a), Some(b)) => a.differs(b),
            _ => false,
        };
        assert_eq!(v("42"), Some(Value::Int(42)));
        assert_eq!(v("-42"), Some(Value::Int(-42)));
        for (a, b) in [
            ("3", "03"),
            ("3", " 3"),
            ("3", "3.0"),
            ("t", "true"),
            ("yes", "on"),
            ("f", "off"),
            ("ABC", "abc"),
            ("a ", "a"),
            (
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}",
            ),
            ("2024-01-01", "2024-1-1"),
            ("3", "x"),
        ] {
            assert!(!differ(a, b), "{a} and {b}");
        }
        assert!(differ("3", "4"));
        assert!(differ("alice", "bob"));
        assert!(binary_value(&[0, 0, 0, 3]).differs(binary_value(&[0, 0, 0, 4])));
        assert!(!binary_value(&[0, 0, 0, 3]).differs(binary_value(&[0, 0, 0, 0, 0, 0, 0, 3])));
        assert!(!binary_value(&[0, 0, 0, 3]).differs(Value::Int(4)));
    }

    #[test]
    fn conflicts_are_judged_by_row_for_a_read_and_a_write() {
        let update = fp("UPDATE hot SET v = v + 1 WHERE id = 3");
        let same = fp("SELECT v FROM hot WHERE id = 3");
        let other = fp("SELECT v FROM hot WHERE id = 4");
        let by_v = fp("SELECT id FROM hot WHERE v = 4");
        let whole = fp("SELECT v FROM hot");
        assert!(update.conflicts(&same) && !update.conflicts(&other));
        assert!(update.conflicts(&by_v) && update.conflicts(&whole));
        // Two writes of a relation conflict whatever their rows.
        assert!(update.conflicts(&fp("UPDATE hot SET v = 0 WHERE id = 4")));
        // A transaction's writes, joined, keep their rows; a whole relation absorbs them.
        let mut written = Footprint::default();
        written.join(&update);
        written.join(&fp("UPDATE hot SET v = 0 WHERE id = 5"));
        assert_eq!(written.probes.len(), 2);
        assert!(
            !written.conflicts(&other) && written.conflicts(&fp("SELECT v FROM hot WHERE id = 5"))
        );
        written.join(&fp("UPDATE cold SET v = 0"));
        assert_eq!(written.lanes.len(), 2);
        assert_eq!(written.probes.len(), 2);
        written.join(&fp("DELETE FROM hot"));
        assert!(written.probes.is_empty() && written.conflicts(&other));
    }

    #[test]
    fn the_first_letter_and_length_filter_lets_every_listed_word_through() {
        for (shapes, words) in [
            (&VOLATILE_SHAPES, VOLATILE_CALLS),
            (&LOCAL_SHAPES, LOCAL_WORDS),
        ] {
            for (word, _) in words {
                assert!(may_be(shapes, word.as_bytes()), "{word}");
                assert!(may_be(shapes, word.to_uppercase().as_bytes()), "{word}");
            }
        }
        // What it is for: the words of a plain query are ruled out without a comparison.
        for word in [
            "select", "from", "where", "abalance", "aid", "update", "set",
        ] {
            assert!(!may_be(&LOCAL_SHAPES, word.as_bytes()), "{word}");
        }
        assert!(!may_be(&VOLATILE_SHAPES, b""));
        assert!(!may_be(&LOCAL_SHAPES, b""));
    }

    #[test]
    fn nondeterministic_statements_are_named() {
        let why = |t: &str| scan(t, sql::classify(t.as_bytes())).nondeterministic;
        assert_eq!(why("SELECT now()"), Some("now()"));
        assert_eq!(
            why("select pid from pg_stat_activity"),
            Some("pg_stat_activity")
        );
        assert_eq!(why("SELECT 't1'::regclass::oid"), Some("an OID (regclass)"));
        assert_eq!(
            why("SELECT * FROM t LIMIT 1"),
            Some("LIMIT without ORDER BY")
        );
        assert_eq!(why("SELECT * FROM t ORDER BY id LIMIT 1"), None);
        assert_eq!(why("SELECT v FROM hot WHERE id = 1"), None);
        assert_eq!(why("SELECT 'now()'"), None);
        // A column that happens to be called like a function is no call.
        assert_eq!(why("SELECT random FROM t"), None);
    }
}
