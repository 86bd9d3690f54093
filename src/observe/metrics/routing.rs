//! Metrics of failover (`[models]`, `retry`): each attempt by mount and outcome, the retries
//! the budget refused, and which mounts are out of turn. Mount names are bounded by the
//! manifest; nothing here is written for a request that cannot go elsewhere.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{registered, Described, Metrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    mount: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectedLabels {
    mount: Arc<str>,
}

const ATTEMPTS: Described = (
    "upstream_attempts",
    "Attempts of requests that may go elsewhere ([models], retry), by mount and outcome: \
     answered, retried (the status or failure was tried elsewhere), or gave_up (it was the last)",
);
const BUDGET_REFUSED: Described = (
    "retry_budget_refused",
    "Retries not sent because retry.budget was spent; the upstream's answer passed through",
);
const EJECTED: Described = (
    "upstream_ejected",
    "1 while a mount is out of turn after retry.eject_after failures in a row",
);

/// How an attempt ended, for `oa_bypass_upstream_attempts_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptOutcome {
    /// Its answer went to the client.
    Answered,
    /// It failed (no connection, 5xx, 429) and the request went on to another attempt.
    Retried,
    /// It failed and was the last: its answer or error went to the client.
    GaveUp,
}

impl AttemptOutcome {
    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Answered => "answered",
            AttemptOutcome::Retried => "retried",
            AttemptOutcome::GaveUp => "gave_up",
        }
    }
}

pub(super) struct RoutingFamilies {
    attempts: Family<AttemptLabels, Counter>,
    budget_refused: Counter,
    ejected: Family<EjectedLabels, Gauge>,
}

impl RoutingFamilies {
    pub(super) fn register(registry: &mut Registry) -> RoutingFamilies {
        RoutingFamilies {
            attempts: registered(registry, ATTEMPTS, Family::default()),
            budget_refused: registered(registry, BUDGET_REFUSED, Counter::default()),
            ejected: registered(registry, EJECTED, Family::default()),
        }
    }
}

impl Metrics {
    pub(crate) fn count_attempt(&self, mount: &Arc<str>, outcome: AttemptOutcome) {
        let labels = AttemptLabels {
            mount: Arc::clone(mount),
            outcome: outcome.as_str(),
        };
        self.routing.attempts.get_or_create(&labels).inc();
    }

    pub(crate) fn count_retry_refused(&self) {
        self.routing.budget_refused.inc();
    }

    /// The mount went out of turn (`true`) or came back.
    pub(crate) fn set_ejected(&self, mount: &Arc<str>, ejected: bool) {
        let labels = EjectedLabels {
            mount: Arc::clone(mount),
        };
        self.routing
            .ejected
            .get_or_create(&labels)
            .set(i64::from(ejected));
    }
}
