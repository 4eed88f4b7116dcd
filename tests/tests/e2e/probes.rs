//! Issue 14, acceptance 4: kubelet probes rewritten by injection are answered by the proxy's
//! admin listener, which performs the app's original probe on localhost — so STRICT mTLS on the
//! app's port never fails a probe. The pod is injected by the real injection code
//! (`meshflow_policies::inject`), and its `meshflow.io/app-probes` annotation (what the downward
//! API gives the proxy as `MESHFLOW_APP_PROBES`) is handed to a real `meshflow-proxy` of a local
//! mesh; the apps are this test's own servers on 127.0.0.1: an HTTP server that records every
//! request and a gRPC server of `grpc.health.v1.Health`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use meshflow_policies::inject::{self, InjectSettings, Outcome};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::*;

/// A request the recording app saw: request line target and headers (lower-case names).
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP/1.1 app that records every request: `/fail` answers 500, `/slow` answers after 3 s,
/// `/moved` 302, anything else 200.
async fn recording_app() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut lines = text.split("\r\n");
                let mut request_line = lines.next().unwrap_or_default().split(' ');
                let seen = Seen {
                    method: request_line.next().unwrap_or_default().to_string(),
                    target: request_line.next().unwrap_or_default().to_string(),
                    headers: lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect(),
                };
                let path = seen
                    .target
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                record.lock().unwrap().push(seen);
                let status = match path.as_str() {
                    "/fail" => "500 Internal Server Error",
                    "/moved" => "302 Found\r\nlocation: /elsewhere",
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        "200 OK"
                    }
                    _ => "200 OK",
                };
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, seen)
}

/// A gRPC server of `grpc.health.v1.Health/Check` (h2c): SERVING for the services in `serving`,
/// NOT_SERVING for any other; records the service names asked for.
async fn grpc_health_app(serving: &'static [&'static str]) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let record = record.clone();
                    tokio::spawn(async move {
                        let path = request.uri().path().to_string();
                        let mut body = request.into_body();
                        let mut message = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            message.extend_from_slice(&chunk);
                        }
                        // 5-byte gRPC prefix, then HealthCheckRequest { string service = 1 }.
                        let service = match message.get(5..) {
                            Some([0x0a, len, rest @ ..]) => {
                                String::from_utf8_lossy(&rest[..usize::from(*len).min(rest.len())])
                                    .into_owned()
                            }
                            _ => String::new(),
                        };
                        record.lock().unwrap().push(format!("{path} {service}"));
                        let status: u8 = if serving.contains(&service.as_str()) {
                            1
                        } else {
                            2
                        };
                        let response = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(response, false) else {
                            return;
                        };
                        let _ =
                            send.send_data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let _ = send.send_trailers(trailers);
                    });
                }
            });
        }
    });
    (port, asked)
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A GET of `path` on `admin` as the kubelet sends it for the rewritten probe (no headers of
/// the probe's own: they were moved into the annotation); (status, body, time taken).
async fn kubelet_get(admin: &str, path: &str) -> (u16, String, Duration) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nUser-Agent: kube-probe/1.20\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n"
    );
    let started = Instant::now();
    let RawOutcome::Response(text) = raw_tcp(admin, request.as_bytes()).await else {
        panic!("no answer from the admin listener for {path}");
    };
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    (status, body, started.elapsed())
}

fn mesh(port: u16) -> String {
    format!(
        "apiVersion: meshflow.io/v1alpha1\nkind: Mesh\nmetadata: {{ name: probes }}\nspec:\n  \
         workloads:\n    - name: web\n      app: {{ protocol: http1, port: {port} }}\n"
    )
}

/// The pod as its author wrote it: an HTTP app (`app`), a gRPC health server (`health`) and a
/// container whose probe outlasts its timeout (`slow`).
fn pod(http: u16, grpc: u16, closed: u16) -> Pod {
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{ name: web, namespace: default }}
spec:
  containers:
    - name: app
      image: meshflow.invalid/web:1
      ports: [{{ name: http, containerPort: {http} }}]
      livenessProbe:
        httpGet:
          path: /healthz?full=1
          port: http
          httpHeaders: [{{ name: x-probe, value: kubelet }}, {{ name: Host, value: web.example }}]
        timeoutSeconds: 2
      readinessProbe:
        httpGet: {{ path: /fail, port: {http} }}
      startupProbe:
        tcpSocket: {{ port: http }}
    - name: health
      image: meshflow.invalid/health:1
      livenessProbe:
        grpc: {{ port: {grpc}, service: meshflow.echo }}
      readinessProbe:
        grpc: {{ port: {grpc}, service: payments }}
      startupProbe:
        tcpSocket: {{ port: {closed} }}
    - name: slow
      image: meshflow.invalid/slow:1
      livenessProbe:
        httpGet: {{ path: /slow, port: {http} }}
        timeoutSeconds: 1
      readinessProbe:
        httpGet: {{ path: /moved, port: {http} }}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rewritten_probes_are_answered_under_strict_with_the_apps_original_probe() {
    let (http_port, seen) = recording_app().await;
    let (grpc_port, asked) = grpc_health_app(&["meshflow.echo"]).await;
    let closed = closed_port();

    // Injected by the injection code itself: the probes the kubelet will run, and the
    // annotation the proxy reads through the downward API.
    let labels = BTreeMap::from([(inject::INJECT.to_string(), inject::ENABLED.to_string())]);
    let injected = inject::inject(
        &pod(http_port, grpc_port, closed),
        &labels,
        &InjectSettings::default(),
        false,
    )
    .unwrap();
    assert_eq!(injected.outcome, Outcome::Injected);
    let pod = serde_json::to_value(&injected.pod).unwrap();
    let annotation = pod["metadata"]["annotations"][inject::APP_PROBES]
        .as_str()
        .unwrap()
        .to_string();
    let proxy = &pod["spec"]["containers"][0];
    assert_eq!(proxy["name"], inject::PROXY_CONTAINER);
    let env = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MESHFLOW_APP_PROBES")
        .expect("the proxy gets the original probes");
    assert_eq!(
        env["valueFrom"]["fieldRef"]["fieldPath"],
        format!("metadata.annotations['{}']", inject::APP_PROBES)
    );
    // What the kubelet will ask for, by container and probe.
    let mut kubelet_paths: BTreeMap<(String, &str), String> = BTreeMap::new();
    for container in pod["spec"]["containers"].as_array().unwrap().iter().skip(1) {
        for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if container[field].is_null() {
                continue;
            }
            let probe = &container[field]["httpGet"];
            assert_eq!(probe["port"], 15020, "{container}");
            assert!(probe["httpHeaders"].is_null(), "{container}");
            kubelet_paths.insert(
                (container["name"].as_str().unwrap().to_string(), field),
                probe["path"].as_str().unwrap().to_string(),
            );
        }
    }
    let path =
        |container: &str, field: &str| kubelet_paths[&(container.to_string(), field)].clone();

    // A mesh whose `web` workload is the recording app, its sidecar given the annotation. No
    // PeerAuthentication: STRICT.
    let mut t = start_mesh(&mesh(http_port), |o| {
        o.skip_sidecars.insert("default/web".into());
    });
    t.mesh
        .spawn_sidecar(
            "default/web",
            http_port,
            &["--app-probes".to_string(), annotation.clone()],
        )
        .unwrap();
    let web = t.mesh.wait_sidecar("default/web", http_port).unwrap();
    let admin = web.admin.clone();

    // STRICT: plaintext to the app's (inbound) port is closed before any request is read.
    let plaintext = raw_tcp(
        &web.inbound,
        b"GET /healthz HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !matches!(&plaintext, RawOutcome::Response(r) if r.starts_with("HTTP/1.1 200")),
        "STRICT answered plaintext: {plaintext:?}"
    );
    assert!(seen.lock().unwrap().is_empty(), "plaintext reached the app");

    // HTTP: answered, and the app got the original path and headers (the probe's Host).
    let (status, body, _) = kubelet_get(&admin, &path("app", "livenessProbe")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("statuscode: 200"), "{body}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.target, "/healthz?full=1");
    assert_eq!(request.header("x-probe"), ["kubelet"]);
    assert_eq!(request.header("host"), ["web.example"]);
    assert_eq!(request.header("user-agent"), ["kube-probe/1.20"]);
    assert_eq!(request.header("accept"), ["*/*"]);
    assert!(
        request.header("x-forwarded-client-cert").is_empty(),
        "a probe is not a mesh request: {request:?}"
    );

    // A failing app probe (500) is 503; a redirect is a success, as the kubelet judges it.
    let (status, body, _) = kubelet_get(&admin, &path("app", "readinessProbe")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("statuscode: 500"), "{body}");
    let (status, body, _) = kubelet_get(&admin, &path("slow", "readinessProbe")).await;
    assert_eq!(status, 200, "{body}");
    // An app slower than the probe's timeoutSeconds (1) fails within about that time.
    let (status, body, took) = kubelet_get(&admin, &path("slow", "livenessProbe")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("timed out"), "{body}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered in {took:?}"
    );

    // TCP: a listening port succeeds, a closed one fails.
    let (status, body, _) = kubelet_get(&admin, &path("app", "startupProbe")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = kubelet_get(&admin, &path("health", "startupProbe")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&closed.to_string()), "{body}");

    // gRPC: grpc.health.v1.Health/Check with the probe's service; SERVING succeeds.
    let (status, body, _) = kubelet_get(&admin, &path("health", "livenessProbe")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = kubelet_get(&admin, &path("health", "readinessProbe")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NOT_SERVING"), "{body}");
    assert_eq!(
        *asked.lock().unwrap(),
        [
            "/grpc.health.v1.Health/Check meshflow.echo",
            "/grpc.health.v1.Health/Check payments"
        ]
    );

    // Only what the pod declared: no open proxy to other containers, probes or paths.
    let before = seen.lock().unwrap().len();
    for unknown in [
        "/app-health/nope/livez",
        "/app-health/app/other",
        "/app-health/app/livez/../readyz",
        "/app-health/",
    ] {
        let (status, body, _) = kubelet_get(&admin, unknown).await;
        assert_eq!(status, 404, "{unknown}: {body}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "an unknown path probed the app"
    );

    // The proxy's own endpoints are unchanged.
    assert_eq!(kubelet_get(&admin, "/ready").await.0, 200);
    let dump: Value = serde_json::from_str(&get_text(&admin, "/config_dump").await).unwrap();
    assert_eq!(dump["settings"]["app_probes"], annotation);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_without_probes_serves_none_and_refuses_an_unusable_annotation() {
    let (http_port, seen) = recording_app().await;
    let mut t = start_mesh(&mesh(http_port), |o| {
        o.skip_sidecars.insert("default/web".into());
    });
    // An annotation the proxy cannot run stops it at start, naming the problem (exit 64).
    t.mesh
        .spawn_sidecar(
            "default/web",
            http_port,
            &[
                "--app-probes".to_string(),
                r#"{"/app-health/app/livez": {"httpGet": {"port": "http"}}}"#.to_string(),
            ],
        )
        .unwrap();
    let name = meshflow_cli::up::LocalMesh::sidecar_process("default/web");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = t
            .mesh
            .supervisor
            .get_mut(&name)
            .and_then(|c| c.child.try_wait().unwrap())
        {
            break status;
        }
        assert!(Instant::now() < deadline, "the sidecar started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(64));
    let log = process_logs(&t.state_dir());
    assert!(
        log.contains("--app-probes (MESHFLOW_APP_PROBES): \"/app-health/app/livez\".httpGet.port"),
        "{log}"
    );
    t.mesh.supervisor.stop(&name);

    // Empty (a pod without probes: the downward API gives ""): every app-health path is 404.
    t.mesh
        .spawn_sidecar(
            "default/web",
            http_port,
            &["--app-probes".to_string(), String::new()],
        )
        .unwrap();
    let web = t.mesh.wait_sidecar("default/web", http_port).unwrap();
    let (status, _, _) = kubelet_get(&web.admin, "/app-health/app/livez").await;
    assert_eq!(status, 404);
    assert!(seen.lock().unwrap().is_empty());
}
