//! Atomic flush cycles: the loader's side of the Stream Load transaction interface
//! (`/api/transaction/begin`, `load`, `prepare`, `commit`, `rollback`).
//!
//! A flush cycle (the loads up to the next checkpoint marker, which only ever follows a
//! source commit) is one StarRocks transaction with `multi-table` (StarRocks 4.0 takes several
//! tables of one database in one transaction), or one per table with `per-table`. It begins at
//! the cycle's first load under that load's label, which is derived from the LSN range: a
//! replay after a crash cuts the same cycle and finds the same label. It is prepared and
//! committed before the checkpoint is written, so a source transaction becomes visible in
//! StarRocks whole or not at all, and the checkpoint never names rows StarRocks lacks.
//!
//! A label found already in use tells what an earlier run left: committed (skip the cycle's
//! loads), prepared (skip them, commit at the cycle's end), still open (roll it back, begin
//! again) or aborted (begin again). A commit whose answer is an error or is lost may still
//! have happened (an FE restart between commit and answer): the label's state decides.
//!
//! A table's column list may change inside a cycle (a schema change between its rows): whole
//! rows then take the last list of the cycle from the first load, learned by loading the
//! cycle again ([`ColumnPlans`]). Partial changes are made whole rows before they load
//! (`fill`); only those that cannot be still cut a cycle in two.
//!
//! This module must never retry a load inside a transaction: a load whose answer was lost may
//! have been applied, and loading it twice would duplicate rows. Any such failure rolls the
//! transaction back and the cycle is loaded again from the checkpoint.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::failpoint;
use super::fill::{FillPlan, Filled, Publishing};
use super::pipeline::{Batch, BodyFormat, hashed_label_prefix, label_chars};
use super::starrocks::{LoadError, LoadOutcome, StarRocks, TxnReply};
use crate::config::CdcTransactionMode;

/// Where one StarRocks transaction of the current cycle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnState {
    /// Begun by this run: loads go into it.
    Loading,
    /// Prepared (by this run, or by an earlier run that then stopped): commit it.
    Prepared,
    /// Committed by an earlier run: nothing to send.
    Committed,
}

/// The Stream Load parameters a transaction takes once per table: `columns`, partial
/// update, body format.
type Params = (String, bool, BodyFormat);

struct Txn {
    label: String,
    /// Stream Load parameters (`columns`, partial update, format) per table: a transaction takes one
    /// set per table, StarRocks plans the table's loads with the first one's.
    params: HashMap<String, Params>,
    state: TxnState,
}

/// What a flush cycle loaded again from the checkpoint must do differently: the `columns`
/// header each table's whole-row loads take from the first one, because its columns change
/// inside the cycle. It outlives the run that learned it (the cycle is loaded again by the
/// next one) and is forgotten once a cycle commits.
///
/// Why: a StarRocks transaction takes one set of load parameters per table (StarRocks plans
/// every load of a table in a transaction with the first one's), and a table's columns can
/// change in the middle of a source transaction (`ALTER TABLE t ADD COLUMN` and then rows of
/// `t`, beside rows of other tables). The loads of `t` before the change carry the old
/// header. Loaded again with the header after the change, the same JSON rows give StarRocks'
/// default to a column added since (what StarRocks gives every row it had before the
/// `ALTER`) and drop the key of a column dropped since, so the whole source transaction
/// stays one StarRocks transaction.
#[derive(Debug, Default)]
pub struct ColumnPlans {
    /// Transaction label → table → the header of its whole-row loads.
    by_label: HashMap<String, HashMap<String, String>>,
    /// Cycles loaded again for a header since the last commit: bounded, in case a cycle's
    /// first label differs from one attempt to the next (an initial-snapshot chunk is read
    /// again under a new label) and never meets its plan.
    replans: u32,
}

impl ColumnPlans {
    fn header(&self, label: &str, table: &str) -> Option<&String> {
        self.by_label.get(label).and_then(|t| t.get(table))
    }

    fn learn(&mut self, label: &str, table: &str, columns: &str) {
        self.by_label
            .entry(label.to_string())
            .or_default()
            .insert(table.to_string(), columns.to_string());
    }
}

/// The open StarRocks transactions of the current flush cycle.
pub struct Transactions {
    mode: CdcTransactionMode,
    /// Scope (`""` for `multi-table`, the table for `per-table`) → its transaction.
    open: BTreeMap<String, Txn>,
    /// Cycles cut in two because one table needed a second parameter set.
    pub splits: u64,
    /// Rows whose left-out values were read from StarRocks before they loaded (see `fill`).
    pub filled: Filled,
    /// Transactions committed whose publish had not finished (`publish timeout`): their
    /// rows are not visible yet, so values are read from StarRocks only once they are.
    unpublished: Publishing,
    plans: ColumnPlans,
    /// The most times a cycle is loaded again for its column lists before it commits
    /// (`cdc.reconnect-attempts-max`); beyond, such a rollback is a failure.
    replans_max: u32,
}

impl Transactions {
    /// `None` for `transaction-mode = none` (plain Stream Load). `plans`: what the run before
    /// learned (see [`ColumnPlans`]).
    pub fn new(
        mode: CdcTransactionMode,
        plans: ColumnPlans,
        replans_max: u32,
        unpublished: Publishing,
    ) -> Option<Transactions> {
        (mode != CdcTransactionMode::None).then(|| Transactions {
            mode,
            open: BTreeMap::new(),
            splits: 0,
            filled: Filled::default(),
            unpublished,
            plans,
            replans_max,
        })
    }

    /// Whether a cycle loaded again for its column lists would be one time too many: a
    /// rollback for a schema change is then a failure like any other, bounded by
    /// `reconnect-attempts-max`.
    pub fn replans_exhausted(&self) -> bool {
        self.plans.replans > self.replans_max
    }

    /// The commits still publishing (stored with the checkpoint).
    pub fn publishing(&self) -> &Publishing {
        &self.unpublished
    }

    /// The commits still publishing, for the next run (see [`Publishing`]).
    pub fn take_publishing(&mut self) -> Publishing {
        std::mem::take(&mut self.unpublished)
    }

    /// The plans for the next run (see [`ColumnPlans`]).
    pub fn take_plans(&mut self) -> ColumnPlans {
        std::mem::take(&mut self.plans)
    }

    /// The label of the transaction `batch` goes into: the open one's (its first load's), or
    /// the batch's own when it begins one.
    fn label_of<'a>(&'a self, scope: &str, batch: &'a Batch) -> &'a str {
        self.open.get(scope).map_or(&batch.label, |t| &t.label)
    }

    /// The load parameters of `batch` in the transaction `label`: its own, or the header
    /// planned for its table's whole rows.
    fn params(&self, label: &str, batch: &Batch) -> Params {
        // A planned header names the columns of the stream's JSON rows; a CSV body's fields
        // are in its own header's order, so it keeps that.
        match self.plans.header(label, &batch.table) {
            Some(columns) if !batch.partial && batch.format == BodyFormat::Json => {
                (columns.clone(), false, BodyFormat::Json)
            }
            _ => (batch.columns.clone(), batch.partial, batch.format),
        }
    }

    fn scope(&self, table: &str) -> String {
        match self.mode {
            CdcTransactionMode::PerTable => table.to_string(),
            _ => String::new(),
        }
    }

    /// Adds `batch` to the cycle's transaction, beginning it when this is the first load.
    /// `fill`: values its rows need from StarRocks, read right before it loads (see `fill`;
    /// not at all when an earlier run loaded it).
    pub fn load(
        &mut self,
        sink: &mut StarRocks,
        batch: &Batch,
        fill: Option<&FillPlan>,
    ) -> Result<LoadOutcome, LoadError> {
        let scope = self.scope(&batch.table);
        let params = self.params(self.label_of(&scope, batch), batch);
        let before = self
            .open
            .get(&scope)
            .and_then(|t| t.params.get(&batch.table))
            .filter(|p| **p != params)
            .cloned();
        if let Some(before) = before {
            self.second_header(sink, &scope, batch, &before, &params)?;
        }
        // After a cut the transaction is a new one, under this load's label.
        let params = self.params(self.label_of(&scope, batch), batch);
        let planned;
        let batch = if params.0 == batch.columns {
            batch
        } else {
            planned = Batch {
                columns: params.0.clone(),
                ..batch.clone()
            };
            &planned
        };
        let txn = match self.open.entry(scope) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                // The first load's table goes with begin in either mode: StarRocks 4.0 then
                // takes loads into other tables of the database too, and older versions bind
                // the transaction to it.
                let state = begin(sink, &batch.label, &batch.table)?;
                if state == TxnState::Committed {
                    // Committed by an earlier run (a crash between commit and checkpoint),
                    // perhaps still publishing: later reads wait for it (one state check if
                    // it is visible).
                    self.unpublished.note(batch.label.clone());
                }
                e.insert(Txn {
                    label: batch.label.clone(),
                    params: HashMap::new(),
                    state,
                })
            }
        };
        txn.params.insert(batch.table.clone(), params);
        if txn.state != TxnState::Loading {
            return Ok(LoadOutcome::AlreadyLoaded);
        }
        let label = txn.label.clone();
        let filled;
        let batch = match fill {
            Some(plan) => match self
                .unpublished
                .wait(sink)
                .and_then(|()| super::fill::fill_batch(sink, batch, plan))
            {
                Ok((whole, counts)) => {
                    self.filled.rows_read += counts.rows_read;
                    self.filled.rows_missing += counts.rows_missing;
                    filled = whole;
                    &filled
                }
                Err(e) => {
                    // The cycle is loaded again from the checkpoint (never cut here: a
                    // replay that reads StarRocks fine would not cut).
                    self.abort_all(sink);
                    return Err(e);
                }
            },
            None => batch,
        };
        let reply = sink.txn_call("load", &label, Some(&batch.table), Some(batch));
        match reply {
            Ok(r) if r.status == "OK" || r.status == "Success" => Ok(LoadOutcome::Loaded),
            Ok(r) => {
                // Asked before the rollback below, which would abort it anyway.
                let timed_out = refused_as_gone(&r.message)
                    && sink.label_state(&label).as_deref() == Ok("ABORTED");
                self.abort_all(sink);
                if timed_out {
                    return Err(timed_out_error(sink, &label, &batch.table, &r));
                }
                Err(self.load_failure(sink, batch, &label, r))
            }
            Err(why) => {
                self.abort_all(sink);
                Err(LoadError::TxnAborted { label, why })
            }
        }
    }

    /// A second parameter set for one table in the transaction.
    ///
    /// Whole rows both times (the table's columns changed in the cycle): this run loads the
    /// transaction, so it is rolled back and the cycle loaded again from the checkpoint, this
    /// header planned for the table's loads from the first ([`ColumnPlans`]); beyond
    /// `reconnect-attempts-max` such attempts since the last commit, the rollback is a failure
    /// like any other. Whole rows are never cut into two StarRocks transactions, so a
    /// transaction an earlier run prepared or committed holds the whole cycle: its loads are
    /// skipped, the header noted.
    ///
    /// A partial update on either side (a TOAST value left out, a soft delete without the
    /// whole old row) cannot share a header with other rows (its header names the columns it
    /// carries): commit what the transaction holds and go on in a new one (the cut depends
    /// only on the stream, so a replay cuts at the same load), counted in `splits`. So does
    /// a second body format (an initial-snapshot chunk in CSV beside the stream's JSON rows
    /// of its table), which the pipeline never lets happen: each chunk's rows end a flush
    /// cycle of their own (`Pipeline::watermark`).
    fn second_header(
        &mut self,
        sink: &mut StarRocks,
        scope: &str,
        batch: &Batch,
        before: &Params,
        params: &Params,
    ) -> Result<(), LoadError> {
        let label = self
            .open
            .get(scope)
            .map_or_else(|| batch.label.clone(), |t| t.label.clone());
        let loading = self
            .open
            .get(scope)
            .is_some_and(|t| t.state == TxnState::Loading);
        if !before.1 && !params.1 && before.2 == params.2 {
            self.plans.learn(&label, &batch.table, &params.0);
            if !loading {
                return Ok(());
            }
            self.abort_all(sink);
            self.plans.replans += 1;
            if self.replans_exhausted() {
                return Err(LoadError::TxnAborted {
                    label,
                    why: format!(
                        "the column list of {} changed inside the flush cycle more often than \
                         cdc.reconnect-attempts-max allows loading it again",
                        batch.table
                    ),
                });
            }
            tracing::info!(table = %batch.table, %label, "the table's columns change inside the StarRocks transaction: loading it again with the new column list from its first load");
            return Err(LoadError::Replan {
                label,
                table: batch.table.clone(),
            });
        }
        self.splits += 1;
        tracing::warn!(table = %batch.table, label = %batch.label, "a second column list for one table ends the StarRocks transaction early");
        self.commit_scope(sink, scope)
    }

    /// The error for a load the transaction refused (it is rolled back already).
    fn load_failure(&self, sink: &StarRocks, batch: &Batch, label: &str, r: TxnReply) -> LoadError {
        if r.status == "AUTH" {
            return sink.auth_error(401);
        }
        if r.filtered_rows > 0 || r.message.contains("filtered") {
            return LoadError::Filtered {
                table: batch.table.clone(),
                label: label.to_string(),
                message: r.message,
                error_url: r.error_url,
            };
        }
        if self.mode == CdcTransactionMode::MultiTable && r.message.contains("multi-table") {
            return LoadError::MultiTableUnsupported {
                table: batch.table.clone(),
                message: r.message,
            };
        }
        LoadError::TxnAborted {
            label: label.to_string(),
            why: format!("load into {}: {} {}", batch.table, r.status, r.message),
        }
    }

    /// Prepares every open transaction of the cycle, then commits them; afterwards the
    /// checkpoint may name the cycle's end.
    pub fn commit_all(&mut self, sink: &mut StarRocks) -> Result<(), LoadError> {
        let scopes: Vec<String> = self.open.keys().cloned().collect();
        for scope in &scopes {
            self.prepare(sink, scope)?;
        }
        if !scopes.is_empty() {
            failpoint::hit("cdc-after-prepare");
        }
        for scope in &scopes {
            if let Some(txn) = self.open.remove(scope)
                && txn.state == TxnState::Prepared
                && !commit(sink, &txn.label, self.scope_table(scope))?
            {
                self.unpublished.note(txn.label);
            }
        }
        // The cycle is in StarRocks: nothing of it is loaded again.
        self.plans = ColumnPlans::default();
        self.unpublished.settle(sink)
    }

    /// Prepares and commits one scope's transaction (a cut inside a cycle).
    fn commit_scope(&mut self, sink: &mut StarRocks, scope: &str) -> Result<(), LoadError> {
        self.prepare(sink, scope)?;
        if let Some(txn) = self.open.remove(scope)
            && txn.state == TxnState::Prepared
            && !commit(sink, &txn.label, self.scope_table(scope))?
        {
            self.unpublished.note(txn.label);
        }
        self.unpublished.settle(sink)
    }

    fn scope_table<'a>(&self, scope: &'a str) -> Option<&'a str> {
        (self.mode == CdcTransactionMode::PerTable).then_some(scope)
    }

    fn prepare(&mut self, sink: &mut StarRocks, scope: &str) -> Result<(), LoadError> {
        let table = self.scope_table(scope).map(str::to_string);
        let Some(txn) = self.open.get_mut(scope) else {
            return Ok(());
        };
        if txn.state != TxnState::Loading {
            return Ok(());
        }
        let label = txn.label.clone();
        let why = match sink.txn_call("prepare", &label, table.as_deref(), None) {
            Ok(r) if r.status == "OK" => None,
            Ok(r) => Some(format!("prepare: {} {}", r.status, r.message)),
            Err(e) => Some(format!("prepare: {e}")),
        };
        if let Some(why) = why {
            // A prepare whose answer was lost may have happened.
            let state = sink.label_state(&label);
            if state.as_deref() != Ok("PREPARED") {
                self.abort_all(sink);
                let why = if state.as_deref() == Ok("ABORTED") {
                    format!("{why}; {}", aborted_note(sink))
                } else {
                    why
                };
                return Err(LoadError::TxnAborted { label, why });
            }
        }
        if let Some(txn) = self.open.get_mut(scope) {
            txn.state = TxnState::Prepared;
        }
        Ok(())
    }

    /// Before a schema change of `table` in StarRocks, which waits for the transactions
    /// begun before it that load the table (a schema change job's `WAITING_TXN`: the loads
    /// before its watershed transaction): commits what an earlier run prepared (as the
    /// cycle's end would), and rolls back what this run is loading if that has loaded
    /// `table` or may still load it, planning `columns` (the header after the change) for
    /// the table's whole-row loads when the cycle is loaded again from the checkpoint.
    /// (Committing it here instead would cut the StarRocks transaction at a place a replay,
    /// finding the schema change done, would not cut again.) Returns the label rolled back,
    /// if any.
    ///
    /// A `multi-table` transaction that has not loaded `table` yet may load it after the
    /// change, in this cycle. StarRocks documents neither that a transaction begun before a
    /// schema change's watershed may load the altered table once the change is done, nor
    /// against which schema such a load is planned (its Doris ancestor refuses it), so it is
    /// rolled back too and the cycle loaded again: after the change, every load of `table`
    /// is in a transaction begun after it. A `per-table` transaction of another table never
    /// loads `table` and stays open.
    pub fn settle_for_ddl(
        &mut self,
        sink: &mut StarRocks,
        table: &str,
        columns: &str,
    ) -> Result<Option<String>, LoadError> {
        let scopes: Vec<String> = self.open.keys().cloned().collect();
        for scope in &scopes {
            let table = self.scope_table(scope).map(str::to_string);
            if let Some(txn) = self.open.get_mut(scope)
                && txn.state == TxnState::Prepared
            {
                if !commit(sink, &txn.label, table.as_deref())? {
                    self.unpublished.note(txn.label.clone());
                }
                txn.state = TxnState::Committed;
            }
        }
        self.unpublished.settle(sink)?;
        let mut blocking = Vec::new();
        for (scope, txn) in &self.open {
            if txn.state != TxnState::Loading {
                continue;
            }
            if txn.params.contains_key(table) {
                blocking.push((txn.label.clone(), true));
            } else if self.scope_table(scope).is_none_or(|t| t == table) {
                blocking.push((txn.label.clone(), false));
            }
        }
        for (label, loaded) in &blocking {
            // What the table loads after the change carries the new header already.
            if *loaded {
                self.plans.learn(label, table, columns);
            }
        }
        if !blocking.is_empty() {
            self.abort_all(sink);
            self.plans.replans += 1;
        }
        Ok(blocking.into_iter().next().map(|(label, _)| label))
    }

    /// Rolls back every transaction this run began and has not prepared (best effort: an
    /// unanswered one times out in StarRocks), and forgets the cycle.
    pub fn abort_all(&mut self, sink: &mut StarRocks) {
        let open = std::mem::take(&mut self.open);
        for (scope, txn) in open {
            if txn.state == TxnState::Loading {
                let _ = sink.txn_call("rollback", &txn.label, self.scope_table(&scope), None);
            }
        }
    }
}

/// Whether a load was refused because its transaction is no longer open (the answers
/// StarRocks documents for a load into an unknown or aborted transaction).
fn refused_as_gone(message: &str) -> bool {
    message.contains("State Invalid") || message.contains("TXN_NOT_EXISTS")
}

/// Why StarRocks aborts a transaction on its own, naming the setting.
fn aborted_note(sink: &StarRocks) -> String {
    format!(
        "StarRocks aborted the transaction: not prepared within its timeout, or idle that long \
         (cdc.transaction-timeout-ms = {}); the cycle is loaded again from the checkpoint",
        sink.config().txn_timeout.as_millis()
    )
}

/// A load refused because StarRocks aborted the transaction under it (its timeout passed).
fn timed_out_error(sink: &StarRocks, label: &str, table: &str, r: &TxnReply) -> LoadError {
    LoadError::TxnAborted {
        label: label.to_string(),
        why: format!(
            "load into {table}: {} {}; {}",
            r.status,
            r.message,
            aborted_note(sink)
        ),
    }
}

/// Runs `step` until it settles (`Some`), at most `attempts-max` times, with the sink's
/// backoff between attempts (each retry counted and logged with `what` and the last error,
/// which `step` keeps in the `String`); gives up naming `table` and `label`.
fn with_retries<T>(
    sink: &mut StarRocks,
    label: &str,
    table: &str,
    what: &str,
    mut step: impl FnMut(&mut StarRocks, &mut String) -> Option<Result<T, LoadError>>,
) -> Result<T, LoadError> {
    let cfg = sink.config().clone();
    let mut delay = cfg.backoff;
    let mut last = String::new();
    for attempt in 1..=cfg.attempts_max {
        if attempt > 1 {
            sink.retries += 1;
            tracing::warn!(%label, attempt, error = %last, "{what}");
            std::thread::sleep(delay);
            delay = (delay * 2).min(cfg.backoff_max);
        }
        if let Some(settled) = step(sink, &mut last) {
            return settled;
        }
    }
    Err(LoadError::GaveUp {
        table: table.to_string(),
        label: label.to_string(),
        attempts: cfg.attempts_max,
        last,
    })
}

/// Begins the transaction `label` (its first load goes into `table`), or finds what an
/// earlier run left under it.
fn begin(sink: &mut StarRocks, label: &str, table: &str) -> Result<TxnState, LoadError> {
    with_retries(
        sink,
        label,
        table,
        "retrying transaction begin",
        |sink, last| {
            let r = match sink.txn_call("begin", label, Some(table), None) {
                Ok(r) => r,
                Err(why) => {
                    // Maybe begun: the next attempt finds the label open and rolls it back.
                    *last = why;
                    return None;
                }
            };
            match r.status.as_str() {
                "OK" => return Some(Ok(TxnState::Loading)),
                "AUTH" => return Some(Err(sink.auth_error(401))),
                "LABEL_ALREADY_EXISTS" | "Label Already Exists" => {
                    match sink.label_state(label).as_deref() {
                        Ok("VISIBLE") | Ok("COMMITTED") => {
                            tracing::info!(%label, "transaction committed by an earlier run");
                            return Some(Ok(TxnState::Committed));
                        }
                        Ok("PREPARED") => {
                            tracing::info!(%label, "transaction prepared by an earlier run; committing it at the cycle's end");
                            return Some(Ok(TxnState::Prepared));
                        }
                        Ok("PREPARE") => {
                            // Left open by a run that stopped while loading: its loads are
                            // not all there. Roll back and load the cycle afresh.
                            tracing::info!(%label, "rolling back a transaction an earlier run left open");
                            let _ = sink.txn_call("rollback", label, Some(table), None);
                            *last = format!("label {label} was open");
                        }
                        Ok(state) => *last = format!("label {label} is {state}"),
                        Err(why) => *last = why.clone(),
                    }
                }
                status => *last = format!("{status}: {}", r.message),
            }
            None
        },
    )
}

/// Commits a prepared transaction. An error answer or none at all is not the end: a commit
/// may succeed and still answer an error (an FE restarting under it), so the label's state
/// decides, and a transaction still prepared is committed again. `true` once its rows are
/// visible; `false` when committed but still publishing (`publish timeout`, `COMMITTED`).
fn commit(sink: &mut StarRocks, label: &str, table: Option<&str>) -> Result<bool, LoadError> {
    let named = table.unwrap_or("(transaction)");
    with_retries(
        sink,
        label,
        named,
        "commit in doubt; checking the label",
        |sink, last| {
            match sink.txn_call("commit", label, table, None) {
                // Committed; the data becomes visible when publishing finishes.
                Ok(r) if r.message.to_ascii_lowercase().contains("publish timeout") => {
                    return Some(Ok(false));
                }
                Ok(r) if r.status == "OK" => return Some(Ok(true)),
                Ok(r) => *last = format!("commit: {} {}", r.status, r.message),
                Err(e) => *last = format!("commit: {e}"),
            }
            match sink.label_state(label).as_deref() {
                Ok(state @ ("VISIBLE" | "COMMITTED")) => {
                    tracing::info!(%label, error = %last, "the commit answered an error but happened");
                    Some(Ok(state == "VISIBLE"))
                }
                Ok("PREPARED") | Ok("PREPARE") => None,
                Ok(state) => Some(Err(LoadError::TxnAborted {
                    label: label.to_string(),
                    why: format!("{last}; the label is {state}"),
                })),
                Err(e) => {
                    *last = format!("{last}; label state: {e}");
                    None
                }
            }
        },
    )
}

/// At start-up, rolls back the StarRocks transactions an earlier run of this slot began and
/// never prepared (killed while loading). A replay that cuts its cycles where that run did
/// finds such a transaction by its label and rolls it back itself (see [`begin`]); one whose
/// batch boundaries differ (`flush-rows` or `flush-bytes` changed, a snapshot chunk read
/// anew) never asks for that label, and the transaction would hold its tables' load slot
/// until StarRocks' own timeout (`transaction-timeout-ms`). Its rows are past the checkpoint
/// and come again from the stream, so nothing is lost.
///
/// Found by label prefix among the database's unfinished transactions, `SHOW PROC
/// '/transactions/<DbId>/running'` (StarRocks' SHOW PROC tree; it needs the SYSTEM-level
/// OPERATE privilege): `{prefix}-` (`prefix`: `{slot}-{incarnation}`, which no other slot's
/// labels share), or, for a name too long for a label (see [`starrocks_label`]), the hash
/// prefix of `{prefix}-{target}` for each of `targets` (the run's StarRocks tables; a table
/// no longer configured is not looked for under its hash). Prepared ones are left alone: a
/// replay commits those by label. Best effort: a listing StarRocks refuses (no privilege) or
/// cannot give is warned about, and those transactions end at StarRocks' timeout as before.
/// Returns the labels rolled back.
///
/// [`starrocks_label`]: crate::cdc::pipeline::starrocks_label
pub fn roll_back_leftovers(sink: &StarRocks, prefix: &str, targets: &[&str]) -> Vec<String> {
    let mut wanted = vec![format!("{}-", label_chars(prefix))];
    wanted.extend(
        targets
            .iter()
            .map(|target| hashed_label_prefix(&format!("{prefix}-{target}"))),
    );
    let open = match open_transactions(sink) {
        Ok(open) => open,
        Err(e) => {
            tracing::warn!(error = %e, "could not list StarRocks' open transactions (SHOW PROC '/transactions' needs the OPERATE privilege): a transaction a killed run began under other batch boundaries ends at StarRocks' timeout");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for (label, state) in open {
        if state != "PREPARE" || !wanted.iter().any(|w| label.starts_with(w.as_str())) {
            continue;
        }
        match sink.txn_call("rollback", &label, None, None) {
            Ok(r) if r.status == "OK" => {
                tracing::info!(%label, "rolled back a StarRocks transaction an earlier run began and never prepared");
                done.push(label);
            }
            Ok(r) => {
                tracing::warn!(%label, status = %r.status, message = %r.message, "could not roll back a transaction an earlier run left open")
            }
            Err(e) => {
                tracing::warn!(%label, error = %e, "could not roll back a transaction an earlier run left open")
            }
        }
    }
    done
}

/// (label, state) of the configured database's unfinished transactions.
fn open_transactions(sink: &StarRocks) -> Result<Vec<(String, String)>, LoadError> {
    let database = &sink.config().database;
    let (names, rows) = sink.query("SHOW PROC '/transactions'")?;
    let at = |names: &[String], name: &str| names.iter().position(|n| n.eq_ignore_ascii_case(name));
    let (Some(id_at), Some(name_at)) = (at(&names, "DbId"), at(&names, "DbName")) else {
        return Ok(Vec::new());
    };
    // Older versions name databases `default_cluster:db`.
    let Some(id) = rows.iter().find_map(|r| {
        let name = r.get(name_at)?.as_deref()?;
        let bare = name.rsplit_once(':').map_or(name, |(_, n)| n);
        (bare == database.as_str())
            .then(|| r.get(id_at).cloned().flatten())
            .flatten()
    }) else {
        return Ok(Vec::new());
    };
    if !id.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Vec::new());
    }
    let (names, rows) = sink.query(&format!("SHOW PROC '/transactions/{id}/running'"))?;
    let (Some(label_at), Some(state_at)) = (at(&names, "Label"), at(&names, "TransactionStatus"))
    else {
        return Ok(Vec::new());
    };
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let label = r.get(label_at).cloned().flatten()?;
            let state = r.get(state_at).cloned().flatten()?;
            Some((label, state.to_ascii_uppercase()))
        })
        .collect())
}
