//! Keys the gateway holds for an upstream (`keys_env`): which one a request goes up with,
//! in turn, and how long one that drew a 429 rests. Shared by every worker.
//!
//! A key's value lives here as a sensitive header value only: it is written into the
//! upstream request and nowhere else. Logs and metrics name the variable it came from.
//!
//! With `limits.store`, rests are shared: a rest is written to the store under the key's
//! hash, and the others' rests are read back into cells ([`Deadlines`]) that `pick` reads
//! without waiting. A rest set on another replica reaches this one within a quarter second.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::access::KEY_SUBPROTOCOL;
use crate::config::{CredentialHeader, UpstreamConfig, UpstreamKey};
use crate::headers;
use crate::store::{self, Deadlines, Store};

/// How long a key rests after a 429 that says nothing about when to come back.
const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(10);
/// The longest rest a 429 can give a key: a wrong header should not bench it for days.
const MAX_COOL_DOWN: Duration = Duration::from_secs(24 * 3600);

struct HeldKey {
    /// The environment variable it came from.
    var: Arc<str>,
    /// The credential header's value, marked sensitive.
    value: HeaderValue,
    /// Until when it rests, in milliseconds after the pool's `epoch` (0: never rested).
    resting_until: AtomicU64,
}

/// The keys of one upstream, taken in turn.
pub(crate) struct KeyPool {
    keys: Vec<HeldKey>,
    header: HeaderName,
    next: AtomicUsize,
    epoch: Instant,
    /// The settings it was made from: a reload with the same keys keeps the pool, and so
    /// the rests under way.
    made_from: (CredentialHeader, Vec<UpstreamKey>),
    /// With a store: the rests of the other replicas, and where this one's go.
    shared: Option<(Arc<Store>, Arc<Deadlines>)>,
}

impl KeyPool {
    /// The pool of `upstream`'s keys, resting in step with the other replicas through
    /// `store`; `None` without keys.
    pub(crate) fn new(upstream: &UpstreamConfig, store: Option<&Arc<Store>>) -> Option<KeyPool> {
        let keys = &upstream.keys;
        let credential = upstream.credential_header;
        let mut pool = KeyPool::unshared(credential, keys)?;
        pool.shared = store.map(|store| {
            let names = (keys.iter())
                .map(|key| {
                    store::deadline_name(&upstream.mount, &Sha256::digest(&key.value).into())
                })
                .collect();
            (Arc::clone(store), store.deadlines(names))
        });
        Some(pool)
    }

    /// The pool of `keys`, written into `credential`, resting on its own.
    fn unshared(credential: CredentialHeader, keys: &[UpstreamKey]) -> Option<KeyPool> {
        if keys.is_empty() {
            return None;
        }
        let held = keys
            .iter()
            .filter_map(|key| {
                let text = match credential {
                    CredentialHeader::Authorization => format!("Bearer {}", key.value),
                    CredentialHeader::ApiKey
                    | CredentialHeader::XApiKey
                    | CredentialHeader::XGoogApiKey => key.value.clone(),
                };
                // Checked at load; a value that fails here is left out, never shown.
                let mut value = HeaderValue::from_str(&text).ok()?;
                value.set_sensitive(true);
                Some(HeldKey {
                    var: Arc::from(key.var.as_str()),
                    value,
                    resting_until: AtomicU64::new(0),
                })
            })
            .collect();
        Some(KeyPool {
            keys: held,
            header: HeaderName::from_static(credential.as_str()),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            made_from: (credential, keys.to_vec()),
            shared: None,
        })
    }

    /// Whether this pool holds exactly what `keys` in `credential`, sharing rests through
    /// `store`, would.
    pub(crate) fn made_from(
        &self,
        credential: CredentialHeader,
        keys: &[UpstreamKey],
        store: Option<&Arc<Store>>,
    ) -> bool {
        let same_store = match (&self.shared, store) {
            (Some((mine, _)), Some(store)) => Arc::ptr_eq(mine, store),
            (None, None) => true,
            _ => false,
        };
        self.made_from.0 == credential && self.made_from.1 == keys && same_store
    }

    /// The key for the next request: the next in turn that is not resting; when all rest,
    /// the one that wakes first.
    pub(crate) fn pick(&self) -> Option<usize> {
        let count = self.keys.len();
        if count == 0 {
            return None;
        }
        let now = self.now();
        let unix_now = self.shared.as_ref().map_or(0, |_| store::unix_ms());
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let order = (0..count).map(|step| (start + step) % count);
        let resting = |i: usize| self.rest_left(i, now, unix_now);
        order
            .clone()
            .find(|&i| resting(i) == 0)
            .or_else(|| order.min_by_key(|&i| resting(i)))
    }

    /// Whether a key other than `index` is not resting: a 429 on `index` can be retried here.
    pub(crate) fn has_another(&self, index: usize) -> bool {
        let now = self.now();
        let unix_now = self.shared.as_ref().map_or(0, |_| store::unix_ms());
        (0..self.keys.len())
            .filter(|&i| i != index)
            .any(|i| self.rest_left(i, now, unix_now) == 0)
    }

    /// The variables of the keys resting now, for `/ready`.
    pub(crate) fn resting(&self) -> Vec<Arc<str>> {
        let now = self.now();
        let unix_now = self.shared.as_ref().map_or(0, |_| store::unix_ms());
        (0..self.keys.len())
            .filter(|&i| self.rest_left(i, now, unix_now) > 0)
            .map(|i| Arc::clone(&self.keys[i].var))
            .collect()
    }

    /// Milliseconds until key `i` may go again: its own rest, or another replica's.
    fn rest_left(&self, i: usize, now: u64, unix_now: u64) -> u64 {
        let here = self.keys[i].resting_until.load(Ordering::Relaxed);
        let there = (self.shared.as_ref()).map_or(0, |(_, cells)| cells.until_ms(i));
        here.saturating_sub(now).max(there.saturating_sub(unix_now))
    }

    /// The variable key `index` came from: what logs and metrics say.
    pub(crate) fn var(&self, index: usize) -> Option<&Arc<str>> {
        self.keys.get(index).map(|key| &key.var)
    }

    /// The client's credentials out of `headers`, key `index` in: the upstream never sees
    /// the client's key. A WebSocket's key subprotocol goes too; its other subprotocols stay.
    pub(crate) fn lend(&self, index: usize, headers: &mut HeaderMap) {
        // Every header a client may carry its key in goes before a held key is written.
        for name in &headers::KEY_HEADERS {
            headers.remove(name);
        }
        strip_key_subprotocol(headers);
        if let Some(key) = self.keys.get(index) {
            headers.insert(self.header.clone(), key.value.clone());
        }
    }

    /// Key `index` drew a 429 whose head `get` reads: it rests as long as the head says.
    pub(crate) fn rest<'h>(
        &self,
        index: usize,
        get: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Duration {
        let rest = cool_down(get).min(MAX_COOL_DOWN);
        if let Some(key) = self.keys.get(index) {
            let until = self.now().saturating_add(millis(rest));
            key.resting_until.fetch_max(until, Ordering::Relaxed);
        }
        if let Some((store, cells)) = &self.shared {
            if let Some(name) = cells.name(index) {
                store.publish_deadline(name, rest);
            }
        }
        rest
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed()).max(1)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Keeps every subprotocol but the one carrying a key (`openai-insecure-api-key.…`).
fn strip_key_subprotocol(headers: &mut HeaderMap) {
    let name = http::header::SEC_WEBSOCKET_PROTOCOL;
    if !headers.contains_key(&name) {
        return;
    }
    let kept: Vec<&str> = headers::list_items(headers, &name)
        .filter(|item| !item.starts_with(KEY_SUBPROTOCOL))
        .collect();
    let kept = HeaderValue::from_str(&kept.join(", ")).ok();
    headers.remove(&name);
    if let Some(kept) = kept.filter(|value| !value.is_empty()) {
        headers.insert(name, kept);
    }
}

/// How long a 429's head asks the client to wait: `retry-after-ms`, else `retry-after`
/// (seconds or an HTTP date, RFC 9110 §10.2.3), else OpenAI's `x-ratelimit-reset-*` of
/// the limit that ran out (both when neither says which), else [`DEFAULT_COOL_DOWN`].
pub(crate) fn cool_down<'h>(get: impl Fn(&str) -> Option<&'h [u8]>) -> Duration {
    let text = |name: &str| get(name).and_then(|value| std::str::from_utf8(value).ok());
    if let Some(ms) = text("retry-after-ms").and_then(|t| t.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Duration::from_secs_f64(ms / 1000.0);
        }
    }
    if let Some(after) = text("retry-after").map(str::trim) {
        if let Ok(seconds) = after.parse::<u64>() {
            return Duration::from_secs(seconds);
        }
        if let Ok(when) = httpdate::parse_http_date(after) {
            return when
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
        }
    }
    let exhausted = |limit: &str| {
        text(&format!("x-ratelimit-remaining-{limit}")).is_some_and(|left| left.trim() == "0")
    };
    let reset = |limit: &str| text(&format!("x-ratelimit-reset-{limit}")).and_then(go_duration);
    let resets = match (exhausted("requests"), exhausted("tokens")) {
        (true, false) => reset("requests"),
        (false, true) => reset("tokens"),
        (true, true) | (false, false) => reset("requests").max(reset("tokens")),
    };
    resets.unwrap_or(DEFAULT_COOL_DOWN)
}

/// A duration as OpenAI's rate-limit headers write it: `20ms`, `1s`, `6m0s`, `1h2m3.5s`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(var: &str, value: &str) -> UpstreamKey {
        UpstreamKey {
            var: var.to_owned(),
            value: value.to_owned(),
        }
    }

    fn head<'a>(fields: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| {
            fields
                .iter()
                .find(|(field, _)| *field == name)
                .map(|(_, value)| value.as_bytes())
        }
    }

    #[test]
    fn keys_alternate_and_a_resting_key_is_skipped_until_the_others_rest_too() {
        let keys = [key("A", "sk-a"), key("B", "sk-b")];
        let pool = KeyPool::unshared(CredentialHeader::Authorization, &keys).unwrap();
        let picks: Vec<usize> = (0..4).map(|_| pool.pick().unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        pool.rest(0, head(&[("retry-after", "30")]));
        assert!((0..4).all(|_| pool.pick() == Some(1)));
        pool.rest(1, head(&[("retry-after", "60")]));
        // Both rest: the one that wakes first serves.
        assert!((0..4).all(|_| pool.pick() == Some(0)));
    }

    #[test]
    fn a_lent_key_replaces_every_client_credential() {
        let pool = KeyPool::unshared(CredentialHeader::XApiKey, &[key("A", "sk-held")]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-client"),
        );
        headers.insert("api-key", HeaderValue::from_static("sk-client"));
        headers.insert("x-goog-api-key", HeaderValue::from_static("sk-client"));
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.sk-client, openai-beta.realtime-v1",
            ),
        );
        pool.lend(0, &mut headers);
        assert_eq!(headers["x-api-key"], "sk-held");
        assert!(headers["x-api-key"].is_sensitive());
        assert_eq!(
            headers["sec-websocket-protocol"],
            "realtime, openai-beta.realtime-v1"
        );
        assert_eq!(headers.len(), 2);
        let bearer =
            KeyPool::unshared(CredentialHeader::Authorization, &[key("A", "sk-h")]).unwrap();
        bearer.lend(0, &mut headers);
        assert_eq!(headers["authorization"], "Bearer sk-h");
        assert!(!format!("{:?}", bearer.made_from).contains("sk-h"));
    }

    #[test]
    fn cool_downs_follow_what_the_answer_says() {
        let secs = Duration::from_secs;
        assert_eq!(cool_down(head(&[("retry-after", "7")])), secs(7));
        assert_eq!(
            cool_down(head(&[("retry-after-ms", "250"), ("retry-after", "7")])),
            Duration::from_millis(250)
        );
        let reset = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1m30s"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        assert_eq!(cool_down(head(&reset)), secs(90));
        assert_eq!(
            cool_down(head(&[("x-ratelimit-reset-tokens", "20ms")])),
            Duration::from_millis(20)
        );
        assert_eq!(cool_down(head(&[])), DEFAULT_COOL_DOWN);
        assert_eq!(
            cool_down(head(&[("retry-after", "soon")])),
            DEFAULT_COOL_DOWN
        );
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(go_duration("5x"), None);
    }
}
