//! The resilience plan for one outbound request: the destination's TrafficPolicy (narrowed by
//! the first matching route) resolved into concrete numbers, or the defaults when no policy
//! applies. Pure; unit-tested.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshflow_policies::traffic::{
    Backoff, Budget, ConnectionPool, FaultInjection, LoadBalancerPolicy, OutlierDetection, RetryOn,
    TrafficPolicy, DEFAULT_CONNECT, DEFAULT_STREAM_IDLE,
};

use crate::outbound::resilience::{RetryBudget, DEFAULT_RETRY_ON};

/// Concrete resilience settings for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptPlan {
    /// Total tries including the first.
    pub max_attempts: u32,
    /// Retry conditions.
    pub retry_on: Vec<RetryOn>,
    /// Retry methods that are not idempotent.
    pub retry_non_idempotent: bool,
    /// Backoff settings.
    pub backoff: Backoff,
    /// Retry budget settings.
    pub budget: Budget,
    /// Until response headers, across attempts.
    pub request_timeout: Option<Duration>,
    /// Until response headers, per attempt.
    pub per_attempt: Option<Duration>,
    /// Idle limit once headers arrived.
    pub stream_idle: Duration,
    /// Connect limit.
    pub connect: Duration,
    /// Endpoint choice.
    pub load_balancer: LoadBalancerPolicy,
    /// Ejection of failing endpoints (none without a policy).
    pub outlier: Option<OutlierDetection>,
    /// Request limits.
    pub pool: ConnectionPool,
    /// Injected faults.
    pub fault: Option<FaultInjection>,
}

impl Default for AttemptPlan {
    /// No policy: retry only what never reached the server, once; no request or per-attempt
    /// timeout; stream idle 5 min; connect 1 s.
    fn default() -> Self {
        Self {
            max_attempts: 2,
            retry_on: DEFAULT_RETRY_ON.to_vec(),
            retry_non_idempotent: false,
            backoff: Backoff::default(),
            budget: Budget::default(),
            request_timeout: None,
            per_attempt: None,
            stream_idle: DEFAULT_STREAM_IDLE,
            connect: DEFAULT_CONNECT,
            load_balancer: LoadBalancerPolicy::default(),
            outlier: None,
            pool: ConnectionPool::default(),
            fault: None,
        }
    }
}

impl AttemptPlan {
    /// The plan for a request to a service with `policy` (if any). `header` looks up a request
    /// header by lower-case name.
    pub fn resolve<'a>(
        policy: Option<&TrafficPolicy>,
        method: &str,
        path: &str,
        mut header: impl FnMut(&str) -> Option<&'a str>,
    ) -> Self {
        let mut plan = Self::default();
        let Some(policy) = policy else { return plan };
        let spec = &policy.spec;
        let route = spec
            .routes
            .iter()
            .find(|r| r.matches.matches(method, path, &mut header));
        let timeouts = route.and_then(|r| r.timeouts).or(spec.timeouts);
        let retries = route
            .and_then(|r| r.retries.as_ref())
            .or(spec.retries.as_ref());
        if let Some(t) = timeouts {
            plan.request_timeout = t.request.map(|d| d.get());
            plan.per_attempt = t.per_attempt.map(|d| d.get());
            plan.stream_idle = t.stream_idle.map_or(DEFAULT_STREAM_IDLE, |d| d.get());
            plan.connect = t.connect.map_or(DEFAULT_CONNECT, |d| d.get());
        }
        plan.load_balancer = spec.load_balancer.map(|l| l.policy).unwrap_or_default();
        plan.outlier = spec.outlier_detection;
        plan.pool = spec.connection_pool.unwrap_or_default();
        plan.fault = route
            .and_then(|r| r.fault_injection)
            .or(spec.fault_injection);
        if let Some(r) = retries {
            plan.max_attempts = r.max_attempts.max(1);
            plan.retry_on = r.retry_on.clone();
            plan.retry_non_idempotent = r.retry_non_idempotent;
            plan.backoff = r.backoff;
            plan.budget = r.budget;
        }
        plan
    }
}

/// One retry budget per destination service (and budget settings), shared by its requests.
#[derive(Default)]
pub struct Budgets {
    map: Mutex<HashMap<String, Arc<RetryBudget>>>,
}

impl Budgets {
    /// Forgets the budgets nothing else holds (no compiled route, no request in flight).
    pub fn retain_live(&self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, budget| Arc::strong_count(budget) > 1);
    }

    /// The budget for `service` with `settings`, created on first use.
    pub fn get(&self, service: &str, settings: Budget) -> Arc<RetryBudget> {
        let key = format!("{service}|{}|{}", settings.ratio, settings.min_per_second);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key)
            .or_insert_with(|| Arc::new(RetryBudget::new(settings.ratio, settings.min_per_second)))
            .clone()
    }
}

/// Outstanding requests per destination service.
#[derive(Default)]
pub struct Outstanding {
    map: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicU32>>>,
}

/// One outstanding request; released when dropped.
pub struct OutstandingSlot(Arc<std::sync::atomic::AtomicU32>);

impl OutstandingSlot {
    /// Takes a slot on `counter` unless `limit` requests are already outstanding.
    pub fn acquire(
        counter: &Arc<std::sync::atomic::AtomicU32>,
        limit: Option<u32>,
    ) -> Option<Self> {
        let previous = counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if limit.is_some_and(|max| previous >= max) {
            counter.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return None;
        }
        Some(Self(counter.clone()))
    }
}

impl Drop for OutstandingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Outstanding {
    /// Forgets the counters nothing else holds (no compiled route, no request in flight).
    pub fn retain_live(&self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, counter| Arc::strong_count(counter) > 1);
    }

    /// The counter of `service` (created on first use; kept for the process's life, so a new
    /// snapshot's route counts on from the old one's).
    pub fn counter(&self, service: &str) -> Arc<std::sync::atomic::AtomicU32> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(service.to_string()).or_default().clone()
    }

    /// Takes a slot for `service` unless `limit` requests are already outstanding.
    pub fn try_acquire(&self, service: &str, limit: Option<u32>) -> Option<OutstandingSlot> {
        OutstandingSlot::acquire(&self.counter(service), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const POLICY: &str = "apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: s }
spec:
  service: s
  timeouts: { request: 2s, perAttempt: 500ms }
  retries: { maxAttempts: 4, retryOn: [gateway-error] }
  routes:
    - match: { path: { prefix: /slow } }
      timeouts: { perAttempt: 3s }
";

    #[test]
    fn routes_override_and_defaults_fill_in() {
        let policy = TrafficPolicy::parse(Path::new("p.yaml"), POLICY).unwrap();
        let plan = AttemptPlan::resolve(Some(&policy), "GET", "/fast", |_| None);
        assert_eq!(plan.max_attempts, 4);
        assert_eq!(plan.per_attempt, Some(Duration::from_millis(500)));
        assert_eq!(plan.request_timeout, Some(Duration::from_secs(2)));
        let slow = AttemptPlan::resolve(Some(&policy), "GET", "/slow/x", |_| None);
        assert_eq!(slow.per_attempt, Some(Duration::from_secs(3)));
        assert_eq!(
            slow.request_timeout, None,
            "a route's timeouts replace the service's"
        );
        assert_eq!(slow.max_attempts, 4, "retries fall back to the service's");
        let none = AttemptPlan::resolve(None, "GET", "/", |_| None);
        assert_eq!(none, AttemptPlan::default());
        assert_eq!(none.max_attempts, 2);
        assert_eq!(none.stream_idle, Duration::from_secs(300));
    }
}
