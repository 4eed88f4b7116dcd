//! The effector (commit, then act) on the in-memory store: no database, no mesh. The
//! coordinator's "sidecar" is an axum server on 127.0.0.1:0 that answers the proxied calls
//! itself (absolute-form requests, as an HTTP proxy receives them) and counts each
//! `Idempotency-Key`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Json;
use serde_json::{json, Value};

use crate::coordinator::{Coordinator, CoordinatorSettings, WaitOutcome};
use crate::memory::MemoryStore;
use crate::metrics::WorkflowMetrics;

const SAGA: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: saga, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reserve, body: { sku: "${input.sku}" } }
    compensate: { service: inventory, path: /release }
  - name: nap
    dependsOn: [reserve]
    sleep: { duration: 20ms }
  - name: charge
    dependsOn: [nap]
    call: { service: payment, path: /charge, body: { amount: "${input.amount}" } }
    retry: { maxAttempts: 1 }
    compensate: { service: payment, path: /refund }
  output:
    reservation: "${steps.reserve.output.id}"
"#;

/// Calls seen by the fake sidecar: (path, idempotency key) → count.
type Calls = Arc<Mutex<BTreeMap<(String, String), u32>>>;

async fn answer(
    State(calls): State<Calls>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    *calls
        .lock()
        .unwrap()
        .entry((uri.path().to_string(), key.clone()))
        .or_default() += 1;
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if uri.path() == "/charge" && body["amount"].as_i64() > Some(100) {
        return (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"error": "over the limit"})),
        );
    }
    (StatusCode::CREATED, Json(json!({"id": key})))
}

async fn coordinator() -> (Arc<Coordinator>, Calls) {
    let calls: Calls = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new()
        .fallback(axum::routing::post(answer))
        .with_state(calls.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let registry = prometheus::Registry::new();
    let tracing = meshflow_telemetry::Tracing::new(
        &meshflow_telemetry::TraceSettings {
            otlp_endpoint: None,
            sampling_ratio: 0.0,
            accept_b3: false,
            service_name: "coordinator".into(),
            namespace: "test".into(),
            instance: None,
        },
        &registry,
    )
    .unwrap();
    let c = Coordinator::new(
        Arc::new(MemoryStore::new()),
        CoordinatorSettings {
            outbound: Some(sidecar),
            outbound_ready_file: None,
            retention: Duration::from_secs(3600),
            node: "test-node".into(),
            lease: Duration::from_secs(10),
            tracing,
            trace_sampling: 0.0,
            max_waiters: 16,
        },
        WorkflowMetrics::new(&registry).unwrap(),
    );
    tokio::spawn(c.clone().run_timers());
    c.register("saga.yaml", SAGA).await.unwrap();
    (c, calls)
}

async fn run_to_end(c: &Arc<Coordinator>, id: &str, input: Value) -> String {
    c.start("default/saga", Some(id.into()), input, None, None)
        .await
        .unwrap();
    let slot = c.reserve_waiter().unwrap();
    match c.wait_in(&slot, id, Duration::from_secs(10)).await.unwrap() {
        WaitOutcome::Finished(view) => {
            // Replaying the stored history gives the stored state.
            let events: Vec<crate::engine::Event> = c
                .store()
                .history(id)
                .await
                .unwrap()
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let definition = c
                .store()
                .definition("default/saga", Some(1))
                .await
                .unwrap()
                .unwrap();
            let wf = serde_json::from_str(&definition.spec).unwrap();
            let replayed = crate::engine::RunState::replay(&wf, &events).unwrap();
            assert_eq!(
                serde_json::to_value(&replayed).unwrap(),
                serde_json::to_value(&view.state).unwrap(),
                "{id}: replay differs from the state"
            );
            view.status
        }
        WaitOutcome::Elapsed(view) => panic!("{id}: not finished: {}", view.status),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_saga_completes_and_compensates_on_the_memory_store() {
    let (c, calls) = coordinator().await;
    assert_eq!(
        run_to_end(&c, "ok", json!({"sku": "A", "amount": 5})).await,
        "Completed"
    );
    assert_eq!(
        run_to_end(&c, "too-much", json!({"sku": "B", "amount": 500})).await,
        "Compensated"
    );
    let calls = calls.lock().unwrap().clone();
    let key = |p: &str, k: &str| (p.to_string(), k.to_string());
    // Each effect once per key; the failed charge's reservation was released, nothing else.
    assert_eq!(calls.get(&key("/reserve", "ok/reserve")), Some(&1));
    assert_eq!(calls.get(&key("/charge", "ok/charge")), Some(&1));
    assert_eq!(calls.get(&key("/reserve", "too-much/reserve")), Some(&1));
    assert_eq!(calls.get(&key("/charge", "too-much/charge")), Some(&1));
    assert_eq!(
        calls.get(&key("/release", "too-much/reserve/compensate")),
        Some(&1)
    );
    assert!(
        !calls
            .keys()
            .any(|(p, k)| p == "/release" && k.starts_with("ok/")),
        "a completed run undoes nothing: {calls:?}"
    );
    // The failed charge was attempted, so it is undone too (it may have applied).
    assert_eq!(
        calls.get(&key("/refund", "too-much/charge/compensate")),
        Some(&1)
    );
}
