//! Issue 13: the Helm chart's RBAC is enough for the control plane to do its job, and nothing
//! else in these tests lends it more. The chart is rendered for a release of its own in the
//! test's namespace; only its ServiceAccount, ClusterRole, ClusterRoleBinding, Role and
//! RoleBinding are applied to the real kube-apiserver (which runs `--authorization-mode=RBAC`);
//! a real `meshflow-control-plane --kubernetes` then runs with a kubeconfig holding a token of
//! that ServiceAccount — not the cluster admin every other Kubernetes test uses — and has to:
//! become ready (every reflector listed), create the CA Secret, take the Lease, write
//! `Accepted` on an AuthorizationPolicy, serve a ready pod's endpoints to a sidecar over
//! Watch, and authenticate Certify by TokenReview — with no "forbidden" in its logs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use meshflow_api::Bootstrap;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::{self, cluster, wait_for, TestNamespace, SA_ISSUER};
use crate::common::{get_text, install_crypto, metric, metrics};
use crate::kubernetes::{
    certify, config_dump, control_plane_server_name, endpoints_of, spawn_with, spiffe_of, Proc,
};

/// The kinds of the chart that make up the control plane's credentials and permissions.
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// The Lease the control plane's leader election holds (control-plane/src/kubernetes/leader.rs).
const LEASE: &str = "meshflow-control-plane";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow")
}

/// Every non-empty document of a multi-document YAML stream, as JSON.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|doc| !doc.is_null())
        .map(|doc| serde_json::to_value(doc).unwrap())
        .collect()
}

/// Deletes the cluster-scoped objects the test applied (the namespace takes the rest with it).
struct ClusterScoped(Vec<(String, String)>);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for (kind, name) in &self.0 {
            let _ = Command::new(cluster().bin_dir.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&cluster().kubeconfig)
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Installs the committed CRDs (idempotent; other test processes apply the same files at the
/// same time, so a failed apply is retried) and waits until they are served.
async fn apply_crds() {
    let crds = chart_dir().join("crds").to_string_lossy().into_owned();
    wait_for("the CRDs to apply", Duration::from_secs(10), || async {
        cluster()
            .kubectl(&["apply", "-f", &crds])
            .status
            .success()
            .then_some(())
    })
    .await;
    cluster().kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "-f",
        &crds,
    ]);
}

/// A kubeconfig for `server` (CA `ca_pem`) authenticating with the bearer `token`.
fn write_kubeconfig(dir: &Path, server: &str, ca_pem: &str, user: &str, token: &str) -> PathBuf {
    let ca = dir.join("apiserver-ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "dev", "cluster": {
            "server": server,
            "certificate-authority": ca.to_string_lossy(),
        }}],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": "chart", "context": { "cluster": "dev", "user": user } }],
        "current-context": "chart",
    });
    let path = dir.join("control-plane.kubeconfig");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`; panics naming
/// `what`, with the control plane's log (a refusal by RBAC shows there).
async fn wait_on<T, F, Fut>(cp: &Proc, what: &str, timeout: Duration, mut probe: F) -> T
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
            "timed out after {timeout:?} waiting for {what}; the control plane's log:\n{}",
            cp.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Accepted condition of `kind/name` once it describes the object's current generation:
/// (status, reason, message).
fn accepted(ns: &str, kind: &str, name: &str) -> Option<(String, String, String)> {
    let out = cluster().kubectl(&["get", kind, name, "-n", ns, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let object: Value = serde_json::from_slice(&out.stdout).ok()?;
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    (condition["observedGeneration"] == object["metadata"]["generation"]).then_some(())?;
    Some((
        condition["status"].as_str()?.to_string(),
        condition["reason"].as_str()?.to_string(),
        condition["message"].as_str()?.to_string(),
    ))
}

/// `service`'s endpoints in a sidecar's `/config_dump`: "address identity", sorted.
async fn sidecar_endpoints(sidecar: &Proc, service: &str) -> Vec<String> {
    endpoints_of(&config_dump(sidecar).await, service)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_does_its_job_with_only_the_charts_rbac() {
    install_crypto();
    apply_crds().await;
    let ns = TestNamespace::new("chart-rbac").await;
    let dir = tempfile::tempdir().unwrap();
    // Cluster-scoped names derive from the release: one of its own per run.
    let release = format!("rbac-{:08x}", rand::random::<u32>());
    let chart = chart_dir().to_string_lossy().into_owned();
    let selector = format!("discoverySelector={}", ns.selector);
    let rendered = cluster().helm_ok(&[
        "template",
        &release,
        &chart,
        "--namespace",
        &ns.name,
        "--set-string",
        &selector,
    ]);
    let docs = documents(&rendered);
    let rbac: Vec<Value> = docs
        .iter()
        .filter(|d| RBAC_KINDS.iter().any(|k| d["kind"] == *k))
        .cloned()
        .collect();
    let mut kinds: Vec<&str> = rbac.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    let mut expected = RBAC_KINDS.to_vec();
    expected.sort_unstable();
    assert_eq!(kinds, expected, "one of each RBAC kind");
    let name_of = |kind: &str| -> String {
        let doc = rbac.iter().find(|d| d["kind"] == kind).unwrap();
        doc["metadata"]["name"].as_str().unwrap().to_string()
    };
    let _cleanup = ClusterScoped(vec![
        ("clusterrolebinding".into(), name_of("ClusterRoleBinding")),
        ("clusterrole".into(), name_of("ClusterRole")),
    ]);
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": &rbac });
    let out = cluster().kubectl_with_input(
        &["apply", "-n", &ns.name, "-f", "-"],
        &serde_json::to_string(&list).unwrap(),
    );
    assert!(
        out.status.success(),
        "apply the chart's RBAC: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The Deployment runs as that ServiceAccount, with that CA Secret.
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let account = name_of("ServiceAccount");
    assert_eq!(pod["serviceAccountName"], account.as_str());
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let env_value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the Deployment sets {name}"))
            .to_string()
    };
    let ca_secret = env_value("MESHFLOW_CA_SECRET");
    assert_eq!(env_value("MESHFLOW_DISCOVERY_SELECTOR"), ns.selector);

    // A token of that ServiceAccount for the apiserver (its audience is the issuer).
    let token = cluster::token_request(&ns.name, &account, SA_ISSUER, 3600).await;
    let user = format!("system:serviceaccount:{}:{account}", ns.name);
    let kubeconfig = write_kubeconfig(
        dir.path(),
        &cluster().server_url(),
        &cluster().ca_pem(),
        &user,
        &token,
    );
    // It is that account and no admin: it may not even list Secrets.
    let probe = Command::new(cluster().bin_dir.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "secrets", "-n", &ns.name])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let refusal = String::from_utf8_lossy(&probe.stderr);
    assert!(
        !probe.status.success() && refusal.contains(&format!("User \"{user}\" cannot list")),
        "the chart's account listed Secrets: {refusal}"
    );

    let state = dir.path().join("cp");
    std::fs::create_dir_all(&state).unwrap();
    let args: Vec<String> = [
        "--kubernetes",
        "--namespace",
        &ns.name,
        "--discovery-selector",
        &ns.selector,
        "--ca-secret",
        &ca_secret,
        "--pod-name",
        "cp-0",
        "--lease-duration",
        "3s",
        "--state-dir",
        &state.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let cp = spawn_with(
        dir.path(),
        "cp",
        "meshflow-control-plane",
        &args,
        &kubeconfig,
    );
    eprintln!("control plane ready in {:?}", started.elapsed());
    assert_eq!(get_text(&cp.address("admin"), "/ready").await, "ok\n");
    let out = cp.output();
    assert!(
        !out.contains("not every resource could be listed"),
        "a reflector could not list:\n{out}"
    );

    // It created the CA Secret.
    let secrets: Api<Secret> = Api::namespaced(cluster().client().await, &ns.name);
    let secret = secrets.get(&ca_secret).await.expect("the CA Secret");
    let data = secret.data.unwrap_or_default();
    assert!(data.contains_key("ca.crt") && data.contains_key("ca.key"));
    let ca_pem = String::from_utf8(data["ca.crt"].0.clone()).unwrap();

    // It took the Lease (created, then acquired by server-side apply and renewed).
    let admin = cp.address("admin");
    wait_on(&cp, "the Lease", Duration::from_secs(20), || async {
        (metric(&metrics(&admin).await, "meshflow_control_plane_leader", &[]) == 1.0).then_some(())
    })
    .await;
    let holder = cluster().kubectl_ok(&[
        "get",
        "lease",
        LEASE,
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "cp-0");
    // Renewals (strategic-merge patches) keep it: still the leader after two lease durations.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metric(&metrics(&admin).await, "meshflow_control_plane_leader", &[]),
        1.0
    );

    // It writes status (a merge patch on authorizationpolicies/status).
    let policy = "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: deny-admin }\nspec:\n  selector: { matchLabels: { app: backend } }\n  action: DENY\n  rules: [{ to: [{ operation: { paths: [\"/admin\"] } }] }]\n";
    let out = cluster().kubectl_with_input(&["apply", "-n", &ns.name, "-f", "-"], policy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, reason, message) = wait_on(
        &cp,
        "Accepted on the AuthorizationPolicy",
        Duration::from_secs(10),
        || async { accepted(&ns.name, "authorizationpolicy", "deny-admin") },
    )
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Accepted"),
        "{message}"
    );

    // It serves a ready pod's endpoints to a sidecar, which Certify authenticated by
    // TokenReview.
    for account in ["backend", "frontend"] {
        cluster::create_service_account(&ns.name, account).await;
    }
    cluster::create_service(
        &ns.name,
        "backend",
        &[("app", "backend")],
        &[("http", 80, 8080)],
    )
    .await;
    for (pod, app, ip) in [
        ("backend-1", "backend", "10.78.0.1"),
        ("frontend-1", "frontend", "10.78.1.1"),
    ] {
        cluster::create_pod(&ns.name, pod, &[("app", app)], app, &[("http", 8080)]).await;
        cluster::set_pod_ready(&ns.name, pod, ip, true).await;
    }
    let app = spawn_with(
        dir.path(),
        "frontend-app",
        "meshflow-echo",
        &[
            "--name".into(),
            "frontend-1".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &kubeconfig,
    );
    let app_port = app.address("http").rsplit(':').next().unwrap().to_string();
    let frontend_token = cluster::token_request(&ns.name, "frontend", "meshflow", 3600).await;
    let bootstrap = Bootstrap {
        control_plane: cp.address("grpc"),
        control_plane_server_name: control_plane_server_name(),
        trust_bundle_pem: ca_pem.clone(),
        workload: format!("{}/frontend-1", ns.name),
        spiffe_id: format!("spiffe://cluster.local/ns/{}/sa/frontend", ns.name),
        token: frontend_token,
        token_file: None,
        app_auth_secret: None,
    };
    let bootstrap_path = dir.path().join("frontend-1.bootstrap.json");
    std::fs::write(&bootstrap_path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    let sidecar = spawn_with(
        dir.path(),
        "frontend-sidecar",
        "meshflow-proxy",
        &[
            "--bootstrap".into(),
            bootstrap_path.display().to_string(),
            "--app-port".into(),
            app_port,
        ],
        &kubeconfig,
    );
    let backend_id = format!("spiffe://cluster.local/ns/{}/sa/backend", ns.name);
    let want = vec![format!("10.78.0.1:15006 {backend_id}")];
    wait_on(
        &cp,
        "backend-1 in the sidecar's endpoints",
        Duration::from_secs(20),
        || async { (sidecar_endpoints(&sidecar, "backend").await == want).then_some(()) },
    )
    .await;
    let dump: Value =
        serde_json::from_str(&get_text(&sidecar.address("admin"), "/config_dump").await).unwrap();
    assert_eq!(
        dump["identity"]["spiffeId"],
        format!("spiffe://cluster.local/ns/{}/sa/frontend", ns.name)
    );

    // A raw Certify: the reviewed token's account is the identity; a token the review refuses
    // is Unauthenticated (the review ran), not Unavailable (the review could not be made).
    let backend_token = cluster::token_request(&ns.name, "backend", "meshflow", 3600).await;
    let chain = certify(&cp, &ca_pem, &backend_token, vec![])
        .await
        .expect("Certify with backend's token");
    assert_eq!(spiffe_of(&chain), backend_id);
    let other = cluster::token_request(&ns.name, "backend", "not-meshflow", 3600).await;
    let err = certify(&cp, &ca_pem, &other, vec![]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let text = metrics(&admin).await;
    for (name, labels) in [
        (
            "meshflow_certify_refused_total",
            [("reason", "token_review_failed")],
        ),
        (
            "meshflow_kubernetes_status_writes_total",
            [("result", "error")],
        ),
    ] {
        assert_eq!(metric(&text, name, &labels), 0.0, "{name} {labels:?}");
    }
    let out = cp.output();
    assert!(
        !out.to_lowercase().contains("forbidden"),
        "the control plane was refused something:\n{out}"
    );
}
