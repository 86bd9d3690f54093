//! `[limits] store`: two gateway processes share one Redis (Debian's `redis-server`, started
//! here on a loopback port of its own per test). A rate limit and a concurrency cap hold
//! across both; a process killed with SIGKILL frees its slots when its lease runs out; a
//! held key's rest set through one is honoured by the other; with Redis stopped, "open"
//! serves and warns, "closed" answers 503, and both recover when it returns; and nothing
//! secret is ever written to Redis.

use std::time::{Duration, Instant};

use crate::support;
use crate::support::{
    assert_429, client, get_with_key, json_response, scrape_until, Binary, Recorded, Redis,
    Upstream, KEY, LOG_DEADLINE,
};
use bytes::Bytes;
use futures_util::StreamExt;
use oa_bypass::config::hash_line;
use poem::{Body, Response};
use serde_json::json;

const HELD_A: &str = "sk-held-A-STORESECRET-aaaa";
const HELD_B: &str = "sk-held-B-STORESECRET-bbbb";

fn ok(_: &Recorded) -> Response {
    json_response(200, &json!({"object": "list", "data": []}))
}

/// The test manifest in front of `upstream` with `limits` (and `store` at `redis`).
fn manifest(upstream: &Upstream, redis: &Redis, upstream_extra: &str, limits: &str) -> String {
    support::test_manifest(
        &upstream.base_url(),
        &format!(
            "{upstream_extra}\n[limits]\nstore = \"{}\"\n{limits}\n",
            redis.url()
        ),
    )
}

async fn get_models(gateway: &Binary) -> reqwest::Response {
    get_with_key(gateway.url("/v1/models")).await
}

#[tokio::test]
async fn two_gateways_share_one_rate_limit() {
    let redis = Redis::start();
    let upstream = Upstream::start(ok).await;
    let manifest = manifest(&upstream, &redis, "", "requests_per_minute_per_key = 10");
    let gateways = [Binary::spawn(&manifest, &[]), Binary::spawn(&manifest, &[])];
    let mut statuses = Vec::new();
    for i in 0..20 {
        // Both engines: the fast one (a parameterless GET) and hyper's (a path parameter).
        let gateway = &gateways[i % 2];
        let answer = if i % 4 < 2 {
            get_models(gateway).await
        } else {
            get_with_key(gateway.url("/v1/files/file-1")).await
        };
        let status = answer.status().as_u16();
        if status == 429 {
            let setting = "limits.requests_per_minute_per_key";
            let wait = assert_429(answer, "rate_limit_exceeded", setting).await;
            assert!(wait <= 6, "Retry-After: {wait}");
        }
        statuses.push(status);
    }
    let passed = statuses.iter().filter(|&&status| status == 200).count();
    assert_eq!(passed, 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 10);
    assert_eq!(upstream.requests().len(), 10);
    // Both processes refused some: the limit is one, not one each.
    assert!(statuses[..10].contains(&200) && statuses[10..].iter().all(|&s| s == 429));
    scrape_until(gateways[1].url("/metrics"), "the store up", |metrics| {
        metrics.contains("oa_bypass_limits_store_up 1")
    })
    .await;
}

/// An upstream whose answers are event streams that send one event and stay open.
async fn holding_upstream() -> Upstream {
    Upstream::start(|_| {
        let first = futures_util::stream::once(async { Bytes::from_static(b"data: {}\n\n") });
        let held = first.chain(futures_util::stream::pending());
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_bytes_stream(held.map(Ok::<_, std::io::Error>)))
    })
    .await
}

/// Opens a stream through `gateway`: the answer, once its head has come.
async fn open_stream(gateway: &Binary) -> reqwest::Response {
    client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cap_holds_across_gateways_and_a_killed_one_frees_its_slots_after_its_lease() {
    let redis = Redis::start();
    let upstream = holding_upstream().await;
    let manifest = manifest(
        &upstream,
        &redis,
        "",
        "max_concurrent_per_key = 2\nstore_lease = \"2s\"",
    );
    let one = Binary::spawn(&manifest, &[]);
    let mut other = Binary::spawn(&manifest, &[]);
    let mut first = open_stream(&one).await;
    assert_eq!(first.status(), 200);
    let second = open_stream(&other).await;
    assert_eq!(second.status(), 200);
    // Two open, one through each: the cap is full for both.
    for gateway in [&one, &other] {
        let refused = open_stream(gateway).await;
        let setting = "limits.max_concurrent_per_key";
        let wait = assert_429(refused, "concurrency_limit_exceeded", setting).await;
        assert_eq!(wait, 1);
    }
    // A stream that ends gives its slot back at once.
    assert!(first.chunk().await.unwrap().is_some());
    drop(first);
    let mut third = None;
    for _ in 0..50 {
        let answer = open_stream(&one).await;
        if answer.status() == 200 {
            third = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        third.is_some(),
        "a finished stream's slot was not given back"
    );
    // A process killed outright never gives its slot back: it frees when the lease ends.
    other.child.kill().unwrap();
    other.child.wait().unwrap();
    let killed_at = Instant::now();
    assert_eq!(open_stream(&one).await.status(), 429);
    let mut freed_after = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        let answer = open_stream(&one).await;
        if answer.status() == 200 {
            freed_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed_after = freed_after.expect("the killed process's slot never freed");
    assert!(
        freed_after >= Duration::from_millis(1000),
        "freed after {freed_after:?}: before its lease could have run out"
    );
    drop(second);
}

#[tokio::test]
async fn a_rest_set_through_one_gateway_is_honoured_by_the_other_and_nothing_secret_is_stored() {
    let redis = Redis::start();
    // Key A draws a 429 (rest 30 s); key B serves.
    let upstream = Upstream::start(|rec: &Recorded| {
        if rec.header("authorization") == Some(&format!("Bearer {HELD_A}")) {
            Response::builder()
                .status(http::StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "30")
                .header("content-type", "application/json")
                .body(r#"{"error":{"message":"slow down","type":"requests","param":null,"code":null}}"#)
        } else {
            ok(rec)
        }
    })
    .await;
    let held = format!(
        "keys_env = [\"OA_TEST_HELD_A\", \"OA_TEST_HELD_B\"]\n\
         [access]\nallowed_key_hashes = [\"{}\"]",
        hash_line(KEY)
    );
    let manifest = manifest(
        &upstream,
        &redis,
        &held,
        "requests_per_minute_per_key = 1000",
    );
    let env = [("OA_TEST_HELD_A", HELD_A), ("OA_TEST_HELD_B", HELD_B)];
    let one = Binary::spawn(&manifest, &env);
    let other = Binary::spawn(&manifest, &env);
    // The first request through `one` takes A and draws the 429.
    assert_eq!(get_models(&one).await.status(), 429);
    // `other` has never used A; without the store its first turn would be A's. Once the rest
    // is in Redis, `other`'s store thread reads it within its sync interval (250 ms, waited
    // out twice over for a loaded machine).
    let rest_stored = || (redis.dump().iter()).any(|(key, _)| key.contains(":rest:default:"));
    support::until("the rest in Redis", LOG_DEADLINE, rest_stored).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let statuses = [
        get_models(&other).await.status().as_u16(),
        get_models(&other).await.status().as_u16(),
        get_models(&other).await.status().as_u16(),
        get_models(&other).await.status().as_u16(),
    ];
    assert_eq!(statuses, [200; 4]);
    let seen: Vec<bool> = (upstream.requests().iter())
        .map(|rec| rec.header("authorization") == Some(&format!("Bearer {HELD_A}")))
        .collect();
    assert_eq!(seen, [true, false, false, false, false]);

    // Everything in Redis: hashes and addresses only.
    let stored = redis.dump();
    assert!(
        stored.iter().any(|(key, _)| key.contains(":rest:default:")),
        "no rest was stored: {stored:?}"
    );
    assert!(stored.iter().any(|(key, _)| key.contains(":rate:key:")));
    for secret in [KEY, HELD_A, HELD_B] {
        let tail = &secret[secret.len() - 12..];
        for (key, value) in &stored {
            assert!(
                !key.contains(tail) && !value.contains(tail),
                "{key} = {value} holds a secret"
            );
        }
    }
}

#[tokio::test]
async fn with_redis_stopped_open_serves_and_warns_closed_refuses_and_both_recover() {
    let mut redis = Redis::start();
    let upstream = Upstream::start(ok).await;
    let limits = "requests_per_minute_per_key = 6000";
    let open = Binary::spawn(&manifest(&upstream, &redis, "", limits), &[]);
    let closed = Binary::spawn(
        &manifest(
            &upstream,
            &redis,
            "",
            &format!("{limits}\nstore_failure = \"closed\""),
        ),
        &[],
    );
    for gateway in [&open, &closed] {
        assert_eq!(get_models(gateway).await.status(), 200);
        let ready = client().get(gateway.url("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let ready: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(ready["store"]["reachable"], true);
    }

    redis.stop();
    // The first calls after the outage find it; then each answers by its policy at once.
    for _ in 0..5 {
        let _ = get_models(&open).await;
        let _ = get_models(&closed).await;
    }
    for _ in 0..5 {
        assert_eq!(get_models(&open).await.status(), 200);
        let refused = get_models(&closed).await;
        assert_eq!(refused.status(), 503);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "limits_store_unavailable");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.store_failure"));
    }
    open.wait_for_log("serving without shared limits", LOG_DEADLINE)
        .await;
    // The store's thread counts the error and marks it down.
    scrape_until(
        open.url("/metrics"),
        "a store error, and the store down",
        |metrics| {
            let errors = metrics
                .lines()
                .find_map(|line| line.strip_prefix("oa_bypass_limits_store_errors_total "));
            errors.is_some_and(|errors| errors.trim().parse::<f64>().is_ok_and(|n| n >= 1.0))
                && metrics.contains("oa_bypass_limits_store_up 0")
        },
    )
    .await;
    let ready = client().get(open.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "open still serves, so it is ready");
    let ready = client().get(closed.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "store_unreachable");
    assert_eq!(ready["store"]["reachable"], false);

    // Back: both use it again without a restart.
    redis.restart();
    let recovered = || async {
        let status = get_models(&closed).await.status();
        (status == 200)
            .then_some(())
            .ok_or_else(|| status.to_string())
    };
    support::eventually("a 200 from `closed`", LOG_DEADLINE, recovered).await;
    closed
        .wait_for_log("limits.store answers", LOG_DEADLINE)
        .await;
    let ready = client().get(closed.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // And the limit is kept in the store again: its rate key is there.
    for _ in 0..20 {
        assert_eq!(get_models(&open).await.status(), 200);
        if redis
            .dump()
            .iter()
            .any(|(key, _)| key.contains(":rate:key:"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("open never used the store again:\n{}", open.logs());
}
