//! The effector around the pure engine: loads a run, asks [`engine::decide`] what follows from
//! an input, commits events + state + outbox + timers in one transaction, and only then acts —
//! sends the calls of the outbox through the coordinator's outbound sidecar and fires due
//! timers. After a crash, [`Coordinator::recover`] re-sends every outbox entry (at-least-once;
//! the `Idempotency-Key` is stable across attempts and restarts) and overdue timers fire at
//! once, each exactly once (a fired timer disappears in the same transaction that records it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshflow_policies::workflow::Workflow;
use serde_json::Value;
use tokio::sync::Notify;

use crate::engine::{self, AttemptOutcome, Dispatch, Event, Input, RunState, RunStatus, Timer};
use crate::metrics::WorkflowMetrics;
use crate::store::{Commit, NewRun, Owner, StoreError, WorkflowStore};

/// Errors the API maps to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// 404.
    #[error("{0} not found")]
    NotFound(String),
    /// 400 (with file/field/line for definitions).
    #[error("{0}")]
    Invalid(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 500 (a store conflict is 409).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// 429: a bounded resource is full (the `?wait` waiters); try again later.
    #[error("{0}")]
    Busy(String),
}

/// Longest wait a caller may ask for with `?wait=` (Temporal's long poll is a minute too):
/// a longer one is cut to this, and the answer is then 202 with the run as it is.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Default of [`CoordinatorSettings::max_waiters`]: callers waiting for runs at once, at most;
/// one more is answered 429 and counted in `meshflow_workflow_wait_rejected_total`.
pub const MAX_WAITERS: usize = 1024;

/// The timer loop looks at the timers at least this often, ms.
const TIMER_LOOK_MAX_MS: u64 = 1000;

/// A waiter re-reads its run's status at least this often (plus up to 250 ms of jitter): a run
/// finished by another coordinator replica sends this one no notification.
const WAIT_POLL: Duration = Duration::from_millis(1000);

/// Whether a stored status name is a terminal one.
fn is_terminal_status(status: &str) -> bool {
    RunStatus::ALL
        .iter()
        .any(|s| s.as_str() == status && s.is_terminal())
}

/// What [`Coordinator::wait`] saw.
#[derive(Debug)]
pub enum WaitOutcome {
    /// The run is terminal (its output or error is in the view).
    Finished(RunView),
    /// The wait elapsed first; the run as it is now.
    Elapsed(RunView),
}

/// One waiter's place ([`Coordinator::reserve_waiter`]), counted until dropped.
pub struct WaiterSlot<'a>(&'a Coordinator);

impl Drop for WaiterSlot<'_> {
    fn drop(&mut self) {
        self.0
            .waiters
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.metrics.waiters.dec();
    }
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Test-only crash points (`MESHFLOW_FAILPOINT=<name>[:<n>]`, the n-th hit, default 1): the
/// process aborts like `kill -9`, with no cleanup.
#[derive(Debug, Default)]
pub struct Failpoint {
    name: Option<String>,
    at: u64,
    hits: AtomicU64,
}

impl Failpoint {
    /// From `MESHFLOW_FAILPOINT`.
    pub fn from_env() -> Self {
        let Ok(spec) = std::env::var("MESHFLOW_FAILPOINT") else {
            return Self::default();
        };
        let (name, at) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
        Self {
            name: Some(name.to_string()),
            at: at.parse().unwrap_or(1),
            hits: AtomicU64::new(0),
        }
    }

    /// Aborts the process at the configured hit of `name`.
    pub fn hit(&self, name: &str) {
        if self.name.as_deref() == Some(name)
            && self.hits.fetch_add(1, Ordering::SeqCst) + 1 == self.at
        {
            eprintln!("meshflow: failpoint {name} reached; aborting");
            std::process::abort();
        }
    }
}

/// Settings of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// The coordinator's outbound sidecar (`host:port`); step calls go through it.
    pub outbound: Option<String>,
    /// Or the sidecar's ready file, whose `outbound` address is read when needed (see
    /// [`Coordinator::wait_for_sidecar`]).
    pub outbound_ready_file: Option<std::path::PathBuf>,
    /// Finished runs are deleted after this long.
    pub retention: Duration,
    /// This coordinator's id (stable across its restarts).
    pub node: String,
    /// How long a coordinator owns a run without renewing (renewed every third of it).
    pub lease: Duration,
    /// Records run and step spans (OpenTelemetry).
    pub tracing: meshflow_telemetry::Tracing,
    /// Probability (0.0–1.0) that a run started without a client trace is sampled.
    pub trace_sampling: f64,
    /// Callers waiting for runs at once, at most ([`MAX_WAITERS`] by default).
    pub max_waiters: usize,
}

/// How much longer than an attempt's deadline the call itself stays open. The attempt's
/// durable timer decides the timeout (outcome unknown, retried with the same idempotency key);
/// the sidecar (`meshflow-timeout-ms`) and the HTTP client keep the call open this much longer so
/// that an answer arriving just after the deadline is still read and recorded — a late success
/// completes a step that still waits for a result. The sidecar must never cut first: a 504 of
/// its own at the deadline would be recorded as the service's failure.
pub const LATE_RESULT_GRACE: Duration = Duration::from_secs(30);

/// Header the outbound sidecar sets on a response it generated itself (Linkerd's
/// `l5d-proxy-error`); values in [`NOT_SENT_PROXY_ERRORS`] mean the request never left it.
pub const PROXY_ERROR_HEADER: &str = "meshflow-proxy-error";

/// `meshflow-proxy-error` values for which no byte of the request reached any service: the
/// sidecar has no config yet, the service has no endpoint, or no endpoint accepted a connection.
/// Such a call is sent again (same attempt) until the attempt's deadline instead of spending an
/// attempt.
pub const NOT_SENT_PROXY_ERRORS: [&str; 3] = ["no-config", "no-endpoint", "connect-failed"];

/// A difference between this node's clock and the workflow store's beyond which a warning is
/// logged (the store's clock is used whatever the difference).
pub const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(1);

/// A clock sample measured over a longer round trip than this is too uncertain to use.
pub const CLOCK_SAMPLE_MAX_ROUND_TRIP: Duration = Duration::from_millis(100);

/// Request header: no retry by the sidecar starts after this many ms (the attempt's deadline);
/// see `meshflow_proxy::outbound::RETRY_DEADLINE_HEADER`.
pub const RETRY_DEADLINE_HEADER: &str = "meshflow-retry-deadline-ms";

/// The coordinator.
pub struct Coordinator {
    store: Arc<dyn WorkflowStore>,
    /// The HTTP client, proxying through the sidecar's outbound address it was built for.
    http: std::sync::RwLock<(Option<String>, reqwest::Client)>,
    definitions: Mutex<HashMap<(String, u32), Arc<Workflow>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    sending: Mutex<HashSet<(String, String)>>,
    timers_changed: Notify,
    /// When the timer loop looks at the timers next, Unix ms (while it is looking: 2 s after
    /// the look began; `u64::MAX` before its first look): a commit wakes it only for a timer
    /// due before that, not on every commit.
    timers_planned_ms: std::sync::atomic::AtomicU64,
    metrics: WorkflowMetrics,
    failpoint: Failpoint,
    settings: CoordinatorSettings,
    /// Runs this coordinator holds, with their fencing tokens.
    owned: Mutex<HashMap<String, u64>>,
    /// The state this coordinator last committed for each run it drives (not terminal): the
    /// next input starts from it instead of reading and decoding the run again. The store's
    /// event-count guard keeps it honest: a commit from an entry that is no longer current
    /// (another coordinator wrote the run) is refused, and the entry dropped.
    current: Mutex<HashMap<String, CurrentRun>>,
    /// Set once the outbound sidecar accepted a connection: nothing is dispatched and no timer
    /// fires before (an attempt sent into a sidecar that is not up yet is an attempt wasted).
    sidecar_up: tokio::sync::OnceCell<()>,
    /// The store's clock minus ours, ms ([`Coordinator::sync_clock`]).
    clock_offset_ms: std::sync::atomic::AtomicI64,
    /// Run ids as they become terminal here (for `?wait`).
    finished: tokio::sync::broadcast::Sender<String>,
    /// Callers waiting now.
    waiters: std::sync::atomic::AtomicUsize,
}

/// A run's last committed state, kept by the coordinator driving it.
struct CurrentRun {
    /// Events in its history (the store's guard for the next commit).
    seq: u64,
    workflow: String,
    version: u32,
    state: RunState,
}

/// A run as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    /// Run id.
    pub run_id: String,
    /// Workflow.
    pub workflow: String,
    /// Version.
    pub version: u32,
    /// Status.
    pub status: String,
    /// What it waits on (empty when finished).
    pub waiting_on: Vec<String>,
    /// The state (steps, attempts, outputs, errors).
    pub state: RunState,
    /// Events in the history.
    pub events: u64,
}

impl Coordinator {
    /// A coordinator over `store`.
    pub fn new(
        store: Arc<dyn WorkflowStore>,
        settings: CoordinatorSettings,
        metrics: WorkflowMetrics,
    ) -> Arc<Self> {
        let http = client_through(settings.outbound.as_deref());
        Arc::new(Self {
            store,
            http: std::sync::RwLock::new((settings.outbound.clone(), http)),
            definitions: Mutex::default(),
            locks: Mutex::default(),
            sending: Mutex::default(),
            timers_changed: Notify::new(),
            timers_planned_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
            metrics,
            failpoint: Failpoint::from_env(),
            settings,
            owned: Mutex::default(),
            current: Mutex::default(),
            sidecar_up: tokio::sync::OnceCell::new(),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            finished: tokio::sync::broadcast::channel(1024).0,
            waiters: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Registers a definition (YAML or JSON; `file` names it in errors). Returns
    /// (`namespace/name`, version).
    ///
    /// # Errors
    /// [`CoordinatorError::Invalid`] naming file, field and line.
    pub async fn register(
        &self,
        file: &str,
        text: &str,
    ) -> Result<(String, u32), CoordinatorError> {
        // Validation parses every expression: on a blocking thread, never the I/O threads.
        let (file, text) = (file.to_string(), text.to_string());
        let (workflow, spec) = off_runtime(move || {
            let workflow = Workflow::parse(std::path::Path::new(&file), &text)
                .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
            let spec = serde_json::to_string(&workflow)
                .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
            Ok::<_, CoordinatorError>((workflow, spec))
        })
        .await??;
        let version = self
            .store
            .put_definition(&workflow.id(), &spec, self.now())
            .await?;
        Ok((workflow.id(), version))
    }

    async fn definition(&self, id: &str, version: u32) -> Result<Arc<Workflow>, CoordinatorError> {
        if let Some(wf) = self
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id.to_string(), version))
        {
            return Ok(wf.clone());
        }
        let row = self
            .store
            .definition(id, Some(version))
            .await?
            .ok_or_else(|| {
                CoordinatorError::NotFound(format!("workflow {id} version {version}"))
            })?;
        let wf: Workflow = serde_json::from_str(&row.spec)
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        let wf = Arc::new(wf);
        self.definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id.to_string(), version), wf.clone());
        Ok(wf)
    }

    /// Starts a run of the latest version of `workflow` (idempotent on `run_id`); with
    /// `signal`, also delivers it (signal-with-start). A valid W3C `traceparent` from the
    /// client makes the run's trace a child of the client's span. Returns (run id, created).
    ///
    /// # Errors
    /// Unknown workflow (404), invalid run id (400), store errors.
    ///
    /// Cancel-safe: the work runs in a task of its own, so a caller that goes away (an HTTP
    /// client disconnecting) cannot leave a committed start undispatched.
    pub async fn start(
        self: &Arc<Self>,
        workflow: &str,
        run_id: Option<String>,
        input: Value,
        signal: Option<(String, Value)>,
        client_traceparent: Option<&str>,
    ) -> Result<(String, bool), CoordinatorError> {
        let (this, workflow) = (self.clone(), workflow.to_string());
        let traceparent = client_traceparent.map(str::to_string);
        join(tokio::spawn(async move {
            this.start_here(&workflow, run_id, input, signal, traceparent.as_deref())
                .await
        }))
        .await
    }

    /// [`Coordinator::start`] in the caller's task.
    async fn start_here(
        self: &Arc<Self>,
        workflow: &str,
        run_id: Option<String>,
        input: Value,
        signal: Option<(String, Value)>,
        client_traceparent: Option<&str>,
    ) -> Result<(String, bool), CoordinatorError> {
        let run_id = run_id.unwrap_or_else(new_run_id);
        if run_id.is_empty()
            || run_id.bytes().all(|b| b == b'.')
            || run_id.len() > 128
            || !run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(CoordinatorError::Invalid(
                "run id: 1–128 characters of [A-Za-z0-9._-], not only dots".into(),
            ));
        }
        let row = self
            .store
            .definition(workflow, None)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("workflow {workflow}")))?;
        let wf = self.definition(workflow, row.version).await?;
        wf.check_input(&input).map_err(CoordinatorError::Invalid)?;
        if let Some((name, _)) = &signal {
            self.check_signal(&wf, name).await?;
        }
        let now = self.now();
        let input_copy = input.clone();
        let started = Event::RunStarted {
            workflow: wf.id(),
            version: row.version,
            input,
            traceparent: crate::trace::run_traceparent(
                &run_id,
                client_traceparent,
                self.settings.trace_sampling,
            ),
            at_ms: now,
        };
        let mut state = RunState::replay(&wf, std::slice::from_ref(&started)).expect("RunStarted");
        let mut events = vec![started];
        // Signal-with-start: the signal is part of the creating transaction, so a crash cannot
        // leave the run without it.
        if let Some((name, payload)) = &signal {
            let received = Event::SignalReceived {
                name: name.clone(),
                payload: payload.clone(),
                at_ms: now,
            };
            state.apply(&received);
            events.push(received);
        }
        let (mut state, follow) = {
            let (wf, run_id) = (wf.clone(), run_id.clone());
            off_runtime(move || {
                let ctx = engine::Ctx {
                    workflow: &wf,
                    run_id: &run_id,
                    now_ms: now,
                };
                let follow = engine::decide(&state, &Input::Advance, &ctx);
                (state, follow)
            })
            .await?
        };
        for e in follow {
            state.apply(&e);
            events.push(e);
        }
        let mut commit = self.commit_of(&run_id, 0, &events, &state, &wf, now);
        let earliest_timer = commit.timers.iter().map(|t| t.2).min();
        commit.owner = Some(Owner {
            node: self.settings.node.clone(),
            fence: 1,
            lease_until_ms: self.lease_until(),
        });
        // Under the run's lock: an input for the new run (a cancel through the API) waits
        // until the start has kept its state and registered its lease.
        let lock = self.lock_for(&run_id);
        let guard = lock.lock().await;
        let created = self
            .store
            .create_run(&NewRun {
                run_id: run_id.clone(),
                workflow: wf.id(),
                version: row.version,
                commit,
            })
            .await;
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                drop(guard);
                self.forget_lock(&run_id, lock);
                return Err(e.into());
            }
        };
        if created {
            // A run can finish in its creating commit (every step skipped, a template error).
            crate::trace::record_committed(&self.settings.tracing, &run_id, &state, &events);
            if !state.status.is_terminal() {
                self.owned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(run_id.clone(), 1);
            }
            self.metrics
                .runs_started
                .with_label_values(&[&wf.id()])
                .inc();
            // A new run: whatever was kept under this id (a purged run's) is gone.
            self.take_current(&run_id);
            self.keep_current(
                &run_id,
                CurrentRun {
                    seq: events.len() as u64,
                    workflow: wf.id(),
                    version: row.version,
                    state: state.clone(),
                },
            );
            self.after_commit(&run_id, &state, &wf, earliest_timer);
        }
        drop(guard);
        self.forget_lock(&run_id, lock);
        if !created {
            // Same id, another workflow or input: not the same start (409).
            if let Some(existing) = self.store.run(&run_id).await? {
                let same_input = serde_json::from_str::<RunState>(&existing.state)
                    .map(|s| s.input == input_copy)
                    .unwrap_or(false);
                if existing.workflow != wf.id() || !same_input {
                    return Err(CoordinatorError::Conflict(format!(
                        "run {run_id} exists with another workflow or input"
                    )));
                }
            }
            if let Some((name, payload)) = signal {
                self.handle(&run_id, Input::Signal { name, payload })
                    .await?;
            }
        }
        Ok((run_id, created))
    }

    /// Delivers an input to a run (signal, cancel, terminate, retry).
    ///
    /// # Errors
    /// 404 for an unknown run; store errors.
    pub async fn send(
        self: &Arc<Self>,
        run_id: &str,
        input: Input,
    ) -> Result<(), CoordinatorError> {
        // Cancel-safe like `start`: a committed input is always acted on.
        let (this, run_id) = (self.clone(), run_id.to_string());
        join(tokio::spawn(
            async move { this.send_here(&run_id, input).await },
        ))
        .await
    }

    /// [`Coordinator::send`] in the caller's task.
    async fn send_here(
        self: &Arc<Self>,
        run_id: &str,
        input: Input,
    ) -> Result<(), CoordinatorError> {
        let Some(row) = self.store.run(run_id).await? else {
            return Err(CoordinatorError::NotFound(format!("run {run_id}")));
        };
        if let Input::Signal { name, .. } = &input {
            let wf = self.definition(&row.workflow, row.version).await?;
            self.check_signal(&wf, name).await?;
        }
        self.handle(run_id, input).await
    }

    /// 404 for a signal no run of `wf` can ever use (no step waits for it, no expression
    /// reads it): it would be stored and never looked at.
    async fn check_signal(&self, wf: &Arc<Workflow>, name: &str) -> Result<(), CoordinatorError> {
        let (wf, name) = (wf.clone(), name.to_string());
        let id = wf.id();
        let name_copy = name.clone();
        if off_runtime(move || wf.accepts_signal(&name_copy)).await? {
            return Ok(());
        }
        Err(CoordinatorError::NotFound(format!(
            "signal {name:?} (workflow {id} never uses it: no step waits for it and no \
             expression reads it)"
        )))
    }

    /// The run view.
    ///
    /// # Errors
    /// 404 for an unknown run.
    pub async fn get(&self, run_id: &str) -> Result<RunView, CoordinatorError> {
        let row = self
            .store
            .run(run_id)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("run {run_id}")))?;
        let wf = self.definition(&row.workflow, row.version).await?;
        let state: RunState = serde_json::from_str(&row.state)
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        Ok(RunView {
            run_id: row.run_id,
            workflow: row.workflow,
            version: row.version,
            status: row.status,
            waiting_on: if state.status.is_terminal() {
                Vec::new()
            } else {
                state.waiting_on(&wf)
            },
            events: row.seq,
            state,
        })
    }

    /// Waits until run `run_id` is terminal, at most `wait` (cut to [`MAX_WAIT`]). Woken by
    /// this coordinator's own commits, and re-reads the run's status about every second for
    /// transitions another replica commits.
    ///
    /// # Errors
    /// 404 for an unknown run; [`CoordinatorError::Busy`] when
    /// [`CoordinatorSettings::max_waiters`] callers wait already; store errors.
    pub async fn wait(
        &self,
        run_id: &str,
        wait: Duration,
    ) -> Result<WaitOutcome, CoordinatorError> {
        let slot = self.reserve_waiter()?;
        self.wait_in(&slot, run_id, wait).await
    }

    /// Takes a waiter's place, before starting a run a caller will wait for (so a refusal
    /// starts nothing).
    ///
    /// # Errors
    /// [`CoordinatorError::Busy`] when [`CoordinatorSettings::max_waiters`] callers wait.
    pub fn reserve_waiter(&self) -> Result<WaiterSlot<'_>, CoordinatorError> {
        use std::sync::atomic::Ordering;
        if self
            .waiters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.settings.max_waiters).then_some(n + 1)
            })
            .is_err()
        {
            self.metrics.wait_rejected.inc();
            return Err(CoordinatorError::Busy(format!(
                "{} callers are waiting for runs already; retry later or read the run without wait",
                self.settings.max_waiters
            )));
        }
        self.metrics.waiters.inc();
        Ok(WaiterSlot(self))
    }

    /// [`Coordinator::wait`] in a place taken with [`Coordinator::reserve_waiter`].
    ///
    /// # Errors
    /// 404 for an unknown run; store errors.
    pub async fn wait_in(
        &self,
        _slot: &WaiterSlot<'_>,
        run_id: &str,
        wait: Duration,
    ) -> Result<WaitOutcome, CoordinatorError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        // Subscribed before the first read: a run finishing between a read and the wait is
        // seen.
        let mut finished = self.finished.subscribe();
        let mut notified = true;
        let view = self.get(run_id).await?;
        if view.state.status.is_terminal() {
            return Ok(WaitOutcome::Finished(view));
        }
        loop {
            // Re-reads between notifications look at the status column only (no decoding of
            // the run), spread by jitter so many waiters do not read in step.
            let jitter = Duration::from_millis(rand::random::<u64>() % 250);
            let poll = tokio::time::Instant::now() + WAIT_POLL + jitter;
            let woken = loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break false,
                    _ = tokio::time::sleep_until(poll) => break true,
                    got = finished.recv(), if notified => match got {
                        Ok(id) if id == run_id => break true,
                        Ok(_) => continue,
                        // Missed some: read the run again.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break true,
                        // (The sender lives as long as the coordinator.) Polling only.
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            notified = false;
                            continue;
                        }
                    },
                }
            };
            if !woken {
                let view = self.get(run_id).await?;
                return Ok(if view.state.status.is_terminal() {
                    WaitOutcome::Finished(view)
                } else {
                    WaitOutcome::Elapsed(view)
                });
            }
            match self.store.run(run_id).await {
                Ok(Some(row)) if is_terminal_status(&row.status) => {
                    return Ok(WaitOutcome::Finished(self.get(run_id).await?));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(CoordinatorError::NotFound(format!("run {run_id}")));
                }
                // A failed re-read does not end the wait: the next one may succeed.
                Err(e) => tracing::warn!(run = run_id, error = %e, "re-reading a waited-for run"),
            }
        }
    }

    /// The store (for listing and history).
    pub fn store(&self) -> &Arc<dyn WorkflowStore> {
        &self.store
    }

    /// Now on the store's clock, Unix ms: every lease, timer due time and event timestamp uses
    /// it, so coordinators whose wall clocks disagree still agree on when a lease ends and when
    /// a timer is due. It is this process's clock plus the offset measured at the last
    /// [`Coordinator::sync_clock`].
    pub fn now(&self) -> u64 {
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        (now_ms() as i64).saturating_add(offset).max(0) as u64
    }

    /// Measures the store's clock against ours ([`WorkflowStore::clock_offset`]; half the
    /// round trip is the error bound) and keeps the offset; a sample over
    /// [`CLOCK_SAMPLE_MAX_ROUND_TRIP`] is ignored (the previous offset stays), and a change
    /// within the sample's error is not applied, so `now()` does not jitter. An offset over
    /// [`CLOCK_SKEW_WARNING`] is logged as a warning (the store's clock is used either way).
    ///
    /// # Errors
    /// Store errors (the previous offset stays).
    pub async fn sync_clock(&self) -> Result<i64, CoordinatorError> {
        let previous = self.clock_offset_ms.load(Ordering::Relaxed);
        let Some((offset, round_trip)) = self.store.clock_offset().await? else {
            return Ok(previous);
        };
        if round_trip > CLOCK_SAMPLE_MAX_ROUND_TRIP.as_millis() as u64 {
            tracing::debug!(
                round_trip_ms = round_trip,
                "clock sample ignored: slow round trip"
            );
            return Ok(previous);
        }
        if (offset - previous).unsigned_abs() <= round_trip / 2 + 1 {
            return Ok(previous);
        }
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        let warn = CLOCK_SKEW_WARNING.as_millis() as i64;
        if offset.abs() > warn && (previous - offset).abs() > warn / 2 {
            tracing::warn!(
                node = %self.settings.node,
                offset_ms = offset,
                round_trip_ms = round_trip,
                "workflow: this node's clock is {:.1} s {} the workflow store's; leases and timers use the store's clock",
                offset.abs() as f64 / 1000.0,
                if offset < 0 { "ahead of" } else { "behind" },
            );
        }
        Ok(offset)
    }

    fn lease_until(&self) -> u64 {
        self.now() + self.settings.lease.as_millis() as u64
    }

    /// This coordinator's claim on `run_id`: the fencing token it holds. A run it does not
    /// hold (never, or no longer) is written with token 0, which the store rejects unless the
    /// run is this node's: the write is fenced and counted, never applied.
    async fn owner_of(&self, run_id: &str) -> Result<Owner, CoordinatorError> {
        let mut held = self
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(run_id)
            .copied();
        if held.is_none() {
            // A run freed since the last renewal (its owner stopped) can be claimed now.
            self.renew().await?;
            held = self
                .owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(run_id)
                .copied();
        }
        Ok(Owner {
            node: self.settings.node.clone(),
            fence: held.unwrap_or(0),
            lease_until_ms: self.lease_until(),
        })
    }

    /// Takes or renews this node's leases; returns the runs newly taken over from another
    /// coordinator.
    async fn renew(&self) -> Result<Vec<String>, CoordinatorError> {
        if let Err(e) = self.sync_clock().await {
            tracing::warn!("workflow: cannot read the store's clock: {e}");
        }
        let held = self
            .store
            .acquire(&self.settings.node, self.now(), self.lease_until(), 100_000)
            .await?;
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let new: HashSet<String> = held
            .iter()
            .filter(|(id, fence)| owned.get(id).is_none_or(|f| f != fence))
            .map(|(id, _)| id.clone())
            .collect();
        // Merged, not replaced: a run missing from `held` may only have been skipped because a
        // commit had its row locked (PostgreSQL's SKIP LOCKED), or created after the query
        // read the table. Replacing dropped such runs, and their next commit went out with
        // token 0 and was fenced (a 10 s stall until the attempt's timer retried it, under
        // load). A run really lost to another coordinator is refused by the store at its next
        // commit (owner and token checked there) and forgotten then; until then its entry
        // only costs memory (its timers are not ours: the store filters them by owner).
        let held_now: HashSet<&String> = held.iter().map(|(id, _)| id).collect();
        // A run taken over, or not renewed now (lost to another coordinator, or only skipped
        // while a commit held its row), may be written elsewhere: its next input reads the
        // store (one read for a skipped run).
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| held_now.contains(id) && !new.contains(id));
        drop(held_now);
        owned.extend(held);
        Ok(new.into_iter().collect())
    }

    /// Renews leases every third of the lease until the process ends. Runs taken over from
    /// a coordinator that stopped renewing are not re-sent: their attempts in flight may still
    /// be running, so their deadlines (now this node's timers) decide, and retries follow.
    pub async fn run_leases(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.settings.lease / 3).await;
            match self.renew().await {
                Ok(new) if !new.is_empty() => {
                    tracing::info!(
                        runs = new.len(),
                        "workflow: took over runs whose lease expired"
                    );
                    self.timers_changed.notify_one();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("workflow leases: {e}"),
            }
        }
    }

    /// Returns once the outbound sidecar accepts TCP connections (at once without one). Polls
    /// every 100 ms and says so in the log every 10 s while it waits.
    pub async fn wait_for_sidecar(&self) {
        if !self.has_sidecar() {
            return;
        }
        self.sidecar_up
            .get_or_init(|| async move {
                let started = tokio::time::Instant::now();
                let mut last_log = started;
                let mut outbound = String::new();
                loop {
                    let resolved = self.refresh_outbound();
                    if let Some(address) = resolved {
                        outbound = address;
                    }
                    if !outbound.is_empty()
                        && tokio::net::TcpStream::connect(&outbound).await.is_ok()
                    {
                        if started.elapsed() > Duration::from_millis(100) {
                            tracing::info!(
                                sidecar = %outbound,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "workflow: the coordinator's sidecar is up; dispatching"
                            );
                        }
                        return;
                    }
                    if last_log.elapsed() >= Duration::from_secs(10) {
                        last_log = tokio::time::Instant::now();
                        tracing::warn!(
                            sidecar = %outbound,
                            waited_s = started.elapsed().as_secs(),
                            "workflow: waiting for the coordinator's sidecar before dispatching calls and firing timers"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
    }

    /// Whether step calls go through a sidecar (an address or a ready file to read it from).
    fn has_sidecar(&self) -> bool {
        self.settings.outbound.is_some() || self.settings.outbound_ready_file.is_some()
    }

    /// The sidecar's outbound address now: the configured one, or the one in its ready file
    /// (re-read, and the HTTP client rebuilt when it changed). `None` while unknown.
    fn refresh_outbound(&self) -> Option<String> {
        if let Some(fixed) = &self.settings.outbound {
            return Some(fixed.clone());
        }
        let file = self.settings.outbound_ready_file.as_ref()?;
        let address = meshflow_api::ReadyFile::read(file)?
            .address("outbound")?
            .to_string();
        let mut http = self.http.write().unwrap_or_else(|e| e.into_inner());
        if http.0.as_deref() != Some(address.as_str()) {
            tracing::info!(sidecar = %address, "workflow: step calls go through the sidecar at this address");
            *http = (Some(address.clone()), client_through(Some(&address)));
        }
        Some(address)
    }

    fn client(&self) -> reqwest::Client {
        self.http
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    fn lock_for(&self, run_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(run_id.to_string())
            .or_default()
            .clone()
    }

    fn commit_of(
        &self,
        run_id: &str,
        expected_seq: u64,
        events: &[Event],
        state: &RunState,
        wf: &Workflow,
        now: u64,
    ) -> Commit {
        Commit {
            owner: None,
            run_id: run_id.to_string(),
            expected_seq,
            events: events
                .iter()
                .map(|e| serde_json::to_string(e).unwrap_or_default())
                .collect(),
            state: serde_json::to_string(state).unwrap_or_default(),
            status: state.status.as_str().to_string(),
            now_ms: now,
            outbox: state
                .dispatches()
                .into_iter()
                .map(|d| (d.key(), serde_json::to_string(&d).unwrap_or_default()))
                .collect(),
            timers: state
                .timers(wf)
                .into_iter()
                .map(|(t, due)| (t.key(), serde_json::to_string(&t).unwrap_or_default(), due))
                .collect(),
        }
    }

    /// Applies `input` to a run: decide, commit, then act.
    async fn handle(self: &Arc<Self>, run_id: &str, input: Input) -> Result<(), CoordinatorError> {
        let lock = self.lock_for(run_id);
        let guard = lock.lock().await;
        let result = self.handle_locked(run_id, input).await;
        drop(guard);
        self.forget_lock(run_id, lock);
        result
    }

    /// [`Coordinator::handle`] under the run's lock.
    async fn handle_locked(
        self: &Arc<Self>,
        run_id: &str,
        input: Input,
    ) -> Result<(), CoordinatorError> {
        let current = self.take_current(run_id);
        let from_store = current.is_none();
        let current = match current {
            Some(current) => current,
            None => {
                let row = self
                    .store
                    .run(run_id)
                    .await?
                    .ok_or_else(|| CoordinatorError::NotFound(format!("run {run_id}")))?;
                let state: RunState = serde_json::from_str(&row.state)
                    .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
                CurrentRun {
                    seq: row.seq,
                    workflow: row.workflow,
                    version: row.version,
                    state,
                }
            }
        };
        let wf = self.definition(&current.workflow, current.version).await?;
        // Decided on the state read under the run's lock: an operator input that would be
        // dropped is refused, never acknowledged.
        if let Some(why) = engine::refusal(&current.state, &input) {
            self.keep_current(run_id, current);
            return Err(CoordinatorError::Conflict(format!("run {run_id}: {why}")));
        }
        let CurrentRun {
            seq,
            workflow,
            version,
            state,
        } = current;
        let now = self.now();
        let operator = matches!(input, Input::Signal { .. } | Input::Cancel | Input::Retry);
        // `when` conditions and templates are evaluated here: on a blocking thread.
        let (mut state, events) = {
            let (wf, run_id) = (wf.clone(), run_id.to_string());
            off_runtime(move || {
                let ctx = engine::Ctx {
                    workflow: &wf,
                    run_id: &run_id,
                    now_ms: now,
                };
                let events = engine::decide(&state, &input, &ctx);
                (state, events)
            })
            .await?
        };
        if events.is_empty() {
            if from_store && !state.status.is_terminal() {
                // Nothing to decide on the stored state: perhaps this input was already
                // committed by a write whose answer was lost (a failed group retried, a lost
                // commit acknowledgement). Its calls are sent now rather than at their
                // deadline (`sending` skips any already on their way; the idempotency key
                // makes a repeat harmless).
                for d in state.dispatches() {
                    self.spawn_dispatch(
                        run_id.to_string(),
                        d,
                        state.traceparent.clone(),
                        Some(wf.max_payload_bytes()),
                    );
                }
            }
            self.keep_current(
                run_id,
                CurrentRun {
                    seq,
                    workflow,
                    version,
                    state,
                },
            );
            return Ok(());
        }
        let was_terminal = state.status.is_terminal();
        for e in &events {
            state.apply(e);
            self.observe(&wf, &state, e, now);
        }
        let limit = u64::from(wf.history_limit());
        if state.events * 5 >= limit * 4 && (seq * 5) < limit * 4 {
            tracing::warn!(
                run = run_id,
                events = state.events,
                limit,
                "run history is at 80 % of its limit"
            );
        }
        let mut commit = self.commit_of(run_id, seq, &events, &state, &wf, now);
        let earliest_timer = commit.timers.iter().map(|t| t.2).min();
        commit.owner = Some(self.owner_of(run_id).await?);
        if let Err(e) = self.store.commit(&commit).await {
            if matches!(e, StoreError::Fenced(_)) {
                self.metrics.fenced_writes.inc();
                self.owned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(run_id);
                tracing::warn!(run = run_id, node = %self.settings.node, "write rejected: another coordinator owns the run now");
            }
            return Err(e.into());
        }
        crate::trace::record_committed(&self.settings.tracing, run_id, &state, &events);
        if !was_terminal && state.status.is_terminal() {
            self.metrics
                .runs_finished
                .with_label_values(&[&wf.id(), state.status.as_str()])
                .inc();
        }
        if state.status.is_terminal() {
            // Finished: no lease to keep (`acquire` only takes unfinished runs).
            self.owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(run_id);
            // Committed: waiters may read it now (nobody listening is fine).
            let _ = self.finished.send(run_id.to_string());
        }
        self.after_commit(run_id, &state, &wf, earliest_timer);
        if operator && !was_terminal && state.status == RunStatus::HistoryLimitExceeded {
            return Err(CoordinatorError::Conflict(format!(
                "run {run_id} reached its history limit and ended; the input was not applied"
            )));
        }
        self.keep_current(
            run_id,
            CurrentRun {
                seq: seq + events.len() as u64,
                workflow,
                version,
                state,
            },
        );
        Ok(())
    }

    fn take_current(&self, run_id: &str) -> Option<CurrentRun> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(run_id)
    }

    /// Keeps `current` for the next input to `run_id`, unless the run is terminal (its next
    /// inputs are rare operator commands: they read the store). Callers hold the run's lock;
    /// still, an entry already there with a longer history is never replaced by an older one.
    fn keep_current(&self, run_id: &str, current: CurrentRun) {
        if current.state.status.is_terminal() {
            return;
        }
        let mut map = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(run_id) {
            Some(kept) if kept.seq >= current.seq => {}
            Some(kept) => *kept = current,
            None => {
                map.insert(run_id.to_string(), current);
            }
        }
    }

    /// Drops the run's lock from the map when nobody else holds or waits for it (the map's
    /// copy and `lock` are the only ones left), so the map holds only runs being handled.
    fn forget_lock(&self, run_id: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Dropped under the map's lock, so of two callers finishing together the later one
        // sees only the map's copy left.
        drop(lock);
        if locks.get(run_id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(run_id);
        }
    }

    fn observe(&self, wf: &Workflow, state: &RunState, event: &Event, now: u64) {
        if let Event::AttemptEnded {
            step,
            attempt,
            compensation,
            succeeded,
            ..
        } = event
        {
            let kind = if *compensation {
                "compensation"
            } else {
                "call"
            };
            let result = if *succeeded { "ok" } else { "failed" };
            self.metrics
                .step_attempts
                .with_label_values(&[&wf.id(), step, kind, result])
                .inc();
            if let Some(a) = state.steps.get(step).and_then(|s| {
                s.attempts
                    .iter()
                    .rev()
                    .find(|a| a.attempt == *attempt && a.compensation == *compensation)
            }) {
                self.metrics
                    .step_latency
                    .with_label_values(&[&wf.id(), step])
                    .observe(now.saturating_sub(a.started_ms) as f64 / 1000.0);
            }
        }
        if let Event::AttemptTimedOut {
            step, compensation, ..
        } = event
        {
            let kind = if *compensation {
                "compensation"
            } else {
                "call"
            };
            self.metrics
                .step_attempts
                .with_label_values(&[&wf.id(), step, kind, "timed_out"])
                .inc();
        }
    }

    /// After a commit: send new outbox entries, wake the timer loop if the commit's earliest
    /// timer (`earliest_timer`, Unix ms) is due before the loop would look again.
    fn after_commit(
        self: &Arc<Self>,
        run_id: &str,
        state: &RunState,
        wf: &Workflow,
        earliest_timer: Option<u64>,
    ) {
        if state.status == RunStatus::Compensating {
            self.failpoint.hit("during-compensation");
        }
        let dispatches = state.dispatches();
        if !dispatches.is_empty() {
            self.failpoint.hit("after-commit-before-dispatch");
        }
        for d in dispatches {
            self.spawn_dispatch(
                run_id.to_string(),
                d,
                state.traceparent.clone(),
                Some(wf.max_payload_bytes()),
            );
        }
        let planned = self
            .timers_planned_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        if earliest_timer.is_some_and(|due| due < planned) {
            self.timers_changed.notify_one();
        }
    }

    /// Sends `d` in a task of its own and records its outcome; `max_payload` is the run's
    /// definition's limit (read from the store when `None`).
    fn spawn_dispatch(
        self: &Arc<Self>,
        run_id: String,
        d: Dispatch,
        traceparent: String,
        max_payload: Option<u64>,
    ) {
        let key = (run_id.clone(), d.key());
        if !self
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.wait_for_sidecar().await;
            let limit = match max_payload {
                Some(limit) => limit,
                None => match this.store.run(&run_id).await {
                    Ok(Some(row)) => this
                        .definition(&row.workflow, row.version)
                        .await
                        .map_or(1 << 20, |wf| wf.max_payload_bytes()),
                    _ => 1 << 20,
                },
            };
            let outcome = this.call(&run_id, &d, &traceparent, limit).await;
            if let Some(outcome) = outcome {
                this.failpoint.hit("after-dispatch-before-result");
                let input = Input::AttemptResult {
                    step: d.step.clone(),
                    attempt: d.attempt,
                    compensation: d.compensation,
                    outcome,
                };
                let mut tries = 0;
                while let Err(e) = this.handle(&run_id, input.clone()).await {
                    tries += 1;
                    tracing::warn!(run = %run_id, step = %d.step, "cannot record the attempt result: {e}");
                    if tries >= 5 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
            }
            this.sending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }

    /// Sends one attempt. `None` when the attempt's deadline passed first: its timer decides
    /// (the outcome is unknown, not a failure). A call that provably never left the coordinator's
    /// sidecar (no connection to it, or a `meshflow-proxy-error` in [`NOT_SENT_PROXY_ERRORS`])
    /// is sent again with backoff (50 ms doubling to 1 s) while the attempt's deadline allows;
    /// only the last such answer before the deadline is recorded, as a known failure.
    async fn call(
        &self,
        run_id: &str,
        d: &Dispatch,
        traceparent: &str,
        max_payload: u64,
    ) -> Option<AttemptOutcome> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.send_once(run_id, d, traceparent, max_payload).await {
                SendResult::Outcome(outcome) => return Some(outcome),
                SendResult::DeadlinePassed => return None,
                SendResult::Unsent(outcome) => {
                    let left = d.deadline_ms.saturating_sub(self.now());
                    if backoff.as_millis() as u64 >= left {
                        return Some(outcome);
                    }
                    tracing::debug!(run = run_id, step = %d.step, attempt = d.attempt, ?outcome, "call not sent; sending again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn send_once(
        &self,
        run_id: &str,
        d: &Dispatch,
        traceparent: &str,
        max_payload: u64,
    ) -> SendResult {
        let now = self.now();
        let left = d.deadline_ms.saturating_sub(now);
        if left == 0 {
            return SendResult::DeadlinePassed;
        }
        let r = &d.request;
        let url = format!("http://{}.{}{}", r.service, r.namespace, r.path);
        let method =
            reqwest::Method::from_bytes(r.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        let key = if d.compensation {
            format!("{run_id}/{}/compensate", d.step)
        } else {
            format!("{run_id}/{}", d.step)
        };
        let open_for = left + LATE_RESULT_GRACE.as_millis() as u64;
        let mut request = self
            .client()
            .request(method, &url)
            // The attempt's timer decides the timeout; the call stays open LATE_RESULT_GRACE
            // longer so that a late answer (or one read after this process was paused) is
            // still recorded.
            .timeout(Duration::from_millis(open_for))
            .header("idempotency-key", key)
            .header(
                "traceparent",
                crate::trace::attempt_traceparent(
                    traceparent,
                    run_id,
                    &d.step,
                    d.attempt,
                    d.compensation,
                )
                .unwrap_or_else(|| crate::trace::run_traceparent(run_id, None, 0.0)),
            )
            .header("meshflow-run-id", run_id)
            .header("meshflow-coordinator", &self.settings.node)
            .header("meshflow-step", &d.step)
            .header("meshflow-attempt", d.attempt.to_string())
            // Never shorter than the attempt's own deadline (see LATE_RESULT_GRACE), but the
            // sidecar starts no retry of it after that deadline: from then on the next attempt
            // (or the saga) is the coordinator's decision.
            .header("meshflow-timeout-ms", open_for.to_string())
            .header(RETRY_DEADLINE_HEADER, left.to_string());
        for (k, v) in &r.headers {
            request = request.header(k, v);
        }
        if let Some(body) = &r.body {
            request = request.json(body);
        }
        self.metrics
            .dispatch_lag
            .observe(now.saturating_sub(d.started_ms) as f64 / 1000.0);
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => return SendResult::DeadlinePassed,
            // Every call goes through the sidecar: no connection means nothing was sent (and
            // the sidecar may have restarted on another port).
            Err(e) if e.is_connect() && self.has_sidecar() => {
                self.refresh_outbound();
                return SendResult::Unsent(AttemptOutcome::Error {
                    message: format!("the coordinator's sidecar is unreachable: {e}"),
                });
            }
            Err(e) => {
                return SendResult::Outcome(AttemptOutcome::Error {
                    message: e.to_string(),
                })
            }
        };
        let status = response.status().as_u16();
        let proxy_error = response
            .headers()
            .get(PROXY_ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let not_sent = proxy_error
            .as_deref()
            .is_some_and(|v| NOT_SENT_PROXY_ERRORS.contains(&v));
        if proxy_error.as_deref() == Some("timeout") {
            // A route timeout in the sidecar (TrafficPolicy), not the service's answer: what the
            // service did is unknown.
            return SendResult::Outcome(AttemptOutcome::Error {
                message: format!(
                    "the coordinator's sidecar timed the call out (HTTP {status}); outcome unknown"
                ),
            });
        }
        let mut response = response;
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    body.extend_from_slice(&chunk);
                    // Too large to keep in the history: the attempt fails and is not retried.
                    if body.len() as u64 > max_payload {
                        return SendResult::Outcome(AttemptOutcome::Response {
                            status: 413,
                            body: serde_json::json!({"meshflowPayloadLimit": max_payload, "status": status}),
                        });
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return SendResult::DeadlinePassed,
                Err(e) => {
                    return SendResult::Outcome(AttemptOutcome::Error {
                        message: e.to_string(),
                    })
                }
            }
        }
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        let outcome = AttemptOutcome::Response { status, body };
        if not_sent {
            SendResult::Unsent(outcome)
        } else {
            SendResult::Outcome(outcome)
        }
    }

    /// After a start or a crash: re-sends every outbox entry.
    ///
    /// # Errors
    /// Store errors.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, CoordinatorError> {
        // Runs this node held before it stopped: re-send their calls. Runs taken over from
        // others are left to their deadlines (see `run_leases`).
        let mine: HashSet<String> = self
            .store
            .owned_by(&self.settings.node)
            .await?
            .into_iter()
            .collect();
        self.renew().await?;
        let entries = self
            .store
            .outbox(100_000, Some(&self.settings.node))
            .await?;
        let mut n = 0;
        for entry in entries {
            if !mine.contains(&entry.run_id) {
                continue;
            }
            let Ok(d) = serde_json::from_str::<Dispatch>(&entry.dispatch) else {
                continue;
            };
            // The time this node was down does not count against the attempt: its deadline moves
            // to a fresh per-attempt timeout (a durable event), and the commit dispatches it.
            let resend = Input::Resend {
                step: d.step.clone(),
                attempt: d.attempt,
                compensation: d.compensation,
            };
            if let Err(e) = self.handle(&entry.run_id, resend).await {
                tracing::warn!(run = %entry.run_id, step = %d.step, "cannot move the deadline of a call in flight at the last stop: {e}");
            }
            let traceparent = match self.store.run(&entry.run_id).await? {
                Some(row) => serde_json::from_str::<RunState>(&row.state)
                    .map(|s| s.traceparent)
                    .unwrap_or_default(),
                None => continue,
            };
            // Already dispatched by the commit above unless the deadline did not move.
            self.spawn_dispatch(entry.run_id, d, traceparent, None);
            n += 1;
        }
        Ok(n)
    }

    /// Fires due timers until the process ends (wakes early when timers change).
    pub async fn run_timers(self: Arc<Self>) {
        // Overdue timers (attempt deadlines, backoffs) start new attempts: not before the
        // sidecar can carry them.
        self.wait_for_sidecar().await;
        let mut last_gauges = 0;
        loop {
            // Looking now. A timer committed after the query below read the table is missed
            // by this look, and the next look comes at most 1 s after this one's plan: so a
            // commit now wakes the loop again for a timer due within 2 s (a backoff, a short
            // sleep), not for one due later (an attempt's deadline) — waking it for every
            // commit kept it looking without pause at thousands of commits per second.
            self.timers_planned_ms.store(
                self.now() + 2 * TIMER_LOOK_MAX_MS,
                std::sync::atomic::Ordering::SeqCst,
            );
            let now = self.now();
            if now >= last_gauges + 1000 {
                last_gauges = now;
                if let Ok((runs, timers)) = self.store.counts().await {
                    self.metrics.runs_in_flight.set(runs as i64);
                    self.metrics.timers_pending.set(timers as i64);
                }
            }
            match self
                .store
                .due_timers(now, 500, Some(&self.settings.node))
                .await
            {
                Ok(due) => {
                    for t in due {
                        let Ok(timer) = serde_json::from_str::<Timer>(&t.timer) else {
                            continue;
                        };
                        let this = self.clone();
                        if let Err(e) = this
                            .handle(&t.run_id, Input::TimerFired(timer.clone()))
                            .await
                        {
                            // Push it back so one broken run cannot starve every other timer.
                            tracing::warn!(run = %t.run_id, "timer failed, retried in 5 s: {e}");
                            let _ = self
                                .store
                                .defer_timer(&t.run_id, &timer.key(), self.now() + 5_000)
                                .await;
                        }
                    }
                }
                Err(e) => tracing::warn!("timers: {e}"),
            }
            let next = self
                .store
                .next_timer(Some(&self.settings.node))
                .await
                .ok()
                .flatten();
            let wait = next.map_or(Duration::from_millis(TIMER_LOOK_MAX_MS), |due| {
                Duration::from_millis(due.saturating_sub(self.now()).clamp(5, TIMER_LOOK_MAX_MS))
            });
            // A commit that read the value above and notified left a permit (the wait below
            // ends at once); one that reads this plan wakes the loop only for an earlier timer.
            self.timers_planned_ms.store(
                self.now() + wait.as_millis() as u64,
                std::sync::atomic::Ordering::SeqCst,
            );
            let _ = tokio::time::timeout(wait, self.timers_changed.notified()).await;
        }
    }

    /// Deletes finished runs older than the retention, hourly.
    pub async fn run_retention(self: Arc<Self>) {
        loop {
            let cutoff = self
                .now()
                .saturating_sub(self.settings.retention.as_millis() as u64);
            match self.store.purge_finished(cutoff).await {
                Ok(n) if n > 0 => tracing::info!(runs = n, "deleted finished runs past retention"),
                Ok(_) => {}
                Err(e) => tracing::warn!("retention: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

/// An HTTP client whose plain-HTTP requests go through the sidecar at `outbound` (as an HTTP
/// proxy), or directly without one.
fn client_through(outbound: Option<&str>) -> reqwest::Client {
    let mut http = reqwest::Client::builder().pool_max_idle_per_host(32);
    if let Some(outbound) = outbound {
        if let Ok(proxy) = reqwest::Proxy::http(format!("http://{outbound}")) {
            http = http.proxy(proxy);
        }
    }
    http.build().unwrap_or_default()
}

/// What one send of an attempt came to.
enum SendResult {
    /// An answer (or a failure after the request may have reached the service).
    Outcome(AttemptOutcome),
    /// Provably never reached a service; what is known about why.
    Unsent(AttemptOutcome),
    /// The attempt's deadline passed first (its timer decides).
    DeadlinePassed,
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A fresh run id (128 random bits, hex).
pub fn new_run_id() -> String {
    random_hex(16)
}

/// Runs CPU work — definition validation, `when` conditions and templates in
/// [`engine::decide`] — on a blocking thread, so the async I/O threads (the API, `/ready`,
/// the CA and config server in the same process) keep answering meanwhile. A panic in `work`
/// is resumed here.
/// The outcome of a task running coordinator work; a panic goes on in the caller.
async fn join<T>(
    task: tokio::task::JoinHandle<Result<T, CoordinatorError>>,
) -> Result<T, CoordinatorError> {
    match task.await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(CoordinatorError::Conflict(format!(
            "the coordinator is shutting down: {e}"
        ))),
    }
}

async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CoordinatorError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Ok(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(CoordinatorError::Conflict(format!(
            "the coordinator is shutting down: {e}"
        ))),
    }
}
