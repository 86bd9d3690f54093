//! Phase 8: the log line, metrics and usage tap of a forwarded request. The answer's body
//! streams to the client through [`Relay`], which counts it, lets the tap read it, and ends
//! it with an error when the upstream fails or goes silent; the line, the end-of-answer
//! metrics and the token counts are written when the body is finished or dropped, so they
//! report what was really delivered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::header::HeaderName;
use http::{HeaderValue, Method, StatusCode};
use tokio::time::{Instant, Sleep};

use super::access::KeyId;
use super::body::{IdleTimer, Upload};
use super::limits::Admission;
use super::stream_usage::UsageChunkFilter;
use crate::headers::Media;
use crate::observe::log::{self, RequestLine};
use crate::observe::metrics::{GaugeGuard, RouteMetrics, UpstreamErrorKind};
use crate::observe::traces::RequestSpan;
use crate::observe::usage::UsageTap;
use crate::upstream::{self, BodySize, Head};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
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
pub(crate) struct RequestLog {
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
    _admission: Admission,
    /// Its place in `requests_in_flight` (and `open_streams` for an event stream).
    _gauges: (GaugeGuard, Option<GaugeGuard>),
    /// Its span, when traces are on.
    pub trace: Option<RequestSpan>,
    /// The mount's name, when not the default.
    pub mount: Option<Arc<str>>,
    /// The variable of the key the gateway lent the request, if it lent one.
    pub upstream_key: Option<Arc<str>>,
}

/// What a forwarded request brings to its log line, gathered through the phases before it.
pub(crate) struct Opening {
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
    pub trace: Option<RequestSpan>,
    /// The mount's name, when not the default.
    pub mount: Option<Arc<str>>,
    /// The variable of the key the gateway lent the request, if it lent one.
    pub upstream_key: Option<Arc<str>>,
}

impl RequestLog {
    /// Opens the line of an answer with `status`, `head` and `media`: whether the usage tap
    /// reads it, and whether it is a stream. It is written when the body is done.
    pub(crate) fn open(
        opening: Opening,
        status: StatusCode,
        head: &Head,
        media: Media,
    ) -> RequestLog {
        let is_event_stream = media == Media::EventStream;
        let usage =
            (opening.usage && status.is_success() && media != Media::Other).then(UsageTap::new);
        let stream_gauge = is_event_stream.then(|| opening.metrics.all().open_stream());
        RequestLog {
            method: opening.method,
            route: opening.route,
            status: status.as_u16(),
            start: opening.start,
            upstream_ttfb: opening.upstream_ttfb,
            upstream_request_id: head.value(&X_REQUEST_ID),
            key: opening.key,
            mount: opening.mount,
            upstream_key: opening.upstream_key,
            upload: opening.upload,
            bytes_out: 0,
            outcome: Outcome::ClientAborted,
            usage,
            metrics: opening.metrics,
            _admission: opening.admission,
            _gauges: (opening.in_flight, stream_gauge),
            trace: opening.trace,
        }
    }

    /// Counts a chunk of the answer on its way to the client, and lets the usage tap read it.
    pub(crate) fn saw(&mut self, chunk: &[u8]) {
        self.bytes_out += chunk.len() as u64;
        self.tap(chunk);
    }

    /// Lets the usage tap read a chunk of the upstream's answer, whatever of it goes on.
    fn tap(&mut self, chunk: &[u8]) {
        if let Some(tap) = self.usage.as_mut() {
            tap.feed(chunk);
        }
        if let Some(trace) = self.trace.as_mut() {
            trace.saw_chunk();
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
        if let Some(trace) = self.trace.take() {
            trace.finish(self.status, usage.as_ref(), self.outcome.as_str());
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
            mount: self.mount.as_deref(),
            upstream_key: self.upstream_key.as_deref(),
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
pub(crate) struct Relay {
    inner: upstream::Body,
    idle: IdleTimer,
    /// The upstream's declared length: an engine stops polling once that much is written,
    /// so reaching it is what "complete" means for such a body.
    expected_len: Option<u64>,
    done: bool,
    /// For an event stream with a keep-alive set (and no declared length to keep).
    keepalive: Option<KeepAlive>,
    /// For an event stream whose usage the gateway asked for: the usage-only chunk stays.
    usage_chunk: Option<UsageChunkFilter>,
    log: RequestLog,
}

impl Relay {
    /// `keepalive`: how long the upstream of an event stream may be silent before the client
    /// gets an SSE comment, if at all. `usage_chunk`: the usage-only chunk is kept back, and
    /// the body's length is then not the upstream's (its head must not declare one).
    pub(crate) fn new(
        inner: upstream::Body,
        idle_timeout: Duration,
        keepalive: Option<Duration>,
        usage_chunk: Option<UsageChunkFilter>,
        mut log: RequestLog,
    ) -> Relay {
        let size = inner.size();
        let expected_len = match size {
            _ if usage_chunk.is_some() => None,
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
            // A comment would not fit in a body of declared length.
            keepalive: keepalive
                .filter(|_| expected_len.is_none())
                .map(KeepAlive::new),
            expected_len,
            done: false,
            usage_chunk,
            log,
        }
    }

    /// How much body there is: what the upstream says, unless some of it is kept back.
    pub(crate) fn size(&self) -> BodySize {
        match self.usage_chunk {
            Some(_) => BodySize::Unknown,
            None => self.inner.size(),
        }
    }
}

impl Stream for Relay {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            return match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.idle.saw_chunk();
                    let chunk = match this.usage_chunk.as_mut() {
                        None => {
                            this.log.saw(&chunk);
                            chunk
                        }
                        Some(filter) => {
                            this.log.tap(&chunk);
                            let passed = filter.pass(chunk);
                            if passed.is_empty() {
                                // Nothing for the client yet: on to the next chunk.
                                continue;
                            }
                            this.log.bytes_out += passed.len() as u64;
                            passed
                        }
                    };
                    if Some(this.log.bytes_out) == this.expected_len {
                        this.log.outcome = Outcome::Complete;
                    }
                    if let Some(keepalive) = this.keepalive.as_mut() {
                        keepalive.saw(&chunk);
                    }
                    Poll::Ready(Some(Ok(chunk)))
                }
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    this.log.outcome = Outcome::UpstreamBodyError;
                    Poll::Ready(Some(Err(io::Error::other(err))))
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.log.outcome = Outcome::Complete;
                    // An event the upstream never ended goes on as it is.
                    let rest = this
                        .usage_chunk
                        .as_mut()
                        .map(UsageChunkFilter::finish)
                        .unwrap_or_default();
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        this.log.bytes_out += rest.len() as u64;
                        Poll::Ready(Some(Ok(rest)))
                    }
                }
                Poll::Pending => match this.idle.poll_expired(cx) {
                    Poll::Ready(()) => {
                        this.done = true;
                        this.log.outcome = Outcome::UpstreamBodyTimeout;
                        Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "upstream went silent mid-body",
                        ))))
                    }
                    Poll::Pending => match this.keepalive.as_mut().map(|k| k.poll_due(cx)) {
                        Some(Poll::Ready(())) => {
                            this.log.bytes_out += KEEP_ALIVE.len() as u64;
                            Poll::Ready(Some(Ok(Bytes::from_static(KEEP_ALIVE))))
                        }
                        _ => Poll::Pending,
                    },
                },
            };
        }
    }
}

/// The SSE comment line a silent event stream gets (clients ignore comments).
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// When an event stream's client is owed a keep-alive: after `every` without upstream
/// bytes, and only between two events, never inside one. Keep-alives do not count as the
/// upstream's life: the read timeout still ends a stream that stays silent.
struct KeepAlive {
    every: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Bytes came since the timer was last armed.
    stale: bool,
    /// The last bytes relayed (up to four) and how many there are: enough to tell whether
    /// the stream stands at an event boundary.
    tail: [u8; 4],
    tail_len: usize,
    /// Everything relayed so far is in `tail`.
    whole: bool,
}

impl KeepAlive {
    fn new(every: Duration) -> KeepAlive {
        KeepAlive {
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
            stale: false,
            tail: [0; 4],
            tail_len: 0,
            whole: true,
        }
    }

    fn saw(&mut self, chunk: &[u8]) {
        self.stale = true;
        self.whole &= self.tail_len + chunk.len() <= self.tail.len();
        let mut joined = [0; 8];
        joined[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        let take = chunk.len().min(4);
        joined[self.tail_len..self.tail_len + take].copy_from_slice(&chunk[chunk.len() - take..]);
        let end = self.tail_len + take;
        let start = end.saturating_sub(4);
        self.tail_len = end - start;
        self.tail[..self.tail_len].copy_from_slice(&joined[start..end]);
    }

    /// Ready when a keep-alive is due now; it is then due again `every` later.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !at_boundary(&self.tail[..self.tail_len], self.whole) {
            // The rest of the event is on its way; its bytes wake the relay.
            return Poll::Pending;
        }
        if std::mem::take(&mut self.stale) {
            self.sleep.as_mut().reset(Instant::now() + self.every);
        }
        ready!(self.sleep.as_mut().poll(cx));
        self.sleep.as_mut().reset(Instant::now() + self.every);
        Poll::Ready(())
    }
}

/// Whether a stream ending in `tail` stands between two events: nothing yet, or a line
/// ending right after another (an empty line ends an event; lines end in CRLF, LF or CR).
/// `whole`: `tail` is the stream from its first byte.
fn at_boundary(tail: &[u8], whole: bool) -> bool {
    let before = if let Some(rest) = tail.strip_suffix(b"\r\n") {
        rest
    } else if let Some(rest) = tail.strip_suffix(b"\n").or(tail.strip_suffix(b"\r")) {
        rest
    } else {
        return tail.is_empty() && whole;
    };
    before.ends_with(b"\n") || before.ends_with(b"\r") || (before.is_empty() && whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boundary after feeding `chunks` in turn.
    fn boundary_after(chunks: &[&[u8]]) -> bool {
        let mut keepalive = KeepAlive {
            every: Duration::from_secs(1),
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            stale: false,
            tail: [0; 4],
            tail_len: 0,
            whole: true,
        };
        for chunk in chunks {
            keepalive.saw(chunk);
        }
        at_boundary(&keepalive.tail[..keepalive.tail_len], keepalive.whole)
    }

    #[tokio::test]
    async fn a_keepalive_goes_only_between_events() {
        let between: &[&[&[u8]]] = &[
            &[],
            &[b"data: {}\n\n"],
            &[b"data: {}\r\n\r\n"],
            &[b"data: {}\r\r"],
            &[b"data: {}\n", b"\n"],
            &[b"data: {}\r\n\r", b"\n"],
            &[b"data: {}\n", b"", b"\n"],
            &[b"\n"],
            &[b"data: {}\n\n", b": ping\n\n"],
        ];
        for chunks in between {
            assert!(boundary_after(chunks), "{chunks:?}");
        }
        let inside: &[&[&[u8]]] = &[
            &[b"data: {"],
            &[b"data: {}\n"],
            &[b"data: {}\r\n"],
            &[b"data: {}\n\ndata: x"],
            &[b"data: {}\n\n", b"event: done\n"],
            &[b"data: {}\n\n", b"d"],
            &[b"xxxx", b"\n"],
        ];
        for chunks in inside {
            assert!(!boundary_after(chunks), "{chunks:?}");
        }
    }
}
