//! A request's life, once, phase by phase. Both engines hand every API request here and
//! write back the [`Answer`] they get; neither decides anything about it.
//!
//! 1. **Client address and access** ([`access`]): the address the request comes from, and
//!    whether it may use the gateway (`access.allowed_ips`, 403).
//! 2. **Route and method**: the route of the path template the engine's router matched, by
//!    method (405), and its path parameters (400).
//! 3. **Credential and limits** ([`access`], [`limits`]): a key is presented (401), allowed
//!    (`access.allowed_key_hashes`), and within the `[limits]` rates and caps (429).
//! 4. **Body policy** ([`body`]): the size limit that applies and the content type (413,
//!    415), and the rules the body is read by.
//! 5. **The upstream request** ([`outbound`]): the URL and the header rules.
//! 6. **Send** ([`Upstream::send`]): the answer's head is awaited while the upload shows
//!    life, within the read timeout (504).
//! 7. **The answer's head and errors** ([`answer`]): headers of the upstream's connection go;
//!    a failure is classified by who failed (502, 504, 413, 408).
//! 8. **The log line, metrics and usage tap** ([`relay`]): the answer's body streams through,
//!    counted and read; the line is written when it ends.
//!
//! Phases 1–4 run in [`Endpoint::admit`], from the request's head, before any body is read or
//! the upstream contacted; 5–8 in [`Admitted::forward`], once the engine has the body in the
//! form it reads it. A WebSocket route opens a session ([`crate::realtime`]) at phase 5
//! instead. A refusal at any phase is rendered, counted and logged here ([`error`]).
//!
//! Nothing here names an engine: requests and answers are `http` types, and bodies are
//! `Bytes` or streams.

pub mod access;
pub mod answer;
pub mod body;
pub mod error;
pub mod limits;
mod outbound;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use tokio::time::Instant;

pub use access::KeyId;
pub use answer::{Answer, AnswerBody};
use body::{BodyRules, Bound, Setting, UploadBody, UploadProgress};
pub use error::GatewayError;
use limits::{Admission, Limiter};
use relay::{Opening, Relay, RequestLog};

use crate::config::{AccessConfig, Config, ConfigError};
use crate::observe::log;
use crate::observe::metrics::{Metrics, RouteMetrics};
use crate::realtime::{self, ClientUpgrade, Realtime, Session, Sessions};
use crate::routes::{check_path_param, BodyKind, PathTemplate, RouteSpec};
use crate::upstream::{self, Head, OutboundBody, Upstream};

/// What one worker serves one manifest with: the settings every phase reads, the worker's
/// upstream (and so its connection pools), and what all workers share.
pub struct Pipeline {
    access: AccessConfig,
    limiter: Arc<Limiter>,
    bodies: BodyRules,
    read_timeout: Duration,
    upstream: Upstream,
    realtime: Realtime,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    /// The pipeline of `config`. The limiter, metrics and sessions outlive a reload; the TLS
    /// settings are read once per manifest.
    pub fn new(
        config: &Config,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        sessions: Sessions,
        tls: &rustls::ClientConfig,
    ) -> Result<Pipeline, ConfigError> {
        Ok(Pipeline {
            access: config.access.clone(),
            limiter,
            bodies: BodyRules::new(&config.limits, &config.server),
            read_timeout: config.upstream.read_timeout,
            upstream: Upstream::new(&config.upstream, tls)?,
            realtime: Realtime::new(&config.realtime, sessions),
            metrics,
        })
    }

    /// An endpoint for every path template of `config`'s routes, in manifest order: what the
    /// engines' routers map paths to.
    pub fn endpoints(self: &Arc<Self>, config: &Config) -> Vec<(PathTemplate, Arc<Endpoint>)> {
        config
            .routes
            .by_template()
            .into_iter()
            .map(|(template, routes)| {
                let name: Arc<str> = Arc::from(template.as_str());
                let methods = routes
                    .iter()
                    .map(|route| MethodRoute {
                        spec: (*route).clone(),
                        metrics: Arc::new(self.metrics.route(&name, &route.method)),
                    })
                    .collect();
                let endpoint = Endpoint {
                    pipeline: Arc::clone(self),
                    template: name,
                    methods,
                };
                (template.clone(), Arc::new(endpoint))
            })
            .collect()
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Phase 1 alone, for the gateway's own endpoints (docs, metrics): `Err` is the 403.
    // An answer is as large as a forwarded one's (see `AnswerBody`); boxing it per refusal
    // would buy nothing.
    #[allow(clippy::result_large_err)]
    pub fn screen(
        &self,
        method: &Method,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Result<(), Answer> {
        self.access
            .check_ip(peer.map(|peer| peer.ip()), headers)
            .map_err(|err| self.refuse_address(method, Instant::now(), &err))
    }

    /// The answer to a path no route has: phase 2 for a request no endpoint took.
    pub fn unknown_route(&self, method: &Method, path: &str, start: Instant) -> Answer {
        self.metrics
            .count_request(&Arc::from("(no route)"), method, 404);
        log::rejected(
            method,
            "(no route)",
            404,
            start,
            "no route matches the path",
        );
        Answer::error(&GatewayError::UnknownRoute {
            method: method.clone(),
            path: path.to_owned(),
        })
    }

    fn refuse_address(&self, method: &Method, start: Instant, err: &GatewayError) -> Answer {
        let status = err.status().as_u16();
        self.metrics
            .count_request(&Arc::from("(access)"), method, status);
        log::rejected(
            method,
            "(access)",
            status,
            start,
            "client address not in access.allowed_ips",
        );
        Answer::error(err)
    }

    /// `upstream.read_timeout`, or the route's own.
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
}

/// Why a request got no answer head.
enum Unanswered {
    /// The upstream was silent past the read timeout.
    Silent,
    Failed(upstream::SendError),
}

/// One method of a template: its manifest entry and its metric handles.
struct MethodRoute {
    spec: RouteSpec,
    metrics: Arc<RouteMetrics>,
}

/// Every method of one path template: what an engine's router maps a path to.
pub struct Endpoint {
    pipeline: Arc<Pipeline>,
    template: Arc<str>,
    methods: Vec<MethodRoute>,
}

/// A request's head as an engine hands it over.
pub struct Request {
    pub method: Method,
    /// Path and query as sent, without the path secret in front.
    pub target: PathAndQuery,
    pub headers: HeaderMap,
    /// The peer's address: the client's, or a proxy's in front of it.
    pub peer: Option<SocketAddr>,
    /// A body follows (HTTP/2 may carry one without `Content-Length`).
    pub has_body: bool,
}

/// The client's body, in the form its engine reads it.
pub enum ClientBody {
    /// All of it, read before sending (possibly empty).
    Whole(Bytes),
    /// As it arrives.
    Stream(BoxBody<Bytes, std::io::Error>),
}

impl Endpoint {
    /// The path template, as the manifest writes it.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Where the template's first route stands in the manifest, for messages.
    pub fn manifest_index(&self) -> usize {
        self.methods.first().map_or(0, |route| route.spec.index)
    }

    /// Phases 1–4: everything decided from the head, before any body is read or the
    /// upstream contacted. `Err` is the gateway's answer, already counted and logged.
    // The refusal is an answer like any other (see `AnswerBody`): not boxed.
    #[allow(clippy::result_large_err)]
    pub fn admit(&self, request: Request) -> Result<Admitted<'_>, Answer> {
        let start = Instant::now();
        let Request {
            method,
            target,
            headers,
            peer,
            has_body,
        } = request;
        let pipeline = &*self.pipeline;
        // 1. Client address and access.
        if let Err(err) = pipeline
            .access
            .check_ip(peer.map(|peer| peer.ip()), &headers)
        {
            return Err(pipeline.refuse_address(&method, start, &err));
        }
        // 2. Route and method.
        let Some(route) = self
            .methods
            .iter()
            .find(|route| route.spec.method == method)
        else {
            let err = GatewayError::MethodNotAllowed {
                method: method.clone(),
                template: self.template.to_string(),
                allowed: self.methods.iter().map(|r| r.spec.method.clone()).collect(),
            };
            return Err(self.reject(&method, start, &err));
        };
        let checked = check_path_params(&route.spec, target.path())
            // 3. Credential and limits.
            .and_then(|()| self.admit_key(&headers, peer))
            // 4. Body policy.
            .and_then(|(admission, key)| {
                let limit = pipeline.bodies.check(&route.spec, &headers, has_body)?;
                Ok((admission, key, limit))
            });
        match checked {
            Ok((admission, key, limit)) => Ok(Admitted {
                endpoint: self,
                route,
                method,
                target,
                headers,
                key,
                admission,
                start,
                limit,
            }),
            Err(err) => Err(self.reject(&method, start, &err)),
        }
    }

    /// Phase 3: a key is presented and allowed, then the rate and concurrency limits.
    fn admit_key(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<(Admission, KeyId), GatewayError> {
        let pipeline = &*self.pipeline;
        // The first key presented; none at all is refused before anything else.
        let Some(key) = access::presented_key(headers) else {
            return Err(GatewayError::MissingCredential);
        };
        pipeline.access.check_key(headers)?;
        let ip = peer.map(|peer| pipeline.access.client_ip(peer.ip(), headers));
        let key = KeyId::of(key);
        let admission = pipeline.limiter.admit(ip, &key.hash).inspect_err(|err| {
            if let GatewayError::RateLimited { setting, .. }
            | GatewayError::TooBusy { setting, .. } = err
            {
                pipeline.metrics.count_rate_limited(setting);
            }
        })?;
        Ok((admission, key))
    }

    /// An answer to a request of `route`, counted.
    fn answered(&self, route: &MethodRoute, start: Instant, answer: Answer) -> Answer {
        route.metrics.count_status(answer.status.as_u16());
        route.metrics.observe_response_headers(start.elapsed());
        answer
    }

    /// The answer to a request of `route` that failed after admission, counted as the
    /// upstream's failure when it was one.
    fn failed(
        &self,
        route: &MethodRoute,
        method: &Method,
        start: Instant,
        err: &GatewayError,
    ) -> Answer {
        if let Some(kind) = answer::upstream_error_kind(err) {
            route.metrics.count_upstream_error(kind);
        }
        self.reject(method, start, err)
    }

    /// The gateway's answer to a request it refuses, counted under this route and logged.
    fn reject(&self, method: &Method, start: Instant, err: &GatewayError) -> Answer {
        let answer = Answer::error(err);
        let status = answer.status.as_u16();
        self.pipeline
            .metrics
            .count_request(&self.template, method, status);
        log::rejected(method, &self.template, status, start, &err.to_string());
        answer
    }
}

/// Phase 2's check of each path parameter (a route without parameters has nothing to check).
fn check_path_params(route: &RouteSpec, path: &str) -> Result<(), GatewayError> {
    for (param, decoded) in route.template.params_in(path) {
        check_path_param(decoded.as_deref()).map_err(|problem| GatewayError::InvalidPathParam {
            param: param.to_owned(),
            problem: problem.describe(),
        })?;
    }
    Ok(())
}

/// A request through phases 1–4, waiting for its body.
pub struct Admitted<'a> {
    endpoint: &'a Endpoint,
    route: &'a MethodRoute,
    method: Method,
    target: PathAndQuery,
    headers: HeaderMap,
    key: KeyId,
    admission: Admission,
    start: Instant,
    limit: Bound<u64>,
}

impl Admitted<'_> {
    /// The most of the body that may be read.
    pub fn body_limit(&self) -> u64 {
        self.limit.value
    }

    /// The longest silence allowed inside the body (`server.body_read_timeout`).
    pub fn body_idle(&self) -> Duration {
        self.endpoint.pipeline.bodies.idle
    }

    /// The answer when the client stalled mid-body while its engine read it whole.
    pub fn body_stalled(self) -> Answer {
        let err = GatewayError::ClientBodyTimeout {
            timeout: self.body_idle(),
        };
        self.endpoint.reject(&self.method, self.start, &err)
    }

    /// Phases 5–8: the upstream request, sending it, the answer's head, and the body on its
    /// way back through the log line, metrics and usage tap. `upgrade` is the client's side
    /// of a WebSocket, when its engine can switch protocols.
    ///
    /// One `async fn` from here to the answer, with `self` taken apart in place: each nested
    /// one would keep its own copy of what it was given for as long as the request waits.
    pub async fn forward(mut self, body: ClientBody, upgrade: Option<ClientUpgrade>) -> Answer {
        let (endpoint, route, start) = (self.endpoint, self.route, self.start);
        if route.spec.accepts(BodyKind::WebSocket) {
            let method = self.method.clone();
            // Why boxed: a handshake's future is far larger than a forwarded request's, and
            // would size every one.
            return match Box::pin(self.open_session(upgrade)).await {
                Ok(answer) => endpoint.answered(route, start, answer),
                Err(err) => endpoint.failed(route, &method, start, &err),
            };
        }
        let pipeline = &*endpoint.pipeline;
        let upload = UploadProgress::starting_at(start);
        let body = match body {
            ClientBody::Whole(body) => {
                upload.record_whole(body.len() as u64);
                OutboundBody::Whole(body)
            }
            ClientBody::Stream(body) => {
                let chunks = http_body_util::BodyDataStream::new(body);
                let counted = UploadBody::new(
                    chunks,
                    self.limit.value,
                    pipeline.bodies.idle,
                    Arc::clone(&upload),
                );
                let frames = futures_util::StreamExt::map(counted, |chunk| {
                    chunk.map(hyper::body::Frame::data)
                });
                OutboundBody::Stream(http_body_util::StreamBody::new(frames).boxed())
            }
        };
        // 5. The upstream request.
        let headers = std::mem::take(&mut self.headers);
        let target = pipeline.upstream.target();
        let request =
            match outbound::request(target, self.method.clone(), &self.target, headers, body) {
                Ok(request) => request,
                Err(err) => return endpoint.failed(route, &self.method, start, &err),
            };
        // 6. Send, and wait for the answer's head while the request shows life: the wait
        // restarts with every uploaded chunk, so a long upload is never cut, only silence is.
        let read_timeout = pipeline.read_timeout(&route.spec);
        let in_flight = route.metrics.all().in_flight();
        let sent = Instant::now();
        let sending = pipeline.upstream.send(request);
        tokio::pin!(sending);
        let silence = tokio::time::sleep(read_timeout.value);
        tokio::pin!(silence);
        let response = loop {
            tokio::select! {
                biased;
                result = &mut sending => break result.map_err(Unanswered::Failed),
                () = silence.as_mut() => {
                    let deadline = upload.last_activity() + read_timeout.value;
                    if deadline <= Instant::now() {
                        break Err(Unanswered::Silent);
                    }
                    silence.as_mut().reset(deadline);
                }
            }
        };
        // 7. The answer's head, or who failed.
        let mut response = match response {
            Ok(response) => response,
            Err(unanswered) => {
                let err = match unanswered {
                    Unanswered::Silent => GatewayError::UpstreamTimeout {
                        setting: read_timeout.setting.to_string(),
                        timeout: read_timeout.value,
                    },
                    Unanswered::Failed(err) => {
                        let timeouts = answer::Timeouts {
                            connect: pipeline.upstream.connect_timeout(),
                            body_idle: pipeline.bodies.idle,
                        };
                        answer::classify(err, &upload, self.limit, &timeouts)
                    }
                };
                return endpoint.failed(route, &self.method, start, &err);
            }
        };
        let upstream_ttfb = sent.elapsed();
        route.metrics.observe_upstream_ttfb(upstream_ttfb);
        answer::strip_connection_headers(&mut response.head);
        // 8. The log line, metrics and usage tap, as the body streams back.
        let opening = Opening {
            method: self.method,
            route: Arc::clone(&endpoint.template),
            metrics: Arc::clone(&route.metrics),
            key: self.key,
            start,
            admission: self.admission,
            upload,
            upstream_ttfb,
            in_flight,
            usage: route.spec.usage,
        };
        let log = RequestLog::open(opening, response.status, &response.head);
        let answer = Answer {
            status: response.status,
            head: response.head,
            body: AnswerBody::Relay(Relay::new(response.body, read_timeout.value, log)),
        };
        endpoint.answered(route, start, answer)
    }

    /// Phases 5–8 for a WebSocket route: the session opens upstream first, so a refusal
    /// reaches the client as the upstream's own answer.
    async fn open_session(self, upgrade: Option<ClientUpgrade>) -> Result<Answer, GatewayError> {
        let client_key =
            realtime::client_key(&self.headers).map_err(GatewayError::NotAWebSocket)?;
        let upgrade = upgrade.ok_or_else(|| {
            GatewayError::Internal(
                "this connection cannot switch to a WebSocket (it needs HTTP/1.1)".to_owned(),
            )
        })?;
        let pipeline = &*self.endpoint.pipeline;
        let joined = outbound::path(pipeline.upstream.target(), &self.target)?;
        let session = Session {
            route: Arc::clone(&self.endpoint.template),
            metrics: Arc::clone(&self.route.metrics),
            key_hash: (*self.key.prefix()).to_owned(),
            start: self.start,
            held: self.admission,
        };
        let headers = outbound::headers(self.headers);
        let opened = pipeline
            .realtime
            .open(
                &pipeline.upstream,
                joined,
                headers,
                &client_key,
                upgrade,
                session,
            )
            .await;
        match opened {
            Ok(realtime::Opened::Switching(headers)) => Ok(Answer {
                status: StatusCode::SWITCHING_PROTOCOLS,
                head: Head::Map(headers),
                body: AnswerBody::Full(Bytes::new()),
            }),
            Ok(realtime::Opened::Refused(refusal)) => {
                let (parts, body) = refusal.into_parts();
                let mut head = Head::Map(parts.headers);
                answer::strip_connection_headers(&mut head);
                Ok(Answer {
                    status: parts.status,
                    head,
                    body: AnswerBody::Full(body),
                })
            }
            Err(realtime::Failed::TimedOut(timeout)) => {
                Err(GatewayError::UpstreamConnectTimeout { timeout })
            }
            Err(realtime::Failed::Unreachable(err)) => Err(GatewayError::UpstreamUnreachable(err)),
        }
    }
}
