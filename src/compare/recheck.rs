//! Order re-checks. Rows that agree as multisets but come in another order under an ORDER BY
//! whose keys are not all output columns (an expression such as `lower(v)`, a column not
//! selected) may be ties, which an engine may return in any order, or a real order
//! difference (another collation): the digests cannot tell, since they never saw the keys. A
//! re-check reads the statement again on both sides, over two fresh connections of its own
//! (as the slow-query analyzer's EXPLAIN does), with the sort keys appended to the output,
//! and compares the sequences of key values and the rows of each run of equal keys.
//!
//! It never writes (the statement runs alone, through the extended protocol, in a READ ONLY
//! transaction of a session that is read-only by default, and is never committed), never
//! re-runs a statement with parameters or one [`crate::sql::sort_items`] cannot rewrite with
//! certainty, runs at most `compare.order-rechecks-max` at once per shard and
//! `compare.order-rechecks-total-max` in the process, and is bounded in
//! time (`compare.connect-timeout-ms` to connect, `compare.shadow-timeout-ms` to read).
//! Whatever it cannot settle with certainty is inconclusive, never a mismatch.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;

use super::digest::{Digest, Digester, Step, chain, hash64};
use super::rules::Rules;
use super::verdict::Verdict;
use super::{CompareTarget, Record, open_as};
use crate::exec::net::Stream;
use crate::exec::within;
use crate::sql::{self, OrderKey};
use crate::wire::{self, tag};

/// Why an order difference under an ORDER BY of keys not in the output was not settled (the
/// `reason` of its inconclusive verdict).
pub(super) const NOT_REWRITABLE: &str = "rows in another order under an ORDER BY whose keys are not all output columns (not re-checked: parameters, a write, or a statement the re-check cannot rewrite)";
pub(super) const BUSY_PROCESS: &str = "rows in another order under an ORDER BY whose keys are not all output columns (not re-checked: compare.order-rechecks-total-max re-checks running in the process)";
pub(super) const BUSY: &str = "rows in another order under an ORDER BY whose keys are not all output columns (not re-checked: compare.order-rechecks-max re-checks running)";
const UNREACHABLE: &str = "rows in another order under an ORDER BY whose keys are not all output columns (the re-check could not connect)";
const TIMED_OUT: &str = "rows in another order under an ORDER BY whose keys are not all output columns (the re-check timed out)";
const FAILED: &str = "rows in another order under an ORDER BY whose keys are not all output columns (the re-check failed or returned another shape)";

const USER_CODE: &str = "rows in another order under an ORDER BY whose keys are not all output columns (not re-checked: the database has functions of its own that reading may run without naming them: operators, casts, views, type input/output, domain checks or policies)";
pub(super) const CALLS_FUNCTIONS: &str = "rows in another order under an ORDER BY whose keys are not all output columns (not re-checked: the statement calls a function that is not on the re-check's list of built-ins without side effects, and a re-check runs it once more on each side)";

/// Words PostgreSQL's grammar puts before a `(` that are no function call: keywords (`IN (`,
/// `EXISTS (`, `OVER (`...) and type names with a modifier (`numeric(10, 2)`).
const NOT_CALLS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "bit",
    "by",
    "case",
    "char",
    "character",
    "cube",
    "decimal",
    "distinct",
    "else",
    "exists",
    "filter",
    "float",
    "from",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "interval",
    "is",
    "join",
    "lateral",
    "like",
    "limit",
    "materialized",
    "not",
    "numeric",
    "offset",
    "on",
    "or",
    "over",
    "rollup",
    "row",
    "select",
    "sets",
    "similar",
    "some",
    "then",
    "time",
    "timestamp",
    "timestamptz",
    "to",
    "using",
    "values",
    "varchar",
    "varying",
    "when",
    "where",
    "with",
    "within",
];

/// Built-in functions a re-check may run again: immutable or stable, without side effects
/// (no I/O, no locks, no sleeps, no sequences, no settings), deterministic for the same
/// data. Anything else (a user function, `dblink_exec`, `lo_export`, `pg_advisory_lock`,
/// `pg_sleep`, `nextval`, `set_config`...) keeps the statement from being re-checked.
const SAFE_FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "array_position",
    "array_to_string",
    "ascii",
    "avg",
    "bit_length",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cast",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "date_part",
    "date_trunc",
    "dense_rank",
    "div",
    "every",
    "exp",
    "extract",
    "floor",
    "generate_series",
    "greatest",
    "initcap",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "max",
    "md5",
    "min",
    "mod",
    "nullif",
    "octet_length",
    "overlay",
    "position",
    "power",
    "rank",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "string_agg",
    "strpos",
    "substr",
    "substring",
    "sum",
    "to_char",
    "translate",
    "trim",
    "trunc",
    "unnest",
    "upper",
];

/// Run first in a re-run's read-only transaction (re-checks and the slow-query EXPLAIN): how
/// many functions of the database's own (not built in, not part of an extension, not a
/// trigger's) reading could run although the statement names only built-ins. Those are
/// what [`calls_only_safe_functions`] cannot see: one that something else depends on (an
/// operator or a cast implemented by it, a view or a row-level policy that calls it, a
/// type's input or output, a domain's check), and one named like a built-in on
/// [`SAFE_FUNCTIONS`] (`public.upper(varchar)` wins over `pg_catalog.upper(text)` for a
/// `varchar` argument, whatever the `search_path`). A re-run runs on a database without
/// such functions only. Every name is qualified so that a `search_path` the client set
/// cannot redirect the guard itself.
fn user_code_guard() -> String {
    let names = SAFE_FUNCTIONS.join(",");
    format!(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc p \
         WHERE p.oid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid \
         AND p.prorettype OPERATOR(pg_catalog.<>) 'pg_catalog.trigger'::pg_catalog.regtype \
         AND p.prorettype OPERATOR(pg_catalog.<>) 'pg_catalog.event_trigger'::pg_catalog.regtype \
         AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend e \
             WHERE e.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
             AND e.objid OPERATOR(pg_catalog.=) p.oid AND e.deptype OPERATOR(pg_catalog.=) 'e') \
         AND (p.proname OPERATOR(pg_catalog.=) ANY ('{{{names}}}'::pg_catalog.name[]) \
             OR EXISTS (SELECT FROM pg_catalog.pg_depend d \
             WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
             AND d.refobjid OPERATOR(pg_catalog.=) p.oid))"
    )
}

/// The simple query that opens a re-run: a read-only transaction whose statements the server
/// stops at `timeout_ms`, then [`user_code_guard`].
pub(crate) fn preamble(timeout_ms: u64) -> String {
    preamble_as("BEGIN READ ONLY", timeout_ms)
}

/// [`preamble`] with a transaction opened by `begin`.
pub(crate) fn preamble_as(begin: &str, timeout_ms: u64) -> String {
    format!(
        "{begin}; SET LOCAL statement_timeout = {timeout_ms}; {}",
        user_code_guard()
    )
}

/// The answer row of [`user_code_guard`]: whether the database is free of such functions.
pub(crate) fn guard_clean(row: &[u8]) -> Option<bool> {
    let columns = wire::DataRow::new(row).columns().ok()?;
    let mut values = columns.iter();
    let count = values.next()??;
    if values.next().is_some() || count.is_empty() || !count.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(count.iter().all(|&d| d == b'0'))
}

/// The startup parameters of a re-run's own session: the client's (search_path, DateStyle...
/// shape the answer) but not the ones that could let the re-run write or run long: the
/// session is read-only by default and its statements are cut off by the server at
/// `timeout_ms`. `options` is read as the settings it makes, so none of them can undo these.
pub(crate) fn guarded_params(
    params: &[(String, String)],
    timeout_ms: u64,
) -> Vec<(String, String)> {
    let options = params.iter().filter(|(k, _)| k == "options");
    let mut params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "options")
        .cloned()
        .chain(options.flat_map(|(_, o)| super::lease::options_settings(o)))
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k != "default_transaction_read_only" && k != "statement_timeout"
        })
        .collect();
    params.push(("default_transaction_read_only".into(), "on".into()));
    params.push(("statement_timeout".into(), timeout_ms.to_string()));
    params
}

/// Whether every name `text` calls is a keyword or a built-in on [`SAFE_FUNCTIONS`]
/// (unqualified or in `pg_catalog`): a re-check reads the statement once more per side, so
/// it must not repeat what a function does besides returning a value.
pub(crate) fn calls_only_safe_functions(text: &str) -> bool {
    sql::called_names(text.as_bytes()).iter().all(|name| {
        let Ok(name) = std::str::from_utf8(name) else {
            return false;
        };
        let name = name.to_ascii_lowercase();
        let bare = match name.split_once('.') {
            None => name.as_str(),
            Some(("pg_catalog", rest)) if !rest.contains('.') => rest,
            Some(_) => return false,
        };
        NOT_CALLS.contains(&bare) || SAFE_FUNCTIONS.contains(&bare)
    })
}

/// The reason a re-check that read other rows names in its report (inconclusive:
/// concurrent, counted as `compare_inconclusive_order_recheck`).
const RECHECK_CHANGED: &str = "order_recheck";
const REORDERED: &str = "rows in another order under an ORDER BY whose keys are not all output columns (the re-check returned a side's rows in another order than the statement did)";

/// A NULL key value in the key hash.
const NULL_KEY: u64 = 0x5899_65cc_7537_4cc3;

/// A statement rewritten to return its sort keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The statement with the keys that are not output columns appended to its select list.
    pub sql: String,
    /// Output columns of the statement itself.
    columns: usize,
    /// Output columns of the re-run.
    width: usize,
    /// Per sort key, in order: its column in the re-run's rows.
    keys: Vec<usize>,
    /// The column of `dense_rank() OVER (ORDER BY <the statement's items>)`, when appended:
    /// each server then decides itself which rows tie (`citext` 'Bob' and 'bob', numeric 1.0
    /// and 1.00, a nondeterministic collation), where equal bytes could not.
    rank: Option<usize>,
}

/// The re-run of `text`, whose result had `columns`; `None` when it cannot be rewritten with
/// certainty (see [`sql::sort_items`]).
pub(crate) fn plan(text: &str, columns: &[(String, u32)]) -> Option<Plan> {
    let items = sql::sort_items(text.as_bytes())?;
    let n = columns.len();
    let mut appended: Vec<&str> = Vec::new();
    let mut keys = Vec::with_capacity(items.items.len());
    for item in &items.items {
        // PostgreSQL reads a bare name as an output column's first, then as an input one.
        let output = match &item.key {
            Some(OrderKey::Position(i)) => Some((*i < n).then_some(*i)?),
            Some(OrderKey::Name(name)) => {
                let mut found = columns.iter().enumerate().filter(|(_, c)| c.0 == *name);
                match (found.next(), found.next()) {
                    (Some((i, _)), None) => Some(i),
                    (Some(_), Some(_)) => return None,
                    _ => None,
                }
            }
            None => None,
        };
        keys.push(match output {
            Some(i) => i,
            None => {
                appended.push(text.get(item.range.clone())?);
                n + appended.len() - 1
            }
        });
    }
    // A window's ORDER BY reads input columns only: the rank is the statement's own order
    // only when no item names an output column (a position, an alias).
    let mut width = n + appended.len();
    let over = keys.iter().all(|&k| k >= n);
    let window;
    let rank = if over {
        window = format!(
            "dense_rank() OVER (ORDER BY {})",
            text.get(items.clause.clone())?
        );
        appended.push(&window);
        width += 1;
        Some(width - 1)
    } else {
        None
    };
    let head = text.get(..items.list_end)?.trim_end();
    let tail = text.get(items.list_end..)?.trim_end();
    let tail = tail.strip_suffix(';').unwrap_or(tail).trim_end();
    // A newline, not a space: the select list may end in a line comment.
    let sql = if appended.is_empty() {
        format!("{head}\n{tail}")
    } else {
        format!("{head}\n, {}\n{tail}", appended.join(", "))
    };
    Some(Plan {
        sql,
        columns: n,
        width,
        keys,
        rank,
    })
}

/// One side's re-run, folded as it streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Folded {
    rows: u64,
    /// The order's keys (the ranks, else the sort keys' values), in order.
    keys: u64,
    /// Order-insensitive sum over rows of (normalised row, sort keys' values): a key that
    /// moved from one row to another between the two re-runs shows here.
    pairs: u64,
    /// Per run of equal keys, in order: its keys and the (normalised) rows in it, whatever
    /// their order within the run.
    groups: u64,
    /// The rows without the appended keys, folded by the rules as the statement's were.
    projected: Digest,
}

/// Folds one side's answer to the re-run (see [`messages`]).
struct Folder<'p> {
    plan: &'p Plan,
    digester: Digester,
    folded: Folded,
    /// The current run of equal keys: its key hash and the row sums where it began.
    group: Option<(u64, u64)>,
    /// The `BEGIN READ ONLY` ended in a transaction.
    began: bool,
    /// The guard's answer: the database has no functions of its own reading may run.
    clean: Option<bool>,
    in_select: bool,
    selected: bool,
    scratch: BytesMut,
}

impl<'p> Folder<'p> {
    fn new(plan: &'p Plan, rules: Rc<Rules>) -> Folder<'p> {
        Folder {
            plan,
            digester: Digester::new(rules),
            folded: Folded::default(),
            group: None,
            began: false,
            clean: None,
            in_select: false,
            selected: false,
            scratch: BytesMut::new(),
        }
    }

    /// One backend message; `Ok(Some)` at the end, `Err` when the re-run failed.
    fn visit(&mut self, tag: u8, body: &[u8]) -> Result<Option<Folded>, &'static str> {
        if !self.began {
            // The preamble's answers: BEGIN, SET, the guard's row.
            match tag {
                tag::DATA_ROW => self.clean = Some(guard_clean(body).ok_or(FAILED)?),
                tag::ERROR_RESPONSE => return Err(FAILED),
                tag::READY_FOR_QUERY => {
                    // The statement must run inside that read-only transaction.
                    if body != [b'T'] {
                        return Err(FAILED);
                    }
                    match self.clean {
                        Some(true) => self.began = true,
                        Some(false) => return Err(USER_CODE),
                        None => return Err(FAILED),
                    }
                }
                _ => {}
            }
            return Ok(None);
        }
        match tag {
            tag::ROW_DESCRIPTION => {
                let fields: Vec<_> = wire::RowDescription::new(body)
                    .fields()
                    .map_err(|_| FAILED)?
                    .collect();
                if fields.len() != self.plan.width || self.selected {
                    return Err(FAILED);
                }
                self.scratch.clear();
                wire::encode::row_description(&mut self.scratch, &fields[..self.plan.columns])
                    .map_err(|_| FAILED)?;
                self.feed(tag::ROW_DESCRIPTION);
                self.in_select = true;
            }
            tag::DATA_ROW if self.in_select => self.row(body)?,
            tag::COMMAND_COMPLETE if self.in_select => {
                self.close_group();
                self.digester.visit(tag, body);
                self.in_select = false;
                self.selected = true;
            }
            tag::ERROR_RESPONSE => return Err(FAILED),
            tag::READY_FOR_QUERY => {
                if !self.selected {
                    return Err(FAILED);
                }
                if let Step::SyncEnd(status) = self.digester.visit(tag, body) {
                    let mut sync = self.digester.finish_sync(status, std::time::Instant::now());
                    if sync.results.len() != 1 {
                        return Err(FAILED);
                    }
                    self.folded.projected = sync.results.remove(0);
                }
                return Ok(Some(std::mem::take(&mut self.folded)));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Feeds the digester the message encoded in `scratch`.
    fn feed(&mut self, tag: u8) {
        let body = self.scratch.get(wire::HEADER_BYTES..).unwrap_or_default();
        self.digester.visit(tag, body);
    }

    fn row(&mut self, body: &[u8]) -> Result<(), &'static str> {
        let values: Vec<Option<&[u8]>> = wire::DataRow::new(body)
            .columns()
            .map_err(|_| FAILED)?
            .iter()
            .collect();
        if values.len() != self.plan.width {
            return Err(FAILED);
        }
        let value = |i: usize| values[i].map_or(NULL_KEY, |v| hash64(v, 0));
        let mut raw = NULL_KEY;
        for &i in &self.plan.keys {
            raw = chain(raw, value(i));
        }
        let key = self.plan.rank.map_or(raw, value);
        if self.group.is_some_and(|(k, _)| k != key) {
            self.close_group();
        }
        if self.group.is_none() {
            self.group = Some((key, self.digester.current_unordered().0));
        }
        self.folded.rows += 1;
        self.folded.keys = chain(self.folded.keys, key);
        self.scratch.clear();
        wire::encode::data_row(&mut self.scratch, &values[..self.plan.columns])
            .map_err(|_| FAILED)?;
        let before = self.digester.current_unordered().0;
        self.feed(tag::DATA_ROW);
        let row = self.digester.current_unordered().0.wrapping_sub(before);
        self.folded.pairs = self.folded.pairs.wrapping_add(chain(row, raw));
        Ok(())
    }

    /// Ends the current run of equal keys: its keys and the sum of its rows' hashes.
    fn close_group(&mut self) {
        if let Some((key, start)) = self.group.take() {
            let rows = self.digester.current_unordered().0.wrapping_sub(start);
            self.folded.groups = chain(chain(self.folded.groups, key), rows);
        }
    }
}

/// What the re-check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The keys come in the same order on both sides: the rows differed in order only within
    /// runs of equal keys, which either engine may return in any order. Not a difference.
    Ties,
    /// The keys (or the rows of a run of equal keys) differ in order: a real difference.
    Order,
    /// The re-runs read other rows than the statement did (the data changed meanwhile, or
    /// the statement saw its own transaction's writes).
    Changed,
    /// The same rows, each side's in its original order, but the sort keys not in the output
    /// on other rows: either the sort columns hold other values on each side (a real
    /// difference) or one changed between the two re-runs; a second re-run tells them apart.
    Moved,
    /// Not settled (a reason for the inconclusive verdict).
    Failed(&'static str),
}

/// Judges the two re-runs against the statement's own results (`original`: primary, shadow).
pub(crate) fn decide(original: [&Digest; 2], rerun: [Result<Folded, &'static str>; 2]) -> Outcome {
    let [p, s] = rerun;
    let (p, s) = match (p, s) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(why), _) | (_, Err(why)) => return Outcome::Failed(why),
    };
    for (o, r) in original.iter().zip([&p, &s]) {
        // Rows that came in binary format hash as other bytes than the re-run's text: their
        // count is what can be checked.
        if r.rows != o.rows || (!o.binary && r.projected.unordered != o.unordered) {
            return Outcome::Changed;
        }
    }
    if p.rows != s.rows || p.projected.unordered != s.projected.unordered {
        return Outcome::Changed;
    }
    // Each re-run must come in its side's original order, else it says nothing of it.
    for (o, r) in original.iter().zip([&p, &s]) {
        if !o.binary && r.projected.ordered != o.ordered {
            return Outcome::Failed(REORDERED);
        }
    }
    // The same rows with the keys not in the output on other rows: not an order the engines
    // chose, but other sort column values, now or meanwhile.
    if p.pairs != s.pairs {
        return Outcome::Moved;
    }
    if p.keys != s.keys || p.groups != s.groups {
        return Outcome::Order;
    }
    Outcome::Ties
}

/// Re-runs `plan` on both sides and reports what it found: nothing for ties, else `record`
/// with its verdict (a mismatch for a real order difference, inconclusive otherwise).
pub(crate) async fn run(
    target: Rc<CompareTarget>,
    params: Rc<Vec<(String, String)>>,
    plan: Plan,
    original: [Digest; 2],
    mut record: Record,
) {
    let [primary, shadow] = both(&target, &params, &plan).await;
    let first = [&primary, &shadow].map(|r| r.as_ref().map(|f| f.pairs).ok());
    let mut outcome = decide([&original[0], &original[1]], [primary, shadow]);
    if outcome == Outcome::Moved {
        // Stable on each side over a second re-run: the sort columns differ between the
        // sides (a real difference); else one changed meanwhile.
        let again = both(&target, &params, &plan).await;
        let second = again.each_ref().map(|r| r.as_ref().map(|f| f.pairs).ok());
        outcome = if first == second && first.iter().all(Option::is_some) {
            Outcome::Order
        } else {
            Outcome::Changed
        };
    }
    let stats = &target.stats;
    stats.rechecks_running.set(stats.rechecks_running.get() - 1);
    target
        .rechecks
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    stats.order_rechecks.set(stats.order_rechecks.get() + 1);
    let verdict = match outcome {
        Outcome::Ties => {
            stats
                .order_recheck_ties
                .set(stats.order_recheck_ties.get() + 1);
            return;
        }
        Outcome::Order => {
            record.description = "sort keys in a different order under ORDER BY (re-checked with the keys in the output)".into();
            let cell = &stats.kinds[super::Kind::Order.index()];
            cell.set(cell.get() + 1);
            Verdict::Mismatch
        }
        // (`Moved` was settled by the second re-run above.)
        Outcome::Changed | Outcome::Moved => {
            record.description = "same rows in a different order under ORDER BY; the re-check read other rows (the data changed meanwhile, or the statement saw its own transaction's writes)".into();
            // Not a rule of the order ledger (the statement was pinned): a reason of its own,
            // so the reasons sum to the concurrent verdicts.
            record.reason = RECHECK_CHANGED;
            stats
                .rechecked_changed
                .set(stats.rechecked_changed.get() + 1);
            Verdict::Concurrent
        }
        Outcome::Failed(why) => Verdict::Nondeterministic(why),
    };
    let index = match verdict {
        Verdict::Mismatch => 0,
        Verdict::Concurrent => 1,
        Verdict::Nondeterministic(_) => 2,
    };
    stats.rechecked[index].set(stats.rechecked[index].get() + 1);
    record.record = verdict.record();
    record.verdict = verdict.name();
    if let Verdict::Nondeterministic(why) = verdict {
        record.reason = why;
    }
    // Judged after the client had its answer: it was never failed for this.
    record.failed_client = false;
    if !target.send(record) {
        stats.reports_dropped.set(stats.reports_dropped.get() + 1);
    }
}

/// Re-runs `plan` on both sides at once.
async fn both(
    target: &CompareTarget,
    params: &[(String, String)],
    plan: &Plan,
) -> [Result<Folded, &'static str>; 2] {
    let rules = target.rules.clone();
    let (primary, shadow) = futures_lite::future::zip(
        side(
            target,
            (&target.primary_addr.get(), &target.primary_url),
            &target.primary_tls,
            params,
            plan,
            rules.clone(),
        ),
        side(
            target,
            (&target.addr.get(), &target.url),
            &target.tls,
            params,
            plan,
            rules,
        ),
    )
    .await;
    [primary, shadow]
}

/// One side's re-run over a connection of its own.
async fn side(
    target: &CompareTarget,
    (addr, url): (&crate::config::Endpoint, &crate::config::PgUrl),
    tls: &crate::tls::Upstream,
    params: &[(String, String)],
    plan: &Plan,
    rules: Rc<Rules>,
) -> Result<Folded, &'static str> {
    let cfg = &target.cfg;
    let limit = Duration::from_millis(cfg.connect_timeout_ms);
    let max = cfg.buffer_bytes_max.max(1 << 20);
    let budget_ms = cfg.shadow_timeout_ms.max(1);
    let params = guarded_params(params, budget_ms);
    let stream = open_as(addr, url, tls, &params, limit, max)
        .await
        .map_err(|_| UNREACHABLE)?
        .stream;
    let budget = Duration::from_millis(budget_ms);
    let folded = within(budget, read(&stream, plan, rules, max, budget_ms))
        .await
        .unwrap_or(Err(TIMED_OUT));
    // Closing the session rolls its transaction back.
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    stream.shutdown();
    folded
}

/// The messages of a re-run: a read-only transaction whose statements the server stops at
/// `timeout_ms`, begun by text of our own with [`user_code_guard`], then the rewritten
/// statement alone through the
/// extended protocol, where PostgreSQL refuses more than one command ("cannot insert multiple
/// commands into a prepared statement"): text the SQL reader misread can never smuggle a
/// COMMIT and a write past the READ ONLY. The transaction is never committed.
pub(crate) fn messages(plan: &Plan, timeout_ms: u64) -> Result<BytesMut, wire::WireError> {
    let mut out = BytesMut::new();
    wire::encode::query(&mut out, &preamble(timeout_ms))?;
    wire::encode::parse(&mut out, "", &plan.sql, &[])?;
    wire::encode::bind(&mut out, "", "", &[], &[], &[])?;
    wire::encode::describe(&mut out, wire::ObjectKind::Portal, "")?;
    wire::encode::execute(&mut out, "", 0)?;
    wire::encode::sync(&mut out);
    Ok(out)
}

async fn read(
    stream: &Stream,
    plan: &Plan,
    rules: Rc<Rules>,
    max: usize,
    timeout_ms: u64,
) -> Result<Folded, &'static str> {
    let out = messages(plan, timeout_ms).map_err(|_| FAILED)?;
    stream.write_all(&out).await.map_err(|_| UNREACHABLE)?;
    let mut folder = Folder::new(plan, rules);
    let mut buf = BytesMut::new();
    loop {
        match wire::split_message(&mut buf, max) {
            Ok(Some(frame)) => {
                if let Some(folded) = folder.visit(frame.tag(), frame.body())? {
                    return Ok(folded);
                }
            }
            Ok(None) => match stream.read_buf(&mut buf, 64 << 10).await {
                Ok(0) | Err(_) => return Err(UNREACHABLE),
                Ok(_) => {}
            },
            Err(_) => return Err(FAILED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompareConfig;

    fn columns(names: &[&str]) -> Vec<(String, u32)> {
        names.iter().map(|n| (n.to_string(), 25)).collect()
    }

    #[test]
    fn plans_append_the_keys_that_are_not_output_columns() {
        let plan = plan(
            "SELECT id, v AS w FROM t ORDER BY lower(v), w DESC, 1, k;",
            &columns(&["id", "w"]),
        )
        .unwrap();
        assert_eq!(
            plan.sql,
            "SELECT id, v AS w\n, lower(v), k\nFROM t ORDER BY lower(v), w DESC, 1, k"
        );
        assert_eq!((plan.columns, plan.width), (2, 4));
        assert_eq!(plan.keys, vec![2, 1, 0, 3]);
        assert_eq!(plan.rank, None);
        // No item names an output column: the servers rank the rows themselves. A line
        // comment at the end of the select list stays a comment.
        let plan = super::plan(
            "SELECT id -- note\nFROM t ORDER BY lower(v) DESC NULLS LAST, t.k",
            &columns(&["id"]),
        )
        .unwrap();
        assert_eq!(
            plan.sql,
            "SELECT id -- note\n, lower(v), t.k, dense_rank() OVER (ORDER BY lower(v) DESC NULLS LAST, t.k)\nFROM t ORDER BY lower(v) DESC NULLS LAST, t.k"
        );
        assert_eq!((plan.columns, plan.width, plan.rank), (1, 4, Some(3)));
        assert_eq!(plan.keys, vec![1, 2]);
        // A position past the output, an ambiguous name, no rewrite: no plan.
        assert!(super::plan("SELECT id FROM t ORDER BY 2", &columns(&["id"])).is_none());
        assert!(
            super::plan(
                "SELECT a AS x, b AS x FROM t ORDER BY x",
                &columns(&["x", "x"])
            )
            .is_none()
        );
        assert!(super::plan("SELECT DISTINCT id FROM t ORDER BY id", &columns(&["id"])).is_none());
    }

    #[test]
    fn only_statements_calling_built_ins_without_effects_are_re_checked() {
        for yes in [
            "SELECT id FROM t ORDER BY lower(v)",
            "SELECT id FROM t WHERE id IN (1, 2) AND EXISTS (SELECT 1) ORDER BY pg_catalog.upper (v)",
            "SELECT v::numeric(10, 2) FROM t ORDER BY coalesce(length(v), 0), date_trunc('day', ts)",
            "SELECT count(*) OVER (ORDER BY id) FROM t ORDER BY 'f(x)' || v -- g(x)",
        ] {
            assert!(calls_only_safe_functions(yes), "{yes}");
        }
        for no in [
            "SELECT id FROM t ORDER BY f(v)",
            "SELECT id, pg_advisory_lock(1) FROM t ORDER BY lower(v)",
            "SELECT id FROM t WHERE dblink_exec('x', 'DELETE FROM t') = 'OK' ORDER BY lower(v)",
            "SELECT lo_export(1, '/tmp/x') FROM t ORDER BY lower(v)",
            "SELECT id FROM t ORDER BY public.lower(v)",
            "SELECT id FROM t ORDER BY \"f\"(v)",
            "SELECT id FROM t, pg_sleep(1) ORDER BY lower(v)",
        ] {
            assert!(!calls_only_safe_functions(no), "{no}");
        }
    }

    /// Folds a re-run answer of rows `(id, key, rank)` for a plan with one output column.
    fn fold(rows: &[(&str, &str, &str)]) -> Folded {
        fold_guarded("0", rows).unwrap()
    }

    /// As [`fold`], with the guard's count as the server answered it.
    fn fold_guarded(guard: &str, rows: &[(&str, &str, &str)]) -> Result<Folded, &'static str> {
        let plan = plan("SELECT id FROM t ORDER BY k", &columns(&["id"])).unwrap();
        let rules = Rc::new(Rules::new(&CompareConfig::default()).unwrap());
        let mut folder = Folder::new(&plan, rules);
        let mut buf = BytesMut::new();
        wire::encode::command_complete(&mut buf, "BEGIN").unwrap();
        wire::encode::command_complete(&mut buf, "SET").unwrap();
        let field = |name| wire::FieldDescription {
            name,
            table_oid: 0,
            column_attr: 0,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: wire::Format::Text,
        };
        wire::encode::row_description(&mut buf, &[field("count")]).unwrap();
        wire::encode::data_row(&mut buf, &[Some(guard.as_bytes())]).unwrap();
        wire::encode::command_complete(&mut buf, "SELECT 1").unwrap();
        wire::encode::ready_for_query(&mut buf, wire::TransactionStatus::InTransaction);
        wire::encode::row_description(&mut buf, &[field("id"), field("k"), field("dense_rank")])
            .unwrap();
        for (id, k, rank) in rows {
            let row = [id, k, rank].map(|v| Some(v.as_bytes()));
            wire::encode::data_row(&mut buf, &row).unwrap();
        }
        wire::encode::command_complete(&mut buf, "SELECT").unwrap();
        wire::encode::ready_for_query(&mut buf, wire::TransactionStatus::InTransaction);
        let mut at = 0;
        while at < buf.len() {
            let len =
                u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
            if let Some(folded) = folder.visit(buf[at], &buf[at + 5..at + 1 + len])? {
                return Ok(folded);
            }
            at += 1 + len;
        }
        panic!("no ReadyForQuery")
    }

    #[test]
    fn a_database_with_functions_of_its_own_is_not_re_checked() {
        let rows = [("1", "a", "1")];
        assert!(fold_guarded("0", &rows).is_ok());
        assert_eq!(fold_guarded("3", &rows), Err(USER_CODE));
        assert_eq!(fold_guarded("x", &rows), Err(FAILED));
        assert_eq!(fold_guarded("", &rows), Err(FAILED));
    }

    /// Judges two re-runs, each against its own rows as the statement returned them.
    fn judge(p: &Folded, s: &Folded) -> Outcome {
        decide([&p.projected, &s.projected], [Ok(p.clone()), Ok(s.clone())])
    }

    #[test]
    fn ties_agree_and_keys_in_another_order_do_not() {
        let a = fold(&[("1", "a", "1"), ("2", "a", "1"), ("3", "b", "2")]);
        let ties = fold(&[("2", "a", "1"), ("1", "a", "1"), ("3", "b", "2")]);
        let order = fold(&[("3", "b", "1"), ("1", "a", "2"), ("2", "a", "2")]);
        let changed = fold(&[("1", "a", "1"), ("2", "a", "1"), ("4", "b", "2")]);
        assert_eq!(judge(&a, &ties), Outcome::Ties);
        assert_eq!(judge(&a, &order), Outcome::Order);
        assert_eq!(judge(&a, &changed), Outcome::Changed);
        // Keys that tie by value but not by bytes ('Bob' and 'bob' under citext): the ranks,
        // which each server gave, decide.
        let bob = fold(&[("1", "Bob", "1"), ("2", "bob", "1"), ("3", "c", "2")]);
        let other = fold(&[("2", "bob", "1"), ("1", "Bob", "1"), ("3", "c", "2")]);
        assert_eq!(judge(&bob, &other), Outcome::Ties);
        // The same rows in the same order, but a key not in the output on another row (a
        // concurrent change to the sort column): changed, not an order difference.
        let moved = fold(&[("2", "a", "1"), ("1", "b", "2"), ("3", "c", "3")]);
        let before = fold(&[("1", "a", "1"), ("2", "b", "2"), ("3", "c", "3")]);
        assert_eq!(judge(&before, &moved), Outcome::Moved);
        // A re-run that does not reproduce its side's original order settles nothing.
        assert_eq!(
            decide(
                [&ties.projected, &ties.projected],
                [Ok(a.clone()), Ok(ties.clone())]
            ),
            Outcome::Failed(REORDERED)
        );
        // The same rank sequence with other rows in a run of equal keys.
        let regrouped = fold(&[("1", "a", "1"), ("3", "a", "1"), ("2", "b", "2")]);
        let other = fold(&[("2", "a", "1"), ("3", "a", "1"), ("1", "b", "2")]);
        assert_eq!(judge(&regrouped, &other), Outcome::Moved);
        let other = fold(&[("2", "a", "1"), ("3", "a", "1"), ("1", "a", "2")]);
        let regrouped = fold(&[("1", "a", "1"), ("3", "a", "1"), ("2", "a", "2")]);
        assert_eq!(judge(&regrouped, &other), Outcome::Order);
        assert_eq!(
            decide(
                [&a.projected, &a.projected],
                [Ok(a.clone()), Err(TIMED_OUT)]
            ),
            Outcome::Failed(TIMED_OUT)
        );
    }
}
