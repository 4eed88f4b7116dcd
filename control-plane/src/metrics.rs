//! Control-plane metrics on one registry per process (passed in, never global). Names follow
//! DESIGN.md §8 (`meshflow_` prefix, OTel-style units).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The control plane's metric handles.
#[derive(Clone)]
pub struct ControlPlaneMetrics {
    /// `meshflow_certificates_issued_total`.
    pub certificates_issued: IntCounter,
    /// `meshflow_certify_refused_total{reason}`: bad_token, unknown_workload, bad_csr,
    /// unproven_san, issuer_expired (the CA chain's NotAfter has passed).
    pub certify_refused: IntCounterVec,
    /// `meshflow_connected_proxies`.
    pub connected_proxies: IntGauge,
    /// `meshflow_config_pushes_total`.
    pub config_pushes: IntCounter,
    /// `meshflow_config_push_duration_seconds`: from sending a snapshot to the sidecar's ack
    /// of that version (push latency; 1 ms … 10 s).
    pub config_push_duration: prometheus::Histogram,
    /// `meshflow_config_acks_total{result}`: accepted / rejected.
    pub config_acks: IntCounterVec,
    /// `meshflow_config_errors_total`: invalid config files seen (last good config kept).
    pub config_errors: IntCounter,
    /// `meshflow_jwks_fetch_errors_total`: failed JWKS fetches (RequestAuthentication `jwksUri`).
    pub jwks_fetch_errors: IntCounter,
    /// `meshflow_watch_refused_total{reason}`: no_client_certificate, unknown_identity.
    pub watch_refused: IntCounterVec,
    /// `meshflow_ca_expiration_timestamp_seconds`: the CA's usable end, Unix seconds — the
    /// earliest NotAfter of the issuing certificate and the certificates above it
    /// ([`crate::ca::CertificateAuthority::not_after`]); no leaf is issued past it.
    pub ca_expiration: IntGauge,
}

impl ControlPlaneMetrics {
    /// Registers every family on `registry`.
    ///
    /// # Errors
    /// When a family is registered twice on the same registry.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            certificates_issued: IntCounter::new(
                "meshflow_certificates_issued_total",
                "X.509-SVIDs issued by the mesh CA.",
            )?,
            certify_refused: IntCounterVec::new(
                Opts::new(
                    "meshflow_certify_refused_total",
                    "Certify requests refused, by reason.",
                ),
                &["reason"],
            )?,
            connected_proxies: IntGauge::new(
                "meshflow_connected_proxies",
                "Sidecars with an open Watch stream.",
            )?,
            config_pushes: IntCounter::new(
                "meshflow_config_pushes_total",
                "Config snapshots sent to sidecars.",
            )?,
            config_push_duration: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "meshflow_config_push_duration_seconds",
                    "From sending a config snapshot to the sidecar's ack of it.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            config_acks: IntCounterVec::new(
                Opts::new(
                    "meshflow_config_acks_total",
                    "Snapshot acknowledgements, by result.",
                ),
                &["result"],
            )?,
            config_errors: IntCounter::new(
                "meshflow_config_errors_total",
                "Invalid config files seen; the last good config stays in force.",
            )?,
            jwks_fetch_errors: IntCounter::new(
                "meshflow_jwks_fetch_errors_total",
                "Failed JWKS fetches; the last good key set (or none: tokens refused) stays in force.",
            )?,
            watch_refused: IntCounterVec::new(
                Opts::new(
                    "meshflow_watch_refused_total",
                    "Watch streams refused, by reason.",
                ),
                &["reason"],
            )?,
            ca_expiration: IntGauge::new(
                "meshflow_ca_expiration_timestamp_seconds",
                "Earliest NotAfter of the CA chain (issuer and the certificates above it), Unix seconds; no certificate is issued past it.",
            )?,
        };
        registry.register(Box::new(m.certificates_issued.clone()))?;
        registry.register(Box::new(m.certify_refused.clone()))?;
        registry.register(Box::new(m.connected_proxies.clone()))?;
        registry.register(Box::new(m.config_pushes.clone()))?;
        registry.register(Box::new(m.config_acks.clone()))?;
        registry.register(Box::new(m.config_push_duration.clone()))?;
        // Fixed label values start at zero, so `rate()` and dashboards see 0, not no data.
        for reason in [
            "bad_token",
            "unknown_workload",
            "bad_csr",
            "unproven_san",
            "issuer_expired",
        ] {
            m.certify_refused.with_label_values(&[reason]);
        }
        for reason in [
            "no_client_certificate",
            "unknown_identity",
            "bad_address",
            "too_many_endpoints",
        ] {
            m.watch_refused.with_label_values(&[reason]);
        }
        for result in ["accepted", "rejected"] {
            m.config_acks.with_label_values(&[result]);
        }
        registry.register(Box::new(m.config_errors.clone()))?;
        registry.register(Box::new(m.jwks_fetch_errors.clone()))?;
        registry.register(Box::new(m.watch_refused.clone()))?;
        registry.register(Box::new(m.ca_expiration.clone()))?;
        Ok(m)
    }
}
