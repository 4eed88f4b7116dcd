//! Issue 12, items 6 and 10: one hostile expression must not crash or freeze the control plane,
//! and no operator command reports success when it did nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::workflow::{start_shop, Api};

/// A mesh with only the coordinator.
const COORDINATOR_ONLY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: guards }
spec:
  workloads:
    - name: coordinator
      namespace: meshflow-system
      app: { builtin: coordinator }
"#;

fn definition(name: &str, steps: &str) -> String {
    format!(
        "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  steps:\n{steps}"
    )
}

/// `[0, …, 9].all(v0, [0, …, 9].all(v1, … v0 + v1 + … >= 0))`, `depth` deep (`map` likewise).
fn nested(macro_name: &str, depth: usize) -> String {
    let digits = "[0,1,2,3,4,5,6,7,8,9]";
    let mut inner = (0..depth)
        .map(|i| format!("v{i}"))
        .collect::<Vec<_>>()
        .join(" + ");
    if macro_name == "all" {
        inner.push_str(" >= 0");
    }
    for i in (0..depth).rev() {
        inner = format!("{digits}.{macro_name}(v{i}, {inner})");
    }
    inner
}

/// Peak resident memory of `pid`, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Acceptance of item 6: each hostile definition is refused (4xx naming the problem) within
/// 1 s, a run whose input makes a condition too costly fails instead of stalling, the control
/// plane's `/ready` answers within 100 ms throughout, and it stays under 200 MB.
#[tokio::test(flavor = "multi_thread")]
async fn timing_hostile_expressions_are_refused_while_the_control_plane_stays_ready() {
    let t = start_mesh(COORDINATOR_ONLY, |_| {});
    let api = Api::new(&t);
    let pid = t
        .mesh
        .supervisor
        .pids()
        .into_iter()
        .find(|(name, _)| name == "control-plane")
        .expect("control plane")
        .1;
    let admin = t.mesh.control_plane_admin.clone();

    // Watch `/ready` and the process while the definitions arrive.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut answers = 0u32;
            let mut slowest = Duration::ZERO;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match http.get(format!("http://{admin}/ready")).send().await {
                    Ok(r) if r.status() == 200 => answers += 1,
                    Ok(r) => failures.push(format!("HTTP {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
                slowest = slowest.max(sent.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (answers, slowest, failures)
        })
    };

    let call = "call: { service: nothing, path: /x }";
    let chain: String = (0..10_000)
        .map(|i| {
            if i == 0 {
                format!("  - {{ name: s0, {call} }}\n")
            } else {
                format!("  - {{ name: s{i}, dependsOn: [s{}], {call} }}\n", i - 1)
            }
        })
        .collect();
    let terms = |n: usize| vec!["1"; n].join(" + ");
    let hostile: Vec<(&str, String, &str)> = vec![
        (
            "300 nested parentheses",
            definition(
                "parens",
                &format!(
                    "  - {{ name: a, when: \"{}true{}\", {call} }}\n",
                    "(".repeat(300),
                    ")".repeat(300)
                ),
            ),
            "nests brackets more than",
        ),
        (
            "a sum of 4,000 terms",
            definition(
                "sum",
                &format!("  - {{ name: a, when: \"{} > 0\", {call} }}\n", terms(4000)),
            ),
            "bytes long; at most",
        ),
        (
            "a sum of 600 terms (short enough, too many tokens)",
            definition(
                "tokens",
                &format!(
                    "  - {{ name: a, when: \"{} > 0\", {call} }}\n",
                    vec!["1"; 600].join("+")
                ),
            ),
            "tokens",
        ),
        (
            "all() nested 8 deep",
            definition(
                "all8",
                &format!("  - {{ name: a, when: \"{}\", {call} }}\n", nested("all", 8)),
            ),
            "comprehensions (all, exists, exists_one, map, filter) nest more than",
        ),
        (
            "map() nested 7 deep in a body template",
            definition(
                "map7",
                &format!(
                    "  - {{ name: a, call: {{ service: s, path: /x, body: {{ v: \"${{{}}}\" }} }} }}\n",
                    nested("map", 7)
                ),
            ),
            "comprehensions (all, exists, exists_one, map, filter) nest more than",
        ),
        (
            "a 10,000-step dependsOn chain",
            definition("chain", &chain),
            "at most 1000",
        ),
    ];
    // Three rounds, so `/ready` is polled over a longer stretch of hostile registrations.
    for (what, yaml, expected) in hostile.iter().chain(&hostile).chain(&hostile) {
        let sent = Instant::now();
        let r = api
            .http
            .post(format!("{}/v1/workflows", api.base))
            .bearer_auth(&api.token)
            .body(yaml.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer (did the control plane die?): {e}"));
        let took = sent.elapsed();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!((400..500).contains(&status), "{what}: HTTP {status} {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{what}: {error}");
        assert!(
            took < Duration::from_secs(1),
            "{what}: refused after {took:?}"
        );
    }

    // Allowed statically (two comprehensions nest), too costly over this input: the run fails
    // with a reason instead of stalling the coordinator.
    api.register(&definition(
        "costly",
        "  - { name: a, when: \"input.items.all(x, input.items.all(y, x + y >= 0))\", sleep: { duration: 1ms } }\n",
    ))
    .await;
    let items: Vec<u32> = (0..20_000).collect();
    let sent = Instant::now();
    let (status, v) = api
        .post(
            "/v1/runs",
            json!({"workflow": "default/costly", "runId": "costly", "input": {"items": items}}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let run = api.wait_terminal("costly", Duration::from_secs(10)).await;
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(run["status"], "Failed", "{run}");
    assert!(
        run["state"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("too costly"),
        "{run}"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (answers, slowest, failures) = watcher.await.unwrap();
    assert!(failures.is_empty(), "/ready failed: {failures:?}");
    assert!(answers >= 10, "only {answers} /ready answers");
    assert!(
        slowest < Duration::from_millis(100),
        "/ready took {slowest:?} at worst"
    );
    let rss = peak_rss(pid);
    println!(
        "/ready: {answers} answers, slowest {slowest:?}; control plane peak RSS {} MB",
        rss >> 20
    );
    assert!(
        rss > 0 && rss < 200 << 20,
        "control plane peak RSS {} MB",
        rss >> 20
    );
    // Still the same process, still serving.
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let (status, _) = api.get("/v1/workflows").await;
    assert_eq!(status, 200);
}

/// Signal/cancel/terminate/retry on a run that cannot take them (Completed, Compensated,
/// Compensating, Cancelled, Terminated) answer 409 with the reason, and a signal no step can
/// use answers 404; the CLI exits non-zero and prints the reason. Valid commands still
/// answer 202.
#[tokio::test(flavor = "multi_thread")]
async fn commands_that_cannot_apply_answer_409_or_404_with_a_reason() {
    let t = start_shop();
    let api = Api::new(&t);
    api.register(
        r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: guarded, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "G", qty: 1 } }
    timeouts: { perAttempt: 60s }
    compensate: { service: inventory, path: /reservations/release, body: { delayMs: "${input.undoDelayMs}" } }
  - name: approve
    dependsOn: [reserve]
    waitForSignal: { name: approval }
  - name: charge
    dependsOn: [approve]
    call: { service: payment, path: /charges, body: { customer: "c", amount: "${input.amount}" } }
    retry: { maxAttempts: 1 }
"#,
    )
    .await;
    let start = |id: &str, amount: u32, undo_ms: u32, approve: bool| {
        let mut body = json!({"workflow": "default/guarded", "runId": id,
            "input": {"amount": amount, "undoDelayMs": undo_ms}});
        if approve {
            body["signal"] = json!({"name": "approval", "payload": {}});
        }
        body
    };
    let post = |path: String| {
        let api = &api;
        async move {
            let r = api
                .http
                .post(format!("{}{path}", api.base))
                .bearer_auth(&api.token)
                .json(&json!({}))
                .send()
                .await
                .expect("POST");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let wait_status = |id: &'static str, want: &'static str| {
        let api = &api;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (_, v) = api.get(&format!("/v1/runs/{id}")).await;
                if v["status"] == want {
                    return;
                }
                assert!(Instant::now() < deadline, "{id} never {want}: {v}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Completed (approved at the start), Compensated (the charge is refused: 402).
    assert_eq!(api.post("/v1/runs", start("done", 1, 0, true)).await.0, 201);
    assert_eq!(
        api.post("/v1/runs", start("refused", 20_000, 0, true))
            .await
            .0,
        201
    );
    // Cancelled: waits for approval, cancelled (202: it applies), undone at once.
    assert_eq!(
        api.post("/v1/runs", start("cancelled", 1, 0, false))
            .await
            .0,
        201
    );
    // Compensating for a minute: its undo takes 60 s.
    assert_eq!(
        api.post("/v1/runs", start("undoing", 1, 60_000, false))
            .await
            .0,
        201
    );
    // Terminated.
    assert_eq!(
        api.post("/v1/runs", start("stopped", 1, 0, false)).await.0,
        201
    );
    for id in ["cancelled", "undoing", "stopped"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = api.get(&format!("/v1/runs/{id}")).await;
            if v["state"]["steps"]["approve"]["status"] == "Running" {
                break;
            }
            assert!(Instant::now() < deadline, "{id}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A signal no step waits for is refused even while the run could take signals.
    let (status, v) = post("/v1/runs/stopped/signals/aproval".into()).await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("\"aproval\""),
        "{v}"
    );
    // Signal-with-start naming such a signal creates nothing.
    let mut typo = start("typo", 1, 0, false);
    typo["signal"] = json!({"name": "aproval", "payload": {}});
    assert_eq!(api.post("/v1/runs", typo).await.0, 404);
    assert_eq!(api.get("/v1/runs/typo").await.0, 404);
    // Valid commands are accepted.
    assert_eq!(post("/v1/runs/cancelled/cancel".into()).await.0, 202);
    assert_eq!(post("/v1/runs/undoing/cancel".into()).await.0, 202);
    assert_eq!(post("/v1/runs/stopped/terminate".into()).await.0, 202);
    wait_status("done", "Completed").await;
    wait_status("refused", "Compensated").await;
    wait_status("cancelled", "Cancelled").await;
    wait_status("undoing", "Compensating").await;
    wait_status("stopped", "Terminated").await;

    let commands = ["signals/approval", "cancel", "terminate", "retry"];
    for (id, state) in [
        ("done", "Completed"),
        ("refused", "Compensated"),
        ("cancelled", "Cancelled"),
        ("undoing", "Compensating"),
        ("stopped", "Terminated"),
    ] {
        for command in commands {
            // Terminate is what stops a compensating run: it applies.
            if state == "Compensating" && command == "terminate" {
                continue;
            }
            let (status, v) = post(format!("/v1/runs/{id}/{command}")).await;
            assert_eq!(status, 409, "{command} on a {state} run: {v}");
            let error = v["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(&format!("run {id}")) && error.contains(state),
                "{command} on a {state} run: {error}"
            );
        }
        // An unknown signal name is 404 whatever the state.
        assert_eq!(post(format!("/v1/runs/{id}/signals/nope")).await.0, 404);
    }
    // The history shows nothing was recorded for the refused signals.
    let (_, history) = api.get("/v1/runs/done/history").await;
    let signals = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "SignalReceived")
        .count();
    assert_eq!(signals, 1, "only the signal-with-start: {history}");

    // The CLI exits non-zero and prints the reason.
    let cli = |args: &[&str]| crate::workflow::meshflow_workflow_code(&t, &api, args);
    for args in [
        vec!["cancel", "done"],
        vec!["terminate", "done"],
        vec!["retry", "done"],
        vec!["signal", "done", "approval"],
    ] {
        let (code, text) = cli(&args);
        assert!(
            code.is_some_and(|c| c != 0) && text.contains("409") && text.contains("Completed"),
            "{args:?}: {code:?} {text}"
        );
    }
    let (code, text) = cli(&["signal", "done", "nope"]);
    assert!(
        code.is_some_and(|c| c != 0) && text.contains("404") && text.contains("\"nope\""),
        "{code:?} {text}"
    );
    // Stop the minute-long undo.
    assert_eq!(post("/v1/runs/undoing/terminate".into()).await.0, 202);
}
