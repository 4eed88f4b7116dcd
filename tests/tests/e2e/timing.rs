//! Acceptance 5, 6 and 8: certificate renewal under traffic, control-plane outage and restart,
//! drain on SIGTERM and clean Ctrl-C. These run one at a time (nextest group `serial`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshflow_cli::up::LocalMesh;
use meshflow_example_echo::pb::{echo_client::EchoClient, StreamRequest};
use nix::sys::signal::Signal;
use tonic::transport::Endpoint;

use crate::common::*;

/// Sends `rate` GETs per second from frontend to backend until `stop`; counts failures.
fn traffic(
    outbound: String,
    rate: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let handle = tokio::spawn(async move {
        let client = via(&outbound);
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            match client.get("http://backend.default/loop").send().await {
                Ok(r) if r.status() == 200 => ok2.fetch_add(1, Ordering::Relaxed),
                Ok(r) => {
                    eprintln!("traffic: status {}", r.status());
                    failed2.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => {
                    eprintln!("traffic: {e}");
                    failed2.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    });
    (ok, failed, handle)
}

/// The serial of the certificate the server at `inbound` presents right now.
async fn server_serial(t: &TestMesh, inbound: &str, workload: &str) -> Option<String> {
    let pki = Pki::mesh(&t.state_dir());
    let leaf = pki.issue(LeafSpec::spiffe(
        "spiffe://cluster.local/ns/default/sa/frontend",
    ));
    let config = client_config(pki.roots(), Some(leaf), &[&rustls::version::TLS13]);
    let tcp = tokio::net::TcpStream::connect(inbound).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(identity_dns(workload)).ok()?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()?;
    let cert = tls.get_ref().1.peer_certificates()?.first()?.clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.raw_serial_as_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_renewal_under_traffic() {
    let t = start_mesh(HELLO, |o| o.leaf_ttl = Some(Duration::from_secs(10)));
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, loop_handle) = traffic(frontend.outbound.clone(), 20, stop.clone());

    // A 30 s server stream through both sidecars.
    let channel = Endpoint::from_shared(format!("http://{}", frontend.outbound))
        .unwrap()
        .origin("http://backend.default".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let stream_task = tokio::spawn(async move {
        let mut stream = EchoClient::new(channel)
            .server_stream(StreamRequest {
                message: "long".into(),
                count: 16,
                interval_ms: 2000,
            })
            .await
            .expect("stream starts")
            .into_inner();
        let mut received = 0;
        while let Some(reply) = stream.message().await.expect("stream survives renewals") {
            received += 1;
            assert_eq!(reply.sequence, received);
        }
        received
    });

    let mut serials: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(31) {
        for (name, w) in [("frontend", &frontend), ("backend", &backend)] {
            if let Some(serial) = server_serial(&t, &w.inbound, name).await {
                serials.entry(name).or_default().insert(serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let received = stream_task.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    loop_handle.await.unwrap();

    assert_eq!(
        received, 16,
        "the 30 s stream (a message every 2 s, default policy) delivered every message"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during renewals"
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 400,
        "the loop ran at ~20 req/s: {}",
        ok.load(Ordering::Relaxed)
    );
    for (name, seen) in &serials {
        assert!(
            seen.len() >= 4,
            "{name}: at least 3 renewals seen as new serials, got {seen:?}"
        );
    }

    // No two CSRs from one sidecar less than 5 s apart (the CA logs every issuance).
    let log = std::fs::read_to_string(t.state_dir().join("logs/control-plane.log")).unwrap();
    let mut issued: BTreeMap<String, Vec<time::OffsetDateTime>> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("issued SVID")) {
        let at = time::OffsetDateTime::parse(
            line.split_whitespace().next().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let identity = line
            .split("identity=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        issued.entry(identity).or_default().push(at);
    }
    assert_eq!(issued.len(), 2, "{issued:?}");
    for (identity, times) in issued {
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= time::Duration::seconds(5),
                "{identity}: CSRs {gap} apart"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_control_plane_outage_and_restart() {
    let mut t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, loop_handle) = traffic(frontend.outbound.clone(), 20, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old_cp = t.mesh.control_plane.clone();
    t.mesh.supervisor.stop("control-plane");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no failures while the control plane is away"
    );
    let mesh_ref: &mut LocalMesh = &mut t.mesh;
    mesh_ref
        .start_control_plane()
        .expect("control plane restarts");
    assert_eq!(t.mesh.control_plane, old_cp, "same address after restart");

    // Both sidecars reconnect.
    let deadline = Instant::now() + Duration::from_secs(5);
    for w in [&frontend, &backend] {
        while metric(
            &metrics(&w.admin).await,
            "meshflow_control_plane_connected",
            &[],
        ) != 1.0
        {
            assert!(Instant::now() < deadline, "{} did not reconnect", w.key);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A mesh file change reaches both sidecars within 2 s.
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for w in [&frontend, &backend] {
            let dump: serde_json::Value =
                serde_json::from_str(&get_text(&w.admin, "/config_dump").await).unwrap();
            v.push(dump["version"].as_u64().unwrap());
        }
        v
    };
    let changed = std::fs::read_to_string(t.mesh_path()).unwrap()
        + "    - name: extra\n      app: { protocol: http1 }\n";
    std::fs::write(t.mesh_path(), changed).unwrap();
    let written = Instant::now();
    for (w, old_version) in [&frontend, &backend].into_iter().zip(before) {
        loop {
            let dump: serde_json::Value =
                serde_json::from_str(&get_text(&w.admin, "/config_dump").await).unwrap();
            let has_extra = dump["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "extra");
            if has_extra && dump["version"].as_u64().unwrap() > old_version {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(2),
                "{}: change not pushed within 2 s: {dump}",
                w.key
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    loop_handle.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "zero failed requests across the outage"
    );
    assert!(ok.load(Ordering::Relaxed) >= 150);
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) follows the parenthesised command name.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 2..];
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_drain_on_sigterm_and_clean_ctrl_c() {
    // A sidecar exits within drain + 2 s of SIGTERM (drain 1 s here).
    let mut t = start_mesh(HELLO, |o| o.drain = Duration::from_secs(1));
    let name = LocalMesh::sidecar_process("default/backend");
    let started = Instant::now();
    t.mesh.supervisor.signal(&name, Signal::SIGTERM);
    let child = t.mesh.supervisor.get_mut(&name).unwrap();
    while child.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "sidecar still running 3 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(t);

    // `meshflow up` leaves nothing behind after Ctrl-C.
    let dir = tempfile::tempdir().unwrap();
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, HELLO).unwrap();
    let mut up = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["up", "-f"])
        .arg(&mesh_path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready_dir = dir.path().join("state/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&ready_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "meshflow up did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let children = children_of(up.id());
    assert!(
        children.len() >= 5,
        "control plane, 2 apps, 2 sidecars: {children:?}"
    );
    let bound: Vec<String> = std::fs::read_dir(&ready_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| meshflow_api::ReadyFile::read(&e.path()))
        .flat_map(|r| r.addresses.into_values())
        .collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    let interrupted = Instant::now();
    while up.try_wait().unwrap().is_none() {
        assert!(
            interrupted.elapsed() < Duration::from_secs(10),
            "Ctrl-C took effect within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in children {
        assert!(!alive(pid), "child {pid} survived Ctrl-C");
    }
    for addr in bound {
        assert!(
            std::net::TcpListener::bind(&addr).is_ok(),
            "{addr} still bound after Ctrl-C"
        );
    }
}
