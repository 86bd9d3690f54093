//! Keys the gateway holds (`keys_env`): the client's key is checked against
//! `access.allowed_key_hashes` and never goes up; the held keys take turns, a 429 rests one
//! while the other serves; no key (the client's or a held one) reaches a log line, even at
//! trace, an answer or `--check`.

use crate::support;
use crate::support::{
    client, json_response, run_binary, Binary, Recorded, Upstream, KEY, LOG_DEADLINE,
};
use oa_bypass::config::hash_line;
use poem::Response;
use serde_json::json;

const HELD_A: &str = "sk-held-A-UPSTREAMSECRET-aaaa";
const HELD_B: &str = "sk-held-B-UPSTREAMSECRET-bbbb";

fn env() -> [(&'static str, &'static str); 2] {
    [("OA_TEST_HELD_A", HELD_A), ("OA_TEST_HELD_B", HELD_B)]
}

/// `[upstream]` holding both keys, behind an allow list with the client's key.
fn manifest(upstream: &Upstream, extra: &str) -> String {
    support::test_manifest(
        &upstream.base_url(),
        &format!(
            "keys_env = [\"OA_TEST_HELD_A\", \"OA_TEST_HELD_B\"]\n{extra}\n\
             [access]\nallowed_key_hashes = [\"{}\"]\n",
            hash_line(KEY)
        ),
    )
}

fn ok(_: &Recorded) -> Response {
    json_response(200, &json!({"object": "list", "data": []}))
}

/// Which held key each request reached the upstream with.
fn keys_seen(upstream: &Upstream) -> Vec<&'static str> {
    (upstream.requests().iter())
        .map(|rec| match rec.header("authorization") {
            Some(value) if value == format!("Bearer {HELD_A}") => "A",
            Some(value) if value == format!("Bearer {HELD_B}") => "B",
            other => panic!("the upstream saw {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn the_upstream_never_sees_the_clients_key_and_held_keys_take_turns() {
    let upstream = Upstream::start(ok).await;
    let gateway = Binary::spawn(&manifest(&upstream, ""), &env());
    let http = client();
    for i in 0..6 {
        // The fast engine (a parameterless GET) and hyper's (a multipart upload) alike.
        let request = if i % 2 == 0 {
            http.get(gateway.url("/v1/models"))
        } else {
            http.post(gateway.url("/v1/files"))
                .header("content-type", "multipart/form-data; boundary=b")
                .body(
                    "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nx\r\n--b--\r\n",
                )
        };
        let response = request
            .header("authorization", format!("Bearer {KEY}"))
            .header("api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(keys_seen(&upstream), ["A", "B", "A", "B", "A", "B"]);
    for rec in upstream.requests() {
        assert!(rec.header("api-key").is_none());
        let all: Vec<String> = (rec.headers.values())
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        assert!(!all.iter().any(|value| value.contains(KEY)), "{all:?}");
    }
    // Six request lines, three of them naming key A.
    let logs = gateway
        .wait_for_logs("six request lines", |logs| {
            logs.matches("oa_bypass::request").count() >= 6
        })
        .await;
    assert_eq!(
        logs.matches("upstream_key=\"OA_TEST_HELD_A\"").count(),
        3,
        "{logs}"
    );
    let metrics = support::scrape_settled(gateway.url("/metrics")).await;
    assert!(
        metrics.contains(
            r#"oa_bypass_upstream_key_requests_total{mount="default",key="OA_TEST_HELD_B"} 3"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_key_not_listed_is_401_and_the_upstream_is_never_called() {
    let upstream = Upstream::start(ok).await;
    let gateway = Binary::spawn(&manifest(&upstream, ""), &env());
    for key in [Some("sk-someone-else"), None] {
        let mut request = client().get(gateway.url("/v1/models"));
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_429_rests_its_key_while_the_other_serves() {
    // Key A is out of requests for 30 s; B is fine.
    let upstream = Upstream::start(|rec| {
        if rec.header("authorization") == Some(&format!("Bearer {HELD_A}")) {
            Response::builder()
                .status(poem::http::StatusCode::TOO_MANY_REQUESTS)
                .header("x-ratelimit-remaining-requests", "0")
                .header("x-ratelimit-reset-requests", "30s")
                .header("content-type", "application/json")
                .body(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
        } else {
            ok(rec)
        }
    })
    .await;
    let gateway = Binary::spawn(&manifest(&upstream, ""), &env());
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = support::get_with_key(gateway.url("/v1/models")).await;
        statuses.push(response.status().as_u16());
    }
    // The first went up with A and its 429 came back as it was; then B took every turn.
    assert_eq!(statuses, [429, 200, 200, 200, 200, 200]);
    assert_eq!(keys_seen(&upstream), ["A", "B", "B", "B", "B", "B"]);
    let metrics = support::scrape_settled(gateway.url("/metrics")).await;
    assert!(
        metrics.contains(
            r#"oa_bypass_upstream_key_rests_total{mount="default",key="OA_TEST_HELD_A"} 1"#
        ),
        "{metrics}"
    );
    let rest = gateway.wait_for_log("this key rests", LOG_DEADLINE).await;
    assert!(rest.contains("rest_ms=30000"), "{rest}");
}

#[tokio::test]
async fn a_mount_holding_an_x_api_key_writes_it_there_and_nothing_else() {
    let anthropic = Upstream::start(ok).await;
    let default = Upstream::start(ok).await;
    let manifest = support::test_manifest(
        &default.base_url(),
        &format!(
            "[mounts.anthropic]\nprefix = \"/anthropic\"\nbase_url = \"{}\"\n\
             credential_header = \"x-api-key\"\nkeys_env = [\"OA_TEST_HELD_A\"]\n\
             [access]\nallowed_key_hashes = [\"{}\"]\n",
            anthropic.base_url(),
            hash_line(KEY)
        ),
    );
    let gateway = Binary::spawn(&manifest, &env());
    let response = client()
        .get(gateway.url("/anthropic/v1/models"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = anthropic.last();
    assert_eq!(seen.header("x-api-key"), Some(HELD_A));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen.header("authorization").is_none());
    // The default mount passes the client's own key through, as without custody.
    let response = support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        default.last().header("authorization"),
        Some(support::bearer().as_str())
    );
}

#[tokio::test]
async fn a_reload_reads_the_key_variables_again() {
    let upstream = Upstream::start(ok).await;
    let one_key = |var: &str| {
        support::test_manifest(
            &upstream.base_url(),
            &format!(
                "keys_env = [\"{var}\"]\n[access]\nallowed_key_hashes = [\"{}\"]\n",
                hash_line(KEY)
            ),
        )
    };
    let gateway = Binary::spawn(&one_key("OA_TEST_HELD_A"), &env());
    support::get_with_key(gateway.url("/v1/models")).await;
    std::fs::write(gateway.manifest_path(), one_key("OA_TEST_HELD_B")).unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_log("manifest reloaded", LOG_DEADLINE)
        .await;
    support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(keys_seen(&upstream), ["A", "B"]);
    // A variable that is not set is refused on reload, naming it; the keys in use stay.
    std::fs::write(gateway.manifest_path(), one_key("OA_TEST_HELD_UNSET")).unwrap();
    gateway.signal("HUP");
    // The refusal, and on the line after it the reason.
    gateway
        .wait_for_log("manifest reload refused", LOG_DEADLINE)
        .await;
    gateway
        .wait_for_log(
            "upstream.keys_env[0]: environment variable OA_TEST_HELD_UNSET is not set or empty",
            LOG_DEADLINE,
        )
        .await;
    support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(keys_seen(&upstream), ["A", "B", "B"]);
}

#[test]
fn a_missing_key_variable_stops_start_up_and_check_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    let manifest = format!(
        "[upstream]\nkeys_env = [\"OA_TEST_HELD_A\", \"OA_TEST_HELD_MISSING\"]\n\
         [access]\nallowed_key_hashes = [\"{}\"]\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n",
        hash_line(KEY)
    );
    std::fs::write(&path, manifest).unwrap();
    let config = path.to_str().unwrap();
    let expected =
        "upstream.keys_env[1]: environment variable OA_TEST_HELD_MISSING is not set or empty";
    for args in [
        vec!["--check", "--config", config],
        vec!["--config", config],
    ] {
        let (code, stdout, stderr) = run_binary(&args, &env(), dir.path());
        assert_ne!(code, 0);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stdout.contains(HELD_A) && !stderr.contains(HELD_A));
    }
    // With every variable set, `--check` names them and shows no value.
    let mut all = env().to_vec();
    all.push(("OA_TEST_HELD_MISSING", "sk-held-C-UPSTREAMSECRET"));
    let (code, stdout, stderr) = run_binary(&["--check", "--config", config], &all, dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("OA_TEST_HELD_A, OA_TEST_HELD_MISSING"),
        "{stdout}"
    );
    assert!(!stdout.contains("UPSTREAMSECRET"), "{stdout}");
}

#[tokio::test]
async fn neither_the_clients_key_nor_a_held_key_reaches_the_logs_even_at_trace() {
    let upstream = Upstream::start(|rec| {
        if rec.header("authorization") == Some(&format!("Bearer {HELD_A}")) {
            Response::builder()
                .status(poem::http::StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "1")
                .body("{}")
        } else if rec.path_and_query.contains("chat") {
            Response::builder()
                .header("content-type", "text/event-stream")
                .body("data: {\"x\":1}\n\ndata: [DONE]\n\n")
        } else {
            ok(rec)
        }
    })
    .await;
    let http = client();
    for fast_lane in ["true", "false"] {
        let mut envs = env().to_vec();
        envs.extend([
            ("RUST_LOG", "trace"),
            ("OA_BYPASS_SERVER__FAST_LANE", fast_lane),
        ]);
        let gateway = Binary::spawn(&manifest(&upstream, ""), &envs);
        let with_key = |request: reqwest::RequestBuilder| {
            request
                .header("authorization", format!("Bearer {KEY}"))
                .header("api-key", KEY)
        };
        let requests = vec![
            with_key(http.get(gateway.url("/v1/models"))),
            with_key(http.post(gateway.url("/v1/chat/completions"))).body(r#"{"stream":true}"#),
            with_key(http.post(gateway.url("/v1/embeddings"))).body("{}"),
            with_key(http.get(gateway.url("/v1/models"))),
            http.get(gateway.url("/v1/models"))
                .header("authorization", "Bearer sk-not-listed-SECRET"),
        ];
        for request in requests {
            let response = request.send().await.unwrap();
            let text = response.text().await.unwrap();
            assert!(
                !text.contains(KEY) && !text.contains("UPSTREAMSECRET"),
                "{text}"
            );
        }
        // One line per request, and the rest of the 429's key.
        gateway
            .wait_for_logs("five request lines and a key's rest", |logs| {
                logs.matches("oa_bypass::request").count() >= 5 && logs.contains("this key rests")
            })
            .await;
        let logs = gateway.settled_logs().await;
        let traced = logs.lines().filter(|line| line.contains(" TRACE ")).count();
        assert!(traced >= 6, "trace logging was not on:\n{logs}");
        for secret in [KEY, "SECRET", HELD_A, HELD_B, "UPSTREAMSECRET"] {
            assert!(
                !logs.contains(secret),
                "{secret} reached the logs (fast_lane = {fast_lane})"
            );
        }
    }
}
