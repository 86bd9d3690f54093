//! Rates and concurrency caps kept in the store: one script decides a request in one round
//! trip, atomically across replicas.
//!
//! - Rates are GCRA (the token bucket as one timestamp per address or key hash): the
//!   "theoretical arrival time", with a TTL of how far ahead it is, so idle clients leave
//!   nothing behind.
//! - Caps are sorted sets of leases scored by when they expire. Each replica renews the
//!   leases it holds; a replica that dies stops renewing, and its slots free when they expire.
//! - Time is the store's (`TIME`), so replicas' clocks need not agree.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::Script;

use super::{millis, Shared, Store, Write, PREFIX};
use crate::config::hex;

/// KEYS: 1 the address's rate, 2 the key's rate, 3 the leases of all, 4 the key's leases.
/// ARGV: 1–2 the address's interval (µs) and burst, 3–4 the key's, 5 the cap of all, 6 the
/// key's cap (0: none), 7 the lease's member, 8 the lease (ms).
/// Returns {0, 0} admitted; {1 | 2, µs to wait} a rate ran out; {3 | 4, 0} a cap is full.
/// Nothing is written unless every limit admits.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, interval, burst)
  if interval <= 0 then return 0, nil end
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local wait = tat + interval - interval * burst - now
  if wait > 0 then return wait, nil end
  return 0, tat + interval
end
local ip_wait, ip_tat = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if ip_wait > 0 then return {1, ip_wait} end
local key_wait, key_tat = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if key_wait > 0 then return {2, key_wait} end
local now_ms = math.floor(now / 1000)
local lease = tonumber(ARGV[8])
local function full(key, cap)
  if cap <= 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  return redis.call('ZCARD', key) >= cap
end
local all_cap, key_cap = tonumber(ARGV[5]), tonumber(ARGV[6])
if full(KEYS[3], all_cap) then return {3, 0} end
if full(KEYS[4], key_cap) then return {4, 0} end
local function keep(key, tat)
  if tat then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
keep(KEYS[1], ip_tat)
keep(KEYS[2], key_tat)
local function hold(key, cap)
  if cap > 0 then
    redis.call('ZADD', key, now_ms + lease, ARGV[7])
    redis.call('PEXPIRE', key, lease * 2)
  end
end
hold(KEYS[3], all_cap)
hold(KEYS[4], key_cap)
return {0, 0}
",
    )
});

/// KEYS: lease sets; ARGV: 1 the lease (ms), then the member for each key. Pushes each
/// lease's expiry a lease ahead; a lease already released stays released (`XX`).
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local lease = tonumber(ARGV[1])
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease * 2)
end
return #KEYS
",
    )
});

/// The name a script's unused key slot gets.
const UNUSED: &str = "oa-bypass:unused";
/// Leases renewed per script call.
const RENEW_BATCH: usize = 1000;

/// A rate: one request per `interval`, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub interval: Duration,
    pub burst: u32,
}

/// The limits to keep in the store (`None`: that one is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub per_ip: Option<Rate>,
    pub per_key: Option<Rate>,
    pub cap_all: Option<u32>,
    pub cap_per_key: Option<u32>,
}

/// The store's answer for one request.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Within every limit; the lease holds its slots (when a cap is set) until dropped.
    Admitted(Option<Lease>),
    /// The address's rate ran out: wait this long.
    AddressRate(Duration),
    /// The key's rate ran out: wait this long.
    KeyRate(Duration),
    /// `max_concurrent_requests` slots are all taken.
    AllBusy,
    /// The key's `max_concurrent_per_key` slots are all taken.
    KeyBusy,
    /// The store did not answer (now, or lately).
    Unavailable,
}

/// The sets a lease is a member of, and its member name.
#[derive(Debug, Clone)]
pub(super) struct LeaseKeys {
    member: String,
    sets: Vec<String>,
}

impl LeaseKeys {
    /// Adds the commands that give its slots back.
    pub(super) fn release(&self, pipe: &mut redis::Pipeline) {
        for set in &self.sets {
            pipe.cmd("ZREM").arg(set).arg(&self.member).ignore();
        }
    }
}

/// The leases this process holds, by number.
#[derive(Default)]
pub(super) struct Held {
    /// The number of the last lease handed out.
    last: AtomicU64,
    live: Mutex<HashMap<u64, LeaseKeys>>,
}

/// Holds a request's concurrency slots in the store until dropped.
pub(crate) struct Lease {
    number: u64,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("number", &self.number)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keys = match self.shared.leases.live.lock() {
            Ok(mut live) => live.remove(&self.number),
            Err(_) => None,
        };
        if let Some(keys) = keys {
            let _ = self.shared.writes.send(Write::Release(keys));
        }
    }
}

/// The shared limits of one `[limits]`, asked of a store.
pub(crate) struct Limits {
    store: Arc<Store>,
    settings: Settings,
}

impl Limits {
    pub(super) fn new(store: Arc<Store>, settings: Settings) -> Limits {
        Limits { store, settings }
    }

    /// The store these limits are kept in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Asks the store whether a request from `ip` with the key hashed as `key` may go.
    pub(crate) async fn admit(&self, ip: Option<IpAddr>, key: &[u8; 32]) -> Verdict {
        let shared = &self.store.shared;
        if !shared.up.load(Ordering::Relaxed) {
            return Verdict::Unavailable;
        }
        let s = self.settings;
        let key_hex = hex(key);
        let (ip_key, ip_rate) = match (s.per_ip, ip) {
            (Some(rate), Some(ip)) => (format!("{PREFIX}rate:ip:{ip}"), Some(rate)),
            _ => (UNUSED.to_owned(), None),
        };
        let (key_rate_key, key_rate) = match s.per_key {
            Some(rate) => (format!("{PREFIX}rate:key:{key_hex}"), Some(rate)),
            None => (UNUSED.to_owned(), None),
        };
        let all_set = format!("{PREFIX}busy:all");
        let key_set = format!("{PREFIX}busy:key:{key_hex}");
        let number = shared.leases.last.fetch_add(1, Ordering::Relaxed) + 1;
        let member = format!("{}:{number}", shared.instance);
        let rate_args = |rate: Option<Rate>| match rate {
            Some(rate) => (micros(rate.interval), rate.burst),
            None => (0, 0),
        };
        let (ip_interval, ip_burst) = rate_args(ip_rate);
        let (key_interval, key_burst) = rate_args(key_rate);
        let mut invocation = ADMIT.prepare_invoke();
        invocation
            .key(&ip_key)
            .key(&key_rate_key)
            .key(&all_set)
            .key(&key_set)
            .arg(ip_interval)
            .arg(ip_burst)
            .arg(key_interval)
            .arg(key_burst)
            .arg(s.cap_all.unwrap_or(0))
            .arg(s.cap_per_key.unwrap_or(0))
            .arg(&member)
            .arg(millis(shared.settings.lease));
        let reply: Option<(u8, u64)> = shared
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await;
        match reply {
            None => Verdict::Unavailable,
            Some((1, wait)) => Verdict::AddressRate(Duration::from_micros(wait)),
            Some((2, wait)) => Verdict::KeyRate(Duration::from_micros(wait)),
            Some((3, _)) => Verdict::AllBusy,
            Some((4, _)) => Verdict::KeyBusy,
            Some(_) => {
                let sets: Vec<String> = [(s.cap_all, all_set), (s.cap_per_key, key_set)]
                    .into_iter()
                    .filter_map(|(cap, set)| cap.map(|_| set))
                    .collect();
                if sets.is_empty() {
                    return Verdict::Admitted(None);
                }
                let keys = LeaseKeys { member, sets };
                if let Ok(mut live) = shared.leases.live.lock() {
                    live.insert(number, keys);
                }
                Verdict::Admitted(Some(Lease {
                    number,
                    shared: Arc::clone(shared),
                }))
            }
        }
    }

    /// Under `store_failure = "open"`, while the store is down: a warning now and then.
    pub(crate) fn serving_without(&self) {
        self.store.shared.warn_open();
    }
}

/// Renews the leases this process holds, three times a lease, for as long as the store is
/// in use.
pub(super) async fn renew(shared: Arc<Shared>) {
    let lease = shared.settings.lease;
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let live: Vec<LeaseKeys> = match shared.leases.live.lock() {
            Ok(live) => live.values().cloned().collect(),
            Err(_) => continue,
        };
        let pairs: Vec<(&String, &String)> = live
            .iter()
            .flat_map(|keys| keys.sets.iter().map(move |set| (set, &keys.member)))
            .collect();
        for batch in pairs.chunks(RENEW_BATCH) {
            let mut invocation = RENEW.prepare_invoke();
            invocation.arg(millis(lease));
            for (set, member) in batch {
                invocation.key(*set).arg(*member);
            }
            let renewed: Option<u64> = shared
                .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
                .await;
            if renewed.is_none() {
                break;
            }
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
