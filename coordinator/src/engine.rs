//! The workflow engine as a pure state machine: an input (a step result, a fired timer, a
//! signal, an operator command) and the current [`RunState`] give the [`Event`]s to append;
//! folding events with [`RunState::apply`] gives the next state. Nothing here does I/O or reads
//! a clock: the driver passes `now_ms` (Unix ms), so every decision replays exactly.
//!
//! What the driver must do is derived from the state, not stored separately:
//! [`RunState::dispatches`] (calls to send: every attempt started and not yet resolved) and
//! [`RunState::timers`] (deadlines, backoffs, sleeps, signal timeouts, the run timeout). The
//! store writes the events, the state, the dispatches (outbox) and the timers in one
//! transaction before any effect.

use std::collections::BTreeMap;

use meshflow_policies::workflow::{
    evaluate_condition, render_str, render_value, OnTimeout, Workflow,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Run statuses. Terminal: every one but `Running`, `Compensating`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum RunStatus {
    /// Steps are running or waiting.
    Running,
    /// A step failed for good (or the run was cancelled or timed out): compensations run.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed for good and there was nothing to compensate.
    Failed,
    /// A step failed for good; the compensations all ran.
    Compensated,
    /// A compensation failed for good (the run names the step).
    CompensationFailed,
    /// Cancelled by an operator; compensations ran.
    Cancelled,
    /// Terminated by an operator; nothing else ran.
    Terminated,
    /// The workflow timeout passed; compensations ran.
    TimedOut,
    /// The run reached its history limit.
    HistoryLimitExceeded,
}

impl RunStatus {
    /// Whether the run is finished.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Compensating)
    }

    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 10] = [
        RunStatus::Running,
        RunStatus::Compensating,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Compensated,
        RunStatus::CompensationFailed,
        RunStatus::Cancelled,
        RunStatus::Terminated,
        RunStatus::TimedOut,
        RunStatus::HistoryLimitExceeded,
    ];

    /// The name used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "Running",
            RunStatus::Compensating => "Compensating",
            RunStatus::Completed => "Completed",
            RunStatus::Failed => "Failed",
            RunStatus::Compensated => "Compensated",
            RunStatus::CompensationFailed => "CompensationFailed",
            RunStatus::Cancelled => "Cancelled",
            RunStatus::Terminated => "Terminated",
            RunStatus::TimedOut => "TimedOut",
            RunStatus::HistoryLimitExceeded => "HistoryLimitExceeded",
        }
    }
}

/// Step statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    /// Not started (dependencies pending).
    Pending,
    /// A call attempt is in flight.
    Running,
    /// Waiting out a retry backoff.
    Backoff,
    /// A `sleep` timer is pending.
    Sleeping,
    /// Waiting for a signal.
    Waiting,
    /// Done; `output` holds the result.
    Completed,
    /// `when` was false.
    Skipped,
    /// Failed for good.
    Failed,
    /// Its compensation completed.
    Compensated,
}

/// A rendered HTTP call, as dispatched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedCall {
    /// Destination service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers (the driver adds the idempotency key and tracing headers).
    pub headers: BTreeMap<String, String>,
    /// JSON body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// How an attempt ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// An HTTP response: `status` and the body (JSON if it parses, else a string).
    Response {
        /// Status code.
        status: u16,
        /// Body.
        body: Value,
    },
    /// No response (connect error, reset, the driver's own timeout).
    Error {
        /// What happened.
        message: String,
    },
}

/// One history event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// The run began.
    RunStarted {
        /// Workflow `namespace/name`.
        workflow: String,
        /// Definition version pinned for the run.
        version: u32,
        /// Run input.
        input: Value,
        /// W3C `traceparent` of the run (one trace across restarts).
        traceparent: String,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// A step's `when` was false.
    StepSkipped {
        /// Step.
        step: String,
        /// When, Unix ms (0 in histories written before it was recorded).
        #[serde(default)]
        at_ms: u64,
    },
    /// A step started (`call`: see `AttemptStarted`; `sleep`: until `until_ms`; wait).
    StepStarted {
        /// Step.
        step: String,
        /// When, Unix ms.
        at_ms: u64,
        /// For `sleep`: when it ends; for a wait with a timeout: when it times out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_ms: Option<u64>,
    },
    /// An attempt of a call (or of a compensation) was sent for dispatch.
    AttemptStarted {
        /// Step.
        step: String,
        /// 1-based attempt number.
        attempt: u32,
        /// Whether this is the step's compensation.
        compensation: bool,
        /// The request.
        request: RenderedCall,
        /// When the attempt times out, Unix ms.
        deadline_ms: u64,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// An attempt ended (response or error).
    AttemptEnded {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// The outcome.
        outcome: AttemptOutcome,
        /// Whether the outcome counts as success.
        succeeded: bool,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// The coordinator restarted with this attempt in flight and sends it again (same
    /// idempotency key); its deadline moves to `deadline_ms`, so time the coordinator was down
    /// does not count against the attempt.
    AttemptResent {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// The attempt's new deadline, Unix ms.
        deadline_ms: u64,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// An attempt passed its deadline with no result (outcome unknown).
    AttemptTimedOut {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// A result arrived for an attempt that was already resolved (timed out): recorded only.
    LateResult {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// The outcome that arrived.
        outcome: AttemptOutcome,
        /// When, Unix ms (0 in histories written before it was recorded).
        #[serde(default)]
        at_ms: u64,
    },
    /// The next attempt waits until `until_ms`.
    RetryScheduled {
        /// Step.
        step: String,
        /// The attempt that will be sent.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// When the next attempt may start, Unix ms.
        until_ms: u64,
        /// When, Unix ms (0 in histories written before it was recorded).
        #[serde(default)]
        at_ms: u64,
    },
    /// A step completed.
    StepCompleted {
        /// Step.
        step: String,
        /// Its output.
        output: Value,
        /// For a `waitForSignal` step: the signal it used (taken off the queue).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// A step failed for good.
    StepFailed {
        /// Step.
        step: String,
        /// Why.
        error: String,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// A signal arrived (kept even when no step waits for it yet).
    SignalReceived {
        /// Signal name.
        name: String,
        /// Payload.
        payload: Value,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// Compensation began; the run will end with `then`.
    CompensationStarted {
        /// Steps to compensate, in order (reverse completion order).
        steps: Vec<String>,
        /// The final status once every compensation has run.
        then: RunStatus,
        /// Why.
        reason: String,
        /// When, Unix ms (0 in histories written before it was recorded).
        #[serde(default)]
        at_ms: u64,
    },
    /// A step's compensation completed.
    StepCompensated {
        /// Step.
        step: String,
        /// When, Unix ms (0 in histories written before it was recorded).
        #[serde(default)]
        at_ms: u64,
    },
    /// The run finished.
    RunFinished {
        /// Final status.
        status: RunStatus,
        /// Run output (Completed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
        /// Last error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// An operator asked to retry the failed step (or compensation).
    RetryRequested {
        /// When, Unix ms.
        at_ms: u64,
    },
}

/// An input to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A dispatched attempt ended.
    AttemptResult {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
        /// Outcome.
        outcome: AttemptOutcome,
    },
    /// A timer became due.
    TimerFired(Timer),
    /// A signal.
    Signal {
        /// Name.
        name: String,
        /// Payload.
        payload: Value,
    },
    /// Cancel (compensates).
    Cancel,
    /// Terminate (does not compensate).
    Terminate,
    /// Retry a failed run from its failed step (or a failed compensation).
    Retry,
    /// Re-evaluate (after start): starts ready steps.
    Advance,
    /// After the coordinator's restart: this in-flight attempt is sent again with a fresh
    /// per-attempt deadline (never shorter than the one it had; within the step's total).
    Resend {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
    },
}

/// A durable timer, derived from the state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Timer {
    /// An attempt's deadline.
    AttemptDeadline {
        /// Step.
        step: String,
        /// Attempt.
        attempt: u32,
        /// Compensation?
        compensation: bool,
    },
    /// A retry backoff ends.
    Backoff {
        /// Step.
        step: String,
        /// Compensation?
        compensation: bool,
    },
    /// A sleep ends.
    Sleep {
        /// Step.
        step: String,
    },
    /// A signal wait times out.
    WaitTimeout {
        /// Step.
        step: String,
    },
    /// The workflow timeout.
    RunDeadline,
}

impl Timer {
    /// A stable key for the store.
    pub fn key(&self) -> String {
        match self {
            Timer::AttemptDeadline {
                step,
                attempt,
                compensation,
            } => {
                format!("deadline/{step}/{attempt}/{}", u8::from(*compensation))
            }
            Timer::Backoff { step, compensation } => {
                format!("backoff/{step}/{}", u8::from(*compensation))
            }
            Timer::Sleep { step } => format!("sleep/{step}"),
            Timer::WaitTimeout { step } => format!("wait/{step}"),
            Timer::RunDeadline => "run".into(),
        }
    }
}

/// A call to send (the outbox), derived from the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Step.
    pub step: String,
    /// Attempt.
    pub attempt: u32,
    /// Compensation?
    pub compensation: bool,
    /// The request.
    pub request: RenderedCall,
    /// Deadline, Unix ms.
    pub deadline_ms: u64,
    /// When the attempt was committed, Unix ms (dispatch lag counts from here).
    pub started_ms: u64,
}

impl Dispatch {
    /// A stable key for the store.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.step,
            self.attempt,
            u8::from(self.compensation)
        )
    }
}

/// One attempt as the run view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: u32,
    /// Compensation?
    pub compensation: bool,
    /// Started, Unix ms.
    pub started_ms: u64,
    /// Ended, Unix ms (none while in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// HTTP status, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `ok`, `failed`, `timed-out`, `in-flight`.
    pub result: String,
    /// Error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// In-flight attempt (main call or compensation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    attempt: u32,
    request: RenderedCall,
    deadline_ms: u64,
    started_ms: u64,
}

/// One step's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    /// Status.
    pub status: StepStatus,
    /// Output once completed.
    // Always written: `null` and absent must read back the same (state round-trips JSON).
    #[serde(default)]
    pub output: Option<Value>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts (calls and compensations).
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// Started, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Completion order (for compensation), 1-based.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_seq: Option<u64>,
    /// Some main attempt timed out (its outcome is unknown).
    #[serde(default)]
    pub unknown_outcome: bool,
    /// Timer end (sleep, wait timeout, backoff), Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    in_flight: Option<InFlight>,
    comp_in_flight: Option<InFlight>,
    comp_attempts: u32,
    comp_backoff_until: Option<u64>,
    /// Main attempts made before the last operator retry (attempt numbers keep increasing;
    /// `maxAttempts` counts from here).
    #[serde(default)]
    retry_base: u32,
}

impl StepState {
    fn new() -> Self {
        Self {
            status: StepStatus::Pending,
            output: None,
            error: None,
            attempts: Vec::new(),
            started_ms: None,
            completed_seq: None,
            unknown_outcome: false,
            until_ms: None,
            in_flight: None,
            comp_in_flight: None,
            comp_attempts: 0,
            comp_backoff_until: None,
            retry_base: 0,
        }
    }

    /// Ends attempt `attempt` (of the call or the compensation): nothing is in flight any
    /// more; returns its record.
    fn resolve(&mut self, attempt: u32, compensation: bool) -> Option<&mut AttemptRecord> {
        if compensation {
            self.comp_in_flight = None;
        } else {
            self.in_flight = None;
        }
        self.attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == attempt && a.compensation == compensation)
    }

    fn main_attempts(&self) -> u32 {
        self.attempts.iter().filter(|a| !a.compensation).count() as u32
    }
}

/// Compensation in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compensation {
    /// Remaining steps, in order.
    pub remaining: Vec<String>,
    /// The final status.
    pub then: RunStatus,
    /// A compensation failed for good.
    pub failed_step: Option<String>,
}

/// A run's state: the fold of its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// Workflow `namespace/name`.
    pub workflow: String,
    /// Pinned definition version.
    pub version: u32,
    /// Status.
    pub status: RunStatus,
    /// Input.
    pub input: Value,
    /// Output (Completed).
    // Always written: `null` and absent must read back the same (state round-trips JSON).
    #[serde(default)]
    pub output: Option<Value>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Run `traceparent`.
    pub traceparent: String,
    /// Started, Unix ms.
    pub started_ms: u64,
    /// Finished, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Steps by name.
    pub steps: BTreeMap<String, StepState>,
    /// Signals received and not yet used, by name (FIFO).
    pub signals: BTreeMap<String, Vec<Value>>,
    /// Signals used, by name (latest payload), readable as `signals.<name>`.
    pub used_signals: BTreeMap<String, Value>,
    /// Compensation in progress or done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Compensation>,
    /// Events in the history.
    pub events: u64,
    completions: u64,
    /// The workflow timeout counts from here (the start, or the last operator retry).
    #[serde(default)]
    timeout_from_ms: u64,
}

/// Whether a response status is a success (2xx).
fn success(status: u16) -> bool {
    (200..300).contains(&status)
}

impl RunState {
    /// The state after `RunStarted` (the first event of every history).
    ///
    /// # Panics
    /// Never; a history that does not start with `RunStarted` gives an empty run.
    pub fn replay(workflow: &Workflow, events: &[Event]) -> Option<Self> {
        let Some(Event::RunStarted {
            workflow: id,
            version,
            input,
            traceparent,
            at_ms,
        }) = events.first()
        else {
            return None;
        };
        let mut state = RunState {
            workflow: id.clone(),
            version: *version,
            status: RunStatus::Running,
            input: input.clone(),
            output: None,
            error: None,
            traceparent: traceparent.clone(),
            started_ms: *at_ms,
            finished_ms: None,
            steps: workflow
                .spec
                .steps
                .iter()
                .map(|s| (s.name.clone(), StepState::new()))
                .collect(),
            signals: BTreeMap::new(),
            used_signals: BTreeMap::new(),
            compensation: None,
            events: 1,
            completions: 0,
            timeout_from_ms: *at_ms,
        };
        for event in &events[1..] {
            state.apply(event);
        }
        Some(state)
    }

    /// Folds one event into the state (no decisions).
    pub fn apply(&mut self, event: &Event) {
        self.events += 1;
        match event {
            Event::RunStarted { .. } => {}
            Event::StepSkipped { step, .. } => {
                if let Some(s) = self.steps.get_mut(step) {
                    s.status = StepStatus::Skipped;
                }
            }
            Event::StepStarted {
                step,
                at_ms,
                until_ms,
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    s.started_ms = Some(*at_ms);
                    s.until_ms = *until_ms;
                    s.status = StepStatus::Running;
                }
            }
            Event::AttemptStarted {
                step,
                attempt,
                compensation,
                request,
                deadline_ms,
                at_ms,
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    let flight = InFlight {
                        attempt: *attempt,
                        request: request.clone(),
                        deadline_ms: *deadline_ms,
                        started_ms: *at_ms,
                    };
                    if *compensation {
                        s.comp_in_flight = Some(flight);
                        s.comp_attempts = *attempt;
                        s.comp_backoff_until = None;
                    } else {
                        s.in_flight = Some(flight);
                        s.status = StepStatus::Running;
                        s.until_ms = None;
                        s.started_ms.get_or_insert(*at_ms);
                    }
                    s.attempts.push(AttemptRecord {
                        attempt: *attempt,
                        compensation: *compensation,
                        started_ms: *at_ms,
                        ended_ms: None,
                        status: None,
                        result: "in-flight".into(),
                        error: None,
                    });
                }
            }
            Event::AttemptEnded {
                step,
                attempt,
                compensation,
                outcome,
                succeeded,
                at_ms,
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    // `unknown_outcome` stays set once any attempt timed out: that attempt may
                    // have taken effect, so the step is compensated on failure.
                    let mut error = None;
                    if let Some(a) = s.resolve(*attempt, *compensation) {
                        a.ended_ms = Some(*at_ms);
                        a.result = if *succeeded { "ok" } else { "failed" }.into();
                        match outcome {
                            AttemptOutcome::Response { status, body } => {
                                a.status = Some(*status);
                                if !succeeded {
                                    a.error = Some(format!(
                                        "HTTP {status}: {}",
                                        truncate(&body.to_string(), 256)
                                    ));
                                }
                            }
                            AttemptOutcome::Error { message } => a.error = Some(message.clone()),
                        }
                        error = a.error.clone();
                    }
                    if !succeeded && error.is_some() {
                        s.error = error;
                    }
                }
            }
            Event::AttemptResent {
                step,
                attempt,
                compensation,
                deadline_ms,
                ..
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    let flight = if *compensation {
                        s.comp_in_flight.as_mut()
                    } else {
                        s.in_flight.as_mut()
                    };
                    if let Some(f) = flight.filter(|f| f.attempt == *attempt) {
                        f.deadline_ms = *deadline_ms;
                    }
                }
            }
            Event::AttemptTimedOut {
                step,
                attempt,
                compensation,
                at_ms,
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    if !*compensation {
                        s.unknown_outcome = true;
                    }
                    if let Some(a) = s.resolve(*attempt, *compensation) {
                        a.ended_ms = Some(*at_ms);
                        a.result = "timed-out".into();
                        a.error = Some("attempt timed out; outcome unknown".into());
                    }
                    s.error = Some(format!("attempt {attempt} timed out"));
                }
            }
            Event::LateResult {
                step,
                attempt,
                compensation,
                outcome,
                ..
            } => {
                // What arrived is recorded on the attempt it belongs to.
                if let Some(a) = self.steps.get_mut(step).and_then(|s| {
                    s.attempts
                        .iter_mut()
                        .rev()
                        .find(|a| a.attempt == *attempt && a.compensation == *compensation)
                }) {
                    match outcome {
                        AttemptOutcome::Response { status, .. } => {
                            a.status = Some(*status);
                            a.result = format!("late: HTTP {status}");
                        }
                        AttemptOutcome::Error { message } => {
                            a.result = format!("late: {}", truncate(message, 256));
                        }
                    }
                }
            }
            Event::RetryScheduled {
                step,
                compensation,
                until_ms,
                ..
            } => {
                if let Some(s) = self.steps.get_mut(step) {
                    if *compensation {
                        s.comp_backoff_until = Some(*until_ms);
                    } else {
                        s.status = StepStatus::Backoff;
                        s.until_ms = Some(*until_ms);
                    }
                }
            }
            Event::StepCompleted {
                step,
                output,
                signal,
                ..
            } => {
                if let Some(name) = signal {
                    if let Some(queue) = self.signals.get_mut(name) {
                        if !queue.is_empty() {
                            let payload = queue.remove(0);
                            self.used_signals.insert(name.clone(), payload);
                        }
                    }
                }
                self.completions += 1;
                let seq = self.completions;
                if let Some(s) = self.steps.get_mut(step) {
                    // Completed by a late success of an earlier attempt: a later attempt still
                    // in flight is no longer waited for (its answer, if any, is a late result).
                    if let Some(flight) = s.in_flight.take() {
                        if let Some(a) = s
                            .attempts
                            .iter_mut()
                            .rev()
                            .find(|a| a.attempt == flight.attempt && !a.compensation)
                        {
                            a.result = "superseded".into();
                        }
                    }
                    s.status = StepStatus::Completed;
                    s.output = Some(output.clone());
                    s.completed_seq = Some(seq);
                    s.until_ms = None;
                    s.error = None;
                }
            }
            Event::StepFailed { step, error, .. } => {
                if let Some(s) = self.steps.get_mut(step) {
                    s.status = StepStatus::Failed;
                    s.error = Some(error.clone());
                    s.until_ms = None;
                }
                self.error = Some(format!("step {step}: {error}"));
            }
            Event::SignalReceived { name, payload, .. } => {
                self.signals
                    .entry(name.clone())
                    .or_default()
                    .push(payload.clone());
            }
            Event::CompensationStarted {
                steps,
                then,
                reason,
                ..
            } => {
                self.status = RunStatus::Compensating;
                self.compensation = Some(Compensation {
                    remaining: steps.clone(),
                    then: *then,
                    failed_step: None,
                });
                if self.error.is_none() {
                    self.error = Some(reason.clone());
                }
            }
            Event::StepCompensated { step, .. } => {
                if let Some(s) = self.steps.get_mut(step) {
                    s.status = StepStatus::Compensated;
                }
                if let Some(c) = &mut self.compensation {
                    c.remaining.retain(|r| r != step);
                }
            }
            Event::RunFinished {
                status,
                output,
                error,
                at_ms,
            } => {
                self.status = *status;
                self.output = output.clone();
                if error.is_some() {
                    self.error = error.clone();
                }
                self.finished_ms = Some(*at_ms);
                if *status == RunStatus::CompensationFailed {
                    if let Some(c) = &mut self.compensation {
                        c.failed_step = c.remaining.first().cloned();
                    }
                }
                for s in self.steps.values_mut() {
                    s.in_flight = None;
                    s.comp_in_flight = None;
                }
            }
            Event::RetryRequested { at_ms } => match self.status {
                RunStatus::Failed => {
                    self.status = RunStatus::Running;
                    self.finished_ms = None;
                    self.error = None;
                    self.timeout_from_ms = *at_ms;
                    for s in self.steps.values_mut() {
                        if !matches!(
                            s.status,
                            StepStatus::Completed | StepStatus::Skipped | StepStatus::Compensated
                        ) {
                            s.status = StepStatus::Pending;
                            s.retry_base = s.main_attempts();
                            s.error = None;
                            s.until_ms = None;
                            s.in_flight = None;
                            s.started_ms = None;
                        }
                    }
                }
                RunStatus::CompensationFailed => {
                    self.status = RunStatus::Compensating;
                    self.finished_ms = None;
                    if let Some(s) = self
                        .compensation
                        .as_ref()
                        .and_then(|c| c.remaining.first())
                        .and_then(|n| self.steps.get_mut(n))
                    {
                        s.comp_attempts = 0;
                    }
                }
                _ => {}
            },
        }
    }

    /// Calls to send: every attempt started and not resolved (the outbox).
    pub fn dispatches(&self) -> Vec<Dispatch> {
        if self.status.is_terminal() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (name, s) in &self.steps {
            for (flight, compensation) in [(&s.in_flight, false), (&s.comp_in_flight, true)] {
                if let Some(f) = flight {
                    out.push(Dispatch {
                        step: name.clone(),
                        attempt: f.attempt,
                        compensation,
                        request: f.request.clone(),
                        deadline_ms: f.deadline_ms,
                        started_ms: f.started_ms,
                    });
                }
            }
        }
        out
    }

    /// Pending timers with their due time (Unix ms).
    pub fn timers(&self, workflow: &Workflow) -> Vec<(Timer, u64)> {
        if self.status.is_terminal() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.status == RunStatus::Running {
            if let Some(timeout) = workflow.spec.timeout {
                out.push((
                    Timer::RunDeadline,
                    self.timeout_from_ms.max(self.started_ms) + timeout.get().as_millis() as u64,
                ));
            }
        }
        let running = self.status == RunStatus::Running;
        for (name, s) in &self.steps {
            if let Some(f) = &s.in_flight {
                out.push((
                    Timer::AttemptDeadline {
                        step: name.clone(),
                        attempt: f.attempt,
                        compensation: false,
                    },
                    f.deadline_ms,
                ));
            }
            if let Some(f) = &s.comp_in_flight {
                out.push((
                    Timer::AttemptDeadline {
                        step: name.clone(),
                        attempt: f.attempt,
                        compensation: true,
                    },
                    f.deadline_ms,
                ));
            }
            if let Some(until) = s.comp_backoff_until {
                out.push((
                    Timer::Backoff {
                        step: name.clone(),
                        compensation: true,
                    },
                    until,
                ));
            }
            if !running {
                continue;
            }
            if let (Some(until), Some(step)) = (s.until_ms, workflow.step(name)) {
                match s.status {
                    StepStatus::Backoff => out.push((
                        Timer::Backoff {
                            step: name.clone(),
                            compensation: false,
                        },
                        until,
                    )),
                    StepStatus::Running if step.sleep.is_some() => {
                        out.push((Timer::Sleep { step: name.clone() }, until))
                    }
                    StepStatus::Running if step.wait_for_signal.is_some() => {
                        out.push((Timer::WaitTimeout { step: name.clone() }, until))
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// What a waiting run waits on, for humans.
    pub fn waiting_on(&self, workflow: &Workflow) -> Vec<String> {
        let mut out = Vec::new();
        for (name, s) in &self.steps {
            let Some(step) = workflow.step(name) else {
                continue;
            };
            match s.status {
                StepStatus::Running if step.wait_for_signal.is_some() => {
                    let w = step
                        .wait_for_signal
                        .as_ref()
                        .map(|w| w.name.as_str())
                        .unwrap_or("");
                    out.push(format!("signal {w:?} (step {name})"));
                }
                StepStatus::Running if step.sleep.is_some() => out.push(format!(
                    "timer (step {name} sleeps until {} ms)",
                    s.until_ms.unwrap_or(0)
                )),
                StepStatus::Running => out.push(format!(
                    "call {} (step {name}, attempt {})",
                    step.call.as_ref().map(|c| c.service.as_str()).unwrap_or(""),
                    s.main_attempts()
                )),
                StepStatus::Backoff => out.push(format!(
                    "retry backoff (step {name}, until {} ms)",
                    s.until_ms.unwrap_or(0)
                )),
                _ => {}
            }
        }
        if let Some(c) = &self.compensation {
            if let Some(first) = c.remaining.first() {
                if !self.status.is_terminal() {
                    out.push(format!("compensation of step {first}"));
                }
            }
        }
        out
    }

    /// The CEL context for templates: `input`, `steps`, `signals`, `run`.
    pub fn context(&self, run_id: &str) -> Value {
        let steps: serde_json::Map<String, Value> = self
            .steps
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    json!({
                        "output": s.output.clone().unwrap_or(Value::Null),
                        "status": format!("{:?}", s.status),
                        "attempts": s.main_attempts(),
                    }),
                )
            })
            .collect();
        let mut signals: serde_json::Map<String, Value> =
            self.used_signals.clone().into_iter().collect();
        for (name, queue) in &self.signals {
            if let Some(last) = queue.last() {
                signals.entry(name.clone()).or_insert(last.clone());
            }
        }
        json!({
            "input": self.input,
            "steps": steps,
            "signals": signals,
            "run": {"id": run_id, "workflow": self.workflow, "version": self.version, "startedMs": self.started_ms},
        })
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Everything [`decide`] needs besides the state.
pub struct Ctx<'a> {
    /// The pinned definition.
    pub workflow: &'a Workflow,
    /// Run id.
    pub run_id: &'a str,
    /// Now, Unix ms.
    pub now_ms: u64,
}

/// The events an input produces: the input's own events, then every follow-up (ready steps
/// start, the run finishes, the next compensation starts) until nothing more follows.
pub fn decide(state: &RunState, input: &Input, ctx: &Ctx<'_>) -> Vec<Event> {
    let mut scratch = state.clone();
    let mut out = Vec::new();
    let push = |scratch: &mut RunState, out: &mut Vec<Event>, events: Vec<Event>| {
        for e in events {
            scratch.apply(&e);
            out.push(e);
        }
    };
    let first = on_input(&scratch, input, ctx);
    push(&mut scratch, &mut out, first);
    // Follow-ups until a fixpoint (each round changes at least one step, so this ends).
    for _ in 0..(scratch.steps.len() * 4 + 8) {
        let next = advance(&scratch, ctx);
        if next.is_empty() {
            break;
        }
        push(&mut scratch, &mut out, next);
    }
    let limit = u64::from(ctx.workflow.history_limit());
    if !out.is_empty() && scratch.events > limit && !state.status.is_terminal() {
        // Never truncate silently: the run ends, saying why.
        return vec![Event::RunFinished {
            status: RunStatus::HistoryLimitExceeded,
            output: None,
            error: Some(format!("history limit of {limit} events reached")),
            at_ms: ctx.now_ms,
        }];
    }
    out
}

fn on_input(state: &RunState, input: &Input, ctx: &Ctx<'_>) -> Vec<Event> {
    let now = ctx.now_ms;
    match input {
        Input::Advance => Vec::new(),
        Input::Signal { name, payload } => {
            if state.status != RunStatus::Running {
                return Vec::new();
            }
            vec![Event::SignalReceived {
                name: name.clone(),
                payload: payload.clone(),
                at_ms: now,
            }]
        }
        Input::Terminate => {
            if state.status.is_terminal() {
                return Vec::new();
            }
            vec![Event::RunFinished {
                status: RunStatus::Terminated,
                output: None,
                error: Some("terminated by an operator".into()),
                at_ms: now,
            }]
        }
        Input::Cancel => {
            if state.status != RunStatus::Running {
                return Vec::new();
            }
            start_compensation(
                ctx.workflow,
                state,
                RunStatus::Cancelled,
                "cancelled by an operator",
                now,
            )
        }
        Input::Retry => {
            if matches!(
                state.status,
                RunStatus::Failed | RunStatus::CompensationFailed
            ) {
                vec![Event::RetryRequested { at_ms: now }]
            } else {
                Vec::new()
            }
        }
        Input::TimerFired(timer) => on_timer(state, timer, ctx),
        Input::Resend {
            step,
            attempt,
            compensation,
        } => {
            let (Some(s), Some(def)) = (state.steps.get(step), ctx.workflow.step(step)) else {
                return Vec::new();
            };
            let flight = if *compensation {
                &s.comp_in_flight
            } else {
                &s.in_flight
            };
            let Some(f) = flight.as_ref().filter(|f| f.attempt == *attempt) else {
                return Vec::new();
            };
            if state.status.is_terminal() {
                return Vec::new();
            }
            let deadline = attempt_deadline(def, s, *compensation, now);
            if deadline <= f.deadline_ms {
                return Vec::new();
            }
            vec![Event::AttemptResent {
                step: step.clone(),
                attempt: *attempt,
                compensation: *compensation,
                deadline_ms: deadline,
                at_ms: now,
            }]
        }
        Input::AttemptResult {
            step,
            attempt,
            compensation,
            outcome,
        } => {
            let Some(s) = state.steps.get(step) else {
                return Vec::new();
            };
            let flight = if *compensation {
                &s.comp_in_flight
            } else {
                &s.in_flight
            };
            let current = flight.as_ref().is_some_and(|f| f.attempt == *attempt);
            if !current || state.status.is_terminal() {
                // Arrived after its attempt timed out (or the run ended): recorded. A late
                // *success* of a call is what is known about the step: every attempt carries
                // the same idempotency key, so while the step still waits for a result (in
                // backoff, or a later attempt in flight) the success completes it instead of
                // being dropped and the step failed or compensated for an effect that happened.
                let late = Event::LateResult {
                    step: step.clone(),
                    attempt: *attempt,
                    compensation: *compensation,
                    outcome: outcome.clone(),
                    at_ms: now,
                };
                let waiting = matches!(s.status, StepStatus::Running | StepStatus::Backoff);
                return match outcome {
                    AttemptOutcome::Response { status, body }
                        if success(*status)
                            && !*compensation
                            && waiting
                            && state.status == RunStatus::Running =>
                    {
                        vec![
                            late,
                            Event::StepCompleted {
                                step: step.clone(),
                                output: body.clone(),
                                signal: None,
                                at_ms: now,
                            },
                        ]
                    }
                    _ => vec![late],
                };
            }
            let Some(def) = ctx.workflow.step(step) else {
                return Vec::new();
            };
            let policy = def.retry_policy();
            let (succeeded, retryable, error) = match outcome {
                AttemptOutcome::Response { status, .. } if success(*status) => {
                    (true, false, String::new())
                }
                AttemptOutcome::Response { status, body } => {
                    let too_big = *status == 413 && body.get("meshflowPayloadLimit").is_some();
                    (
                        false,
                        !too_big && policy.retryable(*status),
                        format!("HTTP {status}: {}", truncate(&body.to_string(), 256)),
                    )
                }
                AttemptOutcome::Error { message } => (false, true, message.clone()),
            };
            let mut events = vec![Event::AttemptEnded {
                step: step.clone(),
                attempt: *attempt,
                compensation: *compensation,
                outcome: outcome.clone(),
                succeeded,
                at_ms: now,
            }];
            if succeeded {
                if *compensation {
                    events.push(Event::StepCompensated {
                        step: step.clone(),
                        at_ms: now,
                    });
                } else {
                    let output = match outcome {
                        AttemptOutcome::Response { body, .. } => body.clone(),
                        AttemptOutcome::Error { .. } => Value::Null,
                    };
                    events.push(Event::StepCompleted {
                        step: step.clone(),
                        output,
                        signal: None,
                        at_ms: now,
                    });
                }
                return events;
            }
            if !*compensation && state.status == RunStatus::Compensating {
                // The run is being undone: no retries; the step is compensated anyway.
                return events;
            }
            let mut after = state.clone();
            after.apply(&events[0]);
            events.extend(after_failure(
                &after,
                step,
                *attempt,
                *compensation,
                retryable,
                &error,
                ctx,
            ));
            events
        }
    }
}

/// After a failed or timed-out attempt: schedule a retry or fail for good.
fn after_failure(
    state: &RunState,
    step: &str,
    attempt: u32,
    compensation: bool,
    retryable: bool,
    error: &str,
    ctx: &Ctx<'_>,
) -> Vec<Event> {
    let now = ctx.now_ms;
    let Some(def) = ctx.workflow.step(step) else {
        return Vec::new();
    };
    let policy = def.retry_policy();
    let s = &state.steps[step];
    let total_deadline = (!compensation)
        .then(|| {
            def.total()
                .zip(s.started_ms)
                .map(|(t, start)| start + t.as_millis() as u64)
        })
        .flatten();
    let tries = if compensation {
        attempt
    } else {
        attempt - s.retry_base.min(attempt - 1)
    };
    let wait = policy.backoff(tries).as_millis() as u64;
    let in_time = total_deadline.is_none_or(|d| now + wait < d);
    if retryable && tries < policy.max_attempts && in_time {
        return vec![Event::RetryScheduled {
            step: step.to_string(),
            attempt: attempt + 1,
            compensation,
            until_ms: now + wait,
            at_ms: now,
        }];
    }
    let why = if !retryable {
        format!("not retryable: {error}")
    } else if tries >= policy.max_attempts {
        format!(
            "{tries} of {} attempts failed; last: {error}",
            policy.max_attempts
        )
    } else {
        format!("total timeout reached after {tries} attempts; last: {error}")
    };
    fail_for_good(state, step, compensation, &why, ctx)
}

/// A step (or its compensation) failed for good: the run ends `CompensationFailed` for a
/// compensation; otherwise the step fails and the saga starts.
fn fail_for_good(
    state: &RunState,
    step: &str,
    compensation: bool,
    why: &str,
    ctx: &Ctx<'_>,
) -> Vec<Event> {
    let now = ctx.now_ms;
    if compensation {
        return vec![Event::RunFinished {
            status: RunStatus::CompensationFailed,
            output: None,
            error: Some(format!("compensation of step {step} failed: {why}")),
            at_ms: now,
        }];
    }
    let failed = Event::StepFailed {
        step: step.to_string(),
        error: why.to_string(),
        at_ms: now,
    };
    let mut after = state.clone();
    after.apply(&failed);
    let mut events = vec![failed];
    events.extend(start_compensation(
        ctx.workflow,
        &after,
        RunStatus::Compensated,
        &format!("step {step} failed: {why}"),
        now,
    ));
    events
}

/// Begins the saga: compensations of completed steps and of steps whose last attempt timed
/// out (unknown outcome), in reverse completion order. With nothing to compensate the run ends
/// at once (`Failed` for a failed step, else `then`).
fn start_compensation(
    wf: &Workflow,
    state: &RunState,
    then: RunStatus,
    reason: &str,
    now: u64,
) -> Vec<Event> {
    // Every step that completed or was attempted at all is compensated (an attempt may have
    // taken effect whatever its recorded outcome: a reset after sending, a 502 from a proxy, a
    // response too large to keep). Attempts still in flight are not abandoned: compensation
    // waits for them (see `advance`), so an undo never races the call it undoes.
    let mut events: Vec<Event> = Vec::new();
    let mut candidates: Vec<(u64, String)> = state
        .steps
        .iter()
        .filter(|(_, s)| {
            s.status == StepStatus::Completed
                || s.unknown_outcome
                || s.in_flight.is_some()
                || s.attempts.iter().any(|a| !a.compensation)
        })
        .filter(|(name, _)| wf.step(name).is_some_and(|d| d.compensate.is_some()))
        .map(|(name, s)| (s.completed_seq.unwrap_or(u64::MAX), name.clone()))
        .collect();
    // Reverse completion order; unknown outcomes (never completed) first, being the latest.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let steps: Vec<String> = candidates.into_iter().map(|(_, n)| n).collect();
    let final_status = if then == RunStatus::Compensated && steps.is_empty() {
        RunStatus::Failed
    } else {
        then
    };
    events.push(Event::CompensationStarted {
        steps,
        then: final_status,
        reason: reason.to_string(),
        at_ms: now,
    });
    events
}

fn on_timer(state: &RunState, timer: &Timer, ctx: &Ctx<'_>) -> Vec<Event> {
    let now = ctx.now_ms;
    if state.status.is_terminal() {
        return Vec::new();
    }
    match timer {
        Timer::RunDeadline => {
            if state.status != RunStatus::Running {
                return Vec::new();
            }
            start_compensation(
                ctx.workflow,
                state,
                RunStatus::TimedOut,
                "workflow timeout",
                now,
            )
        }
        Timer::AttemptDeadline {
            step,
            attempt,
            compensation,
        } => {
            let Some(s) = state.steps.get(step) else {
                return Vec::new();
            };
            let flight = if *compensation {
                &s.comp_in_flight
            } else {
                &s.in_flight
            };
            if flight.as_ref().is_none_or(|f| f.attempt != *attempt) {
                return Vec::new();
            }
            let mut events = vec![Event::AttemptTimedOut {
                step: step.clone(),
                attempt: *attempt,
                compensation: *compensation,
                at_ms: now,
            }];
            if !*compensation && state.status == RunStatus::Compensating {
                return events;
            }
            let mut after = state.clone();
            after.apply(&events[0]);
            events.extend(after_failure(
                &after,
                step,
                *attempt,
                *compensation,
                true,
                "attempt timed out",
                ctx,
            ));
            events
        }
        Timer::Backoff { step, compensation } => {
            let Some(s) = state.steps.get(step) else {
                return Vec::new();
            };
            if !*compensation && state.status != RunStatus::Running {
                return Vec::new();
            }
            if *compensation {
                if s.comp_backoff_until.is_none() || s.comp_in_flight.is_some() {
                    return Vec::new();
                }
                return start_attempt(state, step, s.comp_attempts + 1, true, ctx);
            }
            if s.status != StepStatus::Backoff {
                return Vec::new();
            }
            start_attempt(state, step, s.main_attempts() + 1, false, ctx)
        }
        Timer::Sleep { step } => {
            let running = state.status == RunStatus::Running
                && state
                    .steps
                    .get(step)
                    .is_some_and(|s| s.status == StepStatus::Running);
            if !running {
                return Vec::new();
            }
            vec![Event::StepCompleted {
                step: step.clone(),
                output: Value::Null,
                signal: None,
                at_ms: now,
            }]
        }
        Timer::WaitTimeout { step } => {
            let running = state.status == RunStatus::Running
                && state
                    .steps
                    .get(step)
                    .is_some_and(|s| s.status == StepStatus::Running);
            let Some(wait) = ctx
                .workflow
                .step(step)
                .and_then(|s| s.wait_for_signal.as_ref())
            else {
                return Vec::new();
            };
            if !running {
                return Vec::new();
            }
            match wait.on_timeout {
                OnTimeout::Continue => vec![Event::StepCompleted {
                    step: step.clone(),
                    output: Value::Null,
                    signal: None,
                    at_ms: now,
                }],
                OnTimeout::Fail => {
                    let why = format!("no signal {:?} before the timeout", wait.name);
                    fail_for_good(state, step, false, &why, ctx)
                }
            }
        }
    }
}

/// When an attempt of `def` that starts (or is sent again) at `now` times out, Unix ms: its
/// `perAttempt` from now, within the step's `total` for a call (not for a compensation).
fn attempt_deadline(
    def: &meshflow_policies::workflow::Step,
    step: &StepState,
    compensation: bool,
    now: u64,
) -> u64 {
    let deadline = now + def.per_attempt().as_millis() as u64;
    match def.total().filter(|_| !compensation) {
        Some(total) => deadline.min(step.started_ms.unwrap_or(now) + total.as_millis() as u64),
        None => deadline,
    }
}

/// Renders and starts attempt `attempt` of a step's call (or compensation).
fn start_attempt(
    state: &RunState,
    step: &str,
    attempt: u32,
    compensation: bool,
    ctx: &Ctx<'_>,
) -> Vec<Event> {
    let now = ctx.now_ms;
    let Some(def) = ctx.workflow.step(step) else {
        return Vec::new();
    };
    let call = if compensation {
        def.compensate.as_ref()
    } else {
        def.call.as_ref()
    };
    let Some(call) = call else { return Vec::new() };
    let context = state.context(ctx.run_id);
    let rendered = (|| -> Result<RenderedCall, String> {
        let path = match render_str(&call.path, &context).map_err(|e| e.to_string())? {
            Value::String(s) => s,
            other => other.to_string(),
        };
        // A rendered value must not change the target: an absolute path, no spaces or control
        // characters (the sidecar then normalizes it like any request).
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("rendered path {path:?} is not an absolute path"));
        }
        let mut headers = BTreeMap::new();
        for (k, v) in &call.headers {
            let value = match render_str(v, &context).map_err(|e| e.to_string())? {
                Value::String(s) => s,
                other => other.to_string(),
            };
            headers.insert(k.to_ascii_lowercase(), value);
        }
        let body = call
            .body
            .as_ref()
            .map(|b| render_value(b, &context))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(RenderedCall {
            service: call.service.clone(),
            namespace: call
                .namespace
                .clone()
                .unwrap_or_else(|| ctx.workflow.namespace().to_string()),
            method: call.method.to_ascii_uppercase(),
            path,
            headers,
            body,
        })
    })();
    match rendered {
        Ok(request) => {
            // Never already passed when it starts.
            let deadline =
                attempt_deadline(def, &state.steps[step], compensation, now).max(now + 1);
            vec![Event::AttemptStarted {
                step: step.to_string(),
                attempt,
                compensation,
                request,
                deadline_ms: deadline,
                at_ms: now,
            }]
        }
        Err(e) => fail_for_good(
            state,
            step,
            compensation,
            &format!("template error: {e}"),
            ctx,
        ),
    }
}

/// Follow-up decisions on a stable state: start ready steps, consume signals, finish the run,
/// drive the saga.
fn advance(state: &RunState, ctx: &Ctx<'_>) -> Vec<Event> {
    let now = ctx.now_ms;
    match state.status {
        RunStatus::Compensating => {
            let Some(c) = &state.compensation else {
                return Vec::new();
            };
            // Calls still in flight resolve first (a result, or their deadline): an undo must
            // never race the call it undoes.
            if state.steps.values().any(|s| s.in_flight.is_some()) {
                return Vec::new();
            }
            let Some(next) = c.remaining.first() else {
                return vec![Event::RunFinished {
                    status: c.then,
                    output: None,
                    error: None,
                    at_ms: now,
                }];
            };
            let s = &state.steps[next];
            let has_comp = ctx
                .workflow
                .step(next)
                .is_some_and(|d| d.compensate.is_some());
            if !has_comp {
                return vec![Event::StepCompensated {
                    step: next.clone(),
                    at_ms: ctx.now_ms,
                }];
            }
            if s.comp_in_flight.is_some() || s.comp_backoff_until.is_some() {
                return Vec::new();
            }
            // Before the first compensation attempt only (retries come from the backoff timer).
            if s.comp_attempts == 0 {
                return start_attempt(state, next, 1, true, ctx);
            }
            Vec::new()
        }
        RunStatus::Running => {
            let mut events = Vec::new();
            let mut all_done = true;
            for step in &ctx.workflow.spec.steps {
                let s = &state.steps[&step.name];
                match s.status {
                    StepStatus::Completed | StepStatus::Skipped | StepStatus::Compensated => {
                        continue
                    }
                    StepStatus::Failed => return Vec::new(),
                    StepStatus::Pending => {}
                    StepStatus::Running if step.wait_for_signal.is_some() => {
                        all_done = false;
                        let name = &step
                            .wait_for_signal
                            .as_ref()
                            .map(|w| w.name.clone())
                            .unwrap_or_default();
                        if let Some(payload) = state.signals.get(name).and_then(|q| q.first()) {
                            events.push(Event::StepCompleted {
                                step: step.name.clone(),
                                output: payload.clone(),
                                signal: Some(name.clone()),
                                at_ms: now,
                            });
                            return events;
                        }
                        continue;
                    }
                    _ => {
                        all_done = false;
                        continue;
                    }
                }
                all_done = false;
                let ready = step.depends_on.iter().all(|d| {
                    matches!(
                        state.steps[d].status,
                        StepStatus::Completed | StepStatus::Skipped
                    )
                });
                if !ready {
                    continue;
                }
                if let Some(when) = &step.when {
                    match evaluate_condition(when, &state.context(ctx.run_id)) {
                        Ok(true) => {}
                        Ok(false) => {
                            events.push(Event::StepSkipped {
                                step: step.name.clone(),
                                at_ms: ctx.now_ms,
                            });
                            return events;
                        }
                        Err(e) => {
                            return fail_for_good(
                                state,
                                &step.name,
                                false,
                                &format!("when: {e}"),
                                ctx,
                            );
                        }
                    }
                }
                if step.call.is_some() {
                    events.push(Event::StepStarted {
                        step: step.name.clone(),
                        at_ms: now,
                        until_ms: None,
                    });
                    let mut after = state.clone();
                    after.apply(&events[events.len() - 1]);
                    let next = after.steps[&step.name].main_attempts() + 1;
                    events.extend(start_attempt(&after, &step.name, next, false, ctx));
                } else if let Some(sleep) = &step.sleep {
                    events.push(Event::StepStarted {
                        step: step.name.clone(),
                        at_ms: now,
                        until_ms: Some(now + sleep.duration.get().as_millis() as u64),
                    });
                } else if let Some(wait) = &step.wait_for_signal {
                    events.push(Event::StepStarted {
                        step: step.name.clone(),
                        at_ms: now,
                        until_ms: wait.timeout.map(|t| now + t.get().as_millis() as u64),
                    });
                }
                return events;
            }
            if all_done {
                let context = state.context(ctx.run_id);
                let output = match &ctx.workflow.spec.output {
                    Some(template) => match render_value(template, &context) {
                        Ok(v) => v,
                        Err(e) => {
                            return vec![Event::RunFinished {
                                status: RunStatus::Failed,
                                output: None,
                                error: Some(format!("output: {e}")),
                                at_ms: now,
                            }];
                        }
                    },
                    None => Value::Null,
                };
                return vec![Event::RunFinished {
                    status: RunStatus::Completed,
                    output: Some(output),
                    error: None,
                    at_ms: now,
                }];
            }
            events
        }
        _ => Vec::new(),
    }
}

/// Why an operator input (a signal, cancel, terminate, retry) cannot apply to a run in
/// `state`, or `None` when it can. Decided on the same state [`decide`] reads, under the run's
/// lock, so the answer is never a racy pre-check: an input that would be dropped is refused
/// (409) with this reason instead of being acknowledged. Step results and timers are never
/// refused (`None`).
///
/// - a signal reaches a `Running` run only (it is kept until a step waits for it);
/// - cancel applies to a `Running` run (a compensating run is being undone already);
/// - terminate applies to a run that has not finished (`Running` or `Compensating`);
/// - retry applies to a `Failed` or `CompensationFailed` run.
pub fn refusal(state: &RunState, input: &Input) -> Option<String> {
    let status = state.status.as_str();
    let finished = state.status.is_terminal();
    match input {
        Input::Signal { name, .. } if state.status != RunStatus::Running => {
            Some(if finished {
                format!("run is {status}: signal {name:?} not delivered (the run has finished)")
            } else {
                format!("run is {status}: signal {name:?} not delivered (signals reach running runs only)")
            })
        }
        Input::Cancel if state.status != RunStatus::Running => Some(if finished {
            format!("run is {status}: nothing to cancel")
        } else {
            format!("run is {status}: it is being undone already (terminate stops it)")
        }),
        Input::Terminate if finished => Some(format!("run is {status}: nothing to terminate")),
        Input::Retry
            if !matches!(
                state.status,
                RunStatus::Failed | RunStatus::CompensationFailed
            ) =>
        {
            Some(format!(
                "run is {status}: only a Failed or CompensationFailed run can be retried"
            ))
        }
        _ => None,
    }
}
