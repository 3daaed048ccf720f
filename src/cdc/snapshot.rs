//! Initial snapshot: copies the tables as they were when the slot was created, under the
//! snapshot the slot exported, in chunks through a cursor. Streaming then starts at the
//! slot's consistent point: every change after the snapshot comes from the slot, none before
//! it does, so there is no gap and no duplicate. The creating replication connection is kept
//! open and idle meanwhile (the exported snapshot lives only as long as that).

use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::qualified;
use super::lsn::Lsn;
use super::pgconn::{PgConn, quote_literal};
use super::pipeline::{PipelineConfig, snapshot_batch};
use super::schema::{Column, TableSchema};
use super::setup::{SourceTable, split_table};
use super::source::now_text;
use super::starrocks::StarRocks;
use super::{CdcError, Shared};
use crate::config::{CdcConfig, PgUrl};

#[allow(clippy::too_many_arguments)]
pub fn copy(
    cfg: &CdcConfig,
    url: &PgUrl,
    snapshot: &str,
    point: Lsn,
    tables: &[SourceTable],
    pcfg: &PipelineConfig,
    sink: &mut StarRocks,
    shared: &Arc<Shared>,
    timeout: Duration,
) -> Result<(), CdcError> {
    let mut conn = PgConn::connect(url, false, timeout).map_err(CdcError::Snapshot)?;
    conn.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .map_err(CdcError::Snapshot)?;
    conn.query(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .map_err(CdcError::Snapshot)?;
    let mut copier = Copier {
        conn,
        chunk_rows: cfg.snapshot_chunk_rows,
        point,
        pcfg,
        sink,
        shared,
    };
    for table in tables {
        copier.copy_table(table)?;
    }
    copier.conn.query("COMMIT").map_err(CdcError::Snapshot)?;
    Ok(())
}

/// The connection inside the snapshot's transaction, and where the copied rows go.
struct Copier<'a> {
    conn: PgConn,
    chunk_rows: usize,
    point: Lsn,
    pcfg: &'a PipelineConfig,
    sink: &'a mut StarRocks,
    shared: &'a Shared,
}

impl Copier<'_> {
    fn copy_table(&mut self, table: &SourceTable) -> Result<(), CdcError> {
        let name = qualified(&table.name);
        let schema = self.schema(table, &name)?;
        self.conn
            .query(&format!(
                "DECLARE pgprism_snapshot NO SCROLL CURSOR FOR SELECT * FROM {name}"
            ))
            .map_err(CdcError::Snapshot)?;
        let chunks = self.load_chunks(&schema)?;
        self.conn
            .query("CLOSE pgprism_snapshot")
            .map_err(CdcError::Snapshot)?;
        tracing::info!(table = %table.name, chunks, "snapshot copied");
        Ok(())
    }

    /// The table's columns as the snapshot sees them; `name` is the quoted name.
    fn schema(&mut self, table: &SourceTable, name: &str) -> Result<TableSchema, CdcError> {
        let cols = self
            .conn
            .query(&format!(
                "SELECT attname, atttypid::int8::text FROM pg_attribute \
                 WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                quote_literal(name)
            ))
            .map_err(CdcError::Snapshot)?;
        let columns: Vec<Column> = cols
            .iter()
            .map(|r| {
                let n = r.first().cloned().flatten().unwrap_or_default();
                let oid = r
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(25);
                Column::new(&n, oid)
            })
            .collect();
        Ok(TableSchema {
            oid: 0,
            source_name: table.name.clone(),
            target_name: split_table(&table.name).1.to_string(),
            columns,
            key: Vec::new(),
            generation: 0,
        })
    }

    /// Fetches the open cursor in chunks and loads each; returns the number of chunks.
    fn load_chunks(&mut self, schema: &TableSchema) -> Result<u64, CdcError> {
        let mut chunk = 0u64;
        loop {
            let rows = self
                .conn
                .query(&format!("FETCH {} FROM pgprism_snapshot", self.chunk_rows))
                .map_err(CdcError::Snapshot)?;
            if rows.is_empty() {
                return Ok(chunk);
            }
            chunk += 1;
            let batch = snapshot_batch(self.pcfg, schema, &rows, chunk, self.point, &now_text());
            self.sink.load(&batch).map_err(CdcError::Load)?;
            if let Ok(mut t) = self.shared.tables.lock() {
                let s = t.entry(batch.table.clone()).or_default();
                s.rows += batch.rows;
                s.bytes += batch.body.len() as u64;
                s.loads += 1;
            }
        }
    }
}
