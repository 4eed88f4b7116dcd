//! The outbound listener (Pingora adapter): requests from the local app (127.0.0.1 only) are
//! routed by authority to a mesh service, sent to one of its endpoints over mTLS (HTTP/2), and
//! the server must prove the destination's expected identity. A connection the capture rules
//! redirected here ([`crate::outbound::transparent`]) is routed by its original destination instead (a
//! service's cluster IP, or one endpoint's pod IP); everything after routing is the same.
//!
//! Resilience: the destination's TrafficPolicy (or the defaults) becomes an [`AttemptPlan`];
//! the decisions come from [`crate::outbound::resilience`]. Retries are Pingora retries: a retryable
//! response is turned into a retryable error in `upstream_response_filter` (nothing has been
//! sent downstream yet), Pingora replays the buffered request body (64 KiB), and
//! `upstream_peer` waits the backoff and picks another endpoint when there is one.

pub mod balancer;
pub mod plan;
pub mod resilience;
pub mod route;
pub mod routing;
pub mod transparent;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::http::listener::{refuse_bad_request, respond_to_failure, scrub_forwarded_request};
use crate::outbound::balancer::{Balancer, EndpointStats, Health, InFlight};
use crate::outbound::plan::{AttemptPlan, OutstandingSlot};
use crate::outbound::resilience::{
    backoff_delay, format_grpc_timeout, is_idempotent, matches_retry_on, parse_grpc_pushback,
    parse_grpc_timeout, parse_retry_after, pushback_wait, AttemptOutcome, Pushback, RetryBudget,
};
use crate::outbound::route::{RouteEndpoint, ServiceRoute};
use crate::outbound::routing::{parse_authority, with_service};
use crate::shared::Shared;
use meshflow_telemetry::SpanTrait as _;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// Deadline header an app may set on the outbound listener (milliseconds); removed before
/// forwarding.
pub const TIMEOUT_HEADER: &str = "meshflow-timeout-ms";

/// Request header from the local app (outbound only, never forwarded): no *new* upstream
/// attempt (retry) starts after this many milliseconds, while an attempt already started may
/// still answer until `meshflow-timeout-ms`. The workflow coordinator sends its attempt's
/// deadline here and that deadline plus a grace as `meshflow-timeout-ms`, so the sidecar never
/// cuts before the coordinator decides and never sends the call again after it gave up.
pub const RETRY_DEADLINE_HEADER: &str = "meshflow-retry-deadline-ms";

/// Response header on every error response the outbound sidecar generates itself (like
/// Linkerd's `l5d-proxy-error`), so a caller can tell the mesh's answer from the service's.
/// Values: `no-config`, `unknown-service`, `no-endpoint`, `connect-failed` (no byte of the
/// request reached any endpoint: safe to send again), `pending-limit`, `endpoint-limit`,
/// `bad-deadline` (400: an unreadable `meshflow-timeout-ms` or `meshflow-retry-deadline-ms`),
/// `timeout` and `upstream-failed` (an attempt may have reached the service).
pub const PROXY_ERROR_HEADER: &str = "meshflow-proxy-error";

/// A caller deadline header (`meshflow-timeout-ms`, `meshflow-retry-deadline-ms`): absent, or
/// exactly one whole number of milliseconds.
///
/// # Errors
/// The 400 body naming the header and what was sent (repeated, or not a number).
fn deadline_header(
    headers: &http::HeaderMap,
    name: &str,
) -> std::result::Result<Option<Duration>, String> {
    if !headers.contains_key(name) {
        return Ok(None);
    }
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .collect();
    match values[..] {
        [] => Ok(None),
        [one] => one
            .trim()
            .parse::<u64>()
            .map(|ms| Some(Duration::from_millis(ms)))
            .map_err(|_| bad_deadline(name, &values)),
        _ => Err(bad_deadline(name, &values)),
    }
}

fn bad_deadline(name: &str, values: &[&str]) -> String {
    let shown: String = values.join(", ").chars().take(64).collect();
    format!("meshflow: {name} must be one whole number of milliseconds, got {shown:?}\n")
}

/// Writes an error response of our own: `status`, [`PROXY_ERROR_HEADER`] = `reason`, and a
/// plain-text `body` (may be empty). The connection is not reused (Pingora closes it after an
/// error response).
async fn respond_proxy_error(
    session: &mut Session,
    status: u16,
    reason: &str,
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if !body.is_empty() {
        resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    }
    resp.insert_header(http::header::CACHE_CONTROL, "private, no-store")?;
    resp.insert_header(PROXY_ERROR_HEADER, reason)?;
    session
        .as_downstream_mut()
        .write_error_response(resp, body)
        .await
}

/// Per-request state.
pub struct OutboundCtx {
    start: Instant,
    /// The destination's compiled route, once routed (its label is bounded: only services
    /// that exist in the snapshot).
    route: Option<Arc<ServiceRoute>>,
    /// The current (or last) attempt's endpoint.
    endpoint: Option<Arc<RouteEndpoint>>,
    /// Endpoints tried so far (a retry prefers another).
    tried: Vec<Arc<RouteEndpoint>>,
    /// Attempts started.
    attempts: u32,
    plan: Arc<AttemptPlan>,
    budget: Option<Arc<RetryBudget>>,
    /// No attempt starts after this; until response headers only.
    deadline: Option<Instant>,
    /// No retry starts after this (`meshflow-retry-deadline-ms`).
    retry_deadline: Option<Instant>,
    /// When the current attempt started.
    attempt_started: Option<Instant>,
    /// Set when the current attempt's outcome was judged retryable: wait this long first.
    retry_wait: Option<Duration>,
    /// Request method permits replay after the server may have acted.
    replay_safe: bool,
    grpc: bool,
    /// Response headers were passed on to the app (no retry, only streamIdle from now on).
    responded: bool,
    /// Which timeout ended the request, if one did.
    timed_out: Option<&'static str>,
    /// The current attempt's endpoint statistics and in-flight guard.
    attempt_stats: Option<Arc<EndpointStats>>,
    in_flight: Option<AttemptGuard>,
    /// This request's `maxPendingRequests` slot.
    outstanding: Option<OutstandingSlot>,
    /// The client span (OpenTelemetry), one per request across its attempts.
    span: Option<meshflow_telemetry::Span>,
    /// gRPC status of the response, as a metric label.
    grpc_status: Option<String>,
    /// Some attempt got a connection to an endpoint: the request may have reached it.
    connected: bool,
    /// A captured connection to a pod IP: every attempt goes to this endpoint.
    pinned: Option<Arc<RouteEndpoint>>,
    /// A captured connection: the port on the destination pod and whether the app spoke
    /// HTTP/2 (sent as [`crate::outbound::transparent::TARGET_PORT_HEADER`]).
    target_port: Option<(u16, bool)>,
}

/// The plan of a request not routed yet (shared, never changed).
fn default_plan() -> Arc<AttemptPlan> {
    static DEFAULT: std::sync::OnceLock<Arc<AttemptPlan>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| Arc::new(AttemptPlan::default()))
        .clone()
}

/// Holds an attempt's in-flight counts (balancer and metric) until dropped.
struct AttemptGuard {
    _in_flight: InFlight,
    gauge: prometheus::IntGauge,
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The outbound side's own state: the compiled routes in force and what must outlive a
/// snapshot (endpoint statistics, retry budgets, pending counts). Shared by the outbound
/// listener (both of its HTTP proxies) and the control-plane client, which compiles each
/// snapshot into routes.
#[derive(Default)]
pub struct OutboundState {
    /// The routes in force, with the snapshot they came from (swapped atomically).
    pub routes: arc_swap::ArcSwap<route::RouteTable>,
    /// Retry budgets per destination service (and budget settings).
    pub budgets: plan::Budgets,
    /// Endpoint statistics (latency, in-flight, ejection) by address.
    pub balancer: Balancer,
    /// Outstanding requests per destination service (for `maxPendingRequests`).
    pub outstanding: plan::Outstanding,
}

impl OutboundState {
    /// Compiles `snapshot` and puts its routes in force, then forgets the state of endpoints
    /// and services no route and no request in flight holds any more (pods come and go: the
    /// registries must not grow for ever).
    pub fn apply(&self, snapshot: Arc<crate::config::ConfigSnapshot>) {
        self.routes
            .store(Arc::new(route::RouteTable::compile(snapshot, self)));
        self.balancer.retain_live();
        self.budgets.retain_live();
        self.outstanding.retain_live();
    }
}

/// The outbound `ProxyHttp`.
pub struct OutboundProxy {
    shared: Shared,
    state: Arc<OutboundState>,
}

impl OutboundProxy {
    /// A proxy over `shared` and the outbound `state`.
    pub fn new(shared: Shared, state: Arc<OutboundState>) -> Self {
        Self { shared, state }
    }
}

/// The request's authority: absolute-form target host (RFC 9112 §3.2.2) or `:authority`, else
/// `Host`.
fn authority(req: &RequestHeader) -> Option<&str> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str());
    }
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the server refused the stream before processing it (HTTP/2 REFUSED_STREAM, RFC 9113
/// §8.7): walks the error's cause chain to the h2 error.
fn is_refused_stream(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.cause.as_deref().map(|c| c as _);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_reset()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        if let Some(inner) = err.downcast_ref::<Error>() {
            cause = inner.cause.as_deref().map(|c| c as _);
            continue;
        }
        cause = err.source();
    }
    false
}

/// The metric/log word for an outcome.
fn outcome_reason(outcome: AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::ConnectFailure => "connect-failure".into(),
        AttemptOutcome::RefusedStream => "refused-stream".into(),
        AttemptOutcome::Reset => "reset".into(),
        AttemptOutcome::PerAttemptTimeout => "per-attempt-timeout".into(),
        AttemptOutcome::Response {
            grpc_status: Some(g),
            ..
        } if g != 0 && g <= 16 => format!("grpc-{g}"),
        AttemptOutcome::Response {
            grpc_status: Some(g),
            ..
        } if g > 16 => "grpc-invalid".into(),
        AttemptOutcome::Response { status, .. } => format!("status-{status}"),
    }
}

impl OutboundProxy {
    async fn reject(&self, session: &mut Session, reason: &str, message: String) -> Result<bool> {
        self.shared
            .metrics
            .rejected_requests
            .with_label_values(&["outbound", reason])
            .inc();
        self.shared.metrics.count_refused(
            "outbound",
            self.shared.workload_name(),
            &self.shared.namespace,
            503,
        );
        respond_proxy_error(
            session,
            503,
            &reason.replace('_', "-"),
            Bytes::from(format!("meshflow: {message}\n")),
        )
        .await?;
        Ok(true)
    }

    fn service_label<'a>(&self, ctx: &'a OutboundCtx) -> &'a str {
        ctx.route.as_deref().map_or("unknown", |r| &r.label)
    }

    /// Decides whether the attempt that ended with `outcome` is retried; on yes records the wait
    /// in `ctx.retry_wait` and counts the retry. `pushback` is the server's requested wait.
    fn decide_retry(
        &self,
        session: &Session,
        ctx: &mut OutboundCtx,
        outcome: AttemptOutcome,
        pushback: Option<Pushback>,
    ) -> bool {
        ctx.retry_wait = None;
        if ctx.responded || ctx.attempts >= ctx.plan.max_attempts {
            return false;
        }
        if !matches_retry_on(&ctx.plan.retry_on, outcome, ctx.replay_safe) {
            return false;
        }
        let service = self.service_label(ctx).to_string();
        let metrics = &self.shared.metrics;
        // Even a refused stream may have consumed body bytes past the replay buffer.
        if session.as_ref().retry_buffer_truncated() {
            metrics
                .retry_skipped
                .with_label_values(&[&service, "body"])
                .inc();
            return false;
        }
        let now = Instant::now();
        let remaining = ctx.deadline.map(|d| d.saturating_duration_since(now));
        let wait = match pushback {
            Some(Pushback::DoNotRetry) => {
                metrics
                    .retry_skipped
                    .with_label_values(&[&service, "pushback"])
                    .inc();
                return false;
            }
            Some(Pushback::Wait(asked)) => {
                match pushback_wait(asked, ctx.plan.backoff.max_retry_after.get(), remaining) {
                    Some(wait) => wait,
                    None => {
                        metrics
                            .retry_skipped
                            .with_label_values(&[&service, "pushback"])
                            .inc();
                        return false;
                    }
                }
            }
            None => backoff_delay(
                ctx.attempts,
                ctx.plan.backoff.base.get(),
                ctx.plan.backoff.max.get(),
                rand::random::<f64>(),
            ),
        };
        let retry_left = ctx.retry_deadline.map(|d| d.saturating_duration_since(now));
        if remaining.is_some_and(|left| wait >= left) || retry_left.is_some_and(|left| wait >= left)
        {
            metrics
                .retry_skipped
                .with_label_values(&[&service, "deadline"])
                .inc();
            return false;
        }
        if let Some(budget) = &ctx.budget {
            if !budget.try_retry(now) {
                metrics
                    .retry_budget_exhausted
                    .with_label_values(&[&service])
                    .inc();
                return false;
            }
        }
        metrics
            .retries
            .with_label_values(&[&service, &outcome_reason(outcome)])
            .inc();
        ctx.retry_wait = Some(wait);
        true
    }

    /// Records the current attempt's health (and latency until headers) for balancing and
    /// outlier ejection.
    fn record_health(&self, ctx: &mut OutboundCtx, health: Health, with_latency: bool) {
        let Some(stats) = ctx.attempt_stats.take() else {
            return;
        };
        let now = Instant::now();
        let latency = if with_latency {
            ctx.attempt_started
                .map(|t| now.saturating_duration_since(t))
        } else {
            None
        };
        if Balancer::record(&stats, health, latency, ctx.plan.outlier.as_ref(), now) {
            let service = self.service_label(ctx).to_string();
            self.shared
                .metrics
                .endpoint_ejections
                .with_label_values(&[&service])
                .inc();
            let endpoint = ctx
                .endpoint
                .as_ref()
                .map(|e| e.endpoint.address.clone())
                .unwrap_or_default();
            tracing::warn!(%service, %endpoint, "endpoint ejected after consecutive failures");
        }
    }

    fn count_grpc_status(&self, ctx: &mut OutboundCtx, status: &str) {
        let label = crate::shared::grpc_status_label(status);
        ctx.grpc_status = Some(label.clone());
        let service = self.service_label(ctx);
        self.shared
            .metrics
            .grpc_responses
            .with_label_values(&[service, &label])
            .inc();
    }

    /// Classifies a transport error of the current attempt.
    fn classify_error(&self, e: &Error, ctx: &mut OutboundCtx) -> AttemptOutcome {
        match e.etype() {
            ErrorType::ReadTimedout => {
                let kind = if ctx.responded {
                    "stream_idle"
                } else if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
                    "request"
                } else {
                    "per_attempt"
                };
                ctx.timed_out = Some(kind);
                let service = self.service_label(ctx).to_string();
                self.shared
                    .metrics
                    .timeouts
                    .with_label_values(&[&service, kind])
                    .inc();
                AttemptOutcome::PerAttemptTimeout
            }
            _ if is_refused_stream(e) => AttemptOutcome::RefusedStream,
            _ => AttemptOutcome::Reset,
        }
    }
}

#[async_trait]
impl ProxyHttp for OutboundProxy {
    type CTX = OutboundCtx;

    fn new_ctx(&self) -> Self::CTX {
        OutboundCtx {
            start: Instant::now(),
            route: None,
            endpoint: None,
            tried: Vec::new(),
            attempts: 0,
            plan: default_plan(),
            budget: None,
            deadline: None,
            retry_deadline: None,
            attempt_started: None,
            retry_wait: None,
            replay_safe: false,
            grpc: false,
            responded: false,
            timed_out: None,
            attempt_stats: None,
            in_flight: None,
            outstanding: None,
            span: None,
            grpc_status: None,
            connected: false,
            pinned: None,
            target_port: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        {
            let req = session.req_header();
            let parent = self.shared.tracing.extract(&req.headers);
            ctx.span = Some(self.shared.tracing.start(
                crate::shared::method_span_name(&req.method),
                SpanKind::Client,
                &parent,
                || {
                    vec![
                        KeyValue::new("http.request.method", req.method.as_str().to_string()),
                        KeyValue::new("meshflow.direction", "outbound"),
                    ]
                },
            ));
        }
        if refuse_bad_request(session, &self.shared, "outbound").await? {
            return Ok(true);
        }
        let routes = self.state.routes.load_full();
        let Some(snapshot) = routes.snapshot.as_deref() else {
            return self
                .reject(session, "no_config", "sidecar has no config yet".into())
                .await;
        };
        // A connection the capture rules redirected is routed by its original destination
        // (`transparent`); an explicit one by the request's authority.
        let redirected = session
            .digest()
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|d| crate::outbound::transparent::redirected_destination(d));
        let route = if let Some(original) = redirected {
            let destination = snapshot.destination(original);
            let route = destination
                .as_ref()
                .and_then(|d| routes.get(&d.service.0, &d.service.1));
            let (Some(destination), Some(route)) = (&destination, route) else {
                return self
                    .reject(
                        session,
                        "unknown_service",
                        format!("{original} is not a mesh service"),
                    )
                    .await;
            };
            if let Some(pinned) = &destination.pinned {
                // The pod the app dialled, and only that one (never fall back to the service).
                let Some(endpoint) = route
                    .endpoint_at(&pinned.address)
                    .cloned()
                    .or_else(|| RouteEndpoint::new(pinned, &self.state).map(Arc::new))
                else {
                    return self
                        .reject(
                            session,
                            "no_endpoint",
                            format!("{original} is not a usable endpoint"),
                        )
                        .await;
                };
                ctx.pinned = Some(endpoint);
            }
            ctx.target_port = Some((destination.target_port, session.as_ref().is_http2()));
            route.clone()
        } else {
            let authority = authority(session.req_header()).unwrap_or_default();
            match with_service(authority, &self.shared.namespace, |name, namespace| {
                routes.get(name, namespace).cloned()
            }) {
                Some(Some(route)) => route,
                Some(None) => {
                    let name = parse_authority(authority, &self.shared.namespace)
                        .map(|n| format!("{}.{}", n.name, n.namespace))
                        .unwrap_or_default();
                    return self
                        .reject(
                            session,
                            "unknown_service",
                            format!("unknown service {name}"),
                        )
                        .await;
                }
                None => {
                    let shown: String = authority.chars().take(128).collect();
                    return self
                        .reject(
                            session,
                            "unknown_service",
                            format!("{shown:?} is not a mesh service (use <service>.<namespace>)"),
                        )
                        .await;
                }
            }
        };
        if route.endpoints.is_empty() {
            return self
                .reject(
                    session,
                    "no_endpoint",
                    format!("service {} has no ready endpoint", route.label),
                )
                .await;
        }
        // The service's zero-valued series exist from its first request on.
        route.attempts(&self.shared);

        let now = Instant::now();
        let req = session.req_header();
        let method = req.method.as_str();
        let headers = &req.headers;
        let plan = route.plan(method, req.uri.path(), |n| header_str(headers, n));
        ctx.grpc = header_str(headers, "content-type")
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        ctx.replay_safe = is_idempotent(method)
            || headers.contains_key("idempotency-key")
            || plan.retry_non_idempotent;
        // A deadline header the app sent but we cannot read is the app's bug: say so (400)
        // rather than run the call without the bound it asked for.
        let (caller_ms, retry_ms) = match (
            deadline_header(headers, TIMEOUT_HEADER),
            deadline_header(headers, RETRY_DEADLINE_HEADER),
        ) {
            (Ok(timeout), Ok(retry)) => (timeout, retry),
            (Err(message), _) | (_, Err(message)) => {
                self.shared
                    .metrics
                    .rejected_requests
                    .with_label_values(&["outbound", "bad_deadline"])
                    .inc();
                respond_proxy_error(session, 400, "bad-deadline", Bytes::from(message)).await?;
                return Ok(true);
            }
        };
        // The caller's own deadline bounds `request`: meshflow-timeout-ms (outbound only) and
        // grpc-timeout (gRPC over HTTP/2).
        let caller_grpc = if ctx.grpc {
            header_str(headers, "grpc-timeout").and_then(parse_grpc_timeout)
        } else {
            None
        };
        let limit = [plan.request_timeout, caller_ms, caller_grpc]
            .into_iter()
            .flatten()
            .min();
        // A deadline too far to represent is no deadline (never a panic on a client's number).
        ctx.deadline = limit.and_then(|d| now.checked_add(d));
        ctx.retry_deadline = retry_ms.and_then(|d| now.checked_add(d));
        ctx.budget = Some(if plan.budget == route.budget_settings {
            route.budget.clone()
        } else {
            // A route of the policy with its own budget settings.
            self.state.budgets.get(&route.label, plan.budget)
        });
        ctx.plan = plan;
        ctx.route = Some(route.clone());
        let service_label: &str = &route.label;
        if headers.contains_key(TIMEOUT_HEADER) {
            session.req_header_mut().remove_header(TIMEOUT_HEADER);
        }
        if session
            .req_header()
            .headers
            .contains_key(RETRY_DEADLINE_HEADER)
        {
            session
                .req_header_mut()
                .remove_header(RETRY_DEADLINE_HEADER);
        }
        let metrics = &self.shared.metrics;
        match OutstandingSlot::acquire(&route.outstanding, ctx.plan.pool.max_pending_requests) {
            Some(slot) => ctx.outstanding = Some(slot),
            None => {
                metrics
                    .pool_overflow
                    .with_label_values(&[service_label, "max_pending_requests"])
                    .inc();
                session.set_keepalive(None);
                respond_proxy_error(
                    session,
                    503,
                    "pending-limit",
                    Bytes::from(format!(
                        "meshflow: {service_label} has too many requests outstanding\n"
                    )),
                )
                .await?;
                return Ok(true);
            }
        }
        if let Some(fault) = ctx.plan.fault {
            if let Some(delay) = fault
                .delay
                .filter(|d| rand::random::<f64>() * 100.0 < d.percent)
            {
                metrics
                    .fault_injections
                    .with_label_values(&[service_label, "delay"])
                    .inc();
                tokio::time::sleep(delay.duration.get()).await;
            }
            if let Some(abort) = fault
                .abort
                .filter(|a| rand::random::<f64>() * 100.0 < a.percent)
            {
                metrics
                    .fault_injections
                    .with_label_values(&[service_label, "abort"])
                    .inc();
                session
                    .respond_error_with_body(
                        abort.status,
                        Bytes::from("meshflow: injected fault\n"),
                    )
                    .await?;
                return Ok(true);
            }
        }
        // Only admitted requests earn retry budget (shed or aborted ones must not raise it).
        if let Some(budget) = &ctx.budget {
            budget.record_request(now);
        }
        // Buffer the request body (up to Pingora's 64 KiB) so an attempt can be replayed.
        session.as_mut().enable_retry_buffering();
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // The previous attempt is over: it no longer counts as in flight (not even during the
        // backoff), and its timeout does not describe this attempt.
        ctx.in_flight = None;
        ctx.attempt_stats = None;
        ctx.timed_out = None;
        if let Some(wait) = ctx.retry_wait.take() {
            tokio::time::sleep(wait).await;
        }
        let now = Instant::now();
        let remaining = ctx.deadline.map(|d| d.saturating_duration_since(now));
        let retry_too_late = ctx.attempts > 0 && ctx.retry_deadline.is_some_and(|d| now >= d);
        if remaining == Some(Duration::ZERO) || retry_too_late {
            // No attempt starts after the deadline (no retry after the retry deadline).
            ctx.timed_out = Some("request");
            let service = self.service_label(ctx).to_string();
            self.shared
                .metrics
                .timeouts
                .with_label_values(&[&service, "request"])
                .inc();
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "request deadline passed before the next attempt",
            ));
        }
        let Some(mut route) = ctx.route.clone() else {
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "service has no endpoint",
            ));
        };
        // Every attempt goes to the endpoints of the snapshot in force now (they may have
        // changed since the request started, e.g. during a backoff or an injected delay); a
        // service gone from it has no endpoint.
        if ctx.pinned.is_none() {
            let current = self.state.routes.load();
            match current.get(&route.name, &route.namespace) {
                Some(newer) if !Arc::ptr_eq(newer, &route) => {
                    route = newer.clone();
                    ctx.route = Some(route.clone());
                }
                Some(_) => {}
                None => {
                    return Err(Error::explain(
                        ErrorType::ConnectNoRoute,
                        "service has no endpoint",
                    ))
                }
            }
        }
        let max_ejected = ctx.plan.outlier.map_or(100, |o| o.max_ejected_percent);
        let endpoints = match &ctx.pinned {
            Some(endpoint) => std::slice::from_ref(endpoint),
            None => route.endpoints.as_slice(),
        };
        let tried = &ctx.tried;
        let picked = self.state.balancer.pick_by(
            endpoints,
            |e| (e.endpoint.address.as_str(), &e.stats),
            ctx.plan.load_balancer,
            |address| tried.iter().any(|t| t.endpoint.address == address),
            max_ejected,
            ctx.plan.pool.max_requests_per_endpoint,
            now,
            rand::random::<f64>,
        );
        let Some(endpoint) = picked.cloned() else {
            self.shared
                .metrics
                .pool_overflow
                .with_label_values(&[&*route.label, "max_requests_per_endpoint"])
                .inc();
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "every endpoint is at its request limit",
            ));
        };
        let gauge = endpoint.in_flight_gauge(&route, &self.shared).clone();
        gauge.inc();
        ctx.in_flight = Some(AttemptGuard {
            _in_flight: Balancer::start(&endpoint.stats),
            gauge,
        });
        ctx.attempt_stats = Some(endpoint.stats.clone());
        let svid = self
            .shared
            .identity
            .svid
            .load_full()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no SVID yet"))?;
        let bundle = self.shared.identity.bundle.load_full();
        // SNI = the expected identity's DNS SAN: Pingora's rustls connector then verifies the
        // server's chain and that it is exactly that identity.
        let mut peer = HttpPeer::new(endpoint.address, true, endpoint.server_name.clone());
        peer.client_cert_key = Some(svid.cert_key.clone());
        peer.options.ca = Some(bundle.pingora_ca.clone());
        peer.options.alpn = ALPN::H2;
        peer.options.max_h2_streams = 100;
        // Connecting (TCP + TLS together) never outlasts the request deadline.
        let connect_limit = [Some(ctx.plan.connect), remaining]
            .into_iter()
            .flatten()
            .min();
        peer.options.connection_timeout = connect_limit;
        peer.options.total_connection_timeout = connect_limit;
        // Until response headers: the per-attempt limit and the request deadline; Pingora
        // applies the same read timeout to body reads afterwards (see ARCHITECTURE.md).
        let header_limit = [ctx.plan.per_attempt, remaining]
            .into_iter()
            .flatten()
            .min();
        peer.options.read_timeout = Some(header_limit.unwrap_or(ctx.plan.stream_idle));
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        // The pool key must change with the trust bundle and our certificate, or a connection
        // made under old material could be reused.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bundle.version.hash(&mut hasher);
        svid.serial_hex.hash(&mut hasher);
        peer.group_key = hasher.finish();
        ctx.tried.push(endpoint.clone());
        ctx.endpoint = Some(endpoint);
        ctx.attempts += 1;
        ctx.attempt_started = Some(now);
        // A status belongs to the attempt that produced it.
        ctx.grpc_status = None;
        route.attempts(&self.shared).inc();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        scrub_forwarded_request(upstream_request);
        upstream_request.remove_header(TIMEOUT_HEADER);
        upstream_request.remove_header(RETRY_DEADLINE_HEADER);
        // Only this sidecar names the destination port (an app's copy never passes).
        use crate::outbound::transparent::{target_port_value, TARGET_PORT_HEADER};
        while upstream_request.remove_header(TARGET_PORT_HEADER).is_some() {}
        if let Some((port, h2)) = ctx.target_port {
            upstream_request.insert_header(TARGET_PORT_HEADER, target_port_value(port, h2))?;
        }
        // The next hop's parent is our client span; an invalid incoming one is replaced.
        if let Some(span) = &ctx.span {
            crate::shared::set_trace_headers(upstream_request, &self.shared.tracing, span)?;
        }
        // Absolute-form (HTTP_PROXY style) → origin-form + Host for the next hop.
        if let Some(authority) = upstream_request
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
        {
            let origin = upstream_request
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            if let Ok(uri) = origin.parse() {
                upstream_request.set_uri(uri);
            }
            // RFC 9112 §3.2.2: the absolute-form target's authority replaces any Host.
            upstream_request.insert_header(http::header::HOST, authority)?;
        }
        // Propagate what is left of the deadline to gRPC servers (never more than was asked).
        if ctx.grpc {
            if let Some(deadline) = ctx.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                upstream_request.insert_header("grpc-timeout", format_grpc_timeout(left))?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Only this sidecar says an answer is its own: a service's copy of the header (e.g.
        // relayed from its own sidecar) must not make a delivered call look unsent.
        upstream_response.remove_header(PROXY_ERROR_HEADER);
        let status = upstream_response.status.as_u16();
        // Trailers-Only gRPC responses carry grpc-status in the headers; a status in trailers
        // after messages is not retried.
        let grpc_status = header_str(&upstream_response.headers, "grpc-status")
            .and_then(|v| v.trim().parse::<u32>().ok());
        let outcome = AttemptOutcome::Response {
            status,
            grpc_status,
        };
        if let Some(g) = header_str(&upstream_response.headers, "grpc-status") {
            let g = g.to_string();
            self.count_grpc_status(ctx, &g);
        }
        let health = if status >= 500 {
            Health::Failure
        } else {
            Health::Success
        };
        self.record_health(ctx, health, true);
        let pushback =
            if let Some(v) = header_str(&upstream_response.headers, "grpc-retry-pushback-ms") {
                Some(parse_grpc_pushback(v))
            } else if matches!(status, 429 | 503) {
                header_str(&upstream_response.headers, "retry-after")
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
                    .map(Pushback::Wait)
            } else {
                None
            };
        if self.decide_retry(session, ctx, outcome, pushback) {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "retryable response; retrying",
            );
            e.set_retry(true);
            return Err(e);
        }
        ctx.responded = true;
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // A status after messages: counted, never retried (the messages already went out).
        if let Some(status) = header_str(trailers, "grpc-status") {
            self.count_grpc_status(ctx, status);
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.retry_wait.is_some() {
            // upstream_response_filter already decided (and counted) this retry.
            e.set_retry(true);
            return e;
        }
        if e.esource() == &pingora_error::ErrorSource::Downstream {
            // The app went away or stalled: not the endpoint's fault, and nobody to retry for.
            ctx.attempt_stats = None;
            e.set_retry(false);
            return e;
        }
        let outcome = self.classify_error(&e, ctx);
        self.record_health(ctx, Health::Failure, false);
        let retry = self.decide_retry(session, ctx, outcome, None);
        e.set_retry(retry);
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.connected = true;
        if !reused {
            self.shared
                .metrics
                .connections
                .with_label_values(&["outbound"])
                .inc();
            self.shared
                .metrics
                .tls_handshakes
                .with_label_values(&["outbound"])
                .inc();
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.record_health(ctx, Health::Failure, false);
        let text = format!("{e}");
        let tls = matches!(
            e.etype(),
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError
        ) || text.contains("certificate");
        if tls {
            // The rustls error itself (inside Pingora's cause) names the reason; the text is
            // only a fallback.
            let reason = match crate::identity::find_rustls_error(e.root_cause()) {
                Some(tls_error) => crate::identity::client_handshake_reason(tls_error),
                None if text.contains("NotValidForName") || text.contains("not valid for name") => {
                    "identity_mismatch"
                }
                None if text.contains("UnknownIssuer") => "unknown_ca",
                None if text.contains("expired") || text.contains("Expired") => "expired",
                None => "other",
            };
            self.shared
                .metrics
                .tls_handshake_errors
                .with_label_values(&["outbound", reason])
                .inc();
            let expected = ctx
                .endpoint
                .as_ref()
                .map(|ep| ep.endpoint.identity.uri())
                .unwrap_or_default();
            tracing::warn!(
                endpoint = %peer.address(),
                expected_identity = %expected,
                expected_dns_san = %peer.sni,
                reason,
                "outbound TLS refused: {}; presented: {text}",
                crate::identity::describe_outbound_tls_failure(reason)
            );
            e.set_retry(false);
            return e;
        }
        if matches!(e.etype(), ErrorType::ConnectTimedout) {
            let service = self.service_label(ctx).to_string();
            self.shared
                .metrics
                .timeouts
                .with_label_values(&[&service, "connect"])
                .inc();
        }
        // Never reached the server: retryable for any method, on another endpoint if possible.
        let retry = self.decide_retry(session, ctx, AttemptOutcome::ConnectFailure, None);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let deadline_passed = ctx.deadline.is_some_and(|d| Instant::now() >= d);
        let timed_out = (ctx.timed_out.is_some() || deadline_passed) && !ctx.responded;
        if timed_out || matches!(e.etype(), ErrorType::HTTPStatus(504)) {
            if ctx.grpc {
                ctx.grpc_status = Some("4".into());
                // gRPC clients read DEADLINE_EXCEEDED from a Trailers-Only response.
                let mut resp = ResponseHeader::build(200, Some(3)).expect("static status");
                let _ = resp.insert_header("content-type", "application/grpc");
                let _ = resp.insert_header("grpc-status", "4");
                let _ = resp.insert_header("grpc-message", "meshflow: deadline exceeded");
                let _ = session.write_response_header(Box::new(resp), true).await;
                return FailToProxy {
                    error_code: 200,
                    can_reuse_downstream: false,
                };
            }
            let _ = respond_proxy_error(session, 504, "timeout", Bytes::new()).await;
            return FailToProxy {
                error_code: 504,
                can_reuse_downstream: false,
            };
        }
        if e.esource() == &pingora_error::ErrorSource::Downstream || ctx.responded {
            return respond_to_failure(session, e, 503).await;
        }
        let (status, reason) = match e.etype() {
            ErrorType::HTTPStatus(503) if !ctx.connected => (503, "endpoint-limit"),
            ErrorType::HTTPStatus(code) => (*code, "upstream-failed"),
            ErrorType::ConnectNoRoute if !ctx.connected => (503, "no-endpoint"),
            // Every attempt failed before a connection existed: nothing was sent.
            _ if !ctx.connected => (503, "connect-failed"),
            _ => (503, "upstream-failed"),
        };
        let _ = respond_proxy_error(session, status, reason, Bytes::new()).await;
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // Only the access log wants the trace id as text; only a recorded span attributes.
        let trace_id = self
            .shared
            .access_log
            .as_ref()
            .and(ctx.span.as_ref())
            .map(|s| s.span_context().trace_id().to_string());
        if let Some(span) = ctx.span.as_mut().filter(|s| s.is_recording()) {
            span.set_attribute(KeyValue::new(
                "url.path",
                session.req_header().uri.path().to_string(),
            ));
            if let Some(route) = &ctx.route {
                span.set_attribute(KeyValue::new("meshflow.service", route.label.to_string()));
            }
            if let Some(endpoint) = &ctx.endpoint {
                span.set_attribute(KeyValue::new(
                    "server.address",
                    endpoint.endpoint.address.clone(),
                ));
                span.set_attribute(KeyValue::new(
                    "meshflow.peer.principal",
                    endpoint.endpoint.identity.principal(),
                ));
            }
            span.set_attribute(KeyValue::new(
                "meshflow.retries",
                i64::from(ctx.attempts.saturating_sub(1)),
            ));
            crate::shared::finish_span(span, status, ctx.grpc_status.as_deref(), 400);
        }
        let Some(route) = ctx.route.clone() else {
            return;
        };
        if let Some(log) = &self.shared.access_log {
            let req = session.req_header();
            let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
            log.write(&serde_json::json!({
                "traceId": trace_id,
                "direction": "outbound",
                "workload": self.shared.workload,
                "service": &*route.label,
                "method": req.method.as_str(),
                "authority": req.uri.authority().map(|a| a.to_string()).or_else(|| header("host").map(str::to_string)),
                "path": req.uri.path(),
                "status": status,
                "durationMs": ctx.start.elapsed().as_secs_f64() * 1000.0,
                "endpoint": ctx.endpoint.as_ref().map(|e| e.endpoint.address.clone()),
                "peer": ctx.endpoint.as_ref().map(|e| e.endpoint.identity.uri()),
                "retries": ctx.attempts.saturating_sub(1),
                "timedOut": ctx.timed_out,
            }));
        }
        // Before an endpoint was chosen, the service names the destination.
        let series = match &ctx.endpoint {
            Some(endpoint) => endpoint.series(&route, &self.shared),
            None => route.unrouted_series(&self.shared),
        };
        series.record(
            status,
            ctx.grpc_status.as_deref().unwrap_or(""),
            ctx.start.elapsed().as_secs_f64(),
        );
    }
}
