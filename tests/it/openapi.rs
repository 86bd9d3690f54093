//! /openapi.json and /docs describe exactly the routes the gateway loaded.

use crate::support;
use crate::support::{client, openapi_document, run_binary, Gateway, Upstream};
use serde_json::Value;

#[tokio::test]
async fn a_route_added_to_the_manifest_appears_with_params_and_body_kinds() {
    let upstream = Upstream::echo().await;
    let manifest = format!(
        "{}\n[[routes]]\nmethod = \"PATCH\"\npath = \"/v1/widgets/{{widget_id}}/parts/{{part_id}}\"\n\
         body = [\"json\", \"multipart\", \"none\"]\ntag = \"Widgets\"\nsummary = \"Patch a widget part.\"\n\
         produces = [\"application/zip\", \"application/json\"]\nstreaming = true\n",
        support::test_manifest(&upstream.base_url(), "")
    );
    let gateway = Gateway::start(&manifest).await;
    let doc = openapi_document(&gateway).await;
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["servers"][0]["url"], "/");

    let op = &doc["paths"]["/v1/widgets/{widget_id}/parts/{part_id}"]["patch"];
    assert_eq!(
        op["operationId"],
        "patch_v1_widgets_widget_id_parts_part_id"
    );
    assert_eq!(op["tags"][0], "Widgets");
    assert_eq!(op["summary"], "Patch a widget part.");
    let params: Vec<(&str, &str, bool)> = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["in"].as_str().unwrap(),
                p["required"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        params,
        [("widget_id", "path", true), ("part_id", "path", true)]
    );
    let body = &op["requestBody"];
    assert_eq!(body["required"], false, "\"none\" is among the kinds");
    let mut kinds: Vec<&String> = body["content"].as_object().unwrap().keys().collect();
    kinds.sort();
    assert_eq!(kinds, ["application/json", "multipart/form-data"]);
    let mut answers: Vec<&String> = op["responses"]["200"]["content"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        ["application/json", "application/zip", "text/event-stream"]
    );
    assert_eq!(
        op["responses"]["200"]["content"]["application/zip"]["schema"]["format"],
        "binary"
    );

    // The rest of the manifest is there too, with the gateway's own endpoints.
    let binary = &doc["paths"]["/v1/blobs/{blob_id}"]["put"]["requestBody"]["content"];
    assert!(binary.get("application/octet-stream").is_some());
    let sdp = &doc["paths"]["/v1/realtime/calls"]["post"]["requestBody"]["content"];
    assert!(sdp.get("application/sdp").is_some());
    assert!(doc["paths"]["/v1/models"]["get"]
        .get("requestBody")
        .is_none());
    assert_eq!(
        doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .len(),
        2,
        "streaming routes answer JSON or SSE"
    );
    assert_eq!(
        doc["paths"]["/health"]["get"]["security"],
        serde_json::json!([])
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"][0]["bearerAuth"], serde_json::json!([]));
}

#[tokio::test]
async fn docs_page_is_swagger_ui_served_by_the_gateway() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client().get(gateway.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    let html = response.text().await.unwrap();
    assert!(html.contains("SwaggerUIBundle"));
    assert!(html.contains("url: \"openapi.json\""));
    assert!(!html.contains("<script src=\"http"), "no assets from a CDN");
}

#[tokio::test]
async fn disabled_openapi_serves_neither_endpoint() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&format!(
        "[openapi]\nenabled = false\n{}",
        support::test_manifest(&upstream.base_url(), "")
    ))
    .await;
    for path in ["/openapi.json", "/docs"] {
        let response = client().get(gateway.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn title_and_version_come_from_the_settings() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&format!(
        "[openapi]\ntitle = \"Team gateway\"\nversion = \"2026.11\"\n{}",
        support::test_manifest(&upstream.base_url(), "")
    ))
    .await;
    let doc = openapi_document(&gateway).await;
    assert_eq!(doc["info"]["title"], "Team gateway");
    assert_eq!(doc["info"]["version"], "2026.11");
}

#[test]
fn print_openapi_writes_the_document_of_the_loaded_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/only/{thing}\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_binary(&["--print-openapi"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let mut paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    paths.sort();
    assert_eq!(paths, ["/", "/health", "/openapi.json", "/v1/only/{thing}"]);
}

fn python_tools() -> std::path::PathBuf {
    support::python::python_with(
        "openapi-venv",
        &[
            ("openapi_spec_validator", "openapi-spec-validator"),
            ("schemathesis", "schemathesis"),
            ("jsonschema", "jsonschema"),
        ],
    )
}

#[tokio::test]
async fn document_validates_and_schemathesis_finds_no_gateway_errors() {
    validate_and_fuzz("").await;
}

/// With `openapi.schemas`, the document is OpenAPI 3.1 with the official request and answer
/// schemas; it passes the same checks, and every example fits its request schema.
#[tokio::test]
async fn typed_document_validates_its_examples_fit_and_schemathesis_finds_no_gateway_errors() {
    let spec = format!("{}/spec/openai-openapi.json", env!("CARGO_MANIFEST_DIR"));
    let (python, document) = validate_and_fuzz(&format!("schemas = \"{spec}\"\n")).await;
    let doc: Value = serde_json::from_str(&document).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let chat = &doc["paths"]["/v1/chat/completions"]["post"];
    let request = &chat["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(request, "#/components/schemas/CreateChatCompletionRequest");
    let properties = &doc["components"]["schemas"]["CreateChatCompletionRequest"];
    assert!(
        properties.to_string().contains("\"messages\""),
        "{properties}"
    );
    let answers = &chat["responses"]["200"]["content"];
    assert_eq!(
        answers["text/event-stream"]["schema"]["$ref"],
        "#/components/schemas/CreateChatCompletionStreamResponse"
    );
    // The manifest's form values stay the prefilled ones in the typed form.
    let purpose = &doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]
        ["multipart/form-data"]["schema"]["properties"]["purpose"];
    assert_eq!(purpose["example"], "fine-tune");
    assert!(purpose["enum"].is_array(), "{purpose}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, &document).unwrap();
    let checked = tokio::process::Command::new(&python)
        .args(["-c", EXAMPLES_FIT])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    // The one the spec gets wrong: its request schema for creating a Realtime session is the
    // answer's, which requires the client_secret the server issues. Listed so that a spec
    // that mends it shows up here.
    let invalid: Vec<&str> = out.lines().filter(|l| l.starts_with("invalid ")).collect();
    assert_eq!(
        invalid,
        ["invalid POST /v1/realtime/sessions request: 'client_secret' is a required property"],
        "{out}"
    );
    assert!(out.contains("100 checked"), "{out}");
}

/// Validates each request example of the document against its request schema (JSON Schema
/// 2020-12, with the document's components).
const EXAMPLES_FIT: &str = r#"
import json, sys, jsonschema
doc = json.load(open(sys.argv[1]))
checked = 0
for path, item in doc["paths"].items():
    for method, op in item.items():
        content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        for name, example in content.get("examples", {}).items():
            checked += 1
            schema = dict(content["schema"], components=doc["components"])
            for error in jsonschema.Draft202012Validator(schema).iter_errors(example["value"]):
                print(f"invalid {method.upper()} {path} {name}: {error.message}")
print(f"{checked} checked")
"#;

/// Runs openapi-spec-validator and schemathesis on the document of the full shipped manifest
/// with `openapi_settings` added, pointed at a recording upstream; the Python used and the
/// document.
async fn validate_and_fuzz(openapi_settings: &str) -> (std::path::PathBuf, String) {
    let python = tokio::task::spawn_blocking(python_tools).await.unwrap();
    let upstream = Upstream::echo().await;
    // The full shipped manifest, pointed at the recording upstream.
    let manifest = support::shipped_manifest(&upstream)
        .replace("[openapi]\n", &format!("[openapi]\n{openapi_settings}"));
    let gateway = Gateway::start(&manifest).await;
    let document = client()
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, &document).unwrap();

    let validate = tokio::process::Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(
        validate.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&validate.stdout),
        String::from_utf8_lossy(&validate.stderr)
    );

    let schemathesis = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(&python);
        command
            .args([
                "-c",
                "import sys; from schemathesis.cli import schemathesis; \
                 sys.argv[0] = 'schemathesis'; schemathesis()",
                "run",
            ])
            .arg(gateway.url("/openapi.json"))
            .args(["--seed", "1", "--no-color"])
            .args(["-H", "Authorization: Bearer sk-test-schemathesis"])
            .args(extra)
            .current_dir(dir.path())
            .env("NO_PROXY", "127.0.0.1")
            .env("SCHEMATHESIS_HOOKS", "");
        command
    };
    // The gateway's own endpoints: every check, schema conformance included.
    let own = schemathesis(&["--include-tag", "Gateway", "--checks", "all", "-n", "50"])
        .output()
        .await
        .unwrap();
    let own_out = String::from_utf8_lossy(&own.stdout);
    assert!(
        own.status.success(),
        "schemathesis on the gateway's endpoints:\n{own_out}"
    );
    assert!(own_out.contains("No issues found"), "{own_out}");

    // Every forwarded operation: the upstream answers 200 to anything, so any 5xx would be
    // the gateway's own failure.
    let forwarded = schemathesis(&[
        "--exclude-tag",
        "Gateway",
        "--checks",
        "not_a_server_error",
        "--phases",
        "fuzzing",
        "-n",
        "3",
    ])
    .output()
    .await
    .unwrap();
    let forwarded_out = String::from_utf8_lossy(&forwarded.stdout);
    assert!(
        forwarded.status.success(),
        "schemathesis on the forwarded operations:\n{forwarded_out}"
    );
    assert!(
        upstream.requests().len() > 281,
        "schemathesis did not reach the upstream through every route"
    );
    (python, document)
}

#[tokio::test]
async fn sections_come_in_the_order_people_use_them_and_the_order_is_a_setting() {
    let upstream = Upstream::echo().await;
    let built_in = support::shipped_manifest(&upstream);
    let names = |doc: &Value| -> Vec<String> {
        (doc["tags"].as_array().unwrap().iter())
            .map(|tag| tag["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let default = names(&openapi_document(&Gateway::start(&built_in).await).await);
    assert_eq!(
        default[..8],
        [
            "Gateway",
            "Responses",
            "Conversations",
            "Chat",
            "Completions",
            "Realtime",
            "Audio",
            "Images"
        ]
    );
    let position = |tag: &str| default.iter().position(|t| t == tag).unwrap();
    assert!(position("Embeddings") < position("Files"));
    assert!(position("Files") < position("Vector stores"));
    assert!(position("Evals") < position("Admin API keys"));
    // The administrative sections follow in alphabetical order.
    let admin = &default[position("Admin API keys")..];
    let mut sorted = admin.to_vec();
    sorted.sort();
    assert_eq!(admin, sorted);
    // Every operation's tag is listed exactly once.
    let mut unique = default.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), default.len());

    let custom = built_in.replace(
        "[openapi]\n",
        "[openapi]\ntag_order = [\"Files\", \"Chat\"]\n",
    );
    let custom = names(&openapi_document(&Gateway::start(&custom).await).await);
    assert_eq!(custom[..4], ["Gateway", "Files", "Chat", "Admin API keys"]);
    assert_eq!(custom.len(), default.len());
}

#[test]
fn a_tag_order_naming_no_section_is_refused_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[openapi]\ntag_order = [\"Chat\", \"Chats\", \"Chat\"]\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\ntag = \"Chat\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(
        stderr.contains("openapi.tag_order[1]: \"Chats\" is not the tag of any route or mount"),
        "{stderr}"
    );
    assert!(
        stderr.contains("openapi.tag_order[2]: \"Chat\" is listed twice"),
        "{stderr}"
    );
}

#[test]
fn a_schemas_file_that_cannot_be_read_is_refused_by_check_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let routes =
        "[[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n";
    std::fs::write(
        dir.path().join("routes.toml"),
        format!("[openapi]\nschemas = \"missing.json\"\n{routes}"),
    )
    .unwrap();
    let (code, _, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("openapi.schemas: "), "{stderr}");
    assert!(stderr.contains("missing.json: No such file"), "{stderr}");

    // Present but not JSON: start-up only looks for the file, --check reads it.
    std::fs::write(dir.path().join("spec.json"), "{not json").unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!("[openapi]\nschemas = \"spec.json\"\n{routes}"),
    )
    .unwrap();
    let (code, _, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("openapi.schemas: "), "{stderr}");
    assert!(stderr.contains("spec.json: not JSON"), "{stderr}");

    // Relative to the manifest's directory, and shown by --check.
    std::fs::copy(
        format!("{}/spec/openai-openapi.json", env!("CARGO_MANIFEST_DIR")),
        dir.path().join("spec.json"),
    )
    .unwrap();
    let (code, stdout, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("spec.json"), "{stdout}");
}
