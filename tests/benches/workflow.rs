//! Benchmark (not a test): workflow runs/s and run latency (p50/p99) for the 3-step order
//! workflow against the fast local shop services, through sidecars, on SQLite and on
//! PostgreSQL. Run with `bench/workflow-runs [runs] [concurrency]`; prints a table.

#[path = "../tests/e2e/common.rs"]
mod common;
#[path = "../tests/e2e/workflow.rs"]
#[allow(dead_code)]
mod workflow;

use std::time::{Duration, Instant};

use serde_json::json;

async fn measure(label: &str, t: common::TestMesh, runs: usize, concurrency: usize) {
    let api = std::sync::Arc::new(workflow::Api::new(&t));
    api.register(workflow::PLACE_ORDER).await;
    let started = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..runs {
        let (api, semaphore) = (api.clone(), semaphore.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.unwrap();
            let id = format!("bench-{i}");
            api.post(
                "/v1/runs",
                json!({"workflow": "default/place-order", "runId": id,
                "input": {"sku": "A", "qty": 1, "customer": "c", "amount": 1, "address": "a"}}),
            )
            .await;
            let run = api.wait_terminal(&id, Duration::from_secs(120)).await;
            let state = &run["state"];
            assert_eq!(run["status"], "Completed", "{run}");
            state["finishedMs"].as_u64().unwrap() - state["startedMs"].as_u64().unwrap()
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{label:<12} {runs:>6} {concurrency:>6} {:>10.1} {:>9} ms {:>9} ms",
        runs as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);
    println!(
        "{:<12} {:>6} {:>6} {:>10} {:>12} {:>12}",
        "store", "runs", "conc", "runs/s", "p50", "p99"
    );
    measure("sqlite", workflow::start_shop(), runs, concurrency).await;
    let pg = common::Postgres::start();
    let url = pg.url.clone();
    let t = common::start_dir(workflow::SHOP_MESH, workflow::SHOP_POLICIES, move |o| {
        o.control_plane_args = vec!["--workflow-store".into(), url];
    });
    measure("postgres", t, runs, concurrency).await;
}
