//! Issue 4: RequestAuthentication (JWT) and PeerAuthentication (STRICT / PERMISSIVE) enforced
//! by live sidecars, and `meshflow policy check` (from the running control plane) predicting
//! every decision.

use std::time::Duration;

use serde_json::json;

use crate::common::*;
use crate::issuer::{none_token, now, TestIssuer};

const ISS: &str = "https://auth.example.com";

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: authn }
spec:
  policiesDir: policies
  workloads:
    - name: frontend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      labels: { app: backend }
      app: { protocol: http1, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
"#;

/// `/public/*` for anyone; `/admin` only for a token with `groups: admin`; `/mtls-only` only
/// for a peer with a principal (no plaintext).
const POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: RequestAuthentication
metadata: { name: jwt, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  jwtRules:
  - issuer: https://auth.example.com
    audiences: [orders]
    jwksUri: file://jwks.json
---
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: backend, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: ALLOW
  rules:
  - to: [{ operation: { paths: ["/public/*"] } }]
  - from: [{ source: { requestPrincipals: ["https://auth.example.com/*"] } }]
    to: [{ operation: { paths: ["/admin"] } }]
    when:
    - key: request.auth.claims[groups]
      values: [admin]
  - from: [{ source: { principals: ["*"] } }]
    to: [{ operation: { paths: ["/mtls-only"] } }]
"#;

fn start(issuer: &TestIssuer) -> TestMesh {
    start_with_files(
        MESH,
        &[("policies.yaml", POLICIES), ("jwks.json", &issuer.jwks())],
        |_| {},
    )
}

/// `meshflow policy check` against the running control plane: the predicted status.
fn predicted(t: &TestMesh, principal: Option<&str>, path: &str, token: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"));
    cmd.args(["policy", "check", "--control-plane"])
        .arg(format!("http://{}", t.mesh.control_plane_admin))
        .args([
            "--workload",
            "default/backend",
            "--host",
            "backend.default",
            "--path",
            path,
        ])
        // The app port is assigned at start (`{port}`), so the mesh file does not know it.
        .args([
            "--port",
            t.mesh.workload("backend").app.rsplit(':').next().unwrap(),
        ]);
    if let Some(p) = principal {
        cmd.args(["--principal", p]);
    }
    if let Some(token) = token {
        cmd.args(["--header", &format!("authorization=Bearer {token}")]);
    }
    let out = cmd.output().expect("run meshflow policy check");
    match out.status.code() {
        Some(0) => "200",
        Some(1) => "403",
        Some(2) => "400",
        Some(3) => "401",
        Some(4) => "closed",
        other => panic!(
            "policy check exit {other:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    .to_string()
}

fn status(outcome: &RawOutcome) -> String {
    match outcome {
        RawOutcome::Response(r) => r.split_whitespace().nth(1).unwrap_or_default().to_string(),
        _ => "closed".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_claims_decide_and_every_bad_token_gets_401() {
    let issuer = TestIssuer::new(ISS, "k1");
    let t = start(&issuer);
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let client = via(&frontend.outbound);
    let exp = now() + 600;
    let admin =
        issuer.token(json!({"sub": "alice", "aud": "orders", "exp": exp, "groups": ["admin"]}));
    let dev = issuer.token(json!({"sub": "bob", "aud": "orders", "exp": exp, "groups": ["dev"]}));
    let cases: Vec<(&str, &str, Option<String>, &str)> = vec![
        ("public, anonymous", "/public/x", None, "200"),
        ("admin, anonymous", "/admin", None, "403"),
        ("admin, admin token", "/admin", Some(admin.clone()), "200"),
        ("admin, dev token", "/admin", Some(dev), "403"),
        (
            "expired",
            "/public/x",
            Some(issuer.token(json!({"sub": "a", "aud": "orders", "exp": now() - 3600}))),
            "401",
        ),
        (
            "not yet valid",
            "/public/x",
            Some(issuer.token(json!({"sub": "a", "aud": "orders", "nbf": now() + 3600}))),
            "401",
        ),
        (
            "wrong issuer",
            "/public/x",
            Some(TestIssuer::new("https://evil.example.com", "k1").valid("a", "orders")),
            "401",
        ),
        (
            "wrong audience",
            "/public/x",
            Some(issuer.token(json!({"sub": "a", "aud": "billing", "exp": exp}))),
            "401",
        ),
        (
            "bad signature",
            "/public/x",
            Some(TestIssuer::new(ISS, "k1").valid("a", "orders")),
            "401",
        ),
        (
            "alg none",
            "/admin",
            Some(none_token(
                json!({"iss": ISS, "sub": "a", "aud": "orders", "groups": ["admin"]}),
            )),
            "401",
        ),
    ];
    let caller = "cluster.local/ns/default/sa/frontend";
    for (name, path, token, want) in &cases {
        let served = app_requests(&backend.app).await;
        let mut request = client.get(format!("http://backend.default{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let live = response.status().as_u16().to_string();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(live, *want, "{name}: {body}");
        assert_eq!(
            predicted(&t, Some(caller), path, token.as_deref()),
            live,
            "{name}: policy check vs live sidecar"
        );
        let reached = app_requests(&backend.app).await - served;
        assert_eq!(reached, u64::from(live == "200"), "{name}: app requests");
        if live == "401" {
            assert!(
                headers
                    .get("www-authenticate")
                    .is_some_and(|v| v.to_str().unwrap_or("").contains("invalid_token")),
                "{name}: WWW-Authenticate"
            );
        }
        if *name == "admin, admin token" {
            let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                seen["headers"].get("authorization").is_none(),
                "the token is not forwarded (forwardOriginalToken: false): {seen}"
            );
        }
    }
    let text = metrics(&backend.admin).await;
    assert_eq!(
        metric(
            &text,
            "meshflow_jwt_authentications_total",
            &[("result", "ok")]
        ),
        2.0
    );
    for reason in [
        "expired",
        "not_yet_valid",
        "unknown_issuer",
        "bad_audience",
        "bad_signature",
        "malformed",
    ] {
        assert_eq!(
            metric(
                &text,
                "meshflow_jwt_authentications_total",
                &[("result", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_refuses_plaintext_and_permissive_serves_it_without_a_principal() {
    let issuer = TestIssuer::new(ISS, "k1");
    let t = start(&issuer);
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let plain = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: backend.default\r\nConnection: close\r\n\r\n")
    };
    let caller = "cluster.local/ns/default/sa/frontend";

    // No PeerAuthentication: STRICT. Plaintext is closed before any request is read.
    let before = metrics(&backend.admin).await;
    assert_eq!(
        status(&raw_tcp(&backend.inbound, plain("/public/x").as_bytes()).await),
        "closed"
    );
    assert_eq!(predicted(&t, None, "/public/x", None), "closed");
    let after = metrics(&backend.admin).await;
    let refused = |text: &str| {
        metric(
            text,
            "meshflow_tls_handshake_errors_total",
            &[("reason", "plaintext")],
        )
    };
    assert_eq!(refused(&after) - refused(&before), 1.0);

    // PERMISSIVE for the backend: in force within 2 s, no restart.
    t.write_policy_file(
        "peer.yaml",
        "apiVersion: meshflow.io/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: backend, namespace: default }\nspec:\n  selector: { matchLabels: { app: backend } }\n  mtls: { mode: PERMISSIVE }\n",
    );
    let written = std::time::Instant::now();
    while status(&raw_tcp(&backend.inbound, plain("/public/x").as_bytes()).await) != "200" {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "PERMISSIVE not in force within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Plaintext has no principal: no XFCC reaches the app, and principal rules do not match.
    let RawOutcome::Response(text) = raw_tcp(&backend.inbound, plain("/public/x").as_bytes()).await
    else {
        panic!("no response");
    };
    let body: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body["xfcc"],
        json!([]),
        "plaintext peer has no identity: {body}"
    );
    assert_eq!(
        status(&raw_tcp(&backend.inbound, plain("/mtls-only").as_bytes()).await),
        "403"
    );
    // A TLS peer keeps its principal on the same port.
    let response = via(&frontend.outbound)
        .get("http://backend.default/mtls-only")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["xfcc"][0].as_str().unwrap().contains("sa/frontend"),
        "{body}"
    );
    // A short HTTP/1.0 request is answered (nothing waits for an HTTP/2 preface).
    let short = raw_tcp(&backend.inbound, b"GET /public/short HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&short), "200", "{short:?}");
    for (principal, path, want) in [
        (None, "/public/x", "200"),
        (None, "/mtls-only", "403"),
        (Some(caller), "/mtls-only", "200"),
    ] {
        assert_eq!(
            predicted(&t, principal, path, None),
            want,
            "{principal:?} {path}"
        );
    }

    // Port level: STRICT again for the app port only.
    let port = backend.app.rsplit(':').next().unwrap().to_string();
    t.write_policy_file(
        "peer.yaml",
        &format!("apiVersion: meshflow.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{ name: backend, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: backend }} }}\n  mtls: {{ mode: PERMISSIVE }}\n  portLevelMtls:\n    {port}: {{ mode: STRICT }}\n"),
    );
    let written = std::time::Instant::now();
    while status(&raw_tcp(&backend.inbound, plain("/public/x").as_bytes()).await) != "closed" {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "port-level STRICT not in force within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(predicted(&t, None, "/public/x", None), "closed");
    let response = via(&frontend.outbound)
        .get("http://backend.default/public/x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "mTLS still served");
}
