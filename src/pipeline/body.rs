//! Phase 4, the body policy: the size limit that applies to a request's body and the content
//! types its route takes, decided from the head before any of the body is read; and the
//! client's upload as it streams up, counted, cut at the limit, and abandoned when the client
//! goes silent. A body is collected only when an opt-in feature must read it whole first
//! ([`read_whole`]), through the same counted upload.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap};
use tokio::time::{Instant, Sleep};

use super::error::GatewayError;
use crate::config::LimitsConfig;
use crate::headers;
use crate::routes::{BodyKind, RouteSpec};

/// A limit in force for one request, with the setting that controls it for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound<T> {
    pub value: T,
    pub setting: Setting,
}

/// Where a limit comes from: a global setting, or one route's own.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Setting {
    Global(&'static str),
    Route { index: usize, key: &'static str },
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Global(name) => f.write_str(name),
            Setting::Route { index, key } => write!(f, "routes[{index}].{key}"),
        }
    }
}

/// The body limit for a request: the route's own, else the upload limit when the route takes
/// uploads and the client is not sending JSON, else the JSON limit.
fn limit(limits: &LimitsConfig, route: &RouteSpec, headers: &HeaderMap) -> Bound<u64> {
    if let Some(value) = route.max_body {
        return Bound {
            value,
            setting: Setting::Route {
                index: route.index,
                key: "max_body",
            },
        };
    }
    let takes_uploads = route.body.iter().any(|kind| kind.is_upload());
    if takes_uploads && !sends_json(headers) {
        Bound {
            value: limits.max_upload_body,
            setting: Setting::Global("limits.max_upload_body"),
        }
    } else {
        Bound {
            value: limits.max_json_body,
            setting: Setting::Global("limits.max_json_body"),
        }
    }
}

/// Phase 4: refuses a body that cannot be sent, declared over the limit or of a content type
/// the route does not take. Returns the limit the body is held to as it streams.
pub(crate) fn check(
    limits: &LimitsConfig,
    route: &RouteSpec,
    headers: &HeaderMap,
    has_body: bool,
) -> Result<Bound<u64>, GatewayError> {
    let limit = limit(limits, route, headers);
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| headers::content_length(value.as_bytes()));
    if let Some(declared) = declared_length.filter(|len| *len > limit.value) {
        return Err(GatewayError::BodyTooLarge {
            limit: limit.value,
            setting: limit.setting.to_string(),
            declared: Some(declared),
        });
    }
    if has_body {
        let declared = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok());
        if let Some(content_type) = declared.filter(|ct| route.refuses_content_type(ct)) {
            return Err(GatewayError::UnsupportedMediaType {
                declared: content_type.chars().take(100).collect(),
                accepted: route
                    .body
                    .iter()
                    .filter(|kind| **kind != BodyKind::None)
                    .map(|kind| kind.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(limit)
}

/// The request says its body is JSON.
pub(crate) fn sends_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
}

/// A silence timer that costs nothing while data keeps coming: it is armed the first time
/// the stream has to wait, and re-armed from that moment after each chunk. A body that
/// arrives whole (most JSON answers and requests) never touches the timer wheel.
#[derive(Debug)]
pub(super) struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A chunk went by since the timer was last armed.
    stale: bool,
}

impl IdleTimer {
    pub(super) fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: None,
            stale: false,
        }
    }

    pub(super) fn saw_chunk(&mut self) {
        self.stale = true;
    }

    /// Called when the stream has nothing to give: ready once it has been silent too long.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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
pub(crate) struct UploadProgress {
    start: Instant,
    /// Milliseconds since `start` at which the last chunk went up.
    last_chunk_ms: AtomicU64,
    bytes: AtomicU64,
    over_limit: AtomicBool,
    client_failed: AtomicBool,
    client_stalled: AtomicBool,
}

impl UploadProgress {
    /// Progress of a request that began at `start`.
    pub(crate) fn starting_at(start: Instant) -> Arc<UploadProgress> {
        Arc::new(UploadProgress {
            start,
            last_chunk_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            over_limit: AtomicBool::new(false),
            client_failed: AtomicBool::new(false),
            client_stalled: AtomicBool::new(false),
        })
    }

    /// When the request last showed any life: its start or its latest uploaded chunk.
    pub(crate) fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_chunk_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    pub(crate) fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }

    /// The client went silent mid-body for longer than `server.body_read_timeout`.
    pub(crate) fn client_stalled(&self) -> bool {
        self.client_stalled.load(Ordering::Relaxed)
    }

    /// The upload failed on the client's side: over the limit, stalled or broken.
    pub(crate) fn went_wrong(&self) -> bool {
        self.over_limit() || self.client_stalled() || self.client_failed()
    }
}

/// The client's request body, counted, cut at `limit` bytes, and abandoned when the client
/// goes silent for `idle_timeout` (a slow-drip upload must not hold an upstream connection).
pub(crate) struct UploadBody<S> {
    inner: S,
    limit: u64,
    seen: u64,
    progress: Arc<UploadProgress>,
    idle: IdleTimer,
    done: bool,
}

impl<S> UploadBody<S> {
    pub(crate) fn new(
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

/// A streamed request body read whole, through its counted upload ([`UploadBody`]), so the
/// size limit and the idle timeout still hold: for `usage.inject_stream_usage`, which edits
/// it, and for traces, which name its model.
pub(crate) async fn read_whole(
    mut body: impl Stream<Item = io::Result<Bytes>> + Unpin,
) -> io::Result<Bytes> {
    let mut whole = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        whole.extend_from_slice(&chunk?);
    }
    Ok(whole.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_body_that_never_waits_never_arms_its_timer() {
        let chunks = futures_util::stream::iter([Ok(Bytes::from_static(b"{}"))]);
        let mut upload = UploadBody::new(
            chunks,
            1024,
            Duration::from_secs(5),
            UploadProgress::starting_at(Instant::now()),
        );
        while upload.next().await.is_some() {}
        assert!(upload.idle.sleep.is_none());
    }
}
