//! Micro-benchmarks of the sidecar's per-request work, each as it is now ("compiled") and as
//! it was before the compiled routes and the shared admission function ("legacy": the same
//! steps the request path used to take, from the public APIs that remain):
//!
//! - `outbound_route/{legacy,compiled}/<services>`: from the request's authority to a chosen
//!   endpoint with its plan, retry budget, pending-request slot and metric handles, in a
//!   snapshot of 1, 10 or 100 services (3 endpoints each).
//! - `inbound_admission/{legacy,compiled}/<policies>`: path normalization, JWT and
//!   AuthorizationPolicy for a request with 8 headers, against 0, 1, 10 or 100 policies (the
//!   matching one last).
//!
//! `cargo bench -p meshflow-proxy --bench hot_path`; criterion prints the times (and keeps
//! them under target/criterion). Figures are per call on this machine, comparable only
//! within one run.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshflow_api::v1;
use meshflow_policies::admission::{admit, InboundPolicies, InboundRequest, Peer};
use meshflow_policies::authn::{Authenticator, MtlsMode};
use meshflow_policies::authz::{authorize, AuthorizationPolicy, RequestAttributes};
use meshflow_policies::documents::PolicySet;
use meshflow_policies::headers::admitted_headers;
use meshflow_policies::path::{normalize_host, normalize_path};
use meshflow_proxy::config::ConfigSnapshot;
use meshflow_proxy::outbound::plan::{AttemptPlan, OutstandingSlot};
use meshflow_proxy::outbound::route::RouteTable;
use meshflow_proxy::outbound::routing::{parse_authority, with_service};
use meshflow_proxy::outbound::OutboundState;
use meshflow_proxy::shared::Shared;

fn ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("ca").pem()
}

fn snapshot(services: usize) -> v1::Snapshot {
    v1::Snapshot {
        version: 1,
        spiffe_id: "spiffe://cluster.local/ns/default/sa/client".into(),
        services: (0..services)
            .map(|i| v1::Service {
                name: format!("svc-{i}"),
                namespace: "default".into(),
                protocol: "http1".into(),
                endpoints: (0..3)
                    .map(|e| v1::Endpoint {
                        address: format!("127.0.{i}.{}:15006", e + 1),
                        identity: format!("spiffe://cluster.local/ns/default/sa/svc-{i}"),
                        workload: format!("default/svc-{i}-{e}"),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn outbound_route(c: &mut Criterion) {
    let shared = Shared::standalone("default/client", &ca_pem()).expect("shared");
    let state = OutboundState::default();
    let mut group = c.benchmark_group("outbound_route");
    for services in [1usize, 10, 100] {
        let snap =
            Arc::new(ConfigSnapshot::from_proto(snapshot(services), 8080).expect("snapshot"));
        let routes = RouteTable::compile(snap.clone(), &state);
        let authority = format!("svc-{}.default:80", services - 1);
        let header = |_: &str| -> Option<&str> { None };
        group.bench_with_input(BenchmarkId::new("legacy", services), &services, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                let name = parse_authority(black_box(&authority), "default").unwrap();
                let key = (name.name, name.namespace);
                let service = snap.services.get(&key).unwrap();
                let label = format!("{}.{}", key.0, key.1);
                shared.init_service_metrics(&label);
                let plan = AttemptPlan::resolve(
                    snap.traffic.get(&key).map(|p| p.as_ref()),
                    "GET",
                    "/",
                    header,
                );
                let budget = state.budgets.get(&label, plan.budget);
                budget.record_request(now);
                let slot = state.outstanding.try_acquire(&label, None);
                let (endpoint, stats) = state
                    .balancer
                    .pick(
                        &service.endpoints,
                        plan.load_balancer,
                        &[],
                        100,
                        None,
                        now,
                        || 0.5,
                    )
                    .unwrap();
                let gauge = shared
                    .metrics
                    .endpoint_in_flight
                    .with_label_values(&[&label, &endpoint.address]);
                gauge.inc();
                shared.metrics.attempts.with_label_values(&[&label]).inc();
                gauge.dec();
                black_box((slot, stats, endpoint.identity.dns_name()))
            })
        });
        group.bench_with_input(BenchmarkId::new("compiled", services), &services, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                let route = with_service(black_box(&authority), "default", |n, ns| {
                    routes.get(n, ns).cloned()
                })
                .flatten()
                .unwrap();
                let plan = route.plan("GET", "/", header);
                route.budget.record_request(now);
                let slot = OutstandingSlot::acquire(&route.outstanding, None);
                let endpoint = state
                    .balancer
                    .pick_by(
                        &route.endpoints,
                        |e| (e.endpoint.address.as_str(), &e.stats),
                        plan.load_balancer,
                        |_| false,
                        100,
                        None,
                        now,
                        || 0.5,
                    )
                    .unwrap();
                let gauge = endpoint.in_flight_gauge(&route, &shared);
                gauge.inc();
                route.attempts(&shared).inc();
                gauge.dec();
                black_box((slot, endpoint.server_name.len()))
            })
        });
    }
    group.finish();
}

fn policies(n: usize) -> Vec<AuthorizationPolicy> {
    let mut set = PolicySet::default();
    for i in 0..n {
        let yaml = format!(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{ name: p{i}, namespace: default }}
spec:
  action: ALLOW
  rules:
    - from: [{{ source: {{ principals: [cluster.local/ns/default/sa/caller-{i}] }} }}]
      to: [{{ operation: {{ methods: [GET], paths: [/api/{i}/*] }} }}]
"
        );
        set.add_file(Path::new("p.yaml"), &yaml).expect("policy");
    }
    set.authorization
}

fn inbound_admission(c: &mut Criterion) {
    let mut group = c.benchmark_group("inbound_admission");
    let mut header_map = http::HeaderMap::new();
    for (name, value) in [
        ("host", "backend.default:8080"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("x-request-id", "7f3a2c1e-9b8d-4c6f-a1e2-3d4c5b6a7f80"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("accept-encoding", "gzip"),
        ("x-tenant", "acme"),
    ] {
        header_map.insert(name, value.parse().unwrap());
    }
    let none = Authenticator::default();
    let xfcc = "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/caller-0";
    for n in [0usize, 1, 10, 100] {
        let set = policies(n);
        let principal = format!("cluster.local/ns/default/sa/caller-{}", n.saturating_sub(1));
        let path = format!("/api/{}/items", n.saturating_sub(1));
        group.bench_with_input(BenchmarkId::new("legacy", n), &n, |b, _| {
            b.iter(|| {
                let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (name, value) in &header_map {
                    headers
                        .entry(name.as_str().to_string())
                        .or_default()
                        .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
                }
                let normalized = normalize_path(black_box(&path)).unwrap();
                let headers = admitted_headers(&headers, Some(xfcc.to_string()));
                let attributes = RequestAttributes {
                    principal: Some(principal.clone()),
                    source_namespace: Some("default".into()),
                    host: normalize_host("backend.default:8080"),
                    port: 8080,
                    method: "GET".into(),
                    path: normalized,
                    headers,
                    ..Default::default()
                };
                black_box(authorize(set.iter(), &attributes).allowed)
            })
        });
        group.bench_with_input(BenchmarkId::new("compiled", n), &n, |b, _| {
            b.iter(|| {
                let headers = || {
                    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (name, value) in &header_map {
                        map.entry(name.as_str().to_string())
                            .or_default()
                            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
                    }
                    map
                };
                let request = InboundRequest {
                    peer: Some(Peer {
                        principal: &principal,
                        namespace: "default",
                        xfcc,
                    }),
                    method: "GET",
                    path: black_box(&path),
                    query: "",
                    target_has_fragment: false,
                    host: "backend.default:8080",
                    port: 8080,
                    source_ip: None,
                    headers: &headers,
                };
                let policies = InboundPolicies {
                    mtls: (MtlsMode::Strict, None),
                    authenticator: &none,
                    authorization: set.iter(),
                };
                black_box(admit(&request, &policies))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = outbound_route, inbound_admission
}
criterion_main!(hot_path);
