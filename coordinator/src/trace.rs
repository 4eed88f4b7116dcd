//! A workflow run is one OpenTelemetry trace: a root span for the run, a child span per step
//! attempt and per compensation attempt, and under each attempt the sidecar spans of its call.
//!
//! Every span id is derived from the run id, step, attempt number and kind
//! ([`meshflow_telemetry::derived_span_id`]), and a span is recorded when its end is
//! committed — by whichever coordinator commits it. A coordinator that takes a run over after
//! a crash therefore records spans with the same ids as the one that started them, and the
//! sidecar spans of calls sent before the crash keep their parent. What a crash can lose is
//! the spans recorded but not yet exported (the export batch: at most 200 ms of spans); a
//! graceful stop flushes them.
//!
//! The run's stored `traceparent` names the trace, the sampling decision and the root's
//! parent: when its span id is the derived root id the run is itself the root; otherwise that
//! span (the client's, from the `traceparent` sent with the start request) is the root's
//! parent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshflow_telemetry::{derived_span_id, parse_traceparent, traceparent, Tracing};
use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry::KeyValue;

use crate::engine::{Event, RunState};

/// The run's root span id.
pub fn root_span_id(run_id: &str) -> SpanId {
    derived_span_id(&[run_id, "run"])
}

/// The span id of one attempt of `step` (a compensation attempt when `compensation`).
pub fn attempt_span_id(run_id: &str, step: &str, attempt: u32, compensation: bool) -> SpanId {
    derived_span_id(&[
        run_id,
        step,
        &attempt.to_string(),
        if compensation { "compensation" } else { "call" },
    ])
}

/// The `traceparent` stored with a new run: the client's trace (a valid `incoming`
/// `traceparent`, whose sampling decision is kept) or a new root sampled with `ratio`.
pub fn run_traceparent(run_id: &str, incoming: Option<&str>, ratio: f64) -> String {
    match incoming.and_then(parse_traceparent) {
        Some((trace_id, parent, sampled)) => traceparent(trace_id, parent, sampled),
        None => {
            let (trace_id, _, sampled) = meshflow_telemetry::new_root(ratio);
            traceparent(trace_id, root_span_id(run_id), sampled)
        }
    }
}

/// The `traceparent` sent with an attempt's call: the attempt's span is the parent.
pub fn attempt_traceparent(
    run_traceparent: &str,
    run_id: &str,
    step: &str,
    attempt: u32,
    compensation: bool,
) -> Option<String> {
    let (trace_id, _, sampled) = parse_traceparent(run_traceparent)?;
    Some(traceparent(
        trace_id,
        attempt_span_id(run_id, step, attempt, compensation),
        sampled,
    ))
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Records the spans whose end `events` (just committed) mark: ended or timed-out attempts,
/// and the run itself when it finished.
pub fn record_committed(tracing: &Tracing, run_id: &str, state: &RunState, events: &[Event]) {
    let Some((trace_id, stored, sampled)) = parse_traceparent(&state.traceparent) else {
        return;
    };
    if !sampled {
        return;
    }
    let root = root_span_id(run_id);
    for event in events {
        match event {
            Event::AttemptEnded {
                step,
                attempt,
                compensation,
                at_ms,
                ..
            }
            | Event::AttemptTimedOut {
                step,
                attempt,
                compensation,
                at_ms,
            } => {
                let record = state.steps.get(step).and_then(|s| {
                    s.attempts
                        .iter()
                        .rev()
                        .find(|a| a.attempt == *attempt && a.compensation == *compensation)
                });
                let started = record.map_or(*at_ms, |a| a.started_ms);
                let result = record.map_or("unknown", |a| a.result.as_str());
                let mut attributes = vec![
                    KeyValue::new("meshflow.run_id", run_id.to_string()),
                    KeyValue::new("meshflow.workflow", state.workflow.clone()),
                    KeyValue::new("meshflow.step", step.clone()),
                    KeyValue::new("meshflow.attempt", i64::from(*attempt)),
                    KeyValue::new("meshflow.compensation", *compensation),
                    KeyValue::new("meshflow.result", result.to_string()),
                ];
                if let Some(status) = record.and_then(|a| a.status) {
                    attributes.push(KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                }
                let error = (result != "ok").then(|| {
                    record
                        .and_then(|a| a.error.clone())
                        .unwrap_or_else(|| result.to_string())
                });
                let name = if *compensation {
                    format!("compensate {step}")
                } else {
                    format!("step {step}")
                };
                tracing.record(
                    name,
                    SpanKind::Internal,
                    (
                        trace_id,
                        attempt_span_id(run_id, step, *attempt, *compensation),
                        true,
                    ),
                    Some(root),
                    at(started),
                    at((*at_ms).max(started)),
                    attributes,
                    error,
                );
            }
            Event::RunFinished { status, at_ms, .. } => {
                // Attempts still in flight when the run ended (terminated, history limit) are
                // abandoned: their result, if it comes, is only recorded as late. Record their
                // spans now, so the sidecar spans of those calls keep a parent.
                for (step, s) in &state.steps {
                    for a in s.attempts.iter().filter(|a| a.ended_ms.is_none()) {
                        tracing.record(
                            if a.compensation {
                                format!("compensate {step}")
                            } else {
                                format!("step {step}")
                            },
                            SpanKind::Internal,
                            (
                                trace_id,
                                attempt_span_id(run_id, step, a.attempt, a.compensation),
                                true,
                            ),
                            Some(root),
                            at(a.started_ms),
                            at((*at_ms).max(a.started_ms)),
                            vec![
                                KeyValue::new("meshflow.run_id", run_id.to_string()),
                                KeyValue::new("meshflow.workflow", state.workflow.clone()),
                                KeyValue::new("meshflow.step", step.clone()),
                                KeyValue::new("meshflow.attempt", i64::from(a.attempt)),
                                KeyValue::new("meshflow.compensation", a.compensation),
                                KeyValue::new("meshflow.result", "abandoned"),
                            ],
                            Some(format!("abandoned: run ended {}", status.as_str())),
                        );
                    }
                }
                let parent = (stored != root).then_some(stored);
                tracing.record(
                    format!("run {}", state.workflow),
                    SpanKind::Internal,
                    (trace_id, root, true),
                    parent,
                    at(state.started_ms),
                    at((*at_ms).max(state.started_ms)),
                    vec![
                        KeyValue::new("meshflow.run_id", run_id.to_string()),
                        KeyValue::new("meshflow.workflow", state.workflow.clone()),
                        KeyValue::new("meshflow.status", status.as_str().to_string()),
                    ],
                    (status.as_str() != "Completed").then(|| {
                        state
                            .error
                            .clone()
                            .unwrap_or_else(|| status.as_str().to_string())
                    }),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_trace_is_joined_and_a_bad_one_replaced() {
        let client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let tp = run_traceparent("r1", Some(client), 0.0);
        assert_eq!(tp, client, "the client's trace, span and decision are kept");
        let fresh = run_traceparent("r1", Some("00-zz-b7ad6b7169203331-01"), 1.0);
        let (_, span, sampled) = parse_traceparent(&fresh).unwrap();
        assert_eq!(span, root_span_id("r1"));
        assert!(sampled);
        assert!(
            !parse_traceparent(&run_traceparent("r1", None, 0.0))
                .unwrap()
                .2
        );
        let call = attempt_traceparent(&fresh, "r1", "charge", 2, false).unwrap();
        assert_eq!(&call[..35], &fresh[..35], "same trace");
        assert!(call.contains(&attempt_span_id("r1", "charge", 2, false).to_string()));
    }
}
