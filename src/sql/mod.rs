//! Statement classification and fingerprinting by byte scanning: no parser, no allocation on
//! the classification path. It decides what a mirror receives (DDL, DML, SELECT, transaction
//! control, session settings) and groups statements whose literals differ into one
//! fingerprint. It must never fail: unknown text is classified `Other`.

/// What a statement does, as far as replay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// SELECT, VALUES, TABLE, SHOW, EXPLAIN without ANALYZE: reads only.
    Select,
    /// INSERT, UPDATE, DELETE, MERGE, COPY FROM, TRUNCATE, CALL, DO.
    Dml,
    /// CREATE, ALTER, DROP, COMMENT, GRANT, REVOKE, SELECT INTO, maintenance (VACUUM, ...).
    Ddl,
    /// BEGIN, START TRANSACTION, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE.
    Transaction,
    /// SET, RESET, DISCARD, `SELECT set_config(...)` and other session state: replayed so
    /// later statements behave the same on the mirror.
    Session,
    /// Empty text (only whitespace and comments).
    Empty,
    /// Anything else (LOCK, ...), including SQL-level PREPARE and EXECUTE, whose class is
    /// that of the prepared statement: see [`prepared`].
    Other,
}

/// Skips whitespace and comments; returns the index of the next significant byte.
fn skip_blank(sql: &[u8], mut i: usize) -> usize {
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            // PostgreSQL's scanner ends a `--` comment at `\n` or `\r` (`non_newline` is
            // `[^\n\r]`): a comment that ran on past a `\r` would hide statements after it.
            i = match memchr::memchr2(b'\n', b'\r', &sql[i..]) {
                Some(n) => i + n + 1,
                None => sql.len(),
            };
        } else if sql[i..].starts_with(b"/*") {
            i = skip_block_comment(sql, i);
        } else {
            return i;
        }
    }
}

/// The index after the block comment starting at `i` (PostgreSQL block comments nest).
pub(crate) fn skip_block_comment(sql: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < sql.len() {
        if sql[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if sql[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

/// The next word (letters, digits, underscore) at or after `i`, uppercased into `out`.
fn word_at<'o>(sql: &[u8], i: usize, out: &'o mut [u8; 16]) -> (&'o [u8], usize) {
    let start = skip_blank(sql, i);
    let mut end = start;
    while end < sql.len() && (sql[end].is_ascii_alphanumeric() || sql[end] == b'_') {
        end += 1;
    }
    let len = (end - start).min(out.len());
    for (o, b) in out.iter_mut().zip(&sql[start..start + len]) {
        *o = b.to_ascii_uppercase();
    }
    (&out[..len], end)
}

/// A statement's first word, uppercased (its first 16 bytes), and the index after it: read
/// once and handed to each scanner that starts from it ([`classify_headed`], [`copy_headed`],
/// [`transaction_headed`], [`prepared_headed`], [`setting_headed`], [`pins_headed`]), where
/// each of them read it again before (six uppercasings of one word per pooled statement).
/// It belongs to the text it was read from: a scanner given another text's head reads
/// that text wrongly (a wrong answer, never a panic: every index is checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    word: [u8; 16],
    len: u8,
    end: usize,
}

impl Head {
    pub fn of(sql: &[u8]) -> Head {
        let mut word = [0u8; 16];
        let (first, end) = word_at(sql, 0, &mut word);
        let len = first.len() as u8;
        Head { word, len, end }
    }

    fn word(&self) -> &[u8] {
        &self.word[..usize::from(self.len)]
    }
}

/// When a quoted literal or identifier, a comment or a dollar-quoted string starts at `i`: the
/// index after it. The scanners below step over these as single tokens.
fn skip_opaque(sql: &[u8], i: usize) -> Option<usize> {
    match sql[i] {
        b'\'' | b'"' => Some(skip_quoted(sql, i)),
        b'-' if sql[i..].starts_with(b"--") => Some(skip_blank(sql, i)),
        b'/' if sql[i..].starts_with(b"/*") => Some(skip_blank(sql, i)),
        b'$' => Some(skip_dollar(sql, i)),
        _ => None,
    }
}

/// Whether `word` appears as a whole keyword outside quotes, comments and parentheses depth
/// restrictions are not applied (used for WITH ... INSERT and SELECT ... INTO).
fn contains_keyword(sql: &[u8], word: &[u8]) -> bool {
    // A keyword is first of all a run of its letters, case aside: where there is none (most
    // statements, for most words asked) the answer is no without the token walk, which
    // costs about 20 instructions a byte against memchr's fraction of one (a fifth of a
    // pooled `pgbench -S` transaction's classification before).
    if !contains_ignore_case_ascii(sql, word) {
        return false;
    }
    let mut i = 0;
    while i < sql.len() {
        if let Some(next) = skip_opaque(sql, i) {
            i = next;
            continue;
        }
        match sql[i] {
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_') {
                    i += 1;
                }
                if sql[start..i].eq_ignore_ascii_case(word) {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// The index after the quoted run (`'...'` or `"..."`) starting at `i`; a doubled quote stays
/// inside.
pub(crate) fn skip_quoted(sql: &[u8], i: usize) -> usize {
    let quote = sql[i];
    let mut j = i + 1;
    while j < sql.len() {
        if sql[j] == quote {
            if sql.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    sql.len()
}

/// `$tag$ ... $tag$` dollar quoting; a lone `$1` parameter is skipped as a word.
fn skip_dollar(sql: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < sql.len() && (sql[j].is_ascii_alphanumeric() || sql[j] == b'_') {
        j += 1;
    }
    if sql.get(j) != Some(&b'$') || sql[i + 1..j].first().is_some_and(|c| c.is_ascii_digit()) {
        return j.max(i + 1);
    }
    let tag = &sql[i..=j];
    match memchr::memmem::find(&sql[j + 1..], tag) {
        Some(n) => j + 1 + n + tag.len(),
        None => sql.len(),
    }
}

/// Classifies one statement (the first one, if the text holds several).
pub fn classify(sql: &[u8]) -> Class {
    classify_headed(sql, &Head::of(sql))
}

/// [`classify`], the first word read already (`head`, of `sql`).
pub fn classify_headed(sql: &[u8], head: &Head) -> Class {
    classify_at(sql, head, 0)
}

/// `depth` counts the EXPLAINs around `sql`: EXPLAIN cannot explain an EXPLAIN, and stopping
/// there keeps a crafted `EXPLAIN ANALYZE EXPLAIN ANALYZE ...` from recursing without bound.
fn classify_at(sql: &[u8], head: &Head, depth: usize) -> Class {
    let (first, end) = (head.word(), head.end.min(sql.len()));
    match first {
        b"" => {
            if skip_blank(sql, 0) >= sql.len() {
                Class::Empty
            } else {
                Class::Other
            }
        }
        b"SELECT" => {
            if set_config_call(sql, end).is_some() && !contains_keyword(&sql[end..], b"FROM") {
                // `SELECT set_config(...)` changes a setting, as SET does.
                Class::Session
            } else if contains_keyword(&sql[end..], b"INTO")
                && !contains_keyword(&sql[end..], b"INSERT")
            {
                Class::Ddl
            } else {
                Class::Select
            }
        }
        b"VALUES" | b"TABLE" | b"SHOW" | b"FETCH" | b"MOVE" => Class::Select,
        b"WITH" => {
            let rest = &sql[end..];
            if [&b"INSERT"[..], b"UPDATE", b"DELETE", b"MERGE"]
                .iter()
                .any(|w| contains_keyword(rest, w))
            {
                Class::Dml
            } else {
                Class::Select
            }
        }
        b"EXPLAIN" if depth > 0 => Class::Other,
        b"EXPLAIN" => match explained(sql, end) {
            // EXPLAIN ANALYZE runs the statement: classify what it runs.
            Some((target, true)) if target < sql.len() => {
                let target = &sql[target..];
                classify_at(target, &Head::of(target), depth + 1)
            }
            _ => Class::Select,
        },
        b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"TRUNCATE" | b"CALL" | b"DO" => Class::Dml,
        // `COPY t FROM STDIN` writes; `COPY t TO ...` and `COPY (SELECT ... FROM t) TO ...`
        // read (the FROM of the latter is inside the query).
        b"COPY"
            if contains_keyword(&sql[end..], b"FROM") && !contains_keyword(&sql[end..], b"TO") =>
        {
            Class::Dml
        }
        b"COPY" => Class::Select,
        b"CREATE" | b"ALTER" | b"DROP" | b"COMMENT" | b"GRANT" | b"REVOKE" | b"REINDEX"
        | b"CLUSTER" | b"VACUUM" | b"ANALYZE" | b"ANALYSE" | b"REFRESH" | b"SECURITY"
        | b"IMPORT" => Class::Ddl,
        b"BEGIN" | b"START" | b"COMMIT" | b"END" | b"ROLLBACK" | b"ABORT" | b"SAVEPOINT"
        | b"RELEASE" => Class::Transaction,
        // Two-phase commit's first half ends the transaction block like COMMIT. `PREPARE name
        // AS ...` stays `Other`: its class is its statement's, which the mirror's router
        // reads with [`prepared`] (compare mode must not take it for a read).
        b"PREPARE" if is_prepare_transaction(sql, end) => Class::Transaction,
        b"SET" | b"RESET" | b"DISCARD" | b"DEALLOCATE" | b"LISTEN" | b"UNLISTEN" | b"LOAD" => {
            Class::Session
        }
        _ => Class::Other,
    }
}

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const IDENTIFIER_BYTES_MAX: usize = 63;

/// The identifier at or after `i` as PostgreSQL resolves it: a quoted one as written (`""`
/// stands for `"`), an unquoted one folded to lower case, both truncated to 63 bytes.
/// Returns the name, whether it was quoted, and the index after it.
fn identifier(sql: &[u8], i: usize) -> Option<(String, bool, usize)> {
    let start = skip_blank(sql, i);
    let (mut name, quoted, end) = match *sql.get(start)? {
        b'"' => {
            let end = skip_quoted(sql, start);
            if end < start + 3 || sql[end - 1] != b'"' {
                // Unterminated, or `""` (a zero-length name is an error in PostgreSQL).
                return None;
            }
            let text = std::str::from_utf8(&sql[start + 1..end - 1]).ok()?;
            (text.replace("\"\"", "\""), true, end)
        }
        c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
            let mut end = start + 1;
            while end < sql.len()
                && (sql[end].is_ascii_alphanumeric()
                    || matches!(sql[end], b'_' | b'$')
                    || sql[end] >= 0x80)
            {
                end += 1;
            }
            let text = std::str::from_utf8(&sql[start..end]).ok()?;
            (text.to_ascii_lowercase(), false, end)
        }
        _ => return None,
    };
    if name.len() > IDENTIFIER_BYTES_MAX {
        let mut cut = IDENTIFIER_BYTES_MAX;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    Some((name, quoted, end))
}

/// The index after the parenthesised list opening at `i` (quotes and comments respected), or
/// `None` when it is not closed.
fn skip_parens(sql: &[u8], i: usize) -> Option<usize> {
    let (mut j, mut depth) = (i, 0usize);
    while j < sql.len() {
        if let Some(next) = skip_opaque(sql, j) {
            j = next;
            continue;
        }
        match sql[j] {
            b'(' => {
                depth += 1;
                j += 1;
            }
            b')' => {
                depth = depth.checked_sub(1)?;
                j += 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => j += 1,
        }
    }
    None
}

/// The statement an EXPLAIN (whose keyword ends at `end`) is about, and whether it runs it
/// (ANALYZE, in the old word form or in the parenthesised option list).
fn explained(sql: &[u8], end: usize) -> Option<(usize, bool)> {
    let mut i = skip_blank(sql, end);
    let mut analyze = false;
    if sql.get(i) == Some(&b'(') {
        let close = skip_parens(sql, i)?;
        for option in sql[i + 1..close - 1].split(|&b| b == b',') {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            let (name, next) = word_at(option, 0, &mut a);
            if matches!(name, b"ANALYZE" | b"ANALYSE") {
                let (value, _) = word_at(option, next, &mut b);
                analyze = !matches!(value, b"FALSE" | b"OFF" | b"0" | b"NO");
            }
        }
        i = close;
    } else {
        loop {
            let mut w = [0u8; 16];
            let (word, next) = word_at(sql, i, &mut w);
            match word {
                b"ANALYZE" | b"ANALYSE" => analyze = true,
                b"VERBOSE" => {}
                _ => break,
            }
            i = next;
        }
    }
    Some((skip_blank(sql, i), analyze))
}

/// `PREPARE TRANSACTION 'gid'` (the word after PREPARE ends at `end`), not a statement that
/// happens to be named `transaction`.
fn is_prepare_transaction(sql: &[u8], end: usize) -> bool {
    let mut w = [0u8; 16];
    let (word, next) = word_at(sql, end, &mut w);
    word == b"TRANSACTION" && sql.get(skip_blank(sql, next)) == Some(&b'\'')
}

/// `set_config(` (optionally `pg_catalog.set_config(`) right after index `i`: the index of
/// its opening parenthesis.
fn set_config_call(sql: &[u8], i: usize) -> Option<usize> {
    // Asked of every SELECT: most name neither at once (no word to uppercase then).
    if !matches!(sql.get(skip_blank(sql, i)), Some(b's' | b'S' | b'p' | b'P')) {
        return None;
    }
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    let (mut word, mut next) = word_at(sql, i, &mut a);
    if word == b"PG_CATALOG" && sql.get(next) == Some(&b'.') {
        (word, next) = word_at(sql, next + 1, &mut b);
    }
    let open = skip_blank(sql, next);
    (word == b"SET_CONFIG" && sql.get(open) == Some(&b'(')).then_some(open)
}

/// Which way a COPY statement moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// `COPY t FROM STDIN`: the client sends the data (CopyIn).
    FromStdin,
    /// `COPY t FROM 'file'` or `FROM PROGRAM`: the server reads it; the client sends none.
    FromServer,
    /// `COPY t TO ...`, `COPY (query) TO ...`: the server sends or writes data.
    To,
}

/// The one "is this a COPY" rule: a statement whose first word is COPY, and its direction
/// (the same reading as [`classify`]: FROM without TO writes). `None` for anything else.
pub fn copy(sql: &[u8]) -> Option<Copy> {
    copy_headed(sql, &Head::of(sql))
}

/// [`copy`], the first word read already (`head`, of `sql`).
pub fn copy_headed(sql: &[u8], head: &Head) -> Option<Copy> {
    let (first, end) = (head.word(), head.end);
    if first != b"COPY" {
        return None;
    }
    let rest = sql.get(end..).unwrap_or_default();
    Some(
        if !contains_keyword(rest, b"FROM") || contains_keyword(rest, b"TO") {
            Copy::To
        } else if contains_keyword(rest, b"STDIN") {
            Copy::FromStdin
        } else {
            Copy::FromServer
        },
    )
}

/// Session state a statement leaves on its server connection that a pooled connection
/// cannot carry to another client: the client must keep that connection until it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// `LISTEN`: notifications arrive on the connection that listens.
    Listen,
    /// A session-level advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock` and their
    /// `_shared` forms; the `_xact_` ones end with the transaction).
    AdvisoryLock,
    /// `CREATE TEMP TABLE` (or any temporary object): it lives in the connection's session.
    TempObject,
    /// `DECLARE ... WITH HOLD`: the cursor outlives its transaction.
    HoldCursor,
}

impl Pin {
    pub fn name(self) -> &'static str {
        match self {
            Pin::Listen => "listen",
            Pin::AdvisoryLock => "advisory-lock",
            Pin::TempObject => "temporary-object",
            Pin::HoldCursor => "with-hold-cursor",
        }
    }
}

/// What in `sql` (one statement) pins a pooled client to its server connection, if anything.
/// Reads words outside quotes and comments only.
pub fn pins(sql: &[u8]) -> Option<Pin> {
    pins_headed(sql, &Head::of(sql))
}

/// [`pins`], the first word read already (`head`, of `sql`).
pub fn pins_headed(sql: &[u8], head: &Head) -> Option<Pin> {
    let (first, end) = (head.word(), head.end.min(sql.len()));
    match first {
        b"LISTEN" => return Some(Pin::Listen),
        b"DECLARE" if has_words(sql, end, &[b"WITH", b"HOLD"]) => return Some(Pin::HoldCursor),
        b"CREATE" => {
            let mut word = [0u8; 16];
            let (second, after) = word_at(sql, end, &mut word);
            let second = match second {
                b"OR" | b"GLOBAL" | b"LOCAL" => {
                    // CREATE OR REPLACE TEMP VIEW, CREATE GLOBAL TEMPORARY TABLE
                    let mut w = [0u8; 16];
                    let (third, after3) = word_at(sql, after, &mut w);
                    if third == b"REPLACE" {
                        let mut w4 = [0u8; 16];
                        let (fourth, _) = word_at(sql, after3, &mut w4);
                        fourth == b"TEMP" || fourth == b"TEMPORARY"
                    } else {
                        third == b"TEMP" || third == b"TEMPORARY"
                    }
                }
                b"TEMP" | b"TEMPORARY" => true,
                _ => false,
            };
            if second {
                return Some(Pin::TempObject);
            }
        }
        _ => {}
    }
    if has_advisory_lock_call(sql) {
        return Some(Pin::AdvisoryLock);
    }
    None
}

/// `words` appear one after the other somewhere after `from`, outside quotes and comments.
fn has_words(sql: &[u8], from: usize, words: &[&[u8]]) -> bool {
    let mut matched = 0;
    for word in words_from(sql, from) {
        if word.eq_ignore_ascii_case(words[matched]) {
            matched += 1;
            if matched == words.len() {
                return true;
            }
        } else {
            matched = usize::from(word.eq_ignore_ascii_case(words[0]));
        }
    }
    false
}

/// The words (letters, digits, underscore) of `sql` from `from` on, stepping over quoted
/// literals and identifiers, comments and dollar quotes.
fn words_from(sql: &[u8], from: usize) -> impl Iterator<Item = &[u8]> {
    let mut i = from;
    std::iter::from_fn(move || {
        while i < sql.len() {
            if let Some(next) = skip_opaque(sql, i) {
                i = next;
                continue;
            }
            if sql[i].is_ascii_alphabetic() || sql[i] == b'_' {
                let start = i;
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_') {
                    i += 1;
                }
                return Some(&sql[start..i]);
            }
            i += 1;
        }
        None
    })
}

/// A call of a session-level advisory lock function.
fn has_advisory_lock_call(sql: &[u8]) -> bool {
    // Most statements never mention it: a cheap look before the word scan (`v` is rare in
    // SQL; a memmem finder costs more to build than this whole scan).
    let mentions = memchr::memchr2_iter(b'v', b'V', sql).any(|at| {
        at >= 2
            && sql
                .get(at - 2..at + 6)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"advisory"))
    });
    if !mentions {
        return false;
    }
    words_from(sql, 0).any(|word| {
        [
            &b"pg_advisory_lock"[..],
            b"pg_advisory_lock_shared",
            b"pg_try_advisory_lock",
            b"pg_try_advisory_lock_shared",
        ]
        .iter()
        .any(|f| word.eq_ignore_ascii_case(f))
    })
}

/// An SQL-level prepared-statement command, read far enough to track what a session has
/// prepared: PostgreSQL keeps these and the protocol's named statements in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// `PREPARE name [(types)] AS statement`; the statement starts at `body`.
    Prepare { name: String, body: usize },
    /// `EXECUTE name [(args)]`, also under EXPLAIN: `runs` is false for a plain EXPLAIN,
    /// which only plans it.
    Execute { name: String, runs: bool },
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate { name: String },
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DISCARD ALL`: drops every prepared statement and portal, resets every setting.
    DiscardAll,
    /// `CREATE [TEMP | UNLOGGED] TABLE ... AS EXECUTE name [(args)]`: DDL that runs a prepared
    /// statement, which must exist.
    CreateTableAsExecute { name: String },
}

/// Reads one statement as an SQL-level prepared-statement command; `None` for anything else
/// (and for text PostgreSQL would reject, such as `PREPARE p SELECT 1`).
pub fn prepared(sql: &[u8]) -> Option<Prepared> {
    prepared_headed(sql, &Head::of(sql))
}

/// [`prepared`], the first word read already (`head`, of `sql`).
pub fn prepared_headed(sql: &[u8], head: &Head) -> Option<Prepared> {
    let (first, end) = (head.word(), head.end.min(sql.len()));
    match first {
        b"PREPARE" => {
            let (name, _, after) = identifier(sql, end)?;
            let mut i = skip_blank(sql, after);
            if sql.get(i) == Some(&b'(') {
                i = skip_parens(sql, i)?;
            }
            let mut w = [0u8; 16];
            let (word, after) = word_at(sql, i, &mut w);
            let body = skip_blank(sql, after);
            (word == b"AS" && body < sql.len()).then_some(Prepared::Prepare { name, body })
        }
        b"EXECUTE" => execute_at(sql, end, true),
        b"EXPLAIN" => {
            let (target, runs) = explained(sql, end)?;
            let mut w = [0u8; 16];
            let (word, after) = word_at(sql, target, &mut w);
            if word == b"EXECUTE" {
                execute_at(sql, after, runs)
            } else {
                None
            }
        }
        b"DEALLOCATE" => {
            let (mut name, mut quoted, mut after) = identifier(sql, end)?;
            // `DEALLOCATE PREPARE x`; a statement named `prepare` is `DEALLOCATE prepare`.
            if !quoted && name == "prepare" && !at_end(sql, after) {
                (name, quoted, after) = identifier(sql, after)?;
            }
            if !at_end(sql, after) {
                return None;
            }
            Some(if !quoted && name == "all" {
                Prepared::DeallocateAll
            } else {
                Prepared::Deallocate { name }
            })
        }
        b"DISCARD" => {
            let mut w = [0u8; 16];
            let (word, after) = word_at(sql, end, &mut w);
            (word == b"ALL" && at_end(sql, after)).then_some(Prepared::DiscardAll)
        }
        b"CREATE" => {
            create_table_as_execute(sql, end).map(|name| Prepared::CreateTableAsExecute { name })
        }
        _ => None,
    }
}

/// After `CREATE` at `i`: the prepared statement's name when this is `CREATE [GLOBAL | LOCAL]
/// [TEMP | TEMPORARY | UNLOGGED] TABLE ... AS EXECUTE name`. The query of a CREATE TABLE AS is
/// introduced by the first `AS` outside parentheses (column lists and storage options are in
/// them), so only the word right after that one counts: `AS SELECT 1 AS execute` is not it.
fn create_table_as_execute(sql: &[u8], mut i: usize) -> Option<String> {
    let mut w = [0u8; 16];
    loop {
        let (word, after) = word_at(sql, i, &mut w);
        i = after;
        match word {
            b"GLOBAL" | b"LOCAL" | b"TEMP" | b"TEMPORARY" | b"UNLOGGED" => {}
            b"TABLE" => break,
            _ => return None,
        }
    }
    let mut depth = 0usize;
    while i < sql.len() {
        if let Some(next) = skip_opaque(sql, i) {
            i = next;
            continue;
        }
        match sql[i] {
            b'(' => depth += 1,
            b')' => depth = depth.checked_sub(1)?,
            c if depth == 0 && (c.is_ascii_alphabetic() || c == b'_') => {
                let (word, after) = word_at(sql, i, &mut w);
                if word == b"AS" {
                    let (next, after) = word_at(sql, after, &mut w);
                    if next != b"EXECUTE" {
                        return None;
                    }
                    let (name, _, _) = identifier(sql, after)?;
                    return Some(name);
                }
                i = after;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn execute_at(sql: &[u8], i: usize, runs: bool) -> Option<Prepared> {
    let (name, _, after) = identifier(sql, i)?;
    let next = skip_blank(sql, after);
    (at_end(sql, next) || sql[next] == b'(').then_some(Prepared::Execute { name, runs })
}

/// Nothing but blanks, comments and `;` from `i` on: the end of a statement whose text came
/// whole (a Parse keeps the trailing `;` that splitting a simple Query drops).
fn at_end(sql: &[u8], mut i: usize) -> bool {
    loop {
        i = skip_blank(sql, i);
        match sql.get(i) {
            None => return true,
            Some(b';') => i += 1,
            Some(_) => return false,
        }
    }
}

/// How a session-class statement changes what a reconnected mirror must replay to be in the
/// same state as the client's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// A session-level change to keep and replay. `key` names the parameter when it can be
    /// read (lower case), else it is the statement's text: a later change with the same key
    /// makes this one moot.
    Set { key: String },
    /// `RESET name`: what was kept for that parameter is moot.
    Reset { key: String },
    /// `RESET ALL`, `DISCARD ALL`: everything kept is moot.
    ResetAll,
}

/// Reads a SET, RESET, DISCARD ALL or `SELECT set_config(...)`. `None` for statements that
/// leave the session's settings alone once the transaction ends: `SET LOCAL`,
/// `SET TRANSACTION`, `SET CONSTRAINTS`, `set_config(..., true)`, and anything else.
pub fn setting(sql: &[u8]) -> Option<Setting> {
    setting_headed(sql, &Head::of(sql))
}

/// [`setting`], the first word read already (`head`, of `sql`).
pub fn setting_headed(sql: &[u8], head: &Head) -> Option<Setting> {
    let (first, end) = (head.word(), head.end.min(sql.len()));
    match first {
        b"SET" => {
            let (mut name, mut quoted, mut after) = identifier(sql, end)?;
            if !quoted && name == "local" {
                return None;
            }
            if !quoted && name == "session" && skip_blank(sql, after) < sql.len() {
                // `SET SESSION x` is `SET x`; `SET SESSION CHARACTERISTICS AS TRANSACTION`
                // and `SET SESSION AUTHORIZATION` are session-level too.
                (name, quoted, after) = identifier(sql, after)?;
            }
            if !quoted && matches!(name.as_str(), "transaction" | "constraints") {
                return None;
            }
            Some(Setting::Set {
                key: parameter_key(sql, name, quoted, after),
            })
        }
        b"RESET" => {
            let (mut name, mut quoted, mut after) = identifier(sql, end)?;
            if !quoted && name == "all" {
                return Some(Setting::ResetAll);
            }
            if !quoted && name == "session" && skip_blank(sql, after) < sql.len() {
                (name, quoted, after) = identifier(sql, after)?;
            }
            Some(Setting::Reset {
                key: parameter_key(sql, name, quoted, after),
            })
        }
        b"DISCARD" => {
            (prepared_headed(sql, head) == Some(Prepared::DiscardAll)).then_some(Setting::ResetAll)
        }
        b"SELECT" => {
            let open = set_config_call(sql, end)?;
            let args = split_arguments(sql, open)?;
            let arg = |n: usize| {
                args.get(n).map(|r| {
                    String::from_utf8_lossy(&sql[r.clone()])
                        .trim()
                        .to_ascii_lowercase()
                })
            };
            let local = arg(2)?;
            if matches!(
                local.as_str(),
                "true" | "'t'" | "'true'" | "'on'" | "'yes'" | "'y'" | "'1'"
            ) {
                return None;
            }
            let key = arg(0)
                .and_then(|name| {
                    let name = name.strip_prefix('\'')?.strip_suffix('\'')?;
                    (!name.contains('\'')).then(|| name.to_string())
                })
                .unwrap_or_else(|| String::from_utf8_lossy(sql).trim().to_string());
            Some(Setting::Set { key })
        }
        _ => None,
    }
}

/// A parameter's key for [`Setting`]: the (possibly dotted) name, its syntax-sugar
/// spellings mapped to the parameter they set.
fn parameter_key(sql: &[u8], mut name: String, quoted: bool, mut after: usize) -> String {
    while sql.get(after) == Some(&b'.') {
        let Some((part, _, next)) = identifier(sql, after + 1) else {
            break;
        };
        name.push('.');
        name.push_str(&part);
        after = next;
    }
    if quoted {
        return name;
    }
    match name.as_str() {
        "time" => "timezone".to_string(),
        "schema" => "search_path".to_string(),
        "names" => "client_encoding".to_string(),
        _ => name,
    }
}

/// The ranges of the top-level arguments of the call whose parenthesis opens at `open`.
fn split_arguments(sql: &[u8], open: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let close = skip_parens(sql, open)?;
    let inner = open + 1..close - 1;
    let mut out = Vec::new();
    let (mut start, mut i, mut depth) = (inner.start, inner.start, 0usize);
    while i < inner.end {
        match sql[i] {
            b'\'' | b'"' => i = skip_quoted(sql, i),
            b'$' => i = skip_dollar(sql, i),
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' if depth == 0 => {
                out.push(start..i);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(start..inner.end.max(start));
    Some(out)
}

/// What a transaction-control statement does to the session's transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
    /// BEGIN, START TRANSACTION.
    Begin,
    /// COMMIT, END, PREPARE TRANSACTION; `chain`: AND CHAIN opens the next block at once.
    Commit { chain: bool },
    /// ROLLBACK, ABORT (not ROLLBACK TO SAVEPOINT).
    Rollback { chain: bool },
}

/// Reads a statement that opens or ends a transaction block; `None` for anything else
/// (savepoints, `COMMIT PREPARED`, ...).
pub fn transaction(sql: &[u8]) -> Option<Transaction> {
    transaction_headed(sql, &Head::of(sql))
}

/// [`transaction`], the first word read already (`head`, of `sql`).
pub fn transaction_headed(sql: &[u8], head: &Head) -> Option<Transaction> {
    let (first, end) = (head.word(), head.end.min(sql.len()));
    let ends = |commit: bool| {
        let mut i = end;
        let mut chain = false;
        loop {
            let mut w = [0u8; 16];
            let (word, next) = word_at(sql, i, &mut w);
            match word {
                b"WORK" | b"TRANSACTION" => {}
                b"TO" | b"PREPARED" => return None,
                b"AND" => {
                    let mut v = [0u8; 16];
                    chain = word_at(sql, next, &mut v).0 == b"CHAIN";
                    break;
                }
                _ => break,
            }
            i = next;
        }
        Some(if commit {
            Transaction::Commit { chain }
        } else {
            Transaction::Rollback { chain }
        })
    };
    match first {
        b"BEGIN" | b"START" => Some(Transaction::Begin),
        b"COMMIT" | b"END" => ends(true),
        b"ROLLBACK" | b"ABORT" => ends(false),
        b"PREPARE" if is_prepare_transaction(sql, end) => {
            Some(Transaction::Commit { chain: false })
        }
        _ => None,
    }
}

/// Whether one statement may run on a server connection shared with other clients'
/// statements (pipelined lending), as its own implicit transaction: a read or a write
/// (SELECT, VALUES, TABLE, SHOW, EXPLAIN, INSERT, UPDATE, DELETE, MERGE, WITH ...) that can
/// neither open a transaction block nor leave anything on the connection for the next
/// client. Not: transaction control, settings (`SET`, `set_config` anywhere, even inside a
/// query), SQL-level PREPARE/EXECUTE/DEALLOCATE, COPY (its data comes later), what pins
/// (LISTEN, session advisory locks, temporary objects, WITH HOLD cursors), CALL and DO
/// (procedures may commit and set), cursors (FETCH, MOVE), several statements, and
/// everything unclassified. Errs on the side of "no": such a statement is lent a
/// connection of its own, as any other.
pub fn shareable_alone(sql: &[u8]) -> bool {
    // What the scanners below could misread, refused outright: a backslash (escapes in
    // E'...' strings, which the quote scanner does not know), a `$` that is not a parameter
    // (dollar quotes, and `$` inside identifiers, where a dollar quote cannot start), and the
    // functions and views that change settings or take session locks under any spelling
    // (quoted, schema-qualified, or through pg_settings).
    if memchr::memchr(b'\\', sql).is_some()
        || memchr::memchr_iter(b'$', sql).any(|at| !sql.get(at + 1).is_some_and(u8::is_ascii_digit))
    {
        return false;
    }
    const NEVER: [&[u8]; 4] = [b"set_config", b"advisory", b"pg_settings", b"lo_"];
    if NEVER.iter().any(|word| contains_ignore_case(sql, word)) {
        return false;
    }
    let head = Head::of(sql);
    if matches!(
        head.word(),
        b"CALL" | b"DO" | b"FETCH" | b"MOVE" | b"TRUNCATE" | b"LOCK"
    ) {
        return false;
    }
    // `SELECT ... INTO` (under WITH too) creates a table; TEMP objects pin.
    let (mut into, mut writes) = (false, false);
    for word in words_from(sql, 0) {
        if [&b"TEMP"[..], b"TEMPORARY", b"UNLOGGED"]
            .iter()
            .any(|w| word.eq_ignore_ascii_case(w))
        {
            return false;
        }
        into |= word.eq_ignore_ascii_case(b"INTO");
        writes |= word.eq_ignore_ascii_case(b"INSERT") || word.eq_ignore_ascii_case(b"MERGE");
    }
    if into && !writes {
        return false;
    }
    matches!(classify_headed(sql, &head), Class::Select | Class::Dml)
        && transaction_headed(sql, &head).is_none()
        && copy_headed(sql, &head).is_none()
        && prepared_headed(sql, &head).is_none()
        && pins_headed(sql, &head).is_none()
        && split_statements(sql).len() <= 1
}

/// Whether `needle` (ASCII letters and underscores) occurs in `hay`, case aside: the places
/// of its first letter found with memchr, the rest compared there.
fn contains_ignore_case_ascii(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    memchr::memchr2_iter(first.to_ascii_lowercase(), first.to_ascii_uppercase(), hay).any(|at| {
        hay.get(at + 1..at + 1 + rest.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(rest))
    })
}

/// Whether `needle` (lowercase ASCII) occurs in `hay`, case aside.
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Splits a simple-query string into statements at top-level semicolons (quotes, comments and
/// dollar quoting respected). Returned ranges exclude the semicolons; empty ones are dropped.
pub fn split_statements(sql: &[u8]) -> Vec<std::ops::Range<usize>> {
    // Most queries are one statement, with at most a `;` at the end: found with a few
    // memchr passes instead of the byte-by-byte walk (quotes, comments and dollar quotes,
    // where a `;` may hide, send the text down the walk).
    match memchr::memchr(b';', sql) {
        None => {
            return if skip_blank(sql, 0) < sql.len() {
                std::iter::once(0..sql.len()).collect()
            } else {
                Vec::new()
            };
        }
        Some(at)
            if sql[at + 1..].iter().all(u8::is_ascii_whitespace)
                && memchr::memchr3(b'\'', b'"', b'$', sql).is_none()
                && !memchr::memchr2_iter(b'-', b'/', sql)
                    .any(|i| matches!(sql.get(i..i + 2), Some(b"--" | b"/*")))
                && (memchr::memchr(b'(', sql).is_none()
                    || memchr::memchr_iter(b'(', sql).count()
                        <= memchr::memchr_iter(b')', sql).count()) =>
        {
            return if skip_blank(&sql[..at], 0) < at {
                std::iter::once(0..at).collect()
            } else {
                Vec::new()
            };
        }
        Some(_) => {}
    }
    split_walk(sql)
}

/// The statements of `sql`, walked byte by byte (quotes, comments, parentheses).
fn split_walk(sql: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut i, mut depth) = (0usize, 0usize, 0i32);
    while i < sql.len() {
        if let Some(next) = skip_opaque(sql, i) {
            i = next;
            continue;
        }
        match sql[i] {
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth -= 1;
                i += 1;
            }
            b';' if depth <= 0 => {
                if skip_blank(&sql[..i], start) < i {
                    out.push(start..i);
                }
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    if skip_blank(sql, start) < sql.len() {
        out.push(start..sql.len());
    }
    out
}

/// A statement fingerprint: literals (numbers, strings, `$n` parameters) become `?`,
/// whitespace and comments collapse, keywords and identifiers are lowercased. Returns the
/// hash and the normalised text (at most `text_bytes_max` bytes of it).
pub fn fingerprint(sql: &[u8], text_bytes_max: usize) -> (u64, String) {
    // FNV-1a: stable across runs and processes, so reports from different shards group.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut text = String::new();
    let mut emit = |b: u8, text: &mut String| {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        if text.len() < text_bytes_max {
            text.push(b as char);
        }
    };
    let mut i = 0;
    let mut pending_space = false;
    while i < sql.len() {
        let c = sql[i];
        let token_start = i;
        let literal = match c {
            b'\'' => {
                i = skip_quoted(sql, i);
                true
            }
            b'$' => {
                i = skip_dollar(sql, i);
                true
            }
            b'0'..=b'9' => {
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.') {
                    i += 1;
                }
                true
            }
            b'-' if sql[i..].starts_with(b"--") => {
                i = skip_blank(sql, i);
                pending_space = true;
                continue;
            }
            b'/' if sql[i..].starts_with(b"/*") => {
                i = skip_blank(sql, i);
                pending_space = true;
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                pending_space = true;
                continue;
            }
            _ => false,
        };
        if pending_space && !text.is_empty() {
            emit(b' ', &mut text);
        }
        pending_space = false;
        if literal {
            emit(b'?', &mut text);
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c == b'"' {
            if c == b'"' {
                i = skip_quoted(sql, i);
            } else {
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_') {
                    i += 1;
                }
            }
            for &b in &sql[token_start..i] {
                emit(b.to_ascii_lowercase(), &mut text);
            }
            continue;
        }
        // Non-ASCII bytes go into the hash but not the (ASCII) display text.
        if c.is_ascii() {
            emit(c, &mut text);
        }
        i += 1;
    }
    (hash, text)
}

/// Whether the statement's outer query has an `ORDER BY` (outside parentheses, quotes and
/// comments): its rows then come in a defined order and compare as a sequence.
pub fn has_top_level_order_by(sql: &[u8]) -> bool {
    order_by_end(sql).is_some()
}

/// One item of a top-level ORDER BY that names an output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderKey {
    /// `ORDER BY 2`: the output column at this index (0-based).
    Position(usize),
    /// `ORDER BY name` or `ORDER BY t.name`: the output column of that name (folded to lower
    /// case unless quoted).
    Name(String),
}

/// The sort keys of the statement's top-level ORDER BY when every item is a plain output
/// column (a position or a column name, with ASC/DESC and NULLS FIRST/LAST); `None` when there
/// is no top-level ORDER BY or an item is an expression. Rows whose keys tie may come in any
/// order, so only the keys' sequence is an order to check.
pub fn order_by_keys(sql: &[u8]) -> Option<Vec<OrderKey>> {
    let mut i = order_by_end(sql)?;
    let mut keys = Vec::new();
    let mut w = [0u8; 16];
    loop {
        i = skip_blank(sql, i);
        let key = match *sql.get(i)? {
            c if c.is_ascii_digit() => {
                let start = i;
                while i < sql.len() && sql[i].is_ascii_digit() {
                    i += 1;
                }
                let n: usize = std::str::from_utf8(&sql[start..i]).ok()?.parse().ok()?;
                OrderKey::Position(n.checked_sub(1)?)
            }
            _ => {
                // [qualifier.]...name: the last part names the output column.
                let (mut name, _, mut after) = identifier(sql, i)?;
                while sql.get(after) == Some(&b'.') {
                    (name, _, after) = identifier(sql, after + 1)?;
                }
                i = after;
                OrderKey::Name(name)
            }
        };
        keys.push(key);
        // Direction and null ordering, then `,` (another key) or the end of the clause.
        loop {
            let (word, after) = word_at(sql, i, &mut w);
            match word {
                b"ASC" | b"DESC" | b"NULLS" | b"FIRST" | b"LAST" => i = after,
                _ => break,
            }
        }
        i = skip_blank(sql, i);
        match sql.get(i) {
            Some(b',') => i += 1,
            None | Some(b';') | Some(b')') => return Some(keys),
            Some(_) => {
                let (word, _) = word_at(sql, i, &mut w);
                return matches!(word, b"LIMIT" | b"OFFSET" | b"FETCH" | b"FOR").then_some(keys);
            }
        }
    }
}

/// One item of a top-level ORDER BY as text (see [`sort_items`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortItem {
    /// The item's expression, without ASC/DESC and NULLS FIRST/LAST.
    pub range: std::ops::Range<usize>,
    /// When the item is a position (`2`) or an unqualified name (which PostgreSQL reads as an
    /// output column's name first): that key; `None` for an expression or a qualified name.
    pub key: Option<OrderKey>,
}

/// A plain SELECT with a top-level ORDER BY, as text that can be re-run with its sort keys
/// appended to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortItems {
    /// Where the outer select list ends (before the top-level FROM, or the first clause).
    pub list_end: usize,
    pub items: Vec<SortItem>,
    /// The ORDER BY's items as written (with ASC/DESC, NULLS FIRST/LAST), without `ORDER BY`.
    pub clause: std::ops::Range<usize>,
}

/// One token of [`sort_items`]' walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// A bare word (keyword or unquoted identifier) at `start..end`.
    Word,
    Open,
    Close,
    Comma,
    Semicolon,
    /// A literal, a quoted identifier, a number, an operator.
    Other,
}

/// The tokens of `sql` with their ranges (comments skipped).
fn tokens(sql: &[u8]) -> Vec<(Token, usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        i = skip_blank(sql, i);
        let Some(&c) = sql.get(i) else {
            return out;
        };
        let start = i;
        let token = match c {
            b'\'' | b'"' => {
                i = skip_quoted(sql, i);
                Token::Other
            }
            b'$' => {
                i = skip_dollar(sql, i);
                Token::Other
            }
            b'(' | b'[' => {
                i += 1;
                Token::Open
            }
            b')' | b']' => {
                i += 1;
                Token::Close
            }
            b',' => {
                i += 1;
                Token::Comma
            }
            b';' => {
                i += 1;
                Token::Semicolon
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric()
                        || matches!(sql[i], b'_' | b'$')
                        || sql[i] >= 0x80)
                {
                    i += 1;
                }
                Token::Word
            }
            c if c.is_ascii_digit() => {
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.') {
                    i += 1;
                }
                Token::Other
            }
            _ => {
                i += 1;
                Token::Other
            }
        };
        out.push((token, start, i));
    }
}

/// The top-level ORDER BY of a statement that is one plain `SELECT list FROM ... ORDER BY
/// items [LIMIT|OFFSET|FETCH ...]`, read so that compare can re-run it with the sort keys
/// appended to the select list (their values then come with each row). `None` whenever that
/// rewrite is not certain to return the same rows: no top-level ORDER BY, not a SELECT (a
/// WITH, VALUES, TABLE), DISTINCT (the appended keys would change which rows are distinct),
/// a set operation (UNION, INTERSECT, EXCEPT: their ORDER BY names output columns only),
/// INTO, a `USING` sort operator, an empty select list, several statements, a backslash
/// anywhere (escape strings, which this walk does not read), unbalanced parentheses.
pub fn sort_items(sql: &[u8]) -> Option<SortItems> {
    if memchr::memchr(b'\\', sql).is_some() {
        return None;
    }
    let tokens = tokens(sql);
    let word = |t: &(Token, usize, usize), w: &[u8]| {
        t.0 == Token::Word && sql[t.1..t.2].eq_ignore_ascii_case(w)
    };
    let select = main_select(sql, &tokens)?;
    if tokens.get(select + 1).is_some_and(|t| word(t, b"DISTINCT")) {
        return None;
    }
    let mut depth = 0i32;
    let mut list_end = None;
    let mut order_at = None;
    for (index, t) in tokens.iter().enumerate().skip(select + 1) {
        match t.0 {
            Token::Open => depth += 1,
            Token::Close => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            // Only a final `;` (with nothing after it).
            Token::Semicolon if depth == 0 && index + 1 != tokens.len() => return None,
            Token::Word if depth == 0 => {
                let w = &sql[t.1..t.2];
                let is = |k: &[u8]| w.eq_ignore_ascii_case(k);
                if is(b"INTO") || is(b"UNION") || is(b"INTERSECT") || is(b"EXCEPT") {
                    return None;
                }
                let clause = [
                    &b"FROM"[..],
                    b"WHERE",
                    b"GROUP",
                    b"HAVING",
                    b"WINDOW",
                    b"ORDER",
                    b"LIMIT",
                    b"OFFSET",
                    b"FETCH",
                    b"FOR",
                ]
                .iter()
                .any(|k| is(k));
                // `a IS [NOT] DISTINCT FROM b` in the select list is no FROM clause.
                let operator = is(b"FROM")
                    && index
                        .checked_sub(1)
                        .and_then(|i| tokens.get(i))
                        .is_some_and(|t| word(t, b"DISTINCT"));
                if clause && !operator && list_end.is_none() {
                    if index == select + 1 {
                        return None;
                    }
                    list_end = Some(t.1);
                }
                if is(b"ORDER")
                    && order_at.is_none()
                    && tokens.get(index + 1).is_some_and(|n| word(n, b"BY"))
                {
                    order_at = Some(index + 2);
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return None;
    }
    let list_end = list_end?;
    let mut items = Vec::new();
    let mut item: Vec<&(Token, usize, usize)> = Vec::new();
    let mut depth = 0i32;
    let clause_start = tokens.get(order_at?).map_or(sql.len(), |t| t.1);
    let mut clause_end = clause_start;
    for t in tokens.get(order_at?..)?.iter().chain(std::iter::once(&(
        Token::Semicolon,
        sql.len(),
        sql.len(),
    ))) {
        let ends_clause = depth == 0
            && (t.0 == Token::Semicolon
                || [&b"LIMIT"[..], b"OFFSET", b"FETCH", b"FOR"]
                    .iter()
                    .any(|k| word(t, k)));
        if ends_clause || (depth == 0 && t.0 == Token::Comma) {
            items.push(sort_item(sql, &item)?);
            item.clear();
            if ends_clause {
                return Some(SortItems {
                    list_end,
                    items,
                    clause: clause_start..clause_end,
                });
            }
            continue;
        }
        clause_end = t.2;
        match t.0 {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            Token::Word if depth == 0 && word(t, b"USING") => return None,
            _ => {}
        }
        item.push(t);
    }
    None
}

/// The names of what `sql` calls: every bare or quoted name (with its qualifiers, as written)
/// followed by `(`, outside literals and comments, whatever it is (a function, a keyword such
/// as `IN (`, a type's modifier `numeric(10, 2)`, a table alias's column list). The caller
/// decides which it trusts; a name it does not know is best taken for a call.
pub fn called_names(sql: &[u8]) -> Vec<&[u8]> {
    let tokens = tokens(sql);
    let mut out = Vec::new();
    for (index, t) in tokens.iter().enumerate() {
        let named = t.0 == Token::Word || (t.0 == Token::Other && sql.get(t.1) == Some(&b'"'));
        // PostgreSQL allows blanks (and comments) between a function's name and its `(`.
        let opens = tokens
            .get(index + 1)
            .is_some_and(|n| n.0 == Token::Open && sql.get(n.1) == Some(&b'('));
        if !named || !opens {
            continue;
        }
        // Back over `qualifier.` parts: `pg_catalog.lower`, `"s"."f"`.
        let mut start = t.1;
        let mut at = index;
        while at >= 2
            && sql.get(tokens[at - 1].1..tokens[at - 1].2) == Some(&b"."[..])
            && matches!(tokens[at - 2].0, Token::Word | Token::Other)
        {
            at -= 2;
            start = tokens[at].1;
        }
        out.push(&sql[start..t.2]);
    }
    out
}

/// The index of the outer query's SELECT: the first token, or the first at depth 0 after a
/// `WITH` list of common table expressions (`name [(columns)] AS [NOT] [MATERIALIZED] (...)`,
/// their SEARCH and CYCLE clauses). `None` for anything else (VALUES, TABLE, a parenthesised
/// query, unbalanced parentheses).
fn main_select(sql: &[u8], tokens: &[(Token, usize, usize)]) -> Option<usize> {
    let word = |t: &(Token, usize, usize), w: &[u8]| {
        t.0 == Token::Word && sql[t.1..t.2].eq_ignore_ascii_case(w)
    };
    let first = tokens.first()?;
    if word(first, b"SELECT") {
        return Some(0);
    }
    if !word(first, b"WITH") {
        return None;
    }
    let mut depth = 0i32;
    for (index, t) in tokens.iter().enumerate().skip(1) {
        match t.0 {
            Token::Open => depth += 1,
            Token::Close => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            Token::Semicolon => return None,
            Token::Word if depth == 0 && word(t, b"SELECT") => return Some(index),
            _ => {}
        }
    }
    None
}

/// One ORDER BY item's tokens without its direction and null ordering.
fn sort_item(sql: &[u8], tokens: &[&(Token, usize, usize)]) -> Option<SortItem> {
    let word = |t: &&(Token, usize, usize), w: &[u8]| {
        t.0 == Token::Word && sql[t.1..t.2].eq_ignore_ascii_case(w)
    };
    let mut tokens = tokens;
    if let [rest @ .., nulls, last] = tokens
        && word(nulls, b"NULLS")
        && (word(last, b"FIRST") || word(last, b"LAST"))
    {
        tokens = rest;
    }
    if let [rest @ .., last] = tokens
        && (word(last, b"ASC") || word(last, b"DESC"))
    {
        tokens = rest;
    }
    let (first, last) = (tokens.first()?, tokens.last()?);
    let range = first.1..last.2;
    let text = &sql[range.clone()];
    let key = match tokens {
        [(Token::Other, ..)] if text.iter().all(u8::is_ascii_digit) => std::str::from_utf8(text)
            .ok()?
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .map(OrderKey::Position),
        [(Token::Word, ..)] => {
            identifier(sql, range.start).map(|(name, _, _)| OrderKey::Name(name))
        }
        [(Token::Other, ..)] if text.first() == Some(&b'"') => {
            identifier(sql, range.start).map(|(name, _, _)| OrderKey::Name(name))
        }
        _ => None,
    };
    Some(SortItem { range, key })
}

/// The index right after the `BY` of the first top-level ORDER BY.
fn order_by_end(sql: &[u8]) -> Option<usize> {
    let (mut i, mut depth) = (0usize, 0i32);
    let mut previous_was_order = false;
    while i < sql.len() {
        match sql[i] {
            b'\'' | b'"' => {
                i = skip_quoted(sql, i);
                previous_was_order = false;
            }
            b'-' if sql[i..].starts_with(b"--") => i = skip_blank(sql, i),
            b'/' if sql[i..].starts_with(b"/*") => i = skip_blank(sql, i),
            b'$' => {
                i = skip_dollar(sql, i);
                previous_was_order = false;
            }
            b'(' => {
                depth += 1;
                i += 1;
                previous_was_order = false;
            }
            b')' => {
                depth -= 1;
                i += 1;
                previous_was_order = false;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_') {
                    i += 1;
                }
                let word = &sql[start..i];
                if depth <= 0 && previous_was_order && word.eq_ignore_ascii_case(b"BY") {
                    return Some(i);
                }
                previous_was_order = depth <= 0 && word.eq_ignore_ascii_case(b"ORDER");
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                i += 1;
                previous_was_order = false;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn shareable_statements_are_plain_reads_and_writes_alone() {
        for yes in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "  select 1",
            "UPDATE t SET v = v + 1 WHERE id = $1",
            "insert into t values (1)",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x",
            "SELECT 1;",
            "SELECT $1::int + $2",
        ] {
            assert!(super::shareable_alone(yes.as_bytes()), "{yes}");
        }
        for no in [
            "BEGIN",
            "COMMIT",
            "SET search_path = x",
            "SELECT set_config('search_path', 'x', false) FROM t",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "COPY t FROM STDIN",
            "COPY t TO STDOUT",
            "LISTEN c",
            "SELECT pg_advisory_lock(1)",
            "CREATE TEMP TABLE x (a int)",
            "CALL p()",
            "DO $$ BEGIN PERFORM 1; END $$",
            "FETCH 1 FROM c",
            "SELECT 1; SELECT 2",
            "LOCK TABLE t",
            "TRUNCATE t",
            "CREATE TABLE t (a int)",
            "SELECT * INTO x FROM t",
            "VACUUM",
            "",
            r"SELECT E'\''; BEGIN",
            "SELECT 1 AS a$b$; BEGIN",
            "SELECT $$x$$",
            r#"SELECT "set_config"('search_path', 'x', false)"#,
            r#"SELECT "pg_advisory_lock"(1)"#,
            "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'",
            "WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x",
            "WITH x AS (SELECT 1) SELECT * INTO t FROM x",
            "SELECT lo_open(1, 2)",
        ] {
            assert!(!super::shareable_alone(no.as_bytes()), "{no}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_split_fast_path_agrees_with_the_walk(
            text in "[a-z ();'\"$/*-]{0,40}",
        ) {
            proptest::prop_assert_eq!(
                super::split_statements(text.as_bytes()),
                super::split_walk(text.as_bytes())
            );
        }
    }

    #[test]
    fn pins_what_a_pooled_connection_cannot_share() {
        use super::{Pin, pins};
        assert_eq!(pins(b"LISTEN jobs"), Some(Pin::Listen));
        assert_eq!(pins(b"  listen \"x\""), Some(Pin::Listen));
        assert_eq!(pins(b"select pg_advisory_lock(1)"), Some(Pin::AdvisoryLock));
        assert_eq!(
            pins(b"SELECT PG_TRY_ADVISORY_LOCK_SHARED(1, 2)"),
            Some(Pin::AdvisoryLock)
        );
        assert_eq!(pins(b"select pg_advisory_xact_lock(1)"), None);
        assert_eq!(pins(b"select 'pg_advisory_lock(1)'"), None);
        assert_eq!(pins(b"CREATE TEMP TABLE t (a int)"), Some(Pin::TempObject));
        assert_eq!(
            pins(b"create temporary table t as select 1"),
            Some(Pin::TempObject)
        );
        assert_eq!(
            pins(b"CREATE OR REPLACE TEMP VIEW v AS SELECT 1"),
            Some(Pin::TempObject)
        );
        assert_eq!(pins(b"create table temp (a int)"), None);
        assert_eq!(
            pins(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(Pin::HoldCursor)
        );
        assert_eq!(pins(b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1"), None);
        assert_eq!(pins(b"DECLARE c CURSOR FOR SELECT 'with hold'"), None);
        assert_eq!(pins(b"select 1"), None);
    }

    use super::*;

    #[test]
    fn line_comments_end_at_a_carriage_return_as_in_postgresql() {
        let hidden = b"SELECT id FROM t ORDER BY lower(v) --x\r; COMMIT; DELETE FROM t";
        assert_eq!(split_statements(hidden).len(), 3);
        assert_eq!(classify(b"--x\rDELETE FROM t"), Class::Dml);
        assert_eq!(sort_items(hidden), None);
        assert!(!has_top_level_order_by(b"SELECT 1 --ORDER\rBY 1"));
        assert!(
            fingerprint(b"SELECT 1 --x\rFROM t", 1024)
                .1
                .contains("from t")
        );
    }

    #[test]
    fn sort_items_read_a_plain_select_for_a_re_run_with_its_keys() {
        let read = |sql: &str| {
            sort_items(sql.as_bytes()).map(|s| {
                let items: Vec<(String, Option<OrderKey>)> = s
                    .items
                    .iter()
                    .map(|i| (sql[i.range.clone()].to_string(), i.key.clone()))
                    .collect();
                (sql[..s.list_end].trim_end().to_string(), items)
            })
        };
        let name = |n: &str| Some(OrderKey::Name(n.into()));
        assert_eq!(
            read("SELECT id FROM t ORDER BY lower(v) DESC NULLS LAST, 2, k, t.k ASC LIMIT 5"),
            Some((
                "SELECT id".into(),
                vec![
                    ("lower(v)".into(), None),
                    ("2".into(), Some(OrderKey::Position(1))),
                    ("k".into(), name("k")),
                    ("t.k".into(), None),
                ]
            ))
        );
        assert_eq!(
            read(
                "select a, extract(year from d) as y from t where x in (select 1 from u order by 1) order by v || '' ;"
            ),
            Some((
                "select a, extract(year from d) as y".into(),
                vec![("v || ''".into(), None)]
            ))
        );
        assert_eq!(
            read("SELECT a IS NOT DISTINCT FROM b AS same, c is distinct from d FROM t ORDER BY e"),
            Some((
                "SELECT a IS NOT DISTINCT FROM b AS same, c is distinct from d".into(),
                vec![("e".into(), name("e"))]
            ))
        );
        assert_eq!(
            read("SELECT 1 AS x ORDER BY \"X\""),
            Some(("SELECT 1 AS x".into(), vec![("\"X\"".into(), name("X"))]))
        );
        assert_eq!(
            read("WITH RECURSIVE x (a) AS MATERIALIZED (SELECT 1 FROM u ORDER BY 1), y AS (SELECT 2) SELECT a FROM x ORDER BY a + 1"),
            Some((
                "WITH RECURSIVE x (a) AS MATERIALIZED (SELECT 1 FROM u ORDER BY 1), y AS (SELECT 2) SELECT a".into(),
                vec![("a + 1".into(), None)]
            ))
        );
        for no in [
            "SELECT id FROM t",
            "SELECT DISTINCT id FROM t ORDER BY id",
            "SELECT id FROM t UNION SELECT id FROM u ORDER BY 1",
            "WITH x AS (SELECT 1) SELECT DISTINCT * FROM x ORDER BY 1",
            "WITH x AS (SELECT 1) VALUES (1) ORDER BY 1",
            "(SELECT 1) ORDER BY 1",
            "SELECT id INTO n FROM t ORDER BY id",
            "SELECT id FROM t ORDER BY id USING <",
            "SELECT FROM t ORDER BY id",
            "SELECT id FROM t ORDER BY id; SELECT 2",
            "SELECT E'\\'' FROM t ORDER BY 1",
            "SELECT id FROM t ORDER BY (id",
            "VALUES (1) ORDER BY 1",
        ] {
            assert_eq!(read(no), None, "{no}");
        }
    }

    #[test]
    fn copy_is_read_once_with_its_direction() {
        for (text, expected) in [
            ("COPY t FROM STDIN", Some(Copy::FromStdin)),
            (
                "  copy t (a, b) from stdin with (format csv)",
                Some(Copy::FromStdin),
            ),
            ("/* c */ COPY t FROM STDIN", Some(Copy::FromStdin)),
            (
                "COPY t FROM '/srv/t.csv' WITH (FORMAT csv)",
                Some(Copy::FromServer),
            ),
            (
                "COPY t FROM PROGRAM 'cat /srv/t.csv'",
                Some(Copy::FromServer),
            ),
            ("COPY t TO STDOUT", Some(Copy::To)),
            ("COPY (SELECT * FROM t) TO STDOUT", Some(Copy::To)),
            ("SELECT 'COPY t FROM STDIN'", None),
            ("COPYRIGHT", None),
            ("", None),
        ] {
            assert_eq!(copy(text.as_bytes()), expected, "{text}");
        }
    }

    #[test]
    fn reads_order_by_keys() {
        use OrderKey::{Name, Position};
        let name = |n: &str| Name(n.into());
        let cases: &[(&str, Option<Vec<OrderKey>>)] = &[
            ("SELECT a, b FROM t ORDER BY a", Some(vec![name("a")])),
            (
                "select * from t order by T.Id desc nulls last, 2 , \"Mixed\" asc limit 5",
                Some(vec![name("id"), Position(1), name("Mixed")]),
            ),
            ("SELECT 1 ORDER BY 1;", Some(vec![Position(0)])),
            ("SELECT a FROM t ORDER BY lower(a)", None),
            ("SELECT a FROM t ORDER BY a + 1", None),
            ("SELECT a FROM t ORDER BY a COLLATE \"C\"", None),
            ("SELECT a FROM t ORDER BY 0", None),
            ("SELECT a FROM t", None),
            ("SELECT string_agg(a, ',' ORDER BY a) FROM t", None),
            (
                "SELECT a, row_number() OVER (ORDER BY b) FROM t ORDER BY a FOR UPDATE",
                Some(vec![name("a")]),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(order_by_keys(sql.as_bytes()), *want, "{sql}");
        }
    }

    #[test]
    fn classifies_common_statements() {
        let cases: &[(&str, Class)] = &[
            ("SELECT 1", Class::Select),
            (
                "  -- hi\n /* a /* nested */ b */ select * from t",
                Class::Select,
            ),
            ("select * into t2 from t", Class::Ddl),
            (
                "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
                Class::Dml,
            ),
            ("with x as (select 1) select * from x", Class::Select),
            ("insert into t values (1)", Class::Dml),
            ("UPDATE t SET a = 1", Class::Dml),
            ("COPY t FROM STDIN", Class::Dml),
            ("COPY t TO STDOUT", Class::Select),
            ("COPY (SELECT * FROM t) TO STDOUT", Class::Select),
            ("create table t (a int)", Class::Ddl),
            ("ALTER TABLE t ADD b int", Class::Ddl),
            ("BEGIN", Class::Transaction),
            ("commit", Class::Transaction),
            ("SET search_path = x", Class::Session),
            ("EXPLAIN SELECT 1", Class::Select),
            ("EXPLAIN ANALYZE DELETE FROM t", Class::Dml),
            ("", Class::Empty),
            (" -- only a comment", Class::Empty),
            ("LOCK TABLE t", Class::Other),
        ];
        for (sql, want) in cases {
            assert_eq!(classify(sql.as_bytes()), *want, "{sql}");
        }
    }

    #[test]
    fn splits_at_top_level_semicolons() {
        let sql = b"BEGIN; INSERT INTO t VALUES ('a;b'); SELECT $$;$$; ; COMMIT";
        let parts: Vec<&str> = split_statements(sql)
            .into_iter()
            .map(|r| std::str::from_utf8(&sql[r]).unwrap().trim())
            .collect();
        assert_eq!(
            parts,
            [
                "BEGIN",
                "INSERT INTO t VALUES ('a;b')",
                "SELECT $$;$$",
                "COMMIT"
            ]
        );
    }

    #[test]
    fn fingerprints_ignore_literals_and_spacing() {
        let (a, ta) = fingerprint(b"SELECT * FROM t WHERE id = 42 AND name = 'bob'", 200);
        let (b, _) = fingerprint(
            b"select *  from t\n where id = 7 and name = 'alice' -- x",
            200,
        );
        let (c, _) = fingerprint(b"SELECT * FROM t WHERE id = $1 AND name = $2", 200);
        let (d, _) = fingerprint(b"SELECT * FROM u WHERE id = 1 AND name = 'x'", 200);
        assert_eq!(ta, "select * from t where id = ? and name = ?");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn never_panics_on_odd_bytes() {
        for sql in [
            &b"'"[..],
            b"$",
            b"$a",
            b"/*",
            b"--",
            b"\"",
            b"$1$",
            b"\xff\xfe",
            b"(((",
            b"PREPARE",
            b"PREPARE \"",
            b"PREPARE \"a\"\"",
            b"PREPARE p (",
            b"PREPARE p ())) AS",
            b"EXECUTE",
            b"EXPLAIN (",
            b"EXPLAIN ())",
            b"DEALLOCATE PREPARE",
            b"SELECT set_config(",
            b"SELECT set_config('a'",
            b"SELECT set_config(')'",
            b"SET",
            b"SET SESSION",
            b"RESET SESSION",
            b"SET a.",
            b"ROLLBACK AND",
            b"PREPARE \xff\xfe AS SELECT",
        ] {
            let _ = prepared(sql);
            let _ = setting(sql);
            let _ = transaction(sql);
            let _ = classify(sql);
            let _ = split_statements(sql);
            let _ = fingerprint(sql, 10);
        }
    }

    #[test]
    fn classifies_explain_options_prepare_transaction_and_set_config() {
        let cases: &[(&str, Class)] = &[
            (
                "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)",
                Class::Dml,
            ),
            ("explain (analyze false) delete from t", Class::Select),
            ("EXPLAIN (FORMAT JSON) DELETE FROM t", Class::Select),
            ("EXPLAIN ANALYZE VERBOSE UPDATE t SET a = 1", Class::Dml),
            ("EXPLAIN SELECT analyze FROM t", Class::Select),
            ("EXPLAIN ANALYZE", Class::Select),
            ("PREPARE TRANSACTION 'gid-1'", Class::Transaction),
            ("COMMIT PREPARED 'gid-1'", Class::Transaction),
            // Its class is its statement's, read by the mirror's router, not here.
            ("PREPARE p AS INSERT INTO t VALUES (1)", Class::Other),
            ("EXECUTE p", Class::Other),
            ("DEALLOCATE p", Class::Session),
            (
                "SELECT set_config('search_path', 'app', false)",
                Class::Session,
            ),
            (
                "select pg_catalog.set_config('a.b', 'x', true), set_config('c.d', 'y', true)",
                Class::Session,
            ),
            (
                "SELECT set_config(k, v, false) FROM settings",
                Class::Select,
            ),
            ("SELECT current_setting('search_path')", Class::Select),
        ];
        for (sql, want) in cases {
            assert_eq!(classify(sql.as_bytes()), *want, "{sql}");
        }
        // Nested EXPLAINs (invalid SQL) cannot recurse without bound.
        let deep = "EXPLAIN ANALYZE ".repeat(200_000) + "INSERT INTO t VALUES (1)";
        assert_eq!(classify(deep.as_bytes()), Class::Other);
    }

    /// `Prepared::Prepare` for `name`, its body starting after `head`.
    fn prepare_of(name: &str, head: &str) -> Option<Prepared> {
        Some(Prepared::Prepare {
            name: name.into(),
            body: head.len(),
        })
    }

    fn execute_of(name: &str, runs: bool) -> Option<Prepared> {
        Some(Prepared::Execute {
            name: name.into(),
            runs,
        })
    }

    fn deallocate_of(name: &str) -> Option<Prepared> {
        Some(Prepared::Deallocate { name: name.into() })
    }

    fn assert_prepared(cases: &[(&str, Option<Prepared>)]) {
        for (sql, want) in cases {
            assert_eq!(prepared(sql.as_bytes()), *want, "{sql}");
        }
    }

    #[test]
    fn reads_sql_level_prepare() {
        assert_prepared(&[
            (
                "PREPARE ins(int) AS INSERT",
                prepare_of("ins", "PREPARE ins(int) AS "),
            ),
            (
                "prepare Ins (int, \"My Type\"(3), numeric(10,2))\n as\tINSERT",
                prepare_of(
                    "ins",
                    "prepare Ins (int, \"My Type\"(3), numeric(10,2))\n as\t",
                ),
            ),
            (
                "PREPARE \"Foo\"\"Bar\" AS SELECT 1",
                prepare_of("Foo\"Bar", "PREPARE \"Foo\"\"Bar\" AS "),
            ),
            (
                "/* c */ PREPARE transaction AS SELECT 1",
                prepare_of("transaction", "/* c */ PREPARE transaction AS "),
            ),
            ("PREPARE TRANSACTION 'x'", None),
            ("PREPARE p SELECT 1", None),
            ("PREPARE p AS", None),
            ("PREPARE p(int AS SELECT 1", None),
            ("PREPARE \"\" AS SELECT 1", None),
            ("SELECT 1", None),
        ]);
    }

    #[test]
    fn reads_sql_level_execute() {
        assert_prepared(&[
            ("EXECUTE ins(1)", execute_of("ins", true)),
            ("execute INS ( 'a;b' )", execute_of("ins", true)),
            ("EXECUTE \"Foo\"", execute_of("Foo", true)),
            ("EXECUTE ins 1", None),
            ("EXPLAIN ANALYZE EXECUTE ins(1)", execute_of("ins", true)),
            (
                "EXPLAIN (ANALYZE off) EXECUTE ins(1)",
                execute_of("ins", false),
            ),
            ("EXPLAIN EXECUTE ins(1)", execute_of("ins", false)),
            ("EXPLAIN SELECT 1", None),
            ("EXECUTE ins;", execute_of("ins", true)),
            ("EXECUTE ins(1) ;;", execute_of("ins", true)),
            ("EXECUTE ins; SELECT 1", None),
        ]);
        // Names are truncated like PostgreSQL's identifiers (63 bytes).
        let long = "p".repeat(80);
        assert_eq!(
            prepared(format!("EXECUTE {long}").as_bytes()),
            execute_of(&long[..63], true)
        );
    }

    #[test]
    fn reads_sql_level_deallocate_and_discard() {
        assert_prepared(&[
            ("DEALLOCATE sel", deallocate_of("sel")),
            ("deallocate prepare \"Sel\"", deallocate_of("Sel")),
            ("DEALLOCATE prepare", deallocate_of("prepare")),
            ("DEALLOCATE ALL", Some(Prepared::DeallocateAll)),
            ("DEALLOCATE PREPARE all", Some(Prepared::DeallocateAll)),
            ("DEALLOCATE \"all\"", deallocate_of("all")),
            ("DEALLOCATE a b", None),
            ("DEALLOCATE sel;\n", deallocate_of("sel")),
            ("DEALLOCATE PREPARE sel;", deallocate_of("sel")),
            ("DISCARD ALL", Some(Prepared::DiscardAll)),
            ("DISCARD ALL ; -- end", Some(Prepared::DiscardAll)),
            ("DISCARD PLANS", None),
        ]);
    }

    #[test]
    fn reads_create_table_as_execute() {
        assert_prepared(&[
            (
                "CREATE TABLE t2 AS EXECUTE sel(1) WITH NO DATA",
                Some(Prepared::CreateTableAsExecute { name: "sel".into() }),
            ),
            (
                "create temp table if not exists \"T\" (a, \"as\") with (fillfactor=70) \
                 on commit drop as /* q */ execute \"Sel\"",
                Some(Prepared::CreateTableAsExecute { name: "Sel".into() }),
            ),
            ("CREATE TABLE t AS SELECT 1 AS execute FROM x", None),
            ("CREATE TABLE t (a int)", None),
            (
                "CREATE FUNCTION f() RETURNS int AS 'EXECUTE x' LANGUAGE sql",
                None,
            ),
            ("CREATE TABLE t (a int", None),
        ]);
    }

    #[test]
    fn reads_settings_that_outlive_the_transaction() {
        let set = |key: &str| Some(Setting::Set { key: key.into() });
        let cases: &[(&str, Option<Setting>)] = &[
            ("SET search_path = app", set("search_path")),
            ("set SESSION Search_Path to app", set("search_path")),
            ("SET myapp.user_id = 7", set("myapp.user_id")),
            ("SET TIME ZONE 'UTC'", set("timezone")),
            ("SET SCHEMA 'app'", set("search_path")),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                set("characteristics"),
            ),
            ("SET SESSION AUTHORIZATION bob", set("authorization")),
            ("SET LOCAL search_path = app", None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("SET CONSTRAINTS ALL DEFERRED", None),
            (
                "RESET search_path",
                Some(Setting::Reset {
                    key: "search_path".into(),
                }),
            ),
            (
                "RESET SESSION AUTHORIZATION",
                Some(Setting::Reset {
                    key: "authorization".into(),
                }),
            ),
            ("RESET ALL", Some(Setting::ResetAll)),
            ("DISCARD ALL", Some(Setting::ResetAll)),
            ("DISCARD TEMP", None),
            (
                "SELECT set_config('Search_Path', 'app, public', false)",
                set("search_path"),
            ),
            ("SELECT set_config('a.b', 'x', 'off')", set("a.b")),
            ("SELECT set_config('a.b', 'x', true)", None),
            ("SELECT set_config('a.b', 'x', 'on')", None),
            ("SELECT set_config('a.b', 'x')", None),
            (
                "SELECT set_config(k(), 'x', false)",
                set("SELECT set_config(k(), 'x', false)"),
            ),
            ("LISTEN chan", None),
        ];
        for (sql, want) in cases {
            assert_eq!(setting(sql.as_bytes()), *want, "{sql}");
        }
    }

    #[test]
    fn reads_transaction_blocks() {
        let cases: &[(&str, Option<Transaction>)] = &[
            ("BEGIN", Some(Transaction::Begin)),
            (
                "start transaction isolation level serializable",
                Some(Transaction::Begin),
            ),
            ("COMMIT", Some(Transaction::Commit { chain: false })),
            ("END WORK", Some(Transaction::Commit { chain: false })),
            (
                "COMMIT AND CHAIN",
                Some(Transaction::Commit { chain: true }),
            ),
            (
                "COMMIT AND NO CHAIN",
                Some(Transaction::Commit { chain: false }),
            ),
            (
                "PREPARE TRANSACTION 'g'",
                Some(Transaction::Commit { chain: false }),
            ),
            ("ROLLBACK", Some(Transaction::Rollback { chain: false })),
            (
                "abort transaction and chain",
                Some(Transaction::Rollback { chain: true }),
            ),
            ("ROLLBACK TO SAVEPOINT a", None),
            ("ROLLBACK WORK TO a", None),
            ("ROLLBACK PREPARED 'g'", None),
            ("COMMIT PREPARED 'g'", None),
            ("SAVEPOINT a", None),
            ("SELECT 1", None),
        ];
        for (sql, want) in cases {
            assert_eq!(transaction(sql.as_bytes()), *want, "{sql}");
        }
    }

    #[test]
    fn order_by_only_counts_at_the_top_level() {
        assert!(has_top_level_order_by(b"SELECT a FROM t ORDER BY a"));
        assert!(has_top_level_order_by(
            b"select a from t order\n  by 1 desc limit 3"
        ));
        assert!(has_top_level_order_by(
            b"SELECT a FROM t UNION SELECT b FROM u ORDER /* c */ BY 1"
        ));
        assert!(!has_top_level_order_by(
            b"SELECT a FROM (SELECT a FROM t ORDER BY a) x"
        ));
        assert!(!has_top_level_order_by(
            b"SELECT row_number() OVER (ORDER BY a) FROM t"
        ));
        assert!(!has_top_level_order_by(b"SELECT 'ORDER BY' FROM t"));
        assert!(!has_top_level_order_by(b"SELECT \"order\", by FROM t"));
        assert!(!has_top_level_order_by(b"SELECT a FROM t -- ORDER BY a"));
    }
}
