//! The metrics of one route and method: handles resolved once when the route is built, so a
//! request touches its counters without hashing labels.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::{
    KeyTokenLabels, Metrics, RequestLabels, RouteLabels, TokenLabels, UpstreamErrorKind,
    UpstreamErrorLabels,
};
use crate::observe::usage::{Usage, TOKEN_KINDS};

/// Adds one to a gauge while alive.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(super) fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A route's token counters for one model, by kind ([`TOKEN_KINDS`]).
#[derive(Debug, Default)]
struct ModelCounters {
    model: Option<Arc<str>>,
    by_kind: [Option<Counter>; 4],
}

/// The metrics of one route and method, with its histograms already resolved.
pub(crate) struct RouteMetrics {
    labels: RouteLabels,
    /// `requests_total` for status 200, the one nearly every answer has: resolved on first
    /// use instead of hashing the labels again per request.
    ok: OnceLock<Counter>,
    /// The mount's name, and its 200s' counter once resolved.
    mount: Arc<str>,
    mount_ok: OnceLock<Counter>,
    /// The token counters of the model this route saw last.
    tokens: Mutex<ModelCounters>,
    response_headers: Histogram,
    duration: Histogram,
    upstream_ttfb: Histogram,
    bytes_received: Counter,
    bytes_sent: Counter,
    all: Arc<Metrics>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.labels.route)
            .field("method", &self.labels.method)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub(super) fn new(all: Arc<Metrics>, labels: RouteLabels, mount: Arc<str>) -> RouteMetrics {
        RouteMetrics {
            ok: OnceLock::new(),
            mount,
            mount_ok: OnceLock::new(),
            tokens: Mutex::default(),
            response_headers: all.response_headers.get_or_create_owned(&labels),
            duration: all.duration.get_or_create_owned(&labels),
            upstream_ttfb: all.upstream_ttfb.get_or_create_owned(&labels),
            bytes_received: all.bytes_received.get_or_create_owned(&labels),
            bytes_sent: all.bytes_sent.get_or_create_owned(&labels),
            labels,
            all,
        }
    }

    /// The gateway's metrics, of every route.
    pub(crate) fn gateway(&self) -> &Metrics {
        &self.all
    }

    pub(crate) fn count_status(&self, status: u16) {
        let counter = |status| {
            self.all
                .requests
                .get_or_create(&RequestLabels {
                    route: Arc::clone(&self.labels.route),
                    method: self.labels.method,
                    status,
                })
                .clone()
        };
        if status == 200 {
            self.ok.get_or_init(|| counter(200)).inc();
        } else {
            counter(status).inc();
        }
        self.count_mount_status(status);
    }

    /// Counts an admitted request's answer under its mount alone (a failure after
    /// admission is counted under the route as a refusal).
    pub(crate) fn count_mount_status(&self, status: u16) {
        if status == 200 {
            let counter = || self.all.mount_requests(&self.mount, 200);
            self.mount_ok.get_or_init(counter).inc();
        } else {
            self.all.mount_requests(&self.mount, status).inc();
        }
    }

    pub(crate) fn observe_response_headers(&self, elapsed: Duration) {
        self.response_headers.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn observe_upstream_ttfb(&self, elapsed: Duration) {
        self.upstream_ttfb.observe(elapsed.as_secs_f64());
    }

    /// The end of one answer: its total duration and the bytes moved each way.
    pub(crate) fn finish(&self, elapsed: Duration, bytes_in: u64, bytes_out: u64) {
        self.duration.observe(elapsed.as_secs_f64());
        self.bytes_received.inc_by(bytes_in);
        self.bytes_sent.inc_by(bytes_out);
    }

    pub(crate) fn count_upstream_error(&self, kind: UpstreamErrorKind) {
        self.all
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: Arc::clone(&self.labels.route),
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Adds the token counts of one answer.
    pub(crate) fn count_tokens(&self, usage: &Usage, key_prefix: &str) {
        let by_key = self.all.tokens_by_key.load(Ordering::Relaxed);
        let key: Option<Arc<str>> = by_key.then(|| Arc::from(key_prefix));
        // A route mostly sees one model, so its label and counters are kept rather than
        // looked up (in the map all workers share) per answer. A series is created on its
        // first non-zero count.
        let mut cache = self.tokens.lock().ok();
        let cached = cache
            .as_deref()
            .and_then(|cache| cache.model.as_ref())
            .filter(|seen| usage.model.as_deref() == Some(&***seen))
            .cloned();
        let model = cached.unwrap_or_else(|| self.all.model_label(usage.model.as_deref()));
        if let Some(cache) = cache.as_deref_mut() {
            if !cache
                .model
                .as_ref()
                .is_some_and(|seen| Arc::ptr_eq(seen, &model))
            {
                *cache = ModelCounters {
                    model: Some(Arc::clone(&model)),
                    by_kind: Default::default(),
                };
            }
        }
        for (index, count) in usage.counts() {
            let kind = TOKEN_KINDS[index];
            let create = || {
                self.all
                    .tokens
                    .get_or_create(&TokenLabels {
                        model: Arc::clone(&model),
                        route: Arc::clone(&self.labels.route),
                        kind,
                    })
                    .clone()
            };
            match cache.as_deref_mut() {
                Some(cache) => cache.by_kind[index]
                    .get_or_insert_with(create)
                    .inc_by(count),
                // A poisoned cache: look the counter up instead.
                None => create().inc_by(count),
            };
            if let Some(key) = &key {
                self.all
                    .key_tokens
                    .get_or_create(&KeyTokenLabels {
                        key: Arc::clone(key),
                        model: Arc::clone(&model),
                        kind,
                    })
                    .inc_by(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;
    use http::Method;

    fn config(max_models: usize) -> MetricsConfig {
        MetricsConfig {
            enabled: true,
            tokens_by_key: false,
            max_models,
        }
    }

    #[test]
    fn model_labels_are_capped() {
        let metrics = Metrics::new(&config(2));
        assert_eq!(&*metrics.model_label(Some("a")), "a");
        assert_eq!(&*metrics.model_label(Some("b")), "b");
        assert_eq!(&*metrics.model_label(Some("a")), "a");
        assert_eq!(&*metrics.model_label(Some("c")), "other");
        assert_eq!(&*metrics.model_label(None), "other");
        assert_eq!(&*metrics.model_label(Some(&"x".repeat(200))), "other");
    }

    #[test]
    fn tokens_are_counted_under_each_answers_model_as_models_change() {
        let metrics = Arc::new(Metrics::new(&config(2)));
        let route = metrics.route(
            &Arc::from("/v1/chat/completions"),
            &Method::POST,
            &Arc::from("default"),
        );
        let answer = |model: Option<&str>, input| Usage {
            model: model.map(str::to_owned),
            input,
            ..Usage::default()
        };
        for (model, input) in [
            (Some("a"), 1),
            (Some("a"), 2),
            (Some("b"), 10),
            (Some("a"), 4),
            (Some("c"), 100),
            (None, 1000),
            (Some("b"), 20),
        ] {
            route.count_tokens(&answer(model, input), "0a1b2c3d");
        }
        let text = metrics.encode().unwrap();
        for (model, total) in [("a", 7), ("b", 30), ("other", 1100)] {
            let line = format!(
                "oa_bypass_tokens_total{{model=\"{model}\",route=\"/v1/chat/completions\",kind=\"input\"}} {total}"
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(!text.contains("model=\"c\""), "{text}");
    }

    #[test]
    fn encodes_route_labels_not_paths() {
        let metrics = Arc::new(Metrics::new(&config(10)));
        let route = metrics.route(
            &Arc::from("/v1/files/{file_id}"),
            &Method::GET,
            &Arc::from("default"),
        );
        route.count_status(200);
        route.finish(Duration::from_millis(3), 10, 20);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "oa_bypass_requests_total{route=\"/v1/files/{file_id}\",method=\"GET\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "oa_bypass_sent_bytes_total{route=\"/v1/files/{file_id}\",method=\"GET\"} 20"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
