//! Benchmark (not a test): meshflow's workflow coordinator against Restate on the same 3-step
//! chain (reserve → charge → ship, each an HTTP POST with an `Idempotency-Key` to a
//! `meshflow-shop` service on 127.0.0.1), durable on both sides (SQLite `synchronous=FULL`,
//! PostgreSQL `fsync=on`, Restate's defaults: its log and RocksDB WAL synced).
//!
//! Run with `bench/workflow-compare` (installs Restate from npm, builds release, prints a table
//! and writes JSON). Engines, in this order: Restate, meshflow on SQLite, meshflow on PostgreSQL
//! (`ENGINES="restate sqlite postgres"`). For each: a sequential phase (`SEQUENTIAL_RUNS`, default
//! 300, after 30 warm-up runs), closed loops of 16 and 64 concurrent callers for
//! `LOOP_SECONDS` (default 15) each, then a crash check (`CRASH_RUNS`, default 100, in flight with
//! the second step taking `CRASH_DELAY_MS`, default 1500, when the engine gets `kill -9` and is
//! started again): runs completed, effects applied twice for one (run, step), time from the kill
//! until every run has ended, and for meshflow whether replaying each history gives the stored
//! state.
//!
//! meshflow callers use `POST /v1/runs?wait=30s` (answered when the run is terminal); Restate
//! callers its request/response ingress (`POST /order/place`), and in the crash check
//! `/order/place/send` + `/restate/invocation/{id}/attach`. meshflow's calls go through the
//! coordinator's sidecar and the shop's sidecar (mTLS both ways), Restate's straight to the shop.

#[path = "../tests/e2e/common.rs"]
mod common;
#[path = "../tests/e2e/workflow.rs"]
#[allow(dead_code)]
mod workflow;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The chain as a meshflow workflow (its calls retried like Restate's `ctx.run`: until they
/// succeed; 4xx ends the run). `delayMs` slows the charge step (the crash check).
const BENCH_ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: bench-order, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "${input.sku}", qty: "${input.qty}" } }
    retry: { maxAttempts: 50, initialInterval: 50ms, maxInterval: 1s }
    timeouts: { perAttempt: 10s }
  - name: charge
    dependsOn: [reserve]
    call: { service: payment, path: /charges, body: { customer: "${input.customer}", amount: "${input.amount}", delayMs: "${input.delayMs}" } }
    retry: { maxAttempts: 50, initialInterval: 50ms, maxInterval: 1s }
    timeouts: { perAttempt: 10s }
  - name: ship
    dependsOn: [charge]
    call: { service: shipping, path: /shipments, body: { order: "${run.id}", address: "${input.address}" } }
    retry: { maxAttempts: 50, initialInterval: 50ms, maxInterval: 1s }
    timeouts: { perAttempt: 10s }
  output:
    reservation: "${steps.reserve.output.id}"
    charge: "${steps.charge.output.id}"
    shipment: "${steps.ship.output.id}"
"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn order_input(delay_ms: u64) -> Value {
    json!({"sku": "A", "qty": 1, "customer": "c", "amount": 1, "address": "1 Main St", "delayMs": delay_ms})
}

/// Starts one chain and waits for its end; `Err` names what went wrong.
trait Engine: Send + Sync {
    fn run_one(
        &self,
        n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

struct MeshflowClient {
    base: String,
    token: String,
    http: reqwest::Client,
    tag: String,
}

impl Engine for MeshflowClient {
    fn run_one(
        &self,
        n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let r = self
                .http
                .post(format!("{}/v1/runs?wait=30s", self.base))
                .bearer_auth(&self.token)
                .json(&json!({"workflow": "default/bench-order", "runId": format!("{}-{n}", self.tag), "input": order_input(0)}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let body: Value = r.json().await.map_err(|e| e.to_string())?;
            if matches!(status, 200 | 201) && body["status"] == "Completed" {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
    }
}

struct RestateClient {
    ingress: String,
    http: reqwest::Client,
}

impl Engine for RestateClient {
    fn run_one(
        &self,
        _n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let r = self
                .http
                .post(format!("{}/order/place", self.ingress))
                .json(&order_input(0))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let body: Value = r.json().await.map_err(|e| e.to_string())?;
            if status == 200 && body["shipment"].is_string() {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
    }
}

/// One phase's figures.
#[derive(Debug, Clone)]
struct Phase {
    concurrency: usize,
    runs: u64,
    errors: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
    /// meshflow: (store transactions, run writes) per run in this phase.
    store: Option<(f64, f64)>,
}

impl Phase {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ms.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.latencies_ms[i.min(self.latencies_ms.len() - 1)]
    }
    fn runs_per_s(&self) -> f64 {
        self.runs as f64 / self.seconds
    }
    fn json(&self) -> Value {
        json!({
            "concurrency": self.concurrency, "runs": self.runs, "errors": self.errors,
            "seconds": self.seconds, "runs_per_s": self.runs_per_s(),
            "p50_ms": self.percentile(0.50), "p90_ms": self.percentile(0.90),
            "p99_ms": self.percentile(0.99), "max_ms": self.percentile(1.0),
            "store_transactions_per_run": self.store.map(|s| s.0),
            "store_writes_per_run": self.store.map(|s| s.1),
        })
    }
}

/// `concurrency` callers in a closed loop until `count` runs (when given) or `duration`.
async fn closed_loop(
    engine: Arc<dyn Engine>,
    concurrency: usize,
    count: Option<u64>,
    duration: Duration,
    first_n: u64,
) -> Phase {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(first_n));
    let started = Instant::now();
    let stop_at = started + duration;
    let limit = count.map(|c| first_n + c);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (engine, next) = (engine.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            loop {
                if limit.is_none() && Instant::now() >= stop_at {
                    break;
                }
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if limit.is_some_and(|l| n >= l) {
                    break;
                }
                let t = Instant::now();
                match engine.run_one(n).await {
                    Ok(()) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("  run {n}: {e}");
                        }
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut phase = Phase {
        concurrency,
        runs: 0,
        errors: 0,
        seconds: 0.0,
        latencies_ms: Vec::new(),
        store: None,
    };
    for task in tasks {
        let (latencies, errors) = task.await.unwrap();
        phase.runs += latencies.len() as u64;
        phase.errors += errors;
        phase.latencies_ms.extend(latencies);
    }
    phase.seconds = started.elapsed().as_secs_f64();
    phase.latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    phase
}

/// (write transactions, run writes) of a meshflow control plane so far, from its
/// `meshflow_workflow_store_transaction_writes` histogram.
async fn store_writes(admin: &str) -> (f64, f64) {
    let text = common::metrics(admin).await;
    (
        common::metric(
            &text,
            "meshflow_workflow_store_transaction_writes_count",
            &[],
        ),
        common::metric(&text, "meshflow_workflow_store_transaction_writes_sum", &[]),
    )
}

/// Warm-up, sequential, 16 and 64 concurrent; with a meshflow control plane's admin address,
/// also its store transactions and run writes per run in each phase.
async fn load_phases(engine: Arc<dyn Engine>, admin: Option<&str>) -> Vec<Phase> {
    let sequential = env_or("SEQUENTIAL_RUNS", 300u64);
    let seconds = Duration::from_secs(env_or("LOOP_SECONDS", 15u64));
    let warm = closed_loop(engine.clone(), 4, Some(30), Duration::ZERO, 0).await;
    if warm.errors > 0 {
        eprintln!("  warm-up: {} errors", warm.errors);
    }
    let mut phases = Vec::new();
    for (i, concurrency) in [1, 16, 64].into_iter().enumerate() {
        let before = match admin {
            Some(a) => Some(store_writes(a).await),
            None => None,
        };
        let mut p = if concurrency == 1 {
            closed_loop(engine.clone(), 1, Some(sequential), Duration::ZERO, 1_000).await
        } else {
            closed_loop(
                engine.clone(),
                concurrency,
                None,
                seconds,
                1_000_000 * i as u64,
            )
            .await
        };
        if let (Some(a), Some((tx0, w0))) = (admin, before) {
            let (tx1, w1) = store_writes(a).await;
            let runs = (p.runs + p.errors).max(1) as f64;
            p.store = Some(((tx1 - tx0) / runs, (w1 - w0) / runs));
        }
        println!(
            "  c{:<3} {:>6} runs {:>4} errors {:>8.1} runs/s  p50 {:>7.1} ms  p99 {:>7.1} ms{}",
            p.concurrency,
            p.runs,
            p.errors,
            p.runs_per_s(),
            p.percentile(0.5),
            p.percentile(0.99),
            p.store.map_or(String::new(), |(tx, w)| format!(
                "  {tx:.2} transactions (fsyncs) and {w:.2} run writes per run"
            ))
        );
        phases.push(p);
    }
    phases
}

/// Effects applied more than once per idempotency key, summed over the shop services at
/// `apps` (`host:port`), and how many keys were applied at all.
async fn duplicate_effects(apps: &[String]) -> (u64, u64) {
    let (mut duplicates, mut keys) = (0, 0);
    for app in apps {
        let books = workflow::records(app).await;
        for n in books["applied"].as_object().unwrap().values() {
            keys += 1;
            duplicates += n.as_u64().unwrap_or(0).saturating_sub(1);
        }
    }
    (duplicates, keys)
}

// ---------------------------------------------------------------------------------------
// meshflow

fn start_meshflow(store: &str, pg: Option<&common::Postgres>) -> common::TestMesh {
    let args = match pg {
        Some(pg) => vec!["--workflow-store".to_string(), pg.url.clone()],
        None => Vec::new(),
    };
    let extra: Vec<String> = std::env::var("MESHFLOW_CONTROL_PLANE_ARGS")
        .ok()
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    println!("meshflow ({store}) starting");
    common::start_dir(workflow::SHOP_MESH, workflow::SHOP_POLICIES, move |o| {
        o.control_plane_args = args.into_iter().chain(extra).collect();
    })
}

async fn bench_meshflow(store: &str, pg: Option<&common::Postgres>) -> Value {
    let mut t = start_meshflow(store, pg);
    let api = workflow::Api::new(&t);
    api.register(BENCH_ORDER).await;
    let engine = Arc::new(MeshflowClient {
        base: api.base.clone(),
        token: api.token.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .pool_max_idle_per_host(128)
            .build()
            .unwrap(),
        tag: format!("bench-{store}"),
    });
    let phases = load_phases(engine, Some(&t.mesh.control_plane_admin)).await;

    // Crash check: CRASH_RUNS started (not waited for), the charge step slow; kill -9 of the
    // control plane (the coordinator runs in it) once every run is at least in its charge.
    let runs = env_or("CRASH_RUNS", 100u64);
    let delay = env_or("CRASH_DELAY_MS", 1500u64);
    let ids: Vec<String> = (0..runs).map(|i| format!("crash-{store}-{i}")).collect();
    for id in &ids {
        let (status, body) = api
            .post(
                "/v1/runs",
                json!({"workflow": "default/bench-order", "runId": id, "input": order_input(delay)}),
            )
            .await;
        assert!(matches!(status, 200 | 201), "start {id}: {status} {body}");
    }
    tokio::time::sleep(Duration::from_millis(delay / 2)).await;
    let killed = Instant::now();
    workflow::restart_control_plane(&mut t, None);
    let restarted = killed.elapsed().as_secs_f64();
    let api = workflow::Api::new(&t);
    let mut completed = 0;
    let mut replay_ok = 0;
    let definition: meshflow_policies::workflow::Workflow = {
        let (_, d) = api.get("/v1/workflows/default/bench-order").await;
        serde_json::from_value(d["definition"].clone()).unwrap()
    };
    for id in &ids {
        let run = api.wait_terminal(id, Duration::from_secs(120)).await;
        if run["status"] == "Completed" {
            completed += 1;
        }
    }
    let recovered = killed.elapsed().as_secs_f64();
    for id in &ids {
        let (_, run) = api.get(&format!("/v1/runs/{id}")).await;
        let (_, history) = api.get(&format!("/v1/runs/{id}/history")).await;
        let events: Vec<meshflow_control_plane::workflow::engine::Event> =
            serde_json::from_value(history).unwrap();
        if let Some(replayed) =
            meshflow_control_plane::workflow::engine::RunState::replay(&definition, &events)
        {
            if serde_json::to_value(&replayed).unwrap() == run["state"] {
                replay_ok += 1;
            }
        }
    }
    let apps: Vec<String> = ["inventory", "payment", "shipping"]
        .iter()
        .map(|w| t.mesh.workload(w).app.clone())
        .collect();
    let (duplicates, keys) = duplicate_effects(&apps).await;
    println!(
        "  crash: {completed}/{runs} completed, {duplicates} effects applied twice ({keys} keys), \
         {replay_ok}/{runs} histories replay to the stored state, restarted in {restarted:.1} s, \
         all ended {recovered:.1} s after the kill"
    );
    json!({
        "engine": format!("meshflow-{store}"),
        "phases": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        "crash": {"runs": runs, "second_step_ms": delay, "completed": completed,
                  "duplicate_effects": duplicates, "keys_applied": keys,
                  "replay_matches": replay_ok, "restart_s": restarted, "all_ended_s": recovered},
    })
}

// ---------------------------------------------------------------------------------------
// Restate

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A shop service on 127.0.0.1:0; its address read back from its first log line.
fn start_shop(role: &str) -> (Proc, String) {
    let mut child = Command::new(meshflow_cli::supervisor::find_program("meshflow-shop"))
        .args(["--role", role, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshflow-shop (build the release binaries first)");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(address.starts_with("127.0.0.1:"), "shop said: {line}");
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    (Proc(child), address)
}

/// restate-server on `base_dir` with random ports (bound to 127.0.0.1); returns it with its
/// ingress and admin URLs, read back from its log.
fn start_restate(server: &Path, base_dir: &Path, log: &Path) -> (Proc, String, String) {
    let file = std::fs::File::create(log).unwrap();
    let child = Command::new(server)
        .arg("--base-dir")
        .arg(base_dir)
        .args(["--node-name", "bench"])
        .env("RESTATE_USE_RANDOM_PORTS", "true")
        .env("RESTATE_BIND_IP", "127.0.0.1")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("restate-server");
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(strip_ansi).collect();
        let admin = lines.iter().find_map(|l| {
            l.split("Admin API starting on: ")
                .nth(1)
                .map(|u| u.trim().trim_end_matches('/').to_string())
        });
        let ingress = lines
            .iter()
            .position(|l| l.contains("Ingress HTTP listening"))
            .and_then(|i| {
                lines[i..].iter().take(8).find_map(|l| {
                    l.trim()
                        .strip_prefix("server.port:")
                        .map(|p| p.trim().to_string())
                })
            })
            .map(|port| format!("http://127.0.0.1:{port}"));
        if let (Some(ingress), Some(admin)) = (ingress, admin) {
            return (proc, ingress, admin);
        }
        assert!(
            Instant::now() < deadline,
            "restate-server did not report its ports in 60 s; its log: {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(url).await.is_err() {
        assert!(Instant::now() < deadline, "{url} does not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bench_restate(restate_dir: &Path) -> Value {
    let server =
        restate_dir.join("node_modules/@restatedev/restate-server-linux-x64/bin/restate-server");
    assert!(
        server.exists(),
        "no restate-server under {}: run bench/workflow-compare (it installs Restate from npm)",
        restate_dir.display()
    );
    println!("restate starting");
    let work = tempfile::tempdir().unwrap();
    let shops: Vec<(Proc, String)> = ["inventory", "payment", "shipping"]
        .iter()
        .map(|r| start_shop(r))
        .collect();
    let apps: Vec<String> = shops.iter().map(|(_, a)| a.clone()).collect();
    let base = work.path().join("restate-data");
    let (restate, ingress, admin) =
        start_restate(&server, &base, &work.path().join("restate-1.log"));
    wait_http(&format!("{admin}/health")).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../bench/workflow-compare.d/restate-order.js");
    let mut node = Command::new("node")
        .arg(&script)
        .args(apps.iter().map(|a| format!("http://{a}")))
        .env("NODE_PATH", restate_dir.join("node_modules"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node");
    let mut out = BufReader::new(node.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .expect("the Restate service listens")
        .to_string();
    std::thread::spawn(move || for _ in out.lines() {});
    let _node = Proc(node);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .pool_max_idle_per_host(128)
        .build()
        .unwrap();
    let r = http
        .post(format!("{admin}/deployments"))
        .json(&json!({"uri": format!("http://127.0.0.1:{port}")}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "register: {}",
        r.text().await.unwrap_or_default()
    );
    // The service becomes invocable shortly after registration.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let engine = RestateClient {
            ingress: ingress.clone(),
            http: http.clone(),
        };
        if engine.run_one(0).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the order service is not invocable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let engine = Arc::new(RestateClient {
        ingress: ingress.clone(),
        http: http.clone(),
    });
    let phases = load_phases(engine, None).await;

    // Crash check: CRASH_RUNS sent (not waited for), then kill -9 of restate-server, a new one
    // on the same data, and an attach to every invocation.
    let runs = env_or("CRASH_RUNS", 100u64);
    let delay = env_or("CRASH_DELAY_MS", 1500u64);
    let mut ids = Vec::new();
    for i in 0..runs {
        let r = http
            .post(format!("{ingress}/order/place/send"))
            .header("idempotency-key", format!("crash-{i}"))
            .json(&order_input(delay))
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        ids.push(
            body["invocationId"]
                .as_str()
                .expect("invocation id")
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(delay / 2)).await;
    let killed = Instant::now();
    drop(restate); // SIGKILL
    let (restate, ingress, admin) =
        start_restate(&server, &base, &work.path().join("restate-2.log"));
    wait_http(&format!("{admin}/health")).await;
    let restarted = killed.elapsed().as_secs_f64();
    let mut completed = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match http
                .get(format!("{ingress}/restate/invocation/{id}/attach"))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    if body["shipment"].is_string() {
                        completed += 1;
                    }
                    break;
                }
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
    }
    let recovered = killed.elapsed().as_secs_f64();
    let (duplicates, keys) = duplicate_effects(&apps).await;
    println!(
        "  crash: {completed}/{runs} completed, {duplicates} effects applied twice ({keys} keys), \
         restarted in {restarted:.1} s, all ended {recovered:.1} s after the kill"
    );
    drop(restate);
    json!({
        "engine": "restate",
        "phases": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        "crash": {"runs": runs, "second_step_ms": delay, "completed": completed,
                  "duplicate_effects": duplicates, "keys_applied": keys,
                  "replay_matches": Value::Null, "restart_s": restarted, "all_ended_s": recovered},
    })
}

// ---------------------------------------------------------------------------------------

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "n/a".into()
    }
}

#[tokio::main]
async fn main() {
    common::install_crypto();
    let engines: Vec<String> = std::env::var("ENGINES")
        .unwrap_or_else(|_| "restate sqlite postgres".into())
        .split_whitespace()
        .map(String::from)
        .collect();
    let restate_dir = PathBuf::from(std::env::var("RESTATE_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/meshflow/restate",
            std::env::var("HOME").unwrap_or_default()
        )
    }));
    let mut results = BTreeMap::new();
    for engine in &engines {
        let result = match engine.as_str() {
            "restate" => bench_restate(&restate_dir).await,
            "sqlite" => bench_meshflow("sqlite", None).await,
            "postgres" => {
                let pg = common::Postgres::start();
                bench_meshflow("postgres", Some(&pg)).await
            }
            other => panic!("unknown engine {other} (restate, sqlite, postgres)"),
        };
        results.insert(engine.clone(), result);
    }

    println!("\n| engine | sequential p50 / p99 ms | 16: runs/s, p50 / p99 ms | 64: runs/s, p50 / p99 ms | crash: completed, twice-applied, all ended after |");
    println!("|---|---|---|---|---|");
    let phase = |r: &Value, i: usize, k: &str| r["phases"][i][k].as_f64().unwrap_or(f64::NAN);
    for (name, r) in &results {
        let c = &r["crash"];
        println!(
            "| {name} | {:.1} / {:.1} | {:.0}, {:.1} / {:.1} | {:.0}, {:.1} / {:.1} | {}/{}, {}, {:.1} s |",
            phase(r, 0, "p50_ms"), phase(r, 0, "p99_ms"),
            phase(r, 1, "runs_per_s"), phase(r, 1, "p50_ms"), phase(r, 1, "p99_ms"),
            phase(r, 2, "runs_per_s"), phase(r, 2, "p50_ms"), phase(r, 2, "p99_ms"),
            c["completed"], c["runs"], c["duplicate_effects"], c["all_ended_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let mut ratios = BTreeMap::new();
    if let Some(restate) = results.get("restate") {
        for store in ["sqlite", "postgres"] {
            if let Some(m) = results.get(store) {
                let v = json!({
                    "sequential_p50": ratio(phase(m, 0, "p50_ms"), phase(restate, 0, "p50_ms")),
                    "sequential_p99": ratio(phase(m, 0, "p99_ms"), phase(restate, 0, "p99_ms")),
                    "c16_runs_per_s": ratio(phase(m, 1, "runs_per_s"), phase(restate, 1, "runs_per_s")),
                    "c64_runs_per_s": ratio(phase(m, 2, "runs_per_s"), phase(restate, 2, "runs_per_s")),
                    "c64_p99": ratio(phase(m, 2, "p99_ms"), phase(restate, 2, "p99_ms")),
                });
                println!("meshflow-{store} / restate: {v}");
                ratios.insert(store.to_string(), v);
            }
        }
    }
    let restate_version = std::fs::read_to_string(
        restate_dir.join("node_modules/@restatedev/restate-server/package.json"),
    )
    .ok()
    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    .and_then(|v| v["version"].as_str().map(String::from));
    let out = json!({
        "bench": "workflow-compare",
        "restate_version": restate_version,
        "settings": {
            "sequential_runs": env_or("SEQUENTIAL_RUNS", 300u64),
            "loop_seconds": env_or("LOOP_SECONDS", 15u64),
            "crash_runs": env_or("CRASH_RUNS", 100u64),
            "crash_delay_ms": env_or("CRASH_DELAY_MS", 1500u64),
            "meshflow_control_plane_args": std::env::var("MESHFLOW_CONTROL_PLANE_ARGS").unwrap_or_default(),
        },
        "results": results,
        "ratios_vs_restate": ratios,
    });
    let path = std::env::var("OUT").unwrap_or_else(|_| "workflow-compare.json".into());
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("JSON: {path}");
}
