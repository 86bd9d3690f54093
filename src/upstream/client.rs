//! The general transport: hyper-util's pooled client over [`Connector`], for HTTPS (HTTP/2
//! by ALPN where the upstream offers it), proxies, and bodies that stream.

use std::io;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy;

use super::connect::Connector;
use super::{SendError, Stage, POOL_IDLE_TIMEOUT};

/// A request body as the pooled client takes it.
pub type ClientBody = BoxBody<Bytes, io::Error>;

/// A body of chunks as they come, for the pooled client.
pub fn streaming<S>(chunks: S) -> ClientBody
where
    S: futures_util::Stream<Item = io::Result<Bytes>> + Send + Sync + 'static,
{
    let frames = futures_util::StreamExt::map(chunks, |chunk| chunk.map(hyper::body::Frame::data));
    http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames))
}

pub struct Client {
    inner: legacy::Client<Connector, ClientBody>,
}

impl Client {
    /// A client keeping at most `max_idle` idle connections (`upstream.max_idle_connections`).
    pub fn new(connector: Connector, max_idle: usize) -> Client {
        let inner = legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_idle)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Client { inner }
    }

    /// Starts one request; the future resolves to the answer's status, headers and body.
    /// Synchronous up to the wait, so that what waits holds only hyper's (boxed) future.
    pub fn send(&self, method: Method, uri: Uri, headers: HeaderMap, body: ClientBody) -> Sending {
        let mut request = http::Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Sending(self.inner.request(request))
    }
}

/// A request sent by the pooled client, waiting for the answer's head.
pub struct Sending(legacy::ResponseFuture);

impl Sending {
    pub async fn response(self) -> Result<http::Response<Incoming>, SendError> {
        self.0.await.map_err(|err| {
            let stage = if err.is_connect() {
                Stage::Connect
            } else {
                Stage::Exchange
            };
            SendError::new(stage, Box::new(err))
        })
    }
}
