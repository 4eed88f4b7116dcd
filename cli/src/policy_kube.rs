//! `meshflow policy check --kubernetes`: the [`Target`] and the [`PolicySet`] come from a
//! Kubernetes cluster (like `istioctl x authz check`) instead of a policy directory; the
//! decision is then [`crate::policy_check::check`], the same evaluation as every other mode.
//!
//! A workload is a pod: its namespace and labels select the policies, its ServiceAccount gives
//! its SPIFFE ID (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`). The policies read are the
//! AuthorizationPolicy, RequestAuthentication and PeerAuthentication custom resources of the
//! pod's namespace and of the root namespace (`meshflow-system`, mesh-wide), each validated by
//! the policy-file code ([`crd::policy_from_resource`], as the control plane does) and merged
//! in the control plane's order (by namespace, then name). TrafficPolicy plays no part in an
//! inbound decision and is not read.
//!
//! The control plane keeps the previous good version of a custom resource in force when its
//! current generation is invalid; only the current generation can be read here, so an invalid
//! one is reported ([`ClusterPolicies::invalid`]) and left out of the evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use meshflow_policies::authz::ROOT_NAMESPACE;
use meshflow_policies::crd::{
    self, AuthorizationPolicyResource, MeshflowResource, PeerAuthenticationResource, Rejection,
    RequestAuthenticationResource,
};
use meshflow_policies::documents::PolicySet;

use crate::policy_check::Target;

/// Where the cluster is: a kubeconfig file and context, or (neither given) `KUBECONFIG` /
/// `~/.kube/config` / the in-cluster config, as kubectl finds them.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// A kubeconfig file instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig other than its current one.
    pub context: Option<String>,
}

/// The hint printed when the meshflow CRDs are missing.
pub const INSTALL_CRDS: &str = "kubectl apply -f charts/meshflow/crds/";

/// A client for the cluster `options` names, and its address (for messages).
///
/// # Errors
/// No kubeconfig (and not in a pod), an unreadable kubeconfig, an unknown context.
pub async fn client(options: &ClusterOptions) -> Result<(kube::Client, String), String> {
    // kube's rustls needs a process-wide crypto provider (an already installed one is fine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match (&options.kubeconfig, &options.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {}", path.display(), chain(&e)))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube_options)
                .await
                .map_err(|e| format!("--kubeconfig {}: {}", path.display(), chain(&e)))?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&kube_options)
            .await
            .map_err(|e| format!("--context {context}: {}", chain(&e)))?,
        (None, None) => kube::Config::infer().await.map_err(|e| {
            format!(
                "no Kubernetes cluster configured (set KUBECONFIG or give --kubeconfig; in a pod, the in-cluster config is used): {}",
                chain(&e)
            )
        })?,
    };
    // A command, not a controller: fail fast when nothing answers.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| format!("Kubernetes client for {url}: {}", chain(&e)))?;
    Ok((client, url))
}

/// An error and its sources, `: `-separated (kube's top-level messages alone say little, e.g.
/// "ServiceError: client error (Connect)").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// A failed API call as a message: `what` is the object or list asked for. Anything but an
/// API server's answer means the cluster was not reachable.
fn describe(error: &kube::Error, what: &str, url: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "the API server at {url} refuses to let you read {what}: {}",
            status.message
        ),
        kube::Error::Api(status) => format!(
            "{what}: the API server at {url} answered {} {}: {}",
            status.code, status.reason, status.message
        ),
        other => format!(
            "cannot reach the Kubernetes API server at {url}: {}",
            chain(other)
        ),
    }
}

/// Pod `namespace/name` as the target workload: its namespace, labels and SPIFFE ID (from its
/// ServiceAccount, `default` when it names none, in `trust_domain`). Also the application
/// port, when the pod declares exactly one container port.
///
/// # Errors
/// The pod does not exist (named), or the API server cannot be read.
pub async fn pod_target(
    client: &kube::Client,
    url: &str,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<(Target, Option<u16>), String> {
    let pod = get_pod(client, url, namespace, name).await?;
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    let ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    let target = Target {
        namespace: namespace.to_string(),
        labels,
        spiffe_id: Some(format!(
            "spiffe://{}",
            pod_principal(&pod, namespace, trust_domain)
        )),
    };
    Ok((target, (ports.len() == 1).then(|| ports[0])))
}

/// The principal (`<td>/ns/<ns>/sa/<sa>`) of pod `namespace/name`, for `--source-pod`.
///
/// # Errors
/// The pod does not exist (named), or the API server cannot be read.
pub async fn pod_source_principal(
    client: &kube::Client,
    url: &str,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<String, String> {
    let pod = get_pod(client, url, namespace, name).await?;
    Ok(pod_principal(&pod, namespace, trust_domain))
}

fn pod_principal(pod: &Pod, namespace: &str, trust_domain: &str) -> String {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    format!("{trust_domain}/ns/{namespace}/sa/{account}")
}

async fn get_pod(
    client: &kube::Client,
    url: &str,
    namespace: &str,
    name: &str,
) -> Result<Pod, String> {
    let what = format!("pod {namespace}/{name}");
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| describe(&e, &what, url))?
        .ok_or_else(|| format!("pod {name} not found in namespace {namespace} (at {url})"))
}

/// A custom resource that is not evaluated: the current generation is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidResource {
    /// `<Kind> <namespace>/<name>`.
    pub origin: String,
    /// The field and what is wrong, as the control plane's `Accepted=False` status says it.
    pub rejection: Rejection,
}

impl std::fmt::Display for InvalidResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is invalid ({}: {}) and is left out of this check; the control plane keeps its previous accepted version in force, if it had one",
            self.origin, self.rejection.field, self.rejection.message
        )
    }
}

/// The policies in force for workloads of one namespace, as far as the cluster shows them.
#[derive(Debug, Clone, Default)]
pub struct ClusterPolicies {
    /// The valid custom resources, merged in the control plane's order.
    pub set: PolicySet,
    /// The invalid ones (not in `set`).
    pub invalid: Vec<InvalidResource>,
    /// What else the user should know (a root namespace the discovery selector leaves out).
    pub notes: Vec<String>,
}

/// Whether namespace `name` exists and matches the label selector `selector` (the control
/// plane's `--discovery-selector`, evaluated by the API server as the control plane's watch
/// is).
async fn selects(
    client: &kube::Client,
    url: &str,
    selector: &str,
    name: &str,
) -> Result<bool, String> {
    let params = ListParams::default()
        .labels(selector)
        .fields(&format!("metadata.name={name}"));
    let found = Api::<Namespace>::all(client.clone())
        .list(&params)
        .await
        .map_err(|e| describe(&e, &format!("namespace {name}"), url))?;
    Ok(!found.items.is_empty())
}

/// Reads the AuthorizationPolicy, RequestAuthentication and PeerAuthentication custom
/// resources that can select a workload of `namespace`: that namespace's and the root
/// namespace's.
///
/// # Errors
/// The CRDs are not installed (with the command that installs them), the API server refuses
/// (RBAC) or cannot be reached.
pub async fn cluster_policies(
    client: &kube::Client,
    url: &str,
    namespace: &str,
    discovery_selector: Option<&str>,
) -> Result<ClusterPolicies, String> {
    let mut namespaces = vec![namespace];
    if namespace != ROOT_NAMESPACE {
        namespaces.push(ROOT_NAMESPACE);
    }
    let mut notes = Vec::new();
    if let Some(selector) = discovery_selector {
        // The control plane reads only the namespaces its `--discovery-selector` selects.
        let mut selected = Vec::new();
        for ns in namespaces {
            if selects(client, url, selector, ns).await? {
                selected.push(ns);
            } else if ns == namespace {
                return Err(format!(
                    "namespace {ns} does not match the discovery selector {selector:?}: the control plane leaves it out of the mesh"
                ));
            } else {
                notes.push(format!(
                    "note: namespace {ns} does not match the discovery selector {selector:?}: its mesh-wide policies are not in force"
                ));
            }
        }
        namespaces = selected;
    }
    let (authorization, request_authentication, peer_authentication) = futures::try_join!(
        list::<AuthorizationPolicyResource>(client, url, &namespaces),
        list::<RequestAuthenticationResource>(client, url, &namespaces),
        list::<PeerAuthenticationResource>(client, url, &namespaces),
    )?;
    let mut policies = ClusterPolicies {
        notes,
        ..ClusterPolicies::default()
    };
    for (objects, merge) in [
        (
            judge::<AuthorizationPolicyResource>(authorization),
            (|into: &mut PolicySet, from: PolicySet| into.authorization.extend(from.authorization))
                as fn(&mut PolicySet, PolicySet),
        ),
        (
            judge::<RequestAuthenticationResource>(request_authentication),
            |into, from| {
                into.request_authentication
                    .extend(from.request_authentication)
            },
        ),
        (
            judge::<PeerAuthenticationResource>(peer_authentication),
            |into, from| into.peer_authentication.extend(from.peer_authentication),
        ),
    ] {
        for (origin, outcome) in objects {
            match outcome {
                Ok(set) => merge(&mut policies.set, set),
                Err(rejection) => policies.invalid.push(InvalidResource { origin, rejection }),
            }
        }
    }
    Ok(policies)
}

/// Every object of kind `R` in `namespaces`, as the API server returns them (untyped: one
/// object the spec type cannot read must not hide the others).
async fn list<R: MeshflowResource>(
    client: &kube::Client,
    url: &str,
    namespaces: &[&str],
) -> Result<Vec<serde_json::Value>, String> {
    let resource = ApiResource::erase::<R>(&());
    let mut objects = Vec::new();
    for namespace in namespaces {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
        let listed = api.list(&ListParams::default()).await.map_err(|e| match &e {
            kube::Error::Api(status) if status.code == 404 => format!(
                "the meshflow CRDs are not installed in the cluster at {url} (it does not serve {}.{}/{}): run `{INSTALL_CRDS}`",
                resource.plural, resource.group, resource.version
            ),
            _ => describe(&e, &format!("{} in namespace {namespace}", resource.plural), url),
        })?;
        for object in listed.items {
            objects.push(serde_json::to_value(&object).map_err(|e| e.to_string())?);
        }
    }
    Ok(objects)
}

/// Validates each object with the policy-file code, in the control plane's order (namespace,
/// then name): (`<Kind> <ns>/<name>`, its policies or why it is refused).
pub fn judge<R: MeshflowResource + serde::de::DeserializeOwned>(
    objects: Vec<serde_json::Value>,
) -> Vec<(String, Result<PolicySet, Rejection>)> {
    let key = |o: &serde_json::Value| {
        let meta = &o["metadata"];
        (
            meta["namespace"].as_str().unwrap_or_default().to_string(),
            meta["name"].as_str().unwrap_or_default().to_string(),
        )
    };
    let mut objects = objects;
    objects.sort_by_key(key);
    objects
        .into_iter()
        .map(|object| {
            let (namespace, name) = key(&object);
            let origin = format!("{} {namespace}/{name}", R::KIND);
            let outcome = match serde_json::from_value::<R>(object.clone()) {
                Ok(resource) => crd::policy_from_resource(&resource),
                // The spec type cannot read it: the policy-file parser names the field.
                Err(e) => Err(untyped_rejection(&origin, R::KIND, &object, &e.to_string())),
            };
            (origin, outcome)
        })
        .collect()
}

/// Why an object the spec type cannot deserialize is refused: the policy-file parser's
/// field and message for the same document, else serde's message.
fn untyped_rejection(
    origin: &str,
    kind: &str,
    object: &serde_json::Value,
    serde_message: &str,
) -> Rejection {
    let meta = &object["metadata"];
    let document = serde_json::json!({
        "apiVersion": meshflow_policies::mesh::API_VERSION,
        "kind": kind,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": meta.get("labels").cloned().unwrap_or_else(|| serde_json::json!({})),
        },
        "spec": object["spec"],
    });
    // JSON is YAML: the policy-file parser reads it as it is.
    match PolicySet::default().add_file(Path::new(origin), &document.to_string()) {
        Err(e) => Rejection::from(e),
        Ok(()) => Rejection {
            field: ".".into(),
            message: serde_message.to_string(),
        },
    }
}

/// Notes for the RequestAuthentication rules whose key set is fetched by the control plane
/// (`jwksUri`): their tokens are refused here.
pub fn key_set_notes(set: &PolicySet) -> Vec<String> {
    let mut notes = Vec::new();
    for policy in &set.request_authentication {
        for rule in &policy.spec.jwt_rules {
            if let (Some(uri), None) = (&rule.jwks_uri, &rule.jwks) {
                notes.push(format!(
                    "note: {} fetches its JWKS from {uri}; only the control plane fetches key sets, so its tokens are refused here (use --control-plane to check against the key sets in force)",
                    policy.id()
                ));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn authz(namespace: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "meshflow.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": name, "namespace": namespace, "generation": 1 },
            "spec": spec,
        })
    }

    #[test]
    fn judges_in_the_control_planes_order_and_names_the_invalid_field() {
        let judged = judge::<AuthorizationPolicyResource>(vec![
            authz("shop", "b", json!({ "action": "DENY", "rules": [{}] })),
            authz(ROOT_NAMESPACE, "z", json!({ "action": "CUSTOM" })),
            authz("shop", "a", json!({ "rules": [{}] })),
        ]);
        let origins: Vec<&str> = judged.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(
            origins,
            [
                "AuthorizationPolicy meshflow-system/z",
                "AuthorizationPolicy shop/a",
                "AuthorizationPolicy shop/b"
            ]
        );
        let rejection = judged[0].1.clone().unwrap_err();
        assert_eq!(rejection.field, "spec.action", "{rejection}");
        assert!(rejection.message.contains("CUSTOM"), "{rejection}");
        let set = judged[2].1.clone().unwrap();
        assert_eq!(set.authorization[0].id(), "shop/b");
    }

    #[test]
    fn an_object_the_spec_type_cannot_read_is_refused_with_its_field() {
        let judged = judge::<AuthorizationPolicyResource>(vec![authz(
            "shop",
            "typo",
            json!({ "rules": [{ "to": [{ "operation": { "methodz": ["GET"] } }] }] }),
        )]);
        let rejection = judged[0].1.clone().unwrap_err();
        assert!(rejection.field.contains("operation"), "{rejection}");
        assert!(rejection.to_string().contains("methodz"), "{rejection}");
    }
}
