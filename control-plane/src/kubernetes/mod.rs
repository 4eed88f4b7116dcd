//! The Kubernetes config source (`meshflow-control-plane --kubernetes`): kube-rs reflectors
//! over Namespaces, Pods, Services, EndpointSlices (`discovery.k8s.io/v1`, or `v1beta1` where
//! v1 is not served) and meshflow's custom resources feed the *same* snapshot builder as the
//! mesh file ([`crate::state::MeshState::snapshot_for`]), so a sidecar cannot tell the two
//! sources apart.
//!
//! Each custom resource is validated by the policy-file code. A valid one is served; an invalid
//! one gets `Accepted=False` (reason, the field path and what is wrong) and the last accepted
//! generation of that object stays in force — a rejected change never widens access — and is
//! counted in `meshflow_kubernetes_rejected_total{kind}`. The last accepted spec is recorded in
//! the object's status (`status.lastAccepted`), so it survives restarts and every replica
//! serves it. Every replica serves config; the holder of the `coordination.k8s.io` Lease
//! ([`leader`]) writes status. A `Workflow` is registered with this replica's coordinator and
//! its status names the registered version; runs stay in the coordinator's store.
//!
//! The reconcile loop that publishes config does no network I/O: status writes, JWKS fetches
//! and Workflow registrations run in their own tasks and report back, so a slow API server,
//! JWKS host or database never delays an endpoint or policy change.

pub mod ca_secret;
pub mod identity;
pub mod leader;
pub mod model;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use meshflow_policies::authz::ROOT_NAMESPACE;
use meshflow_policies::crd::{
    self, AuthorizationPolicyResource, MeshflowResource, PeerAuthenticationResource, Rejection,
    RequestAuthenticationResource, TrafficPolicyResource, WorkflowResource,
};
use meshflow_policies::documents::PolicySet;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch, Notify};

use crate::jwks::JwksResolver;
use crate::state::StateHandle;
use crate::workflow::coordinator::Coordinator;

/// Settings of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The SPIFFE trust domain (`cluster.local` by default).
    pub trust_domain: String,
    /// The control plane's own namespace: its Lease and CA Secret.
    pub namespace: String,
    /// This replica's name in the Lease (the pod name).
    pub holder: String,
    /// Only namespaces matching this equality-based label selector (`key=value,…`) are
    /// watched; `None`: all. The root namespace's policies (`meshflow-system`) always apply.
    pub discovery_selector: Option<String>,
    /// The sidecar's inbound port where a pod does not annotate its own.
    pub sidecar_inbound_port: u16,
    /// Lease duration (whole seconds, at least 2).
    pub lease_duration: Duration,
}

/// Longest `Accepted` message written to a status (Kubernetes conditions allow 32,768 bytes;
/// a rejection echoing a huge value must not make every status write fail).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Largest `spec` of a policy object served, bytes of JSON: every sidecar a policy reaches
/// (every sidecar, for a TrafficPolicy) receives it in its snapshot.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// How long the first list of Workflows may fail before config is served without them.
const WORKFLOW_LIST_GRACE: Duration = Duration::from_secs(10);

/// How long after a failed Workflow registration (store down, a lost race) it is tried again.
const REGISTRATION_RETRY: Duration = Duration::from_secs(5);

/// Checks an equality-based label selector (`key=value`, `key==value`, `key!=value`, `key`,
/// `!key`, comma-separated), as `--discovery-selector` takes it.
///
/// # Errors
/// A message naming the requirement that is not one of those forms.
pub fn check_selector(selector: &str) -> Result<(), String> {
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 317
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    let value = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    for requirement in selector.split(',') {
        let r = requirement.trim();
        let ok = if let Some((k, v)) = r.split_once("!=") {
            name(k.trim()) && value(v.trim())
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            name(k.trim()) && value(v.trim())
        } else {
            name(r.strip_prefix('!').unwrap_or(r))
        };
        if !ok {
            return Err(format!(
                "{requirement:?} is not an equality-based label requirement \
                 (key=value, key!=value, key or !key)"
            ));
        }
    }
    Ok(())
}

/// Metrics of the Kubernetes source.
#[derive(Clone)]
struct KubeMetrics {
    rejected: IntCounterVec,
    leader: IntGauge,
    status_writes: IntCounterVec,
}

impl KubeMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            rejected: IntCounterVec::new(
                Opts::new(
                    "meshflow_kubernetes_rejected_total",
                    "Custom-resource generations refused (validation, a conflict, or a failed \
                     Workflow registration); the last accepted generation stays in force. By \
                     kind.",
                ),
                &["kind"],
            )?,
            leader: IntGauge::new(
                "meshflow_control_plane_leader",
                "1 while this replica holds the control-plane Lease and writes status.",
            )?,
            status_writes: IntCounterVec::new(
                Opts::new(
                    "meshflow_kubernetes_status_writes_total",
                    "Status updates written to custom resources, by result.",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.status_writes.clone()))?;
        Ok(m)
    }
}

/// Drops what meshflow never reads from every object a reflector keeps (managed fields,
/// foreign annotations; for pods also volumes, most of the status and all of the containers
/// but their names — and of init containers only a restartable one's name and restart
/// policy, which [`model::runs_sidecar`] reads), so the stores of a large cluster stay small.
fn slim_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k.starts_with("meshflow.io/"));
    }
}

fn slim_pod(pod: &mut Pod) {
    slim_meta(&mut pod.metadata);
    if let Some(spec) = &mut pod.spec {
        use k8s_openapi::api::core::v1::Container;
        for container in &mut spec.containers {
            *container = Container {
                name: std::mem::take(&mut container.name),
                ..Container::default()
            };
        }
        spec.init_containers = spec.init_containers.take().map(|init| {
            init.into_iter()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                .map(|c| Container {
                    name: c.name,
                    restart_policy: c.restart_policy,
                    ..Container::default()
                })
                .collect()
        });
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
    if let Some(status) = &mut pod.status {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.message = None;
    }
}

/// Starts a reflector for `api`; every change wakes `notify`. `slim` trims each object before
/// it is stored.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    slim: fn(&mut K),
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(slim));
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
            }
        }
    });
    reader
}

/// A reflector over `resource` as untyped objects.
fn reflect_dynamic(
    client: Client,
    resource: &ApiResource,
    notify: Arc<Notify>,
) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let kind = resource.kind.clone();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<DynamicObject>::all_with(client, resource),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|object: &mut DynamicObject| slim_meta(&mut object.metadata)),
    );
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
            }
        }
    });
    reader
}

/// A reflector over meshflow kind `R`, untyped.
fn reflect_kind<R: MeshflowResource>(
    client: &Client,
    notify: &Arc<Notify>,
) -> Store<DynamicObject> {
    reflect_dynamic(
        client.clone(),
        &ApiResource::erase::<R>(&()),
        notify.clone(),
    )
}

fn slim_any<K: Resource>(object: &mut K) {
    slim_meta(object.meta_mut());
}

/// The EndpointSlice version to watch: `discovery.k8s.io/v1`, or `v1beta1` where the API server
/// does not serve v1 (before Kubernetes 1.21). Retries discovery until it answers (a wrong
/// guess would mean no endpoints at all).
async fn endpoint_slice_resource(client: &Client) -> ApiResource {
    let mut wait = Duration::from_millis(200);
    let version = loop {
        match kube::discovery::group(client, "discovery.k8s.io").await {
            Ok(group) if group.versions().any(|v| v == "v1") => break "v1",
            Ok(_) => break "v1beta1",
            Err(e) => {
                tracing::warn!(error = %e, "discovering the EndpointSlice version; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(version, "watching EndpointSlices");
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    )
}

/// The meshflow.io resources the API server serves (plural names); `None` when discovery
/// failed.
async fn served_meshflow_resources(client: &Client) -> Option<BTreeSet<String>> {
    match kube::discovery::group(client, crd::GROUP).await {
        Ok(group) => Some(
            group
                .recommended_resources()
                .into_iter()
                .map(|(r, _)| r.plural)
                .collect(),
        ),
        // No meshflow.io group at all: no CRD installed.
        Err(kube::Error::Api(status)) if status.code == 404 => Some(BTreeSet::new()),
        Err(_) => None,
    }
}

/// Object identity in the verdict cache: (kind, namespace, name).
type ObjectKey = (&'static str, String, String);

/// What one generation of one object came to.
#[derive(Clone)]
enum Outcome {
    /// Valid and served.
    Accepted,
    /// A Workflow registered with the coordinator as this version.
    Registered(u32),
    /// Registration running.
    Registering,
    /// Refused: (reason, why). `retry_at`: a failure that is not the spec's fault (the store
    /// down, a lost race) is tried again then.
    Rejected {
        reason: String,
        rejection: Rejection,
        retry_at: Option<Instant>,
    },
}

#[derive(Clone)]
struct Verdict {
    uid: String,
    generation: i64,
    outcome: Outcome,
}

struct Stores {
    namespaces: Option<Store<Namespace>>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<DynamicObject>,
    // meshflow's kinds are watched untyped: one object the types cannot read is refused
    // alone (crd::decode) instead of failing the list of its whole kind.
    traffic: Store<DynamicObject>,
    authorization: Store<DynamicObject>,
    request_authentication: Store<DynamicObject>,
    peer_authentication: Store<DynamicObject>,
    workflows: Store<DynamicObject>,
}

/// What was last handed to the snapshot builder: workloads, services, policies.
type Published = (
    meshflow_policies::mesh::MeshFile,
    BTreeMap<(String, String), meshflow_api::v1::Service>,
    PolicySet,
);

/// One status write the leader owes: the object and the `status` merge patch.
#[derive(Clone, PartialEq)]
struct StatusWrite {
    resource: ApiResource,
    namespace: String,
    name: String,
    origin: String,
    patch: serde_json::Value,
}

/// A finished Workflow registration: (key, uid, generation, version or error).
type Registration = (ObjectKey, String, i64, Result<u32, String>);

struct Controller {
    settings: KubeSettings,
    state: StateHandle,
    metrics: KubeMetrics,
    coordinator: Option<Arc<Coordinator>>,
    jwks: JwksResolver,
    jwks_wanted: watch::Sender<PolicySet>,
    stores: Stores,
    verdicts: HashMap<ObjectKey, Verdict>,
    /// The last accepted version of each object served while a newer one is rejected: (uid,
    /// generation, policy).
    last_good: HashMap<ObjectKey, (String, i64, PolicySet)>,
    leader: watch::Receiver<bool>,
    published: Option<Published>,
    statuses: watch::Sender<Vec<StatusWrite>>,
    registrations: mpsc::UnboundedSender<Registration>,
    notify: Arc<Notify>,
}

/// Starts watching the cluster and keeps `state` in step with it; returns once every resource
/// has been listed and the first model is published (a meshflow CRD that is not installed
/// counts as empty, and is picked up once installed). Until then `ready` stays false.
///
/// # Errors
/// When the metrics cannot be registered.
pub async fn start(
    client: Client,
    settings: KubeSettings,
    state: StateHandle,
    registry: &Registry,
    coordinator: Option<Arc<Coordinator>>,
    jwks: JwksResolver,
    ready: Arc<AtomicBool>,
) -> Result<(), String> {
    let metrics = KubeMetrics::new(registry).map_err(|e| e.to_string())?;
    let notify = Arc::new(Notify::new());
    let all = watcher::Config::default();
    let namespaces = settings.discovery_selector.as_ref().map(|selector| {
        reflect(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(selector),
            notify.clone(),
            slim_any,
        )
    });
    let slice_resource = endpoint_slice_resource(&client).await;
    let slices = reflect_dynamic(client.clone(), &slice_resource, notify.clone());
    let stores = Stores {
        namespaces,
        pods: reflect(
            Api::all(client.clone()),
            all.clone(),
            notify.clone(),
            slim_pod,
        ),
        services: reflect(
            Api::all(client.clone()),
            all.clone(),
            notify.clone(),
            slim_any,
        ),
        slices,
        traffic: reflect_kind::<TrafficPolicyResource>(&client, &notify),
        authorization: reflect_kind::<AuthorizationPolicyResource>(&client, &notify),
        request_authentication: reflect_kind::<RequestAuthenticationResource>(&client, &notify),
        peer_authentication: reflect_kind::<PeerAuthenticationResource>(&client, &notify),
        workflows: reflect_kind::<WorkflowResource>(&client, &notify),
    };
    let (leader_tx, leader_rx) = watch::channel(false);
    tokio::spawn(leader::run(
        client.clone(),
        settings.namespace.clone(),
        settings.holder.clone(),
        settings.lease_duration,
        leader_tx,
    ));
    wait_for_first_lists(&client, &stores).await;

    let (statuses_tx, statuses_rx) = watch::channel(Vec::new());
    tokio::spawn(write_statuses(
        client.clone(),
        statuses_rx,
        leader_rx.clone(),
        metrics.clone(),
        notify.clone(),
    ));
    let (jwks_tx, jwks_rx) = watch::channel(PolicySet::default());
    tokio::spawn(refresh_jwks(jwks.clone(), jwks_rx, notify.clone()));
    let (registrations_tx, registrations_rx) = mpsc::unbounded_channel();
    let mut controller = Controller {
        settings,
        state,
        metrics,
        coordinator,
        jwks,
        jwks_wanted: jwks_tx,
        stores,
        verdicts: HashMap::new(),
        last_good: HashMap::new(),
        leader: leader_rx,
        published: None,
        statuses: statuses_tx,
        registrations: registrations_tx,
        notify: notify.clone(),
    };
    controller.reconcile();
    ready.store(true, Ordering::SeqCst);
    tokio::spawn(controller.run(registrations_rx));
    Ok(())
}

/// Waits until every store has its first list. A meshflow kind whose CRD the API server does
/// not serve counts as listed (empty; its reflector keeps retrying and fills the store once
/// the CRD is installed); anything else — RBAC refusing a list, the API server down — is
/// waited for: serving a partial cluster would serve missing policies, which fails open.
async fn wait_for_first_lists(client: &Client, stores: &Stores) {
    async fn ready<K>(store: &Store<K>) -> bool
    where
        K: kube::runtime::reflector::Lookup + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        tokio::time::timeout(Duration::from_millis(1), store.wait_until_ready())
            .await
            .is_ok()
    }
    let started = Instant::now();
    let mut warned = false;
    loop {
        let core = match &stores.namespaces {
            Some(ns) => ready(ns).await,
            None => true,
        } && ready(&stores.pods).await
            && ready(&stores.services).await
            && ready(&stores.slices).await;
        let kinds = [
            ("trafficpolicies", ready(&stores.traffic).await),
            ("authorizationpolicies", ready(&stores.authorization).await),
            (
                "requestauthentications",
                ready(&stores.request_authentication).await,
            ),
            (
                "peerauthentications",
                ready(&stores.peer_authentication).await,
            ),
            ("workflows", ready(&stores.workflows).await),
        ];
        let mut waiting: Vec<&str> = kinds.iter().filter(|(_, r)| !r).map(|(k, _)| *k).collect();
        // Workflows decide no access: after a while, serve without them rather than let one
        // unreadable Workflow (free-form JSON nested deeper than a client decodes) hold every
        // sidecar's config back. Their reflector keeps trying.
        if started.elapsed() > WORKFLOW_LIST_GRACE && waiting == ["workflows"] {
            tracing::error!("Workflows could not be listed yet; serving config without them");
            waiting.clear();
        }
        if core && waiting.is_empty() {
            return;
        }
        if core {
            if let Some(served) = served_meshflow_resources(client).await {
                let missing: Vec<&str> = waiting
                    .iter()
                    .copied()
                    .filter(|k| !served.contains(*k))
                    .collect();
                if missing.len() == waiting.len() {
                    tracing::error!(
                        missing = ?missing,
                        "meshflow CRDs not installed (kubectl apply -f charts/meshflow/crds/): \
                         serving without those kinds until they are"
                    );
                    return;
                }
            }
        }
        if !warned && started.elapsed() > Duration::from_secs(10) {
            warned = true;
            tracing::warn!(
                core_listed = core,
                waiting = ?waiting,
                "still waiting for the first list of every resource (not ready until then)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the statuses the controller asks for, only while leading (checked before every
/// write), each once; a failed write makes the controller compute them again after a backoff.
async fn write_statuses(
    client: Client,
    mut wanted: watch::Receiver<Vec<StatusWrite>>,
    leader: watch::Receiver<bool>,
    metrics: KubeMetrics,
    notify: Arc<Notify>,
) {
    // What was written last per object, so that a reconcile that runs before the write's
    // watch event arrives does not write it again.
    let mut written: HashMap<(String, String, String), (serde_json::Value, Instant)> =
        HashMap::new();
    let mut backoff = Duration::from_millis(250);
    while wanted.changed().await.is_ok() {
        let batch = wanted.borrow_and_update().clone();
        let mut failed = false;
        for write in batch {
            if !*leader.borrow() {
                break;
            }
            let key = (
                write.resource.plural.clone(),
                write.namespace.clone(),
                write.name.clone(),
            );
            if written
                .get(&key)
                .is_some_and(|(p, at)| *p == write.patch && at.elapsed() < Duration::from_secs(10))
            {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &write.namespace, &write.resource);
            match api
                .patch_status(
                    &write.name,
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({ "status": write.patch })),
                )
                .await
            {
                Ok(_) => {
                    metrics.status_writes.with_label_values(&["ok"]).inc();
                    written.insert(key, (write.patch, Instant::now()));
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    failed = true;
                    metrics.status_writes.with_label_values(&["error"]).inc();
                    tracing::warn!(object = %write.origin, error = %e, "status update failed; retrying");
                }
            }
        }
        written.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(10));
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            notify.notify_one();
        } else {
            backoff = Duration::from_millis(250);
        }
    }
}

/// Fetches `jwksUri`s off the reconcile loop: whenever the wanted policies change and every
/// [`crate::jwks::JWKS_REFRESH`]; wakes the controller to fill in the new key sets.
async fn refresh_jwks(
    mut jwks: JwksResolver,
    mut wanted: watch::Receiver<PolicySet>,
    notify: Arc<Notify>,
) {
    loop {
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(crate::jwks::JWKS_REFRESH) => {}
        }
        let mut policies = wanted.borrow_and_update().clone();
        if JwksResolver::needs_refresh(&policies) {
            jwks.resolve(&mut policies, None).await;
            notify.notify_one();
        }
    }
}

impl Controller {
    async fn run(mut self, mut registrations: mpsc::UnboundedReceiver<Registration>) {
        loop {
            tokio::select! {
                () = self.notify.notified() => {}
                changed = self.leader.changed() => {
                    if changed.is_err() { return; }
                }
                Some((key, uid, generation, result)) = registrations.recv() => {
                    self.registered(key, uid, generation, result);
                }
            }
            // Coalesce a burst of events (a rollout touches many objects at once).
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.reconcile();
        }
    }

    /// Rebuilds the model from the stores, publishes it when it changed, and hands the status
    /// writes it implies to the writer. No network I/O.
    fn reconcile(&mut self) {
        let selected_names: Option<BTreeSet<String>> = self
            .stores
            .namespaces
            .as_ref()
            .map(|s| s.state().iter().map(|n| n.name_any()).collect());
        let selected = |ns: &str| selected_names.as_ref().is_none_or(|n| n.contains(ns));
        // Mesh-wide policies live in the root namespace, selected or not.
        let policy_selected = |ns: &str| ns == ROOT_NAMESPACE || selected(ns);
        let (mesh, services) = model::build(
            &model::ModelSettings {
                trust_domain: &self.settings.trust_domain,
                inbound_port: self.settings.sidecar_inbound_port,
            },
            &selected,
            &self.stores.pods.state(),
            &self.stores.services.state(),
            &self.stores.slices.state(),
        );
        let mut present: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut policies = PolicySet::default();
        let mut conflicts: HashMap<ObjectKey, Rejection> = HashMap::new();
        let traffic = self.stores.traffic.state();
        let authorization = self.stores.authorization.state();
        let request_authentication = self.stores.request_authentication.state();
        let peer_authentication = self.stores.peer_authentication.state();
        let workflows = self.stores.workflows.state();
        for key in
            self.judge_policies::<TrafficPolicyResource>(&traffic, &policy_selected, &mut present)
        {
            let Some((_, _, set)) = self.last_good.get(&key) else {
                continue;
            };
            for p in &set.traffic {
                if let Some(other) = policies
                    .traffic
                    .iter()
                    .find(|o| o.spec.service == p.spec.service && o.namespace() == p.namespace())
                {
                    conflicts.insert(
                        key.clone(),
                        Rejection {
                            field: "spec.service".into(),
                            message: format!(
                                "service {}.{} already has TrafficPolicy {:?}; merge them",
                                p.spec.service,
                                p.namespace(),
                                other.metadata.name
                            ),
                        },
                    );
                } else {
                    policies.traffic.push(p.clone());
                }
            }
        }
        // The other policy kinds: each key's last good version is a one-object set.
        let mut keys = self.judge_policies::<AuthorizationPolicyResource>(
            &authorization,
            &policy_selected,
            &mut present,
        );
        keys.extend(self.judge_policies::<RequestAuthenticationResource>(
            &request_authentication,
            &policy_selected,
            &mut present,
        ));
        keys.extend(self.judge_policies::<PeerAuthenticationResource>(
            &peer_authentication,
            &policy_selected,
            &mut present,
        ));
        for (_, _, set) in keys.iter().filter_map(|key| self.last_good.get(key)) {
            policies
                .authorization
                .extend(set.authorization.iter().cloned());
            policies
                .request_authentication
                .extend(set.request_authentication.iter().cloned());
            policies
                .peer_authentication
                .extend(set.peer_authentication.iter().cloned());
        }
        self.judge_workflows(&workflows, &selected, &mut present);
        // Objects gone from the cluster are gone from config and from the caches.
        self.verdicts.retain(|k, _| present.contains(k));
        self.last_good.retain(|k, _| present.contains(k));
        // Key sets: what is known now; new `jwksUri`s are fetched by the JWKS task, which
        // wakes this loop when they arrive.
        if JwksResolver::needs_refresh(&policies) {
            self.jwks_wanted.send_if_modified(|wanted| {
                let changed = *wanted != policies;
                if changed {
                    *wanted = policies.clone();
                }
                changed
            });
        }
        self.jwks.fill(&mut policies);
        self.publish(mesh, services, policies);
        let leading = *self.leader.borrow();
        self.metrics.leader.set(i64::from(leading));
        if leading {
            let mut writes = Vec::new();
            self.statuses_for::<TrafficPolicyResource>(&traffic, &conflicts, &mut writes);
            self.statuses_for::<AuthorizationPolicyResource>(
                &authorization,
                &conflicts,
                &mut writes,
            );
            self.statuses_for::<RequestAuthenticationResource>(
                &request_authentication,
                &conflicts,
                &mut writes,
            );
            self.statuses_for::<PeerAuthenticationResource>(
                &peer_authentication,
                &conflicts,
                &mut writes,
            );
            self.statuses_for::<WorkflowResource>(&workflows, &conflicts, &mut writes);
            self.statuses.send_if_modified(|wanted| {
                let changed = *wanted != writes;
                if changed {
                    *wanted = writes;
                }
                changed
            });
        }
    }

    /// Hands the model to the snapshot builder unless it is what was handed last (status-only
    /// events then cost no new version).
    fn publish(
        &mut self,
        mesh: meshflow_policies::mesh::MeshFile,
        services: BTreeMap<(String, String), meshflow_api::v1::Service>,
        policies: PolicySet,
    ) {
        let next = (mesh, services, policies);
        if self.published.as_ref() == Some(&next) {
            return;
        }
        self.state
            .set_cluster(next.0.clone(), next.1.clone(), next.2.clone());
        tracing::debug!(
            workloads = next.0.spec.workloads.len(),
            services = next.1.len(),
            "published the cluster's config"
        );
        self.published = Some(next);
    }

    /// Validates every new generation of a policy kind; returns the keys whose last good
    /// version is to be served, oldest object first (so that of two TrafficPolicies for one
    /// service the one that was there first stays). A rejected generation falls back to the
    /// last accepted one this process saw, else to the one recorded in the object's status
    /// (by this or an earlier leader).
    fn judge_policies<R: MeshflowResource + DeserializeOwned>(
        &mut self,
        objects: &[Arc<DynamicObject>],
        selected: &(dyn Fn(&str) -> bool + Sync),
        present: &mut BTreeSet<ObjectKey>,
    ) -> Vec<ObjectKey> {
        let mut keys = Vec::new();
        for object in objects {
            let Some(key) = key_of(R::KIND, object, selected) else {
                continue;
            };
            present.insert(key.clone());
            let (uid, generation) = uid_generation(object);
            let fresh = self
                .verdicts
                .get(&key)
                .is_some_and(|v| v.uid == uid && v.generation == generation);
            if !fresh {
                let origin = crd::origin(R::KIND, &object.metadata);
                let spec_bytes = object.data.get("spec").map_or(0, |s| s.to_string().len());
                let judged = if spec_bytes > MAX_SPEC_BYTES {
                    Err((
                        "TooLarge",
                        Rejection {
                            field: "spec".into(),
                            message: format!(
                                "{spec_bytes} bytes of spec; at most {MAX_SPEC_BYTES} are served \
                                 (every sidecar the policy reaches receives it)"
                            ),
                        },
                    ))
                } else {
                    untyped(object)
                        .and_then(|value| crd::decode::<R>(&value))
                        .and_then(|typed| crd::policy_from_resource(&typed))
                        .map_err(|rejection| ("Invalid", rejection))
                };
                let outcome = match judged {
                    Ok(set) => {
                        self.last_good
                            .insert(key.clone(), (uid.clone(), generation, set));
                        Outcome::Accepted
                    }
                    Err((reason, rejection)) => {
                        self.metrics.rejected.with_label_values(&[R::KIND]).inc();
                        tracing::warn!(object = %origin, generation, %rejection, "rejected; the last accepted generation stays in force");
                        let known = self.last_good.get(&key).is_some_and(|(u, _, _)| *u == uid);
                        if !known {
                            if let Some(last) = recorded_last_accepted(object) {
                                match crd::policy_from_last_accepted(
                                    R::KIND,
                                    &object.metadata,
                                    &last,
                                ) {
                                    Ok(set) => {
                                        self.last_good.insert(
                                            key.clone(),
                                            (uid.clone(), last.generation, set),
                                        );
                                    }
                                    Err(e) => {
                                        tracing::warn!(object = %origin, error = %e, "the recorded last accepted generation is not valid either")
                                    }
                                }
                            }
                        }
                        Outcome::Rejected {
                            reason: reason.into(),
                            rejection,
                            retry_at: None,
                        }
                    }
                };
                self.verdicts.insert(
                    key.clone(),
                    Verdict {
                        uid: uid.clone(),
                        generation,
                        outcome,
                    },
                );
            }
            // A new object with the same name is not the old one: never serve its predecessor.
            if self.last_good.get(&key).is_some_and(|(u, _, _)| *u == uid) {
                let created = object
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second());
                keys.push((created, key));
            }
        }
        keys.sort();
        keys.into_iter().map(|(_, key)| key).collect()
    }

    /// Validates every new generation of a Workflow and starts its registration with the
    /// coordinator (in its own task; [`Controller::registered`] takes the result). A Workflow
    /// calls services of its own namespace only: the coordinator's identity must not let one
    /// namespace reach another's services (a confused deputy).
    fn judge_workflows(
        &mut self,
        objects: &[Arc<DynamicObject>],
        selected: &(dyn Fn(&str) -> bool + Sync),
        present: &mut BTreeSet<ObjectKey>,
    ) {
        for object in objects {
            let Some(key) = key_of("Workflow", object, selected) else {
                continue;
            };
            present.insert(key.clone());
            let (uid, generation) = uid_generation(object);
            if let Some(v) = self.verdicts.get(&key) {
                let due = matches!(v.outcome, Outcome::Rejected { retry_at: Some(at), .. } if at <= Instant::now());
                if v.uid == uid && v.generation == generation && !due {
                    continue;
                }
            }
            let origin = crd::origin("Workflow", &object.metadata);
            let judged = untyped(object)
                .and_then(|value| crd::decode::<WorkflowResource>(&value))
                .and_then(|typed| {
                    let workflow = crd::workflow_from_resource(&typed)?;
                    own_namespace_calls(&workflow, &key.1)?;
                    Ok(typed)
                });
            let outcome = match judged {
                Err(rejection) => {
                    self.metrics.rejected.with_label_values(&["Workflow"]).inc();
                    tracing::warn!(object = %origin, generation, %rejection, "workflow not registered");
                    Outcome::Rejected {
                        reason: "Invalid".into(),
                        rejection,
                        retry_at: None,
                    }
                }
                Ok(typed) => match &self.coordinator {
                    None => Outcome::Rejected {
                        reason: "NoCoordinator".into(),
                        rejection: Rejection {
                            field: ".".into(),
                            message: "this control plane runs no workflow coordinator \
                                      (--workflow-api)"
                                .into(),
                        },
                        retry_at: None,
                    },
                    Some(coordinator) => {
                        let (coordinator, results) =
                            (coordinator.clone(), self.registrations.clone());
                        let document = typed.to_document();
                        let (key, uid) = (key.clone(), uid.clone());
                        tokio::spawn(async move {
                            let result = coordinator
                                .register(&origin, &document)
                                .await
                                .map(|(_, version)| version)
                                .map_err(|e| e.to_string());
                            let _ = results.send((key, uid, generation, result));
                        });
                        Outcome::Registering
                    }
                },
            };
            self.verdicts.insert(
                key,
                Verdict {
                    uid,
                    generation,
                    outcome,
                },
            );
        }
    }

    /// Records a finished registration (if that generation is still the current one).
    fn registered(
        &mut self,
        key: ObjectKey,
        uid: String,
        generation: i64,
        result: Result<u32, String>,
    ) {
        let Some(verdict) = self.verdicts.get_mut(&key) else {
            return;
        };
        if verdict.uid != uid || verdict.generation != generation {
            return;
        }
        verdict.outcome = match result {
            Ok(version) => Outcome::Registered(version),
            Err(message) => {
                self.metrics.rejected.with_label_values(&["Workflow"]).inc();
                tracing::warn!(workflow = %format!("{}/{}", key.1, key.2), error = %message, "registration failed; retrying");
                let notify = self.notify.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REGISTRATION_RETRY).await;
                    notify.notify_one();
                });
                Outcome::Rejected {
                    reason: "RegistrationFailed".into(),
                    rejection: Rejection {
                        field: ".".into(),
                        message,
                    },
                    retry_at: Some(Instant::now() + REGISTRATION_RETRY),
                }
            }
        };
    }

    /// The status writes `objects` need: `Accepted` (and a Workflow's registered version, a
    /// policy's last accepted spec) where the object's status does not say it yet.
    fn statuses_for<R: MeshflowResource>(
        &self,
        objects: &[Arc<DynamicObject>],
        conflicts: &HashMap<ObjectKey, Rejection>,
        writes: &mut Vec<StatusWrite>,
    ) {
        let resource = ApiResource::erase::<R>(&());
        for object in objects {
            let Some(ns) = object.metadata.namespace.clone() else {
                continue;
            };
            let key: ObjectKey = (R::KIND, ns.clone(), object.name_any());
            let Some(verdict) = self.verdicts.get(&key) else {
                continue;
            };
            let mut last_accepted = None;
            let (status, reason, message, version) = match (&verdict.outcome, conflicts.get(&key)) {
                (Outcome::Registering, _) => continue,
                (Outcome::Accepted, Some(conflict)) => {
                    ("False", "Conflict".to_string(), conflict.to_string(), None)
                }
                (Outcome::Registered(v), _) => (
                    "True",
                    "Registered".to_string(),
                    format!("registered with the coordinator as version {v}"),
                    Some(*v),
                ),
                (Outcome::Accepted, None) => {
                    last_accepted = Some(serde_json::json!({
                        "generation": verdict.generation,
                        "spec": object.data.get("spec").map(|s| s.to_string()).unwrap_or_default(),
                    }));
                    (
                        "True",
                        "Accepted".to_string(),
                        "validated and served to the selected workloads".to_string(),
                        None,
                    )
                }
                (
                    Outcome::Rejected {
                        reason, rejection, ..
                    },
                    _,
                ) => {
                    let kept = match self.last_good.get(&key) {
                        Some((u, g, _)) if *u == verdict.uid => {
                            format!(" (generation {g}, the last accepted, stays in force)")
                        }
                        _ => String::new(),
                    };
                    ("False", reason.clone(), format!("{rejection}{kept}"), None)
                }
            };
            let message = truncate(&message, MAX_STATUS_MESSAGE);
            let current = object.data.get("status").cloned().unwrap_or_default();
            let condition = current
                .get("conditions")
                .and_then(|c| c.as_array())
                .and_then(|c| c.iter().find(|c| c["type"] == crd::ACCEPTED));
            let same = condition.is_some_and(|c| {
                c["status"] == status
                    && c["reason"] == reason.as_str()
                    && c["message"] == message.as_str()
                    && c["observedGeneration"] == verdict.generation
            }) && current.get("observedGeneration")
                == Some(&serde_json::json!(verdict.generation))
                && (version.is_none()
                    || current.get("registeredVersion") == Some(&serde_json::json!(version)))
                && (last_accepted.is_none()
                    || current.get("lastAccepted") == last_accepted.as_ref());
            if same {
                continue;
            }
            let transition = condition
                .filter(|c| c["status"] == status)
                .and_then(|c| c.get("lastTransitionTime").cloned())
                .unwrap_or_else(|| {
                    serde_json::json!(k8s_openapi::jiff::Timestamp::now()
                        .round(k8s_openapi::jiff::Unit::Second)
                        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
                        .to_string())
                });
            let mut patch = serde_json::json!({
                "observedGeneration": verdict.generation,
                "conditions": [{
                    "type": crd::ACCEPTED,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "observedGeneration": verdict.generation,
                    "lastTransitionTime": transition,
                }],
            });
            if let Some(v) = version {
                patch["registeredVersion"] = serde_json::json!(v);
            }
            if let Some(last) = last_accepted {
                patch["lastAccepted"] = last;
            }
            writes.push(StatusWrite {
                resource: resource.clone(),
                namespace: ns,
                name: key.2.clone(),
                origin: crd::origin(R::KIND, &object.metadata),
                patch,
            });
        }
    }
}

/// `text` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn key_of(
    kind: &'static str,
    object: &DynamicObject,
    selected: &(dyn Fn(&str) -> bool + Sync),
) -> Option<ObjectKey> {
    let ns = object.metadata.namespace.clone()?;
    if !selected(&ns) {
        return None;
    }
    Some((kind, ns, object.metadata.name.clone()?))
}

fn uid_generation(object: &DynamicObject) -> (String, i64) {
    (
        object.metadata.uid.clone().unwrap_or_default(),
        object.metadata.generation.unwrap_or(0),
    )
}

/// The object as the JSON its typed decoding reads.
fn untyped(object: &DynamicObject) -> Result<serde_json::Value, Rejection> {
    serde_json::to_value(object).map_err(|e| Rejection {
        field: ".".into(),
        message: e.to_string(),
    })
}

/// `status.lastAccepted` as recorded in the object, when it is readable.
fn recorded_last_accepted(object: &DynamicObject) -> Option<crd::LastAccepted> {
    let value = object.data.get("status")?.get("lastAccepted")?;
    serde_json::from_value(value.clone()).ok()
}

/// Refuses a Workflow whose calls (or compensations) name another namespace than its own.
fn own_namespace_calls(
    workflow: &meshflow_policies::workflow::Workflow,
    namespace: &str,
) -> Result<(), Rejection> {
    for (i, step) in workflow.spec.steps.iter().enumerate() {
        for (part, call) in [("call", &step.call), ("compensate", &step.compensate)] {
            if let Some(other) = call.as_ref().and_then(|c| c.namespace.as_deref()) {
                if other != namespace {
                    return Err(Rejection {
                        field: format!("spec.steps[{i}].{part}.namespace"),
                        message: format!(
                            "{other:?}: a Workflow calls services of its own namespace                              ({namespace}) only; the coordinator must not carry one namespace's                              calls into another"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_equality_based_label_requirements() {
        for good in [
            "a=b",
            "meshflow.io/test=x-1",
            "a==b,c!=d",
            "team",
            "!legacy",
            "a=",
        ] {
            assert!(check_selector(good).is_ok(), "{good}");
        }
        for bad in ["", "a in (b)", "a=b c", "=b", "a=b,,", "a>1"] {
            assert!(check_selector(bad).is_err(), "{bad}");
        }
    }

    /// What the reflector keeps of a pod still tells whether it runs the sidecar.
    #[test]
    fn slim_pods_keep_what_says_they_run_the_sidecar() {
        let pod = |containers: serde_json::Value, init: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "namespace": "shop",
                              "annotations": { "other.io/x": "y" } },
                "spec": { "containers": containers, "initContainers": init }
            }))
            .unwrap()
        };
        let full = |name: &str| serde_json::json!({ "name": name, "image": "i", "args": ["a"], "env": [{ "name": "E", "value": "v" }] });
        let mut native = pod(
            serde_json::json!([full("app")]),
            serde_json::json!([full("meshflow-init"), {
                "name": "meshflow-proxy", "image": "i", "restartPolicy": "Always" }]),
        );
        let mut classic = pod(
            serde_json::json!([full("meshflow-proxy"), full("app")]),
            serde_json::json!([full("meshflow-init")]),
        );
        let mut plain = pod(serde_json::json!([full("app")]), serde_json::json!([]));
        for p in [&mut native, &mut classic, &mut plain] {
            slim_pod(p);
            let spec = p.spec.as_ref().unwrap();
            assert!(spec
                .containers
                .iter()
                .all(|c| c.image.is_none() && c.env.is_none()));
            assert!(p.metadata.annotations.as_ref().unwrap().is_empty());
        }
        assert_eq!(
            native
                .spec
                .as_ref()
                .unwrap()
                .init_containers
                .as_ref()
                .unwrap()
                .len(),
            1
        );
        assert!(model::runs_sidecar(&native));
        assert!(model::runs_sidecar(&classic));
        assert!(!model::runs_sidecar(&plain));
    }

    #[test]
    fn status_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, MAX_STATUS_MESSAGE);
        assert!(
            cut.len() <= MAX_STATUS_MESSAGE && cut.ends_with('…'),
            "{}",
            cut.len()
        );
    }
}
