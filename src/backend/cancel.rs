//! A client's CancelRequest carried to the connections pgprism opened for its session (the
//! shadow of compare mode, each mirror): the registry that finds, from the key the client
//! holds, the shard and session it belongs to (a CancelRequest arrives on a new connection,
//! on whichever shard accepted it), the rule that decides when a side's statement is the one
//! the client cancelled ([`Pending`]), and the cancel connection itself ([`send`]).
//!
//! The registry is the one cross-thread piece: a session enters it once (when its key is
//! known) and leaves it once; no statement touches it. A request crosses to the owning shard
//! through a bounded inbox and that shard's eventfd, so every decision about a session's
//! statements is taken on the shard that owns them, with no lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;

use crate::config::Endpoint;
use crate::exec::{Notifier, within};

/// Requests waiting in one shard's inbox; beyond it a request is dropped (a cancel is best
/// effort in PostgreSQL too) and the primary's own cancel still goes.
const INBOX_MAX: usize = 1024;

/// The cancel keys of sessions whose statements also run on a shadow or mirrors, shared by
/// every shard.
#[derive(Clone)]
pub struct Registry(Arc<Inner>);

struct Inner {
    /// The key the client holds → (shard, session number on that shard).
    sessions: Mutex<HashMap<(i32, i32), (usize, u64)>>,
    inboxes: Vec<Inbox>,
}

struct Inbox {
    sessions: Mutex<Vec<u64>>,
    notifier: Notifier,
}

impl Registry {
    /// A registry for `shards` shards (one inbox and eventfd each).
    pub fn new(shards: usize) -> std::io::Result<Registry> {
        let inboxes = (0..shards)
            .map(|_| {
                Ok(Inbox {
                    sessions: Mutex::new(Vec::new()),
                    notifier: Notifier::new()?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Registry(Arc::new(Inner {
            sessions: Mutex::new(HashMap::new()),
            inboxes,
        })))
    }

    /// Enters session `session` of `shard` under the key its client holds, until the
    /// returned registration drops.
    pub fn register(&self, key: (i32, i32), shard: usize, session: u64) -> Registered {
        // A key the server handed out twice (another session got it back meanwhile) goes to
        // the newest holder; the older one's leaving must not take it away from it.
        lock(&self.0.sessions).insert(key, (shard, session));
        Registered {
            registry: self.clone(),
            key,
            owner: (shard, session),
        }
    }

    /// A client asked to cancel what the session of `key` runs: its shard hears of it.
    /// `false` when no session holds that key (a wrong secret included) or the inbox is
    /// full.
    pub fn request(&self, key: (i32, i32)) -> bool {
        let Some((shard, session)) = lock(&self.0.sessions).get(&key).copied() else {
            return false;
        };
        let Some(inbox) = self.0.inboxes.get(shard) else {
            return false;
        };
        {
            let mut waiting = lock(&inbox.sessions);
            if waiting.len() >= INBOX_MAX {
                return false;
            }
            waiting.push(session);
        }
        inbox.notifier.notify();
        true
    }

    /// Waits for requests to `shard`'s sessions and takes them (session numbers, in order).
    pub async fn next(&self, shard: usize) -> std::io::Result<Vec<u64>> {
        let Some(inbox) = self.0.inboxes.get(shard) else {
            return Ok(Vec::new());
        };
        loop {
            let taken = std::mem::take(&mut *lock(&inbox.sessions));
            if !taken.is_empty() {
                return Ok(taken);
            }
            inbox.notifier.notified().await?;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent whatever a panicking holder did: each change is one call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session's place in the [`Registry`]; leaving it when dropped.
pub struct Registered {
    registry: Registry,
    key: (i32, i32),
    owner: (usize, u64),
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut sessions = lock(&self.registry.0.sessions);
        if sessions.get(&self.key) == Some(&self.owner) {
            sessions.remove(&self.key);
        }
    }
}

/// Where one side (the shadow, a mirror) stands with a client's cancel, by the client's
/// sync-point numbers (the session tracker's). Sans-IO: the side tells it what it runs.
///
/// The rule: a side's statement is cancelled only when the client's cancel did reach the
/// same sync point on the primary (its answer carried 57014), and only while the side runs
/// that sync point. A side still behind (it runs an earlier one, or has not been sent it
/// yet: ordered dispatch sends the shadow a statement only once the primary answered it,
/// pooled mirrors get a transaction once it ended) is cancelled when it reaches it, so the
/// statement the primary did not complete does not complete there either, and never an
/// earlier one (whose answer the primary gave). A side already past it has nothing to
/// cancel. (Cancelled as it starts, a statement may also not have begun running when the
/// cancel arrives; PostgreSQL then ignores the cancel, and the statement runs: judged as a
/// one-sided cancel, inconclusive, never a mismatch.)
#[derive(Debug, Default)]
pub struct Pending {
    /// The sync point the primary ran when the request came, and whether the primary's
    /// answer to it said it was cancelled.
    want: std::cell::Cell<Option<(u64, bool)>>,
}

impl Pending {
    /// The client asked to cancel while the primary ran sync point `seq`.
    pub fn request(&self, seq: u64) {
        self.want.set(Some((seq, false)));
    }

    /// The primary answered sync point `seq`; `cancelled`: with 57014.
    pub fn primary_answered(&self, seq: u64, cancelled: bool) {
        match self.want.get() {
            Some((want, false)) if want == seq && cancelled => self.want.set(Some((seq, true))),
            // Completed (or failed otherwise): the cancel came too late for it.
            Some((want, false)) if want <= seq => self.want.set(None),
            // Confirmed: it waits for the side to reach it, whatever the primary runs next.
            _ => {}
        }
    }

    /// Whether a cancel waits to be placed: [`due`](Self::due) can only say
    /// [`Due::No`] otherwise.
    pub fn wanted(&self) -> bool {
        self.want.get().is_some()
    }

    /// The side now runs sync point `running` (None: nothing of the client's); `alone`:
    /// nothing after it is written on that connection yet. [`Due::Fire`] when its statement
    /// is to be cancelled now (once).
    ///
    /// A cancel takes a connection's time to arrive, and PostgreSQL cancels whatever the
    /// backend runs when it does: with a later statement already written behind `running`
    /// (a packed shadow write, a mirror's pipelined sync points, other sessions' units on a
    /// pooled connection), the cancelled one may have finished by then and the signal would
    /// hit the next. Such a side is not cancelled ([`Due::Skip`]): the statement runs to
    /// completion there (for compare a one-sided cancel, inconclusive).
    pub fn due(&self, running: Option<u64>, alone: bool) -> Due {
        let (Some((want, confirmed)), Some(running)) = (self.want.get(), running) else {
            return Due::No;
        };
        if running > want {
            self.want.set(None);
            return Due::No;
        }
        if confirmed && running == want {
            self.want.set(None);
            return if alone { Due::Fire } else { Due::Skip };
        }
        Due::No
    }
}

/// What [`Pending::due`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing to do now.
    No,
    /// Cancel the side's statement now.
    Fire,
    /// The side runs the cancelled statement, but something follows it on the wire: it is
    /// left to run (counted as skipped).
    Skip,
}

/// Sends a CancelRequest for `key` to `addr` (TLS as `tls` says) and waits for the server to
/// close that connection (it has acted on it then), each within `limit` (the side's
/// `connect-timeout-ms`). `still` is asked once the connection is open, right before the
/// request goes: the statement may have ended meanwhile and the connection moved on to
/// another (another client's, on a pooled connection), which must not be cancelled.
/// Returns whether the request was written.
pub async fn send(
    addr: &Endpoint,
    tls: &crate::tls::Upstream,
    key: (i32, i32),
    limit: Duration,
    still: impl Fn() -> bool,
) -> bool {
    let sent = within(limit, async {
        let mut stream = super::connect(addr, limit).await.ok()?;
        tls.negotiate(&mut stream).await.ok()?;
        if !still() {
            stream.shutdown();
            return None;
        }
        let mut out = BytesMut::new();
        crate::wire::encode::cancel_request(&mut out, key.0, key.1);
        stream.write_all(&out).await.ok()?;
        Some(stream)
    })
    .await
    .flatten();
    let Some(stream) = sent else {
        return false;
    };
    let mut sink = BytesMut::new();
    let _ = within(limit, async {
        // The server sends nothing on a cancel connection; whatever comes is dropped.
        while let Ok(n) = stream.read_buf(&mut sink, 256).await {
            if n == 0 {
                break;
            }
            sink.clear();
        }
    })
    .await;
    stream.shutdown();
    true
}

/// [`send`], then again while `still` holds after a pause (50 ms, doubling up to 400 ms),
/// until `limit` has passed since the first: a cancel that reaches a backend before it began
/// the statement (written to it just before, not yet read) is dropped by PostgreSQL, and the
/// statement runs on. Whether any cancel was sent.
pub async fn send_until_gone(
    addr: &Endpoint,
    tls: &crate::tls::Upstream,
    key: (i32, i32),
    limit: Duration,
    still: impl Fn() -> bool,
) -> bool {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut sent = false;
    loop {
        sent |= send(addr, tls, key, limit, &still).await;
        crate::exec::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(400));
        if !still() || started.elapsed() + pause > limit {
            return sent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_is_cancelled_only_at_the_sync_point_the_primary_had_cancelled() {
        // Running it when the primary's 57014 comes: cancelled then.
        let p = Pending::default();
        p.request(4);
        assert_eq!(
            p.due(Some(4), true),
            Due::No,
            "not before the primary said it was cancelled"
        );
        p.primary_answered(4, true);
        assert_eq!(p.due(Some(4), true), Due::Fire);
        assert_eq!(p.due(Some(4), true), Due::No, "once");
        // Behind: the earlier statement runs on, the cancelled one is cancelled as it starts.
        let p = Pending::default();
        p.request(7);
        p.primary_answered(7, true);
        assert_eq!(p.due(Some(6), true), Due::No);
        assert_eq!(p.due(None, true), Due::No);
        p.primary_answered(8, false);
        assert_eq!(p.due(Some(7), true), Due::Fire);
        // The primary completed it anyway (the cancel came too late): nothing anywhere.
        let p = Pending::default();
        p.request(2);
        p.primary_answered(2, false);
        assert_eq!(p.due(Some(2), true), Due::No);
        // Past it already: nothing, and the next statement is never hit.
        let p = Pending::default();
        p.request(3);
        p.primary_answered(3, true);
        assert_eq!(p.due(Some(4), true), Due::No);
        assert_eq!(p.due(Some(3), true), Due::No);
        // Running it, but the next statement is already written behind it: never fired
        // (it might land on the next one), and not later either.
        let p = Pending::default();
        p.request(5);
        p.primary_answered(5, true);
        assert_eq!(p.due(Some(5), false), Due::Skip);
        assert_eq!(p.due(Some(5), true), Due::No);
    }

    #[test]
    fn the_registry_routes_a_request_to_the_owning_shard_only_with_the_right_secret() {
        let registry = Registry::new(2).unwrap();
        let entry = registry.register((100, 7), 1, 42);
        assert!(!registry.request((100, 8)), "wrong secret");
        assert!(!registry.request((101, 7)), "unknown pid");
        assert!(registry.request((100, 7)));
        assert_eq!(lock(&registry.0.inboxes[1].sessions).as_slice(), &[42]);
        assert!(lock(&registry.0.inboxes[0].sessions).is_empty());
        drop(entry);
        assert!(!registry.request((100, 7)), "gone with the session");
        // The same key entered again by a newer session: the older one leaving keeps it.
        let older = registry.register((5, 5), 0, 1);
        let newer = registry.register((5, 5), 1, 2);
        drop(older);
        assert!(registry.request((5, 5)), "the newer session still holds it");
        assert_eq!(lock(&registry.0.inboxes[1].sessions).last(), Some(&2));
        drop(newer);
        assert!(!registry.request((5, 5)));
    }
}
