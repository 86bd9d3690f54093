//! The shipped routes.toml covers every operation of the OpenAI REST API.
//!
//! spec/openai-endpoints.tsv is generated from the public OpenAPI spec (method, path, request
//! body kinds, response types, …). When OpenAI publishes a new spec, replace the TSV and this
//! test lists exactly what routes.toml must gain, lose or change.

use std::collections::BTreeMap;

use oa_bypass::config::{Config, BUILT_IN_MANIFEST};

struct SpecOperation {
    body: Vec<String>,
    /// Response media types, `text/event-stream` included.
    responses: Vec<String>,
    operation_id: String,
    tag: String,
}

fn spec() -> BTreeMap<(String, String), SpecOperation> {
    let text = std::fs::read_to_string("spec/openai-endpoints.tsv").unwrap();
    let mut operations = BTreeMap::new();
    let mut lines = text.lines().filter(|line| !line.starts_with('#'));
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(
        header[..4],
        ["method", "path", "request_body", "response_types"],
        "spec/openai-endpoints.tsv changed shape"
    );
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        let mut body: Vec<String> = fields[2].split('|').map(str::to_owned).collect();
        body.sort();
        let mut responses: Vec<String> = fields[3]
            .split('|')
            .filter(|t| *t != "-")
            .map(str::to_owned)
            .collect();
        responses.sort();
        let previous = operations.insert(
            (fields[0].to_owned(), fields[1].to_owned()),
            SpecOperation {
                body,
                responses,
                operation_id: fields[4].to_owned(),
                tag: fields[5].to_owned(),
            },
        );
        assert!(
            previous.is_none(),
            "duplicate operation in the spec: {line}"
        );
    }
    operations
}

#[test]
fn shipped_manifest_covers_every_spec_operation_with_matching_body_kinds() {
    let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
    let spec = spec();
    assert_eq!(spec.len(), 281, "the reference lists 281 operations");

    let mut problems = Vec::new();
    let mut shipped = BTreeMap::new();
    for route in config.routes.routes() {
        let mut body: Vec<String> = route.body.iter().map(|k| k.as_str().to_owned()).collect();
        body.sort();
        let mut responses = oa_bypass::openapi::response_media_types(route);
        responses.sort();
        shipped.insert(
            (route.method.to_string(), route.template.to_string()),
            (body, responses, route.operation_id(), route.tag.clone()),
        );
    }
    for ((method, path), operation) in &spec {
        match shipped.get(&(method.clone(), path.clone())) {
            None => problems.push(format!("missing: {method} {path}")),
            Some((body, responses, operation_id, tag)) => {
                if body != &operation.body {
                    problems.push(format!(
                        "{method} {path}: body {body:?}, the spec says {:?}",
                        operation.body
                    ));
                }
                if responses != &operation.responses {
                    problems.push(format!(
                        "{method} {path}: answers {responses:?}, the spec says {:?}",
                        operation.responses
                    ));
                }
                if operation_id != &operation.operation_id {
                    problems.push(format!(
                        "{method} {path}: operation_id {operation_id:?}, the spec says {:?}",
                        operation.operation_id
                    ));
                }
                if operation.tag != "-" && tag.as_deref() != Some(operation.tag.as_str()) {
                    problems.push(format!(
                        "{method} {path}: tag {tag:?}, the spec says {:?}",
                        operation.tag
                    ));
                }
            }
        }
    }
    // The spec describes REST operations; the Realtime WebSocket is documented apart from it
    // and is the one route routes.toml adds.
    let websockets: Vec<(String, String)> = config
        .routes
        .routes()
        .iter()
        .filter(|route| route.accepts(oa_bypass::routes::BodyKind::WebSocket))
        .map(|route| (route.method.to_string(), route.template.to_string()))
        .collect();
    assert_eq!(
        websockets,
        [("GET".to_owned(), "/v1/realtime".to_owned())],
        "the shipped manifest relays the Realtime WebSocket"
    );
    for (method, path) in shipped.keys() {
        let key = (method.clone(), path.clone());
        if !spec.contains_key(&key) && !websockets.contains(&key) {
            problems.push(format!("not in the spec: {method} {path}"));
        }
    }
    assert!(
        problems.is_empty(),
        "routes.toml vs spec:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_shipped_route_has_a_tag_and_summary() {
    let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
    for route in config.routes.routes() {
        assert!(route.tag.is_some(), "routes[{}] has no tag", route.index);
        assert!(
            route.summary.is_some(),
            "routes[{}] has no summary",
            route.index
        );
    }
}

/// A summary is what Swagger UI shows beside each operation: one plain line a person reads
/// at a glance, with no markdown, no links that are broken outside OpenAI's site, and no
/// sentence cut off mid-word.
#[test]
fn every_summary_is_one_short_plain_line() {
    let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
    for route in config.routes.routes() {
        let summary = route.summary.as_deref().unwrap_or_default();
        let at = format!(
            "routes[{}] ({} {})",
            route.index, route.method, route.template
        );
        assert!(
            !summary.is_empty() && summary.chars().count() < 100,
            "{at}: {summary:?}"
        );
        assert!(!summary.contains('\n'), "{at}: more than one line");
        for markdown in ["](", "**", "`", "[", "<"] {
            assert!(!summary.contains(markdown), "{at}: markdown in {summary:?}");
        }
        assert!(!summary.contains("  "), "{at}: {summary:?}");
        // The spec's descriptions were once cut at 90 characters, mid-word.
        assert!(summary.chars().count() != 90, "{at}: cut off? {summary:?}");
    }
}
