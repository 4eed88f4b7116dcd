//! OpenTelemetry tracing shared by the meshflow sidecar and the control plane.
//!
//! - **Propagation**: W3C Trace Context (`traceparent` / `tracestate`,
//!   <https://www.w3.org/TR/trace-context/>) in and out; B3 (single `b3` header or
//!   `X-B3-*` headers, <https://github.com/openzipkin/b3-propagation>) accepted on input when
//!   [`TraceSettings::accept_b3`] is set. An invalid `traceparent` is ignored (the span becomes
//!   a new root), so a malformed id is replaced, never propagated.
//! - **Sampling**: the parent's sampled flag is honoured; roots are sampled with probability
//!   [`TraceSettings::sampling_ratio`] (OpenTelemetry `ParentBased(TraceIdRatioBased)`).
//! - **Export**: OTLP/gRPC (`opentelemetry-otlp`, tonic) from a dedicated thread. Ended,
//!   sampled spans go through a bounded queue ([`QUEUE_CAPACITY`] spans); a full queue drops
//!   the span and counts it in `meshflow_trace_spans_dropped_total{reason="queue_full"}`.
//!   Batches of up to [`MAX_BATCH`] spans leave every [`BATCH_INTERVAL`] at most.
//! - **Resource**: `service.name` = workload name, `service.namespace` and
//!   `k8s.namespace.name` = namespace, `service.instance.id` = SPIFFE ID when known.
//!
//! Span ids are always generated (also without an exporter), so trace context propagates
//! whether or not spans are exported.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SamplingDecision, SamplingResult, SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt,
    TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::export::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SpanProcessor, TracerProvider};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

pub use opentelemetry::trace::{Span as SpanTrait, Status};
pub use opentelemetry_sdk::trace::Span;

/// Spans queued for export at most; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans per OTLP export request at most.
pub const MAX_BATCH: usize = 512;
/// A partial batch is sent after this long.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(200);
/// One OTLP export request may take this long.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a process traces.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Probability (0.0–1.0) that a new root trace is sampled.
    pub sampling_ratio: f64,
    /// Accept B3 headers on input when no valid `traceparent` is present.
    pub accept_b3: bool,
    /// `service.name` (the workload name).
    pub service_name: String,
    /// `service.namespace` / `k8s.namespace.name`.
    pub namespace: String,
    /// `service.instance.id` (a SPIFFE ID), if known.
    pub instance: Option<String>,
}

/// Errors building the tracer.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The sampling ratio is not within 0.0–1.0.
    #[error("trace sampling ratio {0} is not within 0.0–1.0")]
    Ratio(f64),
    /// The OTLP endpoint is not a `http://` or `https://` URL.
    #[error("OTLP endpoint {0:?} must be an http:// or https:// URL")]
    Endpoint(String),
    /// Metric registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The export thread could not start.
    #[error("trace export thread: {0}")]
    Thread(String),
}

/// Export counters, registered on the process's registry.
#[derive(Clone)]
struct ExportMetrics {
    exported: IntCounter,
    dropped: IntCounterVec,
}

impl ExportMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            exported: IntCounter::new(
                "meshflow_trace_spans_exported_total",
                "Spans accepted by the OTLP collector.",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "meshflow_trace_spans_dropped_total",
                    "Sampled spans not exported, by reason (queue_full, export_failed).",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.exported.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        // Both reasons exist from the start, so dashboards and alerts see zeros.
        m.dropped.with_label_values(&["queue_full"]);
        m.dropped.with_label_values(&["export_failed"]);
        Ok(m)
    }
}

/// Hands ended spans to the export thread without blocking the caller.
#[derive(Debug)]
struct QueueProcessor {
    queue: tokio::sync::mpsc::Sender<SpanData>,
    dropped: IntCounter,
}

impl std::fmt::Debug for ExportMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportMetrics")
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> opentelemetry::trace::TraceResult<()> {
        Ok(())
    }

    fn shutdown(&self) -> opentelemetry::trace::TraceResult<()> {
        Ok(())
    }
}

/// A process's tracer: propagation, sampling and export. Cheap to clone.
#[derive(Clone)]
pub struct Tracing {
    tracer: opentelemetry_sdk::trace::Tracer,
    _provider: TracerProvider,
    b3: Option<Arc<opentelemetry_zipkin::Propagator>>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

struct HeaderExtract<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct PairsInject(Vec<(String, String)>);

impl Injector for PairsInject {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

impl Tracing {
    /// Builds the tracer and, with an OTLP endpoint, starts the export thread.
    ///
    /// # Errors
    /// A ratio outside 0.0–1.0, an endpoint that is not an http(s) URL, a metric registered
    /// twice, or a thread that cannot start.
    pub fn new(settings: &TraceSettings, registry: &Registry) -> Result<Self, TelemetryError> {
        if !(0.0..=1.0).contains(&settings.sampling_ratio) {
            return Err(TelemetryError::Ratio(settings.sampling_ratio));
        }
        let metrics = ExportMetrics::new(registry)?;
        let mut attributes = vec![
            KeyValue::new("service.name", settings.service_name.clone()),
            KeyValue::new("service.namespace", settings.namespace.clone()),
            KeyValue::new("k8s.namespace.name", settings.namespace.clone()),
        ];
        if let Some(instance) = &settings.instance {
            attributes.push(KeyValue::new("service.instance.id", instance.clone()));
        }
        let resource = Resource::new(attributes);
        let mut builder = TracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sampling_ratio,
            ))))
            .with_resource(resource.clone());
        if let Some(endpoint) = &settings.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(TelemetryError::Endpoint(endpoint.clone()));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_CAPACITY);
            spawn_exporter(endpoint.clone(), resource, rx, metrics.clone())?;
            builder = builder.with_span_processor(QueueProcessor {
                queue: tx,
                dropped: metrics.dropped.with_label_values(&["queue_full"]),
            });
        }
        let provider = builder.build();
        let tracer = provider.tracer("meshflow");
        Ok(Self {
            tracer,
            _provider: provider,
            b3: settings.accept_b3.then(|| {
                Arc::new(opentelemetry_zipkin::Propagator::with_encoding(
                    opentelemetry_zipkin::B3Encoding::SingleAndMultiHeader,
                ))
            }),
        })
    }

    /// The trace context in `headers`: a valid W3C `traceparent` (+ `tracestate`), else B3
    /// when accepted, else none (the next span is a root).
    pub fn extract(&self, headers: &http::HeaderMap) -> Context {
        let cx = TraceContextPropagator::new().extract(&HeaderExtract(headers));
        if cx.span().span_context().is_valid() {
            return cx;
        }
        if let Some(b3) = &self.b3 {
            let cx = b3.extract(&HeaderExtract(headers));
            if cx.span().span_context().is_valid() {
                return cx;
            }
        }
        Context::new()
    }

    /// Starts a span named `name` of `kind` under `parent` (see [`Tracing::extract`]).
    pub fn start(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Span {
        self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_kind(kind)
                .with_attributes(attributes),
            parent,
        )
    }

    /// Records a span whose ids, parent, sampling and times are already decided (a workflow
    /// step attempt or run emitted when it ends, possibly by another process than the one
    /// that started it). `parent` of `None` makes a root.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        ids: (TraceId, SpanId, bool),
        parent: Option<SpanId>,
        start: std::time::SystemTime,
        end: std::time::SystemTime,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        let (trace_id, span_id, sampled) = ids;
        let parent_cx = match parent {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                parent,
                if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let mut builder = SpanBuilder::from_name(name)
            .with_kind(kind)
            .with_trace_id(trace_id)
            .with_span_id(span_id)
            .with_start_time(start)
            .with_attributes(attributes);
        builder.sampling_result = Some(SamplingResult {
            decision: if sampled {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        });
        let mut span = self.tracer.build_with_context(builder, &parent_cx);
        if let Some(error) = error {
            span.set_status(Status::error(error));
        }
        span.end_with_timestamp(end);
    }
}

/// W3C trace context headers (`traceparent`, and `tracestate` when not empty) that make
/// `span` the parent of the next hop.
pub fn headers_for(span: &SpanContext) -> Vec<(String, String)> {
    let cx = Context::new().with_remote_span_context(span.clone());
    let mut pairs = PairsInject(Vec::new());
    TraceContextPropagator::new().inject_context(&cx, &mut pairs);
    // An empty `tracestate` is sent by the propagator; W3C allows omitting it.
    pairs.0.retain(|(_, value)| !value.is_empty());
    pairs.0
}

/// A `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    format!(
        "00-{trace_id}-{span_id}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// Parses a W3C `traceparent` into (trace id, span id, sampled); `None` when invalid.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", value.parse().ok()?);
    let cx = TraceContextPropagator::new().extract(&HeaderExtract(&headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id(), sc.span_id(), sc.is_sampled()))
}

/// A span id derived from `parts` (SHA-256, first 8 bytes; never zero): every process that
/// knows the same parts names the same span, so a span started before a crash and recorded
/// after it keeps its id and its children.
pub fn derived_span_id(parts: &[&str]) -> SpanId {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    if bytes == [0; 8] {
        bytes[7] = 1;
    }
    SpanId::from_bytes(bytes)
}

/// A random trace id and span id, sampled with probability `ratio` (a new root).
pub fn new_root(ratio: f64) -> (TraceId, SpanId, bool) {
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    let ids = RandomIdGenerator::default();
    let trace_id = ids.new_trace_id();
    let sampled = matches!(
        Sampler::TraceIdRatioBased(ratio)
            .should_sample(None, trace_id, "", &SpanKind::Internal, &[], &[])
            .decision,
        SamplingDecision::RecordAndSample
    );
    (trace_id, ids.new_span_id(), sampled)
}

use opentelemetry_sdk::trace::ShouldSample as _;

fn spawn_exporter(
    endpoint: String,
    resource: Resource,
    mut queue: tokio::sync::mpsc::Receiver<SpanData>,
    metrics: ExportMetrics,
) -> Result<(), TelemetryError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Thread(e.to_string()))?;
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            runtime.block_on(async move {
                use opentelemetry_otlp::WithExportConfig as _;
                let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                {
                    Ok(exporter) => exporter,
                    Err(e) => {
                        tracing::error!(%endpoint, "OTLP exporter: {e}; spans are dropped");
                        while queue.recv().await.is_some() {
                            metrics.dropped.with_label_values(&["export_failed"]).inc();
                        }
                        return;
                    }
                };
                exporter.set_resource(&resource);
                let mut batch = Vec::with_capacity(MAX_BATCH);
                loop {
                    let Some(first) = queue.recv().await else {
                        return;
                    };
                    batch.push(first);
                    let flush_at = tokio::time::Instant::now() + BATCH_INTERVAL;
                    while batch.len() < MAX_BATCH {
                        match tokio::time::timeout_at(flush_at, queue.recv()).await {
                            Ok(Some(span)) => batch.push(span),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    let n = batch.len() as u64;
                    match exporter.export(std::mem::take(&mut batch)).await {
                        Ok(()) => metrics.exported.inc_by(n),
                        Err(e) => {
                            tracing::warn!(%endpoint, spans = n, "OTLP export failed: {e}");
                            metrics
                                .dropped
                                .with_label_values(&["export_failed"])
                                .inc_by(n);
                        }
                    }
                }
            });
        })
        .map_err(|e| TelemetryError::Thread(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(b3: bool) -> Tracing {
        Tracing::new(
            &TraceSettings {
                otlp_endpoint: None,
                sampling_ratio: 1.0,
                accept_b3: b3,
                service_name: "web".into(),
                namespace: "default".into(),
                instance: None,
            },
            &Registry::new(),
        )
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_parent_is_continued_and_an_invalid_one_replaced() {
        let t = tracing(false);
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let span = t.start(
            "GET",
            SpanKind::Server,
            &t.extract(&headers(&[("traceparent", parent)])),
            vec![],
        );
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_ne!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled());
        let out = headers_for(sc);
        assert!(out[0].1.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));

        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-xyz-b7ad6b7169203331-01",
            "garbage",
        ] {
            let span = t.start(
                "GET",
                SpanKind::Server,
                &t.extract(&headers(&[("traceparent", bad)])),
                vec![],
            );
            let sc = span.span_context();
            assert!(sc.is_valid(), "{bad}");
            assert_ne!(
                sc.trace_id().to_string(),
                "0af7651916cd43dd8448eb211c80319c",
                "{bad} was propagated"
            );
            assert!(parse_traceparent(&headers_for(sc)[0].1).is_some());
        }
    }

    #[test]
    fn the_parent_sampling_decision_is_honoured() {
        let t = Tracing::new(
            &TraceSettings {
                otlp_endpoint: None,
                sampling_ratio: 1.0,
                accept_b3: false,
                service_name: "web".into(),
                namespace: "default".into(),
                instance: None,
            },
            &Registry::new(),
        )
        .unwrap();
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let span = t.start(
            "GET",
            SpanKind::Server,
            &t.extract(&headers(&[("traceparent", unsampled)])),
            vec![],
        );
        assert!(!span.span_context().is_sampled());
        assert!(headers_for(span.span_context())[0].1.ends_with("-00"));
        // A ratio of 0 samples no new root.
        assert!(!new_root(0.0).2);
        assert!(new_root(1.0).2);
    }

    #[test]
    fn b3_is_accepted_only_when_enabled() {
        let b3 = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let on = tracing(true);
        let span = on.start("GET", SpanKind::Server, &on.extract(&b3), vec![]);
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        let off = tracing(false);
        let span = off.start("GET", SpanKind::Server, &off.extract(&b3), vec![]);
        assert_ne!(
            span.span_context().trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
    }

    #[test]
    fn derived_span_ids_are_stable_and_distinct() {
        let a = derived_span_id(&["run-1", "charge", "1", "call"]);
        assert_eq!(a, derived_span_id(&["run-1", "charge", "1", "call"]));
        assert_ne!(a, derived_span_id(&["run-1", "charge", "2", "call"]));
        assert_ne!(a, derived_span_id(&["run-1", "charge1", "", "call"]));
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut s = TraceSettings {
            otlp_endpoint: None,
            sampling_ratio: 1.5,
            accept_b3: false,
            service_name: "web".into(),
            namespace: "default".into(),
            instance: None,
        };
        assert!(matches!(
            Tracing::new(&s, &Registry::new()),
            Err(TelemetryError::Ratio(_))
        ));
        s.sampling_ratio = 0.5;
        s.otlp_endpoint = Some("127.0.0.1:4317".into());
        assert!(matches!(
            Tracing::new(&s, &Registry::new()),
            Err(TelemetryError::Endpoint(_))
        ));
    }
}
