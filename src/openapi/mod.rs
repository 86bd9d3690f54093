//! The OpenAPI document of what this gateway serves, and Swagger UI to browse and try it.
//!
//! The document is built once at start-up from the route table actually loaded, so an edited
//! routes.toml shows up in it. poem-openapi's derive macros describe routes known at compile
//! time only; here the document is plain JSON built from the manifest, and poem-openapi
//! contributes its embedded Swagger UI (no CDN) pointed at `/openapi.json`.

mod operation;
mod schemas;

use serde_json::{json, Map, Value};

use crate::config::{Config, CredentialHeader};
use crate::routes::{RouteSpec, USAGE_PATH};
pub use crate::routes::{DOCS_PATH, DOCUMENT_PATH};
use operation::operation;
pub use operation::response_media_types;
use schemas::Spec;

/// What `GET /` and `GET /health` answer, as the original gateway did.
pub const HEALTH_TEXT: &str = "OpenAI API Server is running";
const GATEWAY_TAG: &str = "Gateway";
const JSON: &str = "application/json";

/// The document's sections in the order Swagger UI shows them: the gateway's own, then
/// `openapi.tag_order`, then the manifest's other tags alphabetically, then the mounts'.
fn tags(config: &Config) -> Vec<Value> {
    let mut order: Vec<&str> = config
        .openapi
        .tag_order
        .iter()
        .map(String::as_str)
        .collect();
    let mut rest: Vec<&str> = (config.routes.routes().iter())
        .map(RouteSpec::tag_or_default)
        .filter(|tag| !order.contains(tag))
        .collect();
    rest.sort_unstable();
    rest.dedup();
    order.extend(rest);
    for mount in &config.mounts {
        if !order.contains(&&*mount.upstream.mount) {
            order.push(&mount.upstream.mount);
        }
    }
    let mut tags = vec![json!({"name": GATEWAY_TAG, "description": "The gateway's own endpoints"})];
    for name in order {
        let mount = (config.mounts.iter()).find(|mount| &*mount.upstream.mount == name);
        tags.push(match mount {
            Some(mount) => json!({
                "name": name,
                "description": format!(
                    "Under {}, forwarded to {}",
                    mount.prefix,
                    mount.upstream.base_url.origin().ascii_serialization()
                ),
            }),
            None => json!({"name": name}),
        });
    }
    tags
}

/// The security scheme of the document that names `header`.
fn security_scheme(header: CredentialHeader) -> &'static str {
    match header {
        CredentialHeader::Authorization => "bearerAuth",
        CredentialHeader::ApiKey => "apiKeyHeader",
        CredentialHeader::XApiKey => "xApiKeyHeader",
        CredentialHeader::XGoogApiKey => "xGoogApiKeyHeader",
    }
}

fn gateway_text_operation(operation_id: &str, summary: &str) -> Value {
    json!({
        "operationId": operation_id,
        "tags": [GATEWAY_TAG],
        "summary": summary,
        "security": [],
        "responses": {
            "200": {
                "description": HEALTH_TEXT,
                "content": {"text/plain": {"schema": {"type": "string", "enum": [HEALTH_TEXT]}}},
            },
            "default": {"$ref": "#/components/responses/Error"},
        },
    })
}

/// The OpenAPI document of the gateway serving `config`: 3.0 and light by default; 3.1 and
/// fully typed with `openapi.schemas` (whose spec is read here, so an unreadable one fails).
pub fn document(config: &Config) -> Result<Value, String> {
    let spec = (config.openapi.schemas.as_deref())
        .map(Spec::read)
        .transpose()?;
    let operation = |route: &RouteSpec| {
        let mut op = operation(route);
        if let Some(spec) = &spec {
            spec.type_operation(&route.operation_id(), &route.examples, &mut op);
        }
        op
    };
    let mut paths = gateway_paths(config);
    paths.extend(route_paths(config, operation));
    let tag_objects = tags(config);
    let paths = Value::Object(paths);
    let typed = spec.as_ref().map(|spec| spec.components_for(&paths));

    let mut document = json!({
        "openapi": if typed.is_some() { "3.1.0" } else { "3.0.3" },
        "info": {
            "title": config.openapi.title,
            "version": config.openapi.version,
            "description": format!(
                "Every operation below is forwarded to {} with the caller's own key; answers \
                 stream back unchanged. Errors made by the gateway itself have OpenAI's shape.",
                config.upstream.base_url
            ),
        },
        "servers": [{
            "url": config.access.path_secret.as_ref().map_or_else(|| "/".to_owned(), |secret| format!("/{secret}")),
            "description": "this gateway",
        }],
        "security": [{"bearerAuth": []}],
        "tags": tag_objects,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Your OpenAI API key; it is forwarded, never stored.",
                },
            },
            "schemas": {GATEWAY_ERROR: error_schema(typed.is_some())},
            "responses": {
                "Error": {
                    "description": "An error, from the upstream or from the gateway itself",
                    "content": {JSON: {"schema": {"$ref": format!("#/components/schemas/{GATEWAY_ERROR}")}}},
                },
            },
        },
    });
    // The header schemes of the mounts that read keys elsewhere, and only those: Swagger's
    // Authorize dialog lists every scheme.
    for mount in &config.mounts {
        let header = mount.upstream.credential_header;
        if header != CredentialHeader::Authorization {
            document["components"]["securitySchemes"][security_scheme(header)] =
                json!({"type": "apiKey", "in": "header", "name": header.as_str()});
        }
    }
    if let (Some(typed), Some(schemas)) = (typed, document["components"]["schemas"].as_object_mut())
    {
        schemas.extend(typed);
    }
    Ok(document)
}

/// `GET /usage`: what the key presented has spent, and what it has left.
fn usage_operation() -> Value {
    let limit = json!({
        "type": "object",
        "required": ["limit", "used", "allowed", "left", "resets_at"],
        "properties": {
            "limit": {"type": "string", "description": "The [keys.NAME] field, e.g. max_usd_per_month"},
            "used": {"type": "number"},
            "allowed": {"type": "number"},
            "left": {"type": "number"},
            "resets_at": {"type": "string", "format": "date-time"},
        },
    });
    json!({"get": {
        "operationId": "gatewayUsage",
        "tags": [GATEWAY_TAG],
        "summary": "Your key's spend and limits",
        "description": "For the key you present, if it is one of the gateway's [keys]: each \
            rate and budget with what is used, what is left, and when it resets (UTC). \
            Tokens and dollars are counted as answers finish.",
        "responses": {
            "200": {"description": "The key's usage", "content": {JSON: {"schema": {
                "type": "object",
                "required": ["object", "key", "limits"],
                "properties": {
                    "object": {"type": "string", "enum": ["usage"]},
                    "key": {"type": "string"},
                    "expires": {"type": "string", "format": "date"},
                    "limits": {"type": "array", "items": limit},
                    "spent": {"type": "object"},
                },
            }}}},
            "default": {"$ref": "#/components/responses/Error"},
        },
    }})
}

/// The gateway's own paths: liveness, a named key's usage and this document.
fn gateway_paths(config: &Config) -> Map<String, Value> {
    let mut paths = Map::new();
    paths.insert(
        "/".into(),
        json!({"get": gateway_text_operation("gatewayRoot", "Liveness (same as /health)")}),
    );
    paths.insert(
        "/health".into(),
        json!({"get": gateway_text_operation("gatewayHealth", "Liveness: the gateway is up")}),
    );
    if !config.access.named_keys.is_empty() {
        paths.insert(USAGE_PATH.into(), usage_operation());
    }
    paths.insert(
        DOCUMENT_PATH.into(),
        json!({"get": {
            "operationId": "gatewayOpenApiDocument",
            "tags": [GATEWAY_TAG],
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {"description": "OpenAPI document", "content": {JSON: {"schema": {"type": "object"}}}},
                "default": {"$ref": "#/components/responses/Error"},
            },
        }}),
    );
    paths
}

/// The paths of the manifest's routes, then each mount's under its prefix, tagged with its
/// name and signed in with its header; each route's operation as `operation` makes it.
fn route_paths(config: &Config, operation: impl Fn(&RouteSpec) -> Value) -> Map<String, Value> {
    let mut paths = Map::new();
    for (template, routes) in config.routes.by_template() {
        let mut item = Map::new();
        for route in routes {
            item.insert(route.method.as_str().to_ascii_lowercase(), operation(route));
        }
        paths.insert(template.as_str().to_owned(), Value::Object(item));
    }
    for mount in &config.mounts {
        let name = &*mount.upstream.mount;
        let security = json!([{security_scheme(mount.upstream.credential_header): []}]);
        for (template, routes) in mount.routes(&config.routes).by_template() {
            let mut item = Map::new();
            for route in routes {
                let mut op = operation(route);
                op["operationId"] = json!(format!("{name}_{}", route.operation_id()));
                op["tags"] = json!([name]);
                op["security"] = security.clone();
                item.insert(route.method.as_str().to_ascii_lowercase(), op);
            }
            paths.insert(format!("{}{template}", mount.prefix), Value::Object(item));
        }
    }
    paths
}

/// The gateway's error body, named apart from the official spec's `Error` (its inner object).
const GATEWAY_ERROR: &str = "GatewayError";

/// `{"error": {"message", "type", "param", "code"}}`, nullable the 3.0 or the 3.1 way.
fn error_schema(openapi_3_1: bool) -> Value {
    let nullable = if openapi_3_1 {
        json!({"type": ["string", "null"]})
    } else {
        json!({"type": "string", "nullable": true})
    };
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": nullable,
                    "code": nullable,
                },
            },
        },
    })
}

/// The Swagger UI plugin that shows an event stream's events as they arrive.
const STREAMED_JS: &str = include_str!("streamed.js");

/// Swagger UI, from poem-openapi's embedded assets, loading the document from `/openapi.json`,
/// with event streams shown as they arrive.
///
/// poem-openapi only exposes the page with a spec inlined, so the inlined (empty) spec is
/// swapped for a URL. `None` if the page no longer has the shape this relies on.
pub fn swagger_ui_html(title: &str) -> Option<String> {
    let empty = poem_openapi::OpenApiService::new((), title, "");
    let html = empty.swagger_ui_html();
    let inline = format!("let spec = {};", empty.spec());
    let config = "spec: spec,";
    let ui = "<div id=\"ui\"></div>";
    if !html.contains(&inline) || !html.contains(config) || !html.contains(ui) {
        return None;
    }
    Some(
        html.replace(&inline, "let spec = null;")
            .replace(ui, &format!("{ui}\n<script>{STREAMED_JS}</script>"))
            .replace(
                config,
                // Relative, so the page also works under access.path_secret.
                "url: \"openapi.json\", persistAuthorization: true, \
                 plugins: [OaBypassStreamed.plugin], \
                 requestInterceptor: OaBypassStreamed.requestInterceptor,",
            )
            .replace(
                "<title>Swagger UI</title>",
                &format!("<title>{}</title>", html_escape(title)),
            ),
    )
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swagger_ui_page_loads_the_document_by_url() {
        let html = swagger_ui_html("My <gateway>").expect("poem-openapi's page changed shape");
        assert!(html.contains("url: \"openapi.json\""));
        assert!(html.contains("let spec = null;"));
        assert!(html.contains("plugins: [OaBypassStreamed.plugin]"));
        assert!(html.contains("const OaBypassStreamed = "));
        assert!(html.contains("<title>My &lt;gateway&gt;</title>"));
        assert!(
            html.contains("SwaggerUIBundle"),
            "the bundle is embedded, not fetched"
        );
        assert!(!html.contains("https://cdn") && !html.contains("unpkg.com"));
    }
}
