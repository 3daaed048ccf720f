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
    /// timestamp/timestamptz/time/timetz (of type OID `.0`) in text (ISO DateStyle), read as
    /// microseconds, rounded to a declared precision (`timestamp(3)=timestamp`) and to the
    /// timestamp tolerance.
    TimeText(u32),
    /// The same in binary format (of type OID `.0`).
    TimeBinary(u32),
}

pub struct Rules {
    exclude: RegexSet,
    primary_only: RegexSet,
    ignore_columns: RegexSet,
    tolerance: f64,
    /// `compare.timestamp-tolerance-ms` in microseconds (0: exact).
    time_step_us: i64,
    /// Pairs of type OIDs declared equal (both orders).
    equivalent: Vec<(u32, u32)>,
    /// Time types whose values are compared at fewer fractional digits than microseconds
    /// (`timestamp(3)=timestamp`): (type OID, digits), the fewest declared.
    time_digits: Vec<(u32, u32)>,
    pub sample_rows_max: usize,
    /// `compare.calibrate`: writes run on the primary only.
    calibrate: bool,
}

pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const NUMERIC: u32 = 1700;
pub const TIME: u32 = 1083;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const TIMETZ: u32 = 1266;

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
    let ((a, _), (b, _)) = parse_pair(pair)?;
    Ok((a, b))
}

/// Both sides of an equivalence with their declared fractional digits, if any
/// (`timestamp(3)`).
fn parse_pair(pair: &str) -> Result<(TypeSpec, TypeSpec), CompareError> {
    let (a, b) = pair
        .split_once('=')
        .ok_or_else(|| CompareError::Equivalence {
            pair: pair.to_string(),
        })?;
    let spec = |t: &str| {
        type_spec(t).ok_or_else(|| CompareError::UnknownType {
            name: t.trim().to_string(),
        })
    };
    Ok((spec(a)?, spec(b)?))
}

/// A type's OID and, for a time type, the fractional digits declared (`timestamp(3)`).
type TypeSpec = (u32, Option<u32>);

/// A type name, with a precision of 0 to 6 fractional digits for the time types
/// (`timestamp(3)`, `time(0)`).
fn type_spec(name: &str) -> Option<TypeSpec> {
    let name = name.trim();
    if let Some(open) = name.find('(') {
        let digits = name.get(open + 1..)?.strip_suffix(')')?.trim();
        let digits = digits.parse::<u32>().ok().filter(|d| *d <= 6)?;
        let oid = type_oid(&name[..open])?;
        return matches!(oid, TIME | TIMESTAMP | TIMESTAMPTZ | TIMETZ)
            .then_some((oid, Some(digits)));
    }
    Some((type_oid(name)?, None))
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
        let mut time_digits: Vec<(u32, u32)> = Vec::new();
        for pair in &cfg.type_equivalences {
            let ((a, a_digits), (b, b_digits)) = parse_pair(pair)?;
            equivalent.push((a, b));
            equivalent.push((b, a));
            // The columns are told apart by type OID only (a RowDescription's typmod is -1
            // for most expressions), so the precision holds for every column of both types
            // of the pair, on both sides: `timestamptz(3)=timestamp` rounds timestamptz and
            // timestamp values to 3 digits, `timestamp(3)=timestamp` every timestamp value.
            let Some(digits) = a_digits.into_iter().chain(b_digits).min() else {
                continue;
            };
            for oid in [a, b] {
                match time_digits.iter_mut().find(|(o, _)| *o == oid) {
                    Some((_, d)) => *d = (*d).min(digits),
                    None => time_digits.push((oid, digits)),
                }
            }
        }
        Ok(Rules {
            exclude: set("compare.exclude-patterns", &cfg.exclude_patterns)?,
            primary_only: set("compare.primary-only-patterns", &cfg.primary_only_patterns)?,
            ignore_columns: set("compare.ignore-columns", &cfg.ignore_columns)?,
            tolerance: cfg.float_tolerance,
            // Validated to at most a day, so this cannot overflow.
            time_step_us: cfg.timestamp_tolerance_ms.saturating_mul(1000) as i64,
            equivalent,
            time_digits,
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
        let time = matches!(oid, TIME | TIMESTAMP | TIMESTAMPTZ | TIMETZ);
        // Times declared equivalent (timestamp=timestamptz, a precision) compare as times, so a
        // value compares by what it means, not how it is written (`.120` and `.12`, text and
        // binary).
        if time
            && (self.time_step_us > 0
                || self.time_digits.iter().any(|&(o, _)| o == oid)
                || self.equivalent.iter().any(|&(a, b)| a == oid && a != b))
        {
            return if binary {
                ColumnRule::TimeBinary(oid)
            } else {
                ColumnRule::TimeText(oid)
            };
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

impl Rules {
    /// A time value (microseconds) of type `oid` rounded to its declared precision, as
    /// PostgreSQL rounds a value stored in a column of that precision (half away from zero,
    /// `AdjustTimestampForTypmod`), then to the nearest step of the timestamp tolerance, as
    /// the step's index.
    pub fn quantise_time(&self, oid: u32, us: i64) -> u64 {
        let mut us = us;
        if let Some(&(_, digits)) = self.time_digits.iter().find(|(o, _)| *o == oid) {
            let scale = 10i64.pow(6 - digits.min(6));
            let away = |v: i64| v.saturating_add(scale / 2) / scale * scale;
            us = if us >= 0 {
                away(us)
            } else {
                -away(us.saturating_neg())
            };
        }
        if self.time_step_us <= 0 {
            return us as u64;
        }
        let step = self.time_step_us;
        us.saturating_add(step / 2).div_euclid(step) as u64
    }
}

/// A time value of `rule` as microseconds (UTC for the types with a zone; timestamps since
/// 2000-01-01 in text and binary alike, times since midnight). `None`: not readable as one (another DateStyle,
/// `infinity`, BC, malformed bytes): the caller hashes the bytes as they are.
pub fn time_value(rule: ColumnRule, bytes: &[u8]) -> Option<i64> {
    match rule {
        ColumnRule::TimeText(_) => time_text(std::str::from_utf8(bytes).ok()?),
        ColumnRule::TimeBinary(TIMETZ) => {
            // Microseconds of the day, then the zone in seconds west of UTC.
            let us = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
            let west = i32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
            if bytes.len() != 12 {
                return None;
            }
            us.checked_add(i64::from(west) * 1_000_000)
        }
        ColumnRule::TimeBinary(_) => {
            // Microseconds since 2000-01-01 (timestamps) or since midnight (time); the
            // extremes are +/-infinity.
            let us = i64::from_be_bytes(bytes.try_into().ok()?);
            (us != i64::MAX && us != i64::MIN).then_some(us)
        }
        _ => None,
    }
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]` (timestamp, timestamptz) or
/// `HH:MM:SS[.ffffff][+HH[:MM[:SS]]]` (time, timetz), as PostgreSQL writes them under the ISO
/// DateStyle, to microseconds (UTC when a zone is given).
fn time_text(text: &str) -> Option<i64> {
    let text = text.trim();
    // Timestamps count from 2000-01-01 (10,957 days after 1970), as in binary format.
    let (days, clock) = match text.split_once(' ') {
        Some((date, clock)) => (date_days(date)? - 10_957, clock),
        None if text.contains('-') && !text.contains(':') => {
            (date_days(text)? - 10_957, "00:00:00")
        }
        None => (0, text),
    };
    // The zone starts at the first sign after the clock's digits.
    let (clock, zone) = match clock.find(['+', '-']) {
        Some(at) => (&clock[..at], Some(&clock[at..])),
        None => (clock, None),
    };
    let mut parts = clock.splitn(3, ':');
    // Bounded as PostgreSQL writes them (24:00:00 is a valid time), so the sums below
    // cannot overflow whatever the bytes say.
    let hours: i64 = digits(parts.next()?).filter(|h| *h <= 24)?;
    let minutes: i64 = digits(parts.next()?).filter(|m| *m < 60)?;
    let seconds = parts.next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i64>().ok()? * 10i64.pow(6 - fraction.len() as u32)
    };
    let whole: i64 = digits(whole).filter(|s| *s <= 60)?;
    // Counted from 1970, PostgreSQL's last years pass i64's microseconds: checked.
    let mut us = days
        .checked_mul(86_400)?
        .checked_add((hours * 60 + minutes) * 60 + whole)?
        .checked_mul(1_000_000)?
        .checked_add(micros)?;
    if let Some(zone) = zone {
        let (sign, rest) = zone.split_at(1);
        let mut fields = rest.splitn(3, ':');
        let field = |f: Option<&str>, max: i64| match f {
            None => Some(0),
            Some(f) => digits::<i64>(f).filter(|v| *v <= max),
        };
        let offset = field(fields.next(), 99)? * 3600
            + field(fields.next(), 59)? * 60
            + field(fields.next(), 59)?;
        // Local time minus the offset east of UTC is UTC.
        us = us.checked_sub(if sign == "+" { offset } else { -offset } * 1_000_000)?;
    }
    Some(us)
}

/// Digits only (no sign, no spaces).
fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Days from 1970-01-01 to the proleptic Gregorian `YYYY-MM-DD` (years of four digits or
/// more, AD only).
fn date_days(date: &str) -> Option<i64> {
    let mut parts = date.splitn(3, '-');
    // PostgreSQL's timestamps end in 294276 AD; more digits are not a date it writes.
    let year: i64 = digits(parts.next()?).filter(|y| *y <= 294_276)?;
    let month: i64 = digits(parts.next()?)?;
    let day: i64 = digits(parts.next()?)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Counted from March, so the leap day ends the year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
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
        // As a float4 (shortest digits that read back as it): 0.1, as PostgreSQL writes it,
        // not the float8 0.10000000149011612 it widens to.
        (FLOAT4, 4) => {
            let v = f32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if v.is_finite() {
                let _ = write!(out, "{v}");
            } else {
                float(out, f64::from(v));
            }
        }
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

/// The hash of a number written in text (`5`, `5.00`, `-0.5`, `1e+20`, `1.5E-3`) by its
/// value: sign, significant digits and decimal exponent, so that equal numbers hash alike
/// whatever their type's notation (int8 `100000000000000000000` and float8 `1e+20`). What is
/// not such a number (NaN, Infinity), or has more than 40 significant digits, hashes as
/// [`canonical_number`] text.
pub fn number_hash(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 64];
    match decimal_form(bytes, &mut buf) {
        Some(n) => super::digest::hash64(&buf[..n], 3),
        None => super::digest::hash64(canonical_number(bytes), 2),
    }
}

/// `[-]DIGITS e EXPONENT` for the value 0.DIGITS x 10^EXPONENT (no leading or trailing zero
/// digit; `0` for zero) written into `out`; its length, or `None` (see [`number_hash`]).
fn decimal_form(bytes: &[u8], out: &mut [u8; 64]) -> Option<usize> {
    const DIGITS_MAX: usize = 40;
    let (negative, mut i) = match bytes.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let mut n = usize::from(negative);
    let mut exponent: i64 = 0;
    let (mut seen, mut point, mut any) = (false, false, false);
    // Significant digits written, and the zeros seen after the last nonzero one (written
    // only when another nonzero digit follows).
    let mut zeros = 0usize;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'0'..=b'9' => {
                any = true;
                if !point {
                    exponent += 1;
                }
                if c == b'0' {
                    // A leading zero moves the point, a later one may be trailing.
                    if seen {
                        zeros += 1;
                    } else {
                        exponent -= 1;
                    }
                } else {
                    if n + zeros + 1 > DIGITS_MAX + 1 {
                        return None;
                    }
                    for _ in 0..zeros {
                        out[n] = b'0';
                        n += 1;
                    }
                    zeros = 0;
                    out[n] = c;
                    n += 1;
                    seen = true;
                }
            }
            b'.' if !point => point = true,
            _ => break,
        }
        i += 1;
    }
    if !any {
        return None;
    }
    if let Some(&(b'e' | b'E')) = bytes.get(i) {
        let rest = bytes.get(i + 1..)?;
        let (sign, digits) = match rest.first() {
            Some(b'-') => (-1, &rest[1..]),
            Some(b'+') => (1, &rest[1..]),
            _ => (1, rest),
        };
        if digits.is_empty() || digits.len() > 6 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let e: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        exponent += sign * e;
        i = bytes.len();
    }
    if i != bytes.len() {
        return None;
    }
    if !seen {
        out[0] = b'0';
        return Some(1);
    }
    if negative {
        out[0] = b'-';
    }
    out[n] = b'e';
    n += 1;
    let mut text = [0u8; 24];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    std::io::Write::write_fmt(&mut cursor, format_args!("{exponent}")).ok()?;
    let len = cursor.position() as usize;
    out.get_mut(n..n + len)?.copy_from_slice(&text[..len]);
    Some(n + len)
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
    fn numbers_hash_by_value_across_notations() {
        let same = |a: &str, b: &str| number_hash(a.as_bytes()) == number_hash(b.as_bytes());
        for (a, b) in [
            ("5", "5.00"),
            ("-7", "-7.0"),
            ("100000000000000000000", "1e+20"),
            ("0.0015", "1.5E-3"),
            ("007", "7"),
            ("-0", "0.000"),
            ("100.5", "1.005e2"),
            (".5", "0.5"),
        ] {
            assert!(same(a, b), "{a} = {b}");
        }
        for (a, b) in [
            ("5", "50"),
            ("5", "-5"),
            ("0.1", "0.01"),
            ("1e20", "1e21"),
            ("NaN", "0"),
        ] {
            assert!(!same(a, b), "{a} != {b}");
        }
        assert!(same("NaN", "NaN"));
        // Binary float4 reads as the float4 PostgreSQL writes (0.1), float8 as itself.
        let mut text = String::new();
        assert!(binary_number_text(FLOAT4, &0.1f32.to_be_bytes(), &mut text));
        assert_eq!(text, "0.1");
        assert!(same(&text, "0.1"));
        text.clear();
        assert!(binary_number_text(
            FLOAT8,
            &1e20f64.to_be_bytes(),
            &mut text
        ));
        assert!(same(&text, "1e+20"), "{text}");
    }

    #[test]
    fn declared_time_precisions_round_as_postgresql_stores() {
        let cfg = CompareConfig {
            type_equivalences: vec![
                "timestamp(3)=timestamp".into(),
                "timestamptz=timestamp".into(),
            ],
            ..Default::default()
        };
        validate(&cfg).unwrap();
        let rules = Rules::new(&cfg).unwrap();
        assert_eq!(
            rules.column_rule("t", TIMESTAMP, false),
            ColumnRule::TimeText(TIMESTAMP)
        );
        assert_eq!(
            rules.column_rule("t", TIMESTAMPTZ, true),
            ColumnRule::TimeBinary(TIMESTAMPTZ)
        );
        assert_eq!(rules.column_rule("t", TIME, false), ColumnRule::Raw);
        let text = |t: &str| time_value(ColumnRule::TimeText(TIMESTAMP), t.as_bytes()).unwrap();
        let q = |us| rules.quantise_time(TIMESTAMP, us);
        assert_eq!(
            q(text("2024-01-01 10:00:00.1234")),
            q(text("2024-01-01 10:00:00.123"))
        );
        assert_eq!(
            q(text("2024-01-01 10:00:00.1235")),
            q(text("2024-01-01 10:00:00.124"))
        );
        assert_ne!(
            q(text("2024-01-01 10:00:00.1244")),
            q(text("2024-01-01 10:00:00.123"))
        );
        // Before 2000 the value is negative: away from zero is towards the earlier time, as
        // PostgreSQL stores it.
        assert_eq!(
            q(text("1990-01-01 10:00:00.1235")),
            q(text("1990-01-01 10:00:00.123"))
        );
        assert_eq!(
            q(text("1990-01-01 10:00:00.1236")),
            q(text("1990-01-01 10:00:00.124"))
        );
        // Text and binary read alike.
        let us = text("2024-01-01 10:00:00.123");
        let binary = time_value(ColumnRule::TimeBinary(TIMESTAMP), &us.to_be_bytes()).unwrap();
        assert_eq!(q(us), q(binary));
        // Without a precision, exact.
        assert_eq!(rules.quantise_time(TIMESTAMPTZ, 1_234_567), 1_234_567);
        // A precision on one type of a pair of two types rounds both: the other side's
        // values of the other type are what must be brought to that precision.
        let cfg = CompareConfig {
            type_equivalences: vec!["timestamptz(3)=timestamp".into()],
            ..Default::default()
        };
        let rules = Rules::new(&cfg).unwrap();
        assert_eq!(
            rules.quantise_time(TIMESTAMP, 1_234_567),
            rules.quantise_time(TIMESTAMPTZ, 1_235_000)
        );
        assert_eq!(rules.quantise_time(TIMESTAMP, 1_234_567), 1_235_000);
        assert_eq!(rules.quantise_time(TIME, 1_234_567), 1_234_567);
        for bad in [
            "timestamp(7)=timestamp",
            "int4(2)=int8",
            "timestamp(x)=timestamp",
        ] {
            let cfg = CompareConfig {
                type_equivalences: vec![bad.into()],
                ..Default::default()
            };
            assert!(validate(&cfg).is_err(), "{bad}");
        }
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

    #[test]
    fn time_values_read_as_microseconds_and_round_to_the_tolerance() {
        let text = |t: &str| time_value(ColumnRule::TimeText(TIMESTAMP), t.as_bytes());
        // From 2000-01-01, as in binary format.
        assert_eq!(text("2000-01-01 00:00:00"), Some(0));
        assert_eq!(text("1970-01-01 00:00:00"), Some(-946_684_800_000_000));
        assert_eq!(
            text("2024-02-29 12:30:15.25"),
            Some(1_709_209_815_250_000 - 946_684_800_000_000)
        );
        assert_eq!(
            text("2024-02-29 14:30:15.25+02"),
            text("2024-02-29 12:30:15.25")
        );
        assert_eq!(
            text("2024-02-29 07:00:15.25-05:30"),
            text("2024-02-29 12:30:15.25")
        );
        assert_eq!(text("12:00:00.000001"), Some(43_200_000_001));
        assert_eq!(text("infinity"), None);
        assert_eq!(text("Thu Feb 29 12:30:15 2024"), None);
        assert_eq!(text("2024-13-01 00:00:00"), None);
        // Binary: microseconds since 2000-01-01; timetz carries its zone west of UTC.
        let binary = |oid, bytes: &[u8]| time_value(ColumnRule::TimeBinary(oid), bytes);
        assert_eq!(binary(TIMESTAMP, &5i64.to_be_bytes()), Some(5));
        assert_eq!(binary(TIMESTAMPTZ, &i64::MAX.to_be_bytes()), None);
        assert_eq!(binary(TIMESTAMP, &[1, 2, 3]), None);
        let mut timetz = 10i64.to_be_bytes().to_vec();
        timetz.extend_from_slice(&(-3600i32).to_be_bytes());
        assert_eq!(binary(TIMETZ, &timetz), Some(10 - 3_600_000_000));
        // Extremes never overflow (a row value must not panic a debug build): what PostgreSQL
        // never writes is compared as bytes.
        assert!(text("262000-12-31 23:59:59.999999+14").is_some());
        assert!(text("294276-12-31 23:59:59.999999+14").is_some());
        assert_eq!(text("294277-01-01 00:00:00"), None);
        assert_eq!(text("99999999999999999999-01-01 00:00:00"), None);
        assert_eq!(text("2024-01-01 999999999999:00:00"), None);
        assert_eq!(text("2024-01-01 00:00:00+999999999999"), None);
        let mut extreme = (i64::MAX - 1).to_be_bytes().to_vec();
        extreme.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(binary(TIMETZ, &extreme), None);

        let cfg = CompareConfig {
            timestamp_tolerance_ms: 1000,
            ..Default::default()
        };
        let rules = Rules::new(&cfg).unwrap();
        assert_eq!(
            rules.column_rule("t", TIMESTAMPTZ, false),
            ColumnRule::TimeText(TIMESTAMPTZ)
        );
        assert_eq!(
            rules.column_rule("t", TIME, true),
            ColumnRule::TimeBinary(TIME)
        );
        assert_eq!(rules.column_rule("t", 25, false), ColumnRule::Raw);
        let a = text("2026-12-03 09:57:46.100").unwrap();
        let b = text("2026-12-03 09:57:46.400").unwrap();
        let c = text("2026-12-03 09:57:48.100").unwrap();
        let q = |us| rules.quantise_time(TIMESTAMP, us);
        assert_eq!(q(a), q(b));
        assert_ne!(q(a), q(c));
        let exact = Rules::new(&CompareConfig::default()).unwrap();
        assert_eq!(exact.column_rule("t", TIMESTAMPTZ, false), ColumnRule::Raw);
    }
}
