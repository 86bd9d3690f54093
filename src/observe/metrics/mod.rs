//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Every label value is bounded: route templates from the manifest (never raw paths), the five
//! methods, status codes, fixed kinds, model names capped at `metrics.max_models`, and key
//! hash prefixes only when `metrics.tokens_by_key` is on. One [`Metrics`] lives as long as
//! the process, so counters survive a reload of the manifest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use super::log;
pub(crate) use super::method::method_label;
use crate::config::MetricsConfig;

mod keys;
mod route;
mod routing;

pub(crate) use route::{GaugeGuard, RouteMetrics};
pub(crate) use routing::AttemptOutcome;

/// The media type of the exposition format `prometheus-client` writes.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
struct MountLabels {
    mount: Arc<str>,
    status: u16,
}

/// A key the gateway holds, by the variable it came from (never its value).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldKeyLabels {
    mount: Arc<str>,
    key: Arc<str>,
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
pub(crate) enum UpstreamErrorKind {
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

/// A metric's name (after the `oa_bypass_` prefix) and help text.
type Described = (&'static str, &'static str);

const REQUESTS: Described = (
    "requests",
    "Requests answered, by route template, method and status",
);

const MOUNT_REQUESTS: Described = (
    "mount_requests",
    "Admitted requests by mount (`default` is [upstream]) and the status answered",
);

const KEY_REQUESTS: Described = (
    "upstream_key_requests",
    "Requests sent with a key the gateway holds, by mount and the key's variable",
);

const KEY_RESTS: Described = (
    "upstream_key_rests",
    "429s that made a held key rest, by mount and the key's variable",
);

const RESPONSE_HEADERS: Described = (
    "response_headers_seconds",
    "Time from receiving a request to sending the response headers",
);

const DURATION: Described = (
    "request_duration_seconds",
    "Time from receiving a request to the end of its answer",
);

const UPSTREAM_TTFB: Described = (
    "upstream_ttfb_seconds",
    "Time from sending a request upstream to the upstream's response headers",
);

const BYTES_RECEIVED: Described = ("received_bytes", "Request body bytes received from clients");

const BYTES_SENT: Described = ("sent_bytes", "Response body bytes sent to clients");

const IN_FLIGHT: Described = (
    "requests_in_flight",
    "Forwarded requests whose answer is not yet delivered",
);

const OPEN_STREAMS: Described = ("open_streams", "Server-sent event streams being relayed");

const REALTIME_SESSIONS: Described = ("realtime_sessions", "Open WebSocket (realtime) sessions");

const UPSTREAM_ERRORS: Described = (
    "upstream_errors",
    "Upstream failures by route and kind (connect, timeout, reset)",
);

const RATE_LIMITED: Described = (
    "rate_limited",
    "Requests refused with 429 by the [limits] setting that refused them",
);

const TOKENS: Described = (
    "tokens",
    "Tokens reported by the upstream's usage objects, by model, route and kind",
);

const KEY_TOKENS: Described = (
    "key_tokens",
    "Tokens by key (first 8 hex digits of the key's SHA-256), model and kind; only with metrics.tokens_by_key",
);

const RELOADS: Described = ("config_reloads", "Manifest reloads on SIGHUP, by result");

const FAST_ENGINE_REQUESTS: Described = (
    "fast_lane_requests",
    "Requests the fast engine forwarded (server.fast_lane); the rest went through hyper",
);

const FAST_ENGINE_HANDOVERS: Described = (
    "fast_lane_handovers",
    "Connections the fast engine handed to hyper at a request it does not take",
);

const LOG_DROPPED: Described = (
    "log_lines_dropped",
    "Log lines dropped because the log sink did not keep up (log.buffer)",
);

const STORE_ERRORS: Described = (
    "limits_store_errors",
    "Calls to the limits store (limits.store) that failed or timed out",
);

const STORE_UP: Described = (
    "limits_store_up",
    "1 while the limits store (limits.store) answers; 0 while not, or when none is set",
);

/// `metric`, registered in `registry` as `described` says.
fn registered<M: Metric + Clone>(registry: &mut Registry, described: Described, metric: M) -> M {
    let (name, help) = described;
    registry.register(name, help, metric.clone());
    metric
}

/// A family of latency histograms.
fn histograms<L: Clone + std::hash::Hash + Eq>() -> HistogramFamily<L> {
    let new_histogram: fn() -> Histogram = latency_histogram;
    Family::new_with_constructor(new_histogram)
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    mount_requests: Family<MountLabels, Counter>,
    key_requests: Family<HeldKeyLabels, Counter>,
    key_rests: Family<HeldKeyLabels, Counter>,
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
    fast_engine_requests: Counter,
    fast_engine_handovers: Counter,
    log_dropped: Counter,
    store_errors: Counter,
    store_up: Gauge,
    /// Named keys' families.
    named: keys::KeyFamilies,
    /// Failover's families.
    routing: routing::RoutingFamilies,
    tokens_by_key: AtomicBool,
    max_models: AtomicUsize,
    models: Mutex<HashMap<Box<str>, Arc<str>>>,
    other_model: Arc<str>,
}

impl Metrics {
    pub(crate) fn new(config: &MetricsConfig) -> Metrics {
        let mut registry = Registry::with_prefix("oa_bypass");
        let r = &mut registry;
        let metrics = Metrics {
            requests: registered(r, REQUESTS, Family::default()),
            mount_requests: registered(r, MOUNT_REQUESTS, Family::default()),
            key_requests: registered(r, KEY_REQUESTS, Family::default()),
            key_rests: registered(r, KEY_RESTS, Family::default()),
            response_headers: registered(r, RESPONSE_HEADERS, histograms()),
            duration: registered(r, DURATION, histograms()),
            upstream_ttfb: registered(r, UPSTREAM_TTFB, histograms()),
            bytes_received: registered(r, BYTES_RECEIVED, Family::default()),
            bytes_sent: registered(r, BYTES_SENT, Family::default()),
            in_flight: registered(r, IN_FLIGHT, Gauge::default()),
            open_streams: registered(r, OPEN_STREAMS, Gauge::default()),
            realtime_sessions: registered(r, REALTIME_SESSIONS, Gauge::default()),
            upstream_errors: registered(r, UPSTREAM_ERRORS, Family::default()),
            rate_limited: registered(r, RATE_LIMITED, Family::default()),
            tokens: registered(r, TOKENS, Family::default()),
            key_tokens: registered(r, KEY_TOKENS, Family::default()),
            reloads: registered(r, RELOADS, Family::default()),
            fast_engine_requests: registered(r, FAST_ENGINE_REQUESTS, Counter::default()),
            fast_engine_handovers: registered(r, FAST_ENGINE_HANDOVERS, Counter::default()),
            log_dropped: registered(r, LOG_DROPPED, Counter::default()),
            store_errors: registered(r, STORE_ERRORS, Counter::default()),
            store_up: registered(r, STORE_UP, Gauge::default()),
            named: keys::KeyFamilies::register(r),
            routing: routing::RoutingFamilies::register(r),
            tokens_by_key: AtomicBool::new(false),
            max_models: AtomicUsize::new(0),
            models: Mutex::default(),
            other_model: Arc::from("other"),
            registry: {
                let info = Family::<InfoLabels, Gauge>::default();
                let version = env!("CARGO_PKG_VERSION");
                info.get_or_create(&InfoLabels { version }).set(1);
                registry.register("build_info", "The running version", info);
                registry
            },
        };
        metrics.configure(config);
        metrics
    }

    /// Applies the settings of a (re)loaded manifest.
    pub(crate) fn configure(&self, config: &MetricsConfig) {
        self.tokens_by_key
            .store(config.tokens_by_key, Ordering::Relaxed);
        self.max_models.store(config.max_models, Ordering::Relaxed);
    }

    /// The exposition text.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        // The log writer counts its drops itself; the counter catches up at each scrape.
        (self.log_dropped.inner()).fetch_max(log::dropped_lines(), Ordering::Relaxed);
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The handles of one route and method, served by `mount`, looked up once when the
    /// route is built.
    pub(crate) fn route(
        self: &Arc<Self>,
        route: &Arc<str>,
        method: &Method,
        mount: &Arc<str>,
    ) -> RouteMetrics {
        let labels = RouteLabels {
            route: Arc::clone(route),
            method: method_label(method),
        };
        RouteMetrics::new(Arc::clone(self), labels, Arc::clone(mount))
    }

    /// The counter of `mount`'s admitted requests answered `status`.
    fn mount_requests(&self, mount: &Arc<str>, status: u16) -> Counter {
        self.mount_requests
            .get_or_create(&MountLabels {
                mount: Arc::clone(mount),
                status,
            })
            .clone()
    }

    /// A request went up with the held key from the variable `key`.
    pub(crate) fn count_key_use(&self, mount: &Arc<str>, key: &Arc<str>) {
        let labels = HeldKeyLabels {
            mount: Arc::clone(mount),
            key: Arc::clone(key),
        };
        self.key_requests.get_or_create(&labels).inc();
    }

    /// The held key from `key` drew a 429 and rests.
    pub(crate) fn count_key_rest(&self, mount: &Arc<str>, key: &Arc<str>) {
        let labels = HeldKeyLabels {
            mount: Arc::clone(mount),
            key: Arc::clone(key),
        };
        self.key_rests.get_or_create(&labels).inc();
    }

    /// Counts an answer under `route`: a manifest template, or one of the gateway's own
    /// fixed names (never a raw path).
    pub(crate) fn count_request(&self, route: &Arc<str>, method: &Method, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: Arc::clone(route),
                method: method_label(method),
                status,
            })
            .inc();
    }

    pub(crate) fn count_fast_engine_request(&self) {
        self.fast_engine_requests.inc();
    }

    pub(crate) fn count_fast_engine_handover(&self) {
        self.fast_engine_handovers.inc();
    }

    pub(crate) fn count_rate_limited(&self, setting: &'static str) {
        let limit = setting.strip_prefix("limits.").unwrap_or(setting);
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// The limits store's error counter and up gauge, for the store to keep.
    pub(crate) fn limits_store(&self) -> (Counter, Gauge) {
        (self.store_errors.clone(), self.store_up.clone())
    }

    pub(crate) fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Holds a place in `requests_in_flight` until dropped.
    pub(crate) fn in_flight(&self) -> GaugeGuard {
        GaugeGuard::new(&self.in_flight)
    }

    /// Holds a place in `open_streams` until dropped.
    pub(crate) fn open_stream(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_streams)
    }

    /// Holds a place in `realtime_sessions` until dropped.
    pub(crate) fn realtime_session(&self) -> GaugeGuard {
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
