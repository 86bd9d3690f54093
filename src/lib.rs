//! oa-bypass: a self-hosted passthrough gateway for the OpenAI API.
//!
//! [`app`] builds the whole gateway from a [`Config`] as a poem endpoint, so tests and the
//! binary serve exactly the same thing. The request path is `cors` → router (one endpoint per
//! path template of the manifest) → `proxy`.

pub mod access;
pub mod config;
pub mod cors;
pub mod error;
pub mod headers;
pub mod limits;
pub mod observe;
pub mod openapi;
pub mod proxy;
pub mod realtime;
pub mod routes;
pub mod server;
pub mod tls;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{header, StatusCode};
use poem::endpoint::BoxEndpoint;
use poem::error::NotFoundError;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};

use config::AdmissionConfig;
pub use config::{Config, ConfigError};
use error::GatewayError;
use limits::Limiter;
use observe::metrics::{self, Metrics};
use proxy::lane::Lane;
use proxy::{Forwarder, SharedTemplate, TemplateEndpoint};

/// What `GET /` and `GET /health` answer, as the original gateway did.
pub const HEALTH_TEXT: &str = "OpenAI API Server is running";
/// Readiness: 200 once the manifest is loaded (and, with `upstream.ready_check`, the
/// upstream answers).
pub const READY_PATH: &str = "/ready";
/// Prometheus metrics (under the path secret, when one is set).
pub const METRICS_PATH: &str = "/metrics";
const GATEWAY_PATHS: [&str; 6] = [
    "/",
    "/health",
    READY_PATH,
    METRICS_PATH,
    openapi::DOCUMENT_PATH,
    openapi::DOCS_PATH,
];
/// How long a `/ready` upstream check is reused, so probes cannot flood the upstream.
const READY_CHECK_TTL: Duration = Duration::from_secs(5);

/// What outlives a reload of the manifest: realtime sessions, metrics, the limiter's state.
pub struct Shared {
    pub sessions: realtime::Sessions,
    pub metrics: Arc<Metrics>,
    /// The limiter and the settings it was built for: a reload with the same `[limits]`
    /// keeps it, so buckets and in-flight counts carry over.
    limiter: Mutex<Option<(AdmissionConfig, Arc<Limiter>)>>,
    generation: AtomicU64,
}

impl Shared {
    fn new(config: &Config) -> Shared {
        Shared {
            sessions: realtime::Sessions::default(),
            metrics: Arc::new(Metrics::new(&config.metrics)),
            limiter: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    fn limiter(&self, config: &AdmissionConfig) -> Arc<Limiter> {
        let Ok(mut slot) = self.limiter.lock() else {
            return Arc::new(Limiter::new(config));
        };
        match &*slot {
            Some((built_for, limiter)) if built_for == config => Arc::clone(limiter),
            _ => {
                let limiter = Arc::new(Limiter::new(config));
                *slot = Some((config.clone(), Arc::clone(&limiter)));
                limiter
            }
        }
    }

    /// How many manifests have been loaded: 1 at start, one more per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

/// The gateway, ready to serve: the endpoint built from the current manifest (swapped
/// whole on reload; requests in flight keep the one they started with) and the state that
/// outlives it.
pub struct App {
    /// What each worker serves with (its endpoint and fast lane): each worker's requests use
    /// its own upstream pools, so a request's tasks stay on one thread.
    current: Vec<ArcSwap<Worker>>,
    /// The `[server]` settings the process started with; they need a restart to change.
    server: config::ServerConfig,
    log: config::LogConfig,
    pub shared: Arc<Shared>,
}

/// Builds the gateway from `config`, for one worker (tests, or a single runtime).
pub fn app(config: &Config) -> Result<Arc<App>, ConfigError> {
    app_for_workers(config, 1)
}

/// Builds the gateway from `config` with one endpoint per worker.
pub fn app_for_workers(config: &Config, workers: usize) -> Result<Arc<App>, ConfigError> {
    let shared = Arc::new(Shared::new(config));
    let common = PerManifest::new(config)?;
    let current = (0..workers.max(1))
        .map(|_| build(config, &shared, &common).map(ArcSwap::from_pointee))
        .collect::<Result<Vec<_>, _>>()?;
    shared.generation.store(1, Ordering::Relaxed);
    Ok(Arc::new(App {
        current,
        server: config.server.clone(),
        log: config.log.clone(),
        shared,
    }))
}

/// What one worker serves with, for one manifest.
pub struct Worker {
    /// Everything, through poem's router.
    pub endpoint: BoxEndpoint<'static, Response>,
    /// The fast lane's routes, when the upstream allows the lane (`proxy::lane`).
    pub lane: Option<Arc<Lane>>,
}

impl App {
    /// What `worker`'s new requests are served with.
    pub fn worker(&self, worker: usize) -> Arc<Worker> {
        self.current[worker % self.current.len()].load_full()
    }

    /// The fast lane of the manifest loaded now, for `worker`.
    pub fn lane(&self, worker: usize) -> Option<Arc<Lane>> {
        self.current[worker % self.current.len()]
            .load()
            .lane
            .clone()
    }

    pub fn workers(&self) -> usize {
        self.current.len()
    }

    /// Serves `config` from now on. Requests and streams already running finish on the
    /// manifest they started with. On error nothing changes. Settings that only apply at
    /// start-up (`[server]`, `[log]`) are kept, with a warning when they differ.
    pub fn reload(&self, config: &Config) -> Result<(), ConfigError> {
        // Every worker's endpoint is built before any is swapped: all or nothing.
        let result = PerManifest::new(config).and_then(|common| {
            self.current
                .iter()
                .map(|_| build(config, &self.shared, &common))
                .collect::<Result<Vec<_>, _>>()
        });
        self.shared.metrics.count_reload(result.is_ok());
        for (slot, endpoint) in self.current.iter().zip(result?) {
            slot.store(Arc::new(endpoint));
        }
        self.shared.metrics.configure(&config.metrics);
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if config.server != self.server {
            tracing::warn!(
                "[server] settings changed in the manifest; they apply at the next restart"
            );
        }
        if config.log != self.log {
            tracing::warn!(
                "[log] settings changed in the manifest; they apply at the next restart"
            );
        }
        tracing::info!(
            manifest = %config.source,
            routes = config.routes.len(),
            generation,
            "manifest reloaded"
        );
        Ok(())
    }
}

/// What the workers' endpoints of one manifest share: the upstream TLS settings (the root
/// certificates are read once), and `/openapi.json` and `/docs`, built on their first request
/// (`None` with `openapi.enabled = false`).
struct PerManifest {
    tls: Arc<rustls::ClientConfig>,
    docs: Option<(Arc<openapi::LazyDocument>, Arc<openapi::LazyDocument>)>,
}

impl PerManifest {
    fn new(config: &Config) -> Result<PerManifest, ConfigError> {
        Ok(PerManifest {
            tls: Arc::new(realtime::client_tls_config()?),
            docs: config.openapi.enabled.then(|| docs(config)),
        })
    }
}

/// `/openapi.json` and `/docs` of one manifest, each built on its first request.
fn docs(config: &Config) -> (Arc<openapi::LazyDocument>, Arc<openapi::LazyDocument>) {
    let routes = config.clone();
    let document = openapi::LazyDocument::new("application/json", move || {
        serde_json::to_vec_pretty(&openapi::document(&routes))
            .map(Into::into)
            .map_err(|err| format!("cannot serialise the OpenAPI document: {err}"))
    });
    let title = config.openapi.title.clone();
    let html = openapi::LazyDocument::new("text/html; charset=utf-8", move || {
        openapi::swagger_ui_html(&title)
            .map(Into::into)
            .ok_or_else(|| {
                "the bundled Swagger UI page has an unexpected shape; \
             set openapi.enabled = false to serve without it"
                    .to_owned()
            })
    });
    (Arc::new(document), Arc::new(html))
}

/// Builds the endpoint for one manifest: every route, health and readiness, metrics,
/// OpenAPI, JSON 404s, CORS; and the fast lane beside it.
fn build(
    config: &Config,
    shared: &Arc<Shared>,
    common: &PerManifest,
) -> Result<Worker, ConfigError> {
    let limiter = shared.limiter(&config.limits.admission);
    let forwarder = Arc::new(Forwarder::new(config, limiter, &common.tls)?);
    let relay = Arc::new(realtime::Relay::new(
        config,
        shared.sessions.clone(),
        Arc::clone(&common.tls),
    )?);
    let access = Arc::new(config.access.clone());
    let metrics = &shared.metrics;
    let mut api = Route::new();
    if let Some(docs) = &common.docs {
        api = api
            .at(
                openapi::DOCUMENT_PATH,
                access::IpFilter::new(Arc::clone(&docs.0), &access, metrics),
            )
            .at(
                openapi::DOCS_PATH,
                access::IpFilter::new(Arc::clone(&docs.1), &access, metrics),
            );
    }
    if config.metrics.enabled {
        api = api.at(
            METRICS_PATH,
            access::IpFilter::new(MetricsEndpoint(Arc::clone(metrics)), &access, metrics),
        );
    }
    let mut templates = Vec::new();
    for (template, specs) in config.routes.by_template() {
        let index = specs.first().map_or(0, |spec| spec.index);
        if GATEWAY_PATHS.contains(&template.as_str()) {
            return Err(ConfigError::Invalid(vec![format!(
                "routes[{index}].path: {template} is served by the gateway itself"
            )]));
        }
        let endpoint = Arc::new(TemplateEndpoint::new(
            Arc::clone(&forwarder),
            Arc::clone(&relay),
            metrics,
            template,
            &specs,
        ));
        templates.push(Arc::clone(&endpoint));
        api = api
            .try_at(
                template.to_poem_path(),
                access::IpFilter::new(SharedTemplate(endpoint), &access, metrics),
            )
            .map_err(|err| {
                ConfigError::Invalid(vec![format!(
                    "routes[{index}].path: the router refused {template}: {err}"
                )])
            })?;
    }
    let ready = Ready::new(config, shared, &forwarder);
    // Liveness and readiness stay at the root for probes; with a path secret, everything
    // else moves under it and the bare paths answer 404.
    let router = match &config.access.path_secret {
        None => api
            .at("/", Health)
            .at("/health", Health)
            .at(READY_PATH, ready),
        Some(secret) => Route::new()
            .at("/", Health)
            .at("/health", Health)
            .at(READY_PATH, ready)
            .nest(format!("/{secret}"), api),
    };
    let not_found = JsonNotFound {
        inner: router,
        metrics: Arc::clone(metrics),
        route_name: Arc::from("(no route)"),
    };
    Ok(Worker {
        endpoint: cors::Cors::new(not_found, config.cors.clone()).boxed(),
        lane: Lane::new(templates, config, metrics, &forwarder).map(Arc::new),
    })
}

/// `GET /` and `GET /health`: liveness, no upstream call.
struct Health;

impl Endpoint for Health {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Err(err) = error::only_reads(&req) {
            return Ok(err.to_response());
        }
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(HEALTH_TEXT))
    }
}

/// Turns the router's "no such path" into OpenAI's own answer for an unknown URL.
struct JsonNotFound<E> {
    inner: E,
    metrics: Arc<Metrics>,
    route_name: Arc<str>,
}

impl<E: Endpoint> Endpoint for JsonNotFound<E> {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let start = tokio::time::Instant::now();
        let method = req.method().clone();
        // A reference-counted copy: the path is only written out for a 404.
        let uri = req.uri().clone();
        let inner = self.inner.call(req);
        async move {
            match inner.await {
                Ok(output) => Ok(output.into_response()),
                Err(err) if err.is::<NotFoundError>() => {
                    self.metrics.count_request(&self.route_name, &method, 404);
                    crate::observe::log::rejected(
                        &method,
                        "(no route)",
                        404,
                        start,
                        "no route matches the path",
                    );
                    Ok(GatewayError::UnknownRoute {
                        method,
                        path: uri.path().to_owned(),
                    }
                    .to_response())
                }
                Err(err) => Err(err),
            }
        }
    }
}

/// `GET /metrics`: the Prometheus exposition.
struct MetricsEndpoint(Arc<Metrics>);

impl Endpoint for MetricsEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Err(err) = error::only_reads(&req) {
            return Ok(err.to_response());
        }
        match self.0.encode() {
            Ok(text) => Ok(Response::builder()
                .header(header::CONTENT_TYPE, metrics::CONTENT_TYPE)
                .header(header::CACHE_CONTROL, "no-store")
                .body(text)),
            Err(_) => {
                Ok(GatewayError::Internal("cannot encode the metrics".to_owned()).to_response())
            }
        }
    }
}

/// `GET /ready`: 200 with what is loaded; 503 when `upstream.ready_check` is on and the
/// upstream is unreachable.
struct Ready {
    shared: Arc<Shared>,
    manifest: String,
    routes: usize,
    check: Option<UpstreamCheck>,
}

/// A GET of `upstream.base_url` through the forwarder's own client (so its proxy and TLS
/// settings apply). Any HTTP answer, even 401 or 404, means reachable.
struct UpstreamCheck {
    forwarder: Arc<Forwarder>,
    url: String,
    timeout: Duration,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl UpstreamCheck {
    async fn run(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < READY_CHECK_TTL {
                return result.clone();
            }
        }
        let result = tokio::time::timeout(self.timeout, self.forwarder.probe(&self.url))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ))
            });
        *last = Some((tokio::time::Instant::now(), result.clone()));
        result
    }
}

impl Ready {
    fn new(config: &Config, shared: &Arc<Shared>, forwarder: &Arc<Forwarder>) -> Ready {
        Ready {
            shared: Arc::clone(shared),
            manifest: config.source.to_string(),
            routes: config.routes.len(),
            check: config.upstream.ready_check.then(|| UpstreamCheck {
                forwarder: Arc::clone(forwarder),
                url: config.upstream.base_url.to_string(),
                timeout: config.upstream.connect_timeout,
                last: tokio::sync::Mutex::new(None),
            }),
        }
    }
}

impl Endpoint for Ready {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Err(err) = error::only_reads(&req) {
            return Ok(err.to_response());
        }
        let upstream = match &self.check {
            None => serde_json::json!({ "checked": false }),
            Some(check) => match check.run().await {
                Ok(()) => serde_json::json!({ "checked": true, "reachable": true }),
                Err(error) => {
                    serde_json::json!({ "checked": true, "reachable": false, "error": error })
                }
            },
        };
        let unreachable = upstream.get("reachable") == Some(&serde_json::Value::Bool(false));
        let status = if unreachable {
            "upstream_unreachable"
        } else {
            "ready"
        };
        let body = serde_json::json!({
            "status": status,
            "config": {
                "loaded": true,
                "manifest": self.manifest,
                "routes": self.routes,
                "generation": self.shared.generation(),
            },
            "upstream": upstream,
            "realtime_sessions": self.shared.sessions.open(),
        });
        let code = if status == "ready" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Ok(Response::builder()
            .status(code)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-store")
            .body(body.to_string()))
    }
}
