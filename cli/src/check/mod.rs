//! `meshflow check` (like `linkerd check`): whether a cluster can take meshflow (`--pre`) and
//! whether an installed meshflow works — the Kubernetes API and its version, the CRDs, the
//! control plane (its leader Lease and each replica's `/ready`), the injection webhook (its
//! `caBundle`, the certificate it serves, and a server-side dry run through it), the mesh CA
//! and the trust bundles, and every connected sidecar's config version. Each check ends as
//! passed, warning, failed (with a hint) or skipped (an earlier failure kept it from running);
//! every API and HTTP call is bounded by `--timeout`.

pub mod certs;
pub mod replicas;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, PostParams};
use meshflow_policies::inject;
use serde_json::json;

use crate::policy_kube::{ClusterOptions, INSTALL_CRDS};
use replicas::{behind, chain, ProxiesAnswer, Replica};
use report::{Outcome, Report};

/// The labels of the chart's control-plane pods (`meshflow.selectorLabels`, without the
/// release name).
pub const CONTROL_PLANE_SELECTOR: &str =
    "app.kubernetes.io/name=meshflow,app.kubernetes.io/component=control-plane";
/// The chart's name for the control plane's admin container port.
pub const ADMIN_PORT_NAME: &str = "admin";
/// The admin port when a pod does not name one.
pub const DEFAULT_ADMIN_PORT: u16 = 15014;
/// The name of the chart's webhook inside its MutatingWebhookConfiguration (tests' too).
pub const WEBHOOK_NAME: &str = "inject.meshflow.io";
/// The Lease the control plane's leader holds (control-plane/src/kubernetes/leader.rs).
pub const LEASE_NAME: &str = "meshflow-control-plane";
/// The CA Secret when the control plane does not say otherwise (`--ca-secret`).
pub const DEFAULT_CA_SECRET: &str = "meshflow-ca";
/// The oldest Kubernetes meshflow supports.
pub const MIN_KUBERNETES: (u32, u32) = (1, 20);
/// Native sidecars (init containers with `restartPolicy: Always`) from this version on.
pub const NATIVE_SIDECARS: (u32, u32) = (1, 29);

/// What to do about an expired (or expiring) webhook certificate.
const EXPIRY_HINT: &str = "a certificate from the mesh CA is renewed by the control plane (restart it); one given with --injector-cert (the chart's injector.existingSecret) must be replaced in its files or Secret — the control plane re-reads them within 30 s";

const API: &str = "kubernetes-api";
const VERSION: &str = "kubernetes-version";
const PRE: &str = "pre-install";
const CRDS: &str = "meshflow-crds";
const CONTROL_PLANE: &str = "control-plane";
const INJECTOR: &str = "injector";
const IDENTITY: &str = "identity";
const DATA_PLANE: &str = "data-plane";

/// What `meshflow check` checks, and how.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The cluster (kubeconfig, context).
    pub cluster: ClusterOptions,
    /// The control plane's namespace.
    pub namespace: String,
    /// Pre-install checks instead of the post-install ones.
    pub pre: bool,
    /// The replicas' admin URLs (`http://host:port`, see [`replicas::admin_url`]); empty: the
    /// control-plane pods, through the API server's pod proxy.
    pub admins: Vec<String>,
    /// How long sidecars may take to acknowledge the current config.
    pub wait: Duration,
    /// Bound of each check's API and HTTP calls, in all.
    pub timeout: Duration,
}

/// Runs the checks; never panics and never waits longer than the bounds allow (about
/// `timeout` per check plus `wait`).
pub async fn run(options: &CheckOptions) -> Report {
    let mut report = Report::default();
    let rest: &[&str] = if options.pre {
        &[VERSION, PRE, CRDS]
    } else {
        &[VERSION, CRDS, CONTROL_PLANE, INJECTOR, IDENTITY, DATA_PLANE]
    };
    let skip_rest = |report: &mut Report, why: &str| {
        for category in rest {
            report.skip(category, format!("{category} checks"), why);
        }
    };
    let made = tokio::time::timeout(
        options.timeout,
        crate::policy_kube::client(&options.cluster),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no client within {:?}", options.timeout)));
    let (client, url) = match made {
        Ok(made) => made,
        Err(e) => {
            report.fail(
                API,
                "can initialize the client",
                e,
                "point at the cluster: set KUBECONFIG or give --kubeconfig and --context",
            );
            skip_rest(
                &mut report,
                "the Kubernetes client could not be initialized",
            );
            return report;
        }
    };
    let url = url.trim_end_matches('/').to_string();
    report.pass(API, "can initialize the client");
    let info = match bounded(options.timeout, client.apiserver_version()).await {
        Ok(info) => info,
        Err(e) => {
            report.fail(
                API,
                "can query the Kubernetes API",
                format!("cannot reach the Kubernetes API server at {url}: {e}"),
                format!("check that the API server at {url} is up and reachable from here (kubectl version)"),
            );
            skip_rest(&mut report, "the Kubernetes API is not reachable");
            return report;
        }
    };
    report.pass(API, format!("can query the Kubernetes API at {url}"));
    let (outcome, text) = judge_version(&info.major, &info.minor, &info.git_version);
    let description = "is running the minimum Kubernetes API version";
    match outcome {
        Outcome::Success => report.pass(VERSION, format!("{description} ({text})")),
        Outcome::Error => report.fail(
            VERSION,
            description,
            text,
            "upgrade the cluster to Kubernetes 1.20 or later",
        ),
        _ => report.warn(
            VERSION,
            description,
            text,
            "meshflow needs Kubernetes 1.20 or later",
        ),
    }
    let check = Check {
        options,
        client,
        http: reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .build()
            .unwrap_or_default(),
        deadline: std::cell::Cell::new(Instant::now() + options.timeout),
    };
    if options.pre {
        check.pre_install(&mut report).await;
        check.crds_before_install(&mut report).await;
    } else {
        check.crds(&mut report).await;
        let replicas = check.control_plane(&mut report).await;
        let settings = check.settings(&replicas.ready).await;
        let injector = check.injector(&mut report, &settings).await;
        check.identity(&mut report, &settings, injector).await;
        check.data_plane(&mut report, &replicas, &settings).await;
    }
    report
}

/// The API server's version against meshflow's minimum: (outcome, what to say).
pub fn judge_version(major: &str, minor: &str, git_version: &str) -> (Outcome, String) {
    let Some(version) = inject::parse_server_version(major, minor) else {
        return (
            Outcome::Warning,
            format!("cannot read the server's version (major {major:?}, minor {minor:?})"),
        );
    };
    let shown = if git_version.is_empty() {
        format!("{}.{}", version.0, version.1)
    } else {
        git_version.to_string()
    };
    if version < MIN_KUBERNETES {
        return (
            Outcome::Error,
            format!("the cluster runs Kubernetes {shown}; meshflow needs 1.20 or later"),
        );
    }
    if version >= NATIVE_SIDECARS {
        (
            Outcome::Success,
            format!("{shown}; native sidecars available"),
        )
    } else {
        (
            Outcome::Success,
            format!("{shown}; native sidecars need 1.29, so the proxy is injected as the first container"),
        )
    }
}

/// The leader Lease's state at `now` (Unix seconds): `Ok(what to say)` when a holder renewed
/// it within its duration, `Err(what is wrong)` otherwise.
pub fn judge_lease(
    holder: Option<&str>,
    duration_seconds: Option<i32>,
    renewed_unix: Option<i64>,
    now: i64,
) -> Result<String, String> {
    let holder = holder.filter(|h| !h.is_empty()).ok_or(
        "it has no holder: no replica leads (none is running, or none reaches the API server)",
    )?;
    let duration = i64::from(duration_seconds.unwrap_or(0));
    let Some(renewed) = renewed_unix else {
        return Err(format!("held by {holder} but never renewed"));
    };
    let age = now - renewed;
    if duration > 0 && age > duration {
        return Err(format!(
            "held by {holder}, last renewed {} ago, longer than its duration of {duration} s: the leader stopped renewing (down, or cut off from the API server)",
            certs::human(age.unsigned_abs())
        ));
    }
    Ok(format!(
        "held by {holder}, renewed {} ago",
        certs::human(age.max(0).unsigned_abs())
    ))
}

/// A label selector as the API server's query syntax (`a=b,c in (d,e),!f`).
pub fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        parts.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            _ => format!("!{}", expression.key),
        });
    }
    parts.join(",")
}

/// Whether `installed` and `expected` are the same schema: JSON equality with every number
/// compared as a float (the API server may give back `0` where the generator wrote `0.0`).
pub fn same_schema(installed: &serde_json::Value, expected: &serde_json::Value) -> bool {
    fn normal(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Number(n) => json!(n.as_f64()),
            serde_json::Value::Array(a) => a.iter().map(normal).collect(),
            serde_json::Value::Object(o) => o
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normal(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            other => other.clone(),
        }
    }
    normal(installed) == normal(expected)
}

/// Runs `call` within `timeout`; an error is described, naming a refusal by RBAC.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Ok(value)) => Ok(value),
        Ok(Err(kube::Error::Api(status))) => Err(format!(
            "the API server answered {} {}: {}",
            status.code, status.reason, status.message
        )),
        Ok(Err(e)) => Err(chain(&e)),
    }
}

/// Whether `call` failed with 403 (its error from [`bounded`]).
fn forbidden(error: &str) -> bool {
    error.starts_with("the API server answered 403")
}

/// What the control plane says about itself in `/config_dump`'s `settings` (defaults when no
/// replica answered).
#[derive(Debug, Clone, Default)]
struct Settings {
    /// `--discovery-selector`.
    discovery_selector: Option<String>,
    /// `--ca-secret`.
    ca_secret: Option<String>,
    /// `--injector-webhook-config`.
    webhook_config: Option<String>,
    /// Whether they came from a replica.
    known: bool,
}

/// The control plane's replicas: every one found, and those answering `/ready` with 200.
#[derive(Debug, Default)]
struct Replicas {
    all: Vec<Replica>,
    ready: Vec<Replica>,
}

struct Check<'a> {
    options: &'a CheckOptions,
    client: kube::Client,
    http: reqwest::Client,
    /// When the check under way must have its answers (`--timeout` after it began).
    deadline: std::cell::Cell<Instant>,
}

/// What `helm install` of the chart creates (and Helm's release records): kind, API group,
/// resource, namespaced, verbs.
const HELM_INSTALL: &[(&str, &str, &str, bool, &[&str])] = &[
    ("Namespaces", "", "namespaces", false, &["create"]),
    (
        "CustomResourceDefinitions",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        false,
        &["create"],
    ),
    (
        "ClusterRoles",
        "rbac.authorization.k8s.io",
        "clusterroles",
        false,
        &["create"],
    ),
    (
        "ClusterRoleBindings",
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        false,
        &["create"],
    ),
    (
        "MutatingWebhookConfigurations",
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        false,
        &["create"],
    ),
    ("Deployments", "apps", "deployments", true, &["create"]),
    ("Services", "", "services", true, &["create"]),
    ("ServiceAccounts", "", "serviceaccounts", true, &["create"]),
    (
        "Roles",
        "rbac.authorization.k8s.io",
        "roles",
        true,
        &["create"],
    ),
    (
        "RoleBindings",
        "rbac.authorization.k8s.io",
        "rolebindings",
        true,
        &["create"],
    ),
    // Helm keeps its release records in Secrets of the release namespace.
    ("Secrets", "", "secrets", true, &["create", "get", "list"]),
    ("ConfigMaps", "", "configmaps", true, &["create"]),
    (
        "PersistentVolumeClaims",
        "",
        "persistentvolumeclaims",
        true,
        &["create"],
    ),
    (
        "PodDisruptionBudgets",
        "policy",
        "poddisruptionbudgets",
        true,
        &["create"],
    ),
    ("Leases", "coordination.k8s.io", "leases", true, &["create"]),
];

impl Check<'_> {
    fn ns(&self) -> &str {
        &self.options.namespace
    }

    /// Starts a check: its API calls share one `--timeout` from now.
    fn begin(&self) {
        self.deadline.set(Instant::now() + self.options.timeout);
    }

    /// An API call of the check under way, within what is left of its `--timeout`.
    async fn api<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, String> {
        let left = self
            .deadline
            .get()
            .saturating_duration_since(Instant::now());
        bounded(left, call).await.map_err(|e| {
            if e.starts_with("no answer within") {
                format!(
                    "no answer within --timeout ({:?} for each check)",
                    self.options.timeout
                )
            } else {
                e
            }
        })
    }

    /// `--pre`: may this user create what `helm install` creates (SelfSubjectAccessReview)?
    async fn pre_install(&self, report: &mut Report) {
        self.begin();
        let reviews =
            HELM_INSTALL
                .iter()
                .map(|(kind, group, resource, namespaced, verbs)| async move {
                    let mut denied = Vec::new();
                    let mut failed = None;
                    for verb in *verbs {
                        let review: SelfSubjectAccessReview = serde_json::from_value(json!({
                            "apiVersion": "authorization.k8s.io/v1",
                            "kind": "SelfSubjectAccessReview",
                            "spec": { "resourceAttributes": {
                                "group": group, "resource": resource, "verb": verb,
                                "namespace": if *namespaced { self.ns() } else { "" },
                            }},
                        }))
                        .expect("a well-formed review");
                        let api: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
                        match self.api(api.create(&PostParams::default(), &review)).await {
                            Ok(answer) => {
                                let status = answer.status.unwrap_or_default();
                                if !status.allowed {
                                    let qualified = if group.is_empty() {
                                        resource.to_string()
                                    } else {
                                        format!("{resource}.{group}")
                                    };
                                    let mut line = format!("denied: {verb} {qualified}");
                                    line.push_str(&if *namespaced {
                                        format!(" in namespace {}", self.ns())
                                    } else {
                                        " (cluster-wide)".to_string()
                                    });
                                    if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
                                        line.push_str(&format!(" ({reason})"));
                                    }
                                    denied.push(line);
                                }
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    (kind, namespaced, verbs, denied, failed)
                });
        for (kind, namespaced, verbs, denied, failed) in futures::future::join_all(reviews).await {
            let verbs = match verbs.len() {
                1 => verbs[0].to_string(),
                _ => {
                    let (last, first) = verbs.split_last().expect("verbs");
                    format!("{} and {last}", first.join(", "))
                }
            };
            let description = if *namespaced {
                format!("can {verbs} {kind} in namespace {}", self.ns())
            } else {
                format!("can {verbs} {kind}")
            };
            if let Some(e) = failed {
                report.fail(
                    PRE,
                    description,
                    format!("cannot ask the API server (SelfSubjectAccessReview): {e}"),
                    "",
                );
            } else if denied.is_empty() {
                report.pass(PRE, description);
            } else {
                report.fail(
                    PRE,
                    description,
                    denied.join("\n"),
                    "helm install needs this: ask a cluster administrator for it, or use a kubeconfig or context that has it (--kubeconfig, --context)",
                );
            }
        }
    }

    /// Each CRD this binary generates, by name: the cluster's object (`None` when it is not
    /// installed), or why it could not be read.
    async fn installed_crds(
        &self,
    ) -> Vec<(String, Result<Option<CustomResourceDefinition>, String>)> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut out = Vec::new();
        for crd in meshflow_policies::crd::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let got = self.api(api.get_opt(&name)).await;
            out.push((name, got));
        }
        out
    }

    /// `--pre`: which of meshflow's CRDs exist already (not a failure).
    async fn crds_before_install(&self, report: &mut Report) {
        self.begin();
        let mut present = Vec::new();
        let mut outdated = Vec::new();
        for (name, got) in self.installed_crds().await {
            match got {
                Err(e) => {
                    report.fail(
                        CRDS,
                        format!("can read CustomResourceDefinition {name}"),
                        e,
                        "helm install reads the CRDs it installs: ask a cluster administrator for get on customresourcedefinitions.apiextensions.k8s.io",
                    );
                    return;
                }
                Ok(None) => {}
                Ok(Some(installed)) => {
                    if !schema_matches(&name, &installed) {
                        outdated.push(name.clone());
                    }
                    present.push(name);
                }
            }
        }
        if present.is_empty() {
            report.pass(
                CRDS,
                "meshflow CRDs are not installed yet (helm install installs them)",
            );
        } else {
            report.pass(
                CRDS,
                format!(
                    "meshflow CRDs already installed: {} (helm install keeps existing CRDs as they are)",
                    present.join(", ")
                ),
            );
        }
        if !outdated.is_empty() {
            report.warn(
                CRDS,
                "installed CRDs match this meshflow",
                format!("out of date: {}", outdated.join(", ")),
                format!("Helm does not upgrade CRDs: {INSTALL_CRDS}"),
            );
        }
    }

    /// Every meshflow CRD is installed, Established and serves v1alpha1; a schema other than
    /// the one this binary generates is a warning.
    async fn crds(&self, report: &mut Report) {
        self.begin();
        let hint = format!(
            "install the CRDs: {INSTALL_CRDS} (Helm installs the chart's CRDs on the first helm install only; helm upgrade leaves them alone)"
        );
        let mut outdated = Vec::new();
        for (name, got) in self.installed_crds().await {
            let description = format!("CustomResourceDefinition {name} is installed");
            let installed = match got {
                Err(e) => {
                    report.fail(CRDS, description, format!("cannot read it: {e}"), "");
                    continue;
                }
                Ok(None) => {
                    report.fail(
                        CRDS,
                        description,
                        format!("{name} is missing: the API server does not serve it"),
                        hint.clone(),
                    );
                    continue;
                }
                Ok(Some(installed)) => installed,
            };
            let established = installed
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Established"))
                .map(|c| (c.status == "True", c.message.clone().unwrap_or_default()));
            let serves = installed
                .spec
                .versions
                .iter()
                .any(|v| v.name == "v1alpha1" && v.served);
            match established {
                Some((true, _)) if serves => {
                    report.pass(
                        CRDS,
                        format!("{description}, established and serving v1alpha1"),
                    );
                    if !schema_matches(&name, &installed) {
                        outdated.push(name);
                    }
                }
                Some((true, _)) => {
                    report.fail(
                        CRDS,
                        description,
                        format!("{name} does not serve v1alpha1"),
                        hint.clone(),
                    );
                }
                Some((false, message)) if !message.is_empty() => {
                    report.fail(
                        CRDS,
                        description,
                        format!("{name} is not Established: {message}"),
                        hint.clone(),
                    );
                }
                _ => report.fail(
                    CRDS,
                    description,
                    format!("{name} is not Established yet"),
                    "wait a moment and run meshflow check again",
                ),
            }
        }
        let description = format!(
            "installed CRD schemas match this meshflow ({})",
            inject::VERSION
        );
        if outdated.is_empty() {
            report.pass(CRDS, description);
        } else {
            report.warn(
                CRDS,
                description,
                format!("out of date: {}", outdated.join(", ")),
                format!("the CRDs come from another meshflow version; update them: {INSTALL_CRDS}"),
            );
        }
    }

    /// The namespace, the leader Lease and each replica's `/ready`.
    async fn control_plane(&self, report: &mut Report) -> Replicas {
        self.begin();
        let ns = self.ns().to_string();
        let install_hint = format!(
            "install meshflow (helm install meshflow charts/meshflow -n {ns} --create-namespace), or name the control plane's namespace with --namespace"
        );
        let namespace_exists = match self
            .api(Api::<Namespace>::all(self.client.clone()).get_opt(&ns))
            .await
        {
            Ok(Some(_)) => {
                report.pass(
                    CONTROL_PLANE,
                    format!("control-plane namespace {ns} exists"),
                );
                true
            }
            Ok(None) => {
                report.fail(
                    CONTROL_PLANE,
                    format!("control-plane namespace {ns} exists"),
                    format!("namespace {ns} does not exist"),
                    install_hint.clone(),
                );
                false
            }
            Err(e) => {
                report.fail(
                    CONTROL_PLANE,
                    format!("control-plane namespace {ns} exists"),
                    e,
                    "",
                );
                false
            }
        };
        let lease_description = format!("the leader Lease {ns}/{LEASE_NAME} is held and renewed");
        self.begin();
        if namespace_exists {
            match self
                .api(Api::<Lease>::namespaced(self.client.clone(), &ns).get_opt(LEASE_NAME))
                .await
            {
                Ok(None) => report.fail(
                    CONTROL_PLANE,
                    lease_description,
                    format!("there is no Lease {LEASE_NAME} in {ns}: no control plane has run in this namespace"),
                    format!("start the control plane (kubectl -n {ns} get deployments,pods), or name its namespace with --namespace"),
                ),
                Ok(Some(lease)) => {
                    let spec = lease.spec.unwrap_or_default();
                    let now = k8s_openapi::jiff::Timestamp::now().as_second();
                    match judge_lease(
                        spec.holder_identity.as_deref(),
                        spec.lease_duration_seconds,
                        spec.renew_time.map(|t| t.0.as_second()),
                        now,
                    ) {
                        Ok(text) => report.pass(CONTROL_PLANE, format!("{lease_description} ({text})")),
                        Err(e) => report.fail(
                            CONTROL_PLANE,
                            lease_description,
                            e,
                            format!("look at the control plane's pods and logs: kubectl -n {ns} get pods -l {CONTROL_PLANE_SELECTOR}; kubectl -n {ns} logs -l {CONTROL_PLANE_SELECTOR}"),
                        ),
                    }
                }
                Err(e) => report.fail(CONTROL_PLANE, lease_description, e, ""),
            }
        } else {
            report.skip(
                CONTROL_PLANE,
                lease_description,
                format!("namespace {ns} does not exist"),
            );
        }

        let mut replicas = Replicas::default();
        if !self.options.admins.is_empty() {
            replicas.all = self
                .options
                .admins
                .iter()
                .cloned()
                .map(Replica::Url)
                .collect();
        } else if namespace_exists {
            self.begin();
            let description = format!("control-plane pods exist in {ns}");
            let pods = Api::<Pod>::namespaced(self.client.clone(), &ns);
            match self
                .api(pods.list(&ListParams::default().labels(CONTROL_PLANE_SELECTOR)))
                .await
            {
                Err(e) => report.fail(CONTROL_PLANE, description, e, ""),
                Ok(list) if list.items.is_empty() => report.fail(
                    CONTROL_PLANE,
                    description,
                    format!("no pod labelled {CONTROL_PLANE_SELECTOR} in {ns}"),
                    install_hint.clone(),
                ),
                Ok(list) => {
                    report.pass(
                        CONTROL_PLANE,
                        format!("{description} ({})", list.items.len()),
                    );
                    for pod in list.items {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        let phase = pod
                            .status
                            .as_ref()
                            .and_then(|s| s.phase.clone())
                            .unwrap_or_default();
                        if phase != "Running" {
                            report.fail(
                                CONTROL_PLANE,
                                format!("control plane pod {ns}/{name} is ready"),
                                format!(
                                    "pod {ns}/{name} is {}",
                                    if phase.is_empty() {
                                        "not running"
                                    } else {
                                        &phase
                                    }
                                ),
                                format!("kubectl -n {ns} describe pod {name}"),
                            );
                            continue;
                        }
                        let port = pod
                            .spec
                            .iter()
                            .flat_map(|s| s.containers.iter())
                            .flat_map(|c| c.ports.iter().flatten())
                            .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
                            .and_then(|p| u16::try_from(p.container_port).ok())
                            .unwrap_or(DEFAULT_ADMIN_PORT);
                        replicas.all.push(Replica::Pod {
                            namespace: ns.clone(),
                            name,
                            port,
                        });
                    }
                }
            }
        } else {
            report.skip(
                CONTROL_PLANE,
                "control-plane pods exist",
                format!("namespace {ns} does not exist (give --control-plane-admin for a control plane outside the cluster)"),
            );
        }
        for replica in &replicas.all {
            let description = match replica {
                Replica::Url(url) => format!("control plane {url} is ready"),
                Replica::Pod {
                    namespace, name, ..
                } => format!("control plane pod {namespace}/{name} is ready"),
            };
            let logs = match replica {
                Replica::Url(_) => "its log".to_string(),
                Replica::Pod {
                    namespace, name, ..
                } => format!("kubectl -n {namespace} logs {name}"),
            };
            match replica.get(&self.http, &self.client, "/ready", self.options.timeout).await {
                Ok((200, _)) => {
                    report.pass(CONTROL_PLANE, description);
                    replicas.ready.push(replica.clone());
                }
                Ok((status, body)) => report.fail(
                    CONTROL_PLANE,
                    description,
                    format!("{} answered {status}: {}", replica.location("/ready"), body.trim()),
                    format!("it serves config only after reading the whole cluster: look for API errors or RBAC refusals in {logs}"),
                ),
                Err(e) => report.fail(
                    CONTROL_PLANE,
                    description,
                    format!("the control plane is down or unreachable: {e}"),
                    match replica {
                        Replica::Url(_) => "start the control plane, or give the address its --admin listens on (--control-plane-admin)".to_string(),
                        Replica::Pod { namespace, .. } => format!("kubectl -n {namespace} get pods -l {CONTROL_PLANE_SELECTOR}; {logs}"),
                    },
                ),
            }
        }
        replicas
    }

    /// The control plane's own settings from the first ready replica's `/config_dump`.
    async fn settings(&self, ready: &[Replica]) -> Settings {
        for replica in ready {
            let Ok((200, body)) = replica
                .get(
                    &self.http,
                    &self.client,
                    "/config_dump",
                    self.options.timeout,
                )
                .await
            else {
                continue;
            };
            let Ok(dump) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            let settings = &dump["settings"];
            let text =
                |v: &serde_json::Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
            return Settings {
                discovery_selector: text(&settings["discovery_selector"]),
                ca_secret: text(&settings["ca_secret"]),
                webhook_config: text(&settings["injector"]["injector_webhook_config"])
                    .or_else(|| text(&settings["injector_webhook_config"])),
                known: true,
            };
        }
        Settings::default()
    }

    /// The injection webhook(s) of this control plane: caBundle, the served certificate, a
    /// dry run through the API server. Returns whether there is one.
    async fn injector(&self, report: &mut Report, settings: &Settings) -> bool {
        self.begin();
        let ns = self.ns();
        let description = format!("the injection webhook for {ns} is registered");
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let list = match self.api(api.list(&ListParams::default())).await {
            Ok(list) => list.items,
            Err(e) => {
                report.fail(
                    INJECTOR,
                    description,
                    format!("cannot list MutatingWebhookConfigurations: {e}"),
                    "",
                );
                return false;
            }
        };
        let ours: Vec<MutatingWebhookConfiguration> = list
            .into_iter()
            .filter(|c| belongs_to(c, ns, settings.webhook_config.as_deref()))
            .collect();
        if ours.is_empty() {
            report.warn(
                INJECTOR,
                description,
                format!("no MutatingWebhookConfiguration has a webhook {WEBHOOK_NAME} for the control plane in {ns}: pods are not injected"),
                format!("enable the injector: helm upgrade meshflow charts/meshflow -n {ns} --reuse-values --set injector.enabled=true"),
            );
            return false;
        }
        let names: Vec<String> = ours
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        report.pass(INJECTOR, format!("{description} ({})", names.join(", ")));
        for configuration in &ours {
            let config_name = configuration.metadata.name.clone().unwrap_or_default();
            for webhook in configuration
                .webhooks
                .iter()
                .flatten()
                .filter(|w| w.name == WEBHOOK_NAME)
            {
                self.one_webhook(report, &config_name, webhook).await;
            }
        }
        true
    }

    async fn one_webhook(&self, report: &mut Report, config: &str, webhook: &MutatingWebhook) {
        let bundle = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let bundle_description = format!("{config} has a caBundle");
        if bundle.is_empty() {
            report.fail(
                INJECTOR,
                bundle_description,
                format!("webhook {} of {config} has no caBundle: the API server cannot call it", webhook.name),
                format!("the control plane writes it when run with --injector-webhook-config {config} (the chart does); check that it runs and look for \"injector caBundle\" in its log"),
            );
        } else {
            report.pass(INJECTOR, bundle_description);
        }
        match &webhook.client_config.url {
            Some(url) => {
                let description =
                    format!("{config}: the webhook at {url} serves a valid certificate");
                if bundle.is_empty() {
                    report.skip(INJECTOR, description, "no caBundle to verify it with");
                } else {
                    let (outcome, message, hint) =
                        self.webhook_certificate(config, url, &bundle).await;
                    match outcome {
                        Outcome::Success => {
                            report.pass(INJECTOR, format!("{description} ({message})"))
                        }
                        Outcome::Warning => report.warn(INJECTOR, description, message, hint),
                        _ => report.fail(INJECTOR, description, message, hint),
                    }
                }
            }
            None => report.skip(
                INJECTOR,
                format!("{config}: the webhook serves a valid certificate (direct TLS)"),
                "the webhook is a Service, unreachable from here; the dry run below goes through the API server",
            ),
        }
        self.dry_run(report, config, webhook).await;
    }

    /// Connects to the webhook at `url` as the API server would and judges the certificate
    /// it serves against `bundle` (its caBundle): (outcome, what to say, hint).
    async fn webhook_certificate(
        &self,
        config: &str,
        url: &str,
        bundle: &[u8],
    ) -> (Outcome, String, String) {
        let (host, port) = match certs::https_host_port(url) {
            Ok(found) => found,
            Err(e) => return (Outcome::Error, e, String::new()),
        };
        let chain = match certs::presented_chain(&host, port, self.options.timeout).await {
            Ok(chain) => chain,
            Err(e) => {
                return (
                    Outcome::Error,
                    format!("the webhook {url} is unreachable: {e}"),
                    "is the control plane running with --injector-listen on that address?".into(),
                )
            }
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let (outcome, text) = certs::judge_webhook_chain(&chain, bundle, &host, now);
        if outcome == Outcome::Success {
            return (outcome, text, String::new());
        }
        let hint = if outcome == Outcome::Warning || text.contains("expired") {
            EXPIRY_HINT.to_string()
        } else {
            format!(
                "the caBundle of {config} must hold the CA that issued the webhook's certificate, and the certificate must name the host the API server dials"
            )
        };
        (outcome, format!("{url}: {text}"), hint)
    }

    /// A server-side dry run of a pod in a namespace the webhook's namespaceSelector selects:
    /// the API server itself calls the webhook, with its caBundle.
    async fn dry_run(&self, report: &mut Report, config: &str, webhook: &MutatingWebhook) {
        self.begin();
        let selector = webhook
            .namespace_selector
            .as_ref()
            .map(selector_string)
            .unwrap_or_default();
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let found = match self
            .api(namespaces.list(&ListParams::default().labels(&selector)))
            .await
        {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .filter_map(|n| n.metadata.name)
                .min(),
            Err(e) => {
                report.fail(
                    INJECTOR,
                    format!("{config}: the API server calls the webhook"),
                    format!("cannot list namespaces: {e}"),
                    "",
                );
                return;
            }
        };
        let Some(target) = found else {
            report.skip(
                INJECTOR,
                format!("{config}: the API server calls the webhook"),
                format!("no namespace matches its namespaceSelector ({selector}) to try a pod in; label one: kubectl label namespace <name> {}={}", inject::INJECT, inject::ENABLED),
            );
            return;
        };
        let description =
            format!("{config}: the API server calls the webhook (dry-run pod in {target})");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "generateName": "meshflow-check-", "namespace": target },
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{ "name": "check", "image": "meshflow.invalid/check:dry-run" }],
            },
        }))
        .expect("a well-formed pod");
        let params = PostParams {
            dry_run: true,
            field_manager: None,
        };
        match self
            .api(Api::<Pod>::namespaced(self.client.clone(), &target).create(&params, &pod))
            .await
        {
            Ok(created) => {
                let injected = created
                    .spec
                    .iter()
                    .flat_map(|s| {
                        s.containers
                            .iter()
                            .chain(s.init_containers.iter().flatten())
                    })
                    .any(|c| c.name == inject::PROXY_CONTAINER);
                if injected {
                    report.pass(INJECTOR, description);
                } else {
                    report.fail(
                        INJECTOR,
                        description,
                        format!("the API server admitted the pod without {}: the webhook was not called, or failed and its failurePolicy is Ignore", inject::PROXY_CONTAINER),
                        "look for errors calling the webhook in the API server's log and the control plane's, and at meshflow_injector_requests_total",
                    );
                }
            }
            Err(e) if forbidden(&e) => report.warn(
                INJECTOR,
                description,
                format!(
                    "you may not create pods in {target}, so the dry run could not be tried: {e}"
                ),
                "run meshflow check with rights to create pods there",
            ),
            Err(e) => {
                let message = if e.contains("expired") {
                    format!("the webhook's certificate has expired — the API server refused to call it: {e}")
                } else if e.contains("x509") {
                    format!("the API server does not trust the webhook's certificate: {e}")
                } else {
                    format!("the API server could not call the webhook: {e}")
                };
                report.fail(
                    INJECTOR,
                    description,
                    message,
                    "an x509 error: the certificate or the caBundle; refused or timed out: the control plane or its Service (kubectl get endpoints)",
                );
            }
        }
    }

    /// The mesh CA in its Secret, and the trust bundle ConfigMaps against it.
    async fn identity(&self, report: &mut Report, settings: &Settings, injector: bool) {
        self.begin();
        let ns = self.ns();
        let secret_name = settings
            .ca_secret
            .clone()
            .unwrap_or_else(|| DEFAULT_CA_SECRET.to_string());
        let description = format!("the mesh CA in Secret {ns}/{secret_name} is valid");
        let bundle_description = "the trust bundle ConfigMaps match the mesh CA";
        let secret = match self
            .api(Api::<Secret>::namespaced(self.client.clone(), ns).get_opt(&secret_name))
            .await
        {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                report.fail(
                    IDENTITY,
                    description,
                    format!("Secret {ns}/{secret_name} does not exist"),
                    "the control plane creates it on its first start (or give your CA: the chart's ca.existingSecret)",
                );
                report.skip(IDENTITY, bundle_description, "no mesh CA to compare with");
                return;
            }
            Err(e) => {
                report.fail(
                    IDENTITY,
                    description,
                    e,
                    format!("needs get on secrets in {ns}"),
                );
                report.skip(IDENTITY, bundle_description, "no mesh CA to compare with");
                return;
            }
        };
        let data = secret.data.unwrap_or_default();
        let get = |key: &str| data.get(key).map(|b| b.0.clone());
        let (cert, bundle) = match (get("tls.crt"), get("tls.key"), get("ca.crt"), get("ca.key")) {
            (Some(cert), Some(_), roots, _) => (cert, roots),
            (_, _, Some(cert), Some(_)) => (cert, get("ca-bundle.crt")),
            _ => {
                report.fail(
                    IDENTITY,
                    description,
                    format!("Secret {ns}/{secret_name} holds neither ca.crt and ca.key nor tls.crt and tls.key"),
                    "put the CA in meshflow's layout (ca.crt, ca.key, optional ca-bundle.crt) or cert-manager's (tls.crt, tls.key, ca.crt)",
                );
                report.skip(IDENTITY, bundle_description, "no mesh CA to compare with");
                return;
            }
        };
        let info = certs::pem_certs(&cert).and_then(|certs| certs::cert_info(&certs[0]));
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                report.fail(IDENTITY, description, format!("its certificate: {e}"), "");
                report.skip(IDENTITY, bundle_description, "no mesh CA to compare with");
                return;
            }
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let (outcome, text) = certs::judge_ca(&info, now);
        let rotate = "rotate the CA: put a new root or intermediate into the Secret (or the chart's ca.existingSecret) and restart the control plane; sidecars pick up certificates from it when they renew";
        match outcome {
            Outcome::Success => report.pass(IDENTITY, format!("{description} ({text})")),
            Outcome::Warning => report.warn(IDENTITY, description, text, rotate),
            _ => report.fail(IDENTITY, description, text, rotate),
        }
        if !injector {
            report.skip(IDENTITY, bundle_description, "no injection webhook: the control plane publishes trust bundles only with the injector");
            return;
        }
        let expected: BTreeSet<Vec<u8>> = match certs::pem_certs(bundle.as_deref().unwrap_or(&cert))
        {
            Ok(certs) => certs.into_iter().map(|c| c.to_vec()).collect(),
            Err(e) => {
                report.fail(
                    IDENTITY,
                    bundle_description,
                    format!("the CA's trust bundle: {e}"),
                    "",
                );
                return;
            }
        };
        self.begin();
        let mut selector = format!("{}={}", inject::INJECT, inject::ENABLED);
        if let Some(extra) = &settings.discovery_selector {
            selector.push(',');
            selector.push_str(extra);
        }
        let namespaces = match self
            .api(
                Api::<Namespace>::all(self.client.clone())
                    .list(&ListParams::default().labels(&selector)),
            )
            .await
        {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .filter_map(|n| n.metadata.name)
                .collect::<Vec<_>>(),
            Err(e) => {
                report.fail(
                    IDENTITY,
                    bundle_description,
                    format!("cannot list namespaces: {e}"),
                    "",
                );
                return;
            }
        };
        let mut wrong = Vec::new();
        for namespace in &namespaces {
            let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
            match self.api(api.get_opt(inject::TRUST_BUNDLE_CONFIGMAP)).await {
                Ok(None) => wrong.push(format!(
                    "{namespace}: no ConfigMap {} (injected pods there wait in ContainerCreating)",
                    inject::TRUST_BUNDLE_CONFIGMAP
                )),
                Ok(Some(map)) => {
                    let held = map
                        .data
                        .unwrap_or_default()
                        .get(inject::TRUST_BUNDLE_KEY)
                        .cloned()
                        .unwrap_or_default();
                    let held: BTreeSet<Vec<u8>> = certs::pem_certs(held.as_bytes())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| c.to_vec())
                        .collect();
                    if held != expected {
                        wrong.push(format!("{namespace}: {} holds other certificates than the mesh CA's trust bundle", inject::TRUST_BUNDLE_CONFIGMAP));
                    }
                }
                Err(e) => wrong.push(format!("{namespace}: {e}")),
            }
        }
        let scope = if settings.known {
            ""
        } else {
            " (the control plane did not answer: every injection-enabled namespace was checked)"
        };
        if wrong.is_empty() {
            report.pass(
                IDENTITY,
                format!(
                    "{bundle_description} ({} injection-enabled namespace{}){scope}",
                    namespaces.len(),
                    if namespaces.len() == 1 { "" } else { "s" }
                ),
            );
        } else {
            report.fail(
                IDENTITY,
                bundle_description,
                format!("{}{scope}", wrong.join("\n")),
                "the control plane (with the injector) publishes it into every namespace labelled meshflow.io/inject=enabled within its discovery selector, at once and every 5 minutes: check that it runs and its log; pods that started with an old bundle need a restart",
            );
        }
    }

    /// Every sidecar connected to a ready replica runs that replica's current version (waiting
    /// up to `--wait` for acknowledgements in flight); running pods with the proxy that no
    /// replica lists are named.
    async fn data_plane(&self, report: &mut Report, replicas: &Replicas, settings: &Settings) {
        let connected_description =
            "every running pod with the sidecar is connected to the control plane";
        if replicas.ready.is_empty() {
            report.skip(
                DATA_PLANE,
                "sidecars run the current config",
                "no control plane replica is ready",
            );
            report.skip(
                DATA_PLANE,
                connected_description,
                "no control plane replica is ready",
            );
            return;
        }
        let mut connected: BTreeSet<String> = BTreeSet::new();
        let mut complete = replicas.ready.len() == replicas.all.len();
        for replica in &replicas.ready {
            let label = replica.label();
            let description = format!("sidecars connected to {label} run its current config");
            let deadline = Instant::now() + self.options.wait;
            let outcome = loop {
                let answer = match replica
                    .get(&self.http, &self.client, "/proxies", self.options.timeout)
                    .await
                {
                    Ok((200, body)) => serde_json::from_str::<ProxiesAnswer>(&body).map_err(|e| {
                        format!("{}: unreadable answer: {e}", replica.location("/proxies"))
                    }),
                    Ok((status, body)) => Err(format!(
                        "{} answered {status}: {}",
                        replica.location("/proxies"),
                        body.trim()
                    )),
                    Err(e) => Err(e),
                };
                let answer = match answer {
                    Ok(answer) => answer,
                    Err(e) => break Err(e),
                };
                let late: Vec<String> = answer
                    .proxies
                    .iter()
                    .filter_map(|p| behind(p, answer.version))
                    .collect();
                // Only acknowledgements still to come are worth waiting for.
                let waiting = answer
                    .proxies
                    .iter()
                    .any(|p| replicas::awaiting_ack(p, answer.version));
                if !waiting || Instant::now() >= deadline {
                    break Ok((answer, late));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            match outcome {
                Err(e) => {
                    complete = false;
                    report.fail(
                        DATA_PLANE,
                        description,
                        e,
                        "is the control plane new enough to serve /proxies (this meshflow's)?",
                    );
                }
                Ok((answer, late)) => {
                    connected.extend(answer.proxies.iter().map(|p| p.workload.clone()));
                    if late.is_empty() {
                        let count = answer.proxies.len();
                        report.pass(
                            DATA_PLANE,
                            format!(
                                "{count} sidecar{} connected to {label} run{} its config version {}",
                                if count == 1 { "" } else { "s" },
                                if count == 1 { "s" } else { "" },
                                answer.version
                            ),
                        );
                    } else {
                        report.fail(
                            DATA_PLANE,
                            format!("{description} (version {})", answer.version),
                            format!("{} of {} not on version {} after {:?}:\n{}", late.len(), answer.proxies.len(), answer.version, self.options.wait, late.join("\n")),
                            "a sidecar that rejected a version keeps its previous config: fix the object its reason names; one that does not answer: see its log and /config_dump on its admin port (or give it longer with --wait)",
                        );
                    }
                }
            }
        }
        if !complete {
            report.skip(DATA_PLANE, connected_description, "not every control plane replica answered, so a pod connected to another one would look disconnected");
            return;
        }
        let pods = match self.meshed_pods(settings).await {
            Ok(pods) => pods,
            Err(e) => {
                report.fail(
                    DATA_PLANE,
                    connected_description,
                    format!("cannot list pods: {e}"),
                    "",
                );
                return;
            }
        };
        let missing: Vec<&String> = pods.iter().filter(|p| !connected.contains(*p)).collect();
        if missing.is_empty() {
            report.pass(
                DATA_PLANE,
                format!("{connected_description} ({})", pods.len()),
            );
        } else {
            report.warn(
                DATA_PLANE,
                connected_description,
                format!(
                    "running with {} but not connected to any replica: {}",
                    inject::PROXY_CONTAINER,
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
                format!("their proxy cannot reach the control plane or get its certificate: kubectl logs <pod> -c {}", inject::PROXY_CONTAINER),
            );
        }
    }

    /// `<ns>/<pod>` of every running pod with the proxy container, in the namespaces the
    /// control plane's discovery selector selects (every namespace without one).
    async fn meshed_pods(&self, settings: &Settings) -> Result<Vec<String>, String> {
        self.begin();
        let mut pods = Vec::new();
        match &settings.discovery_selector {
            Some(selector) => {
                let namespaces = self
                    .api(
                        Api::<Namespace>::all(self.client.clone())
                            .list(&ListParams::default().labels(selector)),
                    )
                    .await?;
                for namespace in namespaces.items.into_iter().filter_map(|n| n.metadata.name) {
                    pods.extend(
                        self.api(
                            Api::<Pod>::namespaced(self.client.clone(), &namespace)
                                .list(&ListParams::default()),
                        )
                        .await?
                        .items,
                    );
                }
            }
            None => {
                pods = self
                    .api(Api::<Pod>::all(self.client.clone()).list(&ListParams::default()))
                    .await?
                    .items
            }
        }
        let mut meshed: Vec<String> = pods
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| {
                p.spec.iter().any(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                        .any(|c| c.name == inject::PROXY_CONTAINER)
                })
            })
            .filter_map(|p| Some(format!("{}/{}", p.metadata.namespace?, p.metadata.name?)))
            .collect();
        meshed.sort();
        Ok(meshed)
    }
}

/// Whether a MutatingWebhookConfiguration is the injector of the control plane in `namespace`:
/// it has a webhook named [`WEBHOOK_NAME`] and is the one the control plane names
/// (`--injector-webhook-config`), or a webhook's Service is in `namespace`, or its name is the
/// chart's `<fullname>-injector-<namespace>`.
fn belongs_to(
    configuration: &MutatingWebhookConfiguration,
    namespace: &str,
    named: Option<&str>,
) -> bool {
    let webhooks: Vec<&MutatingWebhook> = configuration.webhooks.iter().flatten().collect();
    if !webhooks.iter().any(|w| w.name == WEBHOOK_NAME) {
        return false;
    }
    let name = configuration.metadata.name.as_deref().unwrap_or_default();
    named == Some(name)
        || name.ends_with(&format!("-injector-{namespace}"))
        || webhooks.iter().any(|w| {
            w.client_config
                .service
                .as_ref()
                .is_some_and(|s| s.namespace == namespace)
        })
}

/// Whether the installed CRD's v1alpha1 schema equals the one this binary generates.
fn schema_matches(name: &str, installed: &CustomResourceDefinition) -> bool {
    let schema = |crd: &CustomResourceDefinition| {
        crd.spec
            .versions
            .iter()
            .find(|v| v.name == "v1alpha1")
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
    };
    let expected: BTreeMap<String, Option<serde_json::Value>> = meshflow_policies::crd::crds()
        .iter()
        .map(|c| (c.metadata.name.clone().unwrap_or_default(), schema(c)))
        .collect();
    match (expected.get(name).cloned().flatten(), schema(installed)) {
        (Some(expected), Some(installed)) => same_schema(&installed, &expected),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_below_1_20_fail_and_native_sidecars_are_noted() {
        let (outcome, text) = judge_version("1", "20", "v1.20.2");
        assert_eq!(outcome, Outcome::Success);
        assert!(
            text.contains("v1.20.2") && text.contains("native sidecars need 1.29"),
            "{text}"
        );
        let (outcome, text) = judge_version("1", "29+", "v1.29.3-gke.1");
        assert_eq!(outcome, Outcome::Success);
        assert!(text.contains("native sidecars available"), "{text}");
        let (outcome, text) = judge_version("1", "19", "");
        assert_eq!(outcome, Outcome::Error);
        assert!(
            text.contains("1.19") && text.contains("1.20 or later"),
            "{text}"
        );
        assert_eq!(judge_version("", "x", "").0, Outcome::Warning);
    }

    #[test]
    fn a_lease_must_have_a_holder_that_renewed_within_its_duration() {
        assert!(judge_lease(Some("cp-0"), Some(15), Some(100), 105)
            .unwrap()
            .contains("held by cp-0"));
        let stale = judge_lease(Some("cp-0"), Some(15), Some(100), 140).unwrap_err();
        assert!(
            stale.contains("40 s ago") && stale.contains("15 s"),
            "{stale}"
        );
        assert!(judge_lease(None, Some(15), Some(100), 101)
            .unwrap_err()
            .contains("no holder"));
        assert!(judge_lease(Some(""), Some(15), Some(100), 101).is_err());
        assert!(judge_lease(Some("cp-0"), Some(15), None, 101).is_err());
        // A renewal stamped slightly ahead of this machine's clock is fine.
        assert!(judge_lease(Some("cp-0"), Some(15), Some(110), 100).is_ok());
    }

    #[test]
    fn label_selectors_become_query_strings() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": { "meshflow.io/inject": "enabled" },
            "matchExpressions": [
                { "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["meshflow-system", "kube-system"] },
                { "key": "tier", "operator": "In", "values": ["a"] },
                { "key": "x", "operator": "Exists" },
                { "key": "y", "operator": "DoesNotExist" },
            ],
        }))
        .unwrap();
        assert_eq!(
            selector_string(&selector),
            "meshflow.io/inject=enabled,kubernetes.io/metadata.name notin (meshflow-system,kube-system),tier in (a),x,!y"
        );
    }

    #[test]
    fn schemas_compare_numbers_as_numbers() {
        assert!(same_schema(
            &json!({"minimum": 0, "a": [1]}),
            &json!({"minimum": 0.0, "a": [1.0]})
        ));
        assert!(same_schema(&json!({"a": 1}), &json!({"a": 1, "b": null})));
        assert!(!same_schema(&json!({"a": 1}), &json!({"a": 2})));
    }

    #[test]
    fn the_generated_crds_match_themselves() {
        for crd in meshflow_policies::crd::crds() {
            let name = crd.metadata.name.clone().unwrap();
            assert!(schema_matches(&name, &crd), "{name}");
            // Another kind's schema does not.
            let other = meshflow_policies::crd::crds()
                .into_iter()
                .find(|c| c.metadata.name.as_deref() != Some(&name))
                .unwrap();
            assert!(!schema_matches(&name, &other), "{name}");
        }
    }

    #[test]
    fn webhook_configurations_are_recognised_by_name_service_or_the_control_planes_flag() {
        let config = |name: &str,
                      webhook: &str,
                      client: serde_json::Value|
         -> MutatingWebhookConfiguration {
            serde_json::from_value(json!({
                "metadata": { "name": name },
                "webhooks": [{ "name": webhook, "clientConfig": client, "sideEffects": "None", "admissionReviewVersions": ["v1"] }],
            }))
            .unwrap()
        };
        let url = json!({ "url": "https://127.0.0.1:1/inject" });
        let service = json!({ "service": { "name": "meshflow-control-plane", "namespace": "mesh", "path": "/inject" } });
        assert!(belongs_to(
            &config("meshflow-injector-mesh", WEBHOOK_NAME, url.clone()),
            "mesh",
            None
        ));
        assert!(!belongs_to(
            &config("meshflow-injector-other", WEBHOOK_NAME, url.clone()),
            "mesh",
            None
        ));
        assert!(belongs_to(
            &config("custom", WEBHOOK_NAME, url.clone()),
            "mesh",
            Some("custom")
        ));
        assert!(belongs_to(
            &config("x", WEBHOOK_NAME, service.clone()),
            "mesh",
            None
        ));
        assert!(!belongs_to(
            &config("meshflow-injector-mesh", "other.example.com", url),
            "mesh",
            None
        ));
        assert!(!belongs_to(
            &config("x", WEBHOOK_NAME, service),
            "elsewhere",
            None
        ));
    }
}
