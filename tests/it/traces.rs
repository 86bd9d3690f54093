//! OpenTelemetry traces (`tracing.otlp_endpoint`, or `OTEL_EXPORTER_OTLP_ENDPOINT`): the real
//! binary exports to a real OTLP/HTTP receiver (Python, decoding with `opentelemetry-proto`);
//! spans carry the HTTP and GenAI attributes, continue the client's trace, and never a key
//! or a prompt. A collector that does not answer costs a warning, never a request.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support;
use crate::support::{Binary, KillOnDrop, Upstream, LOG_DEADLINE};
use serde_json::{json, Value};

const PROMPT: &str = "SECRET-PROMPT-TEXT";

/// The receiver, and the spans it has printed so far.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
    _process: KillOnDrop,
}

impl Receiver {
    fn start() -> Receiver {
        let python = support::python::python_with(
            "otlp-venv",
            &[(
                "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                "opentelemetry-proto",
            )],
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&spans);
        std::thread::spawn(move || {
            for line in lines {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Receiver {
            port,
            spans,
            _process: KillOnDrop(child),
        }
    }

    /// Waits until `count` spans of `trace_id` have come, and returns them.
    async fn spans_of(&self, trace_id: &str, count: usize) -> Vec<Value> {
        let found = || -> Vec<Value> {
            self.spans
                .lock()
                .unwrap()
                .iter()
                .filter(|span| span["trace_id"] == trace_id)
                .cloned()
                .collect()
        };
        for _ in 0..200 {
            if found().len() >= count {
                return found();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{count} spans of {trace_id} never came: {:?}", self.all());
    }

    fn all(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }
}

fn manifest(upstream: &Upstream, settings: &str) -> String {
    format!(
        r#"{settings}

[upstream]
base_url = "{}"

[[routes]]
method = "GET"
path = "/v1/models"

[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true
usage = true
"#,
        upstream.base_url()
    )
}

async fn chat_answer() -> Upstream {
    Upstream::start(|_| {
        support::json_response(
            200,
            &json!({
                "id": "chatcmpl-t", "object": "chat.completion", "created": 1,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hi"}}],
                "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
                          "prompt_tokens_details": {"cached_tokens": 6},
                          "completion_tokens_details": {"reasoning_tokens": 4}}
            }),
        )
    })
    .await
}

#[tokio::test]
async fn spans_follow_the_conventions_and_continue_the_clients_trace() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let collector = format!("http://127.0.0.1:{}", receiver.port);
    let upstream = chat_answer().await;
    // The fast engine with the manifest's setting; hyper's with the standard variables.
    let fast = Binary::spawn(
        &manifest(
            &upstream,
            &format!("[tracing]\notlp_endpoint = \"{collector}\""),
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let hyper = Binary::spawn(
        &manifest(&upstream, "[server]\nfast_lane = false"),
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
            ("OTEL_SERVICE_NAME", "gateway-under-test"),
        ],
    );
    for (gateway, trace_id, service) in [
        (&fast, "0af7651916cd43dd8448eb211c80319c", "oa-bypass"),
        (
            &hyper,
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "gateway-under-test",
        ),
    ] {
        let client_parent = "b7ad6b7169203331";
        let traceparent = format!("00-{trace_id}-{client_parent}-01");
        let response = support::client()
            .post(gateway.url("/v1/chat/completions"))
            .header("authorization", support::bearer())
            .header("traceparent", &traceparent)
            .header("tracestate", "vendor=value")
            .json(&json!({"model": "gpt-4o-mini",
                          "messages": [{"role": "user", "content": PROMPT}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        // Passed upstream as the client sent them.
        let sent = upstream.last();
        assert_eq!(sent.header("traceparent"), Some(&*traceparent));
        assert_eq!(sent.header("tracestate"), Some("vendor=value"));

        let spans = receiver.spans_of(trace_id, 2).await;
        let server = spans.iter().find(|s| s["kind"] == 2).unwrap();
        let client = spans.iter().find(|s| s["kind"] == 3).unwrap();
        assert_eq!(server["service"], service);
        assert_eq!(server["name"], "chat gpt-4o-mini", "{server}");
        assert_eq!(server["parent_span_id"], client_parent);
        let attributes = &server["attributes"];
        for (key, value) in [
            ("http.request.method", json!("POST")),
            ("http.route", json!("/v1/chat/completions")),
            ("http.response.status_code", json!(200)),
            ("gen_ai.operation.name", json!("chat")),
            ("gen_ai.provider.name", json!("openai")),
            ("gen_ai.request.model", json!("gpt-4o-mini")),
            ("gen_ai.response.model", json!("gpt-4o-mini-2024-07-18")),
            ("gen_ai.usage.input_tokens", json!(19)),
            ("gen_ai.usage.output_tokens", json!(10)),
            ("gen_ai.usage.cache_read.input_tokens", json!(6)),
            ("gen_ai.usage.reasoning.output_tokens", json!(4)),
        ] {
            assert_eq!(attributes[key], value, "{key} in {server}");
        }
        assert!(
            attributes["gen_ai.response.time_to_first_chunk"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        assert_eq!(server["events"], json!(["first chunk"]));
        assert_eq!(server["status"], 0, "unset: not an error");

        // The wait for the upstream's head, inside the server span.
        assert_eq!(client["parent_span_id"], server["span_id"]);
        assert_eq!(client["name"], "POST");
        assert_eq!(client["attributes"]["server.address"], "127.0.0.1");
        assert_eq!(client["attributes"]["http.response.status_code"], 200);
        assert!(client["start"].as_u64() >= server["start"].as_u64());
        assert!(client["end"].as_u64() <= server["end"].as_u64());
    }

    // A route without usage: an HTTP span, its own trace.
    let response = support::get_with_key(fast.url("/v1/models")).await;
    assert_eq!(response.status(), 200);
    let exported = || {
        let spans = receiver.all();
        let found = spans.iter().find(|span| span["name"] == "GET /v1/models");
        std::future::ready(found.cloned().ok_or_else(|| format!("{spans:#?}")))
    };
    let models = support::eventually("the span of GET /v1/models", LOG_DEADLINE, exported).await;
    assert_eq!(models["parent_span_id"], "");
    assert!(models["attributes"].get("gen_ai.operation.name").is_none());

    // No key, no prompt, anywhere in what was exported.
    let exported = serde_json::to_string(&receiver.all()).unwrap();
    assert!(!exported.contains(support::KEY), "{exported}");
    assert!(!exported.contains(PROMPT), "{exported}");
}

#[tokio::test]
async fn a_collector_that_does_not_answer_costs_a_warning_not_a_request() {
    // A port nothing listens on.
    let port = support::closed_port().port();
    let upstream = chat_answer().await;
    let gateway = Binary::spawn(
        &manifest(
            &upstream,
            &format!("[tracing]\notlp_endpoint = \"http://127.0.0.1:{port}\""),
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    for _ in 0..3 {
        for _ in 0..10 {
            let response = support::client()
                .post(gateway.url("/v1/chat/completions"))
                .header("authorization", support::bearer())
                .json(&json!({"model": "gpt-4o-mini", "messages": []}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        // Several export rounds fail in between.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gateway
        .wait_for_log("OpenTelemetry spans dropped", LOG_DEADLINE)
        .await;
    // More batches fail meanwhile; the warning stays one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = gateway.settled_logs().await;
    assert_eq!(
        logs.matches("OpenTelemetry spans dropped").count(),
        1,
        "{logs}"
    );
    assert!(!logs.contains(support::KEY));
}

#[tokio::test]
async fn a_reload_keeps_the_exporter_the_process_started_with() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let upstream = chat_answer().await;
    let gateway = Binary::spawn(
        &manifest(
            &upstream,
            &format!(
                "[tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"",
                receiver.port
            ),
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    // The manifest loses its endpoint; the exporter made at start stays, and so do the spans.
    std::fs::write(gateway.manifest_path(), manifest(&upstream, "")).unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_log("manifest reloaded", LOG_DEADLINE)
        .await;
    gateway
        .wait_for_log(
            "tracing.otlp_endpoint changed in the manifest; it applies at the next restart",
            LOG_DEADLINE,
        )
        .await;
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let response = support::client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", support::bearer())
        .header("traceparent", format!("00-{trace_id}-eee19b7ec3c1b174-01"))
        .json(&json!({"model": "gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = receiver.spans_of(trace_id, 2).await;
    assert!(spans.iter().any(|span| span["name"] == "chat gpt-4o-mini"));
}

#[tokio::test]
async fn a_request_that_fails_over_has_a_client_span_per_attempt() {
    let receiver = tokio::task::spawn_blocking(Receiver::start).await.unwrap();
    let collector = format!("http://127.0.0.1:{}", receiver.port);
    let upstream = chat_answer().await;
    let overloaded = Upstream::start(|_| {
        support::json_response(503, &json!({"error": {"message": "overloaded"}}))
    })
    .await;
    let routed = manifest(
        &upstream,
        &format!(
            "[tracing]\notlp_endpoint = \"{collector}\"\n\
             [mounts.first]\nprefix = \"/first\"\nbase_url = \"{}\"\n\
             [models.fast]\ntargets = [\"first/gpt-4o\", \"default/gpt-4o-mini\"]\n",
            overloaded.base_url()
        ),
    )
    .replace("usage = true", "usage = true\nroute_by_model = true");
    let gateway = Binary::spawn(&routed, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let response = support::client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", support::bearer())
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({"model": "fast", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let spans = receiver.spans_of(trace_id, 3).await;
    let server = spans.iter().find(|s| s["kind"] == 2).unwrap();
    let mut attempts: Vec<&Value> = spans.iter().filter(|s| s["kind"] == 3).collect();
    attempts.sort_by_key(|span| span["start"].as_u64());
    let statuses: Vec<&Value> = (attempts.iter())
        .map(|span| &span["attributes"]["http.response.status_code"])
        .collect();
    assert_eq!(statuses, [&json!(503), &json!(200)], "{spans:#?}");
    assert!(attempts
        .iter()
        .all(|span| span["parent_span_id"] == server["span_id"]));
    assert_eq!(server["attributes"]["http.response.status_code"], 200);
}
