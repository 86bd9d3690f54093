//! The fast lane: plain HTTP/1.1 requests to routes without path parameters, forwarded to a
//! plain `http://` upstream by a small HTTP/1 engine of our own instead of poem and hyper.
//!
//! Why: the kernel's share of a forwarded request is the same for any proxy (two reads, two
//! writes); the rest is user space, where hyper's server and pooled client alone spend about
//! twice what nginx spends in all. Here one task reads the client's request, writes it on an
//! upstream connection it holds, reads the answer and writes it back, with nothing between.
//!
//! What it shares with the hyper path is everything that decides: the manifest's routes, IP
//! and key checks, limits, body limits and content types, header rules, the usage tap,
//! metrics and the log line all come from the same functions. What it does not take is
//! handed to hyper with the bytes already read, and that connection stays with hyper: a head
//! the narrow parser does not accept ([`wire::parse_request`]), a route with parameters or
//! one for WebSockets, a path or method no lane route has (hyper's path answers 404 and 405),
//! a body over [`MAX_BODY`], or a browser's request when CORS is on.

pub mod pool;
pub mod wire;

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{header, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::{Forwarder, MethodRoute, TemplateEndpoint};
use crate::error::GatewayError;
use crate::observe::metrics::Metrics;
use crate::proxy::log::{Outcome, RequestLog};
use wire::{ClientFraming, Framing, Parse, Step};

/// Largest request body the lane takes. It reads the body whole before sending, so one
/// write carries the request; larger ones (uploads) stream through hyper's path.
pub const MAX_BODY: u64 = 64 * 1024;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The upstream read buffer starts at this size, and reads from a client are made with at
/// least this much room.
const BUFFER: usize = 8 * 1024;
/// The client's read buffer and the write buffer start this small and grow when a message
/// needs it: most requests and answer heads fit, and an open stream keeps less memory.
const SMALL_BUFFER: usize = 2 * 1024;
/// A buffer grown past this is replaced once empty, so one large request does not pin
/// memory for the connection's life.
const KEEP_BUFFER: usize = 64 * 1024;
/// Bytes read from a client ahead of its current request (pipelining) before the lane stops
/// reading further.
const MAX_AHEAD: usize = 128 * 1024;

/// One manifest's lane routes for one worker.
pub struct Lane {
    /// The full request path (with the path secret in front, when there is one) of every
    /// route without parameters.
    routes: HashMap<String, Arc<TemplateEndpoint>>,
    /// Length of `/{path_secret}`, taken off the path before it goes upstream.
    secret_len: usize,
    metrics: Arc<Metrics>,
    forwarder: Arc<Forwarder>,
    /// CORS is on: requests with an `Origin` go to hyper's path, which adds its headers.
    cors: bool,
}

impl Lane {
    /// The lane for a manifest, or `None` when its upstream cannot take it (HTTPS, or
    /// reached through a proxy).
    pub fn new(
        templates: Vec<Arc<TemplateEndpoint>>,
        config: &crate::Config,
        metrics: &Arc<Metrics>,
        forwarder: &Arc<Forwarder>,
    ) -> Option<Lane> {
        forwarder.lane.as_ref()?;
        let prefix = config
            .access
            .path_secret
            .as_ref()
            .map(|secret| format!("/{secret}"))
            .unwrap_or_default();
        let routes = templates
            .into_iter()
            .filter(|template| !template.has_params())
            .map(|template| (format!("{prefix}{}", template.template()), template))
            .collect();
        Some(Lane {
            routes,
            secret_len: prefix.len(),
            metrics: Arc::clone(metrics),
            forwarder: Arc::clone(forwarder),
            cors: !config.cors.allow_origins.is_empty(),
        })
    }
}

/// How a connection left the lane.
pub enum Ended {
    /// Closed, or to be closed.
    Closed,
    /// For hyper from here on, with what was read of the request it is to serve first.
    Handover(BytesMut),
}

/// The server's "stop taking requests": lane connections close when idle, and answer the
/// request in flight with `Connection: close`.
#[derive(Debug, Default)]
pub struct Drain {
    started: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Drain {
    pub fn start(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What a lane connection needs from the server.
pub struct Settings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `client` in the lane until it closes or a request must go to hyper. `lane` gives
/// the lane of the manifest in force for each new request (`None`: hand over).
pub async fn serve(
    client: &mut TcpStream,
    remote: SocketAddr,
    settings: &Settings,
    drain: &Drain,
    lane: impl Fn() -> Option<Arc<Lane>>,
) -> Ended {
    // Registered once for the connection's life: waiting on it costs no registration per
    // request.
    let drained = drain.notify.notified();
    tokio::pin!(drained);
    drained.as_mut().enable();
    let mut conn = Conn {
        client,
        remote,
        buf: BytesMut::with_capacity(SMALL_BUFFER),
        out: BytesMut::with_capacity(SMALL_BUFFER),
        upstream_buf: BytesMut::with_capacity(BUFFER),
        spans: Vec::new(),
    };
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut timer = Timer { sleep, armed: None };
    loop {
        if drain.started() && conn.buf.is_empty() {
            return Ended::Closed;
        }
        let head = match conn.read_head(settings, drained.as_mut(), &mut timer).await {
            Ok(head) => head,
            Err(ended) => return ended,
        };
        let Some(lane) = lane() else {
            tracing::trace!("fast lane: off in the manifest now in force; handing over");
            return Ended::Handover(conn.unread(head));
        };
        let Some(route) = lane.take(&head) else {
            tracing::trace!("fast lane: not a lane route, or CORS or a large body; handing over");
            return Ended::Handover(conn.unread(head));
        };
        let close = head.close || drain.started();
        let keep = conn.exchange(&lane, route, head, close, &mut timer).await;
        if !keep || close {
            return Ended::Closed;
        }
        conn.trim();
    }
}

impl Lane {
    /// The route this request takes in the lane, if it does.
    fn take(&self, request: &wire::RequestHead) -> Option<(&TemplateEndpoint, &MethodRoute)> {
        if request.body_len > MAX_BODY
            || (self.cors && request.headers.contains_key(header::ORIGIN))
        {
            return None;
        }
        let template = self.routes.get(request.target.path())?;
        let route = template.lane_route(&request.method)?;
        Some((template, route))
    }
}

struct Conn<'c> {
    client: &'c mut TcpStream,
    remote: SocketAddr,
    /// What the client sent and the lane has not used yet.
    buf: BytesMut,
    /// What goes out next, to either side.
    out: BytesMut,
    /// What the upstream sent.
    upstream_buf: BytesMut,
    /// Scratch space of the head parsers.
    spans: Vec<wire::Span>,
}

/// Why an exchange stopped before the answer's head went out.
enum Failed {
    /// Answer the client with this error.
    Answer(GatewayError),
    /// The client went away, or cannot be written to: nothing to answer.
    ClientGone,
}

impl Conn<'_> {
    /// Waits for the next request head: `Err` when the connection ends or goes to hyper.
    async fn read_head(
        &mut self,
        settings: &Settings,
        mut drained: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        timer: &mut Timer<'_>,
    ) -> Result<wire::RequestHead, Ended> {
        let mut deadline = None;
        loop {
            match wire::parse_request(&mut self.buf, &mut self.spans) {
                // A head over the limit that arrived whole: hyper answers it 431, as it
                // would one that arrives in pieces.
                Parse::Complete(parsed) if parsed.raw.len() > settings.max_header_bytes => {
                    return Err(Ended::Handover(self.unread(parsed)));
                }
                Parse::Complete(parsed) => return Ok(parsed),
                Parse::Refer => {
                    tracing::trace!("fast lane: a head for hyper's parser; handing over");
                    return Err(Ended::Handover(std::mem::take(&mut self.buf)));
                }
                Parse::Partial if self.buf.len() >= settings.max_header_bytes => {
                    // hyper answers 431.
                    return Err(Ended::Handover(std::mem::take(&mut self.buf)));
                }
                Parse::Partial => {}
            }
            // From the moment the lane waits for a head, as hyper's header_read_timeout.
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + settings.header_read_timeout);
            let idle = self.buf.is_empty();
            make_room(&mut self.buf, SMALL_BUFFER / 2);
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
    fn unread(&mut self, head: wire::RequestHead) -> BytesMut {
        wire::rejoin(&head.raw, &self.buf)
    }

    /// Lets go of buffers one large message grew.
    fn trim(&mut self) {
        for (buf, size) in [
            (&mut self.buf, SMALL_BUFFER),
            (&mut self.out, SMALL_BUFFER),
            (&mut self.upstream_buf, BUFFER),
        ] {
            if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
                *buf = BytesMut::with_capacity(size);
            }
        }
    }

    /// One request through the lane, from policy to the last byte of the answer. Returns
    /// whether the client connection can carry another request.
    async fn exchange(
        &mut self,
        lane: &Lane,
        (template, route): (&TemplateEndpoint, &MethodRoute),
        head: wire::RequestHead,
        close: bool,
        timer: &mut Timer<'_>,
    ) -> bool {
        let start = Instant::now();
        lane.metrics.count_lane_request();
        let wire::RequestHead {
            method,
            target,
            headers,
            body_len,
            ..
        } = head;

        // The same checks, in the same order, as the hyper path.
        let forwarder = &lane.forwarder;
        if let Err(err) = forwarder.access.check_ip(Some(self.remote.ip()), &headers) {
            let response = crate::access::rejected_address(&lane.metrics, &method, &err);
            return self.answer_error(response, body_len, close).await;
        }
        let admitted = match template.admit_route(route, &headers, Some(self.remote), start) {
            Ok(admitted) => admitted,
            Err(err) => {
                let response = template.reject(&method, start, &err);
                return self.answer_error(response, body_len, close).await;
            }
        };
        // The declared length is the body's, so holding it to the limit here is the whole
        // check (hyper's path also counts the bytes as they stream).
        if let Err(err) = forwarder.check_body(&route.spec, &headers, body_len > 0) {
            let response = template.reject(&method, start, &err);
            return self.answer_error(response, body_len, close).await;
        }
        let progress = super::body::UploadProgress::starting_at(start);
        // The whole body, before anything goes upstream.
        if let Err(failed) = self
            .read_body(body_len, forwarder.body_read_timeout, timer)
            .await
        {
            return match failed {
                Failed::Answer(err) => {
                    let response = template.reject(&method, start, &err);
                    self.answer_error(response, body_len, true).await
                }
                Failed::ClientGone => false,
            };
        }
        progress.record_whole(body_len);

        let Some(upstream) = forwarder.lane.as_ref() else {
            return false;
        };
        let path = target.as_str();
        let path = path.get(lane.secret_len..).unwrap_or(path);
        self.out.clear();
        wire::write_request_head(
            &mut self.out,
            &method,
            &upstream.path,
            path,
            &upstream.host,
            &headers,
        );
        drop(headers);
        // `read_body` made sure the whole body is here.
        let body_len = usize::try_from(body_len).unwrap_or(usize::MAX);
        let Some(body) = self.buf.get(..body_len) else {
            return false;
        };
        self.out.extend_from_slice(body);
        self.buf.advance(body_len);

        let route_metrics = admitted.metrics;
        let in_flight = route_metrics.all().in_flight();
        let read_timeout = forwarder.read_timeout(admitted.route);
        let sent = Instant::now();
        let answer = self.send(upstream, read_timeout, sent, timer).await;
        let (mut upstream_conn, response) = match answer {
            Ok(answer) => answer,
            Err(Failed::ClientGone) => return false,
            Err(Failed::Answer(err)) => {
                if let Some(kind) = super::upstream_error_kind(&err) {
                    route_metrics.count_upstream_error(kind);
                }
                let response = template.reject(&method, start, &err);
                return self.answer_error(response, 0, close).await;
            }
        };
        let answered = Instant::now();
        let upstream_ttfb = answered - sent;
        route_metrics.observe_upstream_ttfb(upstream_ttfb);

        let wire::ResponseHead {
            status,
            fields,
            framing,
            reusable,
        } = response;
        let answer = super::AnswerHead::new(
            fields.get(&header::CONTENT_TYPE),
            fields.value(&super::X_REQUEST_ID),
        );
        let log = super::open_log(
            admitted,
            method,
            status,
            answer,
            upstream_ttfb,
            progress,
            in_flight,
        );
        route_metrics.count_status(status.as_u16());
        route_metrics.observe_response_headers(answered - start);

        let client_framing = match framing {
            Framing::Empty => ClientFraming::Empty,
            Framing::Length(len) => ClientFraming::Length(len),
            Framing::Chunked | Framing::UntilClose => ClientFraming::Chunked,
        };
        self.out.clear();
        wire::write_response_head(&mut self.out, status, fields.iter(), client_framing, close);
        self.spans = fields.into_spans();
        let relayed = self
            .relay_body(&mut upstream_conn, framing, log, read_timeout.value, timer)
            .await;
        match relayed {
            Relayed::Complete => {
                if reusable && self.upstream_buf.is_empty() {
                    upstream.pool.checkin(upstream_conn, answered);
                }
                self.upstream_buf.clear();
                true
            }
            Relayed::Aborted => {
                self.upstream_buf.clear();
                false
            }
        }
    }

    /// Reads the rest of a `len`-byte body into `buf`, allowing the client
    /// `server.body_read_timeout` of silence.
    async fn read_body(
        &mut self,
        len: u64,
        idle: Duration,
        timer: &mut Timer<'_>,
    ) -> Result<(), Failed> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            let deadline = Instant::now() + idle;
            tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(Failed::ClientGone),
                    Ok(_) => {}
                },
                () = timer.expired(deadline) => {
                    return Err(Failed::Answer(GatewayError::ClientBodyTimeout { timeout: idle }));
                }
            }
        }
        Ok(())
    }

    /// Writes the request in `out` upstream and reads the answer's head. A pooled connection
    /// that turns out closed when written to is replaced once: the upstream saw nothing.
    async fn send(
        &mut self,
        upstream: &LaneUpstream,
        read_timeout: super::Bound<Duration>,
        sent: Instant,
        timer: &mut Timer<'_>,
    ) -> Result<(TcpStream, wire::ResponseHead), Failed> {
        let mut stream = match upstream.pool.checkout(sent) {
            Some(stream) => match stream_write(&stream, &self.out).await {
                Ok(()) => {
                    tracing::trace!("fast lane: request sent on a pooled upstream connection");
                    Some(stream)
                }
                Err(err) => {
                    tracing::trace!(error = %err, "fast lane: pooled connection closed; connecting");
                    None
                }
            },
            None => None,
        };
        if stream.is_none() {
            let fresh = upstream.pool.connect().await.map_err(|err| {
                Failed::Answer(match err {
                    pool::ConnectError::TimedOut(timeout) => {
                        GatewayError::UpstreamConnectTimeout { timeout }
                    }
                    pool::ConnectError::Failed(err) => {
                        GatewayError::UpstreamUnreachable(Box::new(err))
                    }
                })
            })?;
            stream_write(&fresh, &self.out)
                .await
                .map_err(|err| Failed::Answer(GatewayError::UpstreamFailed(Box::new(err))))?;
            tracing::trace!("fast lane: request sent on a new upstream connection");
            stream = Some(fresh);
        }
        let Some(mut stream) = stream else {
            return Err(Failed::ClientGone);
        };
        self.upstream_buf.clear();
        let deadline = sent + read_timeout.value;
        loop {
            match wire::parse_response(&mut self.upstream_buf, &mut self.spans) {
                Ok(Some(head)) if head.status.is_informational() => continue,
                Ok(Some(head)) => {
                    tracing::trace!(status = head.status.as_u16(), framing = ?head.framing, "fast lane: response head");
                    return Ok((stream, head));
                }
                Ok(None) if self.upstream_buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(upstream_failed(wire::BadResponse::TooLarge(
                        MAX_RESPONSE_HEAD,
                    )));
                }
                Ok(None) => {}
                Err(err) => return Err(upstream_failed(err)),
            }
            make_room(&mut self.upstream_buf, BUFFER / 2);
            let read = tokio::select! {
                biased;
                read = stream.read_buf(&mut self.upstream_buf) => read,
                () = client_gone(self.client, &mut self.buf) => return Err(Failed::ClientGone),
                () = timer.expired(deadline) => {
                    return Err(Failed::Answer(GatewayError::UpstreamTimeout {
                        setting: read_timeout.setting.to_string(),
                        timeout: read_timeout.value,
                    }));
                }
            };
            match read {
                Ok(0) => {
                    return Err(upstream_failed(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before answering",
                    )))
                }
                Ok(_) => {}
                Err(err) => return Err(upstream_failed(err)),
            }
        }
    }

    /// Streams the answer's body to the client after the head waiting in `out`, chunk by
    /// chunk as it arrives, feeding the usage tap and the log line.
    async fn relay_body(
        &mut self,
        upstream: &mut TcpStream,
        framing: Framing,
        mut log: RequestLog,
        idle: Duration,
        timer: &mut Timer<'_>,
    ) -> Relayed {
        let mut remaining = match framing {
            Framing::Length(len) => len,
            _ => 0,
        };
        let mut chunked = wire::Chunked::default();
        let mut done = match framing {
            Framing::Empty | Framing::Length(0) => true,
            Framing::Length(_) | Framing::Chunked | Framing::UntilClose => false,
        };
        let mut eof = false;
        loop {
            // Move what the upstream sent so far into `out`, framed for the client.
            match framing {
                Framing::Empty => {}
                Framing::Length(_) => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.upstream_buf.len());
                    let data = &self.upstream_buf[..take];
                    log.saw(data);
                    // The head (the first time) and the data in one `writev`, as they are.
                    let written = write_two(self.client, &self.out, data).await;
                    self.out.clear();
                    if written.is_err() {
                        return Relayed::Aborted;
                    }
                    self.upstream_buf.advance(take);
                    remaining -= take as u64;
                    done = remaining == 0;
                }
                Framing::Chunked => loop {
                    match chunked.step(&self.upstream_buf) {
                        Ok(Step::Data { skip, len }) => {
                            let data = &self.upstream_buf[skip..skip + len];
                            log.saw(data);
                            wire::put_chunk(&mut self.out, data);
                            self.upstream_buf.advance(skip + len);
                        }
                        Ok(Step::More) => {
                            self.upstream_buf.clear();
                            break;
                        }
                        Ok(Step::End { used }) => {
                            self.upstream_buf.advance(used);
                            self.out.extend_from_slice(wire::LAST_CHUNK);
                            done = true;
                            break;
                        }
                        Err(_) => {
                            log.outcome = Outcome::UpstreamBodyError;
                            let _ = self.flush().await;
                            return Relayed::Aborted;
                        }
                    }
                },
                Framing::UntilClose => {
                    let data = self.upstream_buf.split();
                    log.saw(&data);
                    wire::put_chunk(&mut self.out, &data);
                    if eof {
                        self.out.extend_from_slice(wire::LAST_CHUNK);
                        done = true;
                    }
                }
            }
            if self.flush().await.is_err() {
                return Relayed::Aborted;
            }
            if done {
                log.outcome = Outcome::Complete;
                return Relayed::Complete;
            }
            if eof {
                // Closed before the body's end: the client must see it incomplete.
                log.outcome = Outcome::UpstreamBodyError;
                return Relayed::Aborted;
            }
            let deadline = Instant::now() + idle;
            make_room(&mut self.upstream_buf, BUFFER / 2);
            let read = tokio::select! {
                biased;
                read = upstream.read_buf(&mut self.upstream_buf) => read,
                () = client_gone(self.client, &mut self.buf) => return Relayed::Aborted,
                () = timer.expired(deadline) => {
                    log.outcome = Outcome::UpstreamBodyTimeout;
                    return Relayed::Aborted;
                }
            };
            match read {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => {
                    log.outcome = Outcome::UpstreamBodyError;
                    return Relayed::Aborted;
                }
            }
        }
    }

    /// Writes `out` to the client and empties it.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.client.write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// Answers with an error the gateway made. The connection stays open when the request's
    /// body, if any, has been read already (it is then dropped); otherwise it closes.
    async fn answer_error(
        &mut self,
        response: poem::Response,
        unread_body: u64,
        close: bool,
    ) -> bool {
        let unread = usize::try_from(unread_body).unwrap_or(usize::MAX);
        let close = close || self.buf.len() < unread;
        if !close {
            self.buf.advance(unread);
        }
        let (parts, body) = response.into_parts();
        let Ok(body) = body.into_bytes().await else {
            return false;
        };
        self.out.clear();
        wire::write_response_head(
            &mut self.out,
            parts.status,
            wire::map_fields(&parts.headers).iter().copied(),
            ClientFraming::Length(body.len() as u64),
            close,
        );
        self.out.extend_from_slice(&body);
        self.flush().await.is_ok() && !close
    }
}

/// How a body relay ended.
enum Relayed {
    Complete,
    Aborted,
}

fn upstream_failed(err: impl std::error::Error + Send + Sync + 'static) -> Failed {
    Failed::Answer(GatewayError::UpstreamFailed(Box::new(err)))
}

/// Makes `buf` ready to read at least `room` more bytes. A buffer consumed from the front
/// keeps only its tail free: read into as it is, a message straddling the end takes two
/// reads (one more syscall every few requests). While nothing else holds the storage,
/// `reserve` moves what is left to the front instead of allocating.
fn make_room(buf: &mut BytesMut, room: usize) {
    if buf.capacity() - buf.len() < room {
        buf.reserve(room);
    }
}

/// Writes all of `data` on a connection taken from the pool or just made.
async fn stream_write(stream: &TcpStream, data: &[u8]) -> std::io::Result<()> {
    write_two(stream, data, &[]).await
}

/// Writes all of `first`, then all of `second`: in one `writev` as a rule, with no copy of
/// `second` behind `first`.
async fn write_two(stream: &TcpStream, first: &[u8], second: &[u8]) -> std::io::Result<()> {
    let (mut first, mut second) = (first, second);
    while !first.is_empty() || !second.is_empty() {
        stream.writable().await?;
        let written = if first.is_empty() {
            stream.try_write(second)
        } else if second.is_empty() {
            stream.try_write(first)
        } else {
            stream.try_write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
        };
        match written {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let from_first = n.min(first.len());
                first = &first[from_first..];
                second = &second[n - from_first..];
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Resolves when the client closes its side or fails; what it sends meanwhile (a pipelined
/// request) is kept in `buf`, up to [`MAX_AHEAD`]. Waits in the socket's own reader slot
/// rather than in a readiness future registered and removed per wait.
async fn client_gone(client: &TcpStream, buf: &mut BytesMut) {
    std::future::poll_fn(|cx| loop {
        if buf.len() >= MAX_AHEAD {
            return Poll::Pending;
        }
        match client.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {}
        }
        buf.reserve(BUFFER);
        match client.try_read_buf(buf) {
            Ok(0) => return Poll::Ready(()),
            // Data, or readiness that was stale: look again (which registers the waker).
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(()),
        }
    })
    .await;
}

/// One timer per connection for the deadline of whatever it waits for, moved as rarely as
/// possible: a wait whose deadline is later than the one armed leaves it be (requests come
/// far faster than any timeout runs out), and a firing before the wait's own deadline
/// re-arms it there. So a busy connection does not touch the timer wheel per request.
struct Timer<'s> {
    sleep: std::pin::Pin<&'s mut Sleep>,
    /// When `sleep` fires; `None` once it has.
    armed: Option<Instant>,
}

impl Timer<'_> {
    /// Resolves once `deadline` has passed.
    async fn expired(&mut self, deadline: Instant) {
        loop {
            if self.armed.is_none_or(|armed| armed > deadline) {
                self.sleep.as_mut().reset(deadline);
                self.armed = Some(deadline);
            }
            self.sleep.as_mut().await;
            self.armed = None;
            if Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// The lane's side of a forwarder: the pool and what every request head to the upstream
/// carries.
#[derive(Debug)]
pub struct LaneUpstream {
    pub pool: pool::Pool,
    pub host: HeaderValue,
    /// The base URL's path, put before the client's.
    pub path: String,
}
