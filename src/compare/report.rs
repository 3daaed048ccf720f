//! Mismatch and slow-query reports, on the control thread: one JSON line per report in
//! `compare.report-path`, and reports grouped by statement fingerprint (counts, first and last
//! seen, up to three examples) for `/status` and `/metrics`. Shards never come here: they
//! send [`Record`]s over a bounded ring and move on.
//!
//! The report file is rotated by size (`compare.report-bytes-max`), keeping
//! `compare.report-files-max` rotated files, so it never fills a disk; a rotation that fails
//! drops reports (counted) rather than letting the file grow past its bound.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::{Record, Side};
use crate::config::CompareConfig;

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
    file: Option<ReportFile>,
    groups: HashMap<(u64, &'static str), Group>,
    pub records: u64,
    /// Reports not written: the file could not be opened, written or rotated.
    pub write_errors: u64,
    pub groups_overflow: u64,
}

/// Why a line did not reach the report file.
#[derive(Debug, thiserror::Error)]
enum ReportFileError {
    #[error("cannot open the compare report file")]
    Open(#[source] std::io::Error),
    #[error("cannot write the compare report file")]
    Write(#[source] std::io::Error),
    #[error("cannot rotate the compare report file: {step}")]
    Rotate {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

/// The live report file and its rotated predecessors `path.1` (newest) to `path.N` (oldest,
/// N = `files_max`). A line is never split: one that would take the live file past
/// `bytes_max` goes to a fresh file, so only a single line longer than `bytes_max` makes a
/// file exceed it (alone in its file).
struct ReportFile {
    path: PathBuf,
    bytes_max: u64,
    files_max: usize,
    live: Option<BufWriter<File>>,
    /// Bytes in the live file, counted from its length when opened plus what was written.
    live_bytes: u64,
    rotations: u64,
    rotate_errors: u64,
    /// The last open, write or rotation failed: the next failure is not logged again, so a
    /// full disk logs once per outage rather than once per report.
    failing: bool,
}

impl ReportFile {
    fn new(path: PathBuf, bytes_max: u64, files_max: usize) -> ReportFile {
        ReportFile {
            path,
            bytes_max,
            files_max,
            live: None,
            live_bytes: 0,
            rotations: 0,
            rotate_errors: 0,
            failing: false,
        }
    }

    /// Appends `line` (a newline is added), rotating first when it would not fit.
    fn write_line(&mut self, line: &str) -> Result<(), ReportFileError> {
        let bytes = line.len() as u64 + 1;
        let mut live = match self.live.take() {
            Some(live) => live,
            None => self.open()?,
        };
        if self.live_bytes > 0 && self.live_bytes + bytes > self.bytes_max {
            self.rotate(live)?;
            live = self.open()?;
        }
        let written = live
            .write_all(line.as_bytes())
            .and_then(|()| live.write_all(b"\n"));
        // On an error, how much of the line reached the file is unknown: the file is reopened
        // (and its length read again) for the next report.
        written.map_err(ReportFileError::Write)?;
        self.live_bytes += bytes;
        self.live = Some(live);
        Ok(())
    }

    /// Opens the live file for appending; its length counts towards the bound, so a file
    /// left by an earlier run is rotated when full.
    fn open(&mut self) -> Result<BufWriter<File>, ReportFileError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(ReportFileError::Open)?;
        self.live_bytes = file.metadata().map_err(ReportFileError::Open)?.len();
        Ok(BufWriter::new(file))
    }

    /// Closes the live file and shifts `path` → `path.1` → ... → `path.N`, deleting the
    /// oldest. Stops at the first failure, before a rename could overwrite a kept file; the
    /// next report reopens the live file and tries again (gaps in the chain are skipped).
    fn rotate(&mut self, live: BufWriter<File>) -> Result<(), ReportFileError> {
        let result = self.shift(live);
        match &result {
            Ok(()) => self.rotations += 1,
            Err(_) => self.rotate_errors += 1,
        }
        result
    }

    fn shift(&self, mut live: BufWriter<File>) -> Result<(), ReportFileError> {
        live.flush().map_err(ReportFileError::Write)?;
        drop(live);
        let oldest = rotated(&self.path, self.files_max);
        match std::fs::remove_file(&oldest) {
            Err(err) if err.kind() != ErrorKind::NotFound => {
                return Err(ReportFileError::Rotate {
                    step: format!("delete {}", oldest.display()),
                    source: err,
                });
            }
            _ => {}
        }
        for n in (0..self.files_max).rev() {
            let from = rotated(&self.path, n);
            let to = rotated(&self.path, n + 1);
            match std::fs::rename(&from, &to) {
                Err(err) if err.kind() != ErrorKind::NotFound => {
                    return Err(ReportFileError::Rotate {
                        step: format!("rename {} to {}", from.display(), to.display()),
                        source: err,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ReportFileError> {
        if let Some(live) = &mut self.live
            && let Err(err) = live.flush()
        {
            self.live = None;
            return Err(ReportFileError::Write(err));
        }
        Ok(())
    }

    /// Counts and logs (once per run of failures) what `result` says; a success ends the run.
    fn note(&mut self, result: Result<(), ReportFileError>, write_errors: &mut u64) {
        match result {
            Ok(()) => self.failing = false,
            Err(err) => {
                *write_errors += 1;
                if !self.failing {
                    tracing::error!(
                        path = %self.path.display(),
                        error = &err as &dyn std::error::Error,
                        "compare reports are not being written"
                    );
                }
                self.failing = true;
            }
        }
    }
}

/// `path` itself for 0, else `path.n`.
fn rotated(path: &Path, n: usize) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
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
        "verdict": r.verdict,
        "reason": r.reason,
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
    /// `compare.report-path` empty: reports are only grouped, not written.
    pub fn new(cfg: &CompareConfig) -> Book {
        let file = (!cfg.report_path.is_empty()).then(|| {
            ReportFile::new(
                PathBuf::from(&cfg.report_path),
                cfg.report_bytes_max,
                cfg.report_files_max,
            )
        });
        Book {
            file,
            groups: HashMap::new(),
            records: 0,
            write_errors: 0,
            groups_overflow: 0,
        }
    }

    pub fn absorb(&mut self, record: Record) {
        self.records += 1;
        let json = record_json(&record);
        if let Some(file) = &mut self.file {
            let line = sonic_rs::to_string(&json).unwrap_or_default();
            let result = file.write_line(&line);
            file.note(result, &mut self.write_errors);
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
        // Only failures are noted: a flush with no file open (after a failed rotation) says
        // nothing about whether reports are being written again.
        if let Some(file) = &mut self.file
            && let Err(err) = file.flush()
        {
            file.note(Err(err), &mut self.write_errors);
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
            "report_path": self.file.as_ref().map(|f| f.path.display().to_string()),
            "report_write_errors": self.write_errors,
            "report_rotations": self.file.as_ref().map_or(0, |f| f.rotations),
            "report_rotate_errors": self.file.as_ref().map_or(0, |f| f.rotate_errors),
            "groups_not_kept": self.groups_overflow,
            "groups": groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonic_rs::JsonValueTrait;

    fn record(i: u64) -> Record {
        Record {
            record: "mismatch",
            kinds: vec!["rows"],
            description: format!("row count differs ({i})"),
            statement: format!("SELECT {i} FROM t WHERE note = 'line \"{i}\"\n'"),
            fingerprint: i % 7,
            fingerprint_text: "SELECT $1 FROM t WHERE note = $2".into(),
            session: i,
            unix_ms: i,
            ..Record::default()
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgprism-report-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rotates_by_size_and_keeps_whole_lines() {
        let dir = temp_dir("rotate");
        let path = dir.join("reports.jsonl");
        let cfg = CompareConfig {
            report_path: path.display().to_string(),
            report_bytes_max: 4096,
            report_files_max: 3,
            ..CompareConfig::default()
        };
        // At least as long as any line written below (their numbers have fewer digits).
        let line_bytes = sonic_rs::to_string(&record_json(&record(1_000_000)))
            .unwrap()
            .len()
            + 1;
        // Enough for about ten files of 4096 bytes: rotates well past the files kept.
        let total = 10 * 4096 / line_bytes as u64;
        let mut book = Book::new(&cfg);
        for i in 0..total {
            book.absorb(record(i));
            if i % 5 == 0 {
                book.flush();
            }
        }
        book.flush();
        assert_eq!(book.write_errors, 0);
        let file = book.file.as_ref().unwrap();
        assert!(file.rotations >= 4, "{} rotations", file.rotations);
        assert_eq!(file.rotate_errors, 0);

        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "reports.jsonl",
                "reports.jsonl.1",
                "reports.jsonl.2",
                "reports.jsonl.3"
            ]
        );
        // Oldest file first: the sessions kept are the newest ones, in order, none missing.
        let mut sessions = Vec::new();
        for n in (0..=3).rev() {
            let text = std::fs::read_to_string(rotated(&path, n)).unwrap();
            assert!(
                text.len() as u64 <= cfg.report_bytes_max,
                "file {n}: {}",
                text.len()
            );
            assert!(text.ends_with('\n'), "file {n} ends mid-line");
            for line in text.lines() {
                let value: sonic_rs::Value = sonic_rs::from_str(line).unwrap();
                sessions.push(value["session"].as_u64().unwrap());
            }
        }
        let first = sessions[0];
        assert!(first > 0, "the oldest files were not deleted");
        assert_eq!(sessions, (first..total).collect::<Vec<_>>());
        // Every rotated file was filled to within one line of the bound.
        for n in 1..=3 {
            let len = std::fs::metadata(rotated(&path, n)).unwrap().len();
            assert!(
                len + line_bytes as u64 > cfg.report_bytes_max,
                "file {n}: {len}"
            );
        }
        let status = book.status_json();
        assert_eq!(status["report_rotations"].as_u64(), Some(file.rotations));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_file_left_by_an_earlier_run_is_rotated() {
        let dir = temp_dir("reopen");
        let path = dir.join("reports.jsonl");
        std::fs::write(&path, "{}\n".repeat(1400)).unwrap();
        let cfg = CompareConfig {
            report_path: path.display().to_string(),
            report_bytes_max: 4096,
            report_files_max: 1,
            ..CompareConfig::default()
        };
        let mut book = Book::new(&cfg);
        book.absorb(record(1));
        book.flush();
        assert_eq!(
            std::fs::read_to_string(rotated(&path, 1)).unwrap().len(),
            4200
        );
        let live = std::fs::read_to_string(&path).unwrap();
        assert_eq!(live.lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rotation_is_counted_and_drops_the_report() {
        let dir = temp_dir("fail");
        let path = dir.join("reports.jsonl");
        std::fs::write(&path, "{}\n".repeat(1400)).unwrap();
        // A directory where the oldest rotated file goes: it cannot be deleted as a file.
        std::fs::create_dir(rotated(&path, 1)).unwrap();
        std::fs::write(rotated(&path, 1).join("keep"), "").unwrap();
        let cfg = CompareConfig {
            report_path: path.display().to_string(),
            report_bytes_max: 4096,
            report_files_max: 1,
            ..CompareConfig::default()
        };
        let mut book = Book::new(&cfg);
        book.absorb(record(1));
        book.absorb(record(2));
        book.flush();
        assert_eq!(book.records, 2);
        assert_eq!(book.write_errors, 2);
        assert_eq!(book.file.as_ref().unwrap().rotate_errors, 2);
        // The live file stays within its bound and untouched.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4200);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
