//! The outbound listener (Pingora adapter): requests from the local app (127.0.0.1 only) are
//! routed by authority to a mesh service, sent to one of its endpoints over mTLS (HTTP/2), and
//! the server must prove the destination's expected identity.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config_state::Endpoint;
use crate::listener_common::{refuse_bad_request, respond_to_failure, scrub_forwarded_request};
use crate::routing::parse_authority;
use crate::shared::Shared;

/// Per-request state.
pub struct OutboundCtx {
    start: Instant,
    /// `<name>.<namespace>` of the destination, once routed (a bounded label: only services
    /// that exist in the snapshot).
    service: Option<String>,
    endpoint: Option<Endpoint>,
    connect_attempts: u32,
}

/// The outbound `ProxyHttp`.
pub struct OutboundProxy {
    shared: Shared,
}

impl OutboundProxy {
    /// A proxy over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

/// The request's authority: absolute-form target host (RFC 9112 §3.2.2) or `:authority`, else
/// `Host`.
fn authority(req: &RequestHeader) -> Option<String> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_string());
    }
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

impl OutboundProxy {
    async fn reject(&self, session: &mut Session, reason: &str, message: String) -> Result<bool> {
        self.shared
            .metrics
            .rejected_requests
            .with_label_values(&["outbound", reason])
            .inc();
        self.shared
            .metrics
            .requests
            .with_label_values(&["outbound", "unknown", "503"])
            .inc();
        session
            .respond_error_with_body(503, Bytes::from(format!("meshflow: {message}\n")))
            .await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for OutboundProxy {
    type CTX = OutboundCtx;

    fn new_ctx(&self) -> Self::CTX {
        OutboundCtx {
            start: Instant::now(),
            service: None,
            endpoint: None,
            connect_attempts: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        if refuse_bad_request(session, &self.shared, "outbound").await? {
            return Ok(true);
        }
        let Some(snapshot) = self.shared.config.current() else {
            return self
                .reject(session, "no_config", "sidecar has no config yet".into())
                .await;
        };
        let authority = authority(session.req_header()).unwrap_or_default();
        let Some(name) = parse_authority(&authority, &self.shared.namespace) else {
            let shown: String = authority.chars().take(128).collect();
            return self
                .reject(
                    session,
                    "unknown_service",
                    format!("{shown:?} is not a mesh service (use <service>.<namespace>)"),
                )
                .await;
        };
        let Some(service) = snapshot
            .services
            .get(&(name.name.clone(), name.namespace.clone()))
        else {
            return self
                .reject(
                    session,
                    "unknown_service",
                    format!("unknown service {}.{}", name.name, name.namespace),
                )
                .await;
        };
        if service.endpoints.is_empty() {
            return self
                .reject(
                    session,
                    "no_endpoint",
                    format!(
                        "service {}.{} has no ready endpoint",
                        name.name, name.namespace
                    ),
                )
                .await;
        }
        ctx.service = Some(format!("{}.{}", name.name, name.namespace));
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = self
            .shared
            .config
            .current()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no config"))?;
        let service = ctx.service.as_deref().unwrap_or_default();
        let (name, namespace) = service.split_once('.').unwrap_or((service, ""));
        let endpoint = snapshot
            .services
            .get(&(name.to_string(), namespace.to_string()))
            .and_then(|s| s.pick())
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "service has no endpoint"))?;
        let svid = self
            .shared
            .identity
            .svid
            .load_full()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no SVID yet"))?;
        let bundle = self.shared.identity.bundle.load_full();
        // SNI = the expected identity's DNS SAN: Pingora's rustls connector then verifies the
        // server's chain and that it is exactly that identity.
        let mut peer = HttpPeer::new(
            endpoint.address.as_str(),
            true,
            endpoint.identity.dns_name(),
        );
        peer.client_cert_key = Some(svid.cert_key.clone());
        peer.options.ca = Some(bundle.pingora_ca.clone());
        peer.options.alpn = ALPN::H2;
        peer.options.max_h2_streams = 100;
        peer.options.connection_timeout = Some(Duration::from_secs(1));
        // The pool key must change with the trust bundle and our certificate, or a connection
        // made under old material could be reused.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bundle.version.hash(&mut hasher);
        svid.serial_hex.hash(&mut hasher);
        peer.group_key = hasher.finish();
        ctx.endpoint = Some(endpoint);
        ctx.connect_attempts += 1;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        scrub_forwarded_request(upstream_request);
        // Absolute-form (HTTP_PROXY style) → origin-form + Host for the next hop.
        if let Some(authority) = upstream_request
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
        {
            let origin = upstream_request
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            if let Ok(uri) = origin.parse() {
                upstream_request.set_uri(uri);
            }
            // RFC 9112 §3.2.2: the absolute-form target's authority replaces any Host.
            upstream_request.insert_header(http::header::HOST, authority)?;
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora_core::protocols::Digest>,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        if !reused {
            self.shared
                .metrics
                .connections
                .with_label_values(&["outbound"])
                .inc();
            self.shared
                .metrics
                .tls_handshakes
                .with_label_values(&["outbound"])
                .inc();
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let text = format!("{e}");
        let tls = matches!(
            e.etype(),
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError
        ) || text.contains("certificate");
        if tls {
            let reason = if text.contains("NotValidForName") || text.contains("not valid for name")
            {
                "identity_mismatch"
            } else if text.contains("UnknownIssuer") {
                "unknown_ca"
            } else {
                "other"
            };
            self.shared
                .metrics
                .tls_handshake_errors
                .with_label_values(&["outbound", reason])
                .inc();
            let expected = ctx
                .endpoint
                .as_ref()
                .map(|ep| ep.identity.uri())
                .unwrap_or_default();
            tracing::warn!(
                endpoint = %peer.address(),
                expected_identity = %expected,
                expected_dns_san = %peer.sni,
                reason,
                "outbound TLS refused: server did not prove the expected identity; presented: {text}"
            );
            e.set_retry(false);
        } else {
            // Never reached the server: one more try, on another endpoint if there is one.
            e.set_retry(ctx.connect_attempts < 2);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy {
        respond_to_failure(session, e, 503).await
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let Some(service) = ctx.service.as_deref() else {
            return;
        };
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.shared
            .metrics
            .requests
            .with_label_values(&["outbound", service, &status.to_string()])
            .inc();
        self.shared
            .metrics
            .request_duration
            .with_label_values(&["outbound"])
            .observe(ctx.start.elapsed().as_secs_f64());
    }
}
