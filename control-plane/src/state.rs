//! Control-plane state: the last good mesh definition, registered endpoints and the config
//! version, published to every `Watch` stream through a `tokio::sync::watch` channel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshflow_api::v1;
use meshflow_policies::documents::{read_dir_texts, PolicySet};
use meshflow_policies::mesh::{AppProtocol, MeshFile};
use meshflow_policies::LoadError;
use tokio::sync::watch;

use crate::jwks::{JwksResolver, JWKS_REFRESH};
use crate::metrics::ControlPlaneMetrics;

/// One consistent view of the mesh that snapshots are built from.
#[derive(Debug, Clone)]
pub struct MeshState {
    /// Version of this view; strictly increasing, also across restarts (it starts at the Unix
    /// time in ms).
    pub version: u64,
    /// The last mesh file that parsed and validated.
    pub mesh: Arc<MeshFile>,
    /// Inbound addresses registered by connected sidecars, by workload key.
    pub endpoints: BTreeMap<String, BTreeSet<String>>,
    /// Trust bundle PEM.
    pub trust_bundle_pem: Arc<str>,
    /// The last policy directory that parsed and validated.
    pub policies: Arc<PolicySet>,
    /// Kubernetes mode: the services and their endpoints as the cluster has them (ready pods
    /// from EndpointSlices), by (namespace, name). `None` in local mode, where services come
    /// from the mesh file's workloads and the endpoints their sidecars register.
    pub discovered: Option<Arc<BTreeMap<(String, String), v1::Service>>>,
}

impl MeshState {
    /// The snapshot for workload `key`, or `None` when the mesh has no such workload.
    pub fn snapshot_for(&self, key: &str) -> Option<v1::Snapshot> {
        let spec = &self.mesh.spec;
        let me = self.mesh.workload(key)?;
        let spiffe_id = me.spiffe_id(&spec.trust_domain).ok()?;
        let mut services: BTreeMap<(String, String), v1::Service> = BTreeMap::new();
        if let Some(discovered) = &self.discovered {
            services = BTreeMap::clone(discovered);
        }
        for w in spec.workloads.iter().filter(|_| self.discovered.is_none()) {
            let service = services
                .entry((w.namespace.clone(), w.service().to_string()))
                .or_insert_with(|| v1::Service {
                    name: w.service().to_string(),
                    namespace: w.namespace.clone(),
                    protocol: match w.app.protocol {
                        AppProtocol::Http1 => "http1",
                        AppProtocol::H2c => "h2c",
                        AppProtocol::Grpc => "grpc",
                    }
                    .to_string(),
                    endpoints: Vec::new(),
                    // Local mode has no cluster IPs: services are called by name.
                    cluster_ips: Vec::new(),
                    ports: Vec::new(),
                    // Every workload of a mesh file runs a sidecar.
                    unmeshed: false,
                });
            let Ok(identity) = w.spiffe_id(&spec.trust_domain) else {
                continue;
            };
            for address in self.endpoints.get(&w.key()).into_iter().flatten() {
                service.endpoints.push(v1::Endpoint {
                    address: address.clone(),
                    identity: identity.uri(),
                    workload: w.key(),
                });
            }
        }
        Some(v1::Snapshot {
            version: self.version,
            workload: key.to_string(),
            spiffe_id: spiffe_id.uri(),
            trust_bundle_pem: self.trust_bundle_pem.to_string(),
            services: services.into_values().collect(),
            policies_json: self
                .policies
                .authorization_for(&me.namespace, &me.labels)
                .filter_map(|p| serde_json::to_string(p).ok())
                .collect(),
            traffic_policies_json: self
                .policies
                .traffic
                .iter()
                .filter_map(|p| serde_json::to_string(p).ok())
                .collect(),
            request_authentications_json: self
                .policies
                .request_authentication_for(&me.namespace, &me.labels)
                .filter_map(|p| serde_json::to_string(p).ok())
                .collect(),
            peer_authentications_json: self
                .policies
                .peer_authentication_for(&me.namespace, &me.labels)
                .filter_map(|p| serde_json::to_string(p).ok())
                .collect(),
        })
    }
}

/// Shared, versioned mesh state. Cheap to clone.
///
/// Endpoint registrations are persisted (`<state>/endpoints.json`, each with the Unix ms its
/// sidecar was last seen connected) so that a restarted control plane serves the endpoints it
/// knew at once instead of empty services. Entries loaded from disk are *stale* until their
/// sidecar reconnects: one whose address refuses connections is dropped at once
/// ([`StateHandle::probe_stale`]), and any other is dropped [`STALE_ENDPOINT_GRACE`] after its
/// sidecar was *last seen* — not after this start, so quick restarts never pile up dead
/// registrations.
#[derive(Clone)]
pub struct StateHandle {
    tx: Arc<watch::Sender<Arc<MeshState>>>,
    persist: Option<PathBuf>,
    /// Loaded registrations whose sidecar has not reconnected: (key, address) → last seen ms.
    stale: Arc<std::sync::Mutex<BTreeMap<(String, String), u64>>>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Open streams per registration: a reconnecting sidecar re-registers before its old,
    /// half-open stream ends, and that end must not remove the new registration.
    registrations: Arc<std::sync::Mutex<BTreeMap<(String, String), u32>>>,
    save_lock: Arc<std::sync::Mutex<()>>,
}

/// How long after its sidecar was last seen a persisted endpoint is served without the sidecar
/// reconnecting.
pub const STALE_ENDPOINT_GRACE: Duration = Duration::from_secs(30);

/// How often live registrations' "last seen" time is written to disk (and stale ones checked).
pub const ENDPOINT_REFRESH: Duration = Duration::from_secs(5);

/// `endpoints.json`: workload key → address → last seen, Unix ms.
type PersistedEndpoints = BTreeMap<String, BTreeMap<String, u64>>;

/// Reads `endpoints.json`; the older format (key → addresses) counts as seen at the file's
/// modification time. Unreadable → empty.
fn load_endpoints(path: &Path) -> PersistedEndpoints {
    let Ok(bytes) = std::fs::read(path) else {
        return PersistedEndpoints::new();
    };
    if let Ok(current) = serde_json::from_slice::<PersistedEndpoints>(&bytes) {
        return current;
    }
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    serde_json::from_slice::<BTreeMap<String, BTreeSet<String>>>(&bytes)
        .map(|old| {
            old.into_iter()
                .map(|(key, addresses)| {
                    (key, addresses.into_iter().map(|a| (a, modified)).collect())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl StateHandle {
    /// Starts with `mesh` (and no policies) at version = now in ms.
    pub fn new(mesh: MeshFile, trust_bundle_pem: &str) -> Self {
        let state = MeshState {
            version: now_ms(),
            mesh: Arc::new(mesh),
            endpoints: BTreeMap::new(),
            trust_bundle_pem: Arc::from(trust_bundle_pem),
            policies: Arc::new(PolicySet::default()),
            discovered: None,
        };
        Self {
            tx: Arc::new(watch::channel(Arc::new(state)).0),
            persist: None,
            stale: Arc::default(),
            frozen: Arc::default(),
            registrations: Arc::default(),
            save_lock: Arc::default(),
        }
    }

    /// Like [`StateHandle::new`], loading and persisting endpoint registrations at `path`.
    /// Entries last seen more than [`STALE_ENDPOINT_GRACE`] ago are not loaded.
    pub fn with_persistence(mesh: MeshFile, trust_bundle_pem: &str, path: PathBuf) -> Self {
        let mut handle = Self::new(mesh, trust_bundle_pem);
        let now = now_ms();
        let grace = STALE_ENDPOINT_GRACE.as_millis() as u64;
        let mut endpoints: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        {
            let mut stale = handle.stale.lock().unwrap_or_else(|e| e.into_inner());
            for (key, addresses) in load_endpoints(&path) {
                for (address, seen) in addresses {
                    if seen.saturating_add(grace) <= now {
                        tracing::info!(workload = %key, %address, "not serving an endpoint whose sidecar was last seen more than {}s ago", grace / 1000);
                        continue;
                    }
                    stale.insert((key.clone(), address.clone()), seen);
                    endpoints.entry(key.clone()).or_default().insert(address);
                }
            }
        }
        handle.tx.send_modify(|state| {
            let mut next = MeshState::clone(state);
            next.endpoints = endpoints;
            *state = Arc::new(next);
        });
        handle.persist = Some(path);
        handle
    }

    /// Endpoints loaded from disk whose sidecar has not reconnected yet.
    pub fn stale_count(&self) -> usize {
        self.stale.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drops loaded endpoints whose sidecar was last seen [`STALE_ENDPOINT_GRACE`] ago or more
    /// and has not reconnected.
    pub fn expire_stale(&self) {
        let now = now_ms();
        let grace = STALE_ENDPOINT_GRACE.as_millis() as u64;
        let expired: Vec<(String, String)> = {
            let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
            let expired: Vec<(String, String)> = stale
                .iter()
                .filter(|(_, seen)| seen.saturating_add(grace) <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                stale.remove(id);
            }
            expired
        };
        for (key, address) in expired {
            if self.remove_unless_registered(&key, &address) {
                tracing::info!(workload = %key, %address, "dropping endpoint whose sidecar did not reconnect");
            }
        }
    }

    /// Tries a TCP connection to every stale endpoint (local mode: endpoints are sidecars'
    /// inbound `ip:port`); one that is refused (nothing listens: its sidecar is gone) is dropped
    /// at once instead of being served until its grace ends. A timeout proves nothing and
    /// keeps the entry.
    pub async fn probe_stale(&self) {
        let stale: Vec<(String, String)> = self
            .stale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for (key, address) in stale {
            let probe = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(&address),
            )
            .await;
            // Only a refusal proves nothing listens; unreachable or out of descriptors proves
            // nothing about the sidecar.
            let refused = matches!(probe, Ok(Err(ref e)) if e.kind() == std::io::ErrorKind::ConnectionRefused);
            let id = (key.clone(), address.clone());
            // Still stale? (its sidecar may have reconnected meanwhile)
            if refused
                && self
                    .stale
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id)
                    .is_some()
                && self.remove_unless_registered(&key, &address)
            {
                tracing::info!(workload = %key, %address, "dropping endpoint: nothing listens there (its sidecar is gone)");
            }
        }
    }

    /// Until the process ends: probes and expires stale endpoints and refreshes the persisted
    /// "last seen" times of live ones, every [`ENDPOINT_REFRESH`] (stale ones every second).
    pub async fn maintain_endpoints(self) {
        let mut ticks = 0u64;
        loop {
            if self.stale_count() > 0 {
                self.probe_stale().await;
                self.expire_stale();
            }
            if ticks.is_multiple_of(ENDPOINT_REFRESH.as_secs().max(1)) {
                self.save(&self.current());
            }
            ticks += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops persisting: streams torn down by our own shutdown must not erase registrations.
    /// Writes once more first, so the sidecars connected now count as seen now.
    pub fn freeze(&self) {
        self.save(&self.current());
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn save(&self, state: &MeshState) {
        let Some(path) = &self.persist else { return };
        let _one_writer = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let now = now_ms();
        let persisted: PersistedEndpoints = {
            let stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
            state
                .endpoints
                .iter()
                .map(|(key, addresses)| {
                    let seen = addresses
                        .iter()
                        .map(|a| {
                            let id = (key.clone(), a.clone());
                            (a.clone(), stale.get(&id).copied().unwrap_or(now))
                        })
                        .collect();
                    (key.clone(), seen)
                })
                .collect()
        };
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&persisted)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "cannot persist endpoints");
        }
    }

    /// The current state.
    pub fn current(&self) -> Arc<MeshState> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every new version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.tx.subscribe()
    }

    fn update(&self, change: impl FnOnce(&mut MeshState)) {
        self.tx.send_modify(|state| {
            let mut next = MeshState::clone(state);
            change(&mut next);
            next.version = (state.version + 1).max(now_ms());
            *state = Arc::new(next);
        });
    }

    /// Replaces the mesh definition and policies (a new version).
    pub fn set_config(&self, mesh: MeshFile, policies: PolicySet) {
        self.update(|s| {
            s.mesh = Arc::new(mesh);
            s.policies = Arc::new(policies);
        });
    }

    /// Kubernetes mode: replaces the workloads (one per pod), the services with their
    /// endpoints and the accepted policies at once (a new version).
    pub fn set_cluster(
        &self,
        mesh: MeshFile,
        services: BTreeMap<(String, String), v1::Service>,
        policies: PolicySet,
    ) {
        self.update(|s| {
            s.mesh = Arc::new(mesh);
            s.discovered = Some(Arc::new(services));
            s.policies = Arc::new(policies);
        });
    }

    /// Endpoints registered for workload `key`.
    pub fn endpoint_count(&self, key: &str) -> usize {
        self.current().endpoints.get(key).map_or(0, BTreeSet::len)
    }

    /// Ends one registration of `address`; the endpoint goes when its last stream ends.
    pub fn release_endpoint(&self, key: &str, address: &str) {
        {
            let mut registrations = self.registrations.lock().unwrap_or_else(|e| e.into_inner());
            let id = (key.to_string(), address.to_string());
            let count = registrations.entry(id.clone()).or_default();
            *count = count.saturating_sub(1);
            if *count > 0 {
                return;
            }
            registrations.remove(&id);
        }
        self.remove_endpoint(key, address);
    }

    /// Registers `address` as an endpoint of workload `key` (a new version).
    pub fn add_endpoint(&self, key: &str, address: &str) {
        *self
            .registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.to_string(), address.to_string()))
            .or_default() += 1;
        self.stale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(key.to_string(), address.to_string()));
        self.update(|s| {
            s.endpoints
                .entry(key.to_string())
                .or_default()
                .insert(address.to_string());
        });
        self.save(&self.current());
    }

    /// Removes a loaded endpoint unless its sidecar has registered it meanwhile; decided inside
    /// the state update, which is serialized with [`StateHandle::add_endpoint`]'s, so a
    /// reconnect racing the removal always wins. Returns whether it was removed.
    fn remove_unless_registered(&self, key: &str, address: &str) -> bool {
        self.remove_if(key, address, || {
            self.registrations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&(key.to_string(), address.to_string()))
                .is_none_or(|n| *n == 0)
        })
    }

    /// Removes a registration (a new version).
    pub fn remove_endpoint(&self, key: &str, address: &str) {
        self.remove_if(key, address, || true);
    }

    /// Removes `address` from workload `key` when `allowed()` (asked inside the state update);
    /// persists and returns whether it was removed.
    fn remove_if(&self, key: &str, address: &str, allowed: impl FnOnce() -> bool) -> bool {
        let mut removed = false;
        self.update(|s| {
            if !allowed() {
                return;
            }
            if let Some(set) = s.endpoints.get_mut(key) {
                removed = set.remove(address);
                if set.is_empty() {
                    s.endpoints.remove(key);
                }
            }
        });
        if removed {
            self.save(&self.current());
        }
        removed
    }
}

/// Watches the mesh file and its policy directory and pushes every valid change; an invalid
/// file keeps the last good config in force and is reported (log with file:line: field,
/// metric, `/config_dump`).
pub struct MeshFileWatcher {
    path: PathBuf,
    last_fingerprint: Option<String>,
    jwks: JwksResolver,
    /// The last good policies as parsed (before JWKS resolution), for JWKS refreshes.
    parsed: Option<(MeshFile, PolicySet)>,
    last_resolve: std::time::Instant,
}

/// Everything the config is built from, as text (mesh file, then each policy file by name).
async fn read_inputs(path: &Path) -> Option<(String, Vec<(PathBuf, String)>)> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let dir = MeshFile::parse(path, &text)
        .ok()
        .and_then(|m| m.policies_dir(path));
    let files = match dir {
        Some(dir) => tokio::task::spawn_blocking(move || read_dir_texts(&dir))
            .await
            .ok()?
            .ok()?,
        None => Vec::new(),
    };
    Some((text, files))
}

fn fingerprint(text: &str, files: &[(PathBuf, String)]) -> String {
    let mut all = text.to_string();
    for (file, body) in files {
        all.push_str(&format!("\u{0}{}\u{0}{body}", file.display()));
    }
    all
}

/// Parses the mesh file and its policies.
///
/// # Errors
/// The first invalid file, with file, field and line.
pub fn load_config(
    path: &Path,
    text: &str,
    files: &[(PathBuf, String)],
) -> Result<(MeshFile, PolicySet), LoadError> {
    let mesh = MeshFile::parse(path, text)?;
    let mut policies = PolicySet::default();
    for (file, body) in files {
        policies.add_file(file, body)?;
    }
    Ok((mesh, policies))
}

impl MeshFileWatcher {
    /// Watches `path` (and the policy directory it names), resolving JWKS with `jwks`.
    pub fn new(path: &Path, jwks: JwksResolver) -> Self {
        Self {
            path: path.to_path_buf(),
            last_fingerprint: None,
            jwks,
            parsed: None,
            last_resolve: std::time::Instant::now(),
        }
    }

    /// Pushes the config at once with the key sets known so far, then fetches every
    /// `jwksUri` and pushes again if a key set changed (a slow JWKS host never delays a
    /// policy change, only the new keys).
    async fn push(&mut self, state: &StateHandle, mesh: MeshFile, policies: PolicySet) {
        let mut now = policies.clone();
        self.jwks.fill(&mut now);
        self.set_if_changed(state, &mesh, now);
        if JwksResolver::needs_refresh(&policies) {
            let mut fetched = policies;
            self.jwks
                .resolve(&mut fetched, mesh.policies_dir(&self.path).as_deref())
                .await;
            self.set_if_changed(state, &mesh, fetched);
        }
        self.last_resolve = std::time::Instant::now();
    }

    fn set_if_changed(&self, state: &StateHandle, mesh: &MeshFile, policies: PolicySet) {
        let current = state.current();
        if *current.mesh == *mesh && *current.policies == policies {
            return;
        }
        tracing::info!(
            file = %self.path.display(),
            authorization_policies = policies.authorization.len(),
            request_authentications = policies.request_authentication.len(),
            peer_authentications = policies.peer_authentication.len(),
            traffic_policies = policies.traffic.len(),
            "config changed; pushing"
        );
        state.set_config(mesh.clone(), policies);
    }

    /// Polls every `interval` (250 ms keeps a change under the 1 s push target) until the
    /// process ends. Polling content (not mtime) survives editors that replace files by rename.
    pub async fn run(
        mut self,
        state: StateHandle,
        metrics: ControlPlaneMetrics,
        last_error: Arc<std::sync::Mutex<Option<String>>>,
        interval: Duration,
    ) {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some((text, files)) = read_inputs(&self.path).await else {
                continue;
            };
            let print = fingerprint(&text, &files);
            if self.last_fingerprint.as_deref() == Some(print.as_str()) {
                // Unchanged files: refresh key sets fetched from a jwksUri now and then.
                if let Some((mesh, policies)) = self.parsed.clone() {
                    if JwksResolver::needs_refresh(&policies)
                        && self.last_resolve.elapsed() >= JWKS_REFRESH
                    {
                        self.push(&state, mesh, policies).await;
                    }
                }
                continue;
            }
            self.last_fingerprint = Some(print);
            match load_config(&self.path, &text, &files) {
                Ok((mesh, policies)) => {
                    *last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.parsed = Some((mesh.clone(), policies.clone()));
                    self.push(&state, mesh, policies).await;
                }
                Err(err) => report_invalid(&err, &metrics, &last_error),
            }
        }
    }
}

fn report_invalid(
    err: &LoadError,
    metrics: &ControlPlaneMetrics,
    last_error: &std::sync::Mutex<Option<String>>,
) {
    tracing::error!(error = %err, "invalid mesh definition; keeping the last good config");
    metrics.config_errors.inc();
    *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
}
