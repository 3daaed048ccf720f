//! Schema cache: what each relation id looks like, as the latest Relation message said, plus
//! the primary key found during setup. Keyed by relation id; a new Relation message for a known
//! id (an added or dropped column) replaces the entry and bumps its generation so the pipeline
//! never mixes two column lists in one batch.

use std::collections::HashMap;

use super::pgoutput::Relation;

/// How a column's text value is written in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKind {
    /// Integer and floating point types: the text is a JSON number (when it is one).
    Number,
    /// `boolean`: `t`/`f` become `true`/`false`.
    Bool,
    /// Everything else is a JSON string.
    String,
}

impl JsonKind {
    pub fn of(type_oid: u32) -> JsonKind {
        match type_oid {
            // int2, int4, int8, oid, float4, float8, numeric
            21 | 23 | 20 | 26 | 700 | 701 | 1700 => JsonKind::Number,
            16 => JsonKind::Bool,
            _ => JsonKind::String,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod` (`varchar(n)` length, `numeric(p, s)`); -1 when unknown or unbounded.
    pub type_mod: i32,
    pub kind: JsonKind,
    /// `"name":` already JSON-escaped, written before each value.
    pub json_key: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct TableSchema {
    pub oid: u32,
    /// `schema.table` as in PostgreSQL.
    pub source_name: String,
    /// Table name in StarRocks.
    pub target_name: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the primary key.
    pub key: Vec<usize>,
    /// Changes whenever the column list changes.
    pub generation: u64,
}

/// What a Relation message did to the cache.
#[derive(Debug)]
pub enum Applied {
    /// The same columns as before.
    Unchanged,
    /// The first Relation for this relation id in this run.
    New,
    /// The column list changed; these were the columns before.
    Changed(Vec<Column>),
    /// A table not configured for CDC: nothing is kept but its name, so that a change of it
    /// stops the stream ([`SchemaError::NotConfigured`]). pgoutput announces a partition
    /// before its changes even when the publication publishes them as its root's
    /// (`publish_via_partition_root`): the root's Relation comes first, then the partition's.
    Unconfigured,
}

/// Primary key columns per `schema.table`, from setup.
pub type KeyColumns = HashMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {table} is not configured for CDC but arrived in the publication")]
    NotConfigured { table: String },
    #[error(
        "a change of {partition}, a partition of {root}, arrived under the partition's own name: \
         it was made before the publication had publish_via_partition_root (pgoutput reads a publication's \
         settings as of each change), so this slot's stream cannot be loaded into {root}. \
         Recreate the slot and take a new snapshot (see \"Partitioned tables\" in docs/cdc.md)"
    )]
    PartitionNotViaRoot { partition: String, root: String },
    #[error("table {table} has no primary key column {column} in the replication stream")]
    KeyMissing { table: String, column: String },
    #[error("change for relation id {oid} arrived before its Relation message")]
    UnknownRelation { oid: u32 },
}

impl Column {
    pub fn new(name: &str, type_oid: u32) -> Column {
        let mut json_key = Vec::with_capacity(name.len() + 3);
        json_string(&mut json_key, name);
        json_key.push(b':');
        Column {
            name: name.to_string(),
            type_oid,
            type_mod: -1,
            kind: JsonKind::of(type_oid),
            json_key,
        }
    }
}

#[derive(Default)]
pub struct SchemaCache {
    tables: HashMap<u32, TableSchema>,
    /// Relations announced that are not configured, by id: their names.
    unconfigured: HashMap<u32, String>,
    keys: KeyColumns,
    /// Partitions of the configured partitioned tables (`schema.table`) and their roots.
    partitions: HashMap<String, String>,
    generation: u64,
}

impl SchemaCache {
    pub fn new(keys: KeyColumns) -> Self {
        SchemaCache {
            tables: HashMap::new(),
            unconfigured: HashMap::new(),
            keys,
            partitions: HashMap::new(),
            generation: 0,
        }
    }

    /// The partitions setup found of the partitioned tables configured, with their roots.
    pub fn set_partitions(&mut self, partitions: HashMap<String, String>) {
        self.partitions = partitions;
    }

    /// Whether `namespace.name` is a configured table.
    pub fn configured(&self, namespace: &str, name: &str) -> bool {
        self.keys.contains_key(&format!("{namespace}.{name}"))
    }

    pub fn get(&self, oid: u32) -> Result<&TableSchema, SchemaError> {
        match self.tables.get(&oid) {
            Some(t) => Ok(t),
            None => Err(match self.unconfigured.get(&oid) {
                Some(table) => match self.partitions.get(table) {
                    Some(root) => SchemaError::PartitionNotViaRoot {
                        partition: table.clone(),
                        root: root.clone(),
                    },
                    None => SchemaError::NotConfigured {
                        table: table.clone(),
                    },
                },
                None => SchemaError::UnknownRelation { oid },
            }),
        }
    }

    /// Applies a Relation message; a changed column list makes the caller flush batches of
    /// the old shape first.
    pub fn apply(&mut self, rel: &Relation<'_>) -> Result<Applied, SchemaError> {
        let source_name = format!("{}.{}", rel.namespace, rel.name);
        let Some(key_names) = self.keys.get(&source_name) else {
            self.tables.remove(&rel.oid);
            self.unconfigured.insert(rel.oid, source_name);
            return Ok(Applied::Unconfigured);
        };
        let columns: Vec<Column> = rel
            .columns()
            .map(|c| Column {
                type_mod: c.type_mod,
                ..Column::new(c.name, c.type_oid)
            })
            .collect();
        let key = key_names
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| &c.name == k)
                    .ok_or_else(|| SchemaError::KeyMissing {
                        table: source_name.clone(),
                        column: k.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let applied = match self.tables.get(&rel.oid) {
            Some(old) => {
                let same = old.columns.len() == columns.len()
                    && old.columns.iter().zip(&columns).all(|(a, b)| {
                        a.name == b.name && a.type_oid == b.type_oid && a.type_mod == b.type_mod
                    });
                if same {
                    return Ok(Applied::Unchanged);
                }
                Applied::Changed(old.columns.clone())
            }
            None => Applied::New,
        };
        self.generation += 1;
        let target_name = rel.name.to_string();
        self.tables.insert(
            rel.oid,
            TableSchema {
                oid: rel.oid,
                source_name,
                target_name,
                columns,
                key,
                generation: self.generation,
            },
        );
        Ok(applied)
    }
}

/// Appends `text` as a JSON string (quoted, escaped) using sonic-rs's SIMD escaper.
#[inline]
pub fn json_string(out: &mut Vec<u8>, text: &str) {
    use sonic_rs::format::{CompactFormatter, Formatter};
    // Writing into a Vec cannot fail.
    let _ = CompactFormatter.write_string_fast(out, text, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json_strings() {
        let mut out = Vec::new();
        json_string(&mut out, "a\"b\\c\n\u{1}é");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "\"a\\\"b\\\\c\\n\\u0001é\""
        );
    }
}
