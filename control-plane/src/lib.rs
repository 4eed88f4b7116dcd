//! meshflow control plane: the mesh CA (SPIFFE X.509-SVIDs), the gRPC config server that
//! streams per-workload snapshots, and the local mesh-file config source.
//!
//! [`run`] is the whole process; `main.rs` only parses flags and calls it.

pub mod admin;
pub mod ca;
pub mod injector;
pub mod jwks;
pub mod kubernetes;
pub mod metrics;
pub mod proxies;
pub mod server;
pub mod state;
pub mod tokens;
/// The workflow coordinator (crate `meshflow-coordinator`), run inside this binary.
pub use meshflow_coordinator as workflow;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshflow_api::v1::{config_server::ConfigServer, identity_server::IdentityServer};
use meshflow_api::ReadyFile;
use meshflow_policies::mesh::MeshFile;
use meshflow_policies::SpiffeId;
use prometheus::Registry;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Control-plane settings (flags over `MESHFLOW_…` env over defaults).
#[derive(Debug, Clone, clap::Parser, serde::Serialize)]
#[command(
    name = "meshflow-control-plane",
    version,
    about = "meshflow control plane"
)]
pub struct ControlPlaneConfig {
    /// Local mesh definition (kind: Mesh) to serve; changes are pushed within 1 s. Required
    /// unless `--kubernetes`.
    #[arg(
        long,
        env = "MESHFLOW_MESH",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub mesh: Option<PathBuf>,
    /// Take workloads, services, endpoints and policies from the Kubernetes API (in-cluster
    /// config, else `KUBECONFIG`) instead of a mesh file; `Certify` is then authenticated by
    /// ServiceAccount tokens (TokenReview, audience `meshflow`).
    #[arg(long, env = "MESHFLOW_KUBERNETES", default_value_t = false)]
    pub kubernetes: bool,
    /// Kubernetes mode: the control plane's namespace (its Lease and CA Secret; policies in it
    /// apply mesh-wide only when it is `meshflow-system`).
    #[arg(long, env = "MESHFLOW_NAMESPACE", default_value = "meshflow-system")]
    pub namespace: String,
    /// Kubernetes mode: this replica's name in the leader Lease (the pod name). Default: the
    /// host name and process id.
    #[arg(long, env = "MESHFLOW_POD_NAME")]
    pub pod_name: Option<String>,
    /// Kubernetes mode: the SPIFFE trust domain.
    #[arg(long, env = "MESHFLOW_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Kubernetes mode: the Secret (in `--namespace`) holding the mesh CA (`ca.crt`, `ca.key`,
    /// optional `ca-bundle.crt`); generated and stored there when absent.
    #[arg(long, env = "MESHFLOW_CA_SECRET", default_value = "meshflow-ca")]
    pub ca_secret: String,
    /// Kubernetes mode: only namespaces with this label (`key=value`) are part of the mesh
    /// (Istio's discoverySelectors). Default: every namespace.
    #[arg(long, env = "MESHFLOW_DISCOVERY_SELECTOR")]
    pub discovery_selector: Option<String>,
    /// Kubernetes mode: the port sidecars accept inbound mTLS on, where a pod does not annotate
    /// its own (`meshflow.io/inbound-port`).
    #[arg(long, env = "MESHFLOW_SIDECAR_INBOUND_PORT", default_value_t = 15006)]
    pub sidecar_inbound_port: u16,
    /// Kubernetes mode: the leader Lease's duration (renewed every third of it); a dead
    /// leader's replacement writes status within about this long.
    #[arg(long, env = "MESHFLOW_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// State directory: CA, tokens, bootstrap files, the bound address.
    #[arg(long, env = "MESHFLOW_STATE_DIR")]
    pub state_dir: PathBuf,
    /// gRPC (TLS) listen address. With port 0 the first start picks a port and later starts
    /// reuse it (kept in `<state>/control-plane.addr`).
    #[arg(long, env = "MESHFLOW_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Admin listen address (`/metrics`, `/ready`, `/config_dump`).
    #[arg(long, env = "MESHFLOW_ADMIN", default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// Leaf certificate TTL, e.g. `24h`, `10s`.
    #[arg(long, env = "MESHFLOW_LEAF_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub leaf_ttl: Duration,
    /// User-supplied CA certificate (root or intermediate), PEM. Default: a generated root.
    #[arg(long, env = "MESHFLOW_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Key of `--ca-cert`, PEM.
    #[arg(long, env = "MESHFLOW_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Trust bundle (roots) when `--ca-cert` is an intermediate, PEM.
    #[arg(long, env = "MESHFLOW_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Written once serving: bound addresses as JSON.
    #[arg(long, env = "MESHFLOW_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Run the workflow coordinator and serve its HTTP API here (`127.0.0.1:0`: any free
    /// port; the ready file names it as `workflow-api`). Absent: no coordinator.
    #[arg(long, env = "MESHFLOW_WORKFLOW_API")]
    pub workflow_api: Option<SocketAddr>,
    /// The coordinator's outbound sidecar (`host:port`): every step call goes through it, so
    /// it gets mTLS, authorization and mesh retries.
    #[arg(long, env = "MESHFLOW_WORKFLOW_OUTBOUND")]
    pub workflow_outbound: Option<String>,
    /// Instead of `--workflow-outbound`: the coordinator's sidecar's ready file (JSON, its
    /// `outbound` address), read until it names a sidecar that accepts connections and again
    /// whenever connecting fails — so the sidecar binds its own port (port 0) and may restart.
    #[arg(
        long,
        env = "MESHFLOW_WORKFLOW_OUTBOUND_READY_FILE",
        conflicts_with = "workflow_outbound"
    )]
    pub workflow_outbound_ready_file: Option<PathBuf>,
    /// Workflow store URL: `sqlite:///abs/path.db` or `postgres://…`. Default: SQLite
    /// `<state-dir>/workflows.db`.
    #[arg(long, env = "MESHFLOW_WORKFLOW_STORE")]
    pub workflow_store: Option<String>,
    /// Group commit: the most run writes (starts and step transitions of different runs) one
    /// store transaction — one fsync — carries. 1: every write its own transaction.
    #[arg(long, env = "MESHFLOW_WORKFLOW_COMMIT_BATCH", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workflow_commit_batch: u32,
    /// How long finished runs are kept (e.g. `7d`).
    #[arg(long, env = "MESHFLOW_WORKFLOW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub workflow_retention: Duration,
    /// Coordinator id for run leases (default: kept in `<state-dir>/workflow-node`, random on
    /// first start). Coordinators sharing a PostgreSQL store need different ids.
    #[arg(long, env = "MESHFLOW_WORKFLOW_NODE")]
    pub workflow_node: Option<String>,
    /// Run lease: a coordinator that has not renewed for this long loses its runs to another
    /// (renewed every third of it).
    #[arg(long, env = "MESHFLOW_WORKFLOW_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub workflow_lease: Duration,
    /// Callers that may wait for runs at once (`?wait=` on starting or reading a run); one
    /// more is answered 429 and counted.
    #[arg(long, env = "MESHFLOW_WORKFLOW_MAX_WAITERS", default_value_t = workflow::coordinator::MAX_WAITERS)]
    pub workflow_max_waiters: usize,
    /// OTLP/gRPC trace collector for workflow run spans, e.g. `http://127.0.0.1:4317`.
    /// Default: no export.
    #[arg(long, env = "MESHFLOW_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Probability (0.0–1.0) that a run started without a client trace is sampled.
    #[arg(long, env = "MESHFLOW_TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// Kubernetes mode: the sidecar-injection webhook (`--injector-…`) and what injected pods
    /// get (`--proxy-…`, `--native-sidecar`).
    #[command(flatten)]
    pub injector: injector::InjectorConfig,
}

/// Errors that stop the control plane at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The mesh file or flags are invalid (exit code 64).
    #[error("{0}")]
    Config(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn other<E: std::fmt::Display>(e: E) -> StartError {
    StartError::Other(e.to_string())
}

/// The file (in the state dir, mode 0600) holding the secret with which the coordinator's
/// sidecar vouches for workflow API callers ([`meshflow_api::SIDECAR_AUTH_HEADER`]). Kept
/// across restarts, so a sidecar that outlives a control-plane restart stays valid.
pub const COORDINATOR_SECRET_FILE: &str = "workflow-sidecar-secret";

/// The secret in `path`, or a new one (32 random bytes, hex) written there with mode 0600.
fn read_or_create_secret(path: &std::path::Path) -> Result<String, StartError> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => Ok(s.trim().to_string()),
        _ => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            ca::write_private(path, secret.as_bytes()).map_err(other)?;
            Ok(secret)
        }
    }
}

/// Opens the workflow store, recovers in-flight runs and serves the workflow API on `addr`.
/// The API token is `<state-dir>/workflow-api-token` (created, mode 0600); `sidecar_secret`
/// is the one the coordinator's sidecar sends (see [`workflow::api`]).
async fn start_coordinator(
    config: &ControlPlaneConfig,
    addr: SocketAddr,
    registry: &Registry,
    sidecar_secret: Option<String>,
    state: state::StateHandle,
) -> Result<
    (
        SocketAddr,
        meshflow_telemetry::Tracing,
        Arc<workflow::coordinator::Coordinator>,
    ),
    StartError,
> {
    use workflow::coordinator::{Coordinator, CoordinatorSettings};
    // Callers reach the API through the coordinator's sidecar or with the token: never expose
    // it beyond loopback.
    if !addr.ip().is_loopback() {
        return Err(StartError::Config(format!(
            "--workflow-api {addr}: must be a loopback address (reach it through the coordinator's sidecar)"
        )));
    }
    let url = config.workflow_store.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            config.state_dir.join("workflows.db").display()
        )
    });
    let metrics = workflow::metrics::WorkflowMetrics::new(registry).map_err(other)?;
    let store = workflow::store::SqlStore::open_with(
        &url,
        workflow::store::StoreOptions {
            commit_batch: config.workflow_commit_batch as usize,
            batch_sizes: Some(metrics.store_transaction_writes.clone()),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| StartError::Config(format!("workflow store {url}: {e}")))?;
    let node = match &config.workflow_node {
        Some(node) => node.clone(),
        None => {
            let path = config.state_dir.join("workflow-node");
            match std::fs::read_to_string(&path) {
                Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
                _ => {
                    let n = format!("coordinator-{}", &workflow::coordinator::new_run_id()[..12]);
                    std::fs::write(&path, &n).map_err(other)?;
                    n
                }
            }
        }
    };
    let tracer = meshflow_telemetry::Tracing::new(
        &meshflow_telemetry::TraceSettings {
            otlp_endpoint: config.otlp_endpoint.clone(),
            sampling_ratio: config.trace_sampling,
            accept_b3: false,
            service_name: "meshflow-coordinator".into(),
            namespace: "meshflow-system".into(),
            instance: Some(node.clone()),
        },
        registry,
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    let coordinator = Coordinator::new(
        Arc::new(store),
        CoordinatorSettings {
            outbound: config.workflow_outbound.clone(),
            outbound_ready_file: config.workflow_outbound_ready_file.clone(),
            retention: config.workflow_retention,
            node: node.clone(),
            lease: config.workflow_lease,
            tracing: tracer.clone(),
            trace_sampling: config.trace_sampling,
            max_waiters: config.workflow_max_waiters,
        },
        metrics,
    );
    let token_path = config.state_dir.join("workflow-api-token");
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let token = workflow::coordinator::new_run_id();
            ca::write_private(&token_path, token.as_bytes()).map_err(other)?;
            token
        }
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Config(format!("bind {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(other)?;
    let resent = coordinator.recover().await.map_err(other)?;
    if resent > 0 {
        tracing::info!(
            calls = resent,
            "workflow coordinator: re-sending calls in flight at the last stop"
        );
    }
    tokio::spawn(coordinator.clone().run_timers());
    tokio::spawn(coordinator.clone().run_leases());
    tokio::spawn(coordinator.clone().run_retention());
    let app = workflow::api::router(workflow::api::ApiState {
        coordinator: coordinator.clone(),
        token: Arc::new(token),
        sidecar_secret: sidecar_secret.map(Arc::new),
        mesh_callers_governed: Arc::new(move || {
            let current = state.current();
            current
                .mesh
                .spec
                .workloads
                .iter()
                .filter(|w| w.app.builtin.is_some())
                .any(|w| {
                    current
                        .policies
                        .authorization_for(&w.namespace, &w.labels)
                        .any(|p| p.spec.action == meshflow_policies::authz::Action::Allow)
                })
        }),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("workflow API stopped: {e}");
        }
    });
    tracing::info!(api = %bound, store = %url, "workflow coordinator serving");
    Ok((bound, tracer, coordinator))
}

/// Logs the CA's expiry: a warning at start and every hour while less than the CA's warning
/// window ([`ca::CertificateAuthority::warning_window`]) remains, an error at and after expiry
/// (every Certify is then refused with `issuer_expired`).
async fn watch_ca_expiry(ca: Arc<ca::CertificateAuthority>) {
    const EVERY: Duration = Duration::from_secs(3600);
    let expires = humantime::format_rfc3339_seconds(ca.not_after()).to_string();
    let mut first = true;
    loop {
        let now = std::time::SystemTime::now();
        let next = match ca.expiry_status(now) {
            ca::CaExpiry::Valid { remaining } => {
                if std::mem::take(&mut first) {
                    tracing::info!(expires = %expires, "mesh CA valid for {}", humantime::format_duration(Duration::from_secs(remaining.as_secs())));
                }
                // Wake when the warning window opens (or in an hour, whichever is first).
                remaining.saturating_sub(ca.warning_window()).min(EVERY)
            }
            ca::CaExpiry::Soon { remaining } => {
                let capped = remaining < ca.leaf_ttl();
                tracing::warn!(
                    expires = %expires,
                    leaves_capped = capped,
                    "mesh CA expires in {}: no certificate is issued past that moment{}; \
                     rotate the CA (--ca-cert/--ca-key) before then",
                    humantime::format_duration(Duration::from_secs(remaining.as_secs())),
                    if capped { ", so leaves are already shorter than the leaf TTL" } else { "" },
                );
                // At expiry at the latest, so the error below is logged on time.
                remaining.min(EVERY)
            }
            ca::CaExpiry::Expired => {
                tracing::error!(
                    expired = %expires,
                    "mesh CA has expired: every Certify is refused (issuer_expired) and SVIDs \
                     lapse; restart the control plane with a new CA"
                );
                EVERY
            }
        };
        tokio::time::sleep(next.max(Duration::from_secs(1))).await;
    }
}

/// The mesh a Kubernetes-mode control plane starts from: no workloads until the cluster has
/// been read.
fn kubernetes_mesh(trust_domain: &str) -> MeshFile {
    MeshFile {
        api_version: meshflow_policies::mesh::API_VERSION.into(),
        kind: "Mesh".into(),
        metadata: meshflow_policies::mesh::ObjectMeta {
            name: "kubernetes".into(),
            ..Default::default()
        },
        spec: meshflow_policies::mesh::MeshSpec {
            trust_domain: trust_domain.into(),
            workloads: Vec::new(),
            policies_dir: None,
            smoke: None,
        },
    }
}

/// Runs the control plane until `shutdown` resolves.
///
/// # Errors
/// [`StartError::Config`] for an invalid mesh file or an unusable CA (expired or not yet valid
/// chain, a key that is not the certificate's, a certificate that is not a CA);
/// [`StartError::Other`] for I/O or TLS failures.
pub async fn run(
    config: ControlPlaneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    if let Some(selector) = &config.discovery_selector {
        kubernetes::check_selector(selector)
            .map_err(|e| StartError::Config(format!("--discovery-selector: {e}")))?;
    }
    if config.injector.injector_listen.is_some() && !config.kubernetes {
        return Err(StartError::Config(
            "--injector-listen: the injection webhook needs --kubernetes".into(),
        ));
    }
    let kube_client = if config.kubernetes {
        Some(kube::Client::try_default().await.map_err(|e| {
            StartError::Config(format!(
                "--kubernetes: no cluster to talk to (in-cluster config or KUBECONFIG): {e}"
            ))
        })?)
    } else {
        None
    };
    let (mesh, policies, mesh_policies_dir) = match &config.mesh {
        Some(mesh_path) if kube_client.is_none() => {
            let text = std::fs::read_to_string(mesh_path)
                .map_err(|e| StartError::Config(format!("{}: {e}", mesh_path.display())))?;
            let mesh =
                MeshFile::parse(mesh_path, &text).map_err(|e| StartError::Config(e.to_string()))?;
            let files = match mesh.policies_dir(mesh_path) {
                Some(dir) => meshflow_policies::documents::read_dir_texts(&dir)
                    .map_err(|e| StartError::Config(e.to_string()))?,
                None => Vec::new(),
            };
            let (mesh, policies) = state::load_config(mesh_path, &text, &files)
                .map_err(|e| StartError::Config(e.to_string()))?;
            let dir = mesh.policies_dir(mesh_path);
            (mesh, policies, dir)
        }
        _ => (
            kubernetes_mesh(&config.trust_domain),
            meshflow_policies::documents::PolicySet::default(),
            None,
        ),
    };
    std::fs::create_dir_all(&config.state_dir).map_err(other)?;
    let trust_domain = mesh.spec.trust_domain.clone();
    let ca = match (&config.ca_cert, &config.ca_key, &kube_client) {
        (Some(cert), Some(key), _) => ca::CertificateAuthority::from_files(
            cert,
            key,
            config.ca_bundle.as_deref(),
            config.leaf_ttl,
        ),
        (_, _, Some(client)) => {
            // The API server may not answer yet (or RBAC not be in place): keep asking; only
            // an unusable Secret is a configuration error.
            let mut wait = Duration::from_millis(250);
            loop {
                match kubernetes::ca_secret::load_or_create(
                    client,
                    &config.namespace,
                    &config.ca_secret,
                    &config.state_dir.join("ca"),
                    &trust_domain,
                    config.leaf_ttl,
                )
                .await
                {
                    Ok(ca) => break Ok(ca),
                    Err(kubernetes::ca_secret::CaSecretError::Api(e)) => {
                        tracing::warn!(error = %e, "reading the CA Secret; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    Err(kubernetes::ca_secret::CaSecretError::Material(message)) => {
                        break Err(ca::CaError::BadMaterial {
                            what: format!("--ca-secret {}", config.ca_secret),
                            message,
                        })
                    }
                }
            }
        }
        _ => ca::CertificateAuthority::load_or_generate(
            &config.state_dir.join("ca"),
            &trust_domain,
            config.leaf_ttl,
        ),
    }
    .map_err(|e| match e {
        // An unusable CA is a configuration problem (exit 64), and the message says why: an
        // expired or not yet valid chain, a key that is not the certificate's, a certificate
        // that may not issue certificates, unparsable files or an unusable CA Secret.
        e @ (ca::CaError::Expired { .. }
        | ca::CaError::NotYetValid { .. }
        | ca::CaError::BadMaterial { .. }) => StartError::Config(e.to_string()),
        e => other(e),
    })?;
    let ca = Arc::new(ca);

    let registry = Registry::new();
    let metrics = metrics::ControlPlaneMetrics::new(&registry).map_err(other)?;
    metrics.ca_expiration.set(
        ca.not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    );
    tokio::spawn(watch_ca_expiry(ca.clone()));

    // Same address after a restart, so bootstrap files and sidecars stay valid.
    let addr_file = config.state_dir.join("control-plane.addr");
    let mut listen = config.listen;
    if listen.port() == 0 {
        if let Some(saved) = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            listen = saved;
        }
    }
    let grpc_listener = TcpListener::bind(listen).await.map_err(|e| {
        other(format!(
            "bind {listen}: {e} (another control plane on this state dir?)"
        ))
    })?;
    let grpc_addr = grpc_listener.local_addr().map_err(other)?;
    std::fs::write(&addr_file, grpc_addr.to_string()).map_err(other)?;
    let admin_listener = TcpListener::bind(config.admin).await.map_err(other)?;
    let admin_addr = admin_listener.local_addr().map_err(other)?;

    let server_identity = SpiffeId::new(
        &trust_domain,
        meshflow_policies::mesh::CONTROL_PLANE_NAMESPACE,
        meshflow_policies::mesh::CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .map_err(other)?;
    let tokens = tokens::TokenStore::open(&config.state_dir).map_err(other)?;
    let coordinator_secret = match config.workflow_api {
        Some(_) => Some(read_or_create_secret(
            &config.state_dir.join(COORDINATOR_SECRET_FILE),
        )?),
        None => None,
    };
    tokens
        .write_bootstraps(
            &config.state_dir,
            &mesh,
            &grpc_addr.to_string(),
            &server_identity.dns_name(),
            ca.trust_bundle_pem(),
            coordinator_secret.as_deref(),
        )
        .map_err(other)?;

    let state = state::StateHandle::with_persistence(
        mesh,
        ca.trust_bundle_pem(),
        config.state_dir.join("endpoints.json"),
    );
    let mut jwks = jwks::JwksResolver::new(metrics.clone());
    let mut policies = policies;
    jwks.resolve(&mut policies, mesh_policies_dir.as_deref())
        .await;
    tracing::info!(
        policies_dir = ?mesh_policies_dir,
        authorization_policies = policies.authorization.len(),
        request_authentications = policies.request_authentication.len(),
        peer_authentications = policies.peer_authentication.len(),
        traffic_policies = policies.traffic.len(),
        "policies loaded"
    );
    state.set_config(MeshFile::clone(&state.current().mesh), policies);
    {
        let state = state.clone();
        tokio::spawn(state.maintain_endpoints());
    }
    let last_error = Arc::new(Mutex::new(None));
    let mut jwks = Some(jwks);
    if let (Some(mesh_path), None) = (&config.mesh, &kube_client) {
        tokio::spawn(
            state::MeshFileWatcher::new(mesh_path, jwks.take().expect("one watcher")).run(
                state.clone(),
                metrics.clone(),
                last_error.clone(),
                Duration::from_millis(250),
            ),
        );
    }
    // New workloads in a changed mesh file get tokens and bootstrap files too.
    if kube_client.is_none() {
        let mut updates = state.subscribe();
        let (tokens, state_dir, ca) = (tokens.clone(), config.state_dir.clone(), ca.clone());
        let coordinator_secret = coordinator_secret.clone();
        let server_name = server_identity.dns_name();
        tokio::spawn(async move {
            let mut last_mesh = updates.borrow().mesh.clone();
            while updates.changed().await.is_ok() {
                let mesh = updates.borrow_and_update().mesh.clone();
                // Endpoint changes bump the version too; bootstrap files depend on the mesh only.
                if Arc::ptr_eq(&mesh, &last_mesh) {
                    continue;
                }
                last_mesh = mesh.clone();
                if let Err(e) = tokens.write_bootstraps(
                    &state_dir,
                    &mesh,
                    &grpc_addr.to_string(),
                    &server_name,
                    ca.trust_bundle_pem(),
                    coordinator_secret.as_deref(),
                ) {
                    tracing::error!(error = %e, "cannot write bootstrap files");
                }
            }
        });
    }
    // `/ready` answers 200 once config is being served: at once from a mesh file, after the
    // first complete read of the cluster in Kubernetes mode.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(kube_client.is_none()));
    let proxies = Arc::new(proxies::Proxies::default());
    tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            registry: registry.clone(),
            state: state.clone(),
            last_error,
            settings: Arc::new(serde_json::to_value(&config).unwrap_or_default()),
            ready: ready.clone(),
            proxies: proxies.clone(),
        },
    ));

    let (cert_pem, key_pem) = ca.issue_server_cert(&server_identity).map_err(other)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca.trust_bundle_pem()))
        .client_auth_optional(true);
    let services_ca = ca.clone();
    let services = server::Services {
        ca,
        tokens,
        state: state.clone(),
        metrics,
        token_review: kube_client
            .clone()
            .map(kubernetes::identity::TokenReviewer::new),
        proxies,
    };
    let server = Server::builder()
        .tls_config(tls)
        .map_err(other)?
        .add_service(IdentityServer::new(services.clone()))
        .add_service(ConfigServer::new(services));

    let (workflow_addr, workflow_tracing, coordinator) = match config.workflow_api {
        Some(addr) => {
            let (addr, tracing, coordinator) = start_coordinator(
                &config,
                addr,
                &registry,
                coordinator_secret.clone(),
                state.clone(),
            )
            .await?;
            (Some(addr), Some(tracing), Some(coordinator))
        }
        None => (None, None, None),
    };
    let injector_addr = match &kube_client {
        Some(client) => {
            injector::start(
                &config.injector,
                injector::InjectorContext {
                    client: client.clone(),
                    ca: services_ca.clone(),
                    namespace: &config.namespace,
                    trust_domain: &trust_domain,
                    discovery_selector: config.discovery_selector.clone(),
                    registry: &registry,
                },
            )
            .await?
        }
        None => None,
    };
    if let Some(client) = kube_client {
        // The ready file below means "serving the cluster's config": read it first.
        let holder = config.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        kubernetes::start(
            client,
            kubernetes::KubeSettings {
                trust_domain: trust_domain.clone(),
                namespace: config.namespace.clone(),
                holder,
                discovery_selector: config.discovery_selector.clone(),
                sidecar_inbound_port: config.sidecar_inbound_port,
                lease_duration: config.lease_duration,
            },
            state.clone(),
            &registry,
            coordinator,
            jwks.take()
                .expect("the Kubernetes source's resolver")
                .without_files(),
            ready.clone(),
        )
        .await
        .map_err(other)?;
    }
    if let Some(ready) = &config.ready_file {
        let mut file = ReadyFile {
            pid: std::process::id(),
            ..Default::default()
        };
        if let Some(addr) = workflow_addr {
            file.addresses
                .insert("workflow-api".into(), addr.to_string());
        }
        if let Some(addr) = injector_addr {
            file.addresses.insert("injector".into(), addr.to_string());
        }
        file.addresses.insert("grpc".into(), grpc_addr.to_string());
        file.addresses
            .insert("admin".into(), admin_addr.to_string());
        file.write(ready).map_err(other)?;
    }
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "control plane serving");
    // Open Watch streams would hold a graceful shutdown until every sidecar hangs up; give
    // them one second, then stop (sidecars keep their last config and reconnect).
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = server.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
        async move {
            shutdown.await;
            state.freeze();
            let _ = stopping_tx.send(());
        },
    );
    let result = tokio::select! {
        result = serve => result.map_err(other),
        () = async move {
            let _ = stopping_rx.await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } => Ok(()),
    };
    // Spans still queued (e.g. the run spans of the last commits) go out before exit.
    if let Some(tracing) = workflow_tracing {
        let _ = tokio::task::spawn_blocking(move || tracing.flush(Duration::from_secs(2))).await;
    }
    result
}
