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
/// Longest fetch timeout a rule may ask for.
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest JWKS accepted, bytes.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
const EMPTY_JWKS: &str = r#"{"keys":[]}"#;

/// Resolves `jwksUri`s, remembering the last good key set of each. Clones share that memory,
/// so one task can fetch while another fills rules from what is known (never waiting on a
/// fetch).
#[derive(Clone)]
pub struct JwksResolver {
    client: reqwest::Client,
    last_good: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>>,
    metrics: ControlPlaneMetrics,
    files: bool,
}

impl JwksResolver {
    /// A resolver counting failures in `metrics`.
    pub fn new(metrics: ControlPlaneMetrics) -> Self {
        Self {
            client: reqwest::Client::new(),
            last_good: Default::default(),
            metrics,
            files: true,
        }
    }

    /// Refuses `file://` key sets (Kubernetes mode: a policy's author is not the operator of
    /// the control plane's host, and must not make it read its files).
    pub fn without_files(mut self) -> Self {
        self.files = false;
        self
    }

    /// Whether any rule of `policies` names a `jwksUri` (and so needs refreshing).
    pub fn needs_refresh(policies: &PolicySet) -> bool {
        policies
            .request_authentication
            .iter()
            .flat_map(|p| &p.spec.jwt_rules)
            .any(|r| r.jwks_uri.is_some())
    }

    /// Fetches every `jwksUri` of `policies` (concurrently, each bounded by its timeout, at
    /// most [`MAX_FETCH_TIMEOUT`]) and then [`fill`](Self::fill)s the rules. Failures are
    /// logged and counted in `meshflow_jwks_fetch_errors_total`; the rule keeps the last good
    /// key set, else none. Relative `file://` paths are relative to `policies_dir`.
    pub async fn resolve(&mut self, policies: &mut PolicySet, policies_dir: Option<&Path>) {
        let mut wanted: HashMap<String, (Duration, String)> = HashMap::new();
        for policy in &policies.request_authentication {
            for rule in &policy.spec.jwt_rules {
                let Some(uri) = rule.jwks_uri.clone() else {
                    continue;
                };
                let timeout = rule
                    .timeout
                    .as_deref()
                    .and_then(|t| humantime::parse_duration(t).ok())
                    .unwrap_or(DEFAULT_FETCH_TIMEOUT)
                    .min(MAX_FETCH_TIMEOUT);
                wanted.insert(uri, (timeout, policy.id()));
            }
        }
        let this = &*self;
        let fetches = wanted.iter().map(|(uri, (timeout, policy))| async move {
            let result = this
                .fetch(uri, *timeout, policies_dir)
                .await
                .and_then(|text| {
                    check_jwks(&text)
                        .map(|_| text)
                        .map_err(|e| format!("not a JWKS: {e}"))
                });
            (uri.clone(), policy.clone(), result)
        });
        for (uri, policy, result) in futures::future::join_all(fetches).await {
            match result {
                Ok(text) => {
                    self.last_good
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(uri, text);
                }
                Err(e) => {
                    self.metrics.jwks_fetch_errors.inc();
                    tracing::error!(policy = %policy, jwks_uri = %uri,
                        "cannot fetch JWKS: {e}; the last good key set (or none: tokens refused) stays in force");
                }
            }
        }
        self.fill(policies);
    }

    /// Writes the last good key set of each rule's `jwksUri` into its `jwks` (none fetched
    /// yet: an empty set, so its tokens are refused).
    pub fn fill(&self, policies: &mut PolicySet) {
        let last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        for policy in &mut policies.request_authentication {
            for rule in &mut policy.spec.jwt_rules {
                if let Some(uri) = &rule.jwks_uri {
                    rule.jwks = Some(
                        last_good
                            .get(uri)
                            .cloned()
                            .unwrap_or_else(|| EMPTY_JWKS.to_string()),
                    );
                }
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
            if !self.files {
                return Err(
                    "file:// key sets are not read in Kubernetes mode; use https://".into(),
                );
            }
            let path = match policies_dir {
                Some(dir) if Path::new(path).is_relative() => dir.join(path),
                _ => PathBuf::from(path),
            };
            // Bounded in size and time: a FIFO or /dev/zero must not stall or exhaust us.
            let read = async {
                use tokio::io::AsyncReadExt;
                let file = tokio::fs::File::open(&path).await?;
                let mut buf = Vec::new();
                file.take(MAX_JWKS_BYTES as u64 + 1)
                    .read_to_end(&mut buf)
                    .await?;
                Ok::<_, std::io::Error>(buf)
            };
            let buf = tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| format!("{}: timed out", path.display()))?
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if buf.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
            return String::from_utf8(buf).map_err(|e| e.to_string());
        }
        let mut response = self
            .client
            .get(uri)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        // Read in chunks and stop at the cap (the timeout covers the whole body).
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        String::from_utf8(body).map_err(|e| e.to_string())
    }
}
