//! Inbound admission: the one ordered evaluation of a request arriving at a workload's inbound
//! sidecar — transport (PeerAuthentication mTLS mode), path normalization, JWT
//! (RequestAuthentication), authorization (AuthorizationPolicy) — used by the sidecar on every
//! request and by `meshflow policy check`, so the two cannot disagree on the order of checks.
//!
//! Pure and over borrowed request data: nothing is copied unless a policy needs it. With no
//! RequestAuthentication and no AuthorizationPolicy selecting the workload (Istio's "allow
//! all"), only the path is normalized and no attribute is built; the header map (a copy of
//! every header) is built only when a JWT rule or a `request.headers[…]` condition reads it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::authn::{Authenticator, AuthnOutcome, JwtError, MtlsMode};
use crate::authz::{authorize, AuthorizationPolicy, Decision, RequestAttributes};
use crate::headers::admitted_headers;
use crate::path::{normalize_host, normalize_path, PathError};

/// The verified mTLS peer of a request.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// Istio principal `td/ns/<ns>/sa/<sa>` (`source.principal`).
    pub principal: &'a str,
    /// The peer's namespace (`source.namespace`).
    pub namespace: &'a str,
    /// The XFCC value the sidecar sets for this peer (`By=…;URI=…`), judged as
    /// `request.headers[x-forwarded-client-cert]`.
    pub xfcc: &'a str,
}

/// The request as the inbound sidecar sees it after transport and framing checks.
pub struct InboundRequest<'a> {
    /// The verified peer; `None` for a plaintext connection.
    pub peer: Option<Peer<'a>>,
    /// Method.
    pub method: &'a str,
    /// The path as received, without the query (RFC 3986 §3.3).
    pub path: &'a str,
    /// The query without `?` (may carry a JWT, RequestAuthentication `fromParams`).
    pub query: &'a str,
    /// Whether the raw request target carried a fragment (`#`), which URI parsers drop: a
    /// fragment is refused (RFC 9112 §3.2: not part of a request target).
    pub target_has_fragment: bool,
    /// Host or `:authority` as received.
    pub host: &'a str,
    /// The destination (app) port.
    pub port: u16,
    /// The peer's IP address.
    pub source_ip: Option<IpAddr>,
    /// The request's headers (lower-case names), called only when a JWT rule or a policy's
    /// `request.headers[…]` condition needs them. Mesh-owned headers in it are dropped ([`crate::headers`]) and the peer's
    /// XFCC added before anything reads them.
    pub headers: &'a (dyn Fn() -> BTreeMap<String, Vec<String>> + Sync),
}

/// What selects the workload: its RequestAuthentication rules and AuthorizationPolicies.
pub struct InboundPolicies<'a, P> {
    /// PeerAuthentication mode of the port, and the policy that set it (`namespace/name`).
    pub mtls: (MtlsMode, Option<&'a str>),
    /// JWT rules (may be empty).
    pub authenticator: &'a Authenticator,
    /// AuthorizationPolicies selecting the workload (may be empty: allow all).
    pub authorization: P,
}

/// The outcome of [`admit`], in the order the checks run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Plaintext while the mode is STRICT: the connection is closed without an answer.
    PlaintextRefused {
        /// The PeerAuthentication that made the mode STRICT (`None`: the default).
        policy: Option<String>,
    },
    /// The path cannot be normalized: 400 before any policy.
    BadPath(PathError),
    /// A token was present and failed: 401.
    Unauthenticated(JwtError),
    /// Authorization decided (allowed or 403).
    Decided(Decided),
}

/// An authorization decision and what the sidecar forwards if allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The decision (policy, rule, AUDIT matches).
    pub decision: Decision,
    /// The normalized path that was judged (and is forwarded).
    pub path: String,
    /// The verified JWT principal (`iss/sub`), if a token verified.
    pub request_principal: Option<String>,
    /// Headers to remove before forwarding (`forwardOriginalToken: false`).
    pub strip_headers: Vec<String>,
}

/// The transport check alone: whether a request over this transport may go on under `mode`.
/// `false` only for plaintext under STRICT. The sidecar also runs it at once on a new
/// plaintext connection; [`admit`] runs it first.
pub fn transport_allowed(plaintext: bool, mode: MtlsMode) -> bool {
    !plaintext || mode == MtlsMode::Permissive
}

/// Admits or refuses one inbound request: transport, path normalization, JWT, authorization,
/// in that order (Istio's order: PeerAuthentication, then RequestAuthentication, then
/// AuthorizationPolicy).
pub fn admit<'p, P>(request: &InboundRequest<'_>, policies: &InboundPolicies<'_, P>) -> Admission
where
    P: IntoIterator<Item = &'p AuthorizationPolicy> + Clone,
{
    let (mode, mtls_policy) = policies.mtls;
    if !transport_allowed(request.peer.is_none(), mode) {
        return Admission::PlaintextRefused {
            policy: mtls_policy.map(str::to_string),
        };
    }
    let path = match if request.target_has_fragment {
        Err(PathError::Fragment)
    } else {
        normalize_path(request.path)
    } {
        Ok(path) => path,
        Err(e) => return Admission::BadPath(e),
    };
    let no_policy = policies.authorization.clone().into_iter().next().is_none();
    if no_policy && policies.authenticator.is_empty() {
        // Nothing reads the request's attributes: allowed, and nothing built for it.
        return Admission::Decided(Decided {
            decision: Decision {
                allowed: true,
                policy: None,
                rule: None,
                audited: Vec::new(),
            },
            path,
            request_principal: None,
            strip_headers: Vec::new(),
        });
    }
    // The header map is a copy of every header: only a JWT rule (it looks for the token) or a
    // `request.headers[…]` condition reads it. Without one, an empty map decides the same.
    let reads_headers = !policies.authenticator.is_empty()
        || policies
            .authorization
            .clone()
            .into_iter()
            .any(AuthorizationPolicy::reads_request_headers);
    let headers = if reads_headers {
        admitted_headers(
            &(request.headers)(),
            request.peer.map(|p| p.xfcc.to_string()),
        )
    } else {
        BTreeMap::new()
    };
    let mut strip_headers = Vec::new();
    let mut attributes = RequestAttributes {
        principal: request.peer.map(|p| p.principal.to_string()),
        source_namespace: request.peer.map(|p| p.namespace.to_string()),
        source_ip: request.source_ip,
        remote_ip: request.source_ip,
        host: normalize_host(request.host),
        port: request.port,
        method: request.method.to_string(),
        path: path.clone(),
        ..Default::default()
    };
    if !policies.authenticator.is_empty() {
        match policies.authenticator.authenticate(&headers, request.query) {
            AuthnOutcome::Anonymous => {}
            AuthnOutcome::Authenticated(identity) => {
                identity.apply_to(&mut attributes);
                strip_headers = identity.strip_headers;
            }
            AuthnOutcome::Rejected(e) => return Admission::Unauthenticated(e),
        }
    }
    attributes.headers = headers;
    let decision = authorize(policies.authorization.clone(), &attributes);
    Admission::Decided(Decided {
        decision,
        path,
        request_principal: attributes.request_principal,
        strip_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(yaml: &str) -> AuthorizationPolicy {
        let mut set = crate::documents::PolicySet::default();
        set.add_file(Path::new("p.yaml"), yaml).expect("policy");
        set.authorization.remove(0)
    }

    fn request<'a>(
        peer: Option<Peer<'a>>,
        path: &'a str,
        headers: &'a (dyn Fn() -> BTreeMap<String, Vec<String>> + Sync),
    ) -> InboundRequest<'a> {
        InboundRequest {
            peer,
            method: "GET",
            path,
            query: "",
            target_has_fragment: false,
            host: "backend.default:8080",
            port: 8080,
            source_ip: None,
            headers,
        }
    }

    const PEER: Peer<'static> = Peer {
        principal: "cluster.local/ns/default/sa/frontend",
        namespace: "default",
        xfcc: "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/frontend",
    };

    /// Admits `path` from [`PEER`] under STRICT mTLS, no JWT rule and `set`; expects a decision.
    fn decide(
        set: &[AuthorizationPolicy],
        path: &str,
        headers: &(dyn Fn() -> BTreeMap<String, Vec<String>> + Sync),
    ) -> Decided {
        let none = Authenticator::default();
        let policies = InboundPolicies {
            mtls: (MtlsMode::Strict, None),
            authenticator: &none,
            authorization: set.iter(),
        };
        match admit(&request(Some(PEER), path, headers), &policies) {
            Admission::Decided(d) => d,
            other => panic!("{other:?}"),
        }
    }

    /// Plaintext is refused under STRICT before anything else, even a bad path; PERMISSIVE lets
    /// it on to the path check.
    #[test]
    fn transport_then_path_then_policy() {
        let none = Authenticator::default();
        let no_headers = || panic!("no policy reads the headers");
        let strict = InboundPolicies {
            mtls: (MtlsMode::Strict, Some("default/strict")),
            authenticator: &none,
            authorization: std::iter::empty(),
        };
        assert_eq!(
            admit(&request(None, "/../x;y", &no_headers), &strict),
            Admission::PlaintextRefused {
                policy: Some("default/strict".into())
            }
        );
        let permissive = InboundPolicies {
            mtls: (MtlsMode::Permissive, None),
            ..strict
        };
        assert!(matches!(
            admit(&request(None, "/a;b", &no_headers), &permissive),
            Admission::BadPath(_)
        ));
        // No policy at all: allowed, the headers never built, the path normalized.
        match admit(&request(Some(PEER), "/a//b/../c", &no_headers), &permissive) {
            Admission::Decided(d) => {
                assert!(d.decision.allowed);
                assert_eq!(d.path, "/a/c");
                assert_eq!(d.decision.policy, None);
            }
            other => panic!("{other:?}"),
        }
    }

    /// Policies that read no header decide without the header map being built: an ALLOW on
    /// the peer's principal and a DENY on a path, both decided, the headers never called.
    #[test]
    fn policies_without_header_conditions_never_build_the_header_map() {
        let no_headers = || panic!("no policy reads the headers");
        let set = [
            policy(
                "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  action: DENY
  rules:
    - to: [{ operation: { paths: [/admin*], ports: ['8080'] } }]
",
            ),
            policy(
                "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: frontend, namespace: default }
spec:
  action: ALLOW
  rules:
    - from: [{ source: { principals: [cluster.local/ns/default/sa/frontend] } }]
      when: [{ key: source.namespace, values: [default] }]
",
            ),
        ];
        assert!(set.iter().all(|p| !p.reads_request_headers()));
        let decided = |path| decide(&set, path, &no_headers);
        let allowed = decided("/reports");
        assert!(allowed.decision.allowed);
        assert_eq!(allowed.decision.policy.as_deref(), Some("default/frontend"));
        let denied = decided("/admin/keys");
        assert!(!denied.decision.allowed);
        assert_eq!(
            denied.decision.policy.as_deref(),
            Some("default/deny-admin")
        );
    }

    /// A policy sees the sidecar's XFCC, never a client's copy, and the normalized path.
    #[test]
    fn policies_see_the_admitted_headers_and_the_normalized_path() {
        let deny_admin = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  action: DENY
  rules:
    - to: [{ operation: { paths: [/admin*] } }]
",
        );
        let xfcc_only = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: xfcc, namespace: default }
spec:
  action: ALLOW
  rules:
    - when: [{ key: 'request.headers[x-forwarded-client-cert]', values: ['By=*'] }]
",
        );
        assert!(xfcc_only.reads_request_headers());
        let set = [deny_admin, xfcc_only];
        let spoofed = || {
            BTreeMap::from([(
                "x-forwarded-client-cert".to_string(),
                vec!["URI=spiffe://evil".to_string()],
            )])
        };
        let decided = |path| decide(&set, path, &spoofed);
        let ok = decided("/reports");
        assert!(ok.decision.allowed);
        assert_eq!(ok.decision.policy.as_deref(), Some("default/xfcc"));
        let denied = decided("/x/../admin/keys");
        assert!(!denied.decision.allowed);
        assert_eq!(
            denied.decision.policy.as_deref(),
            Some("default/deny-admin")
        );
        assert_eq!(denied.path, "/admin/keys");
    }
}
