//! Which server message answers which client message, for a relay that sends the server
//! messages the client did not write (a re-Parse on a pooled connection, `SET`s that make the
//! connection match the client) and answers some client messages itself (a Parse of a
//! statement the connection already holds, a Close of a shared statement).
//!
//! Every message the server answers has one *final* answer: ParseComplete, BindComplete,
//! CloseComplete, RowDescription or NoData (Describe), CommandComplete, EmptyQueryResponse or
//! PortalSuspended (Execute), ReadyForQuery (Sync, Query, FunctionCall). An ErrorResponse to
//! an extended-protocol message is final too, and the server then skips every message up to
//! the next Sync. Sans-IO: it says what to do with each server message; the caller moves the
//! bytes.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::wire::tag;

/// What a client (or injected) message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaits {
    Parse,
    Bind,
    Close,
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    DescribePortal,
    Execute,
    /// Sync, Query, FunctionCall: answered by ReadyForQuery.
    Ready,
}

impl Awaits {
    /// What client message `tag` waits for; `None`: no answer (Flush, CopyData, CopyDone,
    /// CopyFail, Terminate). A Sync the server ignores (during a COPY) must not be pushed:
    /// the session tracker tells those apart.
    pub fn of(tag: u8, describe_kind: u8) -> Option<Awaits> {
        Some(match tag {
            tag::PARSE => Awaits::Parse,
            tag::BIND => Awaits::Bind,
            tag::CLOSE => Awaits::Close,
            tag::DESCRIBE if describe_kind == b'S' => Awaits::DescribeStatement,
            tag::DESCRIBE => Awaits::DescribePortal,
            tag::EXECUTE => Awaits::Execute,
            tag::SYNC | tag::QUERY | tag::FUNCTION_CALL => Awaits::Ready,
            _ => return None,
        })
    }

    fn is_final(self, tag: u8) -> bool {
        match self {
            Awaits::Parse => tag == tag::PARSE_COMPLETE,
            Awaits::Bind => tag == tag::BIND_COMPLETE,
            Awaits::Close => tag == tag::CLOSE_COMPLETE,
            Awaits::DescribeStatement | Awaits::DescribePortal => {
                tag == tag::ROW_DESCRIPTION || tag == tag::NO_DATA
            }
            Awaits::Execute => {
                tag == tag::COMMAND_COMPLETE
                    || tag == tag::EMPTY_QUERY_RESPONSE
                    || tag == tag::PORTAL_SUSPENDED
            }
            Awaits::Ready => tag == tag::READY_FOR_QUERY,
        }
    }

    /// An error ends it and the server skips to the next Sync.
    fn extended(self) -> bool {
        self != Awaits::Ready
    }
}

/// One expected answer, in the order the server gives them.
#[derive(Debug)]
enum Entry {
    /// The client's own message: its answers go to the client (`key`: reported back if it
    /// fails, when what it leaves on the connection matters to the caller).
    Client { awaits: Awaits, key: Option<u64> },
    /// A message pgprism sent: its answers are pgprism's (`key` says what it was, for the
    /// caller to learn whether it worked).
    Hidden { awaits: Awaits, key: u64 },
    /// An answer pgprism gives the client itself, in its place among the server's.
    Own(Bytes),
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Give it to the client.
    Client,
    /// pgprism's own: drop it.
    Swallow,
}

/// What a server message settled, besides routing it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Hidden messages that failed (their keys): an error answered them, or the server
    /// skipped them after an error.
    pub failed: Vec<u64>,
    /// Keyed messages (hidden or the client's) that completed without an error.
    pub done: Vec<u64>,
    /// Own answers now due, after this message.
    pub own: Vec<Bytes>,
    /// Client messages the server skipped after an error, whose own answers were dropped as
    /// the server would have dropped them.
    pub skipped_own: usize,
}

impl Settled {
    /// Nothing for the caller to act on (the client's messages skipped aside).
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.done.is_empty() && self.own.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Entry>,
}

impl Replies {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// ReadyForQuery answers expected (client and hidden Syncs and Queries).
    pub fn readies(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Entry::Client {
                        awaits: Awaits::Ready,
                        ..
                    } | Entry::Hidden {
                        awaits: Awaits::Ready,
                        ..
                    }
                )
            })
            .count()
    }

    /// A client message is forwarded.
    pub fn client(&mut self, awaits: Awaits) {
        self.queue.push_back(Entry::Client { awaits, key: None });
    }

    /// A client message is forwarded, and the caller wants to know if it fails.
    pub fn client_keyed(&mut self, awaits: Awaits, key: u64) {
        self.queue.push_back(Entry::Client {
            awaits,
            key: Some(key),
        });
    }

    /// pgprism sends a message of its own (`key` is reported back if it fails).
    pub fn hidden(&mut self, awaits: Awaits, key: u64) {
        self.queue.push_back(Entry::Hidden { awaits, key });
    }

    /// pgprism answers a client message itself. Returns the answer when it is due at once
    /// (nothing expected before it); else it waits for its turn.
    pub fn own(&mut self, answer: Bytes) -> Option<Bytes> {
        if self.queue.is_empty() {
            return Some(answer);
        }
        self.queue.push_back(Entry::Own(answer));
        None
    }

    /// One server message (`tag`): where it goes, and what that settled.
    pub fn server(&mut self, tag: u8, settled: &mut Settled) -> Route {
        // Messages that may come at any time belong to nobody in particular.
        if tag == tag::NOTIFICATION_RESPONSE {
            return Route::Client;
        }
        let (awaits, route, key, hidden) = match self.queue.front() {
            Some(Entry::Client { awaits, key }) => (*awaits, Route::Client, *key, false),
            Some(Entry::Hidden { awaits, key }) => (*awaits, Route::Swallow, Some(*key), true),
            // Own answers never stay at the front (they are released as soon as they are).
            Some(Entry::Own(_)) | None => return Route::Client,
        };
        if tag == tag::ERROR_RESPONSE {
            if let Some(key) = key {
                settled.failed.push(key);
            }
            if awaits.extended() {
                self.queue.pop_front();
                self.skip_to_sync(settled);
                self.release_own(settled);
                // The server now skips the client's messages up to its Sync: the error is
                // the client's only word on why.
                return Route::Client;
            }
            // A hidden statement's error (its ReadyForQuery follows) is pgprism's alone.
            return if hidden {
                Route::Swallow
            } else {
                Route::Client
            };
        }
        if awaits.is_final(tag) {
            self.queue.pop_front();
            if let Some(key) = key {
                settled.done.push(key);
            }
            self.release_own(settled);
        }
        route
    }

    /// After an error: the server ignores everything up to the next Sync.
    fn skip_to_sync(&mut self, settled: &mut Settled) {
        while let Some(front) = self.queue.front() {
            match front {
                Entry::Client {
                    awaits: Awaits::Ready,
                    ..
                }
                | Entry::Hidden {
                    awaits: Awaits::Ready,
                    ..
                } => break,
                Entry::Hidden { key, .. } | Entry::Client { key: Some(key), .. } => {
                    settled.failed.push(*key)
                }
                Entry::Own(_) => settled.skipped_own += 1,
                Entry::Client { key: None, .. } => {}
            }
            self.queue.pop_front();
        }
    }

    fn release_own(&mut self, settled: &mut Settled) {
        while let Some(Entry::Own(_)) = self.queue.front() {
            if let Some(Entry::Own(answer)) = self.queue.pop_front() {
                settled.own.push(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(b: &'static [u8]) -> Bytes {
        Bytes::from_static(b)
    }

    #[test]
    fn own_answers_take_their_turn() {
        let mut r = Replies::default();
        // Client: Parse(held: answered by pgprism), Bind, Execute, Sync; a hidden Parse first.
        r.hidden(Awaits::Parse, 7);
        assert_eq!(r.own(own(b"1")), None);
        r.client(Awaits::Bind);
        r.client(Awaits::Execute);
        r.client(Awaits::Ready);
        let mut s = Settled::default();
        assert_eq!(r.server(tag::PARSE_COMPLETE, &mut s), Route::Swallow);
        assert_eq!(s.own, vec![own(b"1")]);
        let mut s = Settled::default();
        assert_eq!(r.server(tag::BIND_COMPLETE, &mut s), Route::Client);
        assert_eq!(r.server(tag::DATA_ROW, &mut s), Route::Client);
        assert_eq!(r.server(tag::COMMAND_COMPLETE, &mut s), Route::Client);
        assert_eq!(r.server(tag::READY_FOR_QUERY, &mut s), Route::Client);
        assert!(r.is_empty() && s.own.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_drops_own_answers() {
        let mut r = Replies::default();
        r.client(Awaits::Bind);
        assert_eq!(r.own(own(b"3")), None);
        r.hidden(Awaits::Parse, 9);
        r.client(Awaits::Execute);
        r.client(Awaits::Ready);
        let mut s = Settled::default();
        assert_eq!(r.server(tag::ERROR_RESPONSE, &mut s), Route::Client);
        assert_eq!(s.failed, vec![9]);
        assert_eq!(s.skipped_own, 1);
        assert_eq!(r.server(tag::READY_FOR_QUERY, &mut s), Route::Client);
        assert!(r.is_empty());
    }

    #[test]
    fn hidden_queries_are_swallowed_whole_errors_included() {
        let mut r = Replies::default();
        r.hidden(Awaits::Ready, 1);
        r.client(Awaits::Ready);
        let mut s = Settled::default();
        assert_eq!(r.server(tag::COMMAND_COMPLETE, &mut s), Route::Swallow);
        assert_eq!(r.server(tag::PARAMETER_STATUS, &mut s), Route::Swallow);
        assert_eq!(r.server(tag::ERROR_RESPONSE, &mut s), Route::Swallow);
        assert_eq!(s.failed, vec![1]);
        assert_eq!(r.server(tag::READY_FOR_QUERY, &mut s), Route::Swallow);
        assert_eq!(r.server(tag::READY_FOR_QUERY, &mut s), Route::Client);
        assert!(r.is_empty());
    }

    #[test]
    fn own_answer_with_nothing_pending_is_due_at_once() {
        let mut r = Replies::default();
        assert_eq!(r.own(own(b"1")), Some(own(b"1")));
        assert!(r.is_empty());
    }
}
