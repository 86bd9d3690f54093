//! oa-bypass: a self-hosted passthrough gateway for the OpenAI API.
//!
//! [`app`] builds the whole gateway from a [`Config`] as a poem endpoint, so tests and the
//! binary serve exactly the same thing. The request path is `cors` → router (one endpoint per
//! path template of the manifest) → `proxy`.

pub mod access;
pub mod config;
pub mod cors;
pub mod error;
pub mod limits;
pub mod openapi;
pub mod proxy;
pub mod realtime;
pub mod routes;
pub mod server;
pub mod telemetry;

use std::sync::Arc;

use http::{header, Method};
use poem::endpoint::BoxEndpoint;
use poem::error::NotFoundError;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};

pub use config::{Config, ConfigError};
use error::GatewayError;
use proxy::{Forwarder, TemplateEndpoint};

/// What `GET /` and `GET /health` answer, as the original gateway did.
pub const HEALTH_TEXT: &str = "OpenAI API Server is running";
const GATEWAY_PATHS: [&str; 4] = ["/", "/health", openapi::DOCUMENT_PATH, openapi::DOCS_PATH];

/// The gateway, ready to serve: its endpoint, and its realtime sessions (which outlive their
/// HTTP exchange, so shutdown needs a handle on them).
pub struct App {
    pub endpoint: BoxEndpoint<'static, Response>,
    pub sessions: realtime::Sessions,
}

/// Builds the gateway: every manifest route, the health endpoints, JSON 404s, CORS.
pub fn app(config: &Config) -> Result<App, ConfigError> {
    let forwarder = Arc::new(Forwarder::new(config)?);
    let sessions = realtime::Sessions::default();
    let relay = Arc::new(realtime::Relay::new(config, sessions.clone())?);
    let access = Arc::new(config.access.clone());
    let mut api = Route::new();
    if config.openapi.enabled {
        let document = serde_json::to_vec_pretty(&openapi::document(config)).map_err(|err| {
            ConfigError::Invalid(vec![format!(
                "cannot serialise the OpenAPI document: {err}"
            )])
        })?;
        let html = openapi::swagger_ui_html(&config.openapi.title).ok_or_else(|| {
            ConfigError::Invalid(vec![
                "openapi: the bundled Swagger UI page has an unexpected shape; \
                 set openapi.enabled = false to serve without it"
                    .to_owned(),
            ])
        })?;
        api = api
            .at(
                openapi::DOCUMENT_PATH,
                access::IpFilter::new(
                    openapi::StaticDocument::new(document, "application/json"),
                    Arc::clone(&access),
                ),
            )
            .at(
                openapi::DOCS_PATH,
                access::IpFilter::new(
                    openapi::StaticDocument::new(html, "text/html; charset=utf-8"),
                    Arc::clone(&access),
                ),
            );
    }
    for (template, specs) in config.routes.by_template() {
        let index = specs.first().map_or(0, |spec| spec.index);
        if GATEWAY_PATHS.contains(&template.as_str()) {
            return Err(ConfigError::Invalid(vec![format!(
                "routes[{index}].path: {template} is served by the gateway itself"
            )]));
        }
        let endpoint =
            TemplateEndpoint::new(Arc::clone(&forwarder), Arc::clone(&relay), template, &specs);
        api = api
            .try_at(
                template.to_poem_path(),
                access::IpFilter::new(endpoint, Arc::clone(&access)),
            )
            .map_err(|err| {
                ConfigError::Invalid(vec![format!(
                    "routes[{index}].path: the router refused {template}: {err}"
                )])
            })?;
    }
    // Liveness stays at the root for probes; with a path secret, everything else moves
    // under it and the bare paths answer 404.
    let router = match &config.access.path_secret {
        None => api.at("/", Health).at("/health", Health),
        Some(secret) => Route::new()
            .at("/", Health)
            .at("/health", Health)
            .nest(format!("/{secret}"), api),
    };
    Ok(App {
        endpoint: cors::Cors::new(JsonNotFound(router), config.cors.clone()).boxed(),
        sessions,
    })
}

/// `GET /` and `GET /health`: liveness, no upstream call.
struct Health;

impl Endpoint for Health {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(HEALTH_TEXT));
        }
        Ok(GatewayError::MethodNotAllowed {
            method: req.method().clone(),
            template: req.uri().path().to_owned(),
            allowed: vec![Method::GET, Method::HEAD],
        }
        .to_response())
    }
}

/// Turns the router's "no such path" into OpenAI's own answer for an unknown URL.
struct JsonNotFound<E>(E);

impl<E: Endpoint> Endpoint for JsonNotFound<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let start = tokio::time::Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        match self.0.call(req).await {
            Ok(output) => Ok(output.into_response()),
            Err(err) if err.is::<NotFoundError>() => {
                telemetry::log_rejected(
                    &method,
                    "(no route)",
                    404,
                    start,
                    "no route matches the path",
                );
                Ok(GatewayError::UnknownRoute { method, path }.to_response())
            }
            Err(err) => Err(err),
        }
    }
}
