//! Phase 5: the request the upstream receives. Its URL is the base URL's followed by the
//! client's own path and query, byte for byte (nothing is rebuilt from decoded parameters, and
//! an absolute-form request line's authority is ignored); its headers are the client's, by
//! the header rules of [`crate::headers`].

use http::header::HeaderMap;
use http::uri::PathAndQuery;
use http::HeaderValue;
use http::Method;

use super::error::GatewayError;
use super::mount::{Lent, Mount};
use crate::headers::prepare_upstream_request;
use crate::message::RequestBody;
use crate::observe::metrics::Metrics;
use crate::upstream::{Outbound, Target};

/// The client's headers as the upstream gets them, for a request or a WebSocket handshake;
/// with `Host` when the upstream is plain HTTP/1 (otherwise what sends it sets it).
pub(super) fn headers(mut headers: HeaderMap, host: Option<&HeaderValue>) -> HeaderMap {
    prepare_upstream_request(&mut headers, host);
    headers
}

/// The upstream's path and query for the client's, without the first `prefix_len` bytes of
/// its path (a mount's prefix, which the router matched).
pub(super) fn path(
    target: &Target,
    path_and_query: &PathAndQuery,
    prefix_len: usize,
) -> Result<PathAndQuery, GatewayError> {
    let cannot = |err: &dyn std::fmt::Display| {
        GatewayError::Internal(format!("cannot build the upstream URL: {err}"))
    };
    if prefix_len == 0 {
        return target.join(path_and_query).map_err(|err| cannot(&err));
    }
    let rest = path_and_query
        .as_str()
        .get(prefix_len..)
        .filter(|rest| rest.starts_with('/'))
        .ok_or_else(|| cannot(&"the path is shorter than its mount's prefix"))?;
    let rest = PathAndQuery::try_from(rest).map_err(|err| cannot(&err))?;
    target.join(&rest).map_err(|err| cannot(&err))
}

/// The whole request: URL, headers (with `Host` for a plain upstream, and, when the gateway
/// holds the mount's keys, one of them lent in place of the client's), body. Also says which
/// key it lent.
pub(super) fn request(
    mount: &Mount,
    metrics: &Metrics,
    method: Method,
    (path_and_query, prefix_len): (&PathAndQuery, usize),
    client_headers: HeaderMap,
    body: RequestBody,
) -> Result<(Outbound, Option<Lent>), GatewayError> {
    let target = mount.upstream.target();
    let mut headers = headers(client_headers, target.host());
    let lent = mount.lend_key(&mut headers, metrics);
    let request = Outbound {
        method,
        target: path(target, path_and_query, prefix_len)?,
        headers,
        body,
    };
    Ok((request, lent))
}
