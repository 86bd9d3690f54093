//! Relaying one realtime session: frames both ways, unchanged, until either side closes.
//!
//! Each direction forwards one message at a time and waits until it is written, so a slow
//! reader slows the other side's reads (backpressure) and memory stays near one message per
//! direction. Close frames pass with their code and reason; a side that fails or vanishes
//! gets the other side closed with a fitting code; silence past `realtime.idle_timeout` and
//! the end of the shutdown grace close both sides with 1001.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// The upstream connection: plain TCP for ws://, TLS for wss://, perhaps through a proxy.
pub(super) type UpstreamIo = Box<dyn crate::message::Io>;

/// How long a closing side may take to answer a close frame before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What ended a session, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    ClientClosed,
    UpstreamClosed,
    ClientGone,
    UpstreamGone,
    IdleTimeout,
    Shutdown,
}

impl Ending {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Ending::ClientClosed => "client_closed",
            Ending::UpstreamClosed => "upstream_closed",
            Ending::ClientGone => "client_gone",
            Ending::UpstreamGone => "upstream_gone",
            Ending::IdleTimeout => "idle_timeout",
            Ending::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug)]
pub(super) struct Summary {
    pub ending: Ending,
    pub from_client: u64,
    pub from_upstream: u64,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
}

/// How one direction stopped.
enum PumpEnd {
    /// The source sent a close frame; it was passed on.
    Closed,
    /// The source failed or ended without a close frame.
    SourceGone,
    /// Writing to the destination failed.
    DestinationGone,
}

#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// Milliseconds since the session began at which a frame last moved, either way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Forwards `from`'s messages to `to`, one at a time, each shown to `watch` first.
async fn pump<A, B>(
    from: &mut SplitStream<WebSocketStream<A>>,
    to: &mut SplitSink<WebSocketStream<B>, Message>,
    activity: &Activity,
    counters: &Counters,
    watch: &(dyn Fn(&Message) + Sync),
) -> PumpEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = from.next().await {
        let message = match message {
            Ok(message) => message,
            Err(_) => return PumpEnd::SourceGone,
        };
        activity.touch();
        watch(&message);
        let closing = matches!(message, Message::Close(_));
        if !closing {
            counters.messages.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(message.len() as u64, Ordering::Relaxed);
        }
        if to.send(message).await.is_err() {
            return if closing {
                PumpEnd::Closed
            } else {
                PumpEnd::DestinationGone
            };
        }
        if closing {
            return PumpEnd::Closed;
        }
    }
    PumpEnd::SourceGone
}

/// Resolves once nothing has moved for `idle`.
async fn idle_for(activity: &Activity, idle: Duration) {
    loop {
        let deadline = activity.last() + idle;
        tokio::time::sleep_until(deadline).await;
        if activity.last() + idle <= Instant::now() {
            return;
        }
    }
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Reads what is left of a closing side until it ends, so its close handshake completes.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut SplitStream<WebSocketStream<S>>) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

enum First {
    FromClient(PumpEnd),
    FromUpstream(PumpEnd),
    Idle,
    Shutdown,
}

pub(super) async fn run<C>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<UpstreamIo>,
    idle: Duration,
    closing: CancellationToken,
    watch_upstream: &(dyn Fn(&Message) + Sync),
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = Counters::default();
    let down = Counters::default();

    let first = {
        let client_to_upstream = pump(&mut client_rx, &mut upstream_tx, &activity, &up, &|_| {});
        let upstream_to_client = pump(
            &mut upstream_rx,
            &mut client_tx,
            &activity,
            &down,
            watch_upstream,
        );
        tokio::select! {
            end = client_to_upstream => First::FromClient(end),
            end = upstream_to_client => First::FromUpstream(end),
            () = idle_for(&activity, idle) => First::Idle,
            () = closing.cancelled() => First::Shutdown,
        }
    };

    let ending = match first {
        First::FromClient(PumpEnd::Closed) => {
            // The upstream got the client's close frame; let it answer, then finish the
            // client's side (tungstenite has queued its close reply).
            drain(&mut upstream_rx).await;
            let _ = client_tx.close().await;
            Ending::ClientClosed
        }
        First::FromUpstream(PumpEnd::Closed) => {
            drain(&mut client_rx).await;
            let _ = upstream_tx.close().await;
            Ending::UpstreamClosed
        }
        First::FromClient(PumpEnd::SourceGone) | First::FromUpstream(PumpEnd::DestinationGone) => {
            let _ = upstream_tx
                .send(close(CloseCode::Away, "the client went away"))
                .await;
            drain(&mut upstream_rx).await;
            Ending::ClientGone
        }
        First::FromUpstream(PumpEnd::SourceGone) | First::FromClient(PumpEnd::DestinationGone) => {
            let _ = client_tx
                .send(close(CloseCode::Error, "the upstream connection failed"))
                .await;
            drain(&mut client_rx).await;
            Ending::UpstreamGone
        }
        First::Idle => {
            close_both(
                &mut client_tx,
                &mut upstream_tx,
                "idle past realtime.idle_timeout",
            )
            .await;
            Ending::IdleTimeout
        }
        First::Shutdown => {
            close_both(
                &mut client_tx,
                &mut upstream_tx,
                "the gateway is shutting down",
            )
            .await;
            Ending::Shutdown
        }
    };
    Summary {
        ending,
        from_client: up.messages.load(Ordering::Relaxed),
        from_upstream: down.messages.load(Ordering::Relaxed),
        bytes_from_client: up.bytes.load(Ordering::Relaxed),
        bytes_from_upstream: down.bytes.load(Ordering::Relaxed),
    }
}

async fn close_both<C, U>(
    client: &mut SplitSink<WebSocketStream<C>, Message>,
    upstream: &mut SplitSink<WebSocketStream<U>, Message>,
    reason: &'static str,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        futures_util::future::join(
            client.send(close(CloseCode::Away, reason)),
            upstream.send(close(CloseCode::Away, reason)),
        ),
    )
    .await;
}
