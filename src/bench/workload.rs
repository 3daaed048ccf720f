//! What one benchmark transaction runs: the built-in workloads (written against pgbench's
//! schema, so `pgbench -i -s S` prepares them and the numbers compare with pgbench's) and
//! custom SQL, with the random keys each transaction draws.
//!
//! Statements are templates with variables: `:aid`, `:bid`, `:tid`, `:delta` as in pgbench's
//! scripts, plus `:id` and `$1` in custom SQL, which mean the same as `:aid` (a key in
//! `1..=scale*100000`). A variable is rendered as a literal for the simple protocol and as a
//! `$n` parameter for the prepared protocol. This module never does I/O.

use std::fmt::Write as _;

/// Rows in `pgbench_accounts` per unit of scale (pgbench's `naccounts`).
pub const ACCOUNTS_PER_SCALE: u64 = 100_000;
/// Rows in `pgbench_tellers` per unit of scale (pgbench's `ntellers`).
pub const TELLERS_PER_SCALE: u64 = 10;

/// Most distinct variables one statement can use (all four).
const VARS_MAX: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// pgbench `-S`: one primary-key lookup in pgbench_accounts.
    Select,
    /// pgbench's default TPC-B-like transaction: three updates, a select, an insert.
    Tpcb,
    /// One insert into pgbench_history.
    Insert,
    /// The `--sql` statements, in order, as one transaction.
    Custom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// One Query message per statement, variables as literals.
    Simple,
    /// Each statement parsed once per connection, then Bind/Execute/Sync with text params.
    Prepared,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    Aid,
    Bid,
    Tid,
    Delta,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// One statement of a transaction.
#[derive(Clone, Debug)]
pub struct Statement {
    pieces: Vec<Piece>,
    /// The text with `$1..$n` in place of the variables, for Parse.
    prepared_sql: String,
    /// The variable bound to each `$n`.
    params: Vec<Var>,
    /// Name of the prepared statement (`pgprism_bench_<index>`).
    name: String,
}

/// The random values of one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    pub aid: i64,
    pub bid: i64,
    pub tid: i64,
    pub delta: i64,
}

impl Keys {
    fn get(&self, var: Var) -> i64 {
        match var {
            Var::Aid => self.aid,
            Var::Bid => self.bid,
            Var::Tid => self.tid,
            Var::Delta => self.delta,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("--workload custom needs at least one --sql statement")]
    NoSql,
    #[error("--sql is only used with --workload custom")]
    SqlWithoutCustom,
    #[error("statement {index}: only $1 (the random key) is supported, found ${number}")]
    Placeholder { index: usize, number: String },
    #[error("--scale must be at least 1")]
    Scale,
}

impl Statement {
    fn parse(index: usize, sql: &str) -> Result<Statement, WorkloadError> {
        let pieces = Statement::pieces(index, sql)?;
        let (prepared_sql, params) = Statement::number_params(&pieces, sql.len());
        Ok(Statement {
            pieces,
            prepared_sql,
            params,
            name: format!("pgprism_bench_{index}"),
        })
    }

    /// Splits `sql` into text and the variables (`:aid`, `$1`, ...) between it.
    fn pieces(index: usize, sql: &str) -> Result<Vec<Piece>, WorkloadError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let bytes = sql.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let (var, len) = match bytes[i] {
                // `::type` casts are not variables: skip both colons.
                b':' if bytes.get(i + 1) == Some(&b':') => {
                    text.push_str("::");
                    i += 2;
                    continue;
                }
                b':' => match variable_at(&sql[i + 1..]) {
                    Some((var, len)) => (Some(var), len + 1),
                    None => (None, 0),
                },
                b'$' => {
                    let digits = sql[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
                    match &sql[i + 1..i + 1 + digits] {
                        "" => (None, 0),
                        "1" => (Some(Var::Aid), 2),
                        number => {
                            return Err(WorkloadError::Placeholder {
                                index,
                                number: number.to_string(),
                            });
                        }
                    }
                }
                _ => (None, 0),
            };
            match var {
                Some(var) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Var(var));
                    i += len;
                }
                None => {
                    // Copy up to the next byte that may start a variable. A `:` or `$` here
                    // starts no variable, so step over it (ASCII: `i + 1` stays on a char
                    // boundary); anything else is not `:`/`$`, so `find` moves forward.
                    let skip = usize::from(matches!(bytes[i], b':' | b'$'));
                    let next = sql[i + skip..]
                        .find([':', '$'])
                        .map_or(sql.len(), |at| i + skip + at);
                    text.push_str(&sql[i..next]);
                    i = next;
                }
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(pieces)
    }

    /// The text for Parse, each distinct variable numbered `$n` in order of first use, and the
    /// variable bound to each `$n`.
    fn number_params(pieces: &[Piece], sql_len: usize) -> (String, Vec<Var>) {
        let mut params: Vec<Var> = Vec::new();
        let mut prepared_sql = String::with_capacity(sql_len);
        for piece in pieces {
            match piece {
                Piece::Text(t) => prepared_sql.push_str(t),
                Piece::Var(var) => {
                    let n = match params.iter().position(|p| p == var) {
                        Some(at) => at + 1,
                        None => {
                            params.push(*var);
                            params.len()
                        }
                    };
                    let _ = write!(prepared_sql, "${n}");
                }
            }
        }
        // Four variables exist, and each gets one `$n`.
        assert!(params.len() <= VARS_MAX);
        (prepared_sql, params)
    }

    /// The SQL for Parse, with `$n` parameters.
    pub fn prepared_sql(&self) -> &str {
        &self.prepared_sql
    }

    /// Appends the statement with `keys` as literals to `out` (simple protocol).
    pub fn render(&self, keys: &Keys, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(var) => {
                    let _ = write!(out, "{}", keys.get(*var));
                }
            }
        }
    }

    /// The text parameters for Bind (prepared protocol), formatted into `scratch`, which is
    /// reused between transactions so a transaction allocates nothing.
    pub fn params<'s>(&self, keys: &Keys, scratch: &'s mut String) -> Params<'s> {
        scratch.clear();
        let mut ends = [0usize; VARS_MAX];
        for (end, var) in ends.iter_mut().zip(&self.params) {
            let _ = write!(scratch, "{}", keys.get(*var));
            *end = scratch.len();
        }
        let text: &'s String = scratch;
        let mut values: [Option<&'s [u8]>; VARS_MAX] = [None; VARS_MAX];
        let mut start = 0;
        for (value, &end) in values.iter_mut().zip(&ends[..self.params.len()]) {
            *value = Some(&text.as_bytes()[start..end]);
            start = end;
        }
        Params {
            values,
            len: self.params.len(),
        }
    }

    /// The prepared statement's name on each connection.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Bind parameters of one statement execution, borrowed from a scratch buffer.
pub struct Params<'s> {
    values: [Option<&'s [u8]>; VARS_MAX],
    len: usize,
}

impl<'s> Params<'s> {
    pub fn as_slice(&self) -> &[Option<&'s [u8]>] {
        &self.values[..self.len]
    }
}

/// The name pgbench's scripts use, if `rest` starts with one (followed by a non-identifier
/// character); returns the variable and the name's length.
fn variable_at(rest: &str) -> Option<(Var, usize)> {
    let len = rest
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let var = match &rest[..len] {
        "aid" | "id" => Var::Aid,
        "bid" => Var::Bid,
        "tid" => Var::Tid,
        "delta" => Var::Delta,
        _ => return None,
    };
    Some((var, len))
}

/// The statements of one transaction and the key ranges they draw from.
#[derive(Clone, Debug)]
pub struct Workload {
    kind: WorkloadKind,
    scale: u64,
    statements: Vec<Statement>,
}

impl Workload {
    pub fn new(kind: WorkloadKind, scale: u64, sql: &[String]) -> Result<Workload, WorkloadError> {
        if scale == 0 {
            return Err(WorkloadError::Scale);
        }
        const HISTORY_INSERT: &str = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP)";
        let texts: Vec<&str> = match kind {
            WorkloadKind::Custom if sql.is_empty() => return Err(WorkloadError::NoSql),
            WorkloadKind::Custom => sql.iter().map(String::as_str).collect(),
            _ if !sql.is_empty() => return Err(WorkloadError::SqlWithoutCustom),
            WorkloadKind::Select => vec!["SELECT abalance FROM pgbench_accounts WHERE aid = :aid"],
            // pgbench's built-in "tpcb-like" script, statement for statement.
            WorkloadKind::Tpcb => vec![
                "BEGIN",
                "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid",
                "SELECT abalance FROM pgbench_accounts WHERE aid = :aid",
                "UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid",
                "UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid",
                HISTORY_INSERT,
                "END",
            ],
            WorkloadKind::Insert => vec![HISTORY_INSERT],
        };
        let statements = texts
            .iter()
            .enumerate()
            .map(|(index, sql)| Statement::parse(index + 1, sql))
            .collect::<Result<_, _>>()?;
        Ok(Workload {
            kind,
            scale,
            statements,
        })
    }

    pub fn kind(&self) -> WorkloadKind {
        self.kind
    }

    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }

    /// Draws one transaction's keys, with pgbench's ranges.
    pub fn draw(&self, rng: &mut Rng) -> Keys {
        Keys {
            aid: rng.range(1, self.scale * ACCOUNTS_PER_SCALE) as i64,
            bid: rng.range(1, self.scale) as i64,
            tid: rng.range(1, self.scale * TELLERS_PER_SCALE) as i64,
            delta: rng.range(0, 10_000) as i64 - 5_000,
        }
    }
}

/// SQL that creates pgbench's tables at `scale` on the server (like `pgbench -i -I dtGvp`,
/// server-side generation), one statement per entry: VACUUM cannot run inside the implicit
/// transaction of a multi-statement query.
pub fn init_statements(scale: u64) -> Vec<String> {
    let accounts = scale * ACCOUNTS_PER_SCALE;
    let tellers = scale * TELLERS_PER_SCALE;
    vec![
        "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers".to_string(),
        "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22))".to_string(),
        "CREATE TABLE pgbench_tellers (tid int NOT NULL, bid int, tbalance int, filler char(84)) WITH (fillfactor = 100)".to_string(),
        "CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler char(84)) WITH (fillfactor = 100)".to_string(),
        "CREATE TABLE pgbench_branches (bid int NOT NULL, bbalance int, filler char(88)) WITH (fillfactor = 100)".to_string(),
        format!("INSERT INTO pgbench_branches (bid, bbalance) SELECT bid, 0 FROM generate_series(1, {scale}) AS bid"),
        format!("INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT tid, (tid - 1) / {TELLERS_PER_SCALE} + 1, 0 FROM generate_series(1, {tellers}) AS tid"),
        format!("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT aid, (aid - 1) / {ACCOUNTS_PER_SCALE} + 1, 0, '' FROM generate_series(1, {accounts}) AS aid"),
        "VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history".to_string(),
        "ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid)".to_string(),
        "ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid)".to_string(),
        "ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid)".to_string(),
    ]
}

/// SplitMix64: tiny, fast, and good enough to pick keys; seeded per client so a run with a
/// given `--seed` draws the same keys.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (multiply-shift; the bias is below 2^-40 for our ranges).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        let span = hi - lo + 1;
        lo + ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            aid: 42,
            bid: 1,
            tid: 7,
            delta: -3,
        }
    }

    #[test]
    fn variables_render_as_literals_and_parameters() {
        let s = Statement::parse(
            1,
            "UPDATE t SET b = b + :delta WHERE a = :aid AND c = :aid::int AND d = '::x' AND e = :other",
        )
        .unwrap();
        let mut out = String::new();
        s.render(&keys(), &mut out);
        assert_eq!(
            out,
            "UPDATE t SET b = b + -3 WHERE a = 42 AND c = 42::int AND d = '::x' AND e = :other"
        );
        assert_eq!(
            s.prepared_sql(),
            "UPDATE t SET b = b + $1 WHERE a = $2 AND c = $2::int AND d = '::x' AND e = :other"
        );
        let mut scratch = String::new();
        let params = s.params(&keys(), &mut scratch);
        let params: Vec<&[u8]> = params.as_slice().iter().map(|v| v.unwrap()).collect();
        assert_eq!(params, [&b"-3"[..], b"42"]);
    }

    #[test]
    fn custom_placeholders() {
        let s = Statement::parse(1, "SELECT $1, :id, :identity, 'a$'").unwrap();
        let mut out = String::new();
        s.render(&keys(), &mut out);
        assert_eq!(out, "SELECT 42, 42, :identity, 'a$'");
        assert_eq!(s.prepared_sql(), "SELECT $1, $1, :identity, 'a$'");
        assert!(matches!(
            Statement::parse(3, "SELECT $2"),
            Err(WorkloadError::Placeholder { index: 3, .. })
        ));
    }

    #[test]
    fn builtins_and_argument_checks() {
        let tpcb = Workload::new(WorkloadKind::Tpcb, 1, &[]).unwrap();
        assert_eq!(tpcb.statements().len(), 7);
        assert!(Workload::new(WorkloadKind::Custom, 1, &[]).is_err());
        assert!(Workload::new(WorkloadKind::Select, 1, &["SELECT 1".into()]).is_err());
        assert!(Workload::new(WorkloadKind::Select, 0, &[]).is_err());
    }

    #[test]
    fn keys_stay_in_pgbench_ranges() {
        let w = Workload::new(WorkloadKind::Select, 2, &[]).unwrap();
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            let k = w.draw(&mut rng);
            assert!((1..=200_000).contains(&k.aid));
            assert!((1..=2).contains(&k.bid));
            assert!((1..=20).contains(&k.tid));
            assert!((-5000..=5000).contains(&k.delta));
        }
        let (a, b) = (Rng::new(9).next_u64(), Rng::new(9).next_u64());
        assert_eq!(a, b);
    }
}
