//! The sidecar's identity material: its current SVID and the trust bundle, swapped atomically
//! on renewal or bundle change, plus the rustls hooks that read them on every handshake
//! (a certificate resolver, a rotating client-certificate verifier, and Pingora's
//! handshake-complete callback that records the peer's SPIFFE ID).

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use meshflow_policies::spiffe::from_certificate_der;
use meshflow_policies::SpiffeId;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::telemetry::metrics::ProxyMetrics;

/// Errors building identity material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// PEM or DER could not be parsed.
    #[error("bad certificate material: {0}")]
    Material(String),
}

/// The sidecar's current X.509-SVID in the shapes rustls (inbound) and Pingora (outbound) need.
pub struct Svid {
    /// For the inbound listener's resolver.
    pub certified: Arc<CertifiedKey>,
    /// For outbound peers' client certificate.
    pub cert_key: Arc<CertKey>,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// Issuance time (renewal is scheduled from it).
    pub issued_at: SystemTime,
    /// NotAfter.
    pub not_after: SystemTime,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: SpiffeId,
    /// Chain PEM (for the control-plane client's TLS identity).
    pub chain_pem: String,
    /// Private key PEM.
    pub key_pem: String,
}

/// Roots the sidecar trusts, in the shapes rustls and Pingora need.
pub struct TrustBundle {
    /// PEM as received.
    pub pem: String,
    /// rustls root store.
    pub roots: Arc<RootCertStore>,
    /// Pingora per-peer CA list.
    pub pingora_ca: Arc<[WrappedX509]>,
    /// Hash of the PEM; part of outbound connection-pool keys, so connections made under an old
    /// bundle are never reused after a change.
    pub version: u64,
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| IdentityError::Material(e.to_string()))?;
    if certs.is_empty() {
        return Err(IdentityError::Material("no certificate in PEM".into()));
    }
    Ok(certs)
}

impl TrustBundle {
    /// Parses a PEM bundle.
    ///
    /// # Errors
    /// [`IdentityError::Material`] when the PEM holds no usable certificate.
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        let certs = pem_certs(pem)?;
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| IdentityError::Material(e.to_string()))?;
        }
        let pingora_ca: Vec<WrappedX509> = certs
            .iter()
            .map(|c| WrappedX509::new(c.as_ref().to_vec(), pingora_core::utils::tls::parse_x509))
            .collect();
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pem.hash(&mut hasher);
        Ok(Self {
            pem: pem.to_string(),
            roots: Arc::new(roots),
            pingora_ca: Arc::from(pingora_ca),
            version: hasher.finish(),
        })
    }
}

impl Svid {
    /// Builds an SVID from the CA's chain PEM and the sidecar's PKCS#8 key (DER).
    ///
    /// # Errors
    /// [`IdentityError::Material`] for unparsable certificates, a key rustls cannot use, or a
    /// leaf without exactly one SPIFFE URI SAN.
    pub fn new(
        chain_pem: &str,
        key_pkcs8_der: Vec<u8>,
        key_pem: String,
        issued_at: SystemTime,
    ) -> Result<Self, IdentityError> {
        let chain = pem_certs(chain_pem)?;
        let key = PrivateKeyDer::try_from(key_pkcs8_der.clone())
            .map_err(|e| IdentityError::Material(e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::Material(e.to_string()))?;
        let (spiffe_id, serial_hex, not_after) = {
            let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref())
                .map_err(|e| IdentityError::Material(e.to_string()))?;
            let id = from_certificate_der(chain[0].as_ref())
                .ok_or_else(|| IdentityError::Material("leaf has no single SPIFFE ID".into()))?;
            let not_after = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(
                    leaf.validity().not_after.timestamp().max(0) as u64
                );
            (id, leaf.raw_serial_as_string().replace(':', ""), not_after)
        };
        let cert_key = CertKey::new(
            chain.iter().map(|c| c.as_ref().to_vec()).collect(),
            key_pkcs8_der,
        );
        Ok(Self {
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            cert_key: Arc::new(cert_key),
            serial_hex,
            issued_at,
            not_after,
            spiffe_id,
            chain_pem: chain_pem.to_string(),
            key_pem,
        })
    }
}

/// Current identity material, shared by listeners, connectors and the control-plane client.
pub struct IdentityState {
    /// The current SVID (`None` until the first Certify succeeds).
    pub svid: ArcSwapOption<Svid>,
    /// The current trust bundle.
    pub bundle: ArcSwap<TrustBundle>,
    verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
    trust_domain: String,
    metrics: ProxyMetrics,
}

impl IdentityState {
    /// Starts with `bundle` (from the bootstrap file) and no SVID.
    ///
    /// # Errors
    /// When no client verifier can be built from the bundle.
    pub fn new(
        bundle: TrustBundle,
        trust_domain: &str,
        metrics: ProxyMetrics,
    ) -> Result<Arc<Self>, IdentityError> {
        let verifier = build_verifier(&bundle)?;
        Ok(Arc::new(Self {
            svid: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(bundle),
            verifier: ArcSwap::from_pointee(verifier),
            trust_domain: trust_domain.to_string(),
            metrics,
        }))
    }

    /// Replaces the trust bundle if it changed (new handshakes use it at once).
    ///
    /// # Errors
    /// When the new bundle is unusable; the old one stays.
    pub fn set_bundle_pem(&self, pem: &str) -> Result<(), IdentityError> {
        if self.bundle.load().pem == pem {
            return Ok(());
        }
        let bundle = TrustBundle::from_pem(pem)?;
        let verifier = build_verifier(&bundle)?;
        self.verifier.store(Arc::new(verifier));
        self.bundle.store(Arc::new(bundle));
        Ok(())
    }

    /// Verifies a client chain against the current trust bundle at `now` and requires exactly
    /// one SPIFFE URI SAN in the mesh trust domain. On failure: the metric reason and the
    /// rustls error.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, (&'static str, rustls::Error)> {
        let verifier = self.verifier.load();
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| (reason_for(&e), e))?;
        from_certificate_der(end_entity.as_ref())
            .filter(|id| id.trust_domain() == self.trust_domain)
            .ok_or((
                "bad_identity",
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            ))
    }

    /// The mesh CA's end as this sidecar sees it: [`ca_chain_not_after`] of the current SVID
    /// over its intermediates and the trust bundle. `None` before the first SVID.
    pub fn ca_not_after(&self) -> Option<SystemTime> {
        let svid = self.svid.load_full()?;
        let chain = pem_certs(&svid.chain_pem).ok()?;
        let (leaf, intermediates) = chain.split_first()?;
        let mut others = intermediates.to_vec();
        others.extend(pem_certs(&self.bundle.load().pem).unwrap_or_default());
        ca_chain_not_after(leaf, &others)
    }

    /// Installs a new SVID; new handshakes use it, open connections keep theirs.
    pub fn set_svid(&self, svid: Svid) {
        self.metrics.cert_expiration.set(
            svid.not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        self.svid.store(Some(Arc::new(svid)));
    }
}

fn build_verifier(bundle: &TrustBundle) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    WebPkiClientVerifier::builder_with_provider(
        bundle.roots.clone(),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| IdentityError::Material(e.to_string()))
}

/// Inbound certificate resolver: the current SVID, and only for TLS 1.3 clients.
///
/// Pingora's rustls listener enables TLS 1.2 and 1.3 and offers no setting; a ClientHello
/// without any TLS 1.3 cipher suite is refused here (no certificate → handshake failure),
/// counted as `protocol_version`.
#[derive(Debug)]
pub struct SvidResolver {
    identity: Arc<IdentityState>,
}

impl std::fmt::Debug for IdentityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityState")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl SvidResolver {
    /// A resolver over `identity`.
    pub fn new(identity: Arc<IdentityState>) -> Self {
        Self { identity }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_tls13 = hello
            .cipher_suites()
            .iter()
            .any(|s| u16::from(*s) & 0xff00 == 0x1300);
        if !offers_tls13 {
            self.identity
                .metrics
                .tls_handshake_errors
                .with_label_values(&["inbound", "protocol_version"])
                .inc();
            return None;
        }
        self.identity
            .svid
            .load()
            .as_ref()
            .map(|s| s.certified.clone())
    }
}

/// Client-certificate verifier that reads the current trust bundle on every handshake,
/// requires exactly one SPIFFE URI SAN in the mesh trust domain, and counts refusals by reason.
/// A missing certificate passes here and is refused after the handshake (see
/// [`HandshakeCallbacks`]), so that it can be counted.
#[derive(Debug)]
pub struct MeshClientVerifier {
    identity: Arc<IdentityState>,
}

impl MeshClientVerifier {
    /// A verifier over `identity`.
    pub fn new(identity: Arc<IdentityState>) -> Self {
        Self { identity }
    }

    fn count(&self, reason: &str) {
        self.identity
            .metrics
            .tls_handshake_errors
            .with_label_values(&["inbound", reason])
            .inc();
    }
}

/// The metric reason for a rustls certificate error.
pub fn reason_for(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "identity_mismatch"
            }
            _ => "invalid_certificate",
        },
        _ => "other",
    }
}

/// The rustls error in `error`'s source chain, also when wrapped in a `std::io::Error` (where
/// tokio-rustls and Pingora's rustls stream put handshake failures).
pub fn find_rustls_error<'a>(
    mut error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    for _ in 0..32 {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // `io::Error::source` skips the wrapped error itself: look inside first.
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            error = inner;
            continue;
        }
        error = error.source()?;
    }
    None
}

/// The metric reason for a TLS handshake this sidecar started (outbound, or to the control
/// plane): the certificate reasons of [`reason_for`], plus `refused_by_peer` when the server
/// sent a fatal alert (it refused our certificate or the handshake).
pub fn client_handshake_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::AlertReceived(_) => "refused_by_peer",
        e => reason_for(e),
    }
}

/// What an outbound handshake failure with `reason` (from [`client_handshake_reason`]) means,
/// for the log line.
pub fn describe_outbound_tls_failure(reason: &str) -> &'static str {
    match reason {
        "identity_mismatch" => "server did not prove the expected identity",
        "expired" => {
            "the server's certificate, or a CA certificate above it, has expired (an expired \
             mesh CA expires every SVID with it)"
        }
        "not_yet_valid" => "the server's certificate is not valid yet (clock skew?)",
        "unknown_ca" => "the server's certificate does not chain to the mesh trust bundle",
        "invalid_certificate" => "the server's certificate is invalid",
        "refused_by_peer" => "the server refused the handshake (our certificate, or TLS 1.3)",
        _ => "TLS handshake with the server failed",
    }
}

/// The earliest NotAfter of the CA certificates above `leaf`: those in `others` (the SVID's
/// intermediates and the trust bundle) found by issuer name, up to a self-issued root.
/// `None` when `leaf` does not parse.
pub fn ca_chain_not_after(
    leaf: &CertificateDer<'_>,
    others: &[CertificateDer<'_>],
) -> Option<SystemTime> {
    let parse = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der.as_ref())
            .ok()
            .map(|(_, c)| {
                (
                    c.subject().as_raw().to_vec(),
                    c.issuer().as_raw().to_vec(),
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(
                            c.validity().not_after.timestamp().max(0) as u64
                        ),
                )
            })
    };
    let (_, mut issuer, _) = parse(leaf)?;
    let others: Vec<_> = others.iter().filter_map(parse).collect();
    let mut earliest: Option<SystemTime> = None;
    let mut used = vec![false; others.len()];
    loop {
        let Some(i) = (0..others.len()).find(|&i| !used[i] && others[i].0 == issuer) else {
            return earliest;
        };
        used[i] = true;
        let (subject, parent, not_after) = &others[i];
        earliest = Some(earliest.map_or(*not_after, |e| e.min(*not_after)));
        if subject == parent {
            return earliest;
        }
        issuer = parent.clone();
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.identity.verify_peer(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err((reason, error)) => {
                self.count(reason);
                Err(error)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only a TLS 1.2 handshake gets here: mesh traffic is TLS 1.3 only.
        self.count("protocol_version");
        Err(rustls::Error::General("TLS 1.3 is required".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.identity
            .verifier
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.identity.verifier.load().supported_verify_schemes()
    }
}

/// The verified peer of an inbound connection, attached to Pingora's `SslDigest` extension.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The peer's SPIFFE ID; `None` when it sent no certificate (the connection is closed
    /// before any request is forwarded).
    pub spiffe_id: Option<SpiffeId>,
    /// The same peer with what every request on the connection needs, derived once.
    pub verified: Option<Arc<VerifiedPeer>>,
}

impl PeerIdentity {
    /// A connection whose client presented `spiffe_id` (verified), or none.
    pub fn new(spiffe_id: Option<SpiffeId>) -> Self {
        Self {
            verified: spiffe_id.clone().map(|id| Arc::new(VerifiedPeer::new(id))),
            spiffe_id,
        }
    }
}

/// A verified mTLS peer of one inbound connection, with the strings and handles its requests
/// use computed once per connection instead of once per request.
#[derive(Debug)]
pub struct VerifiedPeer {
    /// The SPIFFE ID from the client certificate.
    pub spiffe_id: SpiffeId,
    /// Istio principal `td/ns/<ns>/sa/<sa>`.
    pub principal: String,
    /// `spiffe://…`.
    pub uri: String,
    /// The XFCC value the inbound listener sets (it names this sidecar's identity too, so it
    /// is filled on the first request).
    pub xfcc: OnceLock<String>,
    /// The inbound request series of this peer (filled on the first request).
    pub series: OnceLock<Arc<crate::telemetry::metrics::TrafficSeries>>,
}

impl VerifiedPeer {
    /// The peer `spiffe_id`.
    pub fn new(spiffe_id: SpiffeId) -> Self {
        Self {
            principal: spiffe_id.principal(),
            uri: spiffe_id.uri(),
            spiffe_id,
            xfcc: OnceLock::new(),
            series: OnceLock::new(),
        }
    }
}

/// Pingora handshake callbacks for the inbound listener.
pub struct HandshakeCallbacks {
    identity: Arc<IdentityState>,
}

impl HandshakeCallbacks {
    /// Callbacks over `identity` (counting into its metrics).
    pub fn new(identity: Arc<IdentityState>) -> Self {
        Self { identity }
    }

    fn refuse(&self, reason: &str) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.identity
            .metrics
            .tls_handshake_errors
            .with_label_values(&["inbound", reason])
            .inc();
        Some(Arc::new(PeerIdentity::new(None)))
    }
}

#[async_trait::async_trait]
impl TlsAccept for HandshakeCallbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        // A TLS 1.2 client that sent no certificate completes the handshake (a 1.2 client with
        // one fails in the verifier): refuse it here, before any request is read.
        if tls.version() != Some("TLSv1.3") && tls.version() != Some("TLSv1_3") {
            return self.refuse("protocol_version");
        }
        let Some((leaf, intermediates)) = tls.peer_cert_chain_der().and_then(|c| c.split_first())
        else {
            return self.refuse("no_client_certificate");
        };
        // A resumed session (TLS 1.3 tickets, on by default in Pingora's rustls config) restores
        // the peer's chain without running the verifier: verify again, now, against the current
        // bundle, so an expired or no-longer-trusted identity cannot live on through tickets.
        // For a full handshake this repeats a check that just passed.
        match self
            .identity
            .verify_peer(leaf, intermediates, UnixTime::now())
        {
            Ok(id) => {
                let metrics = &self.identity.metrics;
                metrics.tls_handshakes.with_label_values(&["inbound"]).inc();
                metrics.connections.with_label_values(&["inbound"]).inc();
                Some(Arc::new(PeerIdentity::new(Some(id))))
            }
            Err((reason, _)) => self.refuse(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    fn cert(
        name: &str,
        ca: bool,
        days: i64,
        parent: Option<(&rcgen::Certificate, &KeyPair)>,
    ) -> (rcgen::Certificate, KeyPair, SystemTime) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let not_after = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(params.not_after.unix_timestamp() as u64);
        let c = match parent {
            Some((p, pk)) => params.signed_by(&key, p, pk).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (c, key, not_after)
    }

    #[test]
    fn ca_chain_end_is_the_earliest_not_after_above_the_leaf() {
        let (root, root_key, root_end) = cert("root", true, 10, None);
        let (int, int_key, _) = cert("intermediate", true, 100, Some((&root, &root_key)));
        let (leaf, _, _) = cert("leaf", false, 1, Some((&int, &int_key)));
        let (other_root, _, _) = cert("unrelated root", true, 2, None);
        let end = ca_chain_not_after(
            leaf.der(),
            &[
                int.der().clone(),
                other_root.der().clone(),
                root.der().clone(),
            ],
        );
        assert_eq!(end, Some(root_end), "the root above, not the unrelated one");
        // Nothing above the leaf known: no CA end.
        assert_eq!(
            ca_chain_not_after(leaf.der(), &[other_root.der().clone()]),
            None
        );
    }
}
