//! `meshflow policy check`: the inbound sidecar's decision for one request, computed with the
//! sidecar's own code (`meshflow_policies`: path normalization, PeerAuthentication mode,
//! RequestAuthentication, AuthorizationPolicy), from a policy directory or from a running
//! control plane's `/config_dump` (the policies in force, JWKS included).

use std::collections::BTreeMap;
use std::path::Path;

use meshflow_policies::admission::{admit, Admission, InboundPolicies, InboundRequest, Peer};
use meshflow_policies::authn::Authenticator;
use meshflow_policies::documents::PolicySet;
use meshflow_policies::headers::xfcc_value;
use meshflow_policies::mesh::MeshFile;

/// The workload whose inbound sidecar judges the request: its namespace and labels select the
/// policies. Every mode (`-d`, `--control-plane`, `--kubernetes`) resolves one and hands it,
/// with a [`PolicySet`], to [`check`].
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its SPIFFE ID (`spiffe://…`), when known: the `By=` of the XFCC the sidecar sets for a
    /// verified caller. Unknown: the XFCC judged is `URI=<caller>` alone.
    pub spiffe_id: Option<String>,
}

/// The request to judge.
#[derive(Debug, Clone, Default)]
pub struct CheckRequest {
    /// Target app port (PeerAuthentication `portLevelMtls`, `destination.port`).
    pub port: u16,
    /// Caller principal (`td/ns/x/sa/y`, a `spiffe://` prefix is accepted); `None` = plaintext.
    pub principal: Option<String>,
    /// Caller IP.
    pub source_ip: Option<std::net::IpAddr>,
    /// Method.
    pub method: String,
    /// Path as sent, with an optional `?query`.
    pub path: String,
    /// Host / :authority.
    pub host: String,
    /// Headers, lower-case names, as the client sends them. Mesh-owned ones
    /// ([`meshflow_policies::headers`]) are removed as the sidecar removes them.
    pub headers: BTreeMap<String, Vec<String>>,
}

/// What the inbound sidecar does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded to the app (exit 0).
    Allow(String),
    /// 403 (exit 1).
    Deny(String),
    /// 400 before any policy (exit 2).
    Reject(String),
    /// 401: a token was present and failed (exit 3).
    Unauthenticated(String),
    /// Plaintext while the mode is STRICT: the connection is closed (exit 4).
    PlaintextRefused(String),
}

impl Verdict {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Verdict::Allow(_) => 0,
            Verdict::Deny(_) => 1,
            Verdict::Reject(_) => 2,
            Verdict::Unauthenticated(_) => 3,
            Verdict::PlaintextRefused(_) => 4,
        }
    }

    /// The line printed for a human.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Allow(s) => format!("ALLOW {s}"),
            Verdict::Deny(s) => format!("DENY {s}"),
            Verdict::Reject(s) => format!("REJECT 400 {s}"),
            Verdict::Unauthenticated(s) => format!("UNAUTHENTICATED 401 {s}"),
            Verdict::PlaintextRefused(s) => format!("REFUSED {s}"),
        }
    }
}

/// Judges `request` to `target` against `set` with the sidecar's own admission function
/// ([`meshflow_policies::admission::admit`]: transport (mTLS mode), path normalization, JWT,
/// authorization). Returns the verdict and AUDIT policies that matched. The one evaluation every
/// mode of `meshflow policy check` uses.
pub fn check(set: &PolicySet, target: &Target, request: &CheckRequest) -> (Verdict, Vec<String>) {
    let principal = request
        .principal
        .as_deref()
        .map(|p| p.trim_start_matches("spiffe://").to_string());
    let (raw_path, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    let source_namespace = principal
        .as_deref()
        .and_then(|p| p.split('/').nth(2))
        .unwrap_or_default()
        .to_string();
    // The XFCC the sidecar sets for a verified caller.
    let xfcc = principal.as_deref().map(|p| match &target.spiffe_id {
        Some(own) => xfcc_value(own, &format!("spiffe://{p}")),
        None => format!("URI=spiffe://{p}"),
    });
    let peer = match (&principal, &xfcc) {
        (Some(principal), Some(xfcc)) => Some(Peer {
            principal,
            namespace: &source_namespace,
            xfcc,
        }),
        _ => None,
    };
    let headers = || request.headers.clone();
    let inbound = InboundRequest {
        peer,
        method: &request.method,
        path: raw_path,
        query,
        // The sidecar answers 400 to a fragment anywhere in the request target.
        target_has_fragment: request.path.contains('#'),
        host: &request.host,
        port: request.port,
        source_ip: request.source_ip,
        headers: &headers,
    };
    let (mode, mtls_policy) = set.mtls_mode_for(&target.namespace, &target.labels, request.port);
    let authenticator =
        Authenticator::new(set.request_authentication_for(&target.namespace, &target.labels));
    let policies = InboundPolicies {
        mtls: (mode, mtls_policy.as_deref()),
        authenticator: &authenticator,
        authorization: set.authorization_for(&target.namespace, &target.labels),
    };
    let decided = match admit(&inbound, &policies) {
        Admission::PlaintextRefused { policy } => {
            let by = policy.map_or("(the default)".to_string(), |p| format!("by {p}"));
            return (
                Verdict::PlaintextRefused(format!(
                    "plaintext connection closed: mTLS mode is STRICT {by}"
                )),
                Vec::new(),
            );
        }
        Admission::BadPath(e) => {
            return (
                Verdict::Reject(format!(
                    "({e}): the sidecar answers before any policy is consulted"
                )),
                Vec::new(),
            )
        }
        Admission::Unauthenticated(e) => {
            return (Verdict::Unauthenticated(format!("({e})")), Vec::new());
        }
        Admission::Decided(decided) => decided,
    };
    let decision = decided.decision;
    let by = match (&decision.policy, decision.rule) {
        (Some(p), Some(r)) => format!("by {p} rule {r}"),
        (None, _) if decision.allowed => "(no ALLOW policy selects the workload)".to_string(),
        _ => "(ALLOW policies exist and none matches)".to_string(),
    };
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    let who = decided
        .request_principal
        .as_deref()
        .map(|p| format!("; request principal {p}"))
        .unwrap_or_default();
    let text = format!("{by}; normalized path {}{query}{who}", decided.path);
    let verdict = if decision.allowed {
        Verdict::Allow(text)
    } else {
        Verdict::Deny(text)
    };
    (verdict, decision.audited)
}

/// What `meshflow policy check` prints for a verdict: the decision line, then one `AUDIT
/// <policy>` line per AUDIT policy that matched.
pub fn render(verdict: &Verdict, audited: &[String]) -> String {
    let mut text = format!("{}\n", verdict.describe());
    for policy in audited {
        text.push_str(&format!("AUDIT {policy}\n"));
    }
    text
}

/// Loads a policy directory and fills in every `jwksUri: file://…` (relative to `dir`) so
/// tokens can be checked offline. `http(s)://` key sets are fetched only by the control plane:
/// their tokens are refused here (use `--control-plane`), and a note says so on stderr.
///
/// # Errors
/// A directory that does not exist, a `file://` key set that cannot be read, or the first
/// invalid file, with file, field and line.
pub fn load_dir_with_jwks(dir: &Path) -> Result<PolicySet, meshflow_policies::LoadError> {
    let mut set = PolicySet::load_dir(dir)?;
    for policy in &mut set.request_authentication {
        let id = policy.id();
        for rule in &mut policy.spec.jwt_rules {
            let Some(uri) = &rule.jwks_uri else { continue };
            match uri.strip_prefix("file://") {
                Some(path) => {
                    // Bounded: a FIFO or a huge file must not hang or exhaust the CLI.
                    use std::io::Read;
                    let mut text = String::new();
                    let file = dir.join(path);
                    std::fs::File::open(&file)
                        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
                        .map_err(|source| meshflow_policies::LoadError::Io { file, source })?;
                    rule.jwks = Some(text);
                }
                None => eprintln!(
                    "note: {} fetches its JWKS from {uri}; only the control plane fetches URLs (use --control-plane)",
                    id
                ),
            }
        }
    }
    Ok(set)
}

/// `http://host:port` for a control plane admin address given as `host:port` or
/// `http://host:port[/]`.
///
/// # Errors
/// Any other scheme, or an address that is not `host:port`.
pub fn admin_base_url(admin: &str) -> Result<String, String> {
    let trimmed = admin.trim().trim_end_matches('/');
    let host_port = match trimmed.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "--control-plane {admin:?}: the admin endpoint speaks plain http, not {scheme}; give http://host:port or host:port"
            ))
        }
        None => trimmed,
    };
    match host_port.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() =>
        {
            Ok(format!("http://{host_port}"))
        }
        _ => Err(format!(
            "--control-plane {admin:?}: expected the control plane's admin address, host:port or http://host:port (`meshflow up` prints it as `admin http://…`)"
        )),
    }
}

/// The mesh and the policies in force at a running control plane (admin address
/// `http://host:port` or `host:port`), as `/config_dump` shows them.
///
/// # Errors
/// A message when the control plane cannot be reached or answers something else.
pub async fn load_from_control_plane(admin: &str) -> Result<(MeshFile, PolicySet), String> {
    let url = format!("{}/config_dump", admin_base_url(admin)?);
    let dump: serde_json::Value = reqwest::get(&url)
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mesh: MeshFile =
        serde_json::from_value(dump["mesh"].clone()).map_err(|e| format!("{url}: mesh: {e}"))?;
    let policies: PolicySet = serde_json::from_value(dump["policies"].clone())
        .map_err(|e| format!("{url}: policies: {e}"))?;
    Ok((mesh, policies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_with_or_without_scheme() {
        for given in [
            "127.0.0.1:9901",
            "http://127.0.0.1:9901",
            "http://127.0.0.1:9901/",
        ] {
            assert_eq!(admin_base_url(given).unwrap(), "http://127.0.0.1:9901");
        }
        assert_eq!(
            admin_base_url("localhost:80").unwrap(),
            "http://localhost:80"
        );
        assert!(admin_base_url("https://127.0.0.1:9901")
            .unwrap_err()
            .contains("plain http"));
        assert!(admin_base_url("127.0.0.1").is_err());
        assert!(admin_base_url("http://127.0.0.1:9901/config_dump").is_err());
    }
}
