//! Verdicts: what differs between the primary's and the shadow's digest of one statement,
//! in words a person can act on. Errors compare by SQLSTATE, never by message text.

use super::digest::Digest;
use super::rules::{Rules, type_name};

/// Kinds of difference, for counters and grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One side failed, the other did not.
    Error,
    /// Both failed with different SQLSTATEs.
    Sqlstate,
    CommandTag,
    RowCount,
    Columns,
    ColumnTypes,
    Values,
    /// Same rows, different order, under ORDER BY.
    Order,
    /// A multi-statement query produced a different number of results.
    Results,
    /// The shadow was slower than `compare.slow-query-ratio`.
    Slow,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Error,
        Kind::Sqlstate,
        Kind::CommandTag,
        Kind::RowCount,
        Kind::Columns,
        Kind::ColumnTypes,
        Kind::Values,
        Kind::Order,
        Kind::Results,
        Kind::Slow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Error => "error",
            Kind::Sqlstate => "sqlstate",
            Kind::CommandTag => "command_tag",
            Kind::RowCount => "row_count",
            Kind::Columns => "columns",
            Kind::ColumnTypes => "column_types",
            Kind::Values => "values",
            Kind::Order => "order",
            Kind::Results => "results",
            Kind::Slow => "slow",
        }
    }

    pub fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// The nondeterministic reason of a statement cancelled on one side only (the only one that
/// explains an error on one side).
pub const CANCELLED: &str = "a statement cancelled on one side";

/// What a difference means (issue 15's three verdicts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A real incompatibility: counted, reported, and under `fail-on-differences` the client
    /// gets XX000.
    Mismatch,
    /// The statement's order with a conflicting statement of another session could not be
    /// reproduced on the shadow (`compare.order-wait-ms` ran out, or a write ran on the
    /// primary only): either answer may be right. Reported, never fails the client.
    Concurrent,
    /// The result differs by nature (a volatile function, a server-local value, LIMIT
    /// without ORDER BY): reported with the reason, never fails the client.
    Nondeterministic(&'static str),
}

impl Verdict {
    /// Which verdict a statement's differences get: `nondeterministic` is the statement's
    /// reason to differ by nature, `overtaken` whether its order was not reproduced. A
    /// slow-only verdict stays a mismatch (it is about time, not order).
    pub fn of(
        differences: &[Difference],
        nondeterministic: Option<&'static str>,
        overtaken: bool,
    ) -> Verdict {
        if differences.iter().all(|d| d.kind == Kind::Slow) {
            return Verdict::Mismatch;
        }
        // What each excuse can explain: neither order nor nature changes a result's shape;
        // an error on one side is explained by order (a lock, a race for a key) or by a
        // cancel, not by a volatile function.
        let explains = |kind: Kind, concurrent: bool, cancelled: bool| match kind {
            Kind::Slow => true,
            Kind::Columns | Kind::ColumnTypes => false,
            Kind::Error | Kind::Sqlstate => concurrent || cancelled,
            Kind::CommandTag | Kind::RowCount | Kind::Values | Kind::Order | Kind::Results => true,
        };
        let all = |concurrent: bool, cancelled: bool| {
            differences
                .iter()
                .all(|d| explains(d.kind, concurrent, cancelled))
        };
        match nondeterministic {
            Some(why) if all(false, why == CANCELLED) => Verdict::Nondeterministic(why),
            _ if overtaken && all(true, false) => Verdict::Concurrent,
            _ => Verdict::Mismatch,
        }
    }

    /// The report's `record` field.
    pub fn record(self) -> &'static str {
        match self {
            Verdict::Mismatch => "mismatch",
            Verdict::Concurrent | Verdict::Nondeterministic(_) => "inconclusive",
        }
    }

    /// The report's `verdict` field.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Mismatch => "mismatch",
            Verdict::Concurrent => "inconclusive: concurrent",
            Verdict::Nondeterministic(_) => "inconclusive: nondeterministic",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Difference {
    pub kind: Kind,
    pub text: String,
}

fn diff(kind: Kind, text: String) -> Difference {
    Difference { kind, text }
}

fn column_list(cols: &[(String, u32)]) -> String {
    cols.iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Compares one statement's two digests. `ordered`: the statement has a top-level ORDER BY,
/// so row order matters.
pub fn compare(primary: &Digest, shadow: &Digest, ordered: bool, rules: &Rules) -> Vec<Difference> {
    if let Some(errors) = compare_errors(primary, shadow) {
        return errors.into_iter().collect();
    }
    let mut out = Vec::new();
    if let (Some(pc), Some(sc)) = (&primary.columns, &shadow.columns) {
        compare_columns(pc, sc, rules, &mut out);
    }
    let structural = !out.is_empty();
    if primary.rows != shadow.rows {
        out.push(diff(
            Kind::RowCount,
            format!(
                "row count differs: primary {} rows, shadow {} rows",
                primary.rows, shadow.rows
            ),
        ));
    } else if primary.tag != shadow.tag {
        out.push(diff(
            Kind::CommandTag,
            format!(
                "command tag differs: primary `{}`, shadow `{}`",
                primary.tag, shadow.tag
            ),
        ));
    }
    // Values of rows whose shape already differs say nothing more.
    if structural {
        return out;
    }
    if primary.unordered != shadow.unordered {
        if primary.rows == shadow.rows {
            out.push(diff(Kind::Values, "row values differ".to_string()));
        }
    } else if ordered
        && match (primary.ordered_keys, shadow.ordered_keys) {
            // The sort keys' sequence: rows whose keys tie may come in any order.
            (Some(p), Some(s)) => p != s,
            _ => primary.ordered != shadow.ordered,
        }
    {
        out.push(diff(
            Kind::Order,
            "same rows in a different order under ORDER BY".to_string(),
        ));
    }
    out
}

/// When either side failed, the errors are the whole verdict: `Some` (with the difference,
/// if any); `None` when both succeeded.
fn compare_errors(primary: &Digest, shadow: &Digest) -> Option<Option<Difference>> {
    Some(match (primary.error_code(), shadow.error_code()) {
        (Some(p), Some(s)) if p == s => None,
        (Some(p), Some(s)) => Some(diff(
            Kind::Sqlstate,
            format!(
                "SQLSTATE differs: primary {p} ({}), shadow {s} ({})",
                primary.message, shadow.message
            ),
        )),
        (Some(p), None) => Some(diff(
            Kind::Error,
            format!(
                "error on primary only: {p} ({}); shadow returned `{}`",
                primary.message, shadow.tag
            ),
        )),
        (None, Some(s)) => Some(diff(
            Kind::Error,
            format!(
                "error on shadow only: {s} ({}); primary returned `{}`",
                shadow.message, primary.tag
            ),
        )),
        (None, None) => return None,
    })
}

/// Column names, then (when the names agree) each column's type under the rules.
fn compare_columns(
    pc: &[(String, u32)],
    sc: &[(String, u32)],
    rules: &Rules,
    out: &mut Vec<Difference>,
) {
    let same_names = pc.len() == sc.len() && pc.iter().zip(sc).all(|(p, s)| p.0 == s.0);
    if !same_names {
        out.push(diff(
            Kind::Columns,
            format!(
                "columns differ: primary {} ({}), shadow {} ({})",
                pc.len(),
                column_list(pc),
                sc.len(),
                column_list(sc)
            ),
        ));
        return;
    }
    for ((name, pt), (_, st)) in pc.iter().zip(sc.iter()) {
        if !rules.same_type(*pt, *st) {
            out.push(diff(
                Kind::ColumnTypes,
                format!(
                    "column `{name}` type differs: primary {}, shadow {}",
                    type_name(*pt),
                    type_name(*st)
                ),
            ));
        }
    }
}

/// Sample rows present on one side and not the other (within the kept samples).
pub fn sample_difference(primary: &Digest, shadow: &Digest) -> (Vec<String>, Vec<String>) {
    let only = |a: &Digest, b: &Digest| {
        a.sample
            .iter()
            .filter(|(h, _)| !b.sample.iter().any(|(g, _)| g == h))
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    };
    (only(primary, shadow), only(shadow, primary))
}
