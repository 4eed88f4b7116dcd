//! The spec kinds as Kubernetes CustomResources (`meshflow.io/v1alpha1`): the CRDs, generated
//! from the same Rust types the sidecar and the coordinator evaluate (kube's `CustomResource`
//! derive on each spec type, schemas by schemars), their `status`, and the conversion of a
//! custom resource into the document the rest of meshflow reads — validated by exactly the
//! code that validates a policy file.
//!
//! The CRDs are committed under `charts/meshflow/crds/`; [`crd_files`] renders them and a test
//! fails when the committed files differ (regenerate with `MESHFLOW_UPDATE_CRDS=1 cargo test -p
//! meshflow-policies --features kubernetes crd`).

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::CustomResourceExt;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::documents::PolicySet;
use crate::load::LoadError;
use crate::mesh::ObjectMeta;

pub use crate::authn::{PeerAuthenticationResource, RequestAuthenticationResource};
pub use crate::authz::AuthorizationPolicyResource;
pub use crate::traffic::TrafficPolicyResource;
pub use crate::workflow::WorkflowResource;

/// The API group of every meshflow kind.
pub const GROUP: &str = "meshflow.io";

/// The condition type every meshflow custom resource carries (Kubernetes API conventions:
/// `status` `True`/`False`, a CamelCase `reason`, a human `message`, `observedGeneration`).
pub const ACCEPTED: &str = "Accepted";

/// `status` of a policy kind (TrafficPolicy, AuthorizationPolicy, RequestAuthentication,
/// PeerAuthentication).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// `Accepted`: whether the control plane validated this generation and serves it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last generation the control plane accepted, and its spec: what stays in force while
    /// a newer generation is rejected — also across control-plane restarts and on every
    /// replica, since it lives in the object (written only through the `status` subresource,
    /// which needs its own RBAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_accepted: Option<LastAccepted>,
}

/// A generation the control plane accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastAccepted {
    /// Its `metadata.generation`.
    pub generation: i64,
    /// Its `spec`, as JSON text.
    pub spec: String,
}

/// `status` of a `Workflow`: `Accepted`, and the definition version the coordinator
/// registered for it (runs stay in the coordinator's store, never in the object).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// `Accepted`: whether the coordinator registered this generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The coordinator's version of this definition (1, 2, …; unchanged specs keep theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_version: Option<u32>,
}

/// Every meshflow CRD, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        TrafficPolicyResource::crd(),
        AuthorizationPolicyResource::crd(),
        RequestAuthenticationResource::crd(),
        PeerAuthenticationResource::crd(),
        WorkflowResource::crd(),
    ]
}

/// The committed CRD files: (file name, YAML), one CRD per file, e.g.
/// `authorizationpolicies.meshflow.io.yaml`.
///
/// # Panics
/// Never in practice: serializing a `CustomResourceDefinition` to YAML cannot fail.
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd).expect("a CRD serializes");
            (
                format!("{name}.yaml"),
                format!(
                    "# Generated from the meshflow-policies spec types: do not edit.\n\
                     # Regenerate: MESHFLOW_UPDATE_CRDS=1 cargo test -p meshflow-policies --features kubernetes crd\n{yaml}"
                ),
            )
        })
        .collect()
}

/// A custom resource whose spec is one of meshflow's spec types.
pub trait MeshflowResource: Resource<DynamicType = ()> + Clone + Send + Sync + 'static {
    /// The spec type.
    type Spec: Serialize;
    /// `kind`.
    const KIND: &'static str;
    /// The spec.
    fn spec(&self) -> &Self::Spec;
    /// The last accepted generation recorded in the status (policy kinds only).
    fn last_accepted(&self) -> Option<&LastAccepted>;
    /// Where the object is named in errors: `<Kind> <namespace>/<name>`.
    fn origin(&self) -> String {
        origin(Self::KIND, self.meta())
    }
    /// The object as the YAML document a policy file would hold (`apiVersion`, `kind`,
    /// `metadata` with name, namespace and labels, `spec`).
    fn to_document(&self) -> String {
        self.document_with(self.spec())
    }
    /// The object's document with another `spec` (e.g. a [`LastAccepted`] one, as JSON).
    fn document_with<S: Serialize>(&self, spec: &S) -> String {
        document(Self::KIND, self.meta(), spec)
    }
}

/// Where an object is named in errors: `<Kind> <namespace>/<name>`.
pub fn origin(kind: &str, meta: &kube::api::ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The YAML document a policy file would hold for an object of `kind` with `meta` (name,
/// namespace, labels) and `spec`.
pub fn document<S: Serialize>(kind: &str, meta: &kube::api::ObjectMeta, spec: &S) -> String {
    let doc = Document {
        api_version: crate::mesh::API_VERSION,
        kind,
        metadata: ObjectMeta {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: BTreeMap::new(),
        },
        spec,
    };
    serde_yaml::to_string(&doc).unwrap_or_default()
}

/// Decodes a custom resource read as untyped JSON (the control plane watches its kinds as
/// dynamic objects), so that one object the types cannot read — a number out of range, say —
/// is refused alone, naming the field, instead of failing the list of its whole kind.
///
/// # Errors
/// [`Rejection`] with the field path and what is wrong.
pub fn decode<R: serde::de::DeserializeOwned>(object: &serde_json::Value) -> Result<R, Rejection> {
    serde_path_to_error::deserialize(object).map_err(|e| Rejection {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a, S> {
    api_version: &'a str,
    kind: &'a str,
    metadata: ObjectMeta,
    spec: &'a S,
}

macro_rules! meshflow_resource {
    ($resource:ty, $spec:ty, $kind:literal) => {
        impl MeshflowResource for $resource {
            type Spec = $spec;
            const KIND: &'static str = $kind;
            fn spec(&self) -> &$spec {
                &self.spec
            }
            fn last_accepted(&self) -> Option<&LastAccepted> {
                self.status.as_ref().and_then(|s| s.last_accepted.as_ref())
            }
        }
    };
}
meshflow_resource!(
    TrafficPolicyResource,
    crate::traffic::TrafficPolicySpec,
    "TrafficPolicy"
);
meshflow_resource!(
    AuthorizationPolicyResource,
    crate::authz::AuthorizationSpec,
    "AuthorizationPolicy"
);
meshflow_resource!(
    RequestAuthenticationResource,
    crate::authn::RequestAuthenticationSpec,
    "RequestAuthentication"
);
meshflow_resource!(
    PeerAuthenticationResource,
    crate::authn::PeerAuthenticationSpec,
    "PeerAuthentication"
);
impl MeshflowResource for WorkflowResource {
    type Spec = crate::workflow::WorkflowSpec;
    const KIND: &'static str = "Workflow";
    fn spec(&self) -> &crate::workflow::WorkflowSpec {
        &self.spec
    }
    /// Registered versions live in the coordinator's store, not in the object.
    fn last_accepted(&self) -> Option<&LastAccepted> {
        None
    }
}

/// Why a custom resource is not accepted: the field path and what is wrong, as the same
/// validation reports it for a policy file (e.g. `spec.rules[0].to[0].operation.methods[0]:
/// "FETCH" is not an HTTP method`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Rejection {
    /// The field path (`.` for the whole object).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl From<LoadError> for Rejection {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Parse { field, message, .. } | LoadError::Invalid { field, message, .. } => {
                Rejection { field, message }
            }
            LoadError::Io { source, .. } => Rejection {
                field: ".".into(),
                message: source.to_string(),
            },
        }
    }
}

/// Validates one policy custom resource with the policy-file code and returns it as a
/// one-object [`PolicySet`] (merge several with [`PolicySet::merge`]).
///
/// # Errors
/// [`Rejection`] naming the field and what is wrong.
pub fn policy_from_resource<R: MeshflowResource>(resource: &R) -> Result<PolicySet, Rejection> {
    let mut set = PolicySet::default();
    set.add_file(Path::new(&resource.origin()), &resource.to_document())?;
    Ok(set)
}

/// The policy the [`LastAccepted`] spec of an object of `kind` with `meta` gives (validated
/// again: a spec recorded by an older control plane may no longer pass).
///
/// # Errors
/// [`Rejection`] when the recorded spec is not JSON or no longer valid.
pub fn policy_from_last_accepted(
    kind: &str,
    meta: &kube::api::ObjectMeta,
    last: &LastAccepted,
) -> Result<PolicySet, Rejection> {
    let spec: serde_json::Value = serde_json::from_str(&last.spec).map_err(|e| Rejection {
        field: "status.lastAccepted.spec".into(),
        message: e.to_string(),
    })?;
    let mut set = PolicySet::default();
    set.add_file(Path::new(&origin(kind, meta)), &document(kind, meta, &spec))?;
    Ok(set)
}

/// Validates a `Workflow` custom resource with the coordinator's validation (DAG, CEL
/// bounds…).
///
/// # Errors
/// [`Rejection`] naming the field and what is wrong (a cycle names its steps).
pub fn workflow_from_resource(
    resource: &WorkflowResource,
) -> Result<crate::workflow::Workflow, Rejection> {
    Ok(crate::workflow::Workflow::parse(
        Path::new(&resource.origin()),
        &resource.to_document(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds")
    }

    /// The committed CRDs are exactly what the spec types generate.
    #[test]
    fn crd_files_match_the_spec_types() {
        let dir = committed_dir();
        let update = std::env::var_os("MESHFLOW_UPDATE_CRDS").is_some();
        if update {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut stale = Vec::new();
        for (name, yaml) in crd_files() {
            let path = dir.join(&name);
            if update {
                std::fs::write(&path, &yaml).unwrap();
                continue;
            }
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "charts/meshflow/crds/ differs from the spec types for {stale:?}; regenerate with \
             MESHFLOW_UPDATE_CRDS=1 cargo test -p meshflow-policies --features kubernetes crd"
        );
        // No CRD file is left over from a kind that no longer exists.
        let expected: Vec<String> = crd_files().into_iter().map(|(n, _)| n).collect();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            assert!(
                expected.contains(&name),
                "stray file charts/meshflow/crds/{name}"
            );
        }
    }

    /// Structural: nowhere an untyped node except free-form JSON fields, durations carry a
    /// pattern, enums their values, and there is a status subresource and the printer columns.
    #[test]
    fn schemas_are_structural_and_carry_enums_and_patterns() {
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap();
            let version = &crd.spec.versions[0];
            assert!(
                version.subresources.as_ref().unwrap().status.is_some(),
                "{name}"
            );
            let columns: Vec<_> = version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.as_str())
                .collect();
            assert!(
                columns.contains(&"Accepted") && columns.contains(&"Age"),
                "{name}: {columns:?}"
            );
            let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
            let mut preserve = Vec::new();
            walk(&schema["openAPIV3Schema"], "", &mut preserve, &name);
            for path in &preserve {
                let allowed = [
                    "targetRef",
                    "targetRefs",
                    "provider",
                    "fromCookies",
                    "outputPayloadToHeader",
                    "outputClaimToHeaders",
                    "output",
                    "inputSchema",
                    "body",
                    "attempts",
                ];
                assert!(
                    allowed.iter().any(|a| path.ends_with(&format!(".{a}"))),
                    "{name}: free-form JSON at {path}"
                );
            }
        }
        let text = serde_json::to_string(&AuthorizationPolicyResource::crd()).unwrap();
        assert!(
            text.contains(r#""enum":["ALLOW","DENY","AUDIT","CUSTOM"]"#),
            "{text}"
        );
        let text = serde_json::to_string(&TrafficPolicyResource::crd()).unwrap();
        assert!(text.contains(&serde_json::to_string(crate::schema::DURATION_PATTERN).unwrap()));
    }

    fn walk(node: &serde_json::Value, path: &str, preserve: &mut Vec<String>, crd: &str) {
        let Some(obj) = node.as_object() else { return };
        if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&serde_json::Value::Bool(true)) {
            preserve.push(path.to_string());
            return;
        }
        if obj.get("x-kubernetes-int-or-string") == Some(&serde_json::Value::Bool(true)) {
            return;
        }
        assert!(obj.contains_key("type"), "{crd}: no type at {path}: {node}");
        for key in ["anyOf", "oneOf", "allOf", "patternProperties"] {
            assert!(!obj.contains_key(key), "{crd}: {key} at {path}: {node}");
        }
        if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), preserve, crd);
            }
        }
        if let Some(items) = obj.get("items") {
            walk(items, &format!("{path}[]"), preserve, crd);
        }
        if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
            walk(extra, &format!("{path}.*"), preserve, crd);
        }
    }

    fn resource<R: serde::de::DeserializeOwned>(yaml: &str) -> R {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_resource_is_validated_by_the_policy_file_code() {
        let good: AuthorizationPolicyResource = resource(
            r#"
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-get, namespace: shop, labels: { team: a } }
spec:
  selector: { matchLabels: { app: backend } }
  rules: [{ to: [{ operation: { methods: ["GET"] } }] }]
"#,
        );
        let set = policy_from_resource(&good).unwrap();
        assert_eq!(set.authorization.len(), 1);
        assert_eq!(set.authorization[0].id(), "shop/allow-get");
        let bad: AuthorizationPolicyResource = resource(
            r#"
apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: custom, namespace: shop }
spec: { action: CUSTOM }
"#,
        );
        let err = policy_from_resource(&bad).unwrap_err();
        assert_eq!(err.field, "spec.action", "{err}");
    }

    #[test]
    fn a_workflow_cycle_is_rejected_naming_the_cycle() {
        let wf: WorkflowResource = resource(
            r#"
apiVersion: meshflow.io/v1alpha1
kind: Workflow
metadata: { name: loop, namespace: shop }
spec:
  steps:
    - { name: a, dependsOn: [b], call: { service: x, path: /a } }
    - { name: b, dependsOn: [a], call: { service: x, path: /b } }
"#,
        );
        let err = workflow_from_resource(&wf).unwrap_err();
        assert!(err.message.contains("cycle"), "{err}");
    }
}
