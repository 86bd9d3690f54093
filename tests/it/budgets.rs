//! A named key's rates and budgets: tokens a minute and a day, dollars a month by price,
//! counted from every answer that reports usage (JSON, streams that did not ask for it,
//! Realtime's `response.done`), kept in `limits.state_file` across a SIGKILL, and reported
//! to each key alone by `GET /usage`. Every refusal happens before the upstream is called.
//!
//! Spend is recorded when an answer ends, after the client has it, so a test waits for
//! `/usage` to show it before the next request; and a test of a period's limit first moves
//! clear of that period's end, so the clock cannot turn over mid-test.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use poem::Response;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, json_response, Binary, Gateway, Recorded, Redis, Upstream, KEY};

const BOB: &str = "sk-bob-0123456789abcdefSECRET";

/// Answers chat with 8 tokens (3 in, 5 out); a stream carries its usage chunk only when
/// asked for it, as OpenAI does.
pub fn eight_tokens(rec: &Recorded) -> Response {
    let body = rec.body_text();
    let model = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8});
    if !body.contains("\"stream\":true") {
        return json_response(
            200,
            &json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                "usage": usage,
            }),
        );
    }
    let chunk = |choices: Value, usage: Value| {
        let event = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                           "model": model, "choices": choices, "usage": usage});
        format!("data: {event}\n\n")
    };
    let mut stream = chunk(
        json!([{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]),
        Value::Null,
    );
    if body.contains("\"include_usage\":true") {
        stream.push_str(&chunk(json!([]), usage));
    }
    stream.push_str("data: [DONE]\n\n");
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(stream)
}

/// A chat route that reads usage, in front of `upstream`, with counters in `state`.
fn manifest(upstream: &Upstream, state: &std::path::Path, keys: &str) -> String {
    format!(
        "[limits]\nstate_file = \"{}\"\n[upstream]\nbase_url = \"{}\"\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
         tag = \"Chat\"\nstreaming = true\nusage = true\nstream_usage_option = true\n{keys}",
        state.display(),
        upstream.base_url()
    )
}

fn named(name: &str, key: &str, limits: &str) -> String {
    format!(
        "[keys.{name}]\nhash = \"{}\"\n{limits}\n",
        oa_bypass::config::hash_line(key)
    )
}

async fn chat(gateway: &Gateway, key: &str, model: &str) -> reqwest::Response {
    support::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

async fn usage_of(url: &str, key: &str) -> (u16, Value) {
    let response = support::client()
        .get(format!("{url}/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Waits until `key`'s `/usage` shows `field` of `spent` at `value`.
async fn spent_reaches(url: &str, key: &str, field: &str, value: Value) {
    support::eventually(
        &format!("/usage to show {field} = {value}"),
        support::LOG_DEADLINE,
        || async {
            let (_, usage) = usage_of(url, key).await;
            if usage["spent"][field] == value {
                Ok(())
            } else {
                Err(usage.to_string())
            }
        },
    )
    .await;
}

/// Seconds from now to the end of the current UTC period of `length` seconds.
fn left_in_period(length: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    length - now % length
}

/// Waits out the end of the current period of `length` seconds if it is within `margin`.
async fn clear_of_period_end(length: u64, margin: u64) {
    let left = left_in_period(length);
    if left <= margin {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

#[tokio::test]
async fn a_day_budget_reached_exactly_refuses_the_fourth_request_until_midnight() {
    clear_of_period_end(86_400, 30).await;
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = named("alice", KEY, "max_tokens_per_day = 20");
    let gateway = Gateway::start(&manifest(&upstream, &dir.path().join("s.json"), &keys)).await;
    let url = gateway.url("");
    for done in 1..=3 {
        assert_eq!(chat(&gateway, KEY, "gpt-4o-mini").await.status(), 200);
        spent_reaches(&url, KEY, "tokens_today", json!(8 * done)).await;
    }
    let refused = chat(&gateway, KEY, "gpt-4o-mini").await;
    assert_eq!(refused.status(), 429);
    let retry_after = support::retry_after(&refused);
    assert!(
        retry_after.abs_diff(left_in_period(86_400)) <= 2,
        "{retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "\"alice\" has used 24 of its 20 tokens today (UTC) (keys.alice.max_tokens_per_day)"
        ),
        "{message}"
    );
    assert_eq!(upstream.requests().len(), 3, "a refused request went up");
    let (_, usage) = usage_of(&url, KEY).await;
    let day = &usage["limits"][0];
    assert_eq!(
        (&day["limit"], &day["used"], &day["left"]),
        (&json!("max_tokens_per_day"), &json!(24), &json!(0))
    );
}

#[tokio::test]
async fn tokens_per_minute_refuses_until_the_minute_turns() {
    clear_of_period_end(60, 15).await;
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = named("alice", KEY, "tokens_per_minute = 10");
    let gateway = Gateway::start(&manifest(&upstream, &dir.path().join("s.json"), &keys)).await;
    let url = gateway.url("");
    for done in 1..=2 {
        assert_eq!(chat(&gateway, KEY, "gpt-4o-mini").await.status(), 200);
        spent_reaches(&url, KEY, "tokens_today", json!(8 * done)).await;
    }
    let refused = chat(&gateway, KEY, "gpt-4o-mini").await;
    assert_eq!(refused.status(), 429);
    let retry_after = support::retry_after(&refused);
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "tokens_per_minute_exceeded",
        "{body}"
    );
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_dollar_budget_counts_by_the_manifests_price_and_refuses_unpriced_models() {
    clear_of_period_end(86_400, 30).await;
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    // $1,000 and $2,000 per million tokens: 3 in and 5 out cost $0.013 a request.
    let keys = format!(
        "{}[prices.\"gpt-test*\"]\ninput = 1000\noutput = 2000\n",
        named("alice", KEY, "max_usd_per_month = 0.03")
    );
    let gateway = Gateway::start(&manifest(&upstream, &dir.path().join("s.json"), &keys)).await;
    let url = gateway.url("");
    let unpriced = chat(&gateway, KEY, "unpriced-model").await;
    assert_eq!(unpriced.status(), 403);
    let body: Value = unpriced.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_priced", "{body}");
    assert!(upstream.requests().is_empty());
    for (done, usd) in [(1, 0.013), (2, 0.026), (3, 0.039)] {
        assert_eq!(chat(&gateway, KEY, "gpt-test-1").await.status(), 200);
        spent_reaches(&url, KEY, "usd_this_month", json!(usd)).await;
        assert_eq!(upstream.requests().len(), done);
    }
    let refused = chat(&gateway, KEY, "gpt-test-1").await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("0.0390 of its 0.0300 US dollars this month (UTC)"));
}

#[tokio::test]
async fn a_budget_prices_the_model_an_alias_is_served_as() {
    clear_of_period_end(86_400, 30).await;
    // An answer that names no model: the request's decides its price.
    let upstream = Upstream::start(|_: &Recorded| {
        let usage = json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8});
        json_response(
            200,
            &json!({"id": "c", "object": "chat.completion", "created": 1,
                                   "model": "", "choices": [], "usage": usage}),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The alias itself has a price of its own, a thousand times higher: it must not be used.
    let keys = format!(
        "{}[prices.\"gpt-test*\"]\ninput = 1000\noutput = 2000\n\
         [prices.cheap]\ninput = 1000000\noutput = 2000000\n\
         [models.cheap]\ntargets = [\"default/gpt-test-1\"]\n",
        named("alice", KEY, "max_usd_per_month = 5")
    );
    let routed = manifest(&upstream, &dir.path().join("s.json"), &keys).replace(
        "stream_usage_option = true",
        "stream_usage_option = true\nroute_by_model = true",
    );
    let gateway = Gateway::start(&routed).await;
    assert_eq!(chat(&gateway, KEY, "cheap").await.status(), 200);
    assert!(upstream
        .last()
        .body_text()
        .contains("\"model\":\"gpt-test-1\""));
    spent_reaches(&gateway.url(""), KEY, "usd_this_month", json!(0.013)).await;
}

#[tokio::test]
async fn a_stream_that_did_not_ask_for_usage_is_counted_and_the_client_sees_no_extra_chunk() {
    clear_of_period_end(86_400, 30).await;
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = named("alice", KEY, "max_tokens_per_day = 1000");
    let gateway = Gateway::start(&manifest(&upstream, &dir.path().join("s.json"), &keys)).await;
    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
chunks = list(client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
assert [c.choices[0].delta.content for c in chunks] == ["hi"], chunks
assert all(c.usage is None for c in chunks), chunks
print("stream ok", len(chunks))
"#;
    let out = support::python::run(&python, &["-c", script, &gateway.url("/v1"), KEY]).await;
    assert!(out.contains("stream ok 1"), "{out}");
    // The gateway asked for the usage on the key's behalf, and counted it.
    assert!(upstream
        .last()
        .body_text()
        .contains("\"include_usage\":true"));
    spent_reaches(&gateway.url(""), KEY, "tokens_today", json!(8)).await;
}

#[tokio::test]
async fn a_realtime_sessions_response_done_usage_is_counted() {
    clear_of_period_end(86_400, 30).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
        while let Some(Ok(Message::Text(_))) = ws.next().await {
            let done = json!({"type": "response.done", "event_id": "e1", "response": {
                "id": "resp_1", "status": "completed",
                "usage": {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20,
                          "input_token_details": {"cached_tokens": 4, "text_tokens": 10}}}});
            ws.send(Message::text(done.to_string())).await.unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream_url = format!("http://{addr}");
    let settings = format!(
        "[limits]\nstate_file = \"{}\"\n",
        dir.path().join("s.json").display()
    );
    let manifest = format!(
        "{settings}[upstream]\nbase_url = \"{upstream_url}\"\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/realtime\"\nbody = \"websocket\"\ntag = \"Realtime\"\n\
         {}",
        named("alice", KEY, "max_usd_per_month = 5")
    );
    let gateway = Gateway::start(&manifest).await;
    let auth = [("authorization", support::bearer())];
    let (mut ws, _) = support::connect(gateway.addr, &auth).await.unwrap();
    ws.send(Message::text(r#"{"type":"response.create"}"#))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    let Some(Ok(Message::Text(event))) = event else {
        panic!("no response.done: {event:?}")
    };
    assert!(
        event.contains("\"response.done\""),
        "the event changed: {event}"
    );
    spent_reaches(&gateway.url(""), KEY, "tokens_today", json!(30)).await;
    // gpt-realtime's shipped price: 6 input at $32, 4 cached at $0.40, 20 output at $64 a
    // million.
    let (_, usage) = usage_of(&gateway.url(""), KEY).await;
    assert_eq!(usage["spent"]["usd_this_month"], json!(0.0015), "{usage}");
}

#[tokio::test]
async fn usage_reports_each_key_its_own_numbers_and_no_one_elses() {
    clear_of_period_end(86_400, 30).await;
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "{}{}[access]\nallowed_key_hashes = [\"{}\"]\n",
        named(
            "alice",
            KEY,
            "max_tokens_per_day = 100\nrequests_per_minute = 50"
        ),
        named("bob", BOB, "max_tokens_per_month = 1000"),
        oa_bypass::config::hash_line("sk-anonymous")
    );
    let gateway = Gateway::start(&manifest(&upstream, &dir.path().join("s.json"), &keys)).await;
    let url = gateway.url("");
    chat(&gateway, KEY, "gpt-4o-mini").await;
    chat(&gateway, KEY, "gpt-4o-mini").await;
    chat(&gateway, BOB, "gpt-4o-mini").await;
    spent_reaches(&url, KEY, "tokens_today", json!(16)).await;
    spent_reaches(&url, BOB, "tokens_this_month", json!(8)).await;
    let (status, alice) = usage_of(&url, KEY).await;
    assert_eq!(status, 200);
    assert_eq!(alice["key"], "alice");
    let limits: Vec<&str> = alice["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["limit"].as_str().unwrap())
        .collect();
    assert_eq!(limits, ["requests_per_minute", "max_tokens_per_day"]);
    assert_eq!(alice["limits"][1]["left"], 84);
    let (_, bob) = usage_of(&url, BOB).await;
    assert_eq!(bob["key"], "bob");
    assert_eq!(bob["limits"][0]["used"], 8);
    assert!(!bob.to_string().contains("alice"), "{bob}");
    let (status, anonymous) = usage_of(&url, "sk-anonymous").await;
    assert_eq!(
        (status, &anonymous["error"]["code"]),
        (404, &json!("no_usage"))
    );
    let (status, _) = usage_of(&url, "sk-stranger").await;
    assert_eq!(status, 401);
    let document = support::openapi_document(&gateway).await;
    assert!(document["paths"]["/usage"]["get"].is_object());
}

#[tokio::test]
async fn spend_survives_a_sigkill_and_no_key_is_written_anywhere() {
    clear_of_period_end(86_400, 30).await;
    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("spend.json");
    let keys = named("alice", KEY, "max_tokens_per_month = 1000");
    let manifest = manifest(&upstream, &state, &keys);
    let trace = [("RUST_LOG", "trace")];
    let mut gateway = Binary::spawn(&manifest, &trace);
    for _ in 0..2 {
        let response = support::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "gpt-4o-mini", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // Written within a second of the spend: wait for it in the file, then kill.
    let written = support::eventually(
        "the state file to hold 16 tokens",
        support::LOG_DEADLINE,
        || {
            let state = state.clone();
            async move {
                let text = std::fs::read_to_string(&state).unwrap_or_default();
                if text.contains("\"month_tokens\": 16") {
                    Ok(text)
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    let metrics = support::scrape(gateway.url("/metrics")).await;
    gateway.signal("KILL");
    gateway.wait_exit(Duration::from_secs(10));
    let logs = gateway.logs();

    let again = Binary::spawn(&manifest, &trace);
    let (status, usage) = usage_of(&again.url(""), KEY).await;
    assert_eq!(status, 200);
    assert_eq!(usage["spent"]["tokens_this_month"], 16, "{usage}");
    for text in [&written, &logs, &again.logs(), &metrics] {
        assert!(!text.contains(KEY), "a key was written");
        assert!(!text.contains(&KEY[7..]), "a key was written");
    }
}

#[test]
fn a_corrupt_state_file_stops_start_up_naming_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("spend.json");
    std::fs::write(&state, "{\"version\":1,\"spent\":").unwrap();
    let manifest = format!(
        "[limits]\nstate_file = \"spend.json\"\n{}\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\ntag = \"Chat\"\n",
        named("alice", KEY, "max_tokens_per_day = 5")
    );
    std::fs::write(dir.path().join("routes.toml"), manifest).unwrap();
    let (code, _, stderr) = support::run_binary(&["--check"], &[], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("limits.state_file: "), "{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\":1,\"spent\":"
    );
    // Without a state file, token budgets are refused: they would reset on every restart.
    let without = format!(
        "{}[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n",
        named("alice", KEY, "max_tokens_per_day = 5")
    );
    std::fs::write(dir.path().join("routes.toml"), without).unwrap();
    let (code, _, stderr) = support::run_binary(&["--check"], &[], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "keys.alice: token rates and budgets must outlive a restart; set limits.state_file"
        ),
        "{stderr}"
    );
    // Both a state file and a store: which keeps the counts would be a guess.
    let both = "[limits]\nstate_file = \"s.json\"\nstore = \"redis://127.0.0.1:1/0\"\n\
                [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";
    std::fs::write(dir.path().join("routes.toml"), both).unwrap();
    let (code, _, stderr) = support::run_binary(&["--check"], &[], dir.path());
    assert_eq!(code, 1);
    let expected = "limits.state_file: with limits.store the counts are kept there";
    assert!(stderr.contains(expected), "{stderr}");
}

#[tokio::test]
async fn two_replicas_sharing_redis_share_one_budget_and_write_no_key() {
    clear_of_period_end(86_400, 30).await;
    let redis = Redis::start();
    let upstream = Upstream::start(eight_tokens).await;
    let manifest = format!(
        "[limits]\nstore = \"{}\"\n[upstream]\nbase_url = \"{}\"\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
         tag = \"Chat\"\nusage = true\n{}",
        redis.url(),
        upstream.base_url(),
        named("alice", KEY, "max_tokens_per_day = 20")
    );
    let replicas = [Binary::spawn(&manifest, &[]), Binary::spawn(&manifest, &[])];
    let post = |gateway: &Binary| {
        support::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "gpt-4o-mini", "messages": []}))
            .send()
    };
    // Alternately through each replica; each answer's spend is seen by the other.
    for (done, gateway) in [&replicas[0], &replicas[1], &replicas[0]]
        .into_iter()
        .enumerate()
    {
        let response = post(gateway).await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        let other = &replicas[(done + 1) % 2];
        spent_reaches(&other.url(""), KEY, "tokens_today", json!(8 * (done + 1))).await;
    }
    let refused = post(&replicas[1]).await.unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    assert_eq!(upstream.requests().len(), 3);
    let stored = redis.dump();
    assert!(
        stored
            .iter()
            .any(|(key, _)| key.starts_with("oa-bypass:spend:alice:d:")),
        "{stored:?}"
    );
    for (key, value) in &stored {
        assert!(
            !key.contains(&KEY[7..]) && !value.contains(&KEY[7..]),
            "a key in Redis"
        );
    }
}
