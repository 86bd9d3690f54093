//! SSE keep-alive (`[streaming] keepalive`, or a route's `keepalive`): a silent event stream
//! gets `: keep-alive` comments, only between events, while the read timeout still counts
//! the upstream's silence; the official Python SDK reads such a stream as it reads any.

use std::time::Duration;

use crate::support;
use crate::support::{Gateway, Upstream};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use poem::Response;

const KEEP_ALIVE: &str = ": keep-alive\n\n";
/// Bounds every wait; nothing here should take near this long.
const DELIVERY: Duration = Duration::from_secs(10);

fn with_keepalive(upstream: &Upstream, fast_lane: bool) -> String {
    format!(
        "[server]\nfast_lane = {fast_lane}\n{}",
        support::test_manifest(&upstream.base_url(), "[streaming]\nkeepalive = \"300ms\"")
    )
}

async fn open_stream(gateway: &Gateway) -> impl Stream<Item = reqwest::Result<Bytes>> {
    let response = support::start_chat_stream(gateway).await;
    assert_eq!(response.status(), 200);
    response.bytes_stream()
}

/// Reads into `got` until it ends with `end`.
async fn read_until(
    body: &mut (impl Stream<Item = reqwest::Result<Bytes>> + Unpin),
    got: &mut String,
    end: &str,
) {
    tokio::time::timeout(DELIVERY, async {
        while !got.ends_with(end) {
            let chunk = body.next().await.unwrap().unwrap();
            got.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{end:?} never came; got {got:?}"));
}

#[tokio::test]
async fn a_silent_stream_gets_keepalives_between_events_until_the_read_timeout() {
    for fast_lane in [true, false] {
        let (upstream, tx) = Upstream::streaming().await;
        let gateway = Gateway::start(&with_keepalive(&upstream, fast_lane)).await;
        let mut body = Box::pin(open_stream(&gateway).await);
        let mut got = String::new();

        // Before the first event (a reasoning model thinking): keep-alives, and only those.
        read_until(&mut body, &mut got, KEEP_ALIVE).await;
        assert!(
            got.split_inclusive("\n\n").all(|line| line == KEEP_ALIVE),
            "{got:?}"
        );

        // Inside an event, silence gets no comment, however long it lasts: here a second,
        // three intervals, within the read timeout.
        tx.send(Bytes::from_static(b"data: {\"a\":")).await.unwrap();
        read_until(&mut body, &mut got, "data: {\"a\":").await;
        let inside = tokio::time::timeout(Duration::from_secs(1), body.next()).await;
        assert!(inside.is_err(), "bytes came inside an event: {inside:?}");
        tx.send(Bytes::from_static(b"1}\n\n")).await.unwrap();
        read_until(&mut body, &mut got, "data: {\"a\":1}\n\n").await;

        // After it, keep-alives again; they do not hold off the read timeout (2s), which
        // still ends the stream with an error, not a clean end.
        let after = got.len();
        let ended = tokio::time::timeout(DELIVERY, async {
            loop {
                match body.next().await {
                    Some(Ok(chunk)) => got.push_str(std::str::from_utf8(&chunk).unwrap()),
                    Some(Err(_)) => return true,
                    None => return false,
                }
            }
        })
        .await
        .expect("the read timeout never ended the stream");
        assert!(
            ended,
            "a stream cut by the read timeout must not end cleanly"
        );
        let keepalives = got[after..].matches(KEEP_ALIVE).count();
        assert!(keepalives >= 2, "fast lane {fast_lane}: {got:?}");
        assert_eq!(got[after..], KEEP_ALIVE.repeat(keepalives));
        // The upstream's bytes are all there, unchanged, between the comments.
        assert_eq!(got.replace(KEEP_ALIVE, ""), "data: {\"a\":1}\n\n");
        drop(tx);
    }
}

#[tokio::test]
async fn without_the_setting_a_silent_stream_gets_nothing() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let mut body = Box::pin(open_stream(&gateway).await);
    let silent = tokio::time::timeout(Duration::from_secs(1), body.next()).await;
    assert!(silent.is_err(), "{silent:?}");
    tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
    let mut got = String::new();
    read_until(&mut body, &mut got, "data: {}\n\n").await;
    assert_eq!(got, "data: {}\n\n");
}

/// A chat stream paced like a slow model: three pieces 400 ms apart, then usage and
/// `[DONE]`.
fn paced_chat(_: &support::Recorded) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        for piece in ["one ", "two ", "three"] {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let chunk = serde_json::json!({
                "id": "chatcmpl-k", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
            });
            let _ = tx.send(Bytes::from(format!("data: {chunk}\n\n"))).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(support::streaming_body(rx))
}

#[tokio::test]
async fn the_official_python_sdk_reads_a_stream_with_keepalives() {
    let python = tokio::task::spawn_blocking(support::python::openai_sdk)
        .await
        .unwrap();
    let upstream = Upstream::start(paced_chat).await;
    let manifest =
        support::test_manifest(&upstream.base_url(), "[streaming]\nkeepalive = \"100ms\"");
    let gateway = Gateway::start(&manifest).await;

    // The stream carries keep-alives between the events, as a raw client sees.
    let mut body = Box::pin(open_stream(&gateway).await);
    let mut raw = String::new();
    read_until(&mut body, &mut raw, "data: [DONE]\n\n").await;
    assert!(raw.matches(KEEP_ALIVE).count() >= 3, "{raw:?}");

    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="sk-test-keepalive")
stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Count"}], stream=True
)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
"#;
    let stdout = support::python::run(&python, &["-c", script, &gateway.url("/v1")]).await;
    assert_eq!(stdout.trim(), "one two three");
}
