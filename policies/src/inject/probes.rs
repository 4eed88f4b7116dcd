//! Probe rewriting: an app container's HTTP, gRPC and TCP probes go to the proxy's admin port
//! (`/app-health/<container>/<livez|readyz|startupz>`), which performs the original probe on
//! localhost, so STRICT mTLS on the app's ports never fails a kubelet probe. `exec` probes
//! need no network and stay.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use super::{error, InjectError};

/// One probe to rewrite.
pub(super) struct Rewritten {
    /// The container field: `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub field: &'static str,
    /// The probe the kubelet will run: an HTTP GET of the proxy's admin port.
    pub probe: Probe,
    /// `/app-health/<container>/<kind>`: the admin path, and the key in `meshflow.io/app-probes`.
    pub path: String,
    /// The original handler with numeric ports and the API server's defaults (`scheme`,
    /// `path`), and its timeout.
    pub original: Value,
}

/// The probes of `container` (at `spec.<list>[index]`, `list` being `containers` or, for a
/// restartable init container — the app's own native sidecar — `initContainers`) that need
/// rewriting.
pub(super) fn rewrite(
    container: &Container,
    list: &str,
    index: usize,
    admin_port: u16,
) -> Result<Vec<Rewritten>, InjectError> {
    let mut out = Vec::new();
    for (field, kind, probe) in [
        ("livenessProbe", "livez", &container.liveness_probe),
        ("readinessProbe", "readyz", &container.readiness_probe),
        ("startupProbe", "startupz", &container.startup_probe),
    ] {
        let Some(probe) = probe else { continue };
        if probe.exec.is_some() || is_rewritten(probe, admin_port) {
            continue;
        }
        let at = |handler: &str| format!("spec.{list}[{index}].{field}.{handler}.port");
        let original = if let Some(http) = &probe.http_get {
            let mut http = http.clone();
            http.port = IntOrString::Int(resolve_port(container, &http.port, &at("httpGet"))?);
            // The API server's defaults, so the webhook (which sees a defaulted pod) and
            // `meshflow inject` (which sees the manifest) write the same annotation.
            http.scheme.get_or_insert_with(|| "HTTP".into());
            if http.path.as_deref().unwrap_or_default().is_empty() {
                http.path = Some("/".into());
            }
            json!({ "httpGet": http })
        } else if let Some(tcp) = &probe.tcp_socket {
            let mut tcp = tcp.clone();
            tcp.port = IntOrString::Int(resolve_port(container, &tcp.port, &at("tcpSocket"))?);
            json!({ "tcpSocket": tcp })
        } else if let Some(grpc) = &probe.grpc {
            json!({ "grpc": grpc })
        } else {
            // No handler: the API server refuses such a probe; nothing to carry over.
            continue;
        };
        let mut original = original;
        original["timeoutSeconds"] = json!(probe.timeout_seconds.unwrap_or(1));
        let path = format!("/app-health/{}/{kind}", container.name);
        let rewritten = Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(i32::from(admin_port)),
                scheme: Some("HTTP".into()),
                host: None,
                http_headers: None,
            }),
            exec: None,
            grpc: None,
            tcp_socket: None,
            ..probe.clone()
        };
        out.push(Rewritten {
            field,
            probe: rewritten,
            path,
            original,
        });
    }
    Ok(out)
}

/// Whether `probe` already asks the proxy (`httpGet` of the admin port, `/app-health/…`).
fn is_rewritten(probe: &Probe, admin_port: u16) -> bool {
    probe.http_get.as_ref().is_some_and(|h| {
        h.port == IntOrString::Int(i32::from(admin_port))
            && h.path
                .as_deref()
                .is_some_and(|p| p.starts_with("/app-health/"))
    })
}

/// A probe's port as a number: a named port is looked up among the container's ports.
fn resolve_port(
    container: &Container,
    port: &IntOrString,
    field: &str,
) -> Result<i32, InjectError> {
    match port {
        IntOrString::Int(n) if (1..=65535).contains(n) => Ok(*n),
        IntOrString::Int(n) => Err(error(field, format!("{n} is not a port (1-65535)"))),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| {
                error(
                    field,
                    format!(
                        "named port {name:?} is not a port of container {:?}",
                        container.name
                    ),
                )
            }),
    }
}
