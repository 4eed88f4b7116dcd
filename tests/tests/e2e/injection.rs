//! Issue 14, acceptance 1 and 2: sidecar injection through the real kube-apiserver of
//! `scripts/dev-cluster`. Each test runs its own Kubernetes-mode control plane with the webhook
//! on `127.0.0.1:0` (certificate from the mesh CA for the IP), and registers its own
//! MutatingWebhookConfiguration — `clientConfig.url` (no Service routing here), scoped by its
//! namespaceSelector to the test's own namespace label, so parallel tests never meet it — which
//! the control plane fills with its `caBundle`. The configuration is deleted when the test ends
//! ([`WebhookConfiguration`]'s Drop). The API server is 1.20: it cannot store a native sidecar,
//! so that variant is checked on the webhook's JSON Patch.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use meshflow_api::ReadyFile;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use meshflow_policies::inject::json_patch;

use crate::cluster::{cluster, wait_for, TestNamespace, TEST_LABEL};
use crate::common::{fill_per_address_cap, install_crypto, metric, metrics};

/// The proxy image the tests inject (never pulled: there is no kubelet).
const PROXY_IMAGE: &str = "meshflow.invalid/proxy:test";

/// A Kubernetes-mode control plane with the webhook; killed when dropped.
struct ControlPlane {
    child: Child,
    ready: ReadyFile,
    log: std::path::PathBuf,
}

impl ControlPlane {
    fn injector(&self) -> std::net::SocketAddr {
        self.ready.address("injector").unwrap().parse().unwrap()
    }

    fn admin(&self) -> String {
        self.ready.address("admin").unwrap().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster-scoped MutatingWebhookConfiguration of this test; deleted when dropped.
/// A MutatingWebhookConfiguration of a test, deleted when dropped.
pub(crate) struct WebhookConfiguration(pub(crate) String);

impl Drop for WebhookConfiguration {
    fn drop(&mut self) {
        let _ = cluster().kubectl(&[
            "delete",
            "mutatingwebhookconfiguration",
            &self.0,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// The flags both the control plane and `meshflow inject` run with, so their pods compare.
fn proxy_flags(ns: &str) -> Vec<String> {
    [
        "--proxy-image",
        PROXY_IMAGE,
        "--proxy-control-plane",
        &format!("meshflow-control-plane.{ns}.svc:15012"),
        "--proxy-exclude-outbound-cidrs",
        "169.254.169.254/32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Installs the committed CRDs (the control plane lists them; idempotent, the cluster is
/// shared, so concurrent applies are retried).
async fn apply_crds() {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds");
    let crds = crds.to_string_lossy().into_owned();
    wait_for("the CRDs to apply", Duration::from_secs(20), || async {
        cluster()
            .kubectl(&["apply", "-f", &crds])
            .status
            .success()
            .then_some(())
    })
    .await;
}

/// Starts `meshflow-control-plane --kubernetes` for `ns` with the webhook (and `extra` flags),
/// as the cluster admin.
async fn control_plane(ns: &TestNamespace, dir: &Path, name: &str, extra: &[&str]) -> ControlPlane {
    control_plane_as(ns, dir, name, extra, &cluster().kubeconfig).await
}

/// [`control_plane`] with the credentials in `kubeconfig`.
async fn control_plane_as(
    ns: &TestNamespace,
    dir: &Path,
    name: &str,
    extra: &[&str],
    kubeconfig: &Path,
) -> ControlPlane {
    install_crypto();
    apply_crds().await;
    let state = dir.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let ready = dir.join(format!("{name}.ready.json"));
    let log = dir.join(format!("{name}.log"));
    let mut args: Vec<String> = [
        "--kubernetes",
        "--namespace",
        &ns.name,
        "--discovery-selector",
        &ns.selector,
        "--pod-name",
        name,
        "--injector-listen",
        "127.0.0.1:0",
        "--injector-host",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--state-dir".into());
    args.push(state.display().to_string());
    args.push("--ready-file".into());
    args.push(ready.display().to_string());
    args.extend(proxy_flags(&ns.name));
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(meshflow_cli::supervisor::find_program(
        "meshflow-control-plane",
    ))
    .args(&args)
    .env("KUBECONFIG", kubeconfig)
    .env("MESHFLOW_LOG", "info,kube=warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .expect("meshflow-control-plane runs (cargo build --bins)");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(file) = ReadyFile::read(&ready) {
            return ControlPlane {
                child,
                ready: file,
                log,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "control plane exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "control plane not ready in 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Labels namespace `ns` with `labels` (`key=value`, overwriting).
fn label(ns: &str, labels: &[&str]) {
    let mut args = vec!["label", "namespace", ns, "--overwrite"];
    args.extend_from_slice(labels);
    cluster().kubectl_ok(&args);
}

/// Registers the webhook `https://<injector>/inject` for pod creations in namespaces labelled
/// `meshflow.io/inject: enabled` *and* `meshflow.io/test: <scope>` — the chart's webhook plus
/// the test scope — without a caBundle: the control plane (`--injector-webhook-config`) sets it.
pub(crate) fn register_webhook(
    name: &str,
    scope: &str,
    injector: impl std::fmt::Display,
) -> WebhookConfiguration {
    let configuration = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": "inject.meshflow.io",
            "clientConfig": { "url": format!("https://{injector}/inject") },
            "rules": [{
                "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced",
            }],
            "namespaceSelector": { "matchLabels": {
                "meshflow.io/inject": "enabled", TEST_LABEL: scope,
            }},
            "objectSelector": { "matchExpressions": [{
                "key": "meshflow.io/inject", "operator": "NotIn", "values": ["disabled"],
            }]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1", "v1beta1"],
            "timeoutSeconds": 10,
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
        }],
    });
    let guard = WebhookConfiguration(name.to_string());
    let out = cluster().kubectl_with_input(&["apply", "-f", "-"], &configuration.to_string());
    assert!(out.status.success(), "register the webhook: {out:?}");
    guard
}

const WEB: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: { app: web }
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
    - name: app
      image: meshflow.invalid/web:1
      ports: [{ name: http, containerPort: 8080 }]
      livenessProbe:
        httpGet: { path: /healthz, port: http, httpHeaders: [{ name: x-probe, value: kubelet }] }
        periodSeconds: 7
      readinessProbe:
        tcpSocket: { port: 8080 }
"#;

fn pod_yaml(name: &str, extra_metadata: &str) -> String {
    WEB.replace(
        "  name: web\n",
        &format!("  name: {name}\n{extra_metadata}"),
    )
}

fn get_pod(ns: &str, name: &str) -> Value {
    serde_json::from_str(&cluster().kubectl_ok(&["get", "pod", name, "-n", ns, "-o", "json"]))
        .unwrap()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Every field of `part` is in `whole` with the same value (arrays element by element):
/// `whole` may hold more — the API server's defaults.
fn assert_subset(part: &Value, whole: &Value, path: &str) {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => {
            for (k, v) in p {
                let sub = format!("{path}.{k}");
                let Some(wv) = w.get(k) else {
                    panic!("{sub}: missing from the stored pod ({v})");
                };
                assert_subset(v, wv, &sub);
            }
        }
        (Value::Array(p), Value::Array(w)) => {
            assert_eq!(p.len(), w.len(), "{path}: {part} vs {whole}");
            for (i, (pv, wv)) in p.iter().zip(w).enumerate() {
                assert_subset(pv, wv, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(part, whole, "{path}"),
    }
}

/// `kubectl apply -f -` in `ns`; returns (success, stdout + stderr).
fn apply(ns: &str, yaml: &str) -> (bool, String) {
    let out = cluster().kubectl_with_input(&["apply", "-n", ns, "-f", "-"], yaml);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_created_with_kubectl_are_stored_injected_and_meshflow_inject_agrees() {
    let ns = TestNamespace::new("inject").await;
    label(&ns.name, &["meshflow.io/inject=enabled"]);
    // Another namespace inside the test's scope (same test label) but not enabled.
    let other = TestNamespace::new("inject-other").await;
    label(&other.name, &[&format!("{TEST_LABEL}={}", ns.name)]);
    let dir = tempfile::tempdir().unwrap();
    let webhook_name = format!("meshflow-injector-{}", ns.name);
    let cp = control_plane(
        &ns,
        dir.path(),
        "cp",
        &["--injector-webhook-config", &webhook_name],
    )
    .await;
    let _webhook = register_webhook(&webhook_name, &ns.name, cp.injector());

    // The control plane fills in the caBundle: its mesh CA's trust bundle.
    let ca_secret: Value = serde_json::from_str(&cluster().kubectl_ok(&[
        "get",
        "secret",
        "meshflow-ca",
        "-n",
        &ns.name,
        "-o",
        "json",
    ]))
    .unwrap();
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(ca_secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    let ca_bundle = wait_for(
        "the control plane to set caBundle",
        Duration::from_secs(30),
        || async {
            let out = cluster().kubectl_ok(&[
                "get",
                "mutatingwebhookconfiguration",
                &webhook_name,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ]);
            (!out.trim().is_empty()).then(|| out.trim().to_string())
        },
    )
    .await;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&ca_bundle)
            .unwrap(),
        ca_pem
    );

    // Created with kubectl (retried while the API server's webhook cache still lacks the
    // caBundle: failurePolicy Fail refuses the pod then).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = apply(&ns.name, WEB);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl apply of the web pod:\n{out}\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = get_pod(&ns.name, "web");
    let spec = &stored["spec"];
    assert_eq!(
        names(&spec["containers"]),
        ["meshflow-proxy", "app"],
        "{stored}"
    );
    assert_eq!(names(&spec["initContainers"]), ["meshflow-init"]);
    let proxy = &spec["containers"][0];
    assert_eq!(proxy["image"], PROXY_IMAGE);
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"][1],
        "wait-ready"
    );
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"][0], "init");
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "meshflow-token")
        .expect("the token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({ "audience": "meshflow", "expirationSeconds": 3600, "path": "token" })
    );
    let app = &spec["containers"][1];
    assert_eq!(
        app["livenessProbe"]["httpGet"],
        json!({ "path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP" })
    );
    assert_eq!(app["livenessProbe"]["periodSeconds"], 7);
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readyz"
    );
    let annotations = &stored["metadata"]["annotations"];
    assert_eq!(annotations["meshflow.io/inbound-port"], "15006");
    assert!(annotations["meshflow.io/injected"].is_string());
    let originals: Value =
        serde_json::from_str(annotations["meshflow.io/app-probes"].as_str().unwrap()).unwrap();
    assert_eq!(
        originals["/app-health/app/livez"]["httpGet"],
        json!({ "path": "/healthz", "port": 8080, "scheme": "HTTP",
                "httpHeaders": [{ "name": "x-probe", "value": "kubelet" }] })
    );

    // Opted out by label (the objectSelector keeps it from the webhook) or by annotation (the
    // webhook skips it), and a pod in a namespace without the label: stored as sent.
    for (namespace, name, metadata) in [
        (
            &ns.name,
            "opted-out-label",
            "  labels: { meshflow.io/inject: disabled }\n",
        ),
        (
            &ns.name,
            "opted-out-annotation",
            "  annotations: { meshflow.io/inject: disabled }\n",
        ),
        (&other.name, "elsewhere", ""),
    ] {
        let yaml = pod_yaml(name, metadata).replace("  labels: { app: web }\n", "");
        let (ok, out) = apply(namespace, &yaml);
        assert!(ok, "{out}");
        let pod = get_pod(namespace, name);
        assert_eq!(names(&pod["spec"]["containers"]), ["app"], "{name}: {pod}");
        assert!(pod["spec"]["initContainers"].is_null(), "{name}");
        assert_eq!(
            pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        assert!(
            pod["metadata"]["annotations"]["meshflow.io/injected"].is_null(),
            "{name}"
        );
    }

    // `meshflow inject` gives the same pod offline (the stored one adds only server defaults).
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    let out = Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["inject", "-f", &manifest.to_string_lossy()])
        .args(proxy_flags(&ns.name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshflow inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "injected: Pod web"
    );
    let offline: Value =
        serde_json::to_value(serde_yaml::from_slice::<serde_yaml::Value>(&out.stdout).unwrap())
            .unwrap();
    assert_subset(&offline["spec"], &stored["spec"], "spec");
    assert_subset(
        &offline["metadata"]["annotations"],
        &stored["metadata"]["annotations"],
        "metadata.annotations",
    );
    let offline_volumes: BTreeSet<String> =
        names(&offline["spec"]["volumes"]).into_iter().collect();
    let stored_volumes: BTreeSet<String> = names(&stored["spec"]["volumes"]).into_iter().collect();
    assert_eq!(offline_volumes, stored_volumes);

    // The injected manifest, applied: the webhook leaves an injected pod alone, so what is
    // stored is what `meshflow inject` wrote (its spec the same as the webhook's pod), and
    // applying it again changes nothing.
    let injected_yaml = String::from_utf8(out.stdout.clone())
        .unwrap()
        .replace("  name: web\n", "  name: web-offline\n");
    let (ok, out) = apply(&ns.name, &injected_yaml);
    assert!(ok && out.contains("pod/web-offline created"), "{out}");
    let offline_stored = get_pod(&ns.name, "web-offline");
    assert_eq!(
        offline_stored["spec"]["containers"],
        stored["spec"]["containers"]
    );
    assert_eq!(
        offline_stored["spec"]["initContainers"],
        stored["spec"]["initContainers"]
    );
    assert_eq!(offline_stored["spec"]["volumes"], stored["spec"]["volumes"]);
    let version = offline_stored["metadata"]["resourceVersion"].clone();
    let (ok, out) = apply(&ns.name, &injected_yaml);
    assert!(ok && out.contains("pod/web-offline unchanged"), "{out}");
    assert_eq!(
        get_pod(&ns.name, "web-offline")["metadata"]["resourceVersion"],
        version
    );

    // A Deployment: kube-controller-manager creates its pod (generateName), the webhook
    // injects it; applying the Deployment again changes nothing.
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: web }}\nspec:\n  \
         replicas: 1\n  selector: {{ matchLabels: {{ app: web-deployed }} }}\n  template:\n    \
         metadata: {{ labels: {{ app: web-deployed }} }}\n    spec:\n{}",
        WEB[WEB.find("  automountServiceAccountToken").unwrap()..]
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    for expect in [
        "deployment.apps/web created",
        "deployment.apps/web unchanged",
    ] {
        let (ok, out) = apply(&ns.name, &deployment);
        assert!(ok && out.contains(expect), "{out}\n{deployment}");
    }
    let replica = wait_for("the Deployment's pod", Duration::from_secs(30), || async {
        let list: Value = serde_json::from_str(&cluster().kubectl_ok(&[
            "get",
            "pods",
            "-n",
            &ns.name,
            "-l",
            "app=web-deployed",
            "-o",
            "json",
        ]))
        .unwrap();
        list["items"]
            .as_array()
            .and_then(|items| items.first().cloned())
    })
    .await;
    assert_eq!(
        names(&replica["spec"]["containers"]),
        ["meshflow-proxy", "app"],
        "{replica}"
    );
    assert_eq!(replica["spec"]["containers"], stored["spec"]["containers"]);

    // The trust bundle the proxies mount is published into the enabled namespace only.
    let bundle = wait_for(
        "the trust bundle ConfigMap",
        Duration::from_secs(30),
        || async {
            let out = cluster().kubectl(&[
                "get",
                "configmap",
                "meshflow-trust-bundle",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert_eq!(bundle.as_bytes(), ca_pem.as_slice());
    // The injected proxy starts from what the pod gives it: its container's env as the
    // kubelet would set it (downward API, `$(VAR)` expanded), the mounted trust bundle and a
    // projected token (here a TokenRequest of the same audience) — only the addresses are
    // this machine's. It gets its SVID and its pod's config (ready), and the postStart
    // command returns once it is.
    let proxy = run_injected_proxy(&stored, &cp, dir.path(), &bundle).await;
    let wait_ready = Command::new(meshflow_cli::supervisor::find_program("meshflow-proxy"))
        .args(["wait-ready", "--admin", &proxy.admin, "--timeout", "30s"])
        .output()
        .unwrap();
    assert!(
        wait_ready.status.success(),
        "{}",
        String::from_utf8_lossy(&wait_ready.stderr)
    );
    drop(proxy);
    let elsewhere = cluster().kubectl(&[
        "get",
        "configmap",
        "meshflow-trust-bundle",
        "-n",
        &other.name,
    ]);
    assert!(
        !elsewhere.status.success(),
        "published into a namespace not enabled"
    );

    // Counted: web and the Deployment's pod injected (web perhaps more than once: the API
    // server may refuse it after the call while its webhook cache lacked the caBundle…), the
    // annotated pod and the injected manifest skipped.
    let text = metrics(&cp.admin()).await;
    let count = |result: &str| {
        metric(
            &text,
            "meshflow_injector_requests_total",
            &[("result", result)],
        )
    };
    assert!(count("injected") >= 2.0, "{text}");
    assert_eq!(count("skipped"), 2.0, "{text}");
    assert_eq!(count("denied") + count("error"), 0.0, "{text}");
    assert!(!cp.log().contains("forbidden"), "{}", cp.log());
}

/// A review of `pod` in namespace `ns`, as the API server sends it.
fn review(ns: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0a3f6e-1111-4c4c-9d9d-000000000001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "name": pod["metadata"]["name"],
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": { "username": "kubernetes-admin" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        },
    }))
    .unwrap()
}

fn web_pod(ns: &str) -> Value {
    let mut pod: Value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(WEB).unwrap()).unwrap();
    pod["metadata"]["namespace"] = json!(ns);
    pod
}

/// A TLS client for the webhook that trusts the mesh CA of namespace `ns`.
fn connector(ns: &str) -> tokio_rustls::TlsConnector {
    let secret: Value = serde_json::from_str(&cluster().kubectl_ok(&[
        "get",
        "secret",
        "meshflow-ca",
        "-n",
        ns,
        "-o",
        "json",
    ]))
    .unwrap();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// POSTs `body` to `https://<addr>/inject` (announcing `length` bytes, writing in the
/// background so an early answer is read while the upload goes on); returns the status, the
/// body and the time from sending the head to the answer's end.
async fn post(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    body: Vec<u8>,
) -> (u16, String, Duration) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS to the webhook");
    let (mut read, mut write) = tokio::io::split(tls);
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(256 * 1024) {
            write.write_all(chunk).await?;
        }
        write.flush().await
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer)).await;
    let took = started.elapsed();
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, took)
}

fn patch_of(answer: &str) -> Value {
    let review: Value = serde_json::from_str(answer).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(review["response"]["patch"].as_str().expect("a patch"))
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_admission_reviews_are_refused_within_a_second_and_the_next_is_served() {
    let ns = TestNamespace::new("inject-hostile").await;
    label(&ns.name, &["meshflow.io/inject=enabled"]);
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(&ns, dir.path(), "cp", &[]).await;
    let tls = connector(&ns.name);
    let addr = cp.injector();

    let containers: Vec<Value> = (0..1000)
        .map(|i| json!({ "name": format!("c{i}"), "image": "x" }))
        .collect();
    let mut crowded = web_pod(&ns.name);
    crowded["spec"]["containers"] = json!(containers);
    let deep = format!(
        "{{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\
         \"request\":{{\"uid\":\"u\",\"object\":{{\"spec\":{}{}}}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("a 64 MB body", vec![b' '; 64 << 20], 413, "at most"),
        (
            "100,000-deep JSON",
            deep.into_bytes(),
            400,
            "recursion limit exceeded",
        ),
        (
            "malformed JSON",
            b"{\"apiVersion\": \"admission.k8s.io/v1\", \"request\": {".to_vec(),
            400,
            "not an AdmissionReview",
        ),
        (
            "a pod with 1,000 containers",
            review(&ns.name, &crowded),
            200,
            "the pod has 1000 containers",
        ),
    ];
    for (what, body, status, expect) in cases {
        let (got, text, took) = post(addr, &tls, body).await;
        eprintln!("{what}: {got} in {took:?}");
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(expect), "{what}: {text}");
        assert!(
            took <= Duration::from_secs(1),
            "{what}: answered in {took:?}"
        );
        if status == 200 {
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(answer["response"]["allowed"], false, "{what}: a denial");
            assert_eq!(
                answer["response"]["uid"],
                "7f0a3f6e-1111-4c4c-9d9d-000000000001"
            );
        }
    }
    // The next normal review is served.
    let (status, text, took) = post(addr, &tls, review(&ns.name, &web_pod(&ns.name))).await;
    eprintln!("a normal review: {status} in {took:?}");
    assert_eq!(status, 200, "{text}");
    let patch = patch_of(&text);
    assert!(
        patch
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["path"] == "/spec/containers/0" && op["value"]["name"] == "meshflow-proxy"),
        "{patch}"
    );
    let text = metrics(&cp.admin()).await;
    assert_eq!(
        metric(
            &text,
            "meshflow_injector_requests_total",
            &[("result", "error")]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshflow_injector_requests_total",
            &[("result", "denied")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "meshflow_injector_requests_total",
            &[("result", "injected")]
        ),
        1.0
    );

    // A pod holding idle connections (any pod can reach the webhook) gets at most 16; the
    // 17th is closed at once, and the API server's next review is still served.
    let idle = fill_per_address_cap(addr, [127, 0, 0, 2].into(), 16).await;
    let (status, text, took) = post(addr, &tls, review(&ns.name, &web_pod(&ns.name))).await;
    eprintln!("a normal review beside 16 idle connections: {status} in {took:?}");
    assert_eq!(status, 200, "{text}");
    assert!(took <= Duration::from_secs(1), "answered in {took:?}");
    drop(idle);
    let text = metrics(&cp.admin()).await;
    assert_eq!(
        metric(
            &text,
            "meshflow_injector_requests_total",
            &[("result", "error")]
        ),
        4.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_native_sidecar_variant_is_checked_on_the_json_patch() {
    // 1.20 cannot store `restartPolicy` on an init container, so the webhook's answer is read.
    let ns = TestNamespace::new("inject-native").await;
    label(&ns.name, &["meshflow.io/inject=enabled"]);
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(&ns, dir.path(), "cp", &["--native-sidecar", "always"]).await;
    let (status, text, _) = post(
        cp.injector(),
        &connector(&ns.name),
        review(&ns.name, &web_pod(&ns.name)),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let patch = patch_of(&text);
    let ops = patch.as_array().unwrap();
    assert!(
        !ops.iter().any(|op| op["path"] == "/spec/containers/0"),
        "no classic proxy container: {patch}"
    );
    let init = ops
        .iter()
        .find(|op| op["op"] == "add" && op["path"] == "/spec/initContainers")
        .unwrap_or_else(|| panic!("init containers added: {patch}"));
    assert_eq!(names(&init["value"]), ["meshflow-init", "meshflow-proxy"]);
    let proxy = &init["value"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert!(proxy["lifecycle"].is_null());
    // The patched pod is the same pod `meshflow inject --native-sidecar always` gives offline.
    let mut patched = web_pod(&ns.name);
    let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
    json_patch::patch(&mut patched, &patch).unwrap();
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    let out = Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args([
            "inject",
            "--native-sidecar",
            "always",
            "-f",
            &manifest.to_string_lossy(),
        ])
        .args(proxy_flags(&ns.name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Value =
        serde_json::to_value(serde_yaml::from_slice::<serde_yaml::Value>(&out.stdout).unwrap())
            .unwrap();
    assert_eq!(offline["spec"], patched["spec"]);
    assert_eq!(
        offline["metadata"]["annotations"],
        patched["metadata"]["annotations"]
    );
}

/// Deletes cluster-scoped objects (kind, name) when dropped.
struct ClusterScoped(Vec<(&'static str, String)>);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for (kind, name) in &self.0 {
            let _ =
                cluster().kubectl(&["delete", kind, name, "--ignore-not-found", "--wait=false"]);
        }
    }
}

/// Issue 14, item 4: the chart's RBAC is enough for the injector. Only the chart's
/// ServiceAccount, ClusterRole, Role and bindings are applied; the control plane runs with a
/// token of that account, and sets the caBundle of the webhook configuration named as the
/// chart names it, reads the pod's namespace, publishes the trust bundle ConfigMap — with no
/// "forbidden" in its log.
#[tokio::test(flavor = "multi_thread")]
async fn the_charts_rbac_is_enough_for_the_injector() {
    let ns = TestNamespace::new("inject-rbac").await;
    label(&ns.name, &["meshflow.io/inject=enabled"]);
    let dir = tempfile::tempdir().unwrap();
    let release = format!("rbac-{:08x}", rand::random::<u32>());
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow");
    let rendered = cluster().helm_ok(&[
        "template",
        &release,
        &chart.to_string_lossy(),
        "--namespace",
        &ns.name,
        "--set-string",
        &format!("discoverySelector={}", ns.selector),
    ]);
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
                .unwrap()
        })
        .filter(|d: &Value| !d.is_null())
        .collect();
    let name_of = |kind: &str| -> String {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("the chart renders a {kind}"))["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let _cleanup = ClusterScoped(vec![
        ("clusterrolebinding", name_of("ClusterRoleBinding")),
        ("clusterrole", name_of("ClusterRole")),
    ]);
    let rbac: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .iter()
            .any(|k| d["kind"] == *k)
        })
        .collect();
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": rbac });
    let (ok, out) = apply(&ns.name, &list.to_string());
    assert!(ok, "apply the chart's RBAC: {out}");
    let webhook_name = name_of("MutatingWebhookConfiguration");
    let account = name_of("ServiceAccount");
    let token =
        crate::cluster::token_request(&ns.name, &account, crate::cluster::SA_ISSUER, 3600).await;
    let kubeconfig = dir.path().join("control-plane.kubeconfig");
    let ca = dir.path().join("apiserver-ca.crt");
    std::fs::write(&ca, cluster().ca_pem()).unwrap();
    let user = format!("system:serviceaccount:{}:{account}", ns.name);
    std::fs::write(
        &kubeconfig,
        json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{ "name": "dev", "cluster": {
                "server": cluster().server_url(), "certificate-authority": ca.to_string_lossy() } }],
            "users": [{ "name": user, "user": { "token": token } }],
            "contexts": [{ "name": "chart", "context": { "cluster": "dev", "user": user } }],
            "current-context": "chart",
        })
        .to_string(),
    )
    .unwrap();
    let cp = control_plane_as(
        &ns,
        dir.path(),
        "cp",
        &["--injector-webhook-config", &webhook_name],
        &kubeconfig,
    )
    .await;
    let _webhook = register_webhook(&webhook_name, &ns.name, cp.injector());
    wait_for(
        "the caBundle, written with the chart's RBAC",
        Duration::from_secs(30),
        || async {
            let out = cluster().kubectl_ok(&[
                "get",
                "mutatingwebhookconfiguration",
                &webhook_name,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ]);
            (!out.trim().is_empty()).then_some(())
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = apply(&ns.name, WEB);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl apply of the web pod:\n{out}\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = get_pod(&ns.name, "web");
    assert_eq!(
        names(&stored["spec"]["containers"]),
        ["meshflow-proxy", "app"],
        "{}",
        cp.log()
    );
    wait_for(
        "the trust bundle ConfigMap",
        Duration::from_secs(30),
        || async {
            cluster()
                .kubectl(&["get", "configmap", "meshflow-trust-bundle", "-n", &ns.name])
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    let log = cp.log();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
}

/// A `meshflow-proxy` run as an injected pod's proxy container would be; killed when dropped.
struct InjectedProxy {
    child: Child,
    admin: String,
}

impl Drop for InjectedProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `meshflow-proxy` with the env of `pod`'s `meshflow-proxy` container, resolved as the
/// kubelet resolves it, with the files the pod mounts written under `dir` (the trust bundle
/// `bundle`, a token of the pod's ServiceAccount for audience `meshflow`) and the listeners and
/// control plane moved to 127.0.0.1; waits until it is ready.
async fn run_injected_proxy(
    pod: &Value,
    cp: &ControlPlane,
    dir: &Path,
    bundle: &str,
) -> InjectedProxy {
    let ns = pod["metadata"]["namespace"].as_str().unwrap();
    let account = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    let token = crate::cluster::token_request(ns, account, "meshflow", 3600).await;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let bundle_file = dir.join("ca.crt");
    std::fs::write(&bundle_file, bundle).unwrap();
    let container = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "meshflow-proxy")
        .unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod["metadata"]["name"].as_str().unwrap().to_string(),
            Some("metadata.namespace") => ns.to_string(),
            Some("spec.serviceAccountName") => account.to_string(),
            Some("status.podIP") => "127.0.0.1".to_string(),
            Some(annotation) => {
                let key = annotation
                    .strip_prefix("metadata.annotations['")
                    .and_then(|k| k.strip_suffix("']"))
                    .unwrap_or_else(|| panic!("an unexpected fieldRef {annotation}"));
                pod["metadata"]["annotations"][key]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
            None => {
                // `$(VAR)`: a variable defined before this one.
                let mut value = var["value"].as_str().unwrap().to_string();
                for (earlier, v) in &env {
                    value = value.replace(&format!("$({earlier})"), v);
                }
                value
            }
        };
        env.push((name, value));
    }
    let here: [(&str, String); 6] = [
        (
            "MESHFLOW_CONTROL_PLANE",
            cp.ready.address("grpc").unwrap().to_string(),
        ),
        (
            "MESHFLOW_TRUST_BUNDLE_FILE",
            bundle_file.display().to_string(),
        ),
        ("MESHFLOW_TOKEN_FILE", token_file.display().to_string()),
        ("MESHFLOW_INBOUND", "127.0.0.1:0".into()),
        ("MESHFLOW_OUTBOUND", "127.0.0.1:0".into()),
        ("MESHFLOW_ADMIN", "127.0.0.1:0".into()),
    ];
    for (name, value) in here {
        let slot = env
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the proxy's env sets {name}"));
        slot.1 = value;
    }
    assert!(env
        .iter()
        .any(|(n, v)| n == "MESHFLOW_WORKLOAD" && *v == format!("{ns}/web")));
    let ready = dir.join("injected-proxy.ready.json");
    let log = dir.join("injected-proxy.log");
    let mut child = Command::new(meshflow_cli::supervisor::find_program("meshflow-proxy"))
        .env_clear()
        .envs(env)
        .env("MESHFLOW_READY_FILE", &ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(file) = ReadyFile::read(&ready) {
            return InjectedProxy {
                child,
                admin: file.address("admin").unwrap().to_string(),
            };
        }
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the injected proxy exited ({status}):\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the injected proxy is not ready in 30 s:\n{}\ncontrol plane:\n{}",
            log_text(),
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// README "Install on Kubernetes" meshes `examples/kubernetes/shop.yaml`: `meshflow inject`
/// injects both of its Deployments (their probes rewritten), keeps every other object, and
/// the result — in a test namespace instead of `shop` — passes the real API server's
/// validation (`kubectl apply --dry-run=server`, the AuthorizationPolicy against its CRD).
#[tokio::test]
async fn the_readme_example_is_injected_by_meshflow_inject_and_passes_the_apiserver() {
    apply_crds().await;
    let ns = TestNamespace::new("example").await;
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/shop.yaml"),
    )
    .unwrap();
    let out = Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["inject", "-f", "-"])
        .args(proxy_flags(&ns.name))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(example.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "meshflow inject: {stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "injected: Deployment shop/web",
            "injected: Deployment shop/client"
        ],
        "{stderr}"
    );
    let documents: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
                .unwrap()
        })
        .collect();
    let kinds: Vec<&str> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ServiceAccount",
            "Deployment",
            "Service",
            "Deployment",
            "AuthorizationPolicy"
        ]
    );
    let web = &documents[3]["spec"]["template"];
    assert_eq!(
        names(&web["spec"]["containers"]),
        ["meshflow-proxy", "web"],
        "{web}"
    );
    assert_eq!(names(&web["spec"]["initContainers"]), ["meshflow-init"]);
    assert_eq!(
        web["spec"]["containers"][1]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    // The same objects in the test namespace (which exists), through the API server.
    let manifest: String = documents
        .iter()
        .skip(1)
        .map(|d| {
            let text = serde_yaml::to_string(d)
                .unwrap()
                .replace("namespace: shop", &format!("namespace: {}", ns.name))
                .replace("/ns/shop/", &format!("/ns/{}/", ns.name));
            format!("---\n{text}")
        })
        .collect();
    let applied = cluster().kubectl_with_input(
        &["apply", "--dry-run=server", "-o", "name", "-f", "-"],
        &manifest,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&applied.stdout),
        String::from_utf8_lossy(&applied.stderr),
    );
    assert!(applied.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
}
