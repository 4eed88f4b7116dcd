//! The gRPC contract between meshflow sidecars and the control plane (`proto/meshflow.proto`),
//! generated with tonic/prost.
//!
//! - `Identity.Certify`: CSR → X.509-SVID (SPIFFE), authenticated by a bootstrap token.
//! - `Config.Watch`: bidirectional stream; the sidecar sends `Hello` then one `Ack` per snapshot
//!   version (accepted or rejected with a reason), the control plane streams `Snapshot`s for the
//!   caller's workload only (identified by its SVID).
#![allow(missing_docs, clippy::all)]

pub mod peer_limit;

/// Generated code for package `meshflow.v1`.
pub mod v1 {
    tonic::include_proto!("meshflow.v1");
}

use serde::{Deserialize, Serialize};

/// The bootstrap file the control plane writes for each workload (local mode, mode 0600) and a
/// sidecar reads at start (`meshflow-proxy --bootstrap <file>`). JSON, camelCase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bootstrap {
    /// Control-plane gRPC address, `host:port`.
    pub control_plane: String,
    /// TLS server name the control plane's certificate carries.
    pub control_plane_server_name: String,
    /// Roots that verify the control plane and every SVID, PEM.
    pub trust_bundle_pem: String,
    /// Workload key `<namespace>/<name>`.
    pub workload: String,
    /// SPIFFE ID the sidecar will be issued.
    pub spiffe_id: String,
    /// Secret that authenticates `Certify` for this workload: the control plane's bootstrap
    /// token (local mode) or a ServiceAccount token (Kubernetes mode). Empty when
    /// `token_file` is given.
    #[serde(default)]
    pub token: String,
    /// Kubernetes mode: the pod's projected ServiceAccount token (audience `meshflow`), read
    /// again at every `Certify` because the kubelet rotates it. Takes the place of `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// Only for the `builtin: coordinator` workload: the secret its sidecar puts in
    /// [`SIDECAR_AUTH_HEADER`] on every request it forwards to its app (the workflow API), so
    /// the API can tell its own sidecar from any other local process. Absent for other
    /// workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_auth_secret: Option<String>,
}

/// The header with which a sidecar vouches to its app that a request came through it (value:
/// [`Bootstrap::app_auth_secret`]). Mesh-owned: sidecars strip it from every request they
/// receive and set it only themselves, only towards their own app.
pub const SIDECAR_AUTH_HEADER: &str = "x-meshflow-sidecar-auth";

/// The readiness file every meshflow binary writes once it serves (`--ready-file`): the actual
/// bound addresses, so nobody guesses ports. JSON object of name → `host:port`, plus `pid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyFile {
    /// Process id.
    pub pid: u32,
    /// Listener name → bound address (e.g. `"inbound": "127.0.0.1:41234"`).
    pub addresses: std::collections::BTreeMap<String, String>,
}

impl ReadyFile {
    /// Writes the file atomically (temp file + rename), so readers never see half of it.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    /// Reads a ready file; `None` while it does not exist or is incomplete.
    pub fn read(path: &std::path::Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The address named `name`.
    pub fn address(&self, name: &str) -> Option<&str> {
        self.addresses.get(name).map(String::as_str)
    }
}
