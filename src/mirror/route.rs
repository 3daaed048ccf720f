//! Per-session routing of client frames to mirrors: query filters, prepared statements and
//! portals tracked so a mirror never sees a Bind for a statement it did not get (it is
//! re-prepared from the client's own Parse, or skipped with everything that depends on it),
//! COPY data following its COPY, and the overflow policy.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::link::{Item, Link, Push};
use super::stats::MirrorStats;
use crate::config::{MirrorConfig, Overflow, QueryFilter};
use crate::proxy::fingerprints::Fingerprints;
use crate::sql::{self, Class};
use crate::wire::{self, Target, tag};

/// Prepared statements and portals tracked per session; beyond this, new names are not
/// tracked and statements using them are not mirrored (counted as filtered).
const NAMES_MAX: usize = 10_000;

/// Session settings (SET, RESET, ...) kept per session for replay onto a reconnected mirror;
/// the oldest are forgotten beyond this.
const SETTINGS_MAX: usize = 64;

struct Statement {
    class: Class,
    copy_from: bool,
    /// The client's Parse frame, replayed to a mirror that lacks the statement.
    parse: Bytes,
    fingerprint: u64,
}

struct Portal {
    class: Class,
    copy_from: bool,
    statement: String,
    fingerprint: u64,
}

pub struct Router {
    links: Vec<Rc<Link>>,
    fingerprints: Rc<Fingerprints>,
    statements: HashMap<String, Statement>,
    portals: HashMap<String, Portal>,
    /// Fingerprint of the last statement seen, for the latency of the next sync point.
    last_fingerprint: u64,
    /// The session's simple-protocol settings, in order (own copies, bounded).
    settings: std::collections::VecDeque<Bytes>,
}

impl Drop for Router {
    /// However the session ends (its pumps finished, or a watchdog dropped them), its mirror
    /// links drain and close instead of reconnecting forever.
    fn drop(&mut self) {
        for link in &self.links {
            link.client_done();
        }
    }
}

/// Whether `class` passes a mirror's filter.
fn passes(cfg: &MirrorConfig, class: Class) -> bool {
    use QueryFilter as F;
    match class {
        Class::Transaction => !cfg.skip_transaction_control,
        Class::Session | Class::Empty => true,
        Class::Select => matches!(cfg.queries, F::All | F::Select),
        Class::Dml => matches!(cfg.queries, F::All | F::DdlDml | F::Dml),
        Class::Ddl => matches!(cfg.queries, F::All | F::DdlDml | F::Ddl),
        Class::Other => matches!(cfg.queries, F::All | F::DdlDml),
    }
}

fn is_copy_from(sql: &[u8], class: Class) -> bool {
    class == Class::Dml && {
        let start = sql
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(sql.len());
        sql[start..].len() >= 4 && sql[start..start + 4].eq_ignore_ascii_case(b"COPY")
    }
}

/// How one frame relates to the statement bookkeeping, computed once for all links.
enum Route<'a> {
    /// A simple Query: one statement (`parts` empty, no allocation: the common case) or
    /// several, each with its class.
    Query {
        sql: &'a [u8],
        single: Class,
        parts: Vec<(std::ops::Range<usize>, Class)>,
    },
    Parse {
        name: &'a str,
    },
    Bind {
        statement: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    DescribeStatement {
        name: &'a str,
    },
    Portal {
        name: &'a str,
    },
    CloseStatement {
        name: &'a str,
    },
    ClosePortal {
        name: &'a str,
    },
    Sync,
    Flush,
    Copy {
        ends: bool,
    },
    /// Terminate, password messages and anything unknown: never mirrored.
    Never,
    FunctionCall,
}

impl Router {
    pub fn new(links: Vec<Rc<Link>>, fingerprints: Rc<Fingerprints>) -> Router {
        Router {
            links,
            fingerprints,
            statements: HashMap::new(),
            portals: HashMap::new(),
            last_fingerprint: 0,
            settings: std::collections::VecDeque::new(),
        }
    }

    pub fn links(&self) -> &[Rc<Link>] {
        &self.links
    }

    /// A client batch starts; `boundary` says the session is idle outside a transaction, so
    /// links skipping a cut transaction may resume.
    pub fn begin_batch(&self, boundary: bool) {
        if boundary {
            for link in &self.links {
                if link.at_boundary() {
                    for setting in &self.settings {
                        link.replay(setting.clone());
                    }
                }
            }
        }
    }

    /// Keeps a session setting for replay after a mirror reconnects. `RESET ALL` and
    /// `DISCARD ALL` make everything before them moot.
    fn remember_setting(&mut self, sql: &[u8], frame: &Bytes) {
        let text = String::from_utf8_lossy(sql).to_ascii_uppercase();
        let words: Vec<&str> = text.split_whitespace().take(2).collect();
        if matches!(
            words.as_slice(),
            ["RESET", "ALL" | "ALL;"] | ["DISCARD", "ALL" | "ALL;"]
        ) {
            self.settings.clear();
        }
        // LISTEN/UNLISTEN and DEALLOCATE are session state too, but replaying them is not
        // needed for the mirror to apply the same data changes.
        if matches!(words.first(), Some(&"SET") | Some(&"RESET")) {
            if self.settings.len() >= SETTINGS_MAX {
                self.settings.pop_front();
            }
            self.settings.push_back(Bytes::copy_from_slice(frame));
        }
    }

    /// The fingerprint for the sync point just routed (0 when none).
    pub fn last_fingerprint(&self) -> u64 {
        self.last_fingerprint
    }

    /// Routes one complete client frame (`frame` includes its header) to every link.
    pub async fn route(&mut self, tag_byte: u8, frame: &Bytes) {
        let body = &frame[wire::HEADER_BYTES..];
        let route = match self.classify(tag_byte, frame, body) {
            Some(route) => route,
            None => return,
        };
        for i in 0..self.links.len() {
            let link = self.links[i].clone();
            self.route_one(&link, &route, frame).await;
        }
        match route {
            Route::CloseStatement { name } => {
                self.statements.remove(name);
            }
            Route::ClosePortal { name } => {
                self.portals.remove(name);
            }
            _ => {}
        }
    }

    /// Updates the session bookkeeping for one frame and says how to route it.
    fn classify<'a>(&mut self, tag_byte: u8, frame: &Bytes, body: &'a [u8]) -> Option<Route<'a>> {
        Some(match tag_byte {
            tag::QUERY => {
                let sql = body.strip_suffix(&[0]).unwrap_or(body);
                self.last_fingerprint = self.fingerprints.intern(sql);
                let parts: Vec<_> = if memchr::memchr(b';', sql).is_some() {
                    sql::split_statements(sql)
                        .into_iter()
                        .map(|r| {
                            let class = sql::classify(&sql[r.clone()]);
                            (r, class)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                // A lone trailing `;` splits into one part: treat it as a single statement.
                let (single, parts) = match parts.len() {
                    0 => (sql::classify(sql), parts),
                    1 => (parts[0].1, Vec::new()),
                    _ => (Class::Other, parts),
                };
                if single == Class::Session && parts.is_empty() {
                    self.remember_setting(sql, frame);
                }
                Route::Query { sql, single, parts }
            }
            tag::PARSE => {
                let (name, query, _) = wire::Parse::new(body).parts().ok()?;
                let class = sql::classify(query.as_bytes());
                if self.statements.len() < NAMES_MAX || self.statements.contains_key(name) {
                    let fingerprint = self.fingerprints.intern(query.as_bytes());
                    self.statements.insert(
                        name.to_string(),
                        Statement {
                            class,
                            copy_from: is_copy_from(query.as_bytes(), class),
                            // Its own copy: kept for the session's life, it must not pin the
                            // read buffer it arrived in.
                            parse: Bytes::copy_from_slice(frame),
                            fingerprint,
                        },
                    );
                }
                Route::Parse { name }
            }
            tag::BIND => {
                let bind = wire::Bind::new(body);
                let (portal, statement) = (bind.portal().ok()?, bind.statement().ok()?);
                if let Some(s) = self.statements.get(statement)
                    && (self.portals.len() < NAMES_MAX || self.portals.contains_key(portal))
                {
                    self.portals.insert(
                        portal.to_string(),
                        Portal {
                            class: s.class,
                            copy_from: s.copy_from,
                            statement: statement.to_string(),
                            fingerprint: s.fingerprint,
                        },
                    );
                } else {
                    self.portals.remove(portal);
                }
                Route::Bind { statement }
            }
            tag::EXECUTE => {
                let portal = wire::Execute::new(body).portal().ok()?;
                if let Some(p) = self.portals.get(portal) {
                    self.last_fingerprint = p.fingerprint;
                }
                Route::Execute { portal }
            }
            tag::DESCRIBE => match wire::Describe::new(body).target().ok()? {
                (Target::Statement, name) => Route::DescribeStatement { name },
                (Target::Portal, name) => Route::Portal { name },
            },
            // The names are forgotten after routing (see `route`): a closed name may be reused,
            // and drivers that number their statements would otherwise fill the table.
            tag::CLOSE => match wire::Close::new(body).target().ok()? {
                (Target::Statement, name) => Route::CloseStatement { name },
                (Target::Portal, name) => Route::ClosePortal { name },
            },
            tag::SYNC => Route::Sync,
            tag::FLUSH => Route::Flush,
            tag::COPY_DATA => Route::Copy { ends: false },
            tag::COPY_DONE | tag::COPY_FAIL => Route::Copy { ends: true },
            tag::FUNCTION_CALL => Route::FunctionCall,
            _ => Route::Never,
        })
    }

    async fn route_one(&mut self, link: &Rc<Link>, route: &Route<'_>, frame: &Bytes) {
        let cfg = &link.target.cfg;
        let stats = &link.target.stats;
        match route {
            Route::Query { sql, single, parts } if parts.is_empty() => {
                if !passes(cfg, *single) {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                    return;
                }
                let statement = *single != Class::Empty;
                self.send(link, frame.clone(), Some(self.last_fingerprint), statement)
                    .await;
                if is_copy_from(sql, *single) {
                    link.copy_active.set(link.accepting());
                }
            }
            Route::Query { sql, parts, .. } => {
                let pass: Vec<bool> = parts.iter().map(|(_, c)| passes(cfg, *c)).collect();
                let statement = !parts.is_empty();
                if pass.iter().all(|&p| p) {
                    let copy = parts.iter().any(|(r, c)| is_copy_from(&sql[r.clone()], *c));
                    self.send(link, frame.clone(), Some(self.last_fingerprint), statement)
                        .await;
                    if copy {
                        link.copy_active.set(link.accepting());
                    }
                } else if pass.iter().any(|&p| p) {
                    // Mixed text (e.g. `BEGIN; SELECT ...; COMMIT` under the DDL+DML filter):
                    // send the statements that pass, as one Query.
                    let mut text = Vec::with_capacity(sql.len());
                    for ((range, _), _) in parts.iter().zip(&pass).filter(|(_, p)| **p) {
                        text.extend_from_slice(&sql[range.clone()]);
                        text.push(b';');
                    }
                    let copy = parts
                        .iter()
                        .zip(&pass)
                        .any(|((r, c), p)| *p && is_copy_from(&sql[r.clone()], *c));
                    let mut out = BytesMut::with_capacity(text.len() + 6);
                    if let Ok(text) = std::str::from_utf8(&text)
                        && wire::encode::query(&mut out, text).is_ok()
                    {
                        if copy {
                            link.copy_active.set(link.accepting());
                        }
                        self.send(link, out.freeze(), Some(self.last_fingerprint), true)
                            .await;
                    }
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                } else {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                }
            }
            Route::Parse { name } => {
                let wanted = self
                    .statements
                    .get(*name)
                    .is_some_and(|s| passes(cfg, s.class));
                if wanted {
                    if self.send(link, frame.clone(), None, false).await {
                        link.prepared.borrow_mut().insert(name.to_string());
                    }
                } else {
                    // The mirror's statement of that name (if any) is now stale: anything bound
                    // to the name is skipped from here on, because its class does not pass.
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                }
            }
            Route::Bind { statement } => {
                let Some(s) = self.statements.get(*statement) else {
                    return;
                };
                if !passes(cfg, s.class) {
                    return;
                }
                if link.accepting() && !link.prepared.borrow().contains(*statement) {
                    // The mirror lost or never got this statement (skipped, reconnected):
                    // prepare it again from the client's own Parse before binding.
                    let parse = s.parse.clone();
                    if self.send(link, parse, None, false).await {
                        MirrorStats::bump(&stats.counters.reprepared, 1);
                        link.prepared.borrow_mut().insert(statement.to_string());
                    }
                }
                self.send(link, frame.clone(), None, false).await;
            }
            Route::Execute { portal } => {
                let Some(p) = self.portals.get(*portal) else {
                    return;
                };
                if !passes(cfg, p.class) || !link.prepared.borrow().contains(&p.statement) {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                    return;
                }
                let copy = p.copy_from;
                if self.send(link, frame.clone(), None, true).await && copy {
                    link.copy_active.set(true);
                }
            }
            Route::DescribeStatement { name } => {
                if link.prepared.borrow().contains(*name) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::Portal { name } => {
                if self.portals.get(*name).is_some_and(|p| {
                    passes(cfg, p.class) && link.prepared.borrow().contains(&p.statement)
                }) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::CloseStatement { name } => {
                if link.prepared.borrow_mut().remove(*name) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::ClosePortal { name } => {
                if self.portals.get(*name).is_some_and(|p| {
                    passes(cfg, p.class) && link.prepared.borrow().contains(&p.statement)
                }) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            // During a COPY FROM STDIN started by Execute the server ignores Sync (no
            // ReadyForQuery follows): forward it, but not as a sync point.
            Route::Sync if link.copy_active.get() => {
                self.send(link, frame.clone(), None, false).await;
            }
            Route::Sync => {
                if link.pending_sync.get()
                    && self
                        .send(link, frame.clone(), Some(self.last_fingerprint), false)
                        .await
                {
                    link.pending_sync.set(false);
                }
            }
            Route::Flush => {
                if link.pending_sync.get() {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::Copy { ends } => {
                if link.copy_active.get() {
                    self.send(link, frame.clone(), None, false).await;
                    if *ends {
                        link.copy_active.set(false);
                    }
                }
            }
            Route::FunctionCall => {
                if cfg.queries == QueryFilter::All {
                    self.send(link, frame.clone(), Some(0), true).await;
                }
            }
            Route::Never => {}
        }
    }

    /// Queues a frame on a link under its overflow policy. Returns whether it was queued.
    async fn send(
        &self,
        link: &Rc<Link>,
        frame: Bytes,
        sync: Option<u64>,
        statement: bool,
    ) -> bool {
        let stats = &link.target.stats;
        if !link.accepting() {
            let counter = match link.state() {
                super::link::State::Skipping => &stats.counters.skipped_resync,
                _ => &stats.counters.skipped_down,
            };
            MirrorStats::bump(counter, 1);
            return false;
        }
        let item = || Item {
            frame: frame.clone(),
            enqueued: std::time::Instant::now(),
            sync,
            statement,
            internal: false,
        };
        loop {
            match link.push(item()) {
                Push::Queued => {
                    if sync.is_none() {
                        link.pending_sync.set(true);
                    }
                    return true;
                }
                Push::Full => match link.target.cfg.overflow {
                    Overflow::Drop => {
                        link.cut();
                        MirrorStats::bump(&stats.counters.skipped_overflow, 1);
                        return false;
                    }
                    Overflow::Block => {
                        link.wait_space(frame.len()).await;
                        if !link.accepting() {
                            MirrorStats::bump(&stats.counters.skipped_down, 1);
                            return false;
                        }
                    }
                },
            }
        }
    }
}
