//! The inbound listener (Pingora adapter): mTLS-terminated requests from other sidecars are
//! checked, stripped of spoofable identity headers, given one XFCC from the verified peer,
//! and forwarded to the app on 127.0.0.1.

use std::time::Instant;

use async_trait::async_trait;
use meshflow_policies::AppProtocol;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::http_hygiene::{xfcc_value, XFCC};
use crate::identity::PeerIdentity;
use crate::listener_common::{refuse_bad_request, respond_to_failure, scrub_forwarded_request};
use crate::shared::Shared;

/// Per-request state.
pub struct InboundCtx {
    start: Instant,
    peer: Option<String>,
}

/// The inbound `ProxyHttp`.
pub struct InboundProxy {
    shared: Shared,
}

impl InboundProxy {
    /// A proxy over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

fn peer_identity(session: &Session) -> Option<String> {
    let ext = session
        .digest()?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<PeerIdentity>()?;
    ext.spiffe_id.as_ref().map(|id| id.uri())
}

#[async_trait]
impl ProxyHttp for InboundProxy {
    type CTX = InboundCtx;

    fn new_ctx(&self) -> Self::CTX {
        InboundCtx {
            start: Instant::now(),
            peer: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let Some(peer) = peer_identity(session) else {
            // No client certificate: counted at handshake; close without forwarding anything.
            session.set_keepalive(None);
            let mut e = Error::explain(
                ErrorType::ConnectionClosed,
                "peer presented no client certificate",
            );
            e.esource = ErrorSource::Downstream;
            return Err(e);
        };
        ctx.peer = Some(peer);
        refuse_bad_request(session, &self.shared, "inbound").await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
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
        let own = self
            .shared
            .identity
            .svid
            .load()
            .as_ref()
            .map(|s| s.spiffe_id.uri())
            .unwrap_or_default();
        let peer = ctx.peer.as_deref().unwrap_or_default();
        upstream_request.insert_header(XFCC, xfcc_value(&own, peer))?;
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
        if ctx.peer.is_none() {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let service = self.shared.workload.rsplit('/').next().unwrap_or("unknown");
        self.shared
            .metrics
            .requests
            .with_label_values(&["inbound", service, &status.to_string()])
            .inc();
        self.shared
            .metrics
            .request_duration
            .with_label_values(&["inbound"])
            .observe(ctx.start.elapsed().as_secs_f64());
    }
}
