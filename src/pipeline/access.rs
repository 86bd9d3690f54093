//! Phases 1 and 3 of a request, as far as `[access]` goes: the client's address and whether
//! it may use the gateway, and the credential it presents and whether that key is allowed.
//! All off by default, so the open passthrough works.
//!
//! Keys are compared by their SHA-256, so routes.toml never holds a key. Nothing here logs a
//! key or a hash of one.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};

use super::error::GatewayError;
use crate::config::{AccessConfig, CredentialHeader, NamedKey};
use crate::headers;
use crate::observe::key::KeyId;

/// Subprotocol prefix browsers use to carry the API key on WebSockets.
pub(crate) const KEY_SUBPROTOCOL: &str = "openai-insecure-api-key.";
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The keys a request presents where `credential` says a client puts one. `authorization`:
/// the bearer token, `api-key`, and a WebSocket key subprotocol; `api-key`: that, then the
/// bearer token (Azure takes both); `x-api-key`, `x-goog-api-key`: that header alone.
/// An iterator, not a `Vec`: every forwarded request asks, and most present one key.
fn presented_keys(headers: &HeaderMap, credential: CredentialHeader) -> impl Iterator<Item = &str> {
    use CredentialHeader::{ApiKey, Authorization, XApiKey, XGoogApiKey};
    let header = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let bearer = matches!(credential, Authorization | ApiKey)
        .then(|| header(&header::AUTHORIZATION))
        .flatten()
        .map(|value| {
            // `Bearer` with no token, as SDKs send for an empty key, presents nothing.
            match value.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => value[7..].trim(),
                _ if value.eq_ignore_ascii_case("bearer") => "",
                _ => value,
            }
        });
    let named = match credential {
        Authorization | ApiKey => header(ApiKey.name()),
        XApiKey | XGoogApiKey => header(credential.name()),
    };
    let (first, second) = match credential {
        ApiKey => (named, bearer),
        Authorization | XApiKey | XGoogApiKey => (bearer, named),
    };
    let subprotocols = headers::list_items(headers, &header::SEC_WEBSOCKET_PROTOCOL)
        .filter(move |_| credential == Authorization)
        .filter_map(|protocol| protocol.strip_prefix(KEY_SUBPROTOCOL));
    first
        .into_iter()
        .chain(second)
        .chain(subprotocols)
        .filter(|key| !key.is_empty())
}

/// Who presents a request's key: its hash, and its `[keys.NAME]` entry when it is a named key.
pub(crate) struct Caller {
    pub(crate) key: KeyId,
    pub(crate) named: Option<Arc<NamedKey>>,
}

impl AccessConfig {
    /// Whether only listed keys may use the gateway: `allowed_key_hashes` or `[keys]`.
    pub fn lists_keys(&self) -> bool {
        !self.allowed_key_hashes.is_empty() || !self.named_keys.is_empty()
    }

    /// The caller of a request: the first key it presents where `credential` says. With keys
    /// listed, every key it presents must be one of them. Each key is hashed once.
    pub(crate) fn identify(
        &self,
        headers: &HeaderMap,
        credential: CredentialHeader,
    ) -> Result<Caller, GatewayError> {
        let mut keys = presented_keys(headers, credential).map(KeyId::of);
        // None at all is refused before anything else.
        let Some(first) = keys.next() else {
            return Err(GatewayError::MissingCredential(credential));
        };
        if !self.lists_keys() {
            return Ok(Caller {
                key: first,
                named: None,
            });
        }
        let listed = |key: &KeyId| {
            self.allowed_key_hashes.contains(&key.hash) || self.named_keys.contains_key(&key.hash)
        };
        if !listed(&first) || !keys.all(|key| listed(&key)) {
            return Err(GatewayError::KeyNotAllowed);
        }
        Ok(Caller {
            named: self.named_keys.get(&first.hash).cloned(),
            key: first,
        })
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    /// address in `X-Forwarded-For` that is not itself a trusted proxy (RFC 7239 §5.2's
    /// reasoning: only the hops we trust can vouch for the one before them).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let chain: Vec<IpAddr> = headers::list_items(headers, &X_FORWARDED_FOR)
            .filter_map(|item| item.parse().ok())
            .collect();
        let mut client = peer;
        for hop in chain.into_iter().rev() {
            client = hop;
            if !trusted(&hop) {
                break;
            }
        }
        client
    }

    pub fn check_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Result<(), GatewayError> {
        if self.allowed_ips.is_empty() {
            return Ok(());
        }
        let client = peer.map(|peer| self.client_ip(peer, headers));
        match client {
            Some(ip) if self.allowed_ips.iter().any(|net| net.contains(&ip)) => Ok(()),
            Some(_) | None => Err(GatewayError::AddressNotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{hash_line, parse_hash_line};
    use crate::headers::test_map as map;

    const BEARER: CredentialHeader = CredentialHeader::Authorization;

    #[test]
    fn credential_is_a_key_in_authorization_api_key_or_a_subprotocol() {
        let has_credential = |headers: &HeaderMap| {
            presented_keys(headers, CredentialHeader::Authorization)
                .next()
                .is_some()
        };
        assert!(has_credential(&map(&[("authorization", "Bearer sk-1")])));
        assert!(has_credential(&map(&[("api-key", "k")])));
        assert!(has_credential(&map(&[("authorization", "Basic abc")])));
        assert!(has_credential(&map(&[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-1"
        )])));
        assert!(!has_credential(&map(&[("authorization", "  ")])));
        assert!(!has_credential(&map(&[("authorization", "Bearer ")])));
        assert!(!has_credential(&map(&[("authorization", "bearer")])));
        assert!(!has_credential(&map(&[("openai-organization", "org")])));
        assert!(!has_credential(&map(&[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key."
        )])));
    }

    #[test]
    fn a_mounts_credential_header_says_where_the_key_is_read() {
        fn key(
            headers: &[(&'static str, &'static str)],
            credential: CredentialHeader,
        ) -> Option<String> {
            presented_keys(&map(headers), credential)
                .next()
                .map(str::to_owned)
        }
        let anthropic = [
            ("x-api-key", "sk-ant"),
            ("authorization", "Bearer sk-other"),
        ];
        assert_eq!(
            key(&anthropic, CredentialHeader::XApiKey).unwrap(),
            "sk-ant"
        );
        assert_eq!(key(&anthropic, BEARER).unwrap(), "sk-other");
        let azure = [("api-key", "az"), ("authorization", "Bearer entra")];
        assert_eq!(key(&azure, CredentialHeader::ApiKey).unwrap(), "az");
        assert_eq!(
            key(&[("x-goog-api-key", "g")], CredentialHeader::XGoogApiKey).unwrap(),
            "g"
        );
        assert!(key(&[("api-key", "az")], CredentialHeader::XGoogApiKey).is_none());
        let subprotocol = [("sec-websocket-protocol", "openai-insecure-api-key.sk-1")];
        assert!(key(&subprotocol, CredentialHeader::XApiKey).is_none());
    }

    #[test]
    fn every_presented_key_must_be_allowed() {
        let access = AccessConfig {
            allowed_key_hashes: vec![parse_hash_line(&hash_line("sk-good")).unwrap()],
            ..AccessConfig::default()
        };
        assert!(access
            .identify(&map(&[("authorization", "Bearer sk-good")]), BEARER)
            .is_ok());
        assert!(access
            .identify(&map(&[("api-key", "sk-good")]), BEARER)
            .is_ok());
        assert!(access
            .identify(
                &map(&[(
                    "sec-websocket-protocol",
                    "realtime, openai-insecure-api-key.sk-good"
                )]),
                BEARER
            )
            .is_ok());
        let refused = |headers: &[(&'static str, &'static str)]| {
            access
                .identify(&map(headers), BEARER)
                .err()
                .map(|err| err.to_string())
        };
        assert!(refused(&[("authorization", "Bearer sk-bad")])
            .is_some_and(|err| err.contains("not allowed")));
        assert!(
            refused(&[("authorization", "Bearer sk-good"), ("api-key", "sk-bad")])
                .is_some_and(|err| err.contains("not allowed"))
        );
        assert!(refused(&[]).is_some_and(|err| err.contains("didn't provide")));
    }

    #[test]
    fn a_named_key_is_allowed_and_known_by_its_name() {
        let manifest = format!(
            "[access]\nallowed_key_hashes = [\"{}\"]\n[keys.alice]\nhash = \"{}\"\n\
             [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n",
            hash_line("sk-anonymous"),
            hash_line("sk-alice")
        );
        let config = crate::config::Config::from_manifest_str(&manifest).unwrap();
        let who = |key: &'static str| {
            let header = [("authorization", key)];
            let caller = config.access.identify(&map(&header), BEARER).ok()?;
            Some(caller.named.map(|named| named.name.to_string()))
        };
        assert_eq!(who("Bearer sk-alice"), Some(Some("alice".to_owned())));
        assert_eq!(who("Bearer sk-anonymous"), Some(None));
        assert_eq!(who("Bearer sk-bob"), None);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let access = AccessConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..AccessConfig::default()
        };
        let xff = map(&[("x-forwarded-for", "198.51.100.9, 203.0.113.7, 10.1.1.1")]);
        let via_proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let direct: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            access.client_ip(via_proxy, &xff),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(access.client_ip(direct, &xff), direct);
        assert_eq!(access.client_ip(via_proxy, &map(&[])), via_proxy);
    }
}
