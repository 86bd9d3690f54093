//! The upstream: where a request goes and how it gets there.
//!
//! [`Upstream::send`] takes a request the pipeline has finished with and brings back the
//! answer's head and a body to stream. Which transport carries it is decided there and
//! nowhere else:
//! - the raw HTTP/1 transport ([`raw`]) for an upstream reached without a proxy over plain
//!   `http://`, or over `https://` with `upstream.http2 = false`, when the body is already
//!   whole (the fast engine reads bodies it takes whole);
//! - hyper-util's pooled client ([`client`]) for everything else: HTTPS with HTTP/2 where
//!   offered, proxies, bodies that stream.
//!
//! Both, and the Realtime WebSocket's connections, are made by one [`Connector`]: TCP, the
//! outbound proxy, TLS.

mod client;
pub(crate) mod connect;
mod raw;
mod target;
pub(crate) mod tls;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::{Stream, TryFutureExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};

use crate::config::{ConfigError, UpstreamConfig};
use crate::http1::Framing;
use crate::message::Io;
use crate::message::{Body, Head, RequestBody};
pub(crate) use connect::{BoxError, Connector, Purpose};
use raw::{Raw, RawBody};
pub(crate) use target::Target;

const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A request ready for the upstream: every rule of the pipeline has been applied to it.
pub(crate) struct Outbound {
    pub(crate) method: Method,
    /// Path and query as the upstream sees them ([`Target::join`]).
    pub(crate) target: PathAndQuery,
    pub(crate) headers: HeaderMap,
    pub(crate) body: RequestBody,
}

/// The upstream's answer up to its head, with its body to come.
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    pub(crate) head: Head,
    pub(crate) body: ResponseBody,
}

/// An answer's body as it arrives, whichever transport brought it.
pub(crate) enum ResponseBody {
    Raw(RawBody),
    Client {
        body: http_body_util::BodyDataStream<hyper::body::Incoming>,
        framing: Framing,
        /// The request's place on its connection, given back when the body is dropped.
        _slot: client::Slot,
    },
}

impl ResponseBody {
    /// How the body is delimited: as the upstream framed it on a raw connection; on the
    /// pooled client, by its `Content-Length`, else `Chunked` (hyper has read the framing).
    pub(crate) fn framing(&self) -> Framing {
        match self {
            ResponseBody::Raw(raw) => raw.framing(),
            ResponseBody::Client { framing, .. } => *framing,
        }
    }
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            ResponseBody::Raw(raw) => Pin::new(raw).poll_next(cx),
            ResponseBody::Client { body, .. } => Pin::new(body)
                .poll_next(cx)
                .map_err(|err| Box::new(err) as BoxError),
        }
    }
}

/// How far a request got before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// No connection could be made (refused, DNS, TLS, the proxy, the connect timeout).
    Connect,
    /// The connection broke or the upstream answered what is not HTTP.
    Exchange,
}

/// Why a request got no answer head.
#[derive(Debug)]
pub(crate) struct SendError {
    pub stage: Stage,
    pub source: BoxError,
}

impl SendError {
    pub(crate) fn new(stage: Stage, source: BoxError) -> SendError {
        SendError { stage, source }
    }

    /// Whether the cause, or one of its causes, is an I/O timeout (the connect timeout).
    pub(crate) fn timed_out(&self) -> bool {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self.source.as_ref());
        while let Some(cause) = current {
            if cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                return true;
            }
            current = cause.source();
        }
        false
    }
}

/// An error and its causes on one line, each said once: hyper's own message ("client error
/// (Connect)") says little until its source ("Connection refused") is shown beside it.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// One upstream, for one worker: its transports keep that worker's connections.
pub(crate) struct Upstream {
    target: Target,
    connector: Connector,
    client: client::Client,
    /// The raw transport, for a plain upstream that no proxy stands in front of.
    raw: Option<Raw>,
    /// `Proxy-Authorization` for plain-HTTP requests an HTTP proxy forwards in absolute
    /// form (a tunnel carries its own).
    forward_auth: Option<HeaderValue>,
}

impl Upstream {
    /// The upstream of `config`, with the root certificates of `tls`.
    pub(crate) fn new(
        config: &UpstreamConfig,
        tls: &rustls::ClientConfig,
    ) -> Result<Upstream, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid(vec![message]);
        let target = Target::new(&config.base_url, config.http2).map_err(invalid)?;
        let base = target
            .base()
            .map_err(|err| invalid(format!("upstream.base_url: not usable: {err}")))?;
        let connector = Connector::new(
            config.connect_timeout,
            config.proxy.as_ref(),
            tls,
            config.http2,
        );
        let proxy = connector.proxy_for(&base);
        // HTTP/1.1 straight to the upstream: the raw transport, over TLS for https:// (why:
        // hyper's client costs as much user time per request as all of nginx, Raw's doc).
        let raw = ((target.is_plain() || !config.http2) && proxy.is_none())
            .then(|| Raw::new(base.clone(), connector.clone(), config.max_idle_connections));
        // A limit on each connection's requests only where HTTP/2 may be spoken.
        let max_streams = if config.http2 && !target.is_plain() {
            config.http2_max_concurrent_streams
        } else {
            usize::MAX
        };
        let forward_auth = proxy
            .filter(|proxy| {
                target.is_plain() && matches!(proxy.uri().scheme_str(), Some("http" | "https"))
            })
            .and_then(|proxy| proxy.basic_auth().cloned())
            .map(|mut auth| {
                auth.set_sensitive(true);
                auth
            });
        Ok(Upstream {
            target,
            client: client::Client::new(
                connector.clone(),
                config.max_idle_connections,
                max_streams,
            ),
            connector,
            raw,
            forward_auth,
        })
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// `upstream.connect_timeout`, for the messages that name it.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connector.connect_timeout()
    }

    /// Sends `request` and waits for the answer's head. The transport is picked here, before
    /// the wait: the future holds the one chosen.
    pub(crate) fn send(
        &self,
        request: Outbound,
    ) -> impl Future<Output = Result<Response, SendError>> + Send + '_ {
        match (&self.raw, &request.body) {
            (Some(raw), Body::Whole(_)) => {
                Either::Left(raw.send(request).map_ok(|(head, body)| Response {
                    status: head.status,
                    head: Head::Arrived(head.fields),
                    body: ResponseBody::Raw(body),
                }))
            }
            _ => Either::Right(self.send_by_client(request)),
        }
    }

    /// Sends `request` on the pooled client.
    async fn send_by_client(&self, request: Outbound) -> Result<Response, SendError> {
        let (response, slot) = self.start_on_client(request)?.response().await?;
        self.client.answered_in(response.version());
        let (parts, incoming) = response.into_parts();
        let framing = if matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) {
            Framing::Empty
        } else {
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|value| crate::headers::content_length(value.as_bytes()))
                .map_or(Framing::Chunked, Framing::Length)
        };
        Ok(Response {
            status: parts.status,
            head: Head::Map(parts.headers),
            body: ResponseBody::Client {
                body: http_body_util::BodyDataStream::new(incoming),
                framing,
                _slot: slot,
            },
        })
    }

    /// Starts `request` on the pooled client, synchronously up to the wait.
    fn start_on_client(&self, request: Outbound) -> Result<client::Sending, SendError> {
        let Outbound {
            method,
            target,
            mut headers,
            body,
        } = request;
        let body = body.into_chunks();
        let uri = self
            .target
            .uri(target)
            .map_err(|err| SendError::new(Stage::Exchange, Box::new(err)))?;
        if let Some(auth) = &self.forward_auth {
            headers.insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        Ok(self.client.send(method, uri, headers, body))
    }

    /// GETs the base URL the way forwarded requests go (same transport, proxy and TLS):
    /// `Ok` for any HTTP answer, else why none came. For `/ready`.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        let base = self.target.base().map_err(|err| err.to_string())?;
        let mut headers = HeaderMap::new();
        if let Some(host) = self.target.host() {
            headers.insert(header::HOST, host.clone());
        }
        let request = Outbound {
            method: Method::GET,
            target: base
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers,
            body: Body::Whole(Bytes::new()),
        };
        match self.send(request).await {
            Ok(_) => Ok(()),
            Err(err) => Err(chain(err.source.as_ref())),
        }
    }

    /// A connection for a WebSocket session to `joined` ([`Target::join`]), through the
    /// proxy when one applies, TLS for `wss://`; and the session's URL.
    pub(crate) async fn websocket(
        &self,
        joined: PathAndQuery,
    ) -> Result<(Box<dyn Io>, http::Uri), BoxError> {
        let uri = self.target.websocket_uri(joined)?;
        let conn = self.connector.connect(&uri, Purpose::WebSocket).await?;
        Ok((conn.into_io(), uri))
    }
}
