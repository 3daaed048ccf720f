//! The session settings a mirror session needs replayed when it lost them (a reconnect, or a
//! cut that dropped queued frames): the client's SET, RESET and `set_config(..., false)` that
//! outlive their transaction, in order, one per parameter, bounded.
//!
//! It must never keep what PostgreSQL itself forgets when the transaction ends: `SET LOCAL`,
//! `SET TRANSACTION`, `SET CONSTRAINTS` and `set_config(..., true)` are not kept, and
//! session-level changes made inside a transaction block are kept only once the block
//! commits (a rolled-back `SET` is undone on the primary, so replaying it would make the
//! mirror differ).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::sql::{Setting, Transaction};
use crate::wire;

/// The default of `proxy.session-settings-max`: settings kept per session (one per
/// parameter); the oldest are forgotten beyond it, and so are the oldest changes of an open
/// transaction block.
pub const SETTINGS_MAX: usize = 64;

/// A change to what is kept; the frame is a Query holding just the statement.
#[derive(Debug)]
enum Change {
    Set { key: String, frame: Bytes },
    Reset { key: String },
    ResetAll,
}

#[derive(Debug)]
pub struct Settings {
    /// Settings kept at most (see [`SETTINGS_MAX`]).
    max: usize,
    /// (key, Query frame), oldest first.
    kept: VecDeque<(String, Bytes)>,
    /// Changes made inside the open transaction block, applied when it commits.
    pending: VecDeque<Change>,
    /// A transaction block is open, as far as the statements seen tell.
    in_block: bool,
    /// The block is the implicit one of a multi-statement Query (opened here, not by BEGIN).
    implicit: bool,
    /// Changes applied to `kept` so far: the same count, the same frames (a pooled session
    /// hashes its settings once per change rather than twice per transaction).
    applied: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings::new(SETTINGS_MAX)
    }
}

impl Settings {
    pub fn new(max: usize) -> Settings {
        Settings {
            max: max.max(1),
            kept: VecDeque::new(),
            pending: VecDeque::new(),
            in_block: false,
            implicit: false,
            applied: 0,
        }
    }

    /// The Query frames that bring a fresh mirror session to the client session's settings.
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.kept.iter().map(|(_, frame)| frame)
    }

    /// How many changes [`Settings::frames`] has seen: equal counts, equal frames.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// A client statement changed a setting; `text` is that statement alone.
    pub fn change(&mut self, setting: Setting, text: &[u8]) {
        let change = match setting {
            Setting::Set { key } => {
                let mut out = BytesMut::new();
                // Text that is not UTF-8 or holds a NUL cannot have run on the primary either.
                let Ok(text) = std::str::from_utf8(text) else {
                    return;
                };
                if wire::encode::query(&mut out, text).is_err() {
                    return;
                }
                Change::Set {
                    key,
                    frame: out.freeze(),
                }
            }
            Setting::Reset { key } => Change::Reset { key },
            Setting::ResetAll => Change::ResetAll,
        };
        if self.in_block {
            if self.pending.len() >= self.max {
                self.pending.pop_front();
            }
            self.pending.push_back(change);
        } else {
            self.apply(change);
        }
    }

    /// A statement opened or ended a transaction block.
    pub fn transaction(&mut self, transaction: Transaction) {
        match transaction {
            Transaction::Begin => self.in_block = true,
            Transaction::Commit { chain } => {
                self.commit();
                self.in_block = chain;
            }
            Transaction::Rollback { chain } => {
                self.pending.clear();
                self.in_block = chain;
            }
        }
    }

    /// A Query of several statements starts: outside a transaction block they run in one
    /// implicit block, and an error rolls back the settings they changed too.
    pub fn begin_implicit(&mut self) {
        if !self.in_block {
            self.in_block = true;
            self.implicit = true;
        }
    }

    /// That Query was answered: `failed` when an error ended it (its implicit block rolled
    /// back); `in_block`: an explicit block it opened is still open.
    pub fn end_implicit(&mut self, failed: bool, in_block: bool) {
        if !self.implicit {
            return;
        }
        self.implicit = false;
        if in_block {
            return;
        }
        if failed {
            self.pending.clear();
        } else {
            self.commit();
        }
        self.in_block = false;
    }

    /// The session is idle outside a transaction block (its server said so). A block still
    /// open here ended through a statement not seen as such; it is taken as committed, which
    /// is what keeping every setting did before blocks were tracked.
    pub fn idle(&mut self) {
        if self.in_block {
            self.commit();
            self.in_block = false;
        }
    }

    fn commit(&mut self) {
        while let Some(change) = self.pending.pop_front() {
            self.apply(change);
        }
    }

    fn apply(&mut self, change: Change) {
        self.applied += 1;
        match change {
            Change::Set { key, frame } => {
                // Only the last value of a parameter matters; replaying the others would
                // only crowd the bounded list.
                self.kept.retain(|(k, _)| *k != key);
                if self.kept.len() >= self.max {
                    self.kept.pop_front();
                }
                self.kept.push_back((key, frame));
            }
            Change::Reset { key } => self.kept.retain(|(k, _)| *k != key),
            Change::ResetAll => self.kept.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql;

    fn run(settings: &mut Settings, text: &str) {
        let sql = text.as_bytes();
        if let Some(t) = sql::transaction(sql) {
            settings.transaction(t);
        } else if let Some(s) = sql::setting(sql) {
            settings.change(s, sql);
        }
    }

    fn kept(settings: &Settings) -> Vec<String> {
        settings
            .frames()
            .map(|f| {
                let body = &f[wire::HEADER_BYTES..f.len() - 1];
                String::from_utf8(body.to_vec()).unwrap()
            })
            .collect()
    }

    #[test]
    fn keeps_session_level_changes_only() {
        let mut s = Settings::default();
        for text in [
            "SET search_path = app",
            "BEGIN",
            "SET LOCAL statement_timeout = '5s'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SELECT set_config('app.user', 'x', true)",
            "COMMIT",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SELECT set_config('app.tenant', '7', false)",
        ] {
            run(&mut s, text);
        }
        assert_eq!(
            kept(&s),
            [
                "SET search_path = app",
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                "SELECT set_config('app.tenant', '7', false)",
            ]
        );
    }

    #[test]
    fn rolled_back_blocks_leave_nothing_committed_ones_count() {
        let mut s = Settings::default();
        for text in [
            "SET search_path = app",
            "BEGIN",
            "SET search_path = other",
            "RESET ALL",
            "ROLLBACK",
            "START TRANSACTION",
            "SET work_mem = '8MB'",
            "COMMIT AND CHAIN",
            "SET timezone = 'UTC'",
            "ROLLBACK TO SAVEPOINT a",
            "END",
        ] {
            run(&mut s, text);
        }
        assert_eq!(
            kept(&s),
            [
                "SET search_path = app",
                "SET work_mem = '8MB'",
                "SET timezone = 'UTC'"
            ]
        );
        // A block whose end was not seen counts as committed once the session is idle.
        run(&mut s, "BEGIN");
        run(&mut s, "SET TIME ZONE 'Europe/Paris'");
        assert_eq!(kept(&s).len(), 3);
        s.idle();
        assert_eq!(
            kept(&s),
            [
                "SET search_path = app",
                "SET work_mem = '8MB'",
                "SET TIME ZONE 'Europe/Paris'"
            ]
        );
    }

    #[test]
    fn one_entry_per_parameter_and_resets_forget() {
        let mut s = Settings::default();
        for i in 0..200 {
            run(&mut s, &format!("SET statement_timeout = {i}"));
        }
        run(&mut s, "SET search_path = app");
        run(&mut s, "SET ROLE reader");
        run(&mut s, "SET SESSION AUTHORIZATION bob");
        run(&mut s, "RESET role");
        run(&mut s, "RESET SESSION AUTHORIZATION");
        assert_eq!(
            kept(&s),
            ["SET statement_timeout = 199", "SET search_path = app"]
        );
        run(&mut s, "SET SCHEMA 'other'");
        assert_eq!(
            kept(&s),
            ["SET statement_timeout = 199", "SET SCHEMA 'other'"]
        );
        run(&mut s, "DISCARD ALL");
        assert!(kept(&s).is_empty());
        // Distinct parameters beyond the bound: the oldest go.
        for i in 0..(SETTINGS_MAX + 5) {
            run(&mut s, &format!("SET app.p{i} = 1"));
        }
        let all = kept(&s);
        assert_eq!(all.len(), SETTINGS_MAX);
        assert_eq!(all[0], "SET app.p5 = 1");
    }
}
