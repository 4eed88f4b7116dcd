//! State shared by the listeners, the control-plane client and the admin endpoints.

use std::sync::Arc;

use meshflow_policies::AppProtocol;
use prometheus::Registry;

use crate::config::ConfigState;
use crate::identity::IdentityState;
use crate::telemetry::metrics::ProxyMetrics;

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
    /// The bootstrap's `appAuthSecret` (only the workflow coordinator's): sent to the app in
    /// [`meshflow_api::SIDECAR_AUTH_HEADER`] on every request the inbound listener forwards.
    pub app_auth_secret: Option<Arc<str>>,
    /// Largest accepted request header section, bytes (431 above).
    pub max_header_bytes: usize,
    /// The effective settings, shown at `/config_dump`.
    pub settings: Arc<serde_json::Value>,
    /// The structured access log, when enabled.
    pub access_log: Option<Arc<crate::telemetry::access_log::AccessLog>>,
    /// Span creation, propagation and OTLP export.
    pub tracing: meshflow_telemetry::Tracing,
    /// Inbound request series by peer SPIFFE ID (looked up once per connection).
    pub inbound_series: Arc<
        std::sync::Mutex<
            std::collections::HashMap<String, Arc<crate::telemetry::metrics::TrafficSeries>>,
        >,
    >,
    /// Destination services whose zero-valued series exist (see
    /// [`crate::telemetry::metrics::ProxyMetrics::init_service`]): only services this sidecar called.
    pub metered_services: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Shared {
    /// A sidecar's shared state without listeners or a control plane — a fresh registry,
    /// `bundle_pem` as the trust bundle, no SVID and no config yet, tracing that exports
    /// nothing — for tools and benchmarks that drive the request path's parts directly
    /// (`proxy/benches/hot_path.rs`). `workload` is `<namespace>/<name>`.
    ///
    /// # Errors
    /// An unusable bundle, or metrics that cannot be registered.
    pub fn standalone(workload: &str, bundle_pem: &str) -> Result<Self, String> {
        let (namespace, name) = workload.split_once('/').unwrap_or(("default", workload));
        let registry = Registry::new();
        let metrics = ProxyMetrics::new(&registry).map_err(|e| e.to_string())?;
        let bundle =
            crate::identity::TrustBundle::from_pem(bundle_pem).map_err(|e| e.to_string())?;
        let identity = IdentityState::new(bundle, "cluster.local", metrics.clone())
            .map_err(|e| e.to_string())?;
        let tracing = meshflow_telemetry::Tracing::new(
            &meshflow_telemetry::TraceSettings {
                otlp_endpoint: None,
                sampling_ratio: 1.0,
                accept_b3: false,
                service_name: name.to_string(),
                namespace: namespace.to_string(),
                instance: None,
            },
            &registry,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            identity,
            config: Arc::default(),
            metrics,
            registry,
            workload: workload.to_string(),
            namespace: namespace.to_string(),
            app_port: 8080,
            app_protocol: AppProtocol::Http1,
            app_auth_secret: None,
            max_header_bytes: 64 * 1024,
            settings: Arc::default(),
            access_log: None,
            tracing,
            inbound_series: Arc::default(),
            metered_services: Arc::default(),
        })
    }

    /// Creates `service`'s zero-valued per-service series the first time it is called.
    pub fn init_service_metrics(&self, service: &str) {
        let mut seen = self
            .metered_services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !seen.contains(service) {
            self.metrics.init_service(service);
            seen.insert(service.to_string());
        }
    }

    /// The inbound request series of the peer `uri` (made with `traffic` the first time).
    pub fn inbound_series<'t>(
        &self,
        uri: &str,
        traffic: impl FnOnce() -> crate::telemetry::metrics::Traffic<'t>,
    ) -> Arc<crate::telemetry::metrics::TrafficSeries> {
        let mut map = self
            .inbound_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(series) = map.get(uri) {
            return series.clone();
        }
        let series = Arc::new(crate::telemetry::metrics::TrafficSeries::new(
            &self.metrics,
            &traffic(),
        ));
        map.insert(uri.to_string(), series.clone());
        series
    }

    /// The workload's name (`workload` without its namespace).
    pub fn workload_name(&self) -> &str {
        self.workload.rsplit('/').next().unwrap_or("unknown")
    }

    /// True once the sidecar has an SVID and a config snapshot.
    pub fn is_ready(&self) -> bool {
        self.identity.svid.load().is_some() && self.config.current().is_some()
    }
}

/// Replaces the W3C trace headers of `request` with ones naming `span` as the parent (an
/// incoming `traceparent`, valid or not, never passes through unchanged; `tracestate` is
/// carried on from the parent). When B3 is accepted, the B3 headers are replaced by a `b3`
/// single header naming `span` too, so B3-only apps continue the same trace.
///
/// # Errors
/// When a header value cannot be set (never for the ASCII values produced here).
pub fn set_trace_headers(
    request: &mut pingora_http::RequestHeader,
    tracing: &meshflow_telemetry::Tracing,
    span: &meshflow_telemetry::Span,
) -> pingora_error::Result<()> {
    use meshflow_telemetry::SpanTrait as _;
    let context = span.span_context();
    while request.remove_header("traceparent").is_some() {}
    while request.remove_header("tracestate").is_some() {}
    request.insert_header(
        "traceparent",
        meshflow_telemetry::traceparent(
            context.trace_id(),
            context.span_id(),
            context.is_sampled(),
        ),
    )?;
    let state = context.trace_state().header();
    if !state.is_empty() {
        request.insert_header("tracestate", state)?;
    }
    if tracing.accepts_b3() {
        for name in meshflow_telemetry::B3_HEADERS {
            while request.remove_header(*name).is_some() {}
        }
        request.insert_header("b3", meshflow_telemetry::b3_header_for(span.span_context()))?;
    }
    Ok(())
}

/// The span name for `method` (OpenTelemetry HTTP semantic conventions: the method), without
/// allocating for the methods of RFC 9110 §9.3.
pub fn method_span_name(method: &http::Method) -> std::borrow::Cow<'static, str> {
    use std::borrow::Cow;
    match *method {
        http::Method::GET => Cow::Borrowed("GET"),
        http::Method::POST => Cow::Borrowed("POST"),
        http::Method::PUT => Cow::Borrowed("PUT"),
        http::Method::DELETE => Cow::Borrowed("DELETE"),
        http::Method::HEAD => Cow::Borrowed("HEAD"),
        http::Method::PATCH => Cow::Borrowed("PATCH"),
        http::Method::OPTIONS => Cow::Borrowed("OPTIONS"),
        _ => Cow::Owned(method.as_str().to_string()),
    }
}

/// Marks `span` failed when the response is an error: HTTP status at or above
/// `error_from` (500 for server spans, 400 for client spans, per OpenTelemetry's HTTP
/// semantic conventions), no response at all, or a gRPC status other than 0 (OK).
pub fn finish_span(
    span: &mut meshflow_telemetry::Span,
    status: u16,
    grpc_status: Option<&str>,
    error_from: u16,
) {
    use meshflow_telemetry::SpanTrait as _;
    if !span.is_recording() {
        return;
    }
    span.set_attribute(opentelemetry::KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if let Some(g) = grpc_status {
        span.set_attribute(opentelemetry::KeyValue::new(
            "rpc.grpc.status_code",
            g.to_string(),
        ));
    }
    if status >= error_from || status == 0 {
        span.set_status(meshflow_telemetry::Status::error(format!("HTTP {status}")));
    } else if let Some(g) = grpc_status.filter(|g| *g != "0") {
        span.set_status(meshflow_telemetry::Status::error(format!(
            "gRPC status {g}"
        )));
    }
    span.end();
}

/// A bounded label for a `grpc-status` value: `0`–`16`, else `invalid` (gRPC status codes,
/// <https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub fn grpc_status_label(value: &str) -> String {
    match value.trim().parse::<u8>() {
        Ok(n) if n <= 16 => n.to_string(),
        _ => "invalid".to_string(),
    }
}
