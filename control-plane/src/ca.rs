//! The mesh certificate authority: issues X.509-SVIDs (SPIFFE) from CSRs.
//!
//! Spec: SPIFFE X.509-SVID (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>).
//! Every leaf carries exactly one URI SAN (the SPIFFE ID) and one DNS SAN derived from it
//! ([`SpiffeId::dns_name`]); the CA writes both itself and refuses a CSR that asks for anything
//! else. X.509 work is done by rcgen and x509-parser, never by hand.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshflow_policies::SpiffeId;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// `Result` with [`CaError`].
pub type Result<T, E = CaError> = std::result::Result<T, E>;

/// Why the CA could not load, or refused to sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA certificate or key is malformed.
    #[error("CA material {what}: {message}")]
    BadMaterial {
        /// Which file or object.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The CSR is malformed or its signature does not verify.
    #[error("CSR rejected: {0}")]
    BadCsr(String),
    /// The CSR asks for a SAN the caller has not proven (another identity, extra names).
    #[error("CSR rejected: asks for {requested}, but the caller may only have {allowed}")]
    UnprovenSan {
        /// The SAN the CSR asked for.
        requested: String,
        /// The identity the caller proved.
        allowed: String,
    },
    /// rcgen failed to sign.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf then intermediates, PEM.
    pub cert_chain_pem: String,
    /// NotBefore (issuance time minus the 60 s back-dating).
    pub not_before: SystemTime,
    /// NotAfter (issuance time plus the TTL).
    pub not_after: SystemTime,
    /// The issuance time.
    pub issued_at: SystemTime,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
}

/// How far NotBefore is back-dated to tolerate clock skew between hosts.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);

/// The mesh CA: an issuer certificate + key, the chain above it and the trust bundle.
pub struct CertificateAuthority {
    issuer: Certificate,
    issuer_key: KeyPair,
    /// PEM of the issuer when it is an intermediate (appended to leaf chains), else empty.
    intermediates_pem: String,
    trust_bundle_pem: String,
    issuer_not_after: SystemTime,
    leaf_ttl: Duration,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CaError {
    let what = what.into();
    move |e| CaError::BadMaterial {
        what,
        message: e.to_string(),
    }
}

/// Writes `contents` to `path` with mode 0600 (created or truncated).
///
/// # Errors
/// [`CaError::Io`].
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Temp file + rename: a reader (a sidecar starting now) never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // `mode` applies only when the file is created; a leftover temp file keeps its old mode.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    rcgen::SerialNumber::from_slice(&bytes)
}

fn cert_not_after(pem: &str, what: &str) -> Result<SystemTime> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CaError::BadMaterial {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    let cert = pem.parse_x509().map_err(|e| CaError::BadMaterial {
        what: what.to_string(),
        message: e.to_string(),
    })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

impl CertificateAuthority {
    /// Loads the self-signed root from `dir` (`root.pem`, `root-key.pem`) or generates and
    /// persists one (key file mode 0600). Root lifetime: 10 years.
    ///
    /// # Errors
    /// [`CaError::Io`] / [`CaError::BadMaterial`] when existing files cannot be used.
    pub fn load_or_generate(dir: &Path, trust_domain: &str, leaf_ttl: Duration) -> Result<Self> {
        let cert_path = dir.join("root.pem");
        let key_path = dir.join("root-key.pem");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return Self::from_files(&cert_path, &key_path, None, leaf_ttl),
            (false, false) => {}
            _ => {
                // Never silently replace a root that workloads may still trust.
                return Err(CaError::BadMaterial {
                    what: dir.display().to_string(),
                    message: "holds only one of root.pem and root-key.pem; restore the other or remove both".into(),
                });
            }
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate().map_err(bad("root key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshflow");
        dn.push(
            DnType::CommonName,
            format!("meshflow root CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = to_offset(now - NOT_BEFORE_SKEW);
        params.not_after = to_offset(now + Duration::from_secs(10 * 365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(bad("root certificate"))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
        Self::from_files(&cert_path, &key_path, None, leaf_ttl)
    }

    /// Uses a user-supplied root or intermediate certificate and its key (PEM files).
    /// `bundle_path` holds the roots proxies trust; when absent the certificate itself is the
    /// trust bundle (a root). With an intermediate, leaf chains carry the intermediate.
    ///
    /// # Errors
    /// [`CaError::Io`] / [`CaError::BadMaterial`].
    pub fn from_files(
        cert_path: &Path,
        key_path: &Path,
        bundle_path: Option<&Path>,
        leaf_ttl: Duration,
    ) -> Result<Self> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(bad(key_path.display().to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(bad(cert_path.display().to_string()))?;
        // rcgen signs with an issuer `Certificate`; re-creating it from the original params
        // and key keeps the subject DN and key identifier the leaves must chain to.
        let issuer = params
            .self_signed(&key)
            .map_err(bad(cert_path.display().to_string()))?;
        let issuer_not_after = cert_not_after(&cert_pem, &cert_path.display().to_string())?;
        let (trust_bundle_pem, intermediates_pem) = match bundle_path {
            Some(bundle) => (
                fs::read_to_string(bundle).map_err(io_err(bundle))?,
                cert_pem,
            ),
            None => (cert_pem, String::new()),
        };
        Ok(Self {
            issuer,
            issuer_key: key,
            intermediates_pem,
            trust_bundle_pem,
            issuer_not_after,
            leaf_ttl,
        })
    }

    /// The roots proxies must trust, PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// NotAfter of the issuing certificate.
    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Leaf TTL, counted from issuance.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs `csr_pem` (PKCS#10) for `identity`, which the caller has already proven.
    ///
    /// The CSR's signature is verified; it may request no SANs, or exactly the identity's URI
    /// and/or DNS SAN. The issued certificate carries exactly one URI SAN and one DNS SAN,
    /// EKU serverAuth + clientAuth, NotBefore = now − 60 s, NotAfter = now + TTL.
    ///
    /// # Errors
    /// [`CaError::BadCsr`] for a malformed CSR or bad signature; [`CaError::UnprovenSan`] for a
    /// SAN that is not the caller's.
    pub fn sign_csr(&self, csr_pem: &str, identity: &SpiffeId) -> Result<IssuedSvid> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let uri = identity.uri();
        let dns = identity.dns_name();
        for san in &csr.params.subject_alt_names {
            let ok = match san {
                SanType::URI(u) => u.as_str() == uri,
                SanType::DnsName(d) => d.as_str() == dns,
                _ => false,
            };
            if !ok {
                return Err(CaError::UnprovenSan {
                    requested: format!("{san:?}"),
                    allowed: format!("URI {uri} / DNS {dns}"),
                });
            }
        }
        let now = SystemTime::now();
        let not_before = now - NOT_BEFORE_SKEW;
        let not_after = now + self.leaf_ttl;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshflow");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(
                uri.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
            ),
            SanType::DnsName(
                dns.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
            ),
        ];
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.as_ref()))
            .unwrap_or_default();
        csr.params = params;
        let cert = csr.signed_by(&self.issuer, &self.issuer_key)?;
        let mut chain = cert.pem();
        chain.push_str(&self.intermediates_pem);
        Ok(IssuedSvid {
            cert_chain_pem: chain,
            not_before,
            not_after,
            issued_at: now,
            serial_hex,
        })
    }

    /// Issues a certificate + key for the control plane's own gRPC server: the given identity's
    /// SANs plus `127.0.0.1`/`localhost`. Returns (chain PEM, key PEM).
    ///
    /// # Errors
    /// [`CaError::Sign`].
    pub fn issue_server_cert(&self, identity: &SpiffeId) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![identity.dns_name()])?;
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().as_str().try_into()?));
        let now = SystemTime::now();
        params.not_before = to_offset(now - NOT_BEFORE_SKEW);
        params.not_after = to_offset(now + Duration::from_secs(365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer, &self.issuer_key)?;
        let mut chain = cert.pem();
        chain.push_str(&self.intermediates_pem);
        Ok((chain, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn csr(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn issues_exactly_the_proven_sans_and_persists_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let issued = ca.sign_csr(&csr(vec![]), &id("frontend")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_chain_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            vec![
                "URI:spiffe://cluster.local/ns/default/sa/frontend",
                "DNS:frontend.default.serviceaccount.identity.cluster.local"
            ]
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);
        let mode = std::fs::metadata(dir.path().join("root-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let again = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(again.trust_bundle_pem(), ca.trust_bundle_pem());
    }

    #[test]
    fn user_supplied_intermediate_issues_chains_that_verify_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(DnType::CommonName, "user root");
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = root_params.self_signed(&root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = CertificateParams::default();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params
            .distinguished_name
            .push(DnType::CommonName, "user intermediate");
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let intermediate = int_params.signed_by(&int_key, &root, &root_key).unwrap();
        std::fs::write(dir.path().join("int.pem"), intermediate.pem()).unwrap();
        std::fs::write(dir.path().join("int-key.pem"), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();

        let ca = CertificateAuthority::from_files(
            &dir.path().join("int.pem"),
            &dir.path().join("int-key.pem"),
            Some(&dir.path().join("root.pem")),
            Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(ca.trust_bundle_pem(), root.pem());
        let issued = ca.sign_csr(&csr(vec![]), &id("frontend")).unwrap();
        let chain: Vec<_> =
            x509_parser::pem::Pem::iter_from_buffer(issued.cert_chain_pem.as_bytes())
                .map(|p| rustls::pki_types::CertificateDer::from(p.unwrap().contents))
                .collect();
        assert_eq!(chain.len(), 2, "leaf + intermediate");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
            .expect("leaf chains to the user's root through the intermediate");
    }

    #[test]
    fn refuses_other_identities_and_extra_sans() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let other = SanType::URI(
            "spiffe://cluster.local/ns/default/sa/payment"
                .try_into()
                .unwrap(),
        );
        assert!(matches!(
            ca.sign_csr(&csr(vec![other]), &id("frontend")),
            Err(CaError::UnprovenSan { .. })
        ));
        let own = SanType::URI(
            "spiffe://cluster.local/ns/default/sa/frontend"
                .try_into()
                .unwrap(),
        );
        let extra = SanType::DnsName("evil.example".try_into().unwrap());
        assert!(matches!(
            ca.sign_csr(&csr(vec![own, extra]), &id("frontend")),
            Err(CaError::UnprovenSan { .. })
        ));
        assert!(matches!(
            ca.sign_csr("garbage", &id("frontend")),
            Err(CaError::BadCsr(_))
        ));
    }
}
