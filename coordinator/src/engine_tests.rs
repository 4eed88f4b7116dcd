//! The engine on a controlled clock: every decision is a pure function of (state, input, now).

use std::path::Path;

use meshflow_policies::workflow::Workflow;
use serde_json::{json, Value};

use crate::engine::*;

const ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: order }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reserve, body: { sku: "${input.sku}" } }
    retry: { maxAttempts: 3, initialInterval: 100ms, backoffCoefficient: 2, maxInterval: 150ms }
    timeouts: { perAttempt: 1s, total: 10s }
    compensate: { service: inventory, method: DELETE, path: "/reserve/${run.id}" }
  - name: charge
    dependsOn: [reserve]
    call: { service: payment, path: /charge }
    retry: { maxAttempts: 1 }
    compensate: { service: payment, path: /refund }
  - name: approve
    dependsOn: [charge]
    waitForSignal: { name: approval, timeout: 5s }
  - name: ship
    dependsOn: [approve]
    call: { service: shipping, path: /ship, body: { approver: "${signals.approval.by}" } }
    retry: { maxAttempts: 2, initialInterval: 50ms }
    compensate: { service: shipping, path: /cancel }
  output: { shipment: "${steps.ship.output.id}" }
"#;

struct Harness {
    wf: Workflow,
    state: RunState,
    history: Vec<Event>,
    now: u64,
}

impl Harness {
    fn new(yaml: &str) -> Self {
        let wf = Workflow::parse(Path::new("wf.yaml"), yaml).unwrap();
        let start = Event::RunStarted {
            workflow: wf.id(),
            version: 1,
            input: json!({"sku": "A-1"}),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            at_ms: 1_000,
        };
        let state = RunState::replay(&wf, std::slice::from_ref(&start)).unwrap();
        let mut h = Harness {
            wf,
            state,
            history: vec![start],
            now: 1_000,
        };
        h.input(Input::Advance);
        h
    }

    fn input(&mut self, input: Input) -> Vec<Event> {
        let ctx = Ctx {
            workflow: &self.wf,
            run_id: "r1",
            now_ms: self.now,
        };
        let events = decide(&self.state, &input, &ctx);
        for e in &events {
            self.state.apply(e);
        }
        self.history.extend(events.clone());
        // Replaying the history gives the same state.
        assert_eq!(
            RunState::replay(&self.wf, &self.history).unwrap(),
            self.state
        );
        events
    }

    fn respond(&mut self, step: &str, compensation: bool, status: u16, body: Value) -> Vec<Event> {
        let d = self
            .state
            .dispatches()
            .into_iter()
            .find(|d| d.step == step && d.compensation == compensation)
            .unwrap_or_else(|| {
                panic!(
                    "no dispatch for {step} (compensation {compensation}): {:?}",
                    self.state.dispatches()
                )
            });
        self.input(Input::AttemptResult {
            step: step.into(),
            attempt: d.attempt,
            compensation,
            outcome: AttemptOutcome::Response { status, body },
        })
    }

    fn resend(&mut self, step: &str, attempt: u32) -> Vec<Event> {
        self.input(Input::Resend {
            step: step.into(),
            attempt,
            compensation: false,
        })
    }

    fn fire_due(&mut self) {
        let mut due: Vec<(Timer, u64)> = self
            .state
            .timers(&self.wf)
            .into_iter()
            .filter(|(_, at)| *at <= self.now)
            .collect();
        due.sort_by_key(|(_, at)| *at);
        for (t, _) in due {
            self.input(Input::TimerFired(t));
        }
    }
}

#[test]
fn happy_path_with_a_signal_sent_before_the_wait() {
    let mut h = Harness::new(ORDER);
    assert_eq!(h.state.dispatches().len(), 1);
    let d = &h.state.dispatches()[0];
    assert_eq!(d.request.body, Some(json!({"sku": "A-1"})));
    assert_eq!(d.deadline_ms, 2_000, "perAttempt 1 s");
    // The signal arrives early and is kept.
    h.input(Input::Signal {
        name: "approval".into(),
        payload: json!({"by": "ann"}),
    });
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.respond("charge", false, 200, json!({"ok": true}));
    // approve used the early signal at once; ship is in flight with the signal's data.
    let d = h.state.dispatches();
    assert_eq!(d[0].step, "ship");
    assert_eq!(d[0].request.body, Some(json!({"approver": "ann"})));
    h.respond("ship", false, 200, json!({"id": "S-9"}));
    assert_eq!(h.state.status, RunStatus::Completed);
    assert_eq!(h.state.output, Some(json!({"shipment": "S-9"})));
    assert!(h.state.timers(&h.wf).is_empty() && h.state.dispatches().is_empty());
}

#[test]
fn backoff_schedule_and_per_attempt_timeout_on_a_controlled_clock() {
    let mut h = Harness::new(ORDER);
    // Attempt 1 times out at 2 000 ms: unknown outcome, retry after 100 ms.
    h.now = 2_000;
    h.fire_due();
    assert_eq!(h.state.steps["reserve"].status, StepStatus::Backoff);
    assert_eq!(h.state.steps["reserve"].until_ms, Some(2_100));
    h.now = 2_099;
    h.fire_due();
    assert!(
        h.state.dispatches().is_empty(),
        "not before the backoff ends"
    );
    h.now = 2_100;
    h.fire_due();
    assert_eq!(h.state.dispatches()[0].attempt, 2);
    // A late failure of attempt 1 is recorded, not applied.
    let late = h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 1,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 500,
            body: json!("late"),
        },
    });
    assert!(matches!(late[..], [Event::LateResult { .. }]));
    assert_eq!(h.state.steps["reserve"].status, StepStatus::Running);
    assert_eq!(
        h.state.steps["reserve"].attempts[0].result,
        "late: HTTP 500"
    );
    // Attempt 2 gets 503: retry after min(100 × 2, 150) = 150 ms.
    h.respond("reserve", false, 503, json!("busy"));
    assert_eq!(h.state.steps["reserve"].until_ms, Some(2_250));
    h.now = 2_250;
    h.fire_due();
    // Attempt 3 of 3 fails: the step fails for good; nothing completed → Failed.
    h.respond("reserve", false, 500, json!("boom"));
    assert_eq!(h.state.status, RunStatus::Compensating);
    // reserve's first attempt timed out (unknown outcome): its compensation runs.
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Compensated);
}

#[test]
fn a_permanent_failure_compensates_in_reverse_order_once_each() {
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.respond("charge", false, 200, json!({}));
    h.input(Input::Signal {
        name: "approval".into(),
        payload: json!({"by": "bo"}),
    });
    h.respond("ship", false, 400, json!("no address"));
    assert_eq!(h.state.status, RunStatus::Compensating);
    let order: Vec<String> = h.state.compensation.as_ref().unwrap().remaining.clone();
    assert_eq!(
        order,
        vec!["ship", "charge", "reserve"],
        "ship was attempted (it may have taken effect) so it is undone first; then reverse completion order"
    );
    // One at a time: only ship's compensation is in flight.
    assert_eq!(h.state.dispatches().len(), 1);
    h.respond("ship", true, 200, json!({"nothingToUndo": true}));
    assert_eq!(h.state.dispatches().len(), 1);
    h.respond("charge", true, 200, json!({}));
    let d = h.state.dispatches();
    assert_eq!(d[0].request.path, "/reserve/r1");
    assert_eq!(d[0].request.method, "DELETE");
    h.respond("reserve", true, 204, Value::Null);
    assert_eq!(h.state.status, RunStatus::Compensated);
    let compensations = h
        .history
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::AttemptStarted {
                    compensation: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(compensations, 3, "once each");
}

#[test]
fn wait_timeout_cancel_terminate_and_retry() {
    // The approval never comes: the wait fails, the saga runs.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.respond("charge", false, 200, json!({}));
    assert_eq!(
        h.state.waiting_on(&h.wf),
        vec!["signal \"approval\" (step approve)"]
    );
    h.now += 5_000;
    h.fire_due();
    assert_eq!(h.state.steps["approve"].status, StepStatus::Failed);
    assert_eq!(h.state.status, RunStatus::Compensating);

    // Cancel compensates.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.input(Input::Cancel);
    // charge is in flight: it is compensated too, but only after its call resolves (an undo
    // never races the call it undoes).
    assert_eq!(
        h.state.compensation.as_ref().unwrap().remaining,
        vec!["charge", "reserve"]
    );
    let in_flight = h.state.dispatches();
    assert_eq!(
        (in_flight.len(), in_flight[0].compensation),
        (1, false),
        "{in_flight:?}"
    );
    h.respond("charge", false, 201, json!({"id": 3}));
    h.respond("charge", true, 200, json!({}));
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Cancelled);

    // Terminate does not.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.input(Input::Terminate);
    assert_eq!(h.state.status, RunStatus::Terminated);
    assert!(h.state.dispatches().is_empty());

    // A failed compensation ends the run naming the step; retry resumes it.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": 7}));
    h.respond("charge", false, 402, json!("declined"));
    // charge was attempted: its compensation runs first and finds nothing to undo.
    h.respond("charge", true, 200, json!({}));
    h.respond("reserve", true, 500, json!("down"));
    h.now += 1_000;
    h.fire_due();
    h.respond("reserve", true, 500, json!("down"));
    h.now += 1_000;
    h.fire_due();
    h.respond("reserve", true, 500, json!("down"));
    assert_eq!(h.state.status, RunStatus::CompensationFailed);
    assert!(h
        .state
        .error
        .as_deref()
        .unwrap()
        .contains("compensation of step reserve failed"));
    h.input(Input::Retry);
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Compensated);
}

#[test]
fn history_limit_ends_the_run_explicitly() {
    let yaml = ORDER.replace("spec:\n  steps:", "spec:\n  historyLimit: 6\n  steps:");
    let mut h = Harness::new(&yaml);
    // 3 events so far; the answer adds 4 more (ended, completed, next started, next attempt).
    h.respond("reserve", false, 201, json!({"id": 7}));
    assert_eq!(
        h.state.status,
        RunStatus::HistoryLimitExceeded,
        "{:?}",
        h.history
    );
}

#[test]
fn retry_after_a_failure_resets_unfinished_steps_and_keeps_attempt_numbers() {
    let yaml = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: pair }
spec:
  timeout: 10s
  steps:
  - name: a
    call: { service: s, path: /a }
    retry: { maxAttempts: 1 }
  - name: b
    call: { service: s, path: /b }
    retry: { maxAttempts: 2, initialInterval: 10ms }
"#;
    let mut h = Harness::new(yaml);
    assert_eq!(h.state.dispatches().len(), 2, "a and b run in parallel");
    h.respond("a", false, 400, json!("bad"));
    // b was in flight: the run waits for it before ending (nothing to compensate).
    assert_eq!(h.state.status, RunStatus::Compensating);
    h.respond("b", false, 500, json!("boom"));
    assert_eq!(h.state.status, RunStatus::Failed);
    // Retry: both unfinished steps run again, with new attempt numbers, and the timeout
    // counts from the retry.
    h.now += 20_000;
    h.input(Input::Retry);
    let mut d = h.state.dispatches();
    d.sort_by(|x, y| x.step.cmp(&y.step));
    assert_eq!(
        d.iter()
            .map(|x| (x.step.as_str(), x.attempt))
            .collect::<Vec<_>>(),
        vec![("a", 2), ("b", 2)]
    );
    assert!(h
        .state
        .timers(&h.wf)
        .iter()
        .any(|(t, at)| *t == Timer::RunDeadline && *at == h.now + 10_000));
    h.respond("a", false, 200, json!({}));
    h.respond("b", false, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Completed);
}

#[test]
fn the_total_timeout_bounds_attempts_and_backoff() {
    let yaml = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: total }
spec:
  steps:
  - name: a
    call: { service: s, path: /a }
    retry: { maxAttempts: 10, initialInterval: 1s, backoffCoefficient: 2 }
    timeouts: { perAttempt: 1s, total: 2500ms }
"#;
    let mut h = Harness::new(yaml);
    assert_eq!(h.state.dispatches()[0].deadline_ms, 2_000);
    h.now = 2_000;
    h.fire_due();
    assert_eq!(
        h.state.steps["a"].until_ms,
        Some(3_000),
        "1 s backoff fits in the total"
    );
    h.now = 3_000;
    h.fire_due();
    // The second attempt's deadline is cut to the total (1 000 + 2 500).
    assert_eq!(h.state.dispatches()[0].deadline_ms, 3_500);
    h.now = 3_500;
    h.fire_due();
    // The next wait (2 s) would pass the total: the step fails for good.
    assert_eq!(h.state.steps["a"].status, StepStatus::Failed);
    assert!(h.state.steps["a"]
        .error
        .as_deref()
        .unwrap()
        .contains("total timeout"));
}

#[test]
fn a_late_success_completes_a_step_still_waiting_for_a_result() {
    // Attempt 1 times out (outcome unknown); its 201 arrives while attempt 2 is in flight.
    let mut h = Harness::new(ORDER);
    h.now = 2_000;
    h.fire_due();
    h.now = 2_100;
    h.fire_due();
    assert_eq!(h.state.dispatches()[0].attempt, 2);
    h.now = 2_150;
    let events = h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 1,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 201,
            body: json!({"id": 1}),
        },
    });
    assert!(matches!(
        events[..2],
        [Event::LateResult { .. }, Event::StepCompleted { .. }]
    ));
    let reserve = &h.state.steps["reserve"];
    assert_eq!(reserve.status, StepStatus::Completed);
    assert_eq!(reserve.output, Some(json!({"id": 1})));
    assert_eq!(reserve.attempts[0].result, "late: HTTP 201");
    assert_eq!(reserve.attempts[1].result, "superseded");
    // The run moved on: charge is dispatched, attempt 2 of reserve no longer is.
    let d = h.state.dispatches();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].step, "charge");
    // Attempt 2's own answer is only recorded.
    let late2 = h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 2,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 201,
            body: json!({"id": 1}),
        },
    });
    assert!(matches!(late2[..], [Event::LateResult { .. }]));

    // Same in backoff (nothing in flight): a late success ends the wait.
    let mut h = Harness::new(ORDER);
    h.now = 2_000;
    h.fire_due();
    assert_eq!(h.state.steps["reserve"].status, StepStatus::Backoff);
    h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 1,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 200,
            body: json!({"id": 2}),
        },
    });
    assert_eq!(h.state.steps["reserve"].status, StepStatus::Completed);
    assert!(h
        .state
        .timers(&h.wf)
        .iter()
        .all(|(t, _)| !matches!(t, Timer::Backoff { .. })));

    // Once the step failed for good and the saga runs, a late success only is recorded (the
    // step is compensated: the undo covers the effect).
    let mut h = Harness::new(ORDER);
    for (now, status) in [(1_000, 500), (1_200, 500), (1_500, 500)] {
        h.now = now;
        h.fire_due();
        h.respond("reserve", false, status, json!("boom"));
    }
    assert_eq!(h.state.status, RunStatus::Compensating);
    let events = h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 1,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 201,
            body: json!({"id": 3}),
        },
    });
    assert!(matches!(events[..], [Event::LateResult { .. }]));
}

/// Issue 12, item 10: an operator input is refused (with a reason) exactly when applying it
/// would record nothing, in every run status.
#[test]
fn operator_inputs_that_would_do_nothing_are_refused_with_a_reason() {
    fn check(h: &Harness, expect_refused: &[&str]) {
        let ctx = Ctx {
            workflow: &h.wf,
            run_id: "r1",
            now_ms: h.now,
        };
        for (name, input) in [
            (
                "signal",
                Input::Signal {
                    name: "approval".into(),
                    payload: json!({}),
                },
            ),
            ("cancel", Input::Cancel),
            ("terminate", Input::Terminate),
            ("retry", Input::Retry),
        ] {
            let refused = refusal(&h.state, &input);
            let events = decide(&h.state, &input, &ctx);
            let status = h.state.status.as_str();
            assert_eq!(
                refused.is_some(),
                events.is_empty(),
                "{name} on {status}: refusal {refused:?}, events {events:?}"
            );
            assert_eq!(
                refused.is_some(),
                expect_refused.contains(&name),
                "{name} on {status}: {refused:?}"
            );
            if let Some(why) = refused {
                assert!(why.contains(status), "{why}");
            }
        }
    }
    // Running: everything but retry applies.
    let mut h = Harness::new(ORDER);
    check(&h, &["retry"]);
    // Terminated.
    h.input(Input::Terminate);
    check(&h, &["signal", "cancel", "terminate", "retry"]);

    // Compensating (cancelled while the charge is in flight), then Cancelled.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": "r"}));
    h.input(Input::Cancel);
    assert_eq!(h.state.status, RunStatus::Compensating);
    check(&h, &["signal", "cancel", "retry"]);
    h.respond("charge", false, 201, json!({}));
    h.respond("charge", true, 200, json!({}));
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Cancelled);
    check(&h, &["signal", "cancel", "terminate", "retry"]);

    // Compensated (the charge is refused), and Completed.
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": "r"}));
    h.respond("charge", false, 402, json!({}));
    // Every attempted step is undone, the refused charge too (newest first).
    h.respond("charge", true, 200, json!({}));
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Compensated);
    check(&h, &["signal", "cancel", "terminate", "retry"]);
    let mut h = Harness::new(ORDER);
    h.respond("reserve", false, 201, json!({"id": "r"}));
    h.respond("charge", false, 201, json!({}));
    h.input(Input::Signal {
        name: "approval".into(),
        payload: json!({"by": "x"}),
    });
    h.respond("ship", false, 201, json!({"id": "s"}));
    assert_eq!(h.state.status, RunStatus::Completed);
    check(&h, &["signal", "cancel", "terminate", "retry"]);
}

#[test]
fn a_resend_after_a_restart_moves_the_deadline_never_back() {
    let mut h = Harness::new(ORDER);
    // reserve attempt 1 started at 1 000 with deadline 2 000; the coordinator was down until
    // 5 000 (its deadline timer is overdue): the resend moves the deadline to 6 000.
    h.now = 5_000;
    let events = h.resend("reserve", 1);
    assert!(matches!(
        events[..],
        [Event::AttemptResent {
            deadline_ms: 6_000,
            ..
        }]
    ));
    assert_eq!(h.state.dispatches()[0].deadline_ms, 6_000);
    h.fire_due();
    assert_eq!(
        h.state.steps["reserve"].status,
        StepStatus::Running,
        "not timed out"
    );
    // A resend that would not move it later records nothing; a stale attempt neither.
    assert!(h.resend("reserve", 1).is_empty());
    assert!(h.resend("reserve", 7).is_empty());
    // The step's total (10 s from 1 000) still bounds it.
    h.now = 10_500;
    let events = h.resend("reserve", 1);
    assert!(matches!(
        events[..],
        [Event::AttemptResent {
            deadline_ms: 11_000,
            ..
        }]
    ));
    h.respond("reserve", false, 201, json!({"id": 1}));
    assert_eq!(h.state.steps["reserve"].status, StepStatus::Completed);
}

#[test]
fn every_event_records_when_it_happened() {
    // A run that skips, retries, arrives late, fails and compensates: every kind of event.
    let mut h = Harness::new(ORDER);
    h.now = 2_000;
    h.fire_due();
    h.now = 2_100;
    h.fire_due();
    h.input(Input::AttemptResult {
        step: "reserve".into(),
        attempt: 1,
        compensation: false,
        outcome: AttemptOutcome::Response {
            status: 500,
            body: json!("late"),
        },
    });
    h.respond("reserve", false, 201, json!({"id": 1}));
    h.respond("charge", false, 400, json!("no"));
    h.respond("charge", true, 200, json!({}));
    h.respond("reserve", true, 200, json!({}));
    assert_eq!(h.state.status, RunStatus::Compensated);
    for e in &h.history {
        let v = serde_json::to_value(e).unwrap();
        assert!(
            v["at_ms"].as_u64().is_some_and(|t| t >= 1_000),
            "{} has no time: {v}",
            v["type"]
        );
    }
}
