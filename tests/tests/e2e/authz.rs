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
