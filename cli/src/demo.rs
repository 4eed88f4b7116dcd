//! `meshflow demo`: the order example end to end on 127.0.0.1.
//!
//! Starts the demo mesh (`examples/demo/mesh.yaml`: the control plane with the workflow
//! coordinator, inventory, payment and shipping from `examples/shop`, a storefront, one sidecar
//! each) with the policies of `policies/examples/demo/`, registers the `place-order` workflow
//! (`examples/demo/place-order.yaml`), runs a deterministic batch of orders through it and
//! prints a summary. The files are compiled in, so the demo runs from any directory.
//!
//! Order `i` (1-based) of the batch:
//! - every 10th ships to `nowhere`: shipping answers 422, the saga compensates (refund,
//!   release);
//! - every 4th other order asks shipping to answer 503 to its first attempt; the
//!   coordinator's sidecar retries it (TrafficPolicy `shipping`), so the workflow never sees it;
//! - the rest complete normally.
//!
//! Besides the orders, the storefront calls payment directly and an admin path of inventory;
//! AuthorizationPolicy denies both (403).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures::StreamExt as _;
use serde_json::{json, Value};

use crate::up::LocalMesh;

/// The demo mesh file.
pub const MESH: &str = include_str!("../../examples/demo/mesh.yaml");
/// The `place-order` workflow.
pub const WORKFLOW: &str = include_str!("../../examples/demo/place-order.yaml");
/// The demo policies (file name, text).
pub const POLICIES: &[(&str, &str)] = &[
    (
        "authorization.yaml",
        include_str!("../../policies/examples/demo/authorization.yaml"),
    ),
    (
        "traffic.yaml",
        include_str!("../../policies/examples/demo/traffic.yaml"),
    ),
];

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Orders in the batch.
    pub orders: u32,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// OTLP/gRPC collector for traces (e.g. `http://127.0.0.1:4317`).
    pub otlp: Option<String>,
    /// Also write the summary as JSON here.
    pub summary_json: Option<PathBuf>,
    /// The batch must finish within this long (runs still going count as failures).
    pub timeout: Duration,
}

/// How an order of the batch is set up, and how it should end.
#[derive(Debug, Clone)]
pub struct Order {
    /// Run id (`order-0001`, …).
    pub id: String,
    /// Workflow input.
    pub input: Value,
    /// Expected final status: `Completed` or `Compensated`.
    pub expected: &'static str,
    /// Shipping answers 503 to the first attempt (absorbed by a sidecar retry).
    pub flaky_shipping: bool,
}

/// The batch of `n` orders (deterministic; see the module docs).
pub fn orders(n: u32) -> Vec<Order> {
    (1..=n)
        .map(|i| {
            let fails = i % 10 == 0;
            let flaky = !fails && i % 4 == 0;
            let sku = ["widget", "gadget", "gizmo"][(i % 3) as usize];
            Order {
                id: format!("order-{i:04}"),
                input: json!({
                    "sku": sku,
                    "qty": 1 + i % 3,
                    "customer": format!("customer-{}", 1 + i % 5),
                    "amount": 10 + (i % 7) * 5,
                    "address": if fails { "nowhere" } else { "1 Main Street" },
                    "flakyShipping": flaky,
                }),
                expected: if fails { "Compensated" } else { "Completed" },
                flaky_shipping: flaky,
            }
        })
        .collect()
}

/// The policy directory [`MESH`] names, relative to `examples/demo/`.
const MESH_POLICIES_DIR: &str = "policiesDir: ../../policies/examples/demo";

/// [`MESH`] as the demo writes it: its policies in `policies/` next to it.
fn mesh_text() -> String {
    assert!(
        MESH.contains(MESH_POLICIES_DIR),
        "examples/demo/mesh.yaml names its policies"
    );
    MESH.replace(MESH_POLICIES_DIR, "policiesDir: policies")
}

/// Writes the mesh file and policies under `dir` (`mesh.yaml`, `policies/`); returns the
/// mesh file's path.
///
/// # Errors
/// I/O errors.
pub fn write_files(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("policies"))?;
    for (name, text) in POLICIES {
        std::fs::write(dir.join("policies").join(name), text)?;
    }
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_text())?;
    std::fs::write(dir.join("place-order.yaml"), WORKFLOW)?;
    Ok(mesh)
}

/// Per-step latency of the final attempts, ms.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepLatency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Attempts measured.
    pub attempts: usize,
}

/// A call the demo expected to be denied, and what happened.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Denial {
    /// Calling workload.
    pub from: String,
    /// `http://service.namespace/path`.
    pub url: String,
    /// HTTP status received (403 when denied).
    pub status: u16,
}

/// What the demo did and where to look next. Serialized with `--summary-json`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Orders run.
    pub orders: usize,
    /// Runs by final status.
    pub statuses: BTreeMap<String, usize>,
    /// Final status per run id.
    pub runs: BTreeMap<String, String>,
    /// Runs that did not end as planned (e.g. Failed instead of Completed).
    pub unexpected: Vec<String>,
    /// Latency per step (final attempt of each call, completed or not).
    pub step_latency: BTreeMap<String, StepLatency>,
    /// Orders whose first shipping attempt got a 503.
    pub flaky_shipping_orders: usize,
    /// Increase of `meshflow_retries_total{service="shipping.default"}` at the coordinator's
    /// sidecar: retries the mesh made, invisible to the workflow.
    pub retries_absorbed: f64,
    /// The calls policy should deny.
    pub denials: Vec<Denial>,
    /// Increase of `meshflow_authz_decisions_total{decision="deny"}` over all sidecars.
    pub authz_denied: f64,
    /// Admin (metrics) URL per workload, and the control plane's.
    pub metrics: BTreeMap<String, String>,
    /// Where spans go, if anywhere (`--otlp`, else `MESHFLOW_OTLP_ENDPOINT`).
    pub traces: Option<String>,
    /// Spans exported so far by every process (`meshflow_trace_spans_exported_total`).
    pub spans_exported: f64,
    /// Spans that could not be exported (`meshflow_trace_spans_dropped_total`).
    pub spans_dropped: f64,
    /// The workflow API.
    pub workflow_api: String,
    /// The API token file.
    pub workflow_token: PathBuf,
    /// One compensated run (or any run) to inspect.
    pub example_run: Option<String>,
    /// App address (`host:port`) per workload (the example services answer `GET /__records`).
    pub apps: BTreeMap<String, String>,
    /// Processes started (name, pid).
    pub processes: Vec<(String, u32)>,
    /// TCP ports bound by the mesh (listeners of every process).
    pub ports: Vec<u16>,
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let r = r.bearer_auth(&self.token).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn start(&self, order: &Order) -> anyhow::Result<()> {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/v1/runs", self.base))
                    .json(&json!({
                        "workflow": "default/place-order",
                        "runId": order.id,
                        "input": order.input,
                    })),
            )
            .await?;
        if status == 200 {
            // The id exists already: a reused state directory would report old runs.
            bail!(
                "run {} already exists in this state directory; use a fresh --state-dir",
                order.id
            );
        }
        if status != 201 {
            bail!("start {}: {status} {body}", order.id);
        }
        Ok(())
    }

    async fn run(&self, id: &str) -> anyhow::Result<Value> {
        let (status, body) = self
            .send(self.http.get(format!("{}/v1/runs/{id}", self.base)))
            .await?;
        if status != 200 {
            bail!("get {id}: {status} {body}");
        }
        Ok(body)
    }
}

/// What the demo keeps of a run: its status and the latency of each step's last call
/// attempt (ms). Small, so a long batch does not hold every run's full state.
struct Finished {
    status: String,
    steps: Vec<(String, f64)>,
}

impl Finished {
    fn not_started() -> Self {
        Self {
            status: "NotStarted".into(),
            steps: Vec::new(),
        }
    }

    fn from_view(view: &Value) -> Self {
        let mut steps = Vec::new();
        if let Some(all) = view["state"]["steps"].as_object() {
            for (step, state) in all {
                let last = state["attempts"]
                    .as_array()
                    .and_then(|a| a.iter().rev().find(|x| x["compensation"] != json!(true)));
                if let Some(a) = last {
                    if let (Some(s), Some(e)) = (a["startedMs"].as_u64(), a["endedMs"].as_u64()) {
                        steps.push((step.clone(), e.saturating_sub(s) as f64));
                    }
                }
            }
        }
        Self {
            status: view["status"].as_str().unwrap_or("").to_string(),
            steps,
        }
    }
}

fn terminal(status: &str) -> bool {
    !matches!(status, "Running" | "Compensating" | "")
}

/// Sum of `name` samples whose labels include all of `labels`, on one admin endpoint.
async fn scrape_sum(
    http: &reqwest::Client,
    admin: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let Ok(r) = http.get(format!("http://{admin}/metrics")).send().await else {
        return 0.0;
    };
    let Ok(text) = r.text().await else {
        return 0.0;
    };
    let Ok(scrape) = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
    else {
        return 0.0;
    };
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn denied_total(http: &reqwest::Client, mesh: &LocalMesh) -> f64 {
    let mut total = 0.0;
    for w in mesh.workloads.values() {
        total += scrape_sum(
            http,
            &w.admin,
            "meshflow_authz_decisions_total",
            &[("decision", "deny")],
        )
        .await;
    }
    total
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs the demo against a started demo mesh; prints progress to stdout.
///
/// # Errors
/// The workflow API or a sidecar is unreachable, or registration fails.
pub async fn run(mesh: &LocalMesh, options: &DemoOptions) -> anyhow::Result<Summary> {
    let api_addr = mesh
        .workflow_api
        .clone()
        .ok_or_else(|| anyhow!("the demo mesh has no coordinator"))?;
    let api = Api {
        base: format!("http://{api_addr}"),
        token: std::fs::read_to_string(mesh.workflow_token_path())
            .context("workflow API token")?
            .trim()
            .to_string(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
    };
    let (status, body) = api
        .send(
            api.http
                .post(format!("{}/v1/workflows", api.base))
                .body(WORKFLOW),
        )
        .await?;
    if status != 200 {
        bail!("registering place-order: {status} {body}");
    }
    println!(
        "registered workflow default/place-order (version {})",
        body["version"]
    );

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let coordinator_admin = mesh.workload("meshflow-system/coordinator").admin.clone();
    let shipping_retries = || {
        scrape_sum(
            &plain,
            &coordinator_admin,
            "meshflow_retries_total",
            &[("service", "shipping.default")],
        )
    };
    let retries_before = shipping_retries().await;
    let denied_before = denied_total(&plain, mesh).await;

    // Calls policy must refuse, made through the storefront's sidecar.
    let storefront = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!(
            "http://{}",
            mesh.workload("storefront").outbound
        ))?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut denials = Vec::new();
    for (method, url) in [
        ("POST", "http://payment.default/charges"),
        ("POST", "http://inventory.default/admin/reset"),
    ] {
        let request = if method == "POST" {
            storefront
                .post(url)
                .json(&json!({"customer": "mallory", "amount": 1}))
        } else {
            storefront.get(url)
        };
        let status = request.send().await?.status().as_u16();
        println!("storefront → {url}: {status}");
        denials.push(Denial {
            from: "default/storefront".into(),
            url: url.into(),
            status,
        });
    }

    // The batch.
    let batch = orders(options.orders);
    let started = Instant::now();
    let total = batch.len();
    let mut runs: BTreeMap<String, Finished> = BTreeMap::new();
    let deadline = started + options.timeout;
    let mut results = futures::stream::iter(batch.iter().cloned().map(|order| {
        let api = &api;
        async move {
            // Past the deadline no new order starts; it is reported as not started.
            if Instant::now() >= deadline {
                return anyhow::Ok((order.id.clone(), Finished::not_started()));
            }
            api.start(&order).await?;
            loop {
                let view = api.run(&order.id).await?;
                if terminal(view["status"].as_str().unwrap_or("")) || Instant::now() >= deadline {
                    return anyhow::Ok((order.id.clone(), Finished::from_view(&view)));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }))
    .buffer_unordered(options.concurrency.max(1));
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last_line = Instant::now();
    let (mut completed, mut compensated) = (0usize, 0usize);
    while let Some(result) = results.next().await {
        let (id, finished) = result?;
        match finished.status.as_str() {
            "Completed" => completed += 1,
            "Compensated" => compensated += 1,
            _ => {}
        }
        runs.insert(id, finished);
        let line = format!(
            "orders {:>4}/{total}  completed {completed:>4}  compensated {compensated:>3}  failed {:>3}  {:>5.1}s",
            runs.len(),
            runs.len() - completed - compensated,
            started.elapsed().as_secs_f64()
        );
        if interactive {
            print!("\r{line}");
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        } else if runs.len() == total || last_line.elapsed() >= Duration::from_secs(1) {
            println!("{line}");
            last_line = Instant::now();
        }
    }
    if interactive {
        println!();
    }
    drop(results);

    let mut spans_exported = 0.0;
    let mut spans_dropped = 0.0;
    let admins: Vec<String> = mesh
        .workloads
        .values()
        .map(|w| w.admin.clone())
        .chain([mesh.control_plane_admin.clone()])
        .collect();
    for admin in &admins {
        spans_exported +=
            scrape_sum(&plain, admin, "meshflow_trace_spans_exported_total", &[]).await;
        spans_dropped += scrape_sum(&plain, admin, "meshflow_trace_spans_dropped_total", &[]).await;
    }

    // Retries are counted when the retry starts; the sidecar's metric is already final.
    let retries_absorbed = shipping_retries().await - retries_before;
    let authz_denied = denied_total(&plain, mesh).await - denied_before;

    let mut statuses = BTreeMap::new();
    let mut unexpected: Vec<String> = denials
        .iter()
        .filter(|d| d.status != 403)
        .map(|d| format!("{} → {}: {} (expected 403)", d.from, d.url, d.status))
        .collect();
    let mut latencies: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for order in &batch {
        let finished = &runs[&order.id];
        let status = finished.status.clone();
        *statuses.entry(status.clone()).or_insert(0) += 1;
        if status != order.expected {
            unexpected.push(format!(
                "{}: {status} (expected {})",
                order.id, order.expected
            ));
        }
        for (step, ms) in &finished.steps {
            latencies.entry(step.clone()).or_default().push(*ms);
        }
    }
    let step_latency = latencies
        .into_iter()
        .map(|(step, mut v)| {
            v.sort_by(f64::total_cmp);
            (
                step,
                StepLatency {
                    p50_ms: percentile(&v, 0.5),
                    p99_ms: percentile(&v, 0.99),
                    attempts: v.len(),
                },
            )
        })
        .collect();
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "control-plane".to_string(),
        format!("http://{}/metrics", mesh.control_plane_admin),
    );
    let mut ports = Vec::new();
    let mut add_port = |addr: &str| {
        if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
            ports.push(port);
        }
    };
    add_port(&mesh.control_plane);
    add_port(&mesh.control_plane_admin);
    add_port(&api_addr);
    for w in mesh.workloads.values() {
        metrics.insert(w.key.clone(), format!("http://{}/metrics", w.admin));
        for addr in [&w.admin, &w.inbound, &w.outbound, &w.app] {
            add_port(addr);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(Summary {
        orders: batch.len(),
        statuses,
        runs: runs
            .iter()
            .map(|(id, f)| (id.clone(), f.status.clone()))
            .collect(),
        unexpected,
        step_latency,
        flaky_shipping_orders: batch.iter().filter(|o| o.flaky_shipping).count(),
        retries_absorbed,
        denials,
        authz_denied,
        metrics,
        traces: options
            .otlp
            .clone()
            .or_else(|| std::env::var("MESHFLOW_OTLP_ENDPOINT").ok()),
        spans_exported,
        spans_dropped,
        workflow_api: format!("http://{api_addr}"),
        workflow_token: mesh.workflow_token_path(),
        example_run: batch
            .iter()
            .find(|o| o.expected == "Compensated")
            .or(batch.first())
            .map(|o| o.id.clone()),
        apps: mesh
            .workloads
            .values()
            .map(|w| (w.key.clone(), w.app.clone()))
            .collect(),
        processes: mesh.supervisor.pids(),
        ports,
    })
}

/// The summary as text.
pub fn render(s: &Summary) -> String {
    let count = |k: &str| s.statuses.get(k).copied().unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!(
        "\nmeshflow demo: {} orders\n  runs      completed {}  compensated {}  failed {}\n",
        s.orders,
        count("Completed"),
        count("Compensated"),
        s.orders - count("Completed") - count("Compensated"),
    ));
    for u in &s.unexpected {
        out.push_str(&format!("  UNEXPECTED {u}\n"));
    }
    out.push_str("  step      p50       p99       attempts\n");
    for (step, l) in &s.step_latency {
        out.push_str(&format!(
            "  {:<9} {:<9} {:<9} {}\n",
            step,
            format!("{:.0}ms", l.p50_ms),
            format!("{:.0}ms", l.p99_ms),
            l.attempts
        ));
    }
    out.push_str(&format!(
        "  retries absorbed by the mesh: {} (shipping answered 503 to the first attempt of {} orders; the coordinator's sidecar retried)\n",
        s.retries_absorbed, s.flaky_shipping_orders
    ));
    out.push_str(&format!(
        "  authorization denials: {} (meshflow_authz_decisions_total{{decision=\"deny\"}})\n",
        s.authz_denied
    ));
    for d in &s.denials {
        out.push_str(&format!("    {} → {}: {}\n", d.from, d.url, d.status));
    }
    out.push_str("  metrics (Prometheus text):\n");
    for (who, url) in &s.metrics {
        out.push_str(&format!("    {who:<29} {url}\n"));
    }
    out.push_str(&format!(
        "  traces: {}\n",
        s.traces.as_deref().map_or_else(
            || "not exported (run with --otlp http://127.0.0.1:4317 to send them to a collector)"
                .to_string(),
            |e| format!(
                "OTLP/gRPC to {e}: {} spans exported so far, {} could not be exported{}",
                s.spans_exported,
                s.spans_dropped,
                if s.spans_dropped > 0.0 {
                    " (is the collector up?)"
                } else {
                    ""
                }
            ),
        )
    ));
    if let Some(id) = &s.example_run {
        out.push_str(&format!(
            "  inspect a run (with --keep-running): {} workflow get {id} --api {} --token-file {}\n",
            crate::supervisor::self_command(),
            s.workflow_api,
            s.workflow_token.display()
        ));
    }
    out
}

/// What to paste into another terminal while the demo mesh keeps running (`--keep-running`):
/// the workflow API's address and token file as environment variables, and commands to try.
pub fn keep_running_hints(s: &Summary, state_dir: &Path) -> String {
    let meshflow = crate::supervisor::self_command();
    let run = s.example_run.as_deref().unwrap_or("order-0001");
    format!(
        "In another terminal:\n  export MESHFLOW_WORKFLOW_API={} MESHFLOW_WORKFLOW_TOKEN_FILE={}\n  {meshflow} workflow get {run}\n  {meshflow} workflow list --status compensated\n  {meshflow} workflow history {run}\n  {meshflow} stat --state-dir {}\n",
        s.workflow_api,
        s.workflow_token.display(),
        state_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshflow_policies::documents::PolicySet;
    use meshflow_policies::mesh::MeshFile;

    /// The payment AuthorizationPolicies of the mesh file at `mesh`, via its `policiesDir`.
    fn payment_policies(mesh: &Path) -> Vec<String> {
        let file = MeshFile::load(mesh).unwrap();
        let dir = file
            .policies_dir(mesh)
            .expect("the demo mesh names its policies");
        let set = PolicySet::load_dir(&dir).unwrap();
        let labels = BTreeMap::from([("app".to_string(), "payment".to_string())]);
        set.authorization_for("default", &labels)
            .map(|p| p.id())
            .collect()
    }

    /// Issue 12, item 13: `meshflow up -f examples/demo/mesh.yaml` runs with the demo
    /// policies (it used to name a directory that did not exist and ran with none).
    #[test]
    fn the_demo_mesh_file_in_the_repository_names_the_demo_policies() {
        let mesh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/mesh.yaml");
        assert!(!payment_policies(&mesh).is_empty());
    }

    #[test]
    fn the_demo_writes_its_mesh_file_with_the_policies_next_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = write_files(dir.path()).unwrap();
        assert_eq!(
            payment_policies(&mesh),
            payment_policies(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/mesh.yaml")
            )
        );
    }
}
