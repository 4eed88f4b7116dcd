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
//! whether or not spans are exported. Without an exporter a span is only its context
//! ([`Span::Unrecorded`]): no SDK span, no attributes, no allocation beyond the ids — tracing
//! that exports nothing costs (almost) nothing per request.

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

/// A span from [`Tracing::start`]: recorded by the SDK when an exporter exists, otherwise only
/// its context (ids and sampled flag, for propagation). Setters on an unrecorded span do
/// nothing.
#[derive(Debug)]
pub enum Span {
    /// An SDK span (exported when sampled and ended). Boxed: it is ~20 times the size of a
    /// context, and most spans are unrecorded.
    Recorded(Box<opentelemetry_sdk::trace::Span>),
    /// Only the context: nothing is recorded or exported.
    Unrecorded(SpanContext),
}

impl SpanTrait for Span {
    fn add_event_with_timestamp<T>(
        &mut self,
        name: T,
        timestamp: std::time::SystemTime,
        attributes: Vec<KeyValue>,
    ) where
        T: Into<std::borrow::Cow<'static, str>>,
    {
        if let Span::Recorded(s) = self {
            s.add_event_with_timestamp(name, timestamp, attributes);
        }
    }

    fn span_context(&self) -> &SpanContext {
        match self {
            Span::Recorded(s) => s.span_context(),
            Span::Unrecorded(cx) => cx,
        }
    }

    fn is_recording(&self) -> bool {
        match self {
            Span::Recorded(s) => s.is_recording(),
            Span::Unrecorded(_) => false,
        }
    }

    fn set_attribute(&mut self, attribute: KeyValue) {
        if let Span::Recorded(s) = self {
            s.set_attribute(attribute);
        }
    }

    fn set_status(&mut self, status: Status) {
        if let Span::Recorded(s) = self {
            s.set_status(status);
        }
    }

    fn update_name<T>(&mut self, new_name: T)
    where
        T: Into<std::borrow::Cow<'static, str>>,
    {
        if let Span::Recorded(s) = self {
            s.update_name(new_name);
        }
    }

    fn add_link(&mut self, span_context: SpanContext, attributes: Vec<KeyValue>) {
        if let Span::Recorded(s) = self {
            s.add_link(span_context, attributes);
        }
    }

    fn end_with_timestamp(&mut self, timestamp: std::time::SystemTime) {
        if let Span::Recorded(s) = self {
            s.end_with_timestamp(timestamp);
        }
    }
}

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
    /// OTLP/gRPC collector, plaintext, e.g. `http://127.0.0.1:4317`; `None` exports nothing.
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
    /// The OTLP endpoint is not a plaintext `http://` URL (TLS to the collector is not
    /// supported yet; run a local collector or agent).
    #[error(
        "OTLP endpoint {0:?} must be an http:// URL (TLS to the collector is not supported yet)"
    )]
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
    ratio: f64,
    flush: Option<tokio::sync::mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

/// Whether `value` is a well-formed W3C `traceparent` (Trace Context §3.2): lowercase hex
/// `version-traceid-parentid-flags` of 2, 32, 16 and 2 digits; version `ff` is invalid;
/// version `00` has exactly four fields (later versions may append `-…`); ids not all zero.
/// The SDK's parser accepts short and signed fields, so this is checked first.
pub fn valid_traceparent(value: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let fields: Vec<&str> = value.split('-').collect();
    if fields.len() < 4 {
        return false;
    }
    let (version, trace, parent, flags) = (fields[0], fields[1], fields[2], fields[3]);
    hex(version, 2)
        && version != "ff"
        && (fields.len() == 4 || version != "00")
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

/// `traceparent` with only the flag bit the SDK knows (sampled): W3C says unknown flag bits
/// are ignored, but the SDK's parser refuses version-00 flags above `02` (e.g. Level 2's
/// "random" bit, `03`), which would break the trace.
fn known_flags_only(value: &str) -> String {
    let fields: Vec<&str> = value.split('-').collect();
    let sampled = u8::from_str_radix(fields[3], 16).unwrap_or(0) & 1;
    format!("{}-{}-{}-{sampled:02x}", fields[0], fields[1], fields[2])
        + &fields[4..]
            .iter()
            .map(|f| format!("-{f}"))
            .collect::<String>()
}

/// W3C headers as the propagator should see them: a strictly valid `traceparent` only, and
/// every `tracestate` line joined with `,` and each member trimmed (RFC 9110 §5.3 list
/// syntax; the SDK's parser rejects the optional whitespace the spec allows).
struct W3cExtract {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl W3cExtract {
    fn new(headers: &http::HeaderMap) -> Self {
        let mut traceparents = headers.get_all("traceparent").iter();
        let traceparent = match (traceparents.next(), traceparents.next()) {
            (Some(v), None) => v
                .to_str()
                .ok()
                .filter(|v| valid_traceparent(v))
                .map(known_flags_only),
            // None, or more than one (ambiguous): no parent.
            _ => None,
        };
        let members: Vec<&str> = headers
            .get_all("tracestate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        // W3C Trace Context §3.3: at most 32 members, keys unique; otherwise the whole
        // tracestate may be discarded, which we do (the trace itself continues).
        let mut keys: Vec<&str> = members
            .iter()
            .map(|m| m.split('=').next().unwrap_or(m))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let usable = !members.is_empty() && members.len() <= 32 && keys.len() == members.len();
        Self {
            traceparent,
            tracestate: usable.then(|| members.join(",")),
        }
    }
}

impl Extractor for W3cExtract {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
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
        let mut flush = None;
        if let Some(endpoint) = &settings.otlp_endpoint {
            // TLS to the collector is not configured (no tonic TLS roots for the exporter):
            // refuse https:// rather than failing every export.
            if !endpoint.starts_with("http://") {
                return Err(TelemetryError::Endpoint(endpoint.clone()));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_CAPACITY);
            let (flush_tx, flush_rx) = tokio::sync::mpsc::unbounded_channel();
            spawn_exporter(endpoint.clone(), resource, rx, flush_rx, metrics.clone())?;
            flush = Some(flush_tx);
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
            ratio: settings.sampling_ratio,
            flush,
        })
    }

    /// The trace context in `headers`: a valid W3C `traceparent` (+ `tracestate`), else B3
    /// when accepted, else none (the next span is a root).
    pub fn extract(&self, headers: &http::HeaderMap) -> Context {
        // The common case of a request that starts a trace here: nothing to parse.
        if !headers.contains_key("traceparent")
            && (self.b3.is_none() || B3_HEADERS.iter().all(|name| !headers.contains_key(*name)))
        {
            return Context::new();
        }
        let cx = TraceContextPropagator::new().extract(&W3cExtract::new(headers));
        if cx.span().span_context().is_valid() {
            return cx;
        }
        if let Some(b3) = &self.b3 {
            let cx = b3.extract(&HeaderExtract(headers));
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                return Context::new().with_remote_span_context(SpanContext::new(
                    sc.trace_id(),
                    sc.span_id(),
                    b3_flags(headers, sc.trace_id(), self.ratio),
                    true,
                    TraceState::default(),
                ));
            }
        }
        Context::new()
    }

    /// Whether B3 headers are accepted (and so replaced on the way out, see
    /// [`B3_HEADERS`]).
    pub fn accepts_b3(&self) -> bool {
        self.b3.is_some()
    }

    /// Starts a span named `name` of `kind` under `parent` (see [`Tracing::extract`]).
    /// `attributes` is called only when the span is recorded (an exporter exists). Sampling is
    /// OpenTelemetry's `ParentBased(TraceIdRatioBased)` either way, so the sampled flag sent
    /// to the next hop does not depend on whether this process exports.
    pub fn start(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        if self.flush.is_none() {
            return Span::Unrecorded(self.unrecorded(parent));
        }
        Span::Recorded(Box::new(
            self.tracer.build_with_context(
                SpanBuilder::from_name(name)
                    .with_kind(kind)
                    .with_attributes(attributes()),
                parent,
            ),
        ))
    }

    /// A new span's context under `parent` without the SDK: the parent's trace id, flags and
    /// trace state with a new span id, or a new root sampled with the configured ratio.
    fn unrecorded(&self, parent: &Context) -> SpanContext {
        use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
        let parent = parent.span();
        let parent = parent.span_context();
        if parent.is_valid() {
            return SpanContext::new(
                parent.trace_id(),
                RandomIdGenerator::default().new_span_id(),
                parent.trace_flags() & TraceFlags::SAMPLED,
                false,
                parent.trace_state().clone(),
            );
        }
        let (trace_id, span_id, sampled) = new_root(self.ratio);
        SpanContext::new(
            trace_id,
            span_id,
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            false,
            TraceState::default(),
        )
    }

    /// Exports every span queued so far, waiting at most `timeout` (call before exiting:
    /// queued spans are otherwise lost). Returns whether the export finished in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(flush) = &self.flush else {
            return true;
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if flush.send(done_tx).is_err() {
            return false;
        }
        done_rx.recv_timeout(timeout).is_ok()
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

/// The B3 headers (single and multi) a sidecar that accepts B3 replaces with its own span's
/// `b3` single header.
pub const B3_HEADERS: &[&str] = &[
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// B3's sampling decision as W3C flags: `1`/`d` (debug) sampled, `0` not sampled, absent
/// (deferred) decided here by `ratio` like a new root.
fn b3_flags(headers: &http::HeaderMap, trace_id: TraceId, ratio: f64) -> TraceFlags {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    // The single header decides only when it is well formed (the propagator then used it).
    let single = get("b3").filter(|v| {
        let mut parts = v.split('-');
        matches!((parts.next(), parts.next()), (Some(t), Some(s)) if hex(t, &[16, 32]) && hex(s, &[16]))
    });
    let decision = match single {
        Some(single) => single.split('-').nth(2).map(str::to_string),
        None => match (get("x-b3-flags"), get("x-b3-sampled")) {
            (Some("1"), _) => Some("d".to_string()),
            (_, Some(s)) => Some(s.to_ascii_lowercase()),
            _ => None,
        },
    };
    let sampled = match decision.as_deref() {
        Some("1" | "d" | "true") => true,
        Some("0" | "false") => false,
        _ => matches!(
            Sampler::TraceIdRatioBased(ratio)
                .should_sample(None, trace_id, "", &SpanKind::Internal, &[], &[])
                .decision,
            SamplingDecision::RecordAndSample
        ),
    };
    if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    }
}

/// The B3 single header (`b3: <trace>-<span>-<1|0>`) naming `span` as the parent.
pub fn b3_header_for(span: &SpanContext) -> String {
    format!(
        "{}-{}-{}",
        span.trace_id(),
        span.span_id(),
        if span.is_sampled() { "1" } else { "0" }
    )
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

/// A W3C Trace Context `traceparent` value, version 00: `00-<trace id>-<span id>-<flags>`, 55
/// ASCII bytes, ids in lowercase hex (32 and 16 digits), flags `01` when sampled else `00`.
pub fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    // Written into a buffer rather than with `format!`: every sidecar does this for every
    // request it forwards, and the formatting machinery was 1 % of a sidecar pair's CPU.
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    hex::encode_to_slice(trace_id.to_bytes(), &mut value[3..35]).expect("16 bytes, 32 digits");
    value[35] = b'-';
    hex::encode_to_slice(span_id.to_bytes(), &mut value[36..52]).expect("8 bytes, 16 digits");
    value[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    String::from_utf8(value.to_vec()).expect("hex digits and dashes are ASCII")
}

/// Parses a W3C `traceparent` into (trace id, span id, sampled); `None` when invalid.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", value.parse().ok()?);
    let cx = TraceContextPropagator::new().extract(&W3cExtract::new(&headers));
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

async fn export(
    exporter: &mut opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    endpoint: &str,
    metrics: &ExportMetrics,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match exporter.export(std::mem::take(batch)).await {
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

fn spawn_exporter(
    endpoint: String,
    resource: Resource,
    mut queue: tokio::sync::mpsc::Receiver<SpanData>,
    mut flushes: tokio::sync::mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>,
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
                    let mut waiting = None;
                    tokio::select! {
                        span = queue.recv() => match span {
                            Some(span) => batch.push(span),
                            None => return,
                        },
                        Some(done) = flushes.recv() => waiting = Some(done),
                    }
                    if waiting.is_some() {
                        // Flush: everything queued now, in batches, then answer.
                        while let Ok(span) = queue.try_recv() {
                            batch.push(span);
                            if batch.len() == MAX_BATCH {
                                export(&mut exporter, &mut batch, &endpoint, &metrics).await;
                            }
                        }
                    } else {
                        let flush_at = tokio::time::Instant::now() + BATCH_INTERVAL;
                        while batch.len() < MAX_BATCH {
                            match tokio::time::timeout_at(flush_at, queue.recv()).await {
                                Ok(Some(span)) => batch.push(span),
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                    export(&mut exporter, &mut batch, &endpoint, &metrics).await;
                    if let Some(done) = waiting {
                        let _ = done.send(());
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

    #[test]
    fn traceparent_is_the_w3c_form_and_parses_back() {
        for (trace, span, sampled) in [
            (1u128, 1u64, true),
            (u128::MAX, u64::MAX, false),
            (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, true),
        ] {
            let (trace_id, span_id) = (TraceId::from(trace), SpanId::from(span));
            let value = traceparent(trace_id, span_id, sampled);
            let flags = if sampled { "01" } else { "00" };
            assert_eq!(value, format!("00-{trace:032x}-{span:016x}-{flags}"));
            assert_eq!(
                parse_traceparent(&value),
                Some((trace_id, span_id, sampled))
            );
        }
    }

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
            Vec::new,
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
            // Accepted by the SDK's parser alone (short or signed fields, extra fields).
            "00-1-2-01",
            "+0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        ] {
            let span = t.start(
                "GET",
                SpanKind::Server,
                &t.extract(&headers(&[("traceparent", bad)])),
                Vec::new,
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
    fn tracestate_lines_and_spaces_are_kept() {
        let t = tracing(false);
        let mut h = headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]);
        h.append(
            "tracestate",
            "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7".parse().unwrap(),
        );
        h.append("tracestate", "vendor=x".parse().unwrap());
        let span = t.start("GET", SpanKind::Server, &t.extract(&h), Vec::new);
        let out = headers_for(span.span_context());
        let state = out
            .iter()
            .find(|(k, _)| k == "tracestate")
            .map(|(_, v)| v.as_str());
        assert_eq!(
            state,
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,vendor=x")
        );
        // More than 32 members or a repeated key: the tracestate is dropped, the trace kept.
        for bad in [
            (0..33)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(","),
            "a=1,a=2".to_string(),
        ] {
            let mut h = headers(&[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )]);
            h.insert("tracestate", bad.parse().unwrap());
            let span = t.start("GET", SpanKind::Server, &t.extract(&h), Vec::new);
            let out = headers_for(span.span_context());
            assert_eq!(out.len(), 1, "{bad}: {out:?}");
            assert!(out[0].1.contains("0af7651916cd43dd8448eb211c80319c"));
        }
        // Unknown flag bits (W3C Level 2 "random", 0x02) are ignored; the trace continues.
        for flags in ["03", "ff", "02"] {
            let h = headers(&[(
                "traceparent",
                &format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"),
            )]);
            let span = t.start("GET", SpanKind::Server, &t.extract(&h), Vec::new);
            assert_eq!(
                span.span_context().trace_id().to_string(),
                "0af7651916cd43dd8448eb211c80319c",
                "{flags}"
            );
            assert_eq!(span.span_context().is_sampled(), flags != "02", "{flags}");
        }
        // Two traceparent lines are ambiguous: a new root.
        let mut two = headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]);
        two.append(
            "traceparent",
            "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let span = t.start("GET", SpanKind::Server, &t.extract(&two), Vec::new);
        assert!(!span
            .span_context()
            .trace_id()
            .to_string()
            .ends_with("dd8448eb211c80319c"));
    }

    #[test]
    fn b3_deferred_sampling_follows_the_ratio() {
        let trace = "80f198ee56343ba864fe8b2a57d3eff7";
        let multi = |sampled: Option<&str>| {
            let mut h = headers(&[("x-b3-traceid", trace), ("x-b3-spanid", "e457b5a2e4d86bd1")]);
            if let Some(s) = sampled {
                h.insert("x-b3-sampled", s.parse().unwrap());
            }
            h
        };
        let on = tracing(true); // ratio 1.0
        let sampled = |h: &http::HeaderMap| {
            let span = on.start("GET", SpanKind::Server, &on.extract(h), Vec::new);
            assert_eq!(span.span_context().trace_id().to_string(), trace);
            span.span_context().is_sampled()
        };
        assert!(sampled(&multi(None)), "deferred: the ratio (1.0) decides");
        assert!(sampled(&multi(Some("1"))));
        assert!(!sampled(&multi(Some("0"))), "an explicit 0 is kept");
        assert!(
            sampled(&headers(&[("b3", &format!("{trace}-e457b5a2e4d86bd1-d"))])),
            "debug"
        );
        assert!(!sampled(&headers(&[(
            "b3",
            &format!("{trace}-e457b5a2e4d86bd1-0")
        )])));
        // A malformed single header does not override valid multi headers.
        let mut mixed = multi(Some("1"));
        mixed.insert("b3", "garbage-x-0".parse().unwrap());
        assert!(sampled(&mixed));
        let span = on.start("GET", SpanKind::Server, &on.extract(&multi(None)), Vec::new);
        assert!(b3_header_for(span.span_context()).starts_with(&format!("{trace}-")));
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
            Vec::new,
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
        let span = on.start("GET", SpanKind::Server, &on.extract(&b3), Vec::new);
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        let off = tracing(false);
        let span = off.start("GET", SpanKind::Server, &off.extract(&b3), Vec::new);
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

    /// A full queue drops the span and counts it; the caller never blocks.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let registry = Registry::new();
        let metrics = ExportMetrics::new(&registry).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let provider = TracerProvider::builder()
            .with_span_processor(QueueProcessor {
                queue: tx,
                dropped: metrics.dropped.with_label_values(&["queue_full"]),
            })
            .build();
        let tracer = provider.tracer("test");
        for _ in 0..3 {
            tracer.start("x").end();
        }
        assert_eq!(
            metrics.dropped.with_label_values(&["queue_full"]).get(),
            2,
            "one span fits, two are dropped"
        );
    }

    /// Spans the collector does not take are counted as `export_failed`.
    #[test]
    fn failed_exports_are_counted() {
        // A port nobody listens on: the export is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let registry = Registry::new();
        let t = Tracing::new(
            &TraceSettings {
                otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
                sampling_ratio: 1.0,
                accept_b3: false,
                service_name: "web".into(),
                namespace: "default".into(),
                instance: None,
            },
            &registry,
        )
        .unwrap();
        t.start("GET", SpanKind::Client, &Context::new(), Vec::new)
            .end();
        let failed = || {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == "meshflow_trace_spans_dropped_total")
                .and_then(|f| {
                    f.get_metric()
                        .iter()
                        .find(|m| m.get_label().iter().any(|l| l.value() == "export_failed"))
                })
                .map_or(0.0, |m| m.get_counter().get_value())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while failed() < 1.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no export failure counted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(failed(), 1.0);
        // A flush answers once the queue is empty (here: the export failed again at once).
        t.start("GET", SpanKind::Client, &Context::new(), Vec::new)
            .end();
        assert!(t.flush(Duration::from_secs(20)), "flush did not finish");
        assert_eq!(failed(), 2.0, "the flush exported the queued span");
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
        for bad in ["127.0.0.1:4317", "https://collector:4317"] {
            s.otlp_endpoint = Some(bad.into());
            assert!(matches!(
                Tracing::new(&s, &Registry::new()),
                Err(TelemetryError::Endpoint(_))
            ));
        }
    }
}
