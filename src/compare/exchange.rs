//! One client session's two answer streams, paired. The upstream side ([`Dispatch`]) records
//! what each client sync point asked (statement texts, whether the shadow gets it) and writes
//! the client's frames to the shadow; the downstream side ([`Comparer`]) folds both answer
//! streams into digests, pairs sync point *i* of the primary with sync point *i* of the
//! shadow, reports what differs, and decides which bytes reach the client and when.
//!
//! Only the source of truth's bytes ever reach the client. In `report` mode they stream as
//! they arrive; in `fail-on-differences` mode they are held per sync point (up to
//! `compare.buffer-bytes-max`) until the other side has answered the same sync point.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::digest::{Described, Digest, Digester, Expect, Expects, Step, SyncDigest};
use super::footprint::{self, Footprint, Scan};
use super::lease::Shadow;
use super::order::{Pinned, Start, Unpinned};
use super::rules::type_name;
use super::verdict::{self, Difference, Kind, Verdict};
use super::{CompareTarget, Record, Side};
use crate::session::{
    Framed, QueryPart, Refers, ResultFormats, Slot, Statement, Step as SessionStep, Tracker,
};
use crate::sql;
use crate::stats::{ShardCounters, ShardStats};
use crate::wire::{self, tag};

/// One statement as the client sent it, with what comparing its results needs (named apart
/// from the session tracker's `session::Statement`, which knows no compare rules).
#[derive(Debug)]
pub(crate) struct Compared {
    pub text: Rc<str>,
    pub ordered: bool,
    /// Its top-level ORDER BY's keys, when they are plain output columns.
    pub order_keys: Option<Rc<[sql::OrderKey]>>,
    pub excluded: bool,
    pub read_only: bool,
    /// Extended protocol with parameters: cannot be re-run for EXPLAIN.
    pub params: bool,
    pub primary_only: bool,
    /// Opens or ends a transaction block (BEGIN, COMMIT, ROLLBACK...): with other statements
    /// in the same sync point, the two sides may leave it in different states, so what
    /// follows waits for both answers (see `Pairing::gate`).
    pub transaction: bool,
    /// Even alone it may leave the two sides apart: a BEGIN with options one engine may
    /// refuse, or AND CHAIN. (A plain BEGIN opens a block on both; COMMIT and ROLLBACK end
    /// it on both, failing or not.)
    pub transaction_options: bool,
    /// A COPY: the client's data for it follows its sync point, so that sync point never
    /// gates (the shadow could not answer it without the data held behind the gate).
    pub copy: bool,
    /// Its result columns, once a Describe told them (per side).
    pub described: Rc<Described>,
    /// What it touches (ordered dispatch) and whether its result may differ by nature.
    pub scan: Scan,
}

impl Compared {
    /// What compare needs of `statement` (its class and COPY as the tracker read them).
    fn new(statement: &Statement, target: &CompareTarget) -> Compared {
        let rules = &target.rules;
        let text = &*statement.text;
        let transaction = statement.transaction;
        // Read per statement shape (literals masked), mostly from the shard's cache.
        let reading = target.shapes.borrow_mut().read(text, statement.class);
        // One walk for the many statements without an ORDER BY (the keys walk again, on
        // this text: `ORDER BY 2` names its column by a number).
        let ordered = reading.ordered;
        Compared {
            text: statement.text.clone(),
            ordered,
            order_keys: ordered
                .then(|| sql::order_by_keys(text.as_bytes()))
                .flatten()
                .map(Rc::from),
            excluded: rules.excluded(text),
            read_only: statement.class == sql::Class::Select,
            params: statement.params,
            primary_only: rules.primary_only(text),
            transaction: transaction.is_some(),
            transaction_options: transaction.is_some_and(|t| with_options(text, t)),
            copy: statement.copy.is_some(),
            described: Rc::default(),
            scan: reading.scan,
        }
    }

    /// What compare derives from one of the session tracker's statements, once per statement
    /// (kept in the statement's compare slot); an unknown statement is compared as such.
    fn of(statement: &Statement, target: &CompareTarget) -> Rc<Compared> {
        if !statement.is_known() {
            // One per portal bound to it (the tracker makes an unknown statement per Bind),
            // so a Describe of the portal still tells its later Executes the columns.
            return statement.extension(Slot::Compare, Compared::unknown);
        }
        statement.extension(Slot::Compare, || Compared::new(statement, target))
    }

    fn unknown() -> Compared {
        Compared {
            text: "".into(),
            ordered: false,
            order_keys: None,
            excluded: false,
            read_only: false,
            params: true,
            primary_only: false,
            transaction: false,
            transaction_options: false,
            copy: false,
            described: Rc::default(),
            scan: Scan {
                footprint: Footprint::wild(),
                nondeterministic: None,
            },
        }
    }
}

/// `template` (a prepared statement's footprint) with the values of a Bind of it: the rows
/// its parameters name. A Bind pgprism cannot read leaves the parameters unknown.
fn bind(template: &Footprint, bind: wire::Bind<'_>) -> Footprint {
    let Ok(parts) = bind.parts() else {
        return template.clone();
    };
    let values: Vec<Option<footprint::Value>> = parts
        .params
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v?;
            match parts.param_format(i) {
                wire::Format::Text => footprint::text_value(v, false),
                wire::Format::Binary => Some(footprint::binary_value(v)),
            }
        })
        .collect();
    template.bind(|n| {
        values
            .get(usize::from(n).checked_sub(1)?)
            .copied()
            .flatten()
    })
}

/// What one client sync point asked.
struct SyncMeta {
    statements: Vec<Rc<Compared>>,
    /// What they touch, with their parameters' values.
    footprint: Footprint,
    /// Sent to the shadow too (not routed to the primary only).
    shadow: bool,
    /// Routed to the primary only by the compare rules (why `shadow` is false, when it is
    /// not that the session had stopped comparing).
    routed: bool,
    /// Only part of it reached the shadow (a batch already released met a statement routed
    /// to the primary only): its Sync went there to end the batch, but it is not compared.
    withheld: bool,
    /// Goes to the shadow in the primary's completion order (see `order`): its frames wait
    /// for the primary's answer and for earlier conflicting sync points of other sessions.
    ordered: bool,
    /// What it touched as it was sent to the primary, and where the order stood then.
    start: Start,
    read_at: Instant,
    /// Its number in the completion order, once the primary answered it (ordered only).
    number: Option<u64>,
}

/// Whether transaction-control statement `text` (read as `kind`) may leave the two sides
/// apart even alone: a BEGIN or START TRANSACTION with anything after it (isolation level,
/// access mode), or AND CHAIN. Anything not read plainly (comments) counts as such.
fn with_options(text: &str, kind: sql::Transaction) -> bool {
    match kind {
        sql::Transaction::Commit { chain } | sql::Transaction::Rollback { chain } => chain,
        sql::Transaction::Begin => text
            .trim()
            .trim_end_matches(';')
            .split_whitespace()
            .skip(1)
            .any(|w| !w.eq_ignore_ascii_case("WORK") && !w.eq_ignore_ascii_case("TRANSACTION")),
    }
}

/// Whether a sync point of these statements gates what follows (see `Pairing::gate`). Never
/// one with a COPY, or one whose statements are unknown (an Execute of a portal not seen):
/// their data and answers must flow.
fn gates(statements: &[Rc<Compared>]) -> bool {
    if statements.iter().any(|s| s.copy || s.text.is_empty()) {
        return false;
    }
    match statements {
        [one] => one.transaction_options,
        many => many.iter().any(|s| s.transaction),
    }
}

/// One client frame as [`Dispatch::plan`] hands it to the method for its kind.
struct Planned {
    frame: Bytes,
    /// What its answer will be read against.
    expect: Option<Expect>,
    /// The compare rules route statements (primary-only patterns).
    routes: bool,
    read_at: Instant,
}

/// Client bytes for the shadow, cut after each gating sync point.
struct Segment {
    frames: Vec<Bytes>,
    bytes: usize,
    /// Expectations of the answers to these frames (queued as they are written).
    expects: Vec<Expect>,
    /// Client sync points among them (their numbers).
    syncs: Vec<u64>,
    /// Ends with this gating sync point (see `Pairing::gate`).
    gate: Option<u64>,
    /// Whether it may be written now, as far as the completion order goes.
    order: Order,
}

/// Where a segment stands with the ordered dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Goes as soon as what precedes it went.
    Free,
    /// Ends ordered sync point `seq`: waits for the primary's answer and the ledger.
    Await(u64),
    /// Its turn came: it carries the ledger's number of its sync point (None: it touches
    /// nothing another session could see).
    Cleared(Option<u64>),
}

/// What one sync point written to the shadow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShadowSync {
    /// pgprism's own ROLLBACK or BEGIN: neither compared nor forwarded.
    Own,
    /// The client's, with its number in the completion order when it was ordered, and its
    /// client sync point number (the session tracker's).
    Client(Option<u64>, u64),
}

/// One shadow write carries at most about this much.
const SHADOW_WRITE_BYTES: usize = 256 << 10;

/// The vectors of a written segment, emptied, kept for the next one cut (see
/// [`Pairing::spare`]): a segment per sync point allocated its three vectors and the
/// writer's list of frames and freed them all again, about 2,500 instructions per pgbench
/// `-N` transaction (callgrind, five sync points).
#[derive(Default)]
struct Spare {
    frames: Vec<Bytes>,
    expects: Vec<Expect>,
    syncs: Vec<u64>,
}

/// Spare vectors kept per session, and the largest capacity a kept one may have: a batch
/// of many frames does not keep its memory for the session's life.
const SPARES_MAX: usize = 4;
const SPARE_CAPACITY_MAX: usize = 64;

impl Spare {
    /// `segment`'s vectors once it was written: kept if none grew large.
    fn of(segment: Segment) -> Option<Spare> {
        let Segment {
            mut frames,
            mut expects,
            mut syncs,
            ..
        } = segment;
        if frames
            .capacity()
            .max(expects.capacity())
            .max(syncs.capacity())
            > SPARE_CAPACITY_MAX
        {
            return None;
        }
        frames.clear();
        expects.clear();
        syncs.clear();
        Some(Spare {
            frames,
            expects,
            syncs,
        })
    }
}

/// State both halves of a session's compare machinery see.
pub(crate) struct Pairing {
    metas: RefCell<VecDeque<SyncMeta>>,
    /// Per sync point written to the shadow, in order: pgprism's own (a ROLLBACK that brings
    /// a diverged shadow back in step), whose answer is neither compared nor forwarded, or
    /// the client's.
    shadow_kinds: RefCell<VecDeque<ShadowSync>>,
    /// Ordered sync points the primary has answered, in order: (sync point, ledger number).
    tickets: RefCell<VecDeque<(u64, Option<u64>)>>,
    /// Ledger numbers of this session still pending on the shadow (abandoned at the end).
    issued: RefCell<Vec<u64>>,
    /// This session in the ledger.
    order_session: u64,
    /// Ordered waits that ran out (`compare.order-wait-ms`), not yet counted.
    order_expired: Cell<u64>,
    /// Ordered waits broken because the blockers wait on the shadow for this session's
    /// locks (`compare.order-lock-wait-ms`), not yet counted.
    order_lock_breaks: Cell<u64>,
    /// What the primary's open transaction has written so far: its end makes it visible.
    written: RefCell<Footprint>,
    /// Sync points sent to the primary, touching something, and not answered yet.
    in_flight: RefCell<VecDeque<(u64, Start)>>,
    port: Option<Rc<super::order::Port>>,
    rollback_due: Cell<bool>,
    /// The shadow left a transaction block the primary is in: a BEGIN goes first.
    begin_due: Cell<bool>,
    /// Client bytes for the shadow not yet written, in order (see [`ShadowWriter`]).
    queue: RefCell<VecDeque<Segment>>,
    /// Emptied vectors of written segments, for the next ones cut (at most [`SPARES_MAX`]).
    spare: RefCell<Vec<Spare>>,
    /// The frames of one shadow write, kept from write to write (emptied).
    write_frames: RefCell<Vec<Bytes>>,
    queued_bytes: Cell<usize>,
    /// A sync point written to the shadow that opens or ends a transaction block: the two
    /// sides may leave it in different states (one failed, the other not), which `settle`
    /// mends with a ROLLBACK or a BEGIN. What the client sent after it waits until it is
    /// settled, so that it never runs in the shadow's stale transaction.
    gate: Cell<Option<u64>>,
    /// The session ended: the writer sends what is queued, then stops.
    finished: Cell<bool>,
    /// The primary's answers ended (its connection closed, or the session closed it with
    /// answers owed): a segment waiting for an answer that never came is dropped, so that
    /// what follows it (the Terminate) goes at once.
    primary_ended: Cell<bool>,
    /// Nothing more goes to the shadow (it failed, fell behind, or the session is over).
    dead: Cell<bool>,
    /// A write to the shadow is under way (by the upstream half or the writer).
    writing: Cell<bool>,
    writer_waker: Cell<Option<Waker>>,
    space_waker: Cell<Option<Waker>>,
    /// What each side's answers are read against: [primary, shadow].
    expects: [Expects; 2],
    /// Sync points planned so far (the next one's number).
    planned: Cell<u64>,
    /// The client sent Flush without a Sync after it, and waits for the answers so far: the
    /// sync point it is in (numbered as `planned`) cannot be held for the shadow.
    flush_requested: Cell<Option<u64>>,
    /// The session tracker's number of this session's sync point 0 (see `Dispatch::plan`).
    numbering: Cell<u64>,
    /// A client's cancel, as far as the shadow goes (see `backend::cancel::Pending`).
    cancel: crate::backend::cancel::Pending,
    /// Writes to the shadow held while a cancel for the one statement it runs is on its way
    /// (written behind it, the next statement could be what the cancel hits): from the
    /// decision until the cancel connection is done, at most twice `compare.connect-timeout-ms`.
    cancel_held: Cell<bool>,
    /// The session's shadow (its BackendKeyData is the one a cancel uses).
    shadow: Shadow,
    target: Rc<CompareTarget>,
}

/// The shadow's part in a client's CancelRequest, for the session that owns it.
#[derive(Clone)]
pub struct Cancel(Rc<Pairing>);

impl Cancel {
    /// The client asked to cancel while the primary ran sync point `seq` (the session
    /// tracker's numbers).
    pub fn request(&self, seq: u64) {
        self.0.cancel.request(seq);
    }

    /// The primary answered sync point `seq`, `cancelled` (57014) or not.
    pub fn primary_answered(&self, seq: u64, cancelled: bool) {
        self.0.cancel.primary_answered(seq, cancelled);
        self.0.check_cancel();
    }
}

/// The upstream half: tracks statements and writes client frames to the shadow.
pub struct Dispatch {
    link: Rc<Pairing>,
    target: Rc<CompareTarget>,
    pub shadow: Shadow,
    batch: Vec<Rc<Compared>>,
    /// What the batch's Executes touch, with their Binds' values.
    batch_footprint: Footprint,
    /// Expectations of the frames held in `held`, queued for the shadow with them.
    held_expects: Vec<Expect>,
    /// Expectations of what the current client batch sends the shadow.
    out_expects: Vec<Expect>,
    batch_primary_only: bool,
    /// With routing patterns: the frames of the current extended-protocol batch, held until
    /// its Sync decides whether the shadow gets the batch.
    held: BytesMut,
    copy_to_shadow: bool,
    /// With routing patterns: a Flush sent the current batch's held frames to the shadow
    /// before its Sync (the client waits for answers, e.g. a COPY's CopyInResponse, before it
    /// syncs), so the rest of the batch, its Sync included, goes there too.
    batch_released: bool,
    /// What the current client batch sends the shadow: the segment being filled, and those
    /// already cut after a gating sync point.
    out: Vec<Bytes>,
    /// Client sync points (numbers) among `out`.
    out_syncs: Vec<u64>,
    segments: Vec<Segment>,
    /// An extended-protocol batch is open: frames of it are in `out` before its Sync (they
    /// wait there for it, so the batch goes to the shadow whole, in its turn).
    open_batch: bool,
    /// The open batch's frames went to the shadow before its Sync (a Flush: the client waits
    /// for answers): its sync point is not ordered.
    batch_unordered: bool,
    /// A Flush came in the current read.
    flushed: bool,
    /// Bytes in `out` (what the current client batch sends the shadow, not yet cut).
    out_bytes: usize,
    /// The open batch passed `compare.shadow-batch-bytes-max` in the current read: it goes
    /// to the shadow now, as after a Flush.
    overflowed: bool,
    /// The open batch passed the bound while routed to the primary only: the rest of it is
    /// not held (nor sent to the shadow) until its Sync.
    batch_withheld: bool,
    /// The open batch went to the shadow before its Sync (a Flush, the bound), then named a
    /// statement routed to the primary only: from that frame on, nothing of it but its Sync
    /// (which ends the batch there) reaches the shadow, and its sync point is not compared.
    batch_cut: bool,
    /// pgprism's own Describes (see [`describe_unseen`](Self::describe_unseen)): the client's
    /// Executes noted and planned so far, and the Describe frame that goes before the
    /// Execute of each number (noted, not yet planned).
    executes_noted: u64,
    executes_planned: u64,
    own_describes: VecDeque<(u64, Bytes)>,
    /// pgprism's own Describes for the shadow alone held with the open batch: counted when
    /// the batch goes to the shadow.
    held_own_describes: u64,
}

/// Where [`Comparer::feed`]'s walk stands within one read.
struct Walk {
    /// Start of the source's bytes not yet cut for the client.
    segment_start: usize,
    /// The sync point a CopyIn/CopyBoth response belongs to (later ones stay held).
    copy_started: Option<u64>,
    now: Instant,
}

/// What one [`Comparer::feed`] read: the primary's sync points answered and its errors (the
/// rest of where the session stands is the tracker's).
pub struct Fed {
    pub syncs: u64,
    pub errors: u64,
}

impl Dispatch {
    /// Called for every client frame [`plan`](Self::plan) gets later, in order, before it
    /// goes to the primary (`body`: its body, `refers`: what the session tracker resolved it
    /// to). An Execute of a statement no Describe was sent for (the client sends
    /// Parse/Bind/Execute and never asks for the columns) returns the `Describe` of its
    /// portal that pgprism sends both sides just before it: its answer (RowDescription or
    /// NoData) gives compare the columns' types, so float and timestamp tolerances,
    /// `type-equivalences`, the column-type check and binary values apply, and is never
    /// passed to the client. Once per prepared statement: the columns are kept for its later
    /// Executes (an unnamed statement is a new statement at each Parse). A statement the
    /// client described itself (a Describe of it, or of a portal of it, is noted here) costs
    /// nothing more. (Describing the portal rather than the statement: its answer carries the
    /// Bind's result formats, and a portal's name is the client's on a pooled connection too.)
    pub fn describe_unseen(&mut self, tag: u8, body: &[u8], refers: &Refers) -> Option<Bytes> {
        match tag {
            tag::DESCRIBE => {
                if let Some(statement) = self.referred(refers) {
                    statement.described.ask(PRIMARY);
                }
                None
            }
            tag::EXECUTE => {
                let index = self.executes_noted;
                self.executes_noted += 1;
                let Refers::Portal(portal) = refers else {
                    return None;
                };
                if self.link.dead.get() {
                    return None;
                }
                let statement = Compared::of(&portal.statement, &self.target);
                // Not compared (or a COPY, whose rows have no described columns): no cost.
                if statement.excluded || statement.primary_only || statement.copy {
                    return None;
                }
                let name = wire::Execute::new(body).portal().ok()?;
                if !statement.described.ask(PRIMARY) {
                    return None;
                }
                let mut frame = BytesMut::new();
                wire::encode::describe(&mut frame, wire::ObjectKind::Portal, name).ok()?;
                let frame = frame.freeze();
                let stats = &self.target.stats;
                stats.own_describes.set(stats.own_describes.get() + 1);
                self.own_describes.push_back((index, frame.clone()));
                Some(frame)
            }
            _ => None,
        }
    }

    /// [`describe_unseen`](Self::describe_unseen) for a batch of client frames: the bytes the
    /// primary gets in place of `frames`, pgprism's own Describes among them (`None`:
    /// `frames` as they are).
    pub fn describe_unseen_in(&mut self, frames: &Bytes, framed: &[Framed]) -> Option<Bytes> {
        let mut out: Option<BytesMut> = None;
        let mut copied = 0;
        for f in framed {
            if f.tag != tag::DESCRIBE && f.tag != tag::EXECUTE {
                continue;
            }
            let body = &frames[f.start + wire::HEADER_BYTES..f.end];
            if let Some(own) = self.describe_unseen(f.tag, body, &f.refers) {
                let out = out.get_or_insert_with(|| BytesMut::with_capacity(frames.len() + 64));
                out.extend_from_slice(&frames[copied..f.start]);
                out.extend_from_slice(&own);
                copied = f.start;
            }
        }
        let mut out = out?;
        out.extend_from_slice(&frames[copied..]);
        Some(out.freeze())
    }

    /// Before the client's Execute (`body`) is planned: pgprism's own Describe of its portal,
    /// when [`describe_unseen`](Self::describe_unseen) sent one before it, is expected first
    /// on the primary and goes to the shadow in the same place. When the primary knows the
    /// columns but the shadow was never asked (the client's Describe was in a batch routed
    /// to the primary only, so the shadow never got it), the shadow alone gets one: else the
    /// types, and with them the tolerances, would apply to one side only.
    fn plan_own_describe(&mut self, refers: &Refers, body: &[u8], routes: bool) {
        let index = self.executes_planned;
        self.executes_planned += 1;
        if let Some(&(at, _)) = self.own_describes.front() {
            crate::invariant!(
                at >= index,
                "every Execute with pgprism's own Describe is planned after it was noted"
            );
            if at == index
                && let Some((_, frame)) = self.own_describes.pop_front()
            {
                let described = match refers {
                    Refers::Portal(portal) => Compared::of(&portal.statement, &self.target)
                        .described
                        .clone(),
                    _ => Rc::default(),
                };
                let expect = Expect::OwnDescribe(described);
                self.link.expects[PRIMARY]
                    .borrow_mut()
                    .push_back(expect.clone());
                self.hold(frame, routes, Some(expect));
                return;
            }
        }
        let Refers::Portal(portal) = refers else {
            return;
        };
        if self.link.dead.get() || self.batch_withheld || self.batch_cut {
            return;
        }
        let statement = Compared::of(&portal.statement, &self.target);
        if statement.excluded
            || statement.primary_only
            || statement.copy
            || statement.described.asked(SHADOW)
        {
            return;
        }
        let Ok(name) = wire::Execute::new(body).portal() else {
            return;
        };
        let mut frame = BytesMut::new();
        if wire::encode::describe(&mut frame, wire::ObjectKind::Portal, name).is_err() {
            return;
        }
        // Counted once it goes to the shadow: held with a batch that then turns out to be
        // routed to the primary only, it is dropped unsent.
        if self.holds(routes) {
            self.held_own_describes += 1;
        } else {
            let stats = &self.target.stats;
            stats.own_describes.set(stats.own_describes.get() + 1);
        }
        let expect = Expect::OwnDescribe(statement.described.clone());
        self.hold(frame.freeze(), routes, Some(expect));
    }

    /// Records one batch of complete client frames (before it goes to the primary, so the
    /// downstream half always finds the sync points it pairs) and prepares the shadow's copy.
    /// `first_sync`: the session tracker's number of the batch's first sync point.
    pub fn plan(&mut self, frames: &Bytes, framed: &[Framed], read_at: Instant, first_sync: u64) {
        // Sync points before the session was ready (none, for a client that waits for its
        // authentication) were never planned: the tracker's numbers are offset by them.
        self.link
            .numbering
            .set(first_sync.saturating_sub(self.link.planned.get()));
        // Frames of a batch still open from the last read stay in `out`.
        self.segments.clear();
        self.flushed = false;
        self.overflowed = false;
        let routes = self.target.rules.routes();
        // A Flush after the batch's last Sync: the client waits for answers before it syncs.
        let last_sync = framed.iter().rposition(|f| f.tag == tag::SYNC);
        for (index, f) in framed.iter().enumerate() {
            let (tag, start, end) = (f.tag, f.start, f.end);
            let body = &frames[start + wire::HEADER_BYTES..end];
            let frame = frames.slice(start..end);
            match tag {
                // The session tracker's COPY rule: the servers answer this Sync for the sync
                // point a Sync they ignored during the COPY opened.
                tag::SYNC if f.step == SessionStep::QuietSync => {
                    if self.copy_to_shadow {
                        self.send(frame, None);
                    }
                    continue;
                }
                tag::FLUSH if last_sync.is_none_or(|last| index > last) => {
                    self.link.flush_requested.set(Some(self.link.planned.get()));
                    self.flushed = true;
                }
                tag::EXECUTE => self.plan_own_describe(&f.refers, body, routes),
                _ => {}
            }
            let expect = self.expect(tag, &f.refers);
            if let Some(e) = &expect {
                self.link.expects[PRIMARY].borrow_mut().push_back(e.clone());
            }
            let planned = Planned {
                frame,
                expect,
                routes,
                read_at,
            };
            self.plan_frame(tag, body, &f.refers, planned);
            self.bound_batch();
        }
    }

    /// Keeps what an open extended batch holds for the shadow within
    /// `compare.shadow-batch-bytes-max`: beyond it the batch's routing is decided now and
    /// what it holds goes to the shadow (or, routed to the primary only, is dropped), as
    /// after a Flush; the batch is then not ordered.
    fn bound_batch(&mut self) {
        let target = self.target.clone();
        let (max, stats) = (target.cfg.shadow_batch_bytes_max, &target.stats);
        if !self.batch_released && !self.batch_withheld && self.held.len() > max {
            stats.batches_released.set(stats.batches_released.get() + 1);
            if self.batch_primary_only {
                self.drop_held();
                self.batch_withheld = true;
                self.copy_to_shadow = false;
            } else {
                self.release_held();
                self.batch_released = true;
                self.copy_to_shadow = true;
                self.open_batch = true;
            }
        }
        if self.open_batch && !self.overflowed && self.out_bytes > max {
            // Counted once per batch (a batch released to the shadow is counted above).
            if !self.batch_released && !self.batch_unordered {
                stats.batches_released.set(stats.batches_released.get() + 1);
            }
            self.overflowed = true;
        }
    }

    /// One client frame of [`plan`](Self::plan), by kind; `refers`: what the session tracker
    /// resolved it to (the statements and portals are the tracker's, not compare's).
    fn plan_frame(&mut self, tag: u8, body: &[u8], refers: &Refers, f: Planned) {
        match tag {
            tag::QUERY => self.plan_query(body, refers, f),
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                // What the frame names joins the batch's routing.
                if let Some(statement) = self.referred(refers) {
                    self.batch_primary_only |= statement.primary_only;
                    self.cut_released_batch();
                    if let (tag::BIND, Refers::Portal(portal)) = (tag, refers) {
                        // The rows an Execute of this binding touches, read once.
                        portal.extension(Slot::Compare, || {
                            bind(&statement.scan.footprint, wire::Bind::new(body))
                        });
                    }
                }
                self.hold(f.frame, f.routes, f.expect);
            }
            tag::EXECUTE => {
                let statement = self
                    .referred(refers)
                    .unwrap_or_else(|| Rc::new(Compared::unknown()));
                self.batch_primary_only |= statement.primary_only;
                self.cut_released_batch();
                match refers {
                    Refers::Portal(portal) => self.batch_footprint.join(
                        &portal.extension(Slot::Compare, || statement.scan.footprint.clone()),
                    ),
                    _ => self.batch_footprint.join(&statement.scan.footprint),
                }
                self.batch.push(statement);
                self.hold(f.frame, f.routes, f.expect);
            }
            tag::SYNC => self.plan_sync(f),
            tag::FUNCTION_CALL => {
                // It may touch anything: an unknown statement.
                let seq = self.link.planned.get();
                let ordered = self.push_meta(
                    vec![Rc::new(Compared::unknown())],
                    Footprint::wild(),
                    true,
                    f.read_at,
                );
                self.send(f.frame, Some(seq));
                self.out_expects.push(Expect::Sync);
                self.cut(None, self.order_of(seq, ordered));
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                if self.copy_to_shadow {
                    self.send(f.frame, None);
                }
            }
            tag::TERMINATE => self.send(f.frame, None),
            tag::FLUSH if f.routes && !self.batch_released && !self.held.is_empty() => {
                self.plan_flush(f)
            }
            _ => self.hold(f.frame, f.routes, None),
        }
    }

    /// Fails closed when a batch already sent to the shadow (in part) turns out to be routed
    /// to the primary only: the shadow must never run what follows.
    fn cut_released_batch(&mut self) {
        if self.batch_released && self.batch_primary_only && !self.batch_cut {
            self.batch_cut = true;
            self.copy_to_shadow = false;
            let stats = &self.target.stats;
            stats.batches_cut.set(stats.batches_cut.get() + 1);
        }
    }

    /// The statement a frame names (a portal's statement for a portal), as compare sees it.
    fn referred(&self, refers: &Refers) -> Option<Rc<Compared>> {
        match refers {
            Refers::Statement(statement) => Some(Compared::of(statement, &self.target)),
            Refers::Portal(portal) => Some(Compared::of(&portal.statement, &self.target)),
            Refers::Query(_) | Refers::Unknown(_) | Refers::Nothing => None,
        }
    }

    /// A simple Query: one sync point of its statements, to the shadow unless routed to the
    /// primary only.
    fn plan_query(&mut self, body: &[u8], refers: &Refers, f: Planned) {
        let text = wire::Query::new(body).query().unwrap_or("");
        let statements: Vec<Rc<Compared>> = match refers {
            Refers::Query(parts) => parts.iter().map(|p| self.query_part(p)).collect(),
            _ => Vec::new(),
        };
        let shadow = !(f.routes && self.target.rules.primary_only(text));
        self.copy_to_shadow = shadow;
        let gates = gates(&statements);
        let seq = self.link.planned.get();
        let mut footprint = Footprint::default();
        for statement in &statements {
            footprint.join(&statement.scan.footprint);
        }
        let ordered = self.push_meta(statements, footprint, shadow, f.read_at);
        if shadow {
            self.send(f.frame, Some(seq));
            self.out_expects.push(Expect::Sync);
            self.cut(gates.then_some(seq), self.order_of(seq, ordered));
        }
    }

    /// Sync: the batch's sync point; its routing decides where the held frames go.
    fn plan_sync(&mut self, f: Planned) {
        let statements = std::mem::take(&mut self.batch);
        let footprint = std::mem::take(&mut self.batch_footprint);
        let shadow = !self.batch_withheld && (self.batch_released || !self.batch_primary_only);
        let cut = std::mem::take(&mut self.batch_cut);
        self.batch_primary_only = false;
        self.batch_released = false;
        self.batch_withheld = false;
        // A COPY this batch started follows the batch's routing.
        self.copy_to_shadow = shadow && !cut;
        let gates = gates(&statements);
        let seq = self.link.planned.get();
        let ordered = self.push_meta(statements, footprint, shadow, f.read_at);
        if let Some(meta) = self.link.metas.borrow_mut().back_mut() {
            meta.withheld = cut;
        }
        self.open_batch = false;
        self.batch_unordered = false;
        if shadow {
            self.release_held();
            self.send(f.frame, Some(seq));
            self.out_expects.push(Expect::Sync);
            self.cut(gates.then_some(seq), self.order_of(seq, ordered));
        } else {
            self.drop_held();
        }
    }

    /// The client waits for answers before it syncs: the batch's routing is decided now, so
    /// that a COPY it started gets its data where it runs. (A Flush with nothing of the batch
    /// before it, e.g. right after a Sync, decides nothing and waits with the next batch.)
    fn plan_flush(&mut self, f: Planned) {
        if self.batch_primary_only {
            self.copy_to_shadow = false;
            self.hold(f.frame, f.routes, None);
        } else {
            self.release_held();
            self.batch_released = true;
            self.copy_to_shadow = true;
            self.send(f.frame, None);
        }
    }

    /// One statement of a simple Query. `EXECUTE name` is compared as the statement it runs
    /// (its ORDER BY, whether it only reads), under its own text; the tracker resolved which
    /// one that is (SQL-level prepared statements share the protocol's namespace).
    fn query_part(&self, part: &QueryPart) -> Rc<Compared> {
        let own = Compared::of(&part.own, &self.target);
        let Some(runs) = &part.runs else {
            return own;
        };
        let inner = Compared::of(runs, &self.target);
        Rc::new(Compared {
            text: own.text.clone(),
            ordered: inner.ordered,
            order_keys: inner.order_keys.clone(),
            excluded: own.excluded || inner.excluded,
            read_only: inner.read_only,
            // Its EXPLAIN would need the statement prepared on the EXPLAIN connection: never
            // re-run.
            params: true,
            primary_only: inner.primary_only,
            transaction: inner.transaction,
            transaction_options: inner.transaction_options,
            copy: inner.copy,
            described: inner.described.clone(),
            scan: Scan {
                footprint: {
                    let mut f = own.scan.footprint.clone();
                    f.join(&inner.scan.footprint);
                    f
                },
                nondeterministic: inner.scan.nondeterministic,
            },
        })
    }

    /// What the answer to one client frame will be read against (after the frame's own
    /// bookkeeping for Parse and Bind, which [`plan`](Self::plan) does after this: a Describe
    /// or Execute refers to statements and portals of earlier frames).
    fn expect(&self, tag: u8, refers: &Refers) -> Option<Expect> {
        let described =
            |statement: &Statement| Compared::of(statement, &self.target).described.clone();
        match (tag, refers) {
            (tag::QUERY | tag::SYNC | tag::FUNCTION_CALL, _) => Some(Expect::Sync),
            (tag::DESCRIBE, Refers::Statement(s)) => Some(Expect::DescribeStatement(described(s))),
            (tag::DESCRIBE, Refers::Portal(p)) => {
                Some(Expect::DescribePortal(described(&p.statement)))
            }
            (tag::DESCRIBE, Refers::Unknown(wire::ObjectKind::Portal)) => {
                Some(Expect::DescribePortal(Rc::default()))
            }
            (tag::DESCRIBE, _) => Some(Expect::DescribeStatement(Rc::default())),
            (tag::EXECUTE, Refers::Portal(p)) => {
                Some(Expect::Execute(described(&p.statement), p.formats.clone()))
            }
            (tag::EXECUTE, _) => Some(Expect::Execute(Rc::default(), ResultFormats::Text)),
            _ => None,
        }
    }

    /// Records one sync point; returns whether it goes to the shadow in the completion
    /// order: not when ordering is off, nor for a COPY (the client's data for it reaches the
    /// shadow only after its frames, so they cannot wait for the primary's answer), nor when
    /// a Flush already sent part of it.
    /// `footprint`: what its statements touch, parameters bound.
    fn push_meta(
        &mut self,
        statements: Vec<Rc<Compared>>,
        footprint: Footprint,
        shadow: bool,
        read_at: Instant,
    ) -> bool {
        let routed_shadow = shadow;
        let shadow = shadow && !self.link.dead.get();
        let ordered = shadow
            && self.target.port.is_some()
            && !self.batch_unordered
            && !statements.iter().any(|s| s.copy);
        let start = self.start(&statements, &footprint, !shadow);
        if start.1.counted {
            self.link
                .in_flight
                .borrow_mut()
                .push_back((self.link.planned.get(), start.clone()));
        }
        self.link.planned.set(self.link.planned.get() + 1);
        self.link.metas.borrow_mut().push_back(SyncMeta {
            statements,
            footprint,
            shadow,
            routed: !routed_shadow,
            withheld: false,
            ordered,
            start,
            read_at,
            number: None,
        });
        ordered
    }

    /// Tells the ledger a sync point of these statements goes to the primary now (a write is
    /// in flight until answered). One that may end a transaction carries what it wrote.
    fn start(&self, statements: &[Rc<Compared>], touched: &Footprint, only: bool) -> Start {
        let Some(port) = &self.target.port else {
            return Start::default();
        };
        let mut footprint = touched.clone();
        if statements.iter().any(|s| s.transaction) {
            footprint.join(&self.link.written.borrow());
        }
        let started = port.ledger.start(self.link.order_session, &footprint, only);
        (footprint, started)
    }

    fn order_of(&self, seq: u64, ordered: bool) -> Order {
        if ordered {
            Order::Await(seq)
        } else {
            Order::Free
        }
    }

    /// `sync`: the frame ends client sync point number `sync`.
    fn send(&mut self, frame: Bytes, sync: Option<u64>) {
        if let Some(seq) = sync {
            self.out_syncs.push(seq + self.link.numbering.get());
        }
        self.out_bytes += frame.len();
        // Adjacent slices of one read are merged back into one buffer write.
        self.out.push(frame);
    }

    /// Sends the shadow the batch's frames held until its routing was decided.
    fn release_held(&mut self) {
        let stats = &self.target.stats;
        let own = std::mem::take(&mut self.held_own_describes);
        stats.own_describes.set(stats.own_describes.get() + own);
        if !self.held.is_empty() {
            let held = self.held.split().freeze();
            self.send(held, None);
        }
        self.out_expects.append(&mut self.held_expects);
    }

    /// Drops what the batch held for the shadow (routed to the primary only): a Describe
    /// among it never tells the shadow its statement's columns.
    fn drop_held(&mut self) {
        self.held.clear();
        self.held_own_describes = 0;
        for expect in self.held_expects.drain(..) {
            if let Some(described) = expect.describes() {
                described.skipped(SHADOW);
            }
        }
    }

    /// Whether a frame planned now is held until the batch's routing is decided.
    fn holds(&self, routes: bool) -> bool {
        routes && !self.batch_released
    }

    fn hold(&mut self, frame: Bytes, routes: bool, expect: Option<Expect>) {
        if self.batch_withheld || self.batch_cut {
            return;
        }
        if let Some(described) = expect.as_ref().and_then(Expect::describes) {
            described.ask(SHADOW);
        }
        if self.holds(routes) {
            self.held.extend_from_slice(&frame);
            self.held_expects.extend(expect);
        } else {
            self.open_batch = true;
            self.send(frame, None);
            self.out_expects.extend(expect);
        }
    }

    /// Ends the segment being filled; `gate`: it ends with that gating sync point.
    fn cut(&mut self, gate: Option<u64>, order: Order) {
        if self.out.is_empty() && self.out_expects.is_empty() && gate.is_none() {
            return;
        }
        let spare = self.link.spare.borrow_mut().pop().unwrap_or_default();
        let frames = std::mem::replace(&mut self.out, spare.frames);
        self.out_bytes = 0;
        self.segments.push(Segment {
            bytes: frames.iter().map(Bytes::len).sum(),
            frames,
            expects: std::mem::replace(&mut self.out_expects, spare.expects),
            syncs: std::mem::replace(&mut self.out_syncs, spare.syncs),
            gate,
            order,
        });
    }

    /// Moves the segments prepared so far to the queue the shadow is written from; dropped
    /// once nothing more goes to the shadow. Frames of an extended batch whose Sync has not
    /// come stay for it, unless the client flushed (it waits for answers) or `all`.
    fn enqueue(&mut self, all: bool) {
        if all || !self.open_batch || self.flushed || self.overflowed {
            if self.open_batch && !(self.out.is_empty() && self.out_expects.is_empty()) {
                self.batch_unordered = true;
            }
            self.cut(None, Order::Free);
        }
        let link = &self.link;
        if link.dead.get() {
            self.segments.clear();
            return;
        }
        let mut queue = link.queue.borrow_mut();
        for segment in self.segments.drain(..) {
            link.queued_bytes
                .set(link.queued_bytes.get() + segment.bytes);
            queue.push_back(segment);
        }
    }

    /// Queues what [`plan`](Self::plan) prepared for the shadow (after the primary write)
    /// and writes what may go now; the session's [`ShadowWriter`] writes what a gate holds
    /// back. Waits while more than `compare.shadow-queue-bytes-max` is queued.
    pub async fn write(&mut self) {
        self.enqueue(false);
        let link = self.link.clone();
        if link.dead.get() || link.queue.borrow().is_empty() {
            return;
        }
        // Mostly written here and now, as the client's batch arrived; what a gate holds
        // back goes later, from the writer (and so does what waits for a pooled shadow
        // connection: the client's reads never wait for one).
        if self.shadow.writable_now() {
            write_ready(&link, &self.shadow).await;
        } else if let Some(w) = link.writer_waker.take() {
            w.wake();
        }
        self.room().await;
    }

    /// Queues what [`plan`](Self::plan) prepared for the shadow (after the primary write)
    /// for the session's [`ShadowWriter`] alone to write: a transaction-pooled session reads
    /// the primary in the same loop that reads its client, so it never waits on the
    /// shadow's socket (nor for a pooled shadow connection) itself.
    pub fn queue(&mut self) {
        self.enqueue(false);
        if !self.link.front_awaits_answer()
            && let Some(w) = self.link.writer_waker.take()
        {
            w.wake();
        }
    }

    /// Completes once no more than `compare.shadow-queue-bytes-max` waits for the shadow (or
    /// nothing more goes to it): a session reads its client only then.
    pub async fn room(&self) {
        let (link, max) = (&self.link, self.target.cfg.shadow_queue_bytes_max);
        futures_lite::future::poll_fn(|cx| {
            if link.dead.get() || link.queued_bytes.get() <= max {
                return Poll::Ready(());
            }
            link.space_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
    }

    /// The client left: end the shadow session too, once it has run everything it was sent
    /// (the downstream pump keeps reading it until it closes, bounded in time).
    pub fn finish(&mut self, said_terminate: bool) {
        if !said_terminate {
            self.send(Bytes::from_static(&[b'X', 0, 0, 0, 4]), None);
        }
        self.enqueue(true);
        self.link.finished.set(true);
        if let Some(w) = self.link.writer_waker.take() {
            w.wake();
        }
    }
}

// Three halves, three wakers. A compare session runs as one task of three parts
// (`exec::join3`): the client side (`Dispatch`: plans, writes to the primary and, mostly, to
// the shadow), the pump (`Pump`: reads both sides' answers, judges, writes to the client) and
// the `ShadowWriter`. Each part is polled only when its own waker was woken, so every wait of
// one part on state another part changes must be woken by the change; none may rely on being
// polled because a sibling was. The waits, and what wakes each:
//
// - the writer's `run` waits on the link's `dead`, `queue`, `finished`, `gate`, `writing` and
//   `cancel_held`, with `writer_waker`: `stop` (dead, queue cleared) wakes it; the client
//   side's `write` wakes it after its own `write_ready` left anything queued (a gate, a
//   write under way) or when the shadow is not writable now, `queue` and `finish` wake it
//   (`write_ready` and `queue` leave it parked while the queue's front waits for a ticket
//   not given yet, `front_awaits_answer`: the ticket's wake comes then); `settle` wakes it
//   when it lifts the gate; the cancel task wakes it when `cancel_held` ends; `writing`
//   ends in `write_ready`, which then wakes it if anything is queued (and with nothing
//   queued the writer waits for `finish`, which wakes it);
// - the writer's `clear` waits on the queue's front (changed only by the writer itself and
//   `stop`), the ticket pushed by `primary_completed` (which wakes it: this wake is why the
//   pump's answers never leave an ordered sync point unsent) and `primary_ended` (whose
//   setter wakes it); the ledger's wait registers its waker with the `Port`, whose `drain`
//   wakes it, and its bounds are timers;
// - the client side's `room` waits on `queued_bytes` and `dead` with `space_waker`: every
//   place that lowers `queued_bytes` (`write_ready`, `drop_front`, `stop`) wakes it; a
//   transaction-pooled client side's `Relayed::push` waits with the relayed answers' own
//   waker, which the pump's reads and its end (`stop_reading`) wake;
// - the pump waits only on sockets (the client's, the primary's or the relayed answers, the
//   shadow's or its lease) and its limit's timer: a lease's reader is woken by `lend`, `fail`
//   and the Terminate's `end`, relayed answers by `push` and `close`; what it reads of the
//   other parts (`client_sent_all`, the planned sync points) is set before the socket event
//   that makes it look;
// - each socket has one waker slot per direction, and no two parts wait on the same one: the
//   client side reads the client and writes the primary, the pump reads the primary and the
//   shadow and writes the client, and the shadow's writes (client side or writer) are one at
//   a time under `writing`.
//
// A new wait between parts needs its waker here; `tests/compare.rs` runs every path above.

/// The only writer of a compare session's shadow connection: writes the client's bytes as
/// the upstream half queues them, holding back what follows a gating sync point until that
/// point is settled (and the shadow brought back in step when it diverged).
pub struct ShadowWriter {
    link: Rc<Pairing>,
    shadow: Shadow,
    target: Rc<CompareTarget>,
}

impl ShadowWriter {
    /// Writes what becomes writable while the upstream half is not there to do it: what
    /// waited behind a gate, or what was queued during another write.
    pub async fn run(self) {
        let link = &self.link;
        loop {
            let go = futures_lite::future::poll_fn(|cx| {
                if link.dead.get() {
                    return Poll::Ready(false);
                }
                if link.queue.borrow().is_empty() {
                    if link.finished.get() {
                        return Poll::Ready(false);
                    }
                } else if link.gate.get().is_none()
                    && !link.writing.get()
                    && !link.cancel_held.get()
                {
                    return Poll::Ready(true);
                }
                link.writer_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            if !go {
                break;
            }
            if let Some(seq) = link.awaiting() {
                self.clear(seq).await;
                continue;
            }
            write_ready(link, &self.shadow).await;
        }
    }

    /// The segment at the queue's front ends ordered sync point `seq`: waits for the
    /// primary's answer to it, then for its turn in the completion order (at most
    /// `compare.order-wait-ms`; beyond it, it goes anyway, overtaken).
    async fn clear(&self, seq: u64) {
        let link = &self.link;
        let ticket = futures_lite::future::poll_fn(|cx| {
            if link.dead.get() || link.awaiting() != Some(seq) {
                return Poll::Ready(None);
            }
            let mut tickets = link.tickets.borrow_mut();
            // Tickets of sync points whose frames never came this far (dropped) go.
            while tickets.front().is_some_and(|(s, _)| *s < seq) {
                tickets.pop_front();
            }
            if let Some(&(s, c)) = tickets.front()
                && s == seq
            {
                tickets.pop_front();
                return Poll::Ready(Some(c));
            }
            if link.primary_ended.get() {
                // The primary never answered it, so whether it ran there is unknown: the
                // shadow does not run it either (nor holds the session's transaction and
                // locks waiting for an answer that cannot come).
                drop(tickets);
                link.drop_front();
                return Poll::Ready(None);
            }
            link.writer_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let Some(c) = ticket else {
            return;
        };
        if let (Some(c), Some(port)) = (c, &self.target.port) {
            let cfg = &self.target.cfg;
            let limit = std::time::Duration::from_millis(cfg.order_wait_ms);
            let grace = std::time::Duration::from_millis(cfg.order_lock_wait_ms);
            let wait = port.wait(c);
            let mut wait = std::pin::pin!(wait);
            // Most sync points may go at once: no clock read, no timer for them.
            let went = futures_lite::future::poll_once(wait.as_mut())
                .await
                .is_some();
            if !went {
                let deadline = std::time::Instant::now() + limit;
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    // Looked at every `grace` while it waits (only then: a timer per slice).
                    let slice = if grace.is_zero() {
                        left
                    } else {
                        left.min(grace)
                    };
                    if crate::exec::within(slice, wait.as_mut()).await.is_some() {
                        break;
                    }
                    if left <= slice {
                        port.give_up(c);
                        port.ledger.force(c, Unpinned::WaitExpired);
                        link.order_expired.set(link.order_expired.get() + 1);
                        break;
                    }
                    // A transaction holding a pooled shadow connection while other sessions wait
                    // for one may be waiting for them: as with locks, it goes.
                    if port.ledger.held_by_own_locks(c, grace)
                        || self.shadow.holds_while_others_wait()
                    {
                        port.give_up(c);
                        port.ledger.force(c, Unpinned::LockBreak);
                        link.order_lock_breaks.set(link.order_lock_breaks.get() + 1);
                        break;
                    }
                }
            }
        }
        if let Some(front) = link.queue.borrow_mut().front_mut()
            && front.order == Order::Await(seq)
        {
            front.order = Order::Cleared(c);
        }
    }
}

/// Writes to the shadow what may go now (a ROLLBACK or BEGIN that is due, then queued
/// segments up to the next gate), unless another write is under way or nothing may go.
async fn write_ready(link: &Rc<Pairing>, shadow: &Shadow) {
    while !link.writing.get()
        && !link.dead.get()
        && link.gate.get().is_none()
        && !link.cancel_held.get()
    {
        if link.queue.borrow().is_empty() || link.awaiting().is_some() {
            break;
        }
        let mut frames = std::mem::take(&mut *link.write_frames.borrow_mut());
        let mut bytes = 0;
        let syncs_before = link.shadow_kinds.borrow().len();
        {
            // Queued before the bytes go out, so the answers always find them.
            let mut expects = link.expects[SHADOW].borrow_mut();
            let mut kinds = link.shadow_kinds.borrow_mut();
            for (due, sql) in [(&link.rollback_due, "ROLLBACK"), (&link.begin_due, "BEGIN")] {
                if due.replace(false) {
                    let mut buf = BytesMut::new();
                    let _ = wire::encode::query(&mut buf, sql);
                    bytes += buf.len();
                    frames.push(buf.freeze());
                    kinds.push_back(ShadowSync::Own);
                    expects.push_back(Expect::Sync);
                }
            }
            while link.gate.get().is_none() && bytes < SHADOW_WRITE_BYTES {
                if link.awaiting().is_some() {
                    break;
                }
                let Some(mut segment) = link.queue.borrow_mut().pop_front() else {
                    break;
                };
                let number = match segment.order {
                    Order::Cleared(c) => c,
                    _ => None,
                };
                link.queued_bytes
                    .set(link.queued_bytes.get().saturating_sub(segment.bytes));
                bytes += segment.bytes;
                frames.append(&mut segment.frames);
                expects.extend(segment.expects.drain(..));
                for &seq in &segment.syncs {
                    kinds.push_back(ShadowSync::Client(number, seq));
                }
                if segment.gate.is_some() {
                    link.gate.set(segment.gate);
                }
                let mut spare = link.spare.borrow_mut();
                if spare.len() < SPARES_MAX
                    && let Some(emptied) = Spare::of(segment)
                {
                    spare.push(emptied);
                }
            }
        }
        if let Some(w) = link.space_waker.take() {
            w.wake();
        }
        let syncs = link.shadow_kinds.borrow().len() - syncs_before;
        link.writing.set(true);
        // One frame goes out as is (zero-copy); several in one buffer write.
        let write = match frames.as_mut_slice() {
            [] => None,
            [frame] => Some(std::mem::take(frame)),
            _ => {
                let mut buf = BytesMut::with_capacity(bytes);
                for frame in &frames {
                    buf.extend_from_slice(frame);
                }
                Some(buf.freeze())
            }
        };
        frames.clear();
        if frames.capacity() <= SPARE_CAPACITY_MAX {
            *link.write_frames.borrow_mut() = frames;
        }
        let written = match write {
            None => Ok(()),
            Some(bytes) => shadow.write(bytes, syncs).await,
        };
        link.writing.set(false);
        if written.is_err() {
            link.stop();
            return;
        }
        link.check_cancel();
    }
    // Queued meanwhile (or released while this write was under way): the writer's turn,
    // unless all it could do is wait for the primary's answer (which wakes it).
    if !link.queue.borrow().is_empty()
        && !link.front_awaits_answer()
        && let Some(w) = link.writer_waker.take()
    {
        w.wake();
    }
}

impl Pairing {
    /// Cancels the shadow's statement when it is the one the client's cancel reached on the
    /// primary (see `backend::cancel::Pending`): looked at whenever what the shadow runs
    /// changes (a write to an idle shadow, an answer) and when the primary's answer comes.
    fn check_cancel(self: &Rc<Self>) {
        use crate::backend::cancel::Due;
        // Looked at on every shadow write and answer: nothing to look at (most of the
        // time) costs one test.
        if !self.cancel.wanted() {
            return;
        }
        // The shadow runs the oldest sync point written and not answered.
        // A cancel may only go while that sync point is the only one written and unanswered:
        // the shadow's answers are read late (it may have finished it already), and anything
        // written behind it could be what runs when the cancel arrives.
        let (running, alone) = {
            let kinds = self.shadow_kinds.borrow();
            let running = match kinds.front() {
                Some(ShadowSync::Client(_, seq)) => Some(*seq),
                _ => None,
            };
            (running, kinds.len() == 1)
        };
        // No key yet (a pooled shadow still runs pgprism's preparation of its connection):
        // the cancel waits for the session's own turn there (`Lease::on_turn`).
        let Some(key) = self.shadow.key() else {
            return;
        };
        match self.cancel.due(running, alone) {
            Due::Fire => {}
            Due::No => return,
            Due::Skip => {
                let skipped = &self.target.stats.cancels_skipped;
                skipped.set(skipped.get() + 1);
                return;
            }
        }
        let (false, Some(seq)) = (self.dead.get(), running) else {
            return;
        };
        let target = self.target.clone();
        self.cancel_held.set(true);
        self.shadow.cancel_in_flight(true);
        let kinds = Rc::downgrade(self);
        crate::exec::spawn(async move {
            let limit = std::time::Duration::from_millis(target.cfg.connect_timeout_ms);
            let addr = target.addr.get();
            let still = || {
                kinds.upgrade().is_some_and(|link| {
                    let kinds = link.shadow_kinds.borrow();
                    kinds.len() == 1
                        && matches!(kinds.front(), Some(ShadowSync::Client(_, s)) if *s == seq)
                })
            };
            if crate::backend::cancel::send_until_gone(&addr, &target.tls, key, limit, still).await
            {
                let counted = &target.stats.cancels_forwarded;
                counted.set(counted.get() + 1);
            }
            if let Some(link) = kinds.upgrade() {
                link.cancel_held.set(false);
                link.shadow.cancel_in_flight(false);
                if let Some(w) = link.writer_waker.take() {
                    w.wake();
                }
            }
        });
    }

    /// Drops the segment at the queue's front, unwritten.
    fn drop_front(&self) {
        if let Some(segment) = self.queue.borrow_mut().pop_front() {
            self.queued_bytes
                .set(self.queued_bytes.get().saturating_sub(segment.bytes));
        }
        if let Some(w) = self.space_waker.take() {
            w.wake();
        }
    }

    /// The ordered sync point the segment at the queue's front waits for, if it waits.
    fn awaiting(&self) -> Option<u64> {
        match self.queue.borrow().front()?.order {
            Order::Await(seq) => Some(seq),
            _ => None,
        }
    }

    /// The segment at the queue's front waits for the ticket of a sync point the primary has
    /// not answered (and still may): the writer can do nothing before that answer, and
    /// `primary_completed` wakes it with the ticket (or `primary_ended`, or `stop`). Waking
    /// it sooner cost a poll of the writer per ordered sync point, to park in `clear`.
    fn front_awaits_answer(&self) -> bool {
        let Some(seq) = self.awaiting() else {
            return false;
        };
        !self.primary_ended.get() && self.tickets.borrow().back().is_none_or(|&(s, _)| s < seq)
    }

    /// Whether the next answer the shadow owes is to pgprism's own ROLLBACK or BEGIN.
    fn own_next(&self) -> bool {
        self.shadow_kinds.borrow().front() == Some(&ShadowSync::Own)
    }

    /// Nothing more is written to the shadow; whoever waits on the queue is released.
    fn stop(&self) {
        self.abandon();
        self.dead.set(true);
        self.gate.set(None);
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
        if let Some(w) = self.space_waker.take() {
            w.wake();
        }
    }
}

impl Pairing {
    /// The session's sync points still pending in the ledger never complete on the shadow.
    fn abandon(&self) {
        let issued = std::mem::take(&mut *self.issued.borrow_mut());
        let in_flight: Vec<Start> = self
            .in_flight
            .borrow_mut()
            .drain(..)
            .map(|(_, s)| s)
            .collect();
        if let Some(port) = &self.port {
            port.ledger
                .unstart(self.order_session, &in_flight, port.shard());
            port.ledger.abandon(&issued, port.shard());
            port.drain();
        }
    }
}

impl Drop for Pairing {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Marker for [`Exchange`]-style construction: upstream and downstream halves of one session.
pub struct Exchange;

impl Exchange {
    /// Builds the two halves for one session over its shadow connection.
    pub fn pair(
        target: Rc<CompareTarget>,
        shadow: Shadow,
        session: u64,
        params: Vec<(String, String)>,
    ) -> (Dispatch, Comparer, ShadowWriter) {
        let port = target.port.clone();
        let link = Rc::new(Pairing {
            metas: RefCell::new(VecDeque::new()),
            shadow_kinds: RefCell::new(VecDeque::new()),
            tickets: RefCell::new(VecDeque::new()),
            issued: RefCell::new(Vec::new()),
            order_session: port.as_ref().map_or(0, |p| p.ledger.session()),
            order_expired: Cell::new(0),
            order_lock_breaks: Cell::new(0),
            written: RefCell::new(Footprint::default()),
            in_flight: RefCell::new(VecDeque::new()),
            port,
            rollback_due: Cell::new(false),
            begin_due: Cell::new(false),
            queue: RefCell::new(VecDeque::new()),
            spare: RefCell::new(Vec::new()),
            write_frames: RefCell::new(Vec::new()),
            queued_bytes: Cell::new(0),
            gate: Cell::new(None),
            finished: Cell::new(false),
            primary_ended: Cell::new(false),
            dead: Cell::new(false),
            writing: Cell::new(false),
            writer_waker: Cell::new(None),
            space_waker: Cell::new(None),
            expects: [Expects::default(), Expects::default()],
            planned: Cell::new(0),
            flush_requested: Cell::new(None),
            numbering: Cell::new(0),
            cancel: Default::default(),
            cancel_held: Cell::new(false),
            shadow: shadow.clone(),
            target: target.clone(),
        });
        if let Shadow::Pooled(lease) = &shadow {
            // A cancel held back while the lent connection ran pgprism's preparation of it.
            let weak = Rc::downgrade(&link);
            lease.on_turn(Box::new(move || {
                if let Some(link) = weak.upgrade() {
                    link.check_cancel();
                }
            }));
        }
        let source = usize::from(target.shadow_is_source());
        let fail = target.cfg.fail_on_differences;
        let up = Dispatch {
            link: link.clone(),
            target: target.clone(),
            shadow,
            batch: Vec::new(),
            batch_footprint: Footprint::default(),
            held_expects: Vec::new(),
            out_expects: Vec::new(),
            batch_primary_only: false,
            held: BytesMut::new(),
            copy_to_shadow: true,
            batch_released: false,
            out: Vec::new(),
            out_syncs: Vec::new(),
            segments: Vec::new(),
            open_batch: false,
            batch_unordered: false,
            flushed: false,
            out_bytes: 0,
            overflowed: false,
            batch_withheld: false,
            batch_cut: false,
            executes_noted: 0,
            executes_planned: 0,
            own_describes: VecDeque::new(),
            held_own_describes: 0,
        };
        let down = Comparer {
            digesters: [
                Digester::with_expects(target.rules.clone(), PRIMARY, link.expects[0].clone()),
                Digester::with_expects(target.rules.clone(), SHADOW, link.expects[1].clone()),
            ],
            target,
            link,
            done: [VecDeque::new(), VecDeque::new()],
            source,
            fail,
            pending: BytesMut::new(),
            pending_base: 0,
            pending_ends: VecDeque::new(),
            source_seq: 0,
            settled: 0,
            stream_through: None,
            diverged: false,
            shadow_alive: true,
            session,
            transaction: 0,
            params: Rc::new(params),
            primary_stamp_ns: 0,
        };
        let writer = ShadowWriter {
            link: up.link.clone(),
            shadow: up.shadow.clone(),
            target: up.target.clone(),
        };
        (up, down, writer)
    }
}

/// The downstream half: digests both sides, pairs sync points, decides the client's bytes.
pub struct Comparer {
    target: Rc<CompareTarget>,
    link: Rc<Pairing>,
    digesters: [Digester; 2],
    done: [VecDeque<SyncDigest>; 2],
    /// 0: the primary is the source of truth, 1: the shadow.
    pub source: usize,
    fail: bool,
    /// Held source bytes (fail-on-differences), with the absolute end of each held sync.
    pending: BytesMut,
    pending_base: usize,
    pending_ends: VecDeque<(u64, usize)>,
    /// Client sync points the source side has finished.
    source_seq: u64,
    /// Client sync points paired and judged.
    settled: u64,
    /// Sync points up to this one stream instead of being held (buffer bound exceeded).
    stream_through: Option<u64>,
    diverged: bool,
    shadow_alive: bool,
    session: u64,
    transaction: u64,
    params: Rc<Vec<(String, String)>>,
    /// See [`Comparer::set_primary_received`].
    primary_stamp_ns: u64,
}

/// Now, in ns since the Unix epoch (the clock of the kernel's receive timestamps).
fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub const PRIMARY: usize = 0;
pub const SHADOW: usize = 1;

impl Comparer {
    pub fn target(&self) -> &CompareTarget {
        &self.target
    }

    pub fn shadow_alive(&self) -> bool {
        self.shadow_alive
    }

    /// The shadow's part in the session's cancels.
    pub fn cancel(&self) -> Cancel {
        Cancel(self.link.clone())
    }

    /// The client is owed answers it has not been given: the source of truth's bytes held
    /// for the other side (fail-on-differences), or, with the shadow as the source, sync
    /// points the shadow has not finished (the primary's answer says nothing of those).
    pub fn owes_client(&self) -> bool {
        !self.pending.is_empty()
            || !self.pending_ends.is_empty()
            || (self.source == SHADOW && self.source_seq < self.link.planned.get())
    }

    /// The primary's answers ended: it answers no sync point that is still unanswered, and
    /// what the shadow's queue holds for such an answer is dropped (see `clear`).
    pub fn primary_ended(&self) {
        self.link.primary_ended.set(true);
        if let Some(w) = self.link.writer_waker.take() {
            w.wake();
        }
    }

    /// The session is over: the shadow writer stops.
    pub fn stop_shadow_writes(&self) {
        self.link.stop();
    }

    /// Feeds complete messages read from `side` (after startup); the bytes for the client
    /// are appended to `out`. `primary`: the session's tracker, fed the primary's frames in
    /// the same walk.
    pub fn feed(
        &mut self,
        side: usize,
        frames: &Bytes,
        mut primary: Option<&mut Tracker>,
        out: &mut Vec<Bytes>,
    ) -> Fed {
        let mut fed = Fed {
            syncs: 0,
            errors: 0,
        };
        let mut walk = Walk {
            segment_start: 0,
            copy_started: None,
            now: Instant::now(),
        };
        if self.fail
            && let Some(through) = self.link.flush_requested.take()
        {
            self.stream_now(through, out);
        }
        // One framing walk, wire's: the caller split off complete frames, so it covers them
        // all, and no length can slice past a frame.
        let mut at = 0usize;
        let walked = wire::complete_prefix(frames, usize::MAX, |tag, body| {
            let end = at + wire::HEADER_BYTES + body.len();
            if let Some(tracker) = primary.as_deref_mut() {
                tracker.server(tag, body);
            }
            if tag == tag::ERROR_RESPONSE {
                fed.errors += 1;
            }
            fed.syncs += u64::from(self.visit(side, frames, (tag, body), at..end, &mut walk, out));
            at = end;
        });
        crate::invariant!(
            walked.is_ok_and(|n| n == frames.len()),
            "compare is fed complete frames only"
        );
        let Walk {
            segment_start,
            copy_started,
            ..
        } = walk;
        if let Some(seq) = copy_started {
            self.stream_now(seq, out);
        }
        if side == self.source && segment_start < frames.len() {
            let internal = side == SHADOW && self.link.own_next();
            if !internal {
                self.emit(frames.slice(segment_start..), false, out);
            }
        }
        if self.fail && self.pending.len() > self.target.cfg.buffer_bytes_max {
            // Too big to hold: stream it, judge it afterwards, and say so (to the client in a
            // NOTICE, which the protocol allows anywhere, and in the report).
            self.stream_through = Some(self.source_seq);
            self.pending_base += self.pending.len();
            let mut notice = BytesMut::new();
            let _ = wire::encode::notice_response(
                &mut notice,
                &wire::ErrorSpec::new(
                    "WARNING",
                    "01000",
                    "pgprism: result larger than compare.buffer-bytes-max; streamed without waiting for the shadow, differences are only reported",
                ),
            );
            out.push(notice.freeze());
            out.push(self.pending.split().freeze());
            self.pending_ends.clear();
        }
        fed
    }

    /// One frame of [`feed`](Self::feed) at `range` of `frames`: digests it, and cuts what
    /// the client gets. Returns whether it ended a sync point.
    fn visit(
        &mut self,
        side: usize,
        frames: &Bytes,
        (tag, body): (u8, &[u8]),
        range: std::ops::Range<usize>,
        walk: &mut Walk,
        out: &mut Vec<Bytes>,
    ) -> bool {
        let (at, end) = (range.start, range.end);
        if self.fail && side == self.source {
            match tag {
                // Asynchronous: a notification is not part of any result, and one that
                // arrives while the session is idle would otherwise wait for the next
                // statement's answer.
                tag::NOTIFICATION_RESPONSE => {
                    // What precedes it may be the answer to pgprism's own ROLLBACK (the
                    // shadow as source): that is never the client's.
                    let internal = side == SHADOW && self.link.own_next();
                    if !internal {
                        self.emit(frames.slice(walk.segment_start..at), false, out);
                    }
                    out.push(frames.slice(at..end));
                    walk.segment_start = end;
                }
                // The client answers CopyIn/CopyBoth with data before the sync point can
                // end: it cannot be held.
                tag::COPY_IN_RESPONSE | tag::COPY_BOTH_RESPONSE => {
                    walk.copy_started = Some(self.source_seq);
                }
                _ => {}
            }
        }
        if tag == tag::DATA_ROW && self.digesters[side].keys_pending() {
            let keys = self.order_keys_for(side);
            self.digesters[side].set_order_keys(keys);
        }
        let status = match self.digesters[side].visit(tag, body) {
            Step::SyncEnd(status) => status,
            Step::Nothing => return false,
            Step::Own => {
                // pgprism's own Describe's answer: cut out of what the client gets.
                if side == self.source {
                    let internal = side == SHADOW && self.link.own_next();
                    if !internal {
                        self.emit(frames.slice(walk.segment_start..at), false, out);
                    }
                    walk.segment_start = end;
                }
                return false;
            }
        };
        let mut digest = self.digesters[side].finish_sync(status, walk.now);
        let kind = if side == SHADOW {
            let kind = self.link.shadow_kinds.borrow_mut().pop_front();
            self.link.check_cancel();
            kind
        } else {
            self.primary_completed(status, &digest);
            None
        };
        let internal = kind == Some(ShadowSync::Own);
        if let Some(ShadowSync::Client(Some(c), seq)) = kind {
            if let Some(why) = self.keep_to_place(c, seq, &digest) {
                digest.overtaken = Some(why);
                digest.placing = Some(c);
            } else if let Pinned::Overtaken(why) = self.shadow_completed(c) {
                digest.overtaken = Some(why);
            }
        }
        if !internal {
            self.done[side].push_back(digest);
        }
        if side == self.source {
            let segment = frames.slice(walk.segment_start..end);
            walk.segment_start = end;
            if !internal {
                self.emit(segment, true, out);
            }
        }
        true
    }

    /// The primary answered the next sync point (ending with transaction status `status`):
    /// it takes its place in the completion order, and its frames may go to the shadow in
    /// their turn. What a transaction writes becomes visible to others when it ends, so the
    /// sync point that ends it carries everything it wrote.
    fn primary_completed(&mut self, status: u8, digest: &SyncDigest) {
        let Some(port) = &self.target.port else {
            return;
        };
        let stamp_ns = self.primary_stamp_ns;
        let mut metas = self.link.metas.borrow_mut();
        let index = self.done[PRIMARY].len();
        let Some(meta) = metas.get_mut(index) else {
            return;
        };
        let seq = self.settled + index as u64;
        let mut footprint = meta.footprint.clone();
        let mut locks = super::order::Locks::default();
        {
            let mut written = self.link.written.borrow_mut();
            locks.shadow = !written.is_empty();
            locks.primary.clone_from(&written);
            // The client waits for the shadow's answer (fail-on-differences, or the shadow
            // is the source) to end its transaction (see order::Locks).
            if (self.fail || self.source == SHADOW) && status != b'I' && footprint.write {
                locks.primary.join(&footprint);
            }
            if status == b'I' {
                let ended = std::mem::take(&mut *written);
                footprint.ends = !ended.is_empty();
                footprint.join(&ended);
            } else if footprint.write {
                written.join(&footprint);
            }
        }
        footprint.join(&meta.start.0);
        let session = self.link.order_session;
        let shard = port.shard();
        // Counted in flight unless the session's end already took it back. (Its start is
        // read nowhere after this answer: set in place rather than copied.)
        let start = &mut meta.start;
        start.1.counted = port.ledger.answered_in_flight(
            session,
            &mut self.link.in_flight.borrow_mut(),
            seq,
            shard,
        );
        if self.link.dead.get() {
            port.ledger
                .answered(session, &footprint, (start, stamp_ns), shard);
        } else if meta.ordered {
            let c = (!footprint.is_empty()).then(|| {
                port.ledger
                    .complete(session, footprint, (start, stamp_ns), locks, shard)
            });
            // The order-gap measurement (tests/compare_concurrent.rs, `hot_row_order_gap`):
            // the number given, when the answer reached the socket and when pgprism read it,
            // and the answer's first row.
            tracing::trace!(
                c = c.unwrap_or(0),
                stamp_ns,
                since_ns = start.1.since,
                seen_ns = unix_ns(),
                shard = port.shard(),
                session,
                statement = ?meta.statements.first().map(|s| &*s.text),
                row = ?digest
                    .results
                    .first()
                    .and_then(|r| r.sample.first())
                    .map(|s| s.1.as_str()),
                "compare order: primary completion"
            );
            if let Some(c) = c {
                self.link.issued.borrow_mut().push(c);
            }
            meta.number = c;
            self.link.tickets.borrow_mut().push_back((seq, c));
            // The writer may wait for this ticket (`ShadowWriter::clear`). This runs in the
            // pump's poll, and the writer is the part after it in the session's
            // `exec::join3`: the wake is noted, not queued, and the writer polled in the
            // same pass (no second poll of the session).
            if let Some(w) = self.link.writer_waker.take() {
                w.wake();
            }
        } else if !meta.shadow {
            port.ledger
                .primary_only(session, &footprint, (start, stamp_ns), shard);
        } else {
            port.ledger
                .answered(session, &footprint, (start, stamp_ns), shard);
        }
        drop(metas);
        // Releases of this shard's own sync points the answer freed.
        port.drain();
    }

    /// The kernel's receive time of the primary's bytes being fed (ns since the Unix epoch;
    /// 0: not stamped).
    pub fn set_primary_received(&mut self, ns: u64) {
        self.primary_stamp_ns = ns;
    }

    /// The shadow answered ordered read `c` (client sync point `seq`) with `shadow`: when it
    /// differs from the primary's answer, may be read again, and overlapped writes of its
    /// rows on the primary, it stays pending in the ledger to be placed (see
    /// `compare::place`), and why it was unpinned is returned. (Until its placement starts
    /// it stays among the session's issued numbers: a session that ends first abandons it.)
    fn keep_to_place(&mut self, c: u64, seq: u64, shadow: &SyncDigest) -> Option<Unpinned> {
        let port = self.target.port.as_ref()?;
        let cfg = &self.target.cfg;
        if cfg.place_reads_max == 0 || shadow.status != b'I' {
            return None;
        }
        // `seq` is the session tracker's number; the pairing's are offset (see `plan`).
        let local = seq.checked_sub(self.link.numbering.get())?;
        let index = usize::try_from(local.checked_sub(self.settled)?).ok()?;
        let primary = self.done[PRIMARY].get(index)?;
        let metas = self.link.metas.borrow();
        let meta = metas.get(index).filter(|m| m.number == Some(c))?;
        let ([statement], [p], [s]) = (
            &meta.statements[..],
            &primary.results[..],
            &shadow.results[..],
        ) else {
            return None;
        };
        // A plain autocommit SELECT of the simple protocol, text results, that the
        // re-read runs as it ran: nothing it calls may do anything but return a value.
        if primary.status != b'I'
            || !statement.read_only
            || statement.params
            || statement.excluded
            || statement.primary_only
            || statement.copy
            || statement.transaction
            || statement.text.is_empty()
            || statement.scan.nondeterministic.is_some()
            || p.error.is_some()
            || p.binary
            || s.binary
        {
            return None;
        }
        // Only values can tell a place (the judge looks at the differences themselves; a
        // read kept for nothing is ended there): rows that hash alike need no place, and
        // this costs the reads that agree three comparisons.
        let values = p.rows != s.rows
            || p.unordered != s.unordered
            || (statement.ordered && p.ordered != s.ordered);
        if !values || !super::recheck::calls_only_safe_functions(&statement.text) {
            return None;
        }
        // (The re-check slot is taken when the placement starts, in `place`.)
        if self.target.stats.rechecks_running.get() >= cfg.order_rechecks_max {
            return None;
        }
        port.ledger.keep(c)
    }

    /// A read kept to be placed (`c`) whose placement never started (its sync point was
    /// not judged, or not as differing): it completes now, and its slot is free. Why it
    /// was unpinned, as the ledger says at its release (while it was kept, a wait that ran
    /// out or a lock break may have overtaken it, or a primary-only write come).
    fn unkeep(&self, c: u64) -> Pinned {
        let Some(port) = &self.target.port else {
            return Pinned::InOrder;
        };
        self.link.issued.borrow_mut().retain(|&i| i != c);
        let pinned = port.ledger.done(c, port.shard());
        port.drain();
        pinned
    }

    /// The shadow answered ordered sync point `c`: whoever waited for it may go.
    fn shadow_completed(&mut self, c: u64) -> Pinned {
        let Some(port) = &self.target.port else {
            return Pinned::InOrder;
        };
        self.link.issued.borrow_mut().retain(|&i| i != c);
        let pinned = port.ledger.done(c, port.shard());
        port.drain();
        pinned
    }

    /// The ORDER BY keys of the statement whose result `side` is reading: its sync point is
    /// the first that side has not finished (the shadow skips those it never got), and its
    /// statement the one at the index of the result, as `judge` pairs them.
    fn order_keys_for(&self, side: usize) -> Option<Rc<[sql::OrderKey]>> {
        let metas = self.link.metas.borrow();
        let ahead = self.done[side].len();
        let meta = if side == SHADOW {
            metas.iter().filter(|m| m.shadow).nth(ahead)
        } else {
            metas.get(ahead)
        }?;
        let index = self.digesters[side].results_len();
        let statement = meta.statements.get(index).or(meta.statements.last())?;
        if statement.ordered {
            statement.order_keys.clone()
        } else {
            None
        }
    }

    /// Stops holding source bytes up to sync point `through` (fail-on-differences): what is
    /// held goes out now, those sync points are judged afterwards (reported as fallbacks).
    fn stream_now(&mut self, through: u64, out: &mut Vec<Bytes>) {
        self.stream_through = Some(self.stream_through.map_or(through, |t| t.max(through)));
        // Held sync points up to `through` go; later ones that already ended stay held.
        let mut end = None;
        while let Some(&(seq, ends_at)) = self.pending_ends.front() {
            if seq > through {
                break;
            }
            end = Some(ends_at);
            self.pending_ends.pop_front();
        }
        let n = if self.pending_ends.is_empty() && self.source_seq <= through {
            // The open sync point is covered too: everything held goes.
            self.pending.len()
        } else {
            end.map_or(0, |e| e - self.pending_base)
        };
        if n > 0 {
            self.pending_base += n;
            out.push(self.pending.split_to(n).freeze());
        }
    }

    /// Source bytes of the current client sync point; `ends`: they finish it.
    fn emit(&mut self, segment: Bytes, ends: bool, out: &mut Vec<Bytes>) {
        let seq = self.source_seq;
        if ends {
            self.source_seq += 1;
        }
        let streams = !self.fail || self.stream_through.is_some_and(|t| seq <= t);
        if streams {
            if !segment.is_empty() {
                out.push(segment);
            }
            return;
        }
        self.pending.extend_from_slice(&segment);
        if ends {
            self.pending_ends
                .push_back((seq, self.pending_base + self.pending.len()));
        }
    }

    /// Since when the oldest sync point the primary has answered waits for the shadow, and
    /// how many such sync points there are (None: nothing waits for the shadow).
    pub fn shadow_wait(&self) -> Option<(Instant, usize)> {
        if !self.shadow_alive {
            return None;
        }
        let since = self.done[PRIMARY].front()?.finished?;
        // After `settle`, an answered sync point is still here only when it needs the shadow.
        Some((since, self.done[PRIMARY].len()))
    }

    /// The shadow is gone: stop comparing and release whatever waits for it.
    pub fn shadow_lost(&mut self, out: &mut Vec<Bytes>) {
        self.shadow_alive = false;
        self.link.stop();
        self.done[SHADOW].clear();
        self.link.expects[SHADOW].borrow_mut().clear();
        if !self.pending.is_empty() {
            self.pending_base += self.pending.len();
            out.push(self.pending.split().freeze());
        }
        self.pending_ends.clear();
        self.stream_through = Some(u64::MAX);
    }

    /// Pairs and judges every sync point both sides have finished; releases (or replaces)
    /// held bytes into `out`.
    pub fn settle(&mut self, stats: &ShardStats, out: &mut Vec<Bytes>) {
        ShardStats::bump(
            &stats.counters.compare_order_waits_expired,
            self.link.order_expired.take(),
        );
        ShardStats::bump(
            &stats.counters.compare_order_lock_breaks,
            self.link.order_lock_breaks.take(),
        );
        loop {
            let need_shadow = match self.link.metas.borrow().front() {
                None => return,
                Some(meta) => meta.shadow && self.shadow_alive,
            };
            if self.done[PRIMARY].is_empty() || (need_shadow && self.done[SHADOW].is_empty()) {
                return;
            }
            let Some(meta) = self.link.metas.borrow_mut().pop_front() else {
                return;
            };
            let (Some(primary), mut shadow) = (
                self.done[PRIMARY].pop_front(),
                if need_shadow {
                    self.done[SHADOW].pop_front()
                } else {
                    None
                },
            ) else {
                return;
            };
            let seq = self.settled;
            self.settled += 1;
            crate::invariant!(
                self.settled + self.link.metas.borrow().len() as u64 == self.link.planned.get(),
                "every planned sync point is settled once, in order"
            );
            let fallback = self.stream_through.is_some_and(|t| seq <= t);
            let mut failure: Option<(String, String)> = None;
            let mut placing = shadow.as_mut().and_then(|s| s.placing.take());
            match &shadow {
                Some(shadow) if !self.diverged && !meta.withheld => {
                    failure = self.judge(&meta, &primary, shadow, stats, (fallback, &mut placing));
                }
                _ => {
                    let c = &stats.counters;
                    let reason = if meta.withheld {
                        &c.compare_skipped_withheld
                    } else if meta.routed {
                        &c.compare_skipped_routed
                    } else if shadow.is_none() {
                        &c.compare_skipped_shadow_gone
                    } else {
                        &c.compare_skipped_diverged
                    };
                    let n = meta.statements.len().max(1) as u64;
                    ShardStats::bump(&c.compare_skipped, n);
                    ShardStats::bump(reason, n);
                }
            }
            if let Some(c) = placing {
                let _ = self.unkeep(c);
            }
            if let Some(shadow) = &shadow {
                self.track_status(primary.status, shadow.status, stats);
            }
            if self.link.gate.get() == Some(seq) {
                // Settled (and mended, if it diverged): what waited behind it may go.
                self.link.gate.set(None);
                if let Some(w) = self.link.writer_waker.take() {
                    w.wake();
                }
            }
            if primary.status == b'I' {
                self.transaction += 1;
            }
            if self.fail {
                let status = if self.source == SHADOW {
                    shadow.as_ref().map(|s| s.status).unwrap_or(primary.status)
                } else {
                    primary.status
                };
                self.release(seq, failure, status, out);
            }
            self.digesters[PRIMARY].recycle(primary.results);
            if let Some(shadow) = shadow {
                self.digesters[SHADOW].recycle(shadow.results);
            }
        }
    }

    fn release(
        &mut self,
        seq: u64,
        failure: Option<(String, String)>,
        status: u8,
        out: &mut Vec<Bytes>,
    ) {
        let Some(&(held_seq, end)) = self.pending_ends.front() else {
            return;
        };
        if held_seq != seq {
            return;
        }
        self.pending_ends.pop_front();
        crate::invariant!(
            end >= self.pending_base && end - self.pending_base <= self.pending.len(),
            "a sync point's held answer lies within the bytes held"
        );
        let n = end - self.pending_base;
        let chunk = self.pending.split_to(n).freeze();
        self.pending_base = end;
        match failure {
            None => out.push(chunk),
            Some((message, detail)) => {
                let mut buf = BytesMut::new();
                let message = format!("Query results differ between primary and shadow: {message}")
                    .replace('\0', " ");
                let detail = detail.replace('\0', " ");
                let mut spec =
                    wire::ErrorSpec::new("ERROR", wire::sqlstate::INTERNAL_ERROR, &message);
                spec.detail = Some(&detail);
                let _ = wire::encode::error_response(&mut buf, &spec);
                let status = wire::TransactionStatus::from_byte(status)
                    .unwrap_or(wire::TransactionStatus::Idle);
                wire::encode::ready_for_query(&mut buf, status);
                out.push(buf.freeze());
            }
        }
    }

    /// Divergence: when one side's transaction failed and the other's did not, later
    /// statements of that transaction are not compared; when the primary's transaction is
    /// over and the shadow's is not, the shadow is rolled back.
    fn track_status(&mut self, primary: u8, shadow: u8, stats: &ShardStats) {
        if self.diverged {
            if primary == b'I' && shadow == b'I' {
                self.diverged = false;
            }
        } else if primary != shadow {
            self.diverged = true;
        }
        if primary == b'I' && shadow != b'I' {
            self.link.rollback_due.set(true);
            self.diverged = false;
            ShardStats::bump(&stats.counters.compare_rollbacks, 1);
        } else if primary != b'I' && shadow == b'I' {
            // The primary opened a transaction block the shadow did not (its BEGIN failed, or
            // a statement before it in the same query): open one there too, so the statements
            // that follow are undone with the primary's. Still diverged until both are idle.
            self.link.begin_due.set(true);
            ShardStats::bump(&stats.counters.compare_begins, 1);
        }
    }

    /// Compares one sync point; reports what differs. Returns the client-facing failure
    /// (message, detail) when the verdict must fail the statement.
    fn judge(
        &mut self,
        meta: &SyncMeta,
        primary: &SyncDigest,
        shadow: &SyncDigest,
        stats: &ShardStats,
        (fallback, placing): (bool, &mut Option<u64>),
    ) -> Option<(String, String)> {
        let cfg = &self.target.cfg;
        let elapsed = |d: &SyncDigest| {
            d.finished
                .map(|f| f.saturating_duration_since(meta.read_at).as_micros() as u64)
                .unwrap_or(0)
        };
        let (primary_us, shadow_us) = (elapsed(primary), elapsed(shadow));
        if let (Some(p), Some(s)) = (primary.finished, shadow.finished) {
            stats.record(&stats.shadow_lag_us, s.saturating_duration_since(p));
        }
        let slow = shadow_us >= cfg.slow_query_min_ms * 1000
            && shadow_us as f64 > cfg.slow_query_ratio * primary_us.max(1) as f64;
        let mut failure = None;
        let pairs = primary.results.len().max(shadow.results.len());
        // Made only for a sync point of no known statement: built for every one, it was
        // two allocations and their release per compared sync point (callgrind).
        let mut unknown: Option<Rc<Compared>> = None;
        let mut compared = 0u64;
        // Why a kept read released unplaced was unpinned, as the ledger said then.
        let mut released = None;
        for i in 0..pairs {
            let statement = match meta.statements.get(i).or(meta.statements.last()) {
                Some(statement) => statement.clone(),
                None => unknown
                    .get_or_insert_with(|| Rc::new(Compared::unknown()))
                    .clone(),
            };
            if statement.excluded {
                ShardStats::bump(&stats.counters.compare_skipped, 1);
                ShardStats::bump(&stats.counters.compare_skipped_excluded, 1);
                continue;
            }
            let (p, s) = (primary.results.get(i), shadow.results.get(i));
            let mut differences = match (p, s) {
                (Some(p), Some(s)) => verdict::compare(p, s, statement.ordered, &self.target.rules),
                _ => {
                    // A multi-statement query stopped earlier on one side: the error that
                    // stopped it was reported with its own statement.
                    let stopped = primary
                        .results
                        .iter()
                        .chain(&shadow.results)
                        .any(|d| d.error.is_some());
                    if stopped {
                        break;
                    }
                    vec![Difference {
                        kind: Kind::Results,
                        text: format!(
                            "result count differs: primary {}, shadow {}",
                            primary.results.len(),
                            shadow.results.len()
                        ),
                    }]
                }
            };
            compared += 1;
            if cfg.calibrate {
                self.target.calibrated(
                    &statement.text,
                    differences.iter().any(|d| d.kind != Kind::Slow),
                );
            }
            if slow && cfg.fail_on_slow_queries && pairs == 1 {
                differences.push(Difference {
                    kind: Kind::Slow,
                    text: format!(
                        "shadow took {shadow_us} us, primary {primary_us} us (ratio above {})",
                        cfg.slow_query_ratio
                    ),
                });
            }
            if differences.is_empty() {
                continue;
            }
            let times = (primary_us, shadow_us, primary.status);
            let mut unpinned = released.or(shadow.overtaken).or(primary.overtaken);
            // A read that overlapped writes of its rows: placed by re-reads, judged then.
            if let (Some(p), Some(why)) = (p, unpinned)
                && placing.is_some()
                && !differences
                    .iter()
                    .any(|d| matches!(d.kind, Kind::Columns | Kind::ColumnTypes | Kind::Error))
                && let Some(c) = placing.take()
            {
                if self.place(&statement, &differences, (p, s), times, (c, why)) {
                    continue;
                }
                // No slot: judged as it stands, under the reason the ledger gives now.
                if let Pinned::Overtaken(why) = self.unkeep(c) {
                    released = Some(why);
                    unpinned = Some(why);
                }
            }
            let overtaken = unpinned.is_some();
            // Rows in another order under an ORDER BY whose keys the digests never saw: ties
            // or not, only a re-check with the keys in the output can tell.
            let mut unsettled = None;
            if let (Some(p), Some(s)) = (p, s)
                && statement.scan.nondeterministic.is_none()
                && !overtaken
                && order_keys_unseen(&differences, p, s)
            {
                match self.recheck_order(&statement, &differences, (p, s), times) {
                    None => continue,
                    Some(why) => unsettled = Some(Verdict::Nondeterministic(why)),
                }
            }
            // A statement cancelled on one side only (the client's CancelRequest reaches the
            // primary) says nothing about the other side's engine.
            let cancelled = [p, s]
                .iter()
                .any(|d| d.and_then(|d| d.error_code()) == Some(wire::sqlstate::QUERY_CANCELED));
            let verdict = unsettled.unwrap_or_else(|| {
                Verdict::of(
                    &differences,
                    statement
                        .scan
                        .nondeterministic
                        .or(cancelled.then_some(super::verdict::CANCELLED)),
                    overtaken,
                )
            });
            let reported = self.report_mismatch(
                &statement,
                &differences,
                (p, s),
                times,
                stats,
                (fallback, verdict, unpinned),
            );
            if failure.is_none() && !fallback && verdict == Verdict::Mismatch {
                failure = Some(reported);
            }
        }
        ShardStats::bump(&stats.counters.compare_statements, compared);
        if let Some(why) = released.or(shadow.overtaken).or(primary.overtaken) {
            ShardStats::bump(&stats.counters.compare_unpinned, compared);
            ShardStats::bump(unpinned_counter(&stats.counters, why), compared);
        }
        if slow && meta.statements.len() == 1 {
            ShardStats::bump(&stats.counters.compare_slow, 1);
            self.explain_slow(
                &meta.statements[0],
                (primary, shadow),
                (primary_us, shadow_us),
                stats,
            );
        }
        if self.fail { failure } else { None }
    }

    /// Starts an order re-check of `statement` (see `recheck`); `None` when it started (its
    /// task reports what it finds), else why the difference stays unsettled.
    fn recheck_order(
        &self,
        statement: &Compared,
        differences: &[Difference],
        (p, s): (&Digest, &Digest),
        times: (u64, u64, u8),
    ) -> Option<&'static str> {
        let stats = &self.target.stats;
        let plan = (statement.read_only && !statement.params)
            .then(|| super::recheck::plan(&statement.text, p.columns.as_deref()?))
            .flatten();
        let Some(plan) = plan else {
            return Some(super::recheck::NOT_REWRITABLE);
        };
        if !super::recheck::calls_only_safe_functions(&statement.text) {
            return Some(super::recheck::CALLS_FUNCTIONS);
        }
        if stats.rechecks_running.get() >= self.target.cfg.order_rechecks_max {
            return Some(super::recheck::BUSY);
        }
        // The one cross-shard cost of a re-check: a slot of the process-wide bound.
        let total_max = self.target.cfg.order_rechecks_total_max;
        let slot = self.target.rechecks.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |running| (running < total_max).then_some(running + 1),
        );
        if slot.is_err() {
            return Some(super::recheck::BUSY_PROCESS);
        }
        stats.rechecks_running.set(stats.rechecks_running.get() + 1);
        let record = self.record(statement, differences, p, s, times, false);
        crate::exec::spawn(super::recheck::run(
            self.target.clone(),
            self.params.clone(),
            plan,
            [p.clone(), s.clone()],
            record,
        ));
        None
    }

    /// Starts placing read `c` (see `compare::place`), which reports it if no place
    /// reproduces the primary's answer; false when the re-checks' bounds leave no room.
    fn place(
        &self,
        statement: &Compared,
        differences: &[Difference],
        (p, s): (&Digest, Option<&Digest>),
        times: (u64, u64, u8),
        (c, why): (u64, Unpinned),
    ) -> bool {
        let Some(port) = self.target.port.clone() else {
            return false;
        };
        let (cfg, stats) = (&self.target.cfg, &self.target.stats);
        if stats.rechecks_running.get() >= cfg.order_rechecks_max {
            return false;
        }
        // A slot of the process-wide bound, as an order re-check takes.
        let total_max = cfg.order_rechecks_total_max;
        let slot = self.target.rechecks.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |running| (running < total_max).then_some(running + 1),
        );
        if slot.is_err() {
            return false;
        }
        stats.rechecks_running.set(stats.rechecks_running.get() + 1);
        // The placement owns it now: the session's end does not abandon it.
        self.link.issued.borrow_mut().retain(|&i| i != c);
        let empty = Digest::default();
        let record = self.record(statement, differences, p, s.unwrap_or(&empty), times, false);
        crate::exec::spawn(super::place::run(
            self.target.clone(),
            port,
            self.params.clone(),
            super::place::Read {
                c,
                text: statement.text.clone(),
                ordered: statement.ordered,
                primary: p.clone(),
                why,
            },
            record,
        ));
        true
    }

    /// Counts and reports one statement's differences; returns the description and detail
    /// a fail-on-differences client is told.
    fn report_mismatch(
        &self,
        statement: &Compared,
        differences: &[Difference],
        (p, s): (Option<&Digest>, Option<&Digest>),
        times: (u64, u64, u8),
        stats: &ShardStats,
        (fallback, verdict, unpinned): (bool, Verdict, Option<Unpinned>),
    ) -> (String, String) {
        let counter = match verdict {
            Verdict::Mismatch => &stats.counters.compare_mismatches,
            Verdict::Concurrent => &stats.counters.compare_inconclusive_concurrent,
            Verdict::Nondeterministic(_) => &stats.counters.compare_inconclusive_nondeterministic,
        };
        ShardStats::bump(counter, 1);
        let unpinned = unpinned.filter(|_| verdict == Verdict::Concurrent);
        if let Some(why) = unpinned {
            ShardStats::bump(inconclusive_counter(&stats.counters, why), 1);
        }
        if verdict == Verdict::Mismatch {
            for d in differences {
                let cell = &self.target.stats.kinds[d.kind.index()];
                cell.set(cell.get() + 1);
            }
        }
        let empty = Digest::default();
        let mut record = self.record(
            statement,
            differences,
            p.unwrap_or(&empty),
            s.unwrap_or(&empty),
            times,
            fallback,
        );
        record.record = verdict.record();
        record.verdict = verdict.name();
        if let Verdict::Nondeterministic(why) = verdict {
            record.reason = why;
        }
        // Which ordering rule left it unpinned (order.rs `Unpinned`).
        if let Some(why) = unpinned {
            record.reason = why.name();
        }
        if verdict != Verdict::Mismatch {
            record.failed_client = false;
        }
        let reported = (record.description.clone(), detail(&record));
        if fallback && verdict == Verdict::Mismatch {
            ShardStats::bump(&stats.counters.compare_fallbacks, 1);
        }
        if !self.target.send(record) {
            ShardStats::bump(&stats.counters.compare_reports_dropped, 1);
        }
        reported
    }

    /// A statement much slower on the shadow: both plans are fetched (EXPLAIN ANALYZE, off the
    /// session) when it only reads, can be re-run, and the budget allows.
    fn explain_slow(
        &self,
        statement: &Compared,
        (primary, shadow): (&SyncDigest, &SyncDigest),
        (primary_us, shadow_us): (u64, u64),
        stats: &ShardStats,
    ) {
        let cfg = &self.target.cfg;
        if !(cfg.explain_slow_queries
            && statement.read_only
            && !statement.params
            && !statement.excluded
            && self.target.explains_left.get() > 0)
        {
            return;
        }
        self.target
            .explains_left
            .set(self.target.explains_left.get() - 1);
        ShardStats::bump(&stats.counters.compare_explains, 1);
        let mut record = self.record(
            statement,
            &[Difference {
                kind: Kind::Slow,
                text: format!(
                    "shadow slower than primary: {shadow_us} us vs {primary_us} us (ratio {:.1}, limit {})",
                    shadow_us as f64 / primary_us.max(1) as f64,
                    cfg.slow_query_ratio
                ),
            }],
            primary.results.first().unwrap_or(&Digest::default()),
            shadow.results.first().unwrap_or(&Digest::default()),
            (primary_us, shadow_us, primary.status),
            false,
        );
        record.record = "slow";
        record.verdict = "";
        crate::exec::spawn(super::explain::run(
            self.target.clone(),
            self.params.clone(),
            statement.text.to_string(),
            record,
        ));
    }

    fn record(
        &self,
        statement: &Compared,
        differences: &[Difference],
        p: &Digest,
        s: &Digest,
        (primary_us, shadow_us, status): (u64, u64, u8),
        fallback: bool,
    ) -> Record {
        let cfg = &self.target.cfg;
        let (fingerprint, fingerprint_text) =
            sql::fingerprint(statement.text.as_bytes(), cfg.statement_bytes_max);
        let mut text = statement.text.to_string();
        if text.len() > cfg.statement_bytes_max {
            let mut cut = cfg.statement_bytes_max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let (only_p, only_s) = verdict::sample_difference(p, s);
        let side = |d: &Digest, only: Vec<String>| Side {
            tag: d.tag.clone(),
            rows: d.rows,
            columns: d
                .columns
                .as_ref()
                .map(|c| c.iter().map(|(n, t)| (n.clone(), type_name(*t))).collect())
                .unwrap_or_default(),
            error: d.error_code().map(str::to_string),
            message: d.message.clone(),
            sample: if only.is_empty() {
                d.sample.iter().map(|(_, r)| r.clone()).collect()
            } else {
                only
            },
            plan: None,
        };
        let description = differences
            .iter()
            .map(|d| d.text.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Record {
            record: "mismatch",
            verdict: "mismatch",
            reason: "",
            kinds: differences.iter().map(|d| d.kind.name()).collect(),
            description,
            statement: text,
            fingerprint,
            fingerprint_text,
            primary: side(p, only_p),
            shadow: side(s, only_s),
            primary_us,
            shadow_us,
            shard: self.target.shard,
            session: self.session,
            transaction: self.transaction,
            in_transaction: status != b'I',
            fallback,
            failed_client: self.fail && !fallback,
            unix_ms: super::unix_ms(),
        }
    }
}

/// Whether the only difference is the rows' order under an ORDER BY whose keys the digests
/// could not follow (not all output columns): ties and a real order difference look alike.
fn order_keys_unseen(differences: &[Difference], p: &Digest, s: &Digest) -> bool {
    matches!(differences, [d] if d.kind == Kind::Order)
        && (p.ordered_keys.is_none() || s.ordered_keys.is_none())
}

/// The counter of compared statements left unpinned for `why`.
fn unpinned_counter(counters: &ShardCounters, why: Unpinned) -> &Cell<u64> {
    match why {
        Unpinned::Overlapped => &counters.compare_unpinned_overlapped,
        Unpinned::InFlight => &counters.compare_unpinned_in_flight,
        Unpinned::WaitExpired => &counters.compare_unpinned_wait_expired,
        Unpinned::LockBreak => &counters.compare_unpinned_lock_break,
        Unpinned::PrimaryOnly => &counters.compare_unpinned_primary_only,
        Unpinned::Abandoned => &counters.compare_unpinned_abandoned,
    }
}

/// The counter of inconclusive (concurrent) statements left unpinned for `why`.
fn inconclusive_counter(counters: &ShardCounters, why: Unpinned) -> &Cell<u64> {
    match why {
        Unpinned::Overlapped => &counters.compare_inconclusive_overlapped,
        Unpinned::InFlight => &counters.compare_inconclusive_in_flight,
        Unpinned::WaitExpired => &counters.compare_inconclusive_wait_expired,
        Unpinned::LockBreak => &counters.compare_inconclusive_lock_break,
        Unpinned::PrimaryOnly => &counters.compare_inconclusive_primary_only,
        Unpinned::Abandoned => &counters.compare_inconclusive_abandoned,
    }
}

/// The DETAIL of the client's XX000 error: the statement and both sides' verdicts.
fn detail(record: &Record) -> String {
    let side = |s: &Side| {
        let mut text = match &s.error {
            Some(code) => format!("error {code}"),
            None => format!("`{}`, {} rows", s.tag, s.rows),
        };
        if !s.columns.is_empty() {
            let cols: Vec<String> = s.columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
            text.push_str(&format!(", columns ({})", cols.join(", ")));
        }
        if !s.sample.is_empty() {
            text.push_str(&format!(", rows {}", s.sample.join(" ")));
        }
        text
    };
    format!(
        "statement: {}\nprimary: {}\nshadow: {}",
        record.statement,
        side(&record.primary),
        side(&record.shadow)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_transaction_statements_may_leave_the_sides_apart_alone() {
        for (text, options) in [
            ("BEGIN", false),
            ("begin work;", false),
            ("START TRANSACTION", false),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE", true),
            ("START TRANSACTION READ ONLY", true),
            ("COMMIT", false),
            ("END", false),
            ("ROLLBACK", false),
            ("COMMIT AND CHAIN", true),
            ("ROLLBACK AND CHAIN", true),
            ("ROLLBACK TO SAVEPOINT a", false),
            ("SELECT 1", false),
        ] {
            let kind = sql::transaction(text.as_bytes());
            assert_eq!(
                kind.is_some_and(|k| with_options(text, k)),
                options,
                "{text}"
            );
        }
    }
}
