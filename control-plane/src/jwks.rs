//! Fetches the JWKS of every RequestAuthentication rule that names a `jwksUri` (`file://`,
//! `http://`, `https://`) and writes it into the rule's `jwks`, so that sidecars never fetch
//! anything themselves. As in Istio, a JWKS that cannot be fetched the first time fails closed
//! (an empty key set: every token of that issuer gets 401); a failed refresh keeps the last
//! good key set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshflow_policies::authn::check_jwks;
use meshflow_policies::documents::PolicySet;

use crate::metrics::ControlPlaneMetrics;

/// How often key sets fetched from a URI are fetched again (key rotation).
pub const JWKS_REFRESH: Duration = Duration::from_secs(60);
/// Default fetch timeout when a rule gives none.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS accepted, bytes.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
const EMPTY_JWKS: &str = r#"{"keys":[]}"#;

/// Resolves `jwksUri`s, remembering the last good key set of each.
pub struct JwksResolver {
    client: reqwest::Client,
    last_good: HashMap<String, String>,
    metrics: ControlPlaneMetrics,
}

impl JwksResolver {
    /// A resolver counting failures in `metrics`.
    pub fn new(metrics: ControlPlaneMetrics) -> Self {
        Self {
            client: reqwest::Client::new(),
            last_good: HashMap::new(),
            metrics,
        }
    }

    /// Whether any rule of `policies` names a `jwksUri` (and so needs refreshing).
    pub fn needs_refresh(policies: &PolicySet) -> bool {
        policies
            .request_authentication
            .iter()
            .flat_map(|p| &p.spec.jwt_rules)
            .any(|r| r.jwks_uri.is_some())
    }

    /// Fills in `jwks` for every rule with a `jwksUri`. Failures are logged and counted in
    /// `meshflow_jwks_fetch_errors_total`; the rule gets the last good key set, else none.
    /// Relative `file://` paths are relative to `policies_dir`.
    pub async fn resolve(&mut self, policies: &mut PolicySet, policies_dir: Option<&Path>) {
        for policy in &mut policies.request_authentication {
            let id = policy.id();
            for rule in &mut policy.spec.jwt_rules {
                let Some(uri) = rule.jwks_uri.clone() else {
                    continue;
                };
                let timeout = rule
                    .timeout
                    .as_deref()
                    .and_then(|t| humantime::parse_duration(t).ok())
                    .unwrap_or(DEFAULT_FETCH_TIMEOUT);
                let fetched = self
                    .fetch(&uri, timeout, policies_dir)
                    .await
                    .and_then(|text| {
                        check_jwks(&text)
                            .map(|_| text)
                            .map_err(|e| format!("not a JWKS: {e}"))
                    });
                let jwks = match fetched {
                    Ok(text) => {
                        self.last_good.insert(uri.clone(), text.clone());
                        text
                    }
                    Err(e) => {
                        self.metrics.jwks_fetch_errors.inc();
                        tracing::error!(policy = %id, issuer = %rule.issuer, jwks_uri = %uri,
                            "cannot fetch JWKS: {e}; tokens of this issuer are refused until it loads");
                        self.last_good
                            .get(&uri)
                            .cloned()
                            .unwrap_or_else(|| EMPTY_JWKS.to_string())
                    }
                };
                rule.jwks = Some(jwks);
            }
        }
    }

    async fn fetch(
        &self,
        uri: &str,
        timeout: Duration,
        policies_dir: Option<&Path>,
    ) -> Result<String, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            let path = match policies_dir {
                Some(dir) if Path::new(path).is_relative() => dir.join(path),
                _ => PathBuf::from(path),
            };
            let text = tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            return if text.len() > MAX_JWKS_BYTES {
                Err(format!("larger than {MAX_JWKS_BYTES} bytes"))
            } else {
                Ok(text)
            };
        }
        let response = self
            .client
            .get(uri)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    }
}
