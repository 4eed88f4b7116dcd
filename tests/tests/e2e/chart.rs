//! Issue 13, acceptance 7: the Helm chart `charts/meshflow`. `helm lint --strict` is clean with
//! the default and the HA values (`ci/ha-values.yaml`: 3 replicas, PostgreSQL); `helm template`
//! renders both, and what it renders is checked (hardened pods, probes, downward-API env, store
//! wiring, PodDisruptionBudget only with replicas > 1, RBAC without wildcards); the values schema
//! refuses typos and unsafe combinations; the manifests pass `kubernetes-validate --strict` and
//! `kubectl apply --dry-run=server` against the harness's real kube-apiserver. The Dockerfile is
//! checked statically (no container runtime exists here).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::{cluster, TestNamespace};

const RELEASE: &str = "meshflow";
/// `meshflow` release → `meshflow-control-plane` (Deployment, Service, ServiceAccount, Role).
const CONTROL_PLANE: &str = "meshflow-control-plane";
/// The five kinds of `charts/meshflow/crds/`, as RBAC resources.
const CRD_RESOURCES: [&str; 5] = [
    "trafficpolicies",
    "authorizationpolicies",
    "requestauthentications",
    "peerauthentications",
    "workflows",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    repo().join("charts/meshflow")
}

fn ha_values() -> String {
    chart_dir()
        .join("ci/ha-values.yaml")
        .to_string_lossy()
        .into_owned()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs helm; panics with its output unless it succeeded. Returns stdout.
fn helm_ok(args: &[&str]) -> String {
    let out = cluster().helm(args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Runs helm expecting it to fail; returns stdout + stderr.
fn helm_err(args: &[&str]) -> String {
    let out = cluster().helm(args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "helm {args:?} succeeded but should have been refused:\n{stdout}"
    );
    format!("{stdout}{stderr}")
}

/// Every non-empty document of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|doc| !doc.is_null())
        .map(|doc| serde_json::to_value(doc).unwrap())
        .collect()
}

/// `helm template meshflow charts/meshflow -n <namespace> <extra…>`, parsed.
fn render(namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", namespace];
    args.extend_from_slice(extra);
    documents(&helm_ok(&args))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}, rendered {}",
        found.len()
    );
    found[0]
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect()
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "{containers:?}");
    &containers[0]
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The Deployment's pod and container security settings and probes: what every values file
/// must keep.
fn assert_hardened(deployment: &Value) {
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{pod}");
    assert!(
        pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0,
        "{pod}"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{pod}"
    );
    let c = container(deployment);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    assert!(sc["capabilities"]["add"].is_null(), "{sc}");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/ready", "{probe}: {c}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}: {c}");
    }
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string(),
        "resources: {}",
        c["resources"]
    );
    // The downward API: the Lease and CA Secret namespace, and the lease holder.
    for (name, field) in [
        ("MESHFLOW_NAMESPACE", "metadata.namespace"),
        ("MESHFLOW_POD_NAME", "metadata.name"),
    ] {
        let e = env(c, name).unwrap_or_else(|| panic!("no {name}: {c}"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field, "{e}");
    }
    let a = args(c);
    for flag in [
        "--kubernetes",
        "--state-dir=/var/run/meshflow",
        "--listen=0.0.0.0:15012",
        "--admin=0.0.0.0:15014",
        "--workflow-api=127.0.0.1:0",
    ] {
        assert!(a.contains(&flag), "{flag} missing from {a:?}");
    }
    // The read-only root filesystem needs the state directory on a writable volume.
    let state_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/run/meshflow")
        .expect("a volume at the state directory");
    let state_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == state_mount["name"])
        .unwrap();
    assert!(state_volume["emptyDir"].is_object(), "{state_volume}");
    // Only gRPC and admin are container ports; the workflow API stays on loopback.
    let ports: BTreeSet<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([15012, 15014, 15017]));
}

fn assert_service(docs: &[Value]) {
    let service = one(docs, "Service");
    assert_eq!(service["metadata"]["name"], CONTROL_PLANE);
    let ports: Vec<(String, u64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc".to_string(), 15012),
            ("http-admin".to_string(), 15014),
            ("https-webhook".to_string(), 443)
        ]
    );
    let deployment = one(docs, "Deployment");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "Service selector {k} does not select the pods"
        );
    }
}

#[test]
fn helm_lint_is_clean_with_default_and_ha_values() {
    let chart = chart_dir().to_string_lossy().into_owned();
    let ha = ha_values();
    for extra in [&[][..], &["--values", ha.as_str()][..]] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend_from_slice(extra);
        let out = helm_ok(&args);
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{out}"
        );
        let noisy: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("[WARNING]") || l.contains("[ERROR]"))
            .collect();
        assert!(noisy.is_empty(), "helm lint {extra:?}: {noisy:?}");
    }
}

#[test]
fn default_values_render_one_hardened_replica_with_sqlite_on_a_claim() {
    let docs = render("meshflow-system", &[]);
    assert_eq!(
        kinds(&docs),
        BTreeSet::from(
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "Deployment",
                "MutatingWebhookConfiguration",
                "PersistentVolumeClaim",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ]
            .map(String::from)
        ),
        "no PodDisruptionBudget with one replica"
    );
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["name"], CONTROL_PLANE);
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_hardened(deployment);
    assert_service(&docs);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], CONTROL_PLANE);
    assert!(pod["topologySpreadConstraints"].is_null());
    // SQLite on the claim; one pod at a time on a ReadWriteOnce volume.
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let c = container(deployment);
    assert_eq!(
        env(c, "MESHFLOW_WORKFLOW_STORE").unwrap()["value"],
        "sqlite:///var/lib/meshflow/workflows.db"
    );
    let claim = one(&docs, "PersistentVolumeClaim");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["persistentVolumeClaim"].is_object())
        .expect("the store's claim is mounted");
    assert_eq!(
        volume["persistentVolumeClaim"]["claimName"],
        claim["metadata"]["name"]
    );
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(
        claim["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    // The CA: the control plane's generated one, in meshflow-ca.
    assert_eq!(
        env(c, "MESHFLOW_CA_SECRET").unwrap()["value"],
        "meshflow-ca"
    );
    assert_eq!(
        env(c, "MESHFLOW_TRUST_DOMAIN").unwrap()["value"],
        "cluster.local"
    );
    // The dashboards ConfigMap still carries every dashboard.
    let dashboards = one(&docs, "ConfigMap");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    let files: BTreeSet<&str> = dashboards["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "control-plane.json",
            "mesh-overview.json",
            "workflows.json",
            "workload.json"
        ])
    );
}

#[test]
fn ha_values_render_three_replicas_on_postgres_with_a_disruption_budget() {
    let ha = ha_values();
    let docs = render("meshflow-system", &["--values", &ha]);
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_hardened(deployment);
    assert_service(&docs);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let c = container(deployment);
    assert_eq!(
        env(c, "MESHFLOW_WORKFLOW_STORE").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "meshflow-postgres", "key": "url"}),
        "the PostgreSQL URL comes from a Secret, never from values in plain text"
    );
    assert!(
        of_kind(&docs, "PersistentVolumeClaim").is_empty(),
        "no SQLite claim with PostgreSQL"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname", "{pod}");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in spread["labelSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v);
    }
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "the budget selects the control-plane pods"
        );
    }
    // Without the HA file, more replicas on PostgreSQL also get a budget; it can be turned off.
    let pg = [
        "--set",
        "replicas=2,store.type=postgres,store.postgres.existingSecret=pg",
    ];
    assert_eq!(
        of_kind(&render("meshflow-system", &pg), "PodDisruptionBudget").len(),
        1
    );
    let mut off = pg.to_vec();
    off.extend(["--set", "podDisruptionBudget.enabled=false"]);
    assert!(of_kind(&render("meshflow-system", &off), "PodDisruptionBudget").is_empty());
}

/// One RBAC policy rule.
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
}

/// One permission: (group, resource, verb, resourceNames).
type Grant = (String, String, String, Vec<String>);

/// Every rule of `role`.
fn rules(role: &Value) -> Vec<Rule> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Rule {
            api_groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            verbs: strings(&r["verbs"]),
            resource_names: strings(&r["resourceNames"]),
        })
        .collect()
}

/// Every permission the role grants, one row each.
fn grants(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules(role) {
        for g in &rule.api_groups {
            for r in &rule.resources {
                for v in &rule.verbs {
                    out.insert((g.clone(), r.clone(), v.clone(), rule.resource_names.clone()));
                }
            }
        }
    }
    out
}

fn grant(g: &str, r: &str, v: &str, names: &[&str]) -> Grant {
    (
        g.into(),
        r.into(),
        v.into(),
        names.iter().map(|n| n.to_string()).collect(),
    )
}

fn assert_bound_to_service_account(docs: &[Value], binding_kind: &str, role: &Value) {
    let binding = one(docs, binding_kind);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": CONTROL_PLANE, "namespace": "meshflow-system"}])
    );
}

#[test]
fn rbac_is_least_privilege_without_wildcards() {
    let ha = ha_values();
    for extra in [&[][..], &["--values", ha.as_str()][..]] {
        let docs = render("meshflow-system", extra);
        for kind in ["ClusterRole", "Role"] {
            for rule in rules(one(&docs, kind)) {
                let all = rule.api_groups.iter().chain(&rule.resources);
                for s in all.chain(&rule.verbs).chain(&rule.resource_names) {
                    assert!(!s.contains('*'), "{kind} has a wildcard: {s}");
                }
                assert!(!rule.resources.is_empty() && !rule.verbs.is_empty());
            }
        }

        // Cluster-wide: exactly what the reflectors list and watch, the status merge patches
        // and TokenReviews (control-plane/src/kubernetes/). Namespaces are only read to match
        // a discoverySelector (below).
        let cluster_role = one(&docs, "ClusterRole");
        let mut expected = BTreeSet::new();
        for r in ["pods", "services"] {
            for v in ["list", "watch"] {
                expected.insert(grant("", r, v, &[]));
            }
        }
        for v in ["list", "watch"] {
            expected.insert(grant("discovery.k8s.io", "endpointslices", v, &[]));
        }
        for r in CRD_RESOURCES {
            for v in ["list", "watch"] {
                expected.insert(grant("meshflow.io", r, v, &[]));
            }
            expected.insert(grant("meshflow.io", &format!("{r}/status"), "patch", &[]));
        }
        expected.insert(grant(
            "authentication.k8s.io",
            "tokenreviews",
            "create",
            &[],
        ));
        expected.extend(injector_grants());
        assert_eq!(grants(cluster_role), expected, "ClusterRole");
        assert_bound_to_service_account(&docs, "ClusterRoleBinding", cluster_role);

        // The release namespace: the Lease (created when absent, taken by server-side apply
        // and renewed by strategic-merge patch: get/patch by name) and the generated CA Secret
        // (created when absent, read by name, never updated).
        let role = one(&docs, "Role");
        assert_eq!(role["metadata"]["namespace"], "meshflow-system");
        let lease = ["meshflow-control-plane"];
        let ca = ["meshflow-ca"];
        let expected = BTreeSet::from([
            grant("coordination.k8s.io", "leases", "create", &[]),
            grant("coordination.k8s.io", "leases", "get", &lease),
            grant("coordination.k8s.io", "leases", "patch", &lease),
            grant("", "secrets", "create", &[]),
            grant("", "secrets", "get", &ca),
        ]);
        assert_eq!(grants(role), expected, "Role");
        assert_bound_to_service_account(&docs, "RoleBinding", role);
    }

    // The meshflow.io resources are exactly the CRDs the chart installs.
    let mut plurals = BTreeSet::new();
    for entry in std::fs::read_dir(chart_dir().join("crds")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for crd in documents(&text) {
            assert_eq!(crd["spec"]["group"], "meshflow.io");
            plurals.insert(crd["spec"]["names"]["plural"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(plurals, BTreeSet::from(CRD_RESOURCES.map(String::from)));

    // A discoverySelector adds reading the Namespaces it matches, and nothing else (the
    // injector reads them too: compared without it).
    let no_injector = ["--set", "injector.enabled=false"];
    let docs = render(
        "meshflow-system",
        &[
            "--set-string",
            "discoverySelector=meshflow.io/enabled=true",
            no_injector[0],
            no_injector[1],
        ],
    );
    let added: BTreeSet<_> = grants(one(&docs, "ClusterRole"))
        .difference(&grants(one(
            &render("meshflow-system", &no_injector),
            "ClusterRole",
        )))
        .cloned()
        .collect();
    assert_eq!(
        added,
        BTreeSet::from([
            grant("", "namespaces", "list", &[]),
            grant("", "namespaces", "watch", &[]),
        ])
    );

    // A CA Secret of your own is only read, by name; nothing may create Secrets then.
    let docs = render("meshflow-system", &["--set", "ca.existingSecret=corp-ca"]);
    let secrets: BTreeSet<_> = grants(one(&docs, "Role"))
        .into_iter()
        .filter(|(_, r, _, _)| r == "secrets")
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from([grant("", "secrets", "get", &["corp-ca"])])
    );
    let c = container(one(&docs, "Deployment")).clone();
    assert_eq!(env(&c, "MESHFLOW_CA_SECRET").unwrap()["value"], "corp-ca");

    // rbac.create=false renders no RBAC at all.
    let docs = render("meshflow-system", &["--set", "rbac.create=false"]);
    for kind in ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"] {
        assert!(
            of_kind(&docs, kind).is_empty(),
            "{kind} with rbac.create=false"
        );
    }
}

/// Issue 14, item 4: the injection webhook. The MutatingWebhookConfiguration sends pod
/// creations of labelled namespaces (never the release's own) to the control plane's Service,
/// skips opted-out pods, has no side effects, speaks v1 and v1beta1, is reinvoked, and takes
/// its timeout and failurePolicy from values; its caBundle is left to the control plane, which
/// is told the configuration's name and may get/patch only it. The Deployment's `--proxy-*`
/// flags are exactly what `meshflow inject` accepts too.
#[test]
fn the_injection_webhook_and_what_injected_pods_get_come_from_values() {
    let docs = render("meshflow-system", &[]);
    let webhook_configuration = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        webhook_configuration["metadata"]["name"],
        "meshflow-injector-meshflow-system"
    );
    let webhooks = webhook_configuration["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(
        webhook["clientConfig"],
        json!({ "service": { "name": CONTROL_PLANE, "namespace": "meshflow-system",
                             "path": "/inject", "port": 443 } }),
        "no caBundle: the control plane writes it"
    );
    assert_eq!(
        webhook["rules"],
        json!([{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                 "resources": ["pods"], "scope": "Namespaced" }])
    );
    assert_eq!(
        webhook["namespaceSelector"]["matchLabels"],
        json!({ "meshflow.io/inject": "enabled" })
    );
    assert_eq!(
        webhook["namespaceSelector"]["matchExpressions"],
        json!([{ "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["meshflow-system", "kube-system"] }])
    );
    assert_eq!(
        webhook["objectSelector"],
        json!({ "matchExpressions": [{ "key": "meshflow.io/inject", "operator": "NotIn",
                                       "values": ["disabled"] }] })
    );
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1", "v1beta1"]));
    assert_eq!(webhook["timeoutSeconds"], 10);
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");

    let deployment = one(&docs, "Deployment");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["meshflow.io/inject"], "disabled",
        "the control plane is never injected"
    );
    let c = container(deployment);
    let a = args(c);
    for flag in [
        "--injector-listen=0.0.0.0:15017",
        "--injector-host=meshflow-control-plane.meshflow-system.svc",
        "--injector-webhook-config=meshflow-injector-meshflow-system",
        "--injector-failure-mode=deny",
        "--injector-timeout=8s",
        "--proxy-image=meshflow/proxy:0.1.0",
        "--proxy-control-plane=meshflow-control-plane.meshflow-system.svc:15012",
        "--native-sidecar=auto",
        "--sidecar-inbound-port=15006",
    ] {
        assert!(a.contains(&flag), "{flag} missing from {a:?}");
    }
    // The Service's port 443 reaches the container's injector port.
    let service = one(&docs, "Service");
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 443)
        .unwrap();
    assert_eq!(https["targetPort"], "injector");

    // The chart's --proxy-* flags are meshflow inject's: it accepts every one of them and
    // injects that image.
    let proxy_flags: Vec<&str> = a
        .iter()
        .copied()
        .filter(|f| f.starts_with("--proxy-") || f.starts_with("--native-sidecar"))
        .collect();
    assert!(proxy_flags.len() >= 12, "{proxy_flags:?}");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: x}]}\n",
    )
    .unwrap();
    let out = std::process::Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["inject", "-f", &manifest.to_string_lossy()])
        .args(&proxy_flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = &documents(&String::from_utf8_lossy(&out.stdout))[0];
    assert_eq!(
        injected["spec"]["containers"][0]["image"],
        "meshflow/proxy:0.1.0"
    );

    // Values: failurePolicy Ignore is the control plane's allow; a certificate Secret is
    // mounted and named; proxy settings become flags.
    let docs = render(
        "meshflow-system",
        &[
            "--set",
            "injector.failurePolicy=Ignore,injector.timeoutSeconds=5,injector.existingSecret=webhook-tls",
            "--set",
            "proxy.nativeSidecar=always,proxy.excludeOutboundCIDRs={169.254.169.254/32},proxy.excludeInboundPorts={9901}",
        ],
    );
    let webhook = &one(&docs, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(webhook["failurePolicy"], "Ignore");
    assert_eq!(webhook["timeoutSeconds"], 5);
    let deployment = one(&docs, "Deployment");
    let c = container(deployment);
    let a = args(c);
    for flag in [
        "--injector-failure-mode=allow",
        "--injector-timeout=3s",
        "--injector-cert=/etc/meshflow/injector/tls.crt",
        "--injector-key=/etc/meshflow/injector/tls.key",
        "--injector-ca-bundle=/etc/meshflow/injector/ca.crt",
        "--native-sidecar=always",
        "--proxy-exclude-outbound-cidrs=169.254.169.254/32",
        "--proxy-exclude-inbound-ports=9901",
    ] {
        assert!(a.contains(&flag), "{flag} missing from {a:?}");
    }
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "injector-tls")
        .expect("the certificate Secret is mounted");
    assert_eq!(volume["secret"]["secretName"], "webhook-tls");

    // Off: no webhook, no injector flags, port or permissions.
    let docs = render("meshflow-system", &["--set", "injector.enabled=false"]);
    assert!(of_kind(&docs, "MutatingWebhookConfiguration").is_empty());
    let c = container(one(&docs, "Deployment"));
    assert!(!args(c).iter().any(|f| f.starts_with("--injector-")));
    assert!(!args(c).iter().any(|f| f.starts_with("--proxy-")));
    assert_eq!(
        one(&docs, "Service")["spec"]["ports"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let left = grants(one(&docs, "ClusterRole"));
    assert!(left.is_disjoint(&injector_grants()), "{left:?}");

    // The schema refuses what the webhook or the flags would refuse.
    let chart = chart_dir().to_string_lossy().into_owned();
    for (set, field) in [
        ("injector.failurePolicy=Sometimes", "injector.failurePolicy"),
        ("injector.timeoutSeconds=60", "injector.timeoutSeconds"),
        ("proxy.nativeSidecar=maybe", "proxy.nativeSidecar"),
        ("proxy.uid=0", "proxy.uid"),
        (
            "proxy.excludeOutboundCIDRs={10.0.0.1}",
            "proxy.excludeOutboundCIDRs",
        ),
        ("proxy.ports.admin=70000", "proxy.ports.admin"),
        ("proxy.imag=x", "Additional property imag is not allowed"),
    ] {
        let out = helm_err(&["template", RELEASE, &chart, "--set", set]);
        assert!(out.contains(field), "--set {set}: {out}");
    }
}

/// What the injection webhook adds to the ClusterRole (control-plane/src/injector/publish.rs):
/// namespace labels and the watch of enabled namespaces, the trust bundle ConfigMap by
/// server-side apply (create cannot be limited by name), and the one webhook configuration.
fn injector_grants() -> BTreeSet<Grant> {
    let webhook = ["meshflow-injector-meshflow-system"];
    BTreeSet::from([
        grant("", "namespaces", "get", &[]),
        grant("", "namespaces", "list", &[]),
        grant("", "namespaces", "watch", &[]),
        grant("", "configmaps", "create", &[]),
        grant("", "configmaps", "patch", &["meshflow-trust-bundle"]),
        grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "get",
            &webhook,
        ),
        grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            &webhook,
        ),
    ])
}

/// Every object level of the schema refuses unknown keys: `additionalProperties: false`, or a
/// string map (labels, annotations, nodeSelector). Every property is described.
fn assert_closed(schema: &Value, path: &str) {
    let is_object = schema["type"] == "object" || schema["properties"].is_object();
    if is_object && path != ".global" {
        let extra = &schema["additionalProperties"];
        assert!(
            *extra == json!(false) || *extra == json!({"type": "string"}),
            "{path}: additionalProperties is {extra}, so a misspelt key would be accepted"
        );
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            let p = format!("{path}.{name}");
            assert!(
                sub["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{p} has no description"
            );
            assert_closed(sub, &p);
        }
    }
    if schema["items"].is_object() {
        assert_closed(&schema["items"], &format!("{path}[]"));
    }
}

/// The keys of values.yaml and the schema's properties are the same, level by level (under
/// `resources` and `proxy.resources` values.yaml sets only some of the quantities the schema
/// allows).
fn assert_same_keys(values: &Value, schema: &Value, path: &str) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let Some(values) = values.as_object() else {
        return;
    };
    let in_values: BTreeSet<&str> = values.keys().map(String::as_str).collect();
    let in_schema: BTreeSet<&str> = props
        .keys()
        .map(String::as_str)
        .filter(|k| !(path.is_empty() && *k == "global"))
        .collect();
    if path.starts_with(".resources.") || path.starts_with(".proxy.resources.") {
        assert!(
            in_values.is_subset(&in_schema),
            "values.yaml vs values.schema.json at {path:?}: {in_values:?} {in_schema:?}"
        );
    } else {
        assert_eq!(
            in_values, in_schema,
            "values.yaml vs values.schema.json at {path:?}"
        );
    }
    for (k, v) in values {
        assert_same_keys(v, &props[k], &format!("{path}.{k}"));
    }
}

#[test]
fn values_schema_refuses_unknown_keys_and_unsafe_combinations() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    assert_closed(&schema, "");
    let values_text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    let values: Value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&values_text).unwrap())
            .unwrap();
    assert_same_keys(&values, &schema, "");
    // Every key in values.yaml has a comment right above it.
    let lines: Vec<&str> = values_text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let is_key = trimmed
            .split_once(':')
            .is_some_and(|(k, _)| !k.is_empty() && !k.starts_with('#') && !k.contains(' '));
        if is_key {
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "values.yaml:{}: `{}` is not documented by a comment above it",
                i + 1,
                line.trim()
            );
        }
    }

    let chart = chart_dir().to_string_lossy().into_owned();
    let refused = |set: &str, expect: &str| {
        let out = helm_err(&["template", RELEASE, &chart, "--set", set]);
        assert!(
            out.contains("values don't meet the specifications of the schema"),
            "--set {set}: not refused by the schema: {out}"
        );
        assert!(out.contains(expect), "--set {set}: {expect:?} not in {out}");
    };
    // Typos, at the top and deep down.
    refused("replica=3", "Additional property replica is not allowed");
    refused(
        "store.sqlite.persistence.sise=5Gi",
        "Additional property sise is not allowed",
    );
    refused(
        "resources.limits.memroy=1Gi",
        "Additional property memroy is not allowed",
    );
    // Wrong types and values.
    refused("store.type=mysql", "store.type");
    refused("ca.leafTTL=forever", "ca.leafTTL");
    refused("discoverySelector=no-equals-sign", "discoverySelector");
    refused("image.pullPolicy=Sometimes", "image.pullPolicy");
    // Unsafe combinations: replicas sharing one SQLite file; PostgreSQL without its URL.
    refused("replicas=3", "store.type");
    refused("store.type=postgres", "store.postgres.existingSecret");
}

/// `${MESHFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshflow}`, as scripts/install-deps and
/// scripts/dev-cluster use it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHFLOW_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    base.join("meshflow")
}

#[test]
fn rendered_manifests_pass_kubernetes_validate() {
    let validator = cache_dir().join("venv/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run scripts/install-deps test",
        validator.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let chart = chart_dir().to_string_lossy().into_owned();
    let ha = ha_values();
    let mut files = Vec::new();
    for (name, extra) in [
        ("default.yaml", &[][..]),
        ("ha.yaml", &["--values", ha.as_str()][..]),
    ] {
        let mut args = vec![
            "template",
            RELEASE,
            &chart,
            "--namespace",
            "meshflow-system",
        ];
        args.extend_from_slice(extra);
        let path = dir.path().join(name);
        std::fs::write(&path, helm_ok(&args)).unwrap();
        files.push(path);
    }
    // --strict: unknown fields are errors too (the apiserver would drop them silently).
    let out = std::process::Command::new(&validator)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "kubernetes-validate refused the chart's manifests:\n{stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("ERROR") && !stderr.contains("ERROR"),
        "{stdout}{stderr}"
    );
    // It really looked at each object (10 by default, 10 with the HA values).
    assert_eq!(
        stdout.matches(" passed for resource ").count(),
        20,
        "{stdout}"
    );
    assert!(
        stdout.contains("poddisruptionbudget/meshflow-control-plane"),
        "{stdout}"
    );
}

/// Applies the chart's CRDs (idempotent; other tests apply the same files, so a concurrent
/// create is retried).
async fn apply_crds() {
    let crds = chart_dir().join("crds").to_string_lossy().into_owned();
    let mut last = String::new();
    for _ in 0..5 {
        let out = cluster().kubectl(&["apply", "-f", &crds]);
        if out.status.success() {
            return;
        }
        let (stdout, stderr) = text(&out);
        last = format!("{stdout}{stderr}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("kubectl apply -f {crds}: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_pass_a_server_side_dry_run_against_the_apiserver() {
    let ns = TestNamespace::new("chart").await;
    apply_crds().await;
    let chart = chart_dir().to_string_lossy().into_owned();
    let ha = ha_values();
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("default", &[][..]), ("ha", &["--values", ha.as_str()][..])] {
        // --validate: helm asks this apiserver which API versions it serves (the
        // PodDisruptionBudget's group version follows them), checks the objects against its
        // OpenAPI schema and that none exists already; kubectl then has the apiserver run
        // admission and validation on every object without storing it. The CRDs are not
        // rendered: they were applied above (helm would refuse them as not its own).
        let mut args = vec![
            "template",
            RELEASE,
            &chart,
            "--namespace",
            &ns.name,
            "--validate",
        ];
        args.extend_from_slice(extra);
        let rendered = helm_ok(&args);
        let docs = documents(&rendered);
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &rendered).unwrap();
        let out = cluster().kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "--namespace",
            &ns.name,
            "-f",
            &path.to_string_lossy(),
        ]);
        // Every rendered object was accepted by the apiserver.
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(accepted, docs.len(), "{name}:\n{out}");
        for (kind, object) in [
            ("deployment.apps", CONTROL_PLANE.to_string()),
            ("service", CONTROL_PLANE.to_string()),
            ("serviceaccount", CONTROL_PLANE.to_string()),
            ("role.rbac.authorization.k8s.io", CONTROL_PLANE.to_string()),
            (
                "clusterrole.rbac.authorization.k8s.io",
                format!("{CONTROL_PLANE}-{}", ns.name),
            ),
            (
                "mutatingwebhookconfiguration.admissionregistration.k8s.io",
                format!("meshflow-injector-{}", ns.name),
            ),
        ] {
            assert!(
                out.contains(&format!("{kind}/{object} created (server dry run)")),
                "{name}: {kind}/{object} not created:\n{out}"
            );
        }
        let pdb = format!("poddisruptionbudget.policy/{CONTROL_PLANE} created (server dry run)");
        assert_eq!(out.contains(&pdb), name == "ha", "{name}:\n{out}");
    }
    // Nothing was stored.
    let left = cluster().kubectl_ok(&[
        "get",
        "deployments,services,roles,poddisruptionbudgets",
        "--namespace",
        &ns.name,
        "-o",
        "name",
    ]);
    assert_eq!(left.trim(), "", "a dry run stored objects");

    // NOTES.txt, through the same dry run: how to wait for the rollout, and a warning when
    // the SQLite store would live in an emptyDir.
    let out = helm_ok(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        &ns.name,
        "--dry-run=server",
        "--set",
        "store.sqlite.persistence.enabled=false",
    ]);
    let notes = &out[out.find("NOTES:").expect("helm printed the NOTES")..];
    assert!(
        notes.contains(&format!(
            "kubectl -n {} rollout status deployment/{CONTROL_PLANE}",
            ns.name
        )),
        "{notes}"
    );
    assert!(
        notes.contains("WARNING: the workflow store is SQLite in the pod's emptyDir"),
        "{notes}"
    );
}

#[test]
fn dockerfile_builds_release_binaries_and_runs_them_as_non_root() {
    // No container runtime exists here, so the Dockerfile is checked as text: the build stage
    // runs CI's install step and the release build, and each final stage runs one binary as
    // the unprivileged user the chart expects (65532).
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("RUN scripts/install-deps build"));
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let stage = |name: &str| -> &str {
        stages
            .iter()
            .find(|s| s.lines().next().unwrap().ends_with(&format!(" AS {name}")))
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    assert!(stage("source").lines().next().unwrap().starts_with("rust:"));
    assert!(stage("build").contains("cargo build --release --locked -p meshflow-control-plane"));
    // The proxy image ships the profile-guided sidecar unless the build says PGO=0, and the
    // control-plane image never builds it.
    assert!(dockerfile.contains("ARG PGO=1\n"));
    assert!(stage("proxy-build-0").contains("cargo build --release --locked -p meshflow-proxy"));
    assert!(stage("proxy-build-1")
        .contains("scripts/build-pgo-proxy \\\n    && mkdir -p /out \\\n    && cp target/release-pgo/meshflow-proxy /out/"));
    assert!(stage("proxy-build").starts_with("proxy-build-${PGO} AS proxy-build"));
    assert!(stage("proxy").contains("COPY --from=proxy-build /out/meshflow-proxy "));
    assert!(!stage("control-plane").contains("proxy-build"));
    for (name, binary) in [
        ("control-plane", "meshflow-control-plane"),
        ("proxy", "meshflow-proxy"),
    ] {
        let s = stage(name);
        assert!(s.contains("USER 65532:65532"), "{name}: {s}");
        assert!(
            s.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
            "{name}: {s}"
        );
    }
    // A plain `docker build .` gives the chart's image: the control plane is the last stage.
    assert!(stages.last().unwrap().contains(" AS control-plane"));
    let docs = render("meshflow-system", &[]);
    let c = container(one(&docs, "Deployment"));
    assert!(
        c["command"].is_null(),
        "the chart uses the image's entrypoint"
    );
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
}
