//! Request checks both listeners apply before anything else (framing, header size), as thin
//! Pingora glue over [`crate::http_hygiene`].

use bytes::Bytes;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::http_hygiene::{check_request_framing, header_section_size, hop_by_hop_to_remove, PROXY_SET_HEADERS};
use crate::shared::Shared;

/// Refuses a request with bad framing (400) or an oversized header section (431), closing the
/// connection. Returns `true` when a response was sent.
pub async fn refuse_bad_request(session: &mut Session, shared: &Shared, direction: &str) -> pingora_error::Result<bool> {
    let headers = &session.req_header().headers;
    let refusal = if let Err(e) = check_request_framing(headers) {
        Some((400, "framing", e.to_string()))
    } else if header_section_size(headers) > shared.max_header_bytes {
        Some((431, "header_too_large", format!("request header section larger than {} bytes", shared.max_header_bytes)))
    } else {
        None
    };
    let Some((status, reason, message)) = refusal else { return Ok(false) };
    shared.metrics.rejected_requests.with_label_values(&[direction, reason]).inc();
    shared.metrics.requests.with_label_values(&[direction, "unknown", &status.to_string()]).inc();
    tracing::debug!(direction, reason, "refused request: {message}");
    // The framing of the rest of the connection cannot be trusted: never reuse it.
    session.set_keepalive(None);
    session
        .respond_error_with_body(status, Bytes::from(format!("meshflow: {message}\n")))
        .await?;
    Ok(true)
}

/// Removes hop-by-hop headers, `Connection` nominations and every header the proxy sets
/// (any case, any count) from a request about to be forwarded.
pub fn scrub_forwarded_request(request: &mut RequestHeader) {
    for name in hop_by_hop_to_remove(&request.headers) {
        request.remove_header(&name);
    }
    for name in PROXY_SET_HEADERS {
        while request.remove_header(*name).is_some() {}
    }
}
