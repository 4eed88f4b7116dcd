//! Where the sidecar's [`Bootstrap`] comes from: the file the local control plane writes
//! (`--bootstrap`), or — in an injected Kubernetes pod, where nothing writes per-pod files —
//! flags that injection sets as `MESHFLOW_…` env from the downward API (`--control-plane`,
//! `--control-plane-server-name`, `--trust-bundle-file`, `--workload`, `--spiffe-id`,
//! `--token-file`).

use std::path::{Path, PathBuf};

use meshflow_api::Bootstrap;

/// The bootstrap as separate flags (injected pods). All or none.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
pub struct PodBootstrap {
    /// Without `--bootstrap`: the control plane's gRPC address, `host:port`.
    #[arg(
        long,
        env = "MESHFLOW_CONTROL_PLANE",
        conflicts_with = "bootstrap",
        requires_all = ["control_plane_server_name", "trust_bundle_file", "workload", "spiffe_id", "token_file"]
    )]
    pub control_plane: Option<String>,
    /// The TLS server name in the control plane's certificate.
    #[arg(
        long,
        env = "MESHFLOW_CONTROL_PLANE_SERVER_NAME",
        requires = "control_plane"
    )]
    pub control_plane_server_name: Option<String>,
    /// PEM roots that verify the control plane (in a pod: the `meshflow-trust-bundle`
    /// ConfigMap, mounted). The control plane sends the current bundle with every SVID.
    #[arg(long, env = "MESHFLOW_TRUST_BUNDLE_FILE", requires = "control_plane")]
    pub trust_bundle_file: Option<PathBuf>,
    /// Workload key `<namespace>/<pod>`.
    #[arg(long, env = "MESHFLOW_WORKLOAD", requires = "control_plane")]
    pub workload: Option<String>,
    /// The SPIFFE ID this sidecar expects to be issued.
    #[arg(long, env = "MESHFLOW_SPIFFE_ID", requires = "control_plane")]
    pub spiffe_id: Option<String>,
    /// The projected ServiceAccount token (audience `meshflow`), re-read at every Certify.
    #[arg(long, env = "MESHFLOW_TOKEN_FILE", requires = "control_plane")]
    pub token_file: Option<PathBuf>,
}

/// The bootstrap and where it came from (for error messages): the file, or the flags.
///
/// # Errors
/// An unreadable or invalid file, a missing flag, an unreadable trust bundle.
pub fn load(file: Option<&Path>, pod: &PodBootstrap) -> Result<(Bootstrap, String), String> {
    if let Some(file) = file {
        let origin = file.display().to_string();
        let text = std::fs::read(file).map_err(|e| format!("{origin}: {e}"))?;
        let bootstrap = serde_json::from_slice(&text).map_err(|e| format!("{origin}: {e}"))?;
        return Ok((bootstrap, origin));
    }
    let missing = |flag: &str| format!("--bootstrap, or --{flag} with the other bootstrap flags");
    let control_plane = pod
        .control_plane
        .clone()
        .ok_or_else(|| missing("control-plane"))?;
    let bundle_file = pod
        .trust_bundle_file
        .as_ref()
        .ok_or_else(|| missing("trust-bundle-file"))?;
    let trust_bundle_pem = std::fs::read_to_string(bundle_file)
        .map_err(|e| format!("--trust-bundle-file {}: {e}", bundle_file.display()))?;
    let bootstrap = Bootstrap {
        control_plane,
        control_plane_server_name: pod
            .control_plane_server_name
            .clone()
            .ok_or_else(|| missing("control-plane-server-name"))?,
        trust_bundle_pem,
        workload: pod.workload.clone().ok_or_else(|| missing("workload"))?,
        spiffe_id: pod.spiffe_id.clone().ok_or_else(|| missing("spiffe-id"))?,
        token: String::new(),
        token_file: Some(
            pod.token_file
                .clone()
                .ok_or_else(|| missing("token-file"))?,
        ),
        app_auth_secret: None,
    };
    Ok((bootstrap, "the bootstrap flags (MESHFLOW_… env)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_give_the_same_bootstrap_a_file_would() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.crt");
        std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let pod = PodBootstrap {
            control_plane: Some("meshflow-control-plane.meshflow-system.svc:15012".into()),
            control_plane_server_name: Some("cp.example".into()),
            trust_bundle_file: Some(bundle.clone()),
            workload: Some("shop/web-0".into()),
            spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            token_file: Some("/var/run/secrets/meshflow.io/serviceaccount/token".into()),
        };
        let (from_flags, _) = load(None, &pod).unwrap();
        assert_eq!(from_flags.workload, "shop/web-0");
        assert_eq!(from_flags.trust_bundle_pem, "-----BEGIN CERTIFICATE-----\n");
        assert!(from_flags.token.is_empty());
        let file = dir.path().join("bootstrap.json");
        std::fs::write(&file, serde_json::to_vec(&from_flags).unwrap()).unwrap();
        let (from_file, origin) = load(Some(&file), &PodBootstrap::default()).unwrap();
        assert_eq!(from_file, from_flags);
        assert_eq!(origin, file.display().to_string());

        let unreadable = PodBootstrap {
            trust_bundle_file: Some(dir.path().join("missing.crt")),
            ..pod
        };
        let err = load(None, &unreadable).unwrap_err();
        assert!(err.starts_with("--trust-bundle-file "), "{err}");
    }

    #[test]
    fn the_flags_replace_the_file_all_or_none() {
        use clap::Parser;
        let flags = [
            "meshflow-proxy",
            "--app-port",
            "8080",
            "--control-plane",
            "cp:15012",
            "--control-plane-server-name",
            "cp",
            "--trust-bundle-file",
            "/b",
            "--workload",
            "shop/web-0",
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/web",
            "--token-file",
            "/t",
        ];
        let config = crate::ProxyConfig::try_parse_from(flags).unwrap();
        assert!(config.bootstrap.is_none());
        assert_eq!(config.pod_bootstrap.workload.as_deref(), Some("shop/web-0"));
        // Neither: refused; part of the flags: refused; both: refused.
        assert!(crate::ProxyConfig::try_parse_from(&flags[..3]).is_err());
        assert!(crate::ProxyConfig::try_parse_from(&flags[..7]).is_err());
        let mut both = flags.to_vec();
        both.extend(["--bootstrap", "/x.json"]);
        assert!(crate::ProxyConfig::try_parse_from(both).is_err());
        let file = [
            "meshflow-proxy",
            "--app-port",
            "1",
            "--bootstrap",
            "/x.json",
        ];
        assert!(crate::ProxyConfig::try_parse_from(file).is_ok());
    }
}
