//! One `[[routes]]` entry, from the manifest as written to a [`RouteSpec`]: every problem
//! named by the entry's index and key.

use std::sync::Arc;

use http::Method;

use super::raw::{OneOrMany, RawRoute};
use super::values::describe_figment_error;
use super::{ManifestSource, METHODS};
use crate::routes::{BodyKind, Examples, FormField, PathTemplate, RouteSpec};

pub(super) fn validate_route(
    index: usize,
    value: figment::value::Value,
    source: &ManifestSource,
) -> Result<RouteSpec, Vec<String>> {
    let key_path = format!("routes[{index}]");
    let mut raw: RawRoute = value
        .deserialize()
        .map_err(|err| describe_figment_error(err, Some(&key_path), source))?;
    let mut problems = Vec::new();

    let method = method(&key_path, &raw.method, &mut problems);
    let template = PathTemplate::parse(&raw.path)
        .map_err(|err| problems.push(format!("{key_path}.path: {:?} {err}", raw.path)))
        .ok();
    let body = body_kinds(&key_path, raw.body.take(), method.as_ref(), &mut problems);
    check_settings(&key_path, &raw, &body, &mut problems);
    let examples = examples(&key_path, &raw, &body, &mut problems);

    match (method, template) {
        (Some(method), Some(template)) if problems.is_empty() => Ok(RouteSpec {
            index,
            method,
            template,
            body,
            summary: raw.summary,
            tag: raw.tag,
            streaming: raw.streaming,
            read_timeout: raw.read_timeout.map(|t| t.0),
            keepalive: raw.keepalive.map(|t| t.0),
            max_body: raw.max_body.map(|s| s.0),
            operation_id: raw.operation_id,
            produces: raw.produces,
            usage: raw.usage,
            stream_usage_option: raw.stream_usage_option,
            upstream: raw.upstream,
            route_by_model: raw.route_by_model,
            examples: Arc::new(examples),
        }),
        _ => Err(problems),
    }
}

/// The route's method, one of [`METHODS`].
fn method(key_path: &str, written: &str, problems: &mut Vec<String>) -> Option<Method> {
    let method = METHODS
        .contains(&written)
        .then(|| written.parse::<Method>().ok())
        .flatten();
    if method.is_none() {
        problems.push(format!(
            "{key_path}.method: {written:?} is not one of {}",
            METHODS.join(", ")
        ));
    }
    method
}

/// The body kinds the route takes: `none` when it names none, each at most once, and a
/// WebSocket alone, on GET.
fn body_kinds(
    key_path: &str,
    written: Option<OneOrMany>,
    method: Option<&Method>,
    problems: &mut Vec<String>,
) -> Vec<BodyKind> {
    let names = written.map_or_else(|| vec!["none".to_owned()], OneOrMany::into_vec);
    if names.is_empty() {
        problems.push(format!(
            "{key_path}.body: the list is empty; use \"none\" for no body"
        ));
    }
    let mut body = Vec::with_capacity(names.len());
    for name in &names {
        match BodyKind::parse(name) {
            Some(kind) if !body.contains(&kind) => body.push(kind),
            Some(kind) => problems.push(format!("{key_path}.body: {kind:?} is listed twice")),
            None => problems.push(format!(
                "{key_path}.body: {name:?} is not one of {}",
                BodyKind::ALL.map(BodyKind::as_str).join(", ")
            )),
        }
    }
    if body.contains(&BodyKind::WebSocket) {
        if body.len() > 1 {
            problems.push(format!(
                "{key_path}.body: \"websocket\" cannot be combined with other kinds"
            ));
        }
        if method.is_some_and(|m| m != Method::GET) {
            problems.push(format!(
                "{key_path}.method: a websocket route must be GET (WebSockets open with GET + Upgrade)"
            ));
        }
    }
    body
}

/// The route's own settings: usage options that fit its body, limits above zero, an
/// operationId and media types of the allowed shape.
fn check_settings(key_path: &str, raw: &RawRoute, body: &[BodyKind], problems: &mut Vec<String>) {
    if raw.stream_usage_option && !(raw.usage && body.contains(&BodyKind::Json)) {
        problems.push(format!(
            "{key_path}.stream_usage_option: needs usage = true and a json body"
        ));
    }
    if raw.route_by_model
        && !(body.contains(&BodyKind::Json) || body.contains(&BodyKind::Multipart))
    {
        problems.push(format!(
            "{key_path}.route_by_model: needs a json or multipart body, where the model is read"
        ));
    }
    if raw.read_timeout.is_some_and(|timeout| timeout.0.is_zero()) {
        problems.push(format!("{key_path}.read_timeout: must be more than 0s"));
    }
    if raw.max_body.is_some_and(|size| size.0 == 0) {
        problems.push(format!("{key_path}.max_body: must be more than 0 bytes"));
    }
    if let Some(id) = &raw.operation_id {
        let valid = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            problems.push(format!(
                "{key_path}.operation_id: {id:?} may only hold letters, digits, '_', '-' and '.'"
            ));
        }
    }
    for media_type in raw.produces.iter().flatten() {
        if !crate::routes::is_media_type(media_type) {
            problems.push(format!(
                "{key_path}.produces: {media_type:?} is not a media type like \"application/zip\""
            ));
        }
    }
}

/// `example` and `stream_example` must be JSON for a route that takes JSON (the latter a
/// streaming one); `form` entries read like curl's `-F`, for a route that takes multipart.
fn examples(
    key_path: &str,
    raw: &RawRoute,
    body: &[BodyKind],
    problems: &mut Vec<String>,
) -> Examples {
    let mut json = |key: &str, text: &Option<String>| -> Option<serde_json::Value> {
        let text = text.as_deref()?;
        if !body.contains(&BodyKind::Json) {
            problems.push(format!("{key_path}.{key}: the route takes no JSON body"));
            return None;
        }
        serde_json::from_str(text)
            .map_err(|err| problems.push(format!("{key_path}.{key}: not JSON: {err}")))
            .ok()
    };
    let example = json("example", &raw.example);
    let stream = json("stream_example", &raw.stream_example);
    if stream.is_some() && !raw.streaming {
        problems.push(format!(
            "{key_path}.stream_example: needs streaming = true (the answer may be a stream)"
        ));
    }
    let entries = raw.form.as_deref().unwrap_or_default();
    if !entries.is_empty() && !body.contains(&BodyKind::Multipart) {
        problems.push(format!(
            "{key_path}.form: the route takes no multipart body"
        ));
    }
    let mut form: Vec<FormField> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        match FormField::parse(entry) {
            Ok(field) if form.iter().any(|f| f.name == field.name) => {
                problems.push(format!(
                    "{key_path}.form[{i}]: {:?} is listed twice",
                    field.name
                ));
            }
            Ok(field) => form.push(field),
            Err(why) => problems.push(format!("{key_path}.form[{i}]: {entry:?} {why}")),
        }
    }
    Examples {
        json: example,
        stream,
        form,
    }
}
