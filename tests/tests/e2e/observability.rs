//! Issue 6 (part): `meshflow stat` on a running local mesh.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn stat_shows_the_rate_and_success_of_the_traffic_sent() {
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    let child = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["stat", "--window", "4s", "-o", "json", "--state-dir"])
        .arg(t.state_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let the first scrape happen, then send 30 good requests and 10 that get a 500.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let client = via(&frontend.outbound);
    for i in 0..40 {
        let (path, key) = if i % 4 == 3 {
            ("/flaky/1/500", format!("stat-{i}"))
        } else {
            ("/hello", String::new())
        };
        let r = client
            .get(format!("http://backend.default{path}"))
            .header("x-test-key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), if i % 4 == 3 { 500 } else { 200 });
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let backend = rows
        .iter()
        .find(|r| r["workload"] == "default/backend")
        .expect("backend row");
    assert_eq!(backend["requests"], 40.0, "{rows:?}");
    assert_eq!(backend["success"], 0.75, "30 of 40 were not 5xx: {rows:?}");
    assert!(backend["rps"].as_f64().unwrap() > 0.0);
    assert!(backend["p50Ms"].as_f64().unwrap() > 0.0);
    let frontend_row = rows
        .iter()
        .find(|r| r["workload"] == "default/frontend")
        .expect("frontend row");
    assert_eq!(
        frontend_row["requests"], 0.0,
        "the frontend served nothing inbound"
    );
}

/// Series on an admin endpoint (sample lines).
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn random_hosts_add_no_series() {
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let client = reqwest::Client::new();
    let send = |i: usize| {
        let client = client.clone();
        let outbound = frontend.outbound.clone();
        async move {
            // Unknown hosts, with quotes and escapes where a header allows them.
            let host = format!("svc-{i}-{}.ns{}\\\"x", rand::random::<u32>(), i % 7);
            let _ = client
                .get(format!("http://{outbound}/hello"))
                .header("host", host)
                .send()
                .await;
        }
    };
    for i in 0..10 {
        send(i).await;
    }
    let first = metrics(&frontend.admin).await;
    let before = (series(&first), series(&metrics(&backend.admin).await));
    let outbound = |text: &str| {
        metric(
            text,
            "meshflow_requests_total",
            &[("direction", "outbound")],
        )
    };
    let mut tasks = futures::stream::iter((10..5000).map(send)).buffer_unordered(32);
    use futures::StreamExt;
    while tasks.next().await.is_some() {}
    let text = metrics(&frontend.admin).await;
    let after = (series(&text), series(&metrics(&backend.admin).await));
    assert_eq!(
        outbound(&text) - outbound(&first),
        4990.0,
        "every request was counted"
    );
    assert_eq!(before, after, "5000 random hosts must not add series");
    assert!(!text.contains("svc-"), "no client-chosen host in a label");
}

/// Calls between two sidecars ride one pooled HTTP/2 connection over mTLS. Pingora checks each
/// pooled connection's peer address before reusing it (our patched pingora-core compares the
/// address the connection was dialed to instead of asking `getpeername` per reuse,
/// `third_party/README.md`); a check that refused would show here as a handshake per call.
/// The concurrent calls take the connection from the in-use pool: with the sidecar's one worker
/// thread (the default), no other request runs between taking it and putting it back.
#[tokio::test(flavor = "multi_thread")]
async fn calls_between_sidecars_reuse_one_mtls_connection() {
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let handshakes = |text: &str| {
        metric(
            text,
            "meshflow_tls_handshakes_total",
            &[("direction", "inbound")],
        )
    };
    let client = via(&frontend.outbound);
    let call = || async {
        let r = client
            .get("http://backend.default/hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    };
    // The first call opens the connection.
    call().await;
    let before = handshakes(&metrics(&backend.admin).await);
    for _ in 0..40 {
        call().await;
    }
    // Concurrent calls share the connection's HTTP/2 streams.
    futures::future::join_all((0..16).map(|_| call())).await;
    let after = handshakes(&metrics(&backend.admin).await);
    assert!(before >= 1.0, "the first call was an mTLS connection");
    assert_eq!(
        after, before,
        "56 calls after the first opened no connection"
    );
}

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: logs }
spec:
  policiesDir: policies
  workloads:
    - name: frontend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      labels: { app: backend }
      app: { protocol: http1, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
"#;

const DENY_ADMIN: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin"] } }]
"#;

fn access_entries(t: &TestMesh, sidecar: &str) -> Vec<Value> {
    let log = std::fs::read_to_string(t.state_dir().join(format!("logs/{sidecar}.log"))).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("direction").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_has_every_field_for_allowed_and_denied_requests() {
    let t = start_dir(MESH, DENY_ADMIN, |o| {
        o.env.insert("MESHFLOW_ACCESS_LOG".into(), "-".into());
    });
    let frontend = t.mesh.workload("frontend").clone();
    let client = via(&frontend.outbound);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
    let ok = client
        .get("http://backend.default/public/x")
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let denied = client
        .get("http://backend.default/admin")
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let inbound = loop {
        let entries = access_entries(&t, "proxy-default-backend");
        if entries.len() >= 2 || std::time::Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let allowed = inbound
        .iter()
        .find(|e| e["path"] == "/public/x")
        .unwrap_or_else(|| panic!("{inbound:?}"));
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["authz"], "allow");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["traceId"], trace);
    assert!(
        allowed["peer"].as_str().unwrap().ends_with("/sa/frontend"),
        "{allowed}"
    );
    assert!(
        allowed["authority"]
            .as_str()
            .unwrap()
            .starts_with("backend.default"),
        "{allowed}"
    );
    assert!(allowed["durationMs"].as_f64().unwrap() >= 0.0);
    let refused = inbound
        .iter()
        .find(|e| e["path"] == "/admin")
        .unwrap_or_else(|| panic!("{inbound:?}"));
    assert_eq!(
        (refused["status"].clone(), refused["authz"].clone()),
        (json!(403), json!("deny"))
    );
    assert_eq!(refused["policy"], "default/deny-admin");
    let outbound = access_entries(&t, "proxy-default-frontend");
    let out = outbound
        .iter()
        .find(|e| e["path"] == "/public/x")
        .unwrap_or_else(|| panic!("{outbound:?}"));
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["service"], "backend.default");
    assert_eq!(out["retries"], 0);
    assert!(
        out["endpoint"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{out}"
    );
    assert_eq!(out["traceId"], trace);
}
