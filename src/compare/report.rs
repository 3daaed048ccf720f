//! Mismatch and slow-query reports, on the control thread: one JSON line per report in
//! `compare.report-path`, and reports grouped by statement fingerprint (counts, first and last
//! seen, up to three examples) for `/status` and `/metrics`. Shards never come here: they
//! send [`Record`]s over a bounded ring and move on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::{Record, Side};

/// Examples kept per fingerprint group.
const EXAMPLES_MAX: usize = 3;
/// Groups kept; reports of further fingerprints are counted under the totals only.
const GROUPS_MAX: usize = 1000;

pub struct Group {
    pub fingerprint: u64,
    pub statement: String,
    pub record: &'static str,
    pub count: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub kinds: BTreeMap<&'static str, u64>,
    pub examples: Vec<sonic_rs::Value>,
}

/// Everything the control thread knows about compare reports.
pub struct Book {
    path: Option<PathBuf>,
    file: Option<BufWriter<File>>,
    groups: HashMap<(u64, &'static str), Group>,
    pub records: u64,
    pub write_errors: u64,
    pub groups_overflow: u64,
}

fn side_json(side: &Side) -> sonic_rs::Value {
    let columns: Vec<sonic_rs::Value> = side
        .columns
        .iter()
        .map(|(n, t)| sonic_rs::json!({"name": n.as_str(), "type": t.as_str()}))
        .collect();
    sonic_rs::json!({
        "tag": side.tag.as_str(),
        "rows": side.rows,
        "columns": columns,
        "sqlstate": side.error.as_deref(),
        "message": side.message.as_str(),
        "sample_rows": side.sample.clone(),
        "plan": side.plan.as_deref(),
    })
}

/// The JSON form of one report (one line of the report file).
pub fn record_json(r: &Record) -> sonic_rs::Value {
    sonic_rs::json!({
        "record": r.record,
        "kinds": r.kinds.clone(),
        "description": r.description.as_str(),
        "statement": r.statement.as_str(),
        "fingerprint": format!("{:016x}", r.fingerprint),
        "fingerprint_text": r.fingerprint_text.as_str(),
        "primary": side_json(&r.primary),
        "shadow": side_json(&r.shadow),
        "primary_us": r.primary_us,
        "shadow_us": r.shadow_us,
        "shard": r.shard,
        "session": r.session,
        "transaction": r.transaction,
        "in_transaction": r.in_transaction,
        "fallback_to_report": r.fallback,
        "client_failed": r.failed_client,
        "unix_ms": r.unix_ms,
    })
}

impl Book {
    /// `path` empty: reports are only grouped, not written.
    pub fn new(path: &str) -> Book {
        let path = (!path.is_empty()).then(|| PathBuf::from(path));
        Book {
            path,
            file: None,
            groups: HashMap::new(),
            records: 0,
            write_errors: 0,
            groups_overflow: 0,
        }
    }

    pub fn absorb(&mut self, record: Record) {
        self.records += 1;
        let json = record_json(&record);
        if let Some(path) = &self.path {
            if self.file.is_none() {
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    Ok(f) => self.file = Some(BufWriter::new(f)),
                    Err(err) => {
                        if self.write_errors == 0 {
                            tracing::error!(path = %path.display(), error = %err, "cannot open the compare report file");
                        }
                        self.write_errors += 1;
                    }
                }
            }
            if let Some(file) = &mut self.file {
                let line = sonic_rs::to_string(&json).unwrap_or_default();
                if writeln!(file, "{line}").is_err() {
                    self.write_errors += 1;
                    self.file = None;
                }
            }
        }
        let key = (record.fingerprint, record.record);
        if !self.groups.contains_key(&key) && self.groups.len() >= GROUPS_MAX {
            self.groups_overflow += 1;
            return;
        }
        let group = self.groups.entry(key).or_insert_with(|| Group {
            fingerprint: record.fingerprint,
            statement: record.fingerprint_text.clone(),
            record: record.record,
            count: 0,
            first_seen_ms: record.unix_ms,
            last_seen_ms: record.unix_ms,
            kinds: BTreeMap::new(),
            examples: Vec::new(),
        });
        group.count += 1;
        group.last_seen_ms = record.unix_ms;
        for kind in &record.kinds {
            *group.kinds.entry(kind).or_insert(0) += 1;
        }
        if group.examples.len() < EXAMPLES_MAX {
            group.examples.push(json);
        }
    }

    /// Flushes the report file (called once per control tick, after absorbing).
    pub fn flush(&mut self) {
        if let Some(file) = &mut self.file
            && file.flush().is_err()
        {
            self.write_errors += 1;
            self.file = None;
        }
    }

    /// Groups, most frequent first.
    pub fn groups(&self) -> Vec<&Group> {
        let mut groups: Vec<&Group> = self.groups.values().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.count));
        groups
    }

    pub fn status_json(&self) -> sonic_rs::Value {
        let groups: Vec<sonic_rs::Value> = self
            .groups()
            .iter()
            .map(|g| {
                let mut kinds = sonic_rs::Object::new();
                for (k, n) in &g.kinds {
                    kinds.insert(k, *n);
                }
                sonic_rs::json!({
                    "fingerprint": format!("{:016x}", g.fingerprint),
                    "statement": g.statement.as_str(),
                    "record": g.record,
                    "count": g.count,
                    "first_seen_unix_ms": g.first_seen_ms,
                    "last_seen_unix_ms": g.last_seen_ms,
                    "kinds": kinds,
                    "examples": g.examples.clone(),
                })
            })
            .collect();
        sonic_rs::json!({
            "reports": self.records,
            "report_path": self.path.as_ref().map(|p| p.display().to_string()),
            "report_write_errors": self.write_errors,
            "groups_not_kept": self.groups_overflow,
            "groups": groups,
        })
    }
}
