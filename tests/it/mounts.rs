//! Several upstreams behind one gateway (`[mounts.NAME]`): each behind its prefix, reached by
//! the official Python SDK, with the prefix gone and the base URL's path kept; a route sent
//! to another mount's upstream without a prefix; mounts in `/openapi.json` and the metrics;
//! a mount added on SIGHUP under load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{
    client, json_response, python, Binary, Gateway, Recorded, Upstream, KEY, LOG_DEADLINE,
};
use poem::Response;
use serde_json::json;

/// Answers chat (plain and streamed) and the model list, naming itself in the answer.
fn provider(name: &'static str) -> impl Fn(&Recorded) -> Response + Send + Sync + 'static {
    move |rec: &Recorded| {
        let path = rec.path_and_query.as_str();
        if path.ends_with("/chat/completions") && rec.body_text().contains("\"stream\":true") {
            let chunk = json!({
                "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": name}, "finish_reason": null}]
            });
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(format!("data: {chunk}\n\ndata: [DONE]\n\n"));
        }
        if path.ends_with("/chat/completions") {
            return json_response(
                200,
                &json!({
                    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": name}}]
                }),
            );
        }
        json_response(
            200,
            &json!({"object": "list", "data": [{"id": name, "object": "model", "created": 1, "owned_by": name}]}),
        )
    }
}

const SCRIPT: &str = r#"
import json, sys
import openai
gateway = sys.argv[1]
out = {}
for prefix, key in [("/groq", "sk-for-groq"), ("/local", "sk-for-local")]:
    client = openai.OpenAI(base_url=gateway + prefix + "/v1", api_key=key, max_retries=0)
    said = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    streamed = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    out[prefix] = {
        "said": said.choices[0].message.content,
        "streamed": "".join(c.choices[0].delta.content or "" for c in streamed if c.choices),
        "models": [m.id for m in client.models.list()],
    }
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_python_sdk_reaches_two_mounts_each_at_its_own_upstream() {
    let default = Upstream::start(provider("default")).await;
    let groq = Upstream::start(provider("groq")).await;
    let local = Upstream::start(provider("local")).await;
    let mounts = format!(
        "[mounts.groq]\nprefix = \"/groq\"\nbase_url = \"{}/openai\"\n\
         [mounts.local]\nprefix = \"/local\"\nbase_url = \"{}\"\n",
        groq.base_url(),
        local.base_url()
    );
    let gateway = Gateway::start(&support::test_manifest(&default.base_url(), &mounts)).await;
    let python = tokio::task::spawn_blocking(python::openai_sdk)
        .await
        .unwrap();
    let out = python::run(&python, &["-c", SCRIPT, &gateway.url("")]).await;
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for name in ["groq", "local"] {
        let seen = &out[format!("/{name}")];
        assert_eq!(seen["said"], name, "{out}");
        assert_eq!(seen["streamed"], name, "{out}");
        assert_eq!(seen["models"], json!([name]), "{out}");
    }
    // The prefix is gone and the base URL's path kept; the client's key goes up unchanged.
    let paths = |upstream: &Upstream| -> Vec<String> {
        (upstream.requests().iter())
            .map(|rec| format!("{} {}", rec.method, rec.path_and_query))
            .collect()
    };
    assert_eq!(
        paths(&groq),
        [
            "POST /openai/v1/chat/completions",
            "POST /openai/v1/chat/completions",
            "GET /openai/v1/models"
        ]
    );
    assert_eq!(
        paths(&local),
        [
            "POST /v1/chat/completions",
            "POST /v1/chat/completions",
            "GET /v1/models"
        ]
    );
    assert!(groq
        .requests()
        .iter()
        .all(|rec| rec.header("authorization") == Some("Bearer sk-for-groq")));
    assert!(local
        .requests()
        .iter()
        .all(|rec| rec.header("authorization") == Some("Bearer sk-for-local")));
    assert!(default.requests().is_empty());
    // The path secret, access rules and limits are the gateway's, whatever the mount: a
    // query string goes up as sent.
    let response = client()
        .get(gateway.url("/groq/v1/models?limit=2&after=a%2Fb"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        groq.last().path_and_query,
        "/openai/v1/models?limit=2&after=a%2Fb"
    );

    let metrics = support::scrape_settled(gateway.url("/metrics")).await;
    assert!(
        metrics.contains(r#"oa_bypass_mount_requests_total{mount="groq",status="200"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"oa_bypass_requests_total{route="/local/v1/models",method="GET",status="200"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_route_naming_a_mount_goes_to_its_upstream_without_a_prefix() {
    let default = Upstream::echo().await;
    let files = Upstream::echo().await;
    let manifest = format!(
        "[upstream]\nbase_url = \"{}\"\n\
         [mounts.files]\nprefix = \"/files-host\"\nbase_url = \"{}/storage\"\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/files/{{file_id}}\"\nupstream = \"files\"\n",
        default.base_url(),
        files.base_url()
    );
    let gateway = Gateway::start(&manifest).await;
    for path in ["/v1/models", "/v1/files/file-1", "/files-host/v1/models"] {
        let response = support::get_with_key(gateway.url(path)).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    assert_eq!(default.requests().len(), 1);
    assert_eq!(default.last().path_and_query, "/v1/models");
    let at_files: Vec<String> = files
        .requests()
        .iter()
        .map(|rec| rec.path_and_query.clone())
        .collect();
    assert_eq!(at_files, ["/storage/v1/files/file-1", "/storage/v1/models"]);
}

#[tokio::test]
async fn mounts_appear_in_the_openapi_document_under_their_prefix_and_tag() {
    let upstream = Upstream::echo().await;
    let mounts = "[mounts.anthropic]\nprefix = \"/anthropic\"\nbase_url = \"http://127.0.0.1:9\"\n\
                  credential_header = \"x-api-key\"\n";
    let gateway = Gateway::start(&support::test_manifest(&upstream.base_url(), mounts)).await;
    let document = support::openapi_document(&gateway).await;
    let operation = &document["paths"]["/anthropic/v1/chat/completions"]["post"];
    assert_eq!(operation["tags"], json!(["anthropic"]), "{operation}");
    assert_eq!(
        operation["operationId"],
        "anthropic_post_v1_chat_completions"
    );
    assert_eq!(operation["security"], json!([{"xApiKeyHeader": []}]));
    assert_eq!(
        document["components"]["securitySchemes"]["xApiKeyHeader"]["name"],
        "x-api-key"
    );
    assert!(document["paths"]["/v1/chat/completions"]["post"].is_object());
    let tags: Vec<&str> = (document["tags"].as_array().unwrap().iter())
        .filter_map(|tag| tag["name"].as_str())
        .collect();
    assert!(tags.contains(&"anthropic"), "{tags:?}");
    // Through the mount, the key is read from its header: none there is a 401 naming it.
    let response = client()
        .get(gateway.url("/anthropic/v1/models"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-api-key"),
        "{body}"
    );
}

#[tokio::test]
async fn a_mount_added_on_sighup_under_load_fails_no_request() {
    let default = Upstream::echo().await;
    let added = Upstream::echo().await;
    let before = support::test_manifest(&default.base_url(), "");
    let gateway = Binary::spawn(&before, &[]);
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (url, failures, done, stop) = (
            gateway.url("/v1/models"),
            Arc::clone(&failures),
            Arc::clone(&done),
            Arc::clone(&stop),
        );
        load.push(tokio::spawn(async move {
            let http = client();
            while !stop.load(Ordering::Relaxed) {
                let response = http
                    .get(&url)
                    .header("authorization", format!("Bearer {KEY}"))
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = support::test_manifest(
        &default.base_url(),
        &format!(
            "[mounts.added]\nprefix = \"/added\"\nbase_url = \"{}\"\n",
            added.base_url()
        ),
    );
    std::fs::write(gateway.manifest_path(), after).unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_log("manifest reloaded", LOG_DEADLINE)
        .await;
    let response = support::get_with_key(gateway.url("/added/v1/models")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(added.last().path_and_query, "/v1/models");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(done.load(Ordering::Relaxed) > 20, "too little load to say");
}
