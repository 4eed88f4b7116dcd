//! The sidecar-injection webhook (issue 14), served by the control plane in Kubernetes mode
//! (`--injector-listen`): HTTPS `POST /inject` with AdmissionReviews (`admission.k8s.io/v1`
//! and `v1beta1`) for pod creations, answered with the JSON Patch of
//! [`meshflow_policies::inject::inject`] — the same mutation `meshflow inject` applies offline.
//!
//! - **Certificate**: issued by the mesh CA for `--injector-host` names (default
//!   `meshflow-control-plane.<namespace>.svc`; IP addresses become IP SANs), renewed at two
//!   thirds of its 90 days; or `--injector-cert`/`--injector-key` (e.g. a mounted Secret),
//!   re-read when the files change.
//! - **caBundle**: with `--injector-webhook-config <name>` the control plane keeps that
//!   MutatingWebhookConfiguration's `caBundle` equal to the mesh trust bundle (or
//!   `--injector-ca-bundle`), checked every 10 s.
//! - **Trust bundle**: the ConfigMap `meshflow-trust-bundle` in every injection-enabled
//!   namespace (within `--discovery-selector`), which injected proxies mount.
//! - **Native sidecars** where the API server is 1.29 or newer (`--native-sidecar`).
//! - **Failure mode** (`--injector-failure-mode deny|allow`) for pods that cannot be injected.

pub mod publish;
pub mod review;
pub mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshflow_policies::inject::{self, InjectSettings};
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::ca::CertificateAuthority;
use crate::StartError;
use review::{Admission, FailureMode};
use server::{CertSlot, InjectorMetrics, Webhook};

/// Lifetime of a webhook certificate from the mesh CA (renewed at two thirds).
const CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The injector's flags (part of the control plane's).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct InjectorConfig {
    /// Serve the sidecar-injection webhook (HTTPS, `POST /inject`) here. Kubernetes mode
    /// only. Absent: no webhook.
    #[arg(long, env = "MESHFLOW_INJECTOR_LISTEN")]
    pub injector_listen: Option<SocketAddr>,
    /// Host names and IP addresses the webhook's certificate from the mesh CA carries
    /// (comma-separated or repeated): what the API server dials. Default:
    /// `meshflow-control-plane.<namespace>.svc`.
    #[arg(
        long = "injector-host",
        env = "MESHFLOW_INJECTOR_HOSTS",
        value_delimiter = ','
    )]
    pub injector_hosts: Vec<String>,
    /// The webhook's certificate chain (PEM) instead of one from the mesh CA; re-read when
    /// the file changes.
    #[arg(long, env = "MESHFLOW_INJECTOR_CERT", requires = "injector_key")]
    pub injector_cert: Option<PathBuf>,
    /// The key of `--injector-cert` (PEM).
    #[arg(long, env = "MESHFLOW_INJECTOR_KEY", requires = "injector_cert")]
    pub injector_key: Option<PathBuf>,
    /// With `--injector-cert`: the CA bundle (PEM) that verifies it, written into the webhook
    /// configuration's caBundle. Default: the mesh trust bundle.
    #[arg(long, env = "MESHFLOW_INJECTOR_CA_BUNDLE", requires = "injector_cert")]
    pub injector_ca_bundle: Option<PathBuf>,
    /// The MutatingWebhookConfiguration whose webhooks' caBundle the control plane keeps set
    /// (`get` and `patch` on that one object). Absent: caBundle is managed elsewhere.
    #[arg(long, env = "MESHFLOW_INJECTOR_WEBHOOK_CONFIG")]
    pub injector_webhook_config: Option<String>,
    /// A pod that cannot be injected (an unusable annotation, a probe on an undeclared port,
    /// more than 250 containers): `deny` refuses it naming why, `allow` admits it without a
    /// sidecar (with a warning).
    #[arg(long, env = "MESHFLOW_INJECTOR_FAILURE_MODE", value_enum, default_value_t = FailureMode::Deny)]
    pub injector_failure_mode: FailureMode,
    /// Bound of one review: reading the request body and answering (keep it below the
    /// webhook's timeoutSeconds).
    #[arg(long, env = "MESHFLOW_INJECTOR_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub injector_timeout: Duration,
    /// What injected pods get.
    #[command(flatten)]
    pub proxy: InjectSettings,
}

/// Where the webhook runs and what it knows of the control plane.
pub struct InjectorContext<'a> {
    /// The API server.
    pub client: kube::Client,
    /// The mesh CA (the webhook's certificate, the trust bundle).
    pub ca: Arc<CertificateAuthority>,
    /// The control plane's namespace.
    pub namespace: &'a str,
    /// The SPIFFE trust domain.
    pub trust_domain: &'a str,
    /// `--discovery-selector`: trust bundles go only to namespaces it selects.
    pub discovery_selector: Option<String>,
    /// Metrics registry.
    pub registry: &'a Registry,
}

/// Starts the webhook when `--injector-listen` is set; returns its bound address.
///
/// # Errors
/// [`StartError::Config`] for invalid settings, an unreadable certificate or an address that
/// cannot be bound.
pub async fn start(
    config: &InjectorConfig,
    context: InjectorContext<'_>,
) -> Result<Option<SocketAddr>, StartError> {
    let Some(listen) = config.injector_listen else {
        return Ok(None);
    };
    let bad = |e: String| StartError::Config(e);
    let mut settings = config.proxy.clone();
    settings.trust_domain = context.trust_domain.to_string();
    settings.validate().map_err(|e| bad(e.to_string()))?;

    let server_version = match context.client.apiserver_version().await {
        Ok(info) => inject::parse_server_version(&info.major, &info.minor),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API server's version; native sidecars only if forced");
            None
        }
    };
    let native_sidecar = settings.native_sidecar.resolve(server_version);

    let (slot, ca_bundle) = match (&config.injector_cert, &config.injector_key) {
        (Some(cert), Some(key)) => {
            let slot = CertSlot::new(read_key_files(cert, key).map_err(bad)?);
            tokio::spawn(reload_files(slot.clone(), cert.clone(), key.clone()));
            let bundle = match &config.injector_ca_bundle {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("--injector-ca-bundle {}: {e}", path.display())))?,
                None => context.ca.trust_bundle_pem().to_string(),
            };
            (slot, bundle)
        }
        _ => {
            let hosts = if config.injector_hosts.is_empty() {
                vec![format!("meshflow-control-plane.{}.svc", context.namespace)]
            } else {
                config.injector_hosts.clone()
            };
            let (key, not_after) = issue(&context.ca, &hosts)?;
            let slot = CertSlot::new(key);
            tokio::spawn(renew(slot.clone(), context.ca.clone(), hosts, not_after));
            (slot, context.ca.trust_bundle_pem().to_string())
        }
    };
    let tls = server::tls_config(slot).map_err(|e| StartError::Other(e.to_string()))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| bad(format!("--injector-listen {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let metrics =
        InjectorMetrics::new(context.registry).map_err(|e| StartError::Other(e.to_string()))?;
    let webhook = Arc::new(Webhook {
        admission: Admission {
            settings,
            native_sidecar,
            failure_mode: config.injector_failure_mode,
        },
        namespaces: Arc::new(publish::KubeNamespaces(context.client.clone())),
        metrics,
        timeout: config.injector_timeout,
    });
    tokio::spawn(server::serve(listener, tls, webhook));
    if let Some(name) = &config.injector_webhook_config {
        tokio::spawn(publish::keep_ca_bundle(
            context.client.clone(),
            name.clone(),
            ca_bundle,
        ));
    }
    tokio::spawn(publish::publish_trust_bundle(
        context.client,
        context.discovery_selector,
        context.ca.trust_bundle_pem().to_string(),
    ));
    tracing::info!(
        address = %bound,
        native_sidecar,
        failure_mode = ?config.injector_failure_mode,
        "injection webhook serving POST /inject"
    );
    Ok(Some(bound))
}

fn issue(
    ca: &CertificateAuthority,
    hosts: &[String],
) -> Result<(rustls::sign::CertifiedKey, SystemTime), StartError> {
    let (chain, key, not_after) = ca.issue_webhook_cert(hosts, CERT_TTL).map_err(|e| {
        StartError::Config(format!("the injector's certificate for {hosts:?}: {e}"))
    })?;
    let certified = server::certified_key(chain.as_bytes(), key.as_bytes())
        .map_err(|e| StartError::Other(e.to_string()))?;
    Ok((certified, not_after))
}

/// Re-issues the certificate at two thirds of its life.
async fn renew(
    slot: Arc<CertSlot>,
    ca: Arc<CertificateAuthority>,
    hosts: Vec<String>,
    mut not_after: SystemTime,
) {
    let mut issued = SystemTime::now();
    loop {
        let life = not_after.duration_since(issued).unwrap_or_default();
        let wait = (issued + life * 2 / 3)
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(60));
        tokio::time::sleep(wait).await;
        match issue(&ca, &hosts) {
            Ok((key, until)) => {
                slot.store(key);
                issued = SystemTime::now();
                not_after = until;
                tracing::info!("renewed the injector's certificate");
            }
            Err(e) => tracing::error!(error = %e, "cannot renew the injector's certificate"),
        }
    }
}

fn read_key_files(cert: &PathBuf, key: &PathBuf) -> Result<rustls::sign::CertifiedKey, String> {
    let chain =
        std::fs::read(cert).map_err(|e| format!("--injector-cert {}: {e}", cert.display()))?;
    let key_pem =
        std::fs::read(key).map_err(|e| format!("--injector-key {}: {e}", key.display()))?;
    server::certified_key(&chain, &key_pem)
        .map_err(|e| format!("--injector-cert/--injector-key: {e}"))
}

/// Reloads a given certificate when its files change (a mounted Secret is updated in place).
async fn reload_files(slot: Arc<CertSlot>, cert: PathBuf, key: PathBuf) {
    let stamp = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = (stamp(&cert), stamp(&key));
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = (stamp(&cert), stamp(&key));
        if now == last {
            continue;
        }
        match read_key_files(&cert, &key) {
            Ok(certified) => {
                slot.store(certified);
                last = now;
                tracing::info!("reloaded the injector's certificate");
            }
            Err(e) => tracing::warn!(error = %e, "keeping the previous injector certificate"),
        }
    }
}
