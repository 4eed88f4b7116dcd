//! Issue 5: durable workflow runs through the mesh — the order saga against three services
//! behind sidecars, crashes of the coordinator, signals and the API.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

pub const SHOP_MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: shop }
spec:
  policiesDir: policies
  workloads:
    - name: coordinator
      namespace: meshflow-system
      app: { builtin: coordinator }
    - name: inventory
      app: { command: ["meshflow-shop", "--role", "inventory", "--listen", "127.0.0.1:{port}"] }
    - name: payment
      app: { command: ["meshflow-shop", "--role", "payment", "--listen", "127.0.0.1:{port}"] }
    - name: shipping
      app: { command: ["meshflow-shop", "--role", "shipping", "--listen", "127.0.0.1:{port}"] }
"#;

/// Only the coordinator may call payment.
pub const SHOP_POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: payment-from-coordinator, namespace: default }
spec:
  selector: { matchLabels: {} }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/meshflow-system/sa/coordinator"] } }]
"#;

pub const PLACE_ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: place-order, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "${input.sku}", qty: "${input.qty}" } }
    retry: { maxAttempts: 3, initialInterval: 50ms }
    timeouts: { perAttempt: 2s }
    compensate: { service: inventory, path: /reservations/release }
  - name: charge
    dependsOn: [reserve]
    call: { service: payment, path: /charges, body: { customer: "${input.customer}", amount: "${input.amount}" } }
    retry: { maxAttempts: 3, initialInterval: 50ms }
    timeouts: { perAttempt: 2s }
    compensate: { service: payment, path: /refunds }
  - name: ship
    dependsOn: [charge]
    call: { service: shipping, path: /shipments, body: { order: "${run.id}", address: "${input.address}" } }
    retry: { maxAttempts: 3, initialInterval: 50ms, nonRetryableStatus: [422] }
    timeouts: { perAttempt: 2s }
    compensate: { service: shipping, path: /shipments/cancel }
  output:
    reservation: "${steps.reserve.output.id}"
    charge: "${steps.charge.output.id}"
    shipment: "${steps.ship.output.id}"
"#;

/// A client of the workflow API with the mesh's token.
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(t: &TestMesh) -> Self {
        Self {
            base: format!(
                "http://{}",
                t.mesh.workflow_api.clone().expect("workflow API")
            ),
            token: std::fs::read_to_string(t.mesh.workflow_token_path())
                .unwrap()
                .trim()
                .to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("POST");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn register(&self, yaml: &str) -> u32 {
        let r = self
            .http
            .post(format!("{}/v1/workflows", self.base))
            .bearer_auth(&self.token)
            .body(yaml.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body["version"].as_u64().unwrap() as u32
    }

    /// Waits until run `id` is terminal; returns the run view.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/runs/{id}", self.base))
                .bearer_auth(&self.token)
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    let status = v["status"].as_str().unwrap_or("");
                    if !status.is_empty() && !matches!(status, "Running" | "Compensating") {
                        return v;
                    }
                    assert!(Instant::now() < deadline, "run {id} not finished: {v}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "run {id} not finished in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn records(app: &str) -> Value {
    serde_json::from_str(&get_text(app, "/__records").await).unwrap()
}

pub fn start_shop() -> TestMesh {
    start_dir(SHOP_MESH, SHOP_POLICIES, |_| {})
}

#[tokio::test(flavor = "multi_thread")]
async fn the_order_saga_completes_and_compensates_in_reverse_order() {
    let t = start_shop();
    let api = Api::new(&t);
    assert_eq!(api.register(PLACE_ORDER).await, 1);
    assert_eq!(
        api.register(PLACE_ORDER).await,
        1,
        "an unchanged definition keeps its version"
    );
    // Without the token, nothing.
    let anonymous = reqwest::get(format!("{}/v1/runs", api.base)).await.unwrap();
    assert_eq!(anonymous.status(), 401);

    let input =
        json!({"sku": "A-1", "qty": 2, "customer": "c1", "amount": 40, "address": "1 Main St"});
    let (status, started) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/place-order", "runId": "order-ok", "input": input}),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    // Idempotent on the run id.
    let (status, again) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/place-order", "runId": "order-ok", "input": input}),
        )
        .await;
    assert_eq!((status, again["created"].clone()), (200, json!(false)));
    let done = api.wait_terminal("order-ok", Duration::from_secs(20)).await;
    assert_eq!(done["status"], "Completed", "{done}");
    assert_eq!(done["state"]["output"]["charge"], "order-ok/charge");

    let mut bad = input.clone();
    bad["address"] = json!("nowhere");
    let (status, _) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/place-order", "runId": "order-bad", "input": bad}),
        )
        .await;
    assert_eq!(status, 201);
    let failed = api
        .wait_terminal("order-bad", Duration::from_secs(20))
        .await;
    assert_eq!(failed["status"], "Compensated", "{failed}");
    assert!(
        failed["state"]["error"].as_str().unwrap().contains("ship"),
        "{failed}"
    );

    let inventory = records(&t.mesh.workload("inventory").app).await;
    let payment = records(&t.mesh.workload("payment").app).await;
    let shipping = records(&t.mesh.workload("shipping").app).await;
    // Every effect exactly once per key; the compensations undid exactly the failed order.
    for books in [&inventory, &payment, &shipping] {
        for (key, n) in books["applied"].as_object().unwrap() {
            assert_eq!(n, &json!(1), "{key} applied {n} times");
        }
    }
    assert_eq!(payment["undone"], json!({"order-bad/charge": 1}));
    assert_eq!(inventory["undone"], json!({"order-bad/reserve": 1}));
    assert_eq!(
        shipping["undone"],
        json!({}),
        "the shipment never happened: nothing to undo"
    );
    assert_eq!(
        inventory["stock"],
        json!(1_000_000 - 2),
        "order-ok's reservation stays, order-bad's is released"
    );
    // Reverse completion order: the refund ended before the release started.
    let at = |books: &Value, key: &str, field: &str| -> u64 {
        books["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .unwrap()[field]
            .as_u64()
            .unwrap()
    };
    assert!(
        at(&payment, "order-bad/charge/compensate", "endMs")
            <= at(&inventory, "order-bad/reserve/compensate", "startMs")
    );
    // Every charge came from the coordinator's identity, through the mesh.
    for record in payment["records"].as_object().unwrap().values() {
        assert!(
            record["xfcc"]
                .as_str()
                .unwrap()
                .contains("URI=spiffe://cluster.local/ns/meshflow-system/sa/coordinator"),
            "{record}"
        );
    }
    // History and the CLI.
    let (_, history) = api.get("/v1/runs/order-bad/history").await;
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"RunStarted"));
    assert_eq!(kinds.last(), Some(&"RunFinished"));
    let out = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args([
            "workflow",
            "get",
            "order-bad",
            "--api",
            &api.base,
            "--token-file",
        ])
        .arg(t.mesh.workflow_token_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Compensated") && text.contains("ship"),
        "{text}"
    );
    let metrics = get_text(&t.mesh.control_plane_admin, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "meshflow_workflow_runs_finished_total",
            &[
                ("workflow", "default/place-order"),
                ("status", "Compensated")
            ]
        ),
        1.0
    );
}
