//! One forwarded operation of the document: its parameters, the request bodies it takes
//! with the manifest's examples prefilled, and the media types of its answers.

use serde_json::{json, Map, Value};

use super::JSON;
use crate::routes::{BodyKind, Examples, FormValue, RouteSpec};

const SSE: &str = "text/event-stream";
const MULTIPART: &str = "multipart/form-data";

/// The media types a route's successful answer may have: the manifest's `produces` (JSON when
/// absent), plus server-sent events for a streaming route.
pub fn response_media_types(route: &RouteSpec) -> Vec<String> {
    if route.accepts(BodyKind::WebSocket) {
        return Vec::new();
    }
    let mut types = route
        .produces
        .clone()
        .unwrap_or_else(|| vec![JSON.to_owned()]);
    if route.streaming && !types.iter().any(|t| t == SSE) {
        types.push(SSE.to_owned());
    }
    types
}

fn schema_for_response(media_type: &str) -> Value {
    match media_type {
        JSON => json!({"type": "object"}),
        SSE => json!({"type": "string", "description": "Server-sent events"}),
        _ if media_type.starts_with("text/") || media_type == "application/sdp" => {
            json!({"type": "string"})
        }
        _ => json!({"type": "string", "format": "binary"}),
    }
}

/// The media type and content object of one body kind, with the route's examples.
fn request_content(kind: BodyKind, examples: &Examples) -> Option<(&'static str, Value)> {
    match kind {
        BodyKind::None | BodyKind::WebSocket => None,
        BodyKind::Json => {
            let mut content = json!({"schema": {"type": "object"}});
            let named = [
                ("request", "A small request", &examples.json),
                ("stream", "The same, streamed", &examples.stream),
            ];
            let named: Map<String, Value> = (named.into_iter())
                .filter_map(|(name, summary, value)| {
                    let value = value.as_ref()?;
                    Some((name.to_owned(), json!({"summary": summary, "value": value})))
                })
                .collect();
            if !named.is_empty() {
                content["examples"] = Value::Object(named);
            }
            Some((JSON, content))
        }
        BodyKind::Multipart => Some((MULTIPART, json!({"schema": form_schema(examples)}))),
        BodyKind::Binary => Some((
            "application/octet-stream",
            json!({"schema": {"type": "string", "format": "binary"}}),
        )),
        BodyKind::Sdp => Some(("application/sdp", json!({"schema": {"type": "string"}}))),
    }
}

/// The form fields of `examples`, each with its type: a file, or text whose example value
/// Swagger UI prefills (a number or a boolean when it reads as one).
fn form_schema(examples: &Examples) -> Value {
    let properties: Map<String, Value> = (examples.form.iter())
        .map(|field| {
            let schema = match &field.value {
                FormValue::File(name) => json!({
                    "type": "string",
                    "format": "binary",
                    "description": format!("a file, such as {name}"),
                }),
                FormValue::Text(text) => {
                    let (kind, example) = typed(text);
                    json!({"type": kind, "example": example})
                }
            };
            (field.name.clone(), schema)
        })
        .collect();
    if properties.is_empty() {
        return json!({"type": "object"});
    }
    json!({"type": "object", "properties": properties})
}

/// A text field's type and example value: a number or a boolean when it reads as one.
fn typed(text: &str) -> (&'static str, Value) {
    if let Ok(number) = text.parse::<i64>() {
        ("integer", json!(number))
    } else if let Some(number) = text.parse::<f64>().ok().filter(|n| n.is_finite()) {
        ("number", json!(number))
    } else if let Ok(flag) = text.parse::<bool>() {
        ("boolean", json!(flag))
    } else {
        ("string", json!(text))
    }
}

pub(super) fn operation(route: &RouteSpec) -> Value {
    let mut op = Map::new();
    op.insert("operationId".into(), json!(route.operation_id()));
    op.insert("tags".into(), json!([route.tag_or_default()]));
    if let Some(summary) = &route.summary {
        op.insert("summary".into(), json!(summary));
    }
    let parameters: Vec<Value> = route
        .template
        .params()
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": {"type": "string"},
            })
        })
        .collect();
    if !parameters.is_empty() {
        op.insert("parameters".into(), Value::Array(parameters));
    }
    let content: Map<String, Value> = route
        .body
        .iter()
        .filter_map(|kind| request_content(*kind, &route.examples))
        .map(|(media_type, content)| (media_type.to_owned(), content))
        .collect();
    if !content.is_empty() {
        op.insert(
            "requestBody".into(),
            json!({"required": !route.accepts(BodyKind::None), "content": content}),
        );
    }
    if route.accepts(BodyKind::WebSocket) {
        op.insert(
            "description".into(),
            json!(
                "A WebSocket: open it with GET and `Upgrade: websocket`. The gateway connects \
                 to the upstream first (its refusal comes back as is), then relays frames both \
                 ways. Browsers may pass the key as the subprotocol \
                 `openai-insecure-api-key.<key>`."
            ),
        );
        op.insert(
            "responses".into(),
            json!({
                "101": {"description": "Switching Protocols: the realtime session begins"},
                "426": {"$ref": "#/components/responses/Error"},
                "default": {"$ref": "#/components/responses/Error"},
            }),
        );
        return Value::Object(op);
    }
    let mut ok = json!({"description": "The upstream's answer, passed through unchanged"});
    let answers: Map<String, Value> = response_media_types(route)
        .iter()
        .map(|media_type| {
            (
                media_type.clone(),
                json!({"schema": schema_for_response(media_type)}),
            )
        })
        .collect();
    if !answers.is_empty() {
        ok["content"] = Value::Object(answers);
    }
    op.insert(
        "responses".into(),
        json!({
            "200": ok,
            "default": {"$ref": "#/components/responses/Error"},
        }),
    );
    Value::Object(op)
}
