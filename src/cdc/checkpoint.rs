//! The checkpoint: the confirmed LSN per slot, stored in a table in the source database after
//! every load up to it succeeded, and only then reported to PostgreSQL. A restart resumes from
//! here; the replication slot's own position is never the only record.

use std::time::Duration;

use super::lsn::Lsn;
use super::pgconn::{PgConn, PgError, quote_ident, quote_literal};
use crate::config::PgUrl;

pub struct Checkpoints {
    conn: PgConn,
    table: String,
    /// The configured name (the snapshot's chunk table is named after it).
    configured: String,
    slot: String,
}

impl Checkpoints {
    pub fn connect(
        url: &PgUrl,
        table: &str,
        slot: &str,
        timeout: Duration,
    ) -> Result<Checkpoints, PgError> {
        Ok(Checkpoints {
            conn: PgConn::connect(url, false, timeout)?,
            table: qualified(table),
            configured: table.to_string(),
            slot: slot.to_string(),
        })
    }

    /// Creates the table if it is missing (setup does this before anything streams), and
    /// adds the columns an older version's table lacks: the last TRUNCATE applied and the
    /// slot's incarnation.
    pub fn create_sql(table: &str) -> String {
        let table = qualified(table);
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (slot text PRIMARY KEY, lsn pg_lsn NOT NULL, \
             pending pg_lsn, updated_at timestamptz NOT NULL DEFAULT now()); \
             ALTER TABLE {table} ADD COLUMN IF NOT EXISTS truncated_lsn pg_lsn, \
             ADD COLUMN IF NOT EXISTS truncated_idx bigint, \
             ADD COLUMN IF NOT EXISTS incarnation text, \
             ADD COLUMN IF NOT EXISTS publishing text"
        )
    }

    /// Setup's SQL when it creates the slot: the row an earlier slot of the same name left
    /// (its position, pending boundary and last TRUNCATE) describes another stream, and a new
    /// slot owes it nothing. Kept, it would skip the new stream's changes up to the old
    /// position, or take a new TRUNCATE for one already applied, when the new stream's LSNs
    /// are lower (the database moved to another server with its checkpoint table). The row
    /// is replaced by one that holds only the new slot's `incarnation` (see `setup::incarnation`).
    pub fn forget_sql(table: &str, slot: &str, incarnation: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE slot = {slot}; {}",
            Self::incarnation_sql(table, slot, incarnation),
            table = qualified(table),
            slot = quote_literal(slot),
        )
    }

    /// Records `incarnation` for a slot whose row lacks one or is missing (see setup).
    pub fn incarnation_sql(table: &str, slot: &str, incarnation: &str) -> String {
        format!(
            "INSERT INTO {} (slot, lsn, incarnation) VALUES ({}, '0/0', {}) \
             ON CONFLICT (slot) DO UPDATE SET incarnation = excluded.incarnation;",
            qualified(table),
            quote_literal(slot),
            quote_literal(incarnation)
        )
    }

    /// Records that the TRUNCATE at `at` (see `Work::Truncate`) emptied its StarRocks tables.
    pub fn store_truncated(&mut self, at: (Lsn, u64)) -> Result<(), PgError> {
        self.conn.query(&format!(
            "INSERT INTO {} (slot, lsn, truncated_lsn, truncated_idx) VALUES ({}, '0/0', '{}', {}) \
             ON CONFLICT (slot) DO UPDATE SET truncated_lsn = excluded.truncated_lsn, \
             truncated_idx = excluded.truncated_idx, updated_at = now()",
            self.table,
            quote_literal(&self.slot),
            at.0,
            at.1
        ))?;
        Ok(())
    }

    /// The place of the last TRUNCATE applied, if any.
    pub fn load_truncated(&mut self) -> Result<Option<(Lsn, u64)>, PgError> {
        let rows = self.conn.query(&format!(
            "SELECT truncated_lsn::text, truncated_idx::text FROM {} WHERE slot = {}",
            self.table,
            quote_literal(&self.slot)
        ))?;
        let field = |i: usize| rows.first().and_then(|r| r.get(i).cloned().flatten());
        Ok(field(0)
            .and_then(|t| Lsn::parse(&t))
            .zip(field(1).and_then(|t| t.parse().ok())))
    }

    /// Announces the end of the flush cycle being loaded (see `Work::Boundary`).
    pub fn store_pending(&mut self, lsn: Lsn) -> Result<(), PgError> {
        self.conn.query(&format!(
            "INSERT INTO {} (slot, lsn, pending) VALUES ({}, '0/0', '{lsn}') \
             ON CONFLICT (slot) DO UPDATE SET pending = excluded.pending, updated_at = now()",
            self.table,
            quote_literal(&self.slot)
        ))?;
        Ok(())
    }

    /// The stored position, if any.
    pub fn load(&mut self) -> Result<Option<Lsn>, PgError> {
        Ok(self.slot_value("lsn::text")?.and_then(|t| Lsn::parse(&t)))
    }

    /// One value (`expr`) of this slot's row, if the row and the value exist.
    fn slot_value(&mut self, expr: &str) -> Result<Option<String>, PgError> {
        let rows = self.conn.query(&format!(
            "SELECT {expr} FROM {} WHERE slot = {}",
            self.table,
            quote_literal(&self.slot)
        ))?;
        Ok(rows.first().and_then(|r| r.first().cloned().flatten()))
    }

    /// Records an initial-snapshot chunk as done (its rows are in StarRocks): moves its
    /// range's record past it. False when the range's record is not at the chunk's lower
    /// bound yet (a chunk before it in the range is not recorded yet).
    pub fn store_chunk_done(
        &mut self,
        table: &str,
        chunk: u32,
        rows: u64,
        span: &super::snapshot::Span,
    ) -> Result<bool, PgError> {
        let sql =
            super::snapshot::chunk_done_sql(&self.configured, &self.slot, table, chunk, rows, span);
        Ok(!self.conn.query(&sql)?.is_empty())
    }

    /// Stores the snapshot's partial keys (see `snapshot::window::PartialKeys`).
    pub fn store_partial_keys(
        &mut self,
        state: &[super::snapshot::window::PartialState],
    ) -> Result<(), PgError> {
        let sql = super::snapshot::partial_sql(&self.configured, &self.slot, state);
        if !sql.is_empty() {
            self.conn.query(&sql)?;
        }
        Ok(())
    }

    /// Stores the position, with the labels of the StarRocks commits still publishing then
    /// (`publishing`, see `fill::Publishing`): a process started later waits for them before
    /// it reads values from StarRocks, as a run of the same process does.
    pub fn store(&mut self, lsn: Lsn, publishing: &[&str]) -> Result<(), PgError> {
        let labels = if publishing.is_empty() {
            "NULL".to_string()
        } else {
            quote_literal(&publishing.join(" "))
        };
        self.conn.query(&format!(
            "INSERT INTO {} (slot, lsn, publishing) VALUES ({}, '{lsn}', {labels}) \
             ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, \
             publishing = excluded.publishing, updated_at = now()",
            self.table,
            quote_literal(&self.slot)
        ))?;
        Ok(())
    }

    /// The labels [`Checkpoints::store`] last recorded as still publishing (labels hold only
    /// `[-_A-Za-z0-9]`, so they are stored separated by spaces).
    pub fn load_publishing(&mut self) -> Result<Vec<String>, PgError> {
        Ok(self
            .slot_value("publishing")?
            .map(|t| t.split_ascii_whitespace().map(str::to_string).collect())
            .unwrap_or_default())
    }
}

/// `name` or `schema.name`, each part quoted.
pub fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(table),
    }
}
