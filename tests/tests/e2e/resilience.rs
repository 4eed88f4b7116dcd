//! Issue 3: retries, bodies, Retry-After, gRPC statuses, timeouts and deadlines through real
//! sidecars and a fault-injecting upstream (the echo app's `/flaky`, `/sleep`, `flaky:` modes).

use std::time::{Duration, Instant};

use meshflow_example_echo::pb::{echo_client::EchoClient, EchoRequest};
use tonic::transport::Endpoint;

use crate::common::*;

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: resilience }
spec:
  policiesDir: policies
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: shipping
      app: { protocol: grpc, command: ["meshflow-echo", "--name", "shipping", "--listen", "127.0.0.1:{port}"] }
    - name: slow
      app: { protocol: grpc, command: ["meshflow-echo", "--name", "slow", "--listen", "127.0.0.1:{port}"] }
"#;

const POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: shipping }
spec:
  service: shipping
  retries:
    maxAttempts: 2
    retryOn: [gateway-error, unavailable]
    backoff: { base: 10ms, max: 50ms }
  routes:
    - match: { path: { prefix: /opt-in } }
      retries: { maxAttempts: 2, retryOn: [gateway-error], retryNonIdempotent: true, backoff: { base: 10ms, max: 50ms } }
    - match: { path: { exact: /meshflow.echo.v1.Echo/ServerStream } }
      timeouts: { streamIdle: 1s }
    - match: { path: { prefix: /fault-abort } }
      faultInjection: { abort: { percent: 100, status: 418 } }
    - match: { path: { prefix: /fault-delay } }
      faultInjection: { delay: { percent: 100, duration: 300ms } }
---
apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: slow }
spec:
  service: slow
  timeouts: { perAttempt: 200ms }
  retries: { maxAttempts: 2, retryOn: [per-attempt-timeout], backoff: { base: 10ms, max: 20ms } }
  routes:
    - match: { path: { prefix: /deadline } }
      timeouts: { request: 300ms, perAttempt: 1s }
      retries: { maxAttempts: 3, retryOn: [per-attempt-timeout, gateway-error], backoff: { base: 10ms, max: 20ms } }
"#;

fn start_with_policies() -> TestMesh {
    start_dir(MESH, POLICIES, |_| {})
}

async fn attempts(t: &TestMesh, workload: &str, key: &str) -> Vec<serde_json::Value> {
    let app = &t.mesh.workload(workload).app;
    serde_json::from_str::<Vec<serde_json::Value>>(
        &get_text(app, &format!("/__attempts/{key}")).await,
    )
    .unwrap()
}

async fn client_metrics(t: &TestMesh) -> String {
    metrics(&t.mesh.workload("client").admin).await
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_follow_policy_methods_bodies_and_pushback() {
    let t = start_with_policies();
    let client = via(&t.mesh.workload("client").outbound);
    let svc = [("service", "shipping.default")];

    // 1. 503 then 200 on a GET: two attempts, one retry counted.
    let before = metric(
        &client_metrics(&t).await,
        "meshflow_retries_total",
        &[svc[0], ("reason", "status-503")],
    );
    let r = client
        .get("http://shipping.default/flaky/1/503")
        .header("x-test-key", "get")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(attempts(&t, "shipping", "get").await.len(), 2);
    let after = metric(
        &client_metrics(&t).await,
        "meshflow_retries_total",
        &[svc[0], ("reason", "status-503")],
    );
    assert_eq!(after, before + 1.0);

    // 2. POST with a 13-byte chunked body and retryNonIdempotent: both attempts carry the bytes.
    let chunks = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes_of("hello, world!"))]);
    let r = client
        .post("http://shipping.default/opt-in/flaky/1/503")
        .header("x-test-key", "post-opt-in")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = attempts(&t, "shipping", "post-opt-in").await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(|a| a["body"] == "hello, world!"),
        "{seen:?}"
    );

    // 3. The same POST without the opt-in: one attempt, the 503 goes back.
    let r = client
        .post("http://shipping.default/flaky/1/503")
        .header("x-test-key", "post")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(attempts(&t, "shipping", "post").await.len(), 1);

    // 4. With an Idempotency-Key the POST is retried.
    let r = client
        .post("http://shipping.default/flaky/1/503")
        .header("x-test-key", "post-key")
        .header("idempotency-key", "order-7/ship")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = attempts(&t, "shipping", "post-key").await;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|a| a["idempotencyKey"] == "order-7/ship"));

    // 5. An 80 KiB body is over the replay buffer: one attempt, counted as skipped.
    let skipped = metric(
        &client_metrics(&t).await,
        "meshflow_retry_skipped_total",
        &[svc[0], ("reason", "body")],
    );
    let r = client
        .post("http://shipping.default/opt-in/flaky/1/503")
        .header("x-test-key", "big")
        .body(vec![b'a'; 80 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(attempts(&t, "shipping", "big").await.len(), 1);
    let now_skipped = metric(
        &client_metrics(&t).await,
        "meshflow_retry_skipped_total",
        &[svc[0], ("reason", "body")],
    );
    assert_eq!(now_skipped, skipped + 1.0);

    // 6. Retry-After: 2 → retried after ≥ 2 s; 30 → returned at once with the header;
    //    "soon" → default backoff.
    let r = client
        .get("http://shipping.default/flaky/1/503?retry-after=2")
        .header("x-test-key", "ra2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = attempts(&t, "shipping", "ra2").await;
    assert_eq!(seen.len(), 2);
    let gap = seen[1]["atMs"].as_u64().unwrap() - seen[0]["atMs"].as_u64().unwrap();
    assert!(gap >= 2000, "waited {gap} ms for Retry-After: 2");

    let sent = Instant::now();
    let r = client
        .get("http://shipping.default/flaky/1/503?retry-after=30")
        .header("x-test-key", "ra30")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("30")
    );
    assert!(sent.elapsed() < Duration::from_secs(5), "returned at once");
    assert_eq!(attempts(&t, "shipping", "ra30").await.len(), 1);

    let r = client
        .get("http://shipping.default/flaky/1/503?retry-after=soon")
        .header("x-test-key", "rasoon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(attempts(&t, "shipping", "rasoon").await.len(), 2);

    // Fault injection: abort and delay, counted.
    let r = client
        .get("http://shipping.default/fault-abort/x")
        .header("x-test-key", "fa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 418);
    assert!(
        attempts(&t, "shipping", "fa").await.is_empty(),
        "an aborted request never leaves the sidecar"
    );
    let sent = Instant::now();
    let r = client
        .get("http://shipping.default/fault-delay/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "delayed: {:?}",
        sent.elapsed()
    );
    let text = client_metrics(&t).await;
    assert_eq!(
        metric(
            &text,
            "meshflow_fault_injections_total",
            &[svc[0], ("kind", "abort")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "meshflow_fault_injections_total",
            &[svc[0], ("kind", "delay")]
        ),
        1.0
    );

    // 7. gRPC UNAVAILABLE in a Trailers-Only response is retried and succeeds (any method).
    let channel = Endpoint::from_shared(format!("http://{}", t.mesh.workload("client").outbound))
        .unwrap()
        .origin("http://shipping.default".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "flaky:g1:1:14".into(),
        })
        .await
        .expect("retried");
    assert_eq!(reply.into_inner().message, "flaky:g1:1:14");
    assert_eq!(attempts(&t, "shipping", "g1").await.len(), 2);
    let text = client_metrics(&t).await;
    assert!(
        metric(
            &text,
            "meshflow_grpc_responses_total",
            &[svc[0], ("grpc_status", "14")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "meshflow_grpc_responses_total",
            &[svc[0], ("grpc_status", "0")]
        ) >= 1.0,
        "{text}"
    );
}

fn bytes_of(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_per_attempt_request_and_caller_deadlines() {
    let t = start_with_policies();
    let client = via(&t.mesh.workload("client").outbound);

    // perAttempt 200 ms × 2 attempts against a 2 s upstream → 504, both attempts seen, fast.
    let sent = Instant::now();
    let r = client
        .get("http://slow.default/sleep/2000")
        .header("x-test-key", "pa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "answered before the upstream would have: {:?}",
        sent.elapsed()
    );
    let seen = attempts(&t, "slow", "pa").await;
    assert_eq!(seen.len(), 2);
    // The proxy reset the first attempt when its 200 ms ran out (the app saw the cancel).
    let deadline = Instant::now() + Duration::from_secs(2);
    while attempts(&t, "slow", "pa").await[0]["cancelled"] != true {
        assert!(
            Instant::now() < deadline,
            "first attempt never reset: {:?}",
            attempts(&t, "slow", "pa").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // request 300 ms with perAttempt 1 s and 3 attempts → 504 before 1.3 s; no attempt starts
    // after the deadline.
    let sent = Instant::now();
    let r = client
        .get("http://slow.default/deadline/sleep/2000")
        .header("x-test-key", "rq")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        sent.elapsed() < Duration::from_millis(1300),
        "{:?}",
        sent.elapsed()
    );
    let seen = attempts(&t, "slow", "rq").await;
    assert!(!seen.is_empty());
    let first = seen[0]["atMs"].as_u64().unwrap();
    assert!(
        seen.iter()
            .all(|a| a["atMs"].as_u64().unwrap() < first + 300),
        "attempt after the deadline: {seen:?}"
    );

    // meshflow-timeout-ms from the app bounds the request (and is not forwarded).
    let sent = Instant::now();
    let r = client
        .get("http://shipping.default/sleep/2000")
        .header("x-test-key", "mt")
        .header("meshflow-timeout-ms", "300")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        sent.elapsed() < Duration::from_millis(1300),
        "{:?}",
        sent.elapsed()
    );

    // grpc-timeout: 500m from the app → DEADLINE_EXCEEDED by ~0.5 s; the upstream saw less.
    let channel = Endpoint::from_shared(format!("http://{}", t.mesh.workload("client").outbound))
        .unwrap()
        .origin("http://shipping.default".parse().unwrap())
        .connect()
        .await
        .unwrap();
    // A raw gRPC call (tonic would enforce grpc-timeout itself and race the proxy).
    let _ = channel;
    let outbound: std::net::SocketAddr = t.mesh.workload("client").outbound.parse().unwrap();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("shipping.default", outbound)
        .build()
        .unwrap();
    let message = prost::Message::encode_to_vec(&EchoRequest {
        message: "sleep:gt:2000".into(),
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let sent = Instant::now();
    let response = h2
        .post(format!(
            "http://shipping.default:{}/meshflow.echo.v1.Echo/Unary",
            outbound.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "500m")
        .body(frame)
        .send()
        .await
        .expect("gRPC call");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("4"),
        "DEADLINE_EXCEEDED in a Trailers-Only response: {:?}",
        response.headers()
    );
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "{:?}",
        sent.elapsed()
    );
    let seen = attempts(&t, "shipping", "gt").await;
    let forwarded = seen[0]["grpcTimeout"]
        .as_str()
        .expect("grpc-timeout forwarded")
        .to_string();
    let value: u64 = forwarded[..forwarded.len() - 1].parse().unwrap();
    let nanos = match &forwarded[forwarded.len() - 1..] {
        "n" => value,
        "u" => value * 1_000,
        "m" => value * 1_000_000,
        "S" => value * 1_000_000_000,
        other => panic!("unit {other}"),
    };
    assert!(
        nanos < 500_000_000,
        "upstream saw a smaller grpc-timeout: {forwarded}"
    );

    let text = client_metrics(&t).await;
    assert!(
        metric(&text, "meshflow_timeouts_total", &[("kind", "per_attempt")]) >= 2.0,
        "{text}"
    );
    assert!(
        metric(&text, "meshflow_timeouts_total", &[("kind", "request")]) >= 1.0,
        "{text}"
    );
}

const BUDGET_MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: budget }
spec:
  policiesDir: policies
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: broken
      app: { protocol: http1, command: ["meshflow-echo", "--name", "broken", "--always", "503", "--listen", "127.0.0.1:{port}"] }
"#;

const BUDGET_POLICY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: broken }
spec:
  service: broken
  retries:
    maxAttempts: 3
    retryOn: [gateway-error]
    backoff: { base: 1ms, max: 5ms }
    budget: { ratio: 0.2, minPerSecond: 10 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn timing_retry_budget_bounds_retries_against_an_always_failing_upstream() {
    let t = start_dir(BUDGET_MESH, BUDGET_POLICY, |_| {});
    let client = via(&t.mesh.workload("client").outbound);

    const N: u64 = 2000;
    let started = std::time::Instant::now();
    // 2,000 requests in 9 s (one budget window with room to spare)
    let mut tick = tokio::time::interval(Duration::from_micros(4500));
    let mut tasks = Vec::new();
    for _ in 0..N {
        tick.tick().await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get("http://broken.default/x")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut served = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), Ok(503)) {
            served += 1;
        }
    }
    assert_eq!(served, N, "every request got the upstream's 503");
    // The budget allows, per 10 s window, 20 % of the window's requests plus 10/s × 10 s. The
    // traffic fits one window; on a loaded machine the requests and their retries may spill
    // past it, and then each further window may spend its own minimum.
    let windows = (started.elapsed().as_secs_f64() / 10.0).ceil().max(1.0);
    let text = client_metrics(&t).await;
    let retries = metric(
        &text,
        "meshflow_retries_total",
        &[("service", "broken.default")],
    );
    let exhausted = metric(
        &text,
        "meshflow_retry_budget_exhausted_total",
        &[("service", "broken.default")],
    );
    let n = N as f64;
    assert!(
        retries >= 0.15 * n && retries <= 0.2 * n + 100.0 * windows,
        "retries {retries} for {N} requests over {windows} budget windows"
    );
    assert!(exhausted > 0.0, "the budget ran out: {exhausted}");
}

const LB_MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: lb }
spec:
  policiesDir: policies
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: lb-a
      service: lb
      app: { protocol: http1, command: ["meshflow-echo", "--name", "lb-a", "--listen", "127.0.0.1:{port}"] }
    - name: lb-b
      service: lb
      app: { protocol: http1, command: ["meshflow-echo", "--name", "lb-b", "--listen", "127.0.0.1:{port}"] }
    - name: lb-slow
      service: lb
      app: { protocol: http1, command: ["meshflow-echo", "--name", "lb-slow", "--delay-ms", "50", "--listen", "127.0.0.1:{port}"] }
    - name: pair-bad
      service: pair
      app: { protocol: http1, command: ["meshflow-echo", "--name", "pair-bad", "--always", "503", "--listen", "127.0.0.1:{port}"] }
    - name: pair-good
      service: pair
      app: { protocol: http1, command: ["meshflow-echo", "--name", "pair-good", "--listen", "127.0.0.1:{port}"] }
"#;

const LB_POLICY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: lb }
spec:
  service: lb
  loadBalancer: { policy: p2cPeakEwma }
  outlierDetection: { consecutiveFailures: 2, baseEjectionTime: 3s, maxEjectedPercent: 50 }
---
apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: pair }
spec:
  service: pair
  loadBalancer: { policy: roundRobin }
  retries: { maxAttempts: 2, retryOn: [gateway-error], backoff: { base: 1ms, max: 5ms } }
"#;

async fn wait_endpoints(admin: &str, service: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump: serde_json::Value =
            serde_json::from_str(&get_text(admin, "/config_dump").await).unwrap();
        let count = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service)
            .map_or(0, |s| s["endpoints"].as_array().unwrap().len());
        if count == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} never had {n} endpoints (has {count})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_p2c_peak_ewma_avoids_a_slow_endpoint() {
    let t = start_dir(LB_MESH, LB_POLICY, |_| {});
    let client_addr = t.mesh.workload("client").clone();
    wait_endpoints(&client_addr.admin, "lb", 3).await;
    let client = via(&client_addr.outbound);
    let mut handles = Vec::new();
    for worker in 0..8 {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..250 {
                let r = client.get("http://lb.default/x").send().await.unwrap();
                assert_eq!(r.status(), 200, "worker {worker}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let slow = app_requests(&t.mesh.workload("lb-slow").app).await;
    let a = app_requests(&t.mesh.workload("lb-a").app).await;
    let b = app_requests(&t.mesh.workload("lb-b").app).await;
    assert_eq!(a + b + slow, 2000);
    assert!(
        slow < 400,
        "the 50 ms slower endpoint got {slow} of 2000 (a {a}, b {b})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_refusing_endpoint_is_ejected_and_readmitted() {
    let refused_port = meshflow_cli::supervisor::free_port().unwrap();
    let mut t = start_dir(LB_MESH, LB_POLICY, |o| {
        o.skip_sidecars.insert("default/lb-b".into());
    });
    // lb-b's endpoint is registered at a port nobody listens on: connections are refused.
    let lb_b_port = t.mesh.app_ports["default/lb-b"];
    t.mesh
        .spawn_sidecar(
            "default/lb-b",
            lb_b_port,
            &["--advertise".into(), format!("127.0.0.1:{refused_port}")],
        )
        .unwrap();
    t.mesh.wait_sidecar("default/lb-b", lb_b_port).unwrap();
    let client_addr = t.mesh.workload("client").clone();
    wait_endpoints(&client_addr.admin, "lb", 3).await;
    let client = via(&client_addr.outbound);
    let failures = |text: &str| {
        metric(
            text,
            "meshflow_retries_total",
            &[("service", "lb.default"), ("reason", "connect-failure")],
        )
    };

    // Until ejected, a refused connection is retried elsewhere: every request succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &client_metrics(&t).await,
        "meshflow_endpoint_ejections_total",
        &[("service", "lb.default")],
    ) < 1.0
    {
        let r = client.get("http://lb.default/x").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(Instant::now() < deadline, "never ejected");
    }
    // While ejected (3 s) it gets no attempt.
    let before = failures(&client_metrics(&t).await);
    for _ in 0..100 {
        let r = client.get("http://lb.default/y").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        failures(&client_metrics(&t).await),
        before,
        "no attempt on the ejected endpoint"
    );

    // It recovers: a real lb-b sidecar now listens on that port.
    t.mesh
        .supervisor
        .stop(&meshflow_cli::up::LocalMesh::sidecar_process(
            "default/lb-b",
        ));
    t.mesh
        .spawn_sidecar(
            "default/lb-b",
            lb_b_port,
            &["--inbound".into(), format!("127.0.0.1:{refused_port}")],
        )
        .unwrap();
    t.mesh.wait_sidecar("default/lb-b", lb_b_port).unwrap();
    let served = app_requests(&t.mesh.workload("lb-b").app).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app_requests(&t.mesh.workload("lb-b").app).await == served {
        let r = client.get("http://lb.default/z").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            Instant::now() < deadline,
            "recovered endpoint never re-admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const POOL_MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: pool }
spec:
  policiesDir: policies
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: stalled
      app: { protocol: http1, command: ["meshflow-echo", "--name", "stalled", "--listen", "127.0.0.1:{port}"] }
"#;

const POOL_POLICY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: TrafficPolicy
metadata: { name: stalled }
spec:
  service: stalled
  connectionPool: { maxPendingRequests: 10 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn timing_max_pending_requests_sheds_load_at_once() {
    let t = start_dir(POOL_MESH, POOL_POLICY, |_| {});
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://{}", t.mesh.workload("client").outbound)).unwrap(),
        )
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    // 10 requests stall for 5 s; then 40 more arrive.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let client = client.clone();
        stalled.push(tokio::spawn(async move {
            client
                .get("http://stalled.default/sleep/5000")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while app_requests(&t.mesh.workload("stalled").app).await < 10 {
        assert!(
            Instant::now() < deadline,
            "the first 10 never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sidecar = meshflow_cli::up::LocalMesh::sidecar_process("default/client");
    let pid = t_pid(&t, &sidecar);
    let rss_before = rss_kib(pid);
    let sent = Instant::now();
    let mut shed = Vec::new();
    for _ in 0..40 {
        let client = client.clone();
        shed.push(tokio::spawn(async move {
            client
                .get("http://stalled.default/sleep/5000")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut fast_503 = 0;
    for task in shed {
        if matches!(task.await.unwrap(), Ok(503)) {
            fast_503 += 1;
        }
    }
    assert_eq!(fast_503, 40, "every request over the limit got 503");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "shed at once, not after the stall: {:?}",
        sent.elapsed()
    );
    let text = client_metrics(&t).await;
    assert_eq!(
        metric(
            &text,
            "meshflow_pool_overflow_total",
            &[("service", "stalled.default")]
        ),
        40.0
    );
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "sidecar memory stayed bounded: {rss_before} → {rss_after} KiB"
    );
    for task in stalled {
        assert!(matches!(task.await.unwrap(), Ok(200)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_a_stream_silent_longer_than_stream_idle_is_cut_and_counted() {
    let t = start_with_policies();
    let channel = Endpoint::from_shared(format!("http://{}", t.mesh.workload("client").outbound))
        .unwrap()
        .origin("http://shipping.default".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut stream = EchoClient::new(channel)
        .server_stream(meshflow_example_echo::pb::StreamRequest {
            message: "idle".into(),
            count: 3,
            interval_ms: 3000,
        })
        .await
        .expect("stream starts")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("first message")
        .expect("not ended");
    assert_eq!(first.sequence, 1);
    let started = Instant::now();
    let next = stream.message().await;
    assert!(
        next.is_err(),
        "the stream was cut during 3 s of silence: {next:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "cut after streamIdle, not at the next message"
    );
    let text = client_metrics(&t).await;
    assert!(
        metric(
            &text,
            "meshflow_timeouts_total",
            &[("service", "shipping.default"), ("kind", "stream_idle")]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_goes_to_the_other_endpoint() {
    let t = start_dir(LB_MESH, LB_POLICY, |_| {});
    let client_addr = t.mesh.workload("client").clone();
    wait_endpoints(&client_addr.admin, "pair", 2).await;
    let client = via(&client_addr.outbound);
    let mut retried = 0;
    for i in 0..20 {
        let key = format!("pair-{i}");
        let r = client
            .get("http://pair.default/x")
            .header("x-test-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        let bad = attempts(&t, "pair-bad", &key).await.len();
        let good = attempts(&t, "pair-good", &key).await.len();
        assert_eq!(good, 1, "{key}: answered by the good endpoint exactly once");
        assert!(
            bad <= 1,
            "{key}: the failing endpoint was never tried twice"
        );
        retried += bad;
    }
    assert!(
        retried >= 5,
        "round robin sent some first attempts to the failing endpoint: {retried}"
    );
}

fn t_pid(t: &TestMesh, name: &str) -> u32 {
    t.mesh
        .supervisor
        .pids()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .expect("sidecar pid")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
