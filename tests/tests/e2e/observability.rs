//! Issue 6 (part): `meshflow stat` on a running local mesh.

use std::time::Duration;

use serde_json::Value;

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
