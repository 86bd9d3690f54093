//! Named keys' counts kept in the store, shared by every replica: a hash per key and UTC
//! period (`oa-bypass:spend:NAME:m:MINUTE`, `:d:DAY`, `:M:MONTH`), each expiring a while after
//! its period. One script checks a request against the limits and counts it, in one round
//! trip; what answers spend is added by the store's own thread, in order, nobody waiting.
//!
//! Periods are the gateway's (UTC, from its clock), so replicas agree as their clocks do.
//! Only key names and counts are written, never a key.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use redis::Script;

use super::{Store, Write, PREFIX};

/// KEYS: 1 the minute's hash, 2 the day's, 3 the month's. ARGV: 1–6 the limits in the order
/// of [`Counts`] (0: none), 7 the minute hash's lifetime (s). Returns {0, counts…} when every
/// limit admits (and then counts the request in the minute, in the counts too), else
/// {i, counts…} for the first limit reached, i from 1.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local m = redis.call('HMGET', KEYS[1], 'requests', 'tokens')
local d = redis.call('HMGET', KEYS[2], 'tokens', 'pico')
local mo = redis.call('HMGET', KEYS[3], 'tokens', 'pico')
local used = {tonumber(m[1]) or 0, tonumber(m[2]) or 0, tonumber(d[1]) or 0,
              tonumber(mo[1]) or 0, tonumber(d[2]) or 0, tonumber(mo[2]) or 0}
local function reply(place)
  local out = {place}
  for i = 1, 6 do out[i + 1] = string.format('%.0f', used[i]) end
  return out
end
for i = 1, 6 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and used[i] >= limit then return reply(i) end
end
if tonumber(ARGV[1]) > 0 then
  used[1] = redis.call('HINCRBY', KEYS[1], 'requests', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
return reply(0)
",
    )
});

/// How long each period's hash outlives its period: long enough for `/usage` and a slow
/// clock, short enough that idle keys leave nothing behind.
const MINUTE_LIFETIME: u64 = 120;
const DAY_LIFETIME: u64 = 2 * 86_400;
const MONTH_LIFETIME: u64 = 33 * 86_400;

/// A key's six counts, in the order the pipeline checks them: requests and tokens this
/// minute, tokens today and this month, pico-dollars today and this month.
pub(crate) type Counts = [u64; 6];

/// The periods a count belongs to: minute, day and month numbers.
pub(crate) type PeriodNumbers = (u64, u64, u64);

/// The store's answer for one request of a named key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SpendVerdict {
    /// Within every limit; the counts, this request included.
    Admitted(Counts),
    /// The limit at this place of [`Counts`] is reached.
    Over {
        place: usize,
        counts: Counts,
    },
    Unavailable,
}

/// Named keys' counts, in a store.
pub(crate) struct Spend {
    store: Arc<Store>,
}

/// The keys of `name`'s three hashes for `periods`.
fn hashes(name: &str, (minute, day, month): PeriodNumbers) -> [String; 3] {
    [
        format!("{PREFIX}spend:{name}:m:{minute}"),
        format!("{PREFIX}spend:{name}:d:{day}"),
        format!("{PREFIX}spend:{name}:M:{month}"),
    ]
}

impl Spend {
    pub(super) fn new(store: Arc<Store>) -> Spend {
        Spend { store }
    }

    /// The store these counts are kept in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Checks a request of `name` against `limits` (0: none) and counts it: one round trip.
    pub(crate) async fn admit(
        &self,
        name: &str,
        periods: PeriodNumbers,
        limits: Counts,
    ) -> SpendVerdict {
        let shared = &self.store.shared;
        if !shared.up.load(Ordering::Relaxed) {
            return SpendVerdict::Unavailable;
        }
        let [minute, day, month] = hashes(name, periods);
        let mut invocation = ADMIT.prepare_invoke();
        invocation.key(minute).key(day).key(month);
        for limit in limits {
            invocation.arg(limit);
        }
        invocation.arg(MINUTE_LIFETIME);
        let reply: Option<Vec<String>> = shared
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await;
        let Some(reply) = reply else {
            return SpendVerdict::Unavailable;
        };
        let number = |at: usize| reply.get(at).and_then(|n| n.parse::<u64>().ok());
        let mut counts = Counts::default();
        for (place, count) in counts.iter_mut().enumerate() {
            *count = number(place + 1).unwrap_or(0);
        }
        match number(0) {
            Some(0) => SpendVerdict::Admitted(counts),
            Some(place) if place <= 6 => SpendVerdict::Over {
                place: usize::try_from(place - 1).unwrap_or(0),
                counts,
            },
            _ => SpendVerdict::Unavailable,
        }
    }

    /// Adds an answer's `tokens` and `pico_usd` to `name`'s counts, nobody waiting.
    pub(crate) fn add(&self, name: &str, periods: PeriodNumbers, tokens: u64, pico_usd: u64) {
        let _ = self.store.shared.writes.send(Write::Spend {
            hashes: hashes(name, periods),
            tokens,
            pico_usd,
        });
    }

    /// `name`'s counts for `periods`, in the order of [`Counts`]: one round trip. `None`
    /// while the store does not answer.
    pub(crate) async fn read(&self, name: &str, periods: PeriodNumbers) -> Option<Counts> {
        let [minute, day, month] = hashes(name, periods);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(&minute).arg("requests").arg("tokens");
        pipe.cmd("HMGET").arg(&day).arg("tokens").arg("pico");
        pipe.cmd("HMGET").arg(&month).arg("tokens").arg("pico");
        type Pair = (Option<u64>, Option<u64>);
        let (m, d, mo): (Pair, Pair, Pair) = self
            .store
            .shared
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let n = |count: Option<u64>| count.unwrap_or(0);
        Some([n(m.0), n(m.1), n(d.0), n(mo.0), n(d.1), n(mo.1)])
    }

    /// Under `store_failure = "open"`, while the store is down: a warning now and then.
    pub(crate) fn serving_without(&self) {
        self.store.shared.warn_open();
    }
}

/// Adds the commands of one answer's spend to `pipe`.
pub(super) fn add(pipe: &mut redis::Pipeline, hashes: &[String; 3], tokens: u64, pico_usd: u64) {
    let [minute, day, month] = hashes;
    pipe.cmd("HINCRBY")
        .arg(minute)
        .arg("tokens")
        .arg(tokens)
        .ignore();
    pipe.cmd("EXPIRE").arg(minute).arg(MINUTE_LIFETIME).ignore();
    for (hash, lifetime) in [(day, DAY_LIFETIME), (month, MONTH_LIFETIME)] {
        pipe.cmd("HINCRBY")
            .arg(hash)
            .arg("tokens")
            .arg(tokens)
            .ignore();
        pipe.cmd("HINCRBY")
            .arg(hash)
            .arg("pico")
            .arg(pico_usd)
            .ignore();
        pipe.cmd("EXPIRE").arg(hash).arg(lifetime).ignore();
    }
}
