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
//!   update of a missing row inserts it with NULL defaults), and answers the documented JSON.
//! * FE query port (MySQL protocol): handshake v10 with `mysql_native_password`, then
//!   `TRUNCATE TABLE db.t` (the only statement CDC sends) empties the table.
//! * Faults: the next loads can answer `Fail`, `Publish Timeout` (applied, then reported as
//!   such), be delayed, or have the connection dropped before any answer.

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
}

/// Transaction states as `get_load_state` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnState {
    Prepare,
    Prepared,
    Visible,
    Aborted,
}

impl TxnState {
    fn name(self) -> &'static str {
        match self {
            TxnState::Prepare => "PREPARE",
            TxnState::Prepared => "PREPARED",
            TxnState::Visible => "VISIBLE",
            TxnState::Aborted => "ABORTED",
        }
    }
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
    deadline: std::time::Instant,
}

#[derive(Default)]
pub struct Table {
    pub key: Vec<String>,
    pub columns: BTreeMap<String, ColType>,
    /// Key (JSON text of the key values) → column → value.
    pub rows: BTreeMap<String, BTreeMap<String, Value>>,
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
    /// Before StarRocks 4.0: a transaction takes one table, named at begin.
    single_table_txns: bool,
    /// `db.table` names whose keys are recorded after every visible change.
    watched: Vec<String>,
    /// The watched tables' keys after each visible change.
    visible: Vec<BTreeMap<String, std::collections::BTreeSet<String>>>,
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
            Table {
                key: key.iter().map(|k| k.to_string()).collect(),
                columns: columns.iter().map(|(c, t)| (c.to_string(), *t)).collect(),
                rows: BTreeMap::new(),
            },
        );
    }

    pub fn add_column(&self, db: &str, table: &str, column: &str, ty: ColType) {
        let mut s = self.state.lock().unwrap();
        if let Some(t) = s.tables.get_mut(&format!("{db}.{table}")) {
            t.columns.insert(column.to_string(), ty);
        }
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
                    .map(|c| row.get(*c).and_then(text_of))
                    .collect()
            })
            .collect();
        out.sort_by_key(|r| sort_key(r));
        out
    }

    pub fn row_count(&self, db: &str, table: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.tables
            .get(&format!("{db}.{table}"))
            .map(|t| t.rows.len())
            .unwrap_or(0)
    }

    /// (label, status) of every load answered so far.
    pub fn log(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().log.clone()
    }
}

fn sort_key(row: &[Option<String>]) -> (i128, String) {
    let first = row.first().cloned().flatten().unwrap_or_default();
    (first.parse::<i128>().unwrap_or(i128::MAX), first)
}

/// PostgreSQL `::text` rendering of a JSON scalar.
pub fn text_of(v: &Value) -> Option<String> {
    if v.is_null() {
        None
    } else if let Some(s) = v.as_str() {
        Some(s.to_string())
    } else if let Some(b) = v.as_bool() {
        Some(if b { "true" } else { "false" }.to_string())
    } else {
        Some(v.to_string())
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
            let body = load_state(&state.lock().unwrap(), db, &label);
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

fn check(ty: ColType, v: &Value) -> bool {
    if v.is_null() {
        return true;
    }
    match ty {
        ColType::Any => true,
        ColType::Int => {
            v.is_i64() || v.is_u64() || v.as_str().is_some_and(|s| s.parse::<i64>().is_ok())
        }
        ColType::Text => v.is_str() || v.is_number(),
        ColType::Bool => v.is_boolean(),
    }
}

/// Rows of one load, checked against the table: what [`apply_rows`] writes.
struct Parsed {
    /// Each good row: column → value (`__op` included when listed).
    good: Vec<BTreeMap<String, Value>>,
    total: usize,
    filtered: usize,
    partial: bool,
    /// The `columns` header and `partial_update` (a transaction takes one set per table).
    params: (String, bool),
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
fn parse_rows(
    s: &State,
    db: &str,
    table: &str,
    req: &Request,
    body: &[u8],
    txn: u64,
) -> Result<Parsed, Refusal> {
    let Some(t) = s.tables.get(&format!("{db}.{table}")) else {
        return Err(Refusal::new(format!("Table {table} does not exist")));
    };
    let key_cols = &t.key;
    let types = &t.columns;
    let columns: Vec<String> = match req.headers.get("columns") {
        Some(c) => c.split(',').map(|c| c.trim().to_string()).collect(),
        None => types.keys().cloned().collect(),
    };
    let json = req.headers.get("format").is_some_and(|f| f == "json");
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
    if !json {
        return Err(Refusal::new("emulator only speaks format: json"));
    }
    let parsed: Value =
        sonic_rs::from_slice(body).map_err(|e| Refusal::new(format!("invalid JSON: {e}")))?;
    let rows: Vec<Value> = if strip {
        match parsed.as_array() {
            Some(a) => a.iter().cloned().collect(),
            None => return Err(Refusal::new("strip_outer_array needs an array")),
        }
    } else {
        vec![parsed]
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
    let mut good = Vec::new();
    let mut filtered = 0;
    for row in &rows {
        let Some(obj) = row.as_object() else {
            filtered += 1;
            continue;
        };
        let mut values: BTreeMap<String, Value> = BTreeMap::new();
        let mut ok = true;
        for c in &columns {
            let v = obj.get(c).cloned().unwrap_or_default();
            if c != "__op" && !check(types[c], &v) {
                ok = false;
            }
            values.insert(c.clone(), v);
        }
        if key_cols
            .iter()
            .any(|k| values.get(k).is_none_or(|v| v.is_null()))
        {
            ok = false;
        }
        if ok {
            good.push(values);
        } else {
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
        good,
        total: rows.len(),
        filtered,
        partial,
        params: (
            req.headers.get("columns").cloned().unwrap_or_default(),
            partial,
        ),
    })
}

/// Writes checked rows into `db.table` in order (upserts, `__op` = 1 deletes, partial
/// updates merge the listed columns).
fn apply_rows(s: &mut State, db: &str, table: &str, parsed: &Parsed) {
    let Some(t) = s.tables.get_mut(&format!("{db}.{table}")) else {
        return;
    };
    let key_cols = t.key.clone();
    let types = t.columns.clone();
    for values in &parsed.good {
        let key: String = key_cols
            .iter()
            .map(|k| values[k].to_string())
            .collect::<Vec<_>>()
            .join("|");
        let op = values.get("__op").and_then(|v| v.as_i64()).unwrap_or(0);
        if op == 1 {
            t.rows.remove(&key);
            continue;
        }
        let entry = t.rows.entry(key).or_insert_with(|| {
            types
                .keys()
                .map(|c| (c.clone(), Value::default()))
                .collect()
        });
        if !parsed.partial {
            // A full upsert replaces the row: unlisted columns take their default (NULL).
            for v in entry.values_mut() {
                *v = Value::default();
            }
        }
        for (c, v) in values {
            if c != "__op" {
                entry.insert(c.clone(), v.clone());
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
                .map(|t| t.rows.keys().cloned().collect())
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
    let key = format!("{db}/{label}");
    if s.labels.contains_key(&key) {
        let existing = match s.txns.get(&key).map(|t| t.state) {
            Some(TxnState::Prepare) => "RUNNING",
            Some(TxnState::Prepared) => "PREPARED",
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
    let parsed = match parse_rows(&s, db, table, req, body, txn) {
        Ok(p) => p,
        Err(r) => {
            let extra = r
                .error_url
                .map(|u| format!(",\"ErrorURL\":\"{u}\""))
                .unwrap_or_default();
            return answer(&mut s, "Fail", &r.message, r.total, 0, r.filtered, &extra);
        }
    };
    apply_rows(&mut s, db, table, &parsed);
    record_visible(&mut s);
    s.labels.insert(key, "FINISHED".into());
    let status = if let Some(Fault::PublishTimeout) = fault {
        "Publish Timeout"
    } else {
        "Success"
    };
    answer(
        &mut s,
        status,
        "OK",
        parsed.total,
        parsed.good.len(),
        parsed.filtered,
        "",
    )
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// `GET /api/{db}/get_load_state?label=`: the state of a transaction or load by label.
fn load_state(s: &State, db: &str, label: &str) -> String {
    let key = format!("{db}/{label}");
    let state = match s.txns.get(&key) {
        Some(t) => t.state.name(),
        None if s.labels.contains_key(&key) => "VISIBLE",
        None => "UNKNOWN",
    };
    format!("{{\"status\":\"OK\",\"msg\":\"Success\",\"state\":\"{state}\"}}")
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
    let timeout = req
        .headers
        .get("timeout")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let mut answer = txn_control(state, op, &db, &label, table.as_deref(), timeout);
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
    respond(writer, 200, "OK", "", &answer);
    Ok(())
}

/// Begin, prepare, commit and rollback.
/// `timeout` (begin): how long the transaction may take to be prepared (default 600 s, the
/// FE's `stream_load_default_timeout_second`).
fn txn_control(
    state: &Mutex<State>,
    op: &str,
    db: &str,
    label: &str,
    table: Option<&str>,
    timeout: Option<Duration>,
) -> String {
    let mut s = state.lock().unwrap();
    let key = format!("{db}/{label}");
    if label.is_empty() || db.is_empty() {
        return txn_answer(0, label, "FAILED", "label and db are required", "");
    }
    let now = std::time::Instant::now();
    if op == "begin" {
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
                deadline: now + timeout.unwrap_or(Duration::from_secs(600)),
            },
        );
        s.labels.insert(key, "PREPARE".into());
        s.log.push((label.to_string(), "BEGIN".into()));
        return txn_answer(id, label, "OK", "", ",\"BeginTxnTimeMs\":0");
    }
    let Some(t) = s.txns.get_mut(&key) else {
        return txn_answer(0, label, "FAILED", "Transcation Not Exist", "");
    };
    let id = t.id;
    if t.state == TxnState::Prepare && now > t.deadline {
        t.state = TxnState::Aborted;
    }
    let status = match (op, t.state) {
        ("prepare", TxnState::Prepare) => {
            t.state = TxnState::Prepared;
            "PREPARED"
        }
        ("commit", TxnState::Prepared) => {
            let staged = std::mem::take(&mut t.staged);
            t.state = TxnState::Visible;
            for (table, parsed) in &staged {
                apply_rows(&mut s, db, table, parsed);
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
    let key = format!("{db}/{label}");
    let single = s.single_table_txns;
    let (id, txn_state, bound, params) = match s.txns.get(&key) {
        Some(t) => (t.id, t.state, t.table.clone(), t.params.get(table).cloned()),
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
    let parsed = match parse_rows(&s, db, table, req, body, id) {
        Ok(p) => p,
        Err(r) => return abort(&mut s, &r.message, r.filtered, r.error_url),
    };
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
    let (total, loaded, filtered) = (parsed.total, parsed.good.len(), parsed.filtered);
    let Some(t) = s.txns.get_mut(&key) else {
        return txn_answer(id, label, "FAILED", "TXN_NOT_EXISTS", "");
    };
    t.params.insert(table.to_string(), parsed.params.clone());
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
    let mut p = (body.len() as u32).to_le_bytes()[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(body);
    stream.write_all(&p)
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
        let target = sql
            .strip_prefix("TRUNCATE TABLE ")
            .map(|t| t.replace('`', ""));
        let answer = match target {
            Some(name) => match s.tables.get_mut(&name) {
                Some(t) => {
                    t.rows.clear();
                    MYSQL_OK.to_vec()
                }
                None => mysql_err(1064, "42000", &format!("Unknown table '{name}'")),
            },
            None => mysql_err(1064, "42000", "emulator only runs TRUNCATE TABLE"),
        };
        drop(s);
        mysql_write(&mut stream, seq.wrapping_add(1), &answer)?;
    }
    Ok(())
}
