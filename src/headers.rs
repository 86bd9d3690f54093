//! Pure header rules for both directions of the passthrough, and the value parsers they
//! rest on (RFC 9110).
//!
//! Everything end-to-end passes (OpenAI-*, X-Stainless-*, Idempotency-Key, Accept, …); what
//! belongs to one connection or names the client's address does not. Each rule has one form,
//! a test on a header's name ([`HopByHop::contains`], [`leaves_for_upstream`]), applied to
//! whichever container holds the head: a header map, or the fields of a head kept as it
//! arrived. These functions never read or log header values beyond the names they match.

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

/// [`list_items`] of values given as bytes (a head read in place).
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
/// values read as bytes.
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

/// The headers of one message that belong to one connection and must not be forwarded: those
/// RFC 9110 §7.6.1 lists, and every header its `Connection` field names.
pub struct HopByHop {
    /// Headers `Connection` names beyond the fixed list (rare: usually empty, which
    /// allocates nothing).
    named: Vec<HeaderName>,
}

impl HopByHop {
    /// The rule for a message whose `Connection` values are `connection`.
    pub fn of<'a>(connection: impl Iterator<Item = &'a [u8]>) -> HopByHop {
        let named = list_items_of(connection)
            .filter(|item| !item.eq_ignore_ascii_case(b"close") && !in_fixed_list(item))
            .filter_map(|item| HeaderName::from_bytes(item).ok())
            .collect();
        HopByHop { named }
    }

    /// The rule for a header map's message.
    pub fn of_map(headers: &HeaderMap) -> HopByHop {
        HopByHop::of(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .map(HeaderValue::as_bytes),
        )
    }

    /// Whether the header `name` (any case) belongs to the connection.
    pub fn contains(&self, name: &[u8]) -> bool {
        in_fixed_list(name)
            || self
                .named
                .iter()
                .any(|named| name.eq_ignore_ascii_case(named.as_str().as_bytes()))
    }
}

fn in_fixed_list(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
}

/// Whether a client's request header stays behind: hop-by-hop ones, those naming the
/// client's address (the upstream never learns it; nothing is added in their place), and
/// `Host` (the upstream's is set from its URL, RFC 9110 §7.2).
pub fn leaves_for_upstream(hop_by_hop: &HopByHop, name: &HeaderName) -> bool {
    name == header::HOST
        || CLIENT_ADDRESS.contains(name)
        || hop_by_hop.contains(name.as_str().as_bytes())
}

/// Removes hop-by-hop headers from an answer's map ([`HopByHop`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let rule = HopByHop::of_map(headers);
    remove_where(headers, |name| rule.contains(name.as_str().as_bytes()));
}

/// Turns the client's request headers into the upstream's ([`leaves_for_upstream`]), and
/// marks credentials sensitive so HTTP/2 never indexes them and `Debug` hides them.
pub fn prepare_upstream_request(headers: &mut HeaderMap) {
    let rule = HopByHop::of_map(headers);
    remove_where(headers, |name| leaves_for_upstream(&rule, name));
    mark_credentials_sensitive(headers);
}

/// Removes every header whose name `going` picks.
fn remove_where(headers: &mut HeaderMap, mut going: impl FnMut(&HeaderName) -> bool) {
    // Why: a message carries one or two such headers, so their names are noted on the stack
    // and removed, instead of looking up every name a rule could pick.
    let mut found: [Option<HeaderName>; 8] = Default::default();
    let mut more = false;
    for (slot, name) in headers.keys().filter(|name| going(name)).enumerate() {
        match found.get_mut(slot) {
            Some(found) => *found = Some(name.clone()),
            None => more = true,
        }
    }
    for name in found.iter().flatten() {
        headers.remove(name);
    }
    if more {
        let rest: Vec<HeaderName> = headers.keys().filter(|name| going(name)).cloned().collect();
        for name in rest {
            headers.remove(name);
        }
    }
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

    fn sorted<'a>(names: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
        let mut names: Vec<_> = names
            .map(|name| String::from_utf8_lossy(name).to_ascii_lowercase())
            .collect();
        names.sort_unstable();
        names
    }

    /// A head kept as it arrived is filtered field by field; a header map by removal. Both
    /// must let the same headers through.
    #[test]
    fn the_hop_by_hop_rule_keeps_the_same_fields_of_a_map_and_of_a_head_as_it_arrived() {
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
            let rule = HopByHop::of_map(&response);
            let kept = response
                .keys()
                .map(|name| name.as_str().as_bytes())
                .filter(|name| !rule.contains(name));
            assert_eq!(
                sorted(kept),
                sorted(removed.keys().map(|name| name.as_str().as_bytes())),
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

    #[test]
    fn more_leaving_headers_than_the_stack_holds_all_go() {
        let mut headers = map(&[
            ("connection", "a, b, c, d, e, f"),
            ("a", "1"),
            ("b", "1"),
            ("c", "1"),
            ("d", "1"),
            ("e", "1"),
            ("f", "1"),
            ("keep-alive", "1"),
            ("te", "1"),
            ("x-forwarded-for", "1"),
            ("stays", "1"),
        ]);
        prepare_upstream_request(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["stays"]);
    }
}
