//! State shared by the listeners, the control-plane client and the admin endpoints.

use std::sync::Arc;

use meshflow_policies::AppProtocol;
use prometheus::Registry;

use crate::config_state::ConfigState;
use crate::identity::IdentityState;
use crate::metrics::ProxyMetrics;

/// Everything a request handler may read. Cheap to clone (all `Arc`s).
#[derive(Clone)]
pub struct Shared {
    /// SVID and trust bundle.
    pub identity: Arc<IdentityState>,
    /// Config snapshot in force.
    pub config: Arc<ConfigState>,
    /// Metric handles.
    pub metrics: ProxyMetrics,
    /// The registry behind `metrics`.
    pub registry: Registry,
    /// Workload key `<namespace>/<name>`.
    pub workload: String,
    /// This workload's namespace (for bare-name routing).
    pub namespace: String,
    /// The app's port on 127.0.0.1.
    pub app_port: u16,
    /// The app's protocol.
    pub app_protocol: AppProtocol,
    /// Largest accepted request header section, bytes (431 above).
    pub max_header_bytes: usize,
    /// The effective settings, shown at `/config_dump`.
    pub settings: Arc<serde_json::Value>,
    /// Retry budgets per destination service.
    pub budgets: Arc<crate::plan::Budgets>,
    /// Endpoint statistics (latency, in-flight, ejection).
    pub balancer: Arc<crate::balancer::Balancer>,
    /// Outstanding requests per destination service (for `maxPendingRequests`).
    pub outstanding: Arc<crate::plan::Outstanding>,
    /// The structured access log, when enabled.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// Span creation, propagation and OTLP export.
    pub tracing: meshflow_telemetry::Tracing,
}

impl Shared {
    /// True once the sidecar has an SVID and a config snapshot.
    pub fn is_ready(&self) -> bool {
        self.identity.svid.load().is_some() && self.config.current().is_some()
    }
}

/// Replaces the W3C trace headers of `request` with ones naming `span` as the parent (an
/// incoming `traceparent`, valid or not, never passes through unchanged).
///
/// # Errors
/// When a header value cannot be set (never for the ASCII values produced here).
pub fn set_trace_headers(
    request: &mut pingora_http::RequestHeader,
    span: &meshflow_telemetry::Span,
) -> pingora_error::Result<()> {
    use meshflow_telemetry::SpanTrait as _;
    request.remove_header("traceparent");
    request.remove_header("tracestate");
    for (name, value) in meshflow_telemetry::headers_for(span.span_context()) {
        request.insert_header(name, value)?;
    }
    Ok(())
}

/// A bounded label for a `grpc-status` value: `0`–`16`, else `invalid` (gRPC status codes,
/// <https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub fn grpc_status_label(value: &str) -> String {
    match value.trim().parse::<u8>() {
        Ok(n) if n <= 16 => n.to_string(),
        _ => "invalid".to_string(),
    }
}
