//! The local mesh definition (`kind: Mesh`): the workloads of a mesh run on one machine by
//! `meshflow up`, and the source of truth for the control plane in local mode.
//!
//! ```yaml
//! apiVersion: meshflow.io/v1alpha1
//! kind: Mesh
//! metadata: { name: hello }
//! spec:
//!   trustDomain: cluster.local        # default
//!   workloads:
//!     - name: backend                 # also the service name unless `service` is set
//!       namespace: default            # default
//!       serviceAccount: backend       # default: the name
//!       labels: { app: backend }
//!       app:
//!         protocol: grpc              # http1 | h2c | grpc
//!         port: 8080                  # optional; `meshflow up` picks a free one for `command`
//!         command: ["meshflow-echo", "--name", "backend"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::load::{find_line, load_yaml, parse_yaml, LoadError, Result};
use crate::spiffe::SpiffeId;

/// Namespace of the control plane's own identity (reserved).
pub const CONTROL_PLANE_NAMESPACE: &str = "meshflow-system";
/// Service account of the control plane's own identity (reserved).
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "meshflow-control-plane";

/// The API version every meshflow kind uses.
pub const API_VERSION: &str = "meshflow.io/v1alpha1";

/// Kubernetes object metadata (the subset meshflow reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace; kinds that need one default to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations (kept, not interpreted).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A whole mesh definition file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    /// Must be `meshflow.io/v1alpha1`.
    pub api_version: String,
    /// Must be `Mesh`.
    pub kind: String,
    /// Metadata; `name` names the mesh.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The mesh.
    pub spec: MeshSpec,
}

/// The mesh: trust domain and workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// SPIFFE trust domain of every identity in the mesh. Default `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The workloads, each with one sidecar.
    pub workloads: Vec<Workload>,
    /// Directory of policy YAML (TrafficPolicy, …), relative to the mesh file. Watched like the
    /// mesh file. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies_dir: Option<String>,
    /// What `meshflow up --smoke` sends. Default: a GET from the first workload to the second's
    /// service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<Smoke>,
}

/// One workload: an app plus its sidecar, with one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    /// Workload name, unique per namespace (DNS-1123 label).
    pub name: String,
    /// Namespace. Default `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Service account, which the SPIFFE ID names. Default: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The service this workload is an endpoint of. Default: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Labels, matched by policy selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The application behind the sidecar.
    #[serde(default)]
    pub app: App,
}

/// The application a sidecar forwards inbound requests to, on 127.0.0.1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct App {
    /// The protocol the app speaks on its port.
    #[serde(default)]
    pub protocol: AppProtocol,
    /// TCP port on 127.0.0.1. When absent and `command` is set, `meshflow up` picks a free port
    /// and passes it to the command as `$PORT` and in place of `{port}` in its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Command `meshflow up` starts (argv; the first element is looked up on `PATH` and next to
    /// the `meshflow` binary).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A part of meshflow instead of a command: `coordinator` makes this workload the workflow
    /// coordinator (its app is the control plane's workflow API; step calls leave through this
    /// workload's sidecar, so policies name its identity). At most one per mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinApp>,
}

/// Built-in apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinApp {
    /// The workflow coordinator.
    Coordinator,
}

/// Application protocol on the sidecar → app hop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (RFC 9112).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (RFC 9113 §3.3).
    H2c,
    /// gRPC over h2c.
    Grpc,
}

/// What `meshflow up --smoke` sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Smoke {
    /// Workload whose outbound listener sends the request.
    pub from: String,
    /// Request URL, e.g. `http://backend.default/hello`.
    pub url: String,
}

fn default_trust_domain() -> String {
    "cluster.local".to_string()
}

fn default_namespace() -> String {
    "default".to_string()
}

impl Workload {
    /// The service account (defaults to the workload name).
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// The service name (defaults to the workload name).
    pub fn service(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }

    /// `<namespace>/<name>`, the key meshflow uses for a workload everywhere.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload's SPIFFE ID in `trust_domain`.
    ///
    /// # Errors
    /// When the namespace or service account is not a valid SPIFFE path component.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, crate::spiffe::SpiffeIdError> {
        SpiffeId::new(trust_domain, &self.namespace, self.service_account())
    }
}

impl MeshFile {
    /// Parses and validates a mesh file's text (`file` is used in messages).
    ///
    /// # Errors
    /// [`LoadError::Parse`] for YAML/shape errors, [`LoadError::Invalid`] for rule violations —
    /// both with file, field path and line. A `policiesDir` (relative to `file`'s directory)
    /// that does not exist is invalid (`spec.policiesDir`).
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let mesh: MeshFile = parse_yaml(file, text)?;
        mesh.validate(file, text)?;
        Ok(mesh)
    }

    /// Reads, parses and validates a mesh file.
    ///
    /// # Errors
    /// As [`MeshFile::parse`], plus [`LoadError::Io`].
    pub fn load(file: &Path) -> Result<Self> {
        let (mesh, text): (MeshFile, String) = load_yaml(file)?;
        mesh.validate(file, &text)?;
        Ok(mesh)
    }

    fn validate(&self, file: &Path, text: &str) -> Result<()> {
        let invalid = |field: String, line: usize, message: String| LoadError::Invalid {
            file: file.to_path_buf(),
            line,
            field,
            message,
        };
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion".into(),
                find_line(text, "apiVersion", ""),
                format!("must be {API_VERSION}, got {:?}", self.api_version),
            ));
        }
        if self.kind != "Mesh" {
            return Err(invalid(
                "kind".into(),
                find_line(text, "kind", ""),
                format!("must be Mesh, got {:?}", self.kind),
            ));
        }
        let spec = &self.spec;
        if SpiffeId::new(&spec.trust_domain, "x", "x").is_err() {
            return Err(invalid(
                "spec.trustDomain".into(),
                find_line(text, "trustDomain", ""),
                format!("{:?} is not a valid trust domain", spec.trust_domain),
            ));
        }
        if spec.workloads.is_empty() {
            return Err(invalid(
                "spec.workloads".into(),
                find_line(text, "workloads", ""),
                "a mesh needs at least one workload".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut services_by_identity: BTreeMap<(String, String), String> = BTreeMap::new();
        for (i, w) in spec.workloads.iter().enumerate() {
            let line = find_line(text, "name", &w.name);
            let field = |f: &str| format!("spec.workloads[{i}].{f}");
            if let Err(e) = w.spiffe_id(&spec.trust_domain) {
                return Err(invalid(field("name"), line, e.to_string()));
            }
            if SpiffeId::new("x", &w.name, "x").is_err() {
                return Err(invalid(
                    field("name"),
                    line,
                    format!("{:?} is not a DNS-1123 label", w.name),
                ));
            }
            if SpiffeId::new("x", w.service(), "x").is_err() {
                return Err(invalid(
                    field("service"),
                    line,
                    format!("{:?} is not a DNS-1123 label", w.service()),
                ));
            }
            if !seen.insert(w.key()) {
                return Err(invalid(
                    field("name"),
                    line,
                    format!("duplicate workload {}", w.key()),
                ));
            }
            if w.namespace == CONTROL_PLANE_NAMESPACE
                && w.service_account() == CONTROL_PLANE_SERVICE_ACCOUNT
            {
                return Err(invalid(
                    field("serviceAccount"),
                    line,
                    format!(
                        "{CONTROL_PLANE_NAMESPACE}/{CONTROL_PLANE_SERVICE_ACCOUNT} is the control plane's identity; a workload may not have it"
                    ),
                ));
            }
            // One identity, one service: otherwise a holder of the identity could register
            // itself as an endpoint of the other service and pass its callers' identity check.
            let identity = (w.namespace.clone(), w.service_account().to_string());
            if let Some(other) = services_by_identity.insert(identity, w.service().to_string()) {
                if other != w.service() {
                    return Err(invalid(
                        field("serviceAccount"),
                        line,
                        format!(
                            "service account {}/{} already serves service {other}; workloads sharing an identity must serve the same service",
                            w.namespace,
                            w.service_account()
                        ),
                    ));
                }
            }
            if w.app.builtin.is_some() && !w.app.command.is_empty() {
                return Err(invalid(
                    field("app.builtin"),
                    find_line(text, "builtin", ""),
                    "give builtin or command, not both".into(),
                ));
            }
            if w.app.builtin.is_some()
                && spec.workloads[..i].iter().any(|o| o.app.builtin.is_some())
            {
                return Err(invalid(
                    field("app.builtin"),
                    find_line(text, "builtin", ""),
                    "only one workload can be the coordinator".into(),
                ));
            }
            if w.app.port == Some(0) {
                return Err(invalid(
                    field("app.port"),
                    find_line(text, "port", "0"),
                    "port 0 is not allowed; omit the field to let `meshflow up` pick one".into(),
                ));
            }
        }
        if let Some(smoke) = &spec.smoke {
            if !spec.workloads.iter().any(|w| w.name == smoke.from) {
                return Err(invalid(
                    "spec.smoke.from".into(),
                    find_line(text, "from", &smoke.from),
                    format!("no workload named {:?}", smoke.from),
                ));
            }
        }
        // A policy directory that is not there is an error, not "no policies": a typo would
        // otherwise run the mesh with every AuthorizationPolicy silently missing.
        if let Some(dir) = self.policies_dir(file) {
            let problem = match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => None,
                Ok(_) => Some("is not a directory"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist"),
                Err(_) => Some("cannot be read"),
            };
            if let Some(problem) = problem {
                return Err(invalid(
                    "spec.policiesDir".into(),
                    find_line(text, "policiesDir", ""),
                    format!(
                        "policy directory {} {problem} (policiesDir is relative to the mesh file's directory)",
                        dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The policy directory of a mesh file at `mesh_path`, if it names one (validation
    /// requires it to exist).
    pub fn policies_dir(&self, mesh_path: &Path) -> Option<std::path::PathBuf> {
        let dir = self.spec.policies_dir.as_ref()?;
        Some(mesh_path.parent().unwrap_or(Path::new(".")).join(dir))
    }

    /// The workload with key `<namespace>/<name>`.
    pub fn workload(&self, key: &str) -> Option<&Workload> {
        self.spec.workloads.iter().find(|w| w.key() == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata:
  name: hello
spec:
  workloads:
    - name: frontend
    - name: backend
      app:
        protocol: grpc
        port: 9000
";

    #[test]
    fn parses_with_defaults() {
        let mesh = MeshFile::parse(Path::new("m.yaml"), GOOD).unwrap();
        assert_eq!(mesh.spec.trust_domain, "cluster.local");
        let backend = mesh.workload("default/backend").unwrap();
        assert_eq!(backend.app.protocol, AppProtocol::Grpc);
        assert_eq!(
            backend.spiffe_id("cluster.local").unwrap().uri(),
            "spiffe://cluster.local/ns/default/sa/backend"
        );
    }

    #[test]
    fn unknown_field_names_file_field_and_line() {
        let text = GOOD.replace("        port: 9000", "        prot: 9000");
        let err = MeshFile::parse(Path::new("m.yaml"), &text).unwrap_err();
        assert_eq!(err.line(), 11, "{err}");
        assert_eq!(err.field(), "spec.workloads[1].app.prot", "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("m.yaml:11: spec.workloads[1].app.prot: unknown field `prot`"),
            "{msg}"
        );
    }

    #[test]
    fn identities_are_not_shared_across_services_or_with_the_control_plane() {
        let text = GOOD.replace(
            "    - name: backend\n",
            "    - name: backend\n      serviceAccount: frontend\n",
        );
        let err = MeshFile::parse(Path::new("m.yaml"), &text).unwrap_err();
        assert!(
            err.to_string().contains("already serves service frontend"),
            "{err}"
        );
        let text = GOOD.replace(
            "    - name: frontend\n",
            "    - name: frontend\n      namespace: meshflow-system\n      serviceAccount: meshflow-control-plane\n",
        );
        let err = MeshFile::parse(Path::new("m.yaml"), &text).unwrap_err();
        assert!(
            err.to_string().contains("control plane's identity"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_policy_directory_is_an_error_naming_file_field_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        let text = format!("{GOOD}  policiesDir: policies\n");
        let err = MeshFile::parse(&file, &text).unwrap_err();
        assert_eq!(err.field(), "spec.policiesDir", "{err}");
        assert_eq!(err.line(), 12, "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "{}:12: spec.policiesDir: policy directory ",
                file.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("does not exist"), "{msg}");
        // A file where the directory should be.
        std::fs::write(dir.path().join("policies"), "").unwrap();
        let err = MeshFile::parse(&file, &text).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        std::fs::remove_file(dir.path().join("policies")).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let mesh = MeshFile::parse(&file, &text).unwrap();
        assert_eq!(mesh.policies_dir(&file), Some(dir.path().join("policies")));
    }

    #[test]
    fn bad_enum_and_duplicates_are_located() {
        let text = GOOD.replace("protocol: grpc", "protocol: http3");
        let err = MeshFile::parse(Path::new("m.yaml"), &text).unwrap_err();
        assert_eq!(err.field(), "spec.workloads[1].app.protocol", "{err}");
        assert_eq!(err.line(), 10, "{err}");

        let text = GOOD.replace("name: backend", "name: frontend");
        let err = MeshFile::parse(Path::new("m.yaml"), &text).unwrap_err();
        assert!(
            err.to_string()
                .contains("duplicate workload default/frontend"),
            "{err}"
        );
        assert_eq!(err.field(), "spec.workloads[1].name");
    }
}
