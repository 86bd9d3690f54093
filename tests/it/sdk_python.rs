//! The official `openai` Python SDK, unmodified, through the gateway to a local upstream:
//! chat, streaming chat, embeddings, file upload and download, speech, assistants (with
//! OpenAI-Beta), a typed upstream error and the gateway's own 401.
//!
//! Needs python3. If the `openai` package is not importable, the test installs it from PyPI
//! into a virtualenv under target/ once, so `cargo test` alone is enough on a new machine.

use crate::support;
use crate::support::{json_response, Gateway, Recorded, Upstream, KEY};
use poem::Response;
use serde_json::json;

fn sse(events: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for event in events {
        out.push_str(&format!("data: {event}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

fn chunk(content: Option<&str>) -> serde_json::Value {
    json!({
        "id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    })
}

/// Answers like api.openai.com does for the flows the script runs.
fn openai_like(rec: &Recorded) -> Response {
    let path = rec.path_and_query.as_str();
    match (rec.method.as_str(), path) {
        ("POST", "/v1/chat/completions") if rec.body_text().contains("\"stream\":true") => {
            let mut events: Vec<_> = ["one ", "two ", "three"]
                .into_iter()
                .map(|piece| chunk(Some(piece)))
                .collect();
            events.push(json!({
                "id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            }));
            Response::builder()
                .header("content-type", "text/event-stream; charset=utf-8")
                .body(sse(&events))
        }
        ("POST", "/v1/chat/completions") => json_response(
            200,
            &json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello from upstream"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
            }),
        ),
        ("POST", "/v1/embeddings") => json_response(
            200,
            &json!({
                "object": "list", "model": "text-embedding-3-small",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}
            }),
        ),
        ("POST", "/v1/files") => json_response(
            200,
            &json!({
                "id": "file-abc123", "object": "file", "bytes": rec.body_len, "created_at": 1,
                "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"
            }),
        ),
        ("GET", "/v1/files/file-abc123/content") => Response::builder()
            .header("content-type", "application/octet-stream")
            .body((0..=255u8).collect::<Vec<u8>>().repeat(64)),
        ("POST", "/v1/audio/speech") => {
            let mut audio = b"ID3".to_vec();
            audio.extend_from_slice(&[0u8; 1000]);
            Response::builder()
                .header("content-type", "audio/mpeg")
                .body(audio)
        }
        ("POST", "/v1/assistants") => json_response(
            200,
            &json!({
                "id": "asst_1", "object": "assistant", "created_at": 1, "name": "helper",
                "description": null, "model": "gpt-4o", "instructions": null, "tools": [],
                "metadata": {}, "top_p": 1.0, "temperature": 1.0, "response_format": "auto"
            }),
        ),
        ("GET", "/v1/models/missing-model") => json_response(
            404,
            &json!({"error": {"message": "The model 'missing-model' does not exist",
                              "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}),
        ),
        _ => json_response(
            500,
            &json!({"error": {"message": format!("unexpected {path}")}}),
        ),
    }
}

#[tokio::test]
async fn official_python_sdk_works_through_the_gateway() {
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let upstream = Upstream::start(openai_like).await;
    let gateway = Gateway::start(&support::shipped_manifest(&upstream)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_flows.py");
    let stdout = support::python::run(&python, &[script, &gateway.url("/v1")]).await;
    for flow in [
        "chat ok",
        "streaming chat ok",
        "embeddings ok",
        "file upload ok",
        "file download ok",
        "speech ok",
        "assistants ok",
        "typed upstream error ok",
        "gateway 401 ok",
    ] {
        assert!(stdout.contains(flow), "{flow} missing:\n{stdout}");
    }

    let requests = upstream.requests();
    // Eight calls reached the upstream; the keyless one did not.
    assert_eq!(requests.len(), 8, "{requests:#?}");
    for rec in &requests {
        assert_eq!(
            rec.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(
            rec.header("x-stainless-lang").is_some(),
            "SDK headers pass through"
        );
    }
    let upload = requests
        .iter()
        .find(|r| r.path_and_query == "/v1/files")
        .unwrap();
    assert!(upload
        .header("content-type")
        .unwrap()
        .starts_with("multipart/form-data; boundary="));
    assert!(upload.body_text().contains("name=\"purpose\""));
    assert!(upload.body_len > 15_000);
    let assistant = requests
        .iter()
        .find(|r| r.path_and_query == "/v1/assistants")
        .unwrap();
    assert_eq!(assistant.header("openai-beta"), Some("assistants=v2"));
}
