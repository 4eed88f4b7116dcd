//! The control-plane client: gets and renews the SVID (`Certify`) and keeps the config stream
//! (`Watch`) open, reconnecting with capped backoff. The last good config stays in force while
//! the control plane is away.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshflow_api::v1::{
    config_client::ConfigClient, identity_client::IdentityClient, watch_request, Ack,
    CertifyRequest, Hello, WatchRequest,
};
use meshflow_api::Bootstrap;
use rand::Rng;
use tokio::sync::{mpsc, Mutex};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::ConfigSnapshot;
use crate::identity::Svid;
use crate::shared::Shared;

/// Smallest gap between two CSRs from one sidecar.
pub const MIN_CSR_INTERVAL: Duration = Duration::from_secs(5);
/// Largest reconnect backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub use crate::telemetry::metrics::RENEWAL_FAILURE_REASONS;

/// A failed SVID request: the reason (one of [`RENEWAL_FAILURE_REASONS`]) and the error.
#[derive(Debug)]
pub struct CertifyFailure {
    /// The metric reason.
    pub reason: &'static str,
    /// What failed.
    pub error: anyhow::Error,
}

impl CertifyFailure {
    fn new(reason: &'static str, error: impl Into<anyhow::Error>) -> Self {
        Self {
            reason,
            error: error.into(),
        }
    }

    /// The log sentence for the reason.
    pub fn describe(&self) -> &'static str {
        match self.reason {
            "issuer_expired" => {
                "the mesh CA has expired: no SVID can be issued until the control plane runs \
                 with a new CA"
            }
            "control_plane_unreachable" => "the control plane is unreachable",
            "tls" => "the TLS handshake with the control plane failed",
            "rejected" => "the control plane refused the request",
            "control_plane_error" => "the control plane failed to answer",
            "bad_response" => "the control plane's answer is unusable",
            _ => "the request could not be prepared",
        }
    }
}

/// The reason for a TLS failure to the control plane: `issuer_expired` when a certificate
/// expired and the mesh CA itself is past its NotAfter, else `tls`.
fn tls_reason(error: &rustls::Error, ca_expired: bool) -> &'static str {
    if ca_expired && crate::identity::reason_for(error) == "expired" {
        "issuer_expired"
    } else {
        "tls"
    }
}

/// Classifies a failed connection to the control plane.
pub fn classify_connect_error(
    error: &(dyn std::error::Error + 'static),
    ca_expired: bool,
) -> &'static str {
    match crate::identity::find_rustls_error(error) {
        Some(tls) => tls_reason(tls, ca_expired),
        None => "control_plane_unreachable",
    }
}

/// Classifies a failed `Certify` call by its status (and the transport error behind it).
pub fn classify_status(status: &tonic::Status, ca_expired: bool) -> &'static str {
    use tonic::Code;
    if let Some(tls) = crate::identity::find_rustls_error(status) {
        return tls_reason(tls, ca_expired);
    }
    match status.code() {
        // The control plane's contract: FAILED_PRECONDITION = its CA has expired.
        Code::FailedPrecondition => "issuer_expired",
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
            "rejected"
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => "control_plane_unreachable",
        _ => "control_plane_error",
    }
}

/// Talks to the control plane for one sidecar.
pub struct ControlPlaneClient {
    bootstrap: Bootstrap,
    shared: Shared,
    outbound: Arc<crate::outbound::OutboundState>,
    inbound_address: String,
    last_csr: Mutex<Option<Instant>>,
}

/// When to renew: a uniformly random point in [50 %, 70 %] of the lifetime counted from
/// issuance (jitter keeps a fleet from renewing in lock-step).
pub fn renewal_delay(
    issued_at: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = not_after.duration_since(issued_at).unwrap_or_default();
    let fraction = 0.5 + 0.2 * jitter.clamp(0.0, 1.0);
    let at = issued_at + lifetime.mul_f64(fraction);
    at.duration_since(now).unwrap_or_default()
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(6));
    base.min(MAX_BACKOFF)
}

impl ControlPlaneClient {
    /// Largest config snapshot a sidecar accepts, bytes.
    pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

    /// A client for `bootstrap`; `inbound_address` is registered as this workload's endpoint.
    pub fn new(
        bootstrap: Bootstrap,
        shared: Shared,
        outbound: Arc<crate::outbound::OutboundState>,
        inbound_address: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            bootstrap,
            shared,
            outbound,
            inbound_address,
            last_csr: Mutex::new(None),
        })
    }

    fn endpoint(&self, identity: Option<&Svid>) -> Result<Endpoint, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            // The current bundle, not the bootstrap one: it follows CA rotation.
            .ca_certificate(Certificate::from_pem(
                &self.shared.identity.bundle.load().pem,
            ))
            .domain_name(self.bootstrap.control_plane_server_name.clone());
        if let Some(svid) = identity {
            tls = tls.identity(Identity::from_pem(&svid.chain_pem, &svid.key_pem));
        }
        Endpoint::from_shared(format!("https://{}", self.bootstrap.control_plane))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tls_config(tls)
    }

    /// Whether the mesh CA above the current SVID is past its NotAfter.
    fn ca_expired(&self) -> bool {
        self.shared
            .identity
            .ca_not_after()
            .is_some_and(|t| t <= SystemTime::now())
    }

    /// Generates a fresh key, sends a CSR, installs the SVID.
    async fn certify_once(&self) -> Result<(), CertifyFailure> {
        {
            let mut last = self.last_csr.lock().await;
            if let Some(at) = *last {
                let since = at.elapsed();
                if since < MIN_CSR_INTERVAL {
                    tokio::time::sleep(MIN_CSR_INTERVAL - since).await;
                }
            }
            *last = Some(Instant::now());
        }
        let local = |e: rcgen::Error| CertifyFailure::new("local", e);
        let key = rcgen::KeyPair::generate().map_err(local)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(local)?
            .pem()
            .map_err(local)?;
        let endpoint = self
            .endpoint(None)
            .map_err(|e| CertifyFailure::new("local", e))?;
        let channel: Channel = endpoint
            .connect()
            .await
            .map_err(|e| CertifyFailure::new(classify_connect_error(&e, self.ca_expired()), e))?;
        let token = match &self.bootstrap.token_file {
            Some(file) => std::fs::read_to_string(file)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    CertifyFailure::new(
                        "local",
                        anyhow::anyhow!("token file {}: {e}", file.display()),
                    )
                })?,
            None => self.bootstrap.token.clone(),
        };
        let response = IdentityClient::new(channel)
            .certify(CertifyRequest {
                workload: self.bootstrap.workload.clone(),
                token,
                csr_pem: csr,
            })
            .await
            .map_err(|status| {
                CertifyFailure::new(classify_status(&status, self.ca_expired()), status)
            })?
            .into_inner();
        let bad = |e: anyhow::Error| CertifyFailure::new("bad_response", e);
        let issued_at =
            SystemTime::UNIX_EPOCH + Duration::from_secs(response.issued_at_unix.max(0) as u64);
        let svid = Svid::new(
            &response.cert_chain_pem,
            key.serialize_der(),
            key.serialize_pem(),
            issued_at,
        )
        .map_err(|e| bad(e.into()))?;
        if svid.spiffe_id.uri() != self.bootstrap.spiffe_id {
            return Err(bad(anyhow::anyhow!(
                "control plane issued {} but this sidecar is {}",
                svid.spiffe_id,
                self.bootstrap.spiffe_id
            )));
        }
        self.shared
            .identity
            .set_bundle_pem(&response.trust_bundle_pem)
            .map_err(|e| bad(e.into()))?;
        tracing::info!(serial = %svid.serial_hex, identity = %svid.spiffe_id, "installed SVID");
        self.shared.identity.set_svid(svid);
        Ok(())
    }

    /// Certifies until it succeeds, then renews forever.
    pub async fn run_identity(self: Arc<Self>) {
        let mut attempt = 0;
        loop {
            match self.certify_once().await {
                Ok(()) => {
                    self.shared
                        .metrics
                        .renewals
                        .with_label_values(&["ok"])
                        .inc();
                    attempt = 0;
                    let svid = self
                        .shared
                        .identity
                        .svid
                        .load_full()
                        .expect("just installed");
                    let jitter: f64 = rand::thread_rng().gen();
                    let delay =
                        renewal_delay(svid.issued_at, svid.not_after, SystemTime::now(), jitter);
                    tokio::time::sleep(delay.max(MIN_CSR_INTERVAL)).await;
                }
                Err(failure) => {
                    let metrics = &self.shared.metrics;
                    metrics.renewals.with_label_values(&["error"]).inc();
                    metrics
                        .renewal_failures
                        .with_label_values(&[failure.reason])
                        .inc();
                    let wait = backoff(attempt);
                    // What the failure costs: the current SVID's end (or that there is none).
                    let svid_expires = self.shared.identity.svid.load().as_ref().map_or_else(
                        || "none yet".to_string(),
                        |s| humantime::format_rfc3339_seconds(s.not_after).to_string(),
                    );
                    let error = format!("{:#}", failure.error);
                    if failure.reason == "issuer_expired" {
                        tracing::error!(reason = failure.reason, %error, %svid_expires, "SVID request failed: {}; retrying", failure.describe());
                    } else {
                        tracing::warn!(reason = failure.reason, %error, %svid_expires, "SVID request failed: {}; retrying in {wait:?}", failure.describe());
                    }
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Keeps a Watch stream open, applying snapshots as they come.
    pub async fn run_config(self: Arc<Self>) {
        let mut attempt = 0;
        loop {
            let Some(svid) = self.shared.identity.svid.load_full() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match self.watch_once(&svid).await {
                Ok(()) => attempt = 0,
                Err(e) => {
                    tracing::warn!(error = %e, "config stream to the control plane failed; keeping the last config")
                }
            }
            self.shared.metrics.control_plane_connected.set(0);
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn watch_once(&self, svid: &Svid) -> anyhow::Result<()> {
        let channel = self
            .endpoint(Some(svid))?
            .timeout(Duration::from_secs(24 * 3600))
            .connect()
            .await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(WatchRequest {
            kind: Some(watch_request::Kind::Hello(Hello {
                inbound_address: self.inbound_address.clone(),
                workload: self.bootstrap.workload.clone(),
            })),
        })
        .await?;
        // A snapshot carries every TrafficPolicy of the mesh (no per-sidecar scoping yet): allow
        // more than tonic's 4 MiB default, so that many policies never leave a sidecar without
        // config; the control plane caps each policy at 64 KiB.
        let mut stream = ConfigClient::new(channel)
            .max_decoding_message_size(Self::MAX_SNAPSHOT_BYTES)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.shared.metrics.control_plane_connected.set(1);
        while let Some(snapshot) = stream.message().await? {
            let version = snapshot.version;
            let bundle = snapshot.trust_bundle_pem.clone();
            let result = ConfigSnapshot::from_proto(snapshot, self.shared.app_port)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    self.shared
                        .identity
                        .set_bundle_pem(&bundle)
                        .map(|()| s)
                        .map_err(|e| e.to_string())
                });
            let ack = match result {
                Ok(snapshot) => {
                    // Routes first (the outbound path reads them with their own snapshot),
                    // then the snapshot the inbound path and readiness read.
                    let snapshot = Arc::new(snapshot);
                    self.outbound.apply(snapshot.clone());
                    self.shared.metrics.config_version.set(version as i64);
                    self.shared.metrics.config_last_update.set(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                    );

                    self.shared
                        .metrics
                        .config_updates
                        .with_label_values(&["accepted"])
                        .inc();
                    tracing::info!(version, "config snapshot applied");
                    self.shared.config.set(snapshot);
                    Ack {
                        version,
                        accepted: true,
                        reason: String::new(),
                    }
                }
                Err(reason) => {
                    self.shared
                        .metrics
                        .config_updates
                        .with_label_values(&["rejected"])
                        .inc();
                    tracing::error!(version, %reason, "config snapshot rejected; keeping the last good one");
                    Ack {
                        version,
                        accepted: false,
                        reason,
                    }
                }
            };
            let _ = tx
                .send(WatchRequest {
                    kind: Some(watch_request::Kind::Ack(ack)),
                })
                .await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_50_and_70_percent() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let not_after = issued + Duration::from_secs(100);
        assert_eq!(
            renewal_delay(issued, not_after, issued, 0.0),
            Duration::from_secs(50)
        );
        assert_eq!(
            renewal_delay(issued, not_after, issued, 1.0),
            Duration::from_secs(70)
        );
        assert_eq!(
            renewal_delay(issued, not_after, issued + Duration::from_secs(90), 0.5),
            Duration::ZERO
        );
    }

    #[test]
    fn certify_failures_are_classified_by_status_and_tls_error() {
        use tonic::{Code, Status};
        let status = |code| Status::new(code, "x");
        assert_eq!(
            classify_status(&status(Code::FailedPrecondition), false),
            "issuer_expired"
        );
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
        ] {
            assert_eq!(classify_status(&status(code), false), "rejected");
        }
        assert_eq!(
            classify_status(&status(Code::Unavailable), false),
            "control_plane_unreachable"
        );
        assert_eq!(
            classify_status(&status(Code::Internal), false),
            "control_plane_error"
        );
        // A handshake failure wrapped as tokio-rustls does (io::Error around rustls::Error).
        let expired = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        );
        assert_eq!(classify_connect_error(&expired, true), "issuer_expired");
        assert_eq!(classify_connect_error(&expired, false), "tls");
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(classify_connect_error(&unknown, true), "tls");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify_connect_error(&refused, false),
            "control_plane_unreachable"
        );
        for reason in ["issuer_expired", "tls", "rejected"] {
            assert!(RENEWAL_FAILURE_REASONS.contains(&reason));
        }
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
