//! The Kubernetes config source (`meshflow-control-plane --kubernetes`): kube-rs reflectors
//! over Namespaces, Pods, Services, EndpointSlices (`discovery.k8s.io/v1`, or `v1beta1` where
//! v1 is not served) and meshflow's custom resources feed the *same* snapshot builder as the
//! mesh file ([`crate::state::MeshState::snapshot_for`]), so a sidecar cannot tell the two
//! sources apart.
//!
//! Each custom resource is validated by the policy-file code. A valid one is served; an invalid
//! one gets `Accepted=False` (reason, the field path and what is wrong) and the previous good
//! version of that object stays in force — a rejected change never widens access — and is
//! counted in `meshflow_kubernetes_rejected_total{kind}`. Every replica serves config; the
//! holder of the `coordination.k8s.io` Lease ([`leader`]) writes status. A `Workflow` is
//! registered with this replica's coordinator and its status names the registered version;
//! runs stay in the coordinator's store.

pub mod ca_secret;
pub mod identity;
pub mod leader;
pub mod model;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use meshflow_policies::crd::{
    self, AuthorizationPolicyResource, MeshflowResource, PeerAuthenticationResource, Rejection,
    RequestAuthenticationResource, TrafficPolicyResource, WorkflowResource,
};
use meshflow_policies::documents::PolicySet;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

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
    /// Only namespaces with this label (`key=value`) are watched; `None`: all.
    pub discovery_selector: Option<String>,
    /// The sidecar's inbound port where a pod does not annotate its own.
    pub sidecar_inbound_port: u16,
    /// Lease duration (renewed every third of it).
    pub lease_duration: Duration,
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
                    "Custom-resource generations refused by validation (the previous good \
                     version of the object stays in force), by kind.",
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

/// Starts a reflector for `api`; every change wakes `notify`.
fn reflect<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
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

/// The EndpointSlice version to watch: `discovery.k8s.io/v1`, or `v1beta1` where the API server
/// does not serve v1 (before Kubernetes 1.21).
async fn endpoint_slice_resource(client: &Client) -> ApiResource {
    let version = match kube::discovery::group(client, "discovery.k8s.io").await {
        Ok(group) if group.versions().any(|v| v == "v1") => "v1",
        Ok(_) => "v1beta1",
        Err(e) => {
            tracing::warn!(error = %e, "discovery.k8s.io not discoverable; assuming v1");
            "v1"
        }
    };
    tracing::info!(version, "watching EndpointSlices");
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    )
}

/// Object identity in the verdict cache: (kind, namespace, name).
type ObjectKey = (&'static str, String, String);

/// What validating one generation of one object gave.
#[derive(Clone)]
struct Verdict {
    uid: String,
    generation: i64,
    outcome: Result<Accepted, (String, Rejection)>,
}

#[derive(Clone)]
enum Accepted {
    Policy,
    Workflow(u32),
}

/// What was last handed to the snapshot builder: workloads, services, policies.
type Published = (
    meshflow_policies::mesh::MeshFile,
    BTreeMap<(String, String), meshflow_api::v1::Service>,
    PolicySet,
);

struct Stores {
    namespaces: Option<Store<Namespace>>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<DynamicObject>,
    traffic: Store<TrafficPolicyResource>,
    authorization: Store<AuthorizationPolicyResource>,
    request_authentication: Store<RequestAuthenticationResource>,
    peer_authentication: Store<PeerAuthenticationResource>,
    workflows: Store<WorkflowResource>,
}

struct Controller {
    client: Client,
    settings: KubeSettings,
    state: StateHandle,
    metrics: KubeMetrics,
    coordinator: Option<Arc<Coordinator>>,
    jwks: JwksResolver,
    stores: Stores,
    verdicts: HashMap<ObjectKey, Verdict>,
    /// The last accepted version of each object (kept while a newer generation is rejected).
    last_good: HashMap<ObjectKey, (String, PolicySet)>,
    leader: watch::Receiver<bool>,
    published: Option<Published>,
    /// The policies (before key sets were filled in) whose `jwksUri`s were fetched last, and
    /// when.
    resolved: Option<PolicySet>,
    last_resolve: std::time::Instant,
}

/// Starts watching the cluster and keeps `state` in step with it; returns once the first
/// snapshot of the cluster is published (or after 30 s, with what could be read: a missing
/// CRD is logged and retried).
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
) -> Result<(), String> {
    let metrics = KubeMetrics::new(registry).map_err(|e| e.to_string())?;
    let notify = Arc::new(Notify::new());
    let all = watcher::Config::default();
    let namespaces = settings.discovery_selector.as_ref().map(|selector| {
        reflect(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(selector),
            notify.clone(),
        )
    });
    let slice_resource = endpoint_slice_resource(&client).await;
    let slices = {
        let writer = reflector::store::Writer::new(slice_resource.clone());
        let reader = writer.as_reader();
        let stream = reflector::reflector(
            writer,
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), &slice_resource),
                all.clone(),
            )
            .default_backoff(),
        );
        let notify = notify.clone();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => notify.notify_one(),
                    Err(e) => tracing::warn!(kind = "EndpointSlice", error = %e, "watch"),
                }
            }
        });
        reader
    };
    let stores = Stores {
        namespaces,
        pods: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        services: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        slices,
        traffic: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        authorization: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        request_authentication: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        peer_authentication: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
        workflows: reflect(Api::all(client.clone()), all.clone(), notify.clone()),
    };
    let (leader_tx, leader_rx) = watch::channel(false);
    tokio::spawn(leader::run(
        client.clone(),
        settings.namespace.clone(),
        settings.holder.clone(),
        settings.lease_duration,
        leader_tx,
    ));
    // Serve nothing rather than a partial cluster: wait for every store's first list.
    let ready = async {
        if let Some(ns) = &stores.namespaces {
            let _ = ns.wait_until_ready().await;
        }
        let _ = stores.pods.wait_until_ready().await;
        let _ = stores.services.wait_until_ready().await;
        let _ = stores.slices.wait_until_ready().await;
        let _ = stores.traffic.wait_until_ready().await;
        let _ = stores.authorization.wait_until_ready().await;
        let _ = stores.request_authentication.wait_until_ready().await;
        let _ = stores.peer_authentication.wait_until_ready().await;
        let _ = stores.workflows.wait_until_ready().await;
    };
    if tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .is_err()
    {
        tracing::error!(
            "not every resource could be listed within 30 s (are the meshflow CRDs installed? \
             `kubectl apply -f charts/meshflow/crds/`); serving what could be read and retrying"
        );
    }
    let mut controller = Controller {
        client,
        settings,
        state,
        metrics,
        coordinator,
        jwks,
        stores,
        verdicts: HashMap::new(),
        last_good: HashMap::new(),
        leader: leader_rx,
        published: None,
        resolved: None,
        last_resolve: std::time::Instant::now(),
    };
    controller.reconcile().await;
    tokio::spawn(controller.run(notify));
    Ok(())
}

impl Controller {
    async fn run(mut self, notify: Arc<Notify>) {
        loop {
            tokio::select! {
                () = notify.notified() => {}
                changed = self.leader.changed() => {
                    if changed.is_err() { return; }
                }
                // Key sets fetched from a `jwksUri` are fetched again now and then.
                () = tokio::time::sleep(crate::jwks::JWKS_REFRESH) => {}
            }
            // Coalesce a burst of events (a rollout touches many objects at once).
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.reconcile().await;
        }
    }

    /// Rebuilds the model from the stores, publishes it when it changed, and (leader only)
    /// writes status.
    async fn reconcile(&mut self) {
        let selected_names: Option<BTreeSet<String>> = self
            .stores
            .namespaces
            .as_ref()
            .map(|s| s.state().iter().map(|n| n.name_any()).collect());
        let selected = |ns: &str| selected_names.as_ref().is_none_or(|n| n.contains(ns));
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
        for key in self.judge_policies(&traffic, &selected, &mut present) {
            let Some((_, set)) = self.last_good.get(&key) else {
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
        for key in self.judge_policies(&authorization, &selected, &mut present) {
            if let Some((_, set)) = self.last_good.get(&key) {
                policies
                    .authorization
                    .extend(set.authorization.iter().cloned());
            }
        }
        for key in self.judge_policies(&request_authentication, &selected, &mut present) {
            if let Some((_, set)) = self.last_good.get(&key) {
                policies
                    .request_authentication
                    .extend(set.request_authentication.iter().cloned());
            }
        }
        for key in self.judge_policies(&peer_authentication, &selected, &mut present) {
            if let Some((_, set)) = self.last_good.get(&key) {
                policies
                    .peer_authentication
                    .extend(set.peer_authentication.iter().cloned());
            }
        }
        self.judge_workflows(&workflows, &selected, &mut present)
            .await;
        // Objects gone from the cluster are gone from config and from the caches.
        self.verdicts.retain(|k, _| present.contains(k));
        self.last_good.retain(|k, _| present.contains(k));
        // Publish with the key sets known so far, then fetch `jwksUri`s when the policies
        // changed or the keys are due (a slow JWKS host never delays a policy change, as with
        // the mesh file).
        let mut served = policies.clone();
        self.jwks.fill(&mut served);
        self.publish(mesh.clone(), services.clone(), served);
        if JwksResolver::needs_refresh(&policies)
            && (self.resolved.as_ref() != Some(&policies)
                || self.last_resolve.elapsed() >= crate::jwks::JWKS_REFRESH)
        {
            let mut fetched = policies.clone();
            self.jwks.resolve(&mut fetched, None).await;
            self.publish(mesh, services, fetched);
            self.resolved = Some(policies);
            self.last_resolve = std::time::Instant::now();
        }
        let leading = *self.leader.borrow();
        self.metrics.leader.set(i64::from(leading));
        if leading {
            self.write_statuses(&traffic, &conflicts).await;
            self.write_statuses(&authorization, &conflicts).await;
            self.write_statuses(&request_authentication, &conflicts)
                .await;
            self.write_statuses(&peer_authentication, &conflicts).await;
            self.write_statuses(&workflows, &conflicts).await;
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
    /// version is to be served, in (namespace, name) order.
    fn judge_policies<R: MeshflowResource>(
        &mut self,
        objects: &[Arc<R>],
        selected: &(dyn Fn(&str) -> bool + Sync),
        present: &mut BTreeSet<ObjectKey>,
    ) -> Vec<ObjectKey> {
        let mut keys = Vec::new();
        for object in objects {
            let Some(key) = key_of(object.as_ref(), selected) else {
                continue;
            };
            present.insert(key.clone());
            let (uid, generation) = uid_generation(object.as_ref());
            let fresh = self
                .verdicts
                .get(&key)
                .is_some_and(|v| v.uid == uid && v.generation == generation);
            if !fresh {
                let outcome = match crd::policy_from_resource(object.as_ref()) {
                    Ok(set) => {
                        self.last_good
                            .insert(key.clone(), (uid.clone(), set.clone()));
                        Ok(Accepted::Policy)
                    }
                    Err(rejection) => {
                        self.metrics.rejected.with_label_values(&[R::KIND]).inc();
                        tracing::warn!(object = %object.origin(), generation, %rejection, "rejected; the previous good version stays in force");
                        Err(("Invalid".to_string(), rejection))
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
            if self.last_good.get(&key).is_some_and(|(u, _)| *u == uid) {
                keys.push(key);
            }
        }
        keys.sort();
        keys
    }

    /// Validates and registers every new generation of a Workflow with the coordinator.
    async fn judge_workflows(
        &mut self,
        objects: &[Arc<WorkflowResource>],
        selected: &(dyn Fn(&str) -> bool + Sync),
        present: &mut BTreeSet<ObjectKey>,
    ) {
        for object in objects {
            let Some(key) = key_of(object.as_ref(), selected) else {
                continue;
            };
            present.insert(key.clone());
            let (uid, generation) = uid_generation(object.as_ref());
            if self
                .verdicts
                .get(&key)
                .is_some_and(|v| v.uid == uid && v.generation == generation)
            {
                continue;
            }
            let outcome = match crd::workflow_from_resource(object) {
                Err(rejection) => Err(("Invalid".to_string(), rejection)),
                Ok(_) => match &self.coordinator {
                    None => Err((
                        "NoCoordinator".to_string(),
                        Rejection {
                            field: ".".into(),
                            message: "this control plane runs no workflow coordinator \
                                      (--workflow-api)"
                                .into(),
                        },
                    )),
                    Some(coordinator) => {
                        match coordinator
                            .register(&object.origin(), &object.to_document())
                            .await
                        {
                            Ok((_, version)) => Ok(Accepted::Workflow(version)),
                            Err(e) => Err((
                                "RegistrationFailed".to_string(),
                                Rejection {
                                    field: ".".into(),
                                    message: e.to_string(),
                                },
                            )),
                        }
                    }
                },
            };
            if let Err((_, rejection)) = &outcome {
                self.metrics.rejected.with_label_values(&["Workflow"]).inc();
                tracing::warn!(object = %object.origin(), generation, %rejection, "workflow not registered");
            }
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

    /// Writes `Accepted` (and a Workflow's registered version) where the object's status does
    /// not say it yet.
    async fn write_statuses<R: MeshflowResource + serde::Serialize>(
        &self,
        objects: &[Arc<R>],
        conflicts: &HashMap<ObjectKey, Rejection>,
    ) {
        let resource = ApiResource::erase::<R>(&());
        for object in objects {
            let Some(ns) = object.meta().namespace.clone() else {
                continue;
            };
            let key: ObjectKey = (R::KIND, ns.clone(), object.name_any());
            let Some(verdict) = self.verdicts.get(&key) else {
                continue;
            };
            let (status, reason, message, version) = match (&verdict.outcome, conflicts.get(&key)) {
                (Ok(_), Some(conflict)) => {
                    ("False", "Conflict".to_string(), conflict.to_string(), None)
                }
                (Ok(Accepted::Workflow(v)), None) => (
                    "True",
                    "Registered".to_string(),
                    format!("registered with the coordinator as version {v}"),
                    Some(*v),
                ),
                (Ok(Accepted::Policy), None) => (
                    "True",
                    "Accepted".to_string(),
                    "validated and served to the selected workloads".to_string(),
                    None,
                ),
                (Err((reason, rejection)), _) => {
                    let kept = if self
                        .last_good
                        .get(&key)
                        .is_some_and(|(u, _)| *u == verdict.uid)
                    {
                        " (the previous accepted generation stays in force)"
                    } else {
                        ""
                    };
                    ("False", reason.clone(), format!("{rejection}{kept}"), None)
                }
            };
            let current = serde_json::to_value(object.as_ref())
                .ok()
                .and_then(|v| v.get("status").cloned())
                .unwrap_or_default();
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
                    || current.get("registeredVersion") == Some(&serde_json::json!(version)));
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
            let mut status_json = serde_json::json!({
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
                status_json["registeredVersion"] = serde_json::json!(v);
            }
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &resource);
            let patch = serde_json::json!({ "status": status_json });
            match api
                .patch_status(&key.2, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => self.metrics.status_writes.with_label_values(&["ok"]).inc(),
                Err(e) => {
                    self.metrics
                        .status_writes
                        .with_label_values(&["error"])
                        .inc();
                    tracing::warn!(object = %object.origin(), error = %e, "status update failed");
                }
            }
        }
    }
}

fn key_of<R: MeshflowResource>(
    object: &R,
    selected: &(dyn Fn(&str) -> bool + Sync),
) -> Option<ObjectKey> {
    let ns = object.meta().namespace.clone()?;
    if !selected(&ns) {
        return None;
    }
    Some((R::KIND, ns, object.meta().name.clone()?))
}

fn uid_generation<R: Resource>(object: &R) -> (String, i64) {
    (
        object.meta().uid.clone().unwrap_or_default(),
        object.meta().generation.unwrap_or(0),
    )
}
