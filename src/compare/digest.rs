//! Result digests: one side's answer to one statement folded, as it streams, into a fixed-size
//! summary (command tag, row count, columns, an ordered and an order-insensitive hash of the
//! rows, SQLSTATE) plus a bounded sample of rows for reports. A 10 GB result costs the same
//! memory as a one-row one. This module never allocates per row on the fast path (no
//! normalisation rules apply) and never fails: undecodable rows are hashed as raw bytes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use crate::wire::{self, Format, tag};

use super::rules::{ColumnRule, Rules};
use crate::sql::OrderKey;

const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;
const K2: u64 = 0x8ebc_6af0_9c88_c6e3;
const K3: u64 = 0x5899_65cc_7537_4cc3;

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let product = (a as u128).wrapping_mul(b as u128);
    (product as u64) ^ ((product >> 64) as u64)
}

#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A fast non-cryptographic 64-bit hash (wyhash-style folded multiplies over two independent
/// 16-byte lanes). Stable across runs and processes; not DoS-resistant, which is fine: both
/// sides' bytes come from databases the operator chose, and a collision can only hide a
/// difference, never invent one.
#[inline]
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let len = bytes.len();
    let mut a = seed ^ K0 ^ (len as u64);
    let mut b = seed.rotate_left(32) ^ K1;
    let mut i = 0;
    while i + 32 <= len {
        a = fold(word(bytes, i) ^ K0 ^ a, word(bytes, i + 8) ^ K2);
        b = fold(word(bytes, i + 16) ^ K1 ^ b, word(bytes, i + 24) ^ K3);
        i += 32;
    }
    while i + 8 <= len {
        a = fold(word(bytes, i) ^ K1 ^ a, K3 ^ b);
        i += 8;
    }
    if i < len {
        let mut tail = [0u8; 8];
        tail[..len - i].copy_from_slice(&bytes[i..]);
        // An odd multiplier: with `K0 ^ a` alone, a seed equal to the length (hash64 of any
        // 2-byte value with seed 2) made it 0 and lost the tail's bytes.
        b = fold(u64::from_le_bytes(tail) ^ K2 ^ b, (K0 ^ a) | 1);
    }
    fold(a ^ K3, b ^ K1 ^ (len as u64))
}

/// Mixes a row hash into the ordered chain.
#[inline]
pub fn chain(acc: u64, row: u64) -> u64 {
    fold(acc ^ row ^ K0, K1)
}

/// One statement's answer from one side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Digest {
    /// Command tag (`INSERT 0 1`, `SELECT 3`); empty on error. `EMPTY` for an empty query,
    /// `SUSPENDED` for a portal suspended by Execute's row limit.
    pub tag: String,
    pub rows: u64,
    /// Column names and type OIDs from the RowDescription that preceded the rows, if any.
    pub columns: Option<Rc<Vec<(String, u32)>>>,
    pub ordered: u64,
    /// Under an ORDER BY of plain output columns: the chain of the sort keys' values only, so
    /// rows whose keys tie may come in any order. `None`: not known, `ordered` decides.
    pub ordered_keys: Option<u64>,
    /// Order-insensitive: wrapping sums of the row hashes and of a remix of them.
    pub unordered: (u64, u64),
    /// Some column came in binary format (its values hash as the binary bytes).
    pub binary: bool,
    /// SQLSTATE of an ErrorResponse.
    pub error: Option<[u8; 5]>,
    /// Error message, for reports only (never compared).
    pub message: String,
    /// `(row hash, rendered row)` of the first rows.
    pub sample: Vec<(u64, String)>,
}

impl Digest {
    pub fn error_code(&self) -> Option<&str> {
        self.error
            .as_ref()
            .and_then(|c| std::str::from_utf8(c).ok())
    }
}

/// Column names and type OIDs of one result.
pub type Columns = Rc<Vec<(String, u32)>>;

pub use crate::session::ResultFormats;

/// What Describe told of one prepared statement's result columns, per side (0: primary,
/// 1: shadow). An Execute without its own Describe (JDBC, tokio-postgres, pgx after the first
/// run) is checked and normalised with these.
#[derive(Debug, Default)]
pub struct Described {
    sides: [RefCell<Option<Columns>>; 2],
    /// Per side: a Describe of it (the client's, or pgprism's own) was sent there and not
    /// skipped: its answer tells that side's columns, so pgprism asks for none of its own.
    /// Per side because a batch routed to the primary only takes the client's Describe off
    /// the shadow: the shadow must still be asked before a compared Execute.
    asked: [Cell<bool>; 2],
}

impl Described {
    pub fn get(&self, side: usize) -> Option<Columns> {
        self.sides.get(side).and_then(|c| c.borrow().clone())
    }

    /// Notes that a Describe of it was sent to `side`; `false` when one had been already.
    pub(crate) fn ask(&self, side: usize) -> bool {
        self.asked.get(side).is_some_and(|a| !a.replace(true))
    }

    /// Whether a Describe of it was sent to `side` (and not skipped).
    pub(crate) fn asked(&self, side: usize) -> bool {
        self.asked.get(side).is_some_and(Cell::get)
    }

    /// A Describe of it was skipped (after an error) on one side, or dropped before it went
    /// there (its batch was routed to the primary only), before it told the columns there:
    /// a later Execute may ask again.
    pub(crate) fn skipped(&self, side: usize) {
        if self.get(side).is_none()
            && let Some(asked) = self.asked.get(side)
        {
            asked.set(false);
        }
    }

    fn set(&self, side: usize, columns: Columns) {
        if let Some(cell) = self.sides.get(side) {
            *cell.borrow_mut() = Some(columns);
        }
    }
}

/// What the client asked, in order, that decides how one side's answer is read: which
/// statement a RowDescription describes, which statement's rows an Execute returns, where a
/// sync point ends. Queued by the upstream half before the frames are written, so an answer
/// never arrives before its expectation.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Describe of a prepared statement: its RowDescription (or NoData) is remembered.
    DescribeStatement(Rc<Described>),
    /// Describe of a portal: its RowDescription describes the next Execute's rows, and is
    /// remembered for the portal's statement.
    DescribePortal(Rc<Described>),
    /// Execute of a portal of this statement, with the Bind's result formats.
    Execute(Rc<Described>, ResultFormats),
    /// pgprism's own Describe of the portal an Execute runs, sent just before it because the
    /// client never described its statement: read as [`DescribePortal`](Self::DescribePortal),
    /// and its answer never reaches the client.
    OwnDescribe(Rc<Described>),
    /// Query, Sync or FunctionCall: a ReadyForQuery ends it.
    Sync,
}

impl Expect {
    /// The statement a Describe (the client's or pgprism's own) tells the columns of.
    pub(crate) fn describes(&self) -> Option<&Rc<Described>> {
        match self {
            Expect::DescribeStatement(d) | Expect::DescribePortal(d) | Expect::OwnDescribe(d) => {
                Some(d)
            }
            Expect::Execute(..) | Expect::Sync => None,
        }
    }
}

/// One side's queue of [`Expect`]s.
pub type Expects = Rc<RefCell<VecDeque<Expect>>>;

/// A RowDescription as the digester uses it: columns, how each is normalised, whether none is
/// (rows hash as raw bytes), and each column's type OID and binary format (for samples).
struct Parsed {
    columns: Columns,
    plan: Vec<ColumnRule>,
    raw: bool,
    shape: Vec<(u32, bool)>,
}

/// Tags (and lists of results) a digester keeps from judged sync points for the next ones
/// (see [`Digester::recycle`]), and the largest capacity a kept one may have: a result's
/// tag and its sync point's list of results were two allocations and their release per
/// result and side (callgrind, pgbench `-N`). The tags alone, not whole digests: moving
/// those in and out of a spare list cost more than their allocations.
const RECYCLED_MAX: usize = 4;
const RECYCLED_BYTES_MAX: usize = 64;

/// One side's answer to one sync point (Query, Sync or FunctionCall).
#[derive(Debug, Default)]
pub struct SyncDigest {
    pub results: Vec<Digest>,
    /// Transaction status of the ReadyForQuery.
    pub status: u8,
    pub finished: Option<Instant>,
    /// (The shadow's) its order with a conflicting sync point of another session was not
    /// reproduced, and why: a difference is inconclusive.
    pub overtaken: Option<super::order::Unpinned>,
    /// (The shadow's) a read kept pending in the order ledger under this number to be
    /// placed (see `compare::place`): its judge starts the placement, or ends it.
    pub placing: Option<u64>,
}

/// Folds one side's backend messages into digests.
pub struct Digester {
    rules: Rc<Rules>,
    /// 0: primary, 1: shadow (which half of each [`Described`] is this side's).
    side: usize,
    expects: Expects,
    /// Columns of the current result and how each column is normalised.
    columns: Option<Columns>,
    plan: Vec<ColumnRule>,
    /// Type OID and binary format of each column of the current result, for rendering
    /// sample rows.
    shape: Vec<(u32, bool)>,
    /// No rule applies to any column: hash the DataRow body as is.
    raw: bool,
    /// The current result's columns are known (a RowDescription came before its rows).
    described: bool,
    /// The current result has started (its description is settled).
    begun: bool,
    /// The last RowDescription body and what it gave, so a statement described again and
    /// again (libpq describes every portal) costs a comparison, not a parse.
    last_body: Vec<u8>,
    last: Option<Parsed>,
    /// The last plan built from a [`Described`] statement and Bind formats.
    last_plan: Option<(Columns, ResultFormats, Vec<ColumnRule>, bool)>,
    /// Scratch text for binary numbers.
    scratch: String,
    current: Digest,
    in_result: bool,
    results: Vec<Digest>,
    /// Emptied tags and result lists of judged sync points (see [`Digester::recycle`]).
    spare_tags: Vec<String>,
    spare_results: Vec<Vec<Digest>>,
    /// The current result's statement's ORDER BY keys (set by the comparer before its first
    /// row), and the column indices they resolved to once the columns were known.
    order_keys: Option<Rc<[OrderKey]>>,
    key_columns: Option<Vec<usize>>,
    keys_resolved: bool,
}

/// What a message meant to the digester.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// A ReadyForQuery ended a sync point: take it with [`Digester::finish_sync`].
    SyncEnd(u8),
    /// The answer to pgprism's own Describe ([`Expect::OwnDescribe`]): not the client's.
    Own,
}

impl Digester {
    /// A digester with no expectations: every result is described inline (simple protocol).
    pub fn new(rules: Rc<Rules>) -> Digester {
        Digester::with_expects(rules, 0, Expects::default())
    }

    /// A digester for `side` reading `expects`, queued by the upstream half.
    pub fn with_expects(rules: Rc<Rules>, side: usize, expects: Expects) -> Digester {
        Digester {
            rules,
            side,
            expects,
            columns: None,
            plan: Vec::new(),
            shape: Vec::new(),
            raw: true,
            described: false,
            begun: false,
            last_body: Vec::new(),
            last: None,
            last_plan: None,
            scratch: String::new(),
            current: Digest::default(),
            in_result: false,
            results: Vec::new(),
            spare_tags: Vec::new(),
            spare_results: Vec::new(),
            order_keys: None,
            key_columns: None,
            keys_resolved: false,
        }
    }

    /// Feeds one backend message.
    #[inline]
    pub fn visit(&mut self, tag: u8, body: &[u8]) -> Step {
        match tag {
            tag::DATA_ROW => {
                self.begin();
                self.row(body)
            }
            tag::ROW_DESCRIPTION => return self.describe(body),
            tag::NO_DATA => return self.no_data(),
            tag::COMMAND_COMPLETE => {
                self.begin();
                let text = wire::CommandComplete::new(body).tag().unwrap_or("?");
                self.current.tag.clear();
                self.current.tag.push_str(text);
                self.end_result();
            }
            tag::EMPTY_QUERY_RESPONSE => {
                self.current.tag = "EMPTY".into();
                self.end_result();
            }
            tag::PORTAL_SUSPENDED => {
                self.begin();
                self.current.tag = "SUSPENDED".into();
                self.end_result();
            }
            tag::ERROR_RESPONSE => {
                if let Ok(fields) = wire::ErrorNotice::new(body).parse() {
                    let code = fields.code.unwrap_or("XX000").as_bytes();
                    let mut c = [b'?'; 5];
                    for (o, b) in c.iter_mut().zip(code) {
                        *o = *b;
                    }
                    self.current.error = Some(c);
                    self.current.message = fields.message.unwrap_or("").to_string();
                }
                self.end_result();
            }
            tag::COPY_DATA => {
                self.begin();
                self.row(body)
            }
            // A FunctionCall's answer: its value (length and bytes, -1 for NULL) is the
            // result's one row, so two sides' values compare like a query's.
            tag::FUNCTION_CALL_RESPONSE => {
                self.begin();
                self.current.tag = "FUNCTION CALL".into();
                self.in_result = true;
                let hash = hash64(body, 1);
                let d = &mut self.current;
                d.rows += 1;
                d.ordered = chain(d.ordered, hash);
                d.unordered.0 = d.unordered.0.wrapping_add(hash);
                d.unordered.1 = d.unordered.1.wrapping_add(fold(hash ^ K2, K3));
                if d.sample.len() < self.rules.sample_rows_max {
                    d.sample.push((hash, render_function_result(body)));
                }
                self.end_result();
            }
            tag::READY_FOR_QUERY => {
                // Whatever the sync point asked and did not get (skipped after an error)
                // ends with it.
                let mut expects = self.expects.borrow_mut();
                while let Some(e) = expects.pop_front() {
                    match e {
                        Expect::Sync => break,
                        Expect::DescribeStatement(d)
                        | Expect::DescribePortal(d)
                        | Expect::OwnDescribe(d) => d.skipped(self.side),
                        Expect::Execute(..) => {}
                    }
                }
                return Step::SyncEnd(body.first().copied().unwrap_or(b'I'));
            }
            _ => {}
        }
        Step::Nothing
    }

    /// The results of the sync point that just ended.
    pub fn finish_sync(&mut self, status: u8, at: Instant) -> SyncDigest {
        if self.in_result {
            // Rows with no CommandComplete (cannot happen with a sane server): keep them.
            self.end_result();
        }
        self.forget_result();
        let spare = self.spare_results.pop().unwrap_or_default();
        SyncDigest {
            results: std::mem::replace(&mut self.results, spare),
            status,
            finished: Some(at),
            overtaken: None,
            placing: None,
        }
    }

    /// Takes back the results of a sync point that was judged, for the next ones: their
    /// memory is reused (a few, when small), the rest freed.
    pub fn recycle(&mut self, mut results: Vec<Digest>) {
        for digest in results.iter_mut() {
            if self.spare_tags.len() >= RECYCLED_MAX {
                break;
            }
            if digest.tag.capacity() <= RECYCLED_BYTES_MAX {
                let mut tag = std::mem::take(&mut digest.tag);
                tag.clear();
                self.spare_tags.push(tag);
            }
        }
        results.clear();
        if self.spare_results.len() < RECYCLED_MAX && results.capacity() <= RECYCLED_BYTES_MAX {
            self.spare_results.push(results);
        }
    }

    fn end_result(&mut self) {
        let mut digest = std::mem::take(&mut self.current);
        if let Some(tag) = self.spare_tags.pop() {
            self.current.tag = tag;
        }
        if digest.columns.is_none() {
            digest.columns = self.columns.clone();
        }
        self.results.push(digest);
        self.in_result = false;
        let mut expects = self.expects.borrow_mut();
        if matches!(expects.front(), Some(Expect::Execute(..))) {
            expects.pop_front();
        }
        drop(expects);
        // A description applies to the result that follows it only.
        self.forget_result();
    }

    fn forget_result(&mut self) {
        self.order_keys = None;
        self.key_columns = None;
        self.keys_resolved = false;
        self.columns = None;
        self.plan.clear();
        self.shape.clear();
        self.raw = true;
        self.described = false;
        self.begun = false;
    }

    /// The first message of a result: with no RowDescription of its own, an Execute's rows are
    /// described by what Describe told of its statement, in the formats its Bind asked for.
    fn begin(&mut self) {
        if self.begun {
            return;
        }
        self.begun = true;
        if self.described {
            return;
        }
        let (described, formats) = match self.expects.borrow().front() {
            Some(Expect::Execute(described, formats)) => (described.clone(), formats.clone()),
            _ => return,
        };
        let Some(columns) = described.get(self.side) else {
            return;
        };
        match &self.last_plan {
            Some((c, f, plan, raw)) if Rc::ptr_eq(c, &columns) && *f == formats => {
                self.plan.clone_from(plan);
                self.raw = *raw;
            }
            _ => {
                self.plan.clear();
                for (i, (name, oid)) in columns.iter().enumerate() {
                    let rule = self.rules.column_rule(name, *oid, formats.binary(i));
                    self.plan.push(rule);
                }
                self.raw = self.plan.iter().all(|r| *r == ColumnRule::Raw);
                self.last_plan = Some((
                    columns.clone(),
                    formats.clone(),
                    self.plan.clone(),
                    self.raw,
                ));
            }
        }
        self.shape.clear();
        self.shape.extend(
            columns
                .iter()
                .enumerate()
                .map(|(i, (_, oid))| (*oid, formats.binary(i))),
        );
        self.current.binary = self.shape.iter().any(|(_, binary)| *binary);
        self.columns = Some(columns.clone());
        self.current.columns = Some(columns);
    }

    /// Parses a RowDescription body into `self.last`, which is kept while the same body comes
    /// again. `None`: undecodable.
    fn parse_description(&mut self, body: &[u8]) -> Option<&Parsed> {
        if self.last.is_none() || self.last_body != body {
            let fields = wire::RowDescription::new(body).fields().ok()?;
            let mut columns = Vec::with_capacity(fields.len());
            let mut plan = Vec::with_capacity(fields.len());
            let mut shape = Vec::with_capacity(fields.len());
            for f in fields {
                let binary = f.format == Format::Binary;
                plan.push(self.rules.column_rule(f.name, f.type_oid, binary));
                columns.push((f.name.to_string(), f.type_oid));
                shape.push((f.type_oid, binary));
            }
            let raw = plan.iter().all(|r| *r == ColumnRule::Raw);
            self.last_body.clear();
            self.last_body.extend_from_slice(body);
            self.last = Some(Parsed {
                columns: Rc::new(columns),
                plan,
                raw,
                shape,
            });
        }
        self.last.as_ref()
    }

    fn describe(&mut self, body: &[u8]) -> Step {
        let own = matches!(self.expects.borrow().front(), Some(Expect::OwnDescribe(_)));
        let Some(columns) = self.parse_description(body).map(|p| p.columns.clone()) else {
            if own {
                // Undecodable: the Execute's rows go without types, and the frame stays
                // pgprism's.
                self.expects.borrow_mut().pop_front();
                return Step::Own;
            }
            return Step::Nothing;
        };
        let front = {
            let mut expects = self.expects.borrow_mut();
            match expects.front() {
                Some(
                    Expect::DescribeStatement(_)
                    | Expect::DescribePortal(_)
                    | Expect::OwnDescribe(_),
                ) => expects.pop_front(),
                _ => None,
            }
        };
        match front {
            Some(Expect::DescribeStatement(described)) => {
                // Statement Describe: formats are not known until Bind; only the columns
                // are kept, and no result follows.
                described.set(self.side, columns);
                return Step::Nothing;
            }
            Some(Expect::DescribePortal(described) | Expect::OwnDescribe(described)) => {
                described.set(self.side, columns.clone())
            }
            _ => {}
        }
        if let Some(parsed) = &self.last {
            self.plan.clone_from(&parsed.plan);
            self.raw = parsed.raw;
            self.shape.clone_from(&parsed.shape);
        }
        self.described = true;
        self.current.binary = self.shape.iter().any(|(_, binary)| *binary);
        self.columns = Some(columns.clone());
        self.current.columns = Some(columns);
        if own { Step::Own } else { Step::Nothing }
    }

    /// NoData: the described statement or portal returns no rows.
    fn no_data(&mut self) -> Step {
        let mut expects = self.expects.borrow_mut();
        let own = matches!(expects.front(), Some(Expect::OwnDescribe(_)));
        if let Some(
            Expect::DescribeStatement(d) | Expect::DescribePortal(d) | Expect::OwnDescribe(d),
        ) = expects.front()
        {
            d.set(self.side, Rc::new(Vec::new()));
            expects.pop_front();
        }
        if own { Step::Own } else { Step::Nothing }
    }

    /// The order-insensitive sums of the current result's rows so far: the difference across
    /// one row is that row's hash (normalised as the rules say).
    pub fn current_unordered(&self) -> (u64, u64) {
        self.current.unordered
    }

    /// Results finished in the current sync point.
    pub fn results_len(&self) -> usize {
        self.results.len()
    }

    /// The current result still needs its statement's ORDER BY keys (before its first row).
    #[inline]
    pub fn keys_pending(&self) -> bool {
        !self.keys_resolved
    }

    /// The ORDER BY keys of the statement whose result comes next (see `keys_pending`).
    pub fn set_order_keys(&mut self, keys: Option<Rc<[OrderKey]>>) {
        self.order_keys = keys;
    }

    /// Resolves the ORDER BY keys against the result's columns: all of them, or none (an
    /// unknown or ambiguous name, a position past the end).
    fn resolve_keys(&mut self) {
        self.keys_resolved = true;
        let (Some(keys), Some(columns)) = (&self.order_keys, &self.columns) else {
            return;
        };
        let mut resolved = Vec::with_capacity(keys.len());
        for key in keys.iter() {
            let index = match key {
                OrderKey::Position(i) => (*i < columns.len()).then_some(*i),
                OrderKey::Name(name) => {
                    let mut found = columns.iter().enumerate().filter(|(_, c)| c.0 == *name);
                    match (found.next(), found.next()) {
                        (Some((i, _)), None) => Some(i),
                        _ => None,
                    }
                }
            };
            let Some(index) = index else {
                return;
            };
            resolved.push(index);
        }
        self.key_columns = Some(resolved);
    }

    /// Hash of one row's sort-key values (raw bytes: keys that tie are byte-equal).
    fn key_hash(body: &[u8], columns: &[usize]) -> u64 {
        let Ok(values) = wire::DataRow::new(body).columns() else {
            return hash64(body, 0);
        };
        let mut acc = K2;
        for &i in columns {
            acc = match values.iter().nth(i) {
                Some(Some(bytes)) => chain(acc, hash64(bytes, 0)),
                _ => chain(acc, K3),
            };
        }
        acc
    }

    #[inline]
    fn row(&mut self, body: &[u8]) {
        if !self.keys_resolved {
            self.resolve_keys();
        }
        if let Some(columns) = &self.key_columns {
            let h = Self::key_hash(body, columns);
            let d = &mut self.current;
            d.ordered_keys = Some(chain(d.ordered_keys.unwrap_or(K0), h));
        }
        self.in_result = true;
        let hash = if self.raw || self.plan.is_empty() {
            hash64(body, 0)
        } else {
            self.normalised_hash(body)
        };
        let d = &mut self.current;
        d.rows += 1;
        d.ordered = chain(d.ordered, hash);
        d.unordered.0 = d.unordered.0.wrapping_add(hash);
        d.unordered.1 = d.unordered.1.wrapping_add(fold(hash ^ K2, K3));
        if d.sample.len() < self.rules.sample_rows_max {
            d.sample
                .push((hash, render_row(body, &self.plan, &self.shape)));
        }
    }

    /// Row hash with rules applied: each column's (normalised) value is hashed on its own and
    /// chained, so no bytes are copied; skipped columns leave no trace.
    fn normalised_hash(&mut self, body: &[u8]) -> u64 {
        let Ok(values) = wire::DataRow::new(body).columns() else {
            return hash64(body, 0);
        };
        let mut acc = K2 ^ values.len() as u64;
        for (i, value) in values.iter().enumerate() {
            let rule = self.plan.get(i).copied().unwrap_or(ColumnRule::Raw);
            let Some(bytes) = value else {
                acc = chain(acc, K3);
                continue;
            };
            let h = match rule {
                ColumnRule::Skip => continue,
                ColumnRule::Raw => hash64(bytes, 2),
                ColumnRule::FloatText | ColumnRule::FloatBinary4 | ColumnRule::FloatBinary8 => {
                    match super::rules::float_value(rule, bytes) {
                        Some(v) => fold(self.rules.quantise(v) ^ K0, K1),
                        None => hash64(bytes, 2),
                    }
                }
                ColumnRule::NumericText => super::rules::number_hash(bytes),
                ColumnRule::TimeText(oid) | ColumnRule::TimeBinary(oid) => {
                    match super::rules::time_value(rule, bytes) {
                        Some(us) => fold(self.rules.quantise_time(oid, us) ^ K2, K3),
                        None => hash64(bytes, 2),
                    }
                }
                ColumnRule::NumberBinary(oid) | ColumnRule::FloatNumberBinary(oid) => {
                    self.scratch.clear();
                    if !super::rules::binary_number_text(oid, bytes, &mut self.scratch) {
                        hash64(bytes, 2)
                    } else if rule == ColumnRule::NumberBinary(oid) {
                        super::rules::number_hash(self.scratch.as_bytes())
                    } else {
                        match self.scratch.parse::<f64>() {
                            Ok(v) => fold(self.rules.quantise(v) ^ K0, K1),
                            Err(_) => hash64(self.scratch.as_bytes(), 2),
                        }
                    }
                }
            };
            acc = chain(acc, h);
        }
        acc
    }
}

/// Renders a row for a report: `(1, abc, NULL)`; binary-format values of common types as
/// their text (numbers, booleans, strings, uuids), others as hex; long values cut. `shape`:
/// each column's type OID and whether it is in binary format (empty: all text).
pub fn render_row(body: &[u8], plan: &[ColumnRule], shape: &[(u32, bool)]) -> String {
    const VALUE_CHARS_MAX: usize = 64;
    let Ok(values) = wire::DataRow::new(body).columns() else {
        return format!("<{} undecodable bytes>", body.len());
    };
    let mut out = String::from("(");
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if plan.get(i) == Some(&ColumnRule::Skip) {
            out.push_str("<ignored>");
            continue;
        }
        let binary = shape
            .get(i)
            .filter(|(_, binary)| *binary)
            .map(|(oid, _)| *oid);
        match value {
            None => out.push_str("NULL"),
            Some(bytes) if binary.is_some() => {
                render_binary(binary.unwrap_or(0), bytes, &mut out, VALUE_CHARS_MAX)
            }
            Some(bytes) => match simdutf8::basic::from_utf8(bytes) {
                Ok(text) => {
                    let cut: String = text.chars().take(VALUE_CHARS_MAX).collect();
                    out.push_str(&cut);
                    if cut.len() < text.len() {
                        out.push('…');
                    }
                }
                Err(_) => {
                    out.push_str("\\x");
                    for b in bytes.iter().take(VALUE_CHARS_MAX / 2) {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            },
        }
    }
    out.push(')');
    out
}

/// A FunctionCallResponse's value for a report: its text when it reads as UTF-8 (the
/// client asked for text, or a textual binary value), else hex.
fn render_function_result(body: &[u8]) -> String {
    let Some(len) = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return format!("<{} undecodable bytes>", body.len());
    };
    let value = match usize::try_from(len) {
        Err(_) => return "(NULL)".into(),
        Ok(n) => body.get(4..4 + n).unwrap_or_default(),
    };
    match simdutf8::basic::from_utf8(value) {
        Ok(text) => format!("({})", text.chars().take(64).collect::<String>()),
        Err(_) => {
            let hex: String = value.iter().take(32).map(|b| format!("{b:02x}")).collect();
            format!("(\\x{hex})")
        }
    }
}

/// One binary-format value as text, by type.
fn render_binary(oid: u32, bytes: &[u8], out: &mut String, chars_max: usize) {
    const TEXTUAL: &[u32] = &[18, 19, 25, 114, 142, 1042, 1043];
    let mut text = String::new();
    let rendered = match oid {
        16 if bytes.len() == 1 => {
            text.push(if bytes[0] != 0 { 't' } else { 'f' });
            true
        }
        2950 if bytes.len() == 16 => {
            for (i, b) in bytes.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    text.push('-');
                }
                text.push_str(&format!("{b:02x}"));
            }
            true
        }
        // jsonb: a version byte (1), then the text.
        3802 if bytes.first() == Some(&1) => match std::str::from_utf8(&bytes[1..]) {
            Ok(s) => {
                text.push_str(s);
                true
            }
            Err(_) => false,
        },
        oid if TEXTUAL.contains(&oid) => match std::str::from_utf8(bytes) {
            Ok(s) => {
                text.push_str(s);
                true
            }
            Err(_) => false,
        },
        oid => super::rules::binary_number_text(oid, bytes, &mut text),
    };
    if rendered {
        let cut: String = text.chars().take(chars_max).collect();
        out.push_str(&cut);
        if cut.len() < text.len() {
            out.push('…');
        }
        return;
    }
    out.push_str("\\x");
    for b in bytes.iter().take(chars_max / 2) {
        out.push_str(&format!("{b:02x}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_byte_and_length() {
        let data: Vec<u8> = (0..200u8).collect();
        let mut seen = std::collections::HashSet::new();
        for len in 0..data.len() {
            assert!(seen.insert(hash64(&data[..len], 0)), "len {len}");
        }
        for i in 0..100 {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_ne!(hash64(&d, 0), hash64(&data, 0), "byte {i}");
        }
    }

    #[test]
    fn short_values_hash_apart_whatever_the_seed() {
        for seed in 0..8u64 {
            for len in 1..8usize {
                let mut seen = std::collections::HashSet::new();
                for byte in 0..=255u8 {
                    let mut value = vec![b'7'; len];
                    value[len - 1] = byte;
                    assert!(seen.insert(hash64(&value, seed)), "seed {seed} len {len}");
                }
            }
        }
    }

    #[test]
    fn binary_values_render_as_text_by_type() {
        use bytes::BytesMut;
        let mut buf = BytesMut::new();
        let uuid = [0x12u8; 16];
        wire::encode::data_row(
            &mut buf,
            &[
                Some(&5i64.to_be_bytes()[..]),
                Some(&[1u8][..]),
                Some(b"h\xc3\xa9"),
                Some(&uuid[..]),
                Some(&[0u8, 1, 2][..]),
                None,
            ],
        )
        .unwrap();
        let shape = [
            (20, true),
            (16, true),
            (25, true),
            (2950, true),
            (17, true),
            (23, true),
        ];
        let row = render_row(&buf[5..], &[], &shape);
        assert_eq!(
            row,
            "(5, t, h\u{e9}, 12121212-1212-1212-1212-121212121212, \\x000102, NULL)"
        );
        // Text format: as sent.
        assert_eq!(render_row(&buf[5..], &[], &[]).matches(", ").count(), 5);
    }

    #[test]
    fn unordered_sum_ignores_order_and_ordered_chain_does_not() {
        let rows = [hash64(b"a", 0), hash64(b"b", 0), hash64(b"c", 0)];
        let fwd = rows.iter().fold(0u64, |a, r| chain(a, *r));
        let rev = rows.iter().rev().fold(0u64, |a, r| chain(a, *r));
        assert_ne!(fwd, rev);
        let s1 = rows.iter().fold(0u64, |a, r| a.wrapping_add(*r));
        let s2 = rows.iter().rev().fold(0u64, |a, r| a.wrapping_add(*r));
        assert_eq!(s1, s2);
    }

    fn digest_of(rows: &[&[Option<&[u8]>]], cfg: &crate::config::CompareConfig) -> Digest {
        use bytes::BytesMut;
        let rules = Rc::new(Rules::new(cfg).unwrap());
        let mut d = Digester::new(rules);
        let mut buf = BytesMut::new();
        let field = |name, type_oid| wire::FieldDescription {
            name,
            table_oid: 0,
            column_attr: 0,
            type_oid,
            type_size: -1,
            type_modifier: -1,
            format: Format::Text,
        };
        wire::encode::row_description(&mut buf, &[field("id", 23), field("x", 701)]).unwrap();
        for row in rows {
            wire::encode::data_row(&mut buf, row).unwrap();
        }
        wire::encode::command_complete(&mut buf, "SELECT 2").unwrap();
        wire::encode::ready_for_query(&mut buf, wire::TransactionStatus::Idle);
        let mut at = 0;
        while at < buf.len() {
            let len =
                u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
            if let Step::SyncEnd(status) = d.visit(buf[at], &buf[at + 5..at + 1 + len]) {
                let mut sync = d.finish_sync(status, Instant::now());
                return sync.results.remove(0);
            }
            at += 1 + len;
        }
        panic!("no ReadyForQuery")
    }

    #[test]
    fn digester_folds_rows_and_applies_tolerance() {
        let exact = crate::config::CompareConfig::default();
        let a = digest_of(
            &[&[Some(b"1"), Some(b"1.00001")], &[Some(b"2"), None]],
            &exact,
        );
        let b = digest_of(
            &[&[Some(b"2"), None], &[Some(b"1"), Some(b"1.00001")]],
            &exact,
        );
        let c = digest_of(
            &[&[Some(b"1"), Some(b"1.00002")], &[Some(b"2"), None]],
            &exact,
        );
        assert_eq!((a.rows, a.tag.as_str()), (2, "SELECT 2"));
        assert_eq!(a.columns.as_ref().map(|c| c.len()), Some(2));
        assert_eq!(a.unordered, b.unordered);
        assert_ne!(a.ordered, b.ordered);
        assert_ne!(a.unordered, c.unordered);
        let tolerant = crate::config::CompareConfig {
            float_tolerance: 0.001,
            ..Default::default()
        };
        let a = digest_of(
            &[&[Some(b"1"), Some(b"1.00001")], &[Some(b"2"), None]],
            &tolerant,
        );
        let c = digest_of(
            &[&[Some(b"1"), Some(b"1.00002")], &[Some(b"2"), None]],
            &tolerant,
        );
        assert_eq!(a.unordered, c.unordered);
        assert_eq!(a.sample.len(), 2);
        assert_eq!(a.sample[1].1, "(2, NULL)");
    }

    /// Every message of `buf`, visited in order: what each meant.
    fn visit_all(d: &mut Digester, buf: &[u8]) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let len =
                u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
            steps.push(d.visit(buf[at], &buf[at + 5..at + 1 + len]));
            at += 1 + len;
        }
        steps
    }

    #[test]
    fn pgprisms_own_describe_is_read_for_the_columns_and_marked_as_its_own() {
        use bytes::BytesMut;
        let rules = Rc::new(Rules::new(&crate::config::CompareConfig::default()).unwrap());
        let expects = Expects::default();
        let mut d = Digester::with_expects(rules, 1, expects.clone());
        let described = Rc::new(Described::default());
        assert!(described.ask(1), "the first Describe is asked");
        assert!(!described.ask(1), "then no other");
        assert!(described.ask(0), "each side is asked once");
        let formats = ResultFormats::Text;
        expects.borrow_mut().extend([
            Expect::OwnDescribe(described.clone()),
            Expect::Execute(described.clone(), formats.clone()),
            Expect::Sync,
        ]);
        let mut buf = BytesMut::new();
        let field = wire::FieldDescription {
            name: "v",
            table_oid: 0,
            column_attr: 0,
            type_oid: 20,
            type_size: 8,
            type_modifier: -1,
            format: Format::Text,
        };
        buf.extend_from_slice(&[b'2', 0, 0, 0, 4]);
        wire::encode::row_description(&mut buf, &[field]).unwrap();
        wire::encode::data_row(&mut buf, &[Some(b"7")]).unwrap();
        wire::encode::command_complete(&mut buf, "SELECT 1").unwrap();
        wire::encode::ready_for_query(&mut buf, wire::TransactionStatus::Idle);
        let steps = visit_all(&mut d, &buf);
        assert_eq!(
            steps,
            [
                Step::Nothing,
                Step::Own,
                Step::Nothing,
                Step::Nothing,
                Step::SyncEnd(b'I')
            ]
        );
        let sync = d.finish_sync(b'I', Instant::now());
        let columns = sync.results[0].columns.clone().expect("described");
        assert_eq!(*columns, vec![("v".to_string(), 20)]);
        assert_eq!(described.get(1), Some(columns), "kept for later Executes");
        assert!(expects.borrow().is_empty());

        // Skipped after an error (the Bind failed): nothing is pgprism's, and the next
        // Execute may ask again.
        let again = Rc::new(Described::default());
        assert!(again.ask(1));
        expects.borrow_mut().extend([
            Expect::OwnDescribe(again.clone()),
            Expect::Execute(again.clone(), formats),
            Expect::Sync,
        ]);
        let mut buf = BytesMut::new();
        let error = wire::ErrorSpec::new("ERROR", "42P01", "no such table");
        wire::encode::error_response(&mut buf, &error).unwrap();
        wire::encode::ready_for_query(&mut buf, wire::TransactionStatus::Idle);
        let steps = visit_all(&mut d, &buf);
        assert_eq!(steps, [Step::Nothing, Step::SyncEnd(b'I')]);
        assert!(again.ask(1), "asked again after the skip");
    }
}
