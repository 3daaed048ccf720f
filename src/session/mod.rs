//! The session tracker (sans-IO): where one client session stands, from the frames it
//! exchanges in both directions. It is the one home of the protocol rules every mode asks
//! about: which client frames open a sync point (and which Syncs the server ignores during a
//! COPY), whether an extended batch is open, the transaction status, whether startup is over,
//! the farewells (a FATAL or PANIC from the server, a Terminate from the client), the
//! statements and portals prepared (by protocol and by SQL `PREPARE`), the statements of the
//! current batch, and the session settings that outlive their transaction.
//!
//! It owns no socket, never blocks, and allocates within named bounds ([`Limits`], config
//! keys `proxy.session-names-max` and `proxy.session-settings-max`). Frame walking is
//! `wire`'s; a body the tracker cannot read is the server's to reject: the statement is then
//! unknown to the tracker (counted in [`Tracker::unreadable`]), never a panic.
//!
//! It must never do I/O or decide what a mode does with a frame: it answers, modes act.

pub mod fuzzing;
pub mod replies;
pub mod settings;

use std::any::Any;
use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::rc::Rc;

use crate::sql;
use crate::wire::{self, tag};

pub use settings::Settings;

/// Multi-statement Queries in flight whose settings are held until their answer (a deeper
/// pipeline keeps them as before: applied at once).
const IMPLICIT_MAX: usize = 64;

/// Cancelled sync points a tracker remembers (see `Tracker::cancelled`). Those who ask do so
/// right after each read of the primary's answers, and a client's pipeline rarely has more
/// than a few statements cancelled in one read; older ones fall off.
const CANCELLED_KEPT: usize = 16;

/// The bounds of one session's tracker (config keys under `[proxy]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Prepared statements and portals remembered by name (`proxy.session-names-max`);
    /// beyond it a new name is still tracked for sync points, its statement unknown.
    pub names_max: usize,
    /// Session settings kept (`proxy.session-settings-max`).
    pub settings_max: usize,
    /// Decode statements (texts, names). A plain proxy needs only the sync points and the
    /// COPY and transaction state, and pays for nothing more.
    pub statements: bool,
    /// Keep the session settings too (with `statements`), for the modes that replay them.
    pub settings: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            names_max: 10_000,
            settings_max: 64,
            statements: true,
            settings: true,
        }
    }
}

/// One statement as the client sent it (a Parse, `PREPARE`, or one statement of a Query).
#[derive(Debug)]
pub struct Statement {
    /// Shared, so a mode that keeps the text (compare's reports) takes a reference, not a
    /// copy.
    pub text: Rc<str>,
    pub class: sql::Class,
    /// A COPY, and which way (the one "is COPY" rule: [`sql::copy`]).
    pub copy: Option<sql::Copy>,
    /// It takes parameters (`$n`, or declared parameter types).
    pub params: bool,
    /// What it does to the transaction block (BEGIN, COMMIT, ROLLBACK...), read once.
    pub transaction: Option<sql::Transaction>,
    /// An SQL-level prepared-statement command (PREPARE, DEALLOCATE, DISCARD ALL...): run by
    /// an Execute, it changes the session's statements as it does in a simple Query.
    command: Option<sql::Prepared>,
    /// The name the session prepared it under (a Parse or `PREPARE`; `""` for the unnamed
    /// statement), when the tracker remembered it; `None` for a Query's own statements, one
    /// beyond `proxy.session-names-max`, and an unknown one. An empty-text Parse is a
    /// prepared statement all the same (its text is empty, its name is not `None`).
    pub name: Option<Rc<str>>,
    /// Its first word, read once for every scanner of its text.
    head: sql::Head,
    /// What it does to the session's settings ([`sql::setting`]) and whether it pins a
    /// pooled client ([`sql::pins`]): read the first time they are asked (a statement
    /// prepared once is executed many times).
    setting: OnceCell<Option<sql::Setting>>,
    pin: OnceCell<Option<sql::Pin>>,
    extensions: Extensions,
}

/// Which mode an [`Extensions`] slot belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    Compare = 0,
    Mirror = 1,
    /// Transaction pooling: the statement's name on pooled connections and the bytes that
    /// prepare it there.
    Pool = 2,
}

/// What modes derive from a statement once (compare's rules and result columns, say),
/// living and dying with the statement, so that no mode keeps a statement table of its own.
#[derive(Default)]
struct Extensions {
    slots: [OnceCell<Rc<dyn Any>>; 3],
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set: Vec<bool> = self.slots.iter().map(|s| s.get().is_some()).collect();
        f.debug_struct("Extensions").field("set", &set).finish()
    }
}

/// A bound portal: its statement and the result formats its Bind asked for.
#[derive(Debug)]
pub struct Portal {
    pub statement: Rc<Statement>,
    pub formats: ResultFormats,
    /// Its Bind carried parameter values.
    pub params: bool,
    /// What modes derive from its Bind (compare: the rows its parameters name).
    extensions: Extensions,
}

impl Portal {
    /// What mode `slot` derives from this portal's Bind, made by `init` the first time it
    /// asks (a portal is made per Bind, so this lives and dies with one binding).
    pub fn extension<T: Any>(&self, slot: Slot, init: impl FnOnce() -> T) -> Rc<T> {
        let any = self.extensions.slots[slot as usize]
            .get_or_init(|| Rc::new(init()) as Rc<dyn Any>)
            .clone();
        match any.downcast::<T>() {
            Ok(t) => t,
            Err(_) => crate::invariant::failed("a portal extension slot holds one type"),
        }
    }
}

/// The result formats a Bind asked for, under the protocol's 0/1/N rule (which columns come
/// in binary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ResultFormats {
    #[default]
    Text,
    Binary,
    Each(Rc<[bool]>),
}

impl ResultFormats {
    pub fn from_wire(formats: wire::Formats<'_>) -> ResultFormats {
        match formats.len() {
            0 => ResultFormats::Text,
            1 => match formats.get(0) {
                Some(wire::Format::Binary) => ResultFormats::Binary,
                _ => ResultFormats::Text,
            },
            _ => ResultFormats::Each(formats.iter().map(|f| f == wire::Format::Binary).collect()),
        }
    }

    /// Whether result column `column` comes in binary.
    pub fn binary(&self, column: usize) -> bool {
        match self {
            ResultFormats::Text => false,
            ResultFormats::Binary => true,
            ResultFormats::Each(each) => each.get(column).copied().unwrap_or(false),
        }
    }
}

/// One statement of a simple Query: its own text, where it lies in the Query's text, for
/// `EXECUTE name` the prepared statement it runs, and what it does to the session's
/// prepared statements.
#[derive(Debug, Clone)]
pub struct QueryPart {
    pub own: Rc<Statement>,
    pub runs: Option<Rc<Statement>>,
    /// Its bytes in the Query's text (without the terminating NUL).
    pub range: Range<usize>,
    pub applied: Applied,
}

/// What an SQL-level prepared-statement command did to the session's statements as it ran
/// (in a simple Query or through an Execute), resolved then.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// `PREPARE name AS ...`: the statement it created (`None` beyond
    /// `proxy.session-names-max`: the name is then forgotten).
    pub prepares: Option<Rc<Statement>>,
    /// `EXECUTE name`, under EXPLAIN too, `CREATE TABLE ... AS EXECUTE name`, or
    /// `DEALLOCATE name`: the prepared statement it names (for DEALLOCATE, the one it drops;
    /// `None` when the session has none of that name).
    pub names: Option<Rc<Statement>>,
}

/// What a client frame refers to, resolved when the tracker read it (so a mode handling the
/// frames of a batch one by one sees each as it stood then, not after the batch's Closes).
#[derive(Debug, Clone, Default)]
pub enum Refers {
    #[default]
    Nothing,
    /// Parse: the statement it prepares; Describe or Close of a known statement: that one.
    Statement(Rc<Statement>),
    /// Bind: the portal it binds; Execute, Describe or Close of a portal: that one (a
    /// portal never bound is one of an unknown statement).
    Portal(Rc<Portal>),
    /// Query: its statements.
    Query(Rc<[QueryPart]>),
    /// Describe or Close of a name the tracker does not know (never prepared, or beyond
    /// `proxy.session-names-max`), with what kind of name it is.
    Unknown(wire::ObjectKind),
}

impl Statement {
    fn new(text: &str, params: bool, name: Option<Rc<str>>) -> Statement {
        // PostgreSQL's whitespace only (its scanner's space, \t, \n, \r, \f, \v): a
        // no-break space or another Unicode space is part of the statement there (an
        // identifier character, or a syntax error), so reading past it would track a SET
        // PostgreSQL refused.
        let text =
            text.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c' | '\x0b'));
        let bytes = text.as_bytes();
        let head = sql::Head::of(bytes);
        Statement {
            text: text.into(),
            class: sql::classify_headed(bytes, &head),
            copy: sql::copy_headed(bytes, &head),
            params,
            transaction: sql::transaction_headed(bytes, &head),
            command: sql::prepared_headed(bytes, &head),
            name,
            head,
            setting: OnceCell::new(),
            pin: OnceCell::new(),
            extensions: Extensions::default(),
        }
    }

    /// What mode `slot` derives from this statement, made by `init` the first time it asks.
    pub fn extension<T: Any>(&self, slot: Slot, init: impl FnOnce() -> T) -> Rc<T> {
        let any = self.extensions.slots[slot as usize]
            .get_or_init(|| Rc::new(init()) as Rc<dyn Any>)
            .clone();
        match any.downcast::<T>() {
            Ok(t) => t,
            Err(_) => crate::invariant::failed("a statement extension slot holds one type"),
        }
    }

    /// What mode `slot` derived from this statement, if it did.
    pub fn extension_if<T: Any>(&self, slot: Slot) -> Option<Rc<T>> {
        self.extensions.slots[slot as usize]
            .get()
            .and_then(|any| any.clone().downcast::<T>().ok())
    }

    /// A statement the tracker could not learn (an Execute of a portal it never saw bound,
    /// a name beyond the bound, an unreadable body).
    pub fn unknown() -> Rc<Statement> {
        Rc::new(Statement {
            text: "".into(),
            class: sql::Class::Other,
            copy: None,
            params: true,
            transaction: None,
            command: None,
            name: None,
            head: sql::Head::of(b""),
            setting: OnceCell::new(),
            pin: OnceCell::new(),
            extensions: Extensions::default(),
        })
    }

    /// What running it does to the session's settings, if anything ([`sql::setting`]).
    pub fn setting(&self) -> Option<&sql::Setting> {
        self.setting
            .get_or_init(|| sql::setting_headed(self.text.as_bytes(), &self.head))
            .as_ref()
    }

    /// What in it pins a pooled client to its connection, if anything ([`sql::pins`]).
    pub fn pin(&self) -> Option<sql::Pin> {
        *self
            .pin
            .get_or_init(|| sql::pins_headed(self.text.as_bytes(), &self.head))
    }

    /// The SQL-level prepared-statement command it is, if any.
    pub fn command(&self) -> Option<&sql::Prepared> {
        self.command.as_ref()
    }

    pub fn is_known(&self) -> bool {
        !self.text.is_empty()
    }

    /// The fingerprint of its text (computed on demand: the relay never needs it).
    pub fn fingerprint(&self) -> u64 {
        sql::fingerprint(self.text.as_bytes(), 0).0
    }
}

/// What one client frame is, for the sync-point accounting every mode shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Query, Sync or FunctionCall: the server answers it with one ReadyForQuery.
    SyncPoint,
    /// A Sync sent after a COPY that an Execute started: the server ignored the Syncs sent
    /// during the COPY, and answers this one for the sync point the ignored one opened.
    QuietSync,
    /// Terminate: the client's farewell.
    Terminate,
    /// Anything else.
    Other,
}

/// One client frame of a batch and the tracker's [`Step`] for it: where it lies in the
/// batch's bytes, for the modes that route or copy frames one by one.
#[derive(Debug, Clone)]
pub struct Framed {
    pub tag: u8,
    pub start: usize,
    pub end: usize,
    pub step: Step,
    pub refers: Refers,
    /// An Execute of a prepared-statement command: what it did (see [`Applied`]).
    pub applied: Applied,
}

/// What one server frame told the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The ReadyForQuery that ends startup (no client sync point asked for it).
    Ready,
    /// A ReadyForQuery answering the oldest open sync point.
    SyncAnswered,
    /// An ErrorResponse; `farewell` for FATAL and PANIC, after which the server closes.
    Error {
        farewell: bool,
    },
    /// CopyInResponse or CopyBothResponse: the server now reads COPY data.
    CopyIn,
    Other,
}

/// Whether an ErrorResponse body is the server's farewell (FATAL or PANIC). PostgreSQL
/// sends the severity field first.
#[inline]
pub fn is_farewell(error_body: &[u8]) -> bool {
    error_body.starts_with(b"SFATAL\0") || error_body.starts_with(b"SPANIC\0")
}

/// The COPY-from-Execute rule: the server ignores the Syncs a client sends after an Execute
/// that started COPY FROM STDIN until CopyDone/CopyFail (a COPY that fails at Execute, before
/// it starts, answers them). Those Syncs opened sync points when read; the same number of
/// Syncs after the COPY then open none.
#[derive(Debug, Default, Clone, Copy)]
struct CopySyncs {
    /// An Execute came and no CopyDone/CopyFail or Query since.
    after_execute: bool,
    /// Syncs read since that Execute.
    syncs_after_execute: u64,
    /// The server answered CopyInResponse/CopyBothResponse since that Execute.
    copy_in_seen: bool,
    /// Syncs still to pass as [`Step::QuietSync`].
    quiet: u64,
}

/// Where one session stands. Feed it every client frame ([`client`](Self::client)) before it
/// is forwarded and every server frame ([`server`](Self::server)) as it is read.
#[derive(Debug)]
pub struct Tracker {
    limits: Limits,
    ready: bool,
    status: u8,
    /// Sync points opened / answered by a ReadyForQuery.
    opened: u64,
    answered: u64,
    extended_open: bool,
    copy: CopySyncs,
    terminated: bool,
    farewell: bool,
    /// Keyed by the name the statement holds too (one allocation for both).
    statements: HashMap<Rc<str>, Rc<Statement>>,
    /// The unnamed statement's name, shared (an empty `Rc<str>` still allocates).
    unnamed: Rc<str>,
    portals: HashMap<Box<str>, Rc<Portal>>,
    /// What the last client frame referred to (see [`take_refers`](Self::take_refers)).
    refers: Refers,
    /// What the last client frame's prepared-statement command did (see
    /// [`take_applied`](Self::take_applied)).
    applied: Applied,
    /// The statements of the batch being sent (since the last sync point).
    batch: Vec<Rc<Statement>>,
    /// A sync point closed the batch: the next statement starts a new one.
    batch_closed: bool,
    settings: Settings,
    /// Sync points (numbers) of multi-statement Queries in flight, whose settings wait for
    /// the answer (bounded by [`IMPLICIT_MAX`]).
    implicit: VecDeque<u64>,
    /// An ErrorResponse came since the last ReadyForQuery.
    answer_failed: bool,
    unreadable: u64,
    unknown_executes: u64,
    quiet_syncs: u64,
    /// The server's BackendKeyData (process id, secret key), for cancelling.
    key: Option<(i32, i32)>,
    /// The latest sync points whose answers said they were cancelled (57014), oldest first,
    /// at most [`CANCELLED_KEPT`]: one read of the primary's answers may answer several
    /// sync points, each cancelled, before anyone asks.
    cancelled: VecDeque<u64>,
}

impl Tracker {
    pub fn new(limits: Limits) -> Tracker {
        Tracker {
            limits,
            ready: false,
            status: 0,
            opened: 0,
            answered: 0,
            extended_open: false,
            copy: CopySyncs::default(),
            terminated: false,
            farewell: false,
            statements: HashMap::new(),
            unnamed: "".into(),
            portals: HashMap::new(),
            refers: Refers::Nothing,
            applied: Applied::default(),
            batch: Vec::new(),
            batch_closed: false,
            settings: Settings::new(limits.settings_max),
            implicit: VecDeque::new(),
            answer_failed: false,
            unreadable: 0,
            unknown_executes: 0,
            quiet_syncs: 0,
            key: None,
            cancelled: VecDeque::new(),
        }
    }

    /// One client frame, before it is forwarded.
    #[inline]
    pub fn client(&mut self, tag: u8, body: &[u8]) -> Step {
        self.refers = Refers::Nothing;
        self.applied = Applied::default();
        let step = match tag {
            tag::QUERY => {
                self.copy.after_execute = false;
                self.batch_closed = true;
                self.start_batch();
                if self.limits.statements {
                    self.query(body);
                }
                Step::SyncPoint
            }
            tag::EXECUTE => {
                self.copy.after_execute = true;
                self.copy.syncs_after_execute = 0;
                self.copy.copy_in_seen = false;
                self.extended_open = true;
                if self.limits.statements {
                    self.execute(body);
                }
                Step::Other
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE | tag::FLUSH => {
                self.extended_open = true;
                self.start_batch();
                if self.limits.statements {
                    self.extended(tag, body);
                }
                Step::Other
            }
            tag::SYNC if self.copy.quiet > 0 => {
                self.copy.quiet -= 1;
                self.quiet_syncs += 1;
                // It may also fall in the next COPY an Execute started (pipelined without a
                // Sync between): then the server ignores it too.
                if self.copy.after_execute {
                    self.copy.syncs_after_execute += 1;
                }
                self.extended_open = false;
                Step::QuietSync
            }
            tag::SYNC => {
                if self.copy.after_execute {
                    self.copy.syncs_after_execute += 1;
                }
                self.extended_open = false;
                Step::SyncPoint
            }
            tag::COPY_DONE | tag::COPY_FAIL => {
                if self.copy.after_execute && self.copy.copy_in_seen {
                    self.copy.quiet += self.copy.syncs_after_execute;
                }
                self.copy.after_execute = false;
                self.copy.syncs_after_execute = 0;
                Step::Other
            }
            tag::FUNCTION_CALL => Step::SyncPoint,
            tag::TERMINATE => {
                self.terminated = true;
                Step::Terminate
            }
            _ => Step::Other,
        };
        match step {
            Step::SyncPoint => {
                self.opened += 1;
                self.batch_closed = true;
            }
            Step::QuietSync => self.batch_closed = true,
            _ => {}
        }
        step
    }

    /// One server frame, as it is read.
    #[inline]
    pub fn server(&mut self, tag: u8, body: &[u8]) -> Answer {
        match tag {
            tag::READY_FOR_QUERY => {
                self.status = body.first().copied().unwrap_or(self.status);
                if !self.ready {
                    self.ready = true;
                    return Answer::Ready;
                }
                // More answers than sync points is the server's protocol violation, not
                // ours to count: the count stays at what the client asked.
                let point = self.answered;
                self.answered = (self.answered + 1).min(self.opened);
                if self.limits.statements && self.limits.settings {
                    if self.implicit.front() == Some(&point) {
                        self.implicit.pop_front();
                        let failed = self.answer_failed;
                        self.settings.end_implicit(failed, self.status != b'I');
                    }
                    if self.status == b'I' {
                        self.settings.idle();
                    }
                }
                self.answer_failed = false;
                Answer::SyncAnswered
            }
            tag::ERROR_RESPONSE => {
                self.answer_failed = true;
                // Read only for 57014 (errors are rare; a statement's rows are not).
                if let Ok(Some(wire::sqlstate::QUERY_CANCELED)) =
                    wire::ErrorNotice::new(body).code()
                {
                    if self.cancelled.len() >= CANCELLED_KEPT {
                        self.cancelled.pop_front();
                    }
                    self.cancelled.push_back(self.answered);
                }
                let farewell = is_farewell(body);
                self.farewell |= farewell;
                Answer::Error { farewell }
            }
            tag::COPY_IN_RESPONSE | tag::COPY_BOTH_RESPONSE => {
                self.copy.copy_in_seen = true;
                Answer::CopyIn
            }
            tag::BACKEND_KEY_DATA => {
                let data = wire::BackendKeyData::new(body);
                if let (Ok(pid), Ok(secret)) = (data.pid(), data.secret()) {
                    self.key = Some((pid, secret));
                }
                Answer::Other
            }
            _ => Answer::Other,
        }
    }

    fn query(&mut self, body: &[u8]) {
        let Ok(text) = wire::Query::new(body).query() else {
            self.unreadable += 1;
            return;
        };
        let ranges = sql::split_statements(text.as_bytes());
        if ranges.len() > 1 && self.limits.settings && self.implicit.len() < IMPLICIT_MAX {
            // Several statements run in one implicit block: an error undoes their SETs.
            self.implicit.push_back(self.opened);
            self.settings.begin_implicit();
        }
        // Collected straight into the shared slice: one allocation for the parts.
        let parts: Rc<[QueryPart]> = ranges
            .into_iter()
            .map(|range| {
                let part = self.simple_statement(text, range);
                self.batch
                    .push(part.runs.clone().unwrap_or_else(|| part.own.clone()));
                part
            })
            .collect();
        self.refers = Refers::Query(parts);
    }

    /// One statement of a simple Query: SQL-level prepared statements share the protocol's
    /// namespace, and settings are kept as PostgreSQL keeps them.
    fn simple_statement(&mut self, query: &str, range: Range<usize>) -> QueryPart {
        let text = &query[range.clone()];
        let own = Rc::new(Statement::new(text, false, None));
        let applied = match &own.command {
            Some(command) => self.apply_command(&own.text, command),
            None => Applied::default(),
        };
        let runs = match &own.command {
            Some(sql::Prepared::Execute { runs: true, .. }) => applied.names.clone(),
            _ => None,
        };
        if runs.is_none() {
            self.follow_settings(&own, text.as_bytes());
        }
        QueryPart {
            own,
            runs,
            range,
            applied,
        }
    }

    /// An SQL-level prepared-statement command `text` (read as `command`), run by a Query or
    /// an Execute: what it does to the session's statements, and the statements it creates
    /// or names.
    fn apply_command(&mut self, text: &str, command: &sql::Prepared) -> Applied {
        let mut applied = Applied::default();
        match command {
            sql::Prepared::Prepare { name, body } => {
                let inner = text.get(*body..).unwrap_or("");
                applied.prepares = self.remember_statement(name, |name| {
                    Statement::new(inner, inner.contains('$'), name)
                });
            }
            sql::Prepared::Execute { name, .. } | sql::Prepared::CreateTableAsExecute { name } => {
                applied.names = self.statements.get(name.as_str()).cloned();
            }
            sql::Prepared::Deallocate { name } => {
                applied.names = self.statements.remove(name.as_str());
            }
            sql::Prepared::DeallocateAll => self.statements.clear(),
            sql::Prepared::DiscardAll => {
                self.statements.clear();
                self.portals.clear();
            }
        }
        applied
    }

    fn extended(&mut self, tag: u8, body: &[u8]) {
        match tag {
            tag::PARSE => match wire::Parse::new(body).parts() {
                Ok((name, query, types)) => {
                    let params = !types.is_empty() || query.contains('$');
                    let statement =
                        self.remember_statement(name, |name| Statement::new(query, params, name));
                    self.refers = Refers::Statement(statement.unwrap_or_else(|| {
                        // Beyond the bound: known for this frame, under no name.
                        Rc::new(Statement::new(query, params, None))
                    }));
                }
                Err(_) => self.unreadable += 1,
            },
            tag::BIND => match wire::Bind::new(body).parts() {
                Ok(parts) => {
                    let statement = self
                        .statements
                        .get(parts.statement)
                        .cloned()
                        .unwrap_or_else(Statement::unknown);
                    let portal = Rc::new(Portal {
                        statement,
                        formats: ResultFormats::from_wire(parts.result_formats),
                        params: !parts.params.is_empty(),
                        extensions: Extensions::default(),
                    });
                    self.refers = Refers::Portal(portal.clone());
                    if parts.portal.is_empty()
                        || self.portals.len() < self.limits.names_max
                        || self.portals.contains_key(parts.portal)
                    {
                        self.portals.insert(parts.portal.into(), portal);
                    }
                }
                Err(_) => self.unreadable += 1,
            },
            tag::DESCRIBE => match wire::Describe::new(body).target() {
                Ok((kind, name)) => self.refers = self.named(kind, name),
                Err(_) => self.unreadable += 1,
            },
            tag::CLOSE => match wire::Close::new(body).target() {
                Ok((kind, name)) => {
                    self.refers = self.named(kind, name);
                    match kind {
                        wire::ObjectKind::Statement => drop(self.statements.remove(name)),
                        wire::ObjectKind::Portal => drop(self.portals.remove(name)),
                    }
                }
                Err(_) => self.unreadable += 1,
            },
            _ => {}
        }
    }

    /// What a Describe or Close names, as it stands now.
    fn named(&self, kind: wire::ObjectKind, name: &str) -> Refers {
        match kind {
            wire::ObjectKind::Statement => self
                .statements
                .get(name)
                .map_or(Refers::Unknown(kind), |s| Refers::Statement(s.clone())),
            wire::ObjectKind::Portal => self
                .portals
                .get(name)
                .map_or(Refers::Unknown(kind), |p| Refers::Portal(p.clone())),
        }
    }

    fn execute(&mut self, body: &[u8]) {
        let portal = match wire::Execute::new(body).portal() {
            Ok(portal) => self.portals.get(portal).cloned(),
            Err(_) => {
                self.unreadable += 1;
                None
            }
        };
        let portal = portal.unwrap_or_else(|| {
            self.unknown_executes += 1;
            Rc::new(Portal {
                statement: Statement::unknown(),
                formats: ResultFormats::Text,
                params: false,
                extensions: Extensions::default(),
            })
        });
        let statement = portal.statement.clone();
        self.refers = Refers::Portal(portal);
        if let Some(command) = &statement.command {
            // PREPARE, DEALLOCATE or DISCARD ALL through the extended protocol. (An EXECUTE
            // runs here under its own text: the statement it runs is not swapped in.)
            self.applied = self.apply_command(&statement.text, command);
        }
        // A setting with parameters cannot be replayed from its text alone.
        if !statement.params && statement.is_known() {
            self.follow_settings(&statement, statement.text.as_bytes());
        }
        self.start_batch();
        self.batch.push(statement);
    }

    /// What running `statement` (its text `bytes`) does to the kept session settings.
    fn follow_settings(&mut self, statement: &Statement, bytes: &[u8]) {
        if !self.limits.settings {
            return;
        }
        if let Some(transaction) = statement.transaction {
            self.settings.transaction(transaction);
        } else if let Some(setting) = statement.setting() {
            // Read from its trimmed text: the same reading (a setting's key is read after
            // the first word, the text kept whole below).
            self.settings.change(setting.clone(), bytes);
        }
    }

    /// The batch list holds the last sync point's statements until the next batch starts.
    fn start_batch(&mut self) {
        if self.batch_closed {
            self.batch_closed = false;
            self.batch.clear();
        }
    }

    /// Remembers the statement `make` builds (given the name it is remembered under) as
    /// `name`, within the bound; returns it, or `None` beyond the bound (the name is then
    /// forgotten, and an Execute of it is unknown).
    fn remember_statement(
        &mut self,
        name: &str,
        make: impl FnOnce(Option<Rc<str>>) -> Statement,
    ) -> Option<Rc<Statement>> {
        // A name already known is replaced under its key (one lookup, no new key).
        if let Some(slot) = self.statements.get_mut(name) {
            let statement = Rc::new(make(slot.name.clone()));
            *slot = statement.clone();
            return Some(statement);
        }
        if !name.is_empty() && self.statements.len() >= self.limits.names_max {
            return None;
        }
        let key: Rc<str> = if name.is_empty() {
            self.unnamed.clone()
        } else {
            name.into()
        };
        let statement = Rc::new(make(Some(key.clone())));
        self.statements.insert(key, statement.clone());
        Some(statement)
    }

    /// Startup and authentication are over (the first ReadyForQuery came).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The transaction status of the last ReadyForQuery: `I`, `T` or `E` (0 before any).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server's BackendKeyData, once it came (a protocol 3.0 key).
    pub fn key(&self) -> Option<(i32, i32)> {
        self.key
    }

    /// Whether the answer to sync point `seq` (one of the [`CANCELLED_KEPT`] latest cancelled
    /// ones) said it was cancelled.
    pub fn cancelled(&self, seq: u64) -> bool {
        self.cancelled.contains(&seq)
    }

    /// Sync points opened so far, and answered so far.
    pub fn sync_points(&self) -> (u64, u64) {
        (self.opened, self.answered)
    }

    /// Sync points sent and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.opened - self.answered
    }

    /// Inside an extended-protocol batch (frames since the last Sync): an implicit
    /// transaction may be open even though the status says idle.
    pub fn extended_open(&self) -> bool {
        self.extended_open
    }

    /// At a transaction boundary with nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.ready && self.status == b'I' && self.in_flight() == 0 && !self.extended_open
    }

    pub fn terminated(&self) -> bool {
        self.terminated
    }

    /// The server said FATAL or PANIC: it closes, and has told the client why.
    pub fn farewell(&self) -> bool {
        self.farewell
    }

    /// The statements of the current (or, after its sync point, the last) batch.
    pub fn batch(&self) -> &[Rc<Statement>] {
        &self.batch
    }

    /// A prepared statement by name (protocol or SQL `PREPARE`).
    pub fn statement(&self, name: &str) -> Option<&Rc<Statement>> {
        self.statements.get(name)
    }

    /// A bound portal by name.
    pub fn portal(&self, name: &str) -> Option<&Rc<Portal>> {
        self.portals.get(name)
    }

    /// What the last client frame referred to (`Nothing` unless statements are decoded);
    /// taken, so each frame's answer is handed on once.
    pub fn take_refers(&mut self) -> Refers {
        std::mem::take(&mut self.refers)
    }

    /// What the last client frame, an Execute of an SQL-level prepared-statement command,
    /// did to the session's statements (empty otherwise); taken, as
    /// [`take_refers`](Self::take_refers).
    pub fn take_applied(&mut self) -> Applied {
        std::mem::take(&mut self.applied)
    }

    /// Prepared statements and portals remembered.
    pub fn names(&self) -> (usize, usize) {
        (self.statements.len(), self.portals.len())
    }

    /// The session settings that outlive their transaction, as Query frames.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every prepared statement the session holds by name (protocol and SQL `PREPARE`,
    /// the unnamed one too), in no particular order: with [`settings`](Self::settings), what
    /// outlives a transaction, for a session that goes on in another tracker (a pooled
    /// client moving between shards).
    pub fn prepared(&self) -> impl Iterator<Item = &Rc<Statement>> {
        self.statements.values()
    }

    /// The session's settings, taken (the tracker keeps none): with
    /// [`prepared`](Self::prepared), what a session carried on in another tracker needs
    /// (see [`adopt_session`](Self::adopt_session)).
    pub fn take_settings(&mut self) -> Settings {
        std::mem::take(&mut self.settings)
    }

    /// Carries a session on from another tracker (a pooled client that moved between shards,
    /// between transactions): its settings as [`take_settings`](Self::take_settings) took
    /// them, and, through [`adopt_statement`](Self::adopt_statement), its prepared
    /// statements. The session is past its startup, idle.
    pub fn adopt_session(&mut self, settings: Settings) {
        self.settings = settings;
        self.ready = true;
        self.status = b'I';
    }

    /// A prepared statement of a session carried on from another tracker: `text` and
    /// `params` as that tracker's statement had them; `None` beyond
    /// `proxy.session-names-max`.
    pub fn adopt_statement(
        &mut self,
        name: &str,
        text: &str,
        params: bool,
    ) -> Option<Rc<Statement>> {
        self.remember_statement(name, |name| Statement::new(text, params, name))
    }

    /// Bodies the tracker could not read (the server rejects them; the statement is unknown).
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    /// Syncs that answered for one the server ignored during a COPY ([`Step::QuietSync`]).
    pub fn quiet_syncs(&self) -> u64 {
        self.quiet_syncs
    }

    /// Executes of a portal the tracker never saw bound (its statement is unknown).
    pub fn unknown_executes(&self) -> u64 {
        self.unknown_executes
    }

    /// Walks the complete client frames at the front of `buf` and feeds each; returns the
    /// length of that prefix. For tests, fuzzing and replay: the relay feeds frames from its
    /// own framing walk.
    pub fn client_bytes(
        &mut self,
        buf: &[u8],
        message_bytes_max: usize,
    ) -> Result<usize, wire::WireError> {
        wire::complete_prefix(buf, message_bytes_max, |tag, body| {
            self.client(tag, body);
        })
    }

    /// [`client_bytes`](Self::client_bytes) for server frames.
    pub fn server_bytes(
        &mut self,
        buf: &[u8],
        message_bytes_max: usize,
    ) -> Result<usize, wire::WireError> {
        wire::complete_prefix(buf, message_bytes_max, |tag, body| {
            self.server(tag, body);
        })
    }
}

#[cfg(test)]
mod tests;
