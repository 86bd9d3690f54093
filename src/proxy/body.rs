//! Body streams of the passthrough: the client's upload on its way up, the upstream's answer
//! on its way down. Both move chunk by chunk; neither ever collects a body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::telemetry::{Outcome, RequestLog};

/// What the upload has done so far, shared between the upload stream and the task waiting
/// for the upstream's response headers.
#[derive(Debug)]
pub struct UploadProgress {
    start: Instant,
    /// Milliseconds since `start` at which the last chunk went up.
    last_chunk_ms: AtomicU64,
    bytes: AtomicU64,
    over_limit: AtomicBool,
    client_failed: AtomicBool,
    client_stalled: AtomicBool,
}

impl UploadProgress {
    pub fn new() -> Arc<UploadProgress> {
        Arc::new(UploadProgress {
            start: Instant::now(),
            last_chunk_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            over_limit: AtomicBool::new(false),
            client_failed: AtomicBool::new(false),
            client_stalled: AtomicBool::new(false),
        })
    }

    /// When the request last showed any life: its start or its latest uploaded chunk.
    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_chunk_ms.load(Ordering::Relaxed))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }

    /// The client went silent mid-body for longer than `server.body_read_timeout`.
    pub fn client_stalled(&self) -> bool {
        self.client_stalled.load(Ordering::Relaxed)
    }
}

/// The client's request body, counted, cut at `limit` bytes, and abandoned when the client
/// goes silent for `idle_timeout` (a slow-drip upload must not hold an upstream connection).
pub struct UploadBody<S> {
    inner: S,
    limit: u64,
    seen: u64,
    progress: Arc<UploadProgress>,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    done: bool,
}

impl<S> UploadBody<S> {
    pub fn new(
        inner: S,
        limit: u64,
        idle_timeout: Duration,
        progress: Arc<UploadProgress>,
    ) -> Self {
        UploadBody {
            inner,
            limit,
            seen: 0,
            progress,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            done: false,
        }
    }
}

impl<S> Stream for UploadBody<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                let deadline = Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
                let progress = &self.progress;
                progress.bytes.store(self.seen, Ordering::Relaxed);
                let elapsed = progress.start.elapsed().as_millis();
                progress.last_chunk_ms.store(
                    u64::try_from(elapsed).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if self.seen > self.limit {
                    self.progress.over_limit.store(true, Ordering::Relaxed);
                    self.done = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "request body over the configured limit",
                    ))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.progress.client_failed.store(true, Ordering::Relaxed);
                self.done = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.progress.client_stalled.store(true, Ordering::Relaxed);
                    self.done = true;
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped sending its request body",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// An upstream failure, whichever HTTP client met it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The upstream's response body as a stream of chunks.
pub type BoxedBytes = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// The upstream's response body on its way to the client.
///
/// A gap longer than `idle_timeout` between two chunks, or an upstream error, ends the stream
/// with an error, so the server aborts the connection instead of finishing the body cleanly:
/// the client must see that the answer is incomplete. The request's log line is written when
/// this stream is dropped, with what was actually delivered.
pub struct DownloadBody {
    inner: BoxedBytes,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// The upstream's Content-Length: the server stops polling once that much is written,
    /// so reaching it is what "complete" means for such a body.
    expected_len: Option<u64>,
    done: bool,
    log: RequestLog,
}

impl DownloadBody {
    pub fn new(
        inner: BoxedBytes,
        idle_timeout: Duration,
        expected_len: Option<u64>,
        mut log: RequestLog,
    ) -> Self {
        if expected_len == Some(0) {
            log.outcome = Outcome::Complete;
        }
        DownloadBody {
            inner,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            expected_len,
            done: false,
            log,
        }
    }
}

impl Stream for DownloadBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.log.bytes_out += chunk.len() as u64;
                if let Some(tap) = self.log.usage.as_mut() {
                    tap.feed(&chunk);
                }
                if Some(self.log.bytes_out) == self.expected_len {
                    self.log.outcome = Outcome::Complete;
                }
                let deadline = Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
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
            Poll::Pending => match self.idle.as_mut().poll(cx) {
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
