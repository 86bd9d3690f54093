//! Streams pass without buffering; failures on either side end them visibly and at once.

use std::time::Duration;

use crate::support;
use crate::support::{bearer, client, start_chat_stream, Gateway, RawUpstream, Upstream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Long enough for any machine to move one small chunk over loopback; a gateway that buffers
/// would hold the chunk until the next one arrives, which never happens before this expires.
const DELIVERY: Duration = Duration::from_secs(10);

#[tokio::test]
async fn each_sse_event_reaches_the_client_before_the_next_is_sent() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = start_chat_stream(&gateway).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-request-id"], "req_sse");
    let mut body = response.bytes_stream();
    for i in 0..20 {
        let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{i}\"}}}}]}}\n\n");
        tx.send(Bytes::from(event.clone())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < event.len() {
            let chunk = tokio::time::timeout(DELIVERY, body.next())
                .await
                .unwrap_or_else(|_| panic!("event {i} was held back by the gateway"))
                .unwrap()
                .unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, event.as_bytes(), "event {i} arrived changed or merged");
    }
    tx.send(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .unwrap();
    drop(tx);
    let rest: Vec<Bytes> = body.map(|chunk| chunk.unwrap()).collect().await;
    assert_eq!(rest.concat(), b"data: [DONE]\n\n");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = start_chat_stream(&gateway).await;
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    // The upstream's body receiver is dropped once the gateway drops its upstream request.
    tokio::time::timeout(DELIVERY, tx.closed())
        .await
        .expect("the upstream stream was not cancelled after the client left");
}

/// A raw upstream that answers the first request with `head` and `first`, then resets once
/// told to (when the client has the first part).
async fn resetting_upstream(
    head: &'static str,
    first: &'static str,
) -> (String, tokio::sync::mpsc::Sender<()>) {
    let (reset, told) = tokio::sync::mpsc::channel::<()>(1);
    let told = std::sync::Arc::new(tokio::sync::Mutex::new(told));
    let upstream = RawUpstream::start(move |mut socket| {
        let told = std::sync::Arc::clone(&told);
        async move {
            support::read_head(&mut socket, &mut Vec::new())
                .await
                .unwrap();
            socket.write_all(head.as_bytes()).await.unwrap();
            socket.write_all(first.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
            let _ = told.lock().await.recv().await;
            // SO_LINGER 0: close with RST, as a crashed upstream or a broken network would.
            #[allow(deprecated)]
            socket.set_linger(Some(Duration::ZERO)).unwrap();
            drop(socket);
        }
    })
    .await;
    (upstream.base_url(), reset)
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_the_client_response_abnormally() {
    let cases = [
        (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "9\r\ndata: 1\n\n\r\n",
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\n",
            "only a part of the body",
        ),
    ];
    for (head, first) in cases {
        let (base, reset) = resetting_upstream(head, first).await;
        let gateway = Gateway::start(&support::test_manifest(&base, "")).await;
        let response = support::get_with_key(gateway.url("/v1/models")).await;
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut received = Vec::new();
        let mut failed = false;
        while let Some(chunk) = tokio::time::timeout(DELIVERY, body.next()).await.unwrap() {
            match chunk {
                Ok(chunk) => {
                    received.extend_from_slice(&chunk);
                    // The client has the first part: now the upstream breaks off.
                    let _ = reset.try_send(());
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed,
            "the client saw a clean end after an upstream reset ({head:?})"
        );
        assert!(!received.is_empty(), "the first part should have arrived");
    }
}

#[tokio::test]
async fn upstream_silent_mid_stream_past_read_timeout_aborts_the_response() {
    let (upstream, tx) = Upstream::streaming().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    // /v1/slow has read_timeout = "300ms" in the test manifest.
    let response = client()
        .post(gateway.url("/v1/slow"))
        .header("authorization", bearer())
        .body("{}")
        .send()
        .await
        .unwrap();
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = response.bytes_stream();
    assert_eq!(body.next().await.unwrap().unwrap().as_ref(), b"data: 1\n\n");
    let next = tokio::time::timeout(DELIVERY, body.next()).await.unwrap();
    assert!(
        matches!(next, Some(Err(_))),
        "expected an aborted body, got {next:?}"
    );
    drop(tx);
}

/// A raw upstream that accepts connections and never answers.
async fn silent_upstream() -> String {
    let upstream = RawUpstream::start(|socket| async move {
        // Held open, unanswered, until the test's runtime ends.
        std::future::pending::<()>().await;
        drop(socket);
    })
    .await;
    upstream.base_url()
}

#[tokio::test]
async fn upstream_silent_before_headers_is_504_naming_the_setting() {
    let base = silent_upstream().await;
    let gateway = Gateway::start(&support::test_manifest(&base, "")).await;
    for (path, setting) in [
        ("/v1/slow", "routes[9].read_timeout (300ms)"),
        ("/v1/embeddings", "upstream.read_timeout (2s)"),
    ] {
        let response = client()
            .post(gateway.url(path))
            .header("authorization", bearer())
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 504, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["message"],
            format!("The upstream did not answer within {setting}")
        );
        assert_eq!(body["error"]["code"], "upstream_timeout");
    }
}

#[tokio::test]
async fn a_slow_upload_is_not_cut_while_it_keeps_moving() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    // Ten chunks 100 ms apart: one second in all, past /v1/slow's 300 ms read_timeout, yet
    // never silent for that long.
    let chunks = futures_util::stream::iter(0..10).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(Bytes::from(format!("{i:02}")))
    });
    let response = client()
        .post(gateway.url("/v1/slow"))
        .header("authorization", bearer())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body_len, 20);
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_the_cause() {
    let port = support::closed_port().port();
    let gateway = Gateway::start(&support::test_manifest(
        &format!("http://127.0.0.1:{port}"),
        "",
    ))
    .await;
    let response = support::get_with_key(gateway.url("/v1/models?secret=1")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("The upstream could not be reached"),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert!(!message.contains("secret"), "the query leaked: {message}");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_open_stream_finish() {
    let (upstream, tx) = Upstream::streaming().await;
    let mut gateway = Gateway::in_front_of(&upstream).await;
    let response = start_chat_stream(&gateway).await;
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();

    gateway.shutdown();
    // New connections are refused while the old stream still runs: once the accept loop has
    // seen the signal, within 10 s.
    let refused = || async {
        let health = client().get(gateway.url("/health")).send().await;
        health.err().map(drop).ok_or_else(|| "an answer".to_owned())
    };
    support::eventually("new connections refused", support::LOG_DEADLINE, refused).await;

    tx.send(Bytes::from_static(b"data: 2\n\n")).await.unwrap();
    drop(tx);
    let rest: Vec<Bytes> = body.map(|chunk| chunk.unwrap()).collect().await;
    assert_eq!(rest.concat(), b"data: 2\n\n");
    let served = tokio::time::timeout(DELIVERY, &mut gateway.handle)
        .await
        .expect("the server did not stop after its last stream ended");
    served.unwrap().unwrap();
}

/// An event stream leaves marked so that a proxy in front of the gateway (nginx, an ingress)
/// passes it on unbuffered: `X-Accel-Buffering: no` always, replacing the upstream's, and
/// `Cache-Control: no-cache` unless the upstream set a caching rule of its own. Other answers
/// are left as they came. Both engines (the fast one serves this route over plain HTTP/1.1).
#[tokio::test]
async fn event_streams_tell_the_proxies_in_front_not_to_buffer() {
    // The test asks for its answer's headers in the request's `x-answer` header.
    let upstream = Upstream::start(|rec| {
        let mut answer = poem::Response::builder();
        let asked = rec.header("x-answer").unwrap_or_default().to_owned();
        for field in asked.split(';').filter(|field| !field.is_empty()) {
            let (name, value) = field.split_once('=').unwrap();
            answer = answer.header(name, value);
        }
        answer.body("data: {}\n\n")
    })
    .await;
    let manifest = support::test_manifest(&upstream.base_url(), "");
    for manifest in [
        manifest.clone(),
        format!("[server]\nfast_lane = false\n{manifest}"),
    ] {
        let gateway = Gateway::start(&manifest).await;
        let answer = |asked: &'static str| {
            let request = client()
                .post(gateway.url("/v1/chat/completions"))
                .header("authorization", bearer())
                .header("content-type", "application/json")
                .header("x-answer", asked)
                .body(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#);
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200);
                let field = |name: &str| -> Vec<String> {
                    response
                        .headers()
                        .get_all(name)
                        .iter()
                        .map(|value| value.to_str().unwrap().to_owned())
                        .collect()
                };
                (field("x-accel-buffering"), field("cache-control"))
            }
        };
        let (no, no_cache) = (vec!["no".to_owned()], vec!["no-cache".to_owned()]);
        assert_eq!(
            answer("content-type=text/event-stream").await,
            (no.clone(), no_cache.clone())
        );
        assert_eq!(
            answer("content-type=Text/Event-Stream; charset=utf-8").await,
            (no.clone(), no_cache.clone()),
            "the media type is read in any case, parameters aside"
        );
        assert_eq!(
            answer("content-type=text/event-stream;x-accel-buffering=yes;cache-control=private")
                .await,
            (no.clone(), vec!["private".to_owned()]),
            "the upstream's buffering switch is replaced, its caching rule kept"
        );
        assert_eq!(
            answer("content-type=application/json;x-accel-buffering=yes").await,
            (vec!["yes".to_owned()], vec![]),
            "other answers pass as they came"
        );
    }
}
