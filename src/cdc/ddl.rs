//! Schema changes that follow the source: PostgreSQL column types mapped to StarRocks types,
//! what a new `Relation` message changes (added, dropped and widened columns, or a change
//! StarRocks cannot follow), and the StarRocks DDL for it (`CREATE TABLE` for a Primary Key
//! table, `ALTER TABLE ... ADD / DROP / MODIFY COLUMN`).
//!
//! Pure functions, no I/O: the loader runs the statements over the FE query port. This module
//! must never call a narrowing or reinterpreting type change compatible: the stream stops
//! with the table, the column and both types named instead of loading data StarRocks would
//! truncate or misread.

use super::schema::Column;

/// PostgreSQL type OIDs this module knows by name.
mod oid {
    pub(super) const BOOL: u32 = 16;
    pub(super) const INT8: u32 = 20;
    pub(super) const INT2: u32 = 21;
    pub(super) const INT4: u32 = 23;
    pub(super) const TEXT: u32 = 25;
    pub(super) const OID: u32 = 26;
    pub(super) const JSON: u32 = 114;
    pub(super) const FLOAT4: u32 = 700;
    pub(super) const FLOAT8: u32 = 701;
    pub(super) const BPCHAR: u32 = 1042;
    pub(super) const VARCHAR: u32 = 1043;
    pub(super) const DATE: u32 = 1082;
    pub(super) const TIMESTAMP: u32 = 1114;
    pub(super) const TIMESTAMPTZ: u32 = 1184;
    pub(super) const NUMERIC: u32 = 1700;
    pub(super) const UUID: u32 = 2950;
    pub(super) const JSONB: u32 = 3802;
}

/// StarRocks `VARCHAR` lengths are bytes; PostgreSQL's are characters (up to 4 UTF-8 bytes).
const VARCHAR_BYTES_MAX: i64 = 1_048_576;
/// StarRocks `DECIMAL` precision limit.
const DECIMAL_PRECISION_MAX: i32 = 38;

/// A PostgreSQL column type as pgoutput and `pg_attribute` give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgType {
    pub oid: u32,
    pub typmod: i32,
}

impl PgType {
    /// `varchar(n)` / `char(n)` length, when bounded.
    fn char_len(self) -> Option<i64> {
        (self.typmod >= 4).then(|| i64::from(self.typmod - 4))
    }

    /// `numeric(p, s)`, when bounded.
    fn numeric(self) -> Option<(i32, i32)> {
        (self.typmod >= 4).then(|| {
            let m = self.typmod - 4;
            ((m >> 16) & 0xffff, m & 0xffff)
        })
    }

    /// The type as PostgreSQL writes it (for error messages).
    pub fn name(self) -> String {
        match self.oid {
            oid::BOOL => "boolean".into(),
            oid::INT2 => "smallint".into(),
            oid::INT4 => "integer".into(),
            oid::INT8 => "bigint".into(),
            oid::OID => "oid".into(),
            oid::FLOAT4 => "real".into(),
            oid::FLOAT8 => "double precision".into(),
            oid::TEXT => "text".into(),
            oid::JSON => "json".into(),
            oid::JSONB => "jsonb".into(),
            oid::UUID => "uuid".into(),
            oid::DATE => "date".into(),
            oid::TIMESTAMP => "timestamp".into(),
            oid::TIMESTAMPTZ => "timestamptz".into(),
            oid::VARCHAR | oid::BPCHAR => {
                let base = if self.oid == oid::VARCHAR {
                    "varchar"
                } else {
                    "char"
                };
                match self.char_len() {
                    Some(n) => format!("{base}({n})"),
                    None => base.into(),
                }
            }
            oid::NUMERIC => match self.numeric() {
                Some((p, s)) => format!("numeric({p},{s})"),
                None => "numeric".into(),
            },
            other => format!("type {other}"),
        }
    }

    /// The StarRocks column type that holds every value of this type as pgoutput writes it.
    pub fn starrocks(self) -> String {
        match self.oid {
            oid::BOOL => "BOOLEAN".into(),
            oid::INT2 => "SMALLINT".into(),
            oid::INT4 => "INT".into(),
            oid::INT8 | oid::OID => "BIGINT".into(),
            oid::FLOAT4 => "FLOAT".into(),
            oid::FLOAT8 => "DOUBLE".into(),
            oid::DATE => "DATE".into(),
            oid::TIMESTAMP | oid::TIMESTAMPTZ => "DATETIME".into(),
            oid::JSON | oid::JSONB => "JSON".into(),
            oid::UUID => "VARCHAR(36)".into(),
            oid::VARCHAR | oid::BPCHAR => match self.char_len() {
                Some(n) => format!("VARCHAR({})", (n * 4).min(VARCHAR_BYTES_MAX)),
                None => "STRING".into(),
            },
            // Unbounded numerics (and precisions StarRocks lacks) stay exact as text rather
            // than being rounded into a fixed scale.
            oid::NUMERIC => match self.numeric() {
                Some((p, s)) if p <= DECIMAL_PRECISION_MAX => format!("DECIMAL({p},{s})"),
                _ => "STRING".into(),
            },
            _ => "STRING".into(),
        }
    }

    /// Whether every value of `self` is a value of `to` and StarRocks can widen the column
    /// in place (`ALTER TABLE ... MODIFY COLUMN`).
    fn widens_to(self, to: PgType) -> bool {
        use oid::*;
        match (self.oid, to.oid) {
            (INT2, INT4 | INT8) | (INT4, INT8) | (FLOAT4, FLOAT8) => true,
            (VARCHAR, TEXT) => true,
            (VARCHAR, VARCHAR) => match (self.char_len(), to.char_len()) {
                (Some(a), Some(b)) => b >= a,
                (_, None) => true,
                (None, Some(_)) => false,
            },
            (NUMERIC, NUMERIC) => match (self.numeric(), to.numeric()) {
                // More integer digits, same scale: DECIMAL(p, s) → DECIMAL(p', s).
                (Some((p, s)), Some((p2, s2))) => s == s2 && p2 >= p,
                _ => false,
            },
            _ => false,
        }
    }
}

/// What a new Relation message asks of the StarRocks table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaChange {
    /// `schema.table` in PostgreSQL.
    pub source: String,
    /// The StarRocks table.
    pub table: String,
    /// (name, StarRocks type) of columns to add when StarRocks lacks them.
    pub added: Vec<(String, String)>,
    /// Columns PostgreSQL no longer has.
    pub dropped: Vec<String>,
    /// (name, StarRocks type) of columns whose type was widened.
    pub widened: Vec<(String, String)>,
    /// Type changes StarRocks cannot follow by itself: fine only once the StarRocks column
    /// has the new type (changed by hand), else the stream stops here.
    pub retyped: Vec<Retyped>,
    /// (old, new) name of a renamed column: fine only once StarRocks has the new name.
    pub renamed: Option<(String, String)>,
}

/// A column whose type changed in a way StarRocks cannot follow in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retyped {
    pub column: String,
    /// PostgreSQL's old and new type.
    pub from: String,
    pub to: String,
    /// The StarRocks type the new one maps to.
    pub starrocks: String,
}

impl SchemaChange {
    /// Splits off the dropped columns: the loader drops them once the flush cycle has
    /// committed (see `cdc::load_loop`).
    pub fn split_drops(mut self) -> (SchemaChange, Option<SchemaChange>) {
        if self.dropped.is_empty() {
            return (self, None);
        }
        let drops = SchemaChange {
            source: self.source.clone(),
            table: self.table.clone(),
            dropped: std::mem::take(&mut self.dropped),
            ..SchemaChange::default()
        };
        (self, Some(drops))
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.dropped.is_empty()
            && self.widened.is_empty()
            && self.retyped.is_empty()
            && self.renamed.is_none()
    }

    /// The first part of the change StarRocks cannot follow, given its columns (name,
    /// type): a retyped column that StarRocks does not have with the new type yet, a rename
    /// it has not been given.
    pub fn blocker(&self, existing: &[(String, String)]) -> Option<Incompatible> {
        let has = |name: &str| existing.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
        for r in &self.retyped {
            if !has(&r.column).is_some_and(|(_, cur)| same_type(cur, &r.starrocks)) {
                return Some(Incompatible::Type {
                    table: self.source.clone(),
                    column: r.column.clone(),
                    from: r.from.clone(),
                    to: r.to.clone(),
                    starrocks: r.starrocks.clone(),
                });
            }
        }
        if let Some((from, to)) = &self.renamed
            && (has(to).is_none() || has(from).is_some())
        {
            return Some(Incompatible::Renamed {
                table: self.source.clone(),
                from: from.clone(),
                to: to.clone(),
            });
        }
        None
    }
}

/// A change StarRocks cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error(
        "column {column} of {table} changed type from {from} to {to}, which StarRocks cannot follow in place without losing or misreading data; make the StarRocks column {starrocks} by hand, then restart (nothing from the change on was loaded)"
    )]
    Type {
        table: String,
        column: String,
        from: String,
        to: String,
        starrocks: String,
    },
    #[error(
        "column {from} of {table} was renamed to {to}; StarRocks would lose the column's data if it were dropped and added, so rename it there by hand (ALTER TABLE ... RENAME COLUMN), then restart (nothing from the change on was loaded)"
    )]
    Renamed {
        table: String,
        from: String,
        to: String,
    },
    #[error(
        "{table} changed ({what}) and cdc.schema-changes = \"fail\"; change the StarRocks table by hand, then restart (nothing after the change was loaded)"
    )]
    Refused { table: String, what: String },
}

/// What changed from `old` to `new` columns of one table.
pub fn diff(source: &str, table: &str, old: &[Column], new: &[Column]) -> SchemaChange {
    let pg = |c: &Column| PgType {
        oid: c.type_oid,
        typmod: c.type_mod,
    };
    let mut change = SchemaChange {
        source: source.to_string(),
        table: table.to_string(),
        ..SchemaChange::default()
    };
    for n in new {
        match old.iter().find(|o| o.name == n.name) {
            None => change.added.push((n.name.clone(), pg(n).starrocks())),
            Some(o) if pg(o) == pg(n) || pg(o).starrocks() == pg(n).starrocks() => {}
            Some(o) if pg(o).widens_to(pg(n)) => {
                change.widened.push((n.name.clone(), pg(n).starrocks()))
            }
            Some(o) => change.retyped.push(Retyped {
                column: n.name.clone(),
                from: pg(o).name(),
                to: pg(n).name(),
                starrocks: pg(n).starrocks(),
            }),
        }
    }
    change.dropped = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    // One column gone and one come in its place with the same type: a rename, which a
    // drop and an add would turn into a column of NULLs.
    if let ([gone], [(came, ty)]) = (&change.dropped[..], &change.added[..]) {
        let at = |cols: &[Column], name: &str| cols.iter().position(|c| c.name == name);
        let gone_ty = old
            .iter()
            .find(|c| &c.name == gone)
            .map(|c| pg(c).starrocks());
        if at(old, gone) == at(new, came) && gone_ty.as_ref() == Some(ty) {
            change.renamed = Some((gone.clone(), came.clone()));
            change.added.clear();
            change.dropped.clear();
        }
    }
    change
}

/// `` `name` `` with backquotes doubled.
pub fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The statements that make `db.table` follow `change` (`drop` only with
/// `schema-changes = "apply"`; a column that is already as wanted gets none, so a replay
/// after a crash repeats nothing). `existing` holds StarRocks' columns (name, type as
/// `information_schema.columns` gives it).
pub fn alter_statements(
    db: &str,
    change: &SchemaChange,
    existing: &[(String, String)],
    drop: bool,
) -> Vec<String> {
    let target = format!("{}.{}", quote(db), quote(&change.table));
    let has = |name: &str| existing.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = Vec::new();
    for (name, ty) in &change.added {
        if has(name).is_none() {
            out.push(format!(
                "ALTER TABLE {target} ADD COLUMN {} {ty} NULL",
                quote(name)
            ));
        }
    }
    for (name, ty) in &change.widened {
        if has(name).is_some_and(|(_, cur)| !same_type(cur, ty)) {
            out.push(format!(
                "ALTER TABLE {target} MODIFY COLUMN {} {ty} NULL",
                quote(name)
            ));
        }
    }
    if drop {
        for name in &change.dropped {
            if has(name).is_some() {
                out.push(format!("ALTER TABLE {target} DROP COLUMN {}", quote(name)));
            }
        }
    }
    out
}

/// Whether a type as `information_schema.columns` prints it (`int(11)`, `varchar(65533)`)
/// is the type pgprism would write.
fn same_type(current: &str, wanted: &str) -> bool {
    let norm = |t: &str| {
        let t = t.trim().to_ascii_lowercase();
        let t = match t.as_str() {
            "string" => "varchar(65533)".to_string(),
            _ => t,
        };
        // Integer display widths mean nothing: `int(11)` is `int`.
        match t.split_once('(') {
            Some((base, _)) if matches!(base, "tinyint" | "smallint" | "int" | "bigint") => {
                base.to_string()
            }
            _ => t,
        }
    };
    norm(current) == norm(wanted)
}

/// A source column for `CREATE TABLE`.
#[derive(Debug, Clone)]
pub struct SourceColumn {
    pub name: String,
    pub ty: PgType,
}

/// `CREATE TABLE IF NOT EXISTS` for a Primary Key table with the source's columns. StarRocks
/// wants the key columns first and NOT NULL; the others are nullable. With audit columns on,
/// they are added too.
pub fn create_table(
    db: &str,
    table: &str,
    columns: &[SourceColumn],
    key: &[String],
    audit_prefix: Option<&str>,
) -> String {
    let mut defs = Vec::with_capacity(columns.len() + 4);
    let keyed = key
        .iter()
        .filter_map(|k| columns.iter().find(|c| &c.name == k));
    for c in keyed {
        defs.push(format!("{} {} NOT NULL", quote(&c.name), c.ty.starrocks()));
    }
    for c in columns.iter().filter(|c| !key.contains(&c.name)) {
        defs.push(format!("{} {} NULL", quote(&c.name), c.ty.starrocks()));
    }
    if let Some(p) = audit_prefix {
        for (name, ty) in [
            ("op_type", "TINYINT"),
            ("is_deleted", "BOOLEAN"),
            ("synced_at", "DATETIME"),
            ("cdc_version", "BIGINT"),
        ] {
            defs.push(format!("{} {ty} NULL", quote(&format!("{p}{name}"))));
        }
    }
    let keys = key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} ({}) PRIMARY KEY ({keys}) DISTRIBUTED BY HASH ({keys})",
        quote(db),
        quote(table),
        defs.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, oid: u32, typmod: i32) -> Column {
        Column {
            type_mod: typmod,
            ..Column::new(name, oid)
        }
    }

    /// `varchar(n)` as a typmod.
    fn vc(n: i32) -> i32 {
        n + 4
    }

    #[test]
    fn added_dropped_and_widened_columns() {
        let old = [
            col("id", oid::INT4, -1),
            col("n", oid::INT4, -1),
            col("v", oid::VARCHAR, vc(10)),
            col("gone", oid::TEXT, -1),
        ];
        let new = [
            col("id", oid::INT4, -1),
            col("n", oid::INT8, -1),
            col("v", oid::TEXT, -1),
            col("extra", oid::NUMERIC, ((12 << 16) | 2) + 4),
        ];
        let c = diff("public.t", "t", &old, &new);
        assert!(c.retyped.is_empty() && c.renamed.is_none());
        assert_eq!(
            c.added,
            [("extra".to_string(), "DECIMAL(12,2)".to_string())]
        );
        assert_eq!(
            c.widened,
            [
                ("n".to_string(), "BIGINT".to_string()),
                ("v".to_string(), "STRING".to_string())
            ]
        );
        assert_eq!(c.dropped, ["gone"]);
        let sql = alter_statements(
            "db",
            &c,
            &[
                ("id".into(), "int(11)".into()),
                ("n".into(), "int(11)".into()),
                ("v".into(), "varchar(40)".into()),
                ("gone".into(), "varchar(65533)".into()),
            ],
            true,
        );
        assert_eq!(
            sql,
            [
                "ALTER TABLE `db`.`t` ADD COLUMN `extra` DECIMAL(12,2) NULL",
                "ALTER TABLE `db`.`t` MODIFY COLUMN `n` BIGINT NULL",
                "ALTER TABLE `db`.`t` MODIFY COLUMN `v` STRING NULL",
                "ALTER TABLE `db`.`t` DROP COLUMN `gone`",
            ]
        );
        // Done already (a replay): nothing to run.
        let done = alter_statements(
            "db",
            &c,
            &[
                ("n".into(), "bigint(20)".into()),
                ("v".into(), "varchar(65533)".into()),
                ("extra".into(), "decimal(12,2)".into()),
            ],
            true,
        );
        assert!(done.is_empty(), "{done:?}");
    }

    #[test]
    fn narrowing_reinterpreting_and_renaming_stop() {
        let cases = [
            (
                col("a", oid::INT8, -1),
                col("a", oid::INT4, -1),
                "bigint",
                "integer",
            ),
            (
                col("a", oid::INT4, -1),
                col("a", oid::TEXT, -1),
                "integer",
                "text",
            ),
            (
                col("a", oid::VARCHAR, vc(20)),
                col("a", oid::VARCHAR, vc(5)),
                "varchar(20)",
                "varchar(5)",
            ),
            (
                col("a", oid::TEXT, -1),
                col("a", oid::BOOL, -1),
                "text",
                "boolean",
            ),
        ];
        for (old, new, from, to) in cases {
            let c = diff("public.t", "t", &[old], &[new]);
            let sr = c.retyped[0].starrocks.clone();
            let err = c
                .blocker(&[("a".into(), "varchar(1)".into())])
                .expect("blocks");
            assert_eq!(
                err,
                Incompatible::Type {
                    table: "public.t".into(),
                    column: "a".into(),
                    from: from.into(),
                    to: to.into(),
                    starrocks: sr.clone(),
                }
            );
            let text = err.to_string();
            assert!(text.contains(from) && text.contains(to) && text.contains("public.t"));
            // Changed by hand in StarRocks: the stream goes on.
            assert_eq!(c.blocker(&[("a".into(), sr)]), None);
        }
        let c = diff(
            "public.t",
            "t",
            &[col("id", oid::INT4, -1), col("a", oid::TEXT, -1)],
            &[col("id", oid::INT4, -1), col("b", oid::TEXT, -1)],
        );
        let err = c.blocker(&[("a".into(), "varchar(65533)".into())]);
        assert!(matches!(err, Some(Incompatible::Renamed { .. })), "{err:?}");
        assert!(c.added.is_empty() && c.dropped.is_empty());
        assert_eq!(c.blocker(&[("b".into(), "varchar(65533)".into())]), None);
    }

    #[test]
    fn create_table_puts_the_key_first() {
        let sql = create_table(
            "db",
            "t",
            &[
                SourceColumn {
                    name: "v".into(),
                    ty: PgType {
                        oid: oid::VARCHAR,
                        typmod: vc(3),
                    },
                },
                SourceColumn {
                    name: "id".into(),
                    ty: PgType {
                        oid: oid::INT8,
                        typmod: -1,
                    },
                },
            ],
            &["id".into()],
            None,
        );
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS `db`.`t` (`id` BIGINT NOT NULL, `v` VARCHAR(12) NULL) PRIMARY KEY (`id`) DISTRIBUTED BY HASH (`id`)"
        );
    }
}
