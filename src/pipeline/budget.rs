//! A named key's rates and budgets (`[keys.NAME]`): phase 3 refuses a request whose key is
//! already over one, from the counts its ledger keeps ([`crate::ledger`]); phase 8 adds what
//! each answer used, priced by `prices.toml` and `[prices]`.
//!
//! The counts are of answers already finished, so requests in flight when a limit is reached
//! may overshoot it by what they spend; the docs say so.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::GatewayError;
use crate::config::{KeyLimit, NamedKey, Prices, StoreFailure, PICO_PER_USD};
use crate::ledger::{Charge, Counts, Ledger, Periods};
use crate::observe::metrics::Metrics;
use crate::observe::usage::Usage;
use crate::store::{Spend, SpendVerdict};

/// The limits in the order they are checked, which is the order of [`Spent::counts`].
const ORDER: [KeyLimit; 6] = [
    KeyLimit::RequestsPerMinute,
    KeyLimit::TokensPerMinute,
    KeyLimit::TokensPerDay,
    KeyLimit::TokensPerMonth,
    KeyLimit::UsdPerDay,
    KeyLimit::UsdPerMonth,
];

/// `key`'s limits in [`ORDER`].
fn limits_in_order(key: &NamedKey) -> [Option<u64>; 6] {
    let limits = &key.limits;
    [
        limits.requests_per_minute,
        limits.tokens_per_minute,
        limits.max_tokens_per_day,
        limits.max_tokens_per_month,
        limits.max_pico_usd_per_day,
        limits.max_pico_usd_per_month,
    ]
}

/// Phase 3 for a named key with rates or budgets, counted in this process: refused (429)
/// when its counts as of `now` are at a limit already; else this request is counted against
/// `requests_per_minute`. With a store, [`settle`] does this when forwarding begins.
pub(super) fn admit(
    ledger: &Ledger,
    metrics: &Metrics,
    key: &NamedKey,
    now: SystemTime,
) -> Result<(), GatewayError> {
    if ledger.shared().is_some() {
        return Ok(());
    }
    let periods = Periods::at(now);
    let mut over = None;
    let before = ledger.count_request(&key.name, periods, |spent| {
        over = first_over(key, &spent.counts());
        over.is_none()
    });
    match over {
        None => Ok(()),
        Some((place, used)) => {
            // The gauges follow each answer's spend (`Metered::record`); a refusal shows
            // where the key stands too (nothing was counted for it).
            show(metrics, key, &before.counts());
            Err(refusal(key, place, used, periods, now))
        }
    }
}

/// [`admit`] with the counts in a store: one round trip. While the store does not answer,
/// `limits.store_failure` decides, as for `[limits]`.
pub(super) async fn settle(
    spend: &Spend,
    metrics: &Metrics,
    key: &NamedKey,
    now: SystemTime,
) -> Result<(), GatewayError> {
    let periods = Periods::at(now);
    let limits = limits_in_order(key).map(|limit| limit.unwrap_or(0));
    match spend.admit(&key.name, periods.numbers(), limits).await {
        SpendVerdict::Admitted(counts) => {
            show(metrics, key, &counts);
            Ok(())
        }
        SpendVerdict::Over { place, counts } => {
            show(metrics, key, &counts);
            Err(refusal(key, place, counts[place], periods, now))
        }
        SpendVerdict::Unavailable => match spend.store().settings().failure {
            StoreFailure::Open => {
                spend.serving_without();
                Ok(())
            }
            StoreFailure::Closed => Err(GatewayError::StoreUnavailable),
        },
    }
}

/// Shows `key`'s limits and `counts` of them in its gauges.
fn show(metrics: &Metrics, key: &NamedKey, counts: &Counts) {
    let limits = limits_in_order(key);
    let shown = (ORDER.iter().zip(limits).zip(counts))
        .filter_map(|((limit, allowed), used)| Some((limit.field(), allowed?, *used)));
    metrics.show_key_limits(&key.name, shown);
}

/// The place in [`ORDER`] of the first of `key`'s limits that `counts` has reached, with
/// what was used.
fn first_over(key: &NamedKey, counts: &Counts) -> Option<(usize, u64)> {
    let limits = limits_in_order(key);
    (0..ORDER.len()).find_map(|place| {
        let allowed = limits[place]?;
        (counts[place] >= allowed).then_some((place, counts[place]))
    })
}

/// The refusal of a request of `key` at the limit in `place`, with `used` of it used.
fn refusal(
    key: &NamedKey,
    place: usize,
    used: u64,
    periods: Periods,
    now: SystemTime,
) -> GatewayError {
    let limit = ORDER[place];
    let allowed = limits_in_order(key)[place].unwrap_or(0);
    let (minute, day, month) = periods.ends();
    let resets = match limit {
        KeyLimit::RequestsPerMinute | KeyLimit::TokensPerMinute => minute,
        KeyLimit::TokensPerDay | KeyLimit::UsdPerDay => day,
        KeyLimit::TokensPerMonth | KeyLimit::UsdPerMonth => month,
    };
    let text = |count: u64| match limit {
        KeyLimit::UsdPerDay | KeyLimit::UsdPerMonth => usd(count),
        _ => count.to_string(),
    };
    let resets = UNIX_EPOCH + Duration::from_secs(resets);
    GatewayError::KeyLimited {
        name: Arc::clone(&key.name),
        limit,
        used: text(used),
        allowed: text(allowed),
        retry_after: resets.duration_since(now).unwrap_or_default(),
        resets_at: httpdate::fmt_http_date(resets),
    }
}

/// Pico-dollars as dollars, to the cent's hundredth: the number `/usage` reports.
pub(crate) fn usd_number(pico: u64) -> f64 {
    (pico as f64 / PICO_PER_USD * 1e4).round() / 1e4
}

/// [`usd_number`] as messages write it (`0.0390`).
pub(crate) fn usd(pico: u64) -> String {
    format!("{:.4}", usd_number(pico))
}

/// What an answer's `usage` costs its key: its tokens, input and output, and their price by
/// the model the answer names, else the model the request named. No price: no dollars (a
/// key with a dollar budget was refused an unpriced model before it went up).
pub(crate) fn charge(usage: &Usage, requested: Option<&str>, prices: &Prices) -> Charge {
    let price = (usage.model.as_deref())
        .and_then(|model| prices.of(model))
        .or_else(|| requested.and_then(|model| prices.of(model)));
    Charge {
        tokens: usage.input.saturating_add(usage.output),
        pico_usd: price.map_or(0, |price| {
            price.cost(usage.input, usage.cached_input, usage.output)
        }),
    }
}

/// Prices an answer's usage for its named key, and counts it against the key's rates and
/// budgets when it has them, when it reaches phase 8's end.
pub(super) struct Metered {
    pub(super) ledger: Arc<Ledger>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) key: Arc<NamedKey>,
    pub(super) config: Arc<crate::config::Config>,
    /// The model the request named, to price an answer that names none.
    pub(super) requested: Option<Box<str>>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("key", &self.key.name)
            .finish_non_exhaustive()
    }
}

impl Metered {
    pub(super) fn record(&self, usage: &Usage) {
        let charge = charge(usage, self.requested.as_deref(), &self.config.prices);
        let name = &self.key.name;
        self.metrics.count_named_usage(name, usage, charge.pico_usd);
        if !self.key.limits.counts_tokens() {
            return;
        }
        let periods = Periods::at(SystemTime::now());
        self.ledger.add(name, charge, periods);
        if self.ledger.shared().is_none() {
            show(
                &self.metrics,
                &self.key,
                &self.ledger.spent(name, periods).counts(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeyLimits, NamedKey};

    fn metrics() -> Metrics {
        let manifest = "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";
        Metrics::new(
            &crate::config::Config::from_manifest_str(manifest)
                .unwrap()
                .metrics,
        )
    }

    fn key(limits: KeyLimits) -> NamedKey {
        NamedKey {
            name: Arc::from("alice"),
            models: None,
            tags: None,
            expires: None,
            limits,
        }
    }

    #[test]
    fn a_budget_reached_exactly_refuses_the_next_request_until_the_period_turns() {
        let ledger = Ledger::in_memory();
        let alice = key(KeyLimits {
            max_tokens_per_day: Some(20),
            ..KeyLimits::default()
        });
        let now = UNIX_EPOCH + Duration::from_secs(1_806_537_600 - 3_600);
        let eight = Charge {
            tokens: 8,
            pico_usd: 0,
        };
        for _ in 0..3 {
            admit(&ledger, &metrics(), &alice, now).unwrap();
            ledger.add(&alice.name, eight, Periods::at(now));
        }
        match admit(&ledger, &metrics(), &alice, now) {
            Err(GatewayError::KeyLimited {
                limit: KeyLimit::TokensPerDay,
                retry_after,
                resets_at,
                ..
            }) => {
                assert_eq!(retry_after, Duration::from_secs(3_600));
                assert_eq!(resets_at, "Thu, 01 Apr 2027 00:00:00 GMT");
            }
            other => panic!("expected budget_exceeded, got {other:?}"),
        }
        let tomorrow = now + Duration::from_secs(3_600);
        assert!(admit(&ledger, &metrics(), &alice, tomorrow).is_ok());
    }

    #[test]
    fn requests_per_minute_counts_only_what_it_admits() {
        let ledger = Ledger::in_memory();
        let alice = key(KeyLimits {
            requests_per_minute: Some(2),
            ..KeyLimits::default()
        });
        let now = UNIX_EPOCH + Duration::from_secs(60 * 1_000 + 5);
        assert!(admit(&ledger, &metrics(), &alice, now).is_ok());
        assert!(admit(&ledger, &metrics(), &alice, now).is_ok());
        for _ in 0..3 {
            assert!(admit(&ledger, &metrics(), &alice, now).is_err());
        }
        assert_eq!(ledger.spent("alice", Periods::at(now)).minute_requests, 2);
        assert!(admit(&ledger, &metrics(), &alice, now + Duration::from_secs(55)).is_ok());
    }
}
