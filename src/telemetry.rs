//! Logging: the tracing subscriber and the one line written per request.
//!
//! A request line carries method, route template, status, durations, byte counts, the
//! upstream's request ID, the key's hash prefix and the model when the usage tap read it. It
//! must never carry a key, another header value, a body, or the raw path (which could hold an
//! ID the operator does not want in logs): the route template is logged instead.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

use crate::access::KeyId;
use crate::config::{LogConfig, LogFormat};
use crate::metrics::{GaugeGuard, RouteMetrics, UpstreamErrorKind};
use crate::proxy::body::UploadProgress;
use crate::usage::UsageTap;

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`; text or JSON lines
/// as `log.format` says.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::builder().parse(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Milliseconds with microsecond precision, as a number in JSON logs.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer reached the client.
    Complete,
    /// The client went away before the answer ended; the upstream request was dropped.
    ClientAborted,
    /// The upstream failed mid-body; the client's connection was aborted.
    UpstreamBodyError,
    /// The upstream went silent mid-body past the read timeout.
    UpstreamBodyTimeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamBodyError => "upstream_body_error",
            Outcome::UpstreamBodyTimeout => "upstream_body_timeout",
        }
    }
}

/// The log line and the end-of-answer metrics of one forwarded request, written when the
/// response body is finished or dropped, so they report what was really delivered.
#[derive(Debug)]
pub struct RequestLog {
    pub method: Method,
    pub route: Arc<str>,
    pub status: u16,
    pub start: Instant,
    /// From sending the request upstream to the upstream's response headers.
    pub upstream_ttfb: Duration,
    /// The upstream's `x-request-id`, which OpenAI support asks for.
    pub upstream_request_id: Option<HeaderValue>,
    pub key: KeyId,
    pub upload: Arc<UploadProgress>,
    pub bytes_out: u64,
    pub outcome: Outcome,
    /// Reads token usage from the answer on routes with `usage = true`.
    pub usage: Option<UsageTap>,
    pub metrics: Arc<RouteMetrics>,
    /// The request's place under the concurrency limits, released with this line.
    pub admission: crate::limits::Admission,
    /// Its place in `requests_in_flight` (and `open_streams` for an event stream).
    pub gauges: (GaugeGuard, Option<GaugeGuard>),
}

impl RequestLog {
    /// Counts a chunk of the answer on its way to the client, and lets the usage tap read it.
    pub fn saw(&mut self, chunk: &[u8]) {
        self.bytes_out += chunk.len() as u64;
        if let Some(tap) = self.usage.as_mut() {
            tap.feed(chunk);
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let bytes_in = self.upload.bytes();
        self.metrics.finish(elapsed, bytes_in, self.bytes_out);
        match self.outcome {
            Outcome::UpstreamBodyError => {
                self.metrics.count_upstream_error(UpstreamErrorKind::Reset)
            }
            Outcome::UpstreamBodyTimeout => self
                .metrics
                .count_upstream_error(UpstreamErrorKind::Timeout),
            Outcome::Complete | Outcome::ClientAborted => {}
        }
        let key = self.key.prefix();
        let usage = self.usage.take().and_then(UsageTap::finish);
        if let Some(usage) = &usage {
            self.metrics.count_tokens(usage, &key);
        }
        let model = usage.as_ref().and_then(|usage| usage.model.as_deref());
        let request_id = self
            .upstream_request_id
            .as_ref()
            .and_then(|value| value.to_str().ok());
        tracing::info!(
            target: "oa_bypass::request",
            method = %self.method,
            route = %self.route,
            status = self.status,
            duration_ms = millis(elapsed),
            upstream_ttfb_ms = millis(self.upstream_ttfb),
            bytes_in,
            bytes_out = self.bytes_out,
            outcome = self.outcome.as_str(),
            upstream_request_id = request_id,
            key_hash = &*key,
            model,
            input_tokens = usage.as_ref().map(|usage| usage.input),
            output_tokens = usage.as_ref().map(|usage| usage.output),
            "request"
        );
    }
}

/// Logs a request the gateway answered itself, with the reason (never a key or a body).
pub fn log_rejected(method: &Method, route: &str, status: u16, start: Instant, reason: &str) {
    tracing::info!(
        target: "oa_bypass::request",
        method = %method,
        route = %route,
        status,
        duration_ms = millis(start.elapsed()),
        outcome = "gateway_error",
        reason,
        "request"
    );
}
