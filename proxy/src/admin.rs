//! The sidecar's admin listener (loopback by default; in an injected pod every address, since
//! the kubelet probes it): `/live`, `/ready` (503 until the sidecar has an SVID and a config),
//! `/metrics` (Prometheus text), `/config_dump` (snapshot version and contents, JSON; loopback
//! peers only: it shows the app's probe headers),
//! `/app-health/<container>/<probe>` (the app's original kubelet probe, see [`app_probes`]) and
//! `POST /shutdown` (graceful exit, for Jobs; from loopback peers only, others get 403).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::app_probes::{self, AppProbes};
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
            "unmeshed": svc.unmeshed,
            "ports": svc.ports.iter().map(|p| serde_json::json!({"name": p.name, "port": p.port, "targetPort": p.target_port, "opaque": p.opaque})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()),
    })
}

/// What the admin handlers read besides the sidecar's state.
#[derive(Clone)]
pub struct AdminContext {
    /// Notified by `POST /shutdown`.
    pub shutdown: Arc<Notify>,
    /// The pod's original probes (`/app-health/…`).
    pub probes: Arc<AppProbes>,
}

async fn handle(
    shared: Shared,
    context: AdminContext,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with(app_probes::PREFIX) {
        return Ok(app_health(&context.probes, &req).await);
    }
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
        // It shows the app's probes, whose headers may hold credentials: pod-local only, like
        // Envoy's admin interface.
        (_, "/config_dump") if !peer.ip().to_canonical().is_loopback() => respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "config_dump is served to loopback only\n",
        ),
        (_, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&config_dump(&shared)).unwrap_or_default(),
        ),
        // The admin port is reachable from the pod's network (kubelet probes): only a process
        // in the pod (loopback) may end the proxy.
        (&Method::POST, "/shutdown") if !peer.ip().to_canonical().is_loopback() => respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "shutdown is accepted from loopback only\n",
        ),
        (&Method::POST, "/shutdown") => {
            tracing::info!(%peer, "POST /shutdown: draining and exiting");
            context.shutdown.notify_one();
            respond(StatusCode::OK, "text/plain", "shutting down\n")
        }
        (_, "/shutdown") => respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// `/app-health/<container>/<probe>`: 200 or 503 as the original probe judges the app, 404 for
/// a probe the pod did not declare.
async fn app_health(
    probes: &AppProbes,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n");
    }
    match probes.run(req.uri().path(), user_agent).await {
        None => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such probe: the pod declares none at this path\n",
        ),
        Some(outcome) if outcome.success => respond(
            StatusCode::OK,
            "text/plain",
            format!("{}\n", outcome.message),
        ),
        Some(outcome) => {
            tracing::debug!(path = req.uri().path(), reason = %outcome.message, "app probe failed");
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{}\n", outcome.message),
            )
        }
    }
}

/// At most this many admin connections at once; more are closed at accept. The port is
/// reachable from the pod's network in an injected pod, and the kubelet and Prometheus need a
/// handful.
const MAX_CONNECTIONS: usize = 128;
/// At most this many from one source address (so one client cannot hold every slot and shut
/// out the kubelet's probes).
const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// A connection that has not sent a whole request head within this (from its first byte on,
/// and between requests) is closed.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection is closed after this long whatever it does (Prometheus and probes reconnect).
const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves admin requests on `listener` forever, HTTP/1.1 only: at most [`MAX_CONNECTIONS`]
/// at once and [`MAX_CONNECTIONS_PER_PEER`] from one address, each request head within
/// [`HEADER_READ_TIMEOUT`], each connection at most [`MAX_CONNECTION_AGE`]; an accept error
/// (e.g. no file descriptors left) pauses accepting for 100 ms instead of spinning.
pub async fn serve(listener: TcpListener, shared: Shared, context: AdminContext) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_peer = meshflow_api::peer_limit::PeerLimit::new(MAX_CONNECTIONS_PER_PEER);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let Some(peer_slot) = per_peer.enter(peer.ip()) else {
            drop(stream);
            continue;
        };
        let (shared, context) = (shared.clone(), context.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(shared.clone(), context.clone(), peer, req)
            });
            // HTTP/1 only: the header timeout then runs from the first byte (an
            // auto-detecting server waits for the protocol without one), and no HTTP/2
            // connection sits idle forever.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(MAX_CONNECTION_AGE, connection).await;
            drop((slot, peer_slot));
        });
    }
}
