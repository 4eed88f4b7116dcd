//! The sidecar's admin listener (loopback by default): `/live`, `/ready` (503 until the sidecar
//! has an SVID and a config), `/metrics` (Prometheus text), `/config_dump` (snapshot version
//! and contents, JSON), `POST /shutdown` (graceful exit, for Jobs).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::shared::Shared;

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

fn config_dump(shared: &Shared) -> serde_json::Value {
    let snapshot = shared.config.current();
    let svid = shared.identity.svid.load_full();
    serde_json::json!({
        "workload": shared.workload,
        "settings": &*shared.settings,
        "version": snapshot.as_ref().map(|s| s.version),
        "identity": svid.as_ref().map(|s| serde_json::json!({
            "spiffeId": s.spiffe_id.uri(),
            "serial": s.serial_hex,
            "notAfterUnix": s.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })),
        "services": snapshot.as_ref().map(|s| s.raw.services.iter().map(|svc| serde_json::json!({
            "name": svc.name,
            "namespace": svc.namespace,
            "protocol": svc.protocol,
            "endpoints": svc.endpoints.iter().map(|e| serde_json::json!({"address": e.address, "identity": e.identity, "workload": e.workload})).collect::<Vec<_>>(),
            "clusterIPs": svc.cluster_ips,
            "ports": svc.ports.iter().map(|p| serde_json::json!({"name": p.name, "port": p.port, "targetPort": p.target_port, "opaque": p.opaque})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()),
    })
}

async fn handle(
    shared: Shared,
    shutdown: Arc<Notify>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (_, "/live") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (_, "/ready") if shared.is_ready() => respond(StatusCode::OK, "text/plain", "ready\n"),
        (_, "/ready") => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: waiting for SVID and config\n",
        ),
        (_, "/metrics") => {
            let mut buf = Vec::new();
            let _ = TextEncoder::new().encode(&shared.registry.gather(), &mut buf);
            respond(StatusCode::OK, "text/plain; version=0.0.4", buf)
        }
        (_, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&config_dump(&shared)).unwrap_or_default(),
        ),
        (&Method::POST, "/shutdown") => {
            shutdown.notify_one();
            respond(StatusCode::OK, "text/plain", "shutting down\n")
        }
        (_, "/shutdown") => respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Serves admin requests on `listener` forever.
pub async fn serve(listener: TcpListener, shared: Shared, shutdown: Arc<Notify>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(shared.clone(), shutdown.clone(), req)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
