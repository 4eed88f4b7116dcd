//! The config snapshot in force, converted from the control plane's proto into lookup tables.
//! The last good snapshot stays in force while the control plane is away or sends a bad one.

pub mod bootstrap;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use meshflow_api::v1;
use meshflow_policies::authn::{
    effective_mtls_mode, Authenticator, MtlsMode, PeerAuthentication, RequestAuthentication,
};
use meshflow_policies::authz::AuthorizationPolicy;
use meshflow_policies::{SpiffeId, TrafficPolicy};

/// One endpoint of a service: a sidecar's inbound listener and the identity it must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// Expected server identity.
    pub identity: SpiffeId,
}

/// A destination service.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// `http1` | `h2c` | `grpc`.
    pub protocol: String,
    /// Endpoints (may be empty while no sidecar of the service is connected).
    pub endpoints: Vec<Endpoint>,
    /// TCP ports (Kubernetes mode): (port on the cluster IPs, port on the pods, opaque).
    pub ports: Vec<ServicePort>,
    /// Whether the service's pods run the sidecar (Kubernetes mode: the snapshot's
    /// `unmeshed`, inverted; always in local mode). Not meshed: known, but captured
    /// connections to it pass through in plaintext.
    pub meshed: bool,
}

/// A service's (name, namespace).
pub type ServiceKey = (String, String);

/// A TCP port of a service (Kubernetes mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    /// The port on the service's cluster IPs.
    pub port: u16,
    /// The port on the pods.
    pub target_port: u16,
    /// Carried as opaque TCP, no protocol detection.
    pub opaque: bool,
}

/// Where a captured connection's original destination leads (see [`ConfigSnapshot::destination`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The service (name, namespace).
    pub service: (String, String),
    /// A pod IP was dialled: exactly this endpoint (otherwise any of the service's).
    pub pinned: Option<Endpoint>,
    /// The port on the destination pod.
    pub target_port: u16,
    /// No protocol detection: carried as opaque TCP.
    pub opaque: bool,
    /// The service is meshed (mTLS to its endpoints); otherwise the connection passes
    /// through in plaintext to its original destination.
    pub meshed: bool,
}

/// A validated snapshot.
#[derive(Debug, Clone)]
pub struct ConfigSnapshot {
    /// Version from the control plane.
    pub version: u64,
    /// This workload's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Services by (name, namespace).
    pub services: HashMap<(String, String), ServiceEntry>,
    /// TrafficPolicies by destination (name, namespace).
    pub traffic: HashMap<(String, String), Arc<TrafficPolicy>>,
    /// AuthorizationPolicies selecting this workload (evaluated on inbound requests).
    pub authorization: Vec<AuthorizationPolicy>,
    /// JWT rules of the RequestAuthentications selecting this workload, keys parsed.
    pub authenticator: Arc<Authenticator>,
    /// Inbound mTLS mode of the app port (PeerAuthentication): STRICT or PERMISSIVE.
    pub mtls_mode: MtlsMode,
    /// The PeerAuthentication that set `mtls_mode` (`namespace/name`), if any.
    pub mtls_policy: Option<String>,
    /// (cluster IP, service port) → the service and its port.
    pub cluster_ips: HashMap<(IpAddr, u16), (ServiceKey, ServicePort)>,
    /// Endpoint IP → the services it is an endpoint of, with that endpoint.
    pub endpoint_ips: HashMap<IpAddr, Vec<(ServiceKey, Endpoint)>>,
    /// The proto as received (for `/config_dump`).
    pub raw: v1::Snapshot,
}

/// Why a snapshot was rejected (the previous one stays in force).
#[derive(Debug, thiserror::Error)]
#[error("snapshot {version} rejected: {reason}")]
pub struct SnapshotError {
    /// The rejected version.
    pub version: u64,
    /// Why.
    pub reason: String,
}

impl ConfigSnapshot {
    /// Validates and converts a proto snapshot for a sidecar whose app listens on `app_port`.
    ///
    /// # Errors
    /// [`SnapshotError`] for a malformed identity or an unreadable policy.
    pub fn from_proto(raw: v1::Snapshot, app_port: u16) -> Result<Self, SnapshotError> {
        let err = |reason: String| SnapshotError {
            version: raw.version,
            reason,
        };
        let spiffe_id: SpiffeId = raw
            .spiffe_id
            .parse()
            .map_err(|e| err(format!("spiffeId: {e}")))?;
        let mut services = HashMap::new();
        let mut cluster_ips = HashMap::new();
        let mut endpoint_ips: HashMap<IpAddr, Vec<(ServiceKey, Endpoint)>> = HashMap::new();
        for s in &raw.services {
            let key = (s.name.clone(), s.namespace.clone());
            let ports: Vec<ServicePort> = s
                .ports
                .iter()
                .filter_map(|p| {
                    Some(ServicePort {
                        port: u16::try_from(p.port).ok().filter(|p| *p > 0)?,
                        target_port: u16::try_from(p.target_port).ok().filter(|p| *p > 0)?,
                        opaque: p.opaque,
                    })
                })
                .collect();
            for ip in s
                .cluster_ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
            {
                for port in &ports {
                    cluster_ips.insert((ip, port.port), (key.clone(), *port));
                }
            }
            let mut endpoints = Vec::new();
            // An unmeshed service has no sidecar to mTLS to: whatever endpoints it lists are
            // not used.
            for e in s.endpoints.iter().filter(|_| !s.unmeshed) {
                // One bad endpoint must not cost the whole snapshot: skip it, keep the rest.
                match (
                    e.address.parse::<std::net::SocketAddr>(),
                    e.identity.parse::<SpiffeId>(),
                ) {
                    (Ok(_), Ok(identity)) => endpoints.push(Endpoint {
                        address: e.address.clone(),
                        identity,
                    }),
                    _ => tracing::warn!(
                        service = %s.name,
                        namespace = %s.namespace,
                        address = %e.address.chars().take(64).collect::<String>(),
                        "skipping malformed endpoint in snapshot"
                    ),
                }
            }
            for endpoint in &endpoints {
                if let Ok(address) = endpoint.address.parse::<SocketAddr>() {
                    endpoint_ips
                        .entry(address.ip())
                        .or_default()
                        .push((key.clone(), endpoint.clone()));
                }
            }
            services.insert(
                key,
                ServiceEntry {
                    protocol: s.protocol.clone(),
                    endpoints,
                    ports,
                    meshed: !s.unmeshed,
                },
            );
        }
        let mut traffic = HashMap::new();
        for json in &raw.traffic_policies_json {
            let policy: TrafficPolicy =
                serde_json::from_str(json).map_err(|e| err(format!("trafficPolicies: {e}")))?;
            traffic.insert(
                (policy.spec.service.clone(), policy.namespace().to_string()),
                Arc::new(policy),
            );
        }
        // An unreadable policy rejects the whole snapshot: the previous policies stay in force,
        // so a bad policy can never widen access.
        let mut authorization = Vec::new();
        for json in &raw.policies_json {
            let policy: AuthorizationPolicy = serde_json::from_str(json)
                .map_err(|e| err(format!("authorizationPolicies: {e}")))?;
            authorization.push(policy);
        }
        let mut request_authentication = Vec::new();
        for json in &raw.request_authentications_json {
            let policy: RequestAuthentication = serde_json::from_str(json)
                .map_err(|e| err(format!("requestAuthentications: {e}")))?;
            request_authentication.push(policy);
        }
        let mut peer_authentication = Vec::new();
        for json in &raw.peer_authentications_json {
            let policy: PeerAuthentication =
                serde_json::from_str(json).map_err(|e| err(format!("peerAuthentications: {e}")))?;
            peer_authentication.push(policy);
        }
        let (mtls_mode, mtls_policy) =
            effective_mtls_mode(&peer_authentication, spiffe_id.namespace(), app_port);
        if !matches!(mtls_mode, MtlsMode::Strict | MtlsMode::Permissive) {
            return Err(err(format!(
                "peerAuthentications: mode {} is not supported",
                mtls_mode.as_str()
            )));
        }
        Ok(Self {
            version: raw.version,
            spiffe_id,
            services,
            traffic,
            authorization,
            authenticator: Arc::new(Authenticator::new(&request_authentication)),
            mtls_mode,
            mtls_policy,
            cluster_ips,
            endpoint_ips,
            raw,
        })
    }

    /// The registry's destination of a captured connection whose original destination was
    /// `dst`: a service's cluster IP and port (its target port on the pods, opaque as the port
    /// says; not `meshed` when the service is not), or an endpoint's pod IP (exactly that
    /// endpoint; opaque unless a port of one of its services targets that port and is not
    /// opaque). `None`: not in the registry.
    pub fn destination(&self, dst: SocketAddr) -> Option<Destination> {
        if let Some((service, port)) = self.cluster_ips.get(&(dst.ip(), dst.port())) {
            return Some(Destination {
                service: service.clone(),
                pinned: None,
                target_port: port.target_port,
                opaque: port.opaque,
                meshed: self.services.get(service).is_none_or(|s| s.meshed),
            });
        }
        let candidates = self.endpoint_ips.get(&dst.ip())?;
        let targeted = |service: &(String, String)| {
            self.services.get(service).and_then(|s| {
                s.ports
                    .iter()
                    .find(|p| p.target_port == dst.port())
                    .copied()
            })
        };
        let (service, endpoint, port) = candidates
            .iter()
            .find_map(|(service, endpoint)| {
                targeted(service).map(|port| (service, endpoint, Some(port)))
            })
            .or_else(|| candidates.first().map(|(s, e)| (s, e, None)))?;
        Some(Destination {
            service: service.clone(),
            pinned: Some(endpoint.clone()),
            target_port: dst.port(),
            opaque: port.is_none_or(|p| p.opaque),
            // Only a meshed service has endpoints.
            meshed: true,
        })
    }
}

/// The snapshot in force, swapped atomically.
#[derive(Default)]
pub struct ConfigState {
    current: ArcSwapOption<ConfigSnapshot>,
}

impl ConfigState {
    /// The snapshot in force, if any.
    pub fn current(&self) -> Option<Arc<ConfigSnapshot>> {
        self.current.load_full()
    }

    /// Puts `snapshot` in force.
    pub fn set(&self, snapshot: Arc<ConfigSnapshot>) {
        self.current.store(Some(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> ConfigSnapshot {
        let endpoint = |address: &str| v1::Endpoint {
            address: address.into(),
            identity: "spiffe://cluster.local/ns/shop/sa/backend".into(),
            workload: "shop/backend-1".into(),
        };
        let port = |port, target_port, opaque| v1::ServicePort {
            name: String::new(),
            port,
            target_port,
            opaque,
        };
        let raw = v1::Snapshot {
            version: 1,
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/client".into(),
            services: vec![
                v1::Service {
                    name: "backend".into(),
                    namespace: "shop".into(),
                    protocol: "http1".into(),
                    endpoints: vec![endpoint("10.250.0.3:15006"), endpoint("10.250.0.4:15006")],
                    cluster_ips: vec!["10.96.0.10".into(), "not an ip".into()],
                    ports: vec![port(80, 8080, false), port(7000, 7000, true)],
                    unmeshed: false,
                },
                v1::Service {
                    name: "admin".into(),
                    namespace: "shop".into(),
                    protocol: "http1".into(),
                    endpoints: vec![endpoint("10.250.0.3:15006")],
                    cluster_ips: vec![],
                    ports: vec![port(9090, 9090, false)],
                    unmeshed: false,
                },
                // Redis without sidecars; its endpoint (a control plane would send none) is
                // ignored.
                v1::Service {
                    name: "redis".into(),
                    namespace: "shop".into(),
                    protocol: "http1".into(),
                    endpoints: vec![endpoint("10.250.0.7:15006")],
                    cluster_ips: vec!["10.96.0.20".into()],
                    ports: vec![port(6379, 6379, false)],
                    unmeshed: true,
                },
            ],
            ..Default::default()
        };
        ConfigSnapshot::from_proto(raw, 8080).unwrap()
    }

    /// Cluster IP and port → the service, its target port and whether the port is opaque; a
    /// pod IP → that endpoint, of the service one of whose ports targets the port dialled
    /// (opaque when none does); anything else is not in the mesh.
    #[test]
    fn original_destinations() {
        let s = snapshot();
        let key = |name: &str| (name.to_string(), "shop".to_string());
        let at = |a: &str| s.destination(a.parse().unwrap());
        assert_eq!(
            at("10.96.0.10:80"),
            Some(Destination {
                service: key("backend"),
                pinned: None,
                target_port: 8080,
                opaque: false,
                meshed: true,
            })
        );
        // A service without sidecars: known, not meshed; its pods are no mesh endpoints.
        let redis = at("10.96.0.20:6379").unwrap();
        assert_eq!((redis.service, redis.meshed), (key("redis"), false));
        assert!(s.services[&key("redis")].endpoints.is_empty());
        assert_eq!(at("10.250.0.7:6379"), None);
        assert!(at("10.96.0.10:7000").unwrap().opaque);
        assert_eq!(at("10.96.0.10:81"), None, "not a port of the service");
        assert_eq!(at("10.96.0.11:80"), None, "not a cluster IP");
        let pod = at("10.250.0.3:9090").unwrap();
        assert_eq!(pod.service, key("admin"));
        assert_eq!(pod.pinned.unwrap().address, "10.250.0.3:15006");
        assert!(!pod.opaque);
        let pod = at("10.250.0.4:8080").unwrap();
        assert_eq!(
            (pod.service, pod.target_port, pod.opaque),
            (key("backend"), 8080, false)
        );
        assert!(
            at("10.250.0.4:5555").unwrap().opaque,
            "no port targets 5555"
        );
        assert_eq!(at("10.250.0.9:8080"), None);
    }
}
