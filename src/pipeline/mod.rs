//! A request's life, once, phase by phase. Both engines hand every API request here and
//! write back the [`Answer`] they get; neither decides anything about it.
//!
//! 1. **Client address and access** ([`access`]): the address the request comes from, and
//!    whether it may use the gateway (`access.allowed_ips`, 403).
//! 2. **Route and method**: the route of the path template the engine's router matched, by
//!    method (405), and its path parameters (400).
//! 3. **Credential and limits** ([`access`], [`budget`], [`limits`]): a key is presented
//!    (401), allowed (`access.allowed_key_hashes` or `[keys]`); a named key within its last
//!    day (401), its route tags (403), its rates and budgets (429); and the `[limits]` rates
//!    and caps (429).
//! 4. **Body policy** ([`body`], [`govern`]): the size limit that applies and the content
//!    type (413, 415), and the rules the body is read by; a named key's model (403).
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

pub(crate) mod access;
mod admit;
mod aliases;
mod answer;
mod body;
mod budget;
mod error;
mod failover;
mod forward;
mod govern;
pub(crate) mod health;
pub(crate) mod keys;
pub(crate) mod limits;
mod model;
mod mount;
mod outbound;
mod relay;
mod session;
mod spend;
mod stream_usage;
mod timer;
mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use tokio::time::Instant;

use admit::MethodRoute;
pub(crate) use admit::{Admitted, Endpoint, Request};
pub(crate) use answer::Answer;

use crate::ledger::Ledger;
pub(crate) use error::GatewayError;
use health::{Health, RetryBudget};
use keys::KeyPool;
use limits::Limiter;
use mount::Mount;
pub(crate) use relay::Relay;
pub(crate) use timer::Timer;

use crate::config::{Config, ConfigError, UpstreamConfig, DEFAULT_MOUNT};
use crate::observe::log::Record;
use crate::observe::metrics::Metrics;
use crate::realtime::{Realtime, Sessions};
use crate::routes::{PathTemplate, RouteSpec, RouteTable};
use crate::upstream::Upstream;

/// What one worker serves one manifest with: the manifest's settings (shared by the workers
/// and read where a phase needs one), the worker's upstreams (and so its connection pools),
/// and what all workers share.
pub(crate) struct Pipeline {
    config: Arc<Config>,
    limiter: Arc<Limiter>,
    /// What named keys have spent.
    ledger: Arc<Ledger>,
    /// Present when traces are on.
    traces: Option<trace::Traced>,
    /// `[upstream]`.
    default_mount: Arc<Mount>,
    /// Each `[mounts.NAME]`, in the order of `Config::mounts`.
    mounts: Vec<Arc<Mount>>,
    realtime: Realtime,
    metrics: Arc<Metrics>,
    /// How many retries the gateway may still send.
    retry_budget: Arc<RetryBudget>,
}

/// What a pipeline shares with the next manifest's: the limiter, the ledger, and the key
/// pools and mounts' health (by mount name), the retry budget.
pub(crate) struct Kept {
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) pools: Vec<(Arc<str>, Arc<KeyPool>)>,
    pub(crate) health: Vec<(Arc<str>, Arc<Health>)>,
    pub(crate) retry_budget: Arc<RetryBudget>,
}

impl Pipeline {
    /// The pipeline of `config`. What is `kept`, the metrics and the sessions outlive a
    /// reload; the TLS settings are read once per manifest.
    pub(crate) fn new(
        config: &Arc<Config>,
        kept: Kept,
        metrics: Arc<Metrics>,
        sessions: Sessions,
        tls: &rustls::ClientConfig,
    ) -> Result<Pipeline, ConfigError> {
        let Kept {
            limiter,
            ledger,
            pools,
            health,
            retry_budget,
        } = kept;
        let mount = |settings: &Arc<UpstreamConfig>| {
            let named = |name: &Arc<str>| **name == *settings.mount;
            let keys =
                (pools.iter().find(|(name, _)| named(name))).map(|(_, pool)| Arc::clone(pool));
            let health = (health.iter().find(|(name, _)| named(name))).map_or_else(
                || Arc::new(Health::new(&settings.mount, None)),
                |(_, h)| Arc::clone(h),
            );
            Mount::new(settings, keys, health, tls).map(Arc::new)
        };
        let mounts = (config.mounts.iter())
            .map(|settings| mount(&settings.upstream))
            .collect::<Result<_, _>>()?;
        Ok(Pipeline {
            config: Arc::clone(config),
            limiter,
            ledger,
            traces: trace::Traced::new(config),
            default_mount: mount(&config.upstream)?,
            mounts,
            realtime: Realtime::new(&config.realtime, sessions),
            metrics,
            retry_budget,
        })
    }

    /// An endpoint for every path template the manifest serves: its routes, then each
    /// mount's under its prefix. What the engines' routers map paths to.
    pub(crate) fn endpoints(
        self: &Arc<Self>,
    ) -> Result<Vec<(PathTemplate, Arc<Endpoint>)>, ConfigError> {
        let config = &self.config;
        let mut endpoints = self.endpoints_of(&config.routes, "", |route| {
            let named = route.upstream.as_deref().unwrap_or(DEFAULT_MOUNT);
            Arc::clone(self.mount(named))
        })?;
        // Mounts were made in the order of `config.mounts`.
        for (mount, settings) in self.mounts.iter().zip(&config.mounts) {
            let routes = settings.routes(&config.routes);
            endpoints.extend(self.endpoints_of(routes, &settings.prefix, |_| Arc::clone(mount))?);
        }
        Ok(endpoints)
    }

    /// The endpoints of `routes` served under `prefix`, each method sent to `mount_of` it.
    fn endpoints_of(
        self: &Arc<Self>,
        routes: &RouteTable,
        prefix: &str,
        mount_of: impl Fn(&RouteSpec) -> Arc<Mount>,
    ) -> Result<Vec<(PathTemplate, Arc<Endpoint>)>, ConfigError> {
        let config = &self.config;
        let mut endpoints = Vec::new();
        for (template, routes) in routes.by_template() {
            let mut methods = Vec::with_capacity(routes.len());
            for route in routes {
                let spec = route.under(prefix).map_err(|err| {
                    ConfigError::Invalid(vec![format!("{prefix}{template}: {err}")])
                })?;
                let mount = mount_of(route);
                let name: Arc<str> = Arc::from(spec.template.as_str());
                let metrics = self
                    .metrics
                    .route(&name, &route.method, &mount.settings.mount);
                // `[models]` applies on the unprefixed path only.
                let unprefixed = prefix.is_empty() && !config.models.is_empty();
                methods.push(MethodRoute {
                    routes_by_model: unprefixed && spec.route_by_model,
                    lists_aliases: unprefixed
                        && spec.method == Method::GET
                        && spec.template.as_str() == MODELS_LIST
                        && config.models.aliases().next().is_some(),
                    spec,
                    mount,
                    metrics: Arc::new(metrics),
                });
            }
            let Some(first) = methods.first() else {
                continue;
            };
            let template = first.spec.template.clone();
            let endpoint = Endpoint {
                pipeline: Arc::clone(self),
                template: Arc::from(template.as_str()),
                prefix_len: prefix.len(),
                methods,
            };
            endpoints.push((template, Arc::new(endpoint)));
        }
        Ok(endpoints)
    }

    /// The limits store, for `/ready`.
    pub(crate) fn store(&self) -> Option<&crate::store::Store> {
        self.limiter.store()
    }

    /// `[upstream]`'s transports, for `/ready`.
    pub(crate) fn upstream(&self) -> &Upstream {
        &self.default_mount.upstream
    }

    /// Each mount (`[upstream]` first) and whether it is out of turn now, for `/ready`; with
    /// the variables of the held keys resting after a 429.
    pub(crate) fn health(&self) -> Vec<(Arc<str>, bool, Vec<Arc<str>>)> {
        std::iter::once(&self.default_mount)
            .chain(&self.mounts)
            .map(|mount| {
                let resting = (mount.keys.as_ref())
                    .map(|pool| pool.resting())
                    .unwrap_or_default();
                (
                    Arc::clone(&mount.settings.mount),
                    mount.health.is_ejected(),
                    resting,
                )
            })
            .collect()
    }

    /// The mount named `name`; the default one for a name the manifest did not declare
    /// (validation refuses routes that name one).
    fn mount(&self, name: &str) -> &Arc<Mount> {
        (self.mounts.iter())
            .find(|mount| &*mount.settings.mount == name)
            .unwrap_or(&self.default_mount)
    }

    /// Phase 1 alone, for the gateway's own endpoints (docs, metrics): `Err` is the 403.
    // An answer is a few words over clippy's bound; boxing each refusal would buy nothing.
    #[allow(clippy::result_large_err)]
    pub(crate) fn screen(
        &self,
        method: &Method,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Result<(), Answer> {
        self.config
            .access
            .check_ip(peer.map(|peer| peer.ip()), headers)
            .map_err(|err| self.refuse_address(method, Instant::now(), &err))
    }

    /// The answer to a path no route has: phase 2 for a request no endpoint took.
    pub(crate) fn unknown_route(&self, method: &Method, path: &str, start: Instant) -> Answer {
        let err = GatewayError::UnknownRoute {
            method: method.clone(),
            path: path.to_owned(),
        };
        let record = Record::open(method.clone(), Arc::from(NO_ROUTE), start);
        self.refuse(&record, &err, "no route matches the path")
    }

    fn refuse_address(&self, method: &Method, start: Instant, err: &GatewayError) -> Answer {
        let record = Record::open(method.clone(), Arc::from(ACCESS), start);
        self.refuse(&record, err, "client address not in access.allowed_ips")
    }

    /// The gateway's answer to a request it refuses for `err`: counted under its record's
    /// route (and under the limit that refused it), and its line written with `reason`.
    fn refuse(&self, record: &Record, err: &GatewayError, reason: &str) -> Answer {
        if let GatewayError::RateLimited { setting, .. } | GatewayError::TooBusy { setting, .. } =
            err
        {
            self.metrics.count_rate_limited(setting);
        }
        let answer = Answer::error(err);
        let status = answer.status.as_u16();
        self.metrics
            .count_request(&record.route, &record.method, status);
        if let Some(name) = &record.key_name {
            self.metrics.count_named(name, status, None);
        }
        record.write_refused(status, reason);
        answer
    }

    /// How long an event stream's upstream may be silent before the client gets a
    /// keep-alive: the route's `keepalive`, or `streaming.keepalive`.
    fn keepalive(&self, route: &RouteSpec) -> Option<Duration> {
        route.keepalive.or(self.config.streaming.keepalive)
    }

    /// The longest silence allowed inside a request body (`server.body_read_timeout`).
    fn body_idle(&self) -> Duration {
        self.config.server.body_read_timeout
    }

    /// The mount's `read_timeout`, or the route's own.
    fn read_timeout(route: &RouteSpec, mount: &Mount) -> Duration {
        route.read_timeout.unwrap_or(mount.settings.read_timeout)
    }

    /// Which setting [`Pipeline::read_timeout`] came from, for the message when it ends a
    /// wait. Made then rather than carried: every waiting request would hold it.
    fn read_timeout_setting(route: &RouteSpec, mount: &Mount) -> String {
        match route.read_timeout {
            Some(_) => format!("routes[{}].read_timeout", route.index),
            None => format!("{}.read_timeout", mount.settings.key_path),
        }
    }
}

/// The route whose answer lists the models, which gains `[models]`'s aliases.
const MODELS_LIST: &str = "/v1/models";

/// The route a request's line and metrics name when no route took it.
const NO_ROUTE: &str = "(no route)";
/// The route a request's line and metrics name when its address was refused.
const ACCESS: &str = "(access)";
