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

mod probes;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use json_patch;

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
/// `httpGet` keeps every field the pod gave (`host`, `httpHeaders`, `scheme`). The proxy
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

/// Where the proxy runs: a native sidecar (Kubernetes ≥ 1.29, `restartPolicy: Always` on an
/// init container) or a classic first container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecar {
    /// Native where the API server is 1.29 or newer.
    #[default]
    Auto,
    /// Always native (the cluster must support it).
    Always,
    /// Never: the classic first container with a `postStart` hook.
    Never,
}

impl NativeSidecar {
    /// Whether to inject a native sidecar into a cluster whose API server is `server`
    /// (`(major, minor)`, `None` when unknown — then classic, which every version runs).
    pub fn resolve(self, server: Option<(u32, u32)>) -> bool {
        match self {
            NativeSidecar::Always => true,
            NativeSidecar::Never => false,
            NativeSidecar::Auto => server.is_some_and(|v| v >= (1, 29)),
        }
    }
}

/// `(major, minor)` from the API server's `/version` strings (`"1"`, `"29+"` on some
/// distributions).
pub fn parse_server_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    Some((digits(major)?, digits(minor)?))
}

/// What every injected pod gets unless its annotations say otherwise: the control plane's
/// `--proxy-*` flags and `meshflow inject`'s, one definition for both. Flags over
/// `MESHFLOW_PROXY_…` env over the defaults below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct InjectSettings {
    /// The sidecar image: holds `meshflow-proxy` (the proxy, `meshflow-proxy init` and
    /// `meshflow-proxy wait-ready`).
    #[arg(long = "proxy-image", env = "MESHFLOW_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub image: String,
    /// Pull policy of the sidecar image: Always, IfNotPresent or Never.
    #[arg(
        long = "proxy-image-pull-policy",
        env = "MESHFLOW_PROXY_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"]
    )]
    pub image_pull_policy: String,
    /// The UID the proxy runs as; the capture rules let this UID's traffic through, so no app
    /// may run as it.
    #[arg(long = "proxy-uid", env = "MESHFLOW_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: i64,
    /// The proxy's inbound (mTLS) port; redirected inbound traffic arrives here.
    #[arg(
        long = "proxy-inbound-port",
        env = "MESHFLOW_PROXY_INBOUND_PORT",
        default_value_t = 15006
    )]
    pub inbound_port: u16,
    /// The proxy's outbound port (loopback); redirected outbound traffic arrives here.
    #[arg(
        long = "proxy-outbound-port",
        env = "MESHFLOW_PROXY_OUTBOUND_PORT",
        default_value_t = 15001
    )]
    pub outbound_port: u16,
    /// The proxy's admin port (`/ready`, `/app-health/…`): probes and Prometheus reach it on
    /// the pod IP; never redirected.
    #[arg(
        long = "proxy-admin-port",
        env = "MESHFLOW_PROXY_ADMIN_PORT",
        default_value_t = 15020
    )]
    pub admin_port: u16,
    /// The proxy's CPU request (Kubernetes quantity).
    #[arg(
        long = "proxy-cpu-request",
        env = "MESHFLOW_PROXY_CPU_REQUEST",
        default_value = "100m"
    )]
    pub cpu_request: String,
    /// The proxy's CPU limit; empty: none.
    #[arg(
        long = "proxy-cpu-limit",
        env = "MESHFLOW_PROXY_CPU_LIMIT",
        default_value = ""
    )]
    pub cpu_limit: String,
    /// The proxy's memory request.
    #[arg(
        long = "proxy-memory-request",
        env = "MESHFLOW_PROXY_MEMORY_REQUEST",
        default_value = "64Mi"
    )]
    pub memory_request: String,
    /// The proxy's memory limit; empty: none.
    #[arg(
        long = "proxy-memory-limit",
        env = "MESHFLOW_PROXY_MEMORY_LIMIT",
        default_value = "256Mi"
    )]
    pub memory_limit: String,
    /// Inject the proxy as a native sidecar: auto (API server ≥ 1.29), always or never.
    #[arg(long = "native-sidecar", env = "MESHFLOW_NATIVE_SIDECAR", value_enum, default_value_t = NativeSidecar::Auto)]
    pub native_sidecar: NativeSidecar,
    /// The control plane's gRPC address (`host:port`) as the proxy reaches it.
    #[arg(
        long = "proxy-control-plane",
        env = "MESHFLOW_PROXY_CONTROL_PLANE",
        default_value = "meshflow-control-plane.meshflow-system.svc:15012"
    )]
    pub control_plane: String,
    /// Inbound ports never redirected to the proxy, for every pod (comma-separated).
    #[arg(
        long = "proxy-exclude-inbound-ports",
        env = "MESHFLOW_PROXY_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ','
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected, for every pod (comma-separated).
    #[arg(
        long = "proxy-exclude-outbound-ports",
        env = "MESHFLOW_PROXY_EXCLUDE_OUTBOUND_PORTS",
        value_delimiter = ','
    )]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never redirected, for every pod (comma-separated), e.g. the
    /// cloud metadata address `169.254.169.254/32`.
    #[arg(
        long = "proxy-exclude-outbound-cidrs",
        env = "MESHFLOW_PROXY_EXCLUDE_OUTBOUND_CIDRS",
        value_delimiter = ','
    )]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The SPIFFE trust domain (the proxy's expected ID and the control plane's server name).
    /// Set from the binary's own `--trust-domain`.
    #[arg(skip = String::from("cluster.local"))]
    pub trust_domain: String,
}

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: DEFAULT_PROXY_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            proxy_uid: 2102,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            cpu_request: "100m".into(),
            cpu_limit: String::new(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
            native_sidecar: NativeSidecar::Auto,
            control_plane: "meshflow-control-plane.meshflow-system.svc:15012".into(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            trust_domain: "cluster.local".into(),
        }
    }
}

impl InjectSettings {
    /// Checks what clap cannot: quantities, distinct non-zero ports, a non-root UID, CIDRs.
    ///
    /// # Errors
    /// The flag and what is wrong with it.
    pub fn validate(&self) -> Result<(), InjectError> {
        let bad = |field: &str, message: String| {
            Err(InjectError {
                field: field.into(),
                message,
            })
        };
        if self.image.trim().is_empty() {
            return bad("--proxy-image", "must name an image".into());
        }
        if self.proxy_uid <= 0 {
            return bad(
                "--proxy-uid",
                format!(
                    "{} is root or invalid; the proxy runs as a non-root UID",
                    self.proxy_uid
                ),
            );
        }
        let ports = [
            ("--proxy-inbound-port", self.inbound_port),
            ("--proxy-outbound-port", self.outbound_port),
            ("--proxy-admin-port", self.admin_port),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return bad(flag, "must not be 0".into());
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return bad(flag, format!("{port} is also {other}"));
            }
        }
        for (flag, value, optional) in [
            ("--proxy-cpu-request", &self.cpu_request, false),
            ("--proxy-cpu-limit", &self.cpu_limit, true),
            ("--proxy-memory-request", &self.memory_request, false),
            ("--proxy-memory-limit", &self.memory_limit, true),
        ] {
            if !(is_quantity(value) || optional && value.is_empty()) {
                return bad(
                    flag,
                    format!("{value:?} is not a Kubernetes quantity (e.g. 100m, 64Mi)"),
                );
            }
        }
        if self
            .control_plane
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return bad(
                "--proxy-control-plane",
                format!("{:?} is not host:port", self.control_plane),
            );
        }
        for cidr in &self.exclude_outbound_cidrs {
            if !is_cidr(cidr) {
                return bad(
                    "--proxy-exclude-outbound-cidrs",
                    format!("{cidr:?} is not a CIDR (e.g. 10.0.0.0/8)"),
                );
            }
        }
        if crate::SpiffeId::new(&self.trust_domain, "ns", "sa").is_err() {
            return bad(
                "--trust-domain",
                format!("{:?} is not a trust domain", self.trust_domain),
            );
        }
        Ok(())
    }
}

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
    for (index, container) in containers.iter().enumerate() {
        if container.name == PROXY_CONTAINER {
            continue;
        }
        for rewritten in probes::rewrite(container, index, settings.admin_port)? {
            ops.push(replace(
                ["spec", "containers", &index.to_string(), rewritten.field],
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

/// What a pod's annotations (and containers) decide, over the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodOptions {
    cpu_request: String,
    cpu_limit: String,
    memory_request: String,
    memory_limit: String,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    app_port: u16,
    app_protocol: &'static str,
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

impl PodOptions {
    fn read(
        annotations: &BTreeMap<String, String>,
        containers: &[Container],
        settings: &InjectSettings,
    ) -> Result<PodOptions, InjectError> {
        let quantity = |key: &str, default: &str| -> Result<String, InjectError> {
            match annotations.get(key) {
                None => Ok(default.to_string()),
                Some(v) if is_quantity(v.trim()) => Ok(v.trim().to_string()),
                Some(v) => Err(error(
                    annotation_field(key),
                    format!("{v:?} is not a Kubernetes quantity (e.g. 100m, 64Mi)"),
                )),
            }
        };
        let list = |key: &str| -> Vec<String> {
            annotations
                .get(key)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let ports = |key: &str, base: &[u16]| -> Result<Vec<u16>, InjectError> {
            let mut out = base.to_vec();
            for p in list(key) {
                let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    error(
                        annotation_field(key),
                        format!("{p:?} is not a port (1-65535)"),
                    )
                })?;
                if !out.contains(&port) {
                    out.push(port);
                }
            }
            Ok(out)
        };
        let mut cidrs = settings.exclude_outbound_cidrs.clone();
        for cidr in list(EXCLUDE_OUTBOUND_CIDRS) {
            if !is_cidr(&cidr) {
                return Err(error(
                    annotation_field(EXCLUDE_OUTBOUND_CIDRS),
                    format!("{cidr:?} is not a CIDR (e.g. 10.0.0.0/8)"),
                ));
            }
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }
        let first_port = containers
            .iter()
            .filter(|c| c.name != PROXY_CONTAINER)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
        let app_port = match annotations.get(APP_PORT) {
            Some(v) => v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    error(
                        annotation_field(APP_PORT),
                        format!("{v:?} is not a port (1-65535)"),
                    )
                })?,
            // No declared port: the proxy has no app to forward inbound requests to.
            None => first_port
                .and_then(|p| u16::try_from(p.container_port).ok())
                .unwrap_or(0),
        };
        let app_protocol = match annotations.get(APP_PROTOCOL).map(|v| v.trim()) {
            Some("http1") => "http1",
            Some("h2c") => "h2c",
            Some("grpc") => "grpc",
            Some(other) => {
                return Err(error(
                    annotation_field(APP_PROTOCOL),
                    format!("{other:?} is not http1, h2c or grpc"),
                ))
            }
            None => {
                let name = first_port
                    .and_then(|p| p.name.as_deref())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if name.starts_with("grpc") {
                    "grpc"
                } else if name.starts_with("http2") || name.starts_with("h2c") {
                    "h2c"
                } else {
                    "http1"
                }
            }
        };
        Ok(PodOptions {
            cpu_request: quantity(PROXY_CPU_REQUEST, &settings.cpu_request)?,
            cpu_limit: quantity(PROXY_CPU_LIMIT, &settings.cpu_limit)?,
            memory_request: quantity(PROXY_MEMORY_REQUEST, &settings.memory_request)?,
            memory_limit: quantity(PROXY_MEMORY_LIMIT, &settings.memory_limit)?,
            exclude_inbound_ports: ports(EXCLUDE_INBOUND_PORTS, &settings.exclude_inbound_ports)?,
            exclude_outbound_ports: ports(
                EXCLUDE_OUTBOUND_PORTS,
                &settings.exclude_outbound_ports,
            )?,
            exclude_outbound_cidrs: cidrs,
            app_port,
            app_protocol,
        })
    }

    fn resources(&self) -> Value {
        let quantities = |pairs: [(&str, &String); 2]| -> serde_json::Map<String, Value> {
            pairs
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect()
        };
        let requests = quantities([("cpu", &self.cpu_request), ("memory", &self.memory_request)]);
        let limits = quantities([("cpu", &self.cpu_limit), ("memory", &self.memory_limit)]);
        let mut out = serde_json::Map::new();
        if !limits.is_empty() {
            out.insert("limits".into(), Value::Object(limits));
        }
        if !requests.is_empty() {
            out.insert("requests".into(), Value::Object(requests));
        }
        Value::Object(out)
    }
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

fn wanted_volumes() -> Vec<Value> {
    vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": "token",
            }}]},
        }),
        json!({
            "name": TRUST_BUNDLE_VOLUME,
            "configMap": { "name": TRUST_BUNDLE_CONFIGMAP },
        }),
        json!({ "name": XTABLES_VOLUME, "emptyDir": {} }),
    ]
}

fn downward(name: &str, field: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": field } } })
}

fn env(name: &str, value: impl std::fmt::Display) -> Value {
    json!({ "name": name, "value": value.to_string() })
}

/// The proxy container. Its bootstrap comes from env (`meshflow-proxy` reads the `MESHFLOW_…`
/// variables as flags); `$(VAR)` references are expanded by the kubelet from the variables
/// defined before them.
fn proxy_container(settings: &InjectSettings, options: &PodOptions, native: bool) -> Value {
    let control_plane_name = crate::SpiffeId::new(
        &settings.trust_domain,
        crate::mesh::CONTROL_PLANE_NAMESPACE,
        crate::mesh::CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .map(|id| id.dns_name())
    .unwrap_or_default();
    let ready = json!({ "httpGet": { "path": "/ready", "port": settings.admin_port } });
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": [
            downward("POD_NAME", "metadata.name"),
            downward("POD_NAMESPACE", "metadata.namespace"),
            downward("POD_IP", "status.podIP"),
            downward("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("MESHFLOW_WORKLOAD", "$(POD_NAMESPACE)/$(POD_NAME)"),
            env("MESHFLOW_SPIFFE_ID", format!(
                "spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT)", settings.trust_domain)),
            env("MESHFLOW_CONTROL_PLANE", &settings.control_plane),
            env("MESHFLOW_CONTROL_PLANE_SERVER_NAME", control_plane_name),
            env("MESHFLOW_TRUST_BUNDLE_FILE", format!("{TRUST_BUNDLE_DIR}/{TRUST_BUNDLE_KEY}")),
            env("MESHFLOW_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
            env("MESHFLOW_INBOUND", format!("0.0.0.0:{}", settings.inbound_port)),
            env("MESHFLOW_OUTBOUND", format!("127.0.0.1:{}", settings.outbound_port)),
            env("MESHFLOW_ADMIN", format!("0.0.0.0:{}", settings.admin_port)),
            env("MESHFLOW_APP_PORT", options.app_port),
            env("MESHFLOW_APP_PROTOCOL", options.app_protocol),
            downward("MESHFLOW_APP_PROBES", &format!("metadata.annotations['{APP_PROBES}']")),
        ],
        "ports": [{ "name": "meshflow-admin", "containerPort": settings.admin_port, "protocol": "TCP" }],
        "readinessProbe": {
            "httpGet": { "path": "/ready", "port": settings.admin_port },
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": options.resources(),
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsGroup": settings.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": TRUST_BUNDLE_VOLUME, "mountPath": TRUST_BUNDLE_DIR, "readOnly": true },
        ],
    });
    if native {
        container["restartPolicy"] = json!("Always");
        // The kubelet starts the next container only after this succeeds; two minutes.
        let mut startup = ready.clone();
        startup["periodSeconds"] = json!(1);
        startup["failureThreshold"] = json!(120);
        container["startupProbe"] = startup;
    } else {
        // The kubelet starts the next container only once postStart returns: the app never
        // starts before its proxy is ready.
        container["lifecycle"] = json!({ "postStart": { "exec": { "command": [
            "meshflow-proxy", "wait-ready",
            "--admin", format!("127.0.0.1:{}", settings.admin_port),
            "--timeout", "120s",
        ]}}});
    }
    container
}

/// The capture init container: `meshflow-proxy init` with the ports and exclusions. The one
/// container that runs as root, with exactly the capabilities iptables needs.
fn init_container(settings: &InjectSettings, options: &PodOptions) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        settings.proxy_uid.to_string(),
        "--inbound-port".into(),
        settings.inbound_port.to_string(),
        "--outbound-port".into(),
        settings.outbound_port.to_string(),
        "--admin-port".into(),
        settings.admin_port.to_string(),
    ];
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    for (flag, value) in [
        (
            "--exclude-inbound-ports",
            join(&options.exclude_inbound_ports),
        ),
        (
            "--exclude-outbound-ports",
            join(&options.exclude_outbound_ports),
        ),
        (
            "--exclude-outbound-cidrs",
            options.exclude_outbound_cidrs.join(","),
        ),
    ] {
        if !value.is_empty() {
            args.push(flag.into());
            args.push(value);
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "resources": options.resources(),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": XTABLES_VOLUME, "mountPath": "/run" }],
    })
}

/// Whether `s` is a Kubernetes resource quantity: a signed decimal number with an optional
/// binary (`Ki`…`Ei`), decimal (`n`, `u`, `m`, `k`, `M`…`E`) or exponent (`e3`) suffix.
pub fn is_quantity(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    let valid_number = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    };
    valid_number && valid_suffix
}

/// Whether `s` is `address/prefix` (IPv4 ≤ 32, IPv6 ≤ 128).
pub fn is_cidr(s: &str) -> bool {
    let Some((address, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => prefix <= 32,
        Ok(IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}
