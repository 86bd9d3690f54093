//! Pure header rules for both directions of the passthrough, and the value parsers they
//! rest on (RFC 9110).
//!
//! Everything end-to-end passes (OpenAI-*, X-Stainless-*, Idempotency-Key, Accept, …); what
//! belongs to one connection or names the client's address does not. Each rule has one form,
//! a test on a header's name ([`HopByHop::contains`], [`stays_behind`]), applied to
//! whichever container holds the head: a header map, or the fields of a head kept as it
//! arrived. These functions never read or log header values beyond the names they match.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What a listed header name is to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// Belongs to one connection (RFC 9110 §7.6.1, plus the legacy ones proxies still meet).
    HopByHop,
    /// Reveals the client's address (RFC 7239 `Forwarded` and its de-facto kin).
    ClientAddress,
    /// Can carry a key: one of [`CREDENTIALS`].
    Credential,
}

/// Every header a key can travel in, lowercase: the one list every rule about keys reads.
/// The first [`KEY_HEADER_COUNT`] are where a client puts its key and a mount's
/// `credential_header` may name (OpenAI's bearer token; Azure's, Anthropic's and Google's
/// own headers); browsers carry a WebSocket's key in the last, as a subprotocol.
pub(crate) const CREDENTIALS: [&str; 5] = [
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "sec-websocket-protocol",
];

/// How many of [`CREDENTIALS`] hold a key and nothing else.
pub(crate) const KEY_HEADER_COUNT: usize = 4;

/// The headers of [`CREDENTIALS`] that hold a key and nothing else, as names.
pub(crate) static KEY_HEADERS: [HeaderName; KEY_HEADER_COUNT] = [
    HeaderName::from_static(CREDENTIALS[0]),
    HeaderName::from_static(CREDENTIALS[1]),
    HeaderName::from_static(CREDENTIALS[2]),
    HeaderName::from_static(CREDENTIALS[3]),
];

/// Every header name the rules know, lowercase, shortest first (see [`BY_LENGTH`]).
const LISTED: [(&str, Listed); 19] = [
    ("te", Listed::HopByHop),
    (CREDENTIALS[1], Listed::Credential),
    ("trailer", Listed::HopByHop),
    ("upgrade", Listed::HopByHop),
    ("forwarded", Listed::ClientAddress),
    (CREDENTIALS[2], Listed::Credential),
    ("x-real-ip", Listed::ClientAddress),
    ("connection", Listed::HopByHop),
    ("keep-alive", Listed::HopByHop),
    ("x-client-ip", Listed::ClientAddress),
    (CREDENTIALS[0], Listed::Credential),
    ("true-client-ip", Listed::ClientAddress),
    (CREDENTIALS[3], Listed::Credential),
    ("x-forwarded-for", Listed::ClientAddress),
    ("cf-connecting-ip", Listed::ClientAddress),
    ("proxy-connection", Listed::HopByHop),
    ("transfer-encoding", Listed::HopByHop),
    ("proxy-authorization", Listed::HopByHop),
    (CREDENTIALS[4], Listed::Credential),
];

const LONGEST: usize = LISTED[LISTED.len() - 1].0.len();

/// Where the names of each length start in [`LISTED`] (those of length `n` are
/// `BY_LENGTH[n]..BY_LENGTH[n + 1]`). Why: every header of every message is looked up, and
/// nearly none is listed; a name is compared only with the listed names as long as it.
const BY_LENGTH: [usize; LONGEST + 2] = {
    let mut starts = [0; LONGEST + 2];
    let mut i = 1;
    while i < LISTED.len() {
        assert!(
            LISTED[i - 1].0.len() <= LISTED[i].0.len(),
            "LISTED is shortest first"
        );
        i += 1;
    }
    let mut len = 0;
    while len < starts.len() {
        let mut shorter = 0;
        while shorter < LISTED.len() && LISTED[shorter].0.len() < len {
            shorter += 1;
        }
        starts[len] = shorter;
        len += 1;
    }
    starts
};

/// What the header `name` (any case) is to the rules, if they list it.
fn listed(name: &[u8]) -> Option<Listed> {
    let (start, end) = (*BY_LENGTH.get(name.len())?, *BY_LENGTH.get(name.len() + 1)?);
    LISTED[start..end]
        .iter()
        .find(|(listed, _)| is_named(name, listed.as_bytes()))
        .map(|(_, kind)| *kind)
}

/// Whether a header's name as it arrived (any case) is `lowercase`. Why not
/// `eq_ignore_ascii_case`: names that differ mostly differ in their first bytes, and this
/// stops there rather than comparing them whole.
pub(crate) fn is_named(name: &[u8], lowercase: &[u8]) -> bool {
    name.len() == lowercase.len()
        && name
            .iter()
            .zip(lowercase)
            .all(|(byte, low)| byte.to_ascii_lowercase() == *low)
}

/// The items of a comma-separated list header (RFC 9110 §5.6.1), across all its lines,
/// trimmed; values that are not text are skipped.
pub(crate) fn list_items<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    list_items_of(headers.get_all(name).iter().map(HeaderValue::as_bytes))
        .filter_map(|item| std::str::from_utf8(item).ok())
}

/// [`list_items`] of values given as bytes (a head read in place).
pub(crate) fn list_items_of<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .filter(|value| is_text(value))
        .flat_map(|value| value.split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// What an answer's `Content-Type` says about how the gateway relays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Media {
    /// `text/event-stream`: server-sent events.
    EventStream,
    /// `application/json`.
    Json,
    /// Anything else, or none.
    Other,
}

impl Media {
    /// The media type of a `Content-Type` value, parameters aside, in any case.
    pub(crate) fn of(content_type: Option<&[u8]>) -> Media {
        let media = content_type
            .and_then(text)
            .map(|ct| ct.split(';').next().unwrap_or("").trim());
        match media {
            Some(media) if media.eq_ignore_ascii_case("text/event-stream") => Media::EventStream,
            Some(media) if media.eq_ignore_ascii_case("application/json") => Media::Json,
            _ => Media::Other,
        }
    }
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), no sign, no list.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
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
pub(crate) fn text(value: &[u8]) -> Option<&str> {
    if is_text(value) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether [`text`] takes `value`: visible ASCII, space and tab (so UTF-8 too). Why a fold
/// and not `all`: with no early exit the loop is vectorised, and keys are long values.
fn is_text(value: &[u8]) -> bool {
    value.iter().fold(true, |text, &byte| {
        text & ((byte == b'\t') | (byte.wrapping_sub(0x20) < 0x5f))
    })
}

/// The headers of one message that belong to one connection and must not be forwarded: those
/// RFC 9110 §7.6.1 lists, and every header its `Connection` field names.
pub(crate) struct HopByHop {
    /// Headers `Connection` names beyond the fixed list (rare: usually empty, which
    /// allocates nothing), lowercase.
    named: Vec<Box<str>>,
}

impl HopByHop {
    /// The rule for a message whose `Connection` values are `connection`.
    pub(crate) fn of<'a>(connection: impl Iterator<Item = &'a [u8]>) -> HopByHop {
        let mut named = Vec::new();
        for item in list_items_of(connection) {
            if is_named(item, b"close") || listed(item) == Some(Listed::HopByHop) {
                continue;
            }
            // Text already (`list_items_of`), so UTF-8.
            if let Ok(item) = std::str::from_utf8(item) {
                named.push(item.to_ascii_lowercase().into());
            }
        }
        HopByHop { named }
    }

    /// Whether the header `name` (any case, as a head read in place spells it) belongs to
    /// the connection.
    pub(crate) fn contains(&self, name: &[u8]) -> bool {
        listed(name) == Some(Listed::HopByHop) || self.names(name)
    }

    /// Whether `Connection` named `name`.
    fn names(&self, name: &[u8]) -> bool {
        self.named
            .iter()
            .any(|named| is_named(name, named.as_bytes()))
    }
}

/// Removes hop-by-hop headers from an answer's map ([`HopByHop`]).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let rule = HopByHop::of(connection_values(headers));
    let fate = |name: &HeaderName| Fate {
        leaves: rule.contains(name.as_str().as_bytes()),
        kind: None,
    };
    remove_where(headers, fate, |_, _, _| {});
}

/// Turns the client's request headers into the upstream's: hop-by-hop ones and those naming
/// the client's address stay behind (the upstream never learns it; nothing is added in their
/// place). `Host` is the upstream's (RFC 9110 §7.2): `host`, or, without one, none (the client
/// that sends the request sets it from its URL). Credentials are marked sensitive, so HTTP/2
/// never indexes them and `Debug` hides them.
pub(crate) fn prepare_upstream_request(headers: &mut HeaderMap, host: Option<&HeaderValue>) {
    let rule = HopByHop::of(connection_values(headers));
    let mut hosts = 0;
    let fate = |name: &HeaderName| {
        let bytes = name.as_str().as_bytes();
        let kind = listed(bytes);
        // `Host` is settled below, whatever `Connection` names.
        let leaves = *name != header::HOST && stays_behind(&rule, bytes, kind);
        Fate { leaves, kind }
    };
    remove_where(headers, fate, |name, fate, value| {
        if *name == header::HOST {
            hosts += 1;
            // Why in place: a removal and an insertion cost more, on every request.
            if let Some(host) = host {
                value.clone_from(host);
            }
        } else if fate.kind == Some(Listed::Credential) {
            value.set_sensitive(true);
        }
    });
    match host {
        // The client's one `Host` became the upstream's.
        Some(_) if hosts == 1 => {}
        // None, or several: the upstream's in place of all.
        Some(host) => {
            headers.insert(header::HOST, host.clone());
        }
        None if hosts > 0 => {
            headers.remove(header::HOST);
        }
        None => {}
    }
}

/// Whether a client's request header named `name` (of the `kind` the rules list it as)
/// stays behind ([`prepare_upstream_request`]).
fn stays_behind(rule: &HopByHop, name: &[u8], kind: Option<Listed>) -> bool {
    match kind {
        Some(Listed::HopByHop | Listed::ClientAddress) => true,
        Some(Listed::Credential) => false,
        None => rule.names(name),
    }
}

fn connection_values(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .map(HeaderValue::as_bytes)
}

/// What the rules made of one header's name: whether it leaves, and what they list it as.
#[derive(Debug, Clone, Copy)]
struct Fate {
    leaves: bool,
    kind: Option<Listed>,
}

/// Removes from `headers` every field whose `fate` is to leave; `touch` sees each field that
/// is there on the way, with its fate. Why one pass that notes names, rather than a lookup per
/// listed name: most messages carry one or two such headers among many, and looking at each
/// header once costs less.
fn remove_where(
    headers: &mut HeaderMap,
    fate: impl Fn(&HeaderName) -> Fate,
    mut touch: impl FnMut(&HeaderName, Fate, &mut HeaderValue),
) {
    // Why on the stack: a message has one or two such headers.
    let mut found: [Option<HeaderName>; 4] = Default::default();
    let (mut count, mut more) = (0, false);
    let mut last: Option<&HeaderName> = None;
    for (name, value) in headers.iter_mut() {
        let fate = fate(name);
        touch(name, fate, value);
        // A name with several values comes once per value.
        if fate.leaves && last != Some(name) {
            match found.get_mut(count) {
                Some(slot) => *slot = Some(name.clone()),
                None => more = true,
            }
            count += 1;
            last = Some(name);
        }
    }
    for name in found.iter().flatten() {
        headers.remove(name);
    }
    if more {
        let rest: Vec<HeaderName> = headers
            .keys()
            .filter(|name| fate(name).leaves)
            .cloned()
            .collect();
        for name in rest {
            headers.remove(name);
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
            let rule = HopByHop::of(connection_values(&response));
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
    fn every_credential_header_is_listed_as_one() {
        for name in CREDENTIALS {
            assert_eq!(listed(name.as_bytes()), Some(Listed::Credential), "{name}");
        }
        let listed_credentials = LISTED
            .iter()
            .filter(|(_, kind)| *kind == Listed::Credential)
            .count();
        assert_eq!(listed_credentials, CREDENTIALS.len());
    }

    #[test]
    fn every_listed_name_is_found_in_any_case_and_no_other() {
        for (name, kind) in LISTED {
            assert_eq!(listed(name.as_bytes()), Some(kind), "{name}");
            let upper = name.to_ascii_uppercase();
            assert_eq!(listed(upper.as_bytes()), Some(kind), "{upper}");
        }
        // As long as listed names, and not them.
        for name in [
            "",
            "t",
            "ab",
            "accept",
            "content-length",
            "x-stainless-lang",
            "te-x",
        ] {
            assert_eq!(listed(name.as_bytes()), None, "{name}");
        }
        assert_eq!(listed(&[b'x'; 300]), None);
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
        prepare_upstream_request(&mut headers, None);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["api-key", "authorization", "openai-organization"]);
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        assert!(headers[&KEY_HEADERS[1]].is_sensitive());
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
        prepare_upstream_request(&mut headers, None);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["stays"]);

        // The same with the upstream's `Host` to set: it is all that is added.
        let mut headers = map(&[
            ("connection", "a, b, c, d, e, f"),
            ("a", "1"),
            ("b", "1"),
            ("c", "1"),
            ("d", "1"),
            ("e", "1"),
            ("host", "gateway.example"),
            ("x-forwarded-for", "1"),
            ("stays", "1"),
        ]);
        prepare_upstream_request(&mut headers, Some(&HeaderValue::from_static("up:1")));
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "stays"]);
        assert_eq!(headers["host"], "up:1");
    }

    #[test]
    fn a_plain_upstreams_host_takes_the_place_of_the_clients() {
        let up = HeaderValue::from_static("127.0.0.1:9000");
        for clients in [&[][..], &["gateway.example"], &["a.example", "b.example"]] {
            let mut headers = map(&[("content-type", "application/json")]);
            for host in clients {
                headers.append(header::HOST, HeaderValue::from_static(host));
            }
            prepare_upstream_request(&mut headers, Some(&up));
            let hosts: Vec<_> = headers.get_all(header::HOST).iter().collect();
            assert_eq!(hosts, [&up], "client sent {clients:?}");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(headers.len(), 2);
        }
    }
}
