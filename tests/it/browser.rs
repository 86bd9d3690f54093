//! Swagger UI at /docs in a real browser: headless Debian Chromium driven by playwright-core.
//!
//! Ignored by a plain `cargo test` because it needs Chromium and `npm ci` in tests/browser;
//! `.ci/run` installs both and runs it with `cargo test --test it -- --ignored browser::`. It
//! writes tests/artifacts/swagger-ui.png and swagger-ui-stream.png (the pictures in docs/).

use std::process::Stdio;
use std::time::Duration;

use crate::support;
use crate::support::{json_response, Gateway, Upstream, KEY};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

/// The browser script on `gateway`'s operation with DOM id `operation`, picking the named
/// request example; its output is read line by line.
fn browse(
    gateway: &Gateway,
    screenshot: &str,
    operation: &str,
    example: &str,
) -> (tokio::process::Child, Lines<BufReader<ChildStdout>>) {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = tokio::process::Command::new("node")
        .arg(format!("{root}/tests/browser/swagger_try_it_out.mjs"))
        .arg(gateway.url(""))
        .arg(KEY)
        .arg(screenshot)
        .arg(operation)
        .arg(example)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is needed for the browser test");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next line the script prints, as JSON; its stderr if it ends without one.
async fn next_seen(
    child: &mut tokio::process::Child,
    lines: &mut Lines<BufReader<ChildStdout>>,
) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the browser script said nothing for 120 s")
        .unwrap();
    let Some(line) = line else {
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        panic!("the browser script ended: {stderr}");
    };
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// Runs the browser script to its end with the prefilled example; what it saw.
async fn try_it_out(gateway: &Gateway, screenshot: &str, operation: &str) -> Value {
    let (mut child, mut lines) = browse(gateway, screenshot, operation, "request");
    let seen = next_seen(&mut child, &mut lines).await;
    assert!(child.wait().await.unwrap().success(), "{seen}");
    seen
}

/// The manifest's example for POST /v1/chat/completions, which Swagger UI prefills.
fn chat_example() -> Value {
    let config =
        oa_bypass::Config::from_manifest_str(oa_bypass::config::BUILT_IN_MANIFEST).unwrap();
    let chat = (config.routes.routes().iter())
        .find(|route| route.method == "POST" && route.template.as_str() == "/v1/chat/completions")
        .unwrap();
    chat.examples.json.clone().unwrap()
}

#[tokio::test]
#[ignore = "needs Chromium and tests/browser/node_modules; .ci/run provides both"]
async fn swagger_ui_tries_out_chat_completions_through_a_mount() {
    let upstream = Upstream::start(|_| {
        json_response(
            200,
            &json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Hello, mount"}}]}),
        )
    })
    .await;
    let manifest = oa_bypass::config::BUILT_IN_MANIFEST.replacen(
        "\n[[routes]]\n",
        &format!(
            "\n[mounts.groq]\nprefix = \"/groq\"\nbase_url = \"{}/openai\"\n\n[[routes]]\n",
            upstream.base_url()
        ),
        1,
    );
    let gateway = Gateway::start(&manifest).await;
    let screenshot = format!("{}/swagger-ui-mount.png", std::env::temp_dir().display());
    let seen = try_it_out(
        &gateway,
        &screenshot,
        "operations-groq-groq_createChatCompletion",
    )
    .await;
    assert_eq!(seen["status"], "200", "{seen}");
    assert!(
        seen["body"].as_str().unwrap().contains("Hello, mount"),
        "{seen}"
    );
    let rec = upstream.last();
    assert_eq!(rec.path_and_query, "/openai/v1/chat/completions");
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
}

#[tokio::test]
#[ignore = "needs Chromium and tests/browser/node_modules; .ci/run provides both"]
async fn swagger_ui_authorizes_and_tries_out_chat_completions_through_the_gateway() {
    let upstream = Upstream::start(|_| {
        json_response(
            200,
            &json!({
                "id": "chatcmpl-swagger", "object": "chat.completion", "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello, browser"}}]
            }),
        )
    })
    .await;
    let gateway = Gateway::start(&support::shipped_manifest(&upstream)).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let artifacts = format!("{root}/tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = format!("{artifacts}/swagger-ui.png");
    let _ = std::fs::remove_file(&screenshot);

    let seen = try_it_out(
        &gateway,
        &screenshot,
        "operations-Chat-createChatCompletion",
    )
    .await;

    assert!(
        seen["operations"].as_u64().unwrap() >= 281,
        "Swagger UI listed {} operations",
        seen["operations"]
    );
    assert_eq!(seen["status"], "200");
    assert!(
        seen["body"].as_str().unwrap().contains("Hello, browser"),
        "{seen}"
    );
    assert_eq!(
        seen["external"],
        json!([]),
        "the page fetched from outside the gateway"
    );
    let rec = upstream.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path_and_query, "/v1/chat/completions");
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    // Nothing was typed: the upstream got the manifest's example, as Swagger UI prefilled it.
    let sent: Value = serde_json::from_str(&rec.body_text()).unwrap();
    assert_eq!(sent, chat_example());
    assert_eq!(
        serde_json::from_str::<Value>(seen["prefilled"].as_str().unwrap()).unwrap(),
        sent
    );
    // The sections people use come first.
    let sections: Vec<&str> = (seen["sections"].as_array().unwrap().iter())
        .map(|tag| tag.as_str().unwrap())
        .collect();
    assert_eq!(
        sections[..5],
        [
            "Gateway",
            "Responses",
            "Conversations",
            "Chat",
            "Completions"
        ]
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "no screenshot"
    );
}

#[tokio::test]
#[ignore = "needs Chromium and tests/browser/node_modules; .ci/run provides both"]
async fn swagger_ui_shows_a_streamed_answer_event_by_event() {
    let (upstream, events) = Upstream::streaming().await;
    let gateway = Gateway::start(&support::shipped_manifest(&upstream)).await;
    let artifacts = format!("{}/tests/artifacts", env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = format!("{artifacts}/swagger-ui-stream.png");
    let (mut child, mut lines) = browse(
        &gateway,
        &screenshot,
        "operations-Chat-createChatCompletion",
        "stream",
    );
    let chunk = |text: &str| {
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]})
        ))
    };
    events.send(chunk("Hel")).await.unwrap();
    // The panel shows the first event while the upstream still holds the stream open.
    let first = next_seen(&mut child, &mut lines).await;
    let shown = first["first_event"].as_str().unwrap();
    assert!(
        shown.contains("Hel") && !shown.contains("[DONE]"),
        "{first}"
    );
    events.send(chunk("lo, stream")).await.unwrap();
    events.send(Bytes::from("data: [DONE]\n\n")).await.unwrap();
    drop(events);

    let seen = next_seen(&mut child, &mut lines).await;
    assert!(child.wait().await.unwrap().success(), "{seen}");
    assert_eq!(seen["status"], "200", "{seen}");
    let body = seen["body"].as_str().unwrap();
    assert!(
        body.contains("lo, stream") && body.contains("[DONE]"),
        "{seen}"
    );
    let sent: Value = serde_json::from_str(&upstream.last().body_text()).unwrap();
    assert_eq!(
        sent["stream"], true,
        "the streamed example was sent: {sent}"
    );
}

#[tokio::test]
#[ignore = "needs Chromium and tests/browser/node_modules; .ci/run provides both"]
async fn swagger_ui_tries_out_the_typed_document_of_openapi_schemas() {
    let upstream = Upstream::echo().await;
    let spec = format!("{}/spec/openai-openapi.json", env!("CARGO_MANIFEST_DIR"));
    let gateway = Gateway::start(
        &support::shipped_manifest(&upstream)
            .replace("[openapi]\n", &format!("[openapi]\nschemas = \"{spec}\"\n")),
    )
    .await;
    let screenshot = format!("{}/swagger-ui-typed.png", std::env::temp_dir().display());
    let seen = try_it_out(
        &gateway,
        &screenshot,
        "operations-Chat-createChatCompletion",
    )
    .await;
    assert_eq!(seen["status"], "200", "{seen}");
    let sent: Value = serde_json::from_str(&upstream.last().body_text()).unwrap();
    assert_eq!(sent, chat_example());
}
