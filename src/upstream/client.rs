//! The general transport: hyper-util's pooled client over [`Connector`], for HTTPS (HTTP/2
//! by ALPN where the upstream offers it), proxies, and bodies that stream.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderMap, Method, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy;
use hyper_util::client::legacy::connect::{capture_connection, CaptureConnection};
use tokio::sync::watch;

use super::connect::Connector;
use super::{SendError, Stage, POOL_IDLE_TIMEOUT};
use crate::message::Chunks;

/// hyper's pooled clients, one per HTTP/2 connection, each carrying at most `max_streams`
/// requests at once.
///
/// Why several: one hyper client sends every request to an origin on a single HTTP/2
/// connection, and holds back those beyond the server's stream limit (often 100 to 256)
/// until others end (RFC 9113 §9.1 asks a client for one connection). A gateway's streams
/// last minutes, so it opens another connection, with another client, instead.
pub(super) struct Client {
    connector: Connector,
    max_idle: usize,
    /// Requests a connection carries at once: `upstream.http2_max_concurrent_streams` when
    /// HTTP/2 may be spoken, else no limit (HTTP/1.1 takes a connection per request anyway).
    max_streams: usize,
    /// The last answer came over HTTP/1.1 (the upstream offers no HTTP/2): one client, so
    /// `max_idle` bounds the idle connections as it does for the raw transport.
    spoke_http1: AtomicBool,
    connections: Mutex<Vec<Multiplexed>>,
}

/// One hyper client, so one HTTP/2 connection, and the requests it carries now.
struct Multiplexed {
    client: legacy::Client<Connector, Chunks>,
    open: Arc<AtomicUsize>,
    /// Its first request has been sent.
    opened: bool,
    /// Its first request has its connection (or gave up). Until then the requests after it
    /// wait, and then share that connection: hyper-util, not knowing yet that the upstream
    /// speaks HTTP/2, opens one for each waiting request (3,800 for a burst of 8,000
    /// streams, whose memory the process kept after they closed).
    connected: Arc<watch::Sender<bool>>,
}

impl Client {
    /// A client keeping at most `max_idle` idle connections per hyper client
    /// (`upstream.max_idle_connections`), and `max_streams` requests on each connection.
    pub(super) fn new(connector: Connector, max_idle: usize, max_streams: usize) -> Client {
        Client {
            connector,
            max_idle,
            max_streams: max_streams.max(1),
            spoke_http1: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        }
    }

    /// Starts one request; the future resolves to the answer's status, headers and body.
    /// Synchronous up to the wait, so that what waits holds only hyper's (boxed) future.
    pub(super) fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Chunks,
    ) -> Sending {
        let mut request = http::Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        // Nothing in here can panic while the lock is held, so a poisoned lock is still sound.
        let mut connections = (self.connections.lock()).unwrap_or_else(PoisonError::into_inner);
        let max_streams = if self.spoke_http1.load(Ordering::Relaxed) {
            usize::MAX
        } else {
            self.max_streams
        };
        // The first connection with room: earlier ones fill first, so later ones drain and
        // close when idle.
        let index = match connections
            .iter()
            .position(|connection| connection.open.load(Ordering::Relaxed) < max_streams)
        {
            Some(index) => index,
            None => {
                connections.push(self.connection());
                connections.len() - 1
            }
        };
        let connection = &mut connections[index];
        let turn = if !connection.opened {
            connection.opened = true;
            Turn::Opens(Box::new(Opening {
                capture: capture_connection(&mut request),
                connected: Arc::clone(&connection.connected),
            }))
        } else if *connection.connected.borrow() {
            Turn::Go
        } else {
            Turn::After(connection.connected.subscribe())
        };
        let slot = Slot::take(&connection.open);
        Sending {
            future: connection.client.request(request),
            slot,
            turn,
        }
    }

    /// Notes the protocol an answer came in: several connections matter only while it is
    /// HTTP/2.
    pub(super) fn answered_in(&self, version: http::Version) {
        let http1 = version < http::Version::HTTP_2;
        if self.spoke_http1.load(Ordering::Relaxed) != http1 {
            self.spoke_http1.store(http1, Ordering::Relaxed);
        }
    }

    fn connection(&self) -> Multiplexed {
        let client = legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(self.max_idle)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(self.connector.clone());
        Multiplexed {
            client,
            open: Arc::new(AtomicUsize::new(0)),
            opened: false,
            connected: Arc::new(watch::Sender::new(false)),
        }
    }
}

/// When a request may go: at once, after its connection's first request has its connection,
/// or as that first request.
enum Turn {
    Go,
    After(watch::Receiver<bool>),
    /// Boxed: one request in a hundred carries it.
    Opens(Box<Opening>),
}

/// The first request of a connection, which tells the others when its connection is there.
struct Opening {
    capture: CaptureConnection,
    connected: Arc<watch::Sender<bool>>,
}

impl Opening {
    /// Sends the first request; the others go once it has its connection. hyper-util pools an
    /// HTTP/2 connection before it tells, so they find it there.
    async fn send(
        mut self,
        future: legacy::ResponseFuture,
    ) -> Result<http::Response<Incoming>, legacy::Error> {
        let mut future = std::pin::pin!(future);
        // What it resolves to borrows a lock: dropped here, before any wait.
        let connected = async {
            let _connection = self.capture.wait_for_connection_metadata().await;
        };
        tokio::select! {
            answer = &mut future => answer,
            () = connected => {
                self.connected.send_replace(true);
                future.await
            }
        }
    }
}

impl Drop for Opening {
    /// Answered, failed or cancelled: the others never wait longer than the first request.
    fn drop(&mut self) {
        self.connected.send_replace(true);
    }
}

/// A request's place on its connection, from its start until its answer's body is dropped.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::Relaxed);
        Slot(Arc::clone(open))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request sent by the pooled client, waiting for the answer's head.
pub(super) struct Sending {
    future: legacy::ResponseFuture,
    slot: Slot,
    turn: Turn,
}

impl Sending {
    /// The answer, with the request's slot: hold it as long as the answer's body.
    pub(super) async fn response(self) -> Result<(http::Response<Incoming>, Slot), SendError> {
        let Sending { future, slot, turn } = self;
        let answer = match turn {
            Turn::Go => future.await,
            Turn::After(mut connected) => {
                // The sender lives in the client's list, which outlives the request.
                let _ = connected.wait_for(|connected| *connected).await;
                future.await
            }
            Turn::Opens(opening) => Box::pin(opening.send(future)).await,
        };
        match answer {
            Ok(response) => Ok((response, slot)),
            Err(err) => {
                let stage = if err.is_connect() {
                    Stage::Connect
                } else {
                    Stage::Exchange
                };
                Err(SendError::new(stage, Box::new(err)))
            }
        }
    }
}
