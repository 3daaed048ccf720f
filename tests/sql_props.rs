//! Statement text comes from clients, so the byte scanners that read it (classification,
//! splitting, fingerprints, SQL-level PREPARE/EXECUTE, settings, transaction control) must
//! return for any input, never panic or recurse without bound.

use pgprism::sql;
use proptest::prelude::*;

fn scan_all(bytes: &[u8]) {
    let _ = sql::classify(bytes);
    let _ = sql::prepared(bytes);
    let _ = sql::setting(bytes);
    let _ = sql::transaction(bytes);
    let _ = sql::fingerprint(bytes, 256);
    let _ = sql::has_top_level_order_by(bytes);
    for range in sql::split_statements(bytes) {
        assert!(range.start <= range.end && range.end <= bytes.len());
        let part = &bytes[range];
        let _ = sql::classify(part);
        let _ = sql::prepared(part);
    }
}

/// Fragments SQL is made of, so random inputs reach the scanners' deeper paths.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::sample::select(vec![
            "PREPARE ",
            "EXECUTE ",
            "DEALLOCATE ",
            "EXPLAIN ",
            "ANALYZE ",
            "(",
            ")",
            ";",
            "'",
            "\"",
            "$$",
            "$a$",
            "--",
            "/*",
            "*/",
            "\n",
            " AS ",
            "SET ",
            "LOCAL ",
            "BEGIN",
            "COMMIT",
            "WITH ",
            "INSERT ",
            "SELECT ",
            "ORDER BY ",
            "COPY ",
            "FROM ",
            "TO ",
            "set_config(",
            "true",
            "E'\\\\",
            "\\\\",
            "ALL",
            "DISCARD ",
            "SAVEPOINT ",
            "é",
            "\0",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        scan_all(&bytes);
    }

    #[test]
    fn sql_like_fragments_never_panic(parts in proptest::collection::vec(fragment(), 0..40)) {
        scan_all(&parts.concat());
    }
}

#[test]
fn deep_nesting_returns() {
    // Each of these once could (or could, if recursive) run out of stack.
    for unit in [
        "EXPLAIN ANALYZE ",
        "(",
        "/*",
        "WITH a AS (",
        "EXPLAIN ANALYZE EXECUTE ",
    ] {
        scan_all(unit.repeat(200_000).as_bytes());
    }
}
