//! One inbound port for both mTLS and plaintext (PeerAuthentication PERMISSIVE).
//!
//! Pingora binds a listener as either TLS or plaintext. meshflow binds the inbound port as
//! plaintext and runs this [`ServerApp`] on each accepted connection: it peeks at the first
//! byte (Pingora's `Peek` on the L4 stream: read, then rewind), and a TLS record
//! (`0x16`, handshake, RFC 8446 §5.1) goes through Pingora's own rustls [`Acceptor`] — the
//! same resolver, client verifier and handshake callbacks a TLS listener would use — before
//! the stream reaches the inbound [`HttpProxy`]. Anything else is plaintext: served only when
//! the workload's current mode is PERMISSIVE, otherwise closed and counted as
//! `meshflow_tls_handshake_errors_total{direction="inbound", reason="plaintext"}`.
//! The mode is read per connection (and again per request by the inbound proxy), so a
//! PeerAuthentication change applies without rebinding the port.
//!
//! Transparent proxying ([`crate::outbound::transparent`]): a TLS connection that negotiated ALPN
//! `meshflow-opaque` is an opaque TCP stream from another sidecar, not HTTP; a plaintext
//! connection the capture rules redirected from a port other than the app port is passed to
//! that port under PERMISSIVE when AuthorizationPolicy allows it (TCP semantics, no principal;
//! plaintext HTTP to the app port is authorized per request by the inbound proxy).

use std::sync::Arc;

use async_trait::async_trait;
use meshflow_policies::authn::MtlsMode;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Peek, Ssl, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use crate::inbound::InboundProxy;
use crate::outbound::transparent::{TransparentSettings, OPAQUE_ALPN};
use crate::shared::Shared;

pub use crate::outbound::transparent::FIRST_BYTES_TIMEOUT;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The inbound port's connection handler (see the module docs).
pub struct InboundAccept {
    proxy: Arc<HttpProxy<InboundProxy>>,
    tls: Acceptor,
    shared: Shared,
    transparent: TransparentSettings,
}

/// The inbound rustls acceptor: Pingora's `TlsSettings::build` takes one ALPN preference
/// (`h2`, `http/1.1`), so the config is built here the same way (TLS 1.2 + 1.3, refused below
/// 1.3 by the resolver and verifier; `resolver` and `verifier` are the ones the settings got)
/// with [`OPAQUE_ALPN`] added. It replaces the acceptor inside Pingora's [`Acceptor`], which
/// keeps the handshake callbacks.
pub fn tls_acceptor(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> pingora_core::tls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS12,
        &rustls::version::TLS13,
    ])
    .with_client_cert_verifier(verifier)
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), OPAQUE_ALPN.to_vec()];
    pingora_core::tls::TlsAcceptor::from(Arc::new(config))
}

impl InboundAccept {
    /// Serves `proxy` behind `tls` (built from the inbound `TlsSettings`, its acceptor from
    /// [`tls_acceptor`]).
    pub fn new(
        proxy: HttpProxy<InboundProxy>,
        tls: Acceptor,
        shared: Shared,
        transparent: TransparentSettings,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            tls,
            shared,
            transparent,
        }
    }

    fn refuse(&self, reason: &str) -> Option<Stream> {
        self.shared
            .metrics
            .tls_handshake_errors
            .with_label_values(&["inbound", reason])
            .inc();
        None
    }
}

/// The current inbound mTLS mode (STRICT until a snapshot says otherwise).
pub fn current_mode(shared: &Shared) -> MtlsMode {
    shared
        .config
        .current()
        .map_or(MtlsMode::Strict, |s| s.mtls_mode)
}

#[async_trait]
impl ServerApp for InboundAccept {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The plaintext listener hands over Pingora's L4 stream.
        let digest = stream.get_socket_digest();
        let local = digest
            .as_ref()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet().copied()));
        let redirected = digest
            .as_ref()
            .and_then(|d| crate::outbound::transparent::redirected_destination(d));
        let peer_ip = digest
            .as_ref()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().map(|a| a.ip())));
        let mut l4: Box<L4Stream> = stream.into_any().downcast().ok()?;
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTES_TIMEOUT, l4.try_peek(&mut first)).await {
            Ok(Ok(_)) => {}
            // Closed or silent before sending anything.
            _ => return None,
        }
        let stream: Stream = if first[0] == TLS_HANDSHAKE_RECORD {
            match tokio::time::timeout(FIRST_BYTES_TIMEOUT, self.tls.tls_handshake(*l4)).await {
                Ok(Ok(tls)) => {
                    let opaque = matches!(tls.selected_alpn_proto(),
                        Some(ALPN::Custom(ref c)) if c.protocol() == OPAQUE_ALPN);
                    if let (true, Some(local)) = (opaque, local) {
                        crate::outbound::transparent::serve_inbound_opaque(
                            tls,
                            &self.shared,
                            &self.transparent,
                            local.ip(),
                            peer_ip,
                        )
                        .await;
                        return None;
                    }
                    Box::new(tls)
                }
                // Verifier and callbacks have counted their own reasons.
                Ok(Err(e)) => {
                    tracing::debug!("inbound TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => return self.refuse("handshake_timeout"),
            }
        } else if current_mode(&self.shared) == MtlsMode::Permissive {
            self.shared.metrics.plaintext_connections.inc();
            // Captured on its way to another port than the app's: that port gets it as is,
            // if AuthorizationPolicy allows a connection without a principal from this peer.
            if let (Some(original), Some(local)) = (redirected, local) {
                if original.port() != self.shared.app_port
                    && !self.transparent.own_ports.contains(&original.port())
                {
                    crate::outbound::transparent::inbound_passthrough(
                        &self.shared,
                        l4,
                        local.ip(),
                        peer_ip,
                        original.port(),
                    )
                    .await;
                    return None;
                }
            }
            l4
        } else {
            return self.refuse("plaintext");
        };
        // Serve every request of the connection here: a reused stream must not be peeked at
        // again as if it were new.
        let mut next = self.proxy.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.proxy.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}
