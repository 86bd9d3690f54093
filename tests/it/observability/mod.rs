//! Operations: `/metrics` scraped after real traffic and parsed by the Prometheus project's own
//! Python parser; token usage counted from a JSON answer, a Chat stream and a Responses
//! stream without changing a byte; JSON request logs; `/ready`.

mod lines_and_errors;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support;
use crate::support::{bearer, json_response, Binary, Gateway, RawUpstream, Upstream, KEY};
use bytes::Bytes;
use poem::{Body, Response};
use serde_json::{json, Value};

/// A chat completion as OpenAI sends it: pretty-printed, usage near the end.
const CHAT_JSON: &str = r#"{
  "id": "chatcmpl-1",
  "object": "chat.completion",
  "created": 1,
  "model": "gpt-4o-mini",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "the \"usage\": {\"prompt_tokens\": 1000} here is text"}, "finish_reason": "stop"}],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 3}
  }
}
"#;

fn chat_stream() -> Vec<String> {
    let mut events: Vec<String> = (0..4)
        .map(|i| {
            format!(
                "data: {}\n\n",
                json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
                       "choices": [{"index": 0, "delta": {"content": format!("t{i}")}}], "usage": null})
            )
        })
        .collect();
    events.push(format!(
        "data: {}\n\n",
        json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}})
    ));
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn responses_stream() -> Vec<String> {
    vec![
        format!(
            "event: response.created\ndata: {}\n\n",
            json!({"type": "response.created",
            "response": {"id": "resp_1", "model": "gpt-5", "status": "in_progress", "usage": null}})
        ),
        format!(
            "event: response.output_text.delta\ndata: {}\n\n",
            json!({"type": "response.output_text.delta",
            "delta": "\"usage\": {\"input_tokens\": 5000}"})
        ),
        format!(
            "event: response.completed\ndata: {}\n\n",
            json!({"type": "response.completed",
            "response": {"id": "resp_1", "model": "gpt-5", "status": "completed",
                "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": 22, "output_tokens_details": {"reasoning_tokens": 5},
                          "total_tokens": 33}}})
        ),
    ]
}

fn event_stream(events: Vec<String>) -> Response {
    // One chunk per event, 5 ms apart, as a model streams.
    let stream = futures_util::stream::unfold(events.into_iter(), |mut events| async move {
        let event = events.next()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(event)), events))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("x-request-id", "req_stream")
        .body(Body::from_bytes_stream(stream))
}

async fn openai_like_upstream() -> Upstream {
    Upstream::start(|rec| match rec.path_and_query.as_str() {
        "/v1/chat/completions" if rec.body_text().contains("\"stream\":true") => {
            event_stream(chat_stream())
        }
        "/v1/chat/completions" => Response::builder()
            .header("content-type", "application/json")
            .header("x-request-id", "req_chat_1")
            .body(CHAT_JSON),
        "/v1/responses" => event_stream(responses_stream()),
        "/v1/embeddings" => json_response(
            200,
            &json!({"object": "list", "data": [{"embedding": [0.5, 0.25]}],
                    "model": "text-embedding-3-small",
                    "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
        ),
        _ => json_response(200, &json!({"object": "list", "data": []})),
    })
    .await
}

fn manifest(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[upstream]
base_url = "{upstream}"
connect_timeout = "2s"
read_timeout = "5s"

[limits]
requests_per_minute_per_key = 5
burst = 5

{extra}

[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true
usage = true

[[routes]]
method = "POST"
path = "/v1/responses"
body = "json"
streaming = true
usage = true

[[routes]]
method = "POST"
path = "/v1/embeddings"
body = "json"
usage = true

[[routes]]
method = "GET"
path = "/v1/files/{{file_id}}"
"#
    )
}

/// Parses an exposition with `prometheus_client`'s OpenMetrics parser (which refuses what
/// Prometheus would refuse) into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let python = support::python::python_with(
        "prometheus-venv",
        &[("prometheus_client", "prometheus-client")],
    );
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have:\n{:#?}", sorted_keys(samples)))
}

fn sorted_keys(samples: &HashMap<String, f64>) -> Vec<&String> {
    let mut keys: Vec<&String> = samples.keys().collect();
    keys.sort();
    keys
}

async fn post(gateway: &Gateway, path: &str, key: &str, body: Value) -> (u16, Bytes) {
    let response = support::client()
        .post(gateway.url(path))
        .header("authorization", format!("Bearer {key}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap())
}

/// The gateway's metrics, while requests may still be in flight.
async fn scrape(gateway: &Gateway) -> String {
    support::scrape(gateway.url("/metrics")).await
}

/// The gateway's metrics once every answer so far has been finished and counted.
async fn settled(gateway: &Gateway) -> String {
    support::scrape_settled(gateway.url("/metrics")).await
}

// One scenario whose steps read in order; its setup is already in helpers.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn metrics_count_real_traffic_and_token_usage_without_touching_the_bytes() {
    let upstream = openai_like_upstream().await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;

    // Three JSON chat completions: the body arrives exactly as the upstream sent it.
    for _ in 0..3 {
        let (status, body) =
            post(&gateway, "/v1/chat/completions", KEY, json!({"model": "m"})).await;
        assert_eq!(status, 200);
        assert_eq!(body, CHAT_JSON.as_bytes());
    }
    // A Chat stream with include_usage and a Responses stream: byte for byte too.
    let (status, body) = post(
        &gateway,
        "/v1/chat/completions",
        "sk-second-key",
        json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, chat_stream().concat().as_bytes());
    let (status, body) = post(
        &gateway,
        "/v1/responses",
        "sk-second-key",
        json!({"stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, responses_stream().concat().as_bytes());
    let (status, _) = post(
        &gateway,
        "/v1/embeddings",
        "sk-second-key",
        json!({"input": "x"}),
    )
    .await;
    assert_eq!(status, 200);

    // Refusals: an unknown path, no key, and the sixth request of a key limited to five.
    let response = support::get_with_key(gateway.url("/v1/nothing-here")).await;
    assert_eq!(response.status(), 404);
    let response = support::client()
        .get(gateway.url("/v1/files/file-SECRETID"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = support::client()
            .get(gateway.url("/v1/files/file-SECRETID"))
            .header("authorization", "Bearer sk-limited")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);

    let text = settled(&gateway).await;
    let samples = parse_metrics(&text);
    let chat = r#"method="POST",route="/v1/chat/completions""#;
    assert_eq!(
        sample(
            &samples,
            &format!(r#"oa_bypass_requests_total{{{chat},status="200"}}"#)
        ),
        4.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!("oa_bypass_request_duration_seconds_count{{{chat}}}")
        ),
        4.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!("oa_bypass_upstream_ttfb_seconds_count{{{chat}}}")
        ),
        4.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!("oa_bypass_response_headers_seconds_count{{{chat}}}")
        ),
        4.0
    );
    let sent = (3 * CHAT_JSON.len() + chat_stream().concat().len()) as f64;
    assert_eq!(
        sample(&samples, &format!("oa_bypass_sent_bytes_total{{{chat}}}")),
        sent
    );
    assert!(
        sample(
            &samples,
            &format!("oa_bypass_received_bytes_total{{{chat}}}")
        ) > 0.0
    );

    // Tokens: 3 × 19 in from JSON, under the JSON's model; 7 in from the stream's last chunk.
    let tokens = |model: &str, route: &str, kind: &str| {
        sample(
            &samples,
            &format!(r#"oa_bypass_tokens_total{{kind="{kind}",model="{model}",route="{route}"}}"#),
        )
    };
    assert_eq!(tokens("gpt-4o-mini", "/v1/chat/completions", "input"), 57.0);
    assert_eq!(
        tokens("gpt-4o-mini", "/v1/chat/completions", "output"),
        30.0
    );
    assert_eq!(
        tokens("gpt-4o-mini", "/v1/chat/completions", "cached_input"),
        9.0
    );
    assert_eq!(tokens("gpt-4o", "/v1/chat/completions", "input"), 7.0);
    assert_eq!(tokens("gpt-4o", "/v1/chat/completions", "output"), 4.0);
    assert_eq!(tokens("gpt-5", "/v1/responses", "input"), 11.0);
    assert_eq!(tokens("gpt-5", "/v1/responses", "output"), 22.0);
    assert_eq!(tokens("gpt-5", "/v1/responses", "reasoning"), 5.0);
    assert_eq!(
        tokens("text-embedding-3-small", "/v1/embeddings", "input"),
        8.0
    );
    // Text that merely looks like usage inside a message is not counted.
    assert!(!samples.values().any(|v| *v == 1000.0 || *v == 5000.0));

    let files = r#"method="GET",route="/v1/files/{file_id}""#;
    assert_eq!(
        sample(
            &samples,
            &format!(r#"oa_bypass_requests_total{{{files},status="200"}}"#)
        ),
        5.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!(r#"oa_bypass_requests_total{{{files},status="401"}}"#)
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!(r#"oa_bypass_requests_total{{{files},status="429"}}"#)
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            r#"oa_bypass_requests_total{method="GET",route="(no route)",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            r#"oa_bypass_rate_limited_total{limit="requests_per_minute_per_key"}"#
        ),
        1.0
    );
    assert_eq!(sample(&samples, "oa_bypass_requests_in_flight{}"), 0.0);
    assert_eq!(sample(&samples, "oa_bypass_open_streams{}"), 0.0);
    // Bounded labels: no raw path, no key, no per-key series unless asked for.
    for secret in [
        "file-SECRETID",
        "nothing-here",
        KEY,
        "sk-second-key",
        "sk-limited",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into /metrics");
    }
    assert!(!text.contains("oa_bypass_key_tokens_total{"));
}

#[tokio::test]
async fn open_streams_and_upstream_errors_are_visible() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let mut response = support::client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .json(&json!({"stream": true}))
        .send()
        .await
        .unwrap();
    tx.send(Bytes::from_static(b"data: {\"a\":1}\n\n"))
        .await
        .unwrap();
    assert_eq!(
        response.chunk().await.unwrap().unwrap(),
        "data: {\"a\":1}\n\n"
    );
    let samples = parse_metrics(&scrape(&gateway).await);
    assert_eq!(sample(&samples, "oa_bypass_open_streams{}"), 1.0);
    assert_eq!(sample(&samples, "oa_bypass_requests_in_flight{}"), 1.0);
    drop(tx);
    assert!(response.chunk().await.unwrap().is_none());
    // The gauges go once the relay is dropped, which can be just after the client's last read.
    let samples = parse_metrics(&settled(&gateway).await);
    assert_eq!(sample(&samples, "oa_bypass_open_streams{}"), 0.0);
    assert_eq!(sample(&samples, "oa_bypass_requests_in_flight{}"), 0.0);

    // Nothing listens on the upstream port any more: a connect error, by kind.
    let closed = support::closed_port();
    let gateway = Gateway::start(&manifest(&format!("http://{closed}"), "")).await;
    let (status, _) = post(&gateway, "/v1/embeddings", KEY, json!({})).await;
    assert_eq!(status, 502);
    let samples = parse_metrics(&settled(&gateway).await);
    assert_eq!(
        sample(
            &samples,
            r#"oa_bypass_upstream_errors_total{kind="connect",route="/v1/embeddings"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn tokens_by_key_uses_the_hash_prefix_only() {
    let upstream = openai_like_upstream().await;
    let gateway = Gateway::start(&manifest(
        &upstream.base_url(),
        "[metrics]\ntokens_by_key = true",
    ))
    .await;
    for key in [KEY, KEY, "sk-other"] {
        let (status, _) = post(&gateway, "/v1/chat/completions", key, json!({})).await;
        assert_eq!(status, 200);
    }
    let text = settled(&gateway).await;
    let samples = parse_metrics(&text);
    let prefix = |key: &str| support::sha256(key.as_bytes())[..8].to_owned();
    let by_key = |key: &str| {
        sample(
            &samples,
            &format!(
                r#"oa_bypass_key_tokens_total{{key="{}",kind="input",model="gpt-4o-mini"}}"#,
                prefix(key)
            ),
        )
    };
    assert_eq!(by_key(KEY), 38.0);
    assert_eq!(by_key("sk-other"), 19.0);
    assert!(!text.contains(KEY));
    assert!(
        !text.contains(&support::sha256(KEY.as_bytes())),
        "the full hash is not shown"
    );
}

#[tokio::test]
async fn metrics_follow_the_path_secret() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(
        &upstream.base_url(),
        "[access]\npath_secret = \"s3cret-path\"",
    ))
    .await;
    let hidden = support::client()
        .get(gateway.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(hidden.status(), 404);
    let shown = support::client()
        .get(gateway.url("/s3cret-path/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), 200);
    // Probes stay at the root.
    let ready = support::client()
        .get(gateway.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn ready_reports_the_loaded_manifest_and_optionally_the_upstream() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let response = support::client()
        .get(gateway.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["config"]["loaded"], true);
    assert_eq!(body["config"]["routes"], 4);
    assert_eq!(body["config"]["generation"], 1);
    assert_eq!(body["upstream"]["checked"], false);
    let before = upstream.requests().len();

    let with_check = |base: &str| {
        manifest(base, "").replace(
            "read_timeout = \"5s\"",
            "read_timeout = \"5s\"\nready_check = true",
        )
    };
    let checked = Gateway::start(&with_check(&upstream.base_url())).await;
    let response = support::client()
        .get(checked.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["upstream"]["reachable"], true);
    // A second probe within 5 s reuses the answer: probes cannot flood the upstream.
    let _ = support::client()
        .get(checked.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(upstream.requests().len(), before + 1);

    let closed = support::closed_port();
    let dead = Gateway::start(&with_check(&format!("http://{closed}"))).await;
    let response = support::client()
        .get(dead.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "upstream_unreachable");
    assert_eq!(body["upstream"]["reachable"], false);
    // /health stays a liveness answer whatever the upstream does.
    let health = support::client()
        .get(dead.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
