//! The passthrough: one matched request in, one upstream request out, the answer streamed back.
//!
//! The upstream URL is `upstream.base_url` followed by the client's own path and query, byte
//! for byte; nothing is rebuilt from decoded parameters, and the request line's authority (an
//! absolute-form `GET http://other-host/...`) is ignored. Bodies are never collected.

pub mod body;
mod connect;
pub mod lane;
pub mod log;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, Method};
use poem::{Body, Endpoint, Request, Response};
use tokio::time::Instant;

use crate::access::{self, KeyId};
use crate::config::AccessConfig;
use crate::config::{Config, ConfigError, LimitsConfig};
use crate::error::GatewayError;
use crate::headers;
use crate::limits::{Admission, Limiter};
use crate::observe::metrics::{Metrics, RouteMetrics, UpstreamErrorKind};
use crate::observe::usage::UsageTap;
use crate::realtime::Relay;
use crate::routes::{check_path_param, BodyKind, PathTemplate, RouteSpec};
use body::{DownloadBody, UploadBody, UploadProgress, UpstreamChunks};
use log::{Outcome, RequestLog};

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What the gateway knows of a request once it is admitted.
pub struct Admitted<'a> {
    pub route: &'a RouteSpec,
    pub route_name: &'a Arc<str>,
    pub metrics: &'a Arc<RouteMetrics>,
    /// Every admitted request presents a key.
    pub key: KeyId,
    pub start: Instant,
    pub admission: Admission,
}

/// A limit in force for one request, with the setting that controls it for messages.
#[derive(Debug, Clone, Copy)]
struct Bound<T> {
    value: T,
    setting: Setting,
}

#[derive(Debug, Clone, Copy)]
enum Setting {
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

/// The request body as hyper's client takes it.
type UpstreamBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;
type DirectClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<connect::PlainConnector>,
    UpstreamBody,
>;

/// How requests reach the upstream.
enum Transport {
    /// hyper's pooled client straight to the upstream: no URL parsing or wrapper layers on
    /// the hot path, and nothing added to the request (reqwest adds `Accept: */*`).
    Direct(Box<DirectClient>),
    /// reqwest, when a proxy applies (`upstream.proxy` or the standard variables): it speaks
    /// HTTP, HTTPS and SOCKS5 proxies, absolute-form and CONNECT.
    Proxied(reqwest::Client),
}

/// `upstream.base_url` taken apart once, so that each request's URL is put together from
/// shared pieces instead of formatted and parsed again.
struct UpstreamBase {
    scheme: http::uri::Scheme,
    /// Host and, when not the scheme's default, port; the base URL's user info is not sent.
    authority: http::uri::Authority,
    /// The base URL's path without its trailing slash: usually empty.
    path: String,
    /// `Host` for a plain `http://` upstream, which speaks HTTP/1. Left to the client for
    /// `https://`: there HTTP/2 may be negotiated, which carries the authority otherwise.
    host: Option<http::HeaderValue>,
}

impl UpstreamBase {
    fn new(url: &url::Url) -> Result<UpstreamBase, ConfigError> {
        let invalid = |err: &dyn std::fmt::Display| {
            ConfigError::Invalid(vec![format!("upstream.base_url: not usable: {err}")])
        };
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority = http::uri::Authority::try_from(authority).map_err(|err| invalid(&err))?;
        let secure = url.scheme() == "https";
        Ok(UpstreamBase {
            scheme: if secure {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            host: if secure {
                None
            } else {
                Some(http::HeaderValue::from_str(authority.as_str()).map_err(|err| invalid(&err))?)
            },
            authority,
            path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URL for a request: the base followed by the client's path and query.
    fn join(&self, path_and_query: &http::uri::PathAndQuery) -> Result<http::Uri, http::Error> {
        let path_and_query = if self.path.is_empty() {
            path_and_query.clone()
        } else {
            http::uri::PathAndQuery::try_from(format!("{}{}", self.path, path_and_query))?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Ok(http::Uri::from_parts(parts)?)
    }
}

/// Sends requests upstream. One per worker; its client pools connections.
pub struct Forwarder {
    transport: Transport,
    base: UpstreamBase,
    connect_timeout: Duration,
    read_timeout: Duration,
    body_read_timeout: Duration,
    limits: LimitsConfig,
    access: AccessConfig,
    limiter: Arc<Limiter>,
    /// The fast lane's connections, for a plain `http://` upstream reached directly.
    lane: Option<lane::LaneUpstream>,
}

impl Forwarder {
    /// A forwarder for `config`. The limiter is passed in so a reload with the same limits
    /// keeps the buckets and concurrency counts of requests still in flight; the TLS settings
    /// so the root certificates are read once per manifest, not once per worker and client.
    pub fn new(
        config: &Config,
        limiter: Arc<Limiter>,
        tls: &rustls::ClientConfig,
    ) -> Result<Forwarder, ConfigError> {
        let upstream = &config.upstream;
        let secure = upstream.base_url.scheme() == "https";
        let host = upstream.base_url.host_str().unwrap_or_default();
        let proxied = upstream.proxy.is_some()
            || crate::realtime::tunnel::route_from_env(secure, host)
                != crate::realtime::tunnel::Route::Direct;
        let transport = if proxied {
            Transport::Proxied(proxied_client(config, tls)?)
        } else {
            Transport::Direct(Box::new(direct_client(upstream.connect_timeout, tls)))
        };
        let base = UpstreamBase::new(&upstream.base_url)?;
        let lane = match (&transport, &base.host) {
            (Transport::Direct(_), Some(host)) if config.server.fast_lane => {
                let port = upstream.base_url.port_or_known_default().unwrap_or(80);
                Some(lane::LaneUpstream {
                    pool: lane::pool::Pool::new(
                        format!("{}:{port}", base.authority.host()),
                        upstream.connect_timeout,
                    ),
                    host: host.clone(),
                    path: base.path.clone(),
                })
            }
            _ => None,
        };
        Ok(Forwarder {
            transport,
            base,
            lane,
            connect_timeout: upstream.connect_timeout,
            read_timeout: upstream.read_timeout,
            body_read_timeout: config.server.body_read_timeout,
            limits: config.limits.clone(),
            access: config.access.clone(),
            limiter,
        })
    }

    /// GETs `url` the way forwarded requests go (same transport, proxy and TLS): `Ok` for
    /// any HTTP answer, else why none came. For `/ready`.
    pub async fn probe(&self, url: &str) -> Result<(), String> {
        type NoBody = UploadBody<futures_util::stream::Empty<std::io::Result<bytes::Bytes>>>;
        let url = url
            .parse::<http::Uri>()
            .map_err(|err| format!("cannot build the upstream URL: {err}"))?;
        let sending = self.send(Method::GET, url, HeaderMap::new(), None::<NoBody>);
        let response = match sending {
            Ok(sending) => sending.response().await,
            Err(failure) => Err(failure),
        };
        match response {
            Ok(_) => Ok(()),
            Err(Failure::Direct(err)) => Err(crate::error::chain(&err)),
            Err(Failure::Proxied(err)) => Err(crate::error::chain(&err.without_url())),
            Err(Failure::Internal(message)) => Err(message),
        }
    }

    fn read_timeout(&self, route: &RouteSpec) -> Bound<Duration> {
        match route.read_timeout {
            Some(value) => Bound {
                value,
                setting: Setting::Route {
                    index: route.index,
                    key: "read_timeout",
                },
            },
            None => Bound {
                value: self.read_timeout,
                setting: Setting::Global("upstream.read_timeout"),
            },
        }
    }

    /// The body limit for this request: the route's own, else the upload limit when the
    /// route takes uploads and the client is not sending JSON, else the JSON limit.
    fn body_limit(&self, route: &RouteSpec, headers: &HeaderMap) -> Bound<u64> {
        if let Some(value) = route.max_body {
            return Bound {
                value,
                setting: Setting::Route {
                    index: route.index,
                    key: "max_body",
                },
            };
        }
        let sends_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|ct| {
                let essence = ct.split(';').next().unwrap_or("").trim();
                essence.eq_ignore_ascii_case("application/json")
            });
        let takes_uploads = route.body.iter().any(|kind| kind.is_upload());
        if takes_uploads && !sends_json {
            Bound {
                value: self.limits.max_upload_body,
                setting: Setting::Global("limits.max_upload_body"),
            }
        } else {
            Bound {
                value: self.limits.max_json_body,
                setting: Setting::Global("limits.max_json_body"),
            }
        }
    }

    /// Refuses a body that cannot be sent: declared over the limit, or of a content type the
    /// route does not take. Returns the limit the body is held to as it streams.
    fn check_body(
        &self,
        route: &RouteSpec,
        headers: &HeaderMap,
        has_body: bool,
    ) -> Result<Bound<u64>, GatewayError> {
        let limit = self.body_limit(route, headers);
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

    /// Takes from the client's request everything the upstream request needs, refusing what
    /// cannot be sent (a declared body over the limit, a content type the route does not
    /// take). Synchronous on purpose: the future that then waits for the upstream holds only
    /// the [`Exchange`], not the whole client request.
    pub fn prepare<'a>(
        &'a self,
        admitted: Admitted<'a>,
        mut req: Request,
    ) -> Result<Exchange<'a, impl ClientStream>, GatewayError> {
        let route = admitted.route;
        // The body's own size hint knows what headers cannot: an HTTP/2 request may carry a
        // body with neither Content-Length nor Transfer-Encoding.
        let client_body = req.take_body();
        let has_body = !client_body.is_empty();
        let limit = self.check_body(route, req.headers(), has_body)?;

        let root = http::uri::PathAndQuery::from_static("/");
        let path_and_query = req.uri().path_and_query().unwrap_or(&root);
        let target = self.base.join(path_and_query).map_err(|err| {
            GatewayError::Internal(format!("cannot build the upstream URL: {err}"))
        })?;
        let mut headers = std::mem::take(req.headers_mut());
        headers::prepare_upstream_request(&mut headers);

        let progress = UploadProgress::new();
        let upload = has_body.then(|| {
            UploadBody::new(
                client_body.into_bytes_stream(),
                limit.value,
                self.body_read_timeout,
                Arc::clone(&progress),
            )
        });
        Ok(Exchange {
            forwarder: self,
            admitted,
            method: req.method().clone(),
            target,
            headers,
            upload,
            progress,
            limit,
        })
    }

    /// Starts one request by the forwarder's transport; the returned [`Sending`] resolves
    /// to the response headers.
    fn send<S: ClientStream>(
        &self,
        method: Method,
        target: http::Uri,
        mut headers: HeaderMap,
        upload: Option<UploadBody<S>>,
    ) -> Result<Sending, Failure> {
        match &self.transport {
            Transport::Direct(client) => {
                use http_body_util::BodyExt;
                if let Some(host) = &self.base.host {
                    headers.insert(header::HOST, host.clone());
                }
                let body: UpstreamBody = match upload {
                    Some(upload) => http_body_util::StreamBody::new(futures_util::StreamExt::map(
                        upload,
                        |chunk| chunk.map(hyper::body::Frame::data),
                    ))
                    .boxed(),
                    None => http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed(),
                };
                let mut request = http::Request::new(body);
                *request.method_mut() = method;
                *request.uri_mut() = target;
                *request.headers_mut() = headers;
                Ok(Sending::Direct(client.request(request)))
            }
            Transport::Proxied(client) => {
                let url = reqwest::Url::parse(&target.to_string()).map_err(|err| {
                    Failure::Internal(format!("cannot build the upstream URL: {err}"))
                })?;
                let mut builder = client.request(method, url).headers(headers);
                if let Some(upload) = upload {
                    builder = builder.body(reqwest::Body::wrap_stream(upload));
                }
                Ok(Sending::Proxied(Box::pin(builder.send())))
            }
        }
    }

    /// Waits for the upstream's response headers while the request shows life: the timer
    /// restarts with every uploaded chunk, so a long upload is never cut, only silence is.
    async fn send_with_idle_timeout(
        &self,
        send: impl std::future::Future<Output = Result<UpstreamResponse, Failure>>,
        progress: &UploadProgress,
        timeout: Bound<Duration>,
    ) -> Result<UpstreamResponse, SendError> {
        tokio::pin!(send);
        loop {
            let deadline = progress.last_activity() + timeout.value;
            tokio::select! {
                result = &mut send => return result.map_err(SendError::Failed),
                () = tokio::time::sleep_until(deadline) => {
                    if progress.last_activity() + timeout.value <= Instant::now() {
                        return Err(SendError::Timeout);
                    }
                }
            }
        }
    }
}

/// The client's request body as the forwarder streams it upstream.
pub trait ClientStream:
    futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin + Send + Sync + 'static
{
}

impl<S> ClientStream for S where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin + Send + Sync + 'static
{
}

/// One request on its way upstream: what [`Forwarder::prepare`] took from the client's.
pub struct Exchange<'a, S> {
    forwarder: &'a Forwarder,
    admitted: Admitted<'a>,
    method: Method,
    target: http::Uri,
    headers: HeaderMap,
    upload: Option<UploadBody<S>>,
    progress: Arc<UploadProgress>,
    limit: Bound<u64>,
}

impl<S: ClientStream> Exchange<'_, S> {
    /// Sends the request and streams the answer back.
    pub async fn run(self) -> Result<Response, GatewayError> {
        let Exchange {
            forwarder,
            admitted,
            method,
            target,
            headers,
            upload,
            progress,
            limit,
        } = self;
        let route = admitted.route;
        let read_timeout = forwarder.read_timeout(route);
        let route_metrics = admitted.metrics;
        let in_flight = route_metrics.all().in_flight();
        let sent = Instant::now();
        let upstream = match forwarder.send(method.clone(), target, headers, upload) {
            Ok(sending) => {
                forwarder
                    .send_with_idle_timeout(sending.response(), &progress, read_timeout)
                    .await
            }
            Err(failure) => Err(SendError::Failed(failure)),
        };
        let upstream = upstream.map_err(|err| {
            let err = match err {
                SendError::Timeout => GatewayError::UpstreamTimeout {
                    setting: read_timeout.setting.to_string(),
                    timeout: read_timeout.value,
                },
                SendError::Failed(failure) => {
                    forwarder.classify_send_error(failure, &progress, limit)
                }
            };
            if let Some(kind) = upstream_error_kind(&err) {
                route_metrics.count_upstream_error(kind);
            }
            err
        })?;
        let upstream_ttfb = sent.elapsed();
        route_metrics.observe_upstream_ttfb(upstream_ttfb);

        let UpstreamResponse {
            status,
            headers: mut response_headers,
            body: upstream_body,
        } = upstream;
        headers::strip_hop_by_hop(&mut response_headers);
        let log = open_log(
            admitted,
            method,
            status,
            AnswerHead::of(&response_headers),
            upstream_ttfb,
            progress,
            in_flight,
        );
        let expected_len = response_headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| headers::content_length(value.as_bytes()));
        let body = DownloadBody::new(upstream_body, read_timeout.value, expected_len, log);
        let mut response = Response::builder()
            .status(status)
            .body(Body::from_bytes_stream(body));
        *response.headers_mut() = response_headers;
        Ok(response)
    }
}

/// What the log line and the usage tap read from an answer's head, from either path's
/// form of it: hyper's header map or the lane's head as it arrived.
pub(crate) struct AnswerHead<'h> {
    /// The media type: `Content-Type` up to its parameters, trimmed.
    content_type: Option<&'h str>,
    request_id: Option<http::HeaderValue>,
}

impl<'h> AnswerHead<'h> {
    pub(crate) fn new(
        content_type: Option<&'h [u8]>,
        request_id: Option<http::HeaderValue>,
    ) -> Self {
        let content_type = content_type
            .and_then(headers::text)
            .map(|ct| ct.split(';').next().unwrap_or("").trim());
        AnswerHead {
            content_type,
            request_id,
        }
    }

    fn of(headers: &'h HeaderMap) -> Self {
        AnswerHead::new(
            headers
                .get(header::CONTENT_TYPE)
                .map(http::HeaderValue::as_bytes),
            headers.get(X_REQUEST_ID).cloned(),
        )
    }
}

/// What either path does with the upstream's response head: decides whether the usage tap
/// reads the answer, and opens the request's log line, which is written when the body is
/// done.
fn open_log(
    admitted: Admitted<'_>,
    method: Method,
    status: http::StatusCode,
    answer: AnswerHead<'_>,
    upstream_ttfb: Duration,
    upload: Arc<UploadProgress>,
    in_flight: crate::observe::metrics::GaugeGuard,
) -> RequestLog {
    let content_type = answer.content_type;
    let is_event_stream =
        content_type.is_some_and(|ct| ct.eq_ignore_ascii_case("text/event-stream"));
    let is_json = content_type.is_some_and(|ct| ct.eq_ignore_ascii_case("application/json"));
    let usage = (admitted.route.usage && status.is_success() && (is_json || is_event_stream))
        .then(UsageTap::new);
    let stream_gauge = is_event_stream.then(|| admitted.metrics.all().open_stream());
    RequestLog {
        method,
        route: Arc::clone(admitted.route_name),
        status: status.as_u16(),
        start: admitted.start,
        upstream_ttfb,
        upstream_request_id: answer.request_id,
        key: admitted.key,
        upload,
        bytes_out: 0,
        outcome: Outcome::ClientAborted,
        usage,
        metrics: Arc::clone(admitted.metrics),
        admission: admitted.admission,
        gauges: (in_flight, stream_gauge),
    }
}

/// A request sent upstream, waiting for its response headers.
enum Sending {
    Direct(hyper_util::client::legacy::ResponseFuture),
    /// reqwest's future has no name to hold it by.
    Proxied(Pin<Box<dyn Future<Output = reqwest::Result<reqwest::Response>> + Send>>),
}

impl Sending {
    async fn response(self) -> Result<UpstreamResponse, Failure> {
        match self {
            Sending::Direct(pending) => {
                let response = pending.await.map_err(Failure::Direct)?;
                let (parts, incoming) = response.into_parts();
                Ok(UpstreamResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body: UpstreamChunks::Direct(http_body_util::BodyDataStream::new(incoming)),
                })
            }
            Sending::Proxied(pending) => {
                let mut response = pending.await.map_err(Failure::Proxied)?;
                let status = response.status();
                let headers = std::mem::take(response.headers_mut());
                let chunks = futures_util::StreamExt::map(response.bytes_stream(), |chunk| {
                    chunk.map_err(|err| Box::new(err.without_url()) as body::BoxError)
                });
                Ok(UpstreamResponse {
                    status,
                    headers,
                    body: UpstreamChunks::Proxied(Box::pin(chunks)),
                })
            }
        }
    }
}

/// The upstream's answer up to its headers, whichever transport brought it.
struct UpstreamResponse {
    status: http::StatusCode,
    headers: HeaderMap,
    body: UpstreamChunks,
}

/// Why a request got no response headers.
enum Failure {
    Direct(hyper_util::client::legacy::Error),
    Proxied(reqwest::Error),
    Internal(String),
}

enum SendError {
    Timeout,
    Failed(Failure),
}

/// Pooled connections: enough warm ones for bursts, while a spike of thousands of streams does
/// not leave thousands of idle sockets behind.
const POOL_MAX_IDLE: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// hyper's pooled client with rustls (HTTP/2 by ALPN), configured as the reqwest client of
/// the proxied transport.
fn direct_client(connect_timeout: Duration, tls: &rustls::ClientConfig) -> DirectClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    // The connector sees https:// URLs too; TLS is layered on by hyper-rustls.
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connect::PlainConnector(http));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(https)
}

/// reqwest through `upstream.proxy` (or the standard variables), with the same TLS roots.
fn proxied_client(
    config: &Config,
    tls: &rustls::ClientConfig,
) -> Result<reqwest::Client, ConfigError> {
    let upstream = &config.upstream;
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(upstream.connect_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        // A passthrough hands redirects back to the client instead of following them.
        .redirect(reqwest::redirect::Policy::none())
        .referer(false);
    if let Some(proxy) = &upstream.proxy {
        let proxy = reqwest::Proxy::all(proxy.as_str()).map_err(|err| {
            ConfigError::Invalid(vec![format!("upstream.proxy: not usable: {err}")])
        })?;
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(|err| {
        ConfigError::Invalid(vec![format!("cannot build the upstream client: {err}")])
    })
}

/// Whether `err` or one of its causes is an I/O timeout (a connect timeout, for hyper).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
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

/// The upstream's share of a failure, for `oa_bypass_upstream_errors_total`; `None` when the
/// client or the gateway's own limits were the cause.
fn upstream_error_kind(err: &GatewayError) -> Option<UpstreamErrorKind> {
    match err {
        GatewayError::UpstreamUnreachable(_) => Some(UpstreamErrorKind::Connect),
        GatewayError::UpstreamConnectTimeout { .. } | GatewayError::UpstreamTimeout { .. } => {
            Some(UpstreamErrorKind::Timeout)
        }
        GatewayError::UpstreamFailed(_) => Some(UpstreamErrorKind::Reset),
        GatewayError::MissingCredential
        | GatewayError::KeyNotAllowed
        | GatewayError::AddressNotAllowed
        | GatewayError::RateLimited { .. }
        | GatewayError::TooBusy { .. }
        | GatewayError::UnknownRoute { .. }
        | GatewayError::MethodNotAllowed { .. }
        | GatewayError::InvalidPathParam { .. }
        | GatewayError::BodyTooLarge { .. }
        | GatewayError::ClientBodyTimeout { .. }
        | GatewayError::UnsupportedMediaType { .. }
        | GatewayError::ClientBody(_)
        | GatewayError::NotAWebSocket(_)
        | GatewayError::Internal(_) => None,
    }
}

impl Forwarder {
    /// Says who failed when the request could not be sent or its headers never came back.
    fn classify_send_error(
        &self,
        failure: Failure,
        progress: &UploadProgress,
        limit: Bound<u64>,
    ) -> GatewayError {
        let (err, connect, timeout): (body::BoxError, bool, bool) = match failure {
            Failure::Internal(message) => return GatewayError::Internal(message),
            Failure::Direct(err) => {
                let connect = err.is_connect();
                let timeout = is_timeout(&err);
                (Box::new(err), connect, timeout)
            }
            Failure::Proxied(err) => {
                let err = err.without_url();
                let (connect, timeout) = (err.is_connect(), err.is_timeout());
                (Box::new(err), connect, timeout)
            }
        };
        if progress.over_limit() {
            GatewayError::BodyTooLarge {
                limit: limit.value,
                setting: limit.setting.to_string(),
                declared: None,
            }
        } else if progress.client_stalled() {
            GatewayError::ClientBodyTimeout {
                timeout: self.body_read_timeout,
            }
        } else if progress.client_failed() {
            GatewayError::ClientBody(std::io::Error::other(err))
        } else if connect && timeout {
            GatewayError::UpstreamConnectTimeout {
                timeout: self.connect_timeout,
            }
        } else if connect {
            GatewayError::UpstreamUnreachable(err)
        } else {
            GatewayError::UpstreamFailed(err)
        }
    }
}

/// Refuses a matched path parameter that could address something else upstream.
fn check_path_params(route: &RouteSpec, req: &Request) -> Result<(), GatewayError> {
    for param in route.template.params() {
        // poem's router hands parameters over percent-decoded (despite the method's name),
        // and leaves out any that do not decode to UTF-8.
        let decoded = req.raw_path_param(param);
        check_path_param(decoded).map_err(|problem| GatewayError::InvalidPathParam {
            param: param.to_owned(),
            problem: problem.describe(),
        })?;
    }
    Ok(())
}

/// One method of a template: its manifest entry and its metric handles.
struct MethodRoute {
    spec: RouteSpec,
    metrics: Arc<RouteMetrics>,
}

/// An admitted request, ready to be awaited.
// The common case stays inline; boxing it would cost every request an allocation.
#[allow(clippy::large_enum_variant)]
enum Begun<'a, S> {
    Forward(Exchange<'a, S>),
    Realtime(Session<'a>),
}

/// A realtime session's handshake: boxed, being far larger than a forwarded request's.
type Session<'a> = Pin<Box<dyn Future<Output = Result<Response, GatewayError>> + Send + 'a>>;

/// Serves every method of one path template: dispatches by method, answers 405 otherwise.
pub struct TemplateEndpoint {
    forwarder: Arc<Forwarder>,
    realtime: Arc<Relay>,
    metrics: Arc<Metrics>,
    template: Arc<str>,
    methods: Vec<MethodRoute>,
}

impl TemplateEndpoint {
    pub fn new(
        forwarder: Arc<Forwarder>,
        realtime: Arc<Relay>,
        metrics: &Arc<Metrics>,
        template: &PathTemplate,
        routes: &[&RouteSpec],
    ) -> Self {
        let template: Arc<str> = Arc::from(template.as_str());
        TemplateEndpoint {
            forwarder,
            realtime,
            metrics: Arc::clone(metrics),
            methods: routes
                .iter()
                .map(|route| MethodRoute {
                    spec: (*route).clone(),
                    metrics: Arc::new(metrics.route(&template, &route.method)),
                })
                .collect(),
            template,
        }
    }

    /// Everything before the upstream is contacted, done at once: path parameters,
    /// credential, limits, and taking the request apart. What is left to await holds only
    /// what the exchange needs; a realtime session's larger future is boxed so it does not
    /// size every request's.
    fn begin<'a>(
        &'a self,
        route: &'a MethodRoute,
        req: Request,
        start: Instant,
    ) -> Result<Begun<'a, impl ClientStream>, GatewayError> {
        check_path_params(&route.spec, &req)?;
        let peer = req.remote_addr().as_socket_addr().copied();
        let admitted = self.admit_route(route, req.headers(), peer, start)?;
        if route.spec.accepts(BodyKind::WebSocket) {
            Ok(Begun::Realtime(Box::pin(
                self.realtime.handle(admitted, req),
            )))
        } else {
            Ok(Begun::Forward(self.forwarder.prepare(admitted, req)?))
        }
    }

    /// Admits a request to `route`: credential, allowed keys, then rate and concurrency
    /// limits, all before any upstream connection is made. Both paths start here.
    fn admit_route<'a>(
        &'a self,
        route: &'a MethodRoute,
        headers: &HeaderMap,
        peer: Option<std::net::SocketAddr>,
        start: Instant,
    ) -> Result<Admitted<'a>, GatewayError> {
        let (admission, key) = self.admit(headers, peer)?;
        Ok(Admitted {
            route: &route.spec,
            route_name: &self.template,
            metrics: &route.metrics,
            key,
            start,
            admission,
        })
    }

    fn admit(
        &self,
        headers: &HeaderMap,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(Admission, KeyId), GatewayError> {
        // The first key presented; none at all is refused before anything else.
        let Some(key) = access::presented_key(headers) else {
            return Err(GatewayError::MissingCredential);
        };
        let forwarder = &self.forwarder;
        forwarder.access.check_key(headers)?;
        let ip = peer.map(|peer| forwarder.access.client_ip(peer.ip(), headers));
        let key = KeyId::of(key);
        let admission = forwarder.limiter.admit(ip, &key.hash).inspect_err(|err| {
            if let GatewayError::RateLimited { setting, .. }
            | GatewayError::TooBusy { setting, .. } = err
            {
                self.metrics.count_rate_limited(setting);
            }
        })?;
        Ok((admission, key))
    }

    /// The path template, as the manifest writes it.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Whether the template has path parameters (which the fast lane leaves to poem's router).
    pub fn has_params(&self) -> bool {
        self.methods
            .first()
            .is_some_and(|route| route.spec.template.params().next().is_some())
    }

    /// `method`'s route of this template, when the fast lane can take it: any but WebSocket
    /// ones.
    fn lane_route(&self, method: &Method) -> Option<&MethodRoute> {
        self.methods
            .iter()
            .find(|route| route.spec.method == method && !route.spec.accepts(BodyKind::WebSocket))
    }

    fn reject(&self, method: &Method, start: Instant, err: &GatewayError) -> Response {
        let response = err.to_response();
        let status = response.status().as_u16();
        self.metrics.count_request(&self.template, method, status);
        crate::observe::log::rejected(method, &self.template, status, start, &err.to_string());
        response
    }
}

/// A template's endpoint shared between poem's router and the fast lane. Calls go straight
/// through (poem's own `Arc` impl would wrap each call in one more future holding the request).
pub struct SharedTemplate(pub Arc<TemplateEndpoint>);

impl Endpoint for SharedTemplate {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        self.0.call(req)
    }
}

impl Endpoint for TemplateEndpoint {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let start = Instant::now();
        let method = req.method().clone();
        let route = self
            .methods
            .iter()
            .find(|route| route.spec.method == method);
        let begun = match route {
            Some(route) => self.begin(route, req, start),
            None => Err(GatewayError::MethodNotAllowed {
                method: method.clone(),
                template: self.template.to_string(),
                allowed: self.methods.iter().map(|r| r.spec.method.clone()).collect(),
            }),
        };
        async move {
            let result = match begun {
                Ok(Begun::Forward(exchange)) => exchange.run().await,
                Ok(Begun::Realtime(session)) => session.await,
                Err(err) => Err(err),
            };
            match result {
                Ok(response) => {
                    // Only a matched route answers Ok.
                    if let Some(route) = route {
                        route.metrics.count_status(response.status().as_u16());
                        route.metrics.observe_response_headers(start.elapsed());
                    }
                    Ok(response)
                }
                Err(err) => Ok(self.reject(&method, start, &err)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The future of a forwarded request lives in hyper's per-request slot and is copied when
    /// boxed; it must stay small (it was 4.7 KB when it carried the realtime branch and the
    /// whole client request).
    #[test]
    fn a_forwarded_request_future_stays_small() {
        let config = Config::from_manifest_str(crate::config::BUILT_IN_MANIFEST).unwrap();
        let metrics = Arc::new(Metrics::new(&config.metrics));
        let limiter = Arc::new(Limiter::new(&config.limits.admission));
        let tls = Arc::new(crate::realtime::client_tls_config().unwrap());
        let forwarder = Arc::new(Forwarder::new(&config, limiter, &tls).unwrap());
        let relay = Arc::new(
            Relay::new(
                &config,
                crate::realtime::Sessions::default(),
                Arc::clone(&tls),
            )
            .unwrap(),
        );
        let routes = config.routes.by_template();
        let (template, specs) = routes
            .iter()
            .find(|(template, _)| template.as_str() == "/v1/chat/completions")
            .unwrap();
        let endpoint = TemplateEndpoint::new(forwarder, relay, &metrics, template, specs);
        let request = Request::builder()
            .method(Method::POST)
            .uri(http::Uri::from_static("/v1/chat/completions"))
            .header(header::AUTHORIZATION, "Bearer sk-test")
            .content_type("application/json")
            .body("{}");
        let future = endpoint.call(request);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "a forwarded request's future is {size} bytes");
    }
}
