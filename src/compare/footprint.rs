//! What a statement touches, as the ordered shadow dispatch needs it: the relations it names
//! (one lane each), whether it writes them, and whether its result can differ between two
//! servers by nature (volatile functions, server-local values, LIMIT without ORDER BY).
//!
//! A byte scan of the statement text, not a parser: it may name a relation that is none (a
//! CTE, a function in FROM), which only costs parallelism, and what it cannot read (DDL,
//! CALL, DO, unknown statements) touches everything ("wild"). It never looks inside
//! functions: a function that writes a table the statement does not name is a known limit.

use crate::sql;

/// The relations one statement (or one sync point, or a transaction so far) touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Hashes of the relation names (unqualified, folded to lower case unless quoted), sorted
    /// and without duplicates.
    pub lanes: Vec<u64>,
    /// It writes (or locks rows of) what it touches.
    pub write: bool,
    /// It may touch any relation.
    pub wild: bool,
    /// It ends a transaction that wrote (COMMIT, ROLLBACK, END): it waits only for earlier
    /// reads of what it touches. Earlier writes there that conflicted at the row level had
    /// to wait for its row locks on the primary, so they came after it; when the completion
    /// order says otherwise, pgprism saw the two answers in the other order (microseconds
    /// apart), and waiting for such a write would wait for it to get the lock this
    /// transaction holds on the shadow: a cycle only the bound would break.
    pub ends: bool,
}

impl Footprint {
    /// Every relation, written.
    pub fn wild() -> Footprint {
        Footprint {
            lanes: Vec::new(),
            write: true,
            wild: true,
            ends: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty() && !self.wild
    }

    /// Adds `other`'s relations (a write to any of them makes the union a write).
    pub fn join(&mut self, other: &Footprint) {
        self.write |= other.write;
        self.wild |= other.wild;
        if !other.lanes.is_empty() {
            self.lanes.extend_from_slice(&other.lanes);
            self.lanes.sort_unstable();
            self.lanes.dedup();
        }
    }

    /// Whether a sync point of this footprint waits for an earlier conflicting one that
    /// writes (`write`) or only reads.
    pub fn waits_for(&self, write: bool) -> bool {
        if self.ends {
            !write
        } else {
            write || self.write
        }
    }

    /// Only the relations `self` writes (empty when it only reads).
    pub fn written(&self) -> Footprint {
        if self.write {
            self.clone()
        } else {
            Footprint::default()
        }
    }

    /// Whether the two may see each other's effects: they share a relation (or one is wild)
    /// and at least one writes.
    pub fn conflicts(&self, other: &Footprint) -> bool {
        if !(self.write || other.write) {
            return false;
        }
        if self.wild || other.wild {
            return !(self.is_empty() || other.is_empty());
        }
        // Both sorted: a merge walk.
        let (mut i, mut j) = (0, 0);
        while i < self.lanes.len() && j < other.lanes.len() {
            match self.lanes[i].cmp(&other.lanes[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

/// What the scan found in one statement.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub footprint: Footprint,
    /// Its result may differ between two servers whatever the order: why, for the report.
    pub nondeterministic: Option<&'static str>,
}

/// Functions whose result depends on the moment, chance or the server (called with `(`).
const VOLATILE_CALLS: &[(&str, &str)] = &[
    ("now", "now()"),
    ("clock_timestamp", "clock_timestamp()"),
    ("statement_timestamp", "statement_timestamp()"),
    ("transaction_timestamp", "transaction_timestamp()"),
    ("timeofday", "timeofday()"),
    ("random", "random()"),
    ("random_normal", "random_normal()"),
    ("gen_random_uuid", "gen_random_uuid()"),
    ("uuid_generate_v1", "uuid_generate_v1()"),
    ("uuid_generate_v4", "uuid_generate_v4()"),
    ("nextval", "a sequence (nextval)"),
    ("currval", "a sequence (currval)"),
    ("lastval", "a sequence (lastval)"),
    ("setval", "a sequence (setval)"),
    ("version", "version()"),
    ("pg_backend_pid", "a backend pid"),
    ("pg_terminate_backend", "a backend pid"),
    ("pg_cancel_backend", "a backend pid"),
    ("pg_blocking_pids", "backend pids"),
    ("txid_current", "a transaction id"),
    ("txid_current_if_assigned", "a transaction id"),
    ("pg_current_xact_id", "a transaction id"),
    ("pg_current_xact_id_if_assigned", "a transaction id"),
    ("txid_current_snapshot", "a snapshot"),
    ("pg_current_snapshot", "a snapshot"),
    ("pg_current_wal_lsn", "a WAL position"),
    ("pg_current_wal_insert_lsn", "a WAL position"),
    ("pg_current_wal_flush_lsn", "a WAL position"),
    ("inet_server_port", "the server's address"),
    ("inet_server_addr", "the server's address"),
    ("inet_client_port", "the client's address"),
    ("inet_client_addr", "the client's address"),
    ("pg_postmaster_start_time", "the server's start time"),
    ("pg_conf_load_time", "the server's configuration time"),
    ("pg_relation_filenode", "a file node"),
    ("pg_relation_filepath", "a file path"),
    ("pg_relation_size", "a relation size"),
    ("pg_total_relation_size", "a relation size"),
    ("pg_table_size", "a relation size"),
    ("pg_indexes_size", "a relation size"),
    ("pg_database_size", "a database size"),
];

/// Words that name something only one server has (its clock, its catalog's OIDs, its
/// backends), whatever precedes them.
const LOCAL_WORDS: &[(&str, &str)] = &[
    ("current_timestamp", "current_timestamp"),
    ("localtimestamp", "localtimestamp"),
    ("current_time", "current_time"),
    ("localtime", "localtime"),
    ("pg_stat_activity", "pg_stat_activity"),
    ("pg_locks", "pg_locks"),
    ("pg_prepared_statements", "pg_prepared_statements"),
    ("pg_prepared_xacts", "pg_prepared_xacts"),
    ("pg_stat_statements", "pg_stat_statements"),
    ("pg_cursors", "pg_cursors"),
    ("regclass", "an OID (regclass)"),
    ("regtype", "an OID (regtype)"),
    ("regproc", "an OID (regproc)"),
    ("regprocedure", "an OID (regprocedure)"),
    ("regnamespace", "an OID (regnamespace)"),
    ("oid", "an OID"),
    ("tableoid", "an OID (tableoid)"),
    ("ctid", "a tuple position (ctid)"),
    ("xmin", "a transaction id (xmin)"),
    ("xmax", "a transaction id (xmax)"),
    ("tablesample", "TABLESAMPLE"),
];

/// One token of the scan.
#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted word, as written.
    Word(&'a [u8]),
    /// A quoted identifier, without its quotes.
    Quoted(&'a [u8]),
    Punct(u8),
}

/// The tokens of `sql`, stepping over literals, comments and dollar quotes.
fn tokens(sql: &[u8]) -> impl Iterator<Item = Token<'_>> {
    let mut i = 0usize;
    std::iter::from_fn(move || {
        while i < sql.len() {
            let c = sql[i];
            match c {
                b'\'' => i = crate::sql::skip_quoted(sql, i),
                b'"' => {
                    let end = crate::sql::skip_quoted(sql, i);
                    let inner = &sql[i + 1..end.saturating_sub(1).max(i + 1)];
                    i = end;
                    return Some(Token::Quoted(inner));
                }
                b'-' if sql.get(i + 1) == Some(&b'-') => {
                    i = memchr::memchr(b'\n', &sql[i..]).map_or(sql.len(), |n| i + n + 1);
                }
                b'/' if sql.get(i + 1) == Some(&b'*') => i = crate::sql::skip_block_comment(sql, i),
                b'$' => match dollar_tag(sql, i) {
                    Some(tag_end) => {
                        let tag = &sql[i..tag_end];
                        i = memchr::memmem::find(&sql[tag_end..], tag)
                            .map_or(sql.len(), |n| tag_end + n + tag.len());
                    }
                    None => i += 1,
                },
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let start = i;
                    while i < sql.len()
                        && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_' || sql[i] >= 0x80)
                    {
                        i += 1;
                    }
                    return Some(Token::Word(&sql[start..i]));
                }
                b'0'..=b'9' => {
                    while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.') {
                        i += 1;
                    }
                }
                c if c.is_ascii_whitespace() => i += 1,
                c => {
                    i += 1;
                    return Some(Token::Punct(c));
                }
            }
        }
        None
    })
}

/// The end of a dollar-quote opening tag (`$$` or `$tag$`) at `i`, if one is there.
fn dollar_tag(sql: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < sql.len() && (sql[j].is_ascii_alphanumeric() || sql[j] == b'_') {
        if j == i + 1 && sql[j].is_ascii_digit() {
            return None; // `$1`: a parameter
        }
        j += 1;
    }
    (sql.get(j) == Some(&b'$')).then_some(j + 1)
}

fn lane(name: &[u8], quoted: bool) -> u64 {
    // FNV-1a over the folded name: stable, cheap, and a collision only costs parallelism.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        let b = if quoted { b } else { b.to_ascii_lowercase() };
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.eq_ignore_ascii_case(word.as_bytes()))
}

/// Words after which a relation name follows.
const BEFORE_RELATION: &[&str] = &["from", "join", "update", "into", "table", "truncate"];
/// Words that may sit between such a word and the name.
const NOT_NAMES: &[&str] = &["only", "lateral", "if", "exists", "not"];
/// Words that end a FROM list item's alias position (never an alias).
const CLAUSES: &[&str] = &[
    "where",
    "join",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "on",
    "using",
    "group",
    "order",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "except",
    "intersect",
    "window",
    "having",
    "set",
    "values",
    "select",
    "returning",
    "default",
    "as",
];

/// Scans one statement of class `class`.
pub fn scan(text: &str, class: sql::Class) -> Scan {
    let sql = text.as_bytes();
    let all: Vec<Token> = tokens(sql).collect();
    let mut lanes = Vec::new();
    let mut nondeterministic = None;
    let mut locks_rows = false;
    let mut limit = false;
    for (i, token) in all.iter().enumerate() {
        let Token::Word(w) = token else {
            continue;
        };
        let next_is_call = matches!(all.get(i + 1), Some(Token::Punct(b'(')));
        let local = LOCAL_WORDS
            .iter()
            .find(|(name, _)| w.eq_ignore_ascii_case(name.as_bytes()));
        let call = VOLATILE_CALLS
            .iter()
            .find(|(name, _)| next_is_call && w.eq_ignore_ascii_case(name.as_bytes()));
        if let Some((_, why)) = call.or(local) {
            nondeterministic = Some(*why);
            break;
        }
    }
    let mut i = 0;
    while i < all.len() {
        let token = &all[i];
        if let Token::Word(w) = token {
            if w.eq_ignore_ascii_case(b"limit") || w.eq_ignore_ascii_case(b"fetch") {
                limit = true;
            }
            if w.eq_ignore_ascii_case(b"for")
                && all.get(i + 1).is_some_and(|t| {
                    ["update", "share", "no", "key"]
                        .iter()
                        .any(|k| is_word(t, k))
                })
            {
                locks_rows = true;
            }
            if BEFORE_RELATION
                .iter()
                .any(|b| w.eq_ignore_ascii_case(b.as_bytes()))
            {
                i = relation_list(&all, i + 1, &mut lanes);
                continue;
            }
        }
        i += 1;
    }
    if nondeterministic.is_none() && limit && !sql::has_top_level_order_by(sql) {
        nondeterministic = Some("LIMIT without ORDER BY");
    }
    lanes.sort_unstable();
    lanes.dedup();
    let footprint = match class {
        sql::Class::Select => Footprint {
            lanes,
            write: locks_rows,
            wild: false,
            ends: false,
        },
        sql::Class::Dml => {
            let first = all.first();
            if first.is_some_and(|t| is_word(t, "call") || is_word(t, "do")) {
                Footprint::wild()
            } else {
                Footprint {
                    lanes,
                    write: true,
                    wild: false,
                    ends: false,
                }
            }
        }
        sql::Class::Session | sql::Class::Transaction | sql::Class::Empty => Footprint::default(),
        sql::Class::Ddl | sql::Class::Other => Footprint::wild(),
    };
    Scan {
        footprint,
        nondeterministic,
    }
}

/// Reads relation names from `at` on (a comma list, each with an optional alias); returns
/// where the scan goes on.
fn relation_list(all: &[Token], mut at: usize, lanes: &mut Vec<u64>) -> usize {
    loop {
        while all
            .get(at)
            .is_some_and(|t| NOT_NAMES.iter().any(|w| is_word(t, w)))
        {
            at += 1;
        }
        let Some((name, quoted, end)) = qualified_name(all, at) else {
            return at;
        };
        if !quoted
            && CLAUSES
                .iter()
                .any(|w| name.eq_ignore_ascii_case(w.as_bytes()))
        {
            return at;
        }
        lanes.push(lane(name, quoted));
        at = end;
        // An alias, with or without AS.
        if all.get(at).is_some_and(|t| is_word(t, "as")) {
            at += 1;
        }
        match all.get(at) {
            Some(Token::Word(w))
                if !CLAUSES.iter().any(|c| w.eq_ignore_ascii_case(c.as_bytes())) =>
            {
                at += 1
            }
            Some(Token::Quoted(_)) => at += 1,
            _ => {}
        }
        if matches!(all.get(at), Some(Token::Punct(b','))) {
            at += 1;
            continue;
        }
        return at;
    }
}

/// A possibly schema-qualified name at `at`: its last part, whether quoted, and the index
/// after it.
fn qualified_name<'a>(all: &[Token<'a>], mut at: usize) -> Option<(&'a [u8], bool, usize)> {
    let mut last = None;
    loop {
        let part = match all.get(at)? {
            Token::Word(w) => (*w, false),
            Token::Quoted(q) => (*q, true),
            _ => return last.map(|(n, q)| (n, q, at)),
        };
        last = Some(part);
        at += 1;
        if matches!(all.get(at), Some(Token::Punct(b'.'))) {
            at += 1;
            continue;
        }
        return last.map(|(n, q)| (n, q, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(text: &str) -> Footprint {
        scan(text, sql::classify(text.as_bytes())).footprint
    }

    #[test]
    fn relations_and_writes_are_read_from_the_text() {
        let update = fp("UPDATE hot SET v = v + 1 WHERE id = 3");
        let select = fp("SELECT v FROM hot WHERE id = 3");
        let other = fp("SELECT v FROM public.cold c WHERE id = 3");
        assert!(update.write && !select.write);
        assert_eq!(update.lanes, select.lanes);
        assert!(update.conflicts(&select));
        assert!(!select.conflicts(&select));
        assert!(!other.conflicts(&update));
        let join = fp("SELECT * FROM a x, \"B\" AS y JOIN c ON true WHERE 1 = 1");
        assert_eq!(join.lanes.len(), 3);
        assert!(fp("SELECT 1 FROM hot FOR UPDATE").write);
        assert!(fp("INSERT INTO pgbench_history (tid) VALUES (1)").write);
        assert!(fp("CREATE TABLE t (a int)").wild);
        assert!(fp("CALL p()").wild);
        assert!(fp("BEGIN").is_empty() && fp("SET x = 1").is_empty());
        // A name in a literal or a comment is no relation.
        assert!(fp("SELECT 'from hot' -- from hot\n").is_empty());
    }

    #[test]
    fn nondeterministic_statements_are_named() {
        let why = |t: &str| scan(t, sql::classify(t.as_bytes())).nondeterministic;
        assert_eq!(why("SELECT now()"), Some("now()"));
        assert_eq!(
            why("select pid from pg_stat_activity"),
            Some("pg_stat_activity")
        );
        assert_eq!(why("SELECT 't1'::regclass::oid"), Some("an OID (regclass)"));
        assert_eq!(
            why("SELECT * FROM t LIMIT 1"),
            Some("LIMIT without ORDER BY")
        );
        assert_eq!(why("SELECT * FROM t ORDER BY id LIMIT 1"), None);
        assert_eq!(why("SELECT v FROM hot WHERE id = 1"), None);
        assert_eq!(why("SELECT 'now()'"), None);
        // A column that happens to be called like a function is no call.
        assert_eq!(why("SELECT random FROM t"), None);
    }
}
