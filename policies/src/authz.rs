//! `kind: AuthorizationPolicy` — Istio's `security.istio.io/v1` spec field for field
//! (<https://istio.io/latest/docs/reference/config/security/authorization-policy/>), under
//! `meshflow.io/v1alpha1`, with Istio's evaluation: CUSTOM is not supported; DENY policies
//! first, then ALLOW; no ALLOW policy → allow; ALLOW policies and none matches → deny; AUDIT only
//! records. String matches are exact, prefix `x*`, suffix `*x` and presence `*` — never a
//! regex. Paths also take Istio's templates `{*}` (one segment) and `{**}` (any).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::load::{find_line, parse_yaml, LoadError, Result};
use crate::mesh::{ObjectMeta, API_VERSION};

/// Policies in this namespace apply to every workload of the mesh.
pub const ROOT_NAMESPACE: &str = "meshflow-system";

/// A whole `AuthorizationPolicy` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// `meshflow.io/v1alpha1` (Istio files change only this line).
    pub api_version: String,
    /// `AuthorizationPolicy`.
    pub kind: String,
    /// Name and namespace (default `default`).
    pub metadata: ObjectMeta,
    /// The policy; an absent spec is `{}` (ALLOW with no rules: deny all).
    #[serde(default)]
    pub spec: AuthorizationSpec,
}

/// Istio's AuthorizationPolicy spec.
#[cfg_attr(
    feature = "kubernetes",
    derive(kube::CustomResource),
    kube(
        group = "meshflow.io",
        version = "v1alpha1",
        kind = "AuthorizationPolicy",
        doc = "Istio's AuthorizationPolicy (security.istio.io/v1, field for field) evaluated by meshflow sidecars.",
        root = "AuthorizationPolicyResource",
        namespaced,
        status = "crate::crd::ResourceStatus",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSpec {
    /// Workloads (by label) in the policy's namespace; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Not supported (Kubernetes Gateway API attachment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::target_ref")]
    pub target_ref: Option<serde_json::Value>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::target_refs")]
    pub target_refs: Option<serde_json::Value>,
    /// ALLOW (default), DENY, AUDIT; CUSTOM is refused.
    #[serde(default)]
    pub action: Action,
    /// Not supported (CUSTOM's external authorizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::provider")]
    pub provider: Option<serde_json::Value>,
    /// Rules; absent = none (ALLOW: deny all; DENY/AUDIT: matches nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

/// Label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Every label must be present with this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Policy action.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow matching requests.
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Record matching requests.
    Audit,
    /// External authorization (not supported).
    Custom,
}

/// A rule: every given part must match; `{}` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Any of these sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    /// Any of these operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    /// All of these conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// `from` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `to` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Istio's Source: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_request_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// Istio's Operation: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_paths: Option<Vec<String>>,
}

/// A `when` condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// Istio attribute name, e.g. `request.headers[x-tenant]`.
    pub key: String,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// None of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

/// The request attributes a decision looks at. Paths and hosts are already normalized.
#[derive(Debug, Clone, Default)]
pub struct RequestAttributes {
    /// Peer principal in Istio form `td/ns/x/sa/y` (none for plaintext).
    pub principal: Option<String>,
    /// Peer namespace (from the principal).
    pub source_namespace: Option<String>,
    /// Peer IP.
    pub source_ip: Option<IpAddr>,
    /// Original client IP (same as `source_ip` until proxies in front are trusted).
    pub remote_ip: Option<IpAddr>,
    /// JWT principal `iss/sub`.
    pub request_principal: Option<String>,
    /// JWT audiences.
    pub audiences: Vec<String>,
    /// JWT presenter (`azp`).
    pub presenter: Option<String>,
    /// JWT claims, flattened values by claim name (nested as `a.b`).
    pub claims: BTreeMap<String, Vec<String>>,
    /// Host, normalized (lower case, no port, no trailing dot).
    pub host: String,
    /// Destination (app) port.
    pub port: u16,
    /// Destination IP.
    pub destination_ip: Option<IpAddr>,
    /// Method.
    pub method: String,
    /// Normalized path, without the query.
    pub path: String,
    /// TLS SNI the peer sent.
    pub sni: Option<String>,
    /// Request headers (lower-case names).
    pub headers: BTreeMap<String, Vec<String>>,
}

/// The outcome of evaluating a workload's policies for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed?
    pub allowed: bool,
    /// `namespace/name` of the policy that decided (none: no policy applied, or default deny).
    pub policy: Option<String>,
    /// Index of the matching rule in that policy.
    pub rule: Option<usize>,
    /// AUDIT policies that matched (`namespace/name`).
    pub audited: Vec<String>,
}

/// Istio string match: `*` (non-empty), `x*`, `*x`, exact.
pub fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// Path match: string match, or an Istio template with `{*}` (exactly one segment) and `{**}`
/// (zero or more segments, only as the last segment).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains('{') {
        return string_matches(pattern, path);
    }
    let pat: Vec<&str> = pattern.split('/').collect();
    let val: Vec<&str> = path.split('/').collect();
    for (i, p) in pat.iter().enumerate() {
        match *p {
            "{**}" => return i + 1 == pat.len() && val.len() >= i,
            "{*}" => match val.get(i) {
                Some(v) if !v.is_empty() => {}
                _ => return false,
            },
            literal => {
                if val.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    pat.len() == val.len()
}

fn any(
    patterns: &Option<Vec<String>>,
    value: Option<&str>,
    matcher: fn(&str, &str) -> bool,
) -> Option<bool> {
    patterns
        .as_ref()
        .map(|ps| value.is_some_and(|v| ps.iter().any(|p| matcher(p, v))))
}

fn ip_in(block: &str, ip: IpAddr) -> bool {
    let (net, bits) = match block.split_once('/') {
        Some((net, bits)) => (net, bits.parse::<u8>().ok()),
        None => (block, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn ip_any(blocks: &Option<Vec<String>>, ip: Option<IpAddr>) -> Option<bool> {
    blocks
        .as_ref()
        .map(|bs| ip.is_some_and(|ip| bs.iter().any(|b| ip_in(b, ip))))
}

/// `Some(false)` fails; `None` (field absent) passes.
fn pass(check: Option<bool>) -> bool {
    check.unwrap_or(true)
}

fn not(v: Option<bool>) -> Option<bool> {
    v.map(|b| !b)
}

impl Source {
    fn matches(&self, r: &RequestAttributes) -> bool {
        // Short-circuits: the first field that fails ends the check (most requests fail a
        // policy on its first field, the principal).
        pass(any(
            &self.principals,
            r.principal.as_deref(),
            string_matches,
        )) && pass(not(any(
            &self.not_principals,
            r.principal.as_deref(),
            string_matches,
        ))) && pass(any(
            &self.request_principals,
            r.request_principal.as_deref(),
            string_matches,
        )) && pass(not(any(
            &self.not_request_principals,
            r.request_principal.as_deref(),
            string_matches,
        ))) && pass(any(
            &self.namespaces,
            r.source_namespace.as_deref(),
            string_matches,
        )) && pass(not(any(
            &self.not_namespaces,
            r.source_namespace.as_deref(),
            string_matches,
        ))) && pass(ip_any(&self.ip_blocks, r.source_ip))
            && pass(not(ip_any(&self.not_ip_blocks, r.source_ip)))
            && pass(ip_any(&self.remote_ip_blocks, r.remote_ip))
            && pass(not(ip_any(&self.not_remote_ip_blocks, r.remote_ip)))
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    string_matches(&crate::path::normalize_host(pattern), host)
}

impl Operation {
    fn matches(&self, r: &RequestAttributes) -> bool {
        let port = (self.ports.is_some() || self.not_ports.is_some()).then(|| r.port.to_string());
        pass(any(&self.hosts, Some(&r.host), host_matches))
            && pass(not(any(&self.not_hosts, Some(&r.host), host_matches)))
            && pass(any(&self.ports, port.as_deref(), string_matches))
            && pass(not(any(&self.not_ports, port.as_deref(), string_matches)))
            && pass(any(&self.methods, Some(&r.method), string_matches))
            && pass(not(any(&self.not_methods, Some(&r.method), string_matches)))
            && pass(any(&self.paths, Some(&r.path), path_matches))
            && pass(not(any(&self.not_paths, Some(&r.path), path_matches)))
    }
}

/// The `when` keys meshflow evaluates (Istio's documented names).
pub fn supported_key(key: &str) -> bool {
    matches!(
        key,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "destination.ip"
            | "destination.port"
            | "connection.sni"
    ) || bracketed(key, "request.headers").is_some()
        || bracketed(key, "request.auth.claims").is_some()
}

fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
        .filter(|s| !s.is_empty())
}

impl Condition {
    fn attribute(&self, r: &RequestAttributes) -> Vec<String> {
        let one = |v: Option<String>| v.into_iter().collect::<Vec<_>>();
        match self.key.as_str() {
            "source.ip" => one(r.source_ip.map(|i| i.to_string())),
            "remote.ip" => one(r.remote_ip.map(|i| i.to_string())),
            "source.namespace" => one(r.source_namespace.clone()),
            "source.principal" => one(r.principal.clone()),
            "request.auth.principal" => one(r.request_principal.clone()),
            "request.auth.audiences" => r.audiences.clone(),
            "request.auth.presenter" => one(r.presenter.clone()),
            "destination.ip" => one(r.destination_ip.map(|i| i.to_string())),
            "destination.port" => vec![r.port.to_string()],
            "connection.sni" => one(r.sni.clone()),
            key => {
                if let Some(h) = bracketed(key, "request.headers") {
                    r.headers
                        .get(&h.to_ascii_lowercase())
                        .cloned()
                        .unwrap_or_default()
                } else if let Some(c) = bracketed(key, "request.auth.claims") {
                    // Istio writes nested claims as [a][b]; we store them as a.b.
                    r.claims
                        .get(&c.replace("][", "."))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn matches(&self, r: &RequestAttributes) -> bool {
        let values = self.attribute(r);
        let ip_key = matches!(
            self.key.as_str(),
            "source.ip" | "remote.ip" | "destination.ip"
        );
        let hit = |patterns: &Vec<String>| {
            values.iter().any(|v| {
                patterns.iter().any(|p| {
                    if ip_key {
                        v.parse::<IpAddr>().is_ok_and(|ip| ip_in(p, ip))
                    } else {
                        string_matches(p, v)
                    }
                })
            })
        };
        self.values.as_ref().is_none_or(hit) && !self.not_values.as_ref().is_some_and(hit)
    }
}

impl Rule {
    fn matches(&self, r: &RequestAttributes) -> bool {
        self.from
            .as_ref()
            .is_none_or(|fs| fs.iter().any(|f| f.source.matches(r)))
            && self
                .to
                .as_ref()
                .is_none_or(|ts| ts.iter().any(|t| t.operation.matches(r)))
            && self
                .when
                .as_ref()
                .is_none_or(|ws| ws.iter().all(|w| w.matches(r)))
    }
}

impl AuthorizationPolicy {
    /// Whether a `when` condition of this policy reads a request header
    /// (`request.headers[…]`): only then does inbound admission build the request's header map.
    pub fn reads_request_headers(&self) -> bool {
        self.spec
            .rules
            .iter()
            .flatten()
            .flat_map(|rule| rule.when.iter().flatten())
            .any(|condition| bracketed(&condition.key, "request.headers").is_some())
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    /// Namespace (default `default`).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// Whether this policy applies to a workload in `namespace` with `labels`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.namespace() == namespace || self.namespace() == ROOT_NAMESPACE)
            && self
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// The index of the first rule matching `r`.
    pub fn matching_rule(&self, r: &RequestAttributes) -> Option<usize> {
        self.spec
            .rules
            .as_ref()?
            .iter()
            .position(|rule| rule.matches(r))
    }

    /// Parses and validates one document (`file` for messages).
    ///
    /// # Errors
    /// [`LoadError`] with file, field and line; unsupported fields say "not supported".
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let policy: AuthorizationPolicy = parse_yaml(file, text)?;
        policy.validate(file, text)?;
        Ok(policy)
    }

    fn validate(&self, file: &Path, text: &str) -> Result<()> {
        let invalid = |field: &str, key: &str, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line: find_line(text, key, ""),
            field: field.to_string(),
            message,
        };
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                "apiVersion",
                format!("must be {API_VERSION} (an Istio policy changes only this line)"),
            ));
        }
        if self.kind != "AuthorizationPolicy" {
            return Err(invalid(
                "kind",
                "kind",
                "must be AuthorizationPolicy".into(),
            ));
        }
        if self.spec.action == Action::Custom {
            return Err(invalid(
                "spec.action",
                "action",
                "CUSTOM is not supported".into(),
            ));
        }
        for (field, present) in [
            ("provider", self.spec.provider.is_some()),
            ("targetRef", self.spec.target_ref.is_some()),
            ("targetRefs", self.spec.target_refs.is_some()),
        ] {
            if present {
                return Err(invalid(
                    &format!("spec.{field}"),
                    field,
                    format!("{field} is not supported; use selector"),
                ));
            }
        }
        for (i, rule) in self.spec.rules.iter().flatten().enumerate() {
            for (j, w) in rule.when.iter().flatten().enumerate() {
                if !supported_key(&w.key) {
                    return Err(invalid(
                        &format!("spec.rules[{i}].when[{j}].key"),
                        "key",
                        format!("when key {:?} is not supported", w.key),
                    ));
                }
                if w.values.is_none() && w.not_values.is_none() {
                    return Err(invalid(
                        &format!("spec.rules[{i}].when[{j}]"),
                        "key",
                        "needs values or notValues".into(),
                    ));
                }
            }
            for (j, to) in rule.to.iter().flatten().enumerate() {
                for path in to
                    .operation
                    .paths
                    .iter()
                    .flatten()
                    .chain(to.operation.not_paths.iter().flatten())
                {
                    if path.contains('{')
                        && !path
                            .split('/')
                            .all(|s| !s.contains('{') || s == "{*}" || s == "{**}")
                        || path
                            .split('/')
                            .position(|s| s == "{**}")
                            .is_some_and(|p| p + 1 != path.split('/').count())
                    {
                        return Err(invalid(
                            &format!("spec.rules[{i}].to[{j}].operation.paths"),
                            "paths",
                            format!(
                                "{path:?}: templates are whole segments {{*}} or a final {{**}}"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Evaluates the policies that select a workload for one request (Istio semantics).
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy> + Clone,
    r: &RequestAttributes,
) -> Decision {
    let mut audited = Vec::new();
    for p in policies.clone() {
        if p.spec.action == Action::Audit && p.matching_rule(r).is_some() {
            audited.push(p.id());
        }
    }
    for p in policies.clone() {
        if p.spec.action == Action::Deny {
            if let Some(rule) = p.matching_rule(r) {
                return Decision {
                    allowed: false,
                    policy: Some(p.id()),
                    rule: Some(rule),
                    audited,
                };
            }
        }
    }
    let mut any_allow = false;
    for p in policies {
        if p.spec.action == Action::Allow {
            any_allow = true;
            if let Some(rule) = p.matching_rule(r) {
                return Decision {
                    allowed: true,
                    policy: Some(p.id()),
                    rule: Some(rule),
                    audited,
                };
            }
        }
    }
    Decision {
        allowed: !any_allow,
        policy: None,
        rule: None,
        audited,
    }
}
