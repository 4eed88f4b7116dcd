//! The certificates `meshflow check` judges — the injection webhook's (fetched with a TLS
//! handshake, verified with the webhook configuration's `caBundle` by rustls' WebPKI verifier)
//! and the mesh CA's (from its Secret) — parsed with x509-parser.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::report::Outcome;

/// A webhook certificate expiring within this long is a warning.
pub const WEBHOOK_WARN_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// A mesh CA expiring within this long is a warning.
pub const CA_WARN_WITHIN: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a certificate says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Its subject, as x509-parser prints it (`CN=…`).
    pub subject: String,
    /// NotBefore, Unix seconds.
    pub not_before: i64,
    /// NotAfter, Unix seconds.
    pub not_after: i64,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
}

/// Every certificate in a PEM text, DER, in order.
///
/// # Errors
/// The text is not PEM, or holds no certificate.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &*pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certs)
}

/// Reads one DER certificate.
///
/// # Errors
/// It does not parse as X.509.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
    })
}

/// `secs` (Unix) as `2025-01-31 12:00:00 UTC`.
pub fn utc(secs: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("{secs} (Unix seconds)"))
}

/// A duration in the largest whole unit: `3 days`, `5 h`, `12 min`, `40 s`.
pub fn human(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 7_200 => format!("{} h", s / 3_600),
        s if s >= 120 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// How a certificate's validity period stands at `now` (Unix seconds), with a warning when
/// fewer than `warn_within` remain: (outcome, what to say).
pub fn judge_validity(info: &CertInfo, now: i64, warn_within: Duration) -> (Outcome, String) {
    if now >= info.not_after {
        let ago = human(now.saturating_sub(info.not_after).unsigned_abs());
        return (
            Outcome::Error,
            format!("expired at {} ({ago} ago)", utc(info.not_after)),
        );
    }
    if now < info.not_before {
        return (
            Outcome::Error,
            format!(
                "not valid before {} (check this machine's clock and the issuer's)",
                utc(info.not_before)
            ),
        );
    }
    let left = info.not_after.saturating_sub(now).unsigned_abs();
    let text = format!("expires at {} (in {})", utc(info.not_after), human(left));
    if Duration::from_secs(left) < warn_within {
        (Outcome::Warning, text)
    } else {
        (Outcome::Success, text)
    }
}

/// The verdict on a webhook's certificate chain (as it presented it, leaf first) against the
/// `caBundle` of its configuration, for the host the API server dials, at `now` (Unix
/// seconds): whether the bundle verifies the chain and the chain is for that host (judged at a
/// time inside the leaf's validity, so a trust problem and an expiry are told apart), then the
/// leaf's validity (a warning within [`WEBHOOK_WARN_WITHIN`]).
pub fn judge_webhook_chain(
    chain: &[CertificateDer<'static>],
    ca_bundle_pem: &[u8],
    host: &str,
    now: i64,
) -> (Outcome, String) {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return (Outcome::Error, "it presented no certificate".into());
    };
    let info = match cert_info(leaf) {
        Ok(info) => info,
        Err(e) => return (Outcome::Error, format!("its certificate: {e}")),
    };
    let roots = match pem_certs(ca_bundle_pem) {
        Ok(roots) => roots,
        Err(e) => return (Outcome::Error, format!("its caBundle: {e}")),
    };
    let mut store = RootCertStore::empty();
    let (_, unusable) = store.add_parsable_certificates(roots);
    if store.is_empty() {
        return (
            Outcome::Error,
            format!("its caBundle holds no usable certificate ({unusable} unreadable)"),
        );
    }
    let Ok(name) = server_name(host) else {
        return (Outcome::Error, format!("{host:?} is not a host name"));
    };
    let verifier =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider()).build() {
            Ok(v) => v,
            Err(e) => return (Outcome::Error, format!("its caBundle: {e}")),
        };
    if info.not_after <= info.not_before {
        return (
            Outcome::Error,
            format!(
                "its certificate ({}) has an empty validity period (not before {}, not after {})",
                info.subject,
                utc(info.not_before),
                utc(info.not_after)
            ),
        );
    }
    // A time inside the validity period (so expiry is judged apart from trust).
    let at = now.clamp(info.not_before, info.not_after - 1);
    let at = UnixTime::since_unix_epoch(Duration::from_secs(at.max(0).unsigned_abs()));
    if let Err(e) = verifier.verify_server_cert(leaf, intermediates, &name, &[], at) {
        let why = match e {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => "the caBundle does not verify it (issued by a CA that is not in the caBundle)"
                .to_string(),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!("it is not valid for {host} (the name the API server dials)"),
            other => format!("the caBundle does not verify it: {other}"),
        };
        return (
            Outcome::Error,
            format!("its certificate ({}): {why}", info.subject),
        );
    }
    let (outcome, validity) = judge_validity(&info, now, WEBHOOK_WARN_WITHIN);
    let text = match outcome {
        Outcome::Error => format!("its certificate ({}) {validity}", info.subject),
        _ => format!("the caBundle verifies its certificate, which {validity}"),
    };
    (outcome, text)
}

/// The verdict on the mesh CA's certificate: a CA, valid now, a warning within
/// [`CA_WARN_WITHIN`] of its expiry.
pub fn judge_ca(info: &CertInfo, now: i64) -> (Outcome, String) {
    if !info.is_ca {
        return (
            Outcome::Error,
            format!(
                "{} is not a CA certificate (no basicConstraints CA:TRUE)",
                info.subject
            ),
        );
    }
    let (outcome, validity) = judge_validity(info, now, CA_WARN_WITHIN);
    (outcome, format!("{} {validity}", info.subject))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| e.to_string())
}

/// Accepts any certificate so that an expired or untrusted one can be looked at (nothing is
/// sent over such a connection: it is closed after the handshake); signatures are still
/// checked, so the server holds the key of what it presented.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The host and port of an `https://` URL (port 443 when it names none).
///
/// # Errors
/// Not an `https://` URL with a host.
pub fn https_host_port(url: &str) -> Result<(String, u16), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if parsed.scheme() != "https" {
        return Err(format!("{url:?} is not an https:// URL"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url:?} names no host"))?
        .to_string();
    Ok((host, parsed.port().unwrap_or(443)))
}

/// Connects to `host:port`, completes a TLS handshake as the API server would (SNI for a host
/// name, ALPN `http/1.1`) and returns the chain the server presented, leaf first; within
/// `timeout` in all.
///
/// # Errors
/// Connection refused or timed out, or a failed handshake — each naming `host:port`.
pub async fn presented_chain(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let address = if host.contains(':') {
        format!(
            "[{}]:{port}",
            host.trim_start_matches('[').trim_end_matches(']')
        )
    } else {
        format!("{host}:{port}")
    };
    let name = server_name(host)?;
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {address} failed: {e}"))?;
        let chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Ok::<_, String>(chain)
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no TLS handshake with {address} within {timeout:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    const DAY: i64 = 86_400;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    /// A CA and a leaf for 127.0.0.1 valid from `from` to `until` (Unix seconds).
    fn ca_and_leaf(from: i64, until: i64) -> (String, Vec<CertificateDer<'static>>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.not_before = time::OffsetDateTime::from_unix_timestamp(now() - 10 * DAY).unwrap();
        ca_params.not_after = time::OffsetDateTime::from_unix_timestamp(now() + 100 * DAY).unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        let leaf = params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        (ca.pem(), vec![leaf.der().clone()])
    }

    #[test]
    fn a_valid_webhook_certificate_passes_and_one_close_to_expiry_warns() {
        let (bundle, chain) = ca_and_leaf(now() - DAY, now() + 60 * DAY);
        let (outcome, text) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Success, "{text}");
        assert!(
            text.contains("in 59 days") || text.contains("in 60 days"),
            "{text}"
        );
        let (bundle, chain) = ca_and_leaf(now() - DAY, now() + 3 * DAY);
        let (outcome, text) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Warning, "{text}");
    }

    #[test]
    fn an_expired_webhook_certificate_fails_naming_the_expiry() {
        let (bundle, chain) = ca_and_leaf(now() - 10 * DAY, now() - 2 * DAY);
        let (outcome, text) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
        assert!(
            text.contains("expired at") && text.contains("2 days ago"),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_with_an_empty_validity_period_fails_without_a_panic() {
        let at = now() - DAY;
        let (bundle, chain) = ca_and_leaf(at, at);
        let (outcome, text) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("empty validity period"), "{text}");
        let (bundle, chain) = ca_and_leaf(at, at - DAY);
        let (outcome, _) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
    }

    #[test]
    fn another_cas_bundle_or_another_host_fails() {
        let (_, chain) = ca_and_leaf(now() - DAY, now() + 60 * DAY);
        let (other_bundle, _) = ca_and_leaf(now() - DAY, now() + 60 * DAY);
        let (outcome, text) =
            judge_webhook_chain(&chain, other_bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("does not verify"), "{text}");
        let (bundle, chain) = ca_and_leaf(now() - DAY, now() + 60 * DAY);
        let (outcome, text) = judge_webhook_chain(&chain, bundle.as_bytes(), "127.0.0.2", now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("not valid for 127.0.0.2"), "{text}");
        let (outcome, text) = judge_webhook_chain(&chain, b"", "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("caBundle"), "{text}");
        let (outcome, _) = judge_webhook_chain(&[], bundle.as_bytes(), "127.0.0.1", now());
        assert_eq!(outcome, Outcome::Error);
    }

    #[test]
    fn the_ca_must_be_a_ca_valid_now_and_warns_within_30_days() {
        let info = |is_ca, until| CertInfo {
            subject: "CN=mesh".into(),
            not_before: now() - DAY,
            not_after: until,
            is_ca,
        };
        assert_eq!(
            judge_ca(&info(true, now() + 365 * DAY), now()).0,
            Outcome::Success
        );
        assert_eq!(
            judge_ca(&info(true, now() + 20 * DAY), now()).0,
            Outcome::Warning
        );
        let (outcome, text) = judge_ca(&info(true, now() - 1), now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("expired"), "{text}");
        let (outcome, text) = judge_ca(&info(false, now() + 365 * DAY), now());
        assert_eq!(outcome, Outcome::Error);
        assert!(text.contains("not a CA"), "{text}");
        let mut future = info(true, now() + 365 * DAY);
        future.not_before = now() + DAY;
        assert_eq!(judge_ca(&future, now()).0, Outcome::Error);
    }

    #[test]
    fn parses_pem_and_reads_the_ca_flag() {
        let (bundle, chain) = ca_and_leaf(now() - DAY, now() + DAY);
        let roots = pem_certs(bundle.as_bytes()).unwrap();
        assert!(cert_info(&roots[0]).unwrap().is_ca);
        assert!(!cert_info(&chain[0]).unwrap().is_ca);
        assert!(pem_certs(b"nothing").is_err());
        assert!(cert_info(b"junk").is_err());
    }

    #[test]
    fn formats_times_and_durations() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(human(40), "40 s");
        assert_eq!(human(600), "10 min");
        assert_eq!(human(5 * 3600), "5 h");
        assert_eq!(human(3 * 86_400), "3 days");
        assert_eq!(
            https_host_port("https://127.0.0.1:8443/inject").unwrap(),
            ("127.0.0.1".to_string(), 8443)
        );
        assert_eq!(https_host_port("https://x.svc/inject").unwrap().1, 443);
        assert!(https_host_port("http://x/inject").is_err());
    }
}
