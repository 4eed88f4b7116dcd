//! Issue 7: `meshflow demo` end to end — its summary checked against the services' own
//! records and the sidecars' metrics, and no process or port left behind, after a normal exit
//! and after Ctrl-C in `--keep-running` mode.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn demo(args: &[&str], state: &Path, summary: &Path) -> Child {
    Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .arg("demo")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--summary-json")
        .arg(summary)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshflow demo starts")
}

/// A `meshflow demo` child that is stopped (SIGINT, then SIGKILL after 10 s) if the test
/// fails before stopping it, so a failed test leaves no mesh running.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The child's stdout, line by line, read on a thread.
fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// `host:port` of `workload`'s admin endpoint, from the summary's metrics URL.
fn admin_of(summary: &Value, workload: &str) -> String {
    summary["metrics"][workload]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string()
}

/// Sends SIGINT (Ctrl-C) to `child` and waits for it to exit; the issue allows 10 s.
fn ctrl_c(child: &mut Child) -> std::process::ExitStatus {
    let sent = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "Ctrl-C took longer than 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every process the demo started is gone and every port it bound can be bound again.
fn nothing_left(summary: &Value) {
    let processes = summary["processes"].as_array().unwrap();
    assert!(processes.len() >= 10, "{processes:?}");
    for p in processes {
        let pid = p[1].as_u64().unwrap() as i32;
        // Zombies would still answer kill(0); the demo reaps its children.
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {p} is still alive");
    }
    let ports = summary["ports"].as_array().unwrap();
    assert!(ports.len() >= 20, "{ports:?}");
    for port in ports {
        let port = port.as_u64().unwrap() as u16;
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("port {port} is still bound: {e}"));
    }
}

fn set(summary: &Value, status: &str) -> BTreeSet<String> {
    summary["runs"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| *s == status)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Run ids whose record under `<run>/<step>` exists, split into (kept, undone).
fn records_by_run(records: &Value, step: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut kept = BTreeSet::new();
    let mut undone = BTreeSet::new();
    for (key, record) in records["records"].as_object().unwrap() {
        let Some(run) = key.strip_suffix(&format!("/{step}")) else {
            continue;
        };
        if record["undone"] == Value::Bool(true) {
            undone.insert(run.to_string());
        } else {
            kept.insert(run.to_string());
        }
    }
    (kept, undone)
}

/// Acceptance 1–4 (keep-running mode): summary vs records and metrics; Ctrl-C cleans up.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_summary_matches_the_services_records_and_ctrl_c_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let summary_path = dir.path().join("summary.json");
    let mut running = Running(demo(
        &["--orders", "20", "--keep-running"],
        &dir.path().join("demo"),
        &summary_path,
    ));
    let child = &mut running.0;
    let rx = stdout_lines(child);
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !printed.iter().any(|l: &String| l.starts_with("mesh is up")) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => printed.push(line),
            Err(_) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    use std::io::Read;
                    child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    panic!("demo exited with {status}:\n{}\n{err}", printed.join("\n"));
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "demo not done:\n{}",
            printed.join("\n")
        );
    }
    let text = printed.join("\n");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();

    // The plan: orders 10 and 20 ship to nowhere (compensated); 4, 8, 12, 16 get a 503 first.
    let completed = set(&summary, "Completed");
    let compensated = set(&summary, "Compensated");
    assert_eq!(completed.len(), 18, "{summary}");
    assert_eq!(
        compensated,
        BTreeSet::from(["order-0010".to_string(), "order-0020".to_string()])
    );
    assert!(summary["unexpected"].as_array().unwrap().is_empty());
    assert!(
        text.contains("completed 18  compensated 2  failed 0"),
        "{text}"
    );

    // Acceptance 1: the services' own records.
    let app = |w: &str| summary["apps"][w].as_str().unwrap().to_string();
    let payment = crate::workflow::records(&app("default/payment")).await;
    let (charged, refunded) = records_by_run(&payment, "charge");
    assert_eq!(
        charged, completed,
        "payment charged exactly the completed orders"
    );
    assert_eq!(
        refunded, compensated,
        "payment refunded exactly the compensated orders"
    );
    for (key, n) in payment["applied"].as_object().unwrap() {
        assert_eq!(n, 1, "{key} applied {n} times");
    }
    for (key, record) in payment["records"].as_object().unwrap() {
        let xfcc = record["xfcc"].as_str().unwrap_or_default();
        assert!(
            xfcc.contains("URI=spiffe://cluster.local/ns/meshflow-system/sa/coordinator"),
            "charge {key} arrived without the coordinator's identity: {xfcc:?}"
        );
    }
    let inventory = crate::workflow::records(&app("default/inventory")).await;
    let (reserved, released) = records_by_run(&inventory, "reserve");
    assert_eq!(reserved, completed, "reservations kept = completed orders");
    assert_eq!(
        released, compensated,
        "reservations released = compensated orders"
    );
    for (key, n) in inventory["applied"].as_object().unwrap() {
        assert_eq!(n, 1, "{key} reserved {n} times");
    }
    let shipping = crate::workflow::records(&app("default/shipping")).await;
    let (shipped, _) = records_by_run(&shipping, "ship");
    assert_eq!(shipped, completed, "shipments = completed orders");

    // Acceptance 2: retries absorbed = the shipping retry metric's increase (from 0), > 0.
    let coordinator = admin_of(&summary, "meshflow-system/coordinator");
    let retries = metric(
        &metrics(&coordinator).await,
        "meshflow_retries_total",
        &[("service", "shipping.default")],
    );
    assert!(retries > 0.0);
    assert_eq!(summary["retriesAbsorbed"].as_f64().unwrap(), retries);
    assert!(
        text.contains(&format!("retries absorbed by the mesh: {retries}")),
        "{text}"
    );
    // Each flaky order's shipment took two tries at shipping, the second one applied.
    let flaky_keys: Vec<&Value> = shipping["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["status"] == 503)
        .collect();
    assert_eq!(flaky_keys.len(), 4, "{flaky_keys:?}");

    // Acceptance 3: the denied direct call, in the summary and in the metric.
    let denials = summary["denials"].as_array().unwrap();
    assert!(denials
        .iter()
        .any(|d| d["url"] == "http://payment.default/charges"
            && d["status"] == 403
            && d["from"] == "default/storefront"));
    assert!(
        text.contains("default/storefront → http://payment.default/charges: 403"),
        "{text}"
    );
    let payment_admin = admin_of(&summary, "default/payment");
    let denied = metric(
        &metrics(&payment_admin).await,
        "meshflow_authz_decisions_total",
        &[("decision", "deny")],
    );
    assert_eq!(denied, 1.0, "the storefront's direct call to payment");
    assert_eq!(
        summary["authzDenied"].as_f64().unwrap(),
        2.0,
        "payment + the admin path"
    );

    // Acceptance 4: Ctrl-C stops everything within 10 s.
    let status = ctrl_c(child);
    assert!(status.success(), "{status}");
    nothing_left(&summary);
}

/// Acceptance 4 (normal exit): a short demo exits 0 by itself and leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_exits_cleanly_and_leaves_no_process_or_port() {
    let dir = tempfile::tempdir().unwrap();
    let summary_path = dir.path().join("summary.json");
    let collector = crate::collector::Collector::start().await;
    let child = demo(
        &["--orders", "6", "--otlp", &collector.endpoint],
        &dir.path().join("demo"),
        &summary_path,
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("meshflow demo: 6 orders"), "{stdout}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(set(&summary, "Completed").len(), 6);
    // Order 4 got a 503 first, absorbed by the mesh.
    assert_eq!(summary["retriesAbsorbed"].as_f64().unwrap(), 1.0);
    nothing_left(&summary);
    // `--otlp`: the summary names the collector, and every run's trace arrived (the
    // coordinator flushes its spans when it stops).
    // (`spansExported` is a snapshot "so far": spans leave in 200 ms batches, so a short batch
    // may report 0 before the sidecars' first export; the collector count below is the check.)
    assert_eq!(summary["traces"], collector.endpoint.as_str());
    assert_eq!(summary["spansDropped"].as_f64().unwrap(), 0.0, "{summary}");
    let runs = collector
        .spans()
        .iter()
        .filter(|s| s.name == "run default/place-order")
        .count();
    assert_eq!(runs, 6, "one run span per order");
}

/// Acceptance 4 (Ctrl-C mid-batch): the demo stops within 10 s and every process it started
/// (named by the ready files of the control plane and sidecars) is gone, its ports free.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_the_batch_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("demo");
    let mut running = Running(demo(
        &["--orders", "5000", "--concurrency", "2"],
        &state,
        &dir.path().join("summary.json"),
    ));
    let child = &mut running.0;
    let rx = stdout_lines(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
        if line.starts_with("orders ") {
            break;
        }
        assert!(Instant::now() < deadline, "no progress line");
        assert!(child.try_wait().unwrap().is_none(), "demo exited early");
    }
    let mut ready = Vec::new();
    for entry in std::fs::read_dir(state.join("state/ready")).unwrap() {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        ready.push(v);
    }
    assert!(ready.len() >= 6, "{ready:?}");
    let status = ctrl_c(child);
    assert_eq!(status.code(), Some(130), "interrupted");
    for r in &ready {
        let pid = r["pid"].as_u64().unwrap() as i32;
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "{r} still alive"
        );
        for addr in r["addresses"].as_object().unwrap().values() {
            let addr: std::net::SocketAddr = addr.as_str().unwrap().parse().unwrap();
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still bound: {e}"));
        }
    }
}
