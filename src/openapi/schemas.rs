//! `openapi.schemas`: the official OpenAPI spec's request and answer schemas, taken into the
//! document operation by operation (matched by operationId), with every component schema they
//! reference. The spec is read when the document is built and dropped once it is.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::routes::{Examples, FormValue};

const SCHEMA_REFS: &str = "#/components/schemas/";
const RESPONSE_REFS: &str = "#/components/responses/";

/// The official spec, indexed by operationId.
pub(super) struct Spec {
    document: Value,
    /// operationId → (path, method) in `document`.
    operations: HashMap<String, (String, String)>,
}

impl Spec {
    /// Reads and indexes the spec at `path`; the message names the setting.
    pub(super) fn read(path: &Path) -> Result<Spec, String> {
        let failed = |why: String| format!("openapi.schemas: {}: {why}", path.display());
        let text = std::fs::read(path).map_err(|err| failed(err.to_string()))?;
        let document: Value =
            serde_json::from_slice(&text).map_err(|err| failed(format!("not JSON: {err}")))?;
        let mut document = document;
        mend(&mut document);
        let version = document["openapi"].as_str().unwrap_or_default();
        if !version.starts_with("3.1") {
            return Err(failed(format!(
                "an OpenAPI 3.1 document is needed, this one says {version:?}"
            )));
        }
        let mut operations = HashMap::new();
        for (path, item) in document["paths"].as_object().into_iter().flatten() {
            for (method, operation) in item.as_object().into_iter().flatten() {
                if let Some(id) = operation["operationId"].as_str() {
                    operations.insert(id.to_owned(), (path.clone(), method.clone()));
                }
            }
        }
        Ok(Spec {
            document,
            operations,
        })
    }

    fn operation(&self, id: &str) -> Option<&Value> {
        let (path, method) = self.operations.get(id)?;
        self.document["paths"][path].get(method)
    }

    /// Gives `op` (the gateway's operation `id`) the spec's schemas for the media types it
    /// already lists: its request bodies, and its successful answer.
    pub(super) fn type_operation(&self, id: &str, examples: &Examples, op: &mut Value) {
        let Some(spec) = self.operation(id) else {
            return;
        };
        let typed = &spec["requestBody"]["content"];
        for (media_type, content) in each_mut(op.pointer_mut("/requestBody/content")) {
            let Some(schema) = typed[media_type.as_str()].get("schema") else {
                continue;
            };
            content["schema"] = if media_type == "multipart/form-data" {
                self.with_form_examples(schema, examples)
            } else {
                schema.clone()
            };
        }
        let responses = &spec["responses"];
        let success = ["200", "201", "202"]
            .into_iter()
            .find_map(|status| responses.get(status))
            .map(|answer| self.resolve_response(answer));
        let Some(success) = success else {
            return;
        };
        for (media_type, content) in each_mut(op.pointer_mut("/responses/200/content")) {
            if let Some(schema) = success["content"][media_type.as_str()].get("schema") {
                content["schema"] = schema.clone();
            }
        }
    }

    /// A form's schema, inlined so its text fields can carry the manifest's example values
    /// (Swagger UI prefills form fields from their schemas).
    fn with_form_examples(&self, schema: &Value, examples: &Examples) -> Value {
        let mut schema = self.resolve_schema(schema).clone();
        for field in &examples.form {
            let FormValue::Text(text) = &field.value else {
                continue;
            };
            // (`get_mut`, not indexing, which would add what is missing.)
            let property = (schema.get_mut("properties")).and_then(|all| all.get_mut(&field.name));
            if let Some(property) = property.filter(|property| property.is_object()) {
                property["example"] = Value::String(text.clone());
            }
        }
        schema
    }

    fn resolve_schema<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix(SCHEMA_REFS))
        {
            Some(name) => &self.document["components"]["schemas"][name],
            None => schema,
        }
    }

    fn resolve_response<'a>(&'a self, answer: &'a Value) -> &'a Value {
        match answer["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix(RESPONSE_REFS))
        {
            Some(name) => &self.document["components"]["responses"][name],
            None => answer,
        }
    }

    /// The spec's component schemas that `paths` refers to, directly or through others.
    pub(super) fn components_for(&self, paths: &Value) -> Map<String, Value> {
        let schemas = &self.document["components"]["schemas"];
        let mut taken = Map::new();
        let mut pending = Vec::new();
        refs_in(paths, &mut pending);
        while let Some(name) = pending.pop() {
            if taken.contains_key(&name) {
                continue;
            }
            if let Some(schema) = schemas.get(&name) {
                refs_in(schema, &mut pending);
                taken.insert(name, schema.clone());
            }
        }
        taken.sort_keys();
        taken
    }
}

/// Each (key, value) of a JSON object; nothing for anything else or nothing at all.
/// (Indexing a `Value` mutably would insert what is missing.)
fn each_mut(value: Option<&mut Value>) -> impl Iterator<Item = (&String, &mut Value)> {
    (value.and_then(Value::as_object_mut).into_iter()).flat_map(|map| map.iter_mut())
}

/// Repairs to the published spec, so the document passes validators and reads well here: a
/// `required` list that names a field twice keeps each name once; OpenAPI 3.0's boolean
/// `exclusiveMinimum`/`exclusiveMaximum` become 3.1's bounds; a `default` that is not of the
/// schema's one `type` (`null` for an object) is dropped, as is JSON Schema 2019's
/// `$recursiveAnchor`; and a description's relative link to OpenAI's docs is made absolute.
fn mend(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("$recursiveAnchor");
            let wrong_default = match (map.get("type"), map.get("default")) {
                (Some(Value::String(kind)), Some(default)) => !is_of_type(default, kind),
                (_, Some(Value::Null)) => !admits_null(map),
                _ => false,
            };
            if wrong_default {
                map.remove("default");
            }
            for (exclusive, bound) in [
                ("exclusiveMinimum", "minimum"),
                ("exclusiveMaximum", "maximum"),
            ] {
                if let Some(&Value::Bool(flag)) = map.get(exclusive) {
                    let limit = map.remove(bound).filter(|_| flag);
                    map.remove(exclusive);
                    if let Some(limit) = limit {
                        map.insert(exclusive.to_owned(), limit);
                    }
                }
            }
            for (key, inner) in map.iter_mut() {
                match (key.as_str(), inner) {
                    ("required", Value::Array(names)) => {
                        let mut seen = Vec::with_capacity(names.len());
                        names.retain(|name| {
                            let first = !seen.contains(name);
                            seen.push(name.clone());
                            first
                        });
                    }
                    ("description", Value::String(text)) if text.contains("](/") => {
                        *text = text.replace("](/", "](https://platform.openai.com/");
                    }
                    (_, inner) => mend(inner),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mend),
        _ => {}
    }
}

/// Whether a schema says `null` is one of its values (directly or as an alternative).
fn admits_null(schema: &Map<String, Value>) -> bool {
    let null_type = |value: &Value| match value {
        Value::String(kind) => kind == "null",
        Value::Array(kinds) => kinds.iter().any(|kind| kind == "null"),
        _ => false,
    };
    schema.get("type").is_some_and(null_type)
        || ["anyOf", "oneOf"].iter().any(|key| {
            (schema
                .get(*key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten())
            .any(|branch| branch.get("type").is_some_and(null_type))
        })
}

/// Whether `value` is of JSON Schema type `kind`.
fn is_of_type(value: &Value, kind: &str) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        _ => true,
    }
}

/// The component schema names that `value` refers to.
fn refs_in(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(target)) => {
                        if let Some(name) = target.strip_prefix(SCHEMA_REFS) {
                            names.push(name.to_owned());
                        }
                    }
                    _ => refs_in(inner, names),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| refs_in(item, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn referenced_components_are_taken_transitively_and_no_others() {
        let spec = Spec {
            document: json!({"components": {"schemas": {
                "A": {"properties": {"b": {"$ref": "#/components/schemas/B"}}},
                "B": {"items": [{"$ref": "#/components/schemas/C"}]},
                "C": {"type": "string"},
                "Unused": {"type": "integer"},
            }}}),
            operations: HashMap::new(),
        };
        let taken = spec.components_for(&json!({"/x": {"$ref": "#/components/schemas/A"}}));
        let names: Vec<&String> = taken.keys().collect();
        assert_eq!(names, ["A", "B", "C"]);
    }
}
