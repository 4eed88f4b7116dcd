//! SPIFFE identities as meshflow uses them.
//!
//! Spec: SPIFFE ID (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>) in the
//! Kubernetes shape `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, which is also
//! Istio's. Every X.509-SVID meshflow issues carries exactly one such URI SAN plus one DNS SAN
//! derived from it ([`SpiffeId::dns_name`]) so that Pingora's rustls connector, which verifies a
//! server only by DNS/IP SAN against SNI, can check the destination's identity natively.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a meshflow SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The URI does not start with `spiffe://`.
    #[error("not a SPIFFE ID (must start with spiffe://): {0:?}")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>: {0:?}")]
    Path(String),
    /// A trust domain, namespace or service account has characters outside `[a-z0-9.-]`
    /// (trust domain) or a Kubernetes DNS-1123 label.
    #[error("invalid {what} {value:?} in SPIFFE ID (lower-case letters, digits, '-' and '.')")]
    Component {
        /// Which part is wrong: "trust domain", "namespace" or "service account".
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

/// A workload identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

fn valid_label(s: &str, allow_dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (allow_dots && b == b'.')
        })
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    ///
    /// # Errors
    /// [`SpiffeIdError::Component`] when a part is empty or has characters outside a DNS label.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        for (what, value, dots) in [
            ("trust domain", trust_domain, true),
            ("namespace", namespace, false),
            ("service account", service_account, true),
        ] {
            if !valid_label(value, dots) {
                return Err(SpiffeIdError::Component {
                    what,
                    value: value.to_string(),
                });
            }
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, `spiffe://td/ns/x/sa/y`.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Istio's principal form, `td/ns/x/sa/y` (the URI without `spiffe://`), used by
    /// AuthorizationPolicy `principals`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// The DNS SAN meshflow derives from the identity (Linkerd's scheme):
    /// `<sa>.<ns>.serviceaccount.identity.<trust-domain>`. Outbound sidecars send it as SNI and
    /// verify the server certificate against it.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.serviceaccount.identity.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    /// Parses `spiffe://td/ns/x/sa/y`. No query, fragment, port, user info or extra segments.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(s.to_string()))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(SpiffeIdError::Path(s.to_string())),
        }
    }
}

/// The one SPIFFE ID among an X.509 certificate's URI SANs (DER input), or `None` when the
/// certificate is unparsable or has zero or several URI SANs (an X.509-SVID has exactly one,
/// SPIFFE X509-SVID §2), or the URI is not a meshflow SPIFFE ID.
pub fn from_certificate_der(der: &[u8]) -> Option<SpiffeId> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    first.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_derives_names() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/frontend"
            .parse()
            .unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/default/sa/frontend");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/frontend");
        assert_eq!(
            id.dns_name(),
            "frontend.default.serviceaccount.identity.cluster.local"
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://clu ster/ns/a/sa/b",
            "spiffe://cluster.local:80/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
    }
}
