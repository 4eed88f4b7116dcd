//! Workflow metrics (DESIGN §8): runs by workflow and status, step attempts, step latency,
//! runs in flight, timers pending, dispatch lag. Labels take only operator-defined values
//! (registered workflow and step names, fixed kinds and results).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Metric handles.
#[derive(Clone)]
pub struct WorkflowMetrics {
    /// `meshflow_workflow_runs_started_total{workflow}`.
    pub runs_started: IntCounterVec,
    /// `meshflow_workflow_runs_finished_total{workflow, status}`.
    pub runs_finished: IntCounterVec,
    /// `meshflow_workflow_step_attempts_total{workflow, step, kind, result}`; kind `call` or
    /// `compensation`, result `ok`, `failed`, `timed_out`.
    pub step_attempts: IntCounterVec,
    /// `meshflow_workflow_step_duration_seconds{workflow, step}`: attempt latency.
    pub step_latency: HistogramVec,
    /// `meshflow_workflow_runs_in_flight`: runs not finished.
    pub runs_in_flight: IntGauge,
    /// `meshflow_workflow_timers_pending`: durable timers not yet fired.
    pub timers_pending: IntGauge,
    /// `meshflow_workflow_dispatch_lag_seconds`: from an attempt's commit to its send.
    pub dispatch_lag: Histogram,
    /// `meshflow_workflow_fenced_writes_total`: commits rejected because another coordinator
    /// took the run over.
    pub fenced_writes: prometheus::IntCounter,
    /// `meshflow_workflow_waiters`: callers waiting for a run (`?wait=`) now.
    pub waiters: IntGauge,
    /// `meshflow_workflow_wait_rejected_total`: `?wait=` requests refused with 429 because
    /// `--workflow-max-waiters` callers were waiting.
    pub wait_rejected: prometheus::IntCounter,
    /// `meshflow_workflow_store_transaction_writes`: run writes (creates and commits) per
    /// store transaction (group commit); its count is the number of write transactions, each
    /// one fsync.
    pub store_transaction_writes: Histogram,
}

impl WorkflowMetrics {
    /// Creates and registers the metrics.
    ///
    /// # Errors
    /// A name registered twice.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Self {
            runs_started: IntCounterVec::new(
                Opts::new(
                    "meshflow_workflow_runs_started_total",
                    "Workflow runs started, by workflow.",
                ),
                &["workflow"],
            )?,
            runs_finished: IntCounterVec::new(
                Opts::new(
                    "meshflow_workflow_runs_finished_total",
                    "Workflow runs finished, by workflow and final status.",
                ),
                &["workflow", "status"],
            )?,
            step_attempts: IntCounterVec::new(
                Opts::new(
                    "meshflow_workflow_step_attempts_total",
                    "Step call and compensation attempts, by result.",
                ),
                &["workflow", "step", "kind", "result"],
            )?,
            step_latency: HistogramVec::new(
                HistogramOpts::new(
                    "meshflow_workflow_step_duration_seconds",
                    "Step attempt latency.",
                )
                .buckets(buckets.clone()),
                &["workflow", "step"],
            )?,
            runs_in_flight: IntGauge::new(
                "meshflow_workflow_runs_in_flight",
                "Workflow runs not finished.",
            )?,
            timers_pending: IntGauge::new(
                "meshflow_workflow_timers_pending",
                "Durable timers not yet fired.",
            )?,
            dispatch_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "meshflow_workflow_dispatch_lag_seconds",
                    "From an attempt's commit to its send.",
                )
                .buckets(buckets),
            )?,
            fenced_writes: prometheus::IntCounter::new(
                "meshflow_workflow_fenced_writes_total",
                "Workflow commits rejected because another coordinator took the run over.",
            )?,
            waiters: IntGauge::new(
                "meshflow_workflow_waiters",
                "Callers waiting for a run to finish (?wait=) now.",
            )?,
            wait_rejected: prometheus::IntCounter::new(
                "meshflow_workflow_wait_rejected_total",
                "?wait= requests refused with 429: too many callers were waiting.",
            )?,
            store_transaction_writes: Histogram::with_opts(
                HistogramOpts::new(
                    "meshflow_workflow_store_transaction_writes",
                    "Run writes (creates and commits) per workflow store transaction (group commit).",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )?,
        };
        registry.register(Box::new(m.fenced_writes.clone()))?;
        registry.register(Box::new(m.waiters.clone()))?;
        registry.register(Box::new(m.wait_rejected.clone()))?;
        registry.register(Box::new(m.store_transaction_writes.clone()))?;
        registry.register(Box::new(m.runs_started.clone()))?;
        registry.register(Box::new(m.runs_finished.clone()))?;
        registry.register(Box::new(m.step_attempts.clone()))?;
        registry.register(Box::new(m.step_latency.clone()))?;
        registry.register(Box::new(m.runs_in_flight.clone()))?;
        registry.register(Box::new(m.timers_pending.clone()))?;
        registry.register(Box::new(m.dispatch_lag.clone()))?;
        Ok(m)
    }
}
