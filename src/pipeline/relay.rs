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
use tokio::time::{Instant, Sleep};

use super::aliases::AliasedList;
use super::body::{IdleTimer, UploadProgress};
use super::budget::Metered;
use super::limits::Admission;
use super::stream_usage::UsageChunkFilter;
use crate::http1::Framing;
use crate::observe::log::{Outcome, Record};
use crate::observe::metrics::{GaugeGuard, RouteMetrics, UpstreamErrorKind};
use crate::observe::traces::RequestSpan;
use crate::observe::usage::UsageTap;
use crate::sse::Boundary;
use crate::upstream::ResponseBody;

/// A forwarded request's log record, and what its end reports to and lets go of: the
/// end-of-answer metrics, the usage tap, the span, its places under the limits and gauges.
#[derive(Debug)]
pub(super) struct RequestLog {
    pub(super) record: Record,
    /// A streamed upload's progress: what it sent is known only at the end.
    pub(super) upload: Option<Arc<UploadProgress>>,
    /// Reads token usage from the answer on routes with `usage = true`.
    pub(super) usage: Option<UsageTap>,
    /// Prices that usage for a named key, and counts it against the key's rates and
    /// budgets. Boxed: a request carries its room only then.
    pub(super) metered: Option<Box<Metered>>,
    pub(super) metrics: Arc<RouteMetrics>,
    /// Its span, when traces are on.
    pub(super) trace: Option<Box<RequestSpan>>,
    /// Held until the line is written: dropping it releases the request's place under the
    /// concurrency limits.
    pub(super) _admission: Admission,
    /// Its places in `requests_in_flight` (taken when it went upstream) and, for an event
    /// stream, `open_streams`, likewise.
    pub(super) _gauges: (Option<GaugeGuard>, Option<GaugeGuard>),
}

impl RequestLog {
    /// Counts a chunk of the answer on its way to the client, and lets the usage tap read it.
    fn saw(&mut self, chunk: &[u8]) {
        self.record.bytes_out += chunk.len() as u64;
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
        let record = &mut self.record;
        let elapsed = record.start.elapsed();
        if let Some(upload) = &self.upload {
            record.bytes_in = upload.bytes();
        }
        self.metrics
            .finish(elapsed, record.bytes_in, record.bytes_out);
        match record.outcome {
            Outcome::UpstreamBodyError => {
                self.metrics.count_upstream_error(UpstreamErrorKind::Reset);
            }
            Outcome::UpstreamBodyTimeout => {
                self.metrics
                    .count_upstream_error(UpstreamErrorKind::Timeout);
            }
            Outcome::Complete | Outcome::ClientAborted => {}
        }
        let usage = self.usage.take().and_then(UsageTap::finish);
        if let (Some(usage), Some(key)) = (&usage, &record.key) {
            self.metrics.count_tokens(usage, key);
        }
        if let (Some(usage), Some(metered)) = (&usage, &self.metered) {
            metered.record(usage);
        }
        if let Some(name) = &record.key_name {
            let metrics = self.metrics.gateway();
            metrics.count_named(name, record.status, Some(elapsed));
        }
        if let Some(trace) = self.trace.take() {
            trace.finish(record.status, usage.as_ref(), record.outcome.as_str());
        }
        record.write_forwarded(elapsed, usage.as_ref());
    }
}

/// The upstream's answer body on its way to the client.
///
/// A gap longer than the read timeout between two chunks, or an upstream error, ends the
/// stream with an error, so the engine aborts the connection instead of finishing the body
/// cleanly: the client must see that the answer is incomplete. The request's log line is
/// written when this stream is dropped, with what was actually delivered.
pub(crate) struct Relay {
    inner: ResponseBody,
    idle: IdleTimer,
    /// The upstream's declared length: an engine stops polling once that much is written,
    /// so reaching it is what "complete" means for such a body.
    expected_len: Option<u64>,
    done: bool,
    /// For an event stream with a keep-alive set (and no declared length to keep).
    keepalive: Option<KeepAlive>,
    /// What of the body the gateway holds back and changes, when anything.
    edit: Option<BodyEdit>,
    log: RequestLog,
}

impl Relay {
    /// `keepalive`: how long the upstream of an event stream may be silent before the client
    /// gets an SSE comment, if at all. `edit`: some of the body is held and changed (the
    /// usage-only chunk, the models list), so its length is not the upstream's (its head
    /// must not declare one).
    pub(super) fn new(
        inner: ResponseBody,
        idle_timeout: Duration,
        keepalive: Option<Duration>,
        edit: Option<BodyEdit>,
        mut log: RequestLog,
    ) -> Relay {
        let expected_len = match inner.framing() {
            _ if edit.is_some() => None,
            Framing::Length(len) => Some(len),
            Framing::Empty => Some(0),
            Framing::Chunked | Framing::UntilClose => None,
        };
        if expected_len == Some(0) {
            log.record.outcome = Outcome::Complete;
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
            edit,
            log,
        }
    }

    /// How the body is delimited: as the upstream framed it, unless some of it is kept back.
    pub(crate) fn framing(&self) -> Framing {
        match self.edit {
            Some(_) => Framing::Chunked,
            None => self.inner.framing(),
        }
    }

    /// A chunk from the upstream: counted, read by the tap, and passed on as the filter
    /// lets it (`None`: nothing of it goes on yet).
    fn pass(&mut self, chunk: Bytes) -> Option<Bytes> {
        self.idle.saw_chunk();
        let chunk = match self.edit.as_mut() {
            None => {
                self.log.saw(&chunk);
                chunk
            }
            Some(filter) => {
                self.log.tap(&chunk);
                let passed = filter.pass(chunk);
                if passed.is_empty() {
                    return None;
                }
                self.log.record.bytes_out += passed.len() as u64;
                passed
            }
        };
        if Some(self.log.record.bytes_out) == self.expected_len {
            self.log.record.outcome = Outcome::Complete;
        }
        if let Some(keepalive) = self.keepalive.as_mut() {
            keepalive.saw(&chunk);
        }
        Some(chunk)
    }

    /// The upstream's body ended: what the filter still held, if anything, goes last.
    fn end(&mut self) -> Option<Bytes> {
        self.done = true;
        self.log.record.outcome = Outcome::Complete;
        // An event the upstream never ended goes on as it is.
        let rest = (self.edit.as_mut())
            .map(BodyEdit::finish)
            .filter(|rest| !rest.is_empty())?;
        self.log.record.bytes_out += rest.len() as u64;
        Some(rest)
    }

    /// The body ends in an error the client must see, as `outcome`.
    fn fail(&mut self, outcome: Outcome, err: io::Error) -> Poll<Option<io::Result<Bytes>>> {
        self.done = true;
        self.log.record.outcome = outcome;
        Poll::Ready(Some(Err(err)))
    }

    /// Nothing from the upstream yet: its silence past the read timeout ends the body, and a
    /// silent event stream is owed a keep-alive.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.idle.poll_expired(cx).is_ready() {
            let silent = io::Error::new(io::ErrorKind::TimedOut, "upstream went silent mid-body");
            return self.fail(Outcome::UpstreamBodyTimeout, silent);
        }
        match self.keepalive.as_mut().map(|k| k.poll_due(cx)) {
            Some(Poll::Ready(())) => {
                self.log.record.bytes_out += KEEP_ALIVE.len() as u64;
                Poll::Ready(Some(Ok(Bytes::from_static(KEEP_ALIVE))))
            }
            _ => Poll::Pending,
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
                Poll::Ready(Some(Ok(chunk))) => match this.pass(chunk) {
                    Some(chunk) => Poll::Ready(Some(Ok(chunk))),
                    // Nothing for the client yet: on to the next chunk.
                    None => continue,
                },
                Poll::Ready(Some(Err(err))) => {
                    this.fail(Outcome::UpstreamBodyError, io::Error::other(err))
                }
                Poll::Ready(None) => Poll::Ready(this.end().map(Ok)),
                Poll::Pending => this.poll_silence(cx),
            };
        }
    }
}

/// What of an answer's body the gateway holds back and gives on changed: each holds what it
/// must (`pass` gives what may go on now) and gives the rest when the body ends.
pub(crate) enum BodyEdit {
    /// An event stream whose usage the gateway asked for: the usage-only chunk stays.
    UsageChunk(UsageChunkFilter),
    /// The models list, which gains `[models]`'s aliases.
    Aliases(AliasedList),
}

impl BodyEdit {
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        match self {
            BodyEdit::UsageChunk(filter) => filter.pass(chunk),
            BodyEdit::Aliases(list) => list.pass(chunk),
        }
    }

    fn finish(&mut self) -> Bytes {
        match self {
            BodyEdit::UsageChunk(filter) => filter.finish(),
            BodyEdit::Aliases(list) => list.finish(),
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
    /// Where the stream relayed so far stands.
    boundary: Boundary,
}

impl KeepAlive {
    fn new(every: Duration) -> KeepAlive {
        KeepAlive {
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
            stale: false,
            boundary: Boundary::default(),
        }
    }

    fn saw(&mut self, chunk: &[u8]) {
        self.stale = true;
        self.boundary.feed(chunk);
    }

    /// Ready when a keep-alive is due now; it is then due again `every` later.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.boundary.between_events() {
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
