//! The control plane's gRPC services: `Identity.Certify` (CSR → SVID) and `Config.Watch`
//! (per-workload snapshots). Served over TLS; `Watch` requires the caller's SVID.

use std::pin::Pin;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use futures::Stream;
use meshflow_api::v1::{
    self, config_server::Config, identity_server::Identity, watch_request, CertifyRequest,
    CertifyResponse, WatchRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::{CaError, CertificateAuthority};
use crate::metrics::ControlPlaneMetrics;
use crate::state::StateHandle;
use crate::tokens::TokenStore;

/// Shared by both services.
#[derive(Clone)]
pub struct Services {
    /// The CA.
    pub ca: Arc<CertificateAuthority>,
    /// Bootstrap tokens.
    pub tokens: TokenStore,
    /// Mesh state.
    pub state: StateHandle,
    /// Metrics.
    pub metrics: ControlPlaneMetrics,
    /// Kubernetes mode: `Certify` is authenticated by ServiceAccount tokens reviewed by this
    /// cluster (TokenReview), and endpoints come from the cluster, not from `Hello`.
    pub token_review: Option<Arc<crate::kubernetes::identity::TokenReviewer>>,
    /// The connected sidecars and the versions they acknowledged (admin `/proxies`).
    pub proxies: Arc<crate::proxies::Proxies>,
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Identity for Services {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let refuse = |reason: &str, status: Status| {
            self.metrics
                .certify_refused
                .with_label_values(&[reason])
                .inc();
            tracing::warn!(workload = %req.workload, reason, "Certify refused: {}", status.message());
            status
        };
        let state = self.state.current();
        if let Some(client) = &self.token_review {
            if req.token.len() > MAX_TOKEN_BYTES {
                return Err(refuse(
                    "bad_token",
                    Status::invalid_argument(format!("token longer than {MAX_TOKEN_BYTES} bytes")),
                ));
            }
            // The identity is the reviewed token's namespace and service account: nothing the
            // caller writes in the request or the CSR can change it.
            // A malformed CSR costs no review.
            if let Err(e) = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem) {
                return Err(refuse(
                    "bad_csr",
                    Status::invalid_argument(format!("CSR: {e}")),
                ));
            }
            use crate::kubernetes::identity::ReviewError;
            let (namespace, account) = match client.review(&req.token).await {
                Ok(who) => who,
                Err(e @ ReviewError::Api(_)) => {
                    return Err(refuse(
                        "token_review_failed",
                        Status::unavailable(e.to_string()),
                    ))
                }
                Err(e @ ReviewError::Busy) => {
                    return Err(refuse("busy", Status::resource_exhausted(e.to_string())))
                }
                Err(e) => return Err(refuse("bad_token", Status::unauthenticated(e.to_string()))),
            };
            let identity = meshflow_policies::SpiffeId::new(
                &state.mesh.spec.trust_domain,
                &namespace,
                &account,
            )
            .map_err(|e| refuse("bad_identity", Status::invalid_argument(e.to_string())))?;
            // The control plane's own identity is never issued: sidecars trust the control
            // plane by it (as in local mode, where no workload may have it).
            if namespace == meshflow_policies::mesh::CONTROL_PLANE_NAMESPACE
                && account == meshflow_policies::mesh::CONTROL_PLANE_SERVICE_ACCOUNT
            {
                return Err(refuse(
                    "reserved_identity",
                    Status::permission_denied(format!(
                        "{identity} is the control plane's own identity"
                    )),
                ));
            }
            return self.issue(&req.csr_pem, &identity, refuse);
        }
        let Some(workload) = state.mesh.workload(&req.workload) else {
            return Err(refuse(
                "unknown_workload",
                Status::not_found(format!("no workload {:?} in the mesh", req.workload)),
            ));
        };
        if !self.tokens.verify(&req.workload, &req.token) {
            return Err(refuse(
                "bad_token",
                Status::unauthenticated("bootstrap token does not match this workload"),
            ));
        }
        let identity = workload
            .spiffe_id(&state.mesh.spec.trust_domain)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.issue(&req.csr_pem, &identity, refuse)
    }
}

impl Services {
    /// Signs `csr_pem` for `identity`; `refuse` counts and logs a refusal. (tonic's `Status`
    /// is the gRPC handler's own error type.)
    #[allow(clippy::result_large_err)]
    fn issue(
        &self,
        csr_pem: &str,
        identity: &meshflow_policies::SpiffeId,
        refuse: impl Fn(&str, Status) -> Status,
    ) -> Result<Response<CertifyResponse>, Status> {
        match self.ca.sign_csr(csr_pem, identity) {
            Ok(issued) => {
                self.metrics.certificates_issued.inc();
                tracing::info!(identity = %identity, serial = %issued.serial_hex, "issued SVID");
                Ok(Response::new(CertifyResponse {
                    cert_chain_pem: issued.cert_chain_pem,
                    trust_bundle_pem: self.ca.trust_bundle_pem().to_string(),
                    not_before_unix: unix(issued.not_before),
                    not_after_unix: unix(issued.not_after),
                    issued_at_unix: unix(issued.issued_at),
                }))
            }
            Err(e @ CaError::UnprovenSan { .. }) => Err(refuse(
                "unproven_san",
                Status::permission_denied(e.to_string()),
            )),
            Err(e @ CaError::BadCsr(_)) => {
                Err(refuse("bad_csr", Status::invalid_argument(e.to_string())))
            }
            // FAILED_PRECONDITION means exactly this to sidecars (reason `issuer_expired`).
            Err(e @ CaError::Expired { .. }) => Err(refuse(
                "issuer_expired",
                Status::failed_precondition(e.to_string()),
            )),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

/// Longest ServiceAccount token `Certify` sends for review (Kubernetes mode).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Registrations one workload may hold at once (sidecar instances in local mode).
pub const MAX_ENDPOINTS_PER_WORKLOAD: usize = 64;

/// How long a new Watch stream may take to send its `Hello`.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<v1::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Config for Services {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Some(leaf) = request.peer_certs().and_then(|c| c.first().cloned()) else {
            self.metrics
                .watch_refused
                .with_label_values(&["no_client_certificate"])
                .inc();
            return Err(Status::unauthenticated(
                "Watch requires the workload's SVID",
            ));
        };
        let Some(identity) = meshflow_policies::spiffe::from_certificate_der(leaf.as_ref()) else {
            self.metrics
                .watch_refused
                .with_label_values(&["unknown_identity"])
                .inc();
            return Err(Status::unauthenticated(
                "client certificate has no single SPIFFE ID",
            ));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))?;
        let hello = match first? {
            Some(WatchRequest {
                kind: Some(watch_request::Kind::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "first Watch message must be Hello",
                ))
            }
        };
        let state = self.state.current();
        let trust_domain = state.mesh.spec.trust_domain.clone();
        // In Kubernetes a service account is shared by many pods, which policies tell apart by
        // their labels: the sidecar must name its pod.
        if self.token_review.is_some() && hello.workload.is_empty() {
            self.metrics
                .watch_refused
                .with_label_values(&["no_workload"])
                .inc();
            return Err(Status::invalid_argument(
                "Hello must name the sidecar's pod (<namespace>/<pod>) in Kubernetes mode",
            ));
        }
        // The identity picks the workload; Hello may not claim someone else's.
        let workload = state
            .mesh
            .spec
            .workloads
            .iter()
            .find(|w| {
                (hello.workload.is_empty() || w.key() == hello.workload)
                    && w.spiffe_id(&trust_domain).is_ok_and(|id| id == identity)
            })
            .map(|w| w.key());
        let Some(workload) = workload else {
            self.metrics
                .watch_refused
                .with_label_values(&["unknown_identity"])
                .inc();
            return Err(Status::permission_denied(format!(
                "{identity} is not a workload of this mesh"
            )));
        };
        // In Kubernetes the endpoints are the cluster's (ready pods): `Hello` registers none.
        let register = self.token_review.is_none() && !hello.inbound_address.is_empty();
        if register {
            let valid = hello
                .inbound_address
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| !a.ip().is_unspecified() && a.port() != 0);
            if !valid {
                self.metrics
                    .watch_refused
                    .with_label_values(&["bad_address"])
                    .inc();
                return Err(Status::invalid_argument(format!(
                    "inbound address {:?} is not an ip:port",
                    hello.inbound_address.chars().take(64).collect::<String>()
                )));
            }
            if self.state.endpoint_count(&workload) >= MAX_ENDPOINTS_PER_WORKLOAD {
                self.metrics
                    .watch_refused
                    .with_label_values(&["too_many_endpoints"])
                    .inc();
                return Err(Status::resource_exhausted(format!(
                    "{workload} already has {MAX_ENDPOINTS_PER_WORKLOAD} registered endpoints"
                )));
            }
        }
        tracing::info!(%workload, %identity, inbound = %hello.inbound_address, "sidecar connected");

        let (tx, rx) = mpsc::channel(4);
        let services = self.clone();
        let connection = self.proxies.connect(&workload, &identity.uri());
        tokio::spawn(async move {
            services.metrics.connected_proxies.inc();
            if register {
                services
                    .state
                    .add_endpoint(&workload, &hello.inbound_address);
            }
            services
                .serve_watch(&workload, inbound, tx, &connection)
                .await;
            drop(connection);
            if register {
                services
                    .state
                    .release_endpoint(&workload, &hello.inbound_address);
            }
            services.metrics.connected_proxies.dec();
            tracing::info!(%workload, "sidecar disconnected");
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as SnapshotStream
        ))
    }
}

impl Services {
    async fn serve_watch(
        &self,
        workload: &str,
        mut inbound: Streaming<WatchRequest>,
        tx: mpsc::Sender<Result<v1::Snapshot, Status>>,
        connection: &crate::proxies::Connection,
    ) {
        let mut updates = self.state.subscribe();
        // The version sent last and when, for the push latency observed at its ack.
        let mut in_flight: Option<(u64, std::time::Instant)>;
        loop {
            let snapshot = updates.borrow_and_update().snapshot_for(workload);
            let Some(snapshot) = snapshot else {
                let _ = tx
                    .send(Err(Status::not_found("workload removed from the mesh")))
                    .await;
                return;
            };
            let version = snapshot.version;
            let sent = std::time::Instant::now();
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            in_flight = Some((version, sent));
            connection.sent(version);
            self.metrics.config_pushes.inc();
            loop {
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() { return; }
                        break;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(WatchRequest { kind: Some(watch_request::Kind::Ack(ack)) })) => {
                            let result = if ack.accepted { "accepted" } else { "rejected" };
                            if let Some((version, sent)) = in_flight {
                                if version == ack.version {
                                    self.metrics.config_push_duration.observe(sent.elapsed().as_secs_f64());
                                    in_flight = None;
                                }
                            }
                            self.metrics.config_acks.with_label_values(&[result]).inc();
                            connection.acked(ack.version, ack.accepted, &ack.reason);
                            if !ack.accepted {
                                tracing::warn!(%workload, version = ack.version, reason = %ack.reason, "sidecar rejected config");
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return,
                    },
                }
            }
        }
    }
}
