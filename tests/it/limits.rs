//! Rate and concurrency limits: 429s in OpenAI's shape, with Retry-After, before any upstream
//! call, and slots freed when answers finish.

use crate::support;
use crate::support::{assert_429, client, Gateway, Upstream};
use bytes::Bytes;
use futures_util::StreamExt;

fn manifest(upstream: &Upstream, limits: &str) -> String {
    format!(
        "[limits]\n{limits}\n{}",
        support::test_manifest(&upstream.base_url(), "")
    )
}

async fn models(gateway: &Gateway, key: &str) -> reqwest::Response {
    client()
        .get(gateway.url("/v1/models"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn per_key_rate_limit_refuses_past_the_burst_and_other_keys_go_on() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(
        &upstream,
        "requests_per_minute_per_key = 60\nburst = 2",
    ))
    .await;
    assert_eq!(models(&gateway, "sk-a").await.status(), 200);
    assert_eq!(models(&gateway, "sk-a").await.status(), 200);
    assert_429(
        models(&gateway, "sk-a").await,
        "rate_limit_exceeded",
        "limits.requests_per_minute_per_key = 60",
    )
    .await;
    assert_eq!(
        upstream.requests().len(),
        2,
        "the refused request reached the upstream"
    );
    assert_eq!(models(&gateway, "sk-b").await.status(), 200);
}

#[tokio::test]
async fn per_ip_rate_limit_counts_every_key_from_one_address() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(
        &upstream,
        "requests_per_minute_per_ip = 60\nburst = 1",
    ))
    .await;
    assert_eq!(models(&gateway, "sk-a").await.status(), 200);
    assert_429(
        models(&gateway, "sk-b").await,
        "rate_limit_exceeded",
        "limits.requests_per_minute_per_ip = 60",
    )
    .await;
}

/// Starts a chat stream through the gateway and waits for its first event.
async fn open_stream(
    gateway: &Gateway,
    key: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<Bytes>> {
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .body("{\"stream\":true}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes_stream()
}

#[tokio::test]
async fn global_concurrency_cap_holds_while_a_stream_is_open() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::start(&manifest(&upstream, "max_concurrent_requests = 1")).await;
    let mut stream = open_stream(&gateway, "sk-a").await;
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    stream.next().await.unwrap().unwrap();
    assert_429(
        models(&gateway, "sk-b").await,
        "concurrency_limit_exceeded",
        "limits.max_concurrent_requests (1 requests at once)",
    )
    .await;
    drop(tx);
    while stream.next().await.is_some() {}
    // The slot is free once the stream has ended.
    let mut status = 0;
    for _ in 0..50 {
        status = models(&gateway, "sk-b").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn per_key_concurrency_cap_leaves_other_keys_alone() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::start(&manifest(&upstream, "max_concurrent_per_key = 1")).await;
    let mut stream = open_stream(&gateway, "sk-a").await;
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    stream.next().await.unwrap().unwrap();
    assert_429(
        models(&gateway, "sk-a").await,
        "concurrency_limit_exceeded",
        "limits.max_concurrent_per_key",
    )
    .await;
    assert_eq!(models(&gateway, "sk-b").await.status(), 200);
    drop(tx);
}
