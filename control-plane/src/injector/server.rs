//! The webhook's HTTPS listener: `POST /inject` (AdmissionReview JSON) and nothing else, with
//! every bound a hostile or broken client could push on — TLS handshake time, header read
//! time, body size ([`MAX_BODY`], 413 before reading when `Content-Length` says so), body
//! read time and answer time (`--injector-timeout`, 408/503), JSON depth (serde_json refuses
//! more than 128 levels: 400), connections served at once ([`MAX_CONNECTIONS`], and
//! [`MAX_CONNECTIONS_PER_PEER`] from one address) and request bodies held at once
//! ([`BODY_BUDGET`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::review::{Admission, NamespaceLabels, Reply};

/// Largest AdmissionReview accepted, bytes (the API server's own request limit is 3 MiB; a
/// review carries the object twice at most).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once from one source address; more are closed at accept. Any pod
/// can reach the webhook (it has no client authentication: the API server's is not
/// verifiable here), so one pod holding idle connections must not use up
/// [`MAX_CONNECTIONS`] and make the API server's calls time out.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// Request bodies held at once, all connections together, bytes: a body reserves its
/// `Content-Length` (or [`MAX_BODY`] when it has none) before it is read; a request that
/// cannot reserve within the request's time bound is answered 503.
pub const BODY_BUDGET: usize = 64 * 1024 * 1024;
/// The budget's unit: permits are KiB.
const BUDGET_UNIT: usize = 1024;
static BODY_BUDGET_PERMITS: Semaphore = Semaphore::const_new(BODY_BUDGET / BUDGET_UNIT);
/// A TLS handshake, and a request's header section, must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection's unread input is drained ([`linger`]).
const LINGER: Duration = Duration::from_millis(500);

/// The webhook's metrics.
#[derive(Clone)]
pub struct InjectorMetrics {
    /// `meshflow_injector_requests_total{result}`: injected, skipped, denied, uninjected
    /// (failure mode allow), error (4xx: not an AdmissionReview, too large, too slow).
    pub requests: IntCounterVec,
    /// `meshflow_injector_request_duration_seconds`: from the request's head to the answer.
    pub duration: Histogram,
}

impl InjectorMetrics {
    /// Registers both families on `registry`.
    ///
    /// # Errors
    /// When they are registered already.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "meshflow_injector_requests_total",
                    "Admission requests answered by the injection webhook, by result \
                     (injected, skipped, denied, uninjected, error).",
                ),
                &["result"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "meshflow_injector_request_duration_seconds",
                    "Time from an admission request's head to its answer.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }
}

/// The server certificate, replaceable while serving (renewal, a changed file).
#[derive(Debug)]
pub struct CertSlot(ArcSwap<CertifiedKey>);

impl CertSlot {
    /// A slot holding `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(CertSlot(ArcSwap::from_pointee(key)))
    }

    /// New handshakes use `key`.
    pub fn store(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A certificate chain and its key, from PEM.
///
/// # Errors
/// No certificate, no key, or a key rustls cannot use.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut &*chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let key = rustls_pemfile::private_key(&mut &*key_pem)
        .map_err(|e| format!("key: {e}"))?
        .ok_or("no private key in the PEM")?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("key: {e}"))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// TLS 1.2/1.3 (the API server's Go client speaks both), HTTP/1.1 only.
pub fn tls_config(slot: Arc<CertSlot>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What every connection shares.
pub struct Webhook {
    /// The admission logic.
    pub admission: Admission,
    /// Namespace labels from the API server.
    pub namespaces: Arc<dyn NamespaceLabels>,
    /// Metrics.
    pub metrics: InjectorMetrics,
    /// Bound for reading the body plus answering.
    pub timeout: Duration,
}

/// Serves HTTPS on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, webhook: Arc<Webhook>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_peer = meshflow_api::peer_limit::PeerLimit::new(MAX_CONNECTIONS_PER_PEER);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "injector: accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(peer_slot) = per_peer.enter(peer.ip()) else {
            tracing::debug!(%peer, "injector: too many connections from this address");
            webhook.metrics.requests.with_label_values(&["error"]).inc();
            continue;
        };
        // Answers are one write each; no reason to let Nagle hold them.
        let _ = stream.set_nodelay(true);
        let (acceptor, webhook) = (acceptor.clone(), webhook.clone());
        tokio::spawn(async move {
            let _permit = (permit, peer_slot);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "injector: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "injector: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&webhook, req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .without_shutdown()
                .await;
            if let Ok(parts) = served {
                linger(parts.io.into_inner()).await;
            }
        });
    }
}

/// Closes a connection the way a refused upload needs: TLS close_notify and FIN after the
/// answer, then what the client still sends is read and dropped for a moment. Closing with
/// unread data at once would make the kernel send a reset, and the client could lose the 413
/// it has not read yet (Go's net/http does the same).
async fn linger<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn handle(webhook: &Webhook, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let reply = match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => Some(inject(webhook, req, started).await),
        (_, "/inject") => {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        _ => None,
    };
    let Some(reply) = reply else {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the webhook serves POST /inject\n",
        );
    };
    webhook
        .metrics
        .requests
        .with_label_values(&[reply.verdict.label()])
        .inc();
    webhook
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type)
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "bad reply\n"))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Reads the body within the bounds, then answers within what is left of the time bound.
async fn inject(webhook: &Webhook, req: Request<hyper::body::Incoming>, started: Instant) -> Reply {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        // Refused unread: the connection closes after the answer.
        return too_large();
    }
    let reserve = declared
        .map_or(MAX_BODY, |n| n as usize)
        .div_ceil(BUDGET_UNIT)
        .max(1) as u32;
    let Ok(Ok(_budget)) =
        tokio::time::timeout(webhook.timeout, BODY_BUDGET_PERMITS.acquire_many(reserve)).await
    else {
        return Reply::error(
            503,
            format!(
                "busy: {} MiB of request bodies are being read already",
                BODY_BUDGET / (1024 * 1024)
            ),
        );
    };
    let body = match tokio::time::timeout(
        webhook.timeout,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Err(_) => {
            return Reply::error(
                408,
                format!(
                    "the request body did not arrive within {:?}",
                    webhook.timeout
                ),
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => return Reply::error(400, format!("reading the request body: {e}")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let left = webhook.timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(
        left,
        webhook.admission.review(&body, webhook.namespaces.as_ref()),
    )
    .await
    {
        Ok(reply) => reply,
        Err(_) => Reply::error(
            503,
            format!(
                "no answer within {:?} (reading the namespace?)",
                webhook.timeout
            ),
        ),
    }
}

fn too_large() -> Reply {
    Reply::error(
        413,
        format!("an AdmissionReview is at most {MAX_BODY} bytes"),
    )
}
