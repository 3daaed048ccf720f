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
    /// SET, RESET, DISCARD and other session state: replayed so later statements behave
    /// the same on the mirror.
    Session,
    /// Empty text (only whitespace and comments).
    Empty,
    /// Anything else (EXECUTE of an SQL-level prepared statement, LOCK, ...).
    Other,
}

/// Skips whitespace and comments; returns the index of the next significant byte.
fn skip_blank(sql: &[u8], mut i: usize) -> usize {
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            i = match memchr::memchr(b'\n', &sql[i..]) {
                Some(n) => i + n + 1,
                None => sql.len(),
            };
        } else if sql[i..].starts_with(b"/*") {
            // PostgreSQL block comments nest.
            let mut depth = 0usize;
            while i < sql.len() {
                if sql[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if sql[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            return i;
        }
    }
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

/// Whether `word` appears as a whole keyword outside quotes, comments and parentheses depth
/// restrictions are not applied (used for WITH ... INSERT and SELECT ... INTO).
fn contains_keyword(sql: &[u8], word: &[u8]) -> bool {
    let mut i = 0;
    while i < sql.len() {
        match sql[i] {
            b'\'' | b'"' => i = skip_quoted(sql, i),
            b'-' if sql[i..].starts_with(b"--") => i = skip_blank(sql, i),
            b'/' if sql[i..].starts_with(b"/*") => i = skip_blank(sql, i),
            b'$' => i = skip_dollar(sql, i),
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

fn skip_quoted(sql: &[u8], i: usize) -> usize {
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
    let mut buf = [0u8; 16];
    let (first, end) = word_at(sql, 0, &mut buf);
    match first {
        b"" => {
            if skip_blank(sql, 0) >= sql.len() {
                Class::Empty
            } else {
                Class::Other
            }
        }
        b"SELECT" => {
            if contains_keyword(&sql[end..], b"INTO") && !contains_keyword(&sql[end..], b"INSERT") {
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
        b"EXPLAIN" => {
            if contains_keyword(&sql[end..], b"ANALYZE")
                || contains_keyword(&sql[end..], b"ANALYSE")
            {
                // EXPLAIN ANALYZE runs the statement: classify what it runs.
                let mut i = end;
                loop {
                    let mut w = [0u8; 16];
                    let (word, next) = word_at(sql, i, &mut w);
                    if word.is_empty() || next >= sql.len() {
                        return Class::Select;
                    }
                    if !matches!(word, b"ANALYZE" | b"ANALYSE" | b"VERBOSE") {
                        return classify(&sql[skip_blank(sql, i)..]);
                    }
                    i = next;
                }
            }
            Class::Select
        }
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
        b"SET" | b"RESET" | b"DISCARD" | b"DEALLOCATE" | b"LISTEN" | b"UNLISTEN" | b"LOAD" => {
            Class::Session
        }
        _ => Class::Other,
    }
}

/// Splits a simple-query string into statements at top-level semicolons (quotes, comments and
/// dollar quoting respected). Returned ranges exclude the semicolons; empty ones are dropped.
pub fn split_statements(sql: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut i, mut depth) = (0usize, 0usize, 0i32);
    while i < sql.len() {
        match sql[i] {
            b'\'' | b'"' => i = skip_quoted(sql, i),
            b'-' if sql[i..].starts_with(b"--") => i = skip_blank(sql, i),
            b'/' if sql[i..].starts_with(b"/*") => i = skip_blank(sql, i),
            b'$' => i = skip_dollar(sql, i),
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
                    return true;
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
    false
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            let _ = classify(sql);
            let _ = split_statements(sql);
            let _ = fingerprint(sql, 10);
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
