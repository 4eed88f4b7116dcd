//! Issue 6, acceptance 1 and 2: a real Prometheus (Debian package, started here on
//! 127.0.0.1) scrapes a live mesh whose traffic includes a 2xx, a 5xx, a retry, an authz
//! denial, a failed handshake, a gRPC call, and one completed and one compensated workflow
//! run; every panel query of every dashboard under `charts/meshflow/dashboards/` returns data
//! through Prometheus's HTTP API, the dashboards query every metric family the processes
//! export, and `promtool check metrics` is clean on every admin endpoint.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::workflow::{Api, PLACE_ORDER};

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: observed }
spec:
  policiesDir: policies
  workloads:
    - name: coordinator
      namespace: meshflow-system
      app: { builtin: coordinator }
    - name: inventory
      app: { command: ["meshflow-shop", "--role", "inventory", "--listen", "127.0.0.1:{port}"] }
    - name: payment
      labels: { app: payment }
      app: { command: ["meshflow-shop", "--role", "payment", "--listen", "127.0.0.1:{port}"] }
    - name: shipping
      app: { command: ["meshflow-shop", "--role", "shipping", "--listen", "127.0.0.1:{port}"] }
    - name: frontend
      app:
        protocol: http1
        command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"]
    - name: backend
      app:
        protocol: grpc
        command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"]
"#;

const POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: payment-from-coordinator, namespace: default }
spec:
  selector: { matchLabels: { app: payment } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/meshflow-system/sa/coordinator"] } }]
---
apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: backend }
spec:
  service: backend
  retries: { maxAttempts: 2, retryOn: [gateway-error, unavailable], backoff: { base: 10ms, max: 50ms } }
"#;

/// A Prometheus server on 127.0.0.1 with its own config and TSDB in a temp dir.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second; waits until it is ready.
    async fn start(targets: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: meshflow\n    static_configs:\n      - targets: {}\n",
                serde_json::to_string(targets).unwrap()
            ),
        )
        .unwrap();
        // Prometheus takes a listen address, not a socket: use a port the kernel just gave
        // us (and retry if another process took it meanwhile).
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let mut child = std::process::Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("prometheus is installed by scripts/install-deps");
            let url = format!("http://127.0.0.1:{port}");
            let http = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if http
                    .get(format!("{url}/-/ready"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    return Self {
                        child,
                        url,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "prometheus did not start: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    /// An instant query; returns the result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let r: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "success", "{expr}: {r}");
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/dashboards")
}

/// (dashboard file, panel title, expr) for every panel target.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dashboards_dir()).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for panel in d["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                out.push((
                    name.clone(),
                    panel["title"].as_str().unwrap().to_string(),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    assert!(out.len() >= 40, "dashboards hold {} queries", out.len());
    out
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_query_a_real_prometheus() {
    let t = start_dir(MESH, POLICIES, |_| {});
    let mut targets: Vec<String> = t.mesh.workloads.values().map(|w| w.admin.clone()).collect();
    targets.push(t.mesh.control_plane_admin.clone());
    let prometheus = Prometheus::start(&targets).await;
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let client = via(&frontend.outbound);

    // 2xx, 5xx, a retry (503 then 200), an unknown service, an authz denial.
    for _ in 0..3 {
        let r = client
            .get("http://backend.default/hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = client
        .get("http://backend.default/status/500")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let r = client
        .get("http://backend.default/flaky/1/503")
        .header("x-test-key", "dashboards-retry")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "retried after the 503");
    let r = client.get("http://nosuch.default/").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let r = client
        .post("http://payment.default/charges")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "only the coordinator may call payment"
    );
    // Traffic into frontend too (from backend's sidecar), so it has callers.
    let r = via(&backend.outbound)
        .get("http://frontend.default/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // gRPC through both sidecars.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", frontend.outbound))
        .unwrap()
        .origin("http://backend.default".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut echo = meshflow_example_echo::pb::echo_client::EchoClient::new(channel);
    echo.unary(meshflow_example_echo::pb::EchoRequest {
        message: "hi".into(),
    })
    .await
    .expect("gRPC unary");
    // A failed handshake: TLS without a client certificate.
    let pki = Pki::mesh(&t.state_dir());
    let outcome = raw_tls(
        &backend.inbound,
        client_config(pki.roots(), None, &[&rustls::version::TLS13]),
        &identity_dns("backend"),
        b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n",
    )
    .await;
    assert!(!matches!(outcome, RawOutcome::Response(_)), "{outcome:?}");
    // One completed and one compensated run.
    let api = Api::new(&t);
    api.register(PLACE_ORDER).await;
    for (id, address) in [("dash-ok", "home"), ("dash-undo", "nowhere")] {
        let (status, body) = api
            .post(
                "/v1/runs",
                json!({"workflow": "default/place-order", "runId": id,
                       "input": {"sku": "book", "qty": 1, "customer": "c", "amount": 5, "address": address}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(
        api.wait_terminal("dash-ok", Duration::from_secs(20)).await["status"],
        "Completed"
    );
    assert_eq!(
        api.wait_terminal("dash-undo", Duration::from_secs(20))
            .await["status"],
        "Compensated"
    );

    // Acceptance 1: promtool is clean on every admin endpoint under this traffic.
    let mut families = BTreeSet::new();
    for admin in &targets {
        let text = metrics(admin).await;
        promtool_check(admin, &text).await;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap().to_string());
            }
        }
    }

    // Every family is on some dashboard.
    let queries = panel_queries();
    let all_exprs: String = queries
        .iter()
        .map(|(_, _, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<&String> = families
        .iter()
        .filter(|f| f.starts_with("meshflow_"))
        .filter(|f| !all_exprs.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metric families on no dashboard: {missing:?}"
    );

    // Prometheus has scraped everything after the traffic (two samples for rate()).
    let up_count = targets.len();
    wait_for("every target up", Duration::from_secs(30), async || {
        prometheus.query("up == 1").await.len() == up_count
    })
    .await;
    wait_for("the runs' last counts scraped twice", Duration::from_secs(30), async || {
        !prometheus
            .query(r#"count_over_time(meshflow_workflow_runs_finished_total{status="Compensated"}[30s]) >= 2"#)
            .await
            .is_empty()
    })
    .await;

    // Acceptance 2: every panel query returns data.
    let substitute = |expr: &str| {
        expr.replace("$__rate_interval", "30s")
            .replace("$namespace", "default")
            .replace("$workload", "frontend")
            .replace("$workflow", "default/place-order")
    };
    // Series created late in the traffic need two scrapes before rate() has a value: poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut empty = Vec::new();
        for (file, title, expr) in &queries {
            let expr = substitute(expr);
            assert!(
                !expr.contains('$'),
                "unsubstituted variable in {file} {title}: {expr}"
            );
            if prometheus.query(&expr).await.is_empty() {
                empty.push(format!("{file} / {title}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "panel queries without data:\n{}",
            empty.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Template variable queries resolve to the values used above.
    let values = |result: Vec<Value>, label: &str| -> BTreeSet<String> {
        result
            .iter()
            .filter_map(|s| s["metric"][label].as_str().map(str::to_string))
            .collect()
    };
    assert!(values(prometheus.query("meshflow_info").await, "workload").contains("frontend"));
    assert!(values(prometheus.query("meshflow_info").await, "namespace").contains("default"));
    assert!(values(
        prometheus
            .query("meshflow_workflow_runs_started_total")
            .await,
        "workflow"
    )
    .contains("default/place-order"));

    // The numbers are the traffic's: a denial, a handshake failure, a retry, both runs.
    let sum = async |expr: &str| -> f64 {
        prometheus
            .query(expr)
            .await
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    };
    assert!(sum(r#"meshflow_authz_decisions_total{decision="deny"}"#).await >= 1.0);
    assert!(sum(r#"meshflow_tls_handshake_errors_total{direction="inbound"}"#).await >= 1.0);
    assert!(sum(r#"meshflow_retries_total{service="backend.default"}"#).await >= 1.0);
    assert!(sum(r#"meshflow_requests_total{direction="inbound",destination_workload="backend",status_code="500"}"#).await >= 1.0);
    assert!(sum(r#"meshflow_requests_total{direction="outbound",destination_workload="backend",grpc_status="0"}"#).await >= 1.0);
    assert_eq!(
        sum(r#"meshflow_workflow_runs_finished_total{status="Completed"}"#).await,
        1.0
    );
    assert_eq!(
        sum(r#"meshflow_workflow_runs_finished_total{status="Compensated"}"#).await,
        1.0
    );
}
