//! Pure header rules for both directions of the passthrough.
//!
//! Everything end-to-end passes (OpenAI-*, X-Stainless-*, Idempotency-Key, Accept, …); what
//! belongs to one connection or names the client's address does not. These functions never
//! read or log header values beyond the names they match.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers of RFC 9110 §7.6.1, plus the legacy ones proxies still meet.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that reveal the client's address (RFC 7239 `Forwarded` and its de-facto kin).
const CLIENT_ADDRESS: [HeaderName; 6] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-client-ip"),
];

/// Azure-style key header, which OpenAI-compatible upstreams also accept.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The items of a comma-separated list header (RFC 9110 §5.6.1), across all its lines,
/// trimmed; values that are not text are skipped.
pub fn list_items<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    list_items_of(headers.get_all(name).iter().map(HeaderValue::as_bytes))
        .filter_map(|item| std::str::from_utf8(item).ok())
}

/// [`list_items`] of values given as bytes (a head the fast lane reads in place).
pub fn list_items_of<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .filter(|value| text(value).is_some())
        .flat_map(|value| value.split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), no sign, no list.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    // 19 digits always fit in a u64.
    value.iter().try_fold(0u64, |len, &byte| {
        byte.is_ascii_digit()
            .then(|| len * 10 + u64::from(byte - b'0'))
    })
}

/// A value as text, by [`HeaderValue::to_str`]'s rule (visible ASCII, space and tab), for
/// values the fast lane reads as bytes.
pub fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&byte| byte == b'\t' || (0x20..0x7f).contains(&byte))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Removes hop-by-hop headers: those RFC 9110 §7.6.1 lists and every header the
/// `Connection` field names, which apply to one connection only and must not be forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection: keep-alive` or `close` is on most answers and names nothing beyond the
    // fixed list, so the usual case collects nothing and allocates nothing.
    let named: Vec<HeaderName> = list_items(headers, &header::CONNECTION)
        .filter(|item| {
            !item.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|name| item.eq_ignore_ascii_case(name.as_str()))
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Whether a request header goes upstream: the fast lane's [`prepare_upstream_request`],
/// decided per header as the head is written instead of by removing from a map. The lane
/// takes only requests whose `Connection` names nothing beyond `close` and `keep-alive`.
pub fn goes_upstream(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(name) && !CLIENT_ADDRESS.contains(name) && name != header::HOST
}

/// Which response headers go to the client: [`strip_hop_by_hop`], decided per header as the
/// fast lane writes a head it keeps as it arrived (names and values as bytes).
pub struct Downstream<'a> {
    /// Headers the answer's `Connection` names beyond the fixed list (rare: usually empty,
    /// which allocates nothing).
    named: Vec<&'a [u8]>,
}

impl<'a> Downstream<'a> {
    /// From the answer's `Connection` values.
    pub fn of(connection: impl Iterator<Item = &'a [u8]>) -> Downstream<'a> {
        let named = list_items_of(connection)
            .filter(|item| !item.eq_ignore_ascii_case(b"close") && !is_hop_by_hop(item))
            .collect();
        Downstream { named }
    }

    pub fn allows(&self, name: &[u8]) -> bool {
        !is_hop_by_hop(name)
            && !self
                .named
                .iter()
                .any(|item| item.eq_ignore_ascii_case(name))
    }
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
}

/// Removes headers naming the client's address, so the upstream never learns it (privacy
/// by default; nothing is added in their place).
pub fn strip_client_address(headers: &mut HeaderMap) {
    for name in &CLIENT_ADDRESS {
        headers.remove(name);
    }
}

/// Turns the client's request headers into the upstream's: hop-by-hop and client-address
/// headers go, `Host` goes (the client sets the upstream's from the URL, RFC 9110 §7.2), and
/// credentials are marked sensitive so HTTP/2 never indexes them and `Debug` hides them.
pub fn prepare_upstream_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    strip_client_address(headers);
    headers.remove(header::HOST);
    mark_credentials_sensitive(headers);
}

/// Marks the values of headers that can carry a key sensitive: `Authorization`, `api-key`,
/// and `Sec-WebSocket-Protocol` (browsers pass the key there for WebSockets).
pub fn mark_credentials_sensitive(headers: &mut HeaderMap) {
    for name in [
        header::AUTHORIZATION,
        API_KEY,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// A header map from static pairs, for unit tests across the crate.
#[cfg(test)]
pub(crate) fn test_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(*name, http::HeaderValue::from_static(value));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::test_map as map;
    use super::*;

    /// The fast lane filters as it writes; hyper's path removes from the map. Both must let
    /// the same headers through.
    #[test]
    fn the_lanes_filters_agree_with_the_map_rules() {
        let request = map(&[
            ("authorization", "Bearer k"),
            ("host", "gw"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=x"),
            ("true-client-ip", "x"),
            ("proxy-authorization", "Basic x"),
            ("openai-beta", "assistants=v2"),
            ("content-type", "application/json"),
            ("content-length", "2"),
        ]);
        // Removing from a map reorders it; the order of different names carries no meaning.
        fn sorted(names: Vec<&HeaderName>) -> Vec<&str> {
            let mut names: Vec<_> = names.into_iter().map(HeaderName::as_str).collect();
            names.sort_unstable();
            names
        }
        let mut removed = request.clone();
        prepare_upstream_request(&mut removed);
        let filtered = request.keys().filter(|name| goes_upstream(name)).collect();
        assert_eq!(sorted(filtered), sorted(removed.keys().collect()));

        for response in [
            map(&[
                ("connection", "keep-alive"),
                ("keep-alive", "x"),
                ("x-a", "1"),
            ]),
            map(&[
                ("connection", "close, X-Hop"),
                ("x-hop", "1"),
                ("x-a", "1"),
                ("trailer", "x"),
            ]),
            map(&[
                ("x-a", "1"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
            ]),
        ] {
            let mut removed = response.clone();
            strip_hop_by_hop(&mut removed);
            let downstream = Downstream::of(
                response
                    .get_all(header::CONNECTION)
                    .iter()
                    .map(HeaderValue::as_bytes),
            );
            let filtered = response
                .keys()
                .filter(|name| downstream.allows(name.as_str().as_bytes()))
                .collect();
            assert_eq!(
                sorted(filtered),
                sorted(removed.keys().collect()),
                "{response:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("connection", "Foo"),
            ("connection", "Close"),
            ("x-secret-hop", "1"),
            ("foo", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-lang", "python"),
            ("idempotency-key", "k1"),
        ]);
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["idempotency-key", "openai-beta", "x-stainless-lang"]);
    }

    #[test]
    fn upstream_request_loses_host_and_client_address_but_keeps_credentials() {
        let mut headers = map(&[
            ("host", "gateway.example"),
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
            ("authorization", "Bearer sk-test"),
            ("api-key", "azure-key"),
            ("openai-organization", "org-1"),
        ]);
        prepare_upstream_request(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["api-key", "authorization", "openai-organization"]);
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        assert!(headers[API_KEY].is_sensitive());
        assert_eq!(headers[header::AUTHORIZATION], "Bearer sk-test");
        assert!(!format!("{headers:?}").contains("sk-test"));
    }
}
