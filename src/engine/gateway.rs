//! The routes of hyper's engine: every path template of the manifest, and the gateway's own
//! endpoints (liveness, readiness, metrics, the OpenAPI document and Swagger UI), behind
//! poem's router, with JSON 404s and CORS around them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use http::{header, Method, StatusCode};
use poem::endpoint::BoxEndpoint;
use poem::error::NotFoundError;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use tokio::time::Instant;

use super::cors::Cors;
use super::hyper::{into_response, TemplateRoute};
use crate::config::{Config, ConfigError, StoreFailure};
use crate::observe::metrics::{self, Metrics};
use crate::openapi::{self, HEALTH_TEXT};
use crate::pipeline::{Answer, Endpoint as PipelineEndpoint, GatewayError, Pipeline};
use crate::realtime::Sessions;
use crate::routes::{PathTemplate, DOCS_PATH, DOCUMENT_PATH, METRICS_PATH, READY_PATH, USAGE_PATH};

/// How long a `/ready` upstream check is reused, so probes cannot flood the upstream.
const READY_CHECK_TTL: Duration = Duration::from_secs(5);

/// What `/ready` reports beside the manifest: state that outlives a reload.
#[derive(Clone)]
pub(crate) struct Status {
    /// How many manifests have been loaded: 1 at start, one more per successful reload.
    pub generation: Arc<AtomicU64>,
    pub sessions: Sessions,
}

/// One worker's router for one manifest.
pub(crate) fn router(
    config: &Config,
    pipeline: &Arc<Pipeline>,
    endpoints: &[(PathTemplate, Arc<PipelineEndpoint>)],
    docs: Option<&Docs>,
    metrics: &Arc<Metrics>,
    status: Status,
) -> Result<BoxEndpoint<'static, Response>, ConfigError> {
    let mut api = Route::new();
    if let Some(docs) = docs {
        api = api
            .at(
                DOCUMENT_PATH,
                Screen::new(Arc::clone(&docs.document), pipeline),
            )
            .at(DOCS_PATH, Screen::new(Arc::clone(&docs.page), pipeline));
    }
    if config.metrics.enabled {
        let exposition = MetricsEndpoint(Arc::clone(metrics));
        api = api.at(METRICS_PATH, Screen::new(exposition, pipeline));
    }
    if !config.access.named_keys.is_empty() {
        api = api.at(USAGE_PATH, Usage(Arc::clone(pipeline)));
    }
    for (template, endpoint) in endpoints {
        api = api
            .try_at(template.to_poem_path(), TemplateRoute(Arc::clone(endpoint)))
            .map_err(|err| {
                ConfigError::Invalid(vec![format!(
                    "routes[{}].path: the router refused {template}: {err}",
                    endpoint.manifest_index()
                )])
            })?;
    }
    let ready = Ready {
        pipeline: Arc::clone(pipeline),
        manifest: config.source.to_string(),
        routes: config.routes.len(),
        status,
        check: config.upstream.ready_check.then(|| UpstreamCheck {
            last: tokio::sync::Mutex::new(None),
        }),
    };
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
        pipeline: Arc::clone(pipeline),
    };
    Ok(Cors::new(not_found, config.cors.clone()).boxed())
}

/// The gateway's own endpoints only read: anything but GET or HEAD is answered 405 with
/// `Allow: GET, HEAD`.
fn refuse_writes(req: &Request) -> Option<Response> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return None;
    }
    let err = GatewayError::MethodNotAllowed {
        method: req.method().clone(),
        template: req.uri().path().to_owned(),
        allowed: vec![Method::GET, Method::HEAD],
    };
    Some(into_response(Answer::error(&err)))
}

/// Refuses clients outside `access.allowed_ips` before a gateway endpoint looks at their
/// request (the pipeline's phase 1; API routes run it themselves).
struct Screen<E> {
    inner: E,
    pipeline: Arc<Pipeline>,
}

impl<E> Screen<E> {
    fn new(inner: E, pipeline: &Arc<Pipeline>) -> Screen<E> {
        Screen {
            inner,
            pipeline: Arc::clone(pipeline),
        }
    }
}

impl<E: Endpoint> Endpoint for Screen<E> {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let peer = req.remote_addr().as_socket_addr().copied();
        match self.pipeline.screen(req.method(), peer, req.headers()) {
            Ok(()) => {
                let inner = self.inner.call(req);
                Either::Left(async move { inner.await.map(IntoResponse::into_response) })
            }
            Err(refusal) => Either::Right(std::future::ready(Ok(into_response(refusal)))),
        }
    }
}

/// `GET /` and `GET /health`: liveness, no upstream call.
struct Health;

impl Endpoint for Health {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Some(refusal) = refuse_writes(&req) {
            return Ok(refusal);
        }
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(HEALTH_TEXT))
    }
}

/// Turns the router's "no such path" into OpenAI's own answer for an unknown URL.
struct JsonNotFound<E> {
    inner: E,
    pipeline: Arc<Pipeline>,
}

impl<E: Endpoint> Endpoint for JsonNotFound<E> {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let start = Instant::now();
        let method = req.method().clone();
        // A reference-counted copy: the path is only written out for a 404.
        let uri = req.uri().clone();
        let inner = self.inner.call(req);
        async move {
            match inner.await {
                Ok(output) => Ok(output.into_response()),
                Err(err) if err.is::<NotFoundError>() => Ok(into_response(
                    self.pipeline.unknown_route(&method, uri.path(), start),
                )),
                Err(err) => Err(err),
            }
        }
    }
}

/// `GET /usage`: a named key's own spend and limits (the pipeline answers).
struct Usage(Arc<Pipeline>);

impl Endpoint for Usage {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Some(refusal) = refuse_writes(&req) {
            return Ok(refusal);
        }
        let peer = req.remote_addr().as_socket_addr().copied();
        Ok(into_response(self.0.usage(peer, req.headers()).await))
    }
}

/// `GET /metrics`: the Prometheus exposition.
struct MetricsEndpoint(Arc<Metrics>);

impl Endpoint for MetricsEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Some(refusal) = refuse_writes(&req) {
            return Ok(refusal);
        }
        match self.0.encode() {
            Ok(text) => Ok(Response::builder()
                .header(header::CONTENT_TYPE, metrics::CONTENT_TYPE)
                .header(header::CACHE_CONTROL, "no-store")
                .body(text)),
            Err(_) => Ok(into_response(Answer::error(&GatewayError::Internal(
                "cannot encode the metrics".to_owned(),
            )))),
        }
    }
}

/// `GET /ready`: 200 with what is loaded; 503 when `upstream.ready_check` is on and the
/// upstream is unreachable, or when the limits store is unreachable under
/// `store_failure = "closed"`.
struct Ready {
    pipeline: Arc<Pipeline>,
    manifest: String,
    routes: usize,
    status: Status,
    check: Option<UpstreamCheck>,
}

/// A GET of `upstream.base_url` the way forwarded requests go (so its proxy and TLS settings
/// apply), within `upstream.connect_timeout`. Any HTTP answer, even 401 or 404, means
/// reachable.
struct UpstreamCheck {
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl UpstreamCheck {
    async fn run(&self, pipeline: &Pipeline) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < READY_CHECK_TTL {
                return result.clone();
            }
        }
        let timeout = pipeline.upstream().connect_timeout();
        let result = tokio::time::timeout(timeout, pipeline.upstream().probe())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))
            });
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

impl Endpoint for Ready {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Some(refusal) = refuse_writes(&req) {
            return Ok(refusal);
        }
        let upstream = match &self.check {
            None => serde_json::json!({ "checked": false }),
            Some(check) => match check.run(&self.pipeline).await {
                Ok(()) => serde_json::json!({ "checked": true, "reachable": true }),
                Err(error) => {
                    serde_json::json!({ "checked": true, "reachable": false, "error": error })
                }
            },
        };
        let unreachable = upstream.get("reachable") == Some(&serde_json::Value::Bool(false));
        // A store that is down makes the gateway unready only when that refuses requests.
        let (store, store_refuses) = match self.pipeline.store() {
            None => (serde_json::json!({ "configured": false }), false),
            Some(store) => {
                let failure = store.settings().failure;
                let json = serde_json::json!({
                    "configured": true,
                    "reachable": store.is_up(),
                    "failure": failure.as_str(),
                });
                (json, !store.is_up() && failure == StoreFailure::Closed)
            }
        };
        let status = if unreachable {
            "upstream_unreachable"
        } else if store_refuses {
            "store_unreachable"
        } else {
            "ready"
        };
        // Each mount: out of turn after failing in a row, and its held keys resting.
        let targets: Vec<serde_json::Value> = (self.pipeline.health().into_iter())
            .map(|(mount, ejected, resting)| {
                let resting: Vec<&str> = resting.iter().map(|var| &**var).collect();
                serde_json::json!({ "mount": &*mount, "ejected": ejected, "resting_keys": resting })
            })
            .collect();
        let body = serde_json::json!({
            "status": status,
            "config": {
                "loaded": true,
                "manifest": self.manifest,
                "routes": self.routes,
                "generation": self.status.generation.load(Ordering::Relaxed),
            },
            "upstream": upstream,
            "store": store,
            "targets": targets,
            "realtime_sessions": self.status.sessions.open(),
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

/// `/openapi.json` and `/docs` of one manifest, each built on its first request and shared
/// by the workers.
pub(crate) struct Docs {
    document: Arc<LazyDocument>,
    page: Arc<LazyDocument>,
}

impl Docs {
    pub(crate) fn new(config: &Config) -> Docs {
        let routes = config.clone();
        let document = LazyDocument::new("application/json", move || {
            let document = openapi::document(&routes)?;
            serde_json::to_vec_pretty(&document)
                .map(Into::into)
                .map_err(|err| format!("cannot serialise the OpenAPI document: {err}"))
        });
        let title = config.openapi.title.clone();
        let page = LazyDocument::new("text/html; charset=utf-8", move || {
            openapi::swagger_ui_html(&title)
                .map(Into::into)
                .ok_or_else(|| {
                    "the bundled Swagger UI page has an unexpected shape; \
                     set openapi.enabled = false to serve without it"
                        .to_owned()
                })
        });
        Docs {
            document: Arc::new(document),
            page: Arc::new(page),
        }
    }
}

/// The body of a lazily built document.
type Build = Box<dyn Fn() -> Result<bytes::Bytes, String> + Send + Sync>;

/// Serves a document built on its first request (the OpenAPI document and the Swagger UI page
/// take megabytes to build, which an idle gateway should not hold), on GET and HEAD; 405
/// otherwise.
struct LazyDocument {
    build: Build,
    body: std::sync::OnceLock<bytes::Bytes>,
    content_type: &'static str,
}

impl LazyDocument {
    fn new(
        content_type: &'static str,
        build: impl Fn() -> Result<bytes::Bytes, String> + Send + Sync + 'static,
    ) -> Self {
        LazyDocument {
            build: Box::new(build),
            body: std::sync::OnceLock::new(),
            content_type,
        }
    }

    fn body(&self) -> Result<bytes::Bytes, String> {
        if let Some(body) = self.body.get() {
            return Ok(body.clone());
        }
        let body = (self.build)()?;
        Ok(self.body.get_or_init(|| body).clone())
    }
}

impl Endpoint for LazyDocument {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Some(refusal) = refuse_writes(&req) {
            return Ok(refusal);
        }
        match self.body() {
            Ok(body) => Ok(Response::builder()
                .header(header::CONTENT_TYPE, self.content_type)
                .body(body)),
            Err(message) => {
                tracing::error!(error = %message, "cannot build {}", req.uri().path());
                Ok(into_response(Answer::error(&GatewayError::Internal(
                    message,
                ))))
            }
        }
    }
}
