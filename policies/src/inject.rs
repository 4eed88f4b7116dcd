//! Sidecar injection (issue 14): the one pure mutation behind the control plane's admission
//! webhook (`POST /inject`) and `meshflow inject -f` — a Pod (and its namespace's labels) in,
//! the injected Pod and the RFC 6902 JSON Patch that makes it out.
//!
//! A pod in a namespace labelled `meshflow.io/inject: enabled` gets, unless it is labelled or
//! annotated `meshflow.io/inject: disabled` (or uses the host network):
//! - the proxy (`meshflow-proxy`): a native sidecar (an init container with
//!   `restartPolicy: Always` and a startup probe on its admin `/ready`) when the caller says
//!   the cluster supports it, otherwise the *first* container with a `postStart` hook
//!   (`meshflow-proxy wait-ready`) that returns only once the proxy is ready, so the kubelet
//!   starts the app containers after it;
//! - an init container (`meshflow-init`) running `meshflow-proxy init` with the capture
//!   settings (the only container that runs as root, with `NET_ADMIN` and `NET_RAW`);
//! - a projected ServiceAccount token (audience `meshflow`, one hour) and the trust bundle
//!   ConfigMap `meshflow-trust-bundle` mounted into the proxy, and downward-API env from which
//!   the proxy builds its bootstrap (no file to write per pod);
//! - the app containers' HTTP, gRPC and TCP probes pointed at the proxy's admin port
//!   (`/app-health/<container>/<livez|readyz|startupz>`), the originals kept in the
//!   annotation `meshflow.io/app-probes` (format in [`APP_PROBES`]);
//! - the annotations `meshflow.io/injected: <version>` and `meshflow.io/inbound-port`.
//!
//! Injection converges: what is already there is left alone, so injecting an injected pod
//! gives an empty patch, and a reinvocation after another webhook added a container only
//! rewrites that container's probes.

mod pod;
mod probes;
mod settings;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{json, Value};

pub use json_patch;
pub use settings::{is_cidr, is_quantity, parse_server_version, InjectSettings, NativeSidecar};

use pod::{annotation_field, init_container, proxy_container, wanted_volumes, PodOptions};

/// Namespace label (`enabled` turns injection on for the namespace's pods); pod label or
/// annotation (`disabled` opts a pod out; the webhook's `objectSelector` already skips pods
/// with the label).
pub const INJECT: &str = "meshflow.io/inject";
/// The value of [`INJECT`] that turns injection on.
pub const ENABLED: &str = "enabled";
/// The value of [`INJECT`] that opts a pod out.
pub const DISABLED: &str = "disabled";
/// Status annotation on an injected pod: the injector's version.
pub const INJECTED: &str = "meshflow.io/injected";
/// The port the pod's proxy accepts inbound mTLS on; the control plane's Kubernetes model
/// reads it to build endpoints.
pub const INBOUND_PORT: &str = "meshflow.io/inbound-port";
/// The app containers' original probes, as JSON: an object from the rewritten probe's path to
/// the original handler, with named ports resolved to numbers and the original timeout:
///
/// ```json
/// {"/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
///                            "timeoutSeconds": 1},
///  "/app-health/web/readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
///  "/app-health/api/startupz": {"grpc": {"port": 9090, "service": "api"}, "timeoutSeconds": 2}}
/// ```
///
/// `httpGet` keeps every field the pod gave (`host`, `httpHeaders`), with `scheme` (default
/// `HTTP`) and `path` (default `/`) always present; `timeoutSeconds` defaults to 1. The proxy
/// sees it as the env var `MESHFLOW_APP_PROBES` (downward API).
pub const APP_PROBES: &str = "meshflow.io/app-probes";
/// Pod annotation: the app port the proxy forwards inbound requests to (default: the first
/// TCP port an app container declares).
pub const APP_PORT: &str = "meshflow.io/app-port";
/// Pod annotation: the app's protocol, `http1`, `h2c` or `grpc` (default: from that port's
/// name, as Istio reads it: `grpc…` → grpc, `http2…`/`h2c…` → h2c, else http1).
pub const APP_PROTOCOL: &str = "meshflow.io/app-protocol";
/// Pod annotation: the proxy's CPU request (a Kubernetes quantity), instead of the setting.
pub const PROXY_CPU_REQUEST: &str = "meshflow.io/proxy-cpu-request";
/// Pod annotation: the proxy's CPU limit.
pub const PROXY_CPU_LIMIT: &str = "meshflow.io/proxy-cpu-limit";
/// Pod annotation: the proxy's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "meshflow.io/proxy-memory-request";
/// Pod annotation: the proxy's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "meshflow.io/proxy-memory-limit";
/// Pod annotation: inbound ports never redirected to the proxy (comma-separated), added to
/// the setting's.
pub const EXCLUDE_INBOUND_PORTS: &str = "meshflow.io/exclude-inbound-ports";
/// Pod annotation: outbound destination ports never redirected (comma-separated).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "meshflow.io/exclude-outbound-ports";
/// Pod annotation: outbound destination CIDRs never redirected (comma-separated).
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "meshflow.io/exclude-outbound-cidrs";

/// The proxy container's name.
pub const PROXY_CONTAINER: &str = "meshflow-proxy";
/// The capture init container's name.
pub const INIT_CONTAINER: &str = "meshflow-init";
/// The projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "meshflow-token";
/// The trust bundle volume (from [`TRUST_BUNDLE_CONFIGMAP`]).
pub const TRUST_BUNDLE_VOLUME: &str = "meshflow-trust-bundle";
/// The init container's writable `/run` (iptables' lock file; its root filesystem is
/// read-only).
pub const XTABLES_VOLUME: &str = "meshflow-xtables-lock";
/// The ConfigMap the control plane publishes into every injection-enabled namespace: the
/// mesh's trust bundle under [`TRUST_BUNDLE_KEY`].
pub const TRUST_BUNDLE_CONFIGMAP: &str = "meshflow-trust-bundle";
/// The ConfigMap key holding the PEM roots.
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";
/// The audience of the projected token (what the control plane's TokenReview asks for).
pub const TOKEN_AUDIENCE: &str = "meshflow";
/// Lifetime the kubelet gives the projected token (it rotates it at 80 %).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Where the token is mounted in the proxy (file `token`).
pub const TOKEN_DIR: &str = "/var/run/secrets/meshflow.io/serviceaccount";
/// Where the trust bundle is mounted in the proxy (file [`TRUST_BUNDLE_KEY`]).
pub const TRUST_BUNDLE_DIR: &str = "/var/run/meshflow/trust-bundle";
/// More containers (init and app together) than this and the pod is not injected: the patch
/// and the probe annotation grow with every container, and no real pod has this many.
pub const MAX_CONTAINERS: usize = 250;
/// The injector's version, written into [`INJECTED`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The default proxy image.
pub const DEFAULT_PROXY_IMAGE: &str = concat!("meshflow/proxy:", env!("CARGO_PKG_VERSION"));

/// Why a pod cannot be injected: the field (a path into the pod, or a flag) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InjectError {
    /// `spec.containers[1].livenessProbe.httpGet.port`,
    /// `metadata.annotations["meshflow.io/proxy-cpu-request"]`, …
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> InjectError {
    InjectError {
        field: field.into(),
        message: message.into(),
    }
}

/// What injection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The patch injects the pod (or completes an injection).
    Injected,
    /// The pod is injected already: empty patch.
    AlreadyInjected,
    /// Not injected, and why (opted out, namespace not enabled, host network).
    Skipped(String),
}

/// The result of [`inject`]: the outcome, the patch, and the pod with the patch applied.
#[derive(Debug, Clone)]
pub struct Injection {
    /// What happened.
    pub outcome: Outcome,
    /// RFC 6902 operations on the pod's JSON (empty unless [`Outcome::Injected`]).
    pub patch: Patch,
    /// The pod after the patch.
    pub pod: Pod,
}

/// Injects `pod` (in a namespace labelled `namespace_labels`) with `settings`; `native_sidecar`
/// is [`NativeSidecar::resolve`] for the cluster at hand.
///
/// # Errors
/// When the pod cannot be injected — an unusable annotation, a probe on a port the container
/// does not declare, more than [`MAX_CONTAINERS`] containers — naming the field.
pub fn inject(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    settings: &InjectSettings,
    native_sidecar: bool,
) -> Result<Injection, InjectError> {
    let unchanged = |outcome| Injection {
        outcome,
        patch: Patch::default(),
        pod: pod.clone(),
    };
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| error("spec", "missing: a pod needs a spec"))?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if labels.get(INJECT).map(String::as_str) == Some(DISABLED) {
        return Ok(unchanged(Outcome::Skipped(format!(
            "the pod is labelled {INJECT}: {DISABLED}"
        ))));
    }
    if annotations.get(INJECT).map(String::as_str) == Some(DISABLED) {
        return Ok(unchanged(Outcome::Skipped(format!(
            "the pod is annotated {INJECT}: {DISABLED}"
        ))));
    }
    if namespace_labels.get(INJECT).map(String::as_str) != Some(ENABLED) {
        return Ok(unchanged(Outcome::Skipped(format!(
            "its namespace is not labelled {INJECT}: {ENABLED}"
        ))));
    }
    if spec.host_network == Some(true) {
        return Ok(unchanged(Outcome::Skipped(
            "hostNetwork: capture rules would apply to the node's own traffic".into(),
        )));
    }
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    let containers = &spec.containers;
    let count = init_containers.len() + containers.len();
    if count > MAX_CONTAINERS {
        return Err(error(
            "spec.containers",
            format!(
                "the pod has {count} containers (init and app); the injector handles at most \
                 {MAX_CONTAINERS}"
            ),
        ));
    }
    let options = PodOptions::read(&annotations, containers, settings)?;

    let mut ops = Vec::new();
    // Probes first: their indices are the pod's own, before the proxy is put in front.
    let mut app_probes = match annotations.get(APP_PROBES) {
        Some(text) => {
            serde_json::from_str::<serde_json::Map<String, Value>>(text).map_err(|e| {
                error(
                    annotation_field(APP_PROBES),
                    format!("not a JSON object of probes: {e}"),
                )
            })?
        }
        None => serde_json::Map::new(),
    };
    // App containers, and restartable init containers (the app's own native sidecars; only
    // those may have probes) other than ours.
    let probed = containers
        .iter()
        .enumerate()
        .map(|(index, c)| ("containers", index, c))
        .chain(
            init_containers
                .iter()
                .enumerate()
                .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
                .map(|(index, c)| ("initContainers", index, c)),
        );
    for (list, index, container) in probed {
        if container.name == PROXY_CONTAINER || container.name == INIT_CONTAINER {
            continue;
        }
        for rewritten in probes::rewrite(container, list, index, settings.admin_port)? {
            ops.push(replace(
                ["spec", list, &index.to_string(), rewritten.field],
                serde_json::to_value(&rewritten.probe).expect("a probe serializes"),
            ));
            app_probes.insert(rewritten.path, rewritten.original);
        }
    }

    let has = |list: &[Container], name: &str| list.iter().any(|c| c.name == name);
    let has_proxy = has(containers, PROXY_CONTAINER) || has(init_containers, PROXY_CONTAINER);
    let has_init = has(init_containers, INIT_CONTAINER);

    let mut wanted_annotations: Vec<(&str, String, bool)> = vec![
        // (key, value, replace a different value)
        (INJECTED, VERSION.to_string(), false),
        (INBOUND_PORT, settings.inbound_port.to_string(), !has_proxy),
    ];
    let probes_json = Value::Object(app_probes.clone()).to_string();
    if !app_probes.is_empty() {
        wanted_annotations.push((APP_PROBES, probes_json, true));
    }
    annotation_ops(&pod.metadata.annotations, &wanted_annotations, &mut ops);

    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let missing_volumes: Vec<Value> = wanted_volumes()
        .into_iter()
        .filter(|v| !volumes.iter().any(|have| have.name == v["name"]))
        .collect();
    append_ops(
        ["spec", "volumes"],
        spec.volumes.is_some(),
        missing_volumes,
        &mut ops,
    );

    let proxy = proxy_container(settings, &options, native_sidecar);
    let init = init_container(settings, &options);
    if native_sidecar {
        // [meshflow-init, meshflow-proxy, …the pod's init containers]: capture is in place
        // before anything runs, and the proxy before the app's own init containers.
        match &spec.init_containers {
            None => {
                let mut list = Vec::new();
                if !has_init {
                    list.push(init);
                }
                if !has_proxy {
                    list.push(proxy);
                }
                if !list.is_empty() {
                    ops.push(add(["spec", "initContainers"], Value::Array(list)));
                }
            }
            Some(existing) => {
                let mut init_at = existing.iter().position(|c| c.name == INIT_CONTAINER);
                if init_at.is_none() {
                    ops.push(add(["spec", "initContainers", "0"], init));
                    init_at = Some(0);
                }
                if !has_proxy {
                    let at = init_at.map_or(0, |i| i + 1).to_string();
                    ops.push(add(["spec", "initContainers", &at], proxy));
                }
            }
        }
    } else {
        if !has_proxy {
            ops.push(add(["spec", "containers", "0"], proxy));
        }
        // Last: the pod's own init containers run before capture (no proxy runs yet in
        // classic mode, so captured traffic of theirs would go nowhere).
        if !has_init {
            append_ops(
                ["spec", "initContainers"],
                spec.init_containers.is_some(),
                vec![init],
                &mut ops,
            );
        }
    }

    if ops.is_empty() {
        return Ok(unchanged(Outcome::AlreadyInjected));
    }
    let patch = Patch(ops);
    let mut doc = serde_json::to_value(pod).expect("a pod serializes");
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        error(
            ".",
            format!("internal: the injection patch does not apply: {e}"),
        )
    })?;
    let pod = serde_json::from_value(doc).map_err(|e| {
        error(
            ".",
            format!("internal: the injected pod does not parse: {e}"),
        )
    })?;
    Ok(Injection {
        outcome: Outcome::Injected,
        patch,
        pod,
    })
}

fn pointer<'a>(tokens: impl IntoIterator<Item = &'a str>) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

fn add<'a>(path: impl IntoIterator<Item = &'a str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    })
}

fn replace<'a>(path: impl IntoIterator<Item = &'a str>, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(path),
        value,
    })
}

/// Appends `items` to the array at `path`, creating it when it does not `exist`.
fn append_ops<'a>(
    path: impl IntoIterator<Item = &'a str> + Clone,
    exists: bool,
    items: Vec<Value>,
    ops: &mut Vec<PatchOperation>,
) {
    if items.is_empty() {
        return;
    }
    if exists {
        for item in items {
            ops.push(add(path.clone().into_iter().chain(["-"]), item));
        }
    } else {
        ops.push(add(path, Value::Array(items)));
    }
}

/// Sets annotations: adds missing keys, replaces a different value where `replace` says so.
fn annotation_ops(
    current: &Option<BTreeMap<String, String>>,
    wanted: &[(&str, String, bool)],
    ops: &mut Vec<PatchOperation>,
) {
    let Some(current) = current else {
        let all: serde_json::Map<String, Value> = wanted
            .iter()
            .map(|(k, v, _)| ((*k).to_string(), json!(v)))
            .collect();
        ops.push(add(["metadata", "annotations"], Value::Object(all)));
        return;
    };
    for (key, value, replace_different) in wanted {
        match current.get(*key) {
            None => ops.push(add(["metadata", "annotations", key], json!(value))),
            Some(have) if have != value && *replace_different => {
                ops.push(replace(["metadata", "annotations", key], json!(value)))
            }
            Some(_) => {}
        }
    }
}
