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
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
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

    /// POST that tolerates a coordinator dying under it.
    pub async fn try_post(&self, path: &str, body: Value) -> Option<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
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

/// `StepCompleted` events per step in a run's history, asserting none appears twice.
pub fn completions_once(id: &str, history: &Value) -> std::collections::BTreeMap<String, u32> {
    let mut completed = std::collections::BTreeMap::new();
    for e in history.as_array().unwrap() {
        if e["type"] == "StepCompleted" {
            *completed
                .entry(e["step"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    assert!(
        completed.values().all(|n| *n == 1),
        "{id}: a step completed twice: {completed:?}"
    );
    completed
}

/// Every shop service applied and undid each idempotency key at most once.
pub async fn effects_applied_once(t: &TestMesh) {
    for service in ["inventory", "payment", "shipping"] {
        let books = records(&t.mesh.workload(service).app).await;
        for (key, n) in books["applied"].as_object().unwrap() {
            assert_eq!(n, &json!(1), "{service}: {key} applied {n} times");
        }
        for (key, n) in books["undone"].as_object().unwrap() {
            assert_eq!(n, &json!(1), "{service}: {key} undone {n} times");
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
    // The same id with another input is not the same start.
    let mut other = input.clone();
    other["qty"] = json!(3);
    let (status, _) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/place-order", "runId": "order-ok", "input": other}),
        )
        .await;
    assert_eq!(status, 409);
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

/// A workflow with a durable timer and a signal wait between the calls.
pub const DURABLE_ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: durable-order, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "${input.sku}", qty: 1 } }
    retry: { maxAttempts: 20, initialInterval: 100ms, maxInterval: 1s }
    timeouts: { perAttempt: 3s }
    compensate: { service: inventory, path: /reservations/release }
    # compensation retries come from the same policy
  - name: nap
    dependsOn: [reserve]
    sleep: { duration: 300ms }
  - name: approve
    dependsOn: [nap]
    waitForSignal: { name: approval, timeout: 5m }
  - name: charge
    dependsOn: [approve]
    call: { service: payment, path: /charges, body: { customer: "${input.customer}", amount: "${input.amount}" } }
    retry: { maxAttempts: 20, initialInterval: 100ms, maxInterval: 1s }
    timeouts: { perAttempt: 3s }
    compensate: { service: payment, path: /refunds }
  - name: ship
    dependsOn: [charge]
    call: { service: shipping, path: /shipments, body: { order: "${run.id}", address: "${input.address}" } }
    retry: { maxAttempts: 20, initialInterval: 100ms, maxInterval: 1s, nonRetryableStatus: [422] }
    timeouts: { perAttempt: 3s }
    compensate: { service: shipping, path: /shipments/cancel }
"#;

/// The shop mesh with its coordinator (node `node`, 2 s leases) on the PostgreSQL at `url`.
pub fn start_shop_on_postgres(url: &str, node: &str) -> TestMesh {
    let args = [
        "--workflow-store",
        url,
        "--workflow-lease",
        "2s",
        "--workflow-node",
        node,
    ]
    .map(String::from)
    .to_vec();
    start_dir(SHOP_MESH, SHOP_POLICIES, move |o| {
        o.control_plane_args = args
    })
}

/// A second coordinator (`coordinator-<node>`: another control-plane process, 2 s leases) on
/// the same PostgreSQL store, sending through the mesh's coordinator sidecar, with `env` added
/// to its environment; returns a client of its workflow API.
pub fn spawn_coordinator(t: &mut TestMesh, url: &str, node: &str, env: &[(&str, &str)]) -> Api {
    let name = format!("coordinator-{}", node.to_ascii_lowercase());
    let state = t.dir.path().join(&name);
    std::fs::create_dir_all(&state).unwrap();
    let ready = state.join("ready.json");
    let outbound = t
        .mesh
        .workload("meshflow-system/coordinator")
        .outbound
        .clone();
    let mut spec = meshflow_cli::supervisor::ChildSpec::new(
        &name,
        meshflow_cli::supervisor::find_program("meshflow-control-plane"),
    )
    .args([
        "--mesh".to_string(),
        t.mesh_path().display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--ready-file".into(),
        ready.display().to_string(),
        "--workflow-api".into(),
        "127.0.0.1:0".into(),
        "--workflow-outbound".into(),
        outbound,
        "--workflow-store".into(),
        url.to_string(),
        "--workflow-lease".into(),
        "2s".into(),
        "--workflow-node".into(),
        node.to_string(),
    ]);
    for (k, v) in env {
        spec = spec.env(*k, *v);
    }
    t.mesh.supervisor.spawn(spec).unwrap();
    let ready = t
        .mesh
        .supervisor
        .wait_ready(&name, &ready, Duration::from_secs(30))
        .unwrap();
    Api {
        base: format!("http://{}", ready.address("workflow-api").unwrap()),
        token: std::fs::read_to_string(state.join("workflow-api-token"))
            .unwrap()
            .trim()
            .to_string(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    }
}

/// Kills the control plane (SIGKILL: no cleanup) and starts it again, optionally with a
/// failpoint armed; waits until its API answers.
pub fn restart_control_plane(t: &mut TestMesh, failpoint: Option<&str>) {
    try_restart_control_plane(t, failpoint).expect("control plane restarts");
}

/// Like [`restart_control_plane`]; an armed failpoint may fire while the control plane
/// recovers (recovery commits too: it moves the deadlines of calls in flight), before it is
/// ready — then this returns the error.
pub fn try_restart_control_plane(
    t: &mut TestMesh,
    failpoint: Option<&str>,
) -> Result<(), meshflow_cli::up::UpError> {
    t.mesh
        .supervisor
        .signal("control-plane", nix::sys::signal::Signal::SIGKILL);
    t.mesh.supervisor.stop("control-plane");
    match failpoint {
        Some(f) => t
            .mesh
            .options
            .env
            .insert("MESHFLOW_FAILPOINT".into(), f.into()),
        None => t.mesh.options.env.remove("MESHFLOW_FAILPOINT"),
    };
    t.mesh.start_control_plane().map(|_| ())
}

/// Whether the control plane process has exited (a failpoint fired).
fn control_plane_exited(t: &mut TestMesh) -> bool {
    t.mesh
        .supervisor
        .get_mut("control-plane")
        .is_none_or(|c| c.exited())
}

/// Acceptance 2 (SQLite): runs in flight survive `kill -9` at random moments and at the three
/// named failpoints; every run ends, every effect is applied once per key, histories replay to
/// the stored state, and each durable timer fired once.
pub async fn crash_suite(mut t: TestMesh, runs: usize) {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("MESHFLOW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed {seed} (MESHFLOW_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let api = Api::new(&t);
    api.register(DURABLE_ORDER).await;
    let ids: Vec<String> = (0..runs).map(|i| format!("crash-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let address = if i % 10 == 9 { "nowhere" } else { "2 Side St" };
        let body = json!({"workflow": "default/durable-order", "runId": id,
            "input": {"sku": "B-2", "customer": format!("c{i}"), "amount": 10 + i, "address": address}});
        let (status, v) = api.post("/v1/runs", body).await;
        assert_eq!(status, 201, "{v}");
        // A third get their approval before they reach the wait.
        if i % 3 == 0 {
            api.post(
                &format!("/v1/runs/{id}/signals/approval"),
                json!({"by": "early"}),
            )
            .await;
        }
    }
    // Three kills at random moments.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..800))).await;
        restart_control_plane(&mut t, None);
    }
    // Approvals for everyone (duplicates are harmless: a wait takes one signal). A run that
    // has finished or is being undone already (early approval, refused shipment) answers 409:
    // signals reach running runs only.
    for id in ids.iter() {
        let (status, v) = api
            .post(
                &format!("/v1/runs/{id}/signals/approval"),
                json!({"by": "late"}),
            )
            .await;
        assert!(matches!(status, 202 | 409), "{id}: {status} {v}");
    }
    // The three named failpoints: the coordinator aborts itself there, then comes back.
    for failpoint in [
        "after-commit-before-dispatch:5",
        "after-dispatch-before-result:5",
        "during-compensation:2",
    ] {
        if let Err(e) = try_restart_control_plane(&mut t, Some(failpoint)) {
            assert!(control_plane_exited(&mut t), "{failpoint}: {e}");
            println!("failpoint {failpoint} reached during recovery");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !control_plane_exited(&mut t) {
            // Keep work flowing so the failpoint is reached: new runs, some failing.
            let n: u32 = rng.gen();
            let body = json!({"workflow": "default/durable-order", "runId": format!("extra-{n}"),
                "input": {"sku": "B-2", "customer": "x", "amount": 1, "address": "nowhere"}, "signal": {"name": "approval", "payload": {}}});
            let _ =
                tokio::time::timeout(Duration::from_secs(2), api.try_post("/v1/runs", body)).await;
            assert!(
                Instant::now() < deadline,
                "failpoint {failpoint} never reached"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        restart_control_plane(&mut t, None);
    }
    // Every run ends.
    let (_, all) = api.get("/v1/runs?limit=10000").await;
    let all_ids: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap().to_string())
        .collect();
    assert!(all_ids.len() >= runs);
    let definition: meshflow_policies::workflow::Workflow = {
        let (_, d) = api.get("/v1/workflows/default/durable-order").await;
        serde_json::from_value(d["definition"].clone()).unwrap()
    };
    for id in &all_ids {
        let run = api.wait_terminal(id, Duration::from_secs(60)).await;
        let status = run["status"].as_str().unwrap();
        assert!(matches!(status, "Completed" | "Compensated"), "{id}: {run}");
        // Replaying the history gives the stored state.
        let (_, history) = api.get(&format!("/v1/runs/{id}/history")).await;
        let events: Vec<meshflow_control_plane::workflow::engine::Event> =
            serde_json::from_value(history.clone()).unwrap();
        let replayed =
            meshflow_control_plane::workflow::engine::RunState::replay(&definition, &events)
                .unwrap();
        // Compared as stored: the store keeps the state as JSON.
        assert_eq!(
            serde_json::to_value(&replayed).unwrap(),
            run["state"],
            "{id}: replay differs from the stored state"
        );
        // Each durable timer fired once: the sleep completed once, every step at most once.
        let completed = completions_once(id, &history);
        assert_eq!(completed.get("nap"), Some(&1), "{id}: the sleep fired once");
    }
    // Exactly once per (run, step) at each service.
    effects_applied_once(&t).await;
    // Completed runs were charged once; compensated runs were refunded (if charged).
    let payment = records(&t.mesh.workload("payment").app).await;
    for id in &ids {
        let run = api.get(&format!("/v1/runs/{id}")).await.1;
        let key = format!("{id}/charge");
        let charged = payment["applied"].get(&key).is_some();
        let refunded = payment["undone"].get(&key).is_some();
        match run["status"].as_str().unwrap() {
            "Completed" => assert!(charged && !refunded, "{id}"),
            _ => assert!(!charged || refunded, "{id}: charged and not refunded"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_crash_kill_9_and_failpoints_lose_no_step_sqlite() {
    crash_suite(start_shop(), 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_crash_kill_9_and_failpoints_lose_no_step_postgres() {
    let pg = Postgres::start();
    let url = pg.url.clone();
    let t = start_dir(SHOP_MESH, SHOP_POLICIES, move |o| {
        o.control_plane_args = vec!["--workflow-store".into(), url];
    });
    crash_suite(t, 200).await;
    drop(pg);
}

const DIAMOND: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: diamond, namespace: default }
spec:
  steps:
  - name: a
    call: { service: inventory, path: /reservations, body: { sku: "D", qty: 1 } }
  - name: b
    dependsOn: [a]
    call: { service: payment, path: /charges, body: { customer: "d", amount: 1, delayMs: 400 } }
  - name: c
    dependsOn: [a]
    call: { service: shipping, path: /shipments, body: { order: "d", address: "x", delayMs: 400 } }
  - name: d
    dependsOn: [b, c]
    waitForSignal: { name: go, timeout: 200ms, onTimeout: continue }
  - name: slow
    dependsOn: [d]
    call: { service: inventory, path: /reservations, body: { sku: "S", qty: 1, delayMs: 1500 } }
    retry: { maxAttempts: 2, initialInterval: 10ms }
    timeouts: { perAttempt: 500ms }
"#;

fn meshflow_workflow(t: &TestMesh, api: &Api, args: &[&str]) -> (bool, String) {
    let (code, text) = meshflow_workflow_code(t, api, args);
    (code == Some(0), text)
}

/// `meshflow workflow <args>` against `api` with the mesh's token: (exit code, stdout+stderr).
pub fn meshflow_workflow_code(t: &TestMesh, api: &Api, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .arg("workflow")
        .args(args)
        .args(["--api", &api.base, "--token-file"])
        .arg(t.mesh.workflow_token_path())
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn validation_diamonds_signals_timeouts_and_operator_commands() {
    let t = start_shop();
    let api = Api::new(&t);
    // Registration refuses a cycle, naming it, with the field.
    let cyclic = PLACE_ORDER.replace(
        "  - name: reserve\n",
        "  - name: reserve\n    dependsOn: [ship]\n",
    );
    let r = api
        .http
        .post(format!("{}/v1/workflows", api.base))
        .bearer_auth(&api.token)
        .body(cyclic)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("dependsOn cycle: reserve → ship → charge → reserve"),
        "{body}"
    );
    // An input schema refuses a bad start (400) naming the field.
    let typed = "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: typed, namespace: default }\nspec:\n  inputSchema: { type: object, required: [sku] }\n  steps:\n  - { name: a, sleep: { duration: 10ms } }\n";
    api.register(typed).await;
    let (status, body) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/typed", "input": {"qty": 1}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("sku"), "{body}");
    api.register(DIAMOND).await;
    api.register(DURABLE_ORDER).await;
    // The CLI names the file and the line (second document of the file).
    let file = t.dir.path().join("orders.yaml");
    std::fs::write(
        &file,
        format!(
            "{DIAMOND}---\n{}",
            PLACE_ORDER.replace("dependsOn: [charge]", "dependsOn: [nope]")
        ),
    )
    .unwrap();
    let (ok, text) = meshflow_workflow(&t, &api, &["apply", "-f", file.to_str().unwrap()]);
    let bad_line = DIAMOND.lines().count()
        + 1
        + PLACE_ORDER
            .lines()
            .position(|l| l.contains("- name: ship"))
            .unwrap()
        + 1;
    assert!(
        !ok && text.contains(&format!("orders.yaml:{bad_line}: spec.steps[2].dependsOn"))
            && text.contains("\"nope\""),
        "{text}"
    );

    // A diamond: b and c run at the same time; the wait times out and continues; the slow
    // step's attempts are cut at 500 ms and the step fails for good after two.
    api.post(
        "/v1/runs",
        json!({"workflow": "default/diamond", "runId": "dia"}),
    )
    .await;
    let run = api.wait_terminal("dia", Duration::from_secs(30)).await;
    assert_eq!(run["status"], "Failed", "nothing to compensate: {run}");
    let steps = &run["state"]["steps"];
    let span = |step: &str| -> (u64, u64) {
        let a = &steps[step]["attempts"][0];
        (
            a["startedMs"].as_u64().unwrap(),
            a["endedMs"].as_u64().unwrap(),
        )
    };
    let (b, c) = (span("b"), span("c"));
    assert!(b.0 < c.1 && c.0 < b.1, "b {b:?} and c {c:?} overlap");
    assert_eq!(steps["d"]["status"], "Completed", "onTimeout: continue");
    let slow = steps["slow"]["attempts"].as_array().unwrap();
    assert_eq!(slow.len(), 2, "{slow:?}");
    for a in slow {
        let took = a["endedMs"].as_u64().unwrap() - a["startedMs"].as_u64().unwrap();
        assert!(
            took < 1500,
            "the attempt was cut before the service answered: {a}"
        );
        assert_ne!(a["result"], "ok");
    }

    // Signals: unknown run → 404; two concurrent signal-with-start → one run, both signals.
    let (status, _) = api.post("/v1/runs/nope/signals/approval", json!({})).await;
    assert_eq!(status, 404);
    let start = json!({"workflow": "default/durable-order", "runId": "sws",
        "input": {"sku": "S", "customer": "c", "amount": 5, "address": "somewhere"},
        "signal": {"name": "approval", "payload": {"by": "x"}}});
    let (one, two) = tokio::join!(
        api.post("/v1/runs", start.clone()),
        api.post("/v1/runs", start.clone())
    );
    let created: Vec<bool> = [one, two]
        .iter()
        .map(|(_, v)| v["created"].as_bool().unwrap())
        .collect();
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    let (_, history) = api.get("/v1/runs/sws/history").await;
    let signals = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "SignalReceived")
        .count();
    assert_eq!(signals, 2);
    assert_eq!(
        api.wait_terminal("sws", Duration::from_secs(20)).await["status"],
        "Completed"
    );

    // A waiting run says what it waits on; cancel compensates, terminate does not.
    for id in ["to-cancel", "to-terminate"] {
        api.post(
            "/v1/runs",
            json!({"workflow": "default/durable-order", "runId": id,
            "input": {"sku": "S", "customer": "c", "amount": 5, "address": "somewhere"}}),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, text) = meshflow_workflow(&t, &api, &["get", "to-cancel"]);
        assert!(ok, "{text}");
        if text.contains("waiting on signal \"approval\" (step approve)") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, text) = meshflow_workflow(&t, &api, &["cancel", "to-cancel"]);
    assert!(ok, "{text}");
    let (ok, text) = meshflow_workflow(&t, &api, &["terminate", "to-terminate"]);
    assert!(ok, "{text}");
    assert_eq!(
        api.wait_terminal("to-cancel", Duration::from_secs(20))
            .await["status"],
        "Cancelled"
    );
    assert_eq!(
        api.wait_terminal("to-terminate", Duration::from_secs(20))
            .await["status"],
        "Terminated"
    );
    let inventory = records(&t.mesh.workload("inventory").app).await;
    assert_eq!(inventory["undone"]["to-cancel/reserve"], json!(1));
    assert!(inventory["undone"].get("to-terminate/reserve").is_none());
    let (ok, text) = meshflow_workflow(&t, &api, &["list", "--status", "Cancelled"]);
    assert!(
        ok && text.contains("to-cancel") && !text.contains("to-terminate"),
        "{text}"
    );
    let (ok, text) = meshflow_workflow(&t, &api, &["get", "nope"]);
    assert!(!ok && text.contains("404"), "{text}");
}

/// Acceptance 3: two coordinators share 200 runs on one PostgreSQL; A is stopped (SIGSTOP)
/// longer than its lease, B takes its runs over, A resumes: A's writes are rejected and
/// counted, no step completion is recorded twice, and no step had attempts from both
/// coordinators in flight at once.
#[tokio::test(flavor = "multi_thread")]
async fn timing_fencing_two_coordinators_share_runs_on_postgres() {
    use nix::sys::signal::Signal;
    let pg = Postgres::start();
    let mut t = start_shop_on_postgres(&pg.url, "A");
    let api_a = Api::new(&t);
    let api_b = spawn_coordinator(&mut t, &pg.url, "B", &[]);
    // The charge takes 300 ms, so A has calls in flight when it stops.
    let slow = DURABLE_ORDER
        .replace("name: durable-order", "name: fenced-order")
        .replace(
            "amount: \"${input.amount}\" }",
            "amount: \"${input.amount}\", delayMs: 300 }",
        );
    api_a.register(&slow).await;
    let ids: Vec<String> = (0..200).map(|i| format!("fence-{i}")).collect();
    for id in &ids {
        let (status, v) = api_a
            .post(
                "/v1/runs",
                json!({"workflow": "default/fenced-order", "runId": id,
                "input": {"sku": "F", "customer": "c", "amount": 3, "address": "somewhere"},
                "signal": {"name": "approval", "payload": {}}}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.mesh.supervisor.signal("control-plane", Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    t.mesh.supervisor.signal("control-plane", Signal::SIGCONT);
    for id in &ids {
        let run = api_b.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "Completed", "{id}: {run}");
        let (_, history) = api_b.get(&format!("/v1/runs/{id}/history")).await;
        completions_once(id, &history);
    }
    // B did take runs over, and A's late writes were rejected and counted.
    let a_metrics = metrics(&t.mesh.control_plane_admin).await;
    let fenced = metric(&a_metrics, "meshflow_workflow_fenced_writes_total", &[]);
    assert!(
        fenced >= 1.0,
        "A's writes after the takeover are fenced: {fenced}"
    );
    let payment = records(&t.mesh.workload("payment").app).await;
    for (key, n) in payment["applied"].as_object().unwrap() {
        assert_eq!(n, &json!(1), "{key} applied {n} times");
    }
    let attempts = payment["attempts"].as_array().unwrap();
    assert!(
        attempts.iter().any(|a| a["coordinator"] == "B"),
        "B sent calls after the takeover"
    );
    // No key had attempts from A and from B in flight at the same time.
    let mut by_key: std::collections::BTreeMap<&str, Vec<(&str, u64, u64)>> = Default::default();
    for a in attempts {
        by_key.entry(a["key"].as_str().unwrap()).or_default().push((
            a["coordinator"].as_str().unwrap(),
            a["startMs"].as_u64().unwrap(),
            a["endMs"].as_u64().unwrap(),
        ));
    }
    for (key, list) in by_key {
        for x in &list {
            for y in &list {
                if x.0 != y.0 {
                    assert!(x.2 <= y.1 || y.2 <= x.1, "{key}: {x:?} and {y:?} overlap");
                }
            }
        }
    }
    drop(pg);
}
