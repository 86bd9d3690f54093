//! The docs page as a console: every route's request examples, as `/openapi.json` offers
//! them to Swagger UI, go through the gateway to the upstream unchanged; the manifest's
//! example settings are checked like every other setting.

use crate::support;
use crate::support::{client, run_binary, sha256, Gateway, Upstream};
use oa_bypass::config::{Config, BUILT_IN_MANIFEST};
use oa_bypass::routes::{BodyKind, FormValue, RouteSpec};
use serde_json::Value;

fn built_in_routes() -> Vec<RouteSpec> {
    let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
    config.routes.routes().to_vec()
}

#[test]
fn every_route_with_a_body_carries_an_example_and_every_stream_a_streamed_one() {
    for route in built_in_routes() {
        let at = format!("{} {}", route.method, route.template);
        let examples = &route.examples;
        if route.accepts(BodyKind::Multipart) {
            assert!(!examples.form.is_empty(), "{at}: no form fields");
        }
        if route.accepts(BodyKind::Json) {
            // Skills upload files, which a JSON body cannot carry: their form is the example.
            assert!(
                examples.json.is_some() || !examples.form.is_empty(),
                "{at}: no example"
            );
        }
        if route.streaming && route.accepts(BodyKind::Json) {
            let stream = examples.stream.as_ref().expect(&at);
            if stream["stream"] == true {
                // The same request otherwise.
                let mut plain = stream.clone();
                plain.as_object_mut().unwrap().remove("stream");
                assert_eq!(Some(&plain), examples.json.as_ref(), "{at}");
            } else {
                // Speech streams its audio as events when asked with stream_format.
                assert_eq!(stream["stream_format"], "sse", "{at}: asks for no stream");
            }
        }
    }
}

/// A path with each `{param}` filled by a plausible id.
fn concrete(template: &str) -> String {
    let mut path = String::new();
    for segment in template.split('/').skip(1) {
        path.push('/');
        if segment.starts_with('{') {
            path.push_str("abc123");
        } else {
            path.push_str(segment);
        }
    }
    path
}

/// A multipart body for the documented form: each file a few bytes, each text its example.
fn multipart_body(schema: &Value, boundary: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, field) in schema["properties"].as_object().unwrap() {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if field["format"] == "binary" {
            body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n\x00\x01\x02{name}\r\n"
                )
                .as_bytes(),
            );
        } else {
            let value = match &field["example"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

#[tokio::test]
async fn each_documented_example_reaches_the_upstream_byte_identical() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&support::shipped_manifest(&upstream)).await;
    let document = support::openapi_document(&gateway).await;
    let routes = built_in_routes();
    let (mut json_sent, mut forms_sent) = (0, 0);
    for (template, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let content = &operation["requestBody"]["content"];
            if content.is_null() {
                continue;
            }
            let route = (routes.iter())
                .find(|r| {
                    r.template.as_str() == template && r.method.as_str() == method.to_uppercase()
                })
                .unwrap_or_else(|| panic!("{method} {template} is not a manifest route"));
            let url = gateway.url(&concrete(template));
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();

            let examples = content["application/json"]["examples"].as_object();
            for (name, example) in examples.into_iter().flatten() {
                let value = &example["value"];
                let manifest = match name.as_str() {
                    "request" => route.examples.json.as_ref(),
                    _ => route.examples.stream.as_ref(),
                };
                assert_eq!(Some(value), manifest, "{template}: the document's {name}");
                let body = serde_json::to_vec_pretty(value).unwrap();
                let before = upstream.requests().len();
                let response = client()
                    .request(method.clone(), &url)
                    .bearer_auth("sk-console-example")
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{template} {name}");
                let requests = upstream.requests();
                assert_eq!(requests.len(), before + 1);
                let got = requests.last().unwrap();
                assert_eq!(got.body_sha256, sha256(&body), "{template} {name}");
                assert_eq!(got.body_head, body, "{template} {name}");
                json_sent += 1;
            }

            if let Some(form) = content.get("multipart/form-data") {
                if route.examples.form.is_empty() {
                    continue;
                }
                let names: Vec<&String> = form["schema"]["properties"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect();
                let manifest: Vec<&String> = route.examples.form.iter().map(|f| &f.name).collect();
                assert_eq!(names, manifest, "{template}: form fields in manifest order");
                for field in &route.examples.form {
                    let documented = &form["schema"]["properties"][&field.name];
                    match &field.value {
                        FormValue::File(_) => assert_eq!(documented["format"], "binary"),
                        FormValue::Text(text) => {
                            let example = match &documented["example"] {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            assert_eq!(&example, text, "{template} {}", field.name);
                        }
                    }
                }
                let boundary = "console-example-boundary";
                let body = multipart_body(&form["schema"], boundary);
                let response = client()
                    .request(method.clone(), &url)
                    .bearer_auth("sk-console-example")
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{template} form");
                let got = upstream.last();
                assert_eq!(got.body_head, body, "{template} form");
                forms_sent += 1;
            }
        }
    }
    let examples = |count: fn(&RouteSpec) -> bool| routes.iter().filter(|r| count(r)).count();
    let json = examples(|r| r.examples.json.is_some()) + examples(|r| r.examples.stream.is_some());
    assert_eq!(json_sent, json, "every JSON example and its streamed twin");
    assert!(json_sent > 95, "{json_sent}");
    assert_eq!(forms_sent, examples(|r| !r.examples.form.is_empty()));
    assert_eq!(forms_sent, 18, "every multipart route's form");
}

#[test]
fn example_settings_that_cannot_work_are_refused_with_their_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[routes]]\nmethod = \"POST\"\npath = \"/v1/a\"\nbody = \"json\"\nexample = '{\"model\": }'\n\
         stream_example = '{}'\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/b\"\nbody = \"multipart\"\nexample = '{}'\n\
         form = [\"file=@a.txt\", \"purpose\", \"file=@b.txt\"]\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/c\"\nform = [\"x=1\"]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_ne!(code, 0);
    for expected in [
        "routes[0].example: not JSON: expected value at line 1 column 11",
        "routes[0].stream_example: needs streaming = true",
        "routes[1].example: the route takes no JSON body",
        "routes[1].form[1]: \"purpose\" is not name=value (or name=@file)",
        "routes[1].form[2]: \"file\" is listed twice",
        "routes[2].form: the route takes no multipart body",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}
