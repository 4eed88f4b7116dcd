//! Readiness, admin shutdown and config errors at run time.

use std::time::{Duration, Instant};

use meshflow_cli::up::LocalMesh;

use crate::common::*;

async fn status(url: String) -> Option<u16> {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_is_not_ready_until_it_has_an_svid_and_config_and_stops_on_post_shutdown() {
    let mut t = start_hello();
    t.mesh.supervisor.stop("control-plane");
    // A second frontend sidecar starting while the control plane is away.
    let admin_port = meshflow_cli::supervisor::free_port().unwrap();
    let app_port = t.mesh.app_ports["default/frontend"];
    let key = "default/frontend";
    // Same workload, new process name: spawn through the supervisor with a known admin port.
    let spec = meshflow_cli::supervisor::ChildSpec::new(
        "late-sidecar",
        meshflow_cli::supervisor::find_program("meshflow-proxy"),
    )
    .args([
        "--bootstrap".to_string(),
        t.state_dir()
            .join("bootstrap/default_frontend.json")
            .display()
            .to_string(),
        "--app-port".into(),
        app_port.to_string(),
        "--admin".into(),
        format!("127.0.0.1:{admin_port}"),
        "--drain".into(),
        "500ms".into(),
    ]);
    t.mesh.supervisor.spawn(spec).unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(format!("http://{admin}/live")).await != Some(200) {
        assert!(Instant::now() < deadline, "admin never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(format!("http://{admin}/ready")).await,
        Some(503),
        "no SVID, no config: not ready"
    );

    t.mesh.start_control_plane().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(format!("http://{admin}/ready")).await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "{key}: never became ready after the control plane came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // POST /shutdown ends the sidecar (for Jobs); GET does not.
    assert_eq!(status(format!("http://{admin}/shutdown")).await, Some(405));
    let response = reqwest::Client::new()
        .post(format!("http://{admin}/shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stopped = Instant::now();
    let child = t.mesh.supervisor.get_mut("late-sidecar").unwrap();
    while child.child.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "POST /shutdown did not end the sidecar"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = LocalMesh::sidecar_process(key);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_mesh_file_keeps_the_last_good_config_and_names_file_field_line() {
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    let dump = |admin: String| async move {
        serde_json::from_str::<serde_json::Value>(&get_text(&admin, "/config_dump").await).unwrap()
    };
    let version = dump(frontend.admin.clone()).await["version"]
        .as_u64()
        .unwrap();
    let good = std::fs::read_to_string(t.mesh_path()).unwrap();
    let bad = good.replace("        protocol: grpc", "        protocl: grpc");
    assert_ne!(good, bad);
    std::fs::write(t.mesh_path(), &bad).unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        let cp = dump(t.mesh.control_plane_admin.clone()).await;
        if let Some(error) = cp["lastError"].as_str() {
            break error.to_string();
        }
        assert!(Instant::now() < deadline, "invalid file not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = bad.lines().position(|l| l.contains("protocl")).unwrap() + 1;
    assert!(
        error.contains(&format!("mesh.yaml:{line}: spec.workloads[1].app.protocl")),
        "{error}"
    );
    let cp_metrics = metrics(&t.mesh.control_plane_admin).await;
    assert_eq!(
        metric(&cp_metrics, "meshflow_config_errors_total", &[]),
        1.0
    );
    let log = std::fs::read_to_string(t.state_dir().join("logs/control-plane.log")).unwrap();
    assert!(log.contains("keeping the last good config"), "{log}");

    // The sidecars keep the last good version and keep serving.
    assert_eq!(
        dump(frontend.admin.clone()).await["version"]
            .as_u64()
            .unwrap(),
        version
    );
    let response = via(&frontend.outbound)
        .get("http://backend.default/still")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Fixing the file pushes a new version.
    std::fs::write(t.mesh_path(), good + "    - name: fixed\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while dump(frontend.admin.clone()).await["version"]
        .as_u64()
        .unwrap()
        == version
    {
        assert!(Instant::now() < deadline, "fixed file never pushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dump(t.mesh.control_plane_admin.clone()).await["lastError"].is_null());
}
