//! The sidecar's own telemetry: Prometheus metric families ([`metrics`]) and the JSON access
//! log ([`access_log`]). Tracing (spans, propagation, OTLP export) is the shared
//! `meshflow_telemetry` crate.

pub mod access_log;
pub mod metrics;
