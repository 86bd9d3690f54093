//! A team's named keys (`[keys.NAME]`): made with `oa-bypass keys new`, known by name in logs
//! and messages, held to their models, route tags and last day, changed by SIGHUP without
//! dropping a request. Every refusal happens without an upstream call.

use std::time::Duration;

use poem::Response;
use serde_json::{json, Value};

use crate::support::{self, json_response, Binary, Recorded, Upstream, LOG_DEADLINE};

/// The company's OpenAI key, held by the gateway (`keys_env`): people never see it.
const COMPANY_KEY: &str = "sk-company-HELD-0123456789SECRET";

/// `oa-bypass keys new NAME`: the key it prints once, and the manifest block that allows it.
fn new_key(name: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = support::run_binary(&["keys", "new", name], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let (key, block) = stdout.split_once('\n').unwrap();
    assert!(key.starts_with("sk-oab-") && key.len() == 7 + 64, "{key}");
    assert_eq!(
        block.trim(),
        format!(
            "[keys.{name}]\nhash = \"{}\"",
            oa_bypass::config::hash_line(key)
        )
    );
    assert!(stderr.contains("not shown again"), "{stderr}");
    (key.to_owned(), block.to_owned())
}

/// Answers the calls a person's script makes, as api.openai.com would.
fn openai_like(rec: &Recorded) -> Response {
    match rec.path_and_query.as_str() {
        "/v1/chat/completions" => json_response(
            200,
            &json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello from upstream"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
            }),
        ),
        "/v1/audio/transcriptions" => json_response(200, &json!({"text": "transcribed"})),
        "/v1/models" => json_response(200, &json!({"object": "list", "data": []})),
        path => json_response(
            500,
            &json!({"error": {"message": format!("unexpected {path}")}}),
        ),
    }
}

/// The shipped manifest in front of `upstream`, sending the company key it holds.
fn team_manifest(upstream: &Upstream, keys: &str) -> String {
    let manifest = support::shipped_manifest(upstream).replace(
        &format!("base_url = \"{}\"", upstream.base_url()),
        &format!(
            "base_url = \"{}\"\nkeys_env = [\"OA_TEST_COMPANY_KEY\"]",
            upstream.base_url()
        ),
    );
    format!("{manifest}\n{keys}")
}

#[tokio::test]
async fn a_persons_key_is_held_to_its_models_and_tags_through_the_python_sdk() {
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let upstream = Upstream::start(openai_like).await;
    let (alice, block) = new_key("alice");
    let keys = format!(
        "{block}models = [\"gpt-4o-mini\", \"gpt-4.1*\", \"gpt-4o-transcribe\"]\n\
         tags = [\"Chat\", \"Audio\"]\n"
    );
    let gateway = Binary::spawn(
        &team_manifest(&upstream, &keys),
        &[("OA_TEST_COMPANY_KEY", COMPANY_KEY), ("RUST_LOG", "trace")],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/team_keys.py");
    let stdout = support::python::run(&python, &[script, &gateway.url("/v1"), &alice]).await;
    for flow in [
        "allowed models ok",
        "model refused ok",
        "multipart model ok",
        "tags ok",
    ] {
        assert!(stdout.contains(flow), "{flow} missing:\n{stdout}");
    }

    // Only the allowed calls went up, each with the company's key in place of Alice's.
    let requests = upstream.requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/audio/transcriptions"
        ]
    );
    let bearer = format!("Bearer {COMPANY_KEY}");
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some(bearer.as_str())));
    // The form went up whole, its fields read ahead of the file as they came.
    let form = &requests[2];
    assert!(form.body_len > 20_000, "{}", form.body_len);
    assert!(form.body_text().contains("gpt-4o-transcribe"));

    // The name is in the lines, refused or forwarded; no key is, even at trace level.
    let logs = gateway
        .wait_for_logs("7 request lines naming alice", |logs| {
            logs.lines().filter(|l| l.contains("key=\"alice\"")).count() >= 7
        })
        .await;
    assert!(logs.contains("model_not_allowed") || logs.contains("may not use the model"));
    for secret in [alice.as_str(), COMPANY_KEY, &alice[7..]] {
        assert!(!logs.contains(secret), "a key reached the log");
    }
}

async fn get_models(gateway: &Binary, key: &str) -> (u16, Value) {
    let response = support::client()
        .get(gateway.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_expired_key_is_401_and_sighup_changes_keys_without_dropping_a_request() {
    let (upstream, chunks) = Upstream::streaming().await;
    let (alice, alice_block) = new_key("alice");
    let (bob, bob_block) = new_key("bob");
    let before = format!("{alice_block}{bob_block}expires = \"2020-01-31\"\n");
    let gateway = Binary::spawn(
        &team_manifest(&upstream, &before),
        &[("OA_TEST_COMPANY_KEY", COMPANY_KEY)],
    );

    let (status, body) = get_models(&gateway, &bob).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "key_expired");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"bob\" expired at the end of 2020-01-31"));
    assert!(upstream.requests().is_empty());

    // Alice's stream is open across the reload that removes her key.
    let stream = support::client()
        .get(gateway.url("/v1/models"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let after = bob_block.to_string();
    std::fs::write(gateway.manifest_path(), team_manifest(&upstream, &after)).unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_log("manifest reloaded", LOG_DEADLINE)
        .await;
    let (status, body) = get_models(&gateway, &alice).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(upstream.requests().len(), 1);

    // The open stream still ends whole; then Bob's key, no longer expired, goes up.
    chunks.send("still here".into()).await.unwrap();
    drop(chunks);
    let text = tokio::time::timeout(Duration::from_secs(10), stream.text())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, "still here");
    let response = support::client()
        .get(gateway.url("/v1/models"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_realtime_session_is_held_to_the_keys_models_before_it_is_dialled() {
    let upstream = support::RawUpstream::start(|_socket| async {}).await;
    let (alice, block) = new_key("alice");
    let manifest = format!(
        "{}\n{block}models = [\"gpt-realtime*\"]\n",
        support::test_manifest(&upstream.base_url(), "")
    );
    let gateway = Binary::spawn(&manifest, &[]);
    let handshake = |model: &str| {
        format!(
            "GET /v1/realtime?model={model} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Bearer {alice}\r\n\r\n"
        )
    };
    let refused = support::raw_exchange(gateway.addr, &handshake("gpt-4o-mini")).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("model_not_allowed"), "{refused}");
    assert_eq!(upstream.accepted(), 0, "a refused session was dialled");
    // An allowed model is dialled (this upstream closes at once, so the session fails there).
    let dialled = support::raw_exchange(gateway.addr, &handshake("gpt-realtime-mini")).await;
    assert!(!dialled.starts_with("HTTP/1.1 403"), "{dialled}");
    assert_eq!(upstream.accepted(), 1);
}

#[test]
fn bad_keys_are_refused_at_start_up_naming_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let hash = oa_bypass::config::hash_line("sk-one");
    let cases = [
        (
            format!("[keys.Alice]\nhash = \"{hash}\"\n"),
            "keys.Alice: a key's name is",
        ),
        (
            "[keys.bob]\nhash = \"sk-pasted-by-mistake\"\n".to_owned(),
            "keys.bob.hash: not a \"sha256:<64 hex digits>\" line",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\n[keys.b]\nhash = \"{hash}\"\n"),
            "keys.b.hash: the same key as keys.a",
        ),
        (
            format!("[access]\nallowed_key_hashes = [\"{hash}\"]\n[keys.a]\nhash = \"{hash}\"\n"),
            "keys.a.hash: the same key is in access.allowed_key_hashes",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\ntags = [\"Chats\"]\n"),
            "keys.a.tags: \"Chats\" is not a tag",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\nmodels = []\n"),
            "keys.a.models: list at least one",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\nexpires = \"31.03.2027\"\n"),
            "keys.a.expires: \"31.03.2027\" is not a date",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\nmax_tokens_per_day = 0\n"),
            "keys.a.max_tokens_per_day: 0 is not a limit",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\nmax_usd_per_day = -1\n"),
            "keys.a.max_usd_per_day: -1 is not a budget",
        ),
        (
            format!(
                "[limits]\nstate_file = \"s.json\"\n[keys.a]\nhash = \"{hash}\"\n\
                 models = [\"my-model\"]\nmax_usd_per_month = 5\n"
            ),
            "keys.a.models: \"my-model\" has no price, and the key has a dollar budget",
        ),
        (
            format!("[keys.a]\nhash = \"{hash}\"\nmax_usd = 5\n"),
            "keys.a.max_usd: unknown key; allowed here: hash, models, tags, expires",
        ),
    ];
    for (keys, message) in cases {
        let manifest = format!(
            "{keys}\n[[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\ntag = \"Chat\"\n"
        );
        std::fs::write(dir.path().join("routes.toml"), manifest).unwrap();
        let (code, _, stderr) = support::run_binary(&["--check"], &[], dir.path());
        assert_eq!(code, 1, "{keys}");
        assert!(stderr.contains(message), "{message:?} not in:\n{stderr}");
        assert!(
            !stderr.contains("sk-pasted-by-mistake"),
            "a pasted key was echoed"
        );
    }
}

#[test]
fn keys_list_and_check_show_names_and_rules_never_a_whole_hash() {
    let dir = tempfile::tempdir().unwrap();
    let hash = oa_bypass::config::hash_line("sk-one");
    let manifest = format!(
        "[keys.intern]\nhash = \"{hash}\"\nmodels = [\"gpt-4o-mini\"]\ntags = [\"Chat\"]\n\
         expires = \"2027-03-31\"\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\ntag = \"Chat\"\n"
    );
    std::fs::write(dir.path().join("routes.toml"), manifest).unwrap();
    // A key's field from the environment, as Docker sets them.
    let env = [
        ("OA_BYPASS_KEYS__INTERN__MAX_USD_PER_MONTH", "20"),
        ("OA_BYPASS_LIMITS__STATE_FILE", "spend.json"),
    ];
    let (code, listed, stderr) = support::run_binary(&["keys", "list"], &env, dir.path());
    assert_eq!(code, 0, "{stderr}");
    let (code, checked, _) = support::run_binary(&["--check"], &env, dir.path());
    assert_eq!(code, 0);
    for out in [&listed, &checked] {
        for (key, value) in [
            ("keys.intern.models", "gpt-4o-mini"),
            ("keys.intern.tags", "Chat"),
            ("keys.intern.expires", "2027-03-31"),
            ("keys.intern.max_usd_per_month", "20.00"),
            ("keys.intern.tokens_per_minute", "none"),
            ("keys.intern.hash", &format!("{}…", &hash[..15])),
        ] {
            let line = out.lines().find(|line| line.trim_start().starts_with(key));
            assert_eq!(
                line.map(|line| line[line.find(key).unwrap() + key.len()..].trim()),
                Some(value),
                "{out}"
            );
        }
        assert!(!out.contains(&hash[7..]), "a whole hash was shown");
    }
}
