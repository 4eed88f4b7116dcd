//! `kind: TrafficPolicy` — resilience settings for calls *to* a destination service, applied by
//! the caller's outbound sidecar (DESIGN.md §5). Field names follow Envoy/Istio where they mean
//! the same thing; `retries.maxAttempts` counts TOTAL tries (like gRPC's retry policy and
//! Temporal), so Istio's `attempts` (which counts retries) is rejected with a hint.
//!
//! ```yaml
//! apiVersion: meshflow.io/v1alpha1
//! kind: TrafficPolicy
//! metadata: { name: shipping, namespace: default }
//! spec:
//!   service: shipping                       # destination, in metadata.namespace
//!   timeouts: { request: 2s, perAttempt: 500ms }
//!   retries:
//!     maxAttempts: 3
//!     retryOn: [connect-failure, refused-stream, gateway-error, 429, unavailable]
//!     backoff: { base: 25ms, max: 250ms, maxRetryAfter: 10s }
//!     budget: { ratio: 0.2, minPerSecond: 10 }
//!   routes:
//!     - match: { path: { prefix: /slow }, method: GET }
//!       timeouts: { perAttempt: 2s }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::SpecDuration;
use crate::load::{find_line, parse_yaml, LoadError, Result};
use crate::mesh::{ObjectMeta, API_VERSION};

/// A whole `TrafficPolicy` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// `meshflow.io/v1alpha1`.
    pub api_version: String,
    /// `TrafficPolicy`.
    pub kind: String,
    /// Name and namespace (the destination service's namespace; default `default`).
    pub metadata: ObjectMeta,
    /// The policy.
    pub spec: TrafficPolicySpec,
}

/// Settings for one destination service; `routes` narrow them by request.
#[cfg_attr(
    feature = "kubernetes",
    derive(kube::CustomResource),
    kube(
        group = "meshflow.io",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        doc = "Timeouts, retries with a budget, outlier detection and load balancing for one destination service.",
        root = "TrafficPolicyResource",
        namespaced,
        status = "crate::crd::ResourceStatus",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// Destination service name, in `metadata.namespace`.
    pub service: String,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Limits on connections and requests (overflow → 503 at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Endpoint choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Injected delays and aborts (tests, game days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
    /// Per-route overrides, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// Timeouts (durations with units).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Until response headers, across all attempts; then 504 (gRPC `DEADLINE_EXCEEDED`).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<SpecDuration>,
    /// Until response headers of one attempt. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_attempt: Option<SpecDuration>,
    /// No bytes in either direction after response headers. Default 5 min.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle: Option<SpecDuration>,
    /// TCP + TLS connect. Default 1 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<SpecDuration>,
}

/// Default `streamIdle`.
pub const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(300);
/// Default `connect`.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(1);
/// Longest duration a TrafficPolicy may hold (keeps every deadline arithmetic in range).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Largest `maxAttempts` accepted: nothing unbounded, and no retry storms by configuration.
pub const MAX_ATTEMPTS_LIMIT: u32 = 10;

/// Retry settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retries {
    /// TOTAL tries including the first (1 = no retry), at most [`MAX_ATTEMPTS_LIMIT`].
    /// Required (0 = missing).
    #[serde(default)]
    pub max_attempts: u32,
    /// Conditions that make an attempt retryable.
    #[serde(default)]
    pub retry_on: Vec<RetryOn>,
    /// Also retry methods that are not idempotent (RFC 9110 §9.2.2). Default false.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Backoff between attempts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Retry budget.
    #[serde(default)]
    pub budget: Budget,
    /// Istio's field; present only to be rejected with a hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::integer")]
    pub attempts: Option<serde_yaml::Value>,
}

/// Exponential backoff with full jitter: attempt n waits uniform(0, min(max, base·2ⁿ⁻¹)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    /// Default 25 ms.
    #[serde(default = "Backoff::default_base")]
    pub base: SpecDuration,
    /// Default 250 ms.
    #[serde(default = "Backoff::default_max")]
    pub max: SpecDuration,
    /// Longest `Retry-After` / `grpc-retry-pushback-ms` honoured. Default 10 s.
    #[serde(default = "Backoff::default_max_retry_after")]
    pub max_retry_after: SpecDuration,
}

impl Backoff {
    fn default_base() -> SpecDuration {
        Duration::from_millis(25).into()
    }
    fn default_max() -> SpecDuration {
        Duration::from_millis(250).into()
    }
    fn default_max_retry_after() -> SpecDuration {
        Duration::from_secs(10).into()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Self::default_base(),
            max: Self::default_max(),
            max_retry_after: Self::default_max_retry_after(),
        }
    }
}

/// Retry budget: retries may add at most `ratio` of the requests of the last 10 s, plus
/// `minPerSecond` retries per second regardless (Finagle/Linkerd's budget).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Budget {
    /// Default 0.2.
    #[serde(default = "Budget::default_ratio")]
    pub ratio: f64,
    /// Default 10.
    #[serde(default = "Budget::default_min_per_second")]
    pub min_per_second: u32,
}

impl Budget {
    fn default_ratio() -> f64 {
        0.2
    }
    fn default_min_per_second() -> u32 {
        10
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            ratio: Self::default_ratio(),
            min_per_second: Self::default_min_per_second(),
        }
    }
}

/// A retry condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
#[schemars(schema_with = "crate::schema::int_or_string")]
pub enum RetryOn {
    /// A named condition.
    Condition(RetryCondition),
    /// An HTTP status code, e.g. `503`.
    Status(u16),
}

/// Named retry conditions (Envoy's `retry_on` words, gRPC status names in kebab case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryCondition {
    /// The connection could not be established (never reached the server).
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM (never processed by the server).
    RefusedStream,
    /// The connection or stream was reset before response headers.
    Reset,
    /// The attempt hit `perAttempt`.
    PerAttemptTimeout,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// gRPC CANCELLED.
    Cancelled,
    /// gRPC DEADLINE_EXCEEDED.
    DeadlineExceeded,
    /// gRPC INTERNAL.
    Internal,
    /// gRPC RESOURCE_EXHAUSTED.
    ResourceExhausted,
    /// gRPC UNAVAILABLE.
    Unavailable,
}

/// Outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive failures (5xx, connect failure, reset) that eject an endpoint. Default 5.
    #[serde(default = "OutlierDetection::default_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection time; the n-th ejection lasts n times as long. Default 30 s.
    #[serde(default = "OutlierDetection::default_base_ejection")]
    pub base_ejection_time: SpecDuration,
    /// Largest share of endpoints ejected at once, percent. Default 50.
    #[serde(default = "OutlierDetection::default_max_ejected")]
    pub max_ejected_percent: u32,
}

impl OutlierDetection {
    fn default_consecutive() -> u32 {
        5
    }
    fn default_base_ejection() -> SpecDuration {
        Duration::from_secs(30).into()
    }
    fn default_max_ejected() -> u32 {
        50
    }
}

/// Connection-pool limits; a request over a limit gets 503 at once (counted).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for the service, across endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_endpoint: Option<u32>,
}

/// Load-balancing algorithm.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    /// The algorithm.
    #[serde(default)]
    pub policy: LoadBalancerPolicy,
}

/// Load-balancing algorithms.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerPolicy {
    /// Power of two choices over peak-EWMA latency × in-flight (Linkerd's default).
    #[default]
    P2cPeakEwma,
    /// Round robin.
    RoundRobin,
    /// Fewest requests in flight (of two random choices).
    LeastRequest,
}

/// Fault injection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjection {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Abort a share of requests with a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests, 0–100.
    pub percent: f64,
    /// How long.
    pub duration: SpecDuration,
}

/// Injected abort.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests, 0–100.
    pub percent: f64,
    /// HTTP status to answer.
    pub status: u16,
}

/// A per-route override.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// What the request must look like.
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    /// Replaces the service's timeouts for matching requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Replaces the service's retries for matching requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Replaces the service's fault injection for matching requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
}

/// Route match; every given part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path match (on the path without query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Method, exact (case-sensitive, RFC 9110 §9.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header name (case-insensitive) → exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Path match: exactly one of `exact` or `prefix` (segment-aware: `/a` matches `/a`, `/a/b`,
/// not `/ab`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

impl RouteMatch {
    /// Whether a request matches. `headers` yields (lower-case name, value) pairs.
    pub fn matches<'a>(
        &self,
        method: &str,
        path: &str,
        mut header: impl FnMut(&str) -> Option<&'a str>,
    ) -> bool {
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        if let Some(p) = &self.path {
            let path = path.split('?').next().unwrap_or(path);
            if let Some(exact) = &p.exact {
                if path != exact {
                    return false;
                }
            }
            if let Some(prefix) = &p.prefix {
                let prefix = prefix.trim_end_matches('/');
                let ok = prefix.is_empty()
                    || path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'));
                if !ok {
                    return false;
                }
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| header(&name.to_ascii_lowercase()) == Some(value.as_str()))
    }
}

impl TrafficPolicy {
    /// Every duration in the policy with its field path.
    fn durations(&self) -> Vec<(String, SpecDuration)> {
        let mut out = Vec::new();
        let mut timeouts = |prefix: &str, t: &Option<Timeouts>| {
            if let Some(t) = t {
                for (name, d) in [
                    ("request", t.request),
                    ("perAttempt", t.per_attempt),
                    ("streamIdle", t.stream_idle),
                    ("connect", t.connect),
                ] {
                    if let Some(d) = d {
                        out.push((format!("{prefix}.timeouts.{name}"), d));
                    }
                }
            }
        };
        timeouts("spec", &self.spec.timeouts);
        for (i, r) in self.spec.routes.iter().enumerate() {
            timeouts(&format!("spec.routes[{i}]"), &r.timeouts);
        }
        let mut retries = |prefix: String, r: &Option<Retries>| {
            if let Some(r) = r {
                out.push((format!("{prefix}.retries.backoff.base"), r.backoff.base));
                out.push((format!("{prefix}.retries.backoff.max"), r.backoff.max));
                out.push((
                    format!("{prefix}.retries.backoff.maxRetryAfter"),
                    r.backoff.max_retry_after,
                ));
            }
        };
        retries("spec".into(), &self.spec.retries);
        for (i, r) in self.spec.routes.iter().enumerate() {
            retries(format!("spec.routes[{i}]"), &r.retries);
        }
        if let Some(o) = &self.spec.outlier_detection {
            out.push((
                "spec.outlierDetection.baseEjectionTime".into(),
                o.base_ejection_time,
            ));
        }
        let mut faults = |prefix: String, f: &Option<FaultInjection>| {
            if let Some(d) = f.and_then(|f| f.delay) {
                out.push((
                    format!("{prefix}.faultInjection.delay.duration"),
                    d.duration,
                ));
            }
        };
        faults("spec".into(), &self.spec.fault_injection);
        for (i, r) in self.spec.routes.iter().enumerate() {
            faults(format!("spec.routes[{i}]"), &r.fault_injection);
        }
        out
    }

    /// Namespace (default `default`).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// Parses and validates one document (`file` for messages).
    ///
    /// # Errors
    /// [`LoadError`] with file, field path and line.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let policy: TrafficPolicy = parse_yaml(file, text)?;
        policy.validate(file, text)?;
        Ok(policy)
    }

    /// Checks the rules serde cannot express.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] naming the field.
    pub fn validate(&self, file: &Path, text: &str) -> Result<()> {
        let invalid = |field: &str, key: &str, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line: find_line(text, key, ""),
            field: field.to_string(),
            message,
        };
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                "apiVersion",
                format!("must be {API_VERSION}"),
            ));
        }
        if self.kind != "TrafficPolicy" {
            return Err(invalid("kind", "kind", "must be TrafficPolicy".into()));
        }
        for (field, d) in self.durations() {
            if d.get() > MAX_DURATION {
                return Err(invalid(
                    &field,
                    "",
                    format!("{d} is longer than the 24h limit"),
                ));
            }
        }
        if self.spec.service.is_empty() {
            return Err(invalid(
                "spec.service",
                "service",
                "names the destination service; required".into(),
            ));
        }
        let check_retries = |prefix: &str, r: &Retries| -> Result<()> {
            if r.attempts.is_some() {
                return Err(invalid(
                    &format!("{prefix}.attempts"),
                    "attempts",
                    "not supported: meshflow counts TOTAL tries; use maxAttempts (Istio's attempts: 2 is maxAttempts: 3)".into(),
                ));
            }
            if r.max_attempts == 0 || r.max_attempts > MAX_ATTEMPTS_LIMIT {
                return Err(invalid(
                    &format!("{prefix}.maxAttempts"),
                    "maxAttempts",
                    format!(
                        "required, 1..={MAX_ATTEMPTS_LIMIT} (total tries, including the first)"
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&r.budget.ratio) {
                return Err(invalid(
                    &format!("{prefix}.budget.ratio"),
                    "ratio",
                    "must be between 0 and 1".into(),
                ));
            }
            for on in &r.retry_on {
                if let RetryOn::Status(code) = on {
                    if !(100..=599).contains(code) {
                        return Err(invalid(
                            &format!("{prefix}.retryOn"),
                            "retryOn",
                            format!("{code} is not an HTTP status"),
                        ));
                    }
                }
            }
            if r.backoff.base.get() > r.backoff.max.get() {
                return Err(invalid(
                    &format!("{prefix}.backoff"),
                    "backoff",
                    "base must not exceed max".into(),
                ));
            }
            Ok(())
        };
        if let Some(r) = &self.spec.retries {
            check_retries("spec.retries", r)?;
        }
        for (i, route) in self.spec.routes.iter().enumerate() {
            if let Some(r) = &route.retries {
                check_retries(&format!("spec.routes[{i}].retries"), r)?;
            }
            if let Some(p) = &route.matches.path {
                if p.exact.is_some() == p.prefix.is_some() {
                    return Err(invalid(
                        &format!("spec.routes[{i}].match.path"),
                        "path",
                        "give exactly one of exact or prefix".into(),
                    ));
                }
            }
        }
        let check_fault = |field: &str, f: &FaultInjection| -> Result<()> {
            let pct_ok = |p: f64| (0.0..=100.0).contains(&p);
            if f.delay.is_some_and(|d| !pct_ok(d.percent))
                || f.abort.is_some_and(|a| !pct_ok(a.percent))
            {
                return Err(invalid(
                    field,
                    "percent",
                    "percent must be between 0 and 100".into(),
                ));
            }
            if f.abort.is_some_and(|a| !(200..=599).contains(&a.status)) {
                return Err(invalid(
                    field,
                    "status",
                    "abort status must be 200..=599".into(),
                ));
            }
            Ok(())
        };
        if let Some(f) = &self.spec.fault_injection {
            check_fault("spec.faultInjection", f)?;
        }
        if self
            .spec
            .connection_pool
            .is_some_and(|p| p.max_connections.is_some())
        {
            return Err(invalid(
                "spec.connectionPool.maxConnections",
                "maxConnections",
                "not supported yet (sidecars multiplex HTTP/2; limit maxRequestsPerEndpoint instead)".into(),
            ));
        }
        if let Some(o) = &self.spec.outlier_detection {
            if o.consecutive_failures == 0 || o.max_ejected_percent > 100 {
                return Err(invalid(
                    "spec.outlierDetection",
                    "outlierDetection",
                    "consecutiveFailures must be ≥ 1 and maxEjectedPercent ≤ 100".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: shipping
  namespace: shop
spec:
  service: shipping
  timeouts:
    request: 2s
    perAttempt: 500ms
  retries:
    maxAttempts: 3
    retryOn: [connect-failure, gateway-error, 429, unavailable, 5xx]
    budget: { ratio: 0.2, minPerSecond: 10 }
  routes:
    - match: { path: { prefix: /slow }, method: GET }
      timeouts: { perAttempt: 2s }
";

    fn parse(text: &str) -> Result<TrafficPolicy> {
        TrafficPolicy::parse(Path::new("tp.yaml"), text)
    }

    #[test]
    fn parses_the_documented_shape() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.namespace(), "shop");
        let r = p.spec.retries.as_ref().unwrap();
        assert_eq!(r.max_attempts, 3);
        assert_eq!(
            r.retry_on,
            vec![
                RetryOn::Condition(RetryCondition::ConnectFailure),
                RetryOn::Condition(RetryCondition::GatewayError),
                RetryOn::Status(429),
                RetryOn::Condition(RetryCondition::Unavailable),
                RetryOn::Condition(RetryCondition::FiveXx),
            ]
        );
        assert_eq!(r.backoff, Backoff::default());
        assert_eq!(
            p.spec.timeouts.unwrap().per_attempt.unwrap().get(),
            Duration::from_millis(500)
        );
        assert!(p.spec.routes[0]
            .matches
            .matches("GET", "/slow/x?y", |_| None));
        assert!(!p.spec.routes[0].matches.matches("GET", "/slower", |_| None));
        assert!(!p.spec.routes[0].matches.matches("POST", "/slow", |_| None));
    }

    #[test]
    fn istio_attempts_is_rejected_with_a_hint() {
        let text = GOOD.replace("maxAttempts: 3", "attempts: 2\n    maxAttempts: 3");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field(), "spec.retries.attempts");
        assert!(err.to_string().contains("use maxAttempts"), "{err}");
        assert_eq!(err.line(), 12, "{err}");
    }

    #[test]
    fn bare_numbers_unknown_words_and_limits_are_rejected() {
        let err = parse(&GOOD.replace("request: 2s", "request: 2")).unwrap_err();
        assert_eq!(err.field(), "spec.timeouts.request");
        assert!(err.to_string().contains("ambiguous"), "{err}");
        let err = parse(&GOOD.replace("unavailable,", "sometimes,")).unwrap_err();
        assert!(err.field().starts_with("spec.retries.retryOn"), "{err}");
        let err = parse(&GOOD.replace("request: 2s", "request: 400000000000y")).unwrap_err();
        assert_eq!(err.field(), "spec.timeouts.request", "{err}");
        let err = parse(&GOOD.replace("maxAttempts: 3", "maxAttempts: 1000")).unwrap_err();
        assert_eq!(err.field(), "spec.retries.maxAttempts");
        let err = parse(&GOOD.replace("perAttempt: 500ms", "perAtempt: 500ms")).unwrap_err();
        assert_eq!(err.field(), "spec.timeouts.perAtempt");
        assert_eq!(err.line(), 10);
    }
}
