//! The end of a forwarded request: its log line, end-of-answer metrics and token counts,
//! written when the response body is finished or dropped, so they report what was really
//! delivered.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::body::UploadProgress;
use crate::access::KeyId;
use crate::observe::log::{self, RequestLine};
use crate::observe::metrics::{GaugeGuard, RouteMetrics, UpstreamErrorKind};
use crate::observe::usage::UsageTap;

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

/// The log line and the end-of-answer metrics of one forwarded request.
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
        log::request(&RequestLine {
            method: &self.method,
            route: &self.route,
            status: self.status,
            elapsed,
            upstream_ttfb: self.upstream_ttfb,
            bytes_in,
            bytes_out: self.bytes_out,
            outcome: self.outcome.as_str(),
            upstream_request_id: self
                .upstream_request_id
                .as_ref()
                .and_then(|value| value.to_str().ok()),
            key_hash: &key,
            model: usage.as_ref().and_then(|usage| usage.model.as_deref()),
            input_tokens: usage.as_ref().map(|usage| usage.input),
            output_tokens: usage.as_ref().map(|usage| usage.output),
        });
    }
}
