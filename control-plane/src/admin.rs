//! The control plane's admin listener: `/live`, `/ready`, `/metrics` (Prometheus text),
//! `/config_dump` (current mesh state — in Kubernetes mode with the services and endpoints
//! discovered from the cluster — and the last config error, JSON), `/proxies` (the sidecars
//! connected to this replica with the versions they were sent and accepted, and the current
//! version, JSON).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::state::StateHandle;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics registry.
    pub registry: Registry,
    /// Mesh state.
    pub state: StateHandle,
    /// Last invalid-config error, if the newest file was rejected.
    pub last_error: Arc<Mutex<Option<String>>>,
    /// The effective settings.
    pub settings: Arc<serde_json::Value>,
    /// Whether config is being served (Kubernetes mode: after the first complete read of the
    /// cluster); `/ready` answers 503 until then, `/live` always 200.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The sidecars connected to this replica.
    pub proxies: Arc<crate::proxies::Proxies>,
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

async fn handle(
    admin: AdminState,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/live" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/ready" if admin.ready.load(std::sync::atomic::Ordering::SeqCst) => {
            respond(StatusCode::OK, "text/plain", "ok\n")
        }
        "/ready" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: reading the cluster\n",
        ),
        "/metrics" => {
            let mut buf = Vec::new();
            let _ = TextEncoder::new().encode(&admin.registry.gather(), &mut buf);
            respond(StatusCode::OK, "text/plain; version=0.0.4", buf)
        }
        "/config_dump" => {
            let state = admin.state.current();
            let dump = serde_json::json!({
                "settings": &*admin.settings,
                "version": state.version,
                "mesh": &*state.mesh,
                "endpoints": &state.endpoints,
                // Kubernetes mode: the services with the endpoints the cluster gives them.
                "services": state.discovered.as_deref().map(|services| {
                    services.values().map(|s| serde_json::json!({
                        "namespace": s.namespace,
                        "name": s.name,
                        "protocol": s.protocol,
                        "unmeshed": s.unmeshed,
                        "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                            "address": e.address,
                            "identity": e.identity,
                            "workload": e.workload,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>()
                }),
                "policies": &*state.policies,
                "lastError": *admin.last_error.lock().unwrap_or_else(|e| e.into_inner()),
            });
            respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
            )
        }
        "/proxies" => {
            let version = admin.state.current().version;
            let body = serde_json::json!({
                "version": version,
                "proxies": admin.proxies.list(),
            });
            respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(admin.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
