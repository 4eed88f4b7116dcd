//! Issue 6, traces: sidecar server and client spans, W3C propagation, invalid `traceparent`
//! replaced, the parent's sampling decision honoured, and a workflow run as one trace (also
//! across a coordinator `kill -9`), all exported over OTLP/gRPC to a receiver built on
//! `opentelemetry-proto` (`collector.rs`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::collector::{Collector, SpanRecord, CLIENT, INTERNAL, SERVER};
use crate::common::*;
use crate::workflow::{restart_control_plane, Api, SHOP_MESH, SHOP_POLICIES};

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The `traceparent` the echo app received, split into (trace id, span id, flags).
fn seen_traceparent(echo: &Value) -> (String, String, String) {
    let tp = echo["headers"]["traceparent"][0]
        .as_str()
        .unwrap_or_else(|| panic!("the app got no traceparent: {echo}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert!(
        parts[1].len() == 32
            && parts[1].chars().all(|c| c.is_ascii_hexdigit())
            && parts[1] != "0".repeat(32),
        "invalid trace id in {tp}"
    );
    assert!(
        parts[2].len() == 16
            && parts[2].chars().all(|c| c.is_ascii_hexdigit())
            && parts[2] != "0".repeat(16),
        "invalid span id in {tp}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn one<'a>(
    spans: &'a [SpanRecord],
    what: &str,
    pick: impl Fn(&SpanRecord) -> bool,
) -> &'a SpanRecord {
    let found: Vec<&SpanRecord> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall: {spans:#?}");
    found[0]
}

/// Acceptance 3 (request) and 5: one request through two sidecars is one trace with the
/// client span under the caller's span and the server span under the client span; an invalid
/// `traceparent` is replaced by a fresh valid one; an unsampled parent stays unsampled.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_through_two_sidecars_is_one_trace_and_bad_context_is_replaced() {
    let collector = Collector::start().await;
    let t = start_mesh(HELLO, |o| {
        o.env
            .insert("MESHFLOW_OTLP_ENDPOINT".into(), collector.endpoint.clone());
    });
    let frontend = t.mesh.workload("frontend");
    let client = via(&frontend.outbound);
    let get = |tp: Option<String>| {
        let client = client.clone();
        async move {
            let mut r = client.get("http://backend.default/hello");
            if let Some(tp) = tp {
                r = r.header("traceparent", tp);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };

    // A valid, sampled parent from the calling app.
    let (trace, caller_span) = (random_hex(16), random_hex(8));
    let echo = get(Some(format!("00-{trace}-{caller_span}-01"))).await;
    let (seen_trace, seen_span, flags) = seen_traceparent(&echo);
    assert_eq!(seen_trace, trace, "the trace continues to the app");
    assert_eq!(flags, "01");
    let spans = collector
        .wait_until(Duration::from_secs(15), "client and server span", |all| {
            all.iter().filter(|s| s.trace_id == trace).count() >= 2
        })
        .await;
    let spans: Vec<SpanRecord> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
    let client_span = one(&spans, "client span", |s| s.kind == CLIENT);
    let server_span = one(&spans, "server span", |s| s.kind == SERVER);
    assert_eq!(client_span.service, "frontend");
    assert_eq!(server_span.service, "backend");
    assert_eq!(
        client_span.parent_span_id, caller_span,
        "client span under the caller"
    );
    assert_eq!(
        server_span.parent_span_id, client_span.span_id,
        "server span under the client span"
    );
    assert_eq!(
        seen_span, server_span.span_id,
        "the app's parent is the server span"
    );
    assert_eq!(client_span.name, "GET");
    for s in [client_span, server_span] {
        assert_eq!(s.attributes["http.response.status_code"], "200", "{s:#?}");
        assert!(s.start_ns <= s.end_ns);
    }
    assert_eq!(
        client_span.attributes["meshflow.service"],
        "backend.default"
    );
    assert_eq!(
        server_span.attributes["meshflow.peer.principal"],
        "cluster.local/ns/default/sa/frontend"
    );
    assert!(server_span.start_ns >= client_span.start_ns);

    // `tracestate` (two lines, optional whitespace) travels with the trace to the app.
    let r = client
        .get("http://backend.default/hello")
        .header(
            "traceparent",
            format!("00-{}-{}-01", random_hex(16), random_hex(8)),
        )
        .header("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
        .header("tracestate", "vendor=x")
        .send()
        .await
        .unwrap();
    let echo: Value = r.json().await.unwrap();
    assert_eq!(
        echo["headers"]["tracestate"],
        json!(["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,vendor=x"]),
        "{echo}"
    );

    // Invalid parents: never propagated; the app sees a fresh, valid trace.
    let bogus_trace = "0af7651916cd43dd8448eb211c80319c";
    for bad in [
        format!("00-{}-b7ad6b7169203331-01", bogus_trace.to_uppercase()),
        "00-00000000000000000000000000000000-b7ad6b7169203331-01".to_string(),
        format!("00-{bogus_trace}-0000000000000000-01"),
        format!("ff-{bogus_trace}-b7ad6b7169203331-01"),
        format!("00-{bogus_trace}-b7ad6b7169203331"),
        "not a traceparent".to_string(),
        // Shapes the OpenTelemetry SDK's parser alone would accept.
        "00-1-2-01".to_string(),
        format!("00-{bogus_trace}-b7ad6b7169203331-01-extra"),
    ] {
        let echo = get(Some(bad.clone())).await;
        let (fresh, _, flags) = seen_traceparent(&echo);
        assert_ne!(fresh, bogus_trace, "{bad:?} was propagated");
        assert_ne!(fresh, "0".repeat(32));
        assert_eq!(flags, "01", "default sampling ratio 1.0 samples new roots");
        let spans = collector
            .wait_until(Duration::from_secs(15), "spans of the fresh trace", |all| {
                all.iter().filter(|s| s.trace_id == fresh).count() >= 2
            })
            .await;
        let fresh_spans: Vec<SpanRecord> =
            spans.into_iter().filter(|s| s.trace_id == fresh).collect();
        let root = one(&fresh_spans, "fresh client span", |s| s.kind == CLIENT);
        assert_eq!(
            root.parent_span_id, "",
            "{bad:?}: the client span is a new root"
        );
    }
    assert!(
        collector.spans().iter().all(|s| s.trace_id != bogus_trace),
        "no span carries the invalid trace id"
    );

    // No traceparent at all: a new root, sampled.
    let (fresh, _, _) = seen_traceparent(&get(None).await);
    collector
        .wait_until(Duration::from_secs(15), "spans of a new root", |all| {
            all.iter().any(|s| s.trace_id == fresh && s.kind == SERVER)
        })
        .await;

    // An unsampled parent: propagated as unsampled, and nothing is exported for it.
    let quiet = random_hex(16);
    let echo = get(Some(format!("00-{quiet}-{}-00", random_hex(8)))).await;
    let (seen, _, flags) = seen_traceparent(&echo);
    assert_eq!((seen.as_str(), flags.as_str()), (quiet.as_str(), "00"));
    // A later sampled request's spans arrive; by then the unsampled ones would have too.
    let (after, _, _) = seen_traceparent(&get(None).await);
    collector
        .wait_until(
            Duration::from_secs(15),
            "spans after the unsampled request",
            |all| all.iter().any(|s| s.trace_id == after && s.kind == SERVER),
        )
        .await;
    assert!(
        collector.trace(&quiet).is_empty(),
        "an unsampled parent's decision was overridden"
    );
    let text = metrics(&frontend.admin).await;
    assert!(metric(&text, "meshflow_trace_spans_exported_total", &[]) >= 8.0);
    assert_eq!(
        metric(&text, "meshflow_trace_spans_dropped_total", &[]),
        0.0,
        "{text}"
    );
}

const TRACED_ORDER: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: traced-order, namespace: default }
spec:
  steps:
  - name: reserve
    call: { service: inventory, path: /reservations, body: { sku: "${input.sku}", qty: 1 } }
    compensate: { service: inventory, path: /reservations/release }
  - name: charge
    dependsOn: [reserve]
    call: { service: payment, path: /charges, body: { customer: "c", amount: 5, delayMs: "${input.chargeDelayMs}" } }
    timeouts: { perAttempt: 20s }
    compensate: { service: payment, path: /refunds }
  - name: ship
    dependsOn: [charge]
    call: { service: shipping, path: /shipments, body: { order: "${run.id}", address: "${input.address}" } }
    retry: { maxAttempts: 1 }
    compensate: { service: shipping, path: /shipments/cancel }
"#;

/// Checks that `run_id`'s spans form one trace: a root run span, the step (and
/// compensation) attempt spans under it, and under each attempt the coordinator sidecar's
/// client span with the service sidecar's server span below it. Returns the trace's spans.
async fn check_run_trace(
    collector: &Collector,
    run_id: &str,
    status: &str,
    attempts: &[(&str, bool, &str)],
) -> Vec<SpanRecord> {
    let all = collector
        .wait_until(
            Duration::from_secs(20),
            &format!("trace of run {run_id}"),
            |all| {
                let Some(root) = all.iter().find(|s| {
                    s.attributes.get("meshflow.run_id").map(String::as_str) == Some(run_id)
                        && s.name.starts_with("run ")
                }) else {
                    return false;
                };
                let trace: Vec<&SpanRecord> =
                    all.iter().filter(|s| s.trace_id == root.trace_id).collect();
                attempts.iter().all(|(step, compensation, service)| {
                    trace.iter().any(|a| {
                        a.attributes.get("meshflow.step").map(String::as_str) == Some(*step)
                            && a.attributes
                                .get("meshflow.compensation")
                                .map(String::as_str)
                                == Some(if *compensation { "true" } else { "false" })
                            && trace.iter().any(|c| {
                                c.parent_span_id == a.span_id
                                    && c.kind == CLIENT
                                    && trace.iter().any(|s| {
                                        s.parent_span_id == c.span_id
                                            && s.kind == SERVER
                                            && s.service == *service
                                    })
                            })
                    })
                })
            },
        )
        .await;
    let root = one(&all, "run span", |s| {
        s.attributes.get("meshflow.run_id").map(String::as_str) == Some(run_id)
            && s.name.starts_with("run ")
    })
    .clone();
    assert_eq!(root.parent_span_id, "", "the run span is the root");
    assert_eq!(root.kind, INTERNAL);
    assert_eq!(root.service, "meshflow-coordinator");
    assert_eq!(root.attributes["meshflow.status"], status);
    let trace: Vec<SpanRecord> = all
        .into_iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    for s in &trace {
        if s.attributes.contains_key("meshflow.step") {
            assert_eq!(
                s.parent_span_id, root.span_id,
                "attempt spans are children of the run: {s:#?}"
            );
            assert_eq!(s.attributes["meshflow.run_id"], run_id);
            assert!(s.attributes.contains_key("meshflow.attempt"));
            assert!(
                s.start_ns >= root.start_ns && s.end_ns <= root.end_ns,
                "{s:#?} within {root:#?}"
            );
        }
        if s.kind == CLIENT {
            assert_eq!(s.service, "coordinator", "{s:#?}");
            assert!(
                trace
                    .iter()
                    .any(|a| a.span_id == s.parent_span_id
                        && a.attributes.contains_key("meshflow.step")),
                "a client span outside any attempt: {s:#?}"
            );
        }
    }
    assert!(
        collector
            .spans()
            .iter()
            .filter(|s| s.attributes.get("meshflow.run_id").map(String::as_str) == Some(run_id))
            .all(|s| s.trace_id == root.trace_id),
        "every span of run {run_id} is in one trace"
    );
    trace
}

/// Acceptance 3 (workflow): a completed run, a compensated run, and a run whose charge call
/// was in flight when the coordinator was killed (`kill -9`) are each one trace with run,
/// attempt and sidecar spans correctly parented.
#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_run_is_one_trace_also_across_a_coordinator_restart() {
    let collector = Collector::start().await;
    let mut t = start_dir(SHOP_MESH, SHOP_POLICIES, |o| {
        o.env
            .insert("MESHFLOW_OTLP_ENDPOINT".into(), collector.endpoint.clone());
    });
    let api = Api::new(&t);
    api.register(TRACED_ORDER).await;
    let start = |id: &str, delay: u64, address: &str| {
        json!({
            "workflow": "default/traced-order",
            "runId": id,
            "input": {"sku": "book", "chargeDelayMs": delay, "address": address},
        })
    };
    let (status, body) = api.post("/v1/runs", start("traced-ok", 0, "home")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .post("/v1/runs", start("traced-undo", 0, "nowhere"))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        api.wait_terminal("traced-ok", Duration::from_secs(20))
            .await["status"],
        "Completed"
    );
    assert_eq!(
        api.wait_terminal("traced-undo", Duration::from_secs(20))
            .await["status"],
        "Compensated"
    );
    check_run_trace(
        &collector,
        "traced-ok",
        "Completed",
        &[
            ("reserve", false, "inventory"),
            ("charge", false, "payment"),
            ("ship", false, "shipping"),
        ],
    )
    .await;
    let undo = check_run_trace(
        &collector,
        "traced-undo",
        "Compensated",
        &[
            ("reserve", false, "inventory"),
            ("charge", false, "payment"),
            ("ship", false, "shipping"),
            ("charge", true, "payment"),
            ("reserve", true, "inventory"),
        ],
    )
    .await;
    let ship = one(&undo, "ship attempt", |s| {
        s.attributes.get("meshflow.step").map(String::as_str) == Some("ship")
            && s.attributes["meshflow.compensation"] == "false"
    });
    assert_eq!(ship.status, 2, "the refused shipment's span is an error");

    // The charge call is in flight (3 s in the payment app) when the coordinator dies.
    let (status, body) = api
        .post("/v1/runs", start("traced-crash", 3000, "home"))
        .await;
    assert_eq!(status, 201, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, history) = api.get("/v1/runs/traced-crash/history").await;
        if history.as_array().is_some_and(|h| {
            h.iter()
                .any(|e| e["type"] == "AttemptStarted" && e["step"] == "charge")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "charge never started: {history}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_control_plane(&mut t, None);
    let api = Api::new(&t);
    assert_eq!(
        api.wait_terminal("traced-crash", Duration::from_secs(40))
            .await["status"],
        "Completed"
    );
    let crash = check_run_trace(
        &collector,
        "traced-crash",
        "Completed",
        &[
            ("reserve", false, "inventory"),
            ("charge", false, "payment"),
            ("ship", false, "shipping"),
        ],
    )
    .await;
    // The reserve span was recorded by the first coordinator process, the run span by the
    // second: both in the one trace.
    assert!(crash
        .iter()
        .any(|s| s.attributes.get("meshflow.step").map(String::as_str) == Some("reserve")));
}
