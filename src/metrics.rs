//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Every label value is bounded: route templates from the manifest (never raw paths), the five
//! methods, status codes, fixed kinds, model names capped at `metrics.max_models`, and key
//! hash prefixes only when `metrics.tokens_by_key` is on. One [`Metrics`] lives as long as
//! the process, so counters survive a reload of the manifest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::MetricsConfig;
use crate::usage::{Usage, TOKEN_KINDS};

/// The media type of the exposition format `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Model names longer than this are counted as `other`.
const MAX_MODEL_LEN: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    route: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: Arc<str>,
    route: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyTokenLabels {
    key: Arc<str>,
    model: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 9 minutes: a cached answer to a long reasoning stream.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// How an upstream exchange failed, for `oa_bypass_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No connection could be made (refused, DNS, TLS handshake).
    Connect,
    /// The connect timeout, or the upstream's silence past the read timeout.
    Timeout,
    /// The connection broke after the request was sent (reset, closed mid-body).
    Reset,
}

impl UpstreamErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
        }
    }
}

/// A method as a label value: the manifest only has these five.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    response_headers: HistogramFamily<RouteLabels>,
    duration: HistogramFamily<RouteLabels>,
    upstream_ttfb: HistogramFamily<RouteLabels>,
    bytes_received: Family<RouteLabels, Counter>,
    bytes_sent: Family<RouteLabels, Counter>,
    in_flight: Gauge,
    open_streams: Gauge,
    realtime_sessions: Gauge,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    key_tokens: Family<KeyTokenLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    lane_requests: Counter,
    lane_handovers: Counter,
    tokens_by_key: AtomicBool,
    max_models: AtomicUsize,
    models: Mutex<HashMap<Box<str>, Arc<str>>>,
    other_model: Arc<str>,
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Metrics {
        let mut registry = Registry::with_prefix("oa_bypass");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by route template, method and status",
            requests.clone(),
        );
        let new_histogram: fn() -> Histogram = latency_histogram;
        let response_headers = Family::new_with_constructor(new_histogram);
        registry.register(
            "response_headers_seconds",
            "Time from receiving a request to sending the response headers",
            response_headers.clone(),
        );
        let duration = Family::new_with_constructor(new_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to the end of its answer",
            duration.clone(),
        );
        let upstream_ttfb = Family::new_with_constructor(new_histogram);
        registry.register(
            "upstream_ttfb_seconds",
            "Time from sending a request upstream to the upstream's response headers",
            upstream_ttfb.clone(),
        );
        let bytes_received = Family::default();
        registry.register(
            "received_bytes",
            "Request body bytes received from clients",
            bytes_received.clone(),
        );
        let bytes_sent = Family::default();
        registry.register(
            "sent_bytes",
            "Response body bytes sent to clients",
            bytes_sent.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Forwarded requests whose answer is not yet delivered",
            in_flight.clone(),
        );
        let open_streams = Gauge::default();
        registry.register(
            "open_streams",
            "Server-sent event streams being relayed",
            open_streams.clone(),
        );
        let realtime_sessions = Gauge::default();
        registry.register(
            "realtime_sessions",
            "Open WebSocket (realtime) sessions",
            realtime_sessions.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by route and kind (connect, timeout, reset)",
            upstream_errors.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by the [limits] setting that refused them",
            rate_limited.clone(),
        );
        let tokens = Family::default();
        registry.register(
            "tokens",
            "Tokens reported by the upstream's usage objects, by model, route and kind",
            tokens.clone(),
        );
        let key_tokens = Family::default();
        registry.register(
            "key_tokens",
            "Tokens by key (first 8 hex digits of the key's SHA-256), model and kind; \
             only with metrics.tokens_by_key",
            key_tokens.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "config_reloads",
            "Manifest reloads on SIGHUP, by result",
            reloads.clone(),
        );
        let lane_requests = Counter::default();
        registry.register(
            "fast_lane_requests",
            "Requests the fast lane forwarded (server.fast_lane); the rest went through hyper",
            lane_requests.clone(),
        );
        let lane_handovers = Counter::default();
        registry.register(
            "fast_lane_handovers",
            "Connections the fast lane handed to hyper at a request it does not take",
            lane_handovers.clone(),
        );
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        registry.register("build_info", "The running version", info);

        let metrics = Metrics {
            registry,
            requests,
            response_headers,
            duration,
            upstream_ttfb,
            bytes_received,
            bytes_sent,
            in_flight,
            open_streams,
            realtime_sessions,
            upstream_errors,
            rate_limited,
            tokens,
            key_tokens,
            reloads,
            lane_requests,
            lane_handovers,
            tokens_by_key: AtomicBool::new(false),
            max_models: AtomicUsize::new(0),
            models: Mutex::default(),
            other_model: Arc::from("other"),
        };
        metrics.configure(config);
        metrics
    }

    /// Applies the settings of a (re)loaded manifest.
    pub fn configure(&self, config: &MetricsConfig) {
        self.tokens_by_key
            .store(config.tokens_by_key, Ordering::Relaxed);
        self.max_models.store(config.max_models, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The handles of one route and method, looked up once when the route is built.
    pub fn route(self: &Arc<Self>, route: &Arc<str>, method: &Method) -> RouteMetrics {
        let labels = RouteLabels {
            route: Arc::clone(route),
            method: method_label(method),
        };
        RouteMetrics {
            ok: OnceLock::new(),
            tokens: Mutex::default(),
            response_headers: self.response_headers.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
            upstream_ttfb: self.upstream_ttfb.get_or_create_owned(&labels),
            bytes_received: self.bytes_received.get_or_create_owned(&labels),
            bytes_sent: self.bytes_sent.get_or_create_owned(&labels),
            labels,
            all: Arc::clone(self),
        }
    }

    /// Counts an answer under `route`: a manifest template, or one of the gateway's own
    /// fixed names (never a raw path).
    pub fn count_request(&self, route: &Arc<str>, method: &Method, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: Arc::clone(route),
                method: method_label(method),
                status,
            })
            .inc();
    }

    pub fn count_lane_request(&self) {
        self.lane_requests.inc();
    }

    pub fn count_lane_handover(&self) {
        self.lane_handovers.inc();
    }

    pub fn count_rate_limited(&self, setting: &'static str) {
        let limit = setting.strip_prefix("limits.").unwrap_or(setting);
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Holds a place in `requests_in_flight` until dropped.
    pub fn in_flight(&self) -> GaugeGuard {
        GaugeGuard::new(&self.in_flight)
    }

    /// Holds a place in `open_streams` until dropped.
    pub fn open_stream(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_streams)
    }

    /// Holds a place in `realtime_sessions` until dropped.
    pub fn realtime_session(&self) -> GaugeGuard {
        GaugeGuard::new(&self.realtime_sessions)
    }

    /// The label value for a model name: itself while fewer than `max_models` names have
    /// been seen, else `other`.
    fn model_label(&self, model: Option<&str>) -> Arc<str> {
        let Some(model) = model.filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_LEN) else {
            return Arc::clone(&self.other_model);
        };
        let Ok(mut models) = self.models.lock() else {
            return Arc::clone(&self.other_model);
        };
        if let Some(label) = models.get(model) {
            return Arc::clone(label);
        }
        if models.len() >= self.max_models.load(Ordering::Relaxed) {
            return Arc::clone(&self.other_model);
        }
        let label: Arc<str> = Arc::from(model);
        models.insert(Box::from(model), Arc::clone(&label));
        label
    }
}

/// Adds one to a gauge while alive.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> GaugeGuard {
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
pub struct RouteMetrics {
    labels: RouteLabels,
    /// `requests_total` for status 200, the one nearly every answer has: resolved on first
    /// use instead of hashing the labels again per request.
    ok: OnceLock<Counter>,
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
    pub fn all(&self) -> &Metrics {
        &self.all
    }

    pub fn count_status(&self, status: u16) {
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
    }

    pub fn observe_response_headers(&self, elapsed: Duration) {
        self.response_headers.observe(elapsed.as_secs_f64());
    }

    pub fn observe_upstream_ttfb(&self, elapsed: Duration) {
        self.upstream_ttfb.observe(elapsed.as_secs_f64());
    }

    /// The end of one answer: its total duration and the bytes moved each way.
    pub fn finish(&self, elapsed: Duration, bytes_in: u64, bytes_out: u64) {
        self.duration.observe(elapsed.as_secs_f64());
        self.bytes_received.inc_by(bytes_in);
        self.bytes_sent.inc_by(bytes_out);
    }

    pub fn count_upstream_error(&self, kind: UpstreamErrorKind) {
        self.all
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: Arc::clone(&self.labels.route),
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Adds the token counts of one answer.
    pub fn count_tokens(&self, usage: &Usage, key_prefix: &str) {
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
        let route = metrics.route(&Arc::from("/v1/chat/completions"), &Method::POST);
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
        let route = metrics.route(&Arc::from("/v1/files/{file_id}"), &Method::GET);
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
