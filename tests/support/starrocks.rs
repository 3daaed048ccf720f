//! A StarRocks Stream Load emulator for the CDC tests (no StarRocks server runs on the build
//! machines). It follows the documented FE/BE HTTP protocol:
//!
//! * FE (`PUT /api/{db}/{table}/_stream_load`): checks Basic auth, answers `307 Temporary
//!   Redirect` with `Location` on the BE, without reading the body (a client that sent
//!   `Expect: 100-continue` never uploads it to the FE). `GET /api/{db}/{table}/_schema`.
//! * BE: checks Basic auth, answers `100 Continue` when asked, reads the body, dedups labels
//!   (`Label Already Exists` + `ExistingJobStatus`), parses JSON (`strip_outer_array`), maps
//!   keys through `columns`, filters rows that fail type checks and fails the load when the
//!   filtered share exceeds `max_filter_ratio`, applies rows in order to a Primary Key table
//!   (`__op` 0 upsert / 1 delete, `partial_update` merges the listed columns, a partial
//!   update of a missing row inserts it with the columns' defaults, NULL where there is
//!   none; a row that gives a `NOT NULL` column NULL is filtered), and answers the
//!   documented JSON.
//! * FE query port (MySQL protocol): handshake v10 with `mysql_native_password`, then
//!   `TRUNCATE TABLE db.t` (the only statement CDC sends) empties the table.
//! * Faults: the next loads can answer `Fail`, `Publish Timeout` (applied, then reported as
//!   such), be delayed, or have the connection dropped before any answer.
//! * Transaction timeouts as the FE enforces them: begin's `timeout` (not prepared in time)
//!   and `idle_transaction_timeout` (no load for that long), prepare's `prepared_timeout`
//!   (not committed in time) abort the transaction; a load into it is then refused with
//!   `Transcation State Invalid`, and its label may be begun again.
//! * FE query port: `ALTER TABLE ... ADD/MODIFY/DROP COLUMN` runs as a job that finishes
//!   later, once no transaction begun before it still loads the table (`WAITING_TXN`).
//! * FE query port: `SHOW PROC '/transactions'`, `'/transactions/<DbId>'` and
//!   `'/transactions/<DbId>/running'` (the unfinished transactions of a database).
//! * FE query port: `SELECT columns FROM db.t WHERE k IN (...)` (or `(k1 = .. AND k2 = ..)
//!   OR ...`) reads committed rows only, values printed as StarRocks' text protocol prints
//!   them (BOOLEAN as 1/0), NULL as NULL.

// Included privately by the test crates: `pub` is for them, `unreachable_pub` does not apply.
#![allow(unreachable_pub)]
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

/// Column types the emulator checks (a value that does not fit is a filtered row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColType {
    Int,
    Text,
    Bool,
    /// Anything goes.
    Any,
}

#[derive(Clone, Debug)]
pub enum Fault {
    Fail,
    PublishTimeout,
    Delay(Duration),
    Drop,
}

/// Faults of the transaction interface, taken by the next commits in order.
#[derive(Clone, Debug)]
pub enum TxnFault {
    /// The FE restarts while the commit is on its way: the connection drops unanswered, the
    /// commit never happens, transactions still loading lose their BE side and are aborted,
    /// prepared ones survive (they are in the FE's journal).
    FeRestart,
    /// The commit happens but the answer says it failed (`commit timeout`), as after an FE
    /// leader change.
    CommitAnswersError,
    /// The commit's answer comes late (a client timeout).
    Delay(Duration),
    /// The commit happens, but publishing takes this long: the answer says `publish
    /// timeout`, the label is `COMMITTED`, and the rows become visible (to loads' readers and
    /// `SELECT`) only once it is `VISIBLE`.
    PublishLate(Duration),
}

/// Transaction states as `get_load_state` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnState {
    Prepare,
    Prepared,
    /// Committed, not yet published: its rows are not visible.
    Committed,
    Visible,
    Aborted,
}

impl TxnState {
    fn name(self) -> &'static str {
        match self {
            TxnState::Prepare => "PREPARE",
            TxnState::Prepared => "PREPARED",
            TxnState::Committed => "COMMITTED",
            TxnState::Visible => "VISIBLE",
            TxnState::Aborted => "ABORTED",
        }
    }
}

/// One `ALTER TABLE` column job: PENDING (WAITING_TXN while a transaction begun before it
/// loads its table), then RUNNING, then FINISHED, when the table's columns change.
struct Job {
    id: u64,
    /// `db.table`.
    table: String,
    op: AlterOp,
    created: std::time::Instant,
    finished: bool,
}

#[derive(Clone, Debug)]
enum AlterOp {
    Add(String, String),
    Modify(String, String),
    Drop(String),
}

struct Txn {
    id: u64,
    /// The table named at begin (required before StarRocks 4.0).
    table: Option<String>,
    state: TxnState,
    /// Checked loads, applied in order at commit.
    staged: Vec<(String, Parsed)>,
    /// Load parameters per table: later loads must repeat the first one's.
    params: HashMap<String, (String, bool)>,
    /// Begin's `timeout`: the FE aborts a transaction not prepared by then.
    deadline: std::time::Instant,
    /// Begin's `idle_transaction_timeout`: the FE rolls back a transaction that received no
    /// load for this long.
    idle: Option<Duration>,
    /// When it was begun or last received a load.
    active: std::time::Instant,
    /// Prepare's `prepared_timeout` (default 86400 s): aborted if not committed by then.
    prepared_deadline: Option<std::time::Instant>,
    /// Committed with a late publish: visible from then on.
    publish_at: Option<std::time::Instant>,
    /// Its place in the order of commits (StarRocks publishes a table's versions in that
    /// order: a later commit is not visible before an earlier one).
    committed: u64,
}

/// A stored value, as a load wrote it. Strings, integers, booleans and NULL (nearly every
/// value CDC sends) are kept without the JSON document they came in; anything else (a
/// fraction, an integer beyond i64, an object or array) keeps its JSON value.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Cell {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Str(Box<str>),
    Json(Value),
}

impl Cell {
    fn from_json(v: &Value) -> Cell {
        if v.is_null() {
            Cell::Null
        } else if let Some(s) = v.as_str() {
            Cell::Str(s.into())
        } else if let Some(i) = v.as_i64() {
            Cell::Int(i)
        } else if let Some(b) = v.as_bool() {
            Cell::Bool(b)
        } else {
            Cell::Json(v.clone())
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }

    /// The value's JSON text (the key of a row is made of these).
    fn write_json(&self, out: &mut String) {
        match self {
            Cell::Null => out.push_str("null"),
            Cell::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Cell::Int(i) => {
                // By hand: this runs once per row loaded, and `fmt` costs more than the rest.
                let mut digits = [0u8; 20];
                let (mut n, mut at) = (i.unsigned_abs(), digits.len());
                loop {
                    at -= 1;
                    digits[at] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                if *i < 0 {
                    out.push('-');
                }
                out.extend(digits[at..].iter().map(|&d| char::from(d)));
            }
            Cell::Str(s) => out.push_str(&sonic_rs::to_string(&**s).unwrap_or_default()),
            Cell::Json(v) => out.push_str(&v.to_string()),
        }
    }
}

/// FxHash (the rustc hasher) with a final mix: the row maps hold millions of short keys, and
/// SipHash's cost shows in the benchmarks' emulator CPU. No adversary feeds the emulator.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        // hashbrown takes its control bits from the top: spread the low bits up.
        let h = self.0 ^ (self.0 >> 29);
        h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
}

/// A row's key: its text, with its hash kept beside it so that growing the map never reads
/// the text again (a cache miss per row, which showed in the snapshot benchmark).
#[derive(Clone, PartialEq, Eq)]
struct RowKey {
    hash: u64,
    text: Box<str>,
}

impl RowKey {
    fn new(text: &str) -> RowKey {
        let mut h = FxHasher::default();
        std::hash::Hasher::write(&mut h, text.as_bytes());
        RowKey {
            hash: std::hash::Hasher::finish(&h),
            text: text.into(),
        }
    }
}

impl std::hash::Hash for RowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes a [`RowKey`]'s kept hash through.
#[derive(Default, Clone, Copy)]
struct KeptHash(u64);

impl std::hash::Hasher for KeptHash {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else still hashes.
        let mut h = FxHasher(self.0);
        h.write(bytes);
        self.0 = h.finish();
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
pub struct Table {
    pub key: Vec<String>,
    pub columns: BTreeMap<String, ColType>,
    /// Column types as `information_schema.columns` prints them.
    pub types: BTreeMap<String, String>,
    /// Where each column's value sits in a stored row. A dropped column's slot is never
    /// reused, so a column added again under the same name starts out NULL in every row.
    slots: HashMap<String, usize>,
    /// Slots handed out so far.
    width: usize,
    /// `NOT NULL` columns besides the key (a row that gives one NULL is filtered: `NULL
    /// value in non-nullable column`).
    not_null: std::collections::HashSet<String>,
    /// `DEFAULT` values, as the DDL wrote them: what a load that leaves the column out
    /// writes (a full row, and a partial update of a key the table lacks: "inserts a new
    /// row, and fills default values in fields that are empty").
    defaults: HashMap<String, String>,
    /// Key (JSON text of the key values, `|`-joined) → the row's values by slot (a row
    /// shorter than `width` has NULL in the slots added after it was written).
    rows: HashMap<RowKey, Box<[Cell]>, std::hash::BuildHasherDefault<KeptHash>>,
}

impl Table {
    fn new(key: Vec<String>, columns: Vec<(String, ColType, String)>) -> Table {
        let mut t = Table {
            key,
            ..Table::default()
        };
        for (name, ty, text) in columns {
            t.set_column(name, ty, text);
        }
        t
    }

    /// Adds a column, or changes the type of one that exists (its values stay).
    fn set_column(&mut self, name: String, ty: ColType, text: String) {
        if !self.slots.contains_key(&name) {
            self.slots.insert(name.clone(), self.width);
            self.width += 1;
        }
        self.columns.insert(name.clone(), ty);
        self.types.insert(name, text);
    }

    fn drop_column(&mut self, name: &str) {
        self.not_null.remove(name);
        self.defaults.remove(name);
        self.columns.remove(name);
        self.types.remove(name);
        self.slots.remove(name);
    }

    /// What each slot holds in a row a load did not give it: the column's default, or NULL.
    fn default_cells(&self) -> Vec<Cell> {
        let mut out = vec![Cell::Null; self.width];
        for (name, text) in &self.defaults {
            if let (Some(&i), Some(&ty)) = (self.slots.get(name), self.columns.get(name)) {
                out[i] = csv_cell(ty, Some(text), false).unwrap_or(Cell::Null);
            }
        }
        out
    }

    fn nullable(&self, column: &str) -> bool {
        !self.key.iter().any(|k| k == column) && !self.not_null.contains(column)
    }

    fn value<'a>(&self, row: &'a [Cell], column: &str) -> Option<&'a Cell> {
        self.slots.get(column).and_then(|&i| row.get(i))
    }
}

#[derive(Default)]
struct State {
    user: String,
    password: String,
    tables: HashMap<String, Table>,
    labels: HashMap<String, String>,
    faults: VecDeque<Fault>,
    /// (label, status) of every load answered.
    log: Vec<(String, String)>,
    statements: Vec<String>,
    txn: u64,
    /// Stream Load transactions by `db/label`.
    txns: HashMap<String, Txn>,
    txn_faults: VecDeque<TxnFault>,
    /// The commit being answered publishes this late ([`TxnFault::PublishLate`]).
    publish_delay: Option<Duration>,
    /// Before StarRocks 4.0: a transaction takes one table, named at begin.
    single_table_txns: bool,
    /// `db.table` names whose keys are recorded after every visible change.
    watched: Vec<String>,
    /// Schema change jobs (ALTER TABLE runs asynchronously).
    jobs: Vec<Job>,
    /// How long a schema change job takes.
    job_duration: Duration,
    /// The watched tables' keys after each visible change.
    visible: Vec<BTreeMap<String, std::collections::BTreeSet<String>>>,
    /// Rows written per `db.table` (upserts and deletes, each time a load or a commit
    /// applies them): a row loaded twice counts twice.
    applied: HashMap<String, usize>,
    /// Benchmarks only ([`StarRocks::sink`]): loads are checked and counted, rows not kept.
    sink: bool,
    /// Labels of the loads into a table in a transaction begun before a schema change of that
    /// table that has since finished. StarRocks documents no answer for such a load (whether
    /// it is taken, and planned against which schema), so the emulator takes it against the
    /// new schema, as before, and records it: pgprism must never send one.
    across_schema_change: Vec<String>,
    /// Loads taken, by `db.table` and format (`json`, `csv`).
    formats: BTreeMap<(String, &'static str), usize>,
    /// Commits so far: orders the transactions that publish late.
    commits: u64,
    /// `db.table` names the user may not `SELECT` from.
    select_denied: Vec<String>,
    /// `get_load_state` answers: (label, state).
    states_answered: Vec<(String, String)>,
    /// `SELECT`s of table rows run while a commit was still publishing (`COMMITTED`): such
    /// a read sees the rows as they were before that commit.
    reads_while_publishing: Vec<String>,
}

pub struct StarRocks {
    pub fe: SocketAddr,
    pub be: SocketAddr,
    /// FE query (MySQL protocol) port.
    pub query: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl StarRocks {
    pub fn start(user: &str, password: &str) -> StarRocks {
        let state = Arc::new(Mutex::new(State {
            user: user.into(),
            password: password.into(),
            job_duration: Duration::from_millis(300),
            ..State::default()
        }));
        let fe_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let be_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fe = fe_listener.local_addr().unwrap();
        let be = be_listener.local_addr().unwrap();
        for (listener, role) in [(fe_listener, Role::Fe), (be_listener, Role::Be)] {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || {
                        let _ = serve(stream, role, be, &state);
                    });
                }
            });
        }
        let query_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let query = query_listener.local_addr().unwrap();
        let qstate = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in query_listener.incoming().flatten() {
                let state = Arc::clone(&qstate);
                std::thread::spawn(move || {
                    let _ = serve_mysql(stream, &state);
                });
            }
        });
        StarRocks {
            fe,
            be,
            query,
            state,
        }
    }

    /// Statements run on the query port.
    pub fn statements(&self) -> Vec<String> {
        self.state.lock().unwrap().statements.clone()
    }

    /// `http://user:password@fe`.
    pub fn url(&self) -> String {
        let s = self.state.lock().unwrap();
        format!("http://{}:{}@{}", s.user, s.password, self.fe)
    }

    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.fe)
    }

    /// Creates a Primary Key table `db.name` with these columns (the first `key` ones are the key).
    pub fn create_table(&self, db: &str, name: &str, key: &[&str], columns: &[(&str, ColType)]) {
        let mut s = self.state.lock().unwrap();
        s.tables.insert(
            format!("{db}.{name}"),
            Table::new(
                key.iter().map(|k| k.to_string()).collect(),
                columns
                    .iter()
                    .map(|(c, t)| (c.to_string(), *t, type_text(*t).to_string()))
                    .collect(),
            ),
        );
    }

    /// Makes a column of `db.table` `NOT NULL` (or not) and gives it a `DEFAULT` (or none),
    /// as a table made by hand may have.
    pub fn constrain(
        &self,
        db: &str,
        table: &str,
        column: &str,
        not_null: bool,
        default: Option<&str>,
    ) {
        let mut s = self.state.lock().unwrap();
        let t = s
            .tables
            .get_mut(&format!("{db}.{table}"))
            .expect("constrain: no such table");
        if not_null {
            t.not_null.insert(column.to_string());
        } else {
            t.not_null.remove(column);
        }
        match default {
            Some(d) => t.defaults.insert(column.to_string(), d.to_string()),
            None => t.defaults.remove(column),
        };
    }

    pub fn add_column(&self, db: &str, table: &str, column: &str, ty: ColType) {
        let mut s = self.state.lock().unwrap();
        if let Some(t) = s.tables.get_mut(&format!("{db}.{table}")) {
            t.set_column(column.to_string(), ty, type_text(ty).to_string());
        }
    }

    /// How long each schema change job takes before its columns change (default 300 ms).
    pub fn schema_change_duration(&self, d: Duration) {
        self.state.lock().unwrap().job_duration = d;
    }

    /// The table's columns (name → type text), once its schema change jobs are done.
    pub fn columns(&self, db: &str, table: &str) -> BTreeMap<String, String> {
        let mut s = self.state.lock().unwrap();
        advance_jobs(&mut s);
        s.tables
            .get(&format!("{db}.{table}"))
            .map(|t| t.types.clone())
            .unwrap_or_default()
    }

    /// Behave like StarRocks before 4.0: one table per transaction, named at begin.
    pub fn single_table_transactions(&self) {
        self.state.lock().unwrap().single_table_txns = true;
    }

    pub fn inject_txn(&self, fault: TxnFault, times: usize) {
        let mut s = self.state.lock().unwrap();
        for _ in 0..times {
            s.txn_faults.push_back(fault.clone());
        }
    }

    /// Records the keys of these tables after every change that becomes visible.
    pub fn watch(&self, db: &str, tables: &[&str]) {
        let mut s = self.state.lock().unwrap();
        s.watched = tables.iter().map(|t| format!("{db}.{t}")).collect();
    }

    /// The watched tables' keys (`db.table` → keys) after each visible change, in order.
    pub fn visible_history(&self) -> Vec<BTreeMap<String, std::collections::BTreeSet<String>>> {
        self.state.lock().unwrap().visible.clone()
    }

    /// Transactions by state name (`PREPARE`, `PREPARED`, `VISIBLE`, `ABORTED`).
    pub fn transactions(&self) -> BTreeMap<&'static str, usize> {
        let s = self.state.lock().unwrap();
        let mut out = BTreeMap::new();
        for t in s.txns.values() {
            *out.entry(t.state.name()).or_insert(0) += 1;
        }
        out
    }

    pub fn inject(&self, fault: Fault, times: usize) {
        let mut s = self.state.lock().unwrap();
        for _ in 0..times {
            s.faults.push_back(fault.clone());
        }
    }

    /// Rows as text in `columns` order, sorted like `ORDER BY` the first column would for
    /// integer keys (numerically) — the tests compare with PostgreSQL's `::text` output.
    pub fn rows(&self, db: &str, table: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
        let s = self.state.lock().unwrap();
        let Some(t) = s.tables.get(&format!("{db}.{table}")) else {
            return Vec::new();
        };
        let mut out: Vec<Vec<Option<String>>> = t
            .rows
            .values()
            .map(|row| {
                columns
                    .iter()
                    .map(|c| t.value(row, c).and_then(text_of))
                    .collect()
            })
            .collect();
        out.sort_by_key(|r| sort_key(r));
        out
    }

    /// Makes room for `rows` rows in `db.table` at once (a benchmark that knows its row
    /// count spares the emulator growing its map while the clock runs; nothing else changes).
    pub fn reserve(&self, db: &str, table: &str, rows: usize) {
        let mut s = self.state.lock().unwrap();
        if let Some(t) = s.tables.get_mut(&format!("{db}.{table}")) {
            t.rows.reserve(rows);
        }
    }

    /// For benchmarks only: from now on every load is still checked as StarRocks checks it
    /// (auth, labels, transactions, headers, columns, JSON, one object per row) and its rows
    /// counted in [`StarRocks::applied_rows`] when they become visible, but the rows are not
    /// kept (no values, no table contents), and CSV rows are counted by their delimiters,
    /// not split into fields and checked, so the emulator's cost stays far below pgprism's
    /// on a machine where both share the cores. Figures taken so say so.
    pub fn sink(&self) {
        self.state.lock().unwrap().sink = true;
    }

    pub fn row_count(&self, db: &str, table: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.tables
            .get(&format!("{db}.{table}"))
            .map(|t| t.rows.len())
            .unwrap_or(0)
    }

    /// Rows written into `db.table` so far, counting every time a load or commit applied
    /// one (a row loaded twice counts twice, though the table shows it once).
    pub fn applied_rows(&self, db: &str, table: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.applied
            .get(&format!("{db}.{table}"))
            .copied()
            .unwrap_or(0)
    }

    /// (label, status) of every load answered so far.
    pub fn log(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().log.clone()
    }

    /// Takes the user's SELECT privilege on `db.table` (loads stay allowed).
    pub fn deny_select(&self, db: &str, table: &str) {
        self.state
            .lock()
            .unwrap()
            .select_denied
            .push(format!("{db}.{table}"));
    }

    /// Every `get_load_state` answer so far: (label, state).
    pub fn states_answered(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().states_answered.clone()
    }

    /// The `SELECT`s of table rows run while a commit was still publishing (each would read
    /// the rows from before that commit).
    pub fn reads_while_publishing(&self) -> Vec<String> {
        self.state.lock().unwrap().reads_while_publishing.clone()
    }

    /// Loads taken so far into `db.table` in each format (`json`, `csv`).
    pub fn loads_by_format(&self, db: &str, table: &str) -> BTreeMap<&'static str, usize> {
        let s = self.state.lock().unwrap();
        s.formats
            .iter()
            .filter(|((t, _), _)| *t == format!("{db}.{table}"))
            .map(|((_, f), n)| (*f, *n))
            .collect()
    }

    /// Labels of the loads that arrived in a transaction begun before a schema change of
    /// their table that had finished by then (see `State::across_schema_change`).
    pub fn loads_across_schema_change(&self) -> Vec<String> {
        self.state.lock().unwrap().across_schema_change.clone()
    }
}

fn sort_key(row: &[Option<String>]) -> (i128, String) {
    let first = row.first().cloned().flatten().unwrap_or_default();
    (first.parse::<i128>().unwrap_or(i128::MAX), first)
}

/// PostgreSQL `::text` rendering of a stored value.
pub fn text_of(v: &Cell) -> Option<String> {
    match v {
        Cell::Null => None,
        Cell::Str(s) => Some(s.to_string()),
        Cell::Bool(b) => Some(if *b { "true" } else { "false" }.to_string()),
        Cell::Int(i) => Some(i.to_string()),
        Cell::Json(v) if v.is_null() => None,
        Cell::Json(v) => Some(v.to_string()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Fe,
    Be,
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

fn respond(stream: &mut TcpStream, code: u16, reason: &str, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn authorized(req: &Request, state: &Mutex<State>) -> bool {
    let s = state.lock().unwrap();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", s.user, s.password))
    );
    req.headers.get("authorization") == Some(&expected)
}

fn serve(
    stream: TcpStream,
    role: Role,
    be: SocketAddr,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let Some(req) = read_head(&mut reader) else {
        return Ok(());
    };
    let segments: Vec<&str> = req
        .path
        .split('?')
        .next()
        .unwrap_or("")
        .split('/')
        .collect();
    if !authorized(&req, state) {
        respond(
            &mut writer,
            401,
            "Unauthorized",
            "WWW-Authenticate: Basic realm=\"StarRocks\"\r\n",
            "{\"status\":\"FAILED\",\"msg\":\"Access denied\"}",
        );
        return Ok(());
    }
    match segments.as_slice() {
        ["", "api", "transaction", op] => {
            let op = op.to_string();
            return serve_txn(&mut reader, &mut writer, role, be, &req, &op, state);
        }
        ["", "api", db, "get_load_state"] => {
            let label = query_param(&req.path, "label").unwrap_or_default();
            let mut s = state.lock().unwrap();
            expire(&mut s);
            let body = load_state(&s, db, &label);
            let answered = load_state_name(&s, db, &label);
            s.states_answered
                .push((label.clone(), answered.to_string()));
            drop(s);
            respond(&mut writer, 200, "OK", "", &body);
            return Ok(());
        }
        _ => {}
    }
    // ["", "api", db, table, action]
    let (db, table, action) = match segments.as_slice() {
        ["", "api", db, table, action] => (db.to_string(), table.to_string(), *action),
        _ => {
            respond(&mut writer, 404, "Not Found", "", "{}");
            return Ok(());
        }
    };
    match (role, req.method.as_str(), action) {
        (_, "GET", "_schema") => {
            let exists = state
                .lock()
                .unwrap()
                .tables
                .contains_key(&format!("{db}.{table}"));
            let body = if exists {
                "{\"status\":200,\"properties\":[]}".to_string()
            } else {
                format!("{{\"status\":404,\"exception\":\"table {db}.{table} not found\"}}")
            };
            respond(&mut writer, 200, "OK", "", &body);
        }
        (Role::Fe, "PUT", "_stream_load") => {
            let expects = req
                .headers
                .get("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            if !expects {
                // The body is coming anyway: swallow it before answering.
                let len: usize = req
                    .headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut sink = vec![0; len];
                reader.read_exact(&mut sink)?;
            }
            let location = format!("Location: http://{be}{}\r\n", req.path);
            respond(&mut writer, 307, "Temporary Redirect", &location, "");
        }
        (Role::Be, "PUT", "_stream_load") => {
            let fault = state.lock().unwrap().faults.pop_front();
            if let Some(Fault::Delay(d)) = &fault {
                // The injected fault itself: a slow StarRocks answering late.
                std::thread::sleep(*d);
            }
            if req
                .headers
                .get("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            {
                writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let Some(len) = req
                .headers
                .get("content-length")
                .and_then(|l| l.parse::<usize>().ok())
            else {
                respond(&mut writer, 411, "Length Required", "", "{}");
                return Ok(());
            };
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            if let Some(Fault::Drop) = fault {
                // Connection dropped after the upload, before any answer.
                let _ = writer.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            let answer = stream_load(state, &db, &table, &req, &body, fault);
            respond(&mut writer, 200, "OK", "", &answer);
        }
        _ => respond(&mut writer, 405, "Method Not Allowed", "", "{}"),
    }
    Ok(())
}

fn check(ty: ColType, v: &Cell) -> bool {
    match (ty, v) {
        (_, Cell::Null) | (ColType::Any, _) => true,
        (ColType::Int, Cell::Int(_)) => true,
        (ColType::Int, Cell::Json(v)) => v.is_u64(),
        (ColType::Int, Cell::Str(s)) => s.parse::<i64>().is_ok(),
        (ColType::Text, Cell::Str(_) | Cell::Int(_)) => true,
        (ColType::Text, Cell::Json(v)) => v.is_number(),
        (ColType::Bool, Cell::Bool(_)) => true,
        _ => false,
    }
}

/// Rows of one load, checked against the table: what [`apply_rows`] writes.
struct Parsed {
    /// The load's columns: the `columns` header (`__op` included when listed), or the
    /// table's.
    columns: Vec<String>,
    /// The good rows' values in `columns` order, one row after the other.
    cells: Vec<Cell>,
    /// Good rows.
    loaded: usize,
    total: usize,
    filtered: usize,
    partial: bool,
    /// The `columns` header (with the format and its parameters after it: see
    /// [`load_params`]) and `partial_update` (a transaction takes one set per table).
    params: (String, bool),
    /// `json` or `csv`.
    format: &'static str,
}

/// What a load is checked against: the table's key and columns when the load began (as
/// StarRocks plans a load against the schema of its start).
struct Schema {
    key: Vec<String>,
    columns: BTreeMap<String, ColType>,
    /// `NOT NULL` columns besides the key.
    not_null: std::collections::HashSet<String>,
    /// The emulator is in sink mode (see [`StarRocks::sink`]).
    sink: bool,
}

fn schema_of(s: &State, db: &str, table: &str) -> Result<Schema, Refusal> {
    match s.tables.get(&format!("{db}.{table}")) {
        Some(t) => Ok(Schema {
            key: t.key.clone(),
            columns: t.columns.clone(),
            not_null: t.not_null.clone(),
            sink: s.sink,
        }),
        None => Err(Refusal::new(format!("Table {table} does not exist"))),
    }
}
/// Why a load was refused: the message, total and filtered rows, and an error URL.
struct Refusal {
    message: String,
    total: usize,
    filtered: usize,
    error_url: Option<String>,
}

impl Refusal {
    fn new(message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            total: 0,
            filtered: 0,
            error_url: None,
        }
    }
}

/// Parses and checks a load's body against `db.table` as StarRocks does before writing.
/// Column types from a type name in DDL (`BIGINT`, `VARCHAR(12)`, `DECIMAL(10,2)`).
fn col_type(ty: &str) -> ColType {
    let base = ty
        .split('(')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_uppercase();
    match base.as_str() {
        "TINYINT" | "SMALLINT" | "INT" | "INTEGER" | "BIGINT" | "LARGEINT" => ColType::Int,
        "VARCHAR" | "CHAR" | "STRING" => ColType::Text,
        "BOOLEAN" => ColType::Bool,
        _ => ColType::Any,
    }
}

fn type_text(t: ColType) -> &'static str {
    match t {
        ColType::Int => "int(11)",
        ColType::Text => "varchar(65533)",
        ColType::Bool => "boolean",
        ColType::Any => "json",
    }
}

/// `information_schema.columns` spelling of a DDL type.
fn ddl_type_text(ty: &str) -> String {
    let t = ty.trim().to_ascii_lowercase();
    match t.as_str() {
        "string" => "varchar(65533)".into(),
        "int" => "int(11)".into(),
        "bigint" => "bigint(20)".into(),
        "smallint" => "smallint(6)".into(),
        "tinyint" => "tinyint(4)".into(),
        _ => t,
    }
}

/// Whether a transaction begun before `job` (its id is the job's watershed) still loads the
/// job's table: StarRocks' schema change job waits for those (`WAITING_TXN`, "the load jobs
/// before the watershed transaction id") before its columns change. A transaction loads a
/// table once begun for it or once a load into it arrived.
fn waits_for_txn(s: &State, job: &Job) -> bool {
    let (db, table) = job.table.split_once('.').unwrap_or(("", ""));
    s.txns.iter().any(|(key, t)| {
        t.id < job.id
            && matches!(t.state, TxnState::Prepare | TxnState::Prepared)
            && key.split_once('/').is_some_and(|(d, _)| d == db)
            && (t.table.as_deref() == Some(table) || t.params.contains_key(table))
    })
}

/// Finishes the schema change jobs whose time has come and that wait for no transaction:
/// their column changes happen now.
fn advance_jobs(s: &mut State) {
    expire(s);
    let due = s.job_duration;
    let ready: Vec<u64> = s
        .jobs
        .iter()
        .filter(|j| !j.finished && j.created.elapsed() >= due && !waits_for_txn(s, j))
        .map(|j| j.id)
        .collect();
    let mut done = Vec::new();
    for job in s.jobs.iter_mut().filter(|j| ready.contains(&j.id)) {
        job.finished = true;
        done.push((job.table.clone(), job.op.clone()));
    }
    for (table, op) in done {
        let Some(t) = s.tables.get_mut(&table) else {
            continue;
        };
        match op {
            AlterOp::Add(name, ty) | AlterOp::Modify(name, ty) => {
                t.set_column(name, col_type(&ty), ddl_type_text(&ty));
            }
            AlterOp::Drop(name) => t.drop_column(&name),
        }
    }
}

/// Parses and checks a load's body as StarRocks does before writing. Runs without the
/// emulator's lock, so loads in parallel parse in parallel.
fn parse_rows(
    schema: &Schema,
    table: &str,
    req: &Request,
    body: &[u8],
    txn: u64,
) -> Result<Parsed, Refusal> {
    let types = &schema.columns;
    let columns: Vec<String> = match req.headers.get("columns") {
        Some(c) => c.split(',').map(|c| c.trim().to_string()).collect(),
        None => types.keys().cloned().collect(),
    };
    let format = req
        .headers
        .get("format")
        .map_or("csv".to_string(), |f| f.to_ascii_lowercase());
    let json = format == "json";
    let strip = req
        .headers
        .get("strip_outer_array")
        .is_some_and(|v| v == "true");
    let partial = req
        .headers
        .get("partial_update")
        .is_some_and(|v| v == "true");
    let max_ratio: f64 = req
        .headers
        .get("max_filter_ratio")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if format == "csv" {
        return parse_csv(schema, table, req, body, txn, &columns, partial, max_ratio);
    }
    if !json {
        return Err(Refusal::new(format!("unknown format {format}")));
    }
    if schema.sink {
        return count_rows(&columns, types, table, strip, partial, req, body);
    }
    let parsed: Value =
        sonic_rs::from_slice(body).map_err(|e| Refusal::new(format!("invalid JSON: {e}")))?;
    let rows: &[Value] = if strip {
        match parsed.as_array() {
            Some(a) => a.as_slice(),
            None => return Err(Refusal::new("strip_outer_array needs an array")),
        }
    } else {
        std::slice::from_ref(&parsed)
    };
    // Unknown columns in the header fail the whole load, as in StarRocks.
    for c in &columns {
        if c != "__op" && !types.contains_key(c) {
            return Err(Refusal {
                total: rows.len(),
                ..Refusal::new(format!("Unknown column '{c}' in '{table}'"))
            });
        }
    }
    // Per column of the load: its type to check (none for `__op`).
    let checks: Vec<Option<ColType>> = columns
        .iter()
        .map(|c| (c != "__op").then(|| types[c]))
        .collect();
    // Where each key column sits in the load (a key column the load does not name is NULL).
    let key_at: Vec<Option<usize>> = schema
        .key
        .iter()
        .map(|k| columns.iter().position(|c| c == k))
        .collect();
    // A `NOT NULL` column the load names: a row that gives it NULL (or leaves it out of
    // its object, which reads as NULL) is filtered.
    let required: Vec<bool> = columns
        .iter()
        .map(|c| schema.not_null.contains(c))
        .collect();
    let mut cells = Vec::with_capacity(rows.len() * columns.len());
    let (mut loaded, mut filtered) = (0, 0);
    for row in rows {
        let Some(obj) = row.as_object() else {
            filtered += 1;
            continue;
        };
        let start = cells.len();
        let mut ok = true;
        for ((c, ty), &required) in columns.iter().zip(&checks).zip(&required) {
            let v = obj.get(c).map(Cell::from_json).unwrap_or_default();
            if ty.is_some_and(|ty| !check(ty, &v)) || (required && v.is_null()) {
                ok = false;
            }
            cells.push(v);
        }
        if key_at
            .iter()
            .any(|at| at.is_none_or(|i| cells[start + i].is_null()))
        {
            ok = false;
        }
        if ok {
            loaded += 1;
        } else {
            cells.truncate(start);
            filtered += 1;
        }
    }
    if !rows.is_empty() && filtered as f64 / rows.len() as f64 > max_ratio {
        return Err(Refusal {
            message: "too many filtered rows".into(),
            total: rows.len(),
            filtered,
            error_url: Some(format!(
                "http://emulator/api/_load_error_log?file=error_{txn}"
            )),
        });
    }
    Ok(Parsed {
        columns,
        cells,
        loaded,
        total: rows.len(),
        filtered,
        partial,
        params: (load_params(req), partial),
        format: "json",
    })
}

/// The parameters a transaction takes once per table, as one text: `columns`, the format
/// and its options (StarRocks plans every load of a table in a transaction with the first
/// one's, and documents that they must agree).
fn load_params(req: &Request) -> String {
    let h = |name: &str| req.headers.get(name).cloned().unwrap_or_default();
    format!(
        "{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}",
        h("columns"),
        h("format").to_ascii_lowercase(),
        h("column_separator"),
        h("row_delimiter"),
        h("enclose"),
        h("escape")
    )
}

/// A CSV load as StarRocks reads it (the STREAM LOAD reference, "CSV parameters"): fields
/// split by `column_separator` (default a tab), rows by `row_delimiter` (default `\n`);
/// with `enclose` a field that starts with it runs to its closing one, separators and row
/// delimiters inside are data, and a doubled one is one; `escape` makes the next byte data,
/// inside and outside `enclose`. `\N` is NULL (compared with the field once its enclosing
/// quotes are off, as StarRocks' nullable converter compares the field's slice), an empty
/// field an empty string. A row whose field count differs from the columns', or whose
/// value does not convert (an integer column, a boolean one: `true`, `false` in any case,
/// or a number, nonzero being true), is filtered.
#[allow(clippy::too_many_arguments)]
fn parse_csv(
    schema: &Schema,
    table: &str,
    req: &Request,
    body: &[u8],
    txn: u64,
    columns: &[String],
    partial: bool,
    max_ratio: f64,
) -> Result<Parsed, Refusal> {
    let types = &schema.columns;
    let sep = req
        .headers
        .get("column_separator")
        .map_or(b"\t".to_vec(), |v| v.as_bytes().to_vec());
    let row_end = match req.headers.get("row_delimiter").map(String::as_str) {
        None | Some("\\n") => b'\n',
        Some(v) => v.bytes().next().unwrap_or(b'\n'),
    };
    let single = |name: &str| -> Result<Option<u8>, Refusal> {
        match req.headers.get(name) {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(v.bytes().next()),
            Some(v) => Err(Refusal::new(format!(
                "{name} must be a single-byte character, not {v:?}"
            ))),
        }
    };
    let (enclose, escape) = (single("enclose")?, single("escape")?);
    if sep.is_empty() {
        return Err(Refusal::new("column_separator is empty"));
    }
    for c in columns {
        if c != "__op" && !types.contains_key(c) {
            return Err(Refusal::new(format!("Unknown column '{c}' in '{table}'")));
        }
    }
    if schema.sink && escape.is_none() {
        // Sink mode: the rows are thrown away, so they are counted by their delimiters
        // outside enclosed fields, not split into values (a real StarRocks parses them, on
        // machines of its own, not on the cores the benchmark shares with pgprism).
        let rows = count_csv_rows(body, row_end, enclose);
        return Ok(Parsed {
            columns: columns.to_vec(),
            cells: Vec::new(),
            loaded: rows,
            total: rows,
            filtered: 0,
            partial,
            params: (load_params(req), partial),
            format: "csv",
        });
    }
    let key_at: Vec<Option<usize>> = schema
        .key
        .iter()
        .map(|k| columns.iter().position(|c| c == k))
        .collect();
    let checks: Vec<ColType> = columns
        .iter()
        .map(|c| if c == "__op" { ColType::Int } else { types[c] })
        .collect();
    let required: Vec<bool> = columns
        .iter()
        .map(|c| schema.not_null.contains(c))
        .collect();
    let mut cells = Vec::new();
    let (mut loaded, mut filtered) = (0, 0);
    let rows = split_csv(body, &sep, row_end, enclose, escape, |row| {
        let start = cells.len();
        let mut ok = row.len() == columns.len();
        if ok {
            for ((ty, field), &required) in checks.iter().zip(row).zip(&required) {
                if required && field.is_none() {
                    ok = false;
                }
                match csv_cell(*ty, field.as_deref(), schema.sink) {
                    Some(cell) => cells.push(cell),
                    None => ok = false,
                }
            }
        }
        if ok && key_at.iter().any(|at| at.is_none_or(|i| row[i].is_none())) {
            ok = false;
        }
        if ok {
            loaded += 1;
        } else {
            filtered += 1;
        }
        if !ok || schema.sink {
            cells.truncate(start);
        }
    })
    .map_err(|e| Refusal::new(format!("malformed CSV: {e}")))?;
    if rows > 0 && filtered as f64 / rows as f64 > max_ratio {
        return Err(Refusal {
            message: "too many filtered rows".into(),
            total: rows,
            filtered,
            error_url: Some(format!(
                "http://emulator/api/_load_error_log?file=error_{txn}"
            )),
        });
    }
    Ok(Parsed {
        columns: columns.to_vec(),
        cells,
        loaded,
        total: rows,
        filtered,
        partial,
        params: (load_params(req), partial),
        format: "csv",
    })
}

/// The rows of a CSV body: row delimiters outside `enclose`d fields (a doubled `enclose`
/// inside one toggles twice), and a last row without its delimiter.
fn count_csv_rows(body: &[u8], row_end: u8, enclose: Option<u8>) -> usize {
    let mut rows = match enclose {
        None => memchr::memchr_iter(row_end, body).count(),
        Some(q) => {
            let (mut rows, mut enclosed) = (0, false);
            for i in memchr::memchr2_iter(q, row_end, body) {
                if body[i] == q {
                    enclosed = !enclosed;
                } else if !enclosed {
                    rows += 1;
                }
            }
            rows
        }
    };
    if body.last().is_some_and(|&b| b != row_end) {
        rows += 1;
    }
    rows
}

/// A CSV field converted to a column of type `ty`; `None` when StarRocks would filter it.
/// `check_only` (sink mode): checked, not kept (no string copied).
fn csv_cell(ty: ColType, field: Option<&str>, check_only: bool) -> Option<Cell> {
    let Some(text) = field else {
        return Some(Cell::Null);
    };
    match ty {
        ColType::Text | ColType::Any if check_only => Some(Cell::Null),
        ColType::Int => text.parse::<i64>().ok().map(Cell::Int),
        ColType::Bool => {
            if text.eq_ignore_ascii_case("true") {
                Some(Cell::Bool(true))
            } else if text.eq_ignore_ascii_case("false") {
                Some(Cell::Bool(false))
            } else {
                text.parse::<f64>().ok().map(|f| Cell::Bool(f != 0.0))
            }
        }
        ColType::Text | ColType::Any => Some(Cell::Str(text.into())),
    }
}

/// Calls `each` with every row's fields (`None`: `\N`), borrowed from the body unless a
/// doubled `enclose` or an `escape` changed them; returns the rows. An error for an
/// unterminated `enclose` or a field that is not UTF-8.
fn split_csv<'a>(
    body: &'a [u8],
    sep: &[u8],
    row_end: u8,
    enclose: Option<u8>,
    escape: Option<u8>,
    mut each: impl FnMut(&[Option<std::borrow::Cow<'a, str>>]),
) -> Result<usize, String> {
    use std::borrow::Cow;
    let utf8 = |b: Vec<u8>| String::from_utf8(b).map_err(|_| "a field is not UTF-8".to_string());
    let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| "a field is not UTF-8".to_string());
    let mut fields: Vec<Option<Cow<'a, str>>> = Vec::new();
    let mut rows = 0;
    let mut i = 0;
    while i < body.len() {
        // One field from `i`: its bytes (borrowed while untouched) and where it ended.
        let start = i;
        let mut owned: Option<Vec<u8>> = None;
        if let Some(q) = enclose.filter(|&q| body[i] == q) {
            let mut from = i + 1;
            loop {
                let Some(off) = body[from..]
                    .iter()
                    .position(|&b| b == q || Some(b) == escape)
                else {
                    return Err("an enclosed field is not closed".into());
                };
                let at = from + off;
                let o = owned.get_or_insert_with(Vec::new);
                o.extend_from_slice(&body[from..at]);
                if Some(body[at]) == escape && at + 1 < body.len() {
                    o.push(body[at + 1]);
                    from = at + 2;
                } else if body[at] == q && body.get(at + 1) == Some(&q) {
                    o.push(q);
                    from = at + 2;
                } else if body[at] == q {
                    i = at + 1;
                    break;
                } else {
                    return Err("an enclosed field is not closed".into());
                }
            }
        }
        // Up to the separator or the row's end (after a closing quote, anything is data).
        let mut end = i;
        let row_done = loop {
            if end >= body.len() {
                break true;
            }
            let b = body[end];
            if Some(b) == escape && end + 1 < body.len() {
                let o = owned.get_or_insert_with(|| body[start..i].to_vec());
                o.extend_from_slice(&body[i..end]);
                o.push(body[end + 1]);
                end += 2;
                i = end;
                continue;
            }
            if b == row_end {
                break true;
            }
            if body[end..].starts_with(sep) {
                break false;
            }
            // On to the next byte that may end the field or be an escape.
            let stop = escape.unwrap_or(row_end);
            end += 1 + memchr::memchr3(sep[0], row_end, stop, &body[end + 1..])
                .unwrap_or(body.len() - end - 1);
        };
        let value: Cow<'a, str> = match owned {
            Some(mut o) => {
                o.extend_from_slice(&body[i..end]);
                Cow::Owned(utf8(o)?)
            }
            None => Cow::Borrowed(text(&body[start..end])?),
        };
        fields.push((value != "\\N").then_some(value));
        if row_done {
            each(&fields);
            fields.clear();
            rows += 1;
            i = end + 1;
        } else {
            i = end + sep.len();
            if i >= body.len() {
                // A separator last: one more, empty field, and the row ends.
                fields.push(Some(Cow::Borrowed("")));
                each(&fields);
                fields.clear();
                rows += 1;
            }
        }
    }
    Ok(rows)
}

/// [`parse_rows`] of the sink mode: the header's columns must exist and the body must be
/// JSON, an array of objects with `strip_outer_array`; the rows are counted, not kept.
fn count_rows(
    columns: &[String],
    types: &BTreeMap<String, ColType>,
    table: &str,
    strip: bool,
    partial: bool,
    req: &Request,
    body: &[u8],
) -> Result<Parsed, Refusal> {
    let invalid = |e: sonic_rs::Error| Refusal::new(format!("invalid JSON: {e}"));
    let mut total = 0;
    if strip {
        if body.first() != Some(&b'[') {
            return Err(Refusal::new("strip_outer_array needs an array"));
        }
        for row in sonic_rs::to_array_iter(body) {
            let row = row.map_err(invalid)?;
            if !row.is_object() {
                return Err(Refusal::new("a row is not a JSON object"));
            }
            total += 1;
        }
    } else {
        let row: sonic_rs::LazyValue<'_> = sonic_rs::from_slice(body).map_err(invalid)?;
        if !row.is_object() {
            return Err(Refusal::new("a row is not a JSON object"));
        }
        total = 1;
    }
    if let Some(c) = columns
        .iter()
        .find(|c| *c != "__op" && !types.contains_key(*c))
    {
        return Err(Refusal {
            total,
            ..Refusal::new(format!("Unknown column '{c}' in '{table}'"))
        });
    }
    Ok(Parsed {
        columns: columns.to_vec(),
        cells: Vec::new(),
        loaded: total,
        total,
        filtered: 0,
        partial,
        params: (load_params(req), partial),
        format: "json",
    })
}

/// Writes checked rows into `db.table` in order (upserts, `__op` = 1 deletes, partial
/// updates merge the listed columns). The values move into the table, uncopied.
fn apply_rows(s: &mut State, db: &str, table: &str, parsed: Parsed) {
    *s.formats
        .entry((format!("{db}.{table}"), parsed.format))
        .or_default() += 1;
    *s.applied.entry(format!("{db}.{table}")).or_default() += parsed.loaded;
    if s.sink {
        return;
    }
    let Some(t) = s.tables.get_mut(&format!("{db}.{table}")) else {
        return;
    };
    let width = parsed.columns.len();
    if width == 0 {
        return;
    }
    // Columns dropped since the load was checked are not written.
    let slot_of: Vec<Option<usize>> = parsed
        .columns
        .iter()
        .map(|c| t.slots.get(c).copied())
        .collect();
    let op_at = parsed.columns.iter().position(|c| c == "__op");
    let Some(key_at) = t
        .key
        .iter()
        .map(|k| parsed.columns.iter().position(|c| c == k))
        .collect::<Option<Vec<usize>>>()
    else {
        // Checked at parse: a row without its key is filtered.
        return;
    };
    let slots = t.width;
    // What a row holds where the load gives it nothing (a new key of a partial update, or
    // any column a full row's load does not name): the column's default, else NULL.
    let defaults = t.default_cells();
    let mut key = String::new();
    let mut values = parsed.cells.into_iter();
    let mut row: Vec<Cell> = Vec::with_capacity(width);
    for _ in 0..parsed.loaded {
        row.clear();
        row.extend(values.by_ref().take(width));
        key.clear();
        for (n, &i) in key_at.iter().enumerate() {
            if n > 0 {
                key.push('|');
            }
            row[i].write_json(&mut key);
        }
        if op_at.is_some_and(|i| row[i] == Cell::Int(1)) {
            t.rows.remove(&RowKey::new(&key));
            continue;
        }
        let stored = t
            .rows
            .entry(RowKey::new(&key))
            .or_insert_with(|| defaults.clone().into_boxed_slice());
        if stored.len() < slots {
            let mut wider = std::mem::take(stored).into_vec();
            wider.resize(slots, Cell::Null);
            *stored = wider.into_boxed_slice();
        }
        if !parsed.partial {
            // A full upsert replaces the row: unlisted columns take their default.
            stored.clone_from_slice(&defaults);
        }
        for (v, slot) in row.drain(..).zip(&slot_of) {
            if let Some(&i) = slot.as_ref() {
                stored[i] = v;
            }
        }
    }
}
/// After every change that became visible: the watched tables' keys, when watching.
fn record_visible(s: &mut State) {
    if s.watched.is_empty() {
        return;
    }
    let snapshot = s
        .watched
        .iter()
        .map(|name| {
            let keys = s
                .tables
                .get(name)
                .map(|t| t.rows.keys().map(|k| k.text.to_string()).collect())
                .unwrap_or_default();
            (name.clone(), keys)
        })
        .collect();
    s.visible.push(snapshot);
}

fn stream_load(
    state: &Mutex<State>,
    db: &str,
    table: &str,
    req: &Request,
    body: &[u8],
    fault: Option<Fault>,
) -> String {
    let mut s = state.lock().unwrap();
    advance_jobs(&mut s);
    s.txn += 1;
    let txn = s.txn;
    let label = req
        .headers
        .get("label")
        .cloned()
        .unwrap_or_else(|| format!("auto_{txn}"));
    let answer = |s: &mut State,
                  status: &str,
                  message: &str,
                  total: usize,
                  loaded: usize,
                  filtered: usize,
                  extra: &str| {
        s.log.push((label.clone(), status.to_string()));
        format!(
            "{{\"TxnId\":{txn},\"Label\":{},\"Status\":\"{status}\",\"Message\":{},\"NumberTotalRows\":{total},\"NumberLoadedRows\":{loaded},\"NumberFilteredRows\":{filtered},\"NumberUnselectedRows\":0,\"LoadBytes\":{},\"LoadTimeMs\":1,\"BeginTxnTimeMs\":0,\"StreamLoadPlanTimeMs\":0,\"ReadDataTimeMs\":0,\"WriteDataTimeMs\":0,\"CommitAndPublishTimeMs\":0{extra}}}",
            sonic_rs::to_string(&label).unwrap(),
            sonic_rs::to_string(message).unwrap(),
            body.len()
        )
    };
    if let Some(message) = label_refused(&label) {
        return answer(&mut s, "Fail", &message, 0, 0, 0, "");
    }
    let key = format!("{db}/{label}");
    if s.labels.contains_key(&key) {
        let existing = match s.txns.get(&key).map(|t| t.state) {
            Some(TxnState::Prepare) => "RUNNING",
            Some(TxnState::Prepared) => "PREPARED",
            None if s.labels[&key] == "RUNNING" => "RUNNING",
            _ => "FINISHED",
        };
        return answer(
            &mut s,
            "Label Already Exists",
            &format!("Label [{label}] has already been used."),
            0,
            0,
            0,
            &format!(",\"ExistingJobStatus\":\"{existing}\""),
        );
    }
    if let Some(Fault::Fail) = fault {
        return answer(&mut s, "Fail", "injected failure", 0, 0, 0, "");
    }
    let refuse = |s: &mut State, r: Refusal| {
        let extra = r
            .error_url
            .map(|u| format!(",\"ErrorURL\":\"{u}\""))
            .unwrap_or_default();
        answer(s, "Fail", &r.message, r.total, 0, r.filtered, &extra)
    };
    let schema = match schema_of(&s, db, table) {
        Ok(schema) => schema,
        Err(r) => return refuse(&mut s, r),
    };
    // The label is the load's while it runs: a second load under it is told so.
    s.labels.insert(key.clone(), "RUNNING".into());
    drop(s);
    let parsed = parse_rows(&schema, table, req, body, txn);
    let mut s = state.lock().unwrap();
    let parsed = match parsed {
        Ok(p) => p,
        Err(r) => {
            // A failed load leaves its label free.
            s.labels.remove(&key);
            return refuse(&mut s, r);
        }
    };
    let (total, loaded, filtered) = (parsed.total, parsed.loaded, parsed.filtered);
    apply_rows(&mut s, db, table, parsed);
    record_visible(&mut s);
    s.labels.insert(key, "FINISHED".into());
    let status = if let Some(Fault::PublishTimeout) = fault {
        "Publish Timeout"
    } else {
        "Success"
    };
    answer(&mut s, status, "OK", total, loaded, filtered, "")
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// The FE's transaction timeouts, as StarRocks documents them: a transaction not prepared
/// within begin's `timeout`, or that received no load for `idle_transaction_timeout`, is
/// aborted; a prepared one not committed within prepare's `prepared_timeout` too. (The FE
/// checks on its own schedule; checking at every request is indistinguishable to a client.)
fn expire(s: &mut State) {
    let now = std::time::Instant::now();
    // In commit order: one still publishing holds back those committed after it.
    let mut late: Vec<(u64, bool, String)> = s
        .txns
        .iter()
        .filter(|(_, t)| t.state == TxnState::Committed)
        .map(|(key, t)| {
            (
                t.committed,
                t.publish_at.is_some_and(|at| now >= at),
                key.clone(),
            )
        })
        .collect();
    late.sort();
    let published: Vec<(String, String)> = late
        .into_iter()
        .take_while(|(_, due, _)| *due)
        .filter_map(|(_, _, key)| {
            key.split_once('/')
                .map(|(db, _)| (key.clone(), db.to_string()))
        })
        .collect();
    for (key, db) in published {
        let Some(t) = s.txns.get_mut(&key) else {
            continue;
        };
        t.state = TxnState::Visible;
        let staged = std::mem::take(&mut t.staged);
        for (table, parsed) in staged {
            apply_rows(s, &db, &table, parsed);
        }
        record_visible(s);
        s.labels.insert(key, "VISIBLE".into());
    }
    let mut expired = Vec::new();
    for (key, t) in s.txns.iter_mut() {
        let gone = match t.state {
            TxnState::Prepare => {
                now > t.deadline || t.idle.is_some_and(|idle| now > t.active + idle)
            }
            TxnState::Prepared => t.prepared_deadline.is_some_and(|d| now > d),
            _ => false,
        };
        if gone {
            t.state = TxnState::Aborted;
            t.staged.clear();
            expired.push(key.clone());
        }
    }
    for key in expired {
        s.labels.remove(&key);
        let label = key
            .split_once('/')
            .map_or(key.clone(), |(_, l)| l.to_string());
        s.log.push((label, "TIMEOUT".into()));
    }
}

/// Why StarRocks refuses `label`, if it does. The FE checks labels against
/// `^[-\w]{1,128}$` (Java's `\w`: ASCII letters, digits, `_`), so `-` is taken although the
/// "System limits" page names only digits, letters and underscores; the emulator applies
/// the FE's own rule.
fn label_refused(label: &str) -> Option<String> {
    let valid = (1..=128).contains(&label.len())
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (!valid).then(|| {
        format!(
            "Label format error: a label is 1 to 128 of [-_A-Za-z0-9], not [{label}] ({} characters)",
            label.chars().count()
        )
    })
}

/// `GET /api/{db}/get_load_state?label=`: the state of a transaction or load by label.
fn load_state(s: &State, db: &str, label: &str) -> String {
    let state = load_state_name(s, db, label);
    format!("{{\"status\":\"OK\",\"msg\":\"Success\",\"state\":\"{state}\"}}")
}

fn load_state_name(s: &State, db: &str, label: &str) -> &'static str {
    let key = format!("{db}/{label}");
    match s.txns.get(&key) {
        Some(t) => t.state.name(),
        // A plain load still running is a transaction not yet committed.
        None if s.labels.get(&key).is_some_and(|l| l == "RUNNING") => "PREPARE",
        None if s.labels.contains_key(&key) => "VISIBLE",
        None => "UNKNOWN",
    }
}

fn txn_answer(id: u64, label: &str, status: &str, message: &str, extra: &str) -> String {
    format!(
        "{{\"TxnId\":{id},\"Label\":{},\"Status\":\"{status}\",\"Message\":{}{extra}}}",
        sonic_rs::to_string(label).unwrap(),
        sonic_rs::to_string(message).unwrap()
    )
}

/// The Stream Load transaction interface. The FE answers begin, prepare, commit and rollback
/// and redirects a load to a BE, which checks the rows and stages them in the transaction;
/// the commit applies every staged load of every table at once, under one lock, so no
/// reader ever sees a part of it.
fn serve_txn(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    role: Role,
    be: SocketAddr,
    req: &Request,
    op: &str,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let header = |name: &str| req.headers.get(name).cloned().unwrap_or_default();
    let (label, db, table) = (
        header("label"),
        header("db"),
        req.headers.get("table").cloned(),
    );
    if op == "load" {
        let expects = req
            .headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if role == Role::Fe {
            if !expects {
                let len: usize = req
                    .headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut sink = vec![0; len];
                reader.read_exact(&mut sink)?;
            }
            let location = format!("Location: http://{be}{}\r\n", req.path);
            respond(writer, 307, "Temporary Redirect", &location, "");
            return Ok(());
        }
        let fault = state.lock().unwrap().faults.pop_front();
        if let Some(Fault::Delay(d)) = &fault {
            std::thread::sleep(*d);
        }
        if expects {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let len: usize = req
            .headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let answer = txn_load(
            state,
            &db,
            table.as_deref().unwrap_or(""),
            &label,
            req,
            &body,
            &fault,
        );
        if let Some(Fault::Drop) = fault {
            // Staged, but the answer is lost.
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        respond(writer, 200, "OK", "", &answer);
        return Ok(());
    }
    let fault = if op == "commit" {
        state.lock().unwrap().txn_faults.pop_front()
    } else {
        None
    };
    if let Some(TxnFault::FeRestart) = fault {
        let mut s = state.lock().unwrap();
        for t in s.txns.values_mut() {
            if t.state == TxnState::Prepare {
                t.state = TxnState::Aborted;
            }
        }
        s.labels.retain(|_, status| status != "PREPARE");
        s.log.push((label.clone(), "FE restart".into()));
        drop(s);
        let _ = writer.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    let seconds = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
    };
    let timeouts = Timeouts {
        timeout: seconds("timeout"),
        idle: seconds("idle_transaction_timeout"),
        prepared: seconds("prepared_timeout"),
    };
    if let Some(TxnFault::PublishLate(d)) = fault {
        state.lock().unwrap().publish_delay = Some(d);
    }
    let mut answer = txn_control(state, op, &db, &label, table.as_deref(), timeouts);
    match fault {
        Some(TxnFault::CommitAnswersError) => {
            let id = state
                .lock()
                .unwrap()
                .txns
                .get(&format!("{db}/{label}"))
                .map_or(0, |t| t.id);
            answer = txn_answer(id, &label, "FAILED", "commit timeout", "");
        }
        Some(TxnFault::Delay(d)) => std::thread::sleep(d),
        _ => {}
    }
    state.lock().unwrap().publish_delay = None;
    respond(writer, 200, "OK", "", &answer);
    Ok(())
}

/// The timeout headers of begin and prepare.
struct Timeouts {
    /// `timeout` (begin): how long the transaction may take to be prepared (default 600 s,
    /// the FE's `stream_load_default_timeout_second`).
    timeout: Option<Duration>,
    /// `idle_transaction_timeout` (begin): longest time without a load.
    idle: Option<Duration>,
    /// `prepared_timeout` (prepare): how long it may stay prepared (default 86400 s, the FE's
    /// `prepared_transaction_default_timeout_second`).
    prepared: Option<Duration>,
}

/// Begin, prepare, commit and rollback.
fn txn_control(
    state: &Mutex<State>,
    op: &str,
    db: &str,
    label: &str,
    table: Option<&str>,
    timeouts: Timeouts,
) -> String {
    let mut s = state.lock().unwrap();
    expire(&mut s);
    let publish_delay = s.publish_delay.take();
    let key = format!("{db}/{label}");
    if label.is_empty() || db.is_empty() {
        return txn_answer(0, label, "FAILED", "label and db are required", "");
    }
    let now = std::time::Instant::now();
    if op == "begin" {
        if let Some(message) = label_refused(label) {
            s.log.push((label.to_string(), "Fail".into()));
            return txn_answer(0, label, "FAILED", &message, "");
        }
        if s.single_table_txns && table.is_none() {
            return txn_answer(0, label, "FAILED", "No table name in request", "");
        }
        let existing = s.txns.get(&key).map(|t| t.state);
        if existing.is_some_and(|st| st != TxnState::Aborted)
            || (existing.is_none() && s.labels.contains_key(&key))
        {
            let job = match existing {
                Some(TxnState::Prepare) => "RUNNING",
                Some(TxnState::Prepared) => "PREPARED",
                _ => "FINISHED",
            };
            s.log
                .push((label.to_string(), "LABEL_ALREADY_EXISTS".into()));
            return txn_answer(
                0,
                label,
                "LABEL_ALREADY_EXISTS",
                &format!("Label [{label}] has already been used."),
                &format!(",\"ExistingJobStatus\":\"{job}\""),
            );
        }
        s.txn += 1;
        let id = s.txn;
        s.txns.insert(
            key.clone(),
            Txn {
                id,
                table: table.map(str::to_string),
                state: TxnState::Prepare,
                staged: Vec::new(),
                params: HashMap::new(),
                deadline: now + timeouts.timeout.unwrap_or(Duration::from_secs(600)),
                idle: timeouts.idle,
                active: now,
                prepared_deadline: None,
                publish_at: None,
                committed: 0,
            },
        );
        s.labels.insert(key, "PREPARE".into());
        s.log.push((label.to_string(), "BEGIN".into()));
        return txn_answer(id, label, "OK", "", ",\"BeginTxnTimeMs\":0");
    }
    let next_commit = s.commits + 1;
    let Some(t) = s.txns.get_mut(&key) else {
        return txn_answer(0, label, "FAILED", "Transcation Not Exist", "");
    };
    let id = t.id;
    let status = match (op, t.state) {
        ("prepare", TxnState::Prepare) => {
            t.state = TxnState::Prepared;
            t.prepared_deadline =
                Some(now + timeouts.prepared.unwrap_or(Duration::from_secs(86_400)));
            "PREPARED"
        }
        ("commit", TxnState::Prepared) if publish_delay.is_some() => {
            t.state = TxnState::Committed;
            t.publish_at = publish_delay.map(|d| now + d);
            t.committed = next_commit;
            s.commits = next_commit;
            s.labels.insert(key, "COMMITTED".into());
            s.log.push((label.to_string(), "COMMIT".into()));
            return txn_answer(id, label, "OK", "publish timeout", "");
        }
        ("commit", TxnState::Committed) => {
            return txn_answer(id, label, "OK", "publish timeout", "");
        }
        ("commit", TxnState::Prepared) => {
            let staged = std::mem::take(&mut t.staged);
            t.state = TxnState::Visible;
            for (table, parsed) in staged {
                apply_rows(&mut s, db, &table, parsed);
            }
            record_visible(&mut s);
            s.labels.insert(key, "VISIBLE".into());
            "COMMIT"
        }
        ("commit", TxnState::Visible) => {
            return txn_answer(id, label, "OK", "Transaction already commited", "");
        }
        ("rollback", TxnState::Prepare | TxnState::Prepared) => {
            t.state = TxnState::Aborted;
            t.staged.clear();
            s.labels.remove(&key);
            "ROLLBACK"
        }
        _ => return txn_answer(id, label, "FAILED", "Transcation State Invalid", ""),
    };
    s.log.push((label.to_string(), status.into()));
    txn_answer(id, label, "OK", "", "")
}

/// A load into an open transaction: checked now, applied at commit. Any failure aborts the
/// transaction, as StarRocks documents.
fn txn_load(
    state: &Mutex<State>,
    db: &str,
    table: &str,
    label: &str,
    req: &Request,
    body: &[u8],
    fault: &Option<Fault>,
) -> String {
    let mut s = state.lock().unwrap();
    advance_jobs(&mut s);
    // A load that arrives after the transaction's timeout finds it aborted.
    expire(&mut s);
    let key = format!("{db}/{label}");
    let single = s.single_table_txns;
    let (id, txn_state, bound) = match s.txns.get(&key) {
        Some(t) => (t.id, t.state, t.table.clone()),
        None => return txn_answer(0, label, "FAILED", "TXN_NOT_EXISTS", ""),
    };
    let abort = |s: &mut State, message: &str, filtered: usize, url: Option<String>| {
        if let Some(t) = s.txns.get_mut(&key) {
            t.state = TxnState::Aborted;
            t.staged.clear();
        }
        s.labels.remove(&key);
        s.log.push((label.to_string(), "Fail".into()));
        let extra = format!(
            ",\"NumberFilteredRows\":{filtered}{}",
            url.map(|u| format!(",\"ErrorURL\":\"{u}\""))
                .unwrap_or_default()
        );
        txn_answer(id, label, "FAILED", message, &extra)
    };
    if txn_state != TxnState::Prepare {
        return txn_answer(id, label, "FAILED", "Transcation State Invalid", "");
    }
    if let Some(Fault::Fail) = fault {
        return abort(&mut s, "injected failure", 0, None);
    }
    if single && bound.as_deref() != Some(table) {
        return abort(
            &mut s,
            &format!(
                "load into {table} in a transaction begun for another table: multi-table transactions need StarRocks 4.0"
            ),
            0,
            None,
        );
    }
    let schema = match schema_of(&s, db, table) {
        Ok(schema) => schema,
        Err(r) => return abort(&mut s, &r.message, r.filtered, r.error_url),
    };
    let altered = format!("{db}.{table}");
    if s.jobs
        .iter()
        .any(|j| j.finished && j.id > id && j.table == altered)
    {
        s.across_schema_change.push(label.to_string());
    }
    // Parsed without the lock: loads in parallel (snapshot workers) parse in parallel.
    drop(s);
    let parsed = parse_rows(&schema, table, req, body, id);
    let mut s = state.lock().unwrap();
    // Meanwhile the transaction may have been rolled back, or begun again under its label.
    if !s
        .txns
        .get(&key)
        .is_some_and(|t| t.id == id && t.state == TxnState::Prepare)
    {
        return txn_answer(id, label, "FAILED", "Transcation State Invalid", "");
    }
    let parsed = match parsed {
        Ok(p) => p,
        Err(r) => return abort(&mut s, &r.message, r.filtered, r.error_url),
    };
    let params = s.txns.get(&key).and_then(|t| t.params.get(table).cloned());
    if params.is_some_and(|p| p != parsed.params) {
        return abort(
            &mut s,
            &format!(
                "the parameters of a load into {table} differ from the transaction's first load into it"
            ),
            0,
            None,
        );
    }
    let (total, loaded, filtered) = (parsed.total, parsed.loaded, parsed.filtered);
    let Some(t) = s.txns.get_mut(&key) else {
        return txn_answer(id, label, "FAILED", "TXN_NOT_EXISTS", "");
    };
    t.params.insert(table.to_string(), parsed.params.clone());
    t.active = std::time::Instant::now();
    t.staged.push((table.to_string(), parsed));
    let seq = t.staged.len() - 1;
    s.log.push((label.to_string(), "LOAD".into()));
    txn_answer(
        id,
        label,
        "OK",
        "",
        &format!(
            ",\"Seq\":{seq},\"NumberTotalRows\":{total},\"NumberLoadedRows\":{loaded},\"NumberFilteredRows\":{filtered},\"NumberUnselectedRows\":0,\"LoadBytes\":{}",
            body.len()
        ),
    )
}

fn mysql_read(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut body = vec![0; len];
    stream.read_exact(&mut body)?;
    Ok((head[3], body))
}

fn mysql_write(stream: &mut TcpStream, seq: u8, body: &[u8]) -> std::io::Result<()> {
    mysql_write_split(stream, &mut { seq }, body)
}

/// Writes one payload, split as the MySQL protocol splits payloads of 2^24 - 1 bytes or
/// more (full packets, then a shorter one, empty if need be), each with the next sequence id.
fn mysql_write_split(stream: &mut TcpStream, seq: &mut u8, body: &[u8]) -> std::io::Result<()> {
    const FULL: usize = 0xFF_FFFF;
    let mut rest = body;
    loop {
        let part = &rest[..rest.len().min(FULL)];
        let mut p = (part.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(*seq);
        p.extend_from_slice(part);
        stream.write_all(&p)?;
        *seq = seq.wrapping_add(1);
        rest = &rest[part.len()..];
        if part.len() < FULL {
            return Ok(());
        }
    }
}

const MYSQL_OK: [u8; 7] = [0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00];

fn mysql_err(code: u16, state: &str, message: &str) -> Vec<u8> {
    let mut p = vec![0xFF];
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(state.as_bytes());
    p.extend_from_slice(message.as_bytes());
    p
}

/// A length-encoded string.
fn lenenc(out: &mut Vec<u8>, text: &str) {
    let len = text.len();
    if len < 251 {
        out.push(len as u8);
    } else if len < 1 << 16 {
        out.push(0xFC);
        out.extend_from_slice(&(len as u16).to_le_bytes());
    } else if len < 1 << 24 {
        out.push(0xFD);
        out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xFE);
        out.extend_from_slice(&(len as u64).to_le_bytes());
    }
    out.extend_from_slice(text.as_bytes());
}

const MYSQL_EOF: [u8; 5] = [0xFE, 0x00, 0x00, 0x02, 0x00];

/// A text result set: column count, definitions, EOF, rows, EOF.
fn result_set(names: &[&str], rows: &[Vec<Option<String>>]) -> Vec<Vec<u8>> {
    let mut out = vec![vec![names.len() as u8]];
    for name in names {
        let mut def = Vec::new();
        for part in ["def", "", "", ""] {
            lenenc(&mut def, part);
        }
        lenenc(&mut def, name);
        lenenc(&mut def, name);
        def.push(0x0C);
        def.extend_from_slice(&33u16.to_le_bytes());
        def.extend_from_slice(&1024u32.to_le_bytes());
        def.push(0xFD);
        def.extend_from_slice(&[0, 0, 0, 0, 0]);
        out.push(def);
    }
    out.push(MYSQL_EOF.to_vec());
    for row in rows {
        let mut p = Vec::new();
        for v in row {
            match v {
                Some(v) => lenenc(&mut p, v),
                None => p.push(0xFB),
            }
        }
        out.push(p);
    }
    out.push(MYSQL_EOF.to_vec());
    out
}

/// `SHOW PROC '/transactions'` and below, as StarRocks documents the tree
/// (https://docs.starrocks.io/docs/sql-reference/sql-statements/cluster-management/nodes_processes/SHOW_PROC/,
/// "'/transactions': shows the information of transactions in the cluster"): the top level
/// lists the databases (`DbId`, `DbName`); `/transactions/<DbId>` the two lists, `running`
/// and `finished`; `/transactions/<DbId>/running` a database's unfinished transactions
/// (`PREPARE`, `PREPARED`, `COMMITTED`) with the columns of `SHOW TRANSACTION`
/// (https://docs.starrocks.io/docs/sql-reference/sql-statements/loading_unloading/SHOW_TRANSACTION/).
fn show_proc_transactions(s: &mut State, path: &str) -> Vec<Vec<u8>> {
    let err = |m: &str| vec![mysql_err(1064, "42000", m)];
    expire(s);
    // Database ids: stable for the emulator's life (its databases, by name).
    let mut dbs: Vec<String> = s
        .tables
        .keys()
        .filter_map(|k| k.split_once('.').map(|(db, _)| db.to_string()))
        .chain(
            s.txns
                .keys()
                .filter_map(|k| k.split_once('/').map(|(db, _)| db.to_string())),
        )
        .collect();
    dbs.sort();
    dbs.dedup();
    let id_of = |i: usize| (10_001 + i).to_string();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match parts.as_slice() {
        ["transactions"] => {
            let rows: Vec<Vec<Option<String>>> = dbs
                .iter()
                .enumerate()
                .map(|(i, db)| vec![Some(id_of(i)), Some(db.clone())])
                .collect();
            result_set(&["DbId", "DbName"], &rows)
        }
        ["transactions", id] if dbs.iter().enumerate().any(|(i, _)| id_of(i) == *id) => {
            let rows = [
                vec![Some("running".to_string())],
                vec![Some("finished".to_string())],
            ];
            result_set(&["State"], &rows)
        }
        ["transactions", id, "running"] => {
            let Some(db) = dbs
                .iter()
                .enumerate()
                .find(|(i, _)| id_of(*i) == *id)
                .map(|(_, db)| db.clone())
            else {
                return err(&format!("Database[{id}] does not exist"));
            };
            let mut txns: Vec<(&String, &Txn)> = s
                .txns
                .iter()
                .filter(|(k, t)| {
                    k.split_once('/').is_some_and(|(d, _)| d == db)
                        && matches!(
                            t.state,
                            TxnState::Prepare | TxnState::Prepared | TxnState::Committed
                        )
                })
                .collect();
            txns.sort_by_key(|(_, t)| t.id);
            let rows: Vec<Vec<Option<String>>> = txns
                .into_iter()
                .map(|(k, t)| {
                    let label = k.split_once('/').map_or("", |(_, l)| l);
                    let text = |v: &str| Some(v.to_string());
                    vec![
                        Some(t.id.to_string()),
                        text(label),
                        text("FE: 127.0.0.1"),
                        text(t.state.name()),
                        text("BACKEND_STREAMING"),
                        text("2026-01-01 00:00:00"),
                        text("NULL"),
                        text("NULL"),
                        text("NULL"),
                        text(""),
                        text("0"),
                        text("-1"),
                        Some(
                            t.deadline
                                .saturating_duration_since(t.active)
                                .as_millis()
                                .to_string(),
                        ),
                        text(""),
                    ]
                })
                .collect();
            result_set(
                &[
                    "TransactionId",
                    "Label",
                    "Coordinator",
                    "TransactionStatus",
                    "LoadJobSourceType",
                    "PrepareTime",
                    "CommitTime",
                    "PublishTime",
                    "FinishTime",
                    "Reason",
                    "ErrorReplicasCount",
                    "ListenerId",
                    "TimeoutMs",
                    "ErrMsg",
                ],
                &rows,
            )
        }
        _ => err(&format!(
            "the emulator answers SHOW PROC '/transactions' and below, not '{path}'"
        )),
    }
}

/// `` `db`.`t` `` or `db.t` → `db.t`.
fn unquote_name(text: &str) -> String {
    text.trim().replace('`', "")
}

/// The text between the first `open` at depth 0 and its matching `)`.
fn parenthesized(text: &str) -> Option<(&str, &str)> {
    let start = text.find('(')?;
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&text[start + 1..start + i], &text[start + i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits at commas outside parentheses.
fn split_top(text: &str) -> Vec<String> {
    let (mut parts, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur.trim().to_string());
    }
    parts
}

/// `` `name` TYPE [NOT] NULL `` → (name, TYPE).
fn column_def(def: &str) -> Option<(String, String)> {
    let def = def.trim();
    let rest = def.strip_prefix('`')?;
    let end = rest.find('`')?;
    let name = rest[..end].to_string();
    let ty = rest[end + 1..]
        .trim()
        .trim_end_matches("NOT NULL")
        .trim_end_matches("NULL")
        .trim()
        .to_string();
    Some((name, ty))
}

/// The FE query port's statements CDC sends: TRUNCATE TABLE, CREATE TABLE (a Primary Key
/// table, created at once), ALTER TABLE ADD / MODIFY / DROP COLUMN (a job that finishes
/// later; another ALTER of the table while one runs is refused, as in StarRocks), SHOW ALTER
/// TABLE COLUMN, the columns from `information_schema.columns`, and `SELECT` of a table's
/// rows by key ([`select_rows`]).
fn run_statement(s: &mut State, sql: &str) -> Vec<Vec<u8>> {
    let err = |m: &str| vec![mysql_err(1064, "42000", m)];
    if let Some(name) = sql.strip_prefix("TRUNCATE TABLE ") {
        let name = unquote_name(name);
        return match s.tables.get_mut(&name) {
            Some(t) => {
                t.rows.clear();
                vec![MYSQL_OK.to_vec()]
            }
            None => err(&format!("Unknown table '{name}'")),
        };
    }
    if let Some(rest) = sql.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
        let name_end = rest.find('(').unwrap_or(rest.len());
        let name = unquote_name(&rest[..name_end]);
        let Some((defs, tail)) = parenthesized(rest) else {
            return err("malformed CREATE TABLE");
        };
        let Some((keys, _)) = tail
            .find("PRIMARY KEY")
            .and_then(|i| parenthesized(&tail[i..]))
        else {
            return err("the emulator creates Primary Key tables only");
        };
        if s.tables.contains_key(&name) {
            return vec![MYSQL_OK.to_vec()];
        }
        let cols: Vec<(String, String)> = split_top(defs)
            .iter()
            .filter_map(|d| column_def(d))
            .collect();
        let key: Vec<String> = split_top(keys).iter().map(|k| unquote_name(k)).collect();
        // StarRocks: the key columns lead the column list.
        if cols.iter().take(key.len()).map(|c| &c.0).ne(key.iter()) {
            return err("The primary key columns must be the first columns of the table");
        }
        s.tables.insert(
            name,
            Table::new(
                key,
                cols.iter()
                    .map(|(n, t)| (n.clone(), col_type(t), ddl_type_text(t)))
                    .collect(),
            ),
        );
        return vec![MYSQL_OK.to_vec()];
    }
    if let Some(rest) = sql.strip_prefix("ALTER TABLE ") {
        let Some((name, action)) = rest.split_once(' ') else {
            return err("malformed ALTER TABLE");
        };
        let name = unquote_name(name);
        let Some(t) = s.tables.get(&name) else {
            return err(&format!("Unknown table '{name}'"));
        };
        if s.jobs.iter().any(|j| j.table == name && !j.finished) {
            return err(&format!(
                "Table[{name}]'s state(SCHEMA_CHANGE) is not NORMAL. Do not allow doing ALTER ops"
            ));
        }
        let op = if let Some(def) = action.strip_prefix("ADD COLUMN ") {
            match column_def(def) {
                Some((n, _)) if t.columns.contains_key(&n) => {
                    return err(&format!(
                        "Can not add column which already exists in base table: {n}"
                    ));
                }
                Some((n, ty)) => AlterOp::Add(n, ty),
                None => return err("malformed ADD COLUMN"),
            }
        } else if let Some(def) = action.strip_prefix("MODIFY COLUMN ") {
            match column_def(def) {
                Some((n, ty)) if t.columns.contains_key(&n) => AlterOp::Modify(n, ty),
                _ => return err("Column does not exists"),
            }
        } else if let Some(col) = action.strip_prefix("DROP COLUMN ") {
            let n = unquote_name(col);
            if t.key.contains(&n) {
                return err("Can not drop key column in primary data model table");
            }
            if !t.columns.contains_key(&n) {
                return err(&format!("Column does not exists: {n}"));
            }
            AlterOp::Drop(n)
        } else {
            return err("the emulator runs ADD, MODIFY and DROP COLUMN");
        };
        s.txn += 1;
        let id = s.txn;
        s.jobs.push(Job {
            id,
            table: name,
            op,
            created: std::time::Instant::now(),
            finished: false,
        });
        return vec![MYSQL_OK.to_vec()];
    }
    if let Some(path) = sql
        .strip_prefix("SHOW PROC '")
        .and_then(|p| p.strip_suffix('\''))
    {
        return show_proc_transactions(s, path);
    }
    if let Some(rest) = sql.strip_prefix("SHOW ALTER TABLE COLUMN FROM ") {
        let db = unquote_name(rest.split_whitespace().next().unwrap_or(""));
        let table = rest
            .split_once("TableName = ")
            .map(|(_, t)| t.trim().trim_matches('"').to_string());
        let due = s.job_duration;
        let rows: Vec<Vec<Option<String>>> = s
            .jobs
            .iter()
            .filter(|j| {
                let (jdb, jt) = j.table.split_once('.').unwrap_or(("", ""));
                jdb == db && table.as_deref().is_none_or(|t| t == jt)
            })
            .map(|j| {
                let state = if j.finished {
                    "FINISHED"
                } else if waits_for_txn(s, j) {
                    "WAITING_TXN"
                } else if j.created.elapsed() >= due / 2 {
                    "RUNNING"
                } else {
                    "PENDING"
                };
                let name = j.table.split_once('.').map(|x| x.1).unwrap_or("");
                vec![
                    Some(j.id.to_string()),
                    Some(name.to_string()),
                    Some(state.to_string()),
                    Some(String::new()),
                ]
            })
            .collect();
        return result_set(&["JobId", "TableName", "State", "Msg"], &rows);
    }
    if sql.starts_with(
        "SELECT COLUMN_NAME, IS_NULLABLE, COLUMN_DEFAULT FROM information_schema.columns",
    ) {
        let value = |key: &str| {
            sql.split_once(&format!("{key} = '"))
                .and_then(|(_, r)| r.split_once('\''))
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        };
        let name = format!("{}.{}", value("TABLE_SCHEMA"), value("TABLE_NAME"));
        let rows: Vec<Vec<Option<String>>> = s
            .tables
            .get(&name)
            .map(|t| {
                t.columns
                    .keys()
                    .map(|n| {
                        vec![
                            Some(n.clone()),
                            Some(if t.nullable(n) { "YES" } else { "NO" }.to_string()),
                            t.defaults.get(n).cloned(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        return result_set(&["COLUMN_NAME", "IS_NULLABLE", "COLUMN_DEFAULT"], &rows);
    }
    if sql.starts_with("SELECT ") && !sql.contains("information_schema") {
        // (A `LIMIT 0` check reads no rows.)
        if !sql.ends_with(" LIMIT 0") && s.txns.values().any(|t| t.state == TxnState::Committed) {
            s.reads_while_publishing.push(sql.to_string());
        }
        return select_rows(s, sql);
    }
    if sql.starts_with("SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.columns") {
        let value = |key: &str| {
            sql.split_once(&format!("{key} = '"))
                .and_then(|(_, r)| r.split_once('\''))
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        };
        let name = format!("{}.{}", value("TABLE_SCHEMA"), value("TABLE_NAME"));
        let rows: Vec<Vec<Option<String>>> = s
            .tables
            .get(&name)
            .map(|t| {
                t.types
                    .iter()
                    .map(|(n, ty)| vec![Some(n.clone()), Some(ty.clone())])
                    .collect()
            })
            .unwrap_or_default();
        return result_set(&["COLUMN_NAME", "COLUMN_TYPE"], &rows);
    }
    err("statement not supported by the emulator")
}

/// One token of a `SELECT`: a name (backquoted or bare), a string literal, or a symbol.
#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Sym(char),
}

fn tokens(sql: &str) -> Option<Vec<Token>> {
    let mut out = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '`' => {
                let mut name = String::new();
                loop {
                    match chars.next()? {
                        '`' => break,
                        c => name.push(c),
                    }
                }
                out.push(Token::Name(name));
            }
            '\'' => {
                // MySQL string literal: backslash escapes, '' for a quote.
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        '\\' => match chars.next()? {
                            '0' => text.push('\0'),
                            'n' => text.push('\n'),
                            't' => text.push('\t'),
                            c => text.push(c),
                        },
                        '\'' if chars.peek() == Some(&'\'') => {
                            chars.next();
                            text.push('\'');
                        }
                        '\'' => break,
                        c => text.push(c),
                    }
                }
                out.push(Token::Str(text));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut name = String::from(c);
                while let Some(&n) = chars.peek() {
                    if !(n.is_alphanumeric() || n == '_') {
                        break;
                    }
                    name.push(n);
                    chars.next();
                }
                out.push(Token::Name(name));
            }
            c => out.push(Token::Sym(c)),
        }
    }
    Some(out)
}

/// A value as StarRocks prints it over the MySQL text protocol: BOOLEAN as 1/0, JSON as
/// its text, strings and numbers as they are.
fn printed(v: &Cell) -> Option<String> {
    match v {
        Cell::Bool(b) => Some(if *b { "1" } else { "0" }.to_string()),
        v => text_of(v),
    }
}

/// `SELECT c1, c2 FROM db.t WHERE k IN ('a', ...)` or `WHERE (k1 = 'a' AND k2 = 'b') OR
/// (...)`: the visible (committed) rows, as StarRocks reads a Primary Key table (loads of
/// transactions not yet committed are not seen). The string literals compare with the key
/// values as StarRocks prints them (it casts the literal to the column's type).
fn select_rows(s: &State, sql: &str) -> Vec<Vec<u8>> {
    let err = |code: u16, m: &str| vec![mysql_err(code, "42000", m)];
    let Some(toks) = tokens(sql) else {
        return err(1064, "malformed SELECT");
    };
    let kw =
        |t: Option<&Token>, w: &str| matches!(t, Some(Token::Name(n)) if n.eq_ignore_ascii_case(w));
    let mut at = 1;
    let mut columns = Vec::new();
    while let Some(Token::Name(n)) = toks.get(at) {
        if n.eq_ignore_ascii_case("FROM") && !columns.is_empty() {
            break;
        }
        columns.push(n.clone());
        at += 1;
        if toks.get(at) == Some(&Token::Sym(',')) {
            at += 1;
        }
    }
    if !kw(toks.get(at), "FROM") {
        return err(
            1064,
            "the emulator runs SELECT columns FROM db.table WHERE key ...",
        );
    }
    let (Some(Token::Name(db)), Some(Token::Sym('.')), Some(Token::Name(table))) =
        (toks.get(at + 1), toks.get(at + 2), toks.get(at + 3))
    else {
        return err(1064, "SELECT needs db.table");
    };
    let Some(t) = s.tables.get(&format!("{db}.{table}")) else {
        return err(1146, &format!("Unknown table '{db}.{table}'"));
    };
    if s.select_denied.contains(&format!("{db}.{table}")) {
        // As StarRocks 3.x answers a user without the privilege.
        return vec![mysql_err(
            1064,
            "HY000",
            &format!(
                "Access denied; you need (at least one of) the SELECT privilege(s) on TABLE {table} for this operation"
            ),
        )];
    }
    if let Some(c) = columns.iter().find(|c| !t.columns.contains_key(*c)) {
        return err(1054, &format!("Unknown column '{c}' in 'field list'"));
    }
    at += 4;
    // `LIMIT 0`: the columns, no rows (a check that the table can be read).
    if kw(toks.get(at), "LIMIT") {
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        return result_set(&names, &[]);
    }
    if !kw(toks.get(at), "WHERE") {
        return err(1064, "the emulator runs SELECT ... WHERE key ...");
    }
    at += 1;
    // Wanted keys: each a list of (column, literal).
    let mut wanted: Vec<Vec<(String, String)>> = Vec::new();
    if let (Some(Token::Name(k)), true) = (toks.get(at), kw(toks.get(at + 1), "IN")) {
        at += 2;
        if toks.get(at) != Some(&Token::Sym('(')) {
            return err(1064, "IN needs a list");
        }
        at += 1;
        while let Some(Token::Str(v)) = toks.get(at) {
            wanted.push(vec![(k.clone(), v.clone())]);
            at += 1;
            if toks.get(at) == Some(&Token::Sym(',')) {
                at += 1;
            }
        }
        if toks.get(at) != Some(&Token::Sym(')')) {
            return err(1064, "malformed IN list");
        }
        at += 1;
    } else {
        loop {
            if toks.get(at) != Some(&Token::Sym('(')) {
                return err(1064, "malformed WHERE");
            }
            at += 1;
            let mut key = Vec::new();
            while let (Some(Token::Name(c)), Some(Token::Sym('=')), Some(Token::Str(v))) =
                (toks.get(at), toks.get(at + 1), toks.get(at + 2))
            {
                key.push((c.clone(), v.clone()));
                at += 3;
                if !kw(toks.get(at), "AND") {
                    break;
                }
                at += 1;
            }
            if toks.get(at) != Some(&Token::Sym(')')) || key.is_empty() {
                return err(1064, "malformed WHERE");
            }
            at += 1;
            wanted.push(key);
            if !kw(toks.get(at), "OR") {
                break;
            }
            at += 1;
        }
    }
    if at != toks.len() {
        return err(1064, "unexpected text after WHERE");
    }
    if let Some((c, _)) = wanted
        .iter()
        .flatten()
        .find(|(c, _)| !t.columns.contains_key(c))
    {
        return err(1054, &format!("Unknown column '{c}' in 'where clause'"));
    }
    let rows: Vec<Vec<Option<String>>> = t
        .rows
        .values()
        .filter(|row| {
            wanted.iter().any(|key| {
                key.iter()
                    .all(|(c, v)| t.value(row, c).and_then(printed).as_deref() == Some(v))
            })
        })
        .map(|row| {
            columns
                .iter()
                .map(|c| t.value(row, c).and_then(printed))
                .collect()
        })
        .collect();
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    result_set(&names, &rows)
}

fn serve_mysql(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let scramble: [u8; 20] = *b"0123456789abcdefghij";
    let mut hello = vec![10];
    hello.extend_from_slice(b"5.1.0\0");
    hello.extend_from_slice(&7u32.to_le_bytes());
    hello.extend_from_slice(&scramble[..8]);
    hello.push(0);
    hello.extend_from_slice(&0xF7FFu16.to_le_bytes());
    hello.push(33);
    hello.extend_from_slice(&2u16.to_le_bytes());
    hello.extend_from_slice(&0x0008u16.to_le_bytes());
    hello.push(21);
    hello.extend_from_slice(&[0; 10]);
    hello.extend_from_slice(&scramble[8..]);
    hello.push(0);
    hello.extend_from_slice(b"mysql_native_password\0");
    mysql_write(&mut stream, 0, &hello)?;
    let (seq, resp) = mysql_read(&mut stream)?;
    // caps(4) max(4) charset(1) filler(23) user\0 len auth
    let rest = resp.get(32..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let user = String::from_utf8_lossy(&rest[..end]).into_owned();
    let auth_len = rest.get(end + 1).copied().unwrap_or(0) as usize;
    let auth = rest
        .get(end + 2..end + 2 + auth_len)
        .unwrap_or_default()
        .to_vec();
    let (want_user, password) = {
        let s = state.lock().unwrap();
        (s.user.clone(), s.password.clone())
    };
    let expected = pgprism::cdc::mysql::native_password(&password, &scramble);
    if user != want_user || auth != expected {
        let msg = format!("Access denied for user '{user}'");
        return mysql_write(
            &mut stream,
            seq.wrapping_add(1),
            &mysql_err(1045, "28000", &msg),
        );
    }
    mysql_write(&mut stream, seq.wrapping_add(1), &MYSQL_OK)?;
    while let Ok((seq, cmd)) = mysql_read(&mut stream) {
        if cmd.first() != Some(&0x03) {
            return Ok(());
        }
        let sql = String::from_utf8_lossy(&cmd[1..]).into_owned();
        let mut s = state.lock().unwrap();
        s.statements.push(sql.clone());
        advance_jobs(&mut s);
        expire(&mut s);
        let packets = run_statement(&mut s, &sql);
        drop(s);
        let mut next = seq.wrapping_add(1);
        for packet in &packets {
            mysql_write_split(&mut stream, &mut next, packet)?;
        }
    }
    Ok(())
}
