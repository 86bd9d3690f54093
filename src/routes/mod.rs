//! The validated route table: what the manifest's `[[routes]]` entries mean once checked.
//!
//! This module owns path templates (`/v1/threads/{thread_id}/runs`), body kinds and the
//! per-route limits. It never touches the network; `proxy` reads it, `config` builds it.

mod example;
mod template;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

pub use example::{Examples, FormField, FormValue};
pub use template::{check_path_param, ParamProblem, PathTemplate, Segment, TemplateError};

/// Readiness: 200 once the manifest is loaded (and, with `upstream.ready_check`, the
/// upstream answers).
pub const READY_PATH: &str = "/ready";
/// Prometheus metrics (under the path secret, when one is set).
pub const METRICS_PATH: &str = "/metrics";
/// The OpenAPI document of what the gateway serves.
pub const DOCUMENT_PATH: &str = "/openapi.json";
/// Swagger UI over that document.
pub const DOCS_PATH: &str = "/docs";
/// A named key's own spend and limits.
pub const USAGE_PATH: &str = "/usage";
/// Paths the gateway serves itself, which no route may take.
pub const GATEWAY_PATHS: [&str; 7] = [
    "/",
    "/health",
    READY_PATH,
    METRICS_PATH,
    DOCUMENT_PATH,
    DOCS_PATH,
    USAGE_PATH,
];

/// What a route accepts as a request body, as the manifest spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BodyKind {
    None,
    Json,
    Multipart,
    Binary,
    Sdp,
    /// Not a body: the route is a WebSocket (GET with Upgrade), relayed frame by frame.
    WebSocket,
}

impl BodyKind {
    pub const ALL: [BodyKind; 6] = [
        BodyKind::None,
        BodyKind::Json,
        BodyKind::Multipart,
        BodyKind::Binary,
        BodyKind::Sdp,
        BodyKind::WebSocket,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BodyKind::None => "none",
            BodyKind::Json => "json",
            BodyKind::Multipart => "multipart",
            BodyKind::Binary => "binary",
            BodyKind::Sdp => "sdp",
            BodyKind::WebSocket => "websocket",
        }
    }

    pub fn parse(s: &str) -> Option<BodyKind> {
        BodyKind::ALL.into_iter().find(|kind| kind.as_str() == s)
    }

    /// Uploads (files, audio, images) get the larger `limits.max_upload_body`.
    pub fn is_upload(self) -> bool {
        match self {
            BodyKind::Multipart | BodyKind::Binary => true,
            BodyKind::None | BodyKind::Json | BodyKind::Sdp | BodyKind::WebSocket => false,
        }
    }
}

impl fmt::Display for BodyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BodyKind {
    /// The kind a request's `Content-Type` declares (parameters such as `charset` ignored);
    /// anything not JSON, multipart or SDP is binary.
    pub fn of_content_type(content_type: &str) -> BodyKind {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        // Compared in place, case-insensitively: no lowercase copy per request.
        let is = |name: &str| essence.eq_ignore_ascii_case(name);
        let ends_with = |suffix: &str| {
            essence
                .len()
                .checked_sub(suffix.len())
                .and_then(|at| essence.as_bytes().get(at..))
                .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
        };
        let starts_with = |prefix: &str| {
            essence
                .as_bytes()
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
        };
        if is("application/json") || ends_with("+json") {
            BodyKind::Json
        } else if starts_with("multipart/") {
            BodyKind::Multipart
        } else if is("application/sdp") {
            BodyKind::Sdp
        } else {
            BodyKind::Binary
        }
    }
}

/// Whether `text` is a media type `type/subtype` (RFC 6838 §4.2 name characters, no params).
pub fn is_media_type(text: &str) -> bool {
    let name = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c))
    };
    matches!(text.split_once('/'), Some((kind, sub)) if name(kind) && name(sub))
}

/// One endpoint of the manifest after validation, with its effective limits.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Position in the manifest's `routes` list, for messages that point back at it.
    pub index: usize,
    pub method: Method,
    pub template: PathTemplate,
    pub body: Vec<BodyKind>,
    pub summary: Option<String>,
    pub tag: Option<String>,
    pub streaming: bool,
    /// `routes[i].read_timeout`, when the manifest overrides `upstream.read_timeout`.
    pub read_timeout: Option<Duration>,
    /// `routes[i].keepalive`, when the manifest overrides `streaming.keepalive`.
    pub keepalive: Option<Duration>,
    /// `routes[i].max_body`, when the manifest overrides the `[limits]` body sizes.
    pub max_body: Option<u64>,
    /// The manifest's OpenAPI operationId, if it names one.
    pub operation_id: Option<String>,
    /// Response media types, when the manifest lists them (absent: JSON).
    pub produces: Option<Vec<String>>,
    /// Token usage in this route's answers is counted (`usage = true`).
    pub usage: bool,
    /// Its streams report usage only when asked with `stream_options.include_usage`
    /// (`stream_usage_option = true`).
    pub stream_usage_option: bool,
    /// The mount whose upstream serves it, when not the one it is listed for
    /// (`upstream = "NAME"`).
    pub upstream: Option<String>,
    /// On the unprefixed path, `[models]` picks its upstream by the request's model
    /// (`route_by_model = true`).
    pub route_by_model: bool,
    /// What the docs prefill (`example`, `stream_example`, `form`); shared by its mounts.
    pub examples: Arc<Examples>,
}

impl RouteSpec {
    pub fn accepts(&self, kind: BodyKind) -> bool {
        self.body.contains(&kind)
    }

    /// Whether a body declared as `content_type` contradicts the kinds this route takes.
    /// Routes that take binary, or only no body, accept any declaration.
    pub fn refuses_content_type(&self, content_type: &str) -> bool {
        let declares_kinds = self
            .body
            .iter()
            .any(|kind| !matches!(kind, BodyKind::None | BodyKind::WebSocket));
        declares_kinds
            && !self.accepts(BodyKind::Binary)
            && !self.accepts(BodyKind::of_content_type(content_type))
    }

    /// The same route served under a mount's `prefix` (`/groq` + `/v1/models`).
    pub fn under(&self, prefix: &str) -> Result<RouteSpec, TemplateError> {
        let template = PathTemplate::parse(&format!("{prefix}{}", self.template))?;
        Ok(RouteSpec {
            template,
            ..self.clone()
        })
    }

    pub fn tag_or_default(&self) -> &str {
        self.tag.as_deref().unwrap_or("Other")
    }

    /// The manifest's operationId, else one derived from method and path:
    /// `GET /v1/files/{file_id}/content` → `get_v1_files_file_id_content`.
    pub fn operation_id(&self) -> String {
        if let Some(id) = &self.operation_id {
            return id.clone();
        }
        let mut id = self.method.as_str().to_ascii_lowercase();
        for segment in self.template.segments() {
            let (Segment::Static(text) | Segment::Param(text)) = segment;
            id.push('_');
            id.extend(
                text.chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
            );
        }
        id
    }
}

/// All routes, grouped by path template in manifest order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<RouteSpec>,
}

/// A route-table conflict, reported with the manifest indexes involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("routes[{index}].path: {path} is served by the gateway itself")]
    Reserved { index: usize, path: String },
    #[error("routes[{second}]: {method} {path} is already declared by routes[{first}]")]
    Duplicate {
        first: usize,
        second: usize,
        method: Method,
        path: String,
    },
    #[error("routes[{second}].operation_id: {id:?} is already used by routes[{first}]")]
    DuplicateOperationId {
        first: usize,
        second: usize,
        id: String,
    },
    #[error(
        "routes[{second}]: {path} cannot be told apart from {other} (routes[{first}]): \
         they differ only in parameter names; use the same names"
    )]
    Ambiguous {
        first: usize,
        second: usize,
        path: String,
        other: String,
    },
}

impl RouteTable {
    pub fn new(routes: Vec<RouteSpec>) -> Result<RouteTable, TableError> {
        let mut by_shape: HashMap<String, usize> = HashMap::new();
        let mut by_method: HashMap<(Method, String), usize> = HashMap::new();
        let mut by_operation: HashMap<String, usize> = HashMap::new();
        for (pos, route) in routes.iter().enumerate() {
            if GATEWAY_PATHS.contains(&route.template.as_str()) {
                return Err(TableError::Reserved {
                    index: route.index,
                    path: route.template.to_string(),
                });
            }
            if let Some(&first) = by_shape.get(&route.template.shape()) {
                let other = &routes[first];
                if other.template != route.template {
                    return Err(TableError::Ambiguous {
                        first: other.index,
                        second: route.index,
                        path: route.template.to_string(),
                        other: other.template.to_string(),
                    });
                }
            } else {
                by_shape.insert(route.template.shape(), pos);
            }
            let key = (route.method.clone(), route.template.to_string());
            if let Some(&first) = by_method.get(&key) {
                return Err(TableError::Duplicate {
                    first: routes[first].index,
                    second: route.index,
                    method: route.method.clone(),
                    path: route.template.to_string(),
                });
            }
            by_method.insert(key, pos);
            if let Some(&first) = by_operation.get(&route.operation_id()) {
                return Err(TableError::DuplicateOperationId {
                    first: routes[first].index,
                    second: route.index,
                    id: route.operation_id(),
                });
            }
            by_operation.insert(route.operation_id(), pos);
        }
        Ok(RouteTable { routes })
    }

    pub fn routes(&self) -> &[RouteSpec] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Routes grouped by template, in the order each template first appears.
    pub fn by_template(&self) -> Vec<(&PathTemplate, Vec<&RouteSpec>)> {
        let mut groups: Vec<(&PathTemplate, Vec<&RouteSpec>)> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for route in &self.routes {
            match slot.get(route.template.as_str()) {
                Some(&i) => groups[i].1.push(route),
                None => {
                    slot.insert(route.template.as_str(), groups.len());
                    groups.push((&route.template, vec![route]));
                }
            }
        }
        groups
    }

    /// Route counts by tag, sorted by tag name, for the start-up summary.
    pub fn count_by_tag(&self) -> Vec<(&str, usize)> {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for route in &self.routes {
            *counts.entry(route.tag_or_default()).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn spec(index: usize, method: Method, path: &str) -> RouteSpec {
        RouteSpec {
            index,
            method,
            template: PathTemplate::parse(path).unwrap(),
            body: vec![BodyKind::None],
            summary: None,
            tag: None,
            streaming: false,
            read_timeout: None,
            keepalive: None,
            max_body: None,
            operation_id: None,
            produces: None,
            usage: false,
            stream_usage_option: false,
            upstream: None,
            route_by_model: false,
            examples: Arc::default(),
        }
    }

    #[test]
    fn table_rejects_duplicates_and_ambiguity() {
        let dup = RouteTable::new(vec![
            spec(0, Method::GET, "/v1/a"),
            spec(1, Method::GET, "/v1/a"),
        ]);
        assert_eq!(
            dup.unwrap_err().to_string(),
            "routes[1]: GET /v1/a is already declared by routes[0]"
        );
        let ambiguous = RouteTable::new(vec![
            spec(0, Method::GET, "/v1/a/{x}"),
            spec(1, Method::POST, "/v1/a/{y}"),
        ]);
        assert!(matches!(
            ambiguous,
            Err(TableError::Ambiguous {
                first: 0,
                second: 1,
                ..
            })
        ));
        let fine = RouteTable::new(vec![
            spec(0, Method::GET, "/v1/a/{x}"),
            spec(1, Method::POST, "/v1/a/{x}"),
            spec(2, Method::GET, "/v1/a/static"),
        ])
        .unwrap();
        assert_eq!(fine.by_template().len(), 2);
        assert_eq!(fine.routes()[0].operation_id(), "get_v1_a_x");
    }

    #[test]
    fn operation_ids_must_be_unique() {
        let mut named = spec(1, Method::GET, "/v1/b");
        named.operation_id = Some("get_v1_a".into());
        let clash = RouteTable::new(vec![spec(0, Method::GET, "/v1/a"), named]);
        assert_eq!(
            clash.unwrap_err().to_string(),
            "routes[1].operation_id: \"get_v1_a\" is already used by routes[0]"
        );
    }

    #[test]
    fn content_types_map_to_kinds() {
        for (content_type, kind) in [
            ("application/json; charset=utf-8", BodyKind::Json),
            ("Application/JSON", BodyKind::Json),
            ("application/merge-patch+json", BodyKind::Json),
            (" application/VND.API+JSON ", BodyKind::Json),
            ("multipart/form-data; boundary=x", BodyKind::Multipart),
            ("Multipart/Form-Data; boundary=x", BodyKind::Multipart),
            ("application/sdp", BodyKind::Sdp),
            ("APPLICATION/SDP", BodyKind::Sdp),
            ("text/plain", BodyKind::Binary),
            ("json", BodyKind::Binary),
            ("multipart", BodyKind::Binary),
            ("", BodyKind::Binary),
        ] {
            assert_eq!(
                BodyKind::of_content_type(content_type),
                kind,
                "{content_type:?}"
            );
        }
        let mut route = spec(0, Method::POST, "/v1/x");
        route.body = vec![BodyKind::Json];
        assert!(route.refuses_content_type("text/plain"));
        assert!(!route.refuses_content_type("application/json; charset=utf-8"));
        route.body = vec![BodyKind::None];
        assert!(!route.refuses_content_type("text/plain"));
        route.body = vec![BodyKind::Binary];
        assert!(!route.refuses_content_type("audio/mpeg"));
    }

    #[test]
    fn media_types() {
        assert!(is_media_type("application/zip"));
        assert!(is_media_type("application/vnd.api+json"));
        assert!(!is_media_type("zip"));
        assert!(!is_media_type("application/"));
        assert!(!is_media_type("text/plain; charset=utf-8"));
    }
}
