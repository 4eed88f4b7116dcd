//! The request headers the mesh owns: one list, used by the inbound sidecar (strip, then set
//! its own values, before authentication and authorization) and by `meshflow policy check` (so
//! it judges what the sidecar judges).
//!
//! A header the mesh owns is never taken from a client. Every inbound request loses every
//! field whose name is in [`MESH_OWNED_HEADERS`] or starts with one of
//! [`MESH_OWNED_PREFIXES`] (any case, any count; RFC 9110 §5.1: field names are
//! case-insensitive) *before* admission, so neither AuthorizationPolicy
//! (`request.headers[…]`), RequestAuthentication nor the app ever sees a client's value. The
//! sidecar then sets the ones it vouches for — today only [`XFCC`], from the peer certificate it
//! verified — and that value is the one authorization evaluates.
//!
//! The list:
//! - `x-forwarded-client-cert` — set by the inbound sidecar from the verified mTLS peer
//!   (Envoy's XFCC format, `By=<own SPIFFE ID>;URI=<peer SPIFFE ID>`); absent for plaintext.
//! - `x-spiffe-id` — a caller identity some apps and proxies trust; meshflow never sets it (the
//!   identity is in XFCC), so it never reaches an app.
//! - `meshflow-timeout-ms` — a deadline the *local* app gives its outbound sidecar; the outbound
//!   sidecar consumes it and never forwards it. Deadlines between sidecars travel as
//!   `grpc-timeout` (gRPC), which is not mesh-owned. One arriving at an inbound listener was
//!   not sent by a sidecar, so it is removed rather than passed to the app.
//! - `meshflow-retry-deadline-ms` — like `meshflow-timeout-ms`, from the local app to its outbound
//!   sidecar only (no retry starts after it); never forwarded.
//! - prefixes `l5d-` (Linkerd's identity and routing headers, e.g. `l5d-client-id`), `x-mesh-`
//!   and `x-meshflow-` — reserved for the mesh: apps may trust such names as proxy-set, so no
//!   client may supply them.
//!
//! Not mesh-owned (end to end, passed through): `meshflow-run-id`, `meshflow-step`,
//! `meshflow-attempt` and `idempotency-key` (the workflow coordinator's call metadata, set by
//! the calling app), `grpc-timeout`, and the trace headers (`traceparent`, `tracestate`, B3),
//! which the sidecar replaces with its own span rather than trusting.

use std::collections::BTreeMap;

/// The XFCC header the inbound sidecar sets from the verified peer only.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Exact header names (lower case) the mesh owns.
pub const MESH_OWNED_HEADERS: &[&str] = &[
    XFCC,
    "x-spiffe-id",
    "meshflow-timeout-ms",
    "meshflow-retry-deadline-ms",
];

/// Header name prefixes (lower case) the mesh owns.
pub const MESH_OWNED_PREFIXES: &[&str] = &["l5d-", "x-mesh-", "x-meshflow-"];

/// Whether `name` (any case, `_` read as `-`) is a header the mesh owns. CGI-style stacks (WSGI,
/// PHP, Rack) map both `X-Forwarded-Client-Cert` and `X_FORWARDED_CLIENT_CERT` to
/// `HTTP_X_FORWARDED_CLIENT_CERT`, so the underscore spelling is the same header to an app
/// (Envoy's `headers_with_underscores_action` exists for this).
pub fn is_mesh_owned(name: &str) -> bool {
    // Compared byte by byte (called for every header of every inbound request: no allocation).
    let starts_with = |pattern: &str| {
        name.len() >= pattern.len()
            && name.bytes().zip(pattern.bytes()).all(|(n, p)| {
                let n = n.to_ascii_lowercase();
                n == p || (n == b'_' && p == b'-')
            })
    };
    MESH_OWNED_HEADERS
        .iter()
        .any(|h| h.len() == name.len() && starts_with(h))
        || MESH_OWNED_PREFIXES.iter().any(|p| starts_with(p))
}

/// The XFCC value the inbound sidecar sets: `By=<own SPIFFE ID>;URI=<peer SPIFFE ID>` (both
/// `spiffe://` URIs).
pub fn xfcc_value(own: &str, peer: &str) -> String {
    format!("By={own};URI={peer}")
}

/// The headers authorization sees, from the headers a client sent (lower-case names): every
/// mesh-owned header removed, then `XFCC` set to `xfcc` (the sidecar's value) when there is a
/// verified peer.
pub fn admitted_headers(
    client: &BTreeMap<String, Vec<String>>,
    xfcc: Option<String>,
) -> BTreeMap<String, Vec<String>> {
    let mut headers: BTreeMap<String, Vec<String>> = client
        .iter()
        .filter(|(name, _)| !is_mesh_owned(name))
        .map(|(name, values)| (name.to_ascii_lowercase(), values.clone()))
        .collect();
    if let Some(xfcc) = xfcc {
        headers.insert(XFCC.to_string(), vec![xfcc]);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_in_any_case() {
        for name in [
            "x-forwarded-client-cert",
            "X-Forwarded-Client-Cert",
            "x-spiffe-id",
            "X-SPIFFE-ID",
            "meshflow-timeout-ms",
            "l5d-client-id",
            "L5D-Dst-Override",
            "x-mesh-identity",
            "X-Meshflow-Caller",
            "meshflow-retry-deadline-ms",
            // CGI-style stacks read `_` as `-`.
            "X_FORWARDED_CLIENT_CERT",
            "x_spiffe_id",
            "meshflow_timeout_ms",
            "X-Mesh_Foo",
            "l5d_client_id",
        ] {
            assert!(is_mesh_owned(name), "{name}");
        }
        for name in [
            "meshflow-run-id",
            "meshflow-step",
            "meshflow-attempt",
            "idempotency-key",
            "grpc-timeout",
            "traceparent",
            "authorization",
            "x-meshy",
            "l5d",
            "x-forwarded-for",
        ] {
            assert!(!is_mesh_owned(name), "{name}");
        }
    }

    #[test]
    fn authorization_sees_only_the_sidecars_values() {
        let mut client = BTreeMap::new();
        client.insert(XFCC.to_string(), vec!["URI=spiffe://evil".to_string()]);
        client.insert("x-spiffe-id".to_string(), vec!["spiffe://evil".to_string()]);
        client.insert("l5d-client-id".to_string(), vec!["admin".to_string()]);
        client.insert("x-tenant".to_string(), vec!["a".to_string()]);
        let seen = admitted_headers(&client, Some(xfcc_value("spiffe://b", "spiffe://a")));
        assert_eq!(
            seen.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![XFCC, "x-tenant"]
        );
        assert_eq!(seen[XFCC], vec!["By=spiffe://b;URI=spiffe://a".to_string()]);
        // Plaintext (no verified peer): no XFCC at all.
        let seen = admitted_headers(&client, None);
        assert_eq!(
            seen.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["x-tenant"]
        );
    }
}
