//! Normalisation and selection rules compiled once from `[compare]`: which statements are
//! compared or sent to the primary only, which columns are ignored, float tolerance and type
//! equivalences. Shared read-only by every session of a shard.

use regex::RegexSet;

use super::CompareError;
use crate::config::{CompareConfig, ConfigError};

/// How one column's values enter a row hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnRule {
    /// Bytes as sent.
    Raw,
    /// Ignored column: not hashed.
    Skip,
    /// float4/float8/numeric in text: parsed and quantised to the tolerance.
    FloatText,
    FloatBinary4,
    FloatBinary8,
    /// A numeric type in a declared equivalence, text format: canonical text (`5.00` = `5`).
    NumericText,
    /// A number type (by OID) in a declared equivalence, binary format: decoded to canonical
    /// text, so int8 `5` and numeric `5.00` hash alike whatever their wire formats.
    NumberBinary(u32),
    /// Same, decoded and then quantised to the float tolerance.
    FloatNumberBinary(u32),
}

pub struct Rules {
    exclude: RegexSet,
    primary_only: RegexSet,
    ignore_columns: RegexSet,
    tolerance: f64,
    /// Pairs of type OIDs declared equal (both orders).
    equivalent: Vec<(u32, u32)>,
    pub sample_rows_max: usize,
    /// `compare.calibrate`: writes run on the primary only.
    calibrate: bool,
}

pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const NUMERIC: u32 = 1700;

/// Type names accepted in `type-equivalences`, with their OIDs.
const TYPES: &[(&str, u32)] = &[
    ("bool", 16),
    ("bytea", 17),
    ("char", 18),
    ("name", 19),
    ("int8", 20),
    ("int2", 21),
    ("int4", 23),
    ("text", 25),
    ("oid", 26),
    ("json", 114),
    ("xml", 142),
    ("float4", FLOAT4),
    ("float8", FLOAT8),
    ("money", 790),
    ("bpchar", 1042),
    ("varchar", 1043),
    ("date", 1082),
    ("time", 1083),
    ("timestamp", 1114),
    ("timestamptz", 1184),
    ("interval", 1186),
    ("timetz", 1266),
    ("numeric", NUMERIC),
    ("uuid", 2950),
    ("jsonb", 3802),
];

fn type_oid(name: &str) -> Option<u32> {
    let name = name.trim().to_ascii_lowercase();
    let name = match name.as_str() {
        "bigint" => "int8",
        "integer" | "int" => "int4",
        "smallint" => "int2",
        "real" => "float4",
        "double precision" | "double" => "float8",
        "decimal" => "numeric",
        "boolean" => "bool",
        "character varying" => "varchar",
        other => other,
    };
    if let Ok(oid) = name.parse::<u32>() {
        return Some(oid);
    }
    TYPES.iter().find(|(n, _)| *n == name).map(|(_, o)| *o)
}

/// A type's name for reports (`oid 1234` when unknown).
pub fn type_name(oid: u32) -> String {
    TYPES
        .iter()
        .find(|(_, o)| *o == oid)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| format!("oid {oid}"))
}

/// `int8=numeric` → the two OIDs.
pub fn parse_equivalence(pair: &str) -> Result<(u32, u32), CompareError> {
    let (a, b) = pair
        .split_once('=')
        .ok_or_else(|| CompareError::Equivalence {
            pair: pair.to_string(),
        })?;
    let oid = |t: &str| {
        type_oid(t).ok_or_else(|| CompareError::UnknownType {
            name: t.trim().to_string(),
        })
    };
    Ok((oid(a)?, oid(b)?))
}

fn is_numeric(oid: u32) -> bool {
    matches!(oid, 20 | 21 | 23 | 26 | FLOAT4 | FLOAT8 | NUMERIC)
}

/// Checks `[compare]`'s patterns and type names, naming the key (`config` is a leaf that
/// knows no regex engine and no type table: this runs at start-up and in `pgprism check`).
pub fn validate(cfg: &CompareConfig) -> Result<(), ConfigError> {
    for (key, list) in [
        ("compare.exclude-patterns", &cfg.exclude_patterns),
        ("compare.primary-only-patterns", &cfg.primary_only_patterns),
        ("compare.ignore-columns", &cfg.ignore_columns),
    ] {
        for (i, pattern) in list.iter().enumerate() {
            regex::Regex::new(pattern)
                .map_err(|e| ConfigError::key(&format!("{key}[{i}]"), e.to_string()))?;
        }
    }
    for (i, pair) in cfg.type_equivalences.iter().enumerate() {
        parse_equivalence(pair)
            .map_err(|e| ConfigError::invalid(&format!("compare.type-equivalences[{i}]"), &e))?;
    }
    Ok(())
}

/// Whether any statement of `text` writes (or locks rows), as the ordered dispatch reads it.
fn writes(text: &str) -> bool {
    crate::sql::split_statements(text.as_bytes())
        .into_iter()
        .filter_map(|r| text.get(r))
        .any(|one| {
            super::footprint::scan(one, crate::sql::classify(one.as_bytes()))
                .footprint
                .write
        })
}

impl Rules {
    /// Compiles the rules; the config was validated, so errors here are reported, not fatal.
    pub fn new(cfg: &CompareConfig) -> Result<Rules, CompareError> {
        let set = |key: &'static str, list: &[String]| {
            RegexSet::new(list).map_err(|source| CompareError::Pattern { key, source })
        };
        let mut equivalent = Vec::new();
        for pair in &cfg.type_equivalences {
            let (a, b) = parse_equivalence(pair)?;
            equivalent.push((a, b));
            equivalent.push((b, a));
        }
        Ok(Rules {
            exclude: set("compare.exclude-patterns", &cfg.exclude_patterns)?,
            primary_only: set("compare.primary-only-patterns", &cfg.primary_only_patterns)?,
            ignore_columns: set("compare.ignore-columns", &cfg.ignore_columns)?,
            tolerance: cfg.float_tolerance,
            equivalent,
            sample_rows_max: cfg.sample_rows_max,
            calibrate: cfg.calibrate,
        })
    }

    pub fn excluded(&self, statement: &str) -> bool {
        !self.exclude.is_empty() && self.exclude.is_match(statement)
    }

    /// Whether `statement` runs on the primary only: it matches `compare.primary-only-patterns`,
    /// or it writes while calibrating (the shadow is the primary itself, so a write would run
    /// twice there).
    pub fn primary_only(&self, statement: &str) -> bool {
        (!self.primary_only.is_empty() && self.primary_only.is_match(statement))
            || (self.calibrate && writes(statement))
    }

    pub fn routes(&self) -> bool {
        !self.primary_only.is_empty() || self.calibrate
    }

    /// The two column types compare equal (same OID or declared equivalent).
    pub fn same_type(&self, a: u32, b: u32) -> bool {
        a == b || self.equivalent.contains(&(a, b))
    }

    pub fn column_rule(&self, name: &str, oid: u32, binary: bool) -> ColumnRule {
        if !self.ignore_columns.is_empty() && self.ignore_columns.is_match(name) {
            return ColumnRule::Skip;
        }
        let equivalent = is_numeric(oid) && self.equivalent.iter().any(|&(a, _)| a == oid);
        if self.tolerance > 0.0 {
            // Numbers declared equivalent to a float or numeric column are quantised alike.
            if equivalent {
                return if binary {
                    ColumnRule::FloatNumberBinary(oid)
                } else {
                    ColumnRule::FloatText
                };
            }
            match (oid, binary) {
                (FLOAT4 | FLOAT8 | NUMERIC, false) => return ColumnRule::FloatText,
                (FLOAT4, true) => return ColumnRule::FloatBinary4,
                (FLOAT8, true) => return ColumnRule::FloatBinary8,
                (NUMERIC, true) => return ColumnRule::FloatNumberBinary(NUMERIC),
                _ => {}
            }
        }
        if equivalent {
            return if binary {
                ColumnRule::NumberBinary(oid)
            } else {
                ColumnRule::NumericText
            };
        }
        ColumnRule::Raw
    }

    /// A float snapped to the tolerance grid, as the integer grid index (NaN and infinities
    /// keep their own bit patterns).
    pub fn quantise(&self, v: f64) -> u64 {
        if !v.is_finite() || self.tolerance <= 0.0 {
            return v.to_bits();
        }
        let q = (v / self.tolerance).round();
        // -0.0 and 0.0 are the same grid point.
        if q == 0.0 { 0 } else { q.to_bits() }
    }
}

pub fn float_value(rule: ColumnRule, bytes: &[u8]) -> Option<f64> {
    match rule {
        ColumnRule::FloatText => std::str::from_utf8(bytes).ok()?.trim().parse::<f64>().ok(),
        ColumnRule::FloatBinary4 => Some(f32::from_be_bytes(bytes.try_into().ok()?) as f64),
        ColumnRule::FloatBinary8 => Some(f64::from_be_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

/// A binary-format number of type `oid` (int2/4/8, oid, float4/8, numeric) as the text
/// PostgreSQL would send for it (before [`canonical_number`]). `false`: not a number type or
/// malformed bytes (the caller hashes them raw).
pub fn binary_number_text(oid: u32, bytes: &[u8], out: &mut String) -> bool {
    use std::fmt::Write;
    let float = |out: &mut String, v: f64| {
        if v.is_nan() {
            out.push_str("NaN");
        } else if v.is_infinite() {
            out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            let _ = write!(out, "{v}");
        }
    };
    match (oid, bytes.len()) {
        (21, 2) => {
            let _ = write!(out, "{}", i16::from_be_bytes([bytes[0], bytes[1]]));
        }
        (23, 4) => {
            let _ = write!(
                out,
                "{}",
                i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
            );
        }
        (26, 4) => {
            let _ = write!(
                out,
                "{}",
                u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
            );
        }
        (20, 8) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            let _ = write!(out, "{}", i64::from_be_bytes(b));
        }
        (FLOAT4, 4) => float(
            out,
            f64::from(f32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        ),
        (FLOAT8, 8) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            float(out, f64::from_be_bytes(b));
        }
        (NUMERIC, _) => return numeric_text(bytes, out),
        _ => return false,
    }
    true
}

/// numeric's binary form: ndigits, weight (of the first base-10000 digit), sign, dscale, then
/// the base-10000 digits.
fn numeric_text(bytes: &[u8], out: &mut String) -> bool {
    use std::fmt::Write;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (Some(n), Some(weight), Some(sign)) = (u16_at(0), u16_at(2), u16_at(4)) else {
        return false;
    };
    let (n, weight) = (usize::from(n), i32::from(weight as i16));
    if bytes.len() != 8 + 2 * n {
        return false;
    }
    match sign {
        0xC000 => out.push_str("NaN"),
        0xD000 => out.push_str("Infinity"),
        0xF000 => out.push_str("-Infinity"),
        0x0000 | 0x4000 => {
            let digit = |i: i32| -> u16 {
                if i >= 0 && (i as usize) < n {
                    u16_at(8 + 2 * i as usize).unwrap_or(0)
                } else {
                    0
                }
            };
            if (0..n as i32).any(|i| digit(i) > 9999) {
                return false;
            }
            if sign == 0x4000 && n > 0 {
                out.push('-');
            }
            if weight < 0 {
                out.push('0');
            } else {
                for i in 0..=weight {
                    let _ = if i == 0 {
                        write!(out, "{}", digit(i))
                    } else {
                        write!(out, "{:04}", digit(i))
                    };
                }
            }
            let last = n as i32 - 1;
            if last > weight {
                out.push('.');
                for i in (weight + 1)..=last {
                    let _ = write!(out, "{:04}", digit(i));
                }
            }
        }
        _ => return false,
    }
    true
}

/// `5.00` → `5`, `-0` → `0`, `1.50` → `1.5`: numbers that are equal compare equal across
/// int8 and numeric.
pub fn canonical_number(bytes: &[u8]) -> &[u8] {
    let mut text = bytes;
    if memchr::memchr(b'.', text).is_some() && !text.contains(&b'e') && !text.contains(&b'E') {
        while let [rest @ .., b'0'] = text {
            text = rest;
        }
        if let [rest @ .., b'.'] = text {
            text = rest;
        }
    }
    if text == b"-0" { b"0" } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key_of_a_bad_pattern_or_type() {
        let bad = CompareConfig {
            exclude_patterns: vec!["(".into()],
            ..CompareConfig::default()
        };
        let err = validate(&bad).unwrap_err().to_string();
        assert!(err.contains("compare.exclude-patterns[0]"), "{err}");
        let bad = CompareConfig {
            type_equivalences: vec!["int8=nope".into()],
            ..CompareConfig::default()
        };
        let err = validate(&bad).unwrap_err().to_string();
        assert!(err.contains("compare.type-equivalences[0]"), "{err}");
        let good = CompareConfig {
            type_equivalences: vec!["int8=numeric".into()],
            ignore_columns: vec!["^updated_at$".into()],
            ..CompareConfig::default()
        };
        validate(&good).unwrap();
    }

    #[test]
    fn equivalences_parse_and_canonical_numbers() {
        assert_eq!(parse_equivalence("int8=numeric").unwrap(), (20, 1700));
        assert_eq!(parse_equivalence("bigint = decimal").unwrap(), (20, 1700));
        assert!(matches!(
            parse_equivalence("int8"),
            Err(CompareError::Equivalence { .. })
        ));
        let err = parse_equivalence("int8=nope").unwrap_err();
        assert_eq!(err.to_string(), "unknown type `nope`");
        assert_eq!(canonical_number(b"5.00"), b"5");
        assert_eq!(canonical_number(b"1.50"), b"1.5");
        assert_eq!(canonical_number(b"100"), b"100");
        assert_eq!(canonical_number(b"-0.0"), b"0");
    }

    fn number(oid: u32, bytes: &[u8]) -> String {
        let mut out = String::new();
        assert!(binary_number_text(oid, bytes, &mut out), "{oid} {bytes:?}");
        String::from_utf8(canonical_number(out.as_bytes()).to_vec()).unwrap()
    }

    #[test]
    fn binary_numbers_decode_to_canonical_text() {
        assert_eq!(number(20, &5i64.to_be_bytes()), "5");
        assert_eq!(number(23, &(-42i32).to_be_bytes()), "-42");
        assert_eq!(number(21, &7i16.to_be_bytes()), "7");
        assert_eq!(number(FLOAT8, &1.5f64.to_be_bytes()), "1.5");
        // numeric 5.00: 1 digit, weight 0, positive, dscale 2, digits [5]
        assert_eq!(number(NUMERIC, &[0, 1, 0, 0, 0, 0, 0, 2, 0, 5]), "5");
        // numeric -12345.6789: digits [1, 2345, 6789], weight 1
        let mut b = vec![0, 3, 0, 1, 0x40, 0, 0, 4];
        for d in [1u16, 2345, 6789] {
            b.extend_from_slice(&d.to_be_bytes());
        }
        assert_eq!(number(NUMERIC, &b), "-12345.6789");
        // numeric 0.00012: digits [1, 2000], weight -1
        let mut b = vec![0, 2, 0xff, 0xff, 0, 0, 0, 5];
        for d in [1u16, 2000] {
            b.extend_from_slice(&d.to_be_bytes());
        }
        assert_eq!(number(NUMERIC, &b), "0.00012");
        // numeric 20000 (trailing zero digit groups omitted): digits [2], weight 1
        assert_eq!(number(NUMERIC, &[0, 1, 0, 1, 0, 0, 0, 0, 0, 2]), "20000");
        assert_eq!(number(NUMERIC, &[0, 0, 0, 0, 0, 0, 0, 0]), "0");
        let mut out = String::new();
        assert!(!binary_number_text(NUMERIC, &[0, 1, 0, 0], &mut out));
        assert!(!binary_number_text(
            NUMERIC,
            &[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10],
            &mut out
        ));
        assert!(!binary_number_text(25, b"5", &mut out));
    }

    #[test]
    fn default_exclusions_match_volatile_functions() {
        let rules = Rules::new(&CompareConfig::default()).unwrap();
        assert!(rules.excluded("SELECT now()"));
        assert!(rules.excluded("select random() * 2"));
        assert!(rules.excluded("SHOW server_version"));
        assert!(rules.excluded("SELECT version ()"));
        assert!(!rules.excluded("SELECT id FROM shown WHERE nowhere = 1"));
    }
}
