//! Swagger UI at /docs in a real browser: headless Debian Chromium driven by playwright-core.
//!
//! Ignored by a plain `cargo test` because it needs Chromium and `npm ci` in tests/browser;
//! `.ci/run` installs both and runs it with `cargo test --test browser -- --ignored`. It
//! writes tests/artifacts/swagger-ui.png.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{json_response, Gateway, Upstream, KEY};
use serde_json::{json, Value};

/// Runs the browser script against `gateway` on the operation with DOM id `operation`; what
/// it saw.
async fn try_it_out(gateway: &Gateway, screenshot: &str, operation: &str) -> Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = tokio::process::Command::new("node")
        .arg(format!("{root}/tests/browser/swagger_try_it_out.mjs"))
        .arg(gateway.url(""))
        .arg(KEY)
        .arg(screenshot)
        .arg(operation)
        .output()
        .await
        .expect("node is needed for the browser test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap()
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
    let gateway = Gateway::start(&oa_bypass::config::BUILT_IN_MANIFEST.replace(
        "base_url = \"https://api.openai.com\"",
        &format!("base_url = \"{}\"", upstream.base_url()),
    ))
    .await;
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
    assert!(rec.body_text().contains("Hi from Swagger UI"));
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "no screenshot"
    );
}
