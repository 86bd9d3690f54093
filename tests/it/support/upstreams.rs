//! Upstreams for the gateway to talk to, on loopback ports: a recording one that answers as
//! the test says, raw ones for what a well-behaved server would not do, and bodies to send.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use poem::{Body, Endpoint, Request, Response};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::hex;

/// What the upstream received, as it arrived on the wire.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Raw path and query, exactly as in the request line.
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
    /// The first 64 KiB of the body, for tests that look inside small bodies.
    pub body_head: Vec<u8>,
    /// The gateway's side of the connection, to tell reused connections from new ones.
    pub peer: String,
}

impl Recorded {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body_head).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type Responder = Arc<dyn Fn(&Recorded) -> Response + Send + Sync>;

/// An upstream server that hashes every request body as it streams in, records the request,
/// then answers with whatever the test's responder says.
pub struct Upstream {
    pub addr: SocketAddr,
    pub records: Arc<Mutex<Vec<Recorded>>>,
    _stop: oneshot::Sender<()>,
}

struct RecordingEndpoint {
    records: Arc<Mutex<Vec<Recorded>>>,
    responder: Responder,
}

impl Endpoint for RecordingEndpoint {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut head = Vec::new();
        let mut stream = req.take_body().into_bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(poem::error::InternalServerError)?;
            len += chunk.len() as u64;
            hasher.update(&chunk);
            let room = (64usize << 10).saturating_sub(head.len());
            head.extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
        let recorded = Recorded {
            method: req.method().to_string(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default(),
            headers: req.headers().clone(),
            body_len: len,
            body_sha256: hex(&hasher.finalize()),
            body_head: head,
            peer: req.remote_addr().to_string(),
        };
        let response = (self.responder)(&recorded);
        self.records.lock().unwrap().push(recorded);
        Ok(response)
    }
}

impl Upstream {
    pub async fn start(responder: impl Fn(&Recorded) -> Response + Send + Sync + 'static) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let endpoint = RecordingEndpoint {
            records: Arc::clone(&records),
            responder: Arc::new(responder),
        };
        // Served with hyper directly (not poem's server, which keeps a finished connection's
        // body alive and so would hide whether the gateway cancelled its request).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = Arc::new(endpoint);
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (stream, remote) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let endpoint = Arc::clone(&endpoint);
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let endpoint = Arc::clone(&endpoint);
                        let request: Request = (
                            req,
                            poem::web::LocalAddr(addr.into()),
                            poem::web::RemoteAddr(remote.into()),
                            http::uri::Scheme::HTTP,
                        )
                            .into();
                        async move {
                            let response = endpoint.get_response(request).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::<
                                http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
                            >::from(
                                response
                            ))
                        }
                    });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            records,
            _stop: stop,
        }
    }

    /// Answers every request with 200 and a small JSON body naming what it received.
    pub async fn echo() -> Self {
        Upstream::start(|rec| {
            json_response(
                200,
                &serde_json::json!({
                    "method": rec.method,
                    "path": rec.path_and_query,
                    "body_len": rec.body_len,
                    "body_sha256": rec.body_sha256,
                }),
            )
        })
        .await
    }

    /// An upstream whose first response is an event stream carrying whatever the test sends
    /// into the returned sender (dropping the sender ends it); later requests get `{}`.
    pub async fn streaming() -> (Self, tokio::sync::mpsc::Sender<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let upstream = Upstream::start(move |_| match rx.lock().unwrap().take() {
            Some(rx) => Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-request-id", "req_sse")
                .body(streaming_body(rx)),
            None => json_response(200, &serde_json::json!({})),
        })
        .await;
        (upstream, tx)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }
}

pub fn json_response(status: u16, value: &serde_json::Value) -> Response {
    Response::builder()
        .status(http::StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(serde_json::to_vec(value).unwrap())
}

/// A body stream of `total` bytes in `chunk`-sized pieces of a repeating pattern, generated
/// on the fly so the test itself holds no large buffer.
pub fn pattern_stream(
    total: u64,
    chunk: usize,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let block: Bytes = (0..chunk)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut sent = 0u64;
    futures_util::stream::poll_fn(move |_| {
        if sent >= total {
            return std::task::Poll::Ready(None);
        }
        let n = (total - sent).min(chunk as u64) as usize;
        sent += n as u64;
        std::task::Poll::Ready(Some(Ok(block.slice(..n))))
    })
}

/// The sha256 of what [`pattern_stream`] produces.
pub fn pattern_sha256(total: u64, chunk: usize) -> String {
    let block: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8).collect();
    let mut hasher = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hex(&hasher.finalize())
}

pub fn streaming_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    Body::from_bytes_stream(tokio_stream_from(rx).map(Ok::<_, std::io::Error>))
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A raw upstream on a loopback port, for answers no well-behaved server gives: every
/// connection it accepts is handed to `serve`, in a task of its own.
pub struct RawUpstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(serve: F) -> RawUpstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket));
            }
        });
        RawUpstream { addr, connections }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads off `socket` until a whole head (request or response) has arrived, into `pending`,
/// and returns the head's length in it; `None` when the peer closes or fails first. What
/// came after the head stays in `pending`.
pub async fn read_head(
    socket: &mut (impl AsyncRead + Unpin),
    pending: &mut Vec<u8>,
) -> Option<usize> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// One message off `socket`: its head and its `Content-Length` body (none without one), taken
/// off the front of `pending`, which keeps what followed. `None` when the peer closes or fails
/// first.
pub async fn read_message(
    socket: &mut (impl AsyncRead + Unpin),
    pending: &mut Vec<u8>,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let head_len = read_head(socket, pending).await?;
    let head: Vec<u8> = pending.drain(..head_len).collect();
    let length = content_length(&head);
    let mut buf = [0u8; 8192];
    while pending.len() < length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    let body = pending.drain(..length).collect();
    Some((head, body))
}

/// The `Content-Length` a head declares, or 0.
pub fn content_length(head: &[u8]) -> usize {
    let name = b"content-length:";
    head.split(|&b| b == b'\n')
        .find(|line| line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name))
        .and_then(|line| std::str::from_utf8(&line[name.len()..]).ok())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A loopback address nothing listens on now (a port taken and let go): an upstream that
/// refuses, or a port for a server the test starts.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}
