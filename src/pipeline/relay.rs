//! Phase 8: the log line, metrics and usage tap of a forwarded request. The answer's body
//! streams to the client through [`Relay`], which counts it, lets the tap read it, and ends
//! it with an error when the upstream fails or goes silent; the line, the end-of-answer
//! metrics and the token counts are written when the body is finished or dropped, so they
//! report what was really delivered.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::header::{self, HeaderName};
use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use super::access::KeyId;
use super::body::{IdleTimer, Upload};
use super::limits::Admission;
use crate::headers;
use crate::observe::log::{self, RequestLine};
use crate::observe::metrics::{GaugeGuard, RouteMetrics, UpstreamErrorKind};
use crate::observe::usage::UsageTap;
use crate::upstream::{self, BodySize, Head};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
    pub upload: Upload,
    pub bytes_out: u64,
    pub outcome: Outcome,
    /// Reads token usage from the answer on routes with `usage = true`.
    pub usage: Option<UsageTap>,
    pub metrics: Arc<RouteMetrics>,
    /// The request's place under the concurrency limits, released with this line.
    pub admission: Admission,
    /// Its place in `requests_in_flight` (and `open_streams` for an event stream).
    pub gauges: (GaugeGuard, Option<GaugeGuard>),
}

/// What a forwarded request brings to its log line, gathered through the phases before it.
pub struct Opening {
    pub method: Method,
    pub route: Arc<str>,
    pub metrics: Arc<RouteMetrics>,
    pub key: KeyId,
    pub start: Instant,
    pub admission: Admission,
    pub upload: Upload,
    pub upstream_ttfb: Duration,
    pub in_flight: GaugeGuard,
    /// The route counts token usage (`usage = true`).
    pub usage: bool,
}

impl RequestLog {
    /// Opens the line of an answer with `status` and `head`: whether the usage tap reads it,
    /// and whether it is a stream. It is written when the body is done.
    pub fn open(opening: Opening, status: StatusCode, head: &Head) -> RequestLog {
        let content_type = head
            .get(&header::CONTENT_TYPE)
            .and_then(headers::text)
            .map(|ct| ct.split(';').next().unwrap_or("").trim());
        let is_event_stream =
            content_type.is_some_and(|ct| ct.eq_ignore_ascii_case("text/event-stream"));
        let is_json = content_type.is_some_and(|ct| ct.eq_ignore_ascii_case("application/json"));
        let usage = (opening.usage && status.is_success() && (is_json || is_event_stream))
            .then(UsageTap::new);
        let stream_gauge = is_event_stream.then(|| opening.metrics.all().open_stream());
        RequestLog {
            method: opening.method,
            route: opening.route,
            status: status.as_u16(),
            start: opening.start,
            upstream_ttfb: opening.upstream_ttfb,
            upstream_request_id: head.value(&X_REQUEST_ID),
            key: opening.key,
            upload: opening.upload,
            bytes_out: 0,
            outcome: Outcome::ClientAborted,
            usage,
            metrics: opening.metrics,
            admission: opening.admission,
            gauges: (opening.in_flight, stream_gauge),
        }
    }

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

/// The upstream's answer body on its way to the client.
///
/// A gap longer than the read timeout between two chunks, or an upstream error, ends the
/// stream with an error, so the engine aborts the connection instead of finishing the body
/// cleanly: the client must see that the answer is incomplete. The request's log line is
/// written when this stream is dropped, with what was actually delivered.
pub struct Relay {
    inner: upstream::Body,
    idle: IdleTimer,
    /// The upstream's declared length: an engine stops polling once that much is written,
    /// so reaching it is what "complete" means for such a body.
    expected_len: Option<u64>,
    done: bool,
    log: RequestLog,
}

impl Relay {
    pub fn new(inner: upstream::Body, idle_timeout: Duration, mut log: RequestLog) -> Relay {
        let size = inner.size();
        let expected_len = match size {
            BodySize::Known(len) => Some(len),
            BodySize::None => Some(0),
            BodySize::Unknown => None,
        };
        if expected_len == Some(0) {
            log.outcome = Outcome::Complete;
        }
        Relay {
            inner,
            idle: IdleTimer::new(idle_timeout),
            expected_len,
            done: false,
            log,
        }
    }

    /// How much body the upstream says there is.
    pub fn size(&self) -> BodySize {
        self.inner.size()
    }
}

impl Stream for Relay {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.log.saw(&chunk);
                if Some(self.log.bytes_out) == self.expected_len {
                    self.log.outcome = Outcome::Complete;
                }
                self.idle.saw_chunk();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.done = true;
                self.log.outcome = Outcome::UpstreamBodyError;
                Poll::Ready(Some(Err(io::Error::other(err))))
            }
            Poll::Ready(None) => {
                self.done = true;
                self.log.outcome = Outcome::Complete;
                Poll::Ready(None)
            }
            Poll::Pending => match self.idle.poll_expired(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    self.log.outcome = Outcome::UpstreamBodyTimeout;
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream went silent mid-body",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
