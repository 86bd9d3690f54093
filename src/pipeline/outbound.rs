//! Phase 5: the request the upstream receives. Its URL is the base URL's followed by the
//! client's own path and query, byte for byte (nothing is rebuilt from decoded parameters, and
//! an absolute-form request line's authority is ignored); its headers are the client's, by
//! the header rules of [`crate::headers`].

use http::header::HeaderMap;
use http::uri::PathAndQuery;
use http::HeaderValue;
use http::Method;

use super::error::GatewayError;
use crate::headers::prepare_upstream_request;
use crate::upstream::{Outbound, OutboundBody, Target};

/// The client's headers as the upstream gets them, for a request or a WebSocket handshake;
/// with `Host` when the upstream is plain HTTP/1 (otherwise what sends it sets it).
pub fn headers(mut headers: HeaderMap, host: Option<&HeaderValue>) -> HeaderMap {
    prepare_upstream_request(&mut headers, host);
    headers
}

/// The upstream's path and query for the client's.
pub fn path(target: &Target, path_and_query: &PathAndQuery) -> Result<PathAndQuery, GatewayError> {
    target
        .join(path_and_query)
        .map_err(|err| GatewayError::Internal(format!("cannot build the upstream URL: {err}")))
}

/// The whole request: URL, headers (with `Host` for a plain upstream), body.
pub fn request(
    target: &Target,
    method: Method,
    path_and_query: &PathAndQuery,
    client_headers: HeaderMap,
    body: OutboundBody,
) -> Result<Outbound, GatewayError> {
    Ok(Outbound {
        method,
        target: path(target, path_and_query)?,
        headers: headers(client_headers, target.host()),
        body,
    })
}
