//! `kind: RequestAuthentication` (JWT) and `kind: PeerAuthentication` (mTLS mode): Istio's
//! `security.istio.io/v1` specs field for field
//! (<https://istio.io/latest/docs/reference/config/security/request_authentication/>,
//! <https://istio.io/latest/docs/reference/config/security/peer_authentication/>) under
//! `meshflow.io/v1alpha1`, plus the pure token check the inbound sidecar and
//! `meshflow policy check` share.
//!
//! JWT semantics follow Istio (Envoy `jwt_authn`): a request without a token is anonymous; a
//! request with a token that fails any check (RFC 7515 signature against the rule's JWKS,
//! RFC 7519 `iss`, `aud`, `exp`, `nbf` with 60 s clock skew; `alg: none` never verifies) is
//! rejected (the sidecar answers 401). Two different tokens in one request are rejected too.
//! Signatures are verified by the `jsonwebtoken` crate (ring), never by code of ours.

use std::collections::BTreeMap;
use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::authz::{Selector, ROOT_NAMESPACE};
use crate::load::{find_line, parse_yaml, LoadError, Result};
use crate::mesh::{ObjectMeta, API_VERSION};

/// Clock skew allowed on `exp` and `nbf`, seconds (Envoy's default).
pub const CLOCK_SKEW_S: u64 = 60;

/// A whole `RequestAuthentication` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// `meshflow.io/v1alpha1`.
    pub api_version: String,
    /// `RequestAuthentication`.
    pub kind: String,
    /// Name and namespace (default `default`).
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

/// Istio's RequestAuthentication spec.
#[cfg_attr(
    feature = "kubernetes",
    derive(kube::CustomResource),
    kube(
        group = "meshflow.io",
        version = "v1alpha1",
        kind = "RequestAuthentication",
        doc = "Istio's RequestAuthentication (JWT rules) evaluated by meshflow sidecars.",
        root = "RequestAuthenticationResource",
        namespaced,
        status = "crate::crd::ResourceStatus",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
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
    /// One rule per accepted issuer.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// Istio's JWTRule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must carry to be checked by this rule.
    pub issuer: String,
    /// Accepted `aud` values (any one suffices); empty = `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the control plane reads the JWKS: `http://…`, `https://…`, or `file://<path>`
    /// (a relative path is relative to the policy file's directory). OpenID discovery from
    /// the issuer is not supported: give `jwksUri` or `jwks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself (RFC 7517 JSON, as a string). The control plane fills this in from
    /// `jwksUri` before pushing the rule to sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token may come in (default: `Authorization` with prefix `Bearer `).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may come in (default: `access_token` when `fromHeaders`
    /// is empty too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::string_list")]
    pub from_cookies: Option<serde_json::Value>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::string")]
    pub output_payload_to_header: Option<serde_json::Value>,
    /// Not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::claim_to_headers")]
    pub output_claim_to_headers: Option<serde_json::Value>,
    /// Keep the token header on the forwarded request (default: removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// JWKS fetch timeout, e.g. `5s` (default 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Istio's JWTHeader: a header and the prefix before the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeader {
    /// Header name (case-insensitive).
    pub name: String,
    /// Prefix to strip, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A whole `PeerAuthentication` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// `meshflow.io/v1alpha1`.
    pub api_version: String,
    /// `PeerAuthentication`.
    pub kind: String,
    /// Name and namespace (default `default`).
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// Istio's PeerAuthentication spec.
#[cfg_attr(
    feature = "kubernetes",
    derive(kube::CustomResource),
    kube(
        group = "meshflow.io",
        version = "v1alpha1",
        kind = "PeerAuthentication",
        doc = "Istio's PeerAuthentication (mTLS mode) applied by meshflow sidecars.",
        root = "PeerAuthenticationResource",
        namespaced,
        status = "crate::crd::ResourceStatus",
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads (by label) in the policy's namespace; absent = namespace-wide (or mesh-wide in
    /// the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// The mode for every port of the selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per application port (the workload's own port, as in Istio); needs a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::port_map::<MutualTls>")]
    pub port_level_mtls: Option<BTreeMap<u16, MutualTls>>,
}

/// `{ mode: … }`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MutualTls {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Istio's mTLS modes. meshflow's default (no policy) is STRICT; DISABLE is refused.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent policy (namespace, then mesh).
    #[default]
    Unset,
    /// Plaintext only (not supported: meshflow always offers mTLS).
    Disable,
    /// mTLS or plaintext; plaintext requests have no principal.
    Permissive,
    /// mTLS only.
    Strict,
}

impl MtlsMode {
    /// `STRICT` / `PERMISSIVE` / … as in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }

    /// Parses [`Self::as_str`]'s output (an empty string is UNSET).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "UNSET" => MtlsMode::Unset,
            "DISABLE" => MtlsMode::Disable,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            _ => return None,
        })
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn selector_matches(selector: &Option<Selector>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_ref()
        .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn check_header(file: &Path, text: &str, api_version: &str, kind: &str, want: &str) -> Result<()> {
    let invalid = |field: &str, message: String| LoadError::Invalid {
        file: file.to_path_buf(),
        line: find_line(text, field, ""),
        field: field.to_string(),
        message,
    };
    if api_version != API_VERSION {
        return Err(invalid(
            "apiVersion",
            format!("must be {API_VERSION} (an Istio policy changes only this line)"),
        ));
    }
    if kind != want {
        return Err(invalid("kind", format!("must be {want}")));
    }
    Ok(())
}

impl RequestAuthentication {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", namespace_of(&self.metadata), self.metadata.name)
    }

    /// Namespace (default `default`).
    pub fn namespace(&self) -> &str {
        namespace_of(&self.metadata)
    }

    /// Whether this policy applies to a workload in `namespace` with `labels` (its own
    /// namespace by selector, or the root namespace mesh-wide).
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.namespace() == namespace || self.namespace() == ROOT_NAMESPACE)
            && selector_matches(&self.spec.selector, labels)
    }

    /// Parses and validates one document (`file` for messages).
    ///
    /// # Errors
    /// [`LoadError`] with file, field and line; unsupported fields say "not supported"; an
    /// inline `jwks` that is not a JWKS is refused.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let policy: RequestAuthentication = parse_yaml(file, text)?;
        check_header(
            file,
            text,
            &policy.api_version,
            &policy.kind,
            "RequestAuthentication",
        )?;
        let invalid = |field: String, key: &str, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line: find_line(text, key, ""),
            field,
            message,
        };
        for (field, present) in [
            ("targetRef", policy.spec.target_ref.is_some()),
            ("targetRefs", policy.spec.target_refs.is_some()),
        ] {
            if present {
                return Err(invalid(
                    format!("spec.{field}"),
                    field,
                    format!("{field} is not supported; use selector"),
                ));
            }
        }
        for (i, rule) in policy.spec.jwt_rules.iter().enumerate() {
            let at = |f: &str| format!("spec.jwtRules[{i}].{f}");
            if rule.issuer.is_empty() {
                return Err(invalid(at("issuer"), "issuer", "issuer is required".into()));
            }
            for (field, present) in [
                ("fromCookies", rule.from_cookies.is_some()),
                (
                    "outputPayloadToHeader",
                    rule.output_payload_to_header.is_some(),
                ),
                (
                    "outputClaimToHeaders",
                    rule.output_claim_to_headers.is_some(),
                ),
            ] {
                if present {
                    return Err(invalid(
                        at(field),
                        field,
                        format!("{field} is not supported"),
                    ));
                }
            }
            match (&rule.jwks, &rule.jwks_uri) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        at("jwksUri"),
                        "jwksUri",
                        "give jwks or jwksUri, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        at("jwksUri"),
                        "issuer",
                        "jwksUri or jwks is required (OpenID discovery is not supported)".into(),
                    ))
                }
                (Some(jwks), None) => {
                    if let Err(e) = serde_json::from_str::<JwkSet>(jwks) {
                        return Err(invalid(
                            at("jwks"),
                            "jwks",
                            format!("not a JSON Web Key Set (RFC 7517): {e}"),
                        ));
                    }
                }
                (None, Some(uri)) => {
                    if !["http://", "https://", "file://"]
                        .iter()
                        .any(|s| uri.starts_with(s))
                    {
                        return Err(invalid(
                            at("jwksUri"),
                            "jwksUri",
                            "must start with http://, https:// or file://".into(),
                        ));
                    }
                }
            }
            if let Some(t) = &rule.timeout {
                if let Err(e) = humantime::parse_duration(t) {
                    return Err(invalid(at("timeout"), "timeout", format!("{e}")));
                }
            }
            for (j, h) in rule.from_headers.iter().enumerate() {
                if http_header_name_invalid(&h.name) {
                    return Err(invalid(
                        at(&format!("fromHeaders[{j}].name")),
                        "name",
                        format!("{:?} is not a header name", h.name),
                    ));
                }
            }
        }
        let mut issuers: Vec<&str> = policy
            .spec
            .jwt_rules
            .iter()
            .map(|r| r.issuer.as_str())
            .collect();
        issuers.sort_unstable();
        if let Some(w) = issuers.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(
                "spec.jwtRules".into(),
                "issuer",
                format!("issuer {:?} has two rules", w[0]),
            ));
        }
        Ok(policy)
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", namespace_of(&self.metadata), self.metadata.name)
    }

    /// Namespace (default `default`).
    pub fn namespace(&self) -> &str {
        namespace_of(&self.metadata)
    }

    /// Parses and validates one document (`file` for messages).
    ///
    /// # Errors
    /// [`LoadError`] with file, field and line; DISABLE and `portLevelMtls` without a selector
    /// are refused.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let policy: PeerAuthentication = parse_yaml(file, text)?;
        check_header(
            file,
            text,
            &policy.api_version,
            &policy.kind,
            "PeerAuthentication",
        )?;
        let invalid = |field: String, key: &str, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line: find_line(text, key, ""),
            field,
            message,
        };
        let modes = policy
            .spec
            .mtls
            .iter()
            .map(|m| ("spec.mtls.mode".to_string(), m.mode))
            .chain(
                policy
                    .spec
                    .port_level_mtls
                    .iter()
                    .flatten()
                    .map(|(port, m)| (format!("spec.portLevelMtls.{port}.mode"), m.mode)),
            );
        for (field, mode) in modes {
            if mode == MtlsMode::Disable {
                return Err(invalid(
                    field,
                    "mode",
                    "DISABLE is not supported: meshflow always offers mTLS; use PERMISSIVE to also accept plaintext".into(),
                ));
            }
        }
        if policy.spec.port_level_mtls.is_some() && !policy.has_selector() {
            return Err(invalid(
                "spec.portLevelMtls".into(),
                "portLevelMtls",
                "portLevelMtls needs a selector (as in Istio)".into(),
            ));
        }
        Ok(policy)
    }
}

impl PeerAuthentication {
    /// Whether this policy applies to a workload in `namespace` with `labels`: a selecting
    /// policy in its namespace, the namespace-wide one, or the mesh-wide one (root namespace,
    /// no selector).
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.has_selector() {
            self.namespace() == namespace && selector_matches(&self.spec.selector, labels)
        } else {
            self.namespace() == namespace || self.namespace() == ROOT_NAMESPACE
        }
    }

    /// Whether the policy selects workloads (an empty `matchLabels` is namespace-wide, as in
    /// Istio).
    pub fn has_selector(&self) -> bool {
        self.spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    }
}

/// The effective mTLS mode for a workload's application `port`, with the policy that set it.
/// `applicable` are the policies that apply to the workload (see
/// [`PeerAuthentication::applies_to`]; the control plane sends a sidecar exactly those), and
/// `namespace` is the workload's. Istio precedence: the workload's selecting policy, port
/// level first, then the namespace-wide policy, then the mesh-wide one; UNSET inherits.
/// Without any policy the mode is STRICT (meshflow's default; Istio's is PERMISSIVE). When two
/// selecting policies apply, the first by `namespace/name` wins (Istio picks the oldest; files
/// have no creation time, so meshflow uses a stable order instead).
pub fn effective_mtls_mode<'a>(
    applicable: impl IntoIterator<Item = &'a PeerAuthentication>,
    namespace: &str,
    port: u16,
) -> (MtlsMode, Option<String>) {
    let mut policies: Vec<&PeerAuthentication> = applicable.into_iter().collect();
    policies.sort_by_key(|p| p.id());
    let workload = policies
        .iter()
        .find(|p| p.namespace() == namespace && p.has_selector());
    let namespace_wide = policies
        .iter()
        .find(|p| p.namespace() == namespace && !p.has_selector());
    let mesh_wide = policies
        .iter()
        .find(|p| p.namespace() == ROOT_NAMESPACE && !p.has_selector());
    let port_level = workload.and_then(|p| {
        let mode = p.spec.port_level_mtls.as_ref()?.get(&port)?.mode;
        Some((mode, *p))
    });
    let candidates = port_level
        .into_iter()
        .chain(workload.and_then(|p| p.spec.mtls.map(|m| (m.mode, *p))))
        .chain(namespace_wide.and_then(|p| p.spec.mtls.map(|m| (m.mode, *p))))
        .chain(mesh_wide.and_then(|p| p.spec.mtls.map(|m| (m.mode, *p))));
    for (mode, policy) in candidates {
        if mode != MtlsMode::Unset {
            return (mode, Some(policy.id()));
        }
    }
    (MtlsMode::Strict, None)
}

/// Checks that `text` is a JSON Web Key Set (RFC 7517) and returns its number of keys.
///
/// # Errors
/// The JSON or JWK error.
pub fn check_jwks(text: &str) -> std::result::Result<usize, String> {
    serde_json::from_str::<JwkSet>(text)
        .map(|set| set.keys.len())
        .map_err(|e| e.to_string())
}

/// Why a token was refused. Each maps to a bounded metric label ([`Self::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a well-formed JWS compact token, or `alg: none`, or an unknown algorithm.
    #[error("Jwt is not in the form of Header.Payload.Signature or uses an unsupported alg")]
    Malformed,
    /// No rule for the token's `iss`.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// No key of the issuer's JWKS verifies the signature.
    #[error("Jwt verification fails")]
    BadSignature,
    /// `exp` is in the past.
    #[error("Jwt is expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// `aud` matches none of the rule's audiences.
    #[error("Audiences in Jwt are not allowed")]
    BadAudience,
    /// Two different tokens in one request.
    #[error("more than one Jwt in the request")]
    MultipleTokens,
}

impl JwtError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::UnknownIssuer => "unknown_issuer",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::BadAudience => "bad_audience",
            JwtError::MultipleTokens => "multiple_tokens",
        }
    }
}

/// A verified token's identity, as AuthorizationPolicy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtIdentity {
    /// `iss/sub` (Istio's `request.auth.principal`).
    pub principal: String,
    /// `aud` values.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// Claims flattened by name; nested objects as `a.b`; arrays give one value per element.
    pub claims: BTreeMap<String, Vec<String>>,
    /// Lower-case header names to remove before forwarding (`forwardOriginalToken: false`).
    pub strip_headers: Vec<String>,
}

impl JwtIdentity {
    /// Fills the `request.auth.*` attributes of `attributes` from this identity.
    pub fn apply_to(&self, attributes: &mut crate::authz::RequestAttributes) {
        attributes.request_principal = Some(self.principal.clone());
        attributes.audiences = self.audiences.clone();
        attributes.presenter = self.presenter.clone();
        attributes.claims = self.claims.clone();
    }
}

/// The outcome of [`Authenticator::authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthnOutcome {
    /// No token in any configured location.
    Anonymous,
    /// A token verified.
    Authenticated(JwtIdentity),
    /// A token was present and failed; answer 401.
    Rejected(JwtError),
}

struct CompiledRule {
    rule: JwtRule,
    keys: JwkSet,
}

/// The JWT rules of every RequestAuthentication selecting one workload, with parsed JWKS.
/// Build once per config snapshot; [`Self::authenticate`] is cheap to call per request.
#[derive(Default)]
pub struct Authenticator {
    rules: Vec<CompiledRule>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "issuers",
                &self
                    .rules
                    .iter()
                    .map(|r| &r.rule.issuer)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Where a token was found.
struct Found {
    token: String,
    header: Option<String>,
}

impl JwtRule {
    fn header_locations(&self) -> Vec<JwtHeader> {
        if self.from_headers.is_empty() && self.from_params.is_empty() {
            vec![JwtHeader {
                name: "authorization".into(),
                prefix: Some("Bearer ".into()),
            }]
        } else {
            self.from_headers.clone()
        }
    }

    fn param_locations(&self) -> Vec<String> {
        if self.from_headers.is_empty() && self.from_params.is_empty() {
            vec!["access_token".into()]
        } else {
            self.from_params.clone()
        }
    }

    fn find_tokens(&self, headers: &BTreeMap<String, Vec<String>>, query: &str) -> Vec<Found> {
        let mut found = Vec::new();
        for location in self.header_locations() {
            let name = location.name.to_ascii_lowercase();
            for value in headers.get(&name).into_iter().flatten() {
                let token = match &location.prefix {
                    Some(prefix) => {
                        // Compared without regard to ASCII case: an auth-scheme such as
                        // "Bearer" is case-insensitive (RFC 9110 §11.1, RFC 6750).
                        if value.len() >= prefix.len()
                            && value.as_bytes()[..prefix.len()]
                                .eq_ignore_ascii_case(prefix.as_bytes())
                        {
                            value[prefix.len()..].trim()
                        } else {
                            continue;
                        }
                    }
                    None => value.trim(),
                };
                if !token.is_empty() {
                    found.push(Found {
                        token: token.to_string(),
                        header: Some(name.clone()),
                    });
                }
            }
        }
        for param in self.param_locations() {
            for (k, v) in form_pairs(query) {
                if k == param && !v.is_empty() {
                    found.push(Found {
                        token: v,
                        header: None,
                    });
                }
            }
        }
        found
    }
}

/// `application/x-www-form-urlencoded` pairs of a query string (no leading `?`).
fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn flatten_claims(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut BTreeMap<String, Vec<String>>,
) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_claims(&key, v, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) => {}
                    scalar => flatten_claims(prefix, scalar, out),
                }
            }
            out.entry(prefix.to_string()).or_default();
        }
        Value::String(s) => out.entry(prefix.to_string()).or_default().push(s.clone()),
        Value::Null => {}
        other => out
            .entry(prefix.to_string())
            .or_default()
            .push(other.to_string()),
    }
}

impl Authenticator {
    /// Compiles the rules of `policies` (the RequestAuthentications selecting one workload).
    /// A rule whose `jwks` is missing or unparsable gets an empty key set: its tokens are
    /// refused (fail closed, as Istio does when a JWKS cannot be fetched).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a RequestAuthentication>) -> Self {
        let rules = policies
            .into_iter()
            .flat_map(|p| p.spec.jwt_rules.iter())
            .map(|rule| CompiledRule {
                keys: rule
                    .jwks
                    .as_deref()
                    .and_then(|j| serde_json::from_str(j).ok())
                    .unwrap_or(JwkSet { keys: Vec::new() }),
                rule: rule.clone(),
            })
            .collect();
        Self { rules }
    }

    /// Whether any rule applies (no rule: every request is anonymous).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds the request's token (headers with lower-case names; `query` without `?`) and
    /// verifies it against the rules for its issuer that look for a token where it was found
    /// (as Envoy's `jwt_authn` providers do: any one that verifies suffices).
    pub fn authenticate(
        &self,
        headers: &BTreeMap<String, Vec<String>>,
        query: &str,
    ) -> AuthnOutcome {
        let found: Vec<(usize, Found)> = self
            .rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.rule
                    .find_tokens(headers, query)
                    .into_iter()
                    .map(move |f| (i, f))
            })
            .collect();
        let Some((_, first)) = found.first() else {
            return AuthnOutcome::Anonymous;
        };
        if found.iter().any(|(_, f)| f.token != first.token) {
            return AuthnOutcome::Rejected(JwtError::MultipleTokens);
        }
        let token = first.token.clone();
        let claims = match checked_claims(&token) {
            Ok(claims) => claims,
            Err(e) => return AuthnOutcome::Rejected(e),
        };
        let Some(issuer) = claims.get("iss").and_then(|v| v.as_str()) else {
            return AuthnOutcome::Rejected(JwtError::UnknownIssuer);
        };
        let mut candidates: Vec<usize> = found
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| self.rules[*i].rule.issuer == issuer)
            .collect();
        candidates.dedup();
        let mut last = JwtError::UnknownIssuer;
        for i in candidates {
            match self.verify(&self.rules[i], &token, issuer) {
                Ok(mut identity) => {
                    if !self.rules[i].rule.forward_original_token {
                        identity.strip_headers =
                            found.iter().filter_map(|(_, f)| f.header.clone()).collect();
                        identity.strip_headers.sort();
                        identity.strip_headers.dedup();
                    }
                    return AuthnOutcome::Authenticated(identity);
                }
                Err(e) => last = e,
            }
        }
        AuthnOutcome::Rejected(last)
    }

    fn verify(
        &self,
        compiled: &CompiledRule,
        token: &str,
        issuer: &str,
    ) -> std::result::Result<JwtIdentity, JwtError> {
        // `decode_header` refuses `alg: none` (not a jsonwebtoken Algorithm) and junk.
        let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
        let rule = &compiled.rule;
        let mut validation = Validation::new(header.alg);
        validation.leeway = CLOCK_SKEW_S;
        validation.required_spec_claims.clear();
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        if rule.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&rule.audiences);
            // jsonwebtoken checks `aud` only when present; a rule with audiences requires it.
            validation.required_spec_claims.insert("aud".to_string());
        }
        let mut last = JwtError::BadSignature;
        for jwk in &compiled.keys.keys {
            if let (Some(kid), Some(key_id)) = (&header.kid, &jwk.common.key_id) {
                if kid != key_id {
                    continue;
                }
            }
            // A key pinned to an algorithm only verifies that algorithm (no alg confusion).
            if let Some(alg) = jwk.common.key_algorithm {
                if format!("{alg:?}") != format!("{:?}", header.alg) {
                    continue;
                }
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match decode::<serde_json::Value>(token, &key, &validation) {
                Ok(data) => return Ok(identity(issuer, &data.claims)),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => JwtError::Expired,
                        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                        ErrorKind::InvalidAudience => JwtError::BadAudience,
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::BadAudience,
                        ErrorKind::InvalidIssuer => JwtError::UnknownIssuer,
                        _ => continue,
                    };
                    // The signature verified (claims are checked after it): stop here.
                    return Err(last);
                }
            }
        }
        Err(last)
    }
}

/// The unverified payload, refusing `exp`/`nbf` that are not non-negative numbers
/// (jsonwebtoken would treat such a claim as absent, so the token would never expire).
fn checked_claims(
    token: &str,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let claims = unverified_claims(token).ok_or(JwtError::Malformed)?;
    for name in ["exp", "nbf"] {
        if let Some(v) = claims.get(name) {
            if !v.as_f64().is_some_and(|n| n >= 0.0) {
                return Err(JwtError::Malformed);
            }
        }
    }
    Ok(claims)
}

/// The payload of a compact JWS without verifying it (only to pick the rule by `iss`).
fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut validation = Validation::new(decode_header(token).ok()?.alg);
    validation.insecure_disable_signature_validation();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &DecodingKey::from_secret(&[]),
        &validation,
    )
    .ok()
    .map(|d| d.claims)
}

fn identity(issuer: &str, claims: &serde_json::Value) -> JwtIdentity {
    let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let mut flat = BTreeMap::new();
    flatten_claims("", claims, &mut flat);
    JwtIdentity {
        principal: format!("{issuer}/{sub}"),
        audiences,
        presenter: claims
            .get("azp")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        claims: flat,
        strip_headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtls_precedence_follows_istio() {
        let doc = |ns: &str, name: &str, body: &str| {
            PeerAuthentication::parse(
                Path::new("p.yaml"),
                &format!("apiVersion: meshflow.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n{body}"),
            )
            .unwrap()
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "api".to_string())].into();
        let mesh = doc(ROOT_NAMESPACE, "mesh", "  mtls: { mode: PERMISSIVE }\n");
        let ns = doc("shop", "ns", "  mtls: { mode: STRICT }\n");
        let workload = doc(
            "shop",
            "api",
            "  selector: { matchLabels: { app: api } }\n  mtls: { mode: UNSET }\n  portLevelMtls:\n    8080: { mode: PERMISSIVE }\n",
        );
        let mode = |all: &[&PeerAuthentication], ns: &str, port: u16| {
            effective_mtls_mode(
                all.iter().copied().filter(|p| p.applies_to(ns, &labels)),
                ns,
                port,
            )
        };
        assert_eq!(mode(&[], "shop", 8080), (MtlsMode::Strict, None));
        assert_eq!(mode(&[&mesh], "shop", 8080).0, MtlsMode::Permissive);
        assert_eq!(mode(&[&mesh, &ns], "shop", 8080).0, MtlsMode::Strict);
        let all = [&mesh, &ns, &workload];
        assert_eq!(
            mode(&all, "shop", 8080),
            (MtlsMode::Permissive, Some("shop/api".into()))
        );
        // Another port of the same workload: UNSET inherits the namespace's STRICT.
        assert_eq!(
            mode(&all, "shop", 9090),
            (MtlsMode::Strict, Some("shop/ns".into()))
        );
        // Another namespace only sees the mesh-wide policy.
        assert_eq!(mode(&all, "other", 8080).0, MtlsMode::Permissive);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let err = PeerAuthentication::parse(
            Path::new("p.yaml"),
            "apiVersion: meshflow.io/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: a }\nspec:\n  mtls:\n    mode: DISABLE\n",
        )
        .unwrap_err();
        assert_eq!(err.field(), "spec.mtls.mode");
        assert_eq!(err.line(), 6);
        let err = RequestAuthentication::parse(
            Path::new("r.yaml"),
            "apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: { name: a }\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: file://jwks.json\n    fromCookies: [session]\n",
        )
        .unwrap_err();
        assert_eq!(err.field(), "spec.jwtRules[0].fromCookies");
        assert!(err.to_string().contains("not supported"), "{err}");
        let err = RequestAuthentication::parse(
            Path::new("r.yaml"),
            "apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: { name: a }\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwks: '{\"keys\": 3}'\n",
        )
        .unwrap_err();
        assert_eq!(err.field(), "spec.jwtRules[0].jwks");
        assert_eq!(err.line(), 7);
    }

    #[test]
    fn claims_flatten_like_istio_reads_them() {
        let mut out = BTreeMap::new();
        flatten_claims(
            "",
            &serde_json::json!({"groups": ["a", "b"], "nested": {"key": "v"}, "n": 3, "ok": true}),
            &mut out,
        );
        assert_eq!(out["groups"], vec!["a", "b"]);
        assert_eq!(out["nested.key"], vec!["v"]);
        assert_eq!(out["n"], vec!["3"]);
        assert_eq!(out["ok"], vec!["true"]);
    }

    #[test]
    fn query_tokens_are_form_decoded() {
        assert_eq!(
            form_pairs("a=1&access_token=x%2Ey&b"),
            vec![
                ("a".into(), "1".into()),
                ("access_token".into(), "x.y".into()),
                ("b".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
