//! Sidecar metrics on one registry per process (passed in, never global). Names and labels per
//! DESIGN.md §8. Label values never come from unbounded client input.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The sidecar's metric handles. Cheap to clone.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `meshflow_requests_total{direction, source_workload, source_namespace,
    /// destination_workload, destination_namespace, principal, service, status_code,
    /// grpc_status}`; see [`Traffic`]. `status_code` is the HTTP status sent to the client
    /// (`0` when none was), `grpc_status` the gRPC status (`0`–`16`, `invalid`) or empty.
    pub requests: IntCounterVec,
    /// `meshflow_request_duration_seconds{direction, source_workload, source_namespace,
    /// destination_workload, destination_namespace, service}` (0.5 ms … 10 s).
    pub request_duration: HistogramVec,
    /// `meshflow_connections_total{direction}`: new TLS connections (inbound accepted,
    /// outbound established).
    pub connections: IntCounterVec,
    /// `meshflow_plaintext_connections_total`: plaintext inbound connections served
    /// (PeerAuthentication PERMISSIVE).
    pub plaintext_connections: IntCounter,
    /// `meshflow_jwt_authentications_total{result}`: inbound requests carrying a JWT, by
    /// result (`ok` or a refusal reason such as `expired`, `bad_signature`).
    pub jwt_authentications: IntCounterVec,
    /// `meshflow_tls_handshakes_total{direction}`: completed handshakes.
    pub tls_handshakes: IntCounterVec,
    /// `meshflow_tls_handshake_errors_total{direction, reason}`. Reasons: no_client_certificate,
    /// unknown_ca, expired, not_yet_valid, bad_identity, protocol_version, identity_mismatch,
    /// invalid_certificate, other.
    pub tls_handshake_errors: IntCounterVec,
    /// `meshflow_identity_cert_expiration_timestamp_seconds`.
    pub cert_expiration: IntGauge,
    /// `meshflow_identity_renewals_total{result}`: SVID requests (first and renewals), `ok` or
    /// `error`.
    pub renewals: IntCounterVec,
    /// `meshflow_identity_renewal_failures_total{reason}`: failed SVID requests by reason
    /// ([`RENEWAL_FAILURE_REASONS`]: issuer_expired,
    /// control_plane_unreachable, tls, rejected, control_plane_error, bad_response, local).
    pub renewal_failures: IntCounterVec,
    /// `meshflow_config_version` of the snapshot in force.
    pub config_version: IntGauge,
    /// `meshflow_config_last_update_timestamp_seconds`: when the snapshot in force was
    /// accepted, Unix seconds (config age = now − this).
    pub config_last_update: prometheus::Gauge,
    /// `meshflow_config_updates_total{result}`: accepted / rejected.
    pub config_updates: IntCounterVec,
    /// `meshflow_control_plane_connected` (1 while the Watch stream is open).
    pub control_plane_connected: IntGauge,
    /// `meshflow_rejected_requests_total{direction, reason}`: framing, header_too_large,
    /// unknown_service, no_endpoint, no_config, bad_deadline.
    pub rejected_requests: IntCounterVec,
    /// `meshflow_info{workload, namespace}` = 1 (`workload` is the name, without namespace).
    pub info: IntGaugeVec,
    /// `meshflow_attempts_total{service}`: upstream attempts started (first tries and retries).
    pub attempts: IntCounterVec,
    /// `meshflow_retries_total{service, reason}`: retries started, by the condition that
    /// triggered them (`connect-failure`, `reset`, `per-attempt-timeout`, `status-503`,
    /// `grpc-14`, …).
    pub retries: IntCounterVec,
    /// `meshflow_retry_budget_exhausted_total{service}`: retries refused by the budget.
    pub retry_budget_exhausted: IntCounterVec,
    /// `meshflow_retry_skipped_total{service, reason}`: retryable failures not retried
    /// (`body` — request body over 64 KiB or unfinished; `deadline` — no time left;
    /// `pushback` — server asked not to or to wait too long).
    pub retry_skipped: IntCounterVec,
    /// `meshflow_timeouts_total{service, kind}`: `request`, `per_attempt`, `stream_idle`,
    /// `connect`.
    pub timeouts: IntCounterVec,
    /// `meshflow_pool_overflow_total{service, limit}`: requests refused at once (503) by
    /// `maxPendingRequests` or `maxRequestsPerEndpoint`.
    pub pool_overflow: IntCounterVec,
    /// `meshflow_endpoint_ejections_total{service}`: outlier ejections.
    pub endpoint_ejections: IntCounterVec,
    /// `meshflow_fault_injections_total{service, kind}`: injected `delay` / `abort`.
    pub fault_injections: IntCounterVec,
    /// `meshflow_endpoint_in_flight{service, endpoint}`: attempts in flight per endpoint
    /// (endpoints come from the snapshot, so the label set is bounded).
    pub endpoint_in_flight: IntGaugeVec,
    /// `meshflow_authz_decisions_total{decision, policy}`: inbound authorization decisions;
    /// `policy` is the deciding AuthorizationPolicy `namespace/name` or `none`.
    pub authz_decisions: IntCounterVec,
    /// `meshflow_grpc_responses_total{service, grpc_status}`: gRPC statuses seen outbound, from
    /// Trailers-Only headers or from trailers after messages (`0`–`16`, else `invalid`).
    pub grpc_responses: IntCounterVec,
    /// `meshflow_tcp_connections_total{direction, route}`: connections of traffic capture
    /// ([`crate::outbound::transparent`]) by what became of them ([`TCP_ROUTES`]).
    pub tcp_connections: IntCounterVec,
}

/// Reasons an SVID request (the first Certify or a renewal) fails, the label values of
/// `meshflow_identity_renewal_failures_total{reason}`:
///
/// - `issuer_expired`: the mesh CA has expired — the control plane answered
///   `FAILED_PRECONDITION`, or the TLS handshake to it failed on an expired certificate while
///   the CA above this sidecar's SVID is past its NotAfter. Nothing can be issued until the
///   control plane gets a new CA.
/// - `control_plane_unreachable`: no connection (refused, timed out, `UNAVAILABLE`).
/// - `tls`: any other TLS failure to the control plane (unknown CA, wrong name, its
///   certificate expired under a valid CA).
/// - `rejected`: the control plane refused the request (token, workload, CSR).
/// - `control_plane_error`: the control plane failed otherwise (`INTERNAL`, …).
/// - `bad_response`: the issued material is unusable or names another identity.
/// - `local`: the key, CSR or endpoint could not be prepared here.
pub const RENEWAL_FAILURE_REASONS: &[&str] = &[
    "issuer_expired",
    "control_plane_unreachable",
    "tls",
    "rejected",
    "control_plane_error",
    "bad_response",
    "local",
];

/// The `(direction, route)` values of `meshflow_tcp_connections_total`. Outbound (connections
/// redirected by the capture rules): `http1`/`h2` (detected, full mesh treatment), `opaque`
/// (an opaque port), `opaque_detected` (not HTTP), `opaque_timeout` (the client sent nothing
/// within the detection timeout), `passthrough` (not a mesh destination, ALLOW_ANY),
/// `registry_only` (refused: not a mesh destination), `unmeshed` (a known service whose pods
/// run no sidecar: passed through in plaintext, under either policy), `no_config`,
/// `unavailable` (opaque, no endpoint could be reached). Inbound: `opaque` (an opaque mTLS
/// stream forwarded), `denied` (refused by AuthorizationPolicy — an opaque stream, or PERMISSIVE plaintext to a
/// port other than the app port — or a bad preamble), `passthrough` (plaintext to a port
/// other than the app port, PERMISSIVE, allowed).
pub const TCP_ROUTES: [(&str, &str); 13] = [
    ("outbound", "http1"),
    ("outbound", "h2"),
    ("outbound", "opaque"),
    ("outbound", "opaque_detected"),
    ("outbound", "opaque_timeout"),
    ("outbound", "passthrough"),
    ("outbound", "registry_only"),
    ("outbound", "unmeshed"),
    ("outbound", "no_config"),
    ("outbound", "unavailable"),
    ("inbound", "opaque"),
    ("inbound", "denied"),
    ("inbound", "passthrough"),
];

/// Who called whom, for the request metrics. Every value comes from a verified identity
/// or the config snapshot, never from client-chosen input: workloads are SPIFFE service
/// accounts (the mesh names a workload's service account after it), `principal` is the
/// other side's Istio principal (`td/ns/x/sa/y`; inbound: the client, outbound: the server;
/// empty for plaintext or before an endpoint was chosen).
#[derive(Debug, Clone, Copy)]
pub struct Traffic<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// Calling workload (`unknown` for plaintext inbound).
    pub source_workload: &'a str,
    /// Calling namespace (`unknown` for plaintext inbound).
    pub source_namespace: &'a str,
    /// Called workload.
    pub destination_workload: &'a str,
    /// Called namespace.
    pub destination_namespace: &'a str,
    /// The other side's principal, or empty.
    pub principal: &'a str,
    /// Destination service (`name.namespace` outbound; the own workload name inbound).
    pub service: &'a str,
}

/// The `meshflow_requests_total` and `meshflow_request_duration_seconds` series of one fixed
/// [`Traffic`] label set, resolved once (when a route is compiled or a peer first seen) so a
/// request only touches atomics: the duration histogram is one handle; the counter depends on
/// the status, so each (status, gRPC status) seen gets its handle once and is found again by a
/// short scan under a read lock (a handful of statuses per series in practice).
pub struct TrafficSeries {
    requests: IntCounterVec,
    /// direction, source workload, source namespace, destination workload, destination
    /// namespace, principal, service.
    labels: [String; 7],
    by_status: std::sync::RwLock<Vec<(u16, String, IntCounter)>>,
    duration: prometheus::Histogram,
}

impl std::fmt::Debug for TrafficSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficSeries")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl TrafficSeries {
    /// The series of `traffic` on `metrics`.
    pub fn new(metrics: &ProxyMetrics, traffic: &Traffic<'_>) -> Self {
        let t = traffic;
        Self {
            requests: metrics.requests.clone(),
            labels: [
                t.direction,
                t.source_workload,
                t.source_namespace,
                t.destination_workload,
                t.destination_namespace,
                t.principal,
                t.service,
            ]
            .map(str::to_string),
            by_status: std::sync::RwLock::new(Vec::new()),
            duration: metrics.request_duration.with_label_values(&[
                t.direction,
                t.source_workload,
                t.source_namespace,
                t.destination_workload,
                t.destination_namespace,
                t.service,
            ]),
        }
    }

    /// Counts one finished request with HTTP `status` (0: none sent) and `grpc_status` (a
    /// bounded label or empty), and observes its duration in seconds.
    pub fn record(&self, status: u16, grpc_status: &str, seconds: f64) {
        self.duration.observe(seconds);
        {
            let seen = self.by_status.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, counter)) = seen
                .iter()
                .find(|(s, g, _)| *s == status && g == grpc_status)
            {
                counter.inc();
                return;
            }
        }
        let [d, sw, sn, dw, dn, p, svc] = &self.labels;
        let counter = self.requests.with_label_values(&[
            d,
            sw,
            sn,
            dw,
            dn,
            p,
            svc,
            &status.to_string(),
            grpc_status,
        ]);
        counter.inc();
        let mut seen = self.by_status.write().unwrap_or_else(|e| e.into_inner());
        // Bounded: statuses are 0 or 100–599 and gRPC labels 18 values, but a misbehaving app
        // could cycle through many; past 64 the slow path is simply taken every time.
        if seen.len() < 64
            && !seen
                .iter()
                .any(|(s, g, _)| *s == status && g == grpc_status)
        {
            seen.push((status, grpc_status.to_string(), counter));
        }
    }
}

impl ProxyMetrics {
    /// Creates the zero-valued series of `service`'s bounded per-service counters (timeouts
    /// by kind, retry budget, ejections, request limits, injected faults), so dashboards and
    /// `rate()` see 0 rather than no data before the first event. `service` is
    /// `name.namespace` from the config snapshot.
    pub fn init_service(&self, service: &str) {
        self.attempts.with_label_values(&[service]);
        self.retry_budget_exhausted.with_label_values(&[service]);
        self.endpoint_ejections.with_label_values(&[service]);
        for kind in ["request", "per_attempt", "stream_idle", "connect"] {
            self.timeouts.with_label_values(&[service, kind]);
        }
        for limit in ["max_pending_requests", "max_requests_per_endpoint"] {
            self.pool_overflow.with_label_values(&[service, limit]);
        }
        for kind in ["delay", "abort"] {
            self.fault_injections.with_label_values(&[service, kind]);
        }
        for reason in ["body", "deadline", "pushback"] {
            self.retry_skipped.with_label_values(&[service, reason]);
        }
    }

    /// Counts a request the sidecar refused itself before knowing its peer or destination
    /// (those labels are `unknown`; `own_workload`/`own_namespace` fill this side).
    pub fn count_refused(
        &self,
        direction: &str,
        own_workload: &str,
        own_namespace: &str,
        status: u16,
    ) {
        let (source, destination) = if direction == "inbound" {
            (("unknown", "unknown"), (own_workload, own_namespace))
        } else {
            ((own_workload, own_namespace), ("unknown", "unknown"))
        };
        self.requests
            .with_label_values(&[
                direction,
                source.0,
                source.1,
                destination.0,
                destination.1,
                "",
                "unknown",
                &status.to_string(),
                "",
            ])
            .inc();
    }

    /// Registers every family on `registry`.
    ///
    /// # Errors
    /// When a family is registered twice.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "meshflow_requests_total",
                    "Requests handled, by direction, service and status.",
                ),
                &[
                    "direction",
                    "source_workload",
                    "source_namespace",
                    "destination_workload",
                    "destination_namespace",
                    "principal",
                    "service",
                    "status_code",
                    "grpc_status",
                ],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "meshflow_request_duration_seconds",
                    "Request duration until the response ends.",
                )
                .buckets(buckets),
                &[
                    "direction",
                    "source_workload",
                    "source_namespace",
                    "destination_workload",
                    "destination_namespace",
                    "service",
                ],
            )?,
            connections: IntCounterVec::new(
                Opts::new(
                    "meshflow_connections_total",
                    "New connections, by direction.",
                ),
                &["direction"],
            )?,
            plaintext_connections: IntCounter::new(
                "meshflow_plaintext_connections_total",
                "Plaintext inbound connections served (PeerAuthentication PERMISSIVE).",
            )?,
            jwt_authentications: IntCounterVec::new(
                Opts::new(
                    "meshflow_jwt_authentications_total",
                    "Inbound requests carrying a JWT, by result.",
                ),
                &["result"],
            )?,
            tls_handshakes: IntCounterVec::new(
                Opts::new(
                    "meshflow_tls_handshakes_total",
                    "Completed TLS handshakes, by direction.",
                ),
                &["direction"],
            )?,
            tls_handshake_errors: IntCounterVec::new(
                Opts::new(
                    "meshflow_tls_handshake_errors_total",
                    "Refused or failed TLS handshakes, by reason.",
                ),
                &["direction", "reason"],
            )?,
            cert_expiration: IntGauge::new(
                "meshflow_identity_cert_expiration_timestamp_seconds",
                "NotAfter of the sidecar's current SVID, Unix seconds.",
            )?,
            renewals: IntCounterVec::new(
                Opts::new(
                    "meshflow_identity_renewals_total",
                    "SVID requests, by result.",
                ),
                &["result"],
            )?,
            renewal_failures: IntCounterVec::new(
                Opts::new(
                    "meshflow_identity_renewal_failures_total",
                    "Failed SVID requests, by reason.",
                ),
                &["reason"],
            )?,
            config_version: IntGauge::new(
                "meshflow_config_version",
                "Version of the config snapshot in force.",
            )?,
            config_last_update: prometheus::Gauge::new(
                "meshflow_config_last_update_timestamp_seconds",
                "When the config snapshot in force was accepted, Unix seconds.",
            )?,
            config_updates: IntCounterVec::new(
                Opts::new(
                    "meshflow_config_updates_total",
                    "Config snapshots received, by result.",
                ),
                &["result"],
            )?,
            control_plane_connected: IntGauge::new(
                "meshflow_control_plane_connected",
                "1 while the config stream to the control plane is open.",
            )?,
            rejected_requests: IntCounterVec::new(
                Opts::new(
                    "meshflow_rejected_requests_total",
                    "Requests refused by the proxy itself, by reason.",
                ),
                &["direction", "reason"],
            )?,
            info: IntGaugeVec::new(
                Opts::new(
                    "meshflow_info",
                    "Identifies the workload this sidecar serves.",
                ),
                &["workload", "namespace"],
            )?,
            attempts: IntCounterVec::new(
                Opts::new(
                    "meshflow_attempts_total",
                    "Upstream attempts started, by service.",
                ),
                &["service"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "meshflow_retries_total",
                    "Retries started, by service and triggering condition.",
                ),
                &["service", "reason"],
            )?,
            retry_budget_exhausted: IntCounterVec::new(
                Opts::new(
                    "meshflow_retry_budget_exhausted_total",
                    "Retries refused by the retry budget.",
                ),
                &["service"],
            )?,
            retry_skipped: IntCounterVec::new(
                Opts::new(
                    "meshflow_retry_skipped_total",
                    "Retryable failures not retried, by reason.",
                ),
                &["service", "reason"],
            )?,
            timeouts: IntCounterVec::new(
                Opts::new("meshflow_timeouts_total", "Timeouts, by service and kind."),
                &["service", "kind"],
            )?,
            pool_overflow: IntCounterVec::new(
                Opts::new(
                    "meshflow_pool_overflow_total",
                    "Requests refused at once by a request limit.",
                ),
                &["service", "limit"],
            )?,
            endpoint_ejections: IntCounterVec::new(
                Opts::new(
                    "meshflow_endpoint_ejections_total",
                    "Endpoints ejected by outlier detection.",
                ),
                &["service"],
            )?,
            fault_injections: IntCounterVec::new(
                Opts::new(
                    "meshflow_fault_injections_total",
                    "Injected faults, by kind.",
                ),
                &["service", "kind"],
            )?,
            endpoint_in_flight: IntGaugeVec::new(
                Opts::new(
                    "meshflow_endpoint_in_flight",
                    "Attempts in flight, per endpoint.",
                ),
                &["service", "endpoint"],
            )?,
            grpc_responses: IntCounterVec::new(
                Opts::new(
                    "meshflow_grpc_responses_total",
                    "gRPC statuses seen on outbound responses.",
                ),
                &["service", "grpc_status"],
            )?,
            authz_decisions: IntCounterVec::new(
                Opts::new(
                    "meshflow_authz_decisions_total",
                    "Inbound authorization decisions, by decision and policy.",
                ),
                &["decision", "policy"],
            )?,
            tcp_connections: IntCounterVec::new(
                Opts::new(
                    "meshflow_tcp_connections_total",
                    "Captured TCP connections, by direction and route (transparent proxying).",
                ),
                &["direction", "route"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.plaintext_connections.clone()))?;
        registry.register(Box::new(m.jwt_authentications.clone()))?;
        registry.register(Box::new(m.tls_handshakes.clone()))?;
        registry.register(Box::new(m.tls_handshake_errors.clone()))?;
        registry.register(Box::new(m.cert_expiration.clone()))?;
        registry.register(Box::new(m.renewals.clone()))?;
        registry.register(Box::new(m.renewal_failures.clone()))?;
        registry.register(Box::new(m.config_version.clone()))?;
        registry.register(Box::new(m.config_updates.clone()))?;
        registry.register(Box::new(m.config_last_update.clone()))?;
        registry.register(Box::new(m.control_plane_connected.clone()))?;
        registry.register(Box::new(m.rejected_requests.clone()))?;
        registry.register(Box::new(m.info.clone()))?;
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.retry_budget_exhausted.clone()))?;
        registry.register(Box::new(m.retry_skipped.clone()))?;
        registry.register(Box::new(m.timeouts.clone()))?;
        registry.register(Box::new(m.pool_overflow.clone()))?;
        registry.register(Box::new(m.endpoint_ejections.clone()))?;
        registry.register(Box::new(m.fault_injections.clone()))?;
        registry.register(Box::new(m.endpoint_in_flight.clone()))?;
        registry.register(Box::new(m.grpc_responses.clone()))?;
        registry.register(Box::new(m.authz_decisions.clone()))?;
        registry.register(Box::new(m.tcp_connections.clone()))?;
        for (direction, route) in TCP_ROUTES {
            m.tcp_connections.with_label_values(&[direction, route]);
        }
        // Fixed label values start at zero, so `rate()` and dashboards see 0, not no data.
        for result in [
            "ok",
            "malformed",
            "unknown_issuer",
            "bad_signature",
            "expired",
            "not_yet_valid",
            "bad_audience",
            "multiple_tokens",
        ] {
            m.jwt_authentications.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.renewals.with_label_values(&[result]);
        }
        for reason in RENEWAL_FAILURE_REASONS {
            m.renewal_failures.with_label_values(&[reason]);
        }
        for result in ["accepted", "rejected"] {
            m.config_updates.with_label_values(&[result]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Issue 6, acceptance 4 (second half): label values with quotes, newlines and
    /// backslashes are escaped (Prometheus text format 0.0.4) and the exposition stays valid.
    #[test]
    fn label_values_with_quotes_and_newlines_keep_the_exposition_valid() {
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry).unwrap();
        m.authz_decisions
            .with_label_values(&["deny", "ns/we\"ird\nname\\x"])
            .inc();
        m.init_service("a\"b\nc.default");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains(r#"policy="ns/we\"ird\nname\\x""#),
            "escaped value in:\n{text}"
        );
        assert!(text.contains(r#"service="a\"b\nc.default""#));
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is installed by scripts/install-deps");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
