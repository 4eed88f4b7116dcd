//! Issue 16, acceptance 5: starting a run and waiting for its end (`POST /v1/runs?wait=`), reading
//! a run and waiting (`GET /v1/runs/{id}?wait=`), and `meshflow workflow start --wait`: the output
//! when the run ends, 202 with the state when the wait elapses, attaching instead of starting
//! twice, a waiter whose coordinator restarts, and the waiter limit (429, counted).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::workflow::{
    effects_applied_once, meshflow_workflow_code, restart_control_plane, start_shop, Api,
};

/// Reserve, then wait for the `approval` signal, then ship: the test decides when a run ends.
const WAIT_ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: wait-order, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "${input.sku}", qty: 1 } }
    retry: { maxAttempts: 5, initialInterval: 50ms }
    timeouts: { perAttempt: 3s }
  - name: approve
    dependsOn: [reserve]
    waitForSignal: { name: approval, timeout: 5m }
  - name: ship
    dependsOn: [approve]
    call: { service: shipping, path: /shipments, body: { order: "${run.id}", address: "1 Main St" } }
    retry: { maxAttempts: 5, initialInterval: 50ms }
    timeouts: { perAttempt: 3s }
  output:
    reservation: "${steps.reserve.output.id}"
    shipment: "${steps.ship.output.id}"
"#;

/// An API client whose requests may take as long as the waits below.
fn patient(api: &Api) -> Api {
    Api {
        base: api.base.clone(),
        token: api.token.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}

fn start_body(id: &str) -> Value {
    json!({"workflow": "default/wait-order", "runId": id, "input": {"sku": "book"}})
}

async fn runs_of(api: &Api) -> Vec<String> {
    let (status, runs) = api.get("/v1/runs?workflow=default/wait-order").await;
    assert_eq!(status, 200, "{runs}");
    runs.as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_callers_get_the_output_or_202_and_attach_instead_of_starting_twice() {
    let t = start_shop();
    let api = patient(&Api::new(&t));
    api.register(WAIT_ORDER).await;

    // The wait elapses first: 202 with the run as it is (it waits for the signal).
    let started = Instant::now();
    let (status, body) = api.post("/v1/runs?wait=400ms", start_body("w-1")).await;
    assert_eq!(status, 202, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(body["runId"], "w-1");
    assert_eq!(body["created"], true);
    assert_eq!(body["status"], "Running", "{body}");
    assert!(body["output"].is_null());

    // A reader waits; the signal ends the run; the reader gets the output as soon as the run
    // is committed terminal (woken by the commit: the answer comes back long before the wait).
    let admin = t.mesh.control_plane_admin.clone();
    let reader = {
        let api = patient(&api);
        tokio::spawn(async move {
            let (status, view) = api.get("/v1/runs/w-1?wait=30s").await;
            (status, view, Instant::now())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&admin).await, "meshflow_workflow_waiters", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the reader never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    let (status, _) = api
        .post("/v1/runs/w-1/signals/approval", json!({"ok": true}))
        .await;
    assert_eq!(status, 202);
    let (status, view, answered) = reader.await.unwrap();
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "Completed", "{view}");
    assert!(view["state"]["output"]["shipment"].is_string(), "{view}");
    let after = answered.saturating_duration_since(signalled);
    assert!(
        after < Duration::from_secs(15),
        "answered {after:?} after the signal, the wait was 30 s"
    );

    // Starting again with the same id and a wait attaches: the finished run's output, 200,
    // nothing new started.
    let (status, body) = api.post("/v1/runs?wait=5s", start_body("w-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], false);
    assert_eq!(body["status"], "Completed");
    assert_eq!(body["output"], view["state"]["output"]);
    assert_eq!(runs_of(&api).await, vec!["w-1".to_string()]);

    // Bad input: an unreadable wait (400, naming it) and an unknown run (404).
    let (status, body) = api.post("/v1/runs?wait=soon", start_body("w-x")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("wait="), "{body}");
    let (status, _) = api.get("/v1/runs/nope?wait=1s").await;
    assert_eq!(status, 404);
    assert_eq!(
        runs_of(&api).await,
        vec!["w-1".to_string()],
        "a refused start started nothing"
    );

    // The CLI: signal-with-start and --wait prints the output, exit 0; a run still waiting
    // when the wait elapses exits 4 and names the command that waits again, which works.
    let (code, text) = meshflow_workflow_code(
        &t,
        &api,
        &[
            "start",
            "wait-order",
            "--id",
            "w-2",
            "--input",
            r#"{"sku":"pen"}"#,
            "--signal",
            "approval",
            "--wait",
            "30s",
        ],
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("run w-2 Completed"), "{text}");
    assert!(text.contains("shipment"), "{text}");
    let (code, text) = meshflow_workflow_code(
        &t,
        &api,
        &[
            "start",
            "wait-order",
            "--input",
            r#"{"sku":"cup"}"#,
            "--wait",
            "300ms",
        ],
    );
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("still Running"), "{text}");
    let resume = text
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command to wait again in {text:?}"));
    let args: Vec<&str> = resume.split_whitespace().collect();
    assert_eq!(args[..3], ["meshflow", "workflow", "get"], "{resume}");
    let mut args = args[2..].to_vec();
    let wait = args.iter().position(|a| *a == "--wait").unwrap();
    args[wait + 1] = "300ms";
    let (code, text) = meshflow_workflow_code(&t, &api, &args);
    assert_eq!(code, Some(4), "{text}");
    // Bad arguments are not mistaken for a running run.
    let (code, text) = meshflow_workflow_code(&t, &api, &["get", "w-2", "--wait", "soonish"]);
    assert_ne!(code, Some(4), "{text}");
    assert_ne!(code, Some(0), "{text}");
    effects_applied_once(&t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_whose_coordinator_restarts_retries_without_a_second_run() {
    let mut t = start_shop();
    let api = patient(&Api::new(&t));
    api.register(WAIT_ORDER).await;
    let waiter = {
        let api = patient(&api);
        tokio::spawn(async move { api.try_post("/v1/runs?wait=30s", start_body("r-1")).await })
    };
    // The run is started and waits for its signal when the coordinator dies under the waiter.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, view) = api.get("/v1/runs/r-1").await;
        if status == 200 && view["state"]["steps"]["reserve"]["status"] == "Completed" {
            break;
        }
        assert!(Instant::now() < deadline, "run r-1 did not start: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restart_control_plane(&mut t, None);
    let answer = waiter.await.unwrap();
    assert!(
        answer.as_ref().is_none_or(|(status, _)| *status >= 500),
        "the waiter must see the coordinator go: {answer:?}"
    );

    // Retrying the same start with the same id attaches to the run, which survived.
    let api = patient(&Api::new(&t));
    let retry = {
        let api = patient(&api);
        tokio::spawn(async move { api.post("/v1/runs?wait=30s", start_body("r-1")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = api
        .post("/v1/runs/r-1/signals/approval", json!({"ok": true}))
        .await;
    assert_eq!(status, 202);
    let (status, body) = retry.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], false, "{body}");
    assert_eq!(body["status"], "Completed", "{body}");
    assert_eq!(runs_of(&api).await, vec!["r-1".to_string()]);
    effects_applied_once(&t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waiter_limit_answers_429_and_counts_it() {
    let mut t = start_shop();
    // Two waiters at most (the default is 1,024).
    t.mesh
        .options
        .env
        .insert("MESHFLOW_WORKFLOW_MAX_WAITERS".into(), "2".into());
    restart_control_plane(&mut t, None);
    let api = patient(&Api::new(&t));
    api.register(WAIT_ORDER).await;
    let (status, _) = api.post("/v1/runs", start_body("l-1")).await;
    assert_eq!(status, 201);
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let api = patient(&api);
            tokio::spawn(async move { api.get("/v1/runs/l-1?wait=30s").await })
        })
        .collect();
    // Both are waiting before the third asks.
    let admin = t.mesh.control_plane_admin.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&admin).await, "meshflow_workflow_waiters", &[]) < 2.0 {
        assert!(Instant::now() < deadline, "the two waiters never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = api.get("/v1/runs/l-1?wait=3s").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("waiting"),
        "{body}"
    );
    // Refused before anything starts: no run l-2.
    let (status, body) = api.post("/v1/runs?wait=3s", start_body("l-2")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(runs_of(&api).await, vec!["l-1".to_string()]);
    // Reading without a wait is not limited.
    let (status, _) = api.get("/v1/runs/l-1").await;
    assert_eq!(status, 200);
    let text = metrics(&admin).await;
    assert_eq!(
        metric(&text, "meshflow_workflow_wait_rejected_total", &[]),
        2.0,
        "{text}"
    );
    // One commit wakes both waiters.
    let (status, _) = api
        .post("/v1/runs/l-1/signals/approval", json!({"ok": true}))
        .await;
    assert_eq!(status, 202);
    for waiter in waiters {
        let (status, view) = waiter.await.unwrap();
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["status"], "Completed");
    }
    let text = metrics(&admin).await;
    assert_eq!(metric(&text, "meshflow_workflow_waiters", &[]), 0.0);
}
