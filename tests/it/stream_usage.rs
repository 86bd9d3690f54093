//! `[usage] inject_stream_usage`: a Chat Completions or Completions stream that did not ask
//! for usage is asked for it upstream, its tokens are counted, and the client still gets only
//! the events it asked for. Everything else goes up byte for byte.

use crate::support;
use crate::support::{Gateway, Recorded, Upstream};
use bytes::Bytes;
use poem::Response;

fn manifest(upstream: &Upstream, settings: &str) -> String {
    format!(
        r#"{settings}

[upstream]
base_url = "{}"
read_timeout = "5s"

[limits]
max_json_body = "4KiB"

[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true
usage = true
stream_usage_option = true

[[routes]]
method = "POST"
path = "/v1/completions"
body = "json"
usage = true
stream_usage_option = true

[[routes]]
method = "POST"
path = "/v1/responses"
body = "json"
streaming = true
usage = true
"#,
        upstream.base_url()
    )
}

fn injecting(upstream: &Upstream, fast_lane: bool) -> String {
    manifest(
        upstream,
        &format!("[server]\nfast_lane = {fast_lane}\n[usage]\ninject_stream_usage = true"),
    )
}

/// A chat stream as OpenAI sends it: asked for usage, every chunk says `"usage":null` and a
/// last chunk with no choices carries it; not asked, no usage at all.
fn openai_chat(request: &Recorded) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&request.body_head).unwrap();
    let with_usage = body["stream_options"]["include_usage"] == true;
    let mut stream = String::new();
    for piece in ["Hel", "lo"] {
        let mut chunk = serde_json::json!({
            "id": "chatcmpl-u", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
        });
        if with_usage {
            chunk["usage"] = serde_json::Value::Null;
        }
        stream.push_str(&format!("data: {chunk}\n\n"));
    }
    if with_usage {
        let usage = serde_json::json!({
            "id": "chatcmpl-u", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
        });
        stream.push_str(&format!("data: {usage}\n\n"));
    }
    stream.push_str("data: [DONE]\n\n");
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(stream)
}

async fn post(
    gateway: &Gateway,
    path: &str,
    body: &'static str,
    chunked: bool,
) -> reqwest::Response {
    let body = if chunked {
        // No Content-Length: the hyper engine streams it, and it is read whole to be rewritten.
        let chunks = futures_util::stream::iter(
            body.as_bytes()
                .chunks(16)
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        );
        reqwest::Body::wrap_stream(chunks)
    } else {
        reqwest::Body::from(body)
    };
    support::client()
        .post(gateway.url(path))
        .header("authorization", support::bearer())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn tokens(metrics: &str, kind: &str) -> Option<u64> {
    let series = format!(
        r#"oa_bypass_tokens_total{{model="gpt-4o-mini",route="/v1/chat/completions",kind="{kind}"}} "#
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.trim().parse().unwrap())
}

const NOT_ASKED: &str =
    r#"{"model":"gpt-4o-mini", "stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

#[tokio::test]
async fn a_stream_that_did_not_ask_is_counted_and_gets_the_events_it_asked_for() {
    for (fast_lane, chunked) in [(true, false), (false, false), (false, true)] {
        let upstream = Upstream::start(openai_chat).await;
        let gateway = Gateway::start(&injecting(&upstream, fast_lane)).await;
        let response = post(&gateway, "/v1/chat/completions", NOT_ASKED, chunked).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("content-length").is_none());
        let got = response.text().await.unwrap();

        // Asked upstream in the client's own text, one member written in.
        let sent = upstream.last();
        let asked = r#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini", "stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
        assert_eq!(sent.body_text(), asked);
        assert_eq!(
            sent.header("content-length"),
            Some(&*asked.len().to_string())
        );

        // Every event but the usage-only one, unchanged.
        let events: Vec<&str> = got.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 3, "{got}");
        assert!(
            events[..2].iter().all(|e| e.contains(r#""usage":null"#)),
            "{got}"
        );
        assert!(!got.contains("prompt_tokens"), "{got}");
        assert_eq!(events[2], "data: [DONE]");

        let metrics = support::scrape_settled(gateway.url("/metrics")).await;
        assert_eq!(
            tokens(&metrics, "input"),
            Some(11),
            "fast lane {fast_lane}: {metrics}"
        );
        assert_eq!(tokens(&metrics, "output"), Some(2));
    }
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_everything_unchanged() {
    let upstream = Upstream::start(openai_chat).await;
    let gateway = Gateway::start(&injecting(&upstream, true)).await;
    let asked = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let got = post(&gateway, "/v1/chat/completions", asked, false)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(upstream.last().body_text(), asked);
    assert!(got.contains(r#""prompt_tokens":11"#), "{got}");
    assert_eq!(got.matches("\n\n").count(), 4, "{got}");
}

#[tokio::test]
async fn what_it_cannot_or_must_not_rewrite_goes_up_byte_for_byte() {
    for fast_lane in [true, false] {
        let upstream = Upstream::start(|_| Response::builder().body("{}")).await;
        let gateway = Gateway::start(&injecting(&upstream, fast_lane)).await;
        for (path, body) in [
            // Not JSON, not an object, a duplicate key, not a stream.
            ("/v1/chat/completions", r#"{"stream":true,"messages":["#),
            ("/v1/chat/completions", r#"[{"stream":true}]"#),
            ("/v1/chat/completions", r#"{"stream":true,"stream":true}"#),
            (
                "/v1/completions",
                r#"{"model":"gpt-3.5-turbo-instruct","prompt":"x"}"#,
            ),
            // The Responses API reports usage anyway and takes no such option.
            (
                "/v1/responses",
                r#"{"model":"gpt-4o-mini","input":"x","stream":true}"#,
            ),
        ] {
            let response = post(&gateway, path, body, false).await;
            assert_eq!(response.status(), 200, "{body}");
            assert_eq!(upstream.last().body_text(), body);
        }
    }
    // A body the question would push over `limits.max_json_body` (4 KiB here).
    let upstream = Upstream::start(|_| Response::builder().body("{}")).await;
    let gateway = Gateway::start(&injecting(&upstream, false)).await;
    let padding = "x".repeat(4096 - 60);
    let near_limit: &'static str = Box::leak(
        format!(r#"{{"model":"gpt-4o-mini","stream":true,"user":"{padding}"}}"#).into_boxed_str(),
    );
    assert!(near_limit.len() <= 4096 && near_limit.len() + 40 > 4096);
    let response = post(&gateway, "/v1/chat/completions", near_limit, true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body_text(), near_limit);

    // Off (the default), a stream that did not ask goes up as it is.
    let upstream = Upstream::start(openai_chat).await;
    let gateway = Gateway::start(&manifest(&upstream, "")).await;
    let got = post(&gateway, "/v1/chat/completions", NOT_ASKED, false)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(upstream.last().body_text(), NOT_ASKED);
    assert!(!got.contains("usage"), "{got}");
}

#[tokio::test]
async fn a_compressed_stream_goes_on_whole() {
    // Bytes the gateway cannot read as events (here labelled as compressed) pass unchanged,
    // the usage chunk with them, rather than being held back to look for events.
    let upstream = Upstream::start(|request| {
        let mut response = openai_chat(request);
        response
            .headers_mut()
            .insert("content-encoding", http::HeaderValue::from_static("br"));
        response
    })
    .await;
    let gateway = Gateway::start(&injecting(&upstream, true)).await;
    let response = post(&gateway, "/v1/chat/completions", NOT_ASKED, false).await;
    assert_eq!(response.headers()["content-encoding"], "br");
    let got = response.text().await.unwrap();
    assert!(got.contains(r#""prompt_tokens":11"#), "{got}");
}

#[tokio::test]
async fn a_body_read_whole_to_be_rewritten_keeps_its_limit() {
    let upstream = Upstream::start(openai_chat).await;
    let gateway = Gateway::start(&injecting(&upstream, false)).await;
    let big: &'static str = Box::leak(
        format!(
            r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(5000)
        )
        .into_boxed_str(),
    );
    let response = post(&gateway, "/v1/chat/completions", big, true).await;
    assert_eq!(response.status(), 413);
    let error: serde_json::Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_json_body"),
        "{error}"
    );
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn the_official_python_sdk_gets_no_chunk_without_choices() {
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let upstream = Upstream::start(openai_chat).await;
    let gateway = Gateway::start(&injecting(&upstream, true)).await;
    // `chunk.choices[0]` on every chunk, as much client code does: a usage-only chunk would
    // raise IndexError.
    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="sk-test-usage")
stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream))
"#;
    let stdout = support::python::run(&python, &["-c", script, &gateway.url("/v1")]).await;
    assert_eq!(stdout.trim(), "Hello");
    let metrics = support::scrape_settled(gateway.url("/metrics")).await;
    assert_eq!(tokens(&metrics, "input"), Some(11));
}
