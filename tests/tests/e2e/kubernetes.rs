//! Issue 13: the control plane as a Kubernetes citizen, against the real kube-apiserver (and
//! kube-controller-manager) that `scripts/dev-cluster` runs. Each test has its own namespace
//! and its own control plane(s), started with `--discovery-selector` on that namespace's test
//! label so that parallel tests never see (or write status on) each other's objects. Pods have
//! no kubelet: the harness writes `pods/status`; kube-controller-manager's EndpointSlice
//! controller does the rest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use meshflow_api::v1::{identity_client::IdentityClient, CertifyRequest};
use meshflow_api::{Bootstrap, ReadyFile};
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{json, Value};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::cluster::{self, cluster, wait_for, TestNamespace};
use crate::common::*;

/// Lease duration the tests' control planes run with.
const LEASE: Duration = Duration::from_secs(6);

/// A process the test started; killed (SIGKILL) when dropped.
pub(crate) struct Proc {
    child: Child,
    ready: ReadyFile,
    log: PathBuf,
    stderr: PathBuf,
    /// For a sidecar: its pod's service account.
    account: String,
}

impl Proc {
    pub(crate) fn address(&self, name: &str) -> String {
        self.ready.address(name).unwrap().to_string()
    }

    /// What it wrote to stdout and stderr so far.
    pub(crate) fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}{}", read(&self.log), read(&self.stderr))
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `program args` with the dev cluster's admin kubeconfig (see [`spawn_with`]).
fn spawn(dir: &Path, name: &str, program: &str, args: &[String]) -> Proc {
    spawn_with(dir, name, program, args, &cluster().kubeconfig)
}

/// Starts `program args` with `KUBECONFIG=kubeconfig`, waits (60 s) for its ready file; panics
/// with its log otherwise.
pub(crate) fn spawn_with(
    dir: &Path,
    name: &str,
    program: &str,
    args: &[String],
    kubeconfig: &Path,
) -> Proc {
    let ready = dir.join(format!("{name}.ready.json"));
    let log = dir.join(format!("{name}.log"));
    let stderr = dir.join(format!("{name}.stderr"));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(meshflow_cli::supervisor::find_program(program))
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .env("KUBECONFIG", kubeconfig)
        .env("MESHFLOW_LOG", "info,kube=warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs (cargo build --bins): {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(file) = ReadyFile::read(&ready) {
            return Proc {
                child,
                ready: file,
                log,
                stderr,
                account: String::new(),
            };
        }
        let output = || std::fs::read_to_string(&stderr).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{name} exited ({status}):\n{}", output());
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready in 60 s:\n{}",
            output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The control plane's gRPC server name (its SPIFFE ID's DNS form).
pub(crate) fn control_plane_server_name() -> String {
    meshflow_policies::SpiffeId::new("cluster.local", "meshflow-system", "meshflow-control-plane")
        .unwrap()
        .dns_name()
}

/// One test's world: its namespace, a temp dir, the CRDs installed.
struct World {
    ns: TestNamespace,
    dir: tempfile::TempDir,
}

impl World {
    async fn new(prefix: &str) -> World {
        install_crypto();
        apply_crds();
        World {
            ns: TestNamespace::new(prefix).await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn name(&self) -> &str {
        &self.ns.name
    }

    /// A Kubernetes-mode control plane for this namespace (its Lease and CA Secret live there).
    fn control_plane(&self, replica: &str, extra: &[&str]) -> Proc {
        let state = self.dir.path().join(replica);
        std::fs::create_dir_all(&state).unwrap();
        let mut args: Vec<String> = [
            "--kubernetes",
            "--namespace",
            self.name(),
            "--discovery-selector",
            &self.ns.selector,
            "--pod-name",
            replica,
            "--lease-duration",
            "6s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--state-dir".into());
        args.push(state.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        spawn(self.dir.path(), replica, "meshflow-control-plane", &args)
    }

    /// The mesh CA from its Secret (cert, key PEM).
    async fn ca(&self) -> Pki {
        let secrets: Api<Secret> = Api::namespaced(cluster().client().await, self.name());
        let secret = secrets.get("meshflow-ca").await.expect("CA Secret");
        let data = secret.data.unwrap();
        Pki {
            ca_cert_pem: String::from_utf8(data["ca.crt"].0.clone()).unwrap(),
            ca_key_pem: String::from_utf8(data["ca.key"].0.clone()).unwrap(),
        }
    }

    /// A real sidecar for pod `pod` (service account `sa`), bootstrapped with `token`, in front
    /// of a real echo app; its inbound port is annotated on the pod like injection would.
    async fn sidecar(&self, cp: &Proc, pod: &str, sa: &str, token: &str) -> (Proc, Proc) {
        let app = spawn(
            self.dir.path(),
            &format!("{pod}-app"),
            "meshflow-echo",
            &[
                "--name".into(),
                pod.into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
        );
        let app_port = app.address("http").rsplit(':').next().unwrap().to_string();
        let ca = self.ca().await;
        let bootstrap = Bootstrap {
            control_plane: cp.address("grpc"),
            control_plane_server_name: control_plane_server_name(),
            trust_bundle_pem: ca.ca_cert_pem.clone(),
            workload: format!("{}/{pod}", self.name()),
            spiffe_id: format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.name()),
            token: token.into(),
            token_file: None,
            app_auth_secret: None,
        };
        let path = self.dir.path().join(format!("{pod}.bootstrap.json"));
        std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
        let mut proxy = spawn(
            self.dir.path(),
            &format!("{pod}-sidecar"),
            "meshflow-proxy",
            &[
                "--bootstrap".into(),
                path.display().to_string(),
                "--app-port".into(),
                app_port,
            ],
        );
        proxy.account = sa.to_string();
        let inbound = proxy.address("inbound");
        let port = inbound.rsplit(':').next().unwrap().to_string();
        let pods: Api<Pod> = Api::namespaced(cluster().client().await, self.name());
        pods.patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { "meshflow.io/inbound-port": port } } }),
            ),
        )
        .await
        .unwrap();
        (proxy, app)
    }

    fn kubectl_apply(&self, yaml: &str) -> std::process::Output {
        cluster().kubectl_with_input(&["apply", "-n", self.name(), "-f", "-"], yaml)
    }
}

/// Installs the committed CRDs (idempotent; every test does it, the cluster is shared) and
/// waits until they are served.
fn apply_crds() {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds");
    cluster().kubectl_ok(&["apply", "-f", crds.to_str().unwrap()]);
    cluster().kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "-f",
        crds.to_str().unwrap(),
    ]);
}

pub(crate) async fn config_dump(proxy: &Proc) -> Value {
    serde_json::from_str(&get_text(&proxy.address("admin"), "/config_dump").await).unwrap()
}

pub(crate) fn endpoints_of(dump: &Value, service: &str) -> Vec<String> {
    let mut out: Vec<String> = dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            format!(
                "{} {}",
                e["address"].as_str().unwrap(),
                e["identity"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

/// The meshflow.io resource behind a kubectl-style kind name (`authorizationpolicy`, …).
fn meshflow_resource(kind: &str) -> kube::api::ApiResource {
    let (kind, plural) = match kind {
        "authorizationpolicy" => ("AuthorizationPolicy", "authorizationpolicies"),
        "trafficpolicy" => ("TrafficPolicy", "trafficpolicies"),
        "requestauthentication" => ("RequestAuthentication", "requestauthentications"),
        "peerauthentication" => ("PeerAuthentication", "peerauthentications"),
        "workflow" => ("Workflow", "workflows"),
        // `examples()` gives kinds as written in the documents.
        other => {
            let lower = other.to_ascii_lowercase();
            return meshflow_resource(&lower);
        }
    };
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("meshflow.io", "v1alpha1", kind),
        plural,
    )
}

/// The Accepted condition of `kind/name` and the object's generation: (status, reason,
/// message, observedGeneration, generation).
async fn accepted(ns: &str, kind: &str, name: &str) -> Option<(String, String, String, i64, i64)> {
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(cluster().client().await, ns, &meshflow_resource(kind));
    let object = api.get_opt(name).await.ok()??;
    let condition = object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        condition["status"].as_str()?.to_string(),
        condition["reason"].as_str()?.to_string(),
        condition["message"].as_str()?.to_string(),
        condition["observedGeneration"].as_i64()?,
        object.metadata.generation?,
    ))
}

/// Waits until `kind/name` has an Accepted condition for its current generation (polled every
/// 200 ms).
async fn wait_accepted(
    ns: &str,
    kind: &str,
    name: &str,
    within: Duration,
) -> (String, String, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some((status, reason, message, observed, generation)) =
            accepted(ns, kind, name).await
        {
            if observed == generation {
                return (status, reason, message);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no status for {kind} {ns}/{name} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (polling every 100 ms) until `probe` holds, and asserts it held within `within`
/// measured from `since` (the probe's own duration included).
async fn within<F, Fut>(what: &str, since: Instant, within: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if probe().await {
            let took = since.elapsed();
            eprintln!("{what}: {took:?}");
            assert!(took <= within, "{what} took {took:?}, more than {within:?}");
            return;
        }
        assert!(since.elapsed() <= within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every policy and workflow example of the repository, as documents of the given kinds.
fn examples() -> Vec<(PathBuf, serde_yaml::Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kinds = [
        "TrafficPolicy",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "PeerAuthentication",
        "Workflow",
    ];
    let mut out = Vec::new();
    let mut stack = vec![root.join("examples"), root.join("docs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let Ok(value) = serde_yaml::Value::deserialize(doc) else {
                    continue;
                };
                if value["kind"].as_str().is_some_and(|k| kinds.contains(&k)) {
                    out.push((path.clone(), value));
                }
            }
        }
    }
    out
}

use serde::Deserialize;

/// Acceptance 1: the CRDs install; every example applies as a custom resource and is
/// Accepted; an Istio policy moves over by changing only `apiVersion`; a wrong enum value, a
/// duration without a unit and an unknown field are refused naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn examples_apply_as_custom_resources_and_bad_ones_are_refused_naming_the_field() {
    let w = World::new("crds").await;
    let _cp = w.control_plane("cp", &["--workflow-api", "127.0.0.1:0"]);
    let examples = examples();
    assert!(examples.len() >= 2, "found the examples: {examples:?}");
    let mut applied = Vec::new();
    for (path, mut doc) in examples {
        doc["metadata"]["namespace"] = serde_yaml::Value::String(w.name().to_string());
        let kind = doc["kind"].as_str().unwrap().to_string();
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        let out = w.kubectl_apply(&serde_yaml::to_string(&doc).unwrap());
        assert!(
            out.status.success(),
            "{}: {kind} {name}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        applied.push((path, kind, name));
    }
    // Istio's own example, with only apiVersion changed.
    let istio = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#
    .replace("security.istio.io/v1", "meshflow.io/v1alpha1");
    let out = w.kubectl_apply(&istio);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    applied.push((
        PathBuf::from("istio"),
        "AuthorizationPolicy".into(),
        "httpbin".into(),
    ));
    for (path, kind, name) in &applied {
        let (status, reason, message) =
            wait_accepted(w.name(), kind, name, Duration::from_secs(20)).await;
        assert_eq!(
            status,
            "True",
            "{}: {kind} {name}: {reason}: {message}",
            path.display()
        );
    }
    // `kubectl get` shows Accepted and Age.
    let table = cluster().kubectl_ok(&["get", "authorizationpolicies", "-n", w.name()]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("ACCEPTED") && header.contains("AGE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("httpbin") && l.contains("True")),
        "{table}"
    );

    // One object the types cannot read (a u32 out of range passes the schema) is refused alone,
    // naming the field; its kind keeps working.
    let overflow = "apiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: overflow }\nspec: { service: big, connectionPool: { maxConnections: 4294967296 } }\n";
    let out = w.kubectl_apply(overflow);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _, message) = wait_accepted(
        w.name(),
        "trafficpolicy",
        "overflow",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains("spec.connectionPool.maxConnections"),
        "{message}"
    );
    let fine = "apiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: fine }\nspec: { service: small, timeouts: { request: 2s } }\n";
    assert!(w.kubectl_apply(fine).status.success());
    let (status, _, message) =
        wait_accepted(w.name(), "trafficpolicy", "fine", Duration::from_secs(10)).await;
    assert_eq!(status, "True", "{message}");

    let refused = |yaml: &str, field: &str| {
        let out = w.kubectl_apply(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "accepted:\n{yaml}");
        assert!(stderr.contains(field), "{field} not named: {stderr}");
        stderr
    };
    let stderr = refused(
        "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: bad-enum }\nspec: { action: DENYY }\n",
        "spec.action",
    );
    assert!(stderr.contains("DENYY"), "{stderr}");
    refused(
        "apiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: bad-duration }\nspec: { service: backend, timeouts: { request: \"2\" } }\n",
        "spec.timeouts.request",
    );
    refused(
        "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: bad-field }\nspec: { actoin: DENY }\n",
        "actoin",
    );
}

/// Acceptance 2: a real sidecar connected over Watch shows exactly the ready pods with a
/// sidecar as the service's endpoints (pod IP, the sidecar's inbound port, the pod's SPIFFE
/// ID) — a ready pod without one is not an endpoint; a pod turning NotReady is gone within
/// 2 s. A Service whose only pod has no sidecar is known to the control plane but unmeshed.
#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_sees_exactly_the_ready_pods_as_endpoints() {
    let w = World::new("endpoints").await;
    let ns = w.name().to_string();
    let cp = w.control_plane("cp", &[]);
    cluster::create_service_account(&ns, "backend").await;
    cluster::create_service_account(&ns, "frontend").await;
    cluster::create_service(&ns, "backend", &[("app", "backend")], &[("http", 80, 8080)]).await;
    for (i, pod) in ["backend-1", "backend-2", "backend-3"].iter().enumerate() {
        cluster::create_pod(
            &ns,
            pod,
            &[("app", "backend")],
            "backend",
            &[("http", 8080)],
        )
        .await;
        let ready = i < 2; // backend-3 never becomes ready
        cluster::set_pod_ready(&ns, pod, &format!("10.77.0.{}", i + 1), ready).await;
    }
    // Ready, selected by the Service, but without a sidecar: mTLS to it would reach nothing.
    cluster::create_unmeshed_pod(
        &ns,
        "backend-legacy",
        &[("app", "backend")],
        "backend",
        &[("http", 8080)],
    )
    .await;
    cluster::set_pod_ready(&ns, "backend-legacy", "10.77.0.9", true).await;
    cluster::create_service(&ns, "redis", &[("app", "redis")], &[("redis", 6379, 6379)]).await;
    cluster::create_unmeshed_pod(&ns, "redis-0", &[("app", "redis")], "default", &[]).await;
    cluster::set_pod_ready(&ns, "redis-0", "10.77.2.1", true).await;
    cluster::create_pod(
        &ns,
        "frontend-1",
        &[("app", "frontend")],
        "frontend",
        &[("http", 8080)],
    )
    .await;
    cluster::set_pod_ready(&ns, "frontend-1", "10.77.1.1", true).await;
    let token = cluster::token_request(&ns, "frontend", "meshflow", 3600).await;
    let (sidecar, _app) = w.sidecar(&cp, "frontend-1", "frontend", &token).await;
    let identity = format!("spiffe://cluster.local/ns/{ns}/sa/backend");
    let both = vec![
        format!("10.77.0.1:15006 {identity}"),
        format!("10.77.0.2:15006 {identity}"),
    ];
    wait_for(
        "both ready backends in the sidecar's config",
        Duration::from_secs(20),
        || async { (endpoints_of(&config_dump(&sidecar).await, "backend") == both).then_some(()) },
    )
    .await;
    // The control plane has seen the unmeshed pods too once their slices list them ready:
    // neither is an endpoint, and redis is unmeshed while backend is not.
    let slice_ready = |service: &'static str, ip: &'static str| {
        let ns = ns.clone();
        async move {
            let slices = cluster().kubectl_ok(&[
                "get",
                "endpointslices",
                "-n",
                &ns,
                "-l",
                &format!("kubernetes.io/service-name={service}"),
                "-o",
                "json",
            ]);
            let slices: Value = serde_json::from_str(&slices).ok()?;
            slices["items"]
                .as_array()?
                .iter()
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .any(|e| e["addresses"][0] == ip && e["conditions"]["ready"] != false)
                .then_some(())
        }
    };
    wait_for(
        "backend-legacy ready in backend's EndpointSlice",
        Duration::from_secs(20),
        || slice_ready("backend", "10.77.0.9"),
    )
    .await;
    wait_for(
        "redis-0 ready in redis's EndpointSlice",
        Duration::from_secs(20),
        || slice_ready("redis", "10.77.2.1"),
    )
    .await;
    let service_of = |dump: &Value, name: &str| -> Option<Value> {
        dump["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    };
    let dump = wait_for(
        "the control plane to know redis as unmeshed",
        Duration::from_secs(20),
        || async {
            let dump: Value =
                serde_json::from_str(&get_text(&cp.address("admin"), "/config_dump").await).ok()?;
            (service_of(&dump, "redis")?["unmeshed"] == true).then_some(dump)
        },
    )
    .await;
    let backend = service_of(&dump, "backend").unwrap();
    assert_eq!(backend["unmeshed"], false, "{backend}");
    assert_eq!(endpoints_of(&dump, "backend"), both, "{backend}");
    assert_eq!(endpoints_of(&dump, "redis"), Vec::<String>::new());
    assert_eq!(endpoints_of(&config_dump(&sidecar).await, "backend"), both);
    let turned = Instant::now();
    cluster::set_pod_ready(&ns, "backend-2", "10.77.0.2", false).await;
    let one = vec![format!("10.77.0.1:15006 {identity}")];
    within(
        "NotReady pod gone from the sidecar's endpoints",
        turned,
        Duration::from_secs(2),
        || async { endpoints_of(&config_dump(&sidecar).await, "backend") == one },
    )
    .await;

    // Objects in a namespace outside the discovery selector are invisible: no workload, no
    // policy, no status.
    let other = TestNamespace::new("endpoints-other").await;
    cluster::create_service_account(&other.name, "x").await;
    cluster::create_pod(&other.name, "x-1", &[("app", "x")], "x", &[("http", 8080)]).await;
    let policy = "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: elsewhere }\nspec: { action: DENY }\n";
    let out = cluster().kubectl_with_input(&["apply", "-n", &other.name, "-f", "-"], policy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A change inside the selector after those, so the control plane has seen them.
    cluster::set_pod_ready(&ns, "backend-2", "10.77.0.2", true).await;
    wait_for("backend-2 back", Duration::from_secs(5), || async {
        (endpoints_of(&config_dump(&sidecar).await, "backend") == both).then_some(())
    })
    .await;
    let dump = get_text(&cp.address("admin"), "/config_dump").await;
    assert!(
        !dump.contains(&other.name),
        "{} leaked into the config",
        other.name
    );
    assert!(accepted(&other.name, "authorizationpolicy", "elsewhere")
        .await
        .is_none());
}

/// The service account a sidecar's bootstrap names (`…/sa/<account>`).
fn sidecar_account(sidecar: &Proc) -> String {
    sidecar.account.clone()
}

async fn mtls_get(w: &World, sidecar: &Proc, from_sa: &str, path: &str) -> String {
    let to_sa = sidecar_account(sidecar);
    let ca = w.ca().await;
    let leaf = ca.issue(LeafSpec::spiffe(&format!(
        "spiffe://cluster.local/ns/{}/sa/{from_sa}",
        w.name()
    )));
    let config = client_config(ca.roots(), Some(leaf), &[&rustls::version::TLS13]);
    let request = format!("GET {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n");
    match raw_tls(
        &sidecar.address("inbound"),
        config,
        &format!("{to_sa}.{}.serviceaccount.identity.cluster.local", w.name()),
        request.as_bytes(),
    )
    .await
    {
        RawOutcome::Response(r) => r.lines().next().unwrap_or_default().to_string(),
        other => format!("{other:?}"),
    }
}

/// Acceptance 3: an AuthorizationPolicy applied with kubectl reaches exactly the selected
/// workloads' sidecars within 2 s and takes effect on a request through them; deleting it
/// removes it within 2 s; an invalid one gets Accepted=False naming the field and changes
/// nothing, and an invalid update keeps the previous good version in force.
#[tokio::test(flavor = "multi_thread")]
async fn authorization_policies_applied_with_kubectl_take_effect_in_the_selected_sidecars() {
    let w = World::new("authz").await;
    let ns = w.name().to_string();
    let cp = w.control_plane("cp", &[]);
    for (pod, sa, app) in [
        ("backend-1", "backend", "backend"),
        ("frontend-1", "frontend", "frontend"),
    ] {
        cluster::create_service_account(&ns, sa).await;
        cluster::create_pod(&ns, pod, &[("app", app)], sa, &[("http", 8080)]).await;
    }
    let backend_token = cluster::token_request(&ns, "backend", "meshflow", 3600).await;
    let frontend_token = cluster::token_request(&ns, "frontend", "meshflow", 3600).await;
    let (backend, _a) = w.sidecar(&cp, "backend-1", "backend", &backend_token).await;
    let (frontend, _b) = w
        .sidecar(&cp, "frontend-1", "frontend", &frontend_token)
        .await;
    for p in [&backend, &frontend] {
        wait_for("sidecar ready", Duration::from_secs(20), || async {
            get_text(&p.address("admin"), "/ready")
                .await
                .starts_with("ready")
                .then_some(())
        })
        .await;
    }
    assert!(mtls_get(&w, &backend, "frontend", "/admin")
        .await
        .contains("200"));
    let deny = "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: deny-admin }\nspec:\n  selector: { matchLabels: { app: backend } }\n  action: DENY\n  rules: [{ to: [{ operation: { paths: [\"/admin\"] } }] }]\n";
    let applied = Instant::now();
    let out = w.kubectl_apply(deny);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    within(
        "DENY policy in force in the backend's sidecar after kubectl apply",
        applied,
        Duration::from_secs(2),
        || async {
            mtls_get(&w, &backend, "frontend", "/admin")
                .await
                .contains("403")
        },
    )
    .await;
    let deny_version = config_dump(&backend).await["version"].as_u64().unwrap();
    assert!(mtls_get(&w, &backend, "frontend", "/other")
        .await
        .contains("200"));
    // The frontend is not selected: once its sidecar has the version that carried the DENY
    // (or a newer one), it still lets /admin through.
    wait_for(
        "the frontend at the DENY's version",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(&frontend).await;
            (dump["version"].as_u64()? >= deny_version).then_some(())
        },
    )
    .await;
    assert!(mtls_get(&w, &frontend, "backend", "/admin")
        .await
        .contains("200"));
    let (status, ..) = wait_accepted(
        &ns,
        "authorizationpolicy",
        "deny-admin",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, "True");

    // An invalid update (CUSTOM passes the schema; the control plane refuses it): Accepted
    // False naming the field, and the previous good version stays in force.
    let custom = deny.replace("action: DENY", "action: CUSTOM");
    let out = w.kubectl_apply(&custom);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, reason, message) = wait_accepted(
        &ns,
        "authorizationpolicy",
        "deny-admin",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Invalid"),
        "{message}"
    );
    assert!(message.contains("spec.action"), "{message}");
    assert!(
        message.contains("the last accepted, stays in force"),
        "{message}"
    );
    assert!(mtls_get(&w, &backend, "frontend", "/admin")
        .await
        .contains("403"));
    // A new invalid policy changes nothing either.
    let version = config_dump(&backend).await["version"].as_u64().unwrap();
    let out = w.kubectl_apply(&custom.replace("deny-admin", "custom-only"));
    assert!(out.status.success());
    let (status, _, message) = wait_accepted(
        &ns,
        "authorizationpolicy",
        "custom-only",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, "False", "{message}");
    assert!(!message.contains("stays in force"), "{message}");
    assert_eq!(
        config_dump(&backend).await["version"].as_u64().unwrap(),
        version
    );
    let rejected = metric(
        &metrics(&cp.address("admin")).await,
        "meshflow_kubernetes_rejected_total",
        &[("kind", "AuthorizationPolicy")],
    );
    assert!(rejected >= 2.0, "{rejected}");

    // Deleting removes it within 2 s.
    let deleted = Instant::now();
    cluster().kubectl_ok(&["delete", "authorizationpolicy", "deny-admin", "-n", &ns]);
    within(
        "DENY policy gone from the backend's sidecar after kubectl delete",
        deleted,
        Duration::from_secs(2),
        || async {
            mtls_get(&w, &backend, "frontend", "/admin")
                .await
                .contains("200")
        },
    )
    .await;
}

/// The holder of the Lease and whether each replica says it leads.
async fn leader_metric(cp: &Proc) -> f64 {
    metric(
        &metrics(&cp.address("admin")).await,
        "meshflow_control_plane_leader",
        &[],
    )
}

/// Acceptance 4: two replicas both serve Watch; only the leader writes status; after kill -9 of
/// the leader the other writes status within the lease duration + 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_serve_config_and_the_survivor_of_a_killed_leader_writes_status() {
    let w = World::new("leader").await;
    let ns = w.name().to_string();
    let mut a = w.control_plane("cp-a", &[]);
    // a has the lease before b starts.
    wait_for("cp-a leads", Duration::from_secs(10), || async {
        (leader_metric(&a).await == 1.0).then_some(())
    })
    .await;
    let b = w.control_plane("cp-b", &[]);
    for (pod, sa) in [("one-1", "one"), ("two-1", "two")] {
        cluster::create_service_account(&ns, sa).await;
        cluster::create_pod(&ns, pod, &[("app", sa)], sa, &[("http", 8080)]).await;
    }
    let t1 = cluster::token_request(&ns, "one", "meshflow", 3600).await;
    let t2 = cluster::token_request(&ns, "two", "meshflow", 3600).await;
    let (s1, _x) = w.sidecar(&a, "one-1", "one", &t1).await;
    let (s2, _y) = w.sidecar(&b, "two-1", "two", &t2).await;
    for s in [&s1, &s2] {
        wait_for(
            "a config from each replica",
            Duration::from_secs(20),
            || async { config_dump(s).await["version"].as_u64() },
        )
        .await;
    }
    let policy = |name: &str| {
        format!("apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name} }}\nspec: {{ action: DENY, rules: [{{ to: [{{ operation: {{ paths: [\"/x\"] }} }}] }}] }}\n")
    };
    assert!(w.kubectl_apply(&policy("first")).status.success());
    wait_accepted(&ns, "authorizationpolicy", "first", Duration::from_secs(10)).await;
    let writes = |text: &str| {
        metric(
            text,
            "meshflow_kubernetes_status_writes_total",
            &[("result", "ok")],
        )
    };
    assert!(writes(&metrics(&a.address("admin")).await) >= 1.0);
    assert_eq!(
        writes(&metrics(&b.address("admin")).await),
        0.0,
        "the follower wrote status"
    );
    assert_eq!(leader_metric(&b).await, 0.0);
    let holder = cluster().kubectl_ok(&[
        "get",
        "lease",
        "meshflow-control-plane",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder.trim(), "cp-a");

    a.kill();
    let killed = Instant::now();
    assert!(w.kubectl_apply(&policy("second")).status.success());
    wait_accepted(
        &ns,
        "authorizationpolicy",
        "second",
        LEASE + Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "status written by the survivor {:?} after kill -9 of the leader",
        killed.elapsed()
    );
    assert!(writes(&metrics(&b.address("admin")).await) >= 1.0);
    let holder = cluster().kubectl_ok(&[
        "get",
        "lease",
        "meshflow-control-plane",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder.trim(), "cp-b");
}

pub(crate) async fn certify(
    cp: &Proc,
    ca_pem: &str,
    token: &str,
    sans: Vec<SanType>,
) -> Result<String, tonic::Status> {
    let server = control_plane_server_name();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server);
    let channel = Endpoint::from_shared(format!("https://{}", cp.address("grpc")))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    IdentityClient::new(channel)
        .certify(CertifyRequest {
            workload: String::new(),
            token: token.into(),
            csr_pem: csr,
        })
        .await
        .map(|r| r.into_inner().cert_chain_pem)
}

pub(crate) fn spiffe_of(chain_pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    meshflow_policies::spiffe::from_certificate_der(der.as_ref())
        .unwrap()
        .uri()
}

/// A ServiceAccount token signed with the cluster's real signing key, for audience `meshflow`,
/// that expired `ago` ago (TokenRequest cannot issue one shorter than 10 minutes).
fn expired_token(ns: &str, sa: &str, uid: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "aud": ["meshflow"],
        "exp": now - 60,
        "iat": now - 3660,
        "nbf": now - 3660,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": uid } },
    });
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(cluster().sa_signing_key_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap()
}

/// Acceptance 5: a real sidecar bootstraps with a TokenRequest token for `payments` and gets
/// exactly its SPIFFE ID; refused: a CSR for another service account with that token, an
/// expired token, a token for another audience, a token of a deleted service account.
#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_authenticate_certify_and_nothing_else_does() {
    let w = World::new("identity").await;
    let ns = w.name().to_string();
    let cp = w.control_plane("cp", &[]);
    let payments = cluster::create_service_account(&ns, "payments").await;
    cluster::create_pod(
        &ns,
        "payments-1",
        &[("app", "payments")],
        "payments",
        &[("http", 8080)],
    )
    .await;
    let token = cluster::token_request(&ns, "payments", "meshflow", 3600).await;
    let (sidecar, _app) = w.sidecar(&cp, "payments-1", "payments", &token).await;
    let expected = format!("spiffe://cluster.local/ns/{ns}/sa/payments");
    let got = wait_for("the sidecar's SVID", Duration::from_secs(20), || async {
        config_dump(&sidecar).await["identity"]["spiffeId"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert_eq!(got, expected);
    let ca = w.ca().await.ca_cert_pem;
    // Positive control through the raw API, and the CSR cannot change the identity.
    let chain = certify(&cp, &ca, &token, vec![])
        .await
        .expect("own identity");
    assert_eq!(spiffe_of(&chain), expected);
    let other = SanType::URI(
        format!("spiffe://cluster.local/ns/{ns}/sa/admin")
            .as_str()
            .try_into()
            .unwrap(),
    );
    let err = certify(&cp, &ca, &token, vec![other]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let uid = payments.metadata.uid.clone().unwrap();
    let err = certify(&cp, &ca, &expired_token(&ns, "payments", &uid), vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "expired: {err:?}");
    let other_audience = cluster::token_request(&ns, "payments", "not-meshflow", 3600).await;
    let err = certify(&cp, &ca, &other_audience, vec![])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "audience: {err:?}"
    );
    cluster::create_service_account(&ns, "gone").await;
    let gone = cluster::token_request(&ns, "gone", "meshflow", 3600).await;
    certify(&cp, &ca, &gone, vec![])
        .await
        .expect("valid before the deletion");
    cluster::delete_service_account(&ns, "gone").await;
    let err = wait_for(
        "the deleted account's token refused",
        Duration::from_secs(10),
        || async { certify(&cp, &ca, &gone, vec![]).await.err() },
    )
    .await;
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "deleted: {err:?}");
    // The control plane's own identity is never issued, whoever holds a token for it.
    let _ = cluster().kubectl(&["create", "namespace", "meshflow-system"]);
    let _ = cluster().kubectl(&[
        "create",
        "serviceaccount",
        "meshflow-control-plane",
        "-n",
        "meshflow-system",
    ]);
    let own = cluster::token_request(
        "meshflow-system",
        "meshflow-control-plane",
        "meshflow",
        3601,
    )
    .await;
    let err = certify(&cp, &ca, &own, vec![]).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "reserved: {err:?}"
    );
    let refused = metrics(&cp.address("admin")).await;
    assert!(
        metric(
            &refused,
            "meshflow_certify_refused_total",
            &[("reason", "bad_token")]
        ) >= 3.0
    );
}

/// Acceptance 6: a Workflow applied with kubectl is registered (status shows the version) and a
/// run started through the API completes; a Workflow with a cycle gets Accepted=False naming
/// the cycle.
#[tokio::test(flavor = "multi_thread")]
async fn workflows_applied_with_kubectl_are_registered_and_run() {
    let w = World::new("workflows").await;
    let ns = w.name().to_string();
    let cp = w.control_plane("cp", &["--workflow-api", "127.0.0.1:0"]);
    let workflow = "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: nap }\nspec:\n  steps:\n    - { name: rest, sleep: { duration: 200ms } }\n  output: { slept: true }\n";
    assert!(w.kubectl_apply(workflow).status.success());
    let (status, reason, message) =
        wait_accepted(&ns, "workflow", "nap", Duration::from_secs(10)).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Registered"),
        "{message}"
    );
    let version = cluster().kubectl_ok(&[
        "get",
        "workflow",
        "nap",
        "-n",
        &ns,
        "-o",
        "jsonpath={.status.registeredVersion}",
    ]);
    assert_eq!(version.trim(), "1");
    let table = cluster().kubectl_ok(&["get", "workflows", "-n", &ns]);
    assert!(table.lines().next().unwrap().contains("VERSION"), "{table}");

    let token = std::fs::read_to_string(w.dir.path().join("cp/workflow-api-token")).unwrap();
    let api = format!("http://{}", cp.address("workflow-api"));
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{api}/v1/runs"))
        .bearer_auth(token.trim())
        .json(&json!({ "workflow": format!("{ns}/nap"), "input": {} }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["runId"]
        .as_str()
        .or(started["id"].as_str())
        .unwrap_or_else(|| panic!("{started}"))
        .to_string();
    let run = wait_for("the run to complete", Duration::from_secs(20), || async {
        let run: Value = http
            .get(format!("{api}/v1/runs/{id}"))
            .bearer_auth(token.trim())
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (run["status"] == "Completed").then_some(run)
    })
    .await;
    assert_eq!(run["state"]["output"], json!({ "slept": true }), "{run}");

    // A Workflow calls its own namespace's services only (the coordinator is no deputy).
    let across = "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: across }\nspec:\n  steps:\n    - { name: a, call: { service: victim, namespace: elsewhere, path: /admin } }\n";
    assert!(w.kubectl_apply(across).status.success());
    let (status, _, message) =
        wait_accepted(&ns, "workflow", "across", Duration::from_secs(10)).await;
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains("spec.steps[0].call.namespace"),
        "{message}"
    );

    let cycle = "apiVersion: meshflow.io/v1alpha1\nkind: Workflow\nmetadata: { name: loop }\nspec:\n  steps:\n    - { name: a, dependsOn: [b], sleep: { duration: 1s } }\n    - { name: b, dependsOn: [a], sleep: { duration: 1s } }\n";
    assert!(w.kubectl_apply(cycle).status.success());
    let (status, reason, message) =
        wait_accepted(&ns, "workflow", "loop", Duration::from_secs(10)).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Invalid"),
        "{message}"
    );
    assert!(
        message.contains("cycle") && message.contains('a') && message.contains('b'),
        "{message}"
    );
}

/// Acceptance 8 and the last good version across restarts: a control plane started afresh
/// (new state directory: nothing but the cluster to go on) signs with the CA from its Secret,
/// serves a higher snapshot version, and still enforces the last accepted generation of a
/// policy whose current generation is invalid — read back from the object's status.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_ca_the_last_accepted_policies_and_raises_versions() {
    let w = World::new("restart").await;
    let ns = w.name().to_string();
    let mut cp = w.control_plane("cp", &[]);
    let ca_before = w.ca().await.ca_cert_pem;
    cluster::create_service_account(&ns, "web").await;
    cluster::create_pod(&ns, "web-1", &[("app", "web")], "web", &[("http", 8080)]).await;
    let token = cluster::token_request(&ns, "web", "meshflow", 3600).await;
    let (sidecar, _app) = w.sidecar(&cp, "web-1", "web", &token).await;
    let deny = "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: deny-admin }\nspec:\n  selector: { matchLabels: { app: web } }\n  action: DENY\n  rules: [{ to: [{ operation: { paths: [\"/admin\"] } }] }]\n";
    assert!(w.kubectl_apply(deny).status.success());
    wait_for("the DENY in force", Duration::from_secs(10), || async {
        mtls_get(&w, &sidecar, "other", "/admin")
            .await
            .contains("403")
            .then_some(())
    })
    .await;
    wait_accepted(
        &ns,
        "authorizationpolicy",
        "deny-admin",
        Duration::from_secs(10),
    )
    .await;
    // Break it: the current generation is invalid, the accepted one stays in force.
    assert!(w
        .kubectl_apply(&deny.replace("action: DENY", "action: CUSTOM"))
        .status
        .success());
    let (status, _, message) = wait_accepted(
        &ns,
        "authorizationpolicy",
        "deny-admin",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, "False", "{message}");
    let first = config_dump(&sidecar).await["version"].as_u64().unwrap();
    cp.kill();
    drop(sidecar);

    let cp = w.control_plane("cp-fresh", &[]);
    assert_eq!(w.ca().await.ca_cert_pem, ca_before, "the CA Secret changed");
    let (sidecar, _app2) = w.sidecar(&cp, "web-1", "web", &token).await;
    let second = wait_for(
        "a config after the restart",
        Duration::from_secs(20),
        || async { config_dump(&sidecar).await["version"].as_u64() },
    )
    .await;
    assert!(
        second > first,
        "snapshot version went from {first} to {second}"
    );
    // The restarted control plane signs with the same CA: its SVID verifies against it.
    let chain = certify(&cp, &ca_before, &token, vec![])
        .await
        .expect("certify after restart");
    assert_eq!(
        spiffe_of(&chain),
        format!("spiffe://cluster.local/ns/{ns}/sa/web")
    );
    // The last accepted generation, recorded in the status, is still enforced.
    wait_for("the sidecar ready", Duration::from_secs(20), || async {
        get_text(&sidecar.address("admin"), "/ready")
            .await
            .starts_with("ready")
            .then_some(())
    })
    .await;
    assert!(
        mtls_get(&w, &sidecar, "other", "/admin")
            .await
            .contains("403"),
        "a restart widened access"
    );
    assert!(mtls_get(&w, &sidecar, "other", "/public")
        .await
        .contains("200"));
}
