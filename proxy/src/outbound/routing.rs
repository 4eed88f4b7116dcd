//! Pure outbound routing: request authority → mesh service.
//!
//! Accepted forms (RFC 3986 §3.2 authority; RFC 9112 §3.2.2 absolute-form target):
//! `<service>.<namespace>`, `<service>.<namespace>.svc`, `<service>.<namespace>.svc.<trust-domain-ish
//! cluster domain>` (e.g. `.svc.cluster.local`), a bare `<service>` (the caller's namespace),
//! each with an optional `:port` and trailing dot, compared case-insensitively.

/// A service the request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
}

/// Parses an authority (`Host` or `:authority` or the absolute-form host) into a service name.
/// `own_namespace` applies to a bare `<service>`. Returns `None` for anything else (IP
/// literals, other domains), which the outbound listener answers with 503.
pub fn parse_authority(authority: &str, own_namespace: &str) -> Option<ServiceName> {
    with_service(authority, own_namespace, |name, namespace| ServiceName {
        name: name.to_string(),
        namespace: namespace.to_string(),
    })
}

/// [`parse_authority`] without allocating (unless the authority has upper-case letters): calls
/// `found(name, namespace)` with borrowed strings.
pub fn with_service<R>(
    authority: &str,
    own_namespace: &str,
    found: impl FnOnce(&str, &str) -> R,
) -> Option<R> {
    let host = authority.trim();
    // Strip a port; IPv6 literals (`[...]`) are never mesh services.
    if host.starts_with('[') {
        return None;
    }
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    };
    if host.is_empty() {
        return None;
    }
    if host
        .split('.')
        .any(|l| l.is_empty() || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return None;
    }
    let mut labels = host.split('.');
    let name = labels.next()?;
    let (namespace, svc) = (labels.next(), labels.next());
    let namespace = match (namespace, svc) {
        (None, _) => own_namespace,
        (Some(namespace), None) => namespace,
        (Some(namespace), Some("svc")) => namespace,
        _ => return None,
    };
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(found(name, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(n: &str, ns: &str) -> Option<ServiceName> {
        Some(ServiceName {
            name: n.into(),
            namespace: ns.into(),
        })
    }

    #[test]
    fn accepted_forms() {
        for a in [
            "backend.default",
            "Backend.Default:8080",
            "backend.default.",
            "backend.default.svc",
            "backend.default.svc.cluster.local",
            "backend.default.svc.cluster.local.:80",
        ] {
            assert_eq!(
                parse_authority(a, "other"),
                svc("backend", "default"),
                "{a}"
            );
        }
        assert_eq!(parse_authority("backend", "prod"), svc("backend", "prod"));
    }

    #[test]
    fn rejected_forms() {
        for a in [
            "",
            "127.0.0.1:80",
            "[::1]:80",
            "a.b.c",
            "back end.default",
            "x.y:port",
            "a..b",
        ] {
            assert_eq!(parse_authority(a, "default"), None, "{a}");
        }
    }
}
