//! The fast HTTP/1 engine: plain HTTP/1.1 requests to routes without path parameters, read
//! and answered by a small engine of our own instead of poem and hyper.
//!
//! Why: the kernel's share of a forwarded request is the same for any proxy (two reads, two
//! writes); the rest is user space, where hyper's server alone spends about as much as all of
//! nginx. Here one task reads the client's request, hands it to the pipeline, and writes the
//! answer back, with nothing between.
//!
//! It is an adapter and decides nothing: every request it takes goes through the pipeline
//! ([`crate::pipeline`]) exactly as hyper's do. What it does not take is handed to hyper with
//! the bytes already read, and that connection stays with hyper: a head the narrow parser
//! does not accept ([`http1::parse_request`]), a path no parameterless route has, a body
//! over [`MAX_BODY`], or a browser's request when CORS is on.

mod exchange;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::header;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{Config, ServerConfig};
use crate::http1::{self, make_room, Parse, RequestHead, Span};
use crate::observe::metrics::Metrics;
use crate::pipeline::{Endpoint, Timer};
use crate::routes::PathTemplate;

/// Largest request body the engine takes. It reads the body whole before sending, so one
/// write carries the request; larger ones (uploads) stream through hyper.
pub(crate) const MAX_BODY: u64 = 64 * 1024;
/// The client's read buffer and the write buffer start this small and grow when a message
/// needs it: most requests and answer heads fit, and an open stream keeps less memory.
const SMALL_BUFFER: usize = 2 * 1024;
/// A buffer grown past this is replaced once empty, so one large request does not pin
/// memory for the connection's life.
const KEEP_BUFFER: usize = 64 * 1024;
/// Bytes read from a client ahead of its current request (pipelining) before the engine stops
/// reading further.
const MAX_AHEAD: usize = 128 * 1024;

/// One manifest's routes for the fast engine, for one worker.
pub(crate) struct Routes {
    /// The full request path (with the path secret in front, when there is one) of every
    /// template without parameters.
    routes: HashMap<String, Arc<Endpoint>>,
    /// The manifest they are of.
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl Routes {
    /// The fast engine's routes among `endpoints`.
    pub(crate) fn new(
        endpoints: &[(PathTemplate, Arc<Endpoint>)],
        config: &Arc<Config>,
        metrics: &Arc<Metrics>,
    ) -> Routes {
        let prefix = config
            .access
            .path_secret
            .as_ref()
            .map(|secret| format!("/{secret}"))
            .unwrap_or_default();
        let routes = endpoints
            .iter()
            .filter(|(template, _)| template.params().next().is_none())
            .map(|(template, endpoint)| (format!("{prefix}{template}"), Arc::clone(endpoint)))
            .collect();
        Routes {
            routes,
            config: Arc::clone(config),
            metrics: Arc::clone(metrics),
        }
    }

    /// Length of `/{path_secret}`, taken off the path the pipeline sees.
    fn secret_len(&self) -> usize {
        (self.config.access.path_secret)
            .as_ref()
            .map_or(0, |secret| secret.len() + 1)
    }

    /// The endpoint this request takes in the fast engine, if it does. With CORS on, a
    /// request with an `Origin` goes to hyper's engine, which adds the CORS headers.
    fn take(&self, request: &RequestHead) -> Option<&Endpoint> {
        let cors = !self.config.cors.allow_origins.is_empty();
        if request.body_len > MAX_BODY || (cors && request.headers.contains_key(header::ORIGIN)) {
            return None;
        }
        self.routes
            .get(request.target.path())
            .map(|endpoint| &**endpoint)
    }
}

/// How a connection left the fast engine.
pub(crate) enum Ended {
    /// Closed, or to be closed.
    Closed,
    /// For hyper from here on, with what was read of the request it is to serve first.
    Handover(BytesMut),
}

/// The server's "stop taking requests": connections close when idle, and answer the
/// request in flight with `Connection: close`.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    started: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Drain {
    pub(crate) fn start(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Serves `client` until it closes or a request must go to hyper. `routes` gives the routes
/// of the manifest in force for each new request (`None`: hand over).
pub(crate) async fn serve(
    client: &mut TcpStream,
    remote: SocketAddr,
    settings: &ServerConfig,
    drain: &Drain,
    routes: impl Fn() -> Option<Arc<Routes>>,
) -> Ended {
    // Registered once for the connection's life: waiting on it costs no registration per
    // request.
    let mut drained = std::pin::pin!(drain.notify.notified());
    drained.as_mut().enable();
    let mut conn = ClientConnection {
        client,
        remote,
        buf: BytesMut::with_capacity(SMALL_BUFFER),
        out: BytesMut::with_capacity(SMALL_BUFFER),
        spans: Vec::new(),
    };
    let sleep = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut timer = Timer::new(sleep);
    loop {
        if drain.started() && conn.buf.is_empty() {
            return Ended::Closed;
        }
        let head = match conn.read_head(settings, drained.as_mut(), &mut timer).await {
            Ok(head) => head,
            Err(ended) => return ended,
        };
        let Some(routes) = routes() else {
            tracing::trace!("fast engine: off in the manifest now in force; handing over");
            return Ended::Handover(conn.unread(head));
        };
        let Some(endpoint) = routes.take(&head) else {
            tracing::trace!(
                "fast engine: not one of its routes, or CORS or a large body; handing over"
            );
            return Ended::Handover(conn.unread(head));
        };
        let close = head.close || drain.started();
        routes.metrics.count_fast_engine_request();
        let keep = conn
            .exchange(&routes, endpoint, head, close, &mut timer)
            .await;
        if !keep || close {
            return Ended::Closed;
        }
        conn.trim();
    }
}

/// One client connection in the fast engine.
struct ClientConnection<'c> {
    client: &'c mut TcpStream,
    remote: SocketAddr,
    /// What the client sent and the engine has not used yet.
    buf: BytesMut,
    /// What goes out to the client next.
    out: BytesMut,
    /// Scratch space of the head parser.
    spans: Vec<Span>,
}

impl ClientConnection<'_> {
    /// Waits for the next request head: `Err` when the connection ends or goes to hyper.
    async fn read_head(
        &mut self,
        settings: &ServerConfig,
        mut drained: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        timer: &mut Timer<'_>,
    ) -> Result<RequestHead, Ended> {
        let max_header_bytes = usize::try_from(settings.max_header_bytes).unwrap_or(usize::MAX);
        let mut deadline = None;
        loop {
            match http1::parse_request(&mut self.buf, &mut self.spans) {
                // A head over the limit that arrived whole: hyper answers it 431, as it
                // would one that arrives in pieces.
                Parse::Complete(parsed) if parsed.raw.len() > max_header_bytes => {
                    return Err(Ended::Handover(self.unread(parsed)));
                }
                Parse::Complete(parsed) => return Ok(parsed),
                Parse::Refer => {
                    tracing::trace!("fast engine: a head for hyper's parser; handing over");
                    return Err(Ended::Handover(std::mem::take(&mut self.buf)));
                }
                Parse::Partial if self.buf.len() >= max_header_bytes => {
                    // hyper answers 431.
                    return Err(Ended::Handover(std::mem::take(&mut self.buf)));
                }
                Parse::Partial => {}
            }
            // From the moment the engine waits for a head, as hyper's header_read_timeout.
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + settings.header_read_timeout);
            let idle = self.buf.is_empty();
            make_room(&mut self.buf, SMALL_BUFFER);
            tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(Ended::Closed),
                    Ok(_) => {}
                },
                () = timer.expired(deadline) => return Err(Ended::Closed),
                // A draining server closes connections between requests.
                () = drained.as_mut(), if idle => return Err(Ended::Closed),
            }
        }
    }

    /// Gives a head back for hyper: its bytes, then whatever followed.
    fn unread(&mut self, head: RequestHead) -> BytesMut {
        http1::rejoin(&head.raw, &self.buf)
    }

    /// Lets go of buffers one large message grew.
    fn trim(&mut self) {
        for buf in [&mut self.buf, &mut self.out] {
            if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
                *buf = BytesMut::with_capacity(SMALL_BUFFER);
            }
        }
    }
}
