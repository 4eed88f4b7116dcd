//! RequestAuthentication: token location, every refusal reason, and claims in `when`.

#[path = "support/issuer.rs"]
mod issuer;

use std::collections::BTreeMap;
use std::path::Path;

use issuer::{hs256_token, none_token, now, TestIssuer};
use meshflow_policies::authn::{Authenticator, AuthnOutcome, JwtError, RequestAuthentication};
use meshflow_policies::authz::{authorize, AuthorizationPolicy, RequestAttributes};
use serde_json::json;

const ISS: &str = "https://auth.example.com";

fn authn(issuer: &TestIssuer, extra: &str) -> Authenticator {
    let yaml = format!(
        "apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{ name: jwt, namespace: shop }}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    audiences: [orders]\n    jwks: '{}'\n{extra}",
        issuer.jwks()
    );
    let policy = RequestAuthentication::parse(Path::new("jwt.yaml"), &yaml).expect("valid");
    Authenticator::new([&policy])
}

fn bearer(token: &str) -> BTreeMap<String, Vec<String>> {
    [("authorization".to_string(), vec![format!("Bearer {token}")])].into()
}

fn rejected(outcome: AuthnOutcome) -> JwtError {
    match outcome {
        AuthnOutcome::Rejected(e) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_valid_token_gives_principal_audiences_and_claims() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(&issuer, "");
    let token = issuer.token(json!({"sub": "alice", "aud": ["orders", "x"], "azp": "web",
        "exp": now() + 600, "groups": ["admin", "dev"], "org": {"tier": "gold"}}));
    let AuthnOutcome::Authenticated(id) = a.authenticate(&bearer(&token), "") else {
        panic!("not authenticated");
    };
    assert_eq!(id.principal, format!("{ISS}/alice"));
    assert_eq!(id.audiences, vec!["orders", "x"]);
    assert_eq!(id.presenter.as_deref(), Some("web"));
    assert_eq!(id.claims["groups"], vec!["admin", "dev"]);
    assert_eq!(id.claims["org.tier"], vec!["gold"]);
    assert_eq!(id.strip_headers, vec!["authorization"]);
    // The default locations include the access_token query parameter.
    assert!(matches!(
        a.authenticate(&BTreeMap::new(), &format!("x=1&access_token={token}")),
        AuthnOutcome::Authenticated(_)
    ));
}

#[test]
fn every_bad_token_is_refused_with_its_reason() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(&issuer, "");
    let t = now();
    let cases = [
        (
            "expired",
            issuer.token(json!({"sub": "a", "aud": "orders", "exp": t - 3600})),
            JwtError::Expired,
        ),
        (
            "not yet valid",
            issuer.token(json!({"sub": "a", "aud": "orders", "nbf": t + 3600})),
            JwtError::NotYetValid,
        ),
        (
            "wrong audience",
            issuer.token(json!({"sub": "a", "aud": "billing", "exp": t + 60})),
            JwtError::BadAudience,
        ),
        (
            "wrong issuer",
            TestIssuer::new("https://evil.example.com", "k1").valid("a", "orders"),
            JwtError::UnknownIssuer,
        ),
        (
            "other key, same kid",
            TestIssuer::new(ISS, "k1").valid("a", "orders"),
            JwtError::BadSignature,
        ),
        (
            "other key, other kid",
            TestIssuer::new(ISS, "k2").valid("a", "orders"),
            JwtError::BadSignature,
        ),
        (
            "alg none",
            none_token(json!({"iss": ISS, "sub": "a", "aud": "orders"})),
            JwtError::Malformed,
        ),
        (
            "HS256 keyed with the public JWKS",
            hs256_token(
                json!({"iss": ISS, "sub": "a", "aud": "orders"}),
                issuer.jwks().as_bytes(),
            ),
            JwtError::BadSignature,
        ),
        ("garbage", "not.a.token".to_string(), JwtError::Malformed),
    ];
    for (name, token, want) in cases {
        assert_eq!(
            rejected(a.authenticate(&bearer(&token), "")),
            want,
            "{name}"
        );
    }
    // A tampered payload with the original signature.
    let good = issuer.valid("alice", "orders");
    let parts: Vec<&str> = good.split('.').collect();
    let forged = issuer.valid("mallory", "orders");
    let forged_payload = forged.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(
        rejected(a.authenticate(&bearer(&tampered), "")),
        JwtError::BadSignature
    );
    // Within the 60 s clock skew an expired token still passes.
    let skewed = issuer.token(json!({"sub": "a", "aud": "orders", "exp": t - 20}));
    assert!(matches!(
        a.authenticate(&bearer(&skewed), ""),
        AuthnOutcome::Authenticated(_)
    ));
}

#[test]
fn no_token_is_anonymous_and_two_tokens_are_refused() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(&issuer, "");
    assert_eq!(
        a.authenticate(&BTreeMap::new(), ""),
        AuthnOutcome::Anonymous
    );
    let basic: BTreeMap<String, Vec<String>> =
        [("authorization".to_string(), vec!["Basic YTpi".to_string()])].into();
    assert_eq!(a.authenticate(&basic, ""), AuthnOutcome::Anonymous);
    let one = issuer.valid("alice", "orders");
    let two = issuer.valid("bob", "orders");
    assert_eq!(
        rejected(a.authenticate(&bearer(&one), &format!("access_token={two}"))),
        JwtError::MultipleTokens
    );
}

#[test]
fn custom_locations_and_forwarding() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(
        &issuer,
        "    fromHeaders: [{ name: X-Jwt-Assertion }]\n    forwardOriginalToken: true\n",
    );
    let token = issuer.valid("alice", "orders");
    // The default Authorization header is no longer a location.
    assert_eq!(a.authenticate(&bearer(&token), ""), AuthnOutcome::Anonymous);
    let headers: BTreeMap<String, Vec<String>> =
        [("x-jwt-assertion".to_string(), vec![token])].into();
    let AuthnOutcome::Authenticated(id) = a.authenticate(&headers, "") else {
        panic!("not authenticated");
    };
    assert!(
        id.strip_headers.is_empty(),
        "forwardOriginalToken keeps the header"
    );
}

#[test]
fn a_failed_jwks_fetch_fails_closed() {
    let yaml = format!("apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{ name: jwt }}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwksUri: https://127.0.0.1:1/jwks\n");
    let policy = RequestAuthentication::parse(Path::new("jwt.yaml"), &yaml).expect("valid");
    let a = Authenticator::new([&policy]);
    let token = TestIssuer::new(ISS, "k1").valid("alice", "orders");
    assert_eq!(
        rejected(a.authenticate(&bearer(&token), "")),
        JwtError::BadSignature
    );
}

#[test]
fn claims_and_request_principals_drive_authorization() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(&issuer, "");
    let policy = AuthorizationPolicy::parse(
        Path::new("authz.yaml"),
        &format!("apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: admins, namespace: shop }}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{ISS}/*\"]\n    when:\n    - key: request.auth.claims[groups]\n      values: [admin]\n    - key: request.auth.audiences\n      values: [orders]\n"),
    )
    .expect("valid");
    let decide = |token: Option<String>| {
        let mut attributes = RequestAttributes {
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        };
        if let Some(token) = token {
            match a.authenticate(&bearer(&token), "") {
                AuthnOutcome::Authenticated(id) => id.apply_to(&mut attributes),
                other => panic!("{other:?}"),
            }
        }
        authorize([&policy], &attributes).allowed
    };
    let exp = now() + 600;
    assert!(decide(Some(issuer.token(
        json!({"sub": "a", "aud": "orders", "exp": exp, "groups": ["dev", "admin"]})
    ))));
    assert!(!decide(Some(issuer.token(
        json!({"sub": "a", "aud": "orders", "exp": exp, "groups": ["dev"]})
    ))));
    assert!(
        !decide(None),
        "anonymous requests have no request principal"
    );
}

#[test]
fn review_findings_missing_aud_bad_exp_and_issuer_per_location() {
    let issuer = TestIssuer::new(ISS, "k1");
    let a = authn(&issuer, "");
    // A rule with audiences requires `aud`.
    let no_aud = issuer.token(json!({"sub": "a", "exp": now() + 60}));
    assert_eq!(
        rejected(a.authenticate(&bearer(&no_aud), "")),
        JwtError::BadAudience
    );
    // `exp`/`nbf` of the wrong type never mean "no expiry".
    for claims in [
        json!({"sub": "a", "aud": "orders", "exp": "1"}),
        json!({"sub": "a", "aud": "orders", "exp": -5}),
        json!({"sub": "a", "aud": "orders", "nbf": "soon"}),
    ] {
        assert_eq!(
            rejected(a.authenticate(&bearer(&issuer.token(claims.clone())), "")),
            JwtError::Malformed,
            "{claims}"
        );
    }
    // Two policies for one issuer: any rule that verifies suffices, whatever the order.
    let empty = RequestAuthentication::parse(
        Path::new("mesh.yaml"),
        &format!("apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{ name: mesh, namespace: meshflow-system }}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{{\"keys\": []}}'\n"),
    )
    .unwrap();
    let own = RequestAuthentication::parse(
        Path::new("own.yaml"),
        &format!("apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{ name: own, namespace: shop }}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{}'\n", issuer.jwks()),
    )
    .unwrap();
    let token = issuer.valid("alice", "orders");
    for order in [[&empty, &own], [&own, &empty]] {
        assert!(matches!(
            Authenticator::new(order).authenticate(&bearer(&token), ""),
            AuthnOutcome::Authenticated(_)
        ));
    }
    // A token for issuer A found only in issuer B's location is not A's token.
    let other = TestIssuer::new("https://other.example.com", "k9");
    let b = RequestAuthentication::parse(
        Path::new("b.yaml"),
        &format!("apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{ name: b }}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{}'\n    fromHeaders: [{{ name: x-a }}]\n  - issuer: https://other.example.com\n    jwks: '{}'\n    fromHeaders: [{{ name: x-b }}]\n", issuer.jwks(), other.jwks()),
    )
    .unwrap();
    let headers: BTreeMap<String, Vec<String>> =
        [("x-b".to_string(), vec![issuer.valid("a", "orders")])].into();
    assert_eq!(
        rejected(Authenticator::new([&b]).authenticate(&headers, "")),
        JwtError::UnknownIssuer
    );
}
