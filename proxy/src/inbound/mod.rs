//! The inbound listener (Pingora adapter): requests from other sidecars (mTLS) or, under
//! PeerAuthentication PERMISSIVE, plaintext clients are checked (framing, path normalization,
//! JWT per RequestAuthentication, AuthorizationPolicy), stripped of spoofable identity headers,
//! given one XFCC from the verified peer (none for plaintext), and forwarded to the app on
//! 127.0.0.1.

pub mod accept;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use meshflow_policies::AppProtocol;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::http::hygiene::{xfcc_value, XFCC};
use crate::http::listener::{
    refuse_bad_request, respond_to_failure, scrub_forwarded_request, strip_mesh_owned,
};
use crate::identity::{PeerIdentity, VerifiedPeer};
use crate::shared::Shared;
use meshflow_policies::admission::{
    admit, transport_allowed, Admission, InboundPolicies, InboundRequest, Peer,
};
use meshflow_policies::authn::{Authenticator, MtlsMode};
use meshflow_telemetry::SpanTrait as _;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use prometheus::IntCounter;

use crate::telemetry::metrics::{Traffic, TrafficSeries};

/// Per-request state.
pub struct InboundCtx {
    start: Instant,
    /// Whether the request passed the transport checks (mTLS, or plaintext under PERMISSIVE).
    admitted: bool,
    /// The verified peer; `None` for plaintext (PERMISSIVE).
    peer: Option<Arc<VerifiedPeer>>,
    /// Token headers to remove before forwarding (RequestAuthentication,
    /// `forwardOriginalToken: false`).
    strip_headers: Vec<String>,
    /// The normalized path (and the original query) that was authorized and is forwarded.
    forwarded_target: Option<String>,
    /// The normalized path judged (also when denied).
    normalized_path: Option<String>,
    /// Authorization decision and the policy that made it (for the access log).
    authz: Option<(&'static str, String)>,
    /// The server span (OpenTelemetry), from admission to the end of the response.
    span: Option<meshflow_telemetry::Span>,
    /// gRPC status of the response (Trailers-Only headers or trailers).
    grpc_status: Option<String>,
    /// Refused for framing or header size (already counted).
    refused: bool,
    /// The port the request goes to ([`crate::outbound::transparent::TARGET_PORT_HEADER`] from a
    /// verified sidecar) when it is not the app port, and whether the caller spoke HTTP/2.
    target_port: Option<(u16, bool)>,
}

/// The inbound `ProxyHttp`.
pub struct InboundProxy {
    shared: Shared,
    /// The sidecar's own ports: never a request's target port.
    own_ports: Vec<u16>,
    /// `meshflow_authz_decisions_total{decision="allow", policy="none"}`, the common case.
    allow_none: OnceLock<IntCounter>,
    /// The request series of plaintext (PERMISSIVE) callers.
    plaintext_series: OnceLock<TrafficSeries>,
}

impl InboundProxy {
    /// A proxy over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            own_ports: Vec::new(),
            allow_none: OnceLock::new(),
            plaintext_series: OnceLock::new(),
        }
    }

    /// The sidecar's own ports (inbound, outbound, admin), which no caller may name as its
    /// target port.
    pub fn with_own_ports(mut self, ports: Vec<u16>) -> Self {
        self.own_ports = ports;
        self
    }
}

/// How the connection reached us: `Ok(Some(peer))` for verified mTLS, `Ok(None)` for
/// plaintext, `Err(())` for TLS whose client identity was refused at the handshake.
fn transport_peer(session: &Session) -> Result<Option<Arc<VerifiedPeer>>, ()> {
    match session.digest().and_then(|d| d.ssl_digest.as_ref()) {
        None => Ok(None),
        Some(_) => peer_identity(session).map(Some).ok_or(()),
    }
}

fn peer_identity(session: &Session) -> Option<Arc<VerifiedPeer>> {
    let ext = session
        .digest()?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<PeerIdentity>()?;
    ext.verified.clone()
}

/// Whether `raw` (a request target as on the wire) is exactly `path` followed by `?query`.
fn is_target(raw: &[u8], path: &str, query: Option<&str>) -> bool {
    let Some(rest) = raw.strip_prefix(path.as_bytes()) else {
        return false;
    };
    match query {
        None => rest.is_empty(),
        Some(q) => rest.first() == Some(&b'?') && &rest[1..] == q.as_bytes(),
    }
}

/// Whether the raw HTTP/1.1 request target carries a fragment (`#`), which the URI parser
/// would silently drop.
fn raw_target_has_fragment(session: &Session) -> bool {
    match session.as_ref() {
        pingora_core::protocols::http::ServerSession::H1(h1) => {
            let head = h1.get_headers_raw_bytes();
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            line.contains(&b'#')
        }
        _ => false,
    }
}

impl InboundProxy {
    fn allowed_by_default(&self) -> &IntCounter {
        self.allow_none.get_or_init(|| {
            self.shared
                .metrics
                .authz_decisions
                .with_label_values(&["allow", "none"])
        })
    }

    /// The XFCC value for `peer` (`By=<own>;URI=<peer>`), made on the connection's first
    /// request.
    fn xfcc_for<'p>(&self, peer: &'p VerifiedPeer) -> &'p str {
        // (The own identity is fixed for the process: rotation renews the key, not the ID.)
        peer.xfcc.get_or_init(|| {
            let own = self
                .shared
                .identity
                .svid
                .load()
                .as_ref()
                .map(|s| s.spiffe_id.uri())
                .unwrap_or_default();
            xfcc_value(&own, &peer.uri)
        })
    }

    /// The request series of `peer` (plaintext: `None`), resolved once per peer identity.
    fn series_for<'a>(&'a self, peer: Option<&'a VerifiedPeer>) -> &'a TrafficSeries {
        let service = self.shared.workload_name();
        match peer {
            None => self.plaintext_series.get_or_init(|| {
                TrafficSeries::new(
                    &self.shared.metrics,
                    &Traffic {
                        direction: "inbound",
                        source_workload: "unknown",
                        source_namespace: "unknown",
                        destination_workload: service,
                        destination_namespace: &self.shared.namespace,
                        principal: "",
                        service,
                    },
                )
            }),
            Some(p) => p.series.get_or_init(|| {
                self.shared.inbound_series(&p.uri, || Traffic {
                    direction: "inbound",
                    source_workload: p.spiffe_id.service_account(),
                    source_namespace: p.spiffe_id.namespace(),
                    destination_workload: service,
                    destination_namespace: &self.shared.namespace,
                    principal: &p.principal,
                    service,
                })
            }),
        }
    }

    /// Normalizes the path, evaluates the workload's AuthorizationPolicies and answers 400/403
    /// itself when the request must not reach the app. Returns `true` when it answered.
    async fn authorize(&self, session: &mut Session, ctx: &mut InboundCtx) -> Result<bool> {
        let metrics = &self.shared.metrics;
        let snapshot = self.shared.config.current();
        let req = session.req_header();
        let host = req
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let xfcc = ctx.peer.as_ref().map(|p| self.xfcc_for(p));
        let peer = ctx.peer.as_ref().zip(xfcc).map(|(p, xfcc)| Peer {
            principal: &p.principal,
            namespace: p.spiffe_id.namespace(),
            xfcc,
        });
        // Client-sent mesh-owned headers were removed in `request_filter`; `admit` adds the
        // XFCC `upstream_request_filter` sets (none for plaintext).
        let headers = || {
            let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in &req.headers {
                map.entry(name.as_str().to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            map
        };
        let source_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let query = req.uri.query();
        let request = InboundRequest {
            peer,
            method: req.method.as_str(),
            path: req.uri.path(),
            query: query.unwrap_or(""),
            target_has_fragment: raw_target_has_fragment(session),
            host,
            port: ctx.target_port.map_or(self.shared.app_port, |(p, _)| p),
            source_ip,
            headers: &headers,
        };
        let no_authenticator;
        let (authenticator, authorization, mtls) = match &snapshot {
            Some(s) => (
                s.authenticator.as_ref(),
                s.authorization.as_slice(),
                (s.mtls_mode, s.mtls_policy.as_deref()),
            ),
            None => {
                no_authenticator = Authenticator::default();
                (&no_authenticator, &[][..], (MtlsMode::Strict, None))
            }
        };
        let admission = admit(
            &request,
            &InboundPolicies {
                mtls,
                authenticator,
                authorization: authorization.iter(),
            },
        );
        let decided = match admission {
            Admission::Decided(decided) => decided,
            Admission::PlaintextRefused { .. } => {
                // Checked at accept and in `request_filter` already; the mode may just have
                // changed: close without forwarding.
                session.set_keepalive(None);
                let mut e = Error::explain(
                    ErrorType::ConnectionClosed,
                    "plaintext request while the mTLS mode is STRICT",
                );
                e.esource = ErrorSource::Downstream;
                return Err(e);
            }
            Admission::BadPath(e) => {
                metrics
                    .rejected_requests
                    .with_label_values(&["inbound", "path"])
                    .inc();
                session.set_keepalive(None);
                session
                    .respond_error_with_body(400, bytes::Bytes::from(format!("meshflow: {e}\n")))
                    .await?;
                return Ok(true);
            }
            Admission::Unauthenticated(e) => {
                metrics
                    .jwt_authentications
                    .with_label_values(&[e.reason()])
                    .inc();
                tracing::info!(
                    target: "meshflow::access",
                    decision = "unauthenticated",
                    reason = e.reason(),
                    principal = %ctx.peer.as_ref().map_or("-", |p| p.principal.as_str()),
                    method = %req.method,
                    path = %req.uri.path(),
                    "request authentication"
                );
                let mut resp = pingora_http::ResponseHeader::build(401, Some(2))?;
                resp.insert_header(
                    http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"meshflow\", error=\"invalid_token\"",
                )?;
                let body = bytes::Bytes::from(format!("{e}\n"));
                resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
                session.set_keepalive(None);
                session.write_response_header(Box::new(resp), false).await?;
                session.write_response_body(Some(body), true).await?;
                return Ok(true);
            }
        };
        if decided.request_principal.is_some() {
            metrics.jwt_authentications.with_label_values(&["ok"]).inc();
        }
        ctx.strip_headers = decided.strip_headers;
        let decision = decided.decision;
        let path = decided.path;
        let verdict = if decision.allowed { "allow" } else { "deny" };
        let policy_label = decision.policy.as_deref().unwrap_or("none");
        match (decision.allowed, &decision.policy) {
            (true, None) => self.allowed_by_default().inc(),
            _ => metrics
                .authz_decisions
                .with_label_values(&[verdict, policy_label])
                .inc(),
        }
        for audited in &decision.audited {
            metrics
                .authz_decisions
                .with_label_values(&["audit", audited])
                .inc();
        }
        let principal = ctx.peer.as_ref().map_or("-", |p| p.principal.as_str());
        let method = req.method.as_str();
        // Denials are logged (rare, and what an operator looks for); an allowed request is
        // not, at info: the JSON access log (`--access-log`) is the per-request record.
        if decision.allowed {
            tracing::debug!(
                target: "meshflow::access",
                decision = verdict,
                policy = %policy_label,
                rule = ?decision.rule,
                principal = %principal,
                method = %method,
                path = %path,
                "authorization"
            );
        } else {
            tracing::info!(
                target: "meshflow::access",
                decision = verdict,
                policy = %policy_label,
                rule = ?decision.rule,
                audited = ?decision.audited,
                principal = %principal,
                method = %method,
                path = %path,
                "authorization"
            );
        }
        ctx.authz = Some((verdict, policy_label.to_string()));
        ctx.normalized_path = Some(path);
        if !decision.allowed {
            session
                .respond_error_with_body(403, bytes::Bytes::from_static(b"RBAC: access denied\n"))
                .await?;
            return Ok(true);
        }
        // Forward exactly the normalized path (and the query as received). Compared with the
        // target as it would go on the wire (`raw_path`: Pingora writes those bytes, not the
        // URI), so a target the URI only stands in for — `?x=1`, `admin/x`, absolute-form —
        // is replaced by what was judged.
        let req = session.req_header();
        if let Some(path) = ctx.normalized_path.as_deref() {
            let query = req.uri.query();
            if !is_target(req.raw_path(), path, query) {
                ctx.forwarded_target = Some(match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                });
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl ProxyHttp for InboundProxy {
    type CTX = InboundCtx;

    fn new_ctx(&self) -> Self::CTX {
        InboundCtx {
            start: Instant::now(),
            admitted: false,
            peer: None,
            strip_headers: Vec::new(),
            forwarded_target: None,
            normalized_path: None,
            authz: None,
            span: None,
            grpc_status: None,
            refused: false,
            target_port: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let peer = match transport_peer(session) {
            Ok(Some(peer)) => Some(peer),
            // Plaintext: only while the mode is PERMISSIVE (it may have changed since accept).
            Ok(None)
                if transport_allowed(true, crate::inbound::accept::current_mode(&self.shared)) =>
            {
                None
            }
            refused => {
                // No (acceptable) client certificate: counted at accept or handshake; close
                // without forwarding anything.
                session.set_keepalive(None);
                let mut e = Error::explain(
                    ErrorType::ConnectionClosed,
                    if refused.is_ok() {
                        "plaintext request while the mTLS mode is STRICT"
                    } else {
                        "peer presented no acceptable client certificate"
                    },
                );
                e.esource = ErrorSource::Downstream;
                return Err(e);
            }
        };
        ctx.peer = peer;
        ctx.admitted = true;
        {
            let req = session.req_header();
            let parent = self.shared.tracing.extract(&req.headers);
            let peer = &ctx.peer;
            ctx.span = Some(self.shared.tracing.start(
                crate::shared::method_span_name(&req.method),
                SpanKind::Server,
                &parent,
                || {
                    let mut attributes = vec![
                        KeyValue::new("http.request.method", req.method.as_str().to_string()),
                        KeyValue::new("meshflow.direction", "inbound"),
                    ];
                    if let Some(peer) = peer {
                        attributes.push(KeyValue::new(
                            "meshflow.peer.principal",
                            peer.principal.clone(),
                        ));
                    }
                    attributes
                },
            ));
        }
        if refuse_bad_request(session, &self.shared, "inbound").await? {
            // Counted by `refuse_bad_request`; `logging` must not count it again.
            ctx.refused = true;
            return Ok(true);
        }
        // A captured call names the port its app dialled (transparent proxying); only a
        // verified sidecar may, and never one of ours.
        if ctx.peer.is_some() {
            ctx.target_port = session
                .req_header()
                .headers
                .get(crate::outbound::transparent::TARGET_PORT_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::outbound::transparent::parse_target_port)
                .filter(|(port, _)| *port != self.shared.app_port);
            if let Some((port, _)) = ctx.target_port {
                if self.own_ports.contains(&port) {
                    session.set_keepalive(None);
                    session
                        .respond_error_with_body(
                            403,
                            bytes::Bytes::from_static(b"meshflow: not a port of the app\n"),
                        )
                        .await?;
                    return Ok(true);
                }
            }
        }
        // Mesh-owned headers are the sidecar's alone: a client's never reaches authentication,
        // authorization or the app (issue 12, item 2).
        strip_mesh_owned(session.req_header_mut());
        self.authorize(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        // One last-chunk to an HTTP/1.1 app, whatever frame ended the body (issue 12, item 1).
        crate::http::hygiene::drop_empty_final_chunk(body, end_of_stream);
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // Another port than the app's (a captured call to it): on the address the connection
        // came in on (the pod IP, like opaque streams), HTTP/2 when the caller spoke it.
        if let Some((port, h2)) = ctx.target_port {
            let ip = session
                .server_addr()
                .and_then(|a| a.as_inet())
                .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
            let mut peer = HttpPeer::new((ip, port), false, String::new());
            if h2 {
                peer.options.set_http_version(2, 2);
                peer.options.max_h2_streams = 100;
            }
            peer.options.connection_timeout = Some(std::time::Duration::from_secs(1));
            return Ok(Box::new(peer));
        }
        let mut peer = HttpPeer::new(("127.0.0.1", self.shared.app_port), false, String::new());
        if matches!(
            self.shared.app_protocol,
            AppProtocol::H2c | AppProtocol::Grpc
        ) {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = 100;
        }
        peer.options.connection_timeout = Some(std::time::Duration::from_secs(1));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        scrub_forwarded_request(upstream_request);
        for name in &ctx.strip_headers {
            while upstream_request.remove_header(name.as_str()).is_some() {}
        }
        // Plaintext (PERMISSIVE) requests have no verified peer and get no XFCC.
        if let Some(peer) = &ctx.peer {
            upstream_request.insert_header(XFCC, self.xfcc_for(peer))?;
        }
        // Only the coordinator's sidecar has a secret: it tells the workflow API that this
        // request (and its XFCC) came through here. Client copies were scrubbed above.
        if let Some(secret) = &self.shared.app_auth_secret {
            upstream_request.insert_header(meshflow_api::SIDECAR_AUTH_HEADER, secret.as_ref())?;
        }
        // The app's parent is our server span; whatever came in (valid or not) is replaced.
        if let Some(span) = &ctx.span {
            crate::shared::set_trace_headers(upstream_request, &self.shared.tracing, span)?;
        }
        // Forward exactly what was authorized.
        tracing::debug!(uri = %upstream_request.uri, target = ?ctx.forwarded_target, "inbound upstream request");
        if let Some(target) = &ctx.forwarded_target {
            if upstream_request.raw_path() != target.as_bytes() {
                // Replace only the path and query: an HTTP/2 request keeps scheme and authority.
                // What cannot be expressed is refused, never forwarded as received.
                let mut parts = upstream_request.uri.clone().into_parts();
                let uri = target
                    .parse()
                    .ok()
                    .and_then(|path_and_query| {
                        parts.path_and_query = Some(path_and_query);
                        http::Uri::from_parts(parts).ok()
                    })
                    .ok_or_else(|| {
                        Error::explain(
                            ErrorType::HTTPStatus(400),
                            "the normalized request target cannot be forwarded",
                        )
                    })?;
                upstream_request.set_uri(uri);
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Set only by an outbound sidecar on its own answers; an app never speaks for the mesh.
        upstream_response.remove_header(crate::outbound::PROXY_ERROR_HEADER);
        if let Some(g) = upstream_response
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            ctx.grpc_status = Some(crate::shared::grpc_status_label(g));
        }
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(g) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            ctx.grpc_status = Some(crate::shared::grpc_status_label(g));
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy {
        respond_to_failure(session, e, 502).await
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        if !ctx.admitted {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // Only the access log wants the trace id as text; only a recorded span attributes.
        let trace_id = self
            .shared
            .access_log
            .as_ref()
            .and(ctx.span.as_ref())
            .map(|s| s.span_context().trace_id().to_string());
        if let Some(span) = ctx.span.as_mut().filter(|s| s.is_recording()) {
            if let Some(path) = &ctx.normalized_path {
                span.set_attribute(KeyValue::new("url.path", path.clone()));
            }
            if let Some((decision, policy)) = &ctx.authz {
                span.set_attribute(KeyValue::new("meshflow.authz.decision", *decision));
                span.set_attribute(KeyValue::new("meshflow.authz.policy", policy.clone()));
            }
            crate::shared::finish_span(span, status, ctx.grpc_status.as_deref(), 500);
        }
        if let Some(log) = &self.shared.access_log {
            let req = session.req_header();
            let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
            log.write(&serde_json::json!({
                "traceId": trace_id,
                "direction": "inbound",
                "workload": self.shared.workload,
                "peer": ctx.peer.as_ref().map(|p| p.uri.as_str()),
                "method": req.method.as_str(),
                "authority": req.uri.authority().map(|a| a.to_string()).or_else(|| header("host").map(str::to_string)),
                "path": ctx.normalized_path,
                "status": status,
                "durationMs": ctx.start.elapsed().as_secs_f64() * 1000.0,
                "authz": ctx.authz.as_ref().map(|(d, _)| *d),
                "policy": ctx.authz.as_ref().map(|(_, p)| p.clone()),
            }));
        }
        if ctx.refused {
            return;
        }
        self.series_for(ctx.peer.as_deref()).record(
            status,
            ctx.grpc_status.as_deref().unwrap_or(""),
            ctx.start.elapsed().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::is_target;

    /// The forwarded target is rewritten unless the wire bytes are exactly what was judged:
    /// path plus `?query`.
    #[test]
    fn targets_that_need_rewriting() {
        assert!(is_target(b"/a/b", "/a/b", None));
        assert!(is_target(b"/a?x=1", "/a", Some("x=1")));
        assert!(!is_target(b"?x=1", "/", Some("x=1")), "query-only target");
        assert!(!is_target(b"admin/secret", "/", None), "not origin-form");
        assert!(!is_target(b"http://h/a", "/a", None), "absolute-form");
        assert!(!is_target(b"/a/../b", "/b", None));
        assert!(
            !is_target(b"/a", "/a", Some("")),
            "an empty query is still a `?`"
        );
        assert!(!is_target(b"/a?", "/a", None));
    }
}
