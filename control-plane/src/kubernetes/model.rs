//! Pods, Services and EndpointSlices → the same mesh model the mesh file gives: one workload
//! per pod (its labels and ServiceAccount), and per Service the endpoints a sidecar balances
//! over — the ready pods' IPs with the sidecar's inbound port and each pod's expected SPIFFE ID
//! (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`).
//!
//! Only pods that run the meshflow sidecar ([`runs_sidecar`]) are endpoints: mTLS to a pod
//! without one would reach a port nobody listens on. A Service none of whose pods runs it —
//! or that has no pods at all, such as `kubernetes` — is still known (its cluster IPs and
//! ports) but marked `unmeshed`, and sidecars pass captured connections to it through in
//! plaintext (Istio's auto-mTLS, Linkerd's behaviour).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::DynamicObject;
use meshflow_api::v1;
use meshflow_policies::mesh::{App, AppProtocol, MeshFile, MeshSpec, ObjectMeta, Workload};
use meshflow_policies::SpiffeId;
use serde::Deserialize;

/// Pod annotation: the port the pod's sidecar accepts inbound mTLS on (default: the control
/// plane's `--sidecar-inbound-port`, 15006). Set by injection; tests without pod networking
/// set it to the port their sidecar bound.
pub const INBOUND_PORT_ANNOTATION: &str = meshflow_policies::inject::INBOUND_PORT;

/// Pod annotation: ports (comma-separated) of the pod that callers' sidecars carry as opaque
/// TCP, never detecting a protocol on them (server-first protocols such as MySQL or SMTP,
/// where the client waits for the server). Linkerd's `config.linkerd.io/opaque-ports`.
pub const OPAQUE_PORTS_ANNOTATION: &str = "meshflow.io/opaque-ports";

/// The label an EndpointSlice names its Service with (`discovery.k8s.io`).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The subset of an EndpointSlice (`discovery.k8s.io/v1` or `v1beta1`: both shapes agree on
/// these fields) meshflow reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoints {
    /// The endpoints (the EndpointSlice controller writes `null` for a Service without any).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<SliceEndpoint>,
    /// The ports (a Service port's name with its target port resolved).
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

/// One port of a slice.
#[derive(Debug, Default, Deserialize)]
pub struct SlicePort {
    /// The Service port's name (may be empty).
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the endpoints.
    #[serde(default)]
    pub port: Option<i32>,
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// One endpoint of a slice.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Its conditions; `ready` absent means ready (API semantics).
    #[serde(default)]
    pub conditions: SliceConditions,
    /// The pod behind it.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
}

/// Endpoint conditions.
#[derive(Debug, Default, Deserialize)]
pub struct SliceConditions {
    /// Whether the endpoint is ready to serve; absent means ready (the EndpointSlice API's
    /// rule for consumers).
    pub ready: Option<bool>,
}

/// `targetRef`.
#[derive(Debug, Default, Deserialize)]
pub struct TargetRef {
    /// `Pod`.
    #[serde(default)]
    pub kind: String,
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Pod namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// What the model is built with.
pub struct ModelSettings<'a> {
    /// The SPIFFE trust domain.
    pub trust_domain: &'a str,
    /// The sidecar's inbound port when a pod has no [`INBOUND_PORT_ANNOTATION`].
    pub inbound_port: u16,
}

/// Whether `pod` runs the meshflow sidecar: it carries the annotation injection writes
/// ([`meshflow_policies::inject::INJECTED`]), or has a container — or a restartable init
/// container (a native sidecar) — named like the injected proxy
/// ([`meshflow_policies::inject::PROXY_CONTAINER`]; `meshflow inject` output applied by hand).
/// A pod on the host network never does (injection skips it; its IP is the node's).
pub fn runs_sidecar(pod: &Pod) -> bool {
    use meshflow_policies::inject::{INJECTED, PROXY_CONTAINER};
    if host_network(pod) {
        return false;
    }
    if annotation(pod, INJECTED).is_some() {
        return true;
    }
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.containers.iter().any(|c| c.name == PROXY_CONTAINER)
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == PROXY_CONTAINER && c.restart_policy.as_deref() == Some("Always"))
}

/// Whether the pod's `Ready` condition is `True` and it has an IP.
pub fn pod_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        && pod.metadata.deletion_timestamp.is_none()
}

/// The port in a [`INBOUND_PORT_ANNOTATION`]: decimal digits only, 1–65535.
fn inbound_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The protocol a Service's first port speaks: `appProtocol` (`http`, `kubernetes.io/h2c`,
/// `grpc`) or, as Istio reads it, the port name's prefix (`grpc`, `http2`/`h2c`, `http`);
/// HTTP/1.1 otherwise.
pub fn service_protocol(service: &Service) -> AppProtocol {
    let Some(port) = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
    else {
        return AppProtocol::Http1;
    };
    let hint = port
        .app_protocol
        .clone()
        .or_else(|| port.name.clone())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if hint.starts_with("grpc") {
        AppProtocol::Grpc
    } else if hint.starts_with("http2") || hint.contains("h2c") {
        AppProtocol::H2c
    } else {
        AppProtocol::Http1
    }
}

fn protocol_name(protocol: AppProtocol) -> &'static str {
    match protocol {
        AppProtocol::Http1 => "http1",
        AppProtocol::H2c => "h2c",
        AppProtocol::Grpc => "grpc",
    }
}

/// Builds the mesh (one workload per pod in a selected namespace, keyed `<namespace>/<pod>`)
/// and the services with their endpoints, keyed (namespace, name); each endpoint is
/// `<pod IP>:<inbound port>` (IPv6 in brackets) with the pod's SPIFFE ID. `slices` are
/// EndpointSlices of either served version, as dynamic objects. Only ready pods that run the
/// sidecar ([`runs_sidecar`]) are endpoints; pods on the host network never are. A Service is
/// `unmeshed` when no pod its slices name (ready or not) runs the sidecar — so a meshed
/// Service whose pods are all NotReady stays meshed, with no endpoints.
pub fn build(
    settings: &ModelSettings<'_>,
    selected: &(dyn Fn(&str) -> bool + Sync),
    pods: &[Arc<Pod>],
    services: &[Arc<Service>],
    slices: &[Arc<DynamicObject>],
) -> (MeshFile, BTreeMap<(String, String), v1::Service>) {
    let mut by_name: BTreeMap<(String, String), &Pod> = BTreeMap::new();
    let mut workloads = Vec::new();
    for pod in pods {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        if !selected(ns) {
            continue;
        }
        by_name.insert((ns.clone(), name.clone()), pod);
        workloads.push(Workload {
            name: name.clone(),
            namespace: ns.clone(),
            service_account: Some(service_account(pod)),
            service: None,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            app: App {
                protocol: AppProtocol::Http1,
                port: None,
                command: Vec::new(),
                builtin: None,
            },
        });
    }
    let mut out: BTreeMap<(String, String), v1::Service> = BTreeMap::new();
    for service in services {
        let (Some(ns), Some(name)) = (&service.metadata.namespace, &service.metadata.name) else {
            continue;
        };
        if !selected(ns) {
            continue;
        }
        let protocol = service_protocol(service);
        out.insert(
            (ns.clone(), name.clone()),
            v1::Service {
                name: name.clone(),
                namespace: ns.clone(),
                protocol: protocol_name(protocol).into(),
                endpoints: Vec::new(),
                cluster_ips: cluster_ips(service),
                ports: Vec::new(),
                // Until a slice names a pod with the sidecar.
                unmeshed: true,
            },
        );
    }
    let mut ports = PortFacts::default();
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    // Per Service: whether a slice names a pod with the sidecar (ready or not), and whether it
    // names a ready pod without one.
    let mut has_sidecar_pod: BTreeSet<(String, String)> = BTreeSet::new();
    let mut has_ready_plain_pod: BTreeSet<(String, String)> = BTreeSet::new();
    for slice in slices {
        let Some(ns) = &slice.metadata.namespace else {
            continue;
        };
        let Some(service_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let Some(service) = out.get_mut(&(ns.clone(), service_name.clone())) else {
            continue;
        };
        let Ok(parsed) = serde_json::from_value::<SliceEndpoints>(slice.data.clone()) else {
            tracing::warn!(namespace = %ns, slice = ?slice.metadata.name, "unreadable EndpointSlice");
            continue;
        };
        let service_key = (ns.clone(), service_name.clone());
        ports.slice_ports(&service_key, &parsed.ports);
        for endpoint in parsed.endpoints {
            let Some(target) = endpoint.target_ref.filter(|t| t.kind == "Pod") else {
                continue;
            };
            // A slice names pods of its own namespace only: a reference elsewhere would give
            // this Service another namespace's pod and identity.
            if target.namespace.as_ref().is_some_and(|n| n != ns) {
                continue;
            }
            let pod_ns = ns.clone();
            let Some(pod) = by_name.get(&(pod_ns.clone(), target.name.clone())) else {
                continue;
            };
            // Without the sidecar a pod is no endpoint (nothing would answer mTLS on its
            // inbound port); with it, ready or not, it makes the Service meshed — unless no pod
            // with the sidecar is ready while one without is (below).
            if !runs_sidecar(pod) {
                if endpoint.conditions.ready != Some(false) && pod_ready(pod) {
                    has_ready_plain_pod.insert(service_key.clone());
                }
                continue;
            }
            has_sidecar_pod.insert(service_key.clone());
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            // The pod's own Ready condition is newer than the slice: a pod turning NotReady
            // leaves at once, without waiting for the EndpointSlice controller. A pod on the
            // host's network has the node's IP and cannot have a sidecar of its own.
            if !pod_ready(pod) || host_network(pod) {
                continue;
            }
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            let port = match pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INBOUND_PORT_ANNOTATION))
            {
                None => settings.inbound_port,
                Some(text) => match inbound_port(text) {
                    Some(port) => port,
                    None => {
                        tracing::warn!(pod = %format!("{pod_ns}/{}", target.name), value = %text, "{INBOUND_PORT_ANNOTATION} is not a port (1-65535): not an endpoint");
                        continue;
                    }
                },
            };
            let address = match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                    Some(v4) => format!("{v4}:{port}"),
                    None => format!("[{v6}]:{port}"),
                },
                Ok(v4) => format!("{v4}:{port}"),
                Err(_) => continue,
            };
            let Ok(identity) = SpiffeId::new(settings.trust_domain, &pod_ns, &service_account(pod))
            else {
                continue;
            };
            if !seen.insert((ns.clone(), service_name.clone(), address.clone())) {
                continue;
            }
            ports.backing_pod(&service_key, pod);
            service.endpoints.push(v1::Endpoint {
                address,
                identity: identity.uri(),
                workload: format!("{pod_ns}/{}", target.name),
            });
        }
    }
    // Meshed: a pod with the sidecar backs the Service, and none without it is serving while
    // no sidecar pod is ready — during a rollout onto the mesh (or off it) the ready plain
    // pods keep serving, in plaintext, until a sidecar pod is ready, as kube-proxy would route.
    for (key, service) in out.iter_mut() {
        service.unmeshed = !has_sidecar_pod.contains(key)
            || (service.endpoints.is_empty() && has_ready_plain_pod.contains(key));
    }
    for service in out.values_mut() {
        service.endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    }
    for service in services {
        if let (Some(ns), Some(name)) = (&service.metadata.namespace, &service.metadata.name) {
            let key = (ns.clone(), name.clone());
            if let Some(entry) = out.get_mut(&key) {
                entry.ports = ports.service_ports(&key, service);
            }
        }
    }
    let mesh = MeshFile {
        api_version: meshflow_policies::mesh::API_VERSION.into(),
        kind: "Mesh".into(),
        metadata: ObjectMeta {
            name: "kubernetes".into(),
            ..Default::default()
        },
        spec: MeshSpec {
            trust_domain: settings.trust_domain.into(),
            workloads,
            policies_dir: None,
            smoke: None,
        },
    };
    (mesh, out)
}

/// A Service's cluster IPs (`spec.clusterIPs`, else `spec.clusterIP`); none when headless.
fn cluster_ips(service: &Service) -> Vec<String> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    ips
}

/// What the ports of each Service depend on besides the Service: its slices' resolved ports
/// (for named target ports) and the ports the pods behind it want opaque.
#[derive(Default)]
struct PortFacts {
    /// (namespace, service) → slice port name → port on the pods.
    named: BTreeMap<(String, String), BTreeMap<String, u32>>,
    /// (namespace, service) → target ports some pod behind it wants opaque.
    opaque: BTreeMap<(String, String), BTreeSet<u32>>,
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

impl PortFacts {
    fn slice_ports(&mut self, key: &(String, String), ports: &[SlicePort]) {
        let named = self.named.entry(key.clone()).or_default();
        for port in ports {
            if let (Some(name), Some(number)) = (&port.name, port.port) {
                if let Ok(number) = u32::try_from(number) {
                    named.insert(name.clone(), number);
                }
            }
        }
    }

    fn backing_pod(&mut self, key: &(String, String), pod: &Pod) {
        if let Some(list) = annotation(pod, OPAQUE_PORTS_ANNOTATION) {
            let ports = list
                .split(',')
                .filter_map(|p| p.trim().parse::<u16>().ok())
                .map(u32::from);
            self.opaque.entry(key.clone()).or_default().extend(ports);
        }
    }

    /// The Service's TCP ports with their target ports; a port whose named target port no
    /// slice resolves yet is left out.
    fn service_ports(&self, key: &(String, String), service: &Service) -> Vec<v1::ServicePort> {
        let empty = BTreeSet::new();
        let opaque = self.opaque.get(key).unwrap_or(&empty);
        let mut out = Vec::new();
        for port in service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
        {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(number) = u32::try_from(port.port) else {
                continue;
            };
            let name = port.name.clone().unwrap_or_default();
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            let target = match &port.target_port {
                None => Some(number),
                Some(IntOrString::Int(t)) => u32::try_from(*t).ok(),
                Some(IntOrString::String(_)) => {
                    self.named.get(key).and_then(|n| n.get(&name)).copied()
                }
            };
            let Some(target) = target.filter(|t| *t > 0 && *t <= 65535) else {
                continue;
            };
            let hint = port
                .app_protocol
                .clone()
                .unwrap_or_else(|| name.clone())
                .to_ascii_lowercase();
            let declared_tcp = hint == "tcp" || hint.starts_with("tcp-");
            out.push(v1::ServicePort {
                name,
                port: number,
                target_port: target,
                opaque: declared_tcp || opaque.contains(&target),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with the sidecar (the annotation injection writes).
    fn pod(ns: &str, name: &str, sa: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": ns, "labels": { "app": "backend" },
                              "annotations": { INBOUND_PORT_ANNOTATION: "4143",
                                               meshflow_policies::inject::INJECTED: "0.1.0" } },
                "spec": { "serviceAccountName": sa, "containers": [] },
                "status": { "podIP": ip, "conditions": [
                    { "type": "Ready", "status": if ready { "True" } else { "False" } } ] }
            }))
            .unwrap(),
        )
    }

    /// The same EndpointSlice in the `v1` and the `v1beta1` shape gives the same endpoints.
    #[test]
    fn ready_pods_of_either_slice_version_become_endpoints_with_their_identity() {
        let pods = vec![
            pod("shop", "backend-1", "backend", "10.0.0.1", true),
            pod("shop", "backend-2", "backend", "10.0.0.2", false),
            pod("other", "x", "x", "10.0.0.3", true),
        ];
        let service: Arc<Service> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "backend", "namespace": "shop" },
                "spec": { "ports": [{ "name": "grpc", "port": 80 }] }
            }))
            .unwrap(),
        );
        for version in ["discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"] {
            let slice: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": version, "kind": "EndpointSlice",
                "metadata": { "name": "backend-abc", "namespace": "shop",
                              "labels": { SERVICE_NAME_LABEL: "backend" } },
                "addressType": "IPv4",
                "endpoints": [
                    { "addresses": ["10.0.0.1"], "conditions": { "ready": true },
                      "targetRef": { "kind": "Pod", "name": "backend-1", "namespace": "shop" } },
                    { "addresses": ["10.0.0.2"], "conditions": { "ready": true },
                      "targetRef": { "kind": "Pod", "name": "backend-2", "namespace": "shop" } }
                ]
            }))
            .unwrap();
            let (mesh, services) = build(
                &ModelSettings {
                    trust_domain: "cluster.local",
                    inbound_port: 15006,
                },
                &|ns| ns == "shop",
                &pods,
                std::slice::from_ref(&service),
                &[Arc::new(slice)],
            );
            assert_eq!(mesh.spec.workloads.len(), 2, "{version}: namespace filter");
            let backend = &services[&("shop".to_string(), "backend".to_string())];
            assert_eq!(backend.protocol, "grpc");
            assert_eq!(backend.endpoints.len(), 1, "{version}: only the Ready pod");
            assert_eq!(backend.endpoints[0].address, "10.0.0.1:4143");
            assert_eq!(
                backend.endpoints[0].identity,
                "spiffe://cluster.local/ns/shop/sa/backend"
            );
            assert_eq!(backend.endpoints[0].workload, "shop/backend-1");
        }
    }

    fn slice(service: &str, pods: &[&str]) -> Arc<DynamicObject> {
        let endpoints: Vec<_> = pods
            .iter()
            .map(|p| serde_json::json!({ "conditions": {}, "targetRef": { "kind": "Pod", "name": p } }))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": format!("{service}-x"), "namespace": "shop",
                              "labels": { SERVICE_NAME_LABEL: service } },
                "endpoints": endpoints
            }))
            .unwrap(),
        )
    }

    fn service(name: &str) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "shop" }, "spec": {}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn inbound_port_annotations_are_ports_or_nothing() {
        assert_eq!(inbound_port("4143"), Some(4143));
        for bad in ["0", "+15", "70000", "abc", "", " 1", "-1"] {
            assert_eq!(inbound_port(bad), None, "{bad:?}");
        }
    }

    /// IPv6 addresses are bracketed, a pod behind two Services is an endpoint of both, and a
    /// host-network pod (the node's IP, no sidecar of its own) of neither.
    #[test]
    fn ipv6_two_services_and_host_network() {
        let v6 = pod("shop", "v6", "api", "fd00::7", true);
        let mut host: Pod = (*pod("shop", "host", "api", "10.0.0.9", true)).clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        let pods = vec![v6, Arc::new(host)];
        let (_, services) = build(
            &ModelSettings {
                trust_domain: "cluster.local",
                inbound_port: 15006,
            },
            &|_| true,
            &pods,
            &[service("a"), service("b")],
            &[slice("a", &["v6", "host"]), slice("b", &["v6"])],
        );
        for name in ["a", "b"] {
            let s = &services[&("shop".to_string(), name.to_string())];
            let addresses: Vec<_> = s.endpoints.iter().map(|e| e.address.as_str()).collect();
            assert_eq!(addresses, ["[fd00::7]:4143"], "{name}");
        }
    }

    /// Cluster IPs and TCP ports reach the snapshot: a named target port is resolved through
    /// the slice, and a port is opaque when its name says tcp or a pod behind it lists it in
    /// `meshflow.io/opaque-ports`.
    #[test]
    fn cluster_ips_and_ports() {
        let mut backend = (*pod("shop", "backend-1", "backend", "10.0.0.1", true)).clone();
        backend.metadata.annotations.as_mut().unwrap().insert(
            OPAQUE_PORTS_ANNOTATION.to_string(),
            "9000, 5432".to_string(),
        );
        let backend_service: Arc<Service> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "backend", "namespace": "shop" },
                "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                    { "name": "http", "port": 80, "targetPort": "web" },
                    { "name": "db", "port": 5432 },
                    { "name": "metrics", "port": 9100, "targetPort": 9100 },
                    { "name": "tcp-raw", "port": 8081, "targetPort": 8080 },
                    { "name": "dns", "port": 53, "protocol": "UDP" },
                    { "name": "unresolved", "port": 81, "targetPort": "nope" }
                ] }
            }))
            .unwrap(),
        );
        let slice: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "backend-x", "namespace": "shop",
                          "labels": { SERVICE_NAME_LABEL: "backend" } },
            "ports": [{ "name": "http", "port": 8080 }, { "name": "db", "port": 5432 }],
            "endpoints": [{ "conditions": { "ready": true },
                            "targetRef": { "kind": "Pod", "name": "backend-1" } }]
        }))
        .unwrap();
        let (_, services) = build(
            &ModelSettings {
                trust_domain: "cluster.local",
                inbound_port: 15006,
            },
            &|_| true,
            &[Arc::new(backend)],
            &[backend_service, {
                let mut headless = (*service("headless")).clone();
                headless.spec = Some(
                    serde_json::from_value(serde_json::json!({
                    "clusterIP": "None", "ports": [{ "port": 80 }] }))
                    .unwrap(),
                );
                Arc::new(headless)
            }],
            &[Arc::new(slice)],
        );
        let backend = &services[&("shop".to_string(), "backend".to_string())];
        assert_eq!(backend.cluster_ips, ["10.96.0.10"]);
        let ports: Vec<(&str, u32, u32, bool)> = backend
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.target_port, p.opaque))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", 80, 8080, false),
                ("db", 5432, 5432, true),
                ("metrics", 9100, 9100, false),
                ("tcp-raw", 8081, 8080, true),
            ]
        );
        let headless = &services[&("shop".to_string(), "headless".to_string())];
        assert!(headless.cluster_ips.is_empty());
        // No pod behind it: nothing says its port is opaque.
        assert_eq!(headless.ports[0].target_port, 80);
        assert!(!headless.ports[0].opaque);
    }

    /// A pod without the sidecar: no annotations, one app container.
    fn plain_pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        let mut pod = (*pod("shop", name, "redis", ip, ready)).clone();
        pod.metadata.annotations = None;
        pod.spec.as_mut().unwrap().containers =
            vec![
                serde_json::from_value(serde_json::json!({ "name": "redis", "image": "redis" }))
                    .unwrap(),
            ];
        Arc::new(pod)
    }

    fn service_with_ip(name: &str, ip: &str) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "shop" },
                "spec": { "clusterIP": ip, "ports": [{ "name": "tcp", "port": 6379 }] }
            }))
            .unwrap(),
        )
    }

    /// The injection annotation, a `meshflow-proxy` container or a restartable
    /// `meshflow-proxy` init container (a native sidecar) make a pod meshed; nothing else
    /// does, and never on the host network.
    #[test]
    fn which_pods_run_the_sidecar() {
        let with = |containers: serde_json::Value, init: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "namespace": "shop" },
                "spec": { "containers": containers, "initContainers": init }
            }))
            .unwrap()
        };
        let app = serde_json::json!({ "name": "app" });
        let proxy = serde_json::json!({ "name": "meshflow-proxy" });
        let native = serde_json::json!({ "name": "meshflow-proxy", "restartPolicy": "Always" });
        assert!(runs_sidecar(&pod("shop", "a", "a", "10.0.0.1", true)));
        assert!(!runs_sidecar(&plain_pod("b", "10.0.0.2", true)));
        assert!(runs_sidecar(&with(
            serde_json::json!([proxy.clone(), app.clone()]),
            serde_json::json!([])
        )));
        assert!(runs_sidecar(&with(
            serde_json::json!([app.clone()]),
            serde_json::json!([native])
        )));
        assert!(
            !runs_sidecar(&with(
                serde_json::json!([app.clone()]),
                serde_json::json!([proxy.clone()])
            )),
            "an init container that runs to completion is no sidecar"
        );
        assert!(!runs_sidecar(&with(
            serde_json::json!([app]),
            serde_json::json!([{ "name": "meshflow-init" }])
        )));
        let mut host = (*pod("shop", "h", "h", "10.0.0.9", true)).clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(!runs_sidecar(&host));
    }

    /// Only pods with the sidecar are endpoints; a Service is unmeshed when no pod its slices
    /// name runs one — Redis without injection, `kubernetes` (its slice names no pods), a
    /// Service without slices — or when none of its sidecar pods is ready while a pod without
    /// one is (a rollout onto the mesh); meshed otherwise, also with every pod NotReady.
    #[test]
    fn services_without_sidecar_pods_are_unmeshed() {
        let pods = vec![
            pod("shop", "backend-1", "backend", "10.0.0.1", true),
            plain_pod("backend-legacy", "10.0.0.2", true),
            plain_pod("redis-0", "10.0.0.3", true),
            pod("shop", "worker-1", "worker", "10.0.0.4", false),
            pod("shop", "web-new", "web", "10.0.0.5", false),
            plain_pod("web-old", "10.0.0.6", true),
        ];
        let apiserver_slice: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "kubernetes", "namespace": "shop",
                          "labels": { SERVICE_NAME_LABEL: "kubernetes" } },
            "ports": [{ "name": "https", "port": 6443 }],
            "endpoints": [{ "addresses": ["192.168.1.10"], "conditions": { "ready": true } }]
        }))
        .unwrap();
        let (_, services) = build(
            &ModelSettings {
                trust_domain: "cluster.local",
                inbound_port: 15006,
            },
            &|_| true,
            &pods,
            &[
                service_with_ip("backend", "10.96.0.10"),
                service_with_ip("redis", "10.96.0.11"),
                service_with_ip("kubernetes", "10.96.0.1"),
                service_with_ip("worker", "10.96.0.12"),
                service_with_ip("fresh", "10.96.0.13"),
                service_with_ip("web", "10.96.0.14"),
            ],
            &[
                slice("backend", &["backend-1", "backend-legacy"]),
                slice("redis", &["redis-0"]),
                Arc::new(apiserver_slice),
                slice("worker", &["worker-1"]),
                slice("web", &["web-new", "web-old"]),
            ],
        );
        let get = |name: &str| &services[&("shop".to_string(), name.to_string())];
        let backend = get("backend");
        assert!(!backend.unmeshed);
        let addresses: Vec<_> = backend
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(
            addresses,
            ["10.0.0.1:4143"],
            "the pod without the sidecar is no endpoint"
        );
        for name in ["redis", "kubernetes", "fresh"] {
            let service = get(name);
            assert!(service.unmeshed, "{name}");
            assert!(service.endpoints.is_empty(), "{name}");
            assert_eq!(
                service.cluster_ips.len(),
                1,
                "{name}: still in the registry"
            );
            assert_eq!(service.ports.len(), 1, "{name}: its ports too");
        }
        let worker = get("worker");
        assert!(!worker.unmeshed, "meshed with every pod NotReady");
        assert!(worker.endpoints.is_empty());
        // A rollout onto the mesh: the first sidecar pod is not ready yet, the old pod without
        // one is; the old one keeps serving (plaintext) until a sidecar pod is ready.
        let web = get("web");
        assert!(web.unmeshed, "no ready sidecar pod, a ready plain one");
        assert!(web.endpoints.is_empty());
    }
}
