//! Benchmark (not a test): the Kubernetes-mode control plane at scale — its memory and how long
//! it takes to publish the whole cluster — with (by default) 1,000 pods made Ready with distinct
//! IPs, 200 Services selecting 5 pods each and 500 meshflow policies (AuthorizationPolicies,
//! TrafficPolicies, PeerAuthentications, RequestAuthentications with inline JWKS), all created
//! through the API with bounded concurrency, spread over labelled namespaces.
//!
//! Run with `bench/kube-scale [--pods N] [--services N] [--policies N] …`: the script starts a
//! dev cluster of its own (`scripts/dev-cluster`), applies the CRDs and passes `--run-dir`
//! (where the cluster's pid files are) and `--out` (the JSON result). Phases:
//!
//! 1. **empty** — control plane A starts on the labelled but empty namespaces;
//! 2. **populate** — everything is created while A watches: the time until A's `/config_dump`
//!    holds every workload and endpoint, and until every CR has `Accepted=True` for its
//!    generation, A's CPU time and how many models it published;
//! 3. **churn** — `--churn` pods (one per Service) turn NotReady, then Ready again;
//! 4. **cold** — A stops, every CR's status is cleared, control plane B starts over the full
//!    cluster: start → ready file, → full model, → all statuses;
//! 5. **reflectors only** — control plane C starts with a discovery selector no namespace has:
//!    it still watches (and stores) every pod, Service, EndpointSlice and CR of the cluster
//!    but builds an empty model, which splits B's memory into stores and model.
//!
//! Memory is VmRSS/VmHWM from `/proc/<pid>/status` and Pss/USS (private clean + dirty) and
//! anonymous memory from `/proc/<pid>/smaps_rollup`; apiserver, etcd and controller-manager RSS
//! are read through the run directory's pid files. The namespaces are deleted at the end.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{
    Namespace, Node, Pod, Service, ServiceAccount as KubeServiceAccount,
};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::{json, Value};

/// The fake Node pods are bound to (no kubelet behind it).
const NODE: &str = "meshflow-bench-node";
/// The label the bench's namespaces carry; the control plane's discovery selector is on it.
const LABEL: &str = "meshflow.io/bench";
/// The meshflow custom-resource kinds the bench creates: (kind, plural).
const KINDS: [(&str, &str); 4] = [
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("TrafficPolicy", "trafficpolicies"),
    ("PeerAuthentication", "peerauthentications"),
    ("RequestAuthentication", "requestauthentications"),
];
/// How long any one convergence may take before the bench gives up.
const CONVERGE: Duration = Duration::from_secs(600);
/// The interval `/config_dump` and the CR statuses are polled at.
const POLL: Duration = Duration::from_millis(250);

const USAGE: &str = "kube_scale [--pods 1000] [--services 200] [--policies 500] \
[--namespaces 10] [--concurrency 16] [--churn 100] [--run-dir DIR] [--out FILE] [--keep]";

#[derive(Debug, Clone)]
struct Args {
    pods: usize,
    services: usize,
    policies: usize,
    namespaces: usize,
    concurrency: usize,
    churn: usize,
    run_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    /// Leave the namespaces (and the objects) in the cluster.
    keep: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        pods: 1000,
        services: 200,
        policies: 500,
        namespaces: 10,
        concurrency: 16,
        churn: 100,
        run_dir: None,
        out: None,
        keep: false,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < raw.len() {
        let flag = raw[i].as_str();
        if flag == "--bench" {
            i += 1;
            continue;
        }
        if flag == "--keep" {
            args.keep = true;
            i += 1;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = raw
            .get(i + 1)
            .unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
        let number = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} {value}: not a number\n{USAGE}"))
        };
        match flag {
            "--pods" => args.pods = number(),
            "--services" => args.services = number(),
            "--policies" => args.policies = number(),
            "--namespaces" => args.namespaces = number(),
            "--concurrency" => args.concurrency = number(),
            "--churn" => args.churn = number(),
            "--run-dir" => args.run_dir = Some(value.into()),
            "--out" => args.out = Some(value.into()),
            _ => panic!("unknown argument {flag}\n{USAGE}"),
        }
        i += 2;
    }
    assert!(
        args.services > 0 && args.namespaces > 0 && args.concurrency > 0,
        "--services, --namespaces and --concurrency must be positive"
    );
    assert!(
        args.pods >= args.services,
        "--pods must be at least --services (every Service selects at least one pod)"
    );
    assert!(args.churn <= args.pods, "--churn must not exceed --pods");
    args
}

// --- the objects -----------------------------------------------------------------------------

/// Where everything goes: pod `i` belongs to Service `i % services` (so each Service selects
/// `pods / services` pods), Service `j` lives in namespace `j % namespaces`.
struct Layout {
    args: Args,
    /// `kube-scale-<random>`: the namespaces' label value and name prefix.
    run: String,
    namespaces: Vec<String>,
}

/// The policy mix: one TrafficPolicy per Service for a fifth of the policies (at most one per
/// Service: a second one would conflict), a twentieth each of PeerAuthentications and
/// RequestAuthentications, AuthorizationPolicies for the rest.
#[derive(Debug, Clone, Copy)]
struct Mix {
    authorization: usize,
    traffic: usize,
    peer: usize,
    request: usize,
}

impl Layout {
    fn selector(&self) -> String {
        format!("{LABEL}={}", self.run)
    }

    fn service_namespace(&self, service: usize) -> &str {
        &self.namespaces[service % self.namespaces.len()]
    }

    fn pod(&self, i: usize) -> (String, String, String) {
        let service = i % self.args.services;
        let name = format!("svc-{service}-{}", i / self.args.services);
        // 10.128.0.0 + i: distinct for up to 2^21 pods.
        let ip = format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255);
        (self.service_namespace(service).to_owned(), name, ip)
    }

    fn mix(&self) -> Mix {
        let p = self.args.policies;
        let traffic = (p / 5).min(self.args.services);
        let peer = p / 20;
        let request = p / 20;
        Mix {
            authorization: p - traffic - peer - request,
            traffic,
            peer,
            request,
        }
    }

    fn service_account(&self, service: usize) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": format!("svc-{service}"), "namespace": self.service_namespace(service) },
        })
    }

    fn service(&self, j: usize) -> Value {
        let port = if j % 4 == 3 {
            json!({ "name": "grpc", "port": 9090, "targetPort": 9090, "protocol": "TCP" })
        } else {
            json!({ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" })
        };
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": format!("svc-{j}"),
                "namespace": self.service_namespace(j),
                "labels": { "app": format!("svc-{j}"), "team": format!("team-{}", j % 7) },
            },
            "spec": {
                "type": "ClusterIP",
                "selector": { "app": format!("svc-{j}") },
                "ports": [port],
            },
        })
    }

    /// A pod shaped like an injected one: the app container and a meshflow sidecar with the
    /// usual resources, env and probe; bound to [`NODE`], no token mounted (no kubelet).
    fn pod_object(&self, i: usize) -> Value {
        let service = i % self.args.services;
        let (ns, name, _) = self.pod(i);
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    "app": format!("svc-{service}"),
                    "version": if i.is_multiple_of(3) { "v2" } else { "v1" },
                    "team": format!("team-{}", service % 7),
                    "pod-template-hash": format!("{:010x}", service * 7919 + 12345),
                },
                "annotations": { "meshflow.io/inject": "true" },
            },
            "spec": {
                "nodeName": NODE,
                "serviceAccountName": format!("svc-{service}"),
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "app",
                        "image": format!("registry.invalid/team-{}/svc-{service}:1.4.2", service % 7),
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                        "env": [
                            { "name": "LOG_LEVEL", "value": "info" },
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                        ],
                        "resources": {
                            "requests": { "cpu": "100m", "memory": "128Mi" },
                            "limits": { "memory": "256Mi" },
                        },
                        "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080 }, "periodSeconds": 5 },
                    },
                    {
                        "name": "meshflow-proxy",
                        "image": "registry.invalid/meshflow/proxy:0.1.0",
                        "args": ["--bootstrap", "/var/run/meshflow/bootstrap.json", "--app-port", "8080"],
                        "ports": [{ "name": "mesh-inbound", "containerPort": 15006, "protocol": "TCP" }],
                        "env": [
                            { "name": "MESHFLOW_LOG", "value": "info" },
                            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                        ],
                        "resources": {
                            "requests": { "cpu": "50m", "memory": "32Mi" },
                            "limits": { "memory": "128Mi" },
                        },
                        "readinessProbe": { "httpGet": { "path": "/ready", "port": 15021 }, "periodSeconds": 2 },
                        "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true },
                    },
                ],
            },
        })
    }

    /// Every policy: (index into [`KINDS`], namespace, object).
    fn policies(&self) -> Vec<(usize, String, Value)> {
        let mix = self.mix();
        let services = self.args.services;
        let mut out = Vec::with_capacity(self.args.policies);
        let meta = |name: String, ns: &str| json!({ "name": name, "namespace": ns });
        let object = |kind: usize, metadata: Value, spec: Value| {
            json!({
                "apiVersion": "meshflow.io/v1alpha1",
                "kind": KINDS[kind].0,
                "metadata": metadata,
                "spec": spec,
            })
        };
        for i in 0..mix.authorization {
            let j = i % services;
            let ns = self.service_namespace(j).to_owned();
            let caller = (j + 1) % services;
            let other = (j + 2) % services;
            let spec = match i % 10 {
                0..=6 => json!({
                    "selector": { "matchLabels": { "app": format!("svc-{j}") } },
                    "action": "ALLOW",
                    "rules": [
                        {
                            "from": [{ "source": { "principals": [
                                format!("cluster.local/ns/{}/sa/svc-{caller}", self.service_namespace(caller)),
                                format!("cluster.local/ns/{}/sa/svc-{other}", self.service_namespace(other)),
                            ] } }],
                            "to": [{ "operation": {
                                "methods": ["GET", "HEAD"],
                                "paths": ["/api/v1/items", "/api/v1/items/*"],
                            } }],
                        },
                        {
                            "from": [{ "source": { "namespaces": [ns.clone()] } }],
                            "to": [{ "operation": { "methods": ["POST", "PUT"], "paths": [format!("/api/v1/svc-{j}/*")] } }],
                            "when": [{ "key": "request.headers[x-tenant]", "values": ["tenant-a", "tenant-b"] }],
                        },
                    ],
                }),
                7 | 8 => json!({
                    "selector": { "matchLabels": { "app": format!("svc-{j}"), "version": "v2" } },
                    "action": "DENY",
                    "rules": [{ "to": [{ "operation": { "paths": ["/admin", "/admin/*", "/debug/*"] } }] }],
                }),
                _ => json!({
                    "action": "ALLOW",
                    "rules": [{ "from": [{ "source": { "namespaces": [ns.clone(), "meshflow-system"] } }] }],
                }),
            };
            out.push((
                0,
                ns.clone(),
                object(0, meta(format!("authz-{i}"), &ns), spec),
            ));
        }
        for j in 0..mix.traffic {
            let ns = self.service_namespace(j).to_owned();
            let spec = json!({
                "service": format!("svc-{j}"),
                "timeouts": { "request": "2s", "perAttempt": "500ms" },
                "retries": {
                    "maxAttempts": 3,
                    "retryOn": ["connect-failure", "gateway-error", "unavailable"],
                },
                "outlierDetection": { "consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectedPercent": 50 },
                "connectionPool": { "maxPendingRequests": 50, "maxRequestsPerEndpoint": 100 },
            });
            out.push((
                1,
                ns.clone(),
                object(1, meta(format!("traffic-svc-{j}"), &ns), spec),
            ));
        }
        for p in 0..mix.peer {
            let (ns, spec) = if p < self.namespaces.len() {
                (
                    self.namespaces[p].clone(),
                    json!({ "mtls": { "mode": "STRICT" } }),
                )
            } else {
                let j = p % services;
                (
                    self.service_namespace(j).to_owned(),
                    json!({
                        "selector": { "matchLabels": { "app": format!("svc-{j}") } },
                        "mtls": { "mode": "STRICT" },
                        "portLevelMtls": { "8080": { "mode": "PERMISSIVE" } },
                    }),
                )
            };
            out.push((
                2,
                ns.clone(),
                object(2, meta(format!("peer-{p}"), &ns), spec),
            ));
        }
        let jwks = jwks();
        for r in 0..mix.request {
            let j = r % services;
            let ns = self.service_namespace(j).to_owned();
            let spec = json!({
                "selector": { "matchLabels": { "app": format!("svc-{j}") } },
                "jwtRules": [{
                    "issuer": format!("https://issuer-{}.example.com", r % 5),
                    "audiences": [format!("svc-{j}")],
                    "jwks": jwks,
                    "forwardOriginalToken": false,
                }],
            });
            out.push((
                3,
                ns.clone(),
                object(3, meta(format!("jwt-{r}"), &ns), spec),
            ));
        }
        out
    }
}

/// An inline JWKS with one RSA-2048 public key (random modulus: only its shape matters).
fn jwks() -> String {
    let modulus: Vec<u8> = (0..256).map(|_| rand::random::<u8>()).collect();
    json!({ "keys": [{
        "kty": "RSA",
        "kid": "bench-key-1",
        "use": "sig",
        "alg": "RS256",
        "n": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(modulus),
        "e": "AQAB",
    }] })
    .to_string()
}

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a well-formed object")
}

fn crd_resource(kind: usize) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meshflow.io", "v1alpha1", KINDS[kind].0),
        KINDS[kind].1,
    )
}

// --- API calls ---------------------------------------------------------------------------------

/// Runs `call` up to 5 times (the apiserver may shed load with 429 or time out); panics with
/// `what` and the last error after that.
async fn retry<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match call().await {
            Ok(value) => return value,
            Err(e) if attempt < 5 => {
                eprintln!("{what}: {e} (attempt {attempt}; retrying)");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Creates `value` through `api`; one that already exists (a retried create that had gone
/// through) is fine.
async fn create<K>(api: &Api<K>, value: &Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = object(value.clone());
    let what = format!(
        "create {} {}/{}",
        value["kind"].as_str().unwrap_or("?"),
        value["metadata"]["namespace"].as_str().unwrap_or(""),
        value["metadata"]["name"].as_str().unwrap_or("?")
    );
    let params = PostParams::default();
    let object = &object;
    retry(&what, || async {
        match api.create(&params, object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await;
}

/// Runs `task` on every item with at most `concurrency` in flight; returns the wall time.
async fn bounded<T, F, Fut>(concurrency: usize, items: Vec<T>, task: F) -> Duration
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    stream::iter(items.into_iter().map(task))
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

/// Writes `pods/status` the way a kubelet would: Running, `ip`, both containers started, the
/// Ready and ContainersReady conditions = `ready`.
async fn set_pod_ready(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let flag = if ready { "True" } else { "False" };
    let condition = |kind: &str, status: &str| json!({ "type": kind, "status": status, "lastTransitionTime": now });
    let container = |name: &str, image: &str| {
        json!({
            "name": name, "image": image, "imageID": "", "ready": ready, "restartCount": 0,
            "started": true, "state": { "running": { "startedAt": now } },
        })
    };
    let status = json!({ "status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "startTime": now,
        "qosClass": "Burstable",
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", flag),
            condition("Ready", flag),
        ],
        "containerStatuses": [
            container("app", "registry.invalid/app"),
            container("meshflow-proxy", "registry.invalid/meshflow/proxy:0.1.0"),
        ],
    } });
    let (params, patch) = (PatchParams::default(), Patch::Merge(&status));
    retry(&format!("patch status of pod {name}"), || {
        pods.patch_status(name, &params, &patch)
    })
    .await;
}

// --- processes -----------------------------------------------------------------------------

/// Memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    hwm: u64,
    pss: u64,
    uss: u64,
    anon: u64,
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Mem {
        rss: field(&status, "VmRSS:"),
        hwm: field(&status, "VmHWM:"),
        pss: field(&rollup, "Pss:"),
        uss: field(&rollup, "Private_Clean:") + field(&rollup, "Private_Dirty:"),
        anon: field(&rollup, "Anonymous:"),
    }
}

impl Mem {
    fn json(&self) -> Value {
        json!({
            "rss_kib": self.rss, "hwm_kib": self.hwm, "pss_kib": self.pss,
            "uss_kib": self.uss, "anon_kib": self.anon,
        })
    }
}

/// User + system CPU seconds of `pid` (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The cluster's own processes (pid files of `scripts/dev-cluster`'s run directory).
fn cluster_memory(run_dir: Option<&Path>) -> Value {
    let mut out = serde_json::Map::new();
    for name in ["apiserver", "etcd", "kcm"] {
        let pid = run_dir
            .and_then(|dir| std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok())
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            out.insert(name.into(), mem(pid).json());
        }
    }
    Value::Object(out)
}

/// A Kubernetes-mode control plane the bench started; killed when dropped.
struct ControlPlane {
    name: String,
    child: Child,
    admin: String,
    spawned: Instant,
    ready_after: Duration,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts `meshflow-control-plane --kubernetes` (its Lease and CA Secret in `namespace`)
    /// and waits for its ready file, which it writes once it serves the cluster's config.
    fn start(name: &str, namespace: &str, selector: &str, dir: &Path) -> ControlPlane {
        let state = dir.join(name);
        std::fs::create_dir_all(&state).expect("state dir");
        let ready = dir.join(format!("{name}.ready.json"));
        let log = dir.join(format!("{name}.log"));
        let program = meshflow_cli::supervisor::find_program("meshflow-control-plane");
        let spawned = Instant::now();
        let mut child = Command::new(&program)
            .args(["--kubernetes", "--namespace", namespace])
            .args(["--discovery-selector", selector, "--pod-name", name])
            .arg("--state-dir")
            .arg(&state)
            .arg("--ready-file")
            .arg(&ready)
            // warn, and each publish of the model (counted from the log).
            .env(
                "MESHFLOW_LOG",
                "warn,meshflow_control_plane::kubernetes=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} runs (cargo build --release --bins): {e}",
                    program.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(120);
        let file = loop {
            if let Some(file) = meshflow_api::ReadyFile::read(&ready) {
                break file;
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "control plane {name} exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "control plane {name} not ready in 120 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        ControlPlane {
            name: name.into(),
            admin: file.address("admin").expect("admin address").to_owned(),
            child,
            spawned,
            ready_after: spawned.elapsed(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn mem(&self) -> Mem {
        mem(self.pid())
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// How many times it has published a new model (its debug log line).
    fn publishes(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("published the cluster's config")
            .count()
    }

    /// Log lines containing `needle`.
    fn count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Its warnings and errors (the log without the publish lines).
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("published the cluster's config"))
            .map(str::to_owned)
            .collect()
    }

    async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "control plane {} ignored SIGTERM for 10 s; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- observing the control plane ------------------------------------------------------------

/// What a control plane's `/config_dump` holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Model {
    workloads: usize,
    services: usize,
    endpoints: usize,
    policies: usize,
    bytes: usize,
}

async fn model(http: &reqwest::Client, cp: &ControlPlane) -> Option<Model> {
    let body = http
        .get(format!("http://{}/config_dump", cp.admin))
        .send()
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    let dump: Value = serde_json::from_slice(&body).ok()?;
    let len = |v: &Value| v.as_array().map_or(0, Vec::len);
    let services = dump["services"].as_array().cloned().unwrap_or_default();
    Some(Model {
        workloads: len(&dump["mesh"]["spec"]["workloads"]),
        services: services.len(),
        endpoints: services.iter().map(|s| len(&s["endpoints"])).sum(),
        policies: dump["policies"]
            .as_object()
            .map_or(0, |kinds| kinds.values().map(len).sum()),
        bytes: body.len(),
    })
}

/// Polls `/config_dump` until `done` holds; returns the model and when it was first seen.
async fn wait_model(
    http: &reqwest::Client,
    cp: &ControlPlane,
    what: &str,
    done: impl Fn(&Model) -> bool,
) -> (Model, Instant) {
    let deadline = Instant::now() + CONVERGE;
    let mut last = None;
    loop {
        if let Some(m) = model(http, cp).await {
            if done(&m) {
                return (m, Instant::now());
            }
            last = Some(m);
        }
        assert!(
            Instant::now() < deadline,
            "control plane {}: timed out waiting for {what}; last /config_dump: {last:?}\n{}",
            cp.name,
            cp.warnings().join("\n")
        );
        tokio::time::sleep(POLL).await;
    }
}

/// CRs in the bench's namespaces: (total, Accepted=True for their current generation, the
/// first few others with their condition).
async fn statuses(client: &kube::Client, layout: &Layout) -> (usize, usize, Vec<String>) {
    let mut total = 0;
    let mut accepted = 0;
    let mut others = Vec::new();
    for (kind, (kind_name, _)) in KINDS.iter().enumerate() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &crd_resource(kind));
        let Ok(list) = api.list(&ListParams::default()).await else {
            continue;
        };
        for object in list.items {
            let ns = object.metadata.namespace.clone().unwrap_or_default();
            if !layout.namespaces.contains(&ns) {
                continue;
            }
            total += 1;
            let generation = object.metadata.generation.unwrap_or(0);
            let condition = object.data["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
                .cloned();
            let ok = condition.as_ref().is_some_and(|c| {
                c["status"] == "True" && c["observedGeneration"].as_i64() == Some(generation)
            });
            if ok {
                accepted += 1;
            } else if others.len() < 5 {
                others.push(format!(
                    "{} {ns}/{}: {}",
                    kind_name,
                    object.metadata.name.unwrap_or_default(),
                    condition.map_or("no Accepted condition".into(), |c| c.to_string())
                ));
            }
        }
    }
    (total, accepted, others)
}

/// Ready endpoints in the EndpointSlices of the bench's namespaces, as the API serves them
/// (what kube-controller-manager has made of the pods so far).
async fn slice_endpoints(client: &kube::Client, layout: &Layout, slices: &ApiResource) -> usize {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), slices);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return usize::MAX;
    };
    list.items
        .iter()
        .filter(|s| {
            s.metadata
                .namespace
                .as_ref()
                .is_some_and(|ns| layout.namespaces.contains(ns))
        })
        .flat_map(|s| s.data["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] != json!(false))
        .count()
}

/// When each side of a convergence was first seen done.
struct Converged {
    /// The control plane's model once `done`, and its memory right then.
    model: Model,
    model_at: Instant,
    model_mem: Mem,
    /// kube-controller-manager's EndpointSlices held the expected ready endpoints.
    slices_at: Instant,
    /// Every CR Accepted=True for its generation (when asked for).
    statuses_at: Option<Instant>,
}

/// Polls the control plane's `/config_dump` until `done`, the EndpointSlices until they hold
/// `ready_endpoints` ready endpoints and (with `statuses`) the CRs until that many are
/// Accepted, each until first seen; panics after [`CONVERGE`].
#[allow(clippy::too_many_arguments)]
async fn converge(
    client: &kube::Client,
    http: &reqwest::Client,
    cp: &ControlPlane,
    layout: &Layout,
    slices: &ApiResource,
    what: &str,
    done: impl Fn(&Model) -> bool,
    ready_endpoints: usize,
    statuses_expected: Option<usize>,
) -> Converged {
    let deadline = Instant::now() + CONVERGE;
    let (mut model_seen, mut slices_at, mut statuses_at) = (None, None, None);
    let (mut last_model, mut last_slices, mut last_statuses) = (None, 0, (0, 0, Vec::new()));
    loop {
        if model_seen.is_none() {
            if let Some(m) = model(http, cp).await {
                if done(&m) {
                    model_seen = Some((m, Instant::now(), cp.mem()));
                }
                last_model = Some(m);
            }
        }
        if slices_at.is_none() {
            last_slices = slice_endpoints(client, layout, slices).await;
            if last_slices == ready_endpoints {
                slices_at = Some(Instant::now());
            }
        }
        if let (Some(expected), None) = (statuses_expected, statuses_at) {
            last_statuses = statuses(client, layout).await;
            if last_statuses.0 == expected && last_statuses.1 == expected {
                statuses_at = Some(Instant::now());
            }
        }
        if let (Some((model, model_at, model_mem)), Some(slices_at)) = (&model_seen, slices_at) {
            if statuses_expected.is_none() || statuses_at.is_some() {
                return Converged {
                    model: *model,
                    model_at: *model_at,
                    model_mem: *model_mem,
                    slices_at,
                    statuses_at,
                };
            }
        }
        assert!(
            Instant::now() < deadline,
            "control plane {}: timed out waiting for {what}; last /config_dump: {last_model:?}; \
             ready endpoints in the EndpointSlices: {last_slices} of {ready_endpoints}; \
             Accepted CRs: {} of {} (e.g. {:#?})\n{}",
            cp.name,
            last_statuses.1,
            last_statuses.0,
            last_statuses.2,
            cp.warnings().join("\n")
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Sizes (bytes of JSON as the API serves them) of the bench's objects per kind, and how much
/// of that is `metadata.managedFields` — roughly what each reflector store holds.
async fn object_bytes(client: &kube::Client, layout: &Layout, slices: &ApiResource) -> Value {
    let mut out = serde_json::Map::new();
    let mut resources: Vec<(String, ApiResource)> = vec![
        ("Pod".into(), ApiResource::erase::<Pod>(&())),
        ("Service".into(), ApiResource::erase::<Service>(&())),
        ("EndpointSlice".into(), slices.clone()),
    ];
    for (kind, (name, _)) in KINDS.iter().enumerate() {
        resources.push(((*name).into(), crd_resource(kind)));
    }
    for (kind, resource) in resources {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let Ok(list) = api.list(&ListParams::default()).await else {
            continue;
        };
        let (mut count, mut bytes, mut managed) = (0usize, 0usize, 0usize);
        for object in list.items {
            if !layout
                .namespaces
                .contains(object.metadata.namespace.as_ref().unwrap_or(&String::new()))
            {
                continue;
            }
            count += 1;
            bytes += serde_json::to_vec(&object).map_or(0, |b| b.len());
            managed += object
                .metadata
                .managed_fields
                .as_ref()
                .and_then(|m| serde_json::to_vec(m).ok())
                .map_or(0, |b| b.len());
        }
        out.insert(
            kind,
            json!({ "count": count, "json_bytes": bytes, "managed_fields_bytes": managed }),
        );
    }
    Value::Object(out)
}

fn status_writes(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("meshflow_kubernetes_status_writes_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

// --- the run ---------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let args = parse_args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .expect("a kube client from KUBECONFIG (bench/kube-scale sets it)");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let dir = tempfile::tempdir().expect("temp dir");
    let run = format!("kube-scale-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let layout = Layout {
        namespaces: (0..args.namespaces).map(|i| format!("{run}-{i}")).collect(),
        run: run.clone(),
        args: args.clone(),
    };
    let selector = layout.selector();
    let mix = layout.mix();
    let policies = layout.policies();
    // EndpointSlices as the control plane reads them: v1, or v1beta1 before Kubernetes 1.21.
    let slice_version = match kube::discovery::group(&client, "discovery.k8s.io").await {
        Ok(group) if group.versions().any(|v| v == "v1") => "v1",
        _ => "v1beta1",
    };
    let slices = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", slice_version, "EndpointSlice"),
        "endpointslices",
    );
    println!(
        "kube-scale: {} pods, {} services ({} pods each), {} policies ({} AuthorizationPolicy, \
         {} TrafficPolicy, {} PeerAuthentication, {} RequestAuthentication) in {} namespaces \
         {run}-*, {} requests in flight",
        args.pods,
        args.services,
        args.pods / args.services,
        args.policies,
        mix.authorization,
        mix.traffic,
        mix.peer,
        mix.request,
        args.namespaces,
        args.concurrency
    );

    // Namespaces: the labelled ones the mesh is made of, and one per control plane for its
    // Lease and CA Secret (unlabelled; a fresh Lease makes each the leader at once).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let cp_namespaces: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|c| format!("{run}-cp-{c}"))
        .collect();
    for name in &layout.namespaces {
        create(
            &namespaces,
            &json!({ "apiVersion": "v1", "kind": "Namespace",
                     "metadata": { "name": name, "labels": { LABEL: run } } }),
        )
        .await;
    }
    for name in &cp_namespaces {
        create(
            &namespaces,
            &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } }),
        )
        .await;
    }
    create(
        &Api::<Node>::all(client.clone()),
        &json!({ "apiVersion": "v1", "kind": "Node",
                 "metadata": { "name": NODE, "labels": { "kubernetes.io/hostname": NODE } } }),
    )
    .await;

    let outcome = std::panic::AssertUnwindSafe(measure(
        &client,
        &http,
        &layout,
        &cp_namespaces,
        &selector,
        &policies,
        &slices,
        dir.path(),
    ));
    let result = futures::FutureExt::catch_unwind(outcome).await;

    // Clean up either way (unless --keep): pods first (grace 0), then the namespaces.
    let doomed: Vec<&String> = if args.keep {
        eprintln!("kube-scale: --keep: leaving the namespaces {run}-*");
        Vec::new()
    } else {
        eprintln!("kube-scale: deleting the namespaces");
        layout.namespaces.iter().chain(&cp_namespaces).collect()
    };
    for name in doomed {
        let pods: Api<Pod> = Api::namespaced(client.clone(), name);
        let _ = pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default(),
            )
            .await;
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
    }
    if !args.keep {
        let _ = Api::<Node>::all(client.clone())
            .delete(NODE, &DeleteParams::default())
            .await;
    }
    let report = match result {
        Ok(report) => report,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    if let Some(out) = &args.out {
        let mut text = serde_json::to_string_pretty(&report).expect("report JSON");
        text.push('\n');
        std::fs::write(out, text).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
        println!("wrote {}", out.display());
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    client: &kube::Client,
    http: &reqwest::Client,
    layout: &Layout,
    cp_namespaces: &[String],
    selector: &str,
    policies: &[(usize, String, Value)],
    slices: &ApiResource,
    dir: &Path,
) -> Value {
    let args = &layout.args;
    let run_dir = args.run_dir.as_deref();
    let pods = args.pods;
    let expected_policies = policies.len();
    let c = args.concurrency;

    // 1. Control plane A on the empty namespaces.
    let cluster_before = cluster_memory(run_dir);
    let a = ControlPlane::start("cp-a", &cp_namespaces[0], selector, dir);
    let (empty_model, _) = wait_model(http, &a, "its first model", |_| true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_empty = a.mem();
    println!(
        "control plane A ready in {:.2} s on the empty namespaces ({} workloads): RSS {} MiB",
        a.ready_after.as_secs_f64(),
        empty_model.workloads,
        mib(a_empty.rss)
    );

    // 2. Populate while A watches.
    let a_cpu_before = a.cpu();
    let a_publishes_before = a.publishes();
    let populate_started = Instant::now();
    let accounts_took = bounded(c, (0..args.services).collect(), |j| {
        let value = layout.service_account(j);
        let api: Api<KubeServiceAccount> =
            Api::namespaced(client.clone(), layout.service_namespace(j));
        async move { create(&api, &value).await }
    })
    .await;
    let services_took = bounded(c, (0..args.services).collect(), |j| {
        let value = layout.service(j);
        let api: Api<Service> = Api::namespaced(client.clone(), layout.service_namespace(j));
        async move { create(&api, &value).await }
    })
    .await;
    let pods_took = bounded(c, (0..pods).collect(), |i| {
        let value = layout.pod_object(i);
        let (ns, name, ip) = layout.pod(i);
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        async move {
            create(&api, &value).await;
            set_pod_ready(&api, &name, &ip, true).await;
        }
    })
    .await;
    let policies_started = Instant::now();
    let policies_took = bounded(c, policies.iter().collect(), |(kind, ns, value)| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &crd_resource(*kind));
        async move { create(&api, value).await }
    })
    .await;
    let populated = Instant::now();
    let populate_took = populated - populate_started;
    println!(
        "created in {:.1} s: {} ServiceAccounts {:.1} s, {} Services {:.1} s, {} pods (create + \
         status) {:.1} s, {} policies {:.1} s",
        populate_took.as_secs_f64(),
        args.services,
        accounts_took.as_secs_f64(),
        args.services,
        services_took.as_secs_f64(),
        pods,
        pods_took.as_secs_f64(),
        expected_policies,
        policies_took.as_secs_f64()
    );
    let full = |m: &Model| {
        m.workloads == pods
            && m.services == args.services
            && m.endpoints == pods
            && m.policies == expected_policies
    };
    let a_full = converge(
        client,
        http,
        &a,
        layout,
        slices,
        "the full model",
        full,
        pods,
        Some(expected_policies),
    )
    .await;
    let a_statuses_at = a_full.statuses_at.expect("statuses awaited");
    let a_cpu_populate = a.cpu() - a_cpu_before;
    let a_publishes = a.publishes() - a_publishes_before;
    let a_writes = status_writes(&a.metrics(http).await);
    let a_cpu_idle_before = a.cpu();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a_cpu_idle = a.cpu() - a_cpu_idle_before;
    let a_settled = a.mem();
    let cluster_full = cluster_memory(run_dir);
    println!(
        "A: after the last create: EndpointSlices complete {:.2} s, full model {:.2} s, all {} \
         Accepted {:.2} s ({:.2} s after the first policy create); {} publishes, {:.1} CPU s",
        secs(a_full.slices_at.saturating_duration_since(populated)),
        secs(a_full.model_at.saturating_duration_since(populated)),
        expected_policies,
        secs(a_statuses_at.saturating_duration_since(populated)),
        secs(a_statuses_at - policies_started),
        a_publishes,
        a_cpu_populate
    );

    // 3. Churn: one pod of each of `churn` Services NotReady, then Ready again.
    let churn_pods: Vec<usize> = (0..args.churn).collect();
    let churn_cpu_before = a.cpu();
    let churn_publishes_before = a.publishes();
    let flip = |ready: bool| {
        bounded(c, churn_pods.clone(), move |i| {
            let (ns, name, ip) = layout.pod(i);
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            async move { set_pod_ready(&api, &name, &ip, ready).await }
        })
    };
    let down_started = Instant::now();
    let down_writes = flip(false).await;
    let down = converge(
        client,
        http,
        &a,
        layout,
        slices,
        "the NotReady pods gone",
        |m| m.endpoints == pods - args.churn && m.workloads == pods,
        pods - args.churn,
        None,
    )
    .await;
    let up_started = Instant::now();
    let up_writes = flip(true).await;
    let up = converge(
        client,
        http,
        &a,
        layout,
        slices,
        "the pods back",
        |m| m.endpoints == pods,
        pods,
        None,
    )
    .await;
    let churn_cpu = a.cpu() - churn_cpu_before;
    let churn_publishes = a.publishes() - churn_publishes_before;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_after_churn = a.mem();
    println!(
        "churn: {} pods NotReady (writes {:.2} s): gone from the model {:.2} s after the first \
         write, from the EndpointSlices {:.2} s; Ready again (writes {:.2} s): in the model \
         {:.2} s, in the EndpointSlices {:.2} s; {} publishes, {:.1} CPU s",
        args.churn,
        down_writes.as_secs_f64(),
        secs(down.model_at - down_started),
        secs(down.slices_at - down_started),
        up_writes.as_secs_f64(),
        secs(up.model_at - up_started),
        secs(up.slices_at - up_started),
        churn_publishes,
        churn_cpu
    );
    let bytes = object_bytes(client, layout, slices).await;
    let a_unreadable = a.count("unreadable EndpointSlice");
    let a_log = a.warnings();
    let a_ready = a.ready_after;
    a.stop();

    // 4. Cold start over the full cluster, statuses cleared first.
    let cleared = bounded(c, policies.iter().collect(), |(kind, ns, value)| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &crd_resource(*kind));
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        async move {
            let status = json!({ "status": null });
            let (params, patch) = (PatchParams::default(), Patch::Merge(&status));
            retry(&format!("clear the status of {ns}/{name}"), || {
                api.patch_status(&name, &params, &patch)
            })
            .await;
        }
    })
    .await;
    let (_, none_accepted, _) = statuses(client, layout).await;
    assert_eq!(none_accepted, 0, "statuses were not cleared");
    let b = ControlPlane::start("cp-b", &cp_namespaces[1], selector, dir);
    let b_full = converge(
        client,
        http,
        &b,
        layout,
        slices,
        "the full model",
        full,
        pods,
        Some(expected_policies),
    )
    .await;
    let b_statuses_at = b_full.statuses_at.expect("statuses awaited");
    let b_accepted_mem = b.mem();
    let b_writes = status_writes(&b.metrics(http).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b_settled = b.mem();
    let b_cpu = b.cpu();
    let b_publishes = b.publishes();
    let b_log = b.warnings();
    let (b_ready, b_spawned) = (b.ready_after, b.spawned);
    println!(
        "cold start B: ready file {:.2} s, full model {:.2} s, all Accepted {:.2} s after spawn \
         ({} status writes, {} publishes, {:.1} CPU s)",
        b_ready.as_secs_f64(),
        secs(b_full.model_at - b_spawned),
        secs(b_statuses_at - b_spawned),
        b_writes,
        b_publishes,
        b_cpu
    );
    b.stop();

    // 5. The reflector stores alone: a selector no namespace matches.
    let nothing = format!("{LABEL}={}-nothing", layout.run);
    let stores_only = ControlPlane::start("cp-c", &cp_namespaces[2], &nothing, dir);
    let (c_model, _) = wait_model(http, &stores_only, "its model", |_| true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c_mem = stores_only.mem();
    let c_ready = stores_only.ready_after;
    stores_only.stop();

    // The table.
    println!();
    println!(
        "{:<58} {:>9} {:>9} {:>9} {:>9}",
        "control plane (MiB)", "RSS", "peak", "USS", "anon"
    );
    let row = |label: &str, m: &Mem| {
        println!(
            "{label:<58} {:>9} {:>9} {:>9} {:>9}",
            mib(m.rss),
            mib(m.hwm),
            mib(m.uss),
            mib(m.anon)
        );
    };
    row("A: started on the empty namespaces", &a_empty);
    row(
        "A: full model reached (populated while running)",
        &a_full.model_mem,
    );
    row("A: all Accepted, +5 s", &a_settled);
    row("A: after the churn", &a_after_churn);
    row("B: cold start, full model", &b_full.model_mem);
    row("B: all Accepted", &b_accepted_mem);
    row("B: +5 s", &b_settled);
    row("C: every object in the stores, empty model", &c_mem);
    println!();
    println!("{:<58} {:>9}", "time (s)", "");
    let time_row = |label: &str, seconds: f64| println!("{label:<58} {seconds:>9.2}");
    time_row("A: spawn → ready (empty)", a_ready.as_secs_f64());
    time_row(
        "populate: every object created",
        populate_took.as_secs_f64(),
    );
    time_row(
        "A: last create → EndpointSlices complete (controller)",
        secs(a_full.slices_at.saturating_duration_since(populated)),
    );
    time_row(
        "A: last create → full model",
        secs(a_full.model_at.saturating_duration_since(populated)),
    );
    time_row(
        "A: last create → all Accepted",
        secs(a_statuses_at.saturating_duration_since(populated)),
    );
    time_row("B: spawn → ready file", b_ready.as_secs_f64());
    time_row("B: spawn → full model", secs(b_full.model_at - b_spawned));
    time_row("B: spawn → all Accepted", secs(b_statuses_at - b_spawned));
    time_row(
        "churn: first NotReady write → gone from the model",
        secs(down.model_at - down_started),
    );
    time_row(
        "churn: first NotReady write → NotReady in EndpointSlices",
        secs(down.slices_at - down_started),
    );
    time_row(
        "churn: first Ready write → back in the model",
        secs(up.model_at - up_started),
    );
    time_row(
        "churn: first Ready write → Ready in EndpointSlices",
        secs(up.slices_at - up_started),
    );
    println!();
    println!("{:<58} {:>16}", "cluster (RSS MiB)", "empty → full");
    for name in ["apiserver", "etcd", "kcm"] {
        let before = cluster_before[name]["rss_kib"].as_u64().unwrap_or(0);
        let after = cluster_full[name]["rss_kib"].as_u64().unwrap_or(0);
        println!(
            "{name:<58} {:>16}",
            format!("{} → {}", mib(before), mib(after))
        );
    }

    let since = |at: Instant, from: Instant| secs(at.saturating_duration_since(from));
    json!({
        "bench": "kube-scale",
        "date": k8s_openapi::jiff::Timestamp::now().to_string(),
        "commit": commit(),
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "kubernetes": "v1.20.2 (scripts/dev-cluster: etcd, kube-apiserver, kube-controller-manager; no kubelet)",
        "control_plane_build": "release",
        "units": "memory in KiB (rss = VmRSS, hwm = VmHWM, uss = Private_Clean + Private_Dirty, anon = Anonymous, from /proc/<pid>/status and smaps_rollup); times in s",
        "counts": {
            "pods": pods, "services": args.services, "pods_per_service": pods / args.services,
            "namespaces": args.namespaces, "concurrency": args.concurrency, "churn": args.churn,
            "policies": expected_policies,
            "policy_mix": mix_json(layout.mix()),
        },
        "populate": {
            "total_s": secs(populate_took),
            "service_accounts_s": secs(accounts_took),
            "services_s": secs(services_took),
            "pods_create_and_status_s": secs(pods_took),
            "policies_s": secs(policies_took),
        },
        "control_plane": {
            "a_populated_while_running": {
                "spawn_to_ready_s": secs(a_ready),
                "empty": a_empty.json(),
                "full_model": a_full.model_mem.json(),
                "settled": a_settled.json(),
                "after_churn": a_after_churn.json(),
                "last_create_to_slices_complete_s": since(a_full.slices_at, populated),
                "last_create_to_full_model_s": since(a_full.model_at, populated),
                "last_create_to_all_accepted_s": since(a_statuses_at, populated),
                "first_policy_create_to_all_accepted_s": since(a_statuses_at, policies_started),
                "cpu_s_populating": (a_cpu_populate * 100.0).round() / 100.0,
                "cpu_s_idle_5s": (a_cpu_idle * 100.0).round() / 100.0,
                "publishes_populating": a_publishes,
                "status_writes_ok": a_writes,
                "unreadable_endpointslice_warnings": a_unreadable,
                "model": model_json(&a_full.model),
                "log_sample": a_log.iter().take(8).collect::<Vec<_>>(),
            },
            "b_cold_start": {
                "statuses_cleared_s": secs(cleared),
                "spawn_to_ready_file_s": secs(b_ready),
                "spawn_to_full_model_s": since(b_full.model_at, b_spawned),
                "spawn_to_all_accepted_s": since(b_statuses_at, b_spawned),
                "full_model": b_full.model_mem.json(),
                "all_accepted": b_accepted_mem.json(),
                "settled": b_settled.json(),
                "cpu_s": (b_cpu * 100.0).round() / 100.0,
                "publishes": b_publishes,
                "status_writes_ok": b_writes,
                "model": model_json(&b_full.model),
                "log_sample": b_log.iter().take(8).collect::<Vec<_>>(),
            },
            "c_stores_only": {
                "spawn_to_ready_file_s": secs(c_ready),
                "settled": c_mem.json(),
                "model": model_json(&c_model),
            },
        },
        "churn": {
            "pods": args.churn,
            "not_ready_writes_s": secs(down_writes),
            "first_write_to_gone_from_model_s": since(down.model_at, down_started),
            "first_write_to_not_ready_in_slices_s": since(down.slices_at, down_started),
            "ready_writes_s": secs(up_writes),
            "first_write_to_back_in_model_s": since(up.model_at, up_started),
            "first_write_to_ready_in_slices_s": since(up.slices_at, up_started),
            "publishes": churn_publishes,
            "cpu_s": (churn_cpu * 100.0).round() / 100.0,
        },
        "cluster": { "empty": cluster_before, "full": cluster_full },
        "objects": bytes,
    })
}

/// The commit measured: `KUBE_SCALE_COMMIT` (for a run from an exported tree), else
/// `git describe --always --dirty`.
fn commit() -> String {
    std::env::var("KUBE_SCALE_COMMIT").unwrap_or_else(|_| {
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    })
}

fn mix_json(mix: Mix) -> Value {
    json!({
        "AuthorizationPolicy": mix.authorization,
        "TrafficPolicy": mix.traffic,
        "PeerAuthentication": mix.peer,
        "RequestAuthentication": mix.request,
    })
}

fn model_json(m: &Model) -> Value {
    json!({
        "workloads": m.workloads, "services": m.services, "endpoints": m.endpoints,
        "policies": m.policies, "config_dump_bytes": m.bytes,
    })
}
