//! The training workload of `scripts/build-pgo-proxy` (not a test, not a benchmark): it drives a
//! mix of mesh traffic through sidecars built with `-Cprofile-generate`, so the profile-guided
//! build of `meshflow-proxy` is optimized for what a sidecar does in production rather than for
//! one benchmark's traffic.
//!
//! A local mesh (`meshflow up`'s supervisor) of three echo workloads: `client`, `web` (an
//! HTTP/1.1 app, no policy) and `backend` (a gRPC app, which also serves HTTP/1.1 and h2c,
//! selected by a DENY AuthorizationPolicy on paths and an ALLOW one on principal, methods,
//! paths and a request header). Every call leaves through `client`'s outbound sidecar and crosses mTLS
//! (HTTP/2) to the target's inbound sidecar. For `--seconds` (default 60), closed loops run
//! side by side — the numbers are loops of each kind:
//!
//! | loops | kind |
//! |---|---|
//! | 6 | HTTP/1.1 keep-alive `GET` to `web` (the shape of `bench/mesh-compare`) |
//! | 1 | HTTP/1.1 `POST` of 8 KiB to `web` |
//! | 2 | HTTP/1.1 `GET` to `backend`, allowed by principal and by an `x-tenant` header |
//! | 1 | HTTP/1.1 `GET` to `backend`, denied (403) by the DENY policy (`/admin`) or by no ALLOW rule matching (`/private`), paced to about 2 % of the calls |
//! | 2 | h2c (prior knowledge) `GET` to `backend` |
//! | 3 | gRPC unary to `backend`, one in 16 answering with an error status (`UNAVAILABLE`) in trailers |
//! | 1 | gRPC server streaming, 4 messages |
//!
//! In a 60 s run on 2 cores (about 450k calls) they split 60 % HTTP/1.1 `GET` to `web`, 8 % `POST`s,
//! 9 % allowed and 2 % denied HTTP/1.1 to `backend`, 8 % h2c, 11 % gRPC unary and 2 % gRPC
//! streams. Each call has 10 s to finish.
//!
//! The processes are found next to this executable (`scripts/build-pgo-proxy` copies the
//! instrumented `meshflow-proxy` there). Prints the calls of each kind and exits non-zero when a
//! kind never got its expected answer or more than 1 % of calls got another: a profile of
//! error paths would optimize the wrong code. Run: `<executable> [--seconds N]`.

#[path = "../tests/e2e/common.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshflow_example_echo::pb::{echo_client::EchoClient, EchoRequest, StreamRequest};

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: pgo-training }
spec:
  policiesDir: policies
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: web
      app: { protocol: http1, command: ["meshflow-echo", "--name", "web", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      labels: { app: backend }
      app: { protocol: grpc, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
"#;

const POLICIES: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin", "/admin/*"] } }]
---
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: client-only, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/default/sa/client"] } }]
    to: [{ operation: { methods: ["GET", "POST"], paths: ["/orders/*", "/admin", "/meshflow.echo.v1.Echo/*"] } }]
  - to: [{ operation: { paths: ["/tenant/*"] } }]
    when:
    - key: request.headers[x-tenant]
      values: ["acme", "globex"]
"#;

/// How long one call (request and whole response) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls of one kind: how many got the expected answer, how many another, and the first other.
#[derive(Default)]
struct Tally {
    expected: AtomicU64,
    other: AtomicU64,
    first_other: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn count(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.expected.fetch_add(1, Ordering::Relaxed);
            }
            Err(what) => {
                self.other.fetch_add(1, Ordering::Relaxed);
                self.first_other
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(what);
            }
        }
    }
}

/// `Ok` when `response` has status `want` and its whole body arrives.
async fn expect_status(
    response: reqwest::Result<reqwest::Response>,
    want: u16,
) -> Result<(), String> {
    let response = response.map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("body failed: {e}"))?;
    if status == want {
        Ok(())
    } else {
        Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    }
}

fn seconds() -> u64 {
    let mut args = std::env::args().skip(1);
    let mut seconds = 60;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            // `cargo bench` passes `--bench`.
            "--bench" => {}
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s| s > 0)
                    .unwrap_or_else(|| {
                        eprintln!("pgo_training: --seconds takes a whole number above 0");
                        std::process::exit(2)
                    })
            }
            other => {
                eprintln!(
                    "pgo_training: unknown argument {other:?}; usage: pgo_training [--seconds N]"
                );
                std::process::exit(2)
            }
        }
    }
    seconds
}

/// Runs `call` in `loops` closed loops until `stop`, counting into a new tally named `kind`.
fn spawn_loops<F, Fut>(
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    tallies: &mut Vec<(&'static str, Arc<Tally>)>,
    stop: &Arc<AtomicBool>,
    kind: &'static str,
    loops: usize,
    call: F,
) where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let tally = Arc::new(Tally::default());
    tallies.push((kind, tally.clone()));
    for lane in 0..loops {
        let (call, tally, stop) = (call.clone(), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = lane as u64;
            while !stop.load(Ordering::Relaxed) {
                tally.count(call(i).await);
                i += loops as u64;
            }
        }));
    }
}

fn main() {
    let seconds = seconds();
    // Started on the main thread, which outlives the run: the supervisor's children die with
    // the thread that spawned them (PR_SET_PDEATHSIG), and tokio ends idle blocking threads.
    // A sidecar writes its profile when it exits; the default drain leaves it time to exit
    // before the supervisor's SIGKILL.
    let mut mesh = common::start_dir(MESH, POLICIES, |options| {
        options.drain = Duration::from_secs(1)
    });
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let failed = runtime.block_on(drive(&mesh, seconds));
    drop(runtime);
    // A process that exited during the run (a sidecar crash) fails it, with the logs to say why.
    let problem = match mesh.mesh.check_running() {
        Err(exited) => Some(exited.to_string()),
        Ok(()) if failed => Some(
            "a kind of call failed (see the table): the profile would be of error paths".into(),
        ),
        Ok(()) => None,
    };
    let logs = problem
        .is_some()
        .then(|| common::process_logs(&mesh.state_dir()));
    // Dropping the mesh stops the sidecars with SIGTERM (they write their profiles on exit) and
    // removes its state directory.
    drop(mesh);
    if let Some(problem) = problem {
        eprintln!(
            "pgo_training: {problem}. The mesh's process logs:\n{}",
            logs.unwrap_or_default()
        );
        std::process::exit(1);
    }
}

/// Drives the traffic mix through `mesh` for `seconds`, prints the table; true when a kind
/// failed.
async fn drive(mesh: &common::TestMesh, seconds: u64) -> bool {
    let outbound = mesh.mesh.workload("client").outbound.clone();
    let outbound_addr: std::net::SocketAddr = outbound.parse().expect("outbound address");
    eprintln!("pgo_training: mesh up (client outbound {outbound}); {seconds} s of traffic");

    let h1 = reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .http1_only()
        .pool_max_idle_per_host(32)
        .build()
        .expect("HTTP/1.1 client");
    let h2c = reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .http2_prior_knowledge()
        .resolve("backend.default", outbound_addr)
        .build()
        .expect("h2c client");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .expect("gRPC endpoint")
        .origin("http://backend.default".parse().expect("origin"))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("gRPC channel");

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut tallies = Vec::new();

    // HTTP/1.1 calls name the service in `Host`; h2c ones in the URL (`:authority`, which
    // must agree with any `host` header, RFC 9113 §8.3.1).
    let get = |client: reqwest::Client, url: String, host: Option<&'static str>, want: u16| {
        move |i: u64| {
            let mut request = client.get(format!("{url}{i}")).header(
                "x-tenant",
                if i.is_multiple_of(2) {
                    "acme"
                } else {
                    "globex"
                },
            );
            if let Some(host) = host {
                request = request.header("host", host);
            }
            async move { expect_status(request.send().await, want).await }
        }
    };
    let base = format!("http://{outbound}");
    for (kind, loops, path, host) in [
        ("http1 GET web", 6, "/items/", "web.default"),
        (
            "http1 GET backend (principal)",
            1,
            "/orders/",
            "backend.default",
        ),
        (
            "http1 GET backend (header)",
            1,
            "/tenant/",
            "backend.default",
        ),
    ] {
        let call = get(h1.clone(), format!("{base}{path}"), Some(host), 200);
        spawn_loops(&mut tasks, &mut tallies, &stop, kind, loops, call);
    }
    let (client, url) = (h1.clone(), format!("{base}/upload"));
    spawn_loops(
        &mut tasks,
        &mut tallies,
        &stop,
        "http1 POST 8 KiB web",
        1,
        move |_| {
            let request = client
                .post(&url)
                .header("host", "web.default")
                .body(vec![b'x'; 8192]);
            async move { expect_status(request.send().await, 200).await }
        },
    );
    spawn_loops(
        &mut tasks,
        &mut tallies,
        &stop,
        "http1 GET backend denied (403)",
        1,
        {
            let deny = get(
                h1.clone(),
                format!("{base}/admin?"),
                Some("backend.default"),
                403,
            );
            let unmatched = get(
                h1.clone(),
                format!("{base}/private/"),
                Some("backend.default"),
                403,
            );
            move |i: u64| {
                let call = (deny.clone(), unmatched.clone());
                async move {
                    // Paced: a denial is cheap, an unpaced loop would be a fifth of the calls.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if i.is_multiple_of(2) {
                        call.0(i).await
                    } else {
                        call.1(i).await
                    }
                }
            }
        },
    );
    spawn_loops(
        &mut tasks,
        &mut tallies,
        &stop,
        "h2c GET backend",
        2,
        get(
            h2c,
            format!("http://backend.default:{}/orders/", outbound_addr.port()),
            None,
            200,
        ),
    );
    let echo = EchoClient::new(channel);
    let unary = echo.clone();
    spawn_loops(&mut tasks, &mut tallies, &stop, "grpc unary", 3, move |i| {
        let mut echo = unary.clone();
        async move {
            // One call in 16 asks for UNAVAILABLE: the status travels in trailers.
            let fail = i.is_multiple_of(16);
            let message = if fail {
                "fail:14".to_string()
            } else {
                format!("m{i}")
            };
            match echo.unary(EchoRequest { message }).await {
                Ok(reply) if !fail && reply.get_ref().message == format!("m{i}") => Ok(()),
                Err(status) if fail && status.code() == tonic::Code::Unavailable => Ok(()),
                Ok(reply) => Err(format!("reply {:?}", reply.into_inner().message)),
                Err(status) => Err(format!("status {status}")),
            }
        }
    });
    spawn_loops(
        &mut tasks,
        &mut tallies,
        &stop,
        "grpc server stream",
        1,
        move |_| {
            let mut echo = echo.clone();
            async move {
                let request = StreamRequest {
                    message: "s".into(),
                    count: 4,
                    interval_ms: 0,
                };
                let mut stream = echo
                    .server_stream(request)
                    .await
                    .map_err(|status| format!("status {status}"))?
                    .into_inner();
                let mut messages = 0;
                while stream
                    .message()
                    .await
                    .map_err(|status| format!("status {status}"))?
                    .is_some()
                {
                    messages += 1;
                }
                if messages == 4 {
                    Ok(())
                } else {
                    Err(format!("{messages} messages, expected 4"))
                }
            }
        },
    );

    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    // Every call has a timeout, so the loops end within one of it; abort what has not.
    let all = futures::future::join_all(tasks.iter_mut());
    if tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), all)
        .await
        .is_err()
    {
        tasks.iter().for_each(|task| task.abort());
    }
    let mut failed = false;
    println!("{:<32} {:>10} {:>8}", "kind", "expected", "other");
    for (kind, tally) in &tallies {
        let expected = tally.expected.load(Ordering::Relaxed);
        let other = tally.other.load(Ordering::Relaxed);
        let first = tally
            .first_other
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|what| format!("  first other: {what}"))
            .unwrap_or_default();
        println!("{kind:<32} {expected:>10} {other:>8}{first}");
        if expected == 0 || other * 100 > expected + other {
            failed = true;
        }
    }
    failed
}
