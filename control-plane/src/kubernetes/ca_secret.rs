//! Kubernetes mode keeps the mesh CA in a Secret, so that every replica and every restart
//! signs with the same CA. Two layouts are read: meshflow's (`ca.crt` = the signing
//! certificate, `ca.key`, optionally `ca-bundle.crt` = the roots when `ca.crt` is an
//! intermediate) and `kubernetes.io/tls` as cert-manager writes it for a CA issuer (`tls.crt` =
//! the signing certificate, `tls.key`, `ca.crt` = its issuer's roots). Absent, the first replica
//! to start generates a root and creates the Secret (meshflow's layout); a replica that loses
//! that race uses the winner's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use crate::ca::{self, CertificateAuthority};

/// Why the CA could not be loaded from its Secret.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The API server could not be asked (down, forbidden…): worth retrying.
    #[error("{0}")]
    Api(String),
    /// The Secret (or the generated CA) is unusable: a configuration error.
    #[error("{0}")]
    Material(String),
}

/// Loads the CA from `namespace/name`, or generates a root (in `dir`, 10 years) and stores it
/// there. The Secret's files are materialized under `dir` (key mode 0600).
///
/// # Errors
/// [`CaSecretError::Material`] naming the Secret and what is wrong with it (missing key,
/// unparsable, expired or not yet valid certificate, a key that is not the certificate's, a
/// certificate that is not a CA); [`CaSecretError::Api`] for an API error.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<CertificateAuthority, CaSecretError> {
    use CaSecretError::{Api as ApiError, Material};
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let place = format!("Secret {namespace}/{name}");
    let secret = match api
        .get_opt(name)
        .await
        .map_err(|e| ApiError(format!("{place}: {e}")))?
    {
        Some(secret) => secret,
        None => {
            let generated = dir.join("generated");
            let _ = std::fs::remove_dir_all(&generated);
            CertificateAuthority::load_or_generate(&generated, trust_domain, leaf_ttl)
                .map_err(|e| Material(format!("generating the mesh CA: {e}")))?;
            let read = |file: &str| {
                std::fs::read(generated.join(file)).map_err(|e| Material(format!("{file}: {e}")))
            };
            let data = BTreeMap::from([
                ("ca.crt".to_string(), ByteString(read("root.pem")?)),
                ("ca.key".to_string(), ByteString(read("root-key.pem")?)),
            ]);
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "meshflow-control-plane".to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            let _ = std::fs::remove_dir_all(&generated);
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(secret = %place, "generated the mesh CA and stored it");
                    created
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(status)) if status.code == 409 => api
                    .get(name)
                    .await
                    .map_err(|e| ApiError(format!("{place}: {e}")))?,
                Err(e) => return Err(ApiError(format!("{place}: cannot create: {e}"))),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| data.get(key).map(|b| b.0.clone());
    // kubernetes.io/tls (cert-manager) first: there `ca.crt` is the issuer's roots.
    let (cert, key, bundle, layout) = match (get("tls.crt"), get("tls.key")) {
        (Some(cert), Some(key)) => (cert, key, get("ca.crt"), "tls.crt, tls.key, ca.crt"),
        _ => match (get("ca.crt"), get("ca.key")) {
            (Some(cert), Some(key)) => (
                cert,
                key,
                get("ca-bundle.crt"),
                "ca.crt, ca.key, ca-bundle.crt",
            ),
            _ => {
                return Err(Material(format!(
                    "{place}: needs ca.crt and ca.key (optionally ca-bundle.crt), or tls.crt \
                     and tls.key (optionally ca.crt) as cert-manager writes them"
                )))
            }
        },
    };
    let files = dir.join("from-secret");
    let io = |path: &Path, e: std::io::Error| Material(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&files).map_err(|e| io(&files, e))?;
    let cert_path = files.join("ca.crt");
    let key_path = files.join("ca.key");
    std::fs::write(&cert_path, cert).map_err(|e| io(&cert_path, e))?;
    ca::write_private(&key_path, &key)
        .map_err(|e| Material(format!("{}: {e}", key_path.display())))?;
    let bundle_path = match bundle {
        Some(bundle) => {
            let path = files.join("ca-bundle.crt");
            std::fs::write(&path, bundle).map_err(|e| io(&path, e))?;
            Some(path)
        }
        None => None,
    };
    // The files are copies of the Secret's keys: name the Secret and its keys first.
    CertificateAuthority::from_files(&cert_path, &key_path, bundle_path.as_deref(), leaf_ttl)
        .map_err(|e| Material(format!("{place} ({layout}): {e}")))
}
