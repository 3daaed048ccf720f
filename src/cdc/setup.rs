//! Idempotent setup, in two phases so a failure leaves nothing half-created: first every
//! check (privilege, tables and their keys, StarRocks credentials and tables, an existing
//! slot's health), then the changes (replica identity, publication, checkpoint table, slot).
//! An existing slot is reused as it is and never dropped: dropping it would lose every change
//! made while pgprism was down.

use std::collections::HashMap;
use std::time::Duration;

use super::checkpoint::{Checkpoints, qualified};
use super::ddl::{PgType, SourceColumn};
use super::lsn::Lsn;
use super::pgconn::{PgConn, PgError, quote_ident, quote_literal};
use super::schema::KeyColumns;
use super::starrocks::{LoadError, StarRocks};
use crate::config::{CdcConfig, PgUrl};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to the source database")]
    Connect(#[source] PgError),
    #[error(
        "user `{user}` lacks the REPLICATION attribute needed for logical replication; run: ALTER ROLE {user} REPLICATION"
    )]
    NoReplication { user: String },
    #[error("source table {table} does not exist (cdc.tables)")]
    TableMissing { table: String },
    #[error(
        "source table {table} has no primary key; StarRocks Primary Key tables and deletes need one"
    )]
    NoPrimaryKey { table: String },
    #[error(
        "replication slot `{slot}` exists with plugin `{plugin}` in database `{database}`; pgprism needs a pgoutput slot in `{expected_db}` (choose another cdc.slot)"
    )]
    SlotMismatch {
        slot: String,
        plugin: String,
        database: String,
        expected_db: String,
    },
    #[error(
        "replication slot `{slot}` is lost (wal_status = lost): PostgreSQL removed WAL it still needed, so changes are missing. \
         Reload the StarRocks tables from a fresh snapshot: drop the slot (SELECT pg_drop_replication_slot('{slot}')), \
         delete the row for it from the checkpoint table, and restart with cdc.snapshot = true"
    )]
    SlotLost { slot: String },
    #[error(
        "publication `{publication}` publishes partitioned table {table} without publish_via_partition_root, so its changes would come under its partitions' names. \
         Changing the option changes what every consumer of the publication receives, and covers only changes made after it: \
         run ALTER PUBLICATION {publication} SET (publish_via_partition_root = true) yourself if no other consumer uses it (then recreate the slot with a new snapshot if it has partition changes from before), \
         set cdc.publication-set-via-root = true to let pgprism run it, or choose another cdc.publication"
    )]
    PublicationNotViaRoot { publication: String, table: String },
    #[error(
        "the partitions of {table} changed since the last start (before: [{before}]; now: [{now}]): \
         PostgreSQL replicates no rows for ATTACH, DETACH or DROP PARTITION, so StarRocks may keep rows the table no longer has, or lack rows a partition brought. \
         Take a new snapshot (see \"Partitioned tables\" in docs/cdc.md), or, if StarRocks is known to match, accept the new partitions: \
         DELETE FROM {record_table} WHERE slot = '{slot}' AND root = '{table}'"
    )]
    PartitionsChanged {
        table: String,
        before: String,
        now: String,
        slot: String,
        record_table: String,
    },
    #[error("StarRocks check failed")]
    StarRocks(#[source] LoadError),
    #[error("cannot draw the slot's incarnation from the system's random source")]
    Random(#[source] getrandom::Error),
    #[error("setup step failed: {step}")]
    Step {
        step: String,
        #[source]
        source: PgError,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(PgError) -> SetupError {
    let step = what.into();
    move |source| SetupError::Step { step, source }
}

/// A table as setup found it.
#[derive(Debug, Clone)]
pub struct SourceTable {
    /// `schema.table`.
    pub name: String,
    pub key: Vec<String>,
    pub replica_identity: char,
}

/// What streaming starts from.
pub struct Prepared {
    pub tables: Vec<SourceTable>,
    pub keys: KeyColumns,
    /// The partitions (at every level) of the partitioned tables configured, as
    /// `schema.table`, each with its configured root: a change that arrives under a
    /// partition's name is refused naming the cause (see `SchemaError::PartitionNotViaRoot`).
    pub partitions: HashMap<String, String>,
    /// The checkpoint, if any: where streaming resumes.
    pub checkpoint: Option<Lsn>,
    /// A flush boundary announced after the checkpoint by a run that then stopped.
    pub pending: Option<Lsn>,
    /// The slot was created just now.
    pub slot_created: bool,
    /// The slot's incarnation, which every label carries (see [`incarnation`]); empty for a
    /// slot whose checkpoint row an older version wrote (its labels carry none).
    pub incarnation: String,
}

/// A new slot incarnation: 16 hex digits from the system's random source. Every label of a
/// slot starts with the slot's name and incarnation, so labels stay deterministic while the
/// slot lives (a replay after a crash finds its labels, and a transaction it left prepared,
/// again) and never repeat for a slot of the same name created later, whose LSNs may run over
/// the same ranges (a server restored from a backup, a new primary): StarRocks keeps labels
/// for `label_keep_max_second` and would answer such a repeat as already loaded, for rows it
/// never had.
fn incarnation() -> Result<String, SetupError> {
    let n = getrandom::u64().map_err(SetupError::Random)?;
    Ok(format!("{n:016x}"))
}

/// Splits `schema.table` (default schema `public`).
pub fn split_table(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// Checks everything first, then makes the changes (see the module doc).
pub fn prepare(
    cfg: &CdcConfig,
    url: &PgUrl,
    sink: &StarRocks,
    timeout: Duration,
) -> Result<Prepared, SetupError> {
    let mut conn = PgConn::connect(url, false, timeout).map_err(SetupError::Connect)?;

    // Phase 1: checks only.
    let database = check_role(&mut conn)?;
    let mut tables = Vec::new();
    for name in &cfg.tables {
        tables.push(look_up_table(&mut conn, name)?);
    }
    let mut to_create = Vec::new();
    for t in &tables {
        match sink.check_table(split_table(&t.name).1) {
            Ok(()) => {}
            Err(LoadError::TableMissing { .. }) if cfg.create_tables => to_create.push(t),
            Err(e) => return Err(SetupError::StarRocks(e)),
        }
    }
    let slot_exists = check_slot(&mut conn, &cfg.slot, database)?;
    let partitions = list_partitions(&mut conn, &tables)?;
    for root in partitioned(&mut conn, &tables)? {
        // pgoutput decodes row changes only: what it never sends for these is listed in
        // docs/cdc.md ("Partitioned tables").
        tracing::warn!(table = %root, "partitioned table: a TRUNCATE of one of its partitions, and ATTACH, DETACH or DROP of a partition, are not replicated (PostgreSQL sends none of them with publish_via_partition_root): truncate the table itself, and take a new snapshot of it after partition maintenance (docs/cdc.md, \"Partitioned tables\")");
    }

    // Phase 2: changes, each idempotent.
    for t in to_create {
        create_table(&mut conn, cfg, sink, t)?;
    }
    if cfg.replica_identity_full {
        set_replica_identity_full(&mut conn, &mut tables, &partitions)?;
    }
    ensure_publication(&mut conn, cfg, &tables)?;
    let stored = read_checkpoint(&mut conn, cfg)?;
    let (mut checkpoint, mut pending) = (stored.lsn, stored.pending);
    conn.query(&super::snapshot::create_sql(cfg))
        .map_err(step("create the snapshot's chunk table"))?;
    let incarnation = if !slot_exists {
        if let Some(lsn) = checkpoint.filter(|lsn| *lsn > Lsn::ZERO) {
            tracing::warn!(slot = %cfg.slot, checkpoint = %lsn, "creating the slot anew: the checkpoint an earlier slot of this name left is discarded");
        }
        let incarnation = incarnation()?;
        // The plan goes first: a slot created without one would never be copied. The
        // earlier slot's checkpoint goes in the same transaction, replaced by the new
        // incarnation (see `forget_sql`).
        conn.query(&format!(
            "{} {}",
            Checkpoints::forget_sql(&cfg.checkpoint_table, &cfg.slot, &incarnation),
            super::snapshot::plan_sql(cfg, &tables)
        ))
        .map_err(step("plan the initial snapshot"))?;
        (checkpoint, pending) = (None, None);
        create_slot(cfg, url, timeout)?;
        incarnation
    } else {
        match stored.incarnation {
            Some(incarnation) => incarnation,
            // A row an older version wrote: its labels carried no incarnation, and the ones
            // this slot still owes (a transaction left prepared) are found only under those.
            None if stored.exists => String::new(),
            // A slot with no row at all (made by hand, or by an older version that stopped
            // before its first checkpoint): nothing says which labels are its own, so it gets
            // an incarnation of its own before anything loads.
            None => {
                let incarnation = incarnation()?;
                conn.query(&Checkpoints::incarnation_sql(
                    &cfg.checkpoint_table,
                    &cfg.slot,
                    &incarnation,
                ))
                .map_err(step("record the slot's incarnation"))?;
                incarnation
            }
        }
    };
    tracing::info!(slot = %cfg.slot, %incarnation, "slot incarnation (every label carries it)");
    check_partitions(&mut conn, cfg, &partitions, slot_exists)?;
    let keys = tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    Ok(Prepared {
        tables,
        keys,
        partitions: partitions
            .into_iter()
            .filter(|p| !p.is_root)
            .map(|p| (p.name, p.root))
            .collect(),
        checkpoint,
        pending,
        slot_created: !slot_exists,
        incarnation,
    })
}

/// Creates the StarRocks table for `t` (`cdc.create-tables`) from its PostgreSQL columns.
fn create_table(
    conn: &mut PgConn,
    cfg: &CdcConfig,
    sink: &StarRocks,
    t: &SourceTable,
) -> Result<(), SetupError> {
    let rows = conn
        .query(&format!(
            "SELECT a.attname, a.atttypid::text, a.atttypmod::text FROM pg_attribute a \
             WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            quote_literal(&qualified(&t.name))
        ))
        .map_err(step(format!("read the columns of {}", t.name)))?;
    let columns: Vec<SourceColumn> = rows
        .iter()
        .filter_map(|r| {
            let field = |i: usize| r.get(i).cloned().flatten();
            Some(SourceColumn {
                name: field(0)?,
                ty: PgType {
                    oid: field(1)?.parse().ok()?,
                    typmod: field(2)?.parse().ok()?,
                },
            })
        })
        .collect();
    let table = split_table(&t.name).1;
    let audit = cfg.audit_columns.then_some(cfg.audit_prefix.as_str());
    let sql = super::ddl::create_table(&cfg.database, table, &columns, &t.key, audit);
    sink.ddl(table, &sql).map_err(SetupError::StarRocks)?;
    tracing::info!(table = %t.name, "created the StarRocks table");
    Ok(())
}

/// Checks that the current role may replicate; returns the current database.
fn check_role(conn: &mut PgConn) -> Result<String, SetupError> {
    let rows = conn
        .query("SELECT current_user, (rolreplication OR rolsuper)::text, current_database() FROM pg_roles WHERE rolname = current_user")
        .map_err(step("read the current role"))?;
    let row = rows.first().cloned().unwrap_or_default();
    let user = row.first().cloned().flatten().unwrap_or_default();
    let database = row.get(2).cloned().flatten().unwrap_or_default();
    if row.get(1).cloned().flatten().as_deref() != Some("true") {
        return Err(SetupError::NoReplication { user });
    }
    Ok(database)
}

/// Finds a source table with its primary key and replica identity.
fn look_up_table(conn: &mut PgConn, name: &str) -> Result<SourceTable, SetupError> {
    let (schema, table) = split_table(name);
    let full = format!("{schema}.{table}");
    let rows = conn
        .query(&format!(
            "SELECT c.relreplident::text, \
               (SELECT string_agg(a.attname, ',' ORDER BY array_position(i.indkey::int2[], a.attnum)) \
                  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
            quote_literal(schema),
            quote_literal(table)
        ))
        .map_err(step(format!("look up table {full}")))?;
    let Some(row) = rows.first() else {
        return Err(SetupError::TableMissing { table: full });
    };
    let Some(key) = row.get(1).cloned().flatten() else {
        return Err(SetupError::NoPrimaryKey { table: full });
    };
    let replica_identity = row
        .first()
        .cloned()
        .flatten()
        .and_then(|s| s.chars().next())
        .unwrap_or('d');
    Ok(SourceTable {
        name: full,
        key: key.split(',').map(str::to_string).collect(),
        replica_identity,
    })
}

/// Whether the slot exists; an existing one must be a healthy pgoutput slot in `database`.
fn check_slot(conn: &mut PgConn, slot: &str, database: String) -> Result<bool, SetupError> {
    let slot_rows = conn
        .query(&format!(
            "SELECT plugin, database, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .map_err(step(format!("look up replication slot {slot}")))?;
    let Some(row) = slot_rows.first() else {
        return Ok(false);
    };
    let plugin = row.first().cloned().flatten().unwrap_or_default();
    let db = row.get(1).cloned().flatten().unwrap_or_default();
    if plugin != "pgoutput" || db != database {
        return Err(SetupError::SlotMismatch {
            slot: slot.to_string(),
            plugin,
            database: db,
            expected_db: database,
        });
    }
    if row.get(2).cloned().flatten().as_deref() == Some("lost") {
        return Err(SetupError::SlotLost {
            slot: slot.to_string(),
        });
    }
    Ok(true)
}

fn set_replica_identity_full(
    conn: &mut PgConn,
    tables: &mut [SourceTable],
    partitions: &[Partition],
) -> Result<(), SetupError> {
    for t in tables.iter_mut().filter(|t| t.replica_identity != 'f') {
        conn.query(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            qualified(&t.name)
        ))
        .map_err(step(format!("set REPLICA IDENTITY FULL on {}", t.name)))?;
        t.replica_identity = 'f';
    }
    // A partitioned table's changes carry the old row as its partition's own replica
    // identity has it (the table's is not inherited): each leaf is set too. (A partition
    // attached later gets it at the next start.)
    // Only plain tables: a foreign table partition has no replica identity (PostgreSQL
    // refuses the statement) and sends no changes at all (see docs/cdc.md).
    for leaf in partitions
        .iter()
        .filter(|p| !p.is_root && p.plain && p.replica_identity != 'f')
    {
        conn.query(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            leaf.quoted
        ))
        .map_err(step(format!("set REPLICA IDENTITY FULL on {}", leaf.name)))?;
    }
    Ok(())
}

/// The table that records each partitioned table's partitions as of the last start, per slot.
fn partitions_table(cfg: &CdcConfig) -> String {
    format!("{}_partitions", cfg.checkpoint_table)
}

/// Stops when a partitioned table's partitions differ from those the last start recorded
/// for this slot: PostgreSQL decodes no ATTACH, DETACH or DROP PARTITION, so the rows they
/// add or take away never reach StarRocks; stopping beats diverging without a word. A slot
/// created now starts from the partitions as they are (its snapshot reads them), and so
/// does a slot with nothing recorded (a start of an earlier version).
fn check_partitions(
    conn: &mut PgConn,
    cfg: &CdcConfig,
    partitions: &[Partition],
    slot_exists: bool,
) -> Result<(), SetupError> {
    let table = partitions_table(cfg);
    let quoted = qualified(&table);
    conn.query(&format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (slot text NOT NULL, root text NOT NULL, \
         partitions text NOT NULL, PRIMARY KEY (slot, root))"
    ))
    .map_err(step(format!("create the partition record table {table}")))?;
    let mut roots: Vec<&str> = partitions.iter().map(|p| p.root.as_str()).collect();
    roots.sort_unstable();
    roots.dedup();
    for root in roots {
        let mut now: Vec<&str> = partitions
            .iter()
            .filter(|p| p.root == root && !p.is_root)
            .map(|p| p.name.as_str())
            .collect();
        now.sort_unstable();
        let now = now.join(", ");
        let before = conn
            .query(&format!(
                "SELECT partitions FROM {quoted} WHERE slot = {} AND root = {}",
                quote_literal(&cfg.slot),
                quote_literal(root)
            ))
            .map_err(step(format!("read the recorded partitions of {root}")))?
            .first()
            .and_then(|r| r.first().cloned().flatten());
        match before {
            Some(before) if before == now => continue,
            Some(before) if slot_exists => {
                return Err(SetupError::PartitionsChanged {
                    table: root.to_string(),
                    before,
                    now,
                    slot: cfg.slot.clone(),
                    record_table: quoted,
                });
            }
            _ => {}
        }
        conn.query(&format!(
            "INSERT INTO {quoted} VALUES ({0}, {1}, {2}) \
             ON CONFLICT (slot, root) DO UPDATE SET partitions = {2}",
            quote_literal(&cfg.slot),
            quote_literal(root),
            quote_literal(&now)
        ))
        .map_err(step(format!("record the partitions of {root}")))?;
    }
    Ok(())
}

/// A partition of a configured partitioned table.
struct Partition {
    /// `schema.table`, as pgoutput names it.
    name: String,
    /// Qualified and quoted, for statements.
    quoted: String,
    /// The configured table it belongs to (`schema.table`).
    root: String,
    /// A plain table (relkind `r`): not a foreign table or a partitioned one.
    plain: bool,
    /// The configured table itself (listed so that one with no partitions yet is known).
    is_root: bool,
    replica_identity: char,
}

/// The partitioned tables among `tables` and their partitions, at every level.
fn list_partitions(
    conn: &mut PgConn,
    tables: &[SourceTable],
) -> Result<Vec<Partition>, SetupError> {
    let mut out = Vec::new();
    for root in partitioned(conn, tables)? {
        let rows = conn
            .query(&format!(
                "SELECT n.nspname || '.' || c.relname, format('%s', c.oid::regclass), \
                 c.relkind::text, c.relreplident::text, \
                 (SELECT n2.nspname || '.' || c2.relname FROM pg_class c2 \
                   JOIN pg_namespace n2 ON n2.oid = c2.relnamespace WHERE c2.oid = {0}::regclass) \
                 FROM pg_partition_tree({0}::regclass) p JOIN pg_class c ON c.oid = p.relid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace",
                quote_literal(&root)
            ))
            .map_err(step(format!("list the partitions of {root}")))?;
        for r in rows {
            let field = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            out.push(Partition {
                name: field(0),
                quoted: field(1),
                plain: field(2) == "r",
                replica_identity: field(3).chars().next().unwrap_or('d'),
                is_root: field(0) == field(4),
                root: field(4),
            });
        }
    }
    Ok(out)
}

/// The partitioned tables among `tables`, qualified and quoted.
fn partitioned(conn: &mut PgConn, tables: &[SourceTable]) -> Result<Vec<String>, SetupError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = tables
        .iter()
        .map(|t| format!("{}::regclass", quote_literal(&qualified(&t.name))))
        .collect();
    let rows = conn
        .query(&format!(
            "SELECT format('%s', oid::regclass) FROM pg_class WHERE relkind = 'p' AND oid IN ({})",
            names.join(", ")
        ))
        .map_err(step("look for partitioned tables"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

/// Creates the publication, or adds the tables it lacks.
fn ensure_publication(
    conn: &mut PgConn,
    cfg: &CdcConfig,
    tables: &[SourceTable],
) -> Result<(), SetupError> {
    let name = cfg.publication.as_str();
    let publication = quote_ident(name);
    // The tables it publishes (all of them for FOR ALL TABLES) and the tables added to it:
    // a partitioned table added is published as its leaves (without
    // `publish_via_partition_root`), so `pg_publication_tables` alone never names it, and a
    // restart added it again, which PostgreSQL refuses ("already member of publication").
    let published = conn
        .query(&format!(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = {0} \
             UNION SELECT n.nspname || '.' || c.relname FROM pg_publication_rel r \
             JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = {0}",
            quote_literal(name)
        ))
        .map_err(step("read the publication's tables"))?;
    // (pubviaroot as text: `true`/`false`.)
    let via_root = conn
        .query(&format!(
            "SELECT pubviaroot::text FROM pg_publication WHERE pubname = {}",
            quote_literal(name)
        ))
        .map_err(step("look up the publication"))?
        .first()
        .map(|r| r.first().cloned().flatten().as_deref() == Some("true"));
    let exists = via_root.is_some();
    // A partitioned table's changes come under its leaves' names unless the publication
    // publishes them as the root's (PostgreSQL 13 and later; earlier ones cannot publish a
    // partitioned table at all): CDC knows the table by the name configured, and stopped at
    // the first change with "table public.p1 is not configured for CDC".
    let partitioned = partitioned(conn, tables)?;
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| {
            !published
                .iter()
                .any(|r| r.first().cloned().flatten().as_deref() == Some(&t.name))
        })
        .map(|t| qualified(&t.name))
        .collect();
    if !exists {
        conn.query(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE {}{}",
            missing.join(", "),
            match partitioned.is_empty() {
                false => " WITH (publish_via_partition_root = true)",
                true => "",
            }
        ))
        .map_err(step(format!("create publication {name}")))?;
        return Ok(());
    }
    if let Some(table) = partitioned.first().filter(|_| via_root == Some(false)) {
        // The option changes what every consumer of the publication receives (PostgreSQL
        // warns of rows lost or duplicated at subscribers), and pgoutput reads it as of
        // each change: never switched without being asked.
        if !cfg.publication_set_via_root {
            return Err(SetupError::PublicationNotViaRoot {
                publication: name.to_string(),
                table: table.clone(),
            });
        }
        tracing::warn!(publication = %name, "a partitioned table is published: setting publish_via_partition_root on the publication, so that its changes come under its own name, not its partitions'");
        conn.query(&format!(
            "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
        ))
        .map_err(step(format!(
            "set publish_via_partition_root on publication {name}"
        )))?;
    }
    if !missing.is_empty() {
        conn.query(&format!(
            "ALTER PUBLICATION {publication} ADD TABLE {}",
            missing.join(", ")
        ))
        .map_err(step(format!(
            "add {} to publication {name}",
            missing.join(", "),
        )))?;
    }
    Ok(())
}

/// The slot's row in the checkpoint table.
struct Stored {
    exists: bool,
    lsn: Option<Lsn>,
    /// A flush boundary past `lsn`.
    pending: Option<Lsn>,
    incarnation: Option<String>,
}

/// Creates the checkpoint table if needed and reads the slot's checkpoint, pending boundary
/// and incarnation.
fn read_checkpoint(conn: &mut PgConn, cfg: &CdcConfig) -> Result<Stored, SetupError> {
    conn.query(&Checkpoints::create_sql(&cfg.checkpoint_table))
        .map_err(step(format!(
            "create checkpoint table {}",
            cfg.checkpoint_table
        )))?;
    let stored = conn
        .query(&format!(
            "SELECT lsn::text, pending::text, incarnation FROM {} WHERE slot = {}",
            qualified(&cfg.checkpoint_table),
            quote_literal(&cfg.slot)
        ))
        .map_err(step("read the checkpoint"))?;
    let field = |i: usize| {
        stored
            .first()
            .and_then(|r| r.get(i).cloned().flatten())
            .and_then(|t| Lsn::parse(&t))
    };
    let checkpoint = field(0);
    let pending = field(1).filter(|p| Some(*p) > checkpoint);
    Ok(Stored {
        exists: !stored.is_empty(),
        lsn: checkpoint,
        pending,
        incarnation: stored
            .first()
            .and_then(|r| r.get(2).cloned().flatten())
            .filter(|i| !i.is_empty()),
    })
}

/// Creates the slot on a replication connection. No snapshot is exported: the initial
/// snapshot reads its chunks between watermarks instead (see `snapshot`), which needs none.
fn create_slot(cfg: &CdcConfig, url: &PgUrl, timeout: Duration) -> Result<(), SetupError> {
    let mut repl = PgConn::connect(url, true, timeout).map_err(SetupError::Connect)?;
    repl.query(&format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')",
        quote_ident(&cfg.slot)
    ))
    .map_err(step(format!("create replication slot {}", cfg.slot)))?;
    tracing::info!(slot = %cfg.slot, "created replication slot");
    Ok(())
}
