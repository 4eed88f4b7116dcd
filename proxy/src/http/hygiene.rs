//! Pure HTTP hygiene shared by both listeners: hop-by-hop stripping, message-framing checks
//! and the XFCC header. No I/O; the Pingora adapters apply the results.
//!
//! Specs: RFC 9110 §7.6.1 (Connection and hop-by-hop fields), RFC 9112 §6.1–6.3 (message
//! body length, request smuggling), Envoy's `x-forwarded-client-cert` format.

use http::header::{HeaderMap, HeaderName, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};

/// The XFCC header the inbound sidecar sets from the verified peer only, and its value; both
/// defined with the mesh-owned header list in [`meshflow_policies::headers`].
pub use meshflow_policies::headers::{xfcc_value, XFCC};

/// Headers the proxy sets itself: always stripped from client input, never removable by a
/// `Connection` nomination. [`meshflow_api::SIDECAR_AUTH_HEADER`] is set only by the workflow
/// coordinator's sidecar, towards its own app.
pub const PROXY_SET_HEADERS: &[&str] = &[XFCC, meshflow_api::SIDECAR_AUTH_HEADER];

/// Hop-by-hop headers removed on every hop (RFC 9110 §7.6.1). `te` is handled separately:
/// `te: trailers` is end-to-end meaningful for gRPC and is kept.
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "upgrade"];

/// Headers a `Connection` nomination may never remove: message framing and routing are the
/// proxy's business, and removing them would desynchronise framing between hops.
const NEVER_NOMINATED: &[&str] = &["content-length", "transfer-encoding", "host", "te"];

/// The header names to remove before forwarding: the hop-by-hop set, `te` unless it is exactly
/// `trailers`, and every name nominated in `Connection` (except framing headers and the
/// headers the proxy sets).
pub fn hop_by_hop_to_remove(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut remove: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim().to_ascii_lowercase();
            if token.is_empty()
                || NEVER_NOMINATED.contains(&token.as_str())
                || PROXY_SET_HEADERS.contains(&token.as_str())
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                remove.push(name);
            }
        }
    }
    for name in HOP_BY_HOP {
        if headers.contains_key(*name) {
            remove.push(HeaderName::from_static(name));
        }
    }
    let te_is_trailers = headers.get_all("te").iter().all(|v| {
        v.to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("trailers"))
    });
    if headers.contains_key("te") && !te_is_trailers {
        remove.push(HeaderName::from_static("te"));
    }
    remove.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    remove.dedup();
    remove
}

/// Why a request's framing is refused (400, connection closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both Content-Length and Transfer-Encoding (RFC 9112 §6.1: a smuggling vector).
    #[error("request has both Content-Length and Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// Several Content-Length values that differ, or one that is not a number.
    #[error("request has an invalid or conflicting Content-Length")]
    BadContentLength,
    /// A transfer coding other than exactly `chunked`.
    #[error("request has an unsupported or non-final Transfer-Encoding")]
    BadTransferEncoding,
}

/// Checks request framing headers (HTTP/1.1; HTTP/2 carries no Transfer-Encoding).
///
/// # Errors
/// [`FramingError`] when the request must be refused with 400 and the connection closed.
pub fn check_request_framing(headers: &HeaderMap) -> Result<(), FramingError> {
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    let mut content_length: Option<&str> = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let Ok(value) = value.to_str() else {
            return Err(FramingError::BadContentLength);
        };
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FramingError::BadContentLength);
            }
            match content_length {
                Some(seen) if seen != part => return Err(FramingError::BadContentLength),
                _ => content_length = Some(part),
            }
        }
    }
    if has_te && content_length.is_some() {
        return Err(FramingError::ContentLengthWithTransferEncoding);
    }
    if has_te {
        let codings: Vec<String> = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| {
                v.to_str()
                    .unwrap_or("\u{0}")
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        let (last, rest) = codings
            .split_last()
            .ok_or(FramingError::BadTransferEncoding)?;
        // Only `chunked`: Pingora forwards a body as chunked alone, so a coding before it
        // (`gzip, chunked`) would reach the app as compressed bytes labelled plain. Refused
        // (RFC 9112 §6.1: a transfer coding the server does not implement).
        if last != "chunked" || !rest.is_empty() {
            return Err(FramingError::BadTransferEncoding);
        }
    }
    Ok(())
}

/// Size of a header section as HTTP/1.1 would carry it: name + value + 4 bytes (`: ` and CRLF)
/// per field, in bytes. Compared against the configured limit (431 above it, RFC 6585 §5).
pub fn header_section_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// The mesh-owned headers present in `headers` (see [`meshflow_policies::headers`]): what the
/// inbound listener removes from a request before authentication, authorization and the app
/// see it.
pub fn mesh_owned_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| meshflow_policies::headers::is_mesh_owned(name.as_str()))
        .cloned()
        .collect();
    names.dedup();
    names
}

/// Turns an empty request body chunk that ends the body into "end of body, no data".
///
/// An HTTP/2 body may end with an empty DATA frame carrying END_STREAM (RFC 9113 §6.1) — the
/// outbound sidecar sends exactly that after a chunked HTTP/1.1 request. Pingora 0.9 hands it
/// to an HTTP/1.1 upstream as `write_body(b"")` followed by `finish_body()`; in chunked mode
/// the first writes a zero-size chunk, which *is* the last-chunk `0\r\n\r\n` (RFC 9112
/// §7.1), and the second writes another one. The app then reads a second "request" on the
/// connection, and its answer goes to the next request sent on it. With `None` Pingora only
/// finishes the body: one last-chunk. Data chunks, and empty chunks that do not end the body
/// (Pingora skips those), are left alone.
pub fn drop_empty_final_chunk(body: &mut Option<bytes::Bytes>, end_of_stream: bool) {
    if end_of_stream && body.as_ref().is_some_and(|b| b.is_empty()) {
        *body = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn nominations_never_remove_proxy_headers_or_framing() {
        let h = map(&[
            (
                "connection",
                "close, X-Forwarded-Client-Cert, x-secret, content-length",
            ),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
        ]);
        let names: Vec<String> = hop_by_hop_to_remove(&h)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["close", "connection", "keep-alive", "x-secret"]);
    }

    #[test]
    fn mesh_owned_headers_are_found_in_any_case() {
        let h = map(&[
            ("X-Forwarded-Client-Cert", "forged"),
            ("x-spiffe-id", "spiffe://evil"),
            ("L5D-Client-Id", "admin"),
            ("x-mesh-role", "admin"),
            ("meshflow-timeout-ms", "5"),
            ("meshflow-run-id", "r1"),
            ("x-tenant", "a"),
        ]);
        let mut names: Vec<String> = mesh_owned_names(&h).iter().map(|n| n.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "l5d-client-id",
                "meshflow-timeout-ms",
                "x-forwarded-client-cert",
                "x-mesh-role",
                "x-spiffe-id"
            ]
        );
    }

    #[test]
    fn only_an_empty_final_chunk_is_dropped() {
        use bytes::Bytes;
        let mut body = Some(Bytes::new());
        drop_empty_final_chunk(&mut body, true);
        assert_eq!(body, None, "empty DATA + END_STREAM: end of body, no data");
        let mut body = Some(Bytes::new());
        drop_empty_final_chunk(&mut body, false);
        assert_eq!(body, Some(Bytes::new()), "not the end: Pingora skips it");
        let mut body = Some(Bytes::from_static(b"abc"));
        drop_empty_final_chunk(&mut body, true);
        assert_eq!(body, Some(Bytes::from_static(b"abc")), "data is kept");
        let mut body = None;
        drop_empty_final_chunk(&mut body, true);
        assert_eq!(body, None);
    }

    #[test]
    fn te_other_than_trailers_is_removed() {
        let h = map(&[("te", "gzip")]);
        assert_eq!(
            hop_by_hop_to_remove(&h),
            vec![HeaderName::from_static("te")]
        );
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            check_request_framing(&map(&[("content-length", "3")])),
            Ok(())
        );
        assert_eq!(
            check_request_framing(&map(&[("content-length", "3"), ("content-length", "3")])),
            Ok(())
        );
        assert_eq!(
            check_request_framing(&map(&[("transfer-encoding", "gzip, chunked")])),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            check_request_framing(&map(&[
                ("content-length", "3"),
                ("transfer-encoding", "chunked")
            ])),
            Err(FramingError::ContentLengthWithTransferEncoding)
        );
        assert_eq!(
            check_request_framing(&map(&[("content-length", "3"), ("content-length", "4")])),
            Err(FramingError::BadContentLength)
        );
        assert_eq!(
            check_request_framing(&map(&[("content-length", "3, 4")])),
            Err(FramingError::BadContentLength)
        );
        assert_eq!(
            check_request_framing(&map(&[("content-length", "-1")])),
            Err(FramingError::BadContentLength)
        );
        assert_eq!(
            check_request_framing(&map(&[("transfer-encoding", "chunked, gzip")])),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            check_request_framing(&map(&[("transfer-encoding", "identity")])),
            Err(FramingError::BadTransferEncoding)
        );
    }
}
