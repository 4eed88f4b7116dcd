//! Request checks both listeners apply before anything else (framing, header size), as thin
//! Pingora glue over [`crate::http::hygiene`].

use bytes::Bytes;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::RequestHeader;
use pingora_proxy::{FailToProxy, Session};

use crate::http::hygiene::{
    check_request_framing, header_section_size, hop_by_hop_to_remove, mesh_owned_names,
    PROXY_SET_HEADERS,
};
use crate::shared::Shared;

/// Refuses a request with bad framing (400) or an oversized header section (431), closing the
/// connection. Returns `true` when a response was sent.
pub async fn refuse_bad_request(
    session: &mut Session,
    shared: &Shared,
    direction: &str,
) -> pingora_error::Result<bool> {
    let headers = &session.req_header().headers;
    // Pingora resolves Content-Length + Transfer-Encoding itself (TE wins, CL dropped) before
    // filters run; judge HTTP/1.1 framing on the header section as received.
    let framing = match session.as_ref() {
        pingora_core::protocols::http::ServerSession::H1(h1) => {
            match raw_framing_headers(&h1.get_headers_raw_bytes()) {
                Some(raw) => check_request_framing(&raw),
                // Fail closed: a head we cannot re-read is not forwarded.
                None => Err(crate::http::hygiene::FramingError::BadTransferEncoding),
            }
        }
        _ => check_request_framing(headers),
    };
    let refusal = if let Err(e) = framing {
        Some((400, "framing", e.to_string()))
    } else if header_section_size(headers) > shared.max_header_bytes {
        Some((
            431,
            "header_too_large",
            format!(
                "request header section larger than {} bytes",
                shared.max_header_bytes
            ),
        ))
    } else {
        None
    };
    let Some((status, reason, message)) = refusal else {
        return Ok(false);
    };
    shared
        .metrics
        .rejected_requests
        .with_label_values(&[direction, reason])
        .inc();
    shared
        .metrics
        .count_refused(direction, shared.workload_name(), &shared.namespace, status);
    tracing::debug!(direction, reason, "refused request: {message}");
    // The framing of the rest of the connection cannot be trusted: never reuse it.
    session.set_keepalive(None);
    session
        .respond_error_with_body(status, Bytes::from(format!("meshflow: {message}\n")))
        .await?;
    Ok(true)
}

/// The framing headers (Content-Length, Transfer-Encoding) of a raw HTTP/1.1 request head, as
/// received, parsed with httparse.
fn raw_framing_headers(raw: &[u8]) -> Option<http::HeaderMap> {
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut request = httparse::Request::new(&mut storage);
    let mut map = http::HeaderMap::new();
    if !matches!(request.parse(raw), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    for header in request.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        if name == "content-length" || name == "transfer-encoding" {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(header.value),
            ) {
                map.append(name, value);
            }
        }
    }
    Some(map)
}

/// Removes hop-by-hop headers, `Connection` nominations and every header the proxy sets
/// (any case, any count) from a request about to be forwarded.
pub fn scrub_forwarded_request(request: &mut RequestHeader) {
    for name in hop_by_hop_to_remove(&request.headers) {
        request.remove_header(&name);
    }
    for name in PROXY_SET_HEADERS {
        if request.headers.contains_key(*name) {
            while request.remove_header(*name).is_some() {}
        }
    }
    // Pingora drops `te` on the way upstream; gRPC requires `te: trailers` (gRPC over HTTP/2).
    let grpc = request
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        let _ = request.insert_header("te", "trailers");
    }
}

/// Removes every mesh-owned header ([`meshflow_policies::headers`]; any case, any count) from
/// a request a client sent, before anything judges it.
pub fn strip_mesh_owned(request: &mut RequestHeader) {
    for name in mesh_owned_names(&request.headers) {
        while request.remove_header(&name).is_some() {}
    }
}

/// Answers a request that failed before a response was sent: the error's own HTTP status, no
/// response when the client is gone, 400 for other client errors, `upstream_status` when the
/// upstream failed (the inbound side says 502; the outbound side 503, as Envoy does for
/// "upstream connect error or disconnect/reset before headers"), 500 otherwise.
pub async fn respond_to_failure(
    session: &mut Session,
    e: &Error,
    upstream_status: u16,
) -> FailToProxy {
    let code = match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(code)) => *code,
        (
            ErrorSource::Downstream,
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError,
        ) => 0,
        (ErrorSource::Downstream, _) => 400,
        (ErrorSource::Upstream, _) => upstream_status,
        _ => 500,
    };
    if code > 0 {
        let _ = session.respond_error(code).await;
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}
