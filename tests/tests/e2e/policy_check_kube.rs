//! Issue 13: `meshflow policy check --kubernetes` judges a request against the policies in the
//! cluster (custom resources applied with kubectl to the real apiserver of
//! `scripts/dev-cluster`), with a pod as the target workload, and decides exactly as the local
//! mode (`-d`, whose decisions the authz/authn e2e tests compare with live sidecars) does on the
//! same documents: same stdout, same exit code. Invalid custom resources are reported with their
//! field and left out; a missing pod, an unreachable cluster and missing CRDs are named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::cluster::{cluster, create_pod, create_service_account, TestNamespace};
use crate::issuer::TestIssuer;

fn meshflow() -> Command {
    Command::new(meshflow_cli::supervisor::find_program("meshflow"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl apply -f charts/meshflow/crds/` and wait until the policy kinds are served.
fn install_crds() {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds");
    cluster().kubectl_ok(&["apply", "-f", &crds.to_string_lossy()]);
    for crd in [
        "authorizationpolicies.meshflow.io",
        "requestauthentications.meshflow.io",
        "peerauthentications.meshflow.io",
    ] {
        cluster().kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ]);
    }
}

/// `meshflow policy check --kubernetes ARGS` with the test cluster's kubeconfig in
/// `KUBECONFIG`.
fn check_kube(args: &[&str]) -> Output {
    meshflow()
        .args(["policy", "check", "--kubernetes"])
        .args(args)
        .env("KUBECONFIG", &cluster().kubeconfig)
        .output()
        .expect("run meshflow")
}

/// `meshflow policy check -d DIR ARGS`.
fn check_local(dir: &Path, args: &[&str]) -> Output {
    meshflow()
        .args(["policy", "check", "-d"])
        .arg(dir)
        .args(args)
        .output()
        .expect("run meshflow")
}

/// Deletes the mesh-wide policy this test puts into `meshflow-system` (shared by every test of
/// the cluster; its selector matches only this test's pods), however the test ends.
struct RootPolicy(String);

impl Drop for RootPolicy {
    fn drop(&mut self) {
        let _ = cluster().kubectl(&[
            "delete",
            "authorizationpolicies.meshflow.io",
            "-n",
            "meshflow-system",
            &self.0,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// The policies of the test, one document per (namespace, name), as (file name, YAML). File
/// names sort like (namespace, name), the order the control plane merges custom resources in,
/// so both modes see the policies in the same order.
fn policies(ns: &str, jwks: &str) -> Vec<(String, String)> {
    let mut docs = vec![
        (
            "meshflow-system".to_string(),
            format!("mesh-deny-debug-{ns}"),
            format!(
                "kind: AuthorizationPolicy
metadata: {{ name: mesh-deny-debug-{ns}, namespace: meshflow-system }}
spec:
  selector: {{ matchLabels: {{ policy-check: {ns} }} }}
  action: DENY
  rules:
  - to: [{{ operation: {{ paths: [\"/debug\"] }} }}]
"
            ),
        ),
        (
            ns.to_string(),
            "deny-admin".into(),
            format!(
                "kind: AuthorizationPolicy
metadata: {{ name: deny-admin, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  action: DENY
  rules:
  - to: [{{ operation: {{ paths: [\"/admin\", \"/admin/*\"] }} }}]
"
            ),
        ),
        (
            ns.to_string(),
            "frontend-only".into(),
            format!(
                "kind: AuthorizationPolicy
metadata: {{ name: frontend-only, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  action: ALLOW
  rules:
  - from: [{{ source: {{ principals: [\"cluster.local/ns/{ns}/sa/frontend\"] }} }}]
    to: [{{ operation: {{ methods: [GET], paths: [\"/api/*\"] }} }}]
"
            ),
        ),
        (
            ns.to_string(),
            "jwt".into(),
            format!(
                "kind: RequestAuthentication
metadata: {{ name: jwt, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  jwtRules:
  - issuer: https://issuer.test
    audiences: [backend]
    jwks: '{jwks}'
"
            ),
        ),
        (
            ns.to_string(),
            "mtls".into(),
            format!(
                "kind: PeerAuthentication
metadata: {{ name: mtls, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  mtls: {{ mode: STRICT }}
  portLevelMtls: {{ 8080: {{ mode: PERMISSIVE }} }}
"
            ),
        ),
        (
            ns.to_string(),
            "reports-with-jwt".into(),
            format!(
                "kind: AuthorizationPolicy
metadata: {{ name: reports-with-jwt, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  rules:
  - from: [{{ source: {{ requestPrincipals: [\"https://issuer.test/*\"] }} }}]
    to: [{{ operation: {{ paths: [\"/reports\"] }} }}]
"
            ),
        ),
    ];
    docs.sort();
    docs.into_iter()
        .map(|(namespace, name, doc)| {
            (
                format!("{namespace}-{name}.yaml"),
                format!("apiVersion: meshflow.io/v1alpha1\n{doc}"),
            )
        })
        .collect()
}

/// Accepted by the CRD's schema (CUSTOM is one of its enum values), refused by meshflow's
/// validation: it would select the backend.
fn invalid_policy(ns: &str) -> String {
    format!(
        "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{ name: custom, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: backend }} }}
  action: CUSTOM
  rules:
  - to: [{{ operation: {{ paths: [\"/api/*\"] }} }}]
"
    )
}

#[tokio::test]
async fn kubernetes_mode_decides_like_the_sidecar_on_the_clusters_policies() {
    install_crds();
    let test_ns = TestNamespace::new("policy-check").await;
    let ns = test_ns.name.as_str();
    let kubectl = cluster();
    // The root namespace is shared: create it unless it is there.
    let root = kubectl.kubectl(&["create", "namespace", "meshflow-system"]);
    assert!(
        root.status.success() || text(&root).1.contains("AlreadyExists"),
        "{root:?}"
    );

    create_service_account(ns, "backend").await;
    create_service_account(ns, "frontend").await;
    create_pod(
        ns,
        "backend-0",
        &[("app", "backend"), ("policy-check", ns)],
        "backend",
        &[("http", 8080)],
    )
    .await;
    create_pod(
        ns,
        "frontend-0",
        &[("app", "frontend")],
        "frontend",
        &[("http", 8080)],
    )
    .await;

    let issuer = TestIssuer::new("https://issuer.test", "k1");
    let stranger = TestIssuer::new("https://issuer.test", "k1");
    let documents = policies(ns, &issuer.jwks());
    let _root_policy = RootPolicy(format!("mesh-deny-debug-{ns}"));
    let all: String = documents
        .iter()
        .map(|(_, doc)| format!("---\n{doc}"))
        .collect();
    let applied = kubectl.kubectl_with_input(&["apply", "-f", "-"], &all);
    assert!(applied.status.success(), "kubectl apply: {applied:?}");
    let applied = kubectl.kubectl_with_input(&["apply", "-f", "-"], &invalid_policy(ns));
    assert!(
        applied.status.success(),
        "the schema accepts action CUSTOM: {applied:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    for (file, doc) in &documents {
        std::fs::write(dir.path().join(file), doc).unwrap();
    }

    let frontend = format!("cluster.local/ns/{ns}/sa/frontend");
    let other = format!("spiffe://cluster.local/ns/{ns}/sa/other");
    let token = format!(
        "authorization=Bearer {}",
        issuer.valid("reporter", "backend")
    );
    let forged = format!(
        "authorization=Bearer {}",
        stranger.valid("reporter", "backend")
    );
    let workload = format!("{ns}/backend");
    let labels = format!("app=backend,policy-check={ns}");
    // (what, kube-mode request args, expected exit code, expected start of stdout)
    let cases: Vec<(&str, Vec<&str>, i32, String)> = vec![
        (
            "the frontend reaches the API",
            vec!["--principal", &frontend, "--path", "/api/orders"],
            0,
            format!("ALLOW by {ns}/frontend-only rule 0"),
        ),
        (
            "nobody reaches /admin",
            vec!["--principal", &frontend, "--path", "/admin"],
            1,
            format!("DENY by {ns}/deny-admin rule 0"),
        ),
        (
            "an encoded dot segment is normalized first",
            vec!["--principal", &frontend, "--path", "/api/%2e%2e/admin/x"],
            1,
            format!("DENY by {ns}/deny-admin rule 0; normalized path /admin/x"),
        ),
        (
            "another caller matches no ALLOW policy",
            vec!["--principal", &other, "--path", "/api/orders"],
            1,
            "DENY (ALLOW policies exist and none matches)".into(),
        ),
        (
            "POST is not allowed by frontend-only",
            vec![
                "--principal",
                &frontend,
                "--method",
                "POST",
                "--path",
                "/api/orders",
            ],
            1,
            "DENY (ALLOW policies exist and none matches)".into(),
        ),
        (
            "the mesh-wide policy of meshflow-system applies",
            vec!["--principal", &frontend, "--path", "/debug"],
            1,
            format!("DENY by meshflow-system/mesh-deny-debug-{ns} rule 0"),
        ),
        (
            "plaintext on the pod's port 8080 is PERMISSIVE, then judged",
            vec!["--path", "/api/orders"],
            1,
            "DENY (ALLOW policies exist and none matches)".into(),
        ),
        (
            "plaintext on another port is closed (STRICT)",
            vec!["--path", "/api/orders", "--port", "9090"],
            4,
            format!("REFUSED plaintext connection closed: mTLS mode is STRICT by {ns}/mtls"),
        ),
        (
            "a valid token reaches /reports",
            vec![
                "--principal",
                &other,
                "--path",
                "/reports",
                "--header",
                &token,
            ],
            0,
            format!("ALLOW by {ns}/reports-with-jwt rule 0"),
        ),
        (
            "a token signed by another key is refused",
            vec![
                "--principal",
                &other,
                "--path",
                "/reports",
                "--header",
                &forged,
            ],
            3,
            "UNAUTHENTICATED 401".into(),
        ),
    ];
    for (what, args, code, expected) in &cases {
        let mut kube_args = vec!["--namespace", ns, "--pod", "backend-0"];
        kube_args.extend(args);
        let kube = check_kube(&kube_args);
        let (kube_out, kube_err) = text(&kube);
        assert_eq!(
            kube.status.code(),
            Some(*code),
            "{what}: {kube_args:?}\n{kube_out}{kube_err}"
        );
        assert!(
            kube_out.starts_with(expected.as_str()),
            "{what}: expected {expected:?}, got\n{kube_out}{kube_err}"
        );
        assert!(
            kube_err.contains(&format!(
                "warning: AuthorizationPolicy {ns}/custom is invalid (spec.action: CUSTOM is not supported) and is left out of this check"
            )),
            "{what}: {kube_err}"
        );

        // The local mode on the same documents: the same decision, the same words. (The pod
        // gives the port, 8080, unless the case names one.)
        let mut local_args = vec![
            "--namespace",
            ns,
            "--label",
            &labels,
            "--workload",
            &workload,
        ];
        if !args.contains(&"--port") {
            local_args.extend(["--port", "8080"]);
        }
        local_args.extend(args);
        let local = check_local(dir.path(), &local_args);
        let (local_out, local_err) = text(&local);
        assert_eq!(
            (kube.status.code(), &kube_out),
            (local.status.code(), &local_out),
            "{what}: the Kubernetes mode and the local mode disagree\nlocal: {local_args:?}\n{local_err}"
        );

        // A workload that does not exist yet: namespace and labels instead of a pod.
        let mut labels_args = vec!["--namespace", ns, "--labels", &labels];
        if !args.contains(&"--port") {
            labels_args.extend(["--port", "8080"]);
        }
        labels_args.extend(args);
        let by_labels = check_kube(&labels_args);
        assert_eq!(
            (by_labels.status.code(), text(&by_labels).0),
            (kube.status.code(), kube_out.clone()),
            "{what}: --labels differs from --pod"
        );
    }

    // The caller as a pod: its ServiceAccount is the principal.
    let from_pod = check_kube(&[
        "--namespace",
        ns,
        "--pod",
        "backend-0",
        "--source-pod",
        "frontend-0",
        "--path",
        "/api/orders",
    ]);
    let (out, err) = text(&from_pod);
    assert_eq!(from_pod.status.code(), Some(0), "{out}{err}");
    assert!(
        out.starts_with(&format!("ALLOW by {ns}/frontend-only rule 0")),
        "{out}"
    );
    let qualified = format!("{ns}/frontend-0");
    let from_pod = check_kube(&[
        "--namespace",
        ns,
        "--pod",
        "backend-0",
        "--source-pod",
        &qualified,
        "--path",
        "/admin",
    ]);
    assert_eq!(from_pod.status.code(), Some(1), "{:?}", text(&from_pod));

    // The control plane's discovery selector: meshflow-system is not selected, so its
    // mesh-wide policy is not in force; a namespace left out of the mesh is an error.
    let debug = [
        "--namespace",
        ns,
        "--pod",
        "backend-0",
        "--principal",
        &frontend,
        "--path",
        "/debug",
        "--discovery-selector",
    ];
    let selected = check_kube(&[&debug[..], &[test_ns.selector.as_str()]].concat());
    let (out, err) = text(&selected);
    assert_eq!(selected.status.code(), Some(1), "{out}{err}");
    assert!(
        out.starts_with("DENY (ALLOW policies exist and none matches)"),
        "{out}{err}"
    );
    assert!(
        err.contains("note: namespace meshflow-system does not match the discovery selector"),
        "{err}"
    );
    let left_out = check_kube(&[&debug[..], &["meshflow.io/test=another"]].concat());
    let (out, err) = text(&left_out);
    assert_eq!(left_out.status.code(), Some(64), "{out}{err}");
    assert!(
        err.contains(&format!(
            "namespace {ns} does not match the discovery selector \"meshflow.io/test=another\""
        )),
        "{err}"
    );

    // The local mode refuses the invalid document naming the same field.
    std::fs::write(dir.path().join("zz-custom.yaml"), invalid_policy(ns)).unwrap();
    let local = check_local(dir.path(), &["--namespace", ns, "--label", &labels]);
    let (out, err) = text(&local);
    assert_eq!(local.status.code(), Some(64), "{out}{err}");
    assert!(
        err.contains("spec.action") && err.contains("CUSTOM is not supported"),
        "{err}"
    );

    // Deleting the DENY policy with kubectl: /admin now falls to the ALLOW policies.
    kubectl.kubectl_ok(&[
        "delete",
        "authorizationpolicies.meshflow.io",
        "-n",
        ns,
        "deny-admin",
    ]);
    let after = check_kube(&[
        "--namespace",
        ns,
        "--pod",
        "backend-0",
        "--principal",
        &frontend,
        "--path",
        "/admin",
    ]);
    let (out, err) = text(&after);
    assert_eq!(after.status.code(), Some(1), "{out}{err}");
    assert!(
        out.starts_with("DENY (ALLOW policies exist and none matches)"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn kubernetes_mode_names_a_missing_pod_an_unreachable_cluster_and_missing_crds() {
    install_crds();
    let test_ns = TestNamespace::new("policy-check-errors").await;
    let ns = test_ns.name.as_str();

    let missing = check_kube(&["--namespace", ns, "--pod", "nosuch"]);
    let (out, err) = text(&missing);
    assert_eq!(missing.status.code(), Some(64), "{out}{err}");
    assert!(
        err.contains(&format!("pod nosuch not found in namespace {ns}")),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");

    // No pod, no policies: the default (allow; plaintext on port 80 is STRICT).
    let empty = check_kube(&[
        "--namespace",
        ns,
        "--label",
        "app=new",
        "--principal",
        "cluster.local/ns/a/sa/b",
    ]);
    let (out, err) = text(&empty);
    assert_eq!(empty.status.code(), Some(0), "{out}{err}");
    assert!(
        out.starts_with("ALLOW (no ALLOW policy selects the workload)"),
        "{out}"
    );

    let temp = tempfile::tempdir().unwrap();
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = write_kubeconfig(
        temp.path(),
        "unreachable",
        &format!("https://127.0.0.1:{port}"),
    );
    let out = meshflow()
        .args(["policy", "check", "--kubernetes", "--kubeconfig"])
        .arg(&unreachable)
        .args(["--namespace", "default", "--pod", "web"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach the Kubernetes API server at https://127.0.0.1:{port}"
        )),
        "{stderr}"
    );

    // No configuration at all.
    let out = meshflow()
        .args(["policy", "check", "--kubernetes", "--namespace", "default"])
        .env("KUBECONFIG", temp.path().join("none"))
        .env("HOME", temp.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(stderr.contains("KUBECONFIG"), "{stderr}");

    // An API server without the meshflow CRDs. (They cannot be removed from the shared test
    // cluster while other tests use them; this server answers every request as kube-apiserver
    // answers for a resource it does not serve.)
    let server = NotServed::start();
    let bare = write_kubeconfig(temp.path(), "bare", &server.url);
    let out = meshflow()
        .args(["policy", "check", "--kubernetes", "--kubeconfig"])
        .arg(&bare)
        .args(["--namespace", "default", "--label", "app=web"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(
        stderr.contains("the meshflow CRDs are not installed")
            && stderr.contains("kubectl apply -f charts/meshflow/crds/"),
        "{stderr}"
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("/apis/meshflow.io/v1alpha1/")),
        "{:?}",
        server.requests()
    );
}

/// A kubeconfig for `server` with a bearer token (and the test cluster's CA for https).
fn write_kubeconfig(dir: &Path, name: &str, server: &str) -> PathBuf {
    let path = dir.join(format!("{name}.kubeconfig"));
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, cluster().ca_pem()).unwrap();
    let tls = if server.starts_with("https://") {
        format!("    certificate-authority: {}\n", ca.display())
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
{tls}contexts:
- name: {name}
  context: {{ cluster: {name}, user: {name}, namespace: default }}
current-context: {name}
users:
- name: {name}
  user: {{ token: test }}
"
        ),
    )
    .unwrap();
    path
}

/// A plain-HTTP server that answers every request `404 NotFound` with the `Status` body
/// kube-apiserver sends for a resource it does not serve.
struct NotServed {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotServed {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        // Headers up to the blank line (GETs carry no body).
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" || line == "\n" {
                                break;
                            }
                        }
                        log.lock().unwrap().push(request_line.trim().to_string());
                        let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#;
                        let response = format!(
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { url, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}
