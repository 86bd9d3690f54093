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
//! 5. **The upstream request** ([`outbound`]): the URL and the header rules; a stream that
//!    did not ask for its usage is asked for it, when set ([`stream_usage`]).
//! 6. **Send** ([`Upstream::send`]): the answer's head is awaited while the upload shows
//!    life, within the read timeout (504).
//! 7. **The answer's head and errors** ([`answer`]): headers of the upstream's connection go,
//!    an event stream is marked for the proxies in front not to buffer it; a failure is
//!    classified by who failed (502, 504, 413, 408).
//! 8. **The log line, metrics and usage tap** ([`relay`]): the answer's body streams through,
//!    counted and read (a silent event stream kept alive, and a usage chunk the client did
//!    not ask for kept back, when set); the line is written when it ends.
//!
//! Phases 1–4 run in [`Endpoint::admit`], from the request's head, before any body is read or
//! the upstream contacted; 5–8 in [`Admitted::forward`], once the engine has the body in the
//! form it reads it. A WebSocket route opens a session ([`crate::realtime`]) at phase 5
//! instead. A refusal at any phase is rendered ([`Answer::error`]), counted and logged here.
//!
//! Nothing here names an engine: requests and answers are `http` types, bodies are `Bytes`
//! or streams, and an engine may lend the request a timer ([`Timer`]).

pub mod access;
mod admit;
pub mod answer;
pub mod body;
pub mod error;
mod forward;
pub mod limits;
mod outbound;
pub mod relay;
mod stream_usage;
mod timer;
mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use tokio::time::Instant;

pub use access::KeyId;
use admit::MethodRoute;
pub use admit::{Admitted, Endpoint, Request};
pub use answer::{Answer, AnswerBody};
use body::{BodyRules, Bound, Setting};
pub use error::GatewayError;
pub use forward::ClientBody;
use limits::Limiter;
pub use timer::Timer;

use crate::config::{AccessConfig, Config, ConfigError};
use crate::observe::log;
use crate::observe::metrics::Metrics;
use crate::realtime::{Realtime, Sessions};
use crate::routes::{PathTemplate, RouteSpec};
use crate::upstream::Upstream;

/// What one worker serves one manifest with: the settings every phase reads, the worker's
/// upstream (and so its connection pools), and what all workers share.
pub struct Pipeline {
    access: AccessConfig,
    limiter: Arc<Limiter>,
    bodies: BodyRules,
    read_timeout: Duration,
    /// `streaming.keepalive`.
    keepalive: Option<Duration>,
    /// `tracing.server_timing`.
    server_timing: bool,
    /// `usage.inject_stream_usage`.
    inject_stream_usage: bool,
    /// Present when traces are on.
    traces: Option<trace::Traced>,
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
            keepalive: config.streaming.keepalive,
            server_timing: config.tracing.server_timing,
            inject_stream_usage: config.usage.inject_stream_usage,
            traces: trace::Traced::new(config),
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
    // An answer is a few words over clippy's bound; boxing each refusal would buy nothing.
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

    /// How long an event stream's upstream may be silent before the client gets a
    /// keep-alive: the route's `keepalive`, or `streaming.keepalive`.
    fn keepalive(&self, route: &RouteSpec) -> Option<Duration> {
        route.keepalive.or(self.keepalive)
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
