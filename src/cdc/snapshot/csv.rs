//! Reading the CSV rows PostgreSQL writes for `COPY ... TO STDOUT (FORMAT csv, NULL '\N')`,
//! which the initial snapshot passes to StarRocks as they come (`BodyFormat::Csv`): only the
//! key columns (the first fields of each row) are parsed, for the DBLog windows.
//!
//! PostgreSQL's CSV: fields separated by `,`; a field holding `,`, `"`, CR or LF, or equal
//! to the NULL string, is enclosed in `"` with every `"` inside doubled; NULL is `\N`
//! unquoted; each row ends with `\n` (one CopyData message per row). StarRocks reads the same
//! with `column_separator: ,` and `enclose: "` (RFC 4180), and takes `\N` as NULL.
//!
//! One value cannot cross: a non-NULL text that is exactly `\N`. PostgreSQL writes it
//! enclosed, `"\N"`, but StarRocks compares a field with `\N` after taking the enclosing
//! quotes off, so it would load NULL. [`holds_null_text`] finds such a row, and the worker
//! then writes the chunk as JSON instead ([`fields`] gives it every value back).
//!
//! Nor does a value that starts with `"` (written `"""...`, e.g. a jsonb string scalar): the
//! `enclose` reader of some StarRocks releases refused such fields ("Value count does not
//! match column count", StarRocks issue 38277, 3.2.2), and a release without `enclose`
//! (before 3.0) keeps the quotes. [`holds_null_text`] finds those rows too; they go as JSON.
//!
//! This module must never accept a row it cannot split exactly: a malformed row is `None`.

use std::borrow::Cow;

/// The fields of one CSV row (its final `\n` optional): `None` for NULL, the value with its
/// quotes taken off otherwise. `None` for a malformed row (an unterminated quote, a quote
/// followed by anything but `,` or the row's end).
pub fn fields(row: &[u8]) -> Option<Vec<Option<Cow<'_, [u8]>>>> {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let (value, next) = field(row, at)?;
        out.push(value);
        match next {
            Some(n) => at = n,
            None => return Some(out),
        }
    }
}

/// Appends the encoded key (`window::encode_key`) of a row whose first `n` fields are its
/// key columns to `out`; false (and `out` as it was) for a malformed row.
pub fn key_into(out: &mut Vec<u8>, row: &[u8], n: usize) -> bool {
    let len = out.len();
    if key_fields(out, row, n).is_none() {
        out.truncate(len);
        return false;
    }
    true
}

fn key_fields(out: &mut Vec<u8>, row: &[u8], n: usize) -> Option<()> {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let mut at = Some(0);
    for _ in 0..n {
        let (value, next) = field(row, at?)?;
        match value {
            Some(v) => out.extend_from_slice(&v),
            None => out.push(1),
        }
        out.push(0);
        at = next;
    }
    Some(())
}

/// Whether a field of the row is the text `\N` (written `"\N"`), which StarRocks would read
/// as NULL, or a value starting with `"` (written `"""...`), which some StarRocks releases
/// misread (see the module's notes). A cheap scan: `"\N"` between separators occurs nowhere
/// else (inside a quoted field its quotes would be doubled).
pub fn holds_null_text(row: &[u8]) -> bool {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    // Most rows hold no quote at all.
    if memchr::memchr(b'"', row).is_none() {
        return false;
    }
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"\\N\""));
    let null_text = FINDER.find_iter(row).any(|i| {
        let before = i == 0 || row[i - 1] == b',';
        let after = i + 4 == row.len() || row[i + 4] == b',';
        before && after
    });
    null_text || starts_a_field_with_a_quote(row)
}

/// Whether a field of `row` is a quoted value whose first character is `"`.
fn starts_a_field_with_a_quote(row: &[u8]) -> bool {
    let mut at = 0;
    while at < row.len() {
        if row[at..].starts_with(b"\"\"\"") {
            return true;
        }
        // Skip this field: past its closing quote if it is quoted, then to the separator.
        let mut i = at;
        if row[i] == b'"' {
            i += 1;
            loop {
                match memchr::memchr(b'"', &row[i..]) {
                    None => return false,
                    Some(q) if row.get(i + q + 1) == Some(&b'"') => i += q + 2,
                    Some(q) => {
                        i += q + 1;
                        break;
                    }
                }
            }
        }
        match memchr::memchr(b',', &row[i..]) {
            Some(c) => at = i + c + 1,
            None => return false,
        }
    }
    false
}

/// One field starting at `at`: its value and where the next one starts (`None` at the end).
#[allow(clippy::type_complexity)]
fn field(row: &[u8], at: usize) -> Option<(Option<Cow<'_, [u8]>>, Option<usize>)> {
    let rest = row.get(at..)?;
    if rest.first() != Some(&b'"') {
        let end = memchr::memchr(b',', rest).unwrap_or(rest.len());
        let value = &rest[..end];
        let next = (end < rest.len()).then_some(at + end + 1);
        let value = (value != b"\\N").then_some(Cow::Borrowed(value));
        return Some((value, next));
    }
    // Enclosed: up to the quote that is not doubled.
    let mut owned: Option<Vec<u8>> = None;
    let mut from = 1;
    loop {
        let q = from + memchr::memchr(b'"', rest.get(from..)?)?;
        if rest.get(q + 1) == Some(&b'"') {
            owned
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&rest[from..=q]);
            from = q + 2;
            continue;
        }
        let value = match owned {
            Some(mut v) => {
                v.extend_from_slice(&rest[from..q]);
                Cow::Owned(v)
            }
            None => Cow::Borrowed(&rest[1..q]),
        };
        return match rest.get(q + 1) {
            None => Some((Some(value), None)),
            Some(b',') => Some((Some(value), Some(at + q + 2))),
            Some(_) => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(row: &[u8]) -> Vec<Option<String>> {
        fields(row)
            .unwrap()
            .into_iter()
            .map(|f| f.map(|v| String::from_utf8(v.into_owned()).unwrap()))
            .collect()
    }

    #[test]
    fn splits_postgresql_csv() {
        assert_eq!(
            text(b"1,\"a,b\",\\N,,\"say \"\"hi\"\"\",\"line\nnext\",\"\\N\",\xc3\xa9\\x\n"),
            vec![
                Some("1".into()),
                Some("a,b".into()),
                None,
                Some(String::new()),
                Some("say \"hi\"".into()),
                Some("line\nnext".into()),
                Some("\\N".into()),
                Some("é\\x".into()),
            ]
        );
        assert_eq!(text(b"\"\"\n"), vec![Some(String::new())]);
        assert!(fields(b"\"open\n").is_none());
        assert!(fields(b"\"a\"b,c\n").is_none());
    }

    #[test]
    fn keys_match_the_window_encoding() {
        use crate::cdc::snapshot::window::encode_key;
        let mut key = b"x".to_vec();
        assert!(key_into(&mut key, b"\"a,\"\"b\",7,rest\n", 2));
        let want = encode_key([Some(&b"a,\"b"[..]), Some(&b"7"[..])].into_iter());
        assert_eq!(key[1..], want[..]);
        let before = key.clone();
        assert!(!key_into(&mut key, b"\"a\n", 1));
        assert!(
            !key_into(&mut key, b"1\n", 2),
            "fewer fields than key columns"
        );
        assert_eq!(key, before, "a malformed row leaves the buffer as it was");
    }

    #[test]
    fn finds_the_text_that_reads_as_null() {
        assert!(
            holds_null_text(b"1,\"\"\"active\"\"\"\n"),
            "a value starting with a quote"
        );
        assert!(holds_null_text(b"\"\"\"a\"\" b\",2\n"));
        assert!(
            !holds_null_text(b"1,\"{\"\"a\"\": 1}\"\n"),
            "quotes inside a value"
        );
        assert!(
            !holds_null_text(b"\"x,\"\"\",2\n"),
            "a quote at a value's end"
        );
        assert!(!holds_null_text(b"\"\",\"x\"\n"), "an empty quoted value");
        assert!(holds_null_text(b"1,\"\\N\"\n"));
        assert!(holds_null_text(b"\"\\N\",2\n"));
        assert!(!holds_null_text(b"1,\\N\n"), "a real NULL");
        assert!(
            !holds_null_text(b"1,\"x,\"\"\\N\"\"\"\n"),
            "inside a quoted value"
        );
    }
}
