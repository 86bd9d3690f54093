//! Routing by model (`[models]`) and failover before the first byte (`[retry]`): aliases go
//! to their mount with only the model's bytes changed, a failing target is passed over for
//! the next, what must not be retried is not, retries stay within their budget, and a target
//! that keeps failing is left out until one request finds it well. Every upstream is a real
//! server on its own loopback port; both engines are driven the same way.

mod cancel;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poem::Response;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::support::{self, json_response, Binary, Gateway, Recorded, Upstream};

/// A chat completion naming who answered.
fn chat_from(who: &'static str) -> impl Fn(&Recorded) -> Response + Send + Sync + 'static {
    move |rec: &Recorded| {
        if rec.body_text().contains("\"stream\":true") {
            let events = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\
                \"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello streamed\"}}]}\n\n\
                data: [DONE]\n\n";
            return Response::builder()
                .content_type("text/event-stream")
                .body(events);
        }
        match rec.path_and_query.as_str() {
            "/v1/models" => json_response(
                200,
                &json!({"object": "list", "data": [
                    {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "system"}
                ]}),
            ),
            _ => json_response(
                200,
                &json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": who}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                }),
            ),
        }
    }
}

/// A manifest whose default upstream is `default`, with a mount for each of `mounts`
/// (`name`, base URL), `settings` (tables such as `[models.x]` and `[retry]`) and routes
/// that route by model.
fn manifest(default: &str, mounts: &[(&str, String)], settings: &str, fast_lane: bool) -> String {
    let mut text = format!(
        "[server]\nfast_lane = {fast_lane}\n\
         [upstream]\nbase_url = \"{default}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n"
    );
    for (name, base_url) in mounts {
        text.push_str(&format!(
            "[mounts.{name}]\nprefix = \"/{name}\"\nbase_url = \"{base_url}\"\n"
        ));
    }
    text.push_str(settings);
    text.push_str(
        "\n[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
         streaming = true\nroute_by_model = true\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/audio/transcriptions\"\nbody = \"multipart\"\n\
         route_by_model = true\n",
    );
    text
}

/// [`manifest`] with `upstream` as the default, lending the keys of `vars` with
/// `retry = true`, to clients holding the test's key.
fn holding_keys(upstream: &Upstream, vars: [&str; 2], settings: &str, fast_lane: bool) -> String {
    let held = format!(
        "read_timeout = \"5s\"\nretry = true\nkeys_env = [\"{}\", \"{}\"]\n\
         [access]\nallowed_key_hashes = [\"{}\"]\n",
        vars[0],
        vars[1],
        oa_bypass::config::hash_line(support::KEY)
    );
    let text = manifest(&upstream.base_url(), &[], settings, fast_lane);
    text.replace("read_timeout = \"5s\"\n", &held)
}

/// `GET /ready`'s answer.
async fn ready_of(gateway: &Gateway) -> Value {
    let response = support::client().get(gateway.url("/ready")).send().await;
    response.unwrap().json().await.unwrap()
}

async fn post_chat(gateway: &str, path: &str, body: &'static str) -> (u16, Value) {
    let response = support::client()
        .post(format!("{gateway}{path}"))
        .bearer_auth(support::KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test]
async fn an_alias_goes_to_its_mount_with_only_the_models_bytes_changed() {
    for fast_lane in [true, false] {
        let default = Upstream::start(chat_from("default")).await;
        let groq = Upstream::start(chat_from("groq")).await;
        let settings =
            "[models.fast]\ntargets = [\"groq/llama-3.1-8b-instant\", \"default/gpt-4o-mini\"]\n\
             [models.\"gpt-4o*\"]\ntargets = [\"groq\"]\n\
             [models.\"gpt-4o-2024-08-06\"]\ntargets = [\"default\"]\n\
             [models.whisper-fast]\ntargets = [\"groq/whisper-large-v3\"]\n";
        let text = manifest(
            &default.base_url(),
            &[("groq", groq.base_url())],
            settings,
            fast_lane,
        );
        let gateway = Gateway::start(&text).await;
        let base = gateway.url("");

        let sent = r#"{ "model" : "fast", "messages":[{"role":"user","content":"fast"}]}"#;
        let (status, answer) = post_chat(&base, "/v1/chat/completions", sent).await;
        assert_eq!((status, content(&answer)), (200, "groq"), "{answer}");
        let got = groq.last().body_text();
        assert_eq!(got, sent.replace("\"fast\",", "\"llama-3.1-8b-instant\","));
        assert_eq!(
            groq.last().header("content-length"),
            Some(got.len().to_string().as_str())
        );

        // A glob keeps the model's name; an exact name wins over it; an unknown model and
        // a mount's own prefix go where they always went, untouched.
        for (body, upstream, who) in [
            (r#"{"model":"gpt-4o-mini","messages":[]}"#, &groq, "groq"),
            (
                r#"{"model":"gpt-4o-2024-08-06","messages":[]}"#,
                &default,
                "default",
            ),
            (r#"{"model":"o3","messages":[]}"#, &default, "default"),
        ] {
            let (status, answer) = post_chat(&base, "/v1/chat/completions", body).await;
            assert_eq!((status, content(&answer)), (200, who), "{body}");
            assert_eq!(upstream.last().body_text(), body);
        }
        let prefixed = r#"{"model":"fast","messages":[]}"#;
        let (status, _) = post_chat(&base, "/groq/v1/chat/completions", prefixed).await;
        assert_eq!(status, 200);
        assert_eq!(groq.last().body_text(), prefixed);

        // A form's `model` field, read before its file, is renamed; the file goes as sent.
        let mut form = b"--b0und\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n\
            whisper-fast\r\n--b0und\r\ncontent-disposition: form-data; name=\"file\"; \
            filename=\"a.wav\"\r\ncontent-type: audio/wav\r\n\r\n"
            .to_vec();
        form.extend_from_slice(&[7u8; 100_000]);
        form.extend_from_slice(b"\r\n--b0und--\r\n");
        let response = support::client()
            .post(gateway.url("/v1/audio/transcriptions"))
            .bearer_auth(support::KEY)
            .header("content-type", "multipart/form-data; boundary=b0und")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let form = groq.last();
        assert_eq!(form.path_and_query, "/v1/audio/transcriptions");
        assert!(form.body_text().contains("\r\n\r\nwhisper-large-v3\r\n"));
        assert!(!form.body_text().contains("whisper-fast"));
        assert!(
            form.body_len > 100_000 && form.body_len < 100_500,
            "{}",
            form.body_len
        );
    }
}

#[tokio::test]
async fn a_dead_first_target_is_passed_over_without_an_error_in_the_python_sdk() {
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let second = Upstream::start(chat_from("Hello from the second target")).await;
    let dead = format!("http://{}", support::closed_port());
    let text = manifest(
        &second.base_url(),
        &[("dead", dead)],
        "[models.fast]\ntargets = [\"dead/gpt-4o\", \"default/gpt-4o-mini\"]\n",
        true,
    );
    let gateway = Binary::spawn(&text, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/routing.py");
    let stdout = support::python::run(&python, &[script, &gateway.url("/v1"), support::KEY]).await;
    for flow in ["failover ok", "streamed failover ok", "models list ok"] {
        assert!(stdout.contains(flow), "{flow} missing:\n{stdout}");
    }
    // The served model went up; the line says where the request went, and in how many.
    assert!(second.requests()[0].body_text().contains("\"gpt-4o-mini\""));
    let logs = gateway
        .wait_for_logs("two routed request lines", |logs| {
            logs.matches("target=\"default/gpt-4o-mini\" attempts=2")
                .count()
                >= 2
        })
        .await;
    assert!(!logs.contains(support::KEY), "a key reached the log");
    // The dead mount reads the client's own key: start-up said where that key would go.
    assert!(logs.contains(
        "the mount dead holds no keys (keys_env), so the client's own key goes to 127.0.0.1"
    ));
}

#[tokio::test]
async fn a_503_or_429_goes_to_the_next_target_and_a_400_never_does() {
    for fast_lane in [true, false] {
        let first = Upstream::start(|rec: &Recorded| {
            let status = ["503", "429", "400"]
                .into_iter()
                .find(|code| rec.body_text().contains(&format!("give-{code}")))
                .map_or(200, |code| code.parse().unwrap());
            json_response(
                status,
                &json!({"error": {"message": "first", "code": status}}),
            )
        })
        .await;
        let second = Upstream::start(chat_from("second")).await;
        let text = manifest(
            &second.base_url(),
            &[("first", first.base_url())],
            "[models.\"give-*\"]\ntargets = [\"first\", \"default\"]\n",
            fast_lane,
        );
        let gateway = Gateway::start(&text).await;
        let base = gateway.url("");
        for body in [r#"{"model":"give-503"}"#, r#"{"model":"give-429"}"#] {
            let (status, answer) = post_chat(&base, "/v1/chat/completions", body).await;
            assert_eq!(
                (status, content(&answer)),
                (200, "second"),
                "{body}: {answer}"
            );
        }
        assert_eq!((first.requests().len(), second.requests().len()), (2, 2));
        let (status, answer) =
            post_chat(&base, "/v1/chat/completions", r#"{"model":"give-400"}"#).await;
        assert_eq!(
            (status, &answer["error"]["message"]),
            (400, &json!("first"))
        );
        assert_eq!((first.requests().len(), second.requests().len()), (3, 2));
    }
}

#[tokio::test]
async fn a_429_on_a_held_key_goes_again_with_the_next_key_and_the_first_rests() {
    std::env::set_var("OA_TEST_ROUTE_KEY_A", "sk-held-A");
    std::env::set_var("OA_TEST_ROUTE_KEY_B", "sk-held-B");
    let upstream = Upstream::start(|rec: &Recorded| match rec.header("authorization") {
        Some("Bearer sk-held-A") => json_response(429, &json!({"error": {"message": "slow down"}})),
        _ => chat_from("B")(rec),
    })
    .await;
    let keys = ["OA_TEST_ROUTE_KEY_A", "OA_TEST_ROUTE_KEY_B"];
    let text = holding_keys(&upstream, keys, "", true);
    let gateway = Gateway::start(&text).await;
    let (status, answer) =
        post_chat(&gateway.url(""), "/v1/chat/completions", r#"{"model":"m"}"#).await;
    assert_eq!((status, content(&answer)), (200, "B"), "{answer}");
    let keys: Vec<String> = (upstream.requests().iter())
        .map(|r| r.header("authorization").unwrap_or("").to_owned())
        .collect();
    assert_eq!(keys, ["Bearer sk-held-A", "Bearer sk-held-B"]);
    // A rests: the next request goes to B alone.
    let (status, _) = post_chat(&gateway.url(""), "/v1/chat/completions", r#"{"model":"m"}"#).await;
    assert_eq!((status, upstream.requests().len()), (200, 3));
    let ready = ready_of(&gateway).await;
    assert_eq!(
        ready["targets"][0]["resting_keys"],
        json!(["OA_TEST_ROUTE_KEY_A"]),
        "{ready}"
    );
}

#[tokio::test]
async fn a_stream_cut_after_its_first_byte_is_not_retried() {
    let cut = support::RawUpstream::start(|mut socket| async move {
        let mut pending = Vec::new();
        if support::read_message(&mut socket, &mut pending)
            .await
            .is_some()
        {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            let event = "data: {\"choices\":[]}\n\n";
            let chunk = format!("{head}{:x}\r\n{event}\r\n", event.len());
            let _ = socket.write_all(chunk.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Closed mid-body: no last chunk.
        }
    })
    .await;
    let second = Upstream::start(chat_from("second")).await;
    let text = manifest(
        &second.base_url(),
        &[("cut", cut.base_url())],
        "[models.fast]\ntargets = [\"cut\", \"default\"]\n",
        true,
    );
    let gateway = Gateway::start(&text).await;
    let response = support::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(support::KEY)
        .body(r#"{"model":"fast","stream":true}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the client sees the cut");
    assert!(second.requests().is_empty(), "nothing was retried");
}

#[tokio::test]
async fn with_every_target_down_the_answer_names_those_tried_and_max_attempts_holds() {
    let dead: Vec<(&str, String)> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|name| (name, format!("http://{}", support::closed_port())))
        .collect();
    let text = manifest(
        &format!("http://{}", support::closed_port()),
        &dead,
        "[models.fast]\ntargets = [\"a/x\", \"b/y\", \"c\", \"d\"]\n[retry]\nmax_attempts = 3\n",
        true,
    );
    let gateway = Gateway::start(&text).await;
    let (status, answer) = post_chat(
        &gateway.url(""),
        "/v1/chat/completions",
        r#"{"model":"fast"}"#,
    )
    .await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["error"]["code"], "upstream_unreachable");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("No upstream answered; tried a/x: "),
        "{message}"
    );
    assert!(
        message.contains("; b/y: ") && message.contains("; c/fast: "),
        "{message}"
    );
    assert!(!message.contains("d/fast"), "max_attempts = 3: {message}");
}

#[tokio::test]
async fn under_a_total_outage_retries_stay_within_the_budget() {
    let failing = || {
        Upstream::start(|_: &Recorded| {
            json_response(503, &json!({"error": {"message": "overloaded"}}))
        })
    };
    let (a, b) = (failing().await, failing().await);
    let text = manifest(
        &a.base_url(),
        &[("b", b.base_url())],
        "[models.fast]\ntargets = [\"default\", \"b\"]\n[retry]\nmax_attempts = 3\n",
        true,
    );
    let gateway = Arc::new(Gateway::start(&text).await);
    let requests = (0..200).map(|_| {
        let base = gateway.url("");
        tokio::spawn(async move {
            post_chat(&base, "/v1/chat/completions", r#"{"model":"fast"}"#).await
        })
    });
    for request in futures_util::future::join_all(requests).await {
        // The upstream's own answer passes through.
        assert_eq!(request.unwrap().0, 503);
    }
    let sent = a.requests().len() + b.requests().len();
    // 20% of the 200 first attempts, and the floor of 3 a second over 10 s.
    assert!(
        sent > 200 && sent <= 200 + 40 + 30,
        "{sent} requests went up"
    );
    let metrics = support::scrape(gateway.url("/metrics")).await;
    let refused = metrics
        .lines()
        .find_map(|line| line.strip_prefix("oa_bypass_retry_budget_refused_total "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    #[allow(clippy::cast_precision_loss)]
    let expected = (200 * 3 - sent) as f64;
    assert!(
        refused > 0.0 && refused <= expected,
        "{refused} refused of {sent} sent"
    );
}

#[tokio::test]
async fn a_target_that_keeps_failing_is_left_out_then_brought_back() {
    let sick = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let (sick_now, counted) = (Arc::clone(&sick), Arc::clone(&hits));
    let first = Upstream::start(move |rec: &Recorded| {
        counted.fetch_add(1, Ordering::SeqCst);
        if sick_now.load(Ordering::SeqCst) {
            json_response(500, &json!({"error": {"message": "broken"}}))
        } else {
            chat_from("first")(rec)
        }
    })
    .await;
    let second = Upstream::start(chat_from("second")).await;
    let text = manifest(
        &second.base_url(),
        &[("first", first.base_url())],
        "[models.fast]\ntargets = [\"first\", \"default\"]\n\
         [retry]\neject_after = 2\neject_for = \"1s\"\n",
        false,
    );
    let gateway = Gateway::start(&text).await;
    let base = gateway.url("");
    let chat = || post_chat(&base, "/v1/chat/completions", r#"{"model":"fast"}"#);
    for _ in 0..4 {
        assert_eq!(content(&chat().await.1), "second");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "ejected after two failures in a row"
    );
    let ready = ready_of(&gateway).await;
    assert_eq!(
        ready["targets"][1],
        json!({"mount": "first", "ejected": true, "resting_keys": []})
    );
    let metrics = support::scrape(gateway.url("/metrics")).await;
    for counted in [
        "oa_bypass_upstream_attempts_total{mount=\"first\",outcome=\"retried\"} 2",
        "oa_bypass_upstream_attempts_total{mount=\"default\",outcome=\"answered\"} 4",
    ] {
        assert!(metrics.contains(counted), "{counted} in:\n{metrics}");
    }
    assert!(
        metrics.contains("oa_bypass_upstream_ejected{mount=\"first\"} 1"),
        "{metrics}"
    );

    // Well again: after eject_for, one request finds it so, and it is back in turn.
    sick.store(false, Ordering::SeqCst);
    support::eventually(
        "the first target to serve again",
        Duration::from_secs(5),
        || async {
            let answer = chat().await.1;
            (content(&answer) == "first").then_some(()).ok_or(answer)
        },
    )
    .await;
    assert_eq!(content(&chat().await.1), "first");
    let ready = ready_of(&gateway).await;
    assert_eq!(ready["targets"][1]["ejected"], false);
}

#[tokio::test]
async fn with_a_store_an_ejection_on_one_replica_holds_on_the_other() {
    let redis = support::Redis::start();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let first = Upstream::start(move |_: &Recorded| {
        counted.fetch_add(1, Ordering::SeqCst);
        json_response(500, &json!({"error": {"message": "broken"}}))
    })
    .await;
    let second = Upstream::start(chat_from("second")).await;
    let text = manifest(
        &second.base_url(),
        &[("first", first.base_url())],
        &format!(
            "[models.fast]\ntargets = [\"first\", \"default\"]\n\
             [retry]\neject_after = 2\neject_for = \"60s\"\n\
             [limits]\nstore = \"{}\"\n",
            redis.url()
        ),
        true,
    );
    let (a, b) = (Gateway::start(&text).await, Gateway::start(&text).await);
    let chat = |gateway: &Gateway| {
        let base = gateway.url("");
        async move { post_chat(&base, "/v1/chat/completions", r#"{"model":"fast"}"#).await }
    };
    for _ in 0..2 {
        assert_eq!(content(&chat(&a).await.1), "second");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // The other replica learns it from the store, without a failure of its own.
    support::eventually(
        "replica b to see the ejection",
        Duration::from_secs(5),
        || async {
            let ready = ready_of(&b).await;
            (ready["targets"][1]["ejected"] == true)
                .then_some(())
                .ok_or(ready)
        },
    )
    .await;
    for _ in 0..3 {
        assert_eq!(content(&chat(&b).await.1), "second");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "replica b left the mount out"
    );
}

#[tokio::test]
async fn when_every_held_key_draws_a_429_the_last_goes_to_the_client_and_each_rests_once() {
    std::env::set_var("OA_TEST_BUSY_KEY_A", "sk-busy-A");
    std::env::set_var("OA_TEST_BUSY_KEY_B", "sk-busy-B");
    let upstream = Upstream::start(|rec: &Recorded| {
        let key = rec
            .header("authorization")
            .unwrap_or("")
            .replace("Bearer sk-busy-", "");
        json_response(
            429,
            &json!({"error": {"message": format!("slow down, key {key}")}}),
        )
    })
    .await;
    let keys = ["OA_TEST_BUSY_KEY_A", "OA_TEST_BUSY_KEY_B"];
    let text = holding_keys(&upstream, keys, "[retry]\nmax_attempts = 2\n", false);
    let gateway = Gateway::start(&text).await;
    let (status, answer) =
        post_chat(&gateway.url(""), "/v1/chat/completions", r#"{"model":"m"}"#).await;
    assert_eq!(status, 429);
    assert_eq!(
        answer["error"]["message"], "slow down, key B",
        "the last answer"
    );
    let metrics = support::scrape(gateway.url("/metrics")).await;
    for key in ["OA_TEST_BUSY_KEY_A", "OA_TEST_BUSY_KEY_B"] {
        let rests =
            format!("oa_bypass_upstream_key_rests_total{{mount=\"default\",key=\"{key}\"}} 1\n");
        assert!(metrics.contains(&rests), "{rests} in:\n{metrics}");
    }
}
