//! Per-session routing of client frames to mirrors: query filters, prepared statements and
//! portals followed so a mirror never sees a Bind or an EXECUTE for a statement it did not get
//! (it is re-prepared from the client's own Parse or PREPARE, or skipped with everything that
//! depends on it), COPY data following its COPY, session settings kept for replay, and the
//! overflow policy.
//!
//! The session's statements and portals are the tracker's (`session::Tracker`): each frame
//! comes with what the tracker resolved it to (`session::Refers`, and for prepared-statement
//! commands `session::Applied`), and what routing derives from a prepared statement
//! ([`Mirrored`]: its class, the bytes that re-create it) lives in the statement's
//! `Slot::Mirror` extension. What stays here is each mirror link's own set of prepared names
//! (`Link::prepared`: the mirror server's state) and the settings to replay.
//!
//! For pooled mirrors it also says where a session's units end: at a sync point (or the end of
//! a simple Query's COPY) outside a transaction block, as far as the statements routed tell,
//! or when the session is found idle. A pooled link's names start empty with each unit, so a
//! unit prepares again whatever it uses; what a frame does to the names is noted on the link
//! (`Link::note`) for the pool connection that runs the unit.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::link::{Item, Link, Push};
use super::pool::{Names, Snapshot, signature};
use super::stats::MirrorStats;
use crate::config::{MirrorConfig, Overflow, QueryFilter};
use crate::session::{Applied, Framed, QueryPart, Refers, Settings, Slot, Statement, Step};
use crate::sql::{self, Class, Prepared};
use crate::stats::fingerprints::Fingerprints;
use crate::wire::{self, ObjectKind, tag};

/// Bytes of statement text kept per session to prepare a statement again on a mirror that
/// lost it: the client's Parse frames and SQL-level PREPARE texts together. Statements
/// beyond it are followed without their text, so a mirror that lacks one skips what uses it
/// (counted as `skipped_unprepared`) instead of preparing it again. A source's bytes leave
/// the count when its statement is dropped: when the tracker forgets the name and nothing
/// else (a portal bound from it, the batch list, compare's metadata) still holds it, so a
/// replaced or closed statement may count a little longer than its name lives.
const KEPT_TEXT_BYTES_MAX: usize = 4 << 20;

/// The statement and portal pgprism uses on a mirror to run a client's PREPARE text in the
/// middle of an extended-protocol batch (both closed right after). Named, so the client's
/// unnamed statement, and portals bound from it, are left alone.
const REPREPARE_STATEMENT: &str = "pgprism_reprepare";
const REPREPARE_PORTAL: &str = "pgprism_reprepare";

/// What creates a statement again on a mirror session that lacks it. Its own copy: kept for
/// the statement's life, it must not pin the read buffer it arrived in.
#[derive(Clone)]
enum Source {
    /// The client's Parse frame.
    Parse(Bytes),
    /// The text of the client's `PREPARE name ... AS ...` statement.
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

    /// What tells this statement from another of the same name on a pooled connection.
    fn ident(&self) -> Option<Bytes> {
        match self {
            Source::Parse(b) | Source::Prepare(b) => Some(b.clone()),
            Source::Lost => None,
        }
    }
}

/// A statement prepared again before what needs it: its frames, its name and its `ident`.
struct Reprepare {
    frames: Bytes,
    name: String,
    ident: Option<Bytes>,
}

/// Where a prepared statement came from, when routing first meets it.
enum Origin<'a> {
    /// A Parse: the client's frame.
    Parse(&'a [u8]),
    /// An SQL-level `PREPARE`: its text.
    Prepare(&'a [u8]),
    /// Met after it was made (not expected: routing sees every frame the tracker saw).
    Unseen,
}

/// What routing derives from a prepared statement (a Parse or an SQL-level PREPARE), once,
/// in its `Slot::Mirror` extension: how it routes, and what prepares it again on a mirror
/// that lacks it.
struct Mirrored {
    class: Class,
    copy_from: bool,
    source: Source,
    fingerprint: u64,
    /// What running it does to the transaction block (for the settings' bookkeeping).
    transaction: Option<sql::Transaction>,
    /// It changes a session setting (SET, ... sent through the extended protocol).
    setting: bool,
    /// An SQL-level prepared-statement command (PREPARE, EXECUTE, DEALLOCATE) sent through
    /// the extended protocol: what it does is resolved when it runs.
    command: bool,
    /// The session's count of kept source bytes, given back when the statement goes.
    kept: Rc<Cell<usize>>,
}

impl Drop for Mirrored {
    fn drop(&mut self) {
        self.kept.set(self.kept.get() - self.source.bytes());
    }
}

/// A prepared statement by the name the mirror links know it under, with what routing
/// derived from it.
type Named<'a> = (&'a str, Rc<Mirrored>);

/// One statement of a simple Query, with what routing it needs.
struct Part<'a> {
    range: Range<usize>,
    class: Class,
    prepared: Option<SqlPrepared<'a>>,
}

impl<'a> Route<'a> {
    /// A simple Query of several statements (`single` unused).
    fn several(sql: &'a [u8], parts: Vec<Part<'a>>) -> Route<'a> {
        let single = Part {
            range: 0..0,
            class: Class::Other,
            prepared: None,
        };
        Route::Query { sql, single, parts }
    }
}

/// An SQL-level prepared-statement command, resolved against the session's statements as
/// they were at that point of the Query.
enum SqlPrepared<'a> {
    /// `tracked`: within `proxy.session-names-max` (untracked ones are never mirrored);
    /// `ident`: its text, as kept.
    Prepare {
        name: &'a str,
        tracked: bool,
        ident: Option<Bytes>,
    },
    /// `source` is `None` when the session has no such statement (as far as pgprism knows):
    /// the primary rejects it, and it is not mirrored.
    Execute {
        name: &'a str,
        source: Option<Source>,
    },
    Deallocate {
        name: &'a str,
    },
    /// DEALLOCATE ALL, DISCARD ALL.
    DeallocateAll,
}

pub struct Router {
    links: Vec<Rc<Link>>,
    /// The session tracker's number of the client sync point being routed (for cancels:
    /// each frame queued carries it).
    sync_number: u64,
    fingerprints: Rc<Fingerprints>,
    /// Fingerprint of the last statement seen, for the latency of the next sync point.
    last_fingerprint: u64,
    /// Bytes held by the statements' sources (bounded by `KEPT_TEXT_BYTES_MAX`), shared with
    /// each statement's [`Mirrored`], which gives its bytes back when it goes.
    kept: Rc<Cell<usize>>,
    /// Some link is pooled: the session's units are delimited.
    pooled: bool,
    /// A transaction block is open, as far as the statements routed tell.
    in_block: bool,
    /// Statements run since the last sync point (a simple Query counts each of its own).
    region_statements: usize,
    /// Since the last sync point a block ended after another statement of the same sync
    /// point: had that one failed, the end was skipped and the primary is still in the
    /// (failed) block, which only its ReadyForQuery tells.
    region_unsure: bool,
    /// Since the last sync point a block ended by the sync point's first statement (a
    /// COMMIT or ROLLBACK ends a block, failed or not).
    region_sure_end: bool,
    /// The open unit reached a sync point where the primary may still be in a block
    /// (`region_unsure`): it is handed over when the next batch finds the session idle, and
    /// goes on as a block otherwise.
    deferred: bool,
    /// Every pooled link has a unit open (its settings at the start taken).
    unit_open: bool,
    /// The open unit holds transaction control: it may end inside a block on the mirror.
    unit_block: bool,
    /// The open unit changed a setting the snapshots do not capture (bound with parameters).
    untracked: bool,
    /// The last snapshot of `settings` taken (reused while they do not change).
    snapshot: Rc<Snapshot>,
    /// The session's settings, for replay onto a mirror session that lost them. Routing's
    /// own: the tracker keeps settings only when a mode asks (`session::Limits::settings`),
    /// and these follow what the mirrors were sent (a parameterless extended-protocol SET
    /// replays from its text).
    settings: Settings,
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
        single: Part<'a>,
        parts: Vec<Part<'a>>,
    },
    /// `None`: beyond `proxy.session-names-max`, not followed.
    Parse {
        statement: Option<Named<'a>>,
    },
    /// `None`: its statement is unknown.
    Bind {
        statement: Option<Named<'a>>,
    },
    /// `None`: its portal or the portal's statement is unknown.
    Execute {
        statement: Option<Named<'a>>,
        /// An SQL-level prepared-statement command, resolved as it runs.
        command: Option<Part<'a>>,
    },
    DescribeStatement {
        name: &'a str,
    },
    /// Describe or Close a portal: `None` when it or its statement is unknown.
    Portal {
        statement: Option<Named<'a>>,
    },
    CloseStatement {
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
    /// `limits`: the session's bounds (`proxy.session-settings-max`: settings kept; the
    /// names the tracker keeps, `proxy.session-names-max`, bound what routing follows:
    /// beyond it what uses a new name is not mirrored, counted as filtered).
    pub fn new(
        links: Vec<Rc<Link>>,
        fingerprints: Rc<Fingerprints>,
        limits: crate::session::Limits,
    ) -> Router {
        let pooled = links.iter().any(|l| l.pooled());
        Router {
            links,
            sync_number: 0,
            fingerprints,
            last_fingerprint: 0,
            kept: Rc::new(Cell::new(0)),
            pooled,
            in_block: false,
            region_statements: 0,
            region_unsure: false,
            region_sure_end: false,
            deferred: false,
            unit_open: false,
            unit_block: false,
            untracked: false,
            snapshot: Rc::new(Snapshot::new(Vec::new())),
            settings: Settings::new(limits.settings_max),
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
            if self.pooled {
                // Idle on the primary: a block still open here ended through a statement not
                // seen as such, and whatever the session sent is a whole unit.
                self.in_block = false;
                self.close_units(false);
            }
            for link in &self.links {
                if link.at_boundary() {
                    for setting in self.settings.frames() {
                        link.replay(setting.clone());
                    }
                }
            }
        } else if self.deferred {
            // Not idle after a unit whose end was unsure: the primary is still in a block (a
            // failed one, its COMMIT skipped) or still busy; the unit goes on until the
            // session is found idle or a block end is sure.
            self.deferred = false;
            self.in_block = true;
        }
    }

    /// The session's settings now, as a pooled unit carries them.
    fn snapshot(&mut self) -> Rc<Snapshot> {
        if signature(self.settings.frames()) != self.snapshot.sig {
            self.snapshot = Rc::new(Snapshot::new(self.settings.frames().cloned().collect()));
        }
        self.snapshot.clone()
    }

    /// Pooled links whose unit ends here hand it over (`copy_end`: at a CopyDone or
    /// CopyFail, which ends only a unit whose COPY came in a simple Query). A link with a
    /// COPY under way keeps its unit open.
    fn close_units(&mut self, copy_end: bool) {
        let after = self.snapshot();
        for link in &self.links {
            if !link.pooled() || link.copy_active.get() || (copy_end && !link.copy_ends_unit()) {
                continue;
            }
            link.close_unit(&after, self.untracked, self.unit_block || self.in_block);
            self.unit_open = false;
        }
        if !self.unit_open {
            self.untracked = false;
            self.deferred = false;
            self.unit_block = false;
        }
    }

    /// The open unit reached a sync point whose end is unsure: held, and handed over as it
    /// is should the client leave before it closes (the primary then rolls back what a
    /// block left open; so does the pool connection, that unit ending inside one).
    fn defer_units(&mut self) {
        self.deferred = true;
        for link in &self.links {
            if link.pooled() && !link.copy_active.get() {
                link.defer_unit();
            }
        }
    }

    /// A statement opened or ended a transaction block.
    fn follow_block(&mut self, transaction: sql::Transaction) {
        let ends = !matches!(transaction, sql::Transaction::Begin);
        self.unit_block = true;
        self.in_block = match transaction {
            sql::Transaction::Begin => true,
            sql::Transaction::Commit { chain } | sql::Transaction::Rollback { chain } => chain,
        };
        if ends {
            if self.region_statements > 1 {
                self.region_unsure = true;
            } else {
                self.region_sure_end = true;
            }
        }
    }

    /// What routing derives from prepared statement `statement`, made the first time it
    /// meets it (from `origin`, its source kept within `KEPT_TEXT_BYTES_MAX`).
    fn mirrored(&self, statement: &Statement, origin: Origin<'_>) -> Rc<Mirrored> {
        statement.extension(Slot::Mirror, || {
            let keep = |bytes: &[u8], make: fn(Bytes) -> Source| {
                if self.kept.get() + bytes.len() <= KEPT_TEXT_BYTES_MAX {
                    self.kept.set(self.kept.get() + bytes.len());
                    make(Bytes::copy_from_slice(bytes))
                } else {
                    Source::Lost
                }
            };
            let text = statement.text.as_bytes();
            let fingerprint = self.fingerprints.intern(text);
            if let Origin::Prepare(prepare) = origin {
                return Mirrored {
                    class: statement.class,
                    // COPY cannot be prepared.
                    copy_from: false,
                    source: keep(prepare, Source::Prepare),
                    fingerprint,
                    transaction: None,
                    setting: false,
                    command: false,
                    kept: self.kept.clone(),
                };
            }
            let command = statement.command().is_some();
            // A command's Parse, Bind and Describe reach every mirror (preparing or
            // describing `EXECUTE x` runs nothing); whether its Execute goes depends on
            // what it prepares, runs or drops, decided when it runs.
            let class = if command {
                Class::Session
            } else {
                statement.class
            };
            Mirrored {
                class,
                copy_from: statement.copy == Some(sql::Copy::FromStdin),
                source: match origin {
                    Origin::Parse(frame) => keep(frame, Source::Parse),
                    _ => Source::Lost,
                },
                fingerprint,
                transaction: match class {
                    Class::Transaction => statement.transaction,
                    _ => None,
                },
                setting: class == Class::Session && sql::setting(text).is_some(),
                command,
                kept: self.kept.clone(),
            }
        })
    }

    /// A prepared statement the tracker knows by name, with what routing derived from it.
    fn named<'a>(&self, statement: &'a Statement, origin: Origin<'_>) -> Option<Named<'a>> {
        let name = statement.name.as_deref()?;
        Some((name, self.mirrored(statement, origin)))
    }

    /// One statement of a simple Query as the tracker read it, with the session's settings
    /// followed as running it does.
    fn part<'a>(&mut self, sql: &[u8], part: &'a QueryPart) -> Part<'a> {
        let (class, prepared) = match part.own.command() {
            Some(command) => {
                let text = &sql[part.range.clone()];
                self.command(&part.own, text, command, &part.applied)
            }
            None => (part.own.class, None),
        };
        self.follow_statement(&sql[part.range.clone()], class);
        Part {
            range: part.range.clone(),
            class,
            prepared,
        }
    }

    /// Resolves an SQL-level prepared-statement command (`own`, the client's bytes `text`,
    /// read as `command`) by what the tracker says it did (`applied`): the class it routes as
    /// (that of what it prepares or runs), and what it does to the mirrors' names.
    fn command<'a>(
        &self,
        own: &'a Statement,
        text: &[u8],
        command: &'a Prepared,
        applied: &Applied,
    ) -> (Class, Option<SqlPrepared<'a>>) {
        match command {
            Prepared::Prepare { name, body } => match &applied.prepares {
                Some(s) => {
                    let m = self.mirrored(s, Origin::Prepare(text));
                    (
                        m.class,
                        Some(SqlPrepared::Prepare {
                            name,
                            tracked: true,
                            ident: m.source.ident(),
                        }),
                    )
                }
                None => {
                    let class = sql::classify(own.text.as_bytes().get(*body..).unwrap_or(b""));
                    (
                        class,
                        Some(SqlPrepared::Prepare {
                            name,
                            tracked: false,
                            ident: None,
                        }),
                    )
                }
            },
            Prepared::Execute { name, runs } => {
                let mut class = own.class;
                let source = applied.names.as_ref().map(|s| {
                    let m = self.mirrored(s, Origin::Unseen);
                    // A plain EXPLAIN only plans it.
                    class = if *runs { m.class } else { Class::Select };
                    m.source.clone()
                });
                (class, Some(SqlPrepared::Execute { name, source }))
            }
            // DDL (it passes as DDL) that needs the statement on the mirror, as EXECUTE does.
            Prepared::CreateTableAsExecute { name } => {
                let source = applied
                    .names
                    .as_ref()
                    .map(|s| self.mirrored(s, Origin::Unseen).source.clone());
                (own.class, Some(SqlPrepared::Execute { name, source }))
            }
            Prepared::Deallocate { name } => (own.class, Some(SqlPrepared::Deallocate { name })),
            Prepared::DeallocateAll | Prepared::DiscardAll => {
                (own.class, Some(SqlPrepared::DeallocateAll))
            }
        }
    }

    /// A RESET (of one parameter or all, DISCARD ALL among them) returns a pool connection
    /// to its own login's defaults, not to the session's startup parameters: the unit leaves
    /// the connection's settings unknown, so the next unit on it applies them again.
    fn follow_reset(&mut self, setting: &sql::Setting) {
        if self.pooled && matches!(setting, sql::Setting::Reset { .. } | sql::Setting::ResetAll) {
            self.untracked = true;
        }
    }

    /// Follows what running a statement of a simple Query does to the session's settings
    /// and transaction block.
    fn follow_statement(&mut self, text: &[u8], class: Class) {
        match class {
            Class::Session => {
                if let Some(setting) = sql::setting(text) {
                    self.follow_reset(&setting);
                    self.settings.change(setting, text);
                }
            }
            Class::Transaction => {
                if let Some(transaction) = sql::transaction(text) {
                    self.settings.transaction(transaction);
                    self.follow_block(transaction);
                }
            }
            _ => {}
        }
    }

    /// The fingerprint for the sync point just routed (0 when none).
    pub fn last_fingerprint(&self) -> u64 {
        self.last_fingerprint
    }

    /// Routes one complete client frame (`frame` includes its header), with what the tracker
    /// resolved it to (`framed`), to every link.
    pub async fn route(&mut self, framed: &Framed, frame: &Bytes) {
        if self.pooled && !self.unit_open {
            let settings = self.snapshot();
            for link in &self.links {
                link.unit_begins(&settings);
            }
            self.unit_open = true;
        }
        if self.pooled {
            self.region_statements += match (framed.tag, &framed.refers) {
                (tag::QUERY, Refers::Query(parts)) => parts.len().max(1),
                // Not read: as if several.
                (tag::QUERY, _) => 2,
                (tag::EXECUTE, _) => 1,
                _ => 0,
            };
        }
        let body = &frame[wire::HEADER_BYTES..];
        if let Some(route) = self.classify(framed, frame, body) {
            for i in 0..self.links.len() {
                let link = self.links[i].clone();
                self.route_one(&link, &route, frame).await;
            }
        }
        if framed.step == Step::SyncPoint {
            self.sync_number += 1;
        }
        if !self.pooled {
            return;
        }
        match (framed.step, framed.tag) {
            (Step::SyncPoint | Step::QuietSync, _) => {
                // The primary's ReadyForQuery, not the statements sent, says whether the
                // session stands idle: a block ended after another statement of the same
                // sync point may still be open there (that statement failed, the end was
                // skipped), so the unit waits for the next batch to find the session idle.
                if self.region_unsure {
                    self.deferred = !self.in_block;
                } else if self.region_sure_end {
                    self.deferred = false;
                }
                self.region_statements = 0;
                self.region_unsure = false;
                self.region_sure_end = false;
                match (self.in_block, self.deferred) {
                    (true, _) => {}
                    (false, true) => self.defer_units(),
                    (false, false) => self.close_units(false),
                }
            }
            (_, tag::COPY_DONE | tag::COPY_FAIL) if !self.in_block && !self.deferred => {
                self.close_units(true)
            }
            _ => {}
        }
    }

    /// Follows the session's bookkeeping for one frame and says how to route it.
    fn classify<'a>(
        &mut self,
        framed: &'a Framed,
        frame: &[u8],
        body: &'a [u8],
    ) -> Option<Route<'a>> {
        Some(match framed.tag {
            tag::QUERY => self.classify_query(body, &framed.refers),
            tag::PARSE => match &framed.refers {
                Refers::Statement(s) => Route::Parse {
                    statement: self.named(s, Origin::Parse(frame)),
                },
                _ => return None,
            },
            tag::BIND => match &framed.refers {
                Refers::Portal(p) => Route::Bind {
                    statement: self.named(&p.statement, Origin::Unseen),
                },
                _ => return None,
            },
            tag::EXECUTE => self.classify_execute(framed)?,
            tag::DESCRIBE => match wire::Describe::new(body).target().ok()? {
                (ObjectKind::Statement, name) => Route::DescribeStatement { name },
                (ObjectKind::Portal, _) => self.portal(&framed.refers),
            },
            tag::CLOSE => match wire::Close::new(body).target().ok()? {
                (ObjectKind::Statement, name) => Route::CloseStatement { name },
                (ObjectKind::Portal, _) => self.portal(&framed.refers),
            },
            tag::SYNC => Route::Sync,
            tag::FLUSH => Route::Flush,
            tag::COPY_DATA => Route::Copy { ends: false },
            tag::COPY_DONE | tag::COPY_FAIL => Route::Copy { ends: true },
            tag::FUNCTION_CALL => Route::FunctionCall,
            _ => Route::Never,
        })
    }

    /// A Describe or Close of a portal, as the tracker knew it then.
    fn portal<'a>(&self, refers: &'a Refers) -> Route<'a> {
        let statement = match refers {
            Refers::Portal(p) => self.named(&p.statement, Origin::Unseen),
            _ => None,
        };
        Route::Portal { statement }
    }

    /// A simple Query: its fingerprint, and its statements as the tracker read them.
    fn classify_query<'a>(&mut self, body: &'a [u8], refers: &'a Refers) -> Route<'a> {
        let sql = body.strip_suffix(&[0]).unwrap_or(body);
        self.last_fingerprint = self.fingerprints.intern(sql);
        let parts: &[QueryPart] = match refers {
            Refers::Query(parts) => parts,
            _ => return self.unread_query(sql),
        };
        match parts {
            // Nothing but blanks and comments.
            [] => Route::Query {
                sql,
                single: self.plain_part(sql, 0..sql.len()),
                parts: Vec::new(),
            },
            [part] => Route::Query {
                sql,
                single: self.part(sql, part),
                parts: Vec::new(),
            },
            _ => {
                let parts = parts.iter().map(|p| self.part(sql, p)).collect();
                Route::several(sql, parts)
            }
        }
    }

    /// A statement of a Query the tracker could not read, classified here (no prepared-
    /// statement command: those are not mirrored, their statements being unknown).
    fn plain_part<'a>(&mut self, sql: &[u8], range: Range<usize>) -> Part<'a> {
        let text = &sql[range.clone()];
        let class = sql::classify(text);
        let prepared = sql::prepared(text).map(|_| SqlPrepared::Execute {
            name: "",
            source: None,
        });
        self.follow_statement(text, class);
        Part {
            range,
            class,
            prepared,
        }
    }

    /// A Query the tracker could not read (not UTF-8, say: PostgreSQL takes other client
    /// encodings): its statements split and classified here.
    fn unread_query<'a>(&mut self, sql: &'a [u8]) -> Route<'a> {
        let ranges = if memchr::memchr(b';', sql).is_some() {
            sql::split_statements(sql)
        } else {
            Vec::new()
        };
        if ranges.len() <= 1 {
            let range = ranges.into_iter().next().unwrap_or(0..sql.len());
            let single = self.plain_part(sql, range);
            Route::Query {
                sql,
                single,
                parts: Vec::new(),
            }
        } else {
            let parts = ranges
                .into_iter()
                .map(|r| self.plain_part(sql, r))
                .collect();
            Route::several(sql, parts)
        }
    }

    /// An Execute: the session's bookkeeping as running its portal does it.
    fn classify_execute<'a>(&mut self, framed: &'a Framed) -> Option<Route<'a>> {
        let Refers::Portal(p) = &framed.refers else {
            return None;
        };
        let Some((name, m)) = self.named(&p.statement, Origin::Unseen) else {
            return Some(Route::Execute {
                statement: None,
                command: None,
            });
        };
        self.last_fingerprint = m.fingerprint;
        if m.command
            && let Some(command) = p.statement.command()
        {
            // Bookkeeping as a simple Query's PREPARE, EXECUTE or DEALLOCATE does it.
            let text = p.statement.text.as_bytes();
            let (class, prepared) = self.command(&p.statement, text, command, &framed.applied);
            self.follow_statement(text, class);
            return Some(Route::Execute {
                statement: Some((name, m)),
                command: Some(Part {
                    range: 0..text.len(),
                    class,
                    prepared,
                }),
            });
        }
        if let Some(transaction) = m.transaction {
            self.settings.transaction(transaction);
            self.follow_block(transaction);
        }
        // A setting bound with parameters cannot be replayed from its text alone.
        if m.setting && !p.params {
            let text = p.statement.text.as_bytes();
            if let Some(setting) = sql::setting(text) {
                self.follow_reset(&setting);
                self.settings.change(setting, text);
            }
        } else if m.setting {
            self.untracked = true;
        }
        Some(Route::Execute {
            statement: Some((name, m)),
            command: None,
        })
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
            Route::Parse { statement } => self.route_parse(link, statement.as_ref(), frame).await,
            Route::Bind { statement } => {
                if let Some(statement) = statement {
                    self.route_bind(link, statement, frame).await;
                }
            }
            Route::Execute { statement, command } => {
                if let Some(statement) = statement {
                    self.route_execute(link, statement, command.as_ref(), frame)
                        .await;
                }
            }
            Route::DescribeStatement { name } => {
                if link.prepared.borrow().contains(*name) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            // Describe or Close a portal: only where it passes and the mirror has its statement.
            Route::Portal { statement } => {
                if statement.as_ref().is_some_and(|(name, m)| {
                    passes(&link.target.cfg, m.class) && link.prepared.borrow().contains(*name)
                }) {
                    self.send(link, frame.clone(), None, false).await;
                }
            }
            Route::CloseStatement { name } => {
                if link.prepared.borrow_mut().remove(*name)
                    && self.send(link, frame.clone(), None, false).await
                {
                    link.note(Names::Drop(name.to_string()));
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

    /// Routes a Parse to one link: only if its statement is followed and its class passes
    /// the link's filter.
    async fn route_parse(&self, link: &Rc<Link>, statement: Option<&Named<'_>>, frame: &Bytes) {
        match statement {
            Some((name, m)) if passes(&link.target.cfg, m.class) => {
                if self.send(link, frame.clone(), None, false).await {
                    link.prepared.borrow_mut().insert(name.to_string());
                    link.note(Names::Create {
                        name: name.to_string(),
                        ident: m.source.ident(),
                        elidable: false,
                    });
                }
            }
            // The mirror's statement of that name (if any) is now stale: anything bound
            // to the name is skipped from here on, because its class does not pass.
            _ => MirrorStats::bump(&link.target.stats.counters.skipped_filter, 1),
        }
    }

    /// Routes a Bind to one link: only if its statement passes, prepared again first where
    /// the mirror lacks it.
    async fn route_bind(&self, link: &Rc<Link>, (name, m): &Named<'_>, frame: &Bytes) {
        if !passes(&link.target.cfg, m.class) {
            return;
        }
        // The mirror lost or never got this statement (skipped, reconnected): prepare
        // it again before binding. Text not kept: the Bind is skipped, and so is its
        // Execute (counted there).
        if link.accepting()
            && !link.prepared.borrow().contains(*name)
            && self.prepare_again(link, name, &m.source).await.is_none()
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
        (name, m): &Named<'_>,
        command: Option<&Part<'_>>,
        frame: &Bytes,
    ) {
        let stats = &link.target.stats;
        let class = command.map_or(m.class, |c| c.class);
        if !passes(&link.target.cfg, class) {
            MirrorStats::bump(&stats.counters.skipped_filter, 1);
            return;
        }
        if link.accepting() && !link.prepared.borrow().contains(*name) {
            MirrorStats::bump(&stats.counters.skipped_unprepared, 1);
            return;
        }
        if let Some(prepared) = command.and_then(|c| c.prepared.as_ref()) {
            self.execute_command(link, prepared, frame).await;
            return;
        }
        if self.send(link, frame.clone(), None, true).await && m.copy_from {
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
        let queued = self.send_reprepare(link, frames, None).await;
        if queued {
            // A pooled link prepares again in every unit what it uses: its pool counts those
            // it does send.
            if !link.pooled() {
                MirrorStats::bump(&link.target.stats.counters.reprepared, 1);
            }
            link.prepared.borrow_mut().insert(name.to_string());
            link.note(Names::Create {
                name: name.to_string(),
                ident: source.ident(),
                elidable: true,
            });
        }
        Some(queued)
    }

    /// Runs an SQL-level prepared-statement command that came through the extended protocol
    /// (its class passed the filter) on one link, as `route_query` does for a simple Query:
    /// an EXECUTE only if the mirror has (or is given again) its statement, a DEALLOCATE only
    /// if the mirror has it.
    async fn execute_command(&self, link: &Rc<Link>, prepared: &SqlPrepared<'_>, frame: &Bytes) {
        let stats = &link.target.stats;
        match prepared {
            SqlPrepared::Prepare {
                name,
                tracked,
                ident,
            } => {
                if !tracked {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                } else if self.send(link, frame.clone(), None, true).await {
                    link.prepared.borrow_mut().insert(name.to_string());
                    link.note(Names::Create {
                        name: name.to_string(),
                        ident: ident.clone(),
                        elidable: false,
                    });
                }
            }
            SqlPrepared::Execute { name, source } => {
                // Unknown: the primary rejects it, and it is not mirrored.
                let Some(source) = source else {
                    MirrorStats::bump(&stats.counters.skipped_filter, 1);
                    return;
                };
                if link.accepting() && !link.prepared.borrow().contains(*name) {
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
                if link.prepared.borrow().contains(*name)
                    && self.send(link, frame.clone(), None, true).await
                {
                    link.prepared.borrow_mut().remove(*name);
                    link.note(Names::Drop(name.to_string()));
                }
            }
            SqlPrepared::DeallocateAll => {
                if self.send(link, frame.clone(), None, true).await {
                    forget_named(&mut link.prepared.borrow_mut());
                    link.note(Names::DropAll);
                }
            }
        }
    }

    /// Routes a simple Query to one link: the statements that pass its filter, each EXECUTE
    /// only if the mirror has (or is given again) its statement, each DEALLOCATE only if the
    /// mirror has it. The client's frame goes as is when nothing changes, else a Query with
    /// the statements that pass (and PREPAREs the mirror lacks, before their EXECUTE).
    async fn route_query(&self, link: &Rc<Link>, sql: &[u8], parts: &[Part<'_>], frame: &Bytes) {
        if let [part] = parts
            && part.prepared.is_none()
        {
            self.route_statement(link, sql, part, frame).await;
            return;
        }
        let stats = &link.target.stats;
        let mut plan = QueryPlan::new(
            &link.target.cfg,
            &link.prepared.borrow(),
            parts,
            link.pooled(),
        );
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
            link.copy_from_query();
        }
        if !link.pooled() {
            MirrorStats::bump(&stats.counters.reprepared, plan.reprepared);
        }
        plan.commit(link);
    }

    /// Routes a Query of one statement that is no prepared-statement command to one link:
    /// the common case, the client's frame as is, without allocation.
    async fn route_statement(&self, link: &Rc<Link>, sql: &[u8], part: &Part<'_>, frame: &Bytes) {
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
            link.copy_from_query();
        }
    }

    /// Queues the Parse frames of protocol-level statements a Query's EXECUTEs need, then a
    /// Sync so that a failing Parse cannot make the mirror ignore the Query (it skips
    /// everything up to a Sync). Returns whether all were queued (true when there are none).
    async fn send_parses(&self, link: &Rc<Link>, parses: Vec<Reprepare>) -> bool {
        if parses.is_empty() {
            return true;
        }
        for parse in parses {
            if !self.send_reprepare(link, parse.frames, None).await {
                return false;
            }
            link.note(Names::Create {
                name: parse.name,
                ident: parse.ident,
                elidable: true,
            });
        }
        let mut sync = BytesMut::new();
        wire::encode::sync(&mut sync);
        if !self.send_reprepare(link, sync.freeze(), Some(0)).await {
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
        self.send_item(link, frame, sync, statement, false).await
    }

    /// [`send`](Self::send) for pgprism's own preparation of a statement again (or the Sync
    /// after some), which a pooled connection leaves out where it has the statement.
    async fn send_reprepare(&self, link: &Rc<Link>, frame: Bytes, sync: Option<u64>) -> bool {
        self.send_item(link, frame, sync, false, true).await
    }

    async fn send_item(
        &self,
        link: &Rc<Link>,
        frame: Bytes,
        sync: Option<u64>,
        statement: bool,
        reprepare: bool,
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
            seq: self.sync_number,
            sync,
            statement,
            internal: false,
            reprepare,
        };
        loop {
            match link.push(item()) {
                Push::Queued => {
                    if sync.is_none() {
                        link.pending_sync.set(true);
                    }
                    return true;
                }
                Push::TooLarge => {
                    link.cut();
                    MirrorStats::bump(&stats.counters.skipped_overflow, 1);
                    return false;
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
    /// Statements to prepare again before the Query: Parse frames of protocol-level ones,
    /// and for a pooled link SQL-level ones too (run in a batch, so that a pooled
    /// connection that has them leaves them out).
    parses: Vec<Reprepare>,
    /// The mirror's prepared names once the Query ran: all gone first (`cleared`), then
    /// these present (true, with what created them) or gone (false).
    cleared: bool,
    changed: Vec<(String, bool, Option<Bytes>)>,
    /// Some statement did not pass the filter.
    filtered: bool,
    /// EXECUTEs skipped: their statement is missing on the mirror and was not kept.
    unprepared: u64,
    reprepared: u64,
    /// The link is pooled (see `parses`).
    pooled: bool,
}

/// The mirror's prepared names as a simple Query goes: the link's set before it (`before`,
/// not copied) and the changes over it so far (with what created the names present).
struct NamesAsRun<'p, 'q> {
    before: &'p HashSet<String>,
    changed: HashMap<&'q str, (bool, Option<Bytes>)>,
    cleared: bool,
}

impl NamesAsRun<'_, '_> {
    /// Whether the mirror has statement `name` at this point of the Query.
    fn has(&self, name: &str) -> bool {
        self.changed
            .get(name)
            .map(|(has, _)| *has)
            .unwrap_or_else(|| !self.cleared && self.before.contains(name))
    }
}

impl QueryPlan {
    /// Plans a simple Query of several statements (or a prepared-statement command) for a
    /// link with filter `cfg` and prepared names `prepared`.
    fn new(
        cfg: &MirrorConfig,
        prepared: &HashSet<String>,
        parts: &[Part],
        pooled: bool,
    ) -> QueryPlan {
        let mut plan = QueryPlan {
            pooled,
            ..QueryPlan::default()
        };
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
            .map(|(name, (has, ident))| (name.to_string(), has, ident))
            .collect();
        plan
    }

    /// Plans part `i` (`pass`: its class passes the link's filter).
    fn part<'q>(&mut self, names: &mut NamesAsRun<'_, 'q>, i: usize, part: &'q Part, pass: bool) {
        match &part.prepared {
            None | Some(SqlPrepared::Prepare { tracked: true, .. }) if pass => {
                if let Some(SqlPrepared::Prepare { name, ident, .. }) = &part.prepared {
                    names.changed.insert(name, (true, ident.clone()));
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
                    names.changed.insert(name, (false, None));
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
        let again = |frames| Reprepare {
            frames,
            name: name.to_string(),
            ident: source.ident(),
        };
        match source {
            Source::Prepare(text) if self.pooled => match prepare_in_batch(text) {
                Some(frames) => {
                    self.parses.push(again(frames));
                    self.send.push((i, None));
                }
                None => {
                    self.unprepared += 1;
                    return;
                }
            },
            Source::Prepare(text) => self.send.push((i, Some(text.clone()))),
            Source::Parse(parse) => {
                self.parses.push(again(parse.clone()));
                self.send.push((i, None));
            }
            Source::Lost => {
                self.unprepared += 1;
                return;
            }
        }
        self.reprepared += 1;
        names.changed.insert(name, (true, source.ident()));
    }

    /// The Query frame the link gets: the client's own when every part goes unchanged, else
    /// one of the parts sent (PREPAREs before their EXECUTE). `None` when the text is not
    /// UTF-8 or holds a NUL: the primary rejects it too.
    fn frame(&self, sql: &[u8], parts: &[Part<'_>], frame: &Bytes) -> Option<Bytes> {
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

    /// Applies the Query's changes to the link's prepared names once it is queued (and notes
    /// them for a pooled connection).
    fn commit(self, link: &Link) {
        let mut prepared = link.prepared.borrow_mut();
        if self.cleared {
            forget_named(&mut prepared);
            link.note(Names::DropAll);
        }
        for (name, has, ident) in self.changed {
            if has {
                prepared.insert(name.clone());
                link.note(Names::Create {
                    name,
                    ident,
                    elidable: false,
                });
            } else {
                prepared.remove(&name);
                link.note(Names::Drop(name));
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
