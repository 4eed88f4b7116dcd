//! Request-path normalization: one function, used for the authorization decision and for the
//! forwarded request, so the bytes authorized are the bytes forwarded.
//!
//! Spec: RFC 3986 §5.2.4 (remove_dot_segments) and §2.3 (unreserved characters). Beyond the RFC
//! (to close the parser-differential bypasses Istio's users hit): merged slashes; `%2F`, `%5C`
//! and a raw `\` are refused (a backend could read them as separators); path parameters are
//! refused (below); fragments are refused (they never belong in a request target, RFC 9112
//! §3.2).
//!
//! **Path parameters (`;`) are refused, not stripped.** RFC 3986 §3.3 lets a segment carry
//! parameters after `;`, and servlet containers (Tomcat, Jetty, hence most Java backends) drop
//! them before routing: `/admin;x=1` and `/internal;x=1/keys` are served as `/admin` and
//! `/internal/keys`, while a policy compares the whole segment, so a DENY on `/admin` would not
//! match. Any `;` in the path — raw or percent-encoded (`%3B`, `%3b`; some frameworks decode
//! before they strip), in any segment, with or without a value (`/admin;`) — answers 400 before
//! any policy is consulted. Stripping parameters for the match and forwarding the stripped path
//! would also close the bypass, but it silently changes requests, and which bytes a backend
//! treats as a parameter (`;` after decoding? `;` in the last segment only? `..;`?) differs per
//! framework; refusing leaves nothing to guess. A `;` in the query is not a path parameter and
//! is untouched. The cost: an app that relies on matrix parameters or `;jsessionid=` URL
//! rewriting cannot be reached through the mesh (use the query or a cookie).

/// Why a path is refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (must start with `/`).
    #[error("path must start with '/'")]
    NotAbsolute,
    /// `#` in a request target.
    #[error("fragment in request target")]
    Fragment,
    /// `%2F` / `%5C` / `\`: an encoded or alternative separator.
    #[error("encoded or backslash path separator")]
    EncodedSeparator,
    /// A malformed percent-escape.
    #[error("malformed percent-encoding")]
    BadEscape,
    /// A path parameter: `;` (raw, `%3B` or `%3b`) in a segment (RFC 3986 §3.3). Refused
    /// because backends that strip parameters would serve another path than the one judged.
    #[error("path parameter (';') in a path segment")]
    PathParameter,
    /// A control character or space.
    #[error("invalid character in path")]
    InvalidCharacter,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes the path part of a request target (no query: split it off first).
///
/// # Errors
/// [`PathError`] for anything that must be answered with 400.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    if path.contains('#') {
        return Err(PathError::Fragment);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Percent-decoding of unreserved characters; other escapes kept (upper-case hex).
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let value = h * 16 + l;
                if value == b'/' || value == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if value == b';' {
                    return Err(PathError::PathParameter);
                }
                if is_unreserved(value) {
                    decoded.push(value as char);
                } else {
                    decoded.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::PathParameter),
            b if b <= 0x20 || b == 0x7f => return Err(PathError::InvalidCharacter),
            _ => {
                // Multi-byte UTF-8 is passed through unchanged.
                let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
                decoded.push_str(&path[i..i + ch_len]);
                i += ch_len;
                continue;
            }
        }
    }
    // 2. Segments: merged slashes, RFC 3986 dot removal.
    let trailing_slash = decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    let last = segments.len();
    let mut ends_in_dir = trailing_slash;
    for (n, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if n + 1 == last {
                    ends_in_dir = true;
                }
            }
            ".." => {
                out.pop();
                if n + 1 == last {
                    ends_in_dir = true;
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for segment in &out {
        result.push('/');
        result.push_str(segment);
    }
    if result.is_empty() || (ends_in_dir && !out.is_empty()) {
        result.push('/');
    }
    Ok(result)
}

/// Normalizes a host for comparison: lower case, no port, no trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
            .to_string()
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_3986_and_merged_slashes() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("//admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/../..", "/"),
            ("/a/.", "/a/"),
            ("/%61dmin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a/b/..", "/a/"),
        ] {
            assert_eq!(normalize_path(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            normalize_path("/%2Fadmin"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(normalize_path("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a\\b"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/admin#x"), Err(PathError::Fragment));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("admin"), Err(PathError::NotAbsolute));
    }

    /// Issue 12, item 3: path parameters (RFC 3986 §3.3 `;`) in any segment, raw or
    /// percent-encoded, are refused: servlet containers serve `/admin;x=1` as `/admin`.
    #[test]
    fn path_parameters_are_refused_in_every_form() {
        for input in [
            "/admin;x=1",
            "/admin;",
            "/admin;/",
            "/;",
            "/;x=1/admin",
            "/internal;x=1/keys",
            "/internal/keys;x=1",
            "/a/b;c/d",
            "/a;b;c",
            "/admin%3Bx=1",
            "/admin%3bx=1",
            "/admin%3B",
            "/internal%3b/keys",
            "//admin;x=1",
            "/public/..;/admin",
            "/public/.;x/admin",
            "/public/%2e%2e;/admin",
            "/admin;jsessionid=ABC",
        ] {
            assert_eq!(
                normalize_path(input),
                Err(PathError::PathParameter),
                "{input}"
            );
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(normalize_host("Backend.Default:8080"), "backend.default");
        assert_eq!(normalize_host("backend.default."), "backend.default");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }

    proptest::proptest! {
        #[test]
        fn idempotent_and_free_of_dot_and_empty_segments(path in "/[a-zA-Z0-9./%;_~-]{0,40}") {
            if let Ok(once) = normalize_path(&path) {
                proptest::prop_assert_eq!(normalize_path(&once), Ok(once.clone()));
                proptest::prop_assert!(!once.contains(';') && !once.to_ascii_uppercase().contains("%3B"), "parameter in {}", once);
                let inner = once.trim_start_matches('/').trim_end_matches('/');
                if !inner.is_empty() {
                    for segment in inner.split('/') {
                        proptest::prop_assert!(!segment.is_empty(), "empty segment in {}", once);
                        proptest::prop_assert!(segment != "." && segment != "..", "dot segment in {}", once);
                    }
                }
            }
        }
    }
}
