//! Kubernetes mode keeps the mesh CA in a Secret (`ca.crt`, `ca.key`, optionally
//! `ca-bundle.crt` when `ca.crt` is an intermediate), so that every replica and every restart
//! signs with the same CA. Absent, the first replica to start generates a root and creates the
//! Secret; a replica that loses that race uses the winner's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use crate::ca::{self, CertificateAuthority};

/// Loads the CA from `namespace/name`, or generates a root (in `dir`, 10 years) and stores it
/// there. The Secret's files are materialized under `dir` (key mode 0600).
///
/// # Errors
/// A message naming the Secret and what is wrong with it (missing key, unparsable or expired
/// certificate), or the API error.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<CertificateAuthority, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let place = format!("Secret {namespace}/{name}");
    let secret = match api
        .get_opt(name)
        .await
        .map_err(|e| format!("{place}: {e}"))?
    {
        Some(secret) => secret,
        None => {
            let generated = dir.join("generated");
            let _ = std::fs::remove_dir_all(&generated);
            CertificateAuthority::load_or_generate(&generated, trust_domain, leaf_ttl)
                .map_err(|e| format!("generating the mesh CA: {e}"))?;
            let read = |file: &str| {
                std::fs::read(generated.join(file)).map_err(|e| format!("{file}: {e}"))
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
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    api.get(name).await.map_err(|e| format!("{place}: {e}"))?
                }
                Err(e) => return Err(format!("{place}: cannot create: {e}")),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| data.get(key).map(|b| b.0.clone());
    let (Some(cert), Some(key)) = (get("ca.crt"), get("ca.key")) else {
        return Err(format!("{place}: needs the keys ca.crt and ca.key"));
    };
    let files = dir.join("from-secret");
    std::fs::create_dir_all(&files).map_err(|e| format!("{}: {e}", files.display()))?;
    let cert_path = files.join("ca.crt");
    let key_path = files.join("ca.key");
    std::fs::write(&cert_path, cert).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    ca::write_private(&key_path, &key).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let bundle_path = match get("ca-bundle.crt") {
        Some(bundle) => {
            let path = files.join("ca-bundle.crt");
            std::fs::write(&path, bundle).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    CertificateAuthority::from_files(&cert_path, &key_path, bundle_path.as_deref(), leaf_ttl)
        .map_err(|e| format!("{place}: {e}"))
}
