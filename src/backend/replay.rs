//! Making a pooled connection match the session it serves next: the session's settings as
//! replayable Query frames with a signature (so a connection that already has them costs
//! nothing), the startup parameters as settings, and the reset that comes first. Shared by the
//! pooled mirrors and the pooled compare shadow; it owns no connection and does no I/O.

use std::hash::Hasher;

use bytes::{Bytes, BytesMut};

use crate::wire;

/// The signature of a connection that runs with its startup settings (a new one, or one reset).
pub const FRESH: u64 = 0;
/// The signature of a connection whose settings pgprism does not know (a unit changed one the
/// snapshots do not capture): the next unit resets it first.
pub const DIRTY: u64 = u64::MAX;

/// Brings a pooled connection back to its startup settings before another session's settings
/// are applied. `RESET ALL` leaves the role and the session authorization alone.
pub const RESET_SQL: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL";

/// A session's settings as Query frames, in the order they are applied, with their signature
/// (`FRESH` when there are none), compared to tell whether a connection already has them.
pub struct Snapshot {
    pub frames: Vec<Bytes>,
    pub sig: u64,
}

impl Snapshot {
    pub fn new(frames: Vec<Bytes>) -> Snapshot {
        let sig = signature(frames.iter());
        Snapshot { frames, sig }
    }
}

/// The signature of a list of setting frames (`FRESH` for none; never `DIRTY`).
pub fn signature<'a>(frames: impl Iterator<Item = &'a Bytes>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut any = false;
    for frame in frames {
        any = true;
        hasher.write_usize(frame.len());
        hasher.write(frame);
    }
    if !any {
        return FRESH;
    }
    nonzero(hasher.finish())
}

/// The signature of the startup parameters' settings followed by the session's own.
pub fn combined(baseline: u64, settings: u64) -> u64 {
    if baseline == FRESH && settings == FRESH {
        return FRESH;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write_u64(baseline);
    hasher.write_u64(settings);
    nonzero(hasher.finish())
}

fn nonzero(sig: u64) -> u64 {
    if sig == FRESH || sig == DIRTY { 1 } else { sig }
}

/// A Query frame of pgprism's own text (ASCII, no NUL: always encodes).
pub fn query_frame(sql: &str) -> Bytes {
    let mut out = BytesMut::new();
    let _ = wire::encode::query(&mut out, sql);
    out.freeze()
}

/// The startup parameters of a session as settings frames, applied on a pool connection
/// before its units (the connection itself logs in with the user, database and `options`
/// only, which its pool is keyed by). PostgreSQL's own protocol options (`_pq_.`) are not
/// settings.
pub fn baseline(client_params: &[(String, String)]) -> Snapshot {
    let frames = client_params
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "user" | "database" | "replication" | "options" | ""
            ) && !k.starts_with("_pq_.")
        })
        .filter_map(|(k, v)| {
            let sql = format!(
                "SELECT pg_catalog.set_config(E'{}', E'{}', false)",
                escape(k),
                escape(v)
            );
            let mut out = BytesMut::new();
            wire::encode::query(&mut out, &sql).ok()?;
            Some(out.freeze())
        })
        .collect();
    Snapshot::new(frames)
}

/// Escapes a value for an `E'...'` literal.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_signatures_tell_sessions_apart() {
        let a = Snapshot::new(vec![query_frame("SET search_path = a")]);
        let b = Snapshot::new(vec![query_frame("SET search_path = b")]);
        let none = Snapshot::new(Vec::new());
        assert_eq!(none.sig, FRESH);
        assert_ne!(a.sig, b.sig);
        assert_eq!(combined(FRESH, FRESH), FRESH);
        assert_ne!(combined(a.sig, FRESH), combined(FRESH, a.sig));
        let base = baseline(&[
            ("user".into(), "u".into()),
            ("application_name".into(), "it's".into()),
        ]);
        assert_eq!(base.frames.len(), 1);
        assert!(
            std::str::from_utf8(&base.frames[0])
                .unwrap()
                .contains("E'application_name', E'it''s'")
        );
    }
}
