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

use crate::config_state::ConfigSnapshot;
use crate::identity::Svid;
use crate::shared::Shared;

/// Smallest gap between two CSRs from one sidecar.
pub const MIN_CSR_INTERVAL: Duration = Duration::from_secs(5);
/// Largest reconnect backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Talks to the control plane for one sidecar.
pub struct ControlPlaneClient {
    bootstrap: Bootstrap,
    shared: Shared,
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
    /// A client for `bootstrap`; `inbound_address` is registered as this workload's endpoint.
    pub fn new(bootstrap: Bootstrap, shared: Shared, inbound_address: String) -> Arc<Self> {
        Arc::new(Self {
            bootstrap,
            shared,
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

    /// Generates a fresh key, sends a CSR, installs the SVID.
    async fn certify_once(&self) -> anyhow::Result<()> {
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
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let channel: Channel = self.endpoint(None)?.connect().await?;
        let response = IdentityClient::new(channel)
            .certify(CertifyRequest {
                workload: self.bootstrap.workload.clone(),
                token: self.bootstrap.token.clone(),
                csr_pem: csr,
            })
            .await?
            .into_inner();
        let issued_at =
            SystemTime::UNIX_EPOCH + Duration::from_secs(response.issued_at_unix.max(0) as u64);
        let svid = Svid::new(
            &response.cert_chain_pem,
            key.serialize_der(),
            key.serialize_pem(),
            issued_at,
        )?;
        if svid.spiffe_id.uri() != self.bootstrap.spiffe_id {
            anyhow::bail!(
                "control plane issued {} but this sidecar is {}",
                svid.spiffe_id,
                self.bootstrap.spiffe_id
            );
        }
        self.shared
            .identity
            .set_bundle_pem(&response.trust_bundle_pem)?;
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
                Err(e) => {
                    self.shared
                        .metrics
                        .renewals
                        .with_label_values(&["error"])
                        .inc();
                    tracing::warn!(error = %e, "Certify failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
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
        let mut stream = ConfigClient::new(channel)
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
    fn backoff_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
