//! Issue 4 (part): AuthorizationPolicy enforced by the inbound sidecar on the normalized path;
//! bypass attempts through path encodings, host variants and forged identity headers.

use std::time::Duration;

use crate::common::*;

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: authz }
spec:
  policiesDir: policies
  workloads:
    - name: frontend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"] }
    - name: intruder
      app: { protocol: http1, command: ["meshflow-echo", "--name", "intruder", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      labels: { app: backend }
      app: { protocol: http1, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
"#;

const POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
  - to:
    - operation:
        hosts: ["backend.default"]
        paths: ["/hostcheck"]
---
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: frontend-only, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/frontend"]
"#;

fn start() -> TestMesh {
    start_dir(MESH, POLICIES, |_| {})
}

fn status(outcome: &RawOutcome) -> String {
    match outcome {
        RawOutcome::Response(r) => r.split_whitespace().nth(1).unwrap_or_default().to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_admin_holds_against_path_host_and_header_tricks() {
    let t = start();
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let served = app_requests(&backend.app).await;

    // Through the frontend's sidecar (raw HTTP/1.1 so the client library normalizes nothing).
    for target in [
        "/admin",
        "//admin",
        "/admin/",
        "/admin/x",
        "/%2Fadmin",
        "/public/%2e%2e/admin",
        "/public/..;/admin",
        "/admin?x=1",
        "/admin#x",
        "/admin#/x",
        "/admin#/../public",
        "/./admin",
        "/%61dmin",
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: backend.default\r\nConnection: close\r\n\r\n");
        let outcome = raw_tcp(&frontend.outbound, request.as_bytes()).await;
        let code = status(&outcome);
        assert!(
            code == "403" || code == "400",
            "{target} must be denied or rejected, got {outcome:?}"
        );
    }
    // Directly at the backend's inbound listener with a valid SVID (raw HTTP/1.1 over mTLS).
    let pki = Pki::mesh(&t.state_dir());
    for target in [
        "/admin#x",
        "/admin#/x",
        "/admin#/../public",
        "//admin",
        "/%2Fadmin",
        "/public/..;/admin",
        "/public/%2e%2e/admin",
    ] {
        let leaf = pki.issue(LeafSpec::spiffe(
            "spiffe://cluster.local/ns/default/sa/frontend",
        ));
        let config = client_config(pki.roots(), Some(leaf), &[&rustls::version::TLS13]);
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: backend.default\r\nConnection: close\r\n\r\n");
        let outcome = raw_tls(
            &backend.inbound,
            config,
            &identity_dns("backend"),
            request.as_bytes(),
        )
        .await;
        let code = status(&outcome);
        assert!(
            code == "403" || code == "400",
            "inbound {target}: {outcome:?}"
        );
    }
    // Host variants get the canonical host's decision.
    for host in [
        "backend.default",
        "BACKEND.Default",
        "backend.default:8080",
        "backend.default.",
    ] {
        let request =
            format!("GET /hostcheck HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let outcome = raw_tcp(&frontend.outbound, request.as_bytes()).await;
        assert_eq!(status(&outcome), "403", "host {host}: {outcome:?}");
    }
    assert_eq!(
        app_requests(&backend.app).await,
        served,
        "nothing denied reached the app"
    );

    // Allowed: /public/x from frontend, with the normalized path forwarded.
    let r = via(&frontend.outbound)
        .get("http://backend.default/public/./x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        json["path"], "/public/x",
        "the bytes authorized are the bytes forwarded"
    );

    // A forged XFCC claiming frontend's identity never changes the decision for intruder.
    let intruder = t.mesh.workload("intruder").clone();
    for xfcc in ["By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/frontend", "URI=spiffe://cluster.local/ns/default/sa/frontend"] {
        let r = via(&intruder.outbound)
            .get("http://backend.default/public/x")
            .header("X-Forwarded-Client-Cert", xfcc)
            .header("x-forwarded-client-cert", xfcc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "intruder with forged XFCC");
        assert_eq!(r.text().await.unwrap(), "RBAC: access denied\n", "generic body");
    }

    let text = metrics(&backend.admin).await;
    assert!(
        metric(
            &text,
            "meshflow_authz_decisions_total",
            &[("decision", "deny"), ("policy", "default/deny-admin")]
        ) >= 10.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "meshflow_authz_decisions_total",
            &[("decision", "deny"), ("policy", "none")]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "meshflow_authz_decisions_total",
            &[("decision", "allow"), ("policy", "default/frontend-only")]
        ) >= 1.0
    );
    let log =
        std::fs::read_to_string(t.state_dir().join("logs/proxy-default-backend.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("meshflow::access")
            && l.contains("default/deny-admin")
            && l.contains("path=/admin")),
        "access log line"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_change_reaches_sidecars_and_an_invalid_one_changes_nothing() {
    let t = start();
    let frontend = t.mesh.workload("frontend").clone();
    let client = via(&frontend.outbound);
    assert_eq!(
        client
            .get("http://backend.default/reports")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Add a DENY for /reports: in force within 2 s.
    let path = t.dir.path().join("policies/reports.yaml");
    std::fs::write(
        &path,
        "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no-reports, namespace: default }\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/reports\"]}}]\n",
    )
    .unwrap();
    let written = std::time::Instant::now();
    while client
        .get("http://backend.default/reports")
        .send()
        .await
        .unwrap()
        .status()
        != 403
    {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "policy change not in force within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // An invalid policy: nothing changes, the error is reported with file and line.
    std::fs::write(&path, "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no-reports, namespace: default }\nspec:\n  action: CUSTOM\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let dump: serde_json::Value =
            serde_json::from_str(&get_text(&t.mesh.control_plane_admin, "/config_dump").await)
                .unwrap();
        if let Some(e) = dump["lastError"].as_str() {
            assert!(
                e.contains("reports.yaml:5") && e.contains("CUSTOM is not supported"),
                "{e}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "invalid policy not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client
            .get("http://backend.default/reports")
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "previous policy stays in force"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_gives_the_live_sidecars_decision() {
    let t = start();
    let backend = t.mesh.workload("backend").clone();
    let pki = Pki::mesh(&t.state_dir());
    let meshflow = meshflow_cli::supervisor::find_program("meshflow");
    let dir = t.dir.path().join("policies");
    // (caller, target, Host, forged XFCC): cases of acceptance 2 (paths), 3 (host variants)
    // and 4 (client-sent identity headers).
    let forged = "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/frontend";
    for (caller, target, host, xfcc) in [
        ("frontend", "/admin", "backend.default", None),
        ("frontend", "//admin", "backend.default", None),
        ("frontend", "/admin#x", "backend.default", None),
        ("frontend", "/admin#/x", "backend.default", None),
        ("frontend", "/%2Fadmin", "backend.default", None),
        ("frontend", "/public/..;/admin", "backend.default", None),
        ("frontend", "/public/%2e%2e/admin", "backend.default", None),
        ("frontend", "/public/x", "backend.default", None),
        ("frontend", "/admin?x=1", "backend.default", None),
        ("intruder", "/public/x", "backend.default", None),
        ("frontend", "/hostcheck", "BACKEND.Default", None),
        ("frontend", "/hostcheck", "backend.default:8080", None),
        ("frontend", "/hostcheck", "backend.default.", None),
        ("frontend", "/hostcheck", "other.default", None),
        (
            "intruder",
            "/public/x",
            "backend.default",
            Some(("X-Forwarded-Client-Cert", forged)),
        ),
        (
            "intruder",
            "/public/x",
            "backend.default",
            Some(("X-FORWARDED-CLIENT-CERT", forged)),
        ),
    ] {
        let leaf = pki.issue(LeafSpec::spiffe(&format!(
            "spiffe://cluster.local/ns/default/sa/{caller}"
        )));
        let config = client_config(pki.roots(), Some(leaf), &[&rustls::version::TLS13]);
        let extra = xfcc
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
        let live = status(
            &raw_tls(
                &backend.inbound,
                config,
                &identity_dns("backend"),
                request.as_bytes(),
            )
            .await,
        );
        let out = std::process::Command::new(&meshflow)
            .args(["policy", "check", "-d"])
            .arg(&dir)
            .args([
                "--label",
                "app=backend",
                "--principal",
                &format!("cluster.local/ns/default/sa/{caller}"),
            ])
            .args(["--host", host, "--path", target])
            .args(
                xfcc.map(|(name, value)| ["--header".to_string(), format!("{name}={value}")])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .unwrap();
        let predicted = match out.status.code() {
            Some(0) => "200",
            Some(1) => "403",
            Some(2) => "400",
            other => panic!(
                "policy check exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        assert_eq!(
            live,
            predicted,
            "{caller} {target} {host} {xfcc:?}: live sidecar vs `meshflow policy check` ({})",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Issue 12, items 2 and 3: policies that look at identity headers and DENY paths a path
/// parameter could dress up.
const OWNED_POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-internal, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*", "/internal/*"]
  - to:
    - operation:
        paths: ["/xfcc-deny/*"]
    when:
    - key: request.headers[x-forwarded-client-cert]
      values: ["*URI=spiffe://cluster.local/ns/default/sa/frontend"]
---
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/frontend"]
  - to:
    - operation:
        paths: ["/xfcc/*"]
    when:
    - key: request.headers[x-forwarded-client-cert]
      values: ["*URI=spiffe://cluster.local/ns/default/sa/auditor"]
  - to:
    - operation:
        paths: ["/spiffe/*"]
    when:
    - key: request.headers[x-spiffe-id]
      values: ["spiffe://cluster.local/ns/default/sa/frontend"]
"#;

/// Sends `GET target` with `headers` straight to the backend's inbound listener as `caller`
/// (a certificate from the mesh CA), HTTP/1.1 over mTLS.
async fn direct(t: &TestMesh, caller: &str, target: &str, headers: &[(&str, &str)]) -> RawOutcome {
    let pki = Pki::mesh(&t.state_dir());
    let leaf = pki.issue(LeafSpec::spiffe(&format!(
        "spiffe://cluster.local/ns/default/sa/{caller}"
    )));
    let config = client_config(pki.roots(), Some(leaf), &[&rustls::version::TLS13]);
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: backend.default\r\n{extra}Connection: close\r\n\r\n"
    );
    raw_tls(
        &t.mesh.workload("backend").inbound,
        config,
        &identity_dns("backend"),
        request.as_bytes(),
    )
    .await
}

/// `meshflow policy check` for the backend as `caller`: the status it predicts.
fn predicted(t: &TestMesh, caller: &str, target: &str, headers: &[(&str, &str)]) -> String {
    let meshflow = meshflow_cli::supervisor::find_program("meshflow");
    let out = std::process::Command::new(&meshflow)
        .args(["policy", "check", "-d"])
        .arg(t.dir.path().join("policies"))
        .args([
            "--label",
            "app=backend",
            "--namespace",
            "default",
            "--workload",
            "default/backend",
            "--host",
            "backend.default",
            "--principal",
            &format!("cluster.local/ns/default/sa/{caller}"),
            "--path",
            target,
        ])
        .args(
            headers
                .iter()
                .flat_map(|(name, value)| ["--header".to_string(), format!("{name}={value}")]),
        )
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => "200",
        Some(1) => "403",
        Some(2) => "400",
        other => panic!(
            "policy check exit {other:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    .to_string()
}

fn body_json(outcome: &RawOutcome) -> serde_json::Value {
    let RawOutcome::Response(r) = outcome else {
        panic!("no response: {outcome:?}")
    };
    let body = &r[r.find("\r\n\r\n").expect("head") + 4..];
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {r}"))
}

/// (caller, target, client headers, expected status).
type IdentityCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

/// Item 2: authorization sees the sidecar's identity headers, never a client's; the live
/// sidecar and `meshflow policy check` agree.
#[tokio::test(flavor = "multi_thread")]
async fn authorization_sees_only_the_sidecars_identity_headers() {
    let t = start_dir(MESH, OWNED_POLICIES, |_| {});
    let auditor_xfcc = "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/auditor";
    let other_xfcc = "URI=spiffe://cluster.local/ns/default/sa/other";
    let frontend_id = "spiffe://cluster.local/ns/default/sa/frontend";
    // (caller, target, client headers, status)
    let cases: &[IdentityCase] = &[
        // The sidecar's XFCC (naming the verified peer) is what a rule matches ...
        ("frontend", "/xfcc-deny/x", &[], "403"),
        (
            "frontend",
            "/xfcc-deny/x",
            &[("x-forwarded-client-cert", other_xfcc)],
            "403",
        ),
        ("auditor", "/xfcc/x", &[], "200"),
        // ... and a client's never is.
        (
            "intruder",
            "/xfcc/x",
            &[("x-forwarded-client-cert", auditor_xfcc)],
            "403",
        ),
        (
            "intruder",
            "/xfcc/x",
            &[("X-Forwarded-Client-Cert", auditor_xfcc)],
            "403",
        ),
        (
            "intruder",
            "/spiffe/x",
            &[("x-spiffe-id", frontend_id)],
            "403",
        ),
        (
            "intruder",
            "/spiffe/x",
            &[("X-SPIFFE-ID", frontend_id)],
            "403",
        ),
        // x-spiffe-id is the mesh's and the sidecar never sets it: a rule on it never matches.
        (
            "auditor",
            "/spiffe/x",
            &[("x-spiffe-id", frontend_id)],
            "403",
        ),
        ("intruder", "/x", &[], "403"),
        ("frontend", "/x", &[], "200"),
    ];
    for (caller, target, headers, want) in cases {
        let live = status(&direct(&t, caller, target, headers).await);
        assert_eq!(&live, want, "live: {caller} {target} {headers:?}");
        assert_eq!(
            predicted(&t, caller, target, headers),
            live,
            "policy check vs live: {caller} {target} {headers:?}"
        );
    }
    // Through the intruder's own sidecar too.
    let r = via(&t.mesh.workload("intruder").outbound)
        .get("http://backend.default/spiffe/x")
        .header("x-spiffe-id", frontend_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "forged x-spiffe-id through the outbound sidecar"
    );
}

/// Item 2: mesh-owned headers from outside never reach the app, at the inbound listener (from
/// a peer) or through a local app's outbound sidecar; end-to-end headers do.
#[tokio::test(flavor = "multi_thread")]
async fn mesh_owned_headers_never_reach_the_app() {
    let t = start_dir(MESH, OWNED_POLICIES, |_| {});
    let owned: &[(&str, &str)] = &[
        (
            "X-Forwarded-Client-Cert",
            "By=evil;URI=spiffe://cluster.local/ns/default/sa/admin",
        ),
        ("x-spiffe-id", "spiffe://cluster.local/ns/default/sa/admin"),
        (
            "l5d-client-id",
            "admin.default.serviceaccount.identity.linkerd.cluster.local",
        ),
        ("L5D-Dst-Override", "admin.default.svc.cluster.local:80"),
        ("x-mesh-role", "admin"),
        ("X-Meshflow-Caller", "coordinator"),
        ("meshflow-timeout-ms", "1"),
        // The underscore spelling is the same header to CGI-style stacks.
        (
            "X_FORWARDED_CLIENT_CERT",
            "By=evil;URI=spiffe://cluster.local/ns/default/sa/admin",
        ),
        ("x_spiffe_id", "spiffe://cluster.local/ns/default/sa/admin"),
        ("X-Mesh_Role", "admin"),
    ];
    let kept: &[(&str, &str)] = &[
        ("x-tenant", "a"),
        ("meshflow-run-id", "r1"),
        ("meshflow-attempt", "2"),
        ("idempotency-key", "r1/s"),
    ];
    let all: Vec<(&str, &str)> = owned.iter().chain(kept).copied().collect();
    let check = |which: &str, json: &serde_json::Value| {
        let headers = json["headers"].as_object().expect("headers");
        for (name, _) in owned {
            let name = name.to_ascii_lowercase();
            if name == "x-forwarded-client-cert" {
                continue;
            }
            assert!(
                !headers.contains_key(&name),
                "{which}: {name} reached the app: {json}"
            );
        }
        for (name, value) in kept {
            assert_eq!(
                headers[*name],
                serde_json::json!([value]),
                "{which}: {name} kept"
            );
        }
        assert_eq!(
            json["xfcc"],
            serde_json::json!(["By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/frontend"]),
            "{which}: exactly the sidecar's XFCC"
        );
    };
    let outcome = direct(&t, "frontend", "/public/x", &all).await;
    assert_eq!(status(&outcome), "200", "{outcome:?}");
    check("inbound", &body_json(&outcome));

    let mut request =
        via(&t.mesh.workload("frontend").outbound).get("http://backend.default/public/x");
    for (name, value) in &all {
        // The outbound sidecar consumes its caller's deadline (a 1 ms one would time out).
        if *name != "meshflow-timeout-ms" {
            request = request.header(*name, *value);
        }
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 200);
    check("outbound", &r.json().await.unwrap());
}

/// Item 3: a path parameter (`;`, raw or `%3B`, in any segment) is refused with 400 before
/// any policy, by the live sidecar and by `meshflow policy check` alike; a `;` in the query is
/// not a path parameter.
#[tokio::test(flavor = "multi_thread")]
async fn path_parameters_never_bypass_deny() {
    let t = start_dir(MESH, OWNED_POLICIES, |_| {});
    let backend = t.mesh.workload("backend").clone();
    let frontend = t.mesh.workload("frontend").clone();
    let served = app_requests(&backend.app).await;
    for target in [
        "/admin;x=1",
        "/admin;",
        "/admin;/",
        "/admin/;x",
        "/admin/x;y=1",
        "/internal;x=1/keys",
        "/internal/keys;x=1",
        "/admin%3Bx=1",
        "/admin%3bx=1",
        "/internal%3B/keys",
        "/;x/admin",
        "/public;jsessionid=1",
    ] {
        let live = status(&direct(&t, "frontend", target, &[]).await);
        assert_eq!(live, "400", "inbound {target}");
        assert_eq!(
            predicted(&t, "frontend", target, &[]),
            "400",
            "policy check {target}"
        );
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: backend.default\r\nConnection: close\r\n\r\n");
        let outcome = raw_tcp(&frontend.outbound, request.as_bytes()).await;
        assert_eq!(
            status(&outcome),
            "400",
            "through the outbound sidecar {target}: {outcome:?}"
        );
    }
    assert_eq!(
        app_requests(&backend.app).await,
        served,
        "no parameterized path reached the app"
    );
    for (target, want) in [
        ("/admin", "403"),
        ("/internal/keys", "403"),
        ("/public/x", "200"),
        ("/public/x?a=1;b=2", "200"),
    ] {
        assert_eq!(
            status(&direct(&t, "frontend", target, &[]).await),
            want,
            "{target}"
        );
        assert_eq!(
            predicted(&t, "frontend", target, &[]),
            want,
            "policy check {target}"
        );
    }
}
