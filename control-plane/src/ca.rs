//! The mesh certificate authority: issues X.509-SVIDs (SPIFFE) from CSRs.
//!
//! Spec: SPIFFE X.509-SVID (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>).
//! Every leaf carries exactly one URI SAN (the SPIFFE ID) and one DNS SAN derived from it
//! ([`SpiffeId::dns_name`]); the CA writes both itself and refuses a CSR that asks for anything
//! else. X.509 work is done by rcgen and x509-parser, never by hand.
//!
//! Expiry (RFC 5280 §4.1.2.5, §6.1.3: every certificate of a path must be valid at the time of
//! use): the CA's usable life ends at the earliest NotAfter of its chain — the issuing
//! certificate and every certificate above it that the control plane was given (further
//! certificates in `--ca-cert`, the roots in `--ca-bundle`). The CA refuses to load when that
//! moment has passed ([`CaError::Expired`]), never issues a certificate whose NotAfter is later
//! (leaves are capped), refuses to sign once it has passed, and reports how close it is
//! ([`CertificateAuthority::expiry_status`]).
//!
//! The CA also refuses to load material that would make every handshake fail: a key that is
//! not the certificate's, a certificate that may not issue certificates (RFC 5280 §4.2.1.9:
//! basicConstraints cA TRUE; §4.2.1.3: keyCertSign when keyUsage is present), and a chain
//! that is not valid yet (a NotBefore more than [`CA_NOT_BEFORE_SKEW`] ahead).
//!
//! Issued leaves are strict DER (X.690 §11.5: a DEFAULT value is never encoded): their
//! basicConstraints is critical with cA absent (an empty SEQUENCE, as Istio's and SPIRE's
//! SVIDs carry it), never an explicit `cA FALSE`, which strict parsers such as
//! pyca/cryptography refuse.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshflow_policies::SpiffeId;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::Digest;
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
    /// A certificate of the CA chain has expired: the CA cannot load, or can no longer sign.
    #[error("{what} expired at {} ({} ago); {hint}", rfc3339(*not_after), humantime::format_duration(round_secs(since(*not_after))))]
    Expired {
        /// Which certificate (file and subject).
        what: String,
        /// Its NotAfter.
        not_after: SystemTime,
        /// What to do about it.
        hint: String,
    },
    /// A certificate of the CA chain is not valid yet (NotBefore more than
    /// [`CA_NOT_BEFORE_SKEW`] ahead): nothing it issues would verify before then.
    #[error("{what} is not valid before {} (in {}); {hint}", rfc3339(*not_before), humantime::format_duration(round_secs(until(*not_before))))]
    NotYetValid {
        /// Which certificate (file and subject).
        what: String,
        /// Its NotBefore.
        not_before: SystemTime,
        /// What to do about it.
        hint: String,
    },
    /// rcgen failed to sign.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn since(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// How close the CA chain is to its NotAfter (see [`CertificateAuthority::expiry_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaExpiry {
    /// More than the warning window remains.
    Valid {
        /// Time left until the chain's NotAfter.
        remaining: Duration,
    },
    /// Less than the warning window remains: warn (leaves may already be capped).
    Soon {
        /// Time left until the chain's NotAfter.
        remaining: Duration,
    },
    /// The chain's NotAfter has passed: nothing can be issued.
    Expired,
}

/// The longest warning window: a CA is "expiring soon" at most this long before its NotAfter
/// (unless the leaf TTL is longer, see [`CertificateAuthority::warning_window`]).
pub const EXPIRY_WARNING_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf then intermediates, PEM.
    pub cert_chain_pem: String,
    /// NotBefore (issuance time minus the 60 s back-dating).
    pub not_before: SystemTime,
    /// NotAfter: issuance time plus the TTL, capped at the CA chain's NotAfter.
    pub not_after: SystemTime,
    /// The issuance time.
    pub issued_at: SystemTime,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
}

/// How far NotBefore is back-dated to tolerate clock skew between hosts.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);

/// How far ahead of this host's clock a CA certificate's NotBefore may be (the issuer's clock
/// may run ahead of ours); further ahead, the CA refuses to load ([`CaError::NotYetValid`]).
pub const CA_NOT_BEFORE_SKEW: Duration = Duration::from_secs(5 * 60);

/// The mesh CA: an issuer certificate + key, the chain above it and the trust bundle.
pub struct CertificateAuthority {
    issuer: Certificate,
    issuer_key: KeyPair,
    /// PEM of the issuer when it is an intermediate (appended to leaf chains), else empty.
    intermediates_pem: String,
    trust_bundle_pem: String,
    issuer_not_before: SystemTime,
    issuer_not_after: SystemTime,
    /// Earliest NotAfter of the issuer and the certificates above it (see the module docs).
    chain_not_after: SystemTime,
    leaf_ttl: Duration,
}

/// What the CA needs to know about one certificate of its chain.
struct ChainCert {
    subject: Vec<u8>,
    issuer: Vec<u8>,
    label: String,
    not_before: SystemTime,
    not_after: SystemTime,
    /// SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    /// The subjectPublicKey bits of `spki`.
    public_key: Vec<u8>,
    /// Why this certificate may not issue certificates, if it may not.
    not_a_ca: Option<String>,
}

/// Why `cert` may not sign certificates (RFC 5280 §4.2.1.9, §4.2.1.3), if it may not.
fn not_a_ca(cert: &x509_parser::certificate::X509Certificate) -> Option<String> {
    match cert.basic_constraints() {
        Err(e) => return Some(format!("its basicConstraints extension is invalid ({e})")),
        Ok(None) => {
            return Some(
                "it has no basicConstraints extension, so it is not a CA certificate (a CA \
                 needs basicConstraints CA:TRUE)"
                    .into(),
            )
        }
        Ok(Some(bc)) if !bc.value.ca => {
            return Some(
                "its basicConstraints say CA:FALSE: it is not a CA certificate, and verifiers \
                 refuse the certificates it signs"
                    .into(),
            )
        }
        Ok(Some(_)) => {}
    }
    match cert.key_usage() {
        Err(e) => Some(format!("its keyUsage extension is invalid ({e})")),
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Some(
            "its keyUsage does not include keyCertSign, so it may not sign certificates".into(),
        ),
        Ok(_) => None,
    }
}

fn unix_secs(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// Every certificate in `pem` (in order), labelled with `source` and its subject.
fn chain_certs(pem: &str, source: &str) -> Result<Vec<ChainCert>> {
    let bad = |message: String| CaError::BadMaterial {
        what: source.to_string(),
        message,
    };
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| bad(e.to_string()))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block.parse_x509().map_err(|e| bad(e.to_string()))?;
        out.push(ChainCert {
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            label: format!("CA certificate {source} ({})", cert.subject()),
            not_before: unix_secs(cert.validity().not_before.timestamp()),
            not_after: unix_secs(cert.validity().not_after.timestamp()),
            spki: cert.public_key().raw.to_vec(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            not_a_ca: not_a_ca(&cert),
        });
    }
    if out.is_empty() {
        return Err(bad("no certificate in PEM".into()));
    }
    Ok(out)
}

/// The issuer (`certs[0]`) and the certificates above it, found by subject among the other
/// certificates of its file and the trust bundle, up to a self-issued one.
fn issuer_path<'a>(issuer: &'a ChainCert, others: &'a [ChainCert]) -> Vec<&'a ChainCert> {
    let mut path = vec![issuer];
    let mut current = issuer;
    while current.subject != current.issuer {
        let Some(parent) = others
            .iter()
            .find(|c| c.subject == current.issuer && !path.iter().any(|p| std::ptr::eq(*p, *c)))
        else {
            break;
        };
        path.push(parent);
        current = parent;
    }
    path
}

/// Refuses an issuing certificate that may not sign certificates, or whose public key is not
/// `key`'s: every certificate signed with it would fail verification (BAD_SIGNATURE).
fn check_issuer(
    issuer: &ChainCert,
    cert_path: &Path,
    key_path: &Path,
    key: &KeyPair,
) -> Result<()> {
    if let Some(why) = &issuer.not_a_ca {
        return Err(CaError::BadMaterial {
            what: issuer.label.clone(),
            message: format!("cannot be the mesh CA: {why}"),
        });
    }
    // The SubjectPublicKeyInfo DER; failing that (an AlgorithmIdentifier encoded differently,
    // e.g. RSA parameters absent rather than NULL), the key bits themselves.
    if issuer.spki != key.public_key_der() && issuer.public_key != key.public_key_raw() {
        return Err(CaError::BadMaterial {
            what: format!("{} and {}", cert_path.display(), key_path.display()),
            message: format!(
                "the key does not match the certificate: its public key is not the \
                 certificate's SubjectPublicKeyInfo ({}), so nothing it signs would verify; \
                 give the certificate's own key",
                issuer.label
            ),
        });
    }
    Ok(())
}

/// The SubjectPublicKeyInfo (DER) of a CSR.
fn csr_spki(csr_pem: &str) -> Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// subjectKeyIdentifier (RFC 5280 §4.2.1.2): the first 20 bytes of SHA-256 of the
/// SubjectPublicKeyInfo, as rcgen derives it for CA certificates.
fn subject_key_identifier(spki: &[u8]) -> CustomExtension {
    let digest = sha2::Sha256::digest(spki);
    let mut value = vec![0x04, 20]; // OCTET STRING, 20 bytes
    value.extend_from_slice(&digest[..20]);
    CustomExtension::from_oid_content(&[2, 5, 29, 14], value)
}

/// basicConstraints for an end entity: critical, `cA` absent (DEFAULT FALSE, so DER omits it)
/// and no pathLenConstraint — an empty SEQUENCE.
fn end_entity_basic_constraints() -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
    ext.set_criticality(true);
    ext
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

impl CertificateAuthority {
    /// Loads the self-signed root from `dir` (`root.pem`, `root-key.pem`) or generates and
    /// persists one (key file mode 0600). Root lifetime: 10 years.
    ///
    /// # Errors
    /// [`CaError::Io`] / [`CaError::BadMaterial`] when existing files cannot be used;
    /// [`CaError::Expired`] when the stored root has expired (it is never replaced silently).
    pub fn load_or_generate(dir: &Path, trust_domain: &str, leaf_ttl: Duration) -> Result<Self> {
        let cert_path = dir.join("root.pem");
        let key_path = dir.join("root-key.pem");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                return Self::from_files(&cert_path, &key_path, None, leaf_ttl).map_err(
                    |e| match e {
                        CaError::Expired {
                            what, not_after, ..
                        } => CaError::Expired {
                            what,
                            not_after,
                            hint: format!(
                                "refusing to start: no certificate it issues would be valid; \
                                 remove {} to generate a new root, or give a CA with \
                                 --ca-cert/--ca-key",
                                dir.display()
                            ),
                        },
                        e => e,
                    },
                )
            }
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
    /// [`CaError::Io`]; [`CaError::BadMaterial`] for unparsable files, a key that is not the
    /// certificate's, or a certificate that may not issue certificates (no basicConstraints
    /// CA:TRUE, or a keyUsage without keyCertSign); [`CaError::Expired`] when the certificate,
    /// or one above it in `cert_path` or `bundle_path`, has expired; [`CaError::NotYetValid`]
    /// when one of them is not valid until more than [`CA_NOT_BEFORE_SKEW`] from now.
    pub fn from_files(
        cert_path: &Path,
        key_path: &Path,
        bundle_path: Option<&Path>,
        leaf_ttl: Duration,
    ) -> Result<Self> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(bad(key_path.display().to_string()))?;
        let mut certs = chain_certs(&cert_pem, &cert_path.display().to_string())?;
        check_issuer(&certs[0], cert_path, key_path, &key)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(bad(cert_path.display().to_string()))?;
        // rcgen signs with an issuer `Certificate`; re-creating it from the original params
        // and key keeps the subject DN and key identifier the leaves must chain to.
        let issuer = params
            .self_signed(&key)
            .map_err(bad(cert_path.display().to_string()))?;
        let (trust_bundle_pem, intermediates_pem) = match bundle_path {
            Some(bundle) => {
                let pem = fs::read_to_string(bundle).map_err(io_err(bundle))?;
                certs.extend(chain_certs(&pem, &bundle.display().to_string())?);
                (pem, cert_pem)
            }
            None => (cert_pem, String::new()),
        };
        let (issuer_cert, others) = certs.split_first().expect("chain_certs is never empty");
        let path = issuer_path(issuer_cert, others);
        let earliest = path
            .iter()
            .min_by_key(|c| c.not_after)
            .expect("the path holds the issuer");
        if earliest.not_after <= SystemTime::now() {
            return Err(CaError::Expired {
                what: earliest.label.clone(),
                not_after: earliest.not_after,
                hint: "refusing to start: no certificate it issues would be valid; give a valid \
                       CA (--ca-cert/--ca-key/--ca-bundle)"
                    .into(),
            });
        }
        let latest = path
            .iter()
            .max_by_key(|c| c.not_before)
            .expect("the path holds the issuer");
        if latest.not_before > SystemTime::now() + CA_NOT_BEFORE_SKEW {
            return Err(CaError::NotYetValid {
                what: latest.label.clone(),
                not_before: latest.not_before,
                hint: "refusing to start: no certificate it issues would verify before then; \
                       check this host's clock and the issuer's, or give a CA that is valid now"
                    .into(),
            });
        }
        Ok(Self {
            issuer,
            issuer_key: key,
            intermediates_pem,
            trust_bundle_pem,
            issuer_not_before: issuer_cert.not_before,
            issuer_not_after: issuer_cert.not_after,
            chain_not_after: earliest.not_after,
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

    /// The CA's usable end: the earliest NotAfter of the issuer and the certificates above it
    /// (further certificates in `--ca-cert`, the roots in `--ca-bundle`). No certificate this CA
    /// issues is valid later.
    pub fn not_after(&self) -> SystemTime {
        self.chain_not_after
    }

    /// How long before [`Self::not_after`] the CA counts as expiring soon: a fifth of the
    /// issuer's lifetime, at most [`EXPIRY_WARNING_MAX`] (30 days), but never less than the leaf
    /// TTL — inside that window leaves issued now are already cut short by the cap.
    pub fn warning_window(&self) -> Duration {
        let lifetime = self
            .issuer_not_after
            .duration_since(self.issuer_not_before)
            .unwrap_or_default();
        (lifetime / 5).min(EXPIRY_WARNING_MAX).max(self.leaf_ttl)
    }

    /// Where the CA stands at `now` relative to [`Self::not_after`] and
    /// [`Self::warning_window`].
    pub fn expiry_status(&self, now: SystemTime) -> CaExpiry {
        match self.chain_not_after.duration_since(now) {
            Ok(remaining) if !remaining.is_zero() => {
                if remaining < self.warning_window() {
                    CaExpiry::Soon { remaining }
                } else {
                    CaExpiry::Valid { remaining }
                }
            }
            _ => CaExpiry::Expired,
        }
    }

    /// NotAfter for a certificate issued at `now` that would live `ttl`: `min(now + ttl,`
    /// [`Self::not_after`]`)`. [`CaError::Expired`] when the CA chain has expired.
    fn capped_not_after(&self, now: SystemTime, ttl: Duration) -> Result<SystemTime> {
        if self.chain_not_after <= now {
            return Err(CaError::Expired {
                what: "the mesh CA".into(),
                not_after: self.chain_not_after,
                hint: "no certificate can be issued; restart the control plane with a new CA"
                    .into(),
            });
        }
        Ok((now + ttl).min(self.chain_not_after))
    }

    /// Leaf TTL, counted from issuance.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs `csr_pem` (PKCS#10) for `identity`, which the caller has already proven.
    ///
    /// The CSR's signature is verified; it may request no SANs, or exactly the identity's URI
    /// and/or DNS SAN. The issued certificate carries exactly one URI SAN and one DNS SAN,
    /// EKU serverAuth + clientAuth, NotBefore = now − 60 s, NotAfter = min(now + TTL,
    /// [`Self::not_after`]): a leaf never outlives its issuer.
    ///
    /// # Errors
    /// [`CaError::BadCsr`] for a malformed CSR or bad signature; [`CaError::UnprovenSan`] for a
    /// SAN that is not the caller's; [`CaError::Expired`] once the CA chain has expired.
    pub fn sign_csr(&self, csr_pem: &str, identity: &SpiffeId) -> Result<IssuedSvid> {
        self.sign_csr_at(csr_pem, identity, SystemTime::now())
    }

    fn sign_csr_at(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        now: SystemTime,
    ) -> Result<IssuedSvid> {
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
        let not_before = now - NOT_BEFORE_SKEW;
        let not_after = self.capped_not_after(now, self.leaf_ttl)?;
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
        // Not `IsCa::ExplicitNoCa`: rcgen encodes its `cA FALSE`, a DEFAULT value DER forbids.
        params.is_ca = IsCa::NoCa;
        params.custom_extensions = vec![
            subject_key_identifier(&csr_spki(csr_pem)?),
            end_entity_basic_constraints(),
        ];
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
    /// SANs plus `127.0.0.1`/`localhost`, valid for a year but never past [`Self::not_after`].
    /// Returns (chain PEM, key PEM).
    ///
    /// # Errors
    /// [`CaError::Sign`]; [`CaError::Expired`] once the CA chain has expired.
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
        params.not_after =
            to_offset(self.capped_not_after(now, Duration::from_secs(365 * 24 * 3600))?);
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

    /// A TLS server certificate for the injection webhook: the API server verifies it against
    /// the webhook configuration's `caBundle` (this CA's trust bundle) by host name — the
    /// Service's `<name>.<namespace>.svc`, or an IP address for a `url` webhook. `hosts` that
    /// parse as IP addresses become IP SANs, the rest DNS SANs. EKU serverAuth only; valid for
    /// `ttl` (capped at [`Self::not_after`]). Returns (chain PEM, key PEM, NotAfter).
    ///
    /// # Errors
    /// An expired CA, or a host that is not a valid DNS name.
    pub fn issue_webhook_cert(
        &self,
        hosts: &[String],
        ttl: Duration,
    ) -> Result<(String, String, SystemTime)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "meshflow injector");
        for host in hosts {
            params.subject_alt_names.push(match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into()?),
            });
        }
        let now = SystemTime::now();
        let not_after = self.capped_not_after(now, ttl)?;
        params.not_before = to_offset(now - NOT_BEFORE_SKEW);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer, &self.issuer_key)?;
        let mut chain = cert.pem();
        chain.push_str(&self.intermediates_pem);
        Ok((chain, key.serialize_pem(), not_after))
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

    /// A CA certificate valid from `not_before` to `not_after` (relative to now), signed by
    /// `parent` or self-signed; returns the certificate and its key.
    fn ca_cert(
        name: &str,
        not_before: time::Duration,
        not_after: time::Duration,
        parent: Option<(&Certificate, &KeyPair)>,
    ) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + not_before;
        params.not_after = now + not_after;
        let cert = match parent {
            Some((cert, parent_key)) => params.signed_by(&key, cert, parent_key).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert, key)
    }

    fn write_ca(
        dir: &Path,
        cert: &Certificate,
        key: &KeyPair,
        bundle: Option<&Certificate>,
        ttl: Duration,
    ) -> Result<CertificateAuthority> {
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
        if let Some(bundle) = bundle {
            std::fs::write(dir.join("bundle.pem"), bundle.pem()).unwrap();
        }
        CertificateAuthority::from_files(
            &dir.join("ca.pem"),
            &dir.join("ca-key.pem"),
            bundle.map(|_| dir.join("bundle.pem")).as_deref(),
            ttl,
        )
    }

    fn leaf_not_after(issued: &IssuedSvid) -> i64 {
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_chain_pem.as_bytes()).unwrap();
        pem.parse_x509().unwrap().validity().not_after.timestamp()
    }

    fn secs(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn leaves_never_outlive_their_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let (root, key) = ca_cert(
            "short root",
            time::Duration::days(-30),
            time::Duration::minutes(10),
            None,
        );
        let day = Duration::from_secs(24 * 3600);
        let ca = write_ca(dir.path(), &root, &key, None, day).unwrap();
        let root_not_after = x509_parser::pem::parse_x509_pem(root.pem().as_bytes())
            .unwrap()
            .1
            .parse_x509()
            .unwrap()
            .validity()
            .not_after
            .timestamp();
        assert_eq!(secs(ca.not_after()), root_not_after);
        let issued = ca.sign_csr(&csr(vec![]), &id("frontend")).unwrap();
        assert_eq!(
            leaf_not_after(&issued),
            root_not_after,
            "capped at the CA's NotAfter"
        );
        assert_eq!(secs(issued.not_after), root_not_after, "reported as issued");
        let (server_chain, _) = ca.issue_server_cert(&id("control-plane")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(server_chain.as_bytes()).unwrap();
        assert_eq!(
            pem.parse_x509().unwrap().validity().not_after.timestamp(),
            root_not_after,
            "the control plane's own certificate is capped too"
        );
        // 10 minutes left of a 30-day CA, 24 h leaves: inside the warning window.
        assert!(matches!(
            ca.expiry_status(SystemTime::now()),
            CaExpiry::Soon { remaining } if remaining <= Duration::from_secs(600)
        ));
        // Once the chain has expired nothing is signed.
        let later = ca.not_after() + Duration::from_secs(1);
        assert!(matches!(
            ca.sign_csr_at(&csr(vec![]), &id("frontend"), later),
            Err(CaError::Expired { .. })
        ));
        assert_eq!(ca.expiry_status(later), CaExpiry::Expired);
    }

    #[test]
    fn a_root_above_an_intermediate_caps_leaves_too() {
        let dir = tempfile::tempdir().unwrap();
        let (root, root_key) = ca_cert(
            "root",
            time::Duration::days(-365),
            time::Duration::minutes(10),
            None,
        );
        let (int, int_key) = ca_cert(
            "intermediate",
            time::Duration::days(-1),
            time::Duration::days(365),
            Some((&root, &root_key)),
        );
        let ca = write_ca(
            dir.path(),
            &int,
            &int_key,
            Some(&root),
            Duration::from_secs(3600),
        )
        .unwrap();
        let issued = ca.sign_csr(&csr(vec![]), &id("frontend")).unwrap();
        assert_eq!(leaf_not_after(&issued), secs(ca.not_after()));
        assert!(ca.not_after() < ca.issuer_not_after());
        assert!(secs(ca.not_after()) <= secs(SystemTime::now()) + 600);
    }

    #[test]
    fn refuses_to_load_an_expired_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (root, key) = ca_cert(
            "expired root",
            time::Duration::days(-30),
            time::Duration::minutes(-1),
            None,
        );
        let err = write_ca(dir.path(), &root, &key, None, Duration::from_secs(3600))
            .err()
            .expect("an expired issuer is refused");
        assert!(matches!(err, CaError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at"), "{err}");
        assert!(err.to_string().contains("expired root"), "{err}");

        // A valid intermediate under an expired root in the bundle is refused too.
        let (int, int_key) = ca_cert(
            "intermediate",
            time::Duration::days(-1),
            time::Duration::days(365),
            Some((&root, &key)),
        );
        let err = write_ca(
            dir.path(),
            &int,
            &int_key,
            Some(&root),
            Duration::from_secs(3600),
        )
        .err()
        .expect("an expired root above the issuer is refused");
        assert!(err.to_string().contains("expired root"), "{err}");

        // And a stored (generated) root that expired is never replaced silently.
        let state = dir.path().join("state-ca");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("root.pem"), root.pem()).unwrap();
        std::fs::write(state.join("root-key.pem"), key.serialize_pem()).unwrap();
        let err = CertificateAuthority::load_or_generate(
            &state,
            "cluster.local",
            Duration::from_secs(3600),
        )
        .err()
        .expect("an expired stored root is refused");
        assert!(err.to_string().contains("remove"), "{err}");
        assert_eq!(
            std::fs::read_to_string(state.join("root.pem")).unwrap(),
            root.pem()
        );
    }

    #[test]
    fn warning_window_is_a_fifth_of_the_lifetime_capped_at_30_days_but_at_least_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        // A 10-year root: 30 days.
        let ca = CertificateAuthority::load_or_generate(dir.path(), "cluster.local", hour).unwrap();
        assert_eq!(ca.warning_window(), EXPIRY_WARNING_MAX);
        assert!(matches!(
            ca.expiry_status(SystemTime::now()),
            CaExpiry::Valid { .. }
        ));
        assert!(matches!(
            ca.expiry_status(ca.not_after() - Duration::from_secs(29 * 24 * 3600)),
            CaExpiry::Soon { .. }
        ));
        // A 10-day CA: 2 days; with 3-day leaves: 3 days.
        let (root, key) = ca_cert(
            "ten days",
            time::Duration::days(-1),
            time::Duration::days(9),
            None,
        );
        let ca = write_ca(dir.path(), &root, &key, None, hour).unwrap();
        assert_eq!(ca.warning_window(), Duration::from_secs(2 * 24 * 3600));
        let ca = write_ca(dir.path(), &root, &key, None, 72 * hour).unwrap();
        assert_eq!(ca.warning_window(), 72 * hour);
    }

    /// Writes `cert` and `key` as `ca.pem`/`ca-key.pem` and loads them as the CA.
    fn load(dir: &Path, cert: &Certificate, key: &KeyPair) -> Result<CertificateAuthority> {
        write_ca(dir, cert, key, None, Duration::from_secs(3600))
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = ca_cert(
            "mismatched root",
            time::Duration::days(-1),
            time::Duration::days(365),
            None,
        );
        let other_key = KeyPair::generate().unwrap();
        let err = load(dir.path(), &root, &other_key)
            .err()
            .expect("a key that does not match the certificate is refused");
        assert!(matches!(err, CaError::BadMaterial { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("does not match"), "{text}");
        assert!(
            text.contains("ca.pem") && text.contains("ca-key.pem"),
            "names both files: {text}"
        );
        assert!(
            text.contains("mismatched root"),
            "names the certificate: {text}"
        );

        // An intermediate with its root's key (the classic mix-up) is refused too.
        let (root, root_key) = ca_cert(
            "root",
            time::Duration::days(-1),
            time::Duration::days(365),
            None,
        );
        let (int, _) = ca_cert(
            "intermediate",
            time::Duration::days(-1),
            time::Duration::days(365),
            Some((&root, &root_key)),
        );
        let err = write_ca(
            dir.path(),
            &int,
            &root_key,
            Some(&root),
            Duration::from_secs(3600),
        )
        .err()
        .expect("the root's key with the intermediate is refused");
        assert!(err.to_string().contains("does not match"), "{err}");

        // And a state directory whose root-key.pem is not root.pem's key.
        let state = dir.path().join("state-ca");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("root.pem"), root.pem()).unwrap();
        std::fs::write(state.join("root-key.pem"), other_key.serialize_pem()).unwrap();
        let err = CertificateAuthority::load_or_generate(
            &state,
            "cluster.local",
            Duration::from_secs(3600),
        )
        .err()
        .expect("a stored root with the wrong key is refused");
        assert!(
            err.to_string().contains("does not match") && err.to_string().contains("root-key.pem"),
            "{err}"
        );
    }

    /// A self-signed certificate with `is_ca` and `key_usages`, valid for a year from a day ago.
    fn self_signed(
        name: &str,
        is_ca: IsCa,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = is_ca;
        params.key_usages = key_usages;
        params.distinguished_name.push(DnType::CommonName, name);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn refuses_a_certificate_that_may_not_issue_certificates() {
        let dir = tempfile::tempdir().unwrap();
        for (name, is_ca, usages, why) in [
            ("explicit leaf", IsCa::ExplicitNoCa, vec![], "CA:FALSE"),
            ("no constraints", IsCa::NoCa, vec![], "no basicConstraints"),
            (
                "no keyCertSign",
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
                "keyCertSign",
            ),
        ] {
            let (cert, key) = self_signed(name, is_ca, usages);
            let err = load(dir.path(), &cert, &key)
                .err()
                .unwrap_or_else(|| panic!("{name}: refused as the CA"));
            assert!(matches!(err, CaError::BadMaterial { .. }), "{name}: {err}");
            let text = err.to_string();
            assert!(text.contains(why) && text.contains(name), "{name}: {text}");
        }

        // CA:TRUE without a keyUsage extension may sign (RFC 5280 §4.2.1.3 applies only when
        // keyUsage is present); so may CA:TRUE with pathLenConstraint 0 (it issues leaves).
        for (name, is_ca, usages) in [
            (
                "no key usage",
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![],
            ),
            (
                "path length 0",
                IsCa::Ca(BasicConstraints::Constrained(0)),
                vec![KeyUsagePurpose::KeyCertSign],
            ),
        ] {
            let (cert, key) = self_signed(name, is_ca, usages);
            let ca = load(dir.path(), &cert, &key).unwrap_or_else(|e| panic!("{name}: {e}"));
            ca.sign_csr(&csr(vec![]), &id("frontend")).unwrap();
        }
    }

    #[test]
    fn refuses_a_chain_that_is_not_valid_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (root, key) = ca_cert(
            "future root",
            time::Duration::days(1),
            time::Duration::days(365),
            None,
        );
        let err = load(dir.path(), &root, &key)
            .err()
            .expect("a CA valid only from tomorrow is refused");
        assert!(matches!(err, CaError::NotYetValid { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("future root") && text.contains("not valid before"),
            "{text}"
        );
        let tomorrow =
            humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(24 * 3600))
                .to_string();
        assert!(
            text.contains(&tomorrow[..10]),
            "says when it becomes valid ({tomorrow}): {text}"
        );
        assert!(
            text.contains("in 23h") || text.contains("in 1day"),
            "{text}"
        );

        // A root in the bundle that is not valid yet is refused too.
        let (int, int_key) = ca_cert(
            "intermediate",
            time::Duration::days(-1),
            time::Duration::days(30),
            Some((&root, &key)),
        );
        let err = write_ca(
            dir.path(),
            &int,
            &int_key,
            Some(&root),
            Duration::from_secs(3600),
        )
        .err()
        .expect("a future root above the issuer is refused");
        assert!(err.to_string().contains("future root"), "{err}");

        // A NotBefore a little ahead (the issuer's clock runs fast) is within the skew.
        let (root, key) = ca_cert(
            "slightly ahead",
            time::Duration::minutes(2),
            time::Duration::days(365),
            None,
        );
        load(dir.path(), &root, &key).expect("2 minutes ahead is tolerated");
    }

    /// Checks that `der` is DER the way a strict parser wants it (X.690 §10, §11): definite,
    /// minimal lengths, nothing after the value, BOOLEAN TRUE as 0xFF, and no BOOLEAN FALSE —
    /// every BOOLEAN of a leaf certificate (Extension.critical, BasicConstraints.cA) is DEFAULT
    /// FALSE, and DER never encodes a DEFAULT value. `path` names the position in errors.
    fn strict_der(mut der: &[u8], path: &str) -> std::result::Result<(), String> {
        while !der.is_empty() {
            let tag = der[0];
            if tag & 0x1f == 0x1f {
                return Err(format!("{path}: high tag number form"));
            }
            let (len, header) = match der.get(1) {
                None => return Err(format!("{path}: truncated")),
                Some(&l) if l < 0x80 => (l as usize, 2),
                Some(0x80) => return Err(format!("{path}: indefinite length")),
                Some(&l) => {
                    let n = (l & 0x7f) as usize;
                    let bytes = der
                        .get(2..2 + n)
                        .ok_or_else(|| format!("{path}: truncated length"))?;
                    if n > 4 || bytes[0] == 0 {
                        return Err(format!("{path}: non-minimal length"));
                    }
                    let len = bytes.iter().fold(0usize, |a, &b| a << 8 | b as usize);
                    if len < 0x80 {
                        return Err(format!("{path}: long form for a short length"));
                    }
                    (len, 2 + n)
                }
            };
            let value = der
                .get(header..header + len)
                .ok_or_else(|| format!("{path}: value runs past its parent"))?;
            match tag {
                0x01 => match value {
                    [0xff] => {}
                    [0x00] => {
                        return Err(format!(
                            "{path}: BOOLEAN FALSE encoded (a DEFAULT FALSE value)"
                        ))
                    }
                    other => return Err(format!("{path}: BOOLEAN {other:02x?} is not DER")),
                },
                t if t & 0x20 != 0 => strict_der(value, &format!("{path}/{t:02x}"))?,
                _ => {}
            }
            der = &der[header + len..];
        }
        Ok(())
    }

    /// [`strict_der`] over a certificate and the DER inside each of its extensions.
    fn strict_der_certificate(der: &[u8]) -> std::result::Result<(), String> {
        strict_der(der, "certificate")?;
        let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        assert!(rest.is_empty());
        for ext in cert.extensions() {
            strict_der(ext.value, &format!("extension {}", ext.oid))?;
        }
        Ok(())
    }

    fn first_cert_der(chain_pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    #[test]
    fn issued_certificates_are_strict_der_with_ca_absent_from_basic_constraints() {
        // The checker catches what rcgen's `IsCa::ExplicitNoCa` writes (`30 03 01 01 00`).
        let (explicit, _) = self_signed("explicit", IsCa::ExplicitNoCa, vec![]);
        let err = strict_der_certificate(explicit.der()).expect_err("explicit cA FALSE");
        assert!(
            err.contains("2.5.29.19") && err.contains("BOOLEAN FALSE"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let svid = first_cert_der(
            &ca.sign_csr(&csr(vec![]), &id("frontend"))
                .unwrap()
                .cert_chain_pem,
        );
        strict_der_certificate(&svid).expect("the SVID is strict DER");
        let (_, cert) = x509_parser::parse_x509_certificate(&svid).unwrap();
        // basicConstraints: critical, an empty SEQUENCE (cA absent = FALSE, no path length).
        let bc = cert
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS)
            .expect("the SVID carries basicConstraints");
        assert!(bc.critical);
        assert_eq!(bc.value, [0x30, 0x00]);
        let parsed = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!parsed.ca && parsed.path_len_constraint.is_none());
        // Each extension once; the subjectKeyIdentifier is still there, and is what rcgen
        // derives (SHA-256 of the SubjectPublicKeyInfo, 20 bytes).
        let mut oids: Vec<String> = cert
            .extensions()
            .iter()
            .map(|e| e.oid.to_id_string())
            .collect();
        oids.sort();
        let len = oids.len();
        oids.dedup();
        assert_eq!(oids.len(), len, "{oids:?}");
        let ski = cert
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .expect("the SVID carries a subjectKeyIdentifier");
        assert_eq!(
            ski.value[2..],
            sha2::Sha256::digest(cert.public_key().raw)[..20]
        );

        // The control plane's and the webhook's certificates too.
        let (server, _) = ca.issue_server_cert(&id("control-plane")).unwrap();
        strict_der_certificate(&first_cert_der(&server)).expect("server certificate");
        let (webhook, _, _) = ca
            .issue_webhook_cert(&["injector.mesh.svc".into()], Duration::from_secs(3600))
            .unwrap();
        strict_der_certificate(&first_cert_der(&webhook)).expect("webhook certificate");
    }
}
