//! Per-session routing of client frames to mirrors: query filters, prepared statements and
//! portals tracked so a mirror never sees a Bind or an EXECUTE for a statement it did not get
//! (it is re-prepared from the client's own Parse or PREPARE, or skipped with everything that
//! depends on it), COPY data following its COPY, session settings kept for replay, and the
//! overflow policy.
//!
//! Protocol-level (Parse) and SQL-level (`PREPARE`) statements share one namespace per
//! session, as in PostgreSQL: one table here, one set of prepared names per mirror link.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::link::{Item, Link, Push};
use super::stats::MirrorStats;
use crate::config::{MirrorConfig, Overflow, QueryFilter};
use crate::session::Settings;
use crate::sql::{self, Class, Prepared};
use crate::stats::fingerprints::Fingerprints;
use crate::wire::{self, ObjectKind, tag};

/// Bytes of statement text kept per session to prepare a statement again on a mirror that
/// lost it: the client's Parse frames and SQL-level PREPARE texts together. Statements
/// beyond it are tracked without their text, so a mirror that lacks one skips what uses it
/// (counted as `skipped_unprepared`) instead of preparing it again.
const KEPT_TEXT_BYTES_MAX: usize = 4 << 20;

/// The statement and portal pgprism uses on a mirror to run a client's PREPARE text in the
/// middle of an extended-protocol batch (both closed right after). Named, so the client's
/// unnamed statement, and portals bound from it, are left alone.
const REPREPARE_STATEMENT: &str = "pgprism_reprepare";
const REPREPARE_PORTAL: &str = "pgprism_reprepare";

/// What creates a statement again on a mirror session that lacks it. Its own copy: kept for
/// the session's life, it must not pin the read buffer it arrived in.
#[derive(Clone)]
enum Source {
    /// The client's Parse frame.
    Parse(Bytes),
    /// The client's `PREPARE name ... AS ...` statement text.
    Prepare(Bytes),
    /// Not kept: over `KEPT_TEXT_BYTES_MAX`.
    Lost,
}

impl Source {
    fn bytes(&self) -> usize {
        match self {
            Source::Parse(b) | Source::Prepare(b) => b.len(),
            Source::Lost => 0,
        }
    }
}

/// A prepared statement the session has (from a Parse or an SQL-level PREPARE): how it
/// routes, and what prepares it again on a mirror that lacks it.
struct Replayable {
    class: Class,
    copy_from: bool,
    source: Source,
    fingerprint: u64,
    /// What running it does to the transaction block (for the settings' bookkeeping).
    transaction: Option<sql::Transaction>,
    /// It changes a session setting (SET, ... sent through the extended protocol).
    setting: bool,
    /// The text of an SQL-level prepared-statement command (PREPARE, EXECUTE, DEALLOCATE)
    /// sent through the extended protocol: what it does is resolved when it runs.
    command: Option<Bytes>,
}

/// A portal the client bound: what its statement said when bound, and the statement's name
/// (a mirror has the portal only where it has that statement).
struct BoundPortal {
    class: Class,
    copy_from: bool,
    statement: String,
    fingerprint: u64,
    transaction: Option<sql::Transaction>,
    /// A setting bound without parameters: its text alone replays it.
    setting: bool,
    command: Option<Bytes>,
}

/// One statement of a simple Query, with what routing it needs.
struct Part {
    range: Range<usize>,
    class: Class,
    prepared: Option<SqlPrepared>,
}

/// An SQL-level prepared-statement command, resolved against the session's statements as
/// they were at that point of the Query.
enum SqlPrepared {
    /// `tracked`: within `proxy.session-names-max` (untracked ones are never mirrored).
    Prepare {
        name: String,
        tracked: bool,
    },
    /// `source` is `None` when the session has no such statement (as far as pgprism knows):
    /// the primary rejects it, and it is not mirrored.
    Execute {
        name: String,
        source: Option<Source>,
    },
    Deallocate {
        name: String,
    },
    /// DEALLOCATE ALL, DISCARD ALL.
    DeallocateAll,
}

pub struct Router {
    links: Vec<Rc<Link>>,
    fingerprints: Rc<Fingerprints>,
    statements: HashMap<String, Replayable>,
    portals: HashMap<String, BoundPortal>,
    /// Fingerprint of the last statement seen, for the latency of the next sync point.
    last_fingerprint: u64,
    /// Bytes held by the statements' sources (bounded by `KEPT_TEXT_BYTES_MAX`).
    kept_bytes: usize,
    /// The session's settings, for replay onto a mirror session that lost them.
    settings: Settings,
    /// A DISCARD ALL was classified: the portals go once the frame is routed.
    discard_portals: bool,
    /// Prepared statements and portals tracked at most (`proxy.session-names-max`).
    names_max: usize,
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

/// How one frame relates to the statement bookkeeping, computed once for all links.
enum Route<'a> {
    /// A simple Query: one statement (`single`, `parts` empty, no allocation: the common
    /// case) or several (`parts`).
    Query {
        sql: &'a [u8],
        single: Part,
        parts: Vec<Part>,
    },
    Parse {
        name: &'a str,
    },
    Bind {
        statement: &'a str,
    },
    Execute {
        portal: &'a str,
        /// An SQL-level prepared-statement command, resolved as it runs.
        command: Option<Part>,
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
    /// `limits`: the session's bounds (`proxy.session-names-max`: prepared statements and
    /// portals tracked; beyond it new names are not tracked and what uses them is not
    /// mirrored, counted as filtered; `proxy.session-settings-max`: settings kept).
    pub fn new(
        links: Vec<Rc<Link>>,
        fingerprints: Rc<Fingerprints>,
        limits: crate::session::Limits,
    ) -> Router {
        Router {
            links,
            fingerprints,
            statements: HashMap::new(),
            portals: HashMap::new(),
            last_fingerprint: 0,
            kept_bytes: 0,
            settings: Settings::new(limits.settings_max),
            names_max: limits.names_max,
            discard_portals: false,
        }
    }

    pub fn links(&self) -> &[Rc<Link>] {
        &self.links
    }

    /// A client batch starts; `boundary` says the session is idle outside a transaction, so
    /// links skipping a cut transaction may resume (with the session's settings replayed
    /// first when they lost them).
    pub fn begin_batch(&mut self, boundary: bool) {
        if boundary {
            self.settings.idle();
            for link in &self.links {
                if link.at_boundary() {
                    for setting in self.settings.frames() {
                        link.replay(setting.clone());
                    }
                }
            }
        }
    }

    /// Tracks a statement the session now has, within the name and byte bounds. Returns
    /// whether it is tracked.
    fn insert_statement(
        &mut self,
        name: &str,
        source: impl FnOnce() -> Source,
        source_bytes: usize,
        statement: impl FnOnce(Source) -> Replayable,
    ) -> bool {
        if self.statements.len() >= self.names_max && !self.statements.contains_key(name) {
            return false;
        }
        self.remove_statement(name);
        let source = if self.kept_bytes + source_bytes <= KEPT_TEXT_BYTES_MAX {
            self.kept_bytes += source_bytes;
            source()
        } else {
            Source::Lost
        };
        self.statements.insert(name.to_string(), statement(source));
        true
    }

    fn remove_statement(&mut self, name: &str) {
        if let Some(old) = self.statements.remove(name) {
            self.kept_bytes -= old.source.bytes();
        }
    }

    fn clear_statements(&mut self) {
        self.statements.clear();
        self.kept_bytes = 0;
    }

    /// Classifies one statement of a simple Query and updates the session's bookkeeping
    /// (SQL-level prepared statements, settings, transaction blocks) as running it does.
    fn part(&mut self, sql: &[u8], range: Range<usize>) -> Part {
        let text = &sql[range.clone()];
        let mut class = sql::classify(text);
        let prepared = sql::prepared(text).map(|p| self.track_prepared(text, p, &mut class));
        self.follow_statement(text, class);
        Part {
            range,
            class,
            prepared,
        }
    }

    /// Updates the session's statements for an SQL-level prepared-statement command in
    /// `text` and resolves it; `class` becomes that of what it prepares or runs.
    fn track_prepared(
        &mut self,
        text: &[u8],
        prepared: Prepared,
        class: &mut Class,
    ) -> SqlPrepared {
        match prepared {
            Prepared::Prepare { name, body } => {
                *class = sql::classify(&text[body..]);
                let tracked = self.track_prepare(&name, text, body, *class);
                SqlPrepared::Prepare { name, tracked }
            }
            Prepared::Execute { name, runs } => {
                let source = self.statements.get(&name).map(|s| {
                    // A plain EXPLAIN only plans it.
                    *class = if runs { s.class } else { Class::Select };
                    s.source.clone()
                });
                SqlPrepared::Execute { name, source }
            }
            // DDL (it passes as DDL) that needs the statement on the mirror, as EXECUTE does.
            Prepared::CreateTableAsExecute { name } => {
                let source = self.statements.get(&name).map(|s| s.source.clone());
                SqlPrepared::Execute { name, source }
            }
            Prepared::Deallocate { name } => {
                self.remove_statement(&name);
                SqlPrepared::Deallocate { name }
            }
            Prepared::DeallocateAll => {
                self.clear_statements();
                SqlPrepared::DeallocateAll
            }
            Prepared::DiscardAll => {
                self.clear_statements();
                // After routing: a DISCARD ALL run through Execute still needs its own portal.
                self.discard_portals = true;
                SqlPrepared::DeallocateAll
            }
        }
    }

    /// Tracks the statement an SQL-level `PREPARE` (`text`, preparing `text[body..]` of
    /// class `class`) creates. Returns whether it is tracked.
    fn track_prepare(&mut self, name: &str, text: &[u8], body: usize, class: Class) -> bool {
        let fingerprint = self.fingerprints.intern(&text[body..]);
        self.insert_statement(
            name,
            || Source::Prepare(Bytes::copy_from_slice(text)),
            text.len(),
            |source| Replayable {
                class,
                // COPY cannot be prepared.
                copy_from: false,
                source,
                fingerprint,
                transaction: None,
                setting: false,
                command: None,
            },
        )
    }

    /// Follows what running a statement of a simple Query does to the session's settings
    /// and transaction block.
    fn follow_statement(&mut self, text: &[u8], class: Class) {
        match class {
            Class::Session => {
                if let Some(setting) = sql::setting(text) {
                    self.settings.change(setting, text);
                }
            }
            Class::Transaction => {
                if let Some(transaction) = sql::transaction(text) {
                    self.settings.transaction(transaction);
                }
            }
            _ => {}
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
                self.remove_statement(name);
            }
            Route::ClosePortal { name } => {
                self.portals.remove(name);
            }
            _ => {}
        }
        if std::mem::take(&mut self.discard_portals) {
            self.portals.clear();
        }
    }

    /// Updates the session bookkeeping for one frame and says how to route it.
    fn classify<'a>(&mut self, tag_byte: u8, frame: &Bytes, body: &'a [u8]) -> Option<Route<'a>> {
        Some(match tag_byte {
            tag::QUERY => self.classify_query(body),
            tag::PARSE => self.classify_parse(frame, body)?,
            tag::BIND => self.classify_bind(body)?,
            tag::EXECUTE => self.classify_execute(body)?,
            tag::DESCRIBE => match wire::Describe::new(body).target().ok()? {
                (ObjectKind::Statement, name) => Route::DescribeStatement { name },
                (ObjectKind::Portal, name) => Route::Portal { name },
            },
            // The names are forgotten after routing (see `route`): a closed name may be reused,
            // and drivers that number their statements would otherwise fill the table.
            tag::CLOSE => match wire::Close::new(body).target().ok()? {
                (ObjectKind::Statement, name) => Route::CloseStatement { name },
                (ObjectKind::Portal, name) => Route::ClosePortal { name },
            },
            tag::SYNC => Route::Sync,
            tag::FLUSH => Route::Flush,
            tag::COPY_DATA => Route::Copy { ends: false },
            tag::COPY_DONE | tag::COPY_FAIL => Route::Copy { ends: true },
            tag::FUNCTION_CALL => Route::FunctionCall,
            _ => Route::Never,
        })
    }

    /// A simple Query: its fingerprint, and its statements classified in order.
    fn classify_query<'a>(&mut self, body: &'a [u8]) -> Route<'a> {
        let sql = body.strip_suffix(&[0]).unwrap_or(body);
        self.last_fingerprint = self.fingerprints.intern(sql);
        let ranges = if memchr::memchr(b';', sql).is_some() {
            sql::split_statements(sql)
        } else {
            Vec::new()
        };
        // A lone trailing `;` splits into one part: treat it as a single statement.
        if ranges.len() <= 1 {
            let range = ranges.into_iter().next().unwrap_or(0..sql.len());
            let single = self.part(sql, range);
            Route::Query {
                sql,
                single,
                parts: Vec::new(),
            }
        } else {
            let parts = ranges.into_iter().map(|r| self.part(sql, r)).collect();
            Route::Query {
                sql,
                single: Part {
                    range: 0..0,
                    class: Class::Other,
                    prepared: None,
                },
                parts,
            }
        }
    }

    /// A Parse: the session now has its statement (within the bounds), kept for replay.
    fn classify_parse<'a>(&mut self, frame: &Bytes, body: &'a [u8]) -> Option<Route<'a>> {
        let (name, query, _) = wire::Parse::new(body).parts().ok()?;
        let query = query.as_bytes();
        let command = sql::prepared(query).map(|_| Bytes::copy_from_slice(query));
        // A command's Parse, Bind and Describe reach every mirror (preparing or
        // describing `EXECUTE x` runs nothing); whether its Execute goes depends on
        // what it prepares, runs or drops, decided when it runs.
        let class = if command.is_some() {
            Class::Session
        } else {
            sql::classify(query)
        };
        let fingerprint = self.fingerprints.intern(query);
        let transaction = match class {
            Class::Transaction => sql::transaction(query),
            _ => None,
        };
        let setting = class == Class::Session && sql::setting(query).is_some();
        self.insert_statement(
            name,
            || Source::Parse(Bytes::copy_from_slice(frame)),
            frame.len(),
            |source| Replayable {
                class,
                copy_from: sql::copy(query) == Some(sql::Copy::FromStdin),
                source,
                fingerprint,
                transaction,
                setting,
                command,
            },
        );
        Some(Route::Parse { name })
    }

    /// A Bind: its portal takes what routing needs from its statement (or is forgotten when
    /// the statement is unknown or the portals are at their bound).
    fn classify_bind<'a>(&mut self, body: &'a [u8]) -> Option<Route<'a>> {
        let bind = wire::Bind::new(body);
        let (portal, statement) = (bind.portal().ok()?, bind.statement().ok()?);
        if let Some(s) = self.statements.get(statement)
            && (self.portals.len() < self.names_max || self.portals.contains_key(portal))
        {
            self.portals.insert(
                portal.to_string(),
                BoundPortal {
                    class: s.class,
                    copy_from: s.copy_from,
                    statement: statement.to_string(),
                    fingerprint: s.fingerprint,
                    transaction: s.transaction,
                    setting: s.setting && bind.params().is_ok_and(|params| params.is_empty()),
                    command: s.command.clone(),
                },
            );
        } else {
            self.portals.remove(portal);
        }
        Some(Route::Bind { statement })
    }

    /// An Execute: the session's bookkeeping as running its portal does it.
    fn classify_execute<'a>(&mut self, body: &'a [u8]) -> Option<Route<'a>> {
        let portal = wire::Execute::new(body).portal().ok()?;
        let command = self.portals.get(portal).and_then(|p| p.command.clone());
        if let Some(text) = command {
            // Bookkeeping as a simple Query's PREPARE, EXECUTE or DEALLOCATE does it.
            self.last_fingerprint = self.portals.get(portal).map_or(0, |p| p.fingerprint);
            let command = self.part(&text, 0..text.len());
            return Some(Route::Execute {
                portal,
                command: Some(command),
            });
        }
        self.follow_portal(portal);
        Some(Route::Execute {
            portal,
            command: None,
        })
    }

    /// Follows what running a portal (no prepared-statement command) does to the session:
    /// the fingerprint of the next sync point, the transaction block and the settings.
    fn follow_portal(&mut self, portal: &str) {
        let Some(p) = self.portals.get(portal) else {
            return;
        };
        self.last_fingerprint = p.fingerprint;
        if let Some(transaction) = p.transaction {
            self.settings.transaction(transaction);
        }
        if p.setting
            && let Some(Source::Parse(parse)) = self.statements.get(&p.statement).map(|s| &s.source)
            && let Ok((_, query, _)) = wire::Parse::new(&parse[wire::HEADER_BYTES..]).parts()
            && let Some(setting) = sql::setting(query.as_bytes())
        {
            self.settings.change(setting, query.as_bytes());
        }
    }

    /// Routes one classified frame to one link.
    async fn route_one(&self, link: &Rc<Link>, route: &Route<'_>, frame: &Bytes) {
        match route {
            Route::Query { sql, single, parts } => {
                let parts = if parts.is_empty() {
                    std::slice::from_ref(single)
                } else {
                    &parts[..]
                };
                self.route_query(link, sql, parts, frame).await;
            }
            Route::Parse { name } => self.route_parse(link, name, frame).await,
            Route::Bind { statement } => self.route_bind(link, statement, frame).await,
            Route::Execute { portal, command } => {
                self.route_execute(link, portal, command.as_ref(), frame)
                    .await;
            }
            Route::DescribeStatement { name } => {
                if link.prepared.borrow().contains(*name) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            // Describe or Close a portal: only where it passes and the mirror has its statement.
            Route::Portal { name } | Route::ClosePortal { name } => {
                if self.portals.get(*name).is_some_and(|p| {
                    passes(&link.target.cfg, p.class)
                        && link.prepared.borrow().contains(&p.statement)
                }) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::CloseStatement { name } => {
                if link.prepared.borrow_mut().remove(*name) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::Sync => self.route_sync(link, frame).await,
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
                if link.target.cfg.queries == QueryFilter::All {
                    self.send(link, frame.clone(), Some(0), true).await;
                }
            }
            Route::Never => {}
        }
    }

    /// Routes a Parse to one link: only if its statement's class passes the link's filter.
    async fn route_parse(&self, link: &Rc<Link>, name: &str, frame: &Bytes) {
        let wanted = self
            .statements
            .get(name)
            .is_some_and(|s| passes(&link.target.cfg, s.class));
        if wanted {
            if self.send(link, frame.clone(), None, false).await {
                link.prepared.borrow_mut().insert(name.to_string());
            }
        } else {
            // The mirror's statement of that name (if any) is now stale: anything bound
            // to the name is skipped from here on, because its class does not pass.
            MirrorStats::bump(&link.target.stats.counters.skipped_filter, 1);
        }
    }

    /// Routes a Bind to one link: only if its statement passes, prepared again first where
    /// the mirror lacks it.
    async fn route_bind(&self, link: &Rc<Link>, statement: &str, frame: &Bytes) {
        let Some(s) = self.statements.get(statement) else {
            return;
        };
        if !passes(&link.target.cfg, s.class) {
            return;
        }
        // The mirror lost or never got this statement (skipped, reconnected): prepare
        // it again before binding. Text not kept: the Bind is skipped, and so is its
        // Execute (counted there).
        if link.accepting()
            && !link.prepared.borrow().contains(statement)
            && self
                .prepare_again(link, statement, &s.source)
                .await
                .is_none()
        {
            return;
        }
        self.send(link, frame.clone(), None, false).await;
    }

    /// Routes an Execute to one link: only if its class passes and the mirror has its
    /// statement; an SQL-level prepared-statement command is resolved as it runs.
    async fn route_execute(
        &self,
        link: &Rc<Link>,
        portal: &str,
        command: Option<&Part>,
        frame: &Bytes,
    ) {
        let stats = &link.target.stats;
        let Some(p) = self.portals.get(portal) else {
            return;
        };
        let class = command.map_or(p.class, |c| c.class);
        if !passes(&link.target.cfg, class) {
            MirrorStats::bump(&stats.counters.skipped_filter, 1);
            return;
        }
        if link.accepting() && !link.prepared.borrow().contains(&p.statement) {
            MirrorStats::bump(&stats.counters.skipped_unprepared, 1);
            return;
        }
        if let Some(prepared) = command.and_then(|c| c.prepared.as_ref()) {
            self.execute_command(link, prepared, frame).await;
            return;
        }
        let copy = p.copy_from;
        if self.send(link, frame.clone(), None, true).await && copy {
            link.copy_active.set(true);
        }
    }

    /// Routes a Sync to one link: a sync point when the link has frames it closes.
    async fn route_sync(&self, link: &Rc<Link>, frame: &Bytes) {
        // During a COPY FROM STDIN started by Execute the server ignores Sync (no
        // ReadyForQuery follows): forward it, but not as a sync point.
        if link.copy_active.get() {
            self.send(link, frame.clone(), None, false).await;
        } else if link.pending_sync.get()
            && self
                .send(link, frame.clone(), Some(self.last_fingerprint), false)
                .await
        {
            link.pending_sync.set(false);
        }
    }

    /// Prepares statement `name` again on a link that lacks it, from the client's own Parse
    /// or PREPARE text (counted as `reprepared`). `Some(queued)`, or `None` when that text was
    /// not kept or cannot be encoded.
    async fn prepare_again(&self, link: &Rc<Link>, name: &str, source: &Source) -> Option<bool> {
        let frames = match source {
            Source::Parse(parse) => parse.clone(),
            Source::Prepare(text) => prepare_in_batch(text)?,
            Source::Lost => return None,
        };
        let queued = self.send(link, frames, None, false).await;
        if queued {
            MirrorStats::bump(&link.target.stats.counters.reprepared, 1);
            link.prepared.borrow_mut().insert(name.to_string());
        }
        Some(queued)
    }

    /// Runs an SQL-level prepared-statement command that came through the extended protocol
    /// (its class passed the filter) on one link, as `route_query` does for a simple Query:
    /// an EXECUTE only if the mirror has (or is given again) its statement, a DEALLOCATE only
    /// if the mirror has it.
    async fn execute_command(&self, link: &Rc<Link>, prepared: &SqlPrepared, frame: &Bytes) {
        let stats = &link.target.stats;
        match prepared {
            SqlPrepared::Prepare { name, tracked } => {
                if !tracked {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                } else if self.send(link, frame.clone(), None, true).await {
                    link.prepared.borrow_mut().insert(name.clone());
                }
            }
            SqlPrepared::Execute { name, source } => {
                // Unknown: the primary rejects it, and it is not mirrored.
                let Some(source) = source else {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                    return;
                };
                if link.accepting() && !link.prepared.borrow().contains(name) {
                    match self.prepare_again(link, name, source).await {
                        Some(true) => {}
                        Some(false) => return,
                        None => {
                            MirrorStats::bump(&stats.counters.skipped_unprepared, 1);
                            return;
                        }
                    }
                }
                self.send(link, frame.clone(), None, true).await;
            }
            SqlPrepared::Deallocate { name } => {
                // Only where it exists: else the mirror would fail where the primary did not.
                if link.prepared.borrow().contains(name)
                    && self.send(link, frame.clone(), None, true).await
                {
                    link.prepared.borrow_mut().remove(name);
                }
            }
            SqlPrepared::DeallocateAll => {
                if self.send(link, frame.clone(), None, true).await {
                    forget_named(&mut link.prepared.borrow_mut());
                }
            }
        }
    }

    /// Routes a simple Query to one link: the statements that pass its filter, each EXECUTE
    /// only if the mirror has (or is given again) its statement, each DEALLOCATE only if the
    /// mirror has it. The client's frame goes as is when nothing changes, else a Query with
    /// the statements that pass (and PREPAREs the mirror lacks, before their EXECUTE).
    async fn route_query(&self, link: &Rc<Link>, sql: &[u8], parts: &[Part], frame: &Bytes) {
        if let [part] = parts
            && part.prepared.is_none()
        {
            self.route_statement(link, sql, part, frame).await;
            return;
        }
        let stats = &link.target.stats;
        let mut plan = QueryPlan::new(&link.target.cfg, &link.prepared.borrow(), parts);
        if plan.filtered {
            MirrorStats::bump(&stats.counters.skipped_filter, 1);
        }
        MirrorStats::bump(&stats.counters.skipped_unprepared, plan.unprepared);
        if plan.send.is_empty() {
            return;
        }
        let Some(out) = plan.frame(sql, parts, frame) else {
            return;
        };
        if !self
            .send_parses(link, std::mem::take(&mut plan.parses))
            .await
        {
            return;
        }
        let statement = plan
            .send
            .iter()
            .any(|(i, _)| parts[*i].class != Class::Empty);
        let copy = plan.send.iter().any(|(i, _)| copies_from(sql, &parts[*i]));
        if !self
            .send(link, out, Some(self.last_fingerprint), statement)
            .await
        {
            return;
        }
        if copy {
            link.copy_active.set(true);
        }
        MirrorStats::bump(&stats.counters.reprepared, plan.reprepared);
        plan.commit(&mut link.prepared.borrow_mut());
    }

    /// Routes a Query of one statement that is no prepared-statement command to one link:
    /// the common case, the client's frame as is, without allocation.
    async fn route_statement(&self, link: &Rc<Link>, sql: &[u8], part: &Part, frame: &Bytes) {
        if !passes(&link.target.cfg, part.class) {
            MirrorStats::bump(&link.target.stats.counters.skipped_filter, 1);
            return;
        }
        let statement = part.class != Class::Empty;
        if self
            .send(link, frame.clone(), Some(self.last_fingerprint), statement)
            .await
            && copies_from(sql, part)
        {
            link.copy_active.set(true);
        }
    }

    /// Queues the Parse frames of protocol-level statements a Query's EXECUTEs need, then a
    /// Sync so that a failing Parse cannot make the mirror ignore the Query (it skips
    /// everything up to a Sync). Returns whether all were queued (true when there are none).
    async fn send_parses(&self, link: &Rc<Link>, parses: Vec<Bytes>) -> bool {
        if parses.is_empty() {
            return true;
        }
        for parse in parses {
            if !self.send(link, parse, None, false).await {
                return false;
            }
        }
        let mut sync = BytesMut::new();
        wire::encode::sync(&mut sync);
        if !self.send(link, sync.freeze(), Some(0), false).await {
            return false;
        }
        link.pending_sync.set(false);
        true
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

/// Whether a statement of a simple Query starts a COPY FROM STDIN.
fn copies_from(sql: &[u8], part: &Part) -> bool {
    part.class == Class::Dml && sql::copy(&sql[part.range.clone()]) == Some(sql::Copy::FromStdin)
}

/// How a simple Query goes to one link.
#[derive(Default)]
struct QueryPlan {
    /// The parts sent, in order, each with the PREPARE text to run right before it.
    send: Vec<(usize, Option<Bytes>)>,
    /// Parse frames of protocol-level statements to prepare again before the Query.
    parses: Vec<Bytes>,
    /// The mirror's prepared names once the Query ran: all gone first (`cleared`), then
    /// these present (true) or gone (false).
    cleared: bool,
    changed: Vec<(String, bool)>,
    /// Some statement did not pass the filter.
    filtered: bool,
    /// EXECUTEs skipped: their statement is missing on the mirror and was not kept.
    unprepared: u64,
    reprepared: u64,
}

/// The mirror's prepared names as a simple Query goes: the link's set before it (`before`,
/// not copied) and the changes over it so far.
struct NamesAsRun<'p, 'q> {
    before: &'p HashSet<String>,
    changed: HashMap<&'q str, bool>,
    cleared: bool,
}

impl NamesAsRun<'_, '_> {
    /// Whether the mirror has statement `name` at this point of the Query.
    fn has(&self, name: &str) -> bool {
        self.changed
            .get(name)
            .copied()
            .unwrap_or_else(|| !self.cleared && self.before.contains(name))
    }
}

impl QueryPlan {
    /// Plans a simple Query of several statements (or a prepared-statement command) for a
    /// link with filter `cfg` and prepared names `prepared`.
    fn new(cfg: &MirrorConfig, prepared: &HashSet<String>, parts: &[Part]) -> QueryPlan {
        let mut plan = QueryPlan::default();
        let mut names = NamesAsRun {
            before: prepared,
            changed: HashMap::new(),
            cleared: false,
        };
        for (i, part) in parts.iter().enumerate() {
            plan.part(&mut names, i, part, passes(cfg, part.class));
        }
        plan.cleared = names.cleared;
        plan.changed = names
            .changed
            .into_iter()
            .map(|(name, has)| (name.to_string(), has))
            .collect();
        plan
    }

    /// Plans part `i` (`pass`: its class passes the link's filter).
    fn part<'q>(&mut self, names: &mut NamesAsRun<'_, 'q>, i: usize, part: &'q Part, pass: bool) {
        match &part.prepared {
            None | Some(SqlPrepared::Prepare { tracked: true, .. }) if pass => {
                if let Some(SqlPrepared::Prepare { name, .. }) = &part.prepared {
                    names.changed.insert(name, true);
                }
                self.send.push((i, None));
            }
            // Filtered, or a PREPARE beyond the name bound. A statement of that name
            // the mirror still has is stale: whatever uses the name is filtered too.
            None | Some(SqlPrepared::Prepare { .. }) => self.filtered = true,
            Some(SqlPrepared::Execute { name, source }) => {
                self.execute(names, i, name, source.as_ref().filter(|_| pass));
            }
            Some(SqlPrepared::Deallocate { name }) => {
                // Only where it exists: else the mirror would fail where the primary
                // did not (and abort the transaction it is in).
                if names.has(name) {
                    names.changed.insert(name, false);
                    self.send.push((i, None));
                }
            }
            Some(SqlPrepared::DeallocateAll) => {
                names.changed.clear();
                names.cleared = true;
                self.send.push((i, None));
            }
        }
    }

    /// Plans an EXECUTE (part `i`) of statement `name`: `source` is `None` when it is
    /// filtered or unknown. It goes where the mirror has the statement or can be given it
    /// again right before.
    fn execute<'q>(
        &mut self,
        names: &mut NamesAsRun<'_, 'q>,
        i: usize,
        name: &'q str,
        source: Option<&Source>,
    ) {
        let Some(source) = source else {
            self.filtered = true;
            return;
        };
        if names.has(name) {
            self.send.push((i, None));
            return;
        }
        // The mirror lacks it (filtered, reconnected, cut): prepare it again.
        match source {
            Source::Prepare(text) => self.send.push((i, Some(text.clone()))),
            Source::Parse(parse) => {
                self.parses.push(parse.clone());
                self.send.push((i, None));
            }
            Source::Lost => {
                self.unprepared += 1;
                return;
            }
        }
        self.reprepared += 1;
        names.changed.insert(name, true);
    }

    /// The Query frame the link gets: the client's own when every part goes unchanged, else
    /// one of the parts sent (PREPAREs before their EXECUTE). `None` when the text is not
    /// UTF-8 or holds a NUL: the primary rejects it too.
    fn frame(&self, sql: &[u8], parts: &[Part], frame: &Bytes) -> Option<Bytes> {
        let verbatim = self.send.len() == parts.len()
            && self.parses.is_empty()
            && self.send.iter().all(|(_, prepare)| prepare.is_none());
        if verbatim {
            return Some(frame.clone());
        }
        let mut text = Vec::with_capacity(sql.len());
        for (i, prepare) in &self.send {
            if let Some(prepare) = prepare {
                text.extend_from_slice(prepare);
                text.push(b';');
            }
            text.extend_from_slice(&sql[parts[*i].range.clone()]);
            text.push(b';');
        }
        let mut out = BytesMut::with_capacity(text.len() + 6);
        let text = std::str::from_utf8(&text).ok()?;
        wire::encode::query(&mut out, text).ok()?;
        Some(out.freeze())
    }

    /// Applies the Query's changes to the link's prepared names once it is queued.
    fn commit(self, prepared: &mut HashSet<String>) {
        if self.cleared {
            forget_named(prepared);
        }
        for (name, has) in self.changed {
            if has {
                prepared.insert(name);
            } else {
                prepared.remove(&name);
            }
        }
    }
}

/// DEALLOCATE ALL and DISCARD ALL drop every named statement; the protocol's unnamed one
/// stays (only the next Parse or simple Query replaces it).
fn forget_named(prepared: &mut HashSet<String>) {
    prepared.retain(|name| name.is_empty());
}

/// Frames that run a client's PREPARE text on a mirror in the middle of an extended-protocol
/// batch (a simple Query there would end the batch): through a statement and a portal of
/// pgprism's own, closed again. `None` when the text cannot be encoded (it then
/// could not have run on the primary either).
fn prepare_in_batch(text: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(text).ok()?;
    let mut out = BytesMut::new();
    wire::encode::parse(&mut out, REPREPARE_STATEMENT, text, &[]).ok()?;
    wire::encode::bind(
        &mut out,
        REPREPARE_PORTAL,
        REPREPARE_STATEMENT,
        &[],
        &[],
        &[],
    )
    .ok()?;
    wire::encode::execute(&mut out, REPREPARE_PORTAL, 0).ok()?;
    wire::encode::close(&mut out, ObjectKind::Portal, REPREPARE_PORTAL).ok()?;
    wire::encode::close(&mut out, ObjectKind::Statement, REPREPARE_STATEMENT).ok()?;
    Some(out.freeze())
}
