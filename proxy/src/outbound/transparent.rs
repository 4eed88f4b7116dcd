//! Transparent proxying: connections the capture rules ([`crate::capture`]) redirected to the
//! outbound listener, and opaque TCP over mTLS between sidecars.
//!
//! **Outbound.** Every connection accepted on the outbound port goes through
//! [`OutboundAccept`]. One whose original destination (`SO_ORIGINAL_DST`, read by Pingora's
//! `SocketDigest`) is the listener itself was not redirected: the app called the sidecar
//! explicitly, and the HTTP proxy serves it exactly as before (routing by authority). A
//! redirected one is looked up in the snapshot ([`ConfigSnapshot::destination`]):
//!
//! - a mesh service's cluster IP and port, or a mesh endpoint's pod IP: unless the port is
//!   opaque (the service port says so, or `--opaque-ports`), the first bytes decide — an HTTP/1
//!   request line or the HTTP/2 preface goes to the outbound HTTP proxy, which routes by the
//!   original destination and gives it the full mesh treatment (mTLS to an endpoint with its
//!   identity verified, retries, timeouts, metrics). Anything else, or nothing within
//!   `--protocol-detect-timeout` (a client of a server-first protocol waits for the server),
//!   is opaque: an mTLS connection to an endpoint's inbound port, ALPN [`OPAQUE_ALPN`], the
//!   server's identity verified exactly as for HTTP, a one-line preamble naming the target
//!   port, then the bytes both ways;
//! - a known service that is not meshed (Kubernetes: none of its pods runs the sidecar, or it
//!   has no pods, like `kubernetes`): passed through unchanged in plaintext to the original
//!   destination, under `REGISTRY_ONLY` too — it is in the registry (Istio's auto-mTLS;
//!   counted as `unmeshed`);
//! - anything else: passed through unchanged (`ALLOW_ANY`, the default; the proxy's own
//!   connection is not captured again: its UID is excluded) or refused (`REGISTRY_ONLY`:
//!   an HTTP/1 client gets a 502 with `meshflow-proxy-error: registry-only`, others a close).
//!
//! **Inbound.** [`crate::inbound::accept::InboundAccept`] hands a TLS connection that
//! negotiated [`OPAQUE_ALPN`] to [`serve_inbound_opaque`]: the verified peer, the preamble's
//! port and AuthorizationPolicy (Istio's TCP semantics: HTTP-only fields make an ALLOW rule
//! match nothing and are ignored in a DENY rule) decide; the bytes go to that port on the
//! address the connection arrived at (the pod IP, like Istio — a port the app binds on
//! loopback only is not exposed). Under PERMISSIVE a plaintext connection redirected from a
//! port other than the app port is judged by AuthorizationPolicy the same way — no principal,
//! its source IP and that port — and, when allowed, passed to that port unchanged
//! ([`inbound_passthrough`]); refused, it is closed and counted as `denied`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meshflow_policies::authz::{authorize, Action, AuthorizationPolicy, RequestAttributes};
use pingora_core::apps::ServerApp;
use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::CustomALPN;
use pingora_core::protocols::{SocketDigest, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{ConfigSnapshot, Destination, Endpoint};
use crate::identity::PeerIdentity;
use crate::outbound::OutboundProxy;
use crate::shared::Shared;

/// How long a new connection may take to send its first byte and finish a TLS handshake.
pub const FIRST_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The ALPN protocol of an opaque TCP stream between sidecars.
pub const OPAQUE_ALPN: &[u8] = b"meshflow-opaque";

/// The first line on an opaque stream: this, the target port, `\n`.
const PREAMBLE: &str = "meshflow-opaque/1 ";

/// Request header from a client's sidecar to the server's, on requests of captured
/// connections: the port the app dialled on the destination pod, and `;h2` when the app spoke
/// HTTP/2 (prior knowledge). The server's inbound forwards to that port (its app port when
/// absent). Mesh-owned (`x-meshflow-`): removed from what apps send, read only from verified
/// sidecars.
pub const TARGET_PORT_HEADER: &str = "x-meshflow-target-port";

/// The [`TARGET_PORT_HEADER`] value for `port` (`h2`: the app spoke HTTP/2).
pub fn target_port_value(port: u16, h2: bool) -> String {
    if h2 {
        format!("{port};h2")
    } else {
        port.to_string()
    }
}

/// Parses a [`TARGET_PORT_HEADER`] value: (port, HTTP/2).
pub fn parse_target_port(value: &str) -> Option<(u16, bool)> {
    let (port, h2) = match value.split_once(';') {
        Some((port, "h2")) => (port, true),
        Some(_) => return None,
        None => (value, false),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|p| *p > 0).map(|p| (p, h2))
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods an HTTP/1 request line is recognised by (RFC 9110 §9, PATCH RFC 5789).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// How long connecting to an endpoint (TCP + TLS) or a passthrough destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opaque: how many endpoints are tried before the client's connection is closed.
const OPAQUE_ATTEMPTS: usize = 3;

/// What happens to captured connections to destinations outside the mesh (Istio's
/// `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum OutboundTrafficPolicy {
    /// Passed through unchanged.
    #[value(name = "ALLOW_ANY")]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Refused.
    #[value(name = "REGISTRY_ONLY")]
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// Transparent-proxying settings (from the proxy's flags).
#[derive(Debug, Clone)]
pub struct TransparentSettings {
    /// Destinations outside the mesh.
    pub policy: OutboundTrafficPolicy,
    /// How long the first bytes of a captured connection are waited for.
    pub detect_timeout: Duration,
    /// Destination ports never detected (server-first protocols).
    pub opaque_ports: Vec<u16>,
    /// The proxy's own ports: never an opaque stream's target.
    pub own_ports: Vec<u16>,
}

/// The original destination of a connection the capture rules redirected; `None` when it was
/// not redirected (no conntrack entry, or the original destination is the listener itself).
pub fn redirected_destination(digest: &SocketDigest) -> Option<SocketAddr> {
    let original = *digest.original_dst()?.as_inet()?;
    let local = digest.local_addr().and_then(|a| a.as_inet().copied());
    (Some(original) != local).then_some(original)
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1 request line.
    Http1,
    /// The HTTP/2 preface (prior knowledge).
    H2,
    /// Something else.
    Opaque,
}

/// Classifies a connection's first bytes: `None` while `prefix` could still become either.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    if prefix.len() >= H2_PREFACE.len() && prefix.starts_with(H2_PREFACE) {
        return Some(Detected::H2);
    }
    let mut possible = H2_PREFACE.starts_with(prefix);
    for method in METHODS {
        let token = format!("{method} ");
        if prefix.starts_with(token.as_bytes()) {
            return Some(Detected::Http1);
        }
        possible |= token.as_bytes().starts_with(prefix);
    }
    (!possible).then_some(Detected::Opaque)
}

/// Reads a connection's first bytes (at most the HTTP/2 preface's 24) until [`classify`]
/// decides or `timeout` passes, then puts them back. `Ok(None)`: the timeout passed first;
/// `Err`: the client closed or failed.
async fn detect(l4: &mut L4Stream, timeout: Duration) -> std::io::Result<Option<Detected>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let outcome = loop {
        if let Some(detected) = classify(&prefix) {
            break Ok(Some(detected));
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - prefix.len();
        match tokio::time::timeout_at(deadline, l4.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => break Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(n)) => prefix.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break Err(e),
            Err(_) => break Ok(None),
        }
    };
    l4.rewind(&prefix);
    outcome
}

/// The outbound port's connection handler (see the module docs).
pub struct OutboundAccept {
    /// Explicit connections and HTTP/2 prior knowledge (h2c on).
    h2c: Arc<HttpProxy<OutboundProxy>>,
    /// Captured connections detected as HTTP/1 (h2c off: Pingora's h2c check would wait for
    /// 24 bytes a short request never sends).
    http1: Arc<HttpProxy<OutboundProxy>>,
    shared: Shared,
    settings: TransparentSettings,
    connector: TransportConnector,
}

impl OutboundAccept {
    /// Serves explicit connections with `h2c` (the outbound HTTP proxy as configured before
    /// capture existed) and captured HTTP/1 with `http1` (the same proxy, h2c off).
    pub fn new(
        h2c: HttpProxy<OutboundProxy>,
        http1: HttpProxy<OutboundProxy>,
        shared: Shared,
        settings: TransparentSettings,
    ) -> Self {
        Self {
            h2c: Arc::new(h2c),
            http1: Arc::new(http1),
            shared,
            settings,
            connector: TransportConnector::new(None),
        }
    }

    fn count(&self, route: &str) {
        self.shared
            .metrics
            .tcp_connections
            .with_label_values(&["outbound", route])
            .inc();
    }

    async fn serve_http(
        proxy: &Arc<HttpProxy<OutboundProxy>>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) {
        // Every request of the connection is served here (like the inbound listener): a
        // reused stream must not be classified again.
        let mut next = proxy.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = proxy.process_new(stream, shutdown).await;
        }
    }

    /// The bytes both ways between the client and `dst` itself, unchanged (the sidecar's own
    /// connection is not captured again: its UID is excluded).
    async fn pass_through(mut l4: Box<L4Stream>, dst: SocketAddr) {
        let upstream =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(dst)).await;
        match upstream {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut l4, &mut upstream).await;
            }
            Ok(Err(e)) => tracing::debug!(%dst, "passthrough connect failed: {e}"),
            Err(_) => tracing::debug!(%dst, "passthrough connect timed out"),
        }
    }

    /// A destination outside the mesh.
    async fn outside(&self, mut l4: Box<L4Stream>, dst: SocketAddr) {
        if self.settings.policy == OutboundTrafficPolicy::AllowAny {
            self.count("passthrough");
            Self::pass_through(l4, dst).await;
            return;
        }
        self.count("registry_only");
        tracing::info!(%dst, "refused: not a mesh destination (REGISTRY_ONLY)");
        if let Ok(Some(Detected::Http1)) = detect(&mut l4, self.settings.detect_timeout).await {
            let body = format!(
                "meshflow: {dst} is not a mesh service and the outbound traffic policy is \
                 REGISTRY_ONLY\n"
            );
            let response = format!(
                "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
                 content-length: {}\r\n{}: registry-only\r\nconnection: close\r\n\r\n{body}",
                body.len(),
                crate::outbound::PROXY_ERROR_HEADER
            );
            let _ = l4.write_all(response.as_bytes()).await;
            let _ = l4.flush().await;
            linger(&mut l4).await;
        }
    }

    /// Opaque TCP to a mesh destination over mTLS.
    async fn opaque(&self, mut l4: Box<L4Stream>, snapshot: &ConfigSnapshot, dst: &Destination) {
        let endpoints: Vec<Endpoint> = match &dst.pinned {
            Some(endpoint) => vec![endpoint.clone()],
            None => snapshot
                .services
                .get(&dst.service)
                .map(|s| s.endpoints.clone())
                .unwrap_or_default(),
        };
        let start = if endpoints.is_empty() {
            0
        } else {
            rand::random::<usize>() % endpoints.len()
        };
        for endpoint in endpoints
            .iter()
            .cycle()
            .skip(start)
            .take(endpoints.len().min(OPAQUE_ATTEMPTS))
        {
            let Some(mut upstream) = self.connect_opaque(endpoint).await else {
                continue;
            };
            let preamble = format!("{PREAMBLE}{}\n", dst.target_port);
            if upstream.write_all(preamble.as_bytes()).await.is_err()
                || upstream.flush().await.is_err()
            {
                continue;
            }
            let _ = tokio::io::copy_bidirectional(&mut l4, &mut upstream).await;
            return;
        }
        self.count("unavailable");
        tracing::warn!(
            service = %format!("{}.{}", dst.service.0, dst.service.1),
            "opaque connection closed: no endpoint reachable"
        );
    }

    /// An mTLS connection to `endpoint`'s inbound port with ALPN [`OPAQUE_ALPN`]; the server
    /// must prove the endpoint's identity (SNI = its DNS SAN, verified against the bundle).
    async fn connect_opaque(&self, endpoint: &Endpoint) -> Option<Stream> {
        let svid = self.shared.identity.svid.load_full()?;
        let bundle = self.shared.identity.bundle.load_full();
        let mut peer = HttpPeer::new(
            endpoint.address.as_str(),
            true,
            endpoint.identity.dns_name(),
        );
        peer.client_cert_key = Some(svid.cert_key.clone());
        peer.options.ca = Some(bundle.pingora_ca.clone());
        peer.options.alpn = ALPN::Custom(CustomALPN::new(OPAQUE_ALPN.to_vec()));
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT);
        let metrics = &self.shared.metrics;
        match self.connector.new_stream(&peer).await {
            Ok(stream) => {
                metrics.connections.with_label_values(&["outbound"]).inc();
                metrics
                    .tls_handshakes
                    .with_label_values(&["outbound"])
                    .inc();
                Some(stream)
            }
            Err(e) => {
                let reason = crate::identity::find_rustls_error(e.root_cause())
                    .map(crate::identity::client_handshake_reason);
                if let Some(reason) = reason {
                    metrics
                        .tls_handshake_errors
                        .with_label_values(&["outbound", reason])
                        .inc();
                }
                tracing::warn!(
                    endpoint = %endpoint.address,
                    expected_identity = %endpoint.identity.uri(),
                    reason = reason.unwrap_or("connect"),
                    "opaque connection to endpoint failed: {e}"
                );
                None
            }
        }
    }
}

/// After an error response: stop sending, then read (and drop) what the client still sends
/// for up to a second, so closing does not reset the connection before it read the response.
async fn linger(l4: &mut L4Stream) {
    let _ = l4.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(l4.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[async_trait]
impl ServerApp for OutboundAccept {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let redirected = stream
            .get_socket_digest()
            .and_then(|d| redirected_destination(&d));
        let Some(original) = redirected else {
            // Explicit use (the app named the sidecar): exactly as without capture.
            Self::serve_http(&self.h2c, stream, shutdown).await;
            return None;
        };
        let mut l4: Box<L4Stream> = stream.into_any().downcast().ok()?;
        let Some(snapshot) = self.shared.config.current() else {
            self.count("no_config");
            return None;
        };
        let Some(dst) = snapshot.destination(original) else {
            self.outside(l4, original).await;
            return None;
        };
        if !dst.meshed {
            // In the registry, but no sidecar to mTLS to: plaintext, as the app sent it.
            self.count("unmeshed");
            Self::pass_through(l4, original).await;
            return None;
        }
        let route = if dst.opaque || self.settings.opaque_ports.contains(&original.port()) {
            "opaque"
        } else {
            match detect(&mut l4, self.settings.detect_timeout).await {
                Ok(Some(Detected::Http1)) => {
                    self.count("http1");
                    Self::serve_http(&self.http1, l4, shutdown).await;
                    return None;
                }
                Ok(Some(Detected::H2)) => {
                    self.count("h2");
                    Self::serve_http(&self.h2c, l4, shutdown).await;
                    return None;
                }
                Ok(Some(Detected::Opaque)) => "opaque_detected",
                Ok(None) => "opaque_timeout",
                Err(_) => return None,
            }
        };
        self.count(route);
        self.opaque(l4, &snapshot, &dst).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.h2c.as_ref()).await;
        ServerApp::cleanup(self.http1.as_ref()).await;
    }
}

/// Istio's view of an AuthorizationPolicy for a TCP connection: an ALLOW or AUDIT rule that
/// names an HTTP-only attribute (hosts, methods, paths, request principals, `request.*` keys)
/// never matches; in a DENY rule those attributes are dropped, so the rule matches more.
pub fn tcp_view(policy: &AuthorizationPolicy) -> AuthorizationPolicy {
    let mut policy = policy.clone();
    let deny = policy.spec.action == Action::Deny;
    let Some(rules) = policy.spec.rules.as_mut() else {
        return policy;
    };
    let http_key = |key: &str| key.starts_with("request.");
    if deny {
        for rule in rules.iter_mut() {
            for from in rule.from.iter_mut().flatten() {
                from.source.request_principals = None;
                from.source.not_request_principals = None;
            }
            for to in rule.to.iter_mut().flatten() {
                let op = &mut to.operation;
                op.hosts = None;
                op.not_hosts = None;
                op.methods = None;
                op.not_methods = None;
                op.paths = None;
                op.not_paths = None;
            }
            if let Some(when) = rule.when.as_mut() {
                when.retain(|c| !http_key(&c.key));
            }
        }
    } else {
        rules.retain(|rule| {
            let from_http = rule.from.iter().flatten().any(|f| {
                f.source.request_principals.is_some() || f.source.not_request_principals.is_some()
            });
            let to_http = rule.to.iter().flatten().any(|t| {
                let op = &t.operation;
                op.hosts.is_some()
                    || op.not_hosts.is_some()
                    || op.methods.is_some()
                    || op.not_methods.is_some()
                    || op.paths.is_some()
                    || op.not_paths.is_some()
            });
            let when_http = rule.when.iter().flatten().any(|c| http_key(&c.key));
            !(from_http || to_http || when_http)
        });
    }
    policy
}

/// Reads the preamble line (byte by byte: nothing after it may be consumed) and returns the
/// target port.
async fn read_preamble<S: AsyncRead + Unpin>(stream: &mut S) -> Option<u16> {
    let mut line = Vec::with_capacity(32);
    loop {
        let byte = stream.read_u8().await.ok()?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > 64 {
            return None;
        }
    }
    std::str::from_utf8(&line)
        .ok()?
        .strip_prefix(PREAMBLE)?
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
}

/// Serves an inbound opaque stream (a TLS connection that negotiated [`OPAQUE_ALPN`]; see the
/// module docs). `local` is the address the connection arrived at, `peer_ip` the client's.
pub async fn serve_inbound_opaque<S>(
    mut tls: S,
    shared: &Shared,
    settings: &TransparentSettings,
    local: IpAddr,
    peer_ip: Option<IpAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin + pingora_core::protocols::Ssl,
{
    let metrics = &shared.metrics;
    let denied = || {
        metrics
            .tcp_connections
            .with_label_values(&["inbound", "denied"])
            .inc();
    };
    // The handshake callback verified the peer; without an identity it was already counted.
    let Some(peer) = tls
        .get_ssl_digest()
        .and_then(|d| d.extension.get::<PeerIdentity>().cloned())
        .and_then(|p| p.spiffe_id)
    else {
        return;
    };
    let Ok(Some(port)) = tokio::time::timeout(FIRST_BYTES_TIMEOUT, read_preamble(&mut tls)).await
    else {
        denied();
        tracing::info!(peer = %peer.uri(), "opaque stream without a valid preamble");
        return;
    };
    if settings.own_ports.contains(&port) {
        denied();
        tracing::info!(peer = %peer.uri(), port, "opaque stream to the proxy's own port refused");
        return;
    }
    let attributes = RequestAttributes {
        principal: Some(peer.principal()),
        source_namespace: Some(peer.namespace().to_string()),
        source_ip: peer_ip,
        remote_ip: peer_ip,
        destination_ip: Some(local),
        port,
        ..Default::default()
    };
    if !authorize_tcp(shared, &attributes, "authorization (opaque TCP)") {
        denied();
        return;
    }
    let target = SocketAddr::new(local, port);
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(mut app)) => {
            metrics
                .tcp_connections
                .with_label_values(&["inbound", "opaque"])
                .inc();
            let _ = app.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
        }
        _ => {
            tracing::info!(%target, "opaque stream: the app port refused the connection");
        }
    }
}

/// Evaluates the workload's AuthorizationPolicies for a TCP connection (their [`tcp_view`]),
/// counts the decision in `meshflow_authz_decisions_total` and logs it to the access log as
/// `what`. Returns whether the connection is allowed.
fn authorize_tcp(shared: &Shared, attributes: &RequestAttributes, what: &str) -> bool {
    let policies: Vec<AuthorizationPolicy> = shared
        .config
        .current()
        .map(|s| s.authorization.iter().map(tcp_view).collect())
        .unwrap_or_default();
    let decision = authorize(policies.iter(), attributes);
    let policy = decision.policy.clone().unwrap_or_else(|| "none".into());
    let verdict = if decision.allowed { "allow" } else { "deny" };
    shared
        .metrics
        .authz_decisions
        .with_label_values(&[verdict, &policy])
        .inc();
    tracing::info!(
        target: "meshflow::access",
        decision = verdict,
        policy = %policy,
        principal = %attributes.principal.as_deref().unwrap_or("-"),
        source_ip = ?attributes.source_ip,
        port = attributes.port,
        "{what}"
    );
    decision.allowed
}

/// The attributes AuthorizationPolicy sees for a plaintext connection (no principal, no
/// namespace) from `peer_ip` captured on its way to `local`:`port`.
fn plaintext_attributes(local: IpAddr, peer_ip: Option<IpAddr>, port: u16) -> RequestAttributes {
    RequestAttributes {
        principal: None,
        source_namespace: None,
        source_ip: peer_ip,
        remote_ip: peer_ip,
        destination_ip: Some(local),
        port,
        ..Default::default()
    }
}

/// PERMISSIVE: a plaintext connection from `peer_ip` captured on its way to `port` (not the
/// app port) goes to that port unchanged — if AuthorizationPolicy allows it, judged as the
/// opaque mTLS path judges a stream (Istio's TCP semantics, [`tcp_view`]) with no principal,
/// the source IP and the original destination port. Refused: closed and counted as
/// `meshflow_tcp_connections_total{direction="inbound", route="denied"}`.
pub async fn inbound_passthrough(
    shared: &Shared,
    mut l4: Box<L4Stream>,
    local: IpAddr,
    peer_ip: Option<IpAddr>,
    port: u16,
) {
    let attributes = plaintext_attributes(local, peer_ip, port);
    if !authorize_tcp(shared, &attributes, "authorization (plaintext TCP)") {
        shared
            .metrics
            .tcp_connections
            .with_label_values(&["inbound", "denied"])
            .inc();
        return;
    }
    let target = SocketAddr::new(local, port);
    if let Ok(Ok(mut app)) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await
    {
        shared
            .metrics
            .tcp_connections
            .with_label_values(&["inbound", "passthrough"])
            .inc();
        let _ = tokio::io::copy_bidirectional(&mut l4, &mut app).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_first_bytes() {
        for (bytes, expected) in [
            (&b""[..], None),
            (b"G", None),
            (b"GET", None),
            (b"GET ", Some(Detected::Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"PATCH /x", Some(Detected::Http1)),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Detected::H2)),
            (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Some(Detected::Opaque)),
            (b"hello\n", Some(Detected::Opaque)),
            (b"get / HTTP/1.1", Some(Detected::Opaque)),
            (b"GETX", Some(Detected::Opaque)),
            (b"\x16\x03\x01", Some(Detected::Opaque)),
            (b"\x00", Some(Detected::Opaque)),
        ] {
            assert_eq!(
                classify(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    fn policy(yaml: &str) -> AuthorizationPolicy {
        AuthorizationPolicy::parse(std::path::Path::new("p.yaml"), yaml).unwrap()
    }

    fn tcp(principal: &str, port: u16) -> RequestAttributes {
        RequestAttributes {
            principal: Some(principal.into()),
            source_namespace: Some("shop".into()),
            port,
            ..Default::default()
        }
    }

    /// Istio's TCP semantics: an ALLOW rule with HTTP-only fields allows no TCP connection; a
    /// DENY rule with them denies more.
    #[test]
    fn tcp_view_of_policies() {
        let allow = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: a, namespace: shop }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { methods: [GET] } }]
  - from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }]
    to: [{ operation: { ports: ['7000'] } }]
",
        );
        let view = [tcp_view(&allow)];
        assert!(authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/client", 7000)).allowed);
        assert!(!authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/client", 7001)).allowed);
        assert!(!authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/other", 7000)).allowed);
        let deny = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: d, namespace: shop }
spec:
  action: DENY
  rules:
  - from: [{ source: { principals: [cluster.local/ns/shop/sa/other] } }]
    to: [{ operation: { paths: [/admin] } }]
",
        );
        // As HTTP it would deny only /admin; as TCP the path cannot be seen: denied.
        let view = [tcp_view(&deny)];
        assert!(!authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/other", 7000)).allowed);
        assert!(authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/client", 7000)).allowed);
    }

    /// PERMISSIVE plaintext passthrough: judged like an opaque stream without a principal —
    /// a rule naming principals does not match it, one naming IP blocks or only ports does.
    #[test]
    fn plaintext_tcp_is_authorized_without_a_principal() {
        let local: IpAddr = "10.0.0.2".parse().unwrap();
        let peer: IpAddr = "10.0.0.3".parse().unwrap();
        let only_client = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: a, namespace: shop }
spec:
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }]
    to: [{ operation: { ports: ['9090'] } }]
",
        );
        let view = [tcp_view(&only_client)];
        let plain = plaintext_attributes(local, Some(peer), 9090);
        assert_eq!(plain.principal, None);
        assert_eq!(plain.destination_ip, Some(local));
        assert!(!authorize(view.iter(), &plain).allowed);
        assert!(authorize(view.iter(), &tcp("cluster.local/ns/shop/sa/client", 9090)).allowed);
        let by_ip = policy(
            "apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: b, namespace: shop }
spec:
  action: ALLOW
  rules:
  - from: [{ source: { ipBlocks: [10.0.0.3/32] } }]
    to: [{ operation: { ports: ['9090'] } }]
",
        );
        let view = [tcp_view(&by_ip)];
        assert!(authorize(view.iter(), &plaintext_attributes(local, Some(peer), 9090)).allowed);
        assert!(!authorize(view.iter(), &plaintext_attributes(local, Some(peer), 9091)).allowed);
        let other: IpAddr = "10.0.0.4".parse().unwrap();
        assert!(!authorize(view.iter(), &plaintext_attributes(local, Some(other), 9090)).allowed);
    }

    #[test]
    fn target_port_header() {
        assert_eq!(
            parse_target_port(&target_port_value(9090, false)),
            Some((9090, false))
        );
        assert_eq!(
            parse_target_port(&target_port_value(8080, true)),
            Some((8080, true))
        );
        for bad in ["", "0", "+80", "80;h3", "99999", "80 ", "80;h2;x", "x"] {
            assert_eq!(parse_target_port(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn preamble() {
        let mut ok: &[u8] = b"meshflow-opaque/1 7000\nrest";
        assert_eq!(read_preamble(&mut ok).await, Some(7000));
        assert_eq!(ok, b"rest", "nothing after the line is consumed");
        for bad in [
            &b"meshflow-opaque/1 0\n"[..],
            b"meshflow-opaque/2 80\n",
            b"meshflow-opaque/1 99999\n",
            b"GET / HTTP/1.1\r\n",
            &[b'x'; 100],
        ] {
            let mut bad = bad;
            assert_eq!(read_preamble(&mut bad).await, None);
        }
    }
}
