//! The real Kubernetes control plane the Kubernetes tests run against: etcd, kube-apiserver and
//! kube-controller-manager v1.20.2 started by `scripts/dev-cluster up` (the same script a person
//! uses by hand), shared by every test process through the script's idempotence. Each test works
//! in its own [`TestNamespace`].
//!
//! There is no scheduler, kubelet or container runtime: [`create_pod`] binds a pod to a fake
//! [`create_node`] and [`set_pod_ready`] writes `pods/status` the way a kubelet would, which is
//! enough for kube-controller-manager's Endpoints and EndpointSlice controllers. The server is
//! 1.20: EndpointSlices are served as `discovery.k8s.io/v1beta1` only ([`endpoint_slices`]).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::common::install_crypto;

/// The label every [`TestNamespace`] carries, with the namespace's name as its value.
pub const TEST_LABEL: &str = "meshflow.io/test";

/// The `iss` of the cluster's ServiceAccount tokens (`--service-account-issuer`).
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The node [`create_pod`] binds pods to (created on first use).
pub const TEST_NODE: &str = "meshflow-test-node";

/// A running dev cluster (see `scripts/dev-cluster`).
#[derive(Debug)]
pub struct Cluster {
    /// Admin kubeconfig (static bearer token, `system:masters`).
    pub kubeconfig: PathBuf,
    /// The cluster's run directory: `pki/` (CA, `sa.key`), logs, etcd data.
    pub run_dir: PathBuf,
    /// Holds `kubectl` (1.20.2) and `helm` (3.x).
    pub bin_dir: PathBuf,
}

/// The dev cluster, started (or found running) by `scripts/dev-cluster up` once per process.
/// `MESHFLOW_DEV_CLUSTER_DIR`, when set, names its run directory (`scripts/test` gives each run
/// its own). Panics with the script's output when the cluster cannot be started.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

fn start_cluster() -> Cluster {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-cluster");
    let started = Instant::now();
    let output = Command::new(&script)
        .arg("up")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{} up` failed ({}):\n{stdout}{stderr}",
        script.display(),
        output.status
    );
    // stdout is `export KUBECONFIG=<run dir>/admin.kubeconfig` and `export PATH=<bin dir>:$PATH`.
    let export = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("`dev-cluster up` printed no {name}:\n{stdout}{stderr}"))
            .to_owned()
    };
    let kubeconfig = PathBuf::from(export("KUBECONFIG"));
    let bin_dir = PathBuf::from(
        export("PATH")
            .strip_suffix(":$PATH")
            .expect("PATH export ends in :$PATH"),
    );
    let run_dir = kubeconfig
        .parent()
        .expect("kubeconfig is in the run dir")
        .to_owned();
    eprintln!(
        "dev cluster ready in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        run_dir.display()
    );
    Cluster {
        kubeconfig,
        run_dir,
        bin_dir,
    }
}

impl Cluster {
    /// A kube-rs client with the admin kubeconfig. Make one per test (a client belongs to the
    /// tokio runtime it was made on).
    pub async fn client(&self) -> kube::Client {
        install_crypto();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("read the kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig to client config");
        kube::Client::try_from(config).expect("kube client")
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS` (kubectl 1.20.2, the server's version).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, "")
    }

    /// Like [`Cluster::kubectl`], with `input` on its stdin (`kubectl apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run_with_input(command, input)
    }

    /// Runs `kubectl ARGS` and returns its stdout; panics with stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        expect_success("kubectl", args, self.kubectl(args))
    }

    /// Runs `helm --kubeconfig <admin> ARGS` (helm 3), with helm's caches in the run dir.
    pub fn helm(&self, args: &[&str]) -> Output {
        let home = self.run_dir.join("helm");
        let mut command = Command::new(self.bin_dir.join("helm"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        run_with_input(command, "")
    }

    /// Runs `helm ARGS` and returns its stdout; panics with stderr when it fails.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        expect_success("helm", args, self.helm(args))
    }

    /// The PEM (PKCS#8) RSA key the apiserver signs and verifies ServiceAccount tokens with
    /// (issuer [`SA_ISSUER`]): tests forge tokens with it, such as expired ones.
    pub fn sa_signing_key_pem(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("pki/sa.key")).expect("read pki/sa.key")
    }

    /// The apiserver's CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("pki/ca.crt")).expect("read pki/ca.crt")
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        let kubeconfig = std::fs::read_to_string(&self.kubeconfig).expect("read the kubeconfig");
        kubeconfig
            .lines()
            .find_map(|line| line.trim().strip_prefix("server: "))
            .expect("kubeconfig names a server")
            .to_owned()
    }
}

fn run_with_input(mut command: Command, input: &str) -> Output {
    use std::io::Write;
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A writer thread: a large input must not deadlock against a full stdout pipe.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let _ = writer.join();
    output
}

fn expect_success(tool: &str, args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "{tool} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// A namespace of its own for one test: a unique name from `prefix`, labelled
/// `meshflow.io/test=<name>`; deleted (without waiting) when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    pub name: String,
    /// `meshflow.io/test=<name>`, a label selector for the namespace.
    pub selector: String,
}

impl TestNamespace {
    /// Creates the namespace and waits until kube-controller-manager has made its `default`
    /// ServiceAccount (pods are refused before that).
    pub async fn new(prefix: &str) -> TestNamespace {
        let client = cluster().client().await;
        // DNS-1123 label: lowercase alphanumerics and '-', at most 63 characters.
        let mut prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        prefix.truncate(50);
        let name = format!("{}-{:08x}", prefix.trim_matches('-'), rand::random::<u32>());
        let namespace: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { TEST_LABEL: name } },
        }))
        .expect("namespace object");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let accounts = Api::<ServiceAccount>::namespaced(client, &name);
        wait_for(
            &format!("ServiceAccount {name}/default"),
            Duration::from_secs(30),
            || async { accounts.get_opt("default").await.ok().flatten() },
        )
        .await;
        TestNamespace {
            selector: format!("{TEST_LABEL}={name}"),
            name,
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous but not waiting for the deletion itself: a `--wait=false` delete returns
        // as soon as the namespace is marked Terminating; kube-controller-manager empties it.
        // Pods go first, at once: with no kubelet to confirm a graceful deletion, a pod made
        // without `terminationGracePeriodSeconds: 0` would keep the namespace Terminating.
        for args in [
            &[
                "delete",
                "pods",
                "--all",
                "-n",
                &self.name,
                "--grace-period=0",
                "--force",
            ][..],
            &["delete", "namespace", &self.name, "--wait=false"][..],
        ] {
            let _ = Command::new(cluster().bin_dir.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&cluster().kubeconfig)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`; panics naming
/// `what` after that.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client() -> kube::Client {
    cluster().client().await
}

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a well-formed object")
}

/// Creates the Node `name` (no kubelet behind it) that pods name in `spec.nodeName`; the
/// EndpointSlice controller skips pods whose node it cannot find. Nodes are cluster-wide and
/// shared: an existing one is fine.
pub async fn create_node(name: &str) {
    let node: Node = object(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
    }));
    match Api::<Node>::all(client().await)
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("create node {name}: {e}"),
    }
}

/// Creates pod `ns/name` with `labels`, running as `service_account`, one container `app`
/// exposing `container_ports` (name, port), bound to [`TEST_NODE`]
/// (`automountServiceAccountToken: false`: nothing could mount it). It stays Pending until
/// [`set_pod_ready`].
///
/// The pod counts as meshed: it carries the annotation injection writes
/// (`meshflow.io/injected`), so the control plane makes it an endpoint once Ready. A pod
/// without a sidecar: [`create_unmeshed_pod`].
pub async fn create_pod(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    service_account: &str,
    container_ports: &[(&str, u16)],
) -> Pod {
    create_pod_with(ns, name, labels, service_account, container_ports, true).await
}

/// [`create_pod`] for a pod that runs no sidecar (no injection annotation): never an
/// endpoint, and a Service with only such pods is not meshed.
pub async fn create_unmeshed_pod(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    service_account: &str,
    container_ports: &[(&str, u16)],
) -> Pod {
    create_pod_with(ns, name, labels, service_account, container_ports, false).await
}

async fn create_pod_with(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    service_account: &str,
    container_ports: &[(&str, u16)],
    meshed: bool,
) -> Pod {
    create_node(TEST_NODE).await;
    let annotations = if meshed {
        json!({ meshflow_policies::inject::INJECTED: meshflow_policies::inject::VERSION })
    } else {
        json!({})
    };
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), json!(value)))
        .collect();
    let ports: Vec<serde_json::Value> = container_ports
        .iter()
        .map(|(port_name, port)| json!({ "name": port_name, "containerPort": port, "protocol": "TCP" }))
        .collect();
    let pod: Pod = object(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels, "annotations": annotations },
        "spec": {
            "nodeName": TEST_NODE,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            // No kubelet confirms a graceful deletion: without this a deleted pod (and its
            // namespace) would stay Terminating forever.
            "terminationGracePeriodSeconds": 0,
            "containers": [{ "name": "app", "image": "meshflow.invalid/app:test", "ports": ports }],
        },
    }));
    Api::<Pod>::namespaced(client().await, ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"))
}

/// Deletes pod `ns/name` at once (grace period 0: no kubelet would confirm a graceful one).
pub async fn delete_pod(ns: &str, name: &str) {
    Api::<Pod>::namespaced(client().await, ns)
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap_or_else(|e| panic!("delete pod {ns}/{name}: {e}"));
}

/// Writes `pods/status` as a kubelet would: phase Running, `podIP`/`podIPs` = `ip`, and the
/// Ready and ContainersReady conditions = `ready`.
pub async fn set_pod_ready(ns: &str, name: &str, ip: &str, ready: bool) -> Pod {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let ready = if ready { "True" } else { "False" };
    let condition = |kind: &str, status: &str| json!({ "type": kind, "status": status, "lastTransitionTime": now });
    let status = json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "startTime": now,
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
        }
    });
    Api::<Pod>::namespaced(client().await, ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch status of pod {ns}/{name}: {e}"))
}

/// Creates Service `ns/name` (type ClusterIP, an address is allocated) selecting `selector`,
/// with `ports` (name, port, target port).
pub async fn create_service(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[(&str, u16, u16)],
) -> Service {
    let selector: serde_json::Map<String, serde_json::Value> = selector
        .iter()
        .map(|(key, value)| ((*key).to_owned(), json!(value)))
        .collect();
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port_name, port, target_port)| {
            json!({ "name": port_name, "port": port, "targetPort": target_port, "protocol": "TCP" })
        })
        .collect();
    let service: Service = object(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "type": "ClusterIP", "selector": selector, "ports": ports },
    }));
    Api::<Service>::namespaced(client().await, ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap_or_else(|e| panic!("create service {ns}/{name}: {e}"))
}

pub async fn create_service_account(ns: &str, name: &str) -> ServiceAccount {
    let account: ServiceAccount = object(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": { "name": name, "namespace": ns },
    }));
    Api::<ServiceAccount>::namespaced(client().await, ns)
        .create(&PostParams::default(), &account)
        .await
        .unwrap_or_else(|e| panic!("create service account {ns}/{name}: {e}"))
}

/// Deletes ServiceAccount `ns/name` and returns once the apiserver's token authenticator has
/// seen it go: from then on its tokens are refused, except one that had a successful review in
/// the last 10 s (kube-apiserver caches successful token authentications for 10 s).
pub async fn delete_service_account(ns: &str, name: &str) {
    // The authenticator looks accounts up in an informer cache that trails the delete by a
    // moment. A probe token of the account shows when it has caught up; each review of it names
    // one more audience, so no review hits the success cache (keyed by token and audiences).
    let probe = token_request(ns, name, "meshflow-harness-probe", 600).await;
    Api::<ServiceAccount>::namespaced(client().await, ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete service account {ns}/{name}: {e}"));
    let mut attempt = 0u32;
    wait_for(
        &format!("the apiserver to refuse tokens of deleted {ns}/{name}"),
        Duration::from_secs(30),
        || {
            attempt += 1;
            let audiences = ["meshflow-harness-probe".to_owned(), format!("attempt-{attempt}")];
            let probe = probe.clone();
            async move {
                (review(&probe, &audiences).await.authenticated != Some(true)).then_some(())
            }
        },
    )
    .await;
}

/// A TokenRequest token for ServiceAccount `ns/sa` with `audience`, valid for
/// `expiration_seconds` (the apiserver refuses less than 600). Two requests for the same
/// account, audience and expiry within one second return the same token (1.20 puts no `jti`
/// in it), and with it the same cached review.
pub async fn token_request(ns: &str, sa: &str, audience: &str, expiration_seconds: i64) -> String {
    let request: TokenRequest = object(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "audiences": [audience], "expirationSeconds": expiration_seconds },
    }));
    Api::<ServiceAccount>::namespaced(client().await, ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("token request for {ns}/{sa}: {e}"))
        .status
        .map(|status| status.token)
        .unwrap_or_else(|| panic!("token request for {ns}/{sa} returned no status"))
}

/// What the apiserver's TokenReview says of `token` for `audience` (`authenticated`,
/// `user.username` = `system:serviceaccount:<ns>:<sa>`, or `error`).
pub async fn token_review(token: &str, audience: &str) -> TokenReviewStatus {
    review(token, &[audience.to_owned()]).await
}

async fn review(token: &str, audiences: &[String]) -> TokenReviewStatus {
    let review: TokenReview = object(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": { "token": token, "audiences": audiences },
    }));
    Api::<TokenReview>::all(client().await)
        .create(&PostParams::default(), &review)
        .await
        .expect("create TokenReview")
        .status
        .unwrap_or_default()
}

/// The `discovery.k8s.io/v1beta1` EndpointSlices of Service `ns/service` (as JSON; 1.20 serves
/// no v1), read with kubectl.
pub fn endpoint_slices(ns: &str, service: &str) -> Vec<serde_json::Value> {
    let text = cluster().kubectl_ok(&[
        "get",
        "endpointslices.v1beta1.discovery.k8s.io",
        "-n",
        ns,
        "-l",
        &format!("kubernetes.io/service-name={service}"),
        "-o",
        "json",
    ]);
    let list: serde_json::Value = serde_json::from_str(&text).expect("kubectl -o json");
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The endpoints of Service `ns/service` across its EndpointSlices: (address, ready), sorted.
pub fn endpoint_slice_addresses(ns: &str, service: &str) -> Vec<(String, bool)> {
    let mut addresses: Vec<(String, bool)> = endpoint_slices(ns, service)
        .iter()
        .flat_map(|slice| slice["endpoints"].as_array().cloned().unwrap_or_default())
        .flat_map(|endpoint| {
            let ready = endpoint["conditions"]["ready"].as_bool().unwrap_or(false);
            endpoint["addresses"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |address| Some((address.as_str()?.to_owned(), ready)))
        })
        .collect();
    addresses.sort();
    addresses
}

/// A CRD of the harness's own (cluster-wide, so applied idempotently by every run).
const HARNESS_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: { name: harnesschecks.test.meshflow.io }
spec:
  group: test.meshflow.io
  scope: Namespaced
  names: { plural: harnesschecks, singular: harnesscheck, kind: HarnessCheck }
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: { type: integer }
"#;

#[tokio::test]
async fn cluster_comes_up_and_serves_crud() {
    let cluster = cluster();
    assert!(cluster.server_url().starts_with("https://127.0.0.1:"));
    let ns = TestNamespace::new("cluster").await;
    let labels = cluster.kubectl_ok(&[
        "get",
        "namespace",
        &ns.name,
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(labels.contains(&ns.name), "namespace labels: {labels}");
    let selected = cluster.kubectl_ok(&["get", "namespaces", "-l", &ns.selector, "-o", "name"]);
    assert_eq!(selected.trim(), format!("namespace/{}", ns.name));

    // A pod made Ready by hand, selected by a Service: kube-controller-manager's EndpointSlice
    // controller lists it, and follows it to NotReady.
    create_pod(
        &ns.name,
        "web-0",
        &[("app", "web")],
        "default",
        &[("http", 8080)],
    )
    .await;
    set_pod_ready(&ns.name, "web-0", "10.244.0.5", true).await;
    let pod = Api::<Pod>::namespaced(cluster.client().await, &ns.name)
        .get("web-0")
        .await
        .expect("get pod");
    let status = pod.status.expect("pod status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.5"));
    let service = create_service(&ns.name, "web", &[("app", "web")], &[("http", 80, 8080)]).await;
    let cluster_ip = service.spec.and_then(|spec| spec.cluster_ip);
    assert!(
        cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.96.")),
        "cluster IP {cluster_ip:?}"
    );
    wait_for(
        "a ready endpoint in web's EndpointSlice",
        Duration::from_secs(30),
        || async {
            (endpoint_slice_addresses(&ns.name, "web") == [("10.244.0.5".to_owned(), true)])
                .then_some(())
        },
    )
    .await;
    let slice = &endpoint_slices(&ns.name, "web")[0];
    assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1beta1");
    assert_eq!(slice["ports"][0]["port"], 8080, "slice: {slice}");
    assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "web-0");
    set_pod_ready(&ns.name, "web-0", "10.244.0.5", false).await;
    wait_for(
        "the endpoint to turn not ready",
        Duration::from_secs(30),
        || async {
            (endpoint_slice_addresses(&ns.name, "web") == [("10.244.0.5".to_owned(), false)])
                .then_some(())
        },
    )
    .await;

    // TokenRequest + TokenReview with audience `meshflow`.
    create_service_account(&ns.name, "payments").await;
    let token = token_request(&ns.name, "payments", "meshflow", 600).await;
    // (Asked for in the same second with the same expiry, it would be the same JWT as `token`.)
    let unreviewed = token_request(&ns.name, "payments", "meshflow", 601).await;
    assert_ne!(token, unreviewed);
    let review = token_review(&token, "meshflow").await;
    assert_eq!(review.authenticated, Some(true), "review: {review:?}");
    assert_eq!(
        review.user.and_then(|user| user.username),
        Some(format!("system:serviceaccount:{}:payments", ns.name))
    );
    let other = token_review(&token, "another-audience").await;
    assert_ne!(other.authenticated, Some(true), "review: {other:?}");
    delete_service_account(&ns.name, "payments").await;
    // A token of a deleted account is refused (`token` itself may pass for up to 10 s more:
    // the apiserver caches its successful review).
    let refused = token_review(&unreviewed, "meshflow").await;
    assert_ne!(refused.authenticated, Some(true), "review: {refused:?}");

    // Custom resources (the build swaps the vendored reflect2 that crashes the apiserver on the
    // first custom-resource create under Go >= 1.18), applied through kubectl's stdin.
    // (Retried: tests in other processes may be creating the same CRD at this moment.)
    wait_for(
        "the harness CRD to apply",
        Duration::from_secs(10),
        || async {
            (cluster.kubectl_with_input(&["apply", "-f", "-"], HARNESS_CRD))
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/harnesschecks.test.meshflow.io",
    ]);
    let check = |name: &str, size: &str| {
        format!(
            "apiVersion: test.meshflow.io/v1\nkind: HarnessCheck\n\
             metadata: {{name: {name}, namespace: {}}}\nspec: {{size: {size}}}\n",
            ns.name
        )
    };
    let created = cluster.kubectl_with_input(&["create", "-f", "-"], &check("one", "3"));
    assert!(
        created.status.success(),
        "create custom resource: {created:?}"
    );
    let refused = cluster.kubectl_with_input(&["create", "-f", "-"], &check("two", "three"));
    assert!(
        !refused.status.success(),
        "a wrongly typed field is refused"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("spec.size"),
        "{refused:?}"
    );

    assert!(cluster.sa_signing_key_pem().contains("PRIVATE KEY"));
    assert!(cluster.helm_ok(&["version", "--short"]).starts_with("v3."));

    // Dropping the namespace deletes it, pods and all, without a kubelet.
    let name = ns.name.clone();
    drop(ns);
    let namespaces = Api::<Namespace>::all(cluster.client().await);
    wait_for(
        &format!("namespace {name} to be gone"),
        Duration::from_secs(60),
        || async {
            namespaces
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
}
