//! Metrics of named keys (`[keys.NAME]`), by the configured name: requests, their duration,
//! tokens and dollars by model, and each rate and budget's limit and use. Names are bounded
//! by the manifest and models by `metrics.max_models`; a request without a named key adds no
//! series here.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{histograms, registered, Described, HistogramFamily, Metrics};
use crate::config::PICO_PER_USD;
use crate::observe::usage::{Usage, TOKEN_KINDS};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyStatusLabels {
    key: Arc<str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyModelLabels {
    key: Arc<str>,
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyModelKindLabels {
    key: Arc<str>,
    model: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLimitLabels {
    key: Arc<str>,
    limit: &'static str,
}

const REQUESTS: Described = (
    "key_requests",
    "Requests of each named key ([keys.NAME]), by status, refusals included",
);
const DURATION: Described = (
    "key_request_duration_seconds",
    "From a named key's request to the end of its answer",
);
const TOKENS: Described = (
    "key_tokens",
    "Tokens of each named key's answers, by model and kind",
);
const SPEND: Described = (
    "spend_usd",
    "US dollars each named key's answers cost, by model, at prices.toml and [prices]",
);
const LIMIT: Described = (
    "key_limit",
    "Each named key's rates and budgets: requests, tokens or US dollars a period",
);
const USED: Described = (
    "key_used",
    "How much of each rate and budget a named key has used this period, as this process last saw it",
);

/// The families, registered once with the rest.
pub(super) struct KeyFamilies {
    requests: Family<KeyStatusLabels, Counter>,
    duration: HistogramFamily<KeyLabels>,
    tokens: Family<KeyModelKindLabels, Counter>,
    spend: Family<KeyModelLabels, Counter<f64, AtomicU64>>,
    limit: Family<KeyLimitLabels, Gauge<f64, AtomicU64>>,
    used: Family<KeyLimitLabels, Gauge<f64, AtomicU64>>,
}

impl KeyFamilies {
    pub(super) fn register(registry: &mut Registry) -> KeyFamilies {
        let r = registry;
        KeyFamilies {
            requests: registered(r, REQUESTS, Family::default()),
            duration: registered(r, DURATION, histograms()),
            tokens: registered(r, TOKENS, Family::default()),
            spend: registered(r, SPEND, Family::default()),
            limit: registered(r, LIMIT, Family::default()),
            used: registered(r, USED, Family::default()),
        }
    }
}

/// A limit's value as its gauge shows it: dollars for a dollar budget, else the count.
fn shown(limit: &'static str, count: u64) -> f64 {
    if limit.starts_with("max_usd") {
        count as f64 / PICO_PER_USD
    } else {
        count as f64
    }
}

impl Metrics {
    /// Counts a request of the named key `key` answered `status`, and, when it was
    /// forwarded, how long it took.
    pub(crate) fn count_named(&self, key: &Arc<str>, status: u16, elapsed: Option<Duration>) {
        let families = &self.named;
        let labels = KeyStatusLabels {
            key: Arc::clone(key),
            status,
        };
        families.requests.get_or_create(&labels).inc();
        if let Some(elapsed) = elapsed {
            let labels = KeyLabels {
                key: Arc::clone(key),
            };
            (families.duration.get_or_create(&labels)).observe(elapsed.as_secs_f64());
        }
    }

    /// Counts what an answer of `key` used: its tokens by kind, and `pico_usd`.
    pub(crate) fn count_named_usage(&self, key: &Arc<str>, usage: &Usage, pico_usd: u64) {
        let model = self.model_label(usage.model.as_deref());
        for (kind, count) in usage.counts() {
            let labels = KeyModelKindLabels {
                key: Arc::clone(key),
                model: Arc::clone(&model),
                kind: TOKEN_KINDS[kind],
            };
            self.named.tokens.get_or_create(&labels).inc_by(count);
        }
        let labels = KeyModelLabels {
            key: Arc::clone(key),
            model,
        };
        let usd = pico_usd as f64 / PICO_PER_USD;
        self.named.spend.get_or_create(&labels).inc_by(usd);
    }

    /// Shows `key`'s limits and what it has used of each, as `(field, allowed, used)`.
    pub(crate) fn show_key_limits(
        &self,
        key: &Arc<str>,
        limits: impl IntoIterator<Item = (&'static str, u64, u64)>,
    ) {
        for (limit, allowed, used) in limits {
            let labels = KeyLimitLabels {
                key: Arc::clone(key),
                limit,
            };
            (self.named.limit.get_or_create(&labels)).set(shown(limit, allowed));
            (self.named.used.get_or_create(&labels)).set(shown(limit, used));
        }
    }
}
