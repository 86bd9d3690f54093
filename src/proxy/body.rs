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

use crate::proxy::log::{Outcome, RequestLog};

/// A silence timer that costs nothing while data keeps coming: it is armed the first time
/// the stream has to wait, and re-armed from that moment after each chunk. A body that
/// arrives whole (most JSON answers and requests) never touches the timer wheel.
#[derive(Debug)]
struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A chunk went by since the timer was last armed.
    stale: bool,
}

impl IdleTimer {
    fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: None,
            stale: false,
        }
    }

    fn saw_chunk(&mut self) {
        self.stale = true;
    }

    /// Called when the stream has nothing to give: ready once it has been silent too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if std::mem::take(&mut self.stale) {
            sleep.as_mut().reset(Instant::now() + timeout);
        }
        sleep.as_mut().poll(cx)
    }
}

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
        UploadProgress::starting_at(Instant::now())
    }

    /// Progress of a request that began at `start`.
    pub fn starting_at(start: Instant) -> Arc<UploadProgress> {
        Arc::new(UploadProgress {
            start,
            last_chunk_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            over_limit: AtomicBool::new(false),
            client_failed: AtomicBool::new(false),
            client_stalled: AtomicBool::new(false),
        })
    }

    /// Records a body that arrived whole before the request went upstream (its last
    /// activity stays the start: nothing waits on it afterwards).
    pub fn record_whole(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
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
    idle: IdleTimer,
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
            idle: IdleTimer::new(idle_timeout),
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
                self.idle.saw_chunk();
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
            Poll::Pending => match self.idle.poll_expired(cx) {
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
/// The upstream's response body as a stream of chunks, whichever client brought it.
pub enum UpstreamChunks {
    /// hyper's body, read frame by frame: the common transport, held without a box.
    Direct(http_body_util::BodyDataStream<hyper::body::Incoming>),
    /// reqwest's, whose stream type has no name.
    Proxied(Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>),
}

impl Stream for UpstreamChunks {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            UpstreamChunks::Direct(body) => Pin::new(body)
                .poll_next(cx)
                .map_err(|err| Box::new(err) as BoxError),
            UpstreamChunks::Proxied(chunks) => chunks.as_mut().poll_next(cx),
        }
    }
}

/// The upstream's response body on its way to the client.
///
/// A gap longer than `idle_timeout` between two chunks, or an upstream error, ends the stream
/// with an error, so the server aborts the connection instead of finishing the body cleanly:
/// the client must see that the answer is incomplete. The request's log line is written when
/// this stream is dropped, with what was actually delivered.
pub struct DownloadBody {
    inner: UpstreamChunks,
    idle: IdleTimer,
    /// The upstream's Content-Length: the server stops polling once that much is written,
    /// so reaching it is what "complete" means for such a body.
    expected_len: Option<u64>,
    done: bool,
    log: RequestLog,
}

impl DownloadBody {
    pub fn new(
        inner: UpstreamChunks,
        idle_timeout: Duration,
        expected_len: Option<u64>,
        mut log: RequestLog,
    ) -> Self {
        if expected_len == Some(0) {
            log.outcome = Outcome::Complete;
        }
        DownloadBody {
            inner,
            idle: IdleTimer::new(idle_timeout),
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_body_that_never_waits_never_arms_its_timer() {
        let chunks = futures_util::stream::iter([Ok(Bytes::from_static(b"{}"))]);
        let mut upload =
            UploadBody::new(chunks, 1024, Duration::from_secs(5), UploadProgress::new());
        while upload.next().await.is_some() {}
        assert!(upload.idle.sleep.is_none());
    }
}
