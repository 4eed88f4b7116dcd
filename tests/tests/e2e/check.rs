//! Issue 14, acceptance 6: `meshflow check` passes on a healthy mesh in the dev cluster and
//! fails naming the problem when the control plane is down, the webhook's certificate has
//! expired or a CRD is missing; `--pre` passes with the cluster admin and names what a
//! ServiceAccount without rights may not create.
//!
//! Each mesh is a real Kubernetes-mode control plane with the injector on 127.0.0.1 for the
//! test's own namespace (its Lease, CA Secret and trust bundle live there), a
//! MutatingWebhookConfiguration named as the chart names it (`meshflow-injector-<namespace>`)
//! with a `clientConfig.url` webhook scoped to the test's namespace label, and `meshflow check
//! --namespace <test namespace> --control-plane-admin <its admin URL>` — the API server refuses
//! to proxy to loopback, so the default pod-proxy path cannot be exercised here. A missing CRD
//! is shown on a private cluster of its own (CRDs are cluster-wide: the shared one keeps its
//! five for the tests running beside this one).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use meshflow_api::Bootstrap;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use serde_json::{json, Value};

use crate::cluster::{self, cluster, wait_for, TestNamespace, SA_ISSUER};
use crate::common::install_crypto;
use crate::injection::{register_webhook, WebhookConfiguration};
use crate::kubernetes::{control_plane_server_name, spawn_with, Proc};

/// The check's categories in the order it prints them (post-install).
const CATEGORIES: [&str; 7] = [
    "kubernetes-api",
    "kubernetes-version",
    "meshflow-crds",
    "control-plane",
    "injector",
    "identity",
    "data-plane",
];

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds")
}

/// `meshflow check ARGS` with `kubeconfig`: (exit code, stdout + stderr, how long it took).
fn meshflow_check(kubeconfig: &Path, args: &[&str]) -> (i32, String, Duration) {
    let started = Instant::now();
    let out = Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .arg("check")
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .output()
        .expect("meshflow runs (cargo build --bins)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code().unwrap_or(-1), text, started.elapsed())
}

/// The lines of category `name` in the check's text output (without its header).
fn section<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = output.lines();
    let mut found = false;
    for line in lines.by_ref() {
        if line == name {
            found = true;
            break;
        }
    }
    assert!(found, "no category {name} in:\n{output}");
    lines
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
}

/// Installs the committed CRDs into the shared cluster (idempotent; other test processes apply
/// them at the same time, so a failed apply is retried) and waits until they are served.
async fn apply_crds() {
    let crds = crds_dir().to_string_lossy().into_owned();
    wait_for("the CRDs to apply", Duration::from_secs(20), || async {
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

/// One test's mesh: its namespace (labelled `meshflow.io/inject=enabled`), a Kubernetes-mode
/// control plane with the injector on 127.0.0.1, and the webhook configuration
/// `meshflow-injector-<namespace>` pointing at it (the control plane sets its caBundle).
struct Mesh {
    ns: TestNamespace,
    dir: tempfile::TempDir,
    cp: Proc,
    webhook: WebhookConfiguration,
}

impl Mesh {
    /// Starts it; `extra` flags go to the control plane.
    async fn start(prefix: &str, extra: &[String]) -> Mesh {
        install_crypto();
        apply_crds().await;
        let ns = TestNamespace::new(prefix).await;
        cluster().kubectl_ok(&[
            "label",
            "namespace",
            &ns.name,
            "meshflow.io/inject=enabled",
            "--overwrite",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let config_name = format!("meshflow-injector-{}", ns.name);
        let state = dir.path().join("cp");
        std::fs::create_dir_all(&state).unwrap();
        let mut args: Vec<String> = [
            "--kubernetes",
            "--namespace",
            &ns.name,
            "--discovery-selector",
            &ns.selector,
            "--pod-name",
            "cp-0",
            "--injector-listen",
            "127.0.0.1:0",
            "--injector-host",
            "127.0.0.1",
            "--injector-webhook-config",
            &config_name,
            "--proxy-image",
            "meshflow.invalid/proxy:test",
            "--state-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(state.display().to_string());
        args.extend(extra.iter().cloned());
        let cp = spawn_with(
            dir.path(),
            "cp",
            "meshflow-control-plane",
            &args,
            &cluster().kubeconfig,
        );
        let webhook = register_webhook(&config_name, &ns.name, cp.address("injector"));
        // Leadership is taken beside serving: wait for it, the check reads the Lease.
        wait_for(
            "the control plane to hold its Lease",
            Duration::from_secs(30),
            || async {
                let holder = cluster().kubectl(&[
                    "get",
                    "lease",
                    "meshflow-control-plane",
                    "-n",
                    &ns.name,
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ]);
                (String::from_utf8_lossy(&holder.stdout) == "cp-0").then_some(())
            },
        )
        .await;
        Mesh {
            ns,
            dir,
            cp,
            webhook,
        }
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.cp.address("admin"))
    }

    /// `meshflow check --namespace <ns> --control-plane-admin <admin> ARGS` as the admin.
    fn check(&self, args: &[&str]) -> (i32, String, Duration) {
        let admin = self.admin_url();
        let mut all = vec![
            "--namespace",
            self.ns.name.as_str(),
            "--control-plane-admin",
            admin.as_str(),
        ];
        all.extend_from_slice(args);
        meshflow_check(&cluster().kubeconfig, &all)
    }

    /// Waits until the control plane has written `bundle_pem` into the webhook's caBundle.
    async fn wait_for_ca_bundle(&self, bundle_pem: &str) {
        let expected = base64::engine::general_purpose::STANDARD.encode(bundle_pem);
        wait_for(
            "the control plane to set the webhook's caBundle",
            Duration::from_secs(30),
            || async {
                let out = cluster().kubectl_ok(&[
                    "get",
                    "mutatingwebhookconfiguration",
                    &self.webhook.0,
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ]);
                (out.trim() == expected).then_some(())
            },
        )
        .await;
    }

    /// Waits until the control plane has published the trust bundle ConfigMap into the
    /// namespace.
    async fn wait_for_trust_bundle(&self) {
        let maps: Api<ConfigMap> = Api::namespaced(cluster().client().await, &self.ns.name);
        wait_for(
            "the trust bundle ConfigMap",
            Duration::from_secs(30),
            || async { maps.get_opt("meshflow-trust-bundle").await.ok().flatten() },
        )
        .await;
    }

    /// The mesh CA's certificate (PEM) from its Secret.
    async fn ca_pem(&self) -> String {
        let secrets: Api<Secret> = Api::namespaced(cluster().client().await, &self.ns.name);
        let secret = secrets.get("meshflow-ca").await.expect("the CA Secret");
        String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap()
    }

    /// A server-side dry run of a pod in the namespace (the API server calls the webhook):
    /// kubectl's output and whether it succeeded.
    fn dry_run_pod(&self) -> (bool, String) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "probe" },
            "spec": { "automountServiceAccountToken": false,
                      "containers": [{ "name": "app", "image": "meshflow.invalid/app:1" }] },
        });
        let out = cluster().kubectl_with_input(
            &[
                "create",
                "--dry-run=server",
                "-n",
                &self.ns.name,
                "-o",
                "json",
                "-f",
                "-",
            ],
            &pod.to_string(),
        );
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// An injected pod `web-1` (ServiceAccount `web`) made Running, and a real sidecar for it — a
/// `meshflow-proxy` bootstrapped with a token of that account, in front of an echo app —
/// connected to the control plane.
async fn meshed_pod(mesh: &Mesh) -> (Proc, Proc) {
    let ns = &mesh.ns.name;
    cluster::create_service_account(ns, "web").await;
    cluster::create_node(cluster::TEST_NODE).await;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web-1", "labels": { "app": "web" } },
        "spec": {
            "nodeName": cluster::TEST_NODE,
            "serviceAccountName": "web",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{ "name": "app", "image": "meshflow.invalid/web:1",
                             "ports": [{ "name": "http", "containerPort": 8080 }] }],
        },
    })
    .to_string();
    // Retried while the API server's webhook cache still lacks the caBundle (failurePolicy
    // Fail refuses the pod then).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster().kubectl_with_input(&["apply", "-n", ns, "-f", "-"], &pod);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "create the injected pod: {out:?}\n{}",
            mesh.cp.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let containers = cluster().kubectl_ok(&[
        "get",
        "pod",
        "web-1",
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.containers[*].name}",
    ]);
    assert_eq!(containers, "meshflow-proxy app", "the pod is injected");
    cluster::set_pod_ready(ns, "web-1", "10.78.0.1", true).await;

    let app = spawn_with(
        mesh.dir.path(),
        "web-1-app",
        "meshflow-echo",
        &[
            "--name".into(),
            "web".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &cluster().kubeconfig,
    );
    let app_port = app.address("http").rsplit(':').next().unwrap().to_string();
    let token = cluster::token_request(ns, "web", "meshflow", 3600).await;
    let bootstrap = Bootstrap {
        control_plane: mesh.cp.address("grpc"),
        control_plane_server_name: control_plane_server_name(),
        trust_bundle_pem: mesh.ca_pem().await,
        workload: format!("{ns}/web-1"),
        spiffe_id: format!("spiffe://cluster.local/ns/{ns}/sa/web"),
        token,
        token_file: None,
        app_auth_secret: None,
    };
    let path = mesh.dir.path().join("web-1.bootstrap.json");
    std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    let proxy = spawn_with(
        mesh.dir.path(),
        "web-1-sidecar",
        "meshflow-proxy",
        &[
            "--bootstrap".into(),
            path.display().to_string(),
            "--app-port".into(),
            app_port,
        ],
        &cluster().kubeconfig,
    );
    (proxy, app)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_healthy_mesh_and_names_the_control_plane_when_it_is_down() {
    let mut mesh = Mesh::start("check-healthy", &[]).await;
    let ns = mesh.ns.name.clone();
    let ca = mesh.ca_pem().await;
    mesh.wait_for_ca_bundle(&ca).await;
    let (_sidecar, _app) = meshed_pod(&mesh).await;
    mesh.wait_for_trust_bundle().await;

    let (code, output, took) = mesh.check(&[]);
    eprintln!("meshflow check (healthy), {took:?}:\n{output}");
    assert_eq!(code, 0, "{output}\ncontrol plane:\n{}", mesh.cp.output());
    for category in CATEGORIES {
        let lines = section(&output, category);
        assert!(
            lines.iter().all(|l| l.starts_with('√')),
            "{category}: every check passes:\n{output}"
        );
    }
    assert!(output.ends_with("Status check results are √\n"), "{output}");
    let admin = mesh.admin_url();
    let injector = mesh.cp.address("injector");
    for expected in [
        format!("√ control plane {admin} is ready"),
        format!("√ the leader Lease {ns}/meshflow-control-plane is held and renewed (held by cp-0"),
        format!("√ the injection webhook for {ns} is registered (meshflow-injector-{ns})"),
        format!("√ meshflow-injector-{ns} has a caBundle"),
        format!("√ meshflow-injector-{ns}: the webhook at https://{injector}/inject serves a valid certificate"),
        format!("√ meshflow-injector-{ns}: the API server calls the webhook (dry-run pod in {ns})"),
        format!("√ the mesh CA in Secret {ns}/meshflow-ca is valid"),
        "√ the trust bundle ConfigMaps match the mesh CA (1 injection-enabled namespace)".to_string(),
        format!("√ 1 sidecar connected to {admin} runs its config version"),
        "√ every running pod with the sidecar is connected to the control plane (1)".to_string(),
    ] {
        assert!(output.contains(&expected), "missing {expected:?} in:\n{output}");
    }

    // The same results as JSON.
    let (code, json, _) = mesh.check(&["-o", "json"]);
    assert_eq!(code, 0, "{json}");
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["success"], true);
    let names: Vec<&str> = json["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["categoryName"].as_str().unwrap())
        .collect();
    assert_eq!(names, CATEGORIES);
    assert!(json["categories"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["checks"].as_array().unwrap())
        .all(|c| c["result"] == "success"));

    // A sidecar that does not acknowledge the current version is named (it is stopped while
    // a new Service changes the config), and counts again once it has caught up.
    let sidecar_pid =
        meshflow_api::ReadyFile::read(&mesh.dir.path().join("web-1-sidecar.ready.json"))
            .expect("the sidecar's ready file")
            .pid;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sidecar_pid).unwrap());
    let version = proxies(&admin).await["version"].as_u64().unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    cluster::create_service(&ns, "web", &[("app", "web")], &[("http", 80, 8080)]).await;
    // The Service, then its EndpointSlice, each make a version: wait until it stays put.
    let last = std::cell::Cell::new((0, Instant::now()));
    wait_for(
        "a new config version, sent",
        Duration::from_secs(30),
        || {
            let admin = admin.clone();
            let last = &last;
            async move {
                let answer = proxies(&admin).await;
                let now = answer["version"].as_u64().unwrap();
                if now != last.get().0 {
                    last.set((now, Instant::now()));
                }
                let sent = answer["proxies"][0]["sentVersion"].as_u64() == Some(now);
                let settled = last.get().1.elapsed() > Duration::from_secs(1);
                (now > version && sent && settled).then_some(())
            }
        },
    )
    .await;
    let (code, output, took) = mesh.check(&["--wait", "2s"]);
    eprintln!("meshflow check (a sidecar stopped), {took:?}:\n{output}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(code, 1, "{output}");
    let data_plane = section(&output, "data-plane").join("\n");
    assert!(
        data_plane.contains(&format!(
            "× sidecars connected to {admin} run its current config (version "
        )) && data_plane.contains(&format!("{ns}/web-1 runs version {version} (version "))
            && data_plane.contains("was sent, no answer yet)"),
        "{output}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let (code, output, _) = mesh.check(&[]);
    assert_eq!(code, 0, "the sidecar caught up:\n{output}");
    assert!(
        output.contains(&format!(
            "√ 1 sidecar connected to {admin} runs its config version"
        )),
        "{output}"
    );

    // Without --control-plane-admin the replicas are the chart's pods, reached through the
    // API server's pod proxy — which this API server refuses for a loopback pod IP, so the
    // check names the pod-proxy path and the API server's refusal.
    let cp_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "meshflow-control-plane-0", "labels": {
            "app.kubernetes.io/name": "meshflow", "app.kubernetes.io/instance": "meshflow",
            "app.kubernetes.io/component": "control-plane", "meshflow.io/inject": "disabled" } },
        "spec": {
            "nodeName": cluster::TEST_NODE, "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{ "name": "control-plane", "image": "meshflow.invalid/control-plane:1",
                             "ports": [{ "name": "grpc", "containerPort": 15012 },
                                       { "name": "admin", "containerPort": 15014 }] }],
        },
    });
    cluster().kubectl_with_input(&["apply", "-n", &ns, "-f", "-"], &cp_pod.to_string());
    cluster::set_pod_ready(&ns, "meshflow-control-plane-0", "127.0.0.1", true).await;
    let (code, output, _) = meshflow_check(&cluster().kubeconfig, &["--namespace", &ns]);
    eprintln!("meshflow check (through the pod proxy):\n{output}");
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains(&format!("√ control-plane pods exist in {ns} (1)"))
            && output.contains(&format!("× control plane pod {ns}/meshflow-control-plane-0 is ready"))
            && output.contains(&format!(
                "the API server could not proxy to /api/v1/namespaces/{ns}/pods/meshflow-control-plane-0:15014/proxy/ready"
            )),
        "{output}"
    );

    // The control plane goes down: its replica is named with its URL and the error, within
    // the bounds, and what depends on it is skipped, not passed.
    mesh.cp.kill();
    let (code, output, took) = mesh.check(&[]);
    eprintln!("meshflow check (control plane down), {took:?}:\n{output}");
    assert_eq!(code, 1, "{output}");
    let control_plane = section(&output, "control-plane").join("\n");
    assert!(
        control_plane.contains(&format!("× control plane {admin} is ready"))
            && control_plane.contains(&format!("cannot reach {admin}/ready"))
            && control_plane.contains("the control plane is down or unreachable"),
        "{output}"
    );
    assert!(control_plane.contains("hint: "), "{output}");
    let data_plane = section(&output, "data-plane").join("\n");
    assert!(
        data_plane.contains("- sidecars run the current config")
            && data_plane.contains("skipped: no control plane replica is ready"),
        "{output}"
    );
    // The webhook is down with it.
    assert!(
        output.contains(&format!("× meshflow-injector-{ns}: the webhook at https://{injector}/inject serves a valid certificate")),
        "{output}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(output.ends_with("Status check results are ×\n"), "{output}");

    // An admin address that accepts connections and never answers: bounded by --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let (code, output, took) = meshflow_check(
        &cluster().kubeconfig,
        &[
            "--namespace",
            &ns,
            "--control-plane-admin",
            &silent_url,
            "--timeout",
            "2s",
        ],
    );
    eprintln!("meshflow check (a silent control plane), {took:?}:\n{output}");
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains(&format!("× control plane {silent_url} is ready"))
            && output.contains(&format!("{silent_url}/ready")),
        "{output}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(silent);
}

/// A control plane's `/proxies` answer.
async fn proxies(admin: &str) -> Value {
    let address = admin.trim_start_matches("http://");
    serde_json::from_str(&crate::common::get_text(address, "/proxies").await).unwrap()
}

/// A CA and a webhook certificate for 127.0.0.1 that expired a day ago: (CA PEM, cert PEM, key
/// PEM).
fn expired_webhook_certificate() -> (String, String, String) {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "check test webhook CA");
    ca_params.not_before = now - time::Duration::days(30);
    ca_params.not_after = now + time::Duration::days(30);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "expired webhook");
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_naming_the_webhook_whose_certificate_has_expired() {
    // The control plane takes the certificate as given (it does not refuse an expired one at
    // start: it only reads the key pair), and writes the given CA into the caBundle.
    let keys = tempfile::tempdir().unwrap();
    let (ca, cert, key) = expired_webhook_certificate();
    for (file, pem) in [("ca.crt", &ca), ("tls.crt", &cert), ("tls.key", &key)] {
        std::fs::write(keys.path().join(file), pem).unwrap();
    }
    let path = |f: &str| keys.path().join(f).display().to_string();
    let mesh = Mesh::start(
        "check-expired",
        &[
            "--injector-cert".into(),
            path("tls.crt"),
            "--injector-key".into(),
            path("tls.key"),
            "--injector-ca-bundle".into(),
            path("ca.crt"),
        ],
    )
    .await;
    let ns = mesh.ns.name.clone();
    mesh.wait_for_ca_bundle(&ca).await;
    mesh.wait_for_trust_bundle().await;
    // Until the API server's webhook cache has the caBundle, its error is "unknown authority";
    // from then on it is the expiry.
    let refusal = wait_for(
        "the API server to refuse the webhook's expired certificate",
        Duration::from_secs(30),
        || async {
            let (ok, out) = mesh.dry_run_pod();
            assert!(!ok, "a pod is admitted through an expired webhook: {out}");
            out.contains("expired").then_some(out)
        },
    )
    .await;
    eprintln!("kubectl's dry run: {refusal}");

    let (code, output, took) = mesh.check(&[]);
    eprintln!("meshflow check (expired webhook certificate), {took:?}:\n{output}");
    assert_eq!(code, 1, "{output}");
    let injector = section(&output, "injector").join("\n");
    let url = format!("https://{}/inject", mesh.cp.address("injector"));
    assert!(
        injector.contains(&format!(
            "× meshflow-injector-{ns}: the webhook at {url} serves a valid certificate"
        )) && injector.contains("(CN=expired webhook) expired at"),
        "{output}"
    );
    assert!(
        injector.contains(&format!(
            "× meshflow-injector-{ns}: the API server calls the webhook (dry-run pod in {ns})"
        )) && injector.contains("the webhook's certificate has expired"),
        "{output}"
    );
    assert!(injector.contains("hint: "), "{output}");
    // Everything else is healthy.
    for category in [
        "kubernetes-api",
        "meshflow-crds",
        "control-plane",
        "identity",
        "data-plane",
    ] {
        assert!(
            section(&output, category)
                .iter()
                .all(|l| l.starts_with('√')),
            "{category}:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_install_checks_pass_for_the_admin_and_name_what_a_bare_account_may_not_create() {
    install_crypto();
    let ns = TestNamespace::new("check-pre").await;
    let (code, output, _) = meshflow_check(
        &cluster().kubeconfig,
        &["--pre", "--namespace", "meshflow-system"],
    );
    eprintln!("meshflow check --pre (admin):\n{output}");
    assert_eq!(code, 0, "{output}");
    let pre = section(&output, "pre-install");
    assert_eq!(pre.len(), 15, "{output}");
    assert!(pre.iter().all(|l| l.starts_with('√')), "{output}");
    assert!(
        output.contains("√ can create CustomResourceDefinitions")
            && output.contains("√ can create, get and list Secrets in namespace meshflow-system"),
        "{output}"
    );

    // A ServiceAccount nobody granted anything: a token for the API server's audience.
    cluster::create_service_account(&ns.name, "nobody").await;
    let token = cluster::token_request(&ns.name, "nobody", SA_ISSUER, 3600).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("apiserver-ca.crt");
    std::fs::write(&ca, cluster().ca_pem()).unwrap();
    let kubeconfig = dir.path().join("nobody.kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_json::to_vec(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{ "name": "dev", "cluster": {
                "server": cluster().server_url(), "certificate-authority": ca } }],
            "users": [{ "name": "nobody", "user": { "token": token } }],
            "contexts": [{ "name": "nobody", "context": { "cluster": "dev", "user": "nobody" } }],
            "current-context": "nobody",
        }))
        .unwrap(),
    )
    .unwrap();
    let (code, output, _) = meshflow_check(&kubeconfig, &["--pre", "--namespace", &ns.name]);
    eprintln!("meshflow check --pre (no rights):\n{output}");
    assert_eq!(code, 1, "{output}");
    for expected in [
        "× can create CustomResourceDefinitions".to_string(),
        "denied: create customresourcedefinitions.apiextensions.k8s.io (cluster-wide)".to_string(),
        "× can create MutatingWebhookConfigurations".to_string(),
        format!("× can create Deployments in namespace {}", ns.name),
        format!("denied: create deployments.apps in namespace {}", ns.name),
        format!("denied: list secrets in namespace {}", ns.name),
        "hint: helm install needs this".to_string(),
    ] {
        assert!(
            output.contains(&expected),
            "missing {expected:?} in:\n{output}"
        );
    }
    // The API and version checks still pass: every authenticated user may read /version.
    assert!(
        section(&output, "kubernetes-api")
            .iter()
            .all(|l| l.starts_with('√')),
        "{output}"
    );
}

/// A dev cluster of this test's own (`scripts/dev-cluster up` in a temporary run directory),
/// stopped and removed (`down --purge`) when dropped.
struct PrivateCluster {
    run_dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl PrivateCluster {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-cluster")
    }

    fn start() -> PrivateCluster {
        let run_dir = tempfile::Builder::new()
            .prefix("meshflow-check-cluster-")
            .tempdir()
            .unwrap();
        // The guard exists before `up`, so a half-started cluster is stopped too.
        let mut cluster = PrivateCluster {
            run_dir,
            kubeconfig: PathBuf::new(),
            kubectl: PathBuf::new(),
        };
        let out = Command::new(Self::script())
            .arg("up")
            .env("MESHFLOW_DEV_CLUSTER_DIR", cluster.run_dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/dev-cluster");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "private dev-cluster up: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let export = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("no {name} in {stdout}"))
                .to_string()
        };
        cluster.kubeconfig = PathBuf::from(export("KUBECONFIG"));
        cluster.kubectl = PathBuf::from(export("PATH").trim_end_matches(":$PATH")).join("kubectl");
        cluster
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Only ever this test's run directory (never the shared cluster's).
        let _ = Command::new(Self::script())
            .args(["down", "--purge"])
            .env("MESHFLOW_DEV_CLUSTER_DIR", self.run_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_naming_a_missing_crd_with_the_command_that_installs_it() {
    let private = PrivateCluster::start();
    let mut applied = Vec::new();
    for entry in std::fs::read_dir(crds_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "workflows.meshflow.io.yaml" {
            continue;
        }
        private.kubectl(&["apply", "-f", &path.to_string_lossy()]);
        applied.push(path);
    }
    assert_eq!(applied.len(), 4);
    for path in &applied {
        private.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "-f",
            &path.to_string_lossy(),
        ]);
    }
    let (code, output, took) =
        meshflow_check(&private.kubeconfig, &["--namespace", "meshflow-system"]);
    eprintln!("meshflow check (a CRD missing), {took:?}:\n{output}");
    assert_eq!(code, 1, "{output}");
    let crds = section(&output, "meshflow-crds").join("\n");
    assert!(
        crds.contains("× CustomResourceDefinition workflows.meshflow.io is installed")
            && crds.contains("workflows.meshflow.io is missing")
            && crds.contains("hint: install the CRDs: kubectl apply -f charts/meshflow/crds/"),
        "{output}"
    );
    for present in [
        "trafficpolicies",
        "authorizationpolicies",
        "requestauthentications",
        "peerauthentications",
    ] {
        assert!(
            crds.contains(&format!(
                "√ CustomResourceDefinition {present}.meshflow.io is installed, established and serving v1alpha1"
            )),
            "{output}"
        );
    }
    assert!(took < Duration::from_secs(30), "took {took:?}");
}
