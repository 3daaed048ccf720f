//! One-for-one supervision of named PostgreSQL instances on one plain std thread.
//!
//! The supervisor thread owns every [`Instance`]: it starts them (so their parent-death
//! signal is tied to a thread that lives as long as the supervisor), polls them for exits,
//! restarts crashed ones with exponential backoff under a restart cap, and records each
//! running server in the [`Registry`] so a later pgprism can clean up after a killed one.
//! Callers talk to it through a cloneable [`SupervisorHandle`]: commands go over a channel,
//! the instance table is read from a published snapshot and never waits for a slow start.
//!
//! It does blocking work (process spawns, file copies, bounded waits) and must never run on
//! a shard. It never restarts an instance someone stopped, and never restarts beyond the cap.

use std::collections::VecDeque;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;

use super::registry::{self, Registry};
use super::{DataDir, EmbedError, Instance, InstanceConfig};
use crate::config::{EmbedConfig, validate_instance_name};

/// Bound on queued commands; callers block briefly when the supervisor is busy starting.
const REQUESTS_MAX: usize = 64;

/// Restart policy and housekeeping of a [`Supervisor`].
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Delay before the first restart after a crash; doubles per crash up to the max.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// Restarts allowed within `restart_window`; the next crash marks the instance failed.
    pub restarts_max: u32,
    pub restart_window: Duration,
    /// How often running servers are checked for an exit.
    pub monitor_interval: Duration,
    /// Bound on stopping a server left behind by a killed pgprism, and on waiting for the
    /// processes of a crashed server to go before it is restarted on the same directory.
    pub stop_timeout: Duration,
    /// Registry directory; see [`registry::default_state_dir`].
    pub state_dir: Option<PathBuf>,
    /// The pgprism whose servers this one adopts ([`SupervisorHandle::adopt`]): the process
    /// an upgrade replaces. Its registry entries are never taken for leftovers.
    pub adopt_from: Option<u32>,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings::from_config(&EmbedConfig::default())
    }
}

impl SupervisorSettings {
    pub fn from_config(cfg: &EmbedConfig) -> SupervisorSettings {
        SupervisorSettings {
            restart_backoff: Duration::from_millis(cfg.restart_backoff_ms),
            restart_backoff_max: Duration::from_millis(cfg.restart_backoff_max_ms),
            restarts_max: cfg.restarts_max,
            restart_window: Duration::from_secs(cfg.restart_window_s),
            monitor_interval: Duration::from_millis(cfg.monitor_interval_ms),
            stop_timeout: Duration::from_millis(cfg.stop_timeout_ms),
            state_dir: cfg.state_dir.clone(),
            adopt_from: None,
        }
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being started (template copy, spawn, readiness).
    Starting,
    Running,
    /// Crashed; waiting out the backoff before the next restart.
    Backoff,
    /// Stopped on request; not restarted until asked.
    Stopped,
    /// Hit the restart cap, or a requested start failed; see `last_error`.
    Failed,
}

/// A snapshot of one instance, as `GET /instances` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub name: String,
    pub state: InstanceState,
    pub host: String,
    /// 0 until the first start when the port is picked automatically.
    pub port: u16,
    /// The postmaster's pid while one runs.
    pub pid: Option<u32>,
    /// `memory` or the data directory.
    pub data: String,
    /// The directory the server runs in (a fresh one under /dev/shm for each memory start).
    pub data_dir: String,
    pub uptime_ms: u64,
    /// Automatic restarts after crashes since the instance was added (requested restarts do
    /// not count).
    pub restarts: u32,
    /// `postgres://user@host:port/database` (no password: it is in `passfile`).
    pub url: String,
    /// The file holding the superuser's password (libpq's passfile format, mode 0600), while
    /// the server runs; empty for a server without one.
    pub passfile: String,
    /// Why it last crashed, failed to start, or was given up on.
    pub last_error: Option<String>,
    #[serde(skip)]
    started_at: Option<Instant>,
}

impl InstanceInfo {
    fn with_uptime(mut self) -> InstanceInfo {
        self.uptime_ms = self
            .started_at
            .filter(|_| self.state == InstanceState::Running)
            .map_or(0, |t| {
                u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
            });
        self
    }
}

type Reply<T> = Sender<Result<T, EmbedError>>;

enum Request {
    Add(Box<InstanceConfig>, Reply<InstanceInfo>),
    Start(String, Reply<InstanceInfo>),
    Stop(String, Reply<InstanceInfo>),
    Restart(String, Reply<InstanceInfo>),
    AddPending(Box<InstanceConfig>, Reply<InstanceInfo>),
    Adopt(Reply<Vec<InstanceInfo>>),
    Release(Sender<()>),
    Shutdown(Sender<()>),
}

/// A cloneable way to command a [`Supervisor`] and read its table, from any thread.
#[derive(Clone)]
pub struct SupervisorHandle {
    requests: Sender<Request>,
    table: Arc<Mutex<Vec<InstanceInfo>>>,
}

impl SupervisorHandle {
    /// Adds an instance and starts it; on a start error it is not added.
    pub fn add(&self, cfg: InstanceConfig) -> Result<InstanceInfo, EmbedError> {
        validate_instance_name(&cfg.name).map_err(|reason| EmbedError::InvalidName {
            name: cfg.name.clone(),
            reason,
        })?;
        self.call(|reply| Request::Add(Box::new(cfg), reply))
    }

    /// Adds an instance without starting it: a process an upgrade started waits for the old
    /// one to release its servers, then [`SupervisorHandle::adopt`]s them.
    pub fn add_pending(&self, cfg: InstanceConfig) -> Result<InstanceInfo, EmbedError> {
        validate_instance_name(&cfg.name).map_err(|reason| EmbedError::InvalidName {
            name: cfg.name.clone(),
            reason,
        })?;
        self.call(|reply| Request::AddPending(Box::new(cfg), reply))
    }

    /// Takes over, for every pending instance, the server `adopt_from` recorded for it
    /// (found by its registry entry, checked to be that server, held by a pidfd); an instance
    /// whose server is gone is started afresh. Supervised from here on as if started here.
    pub fn adopt(&self) -> Result<Vec<InstanceInfo>, EmbedError> {
        self.call(Request::Adopt)
    }

    /// Lets go of every server without stopping it (an upgrade hands them to the new
    /// process) and ends the supervisor thread: nothing is restarted or stopped here any
    /// more. The registry entries stay for the new process to find.
    pub fn release(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.requests.send(Request::Release(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Starts a stopped or failed instance (clearing its restart history); a running one is
    /// left as is.
    pub fn start(&self, name: &str) -> Result<InstanceInfo, EmbedError> {
        self.call(|reply| Request::Start(name.to_owned(), reply))
    }

    /// Fast shutdown; the instance stays stopped until started again.
    pub fn stop(&self, name: &str) -> Result<InstanceInfo, EmbedError> {
        self.call(|reply| Request::Stop(name.to_owned(), reply))
    }

    /// Stop then start. A memory instance comes back empty, from the template.
    pub fn restart(&self, name: &str) -> Result<InstanceInfo, EmbedError> {
        self.call(|reply| Request::Restart(name.to_owned(), reply))
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        lock(&self.table)
            .iter()
            .cloned()
            .map(InstanceInfo::with_uptime)
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<InstanceInfo> {
        lock(&self.table)
            .iter()
            .find(|info| info.name == name)
            .cloned()
            .map(InstanceInfo::with_uptime)
    }

    fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, EmbedError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.requests
            .send(request(reply))
            .map_err(|_| EmbedError::SupervisorGone)?;
        answer.recv().map_err(|_| EmbedError::SupervisorGone)?
    }
}

/// Owns the supervisor thread; dropping it stops every instance and joins the thread.
pub struct Supervisor {
    handle: SupervisorHandle,
    thread: Option<JoinHandle<()>>,
    state_dir: PathBuf,
    leftovers: Vec<String>,
}

impl Supervisor {
    /// Opens the registry, stops what dead pgprism processes left behind (logged, and kept
    /// for [`Supervisor::leftovers_cleaned`]), and starts the supervisor thread.
    pub fn start(settings: SupervisorSettings) -> Result<Supervisor, EmbedError> {
        let state_dir = registry::default_state_dir(settings.state_dir.as_deref());
        let registry = Registry::open(state_dir.clone())?;
        let leftovers = registry.clean_leftovers(settings.stop_timeout, settings.adopt_from);
        for line in &leftovers {
            tracing::warn!(state_dir = %registry.dir().display(), "{line}");
        }
        let (requests, inbox) = crossbeam_channel::bounded(REQUESTS_MAX);
        let table = Arc::new(Mutex::new(Vec::new()));
        let mut looped = SupervisorLoop {
            settings,
            registry,
            slots: Vec::new(),
            table: table.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pgprism-embed".into())
            .spawn(move || looped.run(&inbox))
            .map_err(EmbedError::io(
                "spawn the supervisor thread for",
                &state_dir,
            ))?;
        Ok(Supervisor {
            handle: SupervisorHandle { requests, table },
            thread: Some(thread),
            state_dir,
            leftovers,
        })
    }

    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    /// The registry directory in use.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// What was cleaned up after dead pgprism processes at start, one line each.
    pub fn leftovers_cleaned(&self) -> &[String] {
        &self.leftovers
    }

    /// Stops every instance (fast shutdown, bounded) and joins the thread.
    pub fn shutdown(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.handle.requests.send(Request::Shutdown(done)).is_ok() {
            let _ = wait.recv();
        }
        if thread.join().is_err() {
            tracing::error!("the embed supervisor thread panicked");
        }
    }
}

impl Deref for Supervisor {
    type Target = SupervisorHandle;

    fn deref(&self) -> &SupervisorHandle {
        &self.handle
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// One supervised instance, owned by the supervisor thread.
struct Slot {
    cfg: InstanceConfig,
    instance: Option<Instance>,
    state: InstanceState,
    started_at: Option<Instant>,
    restarts: u32,
    /// When automatic restarts happened, oldest first, pruned to the restart window.
    restart_times: VecDeque<Instant>,
    /// Delay before the next automatic restart.
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    data_dir: PathBuf,
}

impl Slot {
    fn info(&self) -> InstanceInfo {
        let memory = matches!(self.cfg.data, DataDir::Memory);
        let port = self
            .instance
            .as_ref()
            .map_or(self.cfg.port.unwrap_or(0), Instance::port);
        InstanceInfo {
            name: self.cfg.name.clone(),
            state: self.state,
            host: self.cfg.host.clone(),
            port,
            pid: self.instance.as_ref().map(Instance::pid),
            data: match &self.cfg.data {
                DataDir::Memory => "memory".to_owned(),
                DataDir::Path(path) => path.display().to_string(),
            },
            data_dir: if memory && self.instance.is_none() {
                String::new()
            } else {
                self.data_dir.display().to_string()
            },
            uptime_ms: 0,
            restarts: self.restarts,
            url: self
                .instance
                .as_ref()
                .map_or_else(String::new, Instance::url_without_password),
            passfile: self
                .instance
                .as_ref()
                .and_then(Instance::passfile)
                .map_or_else(String::new, |p| p.display().to_string()),
            last_error: self.last_error.clone(),
            started_at: self.started_at,
        }
    }
}

struct SupervisorLoop {
    settings: SupervisorSettings,
    registry: Registry,
    slots: Vec<Slot>,
    table: Arc<Mutex<Vec<InstanceInfo>>>,
}

impl SupervisorLoop {
    fn run(&mut self, inbox: &Receiver<Request>) {
        loop {
            match inbox.recv_timeout(self.next_wakeup()) {
                Ok(Request::Shutdown(done)) => {
                    self.stop_all();
                    let _ = done.send(());
                    return;
                }
                Ok(Request::Release(done)) => {
                    self.release_all();
                    let _ = done.send(());
                    return;
                }
                Ok(request) => self.serve(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.stop_all();
                    return;
                }
            }
            self.monitor();
            self.publish();
        }
    }

    /// The monitor interval, or sooner when a backoff ends sooner.
    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        self.slots
            .iter()
            .filter_map(|slot| slot.retry_at)
            .map(|at| at.saturating_duration_since(now))
            .fold(self.settings.monitor_interval, Duration::min)
    }

    fn publish(&self) {
        let infos = self.slots.iter().map(Slot::info).collect();
        *lock(&self.table) = infos;
    }

    fn find(&self, name: &str) -> Result<usize, EmbedError> {
        self.slots
            .iter()
            .position(|slot| slot.cfg.name == name)
            .ok_or_else(|| EmbedError::UnknownInstance {
                name: name.to_owned(),
            })
    }

    fn serve(&mut self, request: Request) {
        match request {
            // Each arm publishes before replying, so whoever gets the answer and then lists
            // the instances sees the state the answer described.
            Request::Add(cfg, reply) => {
                let result = self.add(*cfg);
                self.publish();
                let _ = reply.send(result);
            }
            Request::Start(name, reply) => {
                let result = self.find(&name).and_then(|i| self.start_requested(i));
                self.publish();
                let _ = reply.send(result);
            }
            Request::Stop(name, reply) => {
                let result = self.find(&name).and_then(|i| {
                    self.stop_slot(i)?;
                    Ok(self.slots[i].info())
                });
                self.publish();
                let _ = reply.send(result);
            }
            Request::Restart(name, reply) => {
                let result = self.find(&name).and_then(|i| {
                    self.stop_slot(i)?;
                    self.start_requested(i)
                });
                self.publish();
                let _ = reply.send(result);
            }
            Request::AddPending(cfg, reply) => {
                let result = self.add_pending(*cfg);
                self.publish();
                let _ = reply.send(result);
            }
            Request::Adopt(reply) => {
                let result = self.adopt_all();
                self.publish();
                let _ = reply.send(result);
            }
            Request::Shutdown(_) | Request::Release(_) => unreachable!("handled by the loop"),
        }
    }

    fn add(&mut self, cfg: InstanceConfig) -> Result<InstanceInfo, EmbedError> {
        self.add_pending(cfg)?;
        self.publish();
        let index = self.slots.len() - 1;
        match self.start_slot(index) {
            Ok(()) => Ok(self.slots[index].info()),
            Err(error) => {
                self.slots.pop();
                Err(error)
            }
        }
    }

    fn add_pending(&mut self, cfg: InstanceConfig) -> Result<InstanceInfo, EmbedError> {
        if self.find(&cfg.name).is_ok() {
            return Err(EmbedError::DuplicateInstance { name: cfg.name });
        }
        let data_dir = match &cfg.data {
            DataDir::Memory => PathBuf::new(),
            DataDir::Path(path) => path.clone(),
        };
        self.slots.push(Slot {
            cfg,
            instance: None,
            // Starting: not monitored, and what `adopt` looks for.
            state: InstanceState::Starting,
            started_at: None,
            restarts: 0,
            restart_times: VecDeque::new(),
            backoff: self.settings.restart_backoff,
            retry_at: None,
            last_error: None,
            data_dir,
        });
        Ok(self.slots[self.slots.len() - 1].info())
    }

    /// Adopts the predecessor's server of every pending slot (see
    /// [`SupervisorHandle::adopt`]); starts afresh those whose server is gone.
    fn adopt_all(&mut self) -> Result<Vec<InstanceInfo>, EmbedError> {
        let Some(from) = self.settings.adopt_from else {
            return Ok(Vec::new());
        };
        let mut adopted = Vec::new();
        for index in 0..self.slots.len() {
            if self.slots[index].state != InstanceState::Starting
                || self.slots[index].instance.is_some()
            {
                continue;
            }
            let name = self.slots[index].cfg.name.clone();
            let found = self.registry.live_entry_of(from, &name).and_then(|entry| {
                let slot = &self.slots[index];
                match Instance::adopt(
                    &slot.cfg,
                    entry.postmaster_pid,
                    entry.data_dir.clone(),
                    entry.port,
                    entry.memory,
                ) {
                    Ok(instance) => Some(instance),
                    Err(error) => {
                        // Nobody supervises it any more (its process released it): stop it
                        // before another server starts on its data or port.
                        let done = super::registry::stop_unadopted(&entry, self.settings.stop_timeout);
                        tracing::warn!(
                            instance = %name,
                            error = &error as &dyn std::error::Error,
                            stopped = %done,
                            "cannot adopt the server the replaced process ran; stopped it, starting it afresh"
                        );
                        None
                    }
                }
            });
            let Some(instance) = found else {
                tracing::warn!(
                    instance = %name,
                    "the replaced process's server is gone; starting it afresh"
                );
                self.registry.forget_of(from, &name);
                if let Err(error) = self.start_requested(index) {
                    tracing::error!(
                        instance = %name,
                        error = &error as &dyn std::error::Error,
                        "cannot start the server"
                    );
                }
                adopted.push(self.slots[index].info());
                continue;
            };
            let slot = &mut self.slots[index];
            slot.cfg.port = Some(instance.port());
            slot.data_dir = instance.data_dir().to_path_buf();
            if let Err(error) = self.registry.record(
                &name,
                instance.pid(),
                instance.data_dir(),
                instance.port(),
                instance.is_memory(),
            ) {
                tracing::warn!(
                    instance = %name,
                    error = &error as &dyn std::error::Error,
                    "could not record the adopted server in the registry"
                );
            }
            self.registry.forget_of(from, &name);
            tracing::info!(instance = %name, pid = instance.pid(), port = instance.port(), "adopted the server of the replaced process");
            slot.instance = Some(instance);
            slot.state = InstanceState::Running;
            slot.started_at = Some(Instant::now());
            adopted.push(slot.info());
        }
        Ok(adopted)
    }

    /// Lets go of every server without stopping it (the upgrade's new process adopts them).
    fn release_all(&mut self) {
        for slot in &mut self.slots {
            if let Some(instance) = slot.instance.take() {
                tracing::info!(instance = %slot.cfg.name, pid = instance.pid(), "handing the server to the new process");
                instance.release();
            }
            slot.state = InstanceState::Stopped;
            slot.retry_at = None;
        }
        self.publish();
    }

    /// A start someone asked for: a fresh restart history, and `failed` if it does not work.
    fn start_requested(&mut self, index: usize) -> Result<InstanceInfo, EmbedError> {
        if self.slots[index].state != InstanceState::Running {
            let slot = &mut self.slots[index];
            slot.restart_times.clear();
            slot.backoff = self.settings.restart_backoff;
            slot.retry_at = None;
            slot.last_error = None;
            if let Err(error) = self.start_slot(index) {
                let slot = &mut self.slots[index];
                slot.state = InstanceState::Failed;
                slot.last_error = Some(crate::config::error_text(&error));
                return Err(error);
            }
        }
        Ok(self.slots[index].info())
    }

    /// Starts the server of a slot and records it. The thread stays blocked meanwhile; the
    /// table shows `starting`.
    fn start_slot(&mut self, index: usize) -> Result<(), EmbedError> {
        self.slots[index].state = InstanceState::Starting;
        self.publish();
        let slot = &mut self.slots[index];
        let instance = Instance::start(slot.cfg.clone())?;
        // Restarts come back on the same port, so clients can simply reconnect.
        slot.cfg.port = Some(instance.port());
        slot.data_dir = instance.data_dir().to_path_buf();
        if let Err(error) = self.registry.record(
            &slot.cfg.name,
            instance.pid(),
            instance.data_dir(),
            instance.port(),
            instance.is_memory(),
        ) {
            tracing::warn!(
                instance = %slot.cfg.name,
                error = &error as &dyn std::error::Error,
                "could not record the server in the registry; a killed pgprism may leave it behind"
            );
        }
        slot.instance = Some(instance);
        slot.state = InstanceState::Running;
        slot.started_at = Some(Instant::now());
        slot.retry_at = None;
        Ok(())
    }

    fn stop_slot(&mut self, index: usize) -> Result<(), EmbedError> {
        let slot = &mut self.slots[index];
        slot.state = InstanceState::Stopped;
        slot.started_at = None;
        slot.retry_at = None;
        let Some(instance) = slot.instance.take() else {
            return Ok(());
        };
        let result = instance.stop();
        self.registry.forget(&slot.cfg.name);
        tracing::info!(instance = %slot.cfg.name, "stopped");
        result
    }

    fn stop_all(&mut self) {
        for index in 0..self.slots.len() {
            if let Err(error) = self.stop_slot(index) {
                tracing::warn!(
                    instance = %self.slots[index].cfg.name,
                    error = &error as &dyn std::error::Error,
                    "stopping failed"
                );
            }
        }
        self.publish();
    }

    /// Notices exits of running servers and runs restarts whose backoff is over.
    fn monitor(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            match slot.state {
                InstanceState::Running => {
                    let Some(instance) = slot.instance.as_mut() else {
                        continue;
                    };
                    let exited = match instance.exited() {
                        Ok(Some(how)) => how,
                        Ok(None) => {
                            // Up for a whole window: the next crash starts a fresh backoff.
                            if slot
                                .started_at
                                .is_some_and(|t| now - t >= self.settings.restart_window)
                            {
                                slot.backoff = self.settings.restart_backoff;
                            }
                            continue;
                        }
                        Err(error) => crate::config::error_text(&error),
                    };
                    let pid = instance.pid();
                    // Dropping reaps it and removes a memory directory.
                    slot.instance = None;
                    slot.started_at = None;
                    self.registry.forget(&slot.cfg.name);
                    tracing::warn!(instance = %slot.cfg.name, pid, "{exited}");
                    self.schedule_restart(index, exited);
                }
                InstanceState::Backoff if slot.retry_at.is_some_and(|at| at <= now) => {
                    self.restart_after_crash(index);
                }
                _ => {}
            }
        }
    }

    /// After a crash: wait out the backoff, or give up when the cap is reached.
    fn schedule_restart(&mut self, index: usize, reason: String) {
        let settings = &self.settings;
        let slot = &mut self.slots[index];
        let now = Instant::now();
        while slot
            .restart_times
            .front()
            .is_some_and(|t| now - *t > settings.restart_window)
        {
            slot.restart_times.pop_front();
        }
        if slot.restart_times.len() >= settings.restarts_max as usize {
            let message = format!(
                "instance {} gave up after {} restarts within {} s \
                 (embed.restarts-max = {}, embed.restart-window-s = {}); last failure: {reason}; \
                 fix the cause, then start it again (POST /instances/{}/start)",
                slot.cfg.name,
                slot.restart_times.len(),
                settings.restart_window.as_secs(),
                settings.restarts_max,
                settings.restart_window.as_secs(),
                slot.cfg.name,
            );
            tracing::error!("{message}");
            slot.state = InstanceState::Failed;
            slot.retry_at = None;
            slot.last_error = Some(message);
            return;
        }
        let delay = slot.backoff;
        tracing::warn!(
            instance = %slot.cfg.name,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "restarting after backoff"
        );
        slot.state = InstanceState::Backoff;
        slot.retry_at = Some(now + delay);
        slot.last_error = Some(reason);
        slot.backoff = (delay * 2).min(settings.restart_backoff_max);
    }

    fn restart_after_crash(&mut self, index: usize) {
        let stop_timeout = self.settings.stop_timeout;
        let slot = &mut self.slots[index];
        slot.restarts += 1;
        slot.restart_times.push_back(Instant::now());
        if let DataDir::Path(_) = slot.cfg.data {
            // A killed postmaster's children keep its shared memory attached for a moment;
            // PostgreSQL refuses to start on the directory until they are gone.
            let dir = slot.data_dir.clone();
            let deadline = Instant::now() + stop_timeout;
            while !registry::processes_in(&dir).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match self.start_slot(index) {
            Ok(()) => {
                let slot = &self.slots[index];
                tracing::info!(
                    instance = %slot.cfg.name,
                    restarts = slot.restarts,
                    pid = slot.instance.as_ref().map_or(0, Instance::pid),
                    "restarted"
                );
            }
            Err(error) => {
                let reason = format!("restart failed: {}", crate::config::error_text(&error));
                tracing::warn!(instance = %self.slots[index].cfg.name, "{reason}");
                self.schedule_restart(index, reason);
            }
        }
    }
}

/// The table is only read and replaced whole; a panic elsewhere must not hide it.
fn lock(table: &Mutex<Vec<InstanceInfo>>) -> MutexGuard<'_, Vec<InstanceInfo>> {
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
