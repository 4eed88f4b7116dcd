//! The config snapshot in force, converted from the control plane's proto into lookup tables.
//! The last good snapshot stays in force while the control plane is away or sends a bad one.

use std::collections::HashMap;
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
        for s in &raw.services {
            let mut endpoints = Vec::new();
            for e in &s.endpoints {
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
            services.insert(
                (s.name.clone(), s.namespace.clone()),
                ServiceEntry {
                    protocol: s.protocol.clone(),
                    endpoints,
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
            raw,
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
    pub fn set(&self, snapshot: ConfigSnapshot) {
        self.current.store(Some(Arc::new(snapshot)));
    }
}
